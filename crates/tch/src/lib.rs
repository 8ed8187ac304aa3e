//! Traced training with tch (libtorch): the reptrace adapter for PyTorch models.
//!
//! [`train()`] runs mini-batch SGD (PyTorch semantics: momentum, dampening,
//! Nesterov, weight decay, per-step learning rate) on a sequential model
//! ([`model`]) and a data set ([`data`]), and records through a
//! [`reptrace_record::Recorder`], per step and traced layer, the factors of
//! every training example's weight update ([`factors`]), the weights at
//! every epoch end and, after training, the probes ([`probe`]).
//! [`add_probes`] adds probes (new inputs) to a run at any time after
//! training ([`add`]).
//!
//! ```no_run
//! // Train the MLP on the bundled digits into runs/example.
//! use reptrace_tch::{train, TrainConfig};
//! # fn main() -> reptrace_tch::Result<()> {
//! let config = TrainConfig { epochs: 5, out: "runs/example".into(), ..TrainConfig::default() };
//! let summary = train(&config, &mut |_progress| {})?;
//! println!("test accuracy {:?} after {} steps", summary.test_accuracy, summary.steps);
//! # Ok(())
//! # }
//! ```
//!
//! Data sets and models need no libtorch work to describe:
//!
//! ```
//! use reptrace_tch::{build_model, data, ModelChoice, TraceLayers};
//! let digits = data::digits().unwrap();
//! assert_eq!((digits.n_train, digits.n_test()), (1437, 360));
//! let model = build_model(&ModelChoice::Cnn, &digits.shape, 10, &TraceLayers::All).unwrap();
//! assert_eq!(model.traced_layers().count(), 3);
//! ```
#![deny(clippy::unwrap_used)]

pub mod adam;
pub mod add;
pub mod error;
pub mod factors;
pub mod model;
pub mod probe;
pub mod sgd;
pub mod train;

pub use add::{AddOptions, AddedProbes, ProbeRows, add_probes};
pub use data::{DataSource, Dataset};
pub use error::{Error, Result};
pub use factors::{Factors, HostFactors, layer_factors};
pub use model::{HostTensor, ModelChoice, Network, TraceLayers, build_model};
pub use probe::ProbeSet;
/// Data sets (digits, CSV, IDX): pure Rust, shared with the analyzer.
pub use reptrace_format::data;
pub use sgd::{Sgd, learning_rate};
pub use train::{DeviceChoice, EpochStats, Progress, TrainConfig, TrainSummary, train, train_on};
