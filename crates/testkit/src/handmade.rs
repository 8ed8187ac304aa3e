//! Tiny runs built by hand through [`reptrace_record::Recorder`], for tests
//! whose answers are worked out on paper: a one-layer model, instances
//! numbered from 0, steps whose update factors the test gives (or draws from
//! its own seed), weight snapshots, probes, and a clean finish or a crash;
//! and a recording child process to kill at a random moment.
//!
//! ```no_run
//! # use reptrace_testkit::handmade::{Batch, Handmade, tiny};
//! # use reptrace_format::Split;
//! # let dir = std::path::Path::new("run");
//! let mut run = Handmade::new(dir, tiny(2, 1, false), &["a", "b"]);
//! run.instances(&[0, 1], &[Split::Train; 2]);
//! run.weights(&[("fc.weight", &[1, 2], &[0.0, 0.0])]);
//! let batch = Batch::new(0, 0, &[0, 1], &[0, 1]);
//! run.step(&batch, 0.1);
//! run.update("fc", &batch, &[1.0, 0.0, 0.0, 1.0], &[0.5, -0.25]);
//! run.finish(&[("fc.weight", &[1, 2], &[1.0, -0.5])]);
//! ```
use crate::models;
use rand::Rng;
use reptrace_format::{Manifest, Model, Optimizer, Split};
use reptrace_record::{NamedTensor, ProbeBatch, Recorder, RecorderBuilder, StepRow, UpdateBatch};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A weight tensor by name, shape and values (`fc.weight`, `[out, in]`, row
/// major).
pub type Tensor<'a> = (&'a str, &'a [usize], &'a [f32]);

/// The model `tiny` of one traced Linear layer `fc` (`inputs → outputs`).
pub fn tiny(inputs: usize, outputs: usize, bias: bool) -> Model {
    models::model(
        "tiny",
        vec![inputs],
        vec![models::linear("fc", inputs, outputs, bias)],
    )
}

/// The tensors as the recorder takes them.
pub fn named<'a>(tensors: &[Tensor<'a>]) -> Vec<NamedTensor<'a>> {
    tensors
        .iter()
        .map(|&(name, shape, data)| NamedTensor { name, shape, data })
        .collect()
}

/// Which instances one step trained on, and when.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    step: i64,
    epoch: i32,
    ids: &'a [i64],
    labels: &'a [i32],
}

impl<'a> Batch<'a> {
    /// Step `step` of epoch `epoch` on the instances `ids` with `labels`.
    pub fn new(step: i64, epoch: i32, ids: &'a [i64], labels: &'a [i32]) -> Self {
        Batch {
            step,
            epoch,
            ids,
            labels,
        }
    }
}

/// A run being written by hand; every call panics on a recorder error.
pub struct Handmade {
    rec: Recorder,
    model: Model,
    loss: f64,
}

impl Handmade {
    /// A run of `model` in `dir` with plain SGD at lr 0.1 and the given
    /// class names; every step's loss is 1 until [`Handmade::loss`].
    pub fn new(dir: &Path, model: Model, classes: &[&str]) -> Self {
        Self::with(dir, model, classes, |b| b)
    }

    /// As [`Handmade::new`], with the recorder's builder changed by
    /// `configure` (another optimizer, settings, …).
    pub fn with(
        dir: &Path,
        model: Model,
        classes: &[&str],
        configure: impl FnOnce(RecorderBuilder) -> RecorderBuilder,
    ) -> Self {
        let builder = Recorder::builder(dir)
            .model(model.clone())
            .optimizer(Optimizer::sgd(0.1))
            .classes(classes.iter().map(|&c| c.to_owned()).collect());
        let rec = configure(builder).build().unwrap();
        Handmade {
            rec,
            model,
            loss: 1.0,
        }
    }

    /// The loss every later step records.
    pub fn loss(mut self, loss: f64) -> Self {
        self.loss = loss;
        self
    }

