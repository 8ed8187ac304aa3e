//! Attribution throughput: record×probe pairs per second per layer kind, and
//! its ratio to a bare Parquet decode of the same columns.
//!
//! Run with `cargo bench -p reptrace-analyze --bench attribution`
//! (`-- --records N --probes Q --repeats R` to change the size). It writes a
//! synthetic trace (random factors, digits-sized layers) through the Recorder
//! into a temporary directory, attributes each layer alone and prints a
//! table. Times are medians over the repeats; `ratio` is the attribution's
//! record rate over the bare decode's record rate (scan time / attribution
//! time: 1 means attribution is as fast as reading the records).
//!
//! Besides the table, one line per layer for scripts (`scripts/bench.sh`):
//! `BENCH attribution layer=NAME kind=KIND records=N probes=Q pairs_per_s=… attr_s=… scan_s=… ratio=…`.
//!
//! Then the two routes of a wide sequence layer (`linear 768→768` over `T =
//! 64` positions, factor records, a bias; `--wide-records`, `--wide-probes`,
//! `--wide-positions`, `--wide-features` change it; `--wide-only 1` skips
//! the table above): the same random records and probes through the kernel
//! (probe features, record features, every pair, in batches of 32 records)
//! on the factor route and on the Gram route forced, pairs per second side
//! by side and their ratio, and the route the cost model takes:
//! `BENCH factor_route records=N probes=Q positions=T features=K factor_pairs_per_s=… gram_pairs_per_s=… ratio=… chosen=…`.
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reptrace_analyze::kernel::{Geometry, ProbeFeatures, RecordFeatures, Route};
use reptrace_analyze::probes::Probes;
use reptrace_analyze::records::Records;
use reptrace_analyze::{Options, ProbeSelection, attribute};
use reptrace_format::{LinearSpec, Manifest, Mode, Table, TracedLayer};
use reptrace_testkit::bench::{arg_usize as arg, median};
use reptrace_testkit::{models, synthetic};
use std::path::Path;
use std::time::Instant;

/// Seconds to decode the attributed columns of a layer's updates, and the record count.
fn bare_scan(run: &Path, layer: &str) -> (f64, usize) {
    let m = Manifest::load(run).expect("manifest");
    let start = Instant::now();
    let mut rows = 0;
    for f in m
        .files(Table::Updates)
        .iter()
        .filter(|f| f.layer.as_deref() == Some(layer))
    {
        let file = std::fs::File::open(run.join(&f.path)).expect("open");
        let b = ParquetRecordBatchReaderBuilder::try_new(file).expect("parquet");
        let mask = ProjectionMask::roots(b.parquet_schema(), [0, 1, 2, 3, 4, 5]);
        for batch in b.with_projection(mask).build().expect("reader") {
            rows += batch.expect("batch").num_rows();
        }
    }
    (start.elapsed().as_secs_f64(), rows)
}

/// Records of the wide layer per batch (the batch is reused to make up the
/// records timed).
const WIDE_BATCH: usize = 32;

/// `n` values drawn uniformly from `[-1, 1)`.
fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Seconds to meet `records` records (the batch `recs` again and again)
/// with `probes` on `route`: probe features once, then per batch record
/// features and every pair.
fn wide_pass(
    geom: &Geometry,
    recs: &Records,
    scales: &[f64],
    probes: &Probes,
    records: usize,
    route: Route,
) -> f64 {
    let start = Instant::now();
    let pf = ProbeFeatures::with_route(geom, probes, route).expect("probe features");
    let mut left = records;
    while left > 0 {
        let rows: Vec<usize> = (0..left.min(recs.len())).collect();
        let rf = RecordFeatures::for_probes(geom, &pf, recs, scales, &rows).expect("records");
        let (dot, _) = rf.all_pairs(&pf).expect("pairs");
        std::hint::black_box(dot);
        left -= rows.len();
    }
    start.elapsed().as_secs_f64()
}

