//! Attribution: the contribution of every update record to every probe.
//!
//! `compute_layer` is the arithmetic that both the on-demand
//! `contributions` table ([`crate::computed`]) and [`attribute`] run: for one
//! traced layer it streams the committed `updates` records (bounded batches,
//! decoded on a background thread), computes each record's `dot = ⟨c, p⟩`,
//! `norm = ‖c‖` and `cosine` with every selected probe as matrix products
//! (see [`crate::kernel`]), scaled by the record's displacement scale
//! (momentum), and hands them on in batches. With the residual it adds one
//! row per probe (step, epoch, instance_id and label NULL) for the weight
//! change no record explains, `R = (W_T − W_0) − Σ scaled ΔW` over *all*
//! records of the replay, so that the dots of a probe sum to `‖p‖²`.
//!
//! [`attribute`] materialises them for export and scale: per record
//! (`contributions/layer=<name>/part-NNNNNN.parquet`) or summed per instance
//! (and epoch) (`influence/…`), written on a writer thread. It records the
//! result in the manifest's `attributions` beside the earlier ones (temporary
//! file and rename) and only then deletes the files of an earlier
//! attribution that the new one covers.
//!
//! Memory stays bounded: records come in batches sized to the layer, and when
//! the probes' features would not fit the budget the probes are processed in
//! several passes over the records.
//!
//! In batch mode a record is the whole update of one step: its rows have the
//! step, `instance_id` NULL and the batch's label when the batch is of one
//! class (NULL otherwise); the batch's members are in the `batches` table.
use crate::kernel::{self, Geometry, ProbeFeatures, RecordFeatures, Route};
use crate::probes::{Probes, instance_splits};
use crate::records::Records;
use crate::replay::{self, Setup};
use crate::run::Run;
use crate::weights::LayerWeights;
use crate::writer::{PartWriter, write_manifest};
use crate::{Error, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch};
use arrow_schema::SchemaRef;
use reptrace_format::{
    Aggregation, Attribution, Dtype, FileEntry, Manifest, Split, Step, Table, TracedLayer, col,
    layout, schema,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

/// Which recorded probes to attribute.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ProbeSelection {
    /// Probes that are not training instances (test split or outside the data set).
    #[default]
    Test,
    /// Probes that are training instances.
    Train,
    /// Every recorded probe.
    All,
    /// These probe ids; each must have been recorded.
    Ids(Vec<i64>),
}

impl FromStr for ProbeSelection {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::BadOption {
            option: "probe selection",
            value: s.to_owned(),
            why: why.to_owned(),
        };
        match s {
            "test" => Ok(ProbeSelection::Test),
            "train" => Ok(ProbeSelection::Train),
            "all" => Ok(ProbeSelection::All),
            _ => {
                let list = s
                    .strip_prefix("ids:")
                    .ok_or_else(|| bad("expected test, train, all or ids:N,M,…"))?;
                let ids = list
                    .split(',')
                    .map(|x| x.trim().parse::<i64>())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|_| bad("ids must be integers separated by commas"))?;
                if ids.is_empty() {
                    return Err(bad("no ids given"));
                }
                Ok(ProbeSelection::Ids(ids))
            }
        }
    }
}

impl fmt::Display for ProbeSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeSelection::Test => f.write_str("test"),
            ProbeSelection::Train => f.write_str("train"),
            ProbeSelection::All => f.write_str("all"),
            ProbeSelection::Ids(ids) => {
                let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
                write!(f, "ids:{}", ids.join(","))
            }
        }
    }
}

/// An inclusive range of steps, `A..B` (either end may be left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepRange {
    /// The first step included; `None`: from the first step of the run.
    pub first: Option<i64>,
    /// The last step included; `None`: to the last step of the run.
    pub last: Option<i64>,
}

impl StepRange {
    /// Whether `step` is in the range.
    pub fn contains(&self, step: i64) -> bool {
        self.first.is_none_or(|a| step >= a) && self.last.is_none_or(|b| step <= b)
    }
}

impl FromStr for StepRange {
    type Err = Error;
    /// `A..B` and `A..=B` both include step B; `A..`, `..B`, and `N` (one step) work too.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::BadOption {
            option: "step range",
            value: s.to_owned(),
            why: why.to_owned(),
        };
        let num = |x: &str| -> Result<Option<i64>> {
            let x = x.trim();
            if x.is_empty() {
                Ok(None)
            } else {
                x.parse::<i64>()
                    .map(Some)
                    .map_err(|_| bad("expected A..B with integer steps (inclusive)"))
            }
        };
        let range = match s.split_once("..") {
            Some((a, b)) => StepRange {
                first: num(a)?,
                last: num(b.strip_prefix('=').unwrap_or(b))?,
            },
            None => {
                let n = num(s)?.ok_or_else(|| bad("empty"))?;
                StepRange {
                    first: Some(n),
                    last: Some(n),
                }
            }
        };
        if let (Some(a), Some(b)) = (range.first, range.last)
            && a > b
        {
            return Err(bad("the first step is after the last"));
        }
        Ok(range)
    }
}

/// What [`attribute`] computes.
#[derive(Debug, Clone)]
pub struct Options {
    /// Which recorded probes to attribute (default: the test probes).
    pub probes: ProbeSelection,
    /// Layers to attribute; empty: every traced layer with recorded probes.
    pub layers: Vec<String>,
    /// Only records of these steps (the residual still covers every record).
    pub steps: Option<StepRange>,
    /// Only each probe's own records (probes that are training instances).
    pub self_only: bool,
    /// One row per record (`contributions`), or sums per instance and epoch
    /// or per instance (`influence`).
    pub by: Aggregation,
    /// Records per batch; `None`: sized from `memory_budget`.
    pub batch_rows: Option<usize>,
    /// Approximate bytes for probe features and one batch of records.
    pub memory_budget: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            probes: ProbeSelection::Test,
            layers: Vec::new(),
            steps: None,
            self_only: false,
            by: Aggregation::Step,
            batch_rows: None,
            memory_budget: 1 << 30,
        }
    }
}

