//! The arithmetic of the `embedding` kind (`z_t = W[id_t]`, no bias).
//!
//! A record's update touches only the rows of its tokens: from factors
//! (token ids `u`, output gradients `v`, T×dim) `ΔW[r] = Σ_{t: id_t = r}
//! v_t`. A probe's contribution is `c_t = ΔW[id_t]` at its own token ids,
//! so with `P_r = Σ_{t: id_t = r} p_t` and `m_r` the multiplicity of token
//! `r` in the probe:
//! - `dot = Σ_r ⟨ΔW[r], P_r⟩`,
//! - `‖c‖² = Σ_r m_r ‖ΔW[r]‖²`,
//!
//! both summed over the probe's distinct tokens. Probes and factor records
//! are kept sparse (their distinct tokens, ascending, with one row each),
//! and a pair intersects the two token lists: O(distinct tokens × dim) per
//! pair, never O(num_embeddings × dim). Whole updates (`v` = vec ΔW) are
//! read at the probe's tokens only.
//!
//! Sparse layout, per probe or factor record of a batch (W the most
//! positions a record or probe of the batch holds, `T` unless the layer is
//! ragged; n ≤ W distinct tokens): `first` (W·dim) holds the n rows (`P_r`,
//! or scaled `ΔW[r]`) then zeros; `second` (1 + 2W) holds `[n, ids (W),
//! weights (W)]`, the weights being the multiplicities `m_r` (probes) or
//! `‖ΔW[r]‖²` (records), zero-padded. Token ids are integers below 2⁵³,
//! exact in f64.
//!
//! The positions of a record or probe are read from its slices (`u` or `a`
//! hold `digits` values per position, `v` or `p` `dim`): a ragged layer's
//! vary, and a record may hold none.
use super::{FeatureKind, Geometry, ProbeFeatures, RecordFeatures, deltas, matrix, view2};
use crate::probes::Probes;
use crate::records::Records;
use crate::weights::LayerWeights;
use crate::{Error, Result};
use ndarray::{Array2, ArrayView1, s};
use reptrace_format::kinds::embedding::{ID_BASE, id_of};

/// The shape of an Embedding layer: W of `num × dim`, `positions` tokens per
/// example (of a ragged layer, the spec's `T`: only an estimate), each id
/// stored as `digits` base-2048 digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Dims {
    pub(super) num: usize,
    pub(super) dim: usize,
    pub(super) positions: usize,
    pub(super) digits: usize,
}

/// The token ids stored as `digits` (`digits` values per position, most
/// significant first), each checked to be below `num`; with `x`, the rows
/// (`dim` per position) that go with them, checked to hold as many
/// positions. `what` names the record or probe for the error.
fn decode_ids<'a>(
    name: &str,
    dims: Dims,
    digits: &[f64],
    x: Option<&'a [f64]>,
    what: impl Fn() -> String,
) -> Result<(Vec<usize>, &'a [f64])> {
    let nd = dims.digits.max(1);
    let positions = digits.len() / nd;
    let x_len = x.map_or(positions * dims.dim, <[f64]>::len);
    if digits.len() != positions * nd || x_len != positions * dims.dim {
        return Err(Error::Internal(format!(
            "layer '{name}': {} has {} token id digits and {} values, not the same positions \
             of {nd} and {}",
            what(),
            digits.len(),
            x_len,
            dims.dim
        )));
    }
    digits
        .chunks(nd)
        .enumerate()
        .map(|(t, ds)| match id_of(ds).and_then(|id| usize::try_from(id).ok()) {
            Some(id) if id < dims.num => Ok(id),
            _ => Err(Error::Internal(format!(
                "layer '{name}': {} stores token id digits {ds:?} at position {t}, which are not \
                 the base-{ID_BASE} digits of an id below num_embeddings {} (corrupt record)",
                what(),
                dims.num
            ))),
        })
        .collect::<Result<Vec<usize>>>()
        .map(|ids| (ids, x.unwrap_or_default()))
}

/// The distinct tokens of `ids`, ascending, each with the positions that
/// hold it.
fn groups(ids: &[usize]) -> Vec<(usize, Vec<usize>)> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&t| ids[t]);
    let mut out: Vec<(usize, Vec<usize>)> = Vec::new();
    for t in order {
        match out.last_mut() {
            Some((id, ts)) if *id == ids[t] => ts.push(t),
            _ => out.push((ids[t], vec![t])),
        }
    }
    out
}

