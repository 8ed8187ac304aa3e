//! The `layer_norm` and `rms_norm` kinds: the affine part `z = γ ⊙ x̂ + β`
//! of a normalisation over the last dimensions (`normalized_shape`, `D`
//! values), applied at `T` positions per example.
//!
//! `x̂` is the normalised input the affine part multiplies: layer_norm's
//! `(x − mean)/sqrt(var + eps)`, rms_norm's `x/sqrt(mean(x²) + eps)` (no
//! `β`). Records always hold the whole update, in both modes: `u` empty and
//! `v` = `[Δγ (D), Δβ (D, if bias)]` (there is no `storage` field). A probe
//! holds `a` = x̂ (T × D) and `p` (T × D); a record's update applied to it
//! is `c_t = Δγ ⊙ x̂_t + Δβ`.
use super::{LayerKind, Storage, is_false};
use crate::manifest::Mode;
use serde::{Deserialize, Serialize};

/// A LayerNorm or RMSNorm with elementwise affine weights, γ (and β) of
/// shape `normalized_shape`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormSpec {
    /// The layer's name: its `layer=` partition value and the prefix of its
    /// tensors (`<name>.weight`, `<name>.bias`) in the weights snapshots.
    pub name: String,
    /// The normalised trailing dimensions; `D` is their product.
    pub normalized_shape: Vec<usize>,
    /// Whether the layer has a bias β (rms_norm: never).
    pub bias: bool,
    /// The `eps` added to the variance (or mean square).
    pub eps: f64,
    /// Positions `T` per example (the product of the input's dimensions
    /// between the batch and the normalised ones).
    pub positions: usize,
    /// Whether update records are written for this layer.
    pub traced: bool,
    /// Whether probes hold a variable number of positions (records are
    /// whole updates either way; [`LayerKind::ragged`]; format 9, absent:
    /// false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub ragged: bool,
}

impl NormSpec {
    /// `D`: the values each position is normalised over.
    pub fn features(&self) -> usize {
        self.normalized_shape.iter().product()
    }
}

impl LayerKind for NormSpec {
    fn name(&self) -> &str {
        &self.name
    }

    fn bias(&self) -> bool {
        self.bias
    }

    fn weight_shape(&self) -> Vec<usize> {
        self.normalized_shape.clone()
    }

    fn bias_shape(&self) -> Vec<usize> {
        self.normalized_shape.clone()
    }

    fn factor_lens(&self) -> (usize, usize) {
        (0, self.update_len())
    }

    fn update_len(&self) -> usize {
        self.features() * if self.bias { 2 } else { 1 }
    }

    fn probe_lens(&self) -> (usize, usize) {
        let n = self.positions * self.features();
        (n, n)
    }

    fn records_full(&self, _mode: Mode) -> bool {
        true
    }

    fn positions(&self) -> usize {
        self.positions
    }

    fn ragged(&self) -> bool {
        self.ragged
    }

    fn position_lens(&self) -> Option<[usize; 4]> {
        let d = self.features();
        Some([0, 0, d, d])
    }

    fn instance_storage(&self) -> Storage {
        Storage::Full
    }

    fn check(&self) -> Result<(), String> {
        if self.positions == 0 {
            return Err(format!(
                "layer '{}': positions must be at least 1",
                self.name
            ));
        }
        if self.normalized_shape.is_empty() {
            return Err(format!("layer '{}': normalized_shape is empty", self.name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_whole_updates() {
        let mut n = NormSpec {
            name: "ln".into(),
            normalized_shape: vec![2, 3],
            bias: true,
            eps: 1e-5,
            positions: 4,
            traced: true,
            ragged: false,
        };
        assert_eq!(n.features(), 6);
        assert_eq!(n.weight_shape(), vec![2, 3]);
        assert_eq!(n.bias_shape(), vec![2, 3]);
        assert_eq!(n.factor_lens(), (0, 12));
        assert_eq!(n.probe_lens(), (24, 24));
        assert!(n.records_full(Mode::Instance));
        assert_eq!(n.instance_storage(), Storage::Full);
        n.bias = false;
        assert_eq!(n.factor_lens(), (0, 6));
        n.normalized_shape.clear();
        assert!(n.check().is_err());
    }
}
