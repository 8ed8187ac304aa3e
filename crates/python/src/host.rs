//! The Python tracer's per-step arithmetic on the host, one call each.
//!
//! Before every optimizer step the tracer checks that the gradient the
//! optimizer is about to apply is the sum of the per-example gradients it
//! records (docs/python.md, "Training loops"), and it computes each
//! example's loss and prediction for the `examples` table. On a GPU it does
//! so with PyTorch operations on the device. On the CPU, for small models,
//! launching some twenty small operations per layer from Python costs more
//! than their arithmetic, so:
//!
//! - [`check_terms`]: a float32 `nn.Linear`'s or convolution's check
//!   terms, matrix-vector products (AVX2 and FMA where the CPU has them,
//!   plain loops elsewhere);
//! - [`check_verdicts`]: every checked layer's verdict from its terms, in
//!   float64, the step's shared scale included (for either path);
//! - [`example_losses`]: each example's cross-entropy and prediction from
//!   CPU logits, in float64, as `reptrace train` computes them.
use crate::error;
use numpy::ndarray::Dimension;
use numpy::{
    Element, PyArray1, PyArrayMethods, PyReadonlyArray, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArray3, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// A C-contiguous array's elements, or an error naming it (a Fortran-order
/// array is contiguous too, but its elements are not in row-major order).
fn values<'a, T: Element, D: Dimension>(
    a: &'a PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .ok()
        .filter(|_| a.is_c_contiguous())
        .ok_or_else(|| error::invalid(format!("{what}: the array must be C-contiguous")))
}

/// `(Σ_k a_k b_k, Σ_k a_k²)` over the shorter of the two: a row of `A`
/// times `x`, and the row's squared norm (0 unless `norm`).
type Dot = fn(&[f32], &[f32], bool) -> (f32, f32);

/// `y ← A x` for a row-major `A` (`rows × cols`), one dot product per row,
/// and `‖A‖²` from the same pass over `A` (`norm` false: 0).
#[inline(always)]
fn mat_vec(dot: Dot, a: &[f32], cols: usize, x: &[f32], y: &mut [f32], norm: bool) -> f64 {
    let mut norm2 = 0f64;
    for (row, y) in a.chunks_exact(cols).zip(y) {
        let (d, n) = dot(row, x, norm);
        *y = d;
        norm2 += f64::from(n);
    }
    norm2
}

/// [`Dot`] one value at a time, for CPUs without AVX2 and FMA.
fn dot_plain(a: &[f32], b: &[f32], norm: bool) -> (f32, f32) {
    let d = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = if norm {
        a.iter().map(|x| x * x).sum()
    } else {
        0.0
    };
    (d, n)
}

/// [`Dot`] in AVX2 registers, four of eight lanes each in flight, with
/// fused multiply-adds.
#[cfg(target_arch = "x86_64")]
fn dot_avx2(a: &[f32], b: &[f32], norm: bool) -> (f32, f32) {
    // SAFETY: chosen only where the CPU has AVX2 and FMA (`Kernels`).
    unsafe { dot_avx2_unchecked(a, b, norm) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2_unchecked(a: &[f32], b: &[f32], norm: bool) -> (f32, f32) {
    use std::arch::x86_64::*;
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let mut d = [_mm256_setzero_ps(); 4];
    let mut n = [_mm256_setzero_ps(); 4];
    let (a32, a_tail) = a.as_chunks::<32>();
    let (b32, _) = b.as_chunks::<32>();
    for (a, b) in a32.iter().zip(b32) {
        for k in 0..4 {
            // SAFETY: each chunk holds 32 values; lane k reads 8 from 8·k.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(a.as_ptr().add(8 * k)),
                    _mm256_loadu_ps(b.as_ptr().add(8 * k)),
                )
            };
            d[k] = _mm256_fmadd_ps(x, y, d[k]);
            if norm {
                n[k] = _mm256_fmadd_ps(x, x, n[k]);
            }
        }
    }
    let sum = |v: [__m256; 4]| {
        let v = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds the 8 values stored.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum::<f32>()
    };
    let (tail_d, tail_n) = dot_plain(a_tail, &b[len - a_tail.len()..], norm);
    (sum(d) + tail_d, sum(n) + tail_n)
}

/// `Σ_k |a_k| b_k` over the shorter of the two (`b` holds magnitudes).
type DotAbs = fn(&[f32], &[f32]) -> f32;

/// `y ← y + w x`.
type Axpy = fn(f32, &[f32], &mut [f32]);

