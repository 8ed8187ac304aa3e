//! A run's tables on a DataFusion [`SessionContext`].
//!
//! [`register`] is the one entry point that puts every table of a run on a
//! context, under its own name (`instances`, `steps`, `updates`, `probes`,
//! `contributions`, `own_contributions`, `batches`, `influence`). Each stored
//! table reads exactly the files the manifest lists as committed, never a
//! directory listing, so rows written after the last commit point (or files
//! left behind by a crash) are invisible. `contributions` and
//! `own_contributions` are computed on demand ([`crate::computed`]), reading
//! materialised rows where `reptrace attribute` wrote them.
//!
//! Partitioned tables get their `layer` column (Utf8) from the manifest's
//! file entries, which equal the Hive `layer=<name>` directory: a table is a
//! `UNION ALL` view over one Parquet listing table per layer, each with the
//! layer as a constant column, so a filter on `layer` prunes whole layers at
//! planning time. A table with no committed files is registered empty with
//! its schema, so queries over it still plan.
use crate::computed::{ComputeOptions, ContributionsTable};
use crate::limits::Limits;
use crate::{Error, Result};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use datafusion::config::TableParquetOptions;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{MemTable, TableProvider, ViewTable, provider_as_source};
use datafusion::logical_expr::{LogicalPlanBuilder, col, lit};
use datafusion::prelude::{SessionConfig, SessionContext};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use reptrace_format::{Manifest, Table, col as c, schema, schema_as_of};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An opened run: its directory and manifest.
#[derive(Debug, Clone)]
pub struct Run {
    dir: PathBuf,
    manifest: Manifest,
}

/// Opens a run directory and reads its manifest.
pub fn open(run: &Path) -> Result<Run> {
    Run::open(run)
}

impl Run {
    /// Opens a run directory and reads its manifest.
    pub fn open(run: &Path) -> Result<Self> {
        let manifest = Manifest::open(run)?;
        let dir = std::fs::canonicalize(run).map_err(|e| Error::io(run, e))?;
        Ok(Self { dir, manifest })
    }

    /// The run directory (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest as read by [`Run::open`].
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Absolute path of a file given relative to the run.
    pub fn path(&self, rel: &str) -> PathBuf {
        Manifest::resolve(&self.dir, rel)
    }

    /// Re-reads the manifest from disk (after an attribution replaced it).
    pub fn reload(&mut self) -> Result<()> {
        self.manifest = Manifest::open(&self.dir)?;
        Ok(())
    }

    /// Committed files of `table`, grouped by layer (`None` for unpartitioned
    /// tables), in commit order.
    ///
    /// For `probes` these are the probes an analysis stands on
    /// ([`Manifest::analysis_probes`]): the final ones, or the checkpoint
    /// probes of the last commit of a run that did not finish.
    pub fn files_by_layer(&self, table: Table) -> BTreeMap<Option<String>, Vec<PathBuf>> {
        let mut out: BTreeMap<Option<String>, Vec<PathBuf>> = BTreeMap::new();
        let files = match table {
            Table::Probes => self
                .manifest
                .analysis_probes()
                .map(|a| a.files)
                .unwrap_or_default(),
            _ => self.manifest.files(table),
        };
        for f in files {
            let layer = if table.is_partitioned() {
                f.layer.clone()
            } else {
                None
            };
            out.entry(layer).or_default().push(self.path(&f.path));
        }
        out
    }

    /// The first committed file that cannot be read as part of its table:
    /// its footer is unreadable, or a column of the table is missing or has
    /// another type. A failed query over the run is explained by it, so that
    /// the user learns which file is at fault (DataFusion's own message does
    /// not name it).
    pub fn damaged_file(&self) -> Option<Error> {
        for table in Table::ALL {
            // Files of an older run lack the columns added since (readers fill them).
            let want = schema_as_of(table, self.manifest.dtype, self.manifest.format_version);
            for path in self.files_by_layer(table).into_values().flatten() {
                if let Err(e) = check_file(&path, &want) {
                    return Some(e);
                }
            }
        }
        None
    }

