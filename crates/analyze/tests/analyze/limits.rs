//! Queries under the session's memory limit ([`Limits::runtime`]).
use datafusion::arrow::array::Int64Array;
use datafusion::arrow::compute::concat_batches;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::prelude::{SessionConfig, SessionContext};
use reptrace_analyze::limits::Limits;
use std::sync::Arc;
use std::time::Duration;

const ROWS: usize = 160_000;
const PARTITIONS: usize = 8;

/// `(g, n)` of `SELECT g, count(DISTINCT trace_id) … GROUP BY g` over
/// [`ROWS`] generated rows on [`PARTITIONS`] partitions in 64-row batches,
/// sorted by `g`, and how often its `RepartitionExec`s spilled.
async fn distinct_per_group(
    runtime: Arc<RuntimeEnv>,
) -> datafusion::error::Result<(Vec<(i64, i64)>, usize)> {
    let config = SessionConfig::new()
        .with_target_partitions(PARTITIONS)
        .with_batch_size(64);
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .build();
    let ctx = SessionContext::new_with_state(state);
    ctx.sql(&format!(
        "CREATE TABLE events AS SELECT v % 13 AS g, \
         CASE WHEN v % 29 = 0 THEN NULL \
         ELSE arrow_cast(repeat(CAST(v % 337 * 2654435761 AS VARCHAR), 3), 'Utf8View') END \
         AS trace_id FROM generate_series(1, {ROWS}) AS t(v)"
    ))
    .await?
    .collect()
    .await?;
    let plan = ctx
        .sql("SELECT g, count(DISTINCT trace_id) AS n FROM events GROUP BY g")
        .await?
        .create_physical_plan()
        .await?;
    let batches = collect(Arc::clone(&plan), ctx.task_ctx()).await?;
    let mut spills = 0;
    plan.apply(|node: &Arc<dyn ExecutionPlan>| {
        if node.name() == "RepartitionExec" {
            spills += node.metrics().and_then(|m| m.spill_count()).unwrap_or(0);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let all = concat_batches(&plan.schema(), &batches)?;
    let column = |k: usize| {
        all.column(k)
            .as_any()
            .downcast_ref::<Int64Array>()
            .map(|a| a.values().to_vec())
            .unwrap_or_default()
    };
    let mut pairs: Vec<(i64, i64)> = column(0).into_iter().zip(column(1)).collect();
    pairs.sort_unstable();
    Ok((pairs, spills))
}

/// DataFusion 55.2's `RepartitionExec` deadlocks when two of its input
/// tasks spill into one output partition's spill pool at once
/// (apache/datafusion#24883): every worker waits and the query never
/// answers. A grouped `count(DISTINCT …)` on 8 partitions under the
/// smallest limit hung in 7 and 8 of 12 attempts on the session's pool
/// before it stopped `RepartitionExec` from spilling; now it answers in
/// each of 12 attempts, the same as without a limit. The same query on
/// DataFusion's own pool of that size reaches `RepartitionExec`'s spill
/// path (it spills, or hangs), so the limit is tight enough to test it.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn a_repartition_under_a_small_limit_answers_every_time() {
    let elsewhere = tempfile::tempdir().unwrap();
    let unlimited = Limits::unlimited().runtime(elsewhere.path()).unwrap();
    let (want, _) = distinct_per_group(unlimited).await.unwrap();
    assert_eq!(want.len(), 13);
    let limits = Limits::unlimited()
        .with_memory_text("16MiB", "--memory-limit")
        .unwrap();
    let limit = Duration::from_secs(20);
    for attempt in 0..12 {
        let runtime = limits.runtime(elsewhere.path()).unwrap();
        let Ok(answer) = tokio::time::timeout(limit, distinct_per_group(runtime)).await else {
            panic!("attempt {attempt}: no answer in {limit:?} (RepartitionExec's spill deadlock)")
        };
        let (got, spills) = answer.unwrap();
        assert_eq!(got, want, "attempt {attempt}");
        assert_eq!(spills, 0, "attempt {attempt}: RepartitionExec spilled");
    }
    let plain = || {
        RuntimeEnvBuilder::new()
            .with_disk_manager_builder(
                DiskManagerBuilder::default()
                    .with_mode(DiskManagerMode::Directories(vec![elsewhere.path().into()])),
            )
            .with_memory_pool(Arc::new(FairSpillPool::new(16 << 20)))
            .build_arc()
            .unwrap()
    };
    let mut reached = false;
    for _ in 0..4 {
        reached |=
            match tokio::time::timeout(Duration::from_secs(5), distinct_per_group(plain())).await {
                Err(_) => true, // hung: the deadlock itself
                Ok(answer) => answer.unwrap().1 > 0,
            };
    }
    assert!(
        reached,
        "DataFusion's own pool of 16 MiB never made RepartitionExec spill"
    );
}
