//! Per-example update factors of a traced layer (docs/method.md §2).
//!
//! From one ordinary forward and backward pass: the layer input `a` and
//! `δ = ∂L_batch/∂z` for every example of the batch. With learning rate `η`:
//!
//! - Linear: `u = a` (`B × in`), `v = −η·δ` (`B × out`); `ΔW_i = v_i u_iᵀ`.
//! - Conv2d, storage factors: `u = unfold(a)` (`B × C_in·kh·kw × P`, rows in
//!   PyTorch's im2col order `(c_in, kh, kw)`), `v = −η·δ` (`B × C_out × P`);
//!   `ΔW_i = v_i u_iᵀ`.
//! - Conv2d, storage full: `u` empty, `v = [ΔW_i | Δb_i]`
//!   (`B × (C_out·C_in·kh·kw + C_out)`), computed on the device with `bmm`.
//!
//! Everything stays on the device; [`Factors::start_to_host`] converts each
//! factor to the run's stored type there and copies it in one contiguous
//! transfer (asynchronously into pinned memory on CUDA).
use crate::Result;
use reptrace_format::{Conv2dSpec, Dtype, Storage, TracedLayer};
use reptrace_record::FactorValues;
use tch::{Device, Kind, Tensor};

/// One layer's factors for a batch, on the device, rows = examples.
#[derive(Debug)]
pub struct Factors {
    /// `B × u_len` (`B × 0` for Conv2d storage full).
    pub u: Tensor,
    /// `B × v_len`.
    pub v: Tensor,
    /// `‖ΔW_i‖_F` per example (bias excluded), `B`.
    pub update_norm: Tensor,
}

/// The factors copied to the host, row-major, in the run's stored type,
/// ready to be handed to [`reptrace_record::Recorder::updates_owned`].
#[derive(Debug, Clone, PartialEq)]
pub struct HostFactors {
    /// [`Factors::u`] in the stored type: `B × u_len` values (none for
    /// Conv2d storage full).
    pub u: FactorValues,
    /// [`Factors::v`] in the stored type: `B × v_len` values.
    pub v: FactorValues,
    /// [`Factors::update_norm`]: `‖ΔW_i‖_F` per example (bias excluded), `B`
    /// values, `f32` whatever the stored type.
    pub update_norm: Vec<f32>,
}

/// Factors on their way to the host ([`Factors::start_to_host`]): on a CUDA
/// device, asynchronous copies into page-locked (pinned) host memory that
/// are only complete after the device has been synchronised; on the CPU,
/// the tensors themselves.
#[derive(Debug)]
pub struct InFlight {
    u: Tensor,
    v: Tensor,
    update_norm: Tensor,
    dtype: Dtype,
}

impl Factors {
    /// Copies the factors to the host in `dtype` (converted on the device
    /// for f16, so half the bytes travel), one contiguous copy per factor.
    /// Synchronous; the training loop uses [`Factors::start_to_host`].
    pub fn to_host(&self, dtype: Dtype) -> Result<HostFactors> {
        let flight = self.start_to_host(dtype)?;
        if let Device::Cuda(i) = self.v.device() {
            tch::Cuda::synchronize(i as i64);
        }
        flight.finish()
    }

    /// Starts copying the factors to the host in `dtype`. On a CUDA device
    /// the f16 conversion runs on the device and the copies are
    /// asynchronous (non-blocking, into pinned memory); the caller
    /// synchronises the device once for all layers of a step before
    /// [`InFlight::finish`]. On the CPU nothing is copied yet.
    pub fn start_to_host(&self, dtype: Dtype) -> Result<InFlight> {
        let kind = match dtype {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
        };
        let start = |t: &Tensor, kind: Kind| -> Result<Tensor> {
            let t = t.f_to_kind(kind)?;
            Ok(match t.device() {
                Device::Cpu => t,
                _ => t
                    .f_contiguous()?
                    .f_to_device_(Device::Cpu, kind, true, false)?,
            })
        };
        Ok(InFlight {
            u: start(&self.u, kind)?,
            v: start(&self.v, kind)?,
            update_norm: start(&self.update_norm, Kind::Float)?,
            dtype,
        })
    }
}

