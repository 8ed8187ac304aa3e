//! The traced layer kinds: one module per kind, behind one trait.
//!
//! Every fact the format states about a traced layer that depends on its
//! kind (the shape of its weight, how long its records and probes are,
//! whether its records hold the whole update) is a method of
//! [`LayerKind`], implemented once per kind in that kind's module:
//!
//! | kind | module | spec |
//! |---|---|---|
//! | `linear` | [`linear`] | [`LinearSpec`] |
//! | `conv2d` | [`conv2d`] | [`Conv2dSpec`] (with its [`Storage`]) |
//!
//! [`TracedLayer`](crate::TracedLayer) holds a reference to one spec and
//! answers every question by handing it to [`TracedLayer::kind`]; the rest of
//! the format, and the crates above it, ask a `TracedLayer` and never match
//! on the kind for these facts.
//!
//! # How to add a kind
//!
//! 1. A module `kinds/<kind>.rs` with the kind's spec struct (serde, every
//!    field documented: it is part of the manifest) and its
//!    `impl LayerKind`.
//! 2. A variant of [`Module`](crate::Module) (its `kind` tag in the
//!    manifest's JSON is the variant's snake_case name) and of
//!    [`TracedLayer`](crate::TracedLayer), one arm in
//!    [`TracedLayer::kind`] and one in
//!    [`Model::traced_layers`](crate::Model::traced_layers).
//! 3. A new kind changes the manifest: bump
//!    [`FORMAT_VERSION`](crate::FORMAT_VERSION), add a row to the version
//!    table in `docs/format.md` and a fixture under `tests/data/`.
//!
//! The analyzer's arithmetic for the kind lives in its own module of
//! `reptrace_analyze::kernel`, the recorder's in the producers (the
//! Python tracer's `_kinds.py`, the tch crate).
//!
//! [`TracedLayer::kind`]: crate::TracedLayer::kind
use crate::manifest::Mode;

pub mod conv2d;
pub mod linear;

pub use conv2d::{Conv2dSpec, Storage};
pub use linear::LinearSpec;

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

    /// Shape of the weight tensor as PyTorch stores it (the bias, when
    /// there is one, is `weight_shape()[0]` long).
    fn weight_shape(&self) -> Vec<usize>;

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
}
