//! `reptrace._reptrace`: the compiled core of the `reptrace` Python package.
//!
//! A thin layer over the Rust crates, so that a PyTorch training loop records
//! through the same recorder, the same format and the same commit protocol
//! as `reptrace train`, and analyses with the same engine as the CLI:
//!
//! - [`recorder::PyRecorder`] wraps [`reptrace_record::Recorder`]: steps,
//!   per-example factors, whole batch updates, weights, probes, commits;
//! - [`analysis`] opens a run and runs SQL, canned queries, `attribute`,
//!   `verify`, `report` and `info`; query results leave as Arrow record
//!   batches through the C stream interface ([`arrow_stream::ArrowStream`]),
//!   which `pyarrow.table()` imports without copying.
//!
//! Errors become Python exceptions of the [`error`] family with the CLI's
//! one-line messages. The heavy calls release the interpreter lock.
//!
//! The Python side (`python/reptrace/`) adds the PyTorch hooks that collect
//! the factors; see `docs/python.md`.
#![deny(clippy::unwrap_used)]

pub mod analysis;
pub mod arrow_stream;
pub mod error;
pub mod host;
pub mod recorder;
pub mod shard;

use pyo3::prelude::*;

/// The extension module.
#[pymodule]
fn _reptrace(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<error::Error>())?;
    m.add("RecordError", py.get_type::<error::RecordError>())?;
    m.add("AnalysisError", py.get_type::<error::AnalysisError>())?;
    m.add("InvalidInput", py.get_type::<error::InvalidInput>())?;
    m.add("FORMAT_VERSION", reptrace_format::FORMAT_VERSION)?;
    m.add_class::<recorder::PyRecorder>()?;
    m.add_class::<recorder::PyProbeAppender>()?;
    m.add_class::<arrow_stream::ArrowStream>()?;
    m.add_function(wrap_pyfunction!(recorder::compact, m)?)?;
    m.add_function(wrap_pyfunction!(host::check_terms, m)?)?;
    m.add_function(wrap_pyfunction!(host::check_verdicts, m)?)?;
    m.add_function(wrap_pyfunction!(host::example_losses, m)?)?;
    analysis::register(m)?;
    shard::register(m)?;
    Ok(())
}
