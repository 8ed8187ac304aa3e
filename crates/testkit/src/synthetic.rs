//! Synthetic runs of given shapes written through `reptrace-record`, with
//! known answers:
//!
//! - [`Synth`]: a run of given layers, steps, instances, probes, dtype and
//!   seed, trained with a simulated PyTorch SGD (momentum, Nesterov,
//!   dampening, weight decay) so that the final weights are what training
//!   would produce from the recorded updates; [`Built`] holds the initial and
//!   final weights, and [`forward`] and [`delta_from_factors`] are the f64
//!   brute-force arithmetic the analyzer's answers are checked against;
//! - [`cnn_example`]: the example run of `reptrace-record` (the small CNN
//!   with random numbers), which the Python tests also open;
//! - [`random_run`]: random factors and probes of any model, sized for
//!   benches.
//!
//! The same seed gives the same run, byte for byte.
use crate::models::{self, Conv};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reptrace_format::{
    Dtype, Manifest, Mode, Model, Module, Optimizer, Split, Storage, TracedLayer,
};
use reptrace_record::{NamedTensor, ProbeBatch, Recorder, StepRow, UpdateBatch};
use std::collections::HashMap;
use std::path::Path;

/// Weight tensors by name: (name, shape, values), as written to a weights
/// snapshot.
pub type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The recorder's view of `tensors`.
pub fn named(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<NamedTensor<'_>> {
    tensors
        .iter()
        .map(|(name, shape, data)| NamedTensor { name, shape, data })
        .collect()
}

/// A traced layer of a synthetic model.
#[derive(Debug, Clone)]
pub enum L {
    Linear {
        name: &'static str,
        inp: usize,
        out: usize,
        bias: bool,
    },
    Conv {
        name: &'static str,
        c_in: usize,
        c_out: usize,
        k: [usize; 2],
        stride: [usize; 2],
        pad: [usize; 2],
        dil: [usize; 2],
        in_hw: [usize; 2],
        bias: bool,
        storage: Storage,
    },
}

impl L {
    /// The layer's name.
    pub fn name(&self) -> &'static str {
        match self {
            L::Linear { name, .. } | L::Conv { name, .. } => name,
        }
    }

    /// The layer's manifest module (traced).
    pub fn module(&self) -> Module {
        match self.clone() {
            L::Linear {
                name,
                inp,
                out,
                bias,
            } => models::linear(name, inp, out, bias),
            L::Conv {
                name,
                c_in,
                c_out,
                k,
                stride,
                pad,
                dil,
                in_hw,
                bias,
                storage,
            } => Conv::new(name, c_in, c_out, in_hw)
                .kernel(k)
                .stride(stride)
                .padding(pad)
                .dilation(dil)
                .bias(bias)
                .storage(storage)
                .module(),
        }
    }
}

/// A small conv layer with stride, padding and dilation.
pub fn conv(name: &'static str, storage: Storage) -> L {
    L::Conv {
        name,
        c_in: 2,
        c_out: 3,
        k: [3, 2],
        stride: [1, 2],
        pad: [1, 0],
        dil: [1, 2],
        in_hw: [5, 6],
        bias: true,
        storage,
    }
}

/// A traced Linear layer.
pub fn linear(name: &'static str, inp: usize, out: usize, bias: bool) -> L {
    L::Linear {
        name,
        inp,
        out,
        bias,
    }
}

/// Weight (`out × rest`, row-major) and bias of a layer, f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Wb {
    /// The weight, row-major.
    pub w: Vec<f64>,
    /// The bias (empty without one).
    pub b: Vec<f64>,
}