    /// `e`, or the damaged file that explains it when the failure came from
    /// reading the run's data.
    pub fn explain(&self, e: Error) -> Error {
        let reading = |m: &str| {
            ["Parquet error", "Arrow error", "IO error", "External error"]
                .iter()
                .any(|w| m.contains(w))
        };
        match e {
            Error::Sql(ref m) | Error::Query { message: ref m, .. } if reading(m) => {
                self.damaged_file().unwrap_or(e)
            }
            e => e,
        }
    }

    /// The Arrow schema of a table as SQL sees it (with `layer` for partitioned tables).
    pub fn sql_schema(&self, table: Table) -> SchemaRef {
        let file_schema = schema(table, self.manifest.dtype);
        if !table.is_partitioned() {
            return file_schema;
        }
        let mut fields: Vec<Field> = file_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(c::LAYER, DataType::Utf8, false));
        Arc::new(Schema::new(fields))
    }
}

/// A new context with every table of `run` registered (see [`register`]).
///
/// Parquet filter pushdown is on: the canned queries select one probe out of
/// hundreds, and decoding `probe_id` first and only the matching rows of the
/// other columns makes them 20–30 % faster on a 31 M-row `contributions`
/// table (`crates/analyze/benches/queries.rs`, docs/benchmarks.md).
pub fn context(run: &Run) -> Result<SessionContext> {
    context_with(run, &ComputeOptions::default())
}

/// [`context`] with the computed tables set up by `options`.
///
/// The memory limit and spill directory are the environment's, or the
/// default ([`Limits::from_env`]; a malformed variable is an error).
pub fn context_with(run: &Run, options: &ComputeOptions) -> Result<SessionContext> {
    context_limited(run, options, &Limits::from_env()?)
}

/// [`context_with`] under `limits`: the session's memory pool and spill
/// directory ([`crate::limits`]). Keep a [`crate::limits::SpillCleanup`] of
/// its runtime for as long as the query runs.
pub fn context_limited(
    run: &Run,
    options: &ComputeOptions,
    limits: &Limits,
) -> Result<SessionContext> {
    let mut config = SessionConfig::new();
    config.options_mut().execution.parquet.pushdown_filters = true;
    if limits.memory.is_some() {
        // Under a limit, one sort per ORDER BY rather than one per partition
        // and a merge: the per-partition sorts share the pool, and one whose
        // merge reservation comes after the others took their share fails
        // instead of spilling (12 of 24 sorts of 4.7 M rows under 32 MiB to
        // 512 MiB failed so, none unpartitioned).
        config.options_mut().optimizer.repartition_sorts = false;
    }
    config.options_mut().execution.sort_spill_reservation_bytes = limits.sort_spill_reservation();
    let ctx = SessionContext::new_with_config_rt(config, limits.runtime(run.dir())?);
    register_with(&ctx, run, options)?;
    Ok(ctx)
}

/// Registers every table of `run` on `ctx` under its name.
///
/// The Parquet reader settings (`datafusion.execution.parquet.*`) are taken
/// from `ctx`'s configuration as it is now.
pub fn register(ctx: &SessionContext, run: &Run) -> Result<()> {
    register_with(ctx, run, &ComputeOptions::default())
}

/// [`register`] with the computed tables set up by `options`.
pub fn register_with(ctx: &SessionContext, run: &Run, options: &ComputeOptions) -> Result<()> {
    // A `ParquetFormat` reads with its own options, not the session's: hand
    // it the session's so that its configuration applies to the run's tables.
    let parquet = ctx.state().table_options().parquet.clone();
    for table in Table::ALL {
        let provider: Arc<dyn TableProvider> = if table == Table::Contributions {
            Arc::new(ContributionsTable::new(run.clone(), options.clone()))
        } else {
            table_provider(run, table, &parquet)?
        };
        ctx.register_table(table.name(), provider)
            .map_err(Error::sql)?;
    }
    ctx.register_table(
        OWN_CONTRIBUTIONS,
        Arc::new(ContributionsTable::own(run.clone(), options.clone())),
    )
    .map_err(Error::sql)?;
    Ok(())
}

