//! The arithmetic of attribution: contributions of a batch of update records
//! to a set of probes, as a few matrix products (ndarray, f64).
//!
//! **Linear** (`z = W a + b`, record `ΔW = v uᵀ`, `Δb = v`): with `U` (R×in)
//! and `V` (R×out) the records' factors and `A` (Q×in), `P` (Q×out) the
//! probes', `S = U Aᵀ + 1` and `T = V Pᵀ` give `dot = T ∘ S` and
//! `norm = ‖v‖·|S|` (without bias the `+1` is dropped).
//!
//! **Conv2d**: a record's update is materialised as `ΔW` (C_out×K, K =
//! C_in·kh·kw; from factors `ΔW = V Uᵀ`) and `Δb`. With the probe patches
//! `A = unfold(a)` (K×P) and `c = ΔW A + Δb 1ᵀ`:
//! - `dot = ⟨c, p⟩ = ⟨ΔW, p Aᵀ⟩ + ⟨Δb, p 1⟩`: one product of the records'
//!   `[vec ΔW, Δb]` with the probes' `[vec(p Aᵀ), p 1]`;
//! - `‖c‖² = ⟨ΔWᵀΔW, A Aᵀ⟩ + 2 (ΔWᵀΔb)·(A 1) + P ‖Δb‖²`: one product of
//!   per-record features (upper triangle of the Gram matrix ΔWᵀΔW, off-
//!   diagonal doubled) with per-probe features (upper triangle of A Aᵀ).
//!
//! Both cost O(K²) per record–probe pair instead of the O(C_out·K·P) of
//! forming `c`, and run as GEMMs over whole batches.
//!
//! **Linear, whole updates** (batch mode: a record is `[vec ΔW, Δb]` of a
//! step): `C = A ΔWᵀ + 1 Δbᵀ` (Q×out), one GEMM per record, gives
//! `dot = rowsum(C ∘ P)` and `norm = ‖C‖` per row.
use crate::probes::Probes;
use crate::records::Records;
use crate::weights::LayerWeights;
use crate::{Error, Result};
use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use reptrace_format::{Conv2dSpec, Mode, Storage, TracedLayer};

/// A row-major matrix view of `data`, which must have exactly `shape` elements.
fn view2(shape: (usize, usize), data: &[f64]) -> Result<ArrayView2<'_, f64>> {
    ArrayView2::from_shape(shape, data).map_err(|e| shape_error(shape, data.len(), e))
}

fn view2_mut(shape: (usize, usize), data: &mut [f64]) -> Result<ArrayViewMut2<'_, f64>> {
    let n = data.len();
    ArrayViewMut2::from_shape(shape, data).map_err(|e| shape_error(shape, n, e))
}

fn matrix(shape: (usize, usize), data: Vec<f64>) -> Result<Array2<f64>> {
    let n = data.len();
    Array2::from_shape_vec(shape, data).map_err(|e| shape_error(shape, n, e))
}

fn shape_error(shape: (usize, usize), n: usize, e: ndarray::ShapeError) -> Error {
    Error::Internal(format!(
        "{n} values do not make a {}×{} matrix: {e}",
        shape.0, shape.1
    ))
}

/// The shape of a traced layer, as the arithmetic needs it.
#[derive(Debug, Clone, PartialEq)]
pub enum Geometry {
    /// `full`: records hold `[vec ΔW, Δb]` (batch mode), else factors.
    Linear {
        /// Input features (columns of W).
        inp: usize,
        /// Output features (rows of W).
        out: usize,
        /// Whether the layer has a bias.
        bias: bool,
        /// Whether records hold the whole update rather than factors.
        full: bool,
    },
    /// A 2-d convolution; in batch mode its storage is
    /// [`Storage::Full`].
    Conv {
        /// The layer's spec, with the storage its records have.
        spec: Conv2dSpec,
    },
}

impl Geometry {
    /// The geometry of a traced layer in a run of `mode` (batch-mode
    /// records hold whole updates).
    pub fn of(layer: &TracedLayer<'_>, mode: Mode) -> Self {
        match layer {
            TracedLayer::Linear(l) => Geometry::Linear {
                inp: l.in_features,
                out: l.out_features,
                bias: l.bias,
                full: mode == Mode::Batch,
            },
            TracedLayer::Conv2d(c) => {
                let mut spec = (*c).clone();
                if mode == Mode::Batch {
                    spec.storage = Storage::Full;
                }
                Geometry::Conv { spec }
            }
        }
    }

    /// Length of `vec ΔW`.
    pub fn weight_len(&self) -> usize {
        match self {
            Geometry::Linear { inp, out, .. } => out * inp,
            Geometry::Conv { spec } => spec.out_channels * spec.patch_len(),
        }
    }

