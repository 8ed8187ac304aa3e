//! The reptrace trace format (version [`FORMAT_VERSION`]).
//!
//! A *run* is a directory that any Parquet tool can read (Hive-style
//! partitions by `layer`). This crate is the single source of truth for it:
//! the Arrow schema of every table ([`schema()`]), the manifest ([`Manifest`]),
//! where files live ([`layout`]), what each traced layer kind stores
//! ([`kinds`]) and the format version ([`FORMAT_VERSION`]).
//! It has no heavy dependencies so that writers in any training loop and the
//! analyzer share one definition. The pure parsers that more than one crate
//! needs live here too: the data set loaders ([`data`]) and the parameter
//! headers of canned queries ([`params`]).
//!
//! A manifest as a recorder starts one, read back the way every reader
//! checks it, and where the rows of its traced layer go:
//!
//! ```
//! use reptrace_format::{
//!     Dtype, Error, LinearSpec, Manifest, Mode, Model, Module, Optimizer, Status, Table, layout,
//!     schema,
//! };
//! use std::path::Path;
//! # fn main() -> reptrace_format::Result<()> {
//! let model = Model {
//!     name: "tiny".into(),
//!     input_shape: vec![3],
//!     structure: Default::default(),
//!     modules: vec![Module::Linear(LinearSpec::new("fc", 3, 2, true))],
//!     frozen: vec![],
//! };
//! let classes = vec!["a".into(), "b".into()];
//! let m = Manifest::new("run-1".into(), Mode::Instance, Dtype::F16, model,
//!     Optimizer::sgd(0.1), classes, "2025-01-01T00:00:00Z".into());
//!
//! let path = Path::new("run/manifest.json");
//! let read = Manifest::parse(&m.to_json(), path)?;
//! assert_eq!(read, m);
//! assert_eq!(read.status, Status::Recording);
//! assert_eq!(read.last_step(), None); // nothing committed yet
//! // A manifest of a newer format is refused with a version error.
//! let newer = r#"{"format": "reptrace", "format_version": 999}"#;
//! assert!(matches!(Manifest::parse(newer, path), Err(Error::Version { .. })));
//!
//! // An update record of `fc` holds u (its input, 3 values) and v (2 values),
//! // in part files partitioned by layer, with the factors in the run's dtype.
//! let fc = read.model.traced_layer("fc").unwrap();
//! assert_eq!(fc.factor_lens(), (3, 2));
//! assert_eq!(
//!     layout::part_path(Table::Updates, Some("fc"), 1),
//!     "updates/layer=fc/part-000001.parquet"
//! );
//! let u = schema(Table::Updates, read.dtype).field_with_name("u").unwrap().clone();
//! assert_eq!(reptrace_format::schema::type_name(u.data_type()), "list<float16>");
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]
#![deny(clippy::unwrap_used)]

pub mod data;
pub mod displacement;
pub mod error;
pub mod ids;
pub mod kinds;
pub mod layout;
pub mod manifest;
pub mod params;
pub mod schema;

pub use displacement::{StepHyper, displacement_scales, sgd_displacement_scales};
pub use error::{Error, Result};
pub use ids::{InstanceId, ProbeId, Step};
pub use kinds::LayerKind;
pub use manifest::{
    Aggregation, AnalysisProbes, Attribution, Commit, Conv1dSpec, Conv2dSpec, Dtype, EmbeddingSpec,
    FileEntry, Lens, LinearSpec, LrSchedule, Manifest, Mode, Model, Module, NormSpec, Optimizer,
    OptimizerKind, PaddingMode, Split, Status, Storage, Structure, TracedLayer,
};
pub use schema::{Table, col, column_since, schema, schema_as_of};

/// Name written into every manifest and Parquet file of a run.
pub const FORMAT_NAME: &str = "reptrace";

/// The version of the trace format this crate reads and writes.
///
/// Every change to a schema or to the manifest bumps it and adds a row to
/// the version table in `docs/format.md`.
pub const FORMAT_VERSION: u32 = 11;

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
