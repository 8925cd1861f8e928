#![cfg(any(feature = "cuda", feature = "cuda-emu"))]
//! The backward kernels of auto-quantize's gradient score (cuda/backward.cu, and the weighted
//! sq_err_rows of cuda/awq.cu) against their CPU oracles (src/compute/cpu/grad.rs, reduce.rs),
//! bit for bit: every f32 operation is IEEE in the CPU's order and every f64 sum is warp_sum's.
//! The one exception is on a GPU, where expf / tanhf / log are CUDA's, not glibc's: there the
//! SiLU and GELU derivatives and the cross-entropy are compared within a few f32 ulps (under the
//! emulator they too are bit-identical). NaN positions must match.
//! Data: seeded random values with outliers, zeros and specials (NaN, ±inf where the oracle
//! defines them), odd shapes (rows not a multiple of the 8 warps of a block, rows of 1, 31, 33, 77
//! and 300 values), outputs poisoned first; every argument error is an `Err`, not a crash.
//!
//! Without a driver or GPU (feature `cuda`) each test prints "skipped: <reason>" and passes.

#[allow(dead_code)]
mod common;

use common::{dev, have_gpu, poisoned, same_bits, values, Rng};
use rq_min::compute::cpu::{
    act_grad_mul, add_in_place, attention_ds, copy_columns, norm_backward_add, scale_rows, softcap_grad, softmax_rows, sq_err_row,
    swap_rotary_halves, transpose, warp_sum, xent_grad_row,
};
use rq_min::compute::cuda::{self, DeviceBuffer};
use rq_min::compute::{Activation, NormKind};
use rq_min::numerics::round_bf16;

const SHAPES: [(usize, usize); 6] = [(1, 1), (5, 31), (17, 33), (3, 77), (1, 300), (9, 2)];
const ACTS: [Activation; 4] = [Activation::Silu, Activation::GeluTanh, Activation::Relu2, Activation::Gelu];



fn same_bits_f64(want: &[f64], got: &[f64], what: &str) {
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{what}[{i}]: cpu {a:e} device {b:e}");
    }
}

/// Bit for bit under the emulator; on a GPU (CUDA's expf / tanhf / log) within `ulps` f32 ulps
/// of the row's largest magnitude, NaN and infinities where the CPU has them.
fn same_up_to_libm(want: &[f32], got: &[f32], ulps: f32, what: &str) {
    if cfg!(feature = "cuda-emu") {
        return same_bits(want, got, what);
    }
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    let scale = want.iter().filter(|v| v.is_finite()).fold(f32::MIN_POSITIVE, |m, v| m.max(v.abs()));
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        let ok = if a.is_finite() { (a - b).abs() <= ulps * f32::EPSILON * scale } else { a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()) };
        assert!(ok, "{what}[{i}]: cpu {a:e} device {b:e}");
    }
}

#[test]
fn transpose_matches_the_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(51);
    for (rows, cols) in SHAPES.into_iter().chain([(33, 65), (70, 3)]) {
        let mut a = values(&mut rng, rows * cols, 1.0);
        a[rows * cols / 2] = f32::NAN;
        let mut want = vec![0f32; a.len()];
        transpose(&a, rows, cols, &mut want);
        let mut got = poisoned(a.len());
        cuda::transpose(&dev(&a), rows, cols, &mut got).unwrap();
        same_bits(&want, &got.to_vec().unwrap(), &format!("transpose [{rows}, {cols}]"));
    }
    let mut out = poisoned(6);
    assert!(cuda::transpose(&dev(&[0f32; 5]), 2, 3, &mut out).is_err(), "a is not [rows, cols]");
    assert!(cuda::transpose(&dev(&[0f32; 6]), 2, 3, &mut poisoned(5)).is_err(), "out is not [cols, rows]");
    assert!(cuda::transpose(&dev(&[0f32; 0]), usize::MAX, 2, &mut poisoned(0)).is_err(), "an overflowing shape");
}

