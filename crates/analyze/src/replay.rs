//! Replaying a run's updates: the weights they start and end at, the
//! displacement scale of each step, and a streaming pass over one layer's
//! records (read on a background thread, bounded queue).
use crate::kernel::{self, Geometry};
use crate::precondition::{self, Preconditioner};
use crate::records::{
    RecordReader, Records, bools, f64s, f64s_opt, i32s, i64s, open_columns, strings,
};
use crate::run::Run;
use crate::weights::{LayerWeights, Snapshot};
use crate::{Error, Result};
use arrow_array::RecordBatch;
use reptrace_format::{
    Mode, StepHyper, Table, TracedLayer, col, column_since, sgd_displacement_scales,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

/// What a replay of the run's updates needs besides the records.
pub struct Setup {
    /// The weights before the first step.
    pub initial: Snapshot,
    /// The weights snapshot the probes were taken against (normally
    /// `final.safetensors`; the last checkpoint of an unfinished run).
    pub last: Snapshot,
    /// Relative path of `last`.
    pub last_path: String,
    /// The last step that `last` includes.
    pub as_of: i64,
    /// Per traced layer: the displacement scales and what the steps applied.
    layers: HashMap<String, LayerHistory>,
}

/// The floating-point type a layer's forward and backward pass ran in
/// (`layer_steps.precision`), lowest last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precision {
    /// float32 (and runs that record no precision).
    F32,
    /// float16 (autocast).
    F16,
    /// bfloat16 (autocast).
    Bf16,
}

impl Precision {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "bf16" => Some(Self::Bf16),
            _ => None,
        }
    }

    /// The name as `layer_steps` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    /// Unit roundoff of the type: the relative rounding of one value.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            Self::F32 => f64::from(f32::EPSILON) / 2.0,
            Self::F16 => 1.0 / 2048.0,
            Self::Bf16 => 1.0 / 256.0,
        }
    }
}

/// What the steps of the replay did to one traced layer.
#[derive(Debug, Clone)]
pub struct LayerHistory {
    /// Displacement scale `σ_s = λ_s / η_s` of each step `0..=as_of` (1 in
    /// batch mode, 0 for skipped steps).
    pub scales: Vec<f64>,
    /// Whether some step applied weight decay to the layer: its residual is
    /// then expected (docs/method.md §5).
    pub weight_decay: bool,
    /// The lowest precision a step of the layer ran in.
    pub precision: Precision,
    /// `Σ_t σ_t η_t ‖g_t‖` over the steps with a recorded gradient norm: how
    /// far the applied gradients moved the layer, rounding included; the
    /// scale of the rounding bound of low-precision steps.
    pub applied: f64,
    /// Whether the run has `layer_steps` rows for the layer (format 7
    /// producers in instance mode).
    pub per_step: bool,
    /// Adam's preconditioner `G_t` per step, for a run of Adam or AdamW in
    /// instance mode ([`precondition::preconditioned`]): its records are
    /// replayed as `G_t ⊙ [vec ΔW, Δb]` with scale 1.
    pub preconditioner: Option<Preconditioner>,
}

impl Setup {
    /// Reads the weights snapshots and the learning rates of a run.
    pub fn load(run: &Run) -> Result<Self> {
        let m = run.manifest();
        let incomplete = |message: String| Error::Incomplete {
            run: run.dir().to_path_buf(),
            message,
        };
        let initial_rel = m
            .initial_weights()
            .ok_or_else(|| incomplete("no initial weights snapshot is committed".into()))?;
        // The snapshot the probes were taken against; without probes the latest.
        let (last_rel, as_of) = match m.analysis_probes() {
            Some(a) => (a.weights, a.step),
            None => m.latest_weights().ok_or_else(|| {
                incomplete("no weights snapshot after a training step is committed".into())
            })?,
        };
        let as_of = as_of
            .ok_or_else(|| {
                incomplete("no weights snapshot after a training step is committed".into())
            })?
            .0;
        let steps = step_rows(run, as_of)?;
        let mut per_layer = layer_rows(run, as_of)?;
        let mut layers = HashMap::new();
        // The preconditioners are held for the whole analysis: bounded by
        // the memory limit of the environment (or the machine's default).
        let budget = crate::Limits::default().memory.unwrap_or(u64::MAX);
        for layer in m.model.traced_layers() {
            let rows = per_layer.remove(layer.name()).unwrap_or_default();
            let mut history = LayerHistory::of(run, layer.name(), &steps, rows)?;
            if precondition::preconditioned(m) {
                history.preconditioner = Some(Preconditioner::load(run, &layer, as_of, budget)?);
            }
            layers.insert(layer.name().to_owned(), history);
        }
        Ok(Setup {
            initial: Snapshot::read(&run.path(initial_rel))?,
            last: Snapshot::read(&run.path(last_rel))?,
            last_path: last_rel.to_owned(),
            as_of,
            layers,
        })
    }

