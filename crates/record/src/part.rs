//! One Parquet part file of a table (and layer) between two commit points.
//!
//! A part is written under its temporary name; rows go out in row groups of
//! at most `row_group_rows` rows, and a row group is flushed early once its
//! encoded size passes `row_group_bytes`, so the writer's memory stays
//! bounded however many rows a commit interval holds. At the commit point the
//! file is finished and fsynced under its temporary name; it is renamed to
//! `part-<seq>.parquet` only after the manifest that lists it is durable
//! (`reptrace_format::layout::publish`), so directory-listing readers never
//! see an uncommitted part.
use crate::direct::PartFile;
use crate::durable;
use crate::encode::FileWriter;
use crate::{Error, Result};
use arrow_array::RecordBatch;
use parquet::basic::{Compression as Codec, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use reptrace_format::{Dtype, FORMAT_VERSION, FileEntry, Table, col, kv, layout};
use std::fs;
use std::path::{Path, PathBuf};

/// How a recorder compresses the part files it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Zstandard at [`ParquetOptions::zstd_level`], float columns
    /// byte-stream-split: the storage encoding (default).
    #[default]
    Zstd,
    /// No compression, float columns plain: the writer encodes at close to
    /// memory speed, and the files are about 1.6 to 2 times larger until
    /// [`compact`](crate::compact()) rewrites them in the storage encoding.
    None,
}

impl Compression {
    /// The name the command line and the Python package use.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            "none" => Ok(Compression::None),
            other => Err(format!("unknown compression {other:?}; use zstd or none")),
        }
    }
}

/// Parquet settings shared by every part of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParquetOptions {
    /// Zstandard level, 1..=22.
    pub zstd_level: i32,
    /// Compression while recording.
    pub compression: Compression,
    /// Most rows in one row group.
    pub row_group_rows: usize,
    /// A row group is flushed once its estimated encoded size passes this.
    pub row_group_bytes: usize,
}

impl Default for ParquetOptions {
    fn default() -> Self {
        Self {
            // Level 1: faster and, on factors, no larger than 3
            // (crates/record/benches/write.rs, docs/benchmarks.md).
            zstd_level: 1,
            compression: Compression::Zstd,
            row_group_rows: 65_536,
            row_group_bytes: 32 << 20,
        }
    }
}

/// The Parquet leaf path of the elements of list column `name`: arrow-rs
/// writes an Arrow `List` whose item field is called `item` as
/// `name (LIST) { repeated group list { item } }`.
pub(crate) fn list_item_path(name: &str) -> ColumnPath {
    ColumnPath::new(vec![name.to_owned(), "list".to_owned(), "item".to_owned()])
}

/// The float columns of a table: stored without dictionary (factor values
/// barely repeat), with BYTE_STREAM_SPLIT (which lets zstd find the
/// exponent bytes' redundancy) and without statistics (nobody filters on
/// them). Float16 factors (`dtype` f16) are the exception: DuckDB reads
/// BYTE_STREAM_SPLIT for FLOAT, DOUBLE, INT32 and INT64 only, so they are
/// stored PLAIN.
fn float_columns(table: Table) -> Vec<ColumnPath> {
    match table {
        Table::Updates => vec![
            list_item_path(col::U),
            list_item_path(col::V),
            ColumnPath::from(col::UPDATE_NORM),
        ],
        Table::Probes => vec![
            list_item_path(col::A),
            list_item_path(col::P),
            ColumnPath::from(col::P_NORM),
        ],
        Table::Steps => vec![ColumnPath::from(col::LR), ColumnPath::from(col::LOSS)],
        Table::Contributions => vec![
            ColumnPath::from(col::DOT),
            ColumnPath::from(col::NORM),
            ColumnPath::from(col::COSINE),
        ],
        Table::Influence => vec![ColumnPath::from(col::DOT)],
        Table::Examples => vec![ColumnPath::from(col::LOSS), ColumnPath::from(col::P_LABEL)],
        Table::Instances | Table::Batches | Table::LayerSteps => vec![],
    }
}

