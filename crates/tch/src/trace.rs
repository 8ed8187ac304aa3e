//! Tracing a training loop of your own: traced layers and a [`Tracer`].
//!
//! tch has no module hooks, so the layers to trace are built through the
//! tracer: [`Tracer::linear`] and [`Tracer::conv2d`] make the same
//! parameters in your [`nn::Path`] as `tch::nn::linear`/`conv2d` (same
//! names, shapes and initialisation) and return modules you compose as you
//! like (skip connections, nested modules, any activation). In a forward
//! pass with gradients each traced layer keeps its input `a` and adds a
//! zero leaf `e` to the graph (`z − e`, exactly `z` in every bit); after
//! your `loss.backward()` the gradient of `e` is `−δ`, the gradient of the
//! batch loss at the layer output. [`Tracer::step`] builds each example's
//! update factors from `a` and `δ` ([`crate::factors`]), hands them to the
//! [`Recorder`], then runs your optimizer step. Training with the tracer is
//! bit for bit the training without it.
//!
//! The crate documentation shows a whole step; the `own_model` example a
//! residual network trained on the digits with tch's SGD, then queried.
//!
//! Instance mode records SGD (any learning rate per step, momentum,
//! dampening, Nesterov, weight decay, as [`RunSpec::optimizer`] describes
//! your optimizer; a momentum that changes per step through
//! [`Step::momentum`]) and Adam/AdamW ([`Tracer::step_adam`]: records
//! `v = −κ·δ` and per step and layer the step size and preconditioner read
//! from the optimizer's state; docs/method.md §6); batch mode records each
//! step's whole update and works with any optimizer. The built-in loop ([`crate::train()`]) records
//! through this same tracer.
//!
//! Each instance-mode step is checked before your optimizer runs: every
//! traced layer's `.grad()` (after any clipping, e.g.
//! `opt.clip_grad_norm(max)`) must equal the sum of the step's per-example
//! gradients up to one scalar, which is measured and folded into the
//! records ([`crate::check`]); any other difference stops the run with
//! [`Error::Inexact`]. What each step applied is in the `layer_steps`
//! table. A loop that takes its gradients from [`Tracer::backward`] hands
//! them to its optimizer itself, unchecked: apply them as returned.
use crate::probe::{Displacement, predictions};
use crate::{Error, Result};
use crate::{check, kinds};
use reptrace_format::{
    Dtype, Manifest, Mode, Model, Module, Optimizer, OptimizerKind, Split, TracedLayer,
};
use reptrace_record::{
    AdamStep, BatchStep, ExampleBatch, LayerStepRow, NamedTensor, ProbeBatch, Recorder, StepRow,
    UpdateBatchOwned, example_losses,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor, nn};

/// Rows per forward pass when probing.
const PROBE_CHUNK: usize = 1024;

/// The relative difference allowed between an Adam/AdamW update as applied
/// and as `−c·D⊙m` from the optimizer's state (float32 rounding).
const ADAM_CHECK: f64 = 1e-4;

/// One parameter's Adam/AdamW state right after a step, as PyTorch keeps it
/// (`optimizer.state[p]`): what [`Tracer::step_adam`] reads.
#[derive(Debug)]
pub struct AdamParam {
    /// `state["step"]`: the optimizer's steps for this parameter so far.
    pub step: i64,
    /// `state["exp_avg"]`: the first moment `m_t`.
    pub exp_avg: Tensor,
    /// `state["exp_avg_sq"]`: the second moment `v_t` (under AMSGrad its
    /// running maximum, `max_exp_avg_sq`).
    pub exp_avg_sq: Tensor,
}

/// What traced layers leave for the tracer in a forward pass; shared by the
/// tracer and its layers (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Taps(Arc<Mutex<TapState>>);

#[derive(Debug, Default)]
struct TapState {
    /// Recording: forward passes with gradients tap.
    on: bool,
    /// Probing: keep inputs of forward passes without gradients.
    capture: bool,
    /// The last forward pass's tap of each layer.
    taps: BTreeMap<String, Tap>,
    /// Layers in the order they first ran since the taps were last taken.
    order: Vec<String>,
    /// A failure inside a forward pass (a module cannot return errors).
    failed: Option<String>,
}

/// One traced layer's part of a forward pass.
#[derive(Debug)]
struct Tap {
    /// The layer input (detached).
    input: Tensor,
    /// The zero leaf subtracted from the output; `None` when probing.
    zero: Option<Tensor>,
    /// `δ` when [`Tracer::backward`] computed it.
    delta: Option<Tensor>,
    /// Forward passes through the layer since the taps were last taken.
    calls: usize,
}

impl Taps {
    fn state(&self) -> MutexGuard<'_, TapState> {
        // A panic elsewhere cannot leave the state half-written.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a traced layer with its input and output: returns the
    /// output to continue with (the same values). With gradients on, the
    /// output gets a zero leaf whose gradient is `−δ`; when probing, only
    /// the input is kept; otherwise nothing happens.
    pub fn tap(&self, layer: &str, input: &Tensor, output: Tensor) -> Tensor {
        let mut state = self.state();
        let grad = state.on && output.requires_grad();
        if !grad && !state.capture {
            return output;
        }
        let made = (|| -> std::result::Result<(Tensor, Option<Tensor>, Tensor), tch::TchError> {
            let input = input.f_detach()?;
            if !grad {
                return Ok((input, None, output.shallow_clone()));
            }
            let zero = output.f_zeros_like()?.f_set_requires_grad(true)?;
            // z − 0 is z in every bit, signed zeros included.
            let out = output.f_sub(&zero)?;
            Ok((input, Some(zero), out))
        })();
        match made {
            Ok((input, zero, out)) => {
                let calls = state.taps.get(layer).map_or(0, |t| t.calls);
                if calls == 0 {
                    state.order.push(layer.to_owned());
                }
                state.taps.insert(
                    layer.to_owned(),
                    Tap {
                        input,
                        zero,
                        delta: None,
                        calls: calls + 1,
                    },
                );
                out
            }
            Err(e) => {
                state.failed = Some(format!("layer {layer}: {e}"));
                output
            }
        }
    }

    /// Takes the taps of the forward passes since the last take, in the
    /// order the layers first ran.
    fn take(&self) -> Result<Vec<(String, Tap)>> {
        let mut state = self.state();
        let order = std::mem::take(&mut state.order);
        let mut taps = std::mem::take(&mut state.taps);
        if let Some(failed) = state.failed.take() {
            return Err(Error::Trace(format!(
                "a traced layer failed to tap: {failed}"
            )));
        }
        Ok(order
            .into_iter()
            .filter_map(|n| taps.remove(&n).map(|t| (n, t)))
            .collect())
    }

    fn set_on(&self, on: bool) {
        let mut state = self.state();
        state.on = on;
        state.order.clear();
        state.taps.clear();
    }

    fn set_capture(&self, on: bool) {
        let mut state = self.state();
        state.capture = on;
        state.order.clear();
        state.taps.clear();
    }
}

/// A traced layer: a tch module (`nn::Linear`, `nn::Conv2D`) whose forward
/// pass taps its input and output ([`Taps::tap`]).
#[derive(Debug)]
pub struct Traced<M> {
    name: String,
    inner: M,
    taps: Taps,
}

