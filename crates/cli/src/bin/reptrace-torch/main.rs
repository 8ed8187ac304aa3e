//! `reptrace-torch`: every `reptrace` command, the ones that run a model
//! through libtorch (`train`, `demo`, `probe`) included. `reptrace` runs
//! this binary for those three; it can also be called directly.
use clap::{Parser, Subcommand};
use reptrace_cli::Analysis;
use std::process::ExitCode;

mod demo;
mod probe;
mod train;

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
    #[command(flatten)]
    Analysis(Analysis),
    /// Train a model (SGD, Adam or AdamW) and record its trace.
    Train(Box<train::TrainArgs>),
    /// Train the MLP on the bundled digits with tracing and show what was recorded.
    Demo(demo::DemoArgs),
    /// Add new inputs as probes of a run, at any time after training.
    Probe(probe::ProbeArgs),
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    reptrace_cli::main_with::<Cli>(&args, |cli, out| match &cli.command {
        Command::Analysis(command) => command.run(out),
        Command::Train(args) => train::run(args, out),
        Command::Demo(args) => demo::run(args, out),
        Command::Probe(args) => probe::run(args, out),
    })
}