#[test]
fn copy_columns_matches_the_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(52);
    // (rows, src_width, src_c0, dst_width, dst_c0, n)
    for (rows, sw, sc0, dw, dc0, n) in
        [(1, 1, 0, 1, 0, 1), (5, 77, 5, 33, 1, 31), (17, 31, 0, 300, 269, 31), (3, 300, 223, 77, 0, 77), (9, 33, 33, 2, 2, 0)]
    {
        let mut src = values(&mut rng, rows * sw, 1.0);
        src[0] = f32::NAN;
        let dst = values(&mut rng, rows * dw, 3.0); // columns outside the copy must stay
        let mut want = dst.clone();
        copy_columns(&src, sw, sc0, &mut want, dw, dc0, n);
        let mut got = dev(&dst);
        cuda::copy_columns(&dev(&src), sw, sc0, &mut got, dw, dc0, n).unwrap();
        same_bits(&want, &got.to_vec().unwrap(), &format!("copy_columns {rows} rows {sw}[{sc0}..+{n}] -> {dw}[{dc0}..]"));
    }
    let src = dev(&[0f32; 12]);
    let mut dst = poisoned(8);
    assert!(cuda::copy_columns(&src, 4, 3, &mut dst, 4, 0, 2).is_err(), "source columns outside the rows");
    assert!(cuda::copy_columns(&src, 4, 0, &mut dst, 4, 3, 2).is_err(), "destination columns outside the rows");
    assert!(cuda::copy_columns(&src, 4, 0, &mut dst, 4, 0, usize::MAX).is_err(), "an overflowing column range");
    assert!(cuda::copy_columns(&src, 5, 0, &mut dst, 4, 0, 1).is_err(), "the source is not whole rows");
    assert!(cuda::copy_columns(&src, 4, 0, &mut dst, 2, 0, 1).is_err(), "row counts differ");
    assert!(cuda::copy_columns(&src, 0, 0, &mut dst, 4, 0, 0).is_err(), "rows of 0 values");
}

#[test]
fn add_at_matches_the_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(53);
    let x = values(&mut rng, 300, 1.0);
    for (offset, len) in [(0, 300), (5, 77), (223, 77), (299, 1), (300, 0), (17, 31)] {
        let mut y = values(&mut rng, len, 2.0);
        if len > 3 {
            y[3] = f32::NAN;
        }
        let mut want = x.clone();
        add_in_place(&mut want[offset..offset + len], &y);
        let mut got = dev(&x);
        cuda::add_at(&mut got, offset, &dev(&y)).unwrap();
        same_bits(&want, &got.to_vec().unwrap(), &format!("add_at {offset} +{len}"));
    }
    let mut got = dev(&x);
    assert!(cuda::add_at(&mut got, 224, &dev(&[0f32; 77])).is_err(), "past the end");
    assert!(cuda::add_at(&mut got, usize::MAX, &dev(&[0f32; 2])).is_err(), "an overflowing offset");
}

