//! Parameters of canned queries: the `-- param:` header lines of a query
//! file and the binding of raw `name=value` strings to typed values.
//!
//! A query file starts with comment lines; the first is its title, and each
//! parameter is declared as
//!
//! ```text
//! -- param: probe (int64) the probe id
//! -- param: k (int64, default 10) instances per layer
//! ```
//!
//! (types `int64`, `float64`, `string`). The header ends at the first line
//! that is neither a comment nor blank. This module is pure parsing; the
//! analyzer turns a [`ParamValue`] into a DataFusion scalar.
//!
//! ```
//! use reptrace_format::params::{Header, ParamValue};
//! let header = Header::parse("-- Top k\n-- param: k (int64, default 10) how many\nSELECT $k").unwrap();
//! assert_eq!(header.title, "Top k");
//! let values = header.bind("top", &[("k", "3")]).unwrap();
//! assert_eq!(values["k"], ParamValue::Int64(3));
//! ```
use std::collections::HashMap;
use std::fmt;

/// Result with [`ParamError`].
pub type Result<T, E = ParamError> = std::result::Result<T, E>;

/// What can go wrong reading a query header or binding its parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    /// The header is malformed (a bad declaration or default, a name declared
    /// twice); raised by [`Header::parse`].
    #[error("{message}")]
    Header {
        /// What is wrong, quoting the offending declaration.
        message: String,
    },
    /// A given parameter is unknown, given twice, missing or has a bad value;
    /// raised by [`bind`].
    #[error("parameter {name}: {message}")]
    Param {
        /// The parameter's name.
        name: String,
        /// What is wrong (for an unknown name, the declared ones).
        message: String,
    },
}

/// The type of a query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// `int64`: a signed 64-bit integer.
    Int64,
    /// `float64`: a finite double.
    Float64,
    /// `string`: any text, taken as given.
    String,
}

impl ParamType {
    /// The type named `int64`, `float64` or `string`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "int64" => Some(ParamType::Int64),
            "float64" => Some(ParamType::Float64),
            "string" => Some(ParamType::String),
            _ => None,
        }
    }

    /// Parses a value of this type: integers and finite floats with
    /// surrounding blanks trimmed, strings as given.
    pub fn value(self, raw: &str) -> Option<ParamValue> {
        match self {
            ParamType::Int64 => raw.trim().parse::<i64>().ok().map(ParamValue::Int64),
            ParamType::Float64 => raw
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .map(ParamValue::Float64),
            ParamType::String => Some(ParamValue::String(raw.to_owned())),
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

/// A typed parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// A value of an `int64` parameter.
    Int64(i64),
    /// A value of a `float64` parameter (finite).
    Float64(f64),
    /// A value of a `string` parameter.
    String(String),
}

/// A declared parameter of a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// The name, bound in the query as `$name`.
    pub name: String,
    /// The declared type (`int64`, `float64`, `string`).
    pub ty: ParamType,
    /// The default value as written in the header; `None`: required.
    pub default: Option<String>,
    /// The text after the parenthesis, describing the parameter.
    pub doc: String,
}

/// The header of a query file: its title and declared parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Header {
    /// The first comment line that is not a declaration.
    pub title: String,
    /// The `-- param:` declarations, in the order written.
    pub params: Vec<Param>,
}

impl Header {
    /// Parses the leading comment lines of a query text.
    pub fn parse(text: &str) -> Result<Header> {
        let bad = |message: String| ParamError::Header { message };
        let mut header = Header::default();
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
                if header.params.iter().any(|q| q.name == p.name) {
                    return Err(bad(format!("parameter {} declared twice", p.name)));
                }
                header.params.push(p);
            } else if header.title.is_empty() {
                header.title = comment.to_owned();
            }
        }
        Ok(header)
    }

    /// Binds raw `name=value` pairs to this header's parameters (see [`bind`]).
    pub fn bind(&self, query: &str, given: &[(&str, &str)]) -> Result<HashMap<String, ParamValue>> {
        bind(query, &self.params, given)
    }
}

