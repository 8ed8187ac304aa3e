//! Instance mode under Adam and AdamW (format 10): a softmax regression
//! (one Linear layer 6→4 with bias) trained here by a simulated Adam in
//! f64, its per-example gradient shares recorded as factors and its
//! preconditioner in `layer_steps`; the analyzer's effective updates,
//! contributions, residual and `verify` against a forward replay of each
//! record's own path through Adam's moments.
use super::read;
use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float32Type, Int64Type};
use arrow_array::builder::{Float32Builder, ListBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reptrace_analyze::replay::{self, Setup};
use reptrace_analyze::verify::{Options as VerifyOptions, Status, verify};
use reptrace_analyze::{Options, ProbeSelection, attribute};
use reptrace_format::{Manifest, Optimizer, OptimizerKind, Split, Table};
use reptrace_record::{AdamStep, LayerStepRow, ProbeBatch};
use reptrace_testkit::handmade::{Batch, Handmade, Tensor, tiny};
use std::path::Path;
use std::sync::Arc;

const IN: usize = 6;
const OUT: usize = 4;
/// `[vec W, b]`.
const LEN: usize = OUT * IN + OUT;
const BATCH: usize = 5;
const STEPS: usize = 8;
const LR: [f64; STEPS] = [0.05, 0.04, 0.0, 0.03, 0.05, 0.02, 0.04, 0.03];
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// β₁ of step `s` (one step differs).
fn beta1(s: usize) -> f64 {
    if s == 4 { 0.8 } else { 0.9 }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Case {
    kind: OptimizerKind,
    wd: f64,
}

/// One recorded example-step: its step and `−ΔW_rec = g_{s,i}` as `[vec, b]`.
struct Share {
    step: usize,
    instance: i64,
    grad: Vec<f64>,
}

/// What the simulated optimizer applied at one step.
struct Applied {
    c: f64,
    d: Vec<f64>,
}

/// What the test knows about the run it wrote.
pub(super) struct Trained {
    initial: Vec<f64>,
    last: Vec<f64>,
    /// The final weights before their rounding to f32.
    exact: Vec<f64>,
    shares: Vec<Share>,
    applied: Vec<Applied>,
    probes: Vec<(Vec<f64>, Vec<f64>)>,
}

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

/// `c = ΔW a + Δb` of a `[vec ΔW, Δb]`.
fn forward(delta: &[f64], a: &[f64]) -> Vec<f64> {
    (0..OUT)
        .map(|o| {
            let row = &delta[o * IN..(o + 1) * IN];
            row.iter().zip(a).map(|(w, x)| w * x).sum::<f64>() + delta[OUT * IN + o]
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// Trains and records the run in `dir`; `without` names a step whose
/// layer_steps row carries no preconditioner.
pub(super) fn write(dir: &Path, case: Case, without: Option<usize>) -> Trained {
    let mut rng = ChaCha8Rng::seed_from_u64(61);
    let optimizer = Optimizer {
        kind: case.kind,
        weight_decay: case.wd,
        betas: Some([0.9, BETA2]),
        eps: Some(EPS),
        ..Optimizer::sgd(LR[0])
    };
    let classes = ["a", "b", "c", "d"];
    let mut run = Handmade::with(dir, tiny(IN, OUT, true), &classes, |b| {
        b.optimizer(optimizer)
    });
    let n = STEPS * BATCH;
    let labels: Vec<i32> = (0..n as i32).map(|i| i % OUT as i32).collect();
    run.instances(&labels, &vec![Split::Train; n]);
    let x: Vec<f32> = (0..n * IN)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let theta0: Vec<f32> = (0..LEN).map(|_| rng.random::<f32>() - 0.5).collect();
    run.weights(&snapshot(&theta0));
    let mut theta = widen(&theta0);
    let (mut m, mut v) = (vec![0.0; LEN], vec![0.0; LEN]);
    let mut shares = Vec::new();
    let mut applied = Vec::new();
    #[allow(clippy::needless_range_loop)]
    for s in 0..STEPS {
        let ids: Vec<i64> = (s * BATCH..(s + 1) * BATCH).map(|i| i as i64).collect();
        let batch_labels: Vec<i32> = ids.iter().map(|&i| labels[i as usize]).collect();
        let batch = Batch::new(s as i64, 0, &ids, &batch_labels);
        run.step(&batch, LR[s]);
        // Per example: u = x, v = −δ/B (mean loss), rounded to f32; the
        // applied gradient is the sum of the rounded shares.
        let (mut u_all, mut v_all) = (Vec::new(), Vec::new());
        let mut grad = vec![0.0; LEN];
        for (&id, &label) in ids.iter().zip(&batch_labels) {
            let xi = &x[id as usize * IN..(id as usize + 1) * IN];
            let xw = widen(xi);
            let z = forward(&theta, &xw);
            let top = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = z.iter().map(|z| (z - top).exp()).collect();
            let total: f64 = e.iter().sum();
            let vi: Vec<f32> = (0..OUT)
                .map(|o| {
                    let delta = e[o] / total - f64::from(u8::from(o == label as usize));
                    (-delta / BATCH as f64) as f32
                })
                .collect();
            let mut g = vec![0.0; LEN];
            for o in 0..OUT {
                for i in 0..IN {
                    g[o * IN + i] = -f64::from(vi[o]) * f64::from(xi[i]);
                }
                g[OUT * IN + o] = -f64::from(vi[o]);
            }
            grad.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
            shares.push(Share {
                step: s,
                instance: id,
                grad: g,
            });
            u_all.extend_from_slice(xi);
            v_all.extend_from_slice(&vi);
        }
        run.update("fc", &batch, &u_all, &v_all);
        // Adam / AdamW, as PyTorch steps it (β₁ of this step in the bias
        // correction).
        let (lr, wd, b1) = (LR[s], case.wd, beta1(s));
        match case.kind {
            OptimizerKind::Adamw => theta.iter_mut().for_each(|t| *t *= 1.0 - lr * wd),
            _ => grad.iter_mut().zip(&theta).for_each(|(g, t)| *g += wd * t),
        }
        let k = s as i32 + 1;
        for j in 0..LEN {
            m[j] = b1 * m[j] + (1.0 - b1) * grad[j];
            v[j] = BETA2 * v[j] + (1.0 - BETA2) * grad[j] * grad[j];
        }
        let c = lr / (1.0 - b1.powi(k));
        // The optimizer applies D as the run stores it (float32), so that
        // the only rounding left is that of the final weights.
        let d: Vec<f64> = v
            .iter()
            .map(|v| f64::from((1.0 / ((v / (1.0 - BETA2.powi(k))).sqrt() + EPS)) as f32))
            .collect();
        for j in 0..LEN {
            theta[j] -= c * d[j] * m[j];
        }
        let adam = (without != Some(s)).then(|| AdamStep {
            beta1: b1,
            step_size: c,
            preconditioner: f32s(&d),
        });
        run.recorder()
            .layer_steps(vec![LayerStepRow {
                step: s as i64,
                epoch: 0,
                layer: "fc".into(),
                param_group: 0,
                lr,
                momentum: 0.0,
                dampening: 0.0,
                nesterov: false,
                weight_decay: wd,
                grad_scale: 1.0,
                grad_check: None,
                grad_norm: None,
                precision: "f32".into(),
                adam,
            }])
            .unwrap();
        applied.push(Applied { c, d });
    }
    // The final weights as the f32 training loop would hold them.
    let last32 = f32s(&theta);
    let initial = widen(&theta0);
    let last = widen(&last32);
    let change: Vec<f64> = last.iter().zip(&initial).map(|(t, i)| t - i).collect();
    let mut probes = Vec::new();
    let (mut a_all, mut p_all) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let a: Vec<f64> = (0..IN).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
        let p = forward(&change, &a);
        a_all.extend_from_slice(&a);
        p_all.extend_from_slice(&p);
        probes.push((a, p));
    }
    run.probes(
        "fc",
        ProbeBatch {
            probe_ids: &[100, 101],
            instance_ids: &[None, None],
            labels: &[0, 1],
            predicted: &[0, 0],
            a: &a_all,
            p: &p_all,
            positions: None,
        },
    );
    run.finish(&snapshot(&last32));
    Trained {
        initial,
        last,
        exact: theta,
        shares,
        applied,
        probes,
    }
}

const W_SHAPE: [usize; 2] = [OUT, IN];
const B_SHAPE: [usize; 1] = [OUT];

/// The weights snapshot of `[vec W, b]`.
fn snapshot(theta: &[f32]) -> Vec<Tensor<'_>> {
    vec![
        ("fc.weight", &W_SHAPE[..], &theta[..OUT * IN]),
        ("fc.bias", &B_SHAPE[..], &theta[OUT * IN..]),
    ]
}

/// The effective update of one record, replayed forwards: its gradient
/// enters the first moment at its step and moves every later step's
/// weights by `c_r D_r ⊙ m_rec` (AdamW shrinks the displacement so far).
fn brute_force(case: Case, t: &Trained, share: &Share) -> Vec<f64> {
    let mut m = vec![0.0; LEN];
    let mut disp = vec![0.0; LEN];
    for (r, a) in t.applied.iter().enumerate() {
        if case.kind == OptimizerKind::Adamw {
            disp.iter_mut().for_each(|x| *x *= 1.0 - LR[r] * case.wd);
        }
        let b1 = beta1(r);
        for j in 0..LEN {
            let g = if r == share.step { share.grad[j] } else { 0.0 };
            m[j] = b1 * m[j] + (1.0 - b1) * g;
            disp[j] -= a.c * a.d[j] * m[j];
        }
    }
    disp
}

pub(super) const CASES: [Case; 3] = [
    Case {
        kind: OptimizerKind::Adam,
        wd: 0.0,
    },
    Case {
        kind: OptimizerKind::Adamw,
        wd: 0.1,
    },
    Case {
        kind: OptimizerKind::Adam,
        wd: 0.05,
    },
];

#[test]
fn effective_updates_contributions_and_residual() {
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let t = write(&dir, case, None);
        let what = format!("{:?} wd {}", case.kind, case.wd);

        // (a) Reconstruction through the analyzer's replay.
        let run = reptrace_analyze::open(&dir).unwrap();
        let setup = Setup::load(&run).unwrap();
        let m = run.manifest().clone();
        let layer = m.model.traced_layers().next().unwrap();
        let (residual, change) = replay::residual(&run, &layer, &setup, 7).unwrap();
        let residual: Vec<f64> = residual
            .weight
            .iter()
            .chain(&residual.bias)
            .copied()
            .collect();
        let change: Vec<f64> = change.weight.iter().chain(&change.bias).copied().collect();
        let want_change: Vec<f64> = t.last.iter().zip(&t.initial).map(|(a, b)| a - b).collect();
        assert!(norm(&want_change) > 0.1, "{what}: the weights hardly moved");
        let diff: Vec<f64> = change
            .iter()
            .zip(&want_change)
            .map(|(a, b)| a - b)
            .collect();
        assert!(norm(&diff) <= 1e-12 * norm(&want_change), "{what}");
        if case.wd == 0.0 {
            assert!(
                norm(&residual) <= 1e-5 * norm(&change),
                "{what}: residual {} of {}",
                norm(&residual),
                norm(&change)
            );
        } else if case.kind == OptimizerKind::Adamw {
            {
                let shrink: f64 = LR.iter().map(|lr| 1.0 - lr * case.wd).product();
                // (Π d − 1) W_0, and the rounding of W_T to f32.
                let want: Vec<f64> = (0..LEN)
                    .map(|j| (shrink - 1.0) * t.initial[j] + (t.last[j] - t.exact[j]))
                    .collect();
                let diff: Vec<f64> = residual.iter().zip(&want).map(|(a, b)| a - b).collect();
                assert!(
                    norm(&diff) <= 1e-6 * norm(&want),
                    "{what}: residual off (Πd − 1) W_0 by {}",
                    norm(&diff) / norm(&want)
                );
            }
        } else {
            // Adam + L2: the decay's share Σ −G_s ⊙ wd W_s stays behind.
            assert!(norm(&residual) > 1e-3 * norm(&change), "{what}");
        }

        // (b) Contributions of every record against the forward replay.
        let options = Options {
            probes: ProbeSelection::All,
            ..Options::default()
        };
        attribute(&dir, &options, &mut |_| {}).unwrap();
        let rows = read::contributions(&dir);
        for (q, (a, p)) in t.probes.iter().enumerate() {
            let probe = 100 + q as i64;
            let mut total = 0.0;
            for share in &t.shares {
                let eff = brute_force(case, &t, share);
                let c = forward(&eff, a);
                let found: Vec<_> = rows
                    .iter()
                    .filter(|r| r.probe_id == probe && r.step == Some(share.step as i64))
                    .filter(|r| r.instance_id == Some(share.instance))
                    .collect();
                assert_eq!(
                    found.len(),
                    1,
                    "{what}: probe {probe} record {}",
                    share.instance
                );
                let row = found[0];
                let tol = 1e-6 * norm(&c) * norm(p);
                assert!(
                    (row.dot - dot(&c, p)).abs() <= tol,
                    "{what}: probe {probe} instance {} dot {} vs {}",
                    share.instance,
                    row.dot,
                    dot(&c, p)
                );
                assert!(
                    (row.norm - norm(&c)).abs() <= 1e-6 * norm(&c),
                    "{what}: norm {} vs {}",
                    row.norm,
                    norm(&c)
                );
                if share.step == 2 {
                    // The lr-0 step still moves later weights through m.
                    assert!(norm(&c) > 0.0, "{what}");
                }
                total += row.dot;
            }
            // (c) Completeness: the records and the residual row make ‖p‖².
            let res: Vec<_> = rows
                .iter()
                .filter(|r| r.probe_id == probe && r.step.is_none())
                .collect();
            assert_eq!(res.len(), 1, "{what}: residual row");
            let pn2 = dot(p, p);
            assert!(
                (total + res[0].dot - pn2).abs() <= 1e-9 * pn2,
                "{what}: Σ dot {} + residual {} vs ‖p‖² {pn2}",
                total,
                res[0].dot
            );
        }
        assert_eq!(rows.len(), 2 * (STEPS * BATCH + 1), "{what}");

        // (d) verify: exact without decay, informational with it.
        let report = verify(&dir, &VerifyOptions::default()).unwrap();
        assert!(report.passed(), "{what}: {:#?}", report.checks);
        let w = report
            .checks
            .iter()
            .find(|c| c.name == "completeness: fc weights")
            .unwrap();
        assert!(w.detail.contains("preconditioner"), "{what}: {w:?}");
        if case.wd == 0.0 {
            assert_eq!(w.status, Status::Pass, "{what}: {w:?}");
            assert!(w.value.unwrap() < 1e-5, "{what}: {w:?}");
        } else {
            assert_eq!(w.status, Status::Warn, "{what}: {w:?}");
        }
        let a = report
            .checks
            .iter()
            .find(|c| c.name == "completeness: attribution")
            .unwrap();
        assert_eq!(a.status, Status::Pass, "{what}: {a:?}");
    }
}

/// A format-10 Adam run whose step 3 has no preconditioner.
#[test]
fn a_missing_preconditioner_names_file_step_and_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    write(&dir, CASES[0], Some(3));
    assert_attribute_refuses(&dir, &["null"]);
}

/// `attribute` on the run at `dir` fails with one line naming the
/// layer_steps file's preconditioner, step 3, layer fc and `more`.
fn assert_attribute_refuses(dir: &Path, more: &[&str]) {
    let err = attribute(dir, &Options::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\n'), "{err}");
    let parts = ["layer_steps", "preconditioner", "step 3", "layer fc"];
    for part in parts.iter().chain(more) {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
}

/// Rewrites the run's layer_steps file with step 3's preconditioner one
/// value short (the recorder refuses to write that).
fn shorten_preconditioner(dir: &Path) {
    let mut m = Manifest::load(dir).unwrap();
    let entry = m
        .commits
        .iter_mut()
        .flat_map(|c| c.files.iter_mut())
        .find(|f| f.table == Table::LayerSteps.name())
        .unwrap();
    let path = dir.join(&entry.path);
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap()).unwrap();
    let kv: Vec<KeyValue> = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|k| k.key != "ARROW:schema")
        .collect();
    let schema = builder.schema().clone();
    let batches: Vec<RecordBatch> = builder.build().unwrap().map(|b| b.unwrap()).collect();
    let index = schema.index_of("preconditioner").unwrap();
    let DataType::List(field) = schema.field(index).data_type().clone() else {
        panic!("preconditioner is not a list");
    };
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(kv))
        .build();
    let file = std::fs::File::create(&path).unwrap();
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).unwrap();
    for batch in batches {
        let steps = batch
            .column_by_name("step")
            .unwrap()
            .as_primitive::<Int64Type>()
            .clone();
        let lists = batch.column(index).as_list::<i32>().clone();
        let mut b = ListBuilder::new(Float32Builder::new()).with_field(field.clone());
        for r in 0..batch.num_rows() {
            if lists.is_null(r) {
                b.append(false);
                continue;
            }
            let values = lists.value(r);
            let values = values.as_primitive::<Float32Type>().values().to_vec();
            let keep = if steps.value(r) == 3 {
                values.len() - 1
            } else {
                values.len()
            };
            b.values().append_slice(&values[..keep]);
            b.append(true);
        }
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        columns[index] = Arc::new(b.finish());
        writer
            .write(&RecordBatch::try_new(schema.clone(), columns).unwrap())
            .unwrap();
    }
    writer.close().unwrap();
    entry.bytes = std::fs::metadata(&path).unwrap().len();
    std::fs::write(dir.join("manifest.json"), m.to_json()).unwrap();
}

#[test]
fn a_preconditioner_of_the_wrong_length_names_file_step_and_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    write(&dir, CASES[1], None);
    shorten_preconditioner(&dir);
    assert_attribute_refuses(&dir, &["27 values", "28"]);
}
