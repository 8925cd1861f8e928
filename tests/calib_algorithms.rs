//! SmoothQuant and AWQ (lite, clip, export-time fusion) against independent f64
//! recomputations of spec/algorithms.md §5–§7, plus a sanity check on ModelOpt 0.47's INT8-SQ
//! export of rq-tiny (reference/README.md "Observed in int8_sq").

mod common;

use common::Rng;

use rq_min::compute::Tensor;
use rq_min::numerics::round_bf16;
use rq_min::quant::scales::average_scales;
use rq_min::quant::awq::{
    awq_scale, fold_into_norm, fold_into_norm_plus_one, weight_mean, ActMean, ClipSearch, LiteSearch,
    ALPHAS, CLIP_RATIOS,
};
use rq_min::quant::smoothquant::{pre_quant_scale, resmooth_group, smooth_weight, smoothed_input_amax};
use rq_min::io::safetensors::{Checkpoint, Dtype, SafeTensors};

fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(a.abs()) + abs
}

/// Reference INT4 fake quant, spec §4.1: per (row, block of `block`) amax;
/// s = 7/amax, q = clamp(rint(x·s), −8, 7), y = q/s (all f32); amax < 2^-24 gives 0.
fn int4_fq(rows: &mut [f32], amax: &[f32], inp: usize, block: usize) {
    let nb = inp.div_ceil(block);
    for (r, row) in rows.chunks_exact_mut(inp).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let a = amax[r * nb + j / block];
            if a < (-24f32).exp2() {
                *v = 0.0;
                continue;
            }
            let s = 7.0f32 / a;
            *v = (*v * s).round_ties_even().clamp(-8.0, 7.0) / s;
        }
    }
}

fn block_amax(rows: &[f32], inp: usize, block: usize) -> Vec<f32> {
    rows.chunks_exact(inp)
        .flat_map(|row| row.chunks(block).map(|b| b.iter().fold(0f32, |m, &v| m.max(v.abs()))))
        .collect()
}

/// INT4 block-128 fake quant with the amax recomputed from its input (awq_lite's search).
fn int4_g128_dynamic(inp: usize) -> impl Fn(&mut [f32]) {
    move |w: &mut [f32]| {
        let amax = block_amax(w, inp, 128);
        int4_fq(w, &amax, inp, 128);
    }
}

