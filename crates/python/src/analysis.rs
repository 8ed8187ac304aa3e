//! The analyzer from Python: the same functions as the CLI's `sql`, `query`,
//! `attribute`, `verify`, `report` and `info`, on the same engine.
use crate::arrow_stream::ArrowStream;
use crate::error;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use reptrace_analyze::query::Query;
use reptrace_analyze::{ProbeSelection, StepRange, verify};
use reptrace_report as report;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// One process-wide runtime for DataFusion.
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| error::AnalysisError::new_err(format!("starting the query runtime: {e}")))?;
    Ok(RT.get_or_init(|| rt))
}

/// Runs read-only SQL over the run's tables.
#[pyfunction]
fn sql(py: Python<'_>, run: PathBuf, query: String) -> PyResult<ArrowStream> {
    let rt = runtime()?;
    let (schema, batches) = py
        .detach(|| {
            let run = reptrace_analyze::open(&run)?;
            let ctx = reptrace_analyze::context(&run)?;
            rt.block_on(reptrace_analyze::sql::run(&ctx, &query))
                .map_err(|e| run.explain(e))
        })
        .map_err(error::analysis)?;
    Ok(ArrowStream::new(schema, batches))
}

/// Runs a canned query (by name) or a `.sql` file with its parameters.
#[pyfunction]
#[pyo3(signature = (run, name, params=None))]
fn query(
    py: Python<'_>,
    run: PathBuf,
    name: String,
    params: Option<HashMap<String, String>>,
) -> PyResult<ArrowStream> {
    let rt = runtime()?;
    let params = params.unwrap_or_default();
    let (schema, batches) = py
        .detach(|| {
            let q = Query::resolve(&name)?;
            let run = reptrace_analyze::open(&run)?;
            let ctx = reptrace_analyze::context(&run)?;
            let pairs: Vec<(&str, &str)> = params
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            rt.block_on(q.run(&ctx, &pairs)).map_err(|e| run.explain(e))
        })
        .map_err(error::analysis)?;
    Ok(ArrowStream::new(schema, batches))
}

/// The names of the built-in canned queries.
#[pyfunction]
fn builtin_queries() -> Vec<&'static str> {
    reptrace_analyze::query::BUILTIN
        .iter()
        .map(|(n, _)| *n)
        .collect()
}

/// Attributes probes (`"test"`, `"train"`, `"all"` or `"ids:1,2"`) at the
/// given layers (all when empty); returns a summary dict.
#[pyfunction]
#[pyo3(signature = (run, probes="test", layers=None, steps=None, self_only=false, by="step"))]
fn attribute<'py>(
    py: Python<'py>,
    run: PathBuf,
    probes: &str,
    layers: Option<Vec<String>>,
    steps: Option<String>,
    self_only: bool,
    by: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let probes: ProbeSelection = probes.parse().map_err(error::analysis)?;
    let by = match by {
        "step" => reptrace_format::Aggregation::Step,
        "epoch" => reptrace_format::Aggregation::Epoch,
        "instance" => reptrace_format::Aggregation::Instance,
        other => {
            return Err(error::analysis(reptrace_analyze::Error::BadOption {
                option: "by",
                value: other.to_owned(),
                why: "expected step, epoch or instance".into(),
            }));
        }
    };
    let steps = steps
        .as_deref()
        .map(str::parse::<StepRange>)
        .transpose()
        .map_err(error::analysis)?;
    let options = reptrace_analyze::Options {
        probes,
        layers: layers.unwrap_or_default(),
        steps,
        self_only,
        by,
        ..reptrace_analyze::Options::default()
    };
    let report = py
        .detach(|| reptrace_analyze::attribute(&run, &options, &mut |_| {}))
        .map_err(error::analysis)?;
    let out = PyDict::new(py);
    out.set_item("rows", report.rows)?;
    out.set_item("seconds", report.elapsed.as_secs_f64())?;
    out.set_item("probes", report.attribution.probes.clone())?;
    out.set_item("by", report.attribution.by.name())?;
    out.set_item("written", report.written)?;
    out.set_item("bytes", report.bytes)?;
    out.set_item("as_of_step", report.attribution.as_of_step.map(|s| s.0))?;
    let layers = PyList::empty(py);
    for l in &report.layers {
        let d = PyDict::new(py);
        d.set_item("layer", &l.layer)?;
        d.set_item("probes", l.probes)?;
        d.set_item("records", l.records)?;
        d.set_item("rows", l.rows)?;
        d.set_item(
            "residual_over_change",
            if l.change_norm > 0.0 {
                l.residual_norm / l.change_norm
            } else {
                0.0
            },
        )?;
        layers.append(d)?;
    }
    out.set_item("layers", layers)?;
    Ok(out)
}

/// Integrity and completeness checks: a list of dicts (`name`, `status`
/// of pass/warn/FAIL/skip, `value`, `tolerance`, `detail`).
#[pyfunction]
#[pyo3(signature = (run, tolerance=1e-5))]
fn verify_run<'py>(py: Python<'py>, run: PathBuf, tolerance: f64) -> PyResult<Bound<'py, PyList>> {
    if !(tolerance.is_finite() && tolerance >= 0.0) {
        return Err(error::invalid(format!(
            "tolerance must be a non-negative number, got {tolerance}"
        )));
    }
    let options = verify::Options {
        tolerance,
        ..verify::Options::default()
    };
    let report = py
        .detach(|| verify::verify(&run, &options))
        .map_err(error::analysis)?;
    let out = PyList::empty(py);
    for c in &report.checks {
        let d = PyDict::new(py);
        d.set_item("name", &c.name)?;
        d.set_item("status", c.status.to_string())?;
        d.set_item("value", c.value)?;
        d.set_item("tolerance", c.tolerance)?;
        d.set_item("detail", &c.detail)?;
        out.append(d)?;
    }
    Ok(out)
}

