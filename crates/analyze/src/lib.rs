//! The reptrace analyzer: turns a run's update records into contributions
//! for chosen probes, and answers read-only SQL over every table of the run.
//!
//! - [`run`]: [`open`] a run: its manifest and committed files;
//! - [`session`]: [`register`] a run's tables on a DataFusion
//!   `SessionContext` (the committed files only);
//! - [`computed`]: `contributions` computed on demand, filters pushed down
//!   into the arithmetic of [`attribution`];
//! - [`attribution`]: [`attribute`] materialises contributions (per record,
//!   or summed per instance and epoch) for export and scale;
//! - [`sql`]: read-only SQL and the output formats;
//! - [`query`]: the canned queries of `queries/*.sql`, with bound parameters;
//! - [`verify`]: integrity and completeness checks;
//! - [`export`]: one table streamed to Parquet, CSV or JSON lines;
//! - [`limits`]: the memory limit and spill directory of every query;
//! - [`interrupt`]: stopping long work cleanly on Ctrl-C.
//!
//! The modules stand in three layers; a module imports only from its own
//! layer or a lower one, never in a circle (`tests/layers.rs` checks it):
//!
//! | layer | modules | may import |
//! |---|---|---|
//! | 0 the run | `error`, `memory`, [`limits`], [`interrupt`], [`run`] | layer 0 |
//! | 1 the arithmetic | [`records`], [`weights`], [`probes`], [`kernel`], [`precondition`], [`replay`], [`attribution`], [`shard`], [`verify`], [`writer`] | layers 0–1 |
//! | 2 the DataFusion adapter | [`computed`], [`session`], [`sql`], [`query`], [`export`] | layers 0–2 |
//!
//! A run of one SGD step on instances 0 and 1 of a layer `fc` (2 inputs,
//! 1 output, no bias), with instance 2 as a probe, queried with SQL and a
//! canned query:
//!
//! ```
//! use arrow_array::cast::AsArray;
//! use arrow_array::types::{Float64Type, Int64Type};
//! use reptrace_analyze::{query::Query, sql};
//! # use reptrace_format::{LinearSpec, Model, Module, Optimizer, Split};
//! # use reptrace_record::{NamedTensor, ProbeBatch, Recorder, StepRow, UpdateBatch};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let tmp = tempfile::tempdir()?;
//! # let dir = tmp.path().join("run");
//! # let model = Model {
//! #     name: "tiny".into(),
//! #     input_shape: vec![2],
//! #     structure: Default::default(),
//! #     modules: vec![Module::Linear(LinearSpec::new("fc", 2, 1, false))],
//! #     frozen: vec![],
//! # };
//! # let mut rec = Recorder::builder(&dir)
//! #     .model(model)
//! #     .optimizer(Optimizer::sgd(0.1))
//! #     .classes(vec!["a".into(), "b".into()])
//! #     .build()?;
//! # rec.instances(&[0, 1, 2], &[0, 1, 0], &[Split::Train, Split::Train, Split::Test])?;
//! # let initial = [NamedTensor { name: "fc.weight", shape: &[1, 2], data: &[0.0, 0.0] }];
//! # rec.weights(&initial)?;
//! # rec.commit()?;
//! # rec.step(StepRow { step: 0, epoch: 0, lr: 0.1, batch_size: 2, loss: 0.7, skipped: false })?;
//! # // ΔW = v uᵀ per instance: [0.5, 0] and [0, -0.25].
//! # rec.updates("fc", UpdateBatch {
//! #     step: 0, epoch: 0, instance_ids: &[0, 1], labels: &[0, 1],
//! #     u: &[1.0, 0.0, 0.0, 1.0], v: &[0.5, -0.25], update_norm: None,
//! #     positions: None,
//! # })?;
//! # // Probe input a = [2, 2]; refinement p = (W_T − W_0) a = 0.5.
//! # rec.probes("fc", ProbeBatch {
//! #     probe_ids: &[2], instance_ids: &[None], labels: &[0], predicted: &[0],
//! #     a: &[2.0, 2.0], p: &[0.5],
//! #     positions: None,
//! # })?;
//! # rec.finish(&[NamedTensor { name: "fc.weight", shape: &[1, 2], data: &[0.5, -0.25] }])?;
//! let run = reptrace_analyze::open(&dir)?;
//! let ctx = reptrace_analyze::context(&run)?;
//! let rt = tokio::runtime::Runtime::new()?;
//!
//! // Contributions, computed on demand: one row per update record and the
//! // residual (instance_id NULL); the dots of a probe sum to ‖p‖² = 0.25.
//! let (_, batches) = rt.block_on(sql::run(
//!     &ctx,
//!     "SELECT instance_id, dot FROM contributions WHERE probe_id = 2 \
//!      ORDER BY instance_id NULLS LAST",
//! ))?;
//! let dots: Vec<f64> = batches
//!     .iter()
//!     .flat_map(|b| b.column(1).as_primitive::<Float64Type>().values().to_vec())
//!     .collect();
//! assert_eq!(dots, [0.5, -0.25, 0.0]);
//!
//! // The strongest proponent of probe 2 per layer (`queries/top_proponents.sql`).
//! let q = Query::resolve("top_proponents")?;
//! let (_, top) = rt.block_on(q.run(&ctx, &[("probe", "2"), ("k", "1")]))?;
//! let ids = top[0].column_by_name("instance_id").unwrap().as_primitive::<Int64Type>();
//! assert_eq!(ids.values().to_vec(), [0]);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![deny(clippy::unwrap_used)]

pub mod attribution;
pub mod computed;
pub mod error;
pub mod export;
pub mod interrupt;
pub mod kernel;
pub mod limits;
mod memory;
pub mod precondition;
pub mod probes;
pub mod query;
pub mod records;
pub mod replay;
pub mod run;
pub mod session;
pub mod shard;
pub mod sql;
pub mod verify;
pub mod weights;
pub mod writer;

pub use attribution::{Options, ProbeSelection, Progress, StepRange, attribute};
pub use computed::{ComputeOptions, ContributionsTable};
/// The DataFusion this crate builds on (its `SessionContext` is the one
/// [`context`] returns).
pub use datafusion;
pub use error::{Error, Result};
pub use limits::Limits;
pub use run::{Run, open};
pub use session::{context, context_limited, context_with, register, register_with};
