//! CPU kernels against plain references: the fast matmul against the naive loop (and, on
//! x86-64, bit for bit against one sequential multiply-add chain), RoPE, attention and
//! RMSNorm against f64 recomputations of the HF formulas.

use rq_min::model::config::{RopeConfig, RopeScaling};
use rq_min::compute::cpu::{self as ops, alibi_slopes, matmul_bt, matmul_bt_naive, Alibi, Attention};
use rq_min::compute::Rope;

/// Deterministic values in [-1, 1) (xorshift64; no RNG dependency).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// `max|a-b| / max|b|`.
fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff = got.iter().zip(want).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
    let scale = want.iter().map(|b| b.abs()).fold(0.0, f64::max);
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

const SHAPES: [(usize, usize, usize); 9] = [
    (1, 1, 1),
    (7, 13, 5),
    (6, 16, 16),
    (1, 300, 70),
    (33, 257, 129),
    (300, 768, 256),
    (97, 513, 33),
    (64, 64, 1000),
    (1000, 300, 40),
];

#[test]
fn matmul_matches_naive() {
    for (i, &(m, k, n)) in SHAPES.iter().enumerate() {
        let x = values(m * k, 2 * i as u64 + 1);
        let w = values(n * k, 2 * i as u64 + 2);
        let (mut fast, mut naive) = (vec![f32::NAN; m * n], vec![0f32; m * n]);
        matmul_bt(&x, &w, m, k, n, &mut fast);
        matmul_bt_naive(&x, &w, m, k, n, &mut naive);
        let exact: Vec<f64> = (0..m * n)
            .map(|e| (0..k).map(|p| f64::from(x[e / n * k + p]) * f64::from(w[e % n * k + p])).sum())
            .collect();
        let (err_fast, err_naive) = (max_rel_err(&fast, &exact), max_rel_err(&naive, &exact));
        let naive_f64: Vec<f64> = naive.iter().map(|&v| f64::from(v)).collect();
        let err_vs_naive = max_rel_err(&fast, &naive_f64);
        println!("{m:>4} × {k:>4} × {n:>4}: fast vs naive {err_vs_naive:.1e}; vs f64: fast {err_fast:.1e}, naive {err_naive:.1e}");
        assert!(err_vs_naive <= 2e-6, "{m}×{k}×{n}: fast vs naive {err_vs_naive:e}");
        // f32 accumulation over k terms: a few ulps times sqrt(k) in practice.
        assert!(err_fast <= 2e-6, "{m}×{k}×{n}: fast matmul error {err_fast:e}");
        assert!(err_naive <= 2e-6, "{m}×{k}×{n}: naive matmul error {err_naive:e}");
    }
}

/// Every output element is one sequential multiply-add chain over k, whatever the tiling and
/// the thread count: here the bits must equal such a chain computed plainly.
#[cfg(target_arch = "x86_64")]
#[test]
fn matmul_is_one_multiply_add_chain_per_element() {
    let fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    for (i, &(m, k, n)) in SHAPES.iter().enumerate() {
        let x = values(m * k, 100 + i as u64);
        let w = values(n * k, 200 + i as u64);
        let mut fast = vec![0f32; m * n];
        matmul_bt(&x, &w, m, k, n, &mut fast);
        for e in 0..m * n {
            let (xi, wj) = (&x[e / n * k..][..k], &w[e % n * k..][..k]);
            let chain = xi.iter().zip(wj).fold(0f32, |s, (a, b)| if fma { a.mul_add(*b, s) } else { a * b + s });
            assert_eq!(fast[e].to_bits(), chain.to_bits(), "{m}×{k}×{n} element {e}");
        }
    }
}

#[test]
fn matmul_with_empty_dimensions() {
    let mut out = vec![1f32; 6];
    matmul_bt(&[], &[], 2, 0, 3, &mut out);
    assert_eq!(out, vec![0.0; 6]);
    matmul_bt(&[], &[1.0, 2.0], 0, 2, 1, &mut []);
}

