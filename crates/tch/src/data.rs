//! Data sets: the bundled digits, generic CSV files and MNIST-style IDX files.
//!
//! A [`Dataset`] holds every example as `f32` features in row-major order,
//! an integer label per example, and a fixed split: the first
//! [`Dataset::n_train`] rows are the training split, the rest the test split.
//! The row index is the example's `instance_id` in the trace.
//!
//! Sources, as written on the command line ([`DataSource::from_str`]):
//!
//! - `digits` — the bundled UCI Optical Recognition of Handwritten Digits
//!   test set (1797 rows, CC BY 4.0): 8×8 images with pixels 0..16 scaled to
//!   0..1, shape `[1, 8, 8]`, ten classes; rows 0..1437 train, 1437..1797 test.
//! - `csv:PATH[?OPTIONS]` — one example per line, comma-separated numbers,
//!   one column of them the label (a non-negative integer). A `.gz` file is
//!   decompressed. Options, `&`-separated `key=value`:
//!   - `label=last|first|N|NAME` — the label column (index from 0, or a
//!     header name); default `last`;
//!   - `header=auto|yes|no` — whether the first line names the columns;
//!     `auto` (default) treats it as a header when a field is not a number;
//!   - `shape=CxHxW` — the shape of one example (its product must equal the
//!     number of feature columns), e.g. `1x28x28` for images; default flat;
//!   - `scale=X` — multiply every feature by `X` (default 1);
//!   - `test=F` with `0 ≤ F < 1` — the last fraction `F` of the rows is the
//!     test split (default 0.2); `test=N` (an integer) — the last `N` rows;
//!   - `classes=K` — the number of classes (default: largest label + 1);
//!     a label `≥ K` is an error.
//!
//!   A malformed row (wrong number of fields, a value that is not a finite
//!   number, a label that is not an integer in range) is an error naming the
//!   file and line.
//! - `idx:DIR` — the four MNIST files in `DIR`: `train-images-idx3-ubyte`,
//!   `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
//!   `t10k-labels-idx1-ubyte`, each optionally gzipped (`.gz`). Pixels are
//!   scaled to 0..1, shape `[1, H, W]`; the train files are the training split.
use crate::{Error, Result};
use reptrace_format::Split;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The bundled digits file (gzipped CSV, 64 pixel columns then the label).
const DIGITS_GZ: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data/digits.csv.gz"
));

/// Rows of the digits file that form the training split.
pub const DIGITS_TRAIN_ROWS: usize = 1437;

/// An in-memory data set with a fixed train/test split.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// A short description of where the data came from (`digits`, a path).
    pub name: String,
    /// Shape of one example, without the batch dimension.
    pub shape: Vec<usize>,
    /// Class names, indexed by label.
    pub classes: Vec<String>,
    /// `len() × dim()` features, row-major.
    pub features: Vec<f32>,
    /// One label per row, in `0..classes.len()`.
    pub labels: Vec<i32>,
    /// Rows `0..n_train` are the training split, the rest the test split.
    pub n_train: usize,
}

