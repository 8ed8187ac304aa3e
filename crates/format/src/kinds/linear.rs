//! The `linear` kind: a fully connected layer `z = W a + b`.
//!
//! A record of an example is `u = a` (the layer's input) and `v = ∂L/∂z`,
//! so that `ΔW = v uᵀ` and `Δb = v`; a probe holds `a` and `p` (out long).
use super::LayerKind;
use serde::{Deserialize, Serialize};

/// A fully connected layer `z = W a + b`, W of shape `out × in`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearSpec {
    /// The layer's name: its `layer=` partition value and the prefix of its
    /// tensors (`<name>.weight`, `<name>.bias`) in the weights snapshots.
    pub name: String,
    /// Length of the input `a` (columns of W).
    pub in_features: usize,
    /// Length of the output `z` (rows of W).
    pub out_features: usize,
    /// Whether the layer has a bias `b` (`out_features` long).
    pub bias: bool,
    /// Whether update records are written for this layer.
    pub traced: bool,
}

impl LayerKind for LinearSpec {
    fn name(&self) -> &str {
        &self.name
    }

    fn bias(&self) -> bool {
        self.bias
    }

    fn weight_shape(&self) -> Vec<usize> {
        vec![self.out_features, self.in_features]
    }

    fn factor_lens(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }

    fn update_len(&self) -> usize {
        self.in_features * self.out_features + if self.bias { self.out_features } else { 0 }
    }

    fn probe_lens(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }
}
