//! The arithmetic of the `layer_norm` and `rms_norm` kinds: the affine part
//! `z_t = γ ⊙ x̂_t + β` over the normalized input `x̂` (T×D).
//!
//! Records are always whole updates `[Δγ, Δβ]` (D each, Δβ only with a
//! bias). With `c_t = Δγ ⊙ x̂_t + Δβ`:
//! - `dot = ⟨Δγ, Σ_t p_t ⊙ x̂_t⟩ + ⟨Δβ, Σ_t p_t⟩`: one product of the
//!   records' `[Δγ, Δβ]` with the probes' `[Σ_t p ⊙ x̂, Σ_t p]`;
//! - `‖c‖² = Σ_d Δγ_d² Σ_t x̂_td² + 2 Δγ_d Δβ_d Σ_t x̂_td + T Δβ_d²`: one
//!   product of the records' `[Δγ², Δγ ⊙ Δβ, ‖Δβ‖²]` with the probes'
//!   `[Σ_t x̂², 2 Σ_t x̂, T]`.
//!
//! Both run as GEMMs over whole batches, O(D) per record–probe pair. A
//! probe's positions `T` are read from the length of its `a` (a ragged
//! layer's vary).
use super::{FeatureKind, Geometry, ProbeFeatures, RecordFeatures, deltas, matrix, view2};
use crate::Result;
use crate::probes::Probes;
use crate::records::Records;
use crate::weights::LayerWeights;
use ndarray::{Array2, Axis};

/// The shape of a norm layer's affine part: γ (and β with a bias) of `dim`
/// = D values, over `positions` = T rows of the normalized input (the
/// spec's; a probe holds its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Dims {
    pub(super) dim: usize,
    pub(super) positions: usize,
    pub(super) bias: bool,
}

/// Length of `[Δγ, Δβ]`.
fn delta_len(dims: Dims) -> usize {
    if dims.bias { 2 * dims.dim } else { dims.dim }
}

/// Length of the norm features: `Σ_t x̂²` (D), plus `2 Σ_t x̂` (D) and `T`
/// with a bias.
fn gram_len(dims: Dims) -> usize {
    if dims.bias {
        2 * dims.dim + 1
    } else {
        dims.dim
    }
}

/// f64 values per probe: `[Σ_t p ⊙ x̂, Σ_t p]` and the norm features.
pub(super) fn probe_feature_len(dims: Dims) -> usize {
    delta_len(dims) + gram_len(dims)
}

/// f64 values per record: `[Δγ, Δβ]` and the norm features, plus one
/// `[Δγ, Δβ]` of work space.
pub(super) fn record_feature_len(dims: Dims) -> usize {
    2 * delta_len(dims) + gram_len(dims)
}

/// `[Σ_t p ⊙ x̂, Σ_t p]` (Q×delta_len) and `[Σ_t x̂², 2 Σ_t x̂, T]`
/// (Q×gram_len).
pub(super) fn probe_features(dims: Dims, probes: &Probes) -> Result<ProbeFeatures> {
    let q = probes.len();
    let mut first = Vec::with_capacity(q * delta_len(dims));
    let mut second = Vec::with_capacity(q * gram_len(dims));
    for i in 0..q {
        let a = by_position(dims, probes.a(i))?;
        let p = view2(a.dim(), probes.p(i))?;
        first.extend((&p * &a).sum_axis(Axis(0)));
        if dims.bias {
            first.extend(p.sum_axis(Axis(0)));
        }
        second.extend(a.mapv(|x| x * x).sum_axis(Axis(0)));
        if dims.bias {
            second.extend(a.sum_axis(Axis(0)).iter().map(|x| 2.0 * x));
            second.push(a.nrows() as f64);
        }
    }
    Ok(ProbeFeatures {
        first: matrix((q, delta_len(dims)), first)?,
        second: matrix((q, gram_len(dims)), second)?,
        factors: None,
    })
}

/// `x` (T×D, row-major) of a probe, T read from its length.
fn by_position(dims: Dims, x: &[f64]) -> Result<ndarray::ArrayView2<'_, f64>> {
    view2((x.len().checked_div(dims.dim).unwrap_or(0), dims.dim), x)
}