#[test]
fn softmax_rows_match_the_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(54);
    // (rows, n_keys, t0, lo, window, scale, softcap, alibi_slope): blocks of keys as the attention
    // backward cuts them, with and without Gemma2's soft cap and ALiBi.
    let cases = [
        (1, 1, 0, 0, None, 1.0, None, None),
        (5, 5, 0, 0, None, 0.125, None, None),
        (17, 57, 40, 0, None, 0.35, None, None),
        (17, 24, 40, 33, Some(8), 0.35, None, None),        // a sliding window, the block from the first row's first key
        (17, 40, 40, 30, Some(8), 0.35, None, None),        // keys before the window too
        (5, 9, 3, 0, Some(1000), 0.5, None, None),          // a window wider than the sequence
        (9, 12, 3, 3, Some(1), 1.0, None, None),            // each query sees only itself
        (1, 300, 299, 0, None, 0.0883883, None, None),
        (3, 5, 2, 0, Some(0), 1.0, None, None),             // a window of 0 keys: rows of zeros
        (17, 24, 40, 33, Some(8), 0.35, Some(0.5), None),   // a cap that bends most scores
        (5, 9, 3, 0, None, 0.125, Some(50.0), None),
        // ALiBi: slope · (j − t) after the scale (and the cap), from rows whose keys start at 0
        // and at lo > 0; an irrational slope (BLOOM's 2^-0.5 of 16 heads).
        (17, 57, 40, 0, None, 0.35, None, Some(0.25)),
        (17, 24, 40, 33, Some(8), 0.35, None, Some(0.0625)),
        (17, 40, 40, 30, Some(8), 0.35, Some(0.5), Some(0.5)),
        (1, 300, 299, 0, None, 0.0883883, None, Some(std::f32::consts::FRAC_1_SQRT_2)),
    ];
    for (rows, n_keys, t0, lo, window, scale, softcap, slope) in cases {
        let mut p = values(&mut rng, rows * n_keys, 4.0);
        if rows > 2 {
            // Row 1: a NaN where the query sees it; row 2: one -inf score and a NaN it does not see.
            p[n_keys + (t0 + 1 - lo)] = f32::NAN;
            p[2 * n_keys + (t0 + 2 - lo)] = f32::NEG_INFINITY;
            if t0 + 3 - lo < n_keys {
                p[2 * n_keys + t0 + 3 - lo] = f32::NAN;
            }
        }
        let mut want = p.clone();
        softmax_rows(&mut want, n_keys, t0, lo, window, scale, softcap, slope);
        let mut got = dev(&p);
        cuda::softmax_rows(&mut got, n_keys, t0, lo, window, scale, softcap, slope).unwrap();
        let what = format!("softmax_rows [{rows}, {n_keys}] t0 {t0} lo {lo} window {window:?} softcap {softcap:?} slope {slope:?}");
        same_bits(&want, &got.to_vec().unwrap(), &what);
    }
    let mut p = poisoned(12);
    assert!(cuda::softmax_rows(&mut p, 4, 0, 1, None, 1.0, None, None).is_err(), "query 0 sees key 0 before the block");
    assert!(cuda::softmax_rows(&mut p, 4, 2, 0, None, 1.0, None, None).is_err(), "query 4 sees key 4 past the block");
    assert!(cuda::softmax_rows(&mut p, 4, 9, 4, Some(3), 1.0, None, None).is_err(), "query 9 sees keys past the block 4..8");
    assert!(cuda::softmax_rows(&mut p, 4, 5, 4, Some(3), 1.0, None, None).is_err(), "query 5 sees key 3 before the block");
    assert!(cuda::softmax_rows(&mut p, 5, 0, 0, None, 1.0, None, None).is_err(), "not rows of n_keys");
    assert!(cuda::softmax_rows(&mut p, 0, 0, 0, None, 1.0, None, None).is_err(), "rows of 0 keys");
    assert!(cuda::softmax_rows(&mut p, 4, usize::MAX, 0, None, 1.0, None, None).is_err(), "queries past usize::MAX");
    assert!(cuda::softmax_rows(&mut poisoned(0), 4, 0, 9, None, 1.0, None, None).is_ok(), "no rows");
    assert!(cuda::softmax_rows(&mut p, 4, 0, 0, None, 1.0, Some(-1.0), None).is_err(), "a negative softcap");
    for slope in [-0.5, 0.0, f32::NAN, f32::INFINITY] {
        assert!(cuda::softmax_rows(&mut p, 4, 0, 0, None, 1.0, None, Some(slope)).is_err(), "an ALiBi slope of {slope}");
    }
}

#[test]
fn attention_ds_matches_the_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(55);
    for (rows, n_keys) in SHAPES {
        let mut p = values(&mut rng, rows * n_keys, 1.0);
        p.chunks_exact_mut(n_keys).for_each(|row| softmax_rows(row, n_keys, n_keys - 1, 0, None, 0.5, None, None)); // probabilities
        let mut ds = values(&mut rng, rows * n_keys, 2.0);
        if rows > 2 {
            p[n_keys + n_keys / 2] = f32::NAN; // row 1 NaN
            ds[2 * n_keys] = f32::INFINITY; // row 2: inf · p
        }
        let mut want = ds.clone();
        attention_ds(&mut want, &p, n_keys, 0.125);
        let mut got = dev(&ds);
        cuda::attention_ds(&mut got, &dev(&p), n_keys, 0.125).unwrap();
        same_bits(&want, &got.to_vec().unwrap(), &format!("attention_ds [{rows}, {n_keys}]"));
    }
    let mut ds = poisoned(12);
    assert!(cuda::attention_ds(&mut ds, &dev(&[0f32; 8]), 4, 1.0).is_err(), "p of another length");
    assert!(cuda::attention_ds(&mut ds, &dev(&[0f32; 12]), 5, 1.0).is_err(), "not rows of n_keys");
    assert!(cuda::attention_ds(&mut ds, &dev(&[0f32; 12]), 0, 1.0).is_err(), "rows of 0 keys");
}

