//! AWQ as ModelOpt's `mc.awq` runs it: awq_lite's per-linear scale search
//! (spec/algorithms.md §6.1), awq_clip's per-block clip search (§6.2), and the export-time
//! helpers that fuse the scales of linears sharing an input (§7, spec/export-formats.md §2.7).
//!
//! The weight format is a parameter, so the same search serves INT4 (block 128), W4A8 (its
//! INT4 stage, which is all ModelOpt uses during AWQ, §4.5) and NVFP4: the caller passes a
//! fake-quantizer that rounds its output to the model dtype, as ModelOpt's kernels do (§1).
//!
//! awq_lite's search runs on the layer's device through `Tensor` (the 11 candidate weights,
//! their products and the per-row errors; cuda/awq.cu repeats the CPU's summation order), the
//! clip search on the host; every product is deterministic and independent of the thread
//! count, so the searches are too.

use crate::compute::cpu::{matmul_bt, sq_err_row};
use crate::compute::{Compute, Tensor};
use crate::quant::fp8::round_to_dtype;
use crate::quant::scales::{one_minus, torch_pow, SCALE_MAX, SCALE_MIN};
use crate::io::safetensors::Dtype;

/// awq_lite's alpha grid, `torch.arange(0, 1 + 0.1, 0.1)` in f32 (§6.1): 11 values. PyTorch's
/// CPU arange computes `0.1 * i` in f64 and casts; each value is the f32 nearest `i/10`.
pub const ALPHAS: [f32; 11] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// awq_clip's ratio grid (§6.2): `round(k, 2)` for `k` in `torch.arange(0.5, 1.0, 0.05)`, then
/// 1.0. The amax they multiply is a model-dtype tensor, so the Python float reaches the
/// kernel as an f32: these are those f32 values.
pub const CLIP_RATIOS: [f32; 11] = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0];

/// awq_clip keeps every `max(1, N / 64)`-th token of a batch (`max_tokens_per_batch`).
const CLIP_TOKENS: usize = 64;
/// awq_clip handles the output rows in chunks of this many (`max_co_batch_size`); here it
/// only bounds memory, the losses do not depend on it.
const CLIP_ROWS: usize = 1024;

/// `torch.finfo(dtype).tiny`: the smallest normal number of the model dtype (2^-14 for f16,
/// 2^-126 for bf16 and f32).
fn finfo_tiny(dtype: Dtype) -> f32 {
    match dtype {
        Dtype::F16 => 6.103_515_6e-5,
        _ => f32::MIN_POSITIVE,
    }
}

/// The column range of block `b` of width `block` in a row of `inp` values (the last block is
/// shorter when `inp` is not a multiple: ModelOpt zero-pads it, which changes no max and no sum).
fn block_cols(b: usize, block: usize, inp: usize) -> (usize, usize) {
    (b * block, ((b + 1) * block).min(inp))
}

/// `w̄`, ModelOpt's `get_weight_scale` (§6.1): `|W|` divided by the max of its block of
/// `block` inputs (or of its whole output row when `block` is None), averaged over the output
/// rows. Quirks reproduced: the divisor is `amax + finfo(dtype).tiny` computed in the model
/// dtype (for f16 that tiny is 2^-14, large enough to matter for small weights), the quotient
/// and the mean are model-dtype tensors (rounded to `dtype`), then cast to f32.
///
/// Panics if `w.len() != out * inp` (a caller bug).
pub fn weight_mean(w: &[f32], out: usize, inp: usize, block: Option<usize>, dtype: Dtype) -> Vec<f32> {
    assert_eq!(w.len(), out * inp, "weight_mean: weight is not [{out}, {inp}]");
    if inp == 0 {
        return Vec::new();
    }
    let group = block.unwrap_or(inp).clamp(1, inp);
    let tiny = finfo_tiny(dtype);
    let mut sum = vec![0f64; inp];
    for row in w.chunks_exact(inp) {
        for b in 0..inp.div_ceil(group) {
            let (lo, hi) = block_cols(b, group, inp);
            let amax = row[lo..hi].iter().fold(0f32, |m, &v| m.max(v.abs()));
            let den = round_to_dtype(amax + tiny, dtype);
            for (s, &v) in sum[lo..hi].iter_mut().zip(&row[lo..hi]) {
                *s += round_to_dtype(v.abs() / den, dtype) as f64;
            }
        }
    }
    sum.iter().map(|&s| round_to_dtype((s / out as f64) as f32, dtype)).collect()
}

