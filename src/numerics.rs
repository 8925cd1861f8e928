//! Scalar number formats: bf16, f16 and FP8 E4M3FN, each to and from f32.
//!
//! Every encoder rounds half to even, as PyTorch's casts and CUDA's `__nv_fp8_e4m3`
//! constructor do (spec/algorithms.md §1 "dtype", §4.2). Tests check every code and every
//! rounding boundary against math done in f64 (`tests/numerics.rs`).

/// Largest finite E4M3FN value, 1.75 * 2^8 (spec/algorithms.md §4.2).
pub const E4M3_MAX: f32 = 448.0;

/// bf16 bits -> f32: bf16 is the upper half of an f32.
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 -> bf16 bits, round half to even; NaN stays a (quiet) NaN of the same sign.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let lsb = (bits >> 16) & 1;
    ((bits + 0x7FFF + lsb) >> 16) as u16
}

/// `x` rounded to the nearest bf16 value (the model dtype of most checkpoints), as f32.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

/// IEEE half bits -> f32 (subnormals, infinities and NaN included).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((h >> 10) & 0x1F) as i32;
    let man = (h & 0x3FF) as f32;
    let mag = match exp {
        0 => man * (-24f32).exp2(),
        31 if man == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + man / 1024.0) * ((e - 15) as f32).exp2(),
    };
    sign * mag
}

/// f32 -> IEEE half bits, round half to even, overflow to infinity.
pub fn f32_to_f16(x: f32) -> u16 {
    let sign = ((x.to_bits() >> 16) & 0x8000) as u16;
    let a = x.abs();
    if a.is_nan() {
        return sign | 0x7E00;
    }
    if a < (-14f32).exp2() {
        // Subnormal range: a multiple of 2^-24; scaling by a power of two is exact.
        // A result of 0x400 is the smallest normal, which the code layout makes continuous.
        return sign | (a * 16_777_216.0).round_ties_even() as u16;
    }
    round_mantissa(a, 10, 15, 0x7C00).map_or(sign | 0x7C00, |c| sign | c as u16)
}

/// Normal-range rounding shared by the small float formats: rounds |a| (a normal number of
/// the target format, or above its range) to `man_bits` mantissa bits, half to even, and
/// returns the code `(exp + bias) << man_bits | mantissa`, or None when the code reaches
/// `overflow_code` (the caller saturates or returns infinity).
fn round_mantissa(a: f32, man_bits: u32, bias: i32, overflow_code: u32) -> Option<u32> {
    let bits = a.to_bits();
    let exp = ((bits >> 23) as i32) - 127;
    let shift = 23 - man_bits;
    let man = bits & 0x7F_FFFF;
    let lsb = (man >> shift) & 1;
    let rounded = (man + (1 << (shift - 1)) - 1 + lsb) >> shift; // may carry into the exponent
    let code = (((exp + bias) as u32) << man_bits) + rounded;
    (code < overflow_code).then_some(code)
}

/// E4M3FN bits -> f32 (bias 7, subnormals 2^-9 steps, no infinities, 0x7F/0xFF = NaN).
pub fn e4m3_to_f32(c: u8) -> f32 {
    let sign = if c & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((c >> 3) & 0xF) as i32;
    let man = (c & 7) as f32;
    if exp == 15 && c & 7 == 7 {
        return f32::NAN;
    }
    let mag = if exp == 0 { man * (-9f32).exp2() } else { (1.0 + man / 8.0) * ((exp - 7) as f32).exp2() };
    sign * mag
}

/// f32 -> E4M3FN bits: round half to even, saturate to ±448 (`__NV_SATFINITE`), NaN -> NaN.
/// spec/algorithms.md §4.2: "Implement: RNE + saturate".
///
/// Bit-for-bit NVIDIA's host conversion (`__nv_cvt_float_to_fp8`, `__NV_SATFINITE`, `__NV_E4M3`;
/// tests/fp8_reference.rs checks all 2^32 inputs): every NaN, whatever its sign or payload,
/// becomes the positive NaN code 0x7F, because NVIDIA canonicalizes NaN before converting.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    let a = x.abs();
    if a < (-6f32).exp2() {
        // Subnormals are multiples of 2^-9; code 8 (= 2^-6) is the smallest normal.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // 0x7F is NaN: everything from there up (including +inf) saturates to 448 = 0x7E.
    let code = if a >= E4M3_MAX { 0x7E } else { round_mantissa(a, 3, 7, 0x7F).unwrap_or(0x7E) };
    sign | code as u8
}

/// `x` rounded through E4M3 and back.
#[inline]
pub fn round_e4m3(x: f32) -> f32 {
    e4m3_to_f32(f32_to_e4m3(x))
}
