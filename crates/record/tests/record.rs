//! Integration tests of the recorder: write through the public API, read
//! back with the arrow Parquet reader and safetensors, and kill a recording
//! process to check what survives a crash.
use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type, Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, ArrowPrimitiveType, RecordBatch};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use reptrace_format::{
    Dtype, Manifest, Mode, Model, Module, Optimizer, Split, Status, Storage, Table, TracedLayer,
    layout,
};
use reptrace_record::{
    FactorValues, NamedTensor, ProbeAppender, ProbeBatch, Recorder, RecorderBuilder, StepRow,
    UpdateBatch, UpdateBatchOwned,
};
use reptrace_testkit::files::{listed_parquet, read_parquet as read_batches};
use reptrace_testkit::handmade;
use reptrace_testkit::models::{self, Conv, linear};
use reptrace_testkit::synthetic::named;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[path = "record/compact.rs"]
mod compact;
#[path = "record/ragged.rs"]
mod ragged;

// ---------------------------------------------------------------- helpers

/// Every committed file of `table` (and layer), read in commit order.
fn read_table(run: &Path, m: &Manifest, table: Table, layer: Option<&str>) -> Vec<RecordBatch> {
    m.files(table)
        .into_iter()
        .filter(|f| f.layer.as_deref() == layer)
        .flat_map(|f| read_batches(&run.join(&f.path)))
        .collect()
}

/// A primitive column of every batch, concatenated.
fn column<T: ArrowPrimitiveType>(batches: &[RecordBatch], col: &str) -> Vec<T::Native> {
    batches
        .iter()
        .flat_map(|b| {
            b.column_by_name(col)
                .unwrap()
                .as_primitive::<T>()
                .values()
                .to_vec()
        })
        .collect()
}

fn i64s(batches: &[RecordBatch], col: &str) -> Vec<i64> {
    column::<Int64Type>(batches, col)
}

fn i32s(batches: &[RecordBatch], col: &str) -> Vec<i32> {
    column::<Int32Type>(batches, col)
}

fn f32s(batches: &[RecordBatch], col: &str) -> Vec<f32> {
    column::<Float32Type>(batches, col)
}

fn f64s(batches: &[RecordBatch], col: &str) -> Vec<f64> {
    column::<Float64Type>(batches, col)
}

/// A list column as one Vec per row, f16/f32/f64 widened to f64 losslessly.
fn lists(batches: &[RecordBatch], col: &str) -> Vec<Vec<f64>> {
    let mut out = Vec::new();
    for b in batches {
        let l = b.column_by_name(col).unwrap().as_list::<i32>();
        for i in 0..l.len() {
            let v = l.value(i);
            let row: Vec<f64> = if let Some(a) = v.as_primitive_opt::<Float32Type>() {
                a.values().iter().map(|&x| f64::from(x)).collect()
            } else if let Some(a) = v.as_primitive_opt::<Float16Type>() {
                a.values().iter().map(|&x| f64::from(x.to_f32())).collect()
            } else {
                v.as_primitive::<Float64Type>().values().to_vec()
            };
            out.push(row);
        }
    }
    out
}

/// A square `k`×`k` convolution with bias, dilation 1.
#[allow(clippy::too_many_arguments)]
fn conv(
    name: &str,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
    hw: usize,
    storage: Storage,
) -> Module {
    Conv::new(name, c_in, c_out, [hw, hw])
        .kernel([k, k])
        .stride([stride, stride])
        .padding([pad, pad])
        .storage(storage)
        .module()
}

fn model(modules: Vec<Module>) -> Model {
    models::model("test", vec![4], modules)
}

/// Weights of every Linear/Conv2d module, filled with `fill`.
fn weights_of(model: &Model, fill: f32) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    for l in model.traced_layers() {
        let shape = l.weight_shape();
        let n: usize = shape.iter().product();
        out.push((
            format!("{}.weight", l.name()),
            shape.clone(),
            (0..n).map(|i| fill + i as f32).collect(),
        ));
        if l.bias() {
            out.push((
                format!("{}.bias", l.name()),
                vec![shape[0]],
                vec![fill; shape[0]],
            ));
        }
    }
    out
}

fn read_safetensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let data = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, v.shape().to_vec(), data)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// ‖ΔW‖_F of a record by forming ΔW in f64 (independent of the recorder).
fn brute_norm(layer: TracedLayer<'_>, u: &[f32], v: &[f32]) -> f64 {
    let x = |s: &[f32], i: usize| f64::from(s[i]);
    let delta: Vec<f64> = match layer {
        // ΔW = v uᵀ.
        TracedLayer::Linear(_) => (0..v.len())
            .flat_map(|o| (0..u.len()).map(move |j| x(v, o) * x(u, j)))
            .collect(),
        // ΔW stored whole at the head of v.
        TracedLayer::Conv2d(c) if c.storage == Storage::Full => (0..c.out_channels * c.patch_len())
            .map(|i| x(v, i))
            .collect(),
        // ΔW = V Uᵀ summed over the output positions.
        TracedLayer::Conv2d(c) => {
            let (k, p) = (c.patch_len(), c.positions());
            (0..c.out_channels)
                .flat_map(|o| (0..k).map(move |r| (o, r)))
                .map(|(o, r)| (0..p).map(|q| x(v, o * p + q) * x(u, r * p + q)).sum())
                .collect()
        }
        other => panic!("no {} layer in these runs", other.kind_name()),
    };
    delta.iter().map(|w| w * w).sum::<f64>().sqrt()
}

/// A step row that was not skipped.
fn step_row(step: i64, epoch: i32, lr: f64, batch_size: i32, loss: f64) -> StepRow {
    StepRow {
        step,
        epoch,
        lr,
        batch_size,
        loss,
        skipped: false,
    }
}

/// One layer's per-example update factors at `step`; the writer computes the norms.
fn updates<'a>(
    step: i64,
    epoch: i32,
    instance_ids: &'a [i64],
    labels: &'a [i32],
    u: &'a [f32],
    v: &'a [f32],
) -> UpdateBatch<'a> {
    UpdateBatch {
        step,
        epoch,
        instance_ids,
        labels,
        u,
        v,
        update_norm: None,
        positions: None,
    }
}

/// The owned form of [`updates`], in epoch 0.
fn updates_owned(
    step: i64,
    instance_ids: &[i64],
    labels: &[i32],
    u: FactorValues,
    v: FactorValues,
) -> UpdateBatchOwned {
    UpdateBatchOwned {
        step,
        epoch: 0,
        instance_ids: instance_ids.to_vec(),
        labels: labels.to_vec(),
        u,
        v,
        update_norm: None,
        positions: None,
    }
}

// ------------------------------------------------------- round-trip property

#[derive(Debug, Clone)]
enum LayerSpec {
    Linear {
        i: usize,
        o: usize,
        bias: bool,
    },
    Conv {
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        hw: usize,
        full: bool,
    },
}

fn layer_spec() -> impl Strategy<Value = LayerSpec> {
    prop_oneof![
        (1usize..7, 1usize..6, any::<bool>()).prop_map(|(i, o, bias)| LayerSpec::Linear {
            i,
            o,
            bias
        }),
        (
            1usize..3,
            1usize..4,
            1usize..4,
            1usize..3,
            0usize..2,
            0usize..3,
            any::<bool>()
        )
            .prop_map(
                |(c_in, c_out, k, stride, pad, extra, full)| LayerSpec::Conv {
                    c_in,
                    c_out,
                    k,
                    stride,
                    pad,
                    hw: k + extra,
                    full,
                }
            ),
    ]
}

#[derive(Debug, Clone)]
struct Scenario {
    f16: bool,
    layers: Vec<LayerSpec>,
    steps: usize,
    commit_every: usize,
    seed: u64,
    norms_given: bool,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<bool>(),
        prop::collection::vec(layer_spec(), 1..4),
        0usize..7,
        1usize..4,
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(f16, layers, steps, commit_every, seed, norms_given)| Scenario {
                f16,
                layers,
                steps,
                commit_every,
                seed,
                norms_given,
            },
        )
}

/// Expected rows of one layer's `updates`.
#[derive(Default)]
struct Expected {
    step: Vec<i64>,
    epoch: Vec<i32>,
    ids: Vec<i64>,
    labels: Vec<i32>,
    u: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    norms: Vec<Option<f32>>,
}

