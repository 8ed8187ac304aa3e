//! Contributions computed by the workers of another engine (Spark's
//! executors), from whatever batches of `updates` rows it hands them.
//!
//! The driver plans a [`Task`] once ([`Task::plan`]): for each chosen layer
//! the probes, the displacement scales of the steps, Adam's preconditioner
//! where the run has one, and `W_T − W_0`, all that the arithmetic needs
//! besides the records. The task travels as bytes ([`Task::to_bytes`], sent
//! to every worker once) and computes, on each worker, the contributions of
//! any batch of `updates` rows ([`Task::contributions`]) with the same code
//! as `reptrace attribute` (`attribution::pairs_of`). The residual rows
//! need the sum of every record's update: each worker adds up its batches
//! ([`Task::partial_sums`]) and the driver finishes them
//! ([`Task::residual`]).
//!
//! Materialised, the rows become an attribution of the run with the same
//! files and commit as `reptrace attribute`: workers write their parts
//! under temporary names ([`part_writer`], [`write_rows`]), the driver commits them
//! ([`commit`]) or, when the job failed, removes them ([`discard`]).
use crate::attribution::{self, Options, Plan, ProbeSelection, StepRange};
use crate::kernel::{self, Geometry, ProbeFeatures};
use crate::precondition::{self, Preconditioner};
use crate::probes::{Probes, instance_splits};
use crate::records::records_of;
use crate::replay::{Setup, scales_of};
use crate::run::Run;
use crate::weights::LayerWeights;
use crate::writer::PartWriter;
use crate::{Error, Result};
use arrow::compute::{cast, concat_batches, take_record_batch};
use arrow_array::cast::AsArray;
use arrow_array::{ArrayRef, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use reptrace_format::{
    Aggregation, Attribution, Dtype, FileEntry, Manifest, Step, Table, col, layout, schema,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The first bytes of a serialised [`Task`].
const MAGIC: &[u8; 8] = b"RPTASK01";

/// Everything a worker needs to compute contributions of chosen probes from
/// batches of `updates` rows.
pub struct Task {
    /// The run directory, as the driver saw it (named in messages).
    run_dir: PathBuf,
    /// The manifest's text (the model's layers, the mode).
    manifest_json: String,
    manifest: Manifest,
    /// The step the weights of the analysis include.
    as_of: i64,
    /// Only records of these steps (the residual covers every record).
    steps: Option<StepRange>,
    layers: Vec<LayerTask>,
}

/// One layer of a [`Task`].
struct LayerTask {
    name: String,
    probes: Probes,
    /// `σ_s` of each step `0..=as_of`.
    scales: Vec<f64>,
    preconditioner: Option<Preconditioner>,
    /// `W_T − W_0`.
    change: LayerWeights,
    /// The geometry of the stored records, and of the records the kernel
    /// meets (whole updates for a preconditioned run).
    stored: Geometry,
    geom: Geometry,
    features: ProbeFeatures,
}

/// The header of a serialised task; the float arrays follow it, in the
/// order [`Task::to_bytes`] writes them.
#[derive(Serialize, Deserialize)]
struct Header {
    run_dir: PathBuf,
    manifest: String,
    as_of: i64,
    steps: Option<(Option<i64>, Option<i64>)>,
    layers: Vec<LayerHeader>,
}

#[derive(Serialize, Deserialize)]
struct LayerHeader {
    name: String,
    probe_id: Vec<i64>,
    instance_id: Vec<Option<i64>>,
    label: Vec<i32>,
    predicted: Vec<i32>,
    a_off: Vec<usize>,
    p_off: Vec<usize>,
    /// Lengths of `a`, `p`, `scales`, weight and bias of the change.
    lens: [usize; 5],
    /// The preconditioner's update length and steps.
    preconditioner: Option<(usize, Vec<i64>)>,
}

/// The schema of the rows a task computes: `contributions` and `layer`.
pub fn contributions_schema() -> SchemaRef {
    with_layer(&schema(Table::Contributions, Dtype::F32))
}

fn with_layer(s: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Field> = s.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(col::LAYER, DataType::Utf8, false));
    Arc::new(Schema::new(fields))
}

impl Task {
    /// Plans the contributions of `probe_ids` to `layers` (every traced
    /// layer with probes when empty), over the records of `steps`; refuses
    /// a run whose recorder is alive and a probe id the run lacks.
    pub fn plan(
        run: &Run,
        probe_ids: &[i64],
        layers: &[String],
        steps: Option<StepRange>,
    ) -> Result<Self> {
        attribution::refuse_live_recording(run)?;
        if probe_ids.is_empty() {
            return Err(Error::BadOption {
                option: "probes",
                value: "[]".into(),
                why: "name at least one probe id".into(),
            });
        }
        let options = Options {
            probes: ProbeSelection::Ids(probe_ids.to_vec()),
            layers: layers.to_vec(),
            steps,
            ..Options::default()
        };
        let chosen = attribution::chosen_layers(run, &options)?;
        let setup = Setup::load(run)?;
        let splits = instance_splits(run)?;
        let m = run.manifest();
        let mut out = Vec::new();
        for layer in &chosen {
            let probes = attribution::select_probes(run, layer, &options, &splits)?;
            let history = setup.history(layer.name())?;
            out.push(LayerTask::new(
                layer.name().to_owned(),
                m,
                probes,
                history.scales.clone(),
                history.preconditioner.clone(),
                setup.weight_change(layer)?,
            )?);
        }
        Ok(Self {
            run_dir: run.dir().to_path_buf(),
            manifest_json: m.to_json(),
            manifest: m.clone(),
            as_of: setup.as_of,
            steps,
            layers: out,
        })
    }

    /// The layers planned, in forward order.
    pub fn layers(&self) -> Vec<&str> {
        self.layers.iter().map(|l| l.name.as_str()).collect()
    }

    /// The probe ids planned (those of the first layer: every layer has
    /// the same).
    pub fn probe_ids(&self) -> Vec<i64> {
        self.layers
            .first()
            .map(|l| l.probes.probe_id.clone())
            .unwrap_or_default()
    }

    /// The step the analysis stands at.
    pub fn as_of(&self) -> i64 {
        self.as_of
    }

    /// The run's committed `updates` files of `layer` (absolute paths).
    pub fn update_files(&self, layer: &str) -> Vec<PathBuf> {
        self.manifest
            .files(Table::Updates)
            .into_iter()
            .filter(|f| f.layer.as_deref() == Some(layer))
            .map(|f| self.run_dir.join(&f.path))
            .collect()
    }

    /// The task as bytes, for [`Task::from_bytes`] on a worker.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = Header {
            run_dir: self.run_dir.clone(),
            manifest: self.manifest_json.clone(),
            as_of: self.as_of,
            steps: self.steps.map(|r| (r.first, r.last)),
            layers: self
                .layers
                .iter()
                .map(|l| LayerHeader {
                    name: l.name.clone(),
                    probe_id: l.probes.probe_id.clone(),
                    instance_id: l.probes.instance_id.clone(),
                    label: l.probes.label.clone(),
                    predicted: l.probes.predicted.clone(),
                    a_off: l.probes.a_off.clone(),
                    p_off: l.probes.p_off.clone(),
                    lens: [
                        l.probes.a.len(),
                        l.probes.p.len(),
                        l.scales.len(),
                        l.change.weight.len(),
                        l.change.bias.len(),
                    ],
                    preconditioner: l.preconditioner.as_ref().map(|pre| {
                        let (len, steps, _) = pre.parts();
                        (len, steps.to_vec())
                    }),
                })
                .collect(),
        };
        let json = serde_json::to_vec(&header)
            .map_err(|e| Error::Internal(format!("task header: {e}")))?;
        let mut out = Vec::with_capacity(json.len() + 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        let mut put = |xs: &[f64]| {
            xs.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()))
        };
        for l in &self.layers {
            put(&l.probes.a);
            put(&l.probes.p);
            put(&l.probes.p_norm);
            put(&l.scales);
            put(&l.change.weight);
            put(&l.change.bias);
            if let Some(pre) = &l.preconditioner {
                put(pre.parts().2);
            }
        }
        Ok(out)
    }

    /// A task from [`Task::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |why: &str| Error::Internal(format!("not a reptrace task: {why}"));
        let rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| bad("it does not start with the task's magic bytes"))?;
        let (len, rest) = rest
            .split_first_chunk::<8>()
            .ok_or_else(|| bad("it ends in its header"))?;
        let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| bad("header length"))?;
        if rest.len() < len {
            return Err(bad("it ends in its header"));
        }
        let (json, mut floats) = rest.split_at(len);
        let header: Header = serde_json::from_slice(json).map_err(|e| bad(&e.to_string()))?;
        let mut take = |n: usize| -> Result<Vec<f64>> {
            if floats.len() < 8 * n {
                return Err(bad("it ends in its arrays"));
            }
            let (head, tail) = floats.split_at(8 * n);
            floats = tail;
            Ok(head
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect())
        };
        let manifest = Manifest::parse(&header.manifest, &header.run_dir)?;
        let mut layers = Vec::new();
        for h in header.layers {
            let [a_len, p_len, scales_len, w_len, b_len] = h.lens;
            let probes = Probes {
                a: take(a_len)?,
                p: take(p_len)?,
                p_norm: take(h.probe_id.len())?,
                probe_id: h.probe_id,
                instance_id: h.instance_id,
                label: h.label,
                predicted: h.predicted,
                a_off: h.a_off,
                p_off: h.p_off,
            };
            let scales = take(scales_len)?;
            let change = LayerWeights {
                weight: take(w_len)?,
                bias: take(b_len)?,
            };
            let preconditioner = match h.preconditioner {
                Some((len, steps)) => {
                    let g = take(len * steps.len())?;
                    Some(Preconditioner::from_parts(len, steps, g)?)
                }
                None => None,
            };
            layers.push(LayerTask::new(
                h.name,
                &manifest,
                probes,
                scales,
                preconditioner,
                change,
            )?);
        }
        if !floats.is_empty() {
            return Err(bad("bytes after its arrays"));
        }
        Ok(Self {
            run_dir: header.run_dir,
            manifest_json: header.manifest,
            manifest,
            as_of: header.as_of,
            steps: header.steps.map(|(first, last)| StepRange { first, last }),
            layers,
        })
    }

    /// The rows of `batch` (columns `step`, `epoch`, `instance_id`,
    /// `label`, `u`, `v` and `layer` of `updates`) by planned layer; rows
    /// of other layers are left out.
    fn by_layer(&self, batch: &RecordBatch) -> Result<Vec<(&LayerTask, RecordBatch)>> {
        let source = self.source();
        let layer = batch
            .column_by_name(col::LAYER)
            .ok_or_else(|| Error::Column {
                path: source.clone(),
                column: col::LAYER.into(),
                message: "missing (read updates with its Hive partition column)".into(),
            })?;
        let layer = cast(layer, &DataType::Utf8).map_err(|e| Error::Column {
            path: source.clone(),
            column: col::LAYER.into(),
            message: e.to_string(),
        })?;
        let layer = layer.as_string::<i32>();
        let mut rows: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for (i, name) in layer.iter().enumerate() {
            if let Some(k) = name.and_then(|n| self.layers.iter().position(|l| l.name == n)) {
                rows.entry(k).or_default().push(i as u32);
            }
        }
        rows.into_iter()
            .map(|(k, rows)| {
                let sub = if rows.len() == batch.num_rows() {
                    batch.clone()
                } else {
                    take_record_batch(batch, &UInt32Array::from(rows))
                        .map_err(|e| Error::Internal(format!("selecting rows: {e}")))?
                };
                Ok((&self.layers[k], sub))
            })
            .collect()
    }

    /// What errors name as the file of a batch's rows.
    fn source(&self) -> PathBuf {
        self.run_dir.join("updates")
    }

    /// The records of one layer's rows and their scales (whole updates for
    /// a preconditioned run).
    fn records(
        &self,
        layer: &LayerTask,
        rows: &RecordBatch,
    ) -> Result<(crate::records::Records, Vec<f64>)> {
        let traced = self
            .manifest
            .model
            .traced_layer(&layer.name)
            .ok_or_else(|| Error::Internal(format!("layer {} left the model", layer.name)))?;
        let recs = records_of(
            &self.source().join(format!("layer={}", layer.name)),
            rows,
            0,
            traced.record_shape(self.manifest.mode),
        )?;
        match &layer.preconditioner {
            Some(pre) => pre.apply(&layer.stored, &recs, self.as_of),
            None => {
                let scales = scales_of(&layer.scales, &recs)?;
                Ok((recs, scales))
            }
        }
    }

    /// The contribution rows of the records of `batch` (every planned
    /// probe with every record of its layer in the step range).
    pub fn contributions(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let out_schema = schema(Table::Contributions, Dtype::F32);
        let plan = Plan {
            steps: self.steps,
            instances: None,
            require_instance: false,
            self_only: false,
            residual: false,
            memory_budget: 0,
            batch_rows: None,
        };
        let mut parts = Vec::new();
        for (layer, rows) in self.by_layer(batch)? {
            let (recs, scales) = self.records(layer, &rows)?;
            let made = attribution::pairs_of(
                &plan,
                self.as_of,
                &layer.geom,
                &layer.features,
                &layer.probes,
                &recs,
                &scales,
                &out_schema,
            )?;
            if let Some(b) = made {
                parts.push(add_layer(&b, &layer.name)?);
            }
        }
        let schema = contributions_schema();
        concat_batches(&schema, &parts).map_err(|e| Error::Internal(format!("rows: {e}")))
    }

    /// Per planned layer, the sum of the scaled updates of the records of
    /// `batch` (every step: the residual covers them all), to be added up
    /// over all batches for [`Task::residual`].
    pub fn partial_sums(&self, batch: &RecordBatch) -> Result<Vec<(String, Vec<f64>)>> {
        let mut out = Vec::new();
        for (layer, rows) in self.by_layer(batch)? {
            let (recs, scales) = self.records(layer, &rows)?;
            let mut sum = vec![0.0; layer.geom.delta_len()];
            kernel::accumulate(&layer.geom, &recs, &scales, &mut sum)?;
            out.push((layer.name.clone(), sum));
        }
        Ok(out)
    }

    /// The residual rows of `layer` (one per probe: step, epoch, instance
    /// and label NULL) from the partial sums of every record of the layer.
    pub fn residual(&self, layer: &str, sums: &[&[f64]]) -> Result<RecordBatch> {
        let l = self
            .layers
            .iter()
            .find(|l| l.name == layer)
            .ok_or_else(|| Error::UnknownLayer {
                name: layer.to_owned(),
                known: self.layers().join(", "),
            })?;
        let mut total = vec![0.0; l.geom.delta_len()];
        for s in sums {
            if s.len() != total.len() {
                return Err(Error::Internal(format!(
                    "a partial sum of layer {layer} has {} values, expected {}",
                    s.len(),
                    total.len()
                )));
            }
            total.iter_mut().zip(*s).for_each(|(t, x)| *t += x);
        }
        let residual = l.change.minus(&kernel::split_delta(&l.geom, &total));
        let rows = attribution::residual_rows(&l.geom, &residual, &l.probes)?;
        add_layer(&rows, layer)
    }
}