/// HF's inverse frequencies, recomputed in f64 (`_compute_default_rope_parameters`,
/// `_compute_llama3_parameters`, `_compute_yarn_parameters` in modeling_rope_utils.py).
fn inv_freq_f64(rope: &RopeConfig, head_dim: usize) -> Vec<f64> {
    let default = (0..head_dim).step_by(2).map(|i| 1.0 / rope.theta.powf(i as f64 / head_dim as f64));
    match rope.scaling {
        RopeScaling::Default => default.collect(),
        RopeScaling::Linear { factor } => default.map(|f| f / factor).collect(),
        // Sequences up to the original length: the short factors.
        RopeScaling::LongRope { ref short, .. } => default.zip(short).map(|(f, e)| f / e).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let old = original_max_position_embeddings as f64;
            let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
            default
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        RopeScaling::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, truncate, .. } => {
            let dim = head_dim as f64;
            let corr = |r: f64| dim * (original_max_position_embeddings as f64 / (r * 2.0 * std::f64::consts::PI)).ln() / (2.0 * rope.theta.ln());
            let (low, high) = if truncate { (corr(beta_fast).floor(), corr(beta_slow).ceil()) } else { (corr(beta_fast), corr(beta_slow)) };
            let (low, high) = (low.max(0.0), high.min(dim - 1.0));
            default
                .enumerate()
                .map(|(i, f)| {
                    let extrapolate = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    f / factor * (1.0 - extrapolate) + f * extrapolate
                })
                .collect()
        }
    }
}

fn rope_configs() -> Vec<(RopeConfig, usize)> {
    let llama3 = |old| RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: old,
    };
    let yarn = |factor: f64, original, truncate| RopeScaling::Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast: 32.0,
        beta_slow: 1.0,
        truncate,
        attention_factor: 0.1 * factor.ln() + 1.0,
    };
    vec![
        (RopeConfig { theta: 10000.0, scaling: RopeScaling::Default }, 64),
        (RopeConfig { theta: 500000.0, scaling: llama3(64) }, 32), // families/llama3-rope-scaling
        (RopeConfig { theta: 500000.0, scaling: llama3(8192) }, 128), // Llama 3.1
        (RopeConfig { theta: 1e6, scaling: RopeScaling::Linear { factor: 8.0 } }, 128), // Gemma3's global layers
        (RopeConfig { theta: 1e6, scaling: yarn(4.0, 32768, true) }, 128), // Qwen2.5 / Qwen3 long context
        (RopeConfig { theta: 150000.0, scaling: yarn(32.0, 4096, false) }, 64), // GPT-OSS
    ]
}

#[test]
fn rope_matches_hf_formula_in_f64() {
    let (seq, n_heads) = (300, 3);
    for (rope_cfg, hd) in rope_configs() {
        let want_freq = inv_freq_f64(&rope_cfg, hd);
        let got_freq = Rope::inv_freq(&rope_cfg, hd);
        let freq_err = got_freq.iter().zip(&want_freq).map(|(g, w)| (f64::from(*g) - w).abs() / w).fold(0.0, f64::max);
        assert!(freq_err < 1e-6, "{rope_cfg:?}: inv_freq relative error {freq_err:e}");
        if matches!(rope_cfg.scaling, RopeScaling::Llama3 { .. } | RopeScaling::Yarn { .. }) {
            let plain = Rope::inv_freq(&RopeConfig { scaling: RopeScaling::Default, ..rope_cfg.clone() }, hd);
            assert_ne!(plain, got_freq, "the scaling changed nothing: a useless test case");
        }
        // cos and sin are multiplied by the attention factor (YaRN's 0.1·ln(factor) + 1).
        let af = rope_cfg.scaling.attention_factor();

        let x = values(seq * n_heads * hd, 7);
        let mut got = x.clone();
        Rope::new(&rope_cfg, hd, seq).apply(&mut got, seq, n_heads);
        let half = hd / 2;
        let mut want = vec![0f64; x.len()];
        for pos in 0..seq {
            for h in 0..n_heads {
                let base = (pos * n_heads + h) * hd;
                for i in 0..half {
                    let (a, b) = (f64::from(x[base + i]), f64::from(x[base + half + i]));
                    let (s, c) = (pos as f64 * want_freq[i]).sin_cos();
                    want[base + i] = af * (a * c - b * s); // q * cos + rotate_half(q) * sin, first half
                    want[base + half + i] = af * (b * c + a * s);
                }
            }
        }
        // HF itself forms the angle pos * inv_freq in f32: ~1e-7 relative, so ~3e-5 at
        // position 300.
        let err = max_rel_err(&got, &want);
        println!("rope theta {} hd {hd}: max rel err {err:.1e}", rope_cfg.theta);
        assert!(err < 1e-4, "{rope_cfg:?}: rope error {err:e}");
    }
}