/// `out[t, o] = Σ_k x[t, k] w[o, k]` in f64.
fn linear_f64(x: &[f32], w: &[f32], inp: usize) -> Vec<f64> {
    x.chunks_exact(inp)
        .flat_map(|xr| w.chunks_exact(inp).map(move |wr| xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// SmoothQuant (§5)

/// Spec §5 step 3 in f64 (the model-dtype cast of `w^(1-α)` applied as ModelOpt does).
fn pqs_f64(a: &[f32], w: &[f32], inp: usize, alpha: f64, bf16: bool) -> Vec<f64> {
    let wmax: Vec<f64> = (0..inp).map(|j| w.chunks_exact(inp).map(|r| r[j].abs() as f64).fold(0.0, f64::max)).collect();
    let a: Vec<f64> = a.iter().map(|&v| if bf16 { round_bf16(v) as f64 } else { v as f64 }).collect();
    let mut p: Vec<f64> = wmax
        .iter()
        .zip(&a)
        .map(|(&wj, &aj)| {
            let num = if alpha == 1.0 { 1.0 } else { wj.powf(1.0 - alpha) };
            let num = if bf16 { round_bf16(num as f32) as f64 } else { num };
            num / aj.powf(alpha)
        })
        .collect();
    let eps = 1.0 / 2f64.powi(31);
    if p.iter().cloned().fold(f64::INFINITY, f64::min) <= eps {
        for (pj, &aj) in p.iter_mut().zip(&a) {
            if aj <= eps {
                *pj = 1.0;
            }
        }
    }
    p.iter().map(|&v| v.clamp(1e-4_f32 as f64, 1e4)).collect()
}

#[test]
fn pre_quant_scale_matches_spec_with_clamps_and_dead_channels() {
    let mut rng = Rng(11);
    let (out, inp) = (24, 64);
    let mut w: Vec<f32> = (0..out * inp).map(|_| round_bf16(rng.normal() * 0.05)).collect();
    w[5] = 0.5;
    let mut a: Vec<f32> = (0..inp).map(|_| round_bf16(rng.log_uniform(1e-3, 1e3))).collect();
    a[3] = 0.0; // dead channel
    a[5] = round_bf16(1e-9); // w/a huge: clamps at 1e4 for alpha 0.5
    a[6] = round_bf16(1e9); // w/a tiny: clamps at 1e-4 for alpha 0.5

    for (alpha, dtype) in [(0.5f32, Dtype::BF16), (1.0, Dtype::BF16), (0.8, Dtype::F32)] {
        let bf16 = dtype == Dtype::BF16;
        let p = pre_quant_scale(&a, &w, out, inp, alpha, dtype);
        let want = pqs_f64(&a, &w, inp, alpha as f64, bf16);
        for (j, (&got, &want)) in p.iter().zip(&want).enumerate() {
            assert!(close(got as f64, want, 2e-6, 0.0), "alpha {alpha} channel {j}: {got} vs {want}");
        }
        // No p is below 2^-31 here, so ModelOpt does not mask: the dead channel's inf clamps.
        assert_eq!(p[3], 1e4, "alpha {alpha}: dead channel");
        if alpha == 0.5 {
            assert_eq!((p[5], p[6]), (1e4, 1e-4), "clamps");
        }
    }

    // With one channel so hot that its p falls to <= 2^-31, the dead channel becomes 1.
    let mut hot = a.clone();
    hot[7] = round_bf16(1e10);
    let p = pre_quant_scale(&hot, &w, out, inp, 1.0, Dtype::BF16);
    assert_eq!((p[3], p[7]), (1.0, 1e-4));
    let want = pqs_f64(&hot, &w, inp, 1.0, true);
    assert!(p.iter().zip(&want).all(|(&g, &w)| close(g as f64, w, 2e-6, 0.0)));

    // 0/0 (dead channel, zero weight column, 0 < alpha < 1) does not panic: it becomes 1.
    let mut wz = w.clone();
    wz.chunks_exact_mut(inp).for_each(|r| r[3] = 0.0);
    assert_eq!(pre_quant_scale(&a, &wz, out, inp, 0.5, Dtype::BF16)[3], 1.0);
}

#[test]
fn smoothing_preserves_the_product() {
    let mut rng = Rng(12);
    let (tokens, out, inp) = (16, 40, 96);
    let w: Vec<f32> = (0..out * inp).map(|_| round_bf16(rng.normal() * 0.05)).collect();
    let chan: Vec<f32> = (0..inp).map(|j| if j % 17 == 0 { 40.0 } else { rng.log_uniform(0.05, 2.0) }).collect();
    let x: Vec<f32> = (0..tokens * inp).map(|i| round_bf16(rng.normal() * chan[i % inp])).collect();
    let a: Vec<f32> =
        (0..inp).map(|j| round_bf16(x.chunks_exact(inp).map(|r| r[j].abs()).fold(0.0, f32::max))).collect();

    let p = pre_quant_scale(&a, &w, out, inp, 0.5, Dtype::BF16);
    let mut ws = w.clone();
    smooth_weight(&mut ws, inp, &p, Dtype::BF16);
    for (i, (&got, &orig)) in ws.iter().zip(&w).enumerate() {
        let want = orig as f64 / p[i % inp] as f64;
        assert_eq!(got, round_bf16(got), "stored in bf16");
        assert!(close(got as f64, want, 2f64.powi(-8), 0.0), "W'[{i}] = {got}, want {want}");
    }
    // The runtime multiplies x by the stored (bf16) pre_quant_scale.
    let xs: Vec<f32> = x.iter().enumerate().map(|(i, &v)| round_bf16(v * round_bf16(p[i % inp]))).collect();
    let (y, ys) = (linear_f64(&x, &w, inp), linear_f64(&xs, &ws, inp));
    let mag =
        linear_f64(&x.iter().map(|v| v.abs()).collect::<Vec<_>>(), &w.iter().map(|v| v.abs()).collect::<Vec<_>>(), inp);
    for i in 0..y.len() {
        assert!((ys[i] - y[i]).abs() <= 4.0 * 2f64.powi(-9) * mag[i], "y[{i}]: {} vs {}", ys[i], y[i]);
    }
    // Smoothed amax: max_j bf16(a_j)·p_j, stored in bf16.
    let want = a.iter().zip(&p).map(|(&a, &p)| a as f64 * p as f64).fold(0.0, f64::max);
    let got = smoothed_input_amax(&a, &p, Dtype::BF16);
    assert_eq!(got, round_bf16(got));
    assert!(close(got as f64, want, 2f64.powi(-8), 0.0), "{got} vs {want}");
    // The smoothed activations really stay within it (up to the bf16 rounding of p).
    let xmax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(xmax as f64 <= got as f64 * (1.0 + 2f64.powi(-7)));
}

#[test]
fn resmooth_group_averages_and_rescales() {
    let mut rng = Rng(13);
    let inp = 64;
    let outs = [32, 16, 16];
    let ws: Vec<Vec<f32>> =
        outs.iter().map(|&o| (0..o * inp).map(|_| round_bf16(rng.normal() * 0.05)).collect()).collect();
    let ps: Vec<Vec<f32>> =
        (0..3).map(|_| (0..inp).map(|_| round_bf16(rng.log_uniform(0.01, 10.0))).collect()).collect();
    let mut new_ws = ws.clone();
    let (a, b) = new_ws.split_at_mut(1);
    let (b, c) = b.split_at_mut(1);
    let mut members = [(&mut a[0], ps[0].clone()), (&mut b[0], ps[1].clone()), (&mut c[0], ps[2].clone())];
    let p_avg = resmooth_group(&mut members, inp, Dtype::BF16);
    for j in 0..inp {
        let mean = (ps[0][j] as f64 + ps[1][j] as f64 + ps[2][j] as f64) / 3.0;
        assert_eq!(p_avg[j], round_bf16(p_avg[j]));
        assert!(close(p_avg[j] as f64, mean, 2f64.powi(-8), 0.0), "p_avg[{j}] {} vs {mean}", p_avg[j]);
    }
    assert!(members.iter().all(|(_, p)| *p == p_avg), "members carry p_avg");
    for m in 0..3 {
        for (i, (&got, &orig)) in new_ws[m].iter().zip(&ws[m]).enumerate() {
            let j = i % inp;
            let want = orig as f64 * ps[m][j] as f64 / p_avg[j] as f64;
            assert_eq!(got, round_bf16(got));
            assert!(close(got as f64, want, 2f64.powi(-7), 0.0), "member {m} W[{i}] {got} vs {want}");
        }
    }
    // Average of the f32 helper: mean then one rounding.
    assert_eq!(average_scales(&[&[1.0, 2.0], &[2.0, 4.0]], Dtype::F32), vec![1.5, 3.0]);
    assert!(average_scales(&[], Dtype::BF16).is_empty());

    // Members that already share a scale keep their weights bit for bit (torch.equal check).
    let mut w0 = ws[1].clone();
    let mut w1 = ws[2].clone();
    let mut same = [(&mut w0, ps[0].clone()), (&mut w1, ps[0].clone())];
    assert_eq!(resmooth_group(&mut same, inp, Dtype::BF16), ps[0]);
    assert_eq!((w0, w1), (ws[1].clone(), ws[2].clone()));
}

#[test]
fn norm_folding() {
    let mut n = vec![1.5f32, -0.25, 2.0];
    fold_into_norm(&mut n, &[2.0, 0.5, 3.0], Dtype::BF16);
    assert_eq!(n, vec![3.0, -0.125, 6.0]);
    let mut n = vec![0.5f32, -0.25, 0.0];
    fold_into_norm_plus_one(&mut n, &[2.0, 0.5, 3.0], Dtype::F32);
    assert_eq!(n, vec![2.0, -0.625, 2.0]);
    // Model-dtype rounding: 1.0 · 1.00390625 is not a bf16 value; it rounds to even.
    let mut n = vec![1.0f32];
    fold_into_norm(&mut n, &[1.003_906_3], Dtype::BF16);
    assert_eq!(n, vec![1.0]);
}

// ---------------------------------------------------------------------------------------
// AWQ statistics (§6.1)

#[test]
fn alpha_and_clip_grids() {
    // torch.arange(0, 1.1, 0.1) in f32 and [round(k, 2) for k in arange(0.5, 1.0, 0.05)] + [1.0].
    for (i, &a) in ALPHAS.iter().enumerate() {
        assert_eq!(a, (0.1f64 * i as f64) as f32);
    }
    for (i, &r) in CLIP_RATIOS.iter().enumerate() {
        let k = (0.5f64 + 0.05 * i as f64).min(1.0);
        assert_eq!(r, ((k * 100.0).round() / 100.0) as f32);
    }
}

/// §6.1 `get_weight_scale` in f64 (F32 model: no dtype rounding).
fn weight_mean_f64(w: &[f32], out: usize, inp: usize, block: Option<usize>) -> Vec<f64> {
    let g = block.unwrap_or(inp);
    let mut sum = vec![0f64; inp];
    for row in w.chunks_exact(inp) {
        for (bi, blk) in row.chunks(g).enumerate() {
            let amax = blk.iter().map(|v| v.abs() as f64).fold(0.0, f64::max) + f32::MIN_POSITIVE as f64;
            for (k, &v) in blk.iter().enumerate() {
                sum[bi * g + k] += v.abs() as f64 / amax;
            }
        }
    }
    sum.iter().map(|s| s / out as f64).collect()
}

#[test]
fn weight_mean_matches_spec() {
    let mut rng = Rng(21);
    let (out, inp) = (12, 300); // 300 = 2 full blocks of 128 + a zero-padded one of 44
    let mut w: Vec<f32> = (0..out * inp).map(|_| rng.normal() * 0.03).collect();
    w[2 * inp + 128..2 * inp + 256].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
    for block in [Some(128), None] {
        let got = weight_mean(&w, out, inp, block, Dtype::F32);
        let want = weight_mean_f64(&w, out, inp, block);
        for j in 0..inp {
            assert!(close(got[j] as f64, want[j], 1e-6, 0.0), "{block:?} j {j}: {} vs {}", got[j], want[j]);
        }
        let bf = weight_mean(&w, out, inp, block, Dtype::BF16);
        for j in 0..inp {
            assert_eq!(bf[j], round_bf16(bf[j]));
            assert!(close(bf[j] as f64, want[j], 2f64.powi(-7), 0.0), "bf16 {block:?} j {j}");
        }
    }
    // f16's tiny (2^-14) is added to a small block max in f16: the max element maps below 1.
    let small: Vec<f32> = vec![0.01, -0.005, 0.0025, 0.001];
    let f16 = weight_mean(&small, 1, 4, Some(4), Dtype::F16);
    let bf16 = weight_mean(&small, 1, 4, Some(4), Dtype::BF16);
    assert!(f16[0] < 1.0 && f16[0] > 0.99, "{}", f16[0]);
    assert_eq!(bf16[0], 1.0);
}

#[test]
fn act_mean_is_the_mean_of_batch_means() {
    let mut rng = Rng(22);
    let inp = 48;
    let mut m = ActMean::new(inp, Dtype::F32);
    assert!(m.finish().is_none(), "no batch");
    let mut want = vec![0f64; inp];
    let sizes = [5usize, 17, 1];
    for &t in &sizes {
        let x: Vec<f32> = (0..t * inp).map(|_| rng.normal() * 3.0).collect();
        m.observe(&Tensor::from(x.clone()));
        for j in 0..inp {
            want[j] += x.chunks_exact(inp).map(|r| r[j].abs() as f64).sum::<f64>() / t as f64;
        }
    }
    m.observe(&Tensor::from(vec![])); // an empty batch does not count
    let got = m.finish().expect("batches seen");
    for j in 0..inp {
        let w = want[j] / sizes.len() as f64;
        assert!(close(got[j] as f64, w, 1e-6, 0.0), "channel {j}: {} vs {w}", got[j]);
    }
    // bf16: each batch mean is rounded to bf16 before the f32 sum.
    let mut b = ActMean::new(2, Dtype::BF16);
    b.observe(&Tensor::from(vec![1.0, 0.0, 1.0 + 2f32.powi(-8), 0.0])); // mean 1 + 2^-9 -> bf16 1.0
    assert_eq!(b.finish(), Some(vec![1.0, 0.0]));
    let mut nan = ActMean::new(1, Dtype::F32);
    nan.observe(&Tensor::from(vec![f32::NAN]));
    assert!(nan.finish().is_none(), "NaN disables the search");
}

/// §6.1 `get_scale` in f64.
fn awq_scale_f64(x: &[f32], w: &[f32], alpha: f64) -> Vec<f64> {
    let s: Vec<f64> = x
        .iter()
        .zip(w)
        .map(|(&x, &w)| {
            let xa = if alpha == 0.0 { 1.0 } else { (x as f64).powf(alpha) };
            let wa = if alpha == 1.0 { 1.0 } else { (w as f64).powf(1.0 - alpha) };
            (xa / (wa + f32::MIN_POSITIVE as f64)).clamp(1e-4_f32 as f64, 1e4)
        })
        .collect();
    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let min = s.iter().cloned().fold(f64::INFINITY, f64::min);
    s.iter().map(|v| v / (max * min).sqrt()).collect()
}

#[test]
fn awq_scale_matches_spec() {
    let mut rng = Rng(23);
    let n = 200;
    let mut x: Vec<f32> = (0..n).map(|_| rng.log_uniform(1e-3, 50.0)).collect();
    let mut w: Vec<f32> = (0..n).map(|_| rng.uniform(0.01, 1.0)).collect();
    x[0] = 0.0; // clamps at 1e-4 for alpha > 0
    w[1] = 0.0; // w^(1-α) = 0: huge, clamps at 1e4 for alpha < 1
    x[2] = 1e4;
    for &alpha in &ALPHAS {
        let got = awq_scale(&x, &w, alpha);
        let want = awq_scale_f64(&x, &w, alpha as f64);
        for j in 0..n {
            assert!(close(got[j] as f64, want[j], 1e-5, 0.0), "alpha {alpha} j {j}: {} vs {}", got[j], want[j]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// awq_lite search (§6.1)

struct LiteCase {
    w: Vec<f32>,
    out: usize,
    inp: usize,
    batches: Vec<Vec<f32>>,
}

fn lite_case() -> LiteCase {
    let mut rng = Rng(31);
    let (out, inp) = (32, 256);
    let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() * 0.02).collect();
    let batches = [40usize, 64, 23]
        .iter()
        .map(|&t| {
            (0..t * inp)
                .map(|i| {
                    let v = rng.normal();
                    // Channel 7 has a huge mean activation (an "outlier channel").
                    if i % inp == 7 {
                        40.0 + v
                    } else {
                        v
                    }
                })
                .collect()
        })
        .collect();
    LiteCase { w, out, inp, batches }
}

#[test]
fn lite_search_picks_a_scale_that_protects_the_outlier_channel() {
    let LiteCase { w, out, inp, batches } = lite_case();
    let mut am = ActMean::new(inp, Dtype::F32);
    batches.iter().for_each(|x| am.observe(&Tensor::from(x.clone())));
    let xbar = am.finish().expect("batches");
    let wbar = weight_mean(&w, out, inp, Some(128), Dtype::F32);
    let fq = int4_g128_dynamic(inp);
    let fqt = |t: &mut Tensor| t.map_host(|h| fq(h));
    let mut search = LiteSearch::new(&Tensor::from(w.clone()), out, inp, &xbar, &wbar, Dtype::F32, &fqt);
    assert!(search.best().is_none(), "nothing searched yet");
    let refs: Vec<Vec<f32>> =
        batches.iter().map(|x| linear_f64(x, &w, inp).iter().map(|&v| v as f32).collect()).collect();
    for (x, r) in batches.iter().zip(&refs) {
        search.observe(&Tensor::from(x.clone()), &Tensor::from(r.clone()));
    }
    let losses = *search.losses();

    // f64 brute force of spec §6.1 per alpha, with the test's own INT4 fake quant.
    for (ai, &alpha) in ALPHAS.iter().enumerate() {
        let s = awq_scale(&xbar, &wbar, alpha);
        let mut wq: Vec<f32> = w.iter().enumerate().map(|(i, &v)| v * s[i % inp]).collect();
        fq(&mut wq);
        let mut want = 0f64;
        for (x, r) in batches.iter().zip(&refs) {
            let xs: Vec<f32> = x.iter().enumerate().map(|(i, &v)| v * (1.0 / s[i % inp])).collect();
            let y = linear_f64(&xs, &wq, inp);
            want += y.iter().zip(r).map(|(&y, &r)| (y - r as f64).powi(2)).sum::<f64>() / y.len() as f64;
        }
        assert!(close(losses[ai] as f64, want, 1e-5, 0.0), "alpha {alpha}: {} vs {want}", losses[ai]);
    }

    let (alpha, s) = search.best().expect("searched");
    let best = ALPHAS.iter().position(|&a| a == alpha).expect("grid alpha");
    assert!(alpha > 0.0, "losses {losses:?}");
    assert!(losses[best] < losses[0], "losses {losses:?}");
    assert!(losses.iter().all(|&l| l >= losses[best]));
    assert_eq!(s, awq_scale(&xbar, &wbar, alpha));
    // The outlier channel gets the largest scale (its weight column is scaled up).
    let top = s.iter().enumerate().fold(0, |b, (j, &v)| if v > s[b] { j } else { b });
    assert_eq!(top, 7);
}

#[test]
fn lite_search_ties_go_to_the_first_alpha() {
    let LiteCase { w, out, inp, batches } = lite_case();
    let mut am = ActMean::new(inp, Dtype::BF16);
    am.observe(&Tensor::from(batches[0].clone()));
    let xbar = am.finish().expect("batch");
    let wbar = weight_mean(&w, out, inp, Some(128), Dtype::BF16);
    let fq = int4_g128_dynamic(inp);
    let fqt = |t: &mut Tensor| t.map_host(|h| fq(h));
    let mut search = LiteSearch::new(&Tensor::from(w.clone()), out, inp, &xbar, &wbar, Dtype::BF16, &fqt);
    // Zero inputs: every alpha's output equals the reference exactly, all losses are 0.
    search.observe(&Tensor::from(vec![0.0; 5 * inp]), &Tensor::from(vec![0.0; 5 * out]));
    assert_eq!(*search.losses(), [0.0; 11]);
    assert_eq!(search.best().map(|b| b.0), Some(0.0));

    // A bias shifts both outputs alike: still all-zero losses.
    let bias: Vec<f32> = (0..out).map(|o| o as f32 * 0.25).collect();
    let mut search = LiteSearch::new(&Tensor::from(w.clone()), out, inp, &xbar, &wbar, Dtype::BF16, &fqt).with_bias(&bias);
    let r: Vec<f32> = (0..3 * out).map(|i| bias[i % out]).collect();
    search.observe(&Tensor::from(vec![0.0; 3 * inp]), &Tensor::from(r));
    assert_eq!(*search.losses(), [0.0; 11]);
}

// ---------------------------------------------------------------------------------------
// awq_clip search (§6.2)

#[test]
fn clip_search_clips_outlier_blocks_and_keeps_flat_ones() {
    let mut rng = Rng(41);
    let (out, inp, block) = (6, 384, 128);
    let nb = 3;
    let mut w = vec![0f32; out * inp];
    for o in 0..out {
        let row = &mut w[o * inp..(o + 1) * inp];
        for (j, v) in row.iter_mut().enumerate() {
            *v = if j < 256 {
                rng.uniform(-0.1, 0.1)
            } else {
                // Block 2 is flat: every |w| equal, which INT4 represents exactly at ratio 1.
                if rng.unit() < 0.5 {
                    -0.05
                } else {
                    0.05
                }
            };
        }
        row[(o * 37) % 128] = 1.0; // block 0: one positive outlier
        row[128 + (o * 53) % 128] = -1.0; // block 1: one negative outlier
    }
    let mut search = ClipSearch::new(&w, out, inp, block, Dtype::F32);
    let fq = |rows: &mut [f32], amax: &[f32]| int4_fq(rows, amax, inp, block);
    let batches: Vec<Vec<f32>> = [200usize, 50].iter().map(|&n| (0..n * inp).map(|_| rng.normal()).collect()).collect();
    for x in &batches {
        search.observe(x, &fq);
    }

    // f64 brute force: tokens 0, k, 2k, ... with k = max(1, N / 64); per (row, block) the mean
    // over tokens of the squared block-sum error, summed over batches.
    let amax0 = block_amax(&w, inp, block);
    for (ri, &r) in CLIP_RATIOS.iter().enumerate() {
        let amax: Vec<f32> = amax0.iter().map(|&a| a * r).collect();
        let mut q = w.clone();
        int4_fq(&mut q, &amax, inp, block);
        let mut want = vec![0f64; out * nb];
        for x in &batches {
            let n = x.len() / inp;
            let toks: Vec<&[f32]> = x.chunks_exact(inp).step_by((n / 64).max(1)).collect();
            for o in 0..out {
                for b in 0..nb {
                    let cols = b * block..(b + 1) * block;
                    let mut acc = 0f64;
                    for t in &toks {
                        let d: f64 =
                            cols.clone().map(|k| t[k] as f64 * (q[o * inp + k] as f64 - w[o * inp + k] as f64)).sum();
                        acc += d * d;
                    }
                    want[o * nb + b] += acc / toks.len() as f64;
                }
            }
        }
        let got = &search.losses()[ri];
        for i in 0..out * nb {
            assert!(close(got[i] as f64, want[i], 1e-5, 1e-9), "ratio {r} (row, block) {i}: {} vs {}", got[i], want[i]);
        }
    }

    let best = search.best_amax();
    assert_eq!(best.len(), out * nb);
    for o in 0..out {
        for b in 0..2 {
            let i = o * nb + b;
            assert!(best[i] < amax0[i], "row {o} block {b}: outlier block not clipped");
            // And it is the ratio of the smallest loss.
            let ri = CLIP_RATIOS.iter().position(|&r| amax0[i] * r == best[i]).expect("a grid ratio");
            assert!(search.losses().iter().all(|l| l[i] >= search.losses()[ri][i]));
        }
        assert_eq!(best[o * nb + 2], amax0[o * nb + 2], "row {o}: flat block keeps ratio 1");
    }
}

#[test]
fn clip_search_ties_and_empty_input() {
    let mut rng = Rng(42);
    let (out, inp, block) = (3, 200, 128); // the last block is 72 wide
    let w: Vec<f32> = (0..out * inp).map(|_| round_bf16(rng.normal() * 0.05)).collect();
    let fq = |rows: &mut [f32], amax: &[f32]| {
        int4_fq(rows, amax, inp, block);
        rows.iter_mut().for_each(|v| *v = round_bf16(*v));
    };
    let amax0 = block_amax(&w, inp, block);
    let mut search = ClipSearch::new(&w, out, inp, block, Dtype::BF16);
    assert_eq!(search.best_amax(), amax0, "no token seen: plain max calibration");
    search.observe(&[], &fq);
    assert_eq!(search.best_amax(), amax0);
    // Zero inputs: every ratio has loss 0, the smallest ratio (0.5) wins.
    search.observe(&vec![0.0; 10 * inp], &fq);
    let want: Vec<f32> = amax0.iter().map(|&a| round_bf16(a * 0.5)).collect();
    assert_eq!(search.best_amax(), want);
}

// ---------------------------------------------------------------------------------------
// ModelOpt 0.47's INT8-SQ export of rq-tiny (reference/README.md)

#[test]
fn int8_sq_reference_alpha_one_identity() {
    let Some(shared) = common::shared_dir() else { return };
    let st = SafeTensors::open(&shared.join("reference/modelopt-0.47/rq-tiny/int8_sq/model.safetensors"))
        .expect("reference int8_sq export");
    let get = |name: &str| st.tensor(name).unwrap_or_else(|e| panic!("{e}")).to_f32().expect("float tensor");
    let bits = |name: &str| st.tensor(name).unwrap_or_else(|e| panic!("{e}")).data.to_vec();
    let layers = st.tensors().iter().filter(|t| t.name.ends_with("self_attn.q_proj.weight")).count();
    assert!(layers > 0);

    // Every input_scale is exactly 1/127: the smoothed amax is 1.0 in bf16 (alpha = 1).
    let scales: Vec<_> = st.tensors().iter().filter(|t| t.name.ends_with(".input_scale")).collect();
    assert_eq!(scales.len(), 7 * layers);
    for t in &scales {
        assert_eq!(get(&t.name), vec![1.0f32 / 127.0], "{}", t.name);
    }
    for l in 0..layers {
        let p = |m: &str| bits(&format!("model.layers.{l}.{m}.pre_quant_scale"));
        assert_eq!(p("self_attn.q_proj"), p("self_attn.k_proj"), "layer {l}: q/k share");
        assert_eq!(p("self_attn.q_proj"), p("self_attn.v_proj"), "layer {l}: q/v share");
        assert_eq!(p("mlp.gate_proj"), p("mlp.up_proj"), "layer {l}: gate/up share");
    }

    // Our alpha = 1 smoothing reproduces it: for any activation amax (here random, over six
    // decades) every smoothed channel max is 1, so the input scale is 1.0/127.
    let model = Checkpoint::open(&shared.join("models/rq-tiny")).expect("rq-tiny");
    let w = model.tensor("model.layers.0.self_attn.q_proj.weight").expect("q_proj").to_f32().expect("bf16");
    let inp = 256;
    let out = w.len() / inp;
    let mut rng = Rng(51);
    for _ in 0..20 {
        let a: Vec<f32> = (0..inp).map(|_| round_bf16(rng.log_uniform(1e-3, 1e3))).collect();
        let p = pre_quant_scale(&a, &w, out, inp, 1.0, Dtype::BF16);
        assert!(a.iter().zip(&p).all(|(&a, &p)| (a as f64 * p as f64 - 1.0).abs() < 1e-6));
        let amax = smoothed_input_amax(&a, &p, Dtype::BF16);
        assert_eq!(amax, 1.0);
        assert_eq!(amax / 127.0, get("model.layers.0.self_attn.q_proj.input_scale")[0]);
    }

    // Direction of the smoothing: W' = W · (1/p) rebuilt from the stored bf16 p matches the
    // exported per-row weight scales and (most of) the INT8 codes.
    let p = get("model.layers.0.self_attn.q_proj.pre_quant_scale");
    let mut ws = w.clone();
    smooth_weight(&mut ws, inp, &p, Dtype::BF16);
    let wscale = get("model.layers.0.self_attn.q_proj.weight_scale");
    let codes = st.tensor("model.layers.0.self_attn.q_proj.weight").expect("codes").to_i64().expect("i8");
    let mut same = 0;
    for (o, row) in ws.chunks_exact(inp).enumerate() {
        let s = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        assert!(close(s as f64, wscale[o] as f64, 1e-2, 0.0), "row {o}: scale {s} vs {}", wscale[o]);
        for (k, &v) in row.iter().enumerate() {
            let c = (v / wscale[o]).round_ties_even().clamp(-128.0, 127.0) as i64;
            same += (c == codes[o * inp + k]) as usize;
        }
    }
    let frac = same as f64 / ws.len() as f64;
    assert!(frac > 0.9, "only {frac} of the INT8 codes match");
    eprintln!("int8_sq q_proj layer 0: {:.2}% of codes rebuilt from the stored pre_quant_scale", 100.0 * frac);
}
