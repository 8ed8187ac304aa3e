//! Streaming reads of committed Parquet files, widened to f64.
//!
//! [`RecordReader`] yields the `updates` rows of one layer in batches of a
//! bounded number of rows, reading only the columns attribution needs; memory
//! stays bounded whatever the length of the run.
//!
//! A record's lists hold a fixed number of values, or (the factor records
//! of a ragged layer, format 9) any number `n ≥ 0` of positions: each row is
//! checked against the layer's [`Lens`] and read through its offsets
//! ([`Records::u_of`], [`Records::v_of`]).
use crate::{Error, Result};
use arrow::datatypes::{
    ArrowPrimitiveType, Float16Type, Float32Type, Float64Type, Int32Type, Int64Type,
};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use reptrace_format::{Lens, col};
use std::fs::File;
use std::path::{Path, PathBuf};

/// A batch of update records of one layer, factors widened to f64.
#[derive(Debug, Clone, Default)]
pub struct Records {
    /// The step of each record (column `step`).
    pub step: Vec<i64>,
    /// The epoch of each record (column `epoch`).
    pub epoch: Vec<i32>,
    /// Null in batch mode (a record is the update of the whole batch).
    pub instance_id: Vec<Option<i64>>,
    /// Null in batch mode when the batch mixes classes.
    pub label: Vec<Option<i32>>,
    /// Every record's `u`, one after the other (record `i`'s is
    /// [`Records::u_of`]).
    pub u: Vec<f64>,
    /// Every record's `v`, one after the other (record `i`'s is
    /// [`Records::v_of`]).
    pub v: Vec<f64>,
    /// Where each record's `u` starts in `u`, then the end: `len() + 1`
    /// offsets (or none while there are no records).
    pub u_off: Vec<usize>,
    /// Where each record's `v` starts in `v`, then the end: `len() + 1`
    /// offsets (or none while there are no records).
    pub v_off: Vec<usize>,
}

impl Records {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.step.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.step.is_empty()
    }

    /// Record `i`'s `u`.
    pub fn u_of(&self, i: usize) -> &[f64] {
        &self.u[self.u_off[i]..self.u_off[i + 1]]
    }

    /// Record `i`'s `v`.
    pub fn v_of(&self, i: usize) -> &[f64] {
        &self.v[self.v_off[i]..self.v_off[i + 1]]
    }

    /// Appends the lists of one more record (its `step`, `epoch`,
    /// `instance_id` and `label` are pushed by the caller).
    pub fn push_lists(&mut self, u: &[f64], v: &[f64]) {
        push_list(&mut self.u, &mut self.u_off, u);
        push_list(&mut self.v, &mut self.v_off, v);
    }
}

/// Appends `x` to the concatenated lists `values` and its end to `offsets`.
pub(crate) fn push_list(values: &mut Vec<f64>, offsets: &mut Vec<usize>, x: &[f64]) {
    if offsets.is_empty() {
        offsets.push(values.len());
    }
    values.extend_from_slice(x);
    offsets.push(values.len());
}

/// Opens a Parquet file for reading the named columns in batches of `batch_rows`.
pub(crate) fn open_columns(
    path: &Path,
    columns: &[&str],
    batch_rows: usize,
) -> Result<ParquetRecordBatchReader> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(path, e))?;
    let arrow_schema = builder.schema();
    let mut roots = Vec::with_capacity(columns.len());
    for name in columns {
        let idx = arrow_schema.index_of(name).map_err(|_| Error::Column {
            path: path.to_path_buf(),
            column: (*name).to_owned(),
            message: "missing".into(),
        })?;
        roots.push(idx);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    builder
        .with_projection(mask)
        .with_batch_size(batch_rows.max(1))
        .build()
        .map_err(|e| Error::parquet(path, e))
}

/// A column of a batch by name.
pub(crate) fn column<'a>(batch: &'a RecordBatch, path: &Path, name: &str) -> Result<&'a ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| Error::Column {
        path: path.to_path_buf(),
        column: name.to_owned(),
        message: "missing".into(),
    })
}

