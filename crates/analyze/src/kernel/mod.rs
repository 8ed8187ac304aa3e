//! The arithmetic of attribution: contributions of a batch of update records
//! to a set of probes, as a few matrix products (ndarray, f64).
//!
//! Each traced layer kind has its own module holding its arithmetic (its
//! probe features, record features, update deltas and direct contribution):
//! [`linear`] (one position) and [`patches`], the arithmetic of every layer
//! whose weight multiplies patches of its input (`ΔW ⊛ a` = ΔW A, grouped):
//! convolutions ([`conv2d`], which unfolds the input, also for conv1d) and
//! linear layers over a sequence of positions (the factor records of an
//! ungrouped one may also take the factor route of [`factors`], see
//! [`Route`]); [`embedding`] and [`norm`] (layer_norm and rms_norm). This
//! module holds
//! [`Geometry`] (the shape of a traced layer, as the arithmetic needs it),
//! the feature types, the helpers the kinds share, and the public entry
//! points, which hand each kind's work to its module.
//!
//! To add a kind: if its weight multiplies patches of its input (a weight of
//! C×K/G applied to K×P patches), build a [`Patches`] for it in
//! [`Geometry::of`] (a layout, and an unfold if its probes hold the raw
//! input) and nothing else (it gets both routes). Otherwise a variant of [`Geometry`] (built in
//! [`Geometry::of`] from the format's spec), a module `kernel/<kind>.rs`
//! with its arithmetic, and one arm per entry point here
//! ([`ProbeFeatures::new`], [`deltas`], [`accumulate`],
//! [`RecordFeatures::new`], the pair functions, [`direct`]).
use crate::probes::Probes;
use crate::records::Records;
use crate::weights::LayerWeights;
use crate::{Error, Result};
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use reptrace_format::{EmbeddingSpec, Mode, Storage, TracedLayer};

pub mod conv2d;
pub mod embedding;
pub mod factors;
pub mod linear;
pub mod norm;
pub mod patches;

pub use conv2d::unfold;
pub use patches::Patches;

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

/// How the pairs of records and probes are computed. Every kind has the
/// Gram route; the factor records of an ungrouped [`Patches`] layer also
/// the factor route, which [`ProbeFeatures::new`] takes where it costs less
/// (the cost model of [`patches`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Each kind's features of materialised updates (for a [`Patches`]
    /// layer `[vec ΔW, Δb]` and its Gram matrix) met with probe features.
    Gram,
    /// A [`Patches`] layer's factor records met with the probes' patches
    /// through the factors ([`factors`]), never forming `ΔW`.
    Factors,
}

/// The shape of a traced layer, as the arithmetic needs it.
#[derive(Debug, Clone, PartialEq)]
pub enum Geometry {
    /// A linear layer of one position, not ragged; `full`: records hold
    /// `[vec ΔW, Δb]` (batch mode), else factors.
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
    /// A layer whose weight multiplies patches of its input: a convolution,
    /// or a linear layer over a sequence of positions (or a ragged one).
    Patches(Patches),
    /// An embedding; in batch mode its storage is [`Storage::Full`].
    Embedding {
        /// The layer's spec, with the storage its records have.
        spec: EmbeddingSpec,
    },
    /// The affine part of a layer_norm or rms_norm; records always hold the
    /// whole update `[Δγ, Δβ]`.
    Norm {
        /// Values of γ (D, the product of normalized_shape).
        dim: usize,
        /// Positions per example (T; a probe of a ragged layer holds its
        /// own).
        positions: usize,
        /// Whether the layer has β.
        bias: bool,
    },
}