/// Straightforward causal GQA attention in f64 (ALiBi's bias with `alibi_slopes`' slopes).
fn attention_f64(a: &Attention, q: &[f32], k: &[f32], v: &[f32], seq: usize) -> Vec<f64> {
    let hd = a.head_dim;
    let (qw, kvw, group) = (a.n_heads * hd, a.n_kv_heads * hd, a.n_heads / a.n_kv_heads);
    let slopes = a.alibi.map_or(vec![0.0; a.n_heads], |alibi| alibi_slopes(alibi, a.n_heads));
    let mut out = vec![0f64; seq * qw];
    for t in 0..seq {
        for h in 0..a.n_heads {
            let g = h / group;
            let visible: Vec<usize> = (0..=t).filter(|&s| a.sliding_window.is_none_or(|w| t - s < w)).collect();
            let scores: Vec<f64> = visible
                .iter()
                .map(|&s| {
                    let dot: f64 =
                        (0..hd).map(|d| f64::from(q[t * qw + h * hd + d]) * f64::from(k[s * kvw + g * hd + d])).sum();
                    // The scale as given (f32), then the soft cap c·tanh(s/c) (Gemma2), then
                    // ALiBi's slope·(j − i).
                    let scaled = dot * f64::from(a.scale);
                    let capped = a.softcap.map_or(scaled, |c| f64::from(c) * (scaled / f64::from(c)).tanh());
                    capped + f64::from(slopes[h]) * (s as f64 - t as f64)
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for (&s, score) in visible.iter().zip(&scores) {
                let p = (score - max).exp() / sum;
                for d in 0..hd {
                    out[t * qw + h * hd + d] += p * f64::from(v[s * kvw + g * hd + d]);
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_f64() {
    let cases = [
        (Attention { n_heads: 4, n_kv_heads: 2, head_dim: 16, sliding_window: None, scale: Attention::default_scale(16), softcap: None, flash_bf16: false, alibi: None }, 37),
        (Attention { n_heads: 4, n_kv_heads: 4, head_dim: 12, sliding_window: Some(5), scale: Attention::default_scale(12), softcap: None, flash_bf16: false, alibi: None }, 40),
        (Attention { n_heads: 1, n_kv_heads: 1, head_dim: 8, sliding_window: None, scale: Attention::default_scale(8), softcap: None, flash_bf16: false, alibi: None }, 1),
        // Several blocks of query rows (96 each), on several threads; windows shorter and
        // longer than a block.
        (Attention { n_heads: 8, n_kv_heads: 2, head_dim: 64, sliding_window: None, scale: Attention::default_scale(64), softcap: None, flash_bf16: false, alibi: None }, 200),
        (Attention { n_heads: 8, n_kv_heads: 1, head_dim: 64, sliding_window: Some(64), scale: Attention::default_scale(64), softcap: None, flash_bf16: false, alibi: None }, 200),
        (Attention { n_heads: 6, n_kv_heads: 2, head_dim: 32, sliding_window: Some(7), scale: Attention::default_scale(32), softcap: None, flash_bf16: false, alibi: None }, 300),
        (Attention { n_heads: 2, n_kv_heads: 2, head_dim: 20, sliding_window: Some(150), scale: Attention::default_scale(20), softcap: None, flash_bf16: false, alibi: None }, 333),
        // A free scale (Gemma2's query_pre_attn_scalar, Granite's attention_multiplier) and a
        // soft cap that bends most scores (cap 0.5 on scores of a few units).
        (Attention { n_heads: 4, n_kv_heads: 2, head_dim: 16, sliding_window: Some(8), scale: 0.125, softcap: Some(0.5), flash_bf16: false, alibi: None }, 37),
        (Attention { n_heads: 8, n_kv_heads: 2, head_dim: 64, sliding_window: None, scale: 0.031_25, softcap: Some(2.0), flash_bf16: false, alibi: None }, 200),
    ];
    for (i, (a, seq)) in cases.into_iter().enumerate() {
        let (qw, kvw) = (a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim);
        // Scaled up so that the softmax is far from uniform.
        let scaled = |len, seed| values(len, seed).into_iter().map(|v| 3.0 * v).collect::<Vec<f32>>();
        let (q, k, v) =
            (scaled(seq * qw, 3 * i as u64), scaled(seq * kvw, 3 * i as u64 + 1), values(seq * kvw, 3 * i as u64 + 2));
        let mut got = vec![f32::NAN; seq * qw];
        a.forward(&q, &k, &v, seq, &mut got);
        let err = max_rel_err(&got, &attention_f64(&a, &q, &k, &v, seq));
        println!("attention {a:?} seq {seq}: max rel err {err:.1e}");
        assert!(err < 1e-5, "{a:?}: attention error {err:e}");
    }
}

/// ALiBi attention (BLOOM's and MPT's slopes) against the f64 oracle: GQA, an odd sequence,
/// with and without a window, and 6 heads (not a power of two) over several 96-row blocks.
#[test]
fn alibi_attention_matches_f64() {
    let attn = |n_heads, n_kv_heads, head_dim, sliding_window, alibi| Attention {
        n_heads,
        n_kv_heads,
        head_dim,
        sliding_window,
        scale: Attention::default_scale(head_dim),
        softcap: None,
        flash_bf16: false,
        alibi: Some(alibi),
    };
    let mpt = Alibi::Mpt { bias_max: 8.0 };
    let cases = [
        (attn(4, 2, 16, None, Alibi::Bloom), 37),
        (attn(4, 2, 16, Some(8), Alibi::Bloom), 37),
        (attn(4, 2, 16, None, mpt), 37),
        (attn(4, 2, 16, Some(8), mpt), 37),
        (attn(6, 2, 32, None, Alibi::Bloom), 200),
        (attn(6, 3, 32, Some(50), mpt), 200),
    ];
    for (i, (a, seq)) in cases.into_iter().enumerate() {
        let (qw, kvw) = (a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim);
        let scaled = |len, seed| values(len, seed).into_iter().map(|v| 3.0 * v).collect::<Vec<f32>>();
        let (q, k, v) = (scaled(seq * qw, 50 + 3 * i as u64), scaled(seq * kvw, 51 + 3 * i as u64), values(seq * kvw, 52 + 3 * i as u64));
        let mut got = vec![f32::NAN; seq * qw];
        a.forward(&q, &k, &v, seq, &mut got);
        let err = max_rel_err(&got, &attention_f64(&a, &q, &k, &v, seq));
        let without = max_rel_err(&got, &attention_f64(&Attention { alibi: None, ..a }, &q, &k, &v, seq));
        println!("attention {a:?} seq {seq}: max rel err {err:.1e} ({without:.1e} from the oracle without ALiBi)");
        // The f32 score s + bias is rounded to 2^-24 |s + bias| with |s + bias| below ~20 where
        // the probability is not negligible (e^-20), so p is within ~1e-6 relative; with the
        // 2e-7 exp and f32 sums over <= 200 keys the output stays within 1e-5 of max |out|.
        assert!(err < 1e-5, "{a:?}: attention error {err:e}");
        assert!(without > 1e-2, "{a:?}: the bias changes nothing ({without:e})");
    }
}

/// `alibi_slopes` against HF's formulas evaluated in f64, for 4 and 8 heads (powers of two)
/// and 6 and 12 (not).
#[test]
fn alibi_slopes_match_hf_formulas() {
    // modeling_bloom.py build_alibi_tensor.
    let bloom = |n: usize| -> Vec<f64> {
        let cp = 2f64.powf((n as f64).log2().floor());
        let base = 2f64.powf(-(2f64.powf(-(cp.log2() - 3.0))));
        let mut slopes: Vec<f64> = (1..=cp as i32).map(|p| base.powi(p)).collect();
        if cp as usize != n {
            let extra_base = 2f64.powf(-(2f64.powf(-((2.0 * cp).log2() - 3.0))));
            let remaining = (cp as usize).min(n - cp as usize);
            slopes.extend((0..remaining).map(|i| extra_base.powi(1 + 2 * i as i32)));
        }
        slopes
    };
    // modeling_mpt.py build_mpt_alibi_tensor.
    let mpt = |n: usize, bias_max: f64| -> Vec<f64> {
        let pow2 = 2f64.powf((n as f64).log2().ceil());
        let slopes: Vec<f64> = (1..=pow2 as usize).map(|i| 1.0 / 2f64.powf(i as f64 * (bias_max / pow2))).collect();
        if pow2 as usize == n {
            return slopes;
        }
        let odd = slopes.iter().skip(1).step_by(2);
        odd.chain(slopes.iter().step_by(2)).copied().take(n).collect()
    };
    for n in [4, 6, 8, 12] {
        for (alibi, want) in [(Alibi::Bloom, bloom(n)), (Alibi::Mpt { bias_max: 8.0 }, mpt(n, 8.0))] {
            let got = alibi_slopes(alibi, n);
            assert_eq!(got.len(), n, "{alibi:?} {n} heads");
            for (h, (&g, &w)) in got.iter().zip(&want).enumerate() {
                // BLOOM raises an f32 base (rounded 2^-24 relative) to powers up to 8, then
                // rounds (powf, within an ulp 2^-23): at most 10·2^-24. MPT's exponents are
                // exact, 2^x and 1 / 2^x each within an ulp: 4·2^-24.
                let err = (f64::from(g) - w).abs() / w;
                assert!(err <= 10.0 * 2f64.powi(-24), "{alibi:?} {n} heads, head {h}: {g} vs {w} ({err:e})");
            }
        }
        // Both are 2^(-8h/n) over h = 1..=n, interleaved the same way when n is not a power of
        // two; for 4, 6 and 8 heads every slope is a power of two, exact in both. For 12, BLOOM's
        // powers of the rounded base f32(2^-0.5) land an ulp from MPT's 1 / 2^(h/2) for two heads.
        let (b, m) = (alibi_slopes(Alibi::Bloom, n), alibi_slopes(Alibi::Mpt { bias_max: 8.0 }, n));
        if n != 12 {
            assert_eq!(b, m, "{n} heads");
        }
        let diff = b.iter().zip(&m).map(|(x, y)| (x - y).abs() / y).fold(0f32, f32::max);
        assert!(f64::from(diff) <= 10.0 * 2f64.powi(-24), "{n} heads: BLOOM's and MPT's slopes differ by {diff:e}");
    }
    assert_eq!(alibi_slopes(Alibi::Bloom, 8), [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]);
}

#[test]
fn rms_norm_matches_f64() {
    let (rows, cols, eps) = (5, 300, 1e-5f32);
    let x: Vec<f32> = values(rows * cols, 11).into_iter().map(|v| 40.0 * v).collect();
    let weight = values(cols, 12);
    let mut got = vec![0f32; x.len()];
    ops::rms_norm(&x, &weight, eps, &mut got);
    let mut want = vec![0f64; x.len()];
    for r in 0..rows {
        let row = &x[r * cols..][..cols];
        let mean_sq = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / cols as f64;
        let inv = 1.0 / (mean_sq + f64::from(eps)).sqrt();
        for c in 0..cols {
            want[r * cols + c] = f64::from(row[c]) * inv * f64::from(weight[c]);
        }
    }
    let err = max_rel_err(&got, &want);
    assert!(err < 1e-6, "rms_norm error {err:e}");
}

#[test]
fn gelu_tanh_and_gemma_norm_match_f64() {
    // torch F.gelu(approximate="tanh") and GemmaRMSNorm's `normed * (1 + w)`, against f64.
    let gate = values(1000, 31).into_iter().map(|v| 10.0 * v).collect::<Vec<f32>>();
    let up = values(1000, 32);
    let mut got = gate.clone();
    ops::gated_mul(ops::gelu_tanh, &mut got, &up);
    let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
    let want: Vec<f64> = gate.iter().zip(&up).map(|(&g, &u)| gelu(f64::from(g)) * f64::from(u)).collect();
    assert!(max_rel_err(&got, &want) < 1e-6);

    let (rows, cols) = (3, 64);
    let x = values(rows * cols, 33);
    let w = values(cols, 34);
    let mut got = vec![0f32; x.len()];
    ops::rms_norm_offset(&x, &w, 1e-6, &mut got);
    let mut want = vec![0f64; x.len()];
    for (r, row) in x.chunks(cols).enumerate() {
        let inv = 1.0 / (row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / cols as f64 + 1e-6).sqrt();
        for c in 0..cols {
            want[r * cols + c] = f64::from(row[c]) * inv * (1.0 + f64::from(w[c]));
        }
    }
    assert!(max_rel_err(&got, &want) < 1e-6);
    // bf16: one rounding of the f32 result.
    let mut bf = vec![0f32; x.len()];
    ops::rms_norm_offset_bf16(&x, &w, 1e-6, &mut bf);
    assert!(bf.iter().zip(&got).all(|(&b, &g)| b == rq_min::numerics::round_bf16(g)));
}

#[test]
fn silu_mul_and_nll_match_f64() {
    let gate = values(1000, 21).into_iter().map(|v| 10.0 * v).collect::<Vec<f32>>();
    let up = values(1000, 22);
    let mut got = gate.clone();
    ops::silu_mul(&mut got, &up);
    let want: Vec<f64> =
        gate.iter().zip(&up).map(|(&g, &u)| f64::from(g) / (1.0 + (-f64::from(g)).exp()) * f64::from(u)).collect();
    assert!(max_rel_err(&got, &want) < 1e-6);

    // Large logits: a naive exp would overflow.
    let logits: Vec<f32> = values(32000, 23).into_iter().map(|v| 100.0 * v).collect();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = f64::from(max) + logits.iter().map(|&l| (f64::from(l) - f64::from(max)).exp()).sum::<f64>().ln();
    for target in [0, 17, 31999] {
        let want = lse - f64::from(logits[target]);
        let got = ops::log_softmax_nll(&logits, target);
        assert!((got - want).abs() < 1e-9 * want.abs().max(1.0), "{got} vs {want}");
    }
}

/// Granite's `logits / logits_scaling` and Gemma2's final soft cap `tanh(x / c) · c` in f32
/// against f64, and under bf16 each op rounded (the result a bf16 value).
#[test]
fn finish_logits_matches_f64() {
    let x: Vec<f32> = values(2000, 41).into_iter().map(|v| 40.0 * v).collect();
    for (divisor, cap) in [(Some(8.0f32), None), (None, Some(0.5f32)), (Some(3.0), Some(30.0))] {
        let mut got = x.clone();
        ops::finish_logits(false, &mut got, divisor, cap);
        let want: Vec<f64> = x
            .iter()
            .map(|&v| {
                let v = divisor.map_or(f64::from(v), |d| f64::from(v) / f64::from(d));
                cap.map_or(v, |c| f64::from(c) * (v / f64::from(c)).tanh())
            })
            .collect();
        let err = max_rel_err(&got, &want);
        assert!(err < 1e-6, "divisor {divisor:?} cap {cap:?}: error {err:e}");
        let mut bf = x.clone();
        ops::finish_logits(true, &mut bf, divisor, cap);
        assert!(bf.iter().all(|&v| rq_min::numerics::round_bf16(v) == v), "bf16 results are bf16 values");
        assert!(max_rel_err(&bf, &want) < 2.0f64.powi(-7), "bf16: within a few bf16 ulps");
    }
}
