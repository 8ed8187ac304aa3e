# Contributions computed on Spark's executors (reptrace.spark): the package
# shipped to the executors, the run's tables registered as views with
# `contributions` computed for the probes asked about, a canned query run
# unchanged, and the rows committed into the run as an attribution that the
# CLI, DuckDB and pandas read afterwards.
from pathlib import Path

from reptrace import spark as rs


def top_proponents_on_spark(spark, run, probes, probe, k=10):
    """The rows of queries/top_proponents.sql for `probe`, computed on Spark."""
    rs.ship(spark)  # not needed where reptrace is installed on every executor
    rs.register(spark, run, probes)
    sql = Path("queries/top_proponents.sql").read_text().replace("$", ":")
    return spark.sql(sql, args={"probe": probe, "k": k}).collect()


def write_back(spark, run, probes):
    """Materialises the probes' contributions into the run (like `reptrace
    attribute`); a failed or cancelled job leaves the run as it was."""
    return rs.attribute(spark, run, probes)
