//! Ragged layers (format 9): records and probes that hold their own number
//! of positions, through every entry point of the kernel, against (a) a
//! plain brute force (ΔW, c, ⟨c, p⟩ and ‖c‖ by loops) and (b) the same
//! records zero-padded to a fixed T under the layer's non-ragged geometry.
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reptrace_analyze::kernel::{
    self, Geometry, Patches, ProbeFeatures, RecordFeatures, Route, patches::Layout,
};
use reptrace_analyze::probes::Probes;
use reptrace_analyze::records::Records;
use reptrace_format::kinds::embedding::id_digits;
use reptrace_format::{EmbeddingSpec, LinearSpec, Mode, NormSpec, Storage, TracedLayer};

/// Positions of the records: one with none, one past the spec's T.
const RECORD_POSITIONS: [usize; 5] = [2, 0, 1, 5, 3];
/// Positions of the probes (at least one each).
const PROBE_POSITIONS: [usize; 4] = [1, 4, 2, 3];
/// The spec's T (the first step's length: an estimate only).
const T: usize = 3;
/// The fixed length records are padded to, and (b)'s probes hold.
const T_PAD: usize = 5;

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

fn close(what: &str, got: f64, want: f64, scale: f64, rel: f64) {
    let tol = rel * scale.max(want.abs()).max(1e-300);
    assert!(
        (got - want).abs() <= tol,
        "{what}: {got} against {want} (difference {})",
        got - want
    );
}

/// Records holding `lists` (`u`, `v` per record).
fn records(lists: &[(Vec<f64>, Vec<f64>)]) -> Records {
    let mut recs = Records::default();
    for (i, (u, v)) in lists.iter().enumerate() {
        recs.step.push(i as i64);
        recs.epoch.push(0);
        recs.instance_id.push(Some(10 + i as i64));
        recs.label.push(None);
        recs.push_lists(u, v);
    }
    recs
}

/// Probes holding `lists` (`a`, `p` per probe).
fn probes(lists: &[(Vec<f64>, Vec<f64>)]) -> Probes {
    let mut probes = Probes::default();
    for (i, (a, p)) in lists.iter().enumerate() {
        probes.probe_id.push(i as i64);
        probes.instance_id.push(None);
        probes.label.push(0);
        probes.predicted.push(0);
        probes.p_norm.push(dot(p, p).sqrt());
        probes.push_lists(a, p);
    }
    probes
}

/// The output `c` of an update `[vec ΔW, Δb]` applied to a probe's `a`.
type Apply = dyn Fn(&[f64], &[f64]) -> Vec<f64>;

/// What a layer's brute force knows: each record's scaled `[vec ΔW, Δb]`,
/// and how an update applies to a probe.
struct Brute<'a> {
    deltas: Vec<Vec<f64>>,
    apply: &'a Apply,
}

