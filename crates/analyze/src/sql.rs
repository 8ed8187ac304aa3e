//! Read-only SQL over a run, and the output formats of query results.
//!
//! A statement must be a single query (`SELECT …`, `WITH …`, or `EXPLAIN`
//! of one). It is refused, with one line saying why, when it is DDL, DML,
//! `COPY`, a session statement (`SET`, …), or when it reads anything but the
//! run's registered tables: a table function (`read_parquet(…)`,
//! `generate_series(…)`) or a file path used as a table name
//! (`'x.parquet'`). The parsed plan is then checked again with DataFusion's
//! [`SQLOptions`] (no DDL, no DML, no statements).
use crate::error::one_line;
use crate::{Error, Result};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use arrow_schema::{ArrowError, Schema};
use datafusion::execution::context::SQLOptions;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use datafusion::prelude::{DataFrame, SessionContext};
use datafusion::sql::parser::{DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{
    ObjectName, Statement as SqlStatement, TableFactor, Visit, Visitor,
};
use futures::StreamExt;
use parquet::arrow::ArrowWriter;
use std::fmt;
use std::io::Write;
use std::ops::ControlFlow;
use std::str::FromStr;
use std::sync::Arc;

/// Output format of query results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// An aligned text table (Arrow's pretty printer).
    #[default]
    Table,
    /// CSV with a header row.
    Csv,
    /// A JSON array of objects, one per row.
    Json,
    /// A Parquet file (binary: write it to a file).
    Parquet,
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            "parquet" => Ok(Format::Parquet),
            _ => Err(Error::BadOption {
                option: "format",
                value: s.to_owned(),
                why: "expected table, csv, json or parquet".into(),
            }),
        }
    }
}

impl Format {
    /// The format's name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Table => "table",
            Format::Csv => "csv",
            Format::Json => "json",
            Format::Parquet => "parquet",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The only SQL options queries run with: no DDL, no DML, no statements.
pub fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

const TABLES: &str = "instances, steps, updates, probes, contributions";

/// Refuses table functions and anything that is not a plain table name.
struct Guard;

impl Visitor for Guard {
    type Break = String;

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<String> {
        match factor {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            } => ControlFlow::Break(format!(
                "table function {name}(…) is not allowed: only the run's tables ({TABLES}) can be read"
            )),
            TableFactor::Table { name, .. } => check_table_name(name),
            TableFactor::TableFunction { .. } | TableFactor::Function { .. } => {
                ControlFlow::Break(format!(
                    "table functions are not allowed: only the run's tables ({TABLES}) can be read"
                ))
            }
            _ => ControlFlow::Continue(()),
        }
    }
}

fn check_table_name(name: &ObjectName) -> ControlFlow<String> {
    let parts: Vec<_> = name.0.iter().map(|p| p.as_ident()).collect();
    let file_like = |s: &str| {
        s.contains(['/', '\\', '.', ':', '*', '?'])
            || [".parquet", ".csv", ".json", ".avro", ".arrow"]
                .iter()
                .any(|ext| s.to_ascii_lowercase().ends_with(ext))
    };
    match parts.as_slice() {
        [Some(ident)] if !file_like(&ident.value) => ControlFlow::Continue(()),
        [Some(ident)] => ControlFlow::Break(format!(
            "reading files through SQL is not allowed ({:?}): query the run's tables ({TABLES})",
            ident.value
        )),
        _ => ControlFlow::Break(format!(
            "{name}: only the run's tables ({TABLES}) and names defined in WITH can be read"
        )),
    }
}

/// Checks that `sql` is one read-only query over the run's tables.
pub fn check(sql: &str) -> Result<()> {
    let statements = DFParser::parse_sql(sql).map_err(Error::sql)?;
    if statements.len() != 1 {
        return Err(Error::Refused(format!(
            "expected one statement, found {}",
            statements.len()
        )));
    }
    statements.iter().try_for_each(check_statement)
}

