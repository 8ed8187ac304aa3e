//! The manifest: `<run>/manifest.json`, the commit point of a run.
//!
//! The manifest is replaced atomically (written to a temporary name, then
//! renamed). A file of the run counts as committed only when a manifest lists
//! it; readers that go through [`Manifest::files`] never see rows past the
//! last commit point, even while training is still writing.
use crate::kinds::LayerKind;
pub use crate::kinds::{
    Conv1dSpec, Conv2dSpec, EmbeddingSpec, Lens, LinearSpec, NormSpec, PaddingMode, Storage,
};
use crate::layout;
use crate::schema::Table;
use crate::{Error, FORMAT_NAME, FORMAT_VERSION, OLDEST_FORMAT_VERSION, Result, Step};
use arrow_schema::DataType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Whether a run is still being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Training is (or was, if the process died) still recording.
    Recording,
    /// `finish()` was called: every step, the final weights and probes are in.
    Complete,
    /// Recording stopped early (an error, a non-finite loss, a dropped recorder).
    Aborted,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Recording => "recording",
            Status::Complete => "complete",
            Status::Aborted => "aborted",
        })
    }
}

/// Which part of the data set an instance belongs to (`instances.split`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training split: instances the model trains on (`"train"`).
    Train,
    /// The test split: held out from training (`"test"`).
    Test,
}

impl Split {
    /// The value stored in `instances.split`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// What one update record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One record per step, layer and training instance (exact for SGD).
    Instance,
    /// One record per step and layer: the whole update of the batch.
    Batch,
}

/// Float type of the stored factors `u` and `v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit IEEE floats (Arrow `Float32`).
    F32,
    /// 16-bit IEEE half floats (Arrow `Float16`, Parquet FIXED_LEN_BYTE_ARRAY(2)).
    F16,
}

impl Dtype {
    /// The Arrow type of one factor element.
    pub fn arrow(self) -> DataType {
        match self {
            Dtype::F32 => DataType::Float32,
            Dtype::F16 => DataType::Float16,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
        })
    }
}

/// One module of a sequential model, in forward order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Module {
    /// A fully connected layer.
    Linear(LinearSpec),
    /// A 2-d convolution.
    Conv2d(Conv2dSpec),
    /// A 1-d convolution (format 8).
    Conv1d(Conv1dSpec),
    /// An embedding table (format 8).
    Embedding(EmbeddingSpec),
    /// A LayerNorm's affine part (format 8).
    LayerNorm(NormSpec),
    /// An RMSNorm's scale (format 8; no bias).
    RmsNorm(NormSpec),
    /// Elementwise `max(x, 0)`.
    Relu,
    /// Elementwise `tanh`.
    Tanh,
    /// Elementwise logistic sigmoid.
    Sigmoid,
    /// Elementwise GELU.
    Gelu,
    /// 2-d max pooling over `[C, H, W]` inputs, no padding.
    MaxPool2d {
        /// Window size `[kh, kw]`.
        kernel: [usize; 2],
        /// Stride `[sh, sw]`.
        stride: [usize; 2],
    },
    /// 2-d average pooling over `[C, H, W]` inputs, no padding.
    AvgPool2d {
        /// Window size `[kh, kw]`.
        kernel: [usize; 2],
        /// Stride `[sh, sw]`.
        stride: [usize; 2],
    },
    /// Flattens each example to one dimension.
    Flatten,
    /// Dropout while training (identity in evaluation).
    Dropout {
        /// Probability of zeroing an element.
        p: f64,
    },
    /// BatchNorm over the channels of `[C, H, W]` inputs (batch mode only:
    /// it couples the examples of a batch).
    BatchNorm2d {
        /// The module's name, the prefix of its parameters.
        name: String,
        /// Channels `C` of the input.
        channels: usize,
    },
    /// BatchNorm over `[features]` inputs (batch mode only, like
    /// [`Module::BatchNorm2d`]).
    BatchNorm1d {
        /// The module's name, the prefix of its parameters.
        name: String,
        /// Length of the input.
        features: usize,
    },
}

