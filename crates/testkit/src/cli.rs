//! Running a binary (`reptrace`, `reptrace-torch`) as a user does, and
//! reading what it prints.
//!
//! The test kit cannot see `CARGO_BIN_EXE_*` itself (Cargo sets it only for
//! the binary's own integration tests), so a test hands the path in:
//!
//! ```no_run
//! # use reptrace_testkit::cli::Cli;
//! let cli = Cli::new("target/debug/reptrace"); // env!("CARGO_BIN_EXE_reptrace") in a test
//! let out = cli.ok(&["info", "run"]);
//! cli.refused(&["info", "no-such-run"], &["no-such-run"]);
//! # let _ = out;
//! ```
//!
//! Every command runs with `OMP_NUM_THREADS=1` (training is single-threaded
//! and repeatable) and `RUST_BACKTRACE=1` (a panic shows where).
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A binary to run, and the directory it runs in (the test's own working
/// directory unless [`Cli::in_dir`] says otherwise).
#[derive(Clone, Debug)]
pub struct Cli {
    bin: PathBuf,
    dir: Option<PathBuf>,
}

impl Cli {
    /// The binary at `bin` (a test passes `env!("CARGO_BIN_EXE_reptrace")`).
    pub fn new(bin: impl AsRef<Path>) -> Self {
        Cli {
            bin: bin.as_ref().to_path_buf(),
            dir: None,
        }
    }

    /// The same binary, run in `dir` (relative paths in arguments resolve
    /// there).
    pub fn in_dir(&self, dir: impl AsRef<Path>) -> Self {
        Cli {
            bin: self.bin.clone(),
            dir: Some(dir.as_ref().to_path_buf()),
        }
    }

    /// The path of the binary.
    pub fn path(&self) -> &Path {
        &self.bin
    }

    /// A command for the binary, in its directory, with the kit's
    /// environment; for tests that spawn, pipe or kill it themselves.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("OMP_NUM_THREADS", "1").env("RUST_BACKTRACE", "1");
        if let Some(dir) = &self.dir {
            c.current_dir(dir);
        }
        c
    }

    /// Runs the binary with `args` and returns what it did.
    pub fn output<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.command()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.bin.display()))
    }

    /// Runs a command that must succeed; returns its stdout. Panics with the
    /// arguments, stdout and stderr when it fails.
    pub fn ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let o = self.output(args);
        assert!(
            o.status.success(),
            "{:?}: {}{}",
            args.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
            text(&o.stdout),
            text(&o.stderr)
        );
        text(&o.stdout)
    }

    /// Runs a command that must be refused: exit code 1 and one line on
    /// stderr naming each of `words`. Returns that line.
    pub fn refused<S: AsRef<OsStr>>(&self, args: &[S], words: &[&str]) -> String {
        let o = self.output(args);
        assert_one_line_error(&o, words)
    }

    /// Rows of `sql RUN QUERY --format json`, as JSON objects (a NULL is a
    /// missing key; no rows is an empty list).
    pub fn sql_json(&self, run: impl AsRef<Path>, query: &str) -> Vec<Value> {
        json_rows(&self.ok(&sql_args(run.as_ref(), query, "json")))
    }

    /// Rows of `sql RUN QUERY --format csv`, as named string cells.
    pub fn sql_csv(&self, run: impl AsRef<Path>, query: &str) -> Vec<BTreeMap<String, String>> {
        csv_rows(&self.ok(&sql_args(run.as_ref(), query, "csv")))
    }

    /// Rows of the canned query `name` on `run` with `--param` values
    /// (`key=value`), as JSON objects.
    pub fn query_json(&self, run: impl AsRef<Path>, name: &str, params: &[&str]) -> Vec<Value> {
        json_rows(&self.ok(&query_args(run.as_ref(), name, params, "json")))
    }

    /// Rows of the canned query `name` on `run` with `--param` values, as
    /// named string cells of its CSV output.
    pub fn query_csv(
        &self,
        run: impl AsRef<Path>,
        name: &str,
        params: &[&str],
    ) -> Vec<BTreeMap<String, String>> {
        csv_rows(&self.ok(&query_args(run.as_ref(), name, params, "csv")))
    }

    /// `info RUN --json`, parsed.
    pub fn info_json(&self, run: impl AsRef<Path>) -> Value {
        let out = self.ok(&[
            OsStr::new("info"),
            run.as_ref().as_os_str(),
            OsStr::new("--json"),
        ]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("info --json: {e}: {out}"))
    }
}

fn sql_args<'a>(run: &'a Path, query: &'a str, format: &'a str) -> [&'a OsStr; 5] {
    let [sql, query, flag, format] = ["sql", query, "--format", format].map(OsStr::new);
    [sql, run.as_os_str(), query, flag, format]
}

fn query_args<'a>(
    run: &'a Path,
    name: &'a str,
    params: &'a [&'a str],
    format: &'a str,
) -> Vec<&'a OsStr> {
    let mut args = vec![OsStr::new("query"), run.as_os_str(), OsStr::new(name)];
    for p in params {
        args.extend([OsStr::new("--param"), OsStr::new(p)]);
    }
    args.extend([OsStr::new("--format"), OsStr::new(format)]);
    args
}

/// Bytes of a program's output as text (lossy).
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts a refusal: exit code 1 and stderr exactly one line that names
/// each of `words`. Returns the line.
pub fn assert_one_line_error(out: &Output, words: &[&str]) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    for w in words {
        assert!(err.contains(w), "error does not name {w:?}: {err}");
    }
    err.trim_end().to_owned()
}

/// Asserts a refusal as [`assert_one_line_error`] does, and that the line
/// starts with `start` (`"error: "`, or more of the message). Returns the
/// line.
pub fn assert_error_starting(out: &Output, start: &str, words: &[&str]) -> String {
    let err = assert_one_line_error(out, words);
    assert!(
        err.starts_with(start),
        "error does not start with {start:?}: {err}"
    );
    err
}

/// The number that follows `marker` in `text` (up to the next white space);
/// panics naming the marker when there is none.
pub fn number_after<T: std::str::FromStr>(text: &str, marker: &str) -> T {
    text.split(marker)
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no number after {marker:?} in {text}"))
}

/// JSON rows as printed by `--format json` (empty output: no rows).
pub fn json_rows(out: &str) -> Vec<Value> {
    if out.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str(out).unwrap_or_else(|e| panic!("json rows: {e}: {out}"))
}

/// A CSV result (header line, then rows split on `,`) as named string cells.
pub fn csv_rows(out: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = out.lines();
    let header: Vec<String> = lines
        .next()
        .expect("csv header")
        .split(',')
        .map(str::to_owned)
        .collect();
    lines
        .map(|l| {
            header
                .iter()
                .cloned()
                .zip(l.split(',').map(str::to_owned))
                .collect()
        })
        .collect()
}

/// A number field of a JSON row; panics naming the key when it is missing.
pub fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}
