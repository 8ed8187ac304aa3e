//! Integration tests of reptrace-tch: per-example factors against autograd,
//! reconstruction of the final weights from the trace files alone, tracing
//! that does not change training, accuracy, data loaders.
mod common;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type};
use arrow_array::{
    Array, ArrowPrimitiveType, Float32Array, Float64Array, Int32Array, Int64Array, ListArray,
    RecordBatch,
};
use common::{read_weights, record_update};
use reptrace_format::{
    Conv2dSpec, Dtype, LrSchedule, Manifest, Mode, Model, Module, OptimizerKind, Status, Storage,
    Table, TracedLayer, displacement_scales, layout,
};
use reptrace_record::FactorValues;
use reptrace_tch::data::{self, CsvOptions, DataSource, Dataset};
use reptrace_tch::{
    DeviceChoice, Error, ModelChoice, Network, ProbeSet, TraceLayers, TrainConfig, TrainSummary,
    build_model, layer_factors, train, train_on,
};
use reptrace_testkit::files::read_parquet;
use reptrace_testkit::models::{self, Conv};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

// ---------------------------------------------------------------- helpers

/// Deterministic pseudo-random numbers in [-1, 1) (no global generator).
fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap_or_else(|| panic!("column {name} has another type"))
}

/// Row `i` of a list column of `T` values.
fn list<T: ArrowPrimitiveType>(l: &ListArray, i: usize) -> Vec<T::Native> {
    l.value(i).as_primitive::<T>().values().to_vec()
}

/// Row `i` of a list<f32> column.
fn list_f32(l: &ListArray, i: usize) -> Vec<f32> {
    list::<Float32Type>(l, i)
}

