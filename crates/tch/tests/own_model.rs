//! The tracing API on a model of the user's own (the `own_model` example: a
//! residual block, tch's own SGD with momentum, the user's loop), and the
//! built-in loop as a user of the same tracer.
//!
//! - The example's trace reconstructs `W_T` from `W_0` through the
//!   completeness identity (`reptrace_analyze::verify`), and its records at
//!   step 0 equal `−η/B` times each example's own gradient from autograd.
//! - Training with the tracer is bit-identical to training without it.
//! - The built-in loop records, bit for bit, the factors one backward pass
//!   through the network gives (the path it took before it used the tracer).
mod common;
#[allow(dead_code)]
#[path = "../examples/own_model.rs"]
mod own_model;

use arrow_array::{Array, Float32Array, Int64Array, ListArray};
use common::{read_weights, record_update};
use own_model::{ResidualNet, Settings};
use reptrace_format::{Manifest, Module, Table};
use reptrace_tch::trace::Tracer;
use reptrace_tch::{Dataset, ModelChoice, Network, TrainConfig, layer_factors, train};
use reptrace_testkit::files::read_parquet;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use tch::nn::ModuleT;
use tch::{Kind, Tensor, nn};

/// libtorch's global generator (`manual_seed`, the default initialisation
/// of `nn::linear`/`conv2d`, `randn`) is one per process and the test
/// harness runs tests on several threads: a test that seeds it and then
/// draws from it would draw what another test's seed set. The tests of
/// this file take turns.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// (step, instance id, u, v) of each `updates` row, per layer.
type Rows = HashMap<String, Vec<(i64, i64, Vec<f32>, Vec<f32>)>>;

fn update_rows(run: &Path) -> Rows {
    let m = Manifest::open(run).unwrap();
    let mut out: Rows = HashMap::new();
    for f in m.files(Table::Updates) {
        let layer = f.layer.clone().unwrap();
        for b in read_parquet(&run.join(&f.path)) {
            let col = |n: &str| b.column_by_name(n).unwrap().clone();
            let step = col("step");
            let step = step.as_any().downcast_ref::<Int64Array>().unwrap();
            let id = col("instance_id");
            let id = id.as_any().downcast_ref::<Int64Array>().unwrap();
            let list = |n: &str, i: usize| -> Vec<f32> {
                let c = col(n);
                let l = c.as_any().downcast_ref::<ListArray>().unwrap().value(i);
                l.as_any()
                    .downcast_ref::<Float32Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            };
            for i in 0..b.num_rows() {
                out.entry(layer.clone()).or_default().push((
                    step.value(i),
                    id.value(i),
                    list("u", i),
                    list("v", i),
                ));
            }
        }
    }
    out
}