impl Dataset {
    /// Builds a data set, checking that the parts fit together.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        classes: Vec<String>,
        features: Vec<f32>,
        labels: Vec<i32>,
        n_train: usize,
    ) -> Result<Self> {
        let name = name.into();
        let bad = |message: String| Error::BadData {
            name: name.clone(),
            message,
        };
        let dim: usize = shape.iter().product();
        if shape.is_empty() || dim == 0 {
            return Err(bad(format!("example shape {shape:?} is empty")));
        }
        if features.len() != labels.len() * dim {
            return Err(bad(format!(
                "{} features do not fit {} rows of {dim}",
                features.len(),
                labels.len()
            )));
        }
        if n_train == 0 || n_train > labels.len() {
            return Err(bad(format!(
                "training split of {n_train} rows out of {} (need at least one)",
                labels.len()
            )));
        }
        if classes.len() < 2 {
            return Err(bad(format!("{} classes (need at least 2)", classes.len())));
        }
        if let Some((row, l)) = labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l < 0 || **l as usize >= classes.len())
        {
            return Err(bad(format!(
                "label {l} of row {row} out of range 0..{}",
                classes.len()
            )));
        }
        Ok(Self {
            name,
            shape,
            classes,
            features,
            labels,
            n_train,
        })
    }

    /// Number of rows (both splits).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the data set has no rows (never true for a built data set).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features per example.
    pub fn dim(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows in the test split.
    pub fn n_test(&self) -> usize {
        self.len() - self.n_train
    }

    /// The split of row `row`.
    pub fn split(&self, row: usize) -> Split {
        if row < self.n_train {
            Split::Train
        } else {
            Split::Test
        }
    }

    /// The features of one row.
    pub fn row(&self, row: usize) -> &[f32] {
        let d = self.dim();
        &self.features[row * d..(row + 1) * d]
    }
}

/// Where a data set comes from; parse one with [`str::parse`].
///
/// ```
/// use reptrace_tch::DataSource;
/// let d: DataSource = "csv:data/x.csv?label=first&test=0.25".parse().unwrap();
/// assert!(matches!(d, DataSource::Csv { .. }));
/// assert!("mnist".parse::<DataSource>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// The bundled digits.
    Digits,
    /// A CSV file.
    Csv { path: PathBuf, options: CsvOptions },
    /// A directory with MNIST IDX files.
    Idx { dir: PathBuf },
}

impl DataSource {
    /// Reads the data set.
    pub fn load(&self) -> Result<Dataset> {
        match self {
            DataSource::Digits => digits(),
            DataSource::Csv { path, options } => {
                let bytes = read_maybe_gz(path)?;
                parse_csv(&bytes, path, options)
            }
            DataSource::Idx { dir } => load_idx(dir),
        }
    }
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Digits => f.write_str("digits"),
            DataSource::Csv { path, .. } => write!(f, "csv:{}", path.display()),
            DataSource::Idx { dir } => write!(f, "idx:{}", dir.display()),
        }
    }
}

impl FromStr for DataSource {
    type Err = Error;
    fn from_str(spec: &str) -> Result<Self> {
        let bad = |message: &str| Error::BadDataSpec {
            spec: spec.to_owned(),
            message: message.to_owned(),
        };
        if spec == "digits" {
            Ok(DataSource::Digits)
        } else if let Some(rest) = spec.strip_prefix("csv:") {
            let (path, query) = match rest.split_once('?') {
                Some((p, q)) => (p, q),
                None => (rest, ""),
            };
            if path.is_empty() {
                return Err(bad("missing file path after csv:"));
            }
            let options = CsvOptions::parse_query(query).map_err(|m| bad(&m))?;
            Ok(DataSource::Csv {
                path: PathBuf::from(path),
                options,
            })
        } else if let Some(dir) = spec.strip_prefix("idx:") {
            if dir.is_empty() {
                return Err(bad("missing directory after idx:"));
            }
            Ok(DataSource::Idx {
                dir: PathBuf::from(dir),
            })
        } else {
            Err(bad("expected digits, csv:PATH[?OPTIONS] or idx:DIR"))
        }
    }
}

/// Which column of a CSV file holds the label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelColumn {
    First,
    Last,
    /// 0-based column index.
    Index(usize),
    /// Column name from the header.
    Name(String),
}

/// Whether the first line of a CSV file is a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A header when one of its fields is not a number.
    Auto,
    Yes,
    No,
}

/// How many rows (at the end of the file) form the test split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TestSplit {
    /// This fraction of the rows, rounded.
    Fraction(f64),
    /// Exactly this many rows.
    Rows(usize),
}