/// `[Δγ, Δβ]` and `[Δγ², Δγ ⊙ Δβ, ‖Δβ‖²]` of every record at `rows`.
pub(super) fn record_features(
    geom: &Geometry,
    dims: Dims,
    recs: &Records,
    scales: &[f64],
    rows: &[usize],
) -> Result<RecordFeatures> {
    let all = deltas(geom, recs, scales, rows)?;
    let d = dims.dim;
    let mut second = Vec::with_capacity(rows.len() * gram_len(dims));
    for row in all.rows() {
        let (g, b) = row.split_at(Axis(0), d);
        second.extend(g.iter().map(|x| x * x));
        if dims.bias {
            second.extend(g.iter().zip(&b).map(|(x, y)| x * y));
            second.push(b.dot(&b));
        }
    }
    Ok(RecordFeatures {
        first: all,
        second: matrix((rows.len(), gram_len(dims)), second)?,
        v_norm: Vec::new(),
        bias: dims.bias,
        kind: FeatureKind::Norm,
        factors: Vec::new(),
    })
}

/// Every pair, from `first` = the dot and `second` = `‖c‖²`.
pub(super) fn pairs(first: Array2<f64>, second: Array2<f64>) -> (Array2<f64>, Array2<f64>) {
    (first, second.mapv(|x| x.max(0.0).sqrt()))
}

/// One pair, from its dot and `‖c‖²`.
pub(super) fn pair(first: f64, second: f64) -> (f64, f64) {
    (first, second.max(0.0).sqrt())
}

