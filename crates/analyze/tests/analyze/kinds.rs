//! The embedding, layer_norm and rms_norm kinds end to end: a run written
//! through the Recorder, attributed, every contribution row (records and
//! residual) checked against a brute force from the stored values.
use crate::read;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reptrace_analyze::verify::{Options as VerifyOptions, Status, verify};
use reptrace_analyze::{Options, ProbeSelection, attribute};
use reptrace_format::{
    EmbeddingSpec, Manifest, Model, Module, NormSpec, Optimizer, Split, Storage,
    displacement_scales,
};
use reptrace_record::{NamedTensor, ProbeBatch, Recorder, StepRow, UpdateBatch};
use std::collections::HashMap;
use std::path::Path;

/// A traced layer of the test model, as the brute force reads it.
#[derive(Clone)]
enum Layer {
    /// An embedding with `num × dim` weights over `t` positions; ids take
    /// `digits` base-2048 digits; records are whole updates when `full`.
    Embedding {
        num: usize,
        dim: usize,
        t: usize,
        digits: usize,
        full: bool,
    },
    /// A norm's affine part: γ (and β with `bias`) of `d` over `t` positions.
    Norm { d: usize, t: usize, bias: bool },
}

impl Layer {
    /// `(u_len, v_len)` of a record.
    fn record_lens(&self) -> (usize, usize) {
        match *self {
            Layer::Embedding { num, dim, full, .. } if full => (0, num * dim),
            Layer::Embedding { dim, t, digits, .. } => (t * digits, t * dim),
            Layer::Norm { d, bias, .. } => (0, if bias { 2 * d } else { d }),
        }
    }

    /// `(a_len, p_len)` of a probe.
    fn probe_lens(&self) -> (usize, usize) {
        match *self {
            Layer::Embedding { dim, t, digits, .. } => (t * digits, t * dim),
            Layer::Norm { d, t, .. } => (t * d, t * d),
        }
    }

    /// `[vec ΔW, Δb]` of a record's stored `u`, `v`.
    fn delta(&self, u: &[f64], v: &[f64]) -> Vec<f64> {
        match *self {
            Layer::Embedding {
                num,
                dim,
                full: false,
                ..
            } => {
                let mut w = vec![0.0; num * dim];
                for (t, id) in self.ids(u).into_iter().enumerate() {
                    for k in 0..dim {
                        w[id * dim + k] += v[t * dim + k];
                    }
                }
                w
            }
            _ => v.to_vec(),
        }
    }

    /// The token ids of stored digits, decoded plainly.
    fn ids(&self, a: &[f64]) -> Vec<usize> {
        let Layer::Embedding { digits, .. } = *self else {
            unreachable!("only embeddings have ids")
        };
        a.chunks(digits)
            .map(|ds| ds.iter().fold(0, |id, &x| id * 2048 + x as usize))
            .collect()
    }

