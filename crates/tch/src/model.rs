//! Sequential models built from [`reptrace_format::Module`] specs.
//!
//! The manifest's [`Model`] is the model's only description: [`build_model`]
//! turns a preset ([`ModelChoice`]) into one, with every shape worked out
//! from the data, and [`Network`] runs exactly what it says. Linear and
//! Conv2d (groups 1) are the traced layers; activations, pooling, flatten and
//! dropout pass through. BatchNorm (PyTorch's defaults: momentum 0.1, eps
//! 1e-5, affine, running statistics in evaluation) couples the examples of
//! a batch in training mode: training refuses it in instance mode, batch
//! mode records it like any model (its own parameters are not traced).
//!
//! Weights are initialised like PyTorch's `nn.Linear`/`nn.Conv2d` defaults
//! (uniform in ±1/√fan_in for weights and biases), drawn on the host from a
//! ChaCha8 generator seeded with the seed, then moved to the device: a seed
//! gives the same initial network on every device and in every thread.
//! Dropout uses libtorch's generator, seeded with `tch::manual_seed(seed)`.
use crate::{Error, Result, kinds};
use rand::{Rng, SeedableRng};
use reptrace_format::{Conv2dSpec, Mode, Model, Module, Storage, TracedLayer};
use std::fmt;
use std::str::FromStr;
use tch::{Device, Kind, Tensor};

/// Which model to train.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelChoice {
    /// Flatten, then Linear layers with these hidden widths (ReLU between),
    /// then a Linear layer to the classes. `mlp` is `[32, 16]`.
    Mlp {
        /// Widths of the hidden Linear layers (`fc1`, `fc2`, …), in order;
        /// each at least 1, empty for a single Linear layer.
        hidden: Vec<usize>,
    },
    /// Two small conv layers (C→8 3×3 pad 1, 8→16 3×3 stride 2 pad 1, ReLU
    /// after each), flatten, Linear to the classes.
    Cnn,
    /// `cnn` with a BatchNorm2d after each convolution (batch mode only).
    CnnBatchNorm,
    /// A model given module by module; its shapes must fit the data.
    Custom(Model),
}

impl Default for ModelChoice {
    fn default() -> Self {
        ModelChoice::Mlp {
            hidden: vec![32, 16],
        }
    }
}

impl FromStr for ModelChoice {
    type Err = String;
    /// `mlp`, `mlp:H1,H2,…` (hidden widths) or `cnn`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mlp" => Ok(ModelChoice::default()),
            "cnn" => Ok(ModelChoice::Cnn),
            "cnn-bn" => Ok(ModelChoice::CnnBatchNorm),
            _ => {
                let Some(widths) = s.strip_prefix("mlp:") else {
                    return Err(format!(
                        "unknown model {s:?} (expected mlp, mlp:H1,H2,…, cnn or cnn-bn)"
                    ));
                };
                let hidden = widths
                    .split(',')
                    .map(|w| w.trim().parse::<usize>().ok().filter(|&w| w > 0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| format!("invalid hidden widths {widths:?} in model {s:?}"))?;
                Ok(ModelChoice::Mlp { hidden })
            }
        }
    }
}

impl fmt::Display for ModelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelChoice::Mlp { hidden } => {
                let w: Vec<String> = hidden.iter().map(|h| h.to_string()).collect();
                write!(f, "mlp:{}", w.join(","))
            }
            ModelChoice::Cnn => f.write_str("cnn"),
            ModelChoice::CnnBatchNorm => f.write_str("cnn-bn"),
            ModelChoice::Custom(m) => write!(f, "{}", m.name),
        }
    }
}

/// Which Linear/Conv2d layers are traced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TraceLayers {
    /// Every Linear and Conv2d layer (`--trace-layers all`, the default).
    #[default]
    All,
    /// No layer: training records nothing (`--trace-layers none`).
    None,
    /// These layers (by name), the others untraced.
    Names(Vec<String>),
}

impl FromStr for TraceLayers {
    type Err = String;
    /// `all`, `none` or a comma-separated list of layer names.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "all" => Ok(TraceLayers::All),
            "none" => Ok(TraceLayers::None),
            _ => {
                let names: Vec<String> = s.split(',').map(|n| n.trim().to_owned()).collect();
                if names.iter().any(|n| n.is_empty()) {
                    return Err(format!("empty layer name in {s:?}"));
                }
                Ok(TraceLayers::Names(names))
            }
        }
    }
}

