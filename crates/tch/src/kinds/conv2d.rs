//! Conv2d (groups 1, zero padding): inputs `(batch, C_in, H, W)`.
//!
//! Factors, storage factors: `u = unfold(a)` (`B × C_in·kh·kw × P`, rows in
//! PyTorch's im2col order `(c_in, kh, kw)`), `v = −η·δ` (`B × C_out × P`);
//! `ΔW_i = v_i u_iᵀ`. Storage full: `u` empty, `v = [ΔW_i | Δb_i]`
//! (`B × (C_out·C_in·kh·kw + C_out)`), computed on the device with `bmm`.
//! Which of the two a layer records is [`storage`]'s rule.
use super::{CheckProducts, Kind};
use crate::factors::Factors;
use crate::{Error, Result};
use reptrace_format::{Conv2dSpec, Dtype, Mode, PaddingMode, Storage};
use tch::{Tensor, nn};

/// The inputs a Conv2d layer is traced for before its first input fixed
/// their size.
pub const UNSIZED_INPUT: &str = "(batch, C, H, W) inputs";

/// The spec of a traced Conv2d layer `name` like `tch::nn::conv2d(path,
/// in_dim, out_dim, kernel, config)`, but for the input and output sizes
/// and the storage (zeros and `Full` until [`at_first_input`] sets them).
/// Grouped convolutions and padding modes other than zeros are refused.
pub fn spec(
    name: &str,
    in_dim: i64,
    out_dim: i64,
    kernel: i64,
    config: &nn::ConvConfig,
) -> Result<Conv2dSpec> {
    if config.groups != 1 {
        return Err(Error::Trace(format!(
            "layer {name:?}: grouped convolutions (groups {}) are not traced",
            config.groups
        )));
    }
    if !matches!(config.padding_mode, nn::PaddingMode::Zeros) {
        return Err(Error::Trace(format!(
            "layer {name:?}: padding mode {:?}; only zeros is traced",
            config.padding_mode
        )));
    }
    let pair = |v: i64| [v as usize; 2];
    Ok(Conv2dSpec {
        name: name.to_owned(),
        in_channels: in_dim as usize,
        out_channels: out_dim as usize,
        kernel: pair(kernel),
        stride: pair(config.stride),
        padding: pair(config.padding),
        dilation: pair(config.dilation),
        groups: 1,
        padding_mode: PaddingMode::Zeros,
        input_hw: [0, 0],
        output_hw: [0, 0],
        bias: config.bias,
        traced: true,
        storage: Storage::Full,
    })
}

/// Whether an input of `size` fits a spec whose input size is not yet
/// known ([`spec`]): four dimensions, the layer's input channels.
pub fn fits_unsized(conv: &Conv2dSpec, size: &[usize]) -> bool {
    size.len() == 4 && size[1] == conv.in_channels
}

/// The spec of layer `name` ([`spec`]) completed from the shape of its
/// first input (`(batch, C, H, W)`) in a run of `mode`.
pub fn at_first_input(
    name: &str,
    conv: &Conv2dSpec,
    shape: &[usize],
    mode: Mode,
) -> Result<Conv2dSpec> {
    let &[_, _, h, w] = shape else {
        return Err(Error::Trace(format!(
            "layer {name}: input of shape {shape:?}; Conv2d layers are traced for (batch, C, H, W) inputs"
        )));
    };
    let spec = sized(conv, [h, w], mode).ok_or_else(|| {
        Error::Trace(format!(
            "layer {name}: input of shape {shape:?} is smaller than its kernel"
        ))
    })?;
    Ok(Conv2dSpec {
        name: name.to_owned(),
        ..spec
    })
}

/// `conv` for inputs of spatial size `input_hw` in a run of `mode`: its
/// output size and storage worked out; `None` when the input is smaller
/// than the kernel.
pub fn sized(conv: &Conv2dSpec, input_hw: [usize; 2], mode: Mode) -> Option<Conv2dSpec> {
    let out = |a: usize| {
        output_len(
            input_hw[a],
            conv.kernel[a],
            conv.stride[a],
            conv.padding[a],
            conv.dilation[a],
        )
    };
    let output_hw = [out(0)?, out(1)?];
    let patch = conv.in_channels * conv.kernel[0] * conv.kernel[1];
    let storage = storage(
        conv.out_channels,
        patch,
        output_hw[0] * output_hw[1],
        conv.bias,
        mode,
    );
    Some(Conv2dSpec {
        input_hw,
        output_hw,
        storage,
        ..conv.clone()
    })
}

