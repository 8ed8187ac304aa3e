"""The Python tests' kit, one home for what several test files use:
running the built binaries, reading a run's files without reptrace
(committed tables, manifest, weights), the bundled digits, two models (an
MLP, and a CNN with nested blocks and a skip connection), a small training
loop, and the final weights rebuilt from a run's records (an oracle
independent of reptrace's arithmetic). conftest.py holds only pytest hooks
and fixtures."""
import gzip
import json
import math
import os
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reptrace

ROOT = Path(__file__).resolve().parents[2]
CLASSES = [str(c) for c in range(10)]
TRAIN_ROWS = 1437


# ------------------------------------------------------------------ binaries


def binary(env_var: str, default_name: str) -> Path:
    """The built binary `env_var` names, else target/debug/`default_name`
    (the cargo target dir from REPTRACE_CARGO_TARGET, else ROOT/target)."""
    target = Path(os.environ.get("REPTRACE_CARGO_TARGET", ROOT / "target"))
    path = Path(os.environ.get(env_var, target / "debug" / default_name))
    if not path.is_file():
        pytest.fail(
            f"{path} not found: build it first (cargo build; cargo build -p "
            f"reptrace-record --example synthetic) or set {env_var}"
        )
    return path


def reptrace_cli(reptrace_bin, *args, check=True):
    """Runs the CLI; the completed process (stdout/stderr as text)."""
    proc = subprocess.run(
        [str(reptrace_bin), *map(str, args)], capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        pytest.fail(f"reptrace {' '.join(map(str, args))} failed: {proc.stderr.strip()}")
    return proc


def cli_json(reptrace_bin, *args):
    """The JSON a CLI command prints (`[]` for no output)."""
    out = reptrace_cli(reptrace_bin, *args).stdout
    return json.loads(out) if out.strip() else []


def sql_json(reptrace_bin, run, sql):
    """The rows of `reptrace sql --format json` (a NULL is a missing key)."""
    return cli_json(reptrace_bin, "sql", run, sql, "--format", "json")


def info_json(reptrace_bin, run):
    """`reptrace info RUN --json`, parsed."""
    return cli_json(reptrace_bin, "info", run, "--json")


def require_subcommands(reptrace_bin, *names):
    """Fails (not skips) naming the subcommands the binary lacks."""
    listed = reptrace_cli(reptrace_bin, "--help").stdout
    missing = [n for n in names if not re.search(rf"^\s+{n}\s", listed, re.M)]
    if missing:
        pytest.fail(f"{reptrace_bin} has no subcommand {', '.join(missing)}: rebuild the CLI")


# -------------------------------------------------- digits, models, training


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


def traced_model(run, seed=None, make=MLP, **sgd):
    """A `make()` model (seeded when `seed` is given), torch SGD over its
    parameters (`sgd`; lr 0.1 unless given), and a reptrace.Tracer recording
    them into `run`: (model, optimizer, tracer)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = make()
    opt = torch.optim.SGD(model.parameters(), **{"lr": 0.1, **sgd})
    return model, opt, reptrace.Tracer(model, opt, run, classes=CLASSES)


def start_weights(model):
    """A copy of the model's state (parameters and buffers) before training."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------- a run's files


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
    """The run's manifest.json, parsed."""
    return json.loads((Path(run) / "manifest.json").read_text())


def committed(run, table_name):
    """Committed files of a table, from the manifest (as readers must)."""
    return [
        str(Path(run) / f["path"])
        for c in manifest(run)["commits"]
        for f in c["files"]
        if f["table"] == table_name
    ]


def materialised_ids(run):
    """The probe ids the run's attributions hold (from the manifest)."""
    return sorted({i for a in manifest(run)["attributions"] for lo, hi in a["probe_ids"]
                   for i in range(lo, hi + 1)})


def files_of(run):
    """relative path → bytes of every file of a run (but its manifest)."""
    root = Path(run)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name not in ("manifest.json", ".lock")
    }


# ------------------------------------------------ weights rebuilt from records


def sgd_displacements(hyper, skipped):
    """λ_s for every step: run torch.optim.SGD on a vector with one entry per
    step, the gradient of step t the unit vector e_t, and the per-step
    hyper-parameters set on the group before each step (a skipped step does
    not run). SGD acts entrywise, so entry s ends at −λ_s: how far PyTorch's
    SGD moves the gradient of step s by the end of training
    (docs/method.md §5)."""
    n = len(hyper)
    w = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    first = next(h for h in hyper if h is not None)
    opt = torch.optim.SGD(
        [w], lr=first["lr"], momentum=0.5, dampening=0.0, nesterov=first["nesterov"]
    )
    group = opt.param_groups[0]
    for t in range(n):
        if skipped[t]:
            continue
        h = hyper[t]
        for k in ("lr", "momentum", "dampening", "nesterov"):
            group[k] = h[k]
        w.grad = torch.zeros(n, dtype=torch.float64)
        w.grad[t] = 1.0
        opt.step()
    return -w.detach().numpy()