impl fmt::Display for TraceLayers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceLayers::All => f.write_str("all"),
            TraceLayers::None => f.write_str("none"),
            TraceLayers::Names(n) => f.write_str(&n.join(",")),
        }
    }
}

/// The storage rule for a Conv2d layer's records in instance mode
/// ([`Storage::for_conv2d`], shared with every other producer;
/// [`kinds::conv2d::storage`] has the rule of either mode).
pub fn conv_storage(
    out_channels: usize,
    patch_len: usize,
    positions: usize,
    bias: bool,
) -> Storage {
    kinds::conv2d::storage(out_channels, patch_len, positions, bias, Mode::Instance)
}

/// A traced Conv2d spec (square kernel, dilation 1, bias) for inputs of
/// `input_hw`, with its output size and instance-mode storage worked out.
fn conv(
    name: &str,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    input_hw: [usize; 2],
) -> Option<Conv2dSpec> {
    let spec = Conv2dSpec {
        name: name.to_owned(),
        in_channels,
        out_channels,
        kernel: [kernel; 2],
        stride: [stride; 2],
        padding: [padding; 2],
        dilation: [1; 2],
        groups: 1,
        padding_mode: reptrace_format::PaddingMode::Zeros,
        input_hw: [0, 0],
        output_hw: [0, 0],
        bias: true,
        traced: true,
        storage: Storage::Full,
    };
    kinds::conv2d::sized(&spec, input_hw, Mode::Instance)
}

fn linear(name: &str, in_features: usize, out_features: usize) -> Module {
    Module::Linear(kinds::linear::spec(name, in_features, out_features, true))
}

/// Builds the model for examples of `input_shape` and `classes` classes,
/// with the traced flags set from `trace`, and checks it ([`check_model`]).
pub fn build_model(
    choice: &ModelChoice,
    input_shape: &[usize],
    classes: usize,
    trace: &TraceLayers,
) -> Result<Model> {
    let mut model = match choice {
        ModelChoice::Mlp { hidden } => {
            let mut modules = vec![Module::Flatten];
            let mut width: usize = input_shape.iter().product();
            for (i, &h) in hidden.iter().enumerate() {
                modules.push(linear(&format!("fc{}", i + 1), width, h));
                modules.push(Module::Relu);
                width = h;
            }
            modules.push(linear(&format!("fc{}", hidden.len() + 1), width, classes));
            Model {
                structure: Default::default(),
                name: "mlp".into(),
                input_shape: input_shape.to_vec(),
                modules,
                frozen: Vec::new(),
            }
        }
        ModelChoice::Cnn | ModelChoice::CnnBatchNorm => {
            let bn = *choice == ModelChoice::CnnBatchNorm;
            let bad = || Error::BadModel {
                model: choice.to_string(),
                message: format!(
                    "needs image examples [C, H, W] of at least 3×3, the data has shape {input_shape:?}"
                ),
            };
            let &[c, h, w] = input_shape else {
                return Err(bad());
            };
            let conv1 = conv("conv1", c, 8, 3, 1, 1, [h, w]).ok_or_else(bad)?;
            let conv2 = conv("conv2", 8, 16, 3, 2, 1, conv1.output_hw).ok_or_else(bad)?;
            let flat = 16 * conv2.output_hw[0] * conv2.output_hw[1];
            let mut modules = vec![Module::Conv2d(conv1)];
            if bn {
                modules.push(Module::BatchNorm2d {
                    name: "bn1".into(),
                    channels: 8,
                });
            }
            modules.extend([Module::Relu, Module::Conv2d(conv2)]);
            if bn {
                modules.push(Module::BatchNorm2d {
                    name: "bn2".into(),
                    channels: 16,
                });
            }
            modules.extend([Module::Relu, Module::Flatten, linear("fc", flat, classes)]);
            Model {
                structure: Default::default(),
                name: choice.to_string(),
                input_shape: input_shape.to_vec(),
                modules,
                frozen: Vec::new(),
            }
        }
        ModelChoice::Custom(m) => {
            if m.input_shape != input_shape {
                return Err(Error::BadModel {
                    model: m.name.clone(),
                    message: format!(
                        "expects {:?} inputs, the data has shape {input_shape:?}",
                        m.input_shape
                    ),
                });
            }
            m.clone()
        }
    };
    set_traced(&mut model, trace)?;
    let out = check_model(&model)?;
    if out != [classes] {
        return Err(Error::BadModel {
            model: model.name.clone(),
            message: format!("output shape {out:?} does not match the {classes} classes"),
        });
    }
    Ok(model)
}

