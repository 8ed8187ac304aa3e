//! Errors of the recorder.
use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while recording a trace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required builder setting was not given.
    #[error("recorder: {what} is required (call .{what}(…) on the builder)")]
    Missing { what: &'static str },
    /// A builder setting has an invalid value.
    #[error("recorder: invalid {setting} {value}: {why}")]
    Setting {
        setting: &'static str,
        value: String,
        why: &'static str,
    },
    /// The run directory exists and is not empty.
    #[error("{path}: run directory exists and is not empty (choose a new directory)")]
    NotEmpty { path: PathBuf },
    /// The model is not valid for recording.
    #[error("model: {message}")]
    Model { message: String },
    /// A layer name that is not a traced layer of the model.
    #[error("layer {layer:?} is not a traced layer of the model (traced: {traced})")]
    UnknownLayer { layer: String, traced: String },
    /// A slice has the wrong length.
    #[error("{context}: {what} has length {got}, expected {expected}")]
    Length {
        /// Which call and layer, e.g. `updates for layer "fc1"`.
        context: String,
        /// Which argument.
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A step row out of order.
    #[error("steps: step {step} is not after the previous step {previous}")]
    StepOrder { step: i64, previous: i64 },
    /// A value that does not fit the format (negative step, too many elements…).
    #[error("{context}: {message}")]
    Invalid { context: String, message: String },
    /// A weight tensor does not match the model or is malformed.
    #[error("weights: tensor {name:?}: {message}")]
    Weights { name: String, message: String },
    /// A weights snapshot of that name was already committed.
    #[error("{path}: weights snapshot already written in this run (one snapshot per step)")]
    WeightsExist { path: String },
    /// An I/O error on a file of the run.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The Parquet writer failed.
    #[error("{path}: parquet: {source}")]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    /// Building an Arrow batch failed.
    #[error("{table}: arrow: {source}")]
    Arrow {
        table: String,
        source: arrow_schema::ArrowError,
    },
    /// Serializing a safetensors snapshot failed.
    #[error("{path}: safetensors: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// An error from the format crate (names, manifest).
    #[error(transparent)]
    Format(#[from] reptrace_format::Error),
    /// The writer thread failed earlier; the run was marked aborted.
    #[error("recorder failed earlier: {reason}")]
    Failed { reason: String },
    /// `finish()` or `abort()` was already called.
    #[error("recorder is closed: {0} was already called")]
    Closed(&'static str),
    /// The writer thread stopped unexpectedly.
    #[error("recorder writer thread stopped unexpectedly")]
    WriterGone,
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn parquet(path: impl Into<PathBuf>, source: parquet::errors::ParquetError) -> Self {
        Error::Parquet {
            path: path.into(),
            source,
        }
    }
}
