//! Contributions computed away from the run (`shard`, what Spark's
//! executors run): a task planned, sent as bytes and decoded, fed the
//! `updates` rows in small batches of any grouping, equals `attribute`'s
//! materialised rows, residual included; the bytes refuse to be anything
//! else.
use super::adam::{CASES, write};
use super::read;
use arrow::compute::concat_batches;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use reptrace_analyze::shard::Task;
use reptrace_analyze::{Options, ProbeSelection, attribute};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Every committed `updates` row of the task's layers with its `layer`
/// column, as one batch.
fn updates_with_layer(task: &Task) -> RecordBatch {
    let mut parts = Vec::new();
    for layer in task.layers() {
        for path in task.update_files(layer) {
            let file = std::fs::File::open(&path).unwrap();
            for b in ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap()
                .build()
                .unwrap()
            {
                let b = b.unwrap();
                let mut fields: Vec<Field> = b
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.as_ref().clone())
                    .collect();
                fields.push(Field::new("layer", DataType::Utf8, false));
                let mut columns: Vec<ArrayRef> = b.columns().to_vec();
                columns.push(Arc::new(StringArray::from(vec![layer; b.num_rows()])));
                parts.push(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap());
            }
        }
    }
    concat_batches(&parts[0].schema(), &parts).unwrap()
}

type Key = (i64, String, Option<i64>, Option<i64>);

/// The task's rows from batches of `rows` updates each, the residual from
/// the partial sums of the same batches.
fn shard_rows(task: &Task, all: &RecordBatch, rows: usize) -> BTreeMap<Key, f64> {
    let mut out = BTreeMap::new();
    let mut sums: BTreeMap<String, Vec<Vec<f64>>> = BTreeMap::new();
    let add = |b: &RecordBatch, out: &mut BTreeMap<Key, f64>| {
        let probe = b
            .column_by_name("probe_id")
            .unwrap()
            .as_primitive::<Int64Type>();
        let step = b
            .column_by_name("step")
            .unwrap()
            .as_primitive::<Int64Type>();
        let inst = b
            .column_by_name("instance_id")
            .unwrap()
            .as_primitive::<Int64Type>();
        let dot = b
            .column_by_name("dot")
            .unwrap()
            .as_primitive::<Float64Type>();
        let layer = b.column_by_name("layer").unwrap().as_string::<i32>();
        for i in 0..b.num_rows() {
            let key = (
                probe.value(i),
                layer.value(i).to_owned(),
                (!arrow_array::Array::is_null(step, i)).then(|| step.value(i)),
                (!arrow_array::Array::is_null(inst, i)).then(|| inst.value(i)),
            );
            assert!(out.insert(key, dot.value(i)).is_none(), "a row twice");
        }
    };
    let mut start = 0;
    while start < all.num_rows() {
        let n = rows.min(all.num_rows() - start);
        let batch = all.slice(start, n);
        add(&task.contributions(&batch).unwrap(), &mut out);
        for (layer, s) in task.partial_sums(&batch).unwrap() {
            sums.entry(layer).or_default().push(s);
        }
        start += n;
    }
    for (layer, parts) in &sums {
        let refs: Vec<&[f64]> = parts.iter().map(Vec::as_slice).collect();
        add(&task.residual(layer, &refs).unwrap(), &mut out);
    }
    out
}

fn materialised(dir: &Path) -> BTreeMap<Key, f64> {
    read::contributions(dir)
        .into_iter()
        .map(|r| ((r.probe_id, r.layer, r.step, r.instance_id), r.dot))
        .collect()
}

#[test]
fn a_task_sent_as_bytes_computes_what_attribute_does_under_adam_and_adamw() {
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        write(&dir, case, None);
        let run = reptrace_analyze::open(&dir).unwrap();
        let planned = Task::plan(&run, &[100, 101], &[], None).unwrap();
        let task = Task::from_bytes(&planned.to_bytes().unwrap()).unwrap();
        assert_eq!(task.probe_ids(), [100, 101]);
        let all = updates_with_layer(&task);
        let options = Options {
            probes: ProbeSelection::Ids(vec![100, 101]),
            ..Options::default()
        };
        attribute(&dir, &options, &mut |_| {}).unwrap();
        let want = materialised(&dir);
        for rows in [3, 7, all.num_rows()] {
            let got = shard_rows(&task, &all, rows);
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "{case:?}, batches of {rows}"
            );
            // Sums in another order: within 1e-12 of the largest row (the
            // residual is a difference of such sums).
            let scale = want.values().fold(0.0f64, |m, w| m.max(w.abs()));
            for (k, w) in &want {
                let g = got[k];
                assert!((g - w).abs() <= 1e-12 * scale, "{case:?} {k:?}: {g} vs {w}");
            }
        }
        // A step range keeps the records of those steps; the residual stays.
        let range = "2..4".parse().unwrap();
        let task = Task::plan(&run, &[100], &[], Some(range)).unwrap();
        let got = shard_rows(&task, &all, 5);
        assert!(
            got.keys()
                .all(|k| k.0 == 100 && k.2.is_none_or(|s| (2..=4).contains(&s)))
        );
        assert_eq!(got.keys().filter(|k| k.2.is_none()).count(), 1);
        assert!(got.keys().any(|k| k.2 == Some(3)));
    }
}

#[test]
fn bytes_that_are_not_a_task_and_unknown_probes_are_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    write(&dir, CASES[0], None);
    let run = reptrace_analyze::open(&dir).unwrap();
    let bytes = Task::plan(&run, &[100], &[], None)
        .unwrap()
        .to_bytes()
        .unwrap();
    for bad in [
        &bytes[..bytes.len() - 3],
        &bytes[1..],
        b"RPTASK01".as_slice(),
    ] {
        let err = Task::from_bytes(bad).err().unwrap().to_string();
        assert!(
            err.contains("not a reptrace task") && !err.contains('\n'),
            "{err}"
        );
    }
    let err = Task::plan(&run, &[100, 4242], &[], None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("4242") && !err.contains('\n'), "{err}");
    let err = Task::plan(&run, &[100], &["nope".into()], None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope") && !err.contains('\n'), "{err}");
}