/// Sets each Linear/Conv2d layer's `traced` flag.
fn set_traced(model: &mut Model, trace: &TraceLayers) -> Result<()> {
    let names: Vec<String> = model
        .modules
        .iter()
        .filter_map(|m| kinds::layer(m).map(|l| l.name().to_owned()))
        .collect();
    if let TraceLayers::Names(wanted) = trace
        && let Some(unknown) = wanted.iter().find(|w| !names.contains(w))
    {
        return Err(Error::UnknownLayer {
            name: unknown.clone(),
            known: names.join(", "),
        });
    }
    for m in &mut model.modules {
        let Some((name, traced)) = kinds::traced_flag(m) else {
            continue;
        };
        *traced = match trace {
            TraceLayers::All => true,
            TraceLayers::None => false,
            TraceLayers::Names(w) => w.iter().any(|w| w == name),
        };
    }
    Ok(())
}

/// Checks that every module fits the shape coming into it (sizes, names,
/// Conv2d input/output sizes) and returns the output shape of one example.
pub fn check_model(model: &Model) -> Result<Vec<usize>> {
    let bad = |message: String| Error::BadModel {
        model: model.name.clone(),
        message,
    };
    let mut shape = model.input_shape.clone();
    let mut names: Vec<&str> = Vec::new();
    for (i, m) in model.modules.iter().enumerate() {
        let name_ok = |name: &str| -> Result<()> {
            reptrace_format::layout::check_name("layer", name).map_err(|e| bad(e.to_string()))?;
            if names.contains(&name) {
                return Err(bad(format!("layer name {name:?} used twice")));
            }
            Ok(())
        };
        kinds::refuse_untraceable(m).map_err(bad)?;
        if let Some(layer) = kinds::layer(m) {
            name_ok(layer.name())?;
            names.push(layer.name());
            shape = kinds::of(layer)?.output_shape(i, &shape).map_err(bad)?;
            continue;
        }
        match m {
            // Checked by their kinds, or refused, above.
            Module::Linear(_)
            | Module::Conv2d(_)
            | Module::Conv1d(_)
            | Module::Embedding(_)
            | Module::LayerNorm(_)
            | Module::RmsNorm(_) => {}
            Module::Relu | Module::Tanh | Module::Sigmoid | Module::Gelu => {}
            Module::Dropout { p } => {
                if !(0.0..1.0).contains(p) {
                    return Err(bad(format!("dropout probability {p} not in [0, 1)")));
                }
            }
            Module::MaxPool2d { kernel, stride } | Module::AvgPool2d { kernel, stride } => {
                let &[ch, h, w] = shape.as_slice() else {
                    return Err(bad(format!(
                        "pooling (module {i}) expects [C, H, W] inputs, gets {shape:?}"
                    )));
                };
                let oh =
                    kinds::conv2d::output_len(h, kernel[0], stride[0], 0, 1).filter(|&x| x > 0);
                let ow =
                    kinds::conv2d::output_len(w, kernel[1], stride[1], 0, 1).filter(|&x| x > 0);
                let (Some(oh), Some(ow)) = (oh, ow) else {
                    return Err(bad(format!("pooling (module {i}) does not fit {shape:?}")));
                };
                shape = vec![ch, oh, ow];
            }
            Module::Flatten => shape = vec![shape.iter().product()],
            Module::BatchNorm1d { name, features } => {
                name_ok(name)?;
                names.push(name);
                if shape != [*features] {
                    return Err(bad(format!(
                        "batch norm {name} expects [{features}] inputs, gets {shape:?} (module {i})"
                    )));
                }
            }
            Module::BatchNorm2d { name, channels } => {
                name_ok(name)?;
                names.push(name);
                if shape.len() != 3 || shape[0] != *channels {
                    return Err(bad(format!(
                        "batch norm {name} expects [{channels}, H, W] inputs, gets {shape:?} (module {i})"
                    )));
                }
            }
        }
    }
    Ok(shape)
}

/// One Linear or Conv2d layer's parameters.
#[derive(Debug)]
struct Params {
    weight: Tensor,
    bias: Option<Tensor>,
    /// BatchNorm: running mean and variance (not trained).
    running: Option<(Tensor, Tensor)>,
}

