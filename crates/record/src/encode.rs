//! The Parquet file writer behind every part and every compacted file.
//!
//! arrow-rs encodes the columns, row group by row group, except two kinds
//! of list columns (factor values, `u` and `v`, as parts store them),
//! which this module writes itself, in bulk, when they are uncompressed or
//! compressed with zstd:
//!
//! - lists of `Float16` (the factors of an f16 run): arrow-rs writes a
//!   FLOAT16 value as a FIXED_LEN_BYTE_ARRAY with one reference-counted
//!   buffer per value, which made writing half the bytes of an f32 run take
//!   longer than the f32 run;
//! - lists of `Float32` stored BYTE_STREAM_SPLIT without dictionary,
//!   statistics or bloom filter (how compressed parts and compacted files
//!   store f32 factors): arrow-rs splits the values' bytes one at a time,
//!   this module into four streams at once (`benches/write.rs`, zstd level
//!   1: the writer's time −8 %). PLAIN f32 lists (uncompressed parts) stay
//!   with arrow-rs, which measured as fast or faster there than copying
//!   the values once more into a page.
//!
//! Compressed with zstd, a column's pages are packed as trying its first
//! page in a file found smallest ([`Packing`]): f32 values split into byte
//! streams or PLAIN, and zstd's level with its own match search or, at
//! level 1, a search that skips ahead where matches are rare and
//! Huffman-codes every literal. Which wins depends on the data (the
//! inputs of an MLP's layers: split and the skipping search, 1 % smaller
//! and 1.7 times as fast; a convolution's unfolded patches: PLAIN, whose
//! repeats zstd finds; docs/benchmarks.md, "Pages packed as a trial
//! finds smallest"). Readers read either encoding; any zstd decoder reads
//! the pages.
//!
//! The values are copied a row at a time (the two bytes of each half float
//! as FIXED_LEN_BYTE_ARRAY(2) with the FLOAT16 logical type, the four of
//! each f32 as FLOAT, split into their byte streams page by page),
//! repetition and definition levels are RLE runs (two per row), data pages
//! (v1) are cut at row boundaries and listed in the offset index: what
//! arrow-rs would have written with the same properties. Readers see the
//! same schema and the same values.
use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type};
use arrow_array::{Array, ArrayRef, ListArray, RecordBatch};
use arrow_schema::{DataType, Field, SchemaRef};
use bytes::Bytes;
use parquet::arrow::ArrowSchemaConverter;
use parquet::arrow::add_encoded_arrow_schema_to_metadata;
use parquet::arrow::arrow_writer::{ArrowColumnWriter, ArrowRowGroupWriterFactory, compute_leaves};
use parquet::basic::{Compression as Codec, Encoding};
use parquet::column::page::{CompressedPage, Page, PageWriter};
use parquet::column::writer::ColumnCloseResult;
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::{ColumnChunkMetaData, OffsetIndexBuilder};
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterPropertiesPtr};
use parquet::file::writer::{SerializedFileWriter, SerializedPageWriter, TrackedWrite};
use parquet::schema::types::ColumnDescPtr;
use std::io::Write;
use std::sync::Arc;

/// Writes record batches of one Arrow schema to one Parquet file.
pub(crate) struct FileWriter<W: Write + Send> {
    file: SerializedFileWriter<W>,
    factory: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    /// How each top-level field is encoded.
    plans: Vec<Plan>,
    /// The row group being filled.
    group: Option<Vec<Chunk>>,
    group_rows: usize,
    max_rows: usize,
}

/// How one top-level field is encoded.
enum Plan {
    /// By arrow-rs, as this many leaf columns.
    Arrow(usize),
    /// As a list of floats, by [`FloatList`], packed as the file's first
    /// row group found best (`None` before it is written).
    Floats(ColumnDescPtr, Layout, Option<Packing>),
}

/// One top-level field's column chunk(s) in the row group being filled.
enum Chunk {
    Arrow(Vec<ArrowColumnWriter>),
    Floats(Box<FloatList>),
}

impl<W: Write + Send> FileWriter<W> {
    /// A writer for `schema` with `props` (the Arrow schema is stored in the
    /// footer, as arrow-rs's own writer does).
    pub(crate) fn try_new(out: W, schema: SchemaRef, mut props: WriterProperties) -> Result<Self> {
        let parquet = ArrowSchemaConverter::new()
            .with_coerce_types(props.coerce_types())
            .convert(&schema)?;
        add_encoded_arrow_schema_to_metadata(&schema, &mut props);
        let max_rows = props.max_row_group_row_count().unwrap_or(usize::MAX).max(1);
        let props: WriterPropertiesPtr = Arc::new(props);
        let file = SerializedFileWriter::new(out, parquet.root_schema_ptr(), Arc::clone(&props))?;
        let mut leaves = vec![0usize; schema.fields().len()];
        for i in 0..parquet.num_columns() {
            leaves[parquet.get_column_root_idx(i)] += 1;
        }
        let mut first_leaf = 0;
        let plans = schema
            .fields()
            .iter()
            .zip(leaves)
            .map(|(field, n)| {
                let descr = parquet.column(first_leaf);
                first_leaf += n;
                match float_list(field, &descr, &props) {
                    Some(layout) if n == 1 => Plan::Floats(descr, layout, None),
                    _ => Plan::Arrow(n),
                }
            })
            .collect();
        let factory = ArrowRowGroupWriterFactory::new(&file, Arc::clone(&schema));
        Ok(Self {
            file,
            factory,
            schema,
            plans,
            group: None,
            group_rows: 0,
            max_rows,
        })
    }

