//! The reptrace report: the visual report of one probe, a self-contained
//! HTML page (inline SVG charts drawn by plotters, no scripts from the
//! network, opens from disk), read from a run through the analyzer's SQL
//! session (`reptrace-analyze`).
//!
//! [`collect`] runs the canned queries (`class_shares`,
//! `class_shares_by_epoch`, `top_proponents`, `top_opponents`,
//! `layer_summary`, and `data_map` and `mislabel_candidates` for the
//! training dynamics) and one raw query for the `(cosine, norm, label)` rows of
//! the ridge plot through the analyzer's SQL session, and gathers the result
//! into a [`Report`]; [`render`] turns a [`Report`] into HTML;
//! [`generate`] does both for a run directory.
//!
//! Per traced layer the page shows: the ridge plot (one norm-weighted
//! density of cosine per class, [`kde`]), the class-share bars with the
//! residual, class shares per epoch (lines), and the top-k proponents and
//! opponents as a gallery. Inputs are drawn as images when the run was
//! trained on the bundled digits (`settings.data == "digits"`, shape
//! `[1, 8, 8]`, instance id = row of `data/digits.csv.gz`, embedded in the
//! binary); otherwise the gallery shows ids and labels.
//!
//! For the whole run, a "Training dynamics" section (read from the table
//! `examples`, format 6) shows the data map (variability against confidence
//! of every training instance, coloured by correctness, with the region
//! thresholds [`AMBIGUOUS`] and [`EASY`] and the count per region) and the
//! top [`CANDIDATES`] mislabel candidates as a gallery. A run without
//! `examples` rows (format ≤ 5, or trained with `--no-examples`) gets a
//! one-line notice instead ([`Report::dynamics`] is `None`).
//!
//! The charts are drawn by the `plotters` crate (SVG backend, inline). Each
//! is wrapped in an element that carries data attributes, so that tests (and
//! scripts) can count what was drawn: `figure.ridge[data-layer][data-classes]`,
//! `figure.shares[data-layer]` and `figure.epochs[data-layer][data-epochs]`,
//! each with a hidden `ul.series` of `li.series-item[data-class][data-colour]`
//! (ridge: `[data-records]`, shares: `[data-share]`, epochs: `[data-points]`;
//! `.predicted` on the predicted class) and plotters' `<svg>`, in which each
//! class's series is drawn in that class's colour; galleries are
//! `div.gallery[data-kind][data-layer]` with `figure.gallery-item`. The
//! dynamics section is `section.dynamics`, with
//! `figure.datamap[data-points][data-ambiguous][data-easy]` (one `<circle>`
//! with a `<title>` per instance in its `<svg>`),
//! `table.regions` of `tr[data-region][data-count]` and
//! `div.gallery.mislabel[data-kind="mislabel"]` of `figure.gallery-item`
//! `[data-instance][data-label][data-predicted][data-score]`; or
//! `p.no-dynamics`.
//!
//! ```no_run
//! # fn main() -> reptrace_analyze::Result<()> {
//! let html = reptrace_report::generate(
//!     std::path::Path::new("runs/demo"),
//!     &reptrace_report::Options { probe: 3, ..reptrace_report::Options::default() },
//! )?;
//! std::fs::write("report.html", html).expect("writable");
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![deny(clippy::unwrap_used)]

pub mod digits;
pub mod html;
pub mod kde;
pub mod optimizer;
pub mod plots;

use arrow::compute::cast;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, ArrowPrimitiveType, PrimitiveArray, RecordBatch, StringArray};
use arrow_schema::DataType;
use datafusion::prelude::SessionContext;
use reptrace_analyze::query::Query;
use reptrace_analyze::{Error, Result, Run};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// Points on which each ridge density is evaluated.
pub const GRID: usize = 201;

/// Variability from which an instance of the data map is ambiguous (the
/// `data_map` query's `ambiguous`).
pub const AMBIGUOUS: f64 = 0.2;
/// Confidence from which a stable instance of the data map is easy (the
/// `data_map` query's `easy`).
pub const EASY: f64 = 0.5;
/// Mislabel candidates shown (the `mislabel_candidates` query's `k`).
pub const CANDIDATES: usize = 12;

