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
    BadModel {
        /// The model's name (`mlp`, `cnn`, `cnn-bn` or a custom model's name).
        model: String,
        /// What does not fit (shapes, layer names, classes).
        message: String,
    },
    /// A module whose per-example gradient does not exist (BatchNorm in
    /// training mode couples the examples of a batch).
    #[error(
        "model {model}: module {module} couples the examples of a batch, so instance mode cannot trace it (train with --mode batch, and --class-pure-batches for exact class shares)"
    )]
    CouplingModule {
        /// The model's name.
        model: String,
        /// The coupling module's name and kind, e.g. `bn1 (batch norm)`.
        module: String,
    },
    /// `--trace-layers` names a layer the model does not have.
    #[error("unknown layer {name:?} in trace layers (layers: {known})")]
    UnknownLayer {
        /// The requested layer name that matches no Linear/Conv2d layer.
        name: String,
        /// The model's Linear/Conv2d layer names, comma-separated.
        known: String,
    },
    /// A training setting is out of range.
    #[error("invalid setting {setting}: {message}")]
    BadSetting {
        /// The setting at fault, named like its `reptrace` flag without the
        /// dashes (`lr`, `batch-size`, `rows`, `ids`, …; the CLI reports it
        /// as `--{setting}`).
        setting: &'static str,
        /// What is wrong with its value.
        message: String,
    },
    /// The requested device is not available.
    #[error("device {device} is not available{hint}")]
    NoDevice {
        /// The device as requested (`cuda:N`).
        device: String,
        /// Why, with a leading space and in parentheses (no CUDA device or
        /// driver, a build without CUDA, how many devices there are).
        hint: String,
    },
    /// The loss became NaN or infinite; the trace is committed up to the last good step.
    #[error("non-finite loss {loss} at step {step} (epoch {epoch}); try a smaller learning rate")]
    NonFiniteLoss {
        /// The step whose loss it was, counted over the whole run from 0; no
        /// update of this step was applied or recorded.
        step: i64,
        /// The epoch of that step, from 0.
        epoch: i32,
        /// The batch loss (NaN or ±∞).
        loss: f64,
    },
    /// A step the tracer cannot record exactly: the gradient the optimizer
    /// is about to apply differs from the records by more than one scale
    /// factor. The run is committed up to the last good step and aborted.
    #[error(
        "layer {layer} at step {step}: {message}; the run stays readable up to its last commit and is marked aborted"
    )]
    Inexact {
        /// The traced layer.
        layer: String,
        /// The step, counted over the whole run from 0; nothing of it was
        /// applied or recorded.
        step: i64,
        /// What differs, with the relative difference.
        message: String,
    },
    /// A weights snapshot of a run does not fit the run's model.
    #[error("{}: {message}", snapshot.display())]
    Weights {
        /// The snapshot file (`weights/*.safetensors`).
        snapshot: std::path::PathBuf,
        /// What is wrong: unreadable, a missing tensor, a shape that differs
        /// from the model's.
        message: String,
    },
    /// A run directory cannot be used: probes cannot be added to the run (its
    /// model cannot be rebuilt, it has no trained weights, …), or the
    /// directory of a new traced run exists and is not empty.
    #[error("{}: {message}", run.display())]
    Run {
        /// The run directory.
        run: std::path::PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A traced training loop used the tracer wrongly (a layer that did not
    /// run, a step before `backward`, …).
    #[error("trace: {0}")]
    Trace(String),
    /// An error from libtorch.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// An error from the recorder.
    #[error(transparent)]
    Record(#[from] reptrace_record::Error),
}
