//! Arrow schemas of the tables of a run.
//!
//! The column names here are the contract that pandas, DuckDB, Spark and the
//! canned queries read. `schemas/*.json` says the same in a language-neutral
//! form; a test fails when the two drift.
use crate::manifest::Dtype;
use crate::{Error, Result};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Column names, shared by every writer and reader.
pub mod col {
    pub const INSTANCE_ID: &str = "instance_id";
    pub const LABEL: &str = "label";
    pub const SPLIT: &str = "split";
    pub const STEP: &str = "step";
    pub const EPOCH: &str = "epoch";
    pub const LR: &str = "lr";
    pub const BATCH_SIZE: &str = "batch_size";
    pub const LOSS: &str = "loss";
    pub const U: &str = "u";
    pub const V: &str = "v";
    pub const UPDATE_NORM: &str = "update_norm";
    pub const PROBE_ID: &str = "probe_id";
    pub const PREDICTED: &str = "predicted";
    pub const A: &str = "a";
    pub const P: &str = "p";
    pub const P_NORM: &str = "p_norm";
    pub const DOT: &str = "dot";
    pub const NORM: &str = "norm";
    pub const COSINE: &str = "cosine";
    pub const RECORDS: &str = "records";
    pub const P_LABEL: &str = "p_label";
    /// The Hive partition column of partitioned tables (from the path).
    pub const LAYER: &str = "layer";
}

/// The tables of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// One row per instance of the data set: id, label, split.
    Instances,
    /// One row per training step: step, epoch, learning rate, batch size, loss.
    Steps,
    /// One row per step, traced layer and instance: the factors of its update.
    Updates,
    /// One row per probe and traced layer: final layer input and refinement.
    Probes,
    /// One row per probe, layer and update record: its contribution.
    Contributions,
    /// Batch mode: one row per step and member of its batch.
    Batches,
    /// Materialised sums of contributions per probe, instance (and epoch),
    /// written by `reptrace attribute --by instance|epoch`.
    Influence,
    /// Training dynamics: one row per step and member of its batch, with
    /// the example's loss, predicted class and probability of its label in
    /// the forward pass of that step (format 6).
    Examples,
}

impl Table {
    /// Every table, in the order of docs/format.md except the newer ones
    /// (`batches`, format 3; `influence`, format 5; `examples`, format 6),
    /// last.
    pub const ALL: [Table; 8] = [
        Table::Instances,
        Table::Steps,
        Table::Updates,
        Table::Probes,
        Table::Contributions,
        Table::Batches,
        Table::Influence,
        Table::Examples,
    ];

    /// The table's name: its directory in the run and its SQL name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Instances => "instances",
            Table::Steps => "steps",
            Table::Updates => "updates",
            Table::Probes => "probes",
            Table::Contributions => "contributions",
            Table::Batches => "batches",
            Table::Influence => "influence",
            Table::Examples => "examples",
        }
    }

    /// Whether the table is partitioned by `layer` (Hive style, `layer=<name>`).
    pub fn is_partitioned(self) -> bool {
        matches!(
            self,
            Table::Updates | Table::Probes | Table::Contributions | Table::Influence
        )
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Table {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Table::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| Error::UnknownTable { name: s.to_owned() })
    }
}

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, false)))
}

/// The Arrow schema of a table's Parquet files.
///
/// `dtype` is the float type of the `u` and `v` factor lists of `updates`;
/// other tables ignore it. The `layer` partition column is not part of the
/// files: readers add it from the path.
pub fn schema(table: Table, dtype: Dtype) -> SchemaRef {
    use col::*;
    let fields = match table {
        Table::Instances => vec![
            Field::new(INSTANCE_ID, DataType::Int64, false),
            Field::new(LABEL, DataType::Int32, false),
            Field::new(SPLIT, DataType::Utf8, false),
        ],
        Table::Steps => vec![
            Field::new(STEP, DataType::Int64, false),
            Field::new(EPOCH, DataType::Int32, false),
            Field::new(LR, DataType::Float64, false),
            Field::new(BATCH_SIZE, DataType::Int32, false),
            Field::new(LOSS, DataType::Float64, false),
        ],
        Table::Updates => vec![
            Field::new(STEP, DataType::Int64, false),
            Field::new(EPOCH, DataType::Int32, false),
            // Null in batch mode (label: unless the batch is of one class).
            Field::new(INSTANCE_ID, DataType::Int64, true),
            Field::new(LABEL, DataType::Int32, true),
            Field::new(U, list_of(dtype.arrow()), false),
            Field::new(V, list_of(dtype.arrow()), false),
            Field::new(UPDATE_NORM, DataType::Float32, false),
        ],
        Table::Probes => vec![
            Field::new(PROBE_ID, DataType::Int64, false),
            Field::new(INSTANCE_ID, DataType::Int64, true),
            Field::new(LABEL, DataType::Int32, false),
            Field::new(PREDICTED, DataType::Int32, false),
            Field::new(A, list_of(DataType::Float64), false),
            Field::new(P, list_of(DataType::Float64), false),
            Field::new(P_NORM, DataType::Float64, false),
        ],
        Table::Contributions => vec![
            Field::new(PROBE_ID, DataType::Int64, false),
            Field::new(STEP, DataType::Int64, true),
            Field::new(EPOCH, DataType::Int32, true),
            Field::new(INSTANCE_ID, DataType::Int64, true),
            Field::new(LABEL, DataType::Int32, true),
            Field::new(DOT, DataType::Float64, false),
            Field::new(NORM, DataType::Float64, false),
            Field::new(COSINE, DataType::Float64, false),
        ],
        Table::Batches => vec![
            Field::new(STEP, DataType::Int64, false),
            Field::new(EPOCH, DataType::Int32, false),
            Field::new(INSTANCE_ID, DataType::Int64, false),
            Field::new(LABEL, DataType::Int32, false),
        ],
        Table::Influence => vec![
            Field::new(PROBE_ID, DataType::Int64, false),
            // Null when summed over all epochs, and for the residual.
            Field::new(EPOCH, DataType::Int32, true),
            // Null in batch mode and for the residual.
            Field::new(INSTANCE_ID, DataType::Int64, true),
            Field::new(LABEL, DataType::Int32, true),
            Field::new(DOT, DataType::Float64, false),
            Field::new(RECORDS, DataType::Int64, false),
        ],
        Table::Examples => vec![
            Field::new(STEP, DataType::Int64, false),
            Field::new(EPOCH, DataType::Int32, false),
            Field::new(INSTANCE_ID, DataType::Int64, false),
            Field::new(LABEL, DataType::Int32, false),
            // Cross-entropy of the example's output against its label.
            Field::new(LOSS, DataType::Float64, false),
            Field::new(PREDICTED, DataType::Int32, false),
            // softmax(output)[label] = exp(-loss).
            Field::new(P_LABEL, DataType::Float64, false),
        ],
    };
    Arc::new(Schema::new(fields))
}

/// The language-neutral name of an Arrow type, as written in `schemas/*.json`.
///
/// Lists of the factor dtype are spelled `list<$dtype>` there.
pub fn type_name(dt: &DataType) -> String {
    match dt {
        DataType::Int32 => "int32".into(),
        DataType::Int64 => "int64".into(),
        DataType::Float16 => "float16".into(),
        DataType::Float32 => "float32".into(),
        DataType::Float64 => "float64".into(),
        DataType::Utf8 => "string".into(),
        DataType::List(f) => format!("list<{}>", type_name(f.data_type())),
        other => format!("{other}"),
    }
}