    /// What the steps did to `layer`.
    pub fn history(&self, layer: &str) -> Result<&LayerHistory> {
        self.layers
            .get(layer)
            .ok_or_else(|| Error::Internal(format!("no step history for layer {layer:?}")))
    }

    /// `W_T − W_0` of a layer.
    pub fn weight_change(&self, layer: &TracedLayer<'_>) -> Result<LayerWeights> {
        Ok(self.last.layer(layer)?.minus(&self.initial.layer(layer)?))
    }

    /// Displacement scale of each record of `recs` (records of `layer`),
    /// and whether it belongs to the replay (its step is at most `as_of`).
    pub fn record_scales(&self, layer: &str, recs: &Records) -> Result<Vec<f64>> {
        scales_of(&self.history(layer)?.scales, recs)
    }
}

/// The scale of each record of `recs` from the displacement scales of the
/// steps `0..=as_of` ([`LayerHistory::scales`]).
pub(crate) fn scales_of(scales: &[f64], recs: &Records) -> Result<Vec<f64>> {
    recs.step
        .iter()
        .map(|&s| {
            if s < 0 {
                Err(Error::Internal(format!(
                    "update record with negative step {s}"
                )))
            } else {
                // Records after the snapshot are not part of W_T: scale 0
                // keeps them out of every sum.
                Ok(scales.get(s as usize).copied().unwrap_or(0.0))
            }
        })
        .collect()
}

impl LayerHistory {
    /// The history of one layer from the `steps` rows and the layer's
    /// `layer_steps` rows (none before format 7, or from producers that
    /// record none: then the manifest's optimizer and `steps.lr` hold).
    fn of(run: &Run, layer: &str, steps: &[StepInfo], rows: Vec<Option<LayerRow>>) -> Result<Self> {
        let m = run.manifest();
        let per_step = rows.iter().any(Option::is_some);
        if m.mode == Mode::Batch {
            // Batch records are the weight changes themselves.
            return Ok(Self {
                scales: vec![1.0; steps.len()],
                weight_decay: false,
                precision: Precision::F32,
                applied: 0.0,
                per_step,
                preconditioner: None,
            });
        }
        let o = &m.optimizer;
        let mut hyper = Vec::with_capacity(steps.len());
        let mut weight_decay = !per_step && o.weight_decay != 0.0;
        let mut precision = Precision::F32;
        for (s, step) in steps.iter().enumerate() {
            let row = rows.get(s).cloned().flatten();
            let h = match (&row, per_step) {
                _ if step.skipped => StepHyper {
                    skipped: true,
                    ..StepHyper::default()
                },
                (Some(r), _) => {
                    weight_decay |= r.weight_decay != 0.0;
                    precision = precision.max(r.precision);
                    r.hyper
                }
                (None, false) => StepHyper {
                    lr: step.lr,
                    momentum: o.momentum,
                    dampening: o.dampening,
                    nesterov: o.nesterov,
                    skipped: false,
                },
                (None, true) => {
                    return Err(Error::Incomplete {
                        run: run.dir().to_path_buf(),
                        message: format!("layer_steps has no row for step {s} of layer {layer}"),
                    });
                }
            };
            hyper.push(h);
        }
        // Adam's records are scaled by the preconditioner instead
        // (precondition.rs): σ is 1 for every step that ran.
        let scales = if precondition::preconditioned(m) {
            hyper
                .iter()
                .map(|h| if h.skipped { 0.0 } else { 1.0 })
                .collect()
        } else {
            sgd_displacement_scales(&hyper)
        };
        let applied = rows
            .iter()
            .zip(&scales)
            .filter_map(|(r, &sigma)| {
                let r = r.as_ref()?;
                Some(sigma * r.hyper.lr.abs() * r.grad_norm?)
            })
            .sum();
        Ok(Self {
            scales,
            weight_decay,
            precision,
            applied,
            per_step,
            preconditioner: None,
        })
    }
}

/// One `steps` row, as the replay needs it.
#[derive(Debug, Clone, Copy)]
struct StepInfo {
    lr: f64,
    skipped: bool,
}

