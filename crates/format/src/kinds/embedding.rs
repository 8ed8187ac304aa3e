//! The `embedding` kind: a lookup table `z_t = W[id_t]` (no bias) over `T`
//! positions per example.
//!
//! A token id is stored as [`EmbeddingSpec::digits`] values, its base-2048
//! digits, most significant first ([`id_digits`], read back with [`id_of`]):
//! integers below 2048 are exact in f16 and f32. An instance-mode record of
//! an example holds either the factors, `u` (T·digits: the token id at each
//! position) and `v` (T × dim, the output gradient per position, scaled),
//! so that row `r` of ΔW is `Σ_{t: id_t = r} v_t` (every other row 0), or
//! the full `vec ΔW` (num × dim), whichever is smaller
//! ([`EmbeddingSpec::instance_storage`](LayerKind::instance_storage)). A
//! probe holds `a` (T·digits, its token ids) and `p` (T × dim); a record's
//! update applied to it is `c_t = ΔW[id_t]`.
use super::{LayerKind, Storage, is_false};
use crate::manifest::Mode;
use serde::{Deserialize, Serialize};

/// The base token ids are written in: every digit is below it.
pub const ID_BASE: u64 = 2048;

/// An embedding table, W of shape `num_embeddings × embedding_dim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingSpec {
    /// The layer's name: its `layer=` partition value and the prefix of its
    /// tensor (`<name>.weight`) in the weights snapshots.
    pub name: String,
    /// Rows of the table (token ids `0..num_embeddings`).
    pub num_embeddings: usize,
    /// Length of each row, `dim`.
    pub embedding_dim: usize,
    /// The id whose row PyTorch never updates (its positions get a zero
    /// gradient); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding_idx: Option<usize>,
    /// Positions `T` (tokens) per example.
    pub positions: usize,
    /// Whether update records are written for this layer.
    pub traced: bool,
    /// Whether instance-mode records hold factors or the full per-example
    /// table.
    pub storage: Storage,
    /// Whether records and probes hold a variable number of positions
    /// ([`LayerKind::ragged`]; format 9, absent: false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub ragged: bool,
}

impl EmbeddingSpec {
    /// Values per stored token id: 1 when `num_embeddings ≤ 2048`, 2 when
    /// `≤ 2048²`, else 3.
    pub fn digits(&self) -> usize {
        let n = self.num_embeddings as u64;
        if n <= ID_BASE {
            1
        } else if n <= ID_BASE * ID_BASE {
            2
        } else {
            3
        }
    }

    /// The token ids of `T` positions stored as this layer's digits (a
    /// record's `u` or a probe's `a`); `None` when the length is not a
    /// multiple of [`EmbeddingSpec::digits`] or a value is not a digit.
    pub fn ids(&self, values: &[f64]) -> Option<Vec<u64>> {
        let d = self.digits();
        if !values.len().is_multiple_of(d) {
            return None;
        }
        values.chunks_exact(d).map(id_of).collect()
    }
}

/// The `digits` base-2048 digits of `id`, most significant first, as the
/// values a record or probe stores (higher digits than `digits` are dropped:
/// give [`EmbeddingSpec::digits`] of the table `id` indexes).
pub fn id_digits(id: u64, digits: usize) -> impl Iterator<Item = f64> {
    (0..digits).rev().map(move |k| {
        let shift = u32::try_from(11 * k).unwrap_or(u32::MAX);
        (id.checked_shr(shift).unwrap_or(0) % ID_BASE) as f64
    })
}

/// The token id whose base-2048 digits, most significant first, are
/// `digits` (the inverse of [`id_digits`]); `None` when there are none or
/// one is not an exact integer in `0..2048` (or the id overflows `u64`).
pub fn id_of(digits: &[f64]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |id, &d| {
        let ok = d.fract() == 0.0 && (0.0..ID_BASE as f64).contains(&d);
        if !ok {
            return None;
        }
        id.checked_mul(ID_BASE)?.checked_add(d as u64)
    })
}

impl LayerKind for EmbeddingSpec {
    fn name(&self) -> &str {
        &self.name
    }

    fn bias(&self) -> bool {
        false
    }

    fn weight_shape(&self) -> Vec<usize> {
        vec![self.num_embeddings, self.embedding_dim]
    }

    fn factor_lens(&self) -> (usize, usize) {
        match self.storage {
            Storage::Factors => self.probe_lens(),
            Storage::Full => (0, self.update_len()),
        }
    }

    fn update_len(&self) -> usize {
        self.num_embeddings * self.embedding_dim
    }

