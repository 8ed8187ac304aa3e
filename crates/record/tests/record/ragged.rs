//! Ragged sequence layers (format 9): records and probes whose rows hold
//! their own number of positions, written through the public API and read
//! back with the arrow Parquet reader.
use super::{f32s, f64s, i64s, lists, model, read_table, refused, step_row};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reptrace_format::{
    Dtype, EmbeddingSpec, LinearSpec, Module, NormSpec, Optimizer, Storage, Table,
};
use reptrace_record::{
    FactorValues, ProbeAppender, ProbeBatch, Recorder, UpdateBatch, UpdateBatchOwned,
};
use std::path::Path;

const IN: usize = 3;
const OUT: usize = 2;
const DIM: usize = 3;
/// Above 2048: the embedding stores two digits per token id.
const VOCAB: usize = 5000;
const DIGITS: usize = 2;
const D: usize = 4;

/// A ragged linear `seq` (3 → 2, spec T = 4), a ragged embedding `tok`
/// (5000 × 3, T = 4), a ragged layer norm `ln` (D = 4) and a fixed linear
/// `fc` (3 → 2, T = 1).
fn ragged_model() -> reptrace_format::Model {
    let seq = LinearSpec {
        positions: 4,
        ragged: true,
        ..LinearSpec::new("seq", IN, OUT, true)
    };
    let tok = EmbeddingSpec {
        name: "tok".into(),
        num_embeddings: VOCAB,
        embedding_dim: DIM,
        padding_idx: None,
        positions: 4,
        traced: true,
        storage: Storage::Factors,
        ragged: true,
    };
    let ln = NormSpec {
        name: "ln".into(),
        normalized_shape: vec![D],
        bias: true,
        eps: 1e-5,
        positions: 4,
        traced: true,
        ragged: true,
    };
    model(vec![
        Module::Linear(seq),
        Module::Embedding(tok),
        Module::LayerNorm(ln),
        Module::Linear(LinearSpec::new("fc", IN, OUT, true)),
    ])
}

fn ragged_recorder(run: &Path) -> Recorder {
    ragged_recorder_in(run, Dtype::F32)
}

