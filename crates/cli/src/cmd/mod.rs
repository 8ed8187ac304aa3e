//! One module per subcommand: its clap arguments struct and
//! `pub fn run(args, out) -> anyhow::Result<()>`.
pub mod attribute;
pub mod compact;
pub mod export;
pub mod info;
pub mod query;
pub mod report;
pub mod sql;
pub mod verify;

use reptrace_analyze::Limits;
use std::path::PathBuf;

/// The names of a comma-separated option `flag` (`--columns`, `--layers`),
/// blanks dropped; none given is an empty list, a value without a name an
/// error (`what`: "column", "layer").
pub fn name_list(flag: &str, what: &str, value: Option<&str>) -> anyhow::Result<Vec<String>> {
    let Some(s) = value else {
        return Ok(Vec::new());
    };
    let v: Vec<String> = s
        .split(',')
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .collect();
    if v.is_empty() {
        anyhow::bail!("{flag}: no {what} names in {s:?}");
    }
    Ok(v)
}

/// How the computed `contributions` table may work (sql, query, export).
#[derive(Debug, Clone, clap::Args)]
pub struct ComputeArgs {
    /// The most contribution rows a query without a probe_id filter may
    /// compute on demand (contributions are computed from the updates
    /// unless `reptrace attribute` materialised them)
    #[arg(long, value_name = "ROWS", default_value_t = reptrace_analyze::computed::DEFAULT_MAX_ROWS)]
    pub max_computed_rows: u64,
}

impl ComputeArgs {
    /// The analyzer's options.
    pub fn options(&self) -> reptrace_analyze::ComputeOptions {
        reptrace_analyze::ComputeOptions {
            max_rows: self.max_computed_rows,
            ..Default::default()
        }
    }
}

/// The memory limit and spill directory of a command's queries.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// The most memory the queries may hold, e.g. 512MiB, 4GB, 25% (of the
    /// machine's) or none; sorts, aggregations and joins spill to disk
    /// beyond it. Default: $REPTRACE_MEMORY_LIMIT, else half the machine's
    /// memory
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<String>,
    /// The directory spill files go to (into a directory of their own,
    /// removed afterwards); never inside the run. Default:
    /// $REPTRACE_SPILL_DIR, else the system's temporary directory
    #[arg(long, value_name = "DIR")]
    pub spill_dir: Option<PathBuf>,
}

impl LimitArgs {
    /// The limits: these options, else the environment's, else the default.
    pub fn limits(&self) -> anyhow::Result<Limits> {
        Ok(Limits::resolve(
            self.memory_limit.as_deref(),
            self.spill_dir.as_deref(),
        )?)
    }
}

/// A size on disk for people, in binary units (`1.50 KiB`), the same in
/// every command.
pub fn human_bytes(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(5 << 20), "5.00 MiB");
    }
}
