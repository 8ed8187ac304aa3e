//! Errors of the tch adapter.
use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong loading data, building a model or training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A row of a CSV file is malformed (ragged, non-numeric, bad label).
    #[error("{path}:{line}: {message}")]
    BadRow {
        path: PathBuf,
        /// 1-based line number in the file.
        line: usize,
        message: String,
    },
    /// An IDX file is malformed (bad magic number, truncated, sizes disagree).
    #[error("{path}: {message}")]
    BadIdx { path: PathBuf, message: String },
    /// A data set specification (`digits`, `csv:PATH?…`, `idx:DIR`) is invalid.
    #[error("invalid data set {spec:?}: {message}")]
    BadDataSpec { spec: String, message: String },
    /// The data set is unusable as a whole (no rows, no training split, …).
    #[error("data set {name}: {message}")]
    BadData { name: String, message: String },
    /// The model cannot be built as specified.
    #[error("model {model}: {message}")]
    BadModel { model: String, message: String },
    /// A module whose per-example gradient does not exist (BatchNorm in
    /// training mode couples the examples of a batch).
    #[error(
        "model {model}: module {module} couples the examples of a batch, so instance mode cannot trace it (remove it)"
    )]
    CouplingModule { model: String, module: String },
    /// `--trace-layers` names a layer the model does not have.
    #[error("unknown layer {name:?} in trace layers (layers: {known})")]
    UnknownLayer { name: String, known: String },
    /// A training setting is out of range.
    #[error("invalid setting {setting}: {message}")]
    BadSetting {
        setting: &'static str,
        message: String,
    },
    /// The requested device is not available.
    #[error("device {device} is not available{hint}")]
    NoDevice { device: String, hint: String },
    /// The loss became NaN or infinite; the trace is committed up to the last good step.
    #[error("non-finite loss {loss} at step {step} (epoch {epoch}); try a smaller learning rate")]
    NonFiniteLoss { step: i64, epoch: i32, loss: f64 },
    /// An error from libtorch.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// An error from the recorder.
    #[error(transparent)]
    Record(#[from] reptrace_record::Error),
}