/// A synthetic run's shape; [`Synth::default`] is a two-layer MLP (fc1 5→4
/// with bias, fc2 4→3 without), plain SGD η = 0.1, f32, 3 epochs of 4 steps
/// of 6 instances out of 20 training and 5 test instances, 3 classes, 3
/// training probes, seed 7. The learning rate halves every epoch.
#[derive(Debug, Clone)]
pub struct Synth {
    /// The traced layers, in order.
    pub layers: Vec<L>,
    /// The optimizer simulated (its `lr` is the first epoch's).
    pub optimizer: Optimizer,
    /// The dtype of the stored factors.
    pub dtype: Dtype,
    /// Epochs, each ending with a commit and a weights snapshot.
    pub epochs: usize,
    /// Steps per epoch.
    pub steps_per_epoch: usize,
    /// Distinct training instances per step.
    pub batch: usize,
    /// Training instances (ids `0..n_train`).
    pub n_train: usize,
    /// Test instances (ids after the training ones), all probes.
    pub n_test: usize,
    /// Classes (labels drawn uniformly).
    pub classes: usize,
    /// Training instances that are also probes (the first ones).
    pub train_probes: usize,
    /// The seed of every random draw.
    pub seed: u64,
}

impl Default for Synth {
    fn default() -> Self {
        Synth {
            layers: vec![linear("fc1", 5, 4, true), linear("fc2", 4, 3, false)],
            optimizer: Optimizer::sgd(0.1),
            dtype: Dtype::F32,
            epochs: 3,
            steps_per_epoch: 4,
            batch: 6,
            n_train: 20,
            n_test: 5,
            classes: 3,
            train_probes: 3,
            seed: 7,
        }
    }
}

/// What was written.
pub struct Built {
    /// The initial weights, by layer.
    pub w0: HashMap<&'static str, Wb>,
    /// The final weights (f32 values), by layer.
    pub wt: HashMap<&'static str, Wb>,
}

/// `x` narrowed to f32.
pub fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

/// Naive convolution `z = W ⊛ a + b` of a Conv2d (or Linear) layer, f64.
pub fn forward(layer: &L, w: &[f64], b: &[f64], a: &[f64]) -> Vec<f64> {
    match layer {
        L::Linear { inp, out, bias, .. } => (0..*out)
            .map(|o| {
                let z: f64 = (0..*inp).map(|i| w[o * inp + i] * a[i]).sum();
                if *bias { z + b[o] } else { z }
            })
            .collect(),
        L::Conv { .. } => {
            let Module::Conv2d(spec) = layer.module() else {
                unreachable!()
            };
            let (c_in, c_out, k, in_hw) = (
                spec.in_channels,
                spec.out_channels,
                spec.kernel,
                spec.input_hw,
            );
            let (stride, pad, dil) = (spec.stride, spec.padding, spec.dilation);
            let [ho, wo] = spec.output_hw;
            let mut z = vec![0.0; c_out * ho * wo];
            for o in 0..c_out {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = if spec.bias { b[o] } else { 0.0 };
                        for c in 0..c_in {
                            for i in 0..k[0] {
                                for j in 0..k[1] {
                                    let y =
                                        (oy * stride[0] + i * dil[0]) as isize - pad[0] as isize;
                                    let x =
                                        (ox * stride[1] + j * dil[1]) as isize - pad[1] as isize;
                                    if y < 0
                                        || x < 0
                                        || y >= in_hw[0] as isize
                                        || x >= in_hw[1] as isize
                                    {
                                        continue;
                                    }
                                    let wi = ((o * c_in + c) * k[0] + i) * k[1] + j;
                                    acc += w[wi]
                                        * a[(c * in_hw[0] + y as usize) * in_hw[1] + x as usize];
                                }
                            }
                        }
                        z[(o * ho + oy) * wo + ox] = acc;
                    }
                }
            }
            z
        }
    }
}

