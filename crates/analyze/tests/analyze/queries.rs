//! Every canned query against a computation in Rust over the same rows.
use crate::read::{self, Contribution, Probe};
use crate::sql::{floats, ints, strings};
use reptrace_analyze::query::Query;
use reptrace_analyze::{
    ComputeOptions, Limits, Options, ProbeSelection, attribute, context, context_limited, open,
};
use reptrace_format::{Optimizer, Storage};
use reptrace_testkit::synthetic::{Synth, conv, linear};
use std::collections::{BTreeMap, HashMap};

struct Fixture {
    _tmp: tempfile::TempDir,
    ctx: datafusion::prelude::SessionContext,
    rows: Vec<Contribution>,
    probes: Vec<Probe>,
}

/// A run with a residual (weight decay), two layers, every probe attributed.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    Synth {
        layers: vec![conv("c1", Storage::Factors), linear("fc", 4, 3, true)],
        optimizer: Optimizer {
            weight_decay: 0.02,
            ..Optimizer::sgd(0.1)
        },
        ..Synth::default()
    }
    .write(&run);
    let options = Options {
        probes: ProbeSelection::All,
        ..Options::default()
    };
    attribute(&run, &options, &mut |_| {}).unwrap();
    Fixture {
        ctx: context(&open(&run).unwrap()).unwrap(),
        rows: read::contributions(&run),
        probes: read::probes(&run),
        _tmp: tmp,
    }
}

impl Fixture {
    async fn run(&self, name: &str, params: &[(&str, &str)]) -> Vec<arrow_array::RecordBatch> {
        Query::resolve(name)
            .unwrap()
            .run(&self.ctx, params)
            .await
            .unwrap()
            .1
    }

    fn p_norm(&self, layer: &str, probe: i64) -> f64 {
        self.probes
            .iter()
            .find(|p| p.layer == layer && p.probe_id == probe)
            .unwrap()
            .p_norm
    }

