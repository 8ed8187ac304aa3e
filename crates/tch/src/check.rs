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

/// Compares the applied gradient (`weight_grad`, `bias_grad`) with the
/// records of one layer: its input and `δ` for the step. Returns the
/// measurement, or the one-line reason when the two differ by more than
/// one scale (`Ok(Err(..))`).
pub fn measure(
    layer: TracedLayer<'_>,
    input: &Tensor,
    delta: &Tensor,
    weight_grad: &Tensor,
    bias_grad: Option<&Tensor>,
    seed: u64,
) -> Result<std::result::Result<Measured, String>> {
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
    let [ff, af, aa, mm, norm2] = stats[..] else {
        return Ok(Err("the check measured nothing".into()));
    };
    if !(ff.is_finite() && aa.is_finite()) {
        return Ok(Err("the gradient holds inf or NaN".into()));
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
    let fitted = if ff > 0.0 { af / ff } else { 1.0 };
    let at_one = rel_at(1.0);
    // κ = 1 unless a scale explains the difference better than rounding does.
    let (scale, relative) = if at_one <= SCALE_SNAP.max(4.0 * rel_at(fitted)) {
        (1.0, at_one)
    } else {
        (fitted, rel_at(fitted))
    };
    let prec = precision(delta.kind());
    let tol = tolerance(prec);
    if relative > tol {
        return Ok(Err(format!(
            "the gradient the optimizer is about to apply differs from the sum of the recorded \
             per-example gradients by {relative:.3e} (relative, {prec}; tolerance {tol}) beyond one \
             scale factor: something edits gradients between backward and the step (value \
             clipping, noise, a gradient hook), which cannot be traced"
        )));
    }
    Ok(Ok(Measured {
        scale,
        relative,
        grad_norm: norm2.sqrt(),
    }))
}