/// The arithmetic [`terms`] runs on: AVX2 and FMA where the CPU has them,
/// plain loops elsewhere.
#[derive(Clone, Copy)]
struct Kernels {
    dot: Dot,
    dot_abs: DotAbs,
    axpy: Axpy,
}

impl Kernels {
    fn of_this_cpu() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Self {
                dot: dot_avx2,
                dot_abs: dot_abs_avx2,
                axpy: axpy_avx2,
            };
        }
        Self {
            dot: dot_plain,
            dot_abs: dot_abs_plain,
            axpy: axpy_plain,
        }
    }
}

fn dot_abs_plain(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x.abs() * y).sum()
}

fn axpy_plain(w: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += w * x;
    }
}

/// [`DotAbs`] in AVX2 registers (the sign bits cleared with a mask).
#[cfg(target_arch = "x86_64")]
fn dot_abs_avx2(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: chosen only where the CPU has AVX2 and FMA (`Kernels`).
    unsafe { dot_abs_avx2_unchecked(a, b) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_abs_avx2_unchecked(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut d = [_mm256_setzero_ps(); 2];
    let (a16, a_tail) = a.as_chunks::<16>();
    let (b16, _) = b.as_chunks::<16>();
    for (a, b) in a16.iter().zip(b16) {
        for (k, d) in d.iter_mut().enumerate() {
            // SAFETY: each chunk holds 16 values; lane k reads 8 from 8·k.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(a.as_ptr().add(8 * k)),
                    _mm256_loadu_ps(b.as_ptr().add(8 * k)),
                )
            };
            *d = _mm256_fmadd_ps(_mm256_and_ps(x, magnitude), y, *d);
        }
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds the 8 values stored.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(d[0], d[1])) };
    lanes.iter().sum::<f32>() + dot_abs_plain(a_tail, &b[len - a_tail.len()..])
}

