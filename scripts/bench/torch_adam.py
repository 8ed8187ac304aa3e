"""Instance mode under Adam beside SGD: recording overhead and storage.

    python scripts/bench/torch_adam.py [--steps N] [--repeats R]

MLP 784-256-10, batch 64, on the MNIST-shaped synthetic data of
torch_overhead.py, both layers traced with ``reptrace.Tracer`` in instance
mode (f32). Each repeat trains, side by side so that all see the same machine
state: SGD (lr 0.05) untraced and traced, Adam (lr 1e-3) untraced and
traced. Ratios are traced over the untraced run of the same optimizer and
repeat; the table gives medians.

Storage is read from the Parquet footers of the last repeat's traced runs
(compressed column chunks, so what the files hold on disk): per traced
layer and step, the records (``updates`` u and v) and Adam's preconditioner
(``layer_steps.preconditioner``, docs/format.md).

Prints a table and one line per optimizer for scripts/bench.sh:
``BENCH torch_adam optimizer=O ratio=R untraced_ms_per_step=M traced_ms_per_step=T steps=S repeats=N``
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import reptrace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_overhead import OPTIMIZERS, synthetic  # noqa: E402
from torch_overhead import train as train_once  # noqa: E402


def train(x, y, steps: int, optimizer: str, run_dir: Path | None) -> float:
    """Seconds for `steps` steps of `optimizer` (and finish() when traced,
    `run_dir` given), f32."""
    return train_once(x, y, steps, run_dir is not None, "f32", run_dir, optimizer=optimizer)


def column_bytes(files: list[Path], columns: set[str]) -> int:
    """Compressed bytes of `columns` (list leaves included) in `files`."""
    total = 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                if col.path_in_schema.split(".")[0] in columns:
                    total += col.total_compressed_size
    return total


def storage(run: Path, steps: int) -> list[tuple[str, float, float]]:
    """(layer, record bytes per step, preconditioner bytes per step) per layer."""
    out = []
    for layer_dir in sorted((run / "updates").glob("layer=*")):
        layer = layer_dir.name.split("=", 1)[1]
        records = column_bytes(sorted(layer_dir.glob("*.parquet")), {"u", "v"})
        d = 0
        for f in sorted((run / "layer_steps").glob("*.parquet")):
            t = pq.read_table(f, columns=["layer"])
            if layer not in set(t.column("layer").to_pylist()):
                continue
            # layer_steps holds every layer's rows: split a file's bytes by
            # the lengths of the layer's preconditioner lists.
            full = pq.read_table(f, columns=["layer", "preconditioner"])
            lens = [(lay, len(v) if v is not None else 0) for lay, v in zip(
                full.column("layer").to_pylist(), full.column("preconditioner").to_pylist())]
            mine = sum(n for lay, n in lens if lay == layer)
            every = sum(n for _, n in lens) or 1
            d += column_bytes([f], {"preconditioner"}) * mine / every
        out.append((layer, records / steps, d / steps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"extension: {reptrace._reptrace.__file__}", file=sys.stderr)
    x, y = synthetic(64 * 100)
    tmp = Path(tempfile.mkdtemp(prefix="reptrace-adam-bench-"))
    try:
        train(x, y, 30, "adam", tmp / "warm-up")
        ratios = {o: [] for o in OPTIMIZERS}
        base_ms = {o: [] for o in OPTIMIZERS}
        traced_ms = {o: [] for o in OPTIMIZERS}
        for r in range(args.repeats):
            line = []
            for o in OPTIMIZERS:
                base = train(x, y, args.steps, o, None)
                run = tmp / f"{o}-{r}"
                shutil.rmtree(run, ignore_errors=True)
                secs = train(x, y, args.steps, o, run)
                ratios[o].append(secs / base)
                base_ms[o].append(base / args.steps * 1e3)
                traced_ms[o].append(secs / args.steps * 1e3)
                line.append(f"{o} {base:.2f} s / {secs:.2f} s ({secs / base:.2f})")
            print(f"repeat {r + 1}: " + ", ".join(line), file=sys.stderr)
        print(f"\nPyTorch MLP 784-256-10, batch 64, {args.steps} steps, f32, median of {args.repeats}")
        print(f"{'optimizer':<10}{'traced/untraced':>17}{'traced ms/step':>16}{'untraced ms/step':>18}")
        for o in OPTIMIZERS:
            print(f"{o:<10}{statistics.median(ratios[o]):>17.2f}"
                  f"{statistics.median(traced_ms[o]):>16.2f}{statistics.median(base_ms[o]):>18.2f}")
        print(f"\nbytes on disk per step (last repeat, zstd): layer, records, preconditioner")
        for o in OPTIMIZERS:
            for layer, rec, d in storage(tmp / f"{o}-{args.repeats - 1}", args.steps):
                print(f"{o:<10}{layer:<8}{rec:>12,.0f}{d:>16,.0f}")
        for o in OPTIMIZERS:
            print(f"BENCH torch_adam optimizer={o} ratio={statistics.median(ratios[o]):.4f} "
                  f"untraced_ms_per_step={statistics.median(base_ms[o]):.4f} "
                  f"traced_ms_per_step={statistics.median(traced_ms[o]):.4f} "
                  f"steps={args.steps} repeats={args.repeats}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
