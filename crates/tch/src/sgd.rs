//! Stochastic gradient descent with PyTorch's `torch.optim.SGD` semantics,
//! and the per-step learning rate of a [`LrSchedule`].
//!
//! For each parameter `p` with gradient `g` at a step with learning rate `η`:
//!
//! ```text
//! d = g + wd·p                                   (weight decay)
//! buf = d                  on the first step     (momentum μ ≠ 0)
//! buf = μ·buf + (1 − dampening)·d   afterwards
//! d = d + μ·buf  (Nesterov)  or  d = buf
//! p = p − η·d
//! ```
use crate::Result;
use reptrace_format::LrSchedule;
use tch::Tensor;

/// SGD state: hyper-parameters and one momentum buffer per parameter.
#[derive(Debug)]
pub struct Sgd {
    momentum: f64,
    dampening: f64,
    nesterov: bool,
    weight_decay: f64,
    buffers: Vec<Option<Tensor>>,
}

impl Sgd {
    /// A new optimizer for `n_params` parameters.
    pub fn new(
        n_params: usize,
        momentum: f64,
        dampening: f64,
        nesterov: bool,
        weight_decay: f64,
    ) -> Self {
        Self {
            momentum,
            dampening,
            nesterov,
            weight_decay,
            buffers: (0..n_params).map(|_| None).collect(),
        }
    }

    /// Updates `params` in place from `grads` (same order) with learning rate `lr`.
    pub fn step(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for ((p, g), buf) in params.iter().zip(grads).zip(&mut self.buffers) {
            let mut d = if self.weight_decay != 0.0 {
                g.f_add(&p.f_mul_scalar(self.weight_decay)?)?
            } else {
                g.shallow_clone()
            };
            if self.momentum != 0.0 {
                let b = match buf.take() {
                    None => d.f_detach_copy()?,
                    Some(mut b) => {
                        let _ = b.f_mul_scalar_(self.momentum)?;
                        let _ = b.f_add_(&d.f_mul_scalar(1.0 - self.dampening)?)?;
                        b
                    }
                };
                d = if self.nesterov {
                    d.f_add(&b.f_mul_scalar(self.momentum)?)?
                } else {
                    b.shallow_clone()
                };
                *buf = Some(b);
            }
            let mut p = p.shallow_clone();
            let _ = p.f_sub_(&d.f_mul_scalar(lr)?)?;
        }
        Ok(())
    }
}

/// The learning rate of step `step` (of `total_steps`), in epoch `epoch`.
///
/// - constant: `lr`;
/// - step decay: `lr · γ^⌊epoch / every⌋`;
/// - cosine: `min + (lr − min)·(1 + cos(π·step/total_steps))/2`.
pub fn learning_rate(
    schedule: &LrSchedule,
    lr: f64,
    step: usize,
    epoch: usize,
    total_steps: usize,
) -> f64 {
    match schedule {
        LrSchedule::Constant => lr,
        LrSchedule::Step {
            every_epochs,
            gamma,
        } => {
            let k = epoch / (*every_epochs).max(1) as usize;
            lr * gamma.powi(k as i32)
        }
        LrSchedule::Cosine { min_lr } => {
            let t = step as f64 / total_steps.max(1) as f64;
            min_lr + (lr - min_lr) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
        }
        // Refused by TrainConfig::validate; the base rate is the safe answer.
        LrSchedule::External { .. } => lr,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The update rule against a scalar f64 simulation of PyTorch's formula.
    #[test]
    fn matches_formula() {
        for (mu, d, nesterov, wd) in [
            (0.0, 0.0, false, 0.0),
            (0.9, 0.0, false, 0.01),
            (0.8, 0.2, true, 0.05),
        ] {
            let p = Tensor::from_slice(&[1.0f64, -2.0])
                .f_set_requires_grad(true)
                .unwrap();
            let mut sgd = Sgd::new(1, mu, d, nesterov, wd);
            let (mut q, mut buf): ([f64; 2], Option<[f64; 2]>) = ([1.0, -2.0], None);
            let grads = [[0.5, 0.25], [-1.0, 2.0], [0.125, -0.5]];
            let lrs = [0.1, 0.05, 0.2];
            for (g, lr) in grads.iter().zip(lrs) {
                sgd.step(&[p.shallow_clone()], &[Tensor::from_slice(g)], lr)
                    .unwrap();
                let dd: Vec<f64> = (0..2).map(|i| g[i] + wd * q[i]).collect();
                let b = match buf {
                    None => [dd[0], dd[1]],
                    Some(b) => [mu * b[0] + (1.0 - d) * dd[0], mu * b[1] + (1.0 - d) * dd[1]],
                };
                for i in 0..2 {
                    let step = if mu == 0.0 {
                        dd[i]
                    } else if nesterov {
                        dd[i] + mu * b[i]
                    } else {
                        b[i]
                    };
                    q[i] -= lr * step;
                }
                buf = Some(b);
            }
            let got =
                Vec::<f64>::try_from(&p.detach().to_kind(Kind::Double).to_device(Device::Cpu))
                    .unwrap();
            for i in 0..2 {
                assert!(
                    (got[i] - q[i]).abs() < 1e-12,
                    "{mu} {d} {nesterov} {wd}: {got:?} vs {q:?}"
                );
            }
        }
    }

    #[test]
    fn schedules() {
        let s = LrSchedule::Step {
            every_epochs: 2,
            gamma: 0.5,
        };
        assert_eq!(learning_rate(&s, 0.1, 0, 0, 10), 0.1);
        assert_eq!(learning_rate(&s, 0.1, 5, 2, 10), 0.05);
        assert_eq!(learning_rate(&s, 0.1, 9, 5, 10), 0.025);
        let c = LrSchedule::Cosine { min_lr: 0.01 };
        assert!((learning_rate(&c, 0.1, 0, 0, 10) - 0.1).abs() < 1e-15);
        assert!((learning_rate(&c, 0.1, 5, 0, 10) - 0.055).abs() < 1e-12);
        assert_eq!(learning_rate(&LrSchedule::Constant, 0.3, 7, 3, 10), 0.3);
    }
}
