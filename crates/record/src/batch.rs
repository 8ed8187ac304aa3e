//! The rows a training loop hands to the recorder, borrowed from its buffers.
//!
//! Each `*Batch` is checked on the caller's thread (lengths, layer, order) and
//! copied once into an owned message for the writer thread, so the caller's
//! buffers are free again as soon as the call returns.
use reptrace_format::{Lens, Split};

/// One row of the `steps` table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRow {
    /// Training step, counted from 0 over the whole run; strictly increasing.
    pub step: i64,
    /// Epoch of the step, counted from 0.
    pub epoch: i32,
    /// Learning rate η_t used at this step.
    pub lr: f64,
    /// Number of instances in the step's mini-batch.
    pub batch_size: i32,
    /// The batch loss.
    pub loss: f64,
    /// The optimizer skipped the step (a gradient scaler found inf/NaN
    /// gradients): it has no update records.
    pub skipped: bool,
}

/// One row of the `layer_steps` table: what the optimizer applied to one
/// traced layer at one step (instance mode).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStepRow {
    /// The training step.
    pub step: i64,
    /// Epoch of the step.
    pub epoch: i32,
    /// The traced layer.
    pub layer: String,
    /// Index of the parameter group holding the layer's parameters.
    pub param_group: i32,
    /// Learning rate η_t of the group at this step.
    pub lr: f64,
    /// Momentum μ_t of the group at this step.
    pub momentum: f64,
    /// Dampening τ_t of the group at this step.
    pub dampening: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Weight decay of the group at this step.
    pub weight_decay: f64,
    /// κ_t: the applied gradient over the records' gradient (folded into `v`).
    pub grad_scale: f64,
    /// The check's relative difference, if the step was checked.
    pub grad_check: Option<f64>,
    /// ‖(∇W, ∇b)‖ of the applied gradient, if measured.
    pub grad_norm: Option<f64>,
    /// `f32`, `bf16` or `f16`: the precision the layer ran in.
    pub precision: String,
    /// Adam's and AdamW's per-coordinate scaling of the step (format 10);
    /// `None` for other optimizers.
    pub adam: Option<AdamStep>,
}

/// What Adam or AdamW applied to one traced layer at one step, besides the
/// gradient: the analyzer scales the step's records by it
/// (docs/method.md §6).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamStep {
    /// β₁ of the layer's group at the step, in `[0, 1)`.
    pub beta1: f64,
    /// `c_t = η_t / (1 − β₁^k)`, `k` the optimizer's step count after the step.
    pub step_size: f64,
    /// `D_t = 1 / (sqrt(v_t / (1 − β₂^k)) + ε)` per parameter value: `vec W`
    /// (PyTorch's layout, row-major), then the bias; every value positive.
    pub preconditioner: Vec<f32>,
}

/// The training dynamics of one step (table `examples`): `n` rows, one per
/// member of the batch, from the forward pass that step's update came from.
#[derive(Debug, Clone, Copy)]
pub struct ExampleBatch<'a> {
    /// The training step (not negative).
    pub step: i64,
    /// Epoch of the step.
    pub epoch: i32,
    /// The batch members, `n` of them.
    pub instance_ids: &'a [i64],
    /// Each member's label, in `0..classes`.
    pub labels: &'a [i32],
    /// Each example's cross-entropy, `−log softmax(output)[label]`; the
    /// probability of its label, `p_label`, is computed from it.
    pub loss: &'a [f32],
    /// The class of each example's largest output.
    pub predicted: &'a [i32],
}

/// Each row's cross-entropy `−log softmax(z)_y` (in f64, stored as f32)
/// and predicted class (the first largest logit, as `argmax` takes it) of
/// row-major `logits`, `classes` per row, one row per label. A label out of
/// range gets a NaN loss; without classes there are no rows.
pub fn example_losses(logits: &[f32], classes: usize, labels: &[i32]) -> (Vec<f32>, Vec<i32>) {
    if classes == 0 {
        return (Vec::new(), Vec::new());
    }
    logits
        .chunks_exact(classes)
        .zip(labels)
        .map(|(z, &label)| {
            let (mut best, mut max) = (0, z[0]);
            for (c, &x) in z.iter().enumerate().skip(1) {
                if x > max {
                    (best, max) = (c, x);
                }
            }
            let max = f64::from(max);
            let sum: f64 = z.iter().map(|&x| (f64::from(x) - max).exp()).sum();
            let picked = usize::try_from(label).ok().and_then(|y| z.get(y));
            let loss = picked.map_or(f64::NAN, |&z_y| max + sum.ln() - f64::from(z_y));
            (loss as f32, best as i32)
        })
        .unzip()
}

