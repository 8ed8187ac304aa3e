//! The arithmetic of the `linear` kind (`z = W a + b`).
//!
//! Factor records (`ΔW = v uᵀ`, `Δb = v`): with `U` (R×in) and `V` (R×out)
//! the records' factors and `A` (Q×in), `P` (Q×out) the probes', `S = U Aᵀ
//! + 1` and `T = V Pᵀ` give `dot = T ∘ S` and `norm = ‖v‖·|S|` (without
//! bias the `+1` is dropped).
//!
//! Whole updates (batch mode: a record is `[vec ΔW, Δb]` of a step): `C = A
//! ΔWᵀ + 1 Δbᵀ` (Q×out), one GEMM per record, gives `dot = rowsum(C ∘ P)`
//! and `norm = ‖C‖` per row.
//!
//! Over a sequence of `T > 1` positions, or with a variable number of them
//! (a ragged layer), a linear layer is a [`Patches`] layer
//! (`over_positions`): `K = in`, `C = out`, `P` the positions of each
//! record and probe, position-major.
use super::patches::{Layout, Patches};
use super::{
    FeatureKind, Geometry, ProbeFeatures, RecordFeatures, deltas, matrix, shape_error, view2,
    view2_mut,
};
use crate::Result;
use crate::probes::Probes;
use crate::records::Records;
use crate::weights::LayerWeights;
use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, Axis};
use reptrace_format::{LinearSpec, Storage};

/// The shape of a Linear layer: W of `out × inp`, a bias of `out` or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Dims {
    pub(super) inp: usize,
    pub(super) out: usize,
    pub(super) bias: bool,
}

/// The [`Patches`] of a linear layer over several positions (or with whole
/// updates in its instance-mode records); `batch` in a batch-mode run.
pub(super) fn over_positions(spec: &LinearSpec, batch: bool) -> Patches {
    Patches {
        out: spec.out_features,
        k: spec.in_features,
        groups: 1,
        positions: spec.positions,
        bias: spec.bias,
        full: batch || spec.storage == Storage::Full,
        layout: Layout::Positions,
    }
}

/// f64 values per probe: `a` and `p`.
pub(super) fn probe_feature_len(dims: Dims) -> usize {
    dims.inp + dims.out
}

/// f64 values per record: `u`, scaled `v` and `‖scaled v‖` (factors), or
/// `[vec ΔW, Δb]` plus `out` of work space (`full`).
pub(super) fn record_feature_len(dims: Dims, full: bool) -> usize {
    if full {
        dims.inp * dims.out + if dims.bias { dims.out } else { 0 } + dims.out
    } else {
        dims.inp + dims.out + 1
    }
}

/// `A` (Q×in) and `P` (Q×out).
pub(super) fn probe_features(dims: Dims, probes: &Probes) -> Result<ProbeFeatures> {
    let q = probes.len();
    Ok(ProbeFeatures {
        first: view2((q, dims.inp), &probes.a)?.to_owned(),
        second: view2((q, dims.out), &probes.p)?.to_owned(),
        factors: None,
    })
}

/// Appends `[vec(s v uᵀ), s v]` of the factor records at `rows` to `out`.
pub(super) fn factor_deltas(
    dims: Dims,
    recs: &Records,
    scales: &[f64],
    rows: &[usize],
    out: &mut Vec<f64>,
) {
    let bias = dims.bias;
    for &i in rows {
        let (u, v) = (recs.u_of(i), recs.v_of(i));
        for &vo in v {
            let vs = vo * scales[i];
            out.extend(u.iter().map(|&ui| vs * ui));
        }
        if bias {
            out.extend(v.iter().map(|&vo| vo * scales[i]));
        }
    }
}

/// Adds the scaled factor records of `recs` to `sum`: `Σ ΔW = Vsᵀ U`, one
/// GEMM per batch.
pub(super) fn accumulate_factors(
    dims: Dims,
    recs: &Records,
    scales: &[f64],
    sum: &mut [f64],
) -> Result<()> {
    let Dims { inp, out, .. } = dims;
    let r = recs.len();
    let u = view2((r, inp), &recs.u)?;
    let mut vs = view2((r, out), &recs.v)?.to_owned();
    for (mut row, s) in vs.rows_mut().into_iter().zip(scales) {
        row *= *s;
    }
    let (w, b) = sum.split_at_mut(out * inp);
    general_mat_mul(1.0, &vs.t(), &u, 1.0, &mut view2_mut((out, inp), w)?);
    if !b.is_empty() {
        for (b, x) in b.iter_mut().zip(vs.sum_axis(Axis(0))) {
            *b += x;
        }
    }
    Ok(())
}

/// Whole updates: `[vec ΔW, Δb]` per record.
pub(super) fn full_record_features(
    geom: &Geometry,
    dims: Dims,
    recs: &Records,
    scales: &[f64],
    rows: &[usize],
) -> Result<RecordFeatures> {
    Ok(RecordFeatures {
        first: deltas(geom, recs, scales, rows)?,
        second: Array2::zeros((rows.len(), 0)),
        v_norm: Vec::new(),
        bias: dims.bias,
        kind: FeatureKind::LinearFull(dims),
        factors: Vec::new(),
    })
}

