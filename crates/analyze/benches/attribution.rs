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
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reptrace_analyze::{Options, ProbeSelection, attribute};
use reptrace_format::{
    Conv2dSpec, LinearSpec, Manifest, Model, Module, Optimizer, Split, Storage, Table, TracedLayer,
};
use reptrace_record::{NamedTensor, ProbeBatch, Recorder, StepRow, UpdateBatch};
use std::path::Path;
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn model() -> Model {
    Model {
        structure: Default::default(),
        name: "bench".into(),
        input_shape: vec![1, 8, 8],
        modules: vec![
            Module::Conv2d(Conv2dSpec {
                name: "conv1".into(),
                in_channels: 1,
                out_channels: 8,
                kernel: [3, 3],
                stride: [1, 1],
                padding: [1, 1],
                dilation: [1, 1],
                input_hw: [8, 8],
                output_hw: [8, 8],
                bias: true,
                traced: true,
                storage: Storage::Factors,
            }),
            Module::Conv2d(Conv2dSpec {
                name: "conv2".into(),
                in_channels: 8,
                out_channels: 16,
                kernel: [3, 3],
                stride: [1, 1],
                padding: [1, 1],
                dilation: [1, 1],
                input_hw: [4, 4],
                output_hw: [4, 4],
                bias: true,
                traced: true,
                storage: Storage::Full,
            }),
            Module::Linear(LinearSpec {
                name: "fc1".into(),
                in_features: 64,
                out_features: 32,
                bias: true,
                traced: true,
            }),
            Module::Linear(LinearSpec {
                name: "fc2".into(),
                in_features: 32,
                out_features: 10,
                bias: true,
                traced: true,
            }),
        ],
        frozen: Vec::new(),
    }
}

fn write_trace(dir: &Path, records: usize, probes: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let model = model();
    let mut rec = Recorder::builder(dir)
        .model(model.clone())
        .optimizer(Optimizer::sgd(0.05))
        .classes((0..10).map(|c| c.to_string()).collect())
        .build()
        .expect("recorder");
    let batch = 32usize;
    let n_train = 1000usize;
    let ids: Vec<i64> = (0..(n_train + probes) as i64).collect();
    let labels: Vec<i32> = ids.iter().map(|i| (i % 10) as i32).collect();
    let splits: Vec<Split> = ids
        .iter()
        .map(|&i| {
            if (i as usize) < n_train {
                Split::Train
            } else {
                Split::Test
            }
        })
        .collect();
    rec.instances(&ids, &labels, &splits).expect("instances");
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = model
        .traced_layers()
        .flat_map(|l| {
            let shape = l.weight_shape();
            let n: usize = shape.iter().product();
            let w: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
            let b = vec![0.0f32; shape[0]];
            [
                (format!("{}.weight", l.name()), shape.clone(), w),
                (format!("{}.bias", l.name()), vec![shape[0]], b),
            ]
        })
        .collect();
    let named: Vec<NamedTensor<'_>> = tensors
        .iter()
        .map(|(n, s, d)| NamedTensor {
            name: n,
            shape: s,
            data: d,
        })
        .collect();
    rec.weights(&named).expect("weights");
    rec.commit().expect("commit");
    let steps = records.div_ceil(batch);
    for step in 0..steps {
        rec.step(StepRow {
            step: step as i64,
            epoch: 0,
            lr: 0.05,
            batch_size: batch as i32,
            loss: 1.0,
            skipped: false,
        })
        .expect("step");
        let inst: Vec<i64> = (0..batch)
            .map(|i| ((step * batch + i) % n_train) as i64)
            .collect();
        let lab: Vec<i32> = inst.iter().map(|i| (i % 10) as i32).collect();
        for l in model.traced_layers() {
            let (ul, vl) = l.factor_lens();
            // ReLU-like inputs, small gaussian-ish gradients.
            let u: Vec<f32> = (0..batch * ul)
                .map(|_| rng.random_range(-1.0f32..1.0).max(0.0))
                .collect();
            let v: Vec<f32> = (0..batch * vl)
                .map(|_| rng.random_range(-0.01f32..0.01))
                .collect();
            rec.updates(
                l.name(),
                UpdateBatch {
                    step: step as i64,
                    epoch: 0,
                    instance_ids: &inst,
                    labels: &lab,
                    u: &u,
                    v: &v,
                    update_norm: None,
                },
            )
            .expect("updates");
        }
    }
    for l in model.traced_layers() {
        let (al, pl) = l.probe_lens();
        let a: Vec<f64> = (0..probes * al)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let p: Vec<f64> = (0..probes * pl)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let pid: Vec<i64> = (0..probes as i64).collect();
        let inst: Vec<Option<i64>> = (0..probes).map(|i| Some((n_train + i) as i64)).collect();
        let lab: Vec<i32> = (0..probes as i32).map(|i| i % 10).collect();
        rec.probes(
            l.name(),
            ProbeBatch {
                probe_ids: &pid,
                instance_ids: &inst,
                labels: &lab,
                predicted: &lab,
                a: &a,
                p: &p,
            },
        )
        .expect("probes");
    }
    rec.finish(&named).expect("finish");
}

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
    write_trace(&run, records, probes);
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

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}