/// What to put in the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// The probe to explain.
    pub probe: i64,
    /// Traced layers to show; empty: every layer with contributions for the probe.
    pub layers: Vec<String>,
    /// Proponents and opponents per layer.
    pub k: usize,
    /// The queries' memory limit and spill directory.
    pub limits: reptrace_analyze::Limits,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            probe: 0,
            layers: Vec::new(),
            k: 16,
            limits: reptrace_analyze::Limits::default(),
        }
    }
}

/// The probe as recorded in the `probes` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// The probe id (`probes.probe_id`).
    pub id: i64,
    /// The row of the data set, when the probe is one.
    pub instance_id: Option<i64>,
    /// The probe's true class.
    pub label: i32,
    /// The class the final network predicts for it.
    pub predicted: i32,
    /// Softmax probability of the predicted and of the true class, when the
    /// model ends in a traced Linear layer with one output per class: from
    /// its logits `z_T = W_0 a + b_0 + p` (initial snapshot and probe row).
    pub probability: Option<(f64, f64)>,
}

/// One training instance's influence on the probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Influence {
    /// 1-based rank in the layer (`rank_in_layer` of `top_proponents` or
    /// `top_opponents`).
    pub rank: i64,
    /// The training instance.
    pub instance_id: i64,
    /// Its label.
    pub label: i32,
    /// `Σ dot / ‖p‖` over the instance's records.
    pub influence: f64,
    /// Number of the instance's records summed.
    pub records: i64,
}

/// The norm-weighted cosine density of one class.
#[derive(Debug, Clone, PartialEq)]
pub struct Ridge {
    /// The class whose records it shows.
    pub label: i32,
    /// `(cosine, density)` on [`GRID`] points from −1 to 1.
    pub curve: Vec<(f64, f64)>,
    /// The kernel bandwidth, in cosine units ([`kde::silverman`]).
    pub bandwidth: f64,
    /// Sum of the norms of the class's records.
    pub weight: f64,
    /// Number of the class's records.
    pub records: usize,
}

/// Everything the report shows for one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// The traced layer's name.
    pub name: String,
    /// `‖p‖` of the probe at this layer.
    pub p_norm: f64,
    /// Attributed records (the residual row not counted).
    pub records: i64,
    /// Class share per label.
    pub shares: BTreeMap<i32, f64>,
    /// Share of the batch-mode records of batches with several classes
    /// (0 in instance mode and with class-pure batches).
    pub mixed_share: f64,
    /// Share of the residual pseudo-source (the row without a step: weight
    /// decay, lost records).
    pub residual_share: f64,
    /// Sum of every share (1 for a complete attribution).
    pub total_share: f64,
    /// Class share per epoch and label.
    pub epoch_shares: BTreeMap<i32, BTreeMap<i32, f64>>,
    /// One cosine density per class with records, by label.
    pub ridges: Vec<Ridge>,
    /// The top [`Options::k`] instances of largest influence, by rank.
    pub proponents: Vec<Influence>,
    /// The top [`Options::k`] instances of smallest (most negative)
    /// influence, by rank.
    pub opponents: Vec<Influence>,
}

/// One training instance on the data map (a row of `data_map`).
#[derive(Debug, Clone, PartialEq)]
pub struct MapPoint {
    /// The training instance.
    pub instance_id: i64,
    /// Its label.
    pub label: i32,
    /// Epochs in which it was presented.
    pub epochs: i64,
    /// Mean over epochs of the probability of its label.
    pub confidence: f64,
    /// Population standard deviation over epochs of that probability.
    pub variability: f64,
    /// Fraction of epochs in which the model predicted its label.
    pub correctness: f64,
    /// `easy`, `ambiguous` or `hard`.
    pub region: String,
}

/// A likely mislabelled training instance (a row of `mislabel_candidates`).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// 1-based rank by score, highest first.
    pub rank: i64,
    /// The training instance.
    pub instance_id: i64,
    /// The label it was trained with.
    pub label: i32,
    /// The class predicted at its last presentation.
    pub predicted: i32,
    /// Mean loss over its presentations.
    pub score: f64,
    /// Mean probability of its label over its presentations.
    pub confidence: f64,
    /// Fraction of its presentations in which the model predicted its label.
    pub correctness: f64,
    /// Probability of its label at its last presentation.
    pub p_label: f64,
}

