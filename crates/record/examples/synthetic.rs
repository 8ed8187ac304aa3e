// cargo run -p reptrace-record --example synthetic -- runs/synthetic
//
//! Writes a synthetic trace through the recorder's public API: a small CNN
//! (one Conv2d and two Linear layers, all traced) "trained" for a few epochs
//! on 8×8 single-channel inputs, with a commit point and a weights snapshot
//! at every epoch end, probes for the test instances, and final weights.
//!
//! The numbers are random — ReLU-like sparse layer inputs `u`, small
//! Gaussian `v = −η·δ` — so the run shows the API and the on-disk layout
//! (open it with `reptrace info runs/synthetic`, pandas or DuckDB), not a
//! real training run. The shapes follow the format exactly: a Linear
//! record has `u` = in_features values and `v` = out_features; the Conv2d
//! layer stores whichever of factors or the full per-example ΔW is smaller.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reptrace_format::{
    Conv2dSpec, Dtype, LinearSpec, Model, Module, Optimizer, Split, Storage, TracedLayer,
};
use reptrace_record::{NamedTensor, ProbeBatch, Recorder, StepRow, UpdateBatch};
use std::path::PathBuf;

const EPOCHS: i32 = 3;
const BATCH: usize = 20;
const TRAIN: usize = 200;
const TEST: usize = 50;
const CLASSES: usize = 10;
const LR: f64 = 0.05;

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

fn model() -> Model {
    // Conv 1→4, 3×3, stride 2, padding 1 on 8×8 gives 4×4 outputs.
    let mut conv = Conv2dSpec {
        name: "conv1".into(),
        in_channels: 1,
        out_channels: 4,
        kernel: [3, 3],
        stride: [2, 2],
        padding: [1, 1],
        dilation: [1, 1],
        input_hw: [8, 8],
        output_hw: [4, 4],
        bias: true,
        traced: true,
        storage: Storage::Factors,
    };
    // Store the full per-example matrix when it is smaller than the factors.
    let factors = conv.patch_len() * conv.positions() + conv.out_channels * conv.positions();
    let full = conv.out_channels * conv.patch_len() + conv.out_channels;
    if full < factors {
        conv.storage = Storage::Full;
    }
    Model {
        structure: Default::default(),
        name: "synthetic-cnn".into(),
        input_shape: vec![1, 8, 8],
        modules: vec![
            Module::Conv2d(conv),
            Module::Relu,
            Module::Flatten,
            Module::Linear(LinearSpec {
                name: "fc1".into(),
                in_features: 64,
                out_features: 32,
                bias: true,
                traced: true,
            }),
            Module::Relu,
            Module::Linear(LinearSpec {
                name: "fc2".into(),
                in_features: 32,
                out_features: CLASSES,
                bias: true,
                traced: true,
            }),
        ],
        frozen: Vec::new(),
    }
}