impl Module {
    /// The module as a layer with weights of a traced kind, traced or not
    /// (`None` for the other modules).
    pub fn layer(&self) -> Option<TracedLayer<'_>> {
        Some(match self {
            Module::Linear(l) => TracedLayer::Linear(l),
            Module::Conv2d(c) => TracedLayer::Conv2d(c),
            Module::Conv1d(c) => TracedLayer::Conv1d(c),
            Module::Embedding(e) => TracedLayer::Embedding(e),
            Module::LayerNorm(n) => TracedLayer::LayerNorm(n),
            Module::RmsNorm(n) => TracedLayer::RmsNorm(n),
            Module::Relu
            | Module::Tanh
            | Module::Sigmoid
            | Module::Gelu
            | Module::MaxPool2d { .. }
            | Module::AvgPool2d { .. }
            | Module::Flatten
            | Module::Dropout { .. }
            | Module::BatchNorm2d { .. }
            | Module::BatchNorm1d { .. } => return None,
        })
    }
}

/// A traced layer as the analyzer sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TracedLayer<'a> {
    /// A traced fully connected layer.
    Linear(&'a LinearSpec),
    /// A traced 2-d convolution.
    Conv2d(&'a Conv2dSpec),
    /// A traced 1-d convolution.
    Conv1d(&'a Conv1dSpec),
    /// A traced embedding table.
    Embedding(&'a EmbeddingSpec),
    /// A traced LayerNorm.
    LayerNorm(&'a NormSpec),
    /// A traced RMSNorm.
    RmsNorm(&'a NormSpec),
}

impl<'a> TracedLayer<'a> {
    /// The layer's kind: every per-kind fact of the format
    /// ([`kinds`](crate::kinds)).
    pub fn kind(&self) -> &'a dyn LayerKind {
        match *self {
            TracedLayer::Linear(l) => l,
            TracedLayer::Conv2d(c) => c,
            TracedLayer::Conv1d(c) => c,
            TracedLayer::Embedding(e) => e,
            TracedLayer::LayerNorm(n) | TracedLayer::RmsNorm(n) => n,
        }
    }

    /// The kind's name as in the manifest's `kind` tag (`linear`,
    /// `conv2d`, `conv1d`, `embedding`, `layer_norm`, `rms_norm`).
    pub fn kind_name(&self) -> &'static str {
        match self {
            TracedLayer::Linear(_) => "linear",
            TracedLayer::Conv2d(_) => "conv2d",
            TracedLayer::Conv1d(_) => "conv1d",
            TracedLayer::Embedding(_) => "embedding",
            TracedLayer::LayerNorm(_) => "layer_norm",
            TracedLayer::RmsNorm(_) => "rms_norm",
        }
    }

    /// The layer's name (its `layer=` partition).
    pub fn name(&self) -> &'a str {
        self.kind().name()
    }

    /// Whether the layer has a bias.
    pub fn bias(&self) -> bool {
        self.kind().bias()
    }

    /// Shape of the weight tensor as PyTorch stores it.
    pub fn weight_shape(&self) -> Vec<usize> {
        self.kind().weight_shape()
    }

    /// Shape of the bias tensor, when the layer has one.
    pub fn bias_shape(&self) -> Vec<usize> {
        self.kind().bias_shape()
    }

    /// The storage the kind's rule gives its instance-mode records (what a
    /// producer writes into the spec's `storage` field).
    pub fn instance_storage(&self) -> Storage {
        self.kind().instance_storage()
    }

    /// Checks the spec's fields that the other methods rely on; the message
    /// names the layer and the field.
    pub fn check(&self) -> std::result::Result<(), String> {
        if let TracedLayer::RmsNorm(n) = self
            && n.bias
        {
            return Err(format!("layer '{}': rms_norm has no bias", n.name));
        }
        self.kind().check()
    }

    /// Lengths of one record's `u` and `v` lists.
    pub fn factor_lens(&self) -> (usize, usize) {
        self.kind().factor_lens()
    }

    /// Lengths of one record's `u` and `v` lists in a run of `mode`: in
    /// batch mode every record holds the whole update, `u` empty and `v` =
    /// `vec ΔW` then `Δb`.
    pub fn record_lens(&self, mode: Mode) -> (usize, usize) {
        match mode {
            Mode::Instance => self.factor_lens(),
            Mode::Batch => (0, self.update_len()),
        }
    }

    /// Length of `vec ΔW` plus `Δb`.
    pub fn update_len(&self) -> usize {
        self.kind().update_len()
    }

    /// Whether records of a run of `mode` hold the whole update (`u` empty).
    pub fn records_full(&self, mode: Mode) -> bool {
        self.kind().records_full(mode)
    }

    /// Lengths of a probe's `a` (layer input) and `p` (refinement) lists
    /// (of a [ragged](TracedLayer::ragged) layer: at `T` positions).
    pub fn probe_lens(&self) -> (usize, usize) {
        self.kind().probe_lens()
    }

    /// Whether records and probes hold a variable number of positions
    /// ([`LayerKind::ragged`]).
    pub fn ragged(&self) -> bool {
        self.kind().ragged()
    }

    /// How long one record's `u` and `v` lists are in a run of `mode`:
    /// fixed ([`TracedLayer::record_lens`]), or per position for the factor
    /// records of a [ragged](TracedLayer::ragged) layer.
    pub fn record_shape(&self, mode: Mode) -> Lens {
        match self.kind().position_lens() {
            Some([u, v, _, _]) if self.ragged() && !self.records_full(mode) => {
                Lens::PerPosition(u, v)
            }
            _ => {
                let (u, v) = self.record_lens(mode);
                Lens::Fixed(u, v)
            }
        }
    }

    /// How long one probe's `a` and `p` lists are: fixed
    /// ([`TracedLayer::probe_lens`]), or per position for a
    /// [ragged](TracedLayer::ragged) layer.
    pub fn probe_shape(&self) -> Lens {
        match self.kind().position_lens() {
            Some([_, _, a, p]) if self.ragged() => Lens::PerPosition(a, p),
            _ => {
                let (a, p) = self.probe_lens();
                Lens::Fixed(a, p)
            }
        }
    }

    /// Output positions each weight is applied at in one forward pass
    /// (Conv2d: `h_out · w_out`; Linear, Embedding, norms: `T`).
    pub fn positions(&self) -> usize {
        self.kind().positions()
    }
}

/// What [`Model::modules`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Structure {
    /// The whole model, a sequential stack of modules in forward order: a
    /// reader can rebuild it (every run before format 4).
    #[default]
    Sequential,
    /// A model defined elsewhere (a PyTorch `nn.Module` of any shape):
    /// `modules` lists its traced layers only, named by their qualified
    /// module names, in the order they first ran (format 4).
    TracedLayers,
}

/// The model: a sequential stack of modules, or the traced layers of a
/// model defined elsewhere ([`Structure`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// A short name (`mlp`, `cnn`, or the user's).
    pub name: String,
    /// Shape of one input example, without the batch dimension.
    pub input_shape: Vec<usize>,
    /// Absent before format 4: sequential.
    #[serde(default, skip_serializing_if = "is_sequential")]
    pub structure: Structure,
    /// The modules in forward order (with [`Structure::TracedLayers`]: the
    /// traced layers only).
    pub modules: Vec<Module>,
    /// Layers left out of the trace because the optimizer does not update
    /// them (frozen, e.g. when fine-tuning), by qualified name (format 7;
    /// absent: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frozen: Vec<String>,
}