def displacement_scales(run, m):
    """layer → σ_s = λ_s/η_s per step, from the run's `steps` and
    `layer_steps` (each layer's own per-step lr, momentum, dampening and
    nesterov); in batch mode a record is the whole update (σ = 1)."""
    steps = table(run, "steps").to_pydict()
    n = max(steps["step"]) + 1
    layers = [spec["name"] for spec in m["model"]["modules"]]
    if m["mode"] == "batch":
        return {name: np.ones(n) for name in layers}
    skipped = [False] * n
    for s, k in zip(steps["step"], steps["skipped"]):
        skipped[s] = bool(k)
    per_step = table(run, "layer_steps").to_pylist()
    out = {}
    for name in layers:
        hyper = [None] * n
        for r in per_step:
            if r["layer"] == name:
                hyper[r["step"]] = r
        assert all((h is None) == k for h, k in zip(hyper, skipped)), name
        lam = sgd_displacements(hyper, skipped)
        out[name] = np.array([0.0 if h is None or h["lr"] == 0 else lam[t] / h["lr"]
                              for t, h in enumerate(hyper)])
    return out


def token_ids(spec, u):
    """An embedding record's or probe's token ids, from their base-2048
    digits (most significant first)."""
    n = spec["num_embeddings"]
    digits = 1 if n <= 2048 else (2 if n <= 2048**2 else 3)
    d = np.asarray(u, dtype=np.float64).reshape(-1, digits)
    assert np.all(d == np.round(d)), "token digits are not integers"
    return (d @ (2048.0 ** np.arange(digits - 1, -1, -1))).astype(np.int64)


def record_update(spec, full, u, v, weight_shape):
    """One record's (ΔW in the weight's shape, Δb or None), float64, from
    its u and v by each kind's definition (docs/format.md)."""
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    n_w = int(np.prod(weight_shape))
    kind = spec["kind"]
    bias = spec.get("bias", False)
    if full or kind in ("layer_norm", "rms_norm"):
        return v[:n_w].reshape(weight_shape), (v[n_w:] if bias else None)
    if kind == "linear":
        uu = u.reshape(-1, spec["in_features"])  # positions × in
        vv = v.reshape(-1, spec["out_features"])
        return vv.T @ uu, (vv.sum(axis=0) if bias else None)
    if kind == "embedding":
        dw = np.zeros(weight_shape)
        np.add.at(dw, token_ids(spec, u), v.reshape(-1, spec["embedding_dim"]))
        return dw, None
    # conv1d / conv2d: u = unfold (K × P), v = C_out × P, per group.
    groups = spec.get("groups", 1)
    vv = v.reshape(spec["out_channels"], -1)
    uu = u.reshape(-1, vv.shape[1])
    co, k = vv.shape[0] // groups, uu.shape[0] // groups
    dw = np.concatenate([vv[g * co:(g + 1) * co] @ uu[g * k:(g + 1) * k].T
                         for g in range(groups)])
    return dw.reshape(weight_shape), (vv.sum(axis=1) if bias else None)


def add_record(W, b, spec, full, scale, u, v):
    """Adds one record's update, times `scale`, to W (and b) in place."""
    dw, db = record_update(spec, full, u, v, W.shape)
    W += scale * dw
    if b is not None:
        b += scale * db


def is_adam(m):
    """Whether the run is an Adam/AdamW run in instance mode (its records
    are scaled elementwise by Adam's effective step sizes)."""
    return m["mode"] == "instance" and m["optimizer"]["kind"] in ("adam", "adamw")


def adam_effective(run, m):
    """layer → ({step: G_t}, Π_t d_t) for an Adam/AdamW instance-mode run,
    from its `layer_steps` alone (docs/method.md): walking the steps
    backwards, `H_t = ρ_t · step_size_t · D_t + β1_{next} · H_{next}` and
    `G_t = (1 − β1_t) · H_t` (float64, the layer's update length), with
    `d_t = 1 − lr_t·wd_t` under AdamW (1 under Adam) and `ρ_t` the product
    of the d of the steps after t. A record's true share of the weight
    change is `G_t ⊙ [vec ΔW_rec, Δb_rec]`; W_0 ends at `Π d · W_0`."""
    rows = table(run, "layer_steps").to_pylist()
    decoupled = m["optimizer"]["kind"] == "adamw"
    out = {}
    for spec in m["model"]["modules"]:
        mine = sorted((r for r in rows if r["layer"] == spec["name"]), key=lambda r: r["step"])
        g, h, rho, beta_next = {}, None, 1.0, 0.0
        for r in reversed(mine):
            assert r["preconditioner"] is not None, (spec["name"], r["step"])
            d = np.asarray(r["preconditioner"], dtype=np.float64)
            term = rho * r["step_size"] * d
            h = term if h is None else term + beta_next * h
            g[r["step"]] = (1.0 - r["beta1"]) * h
            beta_next = r["beta1"]
            rho *= (1.0 - r["lr"] * r["weight_decay"]) if decoupled else 1.0
        out[spec["name"]] = (g, rho)
    return out


