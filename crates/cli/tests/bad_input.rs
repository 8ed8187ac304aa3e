//! Bad input, one test per case, table-driven: every case damages a fresh
//! copy of a small trained and attributed digits run (or feeds a bad file or
//! value), runs the binary and checks that
//!
//! - it exits non-zero with exactly one line on stderr, `error: …`, that
//!   names the file, column or parameter at fault (the case's `words`), with
//!   no panic and no backtrace;
//! - nothing already recorded is lost or modified: every file of the run is
//!   byte for byte what it was before the command (the damaged one included);
//! - where the case says so, the run that the failing command itself was
//!   recording stays readable up to its last commit (non-finite loss, disk
//!   full).
#![cfg(feature = "tch")]
use reptrace_testkit::cli::{Cli, number_after, text};
use reptrace_testkit::digits::Digits;
use reptrace_testkit::files::{contents, copy_dir, first_file};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn reptrace(dir: &Path, args: &[String]) -> Output {
    Cli::new(env!("CARGO_BIN_EXE_reptrace"))
        .in_dir(dir)
        .output(args)
}

/// A digits run (1 epoch, test probes), attributed for [`PROBE`], made once.
fn fixture() -> &'static Path {
    let cli = Cli::new(env!("CARGO_BIN_EXE_reptrace"));
    let attribute = ["attribute", "{run}", "--probes", &format!("ids:{PROBE}")];
    Digits::new()
        .epochs(1)
        .batch(64)
        .then(&attribute)
        .shared(&cli)
}

/// A test probe of the digits (probe id = data row).
const PROBE: &str = "1437";

/// Where a case runs: `dir` holds `run` (a copy of the fixture) and whatever
/// the case writes.
struct Ctx {
    dir: PathBuf,
    run: PathBuf,
}

impl Ctx {
    fn damage(&self, rel: &str, f: impl FnOnce(Vec<u8>) -> Vec<u8>) {
        let p = self.run.join(rel);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, f(bytes)).unwrap();
    }
}

/// What a case checks after the command failed.
type After = fn(&Ctx, &str);

struct Case {
    /// Prepares the case (damages the run, writes a bad file); returns the
    /// words the error line must contain besides the static ones.
    setup: fn(&Ctx) -> Vec<String>,
    /// Arguments; `{run}` and `{dir}` are replaced.
    args: &'static [&'static str],
    /// Words the one error line must contain.
    words: &'static [&'static str],
    after: Option<After>,
}

impl Case {
    /// A case with no setup and no check after the error line.
    const fn plain(args: &'static [&'static str], words: &'static [&'static str]) -> Case {
        Case {
            setup: none,
            args,
            words,
            after: None,
        }
    }

    /// A usage error: no setup, exit code 2 checked after the error line.
    const fn usage(args: &'static [&'static str], words: &'static [&'static str]) -> Case {
        Case {
            after: Some(usage_exit_code),
            ..Case::plain(args, words)
        }
    }
}

fn check(case: Case) {
    let tmp = tempfile::tempdir().unwrap();
    check_at(tmp.path(), case);
}

fn check_at(dir: &Path, case: Case) {
    let ctx = Ctx {
        dir: dir.to_path_buf(),
        run: dir.join("run"),
    };
    copy_dir(fixture(), &ctx.run);
    let mut words: Vec<String> = case.words.iter().map(|w| w.to_string()).collect();
    words.extend((case.setup)(&ctx));
    let before = contents(&ctx.run);
    let args: Vec<String> = case
        .args
        .iter()
        .map(|a| {
            a.replace("{run}", ctx.run.to_str().unwrap())
                .replace("{dir}", ctx.dir.to_str().unwrap())
        })
        .collect();
    let o = reptrace(&ctx.dir, &args);
    let err = text(&o.stderr);
    assert!(
        !o.status.success() && o.status.code().is_some(),
        "{args:?} should fail with an exit code: {:?}, stderr {err:?}",
        o.status
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line wanted, got {err:?}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{args:?}: {line:?}");
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "thread 'main'"] {
        assert!(!err.contains(bad), "{args:?}: {err:?}");
    }
    for w in &words {
        assert!(
            line.contains(w.as_str()),
            "{args:?}: {line:?} should name {w:?}"
        );
    }
    let after = contents(&ctx.run);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "{args:?}: files of the run were added or removed"
    );
    for (path, bytes) in &before {
        assert!(
            after[path] == *bytes,
            "{args:?}: {} was modified",
            path.display()
        );
    }
    if let Some(f) = case.after {
        f(&ctx, line);
    }
}

fn none(_: &Ctx) -> Vec<String> {
    Vec::new()
}

/// Usage errors exit with 2, like clap's own (one line checked by `check`).
fn usage_exit_code(ctx: &Ctx, line: &str) {
    let o = reptrace(&ctx.dir, &["info".into(), "--no-such-flag".into()]);
    assert_eq!(o.status.code(), Some(2), "{line}");
}

