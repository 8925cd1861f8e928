//! NVFP4, INT8 and INT4 math (src/quant/nvfp4.rs, src/quant/int.rs): E2M1 codes and rounding
//! boundaries against f64, byte-exact NVFP4 export of rq-tiny against ModelOpt 0.47's, INT8 /
//! INT4 scales, codes and packing against the reference `int8_sq` / `int4_awq` / `w4a8_awq`
//! exports, and the fake-quant kernels against f64 recomputations of the spec formulas.

mod common;

use rq_min::numerics::{e4m3_to_f32, round_bf16};
use rq_min::quant::int::*;
use rq_min::quant::nvfp4::{self, e2m1_code, e2m1_value};
use rq_min::io::safetensors::{Checkpoint, Dtype};

const GRID: [f64; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// E2M1 magnitude index of |v| in f64: the nearest grid value, ties to the even index,
/// anything beyond 6 saturating.
fn ref_e2m1_index(a: f64) -> u8 {
    let mut best = 0usize;
    for (i, g) in GRID.iter().enumerate().skip(1) {
        let (d, db) = ((a - g).abs(), (a - GRID[best]).abs());
        if d < db || (d == db && i % 2 == 0) {
            best = i;
        }
    }
    best as u8
}

/// E4M3 value nearest to t >= 0 in f64 (ties to the even code), saturating at 448.
fn ref_e4m3(t: f64) -> f64 {
    let mut best = (0u32, 0.0f64);
    for c in 1..0x7Fu32 {
        let (e, m) = ((c >> 3) as i32, (c & 7) as f64);
        let v = if e == 0 { m / 8.0 * 2f64.powi(-6) } else { (1.0 + m / 8.0) * 2f64.powi(e - 7) };
        let (d, db) = ((t - v).abs(), (t - best.1).abs());
        if d < db || (d == db && c % 2 == 0) {
            best = (c, v);
        }
    }
    best.1
}

/// Deterministic pseudo-random f32 in [-1, 1) (xorshift), so the tests need no crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn up(x: f32) -> f32 {
    f32::from_bits(x.to_bits() + 1)
}
fn down(x: f32) -> f32 {
    f32::from_bits(x.to_bits() - 1)
}

#[test]
fn e2m1_codes_decode() {
    for c in 0..16u8 {
        let mag = GRID[(c & 7) as usize];
        let v = if c & 8 != 0 { -mag } else { mag };
        assert_eq!(e2m1_value(c) as f64, v, "code {c}");
        // Every value encodes back to its code, except "-0" (code 8) which decodes to +0.
        let back = if c == 8 { 0 } else { c };
        assert_eq!(e2m1_code(e2m1_value(c)), back, "code {c}");
        assert_eq!(e2m1_value(c | 0xF0), e2m1_value(c), "only the low nibble counts");
    }
}

#[test]
fn e2m1_rounding_boundaries_saturation_and_signed_zero() {
    let bounds = [0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];
    let even = [0u8, 2, 2, 4, 4, 6, 6];
    for (i, &b) in bounds.iter().enumerate() {
        assert_eq!(e2m1_code(b), even[i], "tie at {b}");
        assert_eq!(e2m1_code(down(b)), i as u8, "below {b}");
        assert_eq!(e2m1_code(up(b)), i as u8 + 1, "above {b}");
        for v in [b, down(b), up(b)] {
            assert_eq!(e2m1_code(v), ref_e2m1_index(v as f64), "{v}");
            assert_eq!(e2m1_code(-v), 8 | ref_e2m1_index(v as f64), "{}", -v);
        }
    }
    // A sweep of every f32 step of 2^-12 up to 8 and random values, against f64.
    let mut rng = Rng(7);
    for v in (0..=8 * 4096).map(|k| k as f32 / 4096.0).chain((0..100_000).map(|_| rng.next().abs() * 8.0)) {
        assert_eq!(e2m1_code(v), ref_e2m1_index(v as f64), "{v}");
    }
    for v in [6.0f32, up(6.0), 7.0, 1e30, f32::INFINITY, f32::MAX] {
        assert_eq!(e2m1_code(v), 7, "{v} saturates");
        assert_eq!(e2m1_code(-v), 15, "{} saturates", -v);
    }
    // ModelOpt's sign bit is `v < 0`: every negative value, even one rounding to 0, is "-0".
    assert_eq!(e2m1_code(0.0), 0);
    assert_eq!(e2m1_code(-0.0), 0);
    for v in [-f32::from_bits(1), -1e-30, -0.1, -0.25] {
        assert_eq!(e2m1_code(v), 8, "{v}");
    }
    assert_eq!(e2m1_code(-up(0.25)), 9);
    assert_eq!(e2m1_value(8), 0.0);
}