/// The update records of one step for one traced layer: `n` rows.
///
/// `u` is `n × u_len` and `v` is `n × v_len`, row-major, with
/// `(u_len, v_len) = TracedLayer::factor_lens()`. A ragged layer's factor
/// records (`TracedLayer::record_shape` is `Lens::PerPosition(a, b)`) hold
/// each row's own number of positions `n_i ≥ 0` instead: row `i` has
/// `n_i × a` values of `u` and `n_i × b` of `v`, the rows one after the
/// other, with the `n_i` in `positions`.
#[derive(Debug, Clone, Copy)]
pub struct UpdateBatch<'a> {
    /// The training step (not negative).
    pub step: i64,
    /// Epoch of the step.
    pub epoch: i32,
    /// The training instance of each row, `n` of them.
    pub instance_ids: &'a [i64],
    /// Each instance's label, in `0..classes`.
    pub labels: &'a [i32],
    /// The `u` factors (Linear: the layer inputs), `n × u_len`, row-major.
    pub u: &'a [f32],
    /// The `v` factors (Linear: −η_t·δ), `n × v_len`, row-major.
    pub v: &'a [f32],
    /// ‖ΔW‖_F per row; `None`: computed by the writer thread.
    pub update_norm: Option<&'a [f32]>,
    /// A ragged layer's positions per row, `n` of them (the sums of
    /// `positions · a` and `positions · b` are the lengths of `u` and `v`);
    /// `None`: every row holds the same number of positions (any number,
    /// 0 included). Must be `None` for the other layers.
    pub positions: Option<&'a [u32]>,
}

/// Factor values handed over by value: `f32`, or `f16` already converted by
/// the caller (for instance on the GPU, before the copy to the host, which
/// halves the bytes that travel) for a run recorded in f16.
#[derive(Debug, Clone, PartialEq)]
pub enum FactorValues {
    /// Single-precision values (for a run in f32 or f16).
    F32(Vec<f32>),
    /// Half-precision values (only for a run recorded in f16).
    F16(Vec<half::f16>),
}

impl FactorValues {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the values take in memory.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::F32(v) => 4 * v.len(),
            Self::F16(v) => 2 * v.len(),
        }
    }

    /// The values widened to f32 (a copy only for f16).
    pub(crate) fn as_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Self::F32(v) => std::borrow::Cow::Borrowed(v),
            Self::F16(v) => std::borrow::Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
        }
    }
}

impl From<Vec<f32>> for FactorValues {
    fn from(v: Vec<f32>) -> Self {
        Self::F32(v)
    }
}

impl From<Vec<half::f16>> for FactorValues {
    fn from(v: Vec<half::f16>) -> Self {
        Self::F16(v)
    }
}

/// [`UpdateBatch`] handed over by value: the recorder checks it like an
/// `UpdateBatch` and moves the buffers to the writer thread without copying
/// them (`Recorder::updates_owned`). The same rows either way.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateBatchOwned {
    /// As [`UpdateBatch::step`].
    pub step: i64,
    /// As [`UpdateBatch::epoch`].
    pub epoch: i32,
    /// As [`UpdateBatch::instance_ids`].
    pub instance_ids: Vec<i64>,
    /// As [`UpdateBatch::labels`].
    pub labels: Vec<i32>,
    /// As [`UpdateBatch::u`], `n × u_len` values.
    pub u: FactorValues,
    /// As [`UpdateBatch::v`], `n × v_len` values.
    pub v: FactorValues,
    /// ‖ΔW‖_F per row; `None`: computed by the writer thread.
    pub update_norm: Option<Vec<f32>>,
    /// As [`UpdateBatch::positions`].
    pub positions: Option<Vec<u32>>,
}

