//! The traced layer kinds: one module per kind, behind one trait.
//!
//! Every fact the format states about a traced layer that depends on its
//! kind (the shape of its weight, how long its records and probes are,
//! whether its records hold the whole update, which storage a producer
//! picks) is a method of [`LayerKind`], implemented once per kind in that
//! kind's module:
//!
//! | kind | module | spec |
//! |---|---|---|
//! | `linear` | [`linear`] | [`LinearSpec`] (`T` positions, with its [`Storage`]) |
//! | `conv2d` | [`conv2d`] | [`Conv2dSpec`] (groups, [`PaddingMode`], [`Storage`]) |
//! | `conv1d` | [`conv1d`] | [`Conv1dSpec`] (a conv2d of height 1: [`Conv1dSpec::as_conv2d`]) |
//! | `embedding` | [`embedding`] | [`EmbeddingSpec`] (token ids as base-2048 digits) |
//! | `layer_norm`, `rms_norm` | [`norm`] | [`NormSpec`] (records always whole updates) |
//!
//! [`TracedLayer`](crate::TracedLayer) holds a reference to one spec and
//! answers every question by handing it to [`TracedLayer::kind`]; the rest of
//! the format, and the crates above it, ask a `TracedLayer` and never match
//! on the kind for these facts.
//!
//! # Storage
//!
//! An instance-mode record holds either the kind's factors `u` and `v` or
//! the whole per-example update (`u` empty, `v` = `[vec ΔW, Δb]`): the spec's
//! `storage` field says which ([`Storage`]), and every producer fills it in
//! with the one rule its kind states, [`LayerKind::instance_storage`]
//! (in short: the whole update when it is smaller than the factors).
//! Batch-mode records always hold the whole update.
//!
//! # How to add a kind
//!
//! 1. A module `kinds/<kind>.rs` with the kind's spec struct (serde, every
//!    field documented: it is part of the manifest) and its
//!    `impl LayerKind`.
//! 2. A variant of [`Module`](crate::Module) (its `kind` tag in the
//!    manifest's JSON is the variant's snake_case name) and of
//!    [`TracedLayer`](crate::TracedLayer), one arm in
//!    [`TracedLayer::kind`], one in [`Module::layer`] and one in
//!    [`Model::traced_layers`](crate::Model::traced_layers).
//! 3. A new kind changes the manifest: bump
//!    [`FORMAT_VERSION`](crate::FORMAT_VERSION), add a row to the version
//!    table in `docs/format.md`, the kind to `schemas/manifest.schema.json`
//!    and a fixture under `tests/data/`.
//!
//! The analyzer's arithmetic for the kind lives in its own module of
//! `reptrace_analyze::kernel`, the recorder's in the producers (the
//! Python tracer's `_kinds.py`, the tch crate).
//!
//! [`TracedLayer::kind`]: crate::TracedLayer::kind
//! [`Module::layer`]: crate::Module::layer
use crate::manifest::Mode;
use serde::{Deserialize, Serialize};

pub mod conv1d;
pub mod conv2d;
pub mod embedding;
pub mod linear;
pub mod norm;

pub use conv1d::Conv1dSpec;
pub use conv2d::Conv2dSpec;
pub use embedding::EmbeddingSpec;
pub use linear::LinearSpec;
pub use norm::NormSpec;

/// How a layer's instance-mode update records are stored (the spec's
/// `storage` field; batch-mode records always hold the whole update).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// `u` and `v` hold the kind's factors (its module says their layout),
    /// e.g. Conv2d: `u` (C_in·kh·kw × P, row-major) and `v` (C_out × P,
    /// row-major), ΔW = v uᵀ.
    #[default]
    Factors,
    /// `u` is empty; `v` holds `vec ΔW` (row-major in the weight's shape)
    /// followed by Δb when the layer has a bias.
    Full,
}

