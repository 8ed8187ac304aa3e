//! The reptrace recorder: writes a training trace (docs/format.md) while a
//! model trains.
//!
//! A [`Recorder`] takes plain slices — steps, per-example update factors,
//! instances, weights snapshots, probes — so that any training loop can
//! produce a trace ([`Recorder::updates_owned`] takes the factor buffers
//! by value instead, f32 or f16, and saves a copy); the records and probes
//! of a ragged layer (format 9) hold each row's own number of positions,
//! given in their `positions`. Rows are checked on
//! the caller's thread, queued on a bounded channel and written to Parquet
//! (zstd, byte-stream-split floats) by a background thread. Nothing is visible to readers until a commit
//! point: [`Recorder::commit`] makes the rows so far durable and lists them
//! in `manifest.json`, so a crash leaves a run that is readable up to its
//! last commit.
//!
//! ```
//! use reptrace_format::{LinearSpec, Model, Module, Optimizer, Split, Status};
//! use reptrace_record::{NamedTensor, Recorder, StepRow, UpdateBatch};
//! # fn main() -> reptrace_record::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let run = dir.path().join("run");
//! let model = Model {
//!     structure: Default::default(),
//!     name: "tiny".into(),
//!     input_shape: vec![3],
//!     modules: vec![Module::Linear(LinearSpec::new("fc", 3, 2, true))],
//!     frozen: vec![],
//! };
//! let mut rec = Recorder::builder(&run)
//!     .model(model)
//!     .optimizer(Optimizer::sgd(0.1))
//!     .classes(vec!["a".into(), "b".into()])
//!     .build()?;
//! rec.instances(&[0, 1], &[0, 1], &[Split::Train, Split::Train])?;
//! let (w, b) = (vec![0.0f32; 6], vec![0.0f32; 2]);
//! let weights = [
//!     NamedTensor { name: "fc.weight", shape: &[2, 3], data: &w },
//!     NamedTensor { name: "fc.bias", shape: &[2], data: &b },
//! ];
//! rec.weights(&weights)?;
//! rec.commit()?; // commit 0: instances and the initial weights
//! rec.step(StepRow { step: 0, epoch: 0, lr: 0.1, batch_size: 2, loss: 0.69, skipped: false })?;
//! rec.updates("fc", UpdateBatch {
//!     step: 0, epoch: 0, instance_ids: &[0, 1], labels: &[0, 1],
//!     u: &[1.0, 2.0, 3.0, 0.5, 0.5, 0.5], v: &[0.1, -0.1, -0.2, 0.2],
//!     update_norm: None, positions: None,
//! })?;
//! let manifest = rec.finish(&weights)?;
//! assert_eq!(manifest.status, Status::Complete);
//! assert_eq!(manifest.last_step().map(|s| s.0), Some(0));
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]
#![deny(clippy::unwrap_used)]

mod append;
mod batch;
mod columns;
mod compact;
mod direct;
mod durable;
mod encode;
pub mod error;
mod part;
mod recorder;
mod weights;
mod writer;

pub use append::ProbeAppender;
pub use batch::{
    AdamStep, BatchStep, ExampleBatch, FactorValues, LayerStepRow, NamedTensor, ProbeBatch,
    StepRow, UpdateBatch, UpdateBatchOwned, example_losses,
};
pub use compact::{Compacted, compact, compact_with};
pub use error::{Error, Result};
pub use part::{Compression, ParquetOptions};
pub use recorder::{Recorder, RecorderBuilder};
