"""Two builds of the Python package side by side: the traced step's time.

    python scripts/bench/step_ab.py BEFORE AFTER [--steps N] [--pairs P] [--threads T]

BEFORE and AFTER are directories to put on ``PYTHONPATH`` (each holding a
``reptrace`` package with its extension, e.g. ``git archive REV
python/reptrace | tar -x -C /tmp/before`` plus a built ``_reptrace*.so``).
Each pair runs one process per build, alternating, so that both see the
same machine state; each process trains row 6's MLP (784-256-10, batch 64,
plain SGD, ``torch_overhead.py``'s data) untraced and then traced (f32,
zstd, ``torch_threads=None``) at T torch threads (default 1), after a
traced warm-up, and reports the loop's and ``tracer.step``'s (or the
optimizer step's) milliseconds per step. Prints the medians over the pairs
and, for scripts:
``STEP_AB build=before|after untraced_ms=U traced_ms=T ratio=R step_ms=S pairs=P``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(steps: int, threads: int) -> None:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import reptrace
    from torch_overhead import BATCH, MODELS, synthetic

    torch.set_num_threads(threads)
    x, y = synthetic(64000)
    batches = x.shape[0] // BATCH

    def run(traced: bool, n: int) -> tuple[float, float]:
        torch.manual_seed(0)
        model = MODELS["mlp"]()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        tmp = tempfile.mkdtemp(prefix="reptrace-step-ab-")
        tracer = reptrace.Tracer(model, opt, f"{tmp}/run", classes=[str(c) for c in range(10)],
                                 torch_threads=None) if traced else None
        in_step = 0.0
        start = time.perf_counter()
        for k in range(n):
            i = (k % batches) * BATCH
            xb, yb = x[i:i + BATCH], y[i:i + BATCH]
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            t = time.perf_counter()
            if tracer is None:
                opt.step()
            else:
                tracer.step(loss, torch.arange(i, i + BATCH), yb)
            in_step += time.perf_counter() - t
        loop = time.perf_counter() - start
        if tracer is not None:
            tracer.finish()
        shutil.rmtree(tmp, ignore_errors=True)
        return loop / n * 1e3, in_step / n * 1e3

    run(True, 100)
    untraced, _ = run(False, steps)
    traced, step = run(True, steps)
    print(f"RESULT {untraced} {traced} {step}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before", nargs="?")
    ap.add_argument("after", nargs="?")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.steps, args.threads)
        return
    if not args.before or not args.after:
        ap.error("give the BEFORE and AFTER directories")
    builds = {"before": args.before, "after": args.after}
    results: dict[str, list[list[float]]] = {k: [] for k in builds}
    for _ in range(args.pairs):
        for name, path in builds.items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--steps", str(args.steps),
                 "--threads", str(args.threads)],
                env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True,
                check=True).stdout
            line = next(x for x in out.splitlines() if x.startswith("RESULT "))
            results[name].append([float(v) for v in line.split()[1:]])
    print(f"MLP 784-256-10, batch 64, {args.steps} steps, {args.threads} torch thread(s), "
          f"medians of {args.pairs} alternating pairs; ms per step")
    print(f"{'build':<8}{'untraced':>10}{'traced':>10}{'ratio':>8}{'tracer.step':>13}")
    for name, rows in results.items():
        untraced, traced, step = (statistics.median(r[i] for r in rows) for i in range(3))
        ratio = statistics.median(r[1] / r[0] for r in rows)
        print(f"{name:<8}{untraced:>10.3f}{traced:>10.3f}{ratio:>8.2f}{step:>13.3f}")
        print(f"STEP_AB build={name} untraced_ms={untraced:.4f} traced_ms={traced:.4f} "
              f"ratio={ratio:.4f} step_ms={step:.4f} pairs={args.pairs}")


if __name__ == "__main__":
    main()
