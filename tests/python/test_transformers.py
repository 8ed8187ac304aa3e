"""Tracing the layers transformers are made of: a small transformer
classifier written here (token and learned positional embeddings, two pre-norm
blocks with q/k/v/o nn.Linear projections, LayerNorm, a GELU MLP, masked mean
pooling, a head) trained with SGD and momentum on padded sequences of a few
lengths, checked against independent computations: the final weights rebuilt
from the records alone, torch.func per-sample gradients, a brute-force
contribution computed here against the contributions SQL returns, and training
without the tracer. Then the smaller kinds (Conv1d, grouped and reflect-padded
Conv2d, RMSNorm, a reused module, LoRA adapters) and the refusals."""
import math
from types import SimpleNamespace

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reptrace
from kit import (
    assert_reconstructs,
    completeness,
    displacement_scales,
    info_json,
    manifest,
    record_update,
    start_weights,
    table,
    token_ids,
    train,
)

VOCAB, LENGTH, WIDTH, HEADS = 40, 8, 16, 2
CLASSES = ["a", "b", "c"]
PAD = 0


class Block(nn.Module):
    """A pre-norm transformer block: attention from nn.Linear projections,
    then a GELU MLP, each added to the residual stream."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        h = self.ln1(x)

        def split(z):
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=VOCAB, length=LENGTH, d=WIDTH, heads=HEADS, classes=len(CLASSES)):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=PAD)
        self.pos = nn.Embedding(length, d)
        self.blocks = nn.ModuleList([Block(d, heads), Block(d, heads)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        # Weights drawn N(0, 0.02²), biases zero, as transformers initialise
        # them: with PyTorch's defaults (N(0, 1) embedding rows) ‖W‖ ≫
        # ‖W_T − W_0‖ in a short run, and float32's rounding of the weights
        # themselves exceeds 1e-5 of how far training moved them.
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
            self.tok.weight[PAD] = 0.0

    def forward(self, ids):
        mask = ids != PAD
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        return self.head((x * m).sum(1) / m.sum(1))


def sequences(n, seed):
    """Token sequences of lengths 3, 5 and 8, padded with PAD to LENGTH; the
    class is the first token mod 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    lengths = torch.tensor([3, 5, 8])[torch.randint(0, 3, (n,), generator=g)]
    ids[torch.arange(LENGTH).expand(n, LENGTH) >= lengths[:, None]] = PAD
    labels = ids[:, 0] % 3
    return ids, labels


LR = 0.1


def fit(run, seed=0, traced=True, seen=None, probes=None, dtype="f32", double=False,
        torch_threads="auto"):
    """Trains a TinyTransformer for 4 epochs (24 steps of 8), recorded into
    `run` when `traced`; `seen` collects the parameters and rows of the
    first two steps; `double`: the model in float64 (the trace stays
    float32). Returns (model, initial state, x, y)."""
    torch.manual_seed(seed)
    model = TinyTransformer()
    if double:
        model = model.double()
    initial = start_weights(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES, dtype=dtype,
                             torch_threads=torch_threads) if traced else None
    x, y = sequences(48, seed=1)

    def on_step(step, rows):
        if seen is not None and step < 2:
            seen[step] = ({k: v.detach().clone() for k, v in model.named_parameters()}, rows)

    train(model, opt, x, y, epochs=4, batch_size=8, tracer=tracer, on_step=on_step)
    if tracer is not None:
        tracer.finish(probes=probes)
    return model, initial, x, y


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("transformer") / "run")
    seen = {}
    xp, yp = sequences(2, seed=7)
    model, initial, x, y = fit(run, seen=seen, probes=(xp, yp.numpy(), np.array([1000, 1001])),
                               double=True)
    return SimpleNamespace(run=run, model=model, initial=initial, x=x, y=y, seen=seen)


