//! Runs of the bundled digits data trained by the CLI (`reptrace train`)
//! with given settings, always single-threaded (`--threads 1`) so that the
//! same settings give the same run.
//!
//! [`Digits::shared`] trains once per test process and settings, and hands
//! every test the same run (read it, never change it); a test that damages,
//! kills or extends a run trains its own with [`Digits::train`] or copies the
//! shared one with [`crate::files::copy_dir`].
use crate::cli::Cli;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The settings of a digits run: each is passed to `reptrace train` only
/// when set, so an unset one is the CLI's default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Digits {
    model: Option<String>,
    epochs: Option<usize>,
    batch: Option<usize>,
    optimizer: Option<String>,
    probes: Option<String>,
    mode: Option<String>,
    extra: Vec<String>,
    then: Vec<Vec<String>>,
}

impl Digits {
    /// The CLI's defaults (`--threads 1` only).
    pub fn new() -> Self {
        Self::default()
    }

    /// `--model` (`mlp`, `cnn`, …).
    pub fn model(mut self, model: &str) -> Self {
        self.model = Some(model.to_owned());
        self
    }

    /// `--epochs`.
    pub fn epochs(mut self, epochs: usize) -> Self {
        self.epochs = Some(epochs);
        self
    }

    /// `--batch-size`.
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = Some(batch);
        self
    }

    /// `--optimizer`.
    pub fn optimizer(mut self, optimizer: &str) -> Self {
        self.optimizer = Some(optimizer.to_owned());
        self
    }

    /// `--probes` (`test`, `all`, `none`, `ids:…`).
    pub fn probes(mut self, probes: &str) -> Self {
        self.probes = Some(probes.to_owned());
        self
    }

    /// `--mode` (`instance`, `batch`).
    pub fn mode(mut self, mode: &str) -> Self {
        self.mode = Some(mode.to_owned());
        self
    }

    /// Further `train` flags, in order (`--lr 0.05`, `--momentum 0.9`, …).
    pub fn flags(mut self, flags: &[&str]) -> Self {
        self.extra.extend(flags.iter().map(|s| s.to_string()));
        self
    }

    /// A command run on the trained run, after `train` (the run's path is put
    /// in place of `{run}`), e.g. `attribute {run} --probes test`.
    pub fn then(mut self, args: &[&str]) -> Self {
        self.then.push(args.iter().map(|s| s.to_string()).collect());
        self
    }

    /// The arguments of `reptrace train` for these settings, the run at `out`.
    pub fn args(&self, out: &Path) -> Vec<String> {
        let mut args = vec!["train".to_owned()];
        let mut flag = |name: &str, v: Option<String>| {
            if let Some(v) = v {
                args.extend([name.to_owned(), v]);
            }
        };
        flag("--model", self.model.clone());
        flag("--epochs", self.epochs.map(|e| e.to_string()));
        flag("--batch-size", self.batch.map(|b| b.to_string()));
        flag("--optimizer", self.optimizer.clone());
        flag("--probes", self.probes.clone());
        flag("--mode", self.mode.clone());
        args.extend(self.extra.iter().cloned());
        args.extend(["--threads".to_owned(), "1".to_owned()]);
        args.extend(["--out".to_owned(), out.to_string_lossy().into_owned()]);
        args
    }

    /// Trains the run into `out` (then runs the [`Digits::then`] commands);
    /// returns `out`.
    pub fn train(&self, cli: &Cli, out: impl AsRef<Path>) -> PathBuf {
        let out = out.as_ref().to_path_buf();
        cli.ok(&self.args(&out));
        let run = out.to_string_lossy();
        for cmd in &self.then {
            let args: Vec<String> = cmd.iter().map(|a| a.replace("{run}", &run)).collect();
            cli.ok(&args);
        }
        out
    }

    /// The run of these settings, trained once per test process (in a
    /// temporary directory that lives as long as the process) and shared by
    /// every test that asks for the same settings. Read it, never change it.
    pub fn shared(&self, cli: &Cli) -> &'static Path {
        type Slot = Arc<OnceLock<&'static Path>>;
        static RUNS: OnceLock<Mutex<HashMap<Digits, Slot>>> = OnceLock::new();
        let slot: Slot = RUNS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(self.clone())
            .or_default()
            .clone();
        slot.get_or_init(|| {
            let dir = tempfile::tempdir().expect("temporary directory");
            let run = self.train(cli, dir.path().join("run"));
            // The directory lives as long as the process.
            std::mem::forget(dir);
            Box::leak(run.into_boxed_path())
        })
    }
}
