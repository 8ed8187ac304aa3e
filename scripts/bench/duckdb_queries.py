"""Canned queries on DuckDB: the median time of every query of queries/
over a run's tables, in-process, over exactly the Parquet files DataFusion
reads (the manifest's committed files, tests/python/snippets/duckdb_views.py).

    .venv/bin/python scripts/bench/duckdb_queries.py RUN --probe P [--repeats N]

Same parameters as crates/analyze/benches/queries.rs (probe, k = 10,
bins = 20), one untimed run per query first, then the median of N timed
runs of execute + fetchall. Prints a table and, per query, one line
`BENCH query engine=duckdb name=NAME rows=R median_s=S repeats=N`.
"""
import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python" / "snippets"))

import duckdb  # noqa: E402
from duckdb_views import duckdb_connect  # noqa: E402


SQL_TYPES = {"int64": "BIGINT", "int32": "INTEGER", "float64": "DOUBLE", "float32": "FLOAT",
             "string": "VARCHAR", "list<float64>": "DOUBLE[]", "list<$dtype>": "FLOAT[]"}


def add_empty_views(con):
    """A view of no rows, with the table's columns (schemas/TABLE.json), for
    every table the run has no file of (`batches` in instance mode), as the
    reptrace engine registers it: the queries that read it then run."""
    have = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    for path in sorted((ROOT / "schemas").glob("*.json")):
        schema = json.loads(path.read_text())
        table = schema.get("table")
        if not table or table in have:
            continue
        cols = [f"CAST(NULL AS {SQL_TYPES[c['type']]}) AS {c['name']}" for c in schema["columns"]]
        if schema.get("partitioned_by"):
            cols.append(f"CAST(NULL AS VARCHAR) AS {schema['partitioned_by']}")
        con.execute(f"CREATE VIEW {table} AS SELECT {', '.join(cols)} WHERE false")


def declared_params(text):
    """{name: default or None} from the `-- param: NAME (TYPE[, default D])` header lines."""
    found = re.findall(r"^--\s*param:\s*(\w+)\s*\([^,)]*(?:,\s*default\s*([^)]*))?\)", text, re.M)
    return {name: (default.strip() or None) for name, default in found}


def number(text):
    """A header default as DuckDB should bind it: an integer where it is one."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--probe", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    con = duckdb_connect(args.run)
    add_empty_views(con)
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    chosen = {"probe": args.probe, "k": 10, "bins": 20}
    print(
        f"canned queries on DuckDB {duckdb.__version__}: {args.run}, probe {args.probe}, k 10, bins 20, "
        f"threads {threads}, median of {args.repeats}"
    )
    print(f"{'query':<22} {'rows':>7} {'median s':>10} {'min s':>10} {'max s':>10}")
    for path in sorted((ROOT / "queries").glob("*.sql")):
        text = path.read_text()
        # The bench's values, else the header's default (data_map's thresholds).
        params = {n: chosen.get(n, d) for n, d in declared_params(text).items()}
        params = {n: number(v) if isinstance(v, str) else v for n, v in params.items()}

        def once():
            start = time.perf_counter()
            rows = con.execute(text, params).fetchall()
            return time.perf_counter() - start, len(rows)

        _, rows = once()
        times = sorted(once()[0] for _ in range(max(args.repeats, 1)))
        med = statistics.median(times)
        print(f"{path.stem:<22} {rows:>7} {med:>10.4f} {times[0]:>10.4f} {times[-1]:>10.4f}")
        print(
            f"BENCH query engine=duckdb name={path.stem} rows={rows} "
            f"median_s={med:.6f} repeats={len(times)}"
        )


if __name__ == "__main__":
    main()
