//! `_reptrace.Recorder`: the Rust recorder for a Python training loop.
//!
//! Arrays arrive as contiguous NumPy arrays (`numpy.ascontiguousarray` on the
//! Python side) and are read in place; the recorder copies them into its
//! queue, so the caller may reuse its buffers as soon as a call returns.
//! Every call that can wait on the writer thread releases the interpreter
//! lock. A ragged layer's `updates` and `probes` take each row's number of
//! positions in `positions`, a 1-D `uint32` array (an `int64` one is
//! accepted and converted).
use crate::error;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::prelude::*;
use reptrace_format::{Dtype, Mode, Model, Optimizer, Split};
use reptrace_record::{
    AdamStep, BatchStep, Compression, ExampleBatch, FactorValues, LayerStepRow, NamedTensor,
    ProbeAppender, ProbeBatch, Recorder, StepRow, UpdateBatchOwned,
};
use std::sync::Mutex;

/// A recorder writing one run (see `reptrace.Tracer` for the PyTorch side).
#[pyclass(module = "reptrace._reptrace", name = "Recorder")]
pub struct PyRecorder {
    inner: Option<Recorder>,
    run_dir: String,
}

/// A `layer_steps` row as Python hands it over (see `Recorder.layer_steps`).
type LayerStepTuple = (
    String,
    i32,
    f64,
    f64,
    f64,
    bool,
    f64,
    f64,
    Option<f64>,
    Option<f64>,
    String,
);

/// Adam's part of a `layer_steps` row: `(beta1, step_size, preconditioner)`.
type AdamTuple<'py> = (f64, f64, PyReadonlyArray1<'py, f32>);

/// A contiguous array's elements, or an error naming the argument.
fn slice<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, what: &str) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| error::invalid(format!("{what}: the array must be contiguous")))
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, json: &str) -> PyResult<T> {
    serde_json::from_str(json).map_err(|e| error::invalid(format!("{what}: {e}")))
}

/// A ragged layer's `positions` argument: a 1-D `uint32` array, read in
/// place, or an `int64` one (NumPy's default integers), checked and
/// converted.
enum Positions<'py> {
    U32(PyReadonlyArray1<'py, u32>),
    Converted(Vec<u32>),
}

impl<'py> Positions<'py> {
    /// The argument `obj` (`None`: not given) of a call on `context`.
    fn new(context: &str, obj: Option<&Bound<'py, PyAny>>) -> PyResult<Option<Self>> {
        let Some(obj) = obj.filter(|o| !o.is_none()) else {
            return Ok(None);
        };
        if let Ok(a) = obj.cast::<PyArray1<u32>>() {
            return Ok(Some(Self::U32(a.readonly())));
        }
        let Ok(a) = obj.cast::<PyArray1<i64>>() else {
            return Err(error::invalid(format!(
                "{context}: positions must be a 1-D uint32 (or int64) NumPy array"
            )));
        };
        let a = a.readonly();
        let values = slice(&a, "positions")?;
        let converted = values
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                u32::try_from(p).map_err(|_| {
                    error::invalid(format!(
                        "{context}: positions[{i}] is {p}, expected 0..=4294967295"
                    ))
                })
            })
            .collect::<PyResult<Vec<u32>>>()?;
        Ok(Some(Self::Converted(converted)))
    }

    fn as_slice(&self) -> PyResult<&[u32]> {
        match self {
            Self::U32(a) => slice(a, "positions"),
            Self::Converted(v) => Ok(v),
        }
    }
}

/// One layer's probe rows as NumPy arrays (`instance_ids` −1 for none).
struct ProbeArrays<'py> {
    probe_ids: PyReadonlyArray1<'py, i64>,
    instance_ids: PyReadonlyArray1<'py, i64>,
    labels: PyReadonlyArray1<'py, i32>,
    predicted: PyReadonlyArray1<'py, i32>,
    a: PyReadonlyArray1<'py, f64>,
    p: PyReadonlyArray1<'py, f64>,
    positions: Option<Positions<'py>>,
}