/// Frobenius norm of the weight part of a record update.
fn weight_norm(layer: TracedLayer<'_>, d: &[f64]) -> f64 {
    let n: usize = layer.weight_shape().iter().product();
    d[..n].iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// One layer's `[W | b]` before and after training, and the sum of its
/// scaled records.
struct Reconstruction {
    name: String,
    w0: Vec<f64>,
    wt: Vec<f64>,
    total: Vec<f64>,
}

/// Everything the reconstruction needs, read from the run directory alone.
struct Trace {
    manifest: Manifest,
    /// Learning rate per step, from the `steps` table.
    lrs: Vec<f64>,
    /// Per traced layer: per step, the sum of the records' `[ΔW | Δb]`.
    sums: Vec<(String, Vec<Vec<f64>>)>,
    /// Update rows per layer.
    rows: HashMap<String, usize>,
    initial: HashMap<String, (Vec<usize>, Vec<f32>)>,
    final_: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Trace {
    fn read(run: &Path) -> Self {
        let manifest = Manifest::load(run).unwrap();
        let mut steps: Vec<(i64, f64)> = Vec::new();
        for f in manifest.files(Table::Steps) {
            for b in read_parquet(&run.join(&f.path)) {
                let s = col::<Int64Array>(&b, "step");
                let lr = col::<Float64Array>(&b, "lr");
                steps.extend((0..b.num_rows()).map(|i| (s.value(i), lr.value(i))));
            }
        }
        steps.sort_by_key(|s| s.0);
        for (i, (s, _)) in steps.iter().enumerate() {
            assert_eq!(*s, i as i64, "steps are 0..T without gaps");
        }
        let lrs: Vec<f64> = steps.iter().map(|s| s.1).collect();
        let mut sums = Vec::new();
        let mut rows = HashMap::new();
        for layer in manifest.model.traced_layers() {
            let len: usize = layer.weight_shape().iter().product::<usize>()
                + if layer.bias() {
                    layer.weight_shape()[0]
                } else {
                    0
                };
            let mut per_step = vec![vec![0.0f64; len]; lrs.len()];
            let mut n = 0;
            for f in manifest
                .files(Table::Updates)
                .into_iter()
                .filter(|f| f.layer.as_deref() == Some(layer.name()))
            {
                for b in read_parquet(&run.join(&f.path)) {
                    let step = col::<Int64Array>(&b, "step");
                    let u = col::<ListArray>(&b, "u");
                    let v = col::<ListArray>(&b, "v");
                    let norm = col::<Float32Array>(&b, "update_norm");
                    for i in 0..b.num_rows() {
                        let d = record_update(layer, &list_f32(u, i), &list_f32(v, i));
                        let brute = weight_norm(layer, &d);
                        let stored = f64::from(norm.value(i));
                        assert!(
                            (stored - brute).abs() <= 1e-4 * brute.max(1e-6),
                            "{}: update_norm {stored} vs {brute}",
                            layer.name()
                        );
                        let acc = &mut per_step[step.value(i) as usize];
                        for (a, x) in acc.iter_mut().zip(&d) {
                            *a += x;
                        }
                    }
                    n += b.num_rows();
                }
            }
            rows.insert(layer.name().to_owned(), n);
            sums.push((layer.name().to_owned(), per_step));
        }
        let initial = read_weights(&run.join(manifest.initial_weights().unwrap()));
        let final_ = read_weights(&run.join(layout::FINAL_WEIGHTS));
        Self {
            manifest,
            lrs,
            sums,
            rows,
            initial,
            final_,
        }
    }

    /// `[W | b]` of a layer from a snapshot, in f64.
    fn params(snapshot: &HashMap<String, (Vec<usize>, Vec<f32>)>, layer: &str) -> Vec<f64> {
        let mut p: Vec<f64> = snapshot[&format!("{layer}.weight")]
            .1
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        if let Some((_, b)) = snapshot.get(&format!("{layer}.bias")) {
            p.extend(b.iter().map(|&x| f64::from(x)));
        }
        p
    }

    fn scales(&self) -> Vec<f64> {
        if self.manifest.mode == Mode::Batch {
            // A batch-mode record is the whole displacement of its step.
            return vec![1.0; self.lrs.len()];
        }
        let o = &self.manifest.optimizer;
        displacement_scales(&self.lrs, o.momentum, o.dampening, o.nesterov)
    }

    /// Per layer: W_0, W_T and Σ_s scale_s·ΔW_s.
    fn reconstruction(&self) -> Vec<Reconstruction> {
        let scales = self.scales();
        self.sums
            .iter()
            .map(|(name, per_step)| {
                let w0 = Self::params(&self.initial, name);
                let wt = Self::params(&self.final_, name);
                let mut total = vec![0.0f64; w0.len()];
                for (s, d) in per_step.iter().enumerate() {
                    for (t, x) in total.iter_mut().zip(d) {
                        *t += scales[s] * x;
                    }
                }
                Reconstruction {
                    name: name.clone(),
                    w0,
                    wt,
                    total,
                }
            })
            .collect()
    }

    /// Replays PyTorch's SGD in f64 from W_0 with the batch gradients of
    /// the trace (`g_s = −Σ_i ΔW_{s,i}/η_s`). Returns per layer the final
    /// weights and the weights before every step.
    fn replay(&self) -> Vec<(String, Vec<f64>, Vec<Vec<f64>>)> {
        let o = &self.manifest.optimizer;
        let (mu, damp, wd) = (o.momentum, o.dampening, o.weight_decay);
        self.sums
            .iter()
            .map(|(name, per_step)| {
                let mut w = Self::params(&self.initial, name);
                let mut buf: Option<Vec<f64>> = None;
                let mut history = Vec::new();
                for (s, d) in per_step.iter().enumerate() {
                    history.push(w.clone());
                    let lr = self.lrs[s];
                    // Weight decay applies to weights and biases alike (PyTorch).
                    let g: Vec<f64> = d.iter().zip(&w).map(|(x, wi)| -x / lr + wd * wi).collect();
                    let b = match buf.take() {
                        None => g.clone(),
                        Some(b) => b
                            .iter()
                            .zip(&g)
                            .map(|(b, g)| mu * b + (1.0 - damp) * g)
                            .collect(),
                    };
                    let step: Vec<f64> = if mu == 0.0 {
                        g.clone()
                    } else if o.nesterov {
                        g.iter().zip(&b).map(|(g, b)| g + mu * b).collect()
                    } else {
                        b.clone()
                    };
                    for (wi, st) in w.iter_mut().zip(&step) {
                        *wi -= lr * st;
                    }
                    buf = Some(b);
                }
                (name.clone(), w, history)
            })
            .collect()
    }
}

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

fn diff_norm(a: &[f64], b: &[f64]) -> f64 {
    norm(a.iter().zip(b).map(|(x, y)| x - y))
}

/// Checks `W_0 + Σ scale·ΔW = W_T` (relative to ‖W_T − W_0‖) for every
/// traced layer and that the f64 replay of the optimizer ends at `W_T`.
fn assert_reconstructs(run: &Path, what: &str) -> Trace {
    let trace = Trace::read(run);
    assert_eq!(trace.manifest.status, Status::Complete);
    for Reconstruction {
        name,
        w0,
        wt,
        total,
    } in trace.reconstruction()
    {
        let moved = diff_norm(&wt, &w0);
        let recon: Vec<f64> = w0.iter().zip(&total).map(|(a, b)| a + b).collect();
        let rel = diff_norm(&recon, &wt) / moved;
        println!(
            "{what} {name}: ‖W_T − W_0‖ = {moved:.4}, reconstruction relative error {rel:.2e}"
        );
        assert!(moved > 1e-2, "{what} {name}: the layer barely moved");
        assert!(rel <= 1e-5, "{what} {name}: relative error {rel:.3e}");
    }
    if trace.manifest.mode == Mode::Batch {
        // The records are the optimizer's displacements; no SGD to replay.
        return trace;
    }
    for (name, w, _) in trace.replay() {
        let wt = Trace::params(&trace.final_, &name);
        let w0 = Trace::params(&trace.initial, &name);
        let rel = diff_norm(&w, &wt) / diff_norm(&wt, &w0);
        println!("{what} {name}: replay relative error {rel:.2e}");
        assert!(
            rel <= 1e-5,
            "{what} {name}: replay relative error {rel:.3e}"
        );
    }
    trace
}

fn quiet() -> impl FnMut(&reptrace_tch::Progress) {
    |_| {}
}

/// The device the training tests run on: `REPTRACE_TEST_DEVICE` (`cpu`
/// by default; `cuda` on a GPU machine with a build with feature `cuda`).
fn test_device() -> DeviceChoice {
    std::env::var("REPTRACE_TEST_DEVICE")
        .ok()
        .map(|d| {
            d.parse()
                .expect("REPTRACE_TEST_DEVICE: cpu, cuda or cuda:N")
        })
        .unwrap_or_default()
}

fn run_config(dir: &Path, name: &str) -> TrainConfig {
    TrainConfig {
        epochs: 2,
        out: dir.join(name),
        device: test_device(),
        ..TrainConfig::default()
    }
}

/// [`run_config`] for `name` in a fresh directory, with `changes` made; the
/// run lives as long as the returned directory.
fn fresh_config(
    name: &str,
    changes: impl FnOnce(TrainConfig) -> TrainConfig,
) -> (tempfile::TempDir, TrainConfig) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = changes(run_config(dir.path(), name));
    (dir, cfg)
}

/// A run trained from [`fresh_config`] whose trace reconstructs its final
/// weights.
struct Reconstructed {
    _dir: tempfile::TempDir,
    cfg: TrainConfig,
    summary: TrainSummary,
    trace: Trace,
}

/// Trains [`fresh_config`]`(name, changes)` and checks that its trace
/// reconstructs the final weights (`what` names the run in messages).
fn reconstructed(
    name: &str,
    what: &str,
    changes: impl FnOnce(TrainConfig) -> TrainConfig,
) -> Reconstructed {
    let (_dir, cfg) = fresh_config(name, changes);
    let summary = train(&cfg, &mut quiet()).unwrap();
    let trace = assert_reconstructs(&cfg.out, what);
    Reconstructed {
        _dir,
        cfg,
        summary,
        trace,
    }
}

/// The CNN preset with conv1 stored as factors (the storage rule picks
/// "full" for both convolutions on 8×8 digits).
fn cnn_with_factor_storage() -> ModelChoice {
    let mut m = build_model(&ModelChoice::Cnn, &[1, 8, 8], 10, &TraceLayers::All).unwrap();
    let Module::Conv2d(c) = &mut m.modules[0] else {
        panic!("conv1 first")
    };
    assert_eq!(c.storage, Storage::Full);
    c.storage = Storage::Factors;
    ModelChoice::Custom(m)
}

// ---------------------------------------------------------------- factors

/// A model with a strided, padded, dilated convolution, a bias-free
/// convolution and a linear layer.
fn factor_test_model() -> Model {
    models::model(
        "factor_test",
        vec![2, 9, 9],
        vec![
            // (9 + 2 − 2·2 − 1)/2 + 1 = 4 outputs a side.
            Conv::new("conv_a", 2, 3, [9, 9])
                .stride([2, 2])
                .dilation([2, 2])
                .module(),
            Module::Tanh,
            Conv::new("conv_b", 3, 4, [4, 4])
                .kernel([2, 3])
                .padding([0, 1])
                .bias(false)
                .storage(Storage::Full)
                .module(),
            Module::Relu,
            Module::Flatten,
            models::linear("fc", 48, 5, true),
        ],
    )
}

#[test]
fn factors_sum_to_autograd_gradients() {
    let model = build_model(
        &ModelChoice::Custom(factor_test_model()),
        &[2, 9, 9],
        5,
        &TraceLayers::All,
    )
    .unwrap();
    let device = test_device().device().unwrap();
    let net = Network::new(&model, 3, device).unwrap();
    let b = 6i64;
    let x = Tensor::from_slice(&lcg(1, (b * 2 * 81) as usize))
        .reshape([b, 2, 9, 9])
        .to_device(device);
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 1]).to_device(device);
    let (logits, taps) = net.forward(&x, true, true).unwrap();
    assert_eq!(taps.len(), 3);
    let loss = logits.cross_entropy_for_logits(&y);
    let params = net.parameters();
    let mut inputs: Vec<&Tensor> = taps.iter().map(|t| &t.output).collect();
    inputs.extend(params.iter().map(|(_, t)| t));
    let grads = Tensor::run_backward(&[&loss], &inputs, false, false);
    let (deltas, pgrads) = grads.split_at(taps.len());
    let grad_of = |name: &str| -> Vec<f64> {
        let i = params.iter().position(|(n, _)| n == name).unwrap();
        Vec::<f64>::try_from(&pgrads[i].to_kind(Kind::Double).flatten(0, -1)).unwrap()
    };
    let lr = 0.3;
    let mut checked = 0;
    for (tap, delta) in taps.iter().zip(deltas) {
        let layer = net.traced_layer(tap.module).unwrap();
        // Every storage a layer can have.
        let variants: Vec<Module> = match layer {
            TracedLayer::Linear(l) => vec![Module::Linear(l.clone())],
            TracedLayer::Conv2d(c) => [Storage::Factors, Storage::Full]
                .into_iter()
                .map(|s| {
                    Module::Conv2d(Conv2dSpec {
                        storage: s,
                        ..c.clone()
                    })
                })
                .collect(),
            other => panic!("the tch tracer does not trace {} layers", other.kind_name()),
        };
        for m in &variants {
            let layer = match m {
                Module::Linear(l) => TracedLayer::Linear(l),
                Module::Conv2d(c) => TracedLayer::Conv2d(c),
                _ => unreachable!(),
            };
            let f = layer_factors(layer, &tap.input, delta, lr)
                .unwrap()
                .to_host(Dtype::F32)
                .unwrap();
            let (FactorValues::F32(fu), FactorValues::F32(fv)) = (&f.u, &f.v) else {
                panic!("f32 factors expected");
            };
            let (u_len, v_len) = layer.factor_lens();
            assert_eq!(
                (f.u.len(), f.v.len()),
                (b as usize * u_len, b as usize * v_len)
            );
            // Linear leaves the norm to the recorder (checked against the
            // brute force on the stored rows by the recording tests above).
            assert_eq!(
                f.update_norm.is_none(),
                matches!(layer, TracedLayer::Linear(_))
            );
            let norms = f.update_norm.clone().unwrap_or_default();
            let mut sum = vec![0.0f64; 0];
            for i in 0..b as usize {
                let d = record_update(
                    layer,
                    &fu[i * u_len..(i + 1) * u_len],
                    &fv[i * v_len..(i + 1) * v_len],
                );
                let brute_norm = weight_norm(layer, &d);
                if let Some(&norm) = norms.get(i) {
                    let nerr = (f64::from(norm) - brute_norm).abs();
                    assert!(
                        nerr <= 1e-5 * brute_norm.max(1.0),
                        "{} norm {norm} vs {brute_norm}",
                        layer.name(),
                    );
                }
                if sum.is_empty() {
                    sum = vec![0.0; d.len()];
                }
                for (s, x) in sum.iter_mut().zip(&d) {
                    *s += x;
                }
            }
            let mut want: Vec<f64> = grad_of(&format!("{}.weight", layer.name()));
            if layer.bias() {
                want.extend(grad_of(&format!("{}.bias", layer.name())));
            }
            let want: Vec<f64> = want.iter().map(|g| -lr * g).collect();
            assert_eq!(sum.len(), want.len());
            let err = sum
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            let scale = want.iter().map(|x| x.abs()).fold(0.0, f64::max);
            let storage = match layer {
                TracedLayer::Conv2d(c) => format!("{:?}", c.storage),
                TracedLayer::Linear(_) => "linear".into(),
                other => other.kind_name().into(),
            };
            println!(
                "{} ({storage}): max |Σ ΔW_i − (−η·∇W)| = {err:.2e} (max |−η·∇W| = {scale:.2e})",
                layer.name()
            );
            assert!(scale > 1e-4, "gradient too small to be a test");
            assert!(
                err <= 1e-6,
                "{} ({storage}): max abs error {err:.3e}",
                layer.name()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 5);
}

// ---------------------------------------------------------------- reconstruction

#[test]
fn reconstruction_plain_sgd_mlp() {
    // The probes are read from the run below: keep its directory.
    let Reconstructed {
        _dir,
        cfg,
        summary,
        trace,
    } = reconstructed("mlp", "sgd mlp", |c| TrainConfig {
        probes: ProbeSet::All,
        ..c
    });
    assert_eq!(summary.steps, 2 * 45);
    for (layer, rows) in &trace.rows {
        assert_eq!(
            *rows,
            2 * 1437,
            "{layer}: one record per step and training instance"
        );
    }
    // Plain SGD: every scale is exactly 1.
    assert!(trace.scales().iter().all(|&s| s == 1.0));
    // Probes of both splits: a training probe is its instance, a test probe is none.
    let mut seen = vec![false; 1797];
    for f in trace
        .manifest
        .files(Table::Probes)
        .into_iter()
        .filter(|f| f.layer.as_deref() == Some("fc2"))
    {
        for b in read_parquet(&cfg.out.join(&f.path)) {
            let ids = col::<Int64Array>(&b, "probe_id");
            let inst = col::<Int64Array>(&b, "instance_id");
            for i in 0..b.num_rows() {
                let id = ids.value(i);
                seen[id as usize] = true;
                if id < 1437 {
                    assert_eq!(inst.value(i), id);
                } else {
                    assert!(inst.is_null(i));
                }
            }
        }
    }
    assert!(
        seen.iter().all(|&s| s),
        "every row of both splits is a probe"
    );
}

#[test]
fn reconstruction_momentum_mlp() {
    let Reconstructed { trace, .. } = reconstructed("momentum", "momentum mlp", |c| TrainConfig {
        momentum: 0.9,
        schedule: LrSchedule::Step {
            every_epochs: 1,
            gamma: 0.5,
        },
        ..c
    });
    // The stored learning rates follow the schedule.
    assert_eq!(trace.lrs[0], 0.1);
    assert_eq!(trace.lrs[45], 0.05);
}

#[test]
fn reconstruction_sgd_cnn_both_storages() {
    let Reconstructed { trace, .. } = reconstructed("cnn", "sgd cnn", |c| TrainConfig {
        model: cnn_with_factor_storage(),
        lr: 0.05,
        ..c
    });
    let storages: Vec<Storage> = trace
        .manifest
        .model
        .traced_layers()
        .filter_map(|l| match l {
            TracedLayer::Conv2d(c) => Some(c.storage),
            _ => None,
        })
        .collect();
    assert_eq!(storages, [Storage::Factors, Storage::Full]);
}

#[test]
fn reconstruction_nesterov_cnn_cosine() {
    let Reconstructed { trace, .. } = reconstructed("nesterov", "nesterov cnn", |c| TrainConfig {
        model: cnn_with_factor_storage(),
        lr: 0.05,
        momentum: 0.8,
        nesterov: true,
        schedule: LrSchedule::Cosine { min_lr: 0.001 },
        ..c
    });
    // λ_s/η_s checked numerically: push a unit gradient at step s through
    // the scalar Nesterov recurrence and measure the total displacement.
    let scales = trace.scales();
    for s in [0, 1, 44, 89] {
        let (mut w, mut buf) = (0.0f64, 0.0f64);
        for (t, &lr) in trace.lrs.iter().enumerate() {
            let g = if t == s { 1.0 } else { 0.0 };
            buf = if t == 0 { g } else { 0.8 * buf + g };
            w -= lr * (g + 0.8 * buf);
        }
        let lambda = -w;
        assert!(
            (scales[s] - lambda / trace.lrs[s]).abs() < 1e-9,
            "step {s}: {} vs {}",
            scales[s],
            lambda / trace.lrs[s]
        );
    }
}

#[test]
fn weight_decay_residual_is_the_decay_displacement() {
    let wd = 0.01;
    let (_dir, cfg) = fresh_config("wd", |c| TrainConfig {
        momentum: 0.9,
        weight_decay: wd,
        ..c
    });
    train(&cfg, &mut quiet()).unwrap();
    let trace = Trace::read(&cfg.out);
    let scales = trace.scales();
    let replay = trace.replay();
    for (r, (_, w_replay, history)) in trace.reconstruction().into_iter().zip(replay) {
        let Reconstruction {
            name,
            w0,
            wt,
            total,
        } = r;
        let moved = diff_norm(&wt, &w0);
        // The residual R = (W_T − W_0) − Σ scaled ΔW.
        let residual: Vec<f64> = (0..w0.len()).map(|i| wt[i] - w0[i] - total[i]).collect();
        let r = norm(residual.iter().copied());
        // Replaying SGD in f64 with the trace's gradients plus decay ends at W_T …
        let replay_err = diff_norm(&w_replay, &wt) / moved;
        // … and the decay terms of that replay, each moved by λ_s, are the residual.
        let mut decay = vec![0.0f64; w0.len()];
        for (s, w_s) in history.iter().enumerate() {
            let lambda = scales[s] * trace.lrs[s];
            for (d, w) in decay.iter_mut().zip(w_s) {
                *d -= lambda * wd * w;
            }
        }
        let rel = diff_norm(&residual, &decay) / r;
        println!(
            "wd {name}: ‖R‖/‖W_T − W_0‖ = {:.3e}, replay error {replay_err:.2e}, ‖R − decay‖/‖R‖ = {rel:.2e}",
            r / moved
        );
        assert!(
            r / moved > 1e-2,
            "{name}: weight decay must leave a residual"
        );
        assert!(
            replay_err <= 1e-5,
            "{name}: replay relative error {replay_err:.3e}"
        );
        assert!(
            rel <= 1e-3,
            "{name}: residual differs from the decay displacement by {rel:.3e}"
        );
    }
}

// ---------------------------------------------------------------- training

fn bits(summary: &TrainSummary) -> Vec<(String, Vec<u32>)> {
    summary
        .weights
        .iter()
        .map(|t| (t.name.clone(), t.data.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// Tracing must not change training: the final weights with every layer
/// traced and with none are bit-identical (same seed). On a device with
/// nondeterministic kernels (cuDNN's convolution backward on CUDA) two
/// untraced runs already differ; there, tracing may differ only if the
/// untraced runs differ among themselves, and only by as little.
#[test]
fn tracing_does_not_change_training() {
    let dir = tempfile::tempdir().unwrap();
    // An MLP and a CNN, with dropout: tracing must not consume random numbers either.
    let mut mlp = build_model(&ModelChoice::default(), &[1, 8, 8], 10, &TraceLayers::All).unwrap();
    mlp.modules.insert(3, Module::Dropout { p: 0.2 });
    let mut cnn = build_model(&ModelChoice::Cnn, &[1, 8, 8], 10, &TraceLayers::All).unwrap();
    cnn.modules.insert(4, Module::Dropout { p: 0.2 });
    for model in [mlp, cnn] {
        let name = model.name.clone();
        let base = TrainConfig {
            model: ModelChoice::Custom(model),
            epochs: 1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-3,
            probes: ProbeSet::None,
            device: test_device(),
            ..TrainConfig::default()
        };
        let run = |trace: TraceLayers, out: &str| {
            let cfg = TrainConfig {
                out: dir.path().join(out),
                trace_layers: trace,
                ..base.clone()
            };
            train(&cfg, &mut quiet()).unwrap()
        };
        let traced = run(TraceLayers::All, &format!("{name}-traced"));
        let plain = run(TraceLayers::None, &format!("{name}-plain"));
        assert!(traced.run.is_some());
        assert!(plain.run.is_none());
        assert!(
            !dir.path().join(format!("{name}-plain")).exists(),
            "nothing is recorded without traced layers"
        );
        if bits(&traced) == bits(&plain) {
            assert_eq!(traced.loss.to_bits(), plain.loss.to_bits());
            continue;
        }
        let again = run(TraceLayers::None, &format!("{name}-again"));
        let spread = max_rel_diff(&plain, &again);
        let traced_diff = max_rel_diff(&plain, &traced);
        println!(
            "{name}: untraced runs differ by {spread:.2e}, traced vs untraced by {traced_diff:.2e}"
        );
        assert!(
            bits(&plain) != bits(&again) && base.device != DeviceChoice::Cpu,
            "{name}: tracing changed the final weights on a deterministic device"
        );
        assert!(
            traced_diff <= 1e-4,
            "{name}: traced run differs by {traced_diff:.2e}"
        );
    }
}

/// Row `i` of a list<f32> or list<f16> column, widened to f32.
fn list_widened(l: &ListArray, i: usize) -> Vec<f32> {
    let v = l.value(i);
    match v.as_any().downcast_ref::<arrow_array::Float16Array>() {
        Some(h) => h.values().iter().map(|x| x.to_f32()).collect(),
        None => list_f32(l, i),
    }
}

/// (layer, step, instance id, u, v) of one `updates` row.
type UpdateRow = (String, i64, i64, Vec<f32>, Vec<f32>);

/// Every `updates` row of a run, in file order per layer: (layer, step,
/// instance id, u, v) with the values as stored, widened to f32.
fn update_rows(run: &Path) -> Vec<UpdateRow> {
    let m = Manifest::open(run).unwrap();
    let mut out = Vec::new();
    for f in m.files(Table::Updates) {
        let layer = f.layer.clone().unwrap_or_default();
        for b in read_parquet(&run.join(&f.path)) {
            let step = col::<Int64Array>(&b, "step");
            let id = col::<Int64Array>(&b, "instance_id");
            let (u, v) = (col::<ListArray>(&b, "u"), col::<ListArray>(&b, "v"));
            for i in 0..b.num_rows() {
                out.push((
                    layer.clone(),
                    step.value(i),
                    id.value(i),
                    list_widened(u, i),
                    list_widened(v, i),
                ));
            }
        }
    }
    out
}

/// The factors of a run recorded in f16 are exactly the f32 run's factors
/// rounded to f16 (round to nearest even), whoever rounds them: the recorder's
/// writer on the CPU (`half`), the device on CUDA (libtorch), where the same
/// rounding keeps the rows those of a run recorded on the CPU.
#[test]
fn f16_factors_converted_on_the_device_equal_the_recorders_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let run = |dtype: Dtype| {
        let cfg = TrainConfig {
            dtype,
            epochs: 1,
            momentum: 0.9,
            probes: ProbeSet::None,
            ..run_config(dir.path(), &format!("{dtype:?}"))
        };
        train(&cfg, &mut quiet()).unwrap();
        update_rows(&cfg.out)
    };
    let (wide, half_rows) = (run(Dtype::F32), run(Dtype::F16));
    assert_eq!(wide.len(), half_rows.len());
    assert!(wide.len() > 1000, "{} rows", wide.len());
    let round = |x: &[f32]| -> Vec<u32> {
        x.iter()
            .map(|&e| half::f16::from_f32(e).to_f32().to_bits())
            .collect()
    };
    let as_bits = |x: &[f32]| -> Vec<u32> { x.iter().map(|e| e.to_bits()).collect() };
    let mut changed = 0usize;
    for (a, b) in wide.iter().zip(&half_rows) {
        assert_eq!((&a.0, a.1, a.2), (&b.0, b.1, b.2));
        for (what, x, y) in [("u", &a.3, &b.3), ("v", &a.4, &b.4)] {
            let at = format!("{what} of {} step {} instance {}", a.0, a.1, a.2);
            assert_eq!(round(x), as_bits(y), "{at}");
        }
        changed += usize::from(as_bits(&a.4) != as_bits(&b.4));
    }
    assert!(
        changed > 0,
        "f16 rounding changed nothing: the runs were not f32 and f16"
    );
}

// ---------------------------------------------------------------- batch mode

/// `(step, members)` of the `batches` table, sorted by step.
fn batch_members(run: &Path) -> Vec<(i64, Vec<(i64, i32)>)> {
    let manifest = Manifest::load(run).unwrap();
    let mut by_step: std::collections::BTreeMap<i64, Vec<(i64, i32)>> = Default::default();
    for f in manifest.files(Table::Batches) {
        for b in read_parquet(&run.join(&f.path)) {
            let step = col::<Int64Array>(&b, "step");
            let id = col::<Int64Array>(&b, "instance_id");
            let label = col::<Int32Array>(&b, "label");
            for i in 0..b.num_rows() {
                by_step
                    .entry(step.value(i))
                    .or_default()
                    .push((id.value(i), label.value(i)));
            }
        }
    }
    by_step.into_iter().collect()
}

/// Batch mode with Adam, AdamW and SGD with momentum and weight decay: one
/// record per step and layer holds the whole update, and `W_0 + Σ ΔW_t =
/// W_T` from the trace alone (to 1e-5 of the displacement; f32 rounding of
/// each stored ΔW is the only error). The MLP and the CNN.
#[test]
fn batch_mode_reconstructs_any_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "adam-mlp",
            OptimizerKind::Adam,
            ModelChoice::default(),
            0.0,
            0.0,
        ),
        (
            "adamw-mlp",
            OptimizerKind::Adamw,
            ModelChoice::default(),
            0.0,
            0.01,
        ),
        ("adam-cnn", OptimizerKind::Adam, ModelChoice::Cnn, 0.0, 1e-3),
        (
            "sgd-mlp",
            OptimizerKind::Sgd,
            ModelChoice::default(),
            0.9,
            1e-3,
        ),
    ];
    for (name, optimizer, model, momentum, weight_decay) in cases {
        let cfg = TrainConfig {
            model,
            optimizer,
            momentum,
            weight_decay,
            lr: if optimizer == OptimizerKind::Sgd {
                0.05
            } else {
                0.01
            },
            mode: Mode::Batch,
            batch_size: 64,
            probes: ProbeSet::None,
            ..run_config(dir.path(), name)
        };
        let summary = train(&cfg, &mut quiet()).unwrap();
        let trace = assert_reconstructs(&cfg.out, name);
        assert_eq!(trace.manifest.mode, Mode::Batch);
        assert_eq!(trace.manifest.optimizer.kind, optimizer);
        for (layer, rows) in &trace.rows {
            assert_eq!(*rows, summary.steps, "{name} {layer}: one record per step");
        }
        let members = batch_members(&cfg.out);
        assert_eq!(
            members.len(),
            summary.steps,
            "{name}: batches of every step"
        );
        for epoch in 0..2 {
            let per = 1437usize.div_ceil(64);
            let mut ids: Vec<i64> = members[epoch * per..(epoch + 1) * per]
                .iter()
                .flat_map(|(_, m)| m.iter().map(|x| x.0))
                .collect();
            ids.sort_unstable();
            assert_eq!(ids, (0..1437).collect::<Vec<_>>(), "{name}: epoch {epoch}");
        }
        if optimizer != OptimizerKind::Sgd {
            assert!(
                summary.test_accuracy.unwrap() > 0.7,
                "{name}: test accuracy {:?}",
                summary.test_accuracy
            );
        }
    }
}

