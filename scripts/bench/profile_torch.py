"""Where the PyTorch tracer's time goes: a traced step of the row-6 model
split into its parts, beside the untraced step.

    python scripts/bench/profile_torch.py [--steps N] [--threads T ...] [--model mlp|cnn]

The model and data are row 6's (``torch_overhead.py``: MLP 784-256-10,
batch 64, plain SGD, synthetic MNIST-shaped data) or a small CNN
(conv 1→8 3×3, conv 8→16 3×3 stride 2, linear 16·13·13→10 on 28×28
inputs). Each thread count trains untraced, then traced (f32), timing the
loop's parts with ``time.perf_counter`` around the forward pass, the
backward pass, the optimizer step (untraced) or ``tracer.step`` (traced),
and inside ``tracer.step`` around the tracer's own methods and every call
into the Rust recorder (a timing proxy in front of ``tracer._rec``). The
times are inclusive: a method's row contains the rows listed under it.
The recorder's writer thread (Arrow building, Parquet encoding,
compression, I/O) runs beside the loop; it shows here as the time the
calls into Rust spend handing rows over (a full queue blocks them) and in
``finish()``.

Prints a table of milliseconds per step and, for scripts, one line per part:
``PROFILE torch model=M threads=T part=NAME ms_per_step=X``.
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reptrace  # noqa: E402
from reptrace import _torch  # noqa: E402
from torch_overhead import BATCH, synthetic  # noqa: E402

# The tracer's methods timed inside tracer.step, in the order of the table
# (indented: called by the row above).
PARTS = [
    ("_passes", 1, "group the captured calls into passes, check the inputs"),
    ("_examples", 1, "examples' loss and prediction (log-softmax)"),
    ("_record_instance", 1, "record the step"),
    ("_hyper", 2, "read the parameter group"),
    ("_raw_factors", 2, "collect u and δ per layer"),
    ("_check_terms", 2, "gradient check: products (CPU: Rust)"),
    ("check_verdicts", 2, "gradient check: verdicts on the host (Rust)"),
    ("_factors", 2, "records (factors or full) on the device"),
    ("_flush_pending", 2, "hand the records to Rust (GPU: the previous step's)"),
    ("_to_host", 2, "copy this step's records off the device"),
    ("_optimizer_step", 2, "the optimizer's own step"),
]
RUST = ["updates", "step", "examples", "layer_steps"]


class _Timed:
    """A proxy in front of the Rust recorder timing every method call."""

    def __init__(self, inner, times):
        self._inner, self._times = inner, times

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._times[f"rust.{name}"] += time.perf_counter() - t
        return call


def _instrument(times):
    """Wraps the tracer's functions of PARTS; returns a function undoing it."""
    saved = []
    for name, _, _ in PARTS:
        # A method of the tracer, a function of its module (_to_host) or
        # of the extension (check_verdicts).
        owner = next(o for o in (_torch.Tracer, _torch, _torch._reptrace) if hasattr(o, name))
        original = getattr(owner, name)
        saved.append((owner, name, original))

        def timed(*args, _original=original, _name=name, **kwargs):
            t = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                times[_name] += time.perf_counter() - t
        functools.update_wrapper(timed, original)
        setattr(owner, name, timed)

    def undo():
        for owner, name, original in saved:
            setattr(owner, name, original)
    return undo


def cnn() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 8, 3), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 12 * 12, 10))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


COMPRESSION = "zstd"


def run(x, y, steps, make, traced, run_dir):
    """ms per step of each part of the loop (and `total`, `finish`)."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    times = defaultdict(float)
    tracer = None
    undo = lambda: None  # noqa: E731
    if traced:
        tracer = reptrace.Tracer(model, opt, run_dir, classes=[str(c) for c in range(10)],
                                 compression=COMPRESSION)
        undo = _instrument(times)
    batches = x.shape[0] // BATCH
    start = time.perf_counter()
    try:
        for step in range(steps):
            i = (step % batches) * BATCH
            xb, yb = x[i:i + BATCH], y[i:i + BATCH]
            opt.zero_grad()
            t = time.perf_counter()
            loss = F.cross_entropy(model(xb), yb)
            times["forward"] += time.perf_counter() - t
            t = time.perf_counter()
            loss.backward()
            times["backward"] += time.perf_counter() - t
            t = time.perf_counter()
            if tracer is None:
                opt.step()
                times["optimizer step"] += time.perf_counter() - t
            else:
                tracer.step(loss, torch.arange(i, i + BATCH), yb)
                if tracer._rec is not None and not isinstance(tracer._rec, _Timed):
                    tracer._rec = _Timed(tracer._rec, times)
                times["tracer.step"] += time.perf_counter() - t
        total = time.perf_counter() - start
        if tracer is not None:
            t = time.perf_counter()
            tracer.finish()
            times["finish (once, per step)"] += time.perf_counter() - t
    finally:
        undo()
    times["total"] = total
    return {k: v / steps * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    ap.add_argument("--compression", choices=["zstd", "none"], default="zstd")
    args = ap.parse_args()
    global COMPRESSION
    COMPRESSION = args.compression
    make = {"mlp": mlp, "cnn": cnn}[args.model]
    print(f"extension: {reptrace._reptrace.__file__}", file=sys.stderr)
    x, y = synthetic(64000)
    tmp = Path(tempfile.mkdtemp(prefix="reptrace-profile-"))
    try:
        run(x, y, 50, make, True, tmp / "warm-up")
        for threads in args.threads:
            torch.set_num_threads(threads)
            plain = run(x, y, args.steps, make, False, tmp / "none")
            traced = run(x, y, args.steps, make, True, tmp / f"run-{threads}")
            shutil.rmtree(tmp / f"run-{threads}")
            print(f"\n{args.model}, batch {BATCH}, {args.steps} steps, {threads} torch thread(s); "
                  "ms per step (inclusive)")
            print(f"{'part':<58}{'untraced':>10}{'traced':>10}")
            rows = [("forward (traced: with the capture hooks)", "forward", 0),
                    ("backward (traced: with the gradient hooks)", "backward", 0),
                    ("optimizer step / tracer.step", None, 0)]
            rows += [(f"{name}: {what}", name, depth) for name, depth, what in PARTS]
            rows += [(f"Rust: Recorder.{n}", f"rust.{n}", 2) for n in RUST]
            rows += [("finish(), spread over the steps", "finish (once, per step)", 0),
                     ("the whole loop", "total", 0)]
            for label, key, depth in rows:
                if key is None:
                    u, t = plain.get("optimizer step", 0.0), traced.get("tracer.step", 0.0)
                    key = "step"
                else:
                    u, t = plain.get(key, 0.0), traced.get(key, 0.0)
                text = "  " * depth + label
                print(f"{text:<58}{u:>10.3f}{t:>10.3f}")
                print(f"PROFILE torch model={args.model} threads={threads} part={key} "
                      f"untraced_ms_per_step={u:.4f} traced_ms_per_step={t:.4f}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