fn is_sequential(s: &Structure) -> bool {
    *s == Structure::Sequential
}

impl Model {
    /// The traced layers, in forward order.
    pub fn traced_layers(&self) -> impl Iterator<Item = TracedLayer<'_>> {
        self.modules.iter().filter_map(|m| match m {
            Module::Linear(l) if l.traced => Some(TracedLayer::Linear(l)),
            Module::Conv2d(c) if c.traced => Some(TracedLayer::Conv2d(c)),
            Module::Conv1d(c) if c.traced => Some(TracedLayer::Conv1d(c)),
            Module::Embedding(e) if e.traced => Some(TracedLayer::Embedding(e)),
            Module::LayerNorm(n) if n.traced => Some(TracedLayer::LayerNorm(n)),
            Module::RmsNorm(n) if n.traced => Some(TracedLayer::RmsNorm(n)),
            _ => None,
        })
    }

    /// A traced layer by name.
    pub fn traced_layer(&self, name: &str) -> Option<TracedLayer<'_>> {
        self.traced_layers().find(|l| l.name() == name)
    }
}

/// The optimizer family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// `torch.optim.SGD` (with optional momentum, Nesterov, weight decay).
    Sgd,
    /// `torch.optim.Adam` ([`Optimizer::betas`], [`Optimizer::eps`]).
    Adam,
    /// `torch.optim.AdamW`: Adam with decoupled weight decay.
    Adamw,
    /// Any other optimizer (format 4; batch mode only): its name is in the
    /// manifest's `settings.optimizer`.
    Other,
}

