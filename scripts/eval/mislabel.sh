#!/usr/bin/env bash
# Which score finds wrong training labels: plants 10 % flipped labels in the
# bundled digits, trains the demo MLP and a wide MLP that fits them, and
# prints the ROC AUC of every candidate score (scripts/eval/mislabel.py;
# the table in docs/benchmarks.md). Extra arguments go to the Python script
# (--seed N, --fraction F, --out DIR, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/setup.sh
# The same build as scripts/bench.sh (one feature set, no second DataFusion build).
cargo build --release --locked --workspace --lib --bins --benches
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
exec .venv/bin/python scripts/eval/mislabel.py "$target_dir/release/reptrace" "$@"
