//! Copying runs and listing, snapshotting and comparing their files (killed
//! and damaged runs start from a copy; "the run is unchanged" compares
//! snapshots) and reading the Parquet files of a run.
use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Copies the directory tree `from` to `to` (created).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target)
                .unwrap_or_else(|err| panic!("copy {}: {err}", e.path().display()));
        }
    }
}

/// Every file under `dir`, relative to it, sorted (empty when `dir` is
/// missing).
pub fn list(dir: &Path) -> Vec<PathBuf> {
    sizes(dir).into_iter().map(|(p, _)| p).collect()
}

/// Every file under `dir` with its size, relative to it, sorted (empty when
/// `dir` is missing; a file that vanishes while listing is left out).
pub fn sizes(dir: &Path) -> Vec<(PathBuf, u64)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else if let Ok(meta) = e.metadata() {
                // A file renamed away while listing (a live run) is skipped.
                out.push((p.strip_prefix(root).unwrap().to_path_buf(), meta.len()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Every file under `dir` with its bytes, by relative path.
pub fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    list(dir)
        .into_iter()
        .map(|rel| {
            let bytes = std::fs::read(dir.join(&rel)).unwrap();
            (rel, bytes)
        })
        .collect()
}

/// The names in `dir` (not recursive), sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Whether any file under `dir` has a temporary name (`.NAME.tmp`: a file
/// being written).
pub fn writing(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        (name.starts_with('.') && name.ends_with(".tmp")) || (p.is_dir() && writing(&p))
    })
}

/// The first committed file of `table` (for `layer`), relative to the run.
pub fn first_file(run: &Path, table: &str, layer: Option<&str>) -> String {
    let m = reptrace_format::Manifest::load(run).unwrap();
    m.commits
        .iter()
        .flat_map(|c| &c.files)
        .find(|f| f.table == table && f.layer.as_deref() == layer)
        .unwrap_or_else(|| panic!("no committed {table} file"))
        .path
        .clone()
}

/// The record batches of the Parquet file at `path`, in order.
pub fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// Rows of the Parquet file at `path`, counted by reading every batch.
pub fn parquet_rows(path: &Path) -> u64 {
    read_parquet(path).iter().map(|b| b.num_rows() as u64).sum()
}

/// The `*.parquet` files under the tables' directories of `run` that a
/// directory-listing reader (pyarrow, Spark, Hive discovery, a DuckDB glob of
/// `*.parquet`) picks up, relative to the run, sorted: names starting with
/// `.` or `_` are skipped.
pub fn listed_parquet(run: &Path) -> Vec<String> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            let r = format!("{rel}/{name}");
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), &r, out);
            } else if name.ends_with(".parquet") {
                out.push(r);
            }
        }
    }
    let mut out = Vec::new();
    for t in reptrace_format::Table::ALL {
        walk(&run.join(t.name()), t.name(), &mut out);
    }
    out.sort();
    out
}
