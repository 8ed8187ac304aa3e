"""The driver of tests/python/test_spark.py's standalone cluster test, in a
process of its own (one SparkContext per process).

    spark_cluster.py MASTER EXECUTOR_PYTHON RUN OUT.parquet PROBE...

Asks for the contributions of the probes first without the package on the
executors (the one-line error is reported), then ships it
(reptrace.spark.ship) and writes the rows to OUT. Prints one JSON line."""
import json
import os
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import SparkSession

import reptrace
from reptrace import spark as rs

master, python, run, out, *probes = sys.argv[1:]
probes = [int(p) for p in probes]
os.environ["PYSPARK_PYTHON"] = python  # what the executors run
spark = (
    SparkSession.builder.master(master)
    .appName("reptrace-cluster-test")
    .config("spark.ui.enabled", "false")
    .config("spark.ui.showConsoleProgress", "false")
    .config("spark.driver.host", "127.0.0.1")
    .config("spark.executor.memory", "768m")
    .config("spark.executor.cores", "1")
    .config("spark.sql.shuffle.partitions", "2")
    .config("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
    .getOrCreate()
)
spark.sparkContext.setLogLevel("ERROR")
status = spark.sparkContext._jsc.sc()
deadline = time.time() + 120
while status.getExecutorMemoryStatus().size() < 3:  # the driver and two executors
    if time.time() > deadline:
        sys.exit("the cluster's two executors did not register within 120 s")
    time.sleep(0.5)

report = {"executors": status.getExecutorMemoryStatus().size() - 1}
try:
    rs.contributions(spark, run, probes).collect()
    report["without_package"] = "no error"
except reptrace.AnalysisError as e:
    report["without_package"] = str(e)

rs.ship(spark, rs.package_archive(tempfile.mkdtemp()))
spark.sparkContext.setJobGroup("reptrace-cluster", "contributions")
rows = rs.contributions(spark, run, probes).collect()
tracker = spark.sparkContext.statusTracker()
stages = [s for j in tracker.getJobIdsForGroup("reptrace-cluster") for s in tracker.getJobInfo(j).stageIds]
report["tasks"] = sum(tracker.getStageInfo(s).numTasks for s in stages)
pq.write_table(pa.Table.from_pylist([r.asDict() for r in rows]), out)
spark.stop()
print(json.dumps(report))
