//! `contributions` and `own_contributions` as tables computed on demand.
//!
//! A query over `contributions` needs no `reptrace attribute` step: the
//! [`ContributionsTable`] provider computes the rows a scan asks for from
//! `updates`, `probes` and the weights with the same arithmetic as
//! `attribute` (`attribution::compute_layer`), streaming record
//! batches, one partition per traced layer. The filters that matter are
//! pushed down into the computation ([`Request`]): `probe_id` (`=`, `IN`, `OR`
//! of them), `layer`, `step` ranges and `instance_id`; DataFusion applies
//! them again to the rows (they are *inexact*), so the provider only ever
//! computes less, never answers differently.
//!
//! Rows that `reptrace attribute` materialised (per step, every step, the
//! same weights) are a cache: for the probes and layers they hold, the
//! provider reads them instead of computing. A scan without a `probe_id`
//! filter that would compute more than [`ComputeOptions::max_rows`] rows is
//! refused with the count and how to narrow it.
//!
//! `own_contributions` has the same columns: each training-instance probe
//! with the records of its own instance only (the self-influence rows).
use crate::attribution::{Plan, StepRange, compute_layer};
use crate::probes::Probes;
use crate::records::{i64s, nullable, open_columns};
use crate::replay::{self, Setup};
use crate::run::Run;
use crate::{Error, Result};
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::DFSchema;
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, Operator, TableProviderFilterPushDown, col as dfcol, lit};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{Column, Literal};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::stream::RecordBatchReceiverStream;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::union::UnionExec;
use reptrace_format::{Aggregation, Table, col, schema};
use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The default of [`ComputeOptions::max_rows`].
pub const DEFAULT_MAX_ROWS: u64 = 20_000_000;

/// How the computed tables work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputeOptions {
    /// The most rows a scan of `contributions` without a `probe_id` filter
    /// may compute; beyond it the scan is refused.
    pub max_rows: u64,
    /// Read materialised rows where they exist (else always compute).
    pub use_materialised: bool,
    /// Approximate bytes for probe features and one batch of records.
    pub memory_budget: usize,
}

impl Default for ComputeOptions {
    fn default() -> Self {
        Self {
            max_rows: DEFAULT_MAX_ROWS,
            use_materialised: true,
            memory_budget: 256 << 20,
        }
    }
}

/// Where a scan's rows of one layer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Computed from the updates.
    Computed,
    /// Read from an attribution's files.
    Materialised,
}

/// One piece of work a scan did: the probes of one layer and where their
/// rows came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Work {
    /// The traced layer.
    pub layer: String,
    /// The probe ids whose rows the scan produced for it.
    pub probes: Vec<i64>,
    /// Whether those rows were computed or read from an attribution.
    pub source: Source,
    /// Whether the residual rows were computed.
    pub residual: bool,
}

/// What a scan asks for, from the filters pushed down to it. `None`: no
/// restriction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Only these probe ids (`probe_id = …`, `IN`, `OR`).
    pub probes: Option<BTreeSet<i64>>,
    /// Only these layers (`layer = …`, `IN`).
    pub layers: Option<BTreeSet<String>>,
    /// Only records of these steps (comparisons, `BETWEEN`, `IN` on `step`);
    /// the default: every step.
    pub steps: StepRange,
    /// Only records of these training instances (`instance_id = …`, `IN`).
    pub instances: Option<BTreeSet<i64>>,
    /// No residual rows (a filter rejects NULL steps or instances).
    pub records_only: bool,
    /// Only records with an instance (`instance_id IS NOT NULL` or a value).
    pub require_instance: bool,
}

impl Request {
    /// The request of a scan with these filters (the ones it does not
    /// understand restrict nothing).
    pub fn from_filters(filters: &[Expr]) -> Self {
        let mut r = Request::default();
        for f in filters {
            r.narrow(f);
        }
        r
    }

