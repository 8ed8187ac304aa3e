"""Contributions computed on Spark (reptrace.spark): in local mode and on a
standalone cluster of one master and two workers started here, against
DataFusion's on-demand rows and the CLI's answers; an attribution written
back from Spark; the one-line refusals."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import reptrace
from kit import ROOT, cli_json, reptrace_cli

PROBES = [1437, 1500, 1600]
KEY = ("probe_id", "layer", "step", "instance_id")


@pytest.fixture(scope="module")
def run(reptrace_bin, tmp_path_factory) -> Path:
    """The demo's digits MLP (3 epochs, batch 32, probes of every example)."""
    run = tmp_path_factory.mktemp("spark") / "run"
    reptrace_cli(
        reptrace_bin, "train", "--model", "mlp", "--data", "digits", "--epochs", "3",
        "--batch-size", "32", "--probes", "all", "--threads", "1", "--out", run,
    )
    return run


@pytest.fixture(scope="module")
def on_demand(run):
    """DataFusion's on-demand rows of the probes, keyed like Spark's."""
    sql = (
        "SELECT probe_id, layer, step, instance_id, epoch, label, dot, norm, cosine "
        f"FROM contributions WHERE probe_id IN ({', '.join(map(str, PROBES))})"
    )
    return {tuple(r[k] for k in KEY): r for r in pa.table(reptrace.open(run).sql(sql)).to_pylist()}


def tolerances(want, column):
    """Per row, how far another engine's value may be: 1e-9 of the value,
    and for a row that sums others (a key with a None: a probe's whole
    layer, all of an instance's steps) 1e-9 of the sum of their magnitudes.
    Float sums of the same terms in another order (Spark's tasks, DataFusion's
    batches, cut where the parts' row groups are) differ by a few ulps of
    that sum, however much the terms cancel."""
    magnitude = {}
    for k, w in want.items():
        if None not in k:
            magnitude[k[:2]] = magnitude.get(k[:2], 0.0) + abs(w[column])
    return {
        k: 1e-9 * max(abs(w[column]), magnitude.get(k[:2], 0.0) if None in k else 0.0, 1e-12)
        for k, w in want.items()
    }


def assert_same_rows(rows, want):
    got = {tuple(getattr(r, k) for k in KEY): r for r in rows}
    assert set(got) == set(want), (
        f"{len(set(want) - set(got))} rows missing, {len(set(got) - set(want))} extra"
    )
    tol = {c: tolerances(want, c) for c in ("dot", "norm", "cosine")}
    for k, w in want.items():
        g = got[k]
        assert (g.epoch, g.label) == (w["epoch"], w["label"]), k
        for c in ("dot", "norm", "cosine"):
            assert abs(getattr(g, c) - w[c]) <= tol[c][k], (k, c, getattr(g, c), w[c])


def tasks_of(spark, group):
    """Tasks of the stages of the jobs of a job group."""
    tracker = spark.sparkContext.statusTracker()
    stages = [s for j in tracker.getJobIdsForGroup(group) for s in tracker.getJobInfo(j).stageIds]
    return sum(tracker.getStageInfo(s).numTasks for s in stages)


def cli_query(reptrace_bin, run, name, probe):
    """A canned query's rows from the CLI (a NULL is a missing key)."""
    return cli_json(reptrace_bin, "query", run, name, "--param", f"probe={probe}", "--format", "json")


def canned(spark, name, params):
    """A canned query file run unchanged on Spark (`$p` markers become `:p`)."""
    import re

    sql = re.sub(r"\$([A-Za-z_]\w*)", r":\1", (ROOT / "queries" / f"{name}.sql").read_text())
    return [r.asDict() for r in spark.sql(sql, args=params).collect()]


def assert_same_answer(got, want, what):
    """Row for row; floats within 1e-9 of the column's scale."""
    assert len(got) == len(want), (what, len(got), len(want))
    floats = {k for r in got for k, v in r.items() if isinstance(v, float)}
    scale = {k: max([abs(r[k]) for r in got if r.get(k) is not None] + [1e-300]) for k in floats}
    for n, (g, w) in enumerate(zip(got, want)):
        for k in set(g) | set(w):
            a, b = g.get(k), w.get(k)
            if a is None or b is None:
                assert a is None and b is None, (what, n, k, a, b)
            elif k in floats:
                assert abs(a - b) <= 1e-9 * scale[k], (what, n, k, a, b)
            else:
                assert a == b, (what, n, k, a, b)


