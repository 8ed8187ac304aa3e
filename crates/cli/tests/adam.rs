//! Instance mode under Adam and AdamW, end to end: `reptrace train
//! --optimizer adam|adamw --mode instance` on the bundled digits (MLP and
//! CNN), then the run's own rows read here with arrow, without the
//! analyzer: the effective updates `G_t ⊙ ΔW_rec` (the recursion of
//! docs/method.md §6, computed here in f64 from `layer_steps`) sum to
//! `W_T − W_0`, up to `(Π d_t − 1)·W_0` under AdamW.
use arrow_array::{Array, BooleanArray, Float32Array, Float64Array, Int64Array, ListArray};
use arrow_array::{RecordBatch, StringArray};
use reptrace_format::{Manifest, Mode, OptimizerKind, Table, col};
use reptrace_testkit::cli::Cli;
use reptrace_testkit::digits::Digits;
use reptrace_testkit::files::read_parquet;
use std::collections::BTreeMap;
use std::path::Path;

fn cli() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_reptrace"))
}

/// A digits run of `model` under `optimizer` in instance mode: 2 epochs,
/// batches of 64, lr 0.01, weight decay `wd`.
fn run(model: &str, optimizer: &str, wd: &str) -> &'static Path {
    Digits::new()
        .model(model)
        .epochs(2)
        .batch(64)
        .optimizer(optimizer)
        .mode("instance")
        .flags(&["--lr", "0.01", "--weight-decay", wd])
        .shared(&cli())
}

/// The tensors of a weights file: name → (shape, values widened to f64).
fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
            let values = t
                .data()
                .chunks_exact(4)
                .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect();
            (name, (t.shape().to_vec(), values))
        })
        .collect()
}

fn column<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap_or_else(|| panic!("column {name}: unexpected type"))
}

/// Row `i` of a list<float32> column, widened to f64.
fn list(b: &RecordBatch, name: &str, i: usize) -> Vec<f64> {
    let l = column::<ListArray>(b, name).value(i);
    let values = l.as_any().downcast_ref::<Float32Array>().unwrap();
    values.values().iter().map(|&x| f64::from(x)).collect()
}

/// One `layer_steps` row of an Adam/AdamW run.
#[derive(Debug)]
struct AdamRow {
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    step_size: f64,
    preconditioner: Vec<f64>,
}

/// `layer_steps` of the run: layer → step → row, every row checked to
/// carry Adam's columns and no momentum.
fn layer_steps(run: &Path, m: &Manifest) -> BTreeMap<String, BTreeMap<i64, AdamRow>> {
    let mut out: BTreeMap<String, BTreeMap<i64, AdamRow>> = BTreeMap::new();
    for f in m.files(Table::LayerSteps) {
        for b in read_parquet(&run.join(&f.path)) {
            let step = column::<Int64Array>(&b, col::STEP);
            let layer = column::<StringArray>(&b, col::LAYER);
            let f64s = |name: &str| column::<Float64Array>(&b, name);
            let (lr, wd, momentum) = (f64s(col::LR), f64s(col::WEIGHT_DECAY), f64s("momentum"));
            let (beta1, step_size) = (f64s(col::BETA1), f64s(col::STEP_SIZE));
            let nesterov = column::<BooleanArray>(&b, "nesterov");
            for i in 0..b.num_rows() {
                assert!(
                    !beta1.is_null(i) && !step_size.is_null(i),
                    "row {i}: no Adam step"
                );
                assert_eq!(momentum.value(i), 0.0);
                assert!(!nesterov.value(i));
                let row = AdamRow {
                    lr: lr.value(i),
                    weight_decay: wd.value(i),
                    beta1: beta1.value(i),
                    step_size: step_size.value(i),
                    preconditioner: list(&b, col::PRECONDITIONER, i),
                };
                let old = out
                    .entry(layer.value(i).to_owned())
                    .or_default()
                    .insert(step.value(i), row);
                assert!(old.is_none(), "two rows for one layer and step");
            }
        }
    }
    out
}