/// Every entry point of the kernel on `recs` and `probes` against the
/// brute force, the pairs on the route [`ProbeFeatures::new`] takes and
/// (a layer with the factor route) on each route forced, which agree to
/// 1e-9 relative; returns `(dot, norm)` of every pair (probe-major) on the
/// route taken.
fn check(
    name: &str,
    geom: &Geometry,
    recs: &Records,
    scales: &[f64],
    probes: &Probes,
    brute: &Brute<'_>,
    rng: &mut ChaCha8Rng,
) -> Pairs {
    let rows: Vec<usize> = (0..recs.len()).collect();
    let mut routes = vec![None];
    if geom.has_factor_route() {
        routes.extend([Some(Route::Gram), Some(Route::Factors)]);
    }
    let mut on_route = Vec::new();
    for route in routes {
        let name = format!("{name} ({route:?})");
        let pf = match route {
            None => ProbeFeatures::new(geom, probes),
            Some(route) => ProbeFeatures::with_route(geom, probes, route),
        }
        .expect("probe features");
        assert!(route.is_none_or(|r| r == pf.route()), "{name}: route");
        let rf =
            RecordFeatures::for_probes(geom, &pf, recs, scales, &rows).expect("record features");
        let (dots, norms) = rf.all_pairs(&pf).expect("all pairs");
        assert_eq!(dots.dim(), (probes.len(), recs.len()), "{name}: pairs");
        for q in 0..probes.len() {
            let (a, p) = (probes.a(q), probes.p(q));
            for (r, d) in brute.deltas.iter().enumerate() {
                let c = (brute.apply)(d, a);
                assert_eq!(c.len(), p.len(), "{name}: c of probe {q}");
                let (want_dot, want_norm) = (dot(&c, p), dot(&c, &c).sqrt());
                let scale = want_norm * dot(p, p).sqrt();
                let at = format!("{name}: probe {q} record {r}");
                close(&format!("{at} dot"), dots[[q, r]], want_dot, scale, 1e-9);
                close(&format!("{at} norm"), norms[[q, r]], want_norm, 0.0, 1e-9);
                let (d1, n1) = rf.pair(&pf, r, q);
                close(&format!("{at} pair dot"), d1, want_dot, scale, 1e-9);
                close(&format!("{at} pair norm"), n1, want_norm, 0.0, 1e-9);
            }
        }
        on_route.push((pf.route(), (dots, norms)));
    }
    // The factor route against the Gram route forced.
    if let [_, (_, gram), (_, factors)] = &on_route[..] {
        agree_to(name, probes, factors, gram, 1e-9, "factor route");
    }
    let (_, (dots, norms)) = on_route.swap_remove(0);
    let wl = geom.weight_len();
    // The deltas of a subset, in its order (the record without positions
    // among them).
    let some = [3, 1, 0];
    let got = kernel::deltas(geom, recs, scales, &some).expect("deltas");
    for (k, &r) in some.iter().enumerate() {
        for (i, want) in brute.deltas[r].iter().enumerate() {
            close(
                &format!("{name}: delta {r}[{i}]"),
                got[[k, i]],
                *want,
                1.0,
                1e-9,
            );
        }
    }
    let start = random(rng, geom.delta_len());
    let mut sum = start.clone();
    kernel::accumulate(geom, recs, scales, &mut sum).expect("accumulate");
    for (i, got) in sum.iter().enumerate() {
        let want = start[i] + brute.deltas.iter().map(|d| d[i]).sum::<f64>();
        close(&format!("{name}: accumulate [{i}]"), *got, want, 1.0, 1e-9);
    }
    let change = random(rng, geom.delta_len());
    let split = kernel::split_delta(geom, &change);
    assert_eq!(split.weight.len(), wl, "{name}: split");
    for q in 0..probes.len() {
        let (a, p) = (probes.a(q), probes.p(q));
        let c = (brute.apply)(&change, a);
        let (d, n) = kernel::direct(geom, &split, a, p).expect("direct");
        let want_norm = dot(&c, &c).sqrt();
        let scale = want_norm * dot(p, p).sqrt();
        close(
            &format!("{name}: direct dot {q}"),
            d,
            dot(&c, p),
            scale,
            1e-9,
        );
        close(&format!("{name}: direct norm {q}"), n, want_norm, 0.0, 1e-9);
    }
    (dots, norms)
}

type Pairs = (Array2<f64>, Array2<f64>);

/// The pairs of the ragged records and of the same records zero-padded
/// (under the non-ragged geometry) agree to 1e-12 relative (a dot relative
/// to `‖c‖ ‖p‖`).
fn agree(name: &str, probes: &Probes, ragged: &Pairs, padded: &Pairs) {
    agree_to(name, probes, ragged, padded, 1e-12, "padded");
}

/// The pairs `got` and `want` agree to `rel` (a dot relative to `‖c‖ ‖p‖`).
fn agree_to(name: &str, probes: &Probes, got: &Pairs, want: &Pairs, rel: f64, what: &str) {
    let ((rd, rn), (pd, pn)) = (got, want);
    assert_eq!(rd.dim(), pd.dim(), "{name}: pairs");
    for ((q, r), x) in rd.indexed_iter() {
        let scale = pn[[q, r]] * probes.p_norm[q];
        close(
            &format!("{name}: {what} dot {q},{r}"),
            *x,
            pd[[q, r]],
            scale,
            rel,
        );
        close(
            &format!("{name}: {what} norm {q},{r}"),
            rn[[q, r]],
            pn[[q, r]],
            0.0,
            rel,
        );
    }
}