/// `verify` on `run`, checked to pass: its completeness checks of the weights.
fn weight_completeness(run: &Path) -> Vec<reptrace_analyze::verify::Check> {
    let report = reptrace_analyze::verify::verify(run, &Default::default()).unwrap();
    assert!(report.passed(), "{:?}", report.checks);
    report
        .checks
        .into_iter()
        .filter(|c| c.name.starts_with("completeness") && c.name.ends_with("weights"))
        .collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[test]
fn own_model_reconstructs_and_records_each_examples_gradient() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("own");
    let settings = Settings {
        epochs: 2,
        out: Some(run.clone()),
        ..Settings::default()
    };
    let (_, accuracy) = own_model::train(&settings).unwrap();
    assert!(accuracy > 0.8, "the residual net learns ({accuracy})");

    // Completeness: W_0 plus the records (momentum replayed) is W_T, and
    // every probe's refinement is (W_T − W_0) applied to its input.
    let completeness = weight_completeness(&run);
    assert_eq!(completeness.len(), 4, "{completeness:?}");
    for c in completeness {
        let error = c.value.unwrap();
        assert!(error <= 1e-5, "{}: relative error {error:.2e}", c.name);
    }

    // Step 0's records against autograd, one example at a time, from W_0.
    let manifest = Manifest::open(&run).unwrap();
    let initial = read_weights(&run.join("weights/initial.safetensors"));
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let mut plain = Tracer::new();
    let net = ResidualNet::new(&vs.root(), &mut plain).unwrap();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let (shape, data) = &initial[&name];
            let shape: Vec<i64> = shape.iter().map(|&s| s as i64).collect();
            var.copy_(&Tensor::from_slice(data).reshape(&shape));
        }
    });
    let data = reptrace_tch::data::digits().unwrap();
    let rows = update_rows(&run);
    let batch: Vec<i64> = rows["head"]
        .iter()
        .filter(|r| r.0 == 0)
        .map(|r| r.1)
        .collect();
    assert_eq!(batch.len(), settings.batch_size);
    let scale = -settings.lr / batch.len() as f64;
    let mut worst = 0.0f64;
    for &id in &batch {
        let r = id as usize;
        let x = Tensor::from_slice(&data.features[r * 64..(r + 1) * 64]).reshape([1, 1, 8, 8]);
        let y = Tensor::from_slice(&[i64::from(data.labels[r])]);
        // The run names the weights as the VarStore does (`block.a.weight`).
        let vars: HashMap<String, Tensor> = vs.variables();
        for v in vars.values() {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        net.forward_t(&x, true)
            .cross_entropy_for_logits(&y)
            .backward();
        for layer in manifest.model.traced_layers() {
            let name = layer.name();
            let mut want: Vec<f64> = Vec::new();
            for p in ["weight", "bias"] {
                let g = vars[&format!("{name}.{p}")]
                    .grad()
                    .flatten(0, -1)
                    .to_kind(Kind::Double);
                want.extend(
                    Vec::<f64>::try_from(&g)
                        .unwrap()
                        .into_iter()
                        .map(|x| x * scale),
                );
            }
            let (_, _, u, v) = rows[name]
                .iter()
                .find(|row| row.0 == 0 && row.1 == id)
                .unwrap();
            let got = record_update(layer, u, v);
            assert_eq!(got.len(), want.len(), "{name}");
            let diff: Vec<f64> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
            let rel = norm(&diff) / norm(&want).max(1e-12);
            worst = worst.max(rel);
            assert!(
                rel <= 1e-4,
                "{name}, instance {id}: relative difference {rel:.2e}"
            );
        }
    }
    println!("step 0: records vs per-example autograd, worst relative difference {worst:.2e}");

    // The example's query runs on the run.
    let table = own_model::query(&run, data.n_train as i64).unwrap();
    assert!(
        table.contains("block.a") && table.contains("head"),
        "{table}"
    );
}

#[test]
fn own_model_training_is_bit_identical_with_and_without_tracing() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let traced = Settings {
        epochs: 1,
        out: Some(tmp.path().join("own")),
        ..Settings::default()
    };
    let plain = Settings {
        out: None,
        ..traced.clone()
    };
    let bits = |params: Vec<(String, Tensor)>| -> Vec<(String, Vec<u32>)> {
        params
            .into_iter()
            .map(|(n, t)| {
                let v = Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap();
                (n, v.into_iter().map(f32::to_bits).collect())
            })
            .collect()
    };
    let with = bits(own_model::train(&traced).unwrap().0);
    let without = bits(own_model::train(&plain).unwrap().0);
    assert_eq!(with.len(), 8);
    assert!(with == without, "tracing changed the trained weights");
}

