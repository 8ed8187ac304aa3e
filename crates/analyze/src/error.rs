//! Errors of the analyzer.
use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong analyzing a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The run's manifest could not be read or is invalid.
    #[error(transparent)]
    Format(#[from] reptrace_format::Error),
    /// The bundled digits (drawn in reports) could not be read.
    #[error(transparent)]
    Data(#[from] reptrace_format::data::DataError),
    /// An I/O error on a file of the run.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory (`<output>` for the output stream).
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A Parquet file could not be read or written.
    #[error("{path}: {source}")]
    Parquet {
        /// The Parquet file.
        path: PathBuf,
        /// The Parquet error.
        source: parquet::errors::ParquetError,
    },
    /// A column of a Parquet file has an unexpected type or length.
    #[error("{path}: column {column}: {message}")]
    Column {
        /// The file the column was read from (or, exporting, written to).
        path: PathBuf,
        /// The column's name.
        column: String,
        /// What is wrong (the type found, a missing column, a bad length).
        message: String,
    },
    /// A weights snapshot is missing a tensor, has the wrong shape or dtype, or is corrupt.
    #[error("{path}: {message}")]
    Weights {
        /// The snapshot file (`weights/*.safetensors`).
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The run lacks something the operation needs (weights, probes, steps).
    #[error("{run}: {message}")]
    Incomplete {
        /// The run directory.
        run: PathBuf,
        /// What is missing.
        message: String,
    },
    /// A traced layer name that the run does not have.
    #[error("unknown layer {name:?} (traced layers: {known})")]
    UnknownLayer {
        /// The name given.
        name: String,
        /// The run's traced layers, comma-separated.
        known: String,
    },
    /// A probe that training did not record.
    #[error("probe {probe} was not recorded for layer {layer} (recorded probes: {known})")]
    UnknownProbe {
        /// The probe id asked for.
        probe: i64,
        /// The layer whose probes lack it (the report: every traced layer,
        /// comma-separated).
        layer: String,
        /// The probe ids that were recorded, summarised.
        known: String,
    },
    /// An option value that cannot be parsed or makes no sense.
    #[error("invalid {option} {value:?}: {why}")]
    BadOption {
        /// The option, as the command line names it (`--by`, `format`,
        /// `step range`, …).
        option: &'static str,
        /// The value given.
        value: String,
        /// Why it is rejected, or what is allowed.
        why: String,
    },
    /// A SQL statement that the read-only SQL interface refuses.
    #[error("refused SQL: {0}")]
    Refused(String),
    /// A query failed to parse, plan or run.
    #[error("sql: {0}")]
    Sql(String),
    /// A canned query could not be found or its header is malformed.
    #[error("query {name}: {message}")]
    Query {
        /// The query's name or path, as given.
        name: String,
        /// What is wrong (no such query, a malformed header).
        message: String,
    },
    /// A query parameter is unknown, missing or has a bad value.
    #[error("parameter {name}: {message}")]
    Param {
        /// The parameter's name.
        name: String,
        /// What is wrong with it.
        message: String,
    },
    /// Writing query output failed.
    #[error("writing {format} output: {message}")]
    Output {
        /// The output format's name (`table`, `csv`, `parquet`, …).
        format: &'static str,
        /// The writer's error, on one line.
        message: String,
    },
    /// A scan of the computed `contributions` without a probe filter would
    /// compute too many rows.
    #[error(
        "contributions: this query would compute {rows} rows ({probes} probes × {records} update records over {layers} layers) because it has no filter on probe_id; add WHERE probe_id = … or probe_id IN (…), materialise them once with `reptrace attribute`, or allow it with --max-computed-rows {rows} (now {max})"
    )]
    TooManyRows {
        /// Rows the scan would compute: probes × records (plus residual
        /// rows), summed over the layers.
        rows: u64,
        /// Probes to compute, the most of any one layer.
        probes: usize,
        /// Update records over all the layers scanned.
        records: u64,
        /// Layers scanned.
        layers: usize,
        /// The limit it exceeds ([`ComputeOptions::max_rows`](crate::ComputeOptions::max_rows)).
        max: u64,
    },
    /// A computed table failed while a query read it.
    #[error("{0}")]
    Computed(String),
    /// A computation produced something inconsistent (lengths that do not match).
    #[error("{0}")]
    Internal(String),
    /// The run holds a layer kind (or layout) this build cannot analyse yet.
    #[error("{0}")]
    Unsupported(String),
    /// The query needed more memory than its limit and could not spill it.
    #[error("{}", memory_message(*limit, message))]
    Memory {
        /// The limit in bytes, where the caller knows it
        /// ([`Error::with_memory_limit`]).
        limit: Option<u64>,
        /// DataFusion's account of the allocation that failed.
        message: String,
    },
    /// The process was interrupted (Ctrl-C) and the work stopped
    /// ([`crate::interrupt`]).
    #[error("interrupted by {}: stopped; no output file is left and the run is unchanged", signal_name(*signal))]
    Interrupted {
        /// The signal's number (2: SIGINT, 15: SIGTERM).
        signal: i32,
    },
}

fn memory_message(limit: Option<u64>, message: &str) -> String {
    let raise = format!(
        "raise it with --memory-limit SIZE or {}=SIZE (e.g. 4GiB)",
        crate::memory::MEMORY_LIMIT_ENV
    );
    match limit {
        Some(l) => format!(
            "the query needs more memory than its limit of {} and this part of it cannot spill \
             to disk ({message}); {raise}",
            crate::memory::human(l)
        ),
        None => format!("the query ran out of memory ({message}); {raise}"),
    }
}

/// `SIGINT (Ctrl-C)`, `SIGTERM`, or the number.
fn signal_name(signal: i32) -> String {
    match signal {
        2 => "SIGINT (Ctrl-C)".into(),
        15 => "SIGTERM".into(),
        s => format!("signal {s}"),
    }
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

    /// A DataFusion error as one line.
    ///
    /// An error of a computed table comes back as its own message, without
    /// DataFusion's wrapping; memory exhausted under the pool's limit as
    /// [`Error::Memory`], an interruption as [`Error::Interrupted`].
    pub(crate) fn sql(e: datafusion::error::DataFusionError) -> Self {
        use datafusion::error::DataFusionError;
        if let DataFusionError::ResourcesExhausted(m) = e.find_root() {
            return Error::Memory {
                limit: None,
                message: one_line(m),
            };
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if let Some(ours) = s.downcast_ref::<Error>() {
                return match ours {
                    Error::Interrupted { signal } => Error::Interrupted { signal: *signal },
                    Error::Memory { limit, message } => Error::Memory {
                        limit: *limit,
                        message: message.clone(),
                    },
                    _ => Error::Computed(one_line(&ours.to_string())),
                };
            }
            source = s.source();
        }
        Error::Sql(one_line(&e.to_string()))
    }

    /// This error with the memory limit it ran under, so that an
    /// [`Error::Memory`] names it.
    pub fn with_memory_limit(self, limit: Option<u64>) -> Self {
        match self {
            Error::Memory { message, .. } => Error::Memory { limit, message },
            e => e,
        }
    }
}

/// Joins the lines of a message into one.
pub(crate) fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
