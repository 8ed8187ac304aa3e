"""Pytest hooks and fixtures of the Python tests (their helpers are in kit.py).

scripts/test.sh sets REPTRACE_BIN (the built `reptrace` binary),
REPTRACE_CARGO_TARGET (the cargo target dir) and optionally
REPTRACE_SYNTHETIC_BIN (the built `synthetic` example of reptrace-record).
Without them the fixtures fall back to the default debug build in target/.

With REPTRACE_NO_SKIPS=1 (scripts/test.sh sets it, so CI has it) a skipped
test is reported as failed: a machine without Java, say, must not pass CI
by skipping the Spark tests.
"""
import os
import subprocess
from pathlib import Path

import pytest

from kit import TRAIN_ROWS, binary, digits, reptrace_cli, require_subcommands

SNIPPETS = Path(__file__).resolve().parent / "snippets"

# pytester: tests/python/test_docs.py runs an inner pytest session.
pytest_plugins = ["pytester"]

NO_SKIPS = os.environ.get("REPTRACE_NO_SKIPS") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under REPTRACE_NO_SKIPS=1, a skip is a failure that says why."""
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"skipped, and REPTRACE_NO_SKIPS=1 allows no skip: {reason} "
            "(scripts/setup.sh installs what the tests need)"
        )


@pytest.fixture(scope="session")
def reptrace_bin() -> Path:
    """Path of the `reptrace` binary."""
    return binary("REPTRACE_BIN", "reptrace")


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> Path:
    """A run written by the recorder's `synthetic` example into a temp dir."""
    exe = binary("REPTRACE_SYNTHETIC_BIN", "examples/synthetic")
    run = tmp_path_factory.mktemp("synthetic") / "run"
    subprocess.run([str(exe), str(run)], check=True, capture_output=True)
    return run


@pytest.fixture(scope="session")
def digits_run(reptrace_bin, tmp_path_factory) -> Path:
    """A small digits MLP run (2 epochs, probes of every instance), attributed
    for three test and two training probes."""
    import pyarrow.dataset as ds

    require_subcommands(reptrace_bin, "train", "attribute", "sql", "query")
    run = tmp_path_factory.mktemp("digits") / "run"
    reptrace_cli(
        reptrace_bin, "train", "--model", "mlp", "--data", "digits", "--epochs", "2",
        "--batch-size", "64", "--probes", "all", "--threads", "1", "--out", run,
    )
    probes = ds.dataset(run / "probes", format="parquet", partitioning="hive").to_table(
        columns=["probe_id", "instance_id"]
    ).to_pandas().drop_duplicates()
    instances = ds.dataset(run / "instances", format="parquet").to_table().to_pandas()
    split = dict(zip(instances["instance_id"], instances["split"]))
    probes = probes.sort_values("probe_id")
    import pandas as pd

    # Test probes carry no instance id (they are not training instances).
    test = [int(p) for p, i in zip(probes["probe_id"], probes["instance_id"]) if pd.isna(i) or split.get(i) == "test"]
    train = [int(p) for p, i in zip(probes["probe_id"], probes["instance_id"]) if split.get(i) == "train"]
    assert len(test) >= 3 and len(train) >= 2, "the run must have test and training probes"
    ids = test[:3] + train[:2]
    reptrace_cli(reptrace_bin, "attribute", run, "--probes", "ids:" + ",".join(map(str, ids)))
    return run


@pytest.fixture(scope="session")
def batch_run(reptrace_bin, tmp_path_factory) -> Path:
    """A small digits MLP run in batch mode with Adam (2 epochs, mixed
    batches), attributed for probes 1437, 1500 and 1600."""
    run = tmp_path_factory.mktemp("batch") / "run"
    reptrace_cli(
        reptrace_bin, "train", "--model", "mlp", "--data", "digits", "--epochs", "2",
        "--batch-size", "64", "--mode", "batch", "--optimizer", "adam", "--lr", "0.01",
        "--threads", "1", "--out", run,
    )
    reptrace_cli(reptrace_bin, "attribute", run, "--probes", "ids:1437,1500,1600")
    return run


@pytest.fixture(scope="session")
def attributed_probes(digits_run):
    """The probe ids attributed in `digits_run`, sorted (read from contributions)."""
    import pyarrow.dataset as ds

    t = ds.dataset(digits_run / "contributions", format="parquet", partitioning="hive")
    return sorted(set(t.to_table(columns=["probe_id"]).column("probe_id").to_pylist()))


@pytest.fixture(scope="session")
def snippets():
    """The documentation's snippets (tests/python/snippets) importable by name."""
    import sys

    if str(SNIPPETS) not in sys.path:
        sys.path.insert(0, str(SNIPPETS))
    return SNIPPETS


@pytest.fixture(scope="session")
def spark(snippets):
    """One local Spark session for the whole test session (needs Java 17+)."""
    import shutil

    if shutil.which("java") is None:
        pytest.skip("Spark tests need a Java runtime (java not on PATH)")
    from spark_views import spark_session

    session = spark_session()
    yield session
    session.stop()


@pytest.fixture(scope="module")
def data():
    """The bundled digits split as `reptrace train` splits them:
    (x_train, y_train, x_test, y_test)."""
    x, y = digits()
    return x[:TRAIN_ROWS], y[:TRAIN_ROWS], x[TRAIN_ROWS:], y[TRAIN_ROWS:]
