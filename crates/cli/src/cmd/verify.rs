//! `reptrace verify <run>`: integrity and completeness checks; exits non-zero
//! when one fails.
use reptrace_analyze::verify::{Options, Status, verify};
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `reptrace verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The run directory.
    pub run: PathBuf,
    /// Relative tolerance of the completeness checks (f16 traces add their rounding bound).
    #[arg(long, default_value_t = 1e-5)]
    pub tolerance: f64,
}

/// Runs `reptrace verify`.
pub fn run(args: &VerifyArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if !(args.tolerance.is_finite() && args.tolerance >= 0.0) {
        anyhow::bail!(
            "--tolerance must be a non-negative number, got {}",
            args.tolerance
        );
    }
    let options = Options {
        tolerance: args.tolerance,
        ..Options::default()
    };
    let report = verify(&args.run, &options)?;
    let width = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    writeln!(
        out,
        "{:<6} {:<width$} {:>10} {:>10}  detail",
        "status", "check", "value", "tolerance"
    )?;
    for c in &report.checks {
        let num = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |v| format!("{v:.2e}"));
        writeln!(
            out,
            "{:<6} {:<width$} {:>10} {:>10}  {}",
            c.status.to_string(),
            c.name,
            num(c.value),
            num(c.tolerance),
            c.detail
        )?;
    }
    let failed = report
        .checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .count();
    if failed > 0 {
        out.flush()?;
        anyhow::bail!("{failed} of {} checks failed", report.checks.len());
    }
    writeln!(out, "all {} checks passed", report.checks.len())?;
    Ok(())
}
