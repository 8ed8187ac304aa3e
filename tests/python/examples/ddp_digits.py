"""Train on the bundled digits with DistributedDataParallel and reptrace
recording, every rank into one run. Launched by tests/python/test_ddp.py
(two processes, gloo on the CPU); by hand, from the repository root:

    .venv/bin/python -m torch.distributed.run --nproc_per_node 2 --standalone \\
        tests/python/examples/ddp_digits.py runs/ddp-digits

Each step's global batch (a seeded permutation of the first ROWS training
rows, cut into batches of --batch) is split into equal contiguous parts,
rank r taking part r, so that the same training in one process over the
global batches is the reference (test_ddp.py). Options:

    --model mlp|cnn      the kit's MLP or its residual CNN
    --epochs N           epochs (a commit at each epoch's end)
    --mode M             the tracer's mode, instance (default) or batch
    --kill-at STEP       rank 1 kills itself (SIGKILL) before that step
    --rank1-layers A,B   rank 1 traces only these layers (refused)
    --clip-value-at STEP every rank clips gradient values at that step (refused)
    --out DIR            rank 0 saves the initial and final weights there
                         (each rank its refusal, refused-<rank>.txt)
"""
import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kit  # noqa: E402  (tests/python/kit.py: the digits and the models)

import reptrace  # noqa: E402

ROWS = 768  # 12 global batches of 64 per epoch, each split evenly


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--rank1-layers", default=None)
    p.add_argument("--clip-value-at", type=int, default=None)
    p.add_argument("--mode", default="instance")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x_all, y_all = kit.digits()
    x, y = x_all[:ROWS], y_all[:ROWS]

    torch.manual_seed(0)
    net = kit.MLP() if args.model == "mlp" else kit.ResCNN()
    initial = kit.start_weights(net)
    model = DDP(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    layers = None
    if rank == 1 and args.rank1_layers:
        layers = args.rank1_layers.split(",")
    def refused(e):
        # Handled: exit 0, so that torchrun lets every rank report it (a
        # failed rank makes it stop the others).
        print(f"REFUSED rank {rank}: {e}", flush=True)
        if args.out:  # the ranks' output may interleave: a file each
            (Path(args.out) / f"refused-{rank}.txt").write_text(str(e))
        # Both ranks leave together, and without the interpreter's teardown:
        # destroying the DDP model's process group at exit aborted a rank
        # now and then (SIGABRT from C++, "terminate called without an
        # active exception"), after the refusal was reported.
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)

    try:
        tracer = reptrace.Tracer(model, optimizer, args.run, classes=kit.CLASSES,
                                 layers=layers, mode=args.mode)
    except reptrace.InvalidInput as e:
        return refused(e)
    tracer.instances(torch.arange(ROWS), y, split="train")

    step = 0
    for epoch in range(args.epochs):
        for rows in kit.batches(ROWS, args.batch, epoch):
            part = len(rows) // world
            mine = rows[rank * part:(rank + 1) * part]
            if args.kill_at is not None and step == args.kill_at and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[mine]), y[mine])
            loss.backward()
            if step == args.clip_value_at:  # not one scale: cannot be traced
                torch.nn.utils.clip_grad_value_(model.parameters(), 1e-4)
            try:
                tracer.step(loss, mine, y[mine])
            except reptrace.RecordError as e:
                return refused(e)
            step += 1
        tracer.end_epoch()
    # Probes: 40 test rows (every rank passes them; rank 0 records them).
    tests = torch.arange(kit.TRAIN_ROWS, kit.TRAIN_ROWS + 40)
    tracer.finish(probes=(x_all[tests], y_all[tests], tests))
    if rank == 0 and args.out:
        torch.save({"initial": initial, "final": kit.start_weights(net)},
                   Path(args.out) / "weights.pt")
    # Leave as a refusal does (above): the interpreter's teardown of the DDP
    # model's process group aborted a rank now and then after a complete
    # run too (SIGABRT, "terminate called without an active exception",
    # twice in a row in one CI run, the retry included).
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
