//! The tensor-core GEMM of cuda/gemm.cu (`cuda::matmul_bt_bf16`: mma.sync m16n8k16 through
//! cuda/mma.cuh) against the SIMT reference kernel (`cuda::matmul_bt_naive`) and the CPU
//! (`cpu::matmul_bt`), in the style of tests/cuda_forward.rs: seeded bf16-representable data,
//! odd shapes (m or n = 1, k no multiple of 16, k = 0, partial tiles), every output poisoned
//! with NaN before the run, NaN and Inf inputs.
//!
//! - Fragment layouts: on small integers every product and partial sum is exact in f32, so
//!   the result is the exact (f64) product whatever the order of the sums. The data are not
//!   symmetric: a row and a column swapped in a fragment layout, of the kernel or of the
//!   emulator's twin of the mma (cuda/emu/mma.cpp), changes the result.
//! - Bound elsewhere: |gpu - ref| <= k · 2⁻²³ · Σ_p |x_ip · w_jp| + 2⁻¹²⁶, the tensor core
//!   summing in its own order and precision. Under the emulator (feature `cuda-emu`) the twin
//!   sums the exact products in k order with fmaf, as the naive kernel does: there the two
//!   agree bit for bit, which is checked too.
//!
//! Without a driver or GPU (feature `cuda`) each test prints "skipped: <reason>" and passes.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

#[allow(dead_code)]
mod common;


use common::{Rng, dev, have_gpu, poisoned, say};
use rq_min::compute::cpu;
use rq_min::compute::cuda;
use rq_min::numerics::round_bf16;

const EPS: f64 = f32::EPSILON as f64;

/// `out` of the tensor-core GEMM, from a poisoned buffer.
fn gemm(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = poisoned(m * n);
    cuda::matmul_bt_bf16(&dev(x), &dev(w), m, k, n, &mut out).unwrap();
    out.to_vec().unwrap()
}

#[test]
fn small_integers_give_the_exact_product() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x6E44_0001);
    let mut ints = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.below(17) as f32 - 8.0).collect() };
    // (m, k, n): one m16n8k16; a whole 64 x 64 tile (every warp and fragment) over two k-tiles;
    // partial tiles with k = 16 + 8 (a k-step half in the matrix).
    for &(m, k, n) in &[(16, 16, 8), (64, 64, 64), (33, 24, 17)] {
        let (x, w) = (ints(m * k), ints(n * k));
        let got = gemm(&x, &w, m, k, n);
        for (e, &g) in got.iter().enumerate() {
            let (r, c) = (e / n, e % n);
            let exact: f64 = (0..k).map(|p| f64::from(x[r * k + p]) * f64::from(w[c * k + p])).sum();
            assert_eq!(f64::from(g), exact, "{m}x{k}x{n}: out[{r}, {c}]");
        }
        say(&format!("| matmul_bt_bf16 | {m}x{k}x{n} small integers | exact |"));
    }
}

/// Max over the elements of |got - want| / bound (k · eps · Σ|x·w| + 2⁻¹²⁶), asserting NaN
/// exactly where `want` has NaN and every ratio <= 1. Equal values (infinities too) are 0.
fn check(what: &str, got: &[f32], want: &[f32], abs_dot: &[f64], k: usize) -> f64 {
    let mut worst = 0f64;
    for (e, (&g, &c)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.is_nan(), c.is_nan(), "{what}: element {e}: gpu {g}, ref {c} (NaN where the other is not)");
        if g.is_nan() || g == c {
            continue;
        }
        let bound = k as f64 * EPS * abs_dot[e] + f64::from(f32::MIN_POSITIVE);
        let ratio = (f64::from(g) - f64::from(c)).abs() / bound;
        assert!(ratio <= 1.0, "{what}: element {e}: gpu {g}, ref {c}, err {ratio:.3} x the bound {bound:.3e}");
        worst = worst.max(ratio);
    }
    say(&format!("| matmul_bt_bf16 | {what} | max err / bound {worst:.2e} |"));
    worst
}