/// Per step, the sum over the step's records of `[vec ΔW_rec, Δb_rec]`
/// of `layer`, whose weight is `out × k` (PyTorch layout) with a bias or
/// not: `ΔW_rec = v uᵀ` (a Conv2d's `u` is `k × P` patches, `v` is
/// `out × P`; `Δb_rec` sums `v` over positions), or `v` itself when the
/// records hold the whole update (`u` empty). Also the number of records.
fn record_sums(
    run: &Path,
    m: &Manifest,
    layer: &str,
    (out, k, bias): (usize, usize, bool),
) -> (BTreeMap<i64, Vec<f64>>, usize) {
    let len = out * k + if bias { out } else { 0 };
    let mut sums: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    let mut records = 0;
    for f in m.files(Table::Updates) {
        if f.layer.as_deref() != Some(layer) {
            continue;
        }
        for b in read_parquet(&run.join(&f.path)) {
            let step = column::<Int64Array>(&b, col::STEP);
            for i in 0..b.num_rows() {
                records += 1;
                let (u, v) = (list(&b, col::U, i), list(&b, col::V, i));
                let sum = sums.entry(step.value(i)).or_insert_with(|| vec![0.0; len]);
                if u.is_empty() {
                    assert_eq!(v.len(), len, "{layer}: a whole update's length");
                    sum.iter_mut().zip(&v).for_each(|(s, x)| *s += x);
                    continue;
                }
                assert_eq!(u.len() % k, 0, "{layer}: u of {} values", u.len());
                let p = u.len() / k;
                assert_eq!(v.len(), out * p, "{layer}: v of {} values", v.len());
                for o in 0..out {
                    let vo = &v[o * p..(o + 1) * p];
                    for j in 0..k {
                        let uj = &u[j * p..(j + 1) * p];
                        sum[o * k + j] += vo.iter().zip(uj).map(|(a, b)| a * b).sum::<f64>();
                    }
                    if bias {
                        sum[out * k + o] += vo.iter().sum::<f64>();
                    }
                }
            }
        }
    }
    (sums, records)
}

fn norm(x: impl Iterator<Item = f64>) -> f64 {
    x.map(|v| v * v).sum::<f64>().sqrt()
}

/// Per traced layer: `‖(W_T − W_0) − Σ G_t ⊙ ΔW_rec − (Π d_t − 1)·W_0‖ /
/// ‖W_T − W_0‖`, the effective updates computed from the run's rows by
/// the recursion of docs/method.md §6; also `‖(Π d − 1)·W_0‖ / ‖W_T − W_0‖`
/// (the decay's share) and the layer's record count.
fn reconstruction(run: &Path) -> Vec<(String, f64, f64, usize)> {
    let m = Manifest::load(run).unwrap();
    assert_eq!(m.mode, Mode::Instance);
    let decoupled = match m.optimizer.kind {
        OptimizerKind::Adam => false,
        OptimizerKind::Adamw => true,
        other => panic!("optimizer {other:?}"),
    };
    let w0 = tensors(&run.join("weights/initial.safetensors"));
    let wt = tensors(&run.join("weights/final.safetensors"));
    let rows = layer_steps(run, &m);
    let mut results = Vec::new();
    for layer in m.model.traced_layers() {
        let name = layer.name();
        let (shape, w) = &w0[&format!("{name}.weight")];
        let (out, k) = (shape[0], shape[1..].iter().product::<usize>());
        let bias = w0.get(&format!("{name}.bias"));
        let mut first: Vec<f64> = w.clone();
        let mut last: Vec<f64> = wt[&format!("{name}.weight")].1.clone();
        if let Some((_, b)) = bias {
            first.extend(b);
            last.extend(&wt[&format!("{name}.bias")].1);
        }
        assert_eq!(first.len(), layer.update_len());
        let (sums, records) = record_sums(run, &m, name, (out, k, bias.is_some()));
        let steps = &rows[name];
        assert_eq!(
            sums.keys().collect::<Vec<_>>(),
            steps.keys().collect::<Vec<_>>(),
            "{name}: a layer_steps row for every step with records"
        );
        // Backwards over the steps: H_t = ρ_t·c_t·D_t + β1_{next}·H_{next},
        // G_t = (1 − β1_t)·H_t, ρ_t the decay factors of the later steps.
        let n = first.len();
        let (mut h, mut effective) = (vec![0.0; n], vec![0.0; n]);
        let (mut rho, mut beta1_next) = (1.0f64, 0.0f64);
        for (step, r) in steps.iter().rev() {
            assert_eq!(r.preconditioner.len(), n, "{name} step {step}");
            assert!(r.preconditioner.iter().all(|&d| d > 0.0 && d.is_finite()));
            let sum = &sums[step];
            for j in 0..n {
                h[j] = rho * r.step_size * r.preconditioner[j] + beta1_next * h[j];
                effective[j] += (1.0 - r.beta1) * h[j] * sum[j];
            }
            if decoupled {
                rho *= 1.0 - r.lr * r.weight_decay;
            }
            beta1_next = r.beta1;
        }
        let moved: Vec<f64> = last.iter().zip(&first).map(|(a, b)| a - b).collect();
        let scale = norm(moved.iter().copied());
        assert!(scale > 0.0, "{name} did not move");
        let residual = norm((0..n).map(|j| moved[j] - effective[j] - (rho - 1.0) * first[j]));
        let decay = norm(first.iter().map(|w| (rho - 1.0) * w));
        results.push((name.to_owned(), residual / scale, decay / scale, records));
    }
    results
}