/// Where an attribution stands, for a progress display.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The layer being attributed.
    pub layer: String,
    /// 0-based index of the layer among those attributed.
    pub layer_index: usize,
    /// Number of layers attributed.
    pub layers: usize,
    /// Records processed so far in this layer (over all probe passes).
    pub records_done: u64,
    /// Records to process in this layer (over all probe passes).
    pub records_total: u64,
    /// Contribution rows computed so far, all layers.
    pub rows: u64,
    /// Time since [`attribute`] started.
    pub elapsed: Duration,
}

impl Progress {
    /// Contribution rows (record × probe pairs) per second so far.
    pub fn rows_per_sec(&self) -> f64 {
        per_second(self.rows, self.elapsed)
    }
}

/// `count` per second of `elapsed` (0 before any time has passed); the rate
/// the progress of an attribution or an export shows.
pub(crate) fn per_second(count: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 { count as f64 / s } else { 0.0 }
}

/// What one layer's attribution produced.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerReport {
    /// The traced layer.
    pub layer: String,
    /// Probes attributed in this layer.
    pub probes: usize,
    /// Update records of the layer read per pass.
    pub records: u64,
    /// Contribution rows computed, residual rows included.
    pub rows: u64,
    /// Rows written (fewer than `rows` when aggregated).
    pub written: u64,
    /// Passes over the records (more than 1 when probes did not fit the budget).
    pub passes: usize,
    /// `‖W_T − W_0‖` (weight and bias).
    pub change_norm: f64,
    /// `‖(W_T − W_0) − Σ scaled ΔW‖`.
    pub residual_norm: f64,
}

/// What [`attribute`] did.
#[derive(Debug, Clone)]
pub struct Report {
    /// One report per layer attributed, in order.
    pub layers: Vec<LayerReport>,
    /// Contribution rows computed.
    pub rows: u64,
    /// Rows written to disk.
    pub written: u64,
    /// Bytes written to disk.
    pub bytes: u64,
    /// Wall time of the whole attribution.
    pub elapsed: Duration,
    /// The manifest entry written.
    pub attribution: Attribution,
    /// Earlier attributions this one replaced (it covers all they held).
    pub replaced: usize,
}