fn run_scenario(s: &Scenario) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let modules: Vec<Module> = s
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| match *l {
            LayerSpec::Linear { i: fi, o, bias } => linear(&format!("l{i}"), fi, o, bias),
            LayerSpec::Conv {
                c_in,
                c_out,
                k,
                stride,
                pad,
                hw,
                full,
            } => conv(
                &format!("l{i}"),
                c_in,
                c_out,
                k,
                stride,
                pad,
                hw,
                if full {
                    Storage::Full
                } else {
                    Storage::Factors
                },
            ),
        })
        .collect();
    let model = model(modules);
    let dtype = if s.f16 { Dtype::F16 } else { Dtype::F32 };
    let classes = 3;
    let mut rec = Recorder::builder(&run)
        .model(model.clone())
        .optimizer(Optimizer::sgd(0.1))
        .classes((0..classes).map(|c| c.to_string()).collect())
        .dtype(dtype)
        .row_group_rows(5)
        .queue_depth(2)
        // A byte bound smaller than any message: each goes alone.
        .queue_bytes(if s.seed.is_multiple_of(2) {
            1
        } else {
            64 << 20
        })
        .setting("seed", serde_json::json!(s.seed))
        .build()
        .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed);
    let n_inst = 12i64;
    let ids: Vec<i64> = (0..n_inst).collect();
    let labels: Vec<i32> = ids.iter().map(|i| (i % classes) as i32).collect();
    let splits: Vec<Split> = ids
        .iter()
        .map(|i| {
            if i % 4 == 0 {
                Split::Test
            } else {
                Split::Train
            }
        })
        .collect();
    rec.instances(&ids, &labels, &splits).unwrap();
    let w0 = weights_of(&model, 0.0);
    rec.weights(&named(&w0)).unwrap();
    rec.commit().unwrap();

    let layers: Vec<TracedLayer> = model.traced_layers().collect();
    let mut expected: Vec<Expected> = layers.iter().map(|_| Expected::default()).collect();
    let mut exp_steps = Vec::new();
    let mut snapshots = vec![("weights/initial.safetensors".to_owned(), w0.clone())];
    for t in 0..s.steps {
        let epoch = (t / 2) as i32;
        let lr = 0.1 / (1.0 + t as f64);
        let n = rng.random_range(0..4usize);
        rec.step(step_row(t as i64, epoch, lr, n as i32, rng.random::<f64>()))
            .unwrap();
        exp_steps.push((t as i64, epoch, lr));
        for (li, layer) in layers.iter().enumerate() {
            let (ul, vl) = layer.factor_lens();
            let batch_ids: Vec<i64> = (0..n).map(|_| rng.random_range(0..n_inst)).collect();
            let batch_labels: Vec<i32> = batch_ids.iter().map(|i| (i % classes) as i32).collect();
            let u: Vec<f32> = (0..n * ul)
                .map(|_| {
                    if rng.random_bool(0.3) {
                        0.0
                    } else {
                        rng.random_range(-3.0f32..3.0)
                    }
                })
                .collect();
            let v: Vec<f32> = (0..n * vl)
                .map(|_| rng.random_range(-1e-2f32..1e-2))
                .collect();
            let norms: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
            rec.updates(
                layer.name(),
                UpdateBatch {
                    update_norm: s.norms_given.then_some(norms.as_slice()),
                    ..updates(t as i64, epoch, &batch_ids, &batch_labels, &u, &v)
                },
            )
            .unwrap();
            let e = &mut expected[li];
            for r in 0..n {
                e.step.push(t as i64);
                e.epoch.push(epoch);
                e.ids.push(batch_ids[r]);
                e.labels.push(batch_labels[r]);
                e.u.push(u[r * ul..(r + 1) * ul].to_vec());
                e.v.push(v[r * vl..(r + 1) * vl].to_vec());
                e.norms.push(s.norms_given.then_some(norms[r]));
            }
        }
        if (t + 1) % s.commit_every == 0 {
            if t % 2 == 0 {
                let w = weights_of(&model, t as f32);
                rec.weights(&named(&w)).unwrap();
                snapshots.push((layout::weights_path(Some(t as i64)), w));
            }
            rec.commit().unwrap();
        }
    }
    // Probes for every layer.
    let mut exp_probes = Vec::new();
    for layer in &layers {
        let (al, pl) = layer.probe_lens();
        let n = 3;
        let a: Vec<f64> = (0..n * al).map(|_| rng.random_range(-1.0..1.0)).collect();
        let p: Vec<f64> = (0..n * pl).map(|_| rng.random_range(-1.0..1.0)).collect();
        let probe_ids = [100, 101, 3];
        let inst = [None, None, Some(3)];
        rec.probes(
            layer.name(),
            ProbeBatch {
                probe_ids: &probe_ids,
                instance_ids: &inst,
                labels: &[0, 1, 2],
                predicted: &[0, 2, 2],
                a: &a,
                p: &p,
                positions: None,
            },
        )
        .unwrap();
        exp_probes.push((a, p, al, pl));
    }
    let wf = weights_of(&model, -1.0);
    snapshots.push((layout::FINAL_WEIGHTS.to_owned(), wf.clone()));
    let returned = rec.finish(&named(&wf)).unwrap();

    // ---- read back
    let m = Manifest::load(&run).unwrap();
    assert_eq!(m, returned, "finish() returns the manifest on disk");
    assert_eq!(m.status, Status::Complete);
    assert_eq!(m.dtype, dtype);
    assert_eq!(m.settings["seed"], serde_json::json!(s.seed));
    let last = s.steps.checked_sub(1).map(|t| t as i64);
    assert_eq!(m.last_step().map(|x| x.0), last);

    for f in m.commits.iter().flat_map(|c| &c.files) {
        let path = run.join(&f.path);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            f.bytes,
            "{}",
            f.path
        );
        let rows: usize = read_batches(&path).iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows as u64, f.rows, "{}", f.path);
        assert!(f.rows > 0, "no empty files: {}", f.path);
        // Each part is named after the commit that added it.
        let c = m.commits.iter().find(|c| c.files.contains(f)).unwrap();
        assert!(f.path.ends_with(&format!("part-{:06}.parquet", c.seq)));
    }
    // No temporary or uncommitted files remain.
    let mut stack = vec![run.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            assert!(!layout::is_temp_name(&name), "temp file left: {name}");
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }

    let inst = read_table(&run, &m, Table::Instances, None);
    assert_eq!(i64s(&inst, "instance_id"), ids);
    assert_eq!(i32s(&inst, "label"), labels);
    let split_col: Vec<String> = inst
        .iter()
        .flat_map(|b| {
            let a = b.column_by_name("split").unwrap().as_string::<i32>();
            (0..a.len())
                .map(|i| a.value(i).to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    let want_splits: Vec<String> = splits.iter().map(|s| s.as_str().to_owned()).collect();
    assert_eq!(split_col, want_splits);

    let st = read_table(&run, &m, Table::Steps, None);
    assert_eq!(
        i64s(&st, "step"),
        exp_steps.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    assert_eq!(
        i32s(&st, "epoch"),
        exp_steps.iter().map(|s| s.1).collect::<Vec<_>>()
    );
    assert_eq!(
        f64s(&st, "lr"),
        exp_steps.iter().map(|s| s.2).collect::<Vec<_>>()
    );

    for (li, layer) in layers.iter().enumerate() {
        let e = &expected[li];
        let b = read_table(&run, &m, Table::Updates, Some(layer.name()));
        assert_eq!(i64s(&b, "step"), e.step, "{}", layer.name());
        assert_eq!(i32s(&b, "epoch"), e.epoch);
        assert_eq!(i64s(&b, "instance_id"), e.ids);
        assert_eq!(i32s(&b, "label"), e.labels);
        let round = |x: &[f32]| -> Vec<f64> {
            x.iter()
                .map(|&x| match dtype {
                    Dtype::F32 => f64::from(x),
                    Dtype::F16 => f64::from(half::f16::from_f32(x).to_f32()),
                })
                .collect()
        };
        let want_u: Vec<Vec<f64>> = e.u.iter().map(|r| round(r)).collect();
        let want_v: Vec<Vec<f64>> = e.v.iter().map(|r| round(r)).collect();
        assert_eq!(lists(&b, "u"), want_u, "{} u", layer.name());
        assert_eq!(lists(&b, "v"), want_v, "{} v", layer.name());
        let norms = f32s(&b, "update_norm");
        for (r, got) in norms.iter().enumerate() {
            match e.norms[r] {
                Some(given) => assert_eq!(*got, given),
                None => {
                    // Computed from the values as stored: an f16 run's
                    // rounded ones, not the f32 input.
                    let (u, v) = (
                        round(&e.u[r]).iter().map(|&x| x as f32).collect::<Vec<_>>(),
                        round(&e.v[r]).iter().map(|&x| x as f32).collect::<Vec<_>>(),
                    );
                    let want = brute_norm(*layer, &u, &v);
                    assert!(
                        (f64::from(*got) - want).abs() <= 1e-5 * want.max(1e-6),
                        "{} row {r}: {got} vs {want}",
                        layer.name()
                    );
                }
            }
        }

        let pb = read_table(&run, &m, Table::Probes, Some(layer.name()));
        let (a, p, al, pl) = &exp_probes[li];
        assert_eq!(i64s(&pb, "probe_id"), vec![100, 101, 3]);
        let inst_col: Vec<Option<i64>> = pb
            .iter()
            .flat_map(|b| {
                let c = b
                    .column_by_name("instance_id")
                    .unwrap()
                    .as_primitive::<Int64Type>();
                (0..c.len())
                    .map(|i| c.is_valid(i).then(|| c.value(i)))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(inst_col, vec![None, None, Some(3)]);
        assert_eq!(i32s(&pb, "predicted"), vec![0, 2, 2]);
        let a_rows: Vec<Vec<f64>> = a.chunks(*al).map(<[f64]>::to_vec).collect();
        let p_rows: Vec<Vec<f64>> = p.chunks(*pl).map(<[f64]>::to_vec).collect();
        if *al > 0 {
            assert_eq!(lists(&pb, "a"), a_rows);
        }
        assert_eq!(lists(&pb, "p"), p_rows);
        for (got, row) in f64s(&pb, "p_norm").iter().zip(&p_rows) {
            let want = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((got - want).abs() <= 1e-12 * want.max(1.0));
        }
    }

    // Weights: one snapshot per commit that was given one, with exact contents.
    let listed: Vec<&str> = m
        .commits
        .iter()
        .filter_map(|c| c.weights.as_deref())
        .collect();
    let want: Vec<&str> = snapshots.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(listed, want);
    for (rel, w) in &snapshots {
        let mut w = w.clone();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(&read_safetensors(&run.join(rel)), &w, "{rel}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn round_trip(s in scenario()) {
        run_scenario(&s);
    }
}

// ------------------------------------------------------------- behaviour

fn tiny_model() -> Model {
    model(vec![
        linear("fc1", 3, 2, true),
        Module::Relu,
        linear("fc2", 2, 2, false),
    ])
}

/// A recorder of the tiny model: SGD at lr 0.5, classes a and b.
fn tiny_builder(run: &Path) -> RecorderBuilder {
    Recorder::builder(run)
        .model(tiny_model())
        .optimizer(Optimizer::sgd(0.5))
        .classes(vec!["a".into(), "b".into()])
}

fn tiny_recorder(run: &Path) -> Recorder {
    tiny_builder(run).build().unwrap()
}

/// A fresh directory with a tiny recorder writing to `<dir>/r`; the run lives
/// as long as the directory.
fn tiny_run() -> (tempfile::TempDir, PathBuf, Recorder) {
    tiny_run_in(Mode::Instance)
}

/// [`tiny_run`] recording in `mode`.
fn tiny_run_in(mode: Mode) -> (tempfile::TempDir, PathBuf, Recorder) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let rec = tiny_builder(&run).mode(mode).build().unwrap();
    (dir, run, rec)
}

/// The error message of `r`, checked to hold every one of `words`.
fn refused<T>(r: reptrace_record::Result<T>, words: &[&str]) -> String {
    let e = match r {
        Ok(_) => panic!("expected an error holding {words:?}"),
        Err(e) => e.to_string(),
    };
    assert!(words.iter().all(|w| e.contains(w)), "{e}");
    e
}

fn step_with_updates(rec: &mut Recorder, t: i64) {
    rec.step(step_row(t, 0, 0.5, 2, 1.0)).unwrap();
    rec.updates("fc1", updates(t, 0, &[0, 1], &[0, 1], &[1.0; 6], &[0.5; 4]))
        .unwrap();
}

#[test]
fn length_errors_name_layer_and_lengths() {
    let (_dir, _, mut rec) = tiny_run();
    refused(
        rec.updates("fc1", updates(0, 0, &[0, 1], &[0, 1], &[1.0; 5], &[0.5; 4])),
        &["\"fc1\"", "u has length 5, expected 6"],
    );
    refused(
        rec.updates("conv9", updates(0, 0, &[], &[], &[], &[])),
        &["conv9", "fc1, fc2"],
    );
    refused(
        rec.probes(
            "fc2",
            ProbeBatch {
                probe_ids: &[1],
                instance_ids: &[None],
                labels: &[0],
                predicted: &[1],
                a: &[0.0; 2],
                p: &[0.0; 3],
                positions: None,
            },
        ),
        &["\"fc2\"", "p has length 3, expected 2"],
    );
    refused(
        rec.instances(&[1, 2], &[0, 5], &[Split::Train; 2]),
        &["label", "5", "2 classes"],
    );
    let w = [0.0f32; 5];
    refused(
        rec.weights(&[NamedTensor {
            name: "fc1.weight",
            shape: &[5, 1],
            data: &w,
        }]),
        &["fc1.weight", "[2, 3]"],
    );
    // Mistakes do not poison the recorder.
    step_with_updates(&mut rec, 0);
    refused(
        rec.step(step_row(0, 0, 0.5, 2, 1.0)),
        &["step 0 is not after the previous step 0"],
    );
    let m = rec.finish(&[]).unwrap();
    assert_eq!(m.last_step().map(|s| s.0), Some(0));
}

#[test]
fn builder_checks() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("something"), b"x").unwrap();
    refused(tiny_builder(dir.path()).build(), &["not empty"]);
    refused(
        Recorder::builder(dir.path().join("x"))
            .optimizer(Optimizer::sgd(0.1))
            .build(),
        &["model is required"],
    );
    let bad = model(vec![linear("fc-1", 2, 2, true)]);
    refused(
        Recorder::builder(dir.path().join("y"))
            .model(bad)
            .optimizer(Optimizer::sgd(0.1))
            .build(),
        &["fc-1"],
    );
    refused(
        tiny_builder(&dir.path().join("z")).zstd_level(40).build(),
        &["zstd_level"],
    );
    // An existing empty directory is fine.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let mut rec = tiny_recorder(&empty);
    let m = Manifest::load(&empty).unwrap();
    assert_eq!(m.status, Status::Recording);
    assert!(m.commits.is_empty());
    rec.abort("test").unwrap();
}

#[test]
fn drop_discards_uncommitted_and_keeps_commits() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    {
        let mut rec = tiny_recorder(&run);
        step_with_updates(&mut rec, 0);
        step_with_updates(&mut rec, 1);
        rec.commit().unwrap();
        step_with_updates(&mut rec, 2);
        rec.flush().unwrap();
        // The open part of commit 1 exists under its temporary name.
        assert!(
            run.join("updates/layer=fc1/.part-000001.parquet.tmp")
                .exists()
        );
    }
    let m = Manifest::load(&run).unwrap();
    assert_eq!(m.status, Status::Aborted);
    assert_eq!(
        m.abort_reason.as_deref(),
        Some("recorder dropped without finish()")
    );
    assert_eq!(m.commits.len(), 1);
    assert_eq!(m.last_step().map(|s| s.0), Some(1));
    assert!(
        !run.join("updates/layer=fc1/.part-000001.parquet.tmp")
            .exists()
    );
    assert!(!run.join("steps/.part-000001.parquet.tmp").exists());
    let steps = read_table(&run, &m, Table::Steps, None);
    assert_eq!(i64s(&steps, "step"), vec![0, 1]);
    assert_eq!(
        read_table(&run, &m, Table::Updates, Some("fc1"))
            .iter()
            .map(|b| b.num_rows())
            .sum::<usize>(),
        4
    );
}

#[test]
fn abort_commits_pending_and_keeps_reason() {
    let (_dir, run, mut rec) = tiny_run();
    step_with_updates(&mut rec, 0);
    rec.commit().unwrap();
    step_with_updates(&mut rec, 1);
    let m = rec.abort("non-finite loss at step 2").unwrap();
    assert_eq!(m.status, Status::Aborted);
    assert_eq!(m.abort_reason.as_deref(), Some("non-finite loss at step 2"));
    assert_eq!(m.commits.len(), 2);
    assert_eq!(m.last_step().map(|s| s.0), Some(1));
    assert_eq!(Manifest::load(&run).unwrap(), m);
    refused(rec.commit(), &["abort() was already called"]);
    drop(rec); // dropping after abort changes nothing
    assert_eq!(Manifest::load(&run).unwrap(), m);
}

#[test]
fn weights_only_commit_and_duplicate_snapshot() {
    let (_dir, _, mut rec) = tiny_run();
    let w = weights_of(&tiny_model(), 1.0);
    rec.weights(&named(&w)).unwrap();
    rec.commit().unwrap(); // initial
    step_with_updates(&mut rec, 0);
    rec.commit().unwrap();
    rec.weights(&named(&w)).unwrap();
    rec.commit().unwrap(); // no new rows, weights at step 0
    rec.weights(&named(&w)).unwrap();
    refused(rec.commit(), &["weights/step-00000000.safetensors"]);
    let m = rec.finish(&named(&w)).unwrap();
    let seqs: Vec<(u64, usize, Option<&str>)> = m
        .commits
        .iter()
        .map(|c| (c.seq, c.files.len(), c.weights.as_deref()))
        .collect();
    assert_eq!(
        seqs,
        vec![
            (0, 0, Some("weights/initial.safetensors")),
            (1, 2, None),
            (2, 0, Some("weights/step-00000000.safetensors")),
            (3, 0, Some("weights/final.safetensors")),
        ]
    );
    assert_eq!(m.initial_weights(), Some("weights/initial.safetensors"));
}

#[test]
fn writer_error_comes_back_and_aborts_the_run() {
    let (_dir, run, mut rec) = tiny_run();
    step_with_updates(&mut rec, 0);
    rec.commit().unwrap();
    rec.flush().unwrap();
    // Make the next part's directory impossible to create: a file where
    // the `layer=fc2` directory should go.
    std::fs::write(run.join("updates/layer=fc2"), b"in the way").unwrap();
    rec.updates("fc2", updates(1, 0, &[0], &[0], &[1.0, 1.0], &[1.0, 1.0]))
        .unwrap();
    refused(rec.flush(), &["layer=fc2"]);
    refused(rec.commit(), &["failed earlier"]);
    let m = Manifest::load(&run).unwrap();
    assert_eq!(m.status, Status::Aborted);
    assert!(m.abort_reason.unwrap().contains("layer=fc2"));
    assert_eq!(m.commits.len(), 1, "committed data is kept");
    assert!(!run.join("steps/.part-000001.parquet.tmp").exists());
}

#[test]
fn batch_mode_accepts_full_updates() {
    let (_dir, run, mut rec) = tiny_run_in(Mode::Batch);
    // fc1: ΔW 2×3 followed by Δb (2).
    let v = [3.0f32, 0.0, 0.0, 0.0, 4.0, 0.0, 9.0, 9.0];
    rec.updates("fc1", updates(0, 0, &[7], &[1], &[], &v))
        .unwrap();
    let m = rec.finish(&[]).unwrap();
    assert_eq!(m.mode, Mode::Batch);
    let b = read_table(&run, &m, Table::Updates, Some("fc1"));
    assert_eq!(f32s(&b, "update_norm"), vec![5.0]);
    assert_eq!(lists(&b, "u"), vec![Vec::<f64>::new()]);
}

// ----------------------------------------------------------------- crash

const CHILD_ENV: &str = "REPTRACE_CRASH_CHILD_RUN";
const ROWS_PER_STEP: usize = 8;

/// The child process of `crash_leaves_a_readable_trace`: records until it
/// is killed. In a normal test run (no environment variable) it returns at once.
#[test]
fn crash_child_process() {
    let Some(run) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let model = model(vec![
        linear("fc1", 16, 8, true),
        Module::Relu,
        conv("conv", 1, 2, 3, 1, 1, 4, Storage::Factors),
    ]);
    let mut rec = Recorder::builder(PathBuf::from(run))
        .model(model.clone())
        .optimizer(Optimizer::sgd(0.1))
        .row_group_rows(16)
        .build()
        .unwrap();
    let ids: Vec<i64> = (0..ROWS_PER_STEP as i64).collect();
    rec.instances(&ids, &[0; ROWS_PER_STEP], &[Split::Train; ROWS_PER_STEP])
        .unwrap();
    let w = weights_of(&model, 0.0);
    rec.weights(&named(&w)).unwrap();
    rec.commit().unwrap();
    let layers: Vec<(String, usize, usize)> = model
        .traced_layers()
        .map(|l| (l.name().to_owned(), l.factor_lens().0, l.factor_lens().1))
        .collect();
    for t in 0i64.. {
        let epoch = (t / 5) as i32;
        let loss = 1.0 / (1.0 + t as f64);
        rec.step(step_row(t, epoch, 0.1, ROWS_PER_STEP as i32, loss))
            .unwrap();
        for (name, ul, vl) in &layers {
            let u: Vec<f32> = (0..ROWS_PER_STEP * ul)
                .map(|i| (i as f32 + t as f32).sin())
                .collect();
            let v: Vec<f32> = (0..ROWS_PER_STEP * vl)
                .map(|i| (i as f32 * 0.1).cos())
                .collect();
            rec.updates(name, updates(t, epoch, &ids, &[0; ROWS_PER_STEP], &u, &v))
                .unwrap();
        }
        if t % 3 == 2 {
            if t % 2 == 0 {
                rec.weights(&named(&w)).unwrap();
            }
            rec.commit().unwrap();
        }
    }
}

/// Checks a killed run: the manifest parses, a directory listing shows only
/// committed parts (and, once the run is opened, all of them), committed
/// files are complete and hold exactly the steps 0..=last_step, nothing with
/// a final name is partial. Returns the last committed step.
fn check_killed_run(run: &Path) -> Option<i64> {
    let loaded = Manifest::load(run).unwrap();
    let mut committed: Vec<String> = Table::ALL
        .iter()
        .flat_map(|&t| loaded.files(t))
        .map(|f| f.path.clone())
        .collect();
    committed.sort();
    for f in listed_parquet(run) {
        assert!(committed.contains(&f), "{f} is listed but not committed");
    }
    // Opening finishes a commit the kill interrupted after its manifest.
    let m = Manifest::open(run).unwrap();
    assert_eq!(m, loaded);
    assert_eq!(listed_parquet(run), committed, "after open");
    assert_eq!(m.status, Status::Recording, "killed, not finished");
    for f in m.commits.iter().flat_map(|c| &c.files) {
        let rows: usize = read_batches(&run.join(&f.path))
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(rows as u64, f.rows, "{}", f.path);
    }
    for w in m.commits.iter().filter_map(|c| c.weights.as_deref()) {
        assert!(!read_safetensors(&run.join(w)).is_empty(), "{w}");
    }
    let last = m.last_step().map(|s| s.0);
    let want: Vec<i64> = match last {
        Some(l) => (0..=l).collect(),
        None => vec![],
    };
    let steps = read_table(run, &m, Table::Steps, None);
    assert_eq!(i64s(&steps, "step"), want);
    for layer in ["fc1", "conv"] {
        let b = read_table(run, &m, Table::Updates, Some(layer));
        let got = i64s(&b, "step");
        let expect: Vec<i64> = want
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, ROWS_PER_STEP))
            .collect();
        assert_eq!(got, expect, "{layer}");
    }
    // Every file with a final (non-temporary) Parquet name opens.
    let mut stack = vec![run.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if name.ends_with(".parquet") {
                read_batches(&e.path());
            }
        }
    }
    last
}