/// The same seed trains the same network in both modes (the optimizer step
/// is the same; batch mode only records differently), also with class-pure
/// batches, and every class-pure batch holds one class.
#[test]
fn batch_mode_trains_like_instance_mode_and_class_pure_batches_are_pure() {
    let dir = tempfile::tempdir().unwrap();
    for pure in [false, true] {
        let run = |mode: Mode, out: &str| {
            let cfg = TrainConfig {
                mode,
                class_pure_batches: pure,
                epochs: 1,
                momentum: 0.9,
                probes: ProbeSet::None,
                ..run_config(dir.path(), out)
            };
            (train(&cfg, &mut quiet()).unwrap(), cfg.out)
        };
        let (inst, _) = run(Mode::Instance, &format!("instance-{pure}"));
        let (batch, out) = run(Mode::Batch, &format!("batch-{pure}"));
        assert_eq!(bits(&inst), bits(&batch), "class-pure {pure}");
        assert_eq!(inst.steps, batch.steps);
        let members = batch_members(&out);
        let labels = |m: &Vec<(i64, i32)>| {
            let mut l: Vec<i32> = m.iter().map(|x| x.1).collect();
            l.dedup();
            l.len()
        };
        let mixed = members.iter().filter(|(_, m)| labels(m) > 1).count();
        if pure {
            assert_eq!(mixed, 0, "every class-pure batch holds one class");
            // Σ ⌈n_c / 32⌉ over the classes, more than ⌈1437 / 32⌉.
            assert!(batch.steps > 1437usize.div_ceil(32), "{}", batch.steps);
        } else {
            assert!(mixed > 0);
        }
    }
}

