//! `reptrace sql <run> "SELECT …"`: read-only SQL over a run's tables.
use anyhow::Context;
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use reptrace_analyze::sql::{self, Format};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Arguments of `reptrace sql`.
#[derive(Debug, clap::Args)]
pub struct SqlArgs {
    /// The run directory.
    pub run: PathBuf,
    /// One query (SELECT or WITH) over instances, steps, updates, batches,
    /// probes, contributions (computed on demand), own_contributions, influence,
    /// examples (training dynamics).
    pub query: String,
    /// Output format: table, csv, json or parquet (parquet needs --out).
    #[arg(long, default_value = "table")]
    pub format: String,
    /// Write the result to this file instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub compute: crate::cmd::ComputeArgs,
}

/// A tokio runtime for DataFusion.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the query runtime")
}

/// Parses `--format` and checks it against `--out`.
pub(crate) fn output_format(format: &str, out: Option<&Path>) -> anyhow::Result<Format> {
    let f: Format = format.parse()?;
    if f == Format::Parquet && out.is_none() {
        anyhow::bail!("--format parquet writes a binary file: give --out PATH");
    }
    Ok(f)
}

/// Writes a result to `--out` or `out`.
pub(crate) fn emit(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    format: Format,
    path: Option<&Path>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match path {
        Some(p) => {
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("{}", p.display()))?,
            );
            sql::write(schema, batches, format, &mut f)
                .with_context(|| format!("{}", p.display()))?;
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            writeln!(out, "{rows} rows written to {}", p.display())?;
        }
        None => sql::write(schema, batches, format, out)?,
    }
    Ok(())
}

/// Runs `reptrace sql`.
pub fn run(args: &SqlArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let format = output_format(&args.format, args.out.as_deref())?;
    let run = reptrace_analyze::open(&args.run)?;
    let ctx = reptrace_analyze::context_with(&run, &args.compute.options())?;
    let (schema, batches) = runtime()?
        .block_on(sql::run(&ctx, &args.query))
        .map_err(|e| run.explain(e))?;
    emit(&schema, &batches, format, args.out.as_deref(), out)
}
