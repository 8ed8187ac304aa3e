//! Probes (`probes` table) and the instance splits they are selected by.
//!
//! A probe's `a` and `p` hold the fixed lengths of its layer, or (a ragged
//! layer, format 9) any number `n ≥ 1` of positions; they are read through
//! per-probe offsets ([`Probes::a`], [`Probes::p`]).
use crate::records::{check_rows, f64s, i32s, i64s, list_f64, nullable, open_columns, push_list};
use crate::run::Run;
use crate::{Error, Result};
use arrow_array::cast::AsArray;
use reptrace_format::{Split, Table, TracedLayer, col};
use std::collections::HashMap;

/// The recorded probes of one layer (or a selection of them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Probes {
    /// Each probe's id (column `probe_id`).
    pub probe_id: Vec<i64>,
    /// The training instance each probe is, if any (column `instance_id`).
    pub instance_id: Vec<Option<i64>>,
    /// Each probe's true class (column `label`).
    pub label: Vec<i32>,
    /// The class the network predicts for each probe (column `predicted`).
    pub predicted: Vec<i32>,
    /// Every probe's `a`, one after the other ([`Probes::a`]): the layer
    /// input in the final network.
    pub a: Vec<f64>,
    /// Every probe's `p`, one after the other ([`Probes::p`]): the
    /// refinement `z_T − (W_0 ⊛ a + b_0)`.
    pub p: Vec<f64>,
    /// `‖p‖` of each probe (column `p_norm`).
    pub p_norm: Vec<f64>,
    /// Where each probe's `a` starts in `a`, then the end: `len() + 1`
    /// offsets (or none while there are no probes).
    pub a_off: Vec<usize>,
    /// Where each probe's `p` starts in `p`, then the end: `len() + 1`
    /// offsets (or none while there are no probes).
    pub p_off: Vec<usize>,
}

impl Probes {
    /// Number of probes.
    pub fn len(&self) -> usize {
        self.probe_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.probe_id.is_empty()
    }

    /// Probe `i`'s `a`.
    pub fn a(&self, i: usize) -> &[f64] {
        &self.a[self.a_off[i]..self.a_off[i + 1]]
    }

    /// Probe `i`'s `p`.
    pub fn p(&self, i: usize) -> &[f64] {
        &self.p[self.p_off[i]..self.p_off[i + 1]]
    }

    /// Appends the lists of one more probe (its `probe_id`, `instance_id`,
    /// `label`, `predicted` and `p_norm` are pushed by the caller).
    pub fn push_lists(&mut self, a: &[f64], p: &[f64]) {
        push_list(&mut self.a, &mut self.a_off, a);
        push_list(&mut self.p, &mut self.p_off, p);
    }

    /// The probes at `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Probes {
        let mut out = Probes::default();
        for &i in rows {
            out.probe_id.push(self.probe_id[i]);
            out.instance_id.push(self.instance_id[i]);
            out.label.push(self.label[i]);
            out.predicted.push(self.predicted[i]);
            out.push_lists(self.a(i), self.p(i));
            out.p_norm.push(self.p_norm[i]);
        }
        out
    }

    /// Reads the committed probes of `layer`, sorted by probe id; every
    /// probe's `a` and `p` must fit the layer's
    /// [`probe_shape`](TracedLayer::probe_shape) (a ragged probe at least
    /// one position).
    pub fn read(run: &Run, layer: &TracedLayer<'_>) -> Result<Probes> {
        let shape = layer.probe_shape();
        let mut all = Probes::default();
        let files = run
            .files_by_layer(Table::Probes)
            .remove(&Some(layer.name().to_owned()))
            .unwrap_or_default();
        let columns = [
            col::PROBE_ID,
            col::INSTANCE_ID,
            col::LABEL,
            col::PREDICTED,
            col::A,
            col::P,
            col::P_NORM,
        ];
        for path in files {
            let mut file_row = 0;
            for batch in open_columns(&path, &columns, 1024)? {
                let batch = batch.map_err(|e| Error::parquet(&path, e.into()))?;
                all.probe_id.extend(i64s(&batch, &path, col::PROBE_ID)?);
                all.instance_id
                    .extend(nullable::<arrow::datatypes::Int64Type>(
                        &batch,
                        &path,
                        col::INSTANCE_ID,
                    )?);
                all.label.extend(i32s(&batch, &path, col::LABEL)?);
                all.predicted.extend(i32s(&batch, &path, col::PREDICTED)?);
                let first = all.a_off.len().saturating_sub(1);
                list_f64(&batch, &path, col::A, &mut all.a, &mut all.a_off)?;
                list_f64(&batch, &path, col::P, &mut all.p, &mut all.p_off)?;
                check_rows(
                    &path,
                    [col::A, col::P],
                    shape,
                    [&all.a_off, &all.p_off],
                    first,
                    file_row,
                    1,
                )?;
                file_row += batch.num_rows();
                all.p_norm.extend(f64s(&batch, &path, col::P_NORM)?);
            }
        }
        let mut order: Vec<usize> = (0..all.len()).collect();
        order.sort_by_key(|&i| all.probe_id[i]);
        Ok(all.select(&order))
    }
}

/// The split of every committed instance.
pub fn instance_splits(run: &Run) -> Result<HashMap<i64, Split>> {
    let mut out = HashMap::new();
    for path in run.files_by_layer(Table::Instances).into_values().flatten() {
        for batch in open_columns(&path, &[col::INSTANCE_ID, col::SPLIT], 65_536)? {
            let batch = batch.map_err(|e| Error::parquet(&path, e.into()))?;
            let ids = i64s(&batch, &path, col::INSTANCE_ID)?;
            let split = crate::records::column(&batch, &path, col::SPLIT)?;
            let split = split.as_string_opt::<i32>().ok_or_else(|| Error::Column {
                path: path.clone(),
                column: col::SPLIT.into(),
                message: format!("type {}, expected Utf8", split.data_type()),
            })?;
            for (id, s) in ids.into_iter().zip(split.iter()) {
                let s = match s {
                    Some("train") => Split::Train,
                    Some("test") => Split::Test,
                    other => {
                        return Err(Error::Column {
                            path: path.clone(),
                            column: col::SPLIT.into(),
                            message: format!("value {other:?}, expected \"train\" or \"test\""),
                        });
                    }
                };
                out.insert(id, s);
            }
        }
    }
    Ok(out)
}
