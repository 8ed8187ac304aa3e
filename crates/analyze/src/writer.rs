//! Writing Parquet files of a run (contributions) and the manifest, each
//! under a temporary name. The manifest is renamed when complete; a part is
//! renamed to its final name only once the manifest that lists it is in
//! place (`reptrace_format::layout::publish`), so that directory-listing
//! readers never see rows of an attribution that was not committed.
use crate::{Error, Result};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use reptrace_format::{FORMAT_VERSION, FileEntry, Manifest, Table, kv, layout};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A Parquet part file being written under its temporary name.
pub struct PartWriter {
    rel: String,
    temp: PathBuf,
    table: Table,
    layer: Option<String>,
    writer: Option<ArrowWriter<File>>,
    rows: u64,
}

impl PartWriter {
    /// Starts `<run>/<rel>` (written to its temporary name first).
    pub fn create(
        run_dir: &Path,
        rel: String,
        table: Table,
        layer: Option<&str>,
        run_id: &str,
        schema: SchemaRef,
        float_columns: &[&str],
    ) -> Result<Self> {
        let path = run_dir.join(&rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let temp = layout::temp_path(&path);
        let file = File::create(&temp).map_err(|e| Error::io(&temp, e))?;
        let mut kvs = vec![
            KeyValue::new(kv::FORMAT_VERSION.into(), FORMAT_VERSION.to_string()),
            KeyValue::new(kv::RUN_ID.into(), run_id.to_owned()),
            KeyValue::new(kv::TABLE.into(), table.name().to_owned()),
        ];
        if let Some(l) = layer {
            kvs.push(KeyValue::new(kv::LAYER.into(), l.to_owned()));
        }
        // Zstd level 1: contributions are mostly f64 noise that compresses
        // little; byte-stream-split helps it more than a higher level would.
        let level = ZstdLevel::try_new(1).map_err(|e| Error::parquet(&temp, e))?;
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_key_value_metadata(Some(kvs))
            .set_max_row_group_row_count(Some(1 << 20));
        for c in float_columns {
            let col = ColumnPath::from(*c);
            props = props
                .set_column_dictionary_enabled(col.clone(), false)
                .set_column_encoding(col, Encoding::BYTE_STREAM_SPLIT);
        }
        // Integer columns (probe_id, step, epoch, instance_id, label) come in
        // runs and slow ramps: delta encoding stores them in a few bits per
        // value without the dictionary's hashing, which cost a sixth of the
        // writer's time (perf on crates/analyze/benches/attribution.rs).
        for field in schema.fields() {
            if matches!(
                field.data_type(),
                arrow_schema::DataType::Int32 | arrow_schema::DataType::Int64
            ) {
                let col = ColumnPath::from(field.name().as_str());
                props = props
                    .set_column_dictionary_enabled(col.clone(), false)
                    .set_column_encoding(col, Encoding::DELTA_BINARY_PACKED);
            }
        }
        let writer = ArrowWriter::try_new(file, schema, Some(props.build()))
            .map_err(|e| Error::parquet(&temp, e))?;
        Ok(Self {
            rel,
            temp,
            table,
            layer: layer.map(str::to_owned),
            writer: Some(writer),
            rows: 0,
        })
    }

    /// Appends a batch.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if let Some(w) = &mut self.writer {
            w.write(batch).map_err(|e| Error::parquet(&self.temp, e))?;
            self.rows += batch.num_rows() as u64;
        }
        Ok(())
    }

    /// Closes the file and syncs it, under its temporary name: the caller
    /// publishes it after the manifest lists it.
    pub fn finish(mut self) -> Result<FileEntry> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| Error::Internal("part writer finished twice".into()))?;
        let file = writer
            .into_inner()
            .map_err(|e| Error::parquet(&self.temp, e))?;
        file.sync_all().map_err(|e| Error::io(&self.temp, e))?;
        let bytes = file.metadata().map_err(|e| Error::io(&self.temp, e))?.len();
        drop(file);
        Ok(FileEntry {
            path: self.rel.clone(),
            table: self.table.name().to_owned(),
            layer: self.layer.clone(),
            rows: self.rows,
            bytes,
        })
    }
}

impl Drop for PartWriter {
    fn drop(&mut self) {
        // Not finished: leave nothing behind.
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Replaces `<run>/manifest.json` atomically (temporary file, fsync, rename, fsync dir).
pub fn write_manifest(run_dir: &Path, manifest: &Manifest) -> Result<()> {
    let path = layout::manifest_path(run_dir);
    let temp = layout::temp_path(&path);
    let mut f = File::create(&temp).map_err(|e| Error::io(&temp, e))?;
    f.write_all(manifest.to_json().as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(&temp, e))?;
    drop(f);
    std::fs::rename(&temp, &path).map_err(|e| Error::io(&path, e))?;
    sync_dir(run_dir);
    Ok(())
}

/// Best-effort fsync of a directory (makes a rename durable on Linux).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
