//! Arrow record batches built from the owned rows of the writer's messages.
//!
//! The column layout is `reptrace_format::schema`: `u` and `v` are
//! `List<Float32>` or `List<Float16>` (item field `item`, non-null), so a row
//! of `n × len` row-major values becomes a list array with fixed-length
//! offsets over one flat value buffer (moved, not copied, for f32); a
//! ragged layer's rows take their own lengths (offsets from each row's
//! positions) over the same kind of buffer.
use crate::batch::{
    BatchRows, ExampleRowsOwned, FactorValues, InstanceRows, LayerStepRow, ProbeRows, RowLens,
    StepRowsOwned, UpdateRows, update_norm, update_norm_f16,
};
use crate::{Error, Result};
use arrow_array::types::Float16Type;
use arrow_array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, ListArray,
    PrimitiveArray, RecordBatch, StringArray,
};
use arrow_buffer::{NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, SchemaRef};
use half::f16;
use half::slice::HalfFloatSliceExt;
use reptrace_format::{Dtype, Table, col, schema};
use std::sync::Arc;

fn arrow_err(table: Table, source: arrow_schema::ArrowError) -> Error {
    Error::Arrow {
        table: table.name().to_owned(),
        source,
    }
}

/// A list column of `n` rows over `values`, split as `rows` says.
fn list(
    table: Table,
    field_type: &DataType,
    values: ArrayRef,
    rows: &RowLens,
    n: usize,
) -> Result<ArrayRef> {
    let DataType::List(item) = field_type else {
        return Err(Error::Invalid {
            context: table.name().to_owned(),
            message: format!("schema has {field_type} where a list is expected"),
        });
    };
    let too_many = |what: String| Error::Invalid {
        context: table.name().to_owned(),
        message: format!(
            "{what} exceed the 2^31 values one batch can hold; pass fewer rows per call"
        ),
    };
    let offsets = match rows {
        RowLens::Fixed(len) => {
            let total = len.checked_mul(n).filter(|&t| i32::try_from(t).is_ok());
            if total.is_none() {
                return Err(too_many(format!("{n} rows of {len} values")));
            }
            OffsetBuffer::<i32>::from_repeated_length(*len, n)
        }
        RowLens::Offsets(offsets) => {
            let total = offsets.last().copied().unwrap_or(0);
            let offsets = offsets
                .iter()
                .map(|&o| i32::try_from(o))
                .collect::<std::result::Result<Vec<i32>, _>>()
                .map_err(|_| too_many(format!("{n} rows of {total} values in all")))?;
            OffsetBuffer::new(ScalarBuffer::from(offsets))
        }
    };
    let array =
        ListArray::try_new(item.clone(), offsets, values, None).map_err(|e| arrow_err(table, e))?;
    Ok(Arc::new(array))
}

/// The values as a run of `dtype` stores them: an f16 run's f32 values
/// rounded to f16 (in bulk, with the CPU's half-float instructions where it
/// has them). The recorder refuses f16 values for an f32 run; widened here.
fn stored(dtype: Dtype, values: FactorValues) -> FactorValues {
    match (dtype, values) {
        (Dtype::F16, FactorValues::F32(values)) => {
            let mut out = vec![f16::ZERO; values.len()];
            out.convert_from_f32_slice(&values);
            FactorValues::F16(out)
        }
        (Dtype::F32, FactorValues::F16(values)) => {
            let mut out = vec![0.0; values.len()];
            values.convert_to_f32_slice(&mut out);
            FactorValues::F32(out)
        }
        (_, values) => values,
    }
}

/// Stored values ([`stored`]) as an Arrow array, without copying them.
fn factor_values(values: FactorValues) -> ArrayRef {
    match values {
        FactorValues::F32(values) => Arc::new(Float32Array::new(ScalarBuffer::from(values), None)),
        FactorValues::F16(values) => Arc::new(PrimitiveArray::<Float16Type>::new(
            ScalarBuffer::from(values),
            None,
        )),
    }
}

fn field_type(schema: &SchemaRef, table: Table, name: &str) -> Result<DataType> {
    schema
        .field_with_name(name)
        .map(|f| f.data_type().clone())
        .map_err(|e| arrow_err(table, e))
}

fn batch(table: Table, schema: SchemaRef, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    RecordBatch::try_new(schema, columns).map_err(|e| arrow_err(table, e))
}