/// The training dynamics of the run (table `examples`).
#[derive(Debug, Clone, PartialEq)]
pub struct Dynamics {
    /// Every training instance presented, by id.
    pub points: Vec<MapPoint>,
    /// The variability from which an instance is ambiguous ([`AMBIGUOUS`]).
    pub ambiguous: f64,
    /// The confidence from which a stable instance is easy ([`EASY`]).
    pub easy: f64,
    /// The top mislabel candidates, by rank.
    pub candidates: Vec<Candidate>,
}

impl Dynamics {
    /// Instances per region, in the order easy, ambiguous, hard.
    pub fn regions(&self) -> [(&'static str, usize); 3] {
        ["easy", "ambiguous", "hard"]
            .map(|r| (r, self.points.iter().filter(|p| p.region == r).count()))
    }
}

/// Pixels of the instances shown, when the data set is known.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    /// `[C, H, W]` of one example.
    pub shape: Vec<usize>,
    /// Pixels (0..1) by instance id.
    pub pixels: HashMap<i64, Vec<f32>>,
}

/// A report's content, ready to [`render`].
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The run's id (manifest `run_id`).
    pub run_id: String,
    /// The model's name (manifest `model.name`).
    pub model: String,
    /// Shape of one input example (manifest `model.input_shape`).
    pub input_shape: Vec<usize>,
    /// A one-line description of the optimizer ([`optimizer::describe`]):
    /// its name, the range of the learning rate over the steps, momentum,
    /// weight decay and schedule.
    pub optimizer: String,
    /// Class names, indexed by label.
    pub classes: Vec<String>,
    /// The manifest's training settings (seed, epochs, data…).
    pub settings: BTreeMap<String, serde_json::Value>,
    /// Distinct epochs of the `steps` table.
    pub epochs: i64,
    /// Rows of the `steps` table.
    pub steps: i64,
    /// Share of probes the final model classifies correctly (the test
    /// accuracy when the probes are the test split), and how many probes.
    pub probe_accuracy: Option<(f64, usize)>,
    /// The probe explained.
    pub probe: Probe,
    /// The layers shown: in model order, or as [`Options::layers`] lists them.
    pub layers: Vec<Layer>,
    /// Pixels of the probe, proponents, opponents and candidates, when the
    /// run was trained on the bundled digits.
    pub images: Option<Images>,
    /// Proponents and opponents per layer ([`Options::k`]).
    pub k: usize,
    /// The data map and mislabel candidates; `None` when the run recorded
    /// no `examples` rows.
    pub dynamics: Option<Dynamics>,
}

/// Reads, opens and renders: the report's HTML for `run`.
pub fn generate(run: &Path, options: &Options) -> Result<String> {
    let run = Run::open(run)?;
    let ctx = reptrace_analyze::context_limited(&run, &Default::default(), &options.limits)?;
    let _cleanup = reptrace_analyze::limits::SpillCleanup::new(ctx.runtime_env());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("starting the query runtime: {e}")))?;
    let report = rt
        .block_on(reptrace_analyze::interrupt::or_interrupted(collect(
            &run, &ctx, options,
        )))
        .map_err(|e| run.explain(e).with_memory_limit(options.limits.memory));
    // An interrupted query may leave blocking work behind: do not wait for it.
    rt.shutdown_background();
    Ok(render(&report?))
}

/// The probe a demo explains: the first misclassified probe (by id) of the
/// last traced layer, else its first probe.
pub fn pick_probe(run: &Path) -> Result<i64> {
    let run = Run::open(run)?;
    let layer = run
        .manifest()
        .model
        .traced_layers()
        .last()
        .ok_or_else(|| Error::Incomplete {
            run: run.dir().to_path_buf(),
            message: "no traced layer".into(),
        })?;
    let probes = reptrace_analyze::probes::Probes::read(&run, &layer)?;
    let wrong = (0..probes.len()).find(|&i| probes.label[i] != probes.predicted[i]);
    wrong
        .or((!probes.is_empty()).then_some(0))
        .map(|i| probes.probe_id[i])
        .ok_or_else(|| Error::Incomplete {
            run: run.dir().to_path_buf(),
            message: format!("no probes recorded for layer {}", layer.name()),
        })
}

/// Renders a report as one HTML page.
pub fn render(report: &Report) -> String {
    html::page(report)
}