/// `x̄`, the mean |activation| per input channel as awq_lite's cache pass accumulates it
/// (§6.1 pass 1, `get_act_scale`): per batch, the mean over its tokens of `|x_j|` (a
/// model-dtype tensor: rounded to the dtype), summed in f32 over batches; the result is that
/// sum divided by the number of batches. One `observe` call is one batch.
#[derive(Clone, Debug)]
pub struct ActMean {
    sum: Vec<f32>,
    batches: usize,
    dtype: Dtype,
}

impl ActMean {
    pub fn new(inp: usize, dtype: Dtype) -> ActMean {
        ActMean { sum: vec![0.0; inp], batches: 0, dtype }
    }

    /// One batch, `[tokens, inp]` row-major, on any device. An empty batch is skipped, as
    /// ModelOpt skips `input.numel() == 0` (MoE experts that got no token).
    ///
    /// Panics if `x.len()` is not a multiple of `inp` (a caller bug).
    pub fn observe(&mut self, x: &Tensor) {
        let inp = self.sum.len();
        if x.is_empty() || inp == 0 {
            return;
        }
        assert!(x.len().is_multiple_of(inp), "ActMean: {} values are not [tokens, {inp}]", x.len());
        for (s, m) in self.sum.iter_mut().zip(x.col_abs_mean(inp)) {
            *s += round_to_dtype(m, self.dtype);
        }
        self.batches += 1;
    }

    /// `x̄`; None when no batch was seen or a channel is NaN: ModelOpt then skips the search
    /// for this linear and max-calibrates it with an all-ones pre_quant_scale (§6.1 end).
    pub fn finish(&self) -> Option<Vec<f32>> {
        if self.batches == 0 {
            return None;
        }
        let n = self.batches as f32;
        let v: Vec<f32> = self.sum.iter().map(|&s| s / n).collect();
        (!v.iter().any(|x| x.is_nan())).then_some(v)
    }
}

/// The AWQ scale for one alpha, ModelOpt's `get_scale` (§6.1), all in f32:
/// `s_j = clamp(x̄_j^α / (w̄_j^(1−α) + finfo(f32).tiny), 1e-4, 1e4)`, then
/// `s / sqrt(max(s) · min(s))`. PyTorch's `pow` special cases apply (`x^0 = 1` even for 0).
///
/// Panics if the two vectors differ in length (a caller bug).
pub fn awq_scale(xbar: &[f32], wbar: &[f32], alpha: f32) -> Vec<f32> {
    assert_eq!(xbar.len(), wbar.len(), "awq_scale: {} activation means, {} weight means", xbar.len(), wbar.len());
    let wexp = one_minus(alpha);
    let s: Vec<f32> = xbar
        .iter()
        .zip(wbar)
        .map(|(&x, &w)| (torch_pow(x, alpha) / (torch_pow(w, wexp) + f32::MIN_POSITIVE)).clamp(SCALE_MIN, SCALE_MAX))
        .collect();
    let (max, min) = s.iter().fold((f32::NEG_INFINITY, f32::INFINITY), |(a, b), &v| (a.max(v), b.min(v)));
    let norm = (max * min).sqrt();
    s.iter().map(|&v| v / norm).collect()
}

/// Rounds every value of `t` to `dtype` (bf16 and f32 on the tensor's device, f16 on the host).
pub fn round_tensor(t: &mut Tensor, dtype: Dtype) {
    match dtype {
        Dtype::BF16 => t.round(Compute::Bf16),
        Dtype::F16 => t.map_host(|x| x.iter_mut().for_each(|v| *v = round_to_dtype(*v, dtype))),
        _ => {}
    }
}

