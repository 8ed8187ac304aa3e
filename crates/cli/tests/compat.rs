//! Runs of every older format version still open: `tests/data/v1-digits`
//! to `v10-digits` (formats 1 to 10: a one-epoch digits run, layer fc3
//! traced, attributed for probes 1437 and 1500) are read, verified, queried
//! and attributed again by this build.
use reptrace_testkit::cli::Cli;
use reptrace_testkit::files::copy_dir;
use std::path::{Path, PathBuf};

fn cli() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_reptrace"))
}

/// A copy of `tests/data/v<version>-digits` in `dir`.
fn old_run(dir: &Path, version: u32) -> PathBuf {
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../tests/data/v{version}-digits"));
    let run = dir.join(format!("v{version}"));
    copy_dir(&src, &run);
    run
}

#[test]
fn format_1_run_opens_verifies_queries_and_attributes() {
    old_run_opens_verifies_queries_and_attributes(1);
}

#[test]
fn format_2_run_opens_verifies_queries_and_attributes() {
    old_run_opens_verifies_queries_and_attributes(2);
}

#[test]
fn format_3_run_opens_verifies_queries_and_attributes() {
    old_run_opens_verifies_queries_and_attributes(3);
}

#[test]
fn format_4_run_opens_verifies_queries_and_attributes() {
    old_run_opens_verifies_queries_and_attributes(4);
}

#[test]
fn format_5_run_opens_verifies_queries_and_attributes() {
    old_run_opens_verifies_queries_and_attributes(5);
}

#[test]
fn format_6_run_opens_verifies_queries_and_attributes() {
    old_run_opens_verifies_queries_and_attributes(6);
}

#[test]
fn format_7_run_opens_verifies_queries_and_attributes() {
    old_run_opens_verifies_queries_and_attributes(7);
}

#[test]
fn format_8_run_opens_verifies_queries_and_attributes() {
    old_run_opens_verifies_queries_and_attributes(8);
}

#[test]
fn format_9_run_opens_verifies_queries_and_attributes() {
    old_run_opens_verifies_queries_and_attributes(9);
}

#[test]
fn format_10_run_opens_verifies_queries_and_attributes() {
    old_run_opens_verifies_queries_and_attributes(10);
}

fn old_run_opens_verifies_queries_and_attributes(version: u32) {
    assert!(version < reptrace_format::FORMAT_VERSION);
    let dir = tempfile::tempdir().unwrap();
    let run = old_run(dir.path(), version);
    let r = run.to_str().unwrap();
    let m = reptrace_format::Manifest::load(&run).unwrap();
    assert_eq!(m.format_version, version);
    let info = cli().info_json(r);
    assert_eq!(info["format_version"], version);
    assert_eq!(info["status"], "complete");
    assert_eq!(info["probes"], "final");
    cli().ok(&["verify", r]);

    // Every table reads with the row counts its manifest lists (batches,
    // influence, examples, layer_steps: none where the table is newer than
    // the run); contributions
    // are read from the materialised rows for the probes they hold.
    assert_eq!(m.attributions.len(), 1, "its attribution is read");
    for table in [
        "instances",
        "steps",
        "updates",
        "probes",
        "contributions",
        "batches",
        "influence",
        "examples",
        "layer_steps",
    ] {
        let want: u64 = m.files(table.parse().unwrap()).iter().map(|f| f.rows).sum();
        let filter = if table == "contributions" {
            " WHERE probe_id IN (1437, 1500)"
        } else {
            ""
        };
        let out = cli().ok(&[
            "sql",
            r,
            &format!("SELECT count(*) FROM {table}{filter}"),
            "--format",
            "csv",
        ]);
        let got: u64 = out.lines().nth(1).unwrap().trim().parse().unwrap();
        assert_eq!(got, want, "{table}");
    }
    // Columns newer than the run read as null (steps.skipped, format 7).
    let steps: u64 = m
        .files(reptrace_format::Table::Steps)
        .iter()
        .map(|f| f.rows)
        .sum();
    let null_skipped = if version < 7 { steps } else { 0 };
    let out = cli().ok(&[
        "sql",
        r,
        "SELECT count(*) FROM steps WHERE skipped IS NULL",
        "--format",
        "csv",
    ]);
    assert_eq!(
        out.lines().nth(1).unwrap().trim().parse::<u64>().unwrap(),
        null_skipped
    );
    // updates.rank (format 11) reads as null in every older run.
    let updates: u64 = m
        .files(reptrace_format::Table::Updates)
        .iter()
        .map(|f| f.rows)
        .sum();
    let out = cli().ok(&[
        "sql",
        r,
        "SELECT count(*) FROM updates WHERE rank IS NULL",
        "--format",
        "csv",
    ]);
    assert_eq!(
        out.lines().nth(1).unwrap().trim().parse::<u64>().unwrap(),
        updates
    );
    assert!(updates > 0);
    let shares = cli().ok(&[
        "query",
        r,
        "class_shares",
        "--param",
        "probe=1437",
        "--format",
        "csv",
    ]);
    assert!(shares.lines().count() > 2, "{shares}");

    // Attributing again adds files of the current version to the old run.
    cli().ok(&["attribute", r, "--probes", "ids:1500"]);
    let after = reptrace_format::Manifest::load(&run).unwrap();
    assert_eq!(after.format_version, version, "the run keeps its version");
    // The old attribution is kept beside the new one.
    let probes: Vec<&str> = after
        .attributions
        .iter()
        .map(|a| a.probes.as_str())
        .collect();
    assert_eq!(probes, ["ids:1437,1500", "ids:1500"]);
    cli().ok(&["verify", r]);
}
