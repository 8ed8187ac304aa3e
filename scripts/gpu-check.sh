#!/usr/bin/env bash
# The GPU check of recording, in one run (docs/benchmarks.md, "GPU"):
#  1. builds the tch tests and the overhead bench with feature `cuda`
#     (release; no DataFusion in them, so a few minutes on a fresh machine);
#  2. runs the reconstruction tests, the tracing-does-not-change-training
#     test and the f16 test on CUDA (REPTRACE_TEST_DEVICE=cuda);
#  3. prints traced/untraced ratios for MLP 784-256-10 at batch 64 and
#     MLP 3072-1024-10 at batch 256, f32 and f16 (goal ≤ 1.3 each);
#  4. the PyTorch tracer on CUDA (scripts/bench/torch_cuda.py): traced /
#     untraced for MLP 3072-1024-10 at batch 256 and the test suite's CNN,
#     f32 and f16, each with zstd and without compression (the overhead
#     bench of step 3 has both too), the device synchronisations inside a
#     traced step (PyTorch's sync debug mode; goal 1), and the records of
#     each rebuilding its final weights.
#     It needs the reptrace Python package's compiled module in
#     python/reptrace/ (`scripts/setup.sh` builds it; `build` copies it into
#     DIR, `run` puts it back) and a python3 with torch 2.11 with CUDA,
#     numpy and pyarrow; without them step 4 is skipped with a line.
#
#   scripts/gpu-check.sh             # build and run: cargo, libtorch with CUDA, a GPU
#   scripts/gpu-check.sh build       # build only, stripped, into target/gpu-check (about 35 MB)
#   scripts/gpu-check.sh run [DIR]   # run what `build` made, on a GPU machine without Rust:
#                                    # copy DIR (target/gpu-check) there with the repository
#
# libtorch comes from .libtorch (scripts/setup.sh: PyTorch 2.11.0 from PyPI,
# CUDA 13 build) for the build; `run` uses LIBTORCH_LIB, or the lib folder of
# the torch that `python3` imports there (it must be 2.11.x with CUDA).
# Environment: GPU_CHECK_STEPS (1000 for 784-256-10; 3072-1024-10 gets a
# fifth), GPU_CHECK_REPEATS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
dir=${2:-target/gpu-check}

build() {
  scripts/setup.sh --torch
  mkdir -p "$dir"
  cargo build --release --locked -p reptrace-tch --features cuda --tests --benches \
    --message-format=json-render-diagnostics >"$dir/build.json"
  python3 - "$dir" <<'PY'
import json, shutil, subprocess, sys
from pathlib import Path
out = Path(sys.argv[1])
wanted = {("test", "tch"): "tch-tests", ("bench", "overhead"): "overhead"}
for line in (out / "build.json").read_text().splitlines():
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    t = m.get("target", {})
    for (kind, name), dest in wanted.items():
        if m.get("reason") == "compiler-artifact" and kind in t.get("kind", []) \
                and t.get("name") == name and m.get("executable"):
            shutil.copy(m["executable"], out / dest)
            subprocess.run(["strip", str(out / dest)], check=True)
            print(f"gpu-check: {out / dest}")
PY
  rm -f "$dir/build.json"
  if [ -f python/reptrace/_reptrace.abi3.so ]; then
    cp python/reptrace/_reptrace.abi3.so "$dir/"
  else
    echo "gpu-check: no python/reptrace/_reptrace.abi3.so (run scripts/setup.sh): step 4 will be skipped" >&2
  fi
}

run() {
  if [ -z "${LIBTORCH_LIB:-}" ]; then
    if [ -d .libtorch/lib ]; then
      LIBTORCH_LIB=$PWD/.libtorch/lib
    else
      LIBTORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
    fi
  fi
  export LD_LIBRARY_PATH="$LIBTORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
    echo "gpu-check: no NVIDIA GPU here (nvidia-smi)" >&2
    exit 1
  fi
  steps=${GPU_CHECK_STEPS:-1000}
  repeats=${GPU_CHECK_REPEATS:-3}
  echo "== reconstruction on CUDA"
  REPTRACE_TEST_DEVICE=cuda "$dir/tch-tests" --test-threads 1 \
    reconstruction tracing_does_not_change_training f16_factors factors_sum
  echo "== overhead on CUDA: MLP 784-256-10, batch 64, $steps steps"
  REPTRACE_BENCH_DEVICE=cuda REPTRACE_BENCH_ROWS=$((steps * 64)) REPTRACE_BENCH_REPEATS=$repeats \
    "$dir/overhead" --bench
  echo "== overhead on CUDA: MLP 3072-1024-10, batch 256, $((steps / 5)) steps"
  REPTRACE_BENCH_DEVICE=cuda REPTRACE_BENCH_INPUT=3072 REPTRACE_BENCH_HIDDEN=1024 \
    REPTRACE_BENCH_BATCH=256 REPTRACE_BENCH_ROWS=$((steps / 5 * 256)) REPTRACE_BENCH_REPEATS=$repeats \
    "$dir/overhead" --bench
  echo "== the PyTorch tracer on CUDA: MLP 3072-1024-10 b256 and the test CNN, f32 and f16"
  if [ ! -f python/reptrace/_reptrace.abi3.so ] && [ -f "$dir/_reptrace.abi3.so" ]; then
    cp "$dir/_reptrace.abi3.so" python/reptrace/
  fi
  py=python3
  [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null && py=.venv/bin/python
  if [ -f python/reptrace/_reptrace.abi3.so ] && "$py" -c 'import torch, numpy, pyarrow' 2>/dev/null; then
    PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" "$py" scripts/bench/torch_cuda.py \
      --device cuda --steps $((steps / 3)) --repeats "$repeats"
  else
    echo "gpu-check: step 4 skipped: no compiled Python module or no torch/numpy/pyarrow for $py" >&2
  fi
}

case $mode in
  build) build ;;
  run) run ;;
  all) build && run ;;
  *) echo "usage: scripts/gpu-check.sh [build | run [DIR]]" >&2; exit 2 ;;
esac
