//! How much memory a query may hold, and where it spills what does not fit.
//!
//! Every session [`crate::context`] builds runs on a DataFusion memory pool
//! of a fixed size (a fair spill pool: operators that can spill share it
//! evenly) and a disk manager that writes spill files into a directory of its
//! own, `datafusion-…`, under the spill directory: the system's temporary
//! directory, or one the user names, never inside the run. Sorts, grouped
//! aggregations and sort-merge joins that outgrow the pool spill there and
//! finish; what cannot spill (the build side of a hash join, one result that
//! does not fit) fails with [`Error::Memory`], which says how to raise the
//! limit. The spill directory is removed when the session ends
//! ([`SpillCleanup`]), also when the query was interrupted.
//!
//! The computed `contributions` take their working memory from the same pool
//! (`crate::computed`), so the limit bounds the whole query.
//!
//! Limits come from, in this order: the caller (`--memory-limit`,
//! `--spill-dir`), the environment ([`MEMORY_LIMIT_ENV`], [`SPILL_DIR_ENV`]),
//! the default: [`DEFAULT_SHARE`] of the machine's memory (or of the
//! control group's limit where that is lower).
//!
//! ```
//! use reptrace_analyze::limits::{Limits, parse_size};
//! assert_eq!(parse_size("512MiB"), Some(512 << 20));
//! assert_eq!(parse_size("2GB"), Some(2_000_000_000));
//! let limits = Limits::unlimited().with_memory_text("64MiB", "--memory-limit").unwrap();
//! assert_eq!(limits.memory, Some(64 << 20));
//! ```
pub use crate::memory::{
    DEFAULT_SHARE, MEMORY_LIMIT_ENV, MIN_MEMORY, SPILL_DIR_ENV, default_memory, human,
    machine_memory, parse_size,
};
use crate::{Error, Result};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{
    FairSpillPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation, TrackConsumersPool,
};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The memory limit and spill directory of the sessions built from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Bytes the query's memory pool holds at most; `None`: no limit.
    pub memory: Option<u64>,
    /// Where spill files go (a directory of their own is made inside it);
    /// `None`: the system's temporary directory.
    pub spill_dir: Option<PathBuf>,
}

impl Default for Limits {
    /// The environment's limits where set, else the machine's default; a
    /// malformed environment variable falls back to the default with a
    /// warning ([`Limits::from_env`] reports it as an error instead).
    fn default() -> Self {
        Self::from_env().unwrap_or_else(|e| {
            tracing::warn!("{e}; using the default memory limit");
            Self {
                memory: Some(default_memory()),
                spill_dir: None,
            }
        })
    }
}

impl Limits {
    /// No memory limit (DataFusion's unbounded pool); spills never happen.
    pub fn unlimited() -> Self {
        Self {
            memory: None,
            spill_dir: None,
        }
    }

    /// The limits the environment sets ([`MEMORY_LIMIT_ENV`],
    /// [`SPILL_DIR_ENV`]), the default where it sets none.
    pub fn from_env() -> Result<Self> {
        Self::resolve(None, None)
    }

    /// The limits a caller's options give (`memory`: text as for
    /// `--memory-limit`), the environment's where an option is `None`, the
    /// default where neither sets one. An option given makes its
    /// environment variable irrelevant, even a malformed one.
    pub fn resolve(memory: Option<&str>, spill_dir: Option<&Path>) -> Result<Self> {
        let mut limits = Self {
            memory: Some(default_memory()),
            spill_dir: None,
        };
        limits = match (memory, std::env::var_os(MEMORY_LIMIT_ENV)) {
            (Some(text), _) => limits.with_memory_text(text, "--memory-limit")?,
            (None, Some(text)) => {
                limits.with_memory_text(&text.to_string_lossy(), MEMORY_LIMIT_ENV)?
            }
            (None, None) => limits,
        };
        limits.spill_dir = spill_dir.map(Path::to_path_buf).or_else(|| {
            std::env::var_os(SPILL_DIR_ENV)
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
        });
        Ok(limits)
    }