#[test]
fn matches_naive_kernel_and_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x6E44_0002);
    // (m, k, n): single elements, one mma, k no multiple of 16 and partial tiles, several
    // blocks, a long k with a single block (64 x 4096 x 64), m = 1, n = 1, k = 0.
    let shapes = [(1, 1, 1), (16, 16, 8), (17, 33, 65), (130, 200, 72), (64, 4096, 64), (1, 70, 130), (70, 19, 1), (5, 0, 7)];
    for &(m, k, n) in &shapes {
        let mut bf16_normals = |len: usize, scale: f32| -> Vec<f32> { (0..len).map(|_| round_bf16(rng.normal() * scale)).collect() };
        let x0 = bf16_normals(m * k, 1.0);
        let w = bf16_normals(n * k, 0.05);
        // One input value of row `bad` set to NaN or Inf: that output row is all NaN / infinite.
        let bad = m / 2;
        for special in [None, Some(f32::NAN), Some(f32::INFINITY)] {
            if special.is_some() && k == 0 {
                continue;
            }
            let mut x = x0.clone();
            if let Some(v) = special {
                x[bad * k + k / 3] = v;
            }
            let mut want = vec![0f32; m * n];
            cpu::matmul_bt(&x, &w, m, k, n, &mut want);
            let got = gemm(&x, &w, m, k, n);
            let mut naive = poisoned(m * n);
            cuda::matmul_bt_naive(&dev(&x), &dev(&w), m, k, n, &mut naive).unwrap();
            let naive = naive.to_vec().unwrap();
            let abs_dot: Vec<f64> = (0..m * n)
                .map(|e| {
                    let (r, c) = (e / n, e % n);
                    (0..k).map(|p| (f64::from(x[r * k + p]) * f64::from(w[c * k + p])).abs()).sum()
                })
                .collect();
            let shape = format!("{m}x{k}x{n}{}", special.map_or(String::new(), |v| format!(" {v} in row {bad}")));
            check(&format!("{shape} vs cpu"), &got, &want, &abs_dot, k);
            let err = check(&format!("{shape} vs naive kernel"), &got, &naive, &abs_dot, k);
            if cfg!(feature = "cuda-emu") {
                assert_eq!(err, 0.0, "{shape}: the emulated mma sums in k order, as the naive kernel");
            }
            for (e, g) in got.iter().enumerate() {
                let row = e / n;
                match special {
                    Some(v) if row == bad && v.is_nan() => assert!(g.is_nan(), "{shape}: out[{row}, {}] = {g}", e % n),
                    Some(_) if row == bad => assert!(g.is_infinite(), "{shape}: out[{row}, {}] = {g}", e % n),
                    _ => assert!(g.is_finite(), "{shape}: out[{row}, {}] = {g}", e % n),
                }
            }
        }
    }
}

#[test]
fn wrong_lengths_are_usage_errors() {
    if !have_gpu() {
        return;
    }
    let (x, w) = (dev(&[1.0; 6]), dev(&[1.0; 6]));
    let mut out = poisoned(5);
    let err = cuda::matmul_bt_bf16(&x, &w, 2, 3, 2, &mut out).unwrap_err().to_string();
    assert!(err.contains("rq_matmul_bt_bf16_f32: out holds 5 values, the shape needs 4"), "{err}");
    let err = cuda::matmul_bt_bf16(&x, &w, 3, 3, 2, &mut out).unwrap_err().to_string();
    assert!(err.contains("rq_matmul_bt_bf16_f32: x holds 6 values, the shape needs 9"), "{err}");
}

/// `all_bf16`, which sends a product to the tensor cores only when rounding the operands to
/// bf16 changes nothing.
#[test]
fn all_bf16_detects_any_value_that_is_not_bf16() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0C0C);
    let exact: Vec<f32> = (0..5000).map(|_| round_bf16(rng.normal() * 3.0)).collect();
    assert!(cuda::all_bf16(&dev(&exact)).unwrap(), "bf16 values");
    assert!(cuda::all_bf16(&dev(&[])).unwrap(), "no values");
    let mut special = exact.clone();
    special[17] = f32::NAN;
    special[18] = f32::from_bits(0x7FC0_1234); // a NaN whose payload is below the bf16 bits
    special[19] = f32::INFINITY;
    special[20] = -0.0;
    assert!(cuda::all_bf16(&dev(&special)).unwrap(), "NaN, Inf and -0 are bf16 values");
    for at in [0, 2047, 4999] {
        let mut one_off = exact.clone();
        one_off[at] = f32::from_bits(one_off[at].to_bits() | 1); // one ulp of f32 away
        assert!(!cuda::all_bf16(&dev(&one_off)).unwrap(), "an f32 value at {at}");
    }
}
