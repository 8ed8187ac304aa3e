//! The arithmetic of the "patches" layers (grouped and padded convolutions,
//! conv1d, linear layers over a sequence) against a brute force written
//! from the definitions: ΔW materialised from each record's factors with
//! naive loops, `c = ΔW ⊛ a + Δb` by a naive convolution over an input
//! padded as PyTorch's `F.pad` pads it, then `⟨c, p⟩` and `‖c‖`.
use crate::read;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reptrace_analyze::kernel::conv2d::Unfold;
use reptrace_analyze::kernel::{self, Geometry, ProbeFeatures, RecordFeatures, Route};
use reptrace_analyze::probes::Probes;
use reptrace_analyze::records::Records;
use reptrace_analyze::{Options, ProbeSelection, attribute};
use reptrace_format::{
    Conv1dSpec, Conv2dSpec, LinearSpec, Manifest, Mode, Module, PaddingMode, Storage, TracedLayer,
    displacement_scales,
};
use reptrace_testkit::models::{self, Conv as ConvModule};
use reptrace_testkit::synthetic;

/// A convolution as PyTorch's `nn.Conv2d` takes it.
#[derive(Debug, Clone, Copy)]
struct Conv {
    cin: usize,
    cout: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    input: [usize; 2],
    groups: usize,
    mode: &'static str,
}

impl Conv {
    /// PyTorch's output size: ⌊(n + 2p − d(k−1) − 1)/s⌋ + 1 per axis.
    fn output(&self) -> [usize; 2] {
        [0, 1].map(|d| {
            (self.input[d] + 2 * self.padding[d] - self.dilation[d] * (self.kernel[d] - 1) - 1)
                / self.stride[d]
                + 1
        })
    }

    fn positions(&self) -> usize {
        let [ho, wo] = self.output();
        ho * wo
    }

    /// Weight `[C_out, C_in/G, kh, kw]`, flattened.
    fn weight_len(&self) -> usize {
        self.cout * (self.cin / self.groups) * self.kernel[0] * self.kernel[1]
    }
}

#[derive(Debug, Clone, Copy)]
enum Layer {
    Conv(Conv),
    /// A Conv1d: the `Conv` of height 1 (kernel, stride, padding, dilation
    /// and input `[1, n]`).
    Conv1d(Conv),
    /// A linear layer over `t` positions.
    Seq {
        inp: usize,
        out: usize,
        t: usize,
    },
}

#[derive(Debug, Clone, Copy)]
struct Case {
    layer: Layer,
    bias: bool,
    full: bool,
}

impl Case {
    fn out(&self) -> usize {
        match self.layer {
            Layer::Conv(c) | Layer::Conv1d(c) => c.cout,
            Layer::Seq { out, .. } => out,
        }
    }

    fn weight_len(&self) -> usize {
        match self.layer {
            Layer::Conv(c) | Layer::Conv1d(c) => c.weight_len(),
            Layer::Seq { inp, out, .. } => inp * out,
        }
    }

    fn update_len(&self) -> usize {
        self.weight_len() + if self.bias { self.out() } else { 0 }
    }

    /// Values of a factor record's `u` and `v`.
    fn factor_lens(&self) -> (usize, usize) {
        match self.layer {
            Layer::Conv(c) | Layer::Conv1d(c) => {
                let k = c.cin * c.kernel[0] * c.kernel[1];
                (k * c.positions(), c.cout * c.positions())
            }
            Layer::Seq { inp, out, t } => (t * inp, t * out),
        }
    }

    /// Values of a probe's `a` and `p`.
    fn probe_lens(&self) -> (usize, usize) {
        match self.layer {
            Layer::Conv(c) | Layer::Conv1d(c) => {
                (c.cin * c.input[0] * c.input[1], c.cout * c.positions())
            }
            Layer::Seq { inp, out, t } => (t * inp, t * out),
        }
    }
}

fn mode_of(name: &str) -> PaddingMode {
    match name {
        "zeros" => PaddingMode::Zeros,
        "reflect" => PaddingMode::Reflect,
        "replicate" => PaddingMode::Replicate,
        "circular" => PaddingMode::Circular,
        _ => panic!("no padding mode {name}"),
    }
}

