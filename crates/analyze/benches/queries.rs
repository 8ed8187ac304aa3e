//! Canned queries on DataFusion: the median time of every query of
//! `queries/` over a run's tables, in-process, as `reptrace query` runs it
//! (one `SessionContext` from [`reptrace_analyze::context`], planning
//! included). `scripts/bench/duckdb_queries.py` times the same files on
//! DuckDB over the same Parquet files; `scripts/bench.sh` puts the two side
//! by side.
//!
//! ```text
//! cargo bench -p reptrace-analyze --bench queries -- --run RUN [--probe P] [--repeats N] [--explain]
//! ```
//!
//! The run must have been attributed (`reptrace attribute RUN --probes test`):
//! the canned queries then read the materialised rows, as DuckDB does;
//! `REPTRACE_BENCH_RUN` may name it instead of `--run`. Without a run the
//! bench says so and exits successfully (so `cargo bench` with no arguments
//! still passes). Parameters: `probe` = `--probe` or the smallest attributed
//! probe id, `k` = 10, `bins` = 20. One untimed run per query warms the page
//! cache and DataFusion's metadata caches. `--explain` prints
//! `EXPLAIN ANALYZE` of every query after the table; `--set KEY=VALUE`
//! (repeatable) sets a DataFusion option (e.g.
//! `datafusion.execution.parquet.pushdown_filters=false`) on top of those of
//! `reptrace_analyze::context` before the run's tables are registered, to
//! compare settings.
//!
//! Then `top_proponents` for the probe computed on demand (the materialised
//! rows ignored) is timed against the same query on the materialised rows,
//! and against a bare scan of the `updates` columns it needs (the least any
//! computation must read): the faster of DataFusion decoding them
//! (`SUM(cardinality(u))`, …) and the analyzer's own record reader on every
//! layer at once; one line `BENCH ondemand …`.
//!
//! "plan s" is the median time to plan alone (SQL to physical plan,
//! parameters bound), which the total includes. Besides the table it prints
//! one line per query for scripts:
//! `BENCH query engine=datafusion name=NAME rows=R median_s=S plan_s=P repeats=N`.
use reptrace_analyze::query::Query;
use reptrace_testkit::bench::{arg, median};
use std::path::PathBuf;
use std::time::Instant;

/// The first column of the first row as an integer.
fn scalar_i64(batches: &[arrow_array::RecordBatch]) -> Option<i64> {
    use arrow_array::Array;
    let b = batches.iter().find(|b| b.num_rows() > 0)?;
    let c = arrow::compute::cast(b.column(0), &arrow_schema::DataType::Int64).ok()?;
    let c = c.as_any().downcast_ref::<arrow_array::Int64Array>()?;
    (!c.is_null(0)).then(|| c.value(0))
}

