//! Errors of the format crate.
use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong reading or checking a run's metadata.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The run directory does not exist or is not a directory.
    #[error("{path}: no such run directory")]
    NoRun { path: PathBuf },
    /// The run directory has no `manifest.json`.
    #[error("{path}: manifest missing (is this a reptrace run directory?)")]
    NoManifest { path: PathBuf },
    /// An I/O error on a file of the run.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The manifest is not valid JSON or does not match the manifest schema.
    #[error("{path}: invalid manifest: {message}")]
    BadManifest { path: PathBuf, message: String },
    /// The manifest was written by an unknown format or version.
    #[error(
        "{path}: format {format} version {version} is not supported (this build reads {supported})"
    )]
    Version {
        path: PathBuf,
        format: String,
        version: u32,
        supported: String,
    },
    /// A name (layer, table, …) is not valid.
    #[error("invalid {what} {name:?}: {why}")]
    InvalidName {
        what: &'static str,
        name: String,
        why: &'static str,
    },
    /// A table name that the format does not define.
    #[error("unknown table {name:?} (tables: instances, steps, updates, probes, contributions)")]
    UnknownTable { name: String },
}