    /// Appends the rows of `batch`, closing a row group at the row limit.
    pub(crate) fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        if batch.num_columns() != self.plans.len() {
            return Err(ParquetError::General(format!(
                "a batch of {} columns for a schema of {}",
                batch.num_columns(),
                self.plans.len()
            )));
        }
        if self.group_rows + rows > self.max_rows {
            let first = self.max_rows - self.group_rows;
            self.write(&batch.slice(0, first))?;
            return self.write(&batch.slice(first, rows - first));
        }
        let mut group = match self.group.take() {
            Some(group) => group,
            None => self.start_group()?,
        };
        for ((chunk, field), column) in group
            .iter_mut()
            .zip(self.schema.fields())
            .zip(batch.columns())
        {
            match chunk {
                Chunk::Arrow(writers) => {
                    for (writer, leaf) in writers.iter_mut().zip(compute_leaves(field, column)?) {
                        writer.write(&leaf)?;
                    }
                }
                Chunk::Floats(list) => list.write(field, column)?,
            }
        }
        self.group = Some(group);
        self.group_rows += rows;
        if self.group_rows >= self.max_rows {
            self.flush()?;
        }
        Ok(())
    }

    fn start_group(&self) -> Result<Vec<Chunk>> {
        let props = self.file.properties();
        let mut writers = self
            .factory
            .create_column_writers(self.file.flushed_row_groups().len())?
            .into_iter();
        self.plans
            .iter()
            .map(|plan| match plan {
                Plan::Arrow(n) => Ok(Chunk::Arrow(writers.by_ref().take(*n).collect())),
                Plan::Floats(descr, layout, packing) => {
                    // arrow-rs's writer for this leaf is not used.
                    writers.next();
                    FloatList::new(Arc::clone(descr), *layout, *packing, props)
                        .map(|list| Chunk::Floats(Box::new(list)))
                }
            })
            .collect()
    }

    /// Encoded bytes of the row group being filled (an estimate for the
    /// columns arrow-rs encodes).
    pub(crate) fn in_progress_size(&self) -> usize {
        self.group.iter().flatten().map(Chunk::size).sum()
    }

    /// Memory held by the row group being filled.
    pub(crate) fn memory_size(&self) -> usize {
        self.group.iter().flatten().map(Chunk::memory).sum()
    }

    /// Writes the row group being filled to the file.
    pub(crate) fn flush(&mut self) -> Result<()> {
        let Some(group) = self.group.take() else {
            return Ok(());
        };
        self.group_rows = 0;
        let mut out = self.file.next_row_group()?;
        for (chunk, plan) in group.into_iter().zip(&mut self.plans) {
            match chunk {
                Chunk::Arrow(writers) => {
                    for writer in writers {
                        writer.close()?.append_to_row_group(&mut out)?;
                    }
                }
                Chunk::Floats(list) => {
                    let (bytes, close, packing) = list.close()?;
                    if let Plan::Floats(_, _, chosen) = plan {
                        *chosen = chosen.or(packing);
                    }
                    out.append_column(&bytes, close)?;
                }
            }
        }
        out.close()?;
        Ok(())
    }

    /// Writes the last row group and the footer.
    pub(crate) fn finish(&mut self) -> Result<()> {
        self.flush()?;
        self.file.finish()?;
        Ok(())
    }

    /// The file being written, to finish it after [`FileWriter::finish`].
    pub(crate) fn inner_mut(&mut self) -> &mut W {
        self.file.inner_mut()
    }

    /// Writes the last row group and the footer and returns the file.
    pub(crate) fn into_inner(mut self) -> Result<W> {
        self.flush()?;
        self.file.into_inner()
    }
}

impl Chunk {
    fn size(&self) -> usize {
        match self {
            Chunk::Arrow(writers) => writers
                .iter()
                .map(ArrowColumnWriter::get_estimated_total_bytes)
                .sum(),
            Chunk::Floats(list) => list.size(),
        }
    }

    fn memory(&self) -> usize {
        match self {
            Chunk::Arrow(writers) => writers.iter().map(ArrowColumnWriter::memory_size).sum(),
            Chunk::Floats(list) => list.memory(),
        }
    }
}

/// Which list column is written in bulk.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    /// Float16, PLAIN: two bytes per value.
    Half,
    /// Float32 whose properties ask for BYTE_STREAM_SPLIT (a page's first
    /// bytes of every value, then their second bytes, and so on); with zstd
    /// PLAIN where that packs smaller ([`Packing`]).
    Single,
}

impl Layout {
    fn width(self) -> usize {
        match self {
            Layout::Half => 2,
            Layout::Single => 4,
        }
    }

    /// The packing the properties ask for: split f32, PLAIN f16, zstd's
    /// own search.
    fn asked(self) -> Packing {
        Packing {
            split: self == Layout::Single,
            fast: false,
        }
    }

