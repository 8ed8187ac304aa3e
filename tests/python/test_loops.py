"""The training loops people write, traced exactly: gradient clipping, a
scheduler that cycles momentum, gradient accumulation, parameter groups,
frozen layers, autocast and a gradient scaler. Each run is checked twice:
`verify` passes its completeness checks, and the final weights are rebuilt
from the run's files alone — every record scaled by a displacement that
PyTorch's own SGD computes from the per-step hyper-parameters the run
recorded (an oracle independent of reptrace's arithmetic) — and compared
with the weights the model ended with. A loop that edits gradients in a way
that cannot be traced is stopped at the step, with one line."""
import os

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reptrace
from torch_helpers import MLP, TRAIN_ROWS, batches, digits, manifest, safetensors, table

CLASSES = [str(c) for c in range(10)]


@pytest.fixture(scope="module")
def data():
    x, y = digits()
    return x[:TRAIN_ROWS], y[:TRAIN_ROWS]


def sgd_displacements(hyper, skipped):
    """λ_s for every step: run torch.optim.SGD on a vector with one entry per
    step, the gradient of step t the unit vector e_t, and the per-step
    hyper-parameters set on the group before each step (a skipped step does
    not run). SGD acts entrywise, so entry s ends at −λ_s."""
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


def rebuild(run):
    """layer → (W_T, b_T) from the run's files: W_0, and every record's update
    scaled by σ_s = λ_s/η_s from the run's `layer_steps` and `steps`."""
    m = manifest(run)
    w0 = safetensors(os.path.join(run, m["commits"][0]["weights"]))
    steps = table(run, "steps").to_pydict()
    n = max(steps["step"]) + 1
    skipped = [False] * n
    for s, k in zip(steps["step"], steps["skipped"]):
        skipped[s] = bool(k)
    per_step = table(run, "layer_steps").to_pylist()
    updates = table(run, "updates")
    out = {}
    for spec in m["model"]["modules"]:
        name = spec["name"]
        hyper = [None] * n
        for r in per_step:
            if r["layer"] == name:
                hyper[r["step"]] = r
        assert all((h is None) == k for h, k in zip(hyper, skipped)), name
        lam = sgd_displacements(hyper, skipped)
        sigma = [0.0 if h is None or h["lr"] == 0 else lam[t] / h["lr"]
                 for t, h in enumerate(hyper)]
        rows = updates.filter(pc.equal(updates["layer"], name)).to_pydict()
        W = w0[f"{name}.weight"].astype(np.float64).copy()
        b = w0[f"{name}.bias"].astype(np.float64).copy() if spec["bias"] else None
        for step, u, v in zip(rows["step"], rows["u"], rows["v"]):
            u = np.asarray(u, dtype=np.float64)
            v = np.asarray(v, dtype=np.float64)
            W += sigma[step] * np.outer(v, u)
            if b is not None:
                b += sigma[step] * v
        out[name] = (W, b)
    return out


def worst_reconstruction(run, model, initial):
    """max over the traced parameters of ‖rebuilt − final‖ / ‖final − initial‖."""
    params = dict(model.named_parameters())
    worst = 0.0
    for name, (W, b) in rebuild(run).items():
        for suffix, got in (("weight", W), ("bias", b)):
            if got is None:
                continue
            want = params[f"{name}.{suffix}"].detach().double().numpy()
            start = initial[f"{name}.{suffix}"].double().numpy()
            worst = max(worst, np.linalg.norm(got - want) / np.linalg.norm(want - start))
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


def start(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def loop(model, opt, x, y, tracer, epochs=1, batch_size=64, before_step=None, after_step=None,
         micro=1, divide=True, autocast=None, scaler=None):
    """An ordinary training loop: zero_grad, `micro` forward/backward passes
    per step (gradient accumulation), optional autocast and loss scaling,
    `before_step(step)` between backward and the optimizer step (clipping),
    `after_step(step)` after it (a scheduler)."""
    step = 0
    for epoch in range(epochs):
        for rows in batches(len(x), batch_size, epoch):
            opt.zero_grad()
            parts = rows.chunk(micro)
            total = 0.0
            for part in parts:
                with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                    loss = F.cross_entropy(model(x[part]), y[part])
                if divide:
                    loss = loss / len(parts)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                total += float(loss.detach())
            if before_step is not None:
                before_step(step)
            tracer.step(total, rows, y[rows])
            if scaler is not None:
                scaler.update()
            if after_step is not None:
                after_step(step)
            step += 1
        tracer.end_epoch()
    return tracer.finish()


def run_dir(tmp_path, name):
    return str(tmp_path / name)


def test_clip_grad_norm_is_measured_and_folded_into_the_records(tmp_path, data):
    x, y = data
    torch.manual_seed(1)
    model = MLP()
    initial = start(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run = run_dir(tmp_path, "clip")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES)
    clip = lambda step: nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.2)  # noqa: E731
    loop(model, opt, x, y, tracer, epochs=2, before_step=clip)
    scales = np.array(table(run, "layer_steps")["grad_scale"].to_pylist())
    # Most steps were clipped: their records carry the measured coefficient.
    assert (scales < 0.999).mean() > 0.5, scales
    assert worst_reconstruction(run, model, initial) <= 1e-5
    completeness(run)