/// 64 values whose f64 sum, cast to f32, tells cpu::warp_sum's order from others: 1 (item 0)
/// and 2^-24 (item 32, the same lane) meet at the f32 midpoint 1 + 2^-24, and the four 2^-54 at
/// lanes 1, 9, 17 and 25 survive only if they meet each other before the 1 (the butterfly from
/// off = 16 down): then the sum rounds up to 1 + 2^-23, in key order or a butterfly from off = 1
/// they are lost one by one and it rounds to even, 1.
fn order_probe() -> Vec<f32> {
    let mut v = vec![0f32; 64];
    v[0] = 1.0;
    v[32] = 2f32.powi(-24);
    for i in [1, 9, 17, 25] {
        v[i] = 2f32.powi(-54);
    }
    let sequential = v.iter().fold(0f64, |s, &x| s + f64::from(x)) as f32;
    assert!(warp_sum(v.len(), |i| f64::from(v[i])) as f32 == 1.0 + f32::EPSILON && sequential == 1.0);
    v
}

#[test]
fn the_warp_sums_are_in_the_cpus_order() {
    if !have_gpu() {
        return;
    }
    let probe = order_probe();
    let ones = vec![1f32; probe.len()];
    // attention_ds: c = Σ p·dP with p = 1.
    let mut want = probe.clone();
    attention_ds(&mut want, &ones, probe.len(), 0.5);
    let mut got = dev(&probe);
    cuda::attention_ds(&mut got, &dev(&ones), probe.len(), 0.5).unwrap();
    same_bits(&want, &got.to_vec().unwrap(), "attention_ds on the order probe");
    // norm_backward_add: mean(x⊙g) (RMSNorm) and mean(g) (LayerNorm) with x = w = 1, dy the probe.
    for (layer_norm, offset) in [(false, false), (false, true), (true, false), (true, true)] {
        let norm = NormKind { layer_norm, offset, eps: 1e-5 };
        let weight = vec![if offset { 0.0 } else { 1.0 }; probe.len()];
        let mut want = vec![0f32; probe.len()];
        norm_backward_add(norm, &ones, &weight, &probe, &mut want);
        let mut got = dev(&vec![0f32; probe.len()]);
        cuda::norm_backward_add(&mut got, &dev(&ones), &dev(&weight), &dev(&probe), norm).unwrap();
        same_bits(&want, &got.to_vec().unwrap(), &format!("norm_backward_add {norm:?} on the order probe"));
    }
}

#[test]
fn norm_backward_add_matches_the_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(56);
    for (rows, n) in SHAPES {
        let mut x = values(&mut rng, rows * n, 1.5);
        let weight = values(&mut rng, n, 0.3);
        let dy = values(&mut rng, rows * n, 0.7);
        let acc = values(&mut rng, rows * n, 0.1);
        if rows > 2 {
            x[n + n / 2] = f32::NAN; // row 1 NaN
            x[2 * n..3 * n].iter_mut().for_each(|v| *v *= 1e4); // row 2 large
        }
        for (layer_norm, offset) in [(false, false), (false, true), (true, false), (true, true)] {
            let norm = NormKind { layer_norm, offset, eps: if layer_norm { 1e-5 } else { 1e-6 } };
            let mut want = acc.clone();
            norm_backward_add(norm, &x, &weight, &dy, &mut want);
            let mut got = dev(&acc);
            cuda::norm_backward_add(&mut got, &dev(&x), &dev(&weight), &dev(&dy), norm).unwrap();
            same_bits(&want, &got.to_vec().unwrap(), &format!("norm_backward_add {norm:?} [{rows}, {n}]"));
        }
    }
    let norm = NormKind { layer_norm: false, offset: false, eps: 1e-6 };
    let (x, w) = (dev(&[1f32; 12]), dev(&[1f32; 4]));
    let mut acc = poisoned(12);
    assert!(cuda::norm_backward_add(&mut acc, &x, &w, &dev(&[0f32; 8]), norm).is_err(), "dy of another length");
    assert!(cuda::norm_backward_add(&mut poisoned(8), &x, &w, &dev(&[0f32; 12]), norm).is_err(), "acc of another length");
    assert!(cuda::norm_backward_add(&mut acc, &x, &dev(&[1f32; 5]), &dev(&[0f32; 12]), norm).is_err(), "not rows of the weight");
    assert!(cuda::norm_backward_add(&mut acc, &x, &dev(&[0f32; 0]), &dev(&[0f32; 12]), norm).is_err(), "an empty weight");
}

