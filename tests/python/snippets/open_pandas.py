# Open a table of a run with pyarrow and pandas. Partitioned tables (updates,
# probes, contributions) are Hive-partitioned by layer: `layer` comes back as
# a string column. Files whose name starts with "." (temporary files of a
# writer) are ignored by pyarrow.
import pyarrow as pa
import pyarrow.dataset as ds

PARTITIONED = {"updates", "probes", "contributions", "influence"}


def open_pyarrow(run, table):
    """A pyarrow dataset over one table of the run."""
    layer = ds.partitioning(pa.schema([("layer", pa.string())]), flavor="hive")
    return ds.dataset(
        f"{run}/{table}",
        format="parquet",
        partitioning=layer if table in PARTITIONED else None,
    )


def open_pandas(run, table):
    """A pandas DataFrame of one table of the run."""
    return open_pyarrow(run, table).to_table().to_pandas()
