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
    /// Row of an instance in the data set, from 0 (int64). A training
    /// instance in `updates`, `contributions`, `influence` (null in batch mode
    /// and for residual rows); in `probes` the instance a probe is, if any.
    pub const INSTANCE_ID: &str = "instance_id";
    /// True class of the instance or probe, an index into
    /// [`Manifest::classes`](crate::Manifest::classes) (int32).
    pub const LABEL: &str = "label";
    /// `instances`: `"train"` or `"test"` ([`Split::as_str`](crate::Split::as_str)).
    pub const SPLIT: &str = "split";
    /// Training step, counted from 0 over the whole run (int64); null for
    /// the residual rows of `contributions`.
    pub const STEP: &str = "step";
    /// Epoch of the step, counted from 0 (int32); null for residual rows and
    /// in `influence` rows summed over all epochs.
    pub const EPOCH: &str = "epoch";
    /// `steps`: learning rate η_t used at the step (float64).
    pub const LR: &str = "lr";
    /// `steps`: number of instances in the step's mini-batch (int32).
    pub const BATCH_SIZE: &str = "batch_size";
    /// `steps`: mini-batch loss before the update; `examples`: the
    /// example's cross-entropy at that step (float64).
    pub const LOSS: &str = "loss";
    /// `updates`: the left factor of ΔW = v uᵀ, a list of the run's [`Dtype`](crate::Dtype)
    /// (Linear: the layer input; empty for whole updates).
    pub const U: &str = "u";
    /// `updates`: the right factor (Linear: −η_t·δ), or ΔW followed by Δb
    /// when `u` is empty.
    pub const V: &str = "v";
    /// `updates`: Frobenius norm ‖ΔW‖ of the record's update, bias
    /// excluded (float32).
    pub const UPDATE_NORM: &str = "update_norm";
    /// The probe; equals the `instance_id` of the input it was taken from
    /// (int64).
    pub const PROBE_ID: &str = "probe_id";
    /// Class the network predicts (int32): `probes` in the final network,
    /// `examples` at that step.
    pub const PREDICTED: &str = "predicted";
    /// `probes`: the layer's input in the final network (list of float64;
    /// Conv2d: C_in × H × W, not unfolded).
    pub const A: &str = "a";
    /// `probes`: the refinement p = z_T − (W_0 ⊛ a + b_0) (list of float64).
    pub const P: &str = "p";
    /// `probes`: ‖p‖ (float64).
    pub const P_NORM: &str = "p_norm";
    /// ⟨c, p⟩ of a record's contribution c and the probe's refinement
    /// (float64); in `influence` summed over the records of a row.
    pub const DOT: &str = "dot";
    /// `contributions`: ‖c‖ (float64).
    pub const NORM: &str = "norm";
    /// `contributions`: dot / (‖c‖·‖p‖), 0 when either norm is 0 (float64).
    pub const COSINE: &str = "cosine";
    /// `influence`: number of update records summed into the row, 0 for
    /// the residual (int64).
    pub const RECORDS: &str = "records";
    /// `examples`: probability the model gave the label at that step,
    /// `softmax(output)[label] = exp(−loss)` (float64).
    pub const P_LABEL: &str = "p_label";
    /// The Hive partition column of partitioned tables (from the path);
    /// in `layer_steps` a column of the files: the traced layer (string).
    pub const LAYER: &str = "layer";
    /// `steps`: whether the optimizer skipped the step (a gradient scaler
    /// found inf/NaN gradients): no update, no records (bool; null in runs
    /// of format 6 and older).
    pub const SKIPPED: &str = "skipped";
    /// `layer_steps`: index of the optimizer's parameter group that holds
    /// the layer's parameters (int32).
    pub const PARAM_GROUP: &str = "param_group";
    /// `layer_steps`: SGD momentum μ_t of the layer's group at the step (float64).
    pub const MOMENTUM: &str = "momentum";
    /// `layer_steps`: SGD dampening τ_t of the layer's group at the step (float64).
    pub const DAMPENING: &str = "dampening";
    /// `layer_steps`: whether the layer's group used Nesterov momentum (bool).
    pub const NESTEROV: &str = "nesterov";
    /// `layer_steps`: weight decay of the layer's group at the step (float64).
    pub const WEIGHT_DECAY: &str = "weight_decay";
    /// `layer_steps`: κ_t, the measured ratio of the gradient the optimizer
    /// applied to the sum of the step's per-example gradients (clipping by
    /// norm, a gradient scaler's 1/scale); folded into `updates.v` (float64).
    pub const GRAD_SCALE: &str = "grad_scale";
    /// `layer_steps`: relative difference between the applied gradient and
    /// κ_t times the records' sum, as the producer's check measured it
    /// (float64; null when not checked).
    pub const GRAD_CHECK: &str = "grad_check";
    /// `layer_steps`: ‖(∇W, ∇b)‖ of the gradient the optimizer applied to
    /// the layer (float64; null when not measured).
    pub const GRAD_NORM: &str = "grad_norm";
    /// `layer_steps`: the precision the layer's forward and backward pass
    /// ran in at the step: `f32`, `bf16` or `f16` (string).
    pub const PRECISION: &str = "precision";
    /// `layer_steps`: Adam's β₁ of the layer's group at the step (float64;
    /// null for other optimizers and in runs of format 9 and older).
    pub const BETA1: &str = "beta1";
    /// `layer_steps`: Adam's step size `c_t = η_t / (1 − β₁^k)`, `k` the
    /// optimizer's own step count after the step (float64; null for other
    /// optimizers).
    pub const STEP_SIZE: &str = "step_size";
    /// `layer_steps`: Adam's preconditioner after the step,
    /// `D_t = 1 / (sqrt(v_t / (1 − β₂^k)) + ε)` per parameter value, `vec W`
    /// then the bias (list of float32, in every run dtype; null for other
    /// optimizers).
    pub const PRECONDITIONER: &str = "preconditioner";
    /// `updates`: the rank (`torch.distributed`) of the process that
    /// computed and wrote the record (int32; null in single-process runs
    /// and in runs of format 10 and older).
    pub const RANK: &str = "rank";
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
    /// One row per step and traced layer (instance mode): the
    /// hyper-parameters of the layer's parameter group at that step and what
    /// the producer's gradient check measured (format 7).
    LayerSteps,
}