/// ΔW (out × rest) and Δb of one record from its factors, f64, built explicitly.
pub fn delta_from_factors(layer: &L, u: &[f64], v: &[f64]) -> Wb {
    match layer {
        L::Linear { inp, out, bias, .. } => {
            let mut w = vec![0.0; out * inp];
            for o in 0..*out {
                for i in 0..*inp {
                    w[o * inp + i] = v[o] * u[i];
                }
            }
            Wb {
                w,
                b: if *bias { v.to_vec() } else { vec![] },
            }
        }
        L::Conv {
            c_in,
            c_out,
            k,
            bias,
            storage,
            ..
        } => {
            let kk = c_in * k[0] * k[1];
            match storage {
                Storage::Full => Wb {
                    w: v[..c_out * kk].to_vec(),
                    b: if *bias {
                        v[c_out * kk..].to_vec()
                    } else {
                        vec![]
                    },
                },
                Storage::Factors => {
                    let p = v.len() / c_out;
                    let mut w = vec![0.0; c_out * kk];
                    let mut b = vec![0.0; if *bias { *c_out } else { 0 }];
                    for o in 0..*c_out {
                        for q in 0..kk {
                            w[o * kk + q] = (0..p).map(|x| v[o * p + x] * u[q * p + x]).sum();
                        }
                        if *bias {
                            b[o] = (0..p).map(|x| v[o * p + x]).sum();
                        }
                    }
                    Wb { w, b }
                }
            }
        }
    }
}

fn lens(layer: &L) -> (usize, usize, usize, usize) {
    let Module::Conv2d(spec) = layer.module() else {
        let L::Linear { inp, out, .. } = layer else {
            unreachable!()
        };
        return (*inp, *out, *inp, *out);
    };
    let (p, kk) = (spec.positions(), spec.patch_len());
    let (ul, vl) = match spec.storage {
        Storage::Factors => (kk * p, spec.out_channels * p),
        Storage::Full => (
            0,
            spec.out_channels * kk + if spec.bias { spec.out_channels } else { 0 },
        ),
    };
    (
        ul,
        vl,
        spec.in_channels * spec.input_hw[0] * spec.input_hw[1],
        spec.out_channels * p,
    )
}