    /// These limits with the memory limit `text` ([`parse_size`], or
    /// `none`/`unlimited`); `source` names where it came from in an error.
    pub fn with_memory_text(mut self, text: &str, source: &'static str) -> Result<Self> {
        let bad = |why: String| Error::BadOption {
            option: source,
            value: text.to_owned(),
            why,
        };
        let t = text.trim();
        if t.eq_ignore_ascii_case("none") || t.eq_ignore_ascii_case("unlimited") {
            self.memory = None;
            return Ok(self);
        }
        let bytes = match t.strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => (machine_memory() as f64 * p / 100.0) as u64,
                _ => return Err(bad("a share of the machine's memory is 1% to 100%".into())),
            },
            None => parse_size(t).ok_or_else(|| {
                bad("expected a size such as 512MiB, 2GB, 1.5GiB or 25%, or none".into())
            })?,
        };
        if bytes < MIN_MEMORY {
            return Err(bad(format!("at least {} is needed", human(MIN_MEMORY))));
        }
        self.memory = Some(bytes);
        Ok(self)
    }

    /// The limit in words: `512.0 MiB`, or `none`.
    pub fn describe_memory(&self) -> String {
        self.memory.map_or_else(|| "none".to_owned(), human)
    }

    /// The DataFusion runtime of a session over the run in `run_dir`: the
    /// memory pool and the disk manager. The spill directory is created if
    /// needed and must not lie inside the run.
    pub fn runtime(&self, run_dir: &Path) -> Result<Arc<RuntimeEnv>> {
        let dir = match &self.spill_dir {
            Some(d) => d.clone(),
            None => std::env::temp_dir(),
        };
        let option = if self.spill_dir.is_some() {
            "spill directory"
        } else {
            "temporary directory"
        };
        let inside = |dir: &Path| -> Result<()> {
            if dir.starts_with(run_dir) {
                return Err(Error::BadOption {
                    option,
                    value: dir.display().to_string(),
                    why: format!(
                        "is inside the run {}: spill files go elsewhere so that the trace \
                         stays intact (--spill-dir or {SPILL_DIR_ENV})",
                        run_dir.display()
                    ),
                });
            }
            Ok(())
        };
        // Checked before anything is created, and again once links are resolved.
        inside(&std::path::absolute(&dir).map_err(|e| Error::io(&dir, e))?)?;
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let dir = std::fs::canonicalize(&dir).map_err(|e| Error::io(&dir, e))?;
        inside(&dir)?;
        if !dir.is_dir() {
            return Err(Error::BadOption {
                option,
                value: dir.display().to_string(),
                why: "is not a directory".into(),
            });
        }
        let mut builder = RuntimeEnvBuilder::new().with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Directories(vec![dir])),
        );
        if let Some(bytes) = self.memory {
            let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
            builder = builder.with_memory_pool(Arc::new(TrackConsumersPool::new(
                RepartitionInMemory(FairSpillPool::new(bytes)),
                std::num::NonZeroUsize::new(5).unwrap_or(std::num::NonZeroUsize::MIN),
            )));
        }
        builder.build_arc().map_err(Error::sql)
    }

    /// What the sorts of a query set aside for sorting and merging the
    /// batches they hold when they spill: a quarter of the limit (the merge
    /// needs about as much as the sort keys of what it holds; with less it
    /// fails instead of spilling), DataFusion's 10 MiB without a limit.
    /// [`crate::sql::physical`] shares it among the sorts of a plan.
    pub fn sort_spill_reservation(&self) -> usize {
        let bytes = self.memory.map_or(10 << 20, |m| m / 4);
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }
}

