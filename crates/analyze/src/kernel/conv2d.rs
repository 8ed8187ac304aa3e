//! The `conv2d` kind (and `conv1d`, a Conv2d of height 1): a convolution is
//! a [`Patches`] layer whose patches are the unfolded input (`im2col`), the
//! arithmetic of [`super::patches`].
//!
//! The unfold reads the input through the padding mode's index mapping
//! (PyTorch's `F.pad`): for a row `y` outside `[0, h)` (columns alike)
//! zeros reads 0, reflect reads row `−y` (`y < 0`) or `2(h−1)−y` (`y ≥ h`),
//! replicate the nearest row, circular row `y mod h`.
use super::patches::{Layout, Patches};
use crate::{Error, Result};
use ndarray::Array2;
use reptrace_format::{Conv2dSpec, PaddingMode, Storage};

/// The unfold (`im2col`) of a 2-d convolution's input: `C_in·h·w` values
/// into the patches `A` (K×P, K = C_in·kh·kw rows ordered `(c_in, kh, kw)`,
/// P = h_out·w_out).
#[derive(Debug, Clone, PartialEq)]
pub struct Unfold {
    /// The layer's name (named by errors).
    pub name: String,
    /// Input channels `C_in`.
    pub in_channels: usize,
    /// Kernel size `[kh, kw]`.
    pub kernel: [usize; 2],
    /// Stride `[sh, sw]`.
    pub stride: [usize; 2],
    /// Padding `[ph, pw]` on each side.
    pub padding: [usize; 2],
    /// Dilation `[dh, dw]` of the kernel.
    pub dilation: [usize; 2],
    /// Spatial size `[h, w]` of the input.
    pub input_hw: [usize; 2],
    /// Spatial size `[h, w]` of the output.
    pub output_hw: [usize; 2],
    /// How the input is padded.
    pub padding_mode: PaddingMode,
}

impl Unfold {
    /// The unfold of `spec`'s input.
    pub fn of(spec: &Conv2dSpec) -> Self {
        Unfold {
            name: spec.name.clone(),
            in_channels: spec.in_channels,
            kernel: spec.kernel,
            stride: spec.stride,
            padding: spec.padding,
            dilation: spec.dilation,
            input_hw: spec.input_hw,
            output_hw: spec.output_hw,
            padding_mode: spec.padding_mode,
        }
    }

    /// Rows `K = C_in·kh·kw` of the patches.
    pub fn rows(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1]
    }

    /// The input index each (kernel offset, output position) of axis `d`
    /// (0 rows, 1 columns) reads, offset-major; `None` where it reads a
    /// padding zero.
    fn sources(&self, d: usize) -> Result<Vec<Option<usize>>> {
        let n = self.input_hw[d];
        let (k, out) = (self.kernel[d], self.output_hw[d]);
        let mut all = Vec::with_capacity(k * out);
        for i in 0..k {
            for o in 0..out {
                let y =
                    (o * self.stride[d] + i * self.dilation[d]) as isize - self.padding[d] as isize;
                all.push(self.source(y, n)?);
            }
        }
        Ok(all)
    }

    /// The input index that padded index `y` reads along an axis of `n`.
    fn source(&self, y: isize, n: usize) -> Result<Option<usize>> {
        let ni = n as isize;
        if (0..ni).contains(&y) {
            return Ok(Some(y as usize));
        }
        let mapped = match self.padding_mode {
            PaddingMode::Zeros => return Ok(None),
            _ if n == 0 => -1,
            PaddingMode::Reflect if y < 0 => -y,
            PaddingMode::Reflect => 2 * (ni - 1) - y,
            PaddingMode::Replicate => y.clamp(0, ni - 1),
            PaddingMode::Circular => y.rem_euclid(ni),
        };
        if (0..ni).contains(&mapped) {
            Ok(Some(mapped as usize))
        } else {
            Err(Error::Internal(format!(
                "layer '{}': {} padding {:?} does not fit its input of {:?} (the padding must be smaller than the input)",
                self.name,
                self.padding_mode.name(),
                self.padding,
                self.input_hw
            )))
        }
    }

    /// `unfold(a)`: the patches (K × P) of the input `a` (`C_in·h·w`).
    pub fn apply(&self, a: &[f64]) -> Result<Array2<f64>> {
        let [kh, kw] = self.kernel;
        let [h, w] = self.input_hw;
        let [ho, wo] = self.output_hw;
        if a.len() != self.in_channels * h * w {
            return Err(Error::Internal(format!(
                "layer '{}': an input of {} values is not {}×{}×{}",
                self.name,
                a.len(),
                self.in_channels,
                h,
                w
            )));
        }
        let (ys, xs) = (self.sources(0)?, self.sources(1)?);
        let mut out = Array2::zeros((self.rows(), ho * wo));
        for c in 0..self.in_channels {
            let plane = &a[c * h * w..(c + 1) * h * w];
            for i in 0..kh {
                for j in 0..kw {
                    let mut row = out.row_mut((c * kh + i) * kw + j);
                    for (oy, y) in ys[i * ho..(i + 1) * ho].iter().enumerate() {
                        let Some(y) = y else { continue };
                        for (ox, x) in xs[j * wo..(j + 1) * wo].iter().enumerate() {
                            if let Some(x) = x {
                                row[oy * wo + ox] = plane[y * w + x];
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// `unfold(a)` of a Conv2d layer's input (see [`Unfold::apply`]).
pub fn unfold(spec: &Conv2dSpec, a: &[f64]) -> Result<Array2<f64>> {
    Unfold::of(spec).apply(a)
}

/// The [`Patches`] of a Conv2d layer (a Conv1d's [`Conv1dSpec::as_conv2d`]);
/// `batch` in a batch-mode run (its records hold whole updates). An error
/// when the groups do not divide the channels or the padding does not fit
/// the input.
///
/// [`Conv1dSpec::as_conv2d`]: reptrace_format::Conv1dSpec::as_conv2d
pub(super) fn patches(spec: &Conv2dSpec, batch: bool) -> Result<Patches> {
    let unfold = Unfold::of(spec);
    let groups = spec.groups;
    if groups == 0
        || !spec.in_channels.is_multiple_of(groups)
        || !spec.out_channels.is_multiple_of(groups)
    {
        return Err(Error::Internal(format!(
            "layer '{}': groups {groups} does not divide in_channels {} and out_channels {}",
            spec.name, spec.in_channels, spec.out_channels
        )));
    }
    unfold.sources(0)?;
    unfold.sources(1)?;
    Ok(Patches {
        out: spec.out_channels,
        k: unfold.rows(),
        groups,
        positions: spec.positions(),
        bias: spec.bias,
        full: batch || spec.storage == Storage::Full,
        layout: Layout::Channels(unfold),
    })
}
