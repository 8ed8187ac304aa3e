//! The `conv2d` kind: a 2-d convolution of `groups` groups and a
//! [`PaddingMode`].
//!
//! With `K = C_in·kh·kw` rows of the unfolded input (ordered `(c_in, i,
//! j)`), `Kg = K / groups` of them per group and `P = h_out·w_out` output
//! positions, an instance-mode record holds either the factors `u` (K × P,
//! the unfolded input, padded as the mode says) and `v` (C_out × P,
//! `∂L/∂z`) or the full per-example `[vec ΔW, Δb]`, whichever is smaller
//! ([`Conv2dSpec::instance_storage`](LayerKind::instance_storage)). Output
//! channels `[g·C_out/G, (g+1)·C_out/G)` of group `g` use unfold rows
//! `[g·Kg, (g+1)·Kg)`: row `o` of ΔW (C_out × Kg) is
//! `Σ_p v[o,p] · u[g(o)·Kg .. (g(o)+1)·Kg, p]` (with one group, `ΔW = v uᵀ`).
//! A probe holds the layer's unpadded input `a` (C_in·h·w) and `p`
//! (C_out·P).
use super::{LayerKind, PaddingMode, Storage, is_one, one};
use crate::manifest::Mode;
use serde::{Deserialize, Serialize};

/// A 2-d convolution, W of shape `C_out × C_in/groups × kh × kw`.
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
    /// Padding `[ph, pw]` on each side.
    pub padding: [usize; 2],
    /// Dilation `[dh, dw]` of the kernel.
    pub dilation: [usize; 2],
    /// Groups `G`, dividing `C_in` and `C_out` (format 8; absent: 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub groups: usize,
    /// How the padding is filled (format 8; absent: zeros).
    #[serde(default, skip_serializing_if = "PaddingMode::is_zeros")]
    pub padding_mode: PaddingMode,
    /// Spatial size `[h, w]` of the layer's input.
    pub input_hw: [usize; 2],
    /// Spatial size `[h, w]` of the layer's output.
    pub output_hw: [usize; 2],
    /// Whether the layer has a bias (`C_out` long).
    pub bias: bool,
    /// Whether update records are written for this layer.
    pub traced: bool,
    /// Whether instance-mode records hold factors or the full per-example
    /// matrix.
    pub storage: Storage,
}

impl Conv2dSpec {
    /// Rows of the unfolded input: `K = C_in · kh · kw`.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1]
    }

    /// Rows of the unfold one group's weights multiply (the columns of ΔW):
    /// `Kg = (C_in / groups) · kh · kw`.
    pub fn group_patch_len(&self) -> usize {
        self.in_channels / self.groups.max(1) * self.kernel[0] * self.kernel[1]
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
            self.in_channels / self.groups.max(1),
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
        self.out_channels * self.group_patch_len() + if self.bias { self.out_channels } else { 0 }
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

    /// Full iff `C_out·Kg + bias·C_out < K·P + C_out·P`.
    fn instance_storage(&self) -> Storage {
        let p = Conv2dSpec::positions(self);
        Storage::smaller(
            self.update_len(),
            self.patch_len() * p + self.out_channels * p,
        )
    }

    fn check(&self) -> Result<(), String> {
        check_groups(&self.name, self.groups, self.in_channels, self.out_channels)?;
        for (padding, size) in self.padding.into_iter().zip(self.input_hw) {
            check_padding(&self.name, self.padding_mode, padding, size)?;
        }
        Ok(())
    }
}

/// A padding mode other than zeros reads the input itself beyond its edge:
/// reflect needs `padding < size`, replicate and circular `padding ≤ size`
/// (as PyTorch's `F.pad` requires).
pub(crate) fn check_padding(
    name: &str,
    mode: PaddingMode,
    padding: usize,
    size: usize,
) -> Result<(), String> {
    let fits = match mode {
        PaddingMode::Zeros => true,
        PaddingMode::Reflect => padding < size,
        PaddingMode::Replicate | PaddingMode::Circular => padding <= size,
    };
    if fits {
        Ok(())
    } else {
        Err(format!(
            "layer '{name}': padding {padding} with padding_mode {} does not fit an input of \
             size {size}",
            mode.name()
        ))
    }
}

/// Groups are at least 1 and divide both channel counts.
pub(crate) fn check_groups(
    name: &str,
    groups: usize,
    c_in: usize,
    c_out: usize,
) -> Result<(), String> {
    if groups == 0 || !c_in.is_multiple_of(groups) || !c_out.is_multiple_of(groups) {
        return Err(format!(
            "layer '{name}': groups {groups} does not divide in_channels {c_in} and out_channels {c_out}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_padding_mode_that_reads_beyond_the_input_is_refused() {
        let mut c = spec(2, 4, 1, 3);
        c.padding_mode = PaddingMode::Reflect;
        c.padding = [2, 2];
        assert!(c.check().is_ok());
        c.padding = [3, 1];
        let e = c.check().err().unwrap_or_default();
        assert!(e.contains("padding 3 with padding_mode reflect"), "{e}");
        c.padding_mode = PaddingMode::Circular;
        assert!(c.check().is_ok());
        c.padding_mode = PaddingMode::Zeros;
        c.padding = [9, 9];
        assert!(c.check().is_ok());
    }

    fn spec(c_in: usize, c_out: usize, groups: usize, hw: usize) -> Conv2dSpec {
        Conv2dSpec {
            name: "c".into(),
            in_channels: c_in,
            out_channels: c_out,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1],
            dilation: [1, 1],
            groups,
            padding_mode: PaddingMode::Zeros,
            input_hw: [hw, hw],
            output_hw: [hw, hw],
            bias: true,
            traced: true,
            storage: Storage::Factors,
        }
    }

    #[test]
    fn groups_shrink_the_weight() {
        let c = spec(4, 6, 2, 5);
        assert_eq!(c.weight_shape(), vec![6, 2, 3, 3]);
        assert_eq!(c.patch_len(), 36);
        assert_eq!(c.group_patch_len(), 18);
        assert_eq!(c.update_len(), 6 * 18 + 6);
        // The factors stay the whole unfold.
        assert_eq!(c.factor_lens(), (36 * 25, 6 * 25));
        assert_eq!(c.probe_lens(), (4 * 25, 6 * 25));
        assert!(c.check().is_ok());
        assert!(spec(4, 6, 4, 5).check().is_err());
        assert!(spec(4, 6, 0, 5).check().is_err());
    }

    #[test]
    fn storage_rule_brute_force() {
        for c_in in 1..=6usize {
            for c_out in 1..=6usize {
                for g in (1..=c_in).filter(|&g| c_in.is_multiple_of(g) && c_out.is_multiple_of(g)) {
                    for hw in 1..=4 {
                        for bias in [false, true] {
                            let mut c = spec(c_in, c_out, g, hw);
                            c.bias = bias;
                            // Count the values of each storage one by one.
                            let mut full = 0;
                            for _o in 0..c_out {
                                for _k in 0..(c_in / g) * 9 {
                                    full += 1;
                                }
                                if bias {
                                    full += 1;
                                }
                            }
                            let factors = (c_in * 9 + c_out) * hw * hw;
                            let want = if full < factors {
                                Storage::Full
                            } else {
                                Storage::Factors
                            };
                            assert_eq!(c.instance_storage(), want);
                            if g == 1 {
                                assert_eq!(
                                    Storage::for_conv2d(c_out, c_in * 9, hw * hw, bias),
                                    want
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
