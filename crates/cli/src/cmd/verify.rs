//! `reptrace verify <run>`: integrity and completeness checks; exits non-zero
//! when one fails.
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reptrace_analyze::verify::{Options, Progress, Status, verify_with_progress};
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
    // A bar per traced layer while the records are replayed (stderr, only
    // when it is a terminal).
    let style = ProgressStyle::with_template(
        "{prefix:>16} [{bar:30}] {pos}/{len} records replayed ({elapsed})",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut bar: Option<(usize, ProgressBar)> = None;
    let mut on_progress = |p: &Progress| {
        if bar.as_ref().is_none_or(|(i, _)| *i != p.layer_index) {
            if let Some((_, b)) = bar.take() {
                b.finish_and_clear();
            }
            let b =
                ProgressBar::with_draw_target(Some(p.records_total), ProgressDrawTarget::stderr())
                    .with_style(style.clone())
                    .with_prefix(format!("{} ({}/{})", p.layer, p.layer_index + 1, p.layers));
            bar = Some((p.layer_index, b));
        }
        if let Some((_, b)) = &bar {
            b.set_position(p.records_done);
        }
    };
    let report = verify_with_progress(&args.run, &options, &mut on_progress);
    if let Some((_, b)) = bar.take() {
        b.finish_and_clear();
    }
    let report = report?;
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
    let count = |s: Status| report.checks.iter().filter(|c| c.status == s).count();
    let (passed, warned, failed, skipped) = (
        count(Status::Pass),
        count(Status::Warn),
        count(Status::Fail),
        count(Status::Skip),
    );
    let summary = summary(report.checks.len(), passed, warned, skipped);
    if failed > 0 {
        out.flush()?;
        anyhow::bail!(
            "{failed} of {} checks failed ({summary})",
            report.checks.len()
        );
    }
    writeln!(out, "{summary}")?;
    Ok(())
}

/// The closing line: how many of `total` checks passed, and how many only
/// warned or could not apply (those are not passes).
fn summary(total: usize, passed: usize, warned: usize, skipped: usize) -> String {
    let mut s = format!("{passed} of {total} checks passed");
    if warned > 0 {
        s.push_str(&format!(", {warned} with a warning"));
    }
    if skipped > 0 {
        s.push_str(&format!(", {skipped} skipped"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::summary;

    #[test]
    fn warnings_and_skips_are_not_counted_as_passed() {
        assert_eq!(summary(5, 5, 0, 0), "5 of 5 checks passed");
        assert_eq!(
            summary(7, 4, 1, 2),
            "4 of 7 checks passed, 1 with a warning, 2 skipped"
        );
    }
}