/// `info --json` of a run a failed command was recording, and checks that
/// every committed table reads back and `verify` passes on the prefix.
fn committed_prefix_is_readable(ctx: &Ctx, run: &Path) -> serde_json::Value {
    let r = run.to_str().unwrap().to_owned();
    let o = reptrace(&ctx.dir, &["info".into(), r.clone(), "--json".into()]);
    assert!(o.status.success(), "info: {}", text(&o.stderr));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["status"], "aborted", "{info}");
    let last = info["last_step"].as_i64().expect("a committed step");
    // Every committed step reads back, and no row past the last commit.
    let o = reptrace(
        &ctx.dir,
        &[
            "sql".into(),
            r.clone(),
            "SELECT COUNT(*) AS n, MAX(step) AS last, COUNT(DISTINCT step) AS steps FROM steps"
                .into(),
            "--format".into(),
            "json".into(),
        ],
    );
    assert!(o.status.success(), "sql: {}", text(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows[0]["last"].as_i64(), Some(last), "{rows}");
    assert_eq!(rows[0]["steps"].as_i64(), Some(last + 1), "{rows}");
    let o = reptrace(
        &ctx.dir,
        &[
            "sql".into(),
            r.clone(),
            "SELECT layer, COUNT(*) AS n FROM updates GROUP BY layer".into(),
        ],
    );
    assert!(o.status.success(), "sql updates: {}", text(&o.stderr));
    let o = reptrace(&ctx.dir, &["verify".into(), r]);
    assert!(
        o.status.success(),
        "verify on the committed prefix: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    info
}

/// A tmpfs of one megabyte at `dir/small`, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path) -> Self {
        let at = dir.join("small");
        std::fs::create_dir_all(&at).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&at)
            .output()
            .expect("mount(8)");
        assert!(
            o.status.success(),
            "mounting a small tmpfs for the disk-full case needs root: {}",
            text(&o.stderr)
        );
        SmallDisk(at)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

macro_rules! cases {
    ($($name:ident => $case:expr;)*) => {
        $(
            #[test]
            fn $name() {
                check($case);
            }
        )*
    };
}

