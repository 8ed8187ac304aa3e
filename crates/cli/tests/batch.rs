//! Batch mode end to end, as a user runs it: `reptrace train --mode batch`
//! on the bundled digits, `attribute`, `verify`, `info` and the canned
//! queries, each checked against sums computed here from the raw rows.
use reptrace_testkit::cli::{Cli, f};
use reptrace_testkit::digits::Digits;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

fn cli() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_reptrace"))
}

fn i(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap().to_owned()
}

const PROBES: [i64; 3] = [1437, 1500, 1600];

/// The tensors of a run's final weights: name → raw bytes.
fn final_weights(run: &str) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(Path::new(run).join("weights/final.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| (name, t.data().to_vec()))
        .collect()
}

/// A digits run of this file's settings (2 epochs, batches of 64) and `extra`
/// flags, at `dir/name`.
fn train(dir: &Path, name: &str, extra: &[&str]) -> String {
    let run = Digits::new().epochs(2).batch(64).flags(extra);
    let run = run.train(&cli(), dir.join(name));
    run.to_str().unwrap().to_owned()
}

/// ‖p‖² per (layer, probe), from the stored `p` lists.
fn p_norms2(run: &str) -> BTreeMap<(String, i64), f64> {
    let ids: Vec<String> = PROBES.iter().map(i64::to_string).collect();
    cli()
        .sql_json(
            run,
            &format!(
                "SELECT layer, probe_id, p FROM probes WHERE probe_id IN ({})",
                ids.join(", ")
            ),
        )
        .iter()
        .map(|r| {
            let p2: f64 = r["p"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap().powi(2))
                .sum();
            ((s(r, "layer"), i(r, "probe_id").unwrap()), p2)
        })
        .collect()
}

/// `layer_summary` of every probe of [`PROBES`], by (layer, probe).
fn layer_summaries(run: &str) -> BTreeMap<(String, i64), Value> {
    let mut out = BTreeMap::new();
    for probe in PROBES {
        for row in cli().query_json(run, "layer_summary", &[&format!("probe={probe}")]) {
            out.insert((s(&row, "layer"), probe), row);
        }
    }
    out
}

/// The largest residual share `verify` reports for an attribution.
fn verify_residual_share(run: &str) -> f64 {
    let out = cli().ok(&["verify", run]);
    let tag = "max |residual share| ";
    let at = out
        .find(tag)
        .unwrap_or_else(|| panic!("no residual share in {out}"));
    out[at + tag.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The class-share bars of `reptrace report` for `probe`: layer → (bar's
/// data-class → share).
fn report_shares(run: &str, probe: i64, dir: &Path) -> BTreeMap<String, BTreeMap<String, f64>> {
    let path = dir.join(format!("report-{probe}.html"));
    let path = path.to_str().unwrap();
    cli().ok(&["report", run, "--probe", &probe.to_string(), "--out", path]);
    let html = std::fs::read_to_string(path).unwrap();
    let attr = |tag: &str, name: &str| -> String {
        let key = format!("{name}=\"");
        let at = tag.find(&key).unwrap() + key.len();
        tag[at..at + tag[at..].find('"').unwrap()].to_owned()
    };
    let mut out = BTreeMap::new();
    for fig in html.split("<figure class=\"shares\"").skip(1) {
        let fig = &fig[..fig.find("</figure>").unwrap()];
        let layer = attr(fig, "data-layer");
        let bars: BTreeMap<String, f64> = fig
            .split("<li class=\"series-item")
            .skip(1)
            .map(|t| {
                let t = &t[..t.find('>').unwrap()];
                (
                    attr(t, "data-class"),
                    attr(t, "data-share").parse().unwrap(),
                )
            })
            .collect();
        out.insert(layer, bars);
    }
    out
}

/// Adam and AdamW in batch mode: every step's whole update is one record, the
/// records alone explain the refinement of every probe (Σ dot = ‖p‖² to
/// 1e-5, the residual below 1e-5 of ‖p‖²), and top_steps and
/// batch_member_influence equal sums computed here from the raw rows.
#[test]
fn batch_mode_adam_and_adamw_attributions_are_complete() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("adam", vec!["--optimizer", "adam", "--lr", "0.01"]),
        (
            "adamw",
            vec![
                "--optimizer",
                "adamw",
                "--lr",
                "0.01",
                "--weight-decay",
                "0.01",
            ],
        ),
    ] {
        let mut args = vec!["--mode", "batch"];
        args.extend(extra);
        let run = train(dir.path(), name, &args);
        let r = run.as_str();
        cli().ok(&["verify", r]);
        let info: Value = serde_json::from_str(&cli().ok(&["info", r, "--json"])).unwrap();
        assert_eq!(info["mode"], "batch");
        assert_eq!(info["optimizer"]["kind"], name);
        let steps = 2 * 1437usize.div_ceil(64);
        let per_step = &info["storage_per_step"];
        assert_eq!(per_step["steps"], steps);
        assert!(f(per_step, "bytes_per_step") > 0.0);
        assert!(
            cli()
                .ok(&["info", r])
                .contains("per step (updates and batches")
        );

        let ids: Vec<String> = PROBES.iter().map(i64::to_string).collect();
        cli().ok(&[
            "attribute",
            r,
            "--probes",
            &format!("ids:{}", ids.join(",")),
        ]);
        cli().ok(&["verify", r]);

        let norms = p_norms2(r);
        assert_eq!(norms.len(), 3 * PROBES.len());
        let rows = cli().sql_json(
            r,
            "SELECT layer, probe_id, step, epoch, instance_id, label, dot FROM contributions",
        );
        // (layer, probe) → (Σ dot of records, residual dot, records)
        let mut sums: BTreeMap<(String, i64), (f64, f64, usize)> = BTreeMap::new();
        // (layer, probe, step) → dot
        let mut by_step: BTreeMap<(String, i64, i64), f64> = BTreeMap::new();
        for row in &rows {
            assert_eq!(
                i(row, "instance_id"),
                None,
                "batch records have no instance"
            );
            let key = (s(row, "layer"), i(row, "probe_id").unwrap());
            let e = sums.entry(key.clone()).or_default();
            match i(row, "step") {
                Some(step) => {
                    e.0 += f(row, "dot");
                    e.2 += 1;
                    by_step.insert((key.0, key.1, step), f(row, "dot"));
                }
                None => e.1 += f(row, "dot"),
            }
        }
        for (key, p2) in &norms {
            let (records, residual, n) = sums[key];
            assert_eq!(n, steps, "{name} {key:?}: one row per step");
            let total = records + residual;
            println!(
                "{name} {key:?}: Σ dot {total:.6e}, ‖p‖² {p2:.6e}, residual share {:.2e}",
                residual / p2
            );
            assert!(
                (total - p2).abs() <= 1e-5 * p2,
                "{name} {key:?}: Σ dot {total} vs ‖p‖² {p2}"
            );
            assert!(
                (records - p2).abs() <= 1e-5 * p2,
                "{name} {key:?}: the records alone {records} vs ‖p‖² {p2}"
            );
        }

        // layer_summary, verify and the report tell the residual (the row
        // without a step) from the records (which in batch mode have no
        // instance id): the residual share is what completeness leaves,
        // ‖p‖² minus the records' Σ dot, computed here from the raw rows.
        let summary_ids = layer_summaries(r);
        for (key, p2) in &norms {
            let (records, _, n) = sums[key];
            let row = &summary_ids[key];
            let by_hand = (p2 - records) / p2;
            assert!(
                (f(row, "residual_share") - by_hand).abs() <= 1e-6,
                "{name} {key:?}: layer_summary residual share {} vs {by_hand:.3e} by hand",
                f(row, "residual_share")
            );
            assert!(f(row, "residual_share").abs() <= 1e-5, "{name} {key:?}");
            assert_eq!(i(row, "records"), Some(n as i64), "{name} {key:?}");
            assert!((f(row, "total_share") - 1.0).abs() <= 1e-5);
            // Without class-pure batches every batch is mixed.
            assert!((f(row, "mixed_batches_share") - records / p2).abs() <= 1e-9);
        }
        let worst = verify_residual_share(r);
        assert!(worst <= 1e-5, "{name}: verify's residual share {worst:e}");
        let epochs = cli().query_json(
            r,
            "class_shares_by_epoch",
            &[&format!("probe={}", PROBES[0])],
        );
        assert!(!epochs.is_empty());
        for row in &epochs {
            let want = if i(row, "epoch").is_none() {
                "residual"
            } else {
                "mixed batches"
            };
            assert_eq!(s(row, "source"), want, "{name}: {row}");
        }
        let bars = report_shares(r, PROBES[0], dir.path());
        for (layer, bars) in &bars {
            let p2 = norms[&(layer.clone(), PROBES[0])];
            let (records, _, _) = sums[&(layer.clone(), PROBES[0])];
            assert!(bars["residual"].abs() <= 1e-5, "{name} {layer}: {bars:?}");
            assert!(
                (bars["mixed"] - records / p2).abs() <= 1e-6,
                "{name} {layer}: {bars:?}"
            );
        }

        // top_steps: the steps by |dot|, influence = dot / ‖p‖.
        let probe = PROBES[0];
        let got = cli().query_json(r, "top_steps", &[&format!("probe={probe}"), "k=5"]);
        assert_eq!(got.len(), 3 * 5);
        for row in &got {
            let layer = s(row, "layer");
            let mut all: Vec<(i64, f64)> = by_step
                .iter()
                .filter(|((l, p, _), _)| *l == layer && *p == probe)
                .map(|((_, _, st), d)| (*st, *d))
                .collect();
            all.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0)));
            let rank = i(row, "rank_in_layer").unwrap() as usize;
            let (step, dot) = all[rank - 1];
            assert_eq!(i(row, "step"), Some(step), "{name} {layer} rank {rank}");
            let pn = norms[&(layer.clone(), probe)].sqrt();
            assert!((f(row, "influence") - dot / pn).abs() <= 1e-9 * (dot / pn).abs());
            assert_eq!(i(row, "records"), Some(1));
        }

        // batch_member_influence: each step's dot split evenly among its members.
        let members = cli().sql_json(r, "SELECT step, instance_id FROM batches");
        assert_eq!(members.len(), 2 * 1437);
        let mut size: BTreeMap<i64, f64> = BTreeMap::new();
        for m in &members {
            *size.entry(i(m, "step").unwrap()).or_default() += 1.0;
        }
        let got = cli().query_json(
            r,
            "batch_member_influence",
            &[&format!("probe={probe}"), "k=4"],
        );
        assert_eq!(got.len(), 3 * 4);
        for layer in ["fc1", "fc2", "fc3"] {
            let mut share: BTreeMap<i64, f64> = BTreeMap::new();
            for m in &members {
                let step = i(m, "step").unwrap();
                let dot = by_step[&(layer.to_owned(), probe, step)];
                *share.entry(i(m, "instance_id").unwrap()).or_default() += dot / size[&step];
            }
            let mut all: Vec<(i64, f64)> = share.into_iter().collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let pn = norms[&(layer.to_owned(), probe)].sqrt();
            let rows: Vec<&Value> = got.iter().filter(|r| s(r, "layer") == layer).collect();
            assert_eq!(rows.len(), 4);
            for (row, (id, dot)) in rows.iter().zip(&all) {
                assert_eq!(i(row, "instance_id"), Some(*id), "{name} {layer}");
                assert!((f(row, "influence") - dot / pn).abs() <= 1e-9 * (dot / pn).abs());
                assert_eq!(i(row, "batches"), Some(2), "one batch per epoch");
                assert!(s(row, "method").contains("even split"));
            }
        }
    }
}

