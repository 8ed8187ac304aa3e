//! Where the files of a run live.
//!
//! ```text
//! <run>/manifest.json
//! <run>/instances/part-000000.parquet
//! <run>/steps/part-000001.parquet
//! <run>/updates/layer=<name>/part-000001.parquet
//! <run>/weights/initial.safetensors | step-00000123.safetensors | final.safetensors
//! <run>/probes/layer=<name>/part-000000.parquet
//! <run>/contributions/layer=<name>/part-000000.parquet
//! <run>/checkpoints/probes/layer=<name>/part-000003.parquet   (probes as of a commit)
//! ```
//!
//! Files are written under a temporary name that starts with `.` and ends
//! with `.tmp` — a name every directory-listing reader (pandas, pyarrow,
//! polars, DuckDB and Spark globs and Hive discovery) skips. A Parquet part
//! keeps that name until the manifest that lists it is durable, and only then
//! is renamed to its final name ([`publish`]). So a reader that lists the
//! directory never sees a row that is not committed, whenever the writer was
//! killed; and a kill between the manifest write and the rename is finished
//! by the next reader that opens the run ([`Manifest::open`](crate::Manifest::open)).
//! Weights snapshots (not read by directory listings) are renamed before the
//! manifest that lists them is written.
use crate::schema::Table;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The manifest file name.
pub const MANIFEST: &str = "manifest.json";

/// The run's lock file: a writer that changes the manifest of a finished
/// run (adding probes, attributing) holds an exclusive advisory lock on it
/// while it writes ([`lock`]).
pub const LOCK: &str = ".lock";

