//! `reptrace info`, run as a binary on runs written through the recorder,
//! including runs whose recording process was killed.
use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use rand::{Rng, SeedableRng};
use reptrace_format::{Manifest, Model, Split, Status, Table, layout};
use reptrace_record::{ProbeBatch, Recorder, StepRow, UpdateBatch};
use reptrace_testkit::cli::{Cli, assert_error_starting};
use reptrace_testkit::handmade::{self, Batch, Handmade, Tensor};
use reptrace_testkit::{files, models};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn cli() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_reptrace"))
}

/// The MLP 6 → 4 → 3 of these runs.
fn model() -> Model {
    models::mlp("mlp", &[6, 4, 3])
}

/// Records `steps` steps of `rows` rows per layer, committing every `every`.
fn record(run: &Path, steps: i64, rows: usize, every: i64, finish: bool) {
    let mut rec = Handmade::new(run, model(), &["a", "b", "c"]);
    let ids: Vec<i64> = (0..rows as i64).collect();
    let labels: Vec<i32> = ids.iter().map(|i| (i % 3) as i32).collect();
    rec.instances(&labels, &vec![Split::Train; rows]);
    let (w, b) = (vec![0.5f32; 24], vec![0.0f32; 4]);
    let weights: [Tensor; 2] = [("fc1.weight", &[4, 6], &w), ("fc1.bias", &[4], &b)];
    rec.weights(&weights);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for t in 0..steps {
        let batch = Batch::new(t, (t / 4) as i32, &ids, &labels);
        rec.step(&batch, 0.1);
        rec.random_updates(&batch, &mut rng);
        if t % every == every - 1 {
            rec.commit();
        }
    }
    if finish {
        rec.probes(
            "fc2",
            ProbeBatch {
                probe_ids: &[0],
                instance_ids: &[Some(0)],
                labels: &[0],
                predicted: &[1],
                a: &[0.0; 4],
                p: &[1.0, 2.0, 2.0],
                positions: None,
            },
        );
        rec.finish(&weights);
    } else {
        rec.crash();
    }
}

