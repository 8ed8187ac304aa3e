//! Replaying a run's updates: the weights they start and end at, the
//! displacement scale of each step, and a streaming pass over one layer's
//! records (read on a background thread, bounded queue).
use crate::kernel::{self, Geometry};
use crate::records::{RecordReader, Records, f64s, i64s, open_columns};
use crate::session::Run;
use crate::weights::{LayerWeights, Snapshot};
use crate::{Error, Result};
use reptrace_format::{Mode, Table, TracedLayer, col, displacement_scales};
use std::path::PathBuf;
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
    /// Displacement scale of each step `0..=as_of` (1 in batch mode).
    pub scales: Vec<f64>,
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
            None => m
                .latest_weights()
                .ok_or_else(|| incomplete("no weights snapshot is committed".into()))?,
        };
        let as_of = as_of
            .ok_or_else(|| {
                incomplete("no weights snapshot after a training step is committed".into())
            })?
            .0;
        let lrs = learning_rates(run, as_of)?;
        let scales = match m.mode {
            // Batch records are the weight changes themselves.
            Mode::Batch => vec![1.0; lrs.len()],
            Mode::Instance => displacement_scales(
                &lrs,
                m.optimizer.momentum,
                m.optimizer.dampening,
                m.optimizer.nesterov,
            ),
        };
        Ok(Setup {
            initial: Snapshot::read(&run.path(initial_rel))?,
            last: Snapshot::read(&run.path(last_rel))?,
            last_path: last_rel.to_owned(),
            as_of,
            scales,
        })
    }

    /// `W_T − W_0` of a layer.
    pub fn weight_change(&self, layer: &TracedLayer<'_>) -> Result<LayerWeights> {
        Ok(self.last.layer(layer)?.minus(&self.initial.layer(layer)?))
    }

    /// Displacement scale of each record of `recs`, and whether it belongs
    /// to the replay (its step is at most `as_of`).
    pub fn record_scales(&self, recs: &Records) -> Result<Vec<f64>> {
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
                    Ok(self.scales.get(s as usize).copied().unwrap_or(0.0))
                }
            })
            .collect()
    }
}

/// The learning rate of every step `0..=as_of`, from the committed `steps` table.
fn learning_rates(run: &Run, as_of: i64) -> Result<Vec<f64>> {
    let n = usize::try_from(as_of + 1).unwrap_or(0);
    let mut lrs: Vec<Option<f64>> = vec![None; n];
    for path in run.files_by_layer(Table::Steps).into_values().flatten() {
        for batch in open_columns(&path, &[col::STEP, col::LR], 65_536)? {
            let batch = batch.map_err(|e| Error::parquet(&path, e.into()))?;
            let steps = i64s(&batch, &path, col::STEP)?;
            let lr = f64s(&batch, &path, col::LR)?;
            for (s, lr) in steps.into_iter().zip(lr) {
                if let Some(slot) = usize::try_from(s).ok().and_then(|i| lrs.get_mut(i)) {
                    if slot.is_some() {
                        return Err(Error::Column {
                            path: path.clone(),
                            column: col::STEP.into(),
                            message: format!("step {s} appears twice"),
                        });
                    }
                    *slot = Some(lr);
                }
            }
        }
    }
    lrs.into_iter()
        .enumerate()
        .map(|(s, lr)| {
            lr.ok_or_else(|| Error::Incomplete {
                run: run.dir().to_path_buf(),
                message: format!(
                    "steps table has no row for step {s} (weights are as of step {as_of})"
                ),
            })
        })
        .collect()
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
    let geom = Geometry::of(layer, mode);
    let (u_len, v_len) = layer.record_lens(mode);
    let reader = RecordReader::new(update_files(run, layer.name()), u_len, v_len, batch_rows);
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
            let scales = setup.record_scales(&recs)?;
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
    let geom = Geometry::of(layer, run.manifest().mode);
    let mut sum = vec![0.0; geom.delta_len()];
    stream(run, layer, setup, batch_rows, Some(&mut sum), |_, _| Ok(()))?;
    let change = setup.weight_change(layer)?;
    let residual = change.minus(&kernel::split_delta(&geom, &sum));
    Ok((residual, change))
}

/// A batch size that keeps one batch of `layer`'s records (decoded factors
/// plus the per-record work arrays) near `bytes`.
pub fn batch_rows_for(layer: &TracedLayer<'_>, mode: Mode, bytes: usize) -> usize {
    let (u_len, v_len) = layer.record_lens(mode);
    let geom = Geometry::of(layer, mode);
    // f32 decode + f64 copy of the factors, and the f64 work arrays.
    let per_row = 12 * (u_len + v_len) + 8 * geom.record_feature_len();
    (bytes / per_row.max(1)).clamp(1, 8192)
}