/// `instances` rows.
pub(crate) fn instances(rows: InstanceRows) -> Result<RecordBatch> {
    let splits: StringArray = rows.splits.iter().map(|s| Some(s.as_str())).collect();
    batch(
        Table::Instances,
        schema(Table::Instances, Dtype::F32),
        vec![
            Arc::new(Int64Array::from(rows.ids)),
            Arc::new(Int32Array::from(rows.labels)),
            Arc::new(splits),
        ],
    )
}

/// `steps` rows.
pub(crate) fn steps(rows: StepRowsOwned) -> Result<RecordBatch> {
    batch(
        Table::Steps,
        schema(Table::Steps, Dtype::F32),
        vec![
            Arc::new(Int64Array::from(rows.step)),
            Arc::new(Int32Array::from(rows.epoch)),
            Arc::new(Float64Array::from(rows.lr)),
            Arc::new(Int32Array::from(rows.batch_size)),
            Arc::new(Float64Array::from(rows.loss)),
            Arc::new(BooleanArray::from(rows.skipped)),
        ],
    )
}

/// `layer_steps` rows.
pub(crate) fn layer_steps(rows: &[LayerStepRow]) -> Result<RecordBatch> {
    let col = |f: &dyn Fn(&LayerStepRow) -> f64| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<Float64Array>())
    };
    let opt = |f: &dyn Fn(&LayerStepRow) -> Option<f64>| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<Float64Array>())
    };
    batch(
        Table::LayerSteps,
        schema(Table::LayerSteps, Dtype::F32),
        vec![
            Arc::new(rows.iter().map(|r| r.step).collect::<Int64Array>()),
            Arc::new(rows.iter().map(|r| r.epoch).collect::<Int32Array>()),
            Arc::new(
                rows.iter()
                    .map(|r| Some(r.layer.as_str()))
                    .collect::<StringArray>(),
            ),
            Arc::new(rows.iter().map(|r| r.param_group).collect::<Int32Array>()),
            col(&|r| r.lr),
            col(&|r| r.momentum),
            col(&|r| r.dampening),
            Arc::new(
                rows.iter()
                    .map(|r| Some(r.nesterov))
                    .collect::<BooleanArray>(),
            ),
            col(&|r| r.weight_decay),
            col(&|r| r.grad_scale),
            opt(&|r| r.grad_check),
            opt(&|r| r.grad_norm),
            Arc::new(
                rows.iter()
                    .map(|r| Some(r.precision.as_str()))
                    .collect::<StringArray>(),
            ),
            opt(&|r| r.adam.as_ref().map(|a| a.beta1)),
            opt(&|r| r.adam.as_ref().map(|a| a.step_size)),
            preconditioners(rows)?,
        ],
    )
}

/// The nullable `layer_steps.preconditioner` list column (float32).
fn preconditioners(rows: &[LayerStepRow]) -> Result<ArrayRef> {
    let table = Table::LayerSteps;
    let mut offsets = Vec::with_capacity(rows.len() + 1);
    offsets.push(0i32);
    let mut values = Vec::new();
    for r in rows {
        if let Some(a) = &r.adam {
            values.extend_from_slice(&a.preconditioner);
        }
        let end = i32::try_from(values.len()).map_err(|_| Error::Invalid {
            context: table.name().to_owned(),
            message: format!(
                "preconditioners of {} rows exceed the 2^31 values one batch can hold",
                rows.len()
            ),
        })?;
        offsets.push(end);
    }
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let valid = NullBuffer::from(rows.iter().map(|r| r.adam.is_some()).collect::<Vec<_>>());
    let array = ListArray::try_new(
        item,
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        Arc::new(Float32Array::from(values)),
        Some(valid),
    )
    .map_err(|e| arrow_err(table, e))?;
    Ok(Arc::new(array))
}

