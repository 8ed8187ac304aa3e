//! Errors of the data loaders.
use std::path::PathBuf;

/// Result with [`DataError`].
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// What can go wrong reading a data set.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
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
}