/// Writes the HTML report of `probe` to `out` (the run must be attributed
/// for that probe).
#[pyfunction]
#[pyo3(signature = (run, probe, out, k=10, layers=None))]
fn write_report(
    py: Python<'_>,
    run: PathBuf,
    probe: i64,
    out: PathBuf,
    k: usize,
    layers: Option<Vec<String>>,
) -> PyResult<()> {
    let options = report::Options {
        probe,
        layers: layers.unwrap_or_default(),
        k,
        ..Default::default()
    };
    let html = py
        .detach(|| report::generate(&run, &options))
        .map_err(error::analysis)?;
    std::fs::write(&out, html)
        .map_err(|e| error::AnalysisError::new_err(format!("{}: {e}", out.display())))
}

/// The run's manifest as JSON (opening it finishes an interrupted commit).
#[pyfunction]
fn manifest(py: Python<'_>, run: PathBuf) -> PyResult<String> {
    let m = py
        .detach(|| reptrace_format::Manifest::open(&run))
        .map_err(error::format)?;
    Ok(m.to_json())
}

/// Whether a live recorder holds the run's lock (tested with a shared lock
/// released at once; the lock file is never created).
#[pyfunction]
fn lock_held(py: Python<'_>, run: PathBuf) -> PyResult<bool> {
    py.detach(|| reptrace_format::layout::lock_held(&run))
        .map_err(|e| {
            error::invalid(format!(
                "{}: {e}",
                run.join(reptrace_format::layout::LOCK).display()
            ))
        })
}

/// A weights snapshot of the run (`"initial"`, `"final"`: the latest, or a
/// path relative to the run) as `{layer: (weight, bias)}` for every traced
/// layer: flat row-major `float64` arrays (bias empty without one).
#[pyfunction]
fn layer_weights<'py>(py: Python<'py>, run: PathBuf, which: &str) -> PyResult<Bound<'py, PyDict>> {
    let m = py
        .detach(|| reptrace_format::Manifest::open(&run))
        .map_err(error::format)?;
    let rel = match which {
        "initial" => m.initial_weights(),
        "final" => m.latest_weights().map(|(w, _)| w),
        other => Some(other),
    }
    .ok_or_else(|| {
        error::AnalysisError::new_err(format!("{}: no {which} weights snapshot", run.display()))
    })?
    .to_owned();
    reptrace_format::layout::check_relative(&rel).map_err(error::format)?;
    let path = run.join(&rel);
    let layers = py
        .detach(|| {
            let snap = reptrace_analyze::weights::Snapshot::read(&path)?;
            m.model
                .traced_layers()
                .map(|l| Ok((l.name().to_owned(), snap.layer(&l)?)))
                .collect::<reptrace_analyze::Result<Vec<_>>>()
        })
        .map_err(error::analysis)?;
    let out = PyDict::new(py);
    for (name, w) in layers {
        let weight = numpy::PyArray1::from_vec(py, w.weight);
        let bias = numpy::PyArray1::from_vec(py, w.bias);
        out.set_item(name, (weight, bias))?;
    }
    Ok(out)
}

/// The storage (`"factors"` or `"full"`) a layer's instance-mode records
/// use by its kind's rule (`LayerKind::instance_storage`): `spec_json` is
/// one manifest module entry (its `storage` may be left out); a bad spec
/// raises `InvalidInput`.
#[pyfunction]
fn record_storage(spec_json: &str) -> PyResult<&'static str> {
    let bad = |e: String| error::invalid(format!("layer spec: {e}"));
    let mut value: serde_json::Value =
        serde_json::from_str(spec_json).map_err(|e| bad(e.to_string()))?;
    if let Some(obj) = value.as_object_mut() {
        // The storage is what is asked for; any placeholder parses (a norm
        // has no such field and ignores it).
        obj.entry("storage").or_insert_with(|| "factors".into());
    }
    let module: reptrace_format::Module =
        serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    let layer = module
        .layer()
        .ok_or_else(|| bad("the module is of no traced kind".into()))?;
    layer.check().map_err(error::invalid)?;
    Ok(match layer.instance_storage() {
        reptrace_format::Storage::Full => "full",
        reptrace_format::Storage::Factors => "factors",
    })
}

/// Checks a traced layer's name as the format does; raises `InvalidInput`.
#[pyfunction]
fn check_layer_name(name: &str) -> PyResult<()> {
    reptrace_format::layout::check_layer_name(name).map_err(|e| error::invalid(e.to_string()))
}

/// Registers the functions on the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sql, m)?)?;
    m.add_function(wrap_pyfunction!(query, m)?)?;
    m.add_function(wrap_pyfunction!(builtin_queries, m)?)?;
    m.add_function(wrap_pyfunction!(attribute, m)?)?;
    m.add_function(wrap_pyfunction!(verify_run, m)?)?;
    m.add_function(wrap_pyfunction!(write_report, m)?)?;
    m.add_function(wrap_pyfunction!(manifest, m)?)?;
    m.add_function(wrap_pyfunction!(lock_held, m)?)?;
    m.add_function(wrap_pyfunction!(record_storage, m)?)?;
    m.add_function(wrap_pyfunction!(layer_weights, m)?)?;
    m.add_function(wrap_pyfunction!(check_layer_name, m)?)?;
    Ok(())
}
