//! Compaction: rewrites the part files a recorder wrote without compression
//! ([`Compression::None`]) in the storage encoding (zstd, byte-stream-split
//! floats), as one commit.
//!
//! Crash-safe the way a recorder's commit is: every new file is written and
//! fsynced under its temporary name; one atomic replacement of the manifest
//! swaps the new entries in (each in the commit that listed the old file, so
//! a reader of an earlier commit reads the same rows); only then do the new
//! files take their final names and the old ones go. A compaction killed
//! before the manifest is replaced leaves the run as it was, plus temporary
//! files that readers ignore; one killed after it is finished by the next
//! reader ([`Manifest::open`] publishes listed files) and leaves old files
//! that no manifest lists, which `reptrace verify` reports. The next
//! compaction removes both, and a killed recorder's uncommitted parts.
//!
//! The run's lock is held throughout: a run still being recorded is refused.
use crate::append::lock_run;
use crate::encode::FileWriter;
use crate::part::{Compression, ParquetOptions, properties_with};
use crate::{Error, Result, durable};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression as Codec;
use parquet::file::metadata::KeyValue;
use reptrace_format::{Dtype, FileEntry, Manifest, Table, col, layout};
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What [`compact`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compacted {
    /// Part files rewritten.
    pub files: usize,
    /// Their size before, in bytes.
    pub bytes_before: u64,
    /// Their size after, in bytes.
    pub bytes_after: u64,
    /// Old files of an earlier, interrupted compaction removed.
    pub leftovers: usize,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// The suffix of a compacted part's file name, before `.parquet`.
const COMPACTED: &str = "-z";

/// Rewrites every committed part file of `run` that is not compressed in
/// the storage encoding of `options` (its `compression` is ignored: the
/// result is always zstd at `options.zstd_level`). Files already
/// compressed are left alone, so running it twice does nothing the second
/// time.
pub fn compact(run: &Path, options: &ParquetOptions) -> Result<Compacted> {
    compact_with(run, options, &mut |_, _| true)
}

/// [`compact`], calling `progress(done, total)` after each file rewritten;
/// when it returns false the compaction stops, removes what it wrote and
/// fails with [`Error::Stopped`], leaving the run as it was.
pub fn compact_with(
    run: &Path,
    options: &ParquetOptions,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Compacted> {
    let start = Instant::now();
    let options = ParquetOptions {
        compression: Compression::Zstd,
        ..*options
    };
    // A bad level is refused before anything is read.
    properties_with(&options, Table::Steps, Vec::new(), Dtype::F32)?;
    let _lock = lock_run(run, "compact it")?;
    let mut manifest = Manifest::open(run)?;
    let mut report = Compacted {
        leftovers: remove_leftovers(run, &manifest),
        ..Compacted::default()
    };
    let mut todo: Vec<FileEntry> = Vec::new();
    for f in manifest.all_files() {
        if uncompressed(&run.join(&f.path))? {
            todo.push(f.clone());
        }
    }
    let mut written: Vec<(String, FileEntry, PathBuf)> = Vec::new();
    for (i, entry) in todo.iter().enumerate() {
        match rewrite(run, entry, &options) {
            Ok((new, temp)) => written.push((entry.path.clone(), new, temp)),
            Err(e) => {
                discard(&written);
                return Err(e);
            }
        }
        if !progress(i + 1, todo.len()) {
            discard(&written);
            return Err(Error::Stopped {
                run: run.to_path_buf(),
            });
        }
    }
    if written.is_empty() {
        report.seconds = start.elapsed().as_secs_f64();
        return Ok(report);
    }
    let swap = |manifest: &mut Manifest| -> Result<()> {
        for (old, new, _) in &written {
            let entry = entries_mut(manifest)
                .find(|f| &f.path == old)
                .ok_or_else(|| Error::Invalid {
                    context: run.display().to_string(),
                    message: format!("{old} vanished from the manifest"),
                })?;
            *entry = new.clone();
        }
        let dirs: BTreeSet<&Path> = written.iter().filter_map(|(_, _, t)| t.parent()).collect();
        for dir in dirs {
            durable::sync_dir(dir)?;
        }
        durable::write_atomic(&layout::manifest_path(run), manifest.to_json().as_bytes())
    };
    if let Err(e) = swap(&mut manifest) {
        discard(&written);
        return Err(e);
    }
    // Committed: the new files take their final names, the old ones go.
    for (old, new, _) in &written {
        layout::publish(run, &new.path).map_err(|e| Error::io(run.join(&new.path), e))?;
        let bytes = fs::metadata(run.join(old)).map_or(0, |m| m.len());
        report.bytes_before += bytes;
        report.bytes_after += new.bytes;
        layout::remove(run, old);
    }
    report.files = written.len();
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Every file entry of the manifest, mutably (the order of
/// [`Manifest::all_files`]).
fn entries_mut(m: &mut Manifest) -> impl Iterator<Item = &mut FileEntry> {
    m.commits
        .iter_mut()
        .flat_map(|c| c.files.iter_mut().chain(c.probes.iter_mut()))
        .chain(m.attributions.iter_mut().flat_map(|a| a.files.iter_mut()))
}

/// Whether any column chunk of the Parquet file at `path` is uncompressed.
fn uncompressed(path: &Path) -> Result<bool> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(path, e))?;
    Ok(builder
        .metadata()
        .row_groups()
        .iter()
        .flat_map(|g| g.columns())
        .any(|c| c.compression() == Codec::UNCOMPRESSED))
}

/// The name of the compacted version of part `rel`.
fn compacted_name(rel: &str) -> String {
    let stem = rel.strip_suffix(".parquet").unwrap_or(rel);
    format!("{stem}{COMPACTED}.parquet")
}

/// Writes the compacted copy of `entry` under its temporary name, fsynced;
/// its manifest entry and the temporary path.
fn rewrite(
    run: &Path,
    entry: &FileEntry,
    options: &ParquetOptions,
) -> Result<(FileEntry, PathBuf)> {
    let src = run.join(&entry.path);
    let file = File::open(&src).map_err(|e| Error::io(&src, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(&src, e))?;
    let kvs: Vec<KeyValue> = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kvs| {
            kvs.iter()
                // The writer stores the Arrow schema again itself.
                .filter(|kv| kv.key != "ARROW:schema")
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let table: Table = entry.table.parse().map_err(|_| Error::Invalid {
        context: src.display().to_string(),
        message: format!("unknown table {:?} in the manifest", entry.table),
    })?;
    let schema = builder.schema().clone();
    // The factor type, for the encoding of the factor columns.
    let half = schema.field_with_name(col::U).is_ok_and(
        |f| matches!(f.data_type(), DataType::List(item) if item.data_type() == &DataType::Float16),
    );
    let dtype = if half { Dtype::F16 } else { Dtype::F32 };
    let props = properties_with(options, table, kvs, dtype)?;
    let reader = builder
        .with_batch_size(8192)
        .build()
        .map_err(|e| Error::parquet(&src, e))?;
    let rel = compacted_name(&entry.path);
    let dest = run.join(&rel);
    let temp = layout::temp_path(&dest);
    let write = || -> Result<u64> {
        let out = File::create(&temp).map_err(|e| Error::io(&temp, e))?;
        let mut writer =
            FileWriter::try_new(out, schema, props).map_err(|e| Error::parquet(&temp, e))?;
        let mut rows = 0u64;
        for batch in reader {
            let batch = batch.map_err(|e| Error::Arrow {
                table: entry.table.clone(),
                source: e,
            })?;
            rows += batch.num_rows() as u64;
            writer.write(&batch).map_err(|e| Error::parquet(&temp, e))?;
            if writer.in_progress_size() >= options.row_group_bytes {
                writer.flush().map_err(|e| Error::parquet(&temp, e))?;
            }
        }
        if rows != entry.rows {
            return Err(Error::Invalid {
                context: src.display().to_string(),
                message: format!("holds {rows} rows, the manifest says {}", entry.rows),
            });
        }
        let out = writer.into_inner().map_err(|e| Error::parquet(&temp, e))?;
        out.sync_all().map_err(|e| Error::io(&temp, e))?;
        Ok(out.metadata().map_err(|e| Error::io(&temp, e))?.len())
    };
    match write() {
        Ok(bytes) => Ok((
            FileEntry {
                path: rel,
                bytes,
                ..entry.clone()
            },
            temp,
        )),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// Removes the temporary files of an unfinished compaction.
fn discard(written: &[(String, FileEntry, PathBuf)]) {
    for (_, _, temp) in written {
        let _ = fs::remove_file(temp);
    }
}

/// Removes what an interrupted compaction, or a killed recorder, left: the
/// uncompressed original of a part whose compacted version the manifest
/// lists, and temporary part files (which, once [`Manifest::open`] has
/// published the listed ones, no manifest lists). How many it removed.
fn remove_leftovers(run: &Path, manifest: &Manifest) -> usize {
    let listed: BTreeSet<&str> = manifest
        .all_files()
        .into_iter()
        .map(|f| f.path.as_str())
        .collect();
    let mut removed = 0;
    for rel in &listed {
        let Some(stem) = rel.strip_suffix(&format!("{COMPACTED}.parquet")) else {
            continue;
        };
        let original = format!("{stem}.parquet");
        if !listed.contains(original.as_str()) && run.join(&original).is_file() {
            layout::remove(run, &original);
            removed += 1;
        }
    }
    let mut dirs: Vec<PathBuf> = Table::ALL.iter().map(|t| run.join(t.name())).collect();
    dirs.push(run.join(layout::CHECKPOINTS));
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            } else if layout::is_temp_name(&name)
                && name.ends_with(".parquet.tmp")
                && fs::remove_file(e.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
}