/// The analyzer's geometry of the case, from the format's spec: whole
/// updates are the spec's storage in an instance-mode run with a bias, a
/// batch-mode run without.
fn geometry(case: &Case) -> Geometry {
    let mode = if case.full && !case.bias {
        Mode::Batch
    } else {
        Mode::Instance
    };
    let storage = if case.full && case.bias {
        Storage::Full
    } else {
        Storage::Factors
    };
    let conv2d = |c: Conv| Conv2dSpec {
        name: "c".into(),
        in_channels: c.cin,
        out_channels: c.cout,
        kernel: c.kernel,
        stride: c.stride,
        padding: c.padding,
        dilation: c.dilation,
        groups: c.groups,
        padding_mode: mode_of(c.mode),
        input_hw: c.input,
        output_hw: c.output(),
        bias: case.bias,
        traced: true,
        storage,
    };
    // The format's layouts are the ones the brute force reads.
    let of = |layer: TracedLayer<'_>| {
        assert_eq!(layer.probe_lens(), case.probe_lens(), "probe lens");
        if storage == Storage::Factors {
            assert_eq!(layer.factor_lens(), case.factor_lens(), "factor lens");
        } else {
            assert_eq!(layer.factor_lens(), (0, case.update_len()), "full lens");
        }
        Geometry::of(&layer, mode)
    };
    let geom = match case.layer {
        Layer::Conv(c) => of(TracedLayer::Conv2d(&conv2d(c))),
        Layer::Conv1d(c) => {
            let spec = Conv1dSpec {
                name: "c".into(),
                in_channels: c.cin,
                out_channels: c.cout,
                kernel: c.kernel[1],
                stride: c.stride[1],
                padding: c.padding[1],
                dilation: c.dilation[1],
                groups: c.groups,
                padding_mode: mode_of(c.mode),
                input_len: c.input[1],
                output_len: c.output()[1],
                bias: case.bias,
                traced: true,
                storage,
            };
            of(TracedLayer::Conv1d(&spec))
        }
        Layer::Seq { inp, out, t } => {
            let spec = LinearSpec {
                positions: t,
                storage,
                ..LinearSpec::new("fc", inp, out, case.bias)
            };
            of(TracedLayer::Linear(&spec))
        }
    };
    geom.expect("geometry")
}

/// One axis of `F.pad`: the input indices the padded axis reads, left pad
/// first (`n` long input, `p` on each side).
fn padded_axis(n: usize, p: usize, mode: &str) -> Vec<Option<usize>> {
    let inner: Vec<Option<usize>> = (0..n).map(Some).collect();
    let (left, right): (Vec<Option<usize>>, Vec<Option<usize>>) = match mode {
        "zeros" => (vec![None; p], vec![None; p]),
        // Mirror without repeating the edge: x[p], …, x[1] | x | x[n−2], …
        "reflect" => (
            (1..=p).rev().map(Some).collect(),
            (1..=p).map(|k| Some(n - 1 - k)).collect(),
        ),
        "replicate" => (vec![Some(0); p], vec![Some(n - 1); p]),
        // Wrap around: x[n−p..n] | x | x[0..p]
        "circular" => ((n - p..n).map(Some).collect(), (0..p).map(Some).collect()),
        _ => panic!("no padding mode {mode}"),
    };
    [left, inner, right].concat()
}

/// The input `a` (C_in×h×w) padded by the conv's mode: (C_in, H, W) values.
fn pad(c: &Conv, a: &[f64]) -> (Vec<f64>, usize, usize) {
    let [h, w] = c.input;
    let rows = padded_axis(h, c.padding[0], c.mode);
    let cols = padded_axis(w, c.padding[1], c.mode);
    let mut out = Vec::new();
    for ch in 0..c.cin {
        for y in &rows {
            for x in &cols {
                out.push(match (y, x) {
                    (Some(y), Some(x)) => a[ch * h * w + y * w + x],
                    _ => 0.0,
                });
            }
        }
    }
    (out, rows.len(), cols.len())
}