def test_every_layer_of_the_transformer_is_traced_and_rebuilt_from_its_records(traced):
    m = manifest(traced.run)
    kinds = {spec["name"]: spec["kind"] for spec in m["model"]["modules"]}
    assert kinds["tok"] == kinds["pos"] == "embedding"
    assert kinds["blocks.0.ln1"] == kinds["norm"] == "layer_norm"
    assert kinds["blocks.1.q"] == kinds["head"] == "linear"
    q = next(s for s in m["model"]["modules"] if s["name"] == "blocks.0.q")
    assert q["positions"] == LENGTH
    traced_params = {f"{n}.{p}" for n in kinds for p in ("weight", "bias")}
    assert {n for n, _ in traced.model.named_parameters()} <= traced_params
    # Trained in float64, so that float32's rounding of the weights (which
    # a short run's slowly moving parameters, q and k and the norms' γ, are
    # within) does not hide the records' own error: the records (float32)
    # rebuild every parameter from the model's W_0 within 1e-5.
    assert_reconstructs(traced.run, traced.model, traced.initial, from_initial=True)
    completeness(traced.run)


def test_records_equal_per_sample_gradients(traced):
    """The records of the first two steps equal −lr × per-sample gradients of
    the batch's mean loss from torch.func (vmap over grad), within 1e-5."""
    from torch.func import functional_call, grad, vmap

    m = manifest(traced.run)
    updates = table(traced.run, "updates").to_pandas()
    model = traced.model
    for step, (params, rows) in traced.seen.items():
        batch = len(rows)

        def loss_one(p, xi, yi):
            out = functional_call(model, p, (xi.unsqueeze(0),))
            return F.cross_entropy(out, yi.unsqueeze(0)) / batch

        per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, traced.x[rows], traced.y[rows])
        for spec in m["model"]["modules"]:
            name = spec["name"]
            got = updates[(updates.layer == name) & (updates.step == step)]
            assert list(got.instance_id) == rows.tolist(), name
            shape = tuple(per[f"{name}.weight"].shape[1:])
            for i, (u, v) in enumerate(zip(got.u, got.v)):
                dw, db = record_update(spec, spec.get("storage") == "full", u, v, shape)
                want = -LR * per[f"{name}.weight"][i].double().numpy()
                scale = max(np.linalg.norm(want), 1e-12)
                assert np.linalg.norm(dw - want) <= 1e-5 * scale + 1e-9, (step, name, i)
                if db is not None:
                    want_b = -LR * per[f"{name}.bias"][i].double().numpy()
                    scale = max(np.linalg.norm(want_b), 1e-12)
                    assert np.linalg.norm(db - want_b) <= 1e-5 * scale + 1e-9, (step, name, i)


def test_training_is_bit_identical_with_and_without_the_tracer(tmp_path):
    """At the same PyTorch thread count (test_torch.py: the lowered one)."""
    plain, _, _, _ = fit(None, traced=False)
    traced_model, _, _, _ = fit(str(tmp_path / "run"), torch_threads=None)
    for (k, a), (_, b) in zip(plain.state_dict().items(), traced_model.state_dict().items()):
        assert torch.equal(a, b), k


def _apply(spec, dw, db, a):
    """The layer's output for a probe input `a` (as stored) under the
    weight change (dw, db), by each kind's definition."""
    a = np.asarray(a, dtype=np.float64)
    if spec["kind"] == "linear":
        out = a.reshape(-1, spec["in_features"]) @ dw.T
    elif spec["kind"] == "embedding":
        out = dw[token_ids(spec, a)]
    else:  # layer_norm: a is the normalised input
        out = a.reshape(-1, dw.size) * dw.reshape(-1)
    return (out + db if db is not None else out).reshape(-1)


