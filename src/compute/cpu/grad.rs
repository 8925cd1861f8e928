//! Backward kernels of auto-quantize's gradient score (spec/algorithms.md §9.3,
//! src/ptq/backward.rs): the element-wise and row-wise pieces of the activation gradients that
//! are not products (those run on `matmul_bt`). Each is the oracle of a device twin in
//! cuda/backward.cu (tests/cuda_backward.rs). Every f64 sum runs in the order of one warp of
//! the device kernel ([`warp_sum`]) and every f32 operation is written out in the order the
//! kernel repeats, so both give the same bits.

use super::attention::{exp_softmax, softmax_visible};
use super::reduce::warp_sum;
use super::norm::{erff, Activation, NormKind};

/// The derivative of the MLP activation:
/// * silu(g) = g·σ(g): `σ(g)·(1 + g·(1 − σ(g)))`;
/// * gelu_tanh(g) = ½g(1 + tanh u), u = c(g + 0.044715g³), c = √(2/π):
///   `½(1 + tanh u) + ½g(1 − tanh²u)·c(1 + 3·0.044715g²)`;
/// * relu²(g) = max(g, 0)²: `2·max(g, 0)`;
/// * gelu(g) = g·Φ(g), Φ(g) = ½(1 + erf(g/√2)): `Φ(g) + g·exp(−g²/2)/√(2π)`, in the order of
///   torch's `GeluBackwardCUDAKernelImpl` (`cdf + x * pdf`, `pdf = exp(-0.5 * x * x) * kBeta`).
pub fn act_grad(act: Activation, g: f32) -> f32 {
    match act {
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-g).exp());
            s * (1.0 + g * (1.0 - s))
        }
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6;
            let t = (C * (g + 0.044715 * g * g * g)).tanh();
            0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * g * g)
        }
        // NaN and −0 give +0, as the device's `g > 0 ? g : 0`.
        Activation::Relu2 => 2.0 * if g > 0.0 { g } else { 0.0 },
        Activation::Gelu => {
            const INV_SQRT_2PI: f32 = 0.398_942_3;
            let cdf = 0.5 * (1.0 + erff(g * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * g * g).exp() * INV_SQRT_2PI;
            cdf + g * pdf
        }
    }
}

/// `out = (dm ⊙ u) ⊙ act'(x)`, or `dm ⊙ act'(x)` without `u`: the gradient at the activation's
/// input, given dm at the MLP's middle (gated: middle = act(x) ⊙ u; plain: middle = act(x)).
///
/// Panics if the lengths differ (a caller bug).
pub fn act_grad_mul(act: Activation, x: &[f32], dm: &[f32], u: Option<&[f32]>, out: &mut [f32]) {
    assert!(x.len() == dm.len() && x.len() == out.len() && u.is_none_or(|u| u.len() == x.len()), "act_grad_mul: lengths differ");
    for (i, (o, (&x, &d))) in out.iter_mut().zip(x.iter().zip(dm)).enumerate() {
        let d = u.map_or(d, |u| d * u[i]);
        *o = d * act_grad(act, x);
    }
}