#[test]
fn nvfp4_packing_and_block_layout() {
    // One row of 32: block 0 holds chosen values (amax 6, none near a rounding boundary),
    // block 1 is all zero.
    let mut w = vec![0.0f32; 32];
    w[..16].copy_from_slice(&[-6.0, -5.2, -4.4, -3.8, 0.0, 0.6, 1.1, 1.6, 2.2, 2.8, 3.2, 3.9, 0.1, -0.1, -0.3, 5.6]);
    let q = nvfp4::quantize_weight("t", &w, 1, 32, 6.0).unwrap();
    assert_eq!(q.weight_scale_2, 6.0 * (1.0f32 / 2688.0));
    // Block 0's amax 6 maps to 448 (0x7E); block 1 is all zero: scale 1.0 (0x38), codes 0.
    assert_eq!(q.block_scales, vec![0x7E, 0x38]);
    // Codes 15,15 | 14,14 | 0,1 | 2,3 | 4,5 | 5,6 | 0,8 ("-0") | 9,7; element 2j in the low nibble.
    assert_eq!(&q.packed[..8], &[0xFF, 0xEE, 0x10, 0x32, 0x54, 0x65, 0x80, 0x79]);
    assert!(q.packed[8..].iter().all(|&b| b == 0));
    let d = nvfp4::dequantize_weight(&q.packed, &q.block_scales, q.weight_scale_2, 1, 32);
    let scale = 448.0 * q.weight_scale_2;
    assert_eq!(d[0], -6.0 * scale);
    assert_eq!(d[9], 3.0 * scale);
    assert_eq!(d[13], 0.0);
    assert!(d[16..].iter().all(|&v| v == 0.0));
}

#[test]
fn shape_errors_name_tensor_shape_and_block() {
    let e = nvfp4::quantize_weight("model.x.q_proj", &[0.5; 80], 2, 40, 1.0).unwrap_err().to_string();
    assert!(e.contains("model.x.q_proj") && e.contains("[2, 40]") && e.contains("16"), "{e}");
    let e = int4_quantize("m.w", &[0.5; 3 * 128], 3, 128, 128, None, Dtype::BF16).unwrap_err().to_string();
    assert!(e.contains("m.w") && e.contains("[3, 128]") && e.contains("128") && e.contains("even"), "{e}");
    let e = int4_quantize("m.w", &[0.5; 2 * 200], 2, 200, 128, None, Dtype::BF16).unwrap_err().to_string();
    assert!(e.contains("m.w") && e.contains("[2, 200]") && e.contains("group size 128"), "{e}");
    let e = int4_quantize("m.w", &[0.5; 2 * 128], 2, 128, 128, Some(&[1.0]), Dtype::BF16).unwrap_err().to_string();
    assert!(e.contains("m.w") && e.contains("block amax"), "{e}");
    let e = int8_quantize_rows("m.w", &[0.5; 5], 2, 3, Dtype::BF16).unwrap_err().to_string();
    assert!(e.contains("m.w") && e.contains("[2, 3]"), "{e}");
}

/// The 56 linears of rq-tiny as (layer, export-fused group of module names).
fn linear_groups() -> Vec<Vec<String>> {
    let groups: [&[&str]; 4] = [
        &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        &["self_attn.o_proj"],
        &["mlp.gate_proj", "mlp.up_proj"],
        &["mlp.down_proj"],
    ];
    (0..8)
        .flat_map(|l| groups.iter().map(move |g| g.iter().map(|m| format!("model.layers.{l}.{m}")).collect()))
        .collect()
}