/// Writer properties for one part file.
pub(crate) fn properties(
    options: &ParquetOptions,
    run_id: &str,
    table: Table,
    layer: Option<&str>,
    dtype: Dtype,
) -> Result<WriterProperties> {
    let mut kvs = vec![
        KeyValue::new(kv::FORMAT_VERSION.to_owned(), FORMAT_VERSION.to_string()),
        KeyValue::new(kv::RUN_ID.to_owned(), run_id.to_owned()),
        KeyValue::new(kv::TABLE.to_owned(), table.name().to_owned()),
    ];
    if let Some(layer) = layer {
        kvs.push(KeyValue::new(kv::LAYER.to_owned(), layer.to_owned()));
    }
    properties_with(options, table, kvs, dtype)
}

/// Writer properties for one part file of `table` with footer metadata `kvs`.
pub(crate) fn properties_with(
    options: &ParquetOptions,
    table: Table,
    kvs: Vec<KeyValue>,
    dtype: Dtype,
) -> Result<WriterProperties> {
    let level = ZstdLevel::try_new(options.zstd_level).map_err(|_| Error::Setting {
        setting: "zstd_level",
        value: options.zstd_level.to_string(),
        why: "must be between 1 and 22",
    })?;
    let (codec, float_encoding) = match options.compression {
        Compression::Zstd => (Codec::ZSTD(level), Encoding::BYTE_STREAM_SPLIT),
        // Byte-stream-split only helps a compressor; without one it is a
        // transposition for nothing.
        Compression::None => (Codec::UNCOMPRESSED, Encoding::PLAIN),
    };
    let mut b = WriterProperties::builder()
        .set_compression(codec)
        .set_max_row_group_row_count(Some(options.row_group_rows.max(1)))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_key_value_metadata(Some(kvs))
        .set_created_by(format!("reptrace-record {}", env!("CARGO_PKG_VERSION")));
    let half = [list_item_path(col::U), list_item_path(col::V)];
    for path in float_columns(table) {
        let encoding = if table == Table::Updates && dtype == Dtype::F16 && half.contains(&path) {
            Encoding::PLAIN
        } else {
            float_encoding
        };
        b = b
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_encoding(path.clone(), encoding)
            .set_column_statistics_enabled(path, EnabledStatistics::None);
    }
    Ok(b.build())
}

/// A part file being written.
pub(crate) struct PartWriter {
    /// Final path relative to the run, `/`-separated.
    rel: String,
    table: Table,
    layer: Option<String>,
    temp: PathBuf,
    writer: FileWriter<PartFile>,
    rows: u64,
    row_group_bytes: usize,
}

impl PartWriter {
    #[cfg(test)]
    /// Creates `<run>/<table>[/layer=<l>]/.part-<seq>.parquet.tmp`.
    pub(crate) fn create(
        run: &Path,
        table: Table,
        layer: Option<&str>,
        seq: u64,
        schema: arrow_schema::SchemaRef,
        props: WriterProperties,
        options: &ParquetOptions,
    ) -> Result<Self> {
        let rel = layout::part_path(table, layer, seq);
        Self::create_at(run, rel, table, layer, schema, props, options)
    }

    /// Creates the part at `rel` (relative to the run), under its temporary name.
    pub(crate) fn create_at(
        run: &Path,
        rel: String,
        table: Table,
        layer: Option<&str>,
        schema: arrow_schema::SchemaRef,
        props: WriterProperties,
        options: &ParquetOptions,
    ) -> Result<Self> {
        let path = run.join(&rel);
        let temp = layout::temp_path(&path);
        if let Some(dir) = path.parent() {
            durable::create_dir(dir)?;
        }
        // The factor tables go to the device around the page cache (see
        // crate::direct); the small tables through it.
        let direct = matches!(table, Table::Updates | Table::Probes);
        let file = PartFile::create(&temp, direct).map_err(|e| Error::io(&temp, e))?;
        let writer =
            FileWriter::try_new(file, schema, props).map_err(|e| Error::parquet(&temp, e))?;
        Ok(Self {
            rel,
            table,
            layer: layer.map(str::to_owned),
            temp,
            writer,
            rows: 0,
            row_group_bytes: options.row_group_bytes.max(1),
        })
    }

