//! The factor route of ungrouped "patches" layers (factor records met with
//! probes through the factors): which route the cost model takes, a wide
//! ragged sequence layer against a brute force and the Gram route forced,
//! and attributions of written runs against the Gram route forced through
//! the kernel API, with completeness and self-only rows. (patches.rs and
//! ragged.rs run every case of theirs on both routes too.)
use crate::read;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reptrace_analyze::kernel::{Geometry, ProbeFeatures, RecordFeatures, Route};
use reptrace_analyze::probes::Probes;
use reptrace_analyze::records::Records;
use reptrace_analyze::{Options, ProbeSelection, attribute};
use reptrace_format::{
    Conv2dSpec, LinearSpec, Manifest, Mode, Module, PaddingMode, Storage, TracedLayer,
    displacement_scales,
};
use reptrace_testkit::models::{self, Conv};
use reptrace_testkit::synthetic::{self, L, Synth};
use std::collections::HashMap;
use std::path::Path;

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// `got` within `rel` of `want`, relative to `scale` or `|want|`.
fn close(what: &str, got: f64, want: f64, scale: f64, rel: f64) {
    let tol = rel * scale.max(want.abs()).max(1e-300);
    assert!(
        (got - want).abs() <= tol,
        "{what}: {got} against {want} (difference {})",
        got - want
    );
}

fn linear(inp: usize, out: usize, bias: bool, positions: usize, ragged: bool) -> LinearSpec {
    LinearSpec {
        positions,
        ragged,
        ..LinearSpec::new("seq", inp, out, bias)
    }
}

fn geometry(layer: TracedLayer<'_>) -> Geometry {
    Geometry::of(&layer, Mode::Instance).expect("geometry")
}

/// `q` probes of `positions` positions each of a linear layer.
fn linear_probes(rng: &mut ChaCha8Rng, positions: &[usize], inp: usize, out: usize) -> Probes {
    let mut probes = Probes::default();
    for (i, &n) in positions.iter().enumerate() {
        let (a, p) = (random(rng, n * inp), random(rng, n * out));
        probes.probe_id.push(i as i64);
        probes.instance_id.push(None);
        probes.label.push(0);
        probes.predicted.push(0);
        probes.p_norm.push(dot(&p, &p).sqrt());
        probes.push_lists(&a, &p);
    }
    probes
}

#[test]
fn the_route_follows_the_cost_model() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // A wide sequence layer met by few probes: the factor route.
    let wide = geometry(TracedLayer::Linear(&linear(256, 192, true, 16, false)));
    assert!(wide.has_factor_route());
    assert_eq!(wide.route(2, 16.0), Route::Factors);
    let probes = linear_probes(&mut rng, &[16, 16], 256, 192);
    let pf = ProbeFeatures::new(&wide, &probes).expect("probe features");
    assert_eq!(pf.route(), Route::Factors);
    // The model's arithmetic: Gram C·K'·T + C·K'² + Q·(K'² + C·K') against
    // factor Q·T·P̄·(K' + C + T).
    let (c, k, t) = (192.0, 257.0, 16.0);
    let gram = |q: f64| c * k * t + c * k * k + q * (k * k + c * k);
    let factor = |q: f64, p: f64| q * t * p * (k + c + t);
    for (q, p) in [(1, 1.0), (4, 16.0), (50, 16.0), (500, 16.0), (20, 200.0)] {
        let want = if factor(q as f64, p) < gram(q as f64) {
            Route::Factors
        } else {
            Route::Gram
        };
        assert_eq!(wide.route(q, p), want, "{q} probes of {p} positions");
    }
    // Long probes make the factor route dearer.
    assert_eq!(wide.route(20, 200.0), Route::Gram);

    // A narrow layer met by many probes: the Gram route.
    let narrow = geometry(TracedLayer::Linear(&linear(4, 3, true, 5, false)));
    assert_eq!(narrow.route(64, 5.0), Route::Gram);
    let probes = linear_probes(&mut rng, &[5; 64], 4, 3);
    let pf = ProbeFeatures::new(&narrow, &probes).expect("probe features");
    assert_eq!(pf.route(), Route::Gram);

    // No factor route: whole-update records, grouped convolutions, and the
    // one-position linear fast path.
    let full = LinearSpec {
        storage: Storage::Full,
        ..linear(256, 192, true, 16, false)
    };
    let grouped = Conv::new("g", 16, 16, [1, 12])
        .kernel([1, 3])
        .groups(2)
        .spec();
    let one = linear(256, 192, true, 1, false);
    for geom in [
        geometry(TracedLayer::Linear(&full)),
        geometry(TracedLayer::Conv2d(&grouped)),
        geometry(TracedLayer::Linear(&one)),
    ] {
        assert!(!geom.has_factor_route(), "{geom:?}");
        assert_eq!(geom.route(1, 1.0), Route::Gram, "{geom:?}");
        assert!(geom.factor_probe_len(4).is_none() && geom.factor_record_len().is_none());
    }
    // Batch-mode records are whole updates.
    let seq = linear(256, 192, true, 16, false);
    let batch = Geometry::of(&TracedLayer::Linear(&seq), Mode::Batch).expect("geometry");
    assert!(!batch.has_factor_route());

    // Memory: a factor-route probe holds P·(K + C) values and its share of
    // the work arrays (3·T·P); a record T·(K + C) + T².
    assert_eq!(wide.factor_probe_len(10), Some(10 * (256 + 192 + 3 * 16)));
    assert_eq!(wide.factor_record_len(), Some(16 * (256 + 192) + 16 * 16));
}

