//! Traced mini-batch training.
//!
//! One forward and one backward pass per step give the gradient at every
//! traced layer's output for every example of the batch (`δ`, asked of
//! autograd together with the parameter gradients), from which the factors
//! of each example's update are built on the device ([`crate::factors`]) and
//! copied to the host once per layer and factor. The [`Recorder`] writes
//! them on its own thread.
//!
//! What a run records: `instances` (both splits), per step one `steps` row
//! and one `updates` row per traced layer and example, the weights before
//! the first step, at each epoch end (a commit point) and at the end, and
//! after training the probes of the chosen probe set. Each epoch-end commit
//! also holds checkpoint probes (the probes as of its weights), so that a
//! run that never finishes can still be analysed up to its last commit. With no traced layers
//! nothing is recorded and training is the same, bit for bit.
//!
//! Under Adam/AdamW an instance-mode record holds the example's share of the
//! gradient (`v = −κ·δ`, no learning rate) and each `layer_steps` row the
//! step size and preconditioner `D_t` read from the optimizer after the step
//! (docs/method.md §6).
//!
//! Batch mode ([`Mode::Batch`]) records instead, per step and traced layer,
//! the whole update `ΔW = W_{t+1} − W_t` (and `Δb`) as one row, with the
//! batch's members in `batches`: it works with any optimizer (Adam, AdamW)
//! and costs one row per layer and step. With class-pure batches
//! ([`TrainConfig::class_pure_batches`]) every batch holds one class, so
//! class shares stay exact.
use crate::adam::{Adam, Decay};
use crate::data::{DataSource, Dataset};
use crate::model::{HostTensor, ModelChoice, Network, TraceLayers, build_model};
use crate::probe::{self, ProbeSet};
use crate::sgd::{Sgd, learning_rate};
use crate::trace::{Step, Tracer};
use crate::{Error, Result};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use reptrace_format::{Dtype, LrSchedule, Manifest, Mode, Model, Optimizer, OptimizerKind, Split};
use reptrace_record::{NamedTensor, ProbeBatch, Recorder};
use serde_json::json;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Where to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The CPU (`--device cpu`, the default).
    #[default]
    Cpu,
    /// A CUDA device by index.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    /// `cpu`, `cuda` or `cuda:N`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device {s:?} (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// The tch device, or an error when it is not available.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) => {
                let count = if tch::Cuda::is_available() {
                    tch::Cuda::device_count() as usize
                } else {
                    0
                };
                if n < count {
                    Ok(Device::Cuda(n))
                } else {
                    let hint = if count == 0 {
                        if cfg!(feature = "cuda") {
                            " (no CUDA device or driver found)".to_owned()
                        } else {
                            " (this build has no CUDA support: build with feature cuda)".to_owned()
                        }
                    } else {
                        format!(" ({count} CUDA device(s))")
                    };
                    Err(Error::NoDevice {
                        device: self.to_string(),
                        hint,
                    })
                }
            }
        }
    }
}

