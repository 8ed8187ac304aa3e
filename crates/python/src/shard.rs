//! Contributions computed by another engine's workers (`reptrace.spark`):
//! the task planned on the driver, sent to the workers as bytes, and the
//! parts of an attribution written by the workers and committed by the
//! driver. The arithmetic is the analyzer's ([`reptrace_analyze::shard`]).
use crate::arrow_stream::ArrowStream;
use crate::error;
use arrow::ffi_stream::{ArrowArrayStreamReader, FFI_ArrowArrayStream};
use arrow_array::RecordBatch;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyCapsule, PyList, PyTuple};
use reptrace_analyze::shard::{self, Task};
use reptrace_analyze::writer::PartWriter;
use reptrace_analyze::{Run, StepRange};
use reptrace_format::{Aggregation, FileEntry, layout};
use std::path::PathBuf;
use std::sync::Mutex;

/// The record batches of a Python object with `__arrow_c_stream__` (a
/// pyarrow `Table` or `RecordBatchReader`, a polars frame, …).
fn batches_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<RecordBatch>> {
    let capsule = obj
        .call_method0("__arrow_c_stream__")
        .map_err(|_| error::invalid("expected Arrow data (an object with __arrow_c_stream__)"))?;
    let capsule = capsule.cast::<PyCapsule>()?;
    let ptr = capsule.pointer_checked(Some(c"arrow_array_stream"))?;
    // SAFETY: the capsule holds an `ArrowArrayStream` (its name says so);
    // `from_raw` moves the stream out and leaves a released one behind, which
    // the capsule's destructor then ignores.
    let reader =
        unsafe { ArrowArrayStreamReader::from_raw(ptr.as_ptr().cast::<FFI_ArrowArrayStream>()) }
            .map_err(|e| error::invalid(format!("reading the Arrow stream: {e}")))?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error::invalid(format!("reading the Arrow stream: {e}")))
}

fn aggregation(by: &str) -> PyResult<Aggregation> {
    match by {
        "step" => Ok(Aggregation::Step),
        "epoch" => Ok(Aggregation::Epoch),
        "instance" => Ok(Aggregation::Instance),
        other => Err(error::analysis(reptrace_analyze::Error::BadOption {
            option: "by",
            value: other.to_owned(),
            why: "expected step, epoch or instance".into(),
        })),
    }
}

fn entry(json: &str) -> PyResult<FileEntry> {
    let e: FileEntry = serde_json::from_str(json)
        .map_err(|e| error::invalid(format!("not a part's file entry: {e}")))?;
    layout::check_relative(&e.path).map_err(|e| error::invalid(e.to_string()))?;
    Ok(e)
}

/// What the workers of a job need to compute the contributions of chosen
/// probes from batches of `updates` rows (pickled as its bytes).
#[pyclass(module = "reptrace._reptrace", name = "ShardTask", frozen)]
pub struct PyShardTask {
    task: Task,
    bytes: Vec<u8>,
}

#[pymethods]
impl PyShardTask {
    /// Plans the contributions of the probes `probes` to `layers` (every
    /// traced layer with probes when `None`) over the records of `steps`
    /// (`"A..B"`, inclusive).
    #[staticmethod]
    #[pyo3(signature = (run, probes, layers=None, steps=None))]
    fn plan(
        py: Python<'_>,
        run: PathBuf,
        probes: Vec<i64>,
        layers: Option<Vec<String>>,
        steps: Option<String>,
    ) -> PyResult<Self> {
        let steps = steps
            .as_deref()
            .map(str::parse::<StepRange>)
            .transpose()
            .map_err(error::analysis)?;
        py.detach(|| {
            let run = Run::open(&run)?;
            let task = Task::plan(&run, &probes, &layers.unwrap_or_default(), steps)?;
            let bytes = task.to_bytes()?;
            Ok(Self { task, bytes })
        })
        .map_err(error::analysis)
    }