/// `c = W ⊛ a + b` in the layout of `p`, `w` the weight as PyTorch stores it.
fn apply(case: &Case, w: &[f64], b: &[f64], a: &[f64]) -> Vec<f64> {
    match case.layer {
        Layer::Conv(c) | Layer::Conv1d(c) => {
            let (padded, hp, wp) = pad(&c, a);
            let [ho, wo] = c.output();
            let [kh, kw] = c.kernel;
            let (cin_g, cout_g) = (c.cin / c.groups, c.cout / c.groups);
            let mut out = vec![0.0; c.cout * ho * wo];
            for o in 0..c.cout {
                let g = o / cout_g;
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut z = if case.bias { b[o] } else { 0.0 };
                        for ci in 0..cin_g {
                            let ch = g * cin_g + ci;
                            for i in 0..kh {
                                for j in 0..kw {
                                    let y = oy * c.stride[0] + i * c.dilation[0];
                                    let x = ox * c.stride[1] + j * c.dilation[1];
                                    let wv = w[((o * cin_g + ci) * kh + i) * kw + j];
                                    z += wv * padded[(ch * hp + y) * wp + x];
                                }
                            }
                        }
                        out[(o * ho + oy) * wo + ox] = z;
                    }
                }
            }
            out
        }
        Layer::Seq { inp, out, t } => {
            let mut c = vec![0.0; t * out];
            for s in 0..t {
                for o in 0..out {
                    let mut z = if case.bias { b[o] } else { 0.0 };
                    for i in 0..inp {
                        z += w[o * inp + i] * a[s * inp + i];
                    }
                    c[s * out + o] = z;
                }
            }
            c
        }
    }
}