    fn of(&self, probe: i64) -> impl Iterator<Item = &Contribution> {
        self.rows.iter().filter(move |r| r.probe_id == probe)
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

#[tokio::test]
async fn every_canned_query_matches_rust() {
    let f = fixture();
    let probe = 121;

    // top_proponents / top_opponents: a sort of per-instance sums.
    for (name, sign) in [("top_proponents", -1.0), ("top_opponents", 1.0)] {
        let b = f.run(name, &[("probe", "121"), ("k", "4")]).await;
        let mut sums: BTreeMap<(String, i64), (i32, f64, i64)> = BTreeMap::new();
        for r in f.of(probe).filter(|r| r.instance_id.is_some()) {
            let e = sums
                .entry((r.layer.clone(), r.instance_id.unwrap()))
                .or_insert((r.label.unwrap(), 0.0, 0));
            e.1 += r.dot;
            e.2 += 1;
        }
        let mut want = Vec::new();
        for layer in ["c1", "fc"] {
            let mut v: Vec<_> = sums.iter().filter(|((l, _), _)| l == layer).collect();
            v.sort_by(|a, b| {
                (sign * a.1.1)
                    .total_cmp(&(sign * b.1.1))
                    .then(a.0.1.cmp(&b.0.1))
            });
            for (rank, ((l, inst), (label, dot, n))) in v.into_iter().take(4).enumerate() {
                want.push((
                    l.clone(),
                    rank as i64 + 1,
                    *inst,
                    *label as i64,
                    dot / f.p_norm(l, probe),
                    *n,
                ));
            }
        }
        let got: Vec<_> = (0..ints(&b, "instance_id").len())
            .map(|i| {
                (
                    strings(&b, "layer")[i].clone().unwrap(),
                    ints(&b, "rank_in_layer")[i].unwrap(),
                    ints(&b, "instance_id")[i].unwrap(),
                    ints(&b, "label")[i].unwrap(),
                    floats(&b, "influence")[i].unwrap(),
                    ints(&b, "records")[i].unwrap(),
                )
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{name}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(
                (&g.0, g.1, g.2, g.3, g.5),
                (&w.0, w.1, w.2, w.3, w.5),
                "{name}"
            );
            assert!(close(g.4, w.4), "{name}: {} vs {}", g.4, w.4);
        }
    }

    // class_shares: Σ dot per class / ‖p‖², residual as label NULL; sums to 1.
    let b = f.run("class_shares", &[("probe", "121")]).await;
    let mut want: BTreeMap<(String, Option<i32>), (f64, i64)> = BTreeMap::new();
    for r in f.of(probe) {
        let e = want.entry((r.layer.clone(), r.label)).or_default();
        e.0 += r.dot / f.p_norm(&r.layer, probe).powi(2);
        e.1 += 1;
    }
    let (layers, labels, sources, shares) = (
        strings(&b, "layer"),
        ints(&b, "label"),
        strings(&b, "source"),
        floats(&b, "share"),
    );
    assert_eq!(layers.len(), want.len());
    let mut total: HashMap<String, f64> = HashMap::new();
    for i in 0..layers.len() {
        let key = (layers[i].clone().unwrap(), labels[i].map(|l| l as i32));
        let (share, n) = want[&key];
        assert!(close(shares[i].unwrap(), share));
        assert_eq!(ints(&b, "records")[i], Some(n));
        assert_eq!(
            sources[i].as_deref(),
            Some(if key.1.is_none() { "residual" } else { "class" })
        );
        *total.entry(key.0).or_default() += shares[i].unwrap();
    }
    assert_eq!(
        labels.last().copied().flatten(),
        None,
        "residual row sorts last"
    );
    for (layer, t) in total {
        assert!((t - 1.0).abs() < 1e-9, "{layer}: shares sum to {t}");
    }

    // class_shares_by_epoch.
    let b = f.run("class_shares_by_epoch", &[("probe", "121")]).await;
    let mut want: BTreeMap<(String, Option<i32>, Option<i32>), f64> = BTreeMap::new();
    for r in f.of(probe) {
        *want.entry((r.layer.clone(), r.epoch, r.label)).or_default() +=
            r.dot / f.p_norm(&r.layer, probe).powi(2);
    }
    let (layers, epochs, labels, shares) = (
        strings(&b, "layer"),
        ints(&b, "epoch"),
        ints(&b, "label"),
        floats(&b, "share"),
    );
    assert_eq!(layers.len(), want.len());
    for i in 0..layers.len() {
        let key = (
            layers[i].clone().unwrap(),
            epochs[i].map(|e| e as i32),
            labels[i].map(|l| l as i32),
        );
        assert!(close(shares[i].unwrap(), want[&key]), "{key:?}");
    }

    // cosine_histogram with 7 bins.
    let bins = 7i64;
    let b = f
        .run("cosine_histogram", &[("probe", "121"), ("bins", "7")])
        .await;
    let mut want: BTreeMap<(String, Option<i32>, i64), (f64, i64)> = BTreeMap::new();
    // Records only: the residual (step NULL) has no distribution.
    for r in f.of(probe).filter(|r| r.step.is_some()) {
        let bin = (((r.cosine + 1.0) / 2.0 * bins as f64).floor() as i64).clamp(0, bins - 1);
        let e = want.entry((r.layer.clone(), r.label, bin)).or_default();
        e.0 += r.norm;
        e.1 += 1;
    }
    let mut class_total: HashMap<(String, Option<i32>), f64> = HashMap::new();
    for ((l, c, _), (w, _)) in &want {
        *class_total.entry((l.clone(), *c)).or_default() += w;
    }
    let (layers, labels, bin_col) = (strings(&b, "layer"), ints(&b, "label"), ints(&b, "bin"));
    assert_eq!(layers.len(), want.len());
    for i in 0..layers.len() {
        let key = (
            layers[i].clone().unwrap(),
            labels[i].map(|l| l as i32),
            bin_col[i].unwrap(),
        );
        let (w, n) = want[&key];
        assert!(close(floats(&b, "weight")[i].unwrap(), w));
        assert_eq!(ints(&b, "records")[i], Some(n));
        let lo = -1.0 + 2.0 * key.2 as f64 / bins as f64;
        assert!(close(floats(&b, "bin_lo")[i].unwrap(), lo));
        assert!(close(
            floats(&b, "bin_hi")[i].unwrap(),
            lo + 2.0 / bins as f64
        ));
        let total = class_total[&(key.0.clone(), key.1)];
        assert!(close(floats(&b, "weight_share")[i].unwrap(), w / total));
    }

    // self_influence: probes that are training instances, own records only.
    let b = f.run("self_influence", &[("k", "2")]).await;
    let mut want = Vec::new();
    for layer in ["c1", "fc"] {
        let mut v: Vec<(f64, i64, i64, i32, i32)> = f
            .probes
            .iter()
            .filter(|p| p.layer == layer && p.instance_id.is_some_and(|i| i < 20))
            .map(|p| {
                let own: Vec<&Contribution> = f
                    .rows
                    .iter()
                    .filter(|r| {
                        r.layer == layer
                            && r.probe_id == p.probe_id
                            && r.instance_id == p.instance_id
                    })
                    .collect();
                let s: f64 = own.iter().map(|r| r.dot).sum();
                (
                    s / (p.p_norm * p.p_norm),
                    p.probe_id,
                    own.len() as i64,
                    p.label,
                    p.predicted,
                )
            })
            .filter(|x| x.2 > 0)
            .collect();
        // Tail 'memorised': the largest positive shares; 'self-opposed':
        // the most negative ones.
        v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let top = v.iter().filter(|x| x.0 > 0.0).take(2);
        for (rank, x) in top.enumerate() {
            want.push((layer.to_owned(), "memorised", rank as i64 + 1, *x));
        }
        v.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let bottom = v.iter().filter(|x| x.0 < 0.0).take(2);
        for (rank, x) in bottom.enumerate() {
            want.push((layer.to_owned(), "self-opposed", rank as i64 + 1, *x));
        }
    }
    let want: Vec<_> = want
        .into_iter()
        .map(|(l, tail, rank, x)| (l, tail, rank, x.1, x.0, x.2, x.3, x.4))
        .collect();
    assert!(
        want.iter().any(|w| w.1 == "self-opposed"),
        "the fixture has both tails"
    );
    assert_eq!(ints(&b, "probe_id").len(), want.len());
    for (i, w) in want.iter().enumerate() {
        let w = (w.0.clone(), w.2, w.3, w.4, w.5, w.6, w.7);
        assert_eq!(strings(&b, "layer")[i].as_deref(), Some(w.0.as_str()));
        assert_eq!(strings(&b, "tail")[i].as_deref(), Some(want[i].1));
        assert_eq!(ints(&b, "rank_in_tail")[i], Some(w.1));
        assert_eq!(ints(&b, "probe_id")[i], Some(w.2));
        assert!(close(floats(&b, "self_share")[i].unwrap(), w.3));
        assert_eq!(ints(&b, "records")[i], Some(w.4));
        assert_eq!(ints(&b, "label")[i], Some(i64::from(w.5)));
        assert_eq!(ints(&b, "predicted")[i], Some(i64::from(w.6)));
    }

    // layer_summary.
    let b = f.run("layer_summary", &[("probe", "121")]).await;
    let layers = strings(&b, "layer");
    assert_eq!(layers, vec![Some("c1".to_owned()), Some("fc".to_owned())]);
    for (i, layer) in layers.iter().enumerate() {
        let layer = layer.as_deref().unwrap();
        let pn = f.p_norm(layer, probe);
        let rows: Vec<&Contribution> = f.of(probe).filter(|r| r.layer == layer).collect();
        // A record has a step; the residual is the row without one.
        let rec: Vec<&&Contribution> = rows.iter().filter(|r| r.step.is_some()).collect();
        let pos: f64 = rec.iter().filter(|r| r.dot > 0.0).map(|r| r.dot).sum();
        let neg: f64 = rec.iter().filter(|r| r.dot < 0.0).map(|r| r.dot).sum();
        let res: f64 = rows
            .iter()
            .filter(|r| r.step.is_none())
            .map(|r| r.dot)
            .sum();
        assert!(close(floats(&b, "p_norm")[i].unwrap(), pn));
        assert_eq!(ints(&b, "records")[i], Some(rec.len() as i64));
        assert!(close(
            floats(&b, "positive_share")[i].unwrap(),
            pos / (pn * pn)
        ));
        assert!(close(
            floats(&b, "negative_share")[i].unwrap(),
            neg / (pn * pn)
        ));
        assert!(close(
            floats(&b, "residual_share")[i].unwrap(),
            res / (pn * pn)
        ));
        assert!((floats(&b, "total_share")[i].unwrap() - 1.0).abs() < 1e-9);
        // Instance mode: every record has a class.
        assert_eq!(floats(&b, "mixed_batches_share")[i], Some(0.0));
        assert!(
            res.abs() / (pn * pn) > 1e-4,
            "decay should leave a residual"
        );
    }
}

/// Every canned query finishes under the smallest memory limit and returns
/// what it returns without one: plans with many sorts (window functions per
/// partition, a CTE read twice) share the sort reservation instead of each
/// taking all of it (before, `self_influence` failed to allocate
/// `ExternalSorterMerge` even under half of a 24 GiB machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_canned_query_runs_under_the_smallest_memory_limit() {
    let f = fixture();
    let run = open(&f._tmp.path().join("run")).unwrap();
    let limits = Limits::unlimited()
        .with_memory_text("16MiB", "--memory-limit")
        .unwrap();
    let small = context_limited(&run, &ComputeOptions::default(), &limits).unwrap();
    let mut many_sorts = 0;
    for q in Query::builtins().unwrap() {
        let params: Vec<(&str, &str)> = if q.params.iter().any(|p| p.name == "probe") {
            vec![("probe", "121")]
        } else {
            vec![]
        };
        let (_, want) = q.run(&f.ctx, &params).await.unwrap();
        let plan = q.plan(&small, &params).await.unwrap();
        let (physical, task) = reptrace_analyze::sql::physical(plan).await.unwrap();
        let sorters = reptrace_analyze::sql::sorters(&physical);
        let each = task
            .session_config()
            .options()
            .execution
            .sort_spill_reservation_bytes;
        assert!(
            sorters * each <= limits.sort_spill_reservation().max(sorters * (64 << 10)),
            "{}: {sorters} sorts reserve {each} bytes each",
            q.name
        );
        many_sorts = many_sorts.max(sorters);
        let (_, got) = match q.run(&small, &params).await {
            Ok(r) => r,
            Err(e) => panic!("{} under 16 MiB: {e}", q.name),
        };
        let rows = |b: &[arrow_array::RecordBatch]| b.iter().map(|b| b.num_rows()).sum::<usize>();
        assert_eq!(rows(&got), rows(&want), "{}", q.name);
    }
    assert!(many_sorts >= 4, "some canned query sorts in several places");
}

#[tokio::test]
async fn parameters_and_query_files() {
    let f = fixture();
    let err = |name: &'static str, params: Vec<(&'static str, &'static str)>| {
        let ctx = &f.ctx;
        async move {
            match Query::resolve(name) {
                Ok(q) => q.run(ctx, &params).await.unwrap_err().to_string(),
                Err(e) => e.to_string(),
            }
        }
    };
    for (name, params, want) in [
        (
            "top_proponents",
            vec![("probe", "121"), ("kk", "3")],
            "parameter kk: unknown (parameters of top_proponents: probe, k)",
        ),
        (
            "top_proponents",
            vec![],
            "parameter probe: missing (int64: the probe id)",
        ),
        (
            "top_proponents",
            vec![("probe", "12x")],
            "parameter probe: invalid value \"12x\": expected int64",
        ),
        (
            "no_such_query",
            vec![],
            "query no_such_query: no such query (built-in: top_proponents",
        ),
    ] {
        let e = err(name, params).await;
        assert!(e.contains(want) && !e.contains('\n'), "{e}");
    }

    // A query file by path; an undeclared placeholder is refused; values are bound, not spliced.
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("count.sql");
    std::fs::write(
        &good,
        "-- Rows of a probe\n-- param: probe (int64) the probe\n-- param: layer (string, default 'fc') the layer\nSELECT COUNT(*) AS n FROM contributions WHERE probe_id = $probe AND layer = $layer\n",
    )
    .unwrap();
    let q = Query::resolve(good.to_str().unwrap()).unwrap();
    let (_, b) = q.run(&f.ctx, &[("probe", "121")]).await.unwrap();
    let want = f
        .rows
        .iter()
        .filter(|r| r.probe_id == 121 && r.layer == "fc")
        .count() as i64;
    assert_eq!(ints(&b, "n"), vec![Some(want)]);
    let (_, b) = q
        .run(&f.ctx, &[("probe", "121"), ("layer", "fc' OR 'a' = 'a")])
        .await
        .unwrap();
    assert_eq!(ints(&b, "n"), vec![Some(0)]);
    let bad = dir.path().join("bad.sql");
    std::fs::write(
        &bad,
        "-- Bad\nSELECT COUNT(*) FROM contributions WHERE probe_id = $probe\n",
    )
    .unwrap();
    let e = Query::resolve(bad.to_str().unwrap())
        .unwrap()
        .run(&f.ctx, &[])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("uses $probe, which its header does not declare"),
        "{e}"
    );
}
