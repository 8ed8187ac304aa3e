//! Canned queries: the SQL files of `queries/` (embedded in the binary) or
//! any `.sql` file, with parameters bound as values.
//!
//! A query file starts with comment lines; the first is its title, and each
//! parameter is declared as
//!
//! ```text
//! -- param: probe (int64) the probe id
//! -- param: k (int64, default 10) instances per layer
//! ```
//!
//! (types `int64`, `float64`, `string`; parsed by [`reptrace_format::params`]).
//! The SQL refers to a parameter as the named placeholder `$probe`; values
//! are bound with DataFusion's `with_param_values`, never spliced into the
//! text. The files are plain
//! portable SQL (CTEs, window functions, CASE) so that DuckDB and Spark run
//! them unchanged once their own placeholder syntax is substituted.
use crate::sql;
use crate::{Error, Result};
use arrow::array::{Array, AsArray};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use datafusion::common::ParamValues;
use datafusion::common::ScalarValue;
use datafusion::prelude::{DataFrame, SessionContext};
use reptrace_format::params::{self, Header, ParamError};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

pub use reptrace_format::params::{Param, ParamType, ParamValue};

/// The queries shipped in `queries/`: name and text.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "top_proponents",
        include_str!("../queries/top_proponents.sql"),
    ),
    (
        "top_opponents",
        include_str!("../queries/top_opponents.sql"),
    ),
    ("class_shares", include_str!("../queries/class_shares.sql")),
    (
        "class_shares_by_epoch",
        include_str!("../queries/class_shares_by_epoch.sql"),
    ),
    (
        "cosine_histogram",
        include_str!("../queries/cosine_histogram.sql"),
    ),
    (
        "self_influence",
        include_str!("../queries/self_influence.sql"),
    ),
    (
        "layer_summary",
        include_str!("../queries/layer_summary.sql"),
    ),
    ("top_steps", include_str!("../queries/top_steps.sql")),
    (
        "batch_member_influence",
        include_str!("../queries/batch_member_influence.sql"),
    ),
    (
        "mislabel_candidates",
        include_str!("../queries/mislabel_candidates.sql"),
    ),
    (
        "tracin_self_influence",
        include_str!("../queries/tracin_self_influence.sql"),
    ),
    (
        "forgetting_events",
        include_str!("../queries/forgetting_events.sql"),
    ),
    ("data_map", include_str!("../queries/data_map.sql")),
];

/// A query: its SQL and declared parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// The built-in name (`top_proponents`, …) or the path given.
    pub name: String,
    /// The first comment line.
    pub title: String,
    /// The parameters its `-- param:` header lines declare.
    pub params: Vec<Param>,
    /// The whole text of the query file, header included; parameters are
    /// `$name` placeholders.
    pub sql: String,
}

impl Query {
    /// A built-in query by name, or a `.sql` file by path.
    pub fn resolve(name_or_path: &str) -> Result<Query> {
        if let Some((name, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Query::parse(name, text);
        }
        let path = Path::new(name_or_path);
        if name_or_path.ends_with(".sql") || path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            return Query::parse(name_or_path, &text);
        }
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        Err(Error::Query {
            name: name_or_path.to_owned(),
            message: format!(
                "no such query (built-in: {}; or give a path to a .sql file)",
                names.join(", ")
            ),
        })
    }

    /// Every built-in query.
    pub fn builtins() -> Result<Vec<Query>> {
        BUILTIN.iter().map(|(n, t)| Query::parse(n, t)).collect()
    }

    /// Parses a query file's header and keeps its text.
    pub fn parse(name: &str, text: &str) -> Result<Query> {
        let header = Header::parse(text).map_err(|e| param_error(name, e))?;
        Ok(Query {
            name: name.to_owned(),
            title: header.title,
            params: header.params,
            sql: text.to_owned(),
        })
    }

    /// Binds raw `name=value` pairs: every name must be declared, every
    /// required parameter given, every value valid for its type.
    pub fn bind(&self, given: &[(&str, &str)]) -> Result<HashMap<String, ScalarValue>> {
        let values = params::bind(&self.name, &self.params, given)
            .map_err(|e| param_error(&self.name, e))?;
        Ok(values
            .into_iter()
            .map(|(name, v)| (name, scalar(v)))
            .collect())
    }