/// BatchNorm couples a batch's examples: instance mode refuses it when it
/// records, batch mode traces the model around it (class-pure batches,
/// Adam): the traced layers reconstruct, the network learns, recording does
/// not change training, and the snapshots hold the batch norm parameters.
#[test]
fn batch_norm_trains_in_batch_mode_and_is_refused_in_instance_mode() {
    let dir = tempfile::tempdir().unwrap();
    let base = TrainConfig {
        model: ModelChoice::CnnBatchNorm,
        optimizer: OptimizerKind::Adam,
        lr: 0.01,
        mode: Mode::Batch,
        class_pure_batches: true,
        batch_size: 64,
        probes: ProbeSet::None,
        ..run_config(dir.path(), "bn")
    };
    let refused = TrainConfig {
        mode: Mode::Instance,
        optimizer: OptimizerKind::Sgd,
        lr: 0.1,
        out: dir.path().join("refused"),
        ..base.clone()
    };
    match train(&refused, &mut quiet()) {
        Err(e @ Error::CouplingModule { .. }) => {
            assert!(e.to_string().contains("--mode batch"), "{e}")
        }
        other => panic!("instance mode with batch norm: {other:?}"),
    }
    assert!(!refused.out.exists(), "nothing recorded when refused");

    let summary = train(&base, &mut quiet()).unwrap();
    let trace = assert_reconstructs(&base.out, "adam cnn-bn");
    assert_eq!(
        trace
            .rows
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        ["conv1", "conv2", "fc"].map(String::from).into(),
    );
    for name in ["bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"] {
        let (i, f) = (&trace.initial[name].1, &trace.final_[name].1);
        assert_ne!(i, f, "{name} is trained");
    }
    let accuracy = summary.test_accuracy.unwrap();
    assert!(accuracy > 0.8, "test accuracy {accuracy}");
    let plain = train(
        &TrainConfig {
            trace_layers: TraceLayers::None,
            out: dir.path().join("plain"),
            ..base.clone()
        },
        &mut quiet(),
    )
    .unwrap();
    assert_eq!(bits(&summary), bits(&plain), "recording changed training");
}