    /// The packings a trial of a zstd-compressed column at `level` tries,
    /// the properties' own first: on equal sizes the earlier wins.
    fn candidates(self, level: i32) -> Vec<Packing> {
        let splits: &[bool] = match self {
            // DuckDB refuses BYTE_STREAM_SPLIT on FLOAT16.
            Layout::Half => &[false],
            Layout::Single => &[true, false],
        };
        let fasts: &[bool] = if level == 1 { &[false, true] } else { &[false] };
        splits
            .iter()
            .flat_map(|&split| fasts.iter().map(move |&fast| Packing { split, fast }))
            .collect()
    }
}

/// How a bulk-written column chunk's pages are packed.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Packing {
    /// The values split into byte streams (BYTE_STREAM_SPLIT), else PLAIN.
    split: bool,
    /// zstd level 1 with [`compressor`]'s skipping search.
    fast: bool,
}

impl Packing {
    fn encoding(self) -> Encoding {
        if self.split {
            Encoding::BYTE_STREAM_SPLIT
        } else {
            Encoding::PLAIN
        }
    }
}

/// How `field` (Parquet leaf `descr`) is written in bulk, if it is: a
/// non-null list of non-null half floats, or of single floats whose
/// properties ask for nothing but their values split into byte streams
/// (BYTE_STREAM_SPLIT; no dictionary, statistics or bloom filter), not
/// compressed or compressed with zstd. Max definition and repetition level
/// 1: a list's values have definition level 1, an empty list is one entry
/// of level 0.
fn float_list(field: &Field, descr: &ColumnDescPtr, props: &WriterProperties) -> Option<Layout> {
    let DataType::List(item) = field.data_type() else {
        return None;
    };
    let path = descr.path();
    if !matches!(
        props.compression(path),
        Codec::UNCOMPRESSED | Codec::ZSTD(_)
    ) || field.is_nullable()
        || item.is_nullable()
        || descr.max_def_level() != 1
        || descr.max_rep_level() != 1
    {
        return None;
    }
    match item.data_type() {
        DataType::Float16 => Some(Layout::Half),
        DataType::Float32
            if !props.dictionary_enabled(path)
                && props.statistics_enabled(path) == EnabledStatistics::None
                && props.bloom_filter_properties(path).is_none() =>
        {
            (props.encoding(path) == Some(Encoding::BYTE_STREAM_SPLIT)).then_some(Layout::Single)
        }
        _ => None,
    }
}

/// The hash table of zstd's match finder, 2^[`INPUTS_HASH_LOG`] entries,
/// for the pages of `u` (a layer's inputs) stored byte-stream-split at
/// level 1, instead of the level's 2^14. Two of such a page's four streams
/// hold the values' low mantissa bytes, close to random: there the finder
/// mostly misses, and a table of 64 KB misses the core's first-level cache
/// as well. On the inputs of an MLP's and a CNN's layers in training
/// (docs/benchmarks.md, "A smaller match table for the inputs' pages") the
/// smaller table compressed faster into fewer bytes (an MLP's `u` and
/// `v` together: 40 % faster, 1.4 % smaller); on the output gradients
/// (`v`) it made a CNN's pages 4 % larger, so other columns, other levels
/// and f16 pages keep zstd's settings. Any zstd decoder reads the pages.
const INPUTS_HASH_LOG: u32 = 10;

/// zstd level 1's fast strategy looks for matches at every position and
/// skips ahead faster the longer it finds none; a target length above 0
/// makes it skip faster from the start (zstd's negative levels), which
/// would also store literals without Huffman codes, unless they are asked
/// for. 1024, with literals Huffman-coded and a 2^10 match table, is
/// almost a Huffman coder of the page's bytes: on factor pages whose
/// streams barely repeat (an MLP's inputs and output gradients, split into
/// byte streams) the trial of [`Layout::candidates`] picks it; where
/// values repeat (a convolution's unfolded patches) zstd's own search wins.
const FAST_TARGET_LENGTH: u32 = 1024;

/// The compressor of a bulk-written column chunk's pages, packed as
/// `packing` at zstd `level`.
fn compressor(
    descr: &ColumnDescPtr,
    packing: Packing,
    level: i32,
) -> std::io::Result<zstd::bulk::Compressor<'static>> {
    use zstd::zstd_safe::{CParameter, ParamSwitch};
    let mut zstd = zstd::bulk::Compressor::new(level)?;
    let inputs = descr.path().parts().first().is_some_and(|c| c == "u");
    if packing.fast {
        zstd.set_parameter(CParameter::HashLog(INPUTS_HASH_LOG))?;
        zstd.set_parameter(CParameter::TargetLength(FAST_TARGET_LENGTH))?;
        zstd.set_parameter(CParameter::LiteralCompressionMode(ParamSwitch::Enable))?;
    } else if inputs && packing.split && level == 1 {
        zstd.set_parameter(CParameter::HashLog(INPUTS_HASH_LOG))?;
    }
    Ok(zstd)
}

/// The column chunk of a list field written in bulk ([`float_list`]),
/// page by page into memory.
struct FloatList {
    descr: ColumnDescPtr,
    layout: Layout,
    codec: Codec,
    /// How the pages are packed: with zstd, `None` until the first page's
    /// trial.
    packing: Option<Packing>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    page_limit: usize,
    /// The chunk's pages so far.
    out: TrackedWrite<Vec<u8>>,
    offsets: OffsetIndexBuilder,
    rows: u64,
    entries: i64,
    compressed: i64,
    uncompressed: i64,
    /// The page being filled.
    rep: Runs,
    def: Runs,
    values: Vec<u8>,
    page_rows: i64,
    page_entries: u32,
    scratch: Vec<u8>,
    /// The compressed page, when compressed.
    packed: Vec<u8>,
}