    /// Appends rows, flushing the row group when it grows past the byte limit.
    pub(crate) fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer
            .write(batch)
            .map_err(|e| Error::parquet(&self.temp, e))?;
        self.rows += batch.num_rows() as u64;
        if self.writer.in_progress_size() >= self.row_group_bytes
            || self.writer.memory_size() >= self.row_group_bytes
        {
            self.writer
                .flush()
                .map_err(|e| Error::parquet(&self.temp, e))?;
        }
        Ok(())
    }

    /// Writes the footer and fsyncs, leaving the file under its temporary
    /// name; returns its manifest entry and the temporary path. The caller
    /// fsyncs the directory (once per commit, for all parts) and renames the
    /// file once the manifest lists it. On failure the temporary file is
    /// removed.
    pub(crate) fn finish(mut self) -> Result<(FileEntry, PathBuf)> {
        let bytes = match self.footer_and_sync() {
            Ok(b) => b,
            Err(e) => {
                self.discard();
                return Err(e);
            }
        };
        let entry = FileEntry {
            path: self.rel,
            table: self.table.name().to_owned(),
            layer: self.layer,
            rows: self.rows,
            bytes,
        };
        Ok((entry, self.temp))
    }

    /// Finishes the Parquet file, fsyncs it and returns its size.
    fn footer_and_sync(&mut self) -> Result<u64> {
        self.writer
            .finish()
            .map_err(|e| Error::parquet(&self.temp, e))?;
        let file = self.writer.inner_mut();
        file.finish().map_err(|e| Error::io(&self.temp, e))?;
        let file = file.file();
        file.sync_all().map_err(|e| Error::io(&self.temp, e))?;
        Ok(file.metadata().map_err(|e| Error::io(&self.temp, e))?.len())
    }

    /// Drops the unfinished file and removes it.
    pub(crate) fn discard(self) {
        let temp = self.temp.clone();
        drop(self.writer);
        if let Err(e) = fs::remove_file(&temp) {
            tracing::warn!("could not remove {}: {e}", temp.display());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::batch::{FactorValues, NormKind, RowLens, UpdateRows};
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use reptrace_format::{Dtype, schema};
    use std::fs::File;

    fn rows(n: usize) -> UpdateRows {
        UpdateRows {
            step: 3,
            epoch: 1,
            ids: (0..n as i64).map(Some).collect(),
            labels: vec![Some(1); n],
            u: FactorValues::F32((0..n * 4).map(|i| i as f32 * 0.25).collect()),
            v: FactorValues::F32((0..n * 2).map(|i| -(i as f32) * 0.5).collect()),
            u_rows: RowLens::Fixed(4),
            v_rows: RowLens::Fixed(2),
            norms: None,
            norm: NormKind::Outer,
        }
    }

    /// The float columns really get BYTE_STREAM_SPLIT and no dictionary
    /// (this checks the `u.list.item` leaf path), but Float16 factors
    /// (FIXED_LEN_BYTE_ARRAY(2)), which are PLAIN so that DuckDB reads them,
    /// and f32 factors where PLAIN packs smaller.
    #[test]
    fn float_columns_use_byte_stream_split() {
        for dtype in [Dtype::F32, Dtype::F16] {
            let dir = tempfile::tempdir().unwrap();
            let opts = ParquetOptions::default();
            let props = properties(&opts, "run-x", Table::Updates, Some("fc1"), dtype).unwrap();
            let mut w = PartWriter::create(
                dir.path(),
                Table::Updates,
                Some("fc1"),
                7,
                schema(Table::Updates, dtype),
                props,
                &opts,
            )
            .unwrap();
            let temp = dir
                .path()
                .join("updates/layer=fc1/.part-000007.parquet.tmp");
            assert!(temp.is_file(), "writes to the temporary name first");
            w.write(&crate::columns::updates(rows(50), dtype, None).unwrap())
                .unwrap();
            let (entry, staged) = w.finish().unwrap();
            assert_eq!(
                staged, temp,
                "stays under its temporary name until published"
            );
            assert!(!dir.path().join(&entry.path).exists());
            assert!(reptrace_format::layout::publish(dir.path(), &entry.path).unwrap());
            let path = dir.path().join(&entry.path);
            assert!(!temp.exists());
            assert_eq!(entry.path, "updates/layer=fc1/part-000007.parquet");
            assert_eq!(entry.rows, 50);
            assert_eq!(entry.bytes, fs::metadata(&path).unwrap().len());

            let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
            let meta = reader.metadata();
            let kvs = meta.file_metadata().key_value_metadata().unwrap();
            let get = |k: &str| {
                kvs.iter()
                    .find(|kv| kv.key == k)
                    .and_then(|kv| kv.value.clone())
            };
            assert_eq!(get(kv::RUN_ID).as_deref(), Some("run-x"));
            assert_eq!(get(kv::TABLE).as_deref(), Some("updates"));
            assert_eq!(get(kv::LAYER).as_deref(), Some("fc1"));
            assert_eq!(get(kv::FORMAT_VERSION), Some(FORMAT_VERSION.to_string()));
            let rg = meta.row_group(0);
            for name in ["u.list.item", "v.list.item", "update_norm"] {
                let c = rg
                    .columns()
                    .iter()
                    .find(|c| c.column_path().string() == name)
                    .unwrap_or_else(|| panic!("{dtype}: no column {name}"));
                let enc: Vec<_> = c.encodings().collect();
                let half = dtype == Dtype::F16 && name != "update_norm";
                let factor = name != "update_norm";
                // f32 factors: split, or PLAIN where that packs smaller
                // (encode.rs, `Packing`).
                assert_eq!(
                    enc.contains(&Encoding::BYTE_STREAM_SPLIT),
                    !half && (!factor || !enc.contains(&Encoding::PLAIN)),
                    "{dtype} {name}: {enc:?}"
                );
                assert!(
                    !enc.contains(&Encoding::RLE_DICTIONARY)
                        && !enc.contains(&Encoding::PLAIN_DICTIONARY),
                    "{dtype} {name}: {enc:?}"
                );
                assert!(matches!(c.compression(), Codec::ZSTD(_)));
            }
            let step = rg
                .columns()
                .iter()
                .find(|c| c.column_path().string() == "step")
                .unwrap();
            assert!(step.statistics().is_some(), "int columns carry statistics");
        }
    }

    /// Writes part `part` of layer `l`'s updates with `opts`, `writes` batches
    /// of `rows_each` rows; the rows of each row group of the file.
    fn updates_row_groups(
        dir: &Path,
        opts: &ParquetOptions,
        part: u64,
        writes: usize,
        rows_each: usize,
    ) -> Vec<i64> {
        let props = properties(opts, "r", Table::Updates, Some("l"), Dtype::F32).unwrap();
        let mut w = PartWriter::create(
            dir,
            Table::Updates,
            Some("l"),
            part,
            schema(Table::Updates, Dtype::F32),
            props,
            opts,
        )
        .unwrap();
        for _ in 0..writes {
            w.write(&crate::columns::updates(rows(rows_each), Dtype::F32, None).unwrap())
                .unwrap();
        }
        let (_, path) = w.finish().unwrap();
        let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
        reader
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect()
    }

    #[test]
    fn row_groups_are_bounded_by_bytes_and_rows() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ParquetOptions {
            zstd_level: 1,
            compression: Compression::Zstd,
            row_group_rows: 64,
            row_group_bytes: 1 << 20,
        };
        let sizes = updates_row_groups(dir.path(), &opts, 0, 10, 30);
        assert_eq!(sizes.iter().sum::<i64>(), 300);
        assert!(sizes.iter().all(|&n| n <= 64), "{sizes:?}");

        // A tiny byte limit flushes a row group after every write.
        let opts = ParquetOptions {
            row_group_bytes: 1,
            ..opts
        };
        assert_eq!(updates_row_groups(dir.path(), &opts, 1, 5, 10).len(), 5);
    }

    #[test]
    fn discard_removes_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ParquetOptions::default();
        let props = properties(&opts, "r", Table::Steps, None, Dtype::F32).unwrap();
        let w = PartWriter::create(
            dir.path(),
            Table::Steps,
            None,
            2,
            schema(Table::Steps, Dtype::F32),
            props,
            &opts,
        )
        .unwrap();
        assert!(dir.path().join("steps/.part-000002.parquet.tmp").exists());
        w.discard();
        assert_eq!(fs::read_dir(dir.path().join("steps")).unwrap().count(), 0);
    }

    #[test]
    fn bad_zstd_level_is_an_error() {
        let opts = ParquetOptions {
            zstd_level: 99,
            ..ParquetOptions::default()
        };
        let e = properties(&opts, "r", Table::Steps, None, Dtype::F32).unwrap_err();
        assert!(e.to_string().contains("zstd_level"), "{e}");
    }
}