/// [`Axpy`] compiled for AVX2 (the loop is vectorised eight lanes wide).
#[cfg(target_arch = "x86_64")]
fn axpy_avx2(w: f32, x: &[f32], y: &mut [f32]) {
    // SAFETY: chosen only where the CPU has AVX2 and FMA (`Kernels`).
    unsafe { axpy_avx2_unchecked(w, x, y) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpy_avx2_unchecked(w: f32, x: &[f32], y: &mut [f32]) {
    axpy_plain(w, x, y);
}

/// The check's random direction `r` (`len` values, uniform in (−1, 1)),
/// drawn from `seed`.
fn direction(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| ((rng.next_u32() >> 8) as f32 + 0.5) * (2.0 / (1u32 << 24) as f32) - 1.0)
        .collect()
}

/// The terms of one layer's check: `[a, f, m, ‖(∇W, ∇b)‖²]`.
///
/// `gw` is `∇W` as a matrix (out × inputs: a convolution's `C_out × K`),
/// `gb` `∇b` (out) or `None` without a bias, `u` the step's inputs (n ×
/// inputs × positions: a linear layer's one row per example and position,
/// positions 1; a convolution's unfolded input per example) and `g` the
/// gradients at the layer's output (n × out × positions). With
/// `r = (r_w, r_b)` drawn from `seed` and `s_ip = u_ip·r_w + r_b`:
/// `a = ∇W r_w + r_b ∇b`, `f = Σ_i Σ_p g_ip s_ip` and
/// `m = Σ_i Σ_p |g_ip| |s_ip|`, the products in float32 as PyTorch computes
/// them, returned as float64 like the tracer's other terms.
pub fn terms(
    gw: &[f32],
    gb: Option<&[f32]>,
    u: &[f32],
    g: &[f32],
    shape: [usize; 4],
    seed: u64,
) -> Vec<f64> {
    terms_with(Kernels::of_this_cpu(), gw, gb, u, g, shape, seed)
}

fn terms_with(
    k: Kernels,
    gw: &[f32],
    gb: Option<&[f32]>,
    u: &[f32],
    g: &[f32],
    shape: [usize; 4],
    seed: u64,
) -> Vec<f64> {
    let [out, inputs, n, positions] = shape;
    let r = direction(seed, inputs + 1);
    let (rw, rb) = (&r[..inputs], if gb.is_some() { r[inputs] } else { 0.0 });
    let mut a = vec![0f32; out];
    let mut norm2 = mat_vec(k.dot, gw, inputs, rw, &mut a, true);
    if let Some(gb) = gb {
        for (a, &b) in a.iter_mut().zip(gb) {
            *a += rb * b;
        }
        norm2 += gb.iter().map(|&x| f64::from(x * x)).sum::<f64>();
    }
    let (mut f, mut m) = (vec![0f32; out], vec![0f32; out]);
    if positions == 1 {
        // One s per row: U r_w, then gᵀ s and |g|ᵀ |s| with g (n × out)
        // read row by row.
        let mut s = vec![rb; n];
        for (s, row) in s.iter_mut().zip(u.chunks_exact(inputs.max(1))) {
            *s += (k.dot)(row, rw, false).0;
        }
        for (row, &x) in g.chunks_exact(out.max(1)).zip(&s) {
            (k.axpy)(x, row, &mut f);
            let ax = x.abs();
            for (m, &v) in m.iter_mut().zip(row) {
                *m += ax * v.abs();
            }
        }
    } else {
        // Per example: s over its positions (the rows of its unfolded input
        // weighted by r_w), then one dot product per output channel.
        let (mut s, mut s_abs) = (vec![0f32; positions], vec![0f32; positions]);
        let examples = u
            .chunks_exact((inputs * positions).max(1))
            .zip(g.chunks_exact((out * positions).max(1)));
        for (ui, gi) in examples {
            s.fill(rb);
            for (&w, row) in rw.iter().zip(ui.chunks_exact(positions)) {
                (k.axpy)(w, row, &mut s);
            }
            for (sa, x) in s_abs.iter_mut().zip(&s) {
                *sa = x.abs();
            }
            for ((f, m), row) in f
                .iter_mut()
                .zip(m.iter_mut())
                .zip(gi.chunks_exact(positions))
            {
                *f += (k.dot)(row, &s, false).0;
                *m += (k.dot_abs)(row, &s_abs);
            }
        }
    }
    let mut all = Vec::with_capacity(3 * out + 1);
    all.extend(a.iter().chain(&f).chain(&m).map(|&x| f64::from(x)));
    all.push(norm2);
    all
}

/// `check_terms(gw, gb, u, g, seed)`: [`terms`] for NumPy float32 arrays
/// (C-contiguous; `gw` out × inputs, `u` n × inputs × positions, `g` n ×
/// out × positions, `gb` None without a bias), as a float64 array of
/// `3·out + 1` values.
#[pyfunction]
#[pyo3(signature = (gw, gb, u, g, seed))]
pub fn check_terms<'py>(
    py: Python<'py>,
    gw: PyReadonlyArray2<'py, f32>,
    gb: Option<PyReadonlyArray1<'py, f32>>,
    u: PyReadonlyArray3<'py, f32>,
    g: PyReadonlyArray3<'py, f32>,
    seed: u64,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let (gw_values, u_values, g_values) = (values(&gw, "gw")?, values(&u, "u")?, values(&g, "g")?);
    let ((out, inputs), (n, u_inputs, positions)) =
        (gw.dims().into_pattern(), u.dims().into_pattern());
    let g_shape = g.dims().into_pattern();
    if u_inputs != inputs {
        return Err(error::invalid(format!(
            "u: {u_inputs} values per position for a layer of {inputs} inputs"
        )));
    }
    if g_shape != (n, out, positions) {
        let (a, b, c) = g_shape;
        return Err(error::invalid(format!(
            "g: shape ({a}, {b}, {c}) for {n} rows, {out} outputs and {positions} positions"
        )));
    }
    let gb_values = match &gb {
        Some(b) => {
            let b = values(b, "gb")?;
            if b.len() != out {
                return Err(error::invalid(format!(
                    "gb: {} values for a layer of {out} outputs",
                    b.len()
                )));
            }
            Some(b)
        }
        None => None,
    };
    let shape = [out, inputs, n, positions];
    let all = py.detach(|| terms(gw_values, gb_values, u_values, g_values, shape, seed));
    Ok(PyArray1::from_vec(py, all))
}

/// What a layer's check concluded (see [`verdicts`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// The records explain the applied gradient up to the scale `kappa`;
    /// `relative` is the difference left, `norm` is `‖(∇W, ∇b)‖`.
    Agrees {
        kappa: f64,
        relative: f64,
        norm: f64,
    },
    /// The applied gradient holds inf or NaN.
    NotFinite,
    /// No one scale explains the difference: `relative` is the smallest
    /// found, above the tolerance.
    Differs { relative: f64 },
}

