//! Manifest models of given shapes for hand-built runs and schema examples:
//! Linear and Conv2d specs (a conv's output size computed from its
//! geometry), an MLP of given widths, the small CNNs of the synthetic runs
//! and benches, and a model with every module kind.
use reptrace_format::{
    Conv1dSpec, Conv2dSpec, EmbeddingSpec, LinearSpec, Model, Module, NormSpec, PaddingMode,
    Storage,
};

/// A traced Linear module.
pub fn linear(name: &str, in_features: usize, out_features: usize, bias: bool) -> Module {
    Module::Linear(LinearSpec::new(name, in_features, out_features, bias))
}

/// A traced Conv2d spec of `c_in → c_out` channels on `input_hw` inputs:
/// 3×3 kernel, stride 1, padding 1, dilation 1, bias, factors storage until
/// changed; [`Conv::spec`] computes the output size.
#[derive(Debug, Clone)]
pub struct Conv {
    spec: Conv2dSpec,
}

/// Builder setters, each setting the spec's field of its name.
macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty,)*) => {
        $(
            $(#[$doc])*
            pub fn $field(mut self, value: $ty) -> Self {
                self.spec.$field = value;
                self
            }
        )*
    };
}

impl Conv {
    /// A 3×3 "same" convolution (stride 1, padding 1) with bias.
    pub fn new(name: &str, c_in: usize, c_out: usize, input_hw: [usize; 2]) -> Self {
        Conv {
            spec: Conv2dSpec {
                name: name.into(),
                in_channels: c_in,
                out_channels: c_out,
                kernel: [3, 3],
                stride: [1, 1],
                padding: [1, 1],
                dilation: [1, 1],
                groups: 1,
                padding_mode: PaddingMode::Zeros,
                input_hw,
                output_hw: [0, 0],
                bias: true,
                traced: true,
                storage: Storage::Factors,
            },
        }
    }

    setters! {
        /// Kernel size.
        kernel: [usize; 2],
        /// Stride.
        stride: [usize; 2],
        /// Zero padding.
        padding: [usize; 2],
        /// Dilation.
        dilation: [usize; 2],
        /// Groups.
        groups: usize,
        /// How the padding is filled.
        padding_mode: PaddingMode,
        /// Whether the layer has a bias.
        bias: bool,
        /// Factors or the full per-example ΔW.
        storage: Storage,
    }

    /// The spec, its output size `(in + 2·pad − dil·(k − 1) − 1) / stride + 1`.
    pub fn spec(self) -> Conv2dSpec {
        let mut spec = self.spec;
        let o = |i: usize| {
            (spec.input_hw[i] + 2 * spec.padding[i] - spec.dilation[i] * (spec.kernel[i] - 1) - 1)
                / spec.stride[i]
                + 1
        };
        spec.output_hw = [o(0), o(1)];
        spec
    }

    /// The spec as a module.
    pub fn module(self) -> Module {
        Module::Conv2d(self.spec())
    }
}

/// A model of `modules`, nothing frozen.
pub fn model(name: &str, input_shape: Vec<usize>, modules: Vec<Module>) -> Model {
    Model {
        structure: Default::default(),
        name: name.into(),
        input_shape,
        modules,
        frozen: Vec::new(),
    }
}

/// An MLP of the given widths (`[in, hidden…, out]`): traced Linear layers
/// `fc1`, `fc2`, … with bias and a ReLU between them.
pub fn mlp(name: &str, widths: &[usize]) -> Model {
    let mut modules = Vec::new();
    for (i, w) in widths.windows(2).enumerate() {
        if i > 0 {
            modules.push(Module::Relu);
        }
        modules.push(linear(&format!("fc{}", i + 1), w[0], w[1], true));
    }
    model(name, vec![widths[0]], modules)
}

/// The small CNN of the synthetic example run (`synthetic-cnn`, 1×8×8
/// inputs): conv1 1→4 3×3 stride 2 padding 1 (4×4 outputs, stored as
/// factors or the full ΔW, whichever is smaller), ReLU, flatten, fc1 64→32,
/// ReLU, fc2 32→`classes`.
pub fn small_cnn(classes: usize) -> Model {
    let mut conv = Conv::new("conv1", 1, 4, [8, 8]).stride([2, 2]).spec();
    // Store the full per-example matrix when it is smaller than the factors.
    let factors = conv.patch_len() * conv.positions() + conv.out_channels * conv.positions();
    let full = conv.out_channels * conv.patch_len() + conv.out_channels;
    if full < factors {
        conv.storage = Storage::Full;
    }
    model(
        "synthetic-cnn",
        vec![1, 8, 8],
        vec![
            Module::Conv2d(conv),
            Module::Relu,
            Module::Flatten,
            linear("fc1", 64, 32, true),
            Module::Relu,
            linear("fc2", 32, classes, true),
        ],
    )
}

