"""Contributions on Spark (reptrace.spark) beside DataFusion on the same run.

    python scripts/bench/spark.py --bin target/release/reptrace-torch [--epochs E] [--probes P] [--repeats R]

Trains a digits MLP with ``reptrace train`` (E epochs, batch 32, probes of
every example), then computes the contributions of P test probes to every
traced layer, residual rows included, both ways, alternating, R times each:

- DataFusion: ``reptrace.open(run).sql("SELECT COUNT(*), SUM(dot) FROM
  contributions WHERE probe_id IN (…)")`` (computed on demand, in-process);
- Spark local[2]: ``reptrace.spark.contributions(...)`` aggregated the same
  way, the JVM already up (one warm-up job first);

and materialised as an attribution (per record) of a copy of the run, both ways:
``Run.attribute(probes="ids:…")`` (DataFusion's process) and
``reptrace.spark.attribute(...)`` (computed and written by the executors).

The rate is records × probes per second (every update record of the run
met by every probe). Prints a table and one line for scripts/bench.sh:
``BENCH spark records=N probes=P datafusion_pairs_per_s=A spark_pairs_per_s=B ratio=B/A attribute_ratio=C``
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

import reptrace
from reptrace import spark as rs

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python" / "snippets"))
from spark_views import spark_session  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "reptrace-torch"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="reptrace-bench-spark-"))
    run = work / "run"
    subprocess.run(
        [args.bin, "train", "--model", "mlp", "--data", "digits", "--epochs", str(args.epochs),
         "--batch-size", "32", "--probes", "all", "--threads", "1", "--out", str(run)],
        check=True, capture_output=True,
    )
    m = json.loads((run / "manifest.json").read_text())
    records = sum(f["rows"] for c in m["commits"] for f in c["files"] if f["table"] == "updates")
    probes = list(range(1437, 1437 + args.probes))  # test probes of the digits split
    ids = ", ".join(map(str, probes))
    datafusion_sql = f"SELECT COUNT(*) AS n, SUM(dot) AS s FROM contributions WHERE probe_id IN ({ids})"

    def datafusion():
        t = pa.table(reptrace.open(run).sql(datafusion_sql)).to_pylist()[0]
        return t["n"], t["s"]

    spark = spark_session()

    def on_spark():
        from pyspark.sql import functions as F

        r = rs.contributions(spark, run, probes).agg(
            F.count(F.lit(1)).alias("n"), F.sum("dot").alias("s")
        ).collect()[0]
        return r.n, r.s

    attr_ids = "ids:" + ",".join(map(str, probes))
    # A copy for the attributions: the queries' run keeps none (materialised
    # rows would be read instead of computed).
    materialised = work / "materialised"
    shutil.copytree(run, materialised)

    def attribute_datafusion():
        reptrace.open(materialised).attribute(probes=attr_ids)

    def attribute_spark():
        rs.attribute(spark, materialised, probes)

    want = datafusion()
    got = on_spark()  # warm-up: the JVM and the Python workers up
    assert got[0] == want[0] and abs(got[1] - want[1]) <= 1e-9 * abs(want[1]), (got, want)
    attribute_spark()  # warm-up
    runs = (
        ("datafusion", datafusion), ("spark", on_spark),
        ("attribute datafusion", attribute_datafusion), ("attribute spark", attribute_spark),
    )
    times = {name: [] for name, _ in runs}
    for _ in range(args.repeats):
        for name, f in runs:
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    spark.stop()
    pairs = records * len(probes)
    rate = {k: pairs / statistics.median(v) for k, v in times.items()}
    print(f"run: digits MLP, {args.epochs} epochs, {records} update records, {len(probes)} probes, "
          f"{want[0]} rows, {os.cpu_count()} cores")
    print("| engine | median s | records × probes / s |")
    print("|---|---:|---:|")
    for k in times:
        print(f"| {k} | {statistics.median(times[k]):.2f} | {rate[k] / 1e6:.2f} M |")
    print(f"BENCH spark records={records} probes={len(probes)} "
          f"datafusion_pairs_per_s={rate['datafusion']:.0f} spark_pairs_per_s={rate['spark']:.0f} "
          f"ratio={rate['spark'] / rate['datafusion']:.3f} "
          f"attribute_ratio={rate['attribute spark'] / rate['attribute datafusion']:.3f}")


if __name__ == "__main__":
    main()