/// `layers` traced layers, each with one record per training example and
/// epoch, and every layer's effective updates summing to `W_T − W_0`
/// (minus the decay's part under AdamW) within 1e-5 of its norm.
fn assert_reconstructs(run: &Path, layers: usize, decay: bool) {
    let m = Manifest::load(run).unwrap();
    assert_eq!(m.model.traced_layers().count(), layers);
    let results = reconstruction(run);
    for (name, err, decay_share, records) in &results {
        println!("{name}: residual {err:.2e}, decay's share {decay_share:.2e}");
        assert_eq!(
            *records,
            2 * 1437,
            "{name}: one record per example and epoch"
        );
        assert!(
            *err <= 1e-5,
            "{name}: effective updates miss W_T − W_0 by {err:.2e}"
        );
        if decay {
            assert!(*decay_share > 1e-4, "{name}: the decay is visible");
        } else {
            assert_eq!(*decay_share, 0.0);
        }
    }
}

#[test]
fn adam_mlp_reconstructs_the_final_weights() {
    let run = run("mlp", "adam", "0");
    let m = Manifest::load(run).unwrap();
    assert_eq!(m.optimizer.kind, OptimizerKind::Adam);
    assert_eq!(m.mode, Mode::Instance);
    assert_reconstructs(run, 3, false);
}

#[test]
fn adamw_mlp_reconstructs_the_final_weights() {
    let run = run("mlp", "adamw", "0.01");
    let m = Manifest::load(run).unwrap();
    assert_eq!(m.optimizer.kind, OptimizerKind::Adamw);
    assert_reconstructs(run, 3, true);
}

#[test]
fn adam_cnn_reconstructs_the_final_weights() {
    assert_reconstructs(run("cnn", "adam", "0"), 3, false);
}

#[test]
fn adamw_cnn_reconstructs_the_final_weights() {
    assert_reconstructs(run("cnn", "adamw", "0.01"), 3, true);
}

/// `reptrace verify` on Adam and AdamW runs (the analyzer's side of
/// docs/method.md §6): without weight decay every traced layer's weights
/// completeness passes, with no warning; with AdamW's decay the residual is
/// reported for information (it is `(Π d − 1)·W_0`, checked exactly in
/// `assert_reconstructs`) and nothing fails.
#[test]
fn verify_passes_on_adam_runs() {
    for (model, optimizer, wd) in [
        ("mlp", "adam", "0"),
        ("cnn", "adamw", "0"),
        ("mlp", "adamw", "0.01"),
    ] {
        let run = run(model, optimizer, wd);
        let out = cli().ok(&["verify", run.to_str().unwrap()]);
        let m = Manifest::load(run).unwrap();
        let decay = wd != "0";
        for layer in m.model.traced_layers() {
            let tag = format!("completeness: {} weights", layer.name());
            let line = out
                .lines()
                .find(|l| l.contains(&tag))
                .unwrap_or_else(|| panic!("{model} {optimizer}: no {tag}: {out}"));
            if decay {
                assert!(
                    line.starts_with("warn") && line.contains("weight decay"),
                    "{model} {optimizer}: {line}"
                );
            } else {
                assert!(line.starts_with("pass"), "{model} {optimizer}: {line}");
            }
        }
        let bad = |l: &&str| l.starts_with("fail") || (!decay && l.starts_with("warn"));
        assert!(!out.lines().any(|l| bad(&l)), "{model} {optimizer}: {out}");
    }
}

/// `G_t` of every step of `layer` (docs/method.md §6), from the run's rows.
fn effective_scales(steps: &BTreeMap<i64, AdamRow>, decoupled: bool) -> BTreeMap<i64, Vec<f64>> {
    let n = steps.values().next().map_or(0, |r| r.preconditioner.len());
    let (mut h, mut out) = (vec![0.0; n], BTreeMap::new());
    let (mut rho, mut beta1_next) = (1.0f64, 0.0f64);
    for (step, r) in steps.iter().rev() {
        for (hj, dj) in h.iter_mut().zip(&r.preconditioner) {
            *hj = rho * r.step_size * dj + beta1_next * *hj;
        }
        out.insert(*step, h.iter().map(|x| (1.0 - r.beta1) * x).collect());
        if decoupled {
            rho *= 1.0 - r.lr * r.weight_decay;
        }
        beta1_next = r.beta1;
    }
    out
}