impl LayerTask {
    fn new(
        name: String,
        m: &Manifest,
        probes: Probes,
        scales: Vec<f64>,
        preconditioner: Option<Preconditioner>,
        change: LayerWeights,
    ) -> Result<Self> {
        let traced = m
            .model
            .traced_layer(&name)
            .ok_or_else(|| Error::UnknownLayer {
                name: name.clone(),
                known: m
                    .model
                    .traced_layers()
                    .map(|l| l.name().to_owned())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let stored = Geometry::of(&traced, m.mode)?;
        let geom = precondition::geometry(&traced, m)?;
        let features = ProbeFeatures::new(&geom, &probes)?;
        Ok(Self {
            name,
            probes,
            scales,
            preconditioner,
            change,
            stored,
            geom,
            features,
        })
    }
}

/// `batch` with a `layer` column of `name` last.
fn add_layer(batch: &RecordBatch, name: &str) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(StringArray::from(vec![name; batch.num_rows()])));
    RecordBatch::try_new(with_layer(&batch.schema()), columns)
        .map_err(|e| Error::Internal(format!("adding the layer column: {e}")))
}

/// The first part number an attribution of `run` may use: workers number
/// their parts from it on (each its own number).
pub fn first_part_seq(run: &Run) -> u64 {
    attribution::next_part_seq(run)
}