/// The verdicts of one step's checks from their terms.
///
/// `flat` holds every checked layer's terms one after the other,
/// `[a, f, m, ‖(∇W, ∇b)‖²]` of `sizes[k]` values each ([`terms`] or the
/// tracer's PyTorch products), `tolerances[k]` the relative difference
/// layer `k` may show (by its precision). The difference of the applied
/// gradient `a` from the records' `f` is measured against the records'
/// magnitude `‖m‖`: `rel(κ) = ‖a − κ f‖ / (|κ| ‖m‖)`. The scale `κ` stays
/// 1 unless one explains the difference better than rounding (`snap`, or
/// four times the least-squares scale's own difference); then it is the
/// step's shared scale `Σ a·f / Σ f·f` over every layer (clipping by the
/// global norm and loss scaling scale every layer alike) unless the layer's
/// own least-squares scale `a·f / f·f` explains it clearly better.
pub fn verdicts(flat: &[f64], sizes: &[usize], tolerances: &[f64], snap: f64) -> Vec<Verdict> {
    let mut layers = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for &size in sizes {
        let end = (start + size).min(flat.len());
        layers.push(&flat[start..end]);
        start = end;
    }
    fn split(t: &[f64]) -> (&[f64], &[f64], &[f64], f64) {
        let c = t.len().saturating_sub(1) / 3;
        (
            &t[..c],
            &t[c..2 * c],
            &t[2 * c..3 * c],
            t.last().copied().unwrap_or(0.0),
        )
    }
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(x, y)| x * y).sum::<f64>();
    let (mut af, mut ff) = (0.0, 0.0);
    for t in &layers {
        let (a, f, _, _) = split(t);
        if a.iter().chain(f).all(|x| x.is_finite()) {
            af += dot(a, f);
            ff += dot(f, f);
        }
    }
    let shared = if ff > 0.0 { af / ff } else { f64::NAN };
    layers
        .iter()
        .zip(tolerances)
        .map(|(t, &tol)| {
            let (a, f, m, norm2) = split(t);
            if !(a.iter().chain(m).all(|x| x.is_finite()) && norm2.is_finite()) {
                return Verdict::NotFinite;
            }
            let magnitude = dot(m, m).sqrt();
            let aa = dot(a, a);
            let rel = |k: f64| {
                let denom = k.abs() * magnitude;
                if denom > 0.0 {
                    a.iter()
                        .zip(f)
                        .map(|(a, f)| (a - k * f).powi(2))
                        .sum::<f64>()
                        .sqrt()
                        / denom
                } else if aa == 0.0 {
                    0.0
                } else {
                    f64::INFINITY
                }
            };
            let ff = dot(f, f);
            let kappa = if ff > 0.0 { dot(a, f) / ff } else { f64::NAN };
            let (mut scale, mut relative) = (1.0, rel(1.0));
            let noise = if kappa.is_finite() {
                snap.max(4.0 * rel(kappa))
            } else {
                snap
            };
            if kappa.is_finite() && relative > noise {
                (scale, relative) = (kappa, rel(kappa));
                if shared.is_finite() && shared != 0.0 && rel(shared) <= noise {
                    (scale, relative) = (shared, rel(shared));
                }
            }
            if relative > tol {
                Verdict::Differs { relative }
            } else {
                Verdict::Agrees {
                    kappa: scale,
                    relative,
                    norm: norm2.max(0.0).sqrt(),
                }
            }
        })
        .collect()
}

/// `check_verdicts(flat, sizes, tolerances, snap)`: [`verdicts`] for the
/// Python tracer, one tuple per layer: `(κ, relative, norm, "")` when the
/// records agree, `(nan, nan, nan, "not finite")` for a gradient with inf
/// or NaN, `(nan, relative, nan, "differs")` beyond the tolerance.
#[pyfunction]
pub fn check_verdicts(
    flat: PyReadonlyArray1<'_, f64>,
    sizes: Vec<usize>,
    tolerances: Vec<f64>,
    snap: f64,
) -> PyResult<Vec<(f64, f64, f64, &'static str)>> {
    let values = values(&flat, "flat")?;
    if sizes.len() != tolerances.len() || sizes.iter().sum::<usize>() != values.len() {
        return Err(error::invalid(format!(
            "sizes: {} layers of {} terms in all for {} tolerances and {} terms",
            sizes.len(),
            sizes.iter().sum::<usize>(),
            tolerances.len(),
            values.len()
        )));
    }
    Ok(verdicts(values, &sizes, &tolerances, snap)
        .into_iter()
        .map(|v| match v {
            Verdict::Agrees {
                kappa,
                relative,
                norm,
            } => (kappa, relative, norm, ""),
            Verdict::NotFinite => (f64::NAN, f64::NAN, f64::NAN, "not finite"),
            Verdict::Differs { relative } => (f64::NAN, relative, f64::NAN, "differs"),
        })
        .collect())
}