impl Storage {
    /// Whether records hold factors (the default, left out of the JSON of
    /// the kinds where it is optional).
    pub fn is_factors(&self) -> bool {
        *self == Storage::Factors
    }

    /// The one rule behind every kind's [`LayerKind::instance_storage`]:
    /// the whole update (`full` values) when it is smaller than the factors
    /// (`factors` values), else the factors.
    pub fn smaller(full: usize, factors: usize) -> Self {
        if full < factors {
            Storage::Full
        } else {
            Storage::Factors
        }
    }

    /// The rule for a Conv2d layer of groups 1 ([`Conv2dSpec`]'s
    /// [`LayerKind::instance_storage`]): the full per-example matrix
    /// (`C_out·K`, plus the bias) when it is smaller than the factors
    /// (`K·P + C_out·P`), else the factors.
    pub fn for_conv2d(out_channels: usize, patch_len: usize, positions: usize, bias: bool) -> Self {
        let full = out_channels * patch_len + if bias { out_channels } else { 0 };
        Storage::smaller(full, patch_len * positions + out_channels * positions)
    }
}

/// How a convolution pads its input (PyTorch's `padding_mode`, with
/// `F.pad`'s semantics; the padding is smaller than the input). The unfold
/// reads an out-of-range row `y` of an input of height `h` (and likewise a
/// column) as:
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaddingMode {
    /// 0 (`"zeros"`, the default).
    #[default]
    Zeros,
    /// Row `−y` when `y < 0`, row `2(h−1)−y` when `y ≥ h` (`"reflect"`).
    Reflect,
    /// Row `y` clamped to `[0, h−1]` (`"replicate"`).
    Replicate,
    /// Row `y mod h` (`"circular"`).
    Circular,
}

impl PaddingMode {
    /// Whether this is [`PaddingMode::Zeros`] (the default, left out of the
    /// JSON).
    pub fn is_zeros(&self) -> bool {
        *self == PaddingMode::Zeros
    }

    /// PyTorch's name of the mode (`zeros`, `reflect`, `replicate`,
    /// `circular`), as in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            PaddingMode::Zeros => "zeros",
            PaddingMode::Reflect => "reflect",
            PaddingMode::Replicate => "replicate",
            PaddingMode::Circular => "circular",
        }
    }
}

/// Serde default of the `positions` and `groups` fields.
pub(crate) fn one() -> usize {
    1
}

/// Serde `skip_serializing_if` of the `ragged` fields.
pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

/// How many values one row's two lists hold: a record's `u` and `v`, or a
/// probe's `a` and `p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lens {
    /// Every row holds exactly this many values in each list.
    Fixed(usize, usize),
    /// A row holds `n` positions of this many values each, in both lists
    /// (the same `n`): a ragged layer's ([`LayerKind::ragged`]) records,
    /// where `n ≥ 0`, and probes, where `n ≥ 1`.
    PerPosition(usize, usize),
}

impl Lens {
    /// The positions `n` of a row whose lists hold `first` and `second`
    /// values (1 for a [`Lens::Fixed`] row), or what is wrong with it.
    pub fn positions(&self, first: usize, second: usize) -> Result<usize, String> {
        match *self {
            Lens::Fixed(a, b) if (first, second) == (a, b) => Ok(1),
            Lens::Fixed(a, b) => Err(format!(
                "holds {first} and {second} values, expected {a} and {b}"
            )),
            Lens::PerPosition(a, b) => {
                let n = first.checked_div(a).unwrap_or(second / b.max(1));
                if first == n * a && second == n * b {
                    Ok(n)
                } else {
                    Err(format!(
                        "holds {first} and {second} values, not the same number of positions of {a} and {b}"
                    ))
                }
            }
        }
    }
}

/// Serde `skip_serializing_if` of the `positions` and `groups` fields.
pub(crate) fn is_one(n: &usize) -> bool {
    *n == 1
}