fn check_statement(statement: &DFStatement) -> Result<()> {
    match statement {
        DFStatement::Statement(s) => match s.as_ref() {
            SqlStatement::Query(q) => match q.visit(&mut Guard) {
                ControlFlow::Break(why) => Err(Error::Refused(why)),
                ControlFlow::Continue(()) => Ok(()),
            },
            other => {
                let text = other.to_string();
                let kind = text.split_whitespace().next().unwrap_or("this statement");
                Err(Error::Refused(format!(
                    "{} statements are not allowed: only read-only queries (SELECT, WITH) are",
                    kind.to_ascii_uppercase()
                )))
            }
        },
        DFStatement::CopyTo(_) => Err(Error::Refused(
            "COPY is not allowed: the SQL interface is read-only (write results with --format and --out)"
                .into(),
        )),
        DFStatement::CreateExternalTable(_) => Err(Error::Refused(
            "CREATE EXTERNAL TABLE is not allowed: the SQL interface reads the run's tables only"
                .into(),
        )),
        DFStatement::Explain(e) => check_statement(&e.statement),
        DFStatement::Reset(_) => Err(Error::Refused(
            "RESET statements are not allowed: only read-only queries (SELECT, WITH) are".into(),
        )),
    }
}

/// Plans a read-only query (see [`check`]); parameters are bound afterwards
/// with [`DataFrame::with_param_values`].
pub async fn plan(ctx: &SessionContext, sql: &str) -> Result<DataFrame> {
    check(sql)?;
    ctx.sql_with_options(sql, read_only())
        .await
        .map_err(Error::sql)
}

/// Runs a read-only query and collects its result.
pub async fn run(ctx: &SessionContext, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    collect(plan(ctx, sql).await?).await
}

/// Runs a planned query: its output schema and batches.
pub async fn collect(df: DataFrame) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let schema: SchemaRef = std::sync::Arc::new(df.schema().as_arrow().clone());
    let (plan, task) = physical(df).await?;
    let batches = datafusion::physical_plan::collect(plan, task)
        .await
        .map_err(Error::sql)?;
    Ok((schema, batches))
}

/// Starts a planned query: its result as one stream (what
/// [`DataFrame::execute_stream`] does, with the sort reservation of
/// [`physical`]).
pub async fn execute(df: DataFrame) -> Result<SendableRecordBatchStream> {
    let (plan, task) = physical(df).await?;
    datafusion::physical_plan::execute_stream(plan, task).map_err(Error::sql)
}

/// Plans `df` for execution. The session's `sort_spill_reservation_bytes`
/// (what [`crate::limits::Limits::sort_spill_reservation`] set aside for
/// sorting when sorts spill) is shared among the plan's sorts rather than
/// taken by each: every sort reserves its part when its first batch
/// arrives and holds it until it emits, so a plan of several sorts (window
/// functions per partition, a CTE read twice) would otherwise reserve the
/// whole amount several times over and fail instead of spilling.
pub async fn physical(df: DataFrame) -> Result<(Arc<dyn ExecutionPlan>, Arc<TaskContext>)> {
    let task = df.task_ctx();
    let plan = df.create_physical_plan().await.map_err(Error::sql)?;
    let mut config = task.session_config().clone();
    let total = config.options().execution.sort_spill_reservation_bytes;
    let each = total / sorters(&plan).max(1);
    config.options_mut().execution.sort_spill_reservation_bytes = each.max(MIN_SORT_RESERVATION);
    Ok((plan, Arc::new(task.with_session_config(config))))
}

/// The least a sort reserves for sorting what it holds when it spills (small:
/// a plan may run a sort per partition of several window functions, and all
/// of them together must stay well inside the smallest limit of 16 MiB).
const MIN_SORT_RESERVATION: usize = 64 << 10;

/// How many external sorts `plan` runs at once at most: one per partition of
/// each full sort (a sort with a row limit keeps only its top rows and
/// reserves nothing).
pub fn sorters(plan: &Arc<dyn ExecutionPlan>) -> usize {
    let own = plan
        .downcast_ref::<SortExec>()
        .filter(|s| s.fetch().is_none())
        .map_or(0, |s| {
            if s.preserve_partitioning() {
                s.input().output_partitioning().partition_count()
            } else {
                1
            }
        });
    own + plan.children().into_iter().map(sorters).sum::<usize>()
}

