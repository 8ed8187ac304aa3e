//! Pixels of the bundled digits (`data/digits.csv.gz`, embedded in
//! [`reptrace_format::data`]), so that a report can draw the instances of a
//! run trained on them: the run itself stores no inputs.
//!
//! The row index is the instance id, as in `reptrace-tch`, which trains on
//! the same loader.
use crate::Images;
use reptrace_analyze::Result;
use reptrace_format::Manifest;
use reptrace_format::data;
use std::collections::{BTreeSet, HashMap};

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
    let digits = data::digits()?;
    let pixels = wanted
        .iter()
        .filter_map(|&id| {
            let row = usize::try_from(id).ok().filter(|&r| r < digits.len())?;
            Some((id, digits.row(row).to_vec()))
        })
        .collect();
    Ok(Some(Images {
        shape: vec![1, 8, 8],
        pixels,
    }))
}

/// Every row of the bundled digits: pixels scaled to 0..1, label.
pub fn rows() -> Result<Vec<(Vec<f32>, i32)>> {
    let digits = data::digits()?;
    Ok((0..digits.len())
        .map(|r| (digits.row(r).to_vec(), digits.labels[r]))
        .collect())
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