/// A traced Linear layer ([`Tracer::linear`]).
pub type TracedLinear = Traced<nn::Linear>;

/// A traced Conv2d layer ([`Tracer::conv2d`]).
pub type TracedConv2d = Traced<nn::Conv2D>;

impl<M: nn::Module> nn::Module for Traced<M> {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.taps.tap(&self.name, xs, self.inner.forward(xs))
    }
}

impl<M> Traced<M> {
    /// The layer's name: its path, components joined by `.` (`block.a`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tch module inside (its parameters: `ws`, `bs`).
    pub fn inner(&self) -> &M {
        &self.inner
    }
}

/// What the tracer knows of a traced layer.
#[derive(Debug)]
enum LayerKind {
    /// A complete spec (the built-in loop's layers, or a user's layer once
    /// its input shape is known).
    Spec(Module),
    /// A user's layer whose kind needs its first input to complete the
    /// spec (Conv2d: the input and output sizes and the storage), before
    /// that input ([`kinds::at_first_input`]).
    Unsized(Module),
}

#[derive(Debug)]
struct Layer {
    name: String,
    kind: LayerKind,
    weight: Tensor,
    bias: Option<Tensor>,
    /// `W_0`, `b_0`: copies taken when recording starts (for probes).
    initial: Option<(Tensor, Option<Tensor>)>,
}

impl Layer {
    fn spec(&self) -> Option<TracedLayer<'_>> {
        match &self.kind {
            LayerKind::Spec(m) => kinds::layer(m),
            LayerKind::Unsized(_) => None,
        }
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(format!("{}.weight", self.name), self.weight.shallow_clone())];
        if let Some(b) = &self.bias {
            out.push((format!("{}.bias", self.name), b.shallow_clone()));
        }
        out
    }
}

/// The run a [`Tracer`] records into, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// The run directory (missing or empty).
    pub out: PathBuf,
    /// The model's name in the manifest.
    pub name: String,
    /// Class names, indexed by label.
    pub classes: Vec<String>,
    /// Your optimizer, as the manifest describes it: in instance mode SGD,
    /// Adam or AdamW (betas, eps) with the hyper-parameters your optimizer
    /// uses (the learning rate of each step is given to [`Tracer::step`]).
    pub optimizer: Optimizer,
    /// Instance mode (each example's share of each update; SGD) or batch
    /// mode (each step's whole update; any optimizer).
    pub mode: Mode,
    /// Stored type of the factors.
    pub dtype: Dtype,
    /// The shape of one input example (default: the first traced layer's
    /// input shape).
    pub input_shape: Option<Vec<usize>>,
    /// Free-form settings kept in the manifest.
    pub settings: Vec<(String, serde_json::Value)>,
    /// Zstandard level of the run's Parquet files (`None`: 1).
    pub zstd_level: Option<i32>,
    /// Compression while recording (default zstd).
    pub compression: reptrace_record::Compression,
}

impl RunSpec {
    /// Plain SGD with learning rate `lr` in instance mode, f32 factors.
    pub fn sgd(out: impl Into<PathBuf>, classes: Vec<String>, lr: f64) -> Self {
        Self {
            out: out.into(),
            name: "model".into(),
            classes,
            optimizer: Optimizer::sgd(lr),
            mode: Mode::Instance,
            dtype: Dtype::F32,
            input_shape: None,
            settings: Vec::new(),
            zstd_level: None,
            compression: reptrace_record::Compression::Zstd,
        }
    }
}

/// One training step as [`Tracer::step`] records it.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// The batch loss (a scalar) the gradients came from.
    pub loss: &'a Tensor,
    /// The batch's instance ids (e.g. data set rows), in batch order.
    pub ids: &'a [i64],
    /// Their labels, indexes into the run's classes.
    pub labels: &'a [i32],
    /// The learning rate of this step.
    pub lr: f64,
    /// The momentum of this step when your loop changes it from step to
    /// step (`opt.set_momentum`, a cycling schedule); `None`: the run's
    /// ([`RunSpec::optimizer`]).
    pub momentum: Option<f64>,
    /// The model's output (`batch × classes` logits): each example's loss
    /// and prediction go to the `examples` table; `None`: not recorded.
    pub logits: Option<&'a Tensor>,
}

/// Probes: inputs whose representations the run explains, with their ids.
#[derive(Debug, Clone, Copy)]
pub struct Probes<'a> {
    /// `N × …input_shape` inputs.
    pub inputs: &'a Tensor,
    /// Their labels.
    pub labels: &'a [i32],
    /// Probe ids (unique in the run).
    pub ids: &'a [i64],
    /// The training instance each probe is, or `None` (not a training
    /// example); empty: none is.
    pub instance_ids: &'a [Option<i64>],
}

/// Runs the model on a chunk of probe inputs: `|x| model.forward_t(x, false)`.
pub type Forward<'f> = &'f mut dyn FnMut(&Tensor) -> Tensor;

/// A parameter on the host: name, shape, values.
type HostWeight = (String, Vec<usize>, Vec<f32>);

/// Where the tracer spent time (for the built-in loop's summary).
#[derive(Debug, Default, Clone, Copy)]
pub struct Timing {
    /// Building factors and copying them to the host.
    pub factors: Duration,
    /// Recorder calls during steps.
    pub record: Duration,
}

/// Records a training loop: owns the traced layers' taps and the recorder.
#[derive(Debug)]
pub struct Tracer {
    taps: Taps,
    layers: Vec<Layer>,
    pending: Option<RunSpec>,
    instances: Option<(Vec<i64>, Vec<i32>, Vec<Split>)>,
    rec: Option<Recorder>,
    mode: Mode,
    dtype: Dtype,
    /// The optimizer's settings (instance mode: those of every step unless
    /// [`Step`] changes them).
    optimizer: Optimizer,
    /// Number of classes (labels are checked against it).
    classes: usize,
    step: i64,
    epoch: i32,
    /// Steps done when the tracer last wrote a weights snapshot (its own
    /// recorder only: the built-in loop writes its own).
    snapshot_steps: Option<i64>,
    closed: bool,
    /// Time spent in factors and recorder calls.
    pub timing: Timing,
}

/// The name of a layer at `path`: its components joined by `.`, as the
/// VarStore names its variables (`block.a` holds `block.a.weight`), so that
/// the run's weights snapshots use the VarStore's names.
fn path_name(path: &nn::Path<'_>) -> String {
    path.components().collect::<Vec<_>>().join(".")
}

impl Default for Tracer {
    fn default() -> Self {
        Self {
            taps: Taps::default(),
            layers: Vec::new(),
            pending: None,
            instances: None,
            rec: None,
            mode: Mode::Instance,
            dtype: Dtype::F32,
            optimizer: Optimizer::sgd(0.0),
            classes: 0,
            step: 0,
            epoch: 0,
            snapshot_steps: None,
            closed: false,
            timing: Timing::default(),
        }
    }
}

impl Tracer {
    /// A tracer with no layers, not recording yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The taps its layers report to (for modules of your own that call
    /// [`Taps::tap`]).
    pub fn taps(&self) -> &Taps {
        &self.taps
    }

