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

/// The hyper-parameters one step of SGD used for one layer (its parameter
/// group's values at that step), as the `layer_steps` table records them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepHyper {
    /// Learning rate η_t.
    pub lr: f64,
    /// Momentum μ_t (0: none; PyTorch then leaves the buffer untouched).
    pub momentum: f64,
    /// Dampening τ_t.
    pub dampening: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// The optimizer skipped the step (a gradient scaler found inf/NaN):
    /// no update, the momentum buffer untouched.
    pub skipped: bool,
}

/// `λ_s / η_s` for every step `s` of a run with per-step learning rates `lrs`
/// and one momentum, dampening and Nesterov setting for the whole run.
///
/// Steps with `η_s = 0` stored zero updates; their scale is 0.
pub fn displacement_scales(lrs: &[f64], momentum: f64, dampening: f64, nesterov: bool) -> Vec<f64> {
    let steps: Vec<StepHyper> = lrs
        .iter()
        .map(|&lr| StepHyper {
            lr,
            momentum,
            dampening,
            nesterov,
            skipped: false,
        })
        .collect();
    sgd_displacement_scales(&steps)
}

/// `λ_s / η_s` for every step of a layer whose hyper-parameters change from
/// step to step (PyTorch's `torch.optim.SGD` reads them from the parameter
/// group at every step: a scheduler may cycle the momentum).
///
/// With `F_s` the displacement a unit in the momentum buffer after step `s`
/// causes in the later steps (`F_{T−1} = 0`), computed backwards:
///
/// - a skipped step, or one with `μ_t = 0`, leaves the buffer as it is:
///   `F_{t−1} = F_t`;
/// - otherwise `F_{t−1} = μ_t (η_t·n_t + F_t)` with `n_t = μ_t` under
///   Nesterov and 1 without;
///
/// and with `b_s = 1` at the step that creates the buffer (the first
/// non-skipped step with momentum) and `1 − τ_s` after it:
///
/// - `λ_s = η_s` when `μ_s = 0`,
/// - `λ_s = b_s (η_s + F_s)` (heavy ball),
/// - `λ_s = η_s + b_s (η_s μ_s + F_s)` (Nesterov).
///
/// Skipped steps and steps with `η_s = 0` get 0.
pub fn sgd_displacement_scales(steps: &[StepHyper]) -> Vec<f64> {
    let n = steps.len();
    // The step whose momentum creates the buffer (PyTorch: buf = clone(d)).
    let first = steps.iter().position(|h| !h.skipped && h.momentum != 0.0);
    let mut scales = vec![0.0; n];
    let mut future = 0.0;
    for s in (0..n).rev() {
        let h = steps[s];
        if h.skipped {
            continue;
        }
        if h.momentum == 0.0 {
            scales[s] = if h.lr == 0.0 { 0.0 } else { 1.0 };
            continue;
        }
        let b = if Some(s) == first {
            1.0
        } else {
            1.0 - h.dampening
        };
        let lambda = if h.nesterov {
            h.lr + b * (h.lr * h.momentum + future)
        } else {
            b * (h.lr + future)
        };
        scales[s] = if h.lr == 0.0 { 0.0 } else { lambda / h.lr };
        let carried = if h.nesterov { h.momentum } else { 1.0 };
        future = h.momentum * (h.lr * carried + future);
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

    /// PyTorch's SGD with per-step hyper-parameters, for a unit gradient at
    /// step `s` only: the buffer is created at the first step with
    /// momentum, untouched by steps without momentum and by skipped ones.
    fn simulate_steps(steps: &[StepHyper], s: usize) -> f64 {
        let (mut w, mut buf) = (0.0f64, None::<f64>);
        for (t, h) in steps.iter().enumerate() {
            if h.skipped {
                continue;
            }
            let g = if t == s { 1.0 } else { 0.0 };
            let mut d = g;
            if h.momentum != 0.0 {
                let b = match buf {
                    None => g,
                    Some(b) => h.momentum * b + (1.0 - h.dampening) * g,
                };
                buf = Some(b);
                d = if h.nesterov { g + h.momentum * b } else { b };
            }
            w -= h.lr * d;
        }
        -w
    }

    #[test]
    fn per_step_hyper_parameters_match_simulated_sgd() {
        let mut steps = Vec::new();
        for t in 0..12 {
            let x = t as f64;
            steps.push(StepHyper {
                lr: 0.1 / (1.0 + x),
                // Cycling momentum, with two steps of none.
                momentum: if t == 3 || t == 7 {
                    0.0
                } else {
                    0.85 + 0.01 * x
                },
                dampening: if t % 2 == 0 { 0.1 } else { 0.0 },
                nesterov: false,
                skipped: t == 5 || t == 9,
            });
        }
        // The buffer is created late when the first steps have no momentum.
        let mut late = steps.clone();
        late[0].momentum = 0.0;
        late[1].skipped = true;
        for nesterov in [false, true] {
            for run in [&steps, &late] {
                let run: Vec<StepHyper> = run
                    .iter()
                    .map(|h| StepHyper {
                        nesterov,
                        dampening: if nesterov { 0.0 } else { h.dampening },
                        ..*h
                    })
                    .collect();
                let scales = sgd_displacement_scales(&run);
                for s in 0..run.len() {
                    let expect = if run[s].skipped {
                        0.0
                    } else {
                        simulate_steps(&run, s) / run[s].lr
                    };
                    assert!(
                        (scales[s] - expect).abs() < 1e-12,
                        "nesterov={nesterov} s={s}: {} vs {expect}",
                        scales[s]
                    );
                }
            }
        }
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