/// `[vec ΔW, Δb]` of a linear record (`u` T×in, `v` T×out) scaled by `s`.
fn linear_delta(inp: usize, out: usize, bias: bool, u: &[f64], v: &[f64], s: f64) -> Vec<f64> {
    let t = u.len() / inp;
    let mut d = vec![0.0; inp * out + if bias { out } else { 0 }];
    for k in 0..t {
        for o in 0..out {
            for i in 0..inp {
                d[o * inp + i] += s * v[k * out + o] * u[k * inp + i];
            }
            if bias {
                d[inp * out + o] += s * v[k * out + o];
            }
        }
    }
    d
}

/// `c = ΔW a + Δb` at every position of `a` (T×in).
fn linear_apply(inp: usize, out: usize, bias: bool, d: &[f64], a: &[f64]) -> Vec<f64> {
    let t = a.len() / inp;
    let mut c = vec![0.0; t * out];
    for k in 0..t {
        for o in 0..out {
            let mut z = if bias { d[inp * out + o] } else { 0.0 };
            for i in 0..inp {
                z += d[o * inp + i] * a[k * inp + i];
            }
            c[k * out + o] = z;
        }
    }
    c
}

#[test]
fn a_wide_ragged_sequence_layer_takes_the_factor_route_and_matches_brute_force() {
    let (inp, out) = (40, 24);
    for (bias, seed) in [(true, 11), (false, 12)] {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let geom = geometry(TracedLayer::Linear(&linear(inp, out, bias, 6, true)));
        let mut recs = Records::default();
        let mut deltas = Vec::new();
        let positions = [6, 0, 3, 9, 1, 6];
        let scales = random(&mut rng, positions.len());
        for (i, &n) in positions.iter().enumerate() {
            let (u, v) = (random(&mut rng, n * inp), random(&mut rng, n * out));
            recs.step.push(i as i64);
            recs.epoch.push(0);
            recs.instance_id.push(Some(i as i64));
            recs.label.push(None);
            deltas.push(linear_delta(inp, out, bias, &u, &v, scales[i]));
            recs.push_lists(&u, &v);
        }
        let probes = linear_probes(&mut rng, &[2, 7, 5], inp, out);
        let rows: Vec<usize> = (0..recs.len()).collect();
        let mut pairs = Vec::new();
        for route in [None, Some(Route::Gram)] {
            let pf = match route {
                None => ProbeFeatures::new(&geom, &probes),
                Some(r) => ProbeFeatures::with_route(&geom, &probes, r),
            }
            .expect("probe features");
            let rf = RecordFeatures::for_probes(&geom, &pf, &recs, &scales, &rows)
                .expect("record features");
            pairs.push((pf.route(), rf.all_pairs(&pf).expect("all pairs"), rf, pf));
        }
        assert_eq!(pairs[0].0, Route::Factors, "bias {bias}: the route taken");
        assert_eq!(pairs[1].0, Route::Gram);
        let ((_, (fd, fnorm), frf, fpf), (_, (gd, gnorm), _, _)) = (&pairs[0], &pairs[1]);
        for q in 0..probes.len() {
            let (a, p) = (probes.a(q), probes.p(q));
            for (r, d) in deltas.iter().enumerate() {
                let c = linear_apply(inp, out, bias, d, a);
                let (want_dot, want_norm) = (dot(&c, p), dot(&c, &c).sqrt());
                let scale = want_norm * probes.p_norm[q];
                let at = format!("bias {bias} probe {q} record {r}");
                close(&format!("{at}: dot"), fd[[q, r]], want_dot, scale, 1e-9);
                close(&format!("{at}: norm"), fnorm[[q, r]], want_norm, 0.0, 1e-9);
                close(
                    &format!("{at}: dot Gram"),
                    fd[[q, r]],
                    gd[[q, r]],
                    scale,
                    1e-9,
                );
                close(
                    &format!("{at}: norm Gram"),
                    fnorm[[q, r]],
                    gnorm[[q, r]],
                    0.0,
                    1e-9,
                );
                let (d1, n1) = frf.pair(fpf, r, q);
                close(&format!("{at}: pair dot"), d1, want_dot, scale, 1e-9);
                close(&format!("{at}: pair norm"), n1, want_norm, 0.0, 1e-9);
            }
        }
        // The record of no positions contributes nothing.
        assert!((0..probes.len()).all(|q| fd[[q, 1]] == 0.0 && fnorm[[q, 1]] == 0.0));
        // Features of different routes do not meet.
        let (_, _, grf, gpf) = &pairs[1];
        assert!(frf.all_pairs(gpf).is_err() && grf.all_pairs(fpf).is_err());
        assert!(frf.pair(gpf, 0, 0).0.is_nan());
    }
}

