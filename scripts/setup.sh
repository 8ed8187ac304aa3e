#!/usr/bin/env bash
# Project-local set-up, idempotent: a Python virtual environment in .venv
# with PyTorch 2.11.0 (the libtorch that tch 0.24 links against, and
# `import torch` for the Python package), the Python packages the tests use,
# the reptrace Python package itself (built with maturin from crates/python,
# dev profile, sharing target/), and the .libtorch link that
# .cargo/config.toml points tch at. Nothing is installed outside the
# repository. Safe to run again: it does only what is missing.
#
#   scripts/setup.sh          # torch + test packages + the reptrace package
#   scripts/setup.sh --torch  # libtorch only (enough for the demo)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv="$root/.venv"
py=${PYTHON:-python3}

want_tests=1
[ "${1:-}" = "--torch" ] && want_tests=0

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  "$py" -m venv "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# PyTorch 2.11.0 without its CUDA wheels: libtorch_cpu needs only the CUDA
# runtime and CUPTI libraries. `import torch` does not work in this
# environment (its pure-Python dependencies are left out); tch only needs the
# shared libraries and headers.
if [ ! -f "$site/torch/lib/libtorch_cpu.so" ] || ! grep -qx "__version__ = '2.11.0+cu130'" "$site/torch/version.py" 2>/dev/null; then
  echo "setup: installing PyTorch 2.11.0 into $venv (about 1 GB, once)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    torch==2.11.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
fi
ln -sfn "$site/torch" "$root/.libtorch"

# The whole PyTorch wheel with its dependencies (CUDA libraries included:
# `import torch` loads them even on a CPU), for the Python package's tests.
if [ "$want_tests" = 1 ] && ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  echo "setup: installing PyTorch 2.11.0 with its dependencies (about 3 GB, once)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.11.0
fi

if [ "$want_tests" = 1 ]; then
  if ! "$venv/bin/python" -c 'import pyarrow, pandas, pytest' 2>/dev/null \
     || ! cmp -s requirements-test.txt "$venv/.requirements-test.txt"; then
    echo "setup: installing test packages (requirements-test.txt)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r requirements-test.txt
    cp requirements-test.txt "$venv/.requirements-test.txt"
  fi
fi

# A headless Java runtime for the Spark interop tests (pyspark local mode
# needs Java 17+); the system package, only when java is missing and we are
# root. scripts/test.sh fails a skipped test, so without it the suite fails.
if [ "$want_tests" = 1 ] && ! command -v java >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing a headless Java runtime (apt-get) for the Spark tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null
fi

# Headless Chromium for the report's rendering test (crates/cli/tests/report.rs);
# the system package, only when missing and we are root.
if [ "$want_tests" = 1 ] && [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ]; then
  echo "setup: installing chromium (apt-get) for the report rendering test"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# The reptrace Python package, built from this tree into .venv: maturin
# compiles crates/python with the dev profile into the shared target/ (the
# same dependency build as `cargo build --workspace`).
if [ "$want_tests" = 1 ]; then
  echo "setup: building the reptrace Python package (maturin develop)"
  (cd python && VIRTUAL_ENV="$venv" "$venv/bin/maturin" develop --quiet --locked)
fi