/// `[vec ΔW, Δb]` of record `r`, scaled by `scale`, from its `u`, `v`.
fn delta(case: &Case, u: &[f64], v: &[f64], scale: f64) -> Vec<f64> {
    if case.full {
        return v.iter().map(|x| scale * x).collect();
    }
    let mut d = vec![0.0; case.update_len()];
    match case.layer {
        Layer::Conv(c) | Layer::Conv1d(c) => {
            // u = unfold (C_in·kh·kw × P), v = C_out × P.
            let p = c.positions();
            let kk = c.kernel[0] * c.kernel[1];
            let (cin_g, cout_g) = (c.cin / c.groups, c.cout / c.groups);
            for o in 0..c.cout {
                let g = o / cout_g;
                for ci in 0..cin_g {
                    for ij in 0..kk {
                        let row = (g * cin_g + ci) * kk + ij;
                        let mut s = 0.0;
                        for q in 0..p {
                            s += v[o * p + q] * u[row * p + q];
                        }
                        d[(o * cin_g + ci) * kk + ij] = scale * s;
                    }
                }
                if case.bias {
                    d[c.weight_len() + o] = scale * v[o * p..(o + 1) * p].iter().sum::<f64>();
                }
            }
        }
        Layer::Seq { inp, out, t } => {
            // u = t × in, v = t × out.
            for s in 0..t {
                for o in 0..out {
                    for i in 0..inp {
                        d[o * inp + i] += scale * v[s * out + o] * u[s * inp + i];
                    }
                    if case.bias {
                        d[inp * out + o] += scale * v[s * out + o];
                    }
                }
            }
        }
    }
    d
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn close(what: &str, got: f64, want: f64) {
    let tol = 1e-9 * want.abs().max(1.0);
    assert!(
        (got - want).abs() <= tol,
        "{what}: {got} against {want} (difference {})",
        got - want
    );
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Random records and probes of `case` through every entry point of the
/// kernel, against the brute force.
fn check(name: &str, case: Case, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let geom = geometry(&case);
    assert_eq!(geom.weight_len(), case.weight_len(), "{name}: weight_len");
    assert_eq!(geom.delta_len(), case.update_len(), "{name}: delta_len");
    let (n_rec, n_probe) = (4, 3);
    let (ul, vl) = if case.full {
        (0, case.update_len())
    } else {
        case.factor_lens()
    };
    let mut recs = Records {
        step: vec![0; n_rec],
        epoch: vec![0; n_rec],
        instance_id: vec![None; n_rec],
        label: vec![None; n_rec],
        ..Records::default()
    };
    for _ in 0..n_rec {
        let (u, v) = (random(&mut rng, ul), random(&mut rng, vl));
        recs.push_lists(&u, &v);
    }
    let scales = random(&mut rng, n_rec);
    let (al, pl) = case.probe_lens();
    let mut probes = Probes {
        probe_id: (0..n_probe as i64).collect(),
        instance_id: vec![None; n_probe],
        label: vec![0; n_probe],
        predicted: vec![0; n_probe],
        p_norm: vec![0.0; n_probe],
        ..Probes::default()
    };
    for _ in 0..n_probe {
        let (a, p) = (random(&mut rng, al), random(&mut rng, pl));
        probes.push_lists(&a, &p);
    }
    let deltas: Vec<Vec<f64>> = (0..n_rec)
        .map(|r| delta(&case, recs.u_of(r), recs.v_of(r), scales[r]))
        .collect();
    let wl = case.weight_len();
    // The route ProbeFeatures::new takes, then each route forced (the
    // factor route where the layer has it: factor records, no groups).
    let mut routes = vec![None, Some(Route::Gram)];
    assert_eq!(
        geom.has_factor_route(),
        !case.full && !matches!(case.layer, Layer::Conv(c) | Layer::Conv1d(c) if c.groups > 1),
        "{name}: factor route"
    );
    if geom.has_factor_route() {
        routes.push(Some(Route::Factors));
    } else {
        let err = ProbeFeatures::with_route(&geom, &probes, Route::Factors);
        assert!(err.is_err(), "{name}: a factor route without one");
    }
    let rows: Vec<usize> = (0..n_rec).collect();
    for route in routes {
        let name = format!("{name} {route:?}");
        let pf = match route {
            None => ProbeFeatures::new(&geom, &probes),
            Some(route) => ProbeFeatures::with_route(&geom, &probes, route),
        }
        .expect("probe features");
        assert!(route.is_none_or(|r| r == pf.route()), "{name}: route");
        let rf =
            RecordFeatures::for_probes(&geom, &pf, &recs, &scales, &rows).expect("record features");
        let (dots, norms) = rf.all_pairs(&pf).expect("all pairs");
        for (q, (a, p)) in probes.a.chunks(al).zip(probes.p.chunks(pl)).enumerate() {
            for (r, d) in deltas.iter().enumerate() {
                let c = apply(&case, &d[..wl], &d[wl..], a);
                let (want_dot, want_norm) = (dot(&c, p), dot(&c, &c).sqrt());
                close(&format!("{name}: dot {q},{r}"), dots[[q, r]], want_dot);
                close(&format!("{name}: norm {q},{r}"), norms[[q, r]], want_norm);
                let (d1, n1) = rf.pair(&pf, r, q);
                close(&format!("{name}: pair dot {q},{r}"), d1, want_dot);
                close(&format!("{name}: pair norm {q},{r}"), n1, want_norm);
            }
        }
    }
    // The deltas of a subset, in its order.
    let some = kernel::deltas(&geom, &recs, &scales, &[2, 0]).expect("deltas");
    for (k, r) in [2, 0].into_iter().enumerate() {
        for (i, want) in deltas[r].iter().enumerate() {
            close(&format!("{name}: delta {r}[{i}]"), some[[k, i]], *want);
        }
    }
    // accumulate = Σ ΔW (onto what is there).
    let start = random(&mut rng, case.update_len());
    let mut sum = start.clone();
    kernel::accumulate(&geom, &recs, &scales, &mut sum).expect("accumulate");
    for (i, got) in sum.iter().enumerate() {
        let want = start[i] + deltas.iter().map(|d| d[i]).sum::<f64>();
        close(&format!("{name}: accumulate [{i}]"), *got, want);
    }
    // direct: a weight change R applied to each probe.
    let change = random(&mut rng, case.update_len());
    let split = kernel::split_delta(&geom, &change);
    assert_eq!(split.weight.len(), wl, "{name}: split weight");
    for (q, (a, p)) in probes.a.chunks(al).zip(probes.p.chunks(pl)).enumerate() {
        let c = apply(&case, &change[..wl], &change[wl..], a);
        let (d, n) = kernel::direct(&geom, &split, a, p).expect("direct");
        close(&format!("{name}: direct dot {q}"), d, dot(&c, p));
        close(&format!("{name}: direct norm {q}"), n, dot(&c, &c).sqrt());
    }
}

/// Every case with and without bias, factors and full records.
fn check_all(name: &str, layer: Layer, seed: u64) {
    for (k, (bias, full)) in [(true, false), (false, false), (true, true), (false, true)]
        .into_iter()
        .enumerate()
    {
        let case = Case { layer, bias, full };
        check(
            &format!("{name} (bias {bias}, full {full})"),
            case,
            seed + k as u64,
        );
    }
}

const CONV: Conv = Conv {
    cin: 4,
    cout: 6,
    kernel: [3, 2],
    stride: [2, 1],
    padding: [1, 2],
    dilation: [1, 2],
    input: [5, 6],
    groups: 1,
    mode: "zeros",
};

#[test]
fn conv2d_groups_2() {
    check_all("groups 2", Layer::Conv(Conv { groups: 2, ..CONV }), 10);
}

#[test]
fn conv2d_depthwise() {
    let layer = Conv {
        cin: 3,
        cout: 6,
        groups: 3,
        kernel: [3, 3],
        stride: [1, 2],
        padding: [2, 1],
        dilation: [2, 1],
        mode: "reflect",
        ..CONV
    };
    check_all("depthwise", Layer::Conv(layer), 20);
}

#[test]
fn conv2d_reflect() {
    check_all(
        "reflect",
        Layer::Conv(Conv {
            mode: "reflect",
            ..CONV
        }),
        30,
    );
}

#[test]
fn conv2d_replicate() {
    let layer = Conv {
        mode: "replicate",
        groups: 2,
        padding: [2, 3],
        stride: [2, 2],
        ..CONV
    };
    check_all("replicate", Layer::Conv(layer), 40);
}

#[test]
fn conv2d_circular() {
    let layer = Conv {
        mode: "circular",
        padding: [2, 1],
        dilation: [2, 1],
        ..CONV
    };
    check_all("circular", Layer::Conv(layer), 50);
}

#[test]
fn conv1d() {
    // A Conv1d is a Conv2d of height 1.
    let layer = Conv {
        cin: 4,
        cout: 2,
        kernel: [1, 3],
        stride: [1, 2],
        padding: [0, 2],
        dilation: [1, 2],
        input: [1, 9],
        groups: 2,
        mode: "circular",
    };
    check_all("conv1d", Layer::Conv1d(layer), 60);
}

#[test]
fn conv1d_ungrouped_zeros_and_reflect() {
    // Both routes (factor records of an ungrouped layer).
    for (k, mode) in ["zeros", "reflect"].into_iter().enumerate() {
        let layer = Conv {
            cin: 3,
            cout: 5,
            kernel: [1, 3],
            stride: [1, 2],
            padding: [0, 2],
            dilation: [1, 2],
            input: [1, 9],
            groups: 1,
            mode,
        };
        check_all(
            &format!("conv1d {mode}"),
            Layer::Conv1d(layer),
            80 + 10 * k as u64,
        );
    }
}

#[test]
fn linear_over_positions() {
    check_all(
        "linear T = 5",
        Layer::Seq {
            inp: 4,
            out: 3,
            t: 5,
        },
        70,
    );
}

#[test]
fn one_position_keeps_the_linear_fast_path() {
    let spec = LinearSpec::new("fc", 4, 3, true);
    let geom = Geometry::of(&TracedLayer::Linear(&spec), Mode::Instance).expect("geometry");
    assert!(
        matches!(geom, Geometry::Linear { full: false, .. }),
        "{geom:?}"
    );
    let seq = LinearSpec {
        positions: 5,
        ..spec
    };
    let geom = Geometry::of(&TracedLayer::Linear(&seq), Mode::Instance).expect("geometry");
    assert!(matches!(geom, Geometry::Patches(_)), "{geom:?}");
}

#[test]
fn padding_wider_than_the_input_is_an_error() {
    let unfold = Unfold {
        name: "c".into(),
        in_channels: 1,
        kernel: [1, 3],
        stride: [1, 1],
        padding: [0, 3],
        dilation: [1, 1],
        input_hw: [1, 2],
        output_hw: [1, 6],
        padding_mode: PaddingMode::Reflect,
    };
    let err = unfold.apply(&[1.0, 2.0]).expect_err("reflect 3 of 2");
    assert!(err.to_string().contains("layer 'c'"), "{err}");
    let short = Unfold {
        padding_mode: PaddingMode::Zeros,
        ..unfold
    };
    assert!(short.apply(&[1.0]).is_err(), "an input of 1 value for 2");
    // Geometry::of checks the padding once, up front.
    let spec = Conv2dSpec {
        name: "c".into(),
        in_channels: 1,
        out_channels: 1,
        kernel: [1, 3],
        stride: [1, 1],
        padding: [0, 3],
        dilation: [1, 1],
        groups: 1,
        padding_mode: PaddingMode::Reflect,
        input_hw: [1, 2],
        output_hw: [1, 6],
        bias: false,
        traced: true,
        storage: Storage::Factors,
    };
    let err =
        Geometry::of(&TracedLayer::Conv2d(&spec), Mode::Instance).expect_err("reflect 3 of 2");
    assert!(err.to_string().contains("layer 'c': reflect"), "{err}");
}

/// The test's description of a traced layer of an instance-mode run.
fn case_of(layer: TracedLayer<'_>) -> Case {
    let conv = |c: &Conv2dSpec| {
        let conv = Conv {
            cin: c.in_channels,
            cout: c.out_channels,
            kernel: c.kernel,
            stride: c.stride,
            padding: c.padding,
            dilation: c.dilation,
            input: c.input_hw,
            groups: c.groups,
            mode: c.padding_mode.name(),
        };
        assert_eq!(conv.output(), c.output_hw, "{}: output size", c.name);
        conv
    };
    let (layer, bias, storage) = match layer {
        TracedLayer::Conv2d(c) => (Layer::Conv(conv(c)), c.bias, c.storage),
        TracedLayer::Conv1d(c) => (Layer::Conv1d(conv(&c.as_conv2d())), c.bias, c.storage),
        TracedLayer::Linear(l) => (
            Layer::Seq {
                inp: l.in_features,
                out: l.out_features,
                t: l.positions,
            },
            l.bias,
            l.storage,
        ),
        other => panic!("not a patches layer: {}", other.kind_name()),
    };
    Case {
        layer,
        bias,
        full: storage == Storage::Full,
    }
}

/// A written run of every patches layout, attributed: every contribution
/// row against the brute force from the stored records and probes (the
/// rows are f32: 1e-6).
#[test]
fn attribution_end_to_end() {
    let modules = vec![
        ConvModule::new("grouped", 4, 6, [5, 6])
            .kernel([3, 2])
            .stride([2, 1])
            .padding([1, 2])
            .dilation([1, 2])
            .groups(2)
            .padding_mode(PaddingMode::Reflect)
            .module(),
        ConvModule::new("depthwise", 3, 3, [4, 4])
            .groups(3)
            .padding_mode(PaddingMode::Replicate)
            .storage(Storage::Full)
            .module(),
        Module::Conv1d(Conv1dSpec {
            name: "conv1d".into(),
            in_channels: 2,
            out_channels: 4,
            kernel: 3,
            stride: 2,
            padding: 2,
            dilation: 1,
            groups: 2,
            padding_mode: PaddingMode::Circular,
            input_len: 7,
            output_len: 5,
            bias: false,
            traced: true,
            storage: Storage::Factors,
        }),
        Module::Linear(LinearSpec {
            positions: 2,
            ..LinearSpec::new("seq", 5, 4, true)
        }),
        Module::Linear(LinearSpec {
            positions: 4,
            storage: Storage::Full,
            ..LinearSpec::new("seq_full", 3, 2, false)
        }),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    synthetic::random_run(
        &run,
        &models::model("patches", vec![4, 5, 6], modules),
        40,
        3,
    );
    let options = Options {
        probes: ProbeSelection::All,
        ..Options::default()
    };
    attribute(&run, &options, &mut |_| {}).unwrap();
    let m = Manifest::load(&run).unwrap();
    let o = &m.optimizer;
    let scales = displacement_scales(&read::lrs(&run), o.momentum, o.dampening, o.nesterov);
    let cases: Vec<(String, Case)> = m
        .model
        .traced_layers()
        .map(|l| (l.name().to_owned(), case_of(l)))
        .collect();
    let updates = read::updates(&run);
    let rows = read::contributions(&run);
    let mut checked = 0;
    for probe in read::probes(&run) {
        let case = &cases.iter().find(|(n, _)| *n == probe.layer).unwrap().1;
        let pn = dot(&probe.p, &probe.p).sqrt();
        for up in updates.iter().filter(|u| u.layer == probe.layer) {
            let d = delta(case, &up.u, &up.v, scales[up.step as usize]);
            let wl = case.weight_len();
            let c = apply(case, &d[..wl], &d[wl..], &probe.a);
            let row = rows
                .iter()
                .find(|r| {
                    r.layer == probe.layer
                        && r.probe_id == probe.probe_id
                        && r.step == Some(up.step)
                        && r.instance_id == Some(up.instance_id)
                })
                .unwrap_or_else(|| panic!("{}: no row for {up:?}", probe.layer));
            let what = format!("{} probe {} step {}", probe.layer, probe.probe_id, up.step);
            let (want_dot, want_norm) = (dot(&c, &probe.p), dot(&c, &c).sqrt());
            assert!(
                (row.dot - want_dot).abs() <= 1e-6 * (pn * want_norm).max(1e-12),
                "{what}: dot {} against {want_dot}",
                row.dot
            );
            assert!(
                (row.norm - want_norm).abs() <= 1e-6 * want_norm.max(1e-12),
                "{what}: norm {} against {want_norm}",
                row.norm
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 5 * 3 * 64, "rows checked");
}
