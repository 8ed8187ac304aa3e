//! The DataFusion registration and the read-only SQL interface.
use arrow::array::AsArray;
use arrow::compute::cast;
use arrow::datatypes::{Float64Type, Int64Type};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, SchemaRef};
use reptrace_analyze::datafusion::prelude::SessionContext;
use reptrace_analyze::{context, open, sql};
use reptrace_format::{Manifest, Table};
use reptrace_testkit::synthetic::Synth;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Column `name` of every batch, cast to `ty`, its values taken out by `read`.
fn values<T>(
    batches: &[RecordBatch],
    name: &str,
    ty: &DataType,
    read: impl Fn(&ArrayRef) -> Vec<T>,
) -> Vec<T> {
    batches
        .iter()
        .flat_map(|b| {
            let col = b
                .column_by_name(name)
                .unwrap_or_else(|| panic!("no column {name}"));
            read(&cast(col, ty).unwrap())
        })
        .collect()
}

pub fn ints(batches: &[RecordBatch], name: &str) -> Vec<Option<i64>> {
    values(batches, name, &DataType::Int64, |a| {
        a.as_primitive::<Int64Type>().iter().collect()
    })
}

pub fn floats(batches: &[RecordBatch], name: &str) -> Vec<Option<f64>> {
    values(batches, name, &DataType::Float64, |a| {
        a.as_primitive::<Float64Type>().iter().collect()
    })
}

pub fn strings(batches: &[RecordBatch], name: &str) -> Vec<Option<String>> {
    values(batches, name, &DataType::Utf8, |a| {
        a.as_string::<i32>()
            .iter()
            .map(|s| s.map(str::to_owned))
            .collect()
    })
}

/// The default synthetic run, written to `<tmp>/run`.
fn synthetic_run() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    Synth::default().write(&run);
    (tmp, run)
}

/// A session on `run` with every table registered.
fn session(run: &Path) -> SessionContext {
    context(&open(run).unwrap()).unwrap()
}

/// The schema and batches of `q` on `ctx`.
async fn query(ctx: &SessionContext, q: &str) -> (SchemaRef, Vec<RecordBatch>) {
    sql::run(ctx, q).await.unwrap()
}

/// The result written in `format`.
fn written(schema: &SchemaRef, b: &[RecordBatch], format: sql::Format) -> Vec<u8> {
    let mut out = Vec::new();
    sql::write(schema, b, format, &mut out).unwrap();
    out
}

#[tokio::test]
async fn tables_read_committed_files_only() {
    let (_tmp, run) = synthetic_run();
    let m = Manifest::load(&run).unwrap();
    // A complete file that no commit lists: must stay invisible.
    let f = &m.files(Table::Updates)[0];
    let stray = run.join(&f.path).with_file_name("part-999999.parquet");
    std::fs::copy(run.join(&f.path), stray).unwrap();

    let ctx = session(&run);
    let (_, b) = query(
        &ctx,
        "SELECT layer, COUNT(*) AS n FROM updates GROUP BY layer ORDER BY layer",
    )
    .await;
    let got: BTreeMap<String, i64> = strings(&b, "layer")
        .into_iter()
        .zip(ints(&b, "n"))
        .map(|(l, n)| (l.unwrap(), n.unwrap()))
        .collect();
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    for f in m.files(Table::Updates) {
        *want.entry(f.layer.clone().unwrap()).or_default() += f.rows as i64;
    }
    assert_eq!(got, want);
    // A filter on the partition column, every table plans, empty contributions.
    let (_, b) = query(
        &ctx,
        "SELECT COUNT(*) AS n FROM updates WHERE layer = 'fc2'",
    )
    .await;
    assert_eq!(ints(&b, "n"), vec![Some(want["fc2"])]);
    // Contributions are computed on demand: every probe with every record
    // of its layer, and one residual row.
    let computed: i64 = m
        .model
        .traced_layers()
        .map(|l| {
            let rows = |t: Table| -> i64 {
                m.files(t)
                    .iter()
                    .filter(|f| f.layer.as_deref() == Some(l.name()))
                    .map(|f| f.rows as i64)
                    .sum()
            };
            rows(Table::Probes) * (rows(Table::Updates) + 1)
        })
        .sum();
    assert!(computed > 0);
    for (q, n) in [
        ("SELECT COUNT(*) AS n FROM contributions", computed),
        ("SELECT COUNT(*) AS n FROM instances", 25),
        ("SELECT COUNT(*) AS n FROM steps", 12),
        ("SELECT COUNT(*) AS n FROM probes WHERE layer = 'fc1'", 8),
    ] {
        let (_, b) = query(&ctx, q).await;
        assert_eq!(ints(&b, "n"), vec![Some(n)], "{q}");
    }
    let (schema, b) = query(&ctx, "SELECT * FROM contributions WHERE probe_id = -1").await;
    assert!(b.iter().all(|b| b.num_rows() == 0));
    assert_eq!(
        schema.field_with_name("layer").unwrap().data_type(),
        &DataType::Utf8
    );
}

