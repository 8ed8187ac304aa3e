"""Recording a transformer with the Python package: traced / untraced time
and the bytes on disk per example-step, f32 and f16.

    python scripts/bench/torch_transformer.py [--steps N] [--repeats R]

The model is the test suite's transformer (tests/python/test_transformers.py:
token and position embeddings, two pre-norm blocks with q/k/v/o and MLP
``nn.Linear`` projections over sequences of 8, layer norms, a head; width 16),
batch 16, SGD with momentum, every layer traced in instance mode. Each
repeat trains untraced, traced f32 and traced f16 side by side; the figures
are medians of the per-repeat ratios (traced over the untraced run of the same
repeat), a traced time including ``finish()``. The bytes per example-step are
the committed ``updates`` bytes over the update records (``reptrace info``),
per layer and in all.

Prints a table and, for scripts/bench.sh, one line per dtype:
``BENCH torch_transformer dtype=f32 ratio=R untraced_ms_per_step=M traced_ms_per_step=T bytes_per_example_step=B steps=S repeats=N``
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))

import reptrace  # noqa: E402
from test_transformers import CLASSES, TinyTransformer, sequences  # noqa: E402

BATCH = 16


def train(x, y, steps: int, dtype: str | None, run_dir: Path) -> float:
    """Seconds for `steps` steps (and finish() when traced: dtype not None)."""
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracer = None
    if dtype is not None:
        tracer = reptrace.Tracer(model, opt, run_dir, classes=CLASSES, dtype=dtype)
    start = time.perf_counter()
    for s in range(steps):
        rows = torch.arange(s * BATCH, (s + 1) * BATCH) % len(x)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[rows]), y[rows])
        loss.backward()
        if tracer is not None:
            tracer.step(loss, rows, y[rows])
        else:
            opt.step()
    if tracer is not None:
        tracer.finish()
    return time.perf_counter() - start


def storage(run_dir: Path) -> tuple[float, dict[str, tuple[str, float]]]:
    """Bytes of `updates` per example-step in all, and per layer (storage, bytes)."""
    storage = reptrace.open(str(run_dir)).info()["storage"]
    per_layer = {n: (s["storage"], s["bytes_per_record"]) for n, s in storage.items()}
    total = sum(s["bytes"] for s in storage.values())
    records = max(s["records"] for s in storage.values())
    return total / records, per_layer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = sequences(1024, seed=1)
    tmp = Path(tempfile.mkdtemp(prefix="reptrace-transformer-"))
    ratios = {"f32": [], "f16": []}
    times = {"untraced": [], "f32": [], "f16": []}
    per_step = {}
    try:
        for r in range(args.repeats):
            base = train(x, y, args.steps, None, tmp / "none")
            times["untraced"].append(base)
            for dtype in ("f32", "f16"):
                run = tmp / f"{dtype}-{r}"
                t = train(x, y, args.steps, dtype, run)
                times[dtype].append(t)
                ratios[dtype].append(t / base)
                per_step[dtype] = storage(run)
                shutil.rmtree(run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"extension: {reptrace._reptrace.__file__}")
    print(f"{'layer':<18} {'storage':<8} {'f32 B/rec':>10} {'f16 B/rec':>10}")
    for layer, (kind, b32) in per_step["f32"][1].items():
        print(f"{layer:<18} {kind:<8} {b32:>10.0f} {per_step['f16'][1][layer][1]:>10.0f}")
    base_ms = statistics.median(times["untraced"]) * 1000 / args.steps
    for dtype in ("f32", "f16"):
        ms = statistics.median(times[dtype]) * 1000 / args.steps
        print(f"BENCH torch_transformer dtype={dtype} ratio={statistics.median(ratios[dtype]):.4f} "
              f"untraced_ms_per_step={base_ms:.3f} traced_ms_per_step={ms:.3f} "
              f"bytes_per_example_step={per_step[dtype][0]:.0f} steps={args.steps} "
              f"repeats={args.repeats}")


if __name__ == "__main__":
    main()