/// The built-in loop's records are, bit for bit, the factors built from one
/// backward pass through the network for the taps' outputs (how the loop
/// got them before it recorded through the tracer), for a CNN at step 0.
#[test]
fn built_in_loop_records_the_factors_of_one_backward_pass() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        model: ModelChoice::Cnn,
        epochs: 1,
        lr: 0.07,
        seed: 11,
        out: tmp.path().join("cnn"),
        ..TrainConfig::default()
    };
    train(&config, &mut |_| {}).unwrap();
    let run = &config.out;
    let manifest = Manifest::open(run).unwrap();
    let rows = update_rows(run);
    let data = reptrace_tch::data::digits().unwrap();
    let batch: Vec<i64> = rows["fc"]
        .iter()
        .filter(|r| r.0 == 0)
        .map(|r| r.1)
        .collect();

    let net = Network::new(&manifest.model, config.seed as i64, tch::Device::Cpu).unwrap();
    let x = Tensor::from_slice(&data.features).reshape([data.labels.len() as i64, 1, 8, 8]);
    let index = Tensor::from_slice(&batch);
    let x = x.index_select(0, &index);
    let labels: Vec<i64> = batch
        .iter()
        .map(|&r| i64::from(data.labels[r as usize]))
        .collect();
    let y = Tensor::from_slice(&labels);
    let (logits, taps) = net.forward(&x, true, true).unwrap();
    let loss = logits.log_softmax(-1, Kind::Float).nll_loss(&y);
    let outputs: Vec<&Tensor> = taps.iter().map(|t| &t.output).collect();
    let deltas = Tensor::run_backward(&[&loss], &outputs, false, false);
    let mut layers = 0;
    for (tap, delta) in taps.iter().zip(&deltas) {
        let layer = net.traced_layer(tap.module).unwrap();
        let f = layer_factors(layer, &tap.input, delta, config.lr)
            .unwrap()
            .to_host(reptrace_format::Dtype::F32)
            .unwrap();
        let (reptrace_record::FactorValues::F32(u), reptrace_record::FactorValues::F32(v)) =
            (f.u, f.v)
        else {
            panic!("f32 factors");
        };
        let recorded: Vec<&(i64, i64, Vec<f32>, Vec<f32>)> =
            rows[layer.name()].iter().filter(|r| r.0 == 0).collect();
        let (ul, vl) = (u.len() / batch.len(), v.len() / batch.len());
        for (i, r) in recorded.iter().enumerate() {
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(r.1, batch[i]);
            assert!(
                bits(&r.2) == bits(&u[i * ul..(i + 1) * ul])
                    && bits(&r.3) == bits(&v[i * vl..(i + 1) * vl]),
                "{}: instance {} differs",
                layer.name(),
                r.1
            );
        }
        layers += 1;
    }
    assert_eq!(layers, 3);
    let conv = manifest
        .model
        .modules
        .iter()
        .any(|m| matches!(m, Module::Conv2d(_)));
    assert!(conv);
}

/// A small MLP of the test's own, batch mode, tch's Adam: the run verifies
/// (each record is the whole update of its step).
#[test]
fn any_optimizer_in_batch_mode() {
    let _serial = serial();
    use reptrace_format::{Mode, Optimizer, OptimizerKind};
    use reptrace_tch::trace::{RunSpec, Step};
    use tch::nn::{Module, OptimizerConfig};
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("adam");
    let data = reptrace_tch::data::digits().unwrap();
    tch::manual_seed(3);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let mut tracer = Tracer::new();
    let model = digits_mlp(&mut tracer, &vs, Tensor::tanh);
    let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
    tracer
        .record(RunSpec {
            mode: Mode::Batch,
            optimizer: Optimizer {
                kind: OptimizerKind::Adam,
                betas: Some([0.9, 0.999]),
                eps: Some(1e-8),
                ..Optimizer::sgd(1e-2)
            },
            ..RunSpec::sgd(&run, data.classes.clone(), 1e-2)
        })
        .unwrap();
    let x_all = digits_inputs(&data);
    for step in 0..30i64 {
        let (ids, labels, x, y) = digits_batch(&data, &x_all, step, 16);
        opt.zero_grad();
        let logits = model.forward(&x);
        let loss = logits.cross_entropy_for_logits(&y);
        loss.backward();
        let s = Step {
            loss: &loss,
            ids: &ids,
            labels: &labels,
            lr: 1e-2,
            momentum: None,
            logits: None,
        };
        tracer.step(&s, || opt.step()).unwrap();
        if step % 10 == 9 {
            tracer.end_epoch().unwrap();
        }
    }
    let manifest = tracer.finish(None).unwrap();
    assert_eq!(manifest.mode, Mode::Batch);
    let weights = weight_completeness(&run);
    assert_eq!(weights.len(), 2, "{weights:?}");
    assert!(weights.iter().all(|c| c.value.unwrap() <= 1e-5));
}

