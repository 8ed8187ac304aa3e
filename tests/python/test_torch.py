"""Recording PyTorch training with reptrace.Tracer, checked against
independent computations: the weights PyTorch ends with (reconstructed from
the trace alone), per-sample gradients from torch.func, training without the
tracer, the CLI on the same run, and `reptrace train` on the same problem."""
import copy
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reptrace
from reptrace import _torch
from kit import (
    CLASSES,
    MLP,
    TRAIN_ROWS,
    ResCNN,
    assert_reconstructs,
    files_of,
    manifest,
    reptrace_cli,
    safetensors,
    sql_json,
    start_weights,
    table,
    traced_model,
    train,
)


@pytest.mark.parametrize(
    "make, sgd, sched",
    [
        (MLP, dict(lr=0.1), False),
        (MLP, dict(lr=0.05, momentum=0.9, nesterov=True), True),
        (ResCNN, dict(lr=0.05), False),
        (ResCNN, dict(lr=0.02, momentum=0.9, dampening=0.1), True),
        (ResCNN, dict(lr=0.05), "device"),
    ],
    ids=["mlp-sgd", "mlp-nesterov-cosine", "cnn-sgd", "cnn-momentum-dampening-step",
         "cnn-sgd-device-path"],
)
def test_trace_reconstructs_the_final_weights(tmp_path, data, monkeypatch, make, sgd, sched):
    """`sched` "device": without a scheduler, the gradient check by the
    PyTorch operations a GPU runs (here on the CPU) instead of the
    extension's one call per layer."""
    if sched == "device":
        monkeypatch.setattr(_torch, "_ON_HOST", False)
        sched = False
    x, y, _, _ = data
    torch.manual_seed(0)
    model = make()
    initial = start_weights(model)
    opt = torch.optim.SGD(model.parameters(), **sgd)
    scheduler = None
    if sched:
        scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
            if make is MLP
            else torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        )
    run = str(tmp_path / "run")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES, scheduler=scheduler)
    train(model, opt, x, y, epochs=2, tracer=tracer, scheduler=scheduler)
    tracer.finish()
    m = manifest(run)
    assert m["status"] == "complete" and m["model"]["structure"] == "traced_layers"
    names = [s["name"] for s in m["model"]["modules"]]
    if make is ResCNN:
        assert names == ["stem", "encoder.block1.conv1", "encoder.block1.conv2", "head"]
    lrs = table(run, "steps")["lr"].to_pylist()
    if sched:
        assert len(set(lrs)) > 1, "the scheduler's rates are recorded per step"
    worst = assert_reconstructs(run, model, initial)
    print(f"{make.__name__} {sgd}: worst relative reconstruction error {worst:.2e}")
    checks = reptrace.open(run).verify()
    assert all(c["status"] in ("pass", "skip") for c in checks), checks


def test_batch_mode_with_adam_reconstructs_the_final_weights(tmp_path, data):
    x, y, _, _ = data
    torch.manual_seed(1)
    model = ResCNN()
    initial = start_weights(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    run = str(tmp_path / "adam")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES, mode="batch")
    train(model, opt, x, y, epochs=2, tracer=tracer)
    tracer.finish()
    m = manifest(run)
    assert m["mode"] == "batch" and m["optimizer"]["kind"] == "adam"
    assert_reconstructs(run, model, initial)
    members = table(run, "batches")
    assert members.num_rows == 2 * TRAIN_ROWS


def test_factors_equal_per_sample_gradients(tmp_path, data):
    """The factors of the first steps equal −lr × per-sample gradients of the
    batch loss computed with torch.func (vmap over grad), within 1e-5."""
    from torch.func import functional_call, grad, vmap

    x, y, _, _ = data
    torch.manual_seed(2)
    model = ResCNN()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    run = str(tmp_path / "run")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES)
    seen = {}

    def on_step(step, rows):
        if step < 3:
            seen[step] = ({k: v.detach().clone() for k, v in model.named_parameters()}, rows)

    train(model, opt, x, y, epochs=1, tracer=tracer, on_step=on_step)
    tracer.finish()
    m = manifest(run)
    updates = table(run, "updates").to_pandas()
    for step, (params, rows) in seen.items():
        batch = len(rows)

        def loss_one(p, xi, yi):
            out = functional_call(model, p, (xi.unsqueeze(0),))
            # One example's term of the batch's mean loss.
            return F.cross_entropy(out, yi.unsqueeze(0)) / batch

        per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x[rows], y[rows])
        for spec in m["model"]["modules"]:
            name = spec["name"]
            got = updates[(updates.layer == name) & (updates.step == step)]
            assert list(got.instance_id) == rows.tolist()
            gw = per[f"{name}.weight"].double().numpy().reshape(batch, -1)
            for i, (u, v) in enumerate(zip(got.u, got.v)):
                u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
                if spec["kind"] == "linear":
                    dw = np.outer(v, u).reshape(-1)
                elif spec["storage"] == "full":
                    dw = v[: gw.shape[1]]
                else:
                    vv = v.reshape(spec["out_channels"], -1)
                    dw = (vv @ u.reshape(-1, vv.shape[1]).T).reshape(-1)
                want = -lr * gw[i]
                rel = np.linalg.norm(dw - want) / np.linalg.norm(want)
                assert rel <= 1e-5, f"step {step} {name} example {i}: {rel:.2e}"


