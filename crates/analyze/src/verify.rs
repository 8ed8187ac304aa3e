//! Integrity and completeness checks of a run.
//!
//! **Integrity**: every committed file exists with the size, row count,
//! format version, run id, table, layer and schema the manifest and the
//! format promise; weights snapshots hold every traced tensor; files in the
//! run that no commit lists (stray or temporary files, e.g. left by a crash)
//! are reported as warnings.
//!
//! **Completeness**: per traced layer, the relative reconstruction residual
//! `‖(W_T − W_0) − Σ scaled ΔW‖ / ‖W_T − W_0‖`, which must be within the
//! tolerance when the optimizer promises exactness (SGD without weight decay,
//! or batch mode); probes must be consistent with the weights
//! (`p = (W_T − W_0) ⊛ a + Δb`, `p_norm = ‖p‖`); and when an attribution
//! covers every record, per probe and layer `|Σ dot − ‖p‖²| / ‖p‖²`.
//!
//! **Tolerance.** The default is `1e-5` (relative) for f32 traces: the
//! training loop adds the per-example updates in f32, so its weights drift
//! from the exact f64 sum of the records by a few f32 roundings per step. For
//! f16 traces the stored factors themselves are rounded: each element `x̂`
//! is within `u·|x̂|/(1−u) + 2⁻²⁵` of the f32 value (`u = 2⁻¹¹`, the second
//! term for subnormals), so a record's `ΔW = v uᵀ` (or `V Uᵀ`) is off by at
//! most `‖e_v‖‖û‖ + (‖v̂‖ + ‖e_v‖)‖e_u‖` in Frobenius norm. The f16 tolerance
//! is the f32 one plus the sum of these bounds over the records (scaled by
//! their displacement scales), relative to `‖W_T − W_0‖`: a rigorous bound on
//! what rounding alone can explain, computed from the trace itself.
use crate::kernel::{self, Geometry};
use crate::probes::Probes;
use crate::records::{f64s, i64s, open_columns};
use crate::replay::{self, Precision, Setup};
use crate::run::Run;
use crate::{Error, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use reptrace_format::{
    Dtype, FORMAT_VERSION, FileEntry, Lens, Manifest, Mode, OLDEST_FORMAT_VERSION, OptimizerKind,
    Table, TracedLayer, col, kv, layout, schema_as_of,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The check held.
    Pass,
    /// Not an error, but worth knowing (stray files, an informational residual).
    Warn,
    /// The run is damaged or inconsistent: [`Report::passed`] is false.
    Fail,
    /// Could not apply (nothing attributed, partial attribution).
    Skip,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        })
    }
}

/// One check and its outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What was checked, e.g. `integrity: updates` or `completeness: fc1 weights`.
    pub name: String,
    /// Whether it passed, failed, warned or did not apply.
    pub status: Status,
    /// The measured value, for numeric checks.
    pub value: Option<f64>,
    /// The tolerance it was held to.
    pub tolerance: Option<f64>,
    /// What was found, in words (counts, the file at fault, why skipped).
    pub detail: String,
}

/// Every check of a run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Report {
    /// Every check made, in the order made.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether no check failed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    /// The checks that failed.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }

    fn push(&mut self, name: impl Into<String>, status: Status, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            status,
            value: None,
            tolerance: None,
            detail: detail.into(),
        });
    }

    fn measure(
        &mut self,
        name: impl Into<String>,
        value: f64,
        tolerance: f64,
        enforce: bool,
        detail: impl Into<String>,
    ) {
        let within = value <= tolerance;
        let status = match (within, enforce) {
            (true, _) => Status::Pass,
            (false, true) => Status::Fail,
            (false, false) => Status::Warn,
        };
        self.checks.push(Check {
            name: name.into(),
            status,
            value: Some(value),
            tolerance: Some(tolerance),
            detail: detail.into(),
        });
    }
}

