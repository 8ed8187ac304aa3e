//! The factor route of a [`Patches`] layer: its factor records met with
//! its probes through the records' factors, never forming `ΔW`.
//!
//! A record holds `U` (T_r×K, rows `u_t`; a convolution's `u` = unfold(a)
//! K×P_r is read transposed) and `V` (T_r×C), scaled by its displacement
//! scale `s`; a probe holds its patches `A` (P×K, rows `a_s`: a linear
//! layer's input position-major, a convolution's unfolded input
//! transposed) and `Pm` (P×C, rows `p_s`). The bias is the augmentation
//! `u'_t = [u_t, 1]`, `a'_s = [a_s, 1]` (`Δb = s Σ_t v_t`), so that with
//! `M = U' A'ᵀ = U Aᵀ + 1` (T_r×P; without a bias `U Aᵀ`) and `N = s V Pmᵀ`:
//!
//! - `c = s Vᵀ M` (C×P), `dot = ⟨c, p⟩ = Σ_{t,s} M[t,s]·N[t,s]`;
//! - `‖c‖² = ⟨G, M Mᵀ⟩ = Σ (G M) ∘ M`, `G = s² V Vᵀ` (T_r×T_r, kept per
//!   record).
//!
//! Per record, the probes of a pass are stacked (ΣP rows) and met by three
//! GEMMs (`U A_allᵀ`, `V Pm_allᵀ`, `G M`), then summed per probe's block of
//! columns: ≈ T_r·ΣP·(K' + C + T_r) multiply-adds per record, no K² term.
//! A record of no positions contributes 0.
use super::patches::{Layout, Patches};
use super::{FeatureKind, ProbeFeatures, RecordFeatures, Route, matrix};
use crate::probes::Probes;
use crate::records::Records;
use crate::{Error, Result};
use ndarray::{Array2, ArrayView2, s};

/// Probe features on the factor route: every probe's patches and `p`,
/// position-major, stacked.
#[derive(Debug, Clone)]
pub(super) struct FactorProbes {
    /// Row `s` of probe `q`'s block is `a_s` (ΣP×K).
    a: Array2<f64>,
    /// Row `s` of probe `q`'s block is `p_s` (ΣP×C).
    p: Array2<f64>,
    /// Where probe `q`'s rows start, then the end (Q + 1 offsets).
    off: Vec<usize>,
}

/// One record on the factor route.
#[derive(Debug, Clone)]
pub(super) struct FactorRecord {
    /// `U` (T_r×K).
    u: Array2<f64>,
    /// `s V` (T_r×C).
    v: Array2<f64>,
    /// `G = s² V Vᵀ` (T_r×T_r).
    g: Array2<f64>,
}

impl Patches {
    /// Whether the factor route applies: factor records of an ungrouped
    /// layer.
    pub fn has_factor_route(&self) -> bool {
        !self.full && self.group_count() == 1
    }

    /// `K'`: patch rows, plus one for the bias.
    fn k_bias(&self) -> usize {
        self.k + usize::from(self.bias)
    }

    /// The route the pairs of `probes` probes of `mean_positions` positions
    /// on average take, by the cost model of the module doc of
    /// [`super::patches`]: the factor route where it applies and costs fewer
    /// multiply-adds per record than the Gram route.
    pub fn route(&self, probes: usize, mean_positions: f64) -> Route {
        if !self.has_factor_route() || probes == 0 {
            return Route::Gram;
        }
        let (c, k, t) = (self.out as f64, self.k_bias() as f64, self.positions as f64);
        let q = probes as f64;
        let gram = c * k * t + c * k * k + q * (k * k + c * k);
        let factor = q * t * mean_positions * (k + c + t);
        if factor < gram {
            Route::Factors
        } else {
            Route::Gram
        }
    }

    /// Positions `P` of probe `i` of `probes` (of its `a` in the
    /// position-major layout, [`Patches::positions`] in the channel-major
    /// one).
    pub fn probe_positions(&self, probes: &Probes, i: usize) -> usize {
        match self.layout {
            Layout::Positions => probes.a(i).len().checked_div(self.k).unwrap_or(0),
            Layout::Channels(_) => self.positions,
        }
    }

    /// f64 values per probe of `positions` positions on the factor route:
    /// its rows of `A` and `Pm`, `P·(K + C)`, and its columns of the three
    /// work arrays of a record (`M`, `N`, `G M`: `3·T·P`, records of the
    /// spec's `T` positions).
    pub(super) fn factor_probe_len(&self, positions: usize) -> usize {
        positions * (self.k + self.out + 3 * self.positions)
    }

    /// f64 values per record on the factor route (of the spec's `T`
    /// positions): `U`, `s V` and `G`, `T·(K + C) + T²`.
    pub(super) fn factor_record_len(&self) -> usize {
        let t = self.positions;
        t * (self.k + self.out) + t * t
    }

