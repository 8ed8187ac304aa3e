//! Traced training with tch (libtorch): record your own model and loop, or
//! train the built-in models.
//!
//! [`Tracer`] records a training loop of your own ([`trace`]): build the
//! Linear and Conv2d layers to trace through it (drop-in for
//! `tch::nn::linear`/`conv2d`), compose them as you like, and hand it each
//! step after `loss.backward()`. It records, per step and traced layer, the
//! factors of every training example's weight update ([`factors`]) through
//! a [`reptrace_record::Recorder`], the weights at every commit and, at the
//! end, the probes. A tiny model, one step, into a temporary run:
//!
//! ```
//! use reptrace_tch::{RunSpec, Step, Tracer};
//! use tch::nn::{self, Module, OptimizerConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vs = nn::VarStore::new(tch::Device::Cpu);
//! let mut tracer = Tracer::new();
//! let hidden = tracer.linear(vs.root() / "hidden", 4, 8, Default::default())?;
//! let out = tracer.linear(vs.root() / "out", 8, 2, Default::default())?;
//! let model = nn::seq().add(hidden).add_fn(|x| x.relu()).add(out);
//! let mut opt = nn::Sgd::default().build(&vs, 0.1)?;
//! let dir = std::env::temp_dir().join(format!("reptrace-doc-{}", std::process::id()));
//! tracer.record(RunSpec::sgd(&dir, vec!["no".into(), "yes".into()], 0.1))?;
//!
//! let (x, ids, labels) = (tch::Tensor::rand([3, 4], tch::kind::FLOAT_CPU), [7i64, 8, 9], [0, 1, 1]);
//! let y = tch::Tensor::from_slice(&[0i64, 1, 1]);
//! opt.zero_grad();
//! let logits = model.forward(&x);
//! let loss = logits.cross_entropy_for_logits(&y);
//! loss.backward();
//! let step = Step { loss: &loss, ids: &ids, labels: &labels, lr: 0.1, momentum: None, logits: Some(&logits) };
//! tracer.step(&step, || opt.step())?;
//! let manifest = tracer.finish(None)?;
//! assert_eq!(manifest.model.traced_layers().count(), 2);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! [`train()`] is the built-in loop (what `reptrace train` runs): mini-batch
//! SGD (PyTorch semantics: momentum, dampening, Nesterov, weight decay,
//! per-step learning rate) or Adam/AdamW, in instance or batch mode, on a sequential
//! model ([`model`]) and a data set ([`data`]); it records through the same
//! [`Tracer`]. [`add_probes`] adds probes (new inputs) to a run at any time
//! after training ([`add`]).
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
#![warn(missing_docs)]
#![deny(clippy::unwrap_used)]

pub mod adam;
pub mod add;
pub mod check;
pub mod error;
pub mod factors;
pub mod kinds;
pub mod model;
pub mod probe;
pub mod sgd;
pub mod trace;
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
pub use trace::{
    AdamParam, Probes, RunSpec, Step, Taps, Traced, TracedConv2d, TracedLinear, Tracer,
};
pub use train::{
    DeviceChoice, EpochStats, Progress, TrainConfig, TrainSummary, keep_freed_memory, train,
    train_on,
};
