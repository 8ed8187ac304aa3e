#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Does its own set-up on a fresh machine: the project-local Python
# environment with PyTorch 2.11.0 and the test packages (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

# Runs a cargo command on one package; fails if it fails, or if it compiles
# arrow, parquet or DataFusion again instead of reusing the workspace's
# dependency build (its features resolved for that package alone differ).
reuses_workspace_build() {
  local log
  log=$(mktemp)
  "$@" 2>&1 | tee "$log"
  if grep -qE "(Compiling|Checking) (arrow|parquet|datafusion)" "$log"; then
    echo "\`$*\` resolves other dependency features than the workspace build"
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
}

step "set-up"
scripts/setup.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "docs and packaging"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
scripts/check-package.sh

step "build (binaries, examples and benchmarks compiled, not run)"
cargo build --workspace --all-targets --locked --profile dev
# The analyzer and the CLI must build without libtorch. That check reuses
# clippy's dependency check above (crates/cli/Cargo.toml pins the features
# that make the two agree; otherwise DataFusion is checked a second time).
reuses_workspace_build cargo check -p reptrace-cli --no-default-features --locked
# The CUDA build links: the overhead bench with feature `cuda`, which
# force-links libtorch_cuda from the CUDA 13 libtorch of PyPI's torch;
# running it needs a GPU (scripts/gpu-check.sh). `--workspace` keeps the
# dependencies' features those of the build above (a `-p reptrace-tch`
# build would compile parquet, and with more packages DataFusion, again):
# only reptrace-tch and the bench are compiled.
cargo build --workspace --features reptrace-tch/cuda --bench overhead --locked
# maturin (scripts/setup.sh) builds crates/python on its own; that must reuse
# this dependency build, not compile parquet and DataFusion a second time
# (crates/python/Cargo.toml pins the features that make the two agree).
reuses_workspace_build cargo build -p reptrace-python --lib --locked

step "Rust tests"
cargo test --workspace --locked

step "Python tests (pyarrow, pandas and friends reading our files)"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
export REPTRACE_BIN="$target_dir/debug/reptrace"
export REPTRACE_SYNTHETIC_BIN="$target_dir/debug/examples/synthetic"
# A skipped test fails here (tests/python/conftest.py): the set-up installs
# everything the suite needs, Java for Spark included.
export REPTRACE_NO_SKIPS=1
set +e
.venv/bin/python -m pytest tests/python -q
rc=$?
set -e
step "done, rc=$rc"
# pytest exits 5 when it collected no test: that is a failure here too.
exit $rc