#[test]
fn crash_leaves_a_readable_trace() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut lasts = Vec::new();
    for round in 0..6 {
        let run = dir.path().join(format!("run{round}"));
        let mut child = handmade::spawn_recording_child("crash_child_process", CHILD_ENV, &run);
        // Wait for the first commit, then kill at a random later point.
        handmade::wait_for_commit(&mut child, &run, |m| !m.commits.is_empty());
        std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
        handmade::kill(child); // SIGKILL
        lasts.push(check_killed_run(&run));
    }
    eprintln!("last committed steps at the kills: {lasts:?}");
    // The kills landed after some training steps were committed.
    assert!(lasts.iter().any(|l| l.is_some()), "{lasts:?}");
}

/// Checkpoint probes: each commit lists its own; those of the two latest
/// commits are kept, older ones leave the manifest and then the disk; the
/// final probes replace them all.
#[test]
fn checkpoint_probes_are_kept_for_two_commits_and_dropped_at_the_end() {
    let (_dir, run, mut rec) = tiny_run();
    let w = weights_of(&tiny_model(), 1.0);
    rec.weights(&named(&w)).unwrap();
    rec.commit().unwrap();
    let probe = |rec: &mut Recorder, checkpoint: bool, id: i64| {
        let batch = ProbeBatch {
            probe_ids: &[id],
            instance_ids: &[None],
            labels: &[1],
            predicted: &[0],
            a: &[1.0, 2.0, 3.0],
            p: &[0.5, -0.5],
            positions: None,
        };
        if checkpoint {
            rec.checkpoint_probes("fc1", batch).unwrap();
        } else {
            rec.probes("fc1", batch).unwrap();
        }
    };
    let checkpoint_files = |run: &Path| -> Vec<String> {
        let dir = run.join("checkpoints/probes/layer=fc1");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    for t in 0..3 {
        step_with_updates(&mut rec, t);
        probe(&mut rec, true, 10 + t);
        rec.weights(&named(&w)).unwrap();
        rec.commit().unwrap();
        rec.flush().unwrap();
        let m = Manifest::load(&run).unwrap();
        let with: Vec<u64> = m
            .commits
            .iter()
            .filter(|c| !c.probes.is_empty())
            .map(|c| c.seq)
            .collect();
        let last = t as u64 + 1;
        let want: Vec<u64> = (last.saturating_sub(1).max(1)..=last).collect();
        assert_eq!(with, want, "after step {t}");
        let listed: Vec<String> = m
            .commits
            .iter()
            .flat_map(|c| &c.probes)
            .map(|f| f.path.rsplit('/').next().unwrap().to_owned())
            .collect();
        assert_eq!(
            checkpoint_files(&run),
            listed,
            "files on disk after step {t}"
        );
        // Analysis of the unfinished run uses the latest checkpoint.
        let a = m.analysis_probes().unwrap();
        assert!(a.checkpoint);
        assert_eq!(a.step.map(|s| s.0), Some(t));
        assert_eq!(a.weights, format!("weights/step-{t:08}.safetensors"));
        let rows = read_table(&run, &m, Table::Probes, Some("fc1"));
        assert!(rows.is_empty(), "no final probes yet");
        let ids = i64s(&read_batches(&run.join(&a.files[0].path)), "probe_id");
        assert_eq!(ids, vec![10 + t]);
    }
    probe(&mut rec, false, 99);
    let m = rec.finish(&named(&w)).unwrap();
    assert!(m.commits.iter().all(|c| c.probes.is_empty()));
    assert!(checkpoint_files(&run).is_empty());
    let a = m.analysis_probes().unwrap();
    assert!(!a.checkpoint);
    assert_eq!(a.weights, "weights/final.safetensors");
    assert_eq!(Manifest::load(&run).unwrap(), m);
}

/// Batch steps: one `updates` row per layer with the whole update
/// (instance_id null; label the batch's class only when it has one), and
/// the members in `batches`; refused in instance mode.
#[test]
fn batch_steps_record_whole_updates_and_members() {
    let (dir, run, mut rec) = tiny_run_in(Mode::Batch);
    // fc1: ΔW 2×3 then Δb (2); fc2: ΔW 2×2, no bias.
    let fc1 = [3.0f32, 0.0, 0.0, 0.0, 4.0, 0.0, 9.0, 9.0];
    let fc2 = [1.0f32, 2.0, 2.0, 4.0];
    for (step, labels) in [(0i64, [1, 1]), (1, [0, 1])] {
        rec.batch_step(reptrace_record::BatchStep {
            step,
            epoch: 0,
            instance_ids: &[2 * step, 2 * step + 1],
            labels: &labels,
            deltas: &[("fc1", &fc1), ("fc2", &fc2)],
        })
        .unwrap();
    }
    refused(
        rec.batch_step(reptrace_record::BatchStep {
            step: 2,
            epoch: 0,
            instance_ids: &[4],
            labels: &[0],
            deltas: &[("fc1", &fc1[..5])],
        }),
        &["layer \"fc1\"", "delta"],
    );
    let m = rec.finish(&[]).unwrap();
    let u = read_table(&run, &m, Table::Updates, Some("fc1"));
    assert_eq!(u.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    let ids = u[0].column_by_name("instance_id").unwrap();
    assert_eq!(ids.null_count(), 2);
    let labels = u[0]
        .column_by_name("label")
        .unwrap()
        .as_primitive::<Int32Type>();
    assert_eq!(
        (labels.is_valid(0), labels.value(0), labels.is_valid(1)),
        (true, 1, false)
    );
    assert_eq!(f32s(&u, "update_norm"), vec![5.0, 5.0]);
    let v = read_table(&run, &m, Table::Updates, Some("fc2"));
    assert_eq!(lists(&v, "v")[1], vec![1.0, 2.0, 2.0, 4.0]);
    let b = read_table(&run, &m, Table::Batches, None);
    assert_eq!(i64s(&b, "instance_id"), vec![0, 1, 2, 3]);
    assert_eq!(i64s(&b, "step"), vec![0, 0, 1, 1]);
    assert_eq!(i32s(&b, "label"), vec![1, 1, 0, 1]);

    let mut rec = tiny_recorder(&dir.path().join("instance"));
    refused(
        rec.batch_step(reptrace_record::BatchStep {
            step: 0,
            epoch: 0,
            instance_ids: &[0],
            labels: &[0],
            deltas: &[],
        }),
        &["instance mode"],
    );
}

/// A kill at either side of the manifest write: a part finished but not yet
/// committed stays invisible to directory readers, and a committed part not
/// yet renamed (kill right after the manifest write) is published by the
/// next `Manifest::open`, after which they see exactly the committed files.
#[test]
fn directory_readers_see_exactly_the_committed_parts() {
    let (_dir, run, mut rec) = tiny_run();
    step_with_updates(&mut rec, 0);
    rec.commit().unwrap();
    step_with_updates(&mut rec, 1);
    rec.commit().unwrap();
    rec.finish(&[]).unwrap();
    let m = Manifest::load(&run).unwrap();
    let mut committed: Vec<String> = Table::ALL
        .iter()
        .flat_map(|&t| m.files(t))
        .map(|f| f.path.clone())
        .collect();
    committed.sort();
    assert!(committed.len() >= 4, "{committed:?}");
    assert_eq!(listed_parquet(&run), committed);

    // Kill after the manifest write, before the rename: the part of the
    // last commit is still under its temporary name.
    let last = m
        .commits
        .iter()
        .rev()
        .find_map(|c| c.files.first())
        .unwrap()
        .path
        .clone();
    let path = run.join(&last);
    std::fs::rename(&path, layout::temp_path(&path)).unwrap();
    // Kill before the manifest write: a complete part nobody committed.
    let stray = run.join("updates/layer=fc1/part-000099.parquet");
    std::fs::copy(run.join(&committed[0]), layout::temp_path(&stray)).unwrap();

    let listed = listed_parquet(&run);
    assert!(!listed.contains(&last), "not yet published");
    assert!(listed.iter().all(|f| committed.contains(f)), "{listed:?}");

    let opened = Manifest::open(&run).unwrap();
    assert_eq!(opened, m, "opening changes no manifest");
    assert_eq!(
        listed_parquet(&run),
        committed,
        "after open: exactly the committed parts"
    );
    assert!(
        layout::temp_path(&stray).exists(),
        "uncommitted data is not published"
    );
    assert_eq!(
        Manifest::open(&run)
            .unwrap()
            .publish_committed(&run)
            .unwrap(),
        0
    );
}

/// Probe rows of `ids` for one layer of the tiny model: no instances, label
/// and prediction 1.
struct ProbeRows {
    ids: Vec<i64>,
    instance_ids: Vec<Option<i64>>,
    labels: Vec<i32>,
    a: Vec<f64>,
    p: Vec<f64>,
}

impl ProbeRows {
    /// The rows of `ids` for `layer` (fc1 takes 3 inputs, fc2 2).
    fn new(layer: &str, ids: &[i64]) -> Self {
        let a_len = if layer == "fc1" { 3 } else { 2 };
        let n = ids.len();
        ProbeRows {
            ids: ids.to_vec(),
            instance_ids: vec![None; n],
            labels: vec![1; n],
            a: (0..n * a_len).map(|i| i as f64 * 0.5).collect(),
            p: (0..n * 2).map(|i| i as f64 - 1.0).collect(),
        }
    }

    fn batch(&self) -> ProbeBatch<'_> {
        ProbeBatch {
            probe_ids: &self.ids,
            instance_ids: &self.instance_ids,
            labels: &self.labels,
            predicted: &self.labels,
            a: &self.a,
            p: &self.p,
            positions: None,
        }
    }
}

fn add_probes(app: &mut ProbeAppender, layer: &str, ids: &[i64]) -> reptrace_record::Result<()> {
    app.probes(layer, ProbeRows::new(layer, ids).batch())
}

/// A completed tiny run at `<dir>/r` with instances 0..4 and probes 10, 11
/// in both layers.
fn completed_tiny_run() -> (tempfile::TempDir, PathBuf) {
    let (dir, run, mut rec) = tiny_run();
    rec.instances(&[0, 1, 2, 3], &[0, 1, 0, 1], &[Split::Train; 4])
        .unwrap();
    let w = weights_of(&tiny_model(), 0.1);
    rec.weights(&named(&w)).unwrap();
    rec.commit().unwrap();
    step_with_updates(&mut rec, 0);
    for layer in ["fc1", "fc2"] {
        rec.probes(layer, ProbeRows::new(layer, &[10, 11]).batch())
            .unwrap();
    }
    rec.finish(&named(&weights_of(&tiny_model(), 0.2))).unwrap();
    (dir, run)
}

/// Every file of the run but the manifest, with its bytes.
fn run_files(run: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, out: &mut std::collections::BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p
                .file_name()
                .is_some_and(|n| n != "manifest.json" && n != layout::LOCK)
            {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(run, &mut out);
    out
}

#[test]
fn probes_are_appended_to_a_completed_run_as_one_new_commit() {
    let (_dir, run) = completed_tiny_run();
    let before = run_files(&run);
    let m0 = Manifest::load(&run).unwrap();

    let mut app = ProbeAppender::open(&run).unwrap();
    assert_eq!(
        app.next_probe_id(),
        12,
        "above probes 10, 11 and instances 0..4"
    );
    for layer in ["fc2", "fc1"] {
        add_probes(&mut app, layer, &[12, 13]).unwrap();
        add_probes(&mut app, layer, &[20]).unwrap();
    }
    assert_eq!(app.next_probe_id(), 21);
    let m = app.commit().unwrap();
    // The lock went with the appender.
    drop(ProbeAppender::open(&run).unwrap());

    assert_eq!(m, Manifest::load(&run).unwrap());
    assert_eq!(m.status, Status::Complete);
    assert_eq!(m.commits.len(), m0.commits.len() + 1);
    assert_eq!(m.commits[..m0.commits.len()], m0.commits[..]);
    let new = m.commits.last().unwrap();
    assert_eq!(new.step, m0.commits.last().unwrap().step);
    assert!(new.weights.is_none() && new.probes.is_empty());
    assert_eq!(new.files.len(), 2);
    // Nothing already in the run changed; the new parts have final names.
    let after = run_files(&run);
    for (path, bytes) in &before {
        assert_eq!(after.get(path), Some(bytes), "{}", path.display());
    }
    for f in &new.files {
        assert!(run.join(&f.path).exists(), "{}", f.path);
        assert!(!f.path.contains(".tmp"));
    }
    // The probes table now holds both sets, and the analysis uses the final weights.
    for layer in ["fc1", "fc2"] {
        let rows = read_table(&run, &m, Table::Probes, Some(layer));
        assert_eq!(i64s(&rows, "probe_id"), vec![10, 11, 12, 13, 20]);
        let a = lists(&rows, "a");
        assert_eq!(a[2], ProbeRows::new(layer, &[12]).a);
    }
    let analysis = m.analysis_probes().unwrap();
    assert_eq!(analysis.weights, layout::FINAL_WEIGHTS);
    assert!(!analysis.checkpoint);
    assert_eq!(analysis.files.len(), 4);
}

#[test]
fn appending_probes_refuses_bad_input_and_leaves_the_run_as_it_was() {
    let (dir, run) = completed_tiny_run();
    let before = run_files(&run);
    let m0 = Manifest::load(&run).unwrap();
    let unchanged = |what: &str| {
        assert_eq!(run_files(&run), before, "{what}");
        assert_eq!(Manifest::load(&run).unwrap(), m0, "{what}");
    };

    let mut app = ProbeAppender::open(&run).unwrap();
    refused(
        ProbeAppender::open(&run),
        &["another process is writing to this run"],
    );
    refused(
        add_probes(&mut app, "fc1", &[11]),
        &["probe id 11 is already a probe id"],
    );
    refused(
        add_probes(&mut app, "fc1", &[30, 30]),
        &["probe id 30 is given twice"],
    );
    refused(
        add_probes(&mut app, "fc9", &[30]),
        &["\"fc9\" is not a traced layer"],
    );
    add_probes(&mut app, "fc1", &[30, 31]).unwrap();
    add_probes(&mut app, "fc2", &[30]).unwrap();
    refused(
        app.commit(),
        &["every traced layer needs rows for the same probes"],
    );
    unchanged("a refused commit");

    // Dropped without commit: the written rows go, the lock is released.
    let mut app = ProbeAppender::open(&run).unwrap();
    add_probes(&mut app, "fc1", &[40]).unwrap();
    add_probes(&mut app, "fc2", &[40]).unwrap();
    drop(app);
    unchanged("a dropped appender");
    refused(
        ProbeAppender::open(&run).unwrap().commit(),
        &["no probes were added"],
    );
    unchanged("an empty commit");

    // A run that did not complete.
    let aborted = dir.path().join("aborted");
    let mut rec = tiny_recorder(&aborted);
    step_with_updates(&mut rec, 0);
    rec.abort("stopped").unwrap();
    refused(
        ProbeAppender::open(&aborted),
        &["probes are added to a completed run; this run is aborted"],
    );
}

/// A copy of a run's directory: what a killed writer leaves, with a free
/// lock (the copy's `.lock` is a new file nobody holds).
fn copy_run(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_run(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Probe rows of `ids` for both layers of the tiny model, as checkpoint probes.
fn tiny_checkpoint_probes(rec: &mut Recorder, ids: &[i64]) {
    for layer in ["fc1", "fc2"] {
        rec.checkpoint_probes(layer, ProbeRows::new(layer, ids).batch())
            .unwrap();
    }
}

#[test]
fn a_live_recorder_holds_the_run_lock_until_it_closes() {
    let dir = tempfile::tempdir().unwrap();
    let w = weights_of(&tiny_model(), 0.1);
    let live = |name: &str| {
        let run = dir.path().join(name);
        let mut rec = tiny_recorder(&run);
        rec.instances(&[0, 1], &[0, 1], &[Split::Train; 2]).unwrap();
        rec.weights(&named(&w)).unwrap();
        rec.commit().unwrap();
        step_with_updates(&mut rec, 0);
        rec.weights(&named(&w)).unwrap();
        rec.commit().unwrap();
        rec.flush().unwrap();
        // The run has trained weights, but its writer is alive.
        let err = ProbeAppender::open(&run).unwrap_err().to_string();
        assert!(
            err.contains("the run is still being recorded"),
            "{name}: {err}"
        );
        assert!(layout::lock(&run, false).unwrap().is_none(), "{name}");
        (run, rec)
    };
    // finish() lets go of the lock while the recorder still exists.
    let (run, mut rec) = live("finished");
    rec.finish(&named(&w)).unwrap();
    let app = ProbeAppender::open(&run).unwrap();
    assert_eq!(app.weights().0, layout::FINAL_WEIGHTS);
    drop(app);
    drop(rec);
    // So do abort() and a drop without either.
    let (run, mut rec) = live("aborted");
    rec.abort("stopped").unwrap();
    assert!(layout::lock(&run, false).unwrap().is_some());
    let (run, rec) = live("dropped");
    drop(rec);
    assert!(layout::lock(&run, false).unwrap().is_some());
    assert_eq!(Manifest::load(&run).unwrap().status, Status::Aborted);
}

#[test]
fn probes_are_added_to_a_killed_run_as_of_its_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("live");
    let w = weights_of(&tiny_model(), 0.1);
    let mut rec = tiny_recorder(&run);
    rec.instances(&[0, 1, 2, 3], &[0, 1, 0, 1], &[Split::Train; 4])
        .unwrap();
    rec.weights(&named(&w)).unwrap();
    rec.commit().unwrap();
    step_with_updates(&mut rec, 0);
    tiny_checkpoint_probes(&mut rec, &[10, 11]);
    rec.weights(&named(&weights_of(&tiny_model(), 0.2)))
        .unwrap();
    rec.commit().unwrap();
    // A step that is never committed: the kill comes first.
    step_with_updates(&mut rec, 1);
    rec.flush().unwrap();
    let killed = dir.path().join("killed");
    copy_run(&run, &killed);

    let m0 = Manifest::open(&killed).unwrap();
    assert_eq!(m0.status, Status::Recording);
    let before = run_files(&killed);
    let mut app = ProbeAppender::open(&killed).unwrap();
    let checkpoint = "weights/step-00000000.safetensors";
    assert_eq!(app.weights(), (checkpoint, reptrace_format::Step(0)));
    assert_eq!(app.next_probe_id(), 12, "above checkpoint probes 10, 11");
    refused(
        add_probes(&mut app, "fc1", &[11]),
        &["probe id 11 is already a probe id"],
    );
    for layer in ["fc1", "fc2"] {
        add_probes(&mut app, layer, &[12, 13]).unwrap();
    }
    let m = app.commit().unwrap();
    assert_eq!(m, Manifest::load(&killed).unwrap());
    assert_eq!(m.status, Status::Recording);
    assert_eq!(m.commits[..m0.commits.len()], m0.commits[..]);
    for (path, bytes) in &before {
        assert_eq!(
            run_files(&killed).get(path),
            Some(bytes),
            "{}",
            path.display()
        );
    }
    // The analysis stands on the checkpoint: its probes and the new ones,
    // with its weights.
    let a = m.analysis_probes().unwrap();
    assert!(a.checkpoint);
    assert_eq!(
        (a.weights, a.step),
        (checkpoint, Some(reptrace_format::Step(0)))
    );
    assert_eq!(a.files.len(), 4);
    let ids: Vec<i64> = a
        .files
        .iter()
        .filter(|f| f.layer.as_deref() == Some("fc1"))
        .flat_map(|f| i64s(&read_batches(&killed.join(&f.path)), "probe_id"))
        .collect();
    assert_eq!(ids, vec![10, 11, 12, 13]);
    let app = ProbeAppender::open(&killed).unwrap();
    assert_eq!(app.next_probe_id(), 14);
    assert_eq!(app.weights().0, checkpoint);
    drop(app);

    // Probes that training writes with (or before) its latest weights are
    // final probes, even while checkpoint probes are still listed (a kill
    // inside finish()): they stand with those weights.
    for layer in ["fc1", "fc2"] {
        rec.probes(layer, ProbeRows::new(layer, &[50]).batch())
            .unwrap();
    }
    rec.weights(&named(&w)).unwrap();
    rec.commit().unwrap();
    rec.flush().unwrap();
    let m = Manifest::load(&run).unwrap();
    assert!(m.commits.iter().any(|c| !c.probes.is_empty()));
    let a = m.analysis_probes().unwrap();
    assert!(!a.checkpoint);
    assert_eq!(a.weights, "weights/step-00000001.safetensors");
    assert_eq!(a.files.len(), 2);
    rec.finish(&named(&w)).unwrap();
}

#[test]
fn probes_need_weights_after_a_training_step() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("live");
    let w = weights_of(&tiny_model(), 0.1);
    let mut rec = tiny_recorder(&run);
    rec.instances(&[0, 1], &[0, 1], &[Split::Train; 2]).unwrap();
    rec.weights(&named(&w)).unwrap();
    rec.commit().unwrap();
    step_with_updates(&mut rec, 0);
    rec.commit().unwrap();
    rec.flush().unwrap();
    // Killed with the initial weights only.
    let killed = dir.path().join("killed");
    copy_run(&run, &killed);
    refused(
        ProbeAppender::open(&killed),
        &["the run has no weights after a training step; probes need trained weights"],
    );
    // A killed run without checkpoint probes: the latest weights, and the
    // added probes stand with them.
    rec.weights(&named(&w)).unwrap();
    rec.commit().unwrap();
    rec.flush().unwrap();
    let killed = dir.path().join("killed-later");
    copy_run(&run, &killed);
    let mut app = ProbeAppender::open(&killed).unwrap();
    assert_eq!(app.weights().0, "weights/step-00000000.safetensors");
    for layer in ["fc1", "fc2"] {
        add_probes(&mut app, layer, &[7]).unwrap();
    }
    let m = app.commit().unwrap();
    let a = m.analysis_probes().unwrap();
    assert!(!a.checkpoint);
    assert_eq!(a.weights, "weights/step-00000000.safetensors");
    assert_eq!(a.files.len(), 2);
    rec.finish(&named(&w)).unwrap();
}

/// The rows of `updates` of every layer as read back, with the file bytes
/// aside: (layer, step, instance ids, labels, u, v, update_norm).
type UpdateTable = Vec<(
    String,
    Vec<i64>,
    Vec<i64>,
    Vec<i32>,
    Vec<Vec<f64>>,
    Vec<Vec<f64>>,
    Vec<f32>,
)>;

fn update_table(run: &Path, layers: &[&str]) -> UpdateTable {
    let m = Manifest::open(run).unwrap();
    layers
        .iter()
        .map(|&l| {
            let b = read_table(run, &m, Table::Updates, Some(l));
            (
                l.to_owned(),
                i64s(&b, "step"),
                i64s(&b, "instance_id"),
                i32s(&b, "label"),
                lists(&b, "u"),
                lists(&b, "v"),
                f32s(&b, "update_norm"),
            )
        })
        .collect()
}

/// Records the same random factors through `updates` (slices, converted to
/// the run's dtype by the writer) and through `updates_owned` (buffers moved;
/// for f16 runs converted to f16 by the caller, as the tch loop does on the
/// device): the tables read back are identical, bit for bit, in both dtypes.
#[test]
fn owned_and_borrowed_updates_give_identical_rows() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let steps: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..5)
        .map(|_| {
            // fc1: 3 → 2, fc2: 2 → 2; 4 instances; values over f16's range,
            // subnormals and ties included by the spread of magnitudes.
            let mut r = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| {
                        let e: i32 = rng.random_range(-20..8);
                        rng.random_range(-1.0f32..1.0) * 2f32.powi(e)
                    })
                    .collect()
            };
            (r(4 * 3), r(4 * 2), r(4 * 2))
        })
        .collect();
    let ids = [4i64, 7, 1, 9];
    let labels = [0i32, 1, 1, 0];
    let record = |run: &Path, dtype: Dtype, owned: bool| {
        let mut rec = tiny_builder(run)
            .dtype(dtype)
            .run_id("same-run")
            .build()
            .unwrap();
        for (t, (u1, v1, u2)) in steps.iter().enumerate() {
            let t = t as i64;
            // fc2 has no bias: u is the fc1 output (2), v its delta (2).
            for (layer, u, v) in [("fc1", u1, v1), ("fc2", u2, v1)] {
                if owned {
                    let values = |x: &Vec<f32>| match dtype {
                        Dtype::F32 => FactorValues::F32(x.clone()),
                        Dtype::F16 => {
                            FactorValues::F16(x.iter().map(|&e| half::f16::from_f32(e)).collect())
                        }
                    };
                    let batch = updates_owned(t, &ids, &labels, values(u), values(v));
                    rec.updates_owned(layer, batch).unwrap();
                } else {
                    rec.updates(layer, updates(t, 0, &ids, &labels, u, v))
                        .unwrap();
                }
            }
        }
        let w = weights_of(&tiny_model(), 0.0);
        rec.finish(&named(&w)).unwrap();
    };
    for dtype in [Dtype::F32, Dtype::F16] {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("borrowed"), dir.path().join("owned"));
        record(&a, dtype, false);
        record(&b, dtype, true);
        let (ta, tb) = (
            update_table(&a, &["fc1", "fc2"]),
            update_table(&b, &["fc1", "fc2"]),
        );
        assert_eq!(ta[0].1.len(), 20, "{dtype:?}: 5 steps × 4 rows of fc1");
        // Bit for bit: compare the f64 widening of the stored values.
        let bits = |t: &UpdateTable| -> Vec<Vec<u64>> {
            t.iter()
                .flat_map(|r| r.4.iter().chain(&r.5))
                .map(|row| row.iter().map(|x| x.to_bits()).collect())
                .collect()
        };
        assert_eq!(bits(&ta), bits(&tb), "{dtype:?}: factor values differ");
        let meta = |t: &UpdateTable| -> Vec<_> {
            t.iter()
                .map(|r| (r.0.clone(), r.1.clone(), r.2.clone(), r.3.clone()))
                .collect()
        };
        assert_eq!(meta(&ta), meta(&tb), "{dtype:?}: keys differ");
        // The norms: computed by the writer from the values as stored
        // (an f16 run's rounded ones, whichever path rounded them), so
        // equal bit for bit in both dtypes.
        for (ra, rb) in ta.iter().zip(&tb) {
            for (x, y) in ra.6.iter().zip(&rb.6) {
                assert_eq!(
                    x.to_bits(),
                    y.to_bits(),
                    "{dtype:?} {}: norm {x} vs {y}",
                    ra.0
                );
            }
        }
    }
    // f16 values for an f32 run: one error naming the layer, nothing sent.
    let dir = tempfile::tempdir().unwrap();
    let mut rec = tiny_recorder(dir.path());
    refused(
        rec.updates_owned(
            "fc1",
            updates_owned(
                0,
                &[0, 1],
                &[0, 1],
                FactorValues::F16(vec![half::f16::ONE; 6]),
                FactorValues::F16(vec![half::f16::ONE; 4]),
            ),
        ),
        &["\"fc1\"", "f16 factors for a run recorded in f32"],
    );
}