/// `lists` with every record zero-padded to `T_PAD` positions of `unit`
/// values in both lists.
fn padded(lists: &[(Vec<f64>, Vec<f64>)], unit: (usize, usize)) -> Vec<(Vec<f64>, Vec<f64>)> {
    lists
        .iter()
        .map(|(u, v)| {
            let (mut u, mut v) = (u.clone(), v.clone());
            u.resize(T_PAD * unit.0, 0.0);
            v.resize(T_PAD * unit.1, 0.0);
            (u, v)
        })
        .collect()
}

const IN: usize = 4;
const OUT: usize = 3;

fn linear(bias: bool, storage: Storage, ragged: bool, positions: usize) -> LinearSpec {
    LinearSpec {
        positions,
        storage,
        ragged,
        ..LinearSpec::new("fc", IN, OUT, bias)
    }
}

/// `[vec ΔW, Δb]` of `s Σ_t v_t u_tᵀ`, `s Σ_t v_t`, by loops.
fn linear_delta(bias: bool, u: &[f64], v: &[f64], s: f64) -> Vec<f64> {
    let n = u.len() / IN;
    assert_eq!(v.len(), n * OUT);
    let mut d = vec![0.0; IN * OUT + if bias { OUT } else { 0 }];
    for t in 0..n {
        for o in 0..OUT {
            for i in 0..IN {
                d[o * IN + i] += s * v[t * OUT + o] * u[t * IN + i];
            }
            if bias {
                d[IN * OUT + o] += s * v[t * OUT + o];
            }
        }
    }
    d
}

/// `c_t = ΔW a_t + Δb` at each of `a`'s positions, by loops.
fn linear_apply(bias: bool, d: &[f64], a: &[f64]) -> Vec<f64> {
    let n = a.len() / IN;
    let mut c = vec![0.0; n * OUT];
    for t in 0..n {
        for o in 0..OUT {
            let mut z = if bias { d[IN * OUT + o] } else { 0.0 };
            for i in 0..IN {
                z += d[o * IN + i] * a[t * IN + i];
            }
            c[t * OUT + o] = z;
        }
    }
    c
}

fn probe_lists(rng: &mut ChaCha8Rng, positions: &[usize], unit: (usize, usize)) -> Probes {
    let lists: Vec<_> = positions
        .iter()
        .map(|&n| (random(rng, n * unit.0), random(rng, n * unit.1)))
        .collect();
    probes(&lists)
}

#[test]
fn a_ragged_linear_is_a_sequence_layer_even_at_one_position() {
    for t in [1, 3] {
        let spec = linear(true, Storage::Factors, true, t);
        let geom = Geometry::of(&TracedLayer::Linear(&spec), Mode::Instance).unwrap();
        let Geometry::Patches(Patches {
            layout: Layout::Positions,
            full: false,
            ..
        }) = geom
        else {
            panic!("T = {t}: {geom:?}");
        };
    }
    let fixed = linear(true, Storage::Factors, false, 1);
    let geom = Geometry::of(&TracedLayer::Linear(&fixed), Mode::Instance).unwrap();
    assert!(matches!(geom, Geometry::Linear { .. }), "{geom:?}");
}