impl ProbeArrays<'_> {
    /// Calls `f` with the rows as a [`ProbeBatch`] borrowing the arrays.
    fn with_batch<T>(&self, f: impl FnOnce(ProbeBatch<'_>) -> PyResult<T>) -> PyResult<T> {
        let instance_ids: Vec<Option<i64>> = slice(&self.instance_ids, "instance_ids")?
            .iter()
            .map(|&i| (i >= 0).then_some(i))
            .collect();
        f(ProbeBatch {
            probe_ids: slice(&self.probe_ids, "probe_ids")?,
            instance_ids: &instance_ids,
            labels: slice(&self.labels, "labels")?,
            predicted: slice(&self.predicted, "predicted")?,
            a: slice(&self.a, "a")?,
            p: slice(&self.p, "p")?,
            positions: self
                .positions
                .as_ref()
                .map(Positions::as_slice)
                .transpose()?,
        })
    }
}

impl PyRecorder {
    fn rec(&mut self) -> PyResult<&mut Recorder> {
        self.inner.as_mut().ok_or_else(|| {
            error::RecordError::new_err(format!(
                "{}: the recorder is closed (finish or abort was called)",
                self.run_dir
            ))
        })
    }
}

/// Weights as named tensors: names, shapes and flat `float32` data.
fn tensors<'a>(
    names: &'a [String],
    shapes: &'a [Vec<usize>],
    data: &'a [&'a [f32]],
) -> PyResult<Vec<NamedTensor<'a>>> {
    if names.len() != shapes.len() || names.len() != data.len() {
        return Err(error::invalid(format!(
            "weights: {} names, {} shapes and {} arrays",
            names.len(),
            shapes.len(),
            data.len()
        )));
    }
    Ok(names
        .iter()
        .zip(shapes)
        .zip(data)
        .map(|((name, shape), data)| NamedTensor { name, shape, data })
        .collect())
}

