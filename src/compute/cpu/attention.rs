//! Causal grouped-query attention over one sequence, HF `eager_attention_forward`
//! (models/llama/modeling_llama.py) with the causal mask of `masking_utils.py`:
//! ```text
//! scores = q @ k.T * scale                   (k, v repeated over n_heads / n_kv_heads; scale = head_dim ** -0.5
//!                                              unless the family sets it)
//! scores = tanh(scores / softcap) * softcap    (Gemma2's attn_logit_softcapping, when set)
//! scores = scores + slope_h * (kv_idx - q_idx)  (BLOOM's and MPT's ALiBi, when set: [`alibi_slopes`])
//! scores masked where kv_idx > q_idx, and where kv_idx <= q_idx - sliding_window (Mistral)
//! out = softmax(scores, dim=-1, dtype=float32) @ v
//! ```
//! Per block of query rows and per head this is two small matrix products on the matmul
//! kernel, `S = Q·Kᵀ` over the keys the block can see and `O = P·V`, with the softmax in
//! between. Masked scores get probability 0, which leaves the second product's sums exactly
//! as if they were skipped. Blocks are handed to threads from the last (the most keys) to the
//! first; each block writes whole rows of `out`. Memory: one `rows × seq` score block per
//! thread and a transposed copy of v.

use super::matmul::matmul_bt_strided;
use super::norm::exp_nonpositive;
use super::threads::{num_threads, run_workers};
use std::sync::Mutex;

/// Query rows per task: the packing of k and v is shared by this many rows, while the block's
/// last row sees this many more keys than its first (masked work).
const ROWS_PER_TASK: usize = 96;
/// Below this many multiply-adds one thread does it all.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// Head layout of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Mistral's `sliding_window`: a query sees itself and the `w - 1` keys before it.
    pub sliding_window: Option<usize>,
    /// The score scale (`head_dim^-0.5` for most families: [`Attention::default_scale`]).
    pub scale: f32,
    /// Gemma2's `attn_logit_softcapping`: scaled scores become `tanh(s / c) · c`. Not with `flash_bf16`.
    pub softcap: Option<f32>,
    /// Round the probabilities to bf16 as FlashAttention-2 does on a bf16 model
    /// ([`softmax_visible_flash_bf16`]); false: plain f32 softmax.
    pub flash_bf16: bool,
    /// BLOOM's and MPT's position bias: `slope_h · (j − i)` added to the scaled (and capped)
    /// score of query i and key j in head h ([`alibi_slopes`]). HF adds `slope_h · j` (BLOOM) or
    /// `slope_h · (j − (seq − 1))` (MPT): the same up to a constant per row, to which the softmax
    /// is invariant, and up to f32 rounding. Not with `flash_bf16`: HF runs these models eagerly.
    pub alibi: Option<Alibi>,
}

/// Which family's ALiBi slopes ([`alibi_slopes`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Alibi {
    Bloom,
    /// MPT's `attn_config.alibi_bias_max` (8 in its configs).
    Mpt { bias_max: f32 },
}

/// The ALiBi slope of each of `n_heads` heads, as HF computes it in f32.
///
/// BLOOM (`build_alibi_tensor`, models/bloom/modeling_bloom.py): with `cp = 2^floor(log2 n)`,
/// `base = f32(2^(−2^−(log2 cp − 3)))` and slopes `base^1..=cp` (torch.pow in f32); when
/// `cp != n`, `extra_base` (the same with 2·cp) to the powers 1, 3, 5, … for the
/// `min(cp, n − cp)` remaining heads.
///
/// MPT (`build_mpt_alibi_tensor`, models/mpt/modeling_mpt.py): with `p = 2^ceil(log2 n)`,
/// `base_k = f32(k) · f32(bias_max / p)` for k = 1..=p and slopes `1 / 2^base_k` in f32; when
/// `p != n`, the odd-indexed slopes then the even-indexed ones (0-based), the first n of them.
pub fn alibi_slopes(alibi: Alibi, n_heads: usize) -> Vec<f32> {
    assert!(n_heads > 0, "alibi_slopes: no heads");
    match alibi {
        Alibi::Bloom => {
            // A Python float (f64), then `torch.tensor(..., dtype=torch.float32)`.
            let base = |cp: usize| (2f64).powf(-(2f64).powf(-((cp as f64).log2() - 3.0))) as f32;
            let cp = 1usize << n_heads.ilog2();
            let mut slopes: Vec<f32> = (1..=cp).map(|e| base(cp).powf(e as f32)).collect();
            let extra = base(2 * cp);
            slopes.extend((0..cp.min(n_heads - cp)).map(|i| extra.powf((2 * i + 1) as f32)));
            slopes
        }
        Alibi::Mpt { bias_max } => {
            let p = n_heads.next_power_of_two();
            let step = (f64::from(bias_max) / p as f64) as f32;
            let slopes: Vec<f32> = (1..=p).map(|k| 1.0 / 2f32.powf(k as f32 * step)).collect();
            if p == n_heads {
                return slopes;
            }
            slopes.iter().skip(1).step_by(2).chain(slopes.iter().step_by(2)).copied().take(n_heads).collect()
        }
    }
}