/// Probe rows for one traced layer: `n` rows, `a` is `n × a_len` and `p` is
/// `n × p_len` with `(a_len, p_len) = TracedLayer::probe_lens()`. A ragged
/// layer's probes (`TracedLayer::probe_shape` is `Lens::PerPosition(a, p)`)
/// hold each row's own number of positions `n_i ≥ 1` instead, given in
/// `positions`.
#[derive(Debug, Clone, Copy)]
pub struct ProbeBatch<'a> {
    /// Each row's probe id (`probes.probe_id`), `n` of them; a probe has a
    /// row in every traced layer, under the same id.
    pub probe_ids: &'a [i64],
    /// The training instance each probe is, or `None`.
    pub instance_ids: &'a [Option<i64>],
    /// Each probe's true class, in `0..classes`.
    pub labels: &'a [i32],
    /// The class the network predicts for each probe.
    pub predicted: &'a [i32],
    /// The layer's inputs, `n × a_len`, row-major (Conv2d: `C_in × H × W`,
    /// not unfolded).
    pub a: &'a [f64],
    /// The refinements `p = z_T − (W_0 ⊛ a + b_0)`, `n × p_len`, row-major.
    pub p: &'a [f64],
    /// A ragged layer's positions per row, `n` of them, each at least 1;
    /// `None`: every row holds the same number of positions (at least 1).
    /// Must be `None` for the other layers.
    pub positions: Option<&'a [u32]>,
}

/// A named f32 tensor of a weights snapshot (PyTorch name and shape).
#[derive(Debug, Clone, Copy)]
pub struct NamedTensor<'a> {
    /// `"<layer>.weight"`, `"<layer>.bias"`, …
    pub name: &'a str,
    /// The tensor's shape as PyTorch stores it (Linear weight: `[out, in]`).
    pub shape: &'a [usize],
    /// Row-major elements, `shape.iter().product()` of them.
    pub data: &'a [f32],
}

/// An owned copy of [`NamedTensor`].
#[derive(Debug, Clone)]
pub(crate) struct OwnedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Owned `instances` rows.
#[derive(Debug)]
pub(crate) struct InstanceRows {
    pub ids: Vec<i64>,
    pub labels: Vec<i32>,
    pub splits: Vec<Split>,
}

/// Owned `steps` rows, column by column.
#[derive(Debug, Default)]
pub(crate) struct StepRowsOwned {
    pub step: Vec<i64>,
    pub epoch: Vec<i32>,
    pub lr: Vec<f64>,
    pub batch_size: Vec<i32>,
    pub loss: Vec<f64>,
    pub skipped: Vec<bool>,
}

impl StepRowsOwned {
    pub fn push(&mut self, r: &StepRow) {
        self.step.push(r.step);
        self.epoch.push(r.epoch);
        self.lr.push(r.lr);
        self.batch_size.push(r.batch_size);
        self.loss.push(r.loss);
        self.skipped.push(r.skipped);
    }

    pub fn len(&self) -> usize {
        self.step.len()
    }
}

/// Owned `examples` rows, column by column.
#[derive(Debug, Default)]
pub(crate) struct ExampleRowsOwned {
    pub step: Vec<i64>,
    pub epoch: Vec<i32>,
    pub ids: Vec<i64>,
    pub labels: Vec<i32>,
    pub loss: Vec<f32>,
    pub predicted: Vec<i32>,
}

impl ExampleRowsOwned {
    pub fn push(&mut self, b: &ExampleBatch<'_>) {
        let n = b.instance_ids.len();
        self.step.extend(std::iter::repeat_n(b.step, n));
        self.epoch.extend(std::iter::repeat_n(b.epoch, n));
        self.ids.extend_from_slice(b.instance_ids);
        self.labels.extend_from_slice(b.labels);
        self.loss.extend_from_slice(b.loss);
        self.predicted.extend_from_slice(b.predicted);
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }
}

/// Owned `updates` rows of one layer.
#[derive(Debug)]
pub(crate) struct UpdateRows {
    pub step: i64,
    pub epoch: i32,
    /// `None` for a batch-mode record (the whole batch's update).
    pub ids: Vec<Option<i64>>,
    /// `None` for a batch-mode record of a batch of several classes.
    pub labels: Vec<Option<i32>>,
    pub u: FactorValues,
    pub v: FactorValues,
    /// How `u` splits into rows.
    pub u_rows: RowLens,
    /// How `v` splits into rows.
    pub v_rows: RowLens,
    pub norms: Option<Vec<f32>>,
    /// How to compute ‖ΔW‖ when `norms` is `None`.
    pub norm: NormKind,
}

