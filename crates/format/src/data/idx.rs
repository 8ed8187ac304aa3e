//! MNIST-style IDX files: [`parse_idx`] for one file's bytes, [`load_idx`]
//! for the four files of a directory.
use super::{DataError, Dataset, Result, read_maybe_gz};
use std::path::{Path, PathBuf};

/// IDX file names of the MNIST layout: (train images, train labels, test images, test labels).
pub const IDX_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Reads `name` or `name.gz` in `dir`.
fn read_idx_file(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>)> {
    let plain = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    let path = if plain.exists() || !gz.exists() {
        plain
    } else {
        gz
    };
    let bytes = read_maybe_gz(&path)?;
    Ok((path, bytes))
}

/// Parses one IDX file of unsigned bytes with `want_dims` dimensions:
/// returns its dimensions and data; `path` names the file in errors.
pub fn parse_idx(path: &Path, bytes: &[u8], want_dims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let bad = |message: String| DataError::BadIdx {
        path: path.to_path_buf(),
        message,
    };
    if bytes.len() < 4 {
        return Err(bad(format!(
            "{} bytes, too short for an IDX header",
            bytes.len()
        )));
    }
    let (zero, kind, ndims) = (
        u16::from_be_bytes([bytes[0], bytes[1]]),
        bytes[2],
        usize::from(bytes[3]),
    );
    if zero != 0 || kind != 0x08 {
        return Err(bad(format!(
            "magic number {:02x}{:02x}{:02x}{:02x} is not an IDX file of unsigned bytes",
            bytes[0], bytes[1], bytes[2], bytes[3]
        )));
    }
    if ndims != want_dims {
        return Err(bad(format!("{ndims} dimensions, expected {want_dims}")));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(bad("truncated header".into()));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let data = bytes.len() - header;
    // Three sizes near u32::MAX multiply past usize::MAX.
    let Some(len) = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
        return Err(bad(format!(
            "header says {dims:?} (more bytes of data than fit in memory), file has {data}"
        )));
    };
    if data != len {
        return Err(bad(format!(
            "header says {dims:?} ({len} bytes of data), file has {data}"
        )));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Reads the MNIST IDX files in `dir`.
pub fn load_idx(dir: &Path) -> Result<Dataset> {
    let mut parts = Vec::new();
    for pair in IDX_FILES.chunks(2) {
        let (ipath, ibytes) = read_idx_file(dir, pair[0])?;
        let (lpath, lbytes) = read_idx_file(dir, pair[1])?;
        let (idims, pixels) = parse_idx(&ipath, &ibytes, 3)?;
        let (ldims, labels) = parse_idx(&lpath, &lbytes, 1)?;
        if idims[0] != ldims[0] {
            return Err(DataError::BadIdx {
                path: lpath,
                message: format!(
                    "{} labels for {} images in {}",
                    ldims[0],
                    idims[0],
                    ipath.display()
                ),
            });
        }
        parts.push((ipath, idims, pixels, labels));
    }
    let hw = [parts[0].1[1], parts[0].1[2]];
    if [parts[1].1[1], parts[1].1[2]] != hw {
        return Err(DataError::BadIdx {
            path: parts[1].0.clone(),
            message: format!(
                "images are {}x{}, the training images {}x{}",
                parts[1].1[1], parts[1].1[2], hw[0], hw[1]
            ),
        });
    }
    let n_train = parts[0].1[0];
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for (_, _, pixels, ls) in &parts {
        features.extend(pixels.iter().map(|&p| f32::from(p) / 255.0));
        labels.extend(ls.iter().map(|&l| i32::from(l)));
    }
    let k = labels.iter().copied().max().unwrap_or(0).max(1) as usize + 1;
    Dataset::new(
        dir.display().to_string(),
        vec![1, hw[0], hw[1]],
        (0..k).map(|c| c.to_string()).collect(),
        features,
        labels,
        n_train,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_file() {
        let bytes = [0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 1, 7, 9];
        let (dims, data) = parse_idx(Path::new("x"), &bytes, 2).unwrap();
        assert_eq!((dims, data), (vec![2, 1], vec![7, 9]));
        let e = parse_idx(Path::new("x"), &bytes, 3).unwrap_err();
        assert_eq!(e.to_string(), "x: 2 dimensions, expected 3");
    }

    /// Found by `scripts/fuzz.sh` (target `idx`): the product of the sizes
    /// overflowed usize (a panic in debug builds, a wrong size otherwise).
    #[test]
    fn fuzz_regression_idx_size_overflow() {
        let bytes = [
            0x00, 0x00, 0x08, 0x03, 0xde, 0x00, 0x50, 0x75, 0xbf, 0x2e, 0x53, 0x50, 0x53, 0x9a,
            0xbf, 0x53,
        ];
        let e = parse_idx(Path::new("t.idx"), &bytes, 3).unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.idx: header says [3724562549, 3207484240, 1402650451] \
             (more bytes of data than fit in memory), file has 0"
        );
    }
}