    fn add_layer(
        &mut self,
        name: String,
        kind: LayerKind,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> Result<()> {
        reptrace_format::layout::check_layer_name(&name)
            .map_err(|e| Error::Trace(format!("layer name {name:?}: {e}")))?;
        if self.layers.iter().any(|l| l.name == name) {
            return Err(Error::Trace(format!("layer {name:?} is traced twice")));
        }
        if self.rec.is_some() || self.pending.is_some() && self.step > 0 {
            return Err(Error::Trace(format!(
                "layer {name:?} added after recording started"
            )));
        }
        self.layers.push(Layer {
            name,
            kind,
            weight,
            bias,
            initial: None,
        });
        Ok(())
    }

    /// Adds a layer and wraps its tch module.
    fn traced<M>(
        &mut self,
        name: String,
        kind: LayerKind,
        weight: Tensor,
        bias: Option<Tensor>,
        inner: M,
    ) -> Result<Traced<M>> {
        self.add_layer(name.clone(), kind, weight, bias)?;
        Ok(Traced {
            name,
            inner,
            taps: self.taps.clone(),
        })
    }

    /// A traced Linear layer in `path`, like `tch::nn::linear(path, in_dim,
    /// out_dim, config)`; its name is the path joined by `.` (`"block1.fc"`).
    pub fn linear(
        &mut self,
        path: nn::Path<'_>,
        in_dim: i64,
        out_dim: i64,
        config: nn::LinearConfig,
    ) -> Result<TracedLinear> {
        let name = path_name(&path);
        let bias = config.bias;
        let inner = nn::linear(&path, in_dim, out_dim, config);
        let spec = kinds::linear::spec(&name, in_dim as usize, out_dim as usize, bias);
        let (ws, bs) = (
            inner.ws.shallow_clone(),
            inner.bs.as_ref().map(Tensor::shallow_clone),
        );
        self.traced(name, LayerKind::Spec(Module::Linear(spec)), ws, bs, inner)
    }

    /// A traced Conv2d layer in `path`, like `tch::nn::conv2d(path, in_dim,
    /// out_dim, kernel, config)`. Grouped convolutions and padding modes
    /// other than zeros are refused.
    pub fn conv2d(
        &mut self,
        path: nn::Path<'_>,
        in_dim: i64,
        out_dim: i64,
        kernel: i64,
        config: nn::ConvConfig,
    ) -> Result<TracedConv2d> {
        let name = path_name(&path);
        let kind = LayerKind::Unsized(Module::Conv2d(kinds::conv2d::spec(
            &name, in_dim, out_dim, kernel, &config,
        )?));
        let inner = nn::conv2d(&path, in_dim, out_dim, kernel, config);
        let (ws, bs) = (
            inner.ws.shallow_clone(),
            inner.bs.as_ref().map(Tensor::shallow_clone),
        );
        self.traced(name, kind, ws, bs, inner)
    }

    /// Traces a layer whose spec is complete (the built-in loop's
    /// [`crate::Network`] layers): `weight` and `bias` are its live
    /// parameters, and its forward pass calls [`Taps::tap`] with its name.
    pub fn add_spec(&mut self, spec: Module, weight: Tensor, bias: Option<Tensor>) -> Result<()> {
        let Some(name) = kinds::layer(&spec).map(|l| l.name().to_owned()) else {
            return Err(Error::Trace(
                "only Linear and Conv2d layers are traced".into(),
            ));
        };
        self.add_layer(name, LayerKind::Spec(spec), weight, bias)
    }

    /// The traced layers' names, in the order they were added.
    pub fn layer_names(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.name.clone()).collect()
    }

    /// Records into a new run as `spec` says. The recorder starts at the
    /// first step, when the layers' input shapes are known.
    pub fn record(&mut self, spec: RunSpec) -> Result<()> {
        let bad =
            |setting: &'static str, message: String| Err(Error::BadSetting { setting, message });
        if self.rec.is_some() || self.pending.is_some() {
            return Err(Error::Trace("the tracer is already recording".into()));
        }
        if self.layers.is_empty() {
            return Err(Error::Trace(
                "no traced layer: build layers with Tracer::linear or Tracer::conv2d first".into(),
            ));
        }
        if spec.classes.len() < 2 {
            return bad(
                "classes",
                format!("{} given, at least 2 needed", spec.classes.len()),
            );
        }
        if spec.mode == Mode::Instance && spec.optimizer.kind == OptimizerKind::Other {
            return bad(
                "optimizer",
                "instance mode records SGD (momentum, Nesterov and weight decay included), Adam and AdamW (with Tracer::step_adam); record other optimizers in batch mode".into(),
            );
        }
        if spec.out.exists()
            && (!spec.out.is_dir()
                || std::fs::read_dir(&spec.out).map_or(true, |mut d| d.next().is_some()))
        {
            return Err(Error::Run {
                run: spec.out.clone(),
                message: "the run directory exists and is not empty; give a new one".into(),
            });
        }
        self.mode = spec.mode;
        self.dtype = spec.dtype;
        self.optimizer = spec.optimizer.clone();
        self.classes = spec.classes.len();
        self.pending = Some(spec);
        self.taps.set_on(true);
        Ok(())
    }

    /// Records with a recorder built elsewhere (the built-in loop), whose
    /// manifest already describes the traced layers added with
    /// [`Tracer::add_spec`] and the `optimizer`. Weights and instances are
    /// the caller's to write.
    pub fn record_with(
        &mut self,
        rec: Recorder,
        classes: usize,
        mode: Mode,
        dtype: Dtype,
        optimizer: Optimizer,
    ) -> Result<()> {
        self.rec = Some(rec);
        self.optimizer = optimizer;
        self.classes = classes;
        self.taps.set_on(true);
        self.mode = mode;
        self.dtype = dtype;
        self.snapshot_initial()
    }

    /// The recorder, once recording started.
    pub fn recorder(&mut self) -> Option<&mut Recorder> {
        self.rec.as_mut()
    }

    /// The training instances (ids, labels and splits; both splits may be
    /// given): written when recording starts.
    pub fn instances(&mut self, ids: &[i64], labels: &[i32], splits: &[Split]) -> Result<()> {
        match &mut self.rec {
            Some(rec) => rec.instances(ids, labels, splits)?,
            None => self.instances = Some((ids.to_vec(), labels.to_vec(), splits.to_vec())),
        }
        Ok(())
    }

    fn snapshot_initial(&mut self) -> Result<()> {
        for l in &mut self.layers {
            l.initial = Some((
                l.weight.f_detach_copy()?,
                l.bias.as_ref().map(Tensor::f_detach_copy).transpose()?,
            ));
        }
        Ok(())
    }

    /// The traced layers' parameters on the host.
    fn host_weights(&self) -> Result<Vec<HostWeight>> {
        let mut out = Vec::new();
        for l in &self.layers {
            for (name, t) in l.params() {
                let shape = t.size().iter().map(|&s| s as usize).collect();
                let flat = t
                    .f_detach()?
                    .f_to_kind(Kind::Float)?
                    .f_to_device(Device::Cpu)?;
                let flat = flat.f_flatten(0, -1)?;
                out.push((name, shape, Vec::<f32>::try_from(&flat)?));
            }
        }
        Ok(out)
    }

    fn write_weights(&mut self) -> Result<()> {
        let host = self.host_weights()?;
        let named: Vec<NamedTensor<'_>> = host
            .iter()
            .map(|(name, shape, data)| NamedTensor { name, shape, data })
            .collect();
        if let Some(rec) = &mut self.rec {
            rec.weights(&named)?;
        }
        Ok(())
    }