def test_contributions_on_spark_equal_datafusions(run, on_demand, spark):
    from reptrace import spark as rs

    spark.sparkContext.setJobGroup("reptrace-contributions", "contributions")
    df = rs.contributions(spark, run, PROBES)
    rows = df.collect()
    assert_same_rows(rows, on_demand)
    assert tasks_of(spark, "reptrace-contributions") >= 2
    # The scan of updates prunes the layer partitions.
    plan = df._jdf.queryExecution().executedPlan().toString()
    filters = [line for line in plan.splitlines() if "PartitionFilters" in line]
    assert filters and all("layer" in line.split("PartitionFilters")[1] for line in filters), plan


def test_canned_queries_run_unchanged_over_spark_rows(reptrace_bin, run, spark):
    from reptrace import spark as rs

    rs.register(spark, run, PROBES)
    for name in ("top_proponents", "class_shares"):
        for probe in PROBES:
            params = {"probe": probe} if name == "class_shares" else {"probe": probe, "k": 10}
            got = canned(spark, name, params)
            want = cli_query(reptrace_bin, run, name, probe)
            assert_same_answer(got, want, f"{name} {probe}")


def test_influence_sums_equal_the_clis(reptrace_bin, run, tmp_path, spark):
    from reptrace import spark as rs

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    reptrace_cli(reptrace_bin, "attribute", copy, "--probes", "ids:" + ",".join(map(str, PROBES)),
                 "--by", "epoch")
    want = {
        (r["probe_id"], r["layer"], r["epoch"], r["instance_id"]): r
        for r in pa.table(reptrace.open(copy).sql("SELECT * FROM influence")).to_pylist()
    }
    got = {
        (r.probe_id, r.layer, r.epoch, r.instance_id): r
        for r in rs.influence(spark, run, PROBES, by="epoch").collect()
    }
    assert set(got) == set(want)
    tol = tolerances(want, "dot")
    for k, w in want.items():
        assert got[k].records == w["records"], k
        assert abs(got[k].dot - w["dot"]) <= tol[k], (k, got[k].dot, w["dot"])


def materialised(run):
    """The committed contribution rows of a run, read with pyarrow."""
    m = json.loads((run / "manifest.json").read_text())
    files = [f for a in m["attributions"] for f in a["files"]]
    tables = []
    for f in files:
        t = pq.read_table(run / f["path"])
        tables.append(t.append_column("layer", pa.array([f["layer"]] * t.num_rows)))
    rows = pa.concat_tables(tables).to_pylist()
    return {(r["probe_id"], r["layer"], r["step"], r["instance_id"]): r for r in rows}


def test_an_attribution_written_back_reads_like_the_clis(reptrace_bin, run, tmp_path, spark):
    from reptrace import spark as rs

    ours, theirs = tmp_path / "spark", tmp_path / "cli"
    shutil.copytree(run, ours)
    shutil.copytree(run, theirs)
    summary = rs.attribute(spark, ours, PROBES)
    reptrace_cli(reptrace_bin, "attribute", theirs, "--probes", "ids:" + ",".join(map(str, PROBES)))
    assert summary["parts"] >= 2 and summary["probes"] == PROBES
    got, want = materialised(ours), materialised(theirs)
    assert set(got) == set(want) and summary["rows"] == len(want)
    tol = tolerances(want, "dot")
    for k, w in want.items():
        assert abs(got[k]["dot"] - w["dot"]) <= tol[k], (k, got[k]["dot"], w["dot"])
    # The CLI reads it (the manifest's attribution) and answers as on its own.
    for probe in PROBES:
        assert_same_answer(
            cli_query(reptrace_bin, ours, "top_proponents", probe),
            cli_query(reptrace_bin, theirs, "top_proponents", probe),
            f"top_proponents {probe}",
        )
    verify = reptrace.open(ours).verify()
    assert all(c["status"] != "FAIL" for c in verify), verify