/// Plain SGD, the same seed and class-pure batches in both modes: a batch's
/// update is the sum of its members' updates, so the class shares of the
/// batch-mode trace equal those of the instance-mode trace (to 1e-6 of
/// ‖p‖²), and batch mode has no mixed-batch row.
#[test]
fn class_pure_batches_give_the_same_class_shares_in_both_modes() {
    let dir = tempfile::tempdir().unwrap();
    let common = ["--class-pure-batches", "--lr", "0.1"];
    let inst = train(dir.path(), "instance", &common);
    let mut batch_args = vec!["--mode", "batch"];
    batch_args.extend(common);
    let batch = train(dir.path(), "batch", &batch_args);
    assert!(
        final_weights(&inst) == final_weights(&batch),
        "the same training in both modes"
    );
    let ids: Vec<String> = PROBES.iter().map(i64::to_string).collect();
    for run in [&inst, &batch] {
        cli().ok(&[
            "attribute",
            run,
            "--probes",
            &format!("ids:{}", ids.join(",")),
        ]);
    }
    // Every batch is of one class.
    assert!(
        cli()
            .sql_json(
                &batch,
                "SELECT step FROM batches GROUP BY step HAVING COUNT(DISTINCT label) > 1"
            )
            .is_empty()
    );
    let shares = |run: &str, probe: i64| -> BTreeMap<(String, Option<i64>, String), f64> {
        cli()
            .query_json(run, "class_shares", &[&format!("probe={probe}")])
            .iter()
            .map(|r| {
                (
                    (s(r, "layer"), i(r, "label"), s(r, "source")),
                    f(r, "share"),
                )
            })
            .collect()
    };
    let mut worst = 0.0f64;
    for probe in PROBES {
        let (a, b) = (shares(&inst, probe), shares(&batch, probe));
        let classes = |m: &BTreeMap<(String, Option<i64>, String), f64>| {
            m.keys()
                .filter(|k| k.2 == "class")
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(classes(&a), classes(&b), "probe {probe}");
        assert_eq!(classes(&a).len(), 3 * 10, "every class in every layer");
        assert!(
            !b.keys().any(|k| k.2 == "mixed batches"),
            "probe {probe}: {b:?}"
        );
        for key in classes(&a) {
            let d = (a[&key] - b[&key]).abs();
            worst = worst.max(d);
            assert!(
                d <= 1e-6,
                "probe {probe} {key:?}: instance mode {} vs batch mode {}",
                a[&key],
                b[&key]
            );
        }
    }
    println!("largest class-share difference between the modes: {worst:.2e}");
    // The residual of the same training is the same in both modes (plain
    // SGD: ~0), and class-pure batches leave no mixed share.
    let (a, b) = (layer_summaries(&inst), layer_summaries(&batch));
    assert_eq!(a.len(), 3 * PROBES.len());
    for (key, ra) in &a {
        let rb = &b[key];
        assert!(f(ra, "residual_share").abs() <= 1e-5, "{key:?}: {ra}");
        assert!(
            (f(ra, "residual_share") - f(rb, "residual_share")).abs() <= 1e-6,
            "{key:?}: instance mode {ra} vs batch mode {rb}"
        );
        assert_eq!(f(ra, "mixed_batches_share"), 0.0);
        assert_eq!(f(rb, "mixed_batches_share"), 0.0);
        assert!(
            i(ra, "records") > i(rb, "records"),
            "one record per example vs per batch"
        );
    }
}

/// Asserts that a command failed with one `error:` line on stderr (among
/// whatever else training printed) that names each of `words`.
fn refused_in_one_error_line(o: &std::process::Output, words: &[&str]) {
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    for w in words {
        assert!(lines[0].contains(w), "{w}: {err}");
    }
}

/// Adam takes betas, not SGD's momentum (in either mode); the error names
/// the flag. (Adam in instance mode is tests/adam.rs.)
#[test]
fn adam_with_momentum_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    for mode in ["instance", "batch"] {
        let o = cli().output(&[
            "train",
            "--optimizer",
            "adam",
            "--momentum",
            "0.9",
            "--mode",
            mode,
            "--out",
            out.to_str().unwrap(),
        ]);
        refused_in_one_error_line(&o, &["--momentum", "adam"]);
        assert!(!out.exists(), "nothing recorded");
    }
}