fn bad(path: &Path, name: &str, message: String) -> Error {
    Error::Column {
        path: path.to_path_buf(),
        column: name.to_owned(),
        message,
    }
}

/// The values of an Int64 column (nulls rejected).
pub(crate) fn i64s(batch: &RecordBatch, path: &Path, name: &str) -> Result<Vec<i64>> {
    let a = column(batch, path, name)?;
    let a = a.as_primitive_opt::<Int64Type>().ok_or_else(|| {
        bad(
            path,
            name,
            format!("type {}, expected Int64", a.data_type()),
        )
    })?;
    if a.null_count() > 0 {
        return Err(bad(path, name, "has nulls".into()));
    }
    Ok(a.values().to_vec())
}

/// The values of an integer column that may hold nulls (`Int64Type`,
/// `Int32Type`, …).
pub(crate) fn nullable<T: ArrowPrimitiveType>(
    batch: &RecordBatch,
    path: &Path,
    name: &str,
) -> Result<Vec<Option<T::Native>>> {
    let a = column(batch, path, name)?;
    let a = a.as_primitive_opt::<T>().ok_or_else(|| {
        bad(
            path,
            name,
            format!("type {}, expected {}", a.data_type(), T::DATA_TYPE),
        )
    })?;
    Ok(a.iter().collect())
}

/// The values of an Int32 column (nulls rejected).
pub(crate) fn i32s(batch: &RecordBatch, path: &Path, name: &str) -> Result<Vec<i32>> {
    let a = column(batch, path, name)?;
    let a = a.as_primitive_opt::<Int32Type>().ok_or_else(|| {
        bad(
            path,
            name,
            format!("type {}, expected Int32", a.data_type()),
        )
    })?;
    if a.null_count() > 0 {
        return Err(bad(path, name, "has nulls".into()));
    }
    Ok(a.values().to_vec())
}

/// The values of a Boolean column, nulls as `None`.
pub(crate) fn bools(batch: &RecordBatch, path: &Path, name: &str) -> Result<Vec<Option<bool>>> {
    let a = column(batch, path, name)?;
    let a = a.as_boolean_opt().ok_or_else(|| {
        bad(
            path,
            name,
            format!("type {}, expected Boolean", a.data_type()),
        )
    })?;
    Ok(a.iter().collect())
}

/// The values of a Float64 column that may hold nulls.
pub(crate) fn f64s_opt(batch: &RecordBatch, path: &Path, name: &str) -> Result<Vec<Option<f64>>> {
    nullable::<Float64Type>(batch, path, name)
}

/// The values of a Utf8 column (nulls rejected).
pub(crate) fn strings(batch: &RecordBatch, path: &Path, name: &str) -> Result<Vec<String>> {
    let a = column(batch, path, name)?;
    let a = a
        .as_string_opt::<i32>()
        .ok_or_else(|| bad(path, name, format!("type {}, expected Utf8", a.data_type())))?;
    if a.null_count() > 0 {
        return Err(bad(path, name, "has nulls".into()));
    }
    Ok(a.iter().map(|v| v.unwrap_or_default().to_owned()).collect())
}

/// The values of a Float64 column (nulls rejected).
pub(crate) fn f64s(batch: &RecordBatch, path: &Path, name: &str) -> Result<Vec<f64>> {
    let a = column(batch, path, name)?;
    let a = a.as_primitive_opt::<Float64Type>().ok_or_else(|| {
        bad(
            path,
            name,
            format!("type {}, expected Float64", a.data_type()),
        )
    })?;
    if a.null_count() > 0 {
        return Err(bad(path, name, "has nulls".into()));
    }
    Ok(a.values().to_vec())
}

