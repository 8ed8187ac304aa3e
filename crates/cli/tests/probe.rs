//! `reptrace probe add`, run as the binary on real digits runs.
//!
//! - `added_probes_equal_the_probes_training_records`: run A records the
//!   test probes while it trains; run B, the same configuration and seed,
//!   records none, and gets the same inputs with `probe add` afterwards. The
//!   two runs trained the same weights, their probes tables agree (a, p,
//!   p_norm, label, predicted) and `attribute` gives the same contributions
//!   (MLP and CNN).
//! - `bad_input_is_one_error_line_and_leaves_the_run_unchanged`: features of
//!   the wrong shape, ids already used or too few, a run without trained
//!   weights, an aborted run and a model with batch norm.
//!
//! Killed and live runs are in `crash.rs`.
#![cfg(feature = "tch")]
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use reptrace_format::{Manifest, Optimizer};
use reptrace_testkit::cli::{Cli, text};
use reptrace_testkit::digits::Digits;
use reptrace_testkit::files;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn cli(dir: &Path) -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_reptrace")).in_dir(dir)
}

/// Trains a digits run into `dir/out` (batches of 64, 1 thread).
fn train(dir: &Path, out: &str, model: &str, epochs: usize, probes: &str) {
    let digits = Digits::new().model(model).epochs(epochs).batch(64);
    digits.probes(probes).train(&cli(dir), out);
}

/// The manifest's bytes and every file of the run with its size.
fn snapshot(run: &Path) -> (Vec<u8>, Vec<(PathBuf, u64)>) {
    let manifest = std::fs::read(run.join("manifest.json")).unwrap();
    (manifest, files::sizes(run))
}

/// One probe row: instance_id, label, predicted, p_norm, a, p.
type ProbeRow = (Option<i64>, i32, i32, f64, Vec<f64>, Vec<f64>);

fn list(batch: &RecordBatch, col: &str, i: usize) -> Vec<f64> {
    let l = batch.column_by_name(col).unwrap().as_list::<i32>();
    l.value(i).as_primitive::<Float64Type>().values().to_vec()
}

/// The probes an analysis of the run uses, by (layer, probe id).
fn probes(run: &Path) -> BTreeMap<(String, i64), ProbeRow> {
    let m = Manifest::load(run).unwrap();
    let mut out = BTreeMap::new();
    for f in m.analysis_probes().unwrap().files {
        for b in files::read_parquet(&run.join(&f.path)) {
            let col = |name: &str| b.column_by_name(name).unwrap().clone();
            let ids = col("probe_id");
            let ids = ids.as_primitive::<Int64Type>();
            let inst = col("instance_id");
            let inst = inst.as_primitive::<Int64Type>();
            let label = col("label");
            let label = label.as_primitive::<Int32Type>();
            let predicted = col("predicted");
            let predicted = predicted.as_primitive::<Int32Type>();
            let norm = col("p_norm");
            let norm = norm.as_primitive::<Float64Type>();
            for i in 0..b.num_rows() {
                let row = (
                    (!inst.is_null(i)).then(|| inst.value(i)),
                    label.value(i),
                    predicted.value(i),
                    norm.value(i),
                    list(&b, "a", i),
                    list(&b, "p", i),
                );
                let key = (f.layer.clone().unwrap(), ids.value(i));
                assert!(out.insert(key, row).is_none(), "probe given twice");
            }
        }
    }
    out
}

/// The tensors of a weights snapshot, by name (the files differ in their
/// run id metadata).
fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

/// `reptrace sql … --format csv` as rows of fields.
fn sql(dir: &Path, run: &str, query: &str) -> Vec<Vec<String>> {
    cli(dir)
        .ok(&["sql", run, query, "--format", "csv"])
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect()
}

fn close(x: f64, y: f64, tol: f64) -> bool {
    (x - y).abs() <= tol * x.abs().max(y.abs()).max(1e-300)
}

