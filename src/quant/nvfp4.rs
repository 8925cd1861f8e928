//! NVFP4 (W4A4): E2M1 values in blocks of 16 along the input dimension, one E4M3 scale per
//! block and an f32 global scale, as ModelOpt's NVFP4_DEFAULT_CFG fake-quantizes and exports
//! it (spec/algorithms.md §4.3, spec/export-formats.md §1.4, §1.5, §2.5 "NVFP4").

use crate::error::{Error, Result};
use crate::numerics::{e4m3_to_f32, f32_to_e4m3, E4M3_MAX};
use crate::quant::fp8::{absmax, round_to_dtype};
use crate::io::safetensors::Dtype;

/// Elements per block (spec/algorithms.md §4.3; the Triton kernel always uses 16).
pub const BLOCK: usize = 16;

/// Largest E2M1 magnitude: the NVFP4 quantizer's `maxbound` (spec/export-formats.md §1.2).
pub const E2M1_MAX: f32 = 6.0;

/// The E2M1 value of each nibble, ModelOpt's `e2m1_values` table: bit 3 is the sign, bits 0-2
/// index {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Code 8 ("-0") decodes to +0 there.
const E2M1_VALUES: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// The f32 constant 1/2688 (2688 = 6·448). PyTorch on CUDA divides a tensor by a Python scalar
/// by multiplying with the f32 reciprocal; all 56 `weight_scale_2` of the reference NVFP4
/// export equal `amax * (1/2688 as f32)` (reference/README.md "verified facts").
const INV_GLOBAL_MAX: f32 = 1.0 / (E2M1_MAX * E4M3_MAX);

/// Smallest positive E4M3 value 2^-9: ModelOpt 0.47 clamps block scales up to it before the
/// cast so that a tiny block does not get the scale 0 (spec/export-formats.md §2.5 "NVFP4").
const E4M3_MIN_SUBNORMAL: f32 = 1.0 / 512.0;

/// Index 0..=7 of |v|'s E2M1 magnitude: round half to even on {0,0.5,1,1.5,2,3,4,6},
/// saturating at 6 (spec/export-formats.md §1.4; the fake-quant kernel's threshold chain of
/// spec/algorithms.md §4.3). NaN gives 7, as ModelOpt's `searchsorted` does.
#[inline]
fn e2m1_index(a: f32) -> u8 {
    if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    }
}

/// E2M1 nibble of `v` (spec/export-formats.md §1.4, ModelOpt's `NVFP4QTensor._cast_fp4`).
/// ModelOpt quirk matched: the sign bit is `v < 0`, so every negative v, including those whose
/// magnitude rounds to 0, gets code 8 ("-0"), while -0.0 itself gets code 0.
#[inline]
pub fn e2m1_code(v: f32) -> u8 {
    (((v < 0.0) as u8) << 3) | e2m1_index(v.abs())
}

/// Value of an E2M1 nibble (the low 4 bits of `code`), spec/export-formats.md §1.4.
#[inline]
pub fn e2m1_value(code: u8) -> f32 {
    E2M1_VALUES[(code & 0xF) as usize]
}

/// An exported NVFP4 weight (spec/export-formats.md §2.5 "NVFP4"): `packed` is `weight`
/// (U8, `[out, in/2]`, element 2j in the low nibble), `block_scales` is `weight_scale`
/// (F8_E4M3 bytes, `[out, in/16]`), `weight_scale_2` the F32 0-d global scale.
#[derive(Clone, Debug, PartialEq)]
pub struct Nvfp4Weight {
    pub packed: Vec<u8>,
    pub block_scales: Vec<u8>,
    pub weight_scale_2: f32,
}

/// Real quantization of a `[out, inp]` weight for export (spec/algorithms.md §4.3 "Real quant /
/// export", spec/export-formats.md §2.5 "NVFP4"; ModelOpt's `NVFP4QTensor.quantize` with the
/// scales of `get_weights_scaling_factor`). `global_amax` is the max |W| over the export's
/// fused group (q/k/v share one, gate/up share one, spec/algorithms.md §7); the caller decides.
///
/// Per block of 16 inputs, all in f32 (reproduces every byte of the reference export):
/// * `weight_scale_2 = global_amax × f32(1/2688)`;
/// * `s = block_amax / (6 × weight_scale_2)` (the product rounded first, then a true division,
///   as ModelOpt's code does; the reference bytes do not tell it from `block_amax / 6 / ws2`);
///   an all-zero block gets `s = 1.0`; `s` is clamped up to 2^-9 (ModelOpt 0.47's code: the
///   reference has no zero or subnormal-scale block to confirm it); block scale = E4M3
///   round-half-even of `s`, saturating at 448 (cannot trigger when `global_amax` really is
///   the group's max);
/// * codes = `e2m1_code(w / (f32(block scale) × weight_scale_2))`, one f32 division (dividing
///   by the two scales in turn, or in bf16, changes reference codes).
///
/// An input dimension that is not a multiple of 16 is an error. ModelOpt pads with zeros for
/// fake quant, but its export computes the block scales with
/// `get_weights_scaling_factor`, which asserts divisibility, and engines (vLLM) require it.
/// A `global_amax` of 0 (all-zero weights) or NaN is replaced by the maxbound 6, as
/// `export_amax` does for other scales (spec/export-formats.md §1.2); ModelOpt itself would
/// produce NaN scales here. rq-min's choice gives a valid all-zero encoding.
pub fn quantize_weight(name: &str, w: &[f32], out: usize, inp: usize, global_amax: f32) -> Result<Nvfp4Weight> {
    quantize_weight_scaled(name, w, out, inp, weight_scale_2(global_amax))
}