fn main() {
    let Some(run) = arg("--run")
        .or_else(|| std::env::var("REPTRACE_BENCH_RUN").ok())
        .map(PathBuf::from)
    else {
        println!(
            "queries bench: no run given (--run DIR or REPTRACE_BENCH_RUN); nothing measured. \
             scripts/bench.sh prepares an attributed run."
        );
        return;
    };
    let repeats: usize = arg("--repeats").and_then(|r| r.parse().ok()).unwrap_or(5);
    let args: Vec<String> = std::env::args().collect();
    let settings: Vec<(String, String)> = args
        .windows(2)
        .filter(|w| w[0] == "--set")
        .filter_map(|w| {
            w[1].split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let opened = reptrace_analyze::open(&run).expect("open the run");
    let ctx = if settings.is_empty() {
        reptrace_analyze::context(&opened).expect("register the run's tables")
    } else {
        // The settings of `reptrace_analyze::context`, then the given ones.
        let mut config = reptrace_analyze::context(&opened)
            .expect("register the run's tables")
            .copied_config();
        for (k, v) in &settings {
            config = config.set_str(k, v);
        }
        let ctx = datafusion::prelude::SessionContext::new_with_config(config);
        reptrace_analyze::register(&ctx, &opened).expect("register the run's tables");
        ctx
    };
    let sql = |q: &str| {
        rt.block_on(reptrace_analyze::sql::run(&ctx, q))
            .unwrap_or_else(|e| panic!("{q}: {e}"))
            .1
    };
    let materialised = opened
        .manifest()
        .attributions
        .iter()
        .filter(|a| a.by == reptrace_format::Aggregation::Step)
        .flat_map(|a| a.files.iter())
        .map(|f| f.rows)
        .sum::<u64>();
    let contributions = materialised;
    let probe = match arg("--probe") {
        Some(p) => p,
        None => scalar_i64(&sql(
            "SELECT MIN(probe_id) FROM probes WHERE instance_id IS NULL",
        ))
        .expect("the run has no probes")
        .to_string(),
    };
    let chosen = [("probe", probe.as_str()), ("k", "10"), ("bins", "20")];
    println!(
        "canned queries on DataFusion: {} ({contributions} contribution rows), probe {probe}, k 10, bins 20, \
         target partitions {}, median of {repeats}{}",
        run.display(),
        ctx.copied_config().target_partitions(),
        settings
            .iter()
            .map(|(k, v)| format!(", {k}={v}"))
            .collect::<String>()
    );
    println!("BENCH query-setup engine=datafusion contributions={contributions} probe={probe}");
    println!(
        "{:<22} {:>7} {:>10} {:>10} {:>10} {:>10}",
        "query", "rows", "median s", "min s", "max s", "plan s"
    );
    let queries = Query::builtins().expect("built-in queries");
    for q in &queries {
        let params: Vec<(&str, &str)> = chosen
            .iter()
            .filter(|(n, _)| q.params.iter().any(|p| p.name == *n))
            .copied()
            .collect();
        let once = || {
            let start = Instant::now();
            let (_, batches) = rt
                .block_on(q.run(&ctx, &params))
                .unwrap_or_else(|e| panic!("{}: {e}", q.name));
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            (start.elapsed().as_secs_f64(), rows)
        };
        let (_, rows) = once();
        let mut times: Vec<f64> = (0..repeats.max(1)).map(|_| once().0).collect();
        let med = median(&mut times);
        // Planning alone (SQL to physical plan, parameters bound), to tell
        // planning from execution.
        let plan_once = || {
            let start = Instant::now();
            let values: std::collections::HashMap<_, _> =
                q.bind(&params).expect("parameters").into_iter().collect();
            let df = rt
                .block_on(reptrace_analyze::sql::plan(&ctx, &q.sql))
                .expect("plan");
            let df = if values.is_empty() {
                df
            } else {
                df.with_param_values(datafusion::common::ParamValues::from(values))
                    .expect("bind")
            };
            rt.block_on(df.create_physical_plan())
                .expect("physical plan");
            start.elapsed().as_secs_f64()
        };
        let mut plans: Vec<f64> = (0..repeats.max(1)).map(|_| plan_once()).collect();
        let plan = median(&mut plans);
        println!(
            "{:<22} {:>7} {:>10.4} {:>10.4} {:>10.4} {:>10.4}",
            q.name,
            rows,
            med,
            times[0],
            times[times.len() - 1],
            plan
        );
        println!(
            "BENCH query engine=datafusion name={} rows={rows} median_s={med:.6} plan_s={plan:.6} repeats={}",
            q.name,
            times.len()
        );
    }
    on_demand(&rt, &opened, &probe, repeats);
    if std::env::args().any(|a| a == "--explain") {
        for q in &queries {
            let mut text = q.sql.clone();
            for (n, v) in chosen {
                text = text.replace(&format!("${n}"), v);
            }
            println!("\n== EXPLAIN ANALYZE {}", q.name);
            let batches = sql(&format!("EXPLAIN ANALYZE {text}"));
            let plan = arrow::util::pretty::pretty_format_batches(&batches).expect("format plan");
            println!("{plan}");
        }
    }
}

/// Median seconds of `f` over `repeats` runs after one untimed run.
fn time(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut t)
}

/// `top_proponents` computed on demand vs on materialised rows vs a bare
/// scan of the updates it reads.
fn on_demand(
    rt: &tokio::runtime::Runtime,
    run: &reptrace_analyze::Run,
    probe: &str,
    repeats: usize,
) {
    use reptrace_analyze::ComputeOptions;
    let q = Query::resolve("top_proponents").expect("top_proponents");
    let params = [("probe", probe), ("k", "10")];
    let computed_ctx = reptrace_analyze::context_with(
        run,
        &ComputeOptions {
            use_materialised: false,
            ..ComputeOptions::default()
        },
    )
    .expect("context");
    let cached_ctx = reptrace_analyze::context(run).expect("context");
    let query = |ctx: &datafusion::prelude::SessionContext| {
        rt.block_on(q.run(ctx, &params))
            .unwrap_or_else(|e| panic!("top_proponents: {e}"));
    };
    let computed_s = time(repeats, || query(&computed_ctx));
    let materialised_s = time(repeats, || query(&cached_ctx));
    let df_scan_s = time(repeats, || {
        rt.block_on(reptrace_analyze::sql::run(
            &cached_ctx,
            "SELECT SUM(cardinality(u)), SUM(cardinality(v)), COUNT(instance_id), \
             MAX(step), MAX(epoch), MAX(label) FROM updates",
        ))
        .expect("scan");
    });
    let setup = reptrace_analyze::replay::Setup::load(run).expect("setup");
    let layers: Vec<_> = run.manifest().model.traced_layers().collect();
    let reader_scan_s = time(repeats, || {
        std::thread::scope(|s| {
            for layer in &layers {
                let setup = &setup;
                s.spawn(move || {
                    let rows = reptrace_analyze::replay::batch_rows_for(
                        layer,
                        run.manifest().mode,
                        32 << 20,
                    );
                    reptrace_analyze::replay::stream(run, layer, setup, rows, None, |_, _| Ok(()))
                        .expect("scan");
                });
            }
        });
    });
    let scan_s = df_scan_s.min(reader_scan_s);
    println!(
        "top_proponents probe {probe}: on demand {computed_s:.4} s, materialised {materialised_s:.4} s, \
         bare scan of updates {scan_s:.4} s (DataFusion {df_scan_s:.4} s, record reader {reader_scan_s:.4} s)"
    );
    println!(
        "BENCH ondemand name=top_proponents computed_s={computed_s:.6} materialised_s={materialised_s:.6} \
         scan_s={scan_s:.6} df_scan_s={df_scan_s:.6} reader_scan_s={reader_scan_s:.6} records={} repeats={repeats}",
        run.manifest()
            .files(reptrace_format::Table::Updates)
            .iter()
            .map(|f| f.rows)
            .sum::<u64>()
    );
}