/// One `layer_steps` row, as the replay needs it.
#[derive(Debug, Clone, Copy)]
struct LayerRow {
    hyper: StepHyper,
    weight_decay: f64,
    grad_norm: Option<f64>,
    precision: Precision,
}

/// Calls `f` with every batch of `columns` of the committed files of `table`.
fn each_batch(
    run: &Run,
    table: Table,
    columns: &[&str],
    mut f: impl FnMut(&RecordBatch, &Path) -> Result<()>,
) -> Result<()> {
    for path in run.files_by_layer(table).into_values().flatten() {
        for batch in open_columns(&path, columns, 65_536)? {
            let batch = batch.map_err(|e| Error::parquet(&path, e.into()))?;
            f(&batch, &path)?;
        }
    }
    Ok(())
}

/// The `steps` rows `0..=as_of` of the committed `steps` table.
fn step_rows(run: &Run, as_of: i64) -> Result<Vec<StepInfo>> {
    let n = usize::try_from(as_of + 1).unwrap_or(0);
    let mut rows: Vec<Option<StepInfo>> = vec![None; n];
    // Runs of format 6 and older have no `skipped` column.
    let with_skipped = run.manifest().format_version >= column_since(Table::Steps, col::SKIPPED);
    let columns: &[&str] = if with_skipped {
        &[col::STEP, col::LR, col::SKIPPED]
    } else {
        &[col::STEP, col::LR]
    };
    each_batch(run, Table::Steps, columns, |batch, path| {
        let steps = i64s(batch, path, col::STEP)?;
        let lr = f64s(batch, path, col::LR)?;
        let skipped = if with_skipped {
            bools(batch, path, col::SKIPPED)?
        } else {
            vec![None; steps.len()]
        };
        for ((s, lr), skipped) in steps.into_iter().zip(lr).zip(skipped) {
            if let Some(slot) = usize::try_from(s).ok().and_then(|i| rows.get_mut(i)) {
                if slot.is_some() {
                    return Err(Error::Column {
                        path: path.to_path_buf(),
                        column: col::STEP.into(),
                        message: format!("step {s} appears twice"),
                    });
                }
                *slot = Some(StepInfo {
                    lr,
                    skipped: skipped.unwrap_or(false),
                });
            }
        }
        Ok(())
    })?;
    rows.into_iter()
        .enumerate()
        .map(|(s, row)| {
            row.ok_or_else(|| Error::Incomplete {
                run: run.dir().to_path_buf(),
                message: format!(
                    "steps table has no row for step {s} (weights are as of step {as_of})"
                ),
            })
        })
        .collect()
}

/// The committed `layer_steps` rows `0..=as_of`, per layer and step.
fn layer_rows(run: &Run, as_of: i64) -> Result<HashMap<String, Vec<Option<LayerRow>>>> {
    let n = usize::try_from(as_of + 1).unwrap_or(0);
    let mut out: HashMap<String, Vec<Option<LayerRow>>> = HashMap::new();
    let columns = [
        col::STEP,
        col::LAYER,
        col::LR,
        col::MOMENTUM,
        col::DAMPENING,
        col::NESTEROV,
        col::WEIGHT_DECAY,
        col::GRAD_NORM,
        col::PRECISION,
    ];
    each_batch(run, Table::LayerSteps, &columns, |batch, path| {
        let step = i64s(batch, path, col::STEP)?;
        let layer = strings(batch, path, col::LAYER)?;
        let lr = f64s(batch, path, col::LR)?;
        let momentum = f64s(batch, path, col::MOMENTUM)?;
        let dampening = f64s(batch, path, col::DAMPENING)?;
        let nesterov = bools(batch, path, col::NESTEROV)?;
        let weight_decay = f64s(batch, path, col::WEIGHT_DECAY)?;
        let grad_norm = f64s_opt(batch, path, col::GRAD_NORM)?;
        let precision = strings(batch, path, col::PRECISION)?;
        for i in 0..step.len() {
            let Some(s) = usize::try_from(step[i]).ok().filter(|&s| s < n) else {
                continue;
            };
            let bad = |message: String| Error::Column {
                path: path.to_path_buf(),
                column: col::PRECISION.into(),
                message,
            };
            let precision = Precision::parse(&precision[i])
                .ok_or_else(|| bad(format!("{:?} is not f32, bf16 or f16", precision[i])))?;
            let slots = out.entry(layer[i].clone()).or_insert_with(|| vec![None; n]);
            if slots[s].is_some() {
                return Err(Error::Column {
                    path: path.to_path_buf(),
                    column: col::STEP.into(),
                    message: format!("step {s} of layer {} appears twice", layer[i]),
                });
            }
            slots[s] = Some(LayerRow {
                hyper: StepHyper {
                    lr: lr[i],
                    momentum: momentum[i],
                    dampening: dampening[i],
                    nesterov: nesterov[i].unwrap_or(false),
                    skipped: false,
                },
                weight_decay: weight_decay[i],
                grad_norm: grad_norm[i],
                precision,
            });
        }
        Ok(())
    })?;
    Ok(out)
}

