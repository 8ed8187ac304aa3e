//! The traced layer kinds, one module each: everything this crate knows of
//! one kind of layer lives in its module, and the rest of the crate asks
//! the kind through [`of`] (a spec) or [`layer`] (a model's module), never
//! by matching on the kind itself.
//!
//! A kind provides, in its module ([`linear`], [`conv2d`]):
//!
//! - its spec (`reptrace_format`'s `LinearSpec`, `Conv2dSpec`) from the tch
//!   module's configuration (`spec`, with the refusals of what cannot be
//!   traced) and, where the spec needs it, from the shape of the layer's
//!   first input (Conv2d: the input and output sizes and the storage rule,
//!   [`conv2d::sized`]);
//! - the [`Kind`] trait on that spec: the input layout it is traced for and
//!   the refusal's text ([`Kind::fits`], [`Kind::traced_input`]), the shape
//!   check of a built-in model ([`Kind::output_shape`]), the layer's
//!   operation ([`Kind::apply`]: the forward pass, and a probe's refinement
//!   `p = ΔW ⊛ a + Δb` in `f64`), each example's update factors and update
//!   norms ([`Kind::factors`], docs/method.md §2) and the gradient check's
//!   products ([`Kind::check_products`], [`crate::check`]).
//!
//! The generic code stays where it is and calls the kind: the step and the
//! hand-off to the recorder ([`crate::trace`], [`crate::factors`]), the
//! check's verdict ([`crate::check::measure`]), the probes' plumbing
//! ([`crate::probe`]) and the built-in models ([`crate::model`]).
//!
//! Adding a kind (its spec and `TracedLayer` variant come from
//! `reptrace_format`): a module here with its spec builders and its
//! [`Kind`] implementation; one arm in [`of`], [`layer`], [`traced`] and
//! [`traced_flag`] (and in [`at_first_input`] and [`fits_unsized`] if its
//! spec needs the first input); its variant in the `Module` patterns that
//! [`crate::model`] lists as "of a traced kind" (the compiler finds them);
//! a `Tracer` constructor in [`crate::trace`]; and its tests; the analyzer's side is in `reptrace_analyze`, the Python tracer's
//! in `python/reptrace/_kinds.py`.
use crate::Result;
use crate::factors::Factors;
use reptrace_format::{Dtype, Mode, Module, TracedLayer};
use tch::Tensor;

pub mod conv2d;
pub mod linear;

/// The gradient check's products of one layer and step along the random
/// direction `r` of its weight ([`Kind::check_products`]), `f32` on the
/// device.
#[derive(Debug)]
pub struct CheckProducts {
    /// `Σ_i δ_i (u_iᵀ r)`: the records' weight gradient along `r`.
    pub weight: Tensor,
    /// `Σ_i |δ_i| |u_iᵀ r|`: its magnitude (the scale of rounding).
    pub weight_magnitude: Tensor,
    /// `Σ_i δ_i`: the records' bias gradient.
    pub bias: Tensor,
    /// `Σ_i |δ_i|`: its magnitude.
    pub bias_magnitude: Tensor,
}

/// What a traced layer kind computes; implemented on the kind's spec.
pub trait Kind {
    /// Whether a layer input of `size` (batch first) has the layout the
    /// layer is traced for.
    fn fits(&self, size: &[usize]) -> bool;

    /// The inputs the layer is traced for, as the refusal of an input that
    /// does not [`Kind::fits`] says it (`"(batch, 4) inputs"`).
    fn traced_input(&self) -> String;

    /// The shape of one example's output for an example input of `shape`
    /// when the layer is module `module` of a model, or why the spec does
    /// not fit that input ([`crate::model::check_model`]).
    fn output_shape(
        &self,
        module: usize,
        shape: &[usize],
    ) -> std::result::Result<Vec<usize>, String>;

