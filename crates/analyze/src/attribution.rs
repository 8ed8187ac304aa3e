//! Attribution: the contribution of every update record to every probe.
//!
//! For each traced layer, [`attribute`] streams the committed `updates`
//! records (bounded batches, decoded on a background thread), computes each
//! record's `dot = ⟨c, p⟩`, `norm = ‖c‖` and `cosine` with every selected
//! probe as matrix products (see [`crate::kernel`]), scaled by the record's
//! displacement scale (momentum), and writes them to
//! `contributions/layer=<name>/part-NNNNNN.parquet` on a writer thread. It
//! adds one residual row per probe and layer (step, epoch, instance_id and
//! label NULL) for the weight change no record explains,
//! `R = (W_T − W_0) − Σ scaled ΔW` over *all* records of the replay, so that
//! for a full attribution the dots of a probe sum to `‖p‖²`. Then it replaces
//! the manifest's `attribution` (temporary file and rename) and only after
//! that deletes the files of the previous attribution.
//!
//! Memory stays bounded: records come in batches sized to the layer, and when
//! the probes' features would not fit the budget the probes are processed in
//! several passes over the records.
//!
//! Attribute a run once training has finished: the recorder rewrites the
//! manifest at every commit from its own copy, which would drop an
//! attribution made while it is still recording.
//!
//! In batch mode a record is the whole update of one step: its rows have the
//! step, `instance_id` NULL and the batch's label when the batch is of one
//! class (NULL otherwise); the batch's members are in the `batches` table.
use crate::kernel::{self, Geometry, ProbeFeatures, RecordFeatures};
use crate::probes::{Probes, instance_splits};
use crate::records::Records;
use crate::replay::{self, Setup};
use crate::session::Run;
use crate::writer::{PartWriter, write_manifest};
use crate::{Error, Result};
use arrow_array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch};
use arrow_schema::SchemaRef;
use reptrace_format::{
    Attribution, Dtype, FileEntry, Manifest, Split, Step, Table, TracedLayer, col, layout, schema,
};
use std::collections::{HashMap, HashSet};
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
    pub first: Option<i64>,
    pub last: Option<i64>,
}

impl StepRange {
    fn contains(&self, step: i64) -> bool {
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
    pub probes: ProbeSelection,
    /// Layers to attribute; empty: every traced layer with recorded probes.
    pub layers: Vec<String>,
    /// Only records of these steps (the residual still covers every record).
    pub steps: Option<StepRange>,
    /// Only each probe's own records (probes that are training instances).
    pub self_only: bool,
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
            batch_rows: None,
            memory_budget: 1 << 30,
        }
    }
}

/// Where an attribution stands, for a progress display.
#[derive(Debug, Clone)]
pub struct Progress {
    pub layer: String,
    /// 0-based index of the layer among those attributed.
    pub layer_index: usize,
    pub layers: usize,
    /// Records processed so far in this layer (over all probe passes).
    pub records_done: u64,
    /// Records to process in this layer (over all probe passes).
    pub records_total: u64,
    /// Contribution rows computed so far, all layers.
    pub rows: u64,
    pub elapsed: Duration,
}

impl Progress {
    /// Contribution rows (record × probe pairs) per second so far.
    pub fn rows_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 { self.rows as f64 / s } else { 0.0 }
    }
}

/// What one layer's attribution produced.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerReport {
    pub layer: String,
    pub probes: usize,
    /// Update records of the layer read per pass.
    pub records: u64,
    /// Contribution rows written, residual rows included.
    pub rows: u64,
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
    pub layers: Vec<LayerReport>,
    pub rows: u64,
    pub elapsed: Duration,
    /// The manifest entry written.
    pub attribution: Attribution,
}