/// Everything a training run needs; [`TrainConfig::default`] then set fields.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// The model to build (`--model`; default `mlp`, hidden widths 32, 16).
    pub model: ModelChoice,
    /// Used by [`train`]; [`train_on`] takes the data set instead.
    pub data: DataSource,
    /// Passes over the training split (`--epochs`, at least 1; default 10).
    pub epochs: usize,
    /// Training instances per step (`--batch-size`, at least 1; default 32);
    /// an epoch's last batch (each class's last, with class-pure batches)
    /// may be smaller.
    pub batch_size: usize,
    /// Base learning rate.
    pub lr: f64,
    /// How the learning rate changes from step to step (`--lr-schedule`;
    /// default constant; see [`learning_rate`]).
    pub schedule: LrSchedule,
    /// SGD momentum `μ`, in `[0, 1)` (`--momentum`; default 0); SGD only.
    pub momentum: f64,
    /// SGD dampening of the momentum buffer, in `[0, 1]` (default 0; no
    /// `reptrace train` flag, which always uses 0).
    pub dampening: f64,
    /// Nesterov momentum (`--nesterov`): needs a momentum > 0 and zero
    /// dampening.
    pub nesterov: bool,
    /// Weight decay, ≥ 0 (`--weight-decay`; default 0): L2 added to the
    /// gradient for SGD and Adam, decoupled for AdamW, as in PyTorch.
    pub weight_decay: f64,
    /// SGD, Adam or AdamW (PyTorch semantics, no AMSGrad), in either mode.
    pub optimizer: OptimizerKind,
    /// Adam/AdamW coefficients of the moment estimates.
    pub betas: [f64; 2],
    /// Adam/AdamW term added to the denominator.
    pub eps: f64,
    /// Instance mode (one record per example; under Adam/AdamW with each
    /// step's preconditioner in `layer_steps`) or batch mode (one record per
    /// step: the whole update).
    pub mode: Mode,
    /// Every batch holds instances of a single class: each class's
    /// instances, shuffled, are cut into batches, and the batches are
    /// shuffled. Class shares of batch-mode records are then exact.
    pub class_pure_batches: bool,
    /// Seeds initialisation, dropout and shuffling.
    pub seed: u64,
    /// The Linear/Conv2d layers whose updates are recorded (`--trace-layers`;
    /// default all); with none, training records nothing.
    pub trace_layers: TraceLayers,
    /// Stored factor type.
    pub dtype: Dtype,
    /// Where to train (`--device`; default the CPU).
    pub device: DeviceChoice,
    /// The instances whose probes are written at each epoch end and after
    /// training (`--probes`; default the test split).
    pub probes: ProbeSet,
    /// The run directory (must not exist or be empty); unused without traced layers.
    pub out: PathBuf,
    /// Zstandard level of the run's Parquet files (`None`: the recorder's
    /// default, 1).
    pub zstd_level: Option<i32>,
    /// Compression while recording (default zstd, the storage encoding;
    /// `None` keeps the writer off a fast loop's critical path, and
    /// `reptrace compact` rewrites the run afterwards).
    pub compression: reptrace_record::Compression,
    /// libtorch's intra-op CPU threads (process-wide, set when training
    /// starts); `None`: one less than the available cores (at least 1), which
    /// leaves a core to the recorder's writer thread. Small models train
    /// fastest with 1.
    pub threads: Option<usize>,
    /// Record each training example's loss, predicted class and probability
    /// of its label at every step (table `examples`; on by default).
    pub examples: bool,
}

impl Default for TrainConfig {
    /// MLP on digits, 10 epochs, batch 32, plain SGD with lr 0.1, all layers
    /// traced, f32, CPU, test probes, into `runs/run`.
    fn default() -> Self {
        Self {
            model: ModelChoice::default(),
            data: DataSource::Digits,
            epochs: 10,
            batch_size: 32,
            lr: 0.1,
            schedule: LrSchedule::Constant,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            optimizer: OptimizerKind::Sgd,
            betas: [0.9, 0.999],
            eps: 1e-8,
            mode: Mode::Instance,
            class_pure_batches: false,
            seed: 42,
            trace_layers: TraceLayers::All,
            dtype: Dtype::F32,
            device: DeviceChoice::Cpu,
            probes: ProbeSet::Test,
            out: PathBuf::from("runs/run"),
            zstd_level: None,
            compression: reptrace_record::Compression::Zstd,
            threads: None,
            examples: true,
        }
    }
}

impl TrainConfig {
    /// The settings of `reptrace demo`: the MLP on digits, 20 epochs, batch
    /// 32, lr 0.1 with cosine annealing to 0, momentum 0.9 (about 92 % test
    /// accuracy, a few seconds on one core).
    pub fn demo(out: impl Into<PathBuf>) -> Self {
        Self {
            epochs: 20,
            momentum: 0.9,
            schedule: LrSchedule::Cosine { min_lr: 0.0 },
            out: out.into(),
            ..Self::default()
        }
    }