/// Options of a CSV data set (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct CsvOptions {
    pub label: LabelColumn,
    pub header: Header,
    /// Shape of one example; `None`: flat.
    pub shape: Option<Vec<usize>>,
    pub scale: f64,
    pub test: TestSplit,
    /// Number of classes; `None`: largest label + 1.
    pub classes: Option<usize>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            label: LabelColumn::Last,
            header: Header::Auto,
            shape: None,
            scale: 1.0,
            test: TestSplit::Fraction(0.2),
            classes: None,
        }
    }
}

impl CsvOptions {
    /// Parses `key=value&key=value` (the part after `?` in `csv:PATH?…`).
    fn parse_query(query: &str) -> std::result::Result<Self, String> {
        let mut o = CsvOptions::default();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("option {kv:?} is not key=value"))?;
            let bad = |what: &str| format!("option {k}={v:?}: {what}");
            match k {
                "label" => {
                    o.label = match v {
                        "first" => LabelColumn::First,
                        "last" => LabelColumn::Last,
                        _ => match v.parse::<usize>() {
                            Ok(i) => LabelColumn::Index(i),
                            Err(_) if !v.is_empty() => LabelColumn::Name(v.to_owned()),
                            Err(_) => return Err(bad("expected first, last, an index or a name")),
                        },
                    }
                }
                "header" => {
                    o.header = match v {
                        "auto" => Header::Auto,
                        "yes" | "true" => Header::Yes,
                        "no" | "false" => Header::No,
                        _ => return Err(bad("expected auto, yes or no")),
                    }
                }
                "shape" => {
                    let dims = v
                        .split('x')
                        .map(|d| d.parse::<usize>().ok().filter(|&d| d > 0))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| bad("expected positive sizes like 1x28x28"))?;
                    o.shape = Some(dims);
                }
                "scale" => {
                    o.scale = v
                        .parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite())
                        .ok_or_else(|| bad("expected a finite number"))?;
                }
                "test" => {
                    o.test = if let Ok(n) = v.parse::<usize>() {
                        TestSplit::Rows(n)
                    } else {
                        let f = v
                            .parse::<f64>()
                            .ok()
                            .filter(|f| (0.0..1.0).contains(f))
                            .ok_or_else(|| bad("expected a row count or a fraction in [0, 1)"))?;
                        TestSplit::Fraction(f)
                    };
                }
                "classes" => {
                    o.classes = Some(
                        v.parse::<usize>()
                            .ok()
                            .filter(|&c| c >= 2)
                            .ok_or_else(|| bad("expected an integer ≥ 2"))?,
                    );
                }
                _ => {
                    return Err(format!(
                        "unknown option {k:?} (options: label, header, shape, scale, test, classes)"
                    ));
                }
            }
        }
        Ok(o)
    }
}

/// The bundled digits data set.
pub fn digits() -> Result<Dataset> {
    let mut bytes = Vec::new();
    let path = Path::new("data/digits.csv.gz");
    flate2::read::GzDecoder::new(DIGITS_GZ)
        .read_to_end(&mut bytes)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let options = CsvOptions {
        label: LabelColumn::Last,
        header: Header::No,
        shape: Some(vec![1, 8, 8]),
        scale: 1.0 / 16.0,
        test: TestSplit::Rows(1797 - DIGITS_TRAIN_ROWS),
        classes: Some(10),
    };
    let mut d = parse_csv(&bytes, path, &options)?;
    d.name = "digits".to_owned();
    Ok(d)
}

