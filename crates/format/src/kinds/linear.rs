//! The `linear` kind: a fully connected layer `z = W a + b`, applied at `T`
//! positions per example (`positions`; 1 unless the layer sees a sequence
//! `(batch, T, in)` or runs several times per forward pass, its calls
//! concatenated along positions).
//!
//! An instance-mode record of an example holds either the factors, `u`
//! (T × in, row `t` the input at position `t`) and `v` (T × out, `∂L/∂z` per
//! position, scaled), so that `ΔW = Σ_t v_t u_tᵀ = vᵀu` and `Δb = Σ_t v_t`,
//! or the full `[vec ΔW (out × in), Δb]`, whichever is smaller
//! ([`LinearSpec::instance_storage`](LayerKind::instance_storage)). With
//! `T = 1` records always hold the factors: `u = a`, `v = ∂L/∂z`. A probe
//! holds `a` (T × in) and `p` (T × out), position-major; a record's update
//! applied to it is `c_t = ΔW a_t + Δb`.
use super::{LayerKind, Storage, is_false, is_one, one};
use crate::manifest::Mode;
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
    /// Positions `T` the layer is applied at per example (format 8; absent:
    /// 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub positions: usize,
    /// Whether instance-mode records hold factors or the full per-example
    /// update (format 8; absent: factors).
    #[serde(default, skip_serializing_if = "Storage::is_factors")]
    pub storage: Storage,
    /// Whether records and probes hold a variable number of positions
    /// ([`LayerKind::ragged`]; format 9, absent: false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub ragged: bool,
}

impl LinearSpec {
    /// A layer applied once per example (`T = 1`, factors): the spec of
    /// every linear layer before format 8.
    pub fn new(name: &str, in_features: usize, out_features: usize, bias: bool) -> Self {
        LinearSpec {
            name: name.into(),
            in_features,
            out_features,
            bias,
            traced: true,
            positions: 1,
            storage: Storage::Factors,
            ragged: false,
        }
    }
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
        match self.storage {
            Storage::Factors => (
                self.positions * self.in_features,
                self.positions * self.out_features,
            ),
            Storage::Full => (0, self.update_len()),
        }
    }

    fn update_len(&self) -> usize {
        self.in_features * self.out_features + if self.bias { self.out_features } else { 0 }
    }

    fn probe_lens(&self) -> (usize, usize) {
        (
            self.positions * self.in_features,
            self.positions * self.out_features,
        )
    }

    fn records_full(&self, mode: Mode) -> bool {
        mode == Mode::Batch || self.storage == Storage::Full
    }

    fn positions(&self) -> usize {
        self.positions
    }

    fn ragged(&self) -> bool {
        self.ragged
    }

    fn position_lens(&self) -> Option<[usize; 4]> {
        let (i, o) = (self.in_features, self.out_features);
        Some([i, o, i, o])
    }

    /// Full iff `T > 1` and `out·in + (bias ? out : 0) < T·(in + out)`: a
    /// layer applied once keeps the rank-one factors of every format
    /// before 8, even where a bias-free layer with one input or one output
    /// would be a little smaller whole.
    fn instance_storage(&self) -> Storage {
        if self.positions <= 1 {
            return Storage::Factors;
        }
        Storage::smaller(
            self.update_len(),
            self.positions * (self.in_features + self.out_features),
        )
    }

    fn check(&self) -> Result<(), String> {
        if self.positions == 0 {
            return Err(format!(
                "layer '{}': positions must be at least 1",
                self.name
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_position_is_always_factors() {
        for (i, o) in [(1, 1), (3, 2), (64, 10), (1000, 1)] {
            for bias in [false, true] {
                let s = LinearSpec::new("fc", i, o, bias);
                assert_eq!(s.instance_storage(), Storage::Factors, "{i}→{o}");
            }
        }
    }

    #[test]
    fn storage_rule_compares_update_and_factors() {
        // 4×3 + 4 = 16 values against T·7 factors: Full from T = 3 (21).
        let mut s = LinearSpec::new("fc", 3, 4, true);
        for (t, want) in [
            (2, Storage::Factors),
            (3, Storage::Full),
            (50, Storage::Full),
        ] {
            s.positions = t;
            assert_eq!(s.instance_storage(), want, "T = {t}");
        }
        // Equal sizes stay factors: 4×4 = 16 = 2·(4 + 4) without bias.
        let mut s = LinearSpec {
            positions: 2,
            ..LinearSpec::new("fc", 4, 4, false)
        };
        assert_eq!(s.instance_storage(), Storage::Factors);
        s.positions = 3;
        assert_eq!(s.instance_storage(), Storage::Full);
        // One position keeps the factors even where the whole update is
        // smaller (1×3 without bias: 3 < 4).
        let s = LinearSpec::new("fc", 1, 3, false);
        assert_eq!(s.instance_storage(), Storage::Factors);
    }

    #[test]
    fn lens_follow_positions_and_storage() {
        let mut s = LinearSpec {
            positions: 5,
            ..LinearSpec::new("fc", 3, 4, true)
        };
        assert_eq!(s.factor_lens(), (15, 20));
        assert_eq!(s.probe_lens(), (15, 20));
        assert_eq!(s.positions(), 5);
        assert!(!s.records_full(Mode::Instance));
        s.storage = Storage::Full;
        assert_eq!(s.factor_lens(), (0, 16));
        assert_eq!(s.probe_lens(), (15, 20));
        assert!(s.records_full(Mode::Instance));
    }
}
