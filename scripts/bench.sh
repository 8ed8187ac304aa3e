#!/usr/bin/env bash
# The benchmark summary: runs every benchmark and prints one table
# (row | figure | goal | met?) with the machine and the date; the same table
# in Markdown goes to target/bench/table.md for docs/benchmarks.md.
# Does its own set-up on a fresh machine (scripts/setup.sh) and builds the
# release binary and the benchmarks first. About 4.5 minutes of benchmarks on
# 2 cores, after the first release build (DataFusion: 20 to 45 minutes).
#
#   scripts/bench.sh
#
# Rows, each a ratio of two things measured in this run:
#   1  recording overhead   crates/tch/benches/overhead.rs (zstd and
#                           --compression none; f16 time / f32 time)
#   2  storage              crates/record/benches/write.rs (synthetic; and
#                           the compaction of an uncompressed run) and
#                           `reptrace info --json` of digits runs
#   3  attribution          crates/analyze/benches/attribution.rs
#   4  queries              crates/analyze/benches/queries.rs (DataFusion) vs
#                           scripts/bench/duckdb_queries.py (DuckDB), same files
#   5  peak RSS             `reptrace train` / `reptrace attribute` at E and
#                           10·E epochs (scripts/bench/summary.py rss)
#   6  the Python package   scripts/bench/torch_overhead.py (MLP and CNN): PyTorch training
#                           traced / untraced, and its peak RSS at S and 10·S
#                           steps, with the release build of the extension
#   7  on demand            crates/analyze/benches/queries.rs: top_proponents
#                           computed on demand / a bare scan of the updates, and
#                           / the same query on materialised rows; `reptrace
#                           query` peak RSS at E and 10·E epochs (before any
#                           attribution); derived bytes / trace bytes after
#                           `reptrace demo` (scripts/bench/summary.py derived)
#   8  start-up             scripts/bench/startup.py: a whole `reptrace query`
#                           process / the DuckDB command line (duckdb-cli from
#                           PyPI, installed into .venv) answering the same
#                           canned query in its own process, on the demo run
#   9  queries under load   `reptrace sql` sorting the demo's 31 M materialised
#                           contribution rows: peak RSS under a 512 MiB limit /
#                           the limit, and its time / the time without a limit
#                           (scripts/bench/summary.py rss)
#  10  the gradient check  scripts/bench/check.py: the Python tracer traced
#                           with its per-step gradient check / without it
#  12  Spark                scripts/bench/spark.py: contributions on Spark
#                           local[2] / DataFusion, records × probes per second
#  13  DDP                  scripts/bench/torch_ddp.py: 2 CPU processes under
#                           torchrun (gloo), traced / untraced
#  11  a transformer        scripts/bench/torch_transformer.py: the test
#                           transformer traced / untraced, f32 and f16, and
#                           its bytes on disk per example-step
# Sizes can be changed through the environment (defaults below).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*" >&2; }

# Row 1: training rows (64 per step) and repeats.
overhead_rows=${BENCH_OVERHEAD_ROWS:-64000}
overhead_repeats=${BENCH_OVERHEAD_REPEATS:-5}
# Row 2 (synthetic): recorded steps and repeats.
write_steps=${BENCH_WRITE_STEPS:-400}
write_repeats=${BENCH_WRITE_REPEATS:-3}
# Row 3: records per layer, probes, repeats.
attr_records=${BENCH_ATTR_RECORDS:-100000}
attr_probes=${BENCH_ATTR_PROBES:-100}
attr_repeats=${BENCH_ATTR_REPEATS:-3}
# Rows 2 (digits), 4 and 5: epochs of the 1x digits run; the 10x run (with
# the demo's settings) is also the run the queries read (62 M contribution
# rows at 40 epochs). 4, not 2: attribution buffers a Parquet row group of
# up to 1 Mi rows per layer, which a 2-epoch run (1.0 M rows per layer) only
# just fills, so its peak is not yet the steady one.
epochs=${BENCH_EPOCHS:-4}
query_repeats=${BENCH_QUERY_REPEATS:-10}
# Row 8: repeats, and the DuckDB command line it compares with.
startup_repeats=${BENCH_STARTUP_REPEATS:-20}
duckdb_cli=1.5.6
# Row 9: the memory limit of the sort.
sort_limit=${BENCH_SORT_LIMIT:-512MiB}
# Row 6: PyTorch training steps (batch 64) and repeats.
torch_steps=${BENCH_TORCH_STEPS:-1000}
torch_repeats=${BENCH_TORCH_REPEATS:-5}

