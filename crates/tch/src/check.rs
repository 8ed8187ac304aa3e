//! The per-step gradient check (docs/python.md, "Training loops").
//!
//! Right before the optimizer step, each traced layer's gradient as the
//! optimizer will apply it (`.grad()`, after any clipping) is compared with
//! the sum of the step's per-example gradients, `Σ_i δ_i u_iᵀ` for the
//! weight and `Σ_i δ_i` for the bias. The weight gradient is compared along
//! one pseudo-random direction `r` per step and layer (`G r` against
//! `Σ_i δ_i (u_iᵀ r)`: matrix-vector products, not a second weight
//! gradient), the bias gradient whole. The two may differ by one scalar `κ`
//! (clipping by norm, a loss scale), which is measured by least squares and
//! folded into the records; any other difference (value clipping, noise, a
//! hook that edits gradients) is refused.
use crate::{Result, kinds};
use reptrace_format::TracedLayer;
use tch::{Device, Kind, Tensor};

/// Relative tolerance of the check by precision (`f32`, `bf16`, `f16`): two
/// summations of the same products in float32, or rounded to the
/// low-precision type under autocast.
pub fn tolerance(precision: &str) -> f64 {
    match precision {
        "bf16" => 3e-2,
        "f16" => 4e-3,
        _ => 1e-4,
    }
}

/// κ stays 1 when the relative difference at κ = 1 is within this, or
/// within 4 times the difference the fitted κ leaves: rounding, not scaling;
/// the records stay as computed.
pub const SCALE_SNAP: f64 = 1e-6;

/// What the check measured for one layer and step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// κ: the applied gradient over the records' sum (1 when they agree to
    /// rounding).
    pub scale: f64,
    /// The relative difference left after κ.
    pub relative: f64,
    /// `‖(∇W, ∇b)‖` of the applied gradient.
    pub grad_norm: f64,
}

/// The precision a layer ran in, from the kind of its output gradient.
pub fn precision(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        _ => "f32",
    }
}

/// A direction with entries in [−1, 1) from a seeded generator (SplitMix64),
/// built on the host so that tch's own random state, which the training loop
/// may use (dropout, shuffling), is never touched.
fn direction(len: i64, seed: u64, device: Device) -> Result<Tensor> {
    let mut state = seed;
    let values: Vec<f32> = (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect();
    Ok(Tensor::f_from_slice(&values)?.f_to_device(device)?)
}

/// What the check measured of one layer and step, before its verdict:
/// with `a` the applied gradient along the direction (and the bias
/// gradient), `f` the records' sum the same way and `m` the magnitudes of
/// the summed terms, the inner products the verdict needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Terms {
    ff: f64,
    af: f64,
    aa: f64,
    mm: f64,
    norm2: f64,
    precision: &'static str,
}

/// The least-squares scale `Σ a·f / Σ f·f` over every layer of the step
/// (NaN when there is none): clipping by the global norm and a loss scale
/// scale every layer alike, and the layers whose records fit it well fix it
/// for one whose per-example gradients nearly cancel (a classifier head
/// over balanced classes), which fits its own scale only to rounding.
pub fn shared_scale(terms: &[Terms]) -> f64 {
    let (af, ff) = terms
        .iter()
        .filter(|t| t.af.is_finite() && t.ff.is_finite())
        .fold((0.0, 0.0), |(af, ff), t| (af + t.af, ff + t.ff));
    if ff > 0.0 { af / ff } else { f64::NAN }
}

impl Terms {
    /// κ and the relative difference it leaves, or the one-line reason the
    /// two differ by more than one scale. κ stays 1 unless a scale explains
    /// the difference better than rounding does; then it is the step's
    /// `shared` scale ([`shared_scale`]) unless the layer's own
    /// least-squares scale explains it clearly better.
    pub fn verdict(&self, shared: f64) -> std::result::Result<Measured, String> {
        let Terms {
            ff,
            af,
            aa,
            mm,
            norm2,
            precision,
        } = *self;
        if !(ff.is_finite() && aa.is_finite() && mm.is_finite()) {
            return Err("the gradient holds inf or NaN".into());
        }
        let mag = mm.sqrt();
        let rel_at = |k: f64| {
            let diff = (aa - 2.0 * k * af + k * k * ff).max(0.0).sqrt();
            let denom = k.abs() * mag;
            if denom > 0.0 {
                diff / denom
            } else if aa == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }
        };
        let fitted = if ff > 0.0 { af / ff } else { f64::NAN };
        let noise = if fitted.is_finite() {
            SCALE_SNAP.max(4.0 * rel_at(fitted))
        } else {
            SCALE_SNAP
        };
        let (mut scale, mut relative) = (1.0, rel_at(1.0));
        if fitted.is_finite() && relative > noise {
            (scale, relative) = (fitted, rel_at(fitted));
            if shared.is_finite() && shared != 0.0 && rel_at(shared) <= noise {
                (scale, relative) = (shared, rel_at(shared));
            }
        }
        let tol = tolerance(precision);
        if relative > tol {
            return Err(format!(
                "the gradient the optimizer is about to apply differs from the sum of the \
                 recorded per-example gradients by {relative:.3e} (relative, {precision}; \
                 tolerance {tol}) beyond one scale factor: something edits gradients between \
                 backward and the step (value clipping, noise, a gradient hook), which cannot \
                 be traced"
            ));
        }
        Ok(Measured {
            scale,
            relative,
            grad_norm: norm2.sqrt(),
        })
    }
}