/// Materialises the contributions of the selected probes of `run` and
/// records them in its manifest, beside the attributions already there.
/// An earlier attribution that this one covers (same aggregation, steps and
/// `self_only`; its probes and layers among this one's) is replaced.
pub fn attribute(
    run: &Path,
    options: &Options,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report> {
    let start = Instant::now();
    let run = Run::open(run)?;
    refuse_live_recording(&run)?;
    let layers = chosen_layers(&run, options)?;
    let setup = Setup::load(&run)?;
    let splits = instance_splits(&run)?;
    let seq = next_part_seq(&run);
    check_aggregation(&run, options)?;

    let mut written: Vec<FileEntry> = Vec::new();
    let mut reports = Vec::new();
    let mut rows_total = 0u64;
    let mut ids: Vec<i64> = Vec::new();
    let result = (|| -> Result<()> {
        for (index, layer) in layers.iter().enumerate() {
            let probes = select_probes(&run, layer, options, &splits)?;
            ids.extend_from_slice(&probes.probe_id);
            let job = LayerJob {
                run: &run,
                layer,
                index,
                layers: layers.len(),
                setup: &setup,
                options,
                start,
                seq,
            };
            let (entry, report) = job.run(&probes, &mut rows_total, progress)?;
            written.push(entry);
            reports.push(report);
        }
        Ok(())
    })();
    if let Err(e) = result {
        discard(&run, &written);
        return Err(e);
    }
    let attribution = Attribution {
        files: written.clone(),
        probes: options.probes.to_string(),
        probe_ids: Attribution::ranges(&ids),
        layers: layers.iter().map(|l| l.name().to_owned()).collect(),
        steps: options.steps.map(|r| {
            [
                r.first.unwrap_or(0).max(0),
                r.last.unwrap_or(setup.as_of).min(setup.as_of),
            ]
        }),
        self_only: options.self_only,
        by: options.by,
        as_of_step: Some(Step(setup.as_of)),
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    let replaced = commit(&run, &attribution, &written)?;
    Ok(Report {
        written: reports.iter().map(|r| r.written).sum(),
        bytes: written.iter().map(|f| f.bytes).sum(),
        layers: reports,
        rows: rows_total,
        elapsed: start.elapsed(),
        attribution,
        replaced,
    })
}

/// Refuses `--self-only` with an aggregation (its rows are one per record
/// already); says what per-instance sums are in batch mode.
fn check_aggregation(run: &Run, options: &Options) -> Result<()> {
    if options.by != Aggregation::Step && options.self_only {
        return Err(Error::BadOption {
            option: "--by",
            value: options.by.to_string(),
            why: "--self-only rows are one per record already; aggregate them in SQL".into(),
        });
    }
    if options.by == Aggregation::Instance && run.manifest().mode == reptrace_format::Mode::Batch {
        tracing::info!("batch mode: per-instance sums are per label of the batches");
    }
    Ok(())
}

/// Removes the unpublished parts `written`.
pub(crate) fn discard(run: &Run, written: &[FileEntry]) {
    for f in written {
        layout::remove(run.dir(), &f.path);
    }
}

/// Records `attribution` (whose parts are `written`) in the run's manifest,
/// publishes its parts and removes the files of the attributions it
/// replaced; how many it replaced. On failure before the manifest is
/// written, the parts are discarded.
pub(crate) fn commit(run: &Run, attribution: &Attribution, written: &[FileEntry]) -> Result<usize> {
    // Under the run's lock (an appender of probes may be writing the
    // manifest), re-read the manifest so that nothing it gained meanwhile is
    // lost.
    let recorded = lock_run(run).and_then(|lock| {
        let mut fresh = Manifest::load(run.dir())?;
        let (old, kept): (Vec<Attribution>, Vec<Attribution>) =
            std::mem::take(&mut fresh.attributions)
                .into_iter()
                .partition(|a| covers(attribution, a));
        fresh.attributions = kept;
        fresh.attributions.push(attribution.clone());
        write_manifest(run.dir(), &fresh)?;
        Ok((lock, fresh, old))
    });
    let (_lock, fresh, old) = match recorded {
        Ok(r) => r,
        Err(e) => {
            discard(run, written);
            return Err(e);
        }
    };
    // Committed: the new parts take their final names (a kill here is
    // finished by the next reader, Manifest::open), then the files of the
    // attributions it replaced go.
    for f in written {
        layout::publish(run.dir(), &f.path).map_err(|e| Error::io(run.path(&f.path), e))?;
    }
    let keep: HashSet<&str> = fresh
        .attributions
        .iter()
        .flat_map(|a| a.files.iter())
        .map(|f| f.path.as_str())
        .collect();
    for f in old.iter().flat_map(|a| a.files.iter()) {
        if !keep.contains(f.path.as_str()) {
            layout::remove(run.dir(), &f.path);
        }
    }
    Ok(old.len())
}

/// Whether attribution `new` holds everything `old` did, so that `old` can go.
fn covers(new: &Attribution, old: &Attribution) -> bool {
    let same_kind = new.by == old.by && new.steps == old.steps && new.self_only == old.self_only;
    let layers = old.layers.iter().all(|l| new.layers.contains(l));
    // Format 4 and older did not record the ids: covered when the selection
    // is the same text.
    let probes = if old.probe_ids.is_empty() {
        old.probes == new.probes
    } else {
        old.probe_ids
            .iter()
            .all(|[a, b]| new.probe_ids.iter().any(|[c, d]| c <= a && b <= d))
    };
    same_kind && layers && probes
}

/// Refuses a run whose recorder is alive: it is still being written, and
/// an attribution stands on final weights. A killed run (status `recording`,
/// nobody holding its lock) is attributed at its last commit point.
pub(crate) fn refuse_live_recording(run: &Run) -> Result<()> {
    if run.manifest().status != reptrace_format::Status::Recording {
        return Ok(());
    }
    match layout::lock_held(run.dir()) {
        Ok(false) => Ok(()),
        Ok(true) => Err(Error::Incomplete {
            run: run.dir().to_path_buf(),
            message: format!(
                "the run is still being recorded: its recorder, a live process, holds {}; \
                 attribute it once training has finished (queries read its committed steps \
                 meanwhile, computing contributions on demand)",
                layout::LOCK
            ),
        }),
        Err(e) => Err(Error::io(run.path(layout::LOCK), e)),
    }
}

/// How long `attribute` waits for the run's lock: a probe appender holds it
/// for seconds, a live recorder for the whole training.
const LOCK_WAIT: Duration = Duration::from_secs(60);

/// Takes the run's lock, waiting up to [`LOCK_WAIT`] for its holder.
fn lock_run(run: &Run) -> Result<std::fs::File> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match layout::lock(run.dir(), false) {
            Ok(Some(lock)) => return Ok(lock),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(None) => {
                return Err(Error::Incomplete {
                    run: run.dir().to_path_buf(),
                    message: format!(
                        "another process has held the run's lock ({}) for {} s (a training \
                         still recording, or probes being added); try again when it is done",
                        layout::LOCK,
                        LOCK_WAIT.as_secs()
                    ),
                });
            }
            Err(e) => return Err(Error::io(run.path(layout::LOCK), e)),
        }
    }
}