#[test]
fn ragged_linear_factors_match_brute_force_and_padding() {
    for (bias, seed) in [(true, 1), (false, 2)] {
        let name = format!("linear factors bias {bias}");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let lists: Vec<_> = RECORD_POSITIONS
            .iter()
            .map(|&n| (random(&mut rng, n * IN), random(&mut rng, n * OUT)))
            .collect();
        let scales = random(&mut rng, lists.len());
        let brute_deltas: Vec<Vec<f64>> = lists
            .iter()
            .zip(&scales)
            .map(|((u, v), &s)| linear_delta(bias, u, v, s))
            .collect();
        let apply = move |d: &[f64], a: &[f64]| linear_apply(bias, d, a);
        let brute = Brute {
            deltas: brute_deltas,
            apply: &apply,
        };
        let spec = linear(bias, Storage::Factors, true, T);
        let geom = Geometry::of(&TracedLayer::Linear(&spec), Mode::Instance).unwrap();
        let recs = records(&lists);
        let ragged_probes = probe_lists(&mut rng, &PROBE_POSITIONS, (IN, OUT));
        check(
            &name,
            &geom,
            &recs,
            &scales,
            &ragged_probes,
            &brute,
            &mut rng,
        );
        // (b): probes of T_PAD positions, records ragged and zero-padded.
        let fixed_probes = probe_lists(&mut rng, &[T_PAD; 3], (IN, OUT));
        let ragged = check(
            &name,
            &geom,
            &recs,
            &scales,
            &fixed_probes,
            &brute,
            &mut rng,
        );
        let fixed = linear(bias, Storage::Factors, false, T_PAD);
        let fixed_geom = Geometry::of(&TracedLayer::Linear(&fixed), Mode::Instance).unwrap();
        let pad = records(&padded(&lists, (IN, OUT)));
        let padded = check(
            &name,
            &fixed_geom,
            &pad,
            &scales,
            &fixed_probes,
            &brute,
            &mut rng,
        );
        agree(&name, &fixed_probes, &ragged, &padded);
    }
}

#[test]
fn ragged_linear_with_full_records_matches_brute_force() {
    for (bias, seed) in [(true, 3), (false, 4)] {
        let name = format!("linear full bias {bias}");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let len = IN * OUT + if bias { OUT } else { 0 };
        let lists: Vec<_> = (0..4)
            .map(|_| (Vec::new(), random(&mut rng, len)))
            .collect();
        let scales = random(&mut rng, lists.len());
        let deltas = lists
            .iter()
            .zip(&scales)
            .map(|((_, v), &s)| v.iter().map(|x| s * x).collect())
            .collect();
        let apply = move |d: &[f64], a: &[f64]| linear_apply(bias, d, a);
        let brute = Brute {
            deltas,
            apply: &apply,
        };
        let recs = records(&lists);
        let spec = linear(bias, Storage::Full, true, T);
        let geom = Geometry::of(&TracedLayer::Linear(&spec), Mode::Instance).unwrap();
        let ragged_probes = probe_lists(&mut rng, &PROBE_POSITIONS, (IN, OUT));
        check(
            &name,
            &geom,
            &recs,
            &scales,
            &ragged_probes,
            &brute,
            &mut rng,
        );
        // (b): the same probes of T positions under the non-ragged layer.
        let fixed_probes = probe_lists(&mut rng, &[T; 3], (IN, OUT));
        let ragged = check(
            &name,
            &geom,
            &recs,
            &scales,
            &fixed_probes,
            &brute,
            &mut rng,
        );
        let fixed = linear(bias, Storage::Full, false, T);
        let fixed_geom = Geometry::of(&TracedLayer::Linear(&fixed), Mode::Instance).unwrap();
        let padded = check(
            &name,
            &fixed_geom,
            &recs,
            &scales,
            &fixed_probes,
            &brute,
            &mut rng,
        );
        agree(&name, &fixed_probes, &ragged, &padded);
    }
}

const NUM: usize = 3000;
const DIM: usize = 3;
/// Token ids drawn: both base-2048 digits in use, repeats likely.
const POOL: [usize; 5] = [0, 17, 2047, 2048, NUM - 1];

fn embedding(storage: Storage, ragged: bool, positions: usize) -> EmbeddingSpec {
    EmbeddingSpec {
        name: "tok".into(),
        num_embeddings: NUM,
        embedding_dim: DIM,
        padding_idx: None,
        positions,
        traced: true,
        storage,
        ragged,
    }
}

fn token_ids(rng: &mut ChaCha8Rng, n: usize) -> Vec<usize> {
    (0..n)
        .map(|_| POOL[rng.random_range(0..POOL.len())])
        .collect()
}