/// Misuse of the tracer is one clear error naming what is wrong, and the
/// run stays readable up to its last commit.
#[test]
fn tracer_misuse_is_one_clear_error() {
    let _serial = serial();
    use reptrace_format::{Optimizer, OptimizerKind};
    use reptrace_tch::trace::{RunSpec, Step};
    use tch::nn::Module;
    let tmp = tempfile::tempdir().unwrap();
    let classes: Vec<String> = vec!["a".into(), "b".into()];
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let mut tracer = Tracer::new();
    let fc = tracer
        .linear(vs.root() / "fc", 3, 2, Default::default())
        .unwrap();
    let err = tracer
        .linear(vs.root() / "fc", 3, 2, Default::default())
        .unwrap_err();
    assert!(err.to_string().contains("traced twice"), "{err}");

    // An optimizer other than SGD, Adam and AdamW in instance mode.
    let err = tracer
        .record(RunSpec {
            optimizer: Optimizer {
                kind: OptimizerKind::Other,
                ..Optimizer::sgd(0.1)
            },
            ..RunSpec::sgd(tmp.path().join("r"), classes.clone(), 0.1)
        })
        .unwrap_err();
    assert!(err.to_string().contains("batch mode"), "{err}");
    // A run directory that is not empty.
    std::fs::write(tmp.path().join("full"), b"x").unwrap();
    let err = tracer
        .record(RunSpec::sgd(tmp.path(), classes.clone(), 0.1))
        .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");

    let run = tmp.path().join("run");
    tracer.record(RunSpec::sgd(&run, classes, 0.1)).unwrap();
    let x = Tensor::ones([2, 3], tch::kind::FLOAT_CPU);
    let y = Tensor::from_slice(&[0i64, 1]);
    fn step<'a>(loss: &'a Tensor, ids: &'a [i64]) -> Step<'a> {
        Step {
            loss,
            ids,
            labels: &[0, 1],
            lr: 0.1,
            momentum: None,
            logits: None,
        }
    }
    // Two forward passes with gradients before a step.
    let _ = fc.forward(&x);
    let loss = fc.forward(&x).cross_entropy_for_logits(&y);
    loss.backward();
    let err = tracer.step(&step(&loss, &[0, 1]), || ()).unwrap_err();
    assert!(err.to_string().contains("ran 2 times"), "{err}");
    // No backward before the step.
    let loss = fc.forward(&x).cross_entropy_for_logits(&y);
    let err = tracer.step(&step(&loss, &[0, 1]), || ()).unwrap_err();
    assert!(err.to_string().contains("loss.backward()"), "{err}");
    // Ids that do not fit the batch.
    let loss = fc.forward(&x).cross_entropy_for_logits(&y);
    loss.backward();
    let err = tracer.step(&step(&loss, &[0]), || ()).unwrap_err();
    assert!(err.to_string().contains("1 ids for a batch of 2"), "{err}");
    // A label outside the classes.
    let loss = fc.forward(&x).cross_entropy_for_logits(&y);
    loss.backward();
    let s = Step {
        labels: &[0, 2],
        ..step(&loss, &[0, 1])
    };
    let err = tracer.step(&s, || ()).unwrap_err();
    assert!(err.to_string().contains("label 2 is not in 0..2"), "{err}");
    // Inputs that are not (batch, features).
    let loss = fc
        .forward(&Tensor::ones([2, 1, 3], tch::kind::FLOAT_CPU))
        .sum(Kind::Float);
    loss.backward();
    let err = tracer.step(&step(&loss, &[0, 1]), || ()).unwrap_err();
    assert!(
        err.to_string().contains("traced for (batch, 3) inputs"),
        "{err}"
    );
    assert!(
        !run.exists(),
        "nothing is written before a step is accepted"
    );
    // A good step, a commit, then a non-finite loss: aborted, readable. The
    // refused steps' backward passes left gradients behind; zeroed, as a
    // loop does before each step (the check compares .grad with the step's
    // records).
    let zero_grads = || {
        for mut v in vs.trainable_variables() {
            v.zero_grad();
        }
    };
    zero_grads();
    let loss = fc.forward(&x).cross_entropy_for_logits(&y);
    loss.backward();
    tracer.step(&step(&loss, &[0, 1]), || ()).unwrap();
    zero_grads();
    tracer.commit().unwrap();
    let loss = fc.forward(&x).sum(Kind::Float) * f64::NAN;
    loss.backward();
    let err = tracer.step(&step(&loss, &[0, 1]), || ()).unwrap_err();
    assert!(err.to_string().contains("non-finite loss"), "{err}");
    let m = Manifest::open(&run).unwrap();
    assert_eq!(m.status, reptrace_format::Status::Aborted);
    assert_eq!(update_rows(&run)["fc"].len(), 2, "the committed step stays");
}