def test_sql_contributions_equal_a_brute_force_and_add_up(traced):
    """Contributions of records to two sequence probes, as SQL over
    `contributions` returns them, equal σ_s ⟨ΔW_i ⊛ a, p⟩ computed here from
    the records, within 1e-6 relative; and per probe and layer they sum,
    residual row included, to ‖p‖²."""
    m = manifest(traced.run)
    specs = {s["name"]: s for s in m["model"]["modules"]}
    sigma = displacement_scales(traced.run, m)
    run = reptrace.open(traced.run)
    rows = run.sql(
        "SELECT probe_id, layer, step, instance_id, dot, norm FROM contributions "
        "WHERE probe_id IN (1000, 1001)"
    ).to_pandas()
    probes = table(traced.run, "probes").to_pandas()
    updates = table(traced.run, "updates").to_pandas()
    shapes = {n: tuple(p.shape) for n, p in traced.model.named_parameters()}
    for (probe, layer), got in rows.groupby(["probe_id", "layer"]):
        spec = specs[layer]
        pr = probes[(probes.probe_id == probe) & (probes.layer == layer)].iloc[0]
        p = np.asarray(pr.p, dtype=np.float64)
        total = got["dot"].sum()
        assert abs(total - p @ p) <= 1e-6 * (p @ p) + 1e-12, (probe, layer, total, p @ p)
        assert got.step.isna().sum() == 1, "one residual row"
        for step in (0, 9, 17):
            for _, rec in updates[(updates.layer == layer) & (updates.step == step)].head(2).iterrows():
                dw, db = record_update(spec, spec.get("storage") == "full", rec.u, rec.v,
                                       shapes[f"{layer}.weight"])
                c = sigma[layer][step] * _apply(spec, dw, db, pr.a)
                row = got[(got.step == step) & (got.instance_id == rec.instance_id)]
                assert len(row) == 1, (probe, layer, step)
                dot, norm = float(row["dot"].iloc[0]), float(row["norm"].iloc[0])
                assert abs(dot - c @ p) <= 1e-6 * max(abs(c @ p), 1e-9 * (p @ p)), (layer, step)
                assert abs(norm - np.linalg.norm(c)) <= 1e-6 * max(np.linalg.norm(c), 1e-12)


def fit_padded_per_batch(run, traced=True, epochs=2, torch_threads=None):
    """Trains a float64 TinyTransformer on batches padded to their own
    longest sequence (dynamic padding: steps of length 3, 5 or 8), recorded
    into `run` when `traced` (PyTorch's threads kept: its test compares the
    weights with untraced training's bit for bit). Returns (model, initial
    state, x, y)."""
    torch.manual_seed(0)
    model = TinyTransformer().double()
    initial = start_weights(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES,
                             torch_threads=torch_threads) if traced else None
    x, y = sequences(48, seed=1)
    lengths = (x != PAD).sum(dim=1)
    g = torch.Generator().manual_seed(3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), 8):
            rows = order[start:start + 8]
            xb = x[rows, :int(lengths[rows].max())]
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), y[rows])
            loss.backward()
            if tracer is not None:
                tracer.step(loss, rows, y[rows])
            else:
                opt.step()
        if tracer is not None:
            tracer.end_epoch()
    return model, initial, x, y, tracer


