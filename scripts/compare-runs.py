"""Compares two runs bit for bit, file by file: every Parquet file's decoded
content (the Arrow IPC bytes of the whole table) and every weights
snapshot's tensors (dtype, shape, bytes). What differs by design is ignored:
manifest.json, and run ids and timestamps in file metadata.

    .venv/bin/python scripts/compare-runs.py OLD_RUN NEW_RUN

Used to check that a change to the recording path leaves the traces of the
built-in models unchanged (same seed, same settings). Exit status 1 when a
file differs or is missing. A newer format may add columns to a table (they
are listed, and the old columns compared) and files the old run lacks (listed
as new): what the old run recorded must be there, bit for bit.
"""
import json
import pathlib
import struct
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def table_bytes(path: pathlib.Path, columns=None) -> bytes:
    table = pq.read_table(path, columns=columns).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def tensors(path: pathlib.Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    body = data[8 + n :]
    return {
        name: (t["dtype"], t["shape"], body[t["data_offsets"][0] : t["data_offsets"][1]])
        for name, t in header.items()
    }


def main(old: pathlib.Path, new: pathlib.Path) -> int:
    compared, differ = 0, 0
    for f in sorted(p for p in old.rglob("*") if p.is_file() and p.name != "manifest.json"):
        rel = f.relative_to(old)
        g = new / rel
        if f.suffix not in (".parquet", ".safetensors"):
            continue
        compared += 1
        if not g.is_file():
            print(f"missing {rel}")
            differ += 1
        elif f.suffix == ".parquet":
            old_cols = pq.read_schema(f).names
            added = [c for c in pq.read_schema(g).names if c not in old_cols]
            if added:
                print(f"new columns in {rel}: {', '.join(added)}")
            if table_bytes(f) != table_bytes(g, columns=old_cols):
                print(f"differs {rel}")
                differ += 1
        elif f.suffix == ".safetensors" and tensors(f) != tensors(g):
            print(f"differs {rel}")
            differ += 1
    for g in sorted(p for p in new.rglob("*") if p.is_file() and p.suffix in (".parquet", ".safetensors")):
        if not (old / g.relative_to(new)).is_file():
            print(f"new file {g.relative_to(new)}")
    print(f"{compared} files compared, {differ} differ")
    return 1 if differ or compared == 0 else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])))
