"""Contributions computed on Spark's executors.

Spark scans the run's ``updates`` (only the committed files the manifest
lists, the ``layer`` partitions pruned); each partition's Arrow batches go
through the analyzer's own kernel, in the package's compiled core, with the
probes and the displacement scales sent to every executor once::

    from reptrace import spark as rs

    rs.ship(spark)                                   # the package to the executors
    rows = rs.contributions(spark, "runs/digits", probes=[1437, 1500])
    rs.register(spark, "runs/digits", probes=[1437, 1500])
    spark.sql("SELECT ... FROM contributions ...")   # queries/*.sql run unchanged
    rs.attribute(spark, "runs/digits", probes=[1437, 1500])   # written back

The arithmetic is not reimplemented here: Spark moves the rows and sums
them; every product is the Rust kernel's. pyspark is imported lazily: the
rest of reptrace does not need it. See docs/interop.md, "Scaling out on
Spark".
"""
from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from . import _reptrace
from ._reptrace import AnalysisError

__all__ = ["attribute", "contributions", "influence", "package_archive", "plan", "register", "ship"]

#: The columns of the rows computed: those of ``contributions`` and ``layer``.
CONTRIBUTIONS_SCHEMA = (
    "probe_id long, step long, epoch int, instance_id long, label int, "
    "dot double, norm double, cosine double, layer string"
)
#: The rows of ``influence`` (an aggregation by instance, or by instance and epoch).
INFLUENCE_SCHEMA = (
    "probe_id long, epoch int, instance_id long, label int, dot double, records long, layer string"
)
#: The name the package's archive is unpacked under on the executors.
ARCHIVE_NAME = "reptrace_package"
#: What an executor without the package says (the driver turns it into one line).
MISSING = "reptrace is not importable on this Spark executor"
_PARTIALS_SCHEMA = "layer string, sum binary"
_ENTRIES_SCHEMA = "entry string"
#: The archives package_archive() made in this process, by the package's files.
_ARCHIVES: dict = {}


def plan(run, probes, *, layers=None, steps=None) -> _reptrace.ShardTask:
    """The task the executors run: the probes' features, the displacement
    scales (and Adam's preconditioner) of every chosen layer. Refuses a run
    still being recorded, and a probe id the run lacks, with one line."""
    import json

    steps = None if steps is None else _steps(steps)
    if json.loads(_reptrace.manifest(str(run))).get("dtype") == "f16":
        # Spark 4 refuses Parquet's FLOAT16 columns (PARQUET_TYPE_ILLEGAL).
        raise _reptrace.InvalidInput(
            f"{run}: the run's updates are float16, which Spark cannot read (Parquet FLOAT16); "
            "compute its contributions with reptrace itself (Run.sql, Run.attribute)"
        )
    return _reptrace.ShardTask.plan(str(Path(run)), [int(p) for p in probes], layers, steps)


