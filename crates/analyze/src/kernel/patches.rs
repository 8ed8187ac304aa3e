//! The arithmetic of the layers whose weight multiplies patches: a
//! convolution (`conv2d`, `conv1d`; any groups, any padding mode, see
//! [`super::conv2d`]) and a `linear` layer over a sequence of positions.
//!
//! Such a layer has a weight `W` of `C` rows (output channels or features)
//! and `K/G` columns, `G` the groups; it multiplies the patches `A` (K×P) of
//! its input, `P` positions: group `g` (output channels `[g·C/G,
//! (g+1)·C/G)`) sees patch rows `[g·K/G, (g+1)·K/G)`, `c_g = ΔW_g A_g +
//! Δb_g 1ᵀ`. A record's update is materialised as `ΔW` (C×K/G, the stored
//! weight's layout; from factors `ΔW_g = V_g U_gᵀ`) and `Δb`. Then, summed
//! over the groups:
//! - `dot = ⟨c, p⟩ = Σ_g ⟨ΔW_g, p_g A_gᵀ⟩ + ⟨Δb, p 1⟩`: one product of the
//!   records' `[vec ΔW, Δb]` with the probes' `[vec(p_g A_gᵀ) stacked, p 1]`;
//! - `‖c‖² = Σ_g ⟨ΔW_gᵀΔW_g, A_g A_gᵀ⟩ + 2 (ΔW_gᵀΔb_g)·(A_g 1) + P ‖Δb_g‖²`:
//!   one product of per-record features (per group the upper triangle of
//!   the Gram matrix ΔW_gᵀΔW_g, off-diagonal doubled) with per-probe
//!   features (per group the upper triangle of A_g A_gᵀ).
//!
//! Both cost O(K²/G) per record–probe pair instead of the O(C·K·P/G) of
//! forming `c`, and run as GEMMs over whole batches: this is the Gram
//! route ([`Route::Gram`](super::Route::Gram)).
//!
//! The factor records of an ungrouped layer have a second route,
//! [`Route::Factors`](super::Route::Factors) ([`super::factors`]): the records' factors meet the
//! probes' patches directly, never forming `ΔW`. Which is cheaper depends
//! on the layer and on the probes of a pass, so [`ProbeFeatures::new`]
//! chooses per pass ([`Patches::route`]) by a count of multiply-adds per
//! record, with `K' = K + 1` with a bias (`K` without), `T` the spec's
//! positions ([`Patches::positions`], a record's nominal length), `Q` the
//! probes of the pass and `P̄` their mean positions:
//! - Gram route: `C·K'·T` (ΔW from the factors) `+ C·K'²` (its Gram
//!   matrix) `+ Q·(K'² + C·K')` (the two products with the probes);
//! - factor route: `Q·T·P̄·(K' + C + T)` (`U A'ᵀ`, `V Pmᵀ`, `G M`).
//!
//! The factor route is taken where it costs less: wide layers (large `K`,
//! `C`) met by few probes of few positions; the Gram route where many
//! probes share each record's `K'²` Gram matrix. Whole-update records and
//! grouped convolutions always take the Gram route.
//!
//! The [`Layout`] says how records and probes hold their matrices: a
//! convolution's are channel-major (`u` = unfold(a) K×P, `v` and `p` C×P,
//! `a` the raw input), a linear sequence layer's position-major (`u`, `a`
//! P×K, `v`, `p` P×C), read through transposed views. A position-major
//! record or probe holds its own number of positions `P` (a ragged layer's
//! vary, a record's may be 0), read from the length of its slices; a
//! channel-major one always holds [`Patches::positions`].
use super::conv2d::Unfold;
use super::{
    FeatureKind, Geometry, ProbeFeatures, RecordFeatures, deltas, matrix, push_upper, shape_error,
    view2, view2_mut,
};
use crate::Result;
use crate::probes::Probes;
use crate::records::Records;
use crate::weights::LayerWeights;
use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, Axis, CowArray, Ix2, s};

/// A layer whose weight multiplies patches of its input.
#[derive(Debug, Clone, PartialEq)]
pub struct Patches {
    /// Rows `C` of the weight: output channels or features.
    pub out: usize,
    /// Rows `K` of the patches `A`, all groups together (`C_in·kh·kw`, or
    /// the input features).
    pub k: usize,
    /// Groups `G` (1 but for grouped convolutions); divides `out` and `k`.
    pub groups: usize,
    /// Positions `P`: columns of `A` (of a channel-major layout; a
    /// position-major record or probe holds its own, this many for a layer
    /// that is not ragged).
    pub positions: usize,
    /// Whether the layer has a bias (`C` long).
    pub bias: bool,
    /// Whether records hold the whole update `[vec ΔW, Δb]` rather than
    /// factors.
    pub full: bool,
    /// How records and probes hold their matrices.
    pub layout: Layout,
}

/// How a [`Patches`] layer's records and probes hold their matrices.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// Position-major (a linear layer over a sequence): `u` and `a` P×K,
    /// `v` and `p` P×C.
    Positions,
    /// Channel-major (a convolution): `u` = unfold(a) K×P, `v` and `p` C×P,
    /// `a` the layer's raw input, unfolded by the [`Unfold`].
    Channels(Unfold),
}

