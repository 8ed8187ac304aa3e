//! Pixels of the bundled digits (`data/digits.csv.gz`, embedded), so that a
//! report can draw the instances of a run trained on them: the run itself
//! stores no inputs.
//!
//! Each line holds 64 pixels (0..16, an 8×8 image row by row) and then the
//! label; the line number (from 0) is the instance id, as in `reptrace-tch`.
use super::Images;
use crate::{Error, Result};
use reptrace_format::Manifest;
use std::collections::{BTreeSet, HashMap};
use std::io::Read;

const DIGITS_GZ: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data/digits.csv.gz"
));

/// Number of rows of the bundled digits.
pub const ROWS: usize = 1797;

/// Pixels of the `wanted` instances when `manifest` says the run was trained
/// on the bundled digits (`settings.data == "digits"`, input `[1, 8, 8]`);
/// `None` otherwise. An id outside the file is simply not drawn.
pub fn images(manifest: &Manifest, wanted: &BTreeSet<i64>) -> Result<Option<Images>> {
    let is_digits = manifest
        .settings
        .get("data")
        .and_then(|v| v.as_str())
        .is_some_and(|d| d == "digits");
    if !is_digits || manifest.model.input_shape != [1, 8, 8] {
        return Ok(None);
    }
    let rows = rows()?;
    let pixels = wanted
        .iter()
        .filter_map(|&id| {
            let row = rows.get(usize::try_from(id).ok()?)?;
            Some((id, row.0.clone()))
        })
        .collect();
    Ok(Some(Images {
        shape: vec![1, 8, 8],
        pixels,
    }))
}

/// Every row of the bundled digits: pixels scaled to 0..1, label.
pub fn rows() -> Result<Vec<(Vec<f32>, i32)>> {
    let bad = |message: String| Error::Column {
        path: "data/digits.csv.gz".into(),
        column: "pixels".into(),
        message,
    };
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::io("data/digits.csv.gz", e))?;
    let mut out = Vec::with_capacity(ROWS);
    for (no, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let nums: Vec<f32> = line
            .split(',')
            .map(|f| f.trim().parse::<f32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(format!("line {}: {e}", no + 1)))?;
        if nums.len() != 65 {
            return Err(bad(format!(
                "line {}: {} fields, expected 65",
                no + 1,
                nums.len()
            )));
        }
        out.push((
            nums[..64].iter().map(|p| p / 16.0).collect(),
            nums[64] as i32,
        ));
    }
    Ok(out)
}

/// The rows as a map, for tests and callers that want a few ids.
pub fn by_id(ids: &BTreeSet<i64>) -> Result<HashMap<i64, (Vec<f32>, i32)>> {
    let rows = rows()?;
    Ok(ids
        .iter()
        .filter_map(|&id| Some((id, rows.get(usize::try_from(id).ok()?)?.clone())))
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_row() {
        let rows = rows().unwrap();
        assert_eq!(rows.len(), ROWS);
        // First line of the file: 0,0,5,13,9,1,0,0,… label 0.
        assert_eq!(rows[0].1, 0);
        assert_eq!(&rows[0].0[..4], &[0.0, 0.0, 5.0 / 16.0, 13.0 / 16.0]);
        assert!(
            rows.iter()
                .all(|(p, l)| p.len() == 64 && (0..10).contains(l))
        );
        assert!(
            rows.iter()
                .flat_map(|r| &r.0)
                .all(|p| (0.0..=1.0).contains(p))
        );
    }
}
