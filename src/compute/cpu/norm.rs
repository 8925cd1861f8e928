//! Element-wise and row-wise kernels of the decoder: RMSNorm (plain and Gemma's `1 + w`),
//! gated MLP activations (SiLU, GELU, tanh-GELU, squared ReLU), residual add,
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

/// RMSNorm with the weight stored as an offset from 1, HF `GemmaRMSNorm.forward`
/// (models/gemma/modeling_gemma.py):
/// ```text
/// output = self._norm(x.float())              # x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
/// output = output * (1.0 + self.weight.float())
/// return output.type_as(x)
/// ```
/// All in f32 (`1 + w` too), as [`rms_norm`] computes `weight * normed`.
pub fn rms_norm_offset(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let one_plus: Vec<f32> = weight.iter().map(|&w| 1.0 + w).collect();
    rms_norm(x, &one_plus, eps, out);
}

/// `rms_norm_offset` on a bf16 model: the f32 product is cast once at the end
/// (`output.type_as(x)`), unlike LlamaRMSNorm's cast before the weight multiplies.
pub fn rms_norm_offset_bf16(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm_offset(x, weight, eps, out);
    round_slice_bf16(out);
}

/// LayerNorm over rows of `weight.len()` values, torch `F.layer_norm(x, shape, weight, bias, eps)`
/// (HF `nn.LayerNorm` of Starcoder2, `NemotronLayerNorm1P` with `weight + 1`): the biased
/// variance, `(x - mean) / sqrt(var + eps) * weight + bias`. Mean and variance are accumulated in
/// f64 (torch uses a Welford pass in f32 accumulators, as close at these lengths); the rest is f32.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let cols = weight.len();
    assert!(cols > 0 && x.len().is_multiple_of(cols), "layer_norm: {} values are not rows of {cols}", x.len());
    assert_eq!(x.len(), out.len(), "layer_norm: input and output lengths differ");
    for (row, out_row) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / cols as f64;
        let inv_std = 1.0 / (var as f32 + eps).sqrt();
        let mean = mean as f32;
        for (i, (o, &v)) in out_row.iter_mut().zip(row).enumerate() {
            *o = (v - mean) * inv_std * weight[i] + bias.map_or(0.0, |b| b[i]);
        }
    }
}

/// SiLU (swish), torch `F.silu`: `x * sigmoid(x) = x / (1 + exp(-x))`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// tanh-approximated GELU, torch `F.gelu(x, approximate="tanh")` (HF `gelu_pytorch_tanh`,
/// `PytorchGELUTanh`): `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, in f32.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

// glibc's libm, linked through std and the libc crate (which declares no libm functions). The
// emulator's g++ build of cuda/forward.cu calls this same erff, so both give the same bits.
unsafe extern "C" {
    pub(super) safe fn erff(x: f32) -> f32;
}

/// Exact GELU, HF `GELUActivation` (`"gelu"`: torch `F.gelu`, approximate="none"), as torch's
/// kernel writes it: `x * 0.5 * (1 + erf(x * M_SQRT1_2))` in f32. Halving first keeps
/// `gelu(f32::MAX)` finite. Below x ≈ -5.54 `erff` rounds to -1 and the result is -0 where the
/// exact value is above -1e-7: what this f32 formula gives, torch's included.
#[inline]
pub fn gelu(x: f32) -> f32 {
    x * 0.5 * (1.0 + erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Squared ReLU, HF `ReLUSquaredActivation` (`"relu2"`): `square(relu(x))`.
#[inline]
pub fn relu2(x: f32) -> f32 {
    let r = x.max(0.0);
    r * r
}

/// The gated MLP's middle, HF `LlamaMLP.forward` / `GemmaMLP.forward`:
/// `act_fn(gate_proj(x)) * up_proj(x)`. Overwrites `gate` with the result.
pub fn gated_mul(act: impl Fn(f32) -> f32, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gated_mul: gate and up lengths differ");
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = act(*g) * u;
    }
}

/// `gated_mul` with torch's bf16 semantics: `act_fn(gate)` is a bf16 tensor, and so is the product.
pub fn gated_mul_bf16(act: impl Fn(f32) -> f32, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gated_mul_bf16: gate and up lengths differ");
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = round_bf16(round_bf16(act(*g)) * u);
    }
}