out=${BENCH_DIR:-target/bench}
logs="$out/logs"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
bin="$target_dir/release/reptrace"
py=.venv/bin/python

step "set-up"
scripts/setup.sh

step "build (release binary and benchmarks)"
mkdir -p "$out"
# One build for both: the same packages and targets as `cargo bench
# --workspace`, so that the binary and the benchmarks share one feature set
# (a `-p reptrace-cli` build alone would compile DataFusion a second time).
# The benchmarks then run as built (what `cargo bench --workspace --bench
# NAME -- ARGS` runs), without taking cargo's lock on the target directory
# again.
# `--lib` adds the Python extension (crates/python), on the same dependency
# build.
cargo build --release --locked --workspace --lib --bins --benches \
  --message-format=json-render-diagnostics >"$out/build.json"
bench() { # bench NAME ARGS...: runs a bench target as `cargo bench` would
  local exe
  exe=$($py scripts/bench/summary.py exe "$out/build.json" "$1")
  shift
  "$exe" "$@" --bench
}

# The Python package with the release build of its extension, for row 6
# (the .venv holds the development build that scripts/setup.sh installs).
rm -rf "$out/py"
mkdir -p "$out/py/reptrace"
cp python/reptrace/*.py "$out/py/reptrace/"
cp "$target_dir/release/lib_reptrace.so" "$out/py/reptrace/_reptrace.abi3.so"

rm -rf "$logs" "$out/runs"
mkdir -p "$logs" "$out/runs"
start=$(date +%s)

step "1 recording overhead ($overhead_rows rows, $overhead_repeats repeats)"
REPTRACE_BENCH_ROWS=$overhead_rows REPTRACE_BENCH_REPEATS=$overhead_repeats \
  bench overhead | tee "$logs/overhead.log"

step "2 storage, synthetic ($write_steps steps, $write_repeats repeats)"
REPTRACE_BENCH_STEPS=$write_steps REPTRACE_BENCH_REPEATS=$write_repeats \
  bench write | tee "$logs/write.log"

step "3 attribution ($attr_records records, $attr_probes probes, $attr_repeats repeats)"
bench attribution \
  --records "$attr_records" --probes "$attr_probes" --repeats "$attr_repeats" | tee "$logs/attribution.log"

# The demo's settings (reptrace demo): MLP 64-32-16-10 on digits, every layer
# traced, SGD momentum 0.9, cosine schedule; the test probes.
settings=(--momentum 0.9 --lr-schedule cosine --probes test)
for scale in 1 10; do
  e=$((epochs * scale))
  run="$out/runs/digits-e$e"
  step "5 peak RSS, $scale×: train and attribute $e epochs ($run)"
  $py scripts/bench/summary.py rss what=train scale=$scale epochs=$e detail=f32 -- \
    "$bin" train --epochs "$e" --dtype f32 "${settings[@]}" --out "$run" | tee -a "$logs/rss.log"
  p=$("$bin" sql "$run" "SELECT MIN(probe_id) AS p FROM probes WHERE instance_id IS NULL" --format csv | tail -n 1)
  step "7 peak RSS, $scale×: top_proponents of probe $p computed on demand ($run)"
  $py scripts/bench/summary.py rss what=query scale=$scale epochs=$e detail=top_proponents_on_demand -- \
    "$bin" query "$run" top_proponents --param probe="$p" | tee -a "$logs/rss.log"
  $py scripts/bench/summary.py rss what=attribute scale=$scale epochs=$e detail=360_test_probes -- \
    "$bin" attribute "$run" --probes test --quiet | tee -a "$logs/rss.log"
done
big="$out/runs/digits-e$((epochs * 10))"

step "2 storage, digits ($((epochs * 10)) epochs, f32 and f16)"
"$bin" train --epochs $((epochs * 10)) --dtype f16 "${settings[@]}" --out "$big-f16" >/dev/null
"$bin" info "$big" --json >"$out/runs/info-f32.json"
"$bin" info "$big-f16" --json >"$out/runs/info-f16.json"
{
  $py scripts/bench/summary.py storage digits f32 "$out/runs/info-f32.json"
  $py scripts/bench/summary.py storage digits f16 "$out/runs/info-f16.json"
} | tee "$logs/storage-digits.log"

step "4 canned queries, DataFusion vs DuckDB ($big, $query_repeats repeats)"
probe=$("$bin" sql "$big" "SELECT MIN(probe_id) AS p FROM probes WHERE instance_id IS NULL" --format csv | tail -n 1)
bench queries \
  --run "$big" --probe "$probe" --repeats "$query_repeats" | tee "$logs/queries-datafusion.log"
$py scripts/bench/duckdb_queries.py "$big" --probe "$probe" --repeats "$query_repeats" \
  | tee "$logs/queries-duckdb.log"

step "7 derived bytes after the demo"
"$bin" demo --out "$out/runs/demo" >"$logs/demo.out"
$py scripts/bench/summary.py derived "$out/runs/demo" | tee "$logs/derived.log"

step "8 start-up: whole processes, reptrace query vs the DuckDB command line"
[ -x .venv/bin/duckdb ] || $py -m pip install -q "duckdb-cli==$duckdb_cli"
demo_probe=$(sed -n 's/^report of probe \([0-9]*\):.*/\1/p' "$logs/demo.out")
# DuckDB reads materialised contributions: attribute the demo's probe first.
"$bin" attribute "$out/runs/demo" --probes "ids:$demo_probe" --quiet >/dev/null
$py scripts/bench/startup.py "$bin" "$out/runs/demo" --probe "$demo_probe" \
  --repeats "$startup_repeats" | tee "$logs/startup.log"

