//! Queries under load, through the real `reptrace` binary on a real digits
//! run: a sort and a grouped aggregation larger than the memory limit spill
//! to disk and give the answers they give without a limit; a query that cannot spill fails with one
//! line naming the limit; Ctrl-C (SIGINT) stops `sql`, `export` and
//! `attribute` within two seconds with exit status 130, leaving no output
//! file and the run as it was; spill directories are empty afterwards.
use arrow::array::RecordBatch;
use reptrace_testkit::cli::{Cli, text};
use reptrace_testkit::digits::Digits;
use reptrace_testkit::files::{self, copy_dir, entries, writing};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn cli() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_reptrace"))
}

/// One digits run for every test (3 epochs, the 360 test probes), with
/// their contributions materialised: 4.7 M rows.
fn run() -> &'static Path {
    let digits = Digits::new().epochs(3);
    digits
        .then(&["attribute", "{run}", "--probes", "test", "--quiet"])
        .shared(&cli())
}

/// Every file of the run with its size, and the manifest's text.
fn state(run: &Path) -> (Vec<(PathBuf, u64)>, String) {
    let manifest = std::fs::read_to_string(run.join("manifest.json")).unwrap();
    (files::sizes(run), manifest)
}

fn read_parquet(path: &Path) -> RecordBatch {
    let batches = files::read_parquet(path);
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// The sort of the issue, with a total order.
const SORT: &str = "SELECT probe_id, layer, step, instance_id, dot FROM contributions \
                    WHERE instance_id IS NOT NULL \
                    ORDER BY dot DESC, probe_id, layer, step, instance_id";

/// `spill_count=N` summed over the operators of an EXPLAIN ANALYZE.
/// The shared run, its path as text, and a fresh directory for spill files.
fn run_and_spill_dir() -> (&'static Path, &'static str, tempfile::TempDir) {
    let run = run();
    (run, run.to_str().unwrap(), tempfile::tempdir().unwrap())
}

/// `reptrace sql RUN SQL --memory-limit LIMIT --spill-dir SPILL`'s output.
fn explain_under(run: &str, sql: &str, limit: &str, spill: &str) -> String {
    limited_ok(&[
        "sql",
        run,
        sql,
        "--memory-limit",
        limit,
        "--spill-dir",
        spill,
    ])
}

/// A command under a memory limit that must succeed; its stdout.
///
/// A run that has not ended after two minutes (a healthy one takes seconds)
/// is stopped with SIGTERM (SIGKILL after 10 s more) and fails the test: a
/// query that hangs is a bug. DataFusion 55.2's `RepartitionExec` spill
/// deadlock (apache/datafusion#24883) hung this file's grouped aggregation
/// once before the session's pool stopped `RepartitionExec` from spilling
/// (`reptrace_analyze::limits`, tested in `tests/analyze/limits.rs`).
fn limited_ok(args: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let (out, err) = (tmp.path().join("out"), tmp.path().join("err"));
    let mut child = cli()
        .command()
        .args(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let stopped = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() && Instant::now() < stopped {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out).unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap();
    let Some(status) = status else {
        panic!("{args:?}: no answer after 120 s (a hung query): {stdout}{stderr}")
    };
    assert!(status.success(), "{args:?}: {stdout}{stderr}");
    stdout
}

fn spills(explain: &str) -> u64 {
    explain
        .split("spill_count=")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

#[test]
fn a_sort_larger_than_the_limit_spills_and_gives_the_same_answer() {
    let (run, r, dir) = run_and_spill_dir();
    let spill = dir.path().join("spill");
    let s = spill.to_str().unwrap();
    let before = state(run);

    let rows = cli().ok(&[
        "sql",
        r,
        "SELECT count(*) AS n FROM contributions WHERE instance_id IS NOT NULL",
        "--format",
        "csv",
    ]);
    let rows: u64 = rows.lines().nth(1).unwrap().parse().unwrap();
    assert!(rows > 4_000_000, "{rows} rows");

    // Unlimited: no spills; 64 MiB: the sort spills.
    let explain = format!("EXPLAIN ANALYZE {SORT}");
    let free = explain_under(r, &explain, "none", s);
    assert_eq!(spills(&free), 0, "{free}");
    let limited = explain_under(r, &explain, "64MiB", s);
    assert!(spills(&limited) > 0, "no spill under 64 MiB:\n{limited}");
    assert_eq!(entries(&spill), Vec::<String>::new(), "spill files left");

    // The same rows in the same order.
    let free_out = dir.path().join("free.parquet");
    let limited_out = dir.path().join("limited.parquet");
    let written = cli().ok(&[
        "sql",
        r,
        SORT,
        "--format",
        "parquet",
        "--out",
        free_out.to_str().unwrap(),
        "--memory-limit",
        "none",
    ]);
    assert_eq!(
        written.trim(),
        format!("{rows} rows written to {}", free_out.display())
    );
    // The limit from the environment, the spill directory too.
    let o = cli()
        .command()
        .args([
            "sql",
            r,
            SORT,
            "--format",
            "parquet",
            "--out",
            limited_out.to_str().unwrap(),
        ])
        .env("REPTRACE_MEMORY_LIMIT", "64MiB")
        .env("REPTRACE_SPILL_DIR", s)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (a, b) = (read_parquet(&free_out), read_parquet(&limited_out));
    assert_eq!(a.num_rows() as u64, rows);
    assert_eq!(a, b, "the spilled sort differs");
    let dots = a
        .column_by_name("dot")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::Float64Array>()
        .unwrap();
    assert!(dots.values().windows(2).all(|w| w[0] >= w[1]), "not sorted");
    assert_eq!(entries(&spill), Vec::<String>::new(), "spill files left");
    assert_eq!(
        entries(dir.path()),
        ["free.parquet", "limited.parquet", "spill"]
    );
    assert_eq!(state(run), before, "the run changed");
}

#[test]
fn a_grouped_aggregation_larger_than_the_limit_spills_and_counts_the_same() {
    let (_, r, dir) = run_and_spill_dir();
    let s = dir.path().to_str().unwrap();
    // One group per contribution row: 4.7 M groups.
    let groups = "SELECT count(*) AS groups, sum(n) AS n FROM (SELECT probe_id, layer, step, \
                  instance_id, count(*) AS n FROM contributions GROUP BY 1, 2, 3, 4)";
    let free = cli().ok(&[
        "sql",
        r,
        groups,
        "--format",
        "csv",
        "--memory-limit",
        "none",
    ]);
    let limited = limited_ok(&[
        "sql",
        r,
        groups,
        "--format",
        "csv",
        "--memory-limit",
        "64MiB",
        "--spill-dir",
        s,
    ]);
    assert_eq!(free, limited);
    let counts: Vec<u64> = free
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .map(|c| c.parse().unwrap())
        .collect();
    assert!(counts[0] > 4_000_000 && counts[0] == counts[1], "{free}");
    let explain = format!("EXPLAIN ANALYZE {groups}");
    let limited = explain_under(r, &explain, "64MiB", s);
    assert!(spills(&limited) > 0, "no spill under 64 MiB:\n{limited}");
    assert_eq!(
        entries(dir.path()),
        Vec::<String>::new(),
        "spill files left"
    );
}

#[test]
fn a_query_that_cannot_spill_fails_with_one_line_naming_the_limit() {
    let (run, r, dir) = run_and_spill_dir();
    let s = dir.path().to_str().unwrap();
    let before = state(run);
    // The build side of a hash join stays in memory: 4.7 M rows do not fit.
    let join = "SELECT count(*) FROM contributions a JOIN contributions b \
                ON a.dot = b.dot AND a.probe_id = b.probe_id";
    let o = cli().output(&["sql", r, join, "--memory-limit", "64MiB", "--spill-dir", s]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: the query needs more memory than its limit of 64.0 MiB"),
        "{err}"
    );
    assert!(
        err.contains("--memory-limit") && err.contains("REPTRACE_MEMORY_LIMIT"),
        "{err}"
    );
    assert_eq!(
        entries(dir.path()),
        Vec::<String>::new(),
        "spill files left"
    );
    assert_eq!(state(run), before, "the run changed");

    // Bad limits are refused before anything runs.
    let o = cli().output(&["sql", r, "SELECT 1", "--memory-limit", "lots"]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: invalid --memory-limit \"lots\": expected a size"),
        "{err}"
    );
    let o = cli()
        .command()
        .args(["query", r, "class_shares", "--param", "probe=1437"])
        .env("REPTRACE_MEMORY_LIMIT", "1KB")
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert!(
        err.starts_with("error: invalid REPTRACE_MEMORY_LIMIT \"1KB\": at least 16.0 MiB"),
        "{err}"
    );
    let inside = run.join("spill");
    let o = cli().output(&[
        "sql",
        r,
        "SELECT 1",
        "--spill-dir",
        inside.to_str().unwrap(),
    ]);
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("invalid spill directory") && err.contains("is inside the run"),
        "{err}"
    );
    assert_eq!(state(run), before, "the run changed");
}

/// Starts `reptrace ARGS`, sends SIGINT as soon as `ready` says the work
/// is under way, and returns its output and how long it took to end after
/// the signal.
fn interrupt(args: &[&str], ready: impl Fn() -> bool) -> (Output, Duration) {
    let mut child = cli()
        .command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !ready() {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} ended ({status}) before it was interrupted: {}",
                text(&out.stderr)
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{args:?} never got going"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let sent = Instant::now();
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    (out, sent.elapsed())
}

/// Whether a spill file exists under `dir`.
fn spilling(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        e.path().is_dir() && std::fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_some())
    })
}