/// Key of a contribution row: (probe, step, instance).
type Key = (i64, i64, i64);

/// Every pair of layer `name` of `run` through the kernel API on `route`
/// forced (records and probes as stored, scales from the steps' rates).
fn kernel_pairs(run: &Path, name: &str, route: Route) -> HashMap<Key, (f64, f64)> {
    let m = Manifest::load(run).unwrap();
    let layer = m.model.traced_layers().find(|l| l.name() == name).unwrap();
    let geom = Geometry::of(&layer, m.mode).unwrap();
    let o = &m.optimizer;
    let step_scales = displacement_scales(&read::lrs(run), o.momentum, o.dampening, o.nesterov);
    let mut recs = Records::default();
    let mut scales = Vec::new();
    for up in read::updates(run).into_iter().filter(|u| u.layer == name) {
        recs.step.push(up.step);
        recs.epoch.push(up.epoch);
        recs.instance_id.push(Some(up.instance_id));
        recs.label.push(Some(up.label));
        recs.push_lists(&up.u, &up.v);
        scales.push(step_scales[up.step as usize]);
    }
    let mut probes = Probes::default();
    for p in read::probes(run).into_iter().filter(|p| p.layer == name) {
        probes.probe_id.push(p.probe_id);
        probes.instance_id.push(p.instance_id);
        probes.label.push(p.label);
        probes.predicted.push(p.predicted);
        probes.p_norm.push(p.p_norm);
        probes.push_lists(&p.a, &p.p);
    }
    assert_eq!(
        ProbeFeatures::new(&geom, &probes).unwrap().route(),
        Route::Factors,
        "{name}: the attribution's route"
    );
    let pf = ProbeFeatures::with_route(&geom, &probes, route).unwrap();
    let rows: Vec<usize> = (0..recs.len()).collect();
    let rf = RecordFeatures::for_probes(&geom, &pf, &recs, &scales, &rows).unwrap();
    let (dots, norms) = rf.all_pairs(&pf).unwrap();
    let mut out = HashMap::new();
    for ((q, r), d) in dots.indexed_iter() {
        let key = (
            probes.probe_id[q],
            recs.step[r],
            recs.instance_id[r].unwrap(),
        );
        out.insert(key, (*d, norms[[q, r]]));
    }
    out
}

