//! The arithmetic of the `conv2d` kind.
//!
//! A record's update is materialised as `ΔW` (C_out×K, K = C_in·kh·kw; from
//! factors `ΔW = V Uᵀ`) and `Δb`. With the probe patches `A = unfold(a)`
//! (K×P) and `c = ΔW A + Δb 1ᵀ`:
//! - `dot = ⟨c, p⟩ = ⟨ΔW, p Aᵀ⟩ + ⟨Δb, p 1⟩`: one product of the records'
//!   `[vec ΔW, Δb]` with the probes' `[vec(p Aᵀ), p 1]`;
//! - `‖c‖² = ⟨ΔWᵀΔW, A Aᵀ⟩ + 2 (ΔWᵀΔb)·(A 1) + P ‖Δb‖²`: one product of
//!   per-record features (upper triangle of the Gram matrix ΔWᵀΔW, off-
//!   diagonal doubled) with per-probe features (upper triangle of A Aᵀ).
//!
//! Both cost O(K²) per record–probe pair instead of the O(C_out·K·P) of
//! forming `c`, and run as GEMMs over whole batches.
use super::{
    FeatureKind, Geometry, ProbeFeatures, RecordFeatures, deltas, matrix, push_upper, shape_error,
    view2,
};
use crate::Result;
use crate::probes::Probes;
use crate::records::Records;
use crate::weights::LayerWeights;
use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, Axis};
use reptrace_format::{Conv2dSpec, LayerKind};

/// `unfold(a)`: the im2col matrix of a Conv2d input (K × P), rows ordered
/// `(c_in, kh, kw)`, zero where the kernel overlaps the padding.
pub fn unfold(spec: &Conv2dSpec, a: &[f64]) -> Array2<f64> {
    let [kh, kw] = spec.kernel;
    let [sh, sw] = spec.stride;
    let [ph, pw] = spec.padding;
    let [dh, dw] = spec.dilation;
    let [h, w] = spec.input_hw;
    let [ho, wo] = spec.output_hw;
    let mut out = Array2::zeros((spec.patch_len(), ho * wo));
    for c in 0..spec.in_channels {
        for i in 0..kh {
            for j in 0..kw {
                let row = (c * kh + i) * kw + j;
                for oy in 0..ho {
                    let y = (oy * sh + i * dh) as isize - ph as isize;
                    if y < 0 || y >= h as isize {
                        continue;
                    }
                    for ox in 0..wo {
                        let x = (ox * sw + j * dw) as isize - pw as isize;
                        if x < 0 || x >= w as isize {
                            continue;
                        }
                        out[[row, oy * wo + ox]] = a[c * h * w + y as usize * w + x as usize];
                    }
                }
            }
        }
    }
    out
}

/// Length of the per-pair norm features: the upper triangle of a K×K Gram
/// matrix, plus `K + 1` with a bias.
pub(super) fn gram_len(spec: &Conv2dSpec) -> usize {
    let k = spec.patch_len();
    k * (k + 1) / 2 + if spec.bias { k + 1 } else { 0 }
}

/// f64 values per probe: `[vec(p Aᵀ), p 1]` and the Gram features of `A`.
pub(super) fn probe_feature_len(spec: &Conv2dSpec) -> usize {
    spec.update_len() + gram_len(spec)
}

/// f64 values per record: `[vec ΔW, Δb]` and the Gram features, plus one
/// `[vec ΔW, Δb]` of work space.
pub(super) fn record_feature_len(spec: &Conv2dSpec) -> usize {
    2 * spec.update_len() + gram_len(spec)
}