/// Output size of a convolution or pooling along one axis; `None` when the
/// padded input is smaller than the kernel's span, or the stride is 0.
pub fn output_len(
    input: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Option<usize> {
    let span = dilation * (kernel.checked_sub(1)?) + 1;
    let padded = input + 2 * padding;
    if stride == 0 || padded < span {
        return None;
    }
    Some((padded - span) / stride + 1)
}

/// The storage rule of a Conv2d layer's records: in batch mode a record is
/// the whole update (full); in instance mode the smaller of factors and
/// full ([`Storage::for_conv2d`], shared with every other producer).
pub fn storage(
    out_channels: usize,
    patch_len: usize,
    positions: usize,
    bias: bool,
    mode: Mode,
) -> Storage {
    match mode {
        Mode::Batch => Storage::Full,
        Mode::Instance => Storage::for_conv2d(out_channels, patch_len, positions, bias),
    }
}

/// The unfolded input of a Conv2d layer: `B × C_in·kh·kw × P`.
pub fn unfold(spec: &Conv2dSpec, input: &Tensor) -> Result<Tensor> {
    Ok(input.f_detach()?.f_im2col(
        i(spec.kernel),
        i(spec.dilation),
        i(spec.padding),
        i(spec.stride),
    )?)
}

fn i(v: [usize; 2]) -> [i64; 2] {
    [v[0] as i64, v[1] as i64]
}

/// Conv2d factors (or full per-example matrices, as `spec.storage` says).
pub fn factors(spec: &Conv2dSpec, input: &Tensor, delta: &Tensor, lr: f64) -> Result<Factors> {
    factors_stored(spec, input, delta, lr, Dtype::F32)
}

/// [`factors`] with `update_norm` of the values a run of `dtype` stores:
/// for f16, of the factors rounded to f16 (and widened exactly).
pub fn factors_stored(
    spec: &Conv2dSpec,
    input: &Tensor,
    delta: &Tensor,
    lr: f64,
    dtype: Dtype,
) -> Result<Factors> {
    let stored = |t: &Tensor| -> Result<Tensor> {
        Ok(match dtype {
            Dtype::F32 => t.shallow_clone(),
            Dtype::F16 => t.f_to_kind(tch::Kind::Half)?.f_to_kind(tch::Kind::Float)?,
        })
    };
    let sum = |t: &Tensor, dims: &[i64]| t.f_sum_dim_intlist(dims, false, None::<tch::Kind>);
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
            let (us, vs) = (stored(&u)?, stored(&v)?);
            let gv = vs.f_transpose(1, 2)?.f_bmm(&vs)?;
            let gu = us.f_transpose(1, 2)?.f_bmm(&us)?;
            let update_norm = sum(&gv.f_mul(&gu)?, &[1, 2])?.f_clamp_min(0.0)?.f_sqrt()?;
            Ok(Factors {
                u: u.f_reshape([b, k * p])?,
                v: v.f_reshape([b, c_out * p])?,
                update_norm: Some(update_norm),
            })
        }
        Storage::Full => {
            let dw = v.f_bmm(&u.f_transpose(1, 2)?)?; // B × C_out × K
            let dws = stored(&dw)?;
            let update_norm = sum(&dws.f_mul(&dws)?, &[1, 2])?.f_sqrt()?;
            let dw = dw.f_reshape([b, c_out * k])?;
            let full = if spec.bias {
                let db = sum(&v, &[2])?;
                Tensor::f_cat(&[dw, db], 1)?
            } else {
                dw
            };
            Ok(Factors {
                u: Tensor::f_zeros([b, 0], (tch::Kind::Float, input.device()))?,
                v: full,
                update_norm: Some(update_norm),
            })
        }
    }
}

impl Kind for Conv2dSpec {
    fn fits(&self, size: &[usize]) -> bool {
        size[1..] == [self.in_channels, self.input_hw[0], self.input_hw[1]]
    }

    fn traced_input(&self) -> String {
        format!(
            "(batch, {}, {}, {}) inputs, the size its first step had",
            self.in_channels, self.input_hw[0], self.input_hw[1]
        )
    }

    fn output_shape(
        &self,
        _module: usize,
        shape: &[usize],
    ) -> std::result::Result<Vec<usize>, String> {
        let c = self;
        let &[ch, h, w] = shape else {
            return Err(format!(
                "layer {} expects [C, H, W] inputs, gets {shape:?}",
                c.name
            ));
        };
        if ch != c.in_channels || [h, w] != c.input_hw || c.out_channels == 0 {
            return Err(format!(
                "layer {} expects [{}, {}, {}] inputs, gets {shape:?}",
                c.name, c.in_channels, c.input_hw[0], c.input_hw[1]
            ));
        }
        let out = (0..2)
            .map(|a| {
                output_len(
                    c.input_hw[a],
                    c.kernel[a],
                    c.stride[a],
                    c.padding[a],
                    c.dilation[a],
                )
            })
            .collect::<Option<Vec<_>>>()
            .filter(|o| o.iter().all(|&x| x > 0))
            .ok_or_else(|| format!("layer {}: kernel larger than its padded input", c.name))?;
        if c.dilation.contains(&0) || out != c.output_hw {
            return Err(format!(
                "layer {}: output size is {out:?}, the spec says {:?}",
                c.name, c.output_hw
            ));
        }
        Ok(vec![c.out_channels, out[0], out[1]])
    }