fn ragged_recorder_in(run: &Path, dtype: Dtype) -> Recorder {
    Recorder::builder(run)
        .model(ragged_model())
        .optimizer(Optimizer::sgd(0.5))
        .classes(vec!["a".into(), "b".into()])
        .dtype(dtype)
        .build()
        .unwrap()
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// `n` token ids below [`VOCAB`] as two base-2048 digits each (most
/// significant first), with the ids.
fn token_ids(rng: &mut ChaCha8Rng, n: usize) -> (Vec<u64>, Vec<f32>) {
    // Few distinct ids, so that positions of a row share rows of ΔE.
    let ids: Vec<u64> = (0..n)
        .map(|_| [7, 2049, 4999, 0][rng.random_range(0..4usize)])
        .collect();
    let digits = ids
        .iter()
        .flat_map(|&id| [(id / 2048) as f32, (id % 2048) as f32])
        .collect();
    (ids, digits)
}

/// ‖ΔW‖_F of a linear record at `t` positions, ΔW[o][i] = Σ_t v[t][o]·u[t][i]
/// formed with plain loops in f64.
fn linear_norm(u: &[f64], v: &[f64]) -> f64 {
    let t = v.len() / OUT;
    assert_eq!(u.len(), t * IN);
    let mut sq = 0.0;
    for o in 0..OUT {
        for i in 0..IN {
            let mut w = 0.0;
            for q in 0..t {
                w += v[q * OUT + o] * u[q * IN + i];
            }
            sq += w * w;
        }
    }
    sq.sqrt()
}

/// ‖ΔE‖_F of an embedding record: v's rows added into a full table by token
/// id, in f64.
fn embedding_norm(u: &[f64], v: &[f64]) -> f64 {
    let t = v.len() / DIM;
    assert_eq!(u.len(), t * DIGITS);
    let mut table = vec![0.0f64; VOCAB * DIM];
    for q in 0..t {
        let id = (u[q * DIGITS] * 2048.0 + u[q * DIGITS + 1]) as usize;
        for j in 0..DIM {
            table[id * DIM + j] += v[q * DIM + j];
        }
    }
    table.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// What one written record should read back as.
struct Want {
    step: i64,
    id: i64,
    u: Vec<f64>,
    v: Vec<f64>,
    /// A caller-given norm, stored as is.
    given_norm: Option<f32>,
}

/// The update norm is stored as f32: the recorder's f64 sum rounded once.
fn assert_norm(got: f32, want: f64, what: &str) {
    let tol = want.abs() * f64::from(f32::EPSILON) + 1e-30;
    assert!(
        (f64::from(got) - want).abs() <= tol,
        "{what}: update_norm {got} vs brute force {want}"
    );
}

/// Writes one layer's batch of rows, `per_row[i]` positions each, with
/// `positions` given or not, and notes what should come back.
#[allow(clippy::too_many_arguments)]
fn write_rows(
    rec: &mut Recorder,
    rng: &mut ChaCha8Rng,
    layer: &str,
    step: i64,
    per_row: &[u32],
    give_positions: bool,
    given_norms: bool,
    wants: &mut Vec<Want>,
) {
    let (a, b) = if layer == "seq" {
        (IN, OUT)
    } else {
        (DIGITS, DIM)
    };
    let total: usize = per_row.iter().map(|&p| p as usize).sum();
    let u = if layer == "seq" {
        random(rng, total * a)
    } else {
        token_ids(rng, total).1
    };
    let v = random(rng, total * b);
    let ids: Vec<i64> = (0..per_row.len() as i64).map(|i| 100 * step + i).collect();
    let labels = vec![1; per_row.len()];
    let norms: Vec<f32> = (0..per_row.len()).map(|i| 10.0 + i as f32).collect();
    rec.updates(
        layer,
        UpdateBatch {
            step,
            epoch: 0,
            instance_ids: &ids,
            labels: &labels,
            u: &u,
            v: &v,
            update_norm: given_norms.then_some(norms.as_slice()),
            positions: give_positions.then_some(per_row),
        },
    )
    .unwrap();
    let (mut pu, mut pv) = (0, 0);
    for (i, &p) in per_row.iter().enumerate() {
        let p = p as usize;
        wants.push(Want {
            step,
            id: ids[i],
            u: u[pu..pu + p * a].iter().map(|&x| f64::from(x)).collect(),
            v: v[pv..pv + p * b].iter().map(|&x| f64::from(x)).collect(),
            given_norm: given_norms.then_some(norms[i]),
        });
        pu += p * a;
        pv += p * b;
    }
}

#[test]
fn ragged_records_hold_each_rows_positions() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let mut rec = ragged_recorder(&run);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut wants: std::collections::BTreeMap<&str, Vec<Want>> = Default::default();
    for step in 0..5 {
        rec.step(step_row(step, 0, 0.5, 3, 1.0)).unwrap();
    }
    for layer in ["seq", "tok"] {
        let w = wants.entry(layer).or_default();
        // Step 0: rows of 0, 1 and 3 positions, given.
        write_rows(&mut rec, &mut rng, layer, 0, &[0, 1, 3], true, false, w);
        // Steps 1 and 2: every row 2 positions, then every row 6 (more
        // than the spec's T = 4), without positions.
        write_rows(&mut rec, &mut rng, layer, 1, &[2, 2], false, false, w);
        write_rows(&mut rec, &mut rng, layer, 2, &[6, 6, 6], false, false, w);
        // Step 3: every row without any position: empty lists.
        write_rows(&mut rec, &mut rng, layer, 3, &[0, 0], false, false, w);
        // Step 4: a caller-given update_norm is stored as is.
        write_rows(&mut rec, &mut rng, layer, 4, &[3, 0, 1], true, true, w);
    }
    let m = rec.finish(&[]).unwrap();
    for (layer, wants) in &wants {
        let batches = read_table(&run, &m, Table::Updates, Some(layer));
        let (steps, ids) = (i64s(&batches, "step"), i64s(&batches, "instance_id"));
        let (u, v) = (lists(&batches, "u"), lists(&batches, "v"));
        let norms = f32s(&batches, "update_norm");
        assert_eq!(steps.len(), wants.len(), "{layer}");
        for (r, want) in wants.iter().enumerate() {
            let what = format!("{layer} step {} instance {}", want.step, want.id);
            assert_eq!((steps[r], ids[r]), (want.step, want.id), "{what}");
            assert_eq!(u[r], want.u, "{what}: u");
            assert_eq!(v[r], want.v, "{what}: v");
            match want.given_norm {
                Some(n) => assert_eq!(norms[r], n, "{what}"),
                None if *layer == "seq" => assert_norm(norms[r], linear_norm(&u[r], &v[r]), &what),
                None => assert_norm(norms[r], embedding_norm(&u[r], &v[r]), &what),
            }
        }
        // The rows of 0 positions are there, with empty lists and norm 0.
        assert!(u.iter().zip(&norms).any(|(u, &n)| u.is_empty() && n == 0.0));
    }
}

/// Probe rows of one layer: `per_row[i]` positions each, random `a` (token
/// ids for `tok`) and `p`.
struct Probes {
    ids: Vec<i64>,
    instance_ids: Vec<Option<i64>>,
    labels: Vec<i32>,
    a: Vec<f64>,
    p: Vec<f64>,
    per_row: Vec<u32>,
}

impl Probes {
    fn new(rng: &mut ChaCha8Rng, layer: &str, ids: &[i64], per_row: &[u32]) -> Self {
        let (a_unit, p_unit) = match layer {
            "seq" | "fc" => (IN, OUT),
            "tok" => (DIGITS, DIM),
            _ => (D, D),
        };
        let total: usize = per_row.iter().map(|&p| p as usize).sum();
        let a = if layer == "tok" {
            token_ids(rng, total).1
        } else {
            random(rng, total * a_unit)
        };
        Probes {
            ids: ids.to_vec(),
            instance_ids: vec![None; ids.len()],
            labels: vec![0; ids.len()],
            a: a.iter().map(|&x| f64::from(x)).collect(),
            p: (0..total * p_unit)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect(),
            per_row: per_row.to_vec(),
        }
    }

    fn batch(&self, give_positions: bool) -> ProbeBatch<'_> {
        ProbeBatch {
            probe_ids: &self.ids,
            instance_ids: &self.instance_ids,
            labels: &self.labels,
            predicted: &self.labels,
            a: &self.a,
            p: &self.p,
            positions: give_positions.then_some(&self.per_row),
        }
    }

    /// Row `i`'s `a` and `p`.
    fn row(&self, i: usize) -> (Vec<f64>, Vec<f64>) {
        let total: usize = self.per_row.iter().map(|&p| p as usize).sum();
        let (a_unit, p_unit) = (self.a.len() / total, self.p.len() / total);
        let start: usize = self.per_row[..i].iter().map(|&p| p as usize).sum();
        let end = start + self.per_row[i] as usize;
        (
            self.a[start * a_unit..end * a_unit].to_vec(),
            self.p[start * p_unit..end * p_unit].to_vec(),
        )
    }
}