    /// Checks the settings; the error names the setting at fault.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |setting: &'static str, message: String| Err(Error::BadSetting { setting, message });
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch-size", "must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} is not a positive number", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad("momentum", format!("{} is not in [0, 1)", self.momentum));
        }
        if !(0.0..=1.0).contains(&self.dampening) {
            return bad("dampening", format!("{} is not in [0, 1]", self.dampening));
        }
        if self.nesterov && (self.momentum == 0.0 || self.dampening != 0.0) {
            return bad("nesterov", "needs a momentum > 0 and zero dampening".into());
        }
        if self.optimizer == OptimizerKind::Other {
            return bad("optimizer", "expected sgd, adam or adamw".into());
        }
        if self.optimizer != OptimizerKind::Sgd {
            let name = optimizer_name(self.optimizer);
            if self.momentum != 0.0 || self.nesterov {
                return bad(
                    "momentum",
                    format!("applies to sgd only ({name} uses betas)"),
                );
            }
        }
        if !self.betas.iter().all(|b| (0.0..1.0).contains(b)) {
            return bad("betas", format!("{:?} are not both in [0, 1)", self.betas));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", format!("{} is not a positive number", self.eps));
        }
        if self.threads == Some(0) {
            return bad("threads", "must be at least 1".into());
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight-decay",
                format!("{} is not a number ≥ 0", self.weight_decay),
            );
        }
        match &self.schedule {
            LrSchedule::Constant => {}
            LrSchedule::Step {
                every_epochs,
                gamma,
            } => {
                if *every_epochs == 0 || !(gamma.is_finite() && *gamma > 0.0) {
                    return bad(
                        "lr-schedule",
                        format!("step:{every_epochs}:{gamma}: needs every ≥ 1 epoch and gamma > 0"),
                    );
                }
            }
            LrSchedule::Cosine { min_lr } => {
                if !(min_lr.is_finite() && *min_lr >= 0.0 && *min_lr <= self.lr) {
                    return bad(
                        "lr-schedule",
                        format!("cosine:{min_lr}: min lr must be in [0, lr]"),
                    );
                }
            }
            LrSchedule::External { name } => {
                return bad(
                    "lr-schedule",
                    format!(
                        "{name}: an external schedule is recorded by other producers, not run here"
                    ),
                );
            }
        }
        Ok(())
    }

    /// The optimizer as the manifest describes it.
    pub fn optimizer(&self) -> Optimizer {
        let adam = self.optimizer != OptimizerKind::Sgd;
        Optimizer {
            kind: self.optimizer,
            lr: self.lr,
            schedule: self.schedule.clone(),
            momentum: self.momentum,
            dampening: self.dampening,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            betas: adam.then_some(self.betas),
            eps: adam.then_some(self.eps),
        }
    }

    /// The optimizer state for `n_params` parameters.
    fn optimizer_state(&self, n_params: usize) -> OptimizerState {
        let adam = |decay| {
            OptimizerState::Adam(Adam::new(
                n_params,
                self.betas,
                self.eps,
                self.weight_decay,
                decay,
            ))
        };
        match self.optimizer {
            OptimizerKind::Sgd => OptimizerState::Sgd(Sgd::new(
                n_params,
                self.momentum,
                self.dampening,
                self.nesterov,
                self.weight_decay,
            )),
            OptimizerKind::Adam => adam(Decay::L2),
            // Refused by validate(): only the Python tracer records others.
            OptimizerKind::Adamw | OptimizerKind::Other => adam(Decay::Decoupled),
        }
    }
}

/// The flag value naming an optimizer.
pub fn optimizer_name(kind: OptimizerKind) -> &'static str {
    match kind {
        OptimizerKind::Sgd => "sgd",
        OptimizerKind::Adam => "adam",
        OptimizerKind::Adamw => "adamw",
        OptimizerKind::Other => "other",
    }
}

/// The state of the run's optimizer.
#[derive(Debug)]
enum OptimizerState {
    Sgd(Sgd),
    Adam(Adam),
}

impl OptimizerState {
    fn step(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64) -> Result<()> {
        match self {
            OptimizerState::Sgd(o) => o.step(params, grads, lr),
            OptimizerState::Adam(o) => o.step(params, grads, lr),
        }
    }
}

/// One epoch's batches (rows of the data set) from the shuffled training
/// rows `order`: consecutive chunks of `batch_size`, or with `class_pure`
/// each class's rows (in shuffled order) cut into chunks, then the batches
/// shuffled with `rng`.
pub fn epoch_batches(
    order: &[usize],
    labels: &[i32],
    batch_size: usize,
    class_pure: bool,
    rng: &mut impl rand::Rng,
) -> Vec<Vec<usize>> {
    if !class_pure {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut by_class: std::collections::BTreeMap<i32, Vec<usize>> = Default::default();
    for &r in order {
        by_class.entry(labels[r]).or_default().push(r);
    }
    let mut batches: Vec<Vec<usize>> = by_class
        .values()
        .flat_map(|rows| rows.chunks(batch_size).map(<[usize]>::to_vec))
        .collect();
    batches.shuffle(rng);
    batches
}

/// What the training loop reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Before the first step.
    Started {
        /// The number of epochs that will run.
        epochs: usize,
        /// Batches, hence steps, per epoch (the same in every epoch).
        steps_per_epoch: usize,
        /// Names of the traced layers, in forward order (empty: nothing is
        /// recorded).
        traced_layers: Vec<String>,
    },
    /// After each step.
    Step {
        /// The step's epoch, from 0.
        epoch: usize,
        /// Step within the epoch, from 0.
        step_in_epoch: usize,
        /// The step's batch loss (mean cross-entropy over the batch, before
        /// the update).
        loss: f64,
    },
    /// After each epoch.
    Epoch(EpochStats),
    /// Writing probes after training.
    Probes {
        /// The number of probe instances.
        probes: usize,
        /// The number of traced layers each probe gets a row in.
        layers: usize,
    },
}

