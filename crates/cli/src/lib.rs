//! The `reptrace` command line as a library, shared by its two binaries.
//!
//! - `reptrace` ([`Analysis`] commands: `info`, `attribute`, `sql`,
//!   `query`, `verify`, `report`, `export`, `compact`) reads and derives from runs and
//!   does not link libtorch, so it starts like a database shell. It hands
//!   `train`, `demo` and `probe` to its sibling binary.
//! - `reptrace-torch` (feature `tch`, on by default) has every command,
//!   the ones that run a model through libtorch included.
//!
//! Each subcommand is one variant with its arguments struct in
//! `cmd/<name>.rs`; it writes its output to a `&mut dyn Write` so tests can
//! read it. [`main_with`] is the shared `main`: errors print as one line
//! `error: …` (the context chain joined by ": ") with exit code 1, 130 for
//! a command stopped by Ctrl-C ([`handle_interrupts`]); usage
//! errors are one `error:` line too (clap's message, its tip, and which
//! `--help` to read) and exit with 2; `--help` and `--version` print as
//! usual; a closed stdout pipe counts as success.
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::ffi::OsString;
use std::io::{self, Write};
use std::process::ExitCode;

pub mod cmd;

/// Explain a trained network by tracing its training: record per-instance
/// updates to Parquet, attribute, and query them with SQL.
// The command line of both binaries; `T`, `D` and `P` are the arguments of
// `train`, `demo` and `probe`. (A plain comment: the doc comment above is
// the `--help` text.)
#[derive(Debug, Parser)]
#[command(name = "reptrace", version, about, propagate_version = true)]
pub struct Cli<T: Args, D: Args, P: Args> {
    /// The command given.
    #[command(subcommand)]
    pub command: Command<T, D, P>,
}

/// Every `reptrace` command: the [`Analysis`] ones and the three that run a
/// model through libtorch.
// The variants' sizes are the binaries' (`reptrace-torch` boxes its largest).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command<T: Args, D: Args, P: Args> {
    /// The commands that read a run.
    #[command(flatten)]
    Analysis(Analysis),
    /// Train a model (SGD, Adam or AdamW) and record its trace.
    Train(T),
    /// Train the MLP on the bundled digits with tracing and show what was recorded.
    Demo(D),
    /// Add new inputs as probes of a run, at any time after training.
    Probe(P),
}

/// The commands that read a run (and `attribute`, which adds derived rows
/// to it): everything but training and forward passes.
#[derive(Debug, Subcommand)]
pub enum Analysis {
    /// Show a run's manifest, commits, row counts and sizes on disk.
    Info(cmd::info::InfoArgs),
    /// Compute the contributions of every update record to the chosen probes.
    Attribute(cmd::attribute::AttributeArgs),
    /// Run one read-only SQL query over a run's tables.
    Sql(cmd::sql::SqlArgs),
    /// Run a canned query (queries/*.sql) or a .sql file with parameters.
    Query(cmd::query::QueryArgs),
    /// Check a run's integrity and the completeness of its trace.
    Verify(cmd::verify::VerifyArgs),
    /// Write one probe's explanation as a self-contained HTML page.
    Report(cmd::report::ReportArgs),
    /// Stream one table of a run to Parquet, CSV or JSON lines.
    Export(cmd::export::ExportArgs),
    /// Rewrite a run recorded with `--compression none` in the storage encoding.
    Compact(cmd::compact::CompactArgs),
}

impl Analysis {
    /// Runs the command, writing its output to `out`. Ctrl-C (SIGINT) or
    /// SIGTERM stops it cleanly ([`handle_interrupts`]).
    pub fn run(&self, out: &mut dyn Write) -> anyhow::Result<()> {
        handle_interrupts();
        match self {
            Self::Info(args) => cmd::info::run(args, out),
            Self::Attribute(args) => cmd::attribute::run(args, out),
            Self::Sql(args) => cmd::sql::run(args, out),
            Self::Query(args) => cmd::query::run(args, out),
            Self::Verify(args) => cmd::verify::run(args, out),
            Self::Report(args) => cmd::report::run(args, out),
            Self::Export(args) => cmd::export::run(args, out),
            Self::Compact(args) => cmd::compact::run(args, out),
        }
    }
}