/// The traced layers to attribute, in forward order.
pub(crate) fn chosen_layers<'a>(run: &'a Run, options: &Options) -> Result<Vec<TracedLayer<'a>>> {
    let model = &run.manifest().model;
    let traced: Vec<TracedLayer<'a>> = model.traced_layers().collect();
    let known = || {
        traced
            .iter()
            .map(|l| l.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let with_probes: HashSet<String> = run
        .manifest()
        .analysis_probes()
        .map(|a| a.files)
        .unwrap_or_default()
        .iter()
        .filter_map(|f| f.layer.clone())
        .collect();
    if options.layers.is_empty() {
        let layers: Vec<_> = traced
            .iter()
            .copied()
            .filter(|l| with_probes.contains(l.name()))
            .collect();
        if layers.is_empty() {
            return Err(Error::Incomplete {
                run: run.dir().to_path_buf(),
                message: format!(
                    "no probes are committed (run status {}); probes are recorded at each epoch end and when training finishes",
                    run.manifest().status
                ),
            });
        }
        return Ok(layers);
    }
    let mut out = Vec::new();
    for name in &options.layers {
        let layer = model
            .traced_layer(name)
            .ok_or_else(|| Error::UnknownLayer {
                name: name.clone(),
                known: known(),
            })?;
        if !with_probes.contains(name) {
            return Err(Error::Incomplete {
                run: run.dir().to_path_buf(),
                message: format!("no probes are committed for layer {name}"),
            });
        }
        if !out.iter().any(|l: &TracedLayer<'_>| l.name() == name) {
            out.push(layer);
        }
    }
    // Forward order, whatever order they were given in.
    out.sort_by_key(|l| traced.iter().position(|t| t.name() == l.name()));
    Ok(out)
}

/// The probes of `layer` that `options` selects.
pub(crate) fn select_probes(
    run: &Run,
    layer: &TracedLayer<'_>,
    options: &Options,
    splits: &HashMap<i64, Split>,
) -> Result<Probes> {
    let all = Probes::read(run, layer)?;
    let is_train =
        |i: usize| all.instance_id[i].is_some_and(|id| splits.get(&id) == Some(&Split::Train));
    let mut rows: Vec<usize> = match &options.probes {
        ProbeSelection::All => (0..all.len()).collect(),
        ProbeSelection::Train => (0..all.len()).filter(|&i| is_train(i)).collect(),
        ProbeSelection::Test => (0..all.len()).filter(|&i| !is_train(i)).collect(),
        ProbeSelection::Ids(ids) => {
            let index: HashMap<i64, usize> = all
                .probe_id
                .iter()
                .enumerate()
                .map(|(i, &p)| (p, i))
                .collect();
            let mut rows = Vec::new();
            for id in ids {
                let row = index.get(id).ok_or_else(|| Error::UnknownProbe {
                    probe: *id,
                    layer: layer.name().to_owned(),
                    known: summarize_ids(&all.probe_id),
                })?;
                if !rows.contains(row) {
                    rows.push(*row);
                }
            }
            rows.sort_unstable();
            rows
        }
    };
    if options.self_only {
        if run.manifest().mode == reptrace_format::Mode::Batch {
            return Err(Error::BadOption {
                option: "--self-only",
                value: "batch mode".into(),
                why: "batch-mode records are whole-batch updates with no instance of their own; query batch_member_influence instead".into(),
            });
        }
        rows.retain(|&i| is_train(i));
        if rows.is_empty() {
            return Err(Error::BadOption {
                option: "probe selection",
                value: options.probes.to_string(),
                why: format!(
                    "with --self-only the probes must be training instances; none of layer {} is",
                    layer.name()
                ),
            });
        }
    }
    if rows.is_empty() {
        return Err(Error::BadOption {
            option: "probe selection",
            value: options.probes.to_string(),
            why: format!("selects no recorded probe of layer {}", layer.name()),
        });
    }
    Ok(all.select(&rows))
}

/// `1, 2, 3, … (N probes)` for error messages.
fn summarize_ids(ids: &[i64]) -> String {
    let head: Vec<String> = ids.iter().take(8).map(i64::to_string).collect();
    if ids.len() > head.len() {
        format!("{}, … ({} probes)", head.join(", "), ids.len())
    } else if ids.is_empty() {
        "none".into()
    } else {
        head.join(", ")
    }
}

/// The part number for this attribution's files: after every commit and
/// every previous attribution, and not taken by any file on disk.
pub(crate) fn next_part_seq(run: &Run) -> u64 {
    let m = run.manifest();
    let mut seq = m.commits.len() as u64;
    for f in m
        .files(Table::Contributions)
        .into_iter()
        .chain(m.files(Table::Influence))
    {
        let n = f
            .path
            .rsplit('/')
            .next()
            .and_then(|n| n.strip_prefix("part-"))
            .and_then(|n| n.strip_suffix(".parquet"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = n {
            seq = seq.max(n + 1);
        }
    }
    let taken = |seq: u64| {
        m.model.traced_layers().any(|l| {
            [Table::Contributions, Table::Influence].iter().any(|&t| {
                let rel = layout::part_path(t, Some(l.name()), seq);
                let path = run.path(&rel);
                path.exists() || layout::temp_path(&path).exists()
            })
        })
    };
    while taken(seq) {
        seq += 1;
    }
    seq
}

/// One layer's attribution, written to one part file.
struct LayerJob<'a> {
    run: &'a Run,
    layer: &'a TracedLayer<'a>,
    index: usize,
    layers: usize,
    setup: &'a Setup,
    options: &'a Options,
    start: Instant,
    seq: u64,
}

impl LayerJob<'_> {
    fn run(
        &self,
        probes: &Probes,
        rows_total: &mut u64,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(FileEntry, LayerReport)> {
        let name = self.layer.name();
        let table = if self.options.by == Aggregation::Step {
            Table::Contributions
        } else {
            Table::Influence
        };
        let out_schema = schema(table, Dtype::F32);
        let rel = layout::part_path(table, Some(name), self.seq);
        let floats: &[&str] = if table == Table::Contributions {
            &[col::DOT, col::NORM, col::COSINE]
        } else {
            &[col::DOT]
        };
        let mut part = PartWriter::create(
            self.run.dir(),
            rel,
            table,
            Some(name),
            &self.run.manifest().run_id,
            Arc::clone(&out_schema),
            floats,
        )?;
        let plan = Plan {
            steps: self.options.steps,
            instances: None,
            require_instance: false,
            self_only: self.options.self_only,
            residual: true,
            memory_budget: self.options.memory_budget,
            batch_rows: self.options.batch_rows,
        };
        let mut written = 0u64;
        let before = *rows_total;
        let mut on_progress = |done: u64, total: u64, rows: u64| {
            progress(&Progress {
                layer: name.to_owned(),
                layer_index: self.index,
                layers: self.layers,
                records_done: done,
                records_total: total,
                rows: before + rows,
                elapsed: self.start.elapsed(),
            });
        };
        let (entry, computed) = std::thread::scope(|scope| -> Result<(FileEntry, Computed)> {
            let (tx, rx) = sync_channel::<RecordBatch>(2);
            let writer = scope.spawn(move || -> Result<PartWriter> {
                for batch in rx {
                    part.write(&batch)?;
                }
                Ok(part)
            });
            // Per record: each batch to the writer; aggregated: summed here,
            // written at the end.
            let mut sums = (self.options.by != Aggregation::Step)
                .then(|| Sums::new(self.options.by == Aggregation::Epoch));
            let mut send = |batch: RecordBatch| {
                written += batch.num_rows() as u64;
                tx.send(batch)
                    .map_err(|_| Error::Internal(format!("{table} writer stopped")))
            };
            let computed = compute_layer(
                self.run,
                self.layer,
                self.setup,
                probes,
                &plan,
                &mut |batch| match sums.as_mut() {
                    Some(sums) => sums.add(&batch),
                    None => send(batch),
                },
                &mut on_progress,
            )
            .and_then(|c| {
                if let Some(sums) = sums.take() {
                    send(sums.into_batch(&out_schema)?)?;
                }
                Ok(c)
            });
            drop(tx);
            let part = writer
                .join()
                .map_err(|_| Error::Internal("contributions writer panicked".into()))?;
            // The writer's error is the cause when both failed.
            let part = part?;
            let computed = computed?;
            Ok((part.finish()?, computed))
        })?;
        *rows_total += computed.rows;
        let report = LayerReport {
            layer: name.to_owned(),
            probes: probes.len(),
            records: computed.records,
            rows: computed.rows,
            written,
            passes: computed.passes,
            change_norm: computed.change_norm.unwrap_or(f64::NAN),
            residual_norm: computed.residual_norm.unwrap_or(f64::NAN),
        };
        Ok((entry, report))
    }
}

/// Which contributions of one layer [`compute_layer`] computes.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Only records of these steps.
    pub steps: Option<StepRange>,
    /// Only records of these instances.
    pub instances: Option<HashSet<i64>>,
    /// Only records with an instance (none in batch mode).
    pub require_instance: bool,
    /// Only each probe's own records.
    pub self_only: bool,
    /// Also the residual row of each probe (needs every record's update).
    pub residual: bool,
    pub memory_budget: usize,
    pub batch_rows: Option<usize>,
}

impl Plan {
    fn keeps(&self, recs: &Records, i: usize, as_of: i64) -> bool {
        let step = recs.step[i];
        let instance = recs.instance_id[i];
        step <= as_of
            && self.steps.is_none_or(|r| r.contains(step))
            && (!self.require_instance || instance.is_some())
            && self
                .instances
                .as_ref()
                .is_none_or(|set| instance.is_some_and(|id| set.contains(&id)))
    }
}

/// What [`compute_layer`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Computed {
    /// Update records of the layer read per pass.
    pub records: u64,
    /// Rows handed to the sink.
    pub rows: u64,
    pub passes: usize,
    /// With the residual: `‖W_T − W_0‖` and `‖(W_T − W_0) − Σ scaled ΔW‖`.
    pub change_norm: Option<f64>,
    pub residual_norm: Option<f64>,
}

