//! `reptrace sql <run> "SELECT …"`: read-only SQL over a run's tables.
use anyhow::Context;
use reptrace_analyze::Limits;
use reptrace_analyze::datafusion::prelude::{DataFrame, SessionContext};
use reptrace_analyze::limits::SpillCleanup;
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
    /// examples (training dynamics), layer_steps (what each step applied).
    pub query: String,
    #[command(flatten)]
    pub output: Output,
}

/// Where a query's result goes, in which format, and what computing it may
/// use (sql, query).
#[derive(Debug, clap::Args)]
pub struct Output {
    /// Output format: table, csv, json or parquet (parquet needs --out).
    #[arg(long, default_value = "table")]
    pub format: String,
    /// Write the result to this file instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub compute: crate::cmd::ComputeArgs,
    #[command(flatten)]
    pub limits: crate::cmd::LimitArgs,
}

impl Output {
    /// The checked `--format` (`output_format`).
    pub fn format(&self) -> anyhow::Result<Format> {
        output_format(&self.format, self.out.as_deref())
    }

    /// Opens the run at `run` within the limits, plans the query with `plan`
    /// on its session and streams the result in `format` (`stream`).
    pub fn query(
        &self,
        run: &Path,
        format: Format,
        plan: impl AsyncFnOnce(&SessionContext) -> reptrace_analyze::Result<DataFrame>,
        out: &mut dyn Write,
    ) -> anyhow::Result<()> {
        let limits = self.limits.limits()?;
        let run = reptrace_analyze::open(run)?;
        let ctx = reptrace_analyze::context_limited(&run, &self.compute.options(), &limits)?;
        stream(
            &run,
            &ctx,
            &limits,
            async || plan(&ctx).await,
            format,
            self.out.as_deref(),
            out,
        )
    }
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

/// Runs a query on `ctx` and streams its result to `--out` (a temporary
/// file beside it, renamed when complete and removed otherwise) or to `out`;
/// stops when interrupted.
pub(crate) fn stream(
    run: &reptrace_analyze::Run,
    ctx: &SessionContext,
    limits: &Limits,
    plan: impl AsyncFnOnce() -> reptrace_analyze::Result<DataFrame>,
    format: Format,
    path: Option<&Path>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let _cleanup = SpillCleanup::new(ctx.runtime_env());
    let rt = runtime()?;
    let explain = |e: reptrace_analyze::Error| run.explain(e).with_memory_limit(limits.memory);
    let result = match path {
        Some(p) => {
            let tmp = reptrace_format::layout::temp_path(p);
            let written = rt.block_on(async {
                let df = plan().await?;
                let file =
                    std::fs::File::create(&tmp).map_err(|e| reptrace_analyze::Error::Io {
                        path: tmp.clone(),
                        source: e,
                    })?;
                let mut f = std::io::BufWriter::new(file);
                sql::stream(df, format, &mut f).await
            });
            let renamed = written
                .map_err(|e| anyhow::Error::from(explain(e)))
                .and_then(|rows| {
                    std::fs::rename(&tmp, p).with_context(|| format!("--out {}", p.display()))?;
                    Ok(rows)
                });
            match renamed {
                Ok(rows) => {
                    writeln!(out, "{rows} rows written to {}", p.display()).map_err(Into::into)
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e)
                }
            }
        }
        None => rt
            .block_on(async { sql::stream(plan().await?, format, out).await })
            .map(|_| ())
            .map_err(|e| explain(e).into()),
    };
    // An interrupted query may leave blocking work behind: do not wait for it.
    rt.shutdown_background();
    result
}

/// Runs `reptrace sql`.
pub fn run(args: &SqlArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let format = args.output.format()?;
    args.output.query(
        &args.run,
        format,
        async |ctx| sql::plan(ctx, &args.query).await,
        out,
    )
}