/// Every probe row of `layer` in the run's `probes` table, by probe id:
/// `(a, p, p_norm)`.
fn probe_table(
    run: &Path,
    m: &reptrace_format::Manifest,
    layer: &str,
) -> std::collections::BTreeMap<i64, (Vec<f64>, Vec<f64>, f64)> {
    let batches = read_table(run, m, Table::Probes, Some(layer));
    let ids = i64s(&batches, "probe_id");
    let (a, p) = (lists(&batches, "a"), lists(&batches, "p"));
    let norms = f64s(&batches, "p_norm");
    ids.into_iter()
        .zip(a)
        .zip(p)
        .zip(norms)
        .map(|(((id, a), p), n)| (id, (a, p, n)))
        .collect()
}

fn check_probes(table: &std::collections::BTreeMap<i64, (Vec<f64>, Vec<f64>, f64)>, ps: &Probes) {
    for (i, id) in ps.ids.iter().enumerate() {
        let (a, p, norm) = &table[id];
        let (want_a, want_p) = ps.row(i);
        assert_eq!((a, p), (&want_a, &want_p), "probe {id}");
        let mut sq = 0.0;
        for x in &want_p {
            sq += x * x;
        }
        let want = sq.sqrt();
        assert!(
            (norm - want).abs() <= 1e-12 * want,
            "probe {id}: {norm} vs {want}"
        );
    }
}