/// Largest ‖a − b‖/‖a‖ over the parameter tensors of two runs.
fn max_rel_diff(a: &TrainSummary, b: &TrainSummary) -> f64 {
    a.weights
        .iter()
        .zip(&b.weights)
        .map(|(x, y)| {
            let d = norm(x.data.iter().zip(&y.data).map(|(p, q)| f64::from(p - q)));
            d / norm(x.data.iter().map(|&p| f64::from(p)))
        })
        .fold(0.0, f64::max)
}

#[test]
fn demo_settings_reach_90_percent_with_probes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        device: test_device(),
        ..TrainConfig::demo(dir.path().join("demo"))
    };
    let mut epochs_seen = 0;
    let summary = train(&cfg, &mut |p| {
        if let reptrace_tch::Progress::Epoch(e) = p {
            assert_eq!(e.epoch, epochs_seen);
            epochs_seen += 1;
        }
    })
    .unwrap();
    assert_eq!(epochs_seen, 20);
    let acc = summary.test_accuracy.unwrap();
    println!(
        "demo: test accuracy {acc:.4}, train accuracy {:.4}",
        summary.train_accuracy
    );
    assert!(acc >= 0.9, "test accuracy {acc}");
    let (run, manifest) = summary.run.as_ref().unwrap();
    assert_eq!(manifest.status, Status::Complete);
    // Initial weights, one snapshot per epoch end, final.
    assert_eq!(
        manifest
            .commits
            .iter()
            .filter(|c| c.weights.is_some())
            .count(),
        1 + 20 + 1
    );

    // Probes of fc1: a is the test image, p = (W_T − W_0)a + (b_T − b_0),
    // recomputed here from the snapshots; predictions give the accuracy.
    let digits = data::digits().unwrap();
    let w0 = read_weights(&run.join(manifest.initial_weights().unwrap()));
    let wt = read_weights(&run.join(layout::FINAL_WEIGHTS));
    let (dw, db): (Vec<f64>, Vec<f64>) = (
        wt["fc1.weight"]
            .1
            .iter()
            .zip(&w0["fc1.weight"].1)
            .map(|(a, b)| f64::from(*a) - f64::from(*b))
            .collect(),
        wt["fc1.bias"]
            .1
            .iter()
            .zip(&w0["fc1.bias"].1)
            .map(|(a, b)| f64::from(*a) - f64::from(*b))
            .collect(),
    );
    let (mut probes, mut correct, mut max_err) = (0, 0, 0.0f64);
    for f in manifest
        .files(Table::Probes)
        .into_iter()
        .filter(|f| f.layer.as_deref() == Some("fc1"))
    {
        for b in read_parquet(&run.join(&f.path)) {
            let ids = col::<Int64Array>(&b, "probe_id");
            let inst = col::<Int64Array>(&b, "instance_id");
            let label = col::<Int32Array>(&b, "label");
            let pred = col::<Int32Array>(&b, "predicted");
            let a = col::<ListArray>(&b, "a");
            let p = col::<ListArray>(&b, "p");
            for i in 0..b.num_rows() {
                let row = ids.value(i) as usize;
                assert!(row >= digits.n_train, "default probes are the test split");
                assert!(inst.is_null(i), "test probes are not training instances");
                assert_eq!(label.value(i), digits.labels[row]);
                let a = list::<Float64Type>(a, i);
                let want_a: Vec<f64> = digits.row(row).iter().map(|&x| f64::from(x)).collect();
                assert_eq!(a, want_a);
                let p = list::<Float64Type>(p, i);
                for o in 0..32 {
                    let want = db[o] + (0..64).map(|k| dw[o * 64 + k] * a[k]).sum::<f64>();
                    max_err = max_err.max((p[o] - want).abs());
                }
                correct += usize::from(pred.value(i) == label.value(i));
                probes += 1;
            }
        }
    }
    assert_eq!(probes, 360);
    assert!(max_err < 1e-9, "probe p differs by {max_err:e}");
    assert!((correct as f64 / 360.0 - acc).abs() < 1e-12);
}