/// Runs the queries for `options.probe` on `ctx` (a context of `run`).
pub async fn collect(run: &Run, ctx: &SessionContext, options: &Options) -> Result<Report> {
    let m = run.manifest();
    let probe = read_probe(run, ctx, options.probe).await?;
    let probe_s = options.probe.to_string();
    let p = [("probe", probe_s.as_str())];
    let summary = Query::resolve("layer_summary")?.run(ctx, &p).await?.1;
    let layers = layers_shown(run, options, &summary)?;
    let tables = Tables::read(ctx, options, &summary).await?;
    let out_layers = layers
        .iter()
        .map(|name| tables.layer(name))
        .collect::<Result<Vec<_>>>()?;

    let dynamics = dynamics(ctx).await?;

    let (steps, epochs, steps_lr) = step_counts(ctx).await?;

    let images = images(m, &probe, &out_layers, dynamics.as_ref())?;
    let probe_accuracy = probe_accuracy(run)?;

    let name = m.settings.get("optimizer").and_then(|v| v.as_str());
    let lr = lr_range(run)?.or(steps_lr).unwrap_or([m.optimizer.lr; 2]);
    let optimizer = optimizer::describe(&m.optimizer, name, lr);

    Ok(Report {
        run_id: m.run_id.clone(),
        model: m.model.name.clone(),
        input_shape: m.model.input_shape.clone(),
        optimizer,
        classes: m.classes.clone(),
        settings: m.settings.clone(),
        epochs,
        steps,
        probe_accuracy,
        probe,
        layers: out_layers,
        images,
        k: options.k,
        dynamics,
    })
}

/// The probe's row of the `probes` table (of its first traced layer, by
/// name) and its probabilities; [`Error::UnknownProbe`] when no layer has it.
async fn read_probe(run: &Run, ctx: &SessionContext, probe: i64) -> Result<Probe> {
    // The probe's rows, one per traced layer that has it.
    let (_, rows) = reptrace_analyze::sql::run(
        ctx,
        &format!(
            "SELECT layer, instance_id, label, predicted, p_norm FROM probes \
             WHERE probe_id = {probe} ORDER BY layer"
        ),
    )
    .await?;
    if strings(&rows, "layer")?.is_empty() {
        return Err(unknown_probe(run, ctx, probe).await?);
    }
    let instance_ids = ints(&rows, "instance_id")?;
    let labels = ints(&rows, "label")?;
    let predicted = ints(&rows, "predicted")?;
    Ok(Probe {
        id: probe,
        instance_id: instance_ids[0],
        label: labels[0].unwrap_or(-1) as i32,
        predicted: predicted[0].unwrap_or(-1) as i32,
        probability: probabilities(run, probe)?,
    })
}

/// [`Error::UnknownProbe`] for `probe`, with the first probe ids recorded.
async fn unknown_probe(run: &Run, ctx: &SessionContext, probe: i64) -> Result<Error> {
    let (_, ids) = reptrace_analyze::sql::run(
        ctx,
        "SELECT DISTINCT probe_id FROM probes ORDER BY probe_id LIMIT 20",
    )
    .await?;
    let known: Vec<String> = ints(&ids, "probe_id")?
        .into_iter()
        .flatten()
        .map(|i| i.to_string())
        .collect();
    Ok(Error::UnknownProbe {
        probe,
        layer: run
            .manifest()
            .model
            .traced_layers()
            .map(|l| l.name())
            .collect::<Vec<_>>()
            .join(", "),
        known: if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
        },
    })
}