    /// Starts the recorder of a pending [`RunSpec`] from the taps of the
    /// first step: every layer's spec, the manifest, instances, `W_0`.
    fn start(&mut self, taps: &[(String, Tap)]) -> Result<()> {
        let Some(spec) = self.pending.take() else {
            return Ok(());
        };
        let mut modules = Vec::new();
        let mut input_shape = spec.input_shape.clone();
        for (name, tap) in taps {
            let Some(layer) = self.layers.iter_mut().find(|l| &l.name == name) else {
                continue;
            };
            let shape: Vec<usize> = tap.input.size().iter().map(|&s| s as usize).collect();
            if input_shape.is_none() {
                input_shape = Some(shape[1..].to_vec());
            }
            if let LayerKind::Unsized(m) = &layer.kind {
                layer.kind = LayerKind::Spec(kinds::at_first_input(name, m, &shape, spec.mode)?);
            }
            if let LayerKind::Spec(m) = &layer.kind {
                modules.push(m.clone());
            }
        }
        // Layers in the order they first ran.
        let order: Vec<&String> = taps.iter().map(|(n, _)| n).collect();
        self.layers.sort_by_key(|l| {
            order
                .iter()
                .position(|n| **n == l.name)
                .unwrap_or(usize::MAX)
        });
        let model = Model {
            name: spec.name.clone(),
            input_shape: input_shape.unwrap_or_default(),
            structure: reptrace_format::Structure::TracedLayers,
            modules,
            frozen: Vec::new(),
        };
        let mut builder = Recorder::builder(&spec.out)
            .model(model)
            .optimizer(spec.optimizer.clone())
            .classes(spec.classes.clone())
            .dtype(spec.dtype)
            .mode(spec.mode);
        if let Some(level) = spec.zstd_level {
            builder = builder.zstd_level(level);
        }
        builder = builder.compression(spec.compression);
        for (k, v) in &spec.settings {
            builder = builder.setting(k.clone(), v.clone());
        }
        self.rec = Some(builder.build()?);
        if let Some((ids, labels, splits)) = self.instances.take()
            && let Some(rec) = &mut self.rec
        {
            rec.instances(&ids, &labels, &splits)?;
        }
        self.snapshot_initial()?;
        self.write_weights()?;
        // The tracer writes this run's snapshots (the initial one now).
        self.snapshot_steps = Some(self.step);
        if let Some(rec) = &mut self.rec {
            rec.commit()?;
        }
        Ok(())
    }

    /// The gradients of `loss` for `params` (which are returned) and, in the
    /// same backward pass, every traced layer's `δ`: for loops whose
    /// optimizer takes gradients as values (the built-in loop) instead of
    /// reading `.grad()` after `loss.backward()`.
    pub fn backward(&mut self, loss: &Tensor, params: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut state = self.taps.state();
        let order = state.order.clone();
        let zeros: Vec<Tensor> = order
            .iter()
            .filter_map(|n| state.taps.get(n).and_then(|t| t.zero.as_ref()))
            .map(Tensor::shallow_clone)
            .collect();
        if zeros.len() != order.len() {
            return Err(Error::Trace(
                "backward: a traced layer ran without gradients in this step".into(),
            ));
        }
        let mut inputs: Vec<&Tensor> = zeros.iter().collect();
        inputs.extend(params.iter());
        let mut grads = Tensor::f_run_backward(&[loss], &inputs, false, false)?;
        let param_grads = grads.split_off(zeros.len());
        for (name, g) in order.iter().zip(grads) {
            if let Some(t) = state.taps.get_mut(name) {
                t.delta = Some(g.f_neg()?);
            }
        }
        Ok(param_grads)
    }

    fn check_step(&self, s: &Step<'_>, taps: &[(String, Tap)]) -> Result<i64> {
        let bad = |m: String| Err(Error::Trace(m));
        for l in &self.layers {
            match taps.iter().find(|(n, _)| *n == l.name) {
                None => {
                    return bad(format!(
                        "layer {} did not run with gradients in this step's forward pass \
                         (trace only layers that take part in the loss)",
                        l.name
                    ));
                }
                Some((_, t)) if t.calls > 1 => {
                    return bad(format!(
                        "layer {} ran {} times since the last step: a traced layer runs once per \
                         step (evaluate under tch::no_grad_guard, share no traced layer)",
                        l.name, t.calls
                    ));
                }
                Some((_, t)) if t.zero.is_none() => {
                    return bad(format!("layer {}: no gradient in this step", l.name));
                }
                Some(_) => {}
            }
        }
        let batch = taps.first().map_or(0, |(_, t)| t.input.size()[0]);
        for (name, t) in taps {
            let size = t.input.size();
            if size[0] != batch {
                return bad(format!(
                    "layer {name} saw {} examples, layer {} {batch}: every traced layer must see the batch",
                    size[0], taps[0].0
                ));
            }
        }
        if s.ids.len() as i64 != batch {
            return Err(Error::BadSetting {
                setting: "ids",
                message: format!("{} ids for a batch of {batch} examples", s.ids.len()),
            });
        }
        if s.labels.len() as i64 != batch {
            return Err(Error::BadSetting {
                setting: "labels",
                message: format!("{} labels for a batch of {batch} examples", s.labels.len()),
            });
        }
        let classes = self.classes;
        if let Some(&l) = s.labels.iter().find(|&&l| l < 0 || l as usize >= classes) {
            return Err(Error::BadSetting {
                setting: "labels",
                message: format!("label {l} is not in 0..{classes}"),
            });
        }
        // The factors' shapes follow from the layer's spec: its inputs must
        // keep the shape the spec (or the first step) gave them.
        for l in &self.layers {
            let Some((_, t)) = taps.iter().find(|(n, _)| *n == l.name) else {
                continue;
            };
            let size: Vec<usize> = t.input.size().iter().map(|&d| d as usize).collect();
            let (fits, want) = match &l.kind {
                LayerKind::Spec(m) => match kinds::layer(m) {
                    Some(spec) => {
                        let kind = kinds::of(spec)?;
                        (kind.fits(&size), kind.traced_input())
                    }
                    None => (true, String::new()),
                },
                LayerKind::Unsized(m) => kinds::fits_unsized(m, &size),
            };
            if !fits {
                return bad(format!(
                    "layer {}: input of shape {size:?}; it is traced for {want}",
                    l.name
                ));
            }
        }
        Ok(batch)
    }

    /// Records this training step, then runs `update` (your optimizer's
    /// step) and returns what it returns. Call it after `loss.backward()`
    /// (or [`Tracer::backward`]), in place of the optimizer step. An
    /// Adam/AdamW run in instance mode steps with [`Tracer::step_adam`].
    pub fn step<R>(&mut self, s: &Step<'_>, update: impl FnOnce() -> R) -> Result<R> {
        if self.mode == Mode::Instance
            && self.optimizer.kind.preconditioned()
            && (self.rec.is_some() || self.pending.is_some())
        {
            return Err(Error::Trace(
                "an Adam/AdamW run in instance mode steps with Tracer::step_adam, which reads the optimizer's state after the update".into(),
            ));
        }
        self.step_with(s, &mut (), |_| update(), None)
    }

