#!/usr/bin/env bash
# Before/after of the tracing-overhead bench (crates/tch/benches/overhead.rs):
# runs two builds of it alternately, ROUNDS times each, on one machine in one
# sitting, and prints the medians of the traced f32 run's ms per step and of
# its overhead ratio (traced / untraced total time) for each build.
#
#   scripts/bench/ab-overhead.sh BEFORE_EXE AFTER_EXE [ROUNDS]
#
# The executables are `target/release/deps/overhead-*` of the two builds
# (copy the "before" one aside before rebuilding). REPTRACE_BENCH_* settings
# pass through (REPTRACE_BENCH_REPEATS defaults to 3 here).
set -euo pipefail
before=$1 after=$2 rounds=${3:-5}
export REPTRACE_BENCH_REPEATS=${REPTRACE_BENCH_REPEATS:-3}
out=$(mktemp)
for ((r = 1; r <= rounds; r++)); do
  for which in before after; do
    exe=$before; [ "$which" = after ] && exe=$after
    "$exe" --bench 2>&1 | sed -n -e "s/^traced f32 /$which traced /p" \
      -e "s/^BENCH overhead dtype=f32 /$which BENCH /p" >>"$out"
  done
done
python3 - "$out" <<'PY'
import re, statistics, sys
rows = open(sys.argv[1]).read().splitlines()
res = {}
for which in ("before", "after"):
    ms = [float(l.split()[4]) for l in rows if l.startswith(which + " traced ")]
    ratio = [float(re.search(r"ratio=([0-9.]+)", l).group(1)) for l in rows if l.startswith(which + " BENCH ")]
    res[which] = (statistics.median(ms), statistics.median(ratio))
    print(f"{which:6}  traced f32 {res[which][0]:.3f} ms/step (median of {len(ms)}), overhead ratio {res[which][1]:.2f}")
print(f"after/before: ms/step x{res['after'][0] / res['before'][0]:.2f}, overhead ratio x{res['after'][1] / res['before'][1]:.2f}")
PY
rm -f "$out"