/// An embedding record whose `u` is not token ids (a digit that is not an
/// integer in 0..2048, or an id at or above num_embeddings) is refused in
/// one line naming the layer, and nothing of it is written.
#[test]
fn embedding_records_must_hold_token_ids() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let tok = Module::Embedding(reptrace_format::EmbeddingSpec {
        name: "tok".into(),
        num_embeddings: 100,
        embedding_dim: 2,
        padding_idx: None,
        positions: 2,
        traced: true,
        storage: Storage::Factors,
        ragged: false,
    });
    let mut rec = Recorder::builder(&run)
        .model(model(vec![tok]))
        .optimizer(Optimizer::sgd(0.5))
        .classes(vec!["a".into(), "b".into()])
        .build()
        .unwrap();
    rec.step(step_row(0, 0, 0.5, 1, 1.0)).unwrap();
    let v = [0.5f32; 4];
    for (bad, words) in [
        ([3.0f32, 2.5], "token 1 of the u values ([2.5])"),
        (
            [3.0, 100.0],
            "([100.0]) is not the base-2048 digits of an id below num_embeddings 100",
        ),
        ([-1.0, 4.0], "token 0 of the u values ([-1.0])"),
    ] {
        let e = refused(
            rec.updates("tok", updates(0, 0, &[7], &[1], &bad, &v)),
            &["\"tok\"", words],
        );
        assert!(!e.contains('\n'), "{e}");
    }
    rec.updates("tok", updates(0, 0, &[7], &[1], &[3.0, 99.0], &v))
        .unwrap();
    let m = rec.finish(&[]).unwrap();
    let rows: u64 = m.files(Table::Updates).iter().map(|f| f.rows).sum();
    assert_eq!(rows, 1, "only the good record is written");
}