/// Ids as the two base-2048 digits each that a table of NUM rows stores.
fn encode(ids: &[usize]) -> Vec<f64> {
    ids.iter().flat_map(|&id| id_digits(id as u64, 2)).collect()
}

/// `c_t = ΔW[id_t]`, the ids decoded plainly from their two digits.
fn embedding_apply(d: &[f64], a: &[f64]) -> Vec<f64> {
    let mut c = vec![];
    for pair in a.chunks(2) {
        let id = pair[0] as usize * 2048 + pair[1] as usize;
        c.extend_from_slice(&d[id * DIM..(id + 1) * DIM]);
    }
    c
}

fn embedding_probes(rng: &mut ChaCha8Rng, positions: &[usize]) -> Probes {
    let lists: Vec<_> = positions
        .iter()
        .map(|&n| (encode(&token_ids(rng, n)), random(rng, n * DIM)))
        .collect();
    probes(&lists)
}

#[test]
fn ragged_embedding_factors_match_brute_force_and_padding() {
    let name = "embedding factors";
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let ids: Vec<Vec<usize>> = RECORD_POSITIONS
        .iter()
        .map(|&n| token_ids(&mut rng, n))
        .collect();
    let lists: Vec<_> = ids
        .iter()
        .map(|ids| (encode(ids), random(&mut rng, ids.len() * DIM)))
        .collect();
    let scales = random(&mut rng, lists.len());
    let deltas = ids
        .iter()
        .zip(&lists)
        .zip(&scales)
        .map(|((ids, (_, v)), &s)| {
            let mut d = vec![0.0; NUM * DIM];
            for (t, &id) in ids.iter().enumerate() {
                for k in 0..DIM {
                    d[id * DIM + k] += s * v[t * DIM + k];
                }
            }
            d
        })
        .collect();
    let brute = Brute {
        deltas,
        apply: &embedding_apply,
    };
    let spec = embedding(Storage::Factors, true, T);
    let geom = Geometry::of(&TracedLayer::Embedding(&spec), Mode::Instance).unwrap();
    let recs = records(&lists);
    let ragged_probes = embedding_probes(&mut rng, &PROBE_POSITIONS);
    check(
        name,
        &geom,
        &recs,
        &scales,
        &ragged_probes,
        &brute,
        &mut rng,
    );
    let fixed_probes = embedding_probes(&mut rng, &[T_PAD; 3]);
    let ragged = check(name, &geom, &recs, &scales, &fixed_probes, &brute, &mut rng);
    // Padded with token 0 and a zero gradient: ΔW is unchanged.
    let fixed = embedding(Storage::Factors, false, T_PAD);
    let fixed_geom = Geometry::of(&TracedLayer::Embedding(&fixed), Mode::Instance).unwrap();
    let pad = records(&padded(&lists, (2, DIM)));
    let padded = check(
        name,
        &fixed_geom,
        &pad,
        &scales,
        &fixed_probes,
        &brute,
        &mut rng,
    );
    agree(name, &fixed_probes, &ragged, &padded);
}

#[test]
fn ragged_embedding_with_full_records_matches_brute_force() {
    let name = "embedding full";
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let lists: Vec<_> = (0..4)
        .map(|_| (Vec::new(), random(&mut rng, NUM * DIM)))
        .collect();
    let scales = random(&mut rng, lists.len());
    let deltas = lists
        .iter()
        .zip(&scales)
        .map(|((_, v), &s)| v.iter().map(|x| s * x).collect())
        .collect();
    let brute = Brute {
        deltas,
        apply: &embedding_apply,
    };
    let recs = records(&lists);
    let spec = embedding(Storage::Full, true, T);
    let geom = Geometry::of(&TracedLayer::Embedding(&spec), Mode::Instance).unwrap();
    let ragged_probes = embedding_probes(&mut rng, &PROBE_POSITIONS);
    check(
        name,
        &geom,
        &recs,
        &scales,
        &ragged_probes,
        &brute,
        &mut rng,
    );
    let fixed_probes = embedding_probes(&mut rng, &[T; 3]);
    let ragged = check(name, &geom, &recs, &scales, &fixed_probes, &brute, &mut rng);
    let fixed = embedding(Storage::Full, false, T);
    let fixed_geom = Geometry::of(&TracedLayer::Embedding(&fixed), Mode::Instance).unwrap();
    let padded = check(
        name,
        &fixed_geom,
        &recs,
        &scales,
        &fixed_probes,
        &brute,
        &mut rng,
    );
    agree(name, &fixed_probes, &ragged, &padded);
}