/// Writes query results in `format` to `out` (all at once; [`Output`]
/// writes them as they come).
///
/// Each batch is encoded into memory and then written, so an I/O error on
/// `out` (a closed pipe) keeps its [`std::io::Error`] as the error's source.
pub fn write(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    format: Format,
    out: &mut dyn Write,
) -> Result<()> {
    // The batches' own schema where there are any (nullability may differ from the plan's).
    let schema = batches
        .first()
        .map_or_else(|| schema.clone(), RecordBatch::schema);
    let mut output = Output::new(schema, format)?;
    for b in batches {
        output.write(b, out)?;
    }
    output.finish(out)
}

/// Runs a planned query and writes its result to `out` batch by batch, so
/// that a result larger than memory streams through (a sort that spilled
/// included). Stops with [`Error::Interrupted`] when the process is
/// interrupted ([`crate::interrupt`]). Returns the rows written.
pub async fn stream(df: DataFrame, format: Format, out: &mut dyn Write) -> Result<u64> {
    crate::interrupt::or_interrupted(async {
        let planned: SchemaRef = std::sync::Arc::new(df.schema().as_arrow().clone());
        let mut stream = execute(df).await?;
        let mut output: Option<Output> = None;
        let mut rows = 0u64;
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(Error::sql)?;
            let o = match &mut output {
                Some(o) => o,
                // The first batch's own schema (nullability may differ from the plan's).
                None => output.insert(Output::new(batch.schema(), format)?),
            };
            o.write(&batch, out)?;
            rows += batch.num_rows() as u64;
        }
        let output = match output {
            Some(o) => o,
            None => Output::new(planned, format)?,
        };
        output.finish(out)?;
        Ok(rows)
    })
    .await
}

/// Rows the table format holds before it prints: the column widths are
/// those of these rows (all of them for a smaller result); wider values
/// after them widen their own line only.
pub const TABLE_ROWS_MEASURED: usize = 10_000;

/// Writes a query result in one [`Format`] as its batches arrive.
pub struct Output {
    schema: SchemaRef,
    format: Format,
    state: State,
}

enum State {
    /// Rows held to measure the columns, and the widths once printing began.
    Table {
        held: Vec<Vec<String>>,
        widths: Option<Vec<usize>>,
    },
    Csv {
        header: bool,
    },
    Json(arrow::json::ArrayWriter<Vec<u8>>),
    Parquet(Box<ArrowWriter<Vec<u8>>>),
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Output")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl Output {
    /// An output of rows of `schema` in `format`.
    pub fn new(schema: SchemaRef, format: Format) -> Result<Self> {
        let state = match format {
            Format::Table => State::Table {
                held: Vec::new(),
                widths: None,
            },
            Format::Csv => State::Csv { header: true },
            Format::Json => State::Json(arrow::json::ArrayWriter::new(Vec::new())),
            Format::Parquet => {
                let props = parquet::file::properties::WriterProperties::builder()
                    .set_max_row_group_row_count(Some(PARQUET_ROW_GROUP_ROWS))
                    .build();
                let w = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))
                    .map_err(|e| fail(format, &e))?;
                State::Parquet(Box::new(w))
            }
        };
        Ok(Self {
            schema,
            format,
            state,
        })
    }

    /// Writes one batch (the table format may hold it until it has measured
    /// [`TABLE_ROWS_MEASURED`] rows).
    pub fn write(&mut self, batch: &RecordBatch, out: &mut dyn Write) -> Result<()> {
        let format = self.format;
        match &mut self.state {
            State::Table { held, widths } => {
                let rows = table_cells(batch).map_err(|e| fail(format, &e))?;
                match widths {
                    Some(w) => write_rows(out, w, &rows)?,
                    None => {
                        held.extend(rows);
                        if held.len() >= TABLE_ROWS_MEASURED {
                            let w = table_start(out, &self.schema, held)?;
                            write_rows(out, &w, held)?;
                            held.clear();
                            *widths = Some(w);
                        }
                    }
                }
            }
            State::Csv { header } => {
                let mut buf = Vec::new();
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(*header)
                    .build(&mut buf);
                w.write(batch).map_err(|e| fail(format, &e))?;
                drop(w);
                *header = false;
                out.write_all(&buf).map_err(io)?;
            }
            State::Json(w) => {
                w.write(batch).map_err(|e| fail(format, &e))?;
                out.write_all(w.get_ref()).map_err(io)?;
                w.get_mut().clear();
            }
            State::Parquet(w) => {
                w.write(batch).map_err(|e| fail(format, &e))?;
                // Finished row groups go out as they are encoded.
                out.write_all(w.inner_mut()).map_err(io)?;
                w.inner_mut().clear();
            }
        }
        Ok(())
    }

    /// Writes what is still held and the format's end, then flushes `out`.
    pub fn finish(self, out: &mut dyn Write) -> Result<()> {
        let format = self.format;
        match self.state {
            State::Table { held, widths } => {
                let w = match widths {
                    Some(w) => w,
                    None => {
                        let w = table_start(out, &self.schema, &held)?;
                        write_rows(out, &w, &held)?;
                        w
                    }
                };
                writeln!(out, "{}", rule(&w)).map_err(io)?;
            }
            State::Csv { header } => {
                if header {
                    // No rows: the header alone.
                    let empty = RecordBatch::new_empty(self.schema.clone());
                    let mut buf = Vec::new();
                    let mut w = arrow::csv::WriterBuilder::new()
                        .with_header(true)
                        .build(&mut buf);
                    w.write(&empty).map_err(|e| fail(format, &e))?;
                    drop(w);
                    out.write_all(&buf).map_err(io)?;
                }
            }
            State::Json(mut w) => {
                w.finish().map_err(|e| fail(format, &e))?;
                out.write_all(w.get_ref()).map_err(io)?;
                writeln!(out).map_err(io)?;
            }
            State::Parquet(w) => {
                let bytes = w.into_inner().map_err(|e| fail(format, &e))?;
                out.write_all(&bytes).map_err(io)?;
            }
        }
        out.flush().map_err(io)
    }
}

