//! Plain reads of a run's tables for the tests, independent of the analyzer:
//! the arrow Parquet reader over the files the manifest lists.
use arrow::array::AsArray;
use arrow::datatypes::{Float16Type, Float32Type, Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use reptrace_format::{Manifest, Table};
use reptrace_testkit::files::read_parquet;
use std::path::Path;

fn batches(run: &Path, table: Table) -> Vec<(Option<String>, RecordBatch)> {
    let m = Manifest::load(run).unwrap();
    let mut out = Vec::new();
    // Contributions: those of the latest attribution.
    let files = if table == Table::Contributions {
        m.attributions
            .last()
            .map(|a| a.files.iter().collect())
            .unwrap_or_default()
    } else {
        m.files(table)
    };
    for f in files {
        for b in read_parquet(&run.join(&f.path)) {
            out.push((f.layer.clone(), b));
        }
    }
    out
}

fn floats(a: &dyn Array) -> Vec<f64> {
    match a.data_type() {
        arrow_schema::DataType::Float16 => a
            .as_primitive::<Float16Type>()
            .values()
            .iter()
            .map(|x| x.to_f64())
            .collect(),
        arrow_schema::DataType::Float32 => a
            .as_primitive::<Float32Type>()
            .values()
            .iter()
            .map(|&x| f64::from(x))
            .collect(),
        arrow_schema::DataType::Float64 => a.as_primitive::<Float64Type>().values().to_vec(),
        t => panic!("not a float type: {t}"),
    }
}

fn list_rows(b: &RecordBatch, name: &str) -> Vec<Vec<f64>> {
    let l = b.column_by_name(name).unwrap().as_list::<i32>();
    (0..l.len()).map(|i| floats(l.value(i).as_ref())).collect()
}

fn i64s(b: &RecordBatch, name: &str) -> Vec<Option<i64>> {
    b.column_by_name(name)
        .unwrap()
        .as_primitive::<Int64Type>()
        .iter()
        .collect()
}

fn i32s(b: &RecordBatch, name: &str) -> Vec<Option<i32>> {
    b.column_by_name(name)
        .unwrap()
        .as_primitive::<Int32Type>()
        .iter()
        .collect()
}

fn f64s(b: &RecordBatch, name: &str) -> Vec<f64> {
    b.column_by_name(name)
        .unwrap()
        .as_primitive::<Float64Type>()
        .values()
        .to_vec()
}

#[derive(Debug, Clone)]
pub struct Update {
    pub layer: String,
    pub step: i64,
    pub epoch: i32,
    pub instance_id: i64,
    pub label: i32,
    pub u: Vec<f64>,
    pub v: Vec<f64>,
}

pub fn updates(run: &Path) -> Vec<Update> {
    let mut out = Vec::new();
    for (layer, b) in batches(run, Table::Updates) {
        let (s, e, i, l) = (
            i64s(&b, "step"),
            i32s(&b, "epoch"),
            i64s(&b, "instance_id"),
            i32s(&b, "label"),
        );
        let (u, v) = (list_rows(&b, "u"), list_rows(&b, "v"));
        for r in 0..b.num_rows() {
            out.push(Update {
                layer: layer.clone().unwrap(),
                step: s[r].unwrap(),
                epoch: e[r].unwrap(),
                instance_id: i[r].unwrap(),
                label: l[r].unwrap(),
                u: u[r].clone(),
                v: v[r].clone(),
            });
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct Probe {
    pub layer: String,
    pub probe_id: i64,
    pub instance_id: Option<i64>,
    pub label: i32,
    pub predicted: i32,
    pub a: Vec<f64>,
    pub p: Vec<f64>,
    pub p_norm: f64,
}

pub fn probes(run: &Path) -> Vec<Probe> {
    let mut out = Vec::new();
    for (layer, b) in batches(run, Table::Probes) {
        let (id, inst, l, pr) = (
            i64s(&b, "probe_id"),
            i64s(&b, "instance_id"),
            i32s(&b, "label"),
            i32s(&b, "predicted"),
        );
        let (a, p, n) = (list_rows(&b, "a"), list_rows(&b, "p"), f64s(&b, "p_norm"));
        for r in 0..b.num_rows() {
            out.push(Probe {
                layer: layer.clone().unwrap(),
                probe_id: id[r].unwrap(),
                instance_id: inst[r],
                label: l[r].unwrap(),
                predicted: pr[r].unwrap(),
                a: a[r].clone(),
                p: p[r].clone(),
                p_norm: n[r],
            });
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    pub layer: String,
    pub probe_id: i64,
    pub step: Option<i64>,
    pub epoch: Option<i32>,
    pub instance_id: Option<i64>,
    pub label: Option<i32>,
    pub dot: f64,
    pub norm: f64,
    pub cosine: f64,
}

pub fn contributions(run: &Path) -> Vec<Contribution> {
    let mut out = Vec::new();
    for (layer, b) in batches(run, Table::Contributions) {
        let (id, s, e, i, l) = (
            i64s(&b, "probe_id"),
            i64s(&b, "step"),
            i32s(&b, "epoch"),
            i64s(&b, "instance_id"),
            i32s(&b, "label"),
        );
        let (d, n, c) = (f64s(&b, "dot"), f64s(&b, "norm"), f64s(&b, "cosine"));
        for r in 0..b.num_rows() {
            out.push(Contribution {
                layer: layer.clone().unwrap(),
                probe_id: id[r].unwrap(),
                step: s[r],
                epoch: e[r],
                instance_id: i[r],
                label: l[r],
                dot: d[r],
                norm: n[r],
                cosine: c[r],
            });
        }
    }
    out
}

/// Learning rate per step.
pub fn lrs(run: &Path) -> Vec<f64> {
    let mut rows: Vec<(i64, f64)> = Vec::new();
    for (_, b) in batches(run, Table::Steps) {
        let s = i64s(&b, "step");
        let lr = f64s(&b, "lr");
        rows.extend(s.into_iter().map(Option::unwrap).zip(lr));
    }
    rows.sort_by_key(|r| r.0);
    rows.into_iter().map(|r| r.1).collect()
}
