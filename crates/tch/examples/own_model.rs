//! cargo run --release -p reptrace-tch --example own_model -- runs/own_model
//!
//! Records a model of your own, trained in a loop of your own: a small
//! residual network (a convolution, a residual block `x + conv(relu(conv(x)))`,
//! a linear classifier: a skip connection none of the presets can express)
//! on the bundled digits, with tch's own SGD (momentum 0.9). Every Linear
//! and Conv2d layer is built through a [`Tracer`], which records each
//! example's share of each update. Then the run is queried with SQL: which
//! training instances built the first test digit's representation.
use reptrace_analyze::{context, open, query::Query};
use reptrace_format::{Optimizer, Split};
use reptrace_tch::trace::{Probes, RunSpec, Step, TracedConv2d, TracedLinear, Tracer};
use std::path::Path;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// The residual network.
#[derive(Debug)]
pub struct ResidualNet {
    stem: TracedConv2d,
    block_a: TracedConv2d,
    block_b: TracedConv2d,
    head: TracedLinear,
}

impl ResidualNet {
    /// Builds the network's layers in `root` through `tracer`.
    pub fn new(root: &nn::Path<'_>, tracer: &mut Tracer) -> reptrace_tch::Result<Self> {
        let same = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            stem: tracer.conv2d(root / "stem", 1, 8, 3, same)?,
            block_a: tracer.conv2d(root / "block" / "a", 8, 8, 3, same)?,
            block_b: tracer.conv2d(root / "block" / "b", 8, 8, 3, same)?,
            head: tracer.linear(root / "head", 8 * 8 * 8, 10, Default::default())?,
        })
    }
}

impl nn::ModuleT for ResidualNet {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Tensor {
        let h = x.apply(&self.stem).relu();
        let r = h.apply(&self.block_a).relu().apply(&self.block_b);
        (h + r).relu().flatten(1, -1).apply(&self.head)
    }
}

/// How the example trains.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Epochs over the training split.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Learning rate (constant).
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Seeds the initial weights and the shuffling.
    pub seed: i64,
    /// Record into this run directory; `None`: train without recording.
    pub out: Option<std::path::PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            epochs: 5,
            batch_size: 32,
            lr: 0.05,
            momentum: 0.9,
            seed: 1,
            out: None,
        }
    }
}

/// Trains the residual network on the digits as `settings` say; returns
/// the final parameters by name and the test accuracy.
pub fn train(settings: &Settings) -> reptrace_tch::Result<(Vec<(String, Tensor)>, f64)> {
    let data = reptrace_tch::data::digits()?;
    tch::manual_seed(settings.seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut tracer = Tracer::new();
    let net = ResidualNet::new(&vs.root(), &mut tracer)?;
    let mut opt = nn::Sgd {
        momentum: settings.momentum,
        ..Default::default()
    }
    .build(&vs, settings.lr)?;

    let n = data.labels.len();
    let x_all = Tensor::from_slice(&data.features).reshape([n as i64, 1, 8, 8]);
    if let Some(out) = &settings.out {
        tracer.record(RunSpec {
            name: "residual".into(),
            optimizer: Optimizer {
                momentum: settings.momentum,
                ..Optimizer::sgd(settings.lr)
            },
            settings: vec![("epochs".into(), settings.epochs.into())],
            ..RunSpec::sgd(out, data.classes.clone(), settings.lr)
        })?;
        let ids: Vec<i64> = (0..n as i64).collect();
        let splits: Vec<Split> = (0..n).map(|r| data.split(r)).collect();
        tracer.instances(&ids, &data.labels, &splits)?;
    }

    // Our own loop: shuffle, forward, loss, backward, (record,) step.
    let mut order: Vec<i64> = (0..data.n_train as i64).collect();
    let mut rng = settings.seed as u64;
    for _epoch in 0..settings.epochs {
        for i in (1..order.len()).rev() {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            order.swap(i, (rng >> 33) as usize % (i + 1));
        }
        for ids in order.chunks(settings.batch_size) {
            let index = Tensor::from_slice(ids);
            let x = x_all.index_select(0, &index);
            let labels: Vec<i32> = ids.iter().map(|&r| data.labels[r as usize]).collect();
            let y = Tensor::from_slice(&labels).to_kind(Kind::Int64);
            opt.zero_grad();
            let logits = net.forward_t(&x, true);
            let loss = logits.cross_entropy_for_logits(&y);
            loss.backward();
            let step = Step {
                loss: &loss,
                ids,
                labels: &labels,
                lr: settings.lr,
                momentum: None,
                logits: Some(&logits),
            };
            tracer.step(&step, || opt.step())?;
        }
        tracer.end_epoch()?;
    }

    let test: Vec<i64> = (data.n_train as i64..n as i64).collect();
    let x_test = x_all.narrow(0, data.n_train as i64, test.len() as i64);
    let accuracy = tch::no_grad(|| {
        let predicted = net.forward_t(&x_test, false).argmax(-1, false);
        let labels: Vec<i64> = data.labels[data.n_train..]
            .iter()
            .map(|&l| l.into())
            .collect();
        predicted
            .eq_tensor(&Tensor::from_slice(&labels))
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[])
    });
    if settings.out.is_some() {
        // The test split as probes: each one's representation is explained.
        let probes = Probes {
            inputs: &x_test,
            labels: &data.labels[data.n_train..],
            ids: &test,
            instance_ids: &[],
        };
        let mut forward = |x: &Tensor| net.forward_t(x, false);
        tracer.finish(Some((&probes, &mut forward)))?;
    }
    let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((params, accuracy))
}

/// Which training instances built probe `probe`'s representation at each
/// layer: the canned query `top_proponents`, printed as a table.
pub fn query(run: &Path, probe: i64) -> Result<String, Box<dyn std::error::Error>> {
    let run = open(run)?;
    let ctx = context(&run)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let probe = probe.to_string();
    let (_, batches) = rt.block_on(
        Query::resolve("top_proponents")?.run(&ctx, &[("probe", probe.as_str()), ("k", "3")]),
    )?;
    Ok(arrow::util::pretty::pretty_format_batches(&batches)?.to_string())
}

fn main() {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "runs/own_model".into());
    let settings = Settings {
        out: Some(out.clone().into()),
        ..Settings::default()
    };
    let (_, accuracy) = match train(&settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    println!("recorded {out}: test accuracy {:.1} %", 100.0 * accuracy);
    let first_test = reptrace_tch::data::digits().map_or(1437, |d| d.n_train as i64);
    match query(Path::new(&out), first_test) {
        Ok(table) => println!("top proponents of probe {first_test}:\n{table}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