/// What a traced layer kind must say about itself: every per-kind fact of
/// the format.
///
/// An update record holds `u` and `v` ([`LayerKind::factor_lens`] long in
/// an instance-mode run) or the whole update `[vec ΔW, Δb]`
/// ([`LayerKind::update_len`] long, in `v`, `u` empty); a probe holds the
/// layer's input `a` and its refinement `p` ([`LayerKind::probe_lens`]).
pub trait LayerKind {
    /// The layer's name: its `layer=` partition value and the prefix of its
    /// tensors in the weights snapshots.
    fn name(&self) -> &str;

    /// Whether the layer has a bias.
    fn bias(&self) -> bool;

    /// Shape of the weight tensor as PyTorch stores it.
    fn weight_shape(&self) -> Vec<usize>;

    /// Shape of the bias tensor, when the layer has one: `weight_shape()[0]`
    /// long unless the kind says otherwise (a norm's is its
    /// `normalized_shape`).
    fn bias_shape(&self) -> Vec<usize> {
        self.weight_shape().into_iter().take(1).collect()
    }

    /// Lengths of one instance-mode record's `u` and `v` lists.
    fn factor_lens(&self) -> (usize, usize);

    /// Length of `vec ΔW` plus `Δb`.
    fn update_len(&self) -> usize;

    /// Lengths of a probe's `a` (layer input) and `p` (refinement) lists.
    fn probe_lens(&self) -> (usize, usize);

    /// Whether records of a run of `mode` hold the whole update (`u`
    /// empty). Batch-mode records always do.
    fn records_full(&self, mode: Mode) -> bool {
        mode == Mode::Batch
    }

    /// How many output positions each weight is applied at in one forward
    /// pass (1 for a layer applied once per example).
    fn positions(&self) -> usize {
        1
    }

    /// Whether records and probes hold a variable number of positions
    /// (the spec's `ragged` field, format 9): padded positions, and any
    /// whose output gradient is exactly zero, are left out of a record, so
    /// its factors hold `n ≤ T` positions (`T` is then the sequence length
    /// the storage rule was decided with, and a step may have any length);
    /// a probe holds the positions it has.
    fn ragged(&self) -> bool {
        false
    }

    /// Values per position of a factor record's `u` and `v` and of a
    /// probe's `a` and `p`, for a kind that can be [`LayerKind::ragged`].
    fn position_lens(&self) -> Option<[usize; 4]> {
        None
    }

    /// Whether a factor record's `u` holds exact integers (an embedding's
    /// token ids), which f16 storage never rounds: its update is a sum of
    /// `v` rows, whose rounding alone bounds the update's.
    fn u_is_ids(&self) -> bool {
        false
    }

    /// The kind's storage rule computed from the spec's other fields: what
    /// a producer writes into the spec's `storage` field for an
    /// instance-mode run ([`Storage`]).
    fn instance_storage(&self) -> Storage {
        Storage::Factors
    }

    /// Checks the fields that the other methods divide by or index with
    /// (positions, groups, shapes); the message names the bad field.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{Model, Module};
    use serde_json::{Value, json};