def test_a_cancelled_job_leaves_the_run_unchanged(run, tmp_path, spark):
    from reptrace import spark as rs

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "manifest.json").read_bytes()
    # Many small partitions, so that the job is still running when cancelled.
    spark.conf.set("spark.sql.files.maxPartitionBytes", "64k")
    spark.conf.set("spark.sql.files.openCostInBytes", "1")
    stop = threading.Event()

    def cancel_on_first_part():
        while not stop.is_set():
            if any(p.name.endswith(".tmp") for p in (copy / "contributions").rglob("*")) if (
                copy / "contributions"
            ).exists() else False:
                spark.sparkContext.cancelAllJobs()
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=cancel_on_first_part)
    watcher.start()
    try:
        with pytest.raises(Exception, match="cancel"):
            rs.attribute(spark, copy, PROBES)
    finally:
        stop.set()
        watcher.join()
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
        spark.conf.unset("spark.sql.files.openCostInBytes")
    assert (copy / "manifest.json").read_bytes() == before
    left = [p for p in (copy / "contributions").rglob("*") if p.is_file()]
    assert left == [], left


def copy_with(run, to, **manifest):
    """A copy of `run` at `to` whose manifest has these fields changed."""
    shutil.copytree(run, to)
    m = json.loads((to / "manifest.json").read_text())
    m.update(manifest)
    (to / "manifest.json").write_text(json.dumps(m))
    return to