def test_one_cycle_with_cycling_momentum_is_exact(tmp_path, data):
    x, y = data
    torch.manual_seed(2)
    model = MLP()
    initial = start(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    steps = 2 * len(batches(len(x), 64, 0))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=steps)
    run = run_dir(tmp_path, "onecycle")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES, scheduler=sched)
    loop(model, opt, x, y, tracer, epochs=2, after_step=lambda s: sched.step())
    momenta = set(table(run, "layer_steps")["momentum"].to_pylist())
    assert len(momenta) > 10, "the scheduler cycles the momentum"
    assert worst_reconstruction(run, model, initial) <= 1e-5
    completeness(run)


@pytest.mark.parametrize("micro, divide", [(2, True), (2, False), (4, True), (4, False)])
def test_gradient_accumulation_records_every_micro_batch(tmp_path, data, micro, divide):
    x, y = data
    torch.manual_seed(3)
    model = MLP()
    initial = start(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05 if divide else 0.05 / micro, momentum=0.5)
    run = run_dir(tmp_path, f"accumulate-{micro}-{divide}")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES)
    loop(model, opt, x, y, tracer, micro=micro, divide=divide)
    updates = table(run, "updates")
    first = updates.filter(pc.equal(updates["layer"], "fc1"))
    steps = table(run, "steps").to_pydict()
    # One record per example of every micro-batch, in the order they ran.
    assert first.num_rows == sum(steps["batch_size"]) == len(x)
    order = batches(len(x), 64, 0)[0]
    got = first.filter(pc.equal(first["step"], 0))["instance_id"].to_pylist()
    assert got == order.tolist()
    assert worst_reconstruction(run, model, initial) <= 1e-5
    completeness(run)


def test_parameter_groups_with_their_own_lr_and_momentum(tmp_path, data):
    x, y = data
    torch.manual_seed(4)
    model = MLP()
    initial = start(model)
    opt = torch.optim.SGD(
        [
            {"params": model.fc1.parameters(), "lr": 0.1, "momentum": 0.9},
            {"params": list(model.fc2.parameters()) + list(model.fc3.parameters()),
             "lr": 0.03, "momentum": 0.5, "dampening": 0.2},
        ],
        lr=0.01,
    )
    run = run_dir(tmp_path, "groups")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES)
    loop(model, opt, x, y, tracer, epochs=2)
    rows = table(run, "layer_steps").to_pylist()
    groups = {(r["layer"], r["param_group"], r["lr"], r["momentum"]) for r in rows}
    assert groups == {("fc1", 0, 0.1, 0.9), ("fc2", 1, 0.03, 0.5), ("fc3", 1, 0.03, 0.5)}
    assert worst_reconstruction(run, model, initial) <= 1e-5
    completeness(run)


def test_bias_in_a_no_decay_group_is_traced_and_other_settings_are_refused(tmp_path):
    torch.manual_seed(4)
    model = MLP()
    weights = [model.fc1.weight, model.fc2.weight, model.fc3.weight]
    biases = [model.fc1.bias, model.fc2.bias, model.fc3.bias]
    # The usual split: weight decay on weights only. It leaves a residual,
    # reported by verify, and nothing else differs.
    opt = torch.optim.SGD([{"params": weights, "weight_decay": 1e-4},
                           {"params": biases, "weight_decay": 0.0}], lr=0.1)
    reptrace.Tracer(model, opt, run_dir(tmp_path, "no-decay"), classes=CLASSES)
    opt = torch.optim.SGD([{"params": weights, "lr": 0.1}, {"params": biases, "lr": 0.2}],
                          lr=0.1)
    with pytest.raises(reptrace.InvalidInput, match=r"layer 'fc1': its weight \(param group 0\) "
                       r"and bias \(param group 1\) have different lr"):
        reptrace.Tracer(model, opt, run_dir(tmp_path, "split"), classes=CLASSES)