    /// The task from its bytes ([`PyShardTask::to_bytes`]).
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: Vec<u8>) -> PyResult<Self> {
        py.detach(|| {
            let task = Task::from_bytes(&data)?;
            Ok(Self { task, bytes: data })
        })
        .map_err(error::analysis)
    }

    /// The task as bytes.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.bytes)
    }

    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let from_bytes = py.get_type::<Self>().getattr("from_bytes")?;
        let args = PyTuple::new(py, [PyBytes::new(py, &self.bytes)])?;
        PyTuple::new(py, [from_bytes.into_any(), args.into_any()])
    }

    /// The planned layers, in forward order.
    #[getter]
    fn layers(&self) -> Vec<String> {
        self.task.layers().into_iter().map(str::to_owned).collect()
    }

    /// The planned probe ids.
    #[getter]
    fn probe_ids(&self) -> Vec<i64> {
        self.task.probe_ids()
    }

    /// The step the analysis stands at (its weights include it).
    #[getter]
    fn as_of(&self) -> i64 {
        self.task.as_of()
    }

    /// The committed `updates` files of `layer`.
    fn update_files(&self, layer: &str) -> Vec<String> {
        self.task
            .update_files(layer)
            .into_iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    }

    /// The contribution rows of the `updates` rows in `data` (Arrow data
    /// with the columns step, epoch, instance_id, label, u, v and layer).
    fn contributions(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<ArrowStream> {
        let batches = batches_of(data)?;
        let out = py
            .detach(|| {
                batches
                    .iter()
                    .map(|b| self.task.contributions(b))
                    .collect::<reptrace_analyze::Result<Vec<_>>>()
            })
            .map_err(error::analysis)?;
        Ok(ArrowStream::new(shard::contributions_schema(), out))
    }

    /// Per layer, the sum of the scaled updates of the `updates` rows in
    /// `data`: a list of `(layer, bytes of little-endian f64)`.
    fn partial_sums<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let batches = batches_of(data)?;
        let sums = py
            .detach(|| -> reptrace_analyze::Result<Vec<(String, Vec<f64>)>> {
                let mut total: Vec<(String, Vec<f64>)> = Vec::new();
                for b in &batches {
                    for (layer, sum) in self.task.partial_sums(b)? {
                        match total.iter_mut().find(|(l, _)| *l == layer) {
                            Some((_, t)) => t.iter_mut().zip(&sum).for_each(|(t, x)| *t += x),
                            None => total.push((layer, sum)),
                        }
                    }
                }
                Ok(total)
            })
            .map_err(error::analysis)?;
        let out = PyList::empty(py);
        for (layer, sum) in sums {
            let bytes: Vec<u8> = sum.iter().flat_map(|x| x.to_le_bytes()).collect();
            out.append((layer, PyBytes::new(py, &bytes)))?;
        }
        Ok(out)
    }

    /// The residual rows of `layer` from the partial sums of all its
    /// records ([`PyShardTask::partial_sums`] of every batch).
    fn residual(&self, py: Python<'_>, layer: &str, sums: Vec<Vec<u8>>) -> PyResult<ArrowStream> {
        let sums: Vec<Vec<f64>> = sums
            .iter()
            .map(|b| {
                if b.len() % 8 != 0 {
                    return Err(error::invalid("a partial sum is not a whole number of f64"));
                }
                Ok(b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect())
            })
            .collect::<PyResult<_>>()?;
        let batch = py
            .detach(|| {
                let refs: Vec<&[f64]> = sums.iter().map(Vec::as_slice).collect();
                self.task.residual(layer, &refs)
            })
            .map_err(error::analysis)?;
        Ok(ArrowStream::new(shard::contributions_schema(), vec![batch]))
    }
}