impl FloatList {
    /// The chunk of `descr`, packed as `packing` if given, else as its
    /// first page's trial finds best.
    fn new(
        descr: ColumnDescPtr,
        layout: Layout,
        packing: Option<Packing>,
        props: &WriterProperties,
    ) -> Result<Self> {
        let codec = props.compression(descr.path());
        let (packing, zstd) = match codec {
            Codec::UNCOMPRESSED => (Some(layout.asked()), None),
            Codec::ZSTD(level) => {
                let zstd = match packing {
                    Some(packing) => Some(
                        compressor(&descr, packing, level.compression_level()).map_err(external)?,
                    ),
                    None => None,
                };
                (packing, zstd)
            }
            other => {
                return Err(ParquetError::NYI(format!(
                    "{other} for the float list column {}",
                    descr.path()
                )));
            }
        };
        Ok(Self {
            page_limit: props.column_data_page_size_limit(descr.path()).max(1),
            descr,
            layout,
            codec,
            packing,
            zstd,
            out: TrackedWrite::new(Vec::new()),
            offsets: OffsetIndexBuilder::new(),
            rows: 0,
            entries: 0,
            compressed: 0,
            uncompressed: 0,
            rep: Runs::default(),
            def: Runs::default(),
            values: Vec::new(),
            page_rows: 0,
            page_entries: 0,
            scratch: Vec::new(),
            packed: Vec::new(),
        })
    }

    fn write(&mut self, field: &Field, column: &ArrayRef) -> Result<()> {
        let list: &ListArray = column.as_list_opt().ok_or_else(|| {
            ParquetError::General(format!("column {} is not a list", field.name()))
        })?;
        let items = list.values();
        let bytes: &[u8] = match self.layout {
            Layout::Half => items
                .as_primitive_opt::<Float16Type>()
                .map(|v| v.values().inner().as_slice()),
            Layout::Single => items
                .as_primitive_opt::<Float32Type>()
                .map(|v| v.values().inner().as_slice()),
        }
        .ok_or_else(|| {
            ParquetError::General(format!(
                "column {} is not a list of {}",
                field.name(),
                if self.layout == Layout::Half {
                    "float16"
                } else {
                    "float32"
                }
            ))
        })?;
        if list.null_count() > 0 || items.null_count() > 0 {
            return Err(ParquetError::General(format!(
                "column {} holds nulls, its schema none",
                field.name()
            )));
        }
        let width = self.layout.width();
        for window in list.value_offsets().windows(2) {
            let (start, end) = (window[0] as usize, window[1] as usize);
            let len = (end - start) as u64;
            self.rep.push(0, 1);
            if len == 0 {
                self.def.push(0, 1);
            } else {
                self.rep.push(1, len - 1);
                self.def.push(1, len);
                self.values
                    .extend_from_slice(&bytes[start * width..end * width]);
            }
            let entries = len.max(1);
            self.page_entries += entries as u32;
            self.page_rows += 1;
            self.rows += 1;
            if self.values.len() >= self.page_limit {
                self.flush_page()?;
            }
        }
        Ok(())
    }

    /// The page being filled, into `scratch`: repetition levels,
    /// definition levels (each a 4-byte length and RLE runs), then the
    /// values, split into byte streams or PLAIN.
    fn page(&mut self, split: bool) {
        let buf = &mut self.scratch;
        buf.clear();
        for runs in [&mut self.rep, &mut self.def] {
            let levels = runs.finish();
            buf.extend_from_slice(&(levels.len() as u32).to_le_bytes());
            buf.extend_from_slice(levels);
        }
        if split {
            split_streams(&self.values, buf);
        } else {
            buf.extend_from_slice(&self.values);
        }
    }

    /// Packs the chunk's pages as the candidate that compresses the page
    /// being filled into the fewest bytes (the earlier of equals).
    fn choose(&mut self) -> Result<Packing> {
        let Codec::ZSTD(level) = self.codec else {
            return Err(ParquetError::General(format!(
                "no packing to try for {} without zstd",
                self.descr.path()
            )));
        };
        let level = level.compression_level();
        let mut best: Option<(usize, Packing)> = None;
        let mut built = None;
        for packing in self.layout.candidates(level) {
            // Candidates of one layout are adjacent: each page body once.
            if built != Some(packing.split) {
                self.page(packing.split);
                built = Some(packing.split);
            }
            let mut zstd = compressor(&self.descr, packing, level).map_err(external)?;
            let out = &mut self.packed;
            out.clear();
            out.reserve(zstd::zstd_safe::compress_bound(self.scratch.len()));
            zstd.compress_to_buffer(self.scratch.as_slice(), out)
                .map_err(external)?;
            if best.is_none_or(|(size, _)| out.len() < size) {
                best = Some((out.len(), packing));
            }
        }
        let (_, packing) = best.ok_or_else(|| ParquetError::General("no packing to try".into()))?;
        self.zstd = Some(compressor(&self.descr, packing, level).map_err(external)?);
        self.packing = Some(packing);
        Ok(packing)
    }

