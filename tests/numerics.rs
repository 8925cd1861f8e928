//! Every code of bf16 / f16 / E4M3 and every rounding boundary, against math done in f64.

use rq_min::numerics::*;

/// Value of a float code from its fields, in f64: (exp_bits, man_bits, bias).
fn decode_f64(code: u32, exp_bits: u32, man_bits: u32, bias: i32) -> f64 {
    let sign = if code >> (exp_bits + man_bits) & 1 == 1 { -1.0 } else { 1.0 };
    let e = ((code >> man_bits) & ((1 << exp_bits) - 1)) as i32;
    let m = (code & ((1 << man_bits) - 1)) as f64;
    let scale = (1u64 << man_bits) as f64;
    if e == 0 {
        sign * m / scale * 2f64.powi(1 - bias)
    } else {
        sign * (1.0 + m / scale) * 2f64.powi(e - bias)
    }
}

/// Checks `encode` at every midpoint between consecutive positive finite values of a format
/// (sorted `values` with their codes): the midpoint goes to the even code, one f32 ulp either
/// side goes to the nearer neighbour.
fn check_boundaries(values: &[(f64, u32)], encode: impl Fn(f32) -> u32) {
    for w in values.windows(2) {
        let ((lo, clo), (hi, chi)) = (w[0], w[1]);
        let mid = ((lo + hi) / 2.0) as f32;
        assert_eq!((lo + hi) / 2.0, mid as f64, "midpoint {lo}..{hi} not exact in f32");
        let even = if clo % 2 == 0 { clo } else { chi };
        assert_eq!(encode(mid), even, "tie at {mid} between codes {clo:#x} and {chi:#x}");
        assert_eq!(encode(f32::from_bits(mid.to_bits() - 1)), clo, "below {mid}");
        assert_eq!(encode(f32::from_bits(mid.to_bits() + 1)), chi, "above {mid}");
        assert_eq!(encode(lo as f32), clo);
    }
}

#[test]
fn e4m3_all_codes_decode_and_round_trip() {
    for c in 0..=255u8 {
        let v = e4m3_to_f32(c);
        if c & 0x7F == 0x7F {
            assert!(v.is_nan(), "code {c:#x} must be NaN");
            assert_eq!(f32_to_e4m3(v) & 0x7F, 0x7F);
            continue;
        }
        assert_eq!(v as f64, decode_f64(c as u32, 4, 3, 7), "decode {c:#x}");
        assert_eq!(f32_to_e4m3(v), c, "round trip {c:#x}");
    }
    assert_eq!(e4m3_to_f32(0x7E), E4M3_MAX);
    assert_eq!(e4m3_to_f32(0x01) as f64, 2f64.powi(-9));
}

#[test]
fn e4m3_rounding_boundaries_and_saturation() {
    let values: Vec<(f64, u32)> = (0..0x7Fu32).map(|c| (decode_f64(c, 4, 3, 7), c)).collect();
    check_boundaries(&values, |x| f32_to_e4m3(x) as u32);
    check_boundaries(&values, |x| (f32_to_e4m3(-x) ^ 0x80) as u32);
    for big in [448.5f32, 464.0, 479.9, 480.0, 1e9, f32::MAX, f32::INFINITY] {
        assert_eq!(f32_to_e4m3(big), 0x7E, "{big} saturates");
        assert_eq!(f32_to_e4m3(-big), 0xFE, "-{big} saturates");
    }
    // Below half the smallest subnormal: zero (a tie at exactly 2^-10 goes to even = 0).
    assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0);
    assert_eq!(f32_to_e4m3(1e-30), 0);
    assert_eq!(f32_to_e4m3(-0.0), 0x80);
}

#[test]
fn bf16_all_codes_and_rounding() {
    let mut values = Vec::new();
    for c in 0..=0xFFFFu32 {
        let v = bf16_to_f32(c as u16);
        if v.is_nan() {
            assert!(bf16_to_f32(f32_to_bf16(v)).is_nan());
            continue;
        }
        if v.is_finite() {
            assert_eq!(v as f64, decode_f64(c, 8, 7, 127), "decode {c:#x}");
        }
        assert_eq!(f32_to_bf16(v) as u32, c, "round trip {c:#x}");
        if c < 0x7F80 {
            values.push((v as f64, c));
        }
    }
    check_boundaries(&values, |x| f32_to_bf16(x) as u32);
    assert_eq!(f32_to_bf16(f32::MAX), 0x7F80, "overflow rounds to infinity");
}

#[test]
fn f16_all_codes_and_rounding() {
    let mut values = Vec::new();
    for c in 0..=0xFFFFu32 {
        let v = f16_to_f32(c as u16);
        if v.is_nan() {
            assert!(f16_to_f32(f32_to_f16(v)).is_nan(), "{c:#x}");
            continue;
        }
        if v.is_finite() {
            assert_eq!(v as f64, decode_f64(c, 5, 10, 15), "decode {c:#x}");
        }
        assert_eq!(f32_to_f16(v) as u32, c, "round trip {c:#x}");
        if c < 0x7C00 {
            values.push((v as f64, c));
        }
    }
    check_boundaries(&values, |x| f32_to_f16(x) as u32);
    assert_eq!(f32_to_f16(65520.0), 0x7C00, "tie above 65504 rounds to infinity");
    assert_eq!(f32_to_f16(65519.0), 0x7BFF);
}
