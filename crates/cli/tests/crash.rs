//! Crash safety and reading while training, on real `reptrace train` runs
//! of the digits.
//!
//! - `killed_training_leaves_an_analysable_trace`: SIGKILL at 12 points
//!   (random moments, and moments when a checkpoint or manifest is being
//!   written). Every time the trace is readable up to its last commit:
//!   `info` names the status and last step, every committed step reads back
//!   through SQL, every visible file is complete, `verify` passes, and
//!   `attribute` works as of the last checkpoint (or says that no probes are
//!   committed yet, when the kill came before the first epoch end).
//!   Directory-listing readers (a pandas, DuckDB or Spark glob over a table's
//!   directory) see only committed files right after the kill, and exactly
//!   the committed files and rows once a reptrace command opened the run.
//! - `uncompressed_recording_and_compaction_survive_kills`: a run recorded
//!   with `--compression none`, killed mid-training, passes the same checks;
//!   `reptrace compact` killed mid-way leaves the manifest byte for byte as
//!   it was and the run as it reads; a compaction run again finishes the
//!   job, and the compacted runs read the same rows and pass `verify`;
//!   Ctrl-C stops a compaction with exit status 130, removing what it wrote.
//! - `readers_see_only_committed_steps_while_training`: `info` and `sql`
//!   run over and over against a run in training and never fail nor see an
//!   uncommitted step.
#![cfg(feature = "tch")]
use rand::{Rng, SeedableRng};
use reptrace_testkit::cli::{Cli, assert_one_line_error, text};
use reptrace_testkit::files::{self, writing};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

fn cli() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_reptrace"))
}

/// Steps per epoch: 1437 training digits in batches of [`BATCH`].
const BATCH: usize = 4;
const STEPS_PER_EPOCH: i64 = 1437_usize.div_ceil(BATCH) as i64;

/// `reptrace train` on digits into `run`, in the background.
fn start_training(run: &Path, epochs: usize) -> Child {
    start_training_with(run, epochs, &[])
}

/// [`start_training`] with more arguments.
fn start_training_with(run: &Path, epochs: usize, more: &[&str]) -> Child {
    cli()
        .command()
        .args(["train", "--epochs", &epochs.to_string()])
        .args(more)
        .args([
            "--batch-size",
            &BATCH.to_string(),
            "--threads",
            "1",
            "--out",
        ])
        .arg(run)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// One CSV result row of `reptrace sql` as numbers.
fn sql_numbers(run: &Path, query: &str) -> Vec<Vec<f64>> {
    let o = cli().output(&["sql", run.to_str().unwrap(), query, "--format", "csv"]);
    assert!(o.status.success(), "{query}: {}", text(&o.stderr));
    text(&o.stdout)
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .map(|v| v.parse::<f64>().unwrap_or(f64::NAN))
                .collect()
        })
        .collect()
}

/// The Parquet files a directory-listing reader finds under the tables'
/// directories (`<run>/<table>/**/*.parquet`, skipping names that start with
/// `.` or `_`, as pyarrow, Spark and Hive discovery do), relative to the run,
/// with their row counts from the footers.
fn glob_tables(run: &Path) -> std::collections::BTreeMap<String, i64> {
    use parquet::file::reader::FileReader;
    files::listed_parquet(run)
        .into_iter()
        .map(|rel| {
            let f = std::fs::File::open(run.join(&rel)).unwrap();
            let reader = parquet::file::reader::SerializedFileReader::new(f).unwrap();
            let rows = reader.metadata().file_metadata().num_rows();
            (rel, rows)
        })
        .collect()
}

/// The committed files of the tables, with their row counts, per the manifest.
fn committed_tables(run: &Path) -> std::collections::BTreeMap<String, i64> {
    let m = reptrace_format::Manifest::load(run).unwrap();
    reptrace_format::Table::ALL
        .iter()
        .flat_map(|&t| m.files(t))
        .map(|f| (f.path.clone(), f.rows as i64))
        .collect()
}