    fn conv2d() -> Conv2dSpec {
        Conv2dSpec {
            name: "conv1".into(),
            in_channels: 1,
            out_channels: 4,
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1],
            dilation: [1, 1],
            groups: 1,
            padding_mode: PaddingMode::Zeros,
            input_hw: [8, 8],
            output_hw: [4, 4],
            bias: true,
            traced: true,
            storage: Storage::Full,
        }
    }

    /// The exact text format 7 wrote for a linear and a conv2d module.
    const V7_LINEAR: &str = r#"{"kind":"linear","name":"fc","in_features":3,"out_features":2,"bias":true,"traced":true}"#;
    const V7_CONV2D: &str = r#"{"kind":"conv2d","name":"conv1","in_channels":1,"out_channels":4,"kernel":[3,3],"stride":[2,2],"padding":[1,1],"dilation":[1,1],"input_hw":[8,8],"output_hw":[4,4],"bias":true,"traced":true,"storage":"full"}"#;

    #[test]
    fn lens_count_positions_of_ragged_rows() {
        let fixed = Lens::Fixed(6, 4);
        assert_eq!(fixed.positions(6, 4), Ok(1));
        assert!(fixed.positions(6, 2).is_err());
        let per = Lens::PerPosition(3, 2);
        assert_eq!(per.positions(9, 6), Ok(3));
        assert_eq!(per.positions(0, 0), Ok(0));
        // Both lists must hold the same number of positions.
        assert!(per.positions(9, 4).is_err());
        assert!(per.positions(7, 4).is_err());
        // A norm's probe: a and p both D per position; a record with no u.
        assert_eq!(Lens::PerPosition(0, 5).positions(0, 15), Ok(3));
    }

    #[test]
    fn ragged_layers_read_their_lengths_per_position() {
        let seq = Module::Linear(LinearSpec {
            positions: 4,
            ragged: true,
            ..LinearSpec::new("seq", 3, 2, true)
        });
        let layer = seq.layer().unwrap();
        assert!(layer.ragged());
        assert_eq!(layer.record_shape(Mode::Instance), Lens::PerPosition(3, 2));
        assert_eq!(layer.record_shape(Mode::Batch), Lens::Fixed(0, 8));
        assert_eq!(layer.probe_shape(), Lens::PerPosition(3, 2));
        let json = serde_json::to_string(&seq).unwrap();
        assert!(json.contains(r#""ragged":true"#), "{json}");
        assert_eq!(serde_json::from_str::<Module>(&json).unwrap(), seq);
        // Not ragged: the fixed lengths of format 8, and no field written.
        let fixed = Module::Linear(LinearSpec {
            positions: 4,
            ..LinearSpec::new("seq", 3, 2, true)
        });
        let layer = fixed.layer().unwrap();
        assert_eq!(layer.record_shape(Mode::Instance), Lens::Fixed(12, 8));
        assert_eq!(layer.probe_shape(), Lens::Fixed(12, 8));
        assert!(!serde_json::to_string(&fixed).unwrap().contains("ragged"));
    }

    #[test]
    fn format_7_modules_serialize_byte_identically() {
        let linear = Module::Linear(LinearSpec::new("fc", 3, 2, true));
        assert_eq!(serde_json::to_string(&linear).unwrap(), V7_LINEAR);
        let conv = Module::Conv2d(conv2d());
        assert_eq!(serde_json::to_string(&conv).unwrap(), V7_CONV2D);
        // And read back unchanged, with the defaults of the new fields.
        assert_eq!(serde_json::from_str::<Module>(V7_LINEAR).unwrap(), linear);
        assert_eq!(serde_json::from_str::<Module>(V7_CONV2D).unwrap(), conv);
    }

    #[test]
    fn new_fields_are_written_only_when_not_default() {
        let linear = Module::Linear(LinearSpec {
            positions: 7,
            storage: Storage::Full,
            ..LinearSpec::new("fc", 3, 2, true)
        });
        let v: Value = serde_json::to_value(&linear).unwrap();
        assert_eq!(v["positions"], json!(7));
        assert_eq!(v["storage"], json!("full"));
        let conv = Module::Conv2d(Conv2dSpec {
            groups: 2,
            in_channels: 2,
            padding_mode: PaddingMode::Reflect,
            ..conv2d()
        });
        let v: Value = serde_json::to_value(&conv).unwrap();
        assert_eq!(v["groups"], json!(2));
        assert_eq!(v["padding_mode"], json!("reflect"));
        for m in [linear, conv] {
            let text = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<Module>(&text).unwrap(), m);
        }
        for mode in [
            PaddingMode::Zeros,
            PaddingMode::Reflect,
            PaddingMode::Replicate,
            PaddingMode::Circular,
        ] {
            assert_eq!(serde_json::to_value(mode).unwrap(), json!(mode.name()));
        }
    }

    fn new_kinds() -> Vec<Module> {
        let norm = NormSpec {
            name: "ln".into(),
            normalized_shape: vec![16],
            bias: true,
            eps: 1e-5,
            positions: 10,
            traced: true,
            ragged: false,
        };
        vec![
            Module::Conv1d(Conv1dSpec {
                name: "conv".into(),
                in_channels: 4,
                out_channels: 8,
                kernel: 3,
                stride: 1,
                padding: 1,
                dilation: 1,
                groups: 4,
                padding_mode: PaddingMode::Circular,
                input_len: 10,
                output_len: 10,
                bias: true,
                traced: true,
                storage: Storage::Full,
            }),
            Module::Embedding(EmbeddingSpec {
                name: "tok".into(),
                num_embeddings: 5000,
                embedding_dim: 16,
                padding_idx: Some(0),
                positions: 10,
                traced: true,
                storage: Storage::Factors,
                ragged: false,
            }),
            Module::LayerNorm(norm.clone()),
            Module::RmsNorm(NormSpec {
                name: "rms".into(),
                bias: false,
                ..norm
            }),
        ]
    }

    #[test]
    fn new_kinds_round_trip() {
        let kinds = ["conv1d", "embedding", "layer_norm", "rms_norm"];
        for (m, kind) in new_kinds().into_iter().zip(kinds) {
            let text = serde_json::to_string(&m).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["kind"], json!(kind));
            assert_eq!(serde_json::from_str::<Module>(&text).unwrap(), m);
            let layer = m.layer().unwrap();
            assert_eq!(layer.kind_name(), kind);
            assert!(layer.check().is_ok(), "{kind}");
        }
        let model = Model {
            name: "seq".into(),
            input_shape: vec![10],
            structure: Default::default(),
            modules: new_kinds(),
            frozen: vec![],
        };
        let names: Vec<_> = model.traced_layers().map(|l| l.name()).collect();
        assert_eq!(names, ["conv", "tok", "ln", "rms"]);
    }

    #[test]
    fn defaults_of_the_new_kinds() {
        // groups, padding_mode and padding_idx may be left out.
        let conv: Module = serde_json::from_value(json!({
            "kind": "conv1d", "name": "c", "in_channels": 2, "out_channels": 2, "kernel": 3,
            "stride": 1, "padding": 0, "dilation": 1, "input_len": 5, "output_len": 3,
            "bias": false, "traced": true, "storage": "factors"
        }))
        .unwrap();
        let Module::Conv1d(c) = &conv else {
            panic!("conv1d")
        };
        assert_eq!((c.groups, c.padding_mode), (1, PaddingMode::Zeros));
        let text = serde_json::to_string(&conv).unwrap();
        assert!(!text.contains("groups") && !text.contains("padding_mode"));
        let emb: Module = serde_json::from_value(json!({
            "kind": "embedding", "name": "e", "num_embeddings": 9, "embedding_dim": 2,
            "positions": 4, "traced": true, "storage": "full"
        }))
        .unwrap();
        let Module::Embedding(e) = &emb else {
            panic!("embedding")
        };
        assert_eq!(e.padding_idx, None);
        assert!(!serde_json::to_string(&emb).unwrap().contains("padding_idx"));
    }

    #[test]
    fn bad_specs_are_named() {
        let rms = Module::RmsNorm(NormSpec {
            name: "rms".into(),
            normalized_shape: vec![4],
            bias: true,
            eps: 1e-6,
            positions: 1,
            traced: true,
            ragged: false,
        });
        let e = rms.layer().unwrap().check().unwrap_err();
        assert!(e.contains("'rms'") && e.contains("bias"), "{e}");
        let linear = Module::Linear(LinearSpec {
            positions: 0,
            ..LinearSpec::new("fc", 3, 2, true)
        });
        let e = linear.layer().unwrap().check().unwrap_err();
        assert!(e.contains("'fc'") && e.contains("positions"), "{e}");
    }
}
