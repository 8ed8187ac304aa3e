//! The [`Recorder`]: the training loop's handle on a run being written.
//!
//! Every call checks its arguments on the caller's thread (so mistakes come
//! back at once, naming the layer and lengths), copies the rows once, and
//! queues them for the writer thread. The queue is bounded: when the disk is
//! slower than training, the training loop waits. Errors of the writer
//! thread come back from the next call.
use crate::append::lock_run;
use crate::batch::{
    AdamStep, BatchRows, BatchStep, ExampleBatch, ExampleRowsOwned, FactorValues, InstanceRows,
    LayerStepRow, NamedTensor, NormKind, OwnedTensor, ProbeBatch, RowLens, StepRow, UpdateBatch,
    UpdateBatchOwned, UpdateRows, check_len, fixed_positions, per_position_rows,
};
use crate::part::{Compression, ParquetOptions, properties};
use crate::writer::{Msg, Role, Shared, Snapshot, Writer, now, usable_run_dir};
use crate::{Error, Result, durable};
use reptrace_format::{
    Dtype, FileEntry, Lens, Manifest, Mode, Model, Module, Optimizer, Split, Status, Table,
    TracedLayer, layout,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, SyncSender};
use std::thread::JoinHandle;

/// Builds a [`Recorder`]; see [`Recorder::builder`].
#[derive(Debug, Clone)]
pub struct RecorderBuilder {
    dir: PathBuf,
    model: Option<Model>,
    optimizer: Option<Optimizer>,
    classes: Vec<String>,
    dtype: Dtype,
    mode: Mode,
    settings: BTreeMap<String, serde_json::Value>,
    queue_depth: usize,
    queue_bytes: usize,
    parquet: ParquetOptions,
    run_id: Option<String>,
    role: Role,
}

impl RecorderBuilder {
    /// The model being trained (required).
    pub fn model(mut self, model: Model) -> Self {
        self.model = Some(model);
        self
    }

    /// The optimizer (required).
    pub fn optimizer(mut self, optimizer: Optimizer) -> Self {
        self.optimizer = Some(optimizer);
        self
    }

    /// Class names, indexed by label. When given, labels are checked against it.
    pub fn classes(mut self, classes: Vec<String>) -> Self {
        self.classes = classes;
        self
    }

    /// Float type of the stored factors (default f32).
    pub fn dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// What one update record describes (default instance).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// A free-form training setting, stored in `manifest.settings`.
    pub fn setting(mut self, key: impl Into<String>, value: serde_json::Value) -> Self {
        self.settings.insert(key.into(), value);
        self
    }

    /// Messages the queue to the writer thread holds before the caller
    /// waits (default 1024); [`RecorderBuilder::queue_bytes`] bounds the
    /// factor rows it holds.
    pub fn queue_depth(mut self, depth: usize) -> Self {
        self.queue_depth = depth;
        self
    }

    /// Bytes of factor values (`updates` and `probes` rows) the queue to
    /// the writer thread holds before the caller waits (default 64 MiB):
    /// enough for the writer's bursts (a row group going to disk) not to
    /// stop training, whatever the size of a step's rows.
    pub fn queue_bytes(mut self, bytes: usize) -> Self {
        self.queue_bytes = bytes;
        self
    }

    /// Most rows per Parquet row group (default 65 536).
    pub fn row_group_rows(mut self, rows: usize) -> Self {
        self.parquet.row_group_rows = rows;
        self
    }

    /// A row group is flushed once its encoded size passes this (default 32 MiB).
    pub fn row_group_bytes(mut self, bytes: usize) -> Self {
        self.parquet.row_group_bytes = bytes;
        self
    }

    /// Zstandard level of every Parquet file, 1..=22 (default 1).
    pub fn zstd_level(mut self, level: i32) -> Self {
        self.parquet.zstd_level = level;
        self
    }

