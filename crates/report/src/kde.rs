//! A weighted Gaussian kernel density estimate on `[-1, 1]`, for the ridge
//! plot: the distribution of the cosine between each record's contribution
//! and the probe's refinement, each record weighted by its norm.
//!
//! The estimate at `x` is `f(x) = Σ_i w_i φ((x − x_i)/h) / (h Σ_i w_i)` with
//! `φ` the standard normal density. The bandwidth `h` is Silverman's rule
//! with the weighted standard deviation and interquartile range and Kish's
//! effective sample size `(Σw)² / Σw²`. Mass leaking past ±1 is not
//! reflected back: the curve is the plain estimate, evaluated on the grid.
//!
//! Points are first spread onto [`BINS`] equally spaced bin centres by
//! linear binning (weights split between the two neighbouring centres), so
//! a grid evaluation costs `O(BINS · grid)` however many records a layer has;
//! the error of linear binning is `O(δ²/h²)` relative, `δ = 2/(BINS−1)`.

/// Number of centres that the points are binned onto.
pub const BINS: usize = 2001;

/// Smallest and largest bandwidth used (cosine units).
const H_MIN: f64 = 0.01;
const H_MAX: f64 = 0.5;

/// A weighted sample binned on `[-1, 1]`, with its bandwidth.
#[derive(Debug, Clone, PartialEq)]
pub struct Kde {
    /// Weight on each of the [`BINS`] centres, summing to 1.
    mass: Vec<f64>,
    /// The bandwidth.
    pub bandwidth: f64,
    /// Sum of the weights of the points used.
    pub total_weight: f64,
    /// Number of points with positive, finite weight.
    pub points: usize,
}

fn centre(i: usize) -> f64 {
    -1.0 + 2.0 * i as f64 / (BINS - 1) as f64
}

/// The weighted quantile `q` of sorted `(x, w)` pairs.
fn quantile(sorted: &[(f64, f64)], total: f64, q: f64) -> f64 {
    let target = q * total;
    let mut acc = 0.0;
    for &(x, w) in sorted {
        acc += w;
        if acc >= target {
            return x;
        }
    }
    sorted.last().map_or(0.0, |p| p.0)
}

/// Silverman's rule of thumb for a weighted sample (clamped to `[0.01, 0.5]`).
pub fn silverman(xs: &[f64], ws: &[f64]) -> f64 {
    let mut pts: Vec<(f64, f64)> = xs
        .iter()
        .zip(ws)
        .filter(|(x, w)| x.is_finite() && w.is_finite() && **w > 0.0)
        .map(|(x, w)| (*x, *w))
        .collect();
    let total: f64 = pts.iter().map(|p| p.1).sum();
    if pts.is_empty() || total <= 0.0 {
        return H_MIN;
    }
    let mean = pts.iter().map(|(x, w)| x * w).sum::<f64>() / total;
    let var = pts.iter().map(|(x, w)| w * (x - mean).powi(2)).sum::<f64>() / total;
    let sq: f64 = pts.iter().map(|p| p.1 * p.1).sum();
    let n_eff = total * total / sq;
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let iqr = quantile(&pts, total, 0.75) - quantile(&pts, total, 0.25);
    let sd = var.sqrt();
    let spread = if iqr > 0.0 { sd.min(iqr / 1.34) } else { sd };
    (0.9 * spread * n_eff.powf(-0.2)).clamp(H_MIN, H_MAX)
}

impl Kde {
    /// Bins `xs` (clamped to `[-1, 1]`) with weights `ws`; points with a
    /// non-finite value or a weight that is not positive are skipped.
    /// `bandwidth` `None` uses [`silverman`].
    pub fn new(xs: &[f64], ws: &[f64], bandwidth: Option<f64>) -> Kde {
        let mut mass = vec![0.0; BINS];
        let mut total = 0.0;
        let mut points = 0;
        let step = 2.0 / (BINS - 1) as f64;
        for (&x, &w) in xs.iter().zip(ws) {
            if !(x.is_finite() && w.is_finite() && w > 0.0) {
                continue;
            }
            let pos = (x.clamp(-1.0, 1.0) + 1.0) / step;
            let lo = (pos.floor() as usize).min(BINS - 2);
            let frac = pos - lo as f64;
            mass[lo] += w * (1.0 - frac);
            mass[lo + 1] += w * frac;
            total += w;
            points += 1;
        }
        if total > 0.0 {
            mass.iter_mut().for_each(|m| *m /= total);
        }
        let bandwidth = bandwidth
            .filter(|h| h.is_finite() && *h > 0.0)
            .unwrap_or_else(|| silverman(xs, ws));
        Kde {
            mass,
            bandwidth,
            total_weight: total,
            points,
        }
    }