/// Computes the contributions of `probes` to one layer as `plan` asks,
/// handing them to `sink` as `contributions` batches (without `layer`), in
/// bounded batches: probes in as many passes over the records as the memory
/// budget needs, records streamed. `progress(records done, records to do,
/// rows so far)` follows it.
pub(crate) fn compute_layer(
    run: &Run,
    layer: &TracedLayer<'_>,
    setup: &Setup,
    probes: &Probes,
    plan: &Plan,
    sink: &mut dyn FnMut(RecordBatch) -> Result<()>,
    progress: &mut dyn FnMut(u64, u64, u64),
) -> Result<Computed> {
    // A preconditioned run's records reach the kernel as whole updates.
    let mode = crate::precondition::records_mode(run.manifest());
    let geom = Geometry::of(layer, mode)?;
    let name = layer.name();
    let out_schema = schema(Table::Contributions, Dtype::F32);
    let records = replay::update_rows(run, name);
    if probes.is_empty() {
        return Ok(Computed {
            records,
            rows: 0,
            passes: 0,
            change_norm: None,
            residual_norm: None,
        });
    }

    let (chunks, batch_rows) = passes(layer, mode, &geom, probes, plan);
    tracing::info!(
        layer = name,
        probes = probes.len(),
        records,
        passes = chunks.len(),
        batch_rows,
        "computing contributions"
    );
    let mut sum = vec![0.0; if plan.residual { geom.delta_len() } else { 0 }];
    let mut rows_out = 0u64;
    let mut done = 0u64;
    let total = records * chunks.len() as u64;
    for (index, chunk) in chunks.iter().enumerate() {
        let chunk_probes = probes.select(chunk);
        let pass = Pass {
            plan,
            as_of: setup.as_of,
            geom: &geom,
            features: ProbeFeatures::with_route(
                &geom,
                &chunk_probes,
                pass_route(&geom, probes, chunk, plan.self_only),
            )?,
            own: own_probes(plan, &chunk_probes),
            probes: &chunk_probes,
            schema: &out_schema,
        };
        let accumulate = (index == 0 && plan.residual).then_some(sum.as_mut_slice());
        replay::stream(run, layer, setup, batch_rows, accumulate, |recs, scales| {
            if let Some(batch) = pass.batch(recs, scales)? {
                rows_out += batch.num_rows() as u64;
                sink(batch)?;
            }
            done += recs.len() as u64;
            progress(done, total, rows_out);
            Ok(())
        })?;
    }
    let mut computed = Computed {
        records,
        rows: rows_out,
        passes: chunks.len(),
        change_norm: None,
        residual_norm: None,
    };
    if plan.residual {
        // Residual rows: what no record explains.
        let change = setup.weight_change(layer)?;
        let residual = change.minus(&kernel::split_delta(&geom, &sum));
        let batch = residual_rows(&geom, &residual, probes)?;
        computed.rows += batch.num_rows() as u64;
        sink(batch)?;
        computed.change_norm = Some(change.norm());
        computed.residual_norm = Some(residual.norm());
    }
    Ok(computed)
}