/// `weight_scale_2 = global_amax × f32(1/2688)`, 0 or NaN amax → the maxbound 6 (see above).
pub fn weight_scale_2(global_amax: f32) -> f32 {
    let amax = if global_amax == 0.0 || global_amax.is_nan() { E2M1_MAX } else { global_amax };
    amax * INV_GLOBAL_MAX
}

/// [`quantize_weight`] for a given `weight_scale_2`.
pub fn quantize_weight_scaled(name: &str, w: &[f32], out: usize, inp: usize, weight_scale_2: f32) -> Result<Nvfp4Weight> {
    if w.len() != out * inp {
        return Err(Error::tensor(name, format!("{} values for shape [{out}, {inp}]", w.len())));
    }
    if !inp.is_multiple_of(BLOCK) {
        return Err(Error::tensor(
            name,
            format!(
                "shape [{out}, {inp}]: the input dimension {inp} is not a multiple of the NVFP4 block size {BLOCK}"
            ),
        ));
    }
    let denom = E2M1_MAX * weight_scale_2;
    let mut packed = Vec::with_capacity(w.len() / 2);
    let mut block_scales = Vec::with_capacity(w.len() / BLOCK);
    for block in w.chunks_exact(BLOCK) {
        let mut s = absmax(block) / denom;
        if s == 0.0 {
            s = 1.0;
        }
        let code = f32_to_e4m3(s.max(E4M3_MIN_SUBNORMAL));
        block_scales.push(code);
        let scale = e4m3_to_f32(code) * weight_scale_2;
        packed.extend(block.chunks_exact(2).map(|p| e2m1_code(p[0] / scale) | (e2m1_code(p[1] / scale) << 4)));
    }
    Ok(Nvfp4Weight { packed, block_scales, weight_scale_2 })
}

/// Weights back from an NVFP4 export: `w = e2m1(code) × (f32(block scale) × weight_scale_2)`
/// (spec/algorithms.md §4.3 "At dequant", ModelOpt's `NVFP4QTensor.dequantize` op order).
/// `packed` must hold `out × inp/2` bytes and `block_scales` `out × inp/16` (check the tensor
/// shapes first); `inp` a multiple of 16.
pub fn dequantize_weight(packed: &[u8], block_scales: &[u8], weight_scale_2: f32, out: usize, inp: usize) -> Vec<f32> {
    dequantize_weight_with(packed, block_scales, out, inp, |s| s * weight_scale_2)
}

/// [`dequantize_weight`] with the effective block scale computed from `f32(block scale)` by
/// `effective` (ModelOpt: `× weight_scale_2`; compressed-tensors: `/ weight_global_scale`).
pub fn dequantize_weight_with(
    packed: &[u8],
    block_scales: &[u8],
    out: usize,
    inp: usize,
    effective: impl Fn(f32) -> f32,
) -> Vec<f32> {
    debug_assert!(
        inp.is_multiple_of(BLOCK) && packed.len() == out * inp / 2 && block_scales.len() == out * inp / BLOCK
    );
    let mut w = Vec::with_capacity(out * inp);
    for (bytes, &sc) in packed.chunks_exact(BLOCK / 2).zip(block_scales) {
        let scale = effective(e4m3_to_f32(sc));
        for &b in bytes {
            w.push(e2m1_value(b) * scale);
            w.push(e2m1_value(b >> 4) * scale);
        }
    }
    w
}

/// Activation global scale `input_scale = amax / 2688` (spec/algorithms.md §4.3,
/// spec/export-formats.md §2.5; ModelOpt's `get_activation_scaling_factor`): the calibrated
/// amax is held in the model dtype, 0 or NaN becomes the maxbound 6 (`export_amax`,
/// spec/export-formats.md §1.2), and the division is ModelOpt's multiply by f32(1/2688).
pub fn input_scale(amax: f32, dtype: Dtype) -> f32 {
    let a = round_to_dtype(amax, dtype);
    let a = if a == 0.0 || a.is_nan() { E2M1_MAX } else { a };
    a * INV_GLOBAL_MAX
}