/// The backward of `norm` (as `Compute::F32` runs it) over rows of `weight.len()` values,
/// added into `acc`: given the norm's input x and dy = dL/d(output), `acc += dL/dx`. The
/// effective weight is `1 + w` when `norm.offset` (GemmaRMSNorm, LayerNorm1P); a LayerNorm's
/// bias does not enter the input gradient. Per row of n values, with `g = w⊙dy`:
/// ```text
/// RMSNorm   (y = x·r·w, r = 1/sqrt(mean(x²) + eps)):       dx = r·g − x·r³·mean(x⊙g)
/// LayerNorm (y = x̂·w + b, x̂ = (x − μ)·r, r = 1/sqrt(var + eps)):  dx = r·(g − mean(g) − x̂·mean(g⊙x̂))
/// ```
/// Every mean is a [`warp_sum`] in f64 divided by n, then cast to f32.
///
/// Panics if the lengths are not whole rows of `weight.len()` (a caller bug).
pub fn norm_backward_add(norm: NormKind, x: &[f32], weight: &[f32], dy: &[f32], acc: &mut [f32]) {
    let n = weight.len();
    assert!(n > 0 && x.len().is_multiple_of(n), "norm_backward: {} values are not rows of {n}", x.len());
    assert!(x.len() == dy.len() && x.len() == acc.len(), "norm_backward: lengths differ");
    let w = |i: usize| if norm.offset { 1.0 + weight[i] } else { weight[i] };
    let nf = n as f64;
    for ((row, d), a) in x.chunks_exact(n).zip(dy.chunks_exact(n)).zip(acc.chunks_exact_mut(n)) {
        if norm.layer_norm {
            let mean = warp_sum(n, |i| f64::from(row[i])) / nf;
            let var = warp_sum(n, |i| (f64::from(row[i]) - mean) * (f64::from(row[i]) - mean)) / nf;
            let r = 1.0 / (var as f32 + norm.eps).sqrt();
            let mean = mean as f32;
            let mg = (warp_sum(n, |i| f64::from(w(i) * d[i])) / nf) as f32;
            let mgx = (warp_sum(n, |i| f64::from(w(i) * d[i] * ((row[i] - mean) * r))) / nf) as f32;
            for (i, a) in a.iter_mut().enumerate() {
                *a += r * (w(i) * d[i] - mg - (row[i] - mean) * r * mgx);
            }
        } else {
            let sum_sq = warp_sum(n, |i| f64::from(row[i]) * f64::from(row[i]));
            let r = 1.0 / ((sum_sq / nf) as f32 + norm.eps).sqrt();
            let dot = warp_sum(n, |i| f64::from(row[i] * w(i) * d[i]));
            let c = (dot / nf) as f32 * r * r * r;
            for (i, a) in a.iter_mut().enumerate() {
                *a += r * w(i) * d[i] - row[i] * c;
            }
        }
    }
}

/// The softmax of the attention backward's score block in place: `p` holds `[rows, n_keys]`
/// scores of the queries `t0..t0 + rows` against the keys `lo..lo + n_keys`; row r (query
/// t = t0 + r) becomes `softmax(scale · scores)` over the keys it sees, `first(t)..=t` with
/// `first(t) = t + 1 − window` under a sliding window (else 0), and 0 elsewhere
/// ([`softmax_visible`], the forward's f32 softmax, with its soft cap when `softcap` is set and
/// the ALiBi bias of the head's slope when `alibi_slope` is).
///
/// Panics if a row's visible keys are not inside the block (a caller bug).
#[allow(clippy::too_many_arguments)]
pub fn softmax_rows(
    p: &mut [f32],
    n_keys: usize,
    t0: usize,
    lo: usize,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
    alibi_slope: Option<f32>,
) {
    for (r, row) in p.chunks_exact_mut(n_keys).enumerate() {
        let t = t0 + r;
        let first = window.map_or(0, |w| (t + 1).saturating_sub(w));
        assert!(first >= lo && t < lo + n_keys, "softmax_rows: query {t} sees keys outside {lo}..{}", lo + n_keys);
        softmax_visible(row, first - lo, t - lo, scale, softcap, alibi_slope);
    }
}

/// The soft cap's backward in place: `ds[i] *= 1 − tanh(scale·raw[i] / cap)²`, the derivative of
/// `cap · tanh(s / cap)` at the scaled score `s = scale·raw[i]` (computed as the forward does:
/// `s / cap`, then tanh, in f32). NaN stays NaN.
///
/// Panics if the lengths differ (a caller bug).
pub fn softcap_grad(ds: &mut [f32], raw: &[f32], scale: f32, cap: f32) {
    assert_eq!(ds.len(), raw.len(), "softcap_grad: lengths differ");
    for (d, &x) in ds.iter_mut().zip(raw) {
        let t = (x * scale / cap).tanh();
        *d *= 1.0 - t * t;
    }
}