/// Owned `batches` rows: the members of one step's batch.
#[derive(Debug)]
pub(crate) struct BatchRows {
    pub step: i64,
    pub epoch: i32,
    pub ids: Vec<i64>,
    pub labels: Vec<i32>,
}

/// One batch-mode step, for [`crate::Recorder::batch_step`]: the members of
/// the batch and, per traced layer, the whole update `W_{t+1} − W_t`.
#[derive(Debug, Clone, Copy)]
pub struct BatchStep<'a> {
    /// The training step (not negative).
    pub step: i64,
    /// Epoch of the step.
    pub epoch: i32,
    /// The batch's members (rows of table `batches`).
    pub instance_ids: &'a [i64],
    /// Each member's label, in `0..classes`.
    pub labels: &'a [i32],
    /// Per traced layer: its name and ΔW (row-major, PyTorch's weight
    /// shape) followed by Δb when the layer has a bias.
    pub deltas: &'a [(&'a str, &'a [f32])],
}

/// Owned `probes` rows of one layer.
#[derive(Debug)]
pub(crate) struct ProbeRows {
    pub probe_ids: Vec<i64>,
    pub instance_ids: Vec<Option<i64>>,
    pub labels: Vec<i32>,
    pub predicted: Vec<i32>,
    pub a: Vec<f64>,
    pub p: Vec<f64>,
    /// How `a` splits into rows.
    pub a_rows: RowLens,
    /// How `p` splits into rows.
    pub p_rows: RowLens,
}

/// How the flat values of one list column split into its rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RowLens {
    /// Every row holds this many values.
    Fixed(usize),
    /// Row `i` holds values `offsets[i]..offsets[i + 1]` (`n + 1` offsets,
    /// from 0): a ragged layer's rows.
    Offsets(Vec<usize>),
}

impl RowLens {
    /// Row `i`'s values.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        match self {
            Self::Fixed(len) => i * len..(i + 1) * len,
            Self::Offsets(offsets) => offsets[i]..offsets[i + 1],
        }
    }
}

/// The rows of a ragged layer's batch: `n` rows of `first` and `second`
/// values, `per.0` and `per.1` values a position, each row holding
/// `positions[i]` positions (`None`: every row the same number). Rows of
/// fewer than `min` positions are refused. Errors name `context` and
/// `positions`.
pub(crate) fn per_position_rows(
    context: impl Fn() -> String,
    positions: Option<&[u32]>,
    n: usize,
    names: (&'static str, &'static str),
    per: (usize, usize),
    got: (usize, usize),
    min: u32,
) -> crate::Result<(RowLens, RowLens)> {
    let invalid = |message: String| crate::Error::Invalid {
        context: context(),
        message,
    };
    let too_many = || invalid("the positions' values overflow the address space".to_owned());
    let Some(ps) = positions else {
        // Every row holds the same number m of positions: m·per values each.
        let m = if n == 0 {
            (got == (0, 0)).then_some(0)
        } else if got.0.is_multiple_of(n) && got.1.is_multiple_of(n) {
            Lens::PerPosition(per.0, per.1)
                .positions(got.0 / n, got.1 / n)
                .ok()
        } else {
            None
        };
        let Some(m) = m else {
            return Err(invalid(format!(
                "without positions every row holds the same number m of positions, but {} {} \
                 and {} {} values are not {n} rows of m·{} and m·{} values; pass positions",
                got.0, names.0, got.1, names.1, per.0, per.1
            )));
        };
        if n > 0 && m < min as usize {
            return Err(invalid(format!(
                "without positions every row holds {m} positions, at least {min} needed; \
                 pass positions"
            )));
        }
        return Ok((RowLens::Fixed(m * per.0), RowLens::Fixed(m * per.1)));
    };
    check_len(&context, "positions", n, ps.len())?;
    if let Some(i) = ps.iter().position(|&p| p < min) {
        return Err(invalid(format!(
            "positions[{i}] is {}; every row holds at least {min}",
            ps[i]
        )));
    }
    let offsets = |unit: usize| -> Option<Vec<usize>> {
        let mut offsets = Vec::with_capacity(n + 1);
        let mut end = 0usize;
        offsets.push(end);
        for &p in ps {
            end = end.checked_add((p as usize).checked_mul(unit)?)?;
            offsets.push(end);
        }
        Some(offsets)
    };
    let (first, second) = (
        offsets(per.0).ok_or_else(too_many)?,
        offsets(per.1).ok_or_else(too_many)?,
    );
    let total: u64 = ps.iter().map(|&p| u64::from(p)).sum();
    for (what, offs, unit, got) in [
        (names.0, &first, per.0, got.0),
        (names.1, &second, per.1, got.1),
    ] {
        let expected = offs[n];
        check_len(
            || {
                format!(
                    "{} (positions sum to {total}, of {unit} values each)",
                    context()
                )
            },
            what,
            expected,
            got,
        )?;
    }
    Ok((RowLens::Offsets(first), RowLens::Offsets(second)))
}

