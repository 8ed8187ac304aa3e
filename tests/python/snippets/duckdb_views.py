# Register every table of a run as a DuckDB view with the same name, over
# exactly the files the manifest lists as committed (rows a running recorder
# has not committed yet stay invisible), and run a canned query with DuckDB's
# own named parameters ($probe in the .sql file binds {"probe": ...}).
import json
from pathlib import Path

import duckdb

TABLES = [
    "instances", "steps", "updates", "probes", "contributions", "batches", "influence", "examples",
    "layer_steps",
]
PARTITIONED = {"updates", "probes", "contributions", "influence"}
OWN_CONTRIBUTIONS = (
    "SELECT c.* FROM contributions c JOIN probes p "
    "ON p.layer = c.layer AND p.probe_id = c.probe_id WHERE c.instance_id = p.instance_id"
)


def committed_files(run, table):
    """The committed files of a table, from the manifest (commits and attributions).

    A writer renames a part to its final name just after the manifest that
    lists it is written; if it was killed in between, the part is still under
    its temporary name `.NAME.tmp` (any reptrace command renames it)."""
    manifest = json.loads((Path(run) / "manifest.json").read_text())
    entries = [f for c in manifest["commits"] for f in c["files"]]
    # Format 5 keeps every attribution; format 4 and older had one.
    for a in manifest.get("attributions", []) + [manifest.get("attribution") or {}]:
        entries += a.get("files", [])
    paths = [Path(run).resolve() / f["path"] for f in entries if f["table"] == table]
    return [str(p if p.exists() else p.with_name(f".{p.name}.tmp")) for p in paths]


def view_statements(run):
    """The CREATE VIEW statements of the run's tables (also for the duckdb CLI)."""
    out = []
    for table in TABLES:
        files = committed_files(run, table)
        if not files:
            continue  # e.g. contributions not materialised, batches in instance mode
        hive = table in PARTITIONED
        options = ", hive_partitioning = true, hive_types = {'layer': VARCHAR}" if hive else ""
        out.append(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({files!r}{options})")
    if committed_files(run, "contributions"):
        # Each training probe with its own instance's records (self_influence).
        out.append(f"CREATE VIEW own_contributions AS {OWN_CONTRIBUTIONS}")
    return out


def duckdb_connect(run):
    """An in-memory DuckDB connection with the run's tables as views."""
    con = duckdb.connect()
    for statement in view_statements(run):
        con.execute(statement)
    return con


def duckdb_query(con, sql_file, params):
    """Runs a canned query file with named parameters: (column names, rows)."""
    result = con.execute(Path(sql_file).read_text(), params)
    return [d[0] for d in result.description], result.fetchall()