#[test]
fn act_grad_mul_matches_the_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(57);
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 100.0, -100.0, 1e-30];
    for n in [1, 31, 77, 300] {
        let mut x = values(&mut rng, n, 2.0);
        for (i, v) in x.iter_mut().enumerate().step_by(9) {
            *v = specials[i / 9 % specials.len()];
        }
        let mut dm = values(&mut rng, n, 1.0);
        dm[n / 2] = f32::NAN;
        let u = values(&mut rng, n, 1.0);
        for act in ACTS {
            for gated in [false, true] {
                let u = gated.then_some(&u[..]);
                let mut want = vec![0f32; n];
                act_grad_mul(act, &x, &dm, u, &mut want);
                let mut got = poisoned(n);
                let u_dev = u.map(dev);
                cuda::act_grad_mul(&dev(&x), &dev(&dm), u_dev.as_ref(), act, &mut got).unwrap();
                let what = format!("act_grad_mul {act:?} gated {gated} n {n}");
                if act == Activation::Relu2 {
                    same_bits(&want, &got.to_vec().unwrap(), &what);
                } else {
                    same_up_to_libm(&want, &got.to_vec().unwrap(), 8.0, &what);
                }
            }
        }
    }
    let x = dev(&[1f32; 8]);
    let mut out = poisoned(8);
    let act = Activation::Silu;
    assert!(cuda::act_grad_mul(&x, &dev(&[1f32; 7]), None, act, &mut out).is_err(), "dm of another length");
    assert!(cuda::act_grad_mul(&x, &x, Some(&dev(&[1f32; 9])), act, &mut out).is_err(), "u of another length");
    assert!(cuda::act_grad_mul(&x, &x, None, act, &mut poisoned(7)).is_err(), "out of another length");
}

#[test]
fn swap_rotary_halves_matches_the_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(58);
    for (head_dim, rotary_dim) in [(8, 8), (7, 4), (77, 30), (5, 0), (1, 0), (64, 64)] {
        for heads in [1, 5, 17] {
            let mut x = values(&mut rng, heads * head_dim, 1.0);
            x[0] = f32::NAN;
            let mut want = x.clone();
            swap_rotary_halves(&mut want, head_dim, rotary_dim);
            let mut got = dev(&x);
            cuda::swap_rotary_halves(&mut got, head_dim, rotary_dim).unwrap();
            same_bits(&want, &got.to_vec().unwrap(), &format!("swap_rotary_halves {heads} heads of {head_dim}, {rotary_dim}"));
        }
    }
    let mut x = poisoned(16);
    assert!(cuda::swap_rotary_halves(&mut x, 8, 3).is_err(), "an odd rotary_dim");
    assert!(cuda::swap_rotary_halves(&mut x, 8, 10).is_err(), "rotary_dim wider than a head");
    assert!(cuda::swap_rotary_halves(&mut x, 5, 4).is_err(), "not whole heads");
    assert!(cuda::swap_rotary_halves(&mut x, 0, 0).is_err(), "heads of 0 values");
}

