//! `reptrace train` and `reptrace demo`, run as the binary in temporary directories.
#![cfg(feature = "tch")]
use reptrace_format::{Manifest, Status, Table};
use reptrace_testkit::cli::{Cli, assert_one_line_error, number_after};
use std::path::Path;

fn cli(dir: &Path) -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_reptrace")).in_dir(dir)
}

#[test]
fn bad_flag_values_give_one_line_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--lr", "abc"], "--lr"),
        (&["--lr", "-0.5"], "--lr"),
        (&["--epochs", "0"], "--epochs"),
        (&["--batch-size", "many"], "--batch-size"),
        (&["--momentum", "1.5"], "--momentum"),
        (&["--lr-schedule", "step:2"], "--lr-schedule"),
        (&["--nesterov"], "--nesterov"),
        (&["--weight-decay", "-1"], "--weight-decay"),
        (&["--model", "resnet"], "--model"),
        (&["--data", "mnist"], "--data"),
        (&["--data", "csv:/nonexistent/x.csv"], "--data"),
        (&["--trace-layers", "fc1,fc9"], "--trace-layers"),
        (&["--dtype", "f64"], "--dtype"),
        (&["--compression", "lz4"], "--compression"),
        (&["--device", "tpu"], "--device"),
        (&["--probes", "some"], "--probes"),
        (&["--model", "cnn", "--data", "csv:flat.csv"], "--model"),
    ];
    std::fs::write(
        dir.path().join("flat.csv"),
        "1,2,3,0\n4,5,6,1\n7,8,9,0\n1,1,1,1\n",
    )
    .unwrap();
    for (args, flag) in cases {
        let mut all = vec!["train", "--out", "run"];
        all.extend_from_slice(args);
        let o = cli(dir.path()).output(&all);
        let err = assert_one_line_error(&o, &[*flag]);
        assert!(
            err.starts_with(&format!("error: {flag}")),
            "{args:?}: {err}"
        );
        assert!(o.stdout.is_empty(), "{args:?}");
    }
    assert!(
        !dir.path().join("run").exists(),
        "nothing is written on a bad flag"
    );
}

#[test]
fn train_records_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli(dir.path()).ok(&[
        "train",
        "--model",
        "cnn",
        "--epochs",
        "1",
        "--dtype",
        "f16",
        "--trace-layers",
        "conv2,fc",
        "--out",
        "run",
    ]);
    assert!(
        out.contains("layer conv2") && out.contains("layer fc") && !out.contains("layer conv1"),
        "{out}"
    );
    let m = Manifest::load(&dir.path().join("run")).unwrap();
    assert_eq!(m.status, Status::Complete);
    assert_eq!(m.dtype, reptrace_format::Dtype::F16);
    let rows: u64 = m.files(Table::Updates).iter().map(|f| f.rows).sum();
    assert_eq!(rows, 2 * 1437, "two traced layers, one epoch");
    // The same directory again: refused, naming --out.
    let o = cli(dir.path()).output(&["train", "--epochs", "1", "--out", "run"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        reptrace_testkit::cli::text(&o.stderr).starts_with("error: --out: "),
        "{}",
        reptrace_testkit::cli::text(&o.stderr)
    );
}

#[test]
fn demo_reaches_90_percent_and_replaces_its_run() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = cli(dir.path()).ok(&["demo", "--out", "demo"]);
        let acc: f64 = number_after(&out, "test accuracy ");
        assert!(acc >= 90.0, "{out}");
        assert!(
            out.contains("28740 update rows"),
            "20 epochs × 1437 rows per layer: {out}"
        );
    }
    let m = Manifest::load(&dir.path().join("demo")).unwrap();
    assert_eq!(m.status, Status::Complete);
    assert_eq!(m.commits.len(), 22, "one run, not two");
    // A directory that is not a run is not replaced.
    std::fs::create_dir(dir.path().join("mine")).unwrap();
    std::fs::write(dir.path().join("mine/notes.txt"), "keep").unwrap();
    let o = cli(dir.path()).output(&["demo", "--out", "mine"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        reptrace_testkit::cli::text(&o.stderr).contains("not a reptrace run"),
        "{}",
        reptrace_testkit::cli::text(&o.stderr)
    );
    assert!(dir.path().join("mine/notes.txt").exists());
}