cases! {
    usage_unknown_flag => Case::usage(
        &["attribute", "{run}", "--probe", "test"],
        &["--probe", "tip:", "'--probes'", "see 'reptrace attribute --help'"],
    );
    usage_missing_argument => Case::usage(
        &["query", "{run}"],
        &["<QUERY>", "see 'reptrace query --help'"],
    );
    usage_bad_value => Case::usage(
        &["verify", "{run}", "--tolerance", "lots"],
        &["'lots'", "--tolerance", "see 'reptrace verify --help'"],
    );
    usage_unknown_subcommand => Case::usage(
        &["inof", "{run}"],
        &["'inof'", "info", "see 'reptrace --help'"],
    );
    run_directory_missing => Case::plain(&["info", "{dir}/no-such-run"], &["no-such-run"]);
    manifest_missing => Case {
        setup: |c| {
            std::fs::remove_file(c.run.join("manifest.json")).unwrap();
            vec![]
        },
        args: &["sql", "{run}", "SELECT COUNT(*) FROM steps"],
        words: &["manifest.json"],
        after: None,
    };
    manifest_truncated => Case {
        setup: |c| {
            c.damage("manifest.json", |b| b[..b.len() / 2].to_vec());
            vec![]
        },
        args: &["verify", "{run}"],
        words: &["manifest.json"],
        after: None,
    };
    manifest_of_an_unknown_format_version => Case {
        setup: |c| {
            c.damage("manifest.json", |b| {
                String::from_utf8(b)
                    .unwrap()
                    .replacen(&format!("\"format_version\": {}", reptrace_format::FORMAT_VERSION), "\"format_version\": 99", 1)
                    .into_bytes()
            });
            vec![]
        },
        args: &["info", "{run}"],
        words: &["manifest.json", "99"],
        after: None,
    };
    parquet_file_truncated => Case {
        setup: |c| {
            let f = first_file(&c.run, "updates", Some("fc2"));
            c.damage(&f, |b| b[..b.len() / 3].to_vec());
            vec![f]
        },
        args: &["sql", "{run}", "SELECT layer, SUM(update_norm) FROM updates GROUP BY layer"],
        words: &[],
        after: None,
    };
    parquet_file_truncated_on_attribute => Case {
        setup: |c| {
            let f = first_file(&c.run, "updates", Some("fc1"));
            c.damage(&f, |b| b[..b.len() - 100].to_vec());
            vec![f]
        },
        args: &["attribute", "{run}", "--probes", "ids:1440", "--layers", "fc1"],
        words: &[],
        after: None,
    };
    parquet_file_of_a_wrong_schema => Case {
        setup: |c| {
            // A steps file where an updates file belongs.
            let steps = first_file(&c.run, "steps", None);
            let f = first_file(&c.run, "updates", Some("fc3"));
            let bytes = std::fs::read(c.run.join(&steps)).unwrap();
            c.damage(&f, |_| bytes);
            vec![f, "column".into()]
        },
        args: &["sql", "{run}", "SELECT COUNT(*), SUM(update_norm) FROM updates"],
        words: &[],
        after: None,
    };
    unknown_layer => Case::plain(&["attribute", "{run}", "--layers", "fc9"], &["fc9", "fc1"]);
    unknown_probe => Case::plain(&["report", "{run}", "--probe", "987654"], &["987654"]);
    unknown_table => Case::plain(&["sql", "{run}", "SELECT * FROM gradients"], &["gradients"]);
    unknown_canned_query => Case::plain(
        &["query", "{run}", "top_influencers", "--param", "probe=1437"],
        &["top_influencers"],
    );
    bad_parameter_value => Case::plain(
        &["query", "{run}", "top_proponents", "--param", "probe=abc", "--param", "k=3"],
        &["probe", "abc"],
    );
    unknown_parameter => Case::plain(
        &["query", "{run}", "top_proponents", "--param", "probe=1437", "--param", "kk=3"],
        &["kk"],
    );
    bad_step_range => Case::plain(&["attribute", "{run}", "--steps", "9..2"], &["9..2"]);
    bad_flag_value_in_train => Case::plain(
        &["train", "--lr", "0", "--out", "{dir}/other"],
        &["--lr"],
    );
    sql_syntax_error => Case::plain(&["sql", "{run}", "SELEC layer FROM updates"], &["SELEC"]);
    sql_ddl => Case::plain(
        &["sql", "{run}", "CREATE TABLE t AS SELECT * FROM steps"],
        &["CREATE", "read-only"],
    );
    sql_drop => Case::plain(&["sql", "{run}", "DROP TABLE steps"], &["DROP"]);
    sql_dml => Case::plain(&["sql", "{run}", "INSERT INTO steps SELECT * FROM steps"], &["INSERT"]);
    sql_copy => Case {
        setup: none,
        args: &["sql", "{run}", "COPY steps TO '{dir}/steps.csv'"],
        words: &["COPY"],
        after: Some(|c, _| assert!(!c.dir.join("steps.csv").exists(), "COPY wrote a file")),
    };
    sql_reading_files_outside_the_run => Case::plain(
        &["sql", "{run}", "SELECT * FROM '/etc/hosts'"],
        &["/etc/hosts"],
    );
    sql_reading_files_through_a_function => Case::plain(
        &["sql", "{run}", "SELECT * FROM read_parquet('{run}/steps/part-000001.parquet')"],
        &["read_parquet"],
    );
    csv_with_ragged_rows => Case {
        setup: |c| {
            std::fs::write(c.dir.join("ragged.csv"), "0.5,0.2,1\n0.1,0.4,0\n0.3,0\n").unwrap();
            vec![]
        },
        args: &["train", "--data", "csv:ragged.csv", "--out", "{dir}/csv-run"],
        words: &["ragged.csv:3", "--data"],
        after: Some(|c, _| assert!(!c.dir.join("csv-run").exists(), "a run was started")),
    };
    csv_with_a_non_numeric_value => Case {
        setup: |c| {
            std::fs::write(c.dir.join("words.csv"), "0.5,0.2,1\n0.1,0.4,0\n0.3,high,1\n").unwrap();
            vec![]
        },
        args: &["train", "--data", "csv:words.csv", "--out", "{dir}/csv-run"],
        words: &["words.csv:3", "column 1", "high"],
        after: Some(|c, _| assert!(!c.dir.join("csv-run").exists(), "a run was started")),
    };
    non_finite_loss_during_training => Case {
        setup: none,
        // The learning rate makes the loss overflow within the first epoch.
        args: &["train", "--lr", "1e6", "--epochs", "3", "--out", "{dir}/diverged"],
        words: &["non-finite loss", "step"],
        after: Some(|c, line| {
            let info = committed_prefix_is_readable(c, &c.dir.join("diverged"));
            // Committed up to the last good step: the one before the error's.
            let failed: i64 = number_after(line, "at step ");
            assert_eq!(info["last_step"].as_i64(), Some(failed - 1), "{info}");
            let reason = info["abort_reason"].as_str().unwrap_or_default();
            assert!(reason.contains("non-finite loss"), "{info}");
        }),
    };
}

/// Recording onto a disk that fills up: the command stops with one line, and
/// the run is readable up to its last commit.
#[test]
fn disk_full_during_recording() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(tmp.path());
    check_at(
        tmp.path(),
        Case {
            setup: none,
            args: &["train", "--epochs", "20", "--out", "{dir}/small/run"],
            words: &["No space left"],
            after: Some(|c, _| {
                let info = committed_prefix_is_readable(c, &c.dir.join("small/run"));
                assert!(info["last_step"].as_i64().unwrap() >= 0, "{info}");
            }),
        },
    );
    drop(disk);
}