#[test]
fn non_finite_loss_aborts_and_keeps_good_steps() {
    let (_dir, cfg) = fresh_config("nan", |c| TrainConfig {
        lr: 1e30,
        momentum: 0.0,
        ..c
    });
    let err = train(&cfg, &mut quiet()).unwrap_err();
    let Error::NonFiniteLoss { step, .. } = err else {
        panic!("expected a non-finite loss error, got {err}")
    };
    assert!(err.to_string().contains("non-finite loss"));
    let m = Manifest::load(&cfg.out).unwrap();
    assert_eq!(m.status, Status::Aborted);
    assert!(
        m.abort_reason
            .as_deref()
            .unwrap_or("")
            .contains("non-finite loss")
    );
    // Every step before the bad one is committed, and nothing after it.
    assert_eq!(m.last_step().map(|s| s.0), Some(step - 1));
    let trace_rows: usize = m.files(Table::Steps).iter().map(|f| f.rows as usize).sum();
    assert_eq!(trace_rows as i64, step);
}

#[test]
fn bad_settings_name_the_setting() {
    let cases: [(&str, TrainConfig); 7] = [
        (
            "optimizer",
            TrainConfig {
                optimizer: OptimizerKind::Other,
                ..TrainConfig::default()
            },
        ),
        (
            "momentum",
            TrainConfig {
                optimizer: OptimizerKind::Adamw,
                mode: Mode::Batch,
                momentum: 0.9,
                ..TrainConfig::default()
            },
        ),
        (
            "betas",
            TrainConfig {
                optimizer: OptimizerKind::Adam,
                mode: Mode::Batch,
                betas: [0.9, 1.0],
                ..TrainConfig::default()
            },
        ),
        (
            "lr",
            TrainConfig {
                lr: -1.0,
                ..TrainConfig::default()
            },
        ),
        (
            "epochs",
            TrainConfig {
                epochs: 0,
                ..TrainConfig::default()
            },
        ),
        (
            "nesterov",
            TrainConfig {
                momentum: 0.0,
                nesterov: true,
                ..TrainConfig::default()
            },
        ),
        (
            "momentum",
            TrainConfig {
                momentum: 1.5,
                ..TrainConfig::default()
            },
        ),
    ];
    for (setting, cfg) in cases {
        match cfg.validate() {
            Err(Error::BadSetting { setting: s, .. }) => assert_eq!(s, setting),
            other => panic!("{setting}: {other:?}"),
        }
    }
    let data = data::digits().unwrap();
    let err = train_on(
        &TrainConfig {
            model: ModelChoice::Custom(factor_test_model()),
            ..TrainConfig::default()
        },
        &data,
        &mut quiet(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("expects [2, 9, 9] inputs"),
        "{err}"
    );
}

// ---------------------------------------------------------------- data

#[test]
fn digits_rows_and_split() {
    let d = data::digits().unwrap();
    assert_eq!(
        (d.len(), d.n_train, d.n_test(), d.dim()),
        (1797, 1437, 360, 64)
    );
    assert_eq!(d.shape, [1, 8, 8]);
    assert_eq!(d.classes.len(), 10);
    assert!(d.features.iter().all(|&x| (0.0..=1.0).contains(&x)));
    // First row of the file: 0,0,5,13,9,1,0,0,… label 0.
    assert_eq!(&d.row(0)[..4], &[0.0, 0.0, 5.0 / 16.0, 13.0 / 16.0]);
    assert_eq!(d.labels[0], 0);
    let mut counts = [0usize; 10];
    for &l in &d.labels {
        counts[l as usize] += 1;
    }
    assert!(counts.iter().all(|&c| c > 150), "{counts:?}");
}

fn write_file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A small generated data set: 10 rows of 6 features, 3 classes.
fn generated() -> (Vec<Vec<f32>>, Vec<i32>) {
    let x = lcg(9, 60);
    let rows = x
        .chunks(6)
        .map(|r| r.iter().map(|v| (v * 100.0).round() / 4.0).collect())
        .collect();
    let labels = (0..10).map(|i| i * 7 % 3).collect();
    (rows, labels)
}

#[test]
fn csv_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, labels) = generated();
    // Header, label first, gzipped, shape 1x2x3, scale 0.5, last 3 rows test.
    let mut text = String::from("y,a,b,c,d,e,f\n");
    for (r, l) in rows.iter().zip(&labels) {
        let f: Vec<String> = r.iter().map(|v| v.to_string()).collect();
        text.push_str(&format!("{l},{}\n", f.join(",")));
    }
    write_file(dir.path(), "d.csv.gz", &gzip(text.as_bytes()));
    let spec = format!(
        "csv:{}?label=y&shape=1x2x3&scale=0.5&test=3",
        dir.path().join("d.csv.gz").display()
    );
    let d: Dataset = spec.parse::<DataSource>().unwrap().load().unwrap();
    assert_eq!(
        (d.len(), d.n_train, d.shape.clone()),
        (10, 7, vec![1, 2, 3])
    );
    assert_eq!(d.labels, labels);
    assert_eq!(d.classes.len(), 3);
    for (i, r) in rows.iter().enumerate() {
        let want: Vec<f32> = r.iter().map(|v| v * 0.5).collect();
        assert_eq!(d.row(i), &want[..]);
    }
    // No header, label last, default 20 % test split.
    let mut plain = String::new();
    for (r, l) in rows.iter().zip(&labels) {
        let f: Vec<String> = r.iter().map(|v| v.to_string()).collect();
        plain.push_str(&format!("{},{l}\n", f.join(",")));
    }
    let p = write_file(dir.path(), "p.csv", plain.as_bytes());
    let d2 = data::parse_csv(plain.as_bytes(), &p, &CsvOptions::default()).unwrap();
    assert_eq!((d2.n_train, d2.shape.clone()), (8, vec![6]));
    assert_eq!(d2.features, rows.concat());
}