/// The ALiBi bias of key `key` seen from query `query` (`key <= query`): `slope · (key − query)`,
/// the difference an exact integer in f32 (positions below 2^24), times the slope in f32.
fn alibi_bias(slope: f32, key: usize, query: usize) -> f32 {
    slope * -((query - key) as f32)
}

impl Attention {
    /// `head_dim ** -0.5` as HF's `self.scaling` is used on an f32 tensor: computed in f64,
    /// rounded to f32.
    pub fn default_scale(head_dim: usize) -> f32 {
        (head_dim as f64).powf(-0.5) as f32
    }

    /// `q` is `[seq, n_heads * head_dim]`, `k` and `v` are `[seq, n_kv_heads * head_dim]`,
    /// already rotated; writes `out` = `[seq, n_heads * head_dim]`.
    pub fn forward(&self, q: &[f32], k: &[f32], v: &[f32], seq: usize, out: &mut [f32]) {
        let (hd, q_width, kv_width) = (self.head_dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim);
        assert!(self.n_kv_heads > 0 && self.n_heads.is_multiple_of(self.n_kv_heads), "attention: bad head counts");
        assert_eq!(q.len(), seq * q_width, "attention: q is not [seq, n_heads * head_dim]");
        assert_eq!(k.len(), seq * kv_width, "attention: k is not [seq, n_kv_heads * head_dim]");
        assert_eq!(v.len(), seq * kv_width, "attention: v is not [seq, n_kv_heads * head_dim]");
        assert_eq!(out.len(), seq * q_width, "attention: out is not [seq, n_heads * head_dim]");
        assert!(!(self.flash_bf16 && self.alibi.is_some()), "attention: ALiBi with flash_bf16");
        if seq == 0 {
            return;
        }
        // v transposed per kv head, [n_kv_heads, head_dim, seq]: the `w` operand of P·V.
        let mut v_t = vec![0f32; v.len()];
        for (s, row) in v.chunks_exact(kv_width).enumerate() {
            for (g, head) in row.chunks_exact(hd).enumerate() {
                for (d, &value) in head.iter().enumerate() {
                    v_t[(g * hd + d) * seq + s] = value;
                }
            }
        }
        let macs = seq * seq * q_width; // q·k and p·v over the causal half
        let threads = if macs < PARALLEL_MIN_MACS { 1 } else { num_threads() };
        let slopes = self.alibi.map(|alibi| alibi_slopes(alibi, self.n_heads));
        let tasks = Mutex::new(out.chunks_mut(ROWS_PER_TASK * q_width).enumerate().rev());
        run_workers(threads.min(seq.div_ceil(ROWS_PER_TASK)), || {
            let (mut scores, mut pack) = (Vec::new(), Vec::new());
            // The guard is dropped inside `and_then`, so the lock is not held while computing.
            // A poisoned lock means another worker panicked; the scope re-raises that panic.
            while let Some((task, out_rows)) = tasks.lock().ok().and_then(|mut t| t.next()) {
                let block = Block { a: self, slopes: slopes.as_deref(), q, k, v_t: &v_t, seq, t0: task * ROWS_PER_TASK };
                block.run(out_rows, &mut scores, &mut pack);
            }
        });
    }
}

/// The query rows `t0..t0 + out.len() / q_width` of one attention call.
struct Block<'a> {
    a: &'a Attention,
    slopes: Option<&'a [f32]>, // ALiBi's, one per head
    q: &'a [f32],   // [seq, n_heads * hd]
    k: &'a [f32],   // [seq, n_kv_heads * hd]
    v_t: &'a [f32], // [n_kv_heads, hd, seq]
    seq: usize,
    t0: usize,
}

impl Block<'_> {
    /// Every head of the block's rows into `out` (`[rows, n_heads * hd]`).
    fn run(&self, out: &mut [f32], scores: &mut Vec<f32>, pack: &mut Vec<f32>) {
        let a = self.a;
        let hd = a.head_dim;
        let (q_width, kv_width) = (a.n_heads * hd, a.n_kv_heads * hd);
        let group = a.n_heads / a.n_kv_heads; // query heads per kv head (HF `repeat_kv`)
        let scale = a.scale;
        let (t0, rows) = (self.t0, out.len() / q_width);
        // Keys first..=t are visible from row t; the block needs keys lo..end.
        let first = |t: usize| a.sliding_window.map_or(0, |w| (t + 1).saturating_sub(w));
        let (lo, end) = (first(t0), t0 + rows);
        let n_keys = end - lo;
        scores.resize(rows * n_keys, 0.0);
        for h in 0..a.n_heads {
            let g = h / group;
            // S = Q_h · K_gᵀ: [rows, n_keys].
            matmul_bt_strided(
                (&self.q[t0 * q_width + h * hd..], q_width),
                (&self.k[lo * kv_width + g * hd..], kv_width),
                rows,
                hd,
                n_keys,
                (scores, n_keys),
                pack,
            );
            for (r, row) in scores.chunks_exact_mut(n_keys).enumerate() {
                let t = t0 + r;
                if a.flash_bf16 {
                    softmax_visible_flash_bf16(row, lo, first(t) - lo, t - lo, scale);
                } else {
                    softmax_visible(row, first(t) - lo, t - lo, scale, a.softcap, self.slopes.map(|s| s[h]));
                }
            }
            // O_h = P · V_g: [rows, hd], into columns h·hd.. of out.
            matmul_bt_strided(
                (scores, n_keys),
                (&self.v_t[g * hd * self.seq + lo..], self.seq),
                rows,
                n_keys,
                hd,
                (&mut out[h * hd..], q_width),
                pack,
            );
        }
    }
}