fn f32_scalar(ck: &Checkpoint, name: &str) -> f32 {
    let v = ck.tensor(name).unwrap();
    assert_eq!((v.dtype, v.shape), (Dtype::F32, &[] as &[usize]), "{name}");
    f32::from_le_bytes(v.data.try_into().unwrap())
}

fn f32_vec(ck: &Checkpoint, name: &str) -> Vec<f32> {
    let v = ck.tensor(name).unwrap();
    assert_eq!(v.dtype, Dtype::F32, "{name}");
    v.to_f32().unwrap()
}

#[test]
fn nvfp4_export_matches_modelopt_bytes() {
    let Some(shared) = common::shared_dir() else { return };
    let model = Checkpoint::open(&shared.join("models/rq-tiny")).unwrap();
    let reference = Checkpoint::open(&shared.join("reference/modelopt-0.47/rq-tiny/nvfp4")).unwrap();
    let (mut linears, mut bytes, mut scales, mut worst) = (0, 0usize, 0usize, 0f64);
    for group in linear_groups() {
        let weights: Vec<(Vec<f32>, usize, usize)> = group
            .iter()
            .map(|m| {
                let t = model.tensor(&format!("{m}.weight")).unwrap();
                assert_eq!(t.dtype, Dtype::BF16);
                (t.to_f32().unwrap(), t.shape[0], t.shape[1])
            })
            .collect();
        let global = weights.iter().map(|(w, _, _)| rq_min::quant::fp8::absmax(w)).fold(0.0f32, f32::max);
        for (m, (w, out, inp)) in group.iter().zip(&weights) {
            let (out, inp) = (*out, *inp);
            let q = nvfp4::quantize_weight(m, w, out, inp, global).unwrap();
            let rw = reference.tensor(&format!("{m}.weight")).unwrap();
            let rs = reference.tensor(&format!("{m}.weight_scale")).unwrap();
            assert_eq!((rw.dtype, rw.shape), (Dtype::U8, &[out, inp / 2][..]), "{m}");
            assert_eq!((rs.dtype, rs.shape), (Dtype::F8E4M3, &[out, inp / 16][..]), "{m}");
            let ws2 = f32_scalar(&reference, &format!("{m}.weight_scale_2"));
            assert_eq!(q.weight_scale_2.to_bits(), ws2.to_bits(), "{m}.weight_scale_2");
            let scale_diff = q.block_scales.iter().zip(rs.data).filter(|(a, b)| a != b).count();
            assert_eq!(scale_diff, 0, "{m}.weight_scale: {scale_diff} of {} bytes differ", rs.data.len());
            let code_diff = q.packed.iter().zip(rw.data).filter(|(a, b)| a != b).count();
            assert_eq!(code_diff, 0, "{m}.weight: {code_diff} of {} bytes differ", rw.data.len());
            // Dequantized weights against e2m1 · scale · scale_2 in f64.
            let d = nvfp4::dequantize_weight(&q.packed, &q.block_scales, q.weight_scale_2, out, inp);
            for (i, &v) in d.iter().enumerate() {
                let (r, c) = (i / inp, i % inp);
                let code = (q.packed[r * inp / 2 + c / 2] >> (4 * (c % 2))) & 0xF;
                let mag = GRID[(code & 7) as usize] * if code & 8 != 0 { -1.0 } else { 1.0 };
                let want = mag * e4m3_to_f32(q.block_scales[r * inp / 16 + c / 16]) as f64 * q.weight_scale_2 as f64;
                let rel = if want == 0.0 { v.abs() as f64 } else { (v as f64 - want).abs() / want.abs() };
                assert!(rel <= 2.0 * f32::EPSILON as f64, "{m}[{r},{c}]: {v} vs {want}");
                // Quantization error: at most one E2M1 step unit (half the 4 -> 6 gap) of the block scale.
                let unit = e4m3_to_f32(q.block_scales[r * inp / 16 + c / 16]) as f64 * q.weight_scale_2 as f64;
                let err = (v as f64 - w[i] as f64).abs() / unit;
                assert!(err <= 1.0 + 1e-6, "{m}[{r},{c}]: {} -> {v}", w[i]);
                worst = worst.max(err);
            }
            // input_scale: a bf16 activation amax times f32(1/2688).
            let is = f32_scalar(&reference, &format!("{m}.input_scale"));
            assert_eq!(
                nvfp4::input_scale(round_bf16(is * 2688.0), Dtype::BF16).to_bits(),
                is.to_bits(),
                "{m}.input_scale"
            );
            linears += 1;
            bytes += rw.data.len();
            scales += rs.data.len();
        }
    }
    println!("nvfp4: {linears} linears, {bytes} weight bytes and {scales} block scales identical; worst |w - deq| = {worst:.3} block-scale units");
    assert_eq!((linears, bytes, scales), (56, 3_145_728, 393_216));
}