impl Synth {
    /// Trains (simulated) and records the run into `dir`.
    pub fn write(&self, dir: &Path) -> Built {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut rec = self.recorder(dir);
        let labels = self.instances(&mut rng, &mut rec);
        let mut w = self.initial_weights(&mut rng);
        self.snapshot(&w, &mut rec);
        let w0 = w.clone();
        self.train(&mut rng, &mut rec, &labels, &mut w);

        // The network's final weights are f32.
        let wt: HashMap<&'static str, Wb> = w
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    Wb {
                        w: widen(&f32s(&v.w)),
                        b: widen(&f32s(&v.b)),
                    },
                )
            })
            .collect();
        self.write_probes(&mut rng, &mut rec, &labels, &w0, &wt);
        rec.finish(&named(&self.tensors(&wt))).unwrap();
        Built { w0, wt }
    }

    /// The recorder of the run into `dir`.
    fn recorder(&self, dir: &Path) -> Recorder {
        let model = models::model(
            "synth",
            vec![1],
            self.layers.iter().map(L::module).collect(),
        );
        Recorder::builder(dir)
            .model(model)
            .optimizer(self.optimizer.clone())
            .classes((0..self.classes).map(|c| c.to_string()).collect())
            .dtype(self.dtype)
            .mode(Mode::Instance)
            .build()
            .unwrap()
    }

    /// Draws the instances' labels and records the instances.
    fn instances(&self, rng: &mut ChaCha8Rng, rec: &mut Recorder) -> Vec<i32> {
        let n = self.n_train + self.n_test;
        let ids: Vec<i64> = (0..n as i64).collect();
        let labels: Vec<i32> = (0..n)
            .map(|_| rng.random_range(0..self.classes as i32))
            .collect();
        let splits: Vec<Split> = (0..n)
            .map(|i| {
                if i < self.n_train {
                    Split::Train
                } else {
                    Split::Test
                }
            })
            .collect();
        rec.instances(&ids, &labels, &splits).unwrap();
        labels
    }

    /// Random f32-representable initial weights, by layer.
    fn initial_weights(&self, rng: &mut ChaCha8Rng) -> HashMap<&'static str, Wb> {
        let mut w: HashMap<&'static str, Wb> = HashMap::new();
        for l in &self.layers {
            let shape = weight_shape(l);
            let wl: usize = shape.iter().product();
            let bl = if has_bias(l) { shape[0] } else { 0 };
            // f32-representable starting values.
            let r = |rng: &mut ChaCha8Rng| f64::from(rng.random_range(-0.5f32..0.5));
            w.insert(
                l.name(),
                Wb {
                    w: (0..wl).map(|_| r(rng)).collect(),
                    b: (0..bl).map(|_| r(rng)).collect(),
                },
            );
        }
        w
    }

    /// A weights snapshot of `w` and a commit.
    fn snapshot(&self, w: &HashMap<&'static str, Wb>, rec: &mut Recorder) {
        rec.weights(&named(&self.tensors(w))).unwrap();
        rec.commit().unwrap();
    }

    /// Records every step's random factors and trains `w` with them.
    fn train(
        &self,
        rng: &mut ChaCha8Rng,
        rec: &mut Recorder,
        labels: &[i32],
        w: &mut HashMap<&'static str, Wb>,
    ) {
        let mut sgd = Sgd {
            opt: &self.optimizer,
            batch: self.batch,
            buf: HashMap::new(),
        };
        let mut step = 0i64;
        for epoch in 0..self.epochs {
            let lr = self.optimizer.lr * 0.5f64.powi(epoch as i32);
            for _ in 0..self.steps_per_epoch {
                let batch = self.draw_batch(rng);
                let blabels: Vec<i32> = batch.iter().map(|&i| labels[i as usize]).collect();
                rec.step(StepRow {
                    step,
                    epoch: epoch as i32,
                    lr,
                    batch_size: self.batch as i32,
                    loss: 1.0,
                    skipped: false,
                })
                .unwrap();
                for l in &self.layers {
                    let (ul, vl, _, _) = lens(l);
                    let u: Vec<f32> = (0..self.batch * ul)
                        .map(|_| rng.random_range(-1.0f32..1.0).max(0.0))
                        .collect();
                    let v: Vec<f32> = (0..self.batch * vl)
                        .map(|_| (lr as f32) * rng.random_range(-0.3f32..0.3))
                        .collect();
                    rec.updates(
                        l.name(),
                        UpdateBatch {
                            step,
                            epoch: epoch as i32,
                            instance_ids: &batch,
                            labels: &blabels,
                            u: &u,
                            v: &v,
                            update_norm: None,
                            positions: None,
                        },
                    )
                    .unwrap();
                    sgd.step(l, w.get_mut(l.name()).unwrap(), (&u, &v), lr, step);
                }
                step += 1;
            }
            self.snapshot(w, rec);
        }
    }

    /// A batch of distinct training instances.
    fn draw_batch(&self, rng: &mut ChaCha8Rng) -> Vec<i64> {
        let mut batch: Vec<i64> = Vec::new();
        while batch.len() < self.batch {
            let i = rng.random_range(0..self.n_train as i64);
            if !batch.contains(&i) {
                batch.push(i);
            }
        }
        batch
    }

    /// Probes of every layer: the first training instances and every test
    /// instance, with random inputs and the outputs of the weight change
    /// `wt − w0`.
    fn write_probes(
        &self,
        rng: &mut ChaCha8Rng,
        rec: &mut Recorder,
        labels: &[i32],
        w0: &HashMap<&'static str, Wb>,
        wt: &HashMap<&'static str, Wb>,
    ) {
        let n = self.n_train + self.n_test;
        let probe_instances: Vec<i64> = (0..self.train_probes as i64)
            .chain(self.n_train as i64..n as i64)
            .collect();
        for l in &self.layers {
            let (_, _, al, pl) = lens(l);
            let d = wt[l.name()].zip_map(&w0[l.name()], |a, b| a - b);
            let mut a = Vec::new();
            let mut p = Vec::new();
            for _ in &probe_instances {
                let x: Vec<f64> = (0..al)
                    .map(|_| f64::from(rng.random_range(-1.0f32..1.0)))
                    .collect();
                let z = forward(l, &d.w, &d.b, &x);
                assert_eq!(z.len(), pl);
                a.extend(x);
                p.extend(z);
            }
            let probe_ids: Vec<i64> = probe_instances.iter().map(|i| 100 + i).collect();
            let inst: Vec<Option<i64>> = probe_instances.iter().map(|&i| Some(i)).collect();
            let plabels: Vec<i32> = probe_instances
                .iter()
                .map(|&i| labels[i as usize])
                .collect();
            rec.probes(
                l.name(),
                ProbeBatch {
                    probe_ids: &probe_ids,
                    instance_ids: &inst,
                    labels: &plabels,
                    predicted: &plabels,
                    a: &a,
                    p: &p,
                    positions: None,
                },
            )
            .unwrap();
        }
    }
}