    /// How part files are compressed while recording (default
    /// [`Compression::Zstd`], the storage encoding). [`Compression::None`]
    /// keeps the writer thread off a fast training loop's critical path;
    /// [`compact`](crate::compact()) rewrites the run in the storage encoding
    /// afterwards.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.parquet.compression = compression;
        self
    }

    /// The run id (default: a random UUID).
    pub fn run_id(mut self, id: impl Into<String>) -> Self {
        self.run_id = Some(id.into());
        self
    }

    /// Records rank `rank` of a distributed run (`torch.distributed`;
    /// format 11) into the one run directory every rank shares. Rank 0 is
    /// the owner: it creates the run, holds its lock, writes every table
    /// and the manifest, and lists in each commit the part files the other
    /// ranks staged ([`Recorder::adopt`]). Any other rank is a worker: it
    /// writes `updates`, `examples` and `batches` part files under names of
    /// its own into the existing run directory, takes no lock, never writes
    /// the manifest, and at each commit point hands its files over with
    /// [`Recorder::stage`]. Every rank's records carry its rank (column
    /// `updates.rank`; null without this setting). Give every rank the run
    /// id of rank 0 ([`RecorderBuilder::run_id`]).
    pub fn rank(mut self, rank: u32) -> Self {
        self.role = if rank == 0 {
            Role::Owner { rank: Some(0) }
        } else {
            Role::Worker { rank }
        };
        self
    }

    /// Creates the run directory, takes its lock (`<run>/.lock`, held until
    /// `finish`, `abort` or drop, and by the system until the process ends),
    /// writes the first manifest (status `recording`, no commits) and starts
    /// the writer thread.
    pub fn build(mut self) -> Result<Recorder> {
        let model = self.model.take().ok_or(Error::Missing { what: "model" })?;
        let optimizer = self
            .optimizer
            .take()
            .ok_or(Error::Missing { what: "optimizer" })?;
        for (setting, value) in [
            ("queue_depth", self.queue_depth),
            ("queue_bytes", self.queue_bytes),
            ("row_group_rows", self.parquet.row_group_rows),
            ("row_group_bytes", self.parquet.row_group_bytes),
        ] {
            if value == 0 {
                return Err(Error::Setting {
                    setting,
                    value: "0".into(),
                    why: "must be at least 1",
                });
            }
        }
        let run_id = self
            .run_id
            .take()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // Checks the zstd level now rather than at the first write.
        properties(&self.parquet, &run_id, Table::Steps, None, self.dtype)?;
        let layers = layer_infos(&model, self.mode)?;
        let weight_shapes = weight_shapes(&model);
        if let Role::Worker { rank } = self.role {
            return self.build_worker(rank, run_id, model, optimizer, layers, weight_shapes);
        }

        if !usable_run_dir(&self.dir)? {
            return Err(Error::NotEmpty { path: self.dir });
        }
        durable::create_dir(&self.dir)?;
        // Held for the recorder's whole life: a run whose status is still
        // `recording` while its lock is free has lost its writer.
        let lock = match lock_run(&self.dir, "add to it") {
            Ok(lock) => Some(lock),
            // A file system without advisory locks: record anyway.
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::Unsupported => {
                tracing::warn!(
                    "{}: the file system does not support file locks; recording without the run's lock",
                    self.dir.display()
                );
                None
            }
            Err(e) => return Err(e),
        };

        let mut manifest = Manifest::new(
            run_id.clone(),
            self.mode,
            self.dtype,
            model,
            optimizer,
            self.classes.clone(),
            now(),
        );
        manifest.settings = self.settings.clone();
        durable::write_atomic(
            &layout::manifest_path(&self.dir),
            manifest.to_json().as_bytes(),
        )?;

        self.start(manifest, run_id, layers, weight_shapes, lock)
    }

    /// A worker of a distributed run: the run directory is rank 0's (it
    /// must exist); no lock, no manifest on disk (the writer keeps one in
    /// memory for the run id, mode and dtype of its files).
    fn build_worker(
        self,
        rank: u32,
        run_id: String,
        model: Model,
        optimizer: Optimizer,
        layers: Vec<LayerInfo>,
        weight_shapes: HashMap<String, Vec<usize>>,
    ) -> Result<Recorder> {
        if !self.dir.is_dir() {
            return Err(Error::Invalid {
                context: format!("{}", self.dir.display()),
                message: format!(
                    "rank {rank} found no run directory: rank 0 creates it, on a file system \
                     every rank shares"
                ),
            });
        }
        let manifest = Manifest::new(
            run_id.clone(),
            self.mode,
            self.dtype,
            model,
            optimizer,
            self.classes.clone(),
            now(),
        );
        self.start(manifest, run_id, layers, weight_shapes, None)
    }

    /// The recorder of `manifest` (kept in memory by its writer thread),
    /// started: its writer thread spawned.
    fn start(
        self,
        manifest: Manifest,
        run_id: String,
        layers: Vec<LayerInfo>,
        weight_shapes: HashMap<String, Vec<usize>>,
        lock: Option<std::fs::File>,
    ) -> Result<Recorder> {
        let n_classes = manifest.classes.len();
        let mode = manifest.mode;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::sync_channel(self.queue_depth);
        let writer = Writer::new(
            self.dir.clone(),
            manifest,
            self.parquet,
            layers.iter().map(|l| l.name.clone()).collect(),
            Arc::clone(&shared),
            self.role,
        );
        let thread = std::thread::Builder::new()
            .name("reptrace-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::io(&self.dir, e))?;
        Ok(Recorder {
            run: self.dir,
            run_id,
            tx: Some(tx),
            thread: Some(thread),
            shared,
            queue_bytes: self.queue_bytes,
            layers,
            weight_shapes,
            n_classes,
            mode,
            dtype: self.dtype,
            last_step: None,
            last_step_row: None,
            pending_weights: None,
            weight_paths: HashSet::new(),
            closed: None,
            failed: None,
            lock,
            role: self.role,
        })
    }
}

