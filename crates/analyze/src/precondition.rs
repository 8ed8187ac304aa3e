//! Adam's and AdamW's preconditioner in instance mode (format 10): the
//! per-coordinate factor `G_t` that turns a record's gradient share into
//! its share of the weight change (docs/method.md §6).
//!
//! A layer's `layer_steps` rows of steps ≤ `as_of` carry `lr`,
//! `weight_decay`, `beta1`, `step_size` (`c_t`) and `preconditioner`
//! (`D_t`). Over those rows, in step order, with `d_t = 1 − lr_t·wd_t` under
//! AdamW (1 under Adam) and `ρ_t` the product of the `d` of the later rows:
//!
//! ```text
//! H_t = ρ_t c_t D_t + β1_{next(t)} H_{next(t)}     (H after the last row = 0)
//! G_t = (1 − β1_t) H_t
//! ```
//!
//! computed backwards in f64 and held in memory per layer (steps ×
//! update_len × 8 bytes, checked against the memory limit). The effective
//! update of a record of step `t` is `G_t ⊙ [vec ΔW_rec, Δb_rec]`;
//! [`Preconditioner::apply`] turns a batch of factor records into whole
//! update records of those (what batch-mode records are), so that every
//! consumer of [`crate::replay::stream`] sees them with scale 1.
use crate::kernel::{self, Geometry};
use crate::records::{Records, column, f64s, f64s_opt, i64s, open_columns, strings};
use crate::run::Run;
use crate::{Error, Result};
use arrow::datatypes::Float32Type;
use arrow_array::Array;
use arrow_array::cast::AsArray;
use reptrace_format::{Manifest, Mode, OptimizerKind, Table, TracedLayer, col};
use std::collections::BTreeMap;

/// Whether the records of `m` are scaled by Adam's preconditioner: an
/// Adam/AdamW run in instance mode of format 10 or newer.
pub fn preconditioned(m: &Manifest) -> bool {
    m.mode == Mode::Instance
        && m.optimizer.kind.preconditioned()
        && m.format_version >= reptrace_format::column_since(Table::LayerSteps, col::PRECONDITIONER)
}

/// The mode whose records the arithmetic sees for a run: batch mode's whole
/// updates for a preconditioned run ([`Preconditioner::apply`] makes them),
/// else the run's own mode. Only the kernel's geometry follows it: instance
/// ids, labels and self-influence keep the run's mode.
pub fn records_mode(m: &Manifest) -> Mode {
    if preconditioned(m) {
        Mode::Batch
    } else {
        m.mode
    }
}

/// The geometry the arithmetic uses for `layer`'s records in the run of `m`
/// ([`records_mode`]).
pub fn geometry(layer: &TracedLayer<'_>, m: &Manifest) -> Result<Geometry> {
    Geometry::of(layer, records_mode(m))
}

/// `G_t` of every step of one layer with a `layer_steps` row, ≤ `as_of`.
#[derive(Debug, Clone)]
pub struct Preconditioner {
    /// The layer's update length (`[vec W, b]`).
    len: usize,
    /// The step of each row of `g`, ascending.
    steps: Vec<i64>,
    /// `G_t` of each step, `steps.len() × len`.
    g: Vec<f64>,
}

/// One layer_steps row of the layer, as the recursion needs it.
struct Row {
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    step_size: f64,
    d: Vec<f32>,
}