/// Length of a sparse `second` row of width `w`: `[n, ids (w), weights
/// (w)]`.
fn index_len(w: usize) -> usize {
    1 + 2 * w
}

/// f64 values per probe: the sparse rows and their index (at `T`
/// positions; a ragged layer's vary).
pub(super) fn probe_feature_len(dims: Dims) -> usize {
    dims.positions * dims.dim + index_len(dims.positions)
}

/// f64 values per record: vec ΔW (`full`), or the sparse rows and their
/// index.
pub(super) fn record_feature_len(dims: Dims, full: bool) -> usize {
    if full {
        dims.num * dims.dim
    } else {
        probe_feature_len(dims)
    }
}

/// Appends the sparse form of `x` (n×dim) at token ids `ids` (n ≤
/// `t_len`) to `first` and `second`, padded to width `t_len`: with
/// `scale`, `x` scaled and the weight of a token its row's squared norm;
/// without, the weight its multiplicity.
fn push_sparse(
    dim: usize,
    t_len: usize,
    ids: &[usize],
    x: &[f64],
    scale: Option<f64>,
    first: &mut Vec<f64>,
    second: &mut Vec<f64>,
) {
    let (mult, scale) = (scale.is_none(), scale.unwrap_or(1.0));
    let g = groups(ids);
    let start = first.len();
    let mut weights = Vec::with_capacity(t_len);
    for (_, ts) in &g {
        let mut row = vec![0.0; dim];
        for &t in ts {
            for (r, v) in row.iter_mut().zip(&x[t * dim..(t + 1) * dim]) {
                *r += v;
            }
        }
        row.iter_mut().for_each(|r| *r *= scale);
        weights.push(if mult {
            ts.len() as f64
        } else {
            row.iter().map(|r| r * r).sum()
        });
        first.extend(row);
    }
    first.resize(start + t_len * dim, 0.0);
    second.push(g.len() as f64);
    second.extend(g.iter().map(|(id, _)| *id as f64));
    second.resize(second.len() + t_len - g.len(), 0.0);
    second.extend(weights);
    second.resize(second.len() + t_len - g.len(), 0.0);
}

/// The sparse rows `P_r` and multiplicities of every probe.
pub(super) fn probe_features(name: &str, dims: Dims, probes: &Probes) -> Result<ProbeFeatures> {
    let q = probes.len();
    let decoded = (0..q)
        .map(|i| {
            decode_ids(name, dims, probes.a(i), Some(probes.p(i)), || {
                format!("probe {}", probes.probe_id[i])
            })
        })
        .collect::<Result<Vec<_>>>()?;
    sparse_features(dims, &decoded, None).map(|(first, second)| ProbeFeatures {
        first,
        second,
        factors: None,
    })
}

/// The sparse form of every `(ids, x)` (x scaled by `scales`, weights the
/// rows' squared norms; without, weights the multiplicities), as wide as
/// the most positions any holds.
fn sparse_features(
    dims: Dims,
    decoded: &[(Vec<usize>, &[f64])],
    scales: Option<&[f64]>,
) -> Result<(Array2<f64>, Array2<f64>)> {
    let n = decoded.len();
    let w = decoded.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let mut first = Vec::with_capacity(n * w * dims.dim);
    let mut second = Vec::with_capacity(n * index_len(w));
    for (k, (ids, x)) in decoded.iter().enumerate() {
        let scale = scales.map(|s| s[k]);
        push_sparse(dims.dim, w, ids, x, scale, &mut first, &mut second);
    }
    Ok((
        matrix((n, w * dims.dim), first)?,
        matrix((n, index_len(w)), second)?,
    ))
}

/// How a record is named in an error: its step and instance.
fn record_name(recs: &Records, i: usize) -> String {
    match recs.instance_id.get(i).copied().flatten() {
        Some(id) => format!("the record of step {} instance {id}", recs.step[i]),
        None => format!("the record of step {}", recs.step[i]),
    }
}

