//! `verify`: integrity and completeness checks pass on good runs and fail on broken ones.
use reptrace_analyze::verify::{Options, Report, Status, verify};
use reptrace_analyze::{ProbeSelection, attribute};
use reptrace_format::{Dtype, Manifest, Optimizer, Storage, Table};
use reptrace_testkit::synthetic::{Synth, conv, linear};

fn check<'a>(r: &'a Report, name: &str) -> &'a reptrace_analyze::verify::Check {
    r.checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name}: {:#?}", r.checks))
}

fn attribute_all(run: &std::path::Path) {
    let o = reptrace_analyze::Options {
        probes: ProbeSelection::All,
        ..Default::default()
    };
    attribute(run, &o, &mut |_| {}).unwrap();
}

#[test]
fn good_runs_pass() {
    for (i, synth) in [
        Synth::default(),
        // f16 factors with momentum: the rounding bound must cover the residual.
        Synth {
            layers: vec![conv("c1", Storage::Factors), linear("fc", 4, 3, true)],
            dtype: Dtype::F16,
            optimizer: Optimizer {
                momentum: 0.9,
                ..Optimizer::sgd(0.1)
            },
            ..Synth::default()
        },
    ]
    .into_iter()
    .enumerate()
    {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        synth.write(&run);
        let r = verify(&run, &Options::default()).unwrap();
        assert!(r.passed(), "case {i}: {:#?}", r.checks);
        assert_eq!(check(&r, "completeness: attribution").status, Status::Skip);
        assert_eq!(check(&r, "integrity: stray files").status, Status::Pass);
        let w = check(
            &r,
            &format!("completeness: {} weights", synth.layers[0].name()),
        );
        assert_eq!(w.status, Status::Pass);
        if synth.dtype == Dtype::F16 {
            // f16 rounding is visible, and more than the f32 tolerance.
            assert!(w.value.unwrap() > 1e-5, "{w:?}");
            assert!(w.tolerance.unwrap() > w.value.unwrap());
        } else {
            assert!(w.value.unwrap() < 1e-6, "{w:?}");
        }
        attribute_all(&run);
        let r = verify(&run, &Options::default()).unwrap();
        assert!(r.passed(), "case {i}: {:#?}", r.checks);
        let a = check(&r, "completeness: attribution");
        assert_eq!(a.status, Status::Pass, "{a:?}");
        assert!(a.value.unwrap() < 1e-9);
        assert_eq!(check(&r, "integrity: contributions").status, Status::Pass);
    }
}

#[test]
fn decay_is_reported_not_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    Synth {
        optimizer: Optimizer {
            weight_decay: 0.05,
            ..Optimizer::sgd(0.1)
        },
        ..Synth::default()
    }
    .write(&run);
    attribute_all(&run);
    let r = verify(&run, &Options::default()).unwrap();
    assert!(r.passed(), "{:#?}", r.checks);
    let w = check(&r, "completeness: fc1 weights");
    assert_eq!(w.status, Status::Warn, "{w:?}");
    assert!(w.value.unwrap() > 1e-3);
    assert_eq!(check(&r, "completeness: attribution").status, Status::Pass);
}

#[test]
fn lost_records_and_damaged_files_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    Synth::default().write(&run);
    // A stray temporary file is only a warning.
    std::fs::write(
        run.join("updates/layer=fc1/.part-000009.parquet.tmp"),
        b"partial",
    )
    .unwrap();
    let r = verify(&run, &Options::default()).unwrap();
    assert!(r.passed());
    assert_eq!(check(&r, "integrity: stray files").status, Status::Warn);

    // Lose the fc1 records of one commit: the manifest no longer lists them.
    let mut m = Manifest::load(&run).unwrap();
    let commit = m
        .commits
        .iter_mut()
        .find(|c| c.files.iter().any(|f| f.layer.as_deref() == Some("fc1")))
        .unwrap();
    commit
        .files
        .retain(|f| !(f.table == "updates" && f.layer.as_deref() == Some("fc1")));
    std::fs::write(run.join("manifest.json"), m.to_json()).unwrap();
    let r = verify(&run, &Options::default()).unwrap();
    assert!(!r.passed());
    assert_eq!(check(&r, "completeness: fc1 weights").status, Status::Fail);
    assert_eq!(check(&r, "completeness: fc2 weights").status, Status::Pass);

    // Truncate a committed file.
    let tmp2 = tempfile::tempdir().unwrap();
    let run2 = tmp2.path().join("run");
    Synth::default().write(&run2);
    let m = Manifest::load(&run2).unwrap();
    let f = &m.files(Table::Steps)[0];
    let path = run2.join(&f.path);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let r = verify(&run2, &Options::default()).unwrap();
    let c = check(&r, "integrity: steps");
    assert_eq!(c.status, Status::Fail);
    assert!(c.detail.contains(&f.path), "{c:?}");
}

/// The replay reports its progress per traced layer, ending at every
/// committed record of the layer (counted here from the manifest).
#[test]
fn verify_reports_replay_progress_per_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let synth = Synth {
        layers: vec![conv("c1", Storage::Factors), linear("fc", 4, 3, true)],
        ..Synth::default()
    };
    synth.write(&run);
    let m = Manifest::load(&run).unwrap();
    let mut last: std::collections::BTreeMap<String, (u64, u64, usize)> = Default::default();
    let mut calls = 0;
    let r = reptrace_analyze::verify::verify_with_progress(&run, &Options::default(), &mut |p| {
        calls += 1;
        assert_eq!(p.layers, 2);
        let prev = last.get(&p.layer).map_or(0, |l| l.0);
        assert!(p.records_done >= prev, "progress goes forward");
        last.insert(
            p.layer.clone(),
            (p.records_done, p.records_total, p.layer_index),
        );
    })
    .unwrap();
    assert!(r.passed(), "{:#?}", r.checks);
    assert!(calls >= 4, "a start and an end per layer at least");
    for (i, layer) in ["c1", "fc"].into_iter().enumerate() {
        let rows: u64 = m
            .files(Table::Updates)
            .iter()
            .filter(|f| f.layer.as_deref() == Some(layer))
            .map(|f| f.rows)
            .sum();
        assert!(rows > 0);
        assert_eq!(last[layer], (rows, rows, i), "{layer}");
    }
}