/// Per row of `y` and `reference` (`[rows, cols]`), the f64 sum of the squared differences,
/// each rounded to `dtype` ([`crate::compute::cpu::sq_err_row`]).
fn sq_err_rows(y: &Tensor, reference: &Tensor, cols: usize, dtype: Dtype) -> Vec<f64> {
    match dtype {
        Dtype::BF16 => y.sq_err_rows(reference, None, cols, Compute::Bf16),
        Dtype::F16 => {
            let (y, r) = (y.to_host(), reference.to_host());
            let round = |d: f32| round_to_dtype(d, dtype);
            y.chunks_exact(cols).zip(r.chunks_exact(cols)).map(|(y, r)| sq_err_row(y, r, None, round)).collect()
        }
        _ => y.sq_err_rows(reference, None, cols, Compute::F32),
    }
}

/// One alpha of the search: its scale and what the search forward uses.
#[derive(Clone, Debug)]
struct Candidate {
    /// `get_scale(x̄, w̄, α)`, f32.
    s: Vec<f32>,
    /// The input pre_quant_scale `1/s`, in the model dtype.
    inv_s: Vec<f32>,
    /// `Q(W ⊙ s)` with `s` in the model dtype and the product rounded to it, on the device
    /// the search runs on.
    wq: Tensor,
}

/// awq_lite's search for one linear (§6.1 pass 2): for each alpha of `ALPHAS`, the sum over
/// batches of the MSE between the exact output and `linear(x ⊙ 1/s, Q(W ⊙ s))`.
///
/// As in ModelOpt's search forward: the weight pre_quant_scale `s` and the input
/// pre_quant_scale `1/s` are each cast to the model dtype; `W ⊙ s` and `x ⊙ 1/s` are
/// model-dtype products (rounded); the weight quantizer recomputes its amax from `W ⊙ s`;
/// input quantization stays off; the output is a model-dtype tensor (rounded, bias added
/// before the rounding), and so is its difference to the exact output, which is then squared
/// and averaged in f32. The 11 quantized weights are precomputed (11 copies of the weight).
#[derive(Clone, Debug)]
pub struct LiteSearch {
    out: usize,
    inp: usize,
    dtype: Dtype,
    bias: Option<Tensor>,
    candidates: Vec<Candidate>,
    losses: [f32; 11],
    batches: usize,
}