/// A memory pool that grants DataFusion's `RepartitionExec` whatever it
/// asks instead of letting it spill, counted against the pool, so that the
/// operators that can spill spill sooner. DataFusion 55.2's
/// `RepartitionExec` deadlocks when two of its input tasks spill into one
/// output partition's spill pool at once (apache/datafusion#24883, fixed
/// upstream after 55.2): every worker waits and the query never answers
/// (`tests/analyze/limits.rs` hung in 7 and 8 of 12 attempts on the plain
/// pool). What it holds is the batches in flight between its inputs and
/// outputs, bounded by its channels' back-pressure while its consumers keep
/// up; where it outgrows the limit, an operator that cannot spill fails with
/// the memory error instead of the query hanging.
#[derive(Debug)]
struct RepartitionInMemory<P>(P);

impl<P: MemoryPool> std::fmt::Display for RepartitionInMemory<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl<P: MemoryPool> MemoryPool for RepartitionInMemory<P> {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.0.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.0.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.0.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.0.shrink(reservation, shrink);
    }

    fn try_grow(
        &self,
        reservation: &MemoryReservation,
        additional: usize,
    ) -> datafusion::error::Result<()> {
        if reservation.consumer().name().starts_with("RepartitionExec") {
            self.0.grow(reservation, additional);
            return Ok(());
        }
        self.0.try_grow(reservation, additional)
    }

    fn reserved(&self) -> usize {
        self.0.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.0.memory_limit()
    }
}

/// Removes the spill directories of a session when dropped: at the end of a
/// query, whether it finished, failed or was interrupted (DataFusion removes
/// them only when the last task holding the session is gone).
pub struct SpillCleanup(Arc<RuntimeEnv>);

impl SpillCleanup {
    /// Watches the spill directories of `runtime`.
    pub fn new(runtime: Arc<RuntimeEnv>) -> Self {
        Self(runtime)
    }
}

impl std::fmt::Debug for SpillCleanup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SpillCleanup")
            .field(&self.0.disk_manager.temp_dir_paths())
            .finish()
    }
}

impl Drop for SpillCleanup {
    fn drop(&mut self) {
        for dir in self.0.disk_manager.temp_dir_paths() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_their_units() {
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("64MB"), Some(64_000_000));
        assert_eq!(parse_size("64 MiB"), Some(64 << 20));
        assert_eq!(parse_size("64m"), Some(64 << 20));
        assert_eq!(parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_size("2gb"), Some(2_000_000_000));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("12XB"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn limits_refuse_what_cannot_work() {
        let l = Limits::unlimited();
        let e = l
            .clone()
            .with_memory_text("1MB", "--memory-limit")
            .unwrap_err();
        assert!(e.to_string().contains("--memory-limit"), "{e}");
        assert!(e.to_string().contains("at least 16.0 MiB"), "{e}");
        let e = l
            .clone()
            .with_memory_text("much", "--memory-limit")
            .unwrap_err();
        assert!(e.to_string().contains("expected a size"), "{e}");
        assert_eq!(
            l.clone().with_memory_text("none", "x").unwrap().memory,
            None
        );
        let half = l.with_memory_text("50%", "x").unwrap().memory.unwrap();
        let machine = machine_memory();
        assert!(half.abs_diff(machine / 2) <= 1, "{half} vs {machine}");
    }

    #[test]
    fn the_sort_reservation_follows_the_limit() {
        let small = Limits {
            memory: Some(64 << 20),
            spill_dir: None,
        };
        assert_eq!(small.sort_spill_reservation(), 16 << 20);
        assert_eq!(Limits::unlimited().sort_spill_reservation(), 10 << 20);
    }

    #[test]
    fn a_spill_directory_inside_the_run_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let run = std::fs::canonicalize(dir.path()).unwrap();
        let limits = Limits {
            memory: Some(64 << 20),
            spill_dir: Some(run.join("spill")),
        };
        let e = limits.runtime(&run).unwrap_err().to_string();
        assert!(
            e.contains("spill directory") && e.contains("inside the run"),
            "{e}"
        );
        assert!(!run.join("spill").exists(), "nothing is created in the run");
        let elsewhere = tempfile::tempdir().unwrap();
        let limits = Limits {
            spill_dir: Some(elsewhere.path().join("new")),
            ..limits
        };
        limits.runtime(&run).unwrap();
        assert!(elsewhere.path().join("new").is_dir());
    }
}