/// NVFP4 fake quantization in place, the GPU kernel's formula (spec/algorithms.md §4.3 "Fake
/// quant", ModelOpt's Triton `fp4_fake_quant_block`). `x` holds rows of `cols` values; each row
/// is cut into blocks of 16 (a partial last block acts as zero-padded). With
/// `gs = global_amax × f32(1/2688)` (PyTorch's scalar division) and `gs_safe = gs > 0 ? gs : 1e-12`:
/// `t = min(bmax / (6·gs_safe), 448)`, `sb = f32(e4m3(t)) × gs`, `sb < 1e-5 → 1.0` (the kernel's
/// absolute guard, a quirk matched: blocks with a tiny scale are quantized with scale 1),
/// `y = sign(x) · E2M1(|x| / sb) · sb`. Divisions are IEEE here; the Triton kernel's f32
/// division may differ by an ulp before rounding, which rarely changes a value. The results are
/// in f32: round them to the model dtype as the kernel's store does.
pub fn fake_quant(x: &mut [f32], cols: usize, global_amax: f32) {
    if cols == 0 {
        return;
    }
    let gs = global_amax * INV_GLOBAL_MAX;
    let gs_safe = if gs > 0.0 { gs } else { 1e-12 };
    let denom = E2M1_MAX * gs_safe;
    for row in x.chunks_mut(cols) {
        for block in row.chunks_mut(BLOCK) {
            let t = (absmax(block) / denom).min(E4M3_MAX);
            let mut sb = e4m3_to_f32(f32_to_e4m3(t)) * gs;
            if sb < 1e-5 {
                sb = 1.0;
            }
            for v in block.iter_mut() {
                let m = E2M1_VALUES[e2m1_index(v.abs() / sb) as usize] * sb;
                *v = if *v >= 0.0 { m } else { -m };
            }
        }
    }
}

/// `weight_global_scale` for ModelOpt's `weight_scale_2`. compressed-tensors dequantizes
/// NVFP4 as `code · (f32(block scale) / global_scale)` (forward_helpers.py `_dequantize`) and
/// computes `global_scale = 448·6 / amax` (helpers.py `generate_gparam`): the inverse of
/// ModelOpt's `amax / (6·448)` (spec/export-formats.md §1.1). Of f32(1/ws2) and its nearest
/// f32 neighbours, the first for which `s / gs == s · ws2` for every E4M3 block scale s is
/// taken, so the dequantized weights equal the unified export's bit for bit; if none is,
/// f32(1/ws2) (then they differ by at most an ulp).
pub fn nvfp4_global_scale(ws2: f32) -> f32 {
    invert(ws2, |gs| exact_inverse(ws2, gs))
}

/// Whether `s / gs == s · ws2` for every finite positive E4M3 value s.
fn exact_inverse(ws2: f32, gs: f32) -> bool {
    (1u8..0x7F).all(|c| e4m3_to_f32(c) / gs == e4m3_to_f32(c) * ws2)
}

/// Compressed-tensors mode (`ptq::quantize::Options::compressed_tensors`): an exact inverse of
/// ModelOpt's `weight_scale_2` exists for only some values (tests: 34 of 200 sampled values),
/// so the quantizer takes the f32 nearest `ws2` (within 64 ulps, a relative change below
/// 8·10⁻⁶) for which [`nvfp4_global_scale`] finds one; `ws2` itself if none.
pub fn invertible_scale_2(ws2: f32) -> f32 {
    let bits = ws2.to_bits();
    (0..=64u32)
        .flat_map(|d| [bits.wrapping_add(d), bits.wrapping_sub(d)])
        .map(f32::from_bits)
        .find(|&w| w.is_finite() && w > 0.0 && exact_inverse(w, nvfp4_global_scale(w)))
        .unwrap_or(ws2)
}

/// `input_global_scale` for ModelOpt's NVFP4 `input_scale` (vLLM multiplies the activation by
/// it before the FP4 cast): the f32 near 1/s whose reciprocal is s again, so reading it back
/// gives the unified export's activation amax.
pub fn input_global_scale(input_scale: f32) -> f32 {
    invert(input_scale, |g| 1.0 / g == input_scale)
}

/// Compressed-tensors mode: the f32 nearest the NVFP4 `input_scale` (within 64 ulps) whose
/// [`input_global_scale`] inverts back to it exactly, so both layouts give one activation
/// amax. A one-ulp difference matters: calibrated amaxes are model-dtype values, so block
/// scales often sit exactly on E4M3 rounding ties (measured on rq-tiny: 1.2% perplexity).
pub fn invertible_input_scale(s: f32) -> f32 {
    let bits = s.to_bits();
    (0..=64u32)
        .flat_map(|d| [bits.wrapping_add(d), bits.wrapping_sub(d)])
        .map(f32::from_bits)
        .find(|&w| w.is_finite() && w > 0.0 && 1.0 / input_global_scale(w) == w)
        .unwrap_or(s)
}

/// f32(1/x) or the nearest of its neighbours (up to 8 ulps) that satisfies `exact`.
fn invert(x: f32, exact: impl Fn(f32) -> bool) -> f32 {
    let first = 1.0 / x;
    let bits = first.to_bits();
    (0..=8u32)
        .flat_map(|d| [bits.wrapping_add(d), bits.wrapping_sub(d)])
        .map(f32::from_bits)
        .find(|&g| g.is_finite() && g > 0.0 && exact(g))
        .unwrap_or(first)
}