impl Wb {
    /// Zeros of `like`'s sizes.
    fn zeros_like(like: &Wb) -> Wb {
        Wb {
            w: vec![0.0; like.w.len()],
            b: vec![0.0; like.b.len()],
        }
    }

    /// Applies `f` to each element of the weight and bias with its
    /// counterpart in `other`.
    fn each_mut(&mut self, other: &Wb, f: impl Fn(&mut f64, f64)) {
        self.w.iter_mut().zip(&other.w).for_each(|(x, &y)| f(x, y));
        self.b.iter_mut().zip(&other.b).for_each(|(x, &y)| f(x, y));
    }

    /// `f` of each element of the weight and bias and its counterpart in
    /// `other`.
    fn zip_map(&self, other: &Wb, f: impl Fn(f64, f64) -> f64) -> Wb {
        Wb {
            w: self
                .w
                .iter()
                .zip(&other.w)
                .map(|(&x, &y)| f(x, y))
                .collect(),
            b: self
                .b
                .iter()
                .zip(&other.b)
                .map(|(&x, &y)| f(x, y))
                .collect(),
        }
    }
}

/// The simulated PyTorch SGD (momentum, Nesterov, dampening, weight decay)
/// with its momentum buffers by layer.
struct Sgd<'a> {
    opt: &'a Optimizer,
    /// Records per step.
    batch: usize,
    buf: HashMap<&'static str, Wb>,
}

impl Sgd<'_> {
    /// The SGD step PyTorch would take on `l`'s weights `cur` at `step` from
    /// the step's factors: g = −(1/η) Σ ΔW (+ wd·W).
    fn step(&mut self, l: &L, cur: &mut Wb, (u, v): (&[f32], &[f32]), lr: f64, step: i64) {
        let opt = self.opt;
        let (ul, vl, _, _) = lens(l);
        let mut g = Wb::zeros_like(cur);
        for i in 0..self.batch {
            let d = delta_from_factors(
                l,
                &widen(&u[i * ul..(i + 1) * ul]),
                &widen(&v[i * vl..(i + 1) * vl]),
            );
            g.each_mut(&d, |g, d| *g -= d / lr);
        }
        if opt.weight_decay != 0.0 {
            g.each_mut(cur, |g, w| *g += opt.weight_decay * w);
        }
        let upd = if opt.momentum != 0.0 {
            let b = self.buf.entry(l.name()).or_insert_with(|| g.clone());
            if step > 0 {
                let d = opt.dampening;
                b.each_mut(&g, |b, g| *b = opt.momentum * *b + (1.0 - d) * g);
            }
            if opt.nesterov {
                g.zip_map(b, |g, b| g + opt.momentum * b)
            } else {
                b.clone()
            }
        } else {
            g
        };
        cur.each_mut(&upd, |w, s| *w -= lr * s);
    }
}

