//! Probes added to a run after training, at any time.
//!
//! A [`ProbeAppender`] opens a completed run — or one whose training process
//! died (status still `recording`, but nobody holds the run's lock) — takes
//! the run's lock, writes new `probes` rows (one part per layer) and commits
//! them as one new manifest commit: the rows are written and fsynced under
//! temporary names, the manifest that lists them replaces the old one
//! atomically, and only then do the parts take their final names. Nothing
//! already in the run is touched; a failure or a dropped appender leaves the
//! run as it was.
//!
//! The new probes must be taken against the weights the run's analysis
//! stands on ([`ProbeAppender::weights`]): the final weights of a completed
//! run, the last checkpoint's of a killed one
//! ([`Manifest::analysis_probes`], which adds the new rows to that
//! checkpoint's probes).
use crate::batch::ProbeBatch;
use crate::part::{ParquetOptions, PartWriter, properties};
use crate::writer::now;
use crate::{Error, Result, columns, durable};
use arrow_array::{Array, Int64Array};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use reptrace_format::{
    Commit, FileEntry, Lens, Manifest, Status, Step, Table, col, layout, schema,
};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// Takes the run's lock ([`layout::lock`]) without waiting, or says that
/// another process holds it; `then` says what to do once training is over
/// ("add to it").
pub(crate) fn lock_run(run: &Path, then: &str) -> Result<File> {
    let path = run.join(layout::LOCK);
    match layout::lock(run, false) {
        Ok(Some(file)) => Ok(file),
        Ok(None) => {
            let recording = Manifest::load(run).is_ok_and(|m| m.status == Status::Recording);
            let message = if recording {
                format!(
                    "the run is still being recorded: its recorder, a live process, holds \
                     .lock; {then} once training has finished (queries read its committed \
                     steps meanwhile)"
                )
            } else {
                "another process is writing to this run (it holds .lock); try again when it \
                 is done"
                    .to_owned()
            };
            Err(Error::Invalid {
                context: run.display().to_string(),
                message,
            })
        }
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Adds probes to a completed (or killed) run; see the module docs.
///
/// Every traced layer must get rows for the same probe ids (in any order of
/// calls); the ids must be new to the run. [`ProbeAppender::commit`] makes
/// them durable and visible; dropping the appender without it discards them.
pub struct ProbeAppender {
    run: PathBuf,
    manifest: Manifest,
    /// The weights snapshot new probes are taken against, and its step.
    weights: (String, Step),
    /// Traced layer name → its probes' shape.
    layers: BTreeMap<String, Lens>,
    parts: BTreeMap<String, PartWriter>,
    /// Probe ids written per layer in this append.
    ids: BTreeMap<String, Vec<i64>>,
    taken: HashSet<i64>,
    next_id: i64,
    options: ParquetOptions,
    /// Holds the run's lock (released when the file is closed, also when
    /// the process dies).
    _lock: File,
}

impl std::fmt::Debug for ProbeAppender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeAppender")
            .field("run", &self.run)
            .field("layers", &self.layers)
            .field("next_id", &self.next_id)
            .finish_non_exhaustive()
    }
}

impl ProbeAppender {
    /// Opens run `run` for adding probes: a completed run, or one still
    /// marked `recording` whose writer is gone (its lock is free: the
    /// training process was killed). Fails if another process holds the
    /// run's lock (a live recorder, another appender), if the run was
    /// aborted, or if it has no weights snapshot after a training step.
    pub fn open(run: impl AsRef<Path>) -> Result<Self> {
        let run = run.as_ref().to_path_buf();
        // Opened first for its clear message about a path that is not a run;
        // read again under the lock, which another appender may have held.
        Manifest::open(&run)?;
        let lock = lock_run(&run, "add to it")?;
        // Under the lock: a `recording` run has no live writer (a recorder
        // holds the lock for its whole life), so its manifest is final.
        let manifest = Manifest::load(&run)?;
        let context = || run.display().to_string();
        if manifest.status == Status::Aborted {
            return Err(Error::Invalid {
                context: context(),
                message: format!(
                    "probes are added to a completed run; this run is {}",
                    manifest.status
                ),
            });
        }
        let weights = match manifest.analysis_probes() {
            Some(a) => Some((a.weights, a.step)),
            None => manifest.latest_weights(),
        };
        let Some((weights, Some(step))) = weights else {
            return Err(Error::Invalid {
                context: context(),
                message: "the run has no weights after a training step; probes need trained \
                          weights"
                    .to_owned(),
            });
        };
        let weights = (weights.to_owned(), step);
        let layers = manifest
            .model
            .traced_layers()
            .map(|l| (l.name().to_owned(), l.probe_shape()))
            .collect();
        let mut appender = Self {
            run,
            manifest,
            weights,
            layers,
            parts: BTreeMap::new(),
            ids: BTreeMap::new(),
            taken: HashSet::new(),
            next_id: 0,
            options: ParquetOptions::default(),
            _lock: lock,
        };
        let (taken, max_id) = appender.existing_ids()?;
        appender.taken = taken;
        appender.next_id = max_id.map_or(0, |m| m + 1);
        Ok(appender)
    }

