//! Errors of the format crate.
use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong reading or checking a run's metadata.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The run directory does not exist or is not a directory.
    #[error("{path}: no such run directory")]
    NoRun {
        /// The path given as the run directory.
        path: PathBuf,
    },
    /// The run directory has no `manifest.json`.
    #[error("{path}: manifest missing (is this a reptrace run directory?)")]
    NoManifest {
        /// Where the manifest was expected: `<run>/manifest.json`.
        path: PathBuf,
    },
    /// An I/O error on a file of the run.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The manifest is not valid JSON or does not match the manifest schema.
    #[error("{path}: invalid manifest: {message}")]
    BadManifest {
        /// The manifest's path (as given to [`Manifest::parse`](crate::Manifest::parse)).
        path: PathBuf,
        /// What is wrong: the JSON error, or the check that failed (a
        /// commit's `seq` out of order, a bad layer name or file path).
        message: String,
    },
    /// The manifest was written by an unknown format or version.
    #[error(
        "{path}: format {format} version {version} is not supported (this build reads {supported})"
    )]
    Version {
        /// The manifest's path.
        path: PathBuf,
        /// The manifest's `format` field (`<none>` when missing).
        format: String,
        /// The manifest's `format_version` field (0 when missing).
        version: u32,
        /// The format and range of versions this build reads, for the
        /// message (`reptrace 1 to 6`).
        supported: String,
    },
    /// A name (layer, table, …) is not valid.
    #[error("invalid {what} {name:?}: {why}")]
    InvalidName {
        /// What kind of name it is (`layer`, `file path`, or what the caller
        /// of [`check_name`](crate::layout::check_name) passed).
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Which rule it breaks.
        why: &'static str,
    },
    /// A table name that the format does not define.
    #[error("unknown table {name:?} (tables: instances, steps, updates, probes, contributions)")]
    UnknownTable {
        /// The name that matched no table.
        name: String,
    },
}