/// How strict [`verify`] is.
#[derive(Debug, Clone)]
pub struct Options {
    /// Relative tolerance of the completeness checks for f32 traces (f16 adds
    /// the rounding bound, see the module docs).
    pub tolerance: f64,
    /// Records per batch when replaying updates.
    pub batch_rows: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            tolerance: 1e-5,
            batch_rows: 4096,
        }
    }
}

/// How far the replay of the update records has come (the long part of
/// [`verify`]), reported after each batch of records.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// The layer being replayed.
    pub layer: String,
    /// 0-based index of the layer among the traced layers.
    pub layer_index: usize,
    /// Number of traced layers.
    pub layers: usize,
    /// Records of the layer replayed so far.
    pub records_done: u64,
    /// Committed update records of the layer.
    pub records_total: u64,
}

/// Checks a run (see the module docs).
pub fn verify(run: &Path, options: &Options) -> Result<Report> {
    verify_with_progress(run, options, &mut |_| {})
}

/// [`verify`], reporting the replay of each layer's records as it goes.
pub fn verify_with_progress(
    run: &Path,
    options: &Options,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report> {
    let run = Run::open(run)?;
    let mut report = Report::default();
    integrity(&run, &mut report);
    strays(&run, &mut report);
    completeness(&run, options, &mut report, progress);
    // Interrupted checks would read as failures: the interruption is the answer.
    crate::interrupt::check()?;
    Ok(report)
}

/// The committed files of every table, training commits, checkpoint probes
/// and attribution.
fn all_files(m: &Manifest) -> Vec<&FileEntry> {
    m.all_files()
}

fn integrity(run: &Run, report: &mut Report) {
    let m = run.manifest();
    for table in Table::ALL {
        let files = m.files(table);
        if files.is_empty() {
            report.push(
                format!("integrity: {table}"),
                Status::Pass,
                "no committed files",
            );
            continue;
        }
        let mut problems = Vec::new();
        let mut rows = 0u64;
        for f in &files {
            rows += f.rows;
            if let Err(p) = check_file(run, table, f) {
                problems.push(p);
            }
        }
        let (status, detail) = if problems.is_empty() {
            (Status::Pass, format!("{} files, {rows} rows", files.len()))
        } else {
            let n = problems.len();
            problems.truncate(3);
            (
                Status::Fail,
                format!("{n} of {} files bad: {}", files.len(), problems.join("; ")),
            )
        };
        report.push(format!("integrity: {table}"), status, detail);
    }
    // Weights snapshots.
    let mut snapshots: Vec<&str> = m
        .commits
        .iter()
        .filter_map(|c| c.weights.as_deref())
        .collect();
    snapshots.dedup();
    let mut problems = Vec::new();
    for rel in &snapshots {
        match crate::weights::Snapshot::read(&run.path(rel)) {
            Ok(s) => {
                for layer in m.model.traced_layers() {
                    if let Err(e) = s.layer(&layer) {
                        problems.push(e.to_string());
                    }
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    let status = if problems.is_empty() {
        Status::Pass
    } else {
        Status::Fail
    };
    let detail = if problems.is_empty() {
        format!("{} snapshots", snapshots.len())
    } else {
        problems.truncate(3);
        problems.join("; ")
    };
    report.push("integrity: weights", status, detail);
}

/// Checks one committed Parquet file against its manifest entry and the format.
fn check_file(run: &Run, table: Table, f: &FileEntry) -> std::result::Result<(), String> {
    let path = run.path(&f.path);
    let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", f.path))?;
    if meta.len() != f.bytes {
        return Err(format!(
            "{}: {} bytes on disk, manifest says {}",
            f.path,
            meta.len(),
            f.bytes
        ));
    }
    let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", f.path))?;
    let reader = SerializedFileReader::new(file).map_err(|e| format!("{}: {e}", f.path))?;
    let md = reader.metadata().file_metadata();
    if md.num_rows() as u64 != f.rows {
        return Err(format!(
            "{}: {} rows in the footer, manifest says {}",
            f.path,
            md.num_rows(),
            f.rows
        ));
    }
    let kvs: HashMap<&str, &str> = md
        .key_value_metadata()
        .map(|v| {
            v.iter()
                .filter_map(|kv| kv.value.as_deref().map(|val| (kv.key.as_str(), val)))
                .collect()
        })
        .unwrap_or_default();
    // Files of any readable version: an older run gains files of the
    // current version when it is attributed again.
    let version = kvs
        .get(kv::FORMAT_VERSION)
        .and_then(|v| v.parse::<u32>().ok());
    if !version.is_some_and(|v| (OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&v)) {
        return Err(format!(
            "{}: {} is {:?}, expected {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}",
            f.path,
            kv::FORMAT_VERSION,
            kvs.get(kv::FORMAT_VERSION)
        ));
    }
    let expect = [
        (kv::RUN_ID, Some(run.manifest().run_id.as_str())),
        (kv::TABLE, Some(table.name())),
        (
            kv::LAYER,
            f.layer.as_deref().filter(|_| table.is_partitioned()),
        ),
    ];
    for (key, want) in expect {
        let Some(want) = want else { continue };
        match kvs.get(key) {
            Some(got) if *got == want => {}
            Some(got) => return Err(format!("{}: {key} is {got:?}, expected {want:?}", f.path)),
            None => return Err(format!("{}: key/value metadata {key} missing", f.path)),
        }
    }
    let arrow = parquet::arrow::parquet_to_arrow_schema(md.schema_descr(), md.key_value_metadata())
        .map_err(|e| format!("{}: {e}", f.path))?;
    // Contributions are written by the analyzer, whose schema has no dtype.
    let dtype = if table == Table::Contributions {
        Dtype::F32
    } else {
        run.manifest().dtype
    };
    // A file of an older version lacks the columns added since.
    let want = schema_as_of(table, dtype, version.unwrap_or(FORMAT_VERSION));
    if arrow.fields().len() != want.fields().len() {
        return Err(format!(
            "{}: {} columns, expected {}",
            f.path,
            arrow.fields().len(),
            want.fields().len()
        ));
    }
    for (got, exp) in arrow.fields().iter().zip(want.fields()) {
        let same_type = match (got.data_type(), exp.data_type()) {
            (arrow_schema::DataType::List(a), arrow_schema::DataType::List(b)) => {
                a.data_type() == b.data_type()
            }
            (a, b) => a == b,
        };
        if got.name() != exp.name() || !same_type || (got.is_nullable() && !exp.is_nullable()) {
            return Err(format!(
                "{}: column {} {} (nullable {}), expected {} {} (nullable {})",
                f.path,
                got.name(),
                got.data_type(),
                got.is_nullable(),
                exp.name(),
                exp.data_type(),
                exp.is_nullable()
            ));
        }
    }
    Ok(())
}

/// Files in the run that no commit lists.
fn strays(run: &Run, report: &mut Report) {
    let m = run.manifest();
    let mut known: HashSet<String> = all_files(m).iter().map(|f| f.path.clone()).collect();
    known.extend(m.commits.iter().filter_map(|c| c.weights.clone()));
    let mut temp = Vec::new();
    let mut stray = Vec::new();
    let mut dirs: Vec<String> = Table::ALL.iter().map(|t| t.name().to_owned()).collect();
    dirs.push("weights".into());
    dirs.push(layout::CHECKPOINTS.into());
    for dir in dirs {
        walk(run.dir(), &dir, &mut |rel, name| {
            if layout::is_temp_name(name) {
                temp.push(rel.to_owned());
            } else if !known.contains(rel) {
                stray.push(rel.to_owned());
            }
        });
    }
    if let Ok(entries) = std::fs::read_dir(run.dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if layout::is_temp_name(&name) {
                temp.push(name);
            }
        }
    }
    let n = temp.len() + stray.len();
    if n == 0 {
        report.push("integrity: stray files", Status::Pass, "none");
    } else {
        let mut all: Vec<String> = temp
            .iter()
            .map(|t| format!("{t} (temporary)"))
            .chain(stray.iter().map(|s| format!("{s} (not in the manifest)")))
            .collect();
        all.truncate(5);
        report.push(
            "integrity: stray files",
            Status::Warn,
            format!("{n} uncommitted: {}", all.join(", ")),
        );
    }
}

/// Calls `f(relative path, file name)` for every file under `<run>/<rel>`.
fn walk(run: &Path, rel: &str, f: &mut dyn FnMut(&str, &str)) {
    let Ok(entries) = std::fs::read_dir(run.join(rel)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let child = format!("{rel}/{name}");
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(run, &child, f),
            Ok(_) => f(&child, &name),
            Err(_) => {}
        }
    }
}

fn completeness(
    run: &Run,
    options: &Options,
    report: &mut Report,
    progress: &mut dyn FnMut(&Progress),
) {
    let m = run.manifest();
    let setup = match Setup::load(run) {
        Ok(s) => s,
        Err(e) => {
            let status = if m.commits.iter().any(|c| c.step.is_some()) {
                Status::Fail
            } else {
                Status::Skip
            };
            report.push("completeness", status, e.to_string());
            return;
        }
    };
    let layers = m.model.traced_layers().count();
    for (layer_index, layer) in m.model.traced_layers().enumerate() {
        let mut p = Progress {
            layer: layer.name().to_owned(),
            layer_index,
            layers,
            records_done: 0,
            records_total: m
                .files(Table::Updates)
                .iter()
                .filter(|f| f.layer.as_deref() == Some(layer.name()))
                .map(|f| f.rows)
                .sum(),
        };
        progress(&p);
        let mut on_records = |n: usize| {
            p.records_done += n as u64;
            progress(&p);
        };
        let name = format!("completeness: {} weights", layer.name());
        match weights_residual(run, &layer, &setup, options, &mut on_records) {
            Ok(residual) => {
                let (tolerance, exact, detail) =
                    weights_verdict(m, &setup, &layer, &residual, options);
                report.measure(name, residual.relative, tolerance, exact, detail);
            }
            Err(e) => report.push(name, Status::Fail, e.to_string()),
        }
        probes_check(run, &layer, &setup, options, report);
    }
    attribution_check(run, &setup, options, report);
}

/// A layer's reconstruction residual.
struct Residual {
    /// `‖R‖ / ‖W_T − W_0‖`.
    relative: f64,
    /// For f16 traces, the bound on the rounding of the stored factors,
    /// relative to `‖W_T − W_0‖` (0 otherwise).
    storage_bound: f64,
    /// The rounding of the training loop's own f32 weights, relative to
    /// `‖W_T − W_0‖`: each step stores `W_{t+1}` rounded to f32 (at most
    /// `2⁻²⁴·|w|` per element), `2⁻²⁴ ‖W_T‖ √steps` over the run (rounding
    /// errors of independent steps add like a random walk). It matters when
    /// the weights hardly move (`‖W_T‖ ≫ ‖W_T − W_0‖`: a tiny learning rate,
    /// heavy clipping).
    weight_rounding: f64,
    /// `‖W_T − W_0‖`.
    change: f64,
}

/// The tolerance a layer's residual is held to, whether it must hold, and
/// the detail of the check: what the tolerance is made of and, when the
/// residual exceeds it, what to look at.
fn weights_verdict(
    m: &Manifest,
    setup: &Setup,
    layer: &TracedLayer<'_>,
    r: &Residual,
    options: &Options,
) -> (f64, bool, String) {
    let Ok(h) = setup.history(layer.name()) else {
        return (
            options.tolerance,
            true,
            "no step history for the layer".into(),
        );
    };
    let exact = match m.mode {
        Mode::Batch => true,
        Mode::Instance => {
            (m.optimizer.kind == OptimizerKind::Sgd || h.preconditioner.is_some())
                && !h.weight_decay
        }
    };
    // Steps that ran in bf16 or f16 (autocast) applied gradients rounded to
    // that type: at most u·‖g_t‖ per step, moved by σ_t η_t.
    let compute_bound = if h.precision == Precision::F32 {
        0.0
    } else {
        h.precision.unit_roundoff() * h.applied / r.change
    };
    let tolerance = options.tolerance + r.storage_bound + compute_bound + r.weight_rounding;
    let mut parts = vec![format!("tolerance {:.1e}", options.tolerance)];
    if r.weight_rounding >= options.tolerance / 10.0 {
        parts.push(format!(
            "+ f32 weight rounding {:.2e} (2⁻²⁴·‖W_T‖·√steps, the weights move little)",
            r.weight_rounding
        ));
    }
    if r.storage_bound > 0.0 {
        parts.push(format!(
            "+ f16 storage rounding bound {:.2e}",
            r.storage_bound
        ));
    }
    if compute_bound > 0.0 {
        parts.push(format!(
            "+ {} compute rounding bound {compute_bound:.2e} (u = {:.1e} of the applied gradients)",
            h.precision.as_str(),
            h.precision.unit_roundoff()
        ));
    }
    if h.preconditioner.is_some() {
        parts.push(format!(
            "(records scaled by {}'s preconditioner)",
            format!("{:?}", m.optimizer.kind).to_lowercase()
        ));
    }
    let mut detail = parts.join(" ");
    if !exact {
        let why = if m.optimizer.kind == OptimizerKind::Sgd || h.preconditioner.is_some() {
            "weight decay leaves a residual by design (docs/method.md §5)".to_owned()
        } else {
            format!(
                "{} in instance mode leaves a residual by design",
                format!("{:?}", m.optimizer.kind).to_lowercase()
            )
        };
        detail = format!("informational: {why}; {detail}");
    } else if r.relative > tolerance {
        let lookup = if h.per_step {
            "the layer_steps table holds what each step applied"
        } else {
            "this run records one momentum and the learning rate per step only (format 6 or older, or a producer without layer_steps)"
        };
        detail = format!(
            "{detail}; the records do not add up to W_T − W_0: records are missing, or the optimizer \
             applied updates the producer did not record (gradient clipping or scaling, a hook that \
             edits gradients, hyper-parameters other than recorded); {lookup}"
        );
    }
    (tolerance, exact, detail)
}

/// The residual of `layer`: `‖R‖ / ‖W_T − W_0‖` and, for f16 traces, the
/// rounding bound relative to `‖W_T − W_0‖`.
fn weights_residual(
    run: &Run,
    layer: &TracedLayer<'_>,
    setup: &Setup,
    options: &Options,
    on_records: &mut dyn FnMut(usize),
) -> Result<Residual> {
    // A preconditioned run's records are replayed as whole updates
    // (precondition.rs): its f16 bound is that of whole updates.
    let mode = crate::precondition::records_mode(run.manifest());
    let geom = Geometry::of(layer, mode)?;
    let dtype = run.manifest().dtype;
    let mut sum = vec![0.0; geom.delta_len()];
    let mut bound = 0.0;
    let f16 = dtype == Dtype::F16;
    let shape = layer.record_shape(mode);
    let full = layer.records_full(mode);
    let positions = layer.positions();
    let ids = layer.kind().u_is_ids();
    replay::stream(
        run,
        layer,
        setup,
        options.batch_rows,
        Some(&mut sum),
        |recs, scales| {
            on_records(scales.len());
            if f16 {
                for (i, s) in scales.iter().enumerate() {
                    let (u, v) = (recs.u_of(i), recs.v_of(i));
                    // A ragged record's own positions; else the spec's T.
                    let n = match shape {
                        Lens::PerPosition(..) => shape.positions(u.len(), v.len()).unwrap_or(0),
                        Lens::Fixed(..) => positions,
                    };
                    bound += s.abs() * f16_update_bound(u, v, full, layer.bias(), n, ids);
                }
            }
            Ok(())
        },
    )?;
    let change = setup.weight_change(layer)?;
    let residual = change.minus(&kernel::split_delta(&geom, &sum));
    let scale = change.norm();
    if scale == 0.0 {
        return Err(Error::Incomplete {
            run: run.dir().to_path_buf(),
            message: format!("layer {} did not change during training", layer.name()),
        });
    }
    let steps = setup.history(layer.name())?.scales.len() as f64;
    let weight_rounding = f64::powi(2.0, -24) * setup.last.layer(layer)?.norm() * steps.sqrt();
    Ok(Residual {
        relative: residual.norm() / scale,
        storage_bound: bound / scale,
        weight_rounding: weight_rounding / scale,
        change: scale,
    })
}

/// Upper bound on `‖ΔŴ − ΔW‖` (weight and bias) from f16 rounding of one
/// record's factors. With `ids` (an embedding: `u` exact token ids, each row
/// of ΔW a sum of `v` rows) it is `√T ‖E_V‖_F`: a row summing `n` rows errs
/// by at most `√n` times their errors' norm, and `n ≤ T`.
fn f16_update_bound(
    u: &[f64],
    v: &[f64],
    full: bool,
    bias: bool,
    positions: usize,
    ids: bool,
) -> f64 {
    const U: f64 = 1.0 / 2048.0; // unit roundoff of f16, 2⁻¹¹
    const SUB: f64 = 1.0 / 33_554_432.0; // half the subnormal spacing, 2⁻²⁵
    let norm = |x: &[f64]| x.iter().map(|a| a * a).sum::<f64>().sqrt();
    let err = |x: &[f64], n: f64| U / (1.0 - U) * n + SUB * (x.len() as f64).sqrt();
    let (nv, nu) = (norm(v), norm(u));
    let ev = err(v, nv);
    if full {
        return ev;
    }
    if ids {
        return ev * (positions as f64).sqrt();
    }
    let eu = err(u, nu);
    let weight = ev * nu + (nv + ev) * eu;
    // Δb = V·1: ‖E_V 1‖ ≤ ‖E_V‖_F √P.
    let bias = if bias {
        ev * (positions as f64).sqrt()
    } else {
        0.0
    };
    weight + bias
}

/// Probes agree with the weights: `p = (W_T − W_0) ⊛ a + Δb` and `p_norm = ‖p‖`.
fn probes_check(
    run: &Run,
    layer: &TracedLayer<'_>,
    setup: &Setup,
    options: &Options,
    report: &mut Report,
) {
    let name = format!("completeness: {} probes", layer.name());
    let has = !run
        .files_by_layer(Table::Probes)
        .get(&Some(layer.name().to_owned()))
        .is_none_or(Vec::is_empty);
    if !has {
        report.push(name, Status::Skip, "no probes committed");
        return;
    }
    let result = (|| -> Result<(f64, usize)> {
        let probes = Probes::read(run, layer)?;
        let change = setup.weight_change(layer)?;
        let geom = Geometry::of(layer, run.manifest().mode)?;
        let mut worst = 0.0f64;
        for q in 0..probes.len() {
            let p = probes.p(q);
            let pn2: f64 = p.iter().map(|x| x * x).sum();
            let pn = pn2.sqrt();
            // ⟨c, p⟩ and ‖c‖ of c = (W_T − W_0) ⊛ a + Δb: ‖c − p‖² = ‖c‖² − 2⟨c,p⟩ + ‖p‖².
            let (dot, norm) = kernel::direct(&geom, &change, probes.a(q), p)?;
            let diff = (norm * norm - 2.0 * dot + pn2).max(0.0).sqrt();
            let denom = pn.max(f64::MIN_POSITIVE);
            worst = worst.max(diff / denom);
            worst = worst.max((probes.p_norm[q] - pn).abs() / denom);
        }
        Ok((worst, probes.len()))
    })();
    match result {
        Ok((worst, n)) => report.measure(
            name,
            worst,
            options.tolerance,
            true,
            format!("{n} probes: max relative |p − ((W_T−W_0)⊛a + Δb)| and |p_norm − ‖p‖|"),
        ),
        Err(e) => report.push(name, Status::Fail, e.to_string()),
    }
}

/// Per probe and layer, `|Σ dot − ‖p‖²| / ‖p‖²` over every complete
/// materialised attribution (per record or summed).
fn attribution_check(run: &Run, setup: &Setup, options: &Options, report: &mut Report) {
    let m = run.manifest();
    let name = "completeness: attribution";
    if m.attributions.is_empty() {
        report.push(
            name,
            Status::Skip,
            "nothing materialised (contributions are computed on demand)",
        );
        return;
    }
    let complete: Vec<_> = m
        .attributions
        .iter()
        .filter(|a| a.steps.is_none() && !a.self_only)
        .collect();
    if complete.is_empty() {
        report.push(
            name,
            Status::Skip,
            "partial attributions only (--steps or --self-only): dots do not sum to ‖p‖²",
        );
        return;
    }
    if let Some(stale) = complete
        .iter()
        .find(|a| a.as_of_step.map(|s| s.0) != Some(setup.as_of))
    {
        report.push(
            name,
            Status::Fail,
            format!(
                "stale: attributed as of step {:?}, the latest weights are as of step {}",
                stale.as_of_step.map(|s| s.0),
                setup.as_of
            ),
        );
        return;
    }
    let result = (|| -> Result<(f64, f64, usize)> {
        // (attribution, layer, probe) → (Σ dot, residual dot)
        let mut sums: BTreeMap<(usize, String, i64), (f64, f64)> = BTreeMap::new();
        for (k, attr) in complete.iter().enumerate() {
            for f in &attr.files {
                let layer = f.layer.clone().unwrap_or_default();
                let path = run.path(&f.path);
                // The residual is the row without a step (contributions) or
                // with no records (influence).
                let marker = if f.table == Table::Influence.name() {
                    col::RECORDS
                } else {
                    col::STEP
                };
                for batch in open_columns(&path, &[col::PROBE_ID, marker, col::DOT], 65_536)? {
                    let batch = batch.map_err(|e| Error::parquet(&path, e.into()))?;
                    let probe = i64s(&batch, &path, col::PROBE_ID)?;
                    let residual: Vec<bool> = if marker == col::STEP {
                        crate::records::nullable::<arrow::datatypes::Int64Type>(
                            &batch, &path, marker,
                        )?
                        .into_iter()
                        .map(|s| s.is_none())
                        .collect()
                    } else {
                        i64s(&batch, &path, marker)?
                            .into_iter()
                            .map(|r| r == 0)
                            .collect()
                    };
                    let dot = f64s(&batch, &path, col::DOT)?;
                    for ((p, r), d) in probe.into_iter().zip(residual).zip(dot) {
                        let e = sums.entry((k, layer.clone(), p)).or_default();
                        e.0 += d;
                        if r {
                            e.1 += d;
                        }
                    }
                }
            }
        }
        let mut worst = 0.0f64;
        let mut worst_residual = 0.0f64;
        let mut n = 0;
        for l in m.model.traced_layers() {
            let probes = Probes::read(run, &l)?;
            for q in 0..probes.len() {
                for k in 0..complete.len() {
                    let Some((total, residual)) =
                        sums.get(&(k, l.name().to_owned(), probes.probe_id[q]))
                    else {
                        continue;
                    };
                    let pn2 = probes.p_norm[q] * probes.p_norm[q];
                    if pn2 > 0.0 {
                        worst = worst.max((total - pn2).abs() / pn2);
                        worst_residual = worst_residual.max((residual / pn2).abs());
                    }
                    n += 1;
                }
            }
        }
        Ok((worst, worst_residual, n))
    })();
    match result {
        Ok((_, _, 0)) => report.push(name, Status::Fail, "the attribution has no rows for any recorded probe"),
        Ok((worst, residual, n)) => report.measure(
            name,
            worst,
            options.tolerance,
            true,
            format!("{n} probe–layer pairs: max |Σ dot − ‖p‖²|/‖p‖²; max |residual share| {residual:.3e}"),
        ),
        Err(e) => report.push(name, Status::Fail, e.to_string()),
    }
}
