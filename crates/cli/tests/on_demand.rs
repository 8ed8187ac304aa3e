//! `contributions` computed on demand, on real digits training runs (MLP and
//! CNN, SGD with momentum and weight decay): every canned query returns what
//! it returns on materialised rows, filters reach the arithmetic, the dots of
//! a probe sum to ‖p‖² without any `reptrace attribute`, attributions add up
//! instead of replacing each other, and the per-instance sums match.
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use reptrace_analyze::computed::{Source, Work};
use reptrace_analyze::query::Query;
use reptrace_analyze::{ComputeOptions, ContributionsTable, Run};
use reptrace_format::{Aggregation, Manifest};
use reptrace_testkit::cli::{Cli, assert_one_line_error};
use reptrace_testkit::digits::Digits;
use std::collections::BTreeMap;
use std::path::Path;

fn cli() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_reptrace"))
}

/// A digits run: two epochs, momentum 0.9, weight decay, every example a
/// probe (so that some probes are training instances), at `dir/model`.
fn train(dir: &Path, model: &str) -> std::path::PathBuf {
    let digits = Digits::new().model(model).epochs(2).batch(64).probes("all");
    let digits = digits.flags(&[
        "--lr",
        "0.05",
        "--momentum",
        "0.9",
        "--weight-decay",
        "0.001",
    ]);
    digits.train(&cli(), dir.join(model))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A context on `run` and its `contributions` provider.
fn context(
    run: &Run,
    use_materialised: bool,
) -> (
    reptrace_analyze::datafusion::prelude::SessionContext,
    ContributionsTable,
) {
    let options = ComputeOptions {
        use_materialised,
        ..ComputeOptions::default()
    };
    let ctx = reptrace_analyze::context_with(run, &options).unwrap();
    let provider = rt().block_on(ctx.table_provider("contributions")).unwrap();
    let table = (provider.as_ref() as &dyn std::any::Any)
        .downcast_ref::<ContributionsTable>()
        .expect("contributions is the computed table")
        .clone();
    (ctx, table)
}

/// Every cell of a result as text, floats as f64 (for a tolerance).
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Text(String),
    Float(f64),
}

fn cells(batches: &[RecordBatch]) -> Vec<Vec<Cell>> {
    let mut out = Vec::new();
    for b in batches {
        let columns: Vec<Vec<Cell>> = b
            .columns()
            .iter()
            .map(|c| {
                if c.data_type() == &DataType::Float64 {
                    let f = c.as_primitive::<Float64Type>();
                    (0..f.len())
                        .map(|i| {
                            if f.is_null(i) {
                                Cell::Text("NULL".into())
                            } else {
                                Cell::Float(f.value(i))
                            }
                        })
                        .collect()
                } else {
                    let s = arrow::compute::cast(c, &DataType::Utf8).unwrap();
                    let s = s.as_string::<i32>();
                    (0..s.len())
                        .map(|i| Cell::Text(if s.is_null(i) { "NULL" } else { s.value(i) }.into()))
                        .collect()
                }
            })
            .collect();
        for r in 0..b.num_rows() {
            out.push(columns.iter().map(|c| c[r].clone()).collect());
        }
    }
    out
}

