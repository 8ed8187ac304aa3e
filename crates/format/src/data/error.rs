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
        /// The file that could not be read or decompressed.
        path: PathBuf,
        /// The underlying I/O (or gzip) error.
        source: std::io::Error,
    },
    /// A row of a CSV file is malformed (ragged, non-numeric, bad label).
    #[error("{path}:{line}: {message}")]
    BadRow {
        /// The CSV file.
        path: PathBuf,
        /// 1-based line number in the file.
        line: usize,
        /// What is wrong with the row.
        message: String,
    },
    /// An IDX file is malformed (bad magic number, truncated, sizes disagree).
    #[error("{path}: {message}")]
    BadIdx {
        /// The IDX file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A data set specification (`digits`, `csv:PATH?…`, `idx:DIR`) is invalid.
    #[error("invalid data set {spec:?}: {message}")]
    BadDataSpec {
        /// The specification as given.
        spec: String,
        /// Why it is rejected (unknown source, bad option, missing path).
        message: String,
    },
    /// The data set is unusable as a whole (no rows, no training split, …).
    #[error("data set {name}: {message}")]
    BadData {
        /// The data set's name ([`Dataset::name`](super::Dataset::name)).
        name: String,
        /// What does not fit.
        message: String,
    },
}