/// `[vec(p Aᵀ), p 1]` (Q×delta_len) and the Gram features of `A`
/// (Q×gram_len).
pub(super) fn probe_features(spec: &Conv2dSpec, probes: &Probes) -> Result<ProbeFeatures> {
    let q = probes.len();
    let co = spec.out_channels;
    let positions = spec.positions();
    let mut first = Vec::with_capacity(q * spec.update_len());
    let mut second = Vec::with_capacity(q * gram_len(spec));
    for i in 0..q {
        let a = unfold(spec, probes.a(i));
        let p = view2((co, positions), probes.p(i))?;
        // p Aᵀ (C_out × K), row-major like the stored weight.
        first.extend(p.dot(&a.t()).iter());
        if spec.bias {
            first.extend(p.sum_axis(Axis(1)).iter());
        }
        push_upper(&a.dot(&a.t()), 1.0, &mut second);
        if spec.bias {
            second.extend(a.sum_axis(Axis(1)).iter());
            second.push(positions as f64);
        }
    }
    Ok(ProbeFeatures {
        first: matrix((q, spec.update_len()), first)?,
        second: matrix((q, gram_len(spec)), second)?,
    })
}

/// Appends `[vec(s V Uᵀ), s V 1]` of the factor records at `rows` to `out`.
pub(super) fn factor_deltas(
    spec: &Conv2dSpec,
    recs: &Records,
    scales: &[f64],
    rows: &[usize],
    out: &mut Vec<f64>,
) -> Result<()> {
    let k = spec.patch_len();
    let co = spec.out_channels;
    let positions = spec.positions();
    let (ul, vl) = (k * positions, co * positions);
    let mut w = Array2::zeros((co, k));
    for &i in rows {
        let u = view2((k, positions), &recs.u[i * ul..(i + 1) * ul])?;
        let v = view2((co, positions), &recs.v[i * vl..(i + 1) * vl])?;
        general_mat_mul(scales[i], &v, &u.t(), 0.0, &mut w);
        out.extend(w.iter());
        if spec.bias {
            out.extend(v.rows().into_iter().map(|r| scales[i] * r.sum()));
        }
    }
    Ok(())
}

/// `[vec ΔW, Δb]` and the Gram features of every record at `rows`.
pub(super) fn record_features(
    geom: &Geometry,
    spec: &Conv2dSpec,
    recs: &Records,
    scales: &[f64],
    rows: &[usize],
) -> Result<RecordFeatures> {
    let all = deltas(geom, recs, scales, rows)?;
    let k = spec.patch_len();
    let co = spec.out_channels;
    let mut gram = Vec::with_capacity(rows.len() * gram_len(spec));
    for row in all.rows() {
        let w = row.slice(ndarray::s![..co * k]);
        let w = w
            .to_shape((co, k))
            .map_err(|e| shape_error((co, k), w.len(), e))?;
        push_upper(&w.t().dot(&w), 2.0, &mut gram);
        if spec.bias {
            let b = row.slice(ndarray::s![co * k..]);
            gram.extend(w.t().dot(&b).iter().map(|x| 2.0 * x));
            gram.push(b.dot(&b));
        }
    }
    Ok(RecordFeatures {
        first: all,
        second: matrix((rows.len(), gram_len(spec)), gram)?,
        v_norm: Vec::new(),
        bias: spec.bias,
        kind: FeatureKind::Conv,
    })
}

/// Every pair, from `first = ⟨ΔW, p Aᵀ⟩ + ⟨Δb, p 1⟩` (the dot) and `second
/// = ‖c‖²`.
pub(super) fn pairs(first: Array2<f64>, second: Array2<f64>) -> (Array2<f64>, Array2<f64>) {
    (first, second.mapv(|x| x.max(0.0).sqrt()))
}

/// One pair, from its dot and `‖c‖²`.
pub(super) fn pair(first: f64, second: f64) -> (f64, f64) {
    (first, second.max(0.0).sqrt())
}

/// The layer's output `c = R ⊛ a + r_b 1ᵀ` (C_out×P, row-major) for a
/// weight change `R`.
pub(super) fn direct(spec: &Conv2dSpec, delta: &LayerWeights, a: &[f64]) -> Result<Vec<f64>> {
    let w = view2((spec.out_channels, spec.patch_len()), &delta.weight)?;
    let mut c = w.dot(&unfold(spec, a));
    if spec.bias {
        for (mut row, b) in c.rows_mut().into_iter().zip(&delta.bias) {
            row += *b;
        }
    }
    Ok(c.iter().copied().collect())
}
