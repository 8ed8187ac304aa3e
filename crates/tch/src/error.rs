//! Errors of the tch adapter.

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong loading data, building a model or training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data set could not be read or is malformed.
    #[error(transparent)]
    Data(#[from] reptrace_format::data::DataError),
    /// The model cannot be built as specified.
    #[error("model {model}: {message}")]
    BadModel { model: String, message: String },
    /// A module whose per-example gradient does not exist (BatchNorm in
    /// training mode couples the examples of a batch).
    #[error(
        "model {model}: module {module} couples the examples of a batch, so instance mode cannot trace it (train with --mode batch, and --class-pure-batches for exact class shares)"
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
    /// A weights snapshot of a run does not fit the run's model.
    #[error("{}: {message}", snapshot.display())]
    Weights {
        snapshot: std::path::PathBuf,
        message: String,
    },
    /// Probes cannot be added to this run (its model cannot be rebuilt, it
    /// has no trained weights, …).
    #[error("{}: {message}", run.display())]
    Run {
        run: std::path::PathBuf,
        message: String,
    },
    /// An error from libtorch.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// An error from the recorder.
    #[error(transparent)]
    Record(#[from] reptrace_record::Error),
}
