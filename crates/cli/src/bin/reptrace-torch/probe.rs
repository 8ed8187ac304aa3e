//! `reptrace probe add RUN --data SOURCE [--rows …] [--ids …]`: new inputs
//! become probes of an existing run, at any time after training.
//!
//! The network is rebuilt from the run's manifest with the weights its
//! analysis stands on (the final weights, or the last checkpoint's of a run
//! whose training was killed), so this needs libtorch: the command is part
//! of the CLI's `tch` build (the default), like `train` and `demo`; the
//! analysis commands stay libtorch-free. See [`reptrace_tch::add`].
use anyhow::anyhow;
use reptrace_format::Status;
use reptrace_tch::{AddOptions, AddedProbes, DataSource, ProbeRows};
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `reptrace probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    #[command(subcommand)]
    pub command: ProbeCommand,
}

/// The `reptrace probe` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ProbeCommand {
    /// Add inputs as new probes of a run (a completed run, or one whose
    /// training was killed), without changing anything already in it.
    Add(AddArgs),
}

/// Arguments of `reptrace probe add`.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// The run directory.
    pub run: PathBuf,
    /// The inputs, as `reptrace train --data` reads them: digits (bundled),
    /// csv:PATH[?label=…&header=…&shape=CxHxW&scale=…&test=…&classes=…] or
    /// idx:DIR. Labels must be classes of the run.
    #[arg(long)]
    pub data: String,
    /// Rows of the data that become probes: all, train, test (the data's
    /// split) or A..B (row numbers from 0, inclusive).
    #[arg(long, default_value = "all")]
    pub rows: String,
    /// Probe ids, one per row: N,M,… or A..B (inclusive) [default: new ids
    /// above every probe and instance id of the run]
    #[arg(long)]
    pub ids: Option<String>,
}

/// Parses `--ids`: `N,M,…` or `A..B` (inclusive).
pub fn parse_ids(value: &str) -> anyhow::Result<Vec<i64>> {
    let bad = || anyhow!("--ids: {value:?} is not N,M,… or A..B (inclusive)");
    if let Some((a, b)) = value.split_once("..") {
        let first: i64 = a.trim().parse().map_err(|_| bad())?;
        let last: i64 = b.trim().parse().map_err(|_| bad())?;
        if last < first {
            return Err(anyhow!("--ids: {value:?}: the last id is before the first"));
        }
        return Ok((first..=last).collect());
    }
    value
        .split(',')
        .map(|v| v.trim().parse::<i64>().map_err(|_| bad()))
        .collect()
}

/// Sorted distinct ids as `A..B` ranges (inclusive), joined by ", ".
fn id_ranges(ids: &[i64]) -> String {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for id in ids {
        match ranges.last_mut() {
            Some((_, last)) if *last + 1 == id => *last = id,
            _ => ranges.push((id, id)),
        }
    }
    ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}..{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one-line summary of an addition.
fn summary(added: &AddedProbes) -> String {
    let n = added.ids.len();
    let plural = |n: usize, word: &str| {
        if n == 1 {
            format!("{n} {word}")
        } else {
            format!("{n} {word}s")
        }
    };
    let ids = if n == 1 { "id" } else { "ids" };
    let weights = if added.status == Status::Complete {
        "final weights".to_owned()
    } else {
        format!("the last committed weights; the run is {}", added.status)
    };
    format!(
        "added {} ({ids} {}) to {}, as of step {} ({weights})",
        plural(n, "probe"),
        id_ranges(&added.ids),
        plural(added.layers.len(), "layer"),
        added.step
    )
}

/// Runs `reptrace probe add`.
fn add(args: &AddArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let source: DataSource = args.data.parse().map_err(|e| anyhow!("--data: {e}"))?;
    let rows: ProbeRows = args.rows.parse().map_err(|e| anyhow!("--rows: {e}"))?;
    let ids = args.ids.as_deref().map(parse_ids).transpose()?;
    let data = source.load().map_err(|e| anyhow!("--data: {e}"))?;
    let added = reptrace_tch::add_probes(&args.run, &data, &AddOptions { ids, rows }).map_err(
        |e| match e {
            reptrace_tch::Error::BadSetting { setting, message } => {
                anyhow!("--{setting}: {message}")
            }
            reptrace_tch::Error::Data(e) => anyhow!("--data: {e}"),
            e => anyhow::Error::new(e),
        },
    )?;
    writeln!(out, "{}", summary(&added))?;
    Ok(())
}

/// Runs `reptrace probe`.
pub fn run(args: &ProbeArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    match &args.command {
        ProbeCommand::Add(a) => add(a, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_as_lists_and_inclusive_ranges() {
        assert_eq!(parse_ids("7,8, 12").unwrap(), vec![7, 8, 12]);
        assert_eq!(parse_ids("100..103").unwrap(), vec![100, 101, 102, 103]);
        for bad in ["", "7,,8", "a..b", "5..3", "1.5"] {
            assert!(parse_ids(bad).is_err(), "{bad}");
        }
        assert_eq!(id_ranges(&[9, 7, 8, 12]), "7..9, 12");
    }
}