/// Factor records: `U`, scaled `V` and `‖scaled v‖`.
pub(super) fn factor_record_features(
    dims: Dims,
    recs: &Records,
    scales: &[f64],
    rows: &[usize],
) -> Result<RecordFeatures> {
    let Dims { inp, out, bias } = dims;
    let r = rows.len();
    let mut u = Vec::with_capacity(r * inp);
    let mut v = Vec::with_capacity(r * out);
    let mut v_norm = Vec::with_capacity(r);
    for &row in rows {
        u.extend_from_slice(recs.u_of(row));
        let s = scales[row];
        let vr = recs.v_of(row);
        v.extend(vr.iter().map(|x| x * s));
        v_norm.push(s.abs() * vr.iter().map(|x| x * x).sum::<f64>().sqrt());
    }
    Ok(RecordFeatures {
        first: matrix((r, inp), u)?,
        second: matrix((r, out), v)?,
        v_norm,
        bias,
        kind: FeatureKind::LinearFactors,
        factors: Vec::new(),
    })
}

/// Factor records, every pair: from `first = S = A Uᵀ` and `second = T = P
/// Vᵀ`.
pub(super) fn factor_pairs(
    recs: &RecordFeatures,
    first: Array2<f64>,
    second: Array2<f64>,
) -> (Array2<f64>, Array2<f64>) {
    let mut s = first;
    if recs.bias {
        s += 1.0;
    }
    let dot = &second * &s;
    let mut norm = s.mapv(f64::abs);
    for mut row in norm.rows_mut() {
        row.iter_mut()
            .zip(&recs.v_norm)
            .for_each(|(x, vn)| *x *= vn);
    }
    (dot, norm)
}

/// Factor records, one pair: from `first = u·a` and `second = v·p` of
/// record `r`.
pub(super) fn factor_pair(recs: &RecordFeatures, first: f64, second: f64, r: usize) -> (f64, f64) {
    let s = if recs.bias { first + 1.0 } else { first };
    (second * s, recs.v_norm[r] * s.abs())
}

/// Whole updates, every pair (probe-major).
pub(super) fn full_pairs(
    recs: &RecordFeatures,
    probes: &ProbeFeatures,
    dims: Dims,
) -> Result<(Array2<f64>, Array2<f64>)> {
    let (q, r) = (probes.first.nrows(), recs.len());
    let mut dot = Array2::zeros((q, r));
    let mut norm = Array2::zeros((q, r));
    for i in 0..r {
        let c = full_outputs(recs, probes, dims, i)?;
        for (k, (row, p)) in c.rows().into_iter().zip(probes.second.rows()).enumerate() {
            dot[[k, i]] = row.dot(&p);
            norm[[k, i]] = row.dot(&row).sqrt();
        }
    }
    Ok((dot, norm))
}

/// Whole updates, record `r` with probe `q`.
pub(super) fn full_pair(
    recs: &RecordFeatures,
    probes: &ProbeFeatures,
    dims: Dims,
    r: usize,
    q: usize,
) -> (f64, f64) {
    let Dims { inp, out, .. } = dims;
    let d = recs.first.row(r);
    let a = probes.first.row(q);
    let p = probes.second.row(q);
    let (mut dot, mut n2) = (0.0, 0.0);
    for o in 0..out {
        let w = d.slice(ndarray::s![o * inp..(o + 1) * inp]);
        let mut c = w.dot(&a);
        if recs.bias {
            c += d[out * inp + o];
        }
        dot += c * p[o];
        n2 += c * c;
    }
    (dot, n2.sqrt())
}

/// Whole update `i` applied to every probe: `A ΔWᵀ + 1 Δbᵀ` (Q×out).
fn full_outputs(
    recs: &RecordFeatures,
    probes: &ProbeFeatures,
    dims: Dims,
    i: usize,
) -> Result<Array2<f64>> {
    let Dims { inp, out, .. } = dims;
    let d = recs.first.row(i);
    let w = d.slice(ndarray::s![..out * inp]);
    let w = w
        .to_shape((out, inp))
        .map_err(|e| shape_error((out, inp), w.len(), e))?;
    let mut c = probes.first.dot(&w.t());
    if recs.bias {
        let b = d.slice(ndarray::s![out * inp..]);
        for mut row in c.rows_mut() {
            row += &b;
        }
    }
    Ok(c)
}

/// The layer's output `c = R a + r_b` for a weight change `R`.
pub(super) fn direct(dims: Dims, delta: &LayerWeights, a: &[f64]) -> Vec<f64> {
    let Dims { inp, out, bias } = dims;
    (0..out)
        .map(|o| {
            let w = &delta.weight[o * inp..(o + 1) * inp];
            let z: f64 = w.iter().zip(a).map(|(x, y)| x * y).sum();
            if bias { z + delta.bias[o] } else { z }
        })
        .collect()
}
