//! `reptrace compact <run>`: rewrites the part files a run recorded without
//! compression (`--compression none`) in the storage encoding, as one
//! crash-safe commit ([`reptrace_record::compact`]).
use reptrace_record::{ParquetOptions, compact_with};
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `reptrace compact`.
#[derive(Debug, clap::Args)]
pub struct CompactArgs {
    /// The run directory.
    pub run: PathBuf,
    /// Zstandard level of the rewritten files, 1..=22.
    #[arg(long, default_value_t = ParquetOptions::default().zstd_level)]
    pub zstd_level: i32,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs `reptrace compact`.
pub fn run(args: &CompactArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if !(1..=22).contains(&args.zstd_level) {
        anyhow::bail!(
            "--zstd-level must be between 1 and 22, got {}",
            args.zstd_level
        );
    }
    let options = ParquetOptions {
        zstd_level: args.zstd_level,
        ..ParquetOptions::default()
    };
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    // Ctrl-C stops it after the file being written, before its commit.
    let report = compact_with(&args.run, &options, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        reptrace_analyze::interrupt::signal().is_none()
    });
    bar.finish_and_clear();
    if let Err(reptrace_record::Error::Stopped { .. }) = &report {
        reptrace_analyze::interrupt::check()?;
    }
    let report = report?;
    if args.json {
        let json = serde_json::json!({
            "files": report.files,
            "bytes_before": report.bytes_before,
            "bytes_after": report.bytes_after,
            "leftovers_removed": report.leftovers,
            "seconds": report.seconds,
        });
        writeln!(out, "{json}")?;
    } else if report.files == 0 {
        writeln!(
            out,
            "{}: nothing to compact (every part is compressed)",
            args.run.display()
        )?;
    } else {
        writeln!(
            out,
            "{}: {} part files compacted, {} → {} ({:.2}×) in {:.1} s",
            args.run.display(),
            report.files,
            super::human_bytes(report.bytes_before),
            super::human_bytes(report.bytes_after),
            report.bytes_after as f64 / report.bytes_before.max(1) as f64,
            report.seconds
        )?;
    }
    Ok(())
}