    /// Writes the page being filled.
    fn flush_page(&mut self) -> Result<()> {
        if self.page_entries == 0 {
            return Ok(());
        }
        let packing = match self.packing {
            Some(packing) => packing,
            None => self.choose()?,
        };
        self.page(packing.split);
        let buf = &mut self.scratch;
        let uncompressed = buf.len();
        // The page's buffer is handed to the page writer and taken back
        // afterwards: no fresh allocation (and no first touch of new
        // memory) per page.
        let compressed = match &mut self.zstd {
            None => false,
            Some(zstd) => {
                let out = &mut self.packed;
                out.clear();
                out.reserve(zstd::zstd_safe::compress_bound(uncompressed));
                zstd.compress_to_buffer(buf.as_slice(), out)
                    .map_err(external)?;
                true
            }
        };
        let owner = if compressed {
            &mut self.packed
        } else {
            &mut self.scratch
        };
        let data = Bytes::from(std::mem::take(owner));
        let keep = data.clone();
        let page = Page::DataPage {
            buf: data,
            num_values: self.page_entries,
            encoding: packing.encoding(),
            def_level_encoding: Encoding::RLE,
            rep_level_encoding: Encoding::RLE,
            statistics: None,
        };
        let spec = SerializedPageWriter::new(&mut self.out)
            .write_page(CompressedPage::new(page, uncompressed))?;
        *owner = keep.try_into_mut().map(Vec::from).unwrap_or_default();
        self.offsets
            .append_offset_and_size(spec.offset as i64, spec.compressed_size as i32);
        self.offsets.append_row_count(self.page_rows);
        self.compressed += spec.compressed_size as i64;
        self.uncompressed += spec.uncompressed_size as i64;
        self.entries += i64::from(self.page_entries);
        self.rep.clear();
        self.def.clear();
        self.values.clear();
        self.page_rows = 0;
        self.page_entries = 0;
        Ok(())
    }

    fn size(&self) -> usize {
        self.out.bytes_written() + self.values.len()
    }

    fn memory(&self) -> usize {
        self.out.bytes_written()
            + self.values.capacity()
            + self.scratch.capacity()
            + self.packed.capacity()
    }

    /// The chunk's bytes, what the row group needs to splice them in, and
    /// how its pages were packed (`None` if it has none).
    fn close(mut self) -> Result<(Bytes, ColumnCloseResult, Option<Packing>)> {
        self.flush_page()?;
        let encoding = self.packing.unwrap_or(self.layout.asked()).encoding();
        let metadata = ColumnChunkMetaData::builder(Arc::clone(&self.descr))
            .set_compression(self.codec)
            .set_encodings(vec![encoding, Encoding::RLE])
            .set_num_values(self.entries)
            .set_total_compressed_size(self.compressed)
            .set_total_uncompressed_size(self.uncompressed)
            .set_data_page_offset(0)
            .build()?;
        let bytes = Bytes::from(self.out.into_inner()?);
        let close = ColumnCloseResult {
            bytes_written: bytes.len() as u64,
            rows_written: self.rows,
            metadata,
            bloom_filter: None,
            column_index: None,
            offset_index: Some(self.offsets.build()),
        };
        Ok((bytes, close, self.packing))
    }
}