/// The residual row of each probe (step, epoch, instance and label NULL):
/// the contribution of `residual`, the weight change no record explains.
pub(crate) fn residual_rows(
    geom: &Geometry,
    residual: &LayerWeights,
    probes: &Probes,
) -> Result<RecordBatch> {
    let mut out = Rows::default();
    for q in 0..probes.len() {
        let (dot, norm) = kernel::direct(geom, residual, probes.a(q), probes.p(q))?;
        out.push(probes.probe_id[q], None, dot, norm, probes.p_norm[q]);
    }
    out.into_batch(&schema(Table::Contributions, Dtype::F32))
}

/// The passes over the records that `probes` of `layer` take (as many
/// probes per pass as fit half the budget; the indices of each pass's
/// probes), and the records per batch.
///
/// A layer with the factor route ([`Route`]) fills its passes by the
/// factor route's sizes where every pass then takes that route
/// ([`factor_passes`]); otherwise each probe counts the larger of the two
/// routes' sizes, whichever route a pass then takes. Records are sized for
/// the route alike.
fn passes(
    layer: &TracedLayer<'_>,
    mode: reptrace_format::Mode,
    geom: &Geometry,
    probes: &Probes,
    plan: &Plan,
) -> (Vec<Vec<usize>>, usize) {
    let n_probes = probes.len();
    let (chunks, record_len) = match factor_passes(geom, probes, plan) {
        Some(chunks) => (chunks, geom.factor_record_len().unwrap_or(0)),
        None => {
            let widest = (0..n_probes)
                .map(|i| geom.probe_positions(probes, i))
                .max()
                .unwrap_or(0);
            let factor_len = geom.factor_probe_len(widest).unwrap_or(0);
            let per_probe = 8 * geom.probe_feature_len().max(factor_len).max(1);
            let per_pass = (plan.memory_budget / 2 / per_probe).max(1);
            let chunks = (0..n_probes)
                .collect::<Vec<_>>()
                .chunks(per_pass)
                .map(<[usize]>::to_vec)
                .collect();
            let record_len = geom
                .record_feature_len()
                .max(geom.factor_record_len().unwrap_or(0));
            (chunks, record_len)
        }
    };
    let per_pass = chunks.iter().map(Vec::len).max().unwrap_or(1);
    let pairs_per_record = if plan.self_only {
        1
    } else {
        per_pass.min(n_probes)
    };
    let batch_rows = plan.batch_rows.unwrap_or_else(|| {
        let by_factors = replay::batch_rows_with(layer, mode, plan.memory_budget / 8, record_len);
        // dot, norm and the output row of each pair: ~80 bytes.
        let by_output = (plan.memory_budget / 8) / (80 * pairs_per_record.max(1));
        by_factors.min(by_output.max(1))
    });
    (chunks, batch_rows)
}

/// The route of a pass over the probes at `chunk` of `probes`: the cost
/// model's ([`Geometry::route`], as [`ProbeFeatures::new`] decides) for the
/// probes each record meets: those of the pass, or one in a self-only plan.
fn pass_route(geom: &Geometry, probes: &Probes, chunk: &[usize], self_only: bool) -> Route {
    let positions: usize = chunk.iter().map(|&i| geom.probe_positions(probes, i)).sum();
    let mean = positions as f64 / chunk.len().max(1) as f64;
    let met = if self_only {
        chunk.len().min(1)
    } else {
        chunk.len()
    };
    geom.route(met, mean)
}

/// Passes of `probes` filled up to half the plan's budget each by the
/// factor route's sizes ([`Geometry::factor_probe_len`] of each probe's
/// positions), where the layer has the factor route and every pass takes
/// it ([`pass_route`]); `None` otherwise.
fn factor_passes(geom: &Geometry, probes: &Probes, plan: &Plan) -> Option<Vec<Vec<usize>>> {
    if !geom.has_factor_route() {
        return None;
    }
    let bytes = plan.memory_budget / 2;
    let (mut chunks, mut chunk, mut used) = (Vec::new(), Vec::new(), 0);
    for i in 0..probes.len() {
        let need = 8 * geom
            .factor_probe_len(geom.probe_positions(probes, i))?
            .max(1);
        if !chunk.is_empty() && used + need > bytes {
            chunks.push(std::mem::take(&mut chunk));
            used = 0;
        }
        chunk.push(i);
        used += need;
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    let factor_route =
        |chunk: &Vec<usize>| pass_route(geom, probes, chunk, plan.self_only) == Route::Factors;
    chunks.iter().all(factor_route).then_some(chunks)
}

/// The probes (indices into `probes`) of each instance, for a plan of
/// `self_only` rows; empty otherwise.
fn own_probes(plan: &Plan, probes: &Probes) -> HashMap<i64, Vec<usize>> {
    let mut own: HashMap<i64, Vec<usize>> = HashMap::new();
    if plan.self_only {
        for (q, id) in probes.instance_id.iter().enumerate() {
            if let Some(id) = id {
                own.entry(*id).or_default().push(q);
            }
        }
    }
    own
}

/// One pass of [`compute_layer`] over the records: the probes it attributes.
struct Pass<'a> {
    plan: &'a Plan,
    /// The step the run stands at.
    as_of: i64,
    geom: &'a Geometry,
    features: ProbeFeatures,
    /// The probes of each instance ([`own_probes`]).
    own: HashMap<i64, Vec<usize>>,
    probes: &'a Probes,
    schema: &'a SchemaRef,
}