/// A traced layer's input and output in one forward pass.
#[derive(Debug)]
pub struct Tap {
    /// Index of the module in [`Model::modules`].
    pub module: usize,
    /// The layer input `a` (detached), batch first.
    pub input: Tensor,
    /// The pre-activation `z` (part of the graph when gradients are on).
    pub output: Tensor,
}

/// A named parameter tensor copied to the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// `<layer>.weight` or `<layer>.bias`.
    pub name: String,
    /// PyTorch shape.
    pub shape: Vec<usize>,
    /// The values as `f32`, row-major (C order) over `shape`.
    pub data: Vec<f32>,
}

/// A runnable sequential network.
#[derive(Debug)]
pub struct Network {
    model: Model,
    /// Parameters per module (None for modules without any).
    params: Vec<Option<Params>>,
    device: Device,
}

impl Network {
    /// Builds the network with seeded initial weights on `device`.
    pub fn new(model: &Model, seed: i64, device: Device) -> Result<Self> {
        check_model(model)?;
        // Dropout draws from libtorch's global generator; seed it only when
        // needed so that other threads' networks do not reset it.
        if model
            .modules
            .iter()
            .any(|m| matches!(m, Module::Dropout { .. }))
        {
            tch::manual_seed(seed);
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed as u64);
        let mut uniform = |shape: &[i64], bound: f64| -> Result<Tensor> {
            let n: i64 = shape.iter().product();
            let bound = bound as f32;
            let data: Vec<f32> = (0..n)
                .map(|_| (2.0 * rng.random::<f32>() - 1.0) * bound)
                .collect();
            let t = Tensor::f_from_slice(&data)?
                .f_reshape(shape)?
                .f_to_device(device)?
                .f_set_requires_grad(true)?;
            Ok(t)
        };
        let mut params = Vec::with_capacity(model.modules.len());
        for m in &model.modules {
            let (shape, fan_in, bias) = match m {
                Module::BatchNorm1d { features: n, .. }
                | Module::BatchNorm2d { channels: n, .. } => {
                    // PyTorch's initialisation: γ = 1, β = 0, mean 0, variance 1.
                    let ones = |grad: bool| -> Result<Tensor> {
                        Ok(Tensor::f_ones([*n as i64], (Kind::Float, device))?
                            .f_set_requires_grad(grad)?)
                    };
                    let zeros = |grad: bool| -> Result<Tensor> {
                        Ok(Tensor::f_zeros([*n as i64], (Kind::Float, device))?
                            .f_set_requires_grad(grad)?)
                    };
                    params.push(Some(Params {
                        weight: ones(true)?,
                        bias: Some(zeros(true)?),
                        running: Some((zeros(false)?, ones(false)?)),
                    }));
                    continue;
                }
                // A layer of a traced kind: PyTorch's default, uniform in
                // ±1/√fan_in (fan_in: the weight's size over its rows).
                _ => match kinds::layer(m) {
                    Some(l) => {
                        let shape = l.weight_shape();
                        let fan_in: usize = shape[1..].iter().product();
                        (shape, fan_in, l.bias())
                    }
                    None => {
                        params.push(None);
                        continue;
                    }
                },
            };
            let bound = 1.0 / (fan_in as f64).sqrt();
            let shape: Vec<i64> = shape.iter().map(|&s| s as i64).collect();
            let weight = uniform(&shape, bound)?;
            let bias = if bias {
                Some(uniform(&shape[..1], bound)?)
            } else {
                None
            };
            params.push(Some(Params {
                weight,
                bias,
                running: None,
            }));
        }
        Ok(Self {
            model: model.clone(),
            params,
            device,
        })
    }