    /// Length of `Δb` (0 without bias).
    pub fn bias_len(&self) -> usize {
        match self {
            Geometry::Linear { out, bias, .. } => {
                if *bias {
                    *out
                } else {
                    0
                }
            }
            Geometry::Conv { spec } => {
                if spec.bias {
                    spec.out_channels
                } else {
                    0
                }
            }
        }
    }

    /// Length of `[vec ΔW, Δb]`.
    pub fn delta_len(&self) -> usize {
        self.weight_len() + self.bias_len()
    }

    /// Length of the per-pair norm features (Conv2d only).
    fn gram_len(&self) -> usize {
        match self {
            Geometry::Linear { .. } => 0,
            Geometry::Conv { spec } => {
                let k = spec.patch_len();
                k * (k + 1) / 2 + if spec.bias { k + 1 } else { 0 }
            }
        }
    }

    /// f64 values held per probe by [`ProbeFeatures`].
    pub fn probe_feature_len(&self) -> usize {
        match self {
            Geometry::Linear { inp, out, .. } => inp + out,
            Geometry::Conv { .. } => self.delta_len() + self.gram_len(),
        }
    }

    /// f64 values held per record by [`RecordFeatures`] and the work arrays.
    pub fn record_feature_len(&self) -> usize {
        match self {
            Geometry::Linear {
                inp,
                out,
                full: false,
                ..
            } => inp + out + 1,
            Geometry::Linear { out, .. } => self.delta_len() + out,
            Geometry::Conv { .. } => 2 * self.delta_len() + self.gram_len(),
        }
    }
}

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

/// Appends the upper triangle of the symmetric `m` (K×K) to `out`,
/// off-diagonal entries multiplied by `off`.
fn push_upper(m: &Array2<f64>, off: f64, out: &mut Vec<f64>) {
    let k = m.nrows();
    for i in 0..k {
        out.push(m[[i, i]]);
        for j in i + 1..k {
            out.push(off * m[[i, j]]);
        }
    }
}

/// Per-probe features of a set of probes for one layer.
pub struct ProbeFeatures {
    /// Linear: `A` (Q×in). Conv2d: `[vec(p Aᵀ), p 1]` (Q×delta_len).
    first: Array2<f64>,
    /// Linear: `P` (Q×out). Conv2d: Gram features of `A` (Q×gram_len).
    second: Array2<f64>,
}

impl ProbeFeatures {
    /// Computes the features of `probes` (whose `a`, `p` fit `geom`).
    pub fn new(geom: &Geometry, probes: &Probes) -> Result<Self> {
        let q = probes.len();
        match geom {
            Geometry::Linear { inp, out, .. } => Ok(ProbeFeatures {
                first: view2((q, *inp), &probes.a)?.to_owned(),
                second: view2((q, *out), &probes.p)?.to_owned(),
            }),
            Geometry::Conv { spec } => {
                let co = spec.out_channels;
                let positions = spec.positions();
                let mut first = Vec::with_capacity(q * geom.delta_len());
                let mut second = Vec::with_capacity(q * geom.gram_len());
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
                    first: matrix((q, geom.delta_len()), first)?,
                    second: matrix((q, geom.gram_len()), second)?,
                })
            }
        }
    }
}

/// The `[vec ΔW, Δb]` of the records at `rows` (len(rows) × delta_len), each
/// scaled by its displacement scale.
pub fn deltas(
    geom: &Geometry,
    recs: &Records,
    scales: &[f64],
    rows: &[usize],
) -> Result<Array2<f64>> {
    let d = geom.delta_len();
    let mut out = Vec::with_capacity(rows.len() * d);
    match geom {
        Geometry::Linear { full: true, .. } => {
            for &i in rows {
                out.extend(recs.v[i * d..(i + 1) * d].iter().map(|x| x * scales[i]));
            }
        }
        Geometry::Linear {
            inp, out: o, bias, ..
        } => {
            for &i in rows {
                let u = &recs.u[i * inp..(i + 1) * inp];
                let v = &recs.v[i * o..(i + 1) * o];
                for &vo in v {
                    let vs = vo * scales[i];
                    out.extend(u.iter().map(|&ui| vs * ui));
                }
                if *bias {
                    out.extend(v.iter().map(|&vo| vo * scales[i]));
                }
            }
        }
        Geometry::Conv { spec } => match spec.storage {
            Storage::Full => {
                for &i in rows {
                    out.extend(recs.v[i * d..(i + 1) * d].iter().map(|x| x * scales[i]));
                }
            }
            Storage::Factors => {
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
            }
        },
    }
    matrix((rows.len(), d), out)
}