    /// `c = ΔW ⊛ a + Δb` for the update `delta` (`[vec ΔW, Δb]`).
    fn forward(&self, delta: &[f64], a: &[f64]) -> Vec<f64> {
        match *self {
            Layer::Embedding { dim, .. } => self
                .ids(a)
                .into_iter()
                .flat_map(|id| delta[id * dim..(id + 1) * dim].to_vec())
                .collect(),
            Layer::Norm { d, t, bias } => {
                let mut c = vec![0.0; t * d];
                for i in 0..t {
                    for j in 0..d {
                        c[i * d + j] =
                            delta[j] * a[i * d + j] + if bias { delta[d + j] } else { 0.0 };
                    }
                }
                c
            }
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// Token ids as base-2048 digits, most significant first.
fn digits(ids: &[usize], n: usize) -> Vec<f32> {
    ids.iter()
        .flat_map(|&id| (0..n).rev().map(move |k| ((id >> (11 * k)) % 2048) as f32))
        .collect()
}

const PAD: usize = 7;

/// The model: a 2-digit embedding with factor records, a small one with
/// whole records, a layer_norm and an rms_norm.
fn model() -> (Model, Vec<(&'static str, Layer)>) {
    let emb = |name: &str, num, dim, t, padding_idx, storage| {
        Module::Embedding(EmbeddingSpec {
            name: name.into(),
            num_embeddings: num,
            embedding_dim: dim,
            padding_idx,
            positions: t,
            traced: true,
            storage,
            ragged: false,
        })
    };
    let norm = |name: &str, shape: Vec<usize>, bias| NormSpec {
        name: name.into(),
        normalized_shape: shape,
        bias,
        eps: 1e-5,
        positions: 3,
        traced: true,
        ragged: false,
    };
    let modules = vec![
        emb("tok", 3000, 4, 3, Some(PAD), Storage::Factors),
        emb("small", 6, 2, 5, None, Storage::Full),
        Module::LayerNorm(norm("ln", vec![2, 2], true)),
        Module::RmsNorm(norm("rms", vec![4], false)),
    ];
    let layers = vec![
        (
            "tok",
            Layer::Embedding {
                num: 3000,
                dim: 4,
                t: 3,
                digits: 2,
                full: false,
            },
        ),
        (
            "small",
            Layer::Embedding {
                num: 6,
                dim: 2,
                t: 5,
                digits: 1,
                full: true,
            },
        ),
        (
            "ln",
            Layer::Norm {
                d: 4,
                t: 3,
                bias: true,
            },
        ),
        (
            "rms",
            Layer::Norm {
                d: 4,
                t: 3,
                bias: false,
            },
        ),
    ];
    let model = Model {
        name: "kinds".into(),
        input_shape: vec![3],
        structure: Default::default(),
        modules,
        frozen: vec![],
    };
    (model, layers)
}

/// The weight tensors (name, shape) of a layer.
fn tensors(name: &str, layer: &Layer) -> Vec<(String, Vec<usize>)> {
    match *layer {
        Layer::Embedding { num, dim, .. } => vec![(format!("{name}.weight"), vec![num, dim])],
        Layer::Norm { d, bias, .. } => {
            let shape = if name == "ln" { vec![2, 2] } else { vec![d] };
            let mut t = vec![(format!("{name}.weight"), shape.clone())];
            if bias {
                t.push((format!("{name}.bias"), shape));
            }
            t
        }
    }
}

fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Random `a` (token digits or x̂) of `n` probes or records.
fn inputs(rng: &mut ChaCha8Rng, layer: &Layer, n: usize) -> Vec<f32> {
    match *layer {
        Layer::Embedding {
            num, t, digits: nd, ..
        } => {
            // A few tokens (repeats, ids past 2048, the padding id).
            let pool: Vec<usize> = [0, 1, PAD, 2047, 2048, 2999]
                .into_iter()
                .filter(|&id| id < num)
                .chain([num - 1, num / 2])
                .collect();
            let ids: Vec<usize> = (0..n * t)
                .map(|_| pool[rng.random_range(0..pool.len())])
                .collect();
            digits(&ids, nd)
        }
        Layer::Norm { d, t, .. } => uniform(rng, n * t * d),
    }
}

/// A weights snapshot: (tensor name, shape, values).
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn named(w: &Tensors) -> Vec<NamedTensor<'_>> {
    w.iter()
        .map(|(n, s, d)| NamedTensor {
            name: n,
            shape: s,
            data: d,
        })
        .collect()
}

/// Writes the run: two steps of two instances, two probes per layer, final
/// weights off the recorded updates (a residual to attribute). Returns the
/// layers and the initial and final weights.
fn write(dir: &Path) -> (Vec<(&'static str, Layer)>, Tensors, Tensors) {
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    let (model, layers) = model();
    let mut rec = Recorder::builder(dir)
        .model(model)
        .optimizer(Optimizer::sgd(0.1))
        .classes(vec!["a".into(), "b".into()])
        .build()
        .unwrap();
    let train = Split::Train;
    rec.instances(
        &[0, 1, 2, 3, 10, 11],
        &[0, 1, 0, 1, 0, 1],
        &[train, train, train, train, Split::Test, Split::Test],
    )
    .unwrap();
    let weights = |rng: &mut ChaCha8Rng| -> Tensors {
        layers
            .iter()
            .flat_map(|(name, l)| tensors(name, l))
            .map(|(n, shape)| {
                let data = uniform(rng, shape.iter().product());
                (n, shape, data)
            })
            .collect()
    };
    let initial = weights(&mut rng);
    rec.weights(&named(&initial)).unwrap();
    rec.commit().unwrap();
    for step in 0..2i64 {
        let row = StepRow {
            step,
            epoch: 0,
            lr: 0.1,
            batch_size: 2,
            loss: 0.5,
            skipped: false,
        };
        rec.step(row).unwrap();
        let ids = [2 * step, 2 * step + 1];
        for (name, layer) in &layers {
            let (ul, vl) = layer.record_lens();
            let u = if ul == 0 {
                vec![]
            } else {
                inputs(&mut rng, layer, 2)
            };
            let mut v = uniform(&mut rng, 2 * vl);
            if let Layer::Embedding {
                dim, full: false, ..
            } = *layer
            {
                // PyTorch gives the padding id's positions a zero gradient.
                let u64s: Vec<f64> = u.iter().map(|&x| f64::from(x)).collect();
                for (t, id) in layer.ids(&u64s).into_iter().enumerate() {
                    if id == PAD {
                        v[t * dim..(t + 1) * dim].fill(0.0);
                    }
                }
            }
            let batch = UpdateBatch {
                step,
                epoch: 0,
                instance_ids: &ids,
                labels: &[0, 1],
                u: &u,
                v: &v,
                update_norm: None,
                positions: None,
            };
            rec.updates(name, batch).unwrap();
        }
    }
    // Probes refined by exactly the whole change: p = (W_T − W_0) ⊛ a.
    let last = weights(&mut rng);
    for (name, layer) in &layers {
        let (al, _) = layer.probe_lens();
        let a: Vec<f64> = inputs(&mut rng, layer, 2)
            .into_iter()
            .map(f64::from)
            .collect();
        let change: Vec<f64> = flat(&last, name)
            .iter()
            .zip(flat(&initial, name))
            .map(|(t, i)| t - i)
            .collect();
        let p: Vec<f64> = a
            .chunks(al)
            .flat_map(|a| layer.forward(&change, a))
            .collect();
        let batch = ProbeBatch {
            probe_ids: &[10, 11],
            instance_ids: &[Some(10), Some(11)],
            labels: &[0, 1],
            predicted: &[0, 0],
            a: &a,
            p: &p,
            positions: None,
        };
        rec.probes(name, batch).unwrap();
    }
    rec.finish(&named(&last)).unwrap();
    (layers, initial, last)
}

/// `[vec W, b]` of layer `name` in a snapshot, widened.
fn flat(w: &Tensors, name: &str) -> Vec<f64> {
    let mut out = vec![];
    for suffix in ["weight", "bias"] {
        if let Some((_, _, d)) = w.iter().find(|(n, _, _)| *n == format!("{name}.{suffix}")) {
            out.extend(d.iter().map(|&x| f64::from(x)));
        }
    }
    out
}

/// `x` within 1e-9 of `want`, relative to `scale` (or `want`).
fn close(x: f64, want: f64, scale: f64, what: &str) {
    let tol = 1e-9 * scale.max(want.abs()).max(1e-300);
    assert!((x - want).abs() <= tol, "{what}: {x} vs {want}");
}

#[test]
fn embedding_and_norm_contributions_match_brute_force() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let (layers, initial, last) = write(&run);
    let options = Options {
        probes: ProbeSelection::All,
        ..Options::default()
    };
    attribute(&run, &options, &mut |_| {}).unwrap();
    let m = Manifest::load(&run).unwrap();
    let o = &m.optimizer;
    let scales = displacement_scales(&read::lrs(&run), o.momentum, o.dampening, o.nesterov);
    let layers: HashMap<&str, Layer> = layers.into_iter().collect();
    let updates = read::updates(&run);
    let rows = read::contributions(&run);
    let mut checked = 0;
    for p in read::probes(&run) {
        let layer = &layers[p.layer.as_str()];
        let of_probe = |step: Option<i64>, inst: Option<i64>| {
            let found: Vec<_> = rows
                .iter()
                .filter(|r| r.layer == p.layer && r.probe_id == p.probe_id)
                .filter(|r| r.step == step && r.instance_id == inst)
                .collect();
            assert_eq!(found.len(), 1, "{} probe {}", p.layer, p.probe_id);
            found[0].clone()
        };
        // The residual: the change not in the records.
        let mut residual: Vec<f64> = flat(&last, &p.layer)
            .iter()
            .zip(flat(&initial, &p.layer))
            .map(|(t, i)| t - i)
            .collect();
        for up in updates.iter().filter(|u| u.layer == p.layer) {
            let s = scales[up.step as usize];
            let delta = layer.delta(&up.u, &up.v);
            residual
                .iter_mut()
                .zip(&delta)
                .for_each(|(r, d)| *r -= s * d);
            let c = layer.forward(&delta, &p.a);
            let row = of_probe(Some(up.step), Some(up.instance_id));
            let what = format!("{} probe {} step {}", p.layer, p.probe_id, up.step);
            close(
                row.dot,
                s * dot(&c, &p.p),
                s.abs() * norm(&c) * norm(&p.p),
                &what,
            );
            close(row.norm, s.abs() * norm(&c), 0.0, &what);
            checked += 1;
        }
        let c = layer.forward(&residual, &p.a);
        let row = of_probe(None, None);
        let what = format!("{} probe {} residual", p.layer, p.probe_id);
        close(row.dot, dot(&c, &p.p), norm(&c) * norm(&p.p), &what);
        close(row.norm, norm(&c), 0.0, &what);
        assert!(norm(&c) > 0.0, "{what} is not trivial");
    }
    assert_eq!(
        checked,
        4 * 2 * 4,
        "rows of 4 layers × 2 probes × 4 records"
    );
    // verify's completeness of the attribution (records + residual = the
    // whole change applied to each probe) runs through `direct`.
    let report = verify(&run, &VerifyOptions::default()).unwrap();
    for name in ["completeness: attribution", "integrity: contributions"] {
        let c = report.checks.iter().find(|c| c.name == name).unwrap();
        assert_eq!(c.status, Status::Pass, "{c:?}");
    }
}