    /// The model this network runs.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The device its parameters live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Every parameter tensor with its name, in forward order (weight, then bias).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (m, p) in self.model.modules.iter().zip(&self.params) {
            let (Some(name), Some(p)) = (layer_name(m), p) else {
                continue;
            };
            out.push((format!("{name}.weight"), p.weight.shallow_clone()));
            if let Some(b) = &p.bias {
                out.push((format!("{name}.bias"), b.shallow_clone()));
            }
        }
        out
    }

    /// The weight and bias of module `module` (a Linear or Conv2d).
    pub fn layer_params(&self, module: usize) -> Option<(Tensor, Option<Tensor>)> {
        self.params.get(module)?.as_ref().map(|p| {
            (
                p.weight.shallow_clone(),
                p.bias.as_ref().map(Tensor::shallow_clone),
            )
        })
    }

    /// Sets every parameter from the weights snapshot at `path`
    /// (`weights/*.safetensors` of a run: `<layer>.weight`, `<layer>.bias`,
    /// PyTorch shapes), checking that each is there with the model's shape.
    /// A model with BatchNorm is refused: evaluation needs its running
    /// statistics, which a snapshot does not hold.
    pub fn load_snapshot(&self, path: &std::path::Path) -> Result<()> {
        if let Some(name) = self.model.modules.iter().find_map(|m| match m {
            Module::BatchNorm1d { name, .. } | Module::BatchNorm2d { name, .. } => Some(name),
            _ => None,
        }) {
            return Err(Error::BadModel {
                model: self.model.name.clone(),
                message: format!(
                    "batch norm layer {name}: a weights snapshot holds no running statistics, \
                     which evaluation needs, so the network cannot be rebuilt from the run"
                ),
            });
        }
        let tensors = read_snapshot(path)?;
        let _guard = tch::no_grad_guard();
        for (name, param) in self.parameters() {
            let src = snapshot_tensor(&tensors, path, &name, &param.size())?;
            let mut dst = param;
            dst.f_copy_(&src.f_to_kind(Kind::Float)?.f_to_device(self.device)?)?;
        }
        Ok(())
    }

    /// Copies every parameter to the host as `f32`.
    pub fn to_host(&self) -> Result<Vec<HostTensor>> {
        self.parameters()
            .into_iter()
            .map(|(name, t)| {
                let shape = t.size().iter().map(|&s| s as usize).collect();
                let flat = t.f_detach()?.f_to_kind(Kind::Float)?.f_flatten(0, -1)?;
                let data = Vec::<f32>::try_from(&flat)?;
                Ok(HostTensor { name, shape, data })
            })
            .collect()
    }

    /// Runs the network on a batch `x` (`[B, …input_shape]`).
    ///
    /// `train` switches dropout on. With `taps`, every traced layer's input
    /// and output are returned in forward order.
    pub fn forward(&self, x: &Tensor, train: bool, taps: bool) -> Result<(Tensor, Vec<Tap>)> {
        let mut out_taps = Vec::new();
        let logits = self.forward_with(x, train, &mut |module, _, input, output| {
            if taps {
                out_taps.push(Tap {
                    module,
                    input: input.f_detach()?,
                    output: output.shallow_clone(),
                });
            }
            Ok(output)
        })?;
        Ok((logits, out_taps))
    }

    /// Runs the network on a batch with every traced layer reporting to
    /// `taps` ([`crate::trace::Taps::tap`]), as the built-in loop does
    /// under a [`crate::Tracer`].
    pub fn forward_traced(
        &self,
        x: &Tensor,
        train: bool,
        taps: &crate::trace::Taps,
    ) -> Result<Tensor> {
        self.forward_with(x, train, &mut |_, name, input, output| {
            Ok(taps.tap(name, input, output))
        })
    }

    /// The forward pass; `traced(module, name, input, output)` sees every
    /// traced layer and returns the output to continue with.
    fn forward_with(
        &self,
        x: &Tensor,
        train: bool,
        traced: &mut dyn FnMut(usize, &str, &Tensor, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.shallow_clone();
        for (i, (m, p)) in self.model.modules.iter().zip(&self.params).enumerate() {
            let name = kinds::traced(m).map(|l| l.name());
            let next = match (kinds::layer(m), p) {
                (Some(layer), Some(p)) => {
                    kinds::of(layer)?.apply(&h, &p.weight, p.bias.as_ref())?
                }
                _ => self.module_forward(i, m, p.as_ref(), &h, train)?,
            };
            h = match name {
                Some(name) => traced(i, name, &h, next)?,
                None => next,
            };
        }
        Ok(h)
    }

    /// The forward pass of module `i`, `m`, with parameters `p`, when it
    /// is of no traced kind.
    fn module_forward(
        &self,
        i: usize,
        m: &Module,
        p: Option<&Params>,
        h: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        Ok(match (m, p) {
            (Module::Relu, _) => h.f_relu()?,
            (Module::Tanh, _) => h.f_tanh()?,
            (Module::Sigmoid, _) => h.f_sigmoid()?,
            (Module::Gelu, _) => h.f_gelu("none")?,
            (Module::Dropout { p }, _) => h.f_dropout(*p, train)?,
            (Module::MaxPool2d { kernel, stride }, _) => {
                h.f_max_pool2d(to_i64(kernel), to_i64(stride), [0i64, 0], [1i64, 1], false)?
            }
            (Module::AvgPool2d { kernel, stride }, _) => {
                h.f_avg_pool2d(to_i64(kernel), to_i64(stride), [0i64, 0], false, true, None)?
            }
            (Module::Flatten, _) => h.f_flatten(1, -1)?,
            (Module::BatchNorm1d { .. } | Module::BatchNorm2d { .. }, Some(p)) => {
                let running = p.running.as_ref().ok_or_else(|| Error::BadModel {
                    model: self.model.name.clone(),
                    message: format!("module {i} has no running statistics"),
                })?;
                // Training mode updates the running statistics in place.
                h.f_batch_norm(
                    Some(&p.weight),
                    p.bias.as_ref(),
                    Some(&running.0),
                    Some(&running.1),
                    train,
                    0.1,
                    1e-5,
                    false,
                )?
            }
            // Kinds only the Python tracer records (refused by
            // `check_model`).
            (
                Module::Conv1d(_)
                | Module::Embedding(_)
                | Module::LayerNorm(_)
                | Module::RmsNorm(_),
                _,
            ) => {
                let message = kinds::refuse_untraceable(m)
                    .err()
                    .unwrap_or_else(|| format!("module {i} is not traced by tch"));
                return Err(Error::BadModel {
                    model: self.model.name.clone(),
                    message,
                });
            }
            // A module of a traced kind is here without parameters.
            (Module::Linear(_) | Module::Conv2d(_), _)
            | (Module::BatchNorm1d { .. } | Module::BatchNorm2d { .. }, None) => {
                return Err(Error::BadModel {
                    model: self.model.name.clone(),
                    message: format!("module {i} has no parameters"),
                });
            }
        })
    }

    /// The traced layer spec of module `module`.
    pub fn traced_layer(&self, module: usize) -> Option<TracedLayer<'_>> {
        kinds::traced(self.model.modules.get(module)?)
    }
}

