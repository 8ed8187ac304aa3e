//! Errors of the recorder.
use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while recording a trace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required builder setting was not given ([`RecorderBuilder::build`](crate::RecorderBuilder::build)).
    #[error("recorder: {what} is required (call .{what}(…) on the builder)")]
    Missing {
        /// The builder method to call: `model` or `optimizer`.
        what: &'static str,
    },
    /// A builder setting has an invalid value (a zero queue depth or row
    /// group size, a zstd level outside 1..=22).
    #[error("recorder: invalid {setting} {value}: {why}")]
    Setting {
        /// The builder method, e.g. `zstd_level`.
        setting: &'static str,
        /// The value given.
        value: String,
        /// The allowed values.
        why: &'static str,
    },
    /// The run directory exists and is not empty.
    #[error("{path}: run directory exists and is not empty (choose a new directory)")]
    NotEmpty {
        /// The directory given to [`Recorder::builder`](crate::Recorder::builder).
        path: PathBuf,
    },
    /// The model is not valid for recording (a traced layer's name used twice).
    #[error("model: {message}")]
    Model {
        /// What is wrong with the model.
        message: String,
    },
    /// A layer name that is not a traced layer of the model.
    #[error("layer {layer:?} is not a traced layer of the model (traced: {traced})")]
    UnknownLayer {
        /// The name given.
        layer: String,
        /// The model's traced layers, comma-separated (`none` if it has none).
        traced: String,
    },
    /// A slice has the wrong length.
    #[error("{context}: {what} has length {got}, expected {expected}")]
    Length {
        /// Which call and layer, e.g. `updates for layer "fc1"`.
        context: String,
        /// Which argument.
        what: &'static str,
        /// The length the other arguments call for.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// A step row out of order ([`Recorder::step`](crate::Recorder::step)).
    #[error("steps: step {step} is not after the previous step {previous}")]
    StepOrder {
        /// The step given.
        step: i64,
        /// The step of the previous `steps` row.
        previous: i64,
    },
    /// A value that does not fit the format (negative step, label out of
    /// range, NaN loss, too many elements…), or a call the run's state or
    /// mode does not allow (a batch step in instance mode, a locked run).
    #[error("{context}: {message}")]
    Invalid {
        /// Which call, table or run, e.g. `examples of step 3`.
        context: String,
        /// What is wrong.
        message: String,
    },
    /// A weight tensor does not match the model or is malformed (given
    /// twice, data length not the shape's product, a shape other than the
    /// model's).
    #[error("weights: tensor {name:?}: {message}")]
    Weights {
        /// The tensor's name, e.g. `fc1.weight`.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A weights snapshot of that name was already committed: weights were
    /// given twice for the same step.
    #[error("{path}: weights snapshot already written in this run (one snapshot per step)")]
    WeightsExist {
        /// The snapshot's path relative to the run, e.g. `weights/step-00000009.safetensors`.
        path: String,
    },
    /// An I/O error on a file of the run.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The Parquet writer failed.
    #[error("{path}: parquet: {source}")]
    Parquet {
        /// The part file being written.
        path: PathBuf,
        /// The Parquet error.
        source: parquet::errors::ParquetError,
    },
    /// Building an Arrow batch failed.
    #[error("{table}: arrow: {source}")]
    Arrow {
        /// The table the batch was for (`updates`, `probes`, …).
        table: String,
        /// The Arrow error.
        source: arrow_schema::ArrowError,
    },
    /// Serializing a safetensors snapshot failed.
    #[error("{path}: safetensors: {message}")]
    Safetensors {
        /// The snapshot file being written.
        path: PathBuf,
        /// The safetensors error.
        message: String,
    },
    /// An error from the format crate (names, manifest).
    #[error(transparent)]
    Format(#[from] reptrace_format::Error),
    /// The writer thread failed earlier (its error was returned once); the
    /// run was marked aborted, and every later call gets this.
    #[error("recorder failed earlier: {reason}")]
    Failed {
        /// The writer thread's error, as text.
        reason: String,
    },
    /// A call that the recorder's rank in a distributed run does not make:
    /// ranks other than 0 write `updates`, `examples` and `batches` only
    /// and stage them for rank 0's commit; rank 0 alone commits.
    #[error("rank {rank}: {call} {why}")]
    Rank {
        /// The recorder's rank.
        rank: u32,
        /// The call, e.g. `commit()`.
        call: &'static str,
        /// Who makes it instead.
        why: &'static str,
    },
    /// A part file another rank staged for this commit is not in the run
    /// directory as this process sees it.
    #[error(
        "{path}: staged by another rank but not found in the run directory: every rank must write \
         the run on one shared file system"
    )]
    Unshared {
        /// The file, under the run directory.
        path: PathBuf,
    },
    /// `finish()` or `abort()` was already called.
    #[error("recorder is closed: {0} was already called")]
    Closed(&'static str),
    /// The writer thread stopped unexpectedly.
    #[error("recorder writer thread stopped unexpectedly")]
    WriterGone,
    /// A compaction stopped by its caller before its commit.
    #[error("{run}: compaction stopped before its commit; the run is as it was")]
    Stopped {
        /// The run directory.
        run: PathBuf,
    },
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
