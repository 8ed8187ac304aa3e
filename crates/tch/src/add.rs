//! Probes added to a run after training ([`add_probes`], `reptrace probe
//! add`).
//!
//! New inputs become probes of an existing run at any time: the network is
//! rebuilt from the manifest's model, given the weights the run's analysis
//! stands on (the final weights of a completed run, the last checkpoint's of
//! a run whose training was killed; see
//! [`reptrace_record::ProbeAppender::weights`]), and every input's traced
//! layer inputs `a` and refinements `p = (W − W_0) ⊛ a + (b − b_0)` are
//! computed exactly as training computes its probes ([`crate::probe`]). The
//! rows are committed as one new commit by a
//! [`reptrace_record::ProbeAppender`]; nothing already in the run changes,
//! and a failure leaves the run as it was.
//!
//! This needs a forward pass, hence libtorch: it lives here, not in the
//! analyzer, which stays libtorch-free.
use crate::data::Dataset;
use crate::model::{Network, read_snapshot, snapshot_tensor};
use crate::probe;
use crate::train::EVAL_CHUNK;
use crate::{Error, Result};
use reptrace_format::{Manifest, Status, Structure};
use reptrace_record::{ProbeAppender, ProbeBatch};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tch::{Device, Tensor};

/// Which rows of a data set become probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProbeRows {
    /// Every row.
    #[default]
    All,
    /// The training split.
    Train,
    /// The test split.
    Test,
    /// Rows `first..=last` (0-based, inclusive).
    Range {
        /// First selected row, 0-based.
        first: usize,
        /// Last selected row, 0-based, included; never below `first`.
        last: usize,
    },
}

impl FromStr for ProbeRows {
    type Err = String;
    /// `all`, `train`, `test` or `A..B` (inclusive).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "all" => Ok(ProbeRows::All),
            "train" => Ok(ProbeRows::Train),
            "test" => Ok(ProbeRows::Test),
            _ => {
                let bad = || format!("{s:?} is not all, train, test or A..B (rows, inclusive)");
                let (a, b) = s.split_once("..").ok_or_else(bad)?;
                let first: usize = a.trim().parse().map_err(|_| bad())?;
                let last: usize = b.trim().parse().map_err(|_| bad())?;
                if last < first {
                    return Err(format!("{s:?}: the last row is before the first"));
                }
                Ok(ProbeRows::Range { first, last })
            }
        }
    }
}

impl fmt::Display for ProbeRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeRows::All => f.write_str("all"),
            ProbeRows::Train => f.write_str("train"),
            ProbeRows::Test => f.write_str("test"),
            ProbeRows::Range { first, last } => write!(f, "{first}..{last}"),
        }
    }
}

impl ProbeRows {
    /// The rows of `data` this selects; an error when they are not all
    /// there or there are none.
    pub fn rows(self, data: &Dataset) -> Result<std::ops::Range<usize>> {
        let rows = match self {
            ProbeRows::All => 0..data.len(),
            ProbeRows::Train => 0..data.n_train,
            ProbeRows::Test => data.n_train..data.len(),
            ProbeRows::Range { first, last } => {
                if last >= data.len() {
                    return Err(Error::BadSetting {
                        setting: "rows",
                        message: format!(
                            "{self}: {} has rows 0..{}",
                            data.name,
                            data.len().saturating_sub(1)
                        ),
                    });
                }
                first..last + 1
            }
        };
        if rows.is_empty() {
            return Err(Error::BadSetting {
                setting: "rows",
                message: format!("{self}: no rows of {} selected", data.name),
            });
        }
        Ok(rows)
    }
}

/// What [`add_probes`] adds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AddOptions {
    /// Probe ids, one per selected row (default: new ids from
    /// [`ProbeAppender::next_probe_id`] upward).
    pub ids: Option<Vec<i64>>,
    /// Which rows of the data become probes (default all).
    pub rows: ProbeRows,
}

/// What [`add_probes`] added.
#[derive(Debug, Clone)]
pub struct AddedProbes {
    /// The new probe ids, in row order.
    pub ids: Vec<i64>,
    /// The traced layers that got probe rows.
    pub layers: Vec<String>,
    /// The weights snapshot the probes were taken against (relative path).
    pub weights: String,
    /// The last training step that snapshot includes.
    pub step: i64,
    /// The run's status (`complete`, or `recording` for a killed run).
    pub status: Status,
    /// The run's manifest with the new commit.
    pub manifest: Manifest,
}