/// Factor record `i`'s token ids and output gradients (n×dim, n its
/// positions).
fn factors<'a>(
    name: &str,
    dims: Dims,
    recs: &'a Records,
    i: usize,
) -> Result<(Vec<usize>, &'a [f64])> {
    decode_ids(name, dims, recs.u_of(i), Some(recs.v_of(i)), || {
        record_name(recs, i)
    })
}

/// Appends vec(s ΔW) (num×dim, dense) of the factor records at `rows` to
/// `out`.
pub(super) fn factor_deltas(
    name: &str,
    dims: Dims,
    recs: &Records,
    scales: &[f64],
    rows: &[usize],
    out: &mut Vec<f64>,
) -> Result<()> {
    for &i in rows {
        let start = out.len();
        out.resize(start + dims.num * dims.dim, 0.0);
        scatter(name, dims, recs, scales[i], i, &mut out[start..])?;
    }
    Ok(())
}

/// Adds the scaled factor records of `recs` to `sum` (vec ΔW), row by row.
pub(super) fn accumulate_factors(
    name: &str,
    dims: Dims,
    recs: &Records,
    scales: &[f64],
    sum: &mut [f64],
) -> Result<()> {
    for (i, &s) in scales.iter().enumerate().take(recs.len()) {
        scatter(name, dims, recs, s, i, sum)?;
    }
    Ok(())
}

/// Adds `s ΔW` of factor record `i` to `w` (vec ΔW, num×dim).
fn scatter(name: &str, dims: Dims, recs: &Records, s: f64, i: usize, w: &mut [f64]) -> Result<()> {
    let dim = dims.dim;
    let (ids, v) = factors(name, dims, recs, i)?;
    for (t, &id) in ids.iter().enumerate() {
        for (x, y) in w[id * dim..(id + 1) * dim]
            .iter_mut()
            .zip(&v[t * dim..(t + 1) * dim])
        {
            *x += s * y;
        }
    }
    Ok(())
}

/// Whole updates: vec ΔW per record; factor records: their sparse rows of
/// scaled ΔW with the rows' squared norms.
pub(super) fn record_features(
    geom: &Geometry,
    name: &str,
    dims: Dims,
    full: bool,
    recs: &Records,
    scales: &[f64],
    rows: &[usize],
) -> Result<RecordFeatures> {
    let kind = FeatureKind::Embedding { dims, full };
    if full {
        return Ok(RecordFeatures {
            first: deltas(geom, recs, scales, rows)?,
            second: Array2::zeros((rows.len(), 0)),
            v_norm: Vec::new(),
            bias: false,
            kind,
            factors: Vec::new(),
        });
    }
    let decoded = rows
        .iter()
        .map(|&i| factors(name, dims, recs, i))
        .collect::<Result<Vec<_>>>()?;
    let row_scales: Vec<f64> = rows.iter().map(|&i| scales[i]).collect();
    let (first, second) = sparse_features(dims, &decoded, Some(&row_scales))?;
    Ok(RecordFeatures {
        first,
        second,
        v_norm: Vec::new(),
        bias: false,
        kind,
        factors: Vec::new(),
    })
}

/// A sparse row set: `n` distinct tokens, their ids, weights and rows, in
/// a layout of width `positions`.
struct Sparse<'a> {
    n: usize,
    index: ArrayView1<'a, f64>,
    rows: ArrayView1<'a, f64>,
    positions: usize,
    dim: usize,
}

impl<'a> Sparse<'a> {
    fn new(dims: Dims, rows: ArrayView1<'a, f64>, index: ArrayView1<'a, f64>) -> Self {
        // The width the batch was laid out at: `index` is `1 + 2 w` long.
        let w = index.len().saturating_sub(1) / 2;
        Sparse {
            n: index.first().map_or(0, |&n| n as usize).min(w),
            index,
            rows,
            positions: w,
            dim: dims.dim,
        }
    }

    fn id(&self, k: usize) -> usize {
        self.index[1 + k] as usize
    }

    fn weight(&self, k: usize) -> f64 {
        self.index[1 + self.positions + k]
    }

    fn row(&self, k: usize) -> ArrayView1<'_, f64> {
        self.rows.slice(s![k * self.dim..(k + 1) * self.dim])
    }
}

