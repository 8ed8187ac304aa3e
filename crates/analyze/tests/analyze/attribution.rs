//! Contributions against an independent brute force, completeness, options.
use crate::read::{self, Contribution, Probe};
use reptrace_analyze::attribution::Report;
use reptrace_analyze::{Options, ProbeSelection, StepRange, attribute};
use reptrace_format::{Dtype, Manifest, Optimizer, Storage, displacement_scales};
use reptrace_testkit::synthetic::{Built, Synth, Wb, conv, delta_from_factors, forward, linear};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `synth` written to `<tmp>/run`; the run lives as long as the directory.
fn written(synth: &Synth) -> (tempfile::TempDir, PathBuf, Built) {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let built = synth.write(&run);
    (tmp, run, built)
}

fn all() -> Options {
    Options {
        probes: ProbeSelection::All,
        ..Options::default()
    }
}

fn momentum(mu: f64, dampening: f64, nesterov: bool) -> Optimizer {
    Optimizer {
        momentum: mu,
        dampening,
        nesterov,
        ..Optimizer::sgd(0.1)
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// Every contribution row equals a brute-force f64 computation from the
/// stored factors and probes: ΔW built explicitly, c by a naive convolution.
fn check_brute_force(run: &Path, synth: &Synth) {
    let m = Manifest::load(run).unwrap();
    let o = &m.optimizer;
    let scales = displacement_scales(&read::lrs(run), o.momentum, o.dampening, o.nesterov);
    let layers: HashMap<&str, _> = synth.layers.iter().map(|l| (l.name(), l.clone())).collect();
    let probes = read::probes(run);
    let updates = read::updates(run);
    let rows = read::contributions(run);
    type Key = (String, i64, Option<i64>, Option<i64>);
    let index: HashMap<Key, &Contribution> = rows
        .iter()
        .map(|r| ((r.layer.clone(), r.probe_id, r.step, r.instance_id), r))
        .collect();
    assert_eq!(index.len(), rows.len(), "duplicate contribution rows");
    let mut checked = 0;
    for p in &probes {
        let layer = &layers[p.layer.as_str()];
        let pn = norm(&p.p);
        let mut n = 0;
        for up in updates.iter().filter(|u| u.layer == p.layer) {
            let s = scales[up.step as usize];
            let d = delta_from_factors(layer, &up.u, &up.v);
            let c = forward(layer, &d.w, &d.b, &p.a);
            let (dot_ref, norm_ref) = (s * dot(&c, &p.p), s.abs() * norm(&c));
            let row = index
                .get(&(
                    p.layer.clone(),
                    p.probe_id,
                    Some(up.step),
                    Some(up.instance_id),
                ))
                .unwrap_or_else(|| {
                    panic!(
                        "no row for probe {} step {} instance {}",
                        p.probe_id, up.step, up.instance_id
                    )
                });
            assert!(
                (row.dot - dot_ref).abs() <= 1e-6 * pn * pn,
                "{} probe {} step {} inst {}: dot {} vs {}",
                p.layer,
                p.probe_id,
                up.step,
                up.instance_id,
                row.dot,
                dot_ref
            );
            assert!(
                (row.norm - norm_ref).abs() <= 1e-6 * pn,
                "{} probe {}: norm {} vs {}",
                p.layer,
                p.probe_id,
                row.norm,
                norm_ref
            );
            let cos_ref = if norm_ref * pn > 0.0 {
                dot_ref / (norm_ref * pn)
            } else {
                0.0
            };
            assert!(
                (row.cosine - cos_ref).abs() <= 1e-6,
                "cosine {} vs {cos_ref}",
                row.cosine
            );
            assert_eq!((row.epoch, row.label), (Some(up.epoch), Some(up.label)));
            assert!(row.cosine.abs() <= 1.0 + 1e-12);
            n += 1;
            checked += 1;
        }
        // Every record plus one residual row.
        let count = rows
            .iter()
            .filter(|r| r.layer == p.layer && r.probe_id == p.probe_id)
            .count();
        assert_eq!(count, n + 1, "rows of probe {} in {}", p.probe_id, p.layer);
    }
    assert!(checked > 100, "only {checked} rows checked");
}

/// Writes `synth`, attributes it with `options` and checks every row by brute force.
fn brute_force(synth: &Synth, options: &Options) -> Report {
    let (_tmp, run, _) = written(synth);
    let report = attribute(&run, options, &mut |_| {}).unwrap();
    check_brute_force(&run, synth);
    report
}

#[test]
fn brute_force_linear_plain_sgd() {
    brute_force(&Synth::default(), &all());
}

#[test]
fn brute_force_conv_factors_momentum_f16() {
    let synth = Synth {
        layers: vec![conv("c1", Storage::Factors), linear("fc", 4, 3, true)],
        optimizer: momentum(0.9, 0.1, false),
        dtype: Dtype::F16,
        ..Synth::default()
    };
    // Small batches and a tiny memory budget: several batches and probe passes.
    let options = Options {
        batch_rows: Some(7),
        memory_budget: 6_000,
        ..all()
    };
    let report = brute_force(&synth, &options);
    assert!(
        report.layers.iter().any(|l| l.passes > 1),
        "{:?}",
        report.layers
    );
}

#[test]
fn brute_force_conv_full_nesterov() {
    let synth = Synth {
        layers: vec![conv("c1", Storage::Full)],
        optimizer: momentum(0.8, 0.0, true),
        ..Synth::default()
    };
    brute_force(&synth, &all());
}

/// Σ dot per probe and layer, and the residual row's dot.
fn sums(rows: &[Contribution]) -> HashMap<(String, i64), (f64, f64)> {
    let mut out: HashMap<(String, i64), (f64, f64)> = HashMap::new();
    for r in rows {
        let e = out.entry((r.layer.clone(), r.probe_id)).or_default();
        e.0 += r.dot;
        if r.instance_id.is_none() {
            assert!(r.step.is_none() && r.epoch.is_none() && r.label.is_none());
            e.1 += r.dot;
        }
    }
    out
}

/// Checks Σ dot = ‖p‖² for every attributed probe of `run` (`case` names it in
/// messages); gives each probe's residual dot with its ‖p‖².
fn completeness(run: &Path, case: &str) -> Vec<(f64, f64)> {
    let probes = read::probes(run);
    let s = sums(&read::contributions(run));
    assert_eq!(s.len(), probes.len(), "{case}");
    probes
        .iter()
        .map(|p| {
            let (total, residual) = s[&(p.layer.clone(), p.probe_id)];
            let pn2 = p.p_norm * p.p_norm;
            assert!(
                (total - pn2).abs() <= 1e-9 * pn2,
                "{case}: Σ dot {total} vs ‖p‖² {pn2}"
            );
            (residual, pn2)
        })
        .collect()
}

#[test]
fn completeness_without_decay() {
    for (i, optimizer) in [
        Optimizer::sgd(0.1),
        momentum(0.9, 0.0, false),
        momentum(0.7, 0.2, true),
    ]
    .into_iter()
    .enumerate()
    {
        let (_tmp, run, _) = written(&Synth {
            layers: vec![conv("c1", Storage::Factors), linear("fc", 4, 3, true)],
            optimizer,
            seed: 11 + i as u64,
            ..Synth::default()
        });
        attribute(&run, &all(), &mut |_| {}).unwrap();
        for (residual, pn2) in completeness(&run, &format!("case {i}")) {
            // The final weights are the f32 rounding of the exact sum: tiny residual.
            assert!(
                residual.abs() <= 1e-6 * pn2,
                "case {i}: residual {residual} vs ‖p‖² {pn2}"
            );
        }
    }
}

#[test]
fn completeness_with_decay_goes_to_the_residual() {
    let synth = Synth {
        layers: vec![linear("fc1", 5, 4, true), conv("c1", Storage::Full)],
        optimizer: Optimizer {
            weight_decay: 0.05,
            ..momentum(0.5, 0.0, false)
        },
        ..Synth::default()
    };
    let (_tmp, run, built) = written(&synth);
    let report = attribute(&run, &all(), &mut |_| {}).unwrap();
    let mut largest_residual = 0.0f64;
    for (residual, pn2) in completeness(&run, "decay") {
        largest_residual = largest_residual.max((residual / pn2).abs());
    }
    let rows = read::contributions(&run);
    let probes = read::probes(&run);
    assert!(
        largest_residual > 1e-3,
        "decay left no residual: {largest_residual}"
    );

    // The residual row equals c = R ⊛ a + r_b with R built by brute force.
    let m = Manifest::load(&run).unwrap();
    let o = &m.optimizer;
    let scales = displacement_scales(&read::lrs(&run), o.momentum, o.dampening, o.nesterov);
    for l in &synth.layers {
        let mut r = Wb {
            w: built.wt[l.name()]
                .w
                .iter()
                .zip(&built.w0[l.name()].w)
                .map(|(a, b)| a - b)
                .collect(),
            b: built.wt[l.name()]
                .b
                .iter()
                .zip(&built.w0[l.name()].b)
                .map(|(a, b)| a - b)
                .collect(),
        };
        for up in read::updates(&run).iter().filter(|u| u.layer == l.name()) {
            let d = delta_from_factors(l, &up.u, &up.v);
            let s = scales[up.step as usize];
            r.w.iter_mut().zip(&d.w).for_each(|(r, d)| *r -= s * d);
            r.b.iter_mut().zip(&d.b).for_each(|(r, d)| *r -= s * d);
        }
        let lr = report.layers.iter().find(|x| x.layer == l.name()).unwrap();
        assert!((lr.residual_norm - (norm(&r.w).powi(2) + norm(&r.b).powi(2)).sqrt()).abs() < 1e-9);
        for p in probes.iter().filter(|p| p.layer == l.name()) {
            let c = forward(l, &r.w, &r.b, &p.a);
            let row = rows
                .iter()
                .find(|x| x.layer == p.layer && x.probe_id == p.probe_id && x.instance_id.is_none())
                .unwrap();
            let pn2 = p.p_norm * p.p_norm;
            assert!((row.dot - dot(&c, &p.p)).abs() <= 1e-9 * pn2);
            assert!((row.norm - norm(&c)).abs() <= 1e-9 * p.p_norm);
        }
    }
}

fn probe_ids(rows: &[Contribution]) -> Vec<i64> {
    let mut ids: Vec<i64> = rows.iter().map(|r| r.probe_id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[test]
fn probe_selection_layers_and_errors() {
    let (_tmp, run, _) = written(&Synth::default());
    // Default: test probes (instances 20..25 → probes 120..125).
    attribute(&run, &Options::default(), &mut |_| {}).unwrap();
    assert_eq!(
        probe_ids(&read::contributions(&run)),
        (120..125).collect::<Vec<_>>()
    );
    let train = Options {
        probes: ProbeSelection::Train,
        layers: vec!["fc2".into()],
        ..Options::default()
    };
    attribute(&run, &train, &mut |_| {}).unwrap();
    let rows = read::contributions(&run);
    assert_eq!(probe_ids(&rows), vec![100, 101, 102]);
    assert!(rows.iter().all(|r| r.layer == "fc2"));
    let ids = Options {
        probes: "ids:120,101".parse().unwrap(),
        ..Options::default()
    };
    attribute(&run, &ids, &mut |_| {}).unwrap();
    assert_eq!(probe_ids(&read::contributions(&run)), vec![101, 120]);

    let err = |o: Options| attribute(&run, &o, &mut |_| {}).unwrap_err().to_string();
    let e = err(Options {
        probes: ProbeSelection::Ids(vec![999]),
        ..Options::default()
    });
    assert!(
        e.contains("probe 999 was not recorded for layer fc1"),
        "{e}"
    );
    let e = err(Options {
        layers: vec!["nope".into()],
        ..Options::default()
    });
    assert!(
        e.contains("unknown layer \"nope\" (traced layers: fc1, fc2)"),
        "{e}"
    );
    assert!("ids:1,x".parse::<ProbeSelection>().is_err());
    assert!("5..2".parse::<StepRange>().is_err());
    // A failed attribution leaves the previous one in place.
    assert_eq!(probe_ids(&read::contributions(&run)), vec![101, 120]);
}

#[test]
fn steps_self_only_and_additions() {
    let (_tmp, run, _) = written(&Synth::default());
    attribute(&run, &all(), &mut |_| {}).unwrap();
    let full = read::contributions(&run);
    let first_files: Vec<String> = Manifest::load(&run)
        .unwrap()
        .attributions
        .last()
        .unwrap()
        .files
        .iter()
        .map(|f| f.path.clone())
        .collect();
    let key = |r: &Contribution| (r.layer.clone(), r.probe_id, r.step, r.instance_id);
    let full_index: HashMap<_, &Contribution> = full.iter().map(|r| (key(r), r)).collect();

    // Steps 2..=5: those records, and the same residual rows as the full attribution.
    let mut last_progress = None;
    let steps = Options {
        steps: Some("2..5".parse().unwrap()),
        ..all()
    };
    attribute(&run, &steps, &mut |p| last_progress = Some(p.clone())).unwrap();
    let p = last_progress.unwrap();
    assert_eq!(p.records_done, p.records_total);
    let m = Manifest::load(&run).unwrap();
    assert_eq!(
        m.attributions.len(),
        2,
        "a step range is added beside the full one"
    );
    let attr = m.attributions.last().unwrap();
    assert_eq!(attr.steps, Some([2, 5]));
    for f in &first_files {
        assert!(run.join(f).exists(), "earlier attribution file {f} kept");
    }
    for f in &attr.files {
        assert!(run.join(&f.path).exists());
    }
    let rows = read::contributions(&run);
    assert!(
        rows.iter()
            .all(|r| r.step.is_none_or(|s| (2..=5).contains(&s)))
    );
    assert!(rows.iter().any(|r| r.step == Some(2)) && rows.iter().any(|r| r.step == Some(5)));
    for r in &rows {
        let f = full_index[&key(r)];
        assert!((r.dot - f.dot).abs() <= 1e-12 * (1.0 + f.dot.abs()));
    }
    assert_eq!(
        rows.len(),
        full.iter()
            .filter(|r| r.step.is_none_or(|s| (2..=5).contains(&s)))
            .count()
    );

    // Self-only: each training probe with its own records only.
    let own = Options {
        probes: ProbeSelection::Train,
        self_only: true,
        ..Options::default()
    };
    attribute(&run, &own, &mut |_| {}).unwrap();
    let probes: HashMap<(String, i64), Probe> = read::probes(&run)
        .into_iter()
        .map(|p| ((p.layer.clone(), p.probe_id), p))
        .collect();
    let rows = read::contributions(&run);
    assert!(!rows.is_empty());
    for r in &rows {
        let p = &probes[&(r.layer.clone(), r.probe_id)];
        assert!(
            r.instance_id.is_none() || r.instance_id == p.instance_id,
            "{r:?}"
        );
        let f = full_index[&key(r)];
        assert!((r.dot - f.dot).abs() <= 1e-12 * (1.0 + f.dot.abs()));
    }
    let expected = full
        .iter()
        .filter(|r| {
            let p = &probes[&(r.layer.clone(), r.probe_id)];
            p.instance_id.is_some_and(|i| i < 20)
                && (r.instance_id.is_none() || r.instance_id == p.instance_id)
        })
        .count();
    assert_eq!(rows.len(), expected);
    let m = Manifest::load(&run).unwrap();
    assert!(m.attributions.last().unwrap().self_only);
    assert_eq!(m.attributions.len(), 3);

    // The full attribution again covers the first: it replaces it (and its
    // files go); the partial ones stay.
    attribute(&run, &all(), &mut |_| {}).unwrap();
    let m = Manifest::load(&run).unwrap();
    assert_eq!(m.attributions.len(), 3);
    assert!(
        m.attributions[..2]
            .iter()
            .all(|a| a.steps.is_some() || a.self_only)
    );
    for f in &first_files {
        assert!(
            !run.join(f).exists(),
            "replaced attribution file {f} deleted"
        );
    }
    let again = read::contributions(&run);
    assert_eq!(again.len(), full.len());
}
