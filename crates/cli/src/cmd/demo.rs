//! `reptrace demo`: train the MLP on the bundled digits with tracing and
//! show what was recorded.
//!
//! One function per phase, so that later phases (attribution, report) slot
//! in after [`train_phase`]: [`prepare_dir`] replaces a previous demo run,
//! [`train_phase`] trains with the demo settings
//! ([`reptrace_tch::TrainConfig::demo`]), [`report_phase`] prints the summary.
use anyhow::{Context, bail};
use reptrace_tch::{TrainConfig, TrainSummary};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Arguments of `reptrace demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The run directory; a previous run there is replaced.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
}

/// Removes a previous run at `dir` so the demo can write there. Refuses to
/// delete a directory that is neither empty nor a reptrace run.
pub fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let empty = std::fs::read_dir(dir)
        .with_context(|| format!("--out: {}", dir.display()))?
        .next()
        .is_none();
    if empty {
        return Ok(());
    }
    if !reptrace_format::layout::manifest_path(dir).is_file() {
        bail!(
            "--out: {} exists and is not a reptrace run; refusing to replace it (choose another --out)",
            dir.display()
        );
    }
    std::fs::remove_dir_all(dir)
        .with_context(|| format!("removing the previous demo run {}", dir.display()))
}

/// Trains the demo model into `dir`.
pub fn train_phase(dir: &Path) -> anyhow::Result<TrainSummary> {
    let config = TrainConfig::demo(dir);
    super::train::train_with_progress(&config)
}

/// Prints what was recorded.
pub fn report_phase(out: &mut dyn Write, summary: &TrainSummary) -> anyhow::Result<()> {
    writeln!(
        out,
        "demo: MLP 64-32-16-10 on the bundled digits (1437 train, 360 test), SGD with momentum 0.9, lr 0.1 cosine"
    )?;
    super::train::write_summary(out, summary)
}

/// Runs `reptrace demo`.
pub fn run(args: &DemoArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    prepare_dir(&args.out)?;
    let summary = train_phase(&args.out)?;
    report_phase(out, &summary)?;
    Ok(())
}