impl Synth {
    /// Every layer's weight (and bias) of `w`, as f32 tensors.
    fn tensors(&self, w: &HashMap<&'static str, Wb>) -> Tensors {
        self.layers
            .iter()
            .flat_map(|l| {
                let shape = weight_shape(l);
                let mut v = vec![(
                    format!("{}.weight", l.name()),
                    shape.clone(),
                    f32s(&w[l.name()].w),
                )];
                if has_bias(l) {
                    v.push((
                        format!("{}.bias", l.name()),
                        vec![shape[0]],
                        f32s(&w[l.name()].b),
                    ));
                }
                v
            })
            .collect()
    }
}

fn has_bias(l: &L) -> bool {
    match l {
        L::Linear { bias, .. } | L::Conv { bias, .. } => *bias,
    }
}

fn weight_shape(l: &L) -> Vec<usize> {
    match l {
        L::Linear { inp, out, .. } => vec![*out, *inp],
        L::Conv { c_in, c_out, k, .. } => vec![*c_out, *c_in, k[0], k[1]],
    }
}

/// A standard normal sample (Box–Muller).
fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// A ReLU output: zero about half the time, else positive.
fn relu_like(rng: &mut ChaCha8Rng) -> f32 {
    gaussian(rng).max(0.0)
}

/// The example run's sizes.
const EXAMPLE_EPOCHS: i32 = 3;
const EXAMPLE_BATCH: usize = 20;
const EXAMPLE_TRAIN: usize = 200;
const EXAMPLE_TEST: usize = 50;
const EXAMPLE_CLASSES: usize = 10;
const EXAMPLE_LR: f64 = 0.05;

/// Random weights for every traced layer (zero biases).
fn random_weights(model: &Model, rng: &mut ChaCha8Rng) -> Tensors {
    let mut out = Vec::new();
    for layer in model.traced_layers() {
        let shape = layer.weight_shape();
        let n: usize = shape.iter().product();
        let w = (0..n).map(|_| 0.1 * gaussian(rng)).collect();
        out.push((format!("{}.weight", layer.name()), shape.clone(), w));
        out.push((
            format!("{}.bias", layer.name()),
            vec![shape[0]],
            vec![0.0; shape[0]],
        ));
    }
    out
}

/// The `u` and `v` of `n` records of `layer`, row-major.
fn example_factors(layer: TracedLayer<'_>, n: usize, rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<f32>) {
    let (u_len, v_len) = layer.factor_lens();
    let lr = EXAMPLE_LR as f32;
    match layer {
        TracedLayer::Conv2d(c) if c.storage == Storage::Full => {
            // u is empty; v = ΔW (C_out × C_in·kh·kw) = V Uᵀ, then Δb = V·1.
            let (k, p, c_out) = (c.patch_len(), c.positions(), c.out_channels);
            let mut v = Vec::with_capacity(n * v_len);
            for _ in 0..n {
                let uf: Vec<f32> = (0..k * p).map(|_| relu_like(rng)).collect();
                let vf: Vec<f32> = (0..c_out * p).map(|_| lr * 0.01 * gaussian(rng)).collect();
                for o in 0..c_out {
                    for r in 0..k {
                        v.push((0..p).map(|q| vf[o * p + q] * uf[r * p + q]).sum());
                    }
                }
                for o in 0..c_out {
                    v.push(vf[o * p..(o + 1) * p].iter().sum());
                }
            }
            (Vec::new(), v)
        }
        _ => {
            let u = (0..n * u_len).map(|_| relu_like(rng)).collect();
            let v = (0..n * v_len).map(|_| lr * 0.01 * gaussian(rng)).collect();
            (u, v)
        }
    }
}

