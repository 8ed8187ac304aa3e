"""A run written by the Rust recorder opens in pyarrow and pandas as a
Hive-partitioned Parquet dataset, and agrees with `reptrace info --json`."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from kit import committed, info_json


def test_updates_rows_per_layer_match_info(reptrace_bin, synthetic_run):
    report = info_json(reptrace_bin, synthetic_run)
    want = {
        t["layer"]: t["rows"] for t in report["tables"] if t["table"] == "updates"
    }
    assert want and all(n > 0 for n in want.values())

    # The whole directory as a Hive-partitioned dataset: `layer` is a column.
    dataset = ds.dataset(
        synthetic_run / "updates", format="parquet", partitioning="hive"
    )
    table = dataset.to_table()
    assert "layer" in table.column_names
    df = table.to_pandas()
    got = df.groupby("layer", observed=True).size().to_dict()
    assert {str(k): int(v) for k, v in got.items()} == want

    # Only the committed files, through the manifest, give the same counts.
    files = committed(synthetic_run, "updates")
    df2 = ds.dataset(
        files, format="parquet", partitioning="hive", partition_base_dir=str(synthetic_run / "updates")
    ).to_table().to_pandas()
    assert df2.groupby("layer", observed=True).size().to_dict() == got


def test_schema_and_values(reptrace_bin, synthetic_run):
    report = info_json(reptrace_bin, synthetic_run)
    lens = {
        m["name"]: m["factor_lens"]
        for m in report["model"]["modules"]
        if m.get("factor_lens")
    }
    for path in committed(synthetic_run, "updates"):
        f = pq.ParquetFile(path)
        meta = f.metadata.metadata
        assert meta[b"reptrace.table"] == b"updates"
        assert meta[b"reptrace.run_id"] == report["run_id"].encode()
        layer = meta[b"reptrace.layer"].decode()
        t = f.read()
        assert t.schema.field("u").type == pa.list_(pa.field("item", pa.float32(), nullable=False))
        assert t.schema.field("step").type == pa.int64()
        df = t.to_pandas()
        u_len, v_len = lens[layer]
        assert (df["u"].map(len) == u_len).all()
        assert (df["v"].map(len) == v_len).all()
        # update_norm = ‖ΔW‖_F, for Linear ‖v‖·‖u‖ (checked in float64 here).
        if u_len:
            want = df.apply(
                lambda r: np.linalg.norm(np.asarray(r["u"], np.float64))
                * np.linalg.norm(np.asarray(r["v"], np.float64)),
                axis=1,
            )
            np.testing.assert_allclose(df["update_norm"], want, rtol=1e-5)

    steps = pd.concat(pq.read_table(p).to_pandas() for p in committed(synthetic_run, "steps"))
    assert list(steps["step"]) == list(range(report["last_step"] + 1))
    instances = pq.read_table(committed(synthetic_run, "instances")[0]).to_pandas()
    assert set(instances["split"]) == {"train", "test"}