@pytest.fixture
def all_cores():
    """PyTorch at one thread per core (its default), put back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(_torch._cores())
    yield _torch._cores()
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [None, "auto"])
def test_training_is_bit_identical_with_and_without_the_tracer(tmp_path, data, all_cores,
                                                               threads):
    """With torch_threads="auto" on two cores or more the tracer trains at
    one PyTorch thread fewer from its first step on (a different thread
    count may round differently): bit-identical to untraced training that
    lowers the count at the same point."""
    x, y, _, _ = data
    lowered = all_cores - 1 if threads == "auto" and all_cores >= 2 else all_cores
    finals = []
    for traced in (False, True):
        torch.set_num_threads(all_cores)
        torch.manual_seed(3)
        model = ResCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        tracer = None
        if traced:
            tracer = reptrace.Tracer(model, opt, str(tmp_path / "run"), classes=CLASSES,
                                     torch_threads=threads)

        def lower(step, rows):
            if step == 0 and tracer is None:
                torch.set_num_threads(lowered)
            assert step == 0 or torch.get_num_threads() == lowered

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            train(model, opt, x, y, epochs=1, tracer=tracer, on_step=lower)
        if tracer:
            tracer.finish()
            assert torch.get_num_threads() == all_cores, "finish() gives the threads back"
        finals.append(start_weights(model))
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k


def test_the_tracer_leaves_a_core_to_its_writer_on_the_cpu(tmp_path, data, monkeypatch,
                                                           all_cores):
    """torch_threads="auto": PyTorch's threads one below the cores from a
    tracer's first step until the last running tracer ends, said in one
    warning; None, compression="none" and a thread count below the cores
    leave them alone, and so does a first step that cannot make the run."""
    x, y, _, _ = data
    monkeypatch.setattr(_torch, "_cores", lambda: 4)
    torch.set_num_threads(4)
    rows = np.arange(64)

    def one_step(tracer, model, opt):
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        tracer.step(None, rows, y[rows])

    a = traced_model(str(tmp_path / "a"), seed=1)
    b = traced_model(str(tmp_path / "b"), seed=2)
    assert torch.get_num_threads() == 4, "made, not started: nothing changes"
    with pytest.warns(RuntimeWarning,
                      match=r"PyTorch's threads 4 -> 3 .*torch_threads=None") as said:
        one_step(a[2], *a[:2])
    assert said[0].filename == __file__, "the warning names the program's line"
    assert torch.get_num_threads() == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second tracer finds them lowered: no warning
        one_step(b[2], *b[:2])
    a[2].finish()
    assert torch.get_num_threads() == 3, "b still records"
    b[2].abort("stopped by the test")
    assert torch.get_num_threads() == 4

    # Kept: None, no compression (the writer needs little of a core), or
    # fewer threads than cores already.
    model, opt, _ = traced_model(str(tmp_path / "unused"), seed=3)
    for threads, run, options in ((4, "c", dict(torch_threads=None)),
                                  (4, "c2", dict(compression="none")), (2, "d", {})):
        torch.set_num_threads(threads)
        kept = reptrace.Tracer(model, opt, str(tmp_path / run), classes=CLASSES, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            one_step(kept, model, opt)
        assert torch.get_num_threads() == threads
        kept.finish()
        assert torch.get_num_threads() == threads

    # An exception in the `with` block ends the tracer: the threads come back.
    torch.set_num_threads(4)
    model, opt, tracer = traced_model(str(tmp_path / "e"), seed=4)
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError):
        with tracer:
            one_step(tracer, model, opt)
            assert torch.get_num_threads() == 3
            raise ValueError("the loop failed")
    assert torch.get_num_threads() == 4
    assert manifest(str(tmp_path / "e"))["status"] == "aborted"

    # A count the program set while tracing is its own: not put back.
    model, opt, tracer = traced_model(str(tmp_path / "f"), seed=5)
    with pytest.warns(RuntimeWarning):
        one_step(tracer, model, opt)
    torch.set_num_threads(2)
    tracer.finish()
    assert torch.get_num_threads() == 2

    # A run that cannot be made at the first step: nothing lowered.
    torch.set_num_threads(4)
    model, opt, tracer = traced_model(str(tmp_path / "g"), seed=6)
    (tmp_path / "g").write_text("in the way")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(reptrace.RecordError, match=r"/g: Not a directory"):
            one_step(tracer, model, opt)
    assert torch.get_num_threads() == 4

    with pytest.raises(reptrace.InvalidInput, match=r"^torch_threads: 3, expected 'auto' or None"):
        reptrace.Tracer(model, opt, str(tmp_path / "f"), classes=CLASSES, torch_threads=3)


def test_analysis_from_python_equals_the_cli(reptrace_bin, tmp_path, data):
    x, y, xt, yt = data
    run = str(tmp_path / "run")
    model, opt, tracer = traced_model(run, seed=4, momentum=0.5)
    tracer.instances(np.arange(TRAIN_ROWS), y.numpy(), split="train")
    train(model, opt, x, y, epochs=2, tracer=tracer)
    ids = np.arange(TRAIN_ROWS, TRAIN_ROWS + 20)
    tracer.finish(probes=(xt[:20], yt[:20], ids))
    r = reptrace.open(run)
    summary = r.attribute(probes=[int(ids[0]), int(ids[1])])
    assert summary["rows"] > 0
    checks = r.verify()
    assert all(c["status"] == "pass" for c in checks if "attribution" in c["name"]), checks
    for name, params in (
        ("top_proponents", dict(probe=int(ids[0]), k=5)),
        ("class_shares", dict(probe=int(ids[1]))),
    ):
        # The CLI's JSON leaves NULLs out.
        py = [{k: v for k, v in row.items() if v is not None} for row in r.query(name, **params).to_pylist()]
        args = ["query", run, name, "--format", "json"]
        for k, v in params.items():
            args += ["--param", f"{k}={v}"]
        assert py == json.loads(reptrace_cli(reptrace_bin, *args).stdout), name
    shares = r.query("class_shares", probe=int(ids[1])).to_pandas()
    per_layer = shares.groupby("layer").share.sum()
    assert len(per_layer) == 3 and (abs(per_layer - 1.0) < 1e-6).all(), per_layer
    got = r.sql("SELECT COUNT(*) AS n FROM updates").to_pylist()[0]["n"]
    assert got == sql_json(reptrace_bin, run, "SELECT COUNT(*) AS n FROM updates")[0]["n"]


def test_same_problem_same_factors_as_reptrace_train(reptrace_bin, tmp_path, data):
    """`reptrace train` (tch) and PyTorch with the tracer, from the same
    initial weights, in the same data order with the same learning rate,
    record the same factors (f32 tolerance)."""
    x, y, _, _ = data
    cli_run = str(tmp_path / "cli")
    reptrace_cli(reptrace_bin, "train", "--epochs", "1", "--batch-size", "64", "--lr", "0.1",
                 "--threads", "1", "--probes", "none", "--out", cli_run)
    ref = table(cli_run, "updates").to_pandas()
    w0 = safetensors(os.path.join(cli_run, manifest(cli_run)["commits"][0]["weights"]))
    model = MLP()
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(torch.from_numpy(w0[k].copy()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = str(tmp_path / "torch")
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES)
    fc1 = ref[ref.layer == "fc1"]
    for step, rows in fc1.groupby("step", sort=True):
        ids = torch.tensor(rows.instance_id.to_numpy())
        opt.zero_grad()
        loss = F.cross_entropy(model(x[ids]), y[ids])
        loss.backward()
        tracer.step(loss, ids, y[ids])
    tracer.finish()
    got = table(run, "updates").to_pandas()
    assert len(got) == len(ref)
    key = ["layer", "step", "instance_id"]
    merged = ref.merge(got, on=key, suffixes=("_cli", "_py"))
    assert len(merged) == len(ref)
    worst = 0.0
    for _, rows in merged.groupby("layer"):
        for col in ("u", "v"):
            a = np.stack(rows[f"{col}_cli"].map(np.asarray))
            b = np.stack(rows[f"{col}_py"].map(np.asarray))
            err = np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)
            worst = max(worst, err)
    assert worst <= 1e-4, f"largest relative factor difference {worst:.2e}"


# ----------------------------------------------------------------- bad input


def test_bad_input_gets_a_clear_exception(tmp_path, data):
    x, y, _, _ = data
    model = MLP()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(reptrace.InvalidInput, match="unknown layer 'fc9'.*fc1, fc2, fc3"):
        reptrace.Tracer(model, sgd, str(tmp_path / "a"), classes=CLASSES, layers=["fc9"])
    nothing = nn.Sequential(nn.ReLU())
    with pytest.raises(reptrace.InvalidInput, match="no layer of a traced kind .nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding, nn.LayerNorm, nn.RMSNorm"):
        reptrace.Tracer(nothing, sgd, str(tmp_path / "b"), classes=CLASSES)
    with pytest.raises(reptrace.InvalidInput, match="RMSprop in instance mode.*mode='batch'"):
        reptrace.Tracer(model, torch.optim.RMSprop(model.parameters()), str(tmp_path / "c"),
                        classes=CLASSES)
    bn = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
    with pytest.raises(reptrace.InvalidInput, match="BatchNorm1d.*batch mode"):
        reptrace.Tracer(bn, torch.optim.SGD(bn.parameters(), lr=0.1), str(tmp_path / "d"),
                        classes=CLASSES)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("mine")
    with pytest.raises(reptrace.InvalidInput, match="exists and is not empty"):
        reptrace.Tracer(model, sgd, str(full), classes=CLASSES)
    assert (full / "x").read_text() == "mine"

    tracer = reptrace.Tracer(model, sgd, str(tmp_path / "e"), classes=CLASSES)
    with pytest.raises(reptrace.InvalidInput, match="before loss.backward"):
        loss = F.cross_entropy(model(x[:4]), y[:4])
        tracer.step(loss, np.arange(4), y[:4])
    loss.backward()
    with pytest.raises(reptrace.InvalidInput, match="3 ids for a batch of 4"):
        tracer.step(loss, np.arange(3), y[:4])
    tracer.abort("test over")


def test_non_finite_loss_leaves_the_run_at_its_last_commit(tmp_path, data):
    x, y, _, _ = data
    run = str(tmp_path / "nan")
    model, opt, tracer = traced_model(run, seed=5)
    train(model, opt, x, y, epochs=1, tracer=tracer)
    live = reptrace.open(run).info()
    assert (live["state"], live["locked"]) == ("recording", True)
    committed = live["last_step"]
    opt.zero_grad()
    loss = F.cross_entropy(model(x[:8]), y[:8]) * float("nan")
    loss.backward()
    with pytest.raises(reptrace.RecordError, match="non-finite loss nan"):
        tracer.step(loss, np.arange(8), y[:8])
    info = reptrace.open(run).info()
    assert info["status"] == "aborted"
    assert (info["state"], info["locked"]) == ("aborted", False)
    assert info["last_step"] == committed
    assert all(c["status"] != "FAIL" for c in reptrace.open(run).verify())
    with pytest.raises(reptrace.RecordError, match="finished"):
        tracer.step(loss, np.arange(8), y[:8])


def test_queries_run_under_the_memory_limit_of_the_environment(tmp_path, data, monkeypatch):
    x, y, _, _ = data
    run = tmp_path / "limits"
    model, opt, tracer = traced_model(str(run), seed=5)
    train(model, opt, x, y, epochs=1, tracer=tracer)
    tracer.finish()
    r = reptrace.open(run)
    q = "SELECT count(*) AS n FROM updates"
    n = pa.table(r.sql(q))["n"][0].as_py()
    assert n > 0
    monkeypatch.setenv("REPTRACE_MEMORY_LIMIT", "lots")
    with pytest.raises(reptrace.InvalidInput, match='invalid REPTRACE_MEMORY_LIMIT "lots"'):
        r.sql(q)
    monkeypatch.setenv("REPTRACE_MEMORY_LIMIT", "64MiB")
    monkeypatch.setenv("REPTRACE_SPILL_DIR", str(tmp_path / "spill"))
    assert pa.table(r.sql(q))["n"][0].as_py() == n
    assert list((tmp_path / "spill").iterdir()) == []
    monkeypatch.setenv("REPTRACE_SPILL_DIR", str(run / "spill"))
    with pytest.raises(reptrace.InvalidInput, match="is inside the run"):
        r.sql(q)
    assert not (run / "spill").exists()


def test_analysis_errors_are_python_exceptions(tmp_path):
    with pytest.raises(reptrace.AnalysisError, match="no such run directory"):
        reptrace.open(tmp_path / "missing")


def test_probes_added_to_a_completed_run(tmp_path, data):
    """Probes added long after training, to a model rebuilt from the run's
    final weights: the new rows equal what the tracer records before finish()
    for the same inputs, p equals (W_T − W_0)·a + (b_T − b_0) computed from
    the weights files, nothing already in the run changes, and the new
    probes can be attributed (completeness holds for them)."""
    x, y, xt, yt = data
    run = tmp_path / "run"
    model, opt, tracer = traced_model(run, seed=6, make=ResCNN, lr=0.05, momentum=0.9)
    train(model, opt, x[:640], y[:640], epochs=2, tracer=tracer)
    first = np.arange(2000, 2010)
    tracer.finish(probes=(xt[:10], yt[:10], first))
    before = files_of(run)
    commits = len(manifest(run)["commits"])

    # Later, elsewhere: the model rebuilt from the run's final weights.
    fresh = ResCNN()
    final = safetensors(run / "weights" / "final.safetensors")
    fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in final.items()})
    r = reptrace.open(run)
    added = r.add_probes(fresh, xt[:30], yt[:30])
    assert added == list(range(2010, 2040)), "new ids start above every probe and instance id"

    assert files_of(run).items() >= before.items(), "files already in the run changed"
    m = manifest(run)
    assert len(m["commits"]) == commits + 1
    new = m["commits"][-1]
    assert new.get("weights") is None
    assert {f["table"] for f in new["files"]} == {"probes"}
    assert sorted(f["layer"] for f in new["files"]) == sorted(r.layers)

    probes = table(run, "probes").to_pandas()
    for layer in r.layers:
        rows = probes[probes.layer == layer].set_index("probe_id")
        for old, again in zip(first, added[:10]):
            assert np.array_equal(rows.loc[old, "a"], rows.loc[again, "a"]), layer
            assert np.array_equal(rows.loc[old, "p"], rows.loc[again, "p"]), layer
            assert rows.loc[old, "predicted"] == rows.loc[again, "predicted"]
    head = probes[probes.layer == "head"].set_index("probe_id")
    w0 = safetensors(run / "weights" / "initial.safetensors")
    dw = final["head.weight"].astype(np.float64) - w0["head.weight"]
    db = final["head.bias"].astype(np.float64) - w0["head.bias"]
    for pid in added[10:15]:
        a = np.asarray(head.loc[pid, "a"], dtype=np.float64)
        want = dw @ a + db
        got = np.asarray(head.loc[pid, "p"], dtype=np.float64)
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6), pid
    with torch.no_grad():
        predicted = fresh.eval()(xt[10:30]).argmax(dim=1).numpy()
    assert np.array_equal(head.loc[added[10:], "predicted"].to_numpy(), predicted)

    r.attribute(probes=added[12:14])
    checks = r.verify()
    assert [c for c in checks if c["status"] == "FAIL"] == [], checks
    shares = r.query("class_shares", probe=added[12]).to_pandas().groupby("layer").share.sum()
    assert len(shares) == len(r.layers) and (abs(shares - 1.0) < 1e-6).all(), shares

    # The tracer itself adds to its finished run the same way.
    more = tracer.add_probes(xt[30:32], yt[30:32])
    assert more == [2040, 2041]


def test_adding_probes_refuses_bad_input_and_leaves_the_run_as_it_was(tmp_path, data):
    x, y, xt, yt = data
    torch.manual_seed(7)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    untrained = copy.deepcopy(model)
    run = tmp_path / "run"
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES)
    train(model, opt, x[:256], y[:256], epochs=1, tracer=tracer)
    tracer.finish(probes=(xt[:4], yt[:4], [5000, 5001, 5002, 5003]))
    before = files_of(run)
    m_before = manifest(run)
    r = reptrace.open(run)
    with pytest.raises(reptrace.InvalidInput, match="fc1.*differs from the run's final weights"):
        r.add_probes(untrained, xt[:4], yt[:4])
    with pytest.raises(reptrace.InvalidInput, match="probe id 5001 is already a probe id"):
        r.add_probes(model, xt[:2], yt[:2], ids=[6000, 5001])
    with pytest.raises(reptrace.InvalidInput, match="'fc1' .*not a module of the model"):
        r.add_probes(nn.Sequential(), xt[:2], yt[:2])
    with pytest.raises(reptrace.InvalidInput, match="3 inputs and 2 labels"):
        r.add_probes(model, xt[:3], yt[:2])
    with pytest.raises(reptrace.InvalidInput, match="labels value 12 is out of range"):
        r.add_probes(model, xt[:2], torch.tensor([1, 12]))
    assert files_of(run) == before and manifest(run) == m_before

    from reptrace import _reptrace

    holder = _reptrace.ProbeAppender(str(run))  # holds the run's lock
    with pytest.raises(reptrace.InvalidInput, match="another process is writing to this run"):
        r.add_probes(model, xt[:2], yt[:2])
    holder.discard()
    assert r.add_probes(model, xt[:2], yt[:2]) == [5004, 5005]

    aborted = tmp_path / "aborted"
    m2 = copy.deepcopy(untrained)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    t2 = reptrace.Tracer(m2, opt2, aborted, classes=CLASSES)
    train(m2, opt2, x[:128], y[:128], epochs=1, tracer=t2)
    t2.abort("stopped")
    with pytest.raises(reptrace.InvalidInput, match="completed run; this run is aborted"):
        reptrace.open(aborted).add_probes(m2, xt[:2], yt[:2])


def test_attribute_waits_for_a_probe_appender(tmp_path, data):
    """`attribute` writes its manifest entry under the run's lock: while an
    appender holds it, attribute waits, and it finishes only after the
    appender lets go (a 10-step run attributes in well under a second)."""
    import threading
    import time

    from reptrace import _reptrace

    x, y, xt, yt = data
    run = tmp_path / "run"
    model, opt, tracer = traced_model(run, seed=8)
    train(model, opt, x[:640], y[:640], epochs=1, tracer=tracer)
    tracer.finish(probes=(xt[:2], yt[:2], [7000, 7001]))
    r = reptrace.open(run)
    holder = _reptrace.ProbeAppender(str(run))
    done = []
    worker = threading.Thread(target=lambda: done.append((r.attribute(probes=[7000]), time.monotonic())))
    worker.start()
    time.sleep(1.5)
    released = time.monotonic()
    holder.discard()
    worker.join(120)
    assert done, "attribute did not finish"
    assert done[0][1] >= released, "attribute wrote its manifest while the lock was held"
    assert manifest(run)["attributions"][-1]["probes"] == "ids:7000"


@pytest.mark.parametrize("mode", ["instance", "batch"])
def test_examples_rows_equal_the_losses_of_each_forward_pass(tmp_path, data, mode):
    """The `examples` table holds, per step and member, the loss and the
    prediction of that step's forward pass: recomputed here with PyTorch
    (cross_entropy without reduction) before each update."""
    x, y, _, _ = data
    torch.manual_seed(3)
    model = MLP()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if mode == "instance"
           else torch.optim.Adam(model.parameters(), lr=0.01))
    want = {}

    def on_step(step, rows):
        with torch.no_grad():
            out = model(x[rows])
            want[step] = (rows.numpy(), F.cross_entropy(out, y[rows], reduction="none").numpy(),
                          out.argmax(1).numpy())

    run = str(tmp_path / mode)
    tracer = reptrace.Tracer(model, opt, run, classes=CLASSES, mode=mode)
    train(model, opt, x, y, epochs=2, tracer=tracer, on_step=on_step)
    tracer.finish()
    t = table(run, "examples").to_pandas()
    assert len(t) == 2 * TRAIN_ROWS
    assert sorted(t["step"].unique()) == sorted(want)
    for step, (ids, loss, predicted) in want.items():
        rows = t[t["step"] == step]
        assert rows["instance_id"].tolist() == ids.tolist(), f"step {step}: the batch's order"
        assert rows["label"].tolist() == y[ids].tolist()
        np.testing.assert_allclose(rows["loss"], loss, rtol=0, atol=1e-5)
        np.testing.assert_allclose(rows["p_label"], np.exp(-loss), rtol=0, atol=1e-5)
        assert rows["predicted"].tolist() == predicted.tolist()
    # The canned queries read it: every training instance is in the data map.
    dm = reptrace.Run(run).query("data_map").to_pandas()
    assert len(dm) == TRAIN_ROWS and set(dm["region"]) <= {"easy", "ambiguous", "hard"}


def test_logits_of_the_wrong_shape_are_refused(tmp_path, data):
    x, y, _, _ = data
    model, _, tracer = traced_model(str(tmp_path / "run"))
    out = model(x[:8])
    loss = F.cross_entropy(out, y[:8])
    loss.backward()
    with pytest.raises(reptrace.InvalidInput, match=r"logits: shape \(8, 5\)"):
        tracer.step(loss, range(8), y[:8], logits=out[:, :5])
    tracer.abort("test")


def test_info_tells_a_killed_recording_from_a_live_one(tmp_path):
    """A process that dies while recording leaves status "recording" without
    a live lock: info() says "killed", and the run reads to its last commit."""
    run = tmp_path / "killed"
    script = f"""
