//! FP8 E4M3 per-tensor quantization, as ModelOpt's FP8_DEFAULT_CFG computes and exports it
//! (spec/algorithms.md §4.2, spec/export-formats.md §2.5 "FP8").

use crate::numerics::{e4m3_to_f32, f32_to_e4m3, E4M3_MAX};
use crate::io::safetensors::Dtype;

/// The f32 constant 1/448. ModelOpt multiplies by it rather than dividing by 448; the
/// reference export's 56 weight scales all equal `amax * (1/448 as f32)`, while a true f32
/// division differs by one ulp in 33 of them (reference/README.md "verified facts").
const INV_E4M3_MAX: f32 = 1.0 / E4M3_MAX;

/// Rounds an f32 to the model dtype (ModelOpt does its arithmetic in the model dtype).
pub fn round_to_dtype(x: f32, dtype: Dtype) -> f32 {
    use crate::numerics::{f16_to_f32, f32_to_f16, round_bf16};
    match dtype {
        Dtype::BF16 => round_bf16(x),
        Dtype::F16 => f16_to_f32(f32_to_f16(x)),
        _ => x,
    }
}

/// Scale of a per-tensor FP8 quantizer from its amax: amax/448 as ModelOpt computes it.
/// `export_amax` replaces amax == 0 (and NaN) by the maxbound, giving scale 1.0
/// (spec/export-formats.md §1.2).
pub fn scale_from_amax(amax: f32) -> f32 {
    let amax = if amax == 0.0 || amax.is_nan() { E4M3_MAX } else { amax };
    amax * INV_E4M3_MAX
}

/// Input (activation) scale: the calibrated amax is stored in the model dtype before it is
/// turned into a scale (spec/algorithms.md §3.1 step 4; all 56 reference input scales are a
/// bf16 amax times 1/448).
pub fn input_scale(amax: f32, dtype: Dtype) -> f32 {
    scale_from_amax(round_to_dtype(amax, dtype))
}

/// max |w| (NaN-free input assumed: weights are checked when loaded).
pub fn absmax(w: &[f32]) -> f32 {
    w.iter().fold(0.0f32, |m, &x| m.max(x.abs()))
}

/// FP8 codes of a weight: `e4m3(W / scale)` with the division done in the model dtype and
/// then cast, which is what reproduces all reference bytes (the same division in f32 differs
/// in 2.6% of them; reference/README.md "verified facts").
pub fn quantize(w: &[f32], scale: f32, dtype: Dtype) -> Vec<u8> {
    let s = round_to_dtype(scale, dtype);
    w.iter().map(|&x| f32_to_e4m3(round_to_dtype(x / s, dtype))).collect()
}

/// Weights back from FP8 codes and their per-tensor scale.
pub fn dequantize(codes: &[u8], scale: f32) -> Vec<f32> {
    codes.iter().map(|&c| e4m3_to_f32(c) * scale).collect()
}

/// Fake quantization of activations in place, ModelOpt's kernel formula:
/// s = 448/amax, y = e4m3(x·s) · (1/s) (spec/algorithms.md §4.2).
pub fn fake_quant(x: &mut [f32], amax: f32) {
    if amax <= 0.0 {
        return;
    }
    let s = E4M3_MAX / amax;
    let inv = 1.0 / s;
    for v in x {
        *v = e4m3_to_f32(f32_to_e4m3(*v * s)) * inv;
    }
}
