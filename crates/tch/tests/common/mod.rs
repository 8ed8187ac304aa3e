//! Helpers shared by the tch test binaries: the safetensors snapshots and
//! a record's update formed from its factors, both read independently of
//! the crate.
use reptrace_format::{Storage, TracedLayer};
use std::collections::HashMap;
use std::path::Path;

/// Reads a safetensors snapshot: name → (shape, data).
pub fn read_weights(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.names()
        .into_iter()
        .map(|n| {
            let t = st.tensor(n).unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::F32);
            let data = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n.to_owned(), (t.shape().to_vec(), data))
        })
        .collect()
}

/// One record's `ΔW` (row-major `out × K`) followed by `Δb`, in f64, from
/// its factors as the format defines them.
pub fn record_update(layer: TracedLayer<'_>, u: &[f32], v: &[f32]) -> Vec<f64> {
    if u.is_empty() {
        // A whole update (batch mode, or Conv2d full storage): `vec ΔW, Δb`.
        assert_eq!(v.len(), layer.update_len(), "{}", layer.name());
        return v.iter().map(|&x| f64::from(x)).collect();
    }
    match layer {
        TracedLayer::Linear(l) => {
            assert_eq!((u.len(), v.len()), (l.in_features, l.out_features));
            let mut d: Vec<f64> = v
                .iter()
                .flat_map(|&vo| u.iter().map(move |&ui| f64::from(vo) * f64::from(ui)))
                .collect();
            if l.bias {
                d.extend(v.iter().map(|&x| f64::from(x)));
            }
            d
        }
        TracedLayer::Conv2d(c) => {
            let (co, k, p) = (c.out_channels, c.patch_len(), c.positions());
            match c.storage {
                Storage::Full => {
                    assert!(u.is_empty());
                    assert_eq!(v.len(), co * k + if c.bias { co } else { 0 });
                    v.iter().map(|&x| f64::from(x)).collect()
                }
                Storage::Factors => {
                    assert_eq!((u.len(), v.len()), (k * p, co * p));
                    let mut d = vec![0.0f64; co * k + if c.bias { co } else { 0 }];
                    for o in 0..co {
                        for kk in 0..k {
                            d[o * k + kk] = (0..p)
                                .map(|q| f64::from(v[o * p + q]) * f64::from(u[kk * p + q]))
                                .sum();
                        }
                        if c.bias {
                            d[co * k + o] = (0..p).map(|q| f64::from(v[o * p + q])).sum();
                        }
                    }
                    d
                }
            }
        }
        other => panic!("the tch tracer does not trace {} layers", other.kind_name()),
    }
}
