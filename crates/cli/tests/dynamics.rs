//! Training dynamics (table `examples`, format 6) and the queries that read it.
//!
//! - The rows `reptrace train` records equal an independent forward pass
//!   (plain f64 arithmetic over the weights snapshots) at the first step of
//!   each epoch, and their mean is each step's batch loss.
//! - On a hand-built trace, `forgetting_events`, `data_map` and
//!   `mislabel_candidates` give the answers computed by hand.
use reptrace_format::Split;
use reptrace_record::ExampleBatch;
use reptrace_testkit::cli::Cli;
use reptrace_testkit::handmade::{self, Handmade, Tensor};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::Path;

fn cli() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_reptrace"))
}

fn f(row: &BTreeMap<String, String>, col: &str) -> f64 {
    row[col]
        .parse()
        .unwrap_or_else(|_| panic!("{col}: {:?}", row[col]))
}

fn i(row: &BTreeMap<String, String>, col: &str) -> i64 {
    row[col]
        .parse()
        .unwrap_or_else(|_| panic!("{col}: {:?}", row[col]))
}

/// A weights snapshot as (name → (shape, values)).
fn snapshot(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

/// log softmax of the MLP (fc1, ReLU, fc2, ReLU, fc3) at `x`, in f64.
fn mlp_log_softmax(w: &BTreeMap<String, (Vec<usize>, Vec<f64>)>, x: &[f64]) -> Vec<f64> {
    let mut h = x.to_vec();
    for (layer, relu) in [("fc1", true), ("fc2", true), ("fc3", false)] {
        let (shape, weight) = &w[&format!("{layer}.weight")];
        let bias = &w[&format!("{layer}.bias")].1;
        let (out, inp) = (shape[0], shape[1]);
        assert_eq!(inp, h.len(), "{layer}");
        h = (0..out)
            .map(|o| {
                let z: f64 = bias[o] + (0..inp).map(|k| weight[o * inp + k] * h[k]).sum::<f64>();
                if relu { z.max(0.0) } else { z }
            })
            .collect();
    }
    let max = h.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + h.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
    h.iter().map(|z| z - lse).collect()
}

#[test]
fn examples_rows_match_an_independent_forward_pass() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    cli().ok(&[
        "train",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--momentum",
        "0.9",
        "--trace-layers",
        "fc3",
        "--probes",
        "none",
        "--out",
        r,
    ]);
    let data = reptrace_format::data::digits().unwrap();
    let n_train = data.n_train as i64;
    let steps_per_epoch = (n_train + 63) / 64;

    // Every training instance once per epoch; p_label = exp(-loss).
    let per_epoch = cli().sql_csv(
        &run,
        "SELECT epoch, COUNT(*) AS n, COUNT(DISTINCT instance_id) AS ids, \
         MAX(ABS(p_label - EXP(-loss))) AS gap FROM examples GROUP BY epoch ORDER BY epoch",
    );
    assert_eq!(per_epoch.len(), 2);
    for row in &per_epoch {
        assert_eq!(i(row, "n"), n_train);
        assert_eq!(i(row, "ids"), n_train);
        assert!(f(row, "gap") < 1e-12, "{row:?}");
    }
    // The batch loss is the mean of its members' losses.
    let gap = cli().sql_csv(
        &run,
        "SELECT MAX(ABS(s.loss - e.mean_loss)) AS gap, COUNT(*) AS steps FROM steps s JOIN \
         (SELECT step, AVG(loss) AS mean_loss FROM examples GROUP BY step) e ON e.step = s.step",
    );
    assert!(f(&gap[0], "gap") < 1e-5, "{gap:?}");
    assert_eq!(i(&gap[0], "steps"), 2 * steps_per_epoch);

    // The first step of each epoch ran on the weights of the snapshot before
    // it: recompute its members' losses and predictions from that snapshot.
    let manifest = reptrace_format::Manifest::load(&run).unwrap();
    for (step, weights) in [
        (0, "weights/initial.safetensors".to_owned()),
        (
            steps_per_epoch,
            reptrace_format::layout::weights_path(Some(steps_per_epoch - 1)),
        ),
    ] {
        assert!(
            manifest
                .commits
                .iter()
                .any(|c| c.weights.as_deref().is_some_and(|w| w == weights.as_str())),
            "{weights} is a snapshot of the run"
        );
        let w = snapshot(&run.join(&weights));
        let rows = cli().sql_csv(
            &run,
            &format!(
                "SELECT instance_id, label, loss, predicted, p_label FROM examples \
                 WHERE step = {step} ORDER BY instance_id"
            ),
        );
        assert_eq!(rows.len(), 64, "step {step}");
        for row in &rows {
            let id = i(row, "instance_id") as usize;
            let dim = data.features.len() / data.labels.len();
            let x: Vec<f64> = data.features[id * dim..(id + 1) * dim]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let label = data.labels[id] as usize;
            assert_eq!(i(row, "label"), label as i64);
            let lp = mlp_log_softmax(&w, &x);
            assert!(
                (f(row, "loss") + lp[label]).abs() < 1e-5,
                "step {step}, instance {id}: loss {} vs {}",
                f(row, "loss"),
                -lp[label]
            );
            assert!((f(row, "p_label") - lp[label].exp()).abs() < 1e-5);
            let best = (0..lp.len())
                .max_by(|&a, &b| lp[a].total_cmp(&lp[b]))
                .unwrap();
            assert_eq!(i(row, "predicted"), best as i64, "step {step}, {id}");
        }
    }
}