import os, torch, reptrace
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
tracer = reptrace.Tracer(model, opt, {str(run)!r}, classes=["a", "b", "c"])
x, y = torch.randn(8, 4), torch.arange(8) % 3
for epoch in range(2):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    tracer.step(loss, range(8), y)
    tracer.end_epoch()
os._exit(9)
"""
    subprocess.run([sys.executable, "-c", script], check=False, timeout=120)
    info = reptrace.open(run).info()
    assert (info["status"], info["state"], info["locked"]) == ("recording", "killed", False)
    assert info["last_step"] == 1


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_an_uncompressed_recording_compacts_to_the_same_rows(tmp_path, data, dtype):
    """`compression="none"` writes plain, uncompressed parts; `reptrace.compact`
    rewrites them in zstd as one commit: same rows, reconstruction and verify
    as a run recorded with zstd, and no larger."""
    import pyarrow.parquet as pq

    x, y, _, _ = data
    runs = {}
    for compression in ("none", "zstd"):
        torch.manual_seed(5)
        model = MLP()
        initial = start_weights(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        run = str(tmp_path / compression)
        # The threads kept: the tracer lowers them with zstd only, and the
        # rows are compared bit for bit.
        tracer = reptrace.Tracer(model, opt, run, classes=CLASSES, dtype=dtype,
                                 compression=compression, torch_threads=None)
        train(model, opt, x, y, epochs=2, tracer=tracer)
        tracer.finish()
        runs[compression] = run

    def committed(run):
        m = manifest(run)
        return [f for c in m["commits"] for f in c["files"] + c.get("probes", [])]

    def codecs(run):
        return {pq.ParquetFile(f"{run}/{f['path']}").metadata.row_group(0).column(i).compression
                for f in committed(run) for i in range(2)}

    keys = {"steps": ["step"], "examples": ["step", "instance_id"],
            "updates": ["layer", "step", "instance_id"]}

    def rows(run):
        return {t: table(run, t).sort_by([(k, "ascending") for k in ks]) for t, ks in keys.items()}

    plain, zstd = runs["none"], runs["zstd"]
    assert codecs(plain) == {"UNCOMPRESSED"}
    before = rows(plain)
    assert before == rows(zstd), "the encoding changes no value"
    done = reptrace.compact(plain)
    assert done["files"] == len(committed(zstd)) and done["bytes_after"] < done["bytes_before"], done
    assert codecs(plain) == {"ZSTD"}
    assert rows(plain) == before
    size = lambda run: sum(f["bytes"] for f in committed(run))  # noqa: E731
    assert size(plain) <= 1.01 * size(zstd), (size(plain), size(zstd))
    if dtype == "f32":  # (f16 records are rounded: verify bounds them)
        assert_reconstructs(plain, model, initial)
    checks = reptrace.open(plain).verify()
    assert all(c["status"] in ("pass", "skip") for c in checks), checks
    assert reptrace.compact(plain)["files"] == 0
    with pytest.raises(reptrace.InvalidInput, match="compression"):
        reptrace.Tracer(MLP(), opt, str(tmp_path / "bad"), classes=CLASSES, compression="lz4")


def test_a_cpu_linear_layers_records_are_pytorchs_products_bit_for_bit(tmp_path, data,
                                                                      monkeypatch):
    """On the CPU a float32 Linear layer's ``v = −lr·κ·δ`` is multiplied by
    the recorder as it copies δ (``Recorder.updates(scale=...)``): the
    stored rows are, bit for bit, the input and PyTorch's product
    ``δ * (−lr)``, taken by a hook of the test's own, and the same as the
    rows of the path that multiplies with a tensor operation."""
    x, y, _, _ = data
    runs, seen = {}, []
    for path in ("recorder", "tensor"):
        if path == "tensor":
            monkeypatch.setattr(reptrace._kinds.Linear, "stores_v", lambda self, spec: False)
        torch.manual_seed(3)
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.07)
        first = next(m for m in model.modules() if isinstance(m, nn.Linear))
        grads, inputs = [], []

        def keep(module, args, out, inputs=inputs, grads=grads):
            inputs.append(args[0].detach().clone())
            out.register_hook(lambda g: grads.append(g.detach().clone()))

        first.register_forward_hook(keep)
        run = str(tmp_path / path)
        tracer = reptrace.Tracer(model, opt, run, classes=CLASSES, torch_threads=None)
        for step in range(3):
            idx = np.arange(step * 32, step * 32 + 32)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            tracer.step(None, idx, y[idx])
        tracer.finish()
        runs[path] = run
        seen.append((inputs, grads))
    name = next(n for n, m in MLP().named_modules() if isinstance(m, nn.Linear))
    rows = {path: table(run, "updates").filter(pa.compute.equal(
        table(run, "updates")["layer"], name)).sort_by([("step", "ascending"),
                                                        ("instance_id", "ascending")])
        for path, run in runs.items()}
    assert rows["recorder"] == rows["tensor"], "both paths store the same rows"
    inputs, grads = seen[0]
    for step in range(3):
        at = rows["recorder"].filter(pa.compute.equal(rows["recorder"]["step"], step))
        u = np.array(at["u"].to_pylist(), dtype=np.float32)
        v = np.array(at["v"].to_pylist(), dtype=np.float32)
        assert np.array_equal(u, inputs[step].numpy())
        assert np.array_equal(v, (grads[step] * -0.07).numpy()), step


# What copies a tensor's value to the host: on a GPU each call waits for the
# device (a synchronisation).
_HOST_READS = ("cpu", "item", "tolist", "__float__", "__int__", "__bool__")


@pytest.mark.parametrize("labels_as", ["numpy", "tensor"])
@pytest.mark.parametrize("follow", [False, True], ids=["step", "follow_optimizer"])
def test_a_traced_step_reads_the_device_once(tmp_path, data, monkeypatch, follow, labels_as):
    """A step's loss, its examples' losses and predictions and the gradient
    check's terms reach the host in one copy (on a GPU: one synchronisation
    per step; the factors' copies are waited for a step later); labels
    given as tensors (on a GPU: on the device) add one copy per step, for
    every micro-batch's ids and labels together. Counted on the CPU by the
    calls that would each wait for a GPU, in steady-state steps (the first
    starts the recorder), with two micro-batches per step under
    follow_optimizer; the records are the same as reading each value on
    its own (the examples equal the model's cross-entropy and argmax, the
    steps' losses the sums of the micro-batches' losses). The CPU's own
    one-call paths (the extension's check and examples) are turned off, so
    that the path a GPU takes runs here."""
    monkeypatch.setattr(_torch, "_ON_HOST", False)
    x, y, _, _ = data
    run = str(tmp_path / "run")
    model, opt, tracer = traced_model(run, seed=3)
    if follow:
        tracer.follow_optimizer()
    reads = []

    def counting(name, original):
        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)
        return read

    micro = 2 if follow else 1
    per_step, logits_seen, losses = [], [], []
    for step in range(6):
        rows = np.arange(step * 32, step * 32 + 32)
        opt.zero_grad()
        parts = np.split(rows, micro)
        step_loss = 0.0
        for part in parts:
            logits = model(x[part])
            logits_seen.append((part, logits.detach().clone()))
            loss = F.cross_entropy(logits, y[part]) / micro
            loss.backward()
            step_loss += float(loss)
            if follow:
                labels = y[part] if labels_as == "tensor" else y[part].numpy()
                with monkeypatch.context() as m:
                    for name in _HOST_READS:
                        m.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
                    tracer.batch(torch.as_tensor(part) if labels_as == "tensor" else part,
                                 labels, loss=loss)
        losses.append(step_loss)
        with monkeypatch.context() as m:
            for name in _HOST_READS:
                m.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
            if follow:
                opt.step()
            else:
                labels = y[rows] if labels_as == "tensor" else y[rows].numpy()
                tracer.step(loss, rows, labels)
            per_step.append(list(reads))
            reads.clear()
    tracer.finish()
    want = ["cpu"] * (2 if labels_as == "tensor" else 1)
    assert all(r == want for r in per_step[1:]), per_step
    ex = table(run, "examples").sort_by([("step", "ascending"), ("instance_id", "ascending")])
    want_loss = torch.cat([F.cross_entropy(lg, y[p], reduction="none") for p, lg in logits_seen])
    want_pred = torch.cat([lg.argmax(dim=1) for _, lg in logits_seen])
    np.testing.assert_allclose(ex["loss"].to_numpy(), want_loss.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(ex["predicted"].to_numpy(), want_pred.numpy())
    assert ex["instance_id"].to_pylist() == list(range(6 * 32))
    steps = table(run, "steps").sort_by("step")
    np.testing.assert_allclose(steps["loss"].to_numpy(), losses, rtol=1e-6)


@pytest.mark.parametrize("positions", [1, 37])
@pytest.mark.parametrize("bias", [True, False])
def test_the_host_gradient_check_computes_what_pytorch_computes(bias, positions):
    """`_reptrace.check_terms` (a CPU layer's check in one call: a Linear's
    one position per row, a convolution's unfolded positions) against the
    same products in PyTorch float64, with the direction it drew recovered
    from an identity layer of the same seed."""
    from reptrace import _reptrace

    g = torch.Generator().manual_seed(3)
    out, n_in, n = 37, 300, 21
    gw, gb = torch.randn(out, n_in, generator=g), torch.randn(out, generator=g)
    u = torch.randn(n, n_in, positions, generator=g)
    d = torch.randn(n, out, positions, generator=g)
    seed = 12345
    # a = I r_w + r_b·e with an identity weight and a bias gradient e of
    # zeros and a last one: the direction itself.
    eye = np.eye(n_in + 1, n_in, dtype=np.float32)
    e = np.zeros(n_in + 1, dtype=np.float32)
    e[n_in] = 1.0
    probe = _reptrace.check_terms(eye, e, np.zeros((1, n_in, 1), np.float32),
                                  np.zeros((1, n_in + 1, 1), np.float32), seed)
    r = torch.from_numpy(probe[:n_in + 1].copy())
    rw, rb = r[:n_in], (r[n_in] if bias else torch.tensor(0.0, dtype=torch.float64))
    assert rw.abs().max() < 1 and rw.std() > 0.3, "the direction is spread over (-1, 1)"
    got = _reptrace.check_terms(gw.numpy(), gb.numpy() if bias else None, u.numpy(),
                                d.numpy(), seed)
    gw64, gb64, u64, d64 = gw.double(), gb.double(), u.double(), d.double()
    s = torch.einsum("ikp,k->ip", u64, rw) + rb
    a = gw64 @ rw + (rb * gb64 if bias else 0)
    norm2 = gw64.square().sum() + (gb64.square().sum() if bias else 0)
    f = torch.einsum("icp,ip->c", d64, s)
    m = torch.einsum("icp,ip->c", d64.abs(), s.abs())
    want = torch.cat([a, f, m, norm2.reshape(1)]).numpy()
    assert got.shape == want.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # Non-contiguous or mis-shaped arrays: one clear error naming the argument.
    with pytest.raises(reptrace.InvalidInput, match="gw: the array must be C-contiguous"):
        _reptrace.check_terms(np.asfortranarray(gw.numpy()), None, u.numpy(), d.numpy(), seed)
    with pytest.raises(reptrace.InvalidInput, match="u: 299 values per position"):
        _reptrace.check_terms(gw.numpy(), None, u.numpy()[:, 1:].copy(), d.numpy(), seed)
    with pytest.raises(reptrace.InvalidInput, match="g: shape"):
        _reptrace.check_terms(gw.numpy(), None, u.numpy(), d.numpy()[:, 1:].copy(), seed)


def test_the_strided_unfold_is_f_unfold_bit_for_bit():
    """The conv layers' inputs are unfolded as a copy of a strided view
    (faster on a CPU than F.unfold): the same values, bit for bit, over
    kernels, strides, paddings and dilations, for contiguous, channels-last
    and sliced inputs."""
    from reptrace._kinds import _unfold

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 13, 11, generator=g)
    inputs = [x, x.to(memory_format=torch.channels_last), x[:, 1:3, 2:, :-1]]
    for a in inputs:
        for kernel in [(1, 1), (3, 3), (2, 5)]:
            for stride in [(1, 1), (2, 3)]:
                for padding in [(0, 0), (1, 2)]:
                    for dilation in [(1, 1), (2, 1)]:
                        want = F.unfold(a, kernel, dilation=dilation, padding=padding,
                                        stride=stride)
                        got = _unfold(a, kernel, stride, padding, dilation)
                        assert got.shape == want.shape, (kernel, stride, padding, dilation)
                        assert torch.equal(got, want), (kernel, stride, padding, dilation)