/// Attributes the selected probes of `run` and records the result in its manifest.
pub fn attribute(
    run: &Path,
    options: &Options,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report> {
    let start = Instant::now();
    let run = Run::open(run)?;
    let layers = chosen_layers(&run, options)?;
    let setup = Setup::load(&run)?;
    let splits = instance_splits(&run)?;
    let seq = next_part_seq(&run);

    let mut written: Vec<FileEntry> = Vec::new();
    let mut reports = Vec::new();
    let mut rows_total = 0u64;
    let n_layers = layers.len();
    let result = (|| -> Result<()> {
        for (index, layer) in layers.iter().enumerate() {
            let probes = select_probes(&run, layer, options, &splits)?;
            let ctx = LayerJob {
                run: &run,
                layer,
                index,
                layers: n_layers,
                setup: &setup,
                options,
                start,
                seq,
            };
            let (entry, report) = ctx.run(&probes, &mut rows_total, progress)?;
            written.push(entry);
            reports.push(report);
        }
        Ok(())
    })();
    let discard = |written: &[FileEntry]| {
        for f in written {
            layout::remove(run.dir(), &f.path);
        }
    };
    if let Err(e) = result {
        discard(&written);
        return Err(e);
    }

    let attribution = Attribution {
        files: written.clone(),
        probes: options.probes.to_string(),
        layers: layers.iter().map(|l| l.name().to_owned()).collect(),
        steps: options.steps.map(|r| {
            [
                r.first.unwrap_or(0).max(0),
                r.last.unwrap_or(setup.as_of).min(setup.as_of),
            ]
        }),
        self_only: options.self_only,
        as_of_step: Some(Step(setup.as_of)),
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    // Under the run's lock (an appender of probes may be writing the
    // manifest), re-read the manifest so that nothing it gained meanwhile is
    // lost.
    let _lock = match layout::lock(run.dir(), true) {
        Ok(lock) => lock,
        Err(e) => {
            discard(&written);
            return Err(Error::io(run.path(layout::LOCK), e));
        }
    };
    let mut fresh = match Manifest::load(run.dir()) {
        Ok(f) => f,
        Err(e) => {
            discard(&written);
            return Err(e.into());
        }
    };
    let old = fresh.attribution.replace(attribution.clone());
    if let Err(e) = write_manifest(run.dir(), &fresh) {
        discard(&written);
        return Err(e);
    }
    // Committed: the new parts take their final names (a kill here is
    // finished by the next reader, Manifest::open), then the previous
    // attribution's files go.
    for f in &written {
        layout::publish(run.dir(), &f.path).map_err(|e| Error::io(run.path(&f.path), e))?;
    }
    let keep: HashSet<&str> = written.iter().map(|f| f.path.as_str()).collect();
    for f in old.iter().flat_map(|a| a.files.iter()) {
        if !keep.contains(f.path.as_str()) {
            layout::remove(run.dir(), &f.path);
        }
    }
    Ok(Report {
        layers: reports,
        rows: rows_total,
        elapsed: start.elapsed(),
        attribution,
    })
}

/// The traced layers to attribute, in forward order.
fn chosen_layers<'a>(run: &'a Run, options: &Options) -> Result<Vec<TracedLayer<'a>>> {
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
fn select_probes(
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
fn next_part_seq(run: &Run) -> u64 {
    let m = run.manifest();
    let mut seq = m.commits.len() as u64;
    for f in m.files(Table::Contributions) {
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
            let rel = layout::part_path(Table::Contributions, Some(l.name()), seq);
            let path = run.path(&rel);
            path.exists() || layout::temp_path(&path).exists()
        })
    };
    while taken(seq) {
        seq += 1;
    }
    seq
}