#[test]
fn ragged_probes_hold_each_rows_positions_also_when_added_later() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let mut rec = ragged_recorder(&run);
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    rec.step(step_row(0, 0, 0.5, 1, 1.0)).unwrap();
    let mut written = Vec::new();
    for layer in ["seq", "tok", "ln", "fc"] {
        // Given positions 1, 3, 2; then every row 5 positions, not given.
        let (first, second) = if layer == "fc" {
            (Probes::new(&mut rng, layer, &[0, 1, 2], &[1, 1, 1]), None)
        } else {
            (
                Probes::new(&mut rng, layer, &[0, 1, 2], &[1, 3, 2]),
                Some(Probes::new(&mut rng, layer, &[3, 4], &[5, 5])),
            )
        };
        rec.probes(layer, first.batch(layer != "fc")).unwrap();
        if let Some(second) = &second {
            rec.probes(layer, second.batch(false)).unwrap();
        }
        written.push((layer, first, second));
    }
    let m = rec.finish(&[]).unwrap();
    for (layer, first, second) in &written {
        let table = probe_table(&run, &m, layer);
        check_probes(&table, first);
        if let Some(second) = second {
            check_probes(&table, second);
            assert_eq!(table.len(), 5);
        }
    }

    // Probes added to the completed run take positions the same way.
    let mut app = ProbeAppender::open(&run).unwrap();
    let mut added = Vec::new();
    for layer in ["seq", "tok", "ln", "fc"] {
        let per_row: &[u32] = if layer == "fc" { &[1, 1] } else { &[4, 1] };
        let ps = Probes::new(&mut rng, layer, &[20, 21], per_row);
        app.probes(layer, ps.batch(layer != "fc")).unwrap();
        added.push((layer, ps));
    }
    let m = app.commit().unwrap();
    for (layer, ps) in &added {
        check_probes(&probe_table(&run, &m, layer), ps);
    }
    let mut app = ProbeAppender::open(&run).unwrap();
    let zero = Probes::new(&mut rng, "seq", &[30, 31], &[2, 0]);
    refused(
        app.probes("seq", zero.batch(true)),
        &["probes for layer \"seq\"", "positions[1] is 0"],
    );
}

/// The message of a refused call: one line naming the layer and `positions`.
fn refused_line<T>(r: reptrace_record::Result<T>, layer: &str, words: &[&str]) {
    let quoted = format!("\"{layer}\"");
    let mut all = vec![quoted.as_str(), "positions"];
    all.extend_from_slice(words);
    let e = refused(r, &all);
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn ragged_rows_that_do_not_add_up_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let mut rec = ragged_recorder(&run);
    rec.step(step_row(0, 0, 0.5, 2, 1.0)).unwrap();
    let upd =
        |layer_u: &'static [f32], v: &'static [f32], ps: Option<&'static [u32]>| UpdateBatch {
            step: 0,
            epoch: 0,
            instance_ids: &[0, 1],
            labels: &[0, 1],
            u: layer_u,
            v,
            update_norm: None,
            positions: ps,
        };
    // positions on layers whose records have fixed lengths: a T = 1 linear,
    // and a ragged norm (its records are whole updates).
    refused_line(
        rec.updates("fc", upd(&[0.5; 6], &[0.5; 4], Some(&[1, 1]))),
        "fc",
        &["fixed lengths"],
    );
    refused_line(
        rec.updates("ln", upd(&[], &[0.5; 16], Some(&[1, 1]))),
        "ln",
        &["fixed lengths"],
    );
    // positions of the wrong length.
    refused_line(
        rec.updates("seq", upd(&[0.5; 9], &[0.5; 6], Some(&[3]))),
        "seq",
        &["positions has length 1, expected 2"],
    );
    // Σ positions · in ≠ len(u), Σ positions · out ≠ len(v).
    refused_line(
        rec.updates("seq", upd(&[0.5; 9], &[0.5; 6], Some(&[1, 1]))),
        "seq",
        &["positions sum to 2", "u has length 9, expected 6"],
    );
    refused_line(
        rec.updates("seq", upd(&[0.5; 9], &[0.5; 4], Some(&[1, 2]))),
        "seq",
        &["positions sum to 3", "v has length 4, expected 6"],
    );
    // Without positions the rows must split evenly, u and v alike.
    refused_line(
        rec.updates("seq", upd(&[0.5; 9], &[0.5; 6], None)),
        "seq",
        &["without positions"],
    );
    refused_line(
        rec.updates("seq", upd(&[0.5; 6], &[0.5; 8], None)),
        "seq",
        &["without positions"],
    );
    // An embedding's u must still hold token ids below num_embeddings.
    let e = refused(
        rec.updates("tok", upd(&[0.0, 3.0, 3.0, 0.0], &[0.5; 6], Some(&[1, 1]))),
        &["\"tok\"", "token 1", "num_embeddings 5000"],
    );
    assert!(!e.contains('\n'), "{e}");

    let probe =
        |layer_a: &'static [f64], p: &'static [f64], ps: Option<&'static [u32]>| ProbeBatch {
            probe_ids: &[0, 1],
            instance_ids: &[None, None],
            labels: &[0, 1],
            predicted: &[0, 1],
            a: layer_a,
            p,
            positions: ps,
        };
    refused_line(
        rec.probes("fc", probe(&[0.5; 6], &[0.5; 4], Some(&[1, 1]))),
        "fc",
        &["fixed lengths"],
    );
    // A probe holds at least one position, given or not.
    refused_line(
        rec.probes("seq", probe(&[0.5; 3], &[0.5; 2], Some(&[1, 0]))),
        "seq",
        &["positions[1] is 0"],
    );
    refused_line(
        rec.checkpoint_probes("seq", probe(&[], &[], None)),
        "seq",
        &["0 positions"],
    );
    refused_line(
        rec.probes("ln", probe(&[0.5; 12], &[0.5; 12], Some(&[1, 1]))),
        "ln",
        &["positions sum to 2", "a has length 12, expected 8"],
    );
    refused_line(
        rec.probes("seq", probe(&[0.5; 6], &[0.5; 4], Some(&[1, 1, 1]))),
        "seq",
        &["positions has length 3, expected 2"],
    );

    // Mistakes do not poison the recorder, and nothing refused is written.
    rec.updates("seq", upd(&[0.5; 9], &[0.5; 6], Some(&[1, 2])))
        .unwrap();
    let m = rec.finish(&[]).unwrap();
    let rows: u64 = m.files(Table::Updates).iter().map(|f| f.rows).sum();
    assert_eq!(rows, 2);
    assert!(m.files(Table::Probes).is_empty());
}