#[test]
fn int8_sq_requantizes_to_the_reference() {
    let Some(shared) = common::shared_dir() else { return };
    let reference = Checkpoint::open(&shared.join("reference/modelopt-0.47/rq-tiny/int8_sq")).unwrap();
    let (mut linears, mut codes, mut rows) = (0, 0usize, 0usize);
    for m in linear_groups().concat() {
        let t = reference.tensor(&format!("{m}.weight")).unwrap();
        assert_eq!(t.dtype, Dtype::I8);
        let (out, inp) = (t.shape[0], t.shape[1]);
        let q: Vec<i8> = t.data.iter().map(|&b| b as i8).collect();
        let s = f32_vec(&reference, &format!("{m}.weight_scale"));
        assert_eq!(s.len(), out);
        // ModelOpt's smoothed weight W' is bf16: rebuild it from codes and scales, in bf16.
        let w: Vec<f32> = q.iter().enumerate().map(|(i, &c)| round_bf16(c as f32 * s[i / inp])).collect();
        let (ours, our_s) = int8_quantize_rows(&m, &w, out, inp, Dtype::BF16).unwrap();
        let bad_s = our_s.iter().zip(&s).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(bad_s, 0, "{m}.weight_scale: {bad_s} of {out} differ");
        assert_eq!(ours, q, "{m}.weight");
        // Each reference scale is a bf16 amax times f32(1/127).
        for &x in &s {
            assert_eq!((round_bf16(x * 127.0) * (1.0f32 / 127.0)).to_bits(), x.to_bits(), "{m}");
        }
        let is = f32_scalar(&reference, &format!("{m}.input_scale"));
        assert_eq!(is.to_bits(), int8_input_scale(1.0, Dtype::BF16).to_bits(), "{m}.input_scale");
        linears += 1;
        codes += q.len();
        rows += out;
    }
    println!("int8_sq: {linears} linears, {codes} codes and {rows} row scales reproduced");
    assert_eq!(linears, 56);
}

/// INT4 exports: the reference codes unpack and re-pack to the same bytes; quantizing the
/// dequantized weight with the block amax 7·scale reproduces the codes and scales.
fn check_int4_export(folder: &str) {
    let Some(shared) = common::shared_dir() else { return };
    let reference = Checkpoint::open(&shared.join("reference/modelopt-0.47/rq-tiny").join(folder)).unwrap();
    let (mut linears, mut bytes, mut bf16_amax, mut nblocks, mut min_codes) = (0, 0usize, 0usize, 0usize, 0usize);
    for m in linear_groups().concat() {
        let t = reference.tensor(&format!("{m}.weight")).unwrap();
        let s = f32_vec(&reference, &format!("{m}.weight_scale"));
        let (out, inp) = (t.shape[0] * 2, t.shape[1]);
        assert_eq!(t.dtype, Dtype::U8);
        assert_eq!(s.len(), out * inp / 128, "{m}");
        let q = int4_unpack(t.data, out, inp);
        assert_eq!(int4_pack(&q, out, inp), t.data, "{m}: unpack + pack");
        // Row 2j is the low nibble of byte row j.
        assert_eq!(q[inp] as u8 & 0xF, t.data[0] >> 4);
        min_codes += q.iter().filter(|&&c| c == -8).count();
        let w = int4_dequantize(t.data, &s, out, inp, 128);
        let amax: Vec<f32> = s.iter().map(|&x| x * 7.0).collect();
        let (packed, ours) = int4_quantize(&m, &w, out, inp, 128, Some(&amax), Dtype::BF16).unwrap();
        let bad_s = ours.iter().zip(&s).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(bad_s, 0, "{m}.weight_scale: {bad_s} of {} differ", s.len());
        assert!(packed == t.data, "{m}.weight: requantized codes differ");
        bf16_amax += s.iter().filter(|&&x| (round_bf16(x * 7.0) * (1.0f32 / 7.0)).to_bits() == x.to_bits()).count();
        nblocks += s.len();
        linears += 1;
        bytes += t.data.len();
    }
    println!("{folder}: {linears} linears, {bytes} bytes re-packed and requantized; {bf16_amax}/{nblocks} scales = bf16 amax x f32(1/7); {min_codes} codes of -8 (clipped groups)");
    assert_eq!(linears, 56);
    assert_eq!(bf16_amax, nblocks);
}