impl Pass<'_> {
    /// The contributions of the records of `recs` the plan keeps (`None`
    /// when it keeps none or no pair).
    fn batch(&self, recs: &Records, scales: &[f64]) -> Result<Option<RecordBatch>> {
        let plan = self.plan;
        if !plan.self_only {
            return pairs_of(
                plan,
                self.as_of,
                self.geom,
                &self.features,
                self.probes,
                recs,
                scales,
                self.schema,
            );
        }
        let rows: Vec<usize> = (0..recs.len())
            .filter(|&i| plan.keeps(recs, i, self.as_of))
            .filter(|&i| recs.instance_id[i].is_some_and(|id| self.own.contains_key(&id)))
            .collect();
        if rows.is_empty() {
            return Ok(None);
        }
        let rf = RecordFeatures::for_probes(self.geom, &self.features, recs, scales, &rows)?;
        own_pairs(&rf, &self.features, recs, &rows, self.probes, &self.own)
            .map(|r| r.into_batch(self.schema))
            .transpose()
    }
}

/// The contributions to every probe of `probes` (whose `features` these
/// are) of the records of `recs` that `plan` keeps, as of step `as_of`
/// (`None` when it keeps none): what a pass makes of one batch of records.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pairs_of(
    plan: &Plan,
    as_of: i64,
    geom: &Geometry,
    features: &ProbeFeatures,
    probes: &Probes,
    recs: &Records,
    scales: &[f64],
    schema: &SchemaRef,
) -> Result<Option<RecordBatch>> {
    let rows: Vec<usize> = (0..recs.len())
        .filter(|&i| plan.keeps(recs, i, as_of))
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let rf = RecordFeatures::for_probes(geom, features, recs, scales, &rows)?;
    all_pairs(&rf, features, recs, &rows, probes, schema).map(Some)
}

/// The group of an aggregated row: (probe, epoch, instance, label, residual).
type Group = (i64, Option<i32>, Option<i64>, Option<i32>, bool);

/// Contributions summed per probe, instance and label (and epoch), for
/// `attribute --by instance|epoch`.
struct Sums {
    by_epoch: bool,
    /// Group → (Σ dot, records).
    groups: BTreeMap<Group, (f64, i64)>,
}

impl Sums {
    fn new(by_epoch: bool) -> Self {
        Self {
            by_epoch,
            groups: BTreeMap::new(),
        }
    }

    /// Adds a `contributions` batch.
    fn add(&mut self, batch: &RecordBatch) -> Result<()> {
        let get = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| Error::Internal(format!("contributions batch without {name}")))
        };
        let probe = get(col::PROBE_ID)?.as_primitive::<Int64Type>();
        let step = get(col::STEP)?.as_primitive::<Int64Type>();
        let epoch = get(col::EPOCH)?.as_primitive::<Int32Type>();
        let instance = get(col::INSTANCE_ID)?.as_primitive::<Int64Type>();
        let label = get(col::LABEL)?.as_primitive::<Int32Type>();
        let dot = get(col::DOT)?.as_primitive::<Float64Type>();
        fn opt<T>(valid: bool, v: T) -> Option<T> {
            valid.then_some(v)
        }
        for i in 0..batch.num_rows() {
            let residual = step.is_null(i);
            let key = (
                probe.value(i),
                if self.by_epoch {
                    opt(epoch.is_valid(i), epoch.value(i))
                } else {
                    None
                },
                opt(instance.is_valid(i), instance.value(i)),
                opt(label.is_valid(i), label.value(i)),
                residual,
            );
            let e = self.groups.entry(key).or_insert((0.0, 0));
            e.0 += dot.value(i);
            if !residual {
                e.1 += 1;
            }
        }
        Ok(())
    }

    fn into_batch(self, schema: &SchemaRef) -> Result<RecordBatch> {
        let n = self.groups.len();
        let (mut probe, mut epoch, mut instance, mut label, mut dot, mut records) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for ((p, e, i, l, _), (d, r)) in self.groups {
            probe.push(p);
            epoch.push(e);
            instance.push(i);
            label.push(l);
            dot.push(d);
            records.push(r);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(probe)),
            Arc::new(Int32Array::from(epoch)),
            Arc::new(Int64Array::from(instance)),
            Arc::new(Int32Array::from(label)),
            Arc::new(Float64Array::from(dot)),
            Arc::new(Int64Array::from(records)),
        ];
        RecordBatch::try_new(Arc::clone(schema), columns)
            .map_err(|e| Error::Internal(format!("building an influence batch: {e}")))
    }
}

/// Contribution rows being assembled.
#[derive(Default)]
struct Rows {
    probe_id: Vec<i64>,
    step: Vec<Option<i64>>,
    epoch: Vec<Option<i32>>,
    instance_id: Vec<Option<i64>>,
    label: Vec<Option<i32>>,
    dot: Vec<f64>,
    norm: Vec<f64>,
    cosine: Vec<f64>,
}

impl Rows {
    /// A row for probe `probe` and record `rec` (`None`: the residual).
    fn push(
        &mut self,
        probe: i64,
        rec: Option<(&Records, usize)>,
        dot: f64,
        norm: f64,
        p_norm: f64,
    ) {
        self.probe_id.push(probe);
        match rec {
            Some((recs, r)) => {
                self.step.push(Some(recs.step[r]));
                self.epoch.push(Some(recs.epoch[r]));
                self.instance_id.push(recs.instance_id[r]);
                self.label.push(recs.label[r]);
            }
            None => {
                self.step.push(None);
                self.epoch.push(None);
                self.instance_id.push(None);
                self.label.push(None);
            }
        }
        self.dot.push(dot);
        self.norm.push(norm);
        self.cosine.push(kernel::cosine(dot, norm, p_norm));
    }

    fn into_batch(self, schema: &SchemaRef) -> Result<RecordBatch> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(self.probe_id)),
            Arc::new(Int64Array::from(self.step)),
            Arc::new(Int32Array::from(self.epoch)),
            Arc::new(Int64Array::from(self.instance_id)),
            Arc::new(Int32Array::from(self.label)),
            Arc::new(Float64Array::from(self.dot)),
            Arc::new(Float64Array::from(self.norm)),
            Arc::new(Float64Array::from(self.cosine)),
        ];
        RecordBatch::try_new(Arc::clone(schema), columns)
            .map_err(|e| Error::Internal(format!("building a contributions batch: {e}")))
    }
}