impl OptimizerKind {
    /// Whether the optimizer scales each coordinate by a preconditioner
    /// (Adam, AdamW): in instance mode its `layer_steps` rows carry it
    /// (format 10) and a record's update is scaled by it, not by one number.
    pub fn preconditioned(self) -> bool {
        matches!(self, Self::Adam | Self::Adamw)
    }
}

/// How the learning rate changes over steps (the per-step value is in `steps.lr`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// The base rate at every step.
    Constant,
    /// Multiply by `gamma` every `every_epochs` epochs.
    Step {
        /// Epochs between two decays.
        every_epochs: u32,
        /// Factor applied at each decay.
        gamma: f64,
    },
    /// Cosine annealing from the base rate to `min_lr` over the run's steps.
    Cosine {
        /// The rate the annealing ends at.
        min_lr: f64,
    },
    /// Set by the training loop (e.g. a `torch.optim.lr_scheduler` class,
    /// named here); only the per-step values in `steps.lr` say what it did
    /// (format 4).
    External {
        /// The scheduler's name, e.g. `OneCycleLR`.
        name: String,
    },
}

/// Optimizer settings, with PyTorch semantics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Optimizer {
    /// The optimizer family.
    pub kind: OptimizerKind,
    /// Base learning rate.
    pub lr: f64,
    /// How the rate changes from the base rate over the steps.
    pub schedule: LrSchedule,
    /// SGD momentum factor (0: none).
    pub momentum: f64,
    /// SGD dampening of the momentum.
    pub dampening: f64,
    /// Whether SGD uses Nesterov momentum.
    pub nesterov: bool,
    /// L2 penalty (SGD, Adam) or decoupled weight decay (AdamW); 0: none.
    pub weight_decay: f64,
    /// Adam/AdamW betas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub betas: Option<[f64; 2]>,
    /// Adam/AdamW epsilon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
}

impl Optimizer {
    /// Plain SGD with a constant learning rate.
    pub fn sgd(lr: f64) -> Self {
        Self {
            kind: OptimizerKind::Sgd,
            lr,
            schedule: LrSchedule::Constant,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            betas: None,
            eps: None,
        }
    }

    /// Whether the stored records account for the whole weight change, so
    /// that the reconstruction residual must be ~0 (SGD, Adam and AdamW
    /// without weight decay in instance mode; any optimizer in batch mode).
    pub fn promises_exactness(&self, mode: Mode) -> bool {
        match mode {
            Mode::Batch => true,
            Mode::Instance => self.kind != OptimizerKind::Other && self.weight_decay == 0.0,
        }
    }
}

/// One file of the run, as committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the run directory, `/`-separated.
    pub path: String,
    /// Name of the table it belongs to ([`Table::name`]).
    pub table: String,
    /// Layer, for partitioned tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    /// Rows in the file.
    pub rows: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// A commit point: what became durable together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    /// 0, 1, 2, … in order.
    pub seq: u64,
    /// Last training step whose rows are committed (none before the first step).
    pub step: Option<Step>,
    /// Epoch of that step.
    pub epoch: Option<i32>,
    /// Files added by this commit.
    pub files: Vec<FileEntry>,
    /// Weights snapshot taken at this commit, relative path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// Checkpoint probes: the probes as of this commit's weights
    /// (`checkpoints/probes/…`, table `probes`), so that a run can be
    /// analysed before it completes. Superseded ones are dropped two commits
    /// later, all of them when the run completes (its final `probes` table
    /// takes over).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<FileEntry>,
    /// RFC 3339 time of the commit.
    pub time: String,
}