#[test]
fn int4_awq_packing_and_requantization() {
    check_int4_export("int4_awq");
}

#[test]
fn w4a8_awq_packing_and_requantization() {
    check_int4_export("w4a8_awq");
}

#[test]
fn zero_rows_and_groups_get_scale_one() {
    assert_eq!(7.0f32 * (1.0f32 / 7.0), 1.0);
    assert_eq!(127.0f32 * (1.0f32 / 127.0), 1.0);
    let mut w = vec![0.0f32; 4 * 256];
    w[256..512].iter_mut().enumerate().for_each(|(i, v)| *v = i as f32 / 64.0 - 2.0);
    let (q, s) = int8_quantize_rows("z", &w, 4, 256, Dtype::BF16).unwrap();
    assert_eq!(s, vec![1.0, 2.0 * (1.0f32 / 127.0), 1.0, 1.0]);
    assert!(q[..256].iter().chain(&q[512..]).all(|&c| c == 0));
    assert_eq!((q[256], q[511]), (-127, 126)); // -2 and 1.984375 = 126.0 steps
    let (p, s4) = int4_quantize("z", &w, 4, 256, 128, None, Dtype::BF16).unwrap();
    assert_eq!(s4[0], 1.0);
    assert_eq!(s4[2], 2.0 * (1.0f32 / 7.0));
    assert_eq!(p.len(), 2 * 256);
    assert_eq!(int8_input_scale(0.0, Dtype::BF16), 1.0);
    assert_eq!(nvfp4::input_scale(0.0, Dtype::BF16), 6.0 * (1.0f32 / 2688.0));
    // An all-zero NVFP4 weight: valid scales, codes 0.
    let z = nvfp4::quantize_weight("z", &[0.0; 64], 2, 32, 0.0).unwrap();
    assert!(z.packed.iter().all(|&b| b == 0) && z.block_scales.iter().all(|&b| b == 0x38));
}

/// f64 recomputation of the NVFP4 fake-quant kernel (spec/algorithms.md §4.3) for one row.
fn ref_nvfp4_row(x: &[f32], global_amax: f32) -> Vec<f64> {
    let gs = (global_amax * (1.0f32 / 2688.0)) as f64;
    let gs_safe = if gs > 0.0 { gs } else { 1e-12 };
    let mut y = Vec::new();
    for block in x.chunks(16) {
        let bmax = block.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
        let t = (bmax / (6.0 * gs_safe) as f32 as f64).min(448.0);
        let mut sb = (ref_e4m3(t) * gs) as f32 as f64; // the kernel's f32 product
        if sb < 1e-5f32 as f64 {
            sb = 1.0;
        }
        for &v in block {
            let m = GRID[ref_e2m1_index(v.abs() as f64 / sb) as usize] * sb;
            y.push(if v >= 0.0 { m } else { -m });
        }
    }
    y
}

