//! Write throughput of the recorder and the size of the trace on disk.
//!
//! `cargo bench -p reptrace-record --bench write`
//!
//! Records an MLP 784-256-10 (both layers traced, batch 64) with realistic
//! factors — ReLU-like sparse inputs `u` (about half zeros), Gaussian
//! `v = −η·δ` — and prints, per factor dtype and zstd level (and without
//! compression, `none`): the raw f32 size of the factors handed over, the
//! bytes on disk, their ratio, and the rate at which the recorder accepted
//! the data (until the last `updates` call returned) and wrote it (until
//! `finish` returned). The run recorded without compression is then
//! compacted (`reptrace_record::compact`), timed, and its size compared
//! with the zstd-1 run's.
//!
//! Environment: `REPTRACE_BENCH_STEPS` (default 400), `REPTRACE_BENCH_REPEATS`
//! (default 3; the row is the run with the median total time). Besides the
//! table, one line per row for scripts (`scripts/bench.sh`):
//! `BENCH storage data=synthetic dtype=f32 zstd=3 default=true ratio=R raw_bytes=… disk_bytes=… steps=S repeats=N`
//! (`default`: the recorder's default zstd level; `zstd=none`: uncompressed);
//! `BENCH write dtype=f16 compression=none seconds=… steps=S` (the writer's
//! total time); `BENCH compact dtype=f32 seconds=… seconds_per_gb=…
//! input_bytes=… output_bytes=… zstd_bytes=…` (per GB of uncompressed input).
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reptrace_format::{Dtype, LinearSpec, Model, Module, Optimizer, Table};
use reptrace_record::{Compression, ParquetOptions, Recorder, StepRow, UpdateBatch, compact};
use std::time::Instant;

const BATCH: usize = 64;
/// Distinct pre-generated batches, cycled (generation is not timed).
const VARIANTS: usize = 40;
const LAYERS: [(&str, usize, usize); 2] = [("fc1", 784, 256), ("fc2", 256, 10)];

fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

struct Data {
    /// Per variant, per layer: (u, v).
    batches: Vec<Vec<(Vec<f32>, Vec<f32>)>>,
}

fn data() -> Data {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let batches = (0..VARIANTS)
        .map(|_| {
            LAYERS
                .iter()
                .map(|&(_, i, o)| {
                    let u = (0..BATCH * i)
                        .map(|_| gaussian(&mut rng).max(0.0))
                        .collect();
                    let v = (0..BATCH * o).map(|_| 1e-3 * gaussian(&mut rng)).collect();
                    (u, v)
                })
                .collect()
        })
        .collect();
    Data { batches }
}

fn model() -> Model {
    Model {
        structure: Default::default(),
        name: "mlp".into(),
        input_shape: vec![784],
        modules: LAYERS
            .iter()
            .map(|&(name, i, o)| Module::Linear(LinearSpec::new(name, i, o, true)))
            .collect(),
        frozen: Vec::new(),
    }
}

struct Row {
    raw: u64,
    disk: u64,
    accept_s: f64,
    total_s: f64,
    /// Compaction: seconds, bytes of the parts it read, bytes of the
    /// compacted `updates`.
    compacted: Option<(f64, u64, u64)>,
}