#[pymethods]
impl PyRecorder {
    /// Creates the run directory `run_dir` (missing or empty) and its
    /// manifest. `model_json` and `optimizer_json` follow
    /// `schemas/manifest.schema.json`; `settings_json` is a JSON object of
    /// free-form training settings. `run_id`: the run's id (default a new
    /// UUID). `rank`: this process's rank in a distributed run (rank 0
    /// creates the run and commits; any other rank writes its part files
    /// into rank 0's run directory and stages them, see `stage`).
    /// `compression`: "zstd" (default) or "none" (see `compact`).
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (run_dir, model_json, optimizer_json, classes, dtype="f32", mode="instance", settings_json="{}", run_id=None, rank=None, compression="zstd"))]
    fn new(
        py: Python<'_>,
        run_dir: String,
        model_json: &str,
        optimizer_json: &str,
        classes: Vec<String>,
        dtype: &str,
        mode: &str,
        settings_json: &str,
        run_id: Option<String>,
        rank: Option<u32>,
        compression: &str,
    ) -> PyResult<Self> {
        let compression: Compression = compression
            .parse()
            .map_err(|e| error::invalid(format!("compression: {e}")))?;
        let model: Model = parse("model", model_json)?;
        let optimizer: Optimizer = parse("optimizer", optimizer_json)?;
        let dtype: Dtype = parse("dtype", &format!("{dtype:?}")).map_err(|_| {
            error::invalid(format!("dtype: {dtype:?}, expected \"f32\" or \"f16\""))
        })?;
        let mode: Mode = parse("mode", &format!("{mode:?}")).map_err(|_| {
            error::invalid(format!(
                "mode: {mode:?}, expected \"instance\" or \"batch\""
            ))
        })?;
        let settings: serde_json::Map<String, serde_json::Value> =
            parse("settings", settings_json)?;
        let mut builder = Recorder::builder(&run_dir)
            .model(model)
            .optimizer(optimizer)
            .classes(classes)
            .dtype(dtype)
            .mode(mode)
            .compression(compression);
        for (k, v) in settings {
            builder = builder.setting(k, v);
        }
        if let Some(id) = run_id {
            builder = builder.run_id(id);
        }
        if let Some(rank) = rank {
            builder = builder.rank(rank);
        }
        let inner = py.detach(|| builder.build()).map_err(error::record)?;
        Ok(Self {
            inner: Some(inner),
            run_dir,
        })
    }

    /// The run directory.
    #[getter]
    fn run_dir(&self) -> &str {
        &self.run_dir
    }

    /// The run id (in the manifest and every file).
    #[getter]
    fn run_id(&mut self) -> PyResult<String> {
        Ok(self.rec()?.run_id().to_owned())
    }

    /// A rank other than 0 of a distributed run: makes its part files since
    /// the last commit durable under their temporary names and returns
    /// their manifest entries as a JSON list, for rank 0's `adopt`.
    fn stage(&mut self, py: Python<'_>) -> PyResult<String> {
        let rec = self.rec()?;
        let files = py.detach(|| rec.stage()).map_err(error::record)?;
        serde_json::to_string(&files).map_err(|e| error::invalid(format!("stage: {e}")))
    }

    /// Rank 0 of a distributed run: lists the files other ranks staged (a
    /// JSON list of manifest file entries, as `stage` returns) in the next
    /// commit.
    fn adopt(&mut self, py: Python<'_>, files_json: &str) -> PyResult<()> {
        let files: Vec<reptrace_format::FileEntry> = parse("adopt", files_json)?;
        let rec = self.rec()?;
        py.detach(|| rec.adopt(files)).map_err(error::record)
    }

    /// Ends recording without a commit: what is not committed (or staged)
    /// is removed; rank 0 (or a single process) marks the run aborted with
    /// `reason`, keeping its commits. The recorder is closed afterwards.
    fn abandon(&mut self, py: Python<'_>, reason: String) -> PyResult<()> {
        let rec = self.rec()?;
        py.detach(|| rec.abandon(reason)).map_err(error::record)?;
        self.inner = None;
        Ok(())
    }

    /// The training instances: ids, labels and splits (`"train"`/`"test"`).
    fn instances(
        &mut self,
        py: Python<'_>,
        ids: PyReadonlyArray1<'_, i64>,
        labels: PyReadonlyArray1<'_, i32>,
        splits: Vec<String>,
    ) -> PyResult<()> {
        let splits = splits
            .iter()
            .map(|s| match s.as_str() {
                "train" => Ok(Split::Train),
                "test" => Ok(Split::Test),
                other => Err(error::invalid(format!(
                    "split {other:?}: expected \"train\" or \"test\""
                ))),
            })
            .collect::<PyResult<Vec<_>>>()?;
        let (ids, labels) = (slice(&ids, "ids")?, slice(&labels, "labels")?);
        let rec = self.rec()?;
        py.detach(|| rec.instances(ids, labels, &splits))
            .map_err(error::record)
    }

    /// A weights snapshot, written at the next commit (the first one is the
    /// initial weights).
    fn weights(
        &mut self,
        py: Python<'_>,
        names: Vec<String>,
        shapes: Vec<Vec<usize>>,
        arrays: Vec<PyReadonlyArray1<'_, f32>>,
    ) -> PyResult<()> {
        let data = arrays
            .iter()
            .map(|a| slice(a, "weights"))
            .collect::<PyResult<Vec<_>>>()?;
        let named = tensors(&names, &shapes, &data)?;
        let rec = self.rec()?;
        py.detach(|| rec.weights(&named)).map_err(error::record)
    }

    /// Makes everything recorded so far durable and visible (a commit point).
    fn commit(&mut self, py: Python<'_>) -> PyResult<()> {
        let rec = self.rec()?;
        py.detach(|| rec.commit()).map_err(error::record)
    }

    /// One training step's row of the `steps` table (`skipped`: the
    /// optimizer skipped the step, which then has no update records).
    #[pyo3(signature = (step, epoch, lr, batch_size, loss, skipped=false))]
    fn step(
        &mut self,
        step: i64,
        epoch: i32,
        lr: f64,
        batch_size: i32,
        loss: f64,
        skipped: bool,
    ) -> PyResult<()> {
        self.rec()?
            .step(StepRow {
                step,
                epoch,
                lr,
                batch_size,
                loss,
                skipped,
            })
            .map_err(error::record)
    }

    /// The `layer_steps` rows of one step: per traced layer `(layer,
    /// param_group, lr, momentum, dampening, nesterov, weight_decay,
    /// grad_scale, grad_check, grad_norm, precision)`; under Adam/AdamW
    /// `adam` holds, per row, `(beta1, step_size, preconditioner)` (a
    /// contiguous float32 array: `vec W`, then the bias) or `None`.
    #[pyo3(signature = (step, epoch, rows, adam=None))]
    fn layer_steps(
        &mut self,
        step: i64,
        epoch: i32,
        rows: Vec<LayerStepTuple>,
        adam: Option<Vec<Option<AdamTuple<'_>>>>,
    ) -> PyResult<()> {
        let mut adam = match adam {
            Some(a) if a.len() != rows.len() => {
                return Err(error::invalid(format!(
                    "adam: {} entries for {} layer_steps rows",
                    a.len(),
                    rows.len()
                )));
            }
            Some(a) => a,
            None => Vec::new(),
        };
        adam.resize_with(rows.len(), || None);
        let adam = adam
            .into_iter()
            .map(|a| {
                a.map(|(beta1, step_size, d)| -> PyResult<AdamStep> {
                    Ok(AdamStep {
                        beta1,
                        step_size,
                        preconditioner: slice(&d, "adam preconditioner")?.to_vec(),
                    })
                })
                .transpose()
            })
            .collect::<PyResult<Vec<_>>>()?;
        let rows = rows
            .into_iter()
            .zip(adam)
            .map(|(t, adam)| LayerStepRow {
                step,
                epoch,
                layer: t.0,
                param_group: t.1,
                lr: t.2,
                momentum: t.3,
                dampening: t.4,
                nesterov: t.5,
                weight_decay: t.6,
                grad_scale: t.7,
                grad_check: t.8,
                grad_norm: t.9,
                precision: t.10,
                adam,
            })
            .collect();
        self.rec()?.layer_steps(rows).map_err(error::record)
    }

    /// The training dynamics of a step (table `examples`): each member's
    /// cross-entropy loss and predicted class in that step's forward pass.
    #[allow(clippy::too_many_arguments)]
    fn examples(
        &mut self,
        py: Python<'_>,
        step: i64,
        epoch: i32,
        ids: PyReadonlyArray1<'_, i64>,
        labels: PyReadonlyArray1<'_, i32>,
        loss: PyReadonlyArray1<'_, f32>,
        predicted: PyReadonlyArray1<'_, i32>,
    ) -> PyResult<()> {
        let batch = ExampleBatch {
            step,
            epoch,
            instance_ids: slice(&ids, "ids")?,
            labels: slice(&labels, "labels")?,
            loss: slice(&loss, "loss")?,
            predicted: slice(&predicted, "predicted")?,
        };
        let rec = self.rec()?;
        py.detach(|| rec.examples(batch)).map_err(error::record)
    }

    /// Instance mode: one layer's per-example factors for a step, row-major
    /// (`u`: examples × u_len, `v`: examples × v_len). A ragged layer's
    /// rows hold `positions[i]` positions each (`positions`: a 1-D `uint32`
    /// array, one per row; `None`: every row the same number). `scale`:
    /// `v` holds the output gradients δ and the stored factors are
    /// `scale·δ`, multiplied in float32 while they are copied (the product
    /// PyTorch computes for `δ * scale`), so that the caller needs no
    /// tensor of its own for them.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (layer, step, epoch, ids, labels, u, v, update_norm=None, positions=None, scale=None))]
    fn updates<'py>(
        &mut self,
        py: Python<'py>,
        layer: &str,
        step: i64,
        epoch: i32,
        ids: PyReadonlyArray1<'_, i64>,
        labels: PyReadonlyArray1<'_, i32>,
        u: PyReadonlyArray1<'_, f32>,
        v: PyReadonlyArray1<'_, f32>,
        update_norm: Option<PyReadonlyArray1<'_, f32>>,
        positions: Option<Bound<'py, PyAny>>,
        scale: Option<f32>,
    ) -> PyResult<()> {
        let norms = match &update_norm {
            Some(n) => Some(slice(n, "update_norm")?),
            None => None,
        };
        let positions =
            Positions::new(&format!("updates for layer {layer:?}"), positions.as_ref())?;
        let (ids, labels) = (slice(&ids, "ids")?, slice(&labels, "labels")?);
        let (u, v) = (slice(&u, "u")?, slice(&v, "v")?);
        let positions = positions.as_ref().map(Positions::as_slice).transpose()?;
        let rec = self.rec()?;
        py.detach(|| {
            let v = match scale {
                Some(scale) => v.iter().map(|&d| d * scale).collect(),
                None => v.to_vec(),
            };
            let batch = UpdateBatchOwned {
                step,
                epoch,
                instance_ids: ids.to_vec(),
                labels: labels.to_vec(),
                u: FactorValues::F32(u.to_vec()),
                v: FactorValues::F32(v),
                update_norm: norms.map(<[f32]>::to_vec),
                positions: positions.map(<[u32]>::to_vec),
            };
            rec.updates_owned(layer, batch)
        })
        .map_err(error::record)
    }

    /// Batch mode: a step's whole update per traced layer (`ΔW` row-major,
    /// then `Δb`) and the batch's members.
    #[allow(clippy::too_many_arguments)]
    fn batch_step(
        &mut self,
        py: Python<'_>,
        step: i64,
        epoch: i32,
        ids: PyReadonlyArray1<'_, i64>,
        labels: PyReadonlyArray1<'_, i32>,
        layers: Vec<String>,
        deltas: Vec<PyReadonlyArray1<'_, f32>>,
    ) -> PyResult<()> {
        if layers.len() != deltas.len() {
            return Err(error::invalid(format!(
                "batch_step: {} layers and {} deltas",
                layers.len(),
                deltas.len()
            )));
        }
        let data = deltas
            .iter()
            .map(|d| slice(d, "deltas"))
            .collect::<PyResult<Vec<_>>>()?;
        let pairs: Vec<(&str, &[f32])> = layers.iter().map(String::as_str).zip(data).collect();
        let batch = BatchStep {
            step,
            epoch,
            instance_ids: slice(&ids, "ids")?,
            labels: slice(&labels, "labels")?,
            deltas: &pairs,
        };
        let rec = self.rec()?;
        py.detach(|| rec.batch_step(batch)).map_err(error::record)
    }

    /// Probes of one traced layer: ids, the training instance each is (or
    /// -1), labels, predictions, the layer inputs `a` and refinements `p`
    /// (row-major `float64`). `checkpoint`: probes as of the next commit's
    /// weights, for a run that may not finish. A ragged layer's rows hold
    /// `positions[i] ≥ 1` positions each (`positions`: a 1-D `uint32`
    /// array, one per row; `None`: every row the same number).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (layer, probe_ids, instance_ids, labels, predicted, a, p, checkpoint=false, positions=None))]
    fn probes<'py>(
        &mut self,
        py: Python<'py>,
        layer: &str,
        probe_ids: PyReadonlyArray1<'py, i64>,
        instance_ids: PyReadonlyArray1<'py, i64>,
        labels: PyReadonlyArray1<'py, i32>,
        predicted: PyReadonlyArray1<'py, i32>,
        a: PyReadonlyArray1<'py, f64>,
        p: PyReadonlyArray1<'py, f64>,
        checkpoint: bool,
        positions: Option<Bound<'py, PyAny>>,
    ) -> PyResult<()> {
        let positions = Positions::new(&format!("probes for layer {layer:?}"), positions.as_ref())?;
        let arrays = ProbeArrays {
            probe_ids,
            instance_ids,
            labels,
            predicted,
            a,
            p,
            positions,
        };
        let rec = self.rec()?;
        arrays.with_batch(|batch| {
            py.detach(|| {
                if checkpoint {
                    rec.checkpoint_probes(layer, batch)
                } else {
                    rec.probes(layer, batch)
                }
            })
            .map_err(error::record)
        })
    }

    /// Waits until the writer has taken every row so far (errors surface here).
    fn flush(&mut self, py: Python<'_>) -> PyResult<()> {
        let rec = self.rec()?;
        py.detach(|| rec.flush()).map_err(error::record)
    }

    /// Writes the final weights, commits and marks the run complete; returns
    /// the manifest as JSON. The recorder is closed afterwards.
    fn finish(
        &mut self,
        py: Python<'_>,
        names: Vec<String>,
        shapes: Vec<Vec<usize>>,
        arrays: Vec<PyReadonlyArray1<'_, f32>>,
    ) -> PyResult<String> {
        let data = arrays
            .iter()
            .map(|a| slice(a, "weights"))
            .collect::<PyResult<Vec<_>>>()?;
        let named = tensors(&names, &shapes, &data)?;
        let rec = self.rec()?;
        let m = py.detach(|| rec.finish(&named)).map_err(error::record)?;
        self.inner = None;
        Ok(m.to_json())
    }

    /// Commits what is pending and marks the run aborted with `reason`;
    /// returns the manifest as JSON. The recorder is closed afterwards.
    fn abort(&mut self, py: Python<'_>, reason: String) -> PyResult<String> {
        let rec = self.rec()?;
        let m = py.detach(|| rec.abort(reason)).map_err(error::record)?;
        self.inner = None;
        Ok(m.to_json())
    }

    /// Whether the recorder still accepts rows.
    #[getter]
    fn is_open(&self) -> bool {
        self.inner.is_some()
    }
}

