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
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{DataFrame, SessionContext};
use datafusion::sql::parser::{DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{
    ObjectName, Statement as SqlStatement, TableFactor, Visit, Visitor,
};
use parquet::arrow::ArrowWriter;
use std::fmt;
use std::io::Write;
use std::ops::ControlFlow;
use std::str::FromStr;

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
    let batches = df.collect().await.map_err(Error::sql)?;
    Ok((schema, batches))
}

/// Writes query results in `format` to `out`.
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
    let schema = &batches
        .first()
        .map_or_else(|| schema.clone(), RecordBatch::schema);
    let fail = |e: &dyn fmt::Display| Error::Output {
        format: format.name(),
        message: one_line(&e.to_string()),
    };
    let io = |e: std::io::Error| Error::io("<output>", e);
    match format {
        Format::Table => {
            let text = if batches.iter().all(|b| b.num_rows() == 0) {
                // The pretty printer prints nothing for no rows: show the header.
                let empty = RecordBatch::new_empty(schema.clone());
                arrow::util::pretty::pretty_format_batches(&[empty])
            } else {
                arrow::util::pretty::pretty_format_batches(batches)
            }
            .map_err(|e| fail(&e))?;
            writeln!(out, "{text}").map_err(io)?;
        }
        Format::Csv => {
            let empty = [RecordBatch::new_empty(schema.clone())];
            let all = if batches.is_empty() {
                &empty[..]
            } else {
                batches
            };
            for (i, b) in all.iter().enumerate() {
                let mut buf = Vec::new();
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(i == 0)
                    .build(&mut buf);
                w.write(b).map_err(|e| fail(&e))?;
                drop(w);
                out.write_all(&buf).map_err(io)?;
            }
        }
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(Vec::new());
            for b in batches {
                w.write(b).map_err(|e| fail(&e))?;
                out.write_all(w.get_ref()).map_err(io)?;
                w.get_mut().clear();
            }
            w.finish().map_err(|e| fail(&e))?;
            out.write_all(w.get_ref()).map_err(io)?;
            writeln!(out).map_err(io)?;
        }
        Format::Parquet => {
            let mut buf = Vec::new();
            let mut w =
                ArrowWriter::try_new(&mut buf, schema.clone(), None).map_err(|e| fail(&e))?;
            for b in batches {
                w.write(b).map_err(|e| fail(&e))?;
            }
            w.close().map_err(|e| fail(&e))?;
            out.write_all(&buf).map_err(io)?;
        }
    }
    out.flush().map_err(io)
}