    /// Narrows the request by filter `e`; returns whether it understood it.
    fn narrow(&mut self, e: &Expr) -> bool {
        match e {
            Expr::BinaryExpr(b) if b.op == Operator::And => {
                let l = self.narrow(&b.left);
                let r = self.narrow(&b.right);
                l || r
            }
            Expr::IsNotNull(inner) => match column(inner) {
                Some(c) if c == col::STEP => {
                    self.records_only = true;
                    true
                }
                Some(c) if c == col::INSTANCE_ID => {
                    self.records_only = true;
                    self.require_instance = true;
                    true
                }
                _ => false,
            },
            Expr::Between(b) if !b.negated && column(&b.expr) == Some(col::STEP) => {
                match (int(&b.low), int(&b.high)) {
                    (Some(lo), Some(hi)) => {
                        self.step_bound(Operator::GtEq, lo);
                        self.step_bound(Operator::LtEq, hi);
                        true
                    }
                    _ => false,
                }
            }
            Expr::BinaryExpr(b)
                if matches!(
                    b.op,
                    Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq
                ) =>
            {
                let (c, v, op) = match (column(&b.left), int(&b.right), column(&b.right)) {
                    (Some(c), Some(v), _) => (c, v, b.op),
                    (None, _, Some(c)) => match (int(&b.left), b.op.swap()) {
                        (Some(v), Some(op)) => (c, v, op),
                        _ => return false,
                    },
                    _ => return false,
                };
                if c != col::STEP {
                    return false;
                }
                self.step_bound(op, v);
                true
            }
            _ => match values(e) {
                Some((c, vals)) if c == col::PROBE_ID => {
                    let ids = ints(&vals);
                    self.probes = Some(intersect(self.probes.take(), ids));
                    true
                }
                Some((c, vals)) if c == col::INSTANCE_ID => {
                    let ids = ints(&vals);
                    self.instances = Some(intersect(self.instances.take(), ids));
                    self.records_only = true;
                    self.require_instance = true;
                    true
                }
                Some((c, vals)) if c == col::STEP => {
                    let steps = ints(&vals);
                    if let (Some(lo), Some(hi)) = (steps.first(), steps.last()) {
                        self.step_bound(Operator::GtEq, *lo);
                        self.step_bound(Operator::LtEq, *hi);
                    } else {
                        // `step IN ()` cannot be written; an empty set means
                        // values of another type: nothing matches.
                        self.step_bound(Operator::Lt, i64::MIN);
                    }
                    true
                }
                Some((c, vals)) if c == col::LAYER => {
                    let names: BTreeSet<String> = vals
                        .iter()
                        .filter_map(|v| match v {
                            ScalarValue::Utf8(Some(s))
                            | ScalarValue::Utf8View(Some(s))
                            | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
                            _ => None,
                        })
                        .collect();
                    self.layers = Some(match self.layers.take() {
                        Some(old) => old.intersection(&names).cloned().collect(),
                        None => names,
                    });
                    true
                }
                _ => false,
            },
        }
    }

    fn step_bound(&mut self, op: Operator, v: i64) {
        self.records_only = true;
        let (lo, hi) = match op {
            Operator::Gt => (v.checked_add(1), None),
            Operator::GtEq => (Some(v), None),
            Operator::Lt => (None, Some(v.saturating_sub(1))),
            Operator::LtEq => (None, Some(v)),
            _ => (None, None),
        };
        if let Some(lo) = lo {
            self.steps.first = Some(self.steps.first.map_or(lo, |f| f.max(lo)));
        }
        if let Some(hi) = hi {
            self.steps.last = Some(self.steps.last.map_or(hi, |l| l.min(hi)));
        }
        if op == Operator::Gt && lo.is_none() {
            // step > i64::MAX: nothing.
            self.steps.first = Some(i64::MAX);
            self.steps.last = Some(i64::MIN);
        }
    }

    /// Whether the step range is empty.
    fn no_steps(&self) -> bool {
        matches!((self.steps.first, self.steps.last), (Some(a), Some(b)) if a > b)
    }
}

fn intersect(old: Option<BTreeSet<i64>>, new: BTreeSet<i64>) -> BTreeSet<i64> {
    match old {
        Some(old) => old.intersection(&new).copied().collect(),
        None => new,
    }
}

