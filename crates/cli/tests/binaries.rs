//! The two binaries: `reptrace` runs the analysis commands without libtorch
//! and hands `train`, `demo` and `probe` to `reptrace-torch`, which it finds
//! beside itself.
use reptrace_testkit::cli::{Cli, assert_error_starting, text};
use std::process::Command;

const ANALYSIS: &str = env!("CARGO_BIN_EXE_reptrace");
const TORCH: &str = env!("CARGO_BIN_EXE_reptrace-torch");

/// Whether the executable names a libtorch library among the shared
/// libraries it needs (the dynamic string table holds their names).
fn names_libtorch(bin: &str) -> bool {
    let bytes = std::fs::read(bin).unwrap();
    bytes
        .windows(b"libtorch_cpu.so".len())
        .any(|w| w == b"libtorch_cpu.so")
}

#[test]
fn only_the_torch_binary_links_libtorch() {
    assert!(!names_libtorch(ANALYSIS), "{ANALYSIS} links libtorch");
    assert!(
        names_libtorch(TORCH),
        "{TORCH} does not name libtorch: the check finds nothing"
    );
    // And it starts without it: nothing on the loader's path could supply it.
    let out = Command::new(ANALYSIS)
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("reptrace "));
}

#[test]
fn torch_commands_run_through_reptrace() {
    // Help of the real arguments, under the name users type.
    for args in [&["train", "--help"][..], &["help", "train"][..]] {
        let out = Cli::new(ANALYSIS).output(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let help = text(&out.stdout);
        assert!(
            help.contains("Usage: reptrace train") && help.contains("--epochs"),
            "{help}"
        );
    }
    // The analysis binary lists them, with their own descriptions.
    let help = text(&Cli::new(ANALYSIS).output(&["--help"]).stdout);
    for command in ["train", "demo", "probe", "info", "query"] {
        assert!(
            help.contains(&format!("  {command} ")),
            "{command} missing from:\n{help}"
        );
    }
    // Usage errors and their exit status come back as from one binary.
    let out = Cli::new(ANALYSIS).output(&["demo", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr).trim_end(),
        "error: unexpected argument '--bogus' found; see 'reptrace demo --help'"
    );
    let dir = tempfile::tempdir().unwrap();
    let not_a_run = dir.path().join("nothing");
    let out = Cli::new(ANALYSIS).output(&[
        "probe",
        "add",
        not_a_run.to_str().unwrap(),
        "--data",
        "digits",
    ]);
    assert_error_starting(&out, "error: ", &["nothing"]);
}

#[test]
fn a_missing_torch_binary_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("reptrace");
    std::fs::copy(ANALYSIS, &alone).unwrap();
    let out = Cli::new(&alone).output(&["train", "--out", "x"]);
    let torch = dir.path().join("reptrace-torch").display().to_string();
    assert_error_starting(
        &out,
        "error: `reptrace train` runs models through libtorch",
        &[&torch],
    );
    // The analysis commands work without it.
    let out = Cli::new(&alone).output(&["info", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("error: "),
        "{}",
        text(&out.stderr)
    );
}