/// An f16 run: ragged rows handed over by value in f16 read back the same,
/// bit for bit, as the same rows given in f32 and converted by the recorder.
#[test]
fn owned_f16_ragged_rows_match_borrowed_f32_ones() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let per_row = [2u32, 0, 5];
    let (u, v) = (random(&mut rng, 7 * IN), random(&mut rng, 7 * OUT));
    let ids = [3i64, 4, 5];
    let labels = [0i32, 1, 0];
    let dir = tempfile::tempdir().unwrap();
    let mut tables = Vec::new();
    for owned in [false, true] {
        let run = dir.path().join(if owned { "owned" } else { "borrowed" });
        let mut rec = ragged_recorder_in(&run, Dtype::F16);
        rec.step(step_row(0, 0, 0.5, 3, 1.0)).unwrap();
        if owned {
            let half = |x: &[f32]| {
                x.iter()
                    .map(|&x| half::f16::from_f32(x))
                    .collect::<Vec<_>>()
            };
            let batch = UpdateBatchOwned {
                step: 0,
                epoch: 0,
                instance_ids: ids.to_vec(),
                labels: labels.to_vec(),
                u: FactorValues::F16(half(&u)),
                v: FactorValues::F16(half(&v)),
                update_norm: None,
                positions: Some(per_row.to_vec()),
            };
            rec.updates_owned("seq", batch).unwrap();
        } else {
            let batch = UpdateBatch {
                step: 0,
                epoch: 0,
                instance_ids: &ids,
                labels: &labels,
                u: &u,
                v: &v,
                update_norm: None,
                positions: Some(&per_row),
            };
            rec.updates("seq", batch).unwrap();
        }
        let m = rec.finish(&[]).unwrap();
        let batches = read_table(&run, &m, Table::Updates, Some("seq"));
        tables.push((lists(&batches, "u"), lists(&batches, "v")));
    }
    assert_eq!(tables[0], tables[1]);
    let lens: Vec<(usize, usize)> = tables[0]
        .0
        .iter()
        .zip(&tables[0].1)
        .map(|(u, v)| (u.len(), v.len()))
        .collect();
    assert_eq!(lens, [(2 * IN, 2 * OUT), (0, 0), (5 * IN, 5 * OUT)]);
}
