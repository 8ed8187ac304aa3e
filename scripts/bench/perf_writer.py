"""Where the recorder's writer thread spends its time, from a `perf record`
of the overhead bench (docs/benchmarks.md, "Where recording's time goes").

    REPTRACE_BENCH_ONLY="f32 none" REPTRACE_BENCH_ROWS=64000 REPTRACE_BENCH_REPEATS=1 \\
        perf record -F 1999 -o f32_none.data target/debug/deps/overhead-HASH --bench
    python scripts/bench/perf_writer.py --freq 1999 --steps 2000 f32_none.data ...

Each file's samples of the thread named `reptrace-writer` are put in
buckets by symbol (zstd, Parquet's list levels, byte-stream-split, the
Float16 values' per-value buffers, the rest of Parquet encoding, copies,
allocation, the kernel: page faults and writes); a sample is 1/freq s of
CPU, so a bucket's CPU time per step is samples / freq / steps (`--steps`:
the writer's steps in the profile, warm-up included: the bench's warm-up
trains the same variant once more). Prints one Markdown table, a column
per file.
"""
from __future__ import annotations

import argparse
import re
import subprocess
from collections import Counter
from pathlib import Path

BUCKETS = [
    ("zstd", re.compile(r"ZSTD_|HUF_|HIST_|FSE_")),
    ("Parquet list levels (rep/def)", re.compile(r"levels::|LevelEncoder|RleEncoder|rle::")),
    ("byte-stream-split", re.compile(r"byte_stream_split")),
    ("Float16 values: one buffer per value", re.compile(r"bytes::|promotable|shared_drop|split_to|FixedLenByteArray|chunk_array_slice|ByteArray")),
    ("other Parquet encoding", re.compile(r"parquet::")),
    ("Arrow arrays", re.compile(r"arrow_")),
    ("copies (memmove, memset)", re.compile(r"mem(move|cpy|set)")),
    ("allocation", re.compile(r"malloc|free|_int_|realloc|unlink_chunk|cfree")),
    ("kernel (page faults, writes)", re.compile(r"\[k\]")),
]


def samples(path: Path) -> Counter:
    out = subprocess.run(
        ["perf", "report", "-i", str(path), "--sort", "comm,sym", "--stdio", "-q", "-F",
         "sample,comm,sym"], capture_output=True, text=True, check=True).stdout
    buckets = Counter()
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3 or parts[1] != "reptrace-writer":
            continue
        n, sym = int(parts[0]), parts[2]
        name = next((b for b, rx in BUCKETS if rx.search(sym)), "other")
        buckets[name] += n
    return buckets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--freq", type=float, default=1999)
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    cols = [(f.stem, samples(f)) for f in args.files]
    names = [b for b, _ in BUCKETS] + ["other"]
    ms = lambda n: 1e3 * n / args.freq / args.steps  # noqa: E731
    print("| writer thread, ms of CPU per step | " + " | ".join(c for c, _ in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name in names:
        if any(b[name] for _, b in cols):
            print(f"| {name} | " + " | ".join(f"{ms(b[name]):.3f}" for _, b in cols) + " |")
    print("| **all** | " + " | ".join(f"**{ms(sum(b.values())):.3f}**" for _, b in cols) + " |")


if __name__ == "__main__":
    main()