/// Records `steps` steps with zstd at `level`, or uncompressed (`None`,
/// then compacted).
fn run(data: &Data, dtype: Dtype, level: Option<i32>, steps: usize) -> Row {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = dir.path().join("run");
    let mut rec = Recorder::builder(&run)
        .model(model())
        .optimizer(Optimizer::sgd(0.1))
        .dtype(dtype)
        .zstd_level(level.unwrap_or(1))
        .compression(level.map_or(Compression::None, |_| Compression::Zstd))
        .build()
        .expect("recorder");
    let ids: Vec<i64> = (0..BATCH as i64).collect();
    let labels = vec![0i32; BATCH];
    let start = Instant::now();
    let mut raw = 0u64;
    for t in 0..steps {
        let step = t as i64;
        rec.step(StepRow {
            step,
            epoch: 0,
            lr: 0.1,
            batch_size: BATCH as i32,
            loss: 1.0,
            skipped: false,
        })
        .expect("step");
        for (l, (u, v)) in LAYERS.iter().zip(&data.batches[t % VARIANTS]) {
            rec.updates(
                l.0,
                UpdateBatch {
                    step,
                    epoch: 0,
                    instance_ids: &ids,
                    labels: &labels,
                    u,
                    v,
                    update_norm: None,
                    positions: None,
                },
            )
            .expect("updates");
            raw += ((u.len() + v.len()) * 4) as u64;
        }
        if t % 100 == 99 {
            rec.commit().expect("commit");
        }
    }
    let accept_s = start.elapsed().as_secs_f64();
    let m = rec.finish(&[]).expect("finish");
    let total_s = start.elapsed().as_secs_f64();
    let disk = m.files(Table::Updates).iter().map(|f| f.bytes).sum();
    let compacted = level.is_none().then(|| {
        let start = Instant::now();
        let report = compact(&run, &ParquetOptions::default()).expect("compact");
        let secs = start.elapsed().as_secs_f64();
        let m = reptrace_format::Manifest::load(&run).expect("manifest");
        let updates = m.files(Table::Updates).iter().map(|f| f.bytes).sum();
        (secs, report.bytes_before, updates)
    });
    Row {
        raw,
        disk,
        accept_s,
        total_s,
        compacted,
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let steps = env("REPTRACE_BENCH_STEPS", 400);
    let repeats = env("REPTRACE_BENCH_REPEATS", 3).max(1);
    let default_level = ParquetOptions::default().zstd_level;
    let data = data();
    println!(
        "recorder write bench: MLP 784-256-10, batch {BATCH}, {steps} steps, \
         ReLU-sparse u, Gaussian v, median of {repeats}, {} threads available",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "{:<6} {:>5} {:>12} {:>12} {:>8} {:>12} {:>12}",
        "dtype", "zstd", "raw f32 MB", "on disk MB", "ratio", "accept MB/s", "write MB/s"
    );
    let mut summary = Vec::new();
    for dtype in [Dtype::F32, Dtype::F16] {
        let mut zstd1_bytes = 0;
        for level in [Some(1), Some(3), None] {
            // The run with the median total time.
            let mut rows: Vec<Row> = (0..repeats)
                .map(|_| run(&data, dtype, level, steps))
                .collect();
            rows.sort_by(|a, b| a.total_s.total_cmp(&b.total_s));
            let r = &rows[rows.len() / 2];
            let mb = r.raw as f64 / 1e6;
            let name = level.map_or("none".to_owned(), |l| l.to_string());
            println!(
                "{:<6} {:>5} {:>12.1} {:>12.1} {:>8.3} {:>12.0} {:>12.0}",
                dtype.to_string(),
                name,
                mb,
                r.disk as f64 / 1e6,
                r.disk as f64 / r.raw as f64,
                mb / r.accept_s,
                mb / r.total_s
            );
            summary.push(format!(
                "BENCH storage data=synthetic dtype={dtype} zstd={name} default={} ratio={:.4} \
                 raw_bytes={} disk_bytes={} steps={steps} repeats={repeats}",
                level == Some(default_level),
                r.disk as f64 / r.raw as f64,
                r.raw,
                r.disk
            ));
            summary.push(format!(
                "BENCH write dtype={dtype} compression={} seconds={:.4} steps={steps} \
                 repeats={repeats}",
                if level.is_some() {
                    format!("zstd{name}")
                } else {
                    name.clone()
                },
                r.total_s
            ));
            if level == Some(1) {
                zstd1_bytes = r.disk;
            }
            if let Some((secs, input, output)) = r.compacted {
                println!(
                    "{:<6} {:>5} compacted to {:.1} MB ({:.3} of the zstd-1 run) in {secs:.2} s: \
                     {:.2} s per GB of uncompressed parts",
                    dtype.to_string(),
                    "",
                    output as f64 / 1e6,
                    output as f64 / zstd1_bytes.max(1) as f64,
                    secs / (input as f64 / 1e9)
                );
                summary.push(format!(
                    "BENCH compact dtype={dtype} seconds={secs:.4} seconds_per_gb={:.4} \
                     input_bytes={} output_bytes={} zstd_bytes={zstd1_bytes} steps={steps} \
                     repeats={repeats}",
                    secs / (input as f64 / 1e9),
                    input,
                    output
                ));
            }
        }
    }
    for line in summary {
        println!("{line}");
    }
}