def test_batches_padded_to_their_own_length_record_only_their_tokens(tmp_path, reptrace_bin):
    """Dynamic padding. Every layer that sees the sequence is ragged: its
    records keep exactly the example's real tokens (the padded positions'
    output gradient is zero, the attention and the pooling mask them), the
    records rebuild W_T within 1e-5, probes of different lengths given with
    their padding masks hold their real tokens only and their contributions
    add up to ‖p‖², and training is bit-identical to training untraced."""
    run = str(tmp_path / "run")
    model, initial, x, y, tracer = fit_padded_per_batch(run)
    lengths = (x != PAD).sum(dim=1)
    steps = table(run, "updates").to_pandas()
    specs = {s["name"]: s for s in manifest(run)["model"]["modules"]}
    assert {n for n, s in specs.items() if s.get("ragged")} == set(specs) - {"head"}
    for layer, width in (("tok", 1), ("blocks.0.k", WIDTH), ("blocks.1.down", 2 * WIDTH)):
        assert specs[layer].get("storage", "factors") == "factors", layer
        got = steps[steps.layer == layer]
        kept = [len(u) // width for u in got.u]  # width: values of u per position
        assert kept == [int(lengths[i]) for i in got.instance_id], layer
    # `reptrace info` counts a ragged layer's stored values, not T per record.
    info = info_json(reptrace_bin, run)
    tables = {(t["table"], t.get("layer")): t for t in info["tables"]}
    tok = next(m for m in info["model"]["modules"] if m.get("name") == "tok")
    assert tok["per_position"] and tok["factor_lens"] == [1, WIDTH], tok
    for layer in ("tok", "blocks.0.k"):
        got = steps[steps.layer == layer]
        values = sum(len(u) + len(v) for u, v in zip(got.u, got.v))
        assert tables[("updates", layer)]["raw_f32_bytes"] == 4 * values, layer
    # Probes: two inputs padded to 8, their masks given, and one padded to 5.
    xp, yp = sequences(3, seed=7)
    short = int((xp[2] != PAD).sum())
    tracer.add_probes(xp[:2], yp[:2].numpy(), [1000, 1001], mask=xp[:2] != PAD)
    tracer.add_probes(xp[2:, :max(short, 1)], yp[2:].numpy(), [1002])
    tracer.finish()
    assert_reconstructs(run, model, initial, from_initial=True)
    completeness(run)
    probes = table(run, "probes").to_pandas()
    want = {1000: int((xp[0] != PAD).sum()), 1001: int((xp[1] != PAD).sum()), 1002: short}
    for _, pr in probes[probes.layer == "blocks.0.q"].iterrows():
        assert len(pr.a) == want[pr.probe_id] * WIDTH, pr.probe_id
    rows = reptrace.open(run).sql(
        "SELECT probe_id, layer, SUM(dot) AS total FROM contributions "
        "WHERE probe_id IN (1000, 1001, 1002) GROUP BY probe_id, layer").to_pandas()
    assert len(rows) == 3 * len(specs)
    for _, r in rows.iterrows():
        pr = probes[(probes.probe_id == r.probe_id) & (probes.layer == r.layer)].iloc[0]
        p = np.asarray(pr.p, dtype=np.float64)
        assert abs(r.total - p @ p) <= 1e-6 * (p @ p) + 1e-12, (r.probe_id, r.layer)
    plain, *_ = fit_padded_per_batch(None, traced=False)
    for (k, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


def test_probe_masks_that_do_not_fit_are_refused(tmp_path):
    run = str(tmp_path / "run")
    *_, tracer = fit_padded_per_batch(run, epochs=1)
    xp, yp = sequences(2, seed=7)
    with pytest.raises(reptrace.InvalidInput, match="mask of shape"):
        tracer.add_probes(xp, yp.numpy(), mask=(xp != PAD)[:1])
    with pytest.raises(reptrace.InvalidInput, match="has no position left by the mask"):
        tracer.add_probes(xp, yp.numpy(), mask=torch.zeros_like(xp, dtype=torch.bool))
    tracer.finish()


def test_f16_storage_verifies_and_keeps_token_ids_exact(tmp_path):
    """An f16 trace of the transformer passes verify (its tolerance adds the
    f16 rounding bound), and the token ids of embedding records, stored as
    base-2048 digits, decode to the tokens each example had, also for a
    vocabulary beyond f16's exact integers (2048)."""
    run = str(tmp_path / "run")
    _, _, x, _ = fit(run, dtype="f16")
    completeness(run)
    spec = next(s for s in manifest(run)["model"]["modules"] if s["name"] == "tok")
    rows = table(run, "updates").filter(pc.equal(table(run, "updates")["layer"], "tok"))
    for i, u in zip(rows["instance_id"].to_pylist()[:16], rows["u"].to_pylist()[:16]):
        # The padding (zero gradient) is left out of the ragged records.
        assert token_ids(spec, u).tolist() == x[i][x[i] != PAD].tolist()

    wide = nn.Sequential(nn.Embedding(5000, 4), nn.Flatten(), nn.Linear(4 * 3, 3))
    ids = torch.tensor([[4999, 2048, 2047], [0, 4097, 12]])
    tracer, _ = _one_step(wide, ids, torch.tensor([0, 2]), str(tmp_path / "wide"), dtype="f16")
    tracer.finish()
    wspec = manifest(str(tmp_path / "wide"))["model"]["modules"][0]
    assert wspec["storage"] == "factors"
    got = table(str(tmp_path / "wide"), "updates")
    got = got.filter(pc.equal(got["layer"], "0")).to_pydict()
    assert [token_ids(wspec, u).tolist() for u in got["u"]] == ids.tolist()


# ------------------------------------------------ the smaller kinds


class Recurrent(nn.Module):
    """An unrolled recurrence: one nn.Linear cell called at each of 3
    steps of one forward pass, and one embedding looked up twice."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6)
        self.cell = nn.Linear(12, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = torch.zeros(ids.shape[0], 6)
        for t in range(3):
            h = torch.tanh(self.cell(torch.cat([self.emb(ids[:, t]), h], dim=1)))
        return self.head(h + self.emb(ids[:, 3]))


class Lora(nn.Module):
    """A frozen two-layer MLP over sequences whose first layer carries LoRA
    adapters (peft)."""

    @staticmethod
    def make():
        from peft import LoraConfig, get_peft_model

        base = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.GELU(),
                             nn.Flatten(), nn.Linear(8 * LENGTH, 3))
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["1", "4"], init_lora_weights=False)
        return get_peft_model(base, config)


def _kind_models():
    return {
        "conv1d-grouped-reflect": (
            lambda: nn.Sequential(
                nn.Conv1d(2, 4, 3, padding=1, padding_mode="reflect", groups=2), nn.ReLU(),
                nn.Conv1d(4, 4, 3, stride=2, dilation=2, padding=2), nn.ReLU(),
                nn.Flatten(), nn.Linear(4 * 6, 3)),
            lambda n, g: torch.randn(n, 2, 12, generator=g)),
        "conv2d-grouped-depthwise-padding-modes": (
            lambda: nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1, padding_mode="replicate"), nn.ReLU(),
                nn.Conv2d(4, 8, 3, padding=1, groups=2, padding_mode="reflect"), nn.ReLU(),
                nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="circular"), nn.ReLU(),
                nn.Flatten(), nn.Linear(8 * 6 * 6, 3)),
            lambda n, g: torch.randn(n, 2, 6, 6, generator=g)),
        "rms-norm-over-a-sequence": (
            lambda: nn.Sequential(nn.Linear(5, 8), nn.RMSNorm(8), nn.GELU(),
                                  nn.LayerNorm(8, bias=False), nn.Flatten(), nn.Linear(8 * 4, 3)),
            lambda n, g: torch.randn(n, 4, 5, generator=g)),
        "reused-modules": (Recurrent,
                           lambda n, g: torch.randint(0, VOCAB, (n, 4), generator=g)),
        "lora": (Lora.make, lambda n, g: torch.randint(0, VOCAB, (n, LENGTH), generator=g)),
    }


@pytest.mark.parametrize("name", list(_kind_models()))
def test_each_kind_reconstructs_the_final_weights(tmp_path, name):
    make, inputs = _kind_models()[name]
    torch.manual_seed(5)
    model = make()
    g = torch.Generator().manual_seed(6)
    x = inputs(32, g)
    y = torch.randint(0, 3, (32,), generator=g)
    initial = start_weights(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.05, momentum=0.9)
    run = str(tmp_path / "run")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES)
    train(model, opt, x, y, epochs=2, batch_size=8, tracer=tracer)
    tracer.finish(probes=(x[:2], y[:2].numpy(), np.array([100, 101])))
    traced_names = {s["name"] for s in manifest(run)["model"]["modules"]}
    if name == "lora":
        assert traced_names and all("lora_" in n for n in traced_names), traced_names
        assert len(traced_names) == 4  # A and B of both adapted layers
    assert_reconstructs(run, model, initial)
    completeness(run)
    checks = reptrace.open(run).verify()
    assert not [c for c in checks if c["status"] == "FAIL"], checks


class Checkpointed(nn.Module):
    """The transformer's blocks under activation checkpointing: their
    modules run again inside backward(), where the gradient reaches them."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.inner = TinyTransformer()
        self.reentrant = reentrant

    def forward(self, ids):
        from torch.utils.checkpoint import checkpoint

        t = self.inner
        mask = ids != PAD
        x = t.tok(ids) + t.pos(torch.arange(ids.shape[1]).expand_as(ids))
        for block in t.blocks:
            x = checkpoint(block, x, mask, use_reentrant=self.reentrant)
        m = mask.unsqueeze(-1).to(x.dtype)
        return t.head((t.norm(x) * m).sum(1) / m.sum(1))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_is_traced_exactly(tmp_path, reentrant):
    torch.manual_seed(0)
    model = Checkpointed(reentrant).double()
    initial = start_weights(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    run = str(tmp_path / "run")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES)
    x, y = sequences(24, seed=1)
    # Two micro-batches per step: recomputations fall into their own pass.
    for epoch in range(2):
        for rows in torch.arange(24).split(8):
            opt.zero_grad()
            for half in rows.split(4):
                loss = F.cross_entropy(model(x[half]), y[half]) / 2
                loss.backward()
            tracer.step(loss, rows, y[rows])
        tracer.end_epoch()
    tracer.finish()
    assert len(manifest(run)["model"]["modules"]) == 20
    assert_reconstructs(run, model, initial, from_initial=True)
    completeness(run)


# ------------------------------------------------ refusals


def _one_step(model, x, y, run, **tracer_args):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES, **tracer_args)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    tracer.step(loss, np.arange(len(y)), y)
    return tracer, opt


class SharedPositions(nn.Module):
    """Position ids of shape (1, T), shared by the batch."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, 8)
        self.pos = nn.Embedding(LENGTH, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0))
        return self.head(x.mean(1))


class SequenceFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.mix(self.tok(ids).transpose(0, 1))  # (T, batch, 8)
        return self.head(h.mean(0))


def test_layouts_that_cannot_be_recorded_are_refused_in_one_line(tmp_path):
    x, y = sequences(5, seed=2)
    with pytest.raises(reptrace.InvalidInput, match=r"layer 'pos': input of shape \(1, 8\) .*"
                       r"first dimension must be the batch.*expand it"):
        _one_step(SharedPositions(), x, y, str(tmp_path / "a"))
    with pytest.raises(reptrace.InvalidInput,
                       match=r"layer 'mix': input of shape \(8, 5, 8\) in a forward pass of 5"):
        _one_step(SequenceFirst(), x, y, str(tmp_path / "b"))
    # A step whose sequences are shorter than the first step's is recorded
    # (the layers that see the sequence are ragged); a layer that sees none,
    # called more often than at the first step, is refused.
    model = Unrolled()
    tracer, opt = _one_step(model, x, y, str(tmp_path / "c"))
    for calls in (2, 3):
        model.calls = calls
        opt.zero_grad()
        loss = F.cross_entropy(model(x[:, :6]), y)
        loss.backward()
        if calls == 2:
            tracer.step(loss, np.arange(5), y)
            continue
        with pytest.raises(reptrace.InvalidInput,
                           match=r"layer 'cell': 3 positions per example at step 2 and 2 at "
                                 r"the first step; a layer that sees no sequence"):
            tracer.step(loss, np.arange(5), y)


class Unrolled(nn.Module):
    """A cell over (batch, features) called `calls` times per forward pass,
    after an embedding that sees the sequence."""

    def __init__(self):
        super().__init__()
        self.calls = 2
        self.emb = nn.Embedding(VOCAB, 6)
        self.cell = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.emb(ids).mean(1)
        for _ in range(self.calls):
            h = torch.tanh(self.cell(h))
        return self.head(h)


def test_modules_that_cannot_be_traced_are_refused_in_one_line(tmp_path):
    attention = nn.Sequential(nn.Linear(8, 8))
    attention.add_module("attn", nn.MultiheadAttention(8, 2, batch_first=True))
    opt = torch.optim.SGD(attention.parameters(), lr=0.1)
    with pytest.raises(reptrace.InvalidInput,
                       match=r"module 'attn' is an nn.MultiheadAttention.*nn.Linear q/k/v/o"):
        reptrace.Tracer(attention, opt, str(tmp_path / "a"), classes=CLASSES)
    with pytest.raises(reptrace.InvalidInput, match=r"module 'attn' is an nn.MultiheadAttention"):
        reptrace.Tracer(attention, opt, str(tmp_path / "b"), classes=CLASSES,
                        layers=["attn.out_proj"])
    # Only layer '0' named: the attention is left alone.
    reptrace.Tracer(attention, opt, str(tmp_path / "c"), classes=CLASSES, layers=["0"])

    tied = TinyTransformer(classes=VOCAB)
    tied.head = nn.Linear(WIDTH, VOCAB, bias=False)
    tied.head.weight = tied.tok.weight
    opt = torch.optim.SGD(tied.parameters(), lr=0.1)
    with pytest.raises(reptrace.InvalidInput,
                       match=r"layer '(tok|head)': its parameter .* is also '(head|tok).weight' "
                             r"\(tied weights\)"):
        reptrace.Tracer(tied, opt, str(tmp_path / "d"), classes=CLASSES)

    model = TinyTransformer()
    model.act = nn.GELU()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(reptrace.InvalidInput,
                       match=r"layer 'act' is a GELU: only nn.Linear, nn.Conv2d, nn.Conv1d, "
                             r"nn.Embedding, nn.LayerNorm, nn.RMSNorm layers can be traced"):
        reptrace.Tracer(model, opt, str(tmp_path / "e"), classes=CLASSES, layers=["act"])
    with pytest.raises(reptrace.InvalidInput, match=r"exclude: 'act' is no layer of a traced "
                                                    r"kind; the model's .* layers: tok, pos, "):
        reptrace.Tracer(model, opt, str(tmp_path / "g"), classes=CLASSES, exclude=["act"])
    with pytest.raises(reptrace.InvalidInput, match=r"give layers=\[...\] or exclude=\[...\]"):
        reptrace.Tracer(model, opt, str(tmp_path / "h"), classes=CLASSES, layers=["tok"],
                        exclude=["pos"])
    sparse = nn.Sequential(nn.Embedding(VOCAB, 4, sparse=True), nn.Flatten(), nn.Linear(32, 3))
    with pytest.raises(reptrace.InvalidInput, match=r"layer '0': nn.Embedding\(sparse=True\)"):
        reptrace.Tracer(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1),
                        str(tmp_path / "f"), classes=CLASSES)


def test_a_model_called_through_another_module_keeps_its_passes_apart(tmp_path):
    """The tracer sees no forward pass of its model when the loop calls its
    layers through a wrapper; each call is then a pass of its own, and two
    accumulated micro-batches stay two passes, not two positions."""
    inner = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = inner

        def forward(self, x):
            return self.m[2](self.m[1](self.m[0](x)))

    wrapper = Wrapper()
    initial = start_weights(inner)
    opt = torch.optim.SGD(inner.parameters(), lr=0.1)
    run = str(tmp_path / "run")
    tracer = reptrace.Tracer(inner, opt, run, classes=CLASSES)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    for _ in range(3):
        opt.zero_grad()
        for half in (slice(0, 4), slice(4, 8)):
            loss = F.cross_entropy(wrapper(x[half]), y[half]) / 2
            loss.backward()
        tracer.step(loss, np.arange(8), y)
    tracer.finish()
    assert [s.get("positions", 1) for s in manifest(run)["model"]["modules"]] == [1, 1]
    assert_reconstructs(run, inner, initial)
    completeness(run)