impl Geometry {
    /// The geometry of a traced layer in a run of `mode` (batch-mode
    /// records hold whole updates); an error for a padding wider than the
    /// input.
    pub fn of(layer: &TracedLayer<'_>, mode: Mode) -> Result<Self> {
        let batch = mode == Mode::Batch;
        match layer {
            // One position, factors: the fast path of `linear` (a ragged
            // layer's records and probes hold any number of positions: it
            // is a sequence layer even at T = 1).
            TracedLayer::Linear(l)
                if l.positions == 1 && l.storage == Storage::Factors && !l.ragged =>
            {
                Ok(Geometry::Linear {
                    inp: l.in_features,
                    out: l.out_features,
                    bias: l.bias,
                    full: batch,
                })
            }
            TracedLayer::Linear(l) => Ok(Geometry::Patches(linear::over_positions(l, batch))),
            TracedLayer::Conv2d(c) => conv2d::patches(c, batch).map(Geometry::Patches),
            TracedLayer::Conv1d(c) => conv2d::patches(&c.as_conv2d(), batch).map(Geometry::Patches),
            TracedLayer::Embedding(e) => {
                let mut spec = (*e).clone();
                if batch {
                    spec.storage = Storage::Full;
                }
                Ok(Geometry::Embedding { spec })
            }
            TracedLayer::LayerNorm(n) | TracedLayer::RmsNorm(n) => Ok(Geometry::Norm {
                dim: n.features(),
                positions: n.positions,
                bias: n.bias,
            }),
        }
    }