    /// The density at `x` (0 everywhere for an empty sample).
    pub fn at(&self, x: f64) -> f64 {
        let h = self.bandwidth;
        let norm = 1.0 / (h * (2.0 * std::f64::consts::PI).sqrt());
        // Beyond 6 bandwidths a kernel's value is below 1.6e-8 of its peak.
        let reach = 6.0 * h;
        let step = 2.0 / (BINS - 1) as f64;
        let first = (((x - reach) + 1.0) / step).floor().max(0.0) as usize;
        let last = ((((x + reach) + 1.0) / step).ceil().max(0.0) as usize).min(BINS - 1);
        (first..=last)
            .filter(|&i| self.mass[i] != 0.0)
            .map(|i| {
                let z = (x - centre(i)) / h;
                self.mass[i] * (-0.5 * z * z).exp()
            })
            .sum::<f64>()
            * norm
    }

    /// The density on `n ≥ 2` equally spaced points from −1 to 1: `(x, f(x))`.
    pub fn grid(&self, n: usize) -> Vec<(f64, f64)> {
        let n = n.max(2);
        (0..n)
            .map(|i| {
                let x = -1.0 + 2.0 * i as f64 / (n - 1) as f64;
                (x, self.at(x))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The definition, summed directly in f64 over every point.
    fn direct(xs: &[f64], ws: &[f64], h: f64, x: f64) -> f64 {
        let total: f64 = ws.iter().sum();
        xs.iter()
            .zip(ws)
            .map(|(xi, wi)| {
                let z = (x - xi) / h;
                wi * (-0.5 * z * z).exp() / (h * (2.0 * std::f64::consts::PI).sqrt())
            })
            .sum::<f64>()
            / total
    }

    #[test]
    fn matches_direct_evaluation() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let n = 300;
        let xs: Vec<f64> = (0..n)
            .map(|i| {
                let c = if i % 3 == 0 { -0.6 } else { 0.4 };
                (c + rng.random_range(-0.3..0.3_f64)).clamp(-1.0, 1.0)
            })
            .collect();
        let ws: Vec<f64> = (0..n).map(|_| rng.random_range(0.01..5.0_f64)).collect();
        for h in [0.03, 0.08, 0.2] {
            let kde = Kde::new(&xs, &ws, Some(h));
            assert_eq!(kde.points, n);
            let peak = kde.grid(201).iter().map(|p| p.1).fold(0.0, f64::max);
            for (x, f) in kde.grid(201) {
                let want = direct(&xs, &ws, h, x);
                assert!(
                    (f - want).abs() <= 2e-3 * peak,
                    "h {h} x {x}: binned {f} direct {want}"
                );
            }
        }
        // Integrates to about 1 (inside ±1 up to the leaked tails).
        let kde = Kde::new(&xs, &ws, Some(0.03));
        let g = kde.grid(2001);
        let area: f64 = g
            .windows(2)
            .map(|w| (w[1].0 - w[0].0) * (w[0].1 + w[1].1) / 2.0)
            .sum();
        assert!((area - 1.0).abs() < 0.02, "area {area}");
    }

    #[test]
    fn weights_shift_the_mass() {
        // Two points; the heavy one dominates in proportion to its weight.
        let kde = Kde::new(&[-0.5, 0.5], &[1.0, 3.0], Some(0.05));
        let ratio = kde.at(0.5) / kde.at(-0.5);
        assert!((ratio - 3.0).abs() < 1e-3, "ratio {ratio}");
        // Non-positive and non-finite weights are ignored.
        let k2 = Kde::new(
            &[-0.5, 0.5, 0.0, 0.1],
            &[1.0, 3.0, 0.0, f64::NAN],
            Some(0.05),
        );
        assert_eq!(k2.points, 2);
        assert!((k2.at(0.0) - kde.at(0.0)).abs() < 1e-12);
        // Empty sample: zero density, no NaN.
        let e = Kde::new(&[], &[], None);
        assert_eq!(e.at(0.0), 0.0);
    }

    #[test]
    fn silverman_follows_the_spread() {
        let xs: Vec<f64> = (0..1000).map(|i| -0.9 + 1.8 * i as f64 / 999.0).collect();
        let ws = vec![1.0; 1000];
        // Uniform on [-0.9, 0.9]: sd = 1.8/√12, IQR/1.34 = 0.9/1.34 > sd.
        let sd = 1.8 / 12f64.sqrt();
        let want = 0.9 * sd * 1000f64.powf(-0.2);
        let h = silverman(&xs, &ws);
        assert!((h - want).abs() < 1e-3 * want + 1e-4, "h {h} want {want}");
        // All at one point: the smallest bandwidth.
        assert_eq!(silverman(&[0.2; 5], &[1.0; 5]), H_MIN);
    }
}