/// Reads a weights snapshot (`weights/*.safetensors`): its tensors by name.
pub fn read_snapshot(path: &std::path::Path) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path).map_err(|e| Error::Weights {
        snapshot: path.to_path_buf(),
        message: format!("not a readable weights snapshot: {e}"),
    })
}

/// Tensor `name` of a snapshot read from `path`, checked against `shape`.
pub fn snapshot_tensor<'t>(
    tensors: &'t [(String, Tensor)],
    path: &std::path::Path,
    name: &str,
    shape: &[i64],
) -> Result<&'t Tensor> {
    let bad = |message: String| Error::Weights {
        snapshot: path.to_path_buf(),
        message,
    };
    let (_, t) = tensors
        .iter()
        .find(|(n, _)| n == name)
        .ok_or_else(|| bad(format!("no tensor {name:?}")))?;
    if t.size() != shape {
        return Err(bad(format!(
            "tensor {name:?} has shape {:?}, the model's is {shape:?}",
            t.size()
        )));
    }
    Ok(t)
}

/// Name of a module with parameters: a layer of a traced kind or a batch
/// norm.
fn layer_name(m: &Module) -> Option<&str> {
    match m {
        Module::BatchNorm1d { name, .. } | Module::BatchNorm2d { name, .. } => Some(name),
        _ => kinds::layer(m).map(|l| l.name()),
    }
}

