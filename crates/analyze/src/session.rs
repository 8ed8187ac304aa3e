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
use crate::run::listing;
pub use crate::run::{Run, open};
use crate::{Error, Result};
use datafusion::config::TableParquetOptions;
use datafusion::datasource::{MemTable, TableProvider, ViewTable, provider_as_source};
use datafusion::logical_expr::{LogicalPlanBuilder, col, lit};
use datafusion::prelude::{SessionConfig, SessionContext};
use reptrace_format::{Table, col as c, schema};
use std::path::PathBuf;
use std::sync::Arc;

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

fn table_provider(
    run: &Run,
    table: Table,
    parquet: &TableParquetOptions,
) -> Result<Arc<dyn TableProvider>> {
    let file_schema = schema(table, run.manifest().dtype);
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
            run: run.dir().to_path_buf(),
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