    /// The recorder itself, for what this kit does not cover.
    pub fn recorder(&mut self) -> &mut Recorder {
        &mut self.rec
    }

    /// Instances `0..labels.len()` with their labels and splits.
    pub fn instances(&mut self, labels: &[i32], splits: &[Split]) {
        let ids: Vec<i64> = (0..labels.len() as i64).collect();
        self.rec.instances(&ids, labels, splits).unwrap();
    }

    /// A weights snapshot, then a commit.
    pub fn weights(&mut self, tensors: &[Tensor<'_>]) {
        self.rec.weights(&named(tensors)).unwrap();
        self.commit();
    }

    /// A commit.
    pub fn commit(&mut self) {
        self.rec.commit().unwrap();
    }

    /// The `steps` row of `batch` at learning rate `lr` (not skipped).
    pub fn step(&mut self, batch: &Batch<'_>, lr: f64) {
        self.rec
            .step(StepRow {
                step: batch.step,
                epoch: batch.epoch,
                lr,
                batch_size: batch.ids.len() as i32,
                loss: self.loss,
                skipped: false,
            })
            .unwrap();
    }

    /// The update factors `u`, `v` of `layer` for `batch` (one row per
    /// instance).
    pub fn update(&mut self, layer: &str, batch: &Batch<'_>, u: &[f32], v: &[f32]) {
        self.rec
            .updates(
                layer,
                UpdateBatch {
                    step: batch.step,
                    epoch: batch.epoch,
                    instance_ids: batch.ids,
                    labels: batch.labels,
                    u,
                    v,
                    update_norm: None,
                    positions: None,
                },
            )
            .unwrap();
    }

    /// Update factors of every traced layer for `batch`, drawn from `rng`:
    /// u uniform in [0, 1), v in [−0.5, 0.5).
    pub fn random_updates(&mut self, batch: &Batch<'_>, rng: &mut impl Rng) {
        let rows = batch.ids.len();
        let layers: Vec<(String, (usize, usize))> = self
            .model
            .traced_layers()
            .map(|l| (l.name().to_owned(), l.factor_lens()))
            .collect();
        for (layer, (ul, vl)) in layers {
            let u: Vec<f32> = (0..rows * ul).map(|_| rng.random::<f32>()).collect();
            let v: Vec<f32> = (0..rows * vl).map(|_| rng.random::<f32>() - 0.5).collect();
            self.update(&layer, batch, &u, &v);
        }
    }

    /// Probes of `layer`.
    pub fn probes(&mut self, layer: &str, batch: ProbeBatch<'_>) {
        self.rec.probes(layer, batch).unwrap();
    }

    /// Finishes the run with its final weights.
    pub fn finish(mut self, tensors: &[Tensor<'_>]) {
        self.rec.finish(&named(tensors)).unwrap();
    }

    /// Stops like a killed process: what was handed over is flushed, and
    /// nothing is cleaned up (no commit, no finish).
    pub fn crash(mut self) {
        self.rec.flush().unwrap();
        std::mem::forget(self.rec);
    }
}

/// Runs the test `test` of this test binary in a child process with the
/// environment variable `env` set to `run`, its output dropped: a test that
/// records into `run` until it is killed (and returns at once when `env` is
/// not set, in a normal test run).
pub fn spawn_recording_child(test: &str, env: &str, run: &Path) -> Child {
    let exe = std::env::current_exe().unwrap();
    Command::new(exe)
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(env, run)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits (a minute at most) until the manifest of `run` satisfies
/// `committed`; panics when the child exits first.
pub fn wait_for_commit(child: &mut Child, run: &Path, committed: impl Fn(&Manifest) -> bool) {
    let start = Instant::now();
    while !Manifest::load(run).is_ok_and(|m| committed(&m)) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "child made no commit"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills the child (SIGKILL) and reaps it.
pub fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A run that `write` writes at `run` in a fresh temporary directory; the
/// directory lasts as long as the returned guard.
pub fn temp_run(write: impl FnOnce(&Path)) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    write(&run);
    (dir, run)
}