/// Per instance (0..4) and epoch (0..3): the probability of its label and
/// whether the prediction was right. Three classes, every label 0.
const P: [[f64; 3]; 4] = [
    [0.9, 0.3, 0.6],  // learned, forgotten, learned again
    [0.2, 0.2, 0.2],  // never learned
    [0.3, 0.8, 0.9],  // learned in epoch 1
    [0.9, 0.95, 1.0], // easy
];
const RIGHT: [[bool; 3]; 4] = [
    [true, false, true],
    [false, false, false],
    [false, true, true],
    [true, true, true],
];

/// A recorder for a 2 → 3 linear model without bias, classes a, b, c.
fn tiny_recorder(run: &Path) -> Handmade {
    Handmade::new(run, handmade::tiny(2, 3, false), &["a", "b", "c"])
}

/// A run with only examples rows: epoch e has steps 2e ({0, 1}) and 2e + 1
/// ({2, 3}).
fn hand_built(run: &Path) {
    let mut rec = tiny_recorder(run);
    rec.instances(&[0; 4], &[Split::Train; 4]);
    let w = vec![0.0f32; 6];
    let weights: [Tensor; 1] = [("fc.weight", &[3, 2], &w)];
    rec.weights(&weights);
    for epoch in 0..3 {
        for half in 0..2 {
            let ids = [2 * half, 2 * half + 1];
            let loss: Vec<f32> = ids.iter().map(|&id| -(P[id][epoch].ln()) as f32).collect();
            let predicted: Vec<i32> = ids
                .iter()
                .map(|&id| if RIGHT[id][epoch] { 0 } else { 1 })
                .collect();
            rec.recorder()
                .examples(ExampleBatch {
                    step: (2 * epoch + half) as i64,
                    epoch: epoch as i32,
                    instance_ids: &[ids[0] as i64, ids[1] as i64],
                    labels: &[0, 0],
                    loss: &loss,
                    predicted: &predicted,
                })
                .unwrap();
        }
        rec.weights(&weights);
    }
    rec.finish(&weights);
}

#[test]
fn dynamics_queries_give_the_hand_computed_answers() {
    let (_dir, run) = handmade::temp_run(hand_built);
    let r = run.to_str().unwrap();
    let query = |name: &str, params: &[&str]| cli().query_csv(r, name, params);

    // Forgetting: 1 never learned first, then 0 (one event), then 2 and 3
    // (none) by id.
    let fe = query("forgetting_events", &["k=10"]);
    let got: Vec<(i64, i64, i64, i64, String, i64)> = fe
        .iter()
        .map(|r| {
            (
                i(r, "instance_id"),
                i(r, "never_learned"),
                i(r, "forgetting_events"),
                i(r, "learning_events"),
                r["first_learned_step"].clone(),
                i(r, "correct_at_end"),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (1, 1, 0, 0, String::new(), 0),
            (0, 0, 1, 1, "0".into(), 1),
            (2, 0, 0, 1, "3".into(), 1),
            (3, 0, 0, 0, "1".into(), 1),
        ]
    );

    // Data map: confidence, variability (population), correctness, region.
    let dm = query("data_map", &[]);
    assert_eq!(dm.len(), 4);
    let regions = ["ambiguous", "hard", "ambiguous", "easy"];
    for (id, row) in dm.iter().enumerate() {
        assert_eq!(i(row, "instance_id"), id as i64);
        let mean = P[id].iter().sum::<f64>() / 3.0;
        let var = P[id].iter().map(|p| (p - mean).powi(2)).sum::<f64>() / 3.0;
        let right = RIGHT[id].iter().filter(|&&r| r).count() as f64 / 3.0;
        assert!((f(row, "confidence") - mean).abs() < 1e-6, "{row:?}");
        assert!((f(row, "variability") - var.sqrt()).abs() < 1e-6, "{row:?}");
        assert!((f(row, "correctness") - right).abs() < 1e-12, "{row:?}");
        assert_eq!(row["region"], regions[id], "{row:?}");
    }
    // Thresholds are parameters: with ambiguous = 0.3 nothing is ambiguous.
    let strict = query("data_map", &["ambiguous=0.3"]);
    let regions: Vec<&str> = strict.iter().map(|r| r["region"].as_str()).collect();
    assert_eq!(regions, ["easy", "hard", "easy", "easy"]);

    // Mislabel candidates: by mean loss, 1 (0.2 throughout) first.
    let mc = query("mislabel_candidates", &["k=4"]);
    let mean_loss = |id: usize| P[id].iter().map(|p| -p.ln()).sum::<f64>() / 3.0;
    let mut want: Vec<usize> = (0..4).collect();
    want.sort_by(|&a, &b| mean_loss(b).total_cmp(&mean_loss(a)));
    let got: Vec<i64> = mc.iter().map(|r| i(r, "instance_id")).collect();
    assert_eq!(got, want.iter().map(|&x| x as i64).collect::<Vec<_>>());
    for row in &mc {
        let id = i(row, "instance_id") as usize;
        assert!((f(row, "score") - mean_loss(id)).abs() < 1e-6, "{row:?}");
        assert_eq!(row["tracin"], "", "no update records: no TracIn score");
    }
}

#[test]
fn a_bad_examples_batch_is_refused_with_its_column() {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = tiny_recorder(&dir.path().join("run"));
    let batch = ExampleBatch {
        step: 0,
        epoch: 0,
        instance_ids: &[0, 1],
        labels: &[0, 1],
        loss: &[0.5],
        predicted: &[0, 1],
    };
    let rec = rec.recorder();
    let e = rec.examples(batch).unwrap_err().to_string();
    assert!(
        e.contains("loss") && e.contains("examples of step 0"),
        "{e}"
    );
    let e = rec
        .examples(ExampleBatch {
            loss: &[0.5, 0.1],
            predicted: &[0, 7],
            ..batch
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("predicted value 7"), "{e}");
}
