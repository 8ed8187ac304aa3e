//! The background writer thread: turns queued rows into part files and
//! commit points into manifest commits.
//!
//! Messages are handled strictly in the order they were sent. Rows are
//! buffered in one open part file per (table, layer) until the next commit
//! point; a commit finishes and renames those parts, writes the weights
//! snapshot, and then replaces the manifest. If anything fails, the thread
//! removes its uncommitted files, marks the run aborted (committed data is
//! kept as it was) and stops; the caller sees the error on its next call.
//!
//! In a distributed run ([`Role`]) the writer of rank 0 (the owner) works as
//! above and also lists in its next commit the part files the other ranks
//! staged ([`Msg::Adopt`]); the writer of another rank (a worker) writes
//! part files under rank-suffixed names and, at each commit point, makes
//! them durable under their temporary names and hands back their manifest
//! entries ([`Msg::Stage`]) instead of committing: it never writes the
//! manifest. Rank 0's commit renames every listed file, its own and the
//! workers', once the manifest that lists them is durable.
use crate::batch::{
    BatchRows, ExampleRowsOwned, InstanceRows, LayerStepRow, OwnedTensor, ProbeRows, StepRow,
    StepRowsOwned, UpdateRows,
};
use crate::part::{ParquetOptions, PartWriter, properties};
use crate::{Error, Result, columns, durable, weights};
use arrow_array::RecordBatch;
use reptrace_format::{
    Commit, Dtype, FORMAT_VERSION, FileEntry, Manifest, Status, Step, Table, layout, schema,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Steps rows are buffered and written in chunks of this many rows.
const STEP_CHUNK: usize = 4096;
/// Preconditioner values (Adam, 4 bytes each) held before `layer_steps`
/// rows are written out: a part file per 64 MiB of them.
const PRECONDITIONER_CHUNK: usize = 1 << 24;

/// Examples rows are buffered and written in chunks of this many rows.
const EXAMPLE_CHUNK: usize = 65536;

/// Reason written into the manifest when a recorder is dropped unfinished.
pub(crate) const DROPPED_REASON: &str = "recorder dropped without finish()";

/// A weights snapshot to write at a commit: relative path and tensors.
pub(crate) type Snapshot = (String, Vec<OwnedTensor>);

/// What the caller sends to the writer thread.
pub(crate) enum Msg {
    Instances(InstanceRows),
    Step(StepRow),
    LayerSteps(Vec<LayerStepRow>),
    Examples(ExampleRowsOwned),
    Updates {
        layer: usize,
        rows: UpdateRows,
    },
    Batch(BatchRows),
    Probes {
        layer: usize,
        rows: ProbeRows,
        /// Checkpoint probes (as of the next commit's weights), not the
        /// final `probes` table.
        checkpoint: bool,
    },
    Commit {
        step: Option<(i64, i32)>,
        weights: Option<Snapshot>,
    },
    Flush(SyncSender<()>),
    /// Owner: list these files, staged by other ranks, in the next commit.
    Adopt(Vec<FileEntry>),
    /// Worker: make the part files so far durable under their temporary
    /// names and reply with their manifest entries.
    Stage(SyncSender<Vec<FileEntry>>),
    /// End without a commit: remove what is not committed (or staged); the
    /// owner marks the run aborted with `reason`.
    Abandon {
        reason: String,
        reply: SyncSender<()>,
    },
    /// Last message of `finish()`/`abort()`: commit what is pending (always
    /// for `Complete`, when anything is pending for `Aborted`), set the
    /// status and reply with the final manifest.
    Close {
        status: Status,
        reason: Option<String>,
        step: Option<(i64, i32)>,
        weights: Option<Snapshot>,
        reply: SyncSender<Option<Manifest>>,
    },
    /// The recorder was dropped: discard what is not committed.
    Drop,
}

impl Msg {
    /// The bytes of factor values a message carries, which the recorder's
    /// queue bounds (`RecorderBuilder::queue_bytes`); other messages are
    /// small and only counted by the queue's depth.
    pub(crate) fn queued_bytes(&self) -> usize {
        match self {
            Msg::Updates { rows, .. } => rows.u.bytes() + rows.v.bytes(),
            Msg::Probes { rows, .. } => 4 * (rows.a.len() + rows.p.len()),
            _ => 0,
        }
    }
}

/// State shared between the caller and the writer thread.
#[derive(Default)]
pub(crate) struct Shared {
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
    /// Bytes of factor rows queued for the writer thread
    /// ([`Shared::reserve`], [`Shared::release`]).
    queued: Mutex<usize>,
    drained: Condvar,
    /// Set when the writer thread has ended (for whatever reason).
    gone: AtomicBool,
}

impl Shared {
    /// Waits until `bytes` more fit under `limit` bytes queued (or nothing
    /// is queued, so one message larger than the limit goes alone), then
    /// counts them; returns at once when the writer thread has failed or
    /// ended (the send that follows reports it).
    pub(crate) fn reserve(&self, bytes: usize, limit: usize) {
        if bytes == 0 {
            return;
        }
        let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        while *queued > 0
            && queued.saturating_add(bytes) > limit
            && !self.failed()
            && !self.gone.load(Ordering::Acquire)
        {
            queued = self
                .drained
                .wait_timeout(queued, Duration::from_millis(100))
                .map(|(q, _)| q)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        *queued = queued.saturating_add(bytes);
    }

    /// The writer thread is done with a message of `bytes` bytes.
    fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        *queued = queued.saturating_sub(bytes);
        self.drained.notify_all();
    }

    fn end(&self) {
        self.gone.store(true, Ordering::Release);
        self.drained.notify_all();
    }

    /// Whether the writer thread has failed.
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Takes the writer's error (once).
    pub(crate) fn take_error(&self) -> Option<Error> {
        match self.error.lock() {
            Ok(mut e) => e.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }

    fn set_error(&self, e: Error) {
        match self.error.lock() {
            Ok(mut slot) => *slot = Some(e),
            Err(poisoned) => *poisoned.into_inner() = Some(e),
        }
        self.failed.store(true, Ordering::Release);
    }
}

/// Which process of a run a writer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Writes the manifest: the one process of a run, or rank 0 of a
    /// distributed one (`rank` `Some(0)`).
    Owner { rank: Option<u32> },
    /// Rank `rank` > 0 of a distributed run: part files only, staged for
    /// the owner's commit.
    Worker { rank: u32 },
}

impl Role {
    /// The `updates.rank` value of the writer's records.
    pub(crate) fn column(self) -> Option<i32> {
        let rank = match self {
            Role::Owner { rank } => rank?,
            Role::Worker { rank } => rank,
        };
        Some(i32::try_from(rank).unwrap_or(i32::MAX))
    }

    pub(crate) fn worker(self) -> Option<u32> {
        match self {
            Role::Worker { rank } => Some(rank),
            Role::Owner { .. } => None,
        }
    }
}

/// Key of an open part: table, traced-layer index and whether it holds
/// checkpoint probes.
type PartKey = (Table, Option<usize>, bool);

/// Checkpoint probes of this many of the latest commits are kept; older ones
/// are dropped (a reader that loaded an older manifest still finds its files
/// for the span of a commit).
const KEEP_CHECKPOINT_PROBES: usize = 2;

pub(crate) struct Writer {
    run: PathBuf,
    manifest: Manifest,
    options: ParquetOptions,
    dtype: Dtype,
    layers: Vec<String>,
    parts: BTreeMap<PartKey, PartWriter>,
    steps: StepRowsOwned,
    layer_steps: Vec<LayerStepRow>,
    examples: ExampleRowsOwned,
    shared: Arc<Shared>,
    role: Role,
    /// Owner: files staged by other ranks for the next commit.
    adopted: Vec<FileEntry>,
    /// Worker: the number in the names of its next parts (1, 2, …: commit 0
    /// of a run is the owner's, with the instances and initial weights).
    stage_seq: u64,
}

/// Whether the loop goes on after a message.
enum Flow {
    Continue,
    Stop,
}

impl Writer {
    pub(crate) fn new(
        run: PathBuf,
        manifest: Manifest,
        options: ParquetOptions,
        layers: Vec<String>,
        shared: Arc<Shared>,
        role: Role,
    ) -> Self {
        let dtype = manifest.dtype;
        Self {
            run,
            manifest,
            options,
            dtype,
            layers,
            parts: BTreeMap::new(),
            steps: StepRowsOwned::default(),
            layer_steps: Vec::new(),
            examples: ExampleRowsOwned::default(),
            shared,
            role,
            adopted: Vec::new(),
            stage_seq: 1,
        }
    }

    /// The thread's main loop.
    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        /// Marks the writer thread ended however it ends (a panic included),
        /// so that no caller waits for queue space that never comes.
        struct Ended(Arc<Shared>);
        impl Drop for Ended {
            fn drop(&mut self) {
                self.0.end();
            }
        }
        let _ended = Ended(Arc::clone(&self.shared));
        loop {
            // A closed channel without Close/Drop means the Recorder vanished
            // without running its destructor: treat it like a drop.
            let msg = rx.recv().unwrap_or(Msg::Drop);
            let bytes = msg.queued_bytes();
            let mut reply = None;
            let result = match msg {
                Msg::Close {
                    status,
                    reason,
                    step,
                    weights,
                    reply: r,
                } => {
                    reply = Some(r);
                    self.close(status, reason, step, weights)
                        .map(|()| Flow::Stop)
                }
                other => self.handle(other),
            };
            self.shared.release(bytes);
            match result {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => {
                    if let Some(r) = reply {
                        let _ = r.send(Some(self.manifest.clone()));
                    }
                    return;
                }
                Err(e) => {
                    self.fail(e);
                    if let Some(r) = reply {
                        let _ = r.send(None);
                    }
                    return;
                }
            }
        }
    }

    fn handle(&mut self, msg: Msg) -> Result<Flow> {
        match msg {
            Msg::Instances(rows) => {
                let batch = columns::instances(rows)?;
                self.write(Table::Instances, None, &batch)?;
            }
            Msg::Batch(rows) => {
                if !rows.ids.is_empty() {
                    let batch = columns::batches(rows)?;
                    self.write(Table::Batches, None, &batch)?;
                }
            }
            Msg::Step(row) => {
                self.steps.push(&row);
                if self.steps.len() >= STEP_CHUNK {
                    self.flush_steps()?;
                }
            }
            Msg::LayerSteps(rows) => {
                self.layer_steps.extend(rows);
                let held: usize = self
                    .layer_steps
                    .iter()
                    .filter_map(|r| r.adam.as_ref())
                    .map(|a| a.preconditioner.len())
                    .sum();
                if self.layer_steps.len() >= STEP_CHUNK || held >= PRECONDITIONER_CHUNK {
                    self.flush_layer_steps()?;
                }
            }
            Msg::Examples(rows) => {
                if self.examples.len() == 0 {
                    self.examples = rows;
                } else {
                    let e = &mut self.examples;
                    e.step.extend(rows.step);
                    e.epoch.extend(rows.epoch);
                    e.ids.extend(rows.ids);
                    e.labels.extend(rows.labels);
                    e.loss.extend(rows.loss);
                    e.predicted.extend(rows.predicted);
                }
                if self.examples.len() >= EXAMPLE_CHUNK {
                    self.flush_examples()?;
                }
            }
            Msg::Updates { layer, rows } => {
                if !rows.ids.is_empty() {
                    let batch = columns::updates(rows, self.dtype, self.role.column())?;
                    self.write(Table::Updates, Some(layer), &batch)?;
                }
            }
            Msg::Probes {
                layer,
                rows,
                checkpoint,
            } => {
                if !rows.probe_ids.is_empty() {
                    let batch = columns::probes(rows)?;
                    self.write_part((Table::Probes, Some(layer), checkpoint), &batch)?;
                }
            }
            Msg::Commit { step, weights } => self.commit(step, weights)?,
            Msg::Flush(ack) => {
                let _ = ack.send(());
            }
            Msg::Adopt(files) => self.adopt(files)?,
            Msg::Stage(reply) => {
                let files = self.stage()?;
                let _ = reply.send(files);
            }
            Msg::Abandon { reason, reply } => {
                self.discard();
                if self.role.worker().is_none() {
                    self.manifest.status = Status::Aborted;
                    self.manifest.abort_reason = Some(reason);
                    self.write_manifest()?;
                }
                let _ = reply.send(());
                return Ok(Flow::Stop);
            }
            Msg::Drop => {
                self.discard();
                if self.role.worker().is_none() {
                    self.manifest.status = Status::Aborted;
                    self.manifest.abort_reason = Some(DROPPED_REASON.to_owned());
                    self.write_manifest()?;
                }
                return Ok(Flow::Stop);
            }
            Msg::Close { .. } => {} // handled in `run`
        }
        Ok(Flow::Continue)
    }

    fn write(&mut self, table: Table, layer: Option<usize>, batch: &RecordBatch) -> Result<()> {
        self.write_part((table, layer, false), batch)
    }

    fn write_part(&mut self, key: PartKey, batch: &RecordBatch) -> Result<()> {
        if !self.parts.contains_key(&key) {
            let (table, layer, checkpoint) = key;
            let name = layer.and_then(|i| self.layers.get(i)).map(String::as_str);
            let props = properties(
                &self.options,
                &self.manifest.run_id,
                table,
                name,
                self.dtype,
            )?;
            let seq = self.manifest.commits.len() as u64;
            let rel = match (checkpoint, name, self.role.worker()) {
                (_, _, Some(rank)) => layout::rank_part_path(table, name, self.stage_seq, rank),
                (true, Some(l), None) => layout::checkpoint_probes_path(l, seq),
                _ => layout::part_path(table, name, seq),
            };
            let part = PartWriter::create_at(
                &self.run,
                rel,
                table,
                name,
                schema(table, self.dtype),
                props,
                &self.options,
            )?;
            self.parts.insert(key, part);
        }
        match self.parts.get_mut(&key) {
            Some(part) => part.write(batch),
            None => Err(Error::WriterGone),
        }
    }

    fn flush_steps(&mut self) -> Result<()> {
        if self.steps.len() == 0 {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.steps);
        let batch = columns::steps(rows)?;
        self.write(Table::Steps, None, &batch)
    }

    fn flush_layer_steps(&mut self) -> Result<()> {
        if self.layer_steps.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.layer_steps);
        let batch = columns::layer_steps(&rows)?;
        self.write(Table::LayerSteps, None, &batch)
    }

    fn flush_examples(&mut self) -> Result<()> {
        if self.examples.len() == 0 {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.examples);
        let batch = columns::examples(rows)?;
        self.write(Table::Examples, None, &batch)
    }

    /// Whether anything would go into a commit.
    fn pending(&self) -> bool {
        !self.parts.is_empty()
            || self.steps.len() > 0
            || !self.layer_steps.is_empty()
            || self.examples.len() > 0
    }

    /// Owner: checks that the files another rank staged are in the run
    /// directory (under their temporary or final names) and keeps them for
    /// the next commit.
    fn adopt(&mut self, files: Vec<FileEntry>) -> Result<()> {
        for f in &files {
            let table: Table = f.table.parse()?;
            let rel = std::path::Path::new(&f.path);
            let inside = rel.is_relative()
                && rel
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
                && f.path.starts_with(&format!("{}/", table.name()));
            if !inside {
                return Err(Error::Invalid {
                    context: format!("adopted file {:?}", f.path),
                    message: format!("not a part file of table {table} inside the run"),
                });
            }
            let path = self.run.join(&f.path);
            if !(layout::temp_path(&path).is_file() || path.is_file()) {
                return Err(Error::Unshared { path });
            }
        }
        self.adopted.extend(files);
        Ok(())
    }

    /// Worker: finishes the open parts (footer, fsync, directory fsync),
    /// leaving them under their temporary names for the owner's commit to
    /// publish, and returns their manifest entries.
    fn stage(&mut self) -> Result<Vec<FileEntry>> {
        self.flush_examples()?;
        let mut files = Vec::new();
        let mut dirs = BTreeSet::new();
        let mut parts = std::mem::take(&mut self.parts).into_iter();
        for (_, part) in parts.by_ref() {
            match part.finish() {
                Ok((entry, temp)) => {
                    if let Some(d) = temp.parent() {
                        dirs.insert(d.to_path_buf());
                    }
                    files.push(entry);
                }
                Err(e) => {
                    for (_, part) in parts {
                        part.discard();
                    }
                    return Err(e);
                }
            }
        }
        for d in &dirs {
            durable::sync_dir(d)?;
        }
        self.stage_seq += 1;
        Ok(files)
    }

    /// Makes the pending parts and an optional weights snapshot durable and
    /// records them in a new manifest commit.
    fn commit(&mut self, step: Option<(i64, i32)>, weights: Option<Snapshot>) -> Result<()> {
        self.flush_steps()?;
        self.flush_layer_steps()?;
        self.flush_examples()?;
        let seq = self.manifest.commits.len() as u64;
        let mut files = Vec::new();
        let mut probes = Vec::new();
        // Finished parts, still under their temporary names.
        let mut staged: Vec<PathBuf> = Vec::new();
        let mut weights_written: Option<PathBuf> = None;
        let mut dirs = BTreeSet::new();
        let parts = std::mem::take(&mut self.parts);
        let mut parts = parts.into_iter();
        let mut failure = None;
        for ((_, _, checkpoint), part) in parts.by_ref() {
            match part.finish() {
                Ok((entry, temp)) => {
                    if let Some(d) = temp.parent() {
                        dirs.insert(d.to_path_buf());
                    }
                    staged.push(temp);
                    if checkpoint {
                        probes.push(entry);
                    } else {
                        files.push(entry);
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let mut weights_rel = None;
        if failure.is_none()
            && let Some((rel, tensors)) = weights
        {
            match self.write_weights(&rel, &tensors, step.map(|s| s.0)) {
                Ok(path) => {
                    weights_written = Some(path);
                    weights_rel = Some(rel);
                }
                Err(e) => failure = Some(e),
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
        // Nothing of this commit is in the manifest yet: on failure remove
        // what was written so that no complete-looking stray file remains.
        let undo = |staged: Vec<PathBuf>, weights: Option<PathBuf>| {
            for path in staged.into_iter().chain(weights) {
                let _ = fs::remove_file(path);
            }
        };
        if let Some(e) = failure {
            for (_, part) in parts {
                part.discard();
            }
            undo(staged, weights_written);
            return Err(e);
        }
        // The files of the other ranks, durable under their temporary names
        // (their directories fsynced by the rank that wrote them).
        for f in std::mem::take(&mut self.adopted) {
            if let Some(d) = self.run.join(&f.path).parent() {
                dirs.insert(d.to_path_buf());
            }
            files.push(f);
        }
        self.manifest.commits.push(Commit {
            seq,
            step: step.map(|s| Step(s.0)),
            epoch: step.map(|s| s.1),
            files,
            weights: weights_rel,
            probes,
            time: now(),
        });
        if let Err(e) = self.write_manifest() {
            // The manifest on disk still has the previous commit; keep the
            // in-memory one in step with it.
            self.manifest.commits.pop();
            undo(staged, weights_written);
            return Err(e);
        }
        // Committed: now the parts may take their final names, where
        // directory-listing readers see them. A kill before this is finished
        // by the next reader that opens the run (Manifest::open).
        if let Some(commit) = self.manifest.commits.last() {
            for f in commit.files.iter().chain(&commit.probes) {
                layout::publish(&self.run, &f.path)
                    .map_err(|e| Error::io(self.run.join(&f.path), e))?;
            }
        }
        for d in &dirs {
            durable::sync_dir(d)?;
        }
        tracing::debug!(seq, "committed");
        self.prune_checkpoint_probes(KEEP_CHECKPOINT_PROBES)
    }

    /// Drops the checkpoint probes of all but the latest `keep` commits that
    /// have them: first from the manifest, then from the disk.
    fn prune_checkpoint_probes(&mut self, keep: usize) -> Result<()> {
        let with: Vec<usize> = (0..self.manifest.commits.len())
            .filter(|&i| !self.manifest.commits[i].probes.is_empty())
            .collect();
        let drop = &with[..with.len().saturating_sub(keep)];
        if drop.is_empty() {
            return Ok(());
        }
        let taken: Vec<(usize, Vec<_>)> = drop
            .iter()
            .map(|&i| (i, std::mem::take(&mut self.manifest.commits[i].probes)))
            .collect();
        if let Err(e) = self.write_manifest() {
            for (i, files) in taken {
                self.manifest.commits[i].probes = files;
            }
            return Err(e);
        }
        for f in taken.iter().flat_map(|(_, files)| files) {
            layout::remove(&self.run, &f.path);
        }
        Ok(())
    }

    fn write_weights(
        &self,
        rel: &str,
        tensors: &[OwnedTensor],
        step: Option<i64>,
    ) -> Result<PathBuf> {
        let path = self.run.join(rel);
        if let Some(dir) = path.parent() {
            durable::create_dir(dir)?;
        }
        let mut meta = HashMap::new();
        meta.insert(
            "reptrace.format_version".to_owned(),
            FORMAT_VERSION.to_string(),
        );
        meta.insert("reptrace.run_id".to_owned(), self.manifest.run_id.clone());
        if let Some(s) = step {
            meta.insert("reptrace.step".to_owned(), s.to_string());
        }
        let bytes = weights::serialize(tensors, meta, &path)?;
        durable::write_atomic(&path, &bytes)?;
        Ok(path)
    }

    fn close(
        &mut self,
        status: Status,
        reason: Option<String>,
        step: Option<(i64, i32)>,
        weights: Option<Snapshot>,
    ) -> Result<()> {
        if status == Status::Complete || self.pending() || weights.is_some() {
            self.commit(step, weights)?;
        }
        self.manifest.status = status;
        self.manifest.abort_reason = reason;
        self.write_manifest()?;
        if status == Status::Complete {
            // The final probes take over from the checkpoint ones.
            self.prune_checkpoint_probes(0)?;
        }
        Ok(())
    }

    fn write_manifest(&self) -> Result<()> {
        durable::write_atomic(
            &layout::manifest_path(&self.run),
            self.manifest.to_json().as_bytes(),
        )
    }

    /// Removes every uncommitted part file.
    fn discard(&mut self) {
        for part in std::mem::take(&mut self.parts).into_values() {
            part.discard();
        }
        self.steps = StepRowsOwned::default();
        self.examples = ExampleRowsOwned::default();
    }

    /// Cleans up after an error and marks the run aborted with the error
    /// (a worker only cleans up: the owner keeps the manifest).
    fn fail(&mut self, e: Error) {
        tracing::error!("recorder: {e}");
        self.discard();
        if self.role.worker().is_some() {
            self.shared.set_error(e);
            return;
        }
        self.manifest.status = Status::Aborted;
        self.manifest.abort_reason = Some(format!("recorder error: {e}"));
        if let Err(e2) = self.write_manifest() {
            tracing::error!("recorder: could not mark the run aborted: {e2}");
        }
        self.shared.set_error(e);
    }
}

/// The current time, RFC 3339 in UTC.
pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Whether `dir` is missing or an empty directory.
pub(crate) fn usable_run_dir(dir: &Path) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(Error::io(dir, e)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod queue_tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A caller waits while its bytes do not fit, goes on once the writer
    /// releases enough, and never waits for a writer that has ended.
    #[test]
    fn reserve_waits_for_room_and_not_for_an_ended_writer() {
        let shared = Arc::new(Shared::default());
        shared.reserve(10, 15);
        // Alone in the queue, a message larger than the limit goes at once.
        let done = Arc::new(AtomicUsize::new(0));
        let waiter = {
            let (shared, done) = (Arc::clone(&shared), Arc::clone(&done));
            std::thread::spawn(move || {
                shared.reserve(10, 15);
                done.store(1, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(
            done.load(Ordering::SeqCst),
            0,
            "10 + 10 bytes do not fit in 15"
        );
        shared.release(10);
        waiter.join().unwrap();
        assert_eq!(*shared.queued.lock().unwrap(), 10);

        let waiter = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || shared.reserve(100, 15))
        };
        std::thread::sleep(Duration::from_millis(50));
        shared.end();
        waiter.join().unwrap();

        let alone = Shared::default();
        alone.reserve(1 << 30, 15);
        assert_eq!(*alone.queued.lock().unwrap(), 1 << 30);
    }
}