    fn probe_lens(&self) -> (usize, usize) {
        (
            self.positions * self.digits(),
            self.positions * self.embedding_dim,
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
        let (d, e) = (self.digits(), self.embedding_dim);
        Some([d, e, d, e])
    }

    fn u_is_ids(&self) -> bool {
        true
    }

    /// Full iff `num·dim < T·(digits + dim)`.
    fn instance_storage(&self) -> Storage {
        Storage::smaller(
            self.update_len(),
            self.positions * (self.digits() + self.embedding_dim),
        )
    }

    fn check(&self) -> Result<(), String> {
        if self.positions == 0 {
            return Err(format!(
                "layer '{}': positions must be at least 1",
                self.name
            ));
        }
        match self.padding_idx {
            Some(i) if i >= self.num_embeddings => Err(format!(
                "layer '{}': padding_idx {i} is not below num_embeddings {}",
                self.name, self.num_embeddings
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(num: usize, dim: usize, t: usize) -> EmbeddingSpec {
        EmbeddingSpec {
            name: "emb".into(),
            num_embeddings: num,
            embedding_dim: dim,
            padding_idx: None,
            positions: t,
            traced: true,
            storage: Storage::Factors,
            ragged: false,
        }
    }

    #[test]
    fn digits_at_the_boundaries() {
        let b = 2048usize;
        for (num, want) in [
            (1, 1),
            (b, 1),
            (b + 1, 2),
            (b * b - 1, 2),
            (b * b, 2),
            (b * b + 1, 3),
        ] {
            assert_eq!(spec(num, 4, 1).digits(), want, "num {num}");
        }
    }

    /// Base-2048 digits computed by repeated division, most significant
    /// first.
    fn naive_digits(mut id: u64, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; n];
        for slot in out.iter_mut().rev() {
            *slot = (id % 2048) as f64;
            id /= 2048;
        }
        out
    }

    #[test]
    fn ids_round_trip_through_digits() {
        let b = 2048u64;
        let cases = [
            (0, 1),
            (2047, 1),
            (2048, 2),
            (2049, 2),
            (b * b - 1, 2),
            (b * b, 3),
            (b * b + 5, 3),
            (b * b * b - 1, 3),
        ];
        for (id, d) in cases {
            let digits: Vec<f64> = id_digits(id, d).collect();
            assert_eq!(digits, naive_digits(id, d), "id {id}");
            assert_eq!(id_of(&digits), Some(id), "id {id}");
            // Every digit is exact in f16: an integer up to 2047.
            assert!(digits.iter().all(|&x| x.fract() == 0.0 && x < 2048.0));
        }
        assert_eq!(id_digits(2048, 2).collect::<Vec<_>>(), vec![1.0, 0.0]);
        assert_eq!(
            id_digits(b * b - 1, 2).collect::<Vec<_>>(),
            vec![2047.0, 2047.0]
        );
        assert_eq!(id_digits(b * b, 3).collect::<Vec<_>>(), vec![1.0, 0.0, 0.0]);
        // Leading zero digits when the table needs more than the id does.
        assert_eq!(id_digits(7, 3).collect::<Vec<_>>(), vec![0.0, 0.0, 7.0]);
        assert_eq!(id_of(&[0.0, 0.0, 7.0]), Some(7));
    }

    #[test]
    fn bad_digits_are_refused() {
        for bad in [
            &[2048.0][..],
            &[-1.0],
            &[1.5],
            &[f64::NAN],
            &[f64::INFINITY],
            &[3.0, 2048.0],
            &[],
        ] {
            assert_eq!(id_of(bad), None, "{bad:?}");
        }
        // Seven digits overflow u64 only when the top one is large.
        assert_eq!(id_of(&[2047.0; 7]), None);
        let s = spec(5000, 2, 3);
        assert_eq!(
            s.ids(&[0.0, 4.0, 2.0, 1.0, 1.0, 0.0]),
            Some(vec![4, 4097, 2048])
        );
        assert_eq!(s.ids(&[0.0, 4.0, 2.0]), None);
    }

    #[test]
    fn storage_rule_and_lens() {
        // 10×4 = 40 against T·(1 + 4): Full from T = 9.
        for t in 1..=20 {
            let s = spec(10, 4, t);
            let want = if 40 < t * 5 {
                Storage::Full
            } else {
                Storage::Factors
            };
            assert_eq!(s.instance_storage(), want, "T = {t}");
        }
        let mut s = spec(5000, 8, 6);
        assert_eq!(s.factor_lens(), (12, 48));
        assert_eq!(s.probe_lens(), (12, 48));
        assert_eq!(s.weight_shape(), vec![5000, 8]);
        assert_eq!(s.instance_storage(), Storage::Factors);
        s.storage = Storage::Full;
        assert_eq!(s.factor_lens(), (0, 40_000));
        assert!(s.records_full(Mode::Instance));
        assert!(!s.bias());
        s.padding_idx = Some(5000);
        assert!(s.check().is_err());
    }
}