    /// Instance mode under Adam/AdamW: records this step like
    /// [`Tracer::step`] (records `v = −κ·δ`, without the learning rate),
    /// runs `update(optimizer)`, then reads each traced parameter's state
    /// with `state(optimizer, name)` (`name`: `layer.weight`, `layer.bias`)
    /// and writes the step size and preconditioner `D_t` of each layer
    /// into its `layer_steps` row (docs/method.md §6). Each layer's applied
    /// update is checked against `−c_t·D_t ⊙ m_t` (after decoupled decay); a
    /// difference beyond float32 rounding stops the run with
    /// [`Error::Inexact`]. With SGD or in batch mode it is [`Tracer::step`].
    pub fn step_adam<O, R>(
        &mut self,
        s: &Step<'_>,
        optimizer: &mut O,
        update: impl FnOnce(&mut O) -> R,
        state: impl Fn(&O, &str) -> Option<AdamParam>,
    ) -> Result<R> {
        self.step_with(s, optimizer, update, Some(&state))
    }

    #[allow(clippy::type_complexity)]
    fn step_with<O, R>(
        &mut self,
        s: &Step<'_>,
        optimizer: &mut O,
        update: impl FnOnce(&mut O) -> R,
        state: Option<&dyn Fn(&O, &str) -> Option<AdamParam>>,
    ) -> Result<R> {
        if self.closed {
            return Err(Error::Trace("the tracer is finished".into()));
        }
        let taps = self.taps.take()?;
        if self.rec.is_none() && self.pending.is_none() {
            // Not recording: the update alone.
            return Ok(update(optimizer));
        }
        let batch = self.check_step(s, &taps)?;
        // Every layer's δ before anything of this step is recorded, so that
        // a step refused here leaves the run as it was (or not yet created).
        let deltas = step_deltas(&taps)?;
        let loss = s.loss.f_double_value(&[])?;
        if self.rec.is_none() {
            self.start(&taps)?;
        }
        if !loss.is_finite() {
            let e = Error::NonFiniteLoss {
                step: self.step,
                epoch: self.epoch,
                loss,
            };
            return Err(self.stop(e));
        }
        // Instance mode: what the optimizer is about to apply, checked
        // against the records before anything of the step is written.
        let (scales, rows) = if self.mode == Mode::Instance {
            match self.check_gradients(s, &taps, &deltas)? {
                Ok(checked) => checked,
                Err(e) => return Err(self.stop(e)),
            }
        } else {
            (Vec::new(), Vec::new())
        };
        let (step, epoch) = (self.step, self.epoch);
        let preconditioned = self.mode == Mode::Instance && self.optimizer.kind.preconditioned();
        let mut rows = rows;
        let mut update = Some(update);
        // The optimizer step, which runs once.
        let mut run_update = |optimizer: &mut O| -> Result<R> {
            match update.take() {
                Some(update) => Ok(update(optimizer)),
                None => Err(Error::Trace("the optimizer step ran twice".into())),
            }
        };
        let adam_result = if preconditioned {
            let Some(state) = state else {
                return Err(Error::Trace(
                    "an Adam/AdamW run in instance mode steps with Tracer::step_adam".into(),
                ));
            };
            // W_t before the update, for the check of the applied update.
            let before = self.layer_copies()?;
            let result = run_update(optimizer)?;
            match self.adam_steps(s, &before, &|name: &str| state(optimizer, name))? {
                Ok(steps) => {
                    for row in &mut rows {
                        row.adam = steps
                            .iter()
                            .find(|(n, _)| *n == row.layer)
                            .map(|(_, a)| a.clone());
                    }
                }
                Err(e) => {
                    // The update is applied but not recorded: the run ends at
                    // its last commit.
                    self.abort(&e.to_string())?;
                    return Err(e);
                }
            }
            Some(result)
        } else {
            None
        };
        let Some(rec) = self.rec.as_mut() else {
            return match adam_result {
                Some(r) => Ok(r),
                None => run_update(optimizer),
            };
        };
        let mut w = StepWriter {
            rec,
            layers: &self.layers,
            timing: &mut self.timing,
            dtype: self.dtype,
        };
        if let Some(logits) = s.logits {
            w.examples(s, logits, step, epoch)?;
        }
        let row = StepRow {
            step,
            epoch,
            lr: s.lr,
            batch_size: batch as i32,
            loss,
            skipped: false,
        };
        let result = if self.mode == Mode::Batch {
            w.whole_updates(s, row, || run_update(optimizer))??
        } else if let Some(result) = adam_result {
            w.factors(s, row, rows, &taps, &deltas, &scales, None)?;
            result
        } else {
            w.factors(s, row, rows, &taps, &deltas, &scales, Some(s.lr))?;
            run_update(optimizer)?
        };
        self.step += 1;
        Ok(result)
    }

    /// Copies of every traced layer's weight and bias.
    fn layer_copies(&self) -> Result<Vec<(Tensor, Option<Tensor>)>> {
        self.layers
            .iter()
            .map(|l| -> Result<_> {
                Ok((
                    l.weight.f_detach_copy()?,
                    l.bias.as_ref().map(Tensor::f_detach_copy).transpose()?,
                ))
            })
            .collect()
    }