/// Statistics of one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochStats {
    /// The epoch, from 0.
    pub epoch: usize,
    /// Mean batch loss over the epoch.
    pub loss: f64,
    /// Accuracy on the training batches as they were trained (training mode).
    pub train_accuracy: f64,
    /// Accuracy of the network at the epoch end on the test split (none if empty).
    pub test_accuracy: Option<f64>,
    /// Wall-clock seconds of the epoch: its steps, the test evaluation and,
    /// when recording, the epoch-end probes and commit.
    pub seconds: f64,
}

/// What a training run produced.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// The number of epochs trained ([`TrainConfig::epochs`]).
    pub epochs: usize,
    /// The number of optimizer steps over all epochs.
    pub steps: usize,
    /// Mean batch loss of the last epoch.
    pub loss: f64,
    /// Accuracy of the final network on the training split (eval mode).
    pub train_accuracy: f64,
    /// Accuracy of the final network on the test split, if it has rows.
    pub test_accuracy: Option<f64>,
    /// Names of the traced layers, in forward order.
    pub traced_layers: Vec<String>,
    /// The run directory and its final manifest, when anything was recorded.
    pub run: Option<(PathBuf, Manifest)>,
    /// The final weights.
    pub weights: Vec<HostTensor>,
    /// Seconds spent in the training loop (steps and epoch-end evaluation).
    pub train_seconds: f64,
    /// Of those, seconds spent building the factors and copying them to
    /// the host (on CUDA this includes waiting for the step's kernels).
    pub factor_seconds: f64,
    /// Of those, seconds spent in recorder calls during the steps (they
    /// block while the writer thread's bounded queue is full).
    pub record_seconds: f64,
    /// Seconds for the whole run (including probes and the last commit).
    pub total_seconds: f64,
}

/// Asks the C allocator to keep memory that is freed for reuse instead of
/// handing it back to the system at once: what `reptrace train` does at
/// start, for the whole process. A traced step allocates its factors'
/// host copies and the recorder's writer its Arrow buffers and compressed
/// pages anew, and glibc returns such blocks (hundreds of KB each, 32 MB
/// row groups) to the system when they are freed, so that every step
/// faults its pages in again (about 60 faults per step of a 784-256-10 MLP
/// at batch 64 in the writer alone). Kept, they are reused: on a 2-core
/// machine that MLP with zstd trained traced at ×1.14 of its untraced time
/// instead of ×1.23 (docs/benchmarks.md, "Freed memory kept for reuse").
/// The process's resident memory then stays at its peak. Call it before
/// training, in a program of your own too; it does nothing outside glibc
/// (Linux with the GNU C library) and returns whether it applied.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Blocks up to 32 MiB (glibc's largest threshold) from the heap
        // rather than their own mappings; no trimming of the heap's top;
        // 64 MiB more asked of the system each time the heap grows.
        // SAFETY: mallopt only sets the allocator's parameters, under its
        // own lock; no memory is touched.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
                && libc::mallopt(libc::M_TOP_PAD, 64 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Loads `config.data` and trains on it ([`train_on`]).
pub fn train(config: &TrainConfig, progress: &mut dyn FnMut(&Progress)) -> Result<TrainSummary> {
    config.validate()?;
    let data = config.data.load()?;
    train_on(config, &data, progress)
}

/// Trains on `data` as `config` says, recording into `config.out` when any
/// layer is traced.
pub fn train_on(
    config: &TrainConfig,
    data: &Dataset,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TrainSummary> {
    let started = Instant::now();
    config.validate()?;
    let device = config.device.device()?;
    let threads = config.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
    });
    tch::set_num_threads(threads as i32);
    let (model, traced) = run_model(config, data)?;
    let net = Network::new(&model, config.seed as i64, device)?;
    let rec = if traced.is_empty() {
        None
    } else {
        Some(recorder(config, data, &model, threads)?)
    };
    // The recorder goes to a tracer of the network's traced layers: the
    // built-in loop records through the same API as a user's loop.
    let mut tracer = match rec {
        None => None,
        Some(rec) => {
            let mut tracer = Tracer::new();
            for i in 0..model.modules.len() {
                let (Some(_), Some((weight, bias))) = (net.traced_layer(i), net.layer_params(i))
                else {
                    continue;
                };
                tracer.add_spec(model.modules[i].clone(), weight, bias)?;
            }
            tracer.record_with(
                rec,
                data.classes.len(),
                config.mode,
                config.dtype,
                config.optimizer(),
            )?;
            Some(tracer)
        }
    };
    let mut run = Run {
        config,
        data,
        net: &net,
        tracer: tracer.as_mut(),
        traced,
        progress,
    };
    let result = run.all();
    match (result, tracer.as_mut().and_then(Tracer::recorder)) {
        (Ok(mut summary), Some(rec)) => {
            let named = summary.weights.iter().map(named).collect::<Vec<_>>();
            let manifest = rec.finish(&named)?;
            summary.run = Some((config.out.clone(), manifest));
            summary.total_seconds = started.elapsed().as_secs_f64();
            Ok(summary)
        }
        (Ok(mut summary), None) => {
            summary.total_seconds = started.elapsed().as_secs_f64();
            Ok(summary)
        }
        (Err(e), Some(rec)) => {
            // Commit what is good so far and keep the reason in the manifest.
            // A non-finite loss stops the step before any update: the
            // weights are those after the last good step, so they become
            // its snapshot and the committed trace reaches that step.
            if matches!(e, Error::NonFiniteLoss { .. })
                && let Ok(now) = net.to_host()
                && let Err(w) = rec.weights(&now.iter().map(named).collect::<Vec<_>>())
            {
                tracing::warn!("could not snapshot the last good weights: {w}");
            }
            if let Err(abort) = rec.abort(e.to_string()) {
                tracing::warn!("could not abort the run cleanly: {abort}");
            }
            Err(e)
        }
        (Err(e), None) => Err(e),
    }
}

