"""Cost of the per-step gradient check of the Python tracer (row 10).

    python scripts/bench/check.py [--steps N] [--repeats R] [--threads K]

MLP 784-256-10, batch 64, SGD (lr 0.05), MNIST-shaped synthetic data, the
training loop of scripts/bench/torch_overhead.py, both layers traced in
instance mode. Each repeat trains untraced, traced with the check and traced
without it (the tracer's private switch, which only this benchmark turns
off), side by side, in alternating order; the figure is the median over
repeats of traced-with-check / traced-without. A traced run's time includes
``finish()``.

Prints a table and one line for scripts/bench/summary.py:
``BENCH check ratio=R with_ms_per_step=A without_ms_per_step=B untraced_ms_per_step=U steps=S repeats=N threads=K``
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_overhead as overhead  # noqa: E402
from torch_overhead import synthetic  # noqa: E402


def train(x, y, steps: int, mode: str, run_dir: Path) -> float:
    """Seconds for `steps` steps: mode 'untraced', 'check' or 'nocheck'."""
    return overhead.train(x, y, steps, mode != "untraced", "f32", run_dir, check=mode == "check")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = synthetic(64000)
    tmp = Path(tempfile.mkdtemp(prefix="reptrace-check-bench-"))
    try:
        train(x, y, 50, "check", tmp / "warm-up")
        times = {"untraced": [], "check": [], "nocheck": []}
        ratios = []
        for r in range(args.repeats):
            order = ["check", "nocheck"] if r % 2 == 0 else ["nocheck", "check"]
            got = {}
            for mode in ["untraced"] + order:
                run = tmp / f"{mode}-{r}"
                got[mode] = train(x, y, args.steps, mode, run)
                shutil.rmtree(run, ignore_errors=True)
                times[mode].append(got[mode] / args.steps * 1e3)
            ratios.append(got["check"] / got["nocheck"])
            print(f"repeat {r + 1}: untraced {got['untraced']:.2f} s, with check "
                  f"{got['check']:.2f} s, without {got['nocheck']:.2f} s, "
                  f"ratio {ratios[-1]:.3f}", file=sys.stderr)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = statistics.median(ratios)
        print(f"| untraced | traced, check | traced, no check | check/no check |")
        print(f"|---|---|---|---|")
        print(f"| {med['untraced']:.3f} ms/step | {med['check']:.3f} ms/step | "
              f"{med['nocheck']:.3f} ms/step | {ratio:.3f} |")
        print(f"BENCH check ratio={ratio:.4f} with_ms_per_step={med['check']:.4f} "
              f"without_ms_per_step={med['nocheck']:.4f} untraced_ms_per_step={med['untraced']:.4f} "
              f"steps={args.steps} repeats={args.repeats} threads={torch.get_num_threads()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
