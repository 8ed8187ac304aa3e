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
//! (types `int64`, `float64`, `string`). The SQL refers to a parameter as
//! the named placeholder `$probe`; values are bound with DataFusion's
//! `with_param_values`, never spliced into the text. The files are plain
//! portable SQL (CTEs, window functions, CASE) so that DuckDB and Spark run
//! them unchanged once their own placeholder syntax is substituted.
use crate::sql;
use crate::{Error, Result};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use datafusion::common::ParamValues;
use datafusion::common::ScalarValue;
use datafusion::prelude::SessionContext;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

/// The queries shipped in `queries/`: name and text.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "top_proponents",
        include_str!("../../../queries/top_proponents.sql"),
    ),
    (
        "top_opponents",
        include_str!("../../../queries/top_opponents.sql"),
    ),
    (
        "class_shares",
        include_str!("../../../queries/class_shares.sql"),
    ),
    (
        "class_shares_by_epoch",
        include_str!("../../../queries/class_shares_by_epoch.sql"),
    ),
    (
        "cosine_histogram",
        include_str!("../../../queries/cosine_histogram.sql"),
    ),
    (
        "self_influence",
        include_str!("../../../queries/self_influence.sql"),
    ),
    (
        "layer_summary",
        include_str!("../../../queries/layer_summary.sql"),
    ),
];

/// The type of a query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    Int64,
    Float64,
    String,
}

impl ParamType {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "int64" => Some(ParamType::Int64),
            "float64" => Some(ParamType::Float64),
            "string" => Some(ParamType::String),
            _ => None,
        }
    }

    /// Parses a value of this type.
    pub fn value(self, raw: &str) -> Option<ScalarValue> {
        match self {
            ParamType::Int64 => raw.trim().parse::<i64>().ok().map(ScalarValue::from),
            ParamType::Float64 => raw
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .map(ScalarValue::from),
            ParamType::String => Some(ScalarValue::from(raw)),
        }
    }
}

impl fmt::Display for ParamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParamType::Int64 => "int64",
            ParamType::Float64 => "float64",
            ParamType::String => "string",
        })
    }
}

/// A declared parameter of a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub ty: ParamType,
    /// The default value as written in the header; `None`: required.
    pub default: Option<String>,
    pub doc: String,
}

/// A query: its SQL and declared parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub name: String,
    /// The first comment line.
    pub title: String,
    pub params: Vec<Param>,
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
        let bad = |message: String| Error::Query {
            name: name.to_owned(),
            message,
        };
        let mut title = String::new();
        let mut params: Vec<Param> = Vec::new();
        for line in text.lines() {
            let Some(comment) = line.trim_start().strip_prefix("--") else {
                if line.trim().is_empty() {
                    continue;
                }
                break;
            };
            let comment = comment.trim();
            if let Some(decl) = comment.strip_prefix("param:") {
                let p = parse_param(decl.trim()).ok_or_else(|| {
                    bad(format!(
                        "bad parameter declaration {comment:?} (expected `param: NAME (TYPE[, default VALUE]) doc`)"
                    ))
                })?;
                if let Some(d) = &p.default
                    && p.ty.value(d).is_none()
                {
                    return Err(bad(format!(
                        "parameter {}: default {d:?} is not a valid {}",
                        p.name, p.ty
                    )));
                }
                if params.iter().any(|q| q.name == p.name) {
                    return Err(bad(format!("parameter {} declared twice", p.name)));
                }
                params.push(p);
            } else if title.is_empty() {
                title = comment.to_owned();
            }
        }
        Ok(Query {
            name: name.to_owned(),
            title,
            params,
            sql: text.to_owned(),
        })
    }

    /// Binds raw `name=value` pairs: every name must be declared, every
    /// required parameter given, every value valid for its type.
    pub fn bind(&self, given: &[(&str, &str)]) -> Result<HashMap<String, ScalarValue>> {
        let names = || {
            if self.params.is_empty() {
                "this query has none".to_owned()
            } else {
                let v: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
                format!("parameters of {}: {}", self.name, v.join(", "))
            }
        };
        let mut values = HashMap::new();
        for (name, raw) in given {
            let p = self
                .params
                .iter()
                .find(|p| p.name == *name)
                .ok_or_else(|| Error::Param {
                    name: (*name).to_owned(),
                    message: format!("unknown ({})", names()),
                })?;
            let v = p.ty.value(raw).ok_or_else(|| Error::Param {
                name: p.name.clone(),
                message: format!("invalid value {raw:?}: expected {}", p.ty),
            })?;
            if values.insert(p.name.clone(), v).is_some() {
                return Err(Error::Param {
                    name: p.name.clone(),
                    message: "given twice".into(),
                });
            }
        }
        for p in &self.params {
            if values.contains_key(&p.name) {
                continue;
            }
            match &p.default {
                Some(d) => {
                    let v = p.ty.value(d).ok_or_else(|| Error::Param {
                        name: p.name.clone(),
                        message: format!("invalid default {d:?}"),
                    })?;
                    values.insert(p.name.clone(), v);
                }
                None => {
                    return Err(Error::Param {
                        name: p.name.clone(),
                        message: format!(
                            "missing ({}: {}); pass --param {}=VALUE",
                            p.ty, p.doc, p.name
                        ),
                    });
                }
            }
        }
        Ok(values)
    }

    /// Runs the query on `ctx` with `given` parameters.
    pub async fn run(
        &self,
        ctx: &SessionContext,
        given: &[(&str, &str)],
    ) -> Result<(SchemaRef, Vec<RecordBatch>)> {
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
        let df = if values.is_empty() {
            df
        } else {
            df.with_param_values(ParamValues::from(values))
                .map_err(Error::sql)?
        };
        sql::collect(df).await
    }
}

/// `NAME (TYPE[, default VALUE]) doc`.
fn parse_param(decl: &str) -> Option<Param> {
    let (name, rest) = decl.split_once('(')?;
    let name = name.trim();
    let (inside, doc) = rest.split_once(')')?;
    let (ty, default) = match inside.split_once(',') {
        Some((ty, d)) => {
            let d = d.trim().strip_prefix("default")?.trim();
            (ty.trim(), Some(d.trim_matches('\'').to_owned()))
        }
        None => (inside.trim(), None),
    };
    let valid = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid.then_some(Param {
        name: name.to_owned(),
        ty: ParamType::parse(ty)?,
        default,
        doc: doc.trim().to_owned(),
    })
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