def reconstruct(run, w0=None):
    """layer → (W_T, b_T) rebuilt from the run's files alone: W_0 from the
    initial weights (or `w0`: name → tensor) plus every record's update
    scaled by its step's σ_s (under Adam/AdamW in instance mode: `Π d · W_0`
    plus every record's update times `G_t` elementwise, `adam_effective`)."""
    m = manifest(run)
    if w0 is None:
        w0 = safetensors(os.path.join(run, m["commits"][0]["weights"]))
    else:
        w0 = {k: v.detach().double().numpy() for k, v in w0.items()}
    adam = adam_effective(run, m) if is_adam(m) else None
    sigma = None if adam else displacement_scales(run, m)
    updates = table(run, "updates")
    out = {}
    for spec in m["model"]["modules"]:
        name = spec["name"]
        full = m["mode"] == "batch" or spec.get("storage") == "full"
        rows = updates.filter(pc.equal(updates["layer"], name)).to_pydict()
        W = w0[f"{name}.weight"].astype(np.float64).copy()
        b = w0[f"{name}.bias"].astype(np.float64).copy() if spec.get("bias") else None
        if adam:
            g, rho = adam[name]
            W *= rho
            if b is not None:
                b *= rho
            for step, u, v in zip(rows["step"], rows["u"], rows["v"]):
                dw, db = record_update(spec, full, u, v, W.shape)
                W += g[step][:W.size].reshape(W.shape) * dw
                if b is not None:
                    b += g[step][W.size:] * db
        else:
            for step, u, v in zip(rows["step"], rows["u"], rows["v"]):
                add_record(W, b, spec, full, sigma[name][step], u, v)
        out[name] = (W, b)
    return out


def assert_reconstructs(run, model, initial, tolerance=1e-5, from_initial=False):
    """Every traced parameter rebuilt from the trace, relative to how far
    training moved it (‖rebuilt − final‖ / ‖final − initial‖): ≤ tolerance.
    `from_initial`: start from `initial` rather than the run's float32
    snapshot (a float64 model: the check then sees the records' own
    rounding only). A float32 model's weights are rounded at every step,
    `2⁻²⁴·‖W_T‖·√steps` over the run, which can exceed `tolerance` of a
    parameter that barely moves; that floor is added, as `verify` adds it.
    Returns the worst."""
    params = dict(model.named_parameters())
    steps = 0 if from_initial else len(table(run, "steps"))
    worst = 0.0
    for name, (W, b) in reconstruct(run, initial if from_initial else None).items():
        layer_moved = 0.0
        for suffix, got in (("weight", W), ("bias", b)):
            if got is None:
                continue
            want = params[f"{name}.{suffix}"].detach().double().numpy()
            start = initial[f"{name}.{suffix}"].double().numpy()
            moved = np.linalg.norm(want - start)
            layer_moved = max(layer_moved, moved)
            if moved <= 1e-6 * layer_moved:
                # A bias its gradient never moves (a key projection's: the
                # softmax ignores it) moves by rounding only; its records must
                # add up to nothing against how far the layer's weight moved.
                moved = layer_moved
            rel = np.linalg.norm(got - want) / moved
            floor = 2.0**-24 * np.linalg.norm(want) * math.sqrt(steps) / moved
            worst = max(worst, rel)
            assert rel <= tolerance + floor, (
                f"{name}.{suffix}: reconstruction off by {rel:.2e} (f32 rounding floor "
                f"{floor:.1e})")
    return worst


def completeness(run):
    """The weights-completeness checks of `verify` (all must be enforced and
    pass) and no FAIL anywhere."""
    checks = reptrace.open(run).verify()
    failed = [c for c in checks if c["status"] == "FAIL"]
    assert not failed, failed
    weights = [c for c in checks
               if c["name"].startswith("completeness") and c["name"].endswith(" weights")]
    assert weights and all(c["status"] == "pass" for c in weights), weights
    return weights
