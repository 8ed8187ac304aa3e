//! Durable file operations: every file becomes visible under its final name
//! only when it is complete and on disk.
//!
//! A file is written to its temporary name (`reptrace_format::layout::temp_path`),
//! fsynced, renamed, and the directory is fsynced so the rename itself
//! survives a crash. The manifest is replaced the same way, so a reader sees
//! either the old or the new manifest, never a partial one.
use crate::{Error, Result};
use reptrace_format::layout;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

/// Fsyncs a directory so that renames and new entries in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Renames a complete, fsynced temporary file to its final name and fsyncs
/// the directory.
pub(crate) fn publish(temp: &Path, path: &Path) -> Result<()> {
    fs::rename(temp, path).map_err(|e| Error::io(path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: temporary name, fsync, rename, fsync dir.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let temp = layout::temp_path(path);
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&temp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&temp);
        return Err(Error::io(&temp, e));
    }
    publish(&temp, path)
}

/// Creates a directory (and parents), fsyncing each parent of a newly made
/// directory so that the new entry is durable.
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        create_dir(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
    }
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["manifest.json"]);
    }

    #[test]
    fn failed_write_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        write_atomic(&path, b"old").unwrap();
        // The temporary name is taken by a directory: the write must fail
        // and leave the old content in place.
        fs::create_dir(layout::temp_path(&path)).unwrap();
        assert!(write_atomic(&path, b"new").is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
    }

    #[test]
    fn creates_nested_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("updates/layer=fc1");
        create_dir(&d).unwrap();
        create_dir(&d).unwrap();
        assert!(d.is_dir());
    }
}
