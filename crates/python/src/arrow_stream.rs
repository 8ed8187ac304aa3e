//! Query results handed to Python through the Arrow C stream interface.
//!
//! An [`ArrowStream`] implements `__arrow_c_stream__` (the Arrow PyCapsule
//! interface), so `pyarrow.table(stream)`, `polars.from_arrow` and DuckDB
//! import the batches without a copy. It can be consumed once.
use crate::error;
use arrow::ffi_stream::FFI_ArrowArrayStream;
use arrow_array::{RecordBatch, RecordBatchIterator};
use arrow_schema::SchemaRef;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

/// A query result: its schema and record batches, exported once.
#[pyclass(module = "reptrace._reptrace")]
pub struct ArrowStream {
    result: Option<(SchemaRef, Vec<RecordBatch>)>,
}

impl ArrowStream {
    /// A stream over `batches`.
    pub fn new(schema: SchemaRef, batches: Vec<RecordBatch>) -> Self {
        Self {
            result: Some((schema, batches)),
        }
    }
}

#[pymethods]
impl ArrowStream {
    /// The Arrow PyCapsule interface: a capsule named `arrow_array_stream`
    /// holding an `ArrowArrayStream`. A requested schema is not supported
    /// (the result is returned as it is).
    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_stream__<'py>(
        &mut self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        let _ = requested_schema;
        let (schema, batches) = self.result.take().ok_or_else(|| {
            error::AnalysisError::new_err("this query result was already consumed")
        })?;
        let reader = RecordBatchIterator::new(batches.into_iter().map(Ok), schema);
        let stream = FFI_ArrowArrayStream::new(Box::new(reader));
        // The capsule owns the stream; a consumer moves it out (and leaves a
        // released stream behind), else dropping the capsule releases it.
        PyCapsule::new_with_value(py, stream, c"arrow_array_stream")
    }

    /// Rows in the result (before it is consumed).
    #[getter]
    fn num_rows(&self) -> usize {
        self.result
            .as_ref()
            .map_or(0, |(_, b)| b.iter().map(RecordBatch::num_rows).sum())
    }
}
