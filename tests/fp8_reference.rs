//! `f32_to_e4m3` against NVIDIA's own host conversion (`__nv_cvt_float_to_fp8(x, __NV_SATFINITE,
//! __NV_E4M3)` in CUDA 13.0's `cuda_fp8.hpp`), bit for bit: a strided sample of all f32 bit
//! patterns plus every special class here, all 2^32 patterns in the `--ignored` test.

use rq_min::numerics::f32_to_e4m3;

/// A port of NVIDIA's host path, E4M3 with saturation to the largest finite value only.
///
/// How it works: every NaN is first replaced by the positive NaN 0x7FFFFFFF (so the sign of a
/// NaN is dropped), the float is widened to f64 (exact), and the code is then built from the
/// f64's bit pattern: magnitudes up to 2^-10 give zero, NaN gives 0x7F, magnitudes above
/// 464 (448 plus half a step) give 0x7E, normal magnitudes keep the top three mantissa bits
/// and round to nearest-even on the 49 bits dropped, smaller ones are shifted into the
/// subnormal range with the implicit bit and rounded the same way. The sign bit is OR-ed last.
fn nvidia_e4m3_satfinite(x: f32) -> u8 {
    let fbits = if x.to_bits() & 0x7FFF_FFFF > 0x7F80_0000 { 0x7FFF_FFFF } else { x.to_bits() };
    let d = (f32::from_bits(fbits) as f64).to_bits();
    const HALF_ULP: u64 = 1 << 48; // half of one E4M3 mantissa step, in f64 mantissa units
    const HALF_MIN_SUBNORMAL: u64 = 0x3F50_0000_0000_0000; // 2^-10
    const SATURATE_ABOVE: u64 = 0x407D_0000_0000_0000; // 464
    const MIN_NORMAL: u64 = 0x3F90_0000_0000_0000; // 2^-6
    let sign = ((d >> 63) << 7) as u8;
    // Biased E4M3 exponent, computed with wrap-around like the C code's unsigned char.
    let exp = ((((d >> 52) & 0x7FF) as u32).wrapping_sub(1023).wrapping_add(7)) as u8;
    let mantissa = ((d >> 49) as u8) & 7;
    let abs = d & 0x7FFF_FFFF_FFFF_FFFF;
    let code = if abs <= HALF_MIN_SUBNORMAL {
        0
    } else if abs > 0x7FF0_0000_0000_0000 {
        0x7F
    } else if abs > SATURATE_ABOVE {
        0x7E
    } else if abs >= MIN_NORMAL {
        let truncated = (exp << 3) | mantissa;
        let dropped = d & (2 * HALF_ULP - 1);
        truncated + (dropped > HALF_ULP || (dropped == HALF_ULP && mantissa & 1 == 1)) as u8
    } else {
        let shift = 1u8.wrapping_sub(exp) as u32; // 1..=4
        let truncated = (mantissa | 8) >> shift;
        let dropped = (d | 1 << 52) & ((HALF_ULP << (shift + 1)) - 1);
        let half = HALF_ULP << shift;
        truncated + (dropped > half || (dropped == half && truncated & 1 == 1)) as u8
    };
    code | sign
}

/// Every special class: ±0, f32 subnormals, the E4M3 subnormal / normal / saturation edges,
/// ±inf, quiet and signalling NaNs of both signs with assorted payloads.
fn special_patterns() -> Vec<u32> {
    let mut v = vec![0, 1, 2, 0x7F_FFFF, 0x80_0000, 0x7F7F_FFFF, 0x7F80_0000];
    for payload in [1u32, 2, 0x1234, 0x3F_FFFF, 0x40_0000, 0x40_0001, 0x7F_FFFF] {
        v.push(0x7F80_0000 | payload);
    }
    for x in [2f32.powi(-10), 2f32.powi(-9), 2f32.powi(-7), 2f32.powi(-6), 448.0, 456.0, 464.0, 480.0] {
        let b = x.to_bits();
        v.extend([b - 1, b, b + 1]);
    }
    let positive = v.clone();
    v.extend(positive.iter().map(|b| b | 0x8000_0000));
    v
}

fn check(bits: u32) {
    let x = f32::from_bits(bits);
    assert_eq!(f32_to_e4m3(x), nvidia_e4m3_satfinite(x), "f32 bits {bits:#010x} ({x:e})");
}

#[test]
fn e4m3_matches_nvidia_on_special_classes() {
    special_patterns().into_iter().for_each(check);
    assert_eq!(f32_to_e4m3(-f32::NAN), 0x7F, "NVIDIA drops the sign of NaN");
}

#[test]
fn e4m3_matches_nvidia_on_a_strided_sample() {
    (0..=u32::MAX).step_by(4099).for_each(check);
}

/// All 2^32 patterns (about a minute on one core in release): `cargo test --release --test
/// fp8_reference -- --ignored`.
#[test]
#[ignore]
fn e4m3_matches_nvidia_on_every_f32() {
    let start = std::time::Instant::now();
    (0..=u32::MAX).for_each(check);
    eprintln!("all 2^32 f32 patterns checked in {:.1} s", start.elapsed().as_secs_f64());
}
