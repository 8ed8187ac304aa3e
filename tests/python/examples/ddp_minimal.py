"""Record a DistributedDataParallel training into one run: every rank runs
this script. On two CPU processes, from the repository root:

    .venv/bin/python -m torch.distributed.run --nproc_per_node 2 --standalone \
        tests/python/examples/ddp_minimal.py runs/ddp
"""
import gzip
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import reptrace

run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/ddp"
dist.init_process_group("gloo")  # "nccl" on GPUs
with gzip.open("data/digits.csv.gz", "rt") as f:
    raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
x, y = torch.from_numpy(raw[:1437, :64] / 16.0), torch.from_numpy(raw[:1437, 64]).long()
ids = torch.arange(1437)  # the instance ids: rows of the data set
data = TensorDataset(ids, x, y)
sampler = DistributedSampler(data, seed=0, drop_last=True)  # each rank its share
loader = DataLoader(data, batch_size=32, sampler=sampler)  # 32 per rank and step

torch.manual_seed(0)
model = DDP(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
# Every rank: the same arguments and run directory (on a shared file system).
tracer = reptrace.Tracer(model, optimizer, run_dir, classes=[str(c) for c in range(10)])
tracer.instances(ids, y, split="train")  # written by rank 0
for epoch in range(2):
    sampler.set_epoch(epoch)
    for batch_ids, xb, yb in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()  # DDP averages the gradients of the ranks
        tracer.step(loss, batch_ids, yb)  # records this rank's examples, then steps
    tracer.end_epoch()  # a collective commit: every rank's files, one manifest
tracer.finish()
if dist.get_rank() == 0:
    run = reptrace.open(run_dir)
    # Each record carries the rank that computed it; otherwise one run like any other.
    print(run.sql("SELECT rank, count(*) AS records FROM updates GROUP BY rank ORDER BY rank")
          .to_pandas())
dist.destroy_process_group()
