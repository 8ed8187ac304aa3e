# Open a table of a run with polars (lazily). `layer` is read from the Hive
# path as a string.
import polars as pl

PARTITIONED = {"updates", "probes", "contributions", "influence"}


def open_polars(run, table):
    """A polars LazyFrame over one table of the run."""
    if table in PARTITIONED:
        return pl.scan_parquet(
            f"{run}/{table}/layer=*/*.parquet",
            hive_partitioning=True,
            hive_schema={"layer": pl.String},
        )
    return pl.scan_parquet(f"{run}/{table}/*.parquet")
