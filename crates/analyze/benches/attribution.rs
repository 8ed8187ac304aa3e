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
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use reptrace_analyze::{Options, ProbeSelection, attribute};
use reptrace_format::{Manifest, Table, TracedLayer};
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

fn main() {
    let records = arg("--records", 20_000);
    let probes = arg("--probes", 100);
    let repeats = arg("--repeats", 3).max(1);
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
}