#[test]
fn xent_grad_rows_match_the_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(59);
    for (rows, vocab) in SHAPES.into_iter().chain([(2, 1000)]) {
        let mut z = values(&mut rng, rows * vocab, 3.0);
        let mut targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
        targets[0] = 0;
        targets[rows - 1] = vocab as u32 - 1;
        if rows > 2 && vocab > 2 {
            z[vocab + vocab / 2] = f32::NAN; // row 1 NaN
            let t = targets[2] as usize;
            z[2 * vocab + (t + 1) % vocab] = f32::NEG_INFINITY; // row 2: a logit of probability 0
            z[2 * vocab + (t + 2) % vocab] = 80.0; // and one dominating the rest
        }
        let scale = 1.0 / rows as f32;
        let mut want = z.clone();
        let want_nll: Vec<f64> =
            want.chunks_exact_mut(vocab).zip(&targets).map(|(row, &t)| xent_grad_row(row, t as usize, scale)).collect();
        let mut got = dev(&z);
        let mut got_nll = dev(&vec![-7.5f64; rows]);
        cuda::xent_grad_rows(&mut got, vocab, &dev(&targets), scale, &mut got_nll).unwrap();
        let (got, got_nll) = (got.to_vec().unwrap(), got_nll.to_vec().unwrap());
        let what = format!("xent_grad_rows [{rows}, {vocab}]");
        if cfg!(feature = "cuda-emu") {
            same_bits(&want, &got, &what);
            same_bits_f64(&want_nll, &got_nll, &format!("{what} nll"));
        } else {
            for (r, (w, g)) in want.chunks_exact(vocab).zip(got.chunks_exact(vocab)).enumerate() {
                same_up_to_libm(w, g, 8.0, &format!("{what} row {r}"));
            }
            for (r, (&w, &g)) in want_nll.iter().zip(&got_nll).enumerate() {
                assert!((w.is_nan() && g.is_nan()) || (w - g).abs() <= 1e-12 * w.abs().max(1.0), "{what} nll[{r}]: cpu {w:e} device {g:e}");
            }
        }
        if rows > 2 && vocab > 2 {
            assert!(got_nll[1].is_nan() && got[vocab..2 * vocab].iter().all(|v| v.is_nan()), "{what}: row 1 is NaN");
        }
    }
    // A target outside the vocabulary (the CPU panics): that row's nll and gradient are NaN.
    let z: Vec<f32> = (0..12).map(|i| i as f32 * 0.25).collect();
    let mut got = dev(&z);
    let mut nll = dev(&[0f64; 3]);
    cuda::xent_grad_rows(&mut got, 4, &dev(&[3u32, 4, 0]), 1.0, &mut nll).unwrap();
    let (got, nll) = (got.to_vec().unwrap(), nll.to_vec().unwrap());
    assert!(nll[1].is_nan() && got[4..8].iter().all(|v| v.is_nan()), "target 4 of 4: {nll:?} {got:?}");
    assert!(nll[0].is_finite() && nll[2].is_finite() && got[..4].iter().chain(&got[8..]).all(|v| v.is_finite()));
    let mut z = poisoned(12);
    let mut nll = dev(&[0f64; 3]);
    assert!(cuda::xent_grad_rows(&mut z, 5, &dev(&[0u32; 3]), 1.0, &mut nll).is_err(), "z is not [targets, vocab]");
    assert!(cuda::xent_grad_rows(&mut z, 4, &dev(&[0u32; 3]), 1.0, &mut dev(&[0f64; 2])).is_err(), "nll of another length");
    assert!(cuda::xent_grad_rows(&mut poisoned(0), 0, &dev(&[0u32; 3]), 1.0, &mut nll).is_err(), "an empty vocabulary");
}

#[test]
fn scale_rows_match_the_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(60);
    for (rows, cols) in SHAPES {
        let x = values(&mut rng, rows * cols, 1.0);
        let mut w = values(&mut rng, rows, 0.5);
        if rows > 2 {
            w[0] = -0.0;
            w[1] = f32::NAN;
            w[2] = f32::INFINITY;
        }
        let mut want = x.clone();
        scale_rows(&mut want, cols, &w);
        let mut got = dev(&x);
        cuda::scale_rows(&mut got, cols, &dev(&w)).unwrap();
        same_bits(&want, &got.to_vec().unwrap(), &format!("scale_rows [{rows}, {cols}]"));
    }
    assert!(cuda::scale_rows(&mut poisoned(0), 0, &dev(&[1f32; 3])).is_ok(), "rows of 0 values");
    assert!(cuda::scale_rows(&mut poisoned(10), 3, &dev(&[1f32; 3])).is_err(), "x is not [w.len(), cols]");
}

