"""The PyTorch tracer on a GPU: traced / untraced time and a reconstruction
check, in one short run (scripts/gpu-check.sh runs it on CUDA).

    python scripts/bench/torch_cuda.py [--device cuda|cpu] [--steps N] [--repeats R]

Two models, each trained untraced, traced with f32 factors and traced with
f16 factors, side by side in every repeat (the figures are medians of the
per-repeat ratios; a traced run's time includes ``finish()``, and every
time ends with a device synchronisation):

- ``mlp3072``: MLP 3072-1024-10, batch 256, plain SGD, random inputs;
- ``cnn``: the test suite's residual CNN (``tests/python/kit.py``,
  ``ResCNN``: conv stem, a residual block of two convs, a linear head) on
  8×8 inputs, batch 64, SGD with momentum.

The device synchronisations of a traced step: PyTorch's sync debug mode
(``torch.cuda.set_sync_debug_mode("warn")``) warns at each operation that
waits for the device; counted over ``tracer.step`` in steady-state steps
(the tracer's goal: one per step, the gradient check's single transfer;
the untraced loop itself has none). Labels are given from the host, as
docs/python.md advises.

After the repeats, one traced f32 run of each model, whose loop copies
each batch into one input tensor and its ids into one ids tensor (reused
from step to step while the tracer holds a step's records until the next),
is rebuilt from its records (``kit.assert_reconstructs``: every traced
parameter within 1e-5 of how far training moved it, plus float32's
rounding floor) and its records' ids are checked; a failure exits with
status 1. ``--device cpu`` runs the same on the CPU (a dry run).

Prints a table and one line per model and dtype:
``BENCH torch_cuda model=M dtype=D device=DEV ratio=R untraced_ms_per_step=U traced_ms_per_step=T steps=S repeats=N``,
and per model ``BENCH torch_cuda_syncs model=M device=DEV syncs_per_step=K``.
"""
from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))

import reptrace  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from kit import ResCNN, assert_reconstructs, start_weights, table  # noqa: E402

CLASSES = [str(c) for c in range(10)]


def mlp3072() -> nn.Module:
    return nn.Sequential(nn.Linear(3072, 1024), nn.ReLU(), nn.Linear(1024, 10))


# name → (model, features per input, batch, SGD options)
MODELS = {
    "mlp3072": (mlp3072, 3072, 256, {"lr": 0.05}),
    "cnn": (ResCNN, 64, 64, {"lr": 0.05, "momentum": 0.9}),
}