/// Adds probes to a completed run ([`reptrace_record::ProbeAppender`]); see
/// `reptrace.add_probes` for the PyTorch side.
#[pyclass(module = "reptrace._reptrace", name = "ProbeAppender")]
pub struct PyProbeAppender {
    /// In a mutex because a Python object must be shareable between threads,
    /// and the appender's Parquet writers are only `Send`.
    inner: Mutex<Option<ProbeAppender>>,
    run_dir: String,
}

impl PyProbeAppender {
    fn closed(&self) -> PyErr {
        error::RecordError::new_err(format!(
            "{}: the probe appender is closed (commit or discard was called)",
            self.run_dir
        ))
    }

    /// Runs `f` on the open appender, without the interpreter lock.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut ProbeAppender) -> reptrace_record::Result<T> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            guard.as_mut().map(f)
        })
        .ok_or_else(|| self.closed())?
        .map_err(error::record)
    }
}

#[pymethods]
impl PyProbeAppender {
    /// Opens the completed run `run_dir` for adding probes (holds its lock
    /// until `commit` or `discard`).
    #[new]
    fn new(py: Python<'_>, run_dir: String) -> PyResult<Self> {
        let inner = py
            .detach(|| ProbeAppender::open(&run_dir))
            .map_err(error::record)?;
        Ok(Self {
            inner: Mutex::new(Some(inner)),
            run_dir,
        })
    }