/// The column an expression names (through casts).
fn column(e: &Expr) -> Option<&str> {
    match e {
        Expr::Column(c) => Some(c.name.as_str()),
        Expr::Cast(c) => column(&c.expr),
        Expr::TryCast(c) => column(&c.expr),
        _ => None,
    }
}

/// A literal's value (through casts).
fn literal(e: &Expr) -> Option<&ScalarValue> {
    match e {
        Expr::Literal(v, _) => Some(v),
        Expr::Cast(c) => literal(&c.expr),
        Expr::TryCast(c) => literal(&c.expr),
        _ => None,
    }
}

/// A literal as an integer.
fn int(e: &Expr) -> Option<i64> {
    let v = literal(e)?.cast_to(&arrow_schema::DataType::Int64).ok()?;
    match v {
        ScalarValue::Int64(Some(x)) => Some(x),
        _ => None,
    }
}

/// `column = v`, `column IN (…)` and `OR`s of them on one column: the
/// column and the values it may take.
fn values(e: &Expr) -> Option<(&str, Vec<ScalarValue>)> {
    match e {
        Expr::BinaryExpr(b) if b.op == Operator::Eq => match (column(&b.left), literal(&b.right)) {
            (Some(c), Some(v)) => Some((c, vec![v.clone()])),
            _ => match (literal(&b.left), column(&b.right)) {
                (Some(v), Some(c)) => Some((c, vec![v.clone()])),
                _ => None,
            },
        },
        Expr::InList(l) if !l.negated => {
            let c = column(&l.expr)?;
            let vals = l
                .list
                .iter()
                .map(|x| literal(x).cloned())
                .collect::<Option<Vec<_>>>()?;
            Some((c, vals))
        }
        Expr::BinaryExpr(b) if b.op == Operator::Or => {
            let (lc, mut lv) = values(&b.left)?;
            let (rc, rv) = values(&b.right)?;
            (lc == rc).then(|| {
                lv.extend(rv);
                (lc, lv)
            })
        }
        _ => None,
    }
}

/// Integer values (others, such as NULL, match no row).
fn ints(vals: &[ScalarValue]) -> BTreeSet<i64> {
    vals.iter()
        .filter_map(|v| match v.cast_to(&arrow_schema::DataType::Int64) {
            Ok(ScalarValue::Int64(Some(x))) => Some(x),
            _ => None,
        })
        .collect()
}

/// `contributions` (or `own_contributions`) of a run, computed on demand.
#[derive(Debug, Clone)]
pub struct ContributionsTable {
    inner: Arc<Inner>,
}

struct Inner {
    run: Run,
    /// The SQL schema: the `contributions` columns and `layer`.
    schema: SchemaRef,
    /// `own_contributions`: each probe with its own instance's records.
    own: bool,
    options: ComputeOptions,
    setup: Mutex<Option<Arc<Setup>>>,
    log: Mutex<Vec<Work>>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContributionsTable")
            .field("run", &self.run.dir())
            .field("own", &self.own)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Materialised files of one layer and the probes to read from them.
type Cached = (Vec<PathBuf>, BTreeSet<i64>);

/// One layer's share of a scan.
#[derive(Debug, Clone)]
struct LayerWork {
    layer: String,
    /// Probes to compute.
    computed: Vec<i64>,
    /// Probes to read from materialised files.
    cached: Vec<Cached>,
    plan: Plan,
}

impl ContributionsTable {
    /// The `contributions` table of `run`.
    pub fn new(run: Run, options: ComputeOptions) -> Self {
        Self::build(run, options, false)
    }

    /// The `own_contributions` table of `run`.
    pub fn own(run: Run, options: ComputeOptions) -> Self {
        Self::build(run, options, true)
    }

    fn build(run: Run, options: ComputeOptions, own: bool) -> Self {
        let schema = run.sql_schema(Table::Contributions);
        Self {
            inner: Arc::new(Inner {
                run,
                schema,
                own,
                options,
                setup: Mutex::new(None),
                log: Mutex::new(Vec::new()),
            }),
        }
    }