    /// The manifest of the run as opened.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The weights snapshot (relative path) that new probes must be taken
    /// against — `a` from a forward pass with these weights, and
    /// `p = (W − W_0) ⊛ a + (b − b_0)` — and the last step it includes: the
    /// weights the run's analysis stands on
    /// ([`Manifest::analysis_probes`]; the final weights of a completed run,
    /// the last checkpoint's of a killed one), or the latest snapshot of a
    /// run without probes.
    pub fn weights(&self) -> (&str, Step) {
        (&self.weights.0, self.weights.1)
    }

    /// The smallest id above every probe id and instance id of the run (and
    /// of the probes added so far): where new probe ids can start.
    pub fn next_probe_id(&self) -> i64 {
        let added = self.ids.values().flatten().max().map_or(0, |m| m + 1);
        self.next_id.max(added)
    }

    /// Adds probe rows for traced layer `layer`, as
    /// [`crate::Recorder::probes`] takes them.
    pub fn probes(&mut self, layer: &str, batch: ProbeBatch<'_>) -> Result<()> {
        let Some(&shape) = self.layers.get(layer) else {
            return Err(Error::UnknownLayer {
                layer: layer.to_owned(),
                traced: self.layers.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        };
        let rows = batch.checked_rows(layer, shape, self.manifest.classes.len())?;
        let context = format!("probes for layer {layer:?}");
        let seen = self.ids.entry(layer.to_owned()).or_default();
        let mut here: HashSet<i64> = seen.iter().copied().collect();
        for &id in batch.probe_ids {
            if self.taken.contains(&id) {
                return Err(Error::Invalid {
                    context,
                    message: format!(
                        "probe id {id} is already a probe id of the run; new ids start at {}",
                        self.next_id
                    ),
                });
            }
            if !here.insert(id) {
                return Err(Error::Invalid {
                    context,
                    message: format!("probe id {id} is given twice"),
                });
            }
        }
        if rows.probe_ids.is_empty() {
            return Ok(());
        }
        seen.extend_from_slice(batch.probe_ids);
        let record_batch = columns::probes(rows)?;
        if !self.parts.contains_key(layer) {
            let seq = self.manifest.commits.len() as u64;
            let props = properties(
                &self.options,
                &self.manifest.run_id,
                Table::Probes,
                Some(layer),
                self.manifest.dtype,
            )?;
            let part = PartWriter::create_at(
                &self.run,
                layout::part_path(Table::Probes, Some(layer), seq),
                Table::Probes,
                Some(layer),
                schema(Table::Probes, self.manifest.dtype),
                props,
                &self.options,
            )?;
            self.parts.insert(layer.to_owned(), part);
        }
        match self.parts.get_mut(layer) {
            Some(part) => part.write(&record_batch),
            None => Err(Error::WriterGone),
        }
    }

    /// Commits the added probes: one new manifest commit listing them.
    /// Returns the new manifest. Committing nothing is an error.
    pub fn commit(mut self) -> Result<Manifest> {
        let traced: Vec<&String> = self.layers.keys().collect();
        let reference = self.ids.values().next().cloned().unwrap_or_default();
        if reference.is_empty() {
            return Err(Error::Invalid {
                context: self.run.display().to_string(),
                message: "no probes were added".to_owned(),
            });
        }
        let want: BTreeSet<i64> = reference.iter().copied().collect();
        for layer in &traced {
            let got: BTreeSet<i64> = self
                .ids
                .get(*layer)
                .map(|v| v.iter().copied().collect())
                .unwrap_or_default();
            if got != want {
                return Err(Error::Invalid {
                    context: format!("probes for layer {layer:?}"),
                    message: format!(
                        "{} probe ids given, other layers have {}: every traced layer needs \
                         rows for the same probes",
                        got.len(),
                        want.len()
                    ),
                });
            }
        }
        let mut files = Vec::new();
        let mut staged = Vec::new();
        let mut dirs = BTreeSet::new();
        let mut failure = None;
        let mut parts = std::mem::take(&mut self.parts).into_iter();
        for (_, part) in parts.by_ref() {
            match part.finish() {
                Ok((entry, temp)) => {
                    if let Some(d) = temp.parent() {
                        dirs.insert(d.to_path_buf());
                    }
                    staged.push(temp);
                    files.push(entry);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            for d in &dirs {
                if let Err(e) = durable::sync_dir(d) {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            for (_, part) in parts {
                part.discard();
            }
            for path in staged {
                let _ = fs::remove_file(path);
            }
            return Err(e);
        }
        let last = self.manifest.commits.last();
        let commit = Commit {
            seq: self.manifest.commits.len() as u64,
            step: last.and_then(|c| c.step),
            epoch: last.and_then(|c| c.epoch),
            files,
            weights: None,
            probes: Vec::new(),
            time: now(),
        };
        self.manifest.commits.push(commit);
        if let Err(e) = durable::write_atomic(
            &layout::manifest_path(&self.run),
            self.manifest.to_json().as_bytes(),
        ) {
            for path in staged {
                let _ = fs::remove_file(path);
            }
            return Err(e);
        }
        if let Some(commit) = self.manifest.commits.last() {
            for f in &commit.files {
                layout::publish(&self.run, &f.path)
                    .map_err(|e| Error::io(self.run.join(&f.path), e))?;
            }
        }
        for d in &dirs {
            durable::sync_dir(d)?;
        }
        Ok(self.manifest.clone())
    }

    /// Probe ids of the run (from the first traced layer's probe files, which
    /// every layer shares: the `probes` table and the checkpoint probes an
    /// analysis uses) and the largest of them and of the instance ids.
    fn existing_ids(&self) -> Result<(HashSet<i64>, Option<i64>)> {
        let mut taken = HashSet::new();
        let mut max: Option<i64> = None;
        let first = self.layers.keys().next().cloned();
        let mut files: Vec<&FileEntry> = self.manifest.files(Table::Probes);
        files.extend(
            self.manifest
                .analysis_probes()
                .map(|a| a.files)
                .unwrap_or_default(),
        );
        let mut seen = HashSet::new();
        for f in files {
            if f.layer != first || !seen.insert(f.path.as_str()) {
                continue;
            }
            for id in read_ids(&self.run.join(&f.path), col::PROBE_ID)? {
                taken.insert(id);
                max = max.max(Some(id));
            }
        }
        for f in self.manifest.files(Table::Instances) {
            for id in read_ids(&self.run.join(&f.path), col::INSTANCE_ID)? {
                max = max.max(Some(id));
            }
        }
        Ok((taken, max))
    }
}

impl Drop for ProbeAppender {
    fn drop(&mut self) {
        for (_, part) in std::mem::take(&mut self.parts) {
            part.discard();
        }
    }
}

/// The non-null values of Int64 column `column` of a Parquet file.
fn read_ids(path: &Path, column: &str) -> Result<Vec<i64>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(path, e))?;
    let index = builder
        .parquet_schema()
        .columns()
        .iter()
        .position(|c| c.name() == column)
        .ok_or_else(|| Error::Invalid {
            context: path.display().to_string(),
            message: format!("no column {column}"),
        })?;
    let mask = ProjectionMask::leaves(builder.parquet_schema(), [index]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| Error::parquet(path, e))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| Error::Arrow {
            table: path.display().to_string(),
            source: e,
        })?;
        let ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| Error::Invalid {
                context: path.display().to_string(),
                message: format!("column {column} is not Int64"),
            })?;
        out.extend(ids.iter().flatten());
    }
    Ok(out)
}
