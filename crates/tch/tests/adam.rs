//! Instance mode under Adam and AdamW in the tch producer: tracing leaves
//! training bit-identical, and the check of each applied update against
//! the optimizer's state refuses a preconditioner that would not
//! reconstruct it.
use reptrace_format::{Module, Optimizer, OptimizerKind};
use reptrace_tch::adam::{Adam, Decay};
use reptrace_tch::trace::{RunSpec, Step, Tracer};
use reptrace_tch::{Error, ModelChoice, ProbeSet, TraceLayers, TrainConfig, TrainSummary};
use reptrace_tch::{build_model, train};
use std::sync::Mutex;
use tch::nn::Module as _;
use tch::{Device, Kind, Tensor, nn};

/// libtorch's global random generator (dropout, `randn`) is shared: the
/// tests of this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn bits(summary: &TrainSummary) -> Vec<(String, Vec<u32>)> {
    summary
        .weights
        .iter()
        .map(|t| (t.name.clone(), t.data.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// The final weights of Adam and AdamW runs (MLP with dropout, CNN) with
/// every layer traced and with none are the same bits.
#[test]
fn adam_tracing_does_not_change_training() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut mlp = build_model(&ModelChoice::default(), &[1, 8, 8], 10, &TraceLayers::All).unwrap();
    mlp.modules.insert(3, Module::Dropout { p: 0.2 });
    let cnn = build_model(&ModelChoice::Cnn, &[1, 8, 8], 10, &TraceLayers::All).unwrap();
    for (model, optimizer, wd) in [
        (mlp.clone(), OptimizerKind::Adam, 0.0),
        (mlp, OptimizerKind::Adamw, 0.01),
        (cnn.clone(), OptimizerKind::Adam, 1e-3),
        (cnn, OptimizerKind::Adamw, 0.01),
    ] {
        let name = format!("{}-{optimizer:?}", model.name);
        let base = TrainConfig {
            model: ModelChoice::Custom(model),
            epochs: 1,
            lr: 0.01,
            optimizer,
            weight_decay: wd,
            probes: ProbeSet::None,
            threads: Some(1),
            ..TrainConfig::default()
        };
        let run = |trace: TraceLayers, out: &str| {
            let cfg = TrainConfig {
                out: dir.path().join(out),
                trace_layers: trace,
                ..base.clone()
            };
            train(&cfg, &mut |_| {}).unwrap()
        };
        let traced = run(TraceLayers::All, &format!("{name}-traced"));
        let plain = run(TraceLayers::None, &format!("{name}-plain"));
        let (_, manifest) = traced.run.as_ref().unwrap();
        assert_eq!(manifest.optimizer.kind, optimizer);
        assert_eq!(manifest.mode, reptrace_format::Mode::Instance);
        assert!(plain.run.is_none());
        assert!(
            bits(&traced) == bits(&plain),
            "{name}: tracing changed the final weights"
        );
        assert_eq!(traced.loss.to_bits(), plain.loss.to_bits(), "{name}");
    }
}

/// A user's loop under our Adam: the tracer reads the optimizer's state
/// after each step; a state whose second moment is not the one that made
/// the update (here four times it, from step 1 on) is refused at that
/// step, naming the layer, and the run ends at its last commit.
#[test]
fn a_wrong_preconditioner_is_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut tracer = Tracer::new();
    let fc = tracer
        .linear(vs.root() / "fc", 4, 3, Default::default())
        .unwrap();
    let classes: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    tracer
        .record(RunSpec {
            optimizer: Optimizer {
                kind: OptimizerKind::Adam,
                betas: Some([0.9, 0.999]),
                eps: Some(1e-8),
                ..Optimizer::sgd(0.01)
            },
            ..RunSpec::sgd(dir.path().join("run"), classes, 0.01)
        })
        .unwrap();
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
    let params: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
    let mut opt = Adam::new(params.len(), [0.9, 0.999], 1e-8, 0.0, Decay::L2);
    let ids: Vec<i64> = (0..8).collect();
    let labels: Vec<i32> = (0..8).map(|i| i % 3).collect();
    let y = Tensor::from_slice(&labels.iter().map(|&l| i64::from(l)).collect::<Vec<_>>());
    let mut outcome = Vec::new();
    for step in 0..3 {
        let x = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
        let loss = fc.forward(&x).cross_entropy_for_logits(&y);
        let grads = tracer.backward(&loss, &params).unwrap();
        let s = Step {
            loss: &loss,
            ids: &ids,
            labels: &labels,
            lr: 0.01,
            momentum: None,
            logits: None,
        };
        let lie = step >= 1;
        let r = tracer.step_adam(
            &s,
            &mut opt,
            |o| o.step(&params, &grads, 0.01),
            |o, name| {
                let mut p = o.state(names.iter().position(|n| n == name)?)?;
                if lie {
                    p.exp_avg_sq = p.exp_avg_sq.shallow_clone() * 4.0;
                }
                Some(p)
            },
        );
        let stop = r.is_err();
        outcome.push(r);
        if stop {
            break;
        }
    }
    assert_eq!(outcome.len(), 2, "refused at step 1");
    assert!(matches!(outcome[0], Ok(Ok(()))));
    match &outcome[1] {
        Err(e @ Error::Inexact { layer, step, .. }) => {
            assert_eq!((layer.as_str(), *step), ("fc", 1));
            let line = e.to_string();
            assert_eq!(line.lines().count(), 1, "{line}");
            assert!(line.contains("preconditioner"), "{line}");
        }
        other => panic!("expected Inexact, got {other:?}"),
    }
    let m = reptrace_format::Manifest::load(&dir.path().join("run")).unwrap();
    assert_eq!(m.status, reptrace_format::Status::Aborted);
}
