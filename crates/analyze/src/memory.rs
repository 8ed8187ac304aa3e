//! How much memory there is and how a size in bytes is written: the
//! vocabulary of the memory limit, below [`crate::error`] (whose memory
//! message names [`MEMORY_LIMIT_ENV`] and the limit in words) and
//! [`crate::limits`] (which re-exports all of it).
/// The environment variable that sets the memory limit (same syntax as
/// `--memory-limit`).
pub const MEMORY_LIMIT_ENV: &str = "REPTRACE_MEMORY_LIMIT";

/// The environment variable that names the spill directory.
pub const SPILL_DIR_ENV: &str = "REPTRACE_SPILL_DIR";

/// The share of the machine's memory a query may hold by default.
pub const DEFAULT_SHARE: f64 = 0.5;

/// The smallest limit accepted: below it even a spilling sort cannot hold
/// the batches it merges.
pub const MIN_MEMORY: u64 = 16 << 20;

/// A size in bytes: a number with an optional unit, `B`, `KB`/`MB`/`GB`/`TB`
/// (powers of 1000), `KiB`/`MiB`/`GiB`/`TiB` or `K`/`M`/`G`/`T` (powers of
/// 1024); case-insensitive, fractions allowed (`1.5GiB`).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => return None,
    };
    let bytes = number * factor as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Bytes in words, powers of 1024: `512.0 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The memory this process can use: the machine's, or its control group's
/// limit where that is lower.
pub fn machine_memory() -> u64 {
    let mut system = sysinfo::System::new();
    system.refresh_memory_specifics(sysinfo::MemoryRefreshKind::nothing().with_ram());
    let total = system.total_memory();
    match system.cgroup_limits() {
        Some(c) if c.total_memory > 0 && c.total_memory < total => c.total_memory,
        _ => total,
    }
}

/// [`DEFAULT_SHARE`] of [`machine_memory`] (1 GiB where it cannot be read).
pub fn default_memory() -> u64 {
    match machine_memory() {
        0 => 1 << 30,
        m => ((m as f64 * DEFAULT_SHARE) as u64).max(MIN_MEMORY),
    }
}
