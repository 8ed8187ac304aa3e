// cargo run -p reptrace-record --example synthetic -- runs/synthetic [f16]
//
//! Writes a synthetic trace through the recorder's public API: a small CNN
//! (one Conv2d and two Linear layers, all traced) "trained" for a few epochs
//! on 8×8 single-channel inputs, with a commit point and a weights snapshot
//! at every epoch end, probes for the test instances, and final weights.
//!
//! The numbers are random — ReLU-like sparse layer inputs `u`, small
//! Gaussian `v = −η·δ` — so the run shows the API and the on-disk layout
//! (open it with `reptrace info runs/synthetic`, pandas or DuckDB), not a
//! real training run. The shapes follow the format exactly: a Linear
//! record has `u` = in_features values and `v` = out_features; the Conv2d
//! layer stores whichever of factors or the full per-example ΔW is smaller.
//! The run is written by `reptrace_testkit::synthetic::cnn_example`, which
//! the tests share.
use reptrace_format::Dtype;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "runs/synthetic".into()),
    );
    let dtype = match std::env::args().nth(2).as_deref() {
        Some("f16") => Dtype::F16,
        _ => Dtype::F32,
    };
    let manifest = reptrace_testkit::synthetic::cnn_example(&out, dtype)?;
    println!(
        "wrote {}: {} commits, last step {}",
        out.display(),
        manifest.commits.len(),
        manifest.last_step().map(|s| s.0).unwrap_or(-1)
    );
    Ok(())
}