/// The factor route against the Gram route forced on a wide sequence layer.
fn wide_sequence(repeats: usize) {
    let records = arg("--wide-records", 256).max(1);
    let n_probes = arg("--wide-probes", 4).max(1);
    let t = arg("--wide-positions", 64).max(1);
    let k = arg("--wide-features", 768).max(1);
    let spec = LinearSpec {
        positions: t,
        ..LinearSpec::new("wide", k, k, true)
    };
    let geom = Geometry::of(&TracedLayer::Linear(&spec), Mode::Instance).expect("geometry");
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut recs = Records::default();
    for i in 0..WIDE_BATCH.min(records) {
        recs.step.push(i as i64);
        recs.epoch.push(0);
        recs.instance_id.push(Some(i as i64));
        recs.label.push(None);
        let (u, v) = (random(&mut rng, t * k), random(&mut rng, t * k));
        recs.push_lists(&u, &v);
    }
    let scales = vec![0.05; recs.len()];
    let mut probes = Probes::default();
    for i in 0..n_probes {
        let (a, p) = (random(&mut rng, t * k), random(&mut rng, t * k));
        probes.probe_id.push(i as i64);
        probes.instance_id.push(None);
        probes.label.push(0);
        probes.predicted.push(0);
        probes
            .p_norm
            .push(p.iter().map(|x| x * x).sum::<f64>().sqrt());
        probes.push_lists(&a, &p);
    }
    let chosen = ProbeFeatures::new(&geom, &probes)
        .expect("probe features")
        .route();
    let (mut factor, mut gram) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        factor.push(wide_pass(
            &geom,
            &recs,
            &scales,
            &probes,
            records,
            Route::Factors,
        ));
        gram.push(wide_pass(
            &geom,
            &recs,
            &scales,
            &probes,
            records,
            Route::Gram,
        ));
    }
    let pairs = (records * n_probes) as f64;
    let (f, g) = (pairs / median(&mut factor), pairs / median(&mut gram));
    println!(
        "\nwide sequence layer: linear {k}->{k} over T = {t}, bias, factor records; \
         {records} records, {n_probes} probes of {t} positions; median of {repeats}"
    );
    println!(
        "{:<8} {:>14} {:>14} {:>8} {:>8}",
        "", "factor route", "Gram route", "ratio", "chosen"
    );
    println!(
        "{:<8} {:>14.0} {:>14.0} {:>8.1} {:>8}",
        "pairs/s",
        f,
        g,
        f / g,
        format!("{chosen:?}")
    );
    println!(
        "BENCH factor_route records={records} probes={n_probes} positions={t} features={k} \
         factor_pairs_per_s={f:.0} gram_pairs_per_s={g:.0} ratio={:.2} chosen={chosen:?} repeats={repeats}",
        f / g
    );
}

fn main() {
    let repeats = arg("--repeats", 3).max(1);
    if arg("--wide-only", 0) == 1 {
        wide_sequence(repeats);
        return;
    }
    let records = arg("--records", 20_000);
    let probes = arg("--probes", 100);
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let t = Instant::now();
    synthetic::random_run(&run, &models::bench_cnn(), records, probes);
    println!(
        "trace: {records} records per layer, {probes} probes, written in {:.1} s; median of {repeats}\n",
        t.elapsed().as_secs_f64()
    );
    println!(
        "{:<7} {:<22} {:>8} {:>7} {:>12} {:>9} {:>14} {:>9} {:>7}",
        "layer", "kind", "records", "probes", "pairs", "attr s", "pairs/s", "scan s", "ratio"
    );
    let m = Manifest::load(&run).expect("manifest");
    let mut summary = Vec::new();
    for layer in m.model.traced_layers() {
        let kind = match layer {
            TracedLayer::Linear(l) => format!("linear {}x{}", l.out_features, l.in_features),
            TracedLayer::Conv2d(c) => format!(
                "conv {}x{}x{}x{} {:?}",
                c.out_channels, c.in_channels, c.kernel[0], c.kernel[1], c.storage
            )
            .to_lowercase(),
            other => format!("{} {:?}", other.kind_name(), other.weight_shape()),
        };
        // Warm the page cache, then time the bare decode and the attribution
        // alternately, so that both see the same machine state.
        let (_, n) = bare_scan(&run, layer.name());
        let options = Options {
            probes: ProbeSelection::All,
            layers: vec![layer.name().to_owned()],
            ..Options::default()
        };
        let (mut scans, mut attrs, mut rows) = (Vec::new(), Vec::new(), 0);
        for _ in 0..repeats {
            scans.push(bare_scan(&run, layer.name()).0);
            let start = Instant::now();
            rows = attribute(&run, &options, &mut |_| {})
                .expect("attribute")
                .rows;
            attrs.push(start.elapsed().as_secs_f64());
        }
        let (scan, secs) = (median(&mut scans), median(&mut attrs));
        let pairs = (n * probes) as f64;
        println!(
            "{:<7} {:<22} {:>8} {:>7} {:>12} {:>9.3} {:>14.0} {:>9.3} {:>7.2}",
            layer.name(),
            kind,
            n,
            probes,
            rows,
            secs,
            pairs / secs,
            scan,
            scan / secs
        );
        summary.push(format!(
            "BENCH attribution layer={} kind={} records={n} probes={probes} pairs_per_s={:.0} \
             attr_s={secs:.6} scan_s={scan:.6} ratio={:.4} repeats={repeats}",
            layer.name(),
            kind.replace(' ', "_"),
            pairs / secs,
            scan / secs
        ));
    }
    println!(
        "ratio = bare-decode time / attribution time (the attribution's share of the scan rate)"
    );
    for line in summary {
        println!("{line}");
    }
    wide_sequence(repeats);
}
