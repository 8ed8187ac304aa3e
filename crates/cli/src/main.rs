//! `reptrace`: the command line of the reptrace trace store.
//!
//! This binary runs the analysis commands itself and does not link
//! libtorch; `train`, `demo` and `probe` run in `reptrace-torch`, the binary
//! beside it, which this one executes in its place (same process id,
//! arguments, standard streams and exit status). See the library docs for
//! how output and errors look.
use reptrace_cli::{Command, TORCH_COMMANDS};
use std::ffi::OsString;
use std::process::ExitCode;

/// The command line, with `train`, `demo` and `probe` handed over whole.
type Cli = reptrace_cli::Cli<Torch, Torch, Torch>;

/// The arguments of a command that `reptrace-torch` parses.
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
struct Torch {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

/// Runs `reptrace-torch` with `args` in place of this process; returns
/// only when that is impossible, with the error line printed.
fn exec_torch(args: &[OsString]) -> ExitCode {
    let command = args
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy())
        .find(|a| TORCH_COMMANDS.contains(&a.as_ref()))
        .map_or_else(|| "train".to_owned(), |a| a.into_owned());
    let torch = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(format!("reptrace-torch{}", std::env::consts::EXE_SUFFIX)),
        Err(e) => {
            eprintln!("error: `reptrace {command}`: cannot locate this executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !torch.is_file() {
        eprintln!(
            "error: `reptrace {command}` runs models through libtorch, which this build leaves out: \
             {} is missing (build reptrace-cli with its default feature `tch`)",
            torch.display()
        );
        return ExitCode::FAILURE;
    }
    let mut child = std::process::Command::new(&torch);
    child.args(&args[1..]);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let e = child.arg0("reptrace").exec();
        eprintln!(
            "error: `reptrace {command}`: cannot run {}: {e}",
            torch.display()
        );
        ExitCode::FAILURE
    }
    #[cfg(not(unix))]
    match child.status() {
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!(
                "error: `reptrace {command}`: cannot run {}: {e}",
                torch.display()
            );
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    // `reptrace train …` and `reptrace help train`.
    let word = |i: usize| args.get(i).and_then(|a| a.to_str());
    let torch_word = |w: Option<&str>| w.is_some_and(|w| TORCH_COMMANDS.contains(&w));
    if torch_word(word(1)) || (word(1) == Some("help") && torch_word(word(2))) {
        return exec_torch(&args);
    }
    let mut torch = false;
    let code = reptrace_cli::main_with::<Cli>(&args, |cli, out| match &cli.command {
        Command::Analysis(command) => command.run(out),
        Command::Train(_) | Command::Demo(_) | Command::Probe(_) => {
            torch = true;
            Ok(())
        }
    });
    if torch { exec_torch(&args) } else { code }
}