fn to_i64(v: &[usize; 2]) -> [i64; 2] {
    [v[0] as i64, v[1] as i64]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn presets_fit_digits() {
        let mlp = build_model(&ModelChoice::default(), &[1, 8, 8], 10, &TraceLayers::All).unwrap();
        let names: Vec<&str> = mlp.traced_layers().map(|l| l.name()).collect();
        assert_eq!(names, ["fc1", "fc2", "fc3"]);
        let cnn = build_model(
            &ModelChoice::Cnn,
            &[1, 8, 8],
            10,
            &TraceLayers::Names(vec!["conv2".into()]),
        )
        .unwrap();
        let Module::Conv2d(c2) = &cnn.modules[2] else {
            panic!()
        };
        assert_eq!(c2.output_hw, [4, 4]);
        assert_eq!(cnn.traced_layers().count(), 1);
        assert!(build_model(&ModelChoice::Cnn, &[64], 10, &TraceLayers::All).is_err());
        let err = build_model(
            &ModelChoice::default(),
            &[64],
            10,
            &TraceLayers::Names(vec!["fc9".into()]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("fc9"), "{err}");
    }

    /// Pooling, activations and dropout run, and the output shape of the
    /// forward pass is the one [`check_model`] works out.
    #[test]
    fn every_module_runs() {
        let conv = conv("c", 2, 3, 3, 1, 1, [7, 6]).unwrap();
        let modules = vec![
            Module::Conv2d(conv),
            Module::Gelu,
            Module::MaxPool2d {
                kernel: [2, 2],
                stride: [2, 2],
            },
            Module::Sigmoid,
            Module::AvgPool2d {
                kernel: [2, 1],
                stride: [1, 1],
            },
            Module::Tanh,
            Module::Dropout { p: 0.5 },
            Module::Flatten,
            linear("out", 3 * 2 * 3, 4),
        ];
        let model = Model {
            structure: Default::default(),
            name: "all".into(),
            input_shape: vec![2, 7, 6],
            modules,
            frozen: Vec::new(),
        };
        assert_eq!(check_model(&model).unwrap(), [4]);
        let net = Network::new(&model, 1, Device::Cpu).unwrap();
        let x = Tensor::ones([5, 2, 7, 6], (Kind::Float, Device::Cpu));
        let (y, taps) = net.forward(&x, true, true).unwrap();
        assert_eq!(y.size(), [5, 4]);
        assert_eq!(taps.len(), 2);
        assert_eq!(taps[1].input.size(), [5, 18]);
        // Same seed, same weights; another seed, other weights.
        let again = Network::new(&model, 1, Device::Cpu)
            .unwrap()
            .to_host()
            .unwrap();
        assert_eq!(net.to_host().unwrap(), again);
        assert_ne!(
            Network::new(&model, 2, Device::Cpu)
                .unwrap()
                .to_host()
                .unwrap(),
            again
        );
    }

    /// A snapshot loads into a network of the same model, parameter for
    /// parameter; another model's is refused, naming the tensor and shapes.
    #[test]
    fn snapshots_load_by_name_and_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let model = |hidden| {
            build_model(
                &ModelChoice::Mlp {
                    hidden: vec![hidden],
                },
                &[1, 8, 8],
                10,
                &TraceLayers::All,
            )
            .unwrap()
        };
        let trained = Network::new(&model(5), 3, Device::Cpu).unwrap();
        let params = trained.parameters();
        Tensor::write_safetensors(&params, &path).unwrap();
        let other = Network::new(&model(5), 4, Device::Cpu).unwrap();
        assert_ne!(other.to_host().unwrap(), trained.to_host().unwrap());
        other.load_snapshot(&path).unwrap();
        assert_eq!(other.to_host().unwrap(), trained.to_host().unwrap());
        let err = Network::new(&model(6), 4, Device::Cpu)
            .unwrap()
            .load_snapshot(&path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tensor \"fc1.weight\" has shape [5, 64], the model's is [6, 64]"),
            "{err}"
        );
        let bn = build_model(
            &ModelChoice::CnnBatchNorm,
            &[1, 8, 8],
            10,
            &TraceLayers::All,
        )
        .unwrap();
        let err = Network::new(&bn, 1, Device::Cpu)
            .unwrap()
            .load_snapshot(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch norm layer bn1"), "{err}");
    }

    #[test]
    fn batch_norm_shapes_are_checked() {
        let model = |features| Model {
            structure: Default::default(),
            name: "bn".into(),
            input_shape: vec![4],
            modules: vec![Module::BatchNorm1d {
                name: "bn1".into(),
                features,
            }],
            frozen: Vec::new(),
        };
        assert_eq!(check_model(&model(4)).unwrap(), vec![4]);
        let err = check_model(&model(5)).unwrap_err();
        assert!(err.to_string().contains("expects [5] inputs"), "{err}");
    }

    #[test]
    fn storage_rule() {
        // conv1 of the cnn on digits: full 8·9+8 = 80 < 9·64 + 8·64.
        assert_eq!(conv_storage(8, 9, 64, true), Storage::Full);
        // Many channels, few positions: factors are smaller.
        assert_eq!(conv_storage(64, 576, 4, true), Storage::Factors);
    }
}