def test_a_frozen_layer_is_left_out_and_listed(tmp_path, data):
    x, y = data
    torch.manual_seed(5)
    model = MLP()
    model.fc1.requires_grad_(False)
    initial = start(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9)
    run = run_dir(tmp_path, "frozen")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES)
    loop(model, opt, x, y, tracer)
    m = manifest(run)
    assert m["model"]["frozen"] == ["fc1"]
    assert [s["name"] for s in m["model"]["modules"]] == ["fc2", "fc3"]
    assert torch.equal(model.fc1.weight, initial["fc1.weight"])
    assert worst_reconstruction(run, model, initial) <= 1e-5
    completeness(run)
    with pytest.raises(reptrace.InvalidInput, match="layer 'fc1' is frozen"):
        reptrace.Tracer(model, opt, run_dir(tmp_path, "named"), classes=CLASSES,
                        layers=["fc1", "fc2"])
    model.fc2.bias.requires_grad_(False)
    with pytest.raises(reptrace.InvalidInput,
                       match="layer 'fc2': its weight trains and its bias is frozen"):
        reptrace.Tracer(model, opt, run_dir(tmp_path, "half"), classes=CLASSES)


def test_autocast_bf16_within_the_precision_verify_states(tmp_path, data):
    x, y = data
    torch.manual_seed(6)
    model = MLP()
    initial = start(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run = run_dir(tmp_path, "bf16")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES)
    loop(model, opt, x, y, tracer, epochs=2, autocast=torch.bfloat16)
    assert set(table(run, "layer_steps")["precision"].to_pylist()) == {"bf16"}
    weights = completeness(run)
    for c in weights:
        assert "bf16 compute rounding bound" in c["detail"], c
    # The stated tolerance is what rounding to bf16 can explain, and the
    # weights rebuilt independently are within it.
    stated = min(c["tolerance"] for c in weights)
    assert 1e-5 < stated < 0.05
    assert worst_reconstruction(run, model, initial) <= stated


def test_grad_scaler_with_autocast_f16_skips_and_unscales(tmp_path, data):
    x, y = data
    torch.manual_seed(7)
    model = MLP()
    initial = start(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # A scale far above what f16 gradients hold: the first steps overflow
    # and the scaler skips them, halving the scale each time.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 32)
    run = run_dir(tmp_path, "scaler")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES, scaler=scaler)
    loop(model, opt, x, y, tracer, epochs=2, autocast=torch.float16, scaler=scaler)
    steps = table(run, "steps").to_pydict()
    skipped = {s for s, k in zip(steps["step"], steps["skipped"]) if k}
    assert skipped, "the large initial scale makes the scaler skip steps"
    recorded = set(table(run, "updates")["step"].to_pylist())
    assert not skipped & recorded
    assert recorded | skipped == set(steps["step"])
    # The records hold unscaled gradients: κ is about 1/scale.
    scales = table(run, "layer_steps")["grad_scale"].to_pylist()
    assert max(scales) < 1e-3
    weights = completeness(run)
    stated = min(c["tolerance"] for c in weights)
    assert worst_reconstruction(run, model, initial) <= stated


@pytest.mark.parametrize("edit", ["noise", "value-clipping"])
def test_a_loop_that_edits_gradients_is_stopped_at_the_step(tmp_path, data, edit):
    x, y = data
    torch.manual_seed(8)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = run_dir(tmp_path, edit)

    def tamper(step):
        if step == 5:
            if edit == "noise":
                model.fc2.weight.grad += 1e-2 * torch.randn_like(model.fc2.weight.grad)
            else:
                nn.utils.clip_grad_value_(model.parameters(), 1e-5)

    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES)
    with pytest.raises(reptrace.RecordError) as err:
        loop(model, opt, x, y, tracer, before_step=tamper)
    message = str(err.value)
    assert "\n" not in message
    layer = "fc2" if edit == "noise" else "fc1"
    assert f"layer '{layer}' at step 5" in message, message
    assert "beyond one scale factor" in message
    info = reptrace.open(run).info()
    assert info["status"] == "aborted"
    # Steps 0..4 were recorded and checked; the run still reads and verifies.
    assert info["last_step"] == 4
    assert sorted(set(table(run, "updates")["step"].to_pylist())) == [0, 1, 2, 3, 4]
    assert all(c["status"] != "FAIL" for c in reptrace.open(run).verify())


def test_verify_says_why_weights_do_not_add_up(tmp_path, data):
    """A run whose records miss part of the update (here: written with the
    check off while clipping) fails verify with a detail saying what to
    look at."""
    x, y = data
    torch.manual_seed(9)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = run_dir(tmp_path, "unchecked")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES)
    tracer._check = False
    clip = lambda step: nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.2)  # noqa: E731
    loop(model, opt, x, y, tracer, before_step=clip)
    failed = [c for c in reptrace.open(run).verify() if c["status"] == "FAIL"]
    assert failed
    for c in failed:
        assert "records do not add up" in c["detail"] and "gradient clipping" in c["detail"], c
