//! Weights snapshots (`weights/*.safetensors`, f32, PyTorch shapes).
use crate::{Error, Result};
use reptrace_format::TracedLayer;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::path::{Path, PathBuf};

/// A snapshot read into memory.
pub struct Snapshot {
    path: PathBuf,
    bytes: Vec<u8>,
}

/// One traced layer's weight and bias, widened to f64.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// Row-major `out × in` (Linear) or `C_out × C_in·kh·kw` (Conv2d).
    pub weight: Vec<f64>,
    /// `out` / `C_out` values; empty without bias.
    pub bias: Vec<f64>,
}

impl LayerWeights {
    /// `self − other`, element by element.
    pub fn minus(&self, other: &LayerWeights) -> LayerWeights {
        let sub = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x - y).collect();
        LayerWeights {
            weight: sub(&self.weight, &other.weight),
            bias: sub(&self.bias, &other.bias),
        }
    }

    /// Frobenius norm of weight and bias together.
    pub fn norm(&self) -> f64 {
        self.weight
            .iter()
            .chain(&self.bias)
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt()
    }
}

impl Snapshot {
    /// Reads a snapshot file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        // Check the header once, so later lookups only fail on missing names.
        SafeTensors::deserialize(&bytes).map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
        })
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f64>> {
        let err = |message: String| Error::Weights {
            path: self.path.clone(),
            message,
        };
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| err(e.to_string()))?;
        let view = st
            .tensor(name)
            .map_err(|_| err(format!("tensor {name:?} missing")))?;
        if view.dtype() != StDtype::F32 {
            return Err(err(format!(
                "tensor {name:?} has dtype {:?}, expected F32",
                view.dtype()
            )));
        }
        if view.shape() != shape {
            return Err(err(format!(
                "tensor {name:?} has shape {:?}, expected {shape:?}",
                view.shape()
            )));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect())
    }

    /// The weight and bias of a traced layer.
    pub fn layer(&self, layer: &TracedLayer<'_>) -> Result<LayerWeights> {
        let name = layer.name();
        let weight = self.tensor(&format!("{name}.weight"), &layer.weight_shape())?;
        let bias = if layer.bias() {
            self.tensor(&format!("{name}.bias"), &layer.bias_shape())?
        } else {
            Vec::new()
        };
        Ok(LayerWeights { weight, bias })
    }
}