/// One layer's attribution.
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
        let geom = Geometry::of(self.layer, self.run.manifest().mode);
        let name = self.layer.name();
        let out_schema = schema(Table::Contributions, Dtype::F32);
        let rel = layout::part_path(Table::Contributions, Some(name), self.seq);
        let mut part = PartWriter::create(
            self.run.dir(),
            rel,
            Table::Contributions,
            Some(name),
            &self.run.manifest().run_id,
            Arc::clone(&out_schema),
            &[col::DOT, col::NORM, col::COSINE],
        )?;

        // Probe passes: as many probes per pass as fit half the budget.
        let per_probe = 8 * geom.probe_feature_len().max(1);
        let per_pass = (self.options.memory_budget / 2 / per_probe).max(1);
        let chunks: Vec<Vec<usize>> = (0..probes.len())
            .collect::<Vec<_>>()
            .chunks(per_pass)
            .map(<[usize]>::to_vec)
            .collect();
        let records = replay::update_rows(self.run, name);
        let pairs_per_record = if self.options.self_only {
            1
        } else {
            per_pass.min(probes.len())
        };
        let batch_rows = self.options.batch_rows.unwrap_or_else(|| {
            let by_factors = replay::batch_rows_for(
                self.layer,
                self.run.manifest().mode,
                self.options.memory_budget / 8,
            );
            // dot, norm and the output row of each pair: ~80 bytes.
            let by_output = (self.options.memory_budget / 8) / (80 * pairs_per_record.max(1));
            by_factors.min(by_output.max(1))
        });

        tracing::info!(
            layer = name,
            probes = probes.len(),
            records,
            passes = chunks.len(),
            batch_rows,
            "attributing"
        );
        let mut sum = vec![0.0; geom.delta_len()];
        let mut layer_rows = 0u64;
        let mut done = 0u64;
        let total = records * chunks.len() as u64;
        let (entry, change_norm, residual_norm) =
            std::thread::scope(|scope| -> Result<(FileEntry, f64, f64)> {
                let (tx, rx) = sync_channel::<RecordBatch>(2);
                let writer = scope.spawn(move || -> Result<PartWriter> {
                    for batch in rx {
                        part.write(&batch)?;
                    }
                    Ok(part)
                });
                let computed = (|| -> Result<()> {
                    for (pass, chunk) in chunks.iter().enumerate() {
                        let chunk_probes = probes.select(chunk);
                        let features = ProbeFeatures::new(&geom, &chunk_probes)?;
                        let own: HashMap<i64, Vec<usize>> = if self.options.self_only {
                            let mut own: HashMap<i64, Vec<usize>> = HashMap::new();
                            for (q, id) in chunk_probes.instance_id.iter().enumerate() {
                                if let Some(id) = id {
                                    own.entry(*id).or_default().push(q);
                                }
                            }
                            own
                        } else {
                            HashMap::new()
                        };
                        let accumulate = (pass == 0).then_some(sum.as_mut_slice());
                        replay::stream(
                            self.run,
                            self.layer,
                            self.setup,
                            batch_rows,
                            accumulate,
                            |recs, scales| {
                                let rows: Vec<usize> = (0..recs.len())
                                    .filter(|&i| {
                                        recs.step[i] <= self.setup.as_of
                                            && self
                                                .options
                                                .steps
                                                .is_none_or(|r| r.contains(recs.step[i]))
                                    })
                                    .collect();
                                let batch = if rows.is_empty() {
                                    None
                                } else {
                                    let rf = RecordFeatures::new(&geom, recs, scales, &rows)?;
                                    if self.options.self_only {
                                        own_pairs(&rf, &features, recs, &rows, &chunk_probes, &own)
                                            .map(|r| r.into_batch(&out_schema))
                                            .transpose()?
                                    } else {
                                        Some(all_pairs(
                                            &rf,
                                            &features,
                                            recs,
                                            &rows,
                                            &chunk_probes,
                                            &out_schema,
                                        )?)
                                    }
                                };
                                if let Some(batch) = batch {
                                    layer_rows += batch.num_rows() as u64;
                                    *rows_total += batch.num_rows() as u64;
                                    tx.send(batch).map_err(|_| {
                                        Error::Internal("contributions writer stopped".into())
                                    })?;
                                }
                                done += recs.len() as u64;
                                progress(&Progress {
                                    layer: name.to_owned(),
                                    layer_index: self.index,
                                    layers: self.layers,
                                    records_done: done,
                                    records_total: total,
                                    rows: *rows_total,
                                    elapsed: self.start.elapsed(),
                                });
                                Ok(())
                            },
                        )?;
                    }
                    Ok(())
                })();
                // Residual rows: what no record explains.
                let residual = computed.and_then(|()| {
                    let change = self.setup.weight_change(self.layer)?;
                    let residual = change.minus(&kernel::split_delta(&geom, &sum));
                    let mut out = Rows::default();
                    for q in 0..probes.len() {
                        let (dot, norm) =
                            kernel::direct(&geom, &residual, probes.a(q), probes.p(q))?;
                        out.push(probes.probe_id[q], None, dot, norm, probes.p_norm[q]);
                    }
                    let batch = out.into_batch(&out_schema)?;
                    layer_rows += batch.num_rows() as u64;
                    *rows_total += batch.num_rows() as u64;
                    tx.send(batch)
                        .map_err(|_| Error::Internal("contributions writer stopped".into()))?;
                    Ok((change.norm(), residual.norm()))
                });
                drop(tx);
                let part = writer
                    .join()
                    .map_err(|_| Error::Internal("contributions writer panicked".into()))?;
                // The writer's error is the cause when both failed.
                let part = part?;
                let (change_norm, residual_norm) = residual?;
                Ok((part.finish()?, change_norm, residual_norm))
            })?;
        let report = LayerReport {
            layer: name.to_owned(),
            probes: probes.len(),
            records,
            rows: layer_rows,
            passes: chunks.len(),
            change_norm,
            residual_norm,
        };
        Ok((entry, report))
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
