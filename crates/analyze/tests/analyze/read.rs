//! Plain reads of a run's tables for the tests, independent of the analyzer:
//! the arrow Parquet reader over the files the manifest lists.
use arrow::array::AsArray;
use arrow::datatypes::{Float16Type, Float32Type, Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, ArrowPrimitiveType, RecordBatch};
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

/// Row `r` of a batch of one table, its values taken by column name.
struct Row<'a> {
    layer: &'a Option<String>,
    batch: &'a RecordBatch,
    r: usize,
}

impl Row<'_> {
    fn layer(&self) -> String {
        self.layer.clone().unwrap()
    }

    fn column(&self, name: &str) -> &dyn Array {
        self.batch
            .column_by_name(name)
            .unwrap_or_else(|| panic!("no column {name}"))
    }

    /// The value, `None` where it is null.
    fn get<T: ArrowPrimitiveType>(&self, name: &str) -> Option<T::Native> {
        let a = self.column(name).as_primitive::<T>();
        a.is_valid(self.r).then(|| a.value(self.r))
    }

    /// The stored f64 value, validity not looked at.
    fn f64(&self, name: &str) -> f64 {
        self.column(name)
            .as_primitive::<Float64Type>()
            .value(self.r)
    }

    /// The list's values widened to f64.
    fn list(&self, name: &str) -> Vec<f64> {
        floats(self.column(name).as_list::<i32>().value(self.r).as_ref())
    }
}

/// Every row of `table`, each made into a `T` by `make`.
fn rows<T>(run: &Path, table: Table, make: impl Fn(&Row) -> T) -> Vec<T> {
    batches(run, table)
        .iter()
        .flat_map(|(layer, batch)| {
            (0..batch.num_rows())
                .map(|r| make(&Row { layer, batch, r }))
                .collect::<Vec<_>>()
        })
        .collect()
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
    rows(run, Table::Updates, |r| Update {
        layer: r.layer(),
        step: r.get::<Int64Type>("step").unwrap(),
        epoch: r.get::<Int32Type>("epoch").unwrap(),
        instance_id: r.get::<Int64Type>("instance_id").unwrap(),
        label: r.get::<Int32Type>("label").unwrap(),
        u: r.list("u"),
        v: r.list("v"),
    })
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
    rows(run, Table::Probes, |r| Probe {
        layer: r.layer(),
        probe_id: r.get::<Int64Type>("probe_id").unwrap(),
        instance_id: r.get::<Int64Type>("instance_id"),
        label: r.get::<Int32Type>("label").unwrap(),
        predicted: r.get::<Int32Type>("predicted").unwrap(),
        a: r.list("a"),
        p: r.list("p"),
        p_norm: r.f64("p_norm"),
    })
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
    rows(run, Table::Contributions, |r| Contribution {
        layer: r.layer(),
        probe_id: r.get::<Int64Type>("probe_id").unwrap(),
        step: r.get::<Int64Type>("step"),
        epoch: r.get::<Int32Type>("epoch"),
        instance_id: r.get::<Int64Type>("instance_id"),
        label: r.get::<Int32Type>("label"),
        dot: r.f64("dot"),
        norm: r.f64("norm"),
        cosine: r.f64("cosine"),
    })
}

/// Learning rate per step.
pub fn lrs(run: &Path) -> Vec<f64> {
    let mut rows = rows(run, Table::Steps, |r| {
        (r.get::<Int64Type>("step").unwrap(), r.f64("lr"))
    });
    rows.sort_by_key(|r| r.0);
    rows.into_iter().map(|r| r.1).collect()
}