step "9 queries under load: the 31 M-row sort under a $sort_limit limit and without one"
# The contributions of the demo's 360 test probes, materialised (31 M rows),
# sorted whole as the issue's user did; the result (a text table) goes to
# /dev/null. `exec` keeps the measured child the reptrace process itself.
"$bin" attribute "$out/runs/demo" --probes test --quiet >/dev/null
sort_sql="SELECT probe_id, instance_id, dot FROM contributions ORDER BY dot DESC"
for limit in "$sort_limit" none; do
  $py scripts/bench/summary.py rss what=sort limit="$limit" -- \
    sh -c 'exec "$@" >/dev/null' sh "$bin" sql "$out/runs/demo" "$sort_sql" --memory-limit "$limit" \
    | tee -a "$logs/sort.log"
done

step "6 the Python package: PyTorch traced / untraced ($torch_steps steps, $torch_repeats repeats) and peak RSS"
PYTHONPATH="$out/py" $py scripts/bench/torch_overhead.py \
  --steps "$torch_steps" --repeats "$torch_repeats" | tee "$logs/torch.log"
PYTHONPATH="$out/py" $py scripts/bench/torch_overhead.py --model cnn \
  --steps "$((torch_steps / 2))" --repeats "$torch_repeats" | tee "$logs/torch-cnn.log"
for scale in 1 10; do
  s=$((torch_steps * scale))
  $py scripts/bench/summary.py rss what=torch scale=$scale steps=$s -- \
    env PYTHONPATH="$out/py" $py scripts/bench/torch_overhead.py --once traced --steps "$s" | tee -a "$logs/rss.log"
done

step "10 the Python tracer's gradient check: traced with / without it ($torch_steps steps, $torch_repeats repeats)"
PYTHONPATH="$out/py" $py scripts/bench/check.py \
  --steps "$torch_steps" --repeats "$torch_repeats" | tee "$logs/check.log"

step "11 a transformer: PyTorch traced / untraced and bytes per example-step ($torch_repeats repeats)"
PYTHONPATH="$out/py" $py scripts/bench/torch_transformer.py \
  --repeats "$torch_repeats" | tee "$logs/transformer.log"

step "12 Spark: contributions on Spark local[2] beside DataFusion ($torch_repeats repeats)"
PYTHONPATH="$out/py" $py scripts/bench/spark.py --bin "$bin" --epochs "$((epochs * 10))" \
  --probes 359 --repeats "$torch_repeats" | tee "$logs/spark.log"

step "13 DDP: PyTorch traced / untraced on 2 CPU processes ($torch_repeats repeats)"
PYTHONPATH="$out/py" $py scripts/bench/torch_ddp.py --repeats "$torch_repeats" | tee "$logs/ddp.log"

step "summary ($(($(date +%s) - start)) s of benchmarks)"
$py scripts/bench/summary.py table "$logs"/*.log --md "$out/table.md"