/// The model `config` asks for over `data`'s shape and classes, and the
/// names of its traced layers. In batch mode a Conv2d layer's record is its
/// whole update (full storage); instance mode refuses a batch norm in a
/// traced model (it couples the examples of a batch).
fn run_model(config: &TrainConfig, data: &Dataset) -> Result<(Model, Vec<String>)> {
    let mut model = build_model(
        &config.model,
        &data.shape,
        data.classes.len(),
        &config.trace_layers,
    )?;
    if config.mode == Mode::Batch {
        // A batch-mode record is the whole update of the layer.
        for m in &mut model.modules {
            if let reptrace_format::Module::Conv2d(c) = m {
                c.storage = crate::kinds::conv2d::storage(
                    c.out_channels,
                    c.patch_len(),
                    c.positions(),
                    c.bias,
                    config.mode,
                );
            }
        }
    }
    let traced: Vec<String> = model.traced_layers().map(|l| l.name().to_owned()).collect();
    if config.mode == Mode::Instance
        && !traced.is_empty()
        && let Some(name) = model.modules.iter().find_map(|m| match m {
            reptrace_format::Module::BatchNorm1d { name, .. }
            | reptrace_format::Module::BatchNorm2d { name, .. } => Some(name),
            _ => None,
        })
    {
        return Err(Error::CouplingModule {
            model: model.name.clone(),
            module: format!("{name} (batch norm)"),
        });
    }
    Ok((model, traced))
}

/// The recorder of a run of `model` on `data` into `config.out`, with the
/// run's settings in its manifest.
fn recorder(
    config: &TrainConfig,
    data: &Dataset,
    model: &Model,
    threads: usize,
) -> Result<Recorder> {
    let mut builder = Recorder::builder(&config.out);
    if let Some(level) = config.zstd_level {
        builder = builder.zstd_level(level);
    }
    builder = builder.compression(config.compression);
    Ok(builder
        .model(model.clone())
        .optimizer(config.optimizer())
        .classes(data.classes.clone())
        .dtype(config.dtype)
        .mode(config.mode)
        .setting("data", json!(data.name))
        .setting("seed", json!(config.seed))
        .setting("epochs", json!(config.epochs))
        .setting("batch_size", json!(config.batch_size))
        .setting("class_pure_batches", json!(config.class_pure_batches))
        .setting("device", json!(config.device.to_string()))
        .setting("threads", json!(threads))
        .setting("trace_layers", json!(config.trace_layers.to_string()))
        .setting("probes", json!(config.probes.to_string()))
        .setting("examples", json!(config.examples))
        .setting("n_train", json!(data.n_train))
        .setting("n_test", json!(data.n_test()))
        .build()?)
}

fn named(t: &HostTensor) -> NamedTensor<'_> {
    NamedTensor {
        name: &t.name,
        shape: &t.shape,
        data: &t.data,
    }
}

