//! Probes: a traced layer's input in the final network and its refinement.
//!
//! For a probe `x` and traced layer, `a` is the layer input in the final
//! network (Conv2d: the raw `C_in × H × W` input, not unfolded) and
//! `p = (W_T − W_0) ⊛ a + (b_T − b_0)`, computed in `f64` from the weights
//! (Conv2d: `C_out × h_out·w_out`). Training ([`crate::train()`]) and probes
//! added later ([`crate::add_probes`]) both compute them with
//! [`displacements`] and [`probe_chunk`].
use crate::model::Network;
use crate::{Result, kinds};
use reptrace_format::TracedLayer;
use tch::{Device, Kind, Tensor};

/// Which instances become probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProbeSet {
    /// The test split (`instance_id` null: not training instances).
    #[default]
    Test,
    /// The training split (`instance_id` = the instance).
    Train,
    /// Both splits.
    All,
    /// No probes.
    None,
}

impl std::str::FromStr for ProbeSet {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "test" => Ok(ProbeSet::Test),
            "train" => Ok(ProbeSet::Train),
            "all" => Ok(ProbeSet::All),
            "none" => Ok(ProbeSet::None),
            _ => Err(format!(
                "unknown probe set {s:?} (expected test, train, all or none)"
            )),
        }
    }
}

impl std::fmt::Display for ProbeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProbeSet::Test => "test",
            ProbeSet::Train => "train",
            ProbeSet::All => "all",
            ProbeSet::None => "none",
        })
    }
}

impl ProbeSet {
    /// The data set rows that are probes, for `n_train` training rows of `n`.
    pub fn rows(self, n_train: usize, n: usize) -> std::ops::Range<usize> {
        match self {
            ProbeSet::Test => n_train..n,
            ProbeSet::Train => 0..n_train,
            ProbeSet::All => 0..n,
            ProbeSet::None => 0..0,
        }
    }
}

/// The layer's weight and bias change `W_T − W_0`, `b_T − b_0`, in `f64`.
#[derive(Debug)]
pub struct Displacement {
    /// `W_T − W_0`, the weight's shape, `f64`, on the weights' device.
    pub weight: Tensor,
    /// `b_T − b_0` (`f64`), `None` when the layer has no bias.
    pub bias: Option<Tensor>,
}

impl Displacement {
    /// `final − initial`, in `f64`.
    pub fn new(
        w_final: &Tensor,
        w_initial: &Tensor,
        b_final: Option<&Tensor>,
        b_initial: Option<&Tensor>,
    ) -> Result<Self> {
        let d = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
            Ok(a.f_detach()?
                .f_to_kind(Kind::Double)?
                .f_sub(&b.f_detach()?.f_to_kind(Kind::Double)?)?)
        };
        let bias = match (b_final, b_initial) {
            (Some(f), Some(i)) => Some(d(f, i)?),
            _ => None,
        };
        Ok(Self {
            weight: d(w_final, w_initial)?,
            bias,
        })
    }

    /// `p` for a batch of layer inputs `a` (`N × …`), as `N × p_len` `f64`.
    pub fn refinement(&self, layer: TracedLayer<'_>, a: &Tensor) -> Result<Tensor> {
        let a = a.f_detach()?.f_to_kind(Kind::Double)?;
        let n = a.size().first().copied().unwrap_or(0);
        let p = kinds::of(layer)?.apply(&a, &self.weight, self.bias.as_ref())?;
        Ok(p.f_reshape([n, -1])?)
    }

    /// A chunk's probe values at the layer: `a` (the inputs `N × …`) and
    /// `p` ([`Displacement::refinement`]), row-major `f64` on the host.
    pub fn probe_values(&self, layer: TracedLayer<'_>, a: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
        let p = self.refinement(layer, a)?;
        let a = a
            .f_to_kind(Kind::Double)?
            .f_contiguous()?
            .f_flatten(0, -1)?;
        Ok((
            Vec::<f64>::try_from(&a)?,
            Vec::<f64>::try_from(&p.f_contiguous()?.f_flatten(0, -1)?)?,
        ))
    }
}

/// The predicted class (argmax of the last dimension) of every row of
/// `logits`, on the host.
pub fn predictions(logits: &Tensor) -> Result<Vec<i32>> {
    let classes = logits.f_argmax(-1, false)?.f_to_device(Device::Cpu)?;
    Ok(Vec::<i64>::try_from(&classes)?
        .into_iter()
        .map(|p| p as i32)
        .collect())
}

/// The displacement of every traced layer of `net` (its current parameters)
/// from its initial parameters, which `initial` finds by name
/// (`<layer>.weight`, `<layer>.bias`), keyed by module index. A layer whose
/// initial weight is not found is left out.
pub fn displacements<'t>(
    net: &Network,
    initial: impl Fn(&str) -> Option<&'t Tensor>,
) -> Result<Vec<(usize, Displacement)>> {
    let mut out = Vec::new();
    for i in 0..net.model().modules.len() {
        let (Some(layer), Some((w, b))) = (net.traced_layer(i), net.layer_params(i)) else {
            continue;
        };
        let w0 = initial(&format!("{}.weight", layer.name()));
        let b0 = initial(&format!("{}.bias", layer.name()));
        let Some(w0) = w0 else { continue };
        out.push((i, Displacement::new(&w, w0, b.as_ref(), b0)?));
    }
    Ok(out)
}

/// One traced layer's probe values for a chunk of inputs.
#[derive(Debug)]
pub struct LayerProbes {
    /// Index of the layer in the model's modules.
    pub module: usize,
    /// `N × a_len` layer inputs, row-major.
    pub a: Vec<f64>,
    /// `N × p_len` refinements, row-major.
    pub p: Vec<f64>,
}

/// A chunk of probes through the network: predictions and, per traced layer
/// with a displacement, `a` and `p`.
#[derive(Debug)]
pub struct ChunkProbes {
    /// The predicted class (argmax of the output) of every input.
    pub predicted: Vec<i32>,
    /// In forward order.
    pub layers: Vec<LayerProbes>,
}

/// Runs a chunk of inputs `x` (`[N, …input_shape]`) through `net` in
/// evaluation mode without gradients, and computes every traced layer's
/// probe values with its displacement.
pub fn probe_chunk(
    net: &Network,
    displacements: &[(usize, Displacement)],
    x: &Tensor,
) -> Result<ChunkProbes> {
    let _guard = tch::no_grad_guard();
    let (logits, taps) = net.forward(x, false, true)?;
    let predicted = predictions(&logits)?;
    let mut layers = Vec::with_capacity(taps.len());
    for tap in &taps {
        let (Some(layer), Some((_, disp))) = (
            net.traced_layer(tap.module),
            displacements.iter().find(|(m, _)| *m == tap.module),
        ) else {
            continue;
        };
        let (a, p) = disp.probe_values(layer, &tap.input)?;
        layers.push(LayerProbes {
            module: tap.module,
            a,
            p,
        });
    }
    Ok(ChunkProbes { predicted, layers })
}
