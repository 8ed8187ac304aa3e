//! Export of one table of a run to Parquet, CSV or JSON Lines.
//!
//! [`export`] reads a table through the run's DataFusion session (the
//! committed files only, `layer` as a column of partitioned tables),
//! optionally filtered by a predicate and narrowed to some columns, and
//! streams its record batches into the writer: memory stays bounded by a
//! batch (and, for Parquet, a row group) whatever the table's size. The
//! output is written to a temporary file `.<name>.tmp` next to it and renamed
//! when complete, so a failed export leaves nothing behind.
//!
//! The predicate (`--where`) is a DataFusion SQL expression over the table's
//! columns only: it must be boolean, and may not contain subqueries,
//! aggregate or window functions, or placeholders.
//!
//! Formats:
//! - **Parquet**: zstd-compressed, the table's Arrow types (lists stay lists);
//!   key/value metadata `reptrace.export.run_id`, `reptrace.export.table`,
//!   `reptrace.export.where`.
//! - **CSV**: a header row; NULL is an empty field. List-valued columns
//!   (`u`, `v`, `a`, `p`) are written as JSON array text, e.g.
//!   `"[0.1,-2.5e-7]"`, each value in the shortest form that reads back to
//!   the same value of its own type (f16 and f32 values as such, not widened);
//!   a non-finite value is written `null`, as JSON has no NaN.
//! - **JSON Lines**: one JSON object per line, every column present (NULL as
//!   `null`), lists as JSON arrays (non-finite values as `null`).
//!
//! ```no_run
//! # fn example() -> reptrace_analyze::Result<()> {
//! use reptrace_analyze::export::{self, Format, Options};
//! use reptrace_format::Table;
//! let options = Options {
//!     filter: Some("probe_id = 3 AND layer = 'fc2'".into()),
//!     columns: vec!["instance_id".into(), "dot".into()],
//!     ..Options::new(Table::Contributions, Format::Csv)
//! };
//! let summary = export::export(
//!     std::path::Path::new("runs/digits"),
//!     &options,
//!     std::path::Path::new("probe3.csv"),
//!     &mut |_| {},
//! )?;
//! println!("{} rows", summary.rows);
//! # Ok(()) }
//! ```
use crate::computed::ComputeOptions;
use crate::error::one_line;
use crate::limits::{Limits, SpillCleanup};
use crate::run::Run;
use crate::session::context_limited;
use crate::{Error, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type,
};
use arrow_array::{Array, ArrayRef, GenericListArray, OffsetSizeTrait, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use datafusion::common::tree_node::TreeNode;
use datafusion::logical_expr::{Expr, ExprSchemable};
use datafusion::prelude::DataFrame;
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, Query as SqlQuery, Value as SqlValue, Visit, Visitor,
};
use futures::StreamExt;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use reptrace_format::{Table, layout};
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rows per Parquet row group of an export (bounded memory while writing).
const ROW_GROUP_ROWS: usize = 64 * 1024;
/// Bytes per Parquet row group at most (wide `updates` rows).
const ROW_GROUP_BYTES: usize = 64 * 1024 * 1024;

/// Output format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Parquet, zstd-compressed.
    Parquet,
    /// CSV with a header row; lists as JSON array text.
    Csv,
    /// JSON Lines: one object per row, lists as arrays.
    Jsonl,
}

impl Format {
    /// The format's name as given on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
        }
    }
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "parquet" => Ok(Format::Parquet),
            "csv" => Ok(Format::Csv),
            "jsonl" => Ok(Format::Jsonl),
            _ => Err(Error::BadOption {
                option: "format",
                value: s.to_owned(),
                why: "expected parquet, csv or jsonl".into(),
            }),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to export.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// The table.
    pub table: Table,
    /// A boolean SQL expression over the table's columns; `None`: every row.
    pub filter: Option<String>,
    /// The columns, in this order; empty: every column (with `layer` last
    /// for partitioned tables).
    pub columns: Vec<String>,
    /// The output format.
    pub format: Format,
    /// Replace the output file if it exists.
    pub overwrite: bool,
    /// How the computed `contributions` table works.
    pub compute: ComputeOptions,
    /// The query's memory limit and spill directory.
    pub limits: Limits,
}

impl Options {
    /// Every row and column of `table` in `format`, not overwriting.
    pub fn new(table: Table, format: Format) -> Self {
        Self {
            table,
            filter: None,
            columns: Vec::new(),
            format,
            overwrite: false,
            compute: ComputeOptions::default(),
            limits: Limits::default(),
        }
    }
}