fn assert_same(a: &[Vec<Cell>], b: &[Vec<Cell>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: row count");
    for (i, (ra, rb)) in a.iter().zip(b).enumerate() {
        for (ca, cb) in ra.iter().zip(rb) {
            match (ca, cb) {
                (Cell::Float(x), Cell::Float(y)) => assert!(
                    (x - y).abs() <= 1e-12 * (1.0 + x.abs().max(y.abs())),
                    "{what}: row {i}: {x} vs {y}"
                ),
                _ => assert_eq!(ca, cb, "{what}: row {i}"),
            }
        }
    }
}

fn probe_ids(ctx: &reptrace_analyze::datafusion::prelude::SessionContext, train: bool) -> Vec<i64> {
    let cond = if train { "IS NOT NULL" } else { "IS NULL" };
    let (_, b) = rt()
        .block_on(reptrace_analyze::sql::run(
            ctx,
            &format!(
                "SELECT DISTINCT probe_id FROM probes WHERE instance_id {cond} ORDER BY probe_id"
            ),
        ))
        .unwrap();
    b.iter()
        .flat_map(|b| {
            let c = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
            c.values().to_vec()
        })
        .collect()
}

/// The cells of `q` run on `ctx`.
fn sql_cells(
    ctx: &reptrace_analyze::datafusion::prelude::SessionContext,
    q: &str,
) -> Vec<Vec<Cell>> {
    cells(&rt().block_on(reptrace_analyze::sql::run(ctx, q)).unwrap().1)
}

fn only(work: &[Work], source: Source) -> bool {
    !work.is_empty() && work.iter().all(|w| w.source == source)
}

fn computed_equals_materialised(model: &str) {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = train(dir.path(), model);
    let run = Run::open(&run_dir).unwrap();
    let (ctx, _) = context(&run, false);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
    let test = probe_ids(&ctx, false);
    let train_ids = probe_ids(&ctx, true);
    let mut chosen: Vec<i64> = test.choose_multiple(&mut rng, 2).copied().collect();
    chosen.extend(train_ids.choose_multiple(&mut rng, 1).copied());
    chosen.sort_unstable();
    let traced: Vec<String> = run
        .manifest()
        .model
        .traced_layers()
        .map(|l| l.name().to_owned())
        .collect();

    // Right after training: no attribution, the canned queries answer.
    let mut before: BTreeMap<(String, i64), Vec<Vec<Cell>>> = BTreeMap::new();
    let queries: Vec<Query> = Query::builtins()
        .unwrap()
        .into_iter()
        .filter(|q| q.name != "batch_member_influence" && q.name != "self_influence")
        // The questions about one probe (not the training-dynamics ones).
        .filter(|q| q.params.iter().any(|p| p.name == "probe"))
        .collect();
    assert!(queries.len() >= 7);
    for &probe in &chosen {
        for q in &queries {
            let (ctx, table) = context(&run, false);
            let p = probe.to_string();
            let (_, b) = rt().block_on(q.run(&ctx, &[("probe", &p)])).unwrap();
            assert!(
                b.iter().map(RecordBatch::num_rows).sum::<usize>() > 0,
                "{model} {} probe {probe}: empty right after training",
                q.name
            );
            let work = table.work();
            assert!(only(&work, Source::Computed), "{work:?}");
            // Pushed down: only this probe was computed, once per layer.
            assert!(
                work.iter().all(|w| w.probes == [probe]),
                "{} probe {probe}: {work:?}",
                q.name
            );
            before.insert((q.name.clone(), probe), cells(&b));
        }
    }

    // Materialise them (two attributions: the second keeps the first).
    let ids = |v: &[i64]| {
        format!(
            "ids:{}",
            v.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
        )
    };
    let r = run_dir.to_str().unwrap();
    cli().ok(&["attribute", r, "--probes", &ids(&chosen[..1]), "-q"]);
    cli().ok(&["attribute", r, "--probes", &ids(&chosen[1..]), "-q"]);
    let m = Manifest::load(&run_dir).unwrap();
    assert_eq!(
        m.attributions.len(),
        2,
        "the second attribution kept the first"
    );
    let run = Run::open(&run_dir).unwrap();
    for &probe in &chosen {
        for q in &queries {
            let (ctx, table) = context(&run, true);
            let p = probe.to_string();
            let (_, b) = rt().block_on(q.run(&ctx, &[("probe", &p)])).unwrap();
            let work = table.work();
            assert!(
                only(&work, Source::Materialised),
                "{} probe {probe} read from the attribution: {work:?}",
                q.name
            );
            assert_same(
                &before[&(q.name.clone(), probe)],
                &cells(&b),
                &format!("{model} {} probe {probe}", q.name),
            );
        }
    }

    // self_influence (own_contributions) against the materialised rows of
    // the training probe, filtered to its own instance.
    let train_probe = chosen
        .iter()
        .copied()
        .find(|p| train_ids.contains(p))
        .unwrap();
    let (ctx, _) = context(&run, true);
    let sql_own = format!(
        "SELECT o.layer, SUM(o.dot) AS s, COUNT(*) AS n FROM own_contributions o \
         WHERE o.probe_id = {train_probe} GROUP BY o.layer ORDER BY o.layer"
    );
    let sql_mat = format!(
        "SELECT c.layer, SUM(c.dot) AS s, COUNT(*) AS n FROM contributions c \
         JOIN probes p ON p.layer = c.layer AND p.probe_id = c.probe_id \
         WHERE c.probe_id = {train_probe} AND c.instance_id = p.instance_id \
         GROUP BY c.layer ORDER BY c.layer"
    );
    let own = rt()
        .block_on(reptrace_analyze::sql::run(&ctx, &sql_own))
        .unwrap()
        .1;
    let mat = rt()
        .block_on(reptrace_analyze::sql::run(&ctx, &sql_mat))
        .unwrap()
        .1;
    assert_eq!(cells(&own).len(), traced.len());
    assert_same(&cells(&own), &cells(&mat), "own_contributions");
    // The canned query runs too (every training probe, one pass per layer).
    let (_, b) = rt()
        .block_on(
            Query::resolve("self_influence")
                .unwrap()
                .run(&ctx, &[("k", "3")]),
        )
        .unwrap();
    // Both tails (memorised, self-opposed), k each, per layer.
    assert_eq!(cells(&b).len(), 2 * 3 * traced.len());
}

#[test]
fn mlp_canned_queries_computed_equal_materialised() {
    computed_equals_materialised("mlp");
}

#[test]
fn cnn_canned_queries_computed_equal_materialised() {
    computed_equals_materialised("cnn");
}

/// Without any attribution, on a real run: the dots of each probe (residual
/// included) sum to ‖p‖² in every layer; a layer filter computes only that
/// layer, a step filter drops the residual, an instance filter keeps only
/// that instance's records, and a scan without a probe filter over too many
/// rows is refused with a message that says how to narrow it.
#[test]
fn filters_reach_the_arithmetic_and_completeness_holds() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = train(dir.path(), "mlp");
    let run = Run::open(&run_dir).unwrap();
    let (ctx, _) = context(&run, false);
    let probe = probe_ids(&ctx, false)[7];
    let sql = |ctx: &reptrace_analyze::datafusion::prelude::SessionContext, q: &str| {
        rt().block_on(reptrace_analyze::sql::run(ctx, q)).unwrap().1
    };

    let (ctx, table) = context(&run, false);
    let b = sql(
        &ctx,
        &format!(
            "SELECT c.layer, SUM(c.dot) / MAX(p.p_norm * p.p_norm) AS share FROM contributions c \
             JOIN probes p ON p.layer = c.layer AND p.probe_id = c.probe_id \
             WHERE c.probe_id = {probe} GROUP BY c.layer ORDER BY c.layer"
        ),
    );
    let rows = cells(&b);
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let Cell::Float(share) = r[1] else { panic!() };
        assert!((share - 1.0).abs() < 1e-6, "{r:?}");
    }
    assert!(
        table
            .work()
            .iter()
            .all(|w| w.residual && w.probes == [probe])
    );

    let (ctx, table) = context(&run, false);
    sql(
        &ctx,
        &format!("SELECT SUM(dot) FROM contributions WHERE probe_id = {probe} AND layer = 'fc2'"),
    );
    let work = table.work();
    assert_eq!(work.len(), 1, "{work:?}");
    assert_eq!(
        (work[0].layer.as_str(), work[0].probes.as_slice()),
        ("fc2", &[probe][..])
    );

    let (ctx, table) = context(&run, false);
    let b = sql(
        &ctx,
        &format!(
            "SELECT COUNT(*), MIN(step), MAX(step) FROM contributions \
             WHERE probe_id IN ({probe}, {}) AND step BETWEEN 3 AND 5 AND layer = 'fc1'",
            probe + 1
        ),
    );
    assert_eq!(
        cells(&b)[0],
        [
            Cell::Text((2 * 3 * 64).to_string()),
            Cell::Text("3".into()),
            Cell::Text("5".into())
        ]
    );
    assert!(
        table
            .work()
            .iter()
            .all(|w| !w.residual && w.probes.len() == 2)
    );

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let instance: i64 = rng.random_range(0..1437);
    let (ctx, _) = context(&run, false);
    let b = sql(
        &ctx,
        &format!(
            "SELECT COUNT(*), COUNT(DISTINCT instance_id), COUNT(DISTINCT epoch) FROM contributions \
             WHERE probe_id = {probe} AND instance_id = {instance}"
        ),
    );
    // One record per epoch and layer.
    assert_eq!(
        cells(&b)[0],
        [
            Cell::Text("6".into()),
            Cell::Text("1".into()),
            Cell::Text("2".into())
        ]
    );

    // No probe filter: refused, the message says how many and how to narrow.
    let ctx = reptrace_analyze::context_with(
        &run,
        &ComputeOptions {
            max_rows: 1000,
            ..ComputeOptions::default()
        },
    )
    .unwrap();
    let e = rt()
        .block_on(reptrace_analyze::sql::run(
            &ctx,
            "SELECT COUNT(*) FROM contributions",
        ))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("contributions: this query would compute")
            && e.contains("probe_id")
            && e.contains("--max-computed-rows"),
        "{e}"
    );
    let o = cli().output(&[
        "sql",
        run_dir.to_str().unwrap(),
        "SELECT COUNT(*) FROM contributions",
        "--max-computed-rows",
        "1000",
    ]);
    let err = assert_one_line_error(&o, &[]);
    assert!(
        err.starts_with("error: contributions: this query would compute"),
        "{err}"
    );
}

