//! The report's header names the optimizer once and shows the learning rate
//! once, as the range the steps applied, to a few significant digits.
#![allow(clippy::unwrap_used)]
use reptrace_format::{Optimizer, Split};
use reptrace_record::ProbeBatch;
use reptrace_testkit::handmade::{self, Batch, Handmade};

/// A layer `fc` (2 inputs, 1 output) trained for two steps whose learning
/// rates are `lrs`, with instance 2 as probe; the producer names its
/// optimizer `SGD` in the settings, as the Python package does.
fn run_with_rates(dir: &std::path::Path, lrs: [f64; 2]) {
    let mut rec = Handmade::with(dir, handmade::tiny(2, 1, false), &["a", "b"], |b| {
        b.optimizer(Optimizer::sgd(lrs[0]))
            .setting("optimizer", serde_json::json!("SGD"))
    })
    .loss(0.7);
    rec.instances(&[0, 1, 0], &[Split::Train, Split::Train, Split::Test]);
    rec.weights(&[("fc.weight", &[1, 2], &[0.0, 0.0])]);
    for (step, lr) in lrs.into_iter().enumerate() {
        let batch = Batch::new(step as i64, 0, &[0, 1], &[0, 1]);
        rec.step(&batch, lr);
        rec.update("fc", &batch, &[1.0, 0.0, 0.0, 1.0], &[0.5, -0.25]);
    }
    // W_T = 2 · [0.5, −0.25]; probe input a = [2, 2]: p = W_T a = 1.
    rec.probes(
        "fc",
        ProbeBatch {
            probe_ids: &[2],
            instance_ids: &[None],
            labels: &[0],
            predicted: &[0],
            a: &[2.0, 2.0],
            p: &[1.0],
            positions: None,
        },
    );
    rec.finish(&[("fc.weight", &[1, 2], &[1.0, -0.5])]);
}

fn header_of(lrs: [f64; 2]) -> String {
    let (_tmp, dir) = handmade::temp_run(|run| run_with_rates(run, lrs));
    let options = reptrace_report::Options {
        probe: 2,
        ..Default::default()
    };
    let html = reptrace_report::generate(&dir, &options).unwrap();
    let start = html.find(r#"<table class="kv probe-info">"#).unwrap();
    let end = start + html[start..].find("</table>").unwrap();
    html[start..end].to_owned()
}

#[test]
fn the_optimizer_shows_once_and_a_constant_rate_once() {
    let header = header_of([0.0040000000000000036; 2]);
    assert_eq!(header.matches("<th>optimizer</th>").count(), 1, "{header}");
    assert!(
        header.contains("<th>optimizer</th><td>SGD lr 0.004, schedule constant</td>"),
        "{header}"
    );
    assert!(!header.contains("0.0040000000000000036"), "{header}");
}

#[test]
fn a_varying_rate_shows_its_range() {
    let header = header_of([0.0040000000000000036, 0.00040000000000000034]);
    assert!(
        header.contains("<th>optimizer</th><td>SGD lr 0.0004 to 0.004, schedule constant</td>"),
        "{header}"
    );
}