/// `examples` rows; `loss` widened to f64, `p_label = exp(−loss)` computed
/// in f64.
pub(crate) fn examples(rows: ExampleRowsOwned) -> Result<RecordBatch> {
    let loss: Vec<f64> = rows.loss.iter().map(|&l| f64::from(l)).collect();
    let p_label: Vec<f64> = loss.iter().map(|&l| (-l).exp()).collect();
    batch(
        Table::Examples,
        schema(Table::Examples, Dtype::F32),
        vec![
            Arc::new(Int64Array::from(rows.step)),
            Arc::new(Int32Array::from(rows.epoch)),
            Arc::new(Int64Array::from(rows.ids)),
            Arc::new(Int32Array::from(rows.labels)),
            Arc::new(Float64Array::from(loss)),
            Arc::new(Int32Array::from(rows.predicted)),
            Arc::new(Float64Array::from(p_label)),
        ],
    )
}

/// `updates` rows of one step and layer; `rank`: the writer's rank in a
/// distributed run (column `rank`, null otherwise). Computes `update_norm`
/// when not given, from the values as stored (an f16 run's rounded ones).
pub(crate) fn updates(rows: UpdateRows, dtype: Dtype, rank: Option<i32>) -> Result<RecordBatch> {
    let n = rows.ids.len();
    let (u_values, v_values) = (stored(dtype, rows.u), stored(dtype, rows.v));
    let norms = match rows.norms {
        Some(norms) => norms,
        None => (0..n)
            .map(|i| {
                let (ur, vr) = (rows.u_rows.range(i), rows.v_rows.range(i));
                match (&u_values, &v_values) {
                    (FactorValues::F16(u), FactorValues::F16(v)) => {
                        update_norm_f16(rows.norm, &u[ur], &v[vr])
                    }
                    (u, v) => update_norm(rows.norm, &u.as_f32()[ur], &v.as_f32()[vr]),
                }
            })
            .collect(),
    };
    let schema = schema(Table::Updates, dtype);
    let u_type = field_type(&schema, Table::Updates, col::U)?;
    let v_type = field_type(&schema, Table::Updates, col::V)?;
    let u = list(
        Table::Updates,
        &u_type,
        factor_values(u_values),
        &rows.u_rows,
        n,
    )?;
    let v = list(
        Table::Updates,
        &v_type,
        factor_values(v_values),
        &rows.v_rows,
        n,
    )?;
    batch(
        Table::Updates,
        schema,
        vec![
            Arc::new(Int64Array::from(vec![rows.step; n])),
            Arc::new(Int32Array::from(vec![rows.epoch; n])),
            Arc::new(Int64Array::from(rows.ids)),
            Arc::new(Int32Array::from(rows.labels)),
            u,
            v,
            Arc::new(Float32Array::from(norms)),
            Arc::new(Int32Array::from(vec![rank; n])),
        ],
    )
}

/// `batches` rows of one step.
pub(crate) fn batches(rows: BatchRows) -> Result<RecordBatch> {
    let n = rows.ids.len();
    batch(
        Table::Batches,
        schema(Table::Batches, Dtype::F32),
        vec![
            Arc::new(Int64Array::from(vec![rows.step; n])),
            Arc::new(Int32Array::from(vec![rows.epoch; n])),
            Arc::new(Int64Array::from(rows.ids)),
            Arc::new(Int32Array::from(rows.labels)),
        ],
    )
}

/// `probes` rows of one layer; computes `p_norm`.
pub(crate) fn probes(rows: ProbeRows) -> Result<RecordBatch> {
    let n = rows.probe_ids.len();
    let p_norm: Vec<f64> = (0..n)
        .map(|i| {
            rows.p[rows.p_rows.range(i)]
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let schema = schema(Table::Probes, Dtype::F32);
    let a_type = field_type(&schema, Table::Probes, col::A)?;
    let p_type = field_type(&schema, Table::Probes, col::P)?;
    let a = list(
        Table::Probes,
        &a_type,
        Arc::new(Float64Array::new(ScalarBuffer::from(rows.a), None)),
        &rows.a_rows,
        n,
    )?;
    let p = list(
        Table::Probes,
        &p_type,
        Arc::new(Float64Array::new(ScalarBuffer::from(rows.p), None)),
        &rows.p_rows,
        n,
    )?;
    batch(
        Table::Probes,
        schema,
        vec![
            Arc::new(Int64Array::from(rows.probe_ids)),
            Arc::new(Int64Array::from(rows.instance_ids)),
            Arc::new(Int32Array::from(rows.labels)),
            Arc::new(Int32Array::from(rows.predicted)),
            a,
            p,
            Arc::new(Float64Array::from(p_norm)),
        ],
    )
}