impl Preconditioner {
    /// Reads the layer's `layer_steps` rows of steps ≤ `as_of` and computes
    /// `G_t` for each; an error when they need more than `budget` bytes, or
    /// a row lacks its preconditioner or has one of the wrong length.
    pub fn load(run: &Run, layer: &TracedLayer<'_>, as_of: i64, budget: u64) -> Result<Self> {
        let len = layer.update_len();
        let name = layer.name();
        let decoupled = run.manifest().optimizer.kind == OptimizerKind::Adamw;
        // Steps first (cheap columns), to size the work before the lists.
        let mut count = 0u64;
        let columns = [col::STEP, col::LAYER];
        for path in layer_steps_files(run) {
            for batch in open_columns(&path, &columns, 65_536)? {
                let batch = batch.map_err(|e| Error::parquet(&path, e.into()))?;
                let step = i64s(&batch, &path, col::STEP)?;
                let layers = strings(&batch, &path, col::LAYER)?;
                count += step
                    .iter()
                    .zip(&layers)
                    .filter(|(s, l)| **s <= as_of && l.as_str() == name)
                    .count() as u64;
            }
        }
        // G in f64 plus the stored D in f32 while it is computed.
        let needed = count.saturating_mul(len as u64).saturating_mul(12);
        if needed > budget {
            return Err(Error::Memory {
                limit: Some(budget),
                message: format!(
                    "Adam's preconditioner of layer {name} needs {} ({count} steps × {len} values × 12 bytes)",
                    crate::memory::human(needed)
                ),
            });
        }
        let mut rows: BTreeMap<i64, Row> = BTreeMap::new();
        let columns = [
            col::STEP,
            col::LAYER,
            col::LR,
            col::WEIGHT_DECAY,
            col::BETA1,
            col::STEP_SIZE,
            col::PRECONDITIONER,
        ];
        for path in layer_steps_files(run) {
            // Small batches: the list column of every layer passes through.
            for batch in open_columns(&path, &columns, 64)? {
                let batch = batch.map_err(|e| Error::parquet(&path, e.into()))?;
                let step = i64s(&batch, &path, col::STEP)?;
                let layers = strings(&batch, &path, col::LAYER)?;
                let lr = f64s(&batch, &path, col::LR)?;
                let wd = f64s(&batch, &path, col::WEIGHT_DECAY)?;
                let beta1 = f64s_opt(&batch, &path, col::BETA1)?;
                let step_size = f64s_opt(&batch, &path, col::STEP_SIZE)?;
                let list = column(&batch, &path, col::PRECONDITIONER)?;
                let list = list.as_list_opt::<i32>().ok_or_else(|| Error::Column {
                    path: path.clone(),
                    column: col::PRECONDITIONER.into(),
                    message: format!("type {}, expected List<Float32>", list.data_type()),
                })?;
                for i in 0..step.len() {
                    let s = step[i];
                    if s > as_of || layers[i] != name {
                        continue;
                    }
                    let bad = |column: &str, message: String| Error::Column {
                        path: path.clone(),
                        column: column.into(),
                        message: format!("step {s} of layer {name}: {message}"),
                    };
                    let missing = |column: &str| {
                        bad(
                            column,
                            format!(
                                "is null in a run of {:?} in instance mode (the records need Adam's preconditioner)",
                                run.manifest().optimizer.kind
                            )
                            .to_lowercase(),
                        )
                    };
                    if list.is_null(i) {
                        return Err(missing(col::PRECONDITIONER));
                    }
                    let (Some(b1), Some(c)) = (beta1[i], step_size[i]) else {
                        let which = if beta1[i].is_none() {
                            col::BETA1
                        } else {
                            col::STEP_SIZE
                        };
                        return Err(missing(which));
                    };
                    let values = list.value(i);
                    let values = values.as_primitive_opt::<Float32Type>().ok_or_else(|| {
                        bad(
                            col::PRECONDITIONER,
                            format!("values of type {}, expected Float32", values.data_type()),
                        )
                    })?;
                    if values.len() != len {
                        return Err(bad(
                            col::PRECONDITIONER,
                            format!(
                                "{} values, the layer's weight and bias have {len}",
                                values.len()
                            ),
                        ));
                    }
                    if values.null_count() > 0 {
                        return Err(bad(col::PRECONDITIONER, "has null values".into()));
                    }
                    let row = Row {
                        lr: lr[i],
                        weight_decay: wd[i],
                        beta1: b1,
                        step_size: c,
                        d: values.values().to_vec(),
                    };
                    if rows.insert(s, row).is_some() {
                        return Err(bad(col::STEP, "appears twice".into()));
                    }
                }
            }
        }
        Ok(Self::from_rows(len, rows, decoupled))
    }

