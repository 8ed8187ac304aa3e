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
//!     a label `≥ K` is an error. At most [`MAX_CLASSES`].
//!
//!   A malformed row (wrong number of fields, a value that is not a finite
//!   number, a label that is not an integer in range) is an error naming the
//!   file and line.
//! - `idx:DIR` — the four MNIST files in `DIR`: `train-images-idx3-ubyte`,
//!   `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
//!   `t10k-labels-idx1-ubyte`, each optionally gzipped (`.gz`). Pixels are
//!   scaled to 0..1, shape `[1, H, W]`; the train files are the training split.
//!
//! Parsing is pure Rust on bytes ([`parse_csv`], [`parse_idx`]) so that any
//! training loop, the analyzer (which draws the digits in reports) and the
//! fuzz targets share one implementation without linking libtorch.
mod csv;
mod error;
mod idx;

pub use csv::{CsvOptions, Header, LabelColumn, TestSplit, parse_csv};
pub use error::{DataError, Result};
pub use idx::{IDX_FILES, load_idx, parse_idx};

use crate::Split;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The bundled digits file (gzipped CSV, 64 pixel columns then the label).
const DIGITS_GZ: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv.gz"));

/// The most classes a data set may have: every class gets a name in the
/// manifest and a row per probe in class-share queries, and a CSV label of
/// 900000005 must not allocate 900 million names. Far above the 21,841
/// classes of ImageNet-21k.
pub const MAX_CLASSES: usize = 1 << 16;

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
        let bad = |message: String| DataError::BadData {
            name: name.clone(),
            message,
        };
        let Some(dim) = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
            return Err(bad(format!("example shape {shape:?} is too large")));
        };
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
        if classes.len() > MAX_CLASSES {
            return Err(bad(format!(
                "{} classes (at most {MAX_CLASSES})",
                classes.len()
            )));
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
/// use reptrace_format::data::DataSource;
/// let d: DataSource = "csv:data/x.csv?label=first&test=0.25".parse().unwrap();
/// assert!(matches!(d, DataSource::Csv { .. }));
/// assert!("mnist".parse::<DataSource>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// The bundled digits.
    Digits,
    /// A CSV file.
    Csv {
        /// The CSV file (gzipped when its name ends in `.gz`).
        path: PathBuf,
        /// The options after `?`.
        options: CsvOptions,
    },
    /// A directory with MNIST IDX files.
    Idx {
        /// The directory holding the four [`IDX_FILES`] (each optionally `.gz`).
        dir: PathBuf,
    },
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
    type Err = DataError;
    fn from_str(spec: &str) -> Result<Self> {
        let bad = |message: &str| DataError::BadDataSpec {
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

/// The bundled digits data set.
pub fn digits() -> Result<Dataset> {
    let mut bytes = Vec::new();
    let path = Path::new("data/digits.csv.gz");
    flate2::read::GzDecoder::new(DIGITS_GZ)
        .read_to_end(&mut bytes)
        .map_err(|source| DataError::Io {
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
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let io = |source| DataError::Io {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bundled_digits() {
        let d = digits().unwrap();
        assert_eq!(
            (d.len(), d.n_train, d.shape.clone(), d.classes.len()),
            (1797, DIGITS_TRAIN_ROWS, vec![1, 8, 8], 10)
        );
        assert!(d.features.iter().all(|p| (0.0..=1.0).contains(p)));
    }
}