/// How the rows of a materialised attribution are aggregated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    /// One row per probe and update record (table `contributions`).
    #[default]
    Step,
    /// One row per probe, epoch and instance: the sum over the instance's
    /// records of that epoch (table `influence`).
    Epoch,
    /// One row per probe and instance: the sum over all its records (table
    /// `influence`).
    Instance,
}

impl Aggregation {
    /// `step`, `epoch` or `instance`.
    pub fn name(self) -> &'static str {
        match self {
            Aggregation::Step => "step",
            Aggregation::Epoch => "epoch",
            Aggregation::Instance => "instance",
        }
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One materialisation made by `reptrace attribute`. A run keeps every one
/// (`Manifest::attributions`); a later one with the same probes, layers,
/// steps and aggregation replaces an earlier one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attribution {
    /// The files written (table `contributions`, or `influence` when
    /// aggregated).
    pub files: Vec<FileEntry>,
    /// The probe selection as given (`test`, `train`, `ids:…`, `all`).
    pub probes: String,
    /// The probe ids it holds, as inclusive ranges `[first, last]` (empty in
    /// manifests of format 4 and older, which did not record them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_ids: Vec<[i64; 2]>,
    /// The traced layers attributed.
    pub layers: Vec<String>,
    /// Inclusive step range that was attributed.
    pub steps: Option<[i64; 2]>,
    /// Whether only each probe's own records were attributed (probes that
    /// are training instances).
    pub self_only: bool,
    /// How rows are aggregated (`step`: one per record, table `contributions`).
    #[serde(default)]
    pub by: Aggregation,
    /// Weights the probes were taken against: last step they include.
    pub as_of_step: Option<Step>,
    /// RFC 3339 time of the materialisation.
    pub time: String,
}

impl Attribution {
    /// Whether probe `id` is among [`Attribution::probe_ids`].
    pub fn has_probe(&self, id: i64) -> bool {
        self.probe_ids.iter().any(|[a, b]| (*a..=*b).contains(&id))
    }

    /// Sorted distinct ids as inclusive ranges.
    pub fn ranges(ids: &[i64]) -> Vec<[i64; 2]> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut out: Vec<[i64; 2]> = Vec::new();
        for id in ids {
            match out.last_mut() {
                Some(r) if r[1] + 1 == id => r[1] = id,
                _ => out.push([id, id]),
            }
        }
        out
    }
}

/// The probes an analysis uses ([`Manifest::analysis_probes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisProbes<'a> {
    /// Probe files (table `probes`), all layers.
    pub files: Vec<&'a FileEntry>,
    /// The weights snapshot the probes were taken against, relative path.
    pub weights: &'a str,
    /// The last step that snapshot includes (`None`: before the first step).
    pub step: Option<Step>,
    /// Whether these are checkpoint probes of an unfinished run.
    pub checkpoint: bool,
}

/// `<run>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The run's id (a UUID unless the writer chose one), also written into
    /// every Parquet file ([`kv::RUN_ID`](crate::kv::RUN_ID)).
    pub run_id: String,
    /// Whether the run is still being written, complete or aborted.
    pub status: Status,
    /// Whether update records are per instance or per batch.
    pub mode: Mode,
    /// Float type of the `updates` factors `u` and `v`.
    pub dtype: Dtype,
    /// The model, with its traced layers.
    pub model: Model,
    /// The optimizer's settings.
    pub optimizer: Optimizer,
    /// Class names, indexed by label.
    pub classes: Vec<String>,
    /// Training settings that do not change the format (seed, epochs, data…).
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
    /// RFC 3339 creation time.
    pub created: String,
    /// Every commit point, in order (`seq` 0, 1, 2, …).
    pub commits: Vec<Commit>,
    /// Why the run was aborted, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_reason: Option<String>,
    /// Every materialisation by `reptrace attribute`, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attributions: Vec<Attribution>,
    /// Format 4 and older: the one attribution a run had. Read into
    /// `attributions` when the manifest is loaded; never written.
    #[serde(default, skip_serializing)]
    attribution: Option<Attribution>,
}

