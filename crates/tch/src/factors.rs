//! Per-example update factors of a traced layer (docs/method.md §2).
//!
//! From one ordinary forward and backward pass: the layer input `a` and
//! `δ = ∂L_batch/∂z` for every example of the batch. With learning rate `η`:
//!
//! Each kind computes its own ([`crate::kinds`]: [`crate::kinds::linear`],
//! [`crate::kinds::conv2d`]); generally `u` is the (unfolded) input, `v =
//! −η·δ` and `ΔW_i = v_i u_iᵀ`, or `u` empty and `v = [ΔW_i | Δb_i]` where
//! the full update is the smaller record.
//!
//! Everything stays on the device; [`Factors::start_to_host`] converts each
//! factor to the run's stored type there and copies it in one contiguous
//! transfer (asynchronously into pinned memory on CUDA).
use crate::{Result, kinds};
use reptrace_format::{Dtype, TracedLayer};
use reptrace_record::FactorValues;
use tch::{Device, Kind, Tensor};

pub use crate::kinds::conv2d::{factors as conv2d_factors, unfold};
pub use crate::kinds::linear::factors as linear_factors;

/// One layer's factors for a batch, on the device, rows = examples.
#[derive(Debug)]
pub struct Factors {
    /// `B × u_len` (`B × 0` for Conv2d storage full).
    pub u: Tensor,
    /// `B × v_len`.
    pub v: Tensor,
    /// `‖ΔW_i‖_F` per example (bias excluded), `B`; `None` where the
    /// recorder computes it from the stored factors (Linear).
    pub update_norm: Option<Tensor>,
}

/// The factors copied to the host, row-major, ready to be handed to
/// [`reptrace_record::Recorder::updates_owned`]: `f32`, or for an f16 run
/// on a CUDA device `f16` converted there (on the CPU the recorder rounds
/// an f16 run's values on its writer thread).
#[derive(Debug, Clone, PartialEq)]
pub struct HostFactors {
    /// [`Factors::u`]: `B × u_len` values (none for Conv2d storage full).
    pub u: FactorValues,
    /// [`Factors::v`]: `B × v_len` values.
    pub v: FactorValues,
    /// [`Factors::update_norm`]: `‖ΔW_i‖_F` per example (bias excluded), `B`
    /// values, `f32` whatever the stored type (`None`: the recorder computes
    /// it from the stored factors).
    pub update_norm: Option<Vec<f32>>,
}

/// Factors on their way to the host ([`Factors::start_to_host`]): on a CUDA
/// device, asynchronous copies into page-locked (pinned) host memory that
/// are only complete after the device has been synchronised; on the CPU,
/// the tensors themselves.
#[derive(Debug)]
pub struct InFlight {
    u: Tensor,
    v: Tensor,
    update_norm: Option<Tensor>,
}

impl Factors {
    /// Copies the factors of a run recorded in `dtype` to the host (an f16
    /// run's converted on a CUDA device, so half the bytes travel), one
    /// contiguous copy per factor.
    /// Synchronous; the training loop uses [`Factors::start_to_host`].
    pub fn to_host(&self, dtype: Dtype) -> Result<HostFactors> {
        let flight = self.start_to_host(dtype)?;
        if let Device::Cuda(i) = self.v.device() {
            tch::Cuda::synchronize(i as i64);
        }
        flight.finish()
    }

    /// Starts copying the factors of a run recorded in `dtype` to the host
    /// ([`HostFactors`] says in which type). On a CUDA device
    /// the f16 conversion runs on the device and the copies are
    /// asynchronous (non-blocking, into pinned memory); the caller
    /// synchronises the device once for all layers of a step before
    /// [`InFlight::finish`]. On the CPU nothing is copied yet.
    pub fn start_to_host(&self, dtype: Dtype) -> Result<InFlight> {
        let kind = match (dtype, self.v.device()) {
            // On the CPU an f16 run's factors stay f32: the recorder's writer
            // thread rounds them in bulk, off the training thread.
            (Dtype::F32, _) | (Dtype::F16, Device::Cpu) => Kind::Float,
            (Dtype::F16, _) => Kind::Half,
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
            update_norm: self
                .update_norm
                .as_ref()
                .map(|n| start(n, Kind::Float))
                .transpose()?,
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
            Ok(match t.kind() {
                Kind::Half => FactorValues::F16(copy::<half::f16>(t)?),
                _ => FactorValues::F32(copy::<f32>(t)?),
            })
        };
        Ok(HostFactors {
            u: values(&self.u)?,
            v: values(&self.v)?,
            update_norm: self.update_norm.as_ref().map(copy::<f32>).transpose()?,
        })
    }
}

/// The factors of a traced layer for a batch, as its kind computes them
/// ([`crate::kinds::Kind::factors`]).
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
    kinds::of(layer)?.factors(input, delta, lr)
}