/// A 64-16-10 digits MLP on `vs`: traced linear layers `fc1` and `fc2` with
/// `act` between.
fn digits_mlp(
    tracer: &mut Tracer,
    vs: &nn::VarStore,
    act: fn(&Tensor) -> Tensor,
) -> nn::Sequential {
    let [fc1, fc2] = [("fc1", 64, 16), ("fc2", 16, 10)].map(|(name, inputs, outputs)| {
        tracer
            .linear(vs.root() / name, inputs, outputs, Default::default())
            .unwrap()
    });
    nn::seq().add(fc1).add_fn(act).add(fc2)
}

/// Every digits row's features, as one `[rows, 64]` tensor.
fn digits_inputs(data: &Dataset) -> Tensor {
    Tensor::from_slice(&data.features).reshape([data.labels.len() as i64, 64])
}

/// Training batch `step` of `size` digits rows taken in order, wrapping
/// around: the ids, labels, inputs (rows of `x_all`) and int64 targets.
fn digits_batch(
    data: &Dataset,
    x_all: &Tensor,
    step: i64,
    size: i64,
) -> (Vec<i64>, Vec<i32>, Tensor, Tensor) {
    let ids: Vec<i64> = (0..size)
        .map(|i| (step * size + i) % data.n_train as i64)
        .collect();
    let labels: Vec<i32> = ids.iter().map(|&r| data.labels[r as usize]).collect();
    let x = x_all.index_select(0, &Tensor::from_slice(&ids));
    let y = Tensor::from_slice(&labels).to_kind(Kind::Int64);
    (ids, labels, x, y)
}

/// `(lr, momentum, grad_scale)` of each step of a layer, from `layer_steps`.
fn layer_steps(run: &Path, layer: &str) -> Vec<(f64, f64, f64)> {
    use arrow_array::{Float64Array, StringArray};
    let m = Manifest::open(run).unwrap();
    let mut rows = Vec::new();
    for f in m.files(Table::LayerSteps) {
        for b in read_parquet(&run.join(&f.path)) {
            let f64s = |n: &str| {
                b.column_by_name(n)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            };
            let names = b.column_by_name("layer").unwrap();
            let names = names.as_any().downcast_ref::<StringArray>().unwrap();
            let step = b.column_by_name("step").unwrap();
            let step = step.as_any().downcast_ref::<Int64Array>().unwrap();
            let (lr, mu, k) = (f64s("lr"), f64s("momentum"), f64s("grad_scale"));
            for i in 0..b.num_rows() {
                if names.value(i) == layer {
                    rows.push((step.value(i), (lr[i], mu[i], k[i])));
                }
            }
        }
    }
    rows.sort_by_key(|r| r.0);
    rows.into_iter().map(|r| r.1).collect()
}