impl Manifest {
    /// A new manifest with status `recording` and no commits.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        run_id: String,
        mode: Mode,
        dtype: Dtype,
        model: Model,
        optimizer: Optimizer,
        classes: Vec<String>,
        created: String,
    ) -> Self {
        Self {
            format: FORMAT_NAME.to_owned(),
            format_version: FORMAT_VERSION,
            run_id,
            status: Status::Recording,
            mode,
            dtype,
            model,
            optimizer,
            classes,
            settings: BTreeMap::new(),
            created,
            commits: Vec::new(),
            abort_reason: None,
            attributions: Vec::new(),
            attribution: None,
        }
    }

    /// Reads and checks `<run>/manifest.json` ([`Manifest::load`]) and
    /// finishes the commit a killed writer may have left half done: a file
    /// the manifest lists that is still under its temporary name is renamed
    /// to its final name ([`layout::publish`]). Every reader of a run opens it
    /// this way, so that directory-listing readers (pandas, DuckDB, Spark)
    /// then see exactly the committed rows.
    pub fn open(run: &Path) -> Result<Self> {
        let m = Self::load(run)?;
        m.publish_committed(run)?;
        Ok(m)
    }

    /// Renames every listed file still under its temporary name to its final
    /// name; returns how many it renamed. A listed file missing under both
    /// names is left to the reader that needs it to report.
    pub fn publish_committed(&self, run: &Path) -> Result<usize> {
        let mut renamed = 0;
        for f in self.all_files() {
            match layout::publish(run, &f.path) {
                Ok(true) => renamed += 1,
                Ok(false) => {}
                // Neither name exists: a damaged run, which the reader that
                // needs the file reports in its own words.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Io {
                        path: run.join(&f.path),
                        source,
                    });
                }
            }
        }
        Ok(renamed)
    }

    /// Reads and checks `<run>/manifest.json`.
    pub fn load(run: &Path) -> Result<Self> {
        if !run.is_dir() {
            return Err(Error::NoRun {
                path: run.to_path_buf(),
            });
        }
        let path = layout::manifest_path(run);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoManifest { path });
            }
            Err(source) => return Err(Error::Io { path, source }),
        };
        Self::parse(&text, &path)
    }

    /// Parses a manifest's text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        // Check format and version first, so that a newer manifest gets a
        // version error rather than a confusing field error.
        let raw: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::BadManifest {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let format = raw.get("format").and_then(|v| v.as_str()).unwrap_or("");
        let version = raw
            .get("format_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let known = u64::from(OLDEST_FORMAT_VERSION)..=u64::from(FORMAT_VERSION);
        if format != FORMAT_NAME || !known.contains(&version) {
            return Err(Error::Version {
                path: path.to_path_buf(),
                format: if format.is_empty() {
                    "<none>".into()
                } else {
                    format.to_owned()
                },
                version: u32::try_from(version).unwrap_or(u32::MAX),
                supported: format!("{FORMAT_NAME} {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}"),
            });
        }
        let mut m: Manifest = serde_json::from_value(raw).map_err(|e| Error::BadManifest {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Some(mut old) = m.attribution.take() {
            // Format 4 and older did not record the ids; an explicit list
            // says them.
            if let Some(list) = old.probes.strip_prefix("ids:") {
                let ids: Option<Vec<i64>> =
                    list.split(',').map(|x| x.trim().parse().ok()).collect();
                old.probe_ids = Attribution::ranges(&ids.unwrap_or_default());
            }
            m.attributions.insert(0, old);
        }
        m.validate(path)?;
        Ok(m)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| Error::BadManifest {
            path: path.to_path_buf(),
            message,
        };
        for layer in self.model.traced_layers() {
            layout::check_layer_name(layer.name()).map_err(|e| bad(e.to_string()))?;
        }
        for layer in self.model.modules.iter().filter_map(Module::layer) {
            layer.check().map_err(bad)?;
        }
        for (i, c) in self.commits.iter().enumerate() {
            if c.seq != i as u64 {
                return Err(bad(format!("commit {i} has seq {}", c.seq)));
            }
            let paths = c.files.iter().chain(&c.probes).map(|f| f.path.as_str());
            for p in paths.chain(c.weights.as_deref()) {
                layout::check_relative(p).map_err(|e| bad(e.to_string()))?;
            }
        }
        for f in self.attributions.iter().flat_map(|a| &a.files) {
            layout::check_relative(&f.path).map_err(|e| bad(e.to_string()))?;
        }
        Ok(())
    }

    /// Serializes as pretty JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain data structs cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The last committed training step, if any.
    pub fn last_step(&self) -> Option<Step> {
        self.commits.iter().rev().find_map(|c| c.step)
    }

    /// Every committed file of `table` (training commits and attribution).
    pub fn files(&self, table: Table) -> Vec<&FileEntry> {
        let name = table.name();
        let from_commits = self.commits.iter().flat_map(|c| c.files.iter());
        let from_attr = self.attributions.iter().flat_map(|a| a.files.iter());
        from_commits
            .chain(from_attr)
            .filter(|f| f.table == name)
            .collect()
    }

    /// The weights snapshot taken last, with the step it is "as of".
    pub fn latest_weights(&self) -> Option<(&str, Option<Step>)> {
        self.commits
            .iter()
            .rev()
            .find_map(|c| c.weights.as_deref().map(|w| (w, c.step)))
    }

    /// What an analysis of the run stands on: the probes, the weights
    /// snapshot they were taken against and its step.
    ///
    /// - A run whose training wrote a `probes` table (committed with or
    ///   before its latest weights snapshot, normally the final one) uses the
    ///   table with the latest weights; probes added to it later are part of
    ///   the table.
    /// - A run without one (killed or aborted during training) uses the
    ///   checkpoint probes of its latest commit that has both probes and
    ///   weights, together with the `probes` table files committed after its
    ///   latest weights snapshot: probes added later, against that
    ///   checkpoint's weights.
    /// - A run with neither but with `probes` table files added after its
    ///   latest weights snapshot uses those with the latest weights.
    ///
    /// `None`: no probes are committed.
    pub fn analysis_probes(&self) -> Option<AnalysisProbes<'_>> {
        let table = self.files(Table::Probes);
        // Probe table files committed with or before the latest weights
        // snapshot were written by training; later ones were added after it.
        let recorded = self
            .commits
            .iter()
            .rposition(|c| c.weights.is_some())
            .is_some_and(|last| {
                self.commits[..=last]
                    .iter()
                    .flat_map(|c| &c.files)
                    .any(|f| f.table == Table::Probes.name())
            });
        if !recorded
            && let Some(c) = self
                .commits
                .iter()
                .rev()
                .find(|c| c.weights.is_some() && !c.probes.is_empty())
        {
            let mut files: Vec<&FileEntry> = c.probes.iter().collect();
            files.extend(table);
            return Some(AnalysisProbes {
                files,
                weights: c.weights.as_deref()?,
                step: c.step,
                checkpoint: true,
            });
        }
        if table.is_empty() {
            return None;
        }
        let (weights, step) = self.latest_weights()?;
        Some(AnalysisProbes {
            files: table,
            weights,
            step,
            checkpoint: false,
        })
    }

    /// Every committed file: the tables' and the checkpoint probes.
    pub fn all_files(&self) -> Vec<&FileEntry> {
        let checkpoint = self.commits.iter().flat_map(|c| c.probes.iter());
        Table::ALL
            .iter()
            .flat_map(|&t| self.files(t))
            .chain(checkpoint)
            .collect()
    }

    /// The initial weights snapshot (taken before the first step).
    pub fn initial_weights(&self) -> Option<&str> {
        self.commits.first().and_then(|c| c.weights.as_deref())
    }

    /// Absolute path of a committed file.
    pub fn resolve(run: &Path, rel: &str) -> PathBuf {
        run.join(rel)
    }
}