/// Checks a killed run; returns `None` when the kill came after it completed,
/// else its last committed step (if any).
fn check_killed(run: &Path, what: &str) -> Option<Option<i64>> {
    let m = reptrace_format::Manifest::load(run).unwrap();
    // Right after the kill, before any reptrace command opened the run: a
    // glob reader sees committed files only (a kill between the manifest
    // write and the renames hides some committed ones until the next open).
    let committed = committed_tables(run);
    for (rel, rows) in glob_tables(run) {
        assert_eq!(
            committed.get(&rel),
            Some(&rows),
            "{what}: a glob reader sees {rel} ({rows} rows), which is not committed"
        );
    }
    let info = cli().info_json(run);
    // `info` opened the run: now a glob reader sees exactly what is committed.
    assert_eq!(glob_tables(run), committed, "{what}: glob after opening");
    if m.status == reptrace_format::Status::Complete {
        // Killed after its last commit, while the process was exiting.
        assert_eq!(info["status"], "complete", "{what}");
        let o = cli().output(&["verify", run.to_str().unwrap()]);
        assert!(o.status.success(), "{what}: verify: {}", text(&o.stdout));
        return None;
    }
    assert_eq!(info["status"], "recording", "{what}");
    let last = m.last_step().map(|s| s.0);
    assert_eq!(info["last_step"].as_i64(), last, "{what}");

    // No partial file is visible: every file with a final name is complete.
    let all = files::list(run);
    for rel in &all {
        let name = rel.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = run.join(rel);
        if name.ends_with(".parquet") {
            let f = std::fs::File::open(&path).unwrap();
            parquet::file::reader::SerializedFileReader::new(f)
                .unwrap_or_else(|e| panic!("{what}: {} is not complete: {e}", rel.display()));
        } else if name.ends_with(".safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            safetensors::SafeTensors::deserialize(&bytes)
                .unwrap_or_else(|e| panic!("{what}: {} is not complete: {e}", rel.display()));
        }
    }

    // Every committed step reads back, with all its update rows.
    let r = sql_numbers(
        run,
        "SELECT count(*), count(DISTINCT step), coalesce(max(step), -1), \
         coalesce(sum(batch_size), 0) FROM steps",
    );
    let (n, distinct, max, rows) = (r[0][0], r[0][1], r[0][2], r[0][3]);
    let want = last.map_or(0, |s| s + 1) as f64;
    assert_eq!(
        (n, distinct, max),
        (want, want, want - 1.0),
        "{what}: steps"
    );
    let per_layer = sql_numbers(
        run,
        "SELECT count(*), count(DISTINCT step) FROM updates GROUP BY layer",
    );
    if last.is_some() {
        assert_eq!(per_layer.len(), 3, "{what}: updates of 3 layers");
    }
    for row in per_layer {
        assert_eq!((row[0], row[1]), (rows, want), "{what}: updates per layer");
    }

    let o = cli().output(&["verify", run.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "{what}: verify failed:\n{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );

    let o = cli().output(&[
        "attribute",
        run.to_str().unwrap(),
        "--probes",
        "ids:1437,1500",
    ]);
    match m.analysis_probes() {
        Some(a) => {
            let as_of = a.step.expect("checkpoint after a step").0;
            assert!(
                a.checkpoint,
                "{what}: probes of a killed run are checkpoint probes"
            );
            assert!(o.status.success(), "{what}: attribute: {}", text(&o.stderr));
            let out = text(&o.stdout) + &text(&o.stderr);
            assert!(
                out.contains(&format!("as of step {as_of}")),
                "{what}: attribute does not say 'as of step {as_of}':\n{out}"
            );
            // Contributions of the checkpoint's steps sum to its refinement.
            let o = cli().output(&["verify", run.to_str().unwrap()]);
            assert!(
                o.status.success(),
                "{what}: verify after attribute:\n{}",
                text(&o.stdout)
            );
            let r = sql_numbers(run, "SELECT coalesce(max(step), -1) FROM contributions");
            assert!(
                r[0][0] <= as_of as f64,
                "{what}: contributions after step {as_of}"
            );
            assert_eq!(
                glob_tables(run),
                committed_tables(run),
                "{what}: glob after attribute"
            );
        }
        None => {
            assert!(!o.status.success(), "{what}: attribute without probes");
            let err = text(&o.stderr);
            assert_eq!(err.lines().count(), 1, "{what}: {err}");
            assert!(err.contains("no probes are committed"), "{what}: {err}");
        }
    }
    Some(last)
}

/// Epochs of a run that is killed.
const EPOCHS: usize = 6;

/// Kills that land during training.
const KILLS: usize = 12;

/// Waits until the recorder has created the run (libtorch loaded, data read).
fn wait_for_manifest(run: &Path) {
    let start = Instant::now();
    while !run.join("manifest.json").exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no run started");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A run of [`EPOCHS`] epochs training in the background in a fresh
/// temporary directory, once its manifest exists.
fn live_run() -> (tempfile::TempDir, PathBuf, Child) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let child = start_training(&run, EPOCHS);
    wait_for_manifest(&run);
    (dir, run, child)
}

#[test]
fn killed_training_leaves_an_analysable_trace() {
    let dir = tempfile::tempdir().unwrap();
    // How long an uninterrupted run records here (from its manifest on).
    let reference = dir.path().join("reference");
    let mut child = start_training(&reference, EPOCHS);
    wait_for_manifest(&reference);
    let t0 = Instant::now();
    assert!(child.wait().unwrap().success());
    let full = t0.elapsed();

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut seen_steps = Vec::new();
    // Until 12 kills landed during training (a run that ends before its
    // kill moment, on a loaded machine, is replaced by another).
    let mut k = 0;
    while seen_steps.len() < KILLS {
        assert!(
            k < 4 * KILLS,
            "only {} of {k} kills landed",
            seen_steps.len()
        );
        k += 1;
        let run = dir.path().join(format!("killed-{k}"));
        let mut child = start_training(&run, EPOCHS);
        wait_for_manifest(&run);
        let start = Instant::now();
        // Even k: a random moment. Odd k: the first moment after a random
        // delay at which a file is being written (a part, a checkpoint or
        // the manifest), else the end of the delay window.
        let at = full.mul_f64(rng.random_range(0.05..0.8));
        let what = if k % 2 == 0 {
            std::thread::sleep(at);
            format!("kill {k} at {:.2} s", at.as_secs_f64())
        } else {
            std::thread::sleep(at.mul_f64(0.5));
            let mut caught = false;
            while start.elapsed() < full {
                if writing(&run) {
                    caught = true;
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            format!(
                "kill {k} at {:.2} s ({})",
                start.elapsed().as_secs_f64(),
                if caught {
                    "while writing"
                } else {
                    "no write seen"
                }
            )
        };
        if child.try_wait().unwrap().is_some() {
            // Finished before the kill: nothing to check here.
            continue;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        eprintln!("{what}");
        if let Some(last) = check_killed(&run, &what) {
            seen_steps.push(last);
        }
    }
    // Some kills landed after the first epoch end (checkpoint probes).
    let after_first_epoch = seen_steps
        .iter()
        .filter(|s| s.is_some_and(|s| s >= STEPS_PER_EPOCH - 1))
        .count();
    assert!(after_first_epoch >= 3, "{seen_steps:?}");
}

/// What a run reads as: per table, its rows' count and a sum over them.
fn fingerprint(run: &Path) -> Vec<Vec<f64>> {
    [
        "SELECT count(*), sum(step), sum(loss) FROM steps",
        "SELECT count(*), sum(step), sum(instance_id), sum(update_norm) FROM updates",
        "SELECT count(*), sum(loss), sum(predicted) FROM examples",
        "SELECT count(*), sum(p_norm) FROM probes",
    ]
    .iter()
    .flat_map(|q| sql_numbers(run, q))
    .collect()
}

/// The codecs of every column chunk of the run's committed files.
fn codecs(run: &Path) -> std::collections::BTreeSet<String> {
    use parquet::file::reader::FileReader;
    let m = reptrace_format::Manifest::load(run).unwrap();
    m.all_files()
        .iter()
        .flat_map(|f| {
            let file = std::fs::File::open(run.join(&f.path)).unwrap();
            let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
            let meta = reader.metadata().clone();
            meta.row_groups()
                .iter()
                .flat_map(|g| g.columns().iter().map(|c| format!("{:?}", c.compression())))
                .collect::<Vec<_>>()
        })
        .map(|c| c.split('(').next().unwrap_or_default().to_owned())
        .collect()
}

/// `reptrace verify` passes with no warning about stray files.
fn verified_clean(run: &Path, what: &str) {
    let o = cli().output(&["verify", run.to_str().unwrap()]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{what}: verify failed:\n{out}");
    let stray = out
        .lines()
        .find(|l| l.contains("stray files"))
        .unwrap_or("");
    assert!(stray.starts_with("pass"), "{what}: {stray}");
}

#[test]
fn uncompressed_recording_and_compaction_survive_kills() {
    let dir = tempfile::tempdir().unwrap();
    let none = ["--compression", "none"];

    // Killed while recording without compression: as analysable as ever,
    // then compacted.
    let killed = dir.path().join("killed");
    let mut child = start_training_with(&killed, EPOCHS, &none);
    wait_for_manifest(&killed);
    let start = Instant::now();
    // The first write after the first epoch end.
    while reptrace_format::Manifest::load(&killed).map_or(0, |m| m.commits.len()) < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "no epoch end");
        std::thread::sleep(Duration::from_millis(2));
    }
    while !writing(&killed) && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_micros(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let last = check_killed(&killed, "killed uncompressed").flatten();
    assert!(last.is_some(), "the kill came before the first step");
    // (`check_killed` attributed: those parts are compressed.)
    assert!(codecs(&killed).contains("UNCOMPRESSED"));
    let before = fingerprint(&killed);
    let o = cli().output(&["compact", killed.to_str().unwrap()]);
    assert!(o.status.success(), "compact: {}", text(&o.stderr));
    assert_eq!(
        fingerprint(&killed),
        before,
        "compaction changed the killed run"
    );
    assert_eq!(codecs(&killed), ["ZSTD".to_owned()].into());
    verified_clean(&killed, "killed, then compacted");

    // A whole run recorded without compression; a compaction killed as soon
    // as its first file is being written changes nothing.
    let run = dir.path().join("run");
    let o = cli().output(&[
        "train",
        "--epochs",
        "3",
        "--batch-size",
        &BATCH.to_string(),
        "--threads",
        "1",
        "--compression",
        "none",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains(&format!("reptrace compact {}", run.display())),
        "train names the compaction: {}",
        text(&o.stdout)
    );
    let manifest = std::fs::read(run.join("manifest.json")).unwrap();
    let before = fingerprint(&run);
    let bytes_before: u64 = committed_bytes(&run);
    {
        let mut compact = cli()
            .command()
            .args(["compact"])
            .arg(&run)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !writing(&run) && compact.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "compaction hangs"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        compact.kill().unwrap();
        let status = compact.wait().unwrap();
        assert!(
            !status.success(),
            "the compaction finished before it was seen writing"
        );
        assert_eq!(
            std::fs::read(run.join("manifest.json")).unwrap(),
            manifest,
            "a killed compaction changed the manifest"
        );
        assert_eq!(
            glob_tables(&run),
            committed_tables(&run),
            "glob after a killed compaction"
        );
        assert_eq!(
            fingerprint(&run),
            before,
            "a killed compaction changed the rows"
        );
        let o = cli().output(&["verify", run.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "verify after a killed compaction:\n{}",
            text(&o.stdout)
        );
    }
    // Ctrl-C: stops after the file it is writing, removes what it wrote,
    // says so in one line and exits with 130. (The killed compaction's
    // temporary files are removed first thing.)
    {
        let compact = cli()
            .command()
            .args(["compact"])
            .arg(&run)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let new_temp = |run: &Path| {
            files::list(run).iter().any(|rel| {
                let name = rel.file_name().unwrap().to_string_lossy().into_owned();
                name.ends_with("-z.parquet.tmp")
                    && std::fs::metadata(run.join(rel)).is_ok_and(|m| {
                        m.modified()
                            .is_ok_and(|t| t.elapsed().is_ok_and(|e| e < start.elapsed()))
                    })
            })
        };
        while !new_temp(&run) {
            std::thread::sleep(Duration::from_micros(100));
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "compaction hangs"
            );
        }
        let pid = compact.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        let o = compact.wait_with_output().unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(130), "{err}");
        assert!(
            err.lines().count() == 1 && err.contains("interrupted"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(run.join("manifest.json")).unwrap(),
            manifest,
            "an interrupted compaction changed the manifest"
        );
        assert!(
            !writing(&run),
            "an interrupted compaction left temporary files"
        );
    }
    let o = cli().output(&["compact", run.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "compact: {}", text(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["files"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(fingerprint(&run), before, "compaction changed the rows");
    assert_eq!(codecs(&run), ["ZSTD".to_owned()].into());
    let bytes_after = committed_bytes(&run);
    assert!(
        (bytes_after as f64) < 0.8 * bytes_before as f64,
        "compacted {bytes_before} → {bytes_after} bytes"
    );
    assert_eq!(
        glob_tables(&run),
        committed_tables(&run),
        "glob after compaction"
    );
    verified_clean(&run, "compacted");
    // Nothing left to do the second time.
    let o = cli().output(&["compact", run.to_str().unwrap(), "--json"]);
    let again: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["files"], 0, "{again}");
}

/// Bytes of the run's committed files, per the manifest.
fn committed_bytes(run: &Path) -> u64 {
    let m = reptrace_format::Manifest::load(run).unwrap();
    m.all_files().iter().map(|f| f.bytes).sum()
}

#[test]
fn readers_see_only_committed_steps_while_training() {
    // Reads while a run trains must see at least 3 committed states for the
    // test to mean something; on a loaded machine a read (three CLI calls)
    // can take as long as the whole training, so a run that ends too soon is
    // trained again, longer.
    let mut last = (0, 0, Default::default());
    for epochs in [12, 36, 108] {
        last = read_while_training(epochs);
        if last.0 >= 3 {
            return;
        }
    }
    let (distinct, reads, states) = last;
    panic!("only {distinct} distinct committed states in {reads} reads: {states:?}");
}

/// Trains `epochs` epochs and reads the run until training ends, checking
/// every read; returns (distinct committed states seen, reads, states).
fn read_while_training(epochs: usize) -> (usize, usize, std::collections::BTreeSet<i64>) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut child = start_training(&run, epochs);
    let mut states = std::collections::BTreeSet::new();
    let mut reads = 0;
    loop {
        let done = child.try_wait().unwrap().is_some();
        if run.join("manifest.json").exists() {
            let info = cli().info_json(&run);
            let committed = info["last_step"].as_i64().unwrap_or(-1);
            let r = sql_numbers(&run, "SELECT count(*), coalesce(max(step), -1) FROM steps");
            let (n, max) = (r[0][0] as i64, r[0][1] as i64);
            let u = sql_numbers(
                &run,
                "SELECT count(DISTINCT step), coalesce(max(step), -1) FROM updates",
            );
            let (u_steps, u_max) = (u[0][0] as i64, u[0][1] as i64);
            let after = reptrace_format::Manifest::load(&run)
                .unwrap()
                .last_step()
                .map_or(-1, |s| s.0);
            // A whole committed prefix: what was committed before the query
            // is seen, nothing beyond what is committed after it.
            assert_eq!(n, max + 1, "steps 0..={max} are not all there");
            assert_eq!(
                u_steps,
                u_max + 1,
                "updates of steps 0..={u_max} are not all there"
            );
            assert!(
                committed <= max && max <= u_max && u_max <= after,
                "committed {committed}, then steps to {max}, updates to {u_max}, committed {after}"
            );
            states.insert(max);
            reads += 1;
        }
        if done {
            break;
        }
    }
    assert!(child.wait().unwrap().success());
    (states.len(), reads, states)
}

/// Waits until `run` has committed an epoch end (weights and checkpoint
/// probes), while training goes on.
fn wait_for_epoch_end(run: &Path, child: &mut Child) {
    let start = Instant::now();
    loop {
        let m = reptrace_format::Manifest::load(run).unwrap();
        if m.analysis_probes().is_some_and(|a| a.checkpoint) {
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "training ended");
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no epoch end committed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn probes_are_added_to_a_killed_run_as_of_its_last_checkpoint() {
    let (_dir, run, mut child) = live_run();
    let r = run.to_str().unwrap();

    // While training runs, its recorder holds the run's lock.
    let o = cli().output(&["probe", "add", r, "--data", "digits", "--rows", "0..1"]);
    refused_while_recording(&o, &mut child);

    wait_for_epoch_end(&run, &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    let m = reptrace_format::Manifest::open(&run).unwrap();
    assert_eq!(m.status, reptrace_format::Status::Recording);
    // The last commit with weights is an epoch end, with checkpoint probes.
    let last = m
        .commits
        .iter()
        .rev()
        .find(|c| c.weights.is_some())
        .unwrap();
    assert!(!last.probes.is_empty());
    let step = last.step.unwrap().0;
    assert_eq!((step + 1) % STEPS_PER_EPOCH, 0, "an epoch end: {step}");

    let o = cli().output(&["probe", "add", r, "--data", "digits", "--rows", "0..9"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout).trim(),
        format!(
            "added 10 probes (ids 1797..1806) to 3 layers, as of step {step} \
             (the last committed weights; the run is recording)"
        )
    );
    // The analysis sees the new probes with the checkpoint's (test rows).
    let count = |q: &str| sql_numbers(&run, q)[0].clone();
    assert_eq!(
        count("SELECT count(*), min(probe_id), max(probe_id) FROM probes WHERE probe_id >= 1797"),
        vec![30.0, 1797.0, 1806.0]
    );
    assert_eq!(
        count("SELECT count(*), count(DISTINCT probe_id), min(probe_id) FROM probes"),
        vec![3.0 * 370.0, 370.0, 1437.0]
    );
    // They are the first ten digits, which the network saw in training, as
    // new inputs: no instance id, the digits' labels.
    assert_eq!(
        count(
            "SELECT count(*), sum(CASE WHEN instance_id IS NULL THEN 1 ELSE 0 END), sum(label) \
             FROM probes WHERE probe_id >= 1797 AND layer = 'fc1'"
        ),
        vec![10.0, 10.0, 45.0]
    );
    // Attributed up to the checkpoint, their contributions add up to their
    // refinements (verify's completeness check).
    let o = cli().output(&["attribute", r, "--probes", "ids:1437,1797,1806"]);
    assert!(o.status.success(), "attribute: {}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains(&format!("as of step {step}")), "{out}");
    cli().ok(&["verify", r]);
}

/// `o` is the one-line refusal of a run whose recorder (`child`) is alive.
fn refused_while_recording(o: &Output, child: &mut Child) {
    assert!(
        child.try_wait().unwrap().is_none(),
        "training ended too soon"
    );
    let err = assert_one_line_error(o, &["the run is still being recorded"]);
    assert!(err.starts_with("error: "), "{err}");
}

/// Every file of `run` with its size, and the manifest's attributions.
fn snapshot(run: &Path) -> (Vec<(PathBuf, u64)>, usize) {
    let sized = files::sizes(run)
        .into_iter()
        .filter(|(f, _)| {
            let top = f.components().next().unwrap().as_os_str().to_string_lossy();
            top == "contributions" || top == "influence"
        })
        .collect();
    let m = reptrace_format::Manifest::load(run).unwrap();
    (sized, m.attributions.len())
}

/// While a recorder is alive, `info` says so, queries read the committed
/// steps, and `attribute` refuses the run without touching it; once the
/// recorder is killed, `info` reports the run as killed.
#[test]
fn a_live_run_is_read_but_not_written_and_a_killed_one_says_so() {
    let (_dir, run, mut child) = live_run();
    let r = run.to_str().unwrap();
    wait_for_epoch_end(&run, &mut child);

    let info = cli().info_json(&run);
    assert_eq!(info["status"], "recording");
    assert_eq!(info["state"], "recording", "{info}");
    assert_eq!(info["locked"], true, "{info}");
    let o = cli().output(&["info", r]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("status     recording (live: its recorder holds .lock"),
        "{out}"
    );

    // Readers work on the committed prefix: an epoch end at least.
    let steps = sql_numbers(&run, "SELECT count(*), max(step) FROM steps")[0].clone();
    assert!(steps[0] >= STEPS_PER_EPOCH as f64, "{steps:?}");
    let shares = cli().output(&["query", r, "class_shares", "--param", "probe=1437"]);
    assert!(shares.status.success(), "{}", text(&shares.stderr));

    let before = snapshot(&run);
    let o = cli().output(&["attribute", r, "--probes", "ids:1437"]);
    refused_while_recording(&o, &mut child);
    assert_eq!(
        snapshot(&run),
        before,
        "attribute left something in the run"
    );

    child.kill().unwrap();
    child.wait().unwrap();
    let info = cli().info_json(&run);
    assert_eq!(info["status"], "recording");
    assert_eq!(info["state"], "killed", "{info}");
    assert_eq!(info["locked"], false, "{info}");
    let o = cli().output(&["info", r]);
    let out = text(&o.stdout);
    assert!(
        out.contains("status     killed (the recorder died while recording"),
        "{out}"
    );
    // A killed run is attributed at its last commit point.
    let o = cli().output(&["attribute", r, "--probes", "ids:1437", "--quiet"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(snapshot(&run).1, 1);
}