    /// The layer's operation with `weight` and `bias` on `x` (batch first):
    /// its forward pass, and with the displacements `ΔW`, `Δb` in `f64` a
    /// probe's refinement `p = ΔW ⊛ a + Δb` (not flattened).
    fn apply(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor>;

    /// The factors of the layer's per-example updates for a batch: `input`
    /// is the layer input, `delta` the gradient of the batch loss at the
    /// layer output (same shape as the output), `lr` the learning rate.
    fn factors(&self, input: &Tensor, delta: &Tensor, lr: f64) -> Result<Factors>;

    /// [`Kind::factors`] for a run recorded in `dtype`: an `update_norm` the
    /// kind computes is that of the values the run stores (for f16, of the
    /// factors rounded to f16), as the recorder's own is.
    fn factors_stored(
        &self,
        input: &Tensor,
        delta: &Tensor,
        lr: f64,
        _dtype: Dtype,
    ) -> Result<Factors> {
        self.factors(input, delta, lr)
    }

    /// The gradient check's products: `input` the layer input, `g` its `δ`
    /// in `f32`, `r` the direction (the weight's `[0]` rows flattened).
    fn check_products(&self, input: &Tensor, g: &Tensor, r: &Tensor) -> Result<CheckProducts>;
}

/// The kind of a traced layer; an error for a kind the tch tracer does not
/// trace.
pub fn of<'a>(layer: TracedLayer<'a>) -> crate::Result<&'a dyn Kind> {
    match layer {
        TracedLayer::Linear(l) => Ok(l),
        TracedLayer::Conv2d(c) => Ok(c),
        TracedLayer::Conv1d(_)
        | TracedLayer::Embedding(_)
        | TracedLayer::LayerNorm(_)
        | TracedLayer::RmsNorm(_) => Err(crate::Error::Trace(format!(
            "layer '{}': {} layers are recorded by the Python tracer; the tch tracer traces linear and conv2d",
            layer.name(),
            layer.kind_name()
        ))),
    }
}

/// Refuses, in one line naming the layer, a module the tch tracer does not
/// trace: a kind only the Python tracer records (conv1d, embedding, norms),
/// a linear layer at several positions, a grouped or non-zero-padded conv2d.
pub fn refuse_untraceable(module: &Module) -> std::result::Result<(), String> {
    let python_only = |name: &str, what: &str| {
        Err(format!(
            "layer '{name}': {what} are recorded by the Python tracer; the tch tracer traces linear and conv2d"
        ))
    };
    match module {
        Module::Conv1d(c) => python_only(&c.name, "conv1d layers"),
        Module::Embedding(e) => python_only(&e.name, "embedding layers"),
        Module::LayerNorm(n) => python_only(&n.name, "layer_norm layers"),
        Module::RmsNorm(n) => python_only(&n.name, "rms_norm layers"),
        Module::Linear(l) if l.positions != 1 => python_only(
            &l.name,
            &format!("linear layers at {} positions", l.positions),
        ),
        Module::Linear(l) if l.ragged => {
            python_only(&l.name, "ragged linear layers (variable positions)")
        }
        Module::Conv2d(c) if c.groups != 1 => {
            python_only(&c.name, &format!("conv2d layers with groups {}", c.groups))
        }
        Module::Conv2d(c) if !c.padding_mode.is_zeros() => python_only(
            &c.name,
            &format!("conv2d layers with padding mode {}", c.padding_mode.name()),
        ),
        _ => Ok(()),
    }
}

/// A model's module as a layer of a traced kind, traced or not; `None` for
/// a module of no traced kind.
pub fn layer(module: &Module) -> Option<TracedLayer<'_>> {
    match module {
        Module::Linear(l) => Some(TracedLayer::Linear(l)),
        Module::Conv2d(c) => Some(TracedLayer::Conv2d(c)),
        _ => None,
    }
}

/// A model's module as a traced layer: of a traced kind, and traced.
pub fn traced(module: &Module) -> Option<TracedLayer<'_>> {
    match module {
        Module::Linear(l) if l.traced => Some(TracedLayer::Linear(l)),
        Module::Conv2d(c) if c.traced => Some(TracedLayer::Conv2d(c)),
        _ => None,
    }
}

/// The name and `traced` flag of a module of a traced kind.
pub fn traced_flag(module: &mut Module) -> Option<(&str, &mut bool)> {
    match module {
        Module::Linear(l) => Some((&l.name, &mut l.traced)),
        Module::Conv2d(c) => Some((&c.name, &mut c.traced)),
        _ => None,
    }
}

/// A user's layer spec completed from the shape of its first input (batch
/// first) in a run of `mode`, for the kinds whose spec needs it (Conv2d:
/// [`conv2d::at_first_input`]); any other spec as it is.
pub fn at_first_input(name: &str, spec: &Module, shape: &[usize], mode: Mode) -> Result<Module> {
    Ok(match spec {
        Module::Conv2d(c) => Module::Conv2d(conv2d::at_first_input(name, c, shape, mode)?),
        m => m.clone(),
    })
}

/// Whether an input of `size` fits a spec not yet completed by
/// [`at_first_input`], and the inputs it is traced for (the refusal's
/// text).
pub fn fits_unsized(spec: &Module, size: &[usize]) -> (bool, String) {
    match spec {
        Module::Conv2d(c) => (
            conv2d::fits_unsized(c, size),
            conv2d::UNSIZED_INPUT.to_owned(),
        ),
        m => match layer(m).map(of) {
            Some(Ok(kind)) => (kind.fits(size), kind.traced_input()),
            _ => (true, String::new()),
        },
    }
}