#[test]
fn weighted_sq_err_rows_match_the_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(61);
    for (rows, cols) in SHAPES {
        let y = values(&mut rng, rows * cols, 1.3);
        let r = values(&mut rng, rows * cols, 1.3);
        let mut w = values(&mut rng, rows * cols, 0.2);
        if rows > 2 {
            w[cols + cols / 2] = f32::NAN; // row 1 NaN
            w[2 * cols] = 0.0;
        }
        for bf16 in [false, true] {
            let round = |d: f32| if bf16 { round_bf16(d) } else { d };
            for weighted in [false, true] {
                let rows_of = |v: &[f32], i: usize| v[i * cols..(i + 1) * cols].to_vec();
                let want: Vec<f64> = (0..rows)
                    .map(|i| sq_err_row(&rows_of(&y, i), &rows_of(&r, i), weighted.then(|| rows_of(&w, i)).as_deref(), round))
                    .collect();
                let mut got = dev(&vec![f64::NAN; rows]);
                let w_dev = weighted.then(|| dev(&w));
                cuda::sq_err_rows(&dev(&y), &dev(&r), w_dev.as_ref(), cols, bf16, &mut got).unwrap();
                same_bits_f64(&want, &got.to_vec().unwrap(), &format!("sq_err_rows [{rows}, {cols}] bf16 {bf16} weighted {weighted}"));
            }
        }
    }
    let (y, mut out) = (dev(&[1f32; 12]), dev(&[0f64; 3]));
    assert!(cuda::sq_err_rows(&y, &y, Some(&dev(&[1f32; 11])), 4, false, &mut out).is_err(), "weights of another length");
    assert!(cuda::sq_err_rows(&y, &dev(&[1f32; 8]), None, 4, false, &mut out).is_err(), "reference of another length");
    assert!(cuda::sq_err_rows(&y, &y, None, 4, false, &mut dev(&[0f64; 2])).is_err(), "out of another length");
    assert!(cuda::sq_err_rows(&y, &y, None, 5, false, &mut out).is_err(), "not rows of cols");
}

/// Empty buffers: nothing to launch, every call returns Ok.
#[test]
fn empty_inputs_launch_nothing() {
    if !have_gpu() {
        return;
    }
    let empty = DeviceBuffer::<f32>::alloc(0).unwrap();
    let mut out = DeviceBuffer::<f32>::alloc(0).unwrap();
    cuda::transpose(&empty, 0, 7, &mut out).unwrap();
    cuda::act_grad_mul(&empty, &empty, Some(&empty), Activation::GeluTanh, &mut out).unwrap();
    cuda::xent_grad_rows(&mut out, 5, &DeviceBuffer::alloc(0).unwrap(), 1.0, &mut DeviceBuffer::alloc(0).unwrap()).unwrap();
    cuda::norm_backward_add(&mut out, &empty, &dev(&[1f32; 3]), &empty, NormKind { layer_norm: true, offset: true, eps: 1e-5 })
        .unwrap();
    cuda::attention_ds(&mut out, &empty, 3, 1.0).unwrap();
    cuda::swap_rotary_halves(&mut out, 4, 2).unwrap();
}

/// The soft cap's backward (`1 − tanh²(scale·raw / cap)`) on the device: bit-identical under
/// the emulator (tanhf is the CPU's), within a few ulps on a GPU; NaN and ±inf scores pass
/// through as on the CPU, odd lengths, wrong lengths and caps refused.
#[test]
fn softcap_grad_matches_the_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(57);
    for (n, scale, cap) in [(1, 1.0, 0.5), (1000, 0.125, 0.5), (4097, 0.0625, 50.0), (33, 1.0, 30.0)] {
        let mut raw = values(&mut rng, n, 8.0);
        let ds = values(&mut rng, n, 2.0);
        if n > 3 {
            raw[1] = f32::NAN;
            raw[2] = f32::INFINITY;
        }
        let mut want = ds.clone();
        softcap_grad(&mut want, &raw, scale, cap);
        let mut got = dev(&ds);
        cuda::softcap_grad(&mut got, &dev(&raw), scale, cap).unwrap();
        same_up_to_libm(&want, &got.to_vec().unwrap(), 4.0, &format!("softcap_grad n {n} scale {scale} cap {cap}"));
    }
    let mut ds = poisoned(8);
    assert!(cuda::softcap_grad(&mut ds, &dev(&[0f32; 7]), 1.0, 1.0).is_err(), "raw of another length");
    assert!(cuda::softcap_grad(&mut ds, &dev(&[0f32; 8]), 1.0, 0.0).is_err(), "a cap of 0");
}
