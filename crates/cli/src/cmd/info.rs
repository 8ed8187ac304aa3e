//! `reptrace info <run>`: what a run holds, from its manifest, cross-checked
//! against the Parquet footers of the committed files.
//!
//! Per table and layer it prints the committed files, rows, bytes on disk
//! and, for `updates`, the size the factors would take as raw f32 and the
//! ratio of the two. Files in the run's table directories that no commit
//! lists (temporary files of an interrupted commit, leftovers) are reported
//! as a warning, as are row counts that disagree with the footers.
use anyhow::Context;
use parquet::file::reader::{FileReader, SerializedFileReader};
use reptrace_format::{
    FileEntry, Lens, Manifest, Module, Status, Storage, Table, TracedLayer, col, layout,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Arguments of `reptrace info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// The run directory.
    pub run: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Everything `info` reports (also its JSON form).
#[derive(Debug, Serialize)]
pub struct Info {
    pub run: String,
    pub run_id: String,
    pub format: String,
    pub format_version: u32,
    pub status: String,
    /// The manifest's status read with the run's lock: `recording` (a live
    /// recorder holds the lock), `killed` (the manifest says recording, but
    /// no process holds the lock: the recorder died), `complete` or
    /// `aborted`.
    pub state: String,
    /// Whether a process holds the run's lock now (a recorder, or a writer
    /// adding probes or attributions).
    pub locked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort_reason: Option<String>,
    pub mode: reptrace_format::Mode,
    pub dtype: reptrace_format::Dtype,
    pub created: String,
    pub model: ModelInfo,
    pub optimizer: reptrace_format::Optimizer,
    pub classes: Vec<String>,
    pub settings: BTreeMap<String, serde_json::Value>,
    pub commits: usize,
    pub last_step: Option<i64>,
    pub last_epoch: Option<i32>,
    /// What an analysis stands on: `final` (the run's probes table),
    /// `checkpoint` (probes of its last commit point) or `none`.
    pub probes: String,
    /// The step of the weights those probes were taken against.
    pub probes_as_of_step: Option<i64>,
    pub weights: Vec<String>,
    /// Bytes of `updates` and `batches` per committed training step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_per_step: Option<StoragePerStep>,
    /// Adam's and AdamW's preconditioner in instance mode (format 10):
    /// its bytes beside the records'.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preconditioner: Option<PreconditionerBytes>,
    /// Layers left out of the trace because the optimizer does not update
    /// them (format 7).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub frozen: Vec<String>,
    /// What each step applied (`layer_steps`, `steps.skipped`; format 7).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_applied: Option<reptrace_analyze::replay::StepsSummary>,
    pub tables: Vec<TableInfo>,
    pub stray_files: Vec<String>,
    pub warnings: Vec<String>,
}

/// The model, with the traced layers' shapes spelled out.
#[derive(Debug, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub input_shape: Vec<usize>,
    pub modules: Vec<ModuleInfo>,
}

/// One module of the model.
#[derive(Debug, Serialize)]
pub struct ModuleInfo {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Short description: sizes, kernel, stride…
    pub detail: String,
    pub traced: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_shape: Option<Vec<usize>>,
    /// Lengths of one update record's `u` and `v` (traced layers); per
    /// position when `per_position`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub factor_lens: Option<[usize; 2]>,
    /// Whether `factor_lens` are per position: a ragged layer's records
    /// hold any number of positions (format 9).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub per_position: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<Storage>,
}

/// What recording costs on disk per training step.
#[derive(Debug, Serialize)]
pub struct StoragePerStep {
    /// Committed training steps.
    pub steps: u64,
    /// Bytes of the committed `updates` and `batches` files.
    pub bytes: u64,
    /// `bytes / steps`.
    pub bytes_per_step: f64,
}

/// What the preconditioner of an Adam/AdamW run in instance mode costs.
#[derive(Debug, Serialize)]
pub struct PreconditionerBytes {
    /// Compressed bytes of the `preconditioner` column of the committed
    /// `layer_steps` files (all layers: the table is not partitioned), from
    /// their Parquet footers.
    pub bytes: u64,
    /// Bytes of the committed `updates` files, for comparison.
    pub updates_bytes: u64,
}

/// The committed files of one table (and layer).
#[derive(Debug, Serialize)]
pub struct TableInfo {
    pub table: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    pub files: usize,
    /// Rows according to the manifest.
    pub rows: u64,
    /// Rows according to the Parquet footers (files that could be read).
    pub footer_rows: u64,
    /// Bytes on disk according to the manifest.
    pub bytes: u64,
    /// `updates`: rows × (u_len + v_len) × 4 (a ragged layer's: its
    /// records' values, from the footers, × 4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_f32_bytes: Option<u64>,
    /// `updates`: bytes / raw_f32_bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// `updates`: bytes on disk per record (per example and step in
    /// instance mode, per step in batch mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_record: Option<f64>,
}

pub fn run(args: &InfoArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let info = gather(&args.run)?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &info).context("writing JSON")?;
        writeln!(out)?;
    } else {
        print_text(&info, out)?;
    }
    Ok(())
}

/// Reads the manifest and the footers of the committed files.
pub fn gather(run: &Path) -> anyhow::Result<Info> {
    // Opening finishes a commit a killed recorder left half published.
    let m = Manifest::open(run)?;
    let locked =
        layout::lock_held(run).with_context(|| format!("{}", run.join(layout::LOCK).display()))?;
    let mut warnings = Vec::new();

    let tables = table_infos(run, &m, &mut warnings);

    let weights: Vec<String> = m.commits.iter().filter_map(|c| c.weights.clone()).collect();
    for w in &weights {
        if !run.join(w).is_file() {
            warnings.push(format!("{w}: committed weights snapshot is missing"));
        }
    }
    let stray_files = stray_files(run, &m)?;
    let last = m.commits.iter().rev().find(|c| c.step.is_some());
    let analysis = m.analysis_probes();
    let steps = last.and_then(|c| c.step).map_or(0, |s| s.0 + 1) as u64;
    let recorded: u64 = tables
        .iter()
        .filter(|t| t.table == Table::Updates.name() || t.table == Table::Batches.name())
        .map(|t| t.bytes)
        .sum();
    let storage_per_step = (steps > 0).then(|| StoragePerStep {
        steps,
        bytes: recorded,
        bytes_per_step: recorded as f64 / steps as f64,
    });

    let preconditioner = (m.mode == reptrace_format::Mode::Instance
        && m.optimizer.kind.preconditioned())
    .then(|| {
        let mut bytes = 0;
        for f in m.files(Table::LayerSteps) {
            match footer_column_bytes(&run.join(&f.path), col::PRECONDITIONER) {
                Ok(b) => bytes += b,
                Err(e) => warnings.push(format!("{}: {e:#}", f.path)),
            }
        }
        let updates_bytes = tables
            .iter()
            .filter(|t| t.table == Table::Updates.name())
            .map(|t| t.bytes)
            .sum();
        PreconditionerBytes {
            bytes,
            updates_bytes,
        }
    });

    let steps_applied = match reptrace_analyze::session::Run::open(run)
        .and_then(|r| reptrace_analyze::replay::summarize_steps(&r))
    {
        Ok(s) if s.skipped > 0 || !s.layers.is_empty() => Some(s),
        Ok(_) => None,
        Err(e) => {
            warnings.push(format!("layer_steps: {e}"));
            None
        }
    };

    Ok(Info {
        run: run.display().to_string(),
        run_id: m.run_id.clone(),
        format: m.format.clone(),
        format_version: m.format_version,
        status: m.status.to_string(),
        state: match (m.status, locked) {
            (Status::Recording, false) => "killed".to_owned(),
            (s, _) => s.to_string(),
        },
        locked,
        abort_reason: m.abort_reason.clone(),
        mode: m.mode,
        dtype: m.dtype,
        created: m.created.clone(),
        model: model_info(&m),
        optimizer: m.optimizer.clone(),
        classes: m.classes.clone(),
        settings: m.settings.clone(),
        commits: m.commits.len(),
        last_step: last.and_then(|c| c.step).map(|s| s.0),
        last_epoch: last.and_then(|c| c.epoch),
        probes: match &analysis {
            Some(a) if a.checkpoint => "checkpoint",
            Some(_) => "final",
            None => "none",
        }
        .to_owned(),
        probes_as_of_step: analysis.and_then(|a| a.step).map(|s| s.0),
        weights,
        storage_per_step,
        preconditioner,
        frozen: m.model.frozen.clone(),
        steps_applied,
        tables,
        stray_files,
        warnings,
    })
}

/// One entry per table (and layer) of the committed files: rows and
/// bytes from the manifest, rows from the footers; a footer that disagrees
/// or cannot be read adds a warning.
fn table_infos(run: &Path, m: &Manifest, warnings: &mut Vec<String>) -> Vec<TableInfo> {
    let mut groups: BTreeMap<(Table, Option<String>), Vec<&FileEntry>> = BTreeMap::new();
    for table in Table::ALL {
        for f in m.files(table) {
            groups.entry((table, f.layer.clone())).or_default().push(f);
        }
    }
    let mut tables = Vec::new();
    for ((table, layer), files) in &groups {
        let rows: u64 = files.iter().map(|f| f.rows).sum();
        let bytes: u64 = files.iter().map(|f| f.bytes).sum();
        let mut footer_rows = 0;
        let mut factor_values = 0;
        for f in files {
            match footer_rows_of(&run.join(&f.path)) {
                Ok((n, values)) => {
                    footer_rows += n;
                    factor_values += values;
                    if n != f.rows {
                        warnings.push(format!(
                            "{}: footer has {n} rows, manifest says {}",
                            f.path, f.rows
                        ));
                    }
                }
                Err(e) => warnings.push(format!("{}: {e:#}", f.path)),
            }
        }
        let raw = match (table, layer) {
            // A ragged layer's records differ in length: their values as
            // the footers count them.
            (Table::Updates, Some(l)) => m.model.traced_layer(l).map(|tl| {
                if let Lens::Fixed(u, v) = tl.record_shape(m.mode) {
                    rows * (u + v) as u64 * 4
                } else {
                    factor_values * 4
                }
            }),
            _ => None,
        };
        tables.push(TableInfo {
            table: table.name().to_owned(),
            layer: layer.clone(),
            files: files.len(),
            rows,
            footer_rows,
            bytes,
            raw_f32_bytes: raw,
            ratio: raw.filter(|&r| r > 0).map(|r| bytes as f64 / r as f64),
            bytes_per_record: (*table == Table::Updates && rows > 0)
                .then(|| bytes as f64 / rows as f64),
        });
    }
    tables
}

/// Row count from a Parquet footer (reads only the footer).
/// A file's rows and the values of its `u` and `v` lists, from its footer.
fn footer_rows_of(path: &Path) -> anyhow::Result<(u64, u64)> {
    let file =
        File::open(path).with_context(|| format!("committed file missing: {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let meta = reader.metadata();
    let mut values = 0;
    for group in meta.row_groups() {
        for column in group.columns() {
            let root = column.column_path().parts().first().map(String::as_str);
            if matches!(root, Some(col::U | col::V)) {
                values += u64::try_from(column.num_values()).unwrap_or(0);
            }
        }
    }
    let rows = u64::try_from(meta.file_metadata().num_rows()).unwrap_or(0);
    Ok((rows, values))
}

/// Compressed bytes of the column chunks of `column` in a Parquet file
/// (its footer only).
fn footer_column_bytes(path: &Path, column: &str) -> anyhow::Result<u64> {
    let file =
        File::open(path).with_context(|| format!("committed file missing: {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let mut bytes = 0;
    for group in reader.metadata().row_groups() {
        for chunk in group.columns() {
            if chunk.column_path().parts().first().map(String::as_str) == Some(column) {
                bytes += u64::try_from(chunk.compressed_size()).unwrap_or(0);
            }
        }
    }
    Ok(bytes)
}

/// Files under the table and weights directories that no commit lists.
fn stray_files(run: &Path, m: &Manifest) -> anyhow::Result<Vec<String>> {
    let mut known: BTreeSet<String> = m.all_files().iter().map(|f| f.path.clone()).collect();
    known.extend(m.commits.iter().filter_map(|c| c.weights.clone()));
    let mut stray = Vec::new();
    let tmp_manifest = format!(".{}.tmp", layout::MANIFEST);
    if run.join(&tmp_manifest).exists() {
        stray.push(tmp_manifest);
    }
    let dirs = Table::ALL
        .iter()
        .map(|t| t.name())
        .chain(["weights", layout::CHECKPOINTS]);
    for dir in dirs {
        walk(run, Path::new(dir), &known, &mut stray)?;
    }
    stray.sort();
    Ok(stray)
}

fn walk(
    run: &Path,
    rel: &Path,
    known: &BTreeSet<String>,
    stray: &mut Vec<String>,
) -> anyhow::Result<()> {
    let dir = run.join(rel);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("{}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("{}", dir.display()))?;
        let child = rel.join(entry.file_name());
        let name = child.to_string_lossy().replace('\\', "/");
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(run, &child, known, stray)?;
        } else if !known.contains(&name) {
            stray.push(name);
        }
    }
    Ok(())
}

/// `, groups G` and `, padding mode M` when they are not the defaults.
fn conv_extras(groups: usize, mode: reptrace_format::PaddingMode) -> String {
    let mut s = String::new();
    if groups != 1 {
        s += &format!(", groups {groups}");
    }
    if !mode.is_zeros() {
        s += &format!(", padding mode {}", mode.name());
    }
    s
}

/// A norm's shape, eps, positions and bias.
fn norm_detail(n: &reptrace_format::NormSpec) -> String {
    format!(
        "shape {:?} eps {}, {} positions{}",
        n.normalized_shape,
        n.eps,
        n.positions,
        if n.bias { ", bias" } else { ", no bias" }
    )
}

fn model_info(m: &Manifest) -> ModelInfo {
    let modules = m
        .model
        .modules
        .iter()
        .map(|module| {
            let (kind, name, detail, layer) = match module {
                Module::Linear(l) => (
                    "linear",
                    Some(l.name.clone()),
                    format!(
                        "{} -> {}{}{}",
                        l.in_features,
                        l.out_features,
                        if l.bias { ", bias" } else { ", no bias" },
                        if l.positions == 1 {
                            String::new()
                        } else {
                            format!(", {} positions", l.positions)
                        }
                    ),
                    Some((
                        TracedLayer::Linear(l),
                        l.traced,
                    )),
                ),
                Module::Conv2d(c) => (
                    "conv2d",
                    Some(c.name.clone()),
                    format!(
                        "{} -> {} kernel {}x{} stride {}x{} padding {}x{} dilation {}x{}, input {}x{} -> output {}x{}{}",
                        c.in_channels,
                        c.out_channels,
                        c.kernel[0],
                        c.kernel[1],
                        c.stride[0],
                        c.stride[1],
                        c.padding[0],
                        c.padding[1],
                        c.dilation[0],
                        c.dilation[1],
                        c.input_hw[0],
                        c.input_hw[1],
                        c.output_hw[0],
                        c.output_hw[1],
                        if c.bias { ", bias" } else { ", no bias" }
                    ) + &conv_extras(c.groups, c.padding_mode),
                    Some((TracedLayer::Conv2d(c), c.traced)),
                ),
                Module::Conv1d(c) => (
                    "conv1d",
                    Some(c.name.clone()),
                    format!(
                        "{} -> {} kernel {} stride {} padding {} dilation {}, input {} -> output {}{}",
                        c.in_channels,
                        c.out_channels,
                        c.kernel,
                        c.stride,
                        c.padding,
                        c.dilation,
                        c.input_len,
                        c.output_len,
                        if c.bias { ", bias" } else { ", no bias" }
                    ) + &conv_extras(c.groups, c.padding_mode),
                    Some((TracedLayer::Conv1d(c), c.traced)),
                ),
                Module::Embedding(e) => (
                    "embedding",
                    Some(e.name.clone()),
                    format!(
                        "{} x {}, {} positions{}",
                        e.num_embeddings,
                        e.embedding_dim,
                        e.positions,
                        e.padding_idx
                            .map(|i| format!(", padding_idx {i}"))
                            .unwrap_or_default()
                    ),
                    Some((TracedLayer::Embedding(e), e.traced)),
                ),
                Module::LayerNorm(n) => (
                    "layer_norm",
                    Some(n.name.clone()),
                    norm_detail(n),
                    Some((TracedLayer::LayerNorm(n), n.traced)),
                ),
                Module::RmsNorm(n) => (
                    "rms_norm",
                    Some(n.name.clone()),
                    norm_detail(n),
                    Some((TracedLayer::RmsNorm(n), n.traced)),
                ),
                Module::Relu => ("relu", None, String::new(), None),
                Module::Tanh => ("tanh", None, String::new(), None),
                Module::Sigmoid => ("sigmoid", None, String::new(), None),
                Module::Gelu => ("gelu", None, String::new(), None),
                Module::MaxPool2d { kernel, stride } => (
                    "max_pool2d",
                    None,
                    format!("kernel {}x{} stride {}x{}", kernel[0], kernel[1], stride[0], stride[1]),
                    None,
                ),
                Module::AvgPool2d { kernel, stride } => (
                    "avg_pool2d",
                    None,
                    format!("kernel {}x{} stride {}x{}", kernel[0], kernel[1], stride[0], stride[1]),
                    None,
                ),
                Module::Flatten => ("flatten", None, String::new(), None),
                Module::Dropout { p } => ("dropout", None, format!("p {p}"), None),
                Module::BatchNorm2d { name, channels } => (
                    "batch_norm2d",
                    Some(name.clone()),
                    format!("{channels} channels"),
                    None,
                ),
                Module::BatchNorm1d { name, features } => (
                    "batch_norm1d",
                    Some(name.clone()),
                    format!("{features} features"),
                    None,
                ),
            };
            let traced = layer.as_ref().is_some_and(|l| l.1);
            let shape = layer
                .as_ref()
                .filter(|l| l.1)
                .map(|l| l.0.record_shape(m.mode));
            let mut detail = detail;
            if layer.as_ref().is_some_and(|l| l.0.ragged()) {
                detail.push_str(", ragged");
            }
            ModuleInfo {
                kind: kind.to_owned(),
                name,
                detail,
                traced,
                weight_shape: layer.as_ref().map(|l| l.0.weight_shape()),
                factor_lens: shape.map(|s| match s {
                    Lens::Fixed(u, v) | Lens::PerPosition(u, v) => [u, v],
                }),
                per_position: matches!(shape, Some(Lens::PerPosition(..))),
                // Every traced layer's: what its records of this run hold.
                storage: layer.filter(|l| l.1).map(|l| {
                    if l.0.records_full(m.mode) {
                        Storage::Full
                    } else {
                        Storage::Factors
                    }
                }),
            }
        })
        .collect();
    ModelInfo {
        name: m.model.name.clone(),
        input_shape: m.model.input_shape.clone(),
        modules,
    }
}

/// The per-step hyper-parameters and gradient check, one line per layer.
fn print_steps_applied(
    s: &reptrace_analyze::replay::StepsSummary,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    // Four significant digits, plain between 1e-3 and 1e4.
    let short = |x: f64| {
        if x == 0.0 || !x.is_finite() {
            return format!("{x}");
        }
        let magnitude = x.abs().log10().floor();
        if !(-3.0..4.0).contains(&magnitude) {
            return format!("{x:.3e}");
        }
        let digits = (3.0 - magnitude).max(0.0) as usize;
        let s = format!("{x:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    let range = |r: [f64; 2]| {
        if r[0] == r[1] {
            short(r[0])
        } else {
            format!("{}..{}", short(r[0]), short(r[1]))
        }
    };
    if s.skipped > 0 {
        writeln!(
            out,
            "skipped    {} steps (the optimizer skipped them: inf/NaN gradients; no records)",
            s.skipped
        )?;
    }
    if !s.layers.is_empty() {
        writeln!(
            out,
            "per step   what the optimizer applied (table layer_steps)"
        )?;
    }
    for l in &s.layers {
        let groups: Vec<String> = l.param_groups.iter().map(i32::to_string).collect();
        let scale = if l.rescaled == 0 {
            "gradient not rescaled".to_owned()
        } else {
            let [lo, hi] = l.grad_scale;
            format!(
                "gradient scale {lo:.3e}..{hi:.3e} in {} of {} steps",
                l.rescaled, l.steps
            )
        };
        let check = l
            .max_grad_check
            .map_or_else(|| "unchecked".to_owned(), |c| format!("check ≤ {c:.1e}"));
        writeln!(
            out,
            "  {:<12} group {}, lr {}, momentum {}, {scale}, {}, {check}",
            l.layer,
            groups.join("+"),
            range(l.lr),
            range(l.momentum),
            l.precision
        )?;
    }
    Ok(())
}

fn print_text(i: &Info, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "run        {}", i.run)?;
    writeln!(out, "run id     {}", i.run_id)?;
    writeln!(out, "format     {} {}", i.format, i.format_version)?;
    print_status(i, out)?;
    let mode = serde_json::to_value(i.mode).ok();
    let mode = mode.as_ref().and_then(|v| v.as_str()).unwrap_or("?");
    writeln!(out, "mode       {mode}, factors {}", i.dtype)?;
    writeln!(out, "created    {}", i.created)?;
    writeln!(
        out,
        "model      {}, input {:?}",
        i.model.name, i.model.input_shape
    )?;
    print_modules(&i.model.modules, out)?;
    print_optimizer(&i.optimizer, out)?;
    writeln!(
        out,
        "classes    {}: {}",
        i.classes.len(),
        i.classes.join(", ")
    )?;
    match (i.last_step, i.last_epoch) {
        (Some(s), Some(e)) => writeln!(out, "commits    {}, last step {s} (epoch {e})", i.commits)?,
        (Some(s), None) => writeln!(out, "commits    {}, last step {s}", i.commits)?,
        _ => writeln!(out, "commits    {}, no training step committed", i.commits)?,
    }
    match (i.probes.as_str(), i.probes_as_of_step) {
        ("none", _) => writeln!(out, "probes     none committed")?,
        (kind, Some(s)) => writeln!(out, "probes     {kind}, as of step {s}")?,
        (kind, None) => writeln!(out, "probes     {kind}")?,
    }
    writeln!(
        out,
        "weights    {}",
        if i.weights.is_empty() {
            "none".to_owned()
        } else {
            i.weights.join(", ")
        }
    )?;
    if let Some(s) = &i.storage_per_step {
        writeln!(
            out,
            "storage    {} per step (updates and batches, {} steps)",
            crate::cmd::human_bytes(s.bytes_per_step.round() as u64),
            s.steps
        )?;
    }
    if let Some(p) = &i.preconditioner {
        writeln!(
            out,
            "precond    {} (Adam's preconditioner in layer_steps, beside {} of updates)",
            crate::cmd::human_bytes(p.bytes),
            crate::cmd::human_bytes(p.updates_bytes)
        )?;
    }
    if !i.frozen.is_empty() {
        writeln!(
            out,
            "frozen     {} (the optimizer does not update them: not traced)",
            i.frozen.join(", ")
        )?;
    }
    if let Some(s) = &i.steps_applied {
        print_steps_applied(s, out)?;
    }
    writeln!(out)?;
    print_tables(&i.tables, out)?;
    if !i.stray_files.is_empty() {
        writeln!(
            out,
            "warning: {} file(s) not in the manifest (uncommitted): {}",
            i.stray_files.len(),
            i.stray_files.join(", ")
        )?;
    }
    for w in &i.warnings {
        writeln!(out, "warning: {w}")?;
    }
    Ok(())
}

/// The `status` line: the state, and who holds the run's lock.
fn print_status(i: &Info, out: &mut dyn Write) -> std::io::Result<()> {
    let step = i
        .last_step
        .map_or_else(|| "no training step".to_owned(), |s| format!("step {s}"));
    match (i.state.as_str(), &i.abort_reason) {
        (_, Some(r)) => writeln!(out, "status     {} ({r})", i.status)?,
        ("recording", _) => writeln!(
            out,
            "status     recording (live: its recorder holds {}; committed up to {step})",
            layout::LOCK
        )?,
        ("killed", _) => writeln!(
            out,
            "status     killed (the recorder died while recording: nobody holds {}; analyses \
             read the {} commits up to {step})",
            layout::LOCK,
            i.commits
        )?,
        (state, _) if i.locked => writeln!(
            out,
            "status     {state} (another process is adding to it: it holds {})",
            layout::LOCK
        )?,
        (state, None) => writeln!(out, "status     {state}")?,
    }
    Ok(())
}

/// One line per module: kind, shape and whether (and how) it is traced.
fn print_modules(modules: &[ModuleInfo], out: &mut dyn Write) -> std::io::Result<()> {
    for m in modules {
        let mut line = format!(
            "  {:<12} {:<12} {}",
            m.name.as_deref().unwrap_or(""),
            m.kind,
            m.detail
        );
        if m.traced {
            if let Some([u, v]) = m.factor_lens {
                let per = if m.per_position { " per position" } else { "" };
                line.push_str(&format!("; traced: u {u}, v {v}{per}"));
            }
            if let Some(s) = m.storage {
                line.push_str(match s {
                    Storage::Factors => " (factors)",
                    Storage::Full => " (full)",
                });
            }
        } else if m.weight_shape.is_some() {
            line.push_str("; not traced");
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// The `optimizer` line: Adam's coefficients or SGD's momentum settings.
fn print_optimizer(o: &reptrace_format::Optimizer, out: &mut dyn Write) -> std::io::Result<()> {
    let kind = serde_json::to_value(o.kind).ok();
    let kind = kind.as_ref().and_then(|v| v.as_str()).unwrap_or("?");
    let schedule = serde_json::to_string(&o.schedule).unwrap_or_default();
    match (o.betas, o.eps) {
        (Some([b1, b2]), Some(eps)) => writeln!(
            out,
            "optimizer  {kind} lr {} betas {b1}, {b2} eps {eps} weight decay {}, schedule {schedule}",
            o.lr, o.weight_decay
        )?,
        _ => writeln!(
            out,
            "optimizer  {kind} lr {} momentum {} dampening {} nesterov {} weight decay {}, schedule {schedule}",
            o.lr, o.momentum, o.dampening, o.nesterov, o.weight_decay
        )?,
    }
    Ok(())
}

/// The table of committed files: one row per table (and layer).
fn print_tables(tables: &[TableInfo], out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<14} {:<12} {:>6} {:>12} {:>12} {:>12} {:>7} {:>9}",
        "table", "layer", "files", "rows", "on disk", "raw f32", "ratio", "B/record"
    )?;
    for t in tables {
        writeln!(
            out,
            "{:<14} {:<12} {:>6} {:>12} {:>12} {:>12} {:>7} {:>9}",
            t.table,
            t.layer.as_deref().unwrap_or("-"),
            t.files,
            t.rows,
            crate::cmd::human_bytes(t.bytes),
            t.raw_f32_bytes
                .map(crate::cmd::human_bytes)
                .unwrap_or_else(|| "-".into()),
            t.ratio
                .map(|r| format!("{r:.3}"))
                .unwrap_or_else(|| "-".into()),
            t.bytes_per_record
                .map(|b| format!("{b:.0}"))
                .unwrap_or_else(|| "-".into()),
        )?;
    }
    if tables.is_empty() {
        writeln!(out, "(no committed files)")?;
    }
    Ok(())
}