const D: usize = 4;

fn norm(bias: bool, ragged: bool, positions: usize) -> NormSpec {
    NormSpec {
        name: "ln".into(),
        normalized_shape: vec![D],
        bias,
        eps: 1e-5,
        positions,
        traced: true,
        ragged,
    }
}

#[test]
fn ragged_layer_norm_matches_brute_force() {
    for (bias, seed) in [(true, 7), (false, 8)] {
        let name = format!("layer_norm bias {bias}");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let len = if bias { 2 * D } else { D };
        let lists: Vec<_> = (0..4)
            .map(|_| (Vec::new(), random(&mut rng, len)))
            .collect();
        let scales = random(&mut rng, lists.len());
        let deltas = lists
            .iter()
            .zip(&scales)
            .map(|((_, v), &s)| v.iter().map(|x| s * x).collect())
            .collect();
        // c_t = Δγ ⊙ x̂_t + Δβ.
        let apply = move |d: &[f64], a: &[f64]| -> Vec<f64> {
            let mut c = vec![0.0; a.len()];
            for t in 0..a.len() / D {
                for k in 0..D {
                    c[t * D + k] = d[k] * a[t * D + k] + if bias { d[D + k] } else { 0.0 };
                }
            }
            c
        };
        let brute = Brute {
            deltas,
            apply: &apply,
        };
        let recs = records(&lists);
        let spec = norm(bias, true, T);
        let geom = Geometry::of(&TracedLayer::LayerNorm(&spec), Mode::Instance).unwrap();
        let ragged_probes = probe_lists(&mut rng, &PROBE_POSITIONS, (D, D));
        check(
            &name,
            &geom,
            &recs,
            &scales,
            &ragged_probes,
            &brute,
            &mut rng,
        );
        let fixed_probes = probe_lists(&mut rng, &[T; 3], (D, D));
        let ragged = check(
            &name,
            &geom,
            &recs,
            &scales,
            &fixed_probes,
            &brute,
            &mut rng,
        );
        let fixed = norm(bias, false, T);
        let fixed_geom = Geometry::of(&TracedLayer::LayerNorm(&fixed), Mode::Instance).unwrap();
        let padded = check(
            &name,
            &fixed_geom,
            &recs,
            &scales,
            &fixed_probes,
            &brute,
            &mut rng,
        );
        agree(&name, &fixed_probes, &ragged, &padded);
    }
}

#[test]
fn lists_of_different_positions_are_refused_in_one_line() {
    let spec = linear(true, Storage::Factors, true, T);
    let geom = Geometry::of(&TracedLayer::Linear(&spec), Mode::Instance).unwrap();
    // u of 2 positions, v of 1.
    let recs = records(&[(vec![0.5; 2 * IN], vec![0.5; OUT])]);
    let err = RecordFeatures::new(&geom, &recs, &[1.0], &[0])
        .err()
        .expect("refused")
        .to_string();
    assert!(!err.contains('\n'), "{err}");
    let probes = probes(&[(vec![0.5; 3 * IN], vec![0.5; 2 * OUT])]);
    assert!(ProbeFeatures::new(&geom, &probes).is_err());
    let spec = embedding(Storage::Factors, true, T);
    let geom = Geometry::of(&TracedLayer::Embedding(&spec), Mode::Instance).unwrap();
    let recs = records(&[(encode(&[1, 2]), vec![0.5; DIM])]);
    let err = RecordFeatures::new(&geom, &recs, &[1.0], &[0])
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("tok") && !err.contains('\n'), "{err}");
}