/// One training run in progress.
struct Run<'a> {
    config: &'a TrainConfig,
    data: &'a Dataset,
    net: &'a Network,
    tracer: Option<&'a mut Tracer>,
    traced: Vec<String>,
    progress: &'a mut dyn FnMut(&Progress),
}

/// Every row of `data` on `device`: the features shaped `[n, shape…]` and
/// the labels as i64.
fn data_tensors(data: &Dataset, device: Device) -> Result<(Tensor, Tensor)> {
    let n = data.len() as i64;
    let mut dims = vec![n];
    dims.extend(data.shape.iter().map(|&s| s as i64));
    let x_all = Tensor::f_from_slice(&data.features)?
        .f_reshape(dims)?
        .f_to_device(device)?;
    let labels64: Vec<i64> = data.labels.iter().map(|&l| i64::from(l)).collect();
    let y_all = Tensor::f_from_slice(&labels64)?.f_to_device(device)?;
    Ok((x_all, y_all))
}

/// Accuracy on the test split, if it has rows.
fn test_accuracy(
    net: &Network,
    data: &Dataset,
    x_all: &Tensor,
    y_all: &Tensor,
) -> Result<Option<f64>> {
    if data.n_test() > 0 {
        Ok(Some(accuracy(net, x_all, y_all, data.n_train..data.len())?))
    } else {
        Ok(None)
    }
}

/// Rows per forward pass when evaluating or probing.
pub(crate) const EVAL_CHUNK: usize = 1024;