/// What the steps of a run applied, summarised per traced layer from the
/// `layer_steps` table and `steps.skipped` (what `reptrace info` shows).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepsSummary {
    /// Steps the optimizer skipped (a gradient scaler found inf/NaN).
    pub skipped: u64,
    /// One entry per traced layer with `layer_steps` rows, in the
    /// manifest's order.
    pub layers: Vec<LayerSummary>,
}

/// The range of what the steps applied to one traced layer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerSummary {
    /// The traced layer.
    pub layer: String,
    /// Steps with a `layer_steps` row.
    pub steps: u64,
    /// The optimizer's parameter groups the layer was in.
    pub param_groups: Vec<i32>,
    /// Smallest and largest learning rate.
    pub lr: [f64; 2],
    /// Smallest and largest momentum.
    pub momentum: [f64; 2],
    /// Smallest and largest measured gradient scale κ.
    pub grad_scale: [f64; 2],
    /// Steps whose records carry a κ other than 1 (clipping, loss scaling).
    pub rescaled: u64,
    /// The largest relative difference the producer's check measured.
    pub max_grad_check: Option<f64>,
    /// The lowest precision a step ran in (`f32`, `bf16`, `f16`).
    pub precision: String,
}

/// Summarises the committed `steps` and `layer_steps` rows of a run.
pub fn summarize_steps(run: &Run) -> Result<StepsSummary> {
    let mut out = StepsSummary::default();
    if run.manifest().format_version >= column_since(Table::Steps, col::SKIPPED) {
        each_batch(run, Table::Steps, &[col::SKIPPED], |batch, path| {
            let skipped = bools(batch, path, col::SKIPPED)?;
            out.skipped += skipped.into_iter().filter(|s| *s == Some(true)).count() as u64;
            Ok(())
        })?;
    }
    let columns = [
        col::LAYER,
        col::PARAM_GROUP,
        col::LR,
        col::MOMENTUM,
        col::GRAD_SCALE,
        col::GRAD_CHECK,
        col::PRECISION,
    ];
    let mut layers: HashMap<String, LayerSummary> = HashMap::new();
    each_batch(run, Table::LayerSteps, &columns, |batch, path| {
        let layer = strings(batch, path, col::LAYER)?;
        let group = i32s(batch, path, col::PARAM_GROUP)?;
        let lr = f64s(batch, path, col::LR)?;
        let momentum = f64s(batch, path, col::MOMENTUM)?;
        let scale = f64s(batch, path, col::GRAD_SCALE)?;
        let check = f64s_opt(batch, path, col::GRAD_CHECK)?;
        let precision = strings(batch, path, col::PRECISION)?;
        for i in 0..layer.len() {
            let s = layers
                .entry(layer[i].clone())
                .or_insert_with(|| LayerSummary {
                    layer: layer[i].clone(),
                    steps: 0,
                    param_groups: Vec::new(),
                    lr: [f64::INFINITY, f64::NEG_INFINITY],
                    momentum: [f64::INFINITY, f64::NEG_INFINITY],
                    grad_scale: [f64::INFINITY, f64::NEG_INFINITY],
                    rescaled: 0,
                    max_grad_check: None,
                    precision: Precision::F32.as_str().to_owned(),
                });
            s.steps += 1;
            if !s.param_groups.contains(&group[i]) {
                s.param_groups.push(group[i]);
            }
            let widen = |r: &mut [f64; 2], x: f64| *r = [r[0].min(x), r[1].max(x)];
            widen(&mut s.lr, lr[i]);
            widen(&mut s.momentum, momentum[i]);
            widen(&mut s.grad_scale, scale[i]);
            s.rescaled += u64::from(scale[i] != 1.0);
            if let Some(c) = check[i] {
                s.max_grad_check = Some(s.max_grad_check.map_or(c, |m| m.max(c)));
            }
            let lowest = Precision::parse(&s.precision).max(Precision::parse(&precision[i]));
            if let Some(p) = lowest {
                s.precision = p.as_str().to_owned();
            }
        }
        Ok(())
    })?;
    for l in run.manifest().model.traced_layers() {
        if let Some(mut s) = layers.remove(l.name()) {
            s.param_groups.sort_unstable();
            out.layers.push(s);
        }
    }
    Ok(out)
}