    /// Where new probe ids can start: above every probe and instance id.
    fn next_probe_id(&self, py: Python<'_>) -> PyResult<i64> {
        self.with(py, |a| Ok(a.next_probe_id()))
    }

    /// The run's manifest (as opened) as JSON.
    fn manifest(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |a| Ok(a.manifest().to_json()))
    }

    /// Probes of one traced layer, as `Recorder.probes` takes them
    /// (`positions`: a ragged layer's positions per row).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (layer, probe_ids, instance_ids, labels, predicted, a, p, positions=None))]
    fn probes<'py>(
        &self,
        py: Python<'py>,
        layer: &str,
        probe_ids: PyReadonlyArray1<'py, i64>,
        instance_ids: PyReadonlyArray1<'py, i64>,
        labels: PyReadonlyArray1<'py, i32>,
        predicted: PyReadonlyArray1<'py, i32>,
        a: PyReadonlyArray1<'py, f64>,
        p: PyReadonlyArray1<'py, f64>,
        positions: Option<Bound<'py, PyAny>>,
    ) -> PyResult<()> {
        let positions = Positions::new(&format!("probes for layer {layer:?}"), positions.as_ref())?;
        let arrays = ProbeArrays {
            probe_ids,
            instance_ids,
            labels,
            predicted,
            a,
            p,
            positions,
        };
        arrays.with_batch(|batch| self.with(py, |app| app.probes(layer, batch)))
    }

    /// Commits the added probes as one new manifest commit; returns the
    /// manifest as JSON. The appender is closed afterwards.
    fn commit(&self, py: Python<'_>) -> PyResult<String> {
        let m = py
            .detach(|| {
                let taken = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
                taken.map(ProbeAppender::commit)
            })
            .ok_or_else(|| self.closed())?
            .map_err(error::record)?;
        Ok(m.to_json())
    }

    /// Drops what was added, leaving the run as it was, and releases its lock.
    fn discard(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Rewrites the part files of a run recorded with `compression="none"` in
/// the storage encoding (zstd at `zstd_level`), as one crash-safe commit;
/// a dict of what it did (`files`, `bytes_before`, `bytes_after`,
/// `leftovers_removed`, `seconds`).
#[pyfunction]
#[pyo3(signature = (run_dir, zstd_level=1))]
pub fn compact<'py>(
    py: Python<'py>,
    run_dir: String,
    zstd_level: i32,
) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
    let options = reptrace_record::ParquetOptions {
        zstd_level,
        ..reptrace_record::ParquetOptions::default()
    };
    let report = py
        .detach(|| reptrace_record::compact(std::path::Path::new(&run_dir), &options))
        .map_err(error::record)?;
    let out = pyo3::types::PyDict::new(py);
    out.set_item("files", report.files)?;
    out.set_item("bytes_before", report.bytes_before)?;
    out.set_item("bytes_after", report.bytes_after)?;
    out.set_item("leftovers_removed", report.leftovers)?;
    out.set_item("seconds", report.seconds)?;
    Ok(out)
}