    /// Runs the query on `ctx` with `given` parameters.
    pub async fn run(
        &self,
        ctx: &SessionContext,
        given: &[(&str, &str)],
    ) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        sql::collect(self.plan(ctx, given).await?).await
    }

    /// Plans the query on `ctx` with `given` parameters bound (run it with
    /// [`sql::collect`] or [`sql::stream`]).
    pub async fn plan(&self, ctx: &SessionContext, given: &[(&str, &str)]) -> Result<DataFrame> {
        let values = self.bind(given)?;
        let df = sql::plan(ctx, &self.sql).await?;
        // Placeholders must all be declared: a typo would otherwise surface
        // as an obscure planning error.
        let used: BTreeSet<String> = df
            .logical_plan()
            .get_parameter_names()
            .map_err(crate::Error::sql)?
            .into_iter()
            .map(|n| n.trim_start_matches('$').to_owned())
            .collect();
        for name in &used {
            if !values.contains_key(name) {
                return Err(Error::Query {
                    name: self.name.clone(),
                    message: format!("the SQL uses ${name}, which its header does not declare"),
                });
            }
        }
        let values: HashMap<String, ScalarValue> = values
            .into_iter()
            .filter(|(k, _)| used.contains(k))
            .collect();
        if let Some(ScalarValue::Int64(Some(probe))) = values.get("probe") {
            check_probe(ctx, *probe).await?;
        }
        if values.is_empty() {
            Ok(df)
        } else {
            df.with_param_values(ParamValues::from(values))
                .map_err(Error::sql)
        }
    }
}

/// An error naming the run's probe ids when `probe` is not one of them (a
/// query about it would print an empty table).
async fn check_probe(ctx: &SessionContext, probe: i64) -> Result<()> {
    let text = format!(
        "SELECT COUNT(DISTINCT probe_id), MIN(probe_id), MAX(probe_id), \
         SUM(CASE WHEN probe_id = {probe} THEN 1 ELSE 0 END) FROM probes"
    );
    let (_, batches) = sql::collect(sql::plan(ctx, &text).await?).await?;
    let cell = |i: usize| -> Option<i64> {
        let b = batches.first()?;
        let c = arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Int64).ok()?;
        let c = c.as_primitive_opt::<arrow::datatypes::Int64Type>()?;
        (!c.is_empty() && c.is_valid(0)).then(|| c.value(0))
    };
    if cell(3).unwrap_or(0) > 0 {
        return Ok(());
    }
    let known = match (cell(0), cell(1), cell(2)) {
        (Some(n), Some(lo), Some(hi)) if n > 0 => format!("its {n} probes have ids {lo} to {hi}"),
        _ => "it has no probes".to_owned(),
    };
    Err(Error::Param {
        name: "probe".into(),
        message: format!(
            "{probe} is not a probe of this run ({known}); add a new input with `reptrace probe add`"
        ),
    })
}

/// The analyzer's error for a header or binding error of query `query`.
fn param_error(query: &str, e: ParamError) -> Error {
    match e {
        ParamError::Header { message } => Error::Query {
            name: query.to_owned(),
            message,
        },
        ParamError::Param { name, message } => Error::Param { name, message },
    }
}

/// The DataFusion scalar of a parameter value.
fn scalar(v: ParamValue) -> ScalarValue {
    match v {
        ParamValue::Int64(i) => ScalarValue::from(i),
        ParamValue::Float64(x) => ScalarValue::from(x),
        ParamValue::String(s) => ScalarValue::from(s),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn header() {
        let q = Query::parse(
            "t",
            "-- Title here\n-- param: probe (int64) the probe\n-- param: k (int64, default 10) how many\nSELECT 1",
        )
        .unwrap();
        assert_eq!(q.title, "Title here");
        assert_eq!(q.params.len(), 2);
        assert_eq!(q.params[1].default.as_deref(), Some("10"));
        let v = q.bind(&[("probe", "3")]).unwrap();
        assert_eq!(v["probe"], ScalarValue::from(3i64));
        assert_eq!(v["k"], ScalarValue::from(10i64));
        let e = q.bind(&[]).unwrap_err().to_string();
        assert!(e.contains("parameter probe: missing"), "{e}");
        let e = q.bind(&[("probe", "x")]).unwrap_err().to_string();
        assert!(e.contains("parameter probe: invalid value \"x\""), "{e}");
        let e = q
            .bind(&[("probe", "1"), ("kk", "1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("parameter kk: unknown"), "{e}");
    }

    #[test]
    fn builtins_parse() {
        let qs = Query::builtins().unwrap();
        assert_eq!(qs.len(), BUILTIN.len());
        for q in qs {
            assert!(!q.title.is_empty(), "{}", q.name);
        }
    }
}