/// The committed `updates` files of a layer.
pub fn update_files(run: &Run, layer: &str) -> Vec<PathBuf> {
    run.files_by_layer(Table::Updates)
        .remove(&Some(layer.to_owned()))
        .unwrap_or_default()
}

/// Number of committed `updates` rows of a layer (from the manifest).
pub fn update_rows(run: &Run, layer: &str) -> u64 {
    run.manifest()
        .files(Table::Updates)
        .iter()
        .filter(|f| f.layer.as_deref() == Some(layer))
        .map(|f| f.rows)
        .sum()
}

/// Streams the records of `layer` in batches of `batch_rows`, decoding on a
/// background thread, and calls `on_batch` with each batch and its scales.
/// With `sum`, also adds every record's scaled update to it.
pub fn stream(
    run: &Run,
    layer: &TracedLayer<'_>,
    setup: &Setup,
    batch_rows: usize,
    mut sum: Option<&mut [f64]>,
    mut on_batch: impl FnMut(&Records, &[f64]) -> Result<()>,
) -> Result<()> {
    let mode = run.manifest().mode;
    // The geometry of the stored records; that of the records handed on
    // (whole updates for a preconditioned run) for the sum.
    let stored = Geometry::of(layer, mode)?;
    let geom = precondition::geometry(layer, run.manifest())?;
    let pre = setup.history(layer.name())?.preconditioner.as_ref();
    let shape = layer.record_shape(mode);
    let reader = RecordReader::new(update_files(run, layer.name()), shape, batch_rows);
    std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<Result<Records>>(2);
        scope.spawn(move || {
            for item in reader {
                let stop = item.is_err();
                if tx.send(item).is_err() || stop {
                    break;
                }
            }
        });
        for item in rx {
            // Ctrl-C stops the work here, between two batches of records
            // (attribution, computed contributions, verify).
            crate::interrupt::check()?;
            let recs = item?;
            let (recs, scales) = match pre {
                Some(pre) => pre.apply(&stored, &recs, setup.as_of)?,
                None => {
                    let scales = setup.record_scales(layer.name(), &recs)?;
                    (recs, scales)
                }
            };
            if let Some(sum) = sum.as_deref_mut() {
                kernel::accumulate(&geom, &recs, &scales, sum)?;
            }
            on_batch(&recs, &scales)?;
        }
        Ok(())
    })
}

/// `(W_T − W_0) − Σ scaled ΔW` of a layer and `W_T − W_0`.
pub fn residual(
    run: &Run,
    layer: &TracedLayer<'_>,
    setup: &Setup,
    batch_rows: usize,
) -> Result<(LayerWeights, LayerWeights)> {
    let geom = precondition::geometry(layer, run.manifest())?;
    let mut sum = vec![0.0; geom.delta_len()];
    stream(run, layer, setup, batch_rows, Some(&mut sum), |_, _| Ok(()))?;
    let change = setup.weight_change(layer)?;
    let residual = change.minus(&kernel::split_delta(&geom, &sum));
    Ok((residual, change))
}

/// A batch size that keeps one batch of `layer`'s records (decoded factors
/// plus the per-record work arrays) near `bytes` (an estimate for a ragged
/// layer, whose records are sized at the spec's `T` positions).
pub fn batch_rows_for(layer: &TracedLayer<'_>, mode: Mode, bytes: usize) -> usize {
    let feature_len = Geometry::of(layer, mode).map_or(0, |g| g.record_feature_len());
    batch_rows_with(layer, mode, bytes, feature_len)
}

/// [`batch_rows_for`] with records of `feature_len` f64 values of features
/// and work arrays (those of the route the pairs take).
pub fn batch_rows_with(
    layer: &TracedLayer<'_>,
    mode: Mode,
    bytes: usize,
    feature_len: usize,
) -> usize {
    let (u_len, v_len) = layer.record_lens(mode);
    // f32 decode + f64 copy of the factors, and the f64 work arrays.
    let per_row = 12 * (u_len + v_len) + 8 * feature_len;
    (bytes / per_row.max(1)).clamp(1, 8192)
}