/// `gated_mul` with `act_fn = silu` (HF `LlamaMLP`).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    gated_mul(silu, gate, up);
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
/// maximum subtracted first. The exponentials use [`exp_nonpositive`] (relative error below
/// 2e-7, vectorizable) and are summed in f64 per lane, so the result is within ~1e-7 of the
/// exact value.
pub fn log_softmax_nll(logits: &[f32], target: usize) -> f64 {
    assert!(target < logits.len(), "log_softmax_nll: target {target} outside {} logits", logits.len());
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    const LANES: usize = 16;
    let mut acc = [0f64; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for c in &mut chunks {
        let mut e = [0f32; LANES];
        for (e, &l) in e.iter_mut().zip(c) {
            *e = exp_nonpositive(l - max);
        }
        for (a, e) in acc.iter_mut().zip(e) {
            *a += f64::from(e);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&l| f64::from(exp_nonpositive(l - max))).sum();
    let sum_exp = acc.iter().sum::<f64>() + tail;
    f64::from(max) + sum_exp.ln() - f64::from(logits[target])
}

/// e^x for x <= 0 (0 below -87.3, where f32 underflows), branch-free so loops over it
/// vectorize: x = n·ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial
/// (truncation error < 3e-8 relative), times 2^n built in the exponent bits.
#[inline]
pub fn exp_nonpositive(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    // ln 2 split in two so n·ln2 is subtracted almost exactly (Cody-Waite).
    let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Activation of the MLP: `act_fn(gate_proj(x)) * up_proj(x)`, or `act_fn(up_proj(x))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `"silu"`: torch `F.silu`.
    Silu,
    /// `"gelu_pytorch_tanh"`: torch `F.gelu(x, approximate="tanh")` (HF `PytorchGELUTanh`).
    GeluTanh,
    /// `"relu2"`: HF `ReLUSquaredActivation`, `square(relu(x))` (Nemotron).
    Relu2,
    /// `"gelu"`: torch `F.gelu` with erf (HF `GELUActivation`; Falcon, MPT).
    Gelu,
}

/// A family's norm: RMSNorm or LayerNorm (with bias), the weight stored as an offset from 1
/// or not, and its epsilon (used in f32, as torch adds it to an f32 tensor).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormKind {
    pub layer_norm: bool,
    pub offset: bool,
    pub eps: f32,
}

/// The families' last steps on the logits, each a torch op rounded as `c` stores tensors:
/// Granite's `logits / logits_scaling`; Gemma2's `final_logit_softcapping` c:
/// `logits / c`, `tanh`, `· c` (HF `Gemma2ForCausalLM.forward`). cuda/forward.cu's
/// finish_logits_kernel is the device twin.
pub fn finish_logits(bf16: bool, x: &mut [f32], divisor: Option<f32>, cap: Option<f32>) {
    let r = |v: f32| if bf16 { crate::numerics::round_bf16(v) } else { v };
    if let Some(d) = divisor {
        x.iter_mut().for_each(|v| *v = r(*v / d));
    }
    if let Some(cap) = cap {
        x.iter_mut().for_each(|v| *v = r(r(r(*v / cap).tanh()) * cap));
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    unsafe extern "C" {
        safe fn erfc(x: f64) -> f64;
    }

    /// Exact GELU in f64, `x·Φ(x) = ½x·erfc(−x/√2)`: erfc keeps its relative accuracy (glibc:
    /// a few f64 ulps) where `1 + erf` would cancel, for negative x.
    pub(in super::super) fn gelu_f64(x: f64) -> f64 {
        0.5 * x * erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
    }

    #[test]
    fn gelu_matches_f64() {
        // Error of the f32 formula, u = 2^-24: the product x·(1/√2) (relative u) moves erf by at
        // most (2/√π)·max(t·e^(-t²))·u < 0.49u; erff is within 1 ulp <= u (|erf| < 1); 1 + erf
        // rounds by <= u; so the factor 1 + erf is off by < 2.5u, absolute, times x/2, and the
        // last product adds u·|gelu|. For x >= 0 the factor is >= 1: a relative error < 3.5u,
        // bounded by 4u. For x < 0 it cancels (as in torch, down to -0 below x ≈ -5.5): the
        // error is < 1.25u·|x| + u·|gelu| <= 1.75u·|x|, bounded by 2u·|x|.
        let u = f64::from(f32::EPSILON) / 2.0;
        let grid = (-1200..=1200).map(|i| i as f32 / 100.0);
        let wide = [1e-30, 1e-6, 0.1, 7.0, 30.0, 1e10, f32::MAX].into_iter().flat_map(|v| [v, -v]);
        for x in grid.chain(wide) {
            let (got, want) = (f64::from(gelu(x)), gelu_f64(f64::from(x)));
            let bound = if x >= 0.0 { 4.0 * u * want.abs() } else { 2.0 * u * f64::from(x).abs() };
            assert!((got - want).abs() <= bound, "gelu({x:e}) = {got:e}, f64 {want:e}");
        }
        // Zeros keep their sign (x·0.5·1), and the formula is -0 once erff rounds to -1.
        assert_eq!(gelu(0.0).to_bits(), 0f32.to_bits());
        assert_eq!(gelu(-0.0).to_bits(), (-0f32).to_bits());
        assert_eq!(gelu(-10.0).to_bits(), (-0f32).to_bits());
        // NaN propagates; +inf stays inf; -inf is -inf·0 = NaN, what torch's f32 formula gives.
        assert!(gelu(f32::NAN).is_nan());
        assert_eq!(gelu(f32::INFINITY), f32::INFINITY);
        assert!(gelu(f32::NEG_INFINITY).is_nan());
    }
}
