//! Weights snapshots as safetensors files (f32, PyTorch names and shapes).
use crate::batch::OwnedTensor;
use crate::{Error, Result};
use safetensors::tensor::TensorView;
use std::collections::HashMap;
use std::path::Path;

/// Serializes `tensors` into safetensors bytes, with `metadata` in the header.
pub(crate) fn serialize(
    tensors: &[OwnedTensor],
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let err = |message: String| Error::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            TensorView::new(safetensors::Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| err(format!("tensor {:?}: {e}", t.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    #[test]
    fn round_trip() {
        let t = vec![
            OwnedTensor {
                name: "fc1.weight".into(),
                shape: vec![2, 3],
                data: vec![1.0, -2.0, 3.5, 0.0, 1e-7, -0.25],
            },
            OwnedTensor {
                name: "fc1.bias".into(),
                shape: vec![2],
                data: vec![0.5, -0.5],
            },
        ];
        let bytes = serialize(&t, HashMap::new(), Path::new("x")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for want in &t {
            let v = st.tensor(&want.name).unwrap();
            assert_eq!(v.shape(), want.shape.as_slice());
            let got: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(got, want.data);
        }
    }
}