    fn apply(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        Ok(x.f_conv2d(
            weight,
            bias,
            i(self.stride),
            i(self.padding),
            i(self.dilation),
            1,
        )?)
    }

    fn factors(&self, input: &Tensor, delta: &Tensor, lr: f64) -> Result<Factors> {
        factors(self, input, delta, lr)
    }

    fn factors_stored(
        &self,
        input: &Tensor,
        delta: &Tensor,
        lr: f64,
        dtype: Dtype,
    ) -> Result<Factors> {
        factors_stored(self, input, delta, lr, dtype)
    }

    fn check_products(&self, input: &Tensor, g: &Tensor, r: &Tensor) -> Result<CheckProducts> {
        let sum0 = |t: &Tensor, dims: &[i64]| t.f_sum_dim_intlist(dims, false, None::<tch::Kind>);
        let b = g.size().first().copied().unwrap_or(0);
        let u = unfold(self, &input.f_to_kind(tch::Kind::Float)?)?; // B × K × P
        let g = g.f_reshape([b, self.out_channels as i64, -1])?; // B × C × P
        let ur = u.f_transpose(1, 2)?.f_matmul(r)?; // B × P
        let gur = g.f_bmm(&ur.f_unsqueeze(2)?)?.f_squeeze_dim(2)?; // B × C
        let mag = g
            .f_abs()?
            .f_bmm(&ur.f_abs()?.f_unsqueeze(2)?)?
            .f_squeeze_dim(2)?;
        Ok(CheckProducts {
            weight: sum0(&gur, &[0])?,
            weight_magnitude: sum0(&mag, &[0])?,
            bias: sum0(&g, &[0, 2])?,
            bias_magnitude: sum0(&g.f_abs()?, &[0, 2])?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// An f16 run's conv norms are those of the values it stores. Inputs of
    /// 1.0001 are 1 in f16, so with factor storage every stored `ΔW_i` is
    /// `K` copies of each output channel's `Σ_p v` (rounded `v`), about
    /// 5e-5 below the f32 update here: far above the f32 products' rounding.
    /// With full storage the stored `ΔW_i` is the f32 one rounded to f16.
    #[test]
    fn f16_norms_are_those_of_the_stored_values() {
        let (b, c_in, c_out, lr) = (2usize, 2usize, 3usize, 0.5f64);
        let k = c_in * 2 * 2;
        let input = Tensor::from_slice(&vec![1.0001f32; b * c_in * 16]).reshape([2, 2, 4, 4]);
        let deltas: Vec<f32> = (0..b * c_out * 9).map(|i| 0.1 + 0.013 * i as f32).collect();
        let delta = Tensor::from_slice(&deltas).reshape([2, 3, 3, 3]);
        let v: Vec<f32> = deltas.iter().map(|&d| d * -(lr as f32)).collect();
        let h = |x: f32| f64::from(half::f16::from_f32(x).to_f32());
        for storage in [Storage::Factors, Storage::Full] {
            let mut s = spec("c", 2, 3, 2, &nn::ConvConfig::default()).unwrap();
            (s.input_hw, s.output_hw, s.storage) = ([4, 4], [3, 3], storage);
            let norms = |dtype| {
                let f = factors_stored(&s, &input, &delta, lr, dtype).unwrap();
                Vec::<f32>::try_from(f.update_norm.unwrap()).unwrap()
            };
            let (wide, half_norms) = (norms(Dtype::F32), norms(Dtype::F16));
            for i in 0..b {
                let channel = |o: usize| &v[(i * c_out + o) * 9..(i * c_out + o + 1) * 9];
                let (want, f32_norm) = match storage {
                    Storage::Factors => {
                        let sums = (0..c_out).map(|o| channel(o).iter().map(|&x| h(x)).sum());
                        let sq: f64 = sums.map(|s: f64| k as f64 * s * s).sum();
                        (sq.sqrt(), f64::from(wide[i]))
                    }
                    Storage::Full => {
                        let sq: f64 = (0..c_out)
                            .map(|o| {
                                let s: f64 = channel(o).iter().map(|&x| f64::from(x)).sum();
                                k as f64 * h((s * 1.0001) as f32).powi(2)
                            })
                            .sum();
                        (sq.sqrt(), f64::from(wide[i]))
                    }
                };
                let got = f64::from(half_norms[i]);
                let tol = match storage {
                    Storage::Factors => 2e-6,
                    Storage::Full => 2e-4,
                };
                assert!(
                    (got - want).abs() <= tol * want,
                    "{storage:?} {i}: {got} vs {want}"
                );
                if storage == Storage::Factors {
                    assert!(
                        (f32_norm - want).abs() > 2e-5 * want,
                        "{f32_norm} vs {want}"
                    );
                }
            }
        }
    }
}