impl Patches {
    /// Groups `G` (at least 1).
    pub(super) fn group_count(&self) -> usize {
        self.groups.max(1)
    }

    /// Columns `K/G` of the weight: patch rows per group.
    pub fn group_k(&self) -> usize {
        self.k / self.group_count()
    }

    /// Output rows `C/G` per group.
    fn group_out(&self) -> usize {
        self.out / self.group_count()
    }

    /// Length of `vec ΔW` (C × K/G).
    pub fn weight_len(&self) -> usize {
        self.out * self.group_k()
    }

    /// Length of `Δb` (0 without bias).
    pub fn bias_len(&self) -> usize {
        if self.bias { self.out } else { 0 }
    }

    fn update_len(&self) -> usize {
        self.weight_len() + self.bias_len()
    }

    /// Length of the per-pair norm features: per group the upper triangle
    /// of a (K/G)×(K/G) Gram matrix, plus `K/G + 1` with a bias.
    fn gram_len(&self) -> usize {
        let kg = self.group_k();
        self.group_count() * (kg * (kg + 1) / 2 + if self.bias { kg + 1 } else { 0 })
    }

    /// f64 values per probe: `[vec(p Aᵀ), p 1]` and the Gram features.
    pub(super) fn probe_feature_len(&self) -> usize {
        self.update_len() + self.gram_len()
    }

    /// f64 values per record: `[vec ΔW, Δb]` and the Gram features, plus
    /// one `[vec ΔW, Δb]` of work space.
    pub(super) fn record_feature_len(&self) -> usize {
        2 * self.update_len() + self.gram_len()
    }

    /// Group `g`'s rows of a C×… matrix.
    fn out_rows(&self, g: usize) -> ndarray::Slice {
        let c = self.group_out();
        ndarray::Slice::from(g * c..(g + 1) * c)
    }

    /// Group `g`'s rows of a K×… matrix.
    fn k_rows(&self, g: usize) -> ndarray::Slice {
        let k = self.group_k();
        ndarray::Slice::from(g * k..(g + 1) * k)
    }