/// Progress of an export, reported after each record batch written.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Rows written so far.
    pub rows: u64,
    /// Rows of the whole table (before the filter), from the manifest.
    pub table_rows: u64,
    /// Time since the export started.
    pub elapsed: Duration,
}

impl Progress {
    /// Rows written per second so far.
    pub fn rows_per_sec(&self) -> f64 {
        crate::attribution::per_second(self.rows, self.elapsed)
    }
}

/// The result of an export.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The file written.
    pub path: PathBuf,
    /// Rows written.
    pub rows: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// The columns written, in order.
    pub columns: Vec<String>,
}

/// Exports a table of the run at `run` to `out` (see the module docs).
///
/// Runs its own query runtime: from async code call [`export_async`].
pub fn export(
    run: &Path,
    options: &Options,
    out: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary> {
    let run = Run::open(run)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("starting the query runtime: {e}")))?;
    let result = rt
        .block_on(export_async(&run, options, out, progress))
        .map_err(|e| run.explain(e));
    // An interrupted query may leave blocking work behind: do not wait for it.
    rt.shutdown_background();
    result
}

/// Exports a table of an opened run to `out` (see the module docs).
pub async fn export_async(
    run: &Run,
    options: &Options,
    out: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary> {
    let out = check_output(run, out, options.overwrite)?;
    let ctx = context_limited(run, &options.compute, &options.limits)?;
    let _cleanup = SpillCleanup::new(ctx.runtime_env());
    let table = options.table;
    let mut df = ctx.table(table.name()).await.map_err(Error::sql)?;
    if let Some(text) = &options.filter {
        let expr = predicate(&df, table, text)?;
        df = df.filter(expr).map_err(Error::sql)?;
    }
    if !options.columns.is_empty() {
        check_columns(&df, table, &options.columns)?;
        let names: Vec<&str> = options.columns.iter().map(String::as_str).collect();
        df = df.select_columns(&names).map_err(Error::sql)?;
    }
    let table_rows = run.manifest().files(table).iter().map(|f| f.rows).sum();
    let tmp = layout::temp_path(&out);
    let result = crate::interrupt::or_interrupted(write_stream(
        run, options, df, &tmp, table_rows, progress,
    ))
    .await
    .map_err(|e| e.with_memory_limit(options.limits.memory));
    let written = result.and_then(|(rows, columns)| {
        std::fs::rename(&tmp, &out).map_err(|e| Error::io(&out, e))?;
        let bytes = std::fs::metadata(&out)
            .map_err(|e| Error::io(&out, e))?
            .len();
        Ok(Summary {
            path: out.clone(),
            rows,
            bytes,
            columns,
        })
    });
    if written.is_err() {
        // Best effort: the temporary file may not exist (an early error).
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Parses and checks a filter: a boolean DataFusion SQL expression over the
/// columns of `df` (the table `table`) only.
pub fn predicate(df: &DataFrame, table: Table, text: &str) -> Result<Expr> {
    let schema = df.schema();
    let columns = || {
        schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let bad = |why: String| Error::BadOption {
        option: "where",
        value: text.to_owned(),
        why: format!(
            "{why} (expected a boolean expression over the columns of {table}: {})",
            columns()
        ),
    };
    if text.trim().is_empty() {
        return Err(bad("empty predicate".into()));
    }
    let state = df.clone().into_parts().0;
    let dialect = state.config().options().sql_parser.dialect;
    let parsed = state
        .sql_to_expr_with_alias(text, &dialect)
        .map_err(|e| bad(one_line(&e.to_string())))?;
    if let Some(alias) = &parsed.alias {
        return Err(bad(format!("an alias ({alias}) is not allowed")));
    }
    if let ControlFlow::Break(why) = parsed.expr.visit(&mut PredicateGuard) {
        return Err(bad(why));
    }
    let expr = state
        .create_logical_expr_from_sql_expr(parsed, schema)
        .map_err(|e| bad(one_line(&e.to_string())))?;
    let aggregate = expr
        .exists(|e| {
            Ok(matches!(
                e,
                Expr::AggregateFunction(_) | Expr::WindowFunction(_)
            ))
        })
        .map_err(Error::sql)?;
    if aggregate {
        return Err(bad("aggregate and window functions are not allowed".into()));
    }
    let ty = expr
        .get_type(schema)
        .map_err(|e| bad(one_line(&e.to_string())))?;
    if ty != DataType::Boolean {
        return Err(bad(format!("it is of type {ty}, not boolean")));
    }
    Ok(expr)
}

/// Refuses subqueries and placeholders in a predicate.
struct PredicateGuard;

impl Visitor for PredicateGuard {
    type Break = String;

    fn pre_visit_query(&mut self, _query: &SqlQuery) -> ControlFlow<String> {
        ControlFlow::Break("subqueries are not allowed".into())
    }

    fn pre_visit_expr(&mut self, expr: &SqlExpr) -> ControlFlow<String> {
        match expr {
            SqlExpr::Value(v) if matches!(v.value, SqlValue::Placeholder(_)) => {
                ControlFlow::Break(format!("placeholder {} is not allowed", v.value))
            }
            _ => ControlFlow::Continue(()),
        }
    }
}

fn check_columns(df: &DataFrame, table: Table, columns: &[String]) -> Result<()> {
    let schema = df.schema();
    let known: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    for (i, c) in columns.iter().enumerate() {
        if !known.contains(&c.as_str()) {
            return Err(Error::BadOption {
                option: "columns",
                value: c.clone(),
                why: format!(
                    "table {table} has no such column (columns: {})",
                    known.join(", ")
                ),
            });
        }
        if columns[..i].contains(c) {
            return Err(Error::BadOption {
                option: "columns",
                value: c.clone(),
                why: "column given twice".into(),
            });
        }
    }
    Ok(())
}

/// The absolute output path, after checking that it is writable here: not
/// inside the run, not an existing file unless `overwrite`, its directory
/// created if needed.
fn check_output(run: &Run, out: &Path, overwrite: bool) -> Result<PathBuf> {
    let bad = |why: &str| Error::BadOption {
        option: "out",
        value: out.display().to_string(),
        why: why.to_owned(),
    };
    let name = out.file_name().ok_or_else(|| bad("not a file name"))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let parent = std::fs::canonicalize(&parent).map_err(|e| Error::io(&parent, e))?;
    if parent.starts_with(run.dir()) {
        return Err(bad(&format!(
            "inside the run directory {}: export elsewhere so that the trace stays intact",
            run.dir().display()
        )));
    }
    let path = parent.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => Err(bad("is a directory")),
        Ok(_) if !overwrite => Err(bad("exists (pass --force to replace it)")),
        _ => Ok(path),
    }
}

/// Writes the query's stream to `tmp`: rows written and the column names.
async fn write_stream(
    run: &Run,
    options: &Options,
    df: DataFrame,
    tmp: &Path,
    table_rows: u64,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(u64, Vec<String>)> {
    let started = Instant::now();
    let mut stream = crate::sql::execute(df).await?;
    let schema = stream.schema();
    let columns = schema.fields().iter().map(|f| f.name().clone()).collect();
    let file = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    let mut writer = Writer::new(run, options, schema, BufWriter::new(file), tmp)?;
    let mut rows = 0u64;
    progress(&Progress {
        rows,
        table_rows,
        elapsed: started.elapsed(),
    });
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(Error::sql)?;
        writer.write(&batch)?;
        rows += batch.num_rows() as u64;
        progress(&Progress {
            rows,
            table_rows,
            elapsed: started.elapsed(),
        });
    }
    writer.finish()?;
    Ok((rows, columns))
}

/// One of the three output writers, over a buffered temporary file.
enum Writer<'a> {
    Parquet(ArrowWriter<BufWriter<File>>, &'a Path),
    Csv(arrow::csv::Writer<BufWriter<File>>, SchemaRef, &'a Path),
    Jsonl(arrow::json::LineDelimitedWriter<BufWriter<File>>, &'a Path),
}

impl<'a> Writer<'a> {
    fn new(
        run: &Run,
        options: &Options,
        schema: SchemaRef,
        file: BufWriter<File>,
        path: &'a Path,
    ) -> Result<Self> {
        match options.format {
            Format::Parquet => {
                let mut kv = vec![
                    KeyValue::new(
                        "reptrace.export.run_id".into(),
                        run.manifest().run_id.clone(),
                    ),
                    KeyValue::new(
                        "reptrace.export.table".into(),
                        options.table.name().to_owned(),
                    ),
                ];
                if let Some(w) = &options.filter {
                    kv.push(KeyValue::new("reptrace.export.where".into(), w.clone()));
                }
                let mut props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default()))
                    .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
                    .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
                    .set_key_value_metadata(Some(kv));
                if let Ok(level) = ZstdLevel::try_new(3) {
                    props = props.set_compression(Compression::ZSTD(level));
                }
                let w = ArrowWriter::try_new(file, schema, Some(props.build()))
                    .map_err(|e| Error::parquet(path, e))?;
                Ok(Writer::Parquet(w, path))
            }
            Format::Csv => {
                let csv_schema = csv_schema(&schema);
                let w = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(file);
                Ok(Writer::Csv(w, csv_schema, path))
            }
            Format::Jsonl => {
                let w = arrow::json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow::json::writer::LineDelimited>(file);
                Ok(Writer::Jsonl(w, path))
            }
        }
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        match self {
            Writer::Parquet(w, path) => w.write(batch).map_err(|e| Error::parquet(*path, e)),
            Writer::Csv(w, schema, path) => {
                let batch = csv_batch(batch, schema, path)?;
                w.write(&batch).map_err(|e| output(Format::Csv, path, &e))
            }
            Writer::Jsonl(w, path) => w.write(batch).map_err(|e| output(Format::Jsonl, path, &e)),
        }
    }

    fn finish(self) -> Result<()> {
        let (mut file, path) = match self {
            Writer::Parquet(w, path) => {
                (w.into_inner().map_err(|e| Error::parquet(path, e))?, path)
            }
            Writer::Csv(w, _, path) => (w.into_inner(), path),
            Writer::Jsonl(mut w, path) => {
                w.finish().map_err(|e| output(Format::Jsonl, path, &e))?;
                (w.into_inner(), path)
            }
        };
        file.flush().map_err(|e| Error::io(path, e))?;
        file.get_ref().sync_all().map_err(|e| Error::io(path, e))
    }
}

fn output(format: Format, path: &Path, e: &dyn fmt::Display) -> Error {
    Error::Output {
        format: format.name(),
        message: one_line(&format!("{}: {e}", path.display())),
    }
}

/// The schema of a batch as written to CSV: list columns become Utf8.
fn csv_schema(schema: &Schema) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::List(_) | DataType::LargeList(_) => {
                Field::new(f.name(), DataType::Utf8, f.is_nullable())
            }
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// A batch with its list columns replaced by their JSON array text.
fn csv_batch(batch: &RecordBatch, schema: &SchemaRef, path: &Path) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .zip(batch.schema().fields())
        .map(|(array, field)| match array.data_type() {
            DataType::List(_) => list_json(array.as_list::<i32>(), field.name(), path),
            DataType::LargeList(_) => list_json(array.as_list::<i64>(), field.name(), path),
            _ => Ok(Arc::clone(array)),
        })
        .collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new(Arc::clone(schema), columns).map_err(|e| Error::Column {
        path: path.to_path_buf(),
        column: "*".into(),
        message: one_line(&e.to_string()),
    })
}

/// Each list as JSON array text (`[1.5,-2e-7]`); a NULL list stays NULL.
pub fn list_json<O: OffsetSizeTrait>(
    list: &GenericListArray<O>,
    column: &str,
    path: &Path,
) -> Result<ArrayRef> {
    let values = list.values();
    let mut text = String::new();
    let mut out: Vec<Option<String>> = Vec::with_capacity(list.len());
    for i in 0..list.len() {
        if list.is_null(i) {
            out.push(None);
            continue;
        }
        let offsets = list.value_offsets();
        let (start, end) = (offsets[i].as_usize(), offsets[i + 1].as_usize());
        text.clear();
        text.push('[');
        for j in start..end {
            if j > start {
                text.push(',');
            }
            push_json_value(&mut text, values.as_ref(), j).map_err(|ty| Error::Column {
                path: path.to_path_buf(),
                column: column.to_owned(),
                message: format!("a list of {ty} cannot be written to CSV"),
            })?;
        }
        text.push(']');
        out.push(Some(text.clone()));
    }
    Ok(Arc::new(StringArray::from(out)))
}

/// Appends element `j` of `values` as a JSON value; the type's name if it is
/// not a number.
fn push_json_value(text: &mut String, values: &dyn Array, j: usize) -> Result<(), DataType> {
    if values.is_null(j) {
        text.push_str("null");
        return Ok(());
    }
    // Debug of a float is the shortest text that parses back to the same
    // value of its type, with an exponent for very small or large values:
    // valid JSON numbers (1.0, 2.5e-8) except for non-finite values.
    fn float(text: &mut String, x: impl fmt::Debug, finite: bool) {
        if finite {
            let _ = write!(text, "{x:?}");
        } else {
            text.push_str("null");
        }
    }
    match values.data_type() {
        DataType::Float16 => {
            let x = values.as_primitive::<Float16Type>().value(j);
            float(text, x.to_f32(), x.is_finite());
        }
        DataType::Float32 => {
            let x = values.as_primitive::<Float32Type>().value(j);
            float(text, x, x.is_finite());
        }
        DataType::Float64 => {
            let x = values.as_primitive::<Float64Type>().value(j);
            float(text, x, x.is_finite());
        }
        DataType::Int8 => push_int(text, values.as_primitive::<Int8Type>().value(j)),
        DataType::Int16 => push_int(text, values.as_primitive::<Int16Type>().value(j)),
        DataType::Int32 => push_int(text, values.as_primitive::<Int32Type>().value(j)),
        DataType::Int64 => push_int(text, values.as_primitive::<Int64Type>().value(j)),
        other => return Err(other.clone()),
    }
    Ok(())
}

fn push_int(text: &mut String, x: impl fmt::Display) {
    let _ = write!(text, "{x}");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use arrow_array::builder::{Float32Builder, ListBuilder};

    #[test]
    fn lists_become_json_arrays_that_read_back_exactly() {
        let values = [0.1f32, -2.5e-7, 1.0, 3.4028235e38, f32::MIN_POSITIVE];
        let mut b = ListBuilder::new(Float32Builder::new());
        b.values().append_slice(&values);
        b.append(true);
        b.append(false);
        b.values().append_value(f32::NAN);
        b.append(true);
        b.append(true); // empty list
        let list = b.finish();
        let text = list_json(&list, "u", Path::new("x.csv")).unwrap();
        let text = text.as_string::<i32>();
        assert!(text.is_null(1));
        assert_eq!(text.value(2), "[null]");
        assert_eq!(text.value(3), "[]");
        let parsed: Vec<f64> = serde_json::from_str(text.value(0)).unwrap();
        let back: Vec<f32> = parsed.iter().map(|&x| x as f32).collect();
        assert_eq!(back, values);
        assert!(text.value(0).starts_with("[0.1,-2.5e-7,1.0,"));
    }

    /// An empty `contributions` table with its SQL schema (`layer` included).
    async fn contributions() -> DataFrame {
        let mut fields: Vec<Field> =
            reptrace_format::schema(Table::Contributions, reptrace_format::Dtype::F32)
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
        fields.push(Field::new("layer", DataType::Utf8, false));
        let schema = Arc::new(Schema::new(fields));
        let ctx = datafusion::prelude::SessionContext::new();
        let table = datafusion::datasource::MemTable::try_new(schema, vec![vec![]]).unwrap();
        ctx.register_table("contributions", Arc::new(table))
            .unwrap();
        ctx.table("contributions").await.unwrap()
    }

    #[tokio::test]
    async fn predicates_must_be_boolean_expressions_over_the_table() {
        let df = contributions().await;
        for ok in [
            "probe_id = 3 AND layer = 'fc2'",
            "instance_id IS NULL OR abs(cosine) > 0.5",
            "step BETWEEN 1 AND 10",
        ] {
            predicate(&df, Table::Contributions, ok).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("dot +", "dot +"),
            ("dot * 2", "not boolean"),
            ("nosuch > 1", "nosuch"),
            ("probe_id IN (SELECT probe_id FROM probes)", "subqueries"),
            ("EXISTS (SELECT 1)", "subqueries"),
            ("SUM(dot) > 0", "aggregate"),
            ("dot > $1", "placeholder"),
            ("dot > 0 AS x", "alias"),
            ("dot > 0; DROP TABLE probes", "where"),
        ] {
            let e = predicate(&df, Table::Contributions, bad)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("invalid where"), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
            assert!(e.contains("columns of contributions"), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn unknown_and_repeated_columns_are_named() {
        let df = contributions().await;
        check_columns(&df, Table::Contributions, &["dot".into(), "layer".into()]).unwrap();
        let e = check_columns(&df, Table::Contributions, &["nope".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nope") && e.contains("contributions") && e.contains("cosine"),
            "{e}"
        );
        let e = check_columns(&df, Table::Contributions, &["dot".into(), "dot".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn formats_parse_and_name_themselves() {
        for f in [Format::Parquet, Format::Csv, Format::Jsonl] {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
        }
        let e = "xlsx".parse::<Format>().unwrap_err().to_string();
        assert!(
            e.contains("xlsx") && e.contains("parquet, csv or jsonl"),
            "{e}"
        );
    }
}