/// Adds the scaled updates of all records of `recs` to `sum` (`[vec ΔW, Δb]`).
pub fn accumulate(geom: &Geometry, recs: &Records, scales: &[f64], sum: &mut [f64]) -> Result<()> {
    let r = recs.len();
    match geom {
        Geometry::Linear {
            inp,
            out,
            full: false,
            ..
        } => {
            // Σ ΔW = Vsᵀ U, one GEMM per batch.
            let u = view2((r, *inp), &recs.u)?;
            let mut vs = view2((r, *out), &recs.v)?.to_owned();
            for (mut row, s) in vs.rows_mut().into_iter().zip(scales) {
                row *= *s;
            }
            let (w, b) = sum.split_at_mut(out * inp);
            general_mat_mul(1.0, &vs.t(), &u, 1.0, &mut view2_mut((*out, *inp), w)?);
            if !b.is_empty() {
                for (b, x) in b.iter_mut().zip(vs.sum_axis(Axis(0))) {
                    *b += x;
                }
            }
        }
        Geometry::Linear { full: true, .. } | Geometry::Conv { .. } => {
            let all: Vec<usize> = (0..r).collect();
            let d = deltas(geom, recs, scales, &all)?;
            for (s, x) in sum.iter_mut().zip(d.sum_axis(Axis(0))) {
                *s += x;
            }
        }
    }
    Ok(())
}

/// Per-record features of a batch (scaled), ready to meet [`ProbeFeatures`].
pub struct RecordFeatures {
    /// Linear: `U` (R×in). Conv2d: `[vec ΔW, Δb]` (R×delta_len).
    first: Array2<f64>,
    /// Linear: scaled `V` (R×out). Conv2d: Gram features (R×gram_len).
    second: Array2<f64>,
    /// Linear: `‖scaled v‖` per record.
    v_norm: Vec<f64>,
    bias: bool,
    kind: FeatureKind,
}

/// Which arithmetic [`RecordFeatures`] use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FeatureKind {
    LinearFactors,
    /// Whole Linear updates, `first` = `[vec ΔW, Δb]`, W of `out × inp`.
    LinearFull {
        inp: usize,
        out: usize,
    },
    Conv,
}

impl RecordFeatures {
    /// Features of the records at `rows` of `recs`.
    pub fn new(geom: &Geometry, recs: &Records, scales: &[f64], rows: &[usize]) -> Result<Self> {
        let r = rows.len();
        match geom {
            Geometry::Linear {
                inp,
                out,
                bias,
                full: true,
            } => Ok(RecordFeatures {
                first: deltas(geom, recs, scales, rows)?,
                second: Array2::zeros((r, 0)),
                v_norm: Vec::new(),
                bias: *bias,
                kind: FeatureKind::LinearFull {
                    inp: *inp,
                    out: *out,
                },
            }),
            Geometry::Linear {
                inp,
                out,
                bias,
                full: false,
            } => {
                let mut u = Vec::with_capacity(r * inp);
                let mut v = Vec::with_capacity(r * out);
                let mut v_norm = Vec::with_capacity(r);
                for &row in rows {
                    u.extend_from_slice(&recs.u[row * inp..(row + 1) * inp]);
                    let s = scales[row];
                    let vr = &recs.v[row * out..(row + 1) * out];
                    v.extend(vr.iter().map(|x| x * s));
                    v_norm.push(s.abs() * vr.iter().map(|x| x * x).sum::<f64>().sqrt());
                }
                Ok(RecordFeatures {
                    first: matrix((r, *inp), u)?,
                    second: matrix((r, *out), v)?,
                    v_norm,
                    bias: *bias,
                    kind: FeatureKind::LinearFactors,
                })
            }
            Geometry::Conv { spec } => {
                let all = deltas(geom, recs, scales, rows)?;
                let k = spec.patch_len();
                let co = spec.out_channels;
                let mut gram = Vec::with_capacity(r * geom.gram_len());
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
                    second: matrix((r, geom.gram_len()), gram)?,
                    v_norm: Vec::new(),
                    bias: spec.bias,
                    kind: FeatureKind::Conv,
                })
            }
        }
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.first.nrows()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.first.nrows() == 0
    }

    /// `dot` and `norm` of every probe (rows) with every record (columns):
    /// probe-major, the order contribution rows are written in.
    pub fn all_pairs(&self, probes: &ProbeFeatures) -> Result<(Array2<f64>, Array2<f64>)> {
        if let FeatureKind::LinearFull { .. } = self.kind {
            let (q, r) = (probes.first.nrows(), self.len());
            let mut dot = Array2::zeros((q, r));
            let mut norm = Array2::zeros((q, r));
            for i in 0..r {
                let c = self.linear_full_outputs(probes, i)?;
                for (k, (row, p)) in c.rows().into_iter().zip(probes.second.rows()).enumerate() {
                    dot[[k, i]] = row.dot(&p);
                    norm[[k, i]] = row.dot(&row).sqrt();
                }
            }
            return Ok((dot, norm));
        }
        let first = probes.first.dot(&self.first.t());
        let second = probes.second.dot(&self.second.t());
        if self.kind == FeatureKind::LinearFactors {
            // Linear: first = S = A Uᵀ, second = T = P Vᵀ.
            let mut s = first;
            if self.bias {
                s += 1.0;
            }
            let dot = &second * &s;
            let mut norm = s.mapv(f64::abs);
            for mut row in norm.rows_mut() {
                row.iter_mut()
                    .zip(&self.v_norm)
                    .for_each(|(x, vn)| *x *= vn);
            }
            Ok((dot, norm))
        } else {
            Ok((first, second.mapv(|x| x.max(0.0).sqrt())))
        }
    }

    /// `dot` and `norm` of record `r` with probe `q`.
    pub fn pair(&self, probes: &ProbeFeatures, r: usize, q: usize) -> (f64, f64) {
        if let FeatureKind::LinearFull { inp, out } = self.kind {
            let d = self.first.row(r);
            let a = probes.first.row(q);
            let p = probes.second.row(q);
            let (mut dot, mut n2) = (0.0, 0.0);
            for o in 0..out {
                let w = d.slice(ndarray::s![o * inp..(o + 1) * inp]);
                let mut c = w.dot(&a);
                if self.bias {
                    c += d[out * inp + o];
                }
                dot += c * p[o];
                n2 += c * c;
            }
            return (dot, n2.sqrt());
        }
        let first = self.first.row(r).dot(&probes.first.row(q));
        let second = self.second.row(r).dot(&probes.second.row(q));
        if self.kind == FeatureKind::LinearFactors {
            let s = if self.bias { first + 1.0 } else { first };
            (second * s, self.v_norm[r] * s.abs())
        } else {
            (first, second.max(0.0).sqrt())
        }
    }
}