#[tokio::test]
async fn refusals_are_one_line() {
    let (tmp, run) = synthetic_run();
    let ctx = session(&run);
    let target = tmp.path().join("out.csv");
    let copy = format!("COPY (SELECT 1) TO '{}'", target.display());
    let parquet = run.join("instances/part-000000.parquet");
    let by_path = format!("SELECT * FROM '{}'", parquet.display());
    let function = format!("SELECT * FROM read_parquet('{}')", parquet.display());
    let cases: Vec<(&str, &str)> = vec![
        (
            "CREATE TABLE t AS SELECT 1",
            "refused SQL: CREATE statements are not allowed",
        ),
        (
            "DROP TABLE updates",
            "refused SQL: DROP statements are not allowed",
        ),
        (
            "INSERT INTO steps VALUES (1, 1, 0.1, 1, 0.5)",
            "refused SQL: INSERT statements are not allowed",
        ),
        (
            "SET datafusion.execution.batch_size = 1",
            "refused SQL: SET statements are not allowed",
        ),
        (&copy, "refused SQL: COPY is not allowed"),
        (
            "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/tmp/x.parquet'",
            "refused SQL: CREATE EXTERNAL TABLE is not allowed",
        ),
        (
            &by_path,
            "refused SQL: reading files through SQL is not allowed",
        ),
        (&function, "refused SQL: table function read_parquet"),
        (
            "SELECT * FROM generate_series(1, 3)",
            "refused SQL: table function generate_series",
        ),
        (
            "SELECT * FROM other.updates",
            "refused SQL: other.updates: only the run's tables",
        ),
        ("SELECT * FROM nope", "nope"),
        ("SELEC 1", "sql: "),
        (
            "SELECT 1; SELECT 2",
            "refused SQL: expected one statement, found 2",
        ),
        (
            "EXPLAIN COPY (SELECT 1) TO '/tmp/y.csv'",
            "refused SQL: COPY is not allowed",
        ),
        ("SELECT no_such_column FROM steps", "no_such_column"),
    ];
    for (q, want) in cases {
        let e = sql::run(&ctx, q).await.unwrap_err().to_string();
        assert!(e.contains(want), "{q}: {e}");
        assert!(!e.contains('\n'), "{q}: multi-line error {e:?}");
    }
    assert!(!target.exists());
    // A CTE named like a table is fine, so is a subquery.
    let (_, b) = query(
        &ctx,
        "WITH s AS (SELECT step FROM steps) SELECT COUNT(*) AS n FROM (SELECT * FROM s) t",
    )
    .await;
    assert_eq!(ints(&b, "n"), vec![Some(12)]);
}

#[tokio::test]
async fn output_formats() {
    let (tmp, run) = synthetic_run();
    let ctx = session(&run);
    let (schema, b) = query(
        &ctx,
        "SELECT step, lr FROM steps WHERE step < 2 ORDER BY step",
    )
    .await;
    let text = |f: sql::Format| written(&schema, &b, f);
    let table = String::from_utf8(text(sql::Format::Table)).unwrap();
    assert!(table.contains("| step | lr"), "{table}");
    let csv = String::from_utf8(text(sql::Format::Csv)).unwrap();
    assert_eq!(
        csv.lines().collect::<Vec<_>>(),
        vec!["step,lr", "0,0.1", "1,0.1"]
    );
    let json: serde_json::Value = serde_json::from_slice(&text(sql::Format::Json)).unwrap();
    assert_eq!(
        json,
        serde_json::json!([{"step": 0, "lr": 0.1}, {"step": 1, "lr": 0.1}])
    );
    let pq = tmp.path().join("out.parquet");
    std::fs::write(&pq, text(sql::Format::Parquet)).unwrap();
    let back: Vec<RecordBatch> = reptrace_testkit::files::read_parquet(&pq);
    assert_eq!(ints(&back, "step"), vec![Some(0), Some(1)]);
    // Empty results still show their columns.
    let (schema, b) = query(&ctx, "SELECT step, lr FROM steps WHERE step < 0").await;
    for (format, want) in [(sql::Format::Csv, "step,lr"), (sql::Format::Json, "[]")] {
        let out = String::from_utf8(written(&schema, &b, format)).unwrap();
        assert_eq!(out.trim(), want);
    }
}