/// The layer's output `c_t = R_γ ⊙ x̂_t + R_β` (T×D, row-major) for a
/// weight change `R` at the normalized input `a`.
pub(super) fn direct(dims: Dims, delta: &LayerWeights, a: &[f64]) -> Result<Vec<f64>> {
    let a = by_position(dims, a)?;
    let g = view2((1, dims.dim), &delta.weight)?;
    let mut c = &a * &g;
    if dims.bias {
        c += &view2((1, dims.dim), &delta.bias)?;
    }
    Ok(c.iter().copied().collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::{Geometry, ProbeFeatures, RecordFeatures, accumulate, deltas, direct};
    use crate::probes::Probes;
    use crate::records::Records;
    use crate::weights::LayerWeights;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use reptrace_format::{Mode, NormSpec, TracedLayer};

    const D: usize = 6;
    const T: usize = 5;
    const EPS: f64 = 1e-5;

    /// Which normalization the probes' `x̂` come from.
    #[derive(Clone, Copy)]
    enum Which {
        LayerNorm,
        RmsNorm,
    }

    fn normal(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// `x̂` of a random input (T×D), normalized per position.
    fn normalized(rng: &mut ChaCha8Rng, which: Which) -> Vec<f64> {
        let x: Vec<f64> = (0..T * D).map(|_| rng.random_range(-3.0..5.0)).collect();
        let mut out = vec![];
        for t in 0..T {
            let row = &x[t * D..(t + 1) * D];
            let mean = row.iter().sum::<f64>() / D as f64;
            match which {
                Which::LayerNorm => {
                    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / D as f64;
                    out.extend(row.iter().map(|v| (v - mean) / (var + EPS).sqrt()));
                }
                Which::RmsNorm => {
                    let ms = row.iter().map(|v| v * v).sum::<f64>() / D as f64;
                    out.extend(row.iter().map(|v| v / (ms + EPS).sqrt()));
                }
            }
        }
        out
    }

    /// Whole-update records `[Δγ, Δβ]` and their scales.
    fn records(rng: &mut ChaCha8Rng, bias: bool, n: usize) -> (Records, Vec<f64>) {
        let len = if bias { 2 * D } else { D };
        let mut recs = Records::default();
        let mut scales = vec![];
        for i in 0..n {
            recs.step.push(i as i64);
            recs.epoch.push(0);
            recs.instance_id.push(Some(i as i64));
            recs.label.push(Some(1));
            recs.push_lists(&[], &normal(rng, len));
            scales.push(rng.random_range(0.5..2.0));
        }
        (recs, scales)
    }

    fn probes(rng: &mut ChaCha8Rng, which: Which, n: usize) -> Probes {
        let mut probes = Probes::default();
        for i in 0..n {
            probes.probe_id.push(i as i64);
            probes.instance_id.push(None);
            probes.label.push(0);
            probes.predicted.push(0);
            let a = normalized(rng, which);
            let p = normal(rng, T * D);
            probes
                .p_norm
                .push(p.iter().map(|x| x * x).sum::<f64>().sqrt());
            probes.push_lists(&a, &p);
        }
        probes
    }

    /// `(dot, norm, ‖c‖‖p‖)` of `c_t = g ⊙ a_t + b` with `p`, by plain loops.
    fn brute(g: &[f64], b: Option<&[f64]>, a: &[f64], p: &[f64]) -> (f64, f64, f64) {
        let (mut dot, mut cc, mut pp) = (0.0, 0.0, 0.0);
        for t in 0..T {
            for d in 0..D {
                let mut c = g[d] * a[t * D + d];
                if let Some(b) = b {
                    c += b[d];
                }
                dot += c * p[t * D + d];
                cc += c * c;
                pp += p[t * D + d] * p[t * D + d];
            }
        }
        (dot, cc.sqrt(), cc.sqrt() * pp.sqrt())
    }

    fn close(x: f64, y: f64, scale: f64) {
        let tol = 1e-9 * scale.max(y.abs()).max(1e-300);
        assert!((x - y).abs() <= tol, "{x} vs {y} (scale {scale})");
    }

    fn check(which: Which, bias: bool, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // normalized_shape [2, 3]: D = 6.
        let spec = NormSpec {
            name: "ln".into(),
            normalized_shape: vec![2, D / 2],
            bias,
            eps: EPS,
            positions: T,
            traced: true,
            ragged: false,
        };
        let layer = match which {
            Which::LayerNorm => TracedLayer::LayerNorm(&spec),
            Which::RmsNorm => TracedLayer::RmsNorm(&spec),
        };
        let geom = Geometry::of(&layer, Mode::Instance).unwrap();
        assert_eq!(geom, Geometry::of(&layer, Mode::Batch).unwrap());
        assert_eq!(
            geom,
            Geometry::Norm {
                dim: D,
                positions: T,
                bias
            }
        );
        assert_eq!(geom.weight_len(), D);
        assert_eq!(geom.bias_len(), if bias { D } else { 0 });
        let (recs, scales) = records(&mut rng, bias, 6);
        let probes = probes(&mut rng, which, 4);
        let len = geom.delta_len();
        // Each record's scaled Δγ, Δβ.
        let scaled = |i: usize| -> Vec<f64> {
            recs.v[i * len..(i + 1) * len]
                .iter()
                .map(|x| x * scales[i])
                .collect()
        };
        let pf = ProbeFeatures::new(&geom, &probes).unwrap();
        let rows = [5, 1, 3];
        let rf = RecordFeatures::new(&geom, &recs, &scales, &rows).unwrap();
        let (dot, norm) = rf.all_pairs(&pf).unwrap();
        assert_eq!(dot.dim(), (probes.len(), rows.len()));
        for q in 0..probes.len() {
            for (j, &i) in rows.iter().enumerate() {
                let w = scaled(i);
                let b = bias.then(|| &w[D..]);
                let (d, n, scale) = brute(&w[..D], b, probes.a(q), probes.p(q));
                close(dot[[q, j]], d, scale);
                close(norm[[q, j]], n, n);
                let (d1, n1) = rf.pair(&pf, j, q);
                close(d1, d, scale);
                close(n1, n, n);
            }
        }
        let d = deltas(&geom, &recs, &scales, &rows).unwrap();
        for (j, &i) in rows.iter().enumerate() {
            for (x, y) in d.row(j).iter().zip(scaled(i)) {
                close(*x, y, 1.0);
            }
        }
        let start = normal(&mut rng, len);
        let mut sum = start.clone();
        accumulate(&geom, &recs, &scales, &mut sum).unwrap();
        for k in 0..len {
            let want = start[k] + (0..recs.len()).map(|i| scaled(i)[k]).sum::<f64>();
            close(sum[k], want, 1.0);
        }
        let r = normal(&mut rng, len);
        let delta = LayerWeights {
            weight: r[..D].to_vec(),
            bias: r[D..].to_vec(),
        };
        for q in 0..probes.len() {
            let (d, n) = direct(&geom, &delta, probes.a(q), probes.p(q)).unwrap();
            let b = bias.then(|| &r[D..]);
            let (bd, bn, scale) = brute(&r[..D], b, probes.a(q), probes.p(q));
            close(d, bd, scale);
            close(n, bn, bn);
        }
    }

    #[test]
    fn layer_norm_with_bias_matches_brute_force() {
        check(Which::LayerNorm, true, 11);
    }

    #[test]
    fn layer_norm_without_bias_matches_brute_force() {
        check(Which::LayerNorm, false, 12);
    }

    #[test]
    fn rms_norm_matches_brute_force() {
        check(Which::RmsNorm, false, 13);
    }
}
