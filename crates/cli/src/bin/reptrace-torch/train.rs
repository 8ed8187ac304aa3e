//! `reptrace train`: train a model (SGD, Adam or AdamW, in instance or
//! batch mode) and record its trace.
//!
//! The flags are parsed in two steps: clap collects them as text, then
//! [`TrainArgs::config`] turns them into a validated
//! [`reptrace_tch::TrainConfig`]; every error names the flag at fault. A
//! progress bar per epoch (on stderr, when it is a terminal) shows the loss
//! and the accuracies; the summary of what was recorded goes to `out`.
use anyhow::anyhow;
use indicatif::{ProgressBar, ProgressStyle};
use reptrace_format::{Dtype, LrSchedule, Mode, OptimizerKind, Table};
use reptrace_tch::{
    DataSource, DeviceChoice, ModelChoice, ProbeSet, Progress, TraceLayers, TrainConfig,
    TrainSummary,
};
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;

/// Arguments of `reptrace train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Model: mlp (hidden layers 32, 16), mlp:H1,H2,…, cnn, or cnn-bn (cnn with
    /// BatchNorm2d after each convolution; needs --mode batch, any optimizer).
    #[arg(long, default_value = "mlp")]
    pub model: String,
    /// Data: digits (bundled), csv:PATH[?label=…&header=…&shape=CxHxW&scale=…&test=…&classes=…]
    /// or idx:DIR (MNIST files).
    #[arg(long, default_value = "digits")]
    pub data: String,
    /// Epochs.
    #[arg(long, default_value = "10", allow_hyphen_values = true)]
    pub epochs: String,
    /// Mini-batch size.
    #[arg(long, default_value = "32", allow_hyphen_values = true)]
    pub batch_size: String,
    /// Base learning rate.
    #[arg(long, default_value = "0.1", allow_hyphen_values = true)]
    pub lr: String,
    /// Learning-rate schedule: constant, step:EPOCHS:GAMMA, cosine or cosine:MIN_LR.
    #[arg(long, default_value = "constant")]
    pub lr_schedule: String,
    /// SGD momentum.
    #[arg(long, default_value = "0", allow_hyphen_values = true)]
    pub momentum: String,
    /// Nesterov momentum (needs --momentum > 0).
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay (L2; decoupled with adamw), PyTorch semantics; in instance
    /// mode it shows up as the residual (exactly (Π(1 − lr·wd) − 1)·W_0 under
    /// adamw).
    #[arg(long, default_value = "0", allow_hyphen_values = true)]
    pub weight_decay: String,
    /// Seed for initialisation, shuffling and dropout.
    #[arg(long, default_value = "42", allow_hyphen_values = true)]
    pub seed: String,
    /// Traced layers: all, none (train without recording) or NAME,NAME,….
    #[arg(long, default_value = "all")]
    pub trace_layers: String,
    /// Type of the stored factors: f32 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Compression while recording: zstd (the storage encoding) or none
    /// (the writer keeps up with a fast loop; `reptrace compact RUN`
    /// rewrites the run in the storage encoding afterwards).
    #[arg(long, default_value = "zstd")]
    pub compression: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Probes written after training: test, train, all or none.
    #[arg(long, default_value = "test")]
    pub probes: String,
    /// CPU threads for libtorch (default: one less than the cores).
    #[arg(long)]
    pub threads: Option<String>,
    /// Do not record each example's loss and prediction at every step (table
    /// examples, which the training-dynamics queries read).
    #[arg(long)]
    pub no_examples: bool,
    /// The run directory to create (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// instance (one record per example and step; under adam/adamw each step's
    /// preconditioner goes with it) or batch (one record per step: the whole
    /// update).
    #[arg(long, default_value = "instance")]
    pub mode: String,
    /// sgd, adam or adamw (PyTorch semantics, no AMSGrad), in either mode.
    #[arg(long, default_value = "sgd")]
    pub optimizer: String,
    /// Adam/AdamW betas, as B1,B2.
    #[arg(long, default_value = "0.9,0.999")]
    pub betas: String,
    /// Adam/AdamW epsilon.
    #[arg(long, default_value = "1e-8")]
    pub eps: String,
    /// Every batch holds instances of one class (exact class shares in batch mode).
    #[arg(long)]
    pub class_pure_batches: bool,
}

/// Parses `value` of flag `--flag`, naming the flag and `what` was expected on error.
fn parse<T: FromStr>(flag: &str, value: &str, what: &str) -> anyhow::Result<T> {
    value
        .trim()
        .parse()
        .map_err(|_| anyhow!("--{flag}: {value:?} is not {what}"))
}

