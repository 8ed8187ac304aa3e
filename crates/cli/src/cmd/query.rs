//! `reptrace query <run> <name|file.sql>`: a canned query with parameters.
use crate::cmd::sql::Output;
use reptrace_analyze::query::Query;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `reptrace query`.
#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// The run directory.
    pub run: PathBuf,
    /// A built-in query (top_proponents, top_opponents, class_shares,
    /// class_shares_by_epoch, cosine_histogram, self_influence, layer_summary,
    /// top_steps, batch_member_influence; training dynamics:
    /// mislabel_candidates, tracin_self_influence, forgetting_events,
    /// data_map) or the path of a .sql file.
    pub query: String,
    /// A parameter, NAME=VALUE (repeatable), e.g. --param probe=3 --param k=5.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    #[command(flatten)]
    pub output: Output,
}

/// Runs `reptrace query`.
pub fn run(args: &QueryArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let format = args.output.format()?;
    let params = args
        .params
        .iter()
        .map(|p| {
            p.split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--param expects NAME=VALUE, got {p:?}"))
        })
        .collect::<anyhow::Result<Vec<(&str, &str)>>>()?;
    let query = Query::resolve(&args.query)?;
    args.output.query(
        &args.run,
        format,
        async |ctx| query.plan(ctx, &params).await,
        out,
    )
}