impl LiteSearch {
    /// `w`: the original `[out, inp]` weight, where the candidates live and the search runs (the
    /// layer inputs' device); `xbar`: `ActMean::finish`; `wbar`: `weight_mean` of `w`;
    /// `fake_quant`: fake-quantizes a whole `[out, inp]` weight in place, amax recomputed from
    /// what it is given, result in the model dtype.
    ///
    /// Panics if a length does not match `out`/`inp` (a caller bug).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &Tensor,
        out: usize,
        inp: usize,
        xbar: &[f32],
        wbar: &[f32],
        dtype: Dtype,
        fake_quant: &dyn Fn(&mut Tensor),
    ) -> LiteSearch {
        assert_eq!(w.len(), out * inp, "LiteSearch: weight is not [{out}, {inp}]");
        assert_eq!(xbar.len(), inp, "LiteSearch: {} activation means for {inp} inputs", xbar.len());
        let candidates = ALPHAS
            .iter()
            .map(|&alpha| {
                let s = awq_scale(xbar, wbar, alpha);
                let s_w: Vec<f32> = s.iter().map(|&v| round_to_dtype(v, dtype)).collect();
                let inv_s = s.iter().map(|&v| round_to_dtype(1.0 / v, dtype)).collect();
                let mut wq = w.clone();
                if inp > 0 {
                    wq.scale_columns(&s_w);
                }
                round_tensor(&mut wq, dtype);
                fake_quant(&mut wq);
                Candidate { s, inv_s, wq }
            })
            .collect();
        LiteSearch { out, inp, dtype, bias: None, candidates, losses: [0.0; 11], batches: 0 }
    }

    /// The linear's bias (`[out]`): added to the search outputs before their rounding to the
    /// model dtype, as `F.linear` does; `out_ref` must then include it too.
    ///
    /// Panics if `bias.len() != out` (a caller bug).
    pub fn with_bias(mut self, bias: &[f32]) -> LiteSearch {
        assert_eq!(bias.len(), self.out, "LiteSearch: bias of {} for {} outputs", bias.len(), self.out);
        let device = self.candidates[0].wq.device();
        self.bias = Some(Tensor::on(bias.to_vec(), device));
        self
    }

    /// One batch: `x` `[tokens, inp]`, the layer input; `out_ref` `[tokens, out]`, the exact
    /// output (as the model computes it: model dtype, bias included), both on the search's
    /// device. Adds one MSE per alpha: per candidate, the input scaled by `1/s` (model dtype),
    /// its product with the candidate weight, bias, rounding, and the per-row squared errors
    /// ([`crate::compute::cpu::sq_err_row`]) summed over the rows in f64. An empty batch is
    /// skipped, as in ModelOpt.
    ///
    /// Panics if the lengths do not match the shapes (a caller bug).
    pub fn observe(&mut self, x: &Tensor, out_ref: &Tensor) {
        let (inp, out, dtype) = (self.inp, self.out, self.dtype);
        if x.is_empty() || inp == 0 || out == 0 {
            return;
        }
        assert!(x.len().is_multiple_of(inp), "LiteSearch: {} values are not [tokens, {inp}]", x.len());
        let tokens = x.len() / inp;
        assert_eq!(out_ref.len(), tokens * out, "LiteSearch: reference output is not [{tokens}, {out}]");
        for (c, loss) in self.candidates.iter().zip(self.losses.iter_mut()) {
            let mut xs = x.clone();
            xs.scale_columns(&c.inv_s);
            round_tensor(&mut xs, dtype);
            let mut y = xs.matmul_bt(&c.wq, tokens, inp, out);
            if let Some(b) = &self.bias {
                y.add_row_bias(b);
            }
            round_tensor(&mut y, dtype);
            let rows = sq_err_rows(&y, out_ref, out, dtype);
            *loss += (rows.iter().sum::<f64>() / (tokens * out) as f64) as f32;
        }
        self.batches += 1;
    }

    /// The accumulated loss per alpha of `ALPHAS`.
    pub fn losses(&self) -> &[f32; 11] {
        &self.losses
    }

    /// `(α*, s*)`: the alpha of the smallest loss (Python's `min`: the first one on ties; a
    /// NaN loss is never smaller) and its scale `get_scale(x̄, w̄, α*)`. Apply it as ModelOpt
    /// does (§6.1 "Finalize"): pre_quant_scale `p = 1/s*` in f32, then
    /// `smoothquant::smooth_weight(w, inp, &p, dtype)` and, if the input is quantized,
    /// `smoothquant::smoothed_input_amax`. None when no batch was searched: ModelOpt then
    /// max-calibrates the linear with an all-ones pre_quant_scale.
    pub fn best(&self) -> Option<(f32, Vec<f32>)> {
        if self.batches == 0 {
            return None;
        }
        let mut best = 0;
        for (i, &l) in self.losses.iter().enumerate() {
            if l < self.losses[best] {
                best = i;
            }
        }
        Some((ALPHAS[best], self.candidates[best].s.clone()))
    }
}

/// awq_clip's search for one block-quantized linear (§6.2, INT4 / W4A8 weights): per
/// (output row, block), the sum over batches of the mean over the sampled tokens of
/// `(Σ_k x·Q_r(W) − Σ_k x·W)²` over the block's inputs, for each ratio `r` of `CLIP_RATIOS`,
/// `Q_r` quantizing with the block amax lowered to `r·amax0`.
///
/// Model-dtype roundings as in ModelOpt: the clipped amax `amax0·r`, the block sums and their
/// difference are model-dtype tensors. One deviation: ModelOpt also rounds each product
/// `x_k·w_k` to the model dtype before summing (`(inputs * w).sum(-1)`); here the block sums
/// are `matmul_bt` products in f32 (for an f32 model the two agree).
#[derive(Clone, Debug)]
pub struct ClipSearch {
    w: Vec<f32>,
    out: usize,
    inp: usize,
    block: usize,
    dtype: Dtype,
    /// Per-block max |W| of the smoothed weight, `[out, ceil(inp / block)]`.
    amax0: Vec<f32>,
    /// Per ratio, the loss per (row, block), laid out as `amax0`.
    losses: Vec<Vec<f32>>,
    tokens: usize,
}