    /// What the scans so far did, in order.
    pub fn work(&self) -> Vec<Work> {
        self.inner.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The layers and probes a scan with `request` computes or reads.
    fn plan(&self, req: &Request) -> Result<Vec<LayerWork>> {
        let inner = &self.inner;
        let run = &inner.run;
        let m = run.manifest();
        if req.no_steps() || req.probes.as_ref().is_some_and(BTreeSet::is_empty) {
            return Ok(Vec::new());
        }
        let probe_files = run.files_by_layer(Table::Probes);
        let mut out = Vec::new();
        let mut estimate = (0u64, 0u64, 0usize); // rows, records, probes
        for layer in m.model.traced_layers() {
            let name = layer.name();
            if req.layers.as_ref().is_some_and(|l| !l.contains(name)) {
                continue;
            }
            let Some(files) = probe_files.get(&Some(name.to_owned())) else {
                continue;
            };
            let mut ids = Vec::new();
            for (id, instance) in probe_ids(files)? {
                let wanted = req.probes.as_ref().is_none_or(|p| p.contains(&id));
                let own_ok = !inner.own || instance.is_some();
                if wanted && own_ok {
                    ids.push(id);
                }
            }
            if ids.is_empty() {
                continue;
            }
            let plan = Plan {
                steps: (req.steps != StepRange::default()).then_some(req.steps),
                instances: req
                    .instances
                    .as_ref()
                    .map(|s| s.iter().copied().collect::<HashSet<i64>>()),
                require_instance: req.require_instance || inner.own,
                self_only: inner.own,
                residual: !req.records_only && !inner.own,
                memory_budget: inner.options.memory_budget,
                batch_rows: None,
            };
            let (computed, cached) = if inner.own || !inner.options.use_materialised {
                (ids, Vec::new())
            } else {
                self.split_cached(name, ids)
            };
            let records = replay::update_rows(run, name);
            estimate.0 += computed.len() as u64 * (records + u64::from(plan.residual));
            estimate.1 += records;
            estimate.2 = estimate.2.max(computed.len());
            out.push(LayerWork {
                layer: name.to_owned(),
                computed,
                cached,
                plan,
            });
        }
        if req.probes.is_none() && !inner.own && estimate.0 > inner.options.max_rows {
            return Err(Error::TooManyRows {
                rows: estimate.0,
                probes: estimate.2,
                records: estimate.1,
                layers: out.len(),
                max: inner.options.max_rows,
            });
        }
        Ok(out)
    }

    /// Splits a layer's probe ids into those to compute and those that a
    /// materialised attribution holds (the newest one that holds them).
    fn split_cached(&self, layer: &str, ids: Vec<i64>) -> (Vec<i64>, Vec<Cached>) {
        let run = &self.inner.run;
        let m = run.manifest();
        let as_of = m.analysis_probes().and_then(|a| a.step);
        let usable: Vec<_> = m
            .attributions
            .iter()
            .rev()
            .filter(|a| {
                a.by == Aggregation::Step
                    && a.steps.is_none()
                    && !a.self_only
                    && a.as_of_step == as_of
                    && a.layers.iter().any(|l| l == layer)
            })
            .collect();
        let mut computed = Vec::new();
        let mut cached: Vec<Cached> = Vec::new();
        for id in ids {
            let Some(k) = usable.iter().position(|a| a.has_probe(id)) else {
                computed.push(id);
                continue;
            };
            let files: Vec<PathBuf> = usable[k]
                .files
                .iter()
                .filter(|f| f.layer.as_deref() == Some(layer))
                .map(|f| run.path(&f.path))
                .collect();
            match cached.iter_mut().find(|(f, _)| *f == files) {
                Some((_, set)) => {
                    set.insert(id);
                }
                None => cached.push((files, BTreeSet::from([id]))),
            }
        }
        (computed, cached)
    }

    fn setup(&self) -> Result<Arc<Setup>> {
        setup(&self.inner)
    }
}

fn setup(inner: &Inner) -> Result<Arc<Setup>> {
    let mut slot = inner
        .setup
        .lock()
        .map_err(|_| Error::Internal("setup lock poisoned".into()))?;
    if let Some(s) = slot.as_ref() {
        return Ok(Arc::clone(s));
    }
    let s = Arc::new(Setup::load(&inner.run)?);
    *slot = Some(Arc::clone(&s));
    Ok(s)
}

/// `(probe_id, instance_id)` of every probe in `files`.
fn probe_ids(files: &[PathBuf]) -> Result<Vec<(i64, Option<i64>)>> {
    let mut out = Vec::new();
    for path in files {
        for batch in open_columns(path, &[col::PROBE_ID, col::INSTANCE_ID], 65_536)? {
            let batch = batch.map_err(|e| Error::parquet(path, e.into()))?;
            let ids = i64s(&batch, path, col::PROBE_ID)?;
            let inst = nullable::<arrow::datatypes::Int64Type>(&batch, path, col::INSTANCE_ID)?;
            out.extend(ids.into_iter().zip(inst));
        }
    }
    Ok(out)
}

fn external(e: Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

#[async_trait]
impl TableProvider for ContributionsTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.inner.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| {
                if Request::default().narrow(f) {
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let req = Request::from_filters(filters);
        let work = self.plan(&req).map_err(external)?;
        if work.iter().any(|w| !w.computed.is_empty()) {
            // Fails here, at planning, for a run that has no trained weights.
            self.setup().map_err(external)?;
        }
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        // Materialised rows: DataFusion's Parquet scan of the files, the
        // filters pushed into it, the probes' rows kept, `layer` added.
        for w in &work {
            for (files, ids) in &w.cached {
                log(
                    &self.inner,
                    &w.layer,
                    ids.iter().copied().collect(),
                    Source::Materialised,
                    false,
                );
                inputs.push(
                    self.materialised(state, &w.layer, files, ids, projection, filters)
                        .await?,
                );
            }
        }
        // Computed rows: one partition per layer.
        let partitions: Vec<Arc<dyn PartitionStream>> = work
            .into_iter()
            .filter(|w| !w.computed.is_empty())
            .map(|w| {
                Arc::new(LayerStream {
                    inner: Arc::clone(&self.inner),
                    work: Some(w),
                }) as Arc<dyn PartitionStream>
            })
            .collect();
        if !partitions.is_empty() || inputs.is_empty() {
            let partitions = if partitions.is_empty() {
                vec![Arc::new(LayerStream {
                    inner: Arc::clone(&self.inner),
                    work: None,
                }) as Arc<dyn PartitionStream>]
            } else {
                partitions
            };
            inputs.push(Arc::new(StreamingTableExec::try_new(
                Arc::clone(&self.inner.schema),
                partitions,
                projection,
                Vec::new(),
                false,
                limit,
            )?));
        }
        UnionExec::try_new(inputs)
    }
}

impl ContributionsTable {
    /// The rows of `ids` in materialised `files` of `layer`, projected like
    /// the table.
    async fn materialised(
        &self,
        state: &dyn Session,
        layer: &str,
        files: &[PathBuf],
        ids: &BTreeSet<i64>,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let run = &self.inner.run;
        let file_schema = schema(Table::Contributions, run.manifest().dtype);
        let parquet = state.table_options().parquet.clone();
        let listing =
            crate::run::listing(files, Arc::clone(&file_schema), &parquet).map_err(external)?;
        let probes = dfcol(col::PROBE_ID).in_list(ids.iter().map(|&i| lit(i)).collect(), false);
        let mut pushed = vec![probes.clone()];
        pushed.extend(
            filters
                .iter()
                .filter(|f| !f.column_refs().iter().any(|c| c.name == col::LAYER))
                .cloned(),
        );
        let scan = listing.scan(state, None, &pushed, None).await?;
        let df_schema = DFSchema::try_from(file_schema.as_ref().clone())?;
        let keep = state.create_physical_expr(probes, &df_schema)?;
        let kept: Arc<dyn ExecutionPlan> = Arc::new(FilterExec::try_new(keep, scan)?);
        let table = &self.inner.schema;
        let columns: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..table.fields().len()).collect());
        let mut exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = Vec::new();
        for i in columns {
            let name = table.field(i).name().clone();
            let expr: Arc<dyn PhysicalExpr> = if name == col::LAYER {
                Arc::new(Literal::new(ScalarValue::Utf8(Some(layer.to_owned()))))
            } else {
                Arc::new(Column::new(&name, file_schema.index_of(&name)?))
            };
            exprs.push((expr, name));
        }
        Ok(Arc::new(ProjectionExec::try_new(exprs, kept)?))
    }
}

/// One layer's rows of a scan.
#[derive(Debug)]
struct LayerStream {
    inner: Arc<Inner>,
    /// `None`: no rows.
    work: Option<LayerWork>,
}

impl PartitionStream for LayerStream {
    fn schema(&self) -> &SchemaRef {
        &self.inner.schema
    }

