//! The reptrace analyzer: turns a run's update records into contributions
//! for chosen probes, and answers read-only SQL over every table of the run.
//!
//! - [`session`]: [`open`] a run and [`register`] its tables on a DataFusion
//!   `SessionContext` (the committed files only);
//! - [`computed`]: `contributions` computed on demand, filters pushed down
//!   into the arithmetic of [`attribution`];
//! - [`attribution`]: [`attribute`] materialises contributions (per record,
//!   or summed per instance and epoch) for export and scale;
//! - [`sql`]: read-only SQL and the output formats;
//! - [`query`]: the canned queries of `queries/*.sql`, with bound parameters;
//! - [`verify`]: integrity and completeness checks;
//! - [`export`]: one table streamed to Parquet, CSV or JSON lines;
//! - [`report`]: the self-contained HTML report of one probe;
//! - [`limits`]: the memory limit and spill directory of every query;
//! - [`interrupt`]: stopping long work cleanly on Ctrl-C.
//!
//! ```no_run
//! # async fn example() -> reptrace_analyze::Result<()> {
//! use reptrace_analyze::{query, sql};
//! let run = std::path::Path::new("runs/digits");
//! // The ten strongest proponents of probe 3 per layer, computed on demand.
//! let q = query::Query::resolve("top_proponents")?;
//! let ctx = reptrace_analyze::context(&reptrace_analyze::open(run)?)?;
//! let (schema, batches) = q.run(&ctx, &[("probe", "3")]).await?;
//! sql::write(&schema, &batches, sql::Format::Table, &mut std::io::stdout())?;
//! # Ok(()) }
//! ```
#![deny(clippy::unwrap_used)]

pub mod attribution;
pub mod computed;
pub mod error;
pub mod export;
pub mod interrupt;
pub mod kernel;
pub mod limits;
pub mod probes;
pub mod query;
pub mod records;
pub mod replay;
pub mod report;
pub mod session;
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
pub use session::{Run, context, context_limited, context_with, open, register, register_with};