impl ClipSearch {
    /// `w_smoothed`: the `[out, inp]` weight after awq_lite (or the original one for awq_clip
    /// alone); `block`: the quantization block size along the input.
    ///
    /// Panics if `w_smoothed.len() != out * inp` or `block == 0` (a caller bug).
    pub fn new(w_smoothed: &[f32], out: usize, inp: usize, block: usize, dtype: Dtype) -> ClipSearch {
        assert_eq!(w_smoothed.len(), out * inp, "ClipSearch: weight is not [{out}, {inp}]");
        assert!(block > 0, "ClipSearch: block size 0");
        let nb = inp.div_ceil(block);
        let mut amax0 = Vec::with_capacity(out * nb);
        for row in w_smoothed.chunks_exact(inp.max(1)) {
            for b in 0..nb {
                let (lo, hi) = block_cols(b, block, inp);
                amax0.push(row[lo..hi].iter().fold(0f32, |m, &v| m.max(v.abs())));
            }
        }
        let losses = vec![vec![0f32; out * nb]; CLIP_RATIOS.len()];
        ClipSearch { w: w_smoothed.to_vec(), out, inp, block, dtype, amax0, losses, tokens: 0 }
    }

    /// One batch: `x` `[tokens, inp]`, the inputs already multiplied by the pre_quant_scale.
    /// Keeps tokens 0, k, 2k, … with `k = max(1, tokens / 64)`. `fake_quant(rows, amax)`
    /// fake-quantizes `[rows, inp]` weight rows in place with the given per-block amax
    /// (`[rows, ceil(inp / block)]`), result in the model dtype.
    ///
    /// Panics if `x.len()` is not a multiple of `inp` (a caller bug).
    pub fn observe(&mut self, x: &[f32], fake_quant: &dyn Fn(&mut [f32], &[f32])) {
        let (inp, out, block, dtype) = (self.inp, self.out, self.block, self.dtype);
        if x.is_empty() || inp == 0 || out == 0 {
            return;
        }
        assert!(x.len().is_multiple_of(inp), "ClipSearch: {} values are not [tokens, {inp}]", x.len());
        let n = x.len() / inp;
        let stride = (n / CLIP_TOKENS).max(1);
        let sel: Vec<&[f32]> = x.chunks_exact(inp).step_by(stride).collect();
        let t = sel.len();
        let nb = inp.div_ceil(block);
        // The sampled tokens, block-major: xb[b] is [t, width of block b].
        let xb: Vec<Vec<f32>> = (0..nb)
            .map(|b| {
                let (lo, hi) = block_cols(b, block, inp);
                sel.iter().flat_map(|r| r[lo..hi].iter().copied()).collect()
            })
            .collect();
        let gather = |rows: &[f32], b: usize, dst: &mut Vec<f32>| {
            let (lo, hi) = block_cols(b, block, inp);
            dst.clear();
            dst.extend(rows.chunks_exact(inp).flat_map(|r| r[lo..hi].iter().copied()));
        };
        let mut refs: Vec<Vec<f32>> = vec![Vec::new(); nb];
        let (mut wb, mut cur, mut acc) = (Vec::new(), Vec::new(), Vec::new());
        for r0 in (0..out).step_by(CLIP_ROWS) {
            let r1 = (r0 + CLIP_ROWS).min(out);
            let rc = r1 - r0;
            let chunk = &self.w[r0 * inp..r1 * inp];
            for (b, rf) in refs.iter_mut().enumerate() {
                let (lo, hi) = block_cols(b, block, inp);
                gather(chunk, b, &mut wb);
                rf.resize(t * rc, 0.0);
                matmul_bt(&xb[b], &wb, t, hi - lo, rc, rf);
                rf.iter_mut().for_each(|v| *v = round_to_dtype(*v, dtype));
            }
            let amax0 = &self.amax0[r0 * nb..r1 * nb];
            for (&ratio, losses) in CLIP_RATIOS.iter().zip(self.losses.iter_mut()) {
                let amax: Vec<f32> = amax0.iter().map(|&a| round_to_dtype(a * ratio, dtype)).collect();
                let mut q = chunk.to_vec();
                fake_quant(&mut q, &amax);
                for (b, rf) in refs.iter().enumerate() {
                    let (lo, hi) = block_cols(b, block, inp);
                    gather(&q, b, &mut wb);
                    cur.resize(t * rc, 0.0);
                    matmul_bt(&xb[b], &wb, t, hi - lo, rc, &mut cur);
                    acc.clear();
                    acc.resize(rc, 0f64);
                    for (cr, rr) in cur.chunks_exact(rc).zip(rf.chunks_exact(rc)) {
                        for ((a, &c), &r) in acc.iter_mut().zip(cr).zip(rr) {
                            let d = round_to_dtype(round_to_dtype(c, dtype) - r, dtype) as f64;
                            *a += d * d;
                        }
                    }
                    for (o, &a) in acc.iter().enumerate() {
                        losses[(r0 + o) * nb + b] += (a / t as f64) as f32;
                    }
                }
            }
        }
        self.tokens += t;
    }