fn check_interrupted(what: &str, out: &Output, took: Duration) {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(130),
        "{what}: ended with {:?} (it must still be running when interrupted): {err}",
        out.status
    );
    assert!(
        took < Duration::from_secs(2),
        "{what}: took {took:?} to stop"
    );
    assert_eq!(err.lines().count(), 1, "{what}: {err}");
    assert!(
        err.starts_with("error: interrupted by SIGINT (Ctrl-C)"),
        "{what}: {err}"
    );
}

#[test]
fn ctrl_c_stops_a_long_query_export_and_attribution_cleanly() {
    // A copy: the other tests compare the shared run before and after.
    let copy = tempfile::tempdir().unwrap();
    let run = &copy.path().join("digits");
    copy_dir(self::run(), run);
    let r = run.to_str().unwrap();
    let before = state(run);
    let dir = tempfile::tempdir().unwrap();
    let spill = dir.path().join("spill");
    let s = spill.to_str().unwrap();

    // A cross join of 10^10 rows: minutes of work.
    let long = "SELECT count(*) FROM updates a, updates b, instances c \
                WHERE a.step + b.step + c.instance_id < 0";
    let out_file = dir.path().join("count.csv");
    let started = Instant::now();
    let (out, took) = interrupt(
        &[
            "sql",
            r,
            long,
            "--format",
            "csv",
            "--out",
            out_file.to_str().unwrap(),
            "--spill-dir",
            s,
        ],
        || started.elapsed() > Duration::from_millis(1500),
    );
    check_interrupted("sql", &out, took);

    // A sort that spills under its limit, interrupted while it spills.
    let sorted = dir.path().join("sorted.parquet");
    let (out, took) = interrupt(
        &[
            "sql",
            r,
            SORT,
            "--format",
            "parquet",
            "--out",
            sorted.to_str().unwrap(),
            "--memory-limit",
            "32MiB",
            "--spill-dir",
            s,
        ],
        || spilling(&spill),
    );
    check_interrupted("spilling sort", &out, took);

    // Every contribution exported, interrupted while it writes.
    let exported = dir.path().join("all.csv");
    let (out, took) = interrupt(
        &[
            "export",
            r,
            "--table",
            "contributions",
            "--format",
            "csv",
            "--out",
            exported.to_str().unwrap(),
            "--spill-dir",
            s,
        ],
        || writing(dir.path()),
    );
    check_interrupted("export", &out, took);

    // No output file, no temporary file, no spill file.
    let left: Vec<String> = entries(dir.path());
    assert!(left.iter().all(|n| n == "spill"), "left behind: {left:?}");
    if spill.exists() {
        assert_eq!(entries(&spill), Vec::<String>::new(), "spill files left");
    }
    assert_eq!(state(run), before, "the run changed");

    // Attributing every probe again (4.7 M rows), interrupted: no part, no
    // commit.
    let (out, took) = interrupt(&["attribute", r, "--probes", "all", "--quiet"], || {
        writing(run)
    });
    check_interrupted("attribute", &out, took);
    assert_eq!(state(run), before, "attribute left something in the run");
    let o = cli().output(&["verify", r]);
    assert!(o.status.success(), "verify: {}", text(&o.stdout));
}