impl InFlight {
    /// The host factors; on CUDA only after the device was synchronised.
    pub fn finish(self) -> Result<HostFactors> {
        fn copy<T: tch::kind::Element + Clone>(t: &Tensor) -> Result<Vec<T>> {
            let n = t.numel();
            let mut out = vec![T::ZERO; n];
            t.f_copy_data(&mut out, n)?;
            Ok(out)
        }
        let values = |t: &Tensor| -> Result<FactorValues> {
            Ok(match self.dtype {
                Dtype::F32 => FactorValues::F32(copy::<f32>(t)?),
                Dtype::F16 => FactorValues::F16(copy::<half::f16>(t)?),
            })
        };
        Ok(HostFactors {
            u: values(&self.u)?,
            v: values(&self.v)?,
            update_norm: copy::<f32>(&self.update_norm)?,
        })
    }
}

/// The factors of a traced layer for a batch.
///
/// `input` is the layer input (`B × in` or `B × C_in × H × W`), `delta` the
/// gradient of the batch loss at the layer output (same shape as the
/// output), `lr` the step's learning rate.
pub fn layer_factors(
    layer: TracedLayer<'_>,
    input: &Tensor,
    delta: &Tensor,
    lr: f64,
) -> Result<Factors> {
    match layer {
        TracedLayer::Linear(_) => linear_factors(input, delta, lr),
        TracedLayer::Conv2d(c) => conv2d_factors(c, input, delta, lr),
    }
}

/// Linear: `u = a`, `v = −η·δ`, `‖ΔW_i‖ = ‖v_i‖·‖u_i‖`.
pub fn linear_factors(input: &Tensor, delta: &Tensor, lr: f64) -> Result<Factors> {
    let u = input.f_detach()?.f_contiguous()?;
    let v = delta.f_detach()?.f_mul_scalar(-lr)?.f_contiguous()?;
    let update_norm = row_norms(&v)?.f_mul(&row_norms(&u)?)?;
    Ok(Factors { u, v, update_norm })
}

/// Euclidean norm of each row of a `B × n` tensor.
fn row_norms(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_mul(t)?
        .f_sum_dim_intlist(&[1i64][..], false, None::<Kind>)?
        .f_sqrt()?)
}

/// The unfolded input of a Conv2d layer: `B × C_in·kh·kw × P`.
pub fn unfold(spec: &Conv2dSpec, input: &Tensor) -> Result<Tensor> {
    let i = |v: [usize; 2]| [v[0] as i64, v[1] as i64];
    Ok(input.f_detach()?.f_im2col(
        i(spec.kernel),
        i(spec.dilation),
        i(spec.padding),
        i(spec.stride),
    )?)
}

/// Conv2d factors (or full per-example matrices, as `spec.storage` says).
pub fn conv2d_factors(
    spec: &Conv2dSpec,
    input: &Tensor,
    delta: &Tensor,
    lr: f64,
) -> Result<Factors> {
    let b = input.size().first().copied().unwrap_or(0);
    let (c_out, k, p) = (
        spec.out_channels as i64,
        spec.patch_len() as i64,
        spec.positions() as i64,
    );
    let u = unfold(spec, input)?; // B × K × P
    let v = delta
        .f_detach()?
        .f_reshape([b, c_out, p])?
        .f_mul_scalar(-lr)?; // B × C_out × P
    match spec.storage {
        Storage::Factors => {
            // ‖v uᵀ‖_F² = Σ (vᵀv) ∘ (uᵀu): P×P Gram matrices, cheaper than ΔW
            // exactly when factors are the smaller storage.
            let gv = v.f_transpose(1, 2)?.f_bmm(&v)?;
            let gu = u.f_transpose(1, 2)?.f_bmm(&u)?;
            let update_norm = gv
                .f_mul(&gu)?
                .f_sum_dim_intlist(&[1i64, 2][..], false, None::<Kind>)?
                .f_clamp_min(0.0)?
                .f_sqrt()?;
            Ok(Factors {
                u: u.f_reshape([b, k * p])?,
                v: v.f_reshape([b, c_out * p])?,
                update_norm,
            })
        }
        Storage::Full => {
            let dw = v.f_bmm(&u.f_transpose(1, 2)?)?; // B × C_out × K
            let update_norm = dw
                .f_mul(&dw)?
                .f_sum_dim_intlist(&[1i64, 2][..], false, None::<Kind>)?
                .f_sqrt()?;
            let dw = dw.f_reshape([b, c_out * k])?;
            let full = if spec.bias {
                let db = v.f_sum_dim_intlist(&[2i64][..], false, None::<Kind>)?;
                Tensor::f_cat(&[dw, db], 1)?
            } else {
                dw
            };
            Ok(Factors {
                u: Tensor::f_zeros([b, 0], (Kind::Float, input.device()))?,
                v: full,
                update_norm,
            })
        }
    }
}