/// The attribution bench's model (`bench`, digits-sized layers): conv1
/// 1→8 on 8×8 (factors), conv2 8→16 on 4×4 (full ΔW), fc1 64→32, fc2 32→10;
/// every layer traced, nothing in between (the bench attributes each layer
/// alone).
pub fn bench_cnn() -> Model {
    model(
        "bench",
        vec![1, 8, 8],
        vec![
            Conv::new("conv1", 1, 8, [8, 8]).module(),
            Conv::new("conv2", 8, 16, [4, 4])
                .storage(Storage::Full)
                .module(),
            linear("fc1", 64, 32, true),
            linear("fc2", 32, 10, true),
        ],
    )
}

/// A model (`cnn`, 1×8×8 inputs) with every module kind: conv1, ReLU,
/// max and average pooling, batch norms, flatten, dropout, fc1, tanh,
/// sigmoid, GELU and an untraced bias-free fc2, then (for the manifest's
/// schema, not a model that runs) a grouped reflect-padded conv2, a linear
/// layer at 4 positions stored whole, a conv1d, an embedding, a LayerNorm
/// and an RMSNorm.
pub fn every_kind() -> Model {
    let mut modules = vec![
        Conv::new("conv1", 1, 4, [8, 8]).module(),
        Module::Relu,
        Module::MaxPool2d {
            kernel: [2, 2],
            stride: [2, 2],
        },
        Module::AvgPool2d {
            kernel: [1, 1],
            stride: [1, 1],
        },
        Module::BatchNorm2d {
            name: "bn1".into(),
            channels: 4,
        },
        Module::Flatten,
        Module::Dropout { p: 0.1 },
        linear("fc1", 64, 16, true),
        Module::Tanh,
        Module::BatchNorm1d {
            name: "bn2".into(),
            features: 16,
        },
        Module::Sigmoid,
        Module::Gelu,
    ];
    modules.push(Module::Linear(LinearSpec {
        traced: false,
        ..LinearSpec::new("fc2", 16, 10, false)
    }));
    modules.extend(format_8_kinds());
    model("cnn", vec![1, 8, 8], modules)
}

/// One module of each kind or field formats 8 and 9 added.
fn format_8_kinds() -> Vec<Module> {
    let norm = NormSpec {
        name: "ln".into(),
        normalized_shape: vec![8],
        bias: true,
        eps: 1e-5,
        positions: 4,
        traced: true,
        ragged: true,
    };
    vec![
        Conv::new("conv2", 4, 4, [4, 4])
            .groups(2)
            .padding_mode(PaddingMode::Reflect)
            .module(),
        Module::Linear(LinearSpec {
            positions: 4,
            storage: Storage::Full,
            ragged: true,
            ..LinearSpec::new("seq", 8, 8, true)
        }),
        Module::Conv1d(Conv1dSpec {
            name: "conv3".into(),
            in_channels: 2,
            out_channels: 2,
            kernel: 3,
            stride: 1,
            padding: 1,
            dilation: 1,
            groups: 2,
            padding_mode: PaddingMode::Circular,
            input_len: 4,
            output_len: 4,
            bias: true,
            traced: true,
            storage: Storage::Full,
        }),
        Module::Embedding(EmbeddingSpec {
            name: "tok".into(),
            num_embeddings: 100,
            embedding_dim: 8,
            padding_idx: Some(0),
            positions: 4,
            traced: true,
            storage: Storage::Factors,
            ragged: true,
        }),
        Module::LayerNorm(norm.clone()),
        Module::RmsNorm(NormSpec {
            name: "rms".into(),
            bias: false,
            ..norm
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_output_follows_the_geometry() {
        let c = Conv::new("c", 2, 3, [9, 9])
            .stride([2, 2])
            .dilation([2, 2])
            .spec();
        assert_eq!(c.output_hw, [4, 4]);
        let c = Conv::new("c", 3, 4, [4, 4])
            .kernel([2, 3])
            .padding([0, 1])
            .spec();
        assert_eq!(c.output_hw, [3, 4]);
        let Module::Conv2d(c) = &small_cnn(10).modules[0] else {
            panic!("conv1 first")
        };
        assert_eq!(c.output_hw, [4, 4]);
    }

    #[test]
    fn mlp_has_the_widths() {
        let m = mlp("m", &[4, 3, 2]);
        let lens: Vec<_> = m.traced_layers().map(|l| l.weight_shape()).collect();
        assert_eq!(lens, vec![vec![3, 4], vec![2, 3]]);
        assert_eq!(m.modules.len(), 3);
    }
}
