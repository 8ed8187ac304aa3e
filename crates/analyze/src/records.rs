//! Streaming reads of committed Parquet files, widened to f64.
//!
//! [`RecordReader`] yields the `updates` rows of one layer in batches of a
//! bounded number of rows, reading only the columns attribution needs; memory
//! stays bounded whatever the length of the run.
use crate::{Error, Result};
use arrow::datatypes::{
    ArrowPrimitiveType, Float16Type, Float32Type, Float64Type, Int32Type, Int64Type,
};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use reptrace_format::col;
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
    /// `len() × u_len`, row-major.
    pub u: Vec<f64>,
    /// `len() × v_len`, row-major.
    pub v: Vec<f64>,
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

/// A list column whose every entry has `len` floats (f16, f32 or f64),
/// appended row-major to `out` as f64.
pub(crate) fn list_f64(
    batch: &RecordBatch,
    path: &Path,
    name: &str,
    len: usize,
    out: &mut Vec<f64>,
) -> Result<()> {
    let a = column(batch, path, name)?;
    let list = a
        .as_list_opt::<i32>()
        .ok_or_else(|| bad(path, name, format!("type {}, expected List", a.data_type())))?;
    if list.null_count() > 0 {
        return Err(bad(path, name, "has null lists".into()));
    }
    let offsets = list.value_offsets();
    for (row, w) in offsets.windows(2).enumerate() {
        let n = (w[1] - w[0]) as usize;
        if n != len {
            return Err(bad(
                path,
                name,
                format!("row {row} has {n} values, expected {len}"),
            ));
        }
    }
    let start = offsets.first().copied().unwrap_or(0) as usize;
    let end = offsets.last().copied().unwrap_or(0) as usize;
    let values = list.values();
    if values.null_count() > 0 {
        return Err(bad(path, name, "has null values".into()));
    }
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

/// Streams the update records of one layer from its committed files.
pub struct RecordReader {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<(PathBuf, ParquetRecordBatchReader)>,
    u_len: usize,
    v_len: usize,
    batch_rows: usize,
}

impl RecordReader {
    /// Reads `files` in order, `batch_rows` records at a time; every record
    /// must have `u_len` and `v_len` factor values.
    pub fn new(files: Vec<PathBuf>, u_len: usize, v_len: usize, batch_rows: usize) -> Self {
        Self {
            files: files.into_iter(),
            current: None,
            u_len,
            v_len,
            batch_rows: batch_rows.max(1),
        }
    }

    fn convert(&self, path: &Path, batch: &RecordBatch) -> Result<Records> {
        let mut r = Records {
            step: i64s(batch, path, col::STEP)?,
            epoch: i32s(batch, path, col::EPOCH)?,
            instance_id: nullable::<Int64Type>(batch, path, col::INSTANCE_ID)?,
            label: nullable::<Int32Type>(batch, path, col::LABEL)?,
            u: Vec::new(),
            v: Vec::new(),
        };
        list_f64(batch, path, col::U, self.u_len, &mut r.u)?;
        list_f64(batch, path, col::V, self.v_len, &mut r.v)?;
        Ok(r)
    }
}

impl Iterator for RecordReader {
    type Item = Result<Records>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((path, reader)) = &mut self.current {
                match reader.next() {
                    Some(Ok(batch)) => {
                        let path = path.clone();
                        return Some(self.convert(&path, &batch));
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
                Ok(reader) => self.current = Some((path, reader)),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
