"""reptrace.Tracer under torch.distributed: two processes launched by
torchrun (gloo on the CPU) train with DistributedDataParallel and record
into one run (tests/python/examples/ddp_digits.py).

The reference for the per-example factors is the same training in this
process over the same global batches (each rank's local batch is a
contiguous part of the global one, so the ranks' batches concatenated in
rank order are the global batch): DDP averages the ranks' gradients, so a
rank's record of an example must equal that example's record in one
process whose loss is the mean over the global batch."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F

import kit
import reptrace

SCRIPT = Path(__file__).resolve().parent / "examples" / "ddp_digits.py"
ROWS, BATCH, WORLD = 768, 64, 2


# How torchrun reports a rank aborted by SIGABRT (seen: C++'s std::terminate,
# "terminate called without an active exception", in torch's process group).
SIGABRT = "Signal 6 (SIGABRT)"


def torchrun(*args, script=SCRIPT, timeout=150):
    """Runs `script` under torchrun (2 processes); the completed process.
    The processes import the reptrace package this test imported."""
    env = dict(os.environ)
    package = str(Path(reptrace.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package, env.get("PYTHONPATH", "")])
    env["PYTHONFAULTHANDLER"] = "1"  # a crashing rank shows where
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--standalone", "--monitor-interval", "0.2", str(script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=kit.ROOT)
    if proc.returncode != 0 and SIGABRT in proc.stderr and "panicked" not in proc.stderr:
        # Now and then, under a loaded test session, a rank is aborted by
        # C++ code of torch's process group (std::terminate: a thread
        # destroyed while running; a Rust panic would say "panicked"): run
        # it once more from scratch, and say so.
        print(f"torchrun: a rank was aborted ({SIGABRT}); running again:\n{proc.stderr[:2000]}")
        shutil.rmtree(args[0], ignore_errors=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=kit.ROOT)
    if proc.returncode != 0 and "Fatal Python error" in proc.stderr:
        # A rank that crashed: its faulthandler dump first (else cut off).
        at = proc.stderr.index("Fatal Python error")
        proc.stderr = proc.stderr[at:at + 2500] + "\n…\n" + proc.stderr[-500:]
    return proc


def one_process(run, make, epochs):
    """The same training in one process over the global batches, traced."""
    x, y = kit.digits()
    x, y = x[:ROWS], y[:ROWS]
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracer = reptrace.Tracer(model, opt, run, classes=kit.CLASSES)
    tracer.instances(torch.arange(ROWS), y, split="train")
    for epoch in range(epochs):
        for rows in kit.batches(ROWS, BATCH, epoch):
            opt.zero_grad()
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            tracer.step(None, rows, y[rows])
        tracer.end_epoch()
    x_all, y_all = kit.digits()
    tests = torch.arange(kit.TRAIN_ROWS, kit.TRAIN_ROWS + 40)
    tracer.finish(probes=(x_all[tests], y_all[tests], tests))
    return model


def records(run):
    """layer → (step, instance_id, rank, u, v) of every record, sorted by
    step and instance."""
    t = kit.table(run, "updates")
    out = {}
    for layer in sorted(set(t["layer"].to_pylist())):
        rows = t.filter(pc.equal(t["layer"], layer))
        key = np.lexsort((rows["instance_id"].to_numpy(), rows["step"].to_numpy()))
        out[layer] = (
            rows["step"].to_numpy()[key],
            rows["instance_id"].to_numpy()[key],
            np.array(rows["rank"].to_pylist(), dtype=object)[key],
            np.array(rows["u"].to_pylist(), dtype=np.float64)[key],
            np.array(rows["v"].to_pylist(), dtype=np.float64)[key],
        )
    return out


def expected_ranks(epochs):
    """(step, instance_id) → the rank that processed it."""
    out = {}
    step = 0
    for epoch in range(epochs):
        for rows in kit.batches(ROWS, BATCH, epoch):
            part = len(rows) // WORLD
            for r in range(WORLD):
                for i in rows[r * part:(r + 1) * part].tolist():
                    out[(step, i)] = r
            step += 1
    return out


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_ddp_run_verifies_rebuilds_and_equals_one_process(tmp_path, model):
    epochs = 2
    run = tmp_path / "ddp"
    proc = torchrun(run, "--model", model, "--epochs", epochs, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    make = kit.MLP if model == "mlp" else kit.ResCNN

    # verify passes, every layer's completeness enforced.
    kit.completeness(run)
    m = kit.manifest(run)
    assert m["format_version"] == reptrace.FORMAT_VERSION == 11
    assert m["status"] == "complete"
    assert m["settings"]["world_size"] == WORLD
    # Every rank's parts are listed, and nothing else is on disk.
    listed = {f["path"] for c in m["commits"] for f in c["files"]}
    assert any("-rank1.parquet" in p for p in listed)
    on_disk = {str(p.relative_to(run)) for p in run.rglob("*.parquet")}
    assert on_disk == listed

    # DDP's averaging is known, not fitted: no step needed a scale κ.
    scales = kit.table(run, "layer_steps")["grad_scale"].to_numpy()
    assert len(scales) and np.all(scales == 1.0), np.unique(scales)

    # W_T rebuilt from the records (an oracle independent of reptrace).
    saved = torch.load(tmp_path / "weights.pt")
    trained = make()
    trained.load_state_dict(saved["final"])
    kit.assert_reconstructs(run, trained, saved["initial"], tolerance=1e-5)

    # The same training in one process: same steps, same records.
    single = tmp_path / "single"
    reference = one_process(single, make, epochs)
    for name, p in reference.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), saved["final"][name].numpy(),
                                   rtol=0, atol=1e-5, err_msg=name)
    got, want = records(run), records(single)
    assert got.keys() == want.keys() and len(got) == len(m["model"]["modules"])
    ranks = expected_ranks(epochs)
    for layer in got:
        step, ids, rank, u, v = got[layer]
        s_step, s_ids, s_rank, s_u, s_v = want[layer]
        assert len(step) == ROWS * epochs
        np.testing.assert_array_equal(step, s_step)
        np.testing.assert_array_equal(ids, s_ids)
        # Each record carries the rank that processed its example; a
        # single-process run's carry none.
        assert [ranks[(int(s), int(i))] for s, i in zip(step, ids)] == rank.tolist()
        assert set(s_rank.tolist()) == {None}
        for what, a, b in (("u", u, s_u), ("v", v, s_v)):
            if b.size == 0:  # u of a layer whose records are whole updates
                assert a.size == 0, f"{layer}.{what}"
                continue
            scale = np.abs(b).max()
            diff = np.abs(a - b).max()
            assert diff <= 1e-5 * max(scale, 1.0), f"{layer}.{what}: {diff:.2e} ({scale:.2e})"
        assert np.linalg.norm(v - s_v) <= 1e-5 * np.linalg.norm(s_v), layer

    # The rest reads like the single-process run: steps (global batch
    # size and loss), examples (every example once per step).
    steps, s_steps = kit.table(run, "steps"), kit.table(single, "steps")
    assert steps["batch_size"].to_pylist() == s_steps["batch_size"].to_pylist()
    np.testing.assert_allclose(steps["loss"].to_numpy(), s_steps["loss"].to_numpy(),
                               rtol=1e-5)
    ex, s_ex = kit.table(run, "examples"), kit.table(single, "examples")
    assert sorted(zip(ex["step"].to_pylist(), ex["instance_id"].to_pylist())) == sorted(
        zip(s_ex["step"].to_pylist(), s_ex["instance_id"].to_pylist()))
    # Questions get the answers of the single-process run.
    for probe in (kit.TRAIN_ROWS, kit.TRAIN_ROWS + 7):
        mine = reptrace.open(run).query("top_proponents", probe=probe, k=5).to_pydict()
        theirs = reptrace.open(single).query("top_proponents", probe=probe, k=5).to_pydict()
        assert mine["instance_id"] == theirs["instance_id"], (mine, theirs)
        assert mine["layer"] == theirs["layer"] and mine["records"] == theirs["records"]
        np.testing.assert_allclose(mine["influence"], theirs["influence"], rtol=1e-4)
    # And through the package: the rank is a column like any other.
    per_rank = reptrace.open(run).sql(
        "SELECT rank, count(*) AS n FROM updates GROUP BY rank ORDER BY rank").to_pydict()
    n_layers = len(got)
    assert per_rank == {"rank": [0, 1], "n": [ROWS * epochs * n_layers // 2] * 2}


def test_a_killed_rank_leaves_the_run_at_its_last_commit(tmp_path):
    run = tmp_path / "ddp"
    steps_per_epoch = ROWS // BATCH
    kill_at = steps_per_epoch + 3  # rank 1 dies in the second epoch
    proc = torchrun(run, "--epochs", 3, "--kill-at", kill_at)
    assert proc.returncode != 0
    m = kit.manifest(run)
    assert m["status"] in ("recording", "aborted"), m["status"]
    last = [c for c in m["commits"] if c.get("step") is not None][-1]
    assert last["step"] == steps_per_epoch - 1, "the commit at the end of epoch 0"
    # Readable and verified up to it: both ranks' records of epoch 0, none later.
    checks = reptrace.open(run).verify()
    assert not [c for c in checks if c["status"] == "FAIL"], checks
    weights = [c for c in checks if c["name"].endswith(" weights")]
    assert weights and all(c["status"] == "pass" for c in weights), weights
    per_rank = reptrace.open(run).sql(
        "SELECT rank, max(step) AS last, count(*) AS n FROM updates WHERE layer = 'fc1' "
        "GROUP BY rank ORDER BY rank").to_pydict()
    assert per_rank == {"rank": [0, 1], "last": [steps_per_epoch - 1] * 2,
                        "n": [ROWS // 2] * 2}


def test_ranks_tracing_different_layers_are_refused_on_every_rank(tmp_path):
    run = tmp_path / "ddp"
    proc = torchrun(run, "--rank1-layers", "fc1,fc2", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [(tmp_path / f"refused-{r}.txt").read_text() for r in range(WORLD)]
    assert lines[0] == lines[1] and "\n" not in lines[0], lines
    assert "rank 1 traces fc1 (Linear 32×64), fc2 (Linear 16×32)" in lines[0], lines[0]
    assert "rank 0 fc1 (Linear 32×64), fc2 (Linear 16×32), fc3 (Linear 10×16)" in lines[0]
    assert not run.exists() or not any(run.iterdir()), "nothing was written"


def test_the_documented_example_runs_on_two_ranks(tmp_path):
    """docs/python.md shows tests/python/examples/ddp_minimal.py (checked by
    test_python_docs.py); it runs as shown and its run verifies."""
    run = tmp_path / "ddp"
    proc = torchrun(run, script=SCRIPT.parent / "ddp_minimal.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [l.split() for l in proc.stdout.splitlines()[-2:]] == [
        ["0", "0", "2872"], ["1", "1", "2872"]], proc.stdout
    kit.completeness(run)


def test_a_step_that_does_not_add_up_is_refused_on_every_rank(tmp_path):
    """Gradient values clipped at a step of the second epoch: the records of
    both ranks together no longer sum to the applied update, every rank
    refuses in the same line, and the run stays at its last commit."""
    run = tmp_path / "ddp"
    steps_per_epoch = ROWS // BATCH
    proc = torchrun(run, "--clip-value-at", steps_per_epoch + 2, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [(tmp_path / f"refused-{r}.txt").read_text() for r in range(WORLD)]
    assert lines[0] == lines[1] and "\n" not in lines[0], lines
    assert f"at step {steps_per_epoch + 2}" in lines[0], lines[0]
    assert "differs from the sum of the recorded per-example gradients" in lines[0]
    m = kit.manifest(run)
    assert m["status"] == "aborted" and "at step" in m["abort_reason"], m["abort_reason"]
    assert [c for c in m["commits"] if c.get("step") is not None][-1]["step"] == \
        steps_per_epoch - 1
    checks = reptrace.open(run).verify()
    assert not [c for c in checks if c["status"] == "FAIL"], checks
    # Nothing uncommitted is left behind by either rank.
    assert not [c for c in checks if c["status"] == "warn"], checks


def test_batch_mode_records_each_step_once_and_every_ranks_members(tmp_path):
    """Batch mode under DDP: rank 0 records each step's whole update (the
    same on every rank), every rank the members it processed."""
    run = tmp_path / "ddp"
    proc = torchrun(run, "--mode", "batch", "--epochs", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kit.completeness(run)
    steps = ROWS // BATCH
    updates = kit.table(run, "updates")
    assert updates.num_rows == steps * 3 and set(updates["rank"].to_pylist()) == {0}
    members = kit.table(run, "batches")
    assert sorted(zip(members["step"].to_pylist(), members["instance_id"].to_pylist())) == \
        sorted(expected_ranks(1))
