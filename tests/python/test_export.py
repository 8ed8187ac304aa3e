"""`reptrace export`: a table written to Parquet, CSV and JSON Lines reads
back equal (pandas, pyarrow) to the run's own files; --where and --columns
select what they say; mistakes are one clear line naming what is wrong."""
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from kit import materialised_ids, reptrace_cli, require_subcommands

KEY = ["layer", "probe_id", "step", "instance_id"]


@pytest.fixture(scope="module", autouse=True)
def has_export(reptrace_bin):
    require_subcommands(reptrace_bin, "export")


@pytest.fixture(scope="module")
def contributions(digits_run, snippets):
    from open_pandas import open_pandas

    df = open_pandas(digits_run, "contributions")
    return df.sort_values(KEY, na_position="first").reset_index(drop=True)


def normalise(df):
    """Sorted, `layer` as str, integer columns with NULLs as float64 (NaN)."""
    df = df.copy()
    df["layer"] = df["layer"].astype(str)
    for c in ["step", "epoch", "instance_id", "label"]:
        df[c] = pd.to_numeric(df[c], errors="raise").astype("float64")
    return df.sort_values(KEY, na_position="first").reset_index(drop=True)[sorted(df.columns)]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_contributions_round_trip(reptrace_bin, digits_run, contributions, tmp_path, fmt):
    out = tmp_path / f"contributions.{fmt}"
    # The materialised probes (contributions of any other probe would be
    # computed on demand): the rows the files hold.
    ids = materialised_ids(digits_run)
    where = f"probe_id IN ({', '.join(map(str, ids))})"
    proc = reptrace_cli(reptrace_bin, "export", digits_run, "--table", "contributions",
                        "--where", where, "--format", fmt, "--out", out)
    assert f"exported {len(contributions)} rows" in proc.stdout
    if fmt == "parquet":
        f = pq.ParquetFile(out)
        assert f.metadata.row_group(0).column(0).compression == "ZSTD"
        assert f.metadata.metadata[b"reptrace.export.table"] == b"contributions"
        back = f.read().to_pandas()
    elif fmt == "csv":
        back = pd.read_csv(out, float_precision="round_trip")
    else:
        back = pd.DataFrame([json.loads(line) for line in out.read_text().splitlines()])
    assert sorted(back.columns) == sorted(contributions.columns)
    got, want = normalise(back), normalise(contributions)
    # Exact: the float columns' text is the shortest form of each f64.
    pd.testing.assert_frame_equal(got, want, check_exact=True, check_dtype=False)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_list_columns_with_where_and_columns(reptrace_bin, digits_run, snippets, tmp_path, fmt):
    from open_pandas import open_pandas

    updates = open_pandas(digits_run, "updates")
    layer = sorted(updates["layer"].astype(str).unique())[-1]
    want = updates[(updates["layer"].astype(str) == layer) & (updates["step"] < 3)]
    want = want.sort_values(["step", "instance_id"]).reset_index(drop=True)
    assert len(want) > 0
    out = tmp_path / f"updates.{fmt}"
    reptrace_cli(
        reptrace_bin, "export", digits_run, "--table", "updates",
        "--where", f"layer = '{layer}' AND step < 3",
        "--columns", "step,instance_id,u,v,layer", "--format", fmt, "--out", out,
    )
    if fmt == "csv":
        back = pd.read_csv(out)
        assert list(back.columns) == ["step", "instance_id", "u", "v", "layer"]
        assert back["u"].iloc[0].startswith("[")
        for c in ["u", "v"]:
            back[c] = back[c].map(json.loads)
    else:
        lines = out.read_text().splitlines()
        back = pd.DataFrame([json.loads(line) for line in lines])
        assert list(back.columns) == ["step", "instance_id", "u", "v", "layer"]
    back = back.sort_values(["step", "instance_id"]).reset_index(drop=True)
    assert (back["layer"] == layer).all()
    assert back["step"].tolist() == want["step"].tolist()
    assert back["instance_id"].tolist() == want["instance_id"].tolist()
    for c in ["u", "v"]:
        for got, stored in zip(back[c], want[c]):
            # The text reads back to exactly the stored f32 values.
            np.testing.assert_array_equal(np.asarray(got, dtype=stored.dtype), stored)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--table", "nope"], ["nope"]),
        (["--table", "contributions", "--where", "dot +"], ["where", "dot +"]),
        (["--table", "contributions", "--where", "dot * 2"], ["where", "boolean", "contributions"]),
        (["--table", "contributions", "--where", "nosuch > 1"], ["where", "nosuch"]),
        (["--table", "contributions", "--where", "probe_id IN (SELECT probe_id FROM probes)"], ["where", "subqueries"]),
        (["--table", "contributions", "--where", "SUM(dot) > 0"], ["where", "aggregate"]),
        (["--table", "steps", "--columns", "step,nosuch"], ["columns", "nosuch", "steps"]),
        (["--table", "steps", "--format", "xlsx"], ["format", "xlsx"]),
    ],
)
def test_mistakes_are_one_clear_line(reptrace_bin, digits_run, tmp_path, args, words):
    if "--format" not in args:
        args = [*args, "--format", "csv"]
    out = tmp_path / "x.csv"
    proc = reptrace_cli(reptrace_bin, "export", digits_run, *args, "--out", out, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_output_is_never_inside_the_run_nor_replaced_silently(reptrace_bin, digits_run, tmp_path):
    base = ["export", digits_run, "--table", "steps", "--format", "csv", "--out"]
    inside = reptrace_cli(reptrace_bin, *base, digits_run / "steps.csv", check=False)
    assert inside.returncode == 1 and "inside the run" in inside.stderr
    assert not (digits_run / "steps.csv").exists()
    out = tmp_path / "steps.csv"
    out.write_text("keep me")
    again = reptrace_cli(reptrace_bin, *base, out, check=False)
    assert again.returncode == 1 and "--force" in again.stderr
    assert out.read_text() == "keep me"
    reptrace_cli(reptrace_bin, *base, out, "--force")
    assert out.read_text().startswith("step,epoch,lr,batch_size,loss")
