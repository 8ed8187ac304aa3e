#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60) and
# exits non-zero when one of them found a crash, a timeout or an
# out-of-memory input. Not part of CI: run it by hand after changing a
# parser (see docs/contributing.md, "Fuzzing").
#
#   scripts/fuzz.sh [SECONDS]
#
# Needs the nightly toolchain (installed with rustup; nothing is
# downloaded here) and installs cargo-fuzz into .tools/ on first use.
# Findings go to fuzz/artifacts/<target>/, each run's log to
# fuzz/artifacts/<target>.log; new corpus entries are kept (git-ignored) in
# fuzz/corpus/<target>/ next to the committed seed-* files.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS]  (a positive whole number, default 60)" >&2
    exit 2
fi
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "scripts/fuzz.sh: the nightly toolchain is not installed (rustup toolchain install nightly)" >&2
    exit 2
fi

tools="$PWD/.tools"
if [ ! -x "$tools/bin/cargo-fuzz" ]; then
    echo "== installing cargo-fuzz into .tools/"
    cargo install --locked --root "$tools" cargo-fuzz
fi
export PATH="$tools/bin:$PATH"

cd fuzz
# The fuzz crate has its own lock file and target directory.
unset CARGO_TARGET_DIR
targets=$(cargo +nightly fuzz list)
# Debug assertions on, so that integer overflow is a finding too.
cargo +nightly fuzz build --debug-assertions

failed=()
summary=()
for target in $targets; do
    echo "== $target: ${seconds}s"
    mkdir -p "corpus/$target" "artifacts/$target"
    log="artifacts/$target.log"
    # -timeout: an input that runs for 10 s counts as a hang.
    # -rss_limit_mb / -malloc_limit_mb: so does one that needs 2 GiB.
    if cargo +nightly fuzz run --debug-assertions "$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -malloc_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=FOUND
        failed+=("$target")
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    summary+=("$(printf '%-14s %-5s %12s executions' "$target" "$status" "${runs:-?}")")
    if [ "$status" = FOUND ]; then
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written|==[0-9]+==ERROR' "$log" | head -8 || true
    fi
done

echo
echo "== summary (${seconds}s per target; logs in fuzz/artifacts/)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "findings in: ${failed[*]} (inputs in fuzz/artifacts/<target>/; minimise with cargo +nightly fuzz tmin <target> <input>)" >&2
    exit 1
fi
