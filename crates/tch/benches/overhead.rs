//! Tracing overhead: traced / untraced training time.
//!
//! ```text
//! cargo bench -p reptrace-tch --bench overhead
//! ```
//!
//! MLP 784-256-10, batch 64, plain SGD, on MNIST-shaped synthetic data
//! (class prototypes plus noise), every layer traced. Each repeat trains
//! untraced, traced with f32 and with f16 factors, each with the storage
//! encoding (zstd) and without compression (`--compression none`), and
//! traced with f32 factors without the `examples` table (training
//! dynamics), side by side, so that all of them see the same machine
//! state; the table gives medians. "loop" is the training loop (steps and epoch-end commits);
//! "total" adds the final flush of the recorder's queue and the last commit.
//! Of the loop, "factors" is the time spent building the factors and copying
//! them to the host, "recorder" the time spent in recorder calls, which block
//! while the writer thread's queue is full.
//!
//! The ratios are medians of the per-repeat ratios (each traced run over the
//! untraced run of the same repeat). Besides the table, one line per traced
//! variant for scripts (`scripts/bench.sh`):
//! `BENCH overhead dtype=f32 compression=zstd ratio=R loop_ratio=L untraced_ms_per_step=M steps=S repeats=N`,
//! where `ratio` is the total-time ratio (the trace is complete only once the
//! recorder has flushed); f16 time over f32 time, per compression:
//! `BENCH f16_over_f32 compression=none ratio=R loop_ratio=L …`; and the
//! cost of the `examples` table, traced f32 over traced f32 without it (per
//! repeat, then the median):
//! `BENCH examples ratio=R loop_ratio=L steps=S repeats=N`.
//! `REPTRACE_BENCH_ONLY` (a variant's name, e.g. `f32 none`) runs the
//! untraced loop and that variant only, for a profiler.
//!
//! Environment: `REPTRACE_BENCH_REPEATS` (default 5), `REPTRACE_BENCH_ROWS`
//! (training rows, default 6400 = 100 steps), `REPTRACE_BENCH_EPOCHS`
//! (default 1), `REPTRACE_BENCH_DEVICE` (`cpu`, `cuda`), `REPTRACE_BENCH_THREADS`,
//! and the shape: `REPTRACE_BENCH_INPUT` (784 = 1×28×28, or 3072 = 3×32×32),
//! `REPTRACE_BENCH_HIDDEN` (256), `REPTRACE_BENCH_BATCH` (64);
//! `scripts/gpu-check.sh` runs 3072-1024-10 at batch 256 too.
use rand::{Rng, SeedableRng};
use reptrace_format::Dtype;
use reptrace_record::Compression;
use reptrace_tch::{
    Dataset, DeviceChoice, ModelChoice, ProbeSet, TraceLayers, TrainConfig, train_on,
};
use reptrace_testkit::bench::median;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` examples of `shape` (MNIST- or CIFAR-shaped): a fixed random
/// prototype per class plus noise, clipped to [0, 1].
fn synthetic(n_train: usize, n_test: usize, shape: &[usize]) -> Dataset {
    let width: usize = shape.iter().product();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let protos: Vec<Vec<f32>> = (0..10)
        .map(|_| {
            (0..width)
                .map(|_| if rng.random::<f32>() < 0.2 { 1.0 } else { 0.0 })
                .collect()
        })
        .collect();
    let n = n_train + n_test;
    let mut features = Vec::with_capacity(n * width);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let l = rng.random_range(0..10usize);
        labels.push(l as i32);
        features.extend(
            protos[l]
                .iter()
                .map(|&p| (p + 0.3 * (rng.random::<f32>() - 0.5)).clamp(0.0, 1.0)),
        );
    }
    let classes = (0..10).map(|c| c.to_string()).collect();
    Dataset::new(
        "synthetic",
        shape.to_vec(),
        classes,
        features,
        labels,
        n_train,
    )
    .expect("valid data set")
}

fn main() {
    // As `reptrace train` does at start, for untraced and traced runs alike.
    reptrace_tch::keep_freed_memory();
    // `cargo test --benches` runs bench binaries with `--bench` absent: keep it short then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let repeats: usize = env("REPTRACE_BENCH_REPEATS", if quick { 1 } else { 5 });
    let rows: usize = env("REPTRACE_BENCH_ROWS", if quick { 640 } else { 6400 });
    let epochs: usize = env("REPTRACE_BENCH_EPOCHS", 1);
    let device: DeviceChoice = std::env::var("REPTRACE_BENCH_DEVICE")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or_default();
    let threads: Option<usize> = std::env::var("REPTRACE_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok());
    let input: usize = env("REPTRACE_BENCH_INPUT", 784);
    let hidden: usize = env("REPTRACE_BENCH_HIDDEN", 256);
    let batch: usize = env("REPTRACE_BENCH_BATCH", 64);
    let shape = match input {
        3072 => vec![3, 32, 32],
        784 => vec![1, 28, 28],
        other => vec![other],
    };
    let data = synthetic(rows, 64, &shape);
    let dir = tempfile::tempdir().expect("temporary directory");
    let base = TrainConfig {
        model: ModelChoice::Mlp {
            hidden: vec![hidden],
        },
        epochs,
        batch_size: batch,
        lr: 0.05,
        probes: ProbeSet::None,
        device,
        threads,
        ..TrainConfig::default()
    };
    // (name, layers, dtype, compression, examples table)
    let all: [(&str, TraceLayers, Dtype, Compression, bool); 6] = [
        (
            "untraced",
            TraceLayers::None,
            Dtype::F32,
            Compression::Zstd,
            true,
        ),
        (
            "f32 zstd",
            TraceLayers::All,
            Dtype::F32,
            Compression::Zstd,
            true,
        ),
        (
            "f16 zstd",
            TraceLayers::All,
            Dtype::F16,
            Compression::Zstd,
            true,
        ),
        (
            "f32 none",
            TraceLayers::All,
            Dtype::F32,
            Compression::None,
            true,
        ),
        (
            "f16 none",
            TraceLayers::All,
            Dtype::F16,
            Compression::None,
            true,
        ),
        (
            "f32 no ex.",
            TraceLayers::All,
            Dtype::F32,
            Compression::Zstd,
            false,
        ),
    ];
    let only = std::env::var("REPTRACE_BENCH_ONLY").ok();
    let variants: Vec<_> = all
        .into_iter()
        .enumerate()
        .filter(|(i, v)| *i == 0 || only.as_deref().is_none_or(|o| o == v.0))
        .map(|(_, v)| v)
        .collect();
    let index = |name: &str| variants.iter().position(|v| v.0 == name);
    // Warm-up (allocator, libtorch kernels), not measured: the first traced
    // variant's settings (so that a profile of one variant sees only it).
    let first = &variants[variants.len().min(2) - 1];
    let warm = TrainConfig {
        out: dir.path().join("warm"),
        trace_layers: first.1.clone(),
        dtype: first.2,
        compression: first.3,
        ..base.clone()
    };
    train_on(&warm, &data, &mut |_| {}).expect("warm-up run");
    let mut loop_s = vec![Vec::new(); variants.len()];
    let mut total_s = vec![Vec::new(); variants.len()];
    let mut factor_s = vec![Vec::new(); variants.len()];
    let mut record_s = vec![Vec::new(); variants.len()];
    let mut bytes = vec![0u64; variants.len()];
    for r in 0..repeats {
        for (i, (name, trace, dtype, compression, examples)) in variants.iter().enumerate() {
            let out = dir.path().join(format!("r{r}-{i}"));
            let cfg = TrainConfig {
                trace_layers: trace.clone(),
                dtype: *dtype,
                compression: *compression,
                examples: *examples,
                out: out.clone(),
                ..base.clone()
            };
            let s = train_on(&cfg, &data, &mut |_| {}).unwrap_or_else(|e| panic!("{name}: {e}"));
            loop_s[i].push(s.train_seconds);
            total_s[i].push(s.total_seconds);
            factor_s[i].push(s.factor_seconds);
            record_s[i].push(s.record_seconds);
            if let Some((_, m)) = &s.run {
                bytes[i] = m
                    .files(reptrace_format::Table::Updates)
                    .iter()
                    .map(|f| f.bytes)
                    .sum();
            }
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    let steps = rows.div_ceil(batch) * epochs;
    println!(
        "tracing overhead: MLP {input}-{hidden}-10, batch {batch}, {steps} steps, device {device}, threads {}, {repeats} repeats (medians)",
        threads.map_or("auto".to_owned(), |t| t.to_string())
    );
    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>10} {:>10} {:>11} {:>14}",
        "variant",
        "loop s",
        "total s",
        "ms/step",
        "factors s",
        "recorder s",
        "ratio",
        "updates bytes"
    );
    let base_loop = median(&mut loop_s[0].clone());
    // Per repeat, variant i over variant `base` of the same repeat; then the median.
    let ratio_to = |times: &[Vec<f64>], i: usize, base: usize| -> f64 {
        let mut r: Vec<f64> = times[i]
            .iter()
            .zip(&times[base])
            .map(|(t, base)| t / base)
            .collect();
        median(&mut r)
    };
    let ratios = |times: &[Vec<f64>], i: usize| ratio_to(times, i, 0);
    let mut summary = Vec::new();
    if let (Some(with), Some(without)) = (index("f32 zstd"), index("f32 no ex.")) {
        summary.push(format!(
            "BENCH examples ratio={:.4} loop_ratio={:.4} steps={steps} repeats={repeats}",
            ratio_to(&total_s, with, without),
            ratio_to(&loop_s, with, without)
        ));
    }
    for c in [Compression::Zstd, Compression::None] {
        let (f32_name, f16_name) = (format!("f32 {}", c.name()), format!("f16 {}", c.name()));
        if let (Some(f32_i), Some(f16_i)) = (index(&f32_name), index(&f16_name)) {
            summary.push(format!(
                "BENCH f16_over_f32 compression={} ratio={:.4} loop_ratio={:.4} steps={steps} \
                 repeats={repeats}",
                c.name(),
                ratio_to(&total_s, f16_i, f32_i),
                ratio_to(&loop_s, f16_i, f32_i)
            ));
        }
    }
    for (i, (name, _, dtype, compression, examples)) in variants.iter().enumerate() {
        let (loop_ratio, total_ratio) = (ratios(&loop_s, i), ratios(&total_s, i));
        let l = median(&mut loop_s[i]);
        let t = median(&mut total_s[i]);
        println!(
            "{name:<12} {l:>8.3} {t:>8.3} {:>8.3} {:>10.3} {:>10.3} {:>11} {:>14}",
            1000.0 * l / steps as f64,
            median(&mut factor_s[i]),
            median(&mut record_s[i]),
            format!("{loop_ratio:.2}/{total_ratio:.2}"),
            bytes[i]
        );
        if i > 0 && *examples {
            summary.push(format!(
                "BENCH overhead dtype={dtype} compression={} ratio={total_ratio:.4} \
                 loop_ratio={loop_ratio:.4} \
                 untraced_ms_per_step={:.4} steps={steps} repeats={repeats} \
                 model={input}-{hidden}-10 batch={batch} device={device}",
                compression.name(),
                1000.0 * base_loop / steps as f64
            ));
        }
    }
    println!(
        "ratio = loop/total time relative to untraced; factors = building and copying the factors, \
         recorder = time in recorder calls (waits on its bounded queue included)"
    );
    for line in summary {
        println!("{line}");
    }
}