/// A list column of floats (f16, f32 or f64), appended to `out` as f64,
/// each row's end pushed to `offsets` (its start first when `offsets` is
/// empty). The lengths are checked by [`check_rows`].
pub(crate) fn list_f64(
    batch: &RecordBatch,
    path: &Path,
    name: &str,
    out: &mut Vec<f64>,
    offsets: &mut Vec<usize>,
) -> Result<()> {
    let a = column(batch, path, name)?;
    let list = a
        .as_list_opt::<i32>()
        .ok_or_else(|| bad(path, name, format!("type {}, expected List", a.data_type())))?;
    if list.null_count() > 0 {
        return Err(bad(path, name, "has null lists".into()));
    }
    let values = list.values();
    if values.null_count() > 0 {
        return Err(bad(path, name, "has null values".into()));
    }
    let arrow_offsets = list.value_offsets();
    let start = arrow_offsets.first().copied().unwrap_or(0) as usize;
    let end = arrow_offsets.last().copied().unwrap_or(0) as usize;
    if offsets.is_empty() {
        offsets.push(out.len());
    }
    // Row ends after the values already in `out` (a sliced list's offsets
    // start past 0).
    let base = out.len();
    offsets.extend(
        arrow_offsets
            .iter()
            .skip(1)
            .map(|&o| base + (o as usize).saturating_sub(start)),
    );
    out.reserve(end - start);
    match values.data_type() {
        DataType::Float32 => {
            let v = values.as_primitive::<Float32Type>().values();
            out.extend(v[start..end].iter().map(|&x| f64::from(x)));
        }
        DataType::Float16 => {
            let v = values.as_primitive::<Float16Type>().values();
            out.extend(v[start..end].iter().map(|x| x.to_f64()));
        }
        DataType::Float64 => {
            let v = values.as_primitive::<Float64Type>().values();
            out.extend_from_slice(&v[start..end]);
        }
        other => {
            return Err(bad(
                path,
                name,
                format!("list of {other}, expected a float type"),
            ));
        }
    }
    Ok(())
}