/// `reptrace verify` checks the materialised attributions' completeness and passes.
fn assert_verify_passes_completeness(run: &str) {
    let v = cli().ok(&["verify", run]);
    assert!(
        v.lines()
            .any(|l| l.starts_with("pass") && l.contains("completeness: attribution")),
        "{v}"
    );
}

/// `attribute --by instance` and `--by epoch` write sums that equal the
/// computed per-record rows summed in SQL; on disk they are far smaller.
#[test]
fn aggregated_attribution_equals_sql_sums() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = train(dir.path(), "mlp");
    let r = run_dir.to_str().unwrap();
    let run = Run::open(&run_dir).unwrap();
    let (ctx, _) = context(&run, false);
    let probes = probe_ids(&ctx, false);
    let chosen = [probes[0], probes[11]];
    let sel = format!("ids:{},{}", chosen[0], chosen[1]);
    cli().ok(&["attribute", r, "--probes", &sel, "--by", "instance", "-q"]);
    let run = Run::open(&run_dir).unwrap();
    let (ctx, _) = context(&run, true);
    let sql = |q: &str| sql_cells(&ctx, q);
    // Complete: the dots (residual row included) sum to ‖p‖² per probe and
    // layer, and verify checks it.
    let shares = sql(
        "SELECT i.layer, i.probe_id, SUM(i.dot) / MAX(p.p_norm * p.p_norm) FROM influence i \
         JOIN probes p ON p.layer = i.layer AND p.probe_id = i.probe_id \
         GROUP BY i.layer, i.probe_id",
    );
    assert_eq!(shares.len(), 6);
    for row in &shares {
        let Cell::Float(s) = row[2] else { panic!() };
        assert!((s - 1.0).abs() < 1e-6, "{row:?}");
    }
    assert_verify_passes_completeness(r);
    cli().ok(&["attribute", r, "--probes", &sel, "--by", "epoch", "-q"]);
    let m = Manifest::load(&run_dir).unwrap();
    let bys: Vec<Aggregation> = m.attributions.iter().map(|a| a.by).collect();
    assert_eq!(bys, [Aggregation::Instance, Aggregation::Epoch]);
    let run = Run::open(&run_dir).unwrap();
    let (ctx, _) = context(&run, true);
    let sql = |q: &str| sql_cells(&ctx, q);
    let list = format!("{}, {}", chosen[0], chosen[1]);
    // Per instance (epoch NULL) from the influence table …
    let stored = sql(&format!(
        "SELECT layer, probe_id, instance_id, label, dot, records FROM influence \
         WHERE epoch IS NULL AND records > 0 AND probe_id IN ({list}) \
         ORDER BY layer, probe_id, instance_id"
    ));
    // … equals the computed records summed.
    let summed = sql(&format!(
        "SELECT layer, probe_id, instance_id, label, SUM(dot), COUNT(*) FROM contributions \
         WHERE probe_id IN ({list}) AND step IS NOT NULL \
         GROUP BY layer, probe_id, instance_id, label ORDER BY layer, probe_id, instance_id"
    ));
    assert_eq!(stored.len(), 3 * 2 * 1437);
    assert_same(&stored, &summed, "by instance");
    let stored = sql(&format!(
        "SELECT layer, probe_id, epoch, instance_id, dot FROM influence \
         WHERE epoch IS NOT NULL AND probe_id IN ({list}) ORDER BY layer, probe_id, epoch, instance_id"
    ));
    let summed = sql(&format!(
        "SELECT layer, probe_id, epoch, instance_id, SUM(dot) FROM contributions \
         WHERE probe_id IN ({list}) AND step IS NOT NULL \
         GROUP BY layer, probe_id, epoch, instance_id ORDER BY layer, probe_id, epoch, instance_id"
    ));
    assert_same(&stored, &summed, "by epoch");
    assert_verify_passes_completeness(r);
}