def data(features: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in [0, 1] around a fixed prototype per class, and the classes."""
    g = torch.Generator().manual_seed(7)
    protos = torch.rand(10, features, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (protos[y] + 0.3 * (torch.rand(n, features, generator=g) - 0.5)).clamp(0, 1)
    return x.to(device), y.to(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(name, x, y, steps, dtype, run_dir, device, syncs=None, reuse=False):
    """(seconds, model, initial state) of `steps` steps; traced when `dtype`
    (`f32`, `f16`, or either with `_none`: recorded without compression).
    With a list `syncs` (CUDA), the device synchronisations inside each
    ``tracer.step`` after the first three are appended to it. `reuse`: each
    batch is copied into one input tensor on the device and its ids into
    one ids tensor on the host, overwritten in place at the next step
    while the tracer still holds the step's records."""
    make, _, batch, sgd = MODELS[name]
    torch.manual_seed(0)
    model = make().to(device)
    initial = start_weights(model)
    opt = torch.optim.SGD(model.parameters(), **sgd)
    tracer = None
    if dtype is not None:
        kind, _, compression = dtype.partition("_")
        tracer = reptrace.Tracer(model, opt, run_dir, classes=CLASSES, dtype=kind,
                                 compression=compression or "zstd")
    batches = x.shape[0] // batch
    y_host = y.cpu()
    inputs = torch.empty((batch, *x.shape[1:]), device=device)
    ids = torch.empty(batch, dtype=torch.int64)
    sync(device)
    start = time.perf_counter()
    for step in range(steps):
        i = (step % batches) * batch
        xb, yb, step_ids = x[i:i + batch], y[i:i + batch], torch.arange(i, i + batch)
        if reuse:
            xb, step_ids = inputs.copy_(xb), ids.copy_(step_ids)
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        if tracer is None:
            opt.step()
        elif syncs is not None and step >= 3 and device.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    tracer.step(loss, step_ids, y_host[i:i + batch])
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        else:
            tracer.step(loss, step_ids, y_host[i:i + batch])
    if tracer is not None:
        tracer.finish()
    sync(device)
    return time.perf_counter() - start, model, initial


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("torch_cuda: this torch sees no CUDA device", file=sys.stderr)
        return 1
    print(f"extension: {reptrace._reptrace.__file__}; torch {torch.__version__} on {device}",
          file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="reptrace-torch-cuda-"))
    failed = False
    try:
        print(f"{'model':<9}{'dtype':<10}{'untraced ms/step':>18}{'traced ms/step':>16}{'ratio':>8}")
        for name, (_, features, batch, _) in MODELS.items():
            x, y = data(features, 64 * batch, device)
            train(name, x, y, 20, "f32", tmp / f"{name}-warm-up", device)
            variants = ("f32", "f16", "f32_none", "f16_none")
            ratios = {v: [] for v in variants}
            plain_ms, traced_ms = [], {v: [] for v in variants}
            for r in range(args.repeats):
                base, _, _ = train(name, x, y, args.steps, None, None, device)
                plain_ms.append(base / args.steps * 1e3)
                for dtype in ratios:
                    run = tmp / f"{name}-{dtype}-{r}"
                    secs, _, _ = train(name, x, y, args.steps, dtype, run, device)
                    ratios[dtype].append(secs / base)
                    traced_ms[dtype].append(secs / args.steps * 1e3)
                    shutil.rmtree(run)
            for dtype in ratios:
                ratio = statistics.median(ratios[dtype])
                u, t = statistics.median(plain_ms), statistics.median(traced_ms[dtype])
                print(f"{name:<9}{dtype:<10}{u:>18.3f}{t:>16.3f}{ratio:>8.2f}")
                print(f"BENCH torch_cuda model={name} dtype={dtype} device={device.type} "
                      f"ratio={ratio:.4f} untraced_ms_per_step={u:.4f} traced_ms_per_step={t:.4f} "
                      f"steps={args.steps} repeats={args.repeats}", flush=True)
            counts: list[int] = []
            train(name, x, y, 10, "f32", tmp / f"{name}-syncs", device, syncs=counts)
            per_step = statistics.median(counts) if counts else 0
            print(f"syncs {name}: {counts} per traced step (median {per_step})")
            print(f"BENCH torch_cuda_syncs model={name} device={device.type} "
                  f"syncs_per_step={per_step}", flush=True)
            # The records rebuild the final weights (on the host), with the
            # loop's input and ids buffers reused from step to step, and hold
            # each step's ids.
            run = tmp / f"{name}-check"
            steps = min(args.steps, 100)
            _, model, initial = train(name, x, y, steps, "f32", run, device, reuse=True)
            try:
                worst = assert_reconstructs(str(run), model.cpu(),
                                            {k: v.cpu() for k, v in initial.items()})
                updates = table(str(run), "updates")
                first = updates.filter(pc.equal(updates["layer"], updates["layer"][0]))
                for step in range(steps):
                    i = (step % (x.shape[0] // batch)) * batch
                    got = first.filter(pc.equal(first["step"], step))["instance_id"].to_pylist()
                    assert got == list(range(i, i + batch)), f"step {step}: ids {got[:4]}…"
                print(f"reconstruction {name}: pass, worst {worst:.2e}", flush=True)
            except AssertionError as e:
                failed = True
                print(f"reconstruction {name}: FAIL: {e}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