impl Table {
    /// Every table, in the order of docs/format.md except the newer ones
    /// (`batches`, format 3; `influence`, format 5; `examples`, format 6;
    /// `layer_steps`, format 7), last.
    pub const ALL: [Table; 9] = [
        Table::Instances,
        Table::Steps,
        Table::Updates,
        Table::Probes,
        Table::Contributions,
        Table::Batches,
        Table::Influence,
        Table::Examples,
        Table::LayerSteps,
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
            Table::LayerSteps => "layer_steps",
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
            // Null in runs of format 6 and older (readers fill it).
            Field::new(SKIPPED, DataType::Boolean, true),
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
            // Null in single-process runs (format 11).
            Field::new(RANK, DataType::Int32, true),
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
        Table::LayerSteps => vec![
            Field::new(STEP, DataType::Int64, false),
            Field::new(EPOCH, DataType::Int32, false),
            Field::new(LAYER, DataType::Utf8, false),
            Field::new(PARAM_GROUP, DataType::Int32, false),
            Field::new(LR, DataType::Float64, false),
            Field::new(MOMENTUM, DataType::Float64, false),
            Field::new(DAMPENING, DataType::Float64, false),
            Field::new(NESTEROV, DataType::Boolean, false),
            Field::new(WEIGHT_DECAY, DataType::Float64, false),
            Field::new(GRAD_SCALE, DataType::Float64, false),
            Field::new(GRAD_CHECK, DataType::Float64, true),
            Field::new(GRAD_NORM, DataType::Float64, true),
            Field::new(PRECISION, DataType::Utf8, false),
            Field::new(BETA1, DataType::Float64, true),
            Field::new(STEP_SIZE, DataType::Float64, true),
            Field::new(PRECONDITIONER, list_of(DataType::Float32), true),
        ],
    };
    Arc::new(Schema::new(fields))
}

/// The format version that added `column` to `table` (1 for the columns
/// of a table's first version): a file of an older run lacks it, and
/// readers fill it with nulls.
pub fn column_since(table: Table, column: &str) -> u32 {
    match (table, column) {
        (Table::Steps, col::SKIPPED) => 7,
        (Table::LayerSteps, col::BETA1 | col::STEP_SIZE | col::PRECONDITIONER) => 10,
        (Table::Updates, col::RANK) => 11,
        _ => 1,
    }
}

/// The schema of a table's files as a writer of format `version` wrote
/// them: [`schema`] without the columns added later ([`column_since`]).
pub fn schema_as_of(table: Table, dtype: Dtype, version: u32) -> SchemaRef {
    let full = schema(table, dtype);
    let fields: Vec<Field> = full
        .fields()
        .iter()
        .filter(|f| column_since(table, f.name()) <= version)
        .map(|f| f.as_ref().clone())
        .collect();
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
        DataType::Boolean => "bool".into(),
        DataType::List(f) => format!("list<{}>", type_name(f.data_type())),
        other => format!("{other}"),
    }
}
