//! `reptrace report <run> --probe N`: one self-contained HTML page that
//! explains a probe (ridge plots, class shares, shares per epoch,
//! proponents and opponents per traced layer); see `reptrace_report`.
//!
//! The probe's contributions are computed on demand (or read where
//! `reptrace attribute` materialised them); no attribution step is needed.
use anyhow::Context;
use indicatif::ProgressBar;
use reptrace_report as report;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Arguments of `reptrace report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The run directory.
    pub run: PathBuf,
    /// The probe to explain (a probe id recorded in the run).
    #[arg(long, allow_hyphen_values = true)]
    pub probe: String,
    /// Traced layers to show, comma-separated; default: every attributed layer.
    #[arg(long)]
    pub layers: Option<String>,
    /// Proponents and opponents per layer.
    #[arg(long, default_value = "16")]
    pub k: String,
    /// The HTML file to write.
    #[arg(long, default_value = "report.html")]
    pub out: PathBuf,
    #[command(flatten)]
    pub limits: crate::cmd::LimitArgs,
}

impl ReportArgs {
    /// The validated options.
    pub fn options(&self) -> anyhow::Result<report::Options> {
        let probe =
            self.probe.trim().parse::<i64>().map_err(|_| {
                anyhow::anyhow!("--probe: {:?} is not an integer probe id", self.probe)
            })?;
        let k = self
            .k
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|k| (1..=1000).contains(k))
            .ok_or_else(|| anyhow::anyhow!("--k: {:?} is not an integer in 1..=1000", self.k))?;
        let layers = super::name_list("--layers", "layer", self.layers.as_deref())?;
        Ok(report::Options {
            probe,
            layers,
            k,
            limits: self.limits.limits()?,
        })
    }
}

/// Writes the report of `options.probe` to `out_path`, with a spinner.
pub fn write_report(run: &Path, options: &report::Options, out_path: &Path) -> anyhow::Result<()> {
    let spinner = ProgressBar::new_spinner().with_message(format!(
        "report: querying and plotting probe {}",
        options.probe
    ));
    spinner.enable_steady_tick(Duration::from_millis(120));
    let html = report::generate(run, options);
    spinner.finish_and_clear();
    let html = html?;
    if let Some(dir) = out_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("--out: {}", dir.display()))?;
    }
    std::fs::write(out_path, html).with_context(|| format!("--out: {}", out_path.display()))?;
    Ok(())
}

/// Runs `reptrace report`.
pub fn run(args: &ReportArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let options = args.options()?;
    write_report(&args.run, &options, &args.out)?;
    writeln!(out, "report: {}", args.out.display())?;
    Ok(())
}