/// How a record's ‖ΔW‖_F follows from its `u` and `v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NormKind {
    /// Rank one: ΔW = v uᵀ, ‖ΔW‖ = ‖v‖·‖u‖.
    Outer,
    /// Conv2d factors: U is `k × p`, V is `c_out × p`, ΔW = V Uᵀ (with
    /// `groups` groups: group `g`'s `c_out/groups` rows of V times its
    /// `k/groups` rows of U).
    Factors {
        k: usize,
        p: usize,
        c_out: usize,
        groups: usize,
    },
    /// Linear factors at `t` positions: U is `t × n_in`, V is `t × n_out`,
    /// ΔW = Vᵀ U; `t` is each record's own (`v.len() / n_out`), so that
    /// the records of a ragged layer take theirs.
    Positions { n_in: usize, n_out: usize },
    /// Embedding factors: U holds `t` token ids of `digits` base-2048 digits,
    /// V is `t × dim`; row `r` of ΔW sums the rows of V whose id is `r`.
    Embedding {
        digits: usize,
        dim: usize,
        /// `num_embeddings`: the ids the recorder accepts are below it.
        num: usize,
    },
    /// `v` holds ΔW in its first `weight_len` elements (then the bias).
    Full { weight_len: usize },
}

/// ‖ΔW‖_F of one record, accumulated in f64.
pub(crate) fn update_norm(kind: NormKind, u: &[f32], v: &[f32]) -> f32 {
    match kind {
        NormKind::Outer => (sq_norm(u) * sq_norm(v)).sqrt() as f32,
        NormKind::Full { weight_len } => sq_norm(&v[..weight_len.min(v.len())]).sqrt() as f32,
        NormKind::Factors {
            k,
            p,
            c_out,
            groups,
        } => {
            let (kg, cg) = (k / groups.max(1), c_out / groups.max(1));
            let sq: f64 = (0..groups)
                .map(|g| {
                    let ug = u.get(g * kg * p..(g + 1) * kg * p).unwrap_or_default();
                    let vg = v.get(g * cg * p..(g + 1) * cg * p).unwrap_or_default();
                    factors_norm(ug, vg, kg, p, cg).powi(2)
                })
                .sum();
            sq.sqrt() as f32
        }
        NormKind::Positions { n_in, n_out } => {
            let t = v.len() / n_out.max(1);
            // Transposed into the conv layout: U (n_in × t), V (n_out × t).
            let transpose = |m: &[f32], cols: usize| -> Vec<f32> {
                (0..cols)
                    .flat_map(|c| (0..t).map(move |r| m.get(r * cols + c).copied().unwrap_or(0.0)))
                    .collect()
            };
            factors_norm(&transpose(u, n_in), &transpose(v, n_out), n_in, t, n_out) as f32
        }
        NormKind::Embedding { digits, dim, .. } => embedding_norm(u, v, digits, dim),
    }
}

/// ‖ΔW‖_F of an embedding record: the rows of V summed by token id (the
/// recorder refuses records whose ids do not decode; NaN if one did).
fn embedding_norm(u: &[f32], v: &[f32], digits: usize, dim: usize) -> f32 {
    let mut rows: std::collections::HashMap<u64, Vec<f64>> = std::collections::HashMap::new();
    for (id, vt) in u
        .chunks_exact(digits.max(1))
        .zip(v.chunks_exact(dim.max(1)))
    {
        let digits: Vec<f64> = id.iter().map(|&d| f64::from(d)).collect();
        let Some(id) = reptrace_format::kinds::embedding::id_of(&digits) else {
            return f32::NAN;
        };
        let row = rows.entry(id).or_insert_with(|| vec![0.0; dim]);
        for (r, &x) in row.iter_mut().zip(vt) {
            *r += f64::from(x);
        }
    }
    rows.values().flatten().map(|x| x * x).sum::<f64>().sqrt() as f32
}