impl Run<'_> {
    fn rec(&mut self) -> Option<&mut Recorder> {
        self.tracer.as_deref_mut().and_then(Tracer::recorder)
    }

    /// The run's first commit: its instances and initial weights.
    fn record_start(&mut self) -> Result<()> {
        let (data, net) = (self.data, self.net);
        let initial_host = net.to_host()?;
        if let Some(rec) = self.rec() {
            let ids: Vec<i64> = (0..data.len() as i64).collect();
            let splits: Vec<Split> = (0..data.len()).map(|r| data.split(r)).collect();
            rec.instances(&ids, &data.labels, &splits)?;
            rec.weights(&initial_host.iter().map(named).collect::<Vec<_>>())?;
            rec.commit()?;
        }
        Ok(())
    }

    /// A commit point at an epoch's end: the weights and the probes as of
    /// now, so that the run can be analysed up to here if it never ends.
    fn commit_epoch(&mut self, x_all: &Tensor, initial: &[Tensor]) -> Result<()> {
        if self.config.probes != ProbeSet::None {
            self.probes(x_all, initial, true)?;
        }
        let now = self.net.to_host()?;
        if let Some(rec) = self.rec() {
            rec.weights(&now.iter().map(named).collect::<Vec<_>>())?;
            rec.commit()?;
        }
        Ok(())
    }

    fn all(&mut self) -> Result<TrainSummary> {
        let (cfg, data, net) = (self.config, self.data, self.net);
        let (x_all, y_all) = data_tensors(data, net.device())?;

        let (names, params): (Vec<String>, Vec<Tensor>) = net.parameters().into_iter().unzip();
        let initial: Vec<Tensor> = params
            .iter()
            .map(|p| p.f_detach_copy())
            .collect::<Result<_, _>>()?;
        self.record_start()?;

        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut order: Vec<usize> = (0..data.n_train).collect();
        // Class sizes do not change, so neither does the number of batches.
        let steps_per_epoch = epoch_batches(
            &order,
            &data.labels,
            cfg.batch_size,
            cfg.class_pure_batches,
            &mut rng.clone(),
        )
        .len();
        let total_steps = steps_per_epoch * cfg.epochs;
        (self.progress)(&Progress::Started {
            epochs: cfg.epochs,
            steps_per_epoch,
            traced_layers: self.traced.clone(),
        });
        let mut optimizer = cfg.optimizer_state(params.len());
        let mut step = 0usize;
        let mut last_loss = f64::NAN;
        let loop_start = Instant::now();
        for epoch in 0..cfg.epochs {
            let epoch_start = Instant::now();
            if let Some(tracer) = self.tracer.as_deref_mut() {
                tracer.set_epoch(epoch as i32);
            }
            order.shuffle(&mut rng);
            let batches = epoch_batches(
                &order,
                &data.labels,
                cfg.batch_size,
                cfg.class_pure_batches,
                &mut rng,
            );
            let (mut loss_sum, mut correct) = (0.0f64, 0i64);
            for (i, rows) in batches.iter().enumerate() {
                let lr = learning_rate(&cfg.schedule, cfg.lr, step, epoch, total_steps);
                let (loss, ok) = self.step(StepInput {
                    rows,
                    step,
                    epoch,
                    lr,
                    x_all: &x_all,
                    y_all: &y_all,
                    params: &params,
                    names: &names,
                    optimizer: &mut optimizer,
                })?;
                loss_sum += loss;
                correct += ok;
                (self.progress)(&Progress::Step {
                    epoch,
                    step_in_epoch: i,
                    loss,
                });
                step += 1;
            }
            let test_accuracy = test_accuracy(net, data, &x_all, &y_all)?;
            if self.tracer.is_some() {
                self.commit_epoch(&x_all, &initial)?;
            }
            last_loss = loss_sum / steps_per_epoch as f64;
            (self.progress)(&Progress::Epoch(EpochStats {
                epoch,
                loss: last_loss,
                train_accuracy: correct as f64 / data.n_train as f64,
                test_accuracy,
                seconds: epoch_start.elapsed().as_secs_f64(),
            }));
        }
        let train_seconds = loop_start.elapsed().as_secs_f64();

        let train_accuracy = accuracy(net, &x_all, &y_all, 0..data.n_train)?;
        let test_accuracy = test_accuracy(net, data, &x_all, &y_all)?;
        if self.tracer.is_some() && cfg.probes != ProbeSet::None {
            self.probes(&x_all, &initial, false)?;
        }
        let timing = self.tracer.as_ref().map(|t| t.timing).unwrap_or_default();
        Ok(TrainSummary {
            epochs: cfg.epochs,
            steps: total_steps,
            loss: last_loss,
            train_accuracy,
            test_accuracy,
            traced_layers: self.traced.clone(),
            run: None,
            weights: net.to_host()?,
            train_seconds,
            factor_seconds: timing.factors.as_secs_f64(),
            record_seconds: timing.record.as_secs_f64(),
            total_seconds: 0.0,
        })
    }

    /// One optimizer step; returns the batch loss and the number of correct predictions.
    fn step(&mut self, s: StepInput<'_>) -> Result<(f64, i64)> {
        let net = self.net;
        let device = net.device();
        let ids: Vec<i64> = s.rows.iter().map(|&r| r as i64).collect();
        let labels: Vec<i32> = s.rows.iter().map(|&r| self.data.labels[r]).collect();
        let index = Tensor::f_from_slice(&ids)?.f_to_device(device)?;
        let x = s.x_all.f_index_select(0, &index)?;
        let y = s.y_all.f_index_select(0, &index)?;
        let logits = match self.tracer.as_deref() {
            Some(tracer) => net.forward_traced(&x, true, tracer.taps())?,
            None => net.forward(&x, true, false)?.0,
        };
        let log_p = logits.f_log_softmax(-1, Kind::Float)?;
        let loss = log_p.f_nll_loss::<Tensor>(&y, None, tch::Reduction::Mean, -100)?;
        let loss_value = loss.f_double_value(&[])?;
        if !loss_value.is_finite() {
            return Err(Error::NonFiniteLoss {
                step: s.step as i64,
                epoch: s.epoch as i32,
                loss: loss_value,
            });
        }
        let predicted = logits.f_argmax(-1, false)?;
        let correct = predicted
            .f_eq_tensor(&y)?
            .f_sum(Kind::Int64)?
            .f_int64_value(&[])?;
        let Some(tracer) = self.tracer.as_deref_mut() else {
            let grads = Tensor::f_run_backward(&[&loss], s.params, false, false)?;
            s.optimizer.step(s.params, &grads, s.lr)?;
            return Ok((loss_value, correct));
        };
        // δ at every traced layer and the parameter gradients from one
        // backward pass; the tracer records the step, then the update runs.
        let grads = tracer.backward(&loss, s.params)?;
        let step = Step {
            loss: &loss,
            ids: &ids,
            labels: &labels,
            lr: s.lr,
            momentum: None,
            logits: self.config.examples.then_some(&logits),
        };
        if self.config.optimizer.preconditioned() {
            // Adam/AdamW: the tracer reads each traced parameter's moments
            // after the update (its preconditioner and the check).
            let (params, names) = (s.params, s.names);
            tracer.step_adam(
                &step,
                s.optimizer,
                |o| o.step(params, &grads, s.lr),
                |o, name| match o {
                    OptimizerState::Adam(adam) => names
                        .iter()
                        .position(|n| n == name)
                        .and_then(|i| adam.state(i)),
                    OptimizerState::Sgd(_) => None,
                },
            )??;
        } else {
            tracer.step(&step, || s.optimizer.step(s.params, &grads, s.lr))??;
        }
        Ok((loss_value, correct))
    }

    /// Writes the probes of every traced layer as of the current weights:
    /// the final ones, or (`checkpoint`) those of the next commit point.
    fn probes(&mut self, x_all: &Tensor, initial: &[Tensor], checkpoint: bool) -> Result<()> {
        let (net, data) = (self.net, self.data);
        let rows = self.config.probes.rows(data.n_train, data.len());
        if !checkpoint {
            (self.progress)(&Progress::Probes {
                probes: rows.len(),
                layers: self.traced.len(),
            });
        }
        let Some(rec) = self.tracer.as_deref_mut().and_then(Tracer::recorder) else {
            return Ok(());
        };
        // Initial parameters by name, to pair with each layer's final ones.
        let names: Vec<String> = net.parameters().into_iter().map(|(n, _)| n).collect();
        let init = |name: &str| names.iter().position(|n| n == name).map(|i| &initial[i]);
        let displacements = probe::displacements(net, init)?;
        let rows: Vec<usize> = rows.collect();
        for chunk in rows.chunks(EVAL_CHUNK) {
            let (start, len) = (chunk[0] as i64, chunk.len() as i64);
            let x = x_all.f_narrow(0, start, len)?;
            let out = probe::probe_chunk(net, &displacements, &x)?;
            let probe_ids: Vec<i64> = chunk.iter().map(|&r| r as i64).collect();
            let instance_ids: Vec<Option<i64>> = chunk
                .iter()
                .map(|&r| (data.split(r) == Split::Train).then_some(r as i64))
                .collect();
            let labels: Vec<i32> = chunk.iter().map(|&r| data.labels[r]).collect();
            for l in &out.layers {
                let Some(layer) = net.traced_layer(l.module) else {
                    continue;
                };
                let batch = ProbeBatch {
                    probe_ids: &probe_ids,
                    instance_ids: &instance_ids,
                    labels: &labels,
                    predicted: &out.predicted,
                    a: &l.a,
                    p: &l.p,
                    positions: None,
                };
                if checkpoint {
                    rec.checkpoint_probes(layer.name(), batch)?;
                } else {
                    rec.probes(layer.name(), batch)?;
                }
            }
        }
        Ok(())
    }
}