    fn execute(&self, ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let mut builder = RecordBatchReceiverStream::builder(Arc::clone(&self.inner.schema), 2);
        if let Some(mut work) = self.work.clone() {
            let tx = builder.tx();
            let inner = Arc::clone(&self.inner);
            let pool = Arc::clone(ctx.memory_pool());
            builder.spawn_blocking(move || {
                // The arithmetic's working memory comes out of the query's
                // pool, so that the memory limit bounds it too.
                let reservation = reserve(&pool, &work.layer, work.plan.memory_budget)?;
                work.plan.memory_budget = reservation.size();
                let mut send = |batch: RecordBatch| -> Result<()> {
                    tx.blocking_send(Ok(batch))
                        .map_err(|_| Error::Internal("the query stopped reading".into()))
                };
                let done = match produce(&inner, &work, &mut send) {
                    Ok(()) => Ok(()),
                    // The consumer is gone (a LIMIT was met, or the query
                    // was cancelled): nothing to report.
                    Err(_) if tx.is_closed() => Ok(()),
                    Err(e) => Err(external(e)),
                };
                drop(reservation);
                done
            });
        }
        builder.build()
    }
}

/// The smallest working memory the arithmetic of one layer is given (less
/// under a small limit: a thirty-second of it).
const MIN_BUDGET: usize = 4 << 20;

/// Reserves the working memory of one layer's arithmetic from the query's
/// pool: `budget`, or an eighth of a bounded pool if that is less, or what
/// the pool can still give down to [`MIN_BUDGET`] (a thirty-second of a
/// pool smaller than 128 MiB, so that the layers a query reads at once leave
/// room for the rest of it).
fn reserve(
    pool: &Arc<dyn MemoryPool>,
    layer: &str,
    budget: usize,
) -> datafusion::error::Result<MemoryReservation> {
    let (want, least) = match pool.memory_limit() {
        MemoryLimit::Finite(limit) => (budget.min(limit / 8), MIN_BUDGET.min(limit / 32)),
        MemoryLimit::Infinite | MemoryLimit::Unknown => (budget, MIN_BUDGET),
    };
    let mut want = want.max(least);
    let reservation =
        MemoryConsumer::new(format!("contributions of {layer} (computed)")).register(pool);
    loop {
        match reservation.try_grow(want) {
            Ok(()) => return Ok(reservation),
            Err(e) if want <= least => return Err(e),
            Err(_) => want = (want / 2).max(least),
        }
    }
}

/// Computes one layer's rows into `send`.
fn produce(
    inner: &Inner,
    work: &LayerWork,
    send: &mut dyn FnMut(RecordBatch) -> Result<()>,
) -> Result<()> {
    let run = &inner.run;
    let layer = run
        .manifest()
        .model
        .traced_layer(&work.layer)
        .ok_or_else(|| Error::Internal(format!("layer {} vanished", work.layer)))?;
    let with_layer = |batch: RecordBatch| -> Result<RecordBatch> {
        let n = batch.num_rows();
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        columns.push(Arc::new(StringArray::from(vec![work.layer.as_str(); n])));
        RecordBatch::try_new(Arc::clone(&inner.schema), columns)
            .map_err(|e| Error::Internal(format!("contributions batch: {e}")))
    };
    if work.computed.is_empty() {
        return Ok(());
    }
    let setup = setup(inner)?;
    let all = Probes::read(run, &layer)?;
    let wanted: HashSet<i64> = work.computed.iter().copied().collect();
    let rows: Vec<usize> = (0..all.len())
        .filter(|&i| wanted.contains(&all.probe_id[i]))
        .collect();
    let probes = all.select(&rows);
    log(
        inner,
        &work.layer,
        probes.probe_id.clone(),
        Source::Computed,
        work.plan.residual,
    );
    let mut sink = |batch: RecordBatch| send(with_layer(batch)?);
    compute_layer(
        run,
        &layer,
        &setup,
        &probes,
        &work.plan,
        &mut sink,
        &mut |_, _, _| {},
    )?;
    Ok(())
}

fn log(inner: &Inner, layer: &str, probes: Vec<i64>, source: Source, residual: bool) {
    if let Ok(mut l) = inner.log.lock() {
        l.push(Work {
            layer: layer.to_owned(),
            probes,
            source,
            residual,
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use datafusion::logical_expr::{col as c, lit};

    fn req(e: Expr) -> (Request, bool) {
        let mut r = Request::default();
        let ok = r.narrow(&e);
        (r, ok)
    }

    #[test]
    fn probe_filters_narrow_the_probes() {
        let (r, ok) = req(c("probe_id").eq(lit(3i64)));
        assert!(ok);
        assert_eq!(r.probes, Some(BTreeSet::from([3])));
        assert!(!r.records_only, "the residual row has the probe id too");
        let (r, _) = req(c("probe_id").in_list(vec![lit(1i64), lit(5i64)], false));
        assert_eq!(r.probes, Some(BTreeSet::from([1, 5])));
        let (r, _) = req(c("probe_id").eq(lit(1i64)).or(c("probe_id").eq(lit(2i64))));
        assert_eq!(r.probes, Some(BTreeSet::from([1, 2])));
        // AND of two probe filters: their intersection.
        let (r, _) = req(c("probe_id")
            .in_list(vec![lit(1i64), lit(2i64)], false)
            .and(c("probe_id").eq(lit(2i64))));
        assert_eq!(r.probes, Some(BTreeSet::from([2])));
    }

    #[test]
    fn filters_it_cannot_use_restrict_nothing() {
        for e in [
            c("probe_id").in_list(vec![lit(1i64)], true),
            c("probe_id").eq(lit(1i64)).or(c("step").eq(lit(2i64))),
            c("probe_id").gt(lit(3i64)),
            c("dot").gt(lit(0.0)),
            c("instance_id").is_null(),
        ] {
            let (r, ok) = req(e.clone());
            assert!(!ok, "{e}");
            assert_eq!(r, Request::default(), "{e}");
        }
    }

    #[test]
    fn step_and_instance_filters_drop_the_residual() {
        let (r, ok) = req(c("step").gt_eq(lit(10i64)).and(c("step").lt(lit(20i64))));
        assert!(ok);
        assert_eq!(
            r.steps,
            StepRange {
                first: Some(10),
                last: Some(19)
            }
        );
        assert!(r.records_only);
        let (r, _) = req(lit(5i64).lt(c("step")));
        assert_eq!(r.steps.first, Some(6));
        let (r, _) = req(c("step").between(lit(3i64), lit(4i64)));
        assert_eq!((r.steps.first, r.steps.last), (Some(3), Some(4)));
        let (r, _) = req(c("instance_id").is_not_null());
        assert!(r.records_only && r.require_instance && r.instances.is_none());
        let (r, _) = req(c("instance_id").eq(lit(7i64)));
        assert_eq!(r.instances, Some(BTreeSet::from([7])));
        let (r, _) = req(c("step").gt(lit(5i64)).and(c("step").lt(lit(3i64))));
        assert!(r.no_steps());
    }

    #[test]
    fn layer_filters_name_layers() {
        let (r, ok) = req(c("layer").eq(lit("fc2")));
        assert!(ok);
        assert_eq!(r.layers, Some(BTreeSet::from(["fc2".to_owned()])));
        assert!(!r.records_only);
    }
}
