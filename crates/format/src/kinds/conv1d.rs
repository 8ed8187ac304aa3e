//! The `conv1d` kind: a 1-d convolution over `(C_in, L)` inputs.
//!
//! It is exactly a [`Conv2dSpec`] of height 1 ([`Conv1dSpec::as_conv2d`]:
//! kernel `[1, k]`, stride `[1, s]`, padding `[0, p]`, dilation `[1, d]`,
//! input `[1, L_in]`, output `[1, L_out]`), with the same layouts and the
//! same storage rule: `u` the unfold (K × P, `K = C_in·k`, `P = L_out`),
//! `v` C_out × P; a probe holds `a` (C_in·L_in) and `p` (C_out·L_out). Only
//! its weight's shape differs: `C_out × C_in/groups × k`.
use super::conv2d::{check_groups, check_padding};
use super::{Conv2dSpec, LayerKind, PaddingMode, Storage, is_one, one};
use crate::manifest::Mode;
use serde::{Deserialize, Serialize};

/// A 1-d convolution, W of shape `C_out × C_in/groups × k`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conv1dSpec {
    /// The layer's name: its `layer=` partition value and the prefix of its
    /// tensors (`<name>.weight`, `<name>.bias`) in the weights snapshots.
    pub name: String,
    /// Input channels `C_in`.
    pub in_channels: usize,
    /// Output channels `C_out`.
    pub out_channels: usize,
    /// Kernel size `k`.
    pub kernel: usize,
    /// Stride `s`.
    pub stride: usize,
    /// Padding `p` on each side.
    pub padding: usize,
    /// Dilation `d` of the kernel.
    pub dilation: usize,
    /// Groups `G`, dividing `C_in` and `C_out` (absent: 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub groups: usize,
    /// How the padding is filled (absent: zeros).
    #[serde(default, skip_serializing_if = "PaddingMode::is_zeros")]
    pub padding_mode: PaddingMode,
    /// Length `L_in` of the layer's input.
    pub input_len: usize,
    /// Length `L_out` of the layer's output.
    pub output_len: usize,
    /// Whether the layer has a bias (`C_out` long).
    pub bias: bool,
    /// Whether update records are written for this layer.
    pub traced: bool,
    /// Whether instance-mode records hold factors or the full per-example
    /// matrix.
    pub storage: Storage,
}

impl Conv1dSpec {
    /// The same layer as a 2-d convolution of height 1: every layout and the
    /// arithmetic are that convolution's.
    pub fn as_conv2d(&self) -> Conv2dSpec {
        Conv2dSpec {
            name: self.name.clone(),
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            kernel: [1, self.kernel],
            stride: [1, self.stride],
            padding: [0, self.padding],
            dilation: [1, self.dilation],
            groups: self.groups,
            padding_mode: self.padding_mode,
            input_hw: [1, self.input_len],
            output_hw: [1, self.output_len],
            bias: self.bias,
            traced: self.traced,
            storage: self.storage,
        }
    }
}

impl LayerKind for Conv1dSpec {
    fn name(&self) -> &str {
        &self.name
    }

    fn bias(&self) -> bool {
        self.bias
    }

    fn weight_shape(&self) -> Vec<usize> {
        vec![
            self.out_channels,
            self.in_channels / self.groups.max(1),
            self.kernel,
        ]
    }

    fn factor_lens(&self) -> (usize, usize) {
        self.as_conv2d().factor_lens()
    }

    fn update_len(&self) -> usize {
        self.as_conv2d().update_len()
    }

    fn probe_lens(&self) -> (usize, usize) {
        self.as_conv2d().probe_lens()
    }

    fn records_full(&self, mode: Mode) -> bool {
        mode == Mode::Batch || self.storage == Storage::Full
    }

    fn positions(&self) -> usize {
        self.output_len
    }

    /// The Conv2d rule: Full iff `C_out·Kg + bias·C_out < K·P + C_out·P`.
    fn instance_storage(&self) -> Storage {
        self.as_conv2d().instance_storage()
    }

    fn check(&self) -> Result<(), String> {
        check_groups(&self.name, self.groups, self.in_channels, self.out_channels)?;
        check_padding(&self.name, self.padding_mode, self.padding, self.input_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_conv2d_of_height_one() {
        let c = Conv1dSpec {
            name: "c".into(),
            in_channels: 6,
            out_channels: 4,
            kernel: 3,
            stride: 2,
            padding: 1,
            dilation: 1,
            groups: 2,
            padding_mode: PaddingMode::Circular,
            input_len: 9,
            output_len: 5,
            bias: true,
            traced: true,
            storage: Storage::Factors,
        };
        assert_eq!(c.weight_shape(), vec![4, 3, 3]);
        assert_eq!(c.update_len(), 4 * 9 + 4);
        assert_eq!(c.factor_lens(), (18 * 5, 4 * 5));
        assert_eq!(c.probe_lens(), (6 * 9, 4 * 5));
        assert_eq!(c.positions(), 5);
        // 40 < 110: factors cost more.
        assert_eq!(c.instance_storage(), Storage::Full);
        let c2 = c.as_conv2d();
        assert_eq!(c2.kernel, [1, 3]);
        assert_eq!(c2.padding, [0, 1]);
        assert_eq!(c2.input_hw, [1, 9]);
        assert_eq!(c2.output_hw, [1, 5]);
        let n: usize = c.weight_shape().iter().product();
        let n2: usize = c2.weight_shape().iter().product();
        assert_eq!(n, n2);
        let one_position = Conv1dSpec {
            input_len: 1,
            output_len: 1,
            padding: 0,
            kernel: 1,
            ..c
        };
        // 4·3 + 4 = 16 against 6 + 4 = 10.
        assert_eq!(one_position.instance_storage(), Storage::Factors);
    }
}