/// One part of an attribution written by a worker, under its temporary
/// name until the driver commits it.
#[pyclass(module = "reptrace._reptrace", name = "PartWriter")]
pub struct PyPartWriter {
    run: PathBuf,
    by: Aggregation,
    layer: String,
    writer: Mutex<Option<PartWriter>>,
}

impl PyPartWriter {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Option<PartWriter>>> {
        self.writer
            .lock()
            .map_err(|_| error::invalid(format!("part of layer {} failed", self.layer)))
    }
}

#[pymethods]
impl PyPartWriter {
    /// Starts part `seq` of `layer` of an attribution of `run` (aggregated
    /// `by`: step, epoch or instance).
    #[new]
    fn new(
        py: Python<'_>,
        run: PathBuf,
        run_id: &str,
        by: &str,
        layer: &str,
        seq: u64,
    ) -> PyResult<Self> {
        let by = aggregation(by)?;
        let writer = py
            .detach(|| shard::part_writer(&run, run_id, by, layer, seq))
            .map_err(error::analysis)?;
        Ok(Self {
            run,
            by,
            layer: layer.to_owned(),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Appends the rows of Arrow data (a `layer` column, if any, is left out).
    fn write(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let batches = batches_of(data)?;
        let (run, by) = (self.run.clone(), self.by);
        let mut guard = self.lock()?;
        let writer = guard
            .as_mut()
            .ok_or_else(|| error::invalid(format!("part of layer {} is finished", self.layer)))?;
        py.detach(|| {
            batches
                .iter()
                .try_for_each(|b| shard::write_rows(writer, &run, by, b))
        })
        .map_err(error::analysis)
    }

    /// Closes and syncs the part: its file entry (JSON) for the commit.
    fn finish(&self, py: Python<'_>) -> PyResult<String> {
        let writer = self
            .lock()?
            .take()
            .ok_or_else(|| error::invalid(format!("part of layer {} is finished", self.layer)))?;
        let entry = py.detach(|| writer.finish()).map_err(error::analysis)?;
        serde_json::to_string(&entry).map_err(|e| error::invalid(e.to_string()))
    }
}

/// The first part number an attribution of `run` may use.
#[pyfunction]
fn first_part_seq(py: Python<'_>, run: PathBuf) -> PyResult<u64> {
    py.detach(|| Run::open(&run).map(|r| shard::first_part_seq(&r)))
        .map_err(error::analysis)
}

/// Commits the parts (their file entries, JSON) of `task`'s rows as an
/// attribution of `run`; how many earlier attributions it replaced. On
/// failure the parts are removed.
#[pyfunction]
fn commit_parts(
    py: Python<'_>,
    run: PathBuf,
    task: &PyShardTask,
    by: &str,
    entries: Vec<String>,
) -> PyResult<usize> {
    let by = aggregation(by)?;
    let entries = entries
        .iter()
        .map(|e| entry(e))
        .collect::<PyResult<Vec<_>>>()?;
    py.detach(|| {
        let run = Run::open(&run)?;
        shard::commit(&run, &task.task, by, &entries)
    })
    .map_err(error::analysis)
}

/// Removes the uncommitted parts numbered `first..=last` of `layers` of
/// an attribution (aggregated `by`) that failed.
#[pyfunction]
fn discard_parts(
    py: Python<'_>,
    run: PathBuf,
    by: &str,
    layers: Vec<String>,
    first: u64,
    last: u64,
) -> PyResult<()> {
    let by = aggregation(by)?;
    py.detach(|| {
        let run = Run::open(&run)?;
        shard::discard_seqs(&run, by, &layers, first, last);
        Ok(())
    })
    .map_err(error::analysis)
}

/// Registers the classes and functions on the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyShardTask>()?;
    m.add_class::<PyPartWriter>()?;
    m.add_function(wrap_pyfunction!(first_part_seq, m)?)?;
    m.add_function(wrap_pyfunction!(commit_parts, m)?)?;
    m.add_function(wrap_pyfunction!(discard_parts, m)?)?;
    Ok(())
}