/// Writes the example run into `out` (seed 42): [`models::small_cnn`]
/// "trained" for 3 epochs of 10 steps of 20 instances out of 200 training
/// and 50 test instances, 10 classes, SGD η = 0.05, factors in `dtype`, a
/// commit with random weights at every epoch end, the test instances as
/// probes, random final weights. The numbers are random (ReLU-like sparse
/// `u`, small Gaussian `v`), the shapes exactly the format's.
pub fn cnn_example(out: &Path, dtype: Dtype) -> reptrace_record::Result<Manifest> {
    let (train, test, classes) = (EXAMPLE_TRAIN, EXAMPLE_TEST, EXAMPLE_CLASSES);
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let model = models::small_cnn(classes);
    let mut rec = Recorder::builder(out)
        .model(model.clone())
        .optimizer(Optimizer::sgd(EXAMPLE_LR))
        .classes((0..classes).map(|c| c.to_string()).collect())
        .dtype(dtype)
        .setting("seed", serde_json::json!(42))
        .setting("epochs", serde_json::json!(EXAMPLE_EPOCHS))
        .setting("data", serde_json::json!("synthetic"))
        .build()?;

    // Instances: the first `train` are the training split, then the test ones.
    let ids: Vec<i64> = (0..(train + test) as i64).collect();
    let labels: Vec<i32> = (0..train + test)
        .map(|_| rng.random_range(0..classes as i32))
        .collect();
    let splits: Vec<Split> = (0..train + test)
        .map(|i| if i < train { Split::Train } else { Split::Test })
        .collect();
    rec.instances(&ids, &labels, &splits)?;
    rec.weights(&named(&random_weights(&model, &mut rng)))?;
    rec.commit()?; // commit 0: instances + weights/initial.safetensors

    let layers: Vec<TracedLayer> = model.traced_layers().collect();
    let mut step = 0i64;
    for epoch in 0..EXAMPLE_EPOCHS {
        for batch in 0..train / EXAMPLE_BATCH {
            let batch_ids: Vec<i64> = (batch * EXAMPLE_BATCH..(batch + 1) * EXAMPLE_BATCH)
                .map(|i| i as i64)
                .collect();
            let batch_labels: Vec<i32> = batch_ids.iter().map(|&i| labels[i as usize]).collect();
            rec.step(StepRow {
                step,
                epoch,
                lr: EXAMPLE_LR,
                batch_size: EXAMPLE_BATCH as i32,
                loss: 2.3 * (-0.05 * step as f64).exp(),
                skipped: false,
            })?;
            for &layer in &layers {
                let (u, v) = example_factors(layer, EXAMPLE_BATCH, &mut rng);
                rec.updates(
                    layer.name(),
                    UpdateBatch {
                        step,
                        epoch,
                        instance_ids: &batch_ids,
                        labels: &batch_labels,
                        u: &u,
                        v: &v,
                        update_norm: None, // computed by the writer thread
                        positions: None,
                    },
                )?;
            }
            step += 1;
        }
        // Epoch end: a commit point with a weights snapshot.
        rec.weights(&named(&random_weights(&model, &mut rng)))?;
        rec.commit()?;
    }

    // Probes: the test instances, for every traced layer.
    let probe_labels: Vec<i32> = labels[train..].to_vec();
    let predicted: Vec<i32> = probe_labels
        .iter()
        .map(|&l| {
            if rng.random_bool(0.8) {
                l
            } else {
                (l + 1) % classes as i32
            }
        })
        .collect();
    for &layer in &layers {
        let (a_len, p_len) = layer.probe_lens();
        let a: Vec<f64> = (0..test * a_len)
            .map(|_| f64::from(relu_like(&mut rng)))
            .collect();
        let p: Vec<f64> = (0..test * p_len)
            .map(|_| f64::from(gaussian(&mut rng)))
            .collect();
        rec.probes(
            layer.name(),
            ProbeBatch {
                probe_ids: &ids[train..],
                instance_ids: &vec![None; test],
                labels: &probe_labels,
                predicted: &predicted,
                a: &a,
                p: &p,
                positions: None,
            },
        )?;
    }
    rec.finish(&named(&random_weights(&model, &mut rng)))
}