/// Parses `constant`, `step:E:G`, `cosine` or `cosine:MIN`.
pub fn parse_schedule(value: &str) -> anyhow::Result<LrSchedule> {
    let bad = || {
        anyhow!("--lr-schedule: {value:?} is not constant, step:EPOCHS:GAMMA or cosine[:MIN_LR]")
    };
    let parts: Vec<&str> = value.split(':').collect();
    match parts.as_slice() {
        ["constant"] => Ok(LrSchedule::Constant),
        ["cosine"] => Ok(LrSchedule::Cosine { min_lr: 0.0 }),
        ["cosine", min] => Ok(LrSchedule::Cosine {
            min_lr: min.parse().map_err(|_| bad())?,
        }),
        ["step", every, gamma] => Ok(LrSchedule::Step {
            every_epochs: every.parse().map_err(|_| bad())?,
            gamma: gamma.parse().map_err(|_| bad())?,
        }),
        _ => Err(bad()),
    }
}

impl TrainArgs {
    /// The validated training configuration.
    pub fn config(&self) -> anyhow::Result<TrainConfig> {
        let model: ModelChoice = self.model.parse().map_err(|e| anyhow!("--model: {e}"))?;
        let data: DataSource = self.data.parse().map_err(|e| anyhow!("--data: {e}"))?;
        let trace_layers: TraceLayers = self
            .trace_layers
            .parse()
            .map_err(|e| anyhow!("--trace-layers: {e}"))?;
        let dtype = match self.dtype.as_str() {
            "f32" => Dtype::F32,
            "f16" => Dtype::F16,
            other => return Err(anyhow!("--dtype: {other:?} is not f32 or f16")),
        };
        let device: DeviceChoice = self.device.parse().map_err(|e| anyhow!("--device: {e}"))?;
        device.device().map_err(|e| anyhow!("--device: {e}"))?;
        let probes: ProbeSet = self.probes.parse().map_err(|e| anyhow!("--probes: {e}"))?;
        let mode = match self.mode.as_str() {
            "instance" => Mode::Instance,
            "batch" => Mode::Batch,
            other => return Err(anyhow!("--mode: {other:?} is not instance or batch")),
        };
        let optimizer = match self.optimizer.as_str() {
            "sgd" => OptimizerKind::Sgd,
            "adam" => OptimizerKind::Adam,
            "adamw" => OptimizerKind::Adamw,
            other => return Err(anyhow!("--optimizer: {other:?} is not sgd, adam or adamw")),
        };
        let betas = match self.betas.split(',').collect::<Vec<_>>().as_slice() {
            [b1, b2] => [
                parse("betas", b1, "a number")?,
                parse("betas", b2, "a number")?,
            ],
            _ => return Err(anyhow!("--betas: {:?} is not B1,B2", self.betas)),
        };
        let config = TrainConfig {
            model,
            data,
            epochs: parse("epochs", &self.epochs, "a positive integer")?,
            batch_size: parse("batch-size", &self.batch_size, "a positive integer")?,
            lr: parse("lr", &self.lr, "a number")?,
            schedule: parse_schedule(&self.lr_schedule)?,
            momentum: parse("momentum", &self.momentum, "a number")?,
            dampening: 0.0,
            nesterov: self.nesterov,
            weight_decay: parse("weight-decay", &self.weight_decay, "a number")?,
            optimizer,
            betas,
            eps: parse("eps", &self.eps, "a number")?,
            mode,
            class_pure_batches: self.class_pure_batches,
            zstd_level: None,
            compression: self
                .compression
                .parse()
                .map_err(|e| anyhow!("--compression: {e}"))?,
            seed: parse("seed", &self.seed, "a non-negative integer")?,
            trace_layers,
            dtype,
            device,
            probes,
            out: self.out.clone(),
            threads: self
                .threads
                .as_deref()
                .map(|t| parse("threads", t, "a positive integer"))
                .transpose()?,
            examples: !self.no_examples,
        };
        config.validate().map_err(flag_error)?;
        Ok(config)
    }
}

/// Names the flag behind a library error where there is one.
pub fn flag_error(e: reptrace_tch::Error) -> anyhow::Error {
    use reptrace_tch::Error as E;
    let flag = match &e {
        E::BadSetting { setting, message } => return anyhow!("--{setting}: {message}"),
        E::Data(_) => "data",
        E::BadModel { .. } | E::CouplingModule { .. } => "model",
        E::UnknownLayer { .. } => "trace-layers",
        E::NoDevice { .. } => "device",
        E::Record(reptrace_record::Error::NotEmpty { .. }) => "out",
        _ => return anyhow::Error::new(e),
    };
    anyhow!("--{flag}: {e}")
}