#[test]
fn csv_bad_rows_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "ragged.csv",
            "1,2,0\n3,4,1\n5,1\n",
            ":3:",
            "expected 3 fields",
        ),
        ("text.csv", "1,2,0\n3,x,1\n", ":2:", "not a number"),
        ("label.csv", "1,2,0\n\n3,4,1.5\n", ":3:", "out of range"),
        ("negative.csv", "1,2,-1\n", ":1:", "out of range"),
        (
            "classes.csv?classes=2",
            "1,2,0\n1,2,2\n",
            ":2:",
            "out of range 0..2",
        ),
    ];
    for (name, content, line, what) in cases {
        let file = name.split('?').next().unwrap();
        let path = write_file(dir.path(), file, content.as_bytes());
        let query = name
            .split_once('?')
            .map(|(_, q)| format!("?{q}"))
            .unwrap_or_default();
        let spec = format!("csv:{}{query}", path.display());
        let err = spec
            .parse::<DataSource>()
            .unwrap()
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{}{line}", path.display())),
            "{name}: {err}"
        );
        assert!(err.contains(what), "{name}: {err}");
    }
}

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend(d.to_be_bytes());
    }
    out.extend(data);
    out
}

#[test]
fn idx_round_trip_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 37 % 256) as u8).collect();
    let test_pixels: Vec<u8> = (0..2 * 4 * 3).map(|i| (i * 11 % 256) as u8).collect();
    write_file(
        dir.path(),
        "train-images-idx3-ubyte.gz",
        &gzip(&idx(&[5, 4, 3], &pixels)),
    );
    write_file(
        dir.path(),
        "train-labels-idx1-ubyte",
        &idx(&[5], &[0, 1, 2, 1, 0]),
    );
    write_file(
        dir.path(),
        "t10k-images-idx3-ubyte",
        &idx(&[2, 4, 3], &test_pixels),
    );
    write_file(
        dir.path(),
        "t10k-labels-idx1-ubyte.gz",
        &gzip(&idx(&[2], &[2, 0])),
    );
    let d = format!("idx:{}", dir.path().display())
        .parse::<DataSource>()
        .unwrap()
        .load()
        .unwrap();
    assert_eq!((d.len(), d.n_train, d.shape.clone()), (7, 5, vec![1, 4, 3]));
    assert_eq!(d.labels, [0, 1, 2, 1, 0, 2, 0]);
    assert_eq!(d.classes.len(), 3);
    let want: Vec<f32> = pixels
        .iter()
        .chain(&test_pixels)
        .map(|&p| f32::from(p) / 255.0)
        .collect();
    assert_eq!(d.features, want);

    // A truncated image file and a label count that disagrees.
    write_file(
        dir.path(),
        "t10k-images-idx3-ubyte",
        &idx(&[2, 4, 3], &test_pixels[..20]),
    );
    let err = data::load_idx(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("t10k-images-idx3-ubyte") && err.contains("file has 20"),
        "{err}"
    );
    write_file(
        dir.path(),
        "t10k-images-idx3-ubyte",
        &idx(&[2, 4, 3], &test_pixels),
    );
    write_file(dir.path(), "t10k-labels-idx1-ubyte", &idx(&[3], &[2, 0, 1]));
    let err = data::load_idx(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("t10k-labels-idx1-ubyte") && err.contains("3 labels for 2 images"),
        "{err}"
    );
}
