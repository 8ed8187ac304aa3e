"""Shared pieces of the PyTorch recording tests: the bundled digits, two
models (an MLP, and a CNN with nested blocks and a skip connection), a small
training loop, and readers of a run's files that do not use reptrace."""
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
TRAIN_ROWS = 1437


def digits():
    """(x float32 [1797, 64] scaled to [0, 1], y int64) of the bundled digits."""
    with gzip.open(ROOT / "data" / "digits.csv.gz", "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return torch.from_numpy(raw[:, :64] / 16.0), torch.from_numpy(raw[:, 64].astype(np.int64))


class MLP(nn.Module):
    """64-32-16-10, the layers named as `reptrace train --model mlp` names them."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Block(nn.Module):
    """conv → ReLU → conv, plus the input: a residual block."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class ResCNN(nn.Module):
    """Not a Sequential: a stem, a nested residual block and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.encoder = nn.ModuleDict({"block1": Block(4)})
        self.head = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.stem(x.reshape(-1, 1, 8, 8)))
        x = self.encoder["block1"](x)
        x = F.max_pool2d(x, 2)
        return self.head(x.flatten(1))


def batches(n, batch_size, epoch, seed=0):
    """The row order of one epoch: a seeded permutation cut into batches."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def train(model, optimizer, x, y, epochs, batch_size=64, tracer=None, scheduler=None, seed=0,
          on_step=None):
    """Trains; with a tracer, `tracer.step` takes the place of optimizer.step()."""
    step = 0
    for epoch in range(epochs):
        for rows in batches(len(x), batch_size, epoch, seed):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[rows]), y[rows])
            loss.backward()
            if on_step is not None:
                on_step(step, rows)
            if tracer is not None:
                tracer.step(loss, rows, y[rows])
            else:
                optimizer.step()
            step += 1
        if scheduler is not None:
            scheduler.step()
        if tracer is not None:
            tracer.end_epoch()


def table(run, name):
    """A table of a run read by pyarrow alone (Hive partitions by layer)."""
    part = ds.partitioning(pa.schema([("layer", pa.string())]), flavor="hive")
    partitioned = name in ("updates", "probes", "contributions")
    return ds.dataset(
        str(Path(run) / name), format="parquet", partitioning=part if partitioned else None
    ).to_table()


def safetensors(path):
    """name → float32 array of a .safetensors file, read by hand."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "F32", meta
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=np.float32).reshape(
            meta["shape"]
        )
    return out


def manifest(run):
    return json.loads((Path(run) / "manifest.json").read_text())