/// `dot` and `norm` of record `r` with probe `q`.
pub(super) fn pair(
    recs: &RecordFeatures,
    probes: &ProbeFeatures,
    dims: Dims,
    full: bool,
    r: usize,
    q: usize,
) -> (f64, f64) {
    let probe = Sparse::new(dims, probes.first.row(q), probes.second.row(q));
    let (mut dot, mut n2) = (0.0, 0.0);
    if full {
        let w = recs.first.row(r);
        let dim = dims.dim;
        for k in 0..probe.n {
            let id = probe.id(k);
            let row = w.slice(s![id * dim..(id + 1) * dim]);
            dot += row.dot(&probe.row(k));
            n2 += probe.weight(k) * row.dot(&row);
        }
    } else {
        let rec = Sparse::new(dims, recs.first.row(r), recs.second.row(r));
        let (mut i, mut k) = (0, 0);
        while i < rec.n && k < probe.n {
            match rec.id(i).cmp(&probe.id(k)) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => k += 1,
                std::cmp::Ordering::Equal => {
                    dot += rec.row(i).dot(&probe.row(k));
                    n2 += probe.weight(k) * rec.weight(i);
                    i += 1;
                    k += 1;
                }
            }
        }
    }
    (dot, n2.max(0.0).sqrt())
}

/// Every pair (probe-major).
pub(super) fn all_pairs(
    recs: &RecordFeatures,
    probes: &ProbeFeatures,
    dims: Dims,
    full: bool,
) -> (Array2<f64>, Array2<f64>) {
    let (nq, nr) = (probes.first.nrows(), recs.len());
    let mut dot = Array2::zeros((nq, nr));
    let mut norm = Array2::zeros((nq, nr));
    for q in 0..nq {
        for r in 0..nr {
            let (d, n) = pair(recs, probes, dims, full, r, q);
            dot[[q, r]] = d;
            norm[[q, r]] = n;
        }
    }
    (dot, norm)
}

