//! `reptrace attribute <run>`: materialise the contributions of the
//! selected probes for export and scale: one row per update record (table
//! `contributions`), or summed per instance (and epoch) (table `influence`).
//! Queries do not need it: `contributions` is computed on demand, and reads
//! these rows where they exist. Earlier attributions are kept.
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reptrace_analyze::{Options, ProbeSelection, Progress, StepRange, attribute};
use reptrace_format::Aggregation;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `reptrace attribute`.
#[derive(Debug, clap::Args)]
pub struct AttributeArgs {
    /// The run directory.
    pub run: PathBuf,
    /// Probes to attribute: test, train, all or ids:N,M,… [default: test,
    /// or train with --self-only]
    #[arg(long)]
    pub probes: Option<String>,
    /// Traced layers to attribute, comma separated [default: every layer with probes]
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<String>,
    /// Only records of steps A..B (inclusive; A.. and ..B also work)
    #[arg(long)]
    pub steps: Option<String>,
    /// Only each training probe's own records
    #[arg(long)]
    pub self_only: bool,
    /// Rows per update record (step), or sums per instance and epoch
    /// (epoch) or per instance (instance), into the influence table
    #[arg(long, default_value = "step", value_parser = ["step", "epoch", "instance"])]
    pub by: String,
    /// No progress bar and no per-layer table: only the summary line
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub limits: crate::cmd::LimitArgs,
}

impl AttributeArgs {
    /// The validated options.
    pub fn options(&self) -> anyhow::Result<Options> {
        let probes = match &self.probes {
            Some(p) => p.parse::<ProbeSelection>()?,
            None if self.self_only => ProbeSelection::Train,
            None => ProbeSelection::Test,
        };
        let steps = self
            .steps
            .as_deref()
            .map(str::parse::<StepRange>)
            .transpose()?;
        let defaults = Options::default();
        Ok(Options {
            probes,
            layers: self.layers.clone(),
            steps,
            self_only: self.self_only,
            by: match self.by.as_str() {
                "epoch" => Aggregation::Epoch,
                "instance" => Aggregation::Instance,
                _ => Aggregation::Step,
            },
            // The arithmetic's working memory: half the limit at most.
            memory_budget: match self.limits.limits()?.memory {
                Some(limit) => defaults
                    .memory_budget
                    .min(usize::try_from(limit / 2).unwrap_or(usize::MAX)),
                None => defaults.memory_budget,
            },
            ..defaults
        })
    }
}

/// A progress bar per layer, with contribution rows per second.
struct Bar {
    bar: Option<ProgressBar>,
    layer: usize,
    quiet: bool,
}

impl Bar {
    fn update(&mut self, p: &Progress) {
        if self.quiet {
            return;
        }
        if self.bar.is_none() || self.layer != p.layer_index {
            if let Some(b) = self.bar.take() {
                b.finish();
            }
            let bar =
                ProgressBar::with_draw_target(Some(p.records_total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {pos}/{len} records, {msg} ({elapsed})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(format!("{} ({}/{})", p.layer, p.layer_index + 1, p.layers));
            self.bar = Some(bar);
            self.layer = p.layer_index;
        }
        if let Some(b) = &self.bar {
            b.set_length(p.records_total);
            b.set_position(p.records_done);
            b.set_message(format!("{:.0} rows/s", p.rows_per_sec()));
        }
    }
}

/// Runs `reptrace attribute`.
pub fn run(args: &AttributeArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let options = args.options()?;
    let mut bar = Bar {
        bar: None,
        layer: 0,
        quiet: args.quiet,
    };
    let report = attribute(&args.run, &options, &mut |p| bar.update(p))?;
    if let Some(b) = bar.bar.take() {
        b.finish_and_clear();
    }
    if !args.quiet {
        write_layers(&report, out)?;
    }
    let secs = report.elapsed.as_secs_f64();
    let table = if report.attribution.by == Aggregation::Step {
        "contributions"
    } else {
        "influence"
    };
    writeln!(
        out,
        "{} contribution rows in {:.1} s ({:.0} rows/s); {} {table} rows ({}) written, by {}; probes {}, {}",
        report.rows,
        secs,
        if secs > 0.0 {
            report.rows as f64 / secs
        } else {
            0.0
        },
        report.written,
        crate::cmd::human_bytes(report.bytes),
        report.attribution.by,
        report.attribution.probes,
        as_of(report.attribution.as_of_step.map(|s| s.0)),
    )?;
    if report.replaced > 0 {
        writeln!(
            out,
            "replaced {} earlier attribution(s) that this one covers",
            report.replaced
        )?;
    }
    if let Ok(m) = reptrace_format::Manifest::load(&args.run)
        && m.analysis_probes().is_some_and(|a| a.checkpoint)
    {
        writeln!(
            out,
            "the run did not finish (status {}): probes and weights are those of its last checkpoint",
            m.status
        )?;
    }
    Ok(())
}

/// The per-layer table of an attribution.
fn write_layers(
    report: &reptrace_analyze::attribution::Report,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "{:<16} {:>7} {:>10} {:>12} {:>7} {:>14}",
        "layer", "probes", "records", "rows", "passes", "residual/Δ"
    )?;
    for l in &report.layers {
        let rel = if l.change_norm > 0.0 {
            l.residual_norm / l.change_norm
        } else {
            0.0
        };
        writeln!(
            out,
            "{:<16} {:>7} {:>10} {:>12} {:>7} {:>14.3e}",
            l.layer, l.probes, l.records, l.rows, l.passes, rel
        )?;
    }
    Ok(())
}

/// Which weights the attribution used: after a step, or the initial ones
/// when no step was recorded.
fn as_of(step: Option<i64>) -> String {
    match step {
        Some(s) => format!("as of step {s}"),
        None => "as of the initial weights (no step recorded)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::as_of;

    #[test]
    fn no_step_is_said_in_words() {
        assert_eq!(as_of(Some(12)), "as of step 12");
        assert_eq!(as_of(None), "as of the initial weights (no step recorded)");
        assert!(!as_of(None).contains("-1"));
    }
}