/// An embedding record's `u` must hold token ids (`digits` base-2048 digits
/// each) below `num`: a record that does not is refused, never written.
fn check_token_ids(context: &str, u: &[f32], digits: usize, num: usize) -> Result<()> {
    for (t, id) in u.chunks_exact(digits.max(1)).enumerate() {
        let values: Vec<f64> = id.iter().map(|&d| f64::from(d)).collect();
        match reptrace_format::kinds::embedding::id_of(&values) {
            Some(id) if id < num as u64 => {}
            _ => {
                return Err(Error::Invalid {
                    context: context.to_owned(),
                    message: format!(
                        "token {t} of the u values ({values:?}) is not the base-2048 digits of \
                         an id below num_embeddings {num}"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// What the recorder needs to know about a traced layer.
#[derive(Debug, Clone)]
struct LayerInfo {
    name: String,
    /// Accepted `(u_len, v_len)` with the norm to compute for each (of a
    /// ragged layer's factor records: the first one's norm).
    factor_shapes: Vec<(usize, usize, NormKind)>,
    /// `TracedLayer::record_shape` in the run's mode.
    record_shape: Lens,
    probe_shape: Lens,
    /// Length of `vec ΔW` plus `Δb`: of an Adam step's preconditioner.
    update_len: usize,
}

fn layer_infos(model: &Model, mode: Mode) -> Result<Vec<LayerInfo>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for layer in model.traced_layers() {
        layout::check_layer_name(layer.name())?;
        if !seen.insert(layer.name()) {
            return Err(Error::Model {
                message: format!("layer name {:?} is used twice", layer.name()),
            });
        }
        let (u_len, v_len) = layer.factor_lens();
        let weight_len: usize = layer.weight_shape().iter().product();
        let full_kind = NormKind::Full { weight_len };
        let kind = if layer.records_full(Mode::Instance) {
            full_kind
        } else {
            factors_norm_kind(layer)
        };
        let mut factor_shapes = vec![(u_len, v_len, kind)];
        // Batch mode may store the whole update of a step: u empty, v = ΔW
        // followed by Δb.
        let full = (0, layer.update_len(), full_kind);
        if mode == Mode::Batch && (full.0, full.1) != (u_len, v_len) {
            factor_shapes.push(full);
        }
        out.push(LayerInfo {
            name: layer.name().to_owned(),
            factor_shapes,
            record_shape: layer.record_shape(mode),
            probe_shape: layer.probe_shape(),
            update_len: layer.update_len(),
        });
    }
    Ok(out)
}

/// How the ‖ΔW‖ of a factors record of `layer` follows from its `u` and `v`.
fn factors_norm_kind(layer: TracedLayer<'_>) -> NormKind {
    let conv = |c: &reptrace_format::Conv2dSpec| NormKind::Factors {
        k: c.patch_len(),
        p: c.positions(),
        c_out: c.out_channels,
        groups: c.groups,
    };
    match layer {
        // A ragged layer's records hold any number of positions.
        TracedLayer::Linear(l) if l.positions == 1 && !l.ragged => NormKind::Outer,
        TracedLayer::Linear(l) => NormKind::Positions {
            n_in: l.in_features,
            n_out: l.out_features,
        },
        TracedLayer::Conv2d(c) => conv(c),
        TracedLayer::Conv1d(c) => conv(&c.as_conv2d()),
        TracedLayer::Embedding(e) => NormKind::Embedding {
            digits: e.digits(),
            dim: e.embedding_dim,
            num: e.num_embeddings,
        },
        // Norm records are always whole updates.
        TracedLayer::LayerNorm(n) | TracedLayer::RmsNorm(n) => NormKind::Full {
            weight_len: n.features(),
        },
    }
}

/// PyTorch shapes of the weights and biases of every module with weights.
fn weight_shapes(model: &Model) -> HashMap<String, Vec<usize>> {
    let mut shapes = HashMap::new();
    for layer in model.modules.iter().filter_map(Module::layer) {
        if layer.bias() {
            shapes.insert(format!("{}.bias", layer.name()), layer.bias_shape());
        }
        shapes.insert(format!("{}.weight", layer.name()), layer.weight_shape());
    }
    shapes
}

/// Records a training run into a run directory; see the crate docs.
pub struct Recorder {
    run: PathBuf,
    run_id: String,
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    /// [`RecorderBuilder::queue_bytes`].
    queue_bytes: usize,
    layers: Vec<LayerInfo>,
    weight_shapes: HashMap<String, Vec<usize>>,
    n_classes: usize,
    mode: Mode,
    /// The factors' stored type.
    dtype: Dtype,
    /// Largest step seen (step rows and updates) and its epoch.
    last_step: Option<(i64, i32)>,
    /// Step of the last `steps` row, for the order check.
    last_step_row: Option<i64>,
    pending_weights: Option<Vec<OwnedTensor>>,
    weight_paths: HashSet<String>,
    closed: Option<&'static str>,
    failed: Option<String>,
    /// The run's lock ([`layout::lock`]), held until the writer thread has
    /// written its last manifest (`finish`, `abort`, drop); the system
    /// releases it when the process dies.
    lock: Option<std::fs::File>,
    /// The owner of the run, or a worker of a distributed one.
    role: Role,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("run", &self.run)
            .field("run_id", &self.run_id)
            .field("last_step", &self.last_step)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Starts building a recorder that writes into `dir` (which must not
    /// exist or be empty).
    pub fn builder(dir: impl AsRef<Path>) -> RecorderBuilder {
        RecorderBuilder {
            dir: dir.as_ref().to_path_buf(),
            model: None,
            optimizer: None,
            classes: Vec::new(),
            dtype: Dtype::F32,
            mode: Mode::Instance,
            settings: BTreeMap::new(),
            queue_depth: 1024,
            queue_bytes: 64 << 20,
            parquet: ParquetOptions::default(),
            run_id: None,
            role: Role::Owner { rank: None },
        }
    }

    /// The rank given to [`RecorderBuilder::rank`], if any.
    pub fn rank(&self) -> Option<u32> {
        match self.role {
            Role::Owner { rank } => rank,
            Role::Worker { rank } => Some(rank),
        }
    }

    /// Refuses a call that only the owner (rank 0) makes.
    fn owner_only(&self, call: &'static str) -> Result<()> {
        match self.role.worker() {
            Some(rank) => Err(Error::Rank {
                rank,
                call,
                why: "is rank 0's job: the other ranks write updates, examples and batches, \
                      and stage them for rank 0's commit",
            }),
            None => Ok(()),
        }
    }

    /// A worker of a distributed run ([`RecorderBuilder::rank`] > 0): at a
    /// commit point, makes every part file it wrote since the last one
    /// durable (footer, fsync, directory fsync) under its temporary name,
    /// and returns their manifest entries, for rank 0 to [`adopt`]
    /// into its commit. Until a manifest lists them readers do not see
    /// them; the owner's commit publishes them under their final names.
    ///
    /// [`adopt`]: Recorder::adopt
    pub fn stage(&mut self) -> Result<Vec<FileEntry>> {
        self.check_open()?;
        if self.role.worker().is_none() {
            return Err(Error::Invalid {
                context: "stage()".into(),
                message: "only a recorder of a rank other than 0 stages its files; rank 0 \
                          commits"
                    .into(),
            });
        }
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.send(Msg::Stage(reply_tx))?;
        match reply_rx.recv() {
            Ok(files) => Ok(files),
            Err(_) => Err(self.writer_error()),
        }
    }

    /// Rank 0 of a distributed run: lists `files`, staged by the other
    /// ranks ([`Recorder::stage`]), in the next commit. Each must be a part
    /// file of a table inside the run, present in the run directory as this
    /// process sees it (a run on file systems the ranks do not share is
    /// refused at the commit, naming the file).
    pub fn adopt(&mut self, files: Vec<FileEntry>) -> Result<()> {
        self.check_open()?;
        self.owner_only("adopt()")?;
        if files.is_empty() {
            return Ok(());
        }
        self.send(Msg::Adopt(files))
    }

    /// Ends recording without another commit: what is not committed (or,
    /// on a worker, staged) is removed; the owner marks the run aborted
    /// with `reason`, keeping its commits. In a distributed run this is how
    /// a rank stops when another has failed: the run stays at its last
    /// commit, which every rank's files of it are part of. A worker ends
    /// this way after its last [`Recorder::stage`] too.
    pub fn abandon(&mut self, reason: impl Into<String>) -> Result<()> {
        self.check_open()?;
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.send(Msg::Abandon {
            reason: reason.into(),
            reply: reply_tx,
        })?;
        let reply = reply_rx.recv();
        self.closed = Some("abandon()");
        self.tx = None;
        self.join();
        self.lock = None;
        match reply {
            Ok(()) => Ok(()),
            Err(_) => Err(self.writer_error()),
        }
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run
    }

    /// The run id written into the manifest and every file.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Adds rows to the `instances` table.
    pub fn instances(&mut self, ids: &[i64], labels: &[i32], splits: &[Split]) -> Result<()> {
        self.check_open()?;
        self.owner_only("instances()")?;
        let ctx = || "instances".to_owned();
        check_len(ctx, "labels", ids.len(), labels.len())?;
        check_len(ctx, "splits", ids.len(), splits.len())?;
        self.check_labels("instances", "labels", labels)?;
        if ids.is_empty() {
            return Ok(());
        }
        self.send(Msg::Instances(InstanceRows {
            ids: ids.to_vec(),
            labels: labels.to_vec(),
            splits: splits.to_vec(),
        }))
    }

    /// Sets the weights snapshot written at the next commit
    /// (`initial` before the first step, `step-<last step>` after).
    pub fn weights(&mut self, tensors: &[NamedTensor<'_>]) -> Result<()> {
        self.check_open()?;
        self.owner_only("weights()")?;
        self.pending_weights = Some(self.own_weights(tensors)?);
        Ok(())
    }

    /// Queues a commit point: everything sent so far, and the weights given
    /// since the last commit, become durable and listed in the manifest.
    pub fn commit(&mut self) -> Result<()> {
        self.check_open()?;
        self.owner_only("commit()")?;
        let weights = self.take_pending_snapshot()?;
        self.send(Msg::Commit {
            step: self.last_step,
            weights,
        })
    }

    /// Adds one row to the `steps` table. Steps must be strictly increasing.
    pub fn step(&mut self, row: StepRow) -> Result<()> {
        self.check_open()?;
        self.owner_only("step()")?;
        if row.step < 0 {
            return Err(Error::Invalid {
                context: "steps".into(),
                message: format!("step {} is negative", row.step),
            });
        }
        if let Some(previous) = self.last_step_row
            && row.step <= previous
        {
            return Err(Error::StepOrder {
                step: row.step,
                previous,
            });
        }
        self.last_step_row = Some(row.step);
        self.see_step(row.step, row.epoch);
        self.send(Msg::Step(row))
    }

    /// Adds the `layer_steps` rows of one step (instance mode): per traced
    /// layer, the hyper-parameters its parameter group applied and what the
    /// producer's gradient check measured. Each row's layer must be traced
    /// and its values finite; the precision is `f32`, `bf16` or `f16`.
    pub fn layer_steps(&mut self, rows: Vec<LayerStepRow>) -> Result<()> {
        self.check_open()?;
        self.owner_only("layer_steps()")?;
        for r in &rows {
            let ctx = format!("layer_steps of step {} for layer {:?}", r.step, r.layer);
            self.layer_index(&r.layer)?;
            if r.step < 0 {
                return Err(Error::Invalid {
                    context: ctx,
                    message: format!("step {} is negative", r.step),
                });
            }
            let values = [
                ("lr", r.lr),
                ("momentum", r.momentum),
                ("dampening", r.dampening),
                ("weight_decay", r.weight_decay),
                ("grad_scale", r.grad_scale),
            ];
            let optional = [("grad_check", r.grad_check), ("grad_norm", r.grad_norm)];
            let bad = values
                .into_iter()
                .chain(optional.into_iter().filter_map(|(n, v)| v.map(|v| (n, v))))
                .find(|(_, v)| !v.is_finite());
            if let Some((name, v)) = bad {
                return Err(Error::Invalid {
                    context: ctx,
                    message: format!("{name} is {v}, expected a finite number"),
                });
            }
            if !matches!(r.precision.as_str(), "f32" | "bf16" | "f16") {
                return Err(Error::Invalid {
                    context: ctx,
                    message: format!(
                        "precision {:?}, expected \"f32\", \"bf16\" or \"f16\"",
                        r.precision
                    ),
                });
            }
            if let Some(adam) = &r.adam {
                let len = self.layers[self.layer_index(&r.layer)?].update_len;
                check_adam(adam, len).map_err(|message| Error::Invalid {
                    context: ctx.clone(),
                    message,
                })?;
            }
            self.see_step(r.step, r.epoch);
        }
        if rows.is_empty() {
            return Ok(());
        }
        self.send(Msg::LayerSteps(rows))
    }

    /// Adds the training dynamics of one step (table `examples`): each batch
    /// member's loss and predicted class in the forward pass of step
    /// `batch.step`. Independent of the traced layers and of the mode.
    pub fn examples(&mut self, batch: ExampleBatch<'_>) -> Result<()> {
        self.check_open()?;
        let ctx = || format!("examples of step {}", batch.step);
        let n = batch.instance_ids.len();
        check_len(ctx, "labels", n, batch.labels.len())?;
        check_len(ctx, "loss", n, batch.loss.len())?;
        check_len(ctx, "predicted", n, batch.predicted.len())?;
        if batch.step < 0 {
            return Err(Error::Invalid {
                context: ctx(),
                message: format!("step {} is negative", batch.step),
            });
        }
        self.check_labels(&ctx(), "labels", batch.labels)?;
        self.check_labels(&ctx(), "predicted", batch.predicted)?;
        if batch.loss.iter().any(|l| l.is_nan()) {
            return Err(Error::Invalid {
                context: ctx(),
                message: "a loss value is NaN".into(),
            });
        }
        self.see_step(batch.step, batch.epoch);
        if n == 0 {
            return Ok(());
        }
        let mut rows = ExampleRowsOwned::default();
        rows.push(&batch);
        self.send(Msg::Examples(rows))
    }

    /// Adds the update records of one step for traced layer `layer`.
    ///
    /// The slices are copied once into the message for the writer thread;
    /// [`Recorder::updates_owned`] takes the buffers instead. The rows of a
    /// ragged layer's factor records hold `batch.positions[i]` positions
    /// each (or all the same number, without `positions`); other layers'
    /// rows have the fixed lengths of `TracedLayer::record_lens` and take
    /// no `positions`.
    pub fn updates(&mut self, layer: &str, batch: UpdateBatch<'_>) -> Result<()> {
        self.updates_owned(
            layer,
            UpdateBatchOwned {
                step: batch.step,
                epoch: batch.epoch,
                instance_ids: batch.instance_ids.to_vec(),
                labels: batch.labels.to_vec(),
                u: FactorValues::F32(batch.u.to_vec()),
                v: FactorValues::F32(batch.v.to_vec()),
                update_norm: batch.update_norm.map(<[f32]>::to_vec),
                positions: batch.positions.map(<[u32]>::to_vec),
            },
        )
    }

    /// [`Recorder::updates`] with the rows handed over by value: checked the
    /// same way, then moved to the writer thread without a copy. Factors in
    /// f16 are accepted for a run recorded in f16 (converted by the caller,
    /// with round-to-nearest-even as `half` and PyTorch do; the rows are the
    /// same as from f32 factors converted by the recorder).
    pub fn updates_owned(&mut self, layer: &str, batch: UpdateBatchOwned) -> Result<()> {
        self.check_open()?;
        let li = self.layer_index(layer)?;
        let ctx = || format!("updates for layer {layer:?}");
        let n = batch.instance_ids.len();
        check_len(ctx, "labels", n, batch.labels.len())?;
        if let Some(norms) = &batch.update_norm {
            check_len(ctx, "update_norm", n, norms.len())?;
        }
        if batch.step < 0 {
            return Err(Error::Invalid {
                context: ctx(),
                message: format!("step {} is negative", batch.step),
            });
        }
        let f16 = [&batch.u, &batch.v]
            .iter()
            .any(|f| matches!(f, FactorValues::F16(_)));
        if f16 && self.dtype != Dtype::F16 {
            return Err(Error::Invalid {
                context: ctx(),
                message: "f16 factors for a run recorded in f32; pass f32 factors (or build the recorder with dtype f16)".into(),
            });
        }
        let (u_rows, v_rows, norm) = self.record_rows(li, &ctx, &batch)?;
        self.check_labels(&ctx(), "labels", &batch.labels)?;
        if let NormKind::Embedding { digits, num, .. } = norm {
            check_token_ids(&ctx(), &batch.u.as_f32(), digits, num)?;
        }
        self.see_step(batch.step, batch.epoch);
        if n == 0 {
            return Ok(());
        }
        self.send(Msg::Updates {
            layer: li,
            rows: UpdateRows {
                step: batch.step,
                epoch: batch.epoch,
                ids: batch.instance_ids.into_iter().map(Some).collect(),
                labels: batch.labels.into_iter().map(Some).collect(),
                u: batch.u,
                v: batch.v,
                u_rows,
                v_rows,
                norms: batch.update_norm,
                norm,
            },
        })
    }

    /// Batch mode: the members of step `s`'s batch (table `batches`) and,
    /// per traced layer, its whole update `W_{s+1} − W_s` as one `updates`
    /// row (`u` empty, `v` = ΔW then Δb; `instance_id` null, `label` the
    /// batch's class when all members share it).
    pub fn batch_step(&mut self, batch: BatchStep<'_>) -> Result<()> {
        self.check_open()?;
        let ctx = || format!("batch step {}", batch.step);
        if self.mode != Mode::Batch {
            return Err(Error::Invalid {
                context: ctx(),
                message: "the run records in instance mode; batch steps need mode batch".into(),
            });
        }
        if batch.step < 0 {
            return Err(Error::Invalid {
                context: ctx(),
                message: format!("step {} is negative", batch.step),
            });
        }
        let n = batch.instance_ids.len();
        check_len(ctx, "labels", n, batch.labels.len())?;
        self.check_labels(&ctx(), "labels", batch.labels)?;
        let label = match batch.labels.split_first() {
            Some((first, rest)) if rest.iter().all(|l| l == first) => Some(*first),
            _ => None,
        };
        if !batch.deltas.is_empty() {
            // The whole update is the same on every rank: rank 0 records it.
            self.owner_only("batch_step() with deltas")?;
        }
        let mut rows = Vec::with_capacity(batch.deltas.len());
        for (layer, delta) in batch.deltas {
            let li = self.layer_index(layer)?;
            let (u_len, v_len, norm) = self.layers[li]
                .factor_shapes
                .iter()
                .copied()
                .find(|&(u, _, _)| u == 0)
                .unwrap_or(self.layers[li].factor_shapes[0]);
            check_len(
                || format!("batch step {} of layer {layer:?}", batch.step),
                "delta",
                v_len,
                delta.len(),
            )?;
            rows.push((
                li,
                UpdateRows {
                    step: batch.step,
                    epoch: batch.epoch,
                    ids: vec![None],
                    labels: vec![label],
                    u: FactorValues::F32(Vec::new()),
                    v: FactorValues::F32(delta.to_vec()),
                    u_rows: RowLens::Fixed(u_len),
                    v_rows: RowLens::Fixed(v_len),
                    norms: None,
                    norm,
                },
            ));
        }
        self.see_step(batch.step, batch.epoch);
        self.send(Msg::Batch(BatchRows {
            step: batch.step,
            epoch: batch.epoch,
            ids: batch.instance_ids.to_vec(),
            labels: batch.labels.to_vec(),
        }))?;
        for (layer, rows) in rows {
            self.send(Msg::Updates { layer, rows })?;
        }
        Ok(())
    }

    /// Adds probe rows for traced layer `layer`; `p_norm` is computed.
    pub fn probes(&mut self, layer: &str, batch: ProbeBatch<'_>) -> Result<()> {
        self.send_probes(layer, batch, false)
    }

    /// Adds checkpoint probe rows for traced layer `layer`: the probes as of
    /// the weights given to the next [`Recorder::commit`], which let the run
    /// be analysed before it completes (`checkpoints/probes/…`). Superseded
    /// ones are dropped two commits later, all when the run completes.
    pub fn checkpoint_probes(&mut self, layer: &str, batch: ProbeBatch<'_>) -> Result<()> {
        self.send_probes(layer, batch, true)
    }

    fn send_probes(&mut self, layer: &str, batch: ProbeBatch<'_>, checkpoint: bool) -> Result<()> {
        self.check_open()?;
        self.owner_only("probes()")?;
        let li = self.layer_index(layer)?;
        let rows = batch.checked_rows(layer, self.layers[li].probe_shape, self.n_classes)?;
        if rows.probe_ids.is_empty() {
            return Ok(());
        }
        self.send(Msg::Probes {
            layer: li,
            rows,
            checkpoint,
        })
    }

    /// Waits until the writer thread has handled everything queued so far
    /// (including commits), and returns its error if it failed.
    pub fn flush(&mut self) -> Result<()> {
        self.check_open()?;
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        self.send(Msg::Flush(ack_tx))?;
        match ack_rx.recv() {
            Ok(()) => Ok(()),
            Err(_) => Err(self.writer_error()),
        }
    }

    /// The last commit: pending rows and probes, the final weights
    /// (`weights/final.safetensors`); the run's status becomes `complete`.
    /// Weights given with [`Recorder::weights`] since the last commit are
    /// committed first, as their own snapshot.
    pub fn finish(&mut self, final_weights: &[NamedTensor<'_>]) -> Result<Manifest> {
        self.check_open()?;
        self.owner_only("finish()")?;
        let tensors = self.own_weights(final_weights)?;
        if self.pending_weights.is_some() {
            self.commit()?;
        }
        self.close(
            "finish()",
            Status::Complete,
            None,
            Some((layout::FINAL_WEIGHTS.to_owned(), tensors)),
        )
    }

    /// Stops recording: what is pending is committed, the status becomes
    /// `aborted` and `reason` is kept in the manifest.
    pub fn abort(&mut self, reason: impl Into<String>) -> Result<Manifest> {
        self.check_open()?;
        self.owner_only("abort()")?;
        let weights = self.take_pending_snapshot()?;
        self.close("abort()", Status::Aborted, Some(reason.into()), weights)
    }

    fn close(
        &mut self,
        what: &'static str,
        status: Status,
        reason: Option<String>,
        weights: Option<Snapshot>,
    ) -> Result<Manifest> {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.send(Msg::Close {
            status,
            reason,
            step: self.last_step,
            weights,
            reply: reply_tx,
        })?;
        let reply = reply_rx.recv();
        self.closed = Some(what);
        self.tx = None;
        self.join();
        // The writer is done with the run: others may write to it now.
        self.lock = None;
        match reply {
            Ok(Some(manifest)) => Ok(manifest),
            _ => Err(self.writer_error()),
        }
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("recorder: writer thread panicked");
        }
    }

    fn check_open(&mut self) -> Result<()> {
        if let Some(what) = self.closed {
            return Err(Error::Closed(what));
        }
        if self.failed.is_some() || self.shared.failed() {
            return Err(self.writer_error());
        }
        Ok(())
    }

    /// The writer's error the first time, a short reminder after that.
    fn writer_error(&mut self) -> Error {
        if let Some(e) = self.shared.take_error() {
            self.failed = Some(e.to_string());
            return e;
        }
        match &self.failed {
            Some(reason) => Error::Failed {
                reason: reason.clone(),
            },
            None => Error::WriterGone,
        }
    }

    fn send(&mut self, msg: Msg) -> Result<()> {
        let Some(tx) = &self.tx else {
            return Err(Error::WriterGone);
        };
        self.shared.reserve(msg.queued_bytes(), self.queue_bytes);
        match tx.send(msg) {
            Ok(()) => Ok(()),
            Err(_) => Err(self.writer_error()),
        }
    }

    /// How the `u` and `v` of `batch` split into rows for traced layer
    /// `li`, and the norm of its records: each row's positions for a
    /// ragged layer's factor records, else the first accepted fixed shape
    /// that fits the slices (the primary one is reported when none does).
    fn record_rows(
        &self,
        li: usize,
        ctx: &dyn Fn() -> String,
        batch: &UpdateBatchOwned,
    ) -> Result<(RowLens, RowLens, NormKind)> {
        let n = batch.instance_ids.len();
        let (got_u, got_v) = (batch.u.len(), batch.v.len());
        let info = &self.layers[li];
        if let Lens::PerPosition(a, b) = info.record_shape {
            let (u_rows, v_rows) = per_position_rows(
                ctx,
                batch.positions.as_deref(),
                n,
                ("u", "v"),
                (a, b),
                (got_u, got_v),
                0,
            )?;
            return Ok((u_rows, v_rows, info.factor_shapes[0].2));
        }
        if batch.positions.is_some() {
            return Err(fixed_positions(ctx()));
        }
        let shapes = &info.factor_shapes;
        let (u_len, v_len, norm) = shapes
            .iter()
            .copied()
            .find(|&(u, v, _)| got_u == n * u && got_v == n * v)
            .ok_or_else(|| {
                let (u, v, _) = shapes[0];
                if got_u != n * u {
                    Error::Length {
                        context: format!("{} ({n} rows of {u} values)", ctx()),
                        what: "u",
                        expected: n * u,
                        got: got_u,
                    }
                } else {
                    Error::Length {
                        context: format!("{} ({n} rows of {v} values)", ctx()),
                        what: "v",
                        expected: n * v,
                        got: got_v,
                    }
                }
            })?;
        Ok((RowLens::Fixed(u_len), RowLens::Fixed(v_len), norm))
    }

    fn layer_index(&self, layer: &str) -> Result<usize> {
        self.layers
            .iter()
            .position(|l| l.name == layer)
            .ok_or_else(|| Error::UnknownLayer {
                layer: layer.to_owned(),
                traced: if self.layers.is_empty() {
                    "none".to_owned()
                } else {
                    self.layers
                        .iter()
                        .map(|l| l.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })
    }

    fn check_labels(&self, context: &str, what: &str, labels: &[i32]) -> Result<()> {
        if self.n_classes == 0 {
            return Ok(());
        }
        match labels
            .iter()
            .find(|&&l| l < 0 || l as usize >= self.n_classes)
        {
            Some(bad) => Err(Error::Invalid {
                context: context.to_owned(),
                message: format!(
                    "{what} value {bad} is out of range for {} classes",
                    self.n_classes
                ),
            }),
            None => Ok(()),
        }
    }

    fn see_step(&mut self, step: i64, epoch: i32) {
        if self.last_step.is_none_or(|(s, _)| step > s) {
            self.last_step = Some((step, epoch));
        }
    }

    /// The pending weights with the path they will be written to.
    fn take_pending_snapshot(&mut self) -> Result<Option<Snapshot>> {
        let Some(tensors) = self.pending_weights.take() else {
            return Ok(None);
        };
        let rel = layout::weights_path(self.last_step.map(|s| s.0));
        if !self.weight_paths.insert(rel.clone()) {
            return Err(Error::WeightsExist { path: rel });
        }
        Ok(Some((rel, tensors)))
    }

    fn own_weights(&self, tensors: &[NamedTensor<'_>]) -> Result<Vec<OwnedTensor>> {
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(tensors.len());
        for t in tensors {
            let bad = |message: String| Error::Weights {
                name: t.name.to_owned(),
                message,
            };
            if !names.insert(t.name) {
                return Err(bad("given twice".into()));
            }
            let n: usize = t.shape.iter().product();
            if n != t.data.len() {
                return Err(bad(format!(
                    "shape {:?} has {n} elements but data has {}",
                    t.shape,
                    t.data.len()
                )));
            }
            if let Some(want) = self.weight_shapes.get(t.name)
                && want.as_slice() != t.shape
            {
                return Err(bad(format!(
                    "shape {:?} does not match the model's {want:?}",
                    t.shape
                )));
            }
            out.push(OwnedTensor {
                name: t.name.to_owned(),
                shape: t.shape.to_vec(),
                data: t.data.to_vec(),
            });
        }
        Ok(out)
    }
}

impl Drop for Recorder {
    /// Without `finish()`/`abort()`: what was queued is handled, uncommitted
    /// files are removed, the manifest keeps its commits and is marked
    /// aborted ("recorder dropped without finish()").
    fn drop(&mut self) {
        if self.closed.is_some() {
            return;
        }
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::Drop);
        }
        self.join();
    }
}

/// What is wrong with an Adam step of a layer whose update has `len` values.
fn check_adam(adam: &AdamStep, len: usize) -> std::result::Result<(), String> {
    if !(0.0..1.0).contains(&adam.beta1) {
        return Err(format!(
            "beta1 is {}, expected a number in [0, 1)",
            adam.beta1
        ));
    }
    if !(adam.step_size.is_finite() && adam.step_size >= 0.0) {
        return Err(format!(
            "step_size is {}, expected a finite number ≥ 0",
            adam.step_size
        ));
    }
    let d = &adam.preconditioner;
    if d.len() != len {
        return Err(format!(
            "the preconditioner has {} values, the layer's weight and bias {len}",
            d.len()
        ));
    }
    if let Some((i, x)) = d
        .iter()
        .enumerate()
        .find(|(_, x)| !(x.is_finite() && **x > 0.0))
    {
        return Err(format!(
            "preconditioner value {i} is {x}, expected a finite number > 0"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A training loop may hand the recorder to another thread.
    #[test]
    fn recorder_is_send() {
        fn send<T: Send>() {}
        send::<Recorder>();
        send::<Error>();
    }
}
