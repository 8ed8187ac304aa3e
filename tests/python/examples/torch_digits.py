"""Train a small PyTorch CNN on the bundled digits with reptrace recording,
then ask three questions of the run. Run from the repository root:

    .venv/bin/python tests/python/examples/torch_digits.py runs/torch-digits
"""
import gzip
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import reptrace

run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/torch-digits"

# The bundled digits: 8×8 images, 10 classes; rows 0..1436 train, the rest test.
with gzip.open("data/digits.csv.gz", "rt") as f:
    raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
x = torch.from_numpy(raw[:, :64] / 16.0).reshape(-1, 1, 8, 8)
y = torch.from_numpy(raw[:, 64].astype(np.int64))
x_train, y_train, x_test, y_test = x[:1437], y[:1437], x[1437:], y[1437:]


class Net(nn.Module):
    """Any nn.Module: here a convolution, a nested residual block and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = nn.ModuleDict({"conv": nn.Conv2d(8, 8, 3, padding=1)})
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.block["conv"](h))  # a skip connection
        return self.head(F.max_pool2d(h, 2).flatten(1))


torch.manual_seed(0)
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)

# Record every layer of a traced kind (here its Conv2d and Linear ones; or name them:
# layers=["block.conv", "head"]). Instance ids are the data set's row numbers.
tracer = reptrace.Tracer(
    model, optimizer, run_dir, classes=[str(c) for c in range(10)], scheduler=scheduler
)
tracer.instances(np.arange(1437), y_train.numpy(), split="train")
for epoch in range(4):
    for ids in torch.randperm(1437).split(64):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x_train[ids]), y_train[ids])
        loss.backward()
        tracer.step(loss, ids, y_train[ids])  # records, then optimizer.step()
    scheduler.step()
    tracer.end_epoch()  # a weights snapshot and a commit
# The test images become probes: what each traced layer saw, and how far
# training moved its output (ids 1437..1796, the data set's rows).
tracer.finish(probes=(x_test, y_test, np.arange(1437, 1797)))

run = reptrace.open(run_dir)
probe = 1437
# 1. Which training images shaped this test image's representation most?
print(run.query("top_proponents", probe=probe, k=3).to_pandas())
# 2. Which classes was it built from, per layer?
print(run.query("class_shares", probe=probe).to_pandas())
# 3. How did the head's class shares change over the epochs?
by_epoch = run.sql(
    f"SELECT epoch, label, SUM(dot) AS dot FROM contributions "
    f"WHERE probe_id = {probe} AND layer = 'head' AND step IS NOT NULL "
    "GROUP BY epoch, label ORDER BY epoch, dot DESC"
).to_pandas()
print(by_epoch.groupby("epoch").head(2))