/// The inputs of one step.
struct StepInput<'a> {
    rows: &'a [usize],
    step: usize,
    epoch: usize,
    lr: f64,
    x_all: &'a Tensor,
    y_all: &'a Tensor,
    params: &'a [Tensor],
    /// The parameters' names (`layer.weight`), in the order of `params`.
    names: &'a [String],
    optimizer: &'a mut OptimizerState,
}

/// Accuracy of the network (eval mode) on the contiguous rows `rows`.
pub fn accuracy(
    net: &Network,
    x_all: &Tensor,
    y_all: &Tensor,
    rows: std::ops::Range<usize>,
) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let mut correct = 0i64;
    let mut start = rows.start;
    while start < rows.end {
        let len = EVAL_CHUNK.min(rows.end - start);
        let x = x_all.f_narrow(0, start as i64, len as i64)?;
        let y = y_all.f_narrow(0, start as i64, len as i64)?;
        let (logits, _) = net.forward(&x, false, false)?;
        correct += logits
            .f_argmax(-1, false)?
            .f_eq_tensor(&y)?
            .f_sum(Kind::Int64)?
            .f_int64_value(&[])?;
        start += len;
    }
    Ok(correct as f64 / rows.len().max(1) as f64)
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod memory_tests {
    use super::keep_freed_memory;

    /// Minor page faults of the calling thread so far.
    fn faults() -> i64 {
        // SAFETY: getrusage writes one `rusage` we own.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) },
            0
        );
        usage.ru_minflt
    }

    /// A block the size of a step's factors, freed and asked for again,
    /// comes back without the system faulting its pages in anew.
    #[test]
    fn freed_blocks_are_reused_without_faults() {
        assert!(keep_freed_memory(), "glibc refused the settings");
        let touch = |n: usize| -> Vec<u8> {
            let mut v = vec![0u8; n];
            for i in (0..n).step_by(4096) {
                v[i] = i as u8;
            }
            std::hint::black_box(v)
        };
        let n = 4 << 20;
        drop(touch(n));
        let before = faults();
        drop(touch(n));
        let again = faults() - before;
        assert!(
            again < 64,
            "{again} page faults for a block of {n} bytes freed just before"
        );
    }
}
