"""Recording overhead of the Python package: PyTorch training traced / untraced.

    python scripts/bench/torch_overhead.py [--steps N] [--repeats R] [--model mlp|cnn]
    python scripts/bench/torch_overhead.py --once traced|untraced --steps N

MLP 784-256-10, batch 64, plain SGD (lr 0.05), on MNIST-shaped synthetic data
(a fixed random prototype per class plus noise), both layers traced with
``reptrace.Tracer`` in instance mode. Each repeat trains untraced, traced
with f32 and with f16 factors, each with the storage encoding (zstd) and
without compression (``compression="none"``), with PyTorch's default number
of threads (which the tracer lowers by one on the CPU when it is one per
core and compresses: ``Tracer(torch_threads="auto")``), the same with the
threads kept (``torch_threads=None``, f32 zstd), and untraced and traced
(f32, both compressions) with one thread fewer than cores set by the
program (``torch.set_num_threads``), side by side, so that all of them see
the same machine state; the figures are medians of the per-repeat ratios
(traced over the untraced run of the same repeat and of the thread count
the program set). A traced run's time
includes ``finish()``: the trace is complete only once the recorder has
flushed its queue and committed.

Prints a table and, for scripts/bench.sh, one line per traced variant:
``BENCH torch_overhead dtype=f32 ratio=R untraced_ms_per_step=M traced_ms_per_step=T threads=K steps=S repeats=N``
(``dtype`` f32, f16, f32_none, f16_none, f32_kept, ``f32_threadsK`` and
``f32_none_threadsK``; ``model=cnn`` with ``--model cnn``: conv 1→8 3×3,
conv 8→16 3×3 stride 2, linear 2304→10, the test CNN of
scripts/bench/profile_torch.py).

``--once`` trains one run and exits (scripts/bench.sh measures its peak RSS
at 1x and 10x the number of steps). The ``reptrace`` package is imported
from ``PYTHONPATH`` when set (scripts/bench.sh points it at the release
build); the line ``extension: PATH`` says which build ran.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import reptrace

BATCH = 64


def synthetic(n: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(10, 784, generator=g) < 0.2).float()
    labels = torch.randint(0, 10, (n,), generator=g)
    noise = 0.3 * (torch.rand(n, 784, generator=g) - 0.5)
    return (protos[labels] + noise).clamp(0, 1), labels


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}


MODELS = {
    "mlp": lambda: nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)),
    "cnn": lambda: nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 8, 3), nn.ReLU(),
                                 nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(16 * 12 * 12, 10)),
}


def train(x, y, steps: int, traced: bool, dtype: str, run_dir: Path, check: bool = True,
          optimizer: str = "sgd", compression: str = "zstd", model: str = "mlp",
          torch_threads: str | None = "auto") -> float:
    """Seconds for `steps` training steps (and finish() when traced); `check`
    False turns the tracer's per-step gradient check off (scripts/bench/check.py);
    `optimizer` is a key of OPTIMIZERS (scripts/bench/torch_adam.py);
    `torch_threads` is the Tracer's (None: PyTorch's threads left as they are)."""
    torch.manual_seed(0)
    model = MODELS[model]()
    opt = OPTIMIZERS[optimizer](model.parameters())
    tracer = None
    start = time.perf_counter()
    if traced:
        tracer = reptrace.Tracer(model, opt, run_dir, classes=[str(c) for c in range(10)],
                                 dtype=dtype, compression=compression,
                                 torch_threads=torch_threads)
        tracer._check = check
    n = x.shape[0]
    batches = n // BATCH
    for step in range(steps):
        i = (step % batches) * BATCH
        xb, yb = x[i:i + BATCH], y[i:i + BATCH]
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        if tracer is None:
            opt.step()
        else:
            tracer.step(loss, torch.arange(i, i + BATCH), yb)
            if (step + 1) % batches == 0:
                tracer.end_epoch()
    if tracer is not None:
        tracer.finish()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=64000, help="training rows (one epoch = rows / 64 steps)")
    ap.add_argument("--once", choices=["traced", "untraced"])
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's)")
    ap.add_argument("--model", choices=sorted(MODELS), default="mlp")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"extension: {reptrace._reptrace.__file__}", file=sys.stderr)
    x, y = synthetic(args.rows)
    tmp = Path(tempfile.mkdtemp(prefix="reptrace-torch-bench-"))
    try:
        if args.once:
            secs = train(x, y, args.steps, args.once == "traced", "f32", tmp / "run")
            print(f"{args.once}: {args.steps} steps in {secs:.2f} s", file=sys.stderr)
            return
        m = args.model
        train(x, y, 50, True, "f32", tmp / "warm-up", model=m)  # imports, allocator, page cache
        default_threads = torch.get_num_threads()
        fewer = max(1, (os.cpu_count() or 1) - 1)
        # (name, dtype, torch threads, compression, Tracer's torch_threads):
        # PyTorch's default thread count (which the tracer lowers by one on
        # the CPU when it is one per core; "kept": left as it is), and one
        # thread fewer than cores set by the program.
        variants = [("f32", "f32", default_threads, "zstd", "auto"),
                    ("f16", "f16", default_threads, "zstd", "auto"),
                    ("f32_none", "f32", default_threads, "none", "auto"),
                    ("f16_none", "f16", default_threads, "none", "auto"),
                    ("f32_kept", "f32", default_threads, "zstd", None),
                    (f"f32_threads{fewer}", "f32", fewer, "zstd", "auto"),
                    (f"f32_none_threads{fewer}", "f32", fewer, "none", "auto")]
        ratios = {name: [] for name, *_ in variants}
        base_ms = {default_threads: [], fewer: []}
        traced_ms = {name: [] for name in ratios}
        for r in range(args.repeats):
            base = {}
            for threads in base_ms:
                torch.set_num_threads(threads)
                base[threads] = train(x, y, args.steps, False, "f32", tmp / "none", model=m)
                base_ms[threads].append(base[threads] / args.steps * 1e3)
            line = [f"repeat {r + 1}: untraced " + ", ".join(
                f"{t} threads {b:.2f} s" for t, b in base.items())]
            for name, dtype, threads, compression, lower in variants:
                torch.set_num_threads(threads)
                run = tmp / f"{name}-{r}"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # the threads lowered
                    secs = train(x, y, args.steps, True, dtype, run, compression=compression,
                                 model=m, torch_threads=lower)
                ratios[name].append(secs / base[threads])
                traced_ms[name].append(secs / args.steps * 1e3)
                line.append(f"{name} {secs:.2f} s ({secs / base[threads]:.2f})")
                shutil.rmtree(run)
            print(", ".join(line), file=sys.stderr)
        torch.set_num_threads(default_threads)
        print(f"\nPyTorch {m.upper()}, batch 64, {args.steps} steps, median of {args.repeats}; "
              f"{os.cpu_count()} cores, PyTorch's default {default_threads} threads")
        print(f"{'variant':<22}{'threads':>8}{'traced/untraced':>17}{'traced ms/step':>16}{'untraced ms/step':>18}")
        for name, dtype, threads, *_ in variants:
            print(f"{name:<22}{threads:>8}{statistics.median(ratios[name]):>17.2f}"
                  f"{statistics.median(traced_ms[name]):>16.2f}{statistics.median(base_ms[threads]):>18.2f}")
        for name, dtype, threads, *_ in variants:
            print(f"BENCH torch_overhead model={m} dtype={name} ratio={statistics.median(ratios[name]):.4f} "
                  f"untraced_ms_per_step={statistics.median(base_ms[threads]):.4f} "
                  f"traced_ms_per_step={statistics.median(traced_ms[name]):.4f} threads={threads} "
                  f"steps={args.steps} repeats={args.repeats}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