/// The layer's output `c_t = R[id_t]` (T×dim, row-major) for a weight
/// change `R` at the probe's token ids `a`.
pub(super) fn direct(name: &str, dims: Dims, delta: &LayerWeights, a: &[f64]) -> Result<Vec<f64>> {
    let dim = dims.dim;
    let w = view2((dims.num, dim), &delta.weight)?;
    let (ids, _) = decode_ids(name, dims, a, None, || "a probe".to_owned())?;
    Ok(ids.iter().flat_map(|&id| w.row(id).to_vec()).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::{Geometry, ProbeFeatures, RecordFeatures, accumulate, deltas, direct};
    use crate::probes::Probes;
    use crate::records::Records;
    use crate::weights::LayerWeights;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use reptrace_format::{EmbeddingSpec, Mode, Storage, TracedLayer};

    const NUM: usize = 3000;
    const DIM: usize = 5;
    const T: usize = 7;
    const PAD: usize = 2100;
    /// Token ids the records draw from: both digits in use, the padding id
    /// among them, so that tokens repeat within and across examples.
    const POOL: [usize; 6] = [0, 17, 2047, 2048, PAD, NUM - 1];
    /// Probes also draw a token no record has.
    const PROBE_POOL: [usize; 7] = [0, 17, 2047, 2048, PAD, NUM - 1, 1234];

    /// An id as its two base-2048 digits, most significant first.
    fn encode(ids: &[usize]) -> Vec<f64> {
        ids.iter()
            .flat_map(|&id| [(id / 2048) as f64, (id % 2048) as f64])
            .collect()
    }

    fn spec(storage: Storage) -> EmbeddingSpec {
        EmbeddingSpec {
            name: "tok".into(),
            num_embeddings: NUM,
            embedding_dim: DIM,
            padding_idx: Some(PAD),
            positions: T,
            traced: true,
            storage,
            ragged: false,
        }
    }

    /// The geometry of the layer in instance mode, records stored as
    /// factors or whole.
    fn geometry(full: bool) -> Geometry {
        let storage = if full {
            Storage::Full
        } else {
            Storage::Factors
        };
        Geometry::of(&TracedLayer::Embedding(&spec(storage)), Mode::Instance).unwrap()
    }

    fn normal(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn draw(rng: &mut ChaCha8Rng, pool: &[usize]) -> Vec<usize> {
        (0..T)
            .map(|_| pool[rng.random_range(0..pool.len())])
            .collect()
    }

    /// Records (factors or whole updates) with their scales and each
    /// record's scaled ΔW (num×dim), built plainly.
    fn records(rng: &mut ChaCha8Rng, full: bool, n: usize) -> (Records, Vec<f64>, Vec<Vec<f64>>) {
        let mut recs = Records::default();
        let mut scales = vec![];
        let mut dw = vec![];
        for i in 0..n {
            recs.step.push(i as i64);
            recs.epoch.push(0);
            recs.instance_id.push(Some(100 + i as i64));
            recs.label.push(Some(0));
            let s: f64 = rng.random_range(0.5..2.0);
            scales.push(s);
            let mut w = vec![0.0; NUM * DIM];
            if full {
                // A dense update (a batch's), the padding row zero.
                let v = normal(rng, NUM * DIM);
                for r in 0..NUM {
                    for k in 0..DIM {
                        if r != PAD {
                            w[r * DIM + k] = s * v[r * DIM + k];
                        }
                    }
                }
                let v: Vec<f64> = w.iter().map(|x| x / s).collect();
                recs.push_lists(&[], &v);
            } else {
                let ids = draw(rng, &POOL);
                let mut v = normal(rng, T * DIM);
                for t in 0..T {
                    for k in 0..DIM {
                        if ids[t] == PAD {
                            v[t * DIM + k] = 0.0;
                        }
                        w[ids[t] * DIM + k] += s * v[t * DIM + k];
                    }
                }
                recs.push_lists(&encode(&ids), &v);
            }
            dw.push(w);
        }
        (recs, scales, dw)
    }

    fn probes(rng: &mut ChaCha8Rng, n: usize) -> (Probes, Vec<Vec<usize>>) {
        let mut probes = Probes::default();
        let mut all_ids = vec![];
        for i in 0..n {
            let ids = draw(rng, &PROBE_POOL);
            probes.probe_id.push(i as i64);
            probes.instance_id.push(None);
            probes.label.push(0);
            probes.predicted.push(0);
            let p = normal(rng, T * DIM);
            probes
                .p_norm
                .push(p.iter().map(|x| x * x).sum::<f64>().sqrt());
            probes.push_lists(&encode(&ids), &p);
            all_ids.push(ids);
        }
        (probes, all_ids)
    }

    /// `(dot, norm)` of `c_t = w[id_t]` with `p`, and the scale of the dot
    /// (`‖c‖ ‖p‖`), by plain loops.
    fn brute(w: &[f64], ids: &[usize], p: &[f64]) -> (f64, f64, f64) {
        let (mut dot, mut cc, mut pp) = (0.0, 0.0, 0.0);
        for t in 0..T {
            for k in 0..DIM {
                let c = w[ids[t] * DIM + k];
                let pk = p[t * DIM + k];
                dot += c * pk;
                cc += c * c;
                pp += pk * pk;
            }
        }
        (dot, cc.sqrt(), cc.sqrt() * pp.sqrt())
    }

    fn close(x: f64, y: f64, scale: f64) {
        let tol = 1e-9 * scale.max(y.abs()).max(1e-300);
        assert!((x - y).abs() <= tol, "{x} vs {y} (scale {scale})");
    }

    fn pairs_against_brute_force(full: bool, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let geom = geometry(full);
        let (recs, scales, dw) = records(&mut rng, full, 6);
        let (probes, ids) = probes(&mut rng, 5);
        let pf = ProbeFeatures::new(&geom, &probes).unwrap();
        let rows = [4, 0, 2, 5];
        let rf = RecordFeatures::new(&geom, &recs, &scales, &rows).unwrap();
        let (dot, norm) = rf.all_pairs(&pf).unwrap();
        assert_eq!(dot.dim(), (5, rows.len()));
        let mut overlapping = 0;
        for q in 0..probes.len() {
            for (j, &i) in rows.iter().enumerate() {
                let (d, n, scale) = brute(&dw[i], &ids[q], probes.p(q));
                overlapping += usize::from(n > 0.0);
                close(dot[[q, j]], d, scale);
                close(norm[[q, j]], n, n);
                let (d1, n1) = rf.pair(&pf, j, q);
                close(d1, d, scale);
                close(n1, n, n);
            }
        }
        assert!(overlapping > 0, "some probe shares a token with a record");
    }

    #[test]
    fn factor_pairs_match_brute_force() {
        pairs_against_brute_force(false, 1);
    }

    #[test]
    fn full_pairs_match_brute_force() {
        pairs_against_brute_force(true, 2);
    }

    #[test]
    fn deltas_and_accumulate_match_the_updates() {
        for (full, seed) in [(false, 3), (true, 4)] {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let geom = geometry(full);
            assert_eq!((geom.weight_len(), geom.bias_len()), (NUM * DIM, 0));
            // Batch-mode records are always whole updates.
            let batch = Geometry::of(
                &TracedLayer::Embedding(&spec(Storage::Factors)),
                Mode::Batch,
            );
            assert_eq!(batch.unwrap(), geometry(true));
            let (recs, scales, dw) = records(&mut rng, full, 5);
            let rows = [3, 1];
            let d = deltas(&geom, &recs, &scales, &rows).unwrap();
            for (j, &i) in rows.iter().enumerate() {
                for (x, y) in d.row(j).iter().zip(&dw[i]) {
                    close(*x, *y, 1.0);
                }
            }
            let start = normal(&mut rng, NUM * DIM);
            let mut sum = start.clone();
            accumulate(&geom, &recs, &scales, &mut sum).unwrap();
            for k in 0..NUM * DIM {
                let want = start[k] + dw.iter().map(|w| w[k]).sum::<f64>();
                close(sum[k], want, 1.0);
            }
            assert!((0..DIM).all(|k| (sum[PAD * DIM + k] - start[PAD * DIM + k]).abs() < 1e-12));
        }
    }

    #[test]
    fn direct_reads_the_probe_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let geom = geometry(false);
        let (probes, ids) = probes(&mut rng, 3);
        let r = normal(&mut rng, NUM * DIM);
        let delta = LayerWeights {
            weight: r.clone(),
            bias: vec![],
        };
        for (q, ids) in ids.iter().enumerate() {
            let (d, n) = direct(&geom, &delta, probes.a(q), probes.p(q)).unwrap();
            let (bd, bn, scale) = brute(&r, ids, probes.p(q));
            close(d, bd, scale);
            close(n, bn, bn);
        }
    }

    #[test]
    fn corrupt_token_ids_are_one_line_errors() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let geom = geometry(false);
        let (recs, scales, _) = records(&mut rng, false, 3);
        let (probes, _) = probes(&mut rng, 2);
        // A fractional digit, a digit out of range, an id ≥ num_embeddings.
        for (at, bad) in [(1, 7.5), (0, 2048.0), (0, -1.0), (2, f64::NAN)] {
            let mut r = recs.clone();
            // Record 1, position 2.
            r.u[2 * T + 2 * 2 + at % 2] = bad;
            let err = RecordFeatures::new(&geom, &r, &scales, &[0, 1, 2])
                .err()
                .expect("a corrupt record is refused")
                .to_string();
            assert!(err.contains("tok") && !err.contains('\n'), "{err}");
            assert!(err.contains("step 1 instance 101"), "{err}");
            assert!(deltas(&geom, &r, &scales, &[1]).is_err());
            let mut sum = vec![0.0; NUM * DIM];
            assert!(accumulate(&geom, &r, &scales, &mut sum).is_err());
        }
        let mut r = recs.clone();
        r.u[0..2].copy_from_slice(&[1.0, (NUM - 2048) as f64]);
        let err = RecordFeatures::new(&geom, &r, &scales, &[0])
            .err()
            .expect("an id past the vocabulary is refused")
            .to_string();
        assert!(
            err.contains("num_embeddings 3000") && !err.contains('\n'),
            "{err}"
        );
        let mut p = probes.clone();
        p.a[3] = 0.25;
        let err = ProbeFeatures::new(&geom, &p)
            .err()
            .expect("a corrupt probe is refused")
            .to_string();
        assert!(err.contains("tok") && err.contains("probe 0"), "{err}");
        let delta = LayerWeights {
            weight: vec![0.0; NUM * DIM],
            bias: vec![],
        };
        assert!(direct(&geom, &delta, p.a(0), p.p(0)).is_err());
    }
}
