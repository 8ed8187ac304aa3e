"""Recording overhead under DistributedDataParallel: 2 CPU processes (gloo),
traced / untraced.

    python scripts/bench/torch_ddp.py [--steps N] [--repeats R]

Launches itself under ``torch.distributed.run --nproc_per_node 2`` once per
variant and repeat, untraced and traced alternating so that both see the
same machine state. Each rank trains an MLP 784-256-10 with plain SGD on
MNIST-shaped synthetic data (a fixed random prototype per class plus noise),
64 examples per rank and step, one thread per process, both layers traced
with ``reptrace.Tracer`` in instance mode into one run. The time is rank 0's
wall clock from the first step after a short warm-up to the end of training
(``finish()`` included for the traced run: the trace is complete only once
every rank's files are committed). The figure is the median over the repeats
of traced over untraced.

Prints a table and one line for scripts/bench.sh:
``BENCH torch_ddp ratio=R untraced_ms_per_step=M traced_ms_per_step=T world=2 steps=S repeats=N``
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 64  # per rank
WARMUP = 10


def worker(traced: bool, steps: int, run_dir: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import reptrace

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7)
    protos = (torch.rand(10, 784, generator=g) < 0.2).float()
    n = BATCH * world * 50
    labels = torch.randint(0, 10, (n,), generator=g)
    x = (protos[labels] + 0.3 * (torch.rand(n, 784, generator=g) - 0.5)).clamp(0, 1)
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracer = None
    if traced:
        tracer = reptrace.Tracer(model, opt, run_dir, classes=[str(c) for c in range(10)])
    start = None
    for t in range(WARMUP + steps):
        if t == WARMUP:
            dist.barrier()
            start = time.perf_counter()
        first = (t * world + rank) * BATCH % n
        ids = torch.arange(first, first + BATCH)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[ids]), labels[ids])
        loss.backward()
        if tracer is not None:
            tracer.step(loss, ids, labels[ids])
        else:
            opt.step()
    if tracer is not None:
        tracer.finish()
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(f"MS_PER_STEP {1000 * elapsed / steps:.4f}", flush=True)
    dist.destroy_process_group()


def launch(traced: bool, steps: int, tmp: Path, k: int) -> float:
    run = tmp / f"run-{k}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", __file__, "--worker", "traced" if traced else "untraced",
           "--steps", str(steps), "--out", str(run)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"MS_PER_STEP (\S+)", out).group(1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", choices=["traced", "untraced"])
    p.add_argument("--out")
    a = p.parse_args()
    if a.worker:
        worker(a.worker == "traced", a.steps, a.out)
        return
    import reptrace

    print(f"extension: {Path(reptrace._reptrace.__file__).resolve()}")
    plain, traced = [], []
    with tempfile.TemporaryDirectory() as d:
        for k in range(a.repeats):
            plain.append(launch(False, a.steps, Path(d), 2 * k))
            traced.append(launch(True, a.steps, Path(d), 2 * k + 1))
            print(f"repeat {k}: untraced {plain[-1]:.3f} ms/step, traced {traced[-1]:.3f} "
                  f"ms/step, ratio {traced[-1] / plain[-1]:.3f}", flush=True)
    ratio = statistics.median(t / u for t, u in zip(traced, plain))
    u, t = statistics.median(plain), statistics.median(traced)
    print(f"BENCH torch_ddp ratio={ratio:.3f} untraced_ms_per_step={u:.3f} "
          f"traced_ms_per_step={t:.3f} world=2 steps={a.steps} repeats={a.repeats}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