/// Adds rows `options.rows` of `data` as new probes of run `run`; see the
/// module docs. The examples' shape must be the model's input shape (a flat
/// data set with as many features also fits); their labels must be classes
/// of the run.
pub fn add_probes(run: &Path, data: &Dataset, options: &AddOptions) -> Result<AddedProbes> {
    let rows = options.rows.rows(data)?;
    if let Some(ids) = &options.ids
        && ids.len() != rows.len()
    {
        return Err(Error::BadSetting {
            setting: "ids",
            message: format!(
                "{} ids for {} rows (rows {} of {})",
                ids.len(),
                rows.len(),
                options.rows,
                data.name
            ),
        });
    }
    let mut appender = ProbeAppender::open(run)?;
    let manifest = appender.manifest().clone();
    let model = &manifest.model;
    let refuse = |message: String| Error::Run {
        run: run.to_path_buf(),
        message,
    };
    if model.structure != Structure::Sequential {
        return Err(refuse(format!(
            "model {} was defined elsewhere (the run lists its traced layers only), so it \
             cannot be rebuilt here; add probes with the Python package (reptrace.add_probes)",
            model.name
        )));
    }
    let input: usize = model.input_shape.iter().product();
    let fits = data.shape == model.input_shape || (data.shape.len() == 1 && data.dim() == input);
    if !fits {
        return Err(Error::BadSetting {
            setting: "data",
            message: format!(
                "{}: examples of shape {:?} do not fit the run's model {} (input shape {:?})",
                data.name, data.shape, model.name, model.input_shape
            ),
        });
    }

    let (weights_rel, step) = appender.weights();
    let (weights_rel, step) = (weights_rel.to_owned(), step.0);
    let initial_rel = manifest
        .initial_weights()
        .ok_or_else(|| refuse("no initial weights snapshot is committed".into()))?;
    let net = Network::new(model, 0, Device::Cpu)?;
    net.load_snapshot(&snapshot_path(run, &weights_rel)?)?;
    let initial_path = snapshot_path(run, initial_rel)?;
    let initial = read_snapshot(&initial_path)?;
    // The initial parameters, checked against the model's shapes.
    let mut initial_by_name = Vec::new();
    for (name, param) in net.parameters() {
        let t = snapshot_tensor(&initial, &initial_path, &name, &param.size())?;
        initial_by_name.push((name, t));
    }
    let init = |name: &str| {
        initial_by_name
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| *t)
    };
    let displacements = probe::displacements(&net, init)?;

    let ids = match &options.ids {
        Some(ids) => ids.clone(),
        None => {
            let start = appender.next_probe_id();
            (start..start + rows.len() as i64).collect()
        }
    };
    let mut dims = vec![rows.len() as i64];
    dims.extend(model.input_shape.iter().map(|&s| s as i64));
    let dim = data.dim();
    let x_all =
        Tensor::f_from_slice(&data.features[rows.start * dim..rows.end * dim])?.f_reshape(dims)?;
    let mut layers = Vec::new();
    let all: Vec<usize> = (0..rows.len()).collect();
    for chunk in all.chunks(EVAL_CHUNK) {
        let (start, len) = (chunk[0], chunk.len());
        let x = x_all.f_narrow(0, start as i64, len as i64)?;
        let out = probe::probe_chunk(&net, &displacements, &x)?;
        let probe_ids = &ids[start..start + len];
        let labels = &data.labels[rows.start + start..rows.start + start + len];
        let instance_ids = vec![None; len];
        for l in &out.layers {
            let Some(layer) = net.traced_layer(l.module) else {
                continue;
            };
            appender.probes(
                layer.name(),
                ProbeBatch {
                    probe_ids,
                    instance_ids: &instance_ids,
                    labels,
                    predicted: &out.predicted,
                    a: &l.a,
                    p: &l.p,
                    positions: None,
                },
            )?;
            if start == 0 {
                layers.push(layer.name().to_owned());
            }
        }
    }
    let status = manifest.status;
    let manifest = appender.commit()?;
    Ok(AddedProbes {
        ids,
        layers,
        weights: weights_rel,
        step,
        status,
        manifest,
    })
}

/// Absolute path of a snapshot the manifest lists, checked to stay in the run.
fn snapshot_path(run: &Path, rel: &str) -> Result<PathBuf> {
    reptrace_format::layout::check_relative(rel).map_err(|e| Error::Run {
        run: run.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(run.join(rel))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rows_select_splits_and_inclusive_ranges() {
        let data = crate::data::digits().unwrap();
        let rows = |s: &str| s.parse::<ProbeRows>().unwrap().rows(&data);
        assert_eq!(rows("all").unwrap(), 0..1797);
        assert_eq!(rows("train").unwrap(), 0..1437);
        assert_eq!(rows("test").unwrap(), 1437..1797);
        assert_eq!(rows("3..4").unwrap(), 3..5);
        assert_eq!(rows("1796..1796").unwrap(), 1796..1797);
        let err = rows("1790..1797").unwrap_err().to_string();
        assert!(err.contains("digits has rows 0..1796"), "{err}");
        for bad in ["", "some", "4..3", "-1..2", "1..", "1...3"] {
            assert!(bad.parse::<ProbeRows>().is_err(), "{bad}");
        }
        assert_eq!("7..9".parse::<ProbeRows>().unwrap().to_string(), "7..9");
    }
}
