//! Probes (`probes` table) and the instance splits they are selected by.
use crate::records::{f64s, i32s, i64s, list_f64, nullable, open_columns};
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
    /// `len() × a_len`, row-major: the layer input in the final network.
    pub a: Vec<f64>,
    /// `len() × p_len`, row-major: the refinement `z_T − (W_0 ⊛ a + b_0)`.
    pub p: Vec<f64>,
    /// `‖p‖` of each probe (column `p_norm`).
    pub p_norm: Vec<f64>,
    /// Values of `a` per probe ([`TracedLayer::probe_lens`]'s first).
    pub a_len: usize,
    /// Values of `p` per probe ([`TracedLayer::probe_lens`]'s second).
    pub p_len: usize,
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
        &self.a[i * self.a_len..(i + 1) * self.a_len]
    }

    /// Probe `i`'s `p`.
    pub fn p(&self, i: usize) -> &[f64] {
        &self.p[i * self.p_len..(i + 1) * self.p_len]
    }

    /// The probes at `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Probes {
        let mut out = Probes {
            a_len: self.a_len,
            p_len: self.p_len,
            ..Probes::default()
        };
        for &i in rows {
            out.probe_id.push(self.probe_id[i]);
            out.instance_id.push(self.instance_id[i]);
            out.label.push(self.label[i]);
            out.predicted.push(self.predicted[i]);
            out.a.extend_from_slice(self.a(i));
            out.p.extend_from_slice(self.p(i));
            out.p_norm.push(self.p_norm[i]);
        }
        out
    }

    /// Reads the committed probes of `layer`, sorted by probe id.
    pub fn read(run: &Run, layer: &TracedLayer<'_>) -> Result<Probes> {
        let (a_len, p_len) = layer.probe_lens();
        let mut all = Probes {
            a_len,
            p_len,
            ..Probes::default()
        };
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
                list_f64(&batch, &path, col::A, a_len, &mut all.a)?;
                list_f64(&batch, &path, col::P, p_len, &mut all.p)?;
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