    /// After an Adam/AdamW update: each traced layer's [`AdamStep`] from the
    /// optimizer's state, and the check that the update applied to the
    /// layer is `−c_t·D_t ⊙ m_t` (after the decoupled decay `d_t`), or the
    /// error that stops the run.
    #[allow(clippy::type_complexity)]
    fn adam_steps(
        &self,
        s: &Step<'_>,
        before: &[(Tensor, Option<Tensor>)],
        state: &dyn Fn(&str) -> Option<AdamParam>,
    ) -> Result<std::result::Result<Vec<(String, AdamStep)>, Error>> {
        let _guard = tch::no_grad_guard();
        let o = &self.optimizer;
        let [beta1, beta2] = o.betas.unwrap_or([0.9, 0.999]);
        let eps = o.eps.unwrap_or(1e-8);
        let decay = if o.kind == OptimizerKind::Adamw {
            1.0 - s.lr * o.weight_decay
        } else {
            1.0
        };
        let inexact = |layer: &str, message: String| {
            Ok(Err(Error::Inexact {
                layer: layer.to_owned(),
                step: self.step,
                message,
            }))
        };
        let f64_flat = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_detach()?.f_to_kind(Kind::Double)?.f_flatten(0, -1)?)
        };
        let mut out = Vec::with_capacity(self.layers.len());
        for (l, (w0, b0)) in self.layers.iter().zip(before) {
            if l.spec().is_none() {
                continue;
            }
            let mut params = vec![(format!("{}.weight", l.name), &l.weight, w0)];
            if let (Some(b), Some(b0)) = (&l.bias, b0) {
                params.push((format!("{}.bias", l.name), b, b0));
            }
            let mut k = None;
            let (mut d_parts, mut applied, mut expected) = (Vec::new(), Vec::new(), Vec::new());
            let mut before_norm = 0.0f64;
            for (name, now, then) in &params {
                let Some(p) = state(name) else {
                    return inexact(
                        &l.name,
                        format!("the optimizer holds no Adam state for {name} after the step"),
                    );
                };
                if k.is_some_and(|k| k != p.step) || p.step < 1 {
                    return inexact(
                        &l.name,
                        format!("{name}: optimizer step count {} after the step", p.step),
                    );
                }
                k = Some(p.step);
                let k = p.step as i32;
                // D = 1 / (sqrt(v / (1 − β₂ᵏ)) + ε), in f64.
                let d = f64_flat(&p.exp_avg_sq)?
                    .f_div_scalar(1.0 - beta2.powi(k))?
                    .f_sqrt()?
                    .f_add_scalar(eps)?
                    .f_reciprocal()?;
                let step_size = s.lr / (1.0 - beta1.powi(k));
                let m = f64_flat(&p.exp_avg)?;
                let (now, then) = (f64_flat(now)?, f64_flat(then)?);
                before_norm += then.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
                applied.push(now.f_sub(&then.f_mul_scalar(decay)?)?);
                expected.push(d.f_mul(&m)?.f_mul_scalar(-step_size)?);
                d_parts.push(d);
            }
            let Some(k) = k else { continue };
            let step_size = s.lr / (1.0 - beta1.powi(k as i32));
            let applied = Tensor::f_cat(&applied, 0)?;
            let expected = Tensor::f_cat(&expected, 0)?;
            let norm = |t: &Tensor| -> Result<f64> {
                Ok(t.f_square()?
                    .f_sum(Kind::Double)?
                    .f_double_value(&[])?
                    .sqrt())
            };
            let diff = norm(&applied.f_sub(&expected)?)?;
            let scale = norm(&expected)?;
            // Float32 rounding of the stored weights (twice under AdamW).
            let tolerance = ADAM_CHECK * scale + 1e-6 * before_norm.sqrt();
            // NaN (a non-finite update) fails the check too.
            if diff.is_nan() || diff > tolerance {
                return inexact(
                    &l.name,
                    format!(
                        "the applied update differs from −c·D⊙m of the optimizer's state by {:.3e} relative (allowed {ADAM_CHECK:.0e}): the preconditioner would not reconstruct it",
                        diff / scale.max(f64::MIN_POSITIVE)
                    ),
                );
            }
            let d = Tensor::f_cat(&d_parts, 0)?
                .f_to_kind(Kind::Float)?
                .f_to_device(Device::Cpu)?;
            out.push((
                l.name.clone(),
                AdamStep {
                    beta1,
                    step_size,
                    preconditioner: Vec::<f32>::try_from(&d)?,
                },
            ));
        }
        Ok(Ok(out))
    }

    /// Instance mode: each traced layer's gradient as the optimizer will
    /// apply it (`.grad()`, after any clipping) against the sum of the
    /// step's per-example gradients ([`crate::check`]): the scale `κ` of
    /// each layer and its `layer_steps` row, or the error that stops the
    /// run. A loop that computes its gradients with [`Tracer::backward`]
    /// hands them to its optimizer itself; those steps are not checked.
    #[allow(clippy::type_complexity)]
    fn check_gradients(
        &self,
        s: &Step<'_>,
        taps: &[(String, Tap)],
        deltas: &[Tensor],
    ) -> Result<std::result::Result<(Vec<f64>, Vec<LayerStepRow>), Error>> {
        let o = &self.optimizer;
        let momentum = s.momentum.unwrap_or(o.momentum);
        if !(momentum.is_finite() && momentum >= 0.0) {
            return Err(Error::BadSetting {
                setting: "momentum",
                message: format!("{momentum} is not a momentum (a finite number ≥ 0)"),
            });
        }
        // First every layer's measurement, then the verdicts: κ may be the
        // scale the step's layers share (check::shared_scale).
        let mut measured = Vec::with_capacity(taps.len());
        for ((name, tap), delta) in taps.iter().zip(deltas) {
            // Taps of no traced layer record nothing (scale 1, no row).
            let Some((layer, spec)) = self
                .layers
                .iter()
                .find(|l| &l.name == name)
                .and_then(|l| l.spec().map(|spec| (l, spec)))
            else {
                measured.push(None);
                continue;
            };
            let grad = layer.weight.grad();
            let terms = if grad.defined() {
                let bias_grad = layer.bias.as_ref().map(Tensor::grad);
                if bias_grad.as_ref().is_some_and(|b| !b.defined()) {
                    return Ok(Err(Error::Inexact {
                        layer: name.clone(),
                        step: self.step,
                        message: "its weight has a gradient and its bias none".into(),
                    }));
                }
                let seed = (self.step as u64) << 16 ^ measured.iter().flatten().count() as u64;
                Some(check::measure(
                    spec,
                    &tap.input,
                    delta,
                    &grad,
                    bias_grad.as_ref(),
                    seed,
                )?)
            } else if tap.delta.is_some() {
                // Gradients as values (Tracer::backward): the optimizer gets
                // them from the loop, unchecked.
                None
            } else {
                return Ok(Err(Error::Inexact {
                    layer: name.clone(),
                    step: self.step,
                    message: "no gradient on its weight right before the optimizer step".into(),
                }));
            };
            measured.push(Some((name, delta, terms)));
        }
        let checked: Vec<check::Terms> = measured.iter().flatten().filter_map(|m| m.2).collect();
        let shared = check::shared_scale(&checked);
        let mut scales = Vec::with_capacity(taps.len());
        let mut rows = Vec::with_capacity(taps.len());
        for m in measured {
            let Some((name, delta, terms)) = m else {
                scales.push(1.0);
                continue;
            };
            let (scale, relative, norm) = match terms.map(|t| t.verdict(shared)) {
                None => (1.0, None, None),
                Some(Ok(m)) => (m.scale, Some(m.relative), Some(m.grad_norm)),
                Some(Err(message)) => {
                    return Ok(Err(Error::Inexact {
                        layer: name.clone(),
                        step: self.step,
                        message,
                    }));
                }
            };
            // Under SGD a step with learning rate 0 moves nothing; under
            // Adam its gradient enters the moments, so κ stays.
            let scale = if s.lr == 0.0 && !o.kind.preconditioned() {
                1.0
            } else {
                scale
            };
            scales.push(scale);
            rows.push(LayerStepRow {
                step: self.step,
                epoch: self.epoch,
                layer: name.clone(),
                param_group: 0,
                lr: s.lr,
                momentum,
                dampening: o.dampening,
                nesterov: o.nesterov,
                weight_decay: o.weight_decay,
                grad_scale: scale,
                grad_check: relative,
                grad_norm: norm,
                precision: check::precision(delta.kind()).to_owned(),
                adam: None,
            });
        }
        Ok(Ok((scales, rows)))
    }

    /// Ends an epoch: a weights snapshot and a commit (everything recorded
    /// so far becomes durable and visible to readers).
    pub fn end_epoch(&mut self) -> Result<()> {
        self.commit()?;
        self.epoch += 1;
        Ok(())
    }

    /// Sets the epoch of the steps that follow, for loops that commit on
    /// their own ([`Tracer::end_epoch`] counts epochs itself).
    pub fn set_epoch(&mut self, epoch: i32) {
        self.epoch = epoch;
    }

    /// The number of steps recorded so far (the next step's number).
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// A commit point with a weights snapshot of the traced layers, without
    /// ending the epoch.
    pub fn commit(&mut self) -> Result<()> {
        if self.closed {
            return Err(Error::Trace("the tracer is finished".into()));
        }
        if self.rec.is_none() {
            return Ok(());
        }
        self.write_weights()?;
        if self.snapshot_steps.is_some() {
            self.snapshot_steps = Some(self.step);
        }
        if let Some(rec) = &mut self.rec {
            rec.commit()?;
        }
        Ok(())
    }

    /// Ends the run after a step it cannot record (a non-finite loss, a
    /// gradient that differs from the records): the steps so far are
    /// committed with a snapshot of the weights they led to (the refused
    /// step's update was not applied), and the run is marked aborted.
    fn stop(&mut self, e: Error) -> Error {
        let snapshot = self.snapshot_steps.is_some_and(|done| self.step > done);
        let result = if snapshot {
            self.write_weights()
        } else {
            Ok(())
        }
        .and_then(|()| self.abort(&e.to_string()));
        match result {
            Ok(()) => e,
            Err(failed) => failed,
        }
    }

    /// Records probes as of the current weights: `forward` runs your model
    /// on a chunk of inputs (in evaluation mode; gradients are off). With
    /// `checkpoint` they belong to the next commit (so that a run that never
    /// finishes can be analysed up to it), otherwise to the finished run.
    pub fn probes(
        &mut self,
        probes: &Probes<'_>,
        forward: &mut dyn FnMut(&Tensor) -> Tensor,
        checkpoint: bool,
    ) -> Result<()> {
        let n = probes.inputs.size().first().copied().unwrap_or(0) as usize;
        if probes.labels.len() != n || probes.ids.len() != n {
            return Err(Error::BadSetting {
                setting: "probes",
                message: format!(
                    "{n} inputs, {} labels, {} ids: give one of each per input",
                    probes.labels.len(),
                    probes.ids.len()
                ),
            });
        }
        if !probes.instance_ids.is_empty() && probes.instance_ids.len() != n {
            return Err(Error::BadSetting {
                setting: "probes",
                message: format!("{} instance ids for {n} inputs", probes.instance_ids.len()),
            });
        }
        if self.rec.is_none() {
            return Err(Error::Trace(
                "probes before the first step: nothing is recorded yet".into(),
            ));
        }
        // W_T − W_0 of every layer, in the layers' order.
        let mut displacements = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let Some((w0, b0)) = &l.initial else {
                return Err(Error::Trace(format!(
                    "layer {}: no initial weights (recording has not started)",
                    l.name
                )));
            };
            displacements.push(Displacement::new(
                &l.weight,
                w0,
                l.bias.as_ref(),
                b0.as_ref(),
            )?);
        }
        let _guard = tch::no_grad_guard();
        let none = vec![None; n];
        let instance_ids = if probes.instance_ids.is_empty() {
            &none[..]
        } else {
            probes.instance_ids
        };
        let mut start = 0;
        while start < n {
            let len = PROBE_CHUNK.min(n - start);
            let x = probes.inputs.f_narrow(0, start as i64, len as i64)?;
            self.taps.set_capture(true);
            let logits = forward(&x);
            let taps = self.taps.take();
            self.taps.set_capture(false);
            let taps = taps?;
            let predicted = predictions(&logits)?;
            let range = start..start + len;
            for (l, disp) in self.layers.iter().zip(&displacements) {
                let (Some(spec), Some((_, tap))) =
                    (l.spec(), taps.iter().find(|(n, _)| *n == l.name))
                else {
                    return Err(Error::Trace(format!(
                        "layer {} did not run on the probes",
                        l.name
                    )));
                };
                let (a, p) = disp.probe_values(spec, &tap.input)?;
                let batch = ProbeBatch {
                    probe_ids: &probes.ids[range.clone()],
                    instance_ids: &instance_ids[range.clone()],
                    labels: &probes.labels[range.clone()],
                    predicted: &predicted,
                    a: &a,
                    p: &p,
                    positions: None,
                };
                let Some(rec) = self.rec.as_mut() else {
                    break;
                };
                if checkpoint {
                    rec.checkpoint_probes(&l.name, batch)?;
                } else {
                    rec.probes(&l.name, batch)?;
                }
            }
            start += len;
        }
        Ok(())
    }

    /// Writes the final weights (and the probes, if given, with `forward`
    /// running the model), marks the run complete and returns its manifest.
    pub fn finish(&mut self, probes: Option<(&Probes<'_>, Forward<'_>)>) -> Result<Manifest> {
        if self.closed {
            return Err(Error::Trace("the tracer is finished".into()));
        }
        if self.rec.is_none() {
            return Err(Error::Trace(
                "finish before the first step: nothing was recorded".into(),
            ));
        }
        if let Some((p, forward)) = probes {
            self.probes(p, forward, false)?;
        }
        let host = self.host_weights()?;
        let named: Vec<NamedTensor<'_>> = host
            .iter()
            .map(|(name, shape, data)| NamedTensor { name, shape, data })
            .collect();
        let manifest = match &mut self.rec {
            Some(rec) => rec.finish(&named)?,
            None => return Err(Error::Trace("nothing was recorded".into())),
        };
        self.closed = true;
        self.taps.set_on(false);
        Ok(manifest)
    }

    /// Stops recording: what was recorded up to the last commit stays, and
    /// the run is marked aborted with `reason`.
    pub fn abort(&mut self, reason: &str) -> Result<()> {
        self.closed = true;
        self.taps.set_on(false);
        if let Some(rec) = &mut self.rec {
            rec.abort(reason.to_owned())?;
        }
        Ok(())
    }
}

