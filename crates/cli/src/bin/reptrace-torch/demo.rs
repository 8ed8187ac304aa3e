//! `reptrace demo`: train the MLP on the bundled digits with tracing,
//! explain one test probe right away (its contributions computed on
//! demand) and write its report.
//!
//! One function per phase: [`prepare_dir`] replaces a previous demo run,
//! [`train_phase`] trains with the demo settings
//! ([`reptrace_tch::TrainConfig::demo`]), [`report_phase`] prints the
//! training summary, [`explain_phase`] prints the top-5 proponents and the
//! class shares per layer of one probe and writes `report.html`. Nothing is
//! materialised: `reptrace attribute` is for export and scale.
use anyhow::{Context, bail};
use reptrace_tch::{TrainConfig, TrainSummary};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Arguments of `reptrace demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The run directory; a previous run there is replaced.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
}

/// Removes a previous run at `dir` so the demo can write there. Refuses to
/// delete a directory that is neither empty nor a reptrace run.
pub fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let empty = std::fs::read_dir(dir)
        .with_context(|| format!("--out: {}", dir.display()))?
        .next()
        .is_none();
    if empty {
        return Ok(());
    }
    if !reptrace_format::layout::manifest_path(dir).is_file() {
        bail!(
            "--out: {} exists and is not a reptrace run; refusing to replace it (choose another --out)",
            dir.display()
        );
    }
    std::fs::remove_dir_all(dir)
        .with_context(|| format!("removing the previous demo run {}", dir.display()))
}

/// Trains the demo model into `dir`.
pub fn train_phase(dir: &Path) -> anyhow::Result<TrainSummary> {
    let config = TrainConfig::demo(dir);
    crate::train::train_with_progress(&config)
}

/// Prints what was recorded.
pub fn report_phase(out: &mut dyn Write, summary: &TrainSummary) -> anyhow::Result<()> {
    writeln!(
        out,
        "demo: MLP 64-32-16-10 on the bundled digits (1437 train, 360 test), SGD with momentum 0.9, lr 0.1 cosine"
    )?;
    crate::train::write_summary(out, summary)
}

/// Prints, for `probe`, its top-5 proponents per layer with labels and the
/// class shares per layer.
pub fn explain_probe(out: &mut dyn Write, dir: &Path, probe: i64) -> anyhow::Result<()> {
    use reptrace_analyze::query::Query;
    use reptrace_analyze::sql::{self, Format};
    let run = reptrace_analyze::open(dir)?;
    let ctx = reptrace_analyze::context(&run)?;
    let rt = reptrace_cli::cmd::sql::runtime()?;
    let probe_s = probe.to_string();
    let (_, header) = rt.block_on(reptrace_analyze::sql::run(
        &ctx,
        &format!("SELECT label, predicted FROM probes WHERE probe_id = {probe} LIMIT 1"),
    ))?;
    let (label, predicted) = header
        .first()
        .filter(|b| b.num_rows() > 0)
        .map(|b| (int_at(b, 0), int_at(b, 1)))
        .unwrap_or((None, None));
    writeln!(out)?;
    writeln!(
        out,
        "probe {probe} (a test image of a {}, predicted {}): its top-5 proponents per layer",
        label.map_or("?".into(), |l| l.to_string()),
        predicted.map_or("?".into(), |l| l.to_string()),
    )?;
    let top = Query::resolve("top_proponents")?;
    let (schema, batches) = rt.block_on(top.run(&ctx, &[("probe", &probe_s), ("k", "5")]))?;
    sql::write(&schema, &batches, Format::Table, out)?;

    writeln!(out, "class shares per layer (Σ dot / ‖p‖², residual last):")?;
    let shares = Query::resolve("class_shares")?;
    let (_, batches) = rt.block_on(shares.run(&ctx, &[("probe", &probe_s)]))?;
    write_share_table(out, &batches, run.manifest().classes.len())
}

/// An integer cell of a batch.
fn int_at(batch: &arrow_array::RecordBatch, column: usize) -> Option<i64> {
    use arrow_array::Array;
    let c = arrow::compute::cast(batch.column(column), &arrow_schema::DataType::Int64).ok()?;
    let c = c.as_any().downcast_ref::<arrow_array::Int64Array>()?;
    (!c.is_null(0)).then(|| c.value(0))
}

/// The `class_shares` rows as one line per layer, one column per class.
fn write_share_table(
    out: &mut dyn Write,
    batches: &[arrow_array::RecordBatch],
    classes: usize,
) -> anyhow::Result<()> {
    use arrow_array::{Array, Float64Array, Int64Array, StringArray};
    use arrow_schema::DataType;
    // layer → (class → share), residual
    let mut rows: Vec<(String, Vec<f64>, f64)> = Vec::new();
    for b in batches {
        let cast = |name: &str, t: &DataType| -> anyhow::Result<arrow_array::ArrayRef> {
            let c = b
                .column_by_name(name)
                .ok_or_else(|| anyhow::anyhow!("class_shares: no column {name}"))?;
            Ok(arrow::compute::cast(c, t)?)
        };
        let layer = cast("layer", &DataType::Utf8)?;
        let layer = layer
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| anyhow::anyhow!("class_shares: layer is not text"))?;
        let label = cast("label", &DataType::Int64)?;
        let label = label
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| anyhow::anyhow!("class_shares: label is not an integer"))?;
        let share = cast("share", &DataType::Float64)?;
        let share = share
            .as_any()
            .downcast_ref::<Float64Array>()
            .ok_or_else(|| anyhow::anyhow!("class_shares: share is not a number"))?;
        for i in 0..b.num_rows() {
            let name = layer.value(i).to_owned();
            if rows.last().is_none_or(|r| r.0 != name) {
                rows.push((name, vec![0.0; classes], 0.0));
            }
            let Some(row) = rows.last_mut() else { continue };
            let s = if share.is_null(i) {
                0.0
            } else {
                share.value(i)
            };
            match usize::try_from(label.value(i)) {
                Ok(c) if !label.is_null(i) && c < classes => row.1[c] = s,
                _ => row.2 += s,
            }
        }
    }
    write!(out, "{:<8}", "layer")?;
    for c in 0..classes {
        write!(out, "{c:>7}")?;
    }
    writeln!(out, "{:>10}", "residual")?;
    for (layer, shares, residual) in rows {
        write!(out, "{layer:<8}")?;
        for s in shares {
            write!(out, "{s:>7.3}")?;
        }
        writeln!(out, "{residual:>10.1e}")?;
    }
    Ok(())
}

/// Explains the probe the demo picks ([`reptrace_report::pick_probe`]:
/// the first misclassified test probe, else the first) on the terminal, and
/// writes its report to `<dir>/report.html`, printing the path.
pub fn explain_phase(out: &mut dyn Write, dir: &Path) -> anyhow::Result<PathBuf> {
    let probe = reptrace_report::pick_probe(dir)?;
    writeln!(out)?;
    writeln!(
        out,
        "asking about test probe {probe} right after training (contributions computed on demand):"
    )?;
    explain_probe(out, dir, probe)?;
    let path = dir.join("report.html");
    let options = reptrace_report::Options {
        probe,
        ..Default::default()
    };
    reptrace_cli::cmd::report::write_report(dir, &options, &path)?;
    writeln!(out)?;
    writeln!(out, "report of probe {probe}: {}", path.display())?;
    Ok(path)
}

/// Runs `reptrace demo`.
pub fn run(args: &DemoArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    prepare_dir(&args.out)?;
    let summary = train_phase(&args.out)?;
    report_phase(out, &summary)?;
    explain_phase(out, &args.out)?;
    Ok(())
}
