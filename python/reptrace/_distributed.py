"""The :class:`Tracer` under ``torch.distributed``: the process group it
records in, and the few collectives recording needs.

In a distributed run (DistributedDataParallel, any backend) every rank
records the examples it processed into the one run directory, which the
ranks share on one file system. Rank 0 owns the run: it creates it, writes
the tables of the whole run (``steps``, ``layer_steps``, ``instances``,
probes, weights) and the manifest; the other ranks write their ``updates``
and ``examples`` part files beside rank 0's and hand them over at each
commit (docs/format.md, "Distributed runs").

The collectives, all on the default process group, in the same order on
every rank:

- at the tracer's start, the traced layers of every rank are compared
  (:meth:`World.agree`), so that a world whose ranks trace different layers
  is refused on every rank;
- at the first step, rank 0 creates the run and sends its run id
  (:meth:`World.broadcast`);
- at every step, one sum over the ranks of the step's loss and batch size,
  and one of the gradient check's terms (:meth:`World.sum_`);
- at every commit, the part files of every rank are gathered to rank 0
  (:meth:`World.gather`), which commits them, and its outcome is sent back.

A rank that raises leaves the others waiting in the next collective until
the launcher (``torchrun``) stops them; the run stays at its last commit.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class World:
    """This process's place in the default process group."""

    def __init__(self):
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        # NCCL moves objects and sums through the current CUDA device.
        self.device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    @staticmethod
    def detect() -> World | None:
        """The world when ``torch.distributed`` is initialised, else None
        (checked once, when a Tracer is made: a plain loop is unchanged)."""
        if dist.is_available() and dist.is_initialized():
            return World()
        return None

    @property
    def owner(self) -> bool:
        """Whether this rank owns the run (rank 0)."""
        return self.rank == 0

    def agree(self, value) -> list:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather(self, value) -> list | None:
        """Every rank's ``value`` on rank 0 (rank order), None elsewhere."""
        out = [None] * self.size if self.owner else None
        dist.gather_object(value, out, dst=0)
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sums ``t`` over the ranks in place (on its device, or through
        the group's device when the backend needs it) and returns it."""
        if t.device == self.device or self.device.type == "cpu" and t.device.type == "cpu":
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t
        moved = t.to(self.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        t.copy_(moved)
        return t

    def max(self, value: int) -> int:
        """The largest ``value`` over the ranks."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def layer_table(layers) -> list[tuple[str, str, list[list[int]]]]:
    """What a rank traces: each layer's name, module type and parameter
    shapes, in order (compared across ranks at the tracer's start)."""
    return [
        (l.name, type(l.module).__name__, [list(p.shape) for _, p in l.params()])
        for l in layers
    ]


def describe(table) -> str:
    """A rank's traced layers in a few words: ``fc1 (Linear 32×64), …``."""
    def shape(shapes):
        return "×".join(str(s) for s in shapes[0]) if shapes else "-"

    return ", ".join(f"{n} ({kind} {shape(s)})" for n, kind, s in table) or "none"
