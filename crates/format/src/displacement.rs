//! How far each step's gradient moves the weights by the end of training.
//!
//! With momentum μ (PyTorch SGD semantics, `buf₀ = g₀`,
//! `buf_t = μ·buf_{t−1} + (1−d)·g_t`), the gradient of step `s` keeps moving
//! the weights in every later step. Its total displacement by the end of a
//! run of `T` steps is `λ_s·g_s` with
//!
//! - `λ_s = c_s · Σ_{t=s}^{T−1} η_t μ^{t−s}` (heavy ball),
//! - `λ_s = η_s + μ · c_s · Σ_{t=s}^{T−1} η_t μ^{t−s}` (Nesterov),
//!
//! where `c_s = 1` for the first step and `1 − d` after it. A stored record
//! holds `v = −η_s·δ`, so its true update is the stored one scaled by
//! `λ_s / η_s`; that ratio is what [`displacement_scales`] returns.

/// `λ_s / η_s` for every step `s` of a run with per-step learning rates `lrs`.
///
/// Steps with `η_s = 0` stored zero updates; their scale is 0.
pub fn displacement_scales(lrs: &[f64], momentum: f64, dampening: f64, nesterov: bool) -> Vec<f64> {
    let n = lrs.len();
    let mut scales = vec![0.0; n];
    // tail_s = Σ_{t=s}^{T−1} η_t μ^{t−s}, computed backwards: tail_s = η_s + μ·tail_{s+1}.
    let mut tail = 0.0;
    for s in (0..n).rev() {
        tail = lrs[s] + momentum * tail;
        let c = if s == 0 { 1.0 } else { 1.0 - dampening };
        let lambda = if momentum == 0.0 {
            lrs[s]
        } else if nesterov {
            lrs[s] + momentum * c * tail
        } else {
            c * tail
        };
        scales[s] = if lrs[s] == 0.0 { 0.0 } else { lambda / lrs[s] };
    }
    scales
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates scalar SGD with momentum where only step `s` has a unit
    /// gradient, and returns the total displacement: that is λ_s.
    fn simulate(lrs: &[f64], mu: f64, d: f64, nesterov: bool, s: usize) -> f64 {
        let (mut w, mut buf) = (0.0f64, 0.0f64);
        for (t, &lr) in lrs.iter().enumerate() {
            let g = if t == s { 1.0 } else { 0.0 };
            buf = if t == 0 { g } else { mu * buf + (1.0 - d) * g };
            let step = if nesterov { g + mu * buf } else { buf };
            w -= lr * step;
        }
        -w
    }

    #[test]
    fn matches_simulated_sgd() {
        let lrs = [0.1, 0.1, 0.05, 0.05, 0.02, 0.0, 0.01];
        for (mu, d, nesterov) in [
            (0.0, 0.0, false),
            (0.9, 0.0, false),
            (0.9, 0.0, true),
            (0.5, 0.3, false),
            (0.5, 0.3, true),
        ] {
            let scales = displacement_scales(&lrs, mu, d, nesterov);
            for s in 0..lrs.len() {
                let lambda = simulate(&lrs, mu, d, nesterov, s);
                let expect = if lrs[s] == 0.0 { 0.0 } else { lambda / lrs[s] };
                assert!(
                    (scales[s] - expect).abs() < 1e-12,
                    "mu={mu} d={d} nesterov={nesterov} s={s}: {} vs {expect}",
                    scales[s]
                );
            }
        }
    }
}