/// Takes the exclusive lock of `run` (`<run>/.lock`): an advisory file lock
/// that the system releases when the returned file is closed, also when the
/// process dies. `wait`: block until it is free; otherwise `Ok(None)` when
/// another process holds it.
pub fn lock(run: &Path, wait: bool) -> std::io::Result<Option<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(run.join(LOCK))?;
    if wait {
        file.lock()?;
        return Ok(Some(file));
    }
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Whether another process holds the lock of `run` (a live recorder for
/// the whole of its training, or a writer adding probes or attributions),
/// tested without waiting and without creating the lock file. A run whose
/// manifest says `recording` while nobody holds its lock lost its recorder
/// (the process was killed or crashed).
pub fn lock_held(run: &Path) -> std::io::Result<bool> {
    let file = match std::fs::File::open(run.join(LOCK)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // A shared lock, released when `file` closes: two processes testing at
    // once do not see each other.
    match file.try_lock_shared() {
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// `<run>/manifest.json`.
pub fn manifest_path(run: &Path) -> PathBuf {
    run.join(MANIFEST)
}

/// Relative directory of a table (with its `layer=` partition, if any).
pub fn table_dir(table: Table, layer: Option<&str>) -> String {
    match layer {
        Some(l) if table.is_partitioned() => format!("{}/layer={l}", table.name()),
        _ => table.name().to_owned(),
    }
}

/// Relative path of part `seq` of a table.
pub fn part_path(table: Table, layer: Option<&str>, seq: u64) -> String {
    format!("{}/part-{seq:06}.parquet", table_dir(table, layer))
}

/// Relative path of part `seq` of a table written by rank `rank` of a
/// distributed run other than rank 0 (format 11): the ranks write side by
/// side into one run, and rank 0's commit lists every rank's parts.
pub fn rank_part_path(table: Table, layer: Option<&str>, seq: u64, rank: u32) -> String {
    format!(
        "{}/part-{seq:06}-rank{rank}.parquet",
        table_dir(table, layer)
    )
}

/// Relative path of part `seq` of the checkpoint probes of `layer`.
pub fn checkpoint_probes_path(layer: &str, seq: u64) -> String {
    format!("{CHECKPOINTS}/probes/layer={layer}/part-{seq:06}.parquet")
}

/// Directory of the checkpoint probes (not a table: no reader of the run's
/// tables looks there).
pub const CHECKPOINTS: &str = "checkpoints";

/// Relative path of a weights snapshot taken after `step` (`None`: initial).
pub fn weights_path(step: Option<i64>) -> String {
    match step {
        None => "weights/initial.safetensors".to_owned(),
        Some(s) => format!("weights/step-{s:08}.safetensors"),
    }
}

/// Relative path of the final weights.
pub const FINAL_WEIGHTS: &str = "weights/final.safetensors";

/// The temporary name a file is written under before it is renamed to `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Whether a file name is a temporary (incomplete) file.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Publishes committed file `rel` of `run`: renames it from its temporary
/// name to its final name. Returns `Ok(true)` when it renamed, `Ok(false)`
/// when the file was already under its final name (published before, or by a
/// concurrent reader finishing the same commit).
pub fn publish(run: &Path, rel: &str) -> std::io::Result<bool> {
    let path = run.join(rel);
    if path.exists() {
        return Ok(false);
    }
    match std::fs::rename(temp_path(&path), &path) {
        Ok(()) => Ok(true),
        // Someone else renamed it between our check and our rename.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.exists() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes file `rel` of `run`, under its final and its temporary name, as
/// far as it can (what is left is a stray file that `verify` reports).
pub fn remove(run: &Path, rel: &str) {
    let path = run.join(rel);
    let _ = std::fs::remove_file(temp_path(&path));
    let _ = std::fs::remove_file(path);
}

/// Checks a name for use in a Hive partition path and SQL: ASCII letters,
/// digits and `_`, starting with a letter.
pub fn check_name(what: &'static str, name: &str) -> Result<()> {
    let why = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > 64 {
        Some("longer than 64 characters")
    } else if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Some("only ASCII letters, digits and '_' are allowed")
    } else if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        Some("must start with a letter")
    } else {
        None
    };
    invalid(what, name, why)
}

/// Checks a traced layer's name (its `layer=` partition value): like
/// [`check_name`], and also a qualified module name as PyTorch spells it
/// (format 4): parts of letters, digits and `_` joined by `.`, each part
/// non-empty (`encoder.block1.conv`, `layers.0.fc`, `_orig_mod.fc`, and `0`,
/// `2` as `nn.Sequential` names its children); at most 128 characters.
pub fn check_layer_name(name: &str) -> Result<()> {
    let part_ok =
        |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let why = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > 128 {
        Some("longer than 128 characters")
    } else if !name.split('.').all(part_ok) {
        Some("only ASCII letters, digits and '_', in parts joined by '.', are allowed")
    } else {
        None
    };
    invalid("layer", name, why)
}

fn invalid(what: &'static str, name: &str, why: Option<&'static str>) -> Result<()> {
    match why {
        Some(why) => Err(Error::InvalidName {
            what,
            name: name.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// Checks that a manifest path stays inside the run directory.
pub fn check_relative(path: &str) -> Result<()> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && p.is_relative()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            what: "file path",
            name: path.to_owned(),
            why: "must be relative and stay inside the run",
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn publish_renames_once_and_tolerates_a_second_publisher() {
        let dir = tempfile::tempdir().unwrap();
        let rel = "updates/layer=fc1/part-000001.parquet";
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(temp_path(&path), b"rows").unwrap();
        assert!(publish(dir.path(), rel).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"rows");
        assert!(!temp_path(&path).exists());
        // Already published: nothing to do, no error.
        assert!(!publish(dir.path(), rel).unwrap());
        // Neither name exists: an error naming the missing file.
        let e = publish(dir.path(), "steps/part-000009.parquet").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        remove(dir.path(), rel);
        assert!(!path.exists());
    }

    #[test]
    fn names() {
        assert!(check_name("layer", "fc1").is_ok());
        assert!(check_name("layer", "conv_2").is_ok());
        for bad in ["", "1fc", "fc-1", "a/b", "layer=x", "fc 1"] {
            assert!(check_name("layer", bad).is_err(), "{bad}");
            assert_eq!(check_layer_name(bad).is_err(), bad != "1fc", "{bad}");
        }
        for good in [
            "fc1",
            "encoder.block1.conv",
            "layers.0.fc",
            "_orig_mod.fc",
            "0",
            "0.fc",
        ] {
            assert!(check_layer_name(good).is_ok(), "{good}");
        }
        for bad in ["a..b", "a.", ".a", "a.b-c", "a/b.c", "x=1"] {
            assert!(check_layer_name(bad).is_err(), "{bad}");
        }
        assert!(check_relative("updates/layer=fc1/part-000001.parquet").is_ok());
        assert!(check_relative("../x").is_err());
        assert!(check_relative("/etc/passwd").is_err());
    }

    #[test]
    fn paths() {
        assert_eq!(
            part_path(Table::Updates, Some("fc1"), 3),
            "updates/layer=fc1/part-000003.parquet"
        );
        assert_eq!(
            part_path(Table::Steps, None, 12),
            "steps/part-000012.parquet"
        );
        let t = temp_path(Path::new("/r/updates/layer=fc1/part-000003.parquet"));
        assert_eq!(
            t,
            Path::new("/r/updates/layer=fc1/.part-000003.parquet.tmp")
        );
        assert!(is_temp_name(".part-000003.parquet.tmp"));
    }
}