#[test]
fn added_probes_equal_the_probes_training_records() {
    for (model, epochs, steps) in [("mlp", 2, 2 * 23), ("cnn", 1, 23)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        train(d, "a", model, epochs, "test");
        train(d, "b", model, epochs, "none");
        // Training is deterministic: the same final weights.
        let (wa, wb) = (
            tensors(&d.join("a/weights/final.safetensors")),
            tensors(&d.join("b/weights/final.safetensors")),
        );
        assert!(!wa.is_empty());
        assert_eq!(wa, wb, "{model}: the two runs trained different weights");
        assert!(
            Manifest::load(&d.join("b"))
                .unwrap()
                .analysis_probes()
                .is_none()
        );

        let out = cli(d).ok(&[
            "probe",
            "add",
            "b",
            "--data",
            "digits",
            "--rows",
            "test",
            "--ids",
            "1437..1796",
        ]);
        // mlp: fc1, fc2, fc3; cnn: conv1, conv2, fc.
        let layers = 3;
        assert_eq!(
            out.trim(),
            format!(
                "added 360 probes (ids 1437..1796) to {layers} layers, as of step {} \
                 (final weights)",
                steps - 1
            ),
            "{model}"
        );
        let (pa, pb) = (probes(&d.join("a")), probes(&d.join("b")));
        assert_eq!(pa.len(), 360 * layers, "{model}");
        assert_eq!(
            pa.keys().collect::<Vec<_>>(),
            pb.keys().collect::<Vec<_>>(),
            "{model}"
        );
        let mut worst = 0.0f64;
        for (key, ra) in &pa {
            let rb = &pb[key];
            assert_eq!((ra.0, ra.1, ra.2), (rb.0, rb.1, rb.2), "{model} {key:?}");
            assert_eq!(ra.0, None, "test probes are not training instances");
            assert!(close(ra.3, rb.3, 1e-6), "{model} {key:?}: p_norm");
            for (x, y) in [(&ra.4, &rb.4), (&ra.5, &rb.5)] {
                assert_eq!(x.len(), y.len(), "{model} {key:?}");
                for (u, v) in x.iter().zip(y) {
                    worst = worst.max((u - v).abs());
                }
            }
        }
        eprintln!("{model}: a and p differ by at most {worst}");
        assert!(worst <= 1e-6, "{model}: a or p differ by {worst}");

        // The same contributions from both runs.
        let q = "SELECT layer, probe_id, step, instance_id, dot FROM contributions \
                 WHERE probe_id IN (1437, 1500, 1796) \
                 ORDER BY layer, probe_id, step, instance_id";
        let mut dots = Vec::new();
        for run in ["a", "b"] {
            cli(d).ok(&[
                "attribute",
                run,
                "--probes",
                "ids:1437,1500,1796",
                "--quiet",
            ]);
            dots.push(sql(d, run, q));
        }
        // A row per record, and the residual (step null) per probe and layer.
        assert_eq!(dots[0].len(), 3 * layers * (1437 * epochs + 1), "{model}");
        assert_eq!(dots[0].len(), dots[1].len());
        for (x, y) in dots[0].iter().zip(&dots[1]) {
            assert_eq!(x[..4], y[..4], "{model}");
            let (u, v): (f64, f64) = (x[4].parse().unwrap(), y[4].parse().unwrap());
            assert!(close(u, v, 1e-9), "{model} {x:?}: dot {u} vs {v}");
        }
    }
}

/// `probe add` fails with one `error:` line containing `want`, exit 1, and
/// leaves `run` as it was.
fn refused(dir: &Path, run: &str, args: &[&str], want: &str) {
    let before = snapshot(&dir.join(run));
    let mut all = vec!["probe", "add", run];
    all.extend_from_slice(args);
    let o = cli(dir).output(&all);
    let err = reptrace_testkit::cli::assert_one_line_error(&o, &[want]);
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    assert!(o.stdout.is_empty(), "{args:?}");
    assert!(
        snapshot(&dir.join(run)) == before,
        "{args:?} changed the run"
    );
}

