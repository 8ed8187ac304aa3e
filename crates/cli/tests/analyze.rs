//! `reptrace attribute`, `sql`, `query` and `verify`, run as the binary on a
//! small run written through the recorder (plain SGD, so that the final
//! weights are exactly the initial ones plus the recorded updates).
use rand::{Rng, SeedableRng};
use reptrace_format::{Manifest, Split, Table};
use reptrace_record::ProbeBatch;
use reptrace_testkit::cli::{Cli, text};
use reptrace_testkit::handmade::{self, Batch, Handmade};
use reptrace_testkit::synthetic::f32s;
use std::path::Path;

fn cli() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_reptrace"))
}

/// One Linear layer (3 → 2), 8 training instances, 6 steps of SGD, 4 probes.
fn write_run(run: &Path) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut rec = Handmade::new(run, handmade::tiny(3, 2, true), &["a", "b"]).loss(0.5);
    let labels: Vec<i32> = (0..10).map(|i| i % 2).collect();
    let splits: Vec<Split> = (0..10)
        .map(|i| if i < 8 { Split::Train } else { Split::Test })
        .collect();
    rec.instances(&labels, &splits);
    let mut w: Vec<f64> = (0..6)
        .map(|_| f64::from(rng.random_range(-0.5f32..0.5)))
        .collect();
    let mut b = vec![0.0f64; 2];
    let first = w.clone();
    let (wf, bf) = (f32s(&w), f32s(&b));
    rec.weights(&[("fc.weight", &[2, 3], &wf), ("fc.bias", &[2], &bf)]);
    for step in 0..6i64 {
        let ids: Vec<i64> = vec![step % 8, (step + 3) % 8];
        let bl: Vec<i32> = ids.iter().map(|&i| labels[i as usize]).collect();
        let u: Vec<f32> = (0..6).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let v: Vec<f32> = (0..4).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        let batch = Batch::new(step, (step / 3) as i32, &ids, &bl);
        rec.step(&batch, 0.1);
        rec.update("fc", &batch, &u, &v);
        for r in 0..2 {
            for o in 0..2 {
                let vo = f64::from(v[r * 2 + o]);
                b[o] += vo;
                for i in 0..3 {
                    w[o * 3 + i] += vo * f64::from(u[r * 3 + i]);
                }
            }
        }
        if step % 3 == 2 {
            let (wf, bf) = (f32s(&w), f32s(&b));
            rec.weights(&[("fc.weight", &[2, 3], &wf), ("fc.bias", &[2], &bf)]);
        }
    }
    let (wt, bt): (Vec<f64>, Vec<f64>) = (
        w.iter().map(|&x| f64::from(x as f32)).collect(),
        b.iter().map(|&x| f64::from(x as f32)).collect(),
    );
    // Probes: instances 1 (train), 8 and 9 (test), and p from the weights, in f64.
    let mut a = Vec::new();
    let mut p = Vec::new();
    for _ in 0..3 {
        let x: Vec<f64> = (0..3)
            .map(|_| f64::from(rng.random_range(0.0f32..1.0)))
            .collect();
        for o in 0..2 {
            let z: f64 = (0..3)
                .map(|i| (wt[o * 3 + i] - first[o * 3 + i]) * x[i])
                .sum();
            p.push(z + bt[o]);
        }
        a.extend(x);
    }
    rec.probes(
        "fc",
        ProbeBatch {
            probe_ids: &[1, 8, 9],
            instance_ids: &[Some(1), Some(8), Some(9)],
            labels: &[1, 0, 1],
            predicted: &[1, 0, 0],
            a: &a,
            p: &p,
            positions: None,
        },
    );
    let (wf, bf) = (f32s(&wt), f32s(&bt));
    rec.finish(&[("fc.weight", &[2, 3], &wf), ("fc.bias", &[2], &bf)]);
}

