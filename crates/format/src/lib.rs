//! The reptrace trace format (version [`FORMAT_VERSION`]).
//!
//! A *run* is a directory that any Parquet tool can read (Hive-style
//! partitions by `layer`). This crate is the single source of truth for it:
//! the Arrow schema of every table ([`schema()`]), the manifest ([`Manifest`]),
//! where files live ([`layout`]) and the format version ([`FORMAT_VERSION`]).
//! It has no heavy dependencies so that writers in any training loop and the
//! analyzer share one definition. The pure parsers that more than one crate
//! needs live here too: the data set loaders ([`data`]) and the parameter
//! headers of canned queries ([`params`]).
//!
//! ```
//! use reptrace_format::{schema, Dtype, Table};
//! let updates = schema(Table::Updates, Dtype::F16);
//! assert_eq!(updates.field_with_name("u").unwrap().name(), "u");
//! assert!(Table::Updates.is_partitioned());
//! ```
#![deny(clippy::unwrap_used)]

pub mod data;
pub mod displacement;
pub mod error;
pub mod ids;
pub mod layout;
pub mod manifest;
pub mod params;
pub mod schema;

pub use displacement::displacement_scales;
pub use error::{Error, Result};
pub use ids::{InstanceId, ProbeId, Step};
pub use manifest::{
    Aggregation, AnalysisProbes, Attribution, Commit, Conv2dSpec, Dtype, FileEntry, LinearSpec,
    LrSchedule, Manifest, Mode, Model, Module, Optimizer, OptimizerKind, Split, Status, Storage,
    Structure, TracedLayer,
};
pub use schema::{Table, col, schema};

/// Name written into every manifest and Parquet file of a run.
pub const FORMAT_NAME: &str = "reptrace";

/// The version of the trace format this crate reads and writes.
///
/// Every change to a schema or to the manifest bumps it and adds a row to
/// the version table in `docs/format.md`.
pub const FORMAT_VERSION: u32 = 6;

/// The oldest format version this crate still reads (runs of every version
/// from it to [`FORMAT_VERSION`] open; `tests/data/` keeps one of each).
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// Parquet key/value metadata keys written into every file of a run.
pub mod kv {
    /// Format version, as a decimal string.
    pub const FORMAT_VERSION: &str = "reptrace.format_version";
    /// Run id of the run the file belongs to.
    pub const RUN_ID: &str = "reptrace.run_id";
    /// Table name (`updates`, `probes`, …).
    pub const TABLE: &str = "reptrace.table";
    /// Layer name, for partitioned tables.
    pub const LAYER: &str = "reptrace.layer";
}