/// Rows for every selected record with every probe, probe-major, built
/// column by column.
fn all_pairs(
    rf: &RecordFeatures,
    features: &ProbeFeatures,
    recs: &Records,
    rows: &[usize],
    probes: &Probes,
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let (dot, norm) = rf.all_pairs(features)?;
    let r = rows.len();
    // The records' columns, repeated once per probe.
    fn tile<T: Copy>(one: Vec<T>, times: usize) -> Vec<T> {
        let mut all = Vec::with_capacity(one.len() * times);
        for _ in 0..times {
            all.extend_from_slice(&one);
        }
        all
    }
    let q = probes.len();
    let probe_id: Vec<i64> = probes
        .probe_id
        .iter()
        .flat_map(|&p| std::iter::repeat_n(p, r))
        .collect();
    let dot: Vec<f64> = dot.iter().copied().collect();
    let norm: Vec<f64> = norm.iter().copied().collect();
    let cosine: Vec<f64> = dot
        .iter()
        .zip(&norm)
        .enumerate()
        .map(|(k, (d, n))| kernel::cosine(*d, *n, probes.p_norm[k / r.max(1)]))
        .collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(probe_id)),
        Arc::new(Int64Array::from(tile(
            rows.iter().map(|&i| recs.step[i]).collect(),
            q,
        ))),
        Arc::new(Int32Array::from(tile(
            rows.iter().map(|&i| recs.epoch[i]).collect(),
            q,
        ))),
        Arc::new(Int64Array::from(tile(
            rows.iter().map(|&i| recs.instance_id[i]).collect(),
            q,
        ))),
        Arc::new(Int32Array::from(tile(
            rows.iter().map(|&i| recs.label[i]).collect(),
            q,
        ))),
        Arc::new(Float64Array::from(dot)),
        Arc::new(Float64Array::from(norm)),
        Arc::new(Float64Array::from(cosine)),
    ];
    RecordBatch::try_new(Arc::clone(schema), columns)
        .map_err(|e| Error::Internal(format!("building a contributions batch: {e}")))
}

/// Rows for each selected record with the probes that are its own instance.
fn own_pairs(
    rf: &RecordFeatures,
    features: &ProbeFeatures,
    recs: &Records,
    rows: &[usize],
    probes: &Probes,
    own: &HashMap<i64, Vec<usize>>,
) -> Option<Rows> {
    let mut out = Rows::default();
    for (i, &r) in rows.iter().enumerate() {
        let Some(id) = recs.instance_id[r] else {
            continue;
        };
        for &q in own.get(&id).into_iter().flatten() {
            let (dot, norm) = rf.pair(features, i, q);
            out.push(
                probes.probe_id[q],
                Some((recs, r)),
                dot,
                norm,
                probes.p_norm[q],
            );
        }
    }
    (!out.probe_id.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reptrace_format::{LinearSpec, Mode};

    /// `n` probes of `t` positions of a linear layer of `k` inputs and outputs.
    fn probes(n: usize, t: usize, k: usize) -> Probes {
        let mut probes = Probes::default();
        for i in 0..n {
            probes.probe_id.push(i as i64);
            probes.instance_id.push(Some(i as i64));
            probes.label.push(0);
            probes.predicted.push(0);
            probes.p_norm.push(1.0);
            probes.push_lists(&vec![0.5; t * k], &vec![0.25; t * k]);
        }
        probes
    }

    fn plan(self_only: bool, memory_budget: usize) -> Plan {
        Plan {
            steps: None,
            instances: None,
            require_instance: false,
            self_only,
            residual: false,
            memory_budget,
            batch_rows: None,
        }
    }

    #[test]
    fn passes_follow_the_route_and_self_only_meets_one_probe() {
        let spec = LinearSpec {
            positions: 16,
            ..LinearSpec::new("seq", 32, 32, true)
        };
        let layer = TracedLayer::Linear(&spec);
        let geom = Geometry::of(&layer, Mode::Instance).expect("geometry");
        // Many probes: every record meets them all on the Gram route, one
        // at a time (self-only) on the factor route.
        let many = probes(200, 16, 32);
        let all: Vec<usize> = (0..many.len()).collect();
        assert_eq!(pass_route(&geom, &many, &all, false), Route::Gram);
        assert_eq!(pass_route(&geom, &many, &all, true), Route::Factors);
        assert!(factor_passes(&geom, &many, &plan(false, 1 << 30)).is_none());
        let own = factor_passes(&geom, &many, &plan(true, 1 << 30)).expect("factor passes");
        assert_eq!(own, vec![all.clone()]);
        // A budget of two probes per pass on the factor route: passes of
        // two take it (five probes at once would not), filled by its sizes
        // (each probe 16·(32 + 32 + 3·16) values).
        let few = probes(5, 16, 32);
        let per_probe = 8 * geom.factor_probe_len(16).expect("factor route");
        assert_eq!(per_probe, 8 * 16 * (32 + 32 + 48));
        let budget = plan(false, 2 * (2 * per_probe + 1));
        let five: Vec<usize> = (0..5).collect();
        assert_eq!(pass_route(&geom, &few, &five, false), Route::Gram);
        assert_eq!(pass_route(&geom, &few, &five[..2], false), Route::Factors);
        let factor = factor_passes(&geom, &few, &budget).expect("factor passes");
        let (chunks, _) = passes(&layer, Mode::Instance, &geom, &few, &budget);
        assert_eq!(chunks, factor);
        assert_eq!(chunks, vec![vec![0, 1], vec![2, 3], vec![4]]);
    }
}