fn external(e: std::io::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

/// Appends f32 values (`plain`: four little-endian bytes each) to `out` as
/// BYTE_STREAM_SPLIT lays them out: every value's first byte, then every
/// second byte, and so on.
fn split_streams(plain: &[u8], out: &mut Vec<u8>) {
    let n = plain.len() / 4;
    let at = out.len();
    out.resize(at + 4 * n, 0);
    let (s0, rest) = out[at..].split_at_mut(n);
    let (s1, rest) = rest.split_at_mut(n);
    let (s2, s3) = rest.split_at_mut(n);
    let streams = s0.iter_mut().zip(s1).zip(s2).zip(s3);
    for (value, (((b0, b1), b2), b3)) in plain.chunks_exact(4).zip(streams) {
        *b0 = value[0];
        *b1 = value[1];
        *b2 = value[2];
        *b3 = value[3];
    }
}

/// Levels of bit width 1 as RLE runs of the RLE/bit-packing hybrid: each
/// run is its length shifted left by one (ULEB128), then the value in one
/// byte.
#[derive(Default)]
struct Runs {
    buf: Vec<u8>,
    value: u8,
    count: u64,
}

impl Runs {
    fn push(&mut self, value: u8, count: u64) {
        if count == 0 {
            return;
        }
        if self.count > 0 && value == self.value {
            self.count += count;
        } else {
            self.emit();
            self.value = value;
            self.count = count;
        }
    }

    fn emit(&mut self) {
        if self.count == 0 {
            return;
        }
        let mut header = self.count << 1;
        loop {
            let byte = (header & 0x7f) as u8;
            header >>= 7;
            if header == 0 {
                self.buf.push(byte);
                break;
            }
            self.buf.push(byte | 0x80);
        }
        self.buf.push(self.value);
        self.count = 0;
    }

    fn finish(&mut self) -> &[u8] {
        self.emit();
        &self.buf
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use arrow_array::builder::{Float16Builder, Float32Builder, ListBuilder};
    use arrow_array::{Float16Array, UInt64Array};
    use arrow_schema::Schema;
    use half::f16;
    use parquet::arrow::ArrowWriter;
    use parquet::arrow::arrow_reader::{
        ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
    };
    use parquet::basic::ZstdLevel;
    use parquet::file::metadata::PageIndexPolicy;
    use parquet::schema::types::ColumnPath;
    use proptest::prelude::*;

    fn schema() -> SchemaRef {
        let item = |t| Arc::new(Field::new("item", t, false));
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::UInt64, false),
            Field::new("u", DataType::List(item(DataType::Float16)), false),
            Field::new("w", DataType::List(item(DataType::Float32)), false),
            Field::new("v", DataType::List(item(DataType::Float16)), false),
        ]))
    }

    /// Rows with `lens[i]` half floats in `u`, `lens[i] / 2` in `v` and
    /// `lens[i] % 3` f32 in `w`, values from the row and position.
    fn batch(first: u64, lens: &[usize]) -> RecordBatch {
        let item = |t| Arc::new(Field::new("item", t, false));
        let mut u = ListBuilder::new(Float16Builder::new()).with_field(item(DataType::Float16));
        let mut v = ListBuilder::new(Float16Builder::new()).with_field(item(DataType::Float16));
        let mut w = ListBuilder::new(Float32Builder::new()).with_field(item(DataType::Float32));
        for (r, &len) in lens.iter().enumerate() {
            let x = |j: usize| (first as f32 + r as f32) * 0.37 - j as f32 * 1.5;
            for j in 0..len {
                u.values().append_value(f16::from_f32(x(j)));
            }
            for j in 0..len / 2 {
                v.values().append_value(f16::from_f32(-x(j)));
            }
            for j in 0..len % 3 {
                w.values().append_value(x(j));
            }
            u.append(true);
            v.append(true);
            w.append(true);
        }
        let ids = UInt64Array::from_iter_values(first..first + lens.len() as u64);
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(ids),
                Arc::new(u.finish()),
                Arc::new(w.finish()),
                Arc::new(v.finish()),
            ],
        )
        .unwrap()
    }

    fn props(codec: Codec, page: usize, rows: usize) -> WriterProperties {
        props_w(codec, page, rows, None)
    }

    /// `props`, with `w` (the f32 list) stored as parts store factors when
    /// `w` is given: that encoding and no statistics.
    fn props_w(codec: Codec, page: usize, rows: usize, w: Option<Encoding>) -> WriterProperties {
        let b = WriterProperties::builder()
            .set_compression(codec)
            .set_data_page_size_limit(page)
            .set_max_row_group_row_count(Some(rows))
            .set_dictionary_enabled(false);
        match w {
            None => b,
            Some(encoding) => {
                let path = ColumnPath::new(vec!["w".into(), "list".into(), "item".into()]);
                b.set_column_encoding(path.clone(), encoding)
                    .set_column_statistics_enabled(path, EnabledStatistics::None)
            }
        }
        .build()
    }

    /// Which fields of `schema()` are written in bulk under `props`.
    fn bulk(props: WriterProperties) -> Vec<Option<Layout>> {
        FileWriter::try_new(Vec::new(), schema(), props)
            .unwrap()
            .plans
            .iter()
            .map(|plan| match plan {
                Plan::Arrow(_) => None,
                Plan::Floats(_, layout, _) => Some(*layout),
            })
            .collect()
    }

    /// Half-float lists are written in bulk; f32 lists only when their
    /// properties ask for nothing but BYTE_STREAM_SPLIT values; neither
    /// under a codec other than zstd.
    #[test]
    fn which_lists_are_written_in_bulk() {
        let c = Codec::UNCOMPRESSED;
        let half = Some(Layout::Half);
        assert_eq!(bulk(props(c, 100, 10)), [None, half, None, half]);
        let plain = props_w(c, 100, 10, Some(Encoding::PLAIN));
        assert_eq!(bulk(plain), [None, half, None, half]);
        let split = props_w(c, 100, 10, Some(Encoding::BYTE_STREAM_SPLIT));
        assert_eq!(bulk(split), [None, half, Some(Layout::Single), half]);
        let delta = props_w(c, 100, 10, Some(Encoding::RLE));
        assert_eq!(bulk(delta), [None, half, None, half]);
        // Other codecs: arrow-rs writes every column.
        let snappy = props_w(Codec::SNAPPY, 100, 10, Some(Encoding::BYTE_STREAM_SPLIT));
        assert_eq!(bulk(snappy), [None, None, None, None]);
    }

    fn read(bytes: Bytes, selection: Option<RowSelection>) -> RecordBatch {
        let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required);
        let mut builder =
            ParquetRecordBatchReaderBuilder::try_new_with_options(bytes, options).unwrap();
        if let Some(selection) = selection {
            builder = builder.with_row_selection(selection);
        }
        let batches: Vec<_> = builder.build().unwrap().map(Result::unwrap).collect();
        arrow::compute::concat_batches(&schema(), &batches).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Float lists written in bulk (half floats; f32
        /// BYTE_STREAM_SPLIT) read back (whole, and a row selection through
        /// the offset index) as arrow-rs's own writer's file does, with the
        /// same Parquet schema, whatever the list lengths (empty ones too),
        /// page size, row group size and codec.
        #[test]
        fn float_lists_read_back_as_arrow_rs_writes_them(
            batches in prop::collection::vec(prop::collection::vec(0usize..40, 1..30), 1..6),
            page in 16usize..400,
            rows in 1usize..50,
            zstd in any::<bool>(),
            w in prop::option::of(prop::sample::select(vec![Encoding::PLAIN, Encoding::BYTE_STREAM_SPLIT])),
            skip in 0usize..40,
            take in 1usize..40,
        ) {
            let codec = if zstd { Codec::ZSTD(ZstdLevel::try_new(1).unwrap()) } else { Codec::UNCOMPRESSED };
            let mut first = 0u64;
            let batches: Vec<_> = batches.iter().map(|lens| {
                let b = batch(first, lens);
                first += lens.len() as u64;
                b
            }).collect();
            let mut ours = FileWriter::try_new(Vec::new(), schema(), props_w(codec, page, rows, w)).unwrap();
            let mut theirs = ArrowWriter::try_new(Vec::new(), schema(), Some(props_w(codec, page, rows, w))).unwrap();
            for b in &batches {
                ours.write(b).unwrap();
                theirs.write(b).unwrap();
            }
            let ours = Bytes::from(ours.into_inner().unwrap());
            let theirs = Bytes::from(theirs.into_inner().unwrap());
            let meta = |b: &Bytes| ParquetRecordBatchReaderBuilder::try_new(b.clone()).unwrap().metadata().clone();
            let (m1, m2) = (meta(&ours), meta(&theirs));
            prop_assert_eq!(m1.file_metadata().schema_descr(), m2.file_metadata().schema_descr());
            prop_assert_eq!(m1.num_row_groups(), m2.num_row_groups());
            let mut chosen = None;
            for g in 0..m1.num_row_groups() {
                let encodings = |m: &parquet::file::metadata::ParquetMetaData| {
                    m.row_group(g).column(2).encodings().collect::<Vec<_>>()
                };
                let (e1, e2) = (encodings(&m1), encodings(&m2));
                let split = |e: &[Encoding]| e.contains(&Encoding::BYTE_STREAM_SPLIT);
                // arrow-rs stores `w` as `props_w` says; so do we without
                // compression, and with zstd PLAIN where the trial finds
                // it smaller, the same in every row group of the file.
                prop_assert_eq!(split(&e2), w == Some(Encoding::BYTE_STREAM_SPLIT));
                if zstd {
                    prop_assert!(!split(&e1) || split(&e2));
                    prop_assert_eq!(chosen.get_or_insert_with(|| e1.clone()), &e1);
                } else {
                    prop_assert_eq!(split(&e1), split(&e2));
                }
            }
            let expected = read(theirs.clone(), None);
            prop_assert_eq!(&read(ours.clone(), None), &expected);
            let n = first as usize;
            let skip = skip.min(n - 1);
            let take = take.min(n - skip);
            let selection = RowSelection::from(vec![
                RowSelector::skip(skip),
                RowSelector::select(take),
                RowSelector::skip(n - skip - take),
            ]);
            prop_assert_eq!(read(ours, Some(selection)), expected.slice(skip, take));
        }
    }

    /// One f32 list column `u` of 512 rows of 256 values, whose row `r`
    /// holds `value(r, j)`.
    fn inputs(mut value: impl FnMut(usize, usize) -> f32) -> RecordBatch {
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let schema = Arc::new(Schema::new(vec![Field::new(
            "u",
            DataType::List(Arc::clone(&item)),
            false,
        )]));
        let mut u = ListBuilder::new(Float32Builder::new()).with_field(item);
        for r in 0..512 {
            for j in 0..256 {
                u.values().append_value(value(r, j));
            }
            u.append(true);
        }
        RecordBatch::try_new(schema, vec![Arc::new(u.finish())]).unwrap()
    }

    /// Input-like values: the outputs of a ReLU, half of them zero.
    fn relu_outputs() -> RecordBatch {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        inputs(|_, _| {
            let (a, b): (f32, f32) = (rng.random(), rng.random());
            (a + b - 1.0).max(0.0) * 3.0
        })
    }

    /// Unfolded patches: every row 16 shifted copies of 16 of the values
    /// of one random image row, as a convolution's inputs repeat.
    fn unfolded_patches() -> RecordBatch {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let image: Vec<f32> = (0..512 + 32).map(|_| rng.random()).collect();
        inputs(|r, j| image[r + j / 16 + j % 16])
    }

    /// How parts store f32 factors: zstd 1, byte-stream-split asked, no
    /// dictionary or statistics.
    fn factor_props() -> WriterProperties {
        let path = ColumnPath::new(vec!["u".into(), "list".into(), "item".into()]);
        WriterProperties::builder()
            .set_compression(Codec::ZSTD(ZstdLevel::try_new(1).unwrap()))
            .set_dictionary_enabled(false)
            .set_column_encoding(path.clone(), Encoding::BYTE_STREAM_SPLIT)
            .set_column_statistics_enabled(path, EnabledStatistics::None)
            .build()
    }

    /// `batch` written by [`FileWriter`] (packed as `packing` if given):
    /// the column chunk's compressed bytes and the packing it used.
    fn packed(batch: &RecordBatch, packing: Option<Packing>) -> (i64, Packing, Bytes) {
        let mut w = FileWriter::try_new(Vec::new(), batch.schema(), factor_props()).unwrap();
        if let Plan::Floats(_, _, p) = &mut w.plans[0] {
            *p = packing;
        }
        w.write(batch).unwrap();
        w.flush().unwrap();
        let Plan::Floats(_, _, Some(used)) = w.plans[0] else {
            panic!("u is not written in bulk");
        };
        let bytes = Bytes::from(w.into_inner().unwrap());
        let meta = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
            .unwrap()
            .metadata()
            .clone();
        (meta.row_group(0).column(0).compressed_size(), used, bytes)
    }

    /// The trial packs a column as the smallest of its candidates, and
    /// which that is depends on the values: ReLU outputs barely repeat,
    /// and the skipping search wins; unfolded patches repeat, and zstd's
    /// own search wins. Both read back equal.
    #[test]
    fn the_trial_packs_a_column_as_its_smallest_candidate() {
        let mut fast = Vec::new();
        for batch in [relu_outputs(), unfolded_patches()] {
            let (size, chosen, bytes) = packed(&batch, None);
            let sizes: Vec<(i64, Packing)> = Layout::Single
                .candidates(1)
                .into_iter()
                .map(|p| (packed(&batch, Some(p)).0, p))
                .collect();
            assert_eq!(sizes.len(), 4);
            let smallest = sizes.iter().map(|&(s, _)| s).min().unwrap();
            assert_eq!(size, smallest, "{chosen:?} among {sizes:?}");
            assert!(
                sizes.contains(&(size, chosen)),
                "{chosen:?} among {sizes:?}"
            );
            let read = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .unwrap()
                .build()
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>();
            assert_eq!(
                arrow::compute::concat_batches(&batch.schema(), &read).unwrap(),
                batch
            );
            fast.push(chosen.fast);
        }
        assert_eq!(fast, [true, false]);
    }

    /// The pages of f32 inputs `u` (zstd level 1) take fewer bytes than
    /// arrow-rs's, whose pages zstd compresses with the level's own
    /// settings and byte-stream-split as the properties ask. The values
    /// read back equal.
    #[test]
    fn factor_pages_are_smaller_than_arrow_rs_writes_them() {
        let batch = relu_outputs();
        let schema = batch.schema();
        let mut ours =
            FileWriter::try_new(Vec::new(), Arc::clone(&schema), factor_props()).unwrap();
        assert!(matches!(
            ours.plans[0],
            Plan::Floats(_, Layout::Single, None)
        ));
        let mut theirs =
            ArrowWriter::try_new(Vec::new(), Arc::clone(&schema), Some(factor_props())).unwrap();
        ours.write(&batch).unwrap();
        theirs.write(&batch).unwrap();
        let ours = Bytes::from(ours.into_inner().unwrap());
        let theirs = Bytes::from(theirs.into_inner().unwrap());
        let sizes = |b: &Bytes| {
            let meta = ParquetRecordBatchReaderBuilder::try_new(b.clone())
                .unwrap()
                .metadata()
                .clone();
            let c = meta.row_group(0).column(0);
            (c.compressed_size(), c.uncompressed_size())
        };
        let ((ours_c, ours_u), (theirs_c, theirs_u)) = (sizes(&ours), sizes(&theirs));
        // The same values; the levels' runs and page cuts differ a little.
        assert!(
            (ours_u - theirs_u).abs() * 100 < theirs_u,
            "{ours_u} and {theirs_u} bytes before compression"
        );
        assert!(
            (ours_c as f64) < 0.99 * theirs_c as f64,
            "{ours_c} bytes against arrow-rs's {theirs_c}"
        );
        let read_all = |b: Bytes| {
            let reader = ParquetRecordBatchReaderBuilder::try_new(b)
                .unwrap()
                .build()
                .unwrap();
            let batches: Vec<_> = reader.map(Result::unwrap).collect();
            arrow::compute::concat_batches(&schema, &batches).unwrap()
        };
        assert_eq!(read_all(ours), batch);
    }

    #[test]
    fn half_list_pages_are_cut_at_the_page_limit() {
        let lens = vec![100; 50];
        let mut w = FileWriter::try_new(
            Vec::new(),
            schema(),
            props(Codec::UNCOMPRESSED, 1000, 1_000_000),
        )
        .unwrap();
        w.write(&batch(0, &lens)).unwrap();
        let bytes = Bytes::from(w.into_inner().unwrap());
        let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required);
        let builder =
            ParquetRecordBatchReaderBuilder::try_new_with_options(bytes.clone(), options).unwrap();
        let offsets = builder.metadata().offset_index().unwrap();
        // 200 bytes of `u` per row: a page every 5 rows.
        let u = &offsets[0][1];
        let firsts: Vec<i64> = u
            .page_locations()
            .iter()
            .map(|p| p.first_row_index)
            .collect();
        assert_eq!(firsts, (0..10).map(|i| i * 5).collect::<Vec<_>>());
        let values = read(bytes, None);
        let u = values.column(1).as_list::<i32>().value(7);
        let row7: &Float16Array = u.as_primitive::<Float16Type>();
        assert_eq!(row7.value(3), f16::from_f32(7.0 * 0.37 - 3.0 * 1.5));
    }
}