/// The softmax backward of attention, scaled, in place: `ds` holds dP (`[rows, n_keys]`) and
/// becomes `scale · P ⊙ (dP − c)` with `c = Σ_j P_j·dP_j` per row (a [`warp_sum`] in f64 of
/// the f32 products, cast to f32).
///
/// Panics if the lengths differ (a caller bug).
pub fn attention_ds(ds: &mut [f32], p: &[f32], n_keys: usize, scale: f32) {
    assert_eq!(ds.len(), p.len(), "attention_ds: lengths differ");
    for (dr, pr) in ds.chunks_exact_mut(n_keys).zip(p.chunks_exact(n_keys)) {
        let c = warp_sum(n_keys, |j| f64::from(pr[j] * dr[j])) as f32;
        for (d, &pv) in dr.iter_mut().zip(pr) {
            *d = scale * pv * (*d - c);
        }
    }
}

/// One row of logits z becomes the gradient of `scale · (logsumexp(z) − z[target])`, i.e.
/// `scale · (softmax(z) − onehot(target))`; returns the unscaled term (the NLL) in f64:
/// ```text
/// m = max z;  s = Σ_j e^(z_j − m) (warp_sum, f64);  nll = m + ln s − z[target]
/// lse = nll + z[target], split in two f32s hi + lo;  z_j ← e^((z_j − hi) − lo) · scale;  z[target] −= scale
/// ```
/// The exponentials are the forward softmax's (`exp_softmax`): a NaN logit gives NaN.
///
/// Panics if `target` is outside the row (a caller bug).
pub fn xent_grad_row(row: &mut [f32], target: usize, scale: f32) -> f64 {
    assert!(target < row.len(), "xent_grad_row: target {target} outside {} logits", row.len());
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = warp_sum(row.len(), |j| f64::from(exp_softmax(row[j] - max)));
    let nll = f64::from(max) + sum.ln() - f64::from(row[target]);
    let lse = nll + f64::from(row[target]);
    let hi = lse as f32;
    let lo = (lse - f64::from(hi)) as f32;
    for v in row.iter_mut() {
        *v = exp_softmax((*v - hi) - lo) * scale;
    }
    row[target] -= scale;
    nll
}

/// `out[c·rows + r] = a[r·cols + c]`: the `[cols, rows]` transpose of `a` (`[rows, cols]`),
/// copied in square tiles so both sides stay in cache.
///
/// Panics if the lengths are not `rows · cols` (a caller bug).
pub fn transpose(a: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    const TILE: usize = 32;
    assert!(a.len() == rows * cols && out.len() == a.len(), "transpose: not [rows, cols]");
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = a[r * cols + c];
                }
            }
        }
    }
}

/// Copies `n` columns of every row: `dst[r, dst_c0 + j] = src[r, src_c0 + j]` for j < n, rows
/// of `src_width` and `dst_width` values (as many rows as `src` holds).
///
/// Panics if the columns are outside the rows or the row counts differ (a caller bug).
pub fn copy_columns(src: &[f32], src_width: usize, src_c0: usize, dst: &mut [f32], dst_width: usize, dst_c0: usize, n: usize) {
    assert!(src_c0 + n <= src_width && dst_c0 + n <= dst_width, "copy_columns: columns outside the rows");
    assert_eq!(src.len() / src_width, dst.len() / dst_width, "copy_columns: row counts differ");
    for (s, d) in src.chunks_exact(src_width).zip(dst.chunks_exact_mut(dst_width)) {
        d[dst_c0..dst_c0 + n].copy_from_slice(&s[src_c0..src_c0 + n]);
    }
}

/// Swaps the two halves of the leading `rotary_dim` values of every head of `head_dim` values
/// (`x1 ↔ x2` of RoPE's rotate_half): with RoPE around it, the transpose of RoPE.
///
/// Panics if `x` is not whole heads or `rotary_dim` is odd or wider than a head (a caller bug).
pub fn swap_rotary_halves(x: &mut [f32], head_dim: usize, rotary_dim: usize) {
    assert!(rotary_dim.is_multiple_of(2) && rotary_dim <= head_dim && x.len().is_multiple_of(head_dim), "swap_rotary_halves: bad dims");
    for head in x.chunks_exact_mut(head_dim) {
        let (x1, x2) = head[..rotary_dim].split_at_mut(rotary_dim / 2);
        x1.swap_with_slice(x2);
    }
}

