//! The `conv2d` kind: a 2-d convolution (groups 1).
//!
//! With `K = C_in·kh·kw` and `P = h_out·w_out` output positions, an
//! instance-mode record holds either the factors `u` (K × P, the unfolded
//! input) and `v` (C_out × P, `∂L/∂z`), `ΔW = v uᵀ`, or the full
//! per-example `[vec ΔW, Δb]`, whichever is smaller ([`Storage`]). A probe
//! holds the layer's input `a` (C_in·h·w) and `p` (C_out·P).
use super::LayerKind;
use crate::manifest::Mode;
use serde::{Deserialize, Serialize};

/// How a Conv2d layer's per-example update is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// `u` (C_in·kh·kw × P, row-major) and `v` (C_out × P, row-major), ΔW = v uᵀ.
    Factors,
    /// `u` is empty; `v` holds ΔW (C_out × C_in·kh·kw, row-major) followed by
    /// Δb (C_out) when the layer has a bias.
    Full,
}

impl Storage {
    /// The storage rule every producer follows for a Conv2d layer's
    /// instance-mode records: the full per-example matrix (`C_out·K`, plus
    /// the bias) when it is smaller than the factors (`K·P + C_out·P`), else
    /// the factors. (Batch-mode records are always whole updates.)
    pub fn for_conv2d(out_channels: usize, patch_len: usize, positions: usize, bias: bool) -> Self {
        let full = out_channels * patch_len + if bias { out_channels } else { 0 };
        if full < patch_len * positions + out_channels * positions {
            Storage::Full
        } else {
            Storage::Factors
        }
    }
}

/// A 2-d convolution (groups 1), W of shape `C_out × C_in × kh × kw`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conv2dSpec {
    /// The layer's name: its `layer=` partition value and the prefix of its
    /// tensors (`<name>.weight`, `<name>.bias`) in the weights snapshots.
    pub name: String,
    /// Input channels `C_in`.
    pub in_channels: usize,
    /// Output channels `C_out`.
    pub out_channels: usize,
    /// Kernel size `[kh, kw]`.
    pub kernel: [usize; 2],
    /// Stride `[sh, sw]`.
    pub stride: [usize; 2],
    /// Zero padding `[ph, pw]` on each side.
    pub padding: [usize; 2],
    /// Dilation `[dh, dw]` of the kernel.
    pub dilation: [usize; 2],
    /// Spatial size `[h, w]` of the layer's input.
    pub input_hw: [usize; 2],
    /// Spatial size `[h, w]` of the layer's output.
    pub output_hw: [usize; 2],
    /// Whether the layer has a bias (`C_out` long).
    pub bias: bool,
    /// Whether update records are written for this layer.
    pub traced: bool,
    /// Whether records hold factors or the full per-example matrix.
    pub storage: Storage,
}

impl Conv2dSpec {
    /// Rows of the unfolded input: `C_in · kh · kw`.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1]
    }

    /// Output positions `P = h_out · w_out`.
    pub fn positions(&self) -> usize {
        self.output_hw[0] * self.output_hw[1]
    }
}

impl LayerKind for Conv2dSpec {
    fn name(&self) -> &str {
        &self.name
    }

    fn bias(&self) -> bool {
        self.bias
    }

    fn weight_shape(&self) -> Vec<usize> {
        vec![
            self.out_channels,
            self.in_channels,
            self.kernel[0],
            self.kernel[1],
        ]
    }

    fn factor_lens(&self) -> (usize, usize) {
        match self.storage {
            Storage::Factors => (
                self.patch_len() * self.positions(),
                self.out_channels * self.positions(),
            ),
            Storage::Full => (0, self.update_len()),
        }
    }

    fn update_len(&self) -> usize {
        self.out_channels * self.patch_len() + if self.bias { self.out_channels } else { 0 }
    }

    fn probe_lens(&self) -> (usize, usize) {
        (
            self.in_channels * self.input_hw[0] * self.input_hw[1],
            self.out_channels * self.positions(),
        )
    }

    fn records_full(&self, mode: Mode) -> bool {
        mode == Mode::Batch || self.storage == Storage::Full
    }

    fn positions(&self) -> usize {
        Conv2dSpec::positions(self)
    }
}