#[test]
fn info_reports_rows_sizes_and_model() {
    let (_dir, run) = handmade::temp_run(|run| record(run, 10, 5, 4, true));
    let j = cli().info_json(&run);
    let m = Manifest::load(&run).unwrap();
    assert_eq!(j["status"], "complete");
    assert_eq!(j["run_id"], m.run_id.as_str());
    assert_eq!(j["last_step"], 9);
    assert_eq!(j["last_epoch"], 2);
    assert_eq!(j["commits"], m.commits.len());
    assert_eq!(j["classes"], serde_json::json!(["a", "b", "c"]));
    assert_eq!(j["model"]["modules"][0]["name"], "fc1");
    assert_eq!(
        j["model"]["modules"][0]["factor_lens"],
        serde_json::json!([6, 4])
    );
    assert_eq!(
        j["model"]["modules"][0]["weight_shape"],
        serde_json::json!([4, 6])
    );
    assert_eq!(j["optimizer"]["kind"], "sgd");
    assert!(j["stray_files"].as_array().unwrap().is_empty());
    assert!(
        j["warnings"].as_array().unwrap().is_empty(),
        "{}",
        j["warnings"]
    );

    // Each table/layer: files, rows (read back), bytes (stat) and the raw size.
    for t in j["tables"].as_array().unwrap() {
        let table: Table = t["table"].as_str().unwrap().parse().unwrap();
        let layer = t["layer"].as_str();
        let files: Vec<_> = m
            .files(table)
            .into_iter()
            .filter(|f| f.layer.as_deref() == layer)
            .collect();
        let rows: u64 = files
            .iter()
            .map(|f| files::parquet_rows(&run.join(&f.path)))
            .sum();
        let bytes: u64 = files
            .iter()
            .map(|f| std::fs::metadata(run.join(&f.path)).unwrap().len())
            .sum();
        assert_eq!(t["files"], files.len());
        assert_eq!(t["rows"], rows, "{t}");
        assert_eq!(t["footer_rows"], rows);
        assert_eq!(t["bytes"], bytes);
        if table == Table::Updates {
            let (u, v) = match layer {
                Some("fc1") => (6, 4),
                _ => (4, 3),
            };
            assert_eq!(t["raw_f32_bytes"], rows * (u + v) * 4);
            let ratio = t["ratio"].as_f64().unwrap();
            assert!((ratio - bytes as f64 / (rows * (u + v) * 4) as f64).abs() < 1e-12);
        }
    }
    let updates: Vec<_> = j["tables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["table"] == "updates")
        .map(|t| {
            (
                t["layer"].as_str().unwrap().to_owned(),
                t["rows"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        updates,
        vec![("fc1".to_owned(), 50), ("fc2".to_owned(), 50)]
    );

    let out = cli().output(&[OsStr::new("info"), run.as_os_str()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        "status     complete",
        "last step 9 (epoch 2)",
        "fc1          linear       6 -> 4, bias; traced: u 6, v 4",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    assert!(!text.contains("warning"), "{text}");
}

#[test]
fn info_warns_about_stray_and_inconsistent_files() {
    let (_dir, run) = handmade::temp_run(|run| record(run, 7, 3, 2, false));
    let m = Manifest::load(&run).unwrap();
    assert_eq!(m.status, Status::Recording);
    // `forget` left the open parts of the next commit as temporary files.
    let stray = cli().info_json(&run)["stray_files"].clone();
    let stray: Vec<String> = serde_json::from_value(stray).unwrap();
    assert!(!stray.is_empty());
    assert!(
        stray
            .iter()
            .all(|s| layout::is_temp_name(s.rsplit('/').next().unwrap())),
        "{stray:?}"
    );
    // A complete-looking file that no commit lists, and a truncated committed file.
    std::fs::write(run.join("updates/layer=fc1/part-000099.parquet"), b"x").unwrap();
    let committed = &m.files(Table::Updates)[0].path;
    let bytes = std::fs::read(run.join(committed)).unwrap();
    std::fs::write(run.join(committed), &bytes[..bytes.len() / 2]).unwrap();
    let j = cli().info_json(&run);
    let stray: Vec<String> = serde_json::from_value(j["stray_files"].clone()).unwrap();
    assert!(
        stray.contains(&"updates/layer=fc1/part-000099.parquet".to_owned()),
        "{stray:?}"
    );
    let warnings = j["warnings"].to_string();
    assert!(warnings.contains(committed.as_str()), "{warnings}");
    let text =
        String::from_utf8(cli().output(&[OsStr::new("info"), run.as_os_str()]).stdout).unwrap();
    for word in ["warning:", "part-000099.parquet"] {
        assert!(text.contains(word), "{word}: {text}");
    }
}

#[test]
fn info_errors_are_one_line_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let check = |run: &Path, want: &str| {
        let out = cli().output(&[OsStr::new("info"), run.as_os_str()]);
        let path = run.display().to_string();
        assert_error_starting(&out, "error: ", &[&path, want]);
    };
    check(&dir.path().join("nope"), "no such run directory");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    check(&empty, "manifest missing");
    let run = dir.path().join("run");
    record(&run, 2, 2, 1, true);
    let text = std::fs::read_to_string(run.join("manifest.json")).unwrap();
    std::fs::write(run.join("manifest.json"), &text[..text.len() / 2]).unwrap();
    check(&run, "invalid manifest");
    std::fs::write(
        run.join("manifest.json"),
        text.replace(
            &format!("\"format_version\": {}", reptrace_format::FORMAT_VERSION),
            "\"format_version\": 99",
        ),
    )
    .unwrap();
    check(&run, "version 99 is not supported");
    // Usage errors exit with 2.
    let out = cli().output(&[OsStr::new("info"), OsStr::new("--no-such-flag")]);
    assert_eq!(out.status.code(), Some(2));
}

// ---------------------------------------------------------- killed recorder

const CHILD_ENV: &str = "REPTRACE_CLI_CRASH_CHILD_RUN";

/// Child process of `info_on_a_killed_run`: records until killed. Returns
/// at once in a normal test run.
#[test]
fn crash_child_process() {
    let Some(run) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    record(&PathBuf::from(run), i64::MAX, 4, 3, false);
}

#[test]
fn info_on_a_killed_run_reports_the_last_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for round in 0..5 {
        let run = dir.path().join(format!("run{round}"));
        let mut child = handmade::spawn_recording_child("crash_child_process", CHILD_ENV, &run);
        handmade::wait_for_commit(&mut child, &run, |m| m.last_step().is_some());
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        handmade::kill(child);

        let m = Manifest::open(&run).unwrap(); // finishes a commit the kill interrupted
        // The last step, independently: the largest committed `steps.step`.
        let max_step = m
            .files(Table::Steps)
            .iter()
            .flat_map(|f| {
                files::read_parquet(&run.join(&f.path))
                    .into_iter()
                    .flat_map(|b| {
                        b.column_by_name("step")
                            .unwrap()
                            .as_primitive::<Int64Type>()
                            .values()
                            .to_vec()
                    })
                    .collect::<Vec<_>>()
            })
            .max();
        let j = cli().info_json(&run);
        assert_eq!(j["status"], "recording");
        assert_eq!(j["last_step"].as_i64(), max_step, "round {round}");
        assert!(
            j["warnings"].as_array().unwrap().is_empty(),
            "{}",
            j["warnings"]
        );
        let text =
            String::from_utf8(cli().output(&[OsStr::new("info"), run.as_os_str()]).stdout).unwrap();
        let want = format!("last step {}", max_step.unwrap());
        assert!(text.contains(&want), "{text}");
    }
}

/// Format 7: what each step applied. A run with a skipped step, a frozen
/// layer and `layer_steps` rows (a cycling momentum, one clipped step, one
/// layer under bf16) shows them in `info`, text and JSON; the recorder
/// refuses rows it cannot store faithfully.
#[test]
fn info_shows_what_each_step_applied() {
    use reptrace_record::{AdamStep, LayerStepRow};
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut m = model();
    m.frozen = vec!["embed".into()];
    let mut hand = Handmade::new(&run, m.clone(), &["a", "b", "c"]);
    let rec = hand.recorder();
    let ids = [0i64, 1];
    let labels = [0i32, 1];
    let row = |step: i64, layer: &str| LayerStepRow {
        step,
        epoch: 0,
        layer: layer.into(),
        param_group: 0,
        lr: 0.1,
        momentum: 0.85 + 0.05 * step as f64,
        dampening: 0.0,
        nesterov: false,
        weight_decay: 0.0,
        grad_scale: if step == 1 && layer == "fc1" {
            0.5
        } else {
            1.0
        },
        grad_check: Some(1e-7),
        grad_norm: Some(1.0),
        precision: if layer == "fc2" { "bf16" } else { "f32" }.into(),
        adam: None,
    };
    for t in 0..4 {
        rec.step(StepRow {
            step: t,
            epoch: 0,
            lr: 0.1,
            batch_size: 2,
            loss: 1.0,
            skipped: t == 2,
        })
        .unwrap();
        if t == 2 {
            continue;
        }
        rec.layer_steps(m.traced_layers().map(|l| row(t, l.name())).collect())
            .unwrap();
        for l in m.traced_layers() {
            let (ul, vl) = l.factor_lens();
            rec.updates(
                l.name(),
                UpdateBatch {
                    step: t,
                    epoch: 0,
                    instance_ids: &ids,
                    labels: &labels,
                    u: &vec![0.5; 2 * ul],
                    v: &vec![0.25; 2 * vl],
                    update_norm: None,
                    positions: None,
                },
            )
            .unwrap();
        }
    }
    // Rows that cannot be stored as they are: refused with the field at fault.
    let mut bad = |r: LayerStepRow| rec_err(rec, r);
    assert!(
        bad(LayerStepRow {
            layer: "fc9".into(),
            ..row(3, "fc1")
        })
        .contains("fc9")
    );
    assert!(
        bad(LayerStepRow {
            grad_scale: f64::NAN,
            ..row(3, "fc1")
        })
        .contains("grad_scale is NaN")
    );
    assert!(
        bad(LayerStepRow {
            precision: "f8".into(),
            ..row(3, "fc1")
        })
        .contains("precision \"f8\"")
    );
    let adam = |preconditioner: Vec<f32>, beta1: f64| {
        Some(AdamStep {
            beta1,
            step_size: 0.1,
            preconditioner,
        })
    };
    assert!(
        bad(LayerStepRow {
            adam: adam(vec![1.0; 3], 0.9),
            ..row(3, "fc1")
        })
        .contains("the preconditioner has 3 values")
    );
    assert!(
        bad(LayerStepRow {
            adam: adam(vec![1.0], 1.0),
            ..row(3, "fc1")
        })
        .contains("beta1 is 1")
    );
    rec.commit().unwrap();
    rec.flush().unwrap();
    drop(hand);

    let info = cli().info_json(&run);
    assert_eq!(info["frozen"], serde_json::json!(["embed"]));
    let s = &info["steps_applied"];
    assert_eq!(s["skipped"], 1);
    let layers = s["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0]["layer"], "fc1");
    assert_eq!(layers[0]["steps"], 3);
    assert_eq!(layers[0]["rescaled"], 1);
    assert_eq!(layers[0]["grad_scale"], serde_json::json!([0.5, 1.0]));
    let momentum: Vec<f64> = serde_json::from_value(layers[0]["momentum"].clone()).unwrap();
    assert!((momentum[0] - 0.85).abs() < 1e-12 && (momentum[1] - 1.0).abs() < 1e-12);
    assert_eq!(layers[0]["precision"], "f32");
    assert_eq!(layers[1]["precision"], "bf16");
    let out = cli().output(&[OsStr::new("info"), run.as_os_str()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("frozen     embed"), "{text}");
    assert!(text.contains("skipped    1 steps"), "{text}");
    assert!(
        text.contains("fc1          group 0, lr 0.1, momentum 0.85..1, gradient scale"),
        "{text}"
    );
}

fn rec_err(rec: &mut Recorder, row: reptrace_record::LayerStepRow) -> String {
    rec.layer_steps(vec![row]).unwrap_err().to_string()
}