/// Measures the applied gradient (`weight_grad`, `bias_grad`) against the
/// records of one layer (its input and `δ` for the step) along a direction
/// drawn from `seed`; [`Terms::verdict`] judges it.
pub fn measure(
    layer: TracedLayer<'_>,
    input: &Tensor,
    delta: &Tensor,
    weight_grad: &Tensor,
    bias_grad: Option<&Tensor>,
    seed: u64,
) -> Result<Terms> {
    let device = delta.device();
    let g = delta.f_detach()?.f_to_kind(Kind::Float)?;
    let gw = weight_grad
        .f_detach()?
        .f_to_kind(Kind::Float)?
        .f_reshape([weight_grad.size()[0], -1])?;
    let r = direction(gw.size()[1], seed, device)?;
    let products = kinds::of(layer)?.check_products(input, &g, &r)?;
    let (rec_w, mag_w, rec_b, mag_b) = (
        products.weight,
        products.weight_magnitude,
        products.bias,
        products.bias_magnitude,
    );
    let mut applied = vec![gw.f_mv(&r)?];
    let mut recorded = vec![rec_w];
    let mut magnitude = vec![mag_w];
    let mut norm2 = gw
        .f_to_kind(Kind::Double)?
        .f_square()?
        .f_sum(Kind::Double)?;
    if let Some(gb) = bias_grad {
        let gb = gb.f_detach()?.f_to_kind(Kind::Float)?.f_reshape([-1])?;
        norm2 = norm2.f_add(
            &gb.f_to_kind(Kind::Double)?
                .f_square()?
                .f_sum(Kind::Double)?,
        )?;
        applied.push(gb);
        recorded.push(rec_b);
        magnitude.push(mag_b);
    }
    let double =
        |v: Vec<Tensor>| -> Result<Tensor> { Ok(Tensor::f_cat(&v, 0)?.f_to_kind(Kind::Double)?) };
    let (a, f, m) = (double(applied)?, double(recorded)?, double(magnitude)?);
    let stats = Tensor::f_stack(
        &[
            f.f_dot(&f)?,
            a.f_dot(&f)?,
            a.f_dot(&a)?,
            m.f_dot(&m)?,
            norm2,
        ],
        0,
    )?
    .f_to_device(Device::Cpu)?;
    let stats = Vec::<f64>::try_from(&stats)?;
    // Five values by construction; a missing one reads as NaN (refused).
    let at = |i: usize| stats.get(i).copied().unwrap_or(f64::NAN);
    Ok(Terms {
        ff: at(0),
        af: at(1),
        aa: at(2),
        mm: at(3),
        norm2: at(4),
        precision: precision(delta.kind()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(x: &[f64], y: &[f64]) -> f64 {
        x.iter().zip(y).map(|(a, b)| a * b).sum()
    }

    /// The terms of applied `a`, recorded `f` and magnitudes `m`.
    fn terms(a: &[f64], f: &[f64], m: &[f64]) -> Terms {
        Terms {
            ff: dot(f, f),
            af: dot(a, f),
            aa: dot(a, a),
            mm: dot(m, m),
            norm2: 1.0,
            precision: "f32",
        }
    }

    #[test]
    fn agreeing_gradients_keep_scale_one_and_clipping_is_measured() -> Result<(), String> {
        let f = [0.3, -0.2, 0.7];
        let m = [0.5, 0.4, 0.9];
        let same = terms(&f, &f, &m).verdict(f64::NAN)?;
        assert_eq!(same.scale, 1.0);
        let half: Vec<f64> = f.iter().map(|x| 0.5 * x).collect();
        let clipped = terms(&half, &f, &m).verdict(f64::NAN)?;
        assert!((clipped.scale - 0.5).abs() < 1e-12, "{clipped:?}");
        Ok(())
    }

    #[test]
    fn a_cancelling_layer_takes_the_scale_the_step_shares() -> Result<(), String> {
        // Per-example terms of magnitude 100 that nearly cancel: the layer's
        // own least-squares scale (0.5025) is off by its rounding; the
        // step's shared scale (0.5) explains it within that rounding.
        let f = [1.0, -1.0, 1e-3];
        let a = [0.505, -0.5, 0.5e-3];
        let m = [100.0, 100.0, 0.0];
        let t = terms(&a, &f, &m);
        let own = t.verdict(f64::NAN)?;
        assert!((own.scale - 0.5025).abs() < 1e-4, "{own:?}");
        let shared = shared_scale(&[t, terms(&[0.5, 1.0], &[1.0, 2.0], &[1.0, 2.0])]);
        assert!(shared.is_finite());
        let chosen = t.verdict(0.5)?;
        assert_eq!(chosen.scale, 0.5);
        Ok(())
    }

    #[test]
    fn differences_beyond_one_scale_are_refused_in_one_line() {
        let f = [1.0, 0.0, 0.0];
        let a = [0.0, 1.0, 0.0]; // orthogonal: value clipping or noise
        let m = [1.0, 1.0, 1.0];
        let e = terms(&a, &f, &m).verdict(f64::NAN);
        let one_line = |e: &String| e.contains("beyond one scale factor") && !e.contains('\n');
        assert!(e.as_ref().is_err_and(one_line), "{e:?}");
        let nan = terms(&[f64::NAN], &[1.0], &[1.0]).verdict(1.0);
        assert!(
            nan.as_ref().is_err_and(|e| e.contains("inf or NaN")),
            "{nan:?}"
        );
    }
}