/// The SQL name of the computed self-influence rows.
pub const OWN_CONTRIBUTIONS: &str = "own_contributions";

/// A listing table over exactly `files` (absolute paths), read with `file_schema`.
pub(crate) fn listing(
    files: &[PathBuf],
    file_schema: SchemaRef,
    parquet: &TableParquetOptions,
) -> Result<ListingTable> {
    let urls = files
        .iter()
        .map(|p| {
            // From a URL rather than a path string, so that characters of the
            // run directory are never read as a glob.
            let url = url::Url::from_file_path(p).map_err(|()| Error::BadOption {
                option: "run directory",
                value: p.display().to_string(),
                why: "cannot be turned into a file URL".into(),
            })?;
            ListingTableUrl::try_new(url, None).map_err(Error::sql)
        })
        .collect::<Result<Vec<_>>>()?;
    let format = ParquetFormat::default().with_options(parquet.clone());
    let options = ListingOptions::new(Arc::new(format)).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(file_schema);
    ListingTable::try_new(config).map_err(Error::sql)
}

/// Whether `path` is a readable Parquet file with every column of `want`
/// (same name and type).
fn check_file(path: &Path, want: &Schema) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(path, e))?;
    let have = reader.schema();
    for field in want.fields() {
        let message = match have.field_with_name(field.name()) {
            Err(_) => "missing".to_owned(),
            Ok(f) if !f.data_type().equals_datatype(field.data_type()) => {
                format!("has type {}, expected {}", f.data_type(), field.data_type())
            }
            Ok(_) => continue,
        };
        return Err(Error::Column {
            path: path.to_path_buf(),
            column: field.name().clone(),
            message,
        });
    }
    Ok(())
}

fn table_provider(
    run: &Run,
    table: Table,
    parquet: &TableParquetOptions,
) -> Result<Arc<dyn TableProvider>> {
    let file_schema = schema(table, run.manifest.dtype);
    let sql_schema = run.sql_schema(table);
    let by_layer = run.files_by_layer(table);
    if by_layer.is_empty() {
        let empty = MemTable::try_new(sql_schema, vec![vec![]]).map_err(Error::sql)?;
        return Ok(Arc::new(empty));
    }
    if !table.is_partitioned() {
        let files: Vec<PathBuf> = by_layer.into_values().flatten().collect();
        return Ok(Arc::new(listing(&files, file_schema, parquet)?));
    }
    let mut plan: Option<LogicalPlanBuilder> = None;
    for (layer, files) in by_layer {
        let layer = layer.ok_or_else(|| Error::Incomplete {
            run: run.dir.clone(),
            message: format!("a committed {table} file has no layer in the manifest"),
        })?;
        let provider = Arc::new(listing(&files, Arc::clone(&file_schema), parquet)?);
        let mut exprs: Vec<_> = file_schema.fields().iter().map(|f| col(f.name())).collect();
        exprs.push(lit(layer).alias(c::LAYER));
        let branch = LogicalPlanBuilder::scan(table.name(), provider_as_source(provider), None)
            .and_then(|b| b.project(exprs))
            .and_then(|b| b.build())
            .map_err(Error::sql)?;
        plan = Some(match plan {
            None => LogicalPlanBuilder::from(branch),
            Some(b) => b.union(branch).map_err(Error::sql)?,
        });
    }
    let plan = plan
        .ok_or_else(|| Error::Internal("no layers".into()))?
        .build()
        .map_err(Error::sql)?;
    Ok(Arc::new(ViewTable::new(plan, None)))
}