/// Each tapped layer's δ for this step: the one the tap holds, or minus the
/// gradient of its zero tensor; an error names a layer without one.
fn step_deltas(taps: &[(String, Tap)]) -> Result<Vec<Tensor>> {
    let mut deltas = Vec::with_capacity(taps.len());
    for (name, tap) in taps {
        let delta = match (&tap.delta, &tap.zero) {
            (Some(d), _) => d.shallow_clone(),
            (None, Some(zero)) => {
                let g = zero.f_grad()?;
                if !g.defined() {
                    return Err(Error::Trace(format!(
                        "layer {name}: no gradient; call loss.backward() before Tracer::step"
                    )));
                }
                g.f_neg()?
            }
            (None, None) => {
                return Err(Error::Trace(format!(
                    "layer {name}: no gradient in this step"
                )));
            }
        };
        deltas.push(delta);
    }
    Ok(deltas)
}

/// The parts of a [`Tracer`] that one recorded step writes through: its
/// recorder, its traced layers and its timing.
struct StepWriter<'t> {
    rec: &'t mut Recorder,
    layers: &'t [Layer],
    timing: &'t mut Timing,
    dtype: Dtype,
}

impl StepWriter<'_> {
    /// The step's `examples` rows: each example's loss and predicted class
    /// from the logits, computed on the host from one copy of them (a
    /// handful of values per example, where the device would take a dozen
    /// operations and two transfers).
    fn examples(&mut self, s: &Step<'_>, logits: &Tensor, step: i64, epoch: i32) -> Result<()> {
        let t0 = Instant::now();
        let size = logits.size();
        let &[rows, classes] = size.as_slice() else {
            return Err(Error::Trace(format!(
                "logits of shape {size:?}: the examples table takes (batch, classes) logits"
            )));
        };
        if rows as usize != s.labels.len() || classes < 1 {
            return Err(Error::Trace(format!(
                "logits of shape {size:?} for a batch of {} examples",
                s.labels.len()
            )));
        }
        if let Some(l) = s.labels.iter().find(|&&l| i64::from(l) >= classes) {
            return Err(Error::Trace(format!(
                "label {l} for logits of {classes} classes (shape {size:?})"
            )));
        }
        let z = logits.f_detach()?.f_to_kind(Kind::Float)?.f_reshape([-1])?;
        let z = Vec::<f32>::try_from(&z)?;
        let (losses, predicted) = example_losses(&z, classes as usize, s.labels);
        self.rec.examples(ExampleBatch {
            step,
            epoch,
            instance_ids: s.ids,
            labels: s.labels,
            loss: &losses,
            predicted: &predicted,
        })?;
        self.timing.record += t0.elapsed();
        Ok(())
    }

    /// Batch mode: runs `update` and records the whole update of each
    /// traced layer (copies before the step, differences after it, counted
    /// as factor time) with the step's row.
    fn whole_updates<R>(
        &mut self,
        s: &Step<'_>,
        row: StepRow,
        update: impl FnOnce() -> R,
    ) -> Result<R> {
        let (step, epoch) = (row.step, row.epoch);
        let t0 = Instant::now();
        let before: Vec<(Tensor, Option<Tensor>)> = self
            .layers
            .iter()
            .map(|l| -> Result<_> {
                Ok((
                    l.weight.f_detach_copy()?,
                    l.bias.as_ref().map(Tensor::f_detach_copy).transpose()?,
                ))
            })
            .collect::<Result<_>>()?;
        self.timing.factors += t0.elapsed();
        let result = update();
        let t1 = Instant::now();
        let mut deltas = Vec::with_capacity(before.len());
        for (l, (w0, b0)) in self.layers.iter().zip(&before) {
            deltas.push((l.name.as_str(), whole_update(l, w0, b0.as_ref())?));
        }
        let named: Vec<(&str, &[f32])> = deltas.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        let t2 = Instant::now();
        self.timing.factors += t2 - t1;
        self.rec.step(row)?;
        self.rec.batch_step(BatchStep {
            step,
            epoch,
            instance_ids: s.ids,
            labels: s.labels,
            deltas: &named,
        })?;
        self.timing.record += t2.elapsed();
        Ok(result)
    }

    /// Instance mode: the step's row and `layer_steps` rows, then every
    /// layer's factors (`v = −η·κ·δ`, the measured scale folded in; `lr`
    /// `None`: `v = −κ·δ`, Adam/AdamW).
    #[allow(clippy::too_many_arguments)]
    fn factors(
        &mut self,
        s: &Step<'_>,
        row: StepRow,
        rows: Vec<LayerStepRow>,
        taps: &[(String, Tap)],
        deltas: &[Tensor],
        scales: &[f64],
        lr: Option<f64>,
    ) -> Result<()> {
        let (step, epoch) = (row.step, row.epoch);
        let t0 = Instant::now();
        self.rec.step(row)?;
        self.rec.layer_steps(rows)?;
        self.timing.record += t0.elapsed();
        // Every layer's factors start towards the host (converted to
        // the stored type on the device); on CUDA one synchronisation
        // for all of them, then each goes to the recorder by value.
        let t0 = Instant::now();
        let mut flights = Vec::with_capacity(taps.len());
        let mut device = Device::Cpu;
        for (((name, tap), delta), scale) in taps.iter().zip(deltas).zip(scales) {
            let Some(layer) = self.layers.iter().find(|l| &l.name == name) else {
                continue;
            };
            let Some(spec) = layer.spec() else { continue };
            device = delta.device();
            // v = −η·κ·δ: the measured scale of the applied gradient folded
            // in; under Adam/AdamW (`lr` None) v = −κ·δ, the learning rate
            // being in the step size.
            let lr = match lr {
                Some(lr) if *scale == 1.0 => lr,
                Some(lr) => lr * scale,
                None => *scale,
            };
            let f = kinds::of(spec)?.factors_stored(&tap.input, delta, lr, self.dtype)?;
            flights.push((name.as_str(), f.start_to_host(self.dtype)?));
        }
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        self.timing.factors += t0.elapsed();
        for (name, flight) in flights {
            let t0 = Instant::now();
            let f = flight.finish()?;
            let t1 = Instant::now();
            self.timing.factors += t1 - t0;
            self.rec.updates_owned(
                name,
                UpdateBatchOwned {
                    step,
                    epoch,
                    instance_ids: s.ids.to_vec(),
                    labels: s.labels.to_vec(),
                    u: f.u,
                    v: f.v,
                    update_norm: f.update_norm,
                    positions: None,
                },
            )?;
            self.timing.record += t1.elapsed();
        }
        Ok(())
    }
}