    /// Which kind's arithmetic applies, with what it needs.
    fn kind(&self) -> Kind<'_> {
        match self {
            Geometry::Linear {
                inp,
                out,
                bias,
                full,
            } => Kind::Linear {
                dims: linear::Dims {
                    inp: *inp,
                    out: *out,
                    bias: *bias,
                },
                full: *full,
            },
            Geometry::Patches(patches) => Kind::Patches(patches),
            Geometry::Embedding { spec } => Kind::Embedding {
                name: &spec.name,
                dims: embedding::Dims {
                    num: spec.num_embeddings,
                    dim: spec.embedding_dim,
                    positions: spec.positions,
                    digits: spec.digits(),
                },
                full: spec.storage == Storage::Full,
            },
            Geometry::Norm {
                dim,
                positions,
                bias,
            } => Kind::Norm(norm::Dims {
                dim: *dim,
                positions: *positions,
                bias: *bias,
            }),
        }
    }

    /// Whether records hold the whole update `[vec ΔW, Δb]` rather than
    /// factors.
    fn full(&self) -> bool {
        match self.kind() {
            Kind::Linear { full, .. } => full,
            Kind::Patches(patches) => patches.full,
            Kind::Embedding { full, .. } => full,
            Kind::Norm(_) => true,
        }
    }

    /// Length of `vec ΔW`.
    pub fn weight_len(&self) -> usize {
        match self {
            Geometry::Linear { inp, out, .. } => out * inp,
            Geometry::Patches(patches) => patches.weight_len(),
            Geometry::Embedding { spec } => spec.num_embeddings * spec.embedding_dim,
            Geometry::Norm { dim, .. } => *dim,
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
            Geometry::Patches(patches) => patches.bias_len(),
            Geometry::Embedding { .. } => 0,
            Geometry::Norm { dim, bias, .. } => {
                if *bias {
                    *dim
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

    /// The route [`ProbeFeatures::new`] takes for `probes` probes of
    /// `mean_positions` positions on average ([`Patches::route`]; the Gram
    /// route for every other kind).
    pub fn route(&self, probes: usize, mean_positions: f64) -> Route {
        match self.kind() {
            Kind::Patches(patches) => patches.route(probes, mean_positions),
            _ => Route::Gram,
        }
    }

    /// Whether the layer has the factor route ([`Patches::has_factor_route`]).
    pub fn has_factor_route(&self) -> bool {
        matches!(self.kind(), Kind::Patches(patches) if patches.has_factor_route())
    }

    /// Positions of probe `i` of `probes` as the cost model counts them
    /// ([`Patches::probe_positions`]; 1 for every other kind).
    pub fn probe_positions(&self, probes: &Probes, i: usize) -> usize {
        match self.kind() {
            Kind::Patches(patches) => patches.probe_positions(probes, i),
            _ => 1,
        }
    }

    /// f64 values held per probe of `positions` positions by
    /// [`ProbeFeatures`] on the factor route, with its share of the work
    /// arrays; `None` for a layer without the factor route.
    pub fn factor_probe_len(&self, positions: usize) -> Option<usize> {
        match self.kind() {
            Kind::Patches(patches) if patches.has_factor_route() => {
                Some(patches.factor_probe_len(positions))
            }
            _ => None,
        }
    }

    /// f64 values held per record (of the spec's positions) by
    /// [`RecordFeatures`] on the factor route; `None` for a layer without
    /// the factor route.
    pub fn factor_record_len(&self) -> Option<usize> {
        match self.kind() {
            Kind::Patches(patches) if patches.has_factor_route() => {
                Some(patches.factor_record_len())
            }
            _ => None,
        }
    }

    /// f64 values held per probe by [`ProbeFeatures`] on the Gram route
    /// (every kind's; [`Geometry::factor_probe_len`] on the factor route).
    pub fn probe_feature_len(&self) -> usize {
        match self.kind() {
            Kind::Linear { dims, .. } => linear::probe_feature_len(dims),
            Kind::Patches(patches) => patches.probe_feature_len(),
            Kind::Embedding { dims, .. } => embedding::probe_feature_len(dims),
            Kind::Norm(dims) => norm::probe_feature_len(dims),
        }
    }

    /// f64 values held per record by [`RecordFeatures`] and the work
    /// arrays on the Gram route (every kind's;
    /// [`Geometry::factor_record_len`] on the factor route).
    pub fn record_feature_len(&self) -> usize {
        match self.kind() {
            Kind::Linear { dims, full } => linear::record_feature_len(dims, full),
            Kind::Patches(patches) => patches.record_feature_len(),
            Kind::Embedding { dims, full, .. } => embedding::record_feature_len(dims, full),
            Kind::Norm(dims) => norm::record_feature_len(dims),
        }
    }
}

/// A [`Geometry`] as the dispatch to the kinds' modules reads it.
enum Kind<'a> {
    /// [`linear`]: `full` when records hold whole updates.
    Linear { dims: linear::Dims, full: bool },
    /// [`patches`].
    Patches(&'a Patches),
    /// [`embedding`]: the layer's name, its dims, `full` when records hold
    /// whole updates.
    Embedding {
        name: &'a str,
        dims: embedding::Dims,
        full: bool,
    },
    /// [`norm`] (records are always whole updates).
    Norm(norm::Dims),
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

/// Per-probe features of a set of probes for one layer, on one [`Route`].
pub struct ProbeFeatures {
    /// Linear: `A` (Q×in). Patches: `[vec(p Aᵀ), p 1]` (Q×delta_len; Q×0 on
    /// the factor route).
    /// Embedding: `Σ_t p_t` per distinct token (sparse, [`embedding`]).
    /// Norm: `[Σ_t p ⊙ x̂, Σ_t p]`.
    first: Array2<f64>,
    /// Linear: `P` (Q×out). Patches: Gram features of `A` (Q×gram_len).
    /// Embedding: the tokens and multiplicities. Norm: `[Σ_t x̂², 2 Σ_t x̂,
    /// T]`.
    second: Array2<f64>,
    /// On the factor route: the probes' patches and `p`, stacked.
    factors: Option<factors::FactorProbes>,
}

impl ProbeFeatures {
    /// Computes the features of `probes` (whose `a`, `p` fit `geom`) on the
    /// route that costs less for them ([`Geometry::route`] of their number
    /// and mean positions).
    pub fn new(geom: &Geometry, probes: &Probes) -> Result<Self> {
        let q = probes.len();
        let positions: usize = (0..q).map(|i| geom.probe_positions(probes, i)).sum();
        let mean = positions as f64 / q.max(1) as f64;
        Self::with_route(geom, probes, geom.route(q, mean))
    }

    /// Computes the features of `probes` on `route`; an error for the
    /// factor route of a layer without one.
    pub fn with_route(geom: &Geometry, probes: &Probes, route: Route) -> Result<Self> {
        if route == Route::Factors {
            return match geom.kind() {
                Kind::Patches(patches) => patches.factor_probe_features(probes),
                _ => Err(Error::Internal(
                    "only a patches layer has the factor route".into(),
                )),
            };
        }
        match geom.kind() {
            Kind::Linear { dims, .. } => linear::probe_features(dims, probes),
            Kind::Patches(patches) => patches.probe_features(probes),
            Kind::Embedding { name, dims, .. } => embedding::probe_features(name, dims, probes),
            Kind::Norm(dims) => norm::probe_features(dims, probes),
        }
    }

    /// The route the features are on.
    pub fn route(&self) -> Route {
        if self.factors.is_some() {
            Route::Factors
        } else {
            Route::Gram
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
    match geom.kind() {
        _ if geom.full() => {
            for &i in rows {
                out.extend(recs.v_of(i).iter().map(|x| x * scales[i]));
            }
        }
        Kind::Linear { dims, .. } => linear::factor_deltas(dims, recs, scales, rows, &mut out),
        Kind::Patches(patches) => patches.factor_deltas(recs, scales, rows, &mut out)?,
        Kind::Embedding { name, dims, .. } => {
            embedding::factor_deltas(name, dims, recs, scales, rows, &mut out)?
        }
        // Norm records are always whole updates (the first arm).
        Kind::Norm(_) => {}
    }
    matrix((rows.len(), d), out)
}

/// Adds the scaled updates of all records of `recs` to `sum` (`[vec ΔW, Δb]`).
pub fn accumulate(geom: &Geometry, recs: &Records, scales: &[f64], sum: &mut [f64]) -> Result<()> {
    if let Kind::Linear { dims, full: false } = geom.kind() {
        return linear::accumulate_factors(dims, recs, scales, sum);
    }
    if let Kind::Embedding {
        name,
        dims,
        full: false,
    } = geom.kind()
    {
        return embedding::accumulate_factors(name, dims, recs, scales, sum);
    }
    if let Kind::Patches(patches @ Patches { full: false, .. }) = geom.kind() {
        return patches.accumulate_factors(recs, scales, sum);
    }
    let all: Vec<usize> = (0..recs.len()).collect();
    let d = deltas(geom, recs, scales, &all)?;
    for (s, x) in sum.iter_mut().zip(d.sum_axis(Axis(0))) {
        *s += x;
    }
    Ok(())
}

/// Per-record features of a batch (scaled), ready to meet [`ProbeFeatures`].
pub struct RecordFeatures {
    /// Linear: `U` (R×in). Patches, Norm and whole Embedding updates:
    /// `[vec ΔW, Δb]` (R×delta_len). Embedding factors: the rows of ΔW per
    /// distinct token (sparse, [`embedding`]).
    first: Array2<f64>,
    /// Linear: scaled `V` (R×out). Patches: Gram features (R×gram_len).
    /// Embedding factors: the tokens and the rows' squared norms. Norm:
    /// `[Δγ², Δγ ⊙ Δβ, ‖Δβ‖²]`.
    second: Array2<f64>,
    /// Linear: `‖scaled v‖` per record.
    v_norm: Vec<f64>,
    bias: bool,
    kind: FeatureKind,
    /// Patches on the factor route: each record's factors (`first` and
    /// `second` are R×0).
    factors: Vec<factors::FactorRecord>,
}

/// Which arithmetic [`RecordFeatures`] use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FeatureKind {
    LinearFactors,
    /// Whole Linear updates, `first` = `[vec ΔW, Δb]`.
    LinearFull(linear::Dims),
    Patches,
    /// [`factors`]: `factors` holds each record's `U`, `s V`, `G`.
    PatchFactors,
    /// [`embedding`]: sparse rows of factor records, or whole updates.
    Embedding {
        dims: embedding::Dims,
        full: bool,
    },
    /// [`norm`]: `first` = `[Δγ, Δβ]`, `second` = its norm features.
    Norm,
}

impl RecordFeatures {
    /// Features of the records at `rows` of `recs` on the route of
    /// `probes`, the features they are to meet.
    pub fn for_probes(
        geom: &Geometry,
        probes: &ProbeFeatures,
        recs: &Records,
        scales: &[f64],
        rows: &[usize],
    ) -> Result<Self> {
        match (probes.route(), geom.kind()) {
            (Route::Factors, Kind::Patches(patches)) => {
                patches.factor_record_features(recs, scales, rows)
            }
            _ => Self::new(geom, recs, scales, rows),
        }
    }

    /// Features of the records at `rows` of `recs` on the Gram route (to
    /// meet [`ProbeFeatures`] on that route; [`RecordFeatures::for_probes`]
    /// follows the probes' route).
    pub fn new(geom: &Geometry, recs: &Records, scales: &[f64], rows: &[usize]) -> Result<Self> {
        match geom.kind() {
            Kind::Linear { dims, full: true } => {
                linear::full_record_features(geom, dims, recs, scales, rows)
            }
            Kind::Linear { dims, full: false } => {
                linear::factor_record_features(dims, recs, scales, rows)
            }
            Kind::Patches(patches) => patches.record_features(geom, recs, scales, rows),
            Kind::Embedding { name, dims, full } => {
                embedding::record_features(geom, name, dims, full, recs, scales, rows)
            }
            Kind::Norm(dims) => norm::record_features(geom, dims, recs, scales, rows),
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
        if self.kind == FeatureKind::PatchFactors {
            return factors::all_pairs(self, probes);
        }
        if probes.route() == Route::Factors {
            return Err(Error::Internal(
                "probe features of the factor route met Gram-route records (build both for the same route)"
                    .into(),
            ));
        }
        if let FeatureKind::LinearFull(dims) = self.kind {
            return linear::full_pairs(self, probes, dims);
        }
        if let FeatureKind::Embedding { dims, full } = self.kind {
            return Ok(embedding::all_pairs(self, probes, dims, full));
        }
        let first = probes.first.dot(&self.first.t());
        let second = probes.second.dot(&self.second.t());
        Ok(match self.kind {
            FeatureKind::LinearFactors => linear::factor_pairs(self, first, second),
            FeatureKind::Norm => norm::pairs(first, second),
            _ => patches::pairs(first, second),
        })
    }

    /// `dot` and `norm` of record `r` with probe `q` (NaN for features of
    /// different routes, which [`RecordFeatures::all_pairs`] refuses).
    pub fn pair(&self, probes: &ProbeFeatures, r: usize, q: usize) -> (f64, f64) {
        if self.kind == FeatureKind::PatchFactors {
            return factors::pair(self, probes, r, q);
        }
        if probes.route() == Route::Factors {
            return (f64::NAN, f64::NAN);
        }
        if let FeatureKind::LinearFull(dims) = self.kind {
            return linear::full_pair(self, probes, dims, r, q);
        }
        if let FeatureKind::Embedding { dims, full } = self.kind {
            return embedding::pair(self, probes, dims, full, r, q);
        }
        let first = self.first.row(r).dot(&probes.first.row(q));
        let second = self.second.row(r).dot(&probes.second.row(q));
        match self.kind {
            FeatureKind::LinearFactors => linear::factor_pair(self, first, second, r),
            FeatureKind::Norm => norm::pair(first, second),
            _ => patches::pair(first, second),
        }
    }
}

/// The contribution `c = R ⊛ a + r_b` of a weight change (the residual) to a
/// probe: `(dot, norm)` with its `p`.
pub fn direct(geom: &Geometry, delta: &LayerWeights, a: &[f64], p: &[f64]) -> Result<(f64, f64)> {
    let c: Vec<f64> = match geom.kind() {
        Kind::Linear { dims, .. } => linear::direct(dims, delta, a),
        Kind::Patches(patches) => patches.direct(delta, a)?,
        Kind::Embedding { name, dims, .. } => embedding::direct(name, dims, delta, a)?,
        Kind::Norm(dims) => norm::direct(dims, delta, a)?,
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
