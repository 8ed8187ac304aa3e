//! `reptrace export <run> --table T [--where PREDICATE] [--columns LIST]
//! --format parquet|csv|jsonl --out PATH`: one table of a run, streamed
//! through DataFusion into a file (see `reptrace_analyze::export`), with a
//! progress bar on stderr.
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use reptrace_analyze::export::{self, Format, Options};
use reptrace_format::Table;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `reptrace export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The run directory.
    pub run: PathBuf,
    /// The table: instances, steps, layer_steps, updates, batches, examples, probes,
    /// contributions (computed on demand: filter on probe_id) or influence.
    #[arg(long)]
    pub table: String,
    /// Only rows where this boolean SQL expression over the table's columns
    /// holds, e.g. "probe_id = 3 AND layer = 'fc2'".
    #[arg(long = "where", value_name = "PREDICATE", allow_hyphen_values = true)]
    pub filter: Option<String>,
    /// Columns to write, comma-separated, in this order (default: all;
    /// `layer` is a column of updates, probes and contributions).
    #[arg(long, value_name = "LIST")]
    pub columns: Option<String>,
    /// Output format: parquet (zstd), csv (lists as JSON array text
    /// "[0.1,0.2]") or jsonl (one JSON object per line, lists as arrays).
    #[arg(long)]
    pub format: String,
    /// The file to write (outside the run directory).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub compute: crate::cmd::ComputeArgs,
    #[command(flatten)]
    pub limits: crate::cmd::LimitArgs,
}

impl ExportArgs {
    /// The validated options.
    pub fn options(&self) -> anyhow::Result<Options> {
        let table: Table = self
            .table
            .parse()
            .with_context(|| format!("--table {:?}", self.table))?;
        let format: Format = self
            .format
            .parse()
            .with_context(|| format!("--format {:?}", self.format))?;
        let columns = super::name_list("--columns", "column", self.columns.as_deref())?;
        Ok(Options {
            table,
            filter: self.filter.clone(),
            columns,
            format,
            overwrite: self.force,
            compute: self.compute.options(),
            limits: self.limits.limits()?,
        })
    }
}

/// Runs `reptrace export`.
pub fn run(args: &ExportArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let options = args.options()?;
    let style = ProgressStyle::with_template("export {prefix} [{bar:30}] {pos}/{len} rows {msg}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::new(0)
        .with_style(style)
        .with_prefix(options.table.name());
    let mut progress = |p: &export::Progress| {
        // The table's size bounds the rows written (a filter writes fewer).
        bar.set_length(p.table_rows.max(p.rows));
        bar.set_position(p.rows);
        bar.set_message(format!("{:.0} rows/s", p.rows_per_sec()));
    };
    let summary = export::export(&args.run, &options, &args.out, &mut progress);
    bar.finish_and_clear();
    let summary = summary.with_context(|| {
        format!(
            "exporting table {} of {}",
            options.table.name(),
            args.run.display()
        )
    })?;
    writeln!(
        out,
        "exported {} rows ({} columns) of {} to {} ({}, {} bytes)",
        summary.rows,
        summary.columns.len(),
        options.table.name(),
        summary.path.display(),
        options.format,
        summary.bytes
    )?;
    Ok(())
}