def test_bad_input_is_one_line(run, tmp_path, spark):
    from reptrace import spark as rs

    with pytest.raises(reptrace.InvalidInput) as e:
        rs.contributions(spark, run, [1437, 999999])
    assert "999999" in str(e.value) and "\n" not in str(e.value)
    # A float16 run: Spark cannot read its updates.
    with pytest.raises(reptrace.InvalidInput) as e:
        rs.contributions(spark, copy_with(run, tmp_path / "f16", dtype="f16"), PROBES)
    assert "float16" in str(e.value) and "\n" not in str(e.value)
    # A run whose recorder is alive.
    live = copy_with(run, tmp_path / "live", status="recording")
    import fcntl

    with open(live / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(reptrace.AnalysisError) as e:
            rs.contributions(spark, live, PROBES)
    assert "still being recorded" in str(e.value) and "\n" not in str(e.value)


# -- a standalone cluster: one master, two workers, on 127.0.0.1 -----------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executor_python(directory: Path) -> Path:
    """A Python for the executors that has pyarrow and the test packages but
    not reptrace: the package must reach them as a user ships it."""
    import site
    import venv

    venv.EnvBuilder(with_pip=False, symlinks=True).create(directory)
    packages = [p for p in site.getsitepackages() if p.endswith("site-packages")][0]
    ours = next((directory / "lib").glob("python*/site-packages"))
    # A .pth that adds the main environment's packages; the .pth files there
    # (reptrace's editable install among them) are not processed.
    (ours / "main_packages.pth").write_text(packages + "\n")
    return directory / "bin" / "python"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A standalone Spark cluster started for this module and stopped after."""
    import pyspark

    home = Path(pyspark.__file__).parent
    base = tmp_path_factory.mktemp("cluster")
    python = executor_python(base / "venv")
    port = free_port()
    env = dict(os.environ, SPARK_HOME=str(home), SPARK_LOG_DIR=str(base / "logs"),
               PYSPARK_PYTHON=str(python), SPARK_LOCAL_IP="127.0.0.1")
    env.pop("PYTHONPATH", None)
    spark_class = str(home / "bin" / "spark-class")
    procs = []

    def start(*args, log):
        out = open(base / log, "w")
        procs.append(subprocess.Popen([spark_class, *args], env=env, stdout=out, stderr=out,
                                      start_new_session=True))

    start("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
          "--webui-port", str(free_port()), log="master.log")
    master = f"spark://127.0.0.1:{port}"
    for i in range(2):
        start("org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "1",
              "--memory", "1g", "--webui-port", str(free_port()), "--work-dir",
              str(base / f"work{i}"), master, log=f"worker{i}.log")
    try:
        yield master, python
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
        # Nothing of the cluster is left: no process in the groups of the
        # master and the workers (their executors included).
        deadline = time.time() + 30
        alive = [p.pid for p in procs]
        while alive and time.time() < deadline:
            alive = [g for g in alive if group_alive(g)]
            time.sleep(0.2)
        for g in alive:
            os.killpg(g, 9)
        assert not alive, f"processes of the cluster left behind (groups {alive})"


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def test_a_standalone_cluster_computes_what_datafusion_does(run, on_demand, cluster, tmp_path):
    """In its own driver process (one SparkContext per process): first
    without the package on the executors, then with it shipped."""
    master, python = cluster
    out = tmp_path / "rows.parquet"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "python" / "examples" / "spark_cluster.py"),
         master, str(python), str(run), str(out), *map(str, PROBES)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "not importable" in report["without_package"], report
    assert "\n" not in report["without_package"], report
    assert report["tasks"] >= 2 and report["executors"] == 2, report
    rows = [type("Row", (), r)() for r in pq.read_table(out).to_pylist()]
    assert_same_rows(rows, on_demand)


def test_the_documented_snippet_answers_like_the_cli(reptrace_bin, run, spark, snippets, monkeypatch):
    from spark_scale_out import top_proponents_on_spark

    monkeypatch.chdir(ROOT)
    for _ in range(2):  # shipping twice is harmless
        got = [r.asDict() for r in top_proponents_on_spark(spark, run, PROBES, PROBES[1], k=5)]
    want = cli_json(reptrace_bin, "query", run, "top_proponents", "--param", f"probe={PROBES[1]}",
                    "--param", "k=5", "--format", "json")
    assert_same_answer(got, want, "snippet top_proponents")


def test_a_driver_killed_mid_write_leaves_the_manifest_unchanged(run, tmp_path):
    """kill -9 of the whole driver (and its JVM) while the executors write
    the parts: the manifest is byte for byte as before, and the run reads
    as before (the parts left under temporary names are not part of it)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "manifest.json").read_bytes()
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from spark_views import spark_session\n"
        "from reptrace import spark as rs\n"
        "spark = spark_session()\n"
        "spark.conf.set('spark.sql.files.maxPartitionBytes', '64k')\n"
        "spark.conf.set('spark.sql.files.openCostInBytes', '1')\n"
        "rs.attribute(spark, sys.argv[2], [int(p) for p in sys.argv[3:]])\n"
        "print('finished')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(ROOT / "tests" / "python" / "snippets"), str(copy),
         *map(str, PROBES)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 300
    parts = copy / "contributions"
    while time.time() < deadline and proc.poll() is None:
        if parts.exists() and any(p.name.endswith(".tmp") for p in parts.rglob("*")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the job ended before a part was written"
    os.killpg(proc.pid, 9)
    proc.wait()
    assert (copy / "manifest.json").read_bytes() == before
    got = pa.table(reptrace.open(copy).sql(
        f"SELECT COUNT(*) AS n FROM contributions WHERE probe_id = {PROBES[0]}"
    )).to_pylist()[0]["n"]
    want = pa.table(reptrace.open(run).sql(
        f"SELECT COUNT(*) AS n FROM contributions WHERE probe_id = {PROBES[0]}"
    )).to_pylist()[0]["n"]
    assert got == want


def test_the_package_archive_holds_the_package_and_is_made_once(tmp_path):
    """What `ship` sends: every file of the installed package (the compiled
    core byte for byte, no __pycache__), made once per process unless a
    directory is given."""
    import tarfile

    from reptrace import spark as rs

    first = rs.package_archive()
    assert rs.package_archive() == first
    given = rs.package_archive(tmp_path)
    assert Path(given).parent == tmp_path and given != first
    source = Path(reptrace.__file__).resolve().parent
    want = {str(Path("reptrace") / p.relative_to(source))
            for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    with tarfile.open(given) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
        assert names == want
        core = next(n for n in names if n.startswith("reptrace/_reptrace") and n.endswith(".so"))
        assert tar.extractfile(core).read() == (source / Path(core).name).read_bytes()