// ------------------------------------------------ distributed runs (format 11)

/// The `rank` column of every committed `updates` file of layer fc1.
fn ranks(run: &Path, m: &Manifest) -> Vec<Option<i32>> {
    read_table(run, m, Table::Updates, Some("fc1"))
        .iter()
        .flat_map(|b| {
            let c = b
                .column_by_name("rank")
                .unwrap()
                .as_primitive::<Int32Type>();
            (0..c.len())
                .map(|i| c.is_valid(i).then(|| c.value(i)))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Rank 0 owns the run; rank 1 writes its records beside it, stages them,
/// and rank 0's commit lists and publishes them: every record carries its
/// rank, and nothing of rank 1 is visible before the commit that lists it.
#[test]
fn ranks_write_one_run_and_rank_0_commits_every_ranks_files() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let mut owner = tiny_builder(&run).rank(0).build().unwrap();
    // A worker finds the run directory rank 0 made, and takes its run id.
    let mut worker = tiny_builder(&run)
        .rank(1)
        .run_id(owner.run_id())
        .build()
        .unwrap();
    assert_eq!(worker.rank(), Some(1));
    owner.commit().unwrap();
    for t in 0..2 {
        owner.step(step_row(t, 0, 0.5, 4, 1.0)).unwrap();
        owner
            .updates("fc1", updates(t, 0, &[0, 1], &[0, 1], &[1.0; 6], &[0.5; 4]))
            .unwrap();
        worker
            .updates(
                "fc1",
                updates(t, 0, &[2, 3], &[1, 0], &[2.0; 6], &[0.25; 4]),
            )
            .unwrap();
    }
    // Only rank 0 commits; a worker's rows go into its staged files.
    refused(worker.commit(), &["rank 1", "commit()", "rank 0's job"]);
    refused(
        worker.step(step_row(2, 0, 0.5, 4, 1.0)),
        &["rank 1", "step()"],
    );
    refused(owner.stage(), &["only a recorder of a rank other than 0"]);
    let staged = worker.stage().unwrap();
    assert_eq!(staged.len(), 1);
    assert_eq!(
        staged[0].path,
        "updates/layer=fc1/part-000001-rank1.parquet"
    );
    assert_eq!(staged[0].rows, 4);
    let path = run.join(&staged[0].path);
    assert!(!path.exists() && layout::temp_path(&path).exists());
    // Not yet listed: readers of the manifest do not see it.
    assert_eq!(Manifest::load(&run).unwrap().commits.len(), 1);
    owner.adopt(staged).unwrap();
    owner.commit().unwrap();
    owner.flush().unwrap();
    assert!(path.exists(), "published by rank 0's commit");
    let m = Manifest::load(&run).unwrap();
    assert_eq!(m.commits.len(), 2);
    assert_eq!(
        m.commits[1].files.len(),
        3,
        "steps, rank 0's and rank 1's updates"
    );
    let mut got = ranks(&run, &m);
    got.sort();
    assert_eq!(
        got,
        [
            Some(0),
            Some(0),
            Some(0),
            Some(0),
            Some(1),
            Some(1),
            Some(1),
            Some(1)
        ]
    );
    // Files keep the run's id in their metadata (verify checks it).
    let ids = i64s(
        &read_table(&run, &m, Table::Updates, Some("fc1")),
        "instance_id",
    );
    let mut ids = ids;
    ids.sort();
    assert_eq!(ids, [0, 0, 1, 1, 2, 2, 3, 3]);

    // A rank that dies before staging leaves the run at the last commit:
    // its next records never reach a manifest.
    worker
        .updates(
            "fc1",
            updates(2, 0, &[2, 3], &[1, 0], &[2.0; 6], &[0.25; 4]),
        )
        .unwrap();
    worker.flush().unwrap();
    drop(worker);
    assert!(
        !run.join("updates/layer=fc1/.part-000002-rank1.parquet.tmp")
            .exists()
    );
    owner.step(step_row(2, 0, 0.5, 4, 1.0)).unwrap();
    owner.abandon("rank 1 stopped").unwrap();
    let end = Manifest::load(&run).unwrap();
    assert_eq!(end.status, Status::Aborted);
    assert_eq!(end.abort_reason.as_deref(), Some("rank 1 stopped"));
    assert_eq!(end.commits, m.commits, "nothing after the last commit");
    assert!(!run.join("steps/.part-000002.parquet.tmp").exists());
}

/// A single-process run's records have a null rank; a file staged on a
/// file system rank 0 does not see is refused, naming it.
#[test]
fn single_process_records_have_no_rank_and_unshared_files_are_refused() {
    let (_dir, run, mut rec) = tiny_run();
    rec.commit().unwrap();
    step_with_updates(&mut rec, 0);
    rec.commit().unwrap();
    rec.flush().unwrap();
    let m = Manifest::load(&run).unwrap();
    assert_eq!(ranks(&run, &m), [None, None]);

    let (_dir2, run2, mut owner) = tiny_run();
    let elsewhere = reptrace_format::FileEntry {
        path: "updates/layer=fc1/part-000001-rank1.parquet".into(),
        table: "updates".into(),
        layer: Some("fc1".into()),
        rows: 2,
        bytes: 100,
    };
    owner.adopt(vec![elsewhere.clone()]).unwrap();
    let e = refused(
        owner.flush(),
        &["part-000001-rank1.parquet", "shared file system"],
    );
    assert!(!e.contains('\n'), "{e}");
    let m = Manifest::load(&run2).unwrap();
    assert_eq!(m.status, Status::Aborted);
    // Paths outside the run's tables are refused too.
    let (_dir3, _, mut owner) = tiny_run();
    let outside = reptrace_format::FileEntry {
        path: "../x/part-1.parquet".into(),
        ..elsewhere
    };
    owner.adopt(vec![outside]).unwrap();
    refused(
        owner.flush(),
        &["not a part file of table updates inside the run"],
    );
}
