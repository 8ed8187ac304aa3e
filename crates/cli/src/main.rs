//! `reptrace`: the command line of the reptrace trace store.
//!
//! Each subcommand is one variant of [`Command`] with its arguments struct in
//! `cmd/<name>.rs` and one arm in [`dispatch`]; it writes its output to a
//! `&mut dyn Write` so tests can read it. Errors print as one line
//! `error: …` (the context chain joined by ": ") with exit code 1; usage
//! errors are one `error:` line too (clap's message, its tip, and which
//! `--help` to read) and exit with 2; `--help` and `--version` print as
//! usual; a closed stdout pipe counts as success.
use clap::{Parser, Subcommand};
use std::io::{self, Write};
use std::process::ExitCode;

mod cmd;

/// Explain a trained network by tracing its training: record per-instance
/// updates to Parquet, attribute, and query them with SQL.
#[derive(Debug, Parser)]
#[command(name = "reptrace", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    /// Train a model (SGD, Adam or AdamW) and record its trace.
    #[cfg(feature = "tch")]
    Train(Box<cmd::train::TrainArgs>),
    /// Train the MLP on the bundled digits with tracing and show what was recorded.
    #[cfg(feature = "tch")]
    Demo(cmd::demo::DemoArgs),
    /// Add new inputs as probes of a run, at any time after training.
    #[cfg(feature = "tch")]
    Probe(cmd::probe::ProbeArgs),
}

fn dispatch(command: &Command, out: &mut dyn Write) -> anyhow::Result<()> {
    match command {
        Command::Info(args) => cmd::info::run(args, out),
        Command::Attribute(args) => cmd::attribute::run(args, out),
        Command::Sql(args) => cmd::sql::run(args, out),
        Command::Query(args) => cmd::query::run(args, out),
        Command::Verify(args) => cmd::verify::run(args, out),
        Command::Report(args) => cmd::report::run(args, out),
        Command::Export(args) => cmd::export::run(args, out),
        #[cfg(feature = "tch")]
        Command::Train(args) => cmd::train::run(args, out),
        #[cfg(feature = "tch")]
        Command::Demo(args) => cmd::demo::run(args, out),
        #[cfg(feature = "tch")]
        Command::Probe(args) => cmd::probe::run(args, out),
    }
}

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
fn usage_line(e: &clap::Error, args: &[std::ffi::OsString]) -> String {
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
    let sub = <Cli as clap::CommandFactory>::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .find(|name| args.get(1).and_then(|a| a.to_str()) == Some(name.as_str()));
    let command = match sub {
        Some(s) => format!("reptrace {s}"),
        None => "reptrace".to_owned(),
    };
    format!("error: {message}; see '{command} --help'")
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
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
            eprintln!("{}", usage_line(&e, &args));
            return ExitCode::from(2);
        }
    };
    // Line-buffered: long commands show their output as they go.
    let mut out = io::stdout().lock();
    let result = dispatch(&cli.command, &mut out).and_then(|()| Ok(out.flush()?));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // Whatever was printed before the error goes out first.
            let _ = out.flush();
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
