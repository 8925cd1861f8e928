//! SmoothQuant as ModelOpt's `mc.smoothquant` computes it (spec/algorithms.md §5) and the
//! export-time re-smoothing of linears that share an input (§7 step 2,
//! spec/export-formats.md §2.7 step 1).
//!
//! ModelOpt keeps two versions of the smoothing factor `p` ("pre_quant_scale"): the fp32 value
//! it computes, which it uses to smooth the weight and the activation amax, and a copy cast to
//! the model dtype, which is the buffer it stores and exports. The functions here take and
//! return the fp32 value; `round_to_dtype` of it is the stored buffer.

use crate::quant::fp8::round_to_dtype;
use crate::quant::scales::{average_scales, one_minus, torch_pow, SCALE_MAX, SCALE_MIN};
use crate::io::safetensors::Dtype;

/// ModelOpt's "dead activation channel" threshold, `1.0 / (1 << 31)` (§5 step 3).
const DEAD_CHANNEL: f32 = 1.0 / 2_147_483_648.0;

/// The fp32 smoothing factor of each input channel, spec/algorithms.md §5 step 3:
/// `p_j = w_j^(1-α) / a_j^α`, `w_j = max_i |W_ij|` over the `[out, inp]` weight.
///
/// `act_amax`: the per-input-channel activation amax from max calibration (ModelOpt stores it
/// in the model dtype; it is rounded to `dtype` here in case the caller kept it in f32).
///
/// ModelOpt quirks reproduced:
/// - `w_j^(1-α)` is a model-dtype tensor op, so it is rounded to `dtype`; `a_j^α` and the
///   quotient are fp32;
/// - channels with `a_j <= 2^-31` get `p_j = 1` **only if** the smallest `p` is itself
///   `<= 2^-31` (ModelOpt tests `scale.min() <= eps` before masking). Otherwise a dead channel's
///   `w/0 = inf` is clamped to 1e4, which is what ModelOpt exports for it;
/// - the clamp to `[1e-4, 1e4]` comes last.
///
/// A `0/0` (dead channel and an all-zero weight column with `0 < α < 1`) is NaN, on which
/// ModelOpt's `assert pre_quant_scale > 0` stops; here it becomes 1, the dead-channel value.
///
/// Panics if `w.len() != out * inp` or `act_amax.len() != inp` (a caller bug).
pub fn pre_quant_scale(act_amax: &[f32], w: &[f32], out: usize, inp: usize, alpha: f32, dtype: Dtype) -> Vec<f32> {
    assert_eq!(w.len(), out * inp, "pre_quant_scale: weight is not [{out}, {inp}]");
    assert_eq!(act_amax.len(), inp, "pre_quant_scale: {} activation amaxes for {inp} inputs", act_amax.len());
    let mut wmax = vec![0f32; inp];
    for row in w.chunks_exact(inp.max(1)) {
        for (m, &v) in wmax.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
    let wexp = one_minus(alpha);
    let amax: Vec<f32> = act_amax.iter().map(|&a| round_to_dtype(a, dtype)).collect();
    let mut p: Vec<f32> = wmax
        .iter()
        .zip(&amax)
        .map(|(&wj, &aj)| round_to_dtype(torch_pow(wj, wexp), dtype) / torch_pow(aj, alpha))
        .collect();
    // torch.min propagates NaN, and `NaN <= eps` is false: no masking then.
    let has_nan = p.iter().any(|v| v.is_nan());
    if !has_nan && p.iter().any(|&v| v <= DEAD_CHANNEL) {
        for (pj, &aj) in p.iter_mut().zip(&amax) {
            if aj <= DEAD_CHANNEL {
                *pj = 1.0;
            }
        }
    }
    p.iter().map(|&v| if v.is_nan() { 1.0 } else { v.clamp(SCALE_MIN, SCALE_MAX) }).collect()
}

/// Folds the inverse smoothing factor into a `[out, inp]` weight in place, spec/algorithms.md
/// §5 step 3 (`apply_pre_quant_scale_and_smooth`): `W'_ij = W_ij · (1/p_j)`, the reciprocal
/// and the product in fp32, the result stored in the model dtype.
///
/// `p` is the fp32 factor (not its model-dtype copy): ModelOpt smooths with the fp32 value,
/// which is why the stored bf16 `pre_quant_scale` alone does not rebuild the weight exactly
/// (reference/README.md). For AWQ pass `p = 1/s` (fp32) for the search's best `s` (§6.1
/// "Finalize"): ModelOpt also goes through that double reciprocal.
///
/// Panics if `p.len() != inp` or `w.len()` is not a multiple of `inp` (a caller bug).
pub fn smooth_weight(w: &mut [f32], inp: usize, p: &[f32], dtype: Dtype) {
    assert_eq!(p.len(), inp, "smooth_weight: {} scales for {inp} inputs", p.len());
    assert!(
        inp > 0 && w.len().is_multiple_of(inp),
        "smooth_weight: weight length {} is not a multiple of {inp}",
        w.len()
    );
    let inv: Vec<f32> = p.iter().map(|&v| 1.0 / v).collect();
    for row in w.chunks_exact_mut(inp) {
        for (x, &s) in row.iter_mut().zip(&inv) {
            *x = round_to_dtype(*x * s, dtype);
        }
    }
}

/// The per-tensor activation amax after smoothing, spec/algorithms.md §5 step 3:
/// `max_j(a_j · p_j)` with `a_j` cast to the model dtype first, the product in fp32 (`p` is the
/// fp32 factor) and the result stored in the model dtype. With α = 1, `p_j ≈ 1/a_j` and this
/// is exactly 1.0 in bf16 (every INT8-SQ `input_scale` of the reference is 1/127).
///
/// Panics if `p.len() != act_amax.len()` (a caller bug).
pub fn smoothed_input_amax(act_amax: &[f32], p: &[f32], dtype: Dtype) -> f32 {
    assert_eq!(act_amax.len(), p.len(), "smoothed_input_amax: {} amaxes, {} scales", act_amax.len(), p.len());
    let m = act_amax.iter().zip(p).fold(0f32, |m, (&a, &s)| m.max(round_to_dtype(a, dtype) * s));
    round_to_dtype(m, dtype)
}

/// Export-time re-smoothing of linears that read the same input (q/k/v, gate/up), spec
/// algorithms.md §7 step 2 and export-formats.md §2.7 step 1 (`qu.preprocess_linear_fusion`).
///
/// `members`: each linear's smoothed weight `[out_i, inp]` and its stored pre_quant_scale
/// (model dtype; rounded here in case it was given in f32). Returns `p_avg`, the mean of the
/// scales (`average_scales`, model dtype), and sets every member's scale to it. A member whose
/// scale already equals `p_avg` keeps its weight bit for bit (ModelOpt's `torch.equal` check);
/// the others get `W ← W · p_old / p_avg`.
///
/// The spec says "fp32 math"; ModelOpt's source multiplies and divides the weight tensor in
/// its own dtype (`weight * p_old.to(weight.dtype) / p_avg.to(weight.dtype)`), so each of the
/// two steps is rounded to the model dtype, and so it is here. The group's input amax (max over
/// the members) and the weight amax re-calibration are the caller's job.
///
/// Panics if a weight length is not a multiple of `inp` or a scale is not `inp` long.
pub fn resmooth_group(members: &mut [(&mut Vec<f32>, Vec<f32>)], inp: usize, dtype: Dtype) -> Vec<f32> {
    for (_, p) in members.iter_mut() {
        assert_eq!(p.len(), inp, "resmooth_group: {} scales for {inp} inputs", p.len());
        p.iter_mut().for_each(|v| *v = round_to_dtype(*v, dtype));
    }
    let p_avg = {
        let scales: Vec<&[f32]> = members.iter().map(|(_, p)| p.as_slice()).collect();
        average_scales(&scales, dtype)
    };
    for (w, p) in members.iter_mut() {
        if *p == p_avg {
            continue;
        }
        assert!(
            inp > 0 && w.len().is_multiple_of(inp),
            "resmooth_group: weight length {} is not a multiple of {inp}",
            w.len()
        );
        for row in w.chunks_exact_mut(inp) {
            for ((x, &old), &new) in row.iter_mut().zip(p.iter()).zip(&p_avg) {
                *x = round_to_dtype(round_to_dtype(*x * old, dtype) / new, dtype);
            }
        }
        p.clone_from(&p_avg);
    }
    p_avg
}