    /// The backward recursion over `rows` (by step).
    fn from_rows(len: usize, rows: BTreeMap<i64, Row>, decoupled: bool) -> Self {
        let n = rows.len();
        let mut g = vec![0.0; n * len];
        let mut h = vec![0.0f64; len];
        let mut rho = 1.0f64;
        let mut next_beta1 = 0.0f64;
        let steps: Vec<i64> = rows.keys().copied().collect();
        for (k, row) in rows
            .into_values()
            .enumerate()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            let c = rho * row.step_size;
            let out = &mut g[k * len..(k + 1) * len];
            for ((hj, &dj), gj) in h.iter_mut().zip(&row.d).zip(out.iter_mut()) {
                *hj = c * f64::from(dj) + next_beta1 * *hj;
                *gj = (1.0 - row.beta1) * *hj;
            }
            next_beta1 = row.beta1;
            if decoupled {
                rho *= 1.0 - row.lr * row.weight_decay;
            }
        }
        Self { len, steps, g }
    }

    /// `G_t` of `step`, if the layer has a row for it (≤ `as_of`).
    pub fn of_step(&self, step: i64) -> Option<&[f64]> {
        let k = self.steps.binary_search(&step).ok()?;
        Some(&self.g[k * self.len..(k + 1) * self.len])
    }

    /// The update length, the steps and `G_t` of each, `steps × len`
    /// values (to send it elsewhere; [`Preconditioner::from_parts`]).
    pub(crate) fn parts(&self) -> (usize, &[i64], &[f64]) {
        (self.len, &self.steps, &self.g)
    }

    /// A preconditioner from its [`Preconditioner::parts`].
    pub(crate) fn from_parts(len: usize, steps: Vec<i64>, g: Vec<f64>) -> Result<Self> {
        if g.len() != steps.len() * len {
            return Err(Error::Internal(format!(
                "a preconditioner of {} steps × {len} values holds {}",
                steps.len(),
                g.len()
            )));
        }
        Ok(Self { len, steps, g })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.g.len() * 8
    }

    /// The whole effective updates `G_t ⊙ [vec ΔW_rec, Δb_rec]` of a batch
    /// of the layer's records (`geom`: the geometry of the run's own
    /// records), as records of whole updates (`u` empty), and their scales:
    /// 1, or 0 for records after `as_of` (their update is then zero).
    pub fn apply(
        &self,
        geom: &Geometry,
        recs: &Records,
        as_of: i64,
    ) -> Result<(Records, Vec<f64>)> {
        let n = recs.len();
        let scales: Vec<f64> = recs
            .step
            .iter()
            .map(|&s| if s <= as_of { 1.0 } else { 0.0 })
            .collect();
        let all: Vec<usize> = (0..n).collect();
        let mut d = kernel::deltas(geom, recs, &scales, &all)?;
        if d.ncols() != self.len {
            return Err(Error::Internal(format!(
                "records have {} update values, the preconditioner {}",
                d.ncols(),
                self.len
            )));
        }
        for (mut row, &s) in d.rows_mut().into_iter().zip(&recs.step) {
            if s > as_of {
                continue;
            }
            let g = self.of_step(s).ok_or_else(|| {
                Error::Internal(format!(
                    "a record of step {s} has no layer_steps row with Adam's preconditioner"
                ))
            })?;
            row.iter_mut().zip(g).for_each(|(x, g)| *x *= g);
        }
        let out = Records {
            step: recs.step.clone(),
            epoch: recs.epoch.clone(),
            instance_id: recs.instance_id.clone(),
            label: recs.label.clone(),
            u: Vec::new(),
            v: d.into_raw_vec_and_offset().0,
            u_off: if n == 0 { Vec::new() } else { vec![0; n + 1] },
            v_off: if n == 0 {
                Vec::new()
            } else {
                (0..=n).map(|i| i * self.len).collect()
            },
        };
        Ok((out, scales))
    }
}

/// The committed `layer_steps` files.
fn layer_steps_files(run: &Run) -> Vec<std::path::PathBuf> {
    run.files_by_layer(Table::LayerSteps)
        .into_values()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(lr: f64, wd: f64, beta1: f64, c: f64, d: [f32; 2]) -> Row {
        Row {
            lr,
            weight_decay: wd,
            beta1,
            step_size: c,
            d: d.to_vec(),
        }
    }

    /// G against the forward definition: the record of step t moves the
    /// weights by (1 − β1_t) Σ_{r ≥ t} (Π_{t<q≤r} β1_q) ρ_r c_r D_r.
    #[test]
    fn recursion_matches_the_forward_sum() {
        let rows = [
            row(0.1, 0.5, 0.9, 0.3, [1.0, 2.0]),
            row(0.0, 0.5, 0.8, 0.0, [3.0, 0.5]),
            row(0.2, 0.5, 0.7, 0.25, [0.25, 4.0]),
        ];
        let steps = [0i64, 2, 5];
        let d: Vec<f64> = rows.iter().map(|r| 1.0 - r.lr * r.weight_decay).collect();
        let map: BTreeMap<i64, Row> = steps
            .iter()
            .zip(rows.iter())
            .map(|(&s, r)| {
                (
                    s,
                    row(r.lr, r.weight_decay, r.beta1, r.step_size, [r.d[0], r.d[1]]),
                )
            })
            .collect();
        let p = Preconditioner::from_rows(2, map, true);
        for t in 0..3 {
            for j in 0..2 {
                let mut want = 0.0;
                for r in t..3 {
                    let carry: f64 = (t + 1..=r).map(|q| rows[q].beta1).product();
                    let rho: f64 = d[r + 1..].iter().product();
                    want += carry * rho * rows[r].step_size * f64::from(rows[r].d[j]);
                }
                want *= 1.0 - rows[t].beta1;
                let got = p.of_step(steps[t]).expect("a row of the step")[j];
                assert!(
                    (got - want).abs() <= 1e-15 * want.abs().max(1.0),
                    "t {t} j {j}: {got} vs {want}"
                );
            }
        }
        assert!(p.of_step(1).is_none());
    }
}