/// Writes a run of `model` (seed 1) sized for benches into `dir`: 1000
/// training instances then `probes` test instances (label = id mod 10), one
/// epoch of ⌈`records`/32⌉ steps of 32 instances with random factors
/// (ReLU-like `u`, small `v`), uniform random weights, and the test
/// instances as probes of every traced layer.
pub fn random_run(dir: &Path, model: &Model, records: usize, probes: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut rec = Recorder::builder(dir)
        .model(model.clone())
        .optimizer(Optimizer::sgd(0.05))
        .classes((0..10).map(|c| c.to_string()).collect())
        .build()
        .expect("recorder");
    let batch = 32usize;
    let n_train = 1000usize;
    let ids: Vec<i64> = (0..(n_train + probes) as i64).collect();
    let labels: Vec<i32> = ids.iter().map(|i| (i % 10) as i32).collect();
    let splits: Vec<Split> = ids
        .iter()
        .map(|&i| {
            if (i as usize) < n_train {
                Split::Train
            } else {
                Split::Test
            }
        })
        .collect();
    rec.instances(&ids, &labels, &splits).expect("instances");
    let tensors: Tensors = model
        .traced_layers()
        .flat_map(|l| {
            let shape = l.weight_shape();
            let n: usize = shape.iter().product();
            let w: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
            let b = vec![0.0f32; shape[0]];
            [
                (format!("{}.weight", l.name()), shape.clone(), w),
                (format!("{}.bias", l.name()), vec![shape[0]], b),
            ]
        })
        .collect();
    rec.weights(&named(&tensors)).expect("weights");
    rec.commit().expect("commit");
    for step in 0..records.div_ceil(batch) {
        rec.step(StepRow {
            step: step as i64,
            epoch: 0,
            lr: 0.05,
            batch_size: batch as i32,
            loss: 1.0,
            skipped: false,
        })
        .expect("step");
        let inst: Vec<i64> = (0..batch)
            .map(|i| ((step * batch + i) % n_train) as i64)
            .collect();
        let lab: Vec<i32> = inst.iter().map(|i| (i % 10) as i32).collect();
        for l in model.traced_layers() {
            let (ul, vl) = l.factor_lens();
            // ReLU-like inputs, small gaussian-ish gradients.
            let u: Vec<f32> = (0..batch * ul)
                .map(|_| rng.random_range(-1.0f32..1.0).max(0.0))
                .collect();
            let v: Vec<f32> = (0..batch * vl)
                .map(|_| rng.random_range(-0.01f32..0.01))
                .collect();
            rec.updates(
                l.name(),
                UpdateBatch {
                    step: step as i64,
                    epoch: 0,
                    instance_ids: &inst,
                    labels: &lab,
                    u: &u,
                    v: &v,
                    update_norm: None,
                    positions: None,
                },
            )
            .expect("updates");
        }
    }
    for l in model.traced_layers() {
        let (al, pl) = l.probe_lens();
        let a: Vec<f64> = (0..probes * al)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let p: Vec<f64> = (0..probes * pl)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let pid: Vec<i64> = (0..probes as i64).collect();
        let inst: Vec<Option<i64>> = (0..probes).map(|i| Some((n_train + i) as i64)).collect();
        let lab: Vec<i32> = (0..probes as i32).map(|i| i % 10).collect();
        rec.probes(
            l.name(),
            ProbeBatch {
                probe_ids: &pid,
                instance_ids: &inst,
                labels: &lab,
                predicted: &lab,
                a: &a,
                p: &p,
                positions: None,
            },
        )
        .expect("probes");
    }
    rec.finish(&named(&tensors)).expect("finish");
}
