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
//! - [`linear_check_terms`]: a float32 `nn.Linear`'s check terms, four
//!   matrix-vector products (AVX2 and FMA where the CPU has them, plain
//!   loops elsewhere);
//! - [`check_verdicts`]: every checked layer's verdict from its terms, in
//!   float64, the step's shared scale included (for either path);
//! - [`example_losses`]: each example's cross-entropy and prediction from
//!   CPU logits, in float64, as `reptrace train` computes them.
use crate::error;
use numpy::{PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// A contiguous 2-D array's elements and shape, or an error naming it.
fn matrix<'a>(a: &'a PyReadonlyArray2<'_, f32>, what: &str) -> PyResult<(&'a [f32], [usize; 2])> {
    let shape = a.shape();
    let values = a
        .as_slice()
        .ok()
        .filter(|_| a.is_c_contiguous())
        .ok_or_else(|| error::invalid(format!("{what}: the array must be C-contiguous")))?;
    Ok((values, [shape[0], shape[1]]))
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
    // SAFETY: chosen only where the CPU has AVX2 and FMA (`terms`).
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

/// The check's random direction `r` (`len` values, uniform in (−1, 1)),
/// drawn from `seed`.
fn direction(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| ((rng.next_u32() >> 8) as f32 + 0.5) * (2.0 / (1u32 << 24) as f32) - 1.0)
        .collect()
}

/// The terms of one dense layer's check: `[a, f, m, ‖(∇W, ∇b)‖²]`.
///
/// `gw` is `∇W` (out × in), `gb` `∇b` (out) or `None` without a bias, `u`
/// the step's inputs (n × in, one row per example) and `g` the gradients
/// at the layer's output (n × out). With `r = (r_w, r_b)` drawn from `seed`:
/// `a = ∇W r_w + r_b ∇b`, `f = Σ_i g_i (u_i·r_w + r_b)` and
/// `m = Σ_i |g_i| |u_i·r_w + r_b|`, the products in float32 as PyTorch
/// computes them, returned as float64 like the tracer's other terms.
pub fn terms(
    gw: &[f32],
    gb: Option<&[f32]>,
    u: &[f32],
    g: &[f32],
    shape: [usize; 3],
    seed: u64,
) -> Vec<f64> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        return terms_with(dot_avx2, gw, gb, u, g, shape, seed);
    }
    terms_with(dot_plain, gw, gb, u, g, shape, seed)
}

fn terms_with(
    dot: Dot,
    gw: &[f32],
    gb: Option<&[f32]>,
    u: &[f32],
    g: &[f32],
    shape: [usize; 3],
    seed: u64,
) -> Vec<f64> {
    let [out, inputs, n] = shape;
    let r = direction(seed, inputs + 1);
    let (rw, rb) = (&r[..inputs], if gb.is_some() { r[inputs] } else { 0.0 });
    let mut a = vec![0f32; out];
    let mut norm2 = mat_vec(dot, gw, inputs, rw, &mut a, true);
    let mut s = vec![0f32; n];
    mat_vec(dot, u, inputs, rw, &mut s, false);
    if let Some(gb) = gb {
        for (a, &b) in a.iter_mut().zip(gb) {
            *a += rb * b;
        }
        norm2 += gb.iter().map(|&x| f64::from(x * x)).sum::<f64>();
        for s in &mut s {
            *s += rb;
        }
    }
    // gᵀ s and |g|ᵀ |s|, g (n × out) read row by row.
    let (mut f, mut m) = (vec![0f32; out], vec![0f32; out]);
    for (row, &x) in g.chunks_exact(out).zip(&s) {
        let ax = x.abs();
        for ((f, m), &v) in f.iter_mut().zip(m.iter_mut()).zip(row) {
            *f += x * v;
            *m += ax * v.abs();
        }
    }
    let mut all = Vec::with_capacity(3 * out + 1);
    all.extend(a.iter().chain(&f).chain(&m).map(|&x| f64::from(x)));
    all.push(norm2);
    all
}

/// `linear_check_terms(gw, gb, u, g, seed)`: [`terms`] for NumPy float32
/// arrays (contiguous; `gb` None without a bias), as a float64 array of
/// `3·out + 1` values.
#[pyfunction]
#[pyo3(signature = (gw, gb, u, g, seed))]
pub fn linear_check_terms<'py>(
    py: Python<'py>,
    gw: PyReadonlyArray2<'py, f32>,
    gb: Option<PyReadonlyArray1<'py, f32>>,
    u: PyReadonlyArray2<'py, f32>,
    g: PyReadonlyArray2<'py, f32>,
    seed: u64,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let (gw_values, [out, inputs]) = matrix(&gw, "gw")?;
    let (u_values, [n, u_inputs]) = matrix(&u, "u")?;
    let (g_values, [g_n, g_out]) = matrix(&g, "g")?;
    if u_inputs != inputs {
        return Err(error::invalid(format!(
            "u: {u_inputs} values per row for a layer of {inputs} inputs"
        )));
    }
    if g_n != n || g_out != out {
        return Err(error::invalid(format!(
            "g: shape ({g_n}, {g_out}) for {n} rows and {out} outputs"
        )));
    }
    let gb_values = match &gb {
        Some(b) => {
            let values = b
                .as_slice()
                .map_err(|_| error::invalid("gb: the array must be contiguous"))?;
            if values.len() != out {
                return Err(error::invalid(format!(
                    "gb: {} values for a layer of {out} outputs",
                    values.len()
                )));
            }
            Some(values)
        }
        None => None,
    };
    let all = py.detach(|| {
        terms(
            gw_values,
            gb_values,
            u_values,
            g_values,
            [out, inputs, n],
            seed,
        )
    });
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
    let values = flat
        .as_slice()
        .map_err(|_| error::invalid("flat: the array must be contiguous"))?;
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
    let (z, [rows, classes]) = matrix(&logits, "logits")?;
    let labels = labels
        .as_slice()
        .map_err(|_| error::invalid("labels: the array must be contiguous"))?;
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
        shape: [usize; 3],
        seed: u64,
    ) -> Vec<f64> {
        let [out, inputs, n] = shape;
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
            let s = u[i * inputs..(i + 1) * inputs]
                .iter()
                .zip(&r)
                .map(|(&x, &r)| f64::from(x) * r)
                .sum::<f64>()
                + rb;
            for j in 0..out {
                let d = f64::from(g[i * out + j]);
                all[out + j] += d * s;
                all[2 * out + j] += d.abs() * s.abs();
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
            out in 1usize..20, inputs in 1usize..40, n in 1usize..12, bias: bool, seed: u64,
            values in proptest::collection::vec(-2f32..2f32, 2000),
        ) {
            let mut next = values.iter().copied().cycle();
            let mut take = |k: usize| (0..k).map(|_| next.next().unwrap_or(0.0)).collect::<Vec<f32>>();
            let (gw, gb, u, g) = (take(out * inputs), take(out), take(n * inputs), take(n * out));
            let gb = bias.then_some(&gb[..]);
            let got = terms(&gw, gb, &u, &g, [out, inputs, n], seed);
            let want = brute(&gw, gb, &u, &g, [out, inputs, n], seed);
            prop_assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
            for (k, (x, y)) in got.iter().zip(&want).enumerate() {
                prop_assert!((x - y).abs() <= 1e-5 * scale, "term {}: {} vs {}", k, x, y);
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