/// `x[r, ·] *= w[r]` for rows of `cols` values (an expert's routing weight per token).
///
/// Panics if `x` is not `w.len()` rows of `cols` (a caller bug).
pub fn scale_rows(x: &mut [f32], cols: usize, w: &[f32]) {
    assert_eq!(x.len(), w.len() * cols, "scale_rows: not [w.len(), cols]");
    for (row, &s) in x.chunks_exact_mut(cols.max(1)).zip(w) {
        row.iter_mut().for_each(|v| *v *= s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finite differences in f64 of `f` at x along the unit vectors: the gradient of Σ dy⊙f(x).
    fn numeric_grad(f: impl Fn(&[f64]) -> Vec<f64>, x: &[f32], dy: &[f32]) -> Vec<f64> {
        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        (0..x.len())
            .map(|i| {
                let h = 1e-6;
                let (mut a, mut b) = (x64.clone(), x64.clone());
                a[i] += h;
                b[i] -= h;
                let (fa, fb) = (f(&a), f(&b));
                fa.iter().zip(&fb).zip(dy).map(|((p, m), &d)| (p - m) / (2.0 * h) * f64::from(d)).sum()
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f64], tol: f64) {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((f64::from(g) - w).abs() <= tol * scale, "element {i}: {g} vs {w}");
        }
    }

    fn data(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.731).sin() * 1.7).collect()
    }

    #[test]
    fn norm_backward_is_the_derivative_of_the_norm() {
        let (n, rows) = (37, 3);
        let (x, w, dy) = (data(rows * n, 0.3), data(n, 5.1), data(rows * n, 9.7));
        for (layer_norm, offset) in [(false, false), (false, true), (true, false), (true, true)] {
            let norm = NormKind { layer_norm, offset, eps: 1e-5 };
            let w = &w;
            let f = |x: &[f64]| -> Vec<f64> {
                x.chunks(n)
                    .flat_map(|row| {
                        let mean = if layer_norm { row.iter().sum::<f64>() / n as f64 } else { 0.0 };
                        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
                        let r = 1.0 / (var + 1e-5).sqrt();
                        row.iter().enumerate().map(move |(i, v)| (v - mean) * r * (f64::from(w[i]) + if offset { 1.0 } else { 0.0 })).collect::<Vec<_>>()
                    })
                    .collect()
            };
            let mut acc = vec![0f32; x.len()];
            norm_backward_add(norm, &x, w, &dy, &mut acc);
            close(&acc, &numeric_grad(f, &x, &dy), 1e-5);
        }
    }

    #[test]
    fn act_grad_is_the_derivative_of_the_activation() {
        let x = data(64, 0.1);
        for (act, f) in [
            (Activation::Silu, (|v: f64| v / (1.0 + (-v).exp())) as fn(f64) -> f64),
            (Activation::GeluTanh, |v: f64| 0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())),
            (Activation::Relu2, |v: f64| v.max(0.0).powi(2)),
            (Activation::Gelu, super::super::norm::tests::gelu_f64),
        ] {
            let ones = vec![1f32; x.len()];
            let mut out = vec![0f32; x.len()];
            act_grad_mul(act, &x, &ones, None, &mut out);
            let want: Vec<f64> = x.iter().map(|&v| (f(f64::from(v) + 1e-6) - f(f64::from(v) - 1e-6)) / 2e-6).collect();
            close(&out, &want, 1e-5);
        }
    }

    #[test]
    fn xent_grad_is_softmax_minus_onehot() {
        let mut row = data(100, 2.0);
        let z: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
        let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        let nll = xent_grad_row(&mut row, 7, 0.5);
        assert!((nll - (lse - z[7])).abs() < 1e-6, "{nll}");
        let want: Vec<f64> = z.iter().enumerate().map(|(j, v)| 0.5 * ((v - lse).exp() - f64::from(u8::from(j == 7)))).collect();
        close(&row, &want, 1e-6);
        let mut nan = vec![0.0, f32::NAN, 1.0];
        assert!(xent_grad_row(&mut nan, 0, 1.0).is_nan() && nan.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn attention_ds_is_the_softmax_backward() {
        // Softmax over a row of 5 keys (scale 0.5): ds = 0.5·P ⊙ (dP − P·dP) is the gradient of
        // Σ dP ⊙ softmax(0.5·s) w.r.t. 0.5·s, times 0.5.
        let s = data(5, 1.0);
        let mut p = s.clone();
        softmax_rows(&mut p, 5, 4, 0, None, 0.5, None, None);
        let dp = data(5, 3.0);
        let mut ds = dp.clone();
        attention_ds(&mut ds, &p, 5, 0.5);
        let f = |s: &[f64]| -> Vec<f64> {
            let e: Vec<f64> = s.iter().map(|v| (0.5 * v).exp()).collect();
            let t: f64 = e.iter().sum();
            e.iter().map(|v| v / t).collect()
        };
        close(&ds, &numeric_grad(f, &s, &dp), 1e-5);
        // A sliding window of 2 at query 3 of keys 2..5: only keys 2 and 3 are visible.
        let mut p = vec![1.0, 1.0, 9.0];
        softmax_rows(&mut p, 3, 3, 2, Some(2), 1.0, None, None);
        assert_eq!(p, [0.5, 0.5, 0.0]);
    }

    #[test]
    fn softcapped_attention_backward_is_the_gradient() {
        // With Gemma2's cap c: P = softmax(c·tanh(0.5·s / c)); attention_ds (which carries the
        // 0.5) then softcap_grad is the gradient of Σ dP ⊙ P w.r.t. s.
        let (s, cap) = (data(5, 4.0), 1.5f32);
        let mut p = s.clone();
        softmax_rows(&mut p, 5, 4, 0, None, 0.5, Some(cap), None);
        let dp = data(5, 3.0);
        let mut ds = dp.clone();
        attention_ds(&mut ds, &p, 5, 0.5);
        softcap_grad(&mut ds, &s, 0.5, cap);
        let c = f64::from(cap);
        let f = |s: &[f64]| -> Vec<f64> {
            let e: Vec<f64> = s.iter().map(|v| (c * (0.5 * v / c).tanh()).exp()).collect();
            let t: f64 = e.iter().sum();
            e.iter().map(|v| v / t).collect()
        };
        close(&ds, &numeric_grad(f, &s, &dp), 1e-5);
    }

    #[test]
    fn alibi_softmax_rows_add_the_bias() {
        // Queries 6..9 over keys 2..9 under a window of 5, slope 0.25: row t is
        // softmax(0.5·s_j + 0.25·(j − t)) over j in t−4..=t, 0 elsewhere.
        let (rows, n_keys, t0, lo, window, slope) = (3, 7, 6, 2, 5, 0.25f32);
        let s = data(rows * n_keys, 4.0);
        let mut p = s.clone();
        softmax_rows(&mut p, n_keys, t0, lo, Some(window), 0.5, None, Some(slope));
        let mut want = vec![0f64; p.len()];
        for r in 0..rows {
            let t = t0 + r;
            let keys = t + 1 - window..=t;
            let score = |j: usize| 0.5 * f64::from(s[r * n_keys + j - lo]) + f64::from(slope) * (j as f64 - t as f64);
            let total: f64 = keys.clone().map(|j| score(j).exp()).sum();
            for j in keys {
                want[r * n_keys + j - lo] = score(j).exp() / total;
            }
        }
        // f32 scores of a few units (rounding 2^-24 relative each) and a 2e-7 exp: ~1e-6 at most.
        close(&p, &want, 2e-6);
        assert!(p.iter().zip(&want).all(|(&g, &w)| (g == 0.0) == (w == 0.0)), "the masked keys");
    }

    #[test]
    fn layout_copies() {
        let a: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let mut t = vec![0f32; 6];
        transpose(&a, 2, 3, &mut t);
        assert_eq!(t, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let mut d = vec![0f32; 4];
        copy_columns(&a, 3, 1, &mut d, 2, 0, 2);
        assert_eq!(d, [1.0, 2.0, 4.0, 5.0]);
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 5.0];
        swap_rotary_halves(&mut x, 5, 4);
        assert_eq!(x, [3.0, 4.0, 1.0, 2.0, 5.0]);
        scale_rows(&mut x, 5, &[2.0]);
        assert_eq!(x, [6.0, 8.0, 2.0, 4.0, 10.0]);
    }
}