/// The layers to show: [`Options::layers`], else every layer of `summary`
/// (the `layer_summary` rows) in model order; an error for a layer that is
/// not traced or has no contributions of the probe.
fn layers_shown(run: &Run, options: &Options, summary: &[RecordBatch]) -> Result<Vec<String>> {
    let m = run.manifest();
    let attributed: Vec<String> = strings(summary, "layer")?.into_iter().flatten().collect();
    let layers: Vec<String> = if options.layers.is_empty() {
        // Model order, not alphabetical.
        m.model
            .traced_layers()
            .map(|l| l.name().to_owned())
            .filter(|n| attributed.contains(n))
            .collect()
    } else {
        for name in &options.layers {
            if m.model.traced_layer(name).is_none() {
                let known: Vec<&str> = m.model.traced_layers().map(|l| l.name()).collect();
                return Err(Error::UnknownLayer {
                    name: name.clone(),
                    known: known.join(", "),
                });
            }
        }
        options.layers.clone()
    };
    let missing: Vec<&String> = layers.iter().filter(|l| !attributed.contains(l)).collect();
    if layers.is_empty() || !missing.is_empty() {
        let which = if missing.is_empty() {
            "any traced layer".to_owned()
        } else {
            format!(
                "layer {}",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return Err(Error::Incomplete {
            run: run.dir().to_path_buf(),
            message: format!(
                "no contributions of probe {} for {which}: its probes table has no row for it",
                options.probe
            ),
        });
    }
    Ok(layers)
}

/// `(cosines, norms)` of one class's records.
type Sample = (Vec<f64>, Vec<f64>);

/// The probe's query results for every layer, as columns; [`Tables::layer`]
/// picks one layer's rows.
struct Tables {
    s_layer: Vec<Option<String>>,
    s_pnorm: Vec<Option<f64>>,
    s_records: Vec<Option<i64>>,
    s_mixed: Vec<Option<f64>>,
    s_resid: Vec<Option<f64>>,
    s_total: Vec<Option<f64>>,
    sh_layer: Vec<Option<String>>,
    sh_label: Vec<Option<i64>>,
    sh_share: Vec<Option<f64>>,
    e_layer: Vec<Option<String>>,
    e_epoch: Vec<Option<i64>>,
    e_label: Vec<Option<i64>>,
    e_share: Vec<Option<f64>>,
    pros: Vec<(String, Influence)>,
    opps: Vec<(String, Influence)>,
    /// layer -> label -> (cosines, norms)
    samples: HashMap<String, BTreeMap<i32, Sample>>,
}

impl Tables {
    /// Reads the columns of `summary` (the `layer_summary` rows), then runs
    /// `class_shares`, `class_shares_by_epoch`, `top_proponents`,
    /// `top_opponents` and the raw contributions query.
    async fn read(
        ctx: &SessionContext,
        options: &Options,
        summary: &[RecordBatch],
    ) -> Result<Self> {
        let probe_s = options.probe.to_string();
        let k_s = options.k.max(1).to_string();
        let p = [("probe", probe_s.as_str())];
        let pk = [("probe", probe_s.as_str()), ("k", k_s.as_str())];
        let (s_layer, s_pnorm, s_records) = (
            strings(summary, "layer")?,
            floats(summary, "p_norm")?,
            ints(summary, "records")?,
        );
        let (s_mixed, s_resid, s_total) = (
            floats(summary, "mixed_batches_share")?,
            floats(summary, "residual_share")?,
            floats(summary, "total_share")?,
        );
        let shares = Query::resolve("class_shares")?.run(ctx, &p).await?.1;
        let (sh_layer, sh_label, sh_share) = (
            strings(&shares, "layer")?,
            ints(&shares, "label")?,
            floats(&shares, "share")?,
        );
        let by_epoch = Query::resolve("class_shares_by_epoch")?
            .run(ctx, &p)
            .await?
            .1;
        let (e_layer, e_epoch, e_label, e_share) = (
            strings(&by_epoch, "layer")?,
            ints(&by_epoch, "epoch")?,
            ints(&by_epoch, "label")?,
            floats(&by_epoch, "share")?,
        );
        let pros = influences(&Query::resolve("top_proponents")?.run(ctx, &pk).await?.1)?;
        let opps = influences(&Query::resolve("top_opponents")?.run(ctx, &pk).await?.1)?;
        let samples = samples(ctx, options.probe).await?;
        Ok(Self {
            s_layer,
            s_pnorm,
            s_records,
            s_mixed,
            s_resid,
            s_total,
            sh_layer,
            sh_label,
            sh_share,
            e_layer,
            e_epoch,
            e_label,
            e_share,
            pros,
            opps,
            samples,
        })
    }

    /// Everything the report shows for layer `name`.
    fn layer(&self, name: &String) -> Result<Layer> {
        let nm: &str = name;
        let si = self
            .s_layer
            .iter()
            .position(|l| l.as_deref() == Some(nm))
            .ok_or_else(|| Error::Internal(format!("no summary for {name}")))?;
        let mut class_shares = BTreeMap::new();
        for i in 0..self.sh_layer.len() {
            if self.sh_layer[i].as_deref() == Some(nm)
                && let Some(l) = self.sh_label[i]
            {
                class_shares.insert(l as i32, self.sh_share[i].unwrap_or(0.0));
            }
        }
        let mut epoch_shares: BTreeMap<i32, BTreeMap<i32, f64>> = BTreeMap::new();
        for i in 0..self.e_layer.len() {
            if self.e_layer[i].as_deref() == Some(nm)
                && let (Some(e), Some(l)) = (self.e_epoch[i], self.e_label[i])
            {
                epoch_shares
                    .entry(e as i32)
                    .or_default()
                    .insert(l as i32, self.e_share[i].unwrap_or(0.0));
            }
        }
        let pick = |all: &[(String, Influence)]| -> Vec<Influence> {
            all.iter()
                .filter(|(l, _)| l == name)
                .map(|(_, i)| i.clone())
                .collect()
        };
        Ok(Layer {
            name: name.clone(),
            p_norm: self.s_pnorm[si].unwrap_or(0.0),
            records: self.s_records[si].unwrap_or(0),
            shares: class_shares,
            mixed_share: self.s_mixed[si].unwrap_or(0.0),
            residual_share: self.s_resid[si].unwrap_or(0.0),
            total_share: self.s_total[si].unwrap_or(0.0),
            epoch_shares,
            ridges: self.samples.get(nm).map(ridges).unwrap_or_default(),
            proponents: pick(&self.pros),
            opponents: pick(&self.opps),
        })
    }
}

/// The `(cosine, norm)` of the probe's attributed records (the residual row
/// not counted), by layer and label.
async fn samples(
    ctx: &SessionContext,
    probe: i64,
) -> Result<HashMap<String, BTreeMap<i32, Sample>>> {
    let (_, raw) = reptrace_analyze::sql::run(
        ctx,
        &format!(
            "SELECT layer, label, cosine, norm FROM contributions \
             WHERE probe_id = {probe} AND step IS NOT NULL"
        ),
    )
    .await?;
    let (r_layer, r_label, r_cos, r_norm) = (
        strings(&raw, "layer")?,
        ints(&raw, "label")?,
        floats(&raw, "cosine")?,
        floats(&raw, "norm")?,
    );
    let mut samples: HashMap<String, BTreeMap<i32, Sample>> = HashMap::new();
    for i in 0..r_layer.len() {
        let (Some(layer), Some(label), Some(c), Some(n)) =
            (r_layer[i].as_deref(), r_label[i], r_cos[i], r_norm[i])
        else {
            continue;
        };
        let s = samples
            .entry(layer.to_owned())
            .or_default()
            .entry(label as i32)
            .or_default();
        s.0.push(c);
        s.1.push(n);
    }
    Ok(samples)
}

/// One norm-weighted cosine density per label of `by_label`.
fn ridges(by_label: &BTreeMap<i32, Sample>) -> Vec<Ridge> {
    by_label
        .iter()
        .map(|(&label, (xs, ws))| {
            let k = kde::Kde::new(xs, ws, None);
            Ridge {
                label,
                curve: k.grid(GRID),
                bandwidth: k.bandwidth,
                weight: k.total_weight,
                records: xs.len(),
            }
        })
        .collect()
}

/// Pixels of the probe, the layers' proponents and opponents and the
/// mislabel candidates, when the run was trained on the bundled digits.
fn images(
    m: &reptrace_format::Manifest,
    probe: &Probe,
    layers: &[Layer],
    dynamics: Option<&Dynamics>,
) -> Result<Option<Images>> {
    // The probe's id is the row of the input it was taken from (training
    // instance or not), so the probe itself is drawn from it.
    let mut wanted: BTreeSet<i64> = BTreeSet::from([probe.id]);
    for l in layers {
        wanted.extend(l.proponents.iter().map(|i| i.instance_id));
        wanted.extend(l.opponents.iter().map(|i| i.instance_id));
    }
    if let Some(d) = dynamics {
        wanted.extend(d.candidates.iter().map(|c| c.instance_id));
    }
    digits::images(m, &wanted)
}

/// Share of the probes of the last traced layer that the final model
/// classifies correctly, and how many probes; `None` without probes.
fn probe_accuracy(run: &Run) -> Result<Option<(f64, usize)>> {
    Ok(match run.manifest().model.traced_layers().last() {
        Some(layer) => {
            let all = reptrace_analyze::probes::Probes::read(run, &layer)?;
            let right = (0..all.len())
                .filter(|&i| all.label[i] == all.predicted[i])
                .count();
            (!all.is_empty()).then(|| (right as f64 / all.len() as f64, all.len()))
        }
        None => None,
    })
}

/// Rows and distinct epochs of the `steps` table, and the range of its
/// `lr` (`None` without rows).
async fn step_counts(ctx: &SessionContext) -> Result<(i64, i64, Option<[f64; 2]>)> {
    let (_, st) = reptrace_analyze::sql::run(
        ctx,
        "SELECT COUNT(*) AS steps, COUNT(DISTINCT epoch) AS epochs, \
         MIN(lr) AS lr_min, MAX(lr) AS lr_max FROM steps",
    )
    .await?;
    let first_int =
        |c| -> Result<i64> { Ok(ints(&st, c)?.first().copied().flatten().unwrap_or(0)) };
    let first_float = |c| -> Result<Option<f64>> { Ok(floats(&st, c)?.first().copied().flatten()) };
    let lr = first_float("lr_min")?
        .zip(first_float("lr_max")?)
        .map(|(a, b)| [a, b]);
    Ok((first_int("steps")?, first_int("epochs")?, lr))
}

/// The smallest and largest learning rate the steps applied to any traced
/// layer (table `layer_steps`, [`reptrace_analyze::replay::summarize_steps`]);
/// `None` for a run without `layer_steps` rows.
fn lr_range(run: &Run) -> Result<Option<[f64; 2]>> {
    let summary = reptrace_analyze::replay::summarize_steps(run)?;
    Ok(summary
        .layers
        .iter()
        .map(|l| l.lr)
        .reduce(|a, b| [a[0].min(b[0]), a[1].max(b[1])]))
}

/// The data map ([`AMBIGUOUS`], [`EASY`]) and the top [`CANDIDATES`]
/// mislabel candidates, read by the canned queries; `None` when the run has
/// no `examples` rows.
async fn dynamics(ctx: &SessionContext) -> Result<Option<Dynamics>> {
    let (ambiguous, easy) = (AMBIGUOUS.to_string(), EASY.to_string());
    let map = Query::resolve("data_map")?
        .run(ctx, &[("ambiguous", &ambiguous), ("easy", &easy)])
        .await?
        .1;
    let (id, label, epochs, conf, var, corr, region) = (
        ints(&map, "instance_id")?,
        ints(&map, "label")?,
        ints(&map, "epochs")?,
        floats(&map, "confidence")?,
        floats(&map, "variability")?,
        floats(&map, "correctness")?,
        strings(&map, "region")?,
    );
    let points: Vec<MapPoint> = (0..id.len())
        .filter_map(|i| {
            Some(MapPoint {
                instance_id: id[i]?,
                label: label[i].unwrap_or(-1) as i32,
                epochs: epochs[i].unwrap_or(0),
                confidence: conf[i]?,
                variability: var[i]?,
                correctness: corr[i]?,
                region: region[i].clone()?,
            })
        })
        .collect();
    if points.is_empty() {
        return Ok(None);
    }
    let k = CANDIDATES.to_string();
    let top = Query::resolve("mislabel_candidates")?
        .run(ctx, &[("k", &k)])
        .await?
        .1;
    let (rank, id, label, predicted, score, conf, corr, p_label) = (
        ints(&top, "rank")?,
        ints(&top, "instance_id")?,
        ints(&top, "label")?,
        ints(&top, "predicted_at_end")?,
        floats(&top, "score")?,
        floats(&top, "confidence")?,
        floats(&top, "correctness")?,
        floats(&top, "p_label_at_end")?,
    );
    let candidates = (0..id.len())
        .filter_map(|i| {
            Some(Candidate {
                rank: rank[i]?,
                instance_id: id[i]?,
                label: label[i].unwrap_or(-1) as i32,
                predicted: predicted[i].unwrap_or(-1) as i32,
                score: score[i].unwrap_or(f64::NAN),
                confidence: conf[i].unwrap_or(f64::NAN),
                correctness: corr[i].unwrap_or(f64::NAN),
                p_label: p_label[i].unwrap_or(f64::NAN),
            })
        })
        .collect();
    Ok(Some(Dynamics {
        points,
        ambiguous: AMBIGUOUS,
        easy: EASY,
        candidates,
    }))
}

/// Softmax probabilities `(predicted, true class)` of a probe, when the
/// model's last weighted module is a traced Linear layer with one output per
/// class (dropout and activations after it are ignored at inference, except
/// that a final activation makes the outputs no logits: then `None`).
fn probabilities(run: &Run, probe: i64) -> Result<Option<(f64, f64)>> {
    use reptrace_format::{Module, TracedLayer};
    let m = run.manifest();
    let last = m
        .model
        .modules
        .iter()
        .rev()
        .find(|x| !matches!(x, Module::Dropout { .. } | Module::Flatten));
    let Some(Module::Linear(spec)) = last else {
        return Ok(None);
    };
    if !spec.traced || spec.out_features != m.classes.len() {
        return Ok(None);
    }
    let layer = TracedLayer::Linear(spec);
    let probes = reptrace_analyze::probes::Probes::read(run, &layer)?;
    let Some(i) = probes.probe_id.iter().position(|&id| id == probe) else {
        return Ok(None);
    };
    let Some(initial) = m.initial_weights() else {
        return Ok(None);
    };
    let w0 = reptrace_analyze::weights::Snapshot::read(&run.path(initial))?.layer(&layer)?;
    let (a, p) = (probes.a(i), probes.p(i));
    let n_in = spec.in_features;
    let logits: Vec<f64> = (0..spec.out_features)
        .map(|o| {
            let row = &w0.weight[o * n_in..(o + 1) * n_in];
            let z0: f64 = row.iter().zip(a).map(|(w, x)| w * x).sum();
            z0 + w0.bias.get(o).copied().unwrap_or(0.0) + p[o]
        })
        .collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logits.iter().map(|z| (z - max).exp()).collect();
    let total: f64 = exp.iter().sum();
    let at = |c: i32| {
        usize::try_from(c)
            .ok()
            .and_then(|c| exp.get(c))
            .map_or(f64::NAN, |e| e / total)
    };
    Ok(Some((at(probes.predicted[i]), at(probes.label[i]))))
}

/// `(layer, influence)` rows of a top-k query.
fn influences(batches: &[RecordBatch]) -> Result<Vec<(String, Influence)>> {
    let layer = strings(batches, "layer")?;
    let rank = ints(batches, "rank_in_layer")?;
    let id = ints(batches, "instance_id")?;
    let label = ints(batches, "label")?;
    let infl = floats(batches, "influence")?;
    let records = ints(batches, "records")?;
    Ok((0..layer.len())
        .filter_map(|i| {
            Some((
                layer[i].clone()?,
                Influence {
                    rank: rank[i]?,
                    instance_id: id[i]?,
                    label: label[i].unwrap_or(-1) as i32,
                    influence: infl[i].unwrap_or(0.0),
                    records: records[i].unwrap_or(0),
                },
            ))
        })
        .collect())
}

/// Column `name` of every batch, cast to `ty`.
fn column(
    batches: &[RecordBatch],
    name: &str,
    ty: &DataType,
) -> Result<Vec<arrow_array::ArrayRef>> {
    batches
        .iter()
        .map(|b| {
            let c = b.column_by_name(name).ok_or_else(|| {
                Error::Internal(format!("report query result has no column {name}"))
            })?;
            cast(c, ty).map_err(|e| Error::Internal(format!("report column {name}: {e}")))
        })
        .collect()
}

/// Column `name` of every batch, cast to the primitive type `T`.
fn primitives<T: ArrowPrimitiveType>(
    batches: &[RecordBatch],
    name: &str,
) -> Result<Vec<Option<T::Native>>> {
    let mut out = Vec::new();
    for a in column(batches, name, &T::DATA_TYPE)? {
        if let Some(a) = a.as_any().downcast_ref::<PrimitiveArray<T>>() {
            out.extend(a.iter());
        }
    }
    Ok(out)
}

fn ints(batches: &[RecordBatch], name: &str) -> Result<Vec<Option<i64>>> {
    primitives::<Int64Type>(batches, name)
}

fn floats(batches: &[RecordBatch], name: &str) -> Result<Vec<Option<f64>>> {
    primitives::<Float64Type>(batches, name)
}

fn strings(batches: &[RecordBatch], name: &str) -> Result<Vec<Option<String>>> {
    let mut out = Vec::new();
    for a in column(batches, name, &DataType::Utf8)? {
        if let Some(a) = a.as_any().downcast_ref::<StringArray>() {
            out.extend(a.iter().map(|s| s.map(str::to_owned)));
        }
    }
    Ok(out)
}