/// Rows per row group of `--format parquet`, so that the writer holds
/// little of a large result.
const PARQUET_ROW_GROUP_ROWS: usize = 128 * 1024;

fn fail(format: Format, e: &dyn fmt::Display) -> Error {
    Error::Output {
        format: format.name(),
        message: one_line(&e.to_string()),
    }
}

fn io(e: std::io::Error) -> Error {
    Error::io("<output>", e)
}

/// A batch's values as text, as Arrow's pretty printer shows them.
fn table_cells(batch: &RecordBatch) -> std::result::Result<Vec<Vec<String>>, ArrowError> {
    let options = FormatOptions::default().with_display_error(true);
    let formatters = batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((0..batch.num_rows())
        .map(|row| {
            formatters
                .iter()
                .map(|f| f.value(row).to_string())
                .collect()
        })
        .collect())
}

/// Prints the table's top rule and header; returns the column widths (of
/// the names and of `rows`).
fn table_start(out: &mut dyn Write, schema: &Schema, rows: &[Vec<String>]) -> Result<Vec<usize>> {
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let mut widths: Vec<usize> = names.iter().map(|n| width(n)).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(cell));
        }
    }
    writeln!(out, "{}", rule(&widths)).map_err(io)?;
    write_rows(out, &widths, std::slice::from_ref(&names))?;
    writeln!(out, "{}", rule(&widths)).map_err(io)?;
    Ok(widths)
}

/// The width of a cell: its widest line.
fn width(s: &str) -> usize {
    s.lines().map(|l| l.chars().count()).max().unwrap_or(0)
}

/// `+------+----+`
fn rule(widths: &[usize]) -> String {
    let mut line = String::from("+");
    for w in widths {
        line.push_str(&"-".repeat(w + 2));
        line.push('+');
    }
    line
}