/// Random weights for every traced layer: (name, shape, values).
fn random_weights(model: &Model, rng: &mut ChaCha8Rng) -> Vec<(String, Vec<usize>, Vec<f32>)> {
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

fn named(w: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<NamedTensor<'_>> {
    w.iter()
        .map(|(name, shape, data)| NamedTensor { name, shape, data })
        .collect()
}

/// The `u` and `v` of `n` records of `layer`, row-major.
fn factors(layer: TracedLayer<'_>, n: usize, rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<f32>) {
    let (u_len, v_len) = layer.factor_lens();
    match layer {
        TracedLayer::Conv2d(c) if c.storage == Storage::Full => {
            // u is empty; v = ΔW (C_out × C_in·kh·kw) = V Uᵀ, then Δb = V·1.
            let (k, p, c_out) = (c.patch_len(), c.positions(), c.out_channels);
            let mut v = Vec::with_capacity(n * v_len);
            for _ in 0..n {
                let uf: Vec<f32> = (0..k * p).map(|_| relu_like(rng)).collect();
                let vf: Vec<f32> = (0..c_out * p)
                    .map(|_| LR as f32 * 0.01 * gaussian(rng))
                    .collect();
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
            let v = (0..n * v_len)
                .map(|_| LR as f32 * 0.01 * gaussian(rng))
                .collect();
            (u, v)
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "runs/synthetic".into()),
    );
    let dtype = match std::env::args().nth(2).as_deref() {
        Some("f16") => Dtype::F16,
        _ => Dtype::F32,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let model = model();

    let mut rec = Recorder::builder(&out)
        .model(model.clone())
        .optimizer(Optimizer::sgd(LR))
        .classes((0..CLASSES).map(|c| c.to_string()).collect())
        .dtype(dtype)
        .setting("seed", serde_json::json!(42))
        .setting("epochs", serde_json::json!(EPOCHS))
        .setting("data", serde_json::json!("synthetic"))
        .build()?;

    // Instances: the first TRAIN are the training split, then TEST test instances.
    let ids: Vec<i64> = (0..(TRAIN + TEST) as i64).collect();
    let labels: Vec<i32> = (0..TRAIN + TEST)
        .map(|_| rng.random_range(0..CLASSES as i32))
        .collect();
    let splits: Vec<Split> = (0..TRAIN + TEST)
        .map(|i| if i < TRAIN { Split::Train } else { Split::Test })
        .collect();
    rec.instances(&ids, &labels, &splits)?;
    let w0 = random_weights(&model, &mut rng);
    rec.weights(&named(&w0))?;
    rec.commit()?; // commit 0: instances + weights/initial.safetensors

    let layers: Vec<TracedLayer> = model.traced_layers().collect();
    let mut step = 0i64;
    for epoch in 0..EPOCHS {
        for batch in 0..TRAIN / BATCH {
            let batch_ids: Vec<i64> = (batch * BATCH..(batch + 1) * BATCH)
                .map(|i| i as i64)
                .collect();
            let batch_labels: Vec<i32> = batch_ids.iter().map(|&i| labels[i as usize]).collect();
            let loss = 2.3 * (-0.05 * step as f64).exp();
            rec.step(StepRow {
                step,
                epoch,
                lr: LR,
                batch_size: BATCH as i32,
                loss,
                skipped: false,
            })?;
            for &layer in &layers {
                let (u, v) = factors(layer, BATCH, &mut rng);
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
                    },
                )?;
            }
            step += 1;
        }
        // Epoch end: a commit point with a weights snapshot.
        let w = random_weights(&model, &mut rng);
        rec.weights(&named(&w))?;
        rec.commit()?;
    }

    // Probes: the test instances, for every traced layer.
    let probe_ids: Vec<i64> = ids[TRAIN..].to_vec();
    let probe_labels: Vec<i32> = labels[TRAIN..].to_vec();
    let predicted: Vec<i32> = probe_labels
        .iter()
        .map(|&l| {
            if rng.random_bool(0.8) {
                l
            } else {
                (l + 1) % CLASSES as i32
            }
        })
        .collect();
    for &layer in &layers {
        let (a_len, p_len) = layer.probe_lens();
        let a: Vec<f64> = (0..TEST * a_len)
            .map(|_| f64::from(relu_like(&mut rng)))
            .collect();
        let p: Vec<f64> = (0..TEST * p_len)
            .map(|_| f64::from(gaussian(&mut rng)))
            .collect();
        rec.probes(
            layer.name(),
            ProbeBatch {
                probe_ids: &probe_ids,
                instance_ids: &vec![None; TEST],
                labels: &probe_labels,
                predicted: &predicted,
                a: &a,
                p: &p,
            },
        )?;
    }
    let wf = random_weights(&model, &mut rng);
    let manifest = rec.finish(&named(&wf))?;
    println!(
        "wrote {}: {} commits, last step {}",
        out.display(),
        manifest.commits.len(),
        manifest.last_step().map(|s| s.0).unwrap_or(-1)
    );
    Ok(())
}