#[test]
fn nvfp4_fake_quant_matches_f64() {
    let mut rng = Rng(12345);
    let cols = 40; // two full blocks and a partial one of 8
    for (case, global_amax) in [(0, None), (1, Some(0.5f32)), (2, Some(0.0)), (3, Some(1e-9)), (4, Some(3.0))] {
        let mut x = rng.vec(6 * cols, 2.0);
        x[cols..cols + 16].fill(0.0); // an all-zero block
        x[2 * cols + 32..3 * cols].fill(0.0); // an all-zero partial block
        x[3 * cols + 5] = 9.0; // beyond amax when global_amax is given smaller
        let amax = global_amax.unwrap_or_else(|| rq_min::quant::fp8::absmax(&x));
        let want: Vec<f64> = x.chunks(cols).flat_map(|r| ref_nvfp4_row(r, amax)).collect();
        let mut y = x.clone();
        nvfp4::fake_quant(&mut y, cols, amax);
        for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
            assert!((a as f64 - b).abs() <= 1e-6 * b.abs(), "case {case} [{i}]: x {} -> {a} vs {b}", x[i]);
        }
        assert!(y[cols..cols + 16].iter().all(|&v| v == 0.0));
        if case == 1 {
            // Saturation: a block whose max exceeds the global amax gets scale 448·gs, and 9.0 clips to 6·that.
            let sb = 448.0 * (0.5f32 * (1.0 / 2688.0));
            assert_eq!(y[3 * cols + 5], 6.0 * sb);
        }
        if case == 3 {
            // The absolute 1e-5 guard: scales below it become 1.0, so values ≤ 0.25 vanish.
            assert!(x.iter().zip(&y).all(|(&a, &b)| a.abs() > 0.25 || b == 0.0));
        }
    }
}

#[test]
fn int_fake_quant_matches_f64() {
    let mut rng = Rng(99);
    let x = rng.vec(1000, 3.0);
    for amax in [2.5f32, 1.0, 0.1, 1e-8, 0.0] {
        let mut y = x.clone();
        int8_fake_quant(&mut y, amax);
        for (&a, &b) in x.iter().zip(&y) {
            let want = if (amax as f64) < 2f64.powi(-24) {
                0.0
            } else {
                let s = (127.0 / amax) as f64; // the kernel's f32 multiplier
                (a as f64 * s).round_ties_even().clamp(-128.0, 127.0) / s
            };
            assert!((b as f64 - want).abs() <= 1e-6 * want.abs(), "amax {amax}: {a} -> {b} vs {want}");
        }
        if amax == 1.0 {
            assert_eq!(y.iter().cloned().fold(f32::MIN, f32::max), 1.0); // clamps at +127 steps
            assert_eq!(y.iter().cloned().fold(f32::MAX, f32::min), -128.0 / 127.0);
            // and -128
        }
    }

    // INT4 groups of 64 over rows of 200 (the last group of 8 acts as zero-padded), with
    // stored block amaxes below the data (clipping to -8 / +7), an all-zero group and amax 0.
    let (out, inp, group) = (3, 200, 64);
    let nb = 4;
    let mut w = rng.vec(out * inp, 1.0);
    w[inp..inp + 64].fill(0.0);
    let mut amax: Vec<f32> = w
        .chunks(inp)
        .flat_map(|r| r.chunks(group).map(|g| g.iter().fold(0f32, |m, v| m.max(v.abs())) * 0.7).collect::<Vec<_>>())
        .collect();
    amax[2] = 0.0;
    for given in [None, Some(&amax[..])] {
        let mut y = w.clone();
        int4_fake_quant(&mut y, out, inp, group, given);
        let (mut lo, mut hi) = (0, 0);
        for (i, (&a, &b)) in w.iter().zip(&y).enumerate() {
            let (o, c) = (i / inp, i % inp);
            let g = &w[o * inp + c / group * group..(o * inp + (c / group + 1) * group).min((o + 1) * inp)];
            let am = given.map_or_else(|| g.iter().fold(0f32, |m, v| m.max(v.abs())), |a| a[o * nb + c / group]);
            let want = if (am as f64) < 2f64.powi(-24) {
                0.0
            } else {
                let s = (7.0 / am) as f64;
                let q = (a as f64 * s).round_ties_even().clamp(-8.0, 7.0);
                lo += (q == -8.0) as usize;
                hi += (q == 7.0) as usize;
                q / s
            };
            assert!((b as f64 - want).abs() <= 1e-6 * want.abs(), "[{o},{c}] {a} -> {b} vs {want}");
        }
        if given.is_some() {
            assert!(lo > 0 && hi > 0, "clipping reaches both ends");
            assert!(y[2 * group..3 * group].iter().all(|&v| v == 0.0), "amax 0 zeroes the group");
        }
    }
}
