# Register every table of a run as a Spark temporary view with the same name,
# over exactly the committed files (basePath makes `layer` a column), and run
# a canned query with Spark's named parameter markers: the files' `$probe`
# placeholders become `:probe`, and the values are bound, not spliced.
import os
import re
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from duckdb_views import OWN_CONTRIBUTIONS, PARTITIONED, TABLES, committed_files


def spark_session():
    """A quiet local Spark session (2 cores, no UI, few shuffle partitions);
    its Python workers run this interpreter (reptrace.spark's computations
    need pyarrow and reptrace there)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("reptrace")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def spark_register(spark, run):
    """Registers the run's tables as temporary views."""
    for table in TABLES:
        files = committed_files(run, table)
        if not files:
            spark.catalog.dropTempView(table)  # not left over from another run
            continue
        reader = spark.read
        if table in PARTITIONED:
            reader = reader.option("basePath", f"{Path(run).resolve()}/{table}")
        reader.parquet(*files).createOrReplaceTempView(table)
    if committed_files(run, "contributions"):
        spark.sql(OWN_CONTRIBUTIONS).createOrReplaceTempView("own_contributions")


def spark_query(spark, sql_file, params):
    """Runs a canned query file with named parameters: (column names, rows)."""
    sql = re.sub(r"\$([A-Za-z_]\w*)", r":\1", Path(sql_file).read_text())
    df = spark.sql(sql, args=params)
    return df.columns, [tuple(r) for r in df.collect()]