/// Reads a file, gunzipping it when its name ends in `.gz`.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses CSV text; `path` names the file in errors.
pub fn parse_csv(bytes: &[u8], path: &Path, options: &CsvOptions) -> Result<Dataset> {
    let text = std::str::from_utf8(bytes).map_err(|e| Error::BadData {
        name: path.display().to_string(),
        message: format!("not UTF-8 text: {e}"),
    })?;
    let row_err = |line: usize, message: String| Error::BadRow {
        path: path.to_path_buf(),
        line,
        message,
    };
    // (1-based line number, fields), blank lines skipped.
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((first_no, first)) = lines.next() else {
        return Err(Error::BadData {
            name: path.display().to_string(),
            message: "no rows".into(),
        });
    };
    let first_fields: Vec<&str> = first.split(',').map(str::trim).collect();
    let is_header = match options.header {
        Header::Yes => true,
        Header::No => false,
        Header::Auto => first_fields.iter().any(|f| f.parse::<f64>().is_err()),
    };
    let width = first_fields.len();
    if width < 2 {
        return Err(row_err(
            first_no,
            format!("{width} field(s); need a label and at least one feature"),
        ));
    }
    let label_col = match &options.label {
        LabelColumn::First => 0,
        LabelColumn::Last => width - 1,
        LabelColumn::Index(i) if *i < width => *i,
        LabelColumn::Index(i) => {
            return Err(row_err(
                first_no,
                format!("label column {i} out of range (the file has {width} columns)"),
            ));
        }
        LabelColumn::Name(name) => {
            if !is_header {
                return Err(row_err(
                    first_no,
                    format!("label column {name:?} given by name, but the file has no header"),
                ));
            }
            first_fields
                .iter()
                .position(|f| f == name)
                .ok_or_else(|| row_err(first_no, format!("no column named {name:?} in header")))?
        }
    };
    let dim = width - 1;
    let mut features = Vec::new();
    let mut raw_labels: Vec<(usize, i64)> = Vec::new();
    let data_lines = std::iter::once((first_no, first))
        .filter(|_| !is_header)
        .chain(lines);
    for (no, line) in data_lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != width {
            return Err(row_err(
                no,
                format!("expected {width} fields, found {}", fields.len()),
            ));
        }
        for (c, f) in fields.iter().enumerate() {
            let x: f64 = f
                .parse()
                .map_err(|_| row_err(no, format!("column {c}: value {f:?} is not a number")))?;
            if !x.is_finite() {
                return Err(row_err(
                    no,
                    format!("column {c}: value {f:?} is not finite"),
                ));
            }
            if c == label_col {
                if x < 0.0 || x.fract() != 0.0 || x > i32::MAX as f64 {
                    return Err(row_err(
                        no,
                        format!("label {f:?} out of range (must be an integer ≥ 0)"),
                    ));
                }
                if let Some(k) = options.classes
                    && x as usize >= k
                {
                    return Err(row_err(no, format!("label {f:?} out of range 0..{k}")));
                }
                raw_labels.push((no, x as i64));
            } else {
                features.push((x * options.scale) as f32);
            }
        }
    }
    let n = raw_labels.len();
    let name = path.display().to_string();
    if n == 0 {
        return Err(Error::BadData {
            name,
            message: "no data rows".into(),
        });
    }
    let shape = match &options.shape {
        Some(s) if s.iter().product::<usize>() == dim => s.clone(),
        Some(s) => {
            return Err(Error::BadData {
                name,
                message: format!("shape {s:?} does not hold the {dim} feature columns"),
            });
        }
        None => vec![dim],
    };
    let max_label = raw_labels.iter().map(|(_, l)| *l).max().unwrap_or(0) as usize;
    let k = options.classes.unwrap_or(max_label + 1).max(2);
    let n_test = match options.test {
        TestSplit::Rows(r) => r,
        TestSplit::Fraction(f) => (n as f64 * f).round() as usize,
    };
    if n_test >= n {
        return Err(Error::BadData {
            name,
            message: format!("test split of {n_test} rows leaves no training rows (of {n})"),
        });
    }
    let labels = raw_labels.iter().map(|(_, l)| *l as i32).collect();
    Dataset::new(
        name,
        shape,
        (0..k).map(|c| c.to_string()).collect(),
        features,
        labels,
        n - n_test,
    )
}

/// IDX file names of the MNIST layout: (train images, train labels, test images, test labels).
pub const IDX_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Reads `name` or `name.gz` in `dir`.
fn read_idx_file(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>)> {
    let plain = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    let path = if plain.exists() || !gz.exists() {
        plain
    } else {
        gz
    };
    let bytes = read_maybe_gz(&path)?;
    Ok((path, bytes))
}

