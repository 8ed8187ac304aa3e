//! Synthetic traces written through the Recorder, with a simulated PyTorch
//! SGD (momentum, Nesterov, dampening, weight decay) so that the final
//! weights are what training would produce from the recorded updates.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reptrace_format::{
    Conv2dSpec, Dtype, LinearSpec, Mode, Model, Module, Optimizer, Split, Storage,
};
use reptrace_record::{NamedTensor, ProbeBatch, Recorder, StepRow, UpdateBatch};
use std::collections::HashMap;
use std::path::Path;

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
    pub fn name(&self) -> &'static str {
        match self {
            L::Linear { name, .. } | L::Conv { name, .. } => name,
        }
    }

    pub fn module(&self) -> Module {
        match self.clone() {
            L::Linear {
                name,
                inp,
                out,
                bias,
            } => Module::Linear(LinearSpec {
                name: name.into(),
                in_features: inp,
                out_features: out,
                bias,
                traced: true,
            }),
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
            } => {
                let o =
                    |i: usize| (in_hw[i] + 2 * pad[i] - dil[i] * (k[i] - 1) - 1) / stride[i] + 1;
                Module::Conv2d(Conv2dSpec {
                    name: name.into(),
                    in_channels: c_in,
                    out_channels: c_out,
                    kernel: k,
                    stride,
                    padding: pad,
                    dilation: dil,
                    input_hw: in_hw,
                    output_hw: [o(0), o(1)],
                    bias,
                    traced: true,
                    storage,
                })
            }
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
    pub w: Vec<f64>,
    pub b: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct Synth {
    pub layers: Vec<L>,
    pub optimizer: Optimizer,
    pub dtype: Dtype,
    pub epochs: usize,
    pub steps_per_epoch: usize,
    pub batch: usize,
    pub n_train: usize,
    pub n_test: usize,
    pub classes: usize,
    /// Training instances that are also probes (the first ones).
    pub train_probes: usize,
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
    pub w0: HashMap<&'static str, Wb>,
    pub wt: HashMap<&'static str, Wb>,
}

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
        L::Conv {
            c_in,
            c_out,
            k,
            stride,
            pad,
            dil,
            in_hw,
            bias,
            ..
        } => {
            let Module::Conv2d(spec) = layer.module() else {
                unreachable!()
            };
            let [ho, wo] = spec.output_hw;
            let mut z = vec![0.0; c_out * ho * wo];
            for o in 0..*c_out {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = if *bias { b[o] } else { 0.0 };
                        for c in 0..*c_in {
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
        let model = Model {
            structure: Default::default(),
            name: "synth".into(),
            input_shape: vec![1],
            modules: self.layers.iter().map(L::module).collect(),
            frozen: Vec::new(),
        };
        let mut rec = Recorder::builder(dir)
            .model(model.clone())
            .optimizer(self.optimizer.clone())
            .classes((0..self.classes).map(|c| c.to_string()).collect())
            .dtype(self.dtype)
            .mode(Mode::Instance)
            .build()
            .unwrap();
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

        // Initial weights.
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
                    w: (0..wl).map(|_| r(&mut rng)).collect(),
                    b: (0..bl).map(|_| r(&mut rng)).collect(),
                },
            );
        }
        let snapshot = |w: &HashMap<&'static str, Wb>, rec: &mut Recorder| {
            let owned: Vec<(String, Vec<usize>, Vec<f32>)> = self
                .layers
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
                .collect();
            let named: Vec<NamedTensor<'_>> = owned
                .iter()
                .map(|(n, s, d)| NamedTensor {
                    name: n,
                    shape: s,
                    data: d,
                })
                .collect();
            rec.weights(&named).unwrap();
        };
        snapshot(&w, &mut rec);
        rec.commit().unwrap();
        let w0 = w.clone();

        let opt = &self.optimizer;
        let mut buf: HashMap<&'static str, Wb> = HashMap::new();
        let mut step = 0i64;
        for epoch in 0..self.epochs {
            let lr = opt.lr * 0.5f64.powi(epoch as i32);
            for _ in 0..self.steps_per_epoch {
                // A batch of distinct training instances.
                let mut batch: Vec<i64> = Vec::new();
                while batch.len() < self.batch {
                    let i = rng.random_range(0..self.n_train as i64);
                    if !batch.contains(&i) {
                        batch.push(i);
                    }
                }
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
                        },
                    )
                    .unwrap();
                    // The SGD step PyTorch would take: g = −(1/η) Σ ΔW (+ wd·W).
                    let cur = w.get_mut(l.name()).unwrap();
                    let mut g = Wb {
                        w: vec![0.0; cur.w.len()],
                        b: vec![0.0; cur.b.len()],
                    };
                    for i in 0..self.batch {
                        let d = delta_from_factors(
                            l,
                            &widen(&u[i * ul..(i + 1) * ul]),
                            &widen(&v[i * vl..(i + 1) * vl]),
                        );
                        g.w.iter_mut().zip(&d.w).for_each(|(g, d)| *g -= d / lr);
                        g.b.iter_mut().zip(&d.b).for_each(|(g, d)| *g -= d / lr);
                    }
                    if opt.weight_decay != 0.0 {
                        g.w.iter_mut()
                            .zip(&cur.w)
                            .for_each(|(g, w)| *g += opt.weight_decay * w);
                        g.b.iter_mut()
                            .zip(&cur.b)
                            .for_each(|(g, w)| *g += opt.weight_decay * w);
                    }
                    let upd = if opt.momentum != 0.0 {
                        let b = buf.entry(l.name()).or_insert_with(|| g.clone());
                        if step > 0 {
                            let d = opt.dampening;
                            b.w.iter_mut()
                                .zip(&g.w)
                                .for_each(|(b, g)| *b = opt.momentum * *b + (1.0 - d) * g);
                            b.b.iter_mut()
                                .zip(&g.b)
                                .for_each(|(b, g)| *b = opt.momentum * *b + (1.0 - d) * g);
                        }
                        if opt.nesterov {
                            Wb {
                                w: g.w
                                    .iter()
                                    .zip(&b.w)
                                    .map(|(g, b)| g + opt.momentum * b)
                                    .collect(),
                                b: g.b
                                    .iter()
                                    .zip(&b.b)
                                    .map(|(g, b)| g + opt.momentum * b)
                                    .collect(),
                            }
                        } else {
                            b.clone()
                        }
                    } else {
                        g
                    };
                    cur.w.iter_mut().zip(&upd.w).for_each(|(w, s)| *w -= lr * s);
                    cur.b.iter_mut().zip(&upd.b).for_each(|(w, s)| *w -= lr * s);
                }
                step += 1;
            }
            snapshot(&w, &mut rec);
            rec.commit().unwrap();
        }

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

        // Probes: the first training instances and every test instance.
        let probe_instances: Vec<i64> = (0..self.train_probes as i64)
            .chain(self.n_train as i64..n as i64)
            .collect();
        for l in &self.layers {
            let (_, _, al, pl) = lens(l);
            let mut a = Vec::new();
            let mut p = Vec::new();
            for _ in &probe_instances {
                let x: Vec<f64> = (0..al)
                    .map(|_| f64::from(rng.random_range(-1.0f32..1.0)))
                    .collect();
                let dw: Vec<f64> = wt[l.name()]
                    .w
                    .iter()
                    .zip(&w0[l.name()].w)
                    .map(|(a, b)| a - b)
                    .collect();
                let db: Vec<f64> = wt[l.name()]
                    .b
                    .iter()
                    .zip(&w0[l.name()].b)
                    .map(|(a, b)| a - b)
                    .collect();
                let z = forward(l, &dw, &db, &x);
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
                },
            )
            .unwrap();
        }
        let owned: Vec<(String, Vec<usize>, Vec<f32>)> = self
            .layers
            .iter()
            .flat_map(|l| {
                let shape = weight_shape(l);
                let mut v = vec![(
                    format!("{}.weight", l.name()),
                    shape.clone(),
                    f32s(&wt[l.name()].w),
                )];
                if has_bias(l) {
                    v.push((
                        format!("{}.bias", l.name()),
                        vec![shape[0]],
                        f32s(&wt[l.name()].b),
                    ));
                }
                v
            })
            .collect();
        let named: Vec<NamedTensor<'_>> = owned
            .iter()
            .map(|(n, s, d)| NamedTensor {
                name: n,
                shape: s,
                data: d,
            })
            .collect();
        rec.finish(&named).unwrap();
        Built { w0, wt }
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
