//! Adam and AdamW with PyTorch's `torch.optim.Adam` / `AdamW` semantics
//! (no AMSGrad). Batch mode records each step's whole update; instance mode
//! records each example's gradient share and, per step and traced layer,
//! the step size and the preconditioner read from this optimizer's state
//! after the step ([`Adam::state`]; docs/method.md §6).
//!
//! For each parameter `p` with gradient `g` at step `t` (from 1) with
//! learning rate `η`:
//!
//! ```text
//! Adam:  g = g + wd·p                 AdamW:  p = p·(1 − η·wd)
//! m = β₁·m + (1 − β₁)·g
//! v = β₂·v + (1 − β₂)·g²
//! p = p − (η / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
use crate::Result;
use tch::Tensor;

/// Which weight decay: L2 added to the gradient (Adam) or decoupled (AdamW).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decay {
    /// `wd·p` is added to the gradient before the moment estimates (Adam).
    L2,
    /// The weights are scaled by `1 − η·wd` before the update (AdamW).
    Decoupled,
}

/// Adam state: hyper-parameters and the two moment estimates per parameter.
#[derive(Debug)]
pub struct Adam {
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    decay: Decay,
    step: i32,
    moments: Vec<Option<(Tensor, Tensor)>>,
}

impl Adam {
    /// A new optimizer for `n_params` parameters.
    pub fn new(
        n_params: usize,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
        decay: Decay,
    ) -> Self {
        Self {
            betas,
            eps,
            weight_decay,
            decay,
            step: 0,
            moments: (0..n_params).map(|_| None).collect(),
        }
    }

    /// The optimizer's step count (PyTorch's `state["step"]`): the number of
    /// steps taken so far.
    pub fn steps(&self) -> i64 {
        i64::from(self.step)
    }

    /// `[β₁, β₂]`.
    pub fn betas(&self) -> [f64; 2] {
        self.betas
    }

    /// The term added to the denominator.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The weight decay and how it is applied.
    pub fn weight_decay(&self) -> (f64, Decay) {
        (self.weight_decay, self.decay)
    }

    /// Parameter `i`'s moment estimates `(exp_avg, exp_avg_sq)` (`m`, `v`),
    /// or `None` before its first step.
    pub fn moments(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        self.moments.get(i)?.as_ref().map(|(m, v)| (m, v))
    }

    /// Parameter `i`'s state as the tracer reads it after a step
    /// ([`crate::trace::Tracer::step_adam`]); `None` before its first step.
    pub fn state(&self, i: usize) -> Option<crate::trace::AdamParam> {
        let (m, v) = self.moments(i)?;
        Some(crate::trace::AdamParam {
            step: self.steps(),
            exp_avg: m.shallow_clone(),
            exp_avg_sq: v.shallow_clone(),
        })
    }

    /// Updates `params` in place from `grads` (same order) with learning rate `lr`.
    pub fn step(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let [b1, b2] = self.betas;
        let correction1 = 1.0 - b1.powi(self.step);
        let correction2 = (1.0 - b2.powi(self.step)).sqrt();
        for ((p, g), state) in params.iter().zip(grads).zip(&mut self.moments) {
            let mut p = p.shallow_clone();
            let g = match self.decay {
                Decay::L2 if self.weight_decay != 0.0 => {
                    g.f_add(&p.f_mul_scalar(self.weight_decay)?)?
                }
                Decay::Decoupled if self.weight_decay != 0.0 => {
                    let _ = p.f_mul_scalar_(1.0 - lr * self.weight_decay)?;
                    g.shallow_clone()
                }
                _ => g.shallow_clone(),
            };
            let (mut m, mut v) = match state.take() {
                Some(s) => s,
                None => (g.f_zeros_like()?, g.f_zeros_like()?),
            };
            let _ = m.f_mul_scalar_(b1)?;
            let _ = m.f_add_(&g.f_mul_scalar(1.0 - b1)?)?;
            let _ = v.f_mul_scalar_(b2)?;
            let _ = v.f_add_(&g.f_mul(&g)?.f_mul_scalar(1.0 - b2)?)?;
            let denom = v
                .f_sqrt()?
                .f_div_scalar(correction2)?
                .f_add_scalar(self.eps)?;
            let _ = p.f_sub_(&m.f_div(&denom)?.f_mul_scalar(lr / correction1)?)?;
            *state = Some((m, v));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tch::nn::{self, OptimizerConfig};
    use tch::{Device, Kind};

    /// Against libtorch's own Adam and AdamW (through tch's optimizers) on
    /// the same gradients: the same parameters after every step.
    #[test]
    fn matches_libtorch() {
        let grads: Vec<Vec<f32>> = (0..6)
            .map(|s| {
                (0..5)
                    .map(|i| ((s * 7 + i * 3) % 11) as f32 / 5.0 - 1.0)
                    .collect()
            })
            .collect();
        let lrs = [0.01, 0.02, 0.005, 0.01, 0.03, 0.01];
        for (decay, wd) in [(Decay::L2, 0.0), (Decay::L2, 0.1), (Decay::Decoupled, 0.05)] {
            let vs = nn::VarStore::new(Device::Cpu);
            let w = vs
                .root()
                .var_copy("w", &Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.0, 0.25]));
            let mut theirs = match decay {
                Decay::L2 => nn::Adam {
                    wd,
                    ..Default::default()
                }
                .build(&vs, 0.01)
                .unwrap(),
                Decay::Decoupled => nn::AdamW {
                    wd,
                    ..Default::default()
                }
                .build(&vs, 0.01)
                .unwrap(),
            };
            let ours_p = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.0, 0.25]);
            let mut ours = Adam::new(1, [0.9, 0.999], 1e-8, wd, decay);
            for (g, &lr) in grads.iter().zip(&lrs) {
                let g = Tensor::from_slice(g);
                theirs.set_lr(lr);
                theirs.zero_grad();
                (&w * &g).sum(Kind::Float).backward();
                theirs.step();
                ours.step(&[ours_p.shallow_clone()], &[g], lr).unwrap();
                let a = Vec::<f32>::try_from(&w.detach()).unwrap();
                let b = Vec::<f32>::try_from(&ours_p).unwrap();
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-6 * (1.0 + x.abs()),
                        "{decay:?} wd {wd}: {a:?} vs {b:?}"
                    );
                }
            }
        }
    }
}
