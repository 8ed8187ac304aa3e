"""Train a small transformer classifier on padded token sequences with
reptrace recording every layer (embeddings, layer norms, the q/k/v/o and MLP
projections over the sequence, the head), then ask which training sequences
shaped a new sequence's representation. Run from the repository root:

    .venv/bin/python tests/python/examples/torch_transformer.py runs/transformer
"""
import math
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import reptrace

run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/transformer"
VOCAB, LENGTH, WIDTH, PAD = 40, 8, 16, 0

# A synthetic task: the class of a sequence is the count of its tokens below
# 20, mod 3. Sequences of 3, 5 or 8 tokens, padded with PAD.
g = torch.Generator().manual_seed(0)
x = torch.randint(1, VOCAB, (240, LENGTH), generator=g)
lengths = torch.tensor([3, 5, 8])[torch.randint(0, 3, (240,), generator=g)]
x[torch.arange(LENGTH) >= lengths[:, None]] = PAD
y = (((x > 0) & (x < VOCAB // 2)).sum(1) % 3).long()
x_train, y_train, x_new, y_new = x[:200], y[:200], x[200:], y[200:]


class Block(nn.Module):
    """Pre-norm attention from nn.Linear projections, then a GELU MLP."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h, mask):
        b, t, d = h.shape
        split = lambda z: z.view(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        a = self.ln1(h)
        q, k, v = split(self.q(a)), split(self.k(a)), split(self.v(a))
        s = (q @ k.transpose(-1, -2) / math.sqrt(d // self.heads))
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        h = h + self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
        return h + self.down(F.gelu(self.up(self.ln2(h))))


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH, padding_idx=PAD)
        self.pos = nn.Embedding(LENGTH, WIDTH)
        self.blocks = nn.ModuleList([Block(WIDTH), Block(WIDTH)])
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, ids):
        mask = ids != PAD
        # Position ids per example, (batch, T): a (1, T) tensor shared by the
        # batch has no per-example update and is refused.
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        h = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            h = block(h, mask)
        m = mask.unsqueeze(-1).float()
        return self.head((self.norm(h) * m).sum(1) / m.sum(1))  # masked mean pooling


torch.manual_seed(0)
model = Classifier()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
tracer = reptrace.Tracer(model, optimizer, run_dir, classes=["0", "1", "2"])
tracer.instances(np.arange(200), y_train.numpy(), split="train")
for epoch in range(3):
    for ids in torch.randperm(200).split(16):
        # Each batch padded to its own longest sequence: the records keep
        # each example's real tokens only (the padding gets no gradient).
        batch = x_train[ids, :int(lengths[ids].max())]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batch), y_train[ids])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # measured and recorded
        tracer.step(loss, ids, y_train[ids])
    tracer.end_epoch()
# New sequences become probes (ids 200..239): what each layer saw at each of
# their real tokens (the mask leaves the padding out), and how far training
# moved its output there.
tracer.add_probes(x_new, y_new, np.arange(200, 240), mask=x_new != PAD)
tracer.finish()

run = reptrace.open(run_dir)
# 1. Which training sequences shaped sequence 200 most, at the token
#    embedding and at the last block's output projection?
top = run.query("top_proponents", probe=200, k=3).to_pandas()
print(top[top.layer.isin(["tok", "blocks.1.o"])])
# 2. Which classes was its representation built from, per layer?
print(run.query("class_shares", probe=200).to_pandas().head(9))
# 3. What does each layer store, and how many bytes per example and step?
for name, s in run.info()["storage"].items():
    print(f"{name:<12} {s['kind']:<10} {s['storage']:<8} {s['bytes_per_record']:.0f} B/record")