    /// The probes' features on the factor route; an error for a layer
    /// without one.
    pub(super) fn factor_probe_features(&self, probes: &Probes) -> Result<ProbeFeatures> {
        if !self.has_factor_route() {
            return Err(Error::Internal(format!(
                "a patches layer of {} records and {} groups has no factor route (factor records of an ungrouped layer only)",
                if self.full { "whole" } else { "factor" },
                self.group_count()
            )));
        }
        let q = probes.len();
        let (mut a_rows, mut p_rows) = (Vec::new(), Vec::new());
        let mut off = Vec::with_capacity(q + 1);
        off.push(0);
        for i in 0..q {
            // A (K×P) and p (C×P) of the probe, appended transposed.
            let a = self.patches(probes.a(i))?;
            let positions = a.ncols();
            let p = self.at_positions(self.out, positions, probes.p(i))?;
            a_rows.extend(a.t().iter());
            p_rows.extend(p.t().iter());
            off.push(off[i] + positions);
        }
        let total = off[q];
        Ok(ProbeFeatures {
            first: Array2::zeros((q, 0)),
            second: Array2::zeros((q, 0)),
            factors: Some(FactorProbes {
                a: matrix((total, self.k), a_rows)?,
                p: matrix((total, self.out), p_rows)?,
                off,
            }),
        })
    }

    /// `U`, `s V` and `G` of every record at `rows`.
    pub(super) fn factor_record_features(
        &self,
        recs: &Records,
        scales: &[f64],
        rows: &[usize],
    ) -> Result<RecordFeatures> {
        let mut factors = Vec::with_capacity(rows.len());
        for &i in rows {
            // The record's positions (0 for a ragged record that holds
            // none): those of its `u`, which `v` must have.
            let u = self.by_position(self.k, recs.u_of(i))?;
            let v = self.at_positions(self.out, u.ncols(), recs.v_of(i))?;
            let s = scales[i];
            let v = v.t().mapv(|x| s * x);
            factors.push(FactorRecord {
                u: u.t().as_standard_layout().into_owned(),
                g: v.dot(&v.t()),
                v,
            });
        }
        Ok(RecordFeatures {
            first: Array2::zeros((rows.len(), 0)),
            second: Array2::zeros((rows.len(), 0)),
            v_norm: Vec::new(),
            bias: self.bias,
            kind: FeatureKind::PatchFactors,
            factors,
        })
    }
}

/// `dot` and `‖c‖²` of `rec` with the probes whose stacked rows are `a`
/// and `p`, per block of columns `off` (each block's sums added to
/// `dot[k]`, `norm2[k]`).
fn meet(
    rec: &FactorRecord,
    bias: bool,
    (a, p): (ArrayView2<'_, f64>, ArrayView2<'_, f64>),
    off: &[usize],
    dot: &mut [f64],
    norm2: &mut [f64],
) {
    if rec.u.nrows() == 0 || a.nrows() == 0 {
        return;
    }
    let mut m = rec.u.dot(&a.t());
    if bias {
        m += 1.0;
    }
    // N ∘ M and (G M) ∘ M, in place.
    let mut n = rec.v.dot(&p.t());
    let mut gm = rec.g.dot(&m);
    n *= &m;
    gm *= &m;
    for (k, w) in off.windows(2).enumerate() {
        let cols = s![.., w[0]..w[1]];
        dot[k] += n.slice(cols).sum();
        norm2[k] += gm.slice(cols).sum();
    }
}

/// Every pair (probe-major): `dot` and `‖c‖`; an error for probe features
/// not on the factor route.
pub(super) fn all_pairs(
    recs: &RecordFeatures,
    probes: &ProbeFeatures,
) -> Result<(Array2<f64>, Array2<f64>)> {
    let fp = factor_probes(probes)?;
    let q = fp.off.len().saturating_sub(1);
    let r = recs.factors.len();
    let mut dot = Array2::zeros((q, r));
    let mut norm = Array2::zeros((q, r));
    let (mut d, mut n2) = (vec![0.0; q], vec![0.0; q]);
    for (i, rec) in recs.factors.iter().enumerate() {
        d.fill(0.0);
        n2.fill(0.0);
        meet(
            rec,
            recs.bias,
            (fp.a.view(), fp.p.view()),
            &fp.off,
            &mut d,
            &mut n2,
        );
        for k in 0..q {
            dot[[k, i]] = d[k];
            norm[[k, i]] = n2[k].max(0.0).sqrt();
        }
    }
    Ok((dot, norm))
}

/// Record `r` with probe `q`: `dot` and `‖c‖` (NaN for probe features not
/// on the factor route, which [`all_pairs`] refuses).
pub(super) fn pair(
    recs: &RecordFeatures,
    probes: &ProbeFeatures,
    r: usize,
    q: usize,
) -> (f64, f64) {
    let Ok(fp) = factor_probes(probes) else {
        return (f64::NAN, f64::NAN);
    };
    let rows = s![fp.off[q]..fp.off[q + 1], ..];
    let (mut d, mut n2) = ([0.0], [0.0]);
    let off = [0, fp.off[q + 1] - fp.off[q]];
    meet(
        &recs.factors[r],
        recs.bias,
        (fp.a.slice(rows), fp.p.slice(rows)),
        &off,
        &mut d,
        &mut n2,
    );
    (d[0], n2[0].max(0.0).sqrt())
}

/// The factor-route features of `probes`, or an error.
fn factor_probes(probes: &ProbeFeatures) -> Result<&FactorProbes> {
    probes.factors.as_ref().ok_or_else(|| {
        Error::Internal(
            "factor-route records met probe features of the Gram route (build both for the same route)"
                .into(),
        )
    })
}