/// `| a    | bb |` per row; a cell of several lines (an EXPLAIN plan) makes
/// its row as many lines high.
fn write_rows(out: &mut dyn Write, widths: &[usize], rows: &[Vec<String>]) -> Result<()> {
    let mut text = String::new();
    for row in rows {
        let lines: Vec<Vec<&str>> = row.iter().map(|c| c.lines().collect()).collect();
        let height = lines.iter().map(Vec::len).max().unwrap_or(0).max(1);
        for i in 0..height {
            text.push('|');
            for (w, cell) in widths.iter().zip(&lines) {
                let line = cell.get(i).copied().unwrap_or("");
                text.push(' ');
                text.push_str(line);
                text.push_str(&" ".repeat(w.saturating_sub(line.chars().count()) + 1));
                text.push('|');
            }
            text.push('\n');
        }
    }
    out.write_all(text.as_bytes()).map_err(io)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use arrow_array::{Float64Array, Int64Array, StringArray};
    use std::sync::Arc;

    fn batch(n: usize) -> RecordBatch {
        let ids: Vec<i64> = (0..n as i64).map(|i| i * 7919 % 1000).collect();
        let dots: Vec<Option<f64>> = (0..n)
            .map(|i| (i % 5 != 0).then_some(i as f64 / 3.0))
            .collect();
        let names: Vec<String> = (0..n)
            .map(|i| match i % 17 {
                3 => "two\nlines".to_owned(),
                4 => "three\nshort\nlines, the last one wider".to_owned(),
                _ => "x".repeat(i % 13),
            })
            .collect();
        RecordBatch::try_from_iter([
            ("probe_id", Arc::new(Int64Array::from(ids)) as _),
            ("dot", Arc::new(Float64Array::from(dots)) as _),
            ("name", Arc::new(StringArray::from(names)) as _),
        ])
        .unwrap()
    }

    fn text(batches: &[RecordBatch], format: Format) -> String {
        let mut out = Vec::new();
        write(&batches[0].schema(), batches, format, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_table_format_prints_what_arrows_pretty_printer_prints() {
        for batches in [vec![batch(40)], vec![batch(3), batch(0), batch(11)]] {
            let ours = text(&batches, Format::Table);
            let arrow = arrow::util::pretty::pretty_format_batches(&batches)
                .unwrap()
                .to_string();
            assert_eq!(ours, format!("{arrow}\n"));
        }
        let empty = RecordBatch::new_empty(batch(1).schema());
        let ours = text(std::slice::from_ref(&empty), Format::Table);
        let arrow = arrow::util::pretty::pretty_format_batches(&[empty]).unwrap();
        assert_eq!(ours, format!("{arrow}\n"));
    }

    #[test]
    fn a_long_table_is_printed_as_it_streams() {
        let batches: Vec<RecordBatch> = (0..30).map(|_| batch(1000)).collect();
        let ours = text(&batches, Format::Table);
        let lines: Vec<&str> = ours.lines().collect();
        // Rule, header, rule, 30 000 rows (two and three lines high for
        // every 17th and 17th + 1), rule.
        let extra: usize = (0..1000)
            .map(|i| match i % 17 {
                3 => 1,
                4 => 2,
                _ => 0,
            })
            .sum();
        assert_eq!(lines.len(), 30_004 + 30 * extra);
        let widths: Vec<usize> = lines[0].split('+').map(str::len).collect();
        for line in &lines[3..lines.len() - 1] {
            let cells: Vec<usize> = line.split('|').map(str::len).collect();
            assert_eq!(cells, widths, "{line}");
        }
        let first = lines[3];
        let arrow = arrow::util::pretty::pretty_format_batches(&batches[..1])
            .unwrap()
            .to_string();
        assert_eq!(first, arrow.lines().nth(3).unwrap());
    }

    #[test]
    fn streamed_csv_json_and_parquet_hold_every_row() {
        let batches = vec![batch(5), batch(0), batch(7)];
        let csv = text(&batches, Format::Csv);
        assert!(csv.starts_with("probe_id,dot,name\n"));
        // Nullable: the reader takes an empty name for a null.
        let nullable = Schema::new(
            batches[0]
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        );
        let read: usize = arrow::csv::ReaderBuilder::new(Arc::new(nullable))
            .with_header(true)
            .build(std::io::Cursor::new(csv.as_bytes()))
            .unwrap()
            .map(|b| b.unwrap().num_rows())
            .sum();
        assert_eq!(read, 12);
        let json: serde_json::Value = serde_json::from_str(&text(&batches, Format::Json)).unwrap();
        assert_eq!(json.as_array().unwrap().len(), 12);
        let mut bytes = Vec::new();
        write(&batches[0].schema(), &batches, Format::Parquet, &mut bytes).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let back: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        let all = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
        let read = arrow::compute::concat_batches(&back[0].schema(), &back).unwrap();
        assert_eq!(all, read);
        let empty = text(&[RecordBatch::new_empty(batch(1).schema())], Format::Csv);
        assert_eq!(empty, "probe_id,dot,name\n");
    }
}