#[test]
fn bad_input_is_one_error_line_and_leaves_the_run_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    train(d, "run", "mlp", 1, "test");
    std::fs::write(
        d.join("five.csv"),
        "1,2,3,4,5,0\n5,4,3,2,1,1\n0,0,0,0,0,1\n",
    )
    .unwrap();
    // 64 pixels, but a label the run's 10 classes do not have.
    let row = |label: i32| format!("{}{label}\n", "0.5,".repeat(64));
    std::fs::write(d.join("big.csv"), row(0) + &row(11)).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--data", "csv:five.csv"],
            "--data: five.csv: examples of shape [5] do not fit the run's model mlp \
             (input shape [1, 8, 8])",
        ),
        (
            &["--data", "digits", "--rows", "0..1", "--ids", "5,1437"],
            "probe id 1437 is already a probe id of the run",
        ),
        (
            &["--data", "digits", "--rows", "0..2", "--ids", "5000,5001"],
            "--ids: 2 ids for 3 rows",
        ),
        (
            &["--data", "digits", "--rows", "1790..1800"],
            "--rows: 1790..1800: digits has rows 0..1796",
        ),
        (&["--data", "digits", "--rows", "middle"], "--rows: "),
        (&["--data", "digits", "--ids", "7..x"], "--ids: "),
        (&["--data", "mnist"], "--data: "),
        (
            &["--data", "csv:big.csv"],
            "labels value 11 is out of range for 10 classes",
        ),
    ];
    for (args, want) in cases {
        refused(d, "run", args, want);
    }
    // Nothing was added by the failures: new ids still start above the
    // instances and probes of the run.
    let out = cli(d).ok(&["probe", "add", "run", "--data", "digits", "--rows", "3..4"]);
    assert_eq!(
        out.trim(),
        "added 2 probes (ids 1797..1798) to 3 layers, as of step 22 (final weights)"
    );
    refused(
        d,
        "run",
        &["--data", "digits", "--rows", "0..0", "--ids", "1798"],
        "probe id 1798 is already a probe id",
    );

    // A run whose only weights were taken before any training step.
    let model = reptrace_tch::build_model(
        &reptrace_tch::ModelChoice::default(),
        &[1, 8, 8],
        10,
        &reptrace_tch::TraceLayers::All,
    )
    .unwrap();
    let net = reptrace_tch::Network::new(&model, 1, tch::Device::Cpu).unwrap();
    let host = net.to_host().unwrap();
    let named: Vec<reptrace_record::NamedTensor<'_>> = host
        .iter()
        .map(|t| reptrace_record::NamedTensor {
            name: &t.name,
            shape: &t.shape,
            data: &t.data,
        })
        .collect();
    let record = |name: &str, finish: bool| {
        let mut rec = reptrace_record::Recorder::builder(d.join(name))
            .model(model.clone())
            .optimizer(Optimizer::sgd(0.1))
            .classes((0..10).map(|c| c.to_string()).collect())
            .build()
            .unwrap();
        rec.weights(&named).unwrap();
        rec.commit().unwrap();
        if finish {
            rec.finish(&named).unwrap();
        } else {
            rec.abort("stopped by the test").unwrap();
        }
    };
    record("untrained", true);
    refused(
        d,
        "untrained",
        &["--data", "digits"],
        "the run has no weights after a training step; probes need trained weights",
    );
    record("aborted", false);
    refused(
        d,
        "aborted",
        &["--data", "digits"],
        "probes are added to a completed run; this run is aborted",
    );
    let o = cli(d).output(&["probe", "add", "nowhere", "--data", "digits"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).starts_with("error: "),
        "{}",
        text(&o.stderr)
    );
    assert!(!d.join("nowhere").exists());

    // Batch norm: the run holds no running statistics to evaluate with.
    cli(d).ok(&[
        "train",
        "--model",
        "cnn-bn",
        "--mode",
        "batch",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--out",
        "bn",
    ]);
    refused(
        d,
        "bn",
        &["--data", "digits", "--rows", "0..3"],
        "batch norm layer bn1",
    );
}
