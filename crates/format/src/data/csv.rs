//! CSV data sets: [`CsvOptions`] (the `?key=value` part of `csv:PATH?…`)
//! and [`parse_csv`].
use super::{DataError, Dataset, MAX_CLASSES, Result};
use std::path::Path;

/// Which column of a CSV file holds the label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelColumn {
    /// The first column (`label=first`).
    First,
    /// The last column (`label=last`, the default).
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
    /// The first line is a header (`header=yes`).
    Yes,
    /// Every line is a row (`header=no`).
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

/// Options of a CSV data set (see the [module docs](super)).
#[derive(Debug, Clone, PartialEq)]
pub struct CsvOptions {
    /// The label column (`label=`).
    pub label: LabelColumn,
    /// Whether the first line names the columns (`header=`).
    pub header: Header,
    /// Shape of one example; `None`: flat.
    pub shape: Option<Vec<usize>>,
    /// Factor every feature is multiplied by (`scale=`, default 1).
    pub scale: f64,
    /// The rows at the end of the file that form the test split (`test=`).
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
    pub fn parse_query(query: &str) -> std::result::Result<Self, String> {
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
                    let c = v
                        .parse::<usize>()
                        .ok()
                        .filter(|&c| c >= 2)
                        .ok_or_else(|| bad("expected an integer ≥ 2"))?;
                    if c > MAX_CLASSES {
                        return Err(bad(&format!("at most {MAX_CLASSES} classes")));
                    }
                    o.classes = Some(c);
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

/// Reads the next record that is not blank from `reader` (reading `bytes`)
/// into `record`; returns the 1-based line where it starts, or `None` at the
/// end.
///
/// The `csv` reader skips empty lines itself; a line of only whitespace is
/// a record of one blank field, skipped here.
fn next_row(
    reader: &mut ::csv::Reader<&[u8]>,
    record: &mut ::csv::StringRecord,
    bytes: &[u8],
    path: &Path,
) -> Result<Option<usize>> {
    loop {
        let more = reader.read_record(record).map_err(|e| {
            // Not expected: the text is UTF-8, the reader flexible and
            // reading from memory.
            let message = e.to_string();
            match e.position() {
                Some(p) => DataError::BadRow {
                    path: path.to_path_buf(),
                    line: start_line(bytes, p),
                    message,
                },
                None => DataError::BadData {
                    name: path.display().to_string(),
                    message,
                },
            }
        })?;
        if !more {
            return Ok(None);
        }
        if record.len() == 1 && record[0].trim().is_empty() {
            continue;
        }
        // A record read by a `Reader` always has a position.
        return Ok(Some(record.position().map_or(0, |p| start_line(bytes, p))));
    }
}

/// The 1-based line where the record at `p` starts. The `csv` reader gives a
/// record the position where it began reading it: just after the previous
/// record's terminator, so before the LF of a CRLF and before any empty
/// lines, which it skips. Those line ends count here.
fn start_line(bytes: &[u8], p: &::csv::Position) -> usize {
    let from = usize::try_from(p.byte()).map_or(bytes.len(), |b| b.min(bytes.len()));
    let skipped = bytes[from..]
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .filter(|&&b| b == b'\n')
        .count();
    usize::try_from(p.line())
        .unwrap_or(usize::MAX)
        .saturating_add(skipped)
}

/// Parses CSV text; `path` names the file in errors.
///
/// Fields may be quoted (`"1.5"`, `"name, with comma"`, `"a ""b"""`) and a
/// quoted field may span lines; lines end in LF or CRLF. Fields are trimmed
/// and blank lines skipped. Errors name the 1-based line where the row starts.
pub fn parse_csv(bytes: &[u8], path: &Path, options: &CsvOptions) -> Result<Dataset> {
    let text = std::str::from_utf8(bytes).map_err(|e| DataError::BadData {
        name: path.display().to_string(),
        message: format!("not UTF-8 text: {e}"),
    })?;
    let row_err = |line: usize, message: String| DataError::BadRow {
        path: path.to_path_buf(),
        line,
        message,
    };
    // Flexible: a row with the wrong number of fields gets our error below,
    // naming the file and line, not the `csv` crate's.
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut first = ::csv::StringRecord::new();
    let Some(first_no) = next_row(&mut reader, &mut first, text.as_bytes(), path)? else {
        return Err(DataError::BadData {
            name: path.display().to_string(),
            message: "no rows".into(),
        });
    };
    let first_fields: Vec<&str> = first.iter().map(str::trim).collect();
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
    let label_col = label_column(&options.label, &first_fields, is_header)
        .map_err(|message| row_err(first_no, message))?;
    let dim = width - 1;
    let mut features = Vec::new();
    let mut raw_labels: Vec<(usize, i64)> = Vec::new();
    let mut add_row = |no: usize, record: &::csv::StringRecord| -> Result<()> {
        if record.len() != width {
            return Err(row_err(
                no,
                format!("expected {width} fields, found {}", record.len()),
            ));
        }
        for (c, f) in record.iter().map(str::trim).enumerate() {
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
                let label = csv_label(f, x, options.classes).map_err(|m| row_err(no, m))?;
                raw_labels.push((no, label));
            } else {
                let feature = csv_feature(c, f, x, options.scale).map_err(|m| row_err(no, m))?;
                features.push(feature);
            }
        }
        Ok(())
    };
    if !is_header {
        add_row(first_no, &first)?;
    }
    let mut record = ::csv::StringRecord::new();
    while let Some(no) = next_row(&mut reader, &mut record, text.as_bytes(), path)? {
        add_row(no, &record)?;
    }
    csv_dataset(
        path.display().to_string(),
        options,
        dim,
        features,
        &raw_labels,
    )
}

/// The column of the label in a file whose first row has `first` fields
/// (its header when `is_header`), or what is wrong with `label`.
fn label_column(
    label: &LabelColumn,
    first: &[&str],
    is_header: bool,
) -> std::result::Result<usize, String> {
    let width = first.len();
    match label {
        LabelColumn::First => Ok(0),
        LabelColumn::Last => Ok(width - 1),
        LabelColumn::Index(i) if *i < width => Ok(*i),
        LabelColumn::Index(i) => Err(format!(
            "label column {i} out of range (the file has {width} columns)"
        )),
        LabelColumn::Name(name) => {
            if !is_header {
                return Err(format!(
                    "label column {name:?} given by name, but the file has no header"
                ));
            }
            first
                .iter()
                .position(|f| f == name)
                .ok_or_else(|| format!("no column named {name:?} in header"))
        }
    }
}

/// The label in field `f` (value `x`), or why it is out of range.
fn csv_label(f: &str, x: f64, classes: Option<usize>) -> std::result::Result<i64, String> {
    if x < 0.0 || x.fract() != 0.0 {
        return Err(format!("label {f:?} out of range (must be an integer ≥ 0)"));
    }
    // Every class gets a name, so a label near i32::MAX would
    // allocate billions of them.
    if x >= MAX_CLASSES as f64 {
        return Err(format!(
            "label {f:?} out of range (at most {MAX_CLASSES} classes)"
        ));
    }
    if let Some(k) = classes
        && x as usize >= k
    {
        return Err(format!("label {f:?} out of range 0..{k}"));
    }
    Ok(x as i64)
}

/// The feature in column `c`, field `f` (value `x`) times `scale`, or why
/// it does not fit an f32.
fn csv_feature(c: usize, f: &str, x: f64, scale: f64) -> std::result::Result<f32, String> {
    // Finite as f64 is not enough: 1e39 becomes infinity as f32.
    let feature = (x * scale) as f32;
    if !feature.is_finite() {
        let scaled = if scale == 1.0 {
            String::new()
        } else {
            format!(" times scale {scale}")
        };
        return Err(format!(
            "column {c}: value {f:?}{scaled} is out of the 32-bit float range"
        ));
    }
    Ok(feature)
}

/// The data set `name` of the parsed rows: `dim` features a row, the
/// labels with their line numbers, shaped and split as `options` say.
fn csv_dataset(
    name: String,
    options: &CsvOptions,
    dim: usize,
    features: Vec<f32>,
    raw_labels: &[(usize, i64)],
) -> Result<Dataset> {
    let n = raw_labels.len();
    if n == 0 {
        return Err(DataError::BadData {
            name,
            message: "no data rows".into(),
        });
    }
    let shape = match &options.shape {
        // Checked: `shape=4294967296x4294967296` must not overflow.
        Some(s) if s.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) == Some(dim) => s.clone(),
        Some(s) => {
            return Err(DataError::BadData {
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
        return Err(DataError::BadData {
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

    /// Found by `scripts/fuzz.sh` (target `csv`): a value that is finite as
    /// f64 but not as f32 became an infinite feature.
    #[test]
    fn fuzz_regression_csv_f32_overflow() {
        // The minimised input, after the fuzz target's options byte.
        let text = format!("1,4,{}", "2".repeat(40));
        let options = CsvOptions {
            label: LabelColumn::Index(1),
            header: Header::No,
            ..CsvOptions::default()
        };
        let e = parse_csv(text.as_bytes(), Path::new("big.csv"), &options).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "big.csv:1: column 2: value \"{}\" is out of the 32-bit float range",
                "2".repeat(40)
            )
        );
        let options = CsvOptions {
            scale: 1e30,
            ..CsvOptions::default()
        };
        let e = parse_csv(b"1e10,0\n", Path::new("s.csv"), &options).unwrap_err();
        assert_eq!(
            e.to_string(),
            "s.csv:1: column 0: value \"1e10\" times scale 1000000000000000000000000000000 \
             is out of the 32-bit float range"
        );
    }

    /// Found by `scripts/fuzz.sh` (target `csv`, out of memory): a label of
    /// 900000005 made 900 million class names (a 21 GB allocation).
    #[test]
    fn fuzz_regression_csv_huge_label() {
        // The minimised input: option query `label=0000000`, then one row.
        let options = CsvOptions::parse_query("label=0000000").unwrap();
        let e = parse_csv(b"0900000005,6\n", Path::new("oom.csv"), &options).unwrap_err();
        assert_eq!(
            e.to_string(),
            "oom.csv:1: label \"0900000005\" out of range (at most 65536 classes)"
        );
        let e = CsvOptions::parse_query("classes=65537").unwrap_err();
        assert_eq!(e, "option classes=\"65537\": at most 65536 classes");
        let d = parse_csv(b"65535,1\n0,2\n", Path::new("ok.csv"), &options).unwrap();
        assert_eq!(d.classes.len(), MAX_CLASSES);
    }

    #[test]
    fn huge_shape_is_an_error() {
        let options = CsvOptions::parse_query("shape=4294967296x4294967296").unwrap();
        let e = parse_csv(b"1,0\n2,1\n", Path::new("s.csv"), &options).unwrap_err();
        assert_eq!(
            e.to_string(),
            "data set s.csv: shape [4294967296, 4294967296] does not hold the 1 feature columns"
        );
    }

    fn err(text: &str, options: &CsvOptions) -> String {
        parse_csv(text.as_bytes(), Path::new("t.csv"), options)
            .unwrap_err()
            .to_string()
    }

    /// Quoted numbers are numbers: the first row is data, not a header
    /// (split by hand, `"1.5"` was not a number, so a header, and `"4"` an
    /// error).
    #[test]
    fn quoted_fields() {
        let text = "\"1.5\",\"2\",0\n3,\" 4 \",\"1\"\n";
        let options = CsvOptions {
            test: TestSplit::Rows(0),
            ..CsvOptions::default()
        };
        let d = parse_csv(text.as_bytes(), Path::new("q.csv"), &options).unwrap();
        assert_eq!(d.features, vec![1.5, 2.0, 3.0, 4.0]);
        assert_eq!(d.labels, vec![0, 1]);
        assert_eq!(d.shape, vec![2]);
    }

    /// A quoted header name with a comma is one column (split by hand, the
    /// header had 4 fields, the rows 3).
    #[test]
    fn quoted_header_name_with_a_comma() {
        let text = "\"pixel, 0\",pixel_1,y\n2,0.5,0.25\n0,0.75,1\n1,0,0\n";
        let options = CsvOptions::parse_query("label=pixel, 0&test=1").unwrap();
        assert_eq!(options.label, LabelColumn::Name("pixel, 0".into()));
        let d = parse_csv(text.as_bytes(), Path::new("h.csv"), &options).unwrap();
        assert_eq!(d.shape, vec![2]);
        assert_eq!(d.labels, vec![2, 0, 1]);
        assert_eq!(d.features, vec![0.5, 0.25, 0.75, 1.0, 0.0, 0.0]);
        assert_eq!((d.n_train, d.classes.len()), (2, 3));
    }

    /// `""` in a quoted field is one quote (by hand, the name kept its
    /// outer quotes and doubled inner ones, and was not found).
    #[test]
    fn escaped_quotes_in_a_header_name() {
        let text = "x,\"a \"\"b\"\"\",z\n0.5,1,0.25\n0.75,0,1\n";
        let options = CsvOptions {
            label: LabelColumn::Name("a \"b\"".into()),
            test: TestSplit::Rows(1),
            ..CsvOptions::default()
        };
        let d = parse_csv(text.as_bytes(), Path::new("e.csv"), &options).unwrap();
        assert_eq!(d.labels, vec![1, 0]);
        assert_eq!(d.features, vec![0.5, 0.25, 0.75, 1.0]);
    }

    /// CRLF line ends, with quoted fields before them and an empty line; a
    /// bad row still gets its own line number (the reader's own position
    /// would be the line before, where the previous row's CR is).
    #[test]
    fn crlf_line_endings() {
        let text = "a,b,y\r\n1,\"2\",0\r\n3,4,\"1\"\r\n";
        let options = CsvOptions {
            test: TestSplit::Rows(1),
            ..CsvOptions::default()
        };
        let d = parse_csv(text.as_bytes(), Path::new("c.csv"), &options).unwrap();
        assert_eq!(d.features, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(d.labels, vec![0, 1]);
        let bad = "a,b,y\r\n1,\"2\",0\r\n\r\n3,x,\"1\"\r\n";
        assert_eq!(
            err(bad, &options),
            "t.csv:4: column 1: value \"x\" is not a number"
        );
    }

    /// A quoted header name spanning two lines: the rows after it are on
    /// lines 3 and 4 of the file (by hand, line 1 was a 1-field row).
    #[test]
    fn quoted_newline_in_the_header_moves_line_numbers() {
        let text = "\"pix\nel\",y\n1,0\n2,x\n";
        assert_eq!(
            err(text, &CsvOptions::default()),
            "t.csv:4: column 1: value \"x\" is not a number"
        );
        let options = CsvOptions {
            label: LabelColumn::Name("y".into()),
            test: TestSplit::Rows(1),
            ..CsvOptions::default()
        };
        let d = parse_csv(b"\"pix\nel\",y\n1,0\n2,1\n", Path::new("n.csv"), &options).unwrap();
        assert_eq!((d.features, d.labels), (vec![1.0, 2.0], vec![0, 1]));
    }

    /// A row with the wrong number of fields is our error, naming the line
    /// (a quoted comma makes `"3,4",1` two fields; by hand it was three, with
    /// `"3` not a number).
    #[test]
    fn malformed_row_names_its_line() {
        let text = "a,b,y\n1,2,0\n\n  \n\"3,4\",1\n";
        assert_eq!(
            err(text, &CsvOptions::default()),
            "t.csv:5: expected 3 fields, found 2"
        );
        let text = "1,2,0\n1,2,3,1\n";
        assert_eq!(
            err(text, &CsvOptions::default()),
            "t.csv:2: expected 3 fields, found 4"
        );
    }

    /// Blank and whitespace-only lines are skipped and still counted.
    #[test]
    fn blank_lines_are_skipped_and_counted() {
        let text = "\n  \n1,0\n\n\t\n2,1\n\n3,z\n";
        assert_eq!(
            err(text, &CsvOptions::default()),
            "t.csv:8: column 1: value \"z\" is not a number"
        );
        assert_eq!(
            err("\n \n\r\n", &CsvOptions::default()),
            "data set t.csv: no rows"
        );
        assert_eq!(
            err("\n\n7\n", &CsvOptions::default()),
            "t.csv:3: 1 field(s); need a label and at least one feature"
        );
    }
}