/// The contribution rows of layer `name` against the Gram route forced
/// (1e-9 relative, a dot relative to `‖c‖ ‖p‖`); gives Σ dot per probe
/// with the residual row's.
fn against_gram(run: &Path, name: &str) -> HashMap<i64, f64> {
    let want = kernel_pairs(run, name, Route::Gram);
    let p_norm: HashMap<i64, f64> = read::probes(run)
        .into_iter()
        .filter(|p| p.layer == name)
        .map(|p| (p.probe_id, p.p_norm))
        .collect();
    let mut sums = HashMap::new();
    let mut checked = 0;
    for row in read::contributions(run).iter().filter(|r| r.layer == name) {
        *sums.entry(row.probe_id).or_insert(0.0) += row.dot;
        let Some(step) = row.step else { continue };
        let (d, n) = want[&(row.probe_id, step, row.instance_id.unwrap())];
        let at = format!("{name} probe {} step {step}", row.probe_id);
        close(
            &format!("{at}: dot"),
            row.dot,
            d,
            n * p_norm[&row.probe_id],
            1e-9,
        );
        close(&format!("{at}: norm"), row.norm, n, 0.0, 1e-9);
        checked += 1;
    }
    assert_eq!(checked, want.len(), "{name}: rows checked");
    sums
}

#[test]
fn attribution_of_a_wide_sequence_layer_matches_the_gram_route() {
    let modules = vec![
        Module::Linear(linear(48, 40, true, 6, false)),
        Module::Conv2d(Conv2dSpec {
            padding_mode: PaddingMode::Reflect,
            ..Conv::new("conv", 12, 16, [1, 10])
                .kernel([1, 3])
                .padding([0, 1])
                .spec()
        }),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    synthetic::random_run(&run, &models::model("wide", vec![48], modules), 40, 3);
    let options = Options {
        probes: ProbeSelection::All,
        ..Options::default()
    };
    attribute(&run, &options, &mut |_| {}).unwrap();
    // The run's final weights are its first: Σ dot of the records and the
    // residual is ⟨(W_T − W_0) ⊛ a, p⟩ = 0.
    for name in ["seq", "conv"] {
        let sums = against_gram(&run, name);
        let scale: f64 = read::contributions(&run)
            .iter()
            .filter(|r| r.layer == name)
            .map(|r| r.dot.abs())
            .sum();
        assert_eq!(sums.len(), 3, "{name}: probes");
        for (probe, total) in sums {
            close(
                &format!("{name} probe {probe}: Σ dot"),
                total,
                0.0,
                scale,
                1e-9,
            );
        }
    }
}

#[test]
fn attribution_on_the_factor_route_is_complete_and_self_only_agrees() {
    // A wide ungrouped conv, trained by the simulated SGD: p is the
    // refinement, Σ dot = ‖p‖².
    let conv = L::Conv {
        name: "wide",
        c_in: 16,
        c_out: 16,
        k: [1, 3],
        stride: [1, 1],
        pad: [0, 0],
        dil: [1, 1],
        in_hw: [1, 8],
        bias: true,
        storage: Storage::Factors,
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    Synth {
        layers: vec![conv],
        ..Synth::default()
    }
    .write(&run);
    let all = Options {
        probes: ProbeSelection::All,
        ..Options::default()
    };
    attribute(&run, &all, &mut |_| {}).unwrap();
    let sums = against_gram(&run, "wide");
    let probes = read::probes(&run);
    assert_eq!(sums.len(), probes.len());
    for p in &probes {
        let pn2 = p.p_norm * p.p_norm;
        close(
            &format!("probe {}: Σ dot", p.probe_id),
            sums[&p.probe_id],
            pn2,
            pn2,
            1e-9,
        );
    }
    // Self-only rows (one pair at a time) are the full rows of each
    // training probe with its own records.
    let key = |r: &read::Contribution| (r.probe_id, r.step, r.instance_id);
    let full: HashMap<_, _> = read::contributions(&run)
        .into_iter()
        .map(|r| (key(&r), r))
        .collect();
    let own = Options {
        probes: ProbeSelection::Train,
        self_only: true,
        ..Options::default()
    };
    attribute(&run, &own, &mut |_| {}).unwrap();
    let rows = read::contributions(&run);
    let mut checked = 0;
    for r in rows.iter().filter(|r| r.step.is_some()) {
        let p = probes.iter().find(|p| p.probe_id == r.probe_id).unwrap();
        assert_eq!(r.instance_id, p.instance_id, "own records only");
        let f = &full[&key(r)];
        close("self-only dot", r.dot, f.dot, f.norm * p.p_norm, 1e-9);
        close("self-only norm", r.norm, f.norm, 0.0, 1e-9);
        checked += 1;
    }
    assert!(checked > 0, "self-only rows");
}
