//! `reptrace-torch`: every `reptrace` command, the ones that run a model
//! through libtorch (`train`, `demo`, `probe`) included. `reptrace` runs
//! this binary for those three; it can also be called directly.
use reptrace_cli::Command;
use std::process::ExitCode;

mod demo;
mod probe;
mod train;

/// The command line with every command.
type Cli = reptrace_cli::Cli<Box<train::TrainArgs>, demo::DemoArgs, probe::ProbeArgs>;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    reptrace_cli::main_with::<Cli>(&args, |cli, out| match &cli.command {
        Command::Analysis(command) => command.run(out),
        Command::Train(args) => train::run(args, out),
        Command::Demo(args) => demo::run(args, out),
        Command::Probe(args) => probe::run(args, out),
    })
}