/// Contributions of single records to two test probes, as `reptrace sql`
/// computes them over `contributions`, equal a brute-force computation
/// here: the record's effective update `G_t ⊙ (v uᵀ, v)` (G from the
/// recursion over the run's own layer_steps rows, in f64), met with the
/// probe's stored `a` and `p`; and completeness: over all records plus the
/// residual row, Σ dot = ‖p‖².
#[test]
fn adamw_contributions_equal_a_brute_force_replay() {
    let run = run("mlp", "adamw", "0.01");
    let m = Manifest::load(run).unwrap();
    let layer = "fc2";
    let rows = layer_steps(run, &m);
    let g = effective_scales(&rows[layer], true);
    let spec = m.model.traced_layer(layer).unwrap();
    let (out, k) = (spec.weight_shape()[0], spec.weight_shape()[1]);
    // Records of the first, a middle and the last step.
    let mut records = Vec::new();
    for f in m.files(Table::Updates) {
        if f.layer.as_deref() != Some(layer) {
            continue;
        }
        for b in read_parquet(&run.join(&f.path)) {
            let step = column::<Int64Array>(&b, col::STEP);
            let id = column::<Int64Array>(&b, col::INSTANCE_ID);
            for i in 0..b.num_rows() {
                if [0, 11, 44].contains(&step.value(i)) && records.len() < 9 {
                    records.push((
                        step.value(i),
                        id.value(i),
                        list(&b, col::U, i),
                        list(&b, col::V, i),
                    ));
                }
            }
        }
    }
    assert!(records.len() >= 6, "records of steps 0, 11 and 44");
    let probes = [1437i64, 1500];
    let mut checked = 0;
    for probe in probes {
        let pr = cli().sql_json(
            run,
            &format!(
                "SELECT a, p, p_norm FROM probes WHERE layer = '{layer}' AND probe_id = {probe}"
            ),
        );
        let nums = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let (a, p) = (nums(&pr[0]["a"]), nums(&pr[0]["p"]));
        let p_norm = pr[0]["p_norm"].as_f64().unwrap();
        assert_eq!((a.len(), p.len()), (k, out));
        for (step, id, u, v) in &records {
            let gt = &g[step];
            let c: Vec<f64> = (0..out)
                .map(|o| {
                    let w: f64 = (0..k).map(|j| gt[o * k + j] * v[o] * u[j] * a[j]).sum();
                    w + gt[out * k + o] * v[o]
                })
                .collect();
            let dot: f64 = c.iter().zip(&p).map(|(x, y)| x * y).sum();
            let norm = norm(c.iter().copied());
            let got = cli().sql_json(
                run,
                &format!(
                    "SELECT dot, norm FROM contributions WHERE layer = '{layer}' \
                     AND probe_id = {probe} AND step = {step} AND instance_id = {id}"
                ),
            );
            assert_eq!(got.len(), 1, "one row for step {step}, instance {id}");
            let (d, n) = (
                got[0]["dot"].as_f64().unwrap(),
                got[0]["norm"].as_f64().unwrap(),
            );
            assert!(
                (d - dot).abs() <= 1e-6 * dot.abs().max(1e-3 * p_norm * norm),
                "probe {probe} step {step} instance {id}: dot {d} vs {dot}"
            );
            assert!((n - norm).abs() <= 1e-6 * norm, "norm {n} vs {norm}");
            checked += 1;
        }
        let sum = cli().sql_json(
            run,
            &format!(
                "SELECT SUM(dot) AS s, SUM(CASE WHEN step IS NULL THEN dot END) AS r \
                 FROM contributions WHERE layer = '{layer}' AND probe_id = {probe}"
            ),
        );
        let (s, r) = (sum[0]["s"].as_f64().unwrap(), sum[0]["r"].as_f64().unwrap());
        let want = p_norm * p_norm;
        assert!(
            (s - want).abs() <= 1e-9 * want,
            "probe {probe}: Σ dot {s} vs ‖p‖² {want}"
        );
        assert!(
            r.abs() > 1e-6 * want,
            "AdamW's decay leaves a residual row: {r}"
        );
    }
    assert!(checked >= 12);
}