    /// Per ratio of `CLIP_RATIOS`, the accumulated loss per (row, block), `[out, nblocks]`.
    pub fn losses(&self) -> &[Vec<f32>] {
        &self.losses
    }

    /// The clipped amax per (row, block), `[out, ceil(inp / block)]`: `amax0·r*` (model dtype)
    /// for the ratio of the smallest loss, ModelOpt's scan from 0.5 up with a strict `<`
    /// against a running best that starts at +inf (the smallest ratio wins ties; a block
    /// whose losses are all NaN or inf gets 0, as in ModelOpt). Before any token was seen
    /// this is `amax0`, plain max calibration (ModelOpt skips such a linear).
    pub fn best_amax(&self) -> Vec<f32> {
        if self.tokens == 0 {
            return self.amax0.clone();
        }
        (0..self.amax0.len())
            .map(|i| {
                let mut best = (f32::INFINITY, 0.0f32);
                for (&ratio, losses) in CLIP_RATIOS.iter().zip(&self.losses) {
                    if losses[i] < best.0 {
                        best = (losses[i], round_to_dtype(self.amax0[i] * ratio, self.dtype));
                    }
                }
                best.1
            })
            .collect()
    }
}

/// Folds a group's shared scale into the norm that produces its input, AWQ formats only
/// (§7 step 3, export-formats §2.7 step 2, `qu.fuse_prequant_layernorm`): `norm ← norm · s`,
/// a model-dtype product. For a LayerNorm with a bias, fold the bias with the same call.
/// Afterwards the group exports no pre_quant_scale.
///
/// Panics if the lengths differ (a caller bug).
pub fn fold_into_norm(norm_weight: &mut [f32], s: &[f32], dtype: Dtype) {
    assert_eq!(norm_weight.len(), s.len(), "fold_into_norm: norm of {}, scale of {}", norm_weight.len(), s.len());
    for (w, &k) in norm_weight.iter_mut().zip(s) {
        *w = round_to_dtype(*w * k, dtype);
    }
}

/// `fold_into_norm` for norms that scale by `1 + weight` (GemmaRMSNorm, LayerNorm1P,
/// zero-centred gamma; export-formats §2.7 step 2): `norm ← (norm + 1) · s − 1`. Unverified
/// against a ModelOpt export: each of the three steps is taken as a model-dtype tensor op
/// (rounded), like the plain fold.
///
/// Panics if the lengths differ (a caller bug).
pub fn fold_into_norm_plus_one(norm_weight: &mut [f32], s: &[f32], dtype: Dtype) {
    assert_eq!(
        norm_weight.len(),
        s.len(),
        "fold_into_norm_plus_one: norm of {}, scale of {}",
        norm_weight.len(),
        s.len()
    );
    for (w, &k) in norm_weight.iter_mut().zip(s) {
        let one_plus = round_to_dtype(*w + 1.0, dtype);
        *w = round_to_dtype(round_to_dtype(one_plus * k, dtype) - 1.0, dtype);
    }
}