fn sq_norm(x: &[f32]) -> f64 {
    x.iter().map(|&e| f64::from(e) * f64::from(e)).sum()
}

/// [`update_norm`] of a record stored in half precision, from the stored
/// values (each widened to f32 exactly): the same sums in the same order as
/// [`update_norm`] of the widened record, without widening a whole buffer.
pub(crate) fn update_norm_f16(kind: NormKind, u: &[half::f16], v: &[half::f16]) -> f32 {
    match kind {
        NormKind::Outer => (sq_norm_f16(u) * sq_norm_f16(v)).sqrt() as f32,
        NormKind::Full { weight_len } => sq_norm_f16(&v[..weight_len.min(v.len())]).sqrt() as f32,
        _ => update_norm(kind, &widen(u), &widen(v)),
    }
}

fn widen(x: &[half::f16]) -> Vec<f32> {
    use half::slice::HalfFloatSliceExt;
    let mut out = vec![0.0; x.len()];
    x.convert_to_f32_slice(&mut out);
    out
}

/// [`sq_norm`] of half-precision values, widened a block at a time (the
/// slice conversion uses the CPU's half-float instructions where it has them).
fn sq_norm_f16(x: &[half::f16]) -> f64 {
    use half::slice::HalfFloatSliceExt;
    let mut block = [0.0f32; 512];
    let mut total = 0.0;
    for chunk in x.chunks(block.len()) {
        let widened = &mut block[..chunk.len()];
        chunk.convert_to_f32_slice(widened);
        for &e in widened.iter() {
            total += f64::from(e) * f64::from(e);
        }
    }
    total
}

/// ‖V Uᵀ‖_F for U (`k × p`) and V (`c_out × p`), whichever way is cheaper:
/// forming ΔW (`c_out·k·p` multiplies) or through the Gram matrices
/// (`p²·(c_out + k)`).
fn factors_norm(u: &[f32], v: &[f32], k: usize, p: usize, c_out: usize) -> f64 {
    // No positions (a ragged record whose positions were all left out).
    if p == 0 {
        return 0.0;
    }
    if c_out * k <= p * (c_out + k) {
        factors_norm_direct(u, v, k, p, c_out)
    } else {
        factors_norm_gram(u, v, k, p, c_out)
    }
}

/// Forms each entry of ΔW = V Uᵀ and sums the squares.
fn factors_norm_direct(u: &[f32], v: &[f32], k: usize, p: usize, c_out: usize) -> f64 {
    let mut total = 0.0;
    for vo in v.chunks_exact(p).take(c_out) {
        for ur in u.chunks_exact(p).take(k) {
            let w: f64 = vo
                .iter()
                .zip(ur)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            total += w * w;
        }
    }
    total.sqrt()
}

/// ‖V Uᵀ‖² = tr(U VᵀV Uᵀ) = Σ_{ij} (VᵀV)_{ij} (UᵀU)_{ij}.
fn factors_norm_gram(u: &[f32], v: &[f32], k: usize, p: usize, c_out: usize) -> f64 {
    let gram_of = |m: &[f32], rows: usize| {
        let mut g = vec![0.0f64; p * p];
        for row in m.chunks_exact(p).take(rows) {
            for (i, &ri) in row.iter().enumerate() {
                let ri = f64::from(ri);
                if ri == 0.0 {
                    continue;
                }
                for (gij, &rj) in g[i * p..(i + 1) * p].iter_mut().zip(row) {
                    *gij += ri * f64::from(rj);
                }
            }
        }
        g
    };
    let gu = gram_of(u, k);
    let gv = gram_of(v, c_out);
    gu.iter()
        .zip(&gv)
        .map(|(a, b)| a * b)
        .sum::<f64>()
        .max(0.0)
        .sqrt()
}