/// The table an attribution aggregated `by` writes, and its float columns.
fn table_of(by: Aggregation) -> (Table, &'static [&'static str]) {
    match by {
        Aggregation::Step => (Table::Contributions, &[col::DOT, col::NORM, col::COSINE]),
        _ => (Table::Influence, &[col::DOT]),
    }
}

/// Starts part `seq` of `layer` of an attribution (aggregated `by`) of the
/// run at `run_dir`, under its temporary name: the driver commits it.
pub fn part_writer(
    run_dir: &Path,
    run_id: &str,
    by: Aggregation,
    layer: &str,
    seq: u64,
) -> Result<PartWriter> {
    layout::check_layer_name(layer)?;
    let (table, floats) = table_of(by);
    PartWriter::create(
        run_dir,
        layout::part_path(table, Some(layer), seq),
        table,
        Some(layer),
        run_id,
        schema(table, Dtype::F32),
        floats,
    )
}

/// Writes the rows of `batch` (of `contributions`, or of `influence` for an
/// aggregation, in any column order and integer width; other columns such
/// as `layer` are left out) to `part`.
pub fn write_rows(
    part: &mut PartWriter,
    run_dir: &Path,
    by: Aggregation,
    batch: &RecordBatch,
) -> Result<()> {
    let (table, _) = table_of(by);
    let out = schema(table, Dtype::F32);
    let bad = |column: &str, message: String| Error::Column {
        path: run_dir.join(table.name()),
        column: column.to_owned(),
        message,
    };
    let columns = out
        .fields()
        .iter()
        .map(|f| {
            let c = batch
                .column_by_name(f.name())
                .ok_or_else(|| bad(f.name(), "missing from the rows to write".into()))?;
            cast(c, f.data_type()).map_err(|e| bad(f.name(), e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let batch =
        RecordBatch::try_new(Arc::clone(&out), columns).map_err(|e| bad("", e.to_string()))?;
    part.write(&batch)
}

/// Removes the uncommitted parts numbered `first..=last` of `layers` of an
/// attribution aggregated `by` (a job that failed).
pub fn discard_seqs(run: &Run, by: Aggregation, layers: &[String], first: u64, last: u64) {
    let (table, _) = table_of(by);
    for layer in layers {
        if layout::check_layer_name(layer).is_err() {
            continue;
        }
        for seq in first..=last {
            let path = run.path(&layout::part_path(table, Some(layer), seq));
            let _ = std::fs::remove_file(layout::temp_path(&path));
        }
    }
}

/// Commits the parts `written` of `task`'s rows (aggregated `by`) as an
/// attribution of `run`, as `reptrace attribute` does (an earlier
/// attribution it covers is replaced); how many it replaced. On failure the
/// parts are removed and the run is as it was.
pub fn commit(run: &Run, task: &Task, by: Aggregation, written: &[FileEntry]) -> Result<usize> {
    if let Err(e) = attribution::refuse_live_recording(run) {
        discard(run, written);
        return Err(e);
    }
    let ids = task.probe_ids();
    let attribution = Attribution {
        files: written.to_vec(),
        probes: ProbeSelection::Ids(ids.clone()).to_string(),
        probe_ids: Attribution::ranges(&ids),
        layers: task.layers().iter().map(|l| (*l).to_owned()).collect(),
        steps: task.steps.map(|r| {
            [
                r.first.unwrap_or(0).max(0),
                r.last.unwrap_or(task.as_of).min(task.as_of),
            ]
        }),
        self_only: false,
        by,
        as_of_step: Some(Step(task.as_of)),
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    attribution::commit(run, &attribution, written)
}

/// Removes parts that were written and never committed.
pub fn discard(run: &Run, written: &[FileEntry]) {
    attribution::discard(run, written);
}