/// Installs the handler of SIGINT (Ctrl-C) and SIGTERM, once: the first
/// signal asks the running command to stop where that is safe
/// ([`reptrace_analyze::interrupt`]); it then fails with one line and exit
/// status 128 + the signal (130 for Ctrl-C), having removed what it had
/// begun to write. A second signal ends the process at once.
pub fn handle_interrupts() {
    #[cfg(unix)]
    {
        use signal_hook::consts::{SIGINT, SIGTERM};
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
                return;
            };
            let _ = std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    for signal in signals.forever() {
                        if reptrace_analyze::interrupt::signal().is_some() {
                            eprintln!("error: interrupted again: stopping at once");
                            std::process::exit(128 + signal);
                        }
                        reptrace_analyze::interrupt::raise(signal);
                    }
                });
        });
    }
}

/// The interruption an error comes from, if it does.
fn interruption(e: &anyhow::Error) -> Option<&reptrace_analyze::Error> {
    e.chain().find_map(|c| match c.downcast_ref() {
        Some(i @ reptrace_analyze::Error::Interrupted { .. }) => Some(i),
        _ => None,
    })
}

/// The line and exit status of an error: for an interrupted command the
/// interruption alone and 128 + the signal, else the whole chain and 1.
fn error_line(e: &anyhow::Error) -> (String, u8) {
    match interruption(e) {
        Some(i @ reptrace_analyze::Error::Interrupted { signal }) => (
            format!("error: {i}"),
            u8::try_from(128 + signal).unwrap_or(1),
        ),
        _ => (format!("error: {e:#}"), 1),
    }
}

/// The commands that need libtorch; `reptrace` hands them to
/// `reptrace-torch`.
pub const TORCH_COMMANDS: [&str; 3] = ["train", "demo", "probe"];

/// Whether the error is a write to a closed pipe (`reptrace … | head`).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// A clap usage error as one line: clap's message with what it lists under
/// it (missing arguments, tips), and the `--help` to read: the subcommand's
/// when one was given.
fn usage_line<C: CommandFactory>(e: &clap::Error, args: &[OsString]) -> String {
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut message = lines
        .next()
        .map_or("invalid usage", |l| l.trim_start_matches("error:").trim())
        .to_owned();
    let mut listed = Vec::new();
    for line in lines {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        match line.strip_prefix("tip:") {
            Some(tip) => message.push_str(&format!(" (tip: {})", tip.trim())),
            None => listed.push(line),
        }
    }
    if !listed.is_empty() {
        let sep = if message.ends_with(':') { " " } else { ": " };
        message = format!("{message}{sep}{}", listed.join(", "));
    }
    let sub = C::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .find(|name| args.get(1).and_then(|a| a.to_str()) == Some(name.as_str()));
    let command = match sub {
        Some(s) => format!("reptrace {s}"),
        None => "reptrace".to_owned(),
    };
    format!("error: {message}; see '{command} --help'")
}

/// The shared `main` of both binaries: parses `args` as `C`, runs
/// `dispatch` with stdout, and turns the outcome into output and an exit
/// status (module docs).
pub fn main_with<C: Parser>(
    args: &[OsString],
    dispatch: impl FnOnce(&C, &mut dyn Write) -> anyhow::Result<()>,
) -> ExitCode {
    let cli = match C::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            eprintln!("{}", usage_line::<C>(&e, args));
            return ExitCode::from(2);
        }
    };
    // Line-buffered: long commands show their output as they go.
    let mut out = io::stdout().lock();
    let result = dispatch(&cli, &mut out).and_then(|()| Ok(out.flush()?));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // Whatever was printed before the error goes out first.
            let _ = out.flush();
            let (line, status) = error_line(&e);
            eprintln!("{line}");
            ExitCode::from(status)
        }
    }
}