impl ProbeBatch<'_> {
    /// Checks the rows for traced layer `layer` — every slice's length for
    /// the layer's probe `shape` (fixed lengths, or each row's positions of
    /// a ragged layer), labels and predictions below `n_classes` (unchecked
    /// when 0) — and copies them.
    pub(crate) fn checked_rows(
        &self,
        layer: &str,
        shape: Lens,
        n_classes: usize,
    ) -> crate::Result<ProbeRows> {
        let ctx = || format!("probes for layer {layer:?}");
        let n = self.probe_ids.len();
        check_len(ctx, "instance_ids", n, self.instance_ids.len())?;
        check_len(ctx, "labels", n, self.labels.len())?;
        check_len(ctx, "predicted", n, self.predicted.len())?;
        let (a_rows, p_rows) = match shape {
            Lens::Fixed(a_len, p_len) => {
                if self.positions.is_some() {
                    return Err(fixed_positions(ctx()));
                }
                check_len(
                    || format!("{} ({n} rows of {a_len} values)", ctx()),
                    "a",
                    n * a_len,
                    self.a.len(),
                )?;
                check_len(
                    || format!("{} ({n} rows of {p_len} values)", ctx()),
                    "p",
                    n * p_len,
                    self.p.len(),
                )?;
                (RowLens::Fixed(a_len), RowLens::Fixed(p_len))
            }
            Lens::PerPosition(a, p) => per_position_rows(
                ctx,
                self.positions,
                n,
                ("a", "p"),
                (a, p),
                (self.a.len(), self.p.len()),
                1,
            )?,
        };
        if n_classes > 0 {
            for (what, values) in [("labels", self.labels), ("predicted", self.predicted)] {
                if let Some(bad) = values.iter().find(|&&l| l < 0 || l as usize >= n_classes) {
                    return Err(crate::Error::Invalid {
                        context: ctx(),
                        message: format!(
                            "{what} value {bad} is out of range for {n_classes} classes"
                        ),
                    });
                }
            }
        }
        Ok(ProbeRows {
            probe_ids: self.probe_ids.to_vec(),
            instance_ids: self.instance_ids.to_vec(),
            labels: self.labels.to_vec(),
            predicted: self.predicted.to_vec(),
            a: self.a.to_vec(),
            p: self.p.to_vec(),
            a_rows,
            p_rows,
        })
    }
}

/// The error for `positions` given to a layer whose rows have fixed lengths.
pub(crate) fn fixed_positions(context: String) -> crate::Error {
    crate::Error::Invalid {
        context,
        message: "positions given, but the layer's rows have fixed lengths (it is not ragged, \
                  or its records hold the whole update); leave positions out"
            .to_owned(),
    }
}