    /// A matrix of `rows` × `positions` stored in the layout (position-major:
    /// `positions` × `rows`, viewed transposed).
    pub(super) fn at_positions<'a>(
        &self,
        rows: usize,
        positions: usize,
        data: &'a [f64],
    ) -> Result<ArrayView2<'a, f64>> {
        match self.layout {
            Layout::Positions => Ok(view2((positions, rows), data)?.reversed_axes()),
            Layout::Channels(_) => view2((rows, positions), data),
        }
    }

    /// A matrix of `rows` × P stored in the layout, P read from its length
    /// in the position-major layout ([`Patches::positions`] in the
    /// channel-major one).
    pub(super) fn by_position<'a>(
        &self,
        rows: usize,
        data: &'a [f64],
    ) -> Result<ArrayView2<'a, f64>> {
        let positions = match self.layout {
            Layout::Positions => data.len().checked_div(rows).unwrap_or(0),
            Layout::Channels(_) => self.positions,
        };
        self.at_positions(rows, positions, data)
    }

    /// The patches `A` (K×P) of a probe's `a`.
    pub(super) fn patches<'a>(&self, a: &'a [f64]) -> Result<CowArray<'a, f64, Ix2>> {
        match &self.layout {
            Layout::Positions => Ok(self.by_position(self.k, a)?.into()),
            Layout::Channels(unfold) => Ok(unfold.apply(a)?.into()),
        }
    }

    /// `[vec(p_g A_gᵀ) stacked, p 1]` (Q×delta_len) and the Gram features
    /// of `A` per group (Q×gram_len).
    pub(super) fn probe_features(&self, probes: &Probes) -> Result<ProbeFeatures> {
        let q = probes.len();
        let mut first = Vec::with_capacity(q * self.update_len());
        let mut second = Vec::with_capacity(q * self.gram_len());
        for i in 0..q {
            let a = self.patches(probes.a(i))?;
            // The probe's positions P: those of its `a`, which `p` must have.
            let positions = a.ncols();
            let p = self.at_positions(self.out, positions, probes.p(i))?;
            for g in 0..self.group_count() {
                let (ag, pg) = (
                    a.slice_axis(Axis(0), self.k_rows(g)),
                    p.slice_axis(Axis(0), self.out_rows(g)),
                );
                // p_g A_gᵀ (C/G × K/G), row-major like the stored weight.
                first.extend(pg.dot(&ag.t()).iter());
            }
            if self.bias {
                first.extend(p.sum_axis(Axis(1)).iter());
            }
            for g in 0..self.group_count() {
                let ag = a.slice_axis(Axis(0), self.k_rows(g));
                push_upper(&ag.dot(&ag.t()), 1.0, &mut second);
                if self.bias {
                    second.extend(ag.sum_axis(Axis(1)).iter());
                    second.push(positions as f64);
                }
            }
        }
        Ok(ProbeFeatures {
            first: matrix((q, self.update_len()), first)?,
            second: matrix((q, self.gram_len()), second)?,
            factors: None,
        })
    }

    /// Appends `[vec ΔW, Δb]` (`ΔW_g = s V_g U_gᵀ`, `Δb = s V 1`) of the
    /// factor records at `rows` to `out`.
    pub(super) fn factor_deltas(
        &self,
        recs: &Records,
        scales: &[f64],
        rows: &[usize],
        out: &mut Vec<f64>,
    ) -> Result<()> {
        let mut w = Array2::zeros((self.out, self.group_k()));
        for &i in rows {
            // The record's positions P (0 for a ragged record that holds
            // none: ΔW = 0, Δb = 0): those of its `u`, which `v` must have.
            let u = self.by_position(self.k, recs.u_of(i))?;
            let v = self.at_positions(self.out, u.ncols(), recs.v_of(i))?;
            for g in 0..self.group_count() {
                general_mat_mul(
                    scales[i],
                    &v.slice_axis(Axis(0), self.out_rows(g)),
                    &u.slice_axis(Axis(0), self.k_rows(g)).t(),
                    0.0,
                    &mut w.slice_axis_mut(Axis(0), self.out_rows(g)),
                );
            }
            out.extend(w.iter());
            if self.bias {
                out.extend(v.rows().into_iter().map(|r| scales[i] * r.sum()));
            }
        }
        Ok(())
    }

    /// Adds `[vec ΔW, Δb]` of every factor record of `recs` (`ΔW_g = s V_g
    /// U_gᵀ`, `Δb = s V 1`) to `sum`, one record at a time (no batch of
    /// updates is formed).
    pub(super) fn accumulate_factors(
        &self,
        recs: &Records,
        scales: &[f64],
        sum: &mut [f64],
    ) -> Result<()> {
        let (w, b) = sum.split_at_mut(self.weight_len().min(sum.len()));
        let mut w = view2_mut((self.out, self.group_k()), w)?;
        for (i, &s) in scales.iter().enumerate().take(recs.len()) {
            let u = self.by_position(self.k, recs.u_of(i))?;
            let v = self.at_positions(self.out, u.ncols(), recs.v_of(i))?;
            for g in 0..self.group_count() {
                general_mat_mul(
                    s,
                    &v.slice_axis(Axis(0), self.out_rows(g)),
                    &u.slice_axis(Axis(0), self.k_rows(g)).t(),
                    1.0,
                    &mut w.slice_axis_mut(Axis(0), self.out_rows(g)),
                );
            }
            if self.bias {
                for (b, row) in b.iter_mut().zip(v.rows()) {
                    *b += s * row.sum();
                }
            }
        }
        Ok(())
    }

    /// `[vec ΔW, Δb]` and the Gram features of every record at `rows`.
    pub(super) fn record_features(
        &self,
        geom: &Geometry,
        recs: &Records,
        scales: &[f64],
        rows: &[usize],
    ) -> Result<RecordFeatures> {
        let all = deltas(geom, recs, scales, rows)?;
        let (co, kg) = (self.out, self.group_k());
        let mut gram = Vec::with_capacity(rows.len() * self.gram_len());
        for row in all.rows() {
            let w = row.slice(s![..co * kg]);
            let w = w
                .to_shape((co, kg))
                .map_err(|e| shape_error((co, kg), w.len(), e))?;
            let b = row.slice(s![co * kg..]);
            for g in 0..self.group_count() {
                let wg = w.slice_axis(Axis(0), self.out_rows(g));
                push_upper(&wg.t().dot(&wg), 2.0, &mut gram);
                if self.bias {
                    let bg = b.slice_axis(Axis(0), self.out_rows(g));
                    gram.extend(wg.t().dot(&bg).iter().map(|x| 2.0 * x));
                    gram.push(bg.dot(&bg));
                }
            }
        }
        Ok(RecordFeatures {
            first: all,
            second: matrix((rows.len(), self.gram_len()), gram)?,
            v_norm: Vec::new(),
            bias: self.bias,
            kind: FeatureKind::Patches,
            factors: Vec::new(),
        })
    }

    /// The layer's output `c = R ⊛ a + r_b` for a weight change `R`, in the
    /// layout of `p`.
    pub(super) fn direct(&self, delta: &LayerWeights, a: &[f64]) -> Result<Vec<f64>> {
        let w = view2((self.out, self.group_k()), &delta.weight)?;
        let a = self.patches(a)?;
        let mut c = Array2::zeros((self.out, a.ncols()));
        for g in 0..self.group_count() {
            general_mat_mul(
                1.0,
                &w.slice_axis(Axis(0), self.out_rows(g)),
                &a.slice_axis(Axis(0), self.k_rows(g)),
                0.0,
                &mut c.slice_axis_mut(Axis(0), self.out_rows(g)),
            );
        }
        if self.bias {
            for (mut row, b) in c.rows_mut().into_iter().zip(&delta.bias) {
                row += *b;
            }
        }
        Ok(match self.layout {
            Layout::Positions => c.t().iter().copied().collect(),
            Layout::Channels(_) => c.iter().copied().collect(),
        })
    }
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