def package_archive(directory=None) -> str:
    """A ``.tar.gz`` of the installed ``reptrace`` package (its Python files
    and the compiled core), for executors that do not have it installed.
    The executors need the same platform and Python as this machine, and
    pyarrow. Without ``directory`` an archive this process made of the same
    files (names, sizes, modification times) is returned again."""
    import reptrace

    source = Path(reptrace.__file__).resolve().parent
    files = sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    key = tuple((str(p.relative_to(source)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    reuse = directory is None
    if reuse and Path(_ARCHIVES.get(key, "")).is_file():
        return _ARCHIVES[key]
    directory = Path(directory or tempfile.mkdtemp(prefix="reptrace-spark-"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "reptrace-package.tar.gz"
    # gzip level 1: the compiled core is most of the archive, and level 9
    # took ten times as long for a 13 % smaller file (33 s against 3.3 s for
    # a development build's 247 MB core).
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for file in files:
            tar.add(file, arcname=str(Path("reptrace") / file.relative_to(source)), recursive=False)
    if reuse:
        _ARCHIVES[key] = str(path)
    return str(path)


def ship(spark, archive=None) -> str:
    """Sends the package to the executors of ``spark`` (``SparkContext.addArchive``);
    the computations of this module then find it there. Returns the archive.
    Executors that have reptrace installed need no shipping."""
    archive = archive or package_archive()
    spark.sparkContext.addArchive(f"{archive}#{ARCHIVE_NAME}")
    return archive


def contributions(spark, run, probes, *, layers=None, steps=None, residual=True):
    """A Spark DataFrame of the contribution rows of ``probes`` (ids) at
    ``layers`` (every traced layer with probes when None), over the records
    of ``steps`` (``"A..B"`` inclusive, or a ``(first, last)`` pair), computed
    on the executors: the rows ``reptrace`` computes on demand, with a
    ``layer`` column. With ``residual`` each probe also gets its residual row
    (step NULL) per layer, which needs one pass summing every record."""
    task = plan(run, probes, layers=layers, steps=steps)
    return _contributions(spark, task, steps, residual)


def _contributions(spark, task, steps, residual=True):
    sent = spark.sparkContext.broadcast(task.to_bytes())
    compute = _executor_function("contributions", sent)
    rows = _updates(spark, task, steps).mapInArrow(compute, CONTRIBUTIONS_SCHEMA)
    if residual:
        rows = rows.unionByName(_residual_rows(spark, task, sent))
    return rows


def influence(spark, run, probes, *, by="instance", layers=None, steps=None):
    """The contributions summed per probe, layer and instance (``by="instance"``)
    or per probe, layer, instance and epoch (``by="epoch"``): the rows of
    ``reptrace attribute --by``, with ``records`` counting the records summed.
    The residual is its own row (instance, label and epoch NULL)."""
    if by not in ("instance", "epoch"):
        raise _reptrace.InvalidInput(f"by: {by!r}: expected instance or epoch")
    task = plan(run, probes, layers=layers, steps=steps)
    return _influence(_contributions(spark, task, steps), by)


def _influence(rows, by):
    from pyspark.sql import functions as F

    epoch = F.col("epoch") if by == "epoch" else F.lit(None).cast("int")
    keys = ["probe_id", "layer", "instance_id", "label", "epoch", "residual"]
    return (
        rows.select(
            "probe_id", "layer", "instance_id", "label", "dot",
            epoch.alias("epoch"), F.col("step").isNull().alias("residual"),
        )
        .groupBy(*keys)
        # The residual row counts no record.
        .agg(
            F.sum("dot").alias("dot"),
            F.sum(F.when(F.col("residual"), 0).otherwise(1)).cast("long").alias("records"),
        )
        .select("probe_id", "epoch", "instance_id", "label", "dot", "records", "layer")
    )


def register(spark, run, probes, *, layers=None, steps=None, views=True):
    """Registers the run's tables as Spark temporary views under their own
    names (over the committed files), with ``contributions`` (and
    ``own_contributions``) computed on the executors for ``probes``: the
    canned queries (``queries/*.sql``) then run unchanged. Returns the
    contributions DataFrame."""
    rows = contributions(spark, run, probes, layers=layers, steps=steps)
    if views:
        for table, files in _committed(run).items():
            if table in ("contributions", "influence"):
                continue
            reader = spark.read
            if table in ("updates", "probes"):
                reader = reader.option("basePath", str(Path(run).resolve() / table))
            reader.parquet(*files).createOrReplaceTempView(table)
    rows.createOrReplaceTempView("contributions")
    spark.sql(
        "SELECT c.* FROM contributions c JOIN probes p "
        "ON p.layer = c.layer AND p.probe_id = c.probe_id WHERE c.instance_id = p.instance_id"
    ).createOrReplaceTempView("own_contributions")
    return rows


def attribute(spark, run, probes, *, by="step", layers=None, steps=None) -> dict:
    """Computes the contributions of ``probes`` on the executors and commits
    them into the run as an attribution (per record, ``by="step"``, or summed
    ``by="instance"`` / ``"epoch"``): the same files and manifest commit as
    ``reptrace attribute``, so the CLI, DataFusion, DuckDB and pandas read
    them afterwards. The executors write the parts under temporary names;
    the driver commits them. A failed or cancelled job leaves the run as it
    was (its parts are removed). Returns a summary."""
    if by not in ("step", "instance", "epoch"):
        raise _reptrace.InvalidInput(f"by: {by!r}: expected step, instance or epoch")
    run = str(Path(run).resolve())
    task = plan(run, probes, layers=layers, steps=steps)
    first = _reptrace.first_part_seq(run)
    run_id = _run_id(run)
    if by == "step":
        # Computed and written in the same worker; the residual rows are the
        # driver's part, numbered after the workers'.
        sent = spark.sparkContext.broadcast(task.to_bytes())
        updates = _updates(spark, task, steps)
        partitions = updates.rdd.getNumPartitions()
        jobs = updates.mapInArrow(_writer_function(run, run_id, by, first, sent), _ENTRIES_SCHEMA)
    else:
        rows = _influence(_contributions(spark, task, steps), by)
        partitions = rows.rdd.getNumPartitions()
        jobs = rows.mapInArrow(_writer_function(run, run_id, by, first), _ENTRIES_SCHEMA)
    try:
        entries = [r.entry for r in _collect(jobs)]
        if by == "step":
            entries += _write_residual(spark, task, sent, run, run_id, first + partitions)
    except BaseException:
        _reptrace.discard_parts(run, by, task.layers, first, first + partitions)
        raise
    replaced = _reptrace.commit_parts(run, task, by, entries)
    return {
        "by": by,
        "probes": task.probe_ids,
        "layers": task.layers,
        "as_of_step": task.as_of,
        "parts": len(entries),
        "rows": sum(_entry_rows(e) for e in entries),
        "replaced": replaced,
    }


def _write_residual(spark, task, sent, run, run_id, seq) -> list:
    """The residual rows, written by the driver as part `seq` of each layer."""
    table = _residual_table(spark, task, sent)
    entries = []
    for layer in task.layers:
        writer = _reptrace.PartWriter(run, run_id, "step", layer, seq)
        writer.write(table.filter(pc.equal(table["layer"], layer)))
        entries.append(writer.finish())
    return entries


def _entry_rows(entry: str) -> int:
    import json

    return int(json.loads(entry)["rows"])


def _run_id(run) -> str:
    import json

    return json.loads(_reptrace.manifest(run))["run_id"]


def _steps(steps) -> str:
    if isinstance(steps, str):
        return steps
    first, last = steps
    return f"{'' if first is None else int(first)}..{'' if last is None else int(last)}"


def _committed(run) -> dict:
    """The committed files of each table (manifest commits and attributions)."""
    import json

    m = json.loads(_reptrace.manifest(str(run)))
    entries = [f for c in m["commits"] for f in c["files"]]
    for a in m.get("attributions", []):
        entries += a.get("files", [])
    out: dict = {}
    root = Path(run).resolve()
    for f in entries:
        path = root / f["path"]
        if not path.exists():  # committed, not yet renamed: its temporary name
            path = path.with_name(f".{path.name}.tmp")
        out.setdefault(f["table"], []).append(str(path))
    return out


def _updates(spark, task, steps=None):
    """The committed ``updates`` rows of the task's layers: partition
    filters on ``layer`` (and a filter on ``step``) that Spark pushes down."""
    from pyspark.sql import functions as F

    files = [f for layer in task.layers for f in task.update_files(layer)]
    if not files:
        raise AnalysisError("the run has no committed updates for the chosen layers")
    base = str(Path(files[0]).parent.parent)
    df = (
        spark.read.option("basePath", base)
        .parquet(*files)
        .select("step", "epoch", "instance_id", "label", "u", "v", "layer")
        .where(F.col("layer").isin(task.layers))
    )
    if steps is not None:
        first, last = _steps(steps).split("..")
        last = last.lstrip("=")
        if first:
            df = df.where(F.col("step") >= int(first))
        if last:
            df = df.where(F.col("step") <= int(last))
    return df


def _residual_rows(spark, task, sent):
    """One residual row per probe and layer: the executors sum every
    record's update of their partitions, the driver finishes the sums."""
    return spark.createDataFrame(_residual_table(spark, task, sent), CONTRIBUTIONS_SCHEMA)


def _residual_table(spark, task, sent, sums=None) -> pa.Table:
    """The residual rows of every layer of the task, on the driver."""
    if sums is None:
        partial = _executor_function("partial_sums", sent)
        sums = {}
        for row in _collect(_updates(spark, task).mapInArrow(partial, _PARTIALS_SCHEMA)):
            sums.setdefault(row.layer, []).append(bytes(row.sum))
    return pa.concat_tables(
        [pa.table(task.residual(layer, sums.get(layer, []))) for layer in task.layers]
    )


def _collect(df):
    """``df.collect()``, with an executor's failure to import reptrace said
    in one line."""
    try:
        return df.collect()
    except Exception as e:  # noqa: BLE001 - re-raised unless it is ours
        if MISSING in str(e):
            raise AnalysisError(
                f"{MISSING}: install it there, or call reptrace.spark.ship(spark) "
                "before computing (see docs/interop.md, Scaling out on Spark)"
            ) from None
        raise


def _core_importer():
    """A function that imports the package's core on an executor (from the
    shipped archive if it is not installed there). Built here so that it
    pickles by value with the functions that call it: an executor without
    reptrace cannot import this module."""
    archive = ARCHIVE_NAME
    missing = MISSING

    def core():
        import os
        import sys

        try:
            from reptrace import _reptrace
        except ImportError:
            from pyspark import SparkFiles

            path = os.path.join(SparkFiles.getRootDirectory(), archive)
            if os.path.isdir(path) and path not in sys.path:
                sys.path.insert(0, path)
            try:
                from reptrace import _reptrace
            except ImportError:
                raise RuntimeError(missing) from None
        return _reptrace

    def task_of(sent):
        # One decoded task per Python worker and broadcast (workers are reused).
        import hashlib
        import sys

        _reptrace = core()
        cache = sys.modules.setdefault("_reptrace_spark_tasks", type(sys)("_reptrace_spark_tasks"))
        data = sent.value
        key = "task_" + hashlib.sha1(data).hexdigest()
        task = getattr(cache, key, None)
        if task is None:
            task = _reptrace.ShardTask.from_bytes(data)
            setattr(cache, key, task)
        return task

    return core, task_of


def _executor_function(method, sent):
    """The function ``mapInArrow`` runs on the executors: the task's
    ``method`` on each batch."""
    _, task_of = _core_importer()

    def run(batches):
        import pyarrow as pa

        task = task_of(sent)
        if method == "contributions":
            for batch in batches:
                rows = pa.table(task.contributions(pa.Table.from_batches([batch])))
                # Batches of at most 64 Ki rows: the JVM takes them in pieces.
                yield from rows.to_batches(max_chunksize=1 << 16)
        else:
            sums: dict = {}
            for batch in batches:
                for layer, s in task.partial_sums(pa.Table.from_batches([batch])):
                    sums.setdefault(layer, []).append(s)
            layers = [layer for layer, parts in sums.items() for _ in parts]
            values = [s for parts in sums.values() for s in parts]
            yield pa.RecordBatch.from_pydict(
                {"layer": layers, "sum": values},
                schema=pa.schema([("layer", pa.string()), ("sum", pa.binary())]),
            )

    return run


def _writer_function(run, run_id, by, first, sent=None):
    """The function that writes a partition's rows as parts of an
    attribution (one per layer, numbered ``first`` + the partition) and
    yields their file entries. With ``sent`` (the task) its batches are
    ``updates`` rows whose contributions it computes and writes in the same
    worker: the rows never become Spark rows."""
    core, task_of = _core_importer()

    def write(batches):
        import pyarrow as pa
        import pyarrow.compute as pc
        from pyspark import TaskContext

        _reptrace = core()
        task = None if sent is None else task_of(sent)
        seq = first + TaskContext.get().partitionId()
        parts: dict = {}
        for batch in batches:
            table = pa.Table.from_batches([batch])
            if task is not None:
                table = pa.table(task.contributions(table))
            for layer in pc.unique(table["layer"]).to_pylist():
                rows = table.filter(pc.equal(table["layer"], layer))
                if layer not in parts:
                    parts[layer] = _reptrace.PartWriter(run, run_id, by, layer, seq)
                parts[layer].write(rows)
        entries = [w.finish() for w in parts.values()]
        yield pa.RecordBatch.from_pydict(
            {"entry": entries}, schema=pa.schema([("entry", pa.string())])
        )

    return write