/// Checks every row of two list columns (`names`, read by [`list_f64`] into
/// `offsets`) against `shape`, from row `first` of the offsets on, which is
/// row `file_row` of the file; a [`Lens::PerPosition`] row must hold at
/// least `min_positions`. An error names the column at fault: the first
/// list when its length alone is wrong, else the second.
pub(crate) fn check_rows(
    path: &Path,
    names: [&str; 2],
    shape: Lens,
    offsets: [&[usize]; 2],
    first: usize,
    file_row: usize,
    min_positions: usize,
) -> Result<()> {
    let [a, b] = offsets;
    let rows = a.len().min(b.len()).saturating_sub(1);
    for i in first..rows {
        let (na, nb) = (a[i + 1] - a[i], b[i + 1] - b[i]);
        let row = file_row + i - first;
        let first_wrong = match shape {
            Lens::Fixed(la, _) => na != la,
            Lens::PerPosition(la, _) => la > 0 && na % la != 0,
        };
        let name = if first_wrong { names[0] } else { names[1] };
        match shape.positions(na, nb) {
            Err(message) => return Err(bad(path, name, format!("row {row} {message}"))),
            Ok(n) if matches!(shape, Lens::PerPosition(..)) && n < min_positions => {
                return Err(bad(
                    path,
                    name,
                    format!("row {row} holds {n} positions, expected at least {min_positions}"),
                ));
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Streams the update records of one layer from its committed files.
pub struct RecordReader {
    files: std::vec::IntoIter<PathBuf>,
    /// The file being read, its reader and the rows read from it so far.
    current: Option<(PathBuf, ParquetRecordBatchReader, usize)>,
    shape: Lens,
    batch_rows: usize,
}

impl RecordReader {
    /// Reads `files` in order, `batch_rows` records at a time; every record's
    /// `u` and `v` must fit `shape` (the layer's
    /// [`record_shape`](reptrace_format::TracedLayer::record_shape)).
    pub fn new(files: Vec<PathBuf>, shape: Lens, batch_rows: usize) -> Self {
        Self {
            files: files.into_iter(),
            current: None,
            shape,
            batch_rows: batch_rows.max(1),
        }
    }

    /// The records of `batch`, whose first row is row `file_row` of `path`.
    fn convert(&self, path: &Path, batch: &RecordBatch, file_row: usize) -> Result<Records> {
        records_of(path, batch, file_row, self.shape)
    }
}

/// The records of a batch of `updates` rows, whose first row is row
/// `file_row` of `path` (named in errors); every record's `u` and `v` must
/// fit `shape`.
pub(crate) fn records_of(
    path: &Path,
    batch: &RecordBatch,
    file_row: usize,
    shape: Lens,
) -> Result<Records> {
    let mut r = Records {
        step: i64s(batch, path, col::STEP)?,
        epoch: i32s(batch, path, col::EPOCH)?,
        instance_id: nullable::<Int64Type>(batch, path, col::INSTANCE_ID)?,
        label: nullable::<Int32Type>(batch, path, col::LABEL)?,
        ..Records::default()
    };
    list_f64(batch, path, col::U, &mut r.u, &mut r.u_off)?;
    list_f64(batch, path, col::V, &mut r.v, &mut r.v_off)?;
    check_rows(
        path,
        [col::U, col::V],
        shape,
        [&r.u_off, &r.v_off],
        0,
        file_row,
        0,
    )?;
    Ok(r)
}

impl Iterator for RecordReader {
    type Item = Result<Records>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((path, reader, done)) = &mut self.current {
                match reader.next() {
                    Some(Ok(batch)) => {
                        let (path, file_row) = (path.clone(), *done);
                        *done += batch.num_rows();
                        return Some(self.convert(&path, &batch, file_row));
                    }
                    Some(Err(e)) => {
                        let path = path.clone();
                        self.current = None;
                        return Some(Err(Error::Parquet {
                            path,
                            source: e.into(),
                        }));
                    }
                    None => self.current = None,
                }
            }
            let path = self.files.next()?;
            let columns = [
                col::STEP,
                col::EPOCH,
                col::INSTANCE_ID,
                col::LABEL,
                col::U,
                col::V,
            ];
            match open_columns(&path, &columns, self.batch_rows) {
                Ok(reader) => self.current = Some((path, reader, 0)),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use arrow_array::{Int32Array, Int64Array, ListArray};
    use parquet::arrow::ArrowWriter;
    use std::sync::Arc;

    /// One row's `u` and `v`.
    type Lists = (Vec<f32>, Vec<f32>);

    /// An `updates` file whose rows hold `lists`, written plainly.
    fn write(path: &Path, lists: &[Lists]) {
        let n = lists.len();
        let list = |pick: fn(&Lists) -> &Vec<f32>| -> ArrayRef {
            Arc::new(ListArray::from_iter_primitive::<Float32Type, _, _>(
                lists
                    .iter()
                    .map(|l| Some(pick(l).iter().map(|&x| Some(x)).collect::<Vec<_>>())),
            ))
        };
        let batch = RecordBatch::try_from_iter([
            (
                col::STEP,
                Arc::new(Int64Array::from(vec![7; n])) as ArrayRef,
            ),
            (
                col::EPOCH,
                Arc::new(Int32Array::from(vec![0; n])) as ArrayRef,
            ),
            (
                col::INSTANCE_ID,
                Arc::new(Int64Array::from_iter_values(0..n as i64)) as ArrayRef,
            ),
            (
                col::LABEL,
                Arc::new(Int32Array::from(vec![None; n])) as ArrayRef,
            ),
            (col::U, list(|l| &l.0)),
            (col::V, list(|l| &l.1)),
        ])
        .unwrap();
        let mut w =
            ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    /// Rows of `n` positions of 2 and 3 values, numbered so that every
    /// value says where it belongs.
    fn rows(ns: &[usize]) -> Vec<Lists> {
        ns.iter()
            .enumerate()
            .map(|(r, &n)| {
                let u = (0..2 * n).map(|k| (100 * r + k) as f32).collect();
                let v = (0..3 * n).map(|k| -((100 * r + k) as f32)).collect();
                (u, v)
            })
            .collect()
    }

    fn read(path: &Path, shape: Lens, batch_rows: usize) -> Result<Vec<Records>> {
        RecordReader::new(vec![path.to_path_buf()], shape, batch_rows).collect()
    }

    #[test]
    fn ragged_records_are_read_row_by_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.parquet");
        let ns = [0, 1, 3, 0, 2];
        let lists = rows(&ns);
        write(&path, &lists);
        // Batches of 2 rows: offsets restart in each batch.
        let batches = read(&path, Lens::PerPosition(2, 3), 2).unwrap();
        assert_eq!(
            batches.iter().map(Records::len).collect::<Vec<_>>(),
            [2, 2, 1]
        );
        let mut r = 0;
        for recs in &batches {
            assert_eq!(recs.u_off.len(), recs.len() + 1);
            for i in 0..recs.len() {
                let want_u: Vec<f64> = lists[r].0.iter().map(|&x| f64::from(x)).collect();
                let want_v: Vec<f64> = lists[r].1.iter().map(|&x| f64::from(x)).collect();
                assert_eq!(recs.u_of(i), want_u, "row {r}");
                assert_eq!(recs.v_of(i), want_v, "row {r}");
                r += 1;
            }
        }
        assert_eq!(r, ns.len());
        // Rows of equal length read under a fixed shape too.
        let fixed = dir.path().join("f.parquet");
        write(&fixed, &rows(&[2, 2, 2]));
        let recs = read(&fixed, Lens::Fixed(4, 6), 10).unwrap();
        assert_eq!(recs[0].u_off, [0, 4, 8, 12]);
        assert_eq!(recs[0].v_of(2)[5], -205.0);
    }

    #[test]
    fn rows_that_do_not_fit_the_shape_are_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.parquet");
        write(&path, &rows(&[2, 1, 3]));
        // A fixed shape: row 1 (in the second batch) has 2 values of u.
        let err = read(&path, Lens::Fixed(4, 6), 1).unwrap_err().to_string();
        assert!(err.contains("u.parquet") && err.contains("row 1"), "{err}");
        assert!(err.contains(&format!("column {}: row 1", col::U)), "{err}");
        assert!(!err.contains('\n'), "{err}");
        // v of another number of positions than u.
        let mut lists = rows(&[1, 2]);
        lists[1].1.truncate(3);
        write(&path, &lists);
        let err = read(&path, Lens::PerPosition(2, 3), 8).unwrap_err();
        let Error::Column {
            column, message, ..
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!(column, col::V, "{err}");
        assert!(message.starts_with("row 1 holds 4 and 3 values"), "{err}");
        // u not whole positions.
        lists[1].0.truncate(3);
        write(&path, &lists);
        let err = read(&path, Lens::PerPosition(2, 3), 8).unwrap_err();
        assert!(
            matches!(&err, Error::Column { column, .. } if column == col::U),
            "{err}"
        );
    }

    #[test]
    fn a_sliced_list_appends_after_what_is_there() {
        let lists = ListArray::from_iter_primitive::<Float32Type, _, _>([
            Some(vec![Some(1.0), Some(2.0)]),
            Some(vec![]),
            Some(vec![Some(3.0), Some(4.0), Some(5.0)]),
        ]);
        let batch = RecordBatch::try_from_iter([(col::U, Arc::new(lists) as ArrayRef)]).unwrap();
        let sliced = batch.slice(1, 2);
        let (mut out, mut offsets) = (vec![9.0], vec![0, 1]);
        list_f64(&sliced, Path::new("x"), col::U, &mut out, &mut offsets).unwrap();
        assert_eq!(out, [9.0, 3.0, 4.0, 5.0]);
        assert_eq!(offsets, [0, 1, 1, 4]);
    }

    #[test]
    fn a_probe_needs_a_position() {
        let path = Path::new("probes.parquet");
        let shape = Lens::PerPosition(2, 3);
        // Offsets of rows of 1, 0 and 2 positions, checked from row 1 on,
        // which is row 5 of its file.
        let (a, p) = ([0, 2, 2, 6], [0, 3, 3, 9]);
        check_rows(path, [col::A, col::P], shape, [&a, &p], 0, 0, 0).unwrap();
        let err = check_rows(path, [col::A, col::P], shape, [&a, &p], 1, 5, 1).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("probes.parquet") && msg.contains("row 5"),
            "{msg}"
        );
        assert!(msg.contains("0 positions") && !msg.contains('\n'), "{msg}");
        // A fixed probe of its lengths is one position.
        check_rows(
            path,
            [col::A, col::P],
            Lens::Fixed(2, 3),
            [&a[..2], &p[..2]],
            0,
            0,
            1,
        )
        .unwrap();
    }
}