/// Checks that `got == expected` for argument `what`.
pub(crate) fn check_len(
    context: impl FnOnce() -> String,
    what: &'static str,
    expected: usize,
    got: usize,
) -> crate::Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(crate::Error::Length {
            context: context(),
            what,
            expected,
            got,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn random(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        use rand::Rng;
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn close(got: f32, want: f64) {
        assert!(
            (f64::from(got) - want).abs() <= 1e-6 * want.max(1.0),
            "{got} vs {want}"
        );
    }

    /// A half-precision record's norm is the norm of its widened values,
    /// bit for bit, for every kind (records longer than one widening block).
    #[test]
    fn half_records_norms_are_those_of_their_widened_values() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(16);
        let mut half = |n: usize| -> (Vec<half::f16>, Vec<f32>) {
            let h: Vec<half::f16> = random(&mut rng, n)
                .into_iter()
                .map(|x| half::f16::from_f32(x * 300.0))
                .collect();
            let w = h.iter().map(|x| x.to_f32()).collect();
            (h, w)
        };
        let kinds = [
            (NormKind::Outer, 1300, 700),
            (NormKind::Full { weight_len: 1100 }, 0, 1200),
            (
                NormKind::Factors {
                    k: 6,
                    p: 4,
                    c_out: 4,
                    groups: 2,
                },
                24,
                16,
            ),
            (NormKind::Positions { n_in: 3, n_out: 4 }, 15, 20),
        ];
        for (kind, nu, nv) in kinds {
            let ((uh, uw), (vh, vw)) = (half(nu), half(nv));
            let (got, want) = (update_norm_f16(kind, &uh, &vh), update_norm(kind, &uw, &vw));
            assert_eq!(got.to_bits(), want.to_bits(), "{kind:?}: {got} vs {want}");
            assert!(want > 0.0, "{kind:?}");
        }
    }

    #[test]
    fn format_8_layout_norms_match_the_formed_update() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        // Linear at t positions: ΔW[o][i] = Σ_t v[t][o]·u[t][i].
        let (t, n_in, n_out) = (5, 3, 4);
        let (u, v) = (random(&mut rng, t * n_in), random(&mut rng, t * n_out));
        let mut sq = 0.0;
        for o in 0..n_out {
            for i in 0..n_in {
                let mut w = 0.0;
                for q in 0..t {
                    w += f64::from(v[q * n_out + o]) * f64::from(u[q * n_in + i]);
                }
                sq += w * w;
            }
        }
        close(
            update_norm(NormKind::Positions { n_in, n_out }, &u, &v),
            sq.sqrt(),
        );
        // Grouped conv: row o of ΔW uses its group's rows of u.
        let (k, p, c_out, groups) = (6, 4, 4, 2);
        let (kg, cg) = (k / groups, c_out / groups);
        let (u, v) = (random(&mut rng, k * p), random(&mut rng, c_out * p));
        let mut sq = 0.0;
        for o in 0..c_out {
            let g = o / cg;
            for r in 0..kg {
                let mut w = 0.0;
                for q in 0..p {
                    w += f64::from(v[o * p + q]) * f64::from(u[(g * kg + r) * p + q]);
                }
                sq += w * w;
            }
        }
        let kind = NormKind::Factors {
            k,
            p,
            c_out,
            groups,
        };
        close(update_norm(kind, &u, &v), sq.sqrt());
        // Embedding: rows of v summed by token id (2 digits; ids repeat).
        let ids = [3u64, 2049, 3, 0, 2049, 7];
        let dim = 3;
        let u: Vec<f32> = ids
            .iter()
            .flat_map(|&id| [(id / 2048) as f32, (id % 2048) as f32])
            .collect();
        let v = random(&mut rng, ids.len() * dim);
        let mut table = vec![0.0f64; 4096 * dim];
        for (q, &id) in ids.iter().enumerate() {
            for j in 0..dim {
                table[id as usize * dim + j] += f64::from(v[q * dim + j]);
            }
        }
        let want = table.iter().map(|x| x * x).sum::<f64>().sqrt();
        close(
            update_norm(
                NormKind::Embedding {
                    digits: 2,
                    dim,
                    num: 5000,
                },
                &u,
                &v,
            ),
            want,
        );
        assert!(
            update_norm(
                NormKind::Embedding {
                    digits: 2,
                    dim,
                    num: 5000
                },
                &[0.5, 1.0],
                &v[..dim]
            )
            .is_nan()
        );
    }

    /// ΔW = V Uᵀ formed explicitly, norm in f64.
    fn brute(u: &[f32], v: &[f32], k: usize, p: usize, c_out: usize) -> f64 {
        let mut s = 0.0;
        for o in 0..c_out {
            for r in 0..k {
                let w: f64 = (0..p)
                    .map(|q| f64::from(v[o * p + q]) * f64::from(u[r * p + q]))
                    .sum();
                s += w * w;
            }
        }
        s.sqrt()
    }

    #[test]
    fn factor_norm_both_ways_match_brute_force() {
        for (k, p, c_out) in [(3, 2, 4), (2, 9, 3), (9, 16, 2), (4, 1, 1)] {
            let u: Vec<f32> = (0..k * p).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
            let v: Vec<f32> = (0..c_out * p)
                .map(|i| ((i * 5 % 13) as f32) * 0.1 - 0.6)
                .collect();
            let want = brute(&u, &v, k, p, c_out);
            for got in [
                factors_norm_direct(&u, &v, k, p, c_out),
                factors_norm_gram(&u, &v, k, p, c_out),
                f64::from(update_norm(
                    NormKind::Factors {
                        k,
                        p,
                        c_out,
                        groups: 1,
                    },
                    &u,
                    &v,
                )),
            ] {
                assert!(
                    (got - want).abs() <= 1e-6 * want.max(1.0),
                    "{k} {p} {c_out}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn outer_and_full_norms() {
        let u = [3.0f32, 4.0];
        let v = [1.0f32, 2.0, 2.0];
        assert!((update_norm(NormKind::Outer, &u, &v) - 15.0).abs() < 1e-6);
        // Full: weight part [3,4], bias [100] excluded.
        let v = [3.0f32, 4.0, 100.0];
        assert!((update_norm(NormKind::Full { weight_len: 2 }, &[], &v) - 5.0).abs() < 1e-6);
    }
}