#[test]
fn attribute_query_sql_verify() {
    let (dir, run) = handmade::temp_run(write_run);
    let r = run.to_str().unwrap();

    // Before any attribution the completeness check cannot apply: the
    // summary says it was skipped instead of counting it as passed.
    let out = cli().output(&["verify", r]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let skipped = stdout.lines().filter(|l| l.starts_with("skip")).count();
    assert!(skipped > 0, "{stdout}");
    let checks = stdout.lines().count() - 2;
    let last = stdout.lines().last().unwrap();
    assert_eq!(
        last,
        format!(
            "{} of {checks} checks passed, {skipped} skipped",
            checks - skipped
        ),
        "{stdout}"
    );

    let out = cli().output(&["attribute", r, "--probes", "all", "--quiet"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // 12 records × 3 probes + 3 residual rows; --quiet prints the summary
    // line only (no progress bar, no per-layer table).
    assert!(
        text(&out.stdout).contains("39 contribution rows"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        text(&out.stdout).lines().count(),
        1,
        "{}",
        text(&out.stdout)
    );
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    let m = Manifest::load(&run).unwrap();
    assert_eq!(
        m.files(Table::Contributions)
            .iter()
            .map(|f| f.rows)
            .sum::<u64>(),
        39
    );

    assert!(cli().ok(&["verify", r]).contains("checks passed"));

    // Shares of a complete attribution sum to 1.
    let out = cli().output(&[
        "query",
        r,
        "class_shares",
        "--param",
        "probe=8",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let total: f64 = rows.iter().map(|r| r["share"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-9, "{rows:?}");

    let out = cli().output(&[
        "sql",
        r,
        "SELECT COUNT(*) AS n FROM contributions WHERE probe_id = 9",
        "--format",
        "csv",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "n\n13\n");

    let pq = dir.path().join("top.parquet");
    let out = cli().output(&[
        "query",
        r,
        "top_proponents",
        "--param",
        "probe=1",
        "--param",
        "k=2",
        "--format",
        "parquet",
        "--out",
        pq.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("2 rows written"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn errors_are_one_line_with_exit_code_1() {
    let (_dir, run) = handmade::temp_run(write_run);
    let r = run.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["sql", r, "DROP TABLE steps"],
        vec!["sql", r, "COPY (SELECT 1) TO '/tmp/reptrace-x.csv'"],
        vec!["sql", r, "SELECT * FROM read_parquet('/etc/hosts')"],
        vec!["sql", r, "SELECT * FROM nope"],
        vec!["query", r, "top_proponents"],
        vec![
            "query",
            r,
            "top_proponents",
            "--param",
            "probe=1",
            "--param",
            "kk=1",
        ],
        vec!["query", r, "top_proponents", "--param", "probe"],
        vec!["query", r, "no_such_query"],
        vec!["sql", r, "SELECT 1", "--format", "parquet"],
        vec!["attribute", r, "--probes", "ids:77"],
        vec!["attribute", r, "--layers", "conv9"],
        vec!["verify", "/nonexistent/run"],
    ];
    for args in cases {
        let out = cli().output(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.trim_end().lines().count() == 1,
            "{args:?}: {err:?}"
        );
    }

    // A run missing records fails verify with a non-zero exit.
    let mut m = Manifest::load(&run).unwrap();
    m.commits[1].files.retain(|f| f.table != "updates");
    std::fs::write(run.join("manifest.json"), m.to_json()).unwrap();
    let out = cli().output(&["verify", r]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("FAIL   completeness: fc weights"),
        "{}",
        text(&out.stdout)
    );
}

/// Per (layer, probe) of an attributed run: Σ dot over the instance
/// records, Σ dot including the residual row, and ‖p‖.
fn dot_sums(run: &str) -> Vec<(String, i64, f64, f64, f64)> {
    let out = cli().output(&[
        "sql",
        run,
        "SELECT c.layer, c.probe_id, \
                SUM(CASE WHEN c.instance_id IS NOT NULL THEN c.dot ELSE 0 END) AS records, \
                SUM(c.dot) AS total, MAX(p.p_norm) AS p_norm \
         FROM contributions c JOIN probes p ON p.layer = c.layer AND p.probe_id = c.probe_id \
         GROUP BY c.layer, c.probe_id",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.iter()
        .map(|r| {
            (
                r["layer"].as_str().unwrap().to_owned(),
                r["probe_id"].as_i64().unwrap(),
                r["records"].as_f64().unwrap(),
                r["total"].as_f64().unwrap(),
                r["p_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Completeness on real digits runs from `reptrace train` (libtorch), every
/// test probe, every traced layer: the instance records alone sum to ‖p‖²
/// (the residual row is ≤ 1e-5·‖p‖²: no record was lost) for f32 traces of
/// the MLP and the CNN with plain SGD and with momentum (Nesterov and a step
/// schedule for one); with weight decay the residual row carries the decay
/// and the sum including it is exact; `verify` passes on each, and the
/// layer summary's shares sum to 1.
///
/// f16 traces: the factors are rounded to f16 (unit roundoff u = 2⁻¹¹ ≈
/// 4.9e-4), and a record's dot `(v·p)(u·a + 1)` multiplies two rounded
/// factors, so each contribution can be off by about 2u of its size; the
/// records of a probe partly cancel (Σ|dot| exceeds ‖p‖²), so the
/// instance-only sum is held to 8u ≈ 3.9e-3 relative (measured: ≤ 4.3e-4).
/// The residual row absorbs that rounding, so the total stays exact.
#[cfg(feature = "tch")]
#[test]
fn completeness_on_trained_digits_runs() {
    let dir = tempfile::tempdir().unwrap();
    let f16_tolerance = 8.0 * 2f64.powi(-11);
    // (name, flags, tolerance of the instance-only sum; None: weight decay)
    let runs: Vec<(&str, Vec<&str>, Option<f64>)> = vec![
        ("mlp-sgd", vec!["--model", "mlp"], Some(1e-5)),
        (
            "mlp-momentum",
            vec!["--model", "mlp", "--momentum", "0.9"],
            Some(1e-5),
        ),
        ("cnn-sgd", vec!["--model", "cnn"], Some(1e-5)),
        (
            "cnn-nesterov",
            vec![
                "--model",
                "cnn",
                "--momentum",
                "0.9",
                "--nesterov",
                "--lr-schedule",
                "step:1:0.5",
            ],
            Some(1e-5),
        ),
        (
            "mlp-decay",
            vec![
                "--model",
                "mlp",
                "--momentum",
                "0.9",
                "--weight-decay",
                "0.001",
            ],
            None,
        ),
        (
            "cnn-f16",
            vec!["--model", "cnn", "--momentum", "0.9", "--dtype", "f16"],
            Some(f16_tolerance),
        ),
    ];
    for (name, flags, tolerance) in runs {
        let run = dir.path().join(name);
        let r = run.to_str().unwrap();
        let mut args = vec!["train", "--threads", "1", "--epochs", "2", "--out", r];
        args.extend(flags);
        let out = cli().output(&args);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let out = cli().output(&["attribute", r, "--quiet"]);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));

        let sums = dot_sums(r);
        // 360 test probes × 3 traced layers.
        assert_eq!(sums.len(), 3 * 360, "{name}");
        let mut worst_records = 0f64;
        let mut smallest_residual = f64::INFINITY;
        for (layer, probe, records, total, p_norm) in &sums {
            let p2 = p_norm * p_norm;
            assert!(p2 > 0.0, "{name} {layer} {probe}");
            let total_err = (total - p2).abs() / p2;
            assert!(
                total_err < 1e-9,
                "{name} {layer} probe {probe}: Σ dot {total} vs ‖p‖² {p2}"
            );
            let records_err = (records - p2).abs() / p2;
            worst_records = worst_records.max(records_err);
            smallest_residual = smallest_residual.min(records_err);
            if let Some(tol) = tolerance {
                assert!(
                    records_err <= tol,
                    "{name} {layer} probe {probe}: records sum {records} vs ‖p‖² {p2} ({records_err:.2e} > {tol:.1e})"
                );
            }
        }
        if tolerance.is_none() {
            // The decay is a real share of every probe's refinement.
            assert!(
                smallest_residual > 1e-3,
                "{name}: residual {smallest_residual:.2e}"
            );
        }
        eprintln!("{name}: worst |Σ dot(records) − ‖p‖²|/‖p‖² = {worst_records:.2e}");

        cli().ok(&["verify", r]);
        let probe = format!("probe={}", sums[0].1);
        let out = cli().output(&[
            "query",
            r,
            "layer_summary",
            "--param",
            &probe,
            "--format",
            "json",
        ]);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(rows.len(), 3, "{name}");
        for row in rows {
            let total = row["total_share"].as_f64().unwrap();
            assert!((total - 1.0).abs() < 1e-9, "{name}: {row}");
        }
    }
}

/// A planted duplicate: three exact copies of a test instance inserted into
/// the training data stand out among the proponents of that instance (as a
/// probe) at the last layer. The instance is one the model gets wrong
/// without the copies (test row 154 of the digits, a 0 the unplanted MLP
/// calls a 6): a copy of an easy instance is fitted within a few steps and
/// then contributes little, like many other instances of its class, while a
/// copy of a hard one keeps pulling its representation for most of training.
#[cfg(feature = "tch")]
#[test]
fn planted_duplicate_ranks_among_top_proponents() {
    use std::fmt::Write as _;
    let digits = reptrace_tch::data::digits().unwrap();
    let dim = digits.dim();
    let n_train = digits.n_train;
    let planted = n_train + 154;
    let copies = 3;
    let mut csv = String::new();
    let mut line = |row: usize| {
        for x in digits.row(row) {
            write!(csv, "{x},").unwrap();
        }
        writeln!(csv, "{}", digits.labels[row]).unwrap();
    };
    let order: Vec<usize> = (0..n_train)
        .chain(std::iter::repeat_n(planted, copies))
        .chain(n_train..digits.len())
        .collect();
    for row in order {
        line(row);
    }
    assert_eq!(dim, 64);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("planted.csv");
    std::fs::write(&data, csv).unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    let source = format!(
        "csv:{}?test={}&shape=1x8x8",
        data.display(),
        digits.len() - n_train
    );
    let out = cli().output(&[
        "train",
        "--threads",
        "1",
        "--data",
        &source,
        "--epochs",
        "10",
        "--momentum",
        "0.9",
        "--out",
        r,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The probe's id: its row in the planted file.
    let probe = (planted + copies) as i64;
    let out = cli().output(&[
        "attribute",
        r,
        "--probes",
        &format!("ids:{probe}"),
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Each training instance's influence on the probe at the last layer,
    // with its rank; the copies are ids n_train.. (rows after the train split).
    let sql = format!(
        "SELECT instance_id, label, s, RANK() OVER (ORDER BY s DESC) AS rk FROM \
         (SELECT instance_id, label, SUM(dot) AS s FROM contributions \
          WHERE probe_id = {probe} AND layer = 'fc3' AND instance_id IS NOT NULL \
          GROUP BY instance_id, label)"
    );
    let out = cli().output(&["sql", r, &sql, "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        rows.len(),
        n_train + copies,
        "one row per training instance"
    );
    let first_copy = n_train as i64;
    let is_copy = |r: &serde_json::Value| r["instance_id"].as_i64().unwrap() >= first_copy;
    let label = rows.iter().find(|r| is_copy(r)).unwrap()["label"].clone();
    let mean = |pick: &dyn Fn(&serde_json::Value) -> bool| {
        let s: Vec<f64> = rows
            .iter()
            .filter(|r| pick(r))
            .map(|r| r["s"].as_f64().unwrap())
            .collect();
        s.iter().sum::<f64>() / s.len() as f64
    };
    let copies_mean = mean(&|r| is_copy(r));
    let class_mean = mean(&|r| !is_copy(r) && r["label"] == label);
    let best_rank = rows
        .iter()
        .filter(|r| is_copy(r))
        .map(|r| r["rk"].as_i64().unwrap())
        .min()
        .unwrap();
    // The copies stand out from the other instances of their class (about
    // 5x their mean influence), and the best of them ranks in the top 5 %
    // of all training instances (rank 20 of 1440 here). Which instances
    // take the very first places depends on the floating-point kernels of
    // the machine; these margins do not.
    assert!(
        copies_mean >= 3.0 * class_mean,
        "planted copies' mean influence {copies_mean:.3} vs {class_mean:.3} for their class"
    );
    assert!(
        (best_rank as f64) <= 0.05 * rows.len() as f64,
        "best planted copy ranks {best_rank} of {}",
        rows.len()
    );
}

/// `--help` names what exists: every built-in query, every table, and the
/// optimizers `train` offers.
#[test]
fn help_names_every_query_table_and_optimizer() {
    let help = |args: &[&str]| {
        let o = cli().output(args);
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        text(&o.stdout)
    };
    let query = help(&["query", "--help"]);
    for (name, _) in reptrace_analyze::query::BUILTIN {
        assert!(query.contains(name), "query --help omits {name}: {query}");
    }
    for cmd in ["sql", "export"] {
        let h = help(&[cmd, "--help"]);
        for table in reptrace_format::Table::ALL {
            assert!(
                h.contains(table.name()),
                "{cmd} --help omits {}: {h}",
                table.name()
            );
        }
    }
    let top = help(&["--help"]);
    let train = top
        .lines()
        .find(|l| l.trim_start().starts_with("train"))
        .unwrap();
    assert!(train.contains("Adam"), "{train}");
}