/// Trains with a progress bar per epoch on stderr.
pub fn train_with_progress(config: &TrainConfig) -> anyhow::Result<TrainSummary> {
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut epochs = 0;
    let mut steps_per_epoch = 0;
    let mut bar: Option<ProgressBar> = None;
    let mut loss_sum = 0.0;
    let mut probes_bar: Option<ProgressBar> = None;
    let mut progress = |p: &Progress| match p {
        Progress::Started {
            epochs: e,
            steps_per_epoch: s,
            ..
        } => {
            (epochs, steps_per_epoch) = (*e, *s);
        }
        Progress::Step {
            epoch,
            step_in_epoch,
            loss,
        } => {
            if *step_in_epoch == 0 {
                loss_sum = 0.0;
                bar = Some(
                    ProgressBar::new(steps_per_epoch as u64)
                        .with_style(style.clone())
                        .with_prefix(format!("epoch {}/{epochs}", epoch + 1)),
                );
            }
            loss_sum += loss;
            if let Some(b) = &bar {
                b.set_position(*step_in_epoch as u64 + 1);
                b.set_message(format!(
                    "loss {:.4}",
                    loss_sum / (*step_in_epoch as f64 + 1.0)
                ));
            }
        }
        Progress::Epoch(e) => {
            if let Some(b) = bar.take() {
                let test = e
                    .test_accuracy
                    .map(|a| format!(", test acc {a:.4}"))
                    .unwrap_or_default();
                b.finish_with_message(format!(
                    "loss {:.4}, train acc {:.4}{test}",
                    e.loss, e.train_accuracy
                ));
            }
        }
        Progress::Probes { probes, layers } => {
            // Forward passes and refinements of every probe: a spinner, so
            // that the pause after the last epoch is visibly work.
            let b = ProgressBar::new_spinner().with_message(format!(
                "writing {probes} probes × {layers} traced layers (activations and refinements)"
            ));
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            probes_bar = Some(b);
        }
    };
    let summary = reptrace_tch::train(config, &mut progress);
    if let Some(b) = probes_bar.take() {
        b.finish_and_clear();
    }
    let summary = summary.map_err(flag_error)?;
    Ok(summary)
}

/// Prints what a run recorded.
pub fn write_summary(out: &mut dyn Write, summary: &TrainSummary) -> anyhow::Result<()> {
    writeln!(
        out,
        "trained {} epochs, {} steps in {:.1} s (total {:.1} s)",
        summary.epochs, summary.steps, summary.train_seconds, summary.total_seconds
    )?;
    let test = summary
        .test_accuracy
        .map(|a| format!("{:.2} %", 100.0 * a))
        .unwrap_or_else(|| "n/a (no test split)".into());
    writeln!(
        out,
        "final loss {:.4}, train accuracy {:.2} %, test accuracy {test}",
        summary.loss,
        100.0 * summary.train_accuracy
    )?;
    let Some((run, manifest)) = &summary.run else {
        writeln!(out, "tracing off (--trace-layers none): nothing recorded")?;
        return Ok(());
    };
    writeln!(
        out,
        "run {} ({}, {})",
        run.display(),
        manifest.status,
        manifest.dtype
    )?;
    let layer_rows = |table: Table, layer: &str| -> (u64, u64) {
        manifest
            .files(table)
            .iter()
            .filter(|f| f.layer.as_deref() == Some(layer))
            .fold((0, 0), |(r, b), f| (r + f.rows, b + f.bytes))
    };
    for layer in manifest.model.traced_layers() {
        let (rows, bytes) = layer_rows(Table::Updates, layer.name());
        let (probes, _) = layer_rows(Table::Probes, layer.name());
        writeln!(
            out,
            "  layer {:<8} {rows:>9} update rows {:>12}   {probes} probes",
            layer.name(),
            reptrace_cli::cmd::human_bytes(bytes),
        )?;
    }
    let total: u64 = Table::ALL
        .iter()
        .flat_map(|&t| manifest.files(t))
        .map(|f| f.bytes)
        .sum();
    let commits = manifest.commits.len();
    let snapshots = manifest
        .commits
        .iter()
        .filter(|c| c.weights.is_some())
        .count();
    writeln!(
        out,
        "  {commits} commits, {snapshots} weight snapshots, {} in tables",
        reptrace_cli::cmd::human_bytes(total)
    )?;
    Ok(())
}

/// Runs `reptrace train`.
pub fn run(args: &TrainArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let config = args.config()?;
    reptrace_tch::keep_freed_memory();
    let summary = train_with_progress(&config)?;
    write_summary(out, &summary)?;
    if config.compression == reptrace_record::Compression::None && summary.run.is_some() {
        writeln!(
            out,
            "  recorded without compression: `reptrace compact {}` rewrites it with zstd",
            config.out.display()
        )?;
    }
    Ok(())
}