/// Binds raw `name=value` pairs to the parameters `params` of the query
/// named `query`: every name must be declared, every required parameter
/// given, every value valid for its type; defaults fill the rest.
pub fn bind(
    query: &str,
    params: &[Param],
    given: &[(&str, &str)],
) -> Result<HashMap<String, ParamValue>> {
    let names = || {
        if params.is_empty() {
            "this query has none".to_owned()
        } else {
            let v: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
            format!("parameters of {query}: {}", v.join(", "))
        }
    };
    let err = |name: &str, message: String| ParamError::Param {
        name: name.to_owned(),
        message,
    };
    let mut values = HashMap::new();
    for (name, raw) in given {
        let p = params
            .iter()
            .find(|p| p.name == *name)
            .ok_or_else(|| err(name, format!("unknown ({})", names())))?;
        let v =
            p.ty.value(raw)
                .ok_or_else(|| err(&p.name, format!("invalid value {raw:?}: expected {}", p.ty)))?;
        if values.insert(p.name.clone(), v).is_some() {
            return Err(err(&p.name, "given twice".into()));
        }
    }
    for p in params {
        if values.contains_key(&p.name) {
            continue;
        }
        match &p.default {
            Some(d) => {
                let v =
                    p.ty.value(d)
                        .ok_or_else(|| err(&p.name, format!("invalid default {d:?}")))?;
                values.insert(p.name.clone(), v);
            }
            None => {
                return Err(err(
                    &p.name,
                    format!(
                        "missing ({}: {}); pass --param {}=VALUE",
                        p.ty, p.doc, p.name
                    ),
                ));
            }
        }
    }
    Ok(values)
}

/// Parses the declaration after `param:`, `NAME (TYPE[, default VALUE]) doc`;
/// `None` when it is malformed.
pub fn parse_param(decl: &str) -> Option<Param> {
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
    fn header_and_bind() {
        let h = Header::parse(
            "-- Title here\n-- param: probe (int64) the probe\n-- param: k (int64, default 10) how many\nSELECT 1",
        )
        .unwrap();
        assert_eq!(h.title, "Title here");
        assert_eq!(h.params.len(), 2);
        assert_eq!(h.params[1].default.as_deref(), Some("10"));
        let v = h.bind("t", &[("probe", "3")]).unwrap();
        assert_eq!(v["probe"], ParamValue::Int64(3));
        assert_eq!(v["k"], ParamValue::Int64(10));
        let e = h.bind("t", &[]).unwrap_err().to_string();
        assert!(e.contains("parameter probe: missing"), "{e}");
        let e = h.bind("t", &[("probe", "x")]).unwrap_err().to_string();
        assert!(e.contains("parameter probe: invalid value \"x\""), "{e}");
        let e = h
            .bind("t", &[("probe", "1"), ("kk", "1")])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "parameter kk: unknown (parameters of t: probe, k)");
        let e = h
            .bind("t", &[("probe", "1"), ("probe", "2")])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "parameter probe: given twice");
    }

    #[test]
    fn bad_headers() {
        for (text, want) in [
            (
                "-- param: 1x (int64) doc",
                "bad parameter declaration \"param: 1x (int64) doc\"",
            ),
            (
                "-- param: x (int32) doc",
                "bad parameter declaration \"param: x (int32) doc\"",
            ),
            (
                "-- param: x (float64, default inf) doc",
                "parameter x: default \"inf\" is not a valid float64",
            ),
            (
                "-- param: x (string) a\n-- param: x (string) b",
                "parameter x declared twice",
            ),
        ] {
            let e = Header::parse(text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{text}: {e}");
        }
        // The header ends at the first SQL line.
        let h = Header::parse("-- T\nSELECT 1\n-- param: x (nonsense)").unwrap();
        assert!(h.params.is_empty());
    }

    #[test]
    fn values() {
        assert_eq!(
            ParamType::Float64.value(" 2.5 "),
            Some(ParamValue::Float64(2.5))
        );
        assert_eq!(ParamType::Float64.value("NaN"), None);
        assert_eq!(
            ParamType::String.value(" a "),
            Some(ParamValue::String(" a ".into()))
        );
        assert_eq!(ParamType::Int64.value("1.0"), None);
    }
}
