"""On a real (small) digits run, trained and attributed with the CLI, every
canned query of queries/ gives the same answer, row for row, on DuckDB and
Spark as on DataFusion (`reptrace query`). The helpers used come from tests/python/snippets, the
code docs/interop.md shows."""
import json
import math
import re

import pytest

from conftest import ROOT, reptrace

QUERIES = sorted((ROOT / "queries").glob("*.sql"))


@pytest.fixture(scope="module")
def duck(digits_run, snippets):
    from duckdb_views import duckdb_connect

    return duckdb_connect(digits_run)


# ---- canned queries ----------------------------------------------------------


def declared_params(sql_file):
    """{name: type} from the `-- param: NAME (TYPE[, default V]) doc` header lines."""
    found = re.findall(r"^--\s*param:\s*(\w+)\s*\((\w+)", sql_file.read_text(), re.M)
    return dict(found)


def param_values(sql_file, probe):
    """The same parameter values for every engine."""
    chosen = {"probe": probe, "k": 5, "bins": 8}
    params = declared_params(sql_file)
    assert set(params) <= set(chosen), f"{sql_file.name}: a parameter the harness does not know"
    return {name: chosen[name] for name in params}


def datafusion_query(reptrace_bin, run, sql_file, params):
    args = [a for n, v in params.items() for a in ("--param", f"{n}={v}")]
    # The file itself (not the embedded copy): the same text every engine runs.
    out = reptrace(reptrace_bin, "query", run, sql_file, *args, "--format", "json").stdout
    return json.loads(out) if out.strip() else []


def assert_same_answer(columns, rows, want, what):
    """Row for row: integers and strings equal, floats to 1e-9 of the column's scale."""
    assert len(rows) == len(want), f"{what}: {len(rows)} rows, DataFusion {len(want)}"
    for w in want:
        assert set(w) <= set(columns), f"{what}: DataFusion columns {sorted(w)} vs {columns}"
    scale = {
        c: max([abs(float(r[i])) for r in rows if isinstance(r[i], float)] + [1e-300])
        for i, c in enumerate(columns)
    }
    for n, (row, w) in enumerate(zip(rows, want)):
        for i, c in enumerate(columns):
            got, expected = row[i], w.get(c)
            if expected is None or got is None:
                assert expected is None and got is None, f"{what} row {n} {c}: {got!r} vs {expected!r}"
            elif isinstance(expected, float) or isinstance(got, float):
                assert math.isclose(float(got), float(expected), rel_tol=1e-9, abs_tol=1e-9 * scale[c]), (
                    f"{what} row {n} {c}: {got!r} vs DataFusion {expected!r}"
                )
            else:
                assert got == expected, f"{what} row {n} {c}: {got!r} vs DataFusion {expected!r}"


def test_every_query_has_a_test():
    assert {q.stem for q in QUERIES} >= {
        "top_proponents", "top_opponents", "class_shares", "class_shares_by_epoch",
        "cosine_histogram", "self_influence", "layer_summary",
    }


@pytest.mark.parametrize("sql_file", QUERIES, ids=lambda p: p.stem)
def test_query_on_duckdb(reptrace_bin, digits_run, attributed_probes, duck, sql_file):
    from duckdb_views import duckdb_query

    for probe in (attributed_probes[0], attributed_probes[-1]):
        params = param_values(sql_file, probe)
        want = datafusion_query(reptrace_bin, digits_run, sql_file, params)
        assert want, f"{sql_file.stem}: DataFusion returned no rows for {params}"
        columns, rows = duckdb_query(duck, sql_file, params)
        assert_same_answer(columns, rows, want, f"duckdb {sql_file.stem} {params}")


@pytest.mark.parametrize("sql_file", QUERIES, ids=lambda p: p.stem)
def test_query_on_spark(reptrace_bin, digits_run, attributed_probes, spark, sql_file):
    from spark_views import spark_query, spark_register

    spark_register(spark, digits_run)
    for probe in (attributed_probes[0], attributed_probes[-1]):
        params = param_values(sql_file, probe)
        want = datafusion_query(reptrace_bin, digits_run, sql_file, params)
        assert want, f"{sql_file.stem}: DataFusion returned no rows for {params}"
        columns, rows = spark_query(spark, sql_file, params)
        rows = [tuple(float(v) if hasattr(v, "as_tuple") else v for v in r) for r in rows]
        assert_same_answer(columns, rows, want, f"spark {sql_file.stem} {params}")