/// `row[from..=to] = softmax(row[from..=to] · scale)` in f32 with the maximum subtracted
/// (torch `softmax(dtype=float32)`), the scaled scores soft-capped first when `softcap` is set
/// (HF Gemma2 `eager_attention_forward`: `s / c`, `tanh`, `· c`, three f32 ops), then given
/// ALiBi's [`alibi_bias`] when `alibi_slope` is set (`row[to]` is the query's own key); every
/// other entry becomes 0.
pub(crate) fn softmax_visible(row: &mut [f32], from: usize, to: usize, scale: f32, softcap: Option<f32>, alibi_slope: Option<f32>) {
    let visible = &mut row[from..=to];
    let mut max = f32::NEG_INFINITY;
    for (j, s) in (from..).zip(visible.iter_mut()) {
        *s *= scale;
        if let Some(c) = softcap {
            *s = (*s / c).tanh() * c;
        }
        if let Some(slope) = alibi_slope {
            *s += alibi_bias(slope, j, to);
        }
        max = max.max(*s);
    }
    let mut sum = 0f32;
    for s in visible.iter_mut() {
        *s = exp_softmax(*s - max);
        sum += *s;
    }
    let inv = 1.0 / sum;
    for s in visible.iter_mut() {
        *s *= inv;
    }
    row[..from].fill(0.0);
    row[to + 1..].fill(0.0);
}

/// e^x for the softmax's `x = s - max <= 0`: [`exp_nonpositive`] (relative error below 2e-7),
/// whose fixed sequence of f32 operations the CUDA kernel repeats, so the device's attention
/// gives these bits; NaN stays NaN.
pub(super) fn exp_softmax(x: f32) -> f32 {
    // A select, not a branch, so loops over it vectorize.
    let e = exp_nonpositive(x);
    if x.is_nan() {
        x
    } else {
        e
    }
}

/// Keys per block in FlashAttention-2's forward kernel for the head sizes of LLMs
/// (`Flash_fwd_kernel_traits<hdim, 128, kBlockN = 128 / 64, ...>` in flash_fwd_launch_template.h).
const FLASH_BLOCK_KEYS: usize = 128;

/// The probabilities FlashAttention-2 (PyTorch SDPA's kernel for bf16 on sm80+) multiplies V
/// with: it walks the key blocks from the last to the first keeping a running row maximum m,
/// computes `p = exp2(s·scale·log2e − m·scale·log2e)` in f32, adds p to the row sum, and
/// casts p to bf16 for the P·V product; earlier blocks are rescaled by `exp2((m_old − m)·…)`
/// when the maximum grows. Here each key's weight is `bf16(p) · rescale / sum`, which is the
/// same arithmetic up to f32 rounding, so the bf16 activations ModelOpt calibrates on are
/// reproduced far more often than with an exact softmax. `row[0]` is key `key0`: the blocks
/// are aligned to multiples of 128 in absolute key positions, as FlashAttention-2's (with a
/// sliding window too). cuda/forward.cu's attention_flash_bf16_kernel is the device twin.
fn softmax_visible_flash_bf16(row: &mut [f32], key0: usize, from: usize, to: usize, scale: f32) {
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let mut blocks: Vec<(usize, usize, f32)> = Vec::new(); // (start, end, running max after it)
    let mut m = f32::NEG_INFINITY;
    let mut end = to + 1;
    while end > from {
        let start = ((key0 + end - 1) / FLASH_BLOCK_KEYS * FLASH_BLOCK_KEYS).max(key0 + from) - key0;
        m = row[start..end].iter().copied().fold(m, f32::max);
        blocks.push((start, end, m));
        end = start;
    }
    let mut sum = 0f32;
    for &(start, end, mb) in &blocks {
        let rescale = ((mb - m) * scale_log2).exp2();
        let max_scaled = mb * scale_log2;
        for s in &mut row[start..end] {
            let p = s.mul_add(scale_log2, -max_scaled).exp2();
            sum += p * rescale;
            *s = crate::numerics::round_bf16(p) * rescale;
        }
    }
    let inv = 1.0 / sum;
    row[from..=to].iter_mut().for_each(|s| *s *= inv);
    row[..from].fill(0.0);
    row[to + 1..].fill(0.0);
}
