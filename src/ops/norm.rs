//! Element-wise and row-wise kernels of the decoder: RMSNorm, SiLU-gated MLP, residual add,
//! and the per-position log-likelihood of the language-model head.

use crate::numerics::round_bf16;

/// RMSNorm over rows of `weight.len()` values, HF `LlamaRMSNorm.forward`
/// (models/llama/modeling_llama.py):
/// ```text
/// variance = x.float().pow(2).mean(-1, keepdim=True)
/// x = x * torch.rsqrt(variance + eps)
/// return weight * x
/// ```
/// The mean of squares is accumulated in f64 (torch sums pairwise in f32, which is as close
/// to the exact sum as f64 accumulation is at these lengths); the rest is f32 like torch.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let cols = weight.len();
    assert!(cols > 0 && x.len().is_multiple_of(cols), "rms_norm: {} values are not rows of {cols}", x.len());
    assert_eq!(x.len(), out.len(), "rms_norm: input and output lengths differ");
    for (row, out_row) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let sum_sq: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let variance = (sum_sq / cols as f64) as f32;
        let inv_rms = 1.0 / (variance + eps).sqrt();
        for ((o, &v), &g) in out_row.iter_mut().zip(row).zip(weight) {
            *o = g * (v * inv_rms);
        }
    }
}

/// RMSNorm as HF runs it on a bf16 model: the normalized f32 row is cast to bf16 before the
/// bf16 weight multiplies it, and the product is bf16 (`self.weight * x.to(input_dtype)`).
pub fn rms_norm_bf16(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm(x, &vec![1.0; weight.len()], eps, out);
    for (o, &g) in out.iter_mut().zip(weight.iter().cycle()) {
        *o = round_bf16(g * round_bf16(*o));
    }
}

/// SiLU (swish), torch `F.silu`: `x * sigmoid(x) = x / (1 + exp(-x))`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// The gated MLP's middle, HF `LlamaMLP.forward`: `act_fn(gate_proj(x)) * up_proj(x)` with
/// `act_fn = silu`. Overwrites `gate` with the result.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: gate and up lengths differ");
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `silu_mul` with torch's bf16 semantics: `silu(gate)` is a bf16 tensor, and so is the product.
pub fn silu_mul_bf16(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul_bf16: gate and up lengths differ");
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = round_bf16(round_bf16(silu(*g)) * u);
    }
}

/// Rounds every value to bf16 (the output of a torch op on bf16 tensors).
pub fn round_slice_bf16(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = round_bf16(*v));
}

/// The residual connection: `acc += x`.
pub fn add_in_place(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len(), "add_in_place: lengths differ");
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// `-log softmax(logits)[target]`, the cross-entropy of one position (torch
/// `F.cross_entropy` on one row), computed as `logsumexp(logits) - logits[target]` with the
/// maximum subtracted first and the sum of exponentials in f64.
pub fn log_softmax_nll(logits: &[f32], target: usize) -> f64 {
    assert!(target < logits.len(), "log_softmax_nll: target {target} outside {} logits", logits.len());
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let max = f64::from(max);
    let sum_exp: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    max + sum_exp.ln() - f64::from(logits[target])
}