/// A layer's whole update since `w0`, `b0`: `vec(W − W0)` then `b − b0`,
/// the difference taken in f64 (exact for two f32 values of similar size)
/// and stored as f32.
fn whole_update(l: &Layer, w0: &Tensor, b0: Option<&Tensor>) -> Result<Vec<f32>> {
    let diff = |now: &Tensor, then: &Tensor| -> Result<Tensor> {
        Ok(now
            .f_to_kind(Kind::Double)?
            .f_sub(&then.f_to_kind(Kind::Double)?)?
            .f_flatten(0, -1)?)
    };
    let mut parts = vec![diff(&l.weight, w0)?];
    if let (Some(b), Some(b0)) = (&l.bias, b0) {
        parts.push(diff(b, b0)?);
    }
    let all = Tensor::f_cat(&parts, 0)?
        .f_to_kind(Kind::Float)?
        .f_to_device(Device::Cpu)?;
    Ok(Vec::<f32>::try_from(&all)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod example_tests {
    use super::*;

    /// The host's losses and predictions equal PyTorch's cross-entropy and
    /// argmax on the same logits (ties included: the first largest wins).
    #[test]
    fn example_losses_match_cross_entropy_and_argmax() {
        tch::manual_seed(3);
        let (rows, classes) = (37i64, 11i64);
        let logits = Tensor::randn([rows, classes], (Kind::Float, Device::Cpu))
            .f_mul_scalar(4.0)
            .unwrap();
        // Row 0: a tie between classes 2 and 5.
        let _ = logits.get(0).get(2).fill_(9.0);
        let _ = logits.get(0).get(5).fill_(9.0);
        let labels: Vec<i32> = (0..rows).map(|i| (i * 7 % classes) as i32).collect();
        let y = Tensor::from_slice(&labels.iter().map(|&l| i64::from(l)).collect::<Vec<_>>());
        let want_loss = Vec::<f32>::try_from(&logits.cross_entropy_loss::<Tensor>(
            &y,
            None,
            tch::Reduction::None,
            -100,
            0.0,
        ))
        .unwrap();
        let want_pred = Vec::<i64>::try_from(&logits.argmax(-1, false)).unwrap();
        let z = Vec::<f32>::try_from(&logits.reshape([-1])).unwrap();
        let (loss, pred) = example_losses(&z, classes as usize, &labels);
        assert_eq!(pred[0], 2);
        for i in 0..rows as usize {
            assert_eq!(i64::from(pred[i]), want_pred[i], "row {i}");
            let err = (loss[i] - want_loss[i]).abs();
            assert!(
                err <= 1e-5 * want_loss[i].abs().max(1.0),
                "row {i}: {} vs {}",
                loss[i],
                want_loss[i]
            );
        }
    }
}