/// Each example's loss and predicted class, as NumPy arrays.
type Examples<'py> = (Bound<'py, PyArray1<f32>>, Bound<'py, PyArray1<i32>>);

/// `example_losses(logits, labels)`: each example's cross-entropy
/// `−log softmax(z)_y` (computed in float64, returned as float32) and
/// predicted class (the first largest logit) from float32 `logits` (batch
/// × classes, C-contiguous) and int32 `labels` (batch, in `0..classes`).
#[pyfunction]
pub fn example_losses<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray2<'py, f32>,
    labels: PyReadonlyArray1<'py, i32>,
) -> PyResult<Examples<'py>> {
    let (z, (rows, classes)) = (values(&logits, "logits")?, logits.dims().into_pattern());
    let labels = values(&labels, "labels")?;
    if labels.len() != rows {
        return Err(error::invalid(format!(
            "labels: {} labels for {rows} rows of logits",
            labels.len()
        )));
    }
    if let Some(bad) = labels.iter().find(|&&y| y < 0 || y as usize >= classes) {
        return Err(error::invalid(format!(
            "labels: {bad} is not a class of {classes}"
        )));
    }
    let (loss, predicted) = reptrace_record::example_losses(z, classes, labels);
    Ok((
        PyArray1::from_vec(py, loss),
        PyArray1::from_vec(py, predicted),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The same terms by definition, in float64, one example at a time.
    fn brute(
        gw: &[f32],
        gb: Option<&[f32]>,
        u: &[f32],
        g: &[f32],
        shape: [usize; 4],
        seed: u64,
    ) -> Vec<f64> {
        let [out, inputs, n, positions] = shape;
        let r: Vec<f64> = direction(seed, inputs + 1)
            .into_iter()
            .map(f64::from)
            .collect();
        let rb = if gb.is_some() { r[inputs] } else { 0.0 };
        let mut all = vec![0f64; 3 * out + 1];
        for j in 0..out {
            let row = &gw[j * inputs..(j + 1) * inputs];
            all[j] = row
                .iter()
                .zip(&r)
                .map(|(&w, &r)| f64::from(w) * r)
                .sum::<f64>()
                + gb.map_or(0.0, |b| f64::from(b[j]) * rb);
        }
        for i in 0..n {
            for p in 0..positions {
                let s = (0..inputs)
                    .map(|k| f64::from(u[(i * inputs + k) * positions + p]) * r[k])
                    .sum::<f64>()
                    + rb;
                for j in 0..out {
                    let d = f64::from(g[(i * out + j) * positions + p]);
                    all[out + j] += d * s;
                    all[2 * out + j] += d.abs() * s.abs();
                }
            }
        }
        all[3 * out] = gw
            .iter()
            .chain(gb.unwrap_or(&[]))
            .map(|&x| f64::from(x).powi(2))
            .sum();
        all
    }

    proptest! {
        #[test]
        fn terms_match_their_definition(
            out in 1usize..20, inputs in 1usize..40, n in 1usize..12, positions in 1usize..30,
            bias: bool, seed: u64, values in proptest::collection::vec(-2f32..2f32, 2000),
        ) {
            let mut next = values.iter().copied().cycle();
            let mut take = |k: usize| (0..k).map(|_| next.next().unwrap_or(0.0)).collect::<Vec<f32>>();
            let (gw, gb) = (take(out * inputs), take(out));
            let (u, g) = (take(n * inputs * positions), take(n * out * positions));
            let gb = bias.then_some(&gb[..]);
            let shape = [out, inputs, n, positions];
            let want = brute(&gw, gb, &u, &g, shape, seed);
            let plain = Kernels { dot: dot_plain, dot_abs: dot_abs_plain, axpy: axpy_plain };
            for kernels in [Kernels::of_this_cpu(), plain] {
                let got = terms_with(kernels, &gw, gb, &u, &g, shape, seed);
                prop_assert_eq!(got.len(), want.len());
                let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
                for (k, (x, y)) in got.iter().zip(&want).enumerate() {
                    prop_assert!((x - y).abs() <= 1e-5 * scale, "term {}: {} vs {}", k, x, y);
                }
            }
        }
    }

    #[test]
    fn the_direction_is_fixed_by_the_seed_and_spread_over_minus_one_to_one() {
        let r = direction(7, 10_000);
        assert_eq!(r, direction(7, 10_000));
        assert_ne!(r, direction(8, 10_000));
        assert!(r.iter().all(|x| x.abs() < 1.0));
        let mean = r.iter().map(|&x| f64::from(x)).sum::<f64>() / r.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!(r.iter().any(|&x| x > 0.9) && r.iter().any(|&x| x < -0.9));
    }

    /// One layer's terms for an applied gradient `a` and records `f`, with
    /// magnitudes `|f|` and a squared norm of 4.
    fn layer(a: &[f64], f: &[f64]) -> Vec<f64> {
        let m = f.iter().map(|x| x.abs());
        a.iter().chain(f).copied().chain(m).chain([4.0]).collect()
    }

    #[test]
    fn verdicts_find_one_scale_per_step_and_refuse_what_no_scale_explains() {
        let f = [1.0, -2.0, 3.0, 0.5];
        let same = layer(&f, &f);
        let halved = layer(&f.map(|x| 0.5 * x), &f);
        let edited = layer(&[1.0, -2.0, 3.0, 0.9], &f);
        let tol = [1e-4];
        // The records are the applied gradient: κ 1, nothing left.
        let v = verdicts(&same, &[same.len()], &tol, 1e-6);
        assert_eq!(
            v,
            [Verdict::Agrees {
                kappa: 1.0,
                relative: 0.0,
                norm: 2.0
            }]
        );
        // Clipping by norm: one scale explains it.
        let Verdict::Agrees {
            kappa, relative, ..
        } = verdicts(&halved, &[halved.len()], &tol, 1e-6)[0]
        else {
            panic!("a scaled gradient is refused")
        };
        assert!(
            (kappa - 0.5).abs() < 1e-12 && relative < 1e-12,
            "{kappa} {relative}"
        );
        // An edit of one value: refused, the difference named.
        let Verdict::Differs { relative } = verdicts(&edited, &[edited.len()], &tol, 1e-6)[0]
        else {
            panic!("an edited gradient is accepted")
        };
        assert!(relative > 1e-2, "{relative}");
        // Two layers scaled alike share the step's scale, a layer whose
        // records cancel (f ≈ 0 against its magnitude) included.
        let cancelling = {
            let mut t = layer(&[0.25, -0.25], &[0.5, -0.5]);
            t[4] = 10.0; // |f| far larger than f: per-example terms that cancel
            t[5] = 10.0;
            t
        };
        let both: Vec<f64> = halved.iter().chain(&cancelling).copied().collect();
        let v = verdicts(
            &both,
            &[halved.len(), cancelling.len()],
            &[1e-4, 1e-4],
            1e-6,
        );
        for v in v {
            let Verdict::Agrees { kappa, .. } = v else {
                panic!("{v:?}")
            };
            assert!((kappa - 0.5).abs() < 1e-12, "{kappa}");
        }
        // inf or NaN in the applied gradient.
        let mut broken = same.clone();
        broken[1] = f64::NAN;
        assert_eq!(
            verdicts(&broken, &[broken.len()], &tol, 1e-6),
            [Verdict::NotFinite]
        );
        broken[1] = 1.0;
        broken[same.len() - 1] = f64::INFINITY;
        assert_eq!(
            verdicts(&broken, &[broken.len()], &tol, 1e-6),
            [Verdict::NotFinite]
        );
    }

    #[test]
    fn avx2_and_plain_dot_products_agree() {
        let a: Vec<f32> = (0..1000)
            .map(|k| ((k * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let b: Vec<f32> = (0..1000)
            .map(|k| ((k * 13 % 97) as f32 - 48.0) / 5.0)
            .collect();
        for len in [0, 1, 7, 8, 31, 32, 33, 100, 1000] {
            let (d, n) = dot_plain(&a[..len], &b[..len], true);
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                let (d2, n2) = dot_avx2(&a[..len], &b[..len], true);
                assert!((d - d2).abs() <= 1e-4 * n.max(1.0), "{len}: {d} vs {d2}");
                assert!((n - n2).abs() <= 1e-5 * n.max(1.0), "{len}: {n} vs {n2}");
                assert_eq!(dot_avx2(&a[..len], &b[..len], false).1, 0.0);
            }
            let want: f64 = a[..len]
                .iter()
                .zip(&b[..len])
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            assert!(
                (f64::from(d) - want).abs() <= 1e-4 * f64::from(n.max(1.0)),
                "{len}"
            );
        }
    }
}