/// Parses one IDX file of unsigned bytes: its dimensions and data.
fn parse_idx(path: &Path, bytes: &[u8], want_dims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let bad = |message: String| Error::BadIdx {
        path: path.to_path_buf(),
        message,
    };
    if bytes.len() < 4 {
        return Err(bad(format!(
            "{} bytes, too short for an IDX header",
            bytes.len()
        )));
    }
    let (zero, kind, ndims) = (
        u16::from_be_bytes([bytes[0], bytes[1]]),
        bytes[2],
        usize::from(bytes[3]),
    );
    if zero != 0 || kind != 0x08 {
        return Err(bad(format!(
            "magic number {:02x}{:02x}{:02x}{:02x} is not an IDX file of unsigned bytes",
            bytes[0], bytes[1], bytes[2], bytes[3]
        )));
    }
    if ndims != want_dims {
        return Err(bad(format!("{ndims} dimensions, expected {want_dims}")));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(bad("truncated header".into()));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let len: usize = dims.iter().product();
    if bytes.len() - header != len {
        return Err(bad(format!(
            "header says {dims:?} ({len} bytes of data), file has {}",
            bytes.len() - header
        )));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Reads the MNIST IDX files in `dir`.
pub fn load_idx(dir: &Path) -> Result<Dataset> {
    let mut parts = Vec::new();
    for pair in IDX_FILES.chunks(2) {
        let (ipath, ibytes) = read_idx_file(dir, pair[0])?;
        let (lpath, lbytes) = read_idx_file(dir, pair[1])?;
        let (idims, pixels) = parse_idx(&ipath, &ibytes, 3)?;
        let (ldims, labels) = parse_idx(&lpath, &lbytes, 1)?;
        if idims[0] != ldims[0] {
            return Err(Error::BadIdx {
                path: lpath,
                message: format!(
                    "{} labels for {} images in {}",
                    ldims[0],
                    idims[0],
                    ipath.display()
                ),
            });
        }
        parts.push((ipath, idims, pixels, labels));
    }
    let hw = [parts[0].1[1], parts[0].1[2]];
    if [parts[1].1[1], parts[1].1[2]] != hw {
        return Err(Error::BadIdx {
            path: parts[1].0.clone(),
            message: format!(
                "images are {}x{}, the training images {}x{}",
                parts[1].1[1], parts[1].1[2], hw[0], hw[1]
            ),
        });
    }
    let n_train = parts[0].1[0];
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for (_, _, pixels, ls) in &parts {
        features.extend(pixels.iter().map(|&p| f32::from(p) / 255.0));
        labels.extend(ls.iter().map(|&l| i32::from(l)));
    }
    let k = labels.iter().copied().max().unwrap_or(0).max(1) as usize + 1;
    Dataset::new(
        dir.display().to_string(),
        vec![1, hw[0], hw[1]],
        (0..k).map(|c| c.to_string()).collect(),
        features,
        labels,
        n_train,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn query_options() {
        let o =
            CsvOptions::parse_query("label=first&header=yes&shape=2x3&scale=0.5&test=7&classes=4")
                .unwrap();
        assert_eq!(o.label, LabelColumn::First);
        assert_eq!(o.header, Header::Yes);
        assert_eq!(o.shape, Some(vec![2, 3]));
        assert_eq!(o.scale, 0.5);
        assert_eq!(o.test, TestSplit::Rows(7));
        assert_eq!(o.classes, Some(4));
        assert_eq!(
            CsvOptions::parse_query("test=0.25").unwrap().test,
            TestSplit::Fraction(0.25)
        );
        for bad in [
            "shape=2x0",
            "test=1.5",
            "header=maybe",
            "colour=red",
            "scale",
            "classes=1",
        ] {
            assert!(CsvOptions::parse_query(bad).is_err(), "{bad}");
        }
    }
}