/// BatchNorm in training mode with class-pure batches: batch mode traces the
/// model around it, the class shares are exact (no mixed batch) and sum,
/// with the residual, to 1 in every traced layer; instance mode refuses the
/// model in one line that points to batch mode.
#[test]
fn batch_norm_with_class_pure_batches_has_exact_class_shares() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("refused");
    let o = cli().output(&["train", "--model", "cnn-bn", "--out", out.to_str().unwrap()]);
    refused_in_one_error_line(&o, &["--model", "--mode batch"]);

    let run = train(
        dir.path(),
        "bn",
        &[
            "--model",
            "cnn-bn",
            "--mode",
            "batch",
            "--class-pure-batches",
            "--optimizer",
            "adam",
            "--lr",
            "0.01",
        ],
    );
    cli().ok(&["verify", &run]);
    cli().ok(&["attribute", &run, "--probes", "ids:1437,1600"]);
    for probe in [1437, 1600] {
        let rows = cli().query_json(&run, "class_shares", &[&format!("probe={probe}")]);
        let mut total: BTreeMap<String, f64> = BTreeMap::new();
        for r in &rows {
            let source = s(r, "source");
            assert_ne!(source, "mixed batches", "{r}");
            if source == "residual" {
                assert!(f(r, "share").abs() < 1e-6, "{r}");
            }
            *total.entry(s(r, "layer")).or_default() += f(r, "share");
        }
        assert_eq!(
            total.keys().cloned().collect::<Vec<_>>(),
            ["conv1", "conv2", "fc"]
        );
        for (layer, t) in total {
            assert!(
                (t - 1.0).abs() < 1e-6,
                "probe {probe} {layer}: shares sum to {t}"
            );
        }
    }
}