impl RecordFeatures {
    /// Whole Linear update `i` applied to every probe: `A ΔWᵀ + 1 Δbᵀ` (Q×out).
    fn linear_full_outputs(&self, probes: &ProbeFeatures, i: usize) -> Result<Array2<f64>> {
        let FeatureKind::LinearFull { inp, out } = self.kind else {
            return Err(Error::Internal("not a whole-update Linear layer".into()));
        };
        let d = self.first.row(i);
        let w = d.slice(ndarray::s![..out * inp]);
        let w = w
            .to_shape((out, inp))
            .map_err(|e| shape_error((out, inp), w.len(), e))?;
        let mut c = probes.first.dot(&w.t());
        if self.bias {
            let b = d.slice(ndarray::s![out * inp..]);
            for mut row in c.rows_mut() {
                row += &b;
            }
        }
        Ok(c)
    }
}

/// The contribution `c = R ⊛ a + r_b` of a weight change (the residual) to a
/// probe: `(dot, norm)` with its `p`.
pub fn direct(geom: &Geometry, delta: &LayerWeights, a: &[f64], p: &[f64]) -> Result<(f64, f64)> {
    let c: Vec<f64> = match geom {
        Geometry::Linear { inp, out, bias, .. } => (0..*out)
            .map(|o| {
                let w = &delta.weight[o * inp..(o + 1) * inp];
                let z: f64 = w.iter().zip(a).map(|(x, y)| x * y).sum();
                if *bias { z + delta.bias[o] } else { z }
            })
            .collect(),
        Geometry::Conv { spec } => {
            let w = view2((spec.out_channels, spec.patch_len()), &delta.weight)?;
            let mut c = w.dot(&unfold(spec, a));
            if spec.bias {
                for (mut row, b) in c.rows_mut().into_iter().zip(&delta.bias) {
                    row += *b;
                }
            }
            c.iter().copied().collect()
        }
    };
    let dot = c.iter().zip(p).map(|(x, y)| x * y).sum();
    let norm = c.iter().map(|x| x * x).sum::<f64>().sqrt();
    Ok((dot, norm))
}

/// Splits `[vec ΔW, Δb]` into a [`LayerWeights`].
pub fn split_delta(geom: &Geometry, sum: &[f64]) -> LayerWeights {
    let (w, b) = sum.split_at(geom.weight_len().min(sum.len()));
    LayerWeights {
        weight: w.to_vec(),
        bias: b.to_vec(),
    }
}

/// `cosine = dot / (norm · ‖p‖)`, 0 when either norm is 0.
pub fn cosine(dot: f64, norm: f64, p_norm: f64) -> f64 {
    let d = norm * p_norm;
    if d > 0.0 { dot / d } else { 0.0 }
}