/// Clipping by norm and a momentum changed at every step, with tch's own
/// SGD: the records carry the measured clipping coefficient and the
/// `layer_steps` rows the momentum of each step, so that `W_T` is rebuilt
/// from `W_0` and the records with displacements from a direct simulation
/// of the update rule (independent of the analyzer), and `verify` passes.
/// Noise added to a gradient stops the run at that step.
#[test]
fn clip_grad_norm_and_cycling_momentum_reconstruct_exactly() {
    let _serial = serial();
    use reptrace_format::Optimizer;
    use reptrace_tch::Error;
    use reptrace_tch::trace::{RunSpec, Step};
    use tch::nn::{Module, OptimizerConfig};
    let data = reptrace_tch::data::digits().unwrap();
    let x_all = digits_inputs(&data);
    let train_run = |run: &Path, noise_at: Option<i64>| {
        tch::manual_seed(11);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let mut tracer = Tracer::new();
        let model = digits_mlp(&mut tracer, &vs, Tensor::relu);
        let mut opt = nn::Sgd {
            momentum: 0.9,
            ..Default::default()
        }
        .build(&vs, 0.05)
        .unwrap();
        let optimizer = Optimizer {
            momentum: 0.9,
            ..Optimizer::sgd(0.05)
        };
        tracer
            .record(RunSpec {
                optimizer,
                ..RunSpec::sgd(run, data.classes.clone(), 0.05)
            })
            .unwrap();
        let initial: HashMap<String, Tensor> = vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.detach().copy()))
            .collect();
        for step in 0..40i64 {
            let (ids, labels, x, y) = digits_batch(&data, &x_all, step, 32);
            opt.zero_grad();
            let loss = model.forward(&x).cross_entropy_for_logits(&y);
            loss.backward();
            opt.clip_grad_norm(0.3);
            if noise_at == Some(step) {
                let w = &vs.variables()["fc2.weight"];
                let mut g = w.grad();
                let _ = g.g_add_(&(g.randn_like() * 1e-2));
            }
            // A cycling momentum, as a one-cycle schedule gives.
            let momentum = 0.85 + 0.1 * ((step % 8) as f64 / 7.0);
            opt.set_momentum(momentum);
            let lr = 0.05 * (1.0 - step as f64 / 80.0);
            opt.set_lr(lr);
            let s = Step {
                loss: &loss,
                ids: &ids,
                labels: &labels,
                lr,
                momentum: Some(momentum),
                logits: None,
            };
            match tracer.step(&s, || opt.step()) {
                Ok(()) => {}
                Err(e) => return Err(e),
            }
            if step % 10 == 9 {
                tracer.end_epoch().unwrap();
            }
        }
        tracer.finish(None).unwrap();
        let last: HashMap<String, Tensor> = vs.variables();
        Ok::<_, Error>((initial, last))
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("clip");
    let (initial, last) = train_run(&run, None).unwrap();
    let m = Manifest::open(&run).unwrap();
    let rows = update_rows(&run);
    for layer in m.model.traced_layers() {
        let name = layer.name();
        let steps = layer_steps(&run, name);
        assert_eq!(steps.len(), 40);
        let clipped = steps.iter().filter(|s| s.2 < 0.999).count();
        assert!(clipped > 20, "{name}: {clipped} clipped steps");
        // λ_s by simulation: PyTorch SGD, heavy ball, the buffer created at
        // step 0, a unit gradient at step s only.
        let lambda = |s: usize| {
            let (mut w, mut buf) = (0.0f64, 0.0f64);
            for (t, &(lr, mu, _)) in steps.iter().enumerate() {
                let g = if t == s { 1.0 } else { 0.0 };
                buf = if t == 0 { g } else { mu * buf + g };
                w -= lr * buf;
            }
            -w
        };
        let sigma: Vec<f64> = (0..steps.len()).map(|s| lambda(s) / steps[s].0).collect();
        let w0 = &initial[&format!("{name}.weight")];
        let b0 = &initial[&format!("{name}.bias")];
        let flat =
            |t: &Tensor| Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        let mut rebuilt: Vec<f64> = flat(w0);
        rebuilt.extend(flat(b0));
        for (step, _, u, v) in &rows[name] {
            let d = record_update(layer, u, v);
            for (r, x) in rebuilt.iter_mut().zip(d) {
                *r += sigma[*step as usize] * x;
            }
        }
        let mut want = flat(&last[&format!("{name}.weight")]);
        want.extend(flat(&last[&format!("{name}.bias")]));
        let mut start = flat(w0);
        start.extend(flat(b0));
        let diff: Vec<f64> = rebuilt.iter().zip(&want).map(|(a, b)| a - b).collect();
        let moved: Vec<f64> = want.iter().zip(&start).map(|(a, b)| a - b).collect();
        let rel = norm(&diff) / norm(&moved);
        assert!(rel <= 1e-5, "{name}: rebuilt W_T off by {rel:.2e}");
    }
    let report = reptrace_analyze::verify::verify(&run, &Default::default()).unwrap();
    assert!(report.passed(), "{:?}", report.checks);

    let noisy = tmp.path().join("noisy");
    match train_run(&noisy, Some(7)) {
        Err(Error::Inexact {
            layer,
            step,
            message,
        }) => {
            assert_eq!((layer.as_str(), step), ("fc2", 7));
            assert!(message.contains("beyond one scale factor"), "{message}");
        }
        other => panic!(
            "expected the noisy step to be refused, got {:?}",
            other.err()
        ),
    }
    let m = Manifest::open(&noisy).unwrap();
    assert_eq!(m.status, reptrace_format::Status::Aborted);
    assert_eq!(m.last_step().map(|s| s.0), Some(6));
    // Committed with the weights steps 0..=6 led to: it verifies up to there.
    let report = reptrace_analyze::verify::verify(&noisy, &Default::default()).unwrap();
    assert!(report.passed(), "{:?}", report.checks);
}
