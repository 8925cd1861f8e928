//! Activation gradients of the LM loss, for the gradient sensitivity score of auto_quantize
//! (spec §9.3: `score += Σ (g ⊙ Δ)²` with `g = ∂L/∂y` for every linear output y). Only the
//! gradients w.r.t. activations are computed, never w.r.t. weights.
//!
//! Like the forward, the backward goes layer at a time, from the head down:
//! ```text
//! hs[0] = embed(ids); hs[i+1] = layer_i(hs[i])           (keep each layer's input)
//! (loss, g) = head_backward(head, hs[n], ids, ..)         g = dL/dhs[n]
//! for i in (0..n).rev(): g = layer_backward(layer_i, .., hs[i], seq, g, ..)
//! ```
//! Each layer's forward is recomputed from its input in f32 (`Compute::F32`, whatever the
//! layer was loaded with), keeping the intermediates the backward needs. Every family of the
//! runtime is covered (src/model.rs `Layer::forward`): biases, q/k RMSNorm, `1 + w` norms,
//! LayerNorms, gated and plain MLPs with their activations, partial RoPE, MoE blocks.
//! The gradient into the embedding (Gemma's scale) is not needed and not computed.
//!
//! Layouts are the forward's: activations `[seq, features]` row-major, a Linear weight W
//! `[out, in]` with `y = x·Wᵀ + b`, so the input gradient is `dx = dy·W` (the bias does not
//! enter it).

use crate::model::config::{Activation, ModelConfig};
use crate::compute::{act_fn, Compute};
use crate::model::{Head, Layer, LinearKind};
use crate::model::{moe::MoeBlock, MoeConfig};
use crate::compute::cpu::{self as ops, Attention};
use crate::compute::Rope;
use crate::compute::Tensor;
use std::borrow::Cow;

/// Memory for one block of logits (and their gradient, in place) in [`head_backward`]; blocks
/// are as tall as this allows, up to `HEAD_MAX_ROWS` positions (as in `Head::nll`).
const HEAD_BLOCK_BYTES: usize = 64 << 20;
const HEAD_MAX_ROWS: usize = 512;
/// Memory for the rows of lm_head transposed at a time for `dL/dnormed = dL/dlogits · W_head`
/// (all of it for small models), so that a large `[vocab, hidden]` matrix is never copied whole.
const HEAD_TRANSPOSE_BYTES: usize = 64 << 20;
/// Query rows per block in the attention backward: a block computes its scores against all the
/// keys its last row sees, so shorter blocks skip more of the masked half but make smaller
/// products.
const ATTENTION_ROWS: usize = 128;
/// Side of the square tiles [`transpose`] copies (cache blocking).
const TRANSPOSE_TILE: usize = 32;

/// What `layer_backward` reports per linear: its kind, the MoE expert it belongs to (None for
/// the dense linears), its input x (`[rows, in]`) and dL/dy (`[rows, out]`). An expert's rows
/// are the tokens routed to it, in token order.
pub type EachLinear<'a> = dyn FnMut(LinearKind, Option<usize>, &[f32], &[f32]) + 'a;

/// Forward of one decoder layer from its input `h_in` (`[seq, hidden]`), recomputing what the
/// backward needs, then the backward: given `dh_out` = dL/dh_out (`[seq, hidden]`) returns
/// dL/dh_in and calls `each` for every linear, in backward order: the MLP's (Down, Gate, Up;
/// in an MoE layer those of each expert that received tokens, experts in index order), then
/// O, Q, K, V.
///
/// Forward (HF `LlamaDecoderLayer` and the family differences of `Layer::forward`, f32):
/// ```text
/// x1 = norm1(h_in);  q, k, v = x1·Wqᵀ + bq, x1·Wkᵀ + bk, x1·Wvᵀ + bv
/// q, k = rms_head(q)·wq, rms_head(k)·wk   (Qwen3: per head of head_dim);  q, k = rope(q), rope(k)
/// a = attention(q, k, v);  h_mid = h_in + a·Woᵀ + bo
/// x2 = norm2(h_mid);  h_out = h_mid + mlp(x2)
/// mlp(x) = (act(x·Wgᵀ) ⊙ x·Wuᵀ)·Wdᵀ  |  act(x·Wuᵀ + bu)·Wdᵀ + bd  |  Σ_top-k w_e(x)·expert_e(x)
/// ```
/// Backward:
/// ```text
/// dx2 = mlp_backward(x2, dh_out);  dh_mid = dh_out + norm2_backward(h_mid, dx2)
/// dy_o = dh_mid;  da = dy_o·Wo;  (dq, dk, dv) = attention_backward(da)
/// dq, dk = ropeᵀ(dq), ropeᵀ(dk);  dy_q, dy_k = rms_head_backward(dq), rms_head_backward(dk);  dy_v = dv
/// dx1 = dy_q·Wq + dy_k·Wk + dy_v·Wv;  dh_in = dh_mid + norm1_backward(h_in, dx1)
/// ```
/// Memory: O(seq × (hidden + intermediate)) activations plus, for the attention of one head
/// and one block of queries at a time, four `ATTENTION_ROWS × seq` buffers (P, dS and their
/// transposes).
///
/// Panics if `h_in`, `dh_out` are not `[seq, hidden]` or `rope` holds fewer than `seq`
/// positions (caller bugs).
pub fn layer_backward(
    layer: &Layer,
    cfg: &ModelConfig,
    rope: &Rope,
    h_in: &[f32],
    seq: usize,
    dh_out: &[f32],
    each: &mut EachLinear,
) -> Vec<f32> {
    let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
    let (n_heads, n_kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    assert_eq!(h_in.len(), seq * h, "layer_backward: h_in is not [seq, hidden_size]");
    assert_eq!(dh_out.len(), seq * h, "layer_backward: dh_out is not [seq, hidden_size]");
    let dense = |kind: LinearKind| Linear { w: layer.weight(kind), b: layer.bias(kind), shape: kind.shape(cfg) };

    let (input_norm, post_norm) = (layer.input_norm.to_host(), layer.post_norm.to_host());
    let input_norm_bias = layer.input_norm_bias.as_ref().map(Tensor::to_host);
    let post_norm_bias = layer.post_norm_bias.as_ref().map(Tensor::to_host);

    // Attention forward, f32.
    let mut x1 = vec![0f32; seq * h];
    Compute::F32.norm(cfg.norm_kind(), h_in, &input_norm, input_norm_bias.as_deref(), &mut x1);
    let mut q = dense(LinearKind::Q).forward(&x1, seq);
    let mut k = dense(LinearKind::K).forward(&x1, seq);
    let v = dense(LinearKind::V).forward(&x1, seq);
    // Qwen3: the q/k projections before their per-head RMSNorm.
    let qk_pre = layer.qk_norm().map(|(wq, wk)| {
        let pre = (q.clone(), k.clone());
        ops::rms_norm(&pre.0, &wq, eps, &mut q);
        ops::rms_norm(&pre.1, &wk, eps, &mut k);
        pre
    });
    rope.apply(&mut q, seq, n_heads);
    rope.apply(&mut k, seq, n_kv);
    let attention = Attention {
        n_heads,
        n_kv_heads: n_kv,
        head_dim: cfg.head_dim,
        sliding_window: cfg.sliding_window,
        flash_bf16: false,
    };
    let mut attn = vec![0f32; q.len()];
    attention.forward(&q, &k, &v, seq, &mut attn);
    let mut h_mid = dense(LinearKind::O).forward(&attn, seq);
    ops::add_in_place(&mut h_mid, h_in);

    // MLP.
    let mut x2 = vec![0f32; seq * h];
    Compute::F32.norm(cfg.norm_kind(), &h_mid, &post_norm, post_norm_bias.as_deref(), &mut x2);
    let dx2 = match (layer.moe(), cfg.moe_layer(layer.index)) {
        (Some(block), Some(moe)) => moe_backward(block, moe, cfg, &x2, seq, dh_out, each),
        _ => {
            let gate = cfg.gated_mlp().then(|| dense(LinearKind::Gate));
            let (up, down) = (dense(LinearKind::Up), dense(LinearKind::Down));
            mlp_backward(gate.as_ref(), &up, &down, cfg.act, &x2, seq, dh_out, &mut |kind, x, dy| each(kind, None, x, dy)).0
        }
    };
    drop(x2);
    let mut dh_mid = dh_out.to_vec();
    norm_backward_add(cfg, &h_mid, &post_norm, &dx2, &mut dh_mid);
    drop((dx2, h_mid));

    // Attention backward.
    each(LinearKind::O, None, &attn, &dh_mid);
    let d_attn = dense(LinearKind::O).input_grad(&dh_mid, seq);
    drop(attn);
    let [mut dy_q, mut dy_k, dy_v] = attention_backward(&attention, &q, &k, &v, &d_attn, seq);
    drop((q, k, v, d_attn));
    rope_transpose(rope, &mut dy_q, seq, n_heads, cfg.head_dim, cfg.rotary_dim);
    rope_transpose(rope, &mut dy_k, seq, n_kv, cfg.head_dim, cfg.rotary_dim);
    if let (Some((q_pre, k_pre)), Some((wq, wk))) = (qk_pre, layer.qk_norm()) {
        for (pre, w, dy) in [(&q_pre, &wq[..], &mut dy_q), (&k_pre, &wk[..], &mut dy_k)] {
            let mut d = vec![0f32; dy.len()];
            rms_norm_backward_add(pre, w, eps, dy, &mut d);
            *dy = d;
        }
    }
    each(LinearKind::Q, None, &x1, &dy_q);
    each(LinearKind::K, None, &x1, &dy_k);
    each(LinearKind::V, None, &x1, &dy_v);
    let mut dx1 = dense(LinearKind::Q).input_grad(&dy_q, seq);
    ops::add_in_place(&mut dx1, &dense(LinearKind::K).input_grad(&dy_k, seq));
    ops::add_in_place(&mut dx1, &dense(LinearKind::V).input_grad(&dy_v, seq));
    let mut dh_in = dh_mid;
    norm_backward_add(cfg, h_in, &input_norm, &dx1, &mut dh_in);
    dh_in
}

/// One linear's weight `[out, in]` and bias.
struct Linear<'a> {
    w: Cow<'a, [f32]>,
    b: Option<Cow<'a, [f32]>>,
    shape: [usize; 2],
}

impl Linear<'_> {
    /// `y = x·Wᵀ + b` for `rows` rows of x.
    fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let [n, k] = self.shape;
        let mut y = vec![0f32; rows * n];
        ops::matmul_bt(x, &self.w, rows, k, n, &mut y);
        if let Some(b) = &self.b {
            y.chunks_exact_mut(n).for_each(|row| ops::add_in_place(row, b));
        }
        y
    }

    /// `dx = dy·W` (`matmul_bt` against a transposed copy of W, `[in, out]`).
    fn input_grad(&self, dy: &[f32], rows: usize) -> Vec<f32> {
        let [n_out, n_in] = self.shape;
        let w_t = transpose(&self.w, n_out, n_in);
        let mut dx = vec![0f32; rows * n_in];
        ops::matmul_bt(dy, &w_t, rows, n_out, n_in, &mut dx);
        dx
    }
}

/// The derivative of the MLP activation:
/// * silu(g) = g·σ(g): `σ(g)·(1 + g·(1 − σ(g)))`;
/// * gelu_tanh(g) = ½g(1 + tanh u), u = c(g + 0.044715g³), c = √(2/π):
///   `½(1 + tanh u) + ½g(1 − tanh²u)·c(1 + 3·0.044715g²)`;
/// * relu²(g) = max(g, 0)²: `2·max(g, 0)`.
fn act_grad(act: Activation, g: f32) -> f32 {
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
        Activation::Relu2 => 2.0 * g.max(0.0),
    }
}

/// Forward and backward of an MLP on `rows` rows of its input x, given `d_out` = dL/d(down's
/// output): `down(act(gate(x)) ⊙ up(x))`, or `down(act(up(x)))` without a gate. Calls
/// `each(kind, x, dy)` for Down, Gate (if any), Up; returns dL/dx and down's input m.
/// ```text
/// gated: dm = d_out·Wd;  dy_up = dm ⊙ act(g);  dy_gate = dm ⊙ u ⊙ act'(g);  dx = dy_gate·Wg + dy_up·Wu
/// plain: dm = d_out·Wd;  dy_up = dm ⊙ act'(u);  dx = dy_up·Wu
/// ```
#[allow(clippy::too_many_arguments)]
fn mlp_backward(
    gate: Option<&Linear>,
    up: &Linear,
    down: &Linear,
    act: Activation,
    x: &[f32],
    rows: usize,
    d_out: &[f32],
    each: &mut dyn FnMut(LinearKind, &[f32], &[f32]),
) -> (Vec<f32>, Vec<f32>) {
    let f = act_fn(act);
    let u = up.forward(x, rows);
    let g = gate.map(|gate| gate.forward(x, rows));
    let m: Vec<f32> = match &g {
        Some(g) => g.iter().zip(&u).map(|(&g, &u)| f(g) * u).collect(),
        None => u.iter().map(|&u| f(u)).collect(),
    };
    each(LinearKind::Down, &m, d_out);
    let dm = down.input_grad(d_out, rows);
    let mut dx = match (gate, &g) {
        (Some(gate), Some(g)) => {
            let dy_gate: Vec<f32> = dm.iter().zip(g.iter().zip(&u)).map(|(&d, (&g, &u))| d * u * act_grad(act, g)).collect();
            let dy_up: Vec<f32> = dm.iter().zip(g).map(|(&d, &g)| d * f(g)).collect();
            each(LinearKind::Gate, x, &dy_gate);
            each(LinearKind::Up, x, &dy_up);
            let mut dx = gate.input_grad(&dy_gate, rows);
            ops::add_in_place(&mut dx, &up.input_grad(&dy_up, rows));
            dx
        }
        _ => {
            let dy_up: Vec<f32> = dm.iter().zip(&u).map(|(&d, &u)| d * act_grad(act, u)).collect();
            each(LinearKind::Up, x, &dy_up);
            up.input_grad(&dy_up, rows)
        }
    };
    dx.shrink_to_fit();
    (dx, m)
}

/// Backward of an MoE block (`MoeBlock::forward`, f32) on its normed input x (`[seq, hidden]`),
/// given `d_out` = dL/d(block output). With the top-k experts K(t) of token t and their weights
/// w_e(x_t), `out_t = Σ_{e∈K(t)} w_e·E_e(x_t)`; the selection K is piecewise constant, so:
/// ```text
/// dL/dE_e(x_t) = w_e·d_out_t          (the down projection's dy, on the tokens routed to e)
/// dL/dw_e = d_out_t · E_e(x_t)
/// renormalised (w = softmax over K of the logits l):  dl_i = w_i·(dw_i − Σ_{j∈K} w_j·dw_j) for i ∈ K, else 0
/// plain (w = p = softmax over all experts):            dl_i = p_i·([i∈K]·dw_i − Σ_{j∈K} p_j·dw_j)
/// dx_t = Σ_{e∈K(t)} dE_e/dx + dl_t·W_router
/// ```
fn moe_backward(
    block: &MoeBlock,
    moe: &MoeConfig,
    cfg: &ModelConfig,
    x: &[f32],
    seq: usize,
    d_out: &[f32],
    each: &mut EachLinear,
) -> Vec<f32> {
    let (h, n) = (cfg.hidden_size, block.num_experts());
    let routes = block.route(moe, &Tensor::from(x.to_vec()), seq, Compute::F32);
    let mut dx = vec![0f32; seq * h];
    // dL/dw per token and kept slot.
    let mut dw: Vec<Vec<f64>> = routes.iter().map(|r| vec![0.0; r.len()]).collect();
    for e in 0..n {
        // (token, slot, weight) of the tokens routed to e, in token order.
        let rows: Vec<(usize, usize, f32)> = routes
            .iter()
            .enumerate()
            .filter_map(|(t, r)| r.iter().position(|k| k.0 == e).map(|s| (t, s, r[s].1)))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let xe: Vec<f32> = rows.iter().flat_map(|&(t, _, _)| x[t * h..(t + 1) * h].iter().copied()).collect();
        let d_down: Vec<f32> = rows.iter().flat_map(|&(t, _, w)| d_out[t * h..(t + 1) * h].iter().map(move |&d| w * d)).collect();
        let lin = |kind| Linear { w: block.weight(e, kind), b: None, shape: moe.expert_shape(cfg, kind) };
        let (gate, up, down) = (lin(LinearKind::Gate), lin(LinearKind::Up), lin(LinearKind::Down));
        let (dxe, m) =
            mlp_backward(Some(&gate), &up, &down, cfg.act, &xe, rows.len(), &d_down, &mut |kind, x, dy| each(kind, Some(e), x, dy));
        let y = down.forward(&m, rows.len());
        for (r, &(t, s, _)) in rows.iter().enumerate() {
            let d = &d_out[t * h..(t + 1) * h];
            dw[t][s] = d.iter().zip(&y[r * h..(r + 1) * h]).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            ops::add_in_place(&mut dx[t * h..(t + 1) * h], &dxe[r * h..(r + 1) * h]);
        }
    }
    // Router logits' gradient, then dx += dl·W_router.
    let router = block.router_weight();
    let mut logits = vec![0f32; seq * n];
    ops::matmul_bt(x, &router, seq, h, n, &mut logits);
    let mut dl = vec![0f32; seq * n];
    for ((route, dw), (z, dl)) in routes.iter().zip(&dw).zip(logits.chunks_exact(n).zip(dl.chunks_exact_mut(n))) {
        if moe.norm_topk_prob {
            let s: f64 = route.iter().zip(dw).map(|(k, &d)| f64::from(k.1) * d).sum();
            for (k, &d) in route.iter().zip(dw) {
                dl[k.0] = (f64::from(k.1) * (d - s)) as f32;
            }
        } else {
            let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let exp: Vec<f64> = z.iter().map(|&v| (f64::from(v) - max).exp()).collect();
            let total: f64 = exp.iter().sum();
            let p: Vec<f64> = exp.iter().map(|v| v / total).collect();
            let s: f64 = route.iter().zip(dw).map(|(k, &d)| p[k.0] * d).sum();
            for (i, o) in dl.iter_mut().enumerate() {
                *o = (-p[i] * s) as f32;
            }
            for (k, &d) in route.iter().zip(dw) {
                dl[k.0] += (p[k.0] * d) as f32;
            }
        }
    }
    let router = Linear { w: router, b: None, shape: [n, h] };
    ops::add_in_place(&mut dx, &router.input_grad(&dl, seq));
    dx
}

/// Mean next-token cross-entropy over positions `0..seq-1` (position t predicts `ids[t+1]`, HF's
/// LM loss with labels = input_ids) and its gradient w.r.t. `hidden`, the final hidden state
/// before the final norm (`[seq, hidden]`, seq = `ids.len()`). With `n = seq − 1` terms,
/// `z = x·W_headᵀ`, `x = norm(hidden)` (the family's final norm, f32):
/// ```text
/// L = (1/n) Σ_t (logsumexp(z_t) − z_t[ids[t+1]])
/// dL/dz_t = (softmax(z_t) − onehot(ids[t+1])) / n      (0 for the last position)
/// dL/dx = dL/dz · W_head;   dL/dhidden = norm_backward(hidden, w, dL/dx)
/// ```
/// The logits are made a block of positions at a time (64 MiB at most); `each_head(x, dz)` is
/// called once per block with the lm_head input rows x (`[rows, hidden]`) and their dL/dz
/// (`[rows, vocab]`), the blocks covering positions `0..seq-1`. A sequence of fewer than two
/// tokens has no term: the loss is 0, the gradient zero and `each_head` is not called.
///
/// Panics if an id is outside the vocabulary (`Model::embed` has rejected those already) or
/// `hidden` is not `[ids.len(), hidden]`.
pub fn head_backward(
    head: &Head,
    hidden: &[f32],
    ids: &[u32],
    each_head: &mut dyn FnMut(&[f32], &[f32]),
) -> (f64, Vec<f32>) {
    let (norm, w_head) = (head.norm_weight(), head.lm_head());
    let h = norm.len();
    let vocab = w_head.len() / h;
    let seq = ids.len();
    assert_eq!(hidden.len(), seq * h, "head_backward: hidden is not [ids.len(), hidden_size]");
    let mut d_hidden = vec![0f32; seq * h];
    let scored = seq.saturating_sub(1);
    if scored == 0 {
        return (0.0, d_hidden);
    }
    let inv_n = 1.0 / scored as f64;
    let mut normed = vec![0f32; seq * h];
    let cfg = head.config();
    Compute::F32.norm(cfg.norm_kind(), hidden, &norm, head.norm_bias().as_deref(), &mut normed);
    let mut d_normed = vec![0f32; seq * h];
    let mut loss = 0f64;
    let block = (HEAD_BLOCK_BYTES / (4 * vocab)).clamp(1, HEAD_MAX_ROWS);
    let chunk = (HEAD_TRANSPOSE_BYTES / (4 * h)).clamp(1, vocab);
    for t0 in (0..scored).step_by(block) {
        let rows = block.min(scored - t0);
        let x = &normed[t0 * h..(t0 + rows) * h];
        let mut z = vec![0f32; rows * vocab];
        ops::matmul_bt(x, &w_head, rows, h, vocab, &mut z);
        // Row by row, z becomes dL/dz: with nll = logsumexp(z) − z[target],
        // softmax(z)_j = exp(z_j − logsumexp(z)) = exp(z_j − nll − z[target]). Rows are split
        // over threads; the partial losses are added in a fixed order (deterministic).
        let grad_rows = |r0: usize, z: &mut [f32]| -> f64 {
            let scale = inv_n as f32;
            let mut sum = 0f64;
            for (r, row) in z.chunks_exact_mut(vocab).enumerate() {
                let target = ids[t0 + r0 + r + 1] as usize;
                let nll = ops::log_softmax_nll(row, target);
                sum += nll;
                // lse split in two f32s: z_j − lse keeps f64 accuracy in vectorizable f32.
                let lse = nll + f64::from(row[target]);
                let lse_hi = lse as f32;
                let lse_lo = (lse - f64::from(lse_hi)) as f32;
                for v in row.iter_mut() {
                    *v = ops::exp_nonpositive((*v - lse_hi) - lse_lo) * scale;
                }
                row[target] -= scale;
            }
            sum
        };
        let per = rows.div_ceil(ops::num_threads());
        let parts: Vec<f64> = std::thread::scope(|s| {
            let mut pieces = z.chunks_mut(per * vocab);
            let first = pieces.next();
            let handles: Vec<_> =
                pieces.enumerate().map(|(i, piece)| s.spawn(move || grad_rows((i + 1) * per, piece))).collect();
            let first = first.map_or(0.0, |piece| grad_rows(0, piece));
            std::iter::once(first).chain(handles.into_iter().map(|h| h.join().expect("head_backward worker"))).collect()
        });
        loss += parts.iter().sum::<f64>();
        each_head(x, &z);
        // dL/dx = dL/dz · W_head, a chunk of vocabulary rows at a time:
        // dx += dz[:, c] · W_head[c, :] with W_head[c, :] transposed.
        let dx = &mut d_normed[t0 * h..(t0 + rows) * h];
        let mut part = vec![0f32; rows * h];
        for c0 in (0..vocab).step_by(chunk) {
            let cols = chunk.min(vocab - c0);
            let w_t = transpose(&w_head[c0 * h..(c0 + cols) * h], cols, h); // [h, cols]
            let copy;
            let dz = if cols == vocab {
                &z[..]
            } else {
                copy = columns(&z, vocab, c0, cols); // [rows, cols]
                &copy[..]
            };
            ops::matmul_bt(dz, &w_t, rows, cols, h, &mut part);
            ops::add_in_place(dx, &part);
        }
    }
    norm_backward_add(cfg, hidden, &norm, &d_normed, &mut d_hidden);
    (loss * inv_n, d_hidden)
}

/// Backward of the norm of `cfg` (as `Compute::norm` runs it in f32) over rows of
/// `weight.len()` values, added into `acc`: RMSNorm or LayerNorm, with the effective weight
/// `1 + w` when `cfg.norm_offset` (GemmaRMSNorm, LayerNorm1P). A LayerNorm's bias does not
/// enter the input gradient.
fn norm_backward_add(cfg: &ModelConfig, x: &[f32], weight: &[f32], dy: &[f32], acc: &mut [f32]) {
    let one_plus: Vec<f32>;
    let weight = if cfg.norm_offset {
        one_plus = weight.iter().map(|&w| 1.0 + w).collect();
        &one_plus
    } else {
        weight
    };
    if cfg.layer_norm {
        layer_norm_backward_add(x, weight, cfg.rms_norm_eps, dy, acc);
    } else {
        rms_norm_backward_add(x, weight, cfg.rms_norm_eps, dy, acc);
    }
}

/// LayerNorm backward, added into `acc`. Per row of n values, with `x̂ = (x − μ)·r`,
/// `r = 1/sqrt(var + eps)` (biased variance) and `y = x̂·w + b`, `g = w⊙dy`:
/// ```text
/// dx = r·(g − mean(g) − x̂·mean(g⊙x̂))
/// ```
/// μ and var as `ops::layer_norm` computes them (f64 sums); the means of the products in f64.
fn layer_norm_backward_add(x: &[f32], weight: &[f32], eps: f32, dy: &[f32], acc: &mut [f32]) {
    let n = weight.len();
    assert!(x.len() == dy.len() && x.len() == acc.len(), "layer_norm_backward: lengths differ");
    for ((row, d), a) in x.chunks_exact(n).zip(dy.chunks_exact(n)).zip(acc.chunks_exact_mut(n)) {
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let var = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n as f64;
        let r = 1.0 / (var as f32 + eps).sqrt();
        let mean = mean as f32;
        let (mut mg, mut mgx) = (0f64, 0f64);
        for ((&xv, &w), &g) in row.iter().zip(weight).zip(d) {
            let (gw, xh) = (w * g, (xv - mean) * r);
            mg += f64::from(gw);
            mgx += f64::from(gw * xh);
        }
        let (mg, mgx) = ((mg / n as f64) as f32, (mgx / n as f64) as f32);
        for (((a, &xv), &w), &g) in a.iter_mut().zip(row).zip(weight).zip(d) {
            *a += r * (w * g - mg - (xv - mean) * r * mgx);
        }
    }
}

/// RMSNorm backward, added into `acc`. Per row of n values, with `y = x·r·w` and
/// `r = 1/sqrt(mean(x²) + eps)` (so `∂r/∂x_j = −r³·x_j/n`):
/// ```text
/// dx = r·(w⊙dy) − x·r³·mean(x⊙w⊙dy)
/// ```
/// r is computed as `ops::rms_norm` does (mean of squares in f64, the rest f32); the mean of
/// the product is accumulated in f64.
fn rms_norm_backward_add(x: &[f32], weight: &[f32], eps: f32, dy: &[f32], acc: &mut [f32]) {
    let n = weight.len();
    assert!(x.len() == dy.len() && x.len() == acc.len(), "rms_norm_backward: lengths differ");
    for ((row, d), a) in x.chunks_exact(n).zip(dy.chunks_exact(n)).zip(acc.chunks_exact_mut(n)) {
        let sum_sq: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let r = 1.0 / ((sum_sq / n as f64) as f32 + eps).sqrt();
        let dot: f64 = row.iter().zip(weight).zip(d).map(|((&xv, &w), &g)| f64::from(xv * w * g)).sum();
        let c = (dot / n as f64) as f32 * r * r * r;
        for (((a, &xv), &w), &g) in a.iter_mut().zip(row).zip(weight).zip(d) {
            *a += r * w * g - xv * c;
        }
    }
}

/// The transpose of RoPE on a gradient `[seq, n_heads * head_dim]`, in place. RoPE turns each
/// pair (a, b) = (x1[i], x2[i]) of the halves of a head's leading `rotary_dim` dims by +θ:
/// `(a·c − b·s, b·c + a·s)`; the other dims pass through (partial RoPE, identity both ways).
/// The transpose of a rotation is the rotation by −θ, `(a·c + b·s, b·c − a·s)`, which is the
/// +θ rotation of the swapped pair (b, a), swapped back. So: swap the halves, `Rope::apply`, swap.
fn rope_transpose(rope: &Rope, x: &mut [f32], seq: usize, n_heads: usize, head_dim: usize, rotary_dim: usize) {
    let swap_halves = |x: &mut [f32]| {
        for head in x.chunks_exact_mut(head_dim) {
            let (x1, x2) = head[..rotary_dim].split_at_mut(rotary_dim / 2);
            x1.swap_with_slice(x2);
        }
    };
    swap_halves(x);
    rope.apply(x, seq, n_heads);
    swap_halves(x);
}

/// Backward of causal GQA attention (`Attention::forward` in f32): given the rotated q
/// (`[seq, n_heads·hd]`), k, v (`[seq, n_kv_heads·hd]`) and dO = dL/d(output), returns
/// [dq, dk, dv] (dq, dk w.r.t. the rotated q, k). Per query head h of kv head g, with
/// `P = softmax(scale·Q_h·K_gᵀ)` over the visible keys (0 elsewhere), `scale = hd^-½`:
/// ```text
/// dP = dO_h·V_gᵀ;   dS = P ⊙ (dP − rowsum(dP ⊙ P))          (dS: w.r.t. the scaled scores)
/// dV_g += Pᵀ·dO_h;  dQ_h = scale·dS·K_g;  dK_g += scale·dSᵀ·Q_h
/// ```
/// The sums over g are over the `n_heads / n_kv_heads` query heads sharing kv head g. Heads
/// are processed one at a time and, within a head, blocks of `ATTENTION_ROWS` queries with only
/// the keys the block sees (`lo..t1`), so the masked half of P is mostly skipped and at most
/// `ATTENTION_ROWS × seq` scores exist at once. Each product runs on the multi-threaded
/// `matmul_bt`, whose second operand is stored `[n, k]`: `X·Y` is `matmul_bt(X, Yᵀ)`.
fn attention_backward(a: &Attention, q: &[f32], k: &[f32], v: &[f32], d_out: &[f32], seq: usize) -> [Vec<f32>; 3] {
    let hd = a.head_dim;
    let (q_width, kv_width) = (a.n_heads * hd, a.n_kv_heads * hd);
    let group = a.n_heads / a.n_kv_heads;
    let scale = (hd as f64).powf(-0.5) as f32;
    let first = |t: usize| a.sliding_window.map_or(0, |w| (t + 1).saturating_sub(w));
    let (mut dq, mut dk, mut dv) = (vec![0f32; seq * q_width], vec![0f32; seq * kv_width], vec![0f32; seq * kv_width]);
    for g in 0..a.n_kv_heads {
        let k_g = columns(k, kv_width, g * hd, hd); // [seq, hd]
        let v_g = columns(v, kv_width, g * hd, hd);
        let (mut dk_g, mut dv_g) = (vec![0f32; seq * hd], vec![0f32; seq * hd]);
        for head in g * group..(g + 1) * group {
            let q_h = columns(q, q_width, head * hd, hd);
            let do_h = columns(d_out, q_width, head * hd, hd);
            let mut dq_h = vec![0f32; seq * hd];
            for t0 in (0..seq).step_by(ATTENTION_ROWS) {
                let t1 = (t0 + ATTENTION_ROWS).min(seq);
                let (lo, rows) = (first(t0), t1 - t0);
                let n_keys = t1 - lo;
                // Q_b, dO_b: [rows, hd]; K_b, V_b: [n_keys, hd].
                let (q_b, do_b) = (&q_h[t0 * hd..t1 * hd], &do_h[t0 * hd..t1 * hd]);
                let (k_b, v_b) = (&k_g[lo * hd..t1 * hd], &v_g[lo * hd..t1 * hd]);
                // P = softmax(scale · Q_b·K_bᵀ): [rows, n_keys].
                let mut p = vec![0f32; rows * n_keys];
                ops::matmul_bt(q_b, k_b, rows, hd, n_keys, &mut p);
                for (r, row) in p.chunks_exact_mut(n_keys).enumerate() {
                    ops::softmax_visible(row, first(t0 + r) - lo, t0 + r - lo, scale);
                }
                // dP = dO_b·V_bᵀ.
                let mut ds = vec![0f32; rows * n_keys];
                ops::matmul_bt(do_b, v_b, rows, hd, n_keys, &mut ds);
                // dV_g[lo..t1] += Pᵀ·dO_b.
                let mut prod = vec![0f32; n_keys * hd];
                ops::matmul_bt(&transpose(&p, rows, n_keys), &transpose(do_b, rows, hd), n_keys, rows, hd, &mut prod);
                ops::add_in_place(&mut dv_g[lo * hd..t1 * hd], &prod);
                // ds becomes scale·dS = scale·P ⊙ (dP − Σ_j dP_j·P_j), row by row.
                for (pr, dr) in p.chunks_exact(n_keys).zip(ds.chunks_exact_mut(n_keys)) {
                    let c = pr.iter().zip(dr.iter()).map(|(&pv, &dv)| f64::from(pv * dv)).sum::<f64>() as f32;
                    for (d, &pv) in dr.iter_mut().zip(pr) {
                        *d = scale * pv * (*d - c);
                    }
                }
                // dQ_h[t0..t1] = scale·dS·K_b.
                ops::matmul_bt(&ds, &transpose(k_b, n_keys, hd), rows, n_keys, hd, &mut dq_h[t0 * hd..t1 * hd]);
                // dK_g[lo..t1] += scale·dSᵀ·Q_b.
                ops::matmul_bt(&transpose(&ds, rows, n_keys), &transpose(q_b, rows, hd), n_keys, rows, hd, &mut prod);
                ops::add_in_place(&mut dk_g[lo * hd..t1 * hd], &prod);
            }
            scatter_columns(&dq_h, &mut dq, q_width, head * hd, hd);
        }
        scatter_columns(&dk_g, &mut dk, kv_width, g * hd, hd);
        scatter_columns(&dv_g, &mut dv, kv_width, g * hd, hd);
    }
    [dq, dk, dv]
}

/// `out[c·rows + r] = a[r·cols + c]`: the `[cols, rows]` transpose of `a` (`[rows, cols]`),
/// copied in square tiles so both sides stay in cache.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(a.len(), rows * cols, "transpose: not [rows, cols]");
    let mut out = vec![0f32; a.len()];
    for r0 in (0..rows).step_by(TRANSPOSE_TILE) {
        for c0 in (0..cols).step_by(TRANSPOSE_TILE) {
            for r in r0..(r0 + TRANSPOSE_TILE).min(rows) {
                for c in c0..(c0 + TRANSPOSE_TILE).min(cols) {
                    out[c * rows + r] = a[r * cols + c];
                }
            }
        }
    }
    out
}

/// Columns `c0..c0 + n` of `a` (rows of `width` values), as a contiguous `[rows, n]`.
fn columns(a: &[f32], width: usize, c0: usize, n: usize) -> Vec<f32> {
    a.chunks_exact(width).flat_map(|row| &row[c0..c0 + n]).copied().collect()
}

/// Writes `src` (`[rows, n]`) into columns `c0..c0 + n` of `dst` (rows of `width` values).
fn scatter_columns(src: &[f32], dst: &mut [f32], width: usize, c0: usize, n: usize) {
    for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(width)) {
        d[c0..c0 + n].copy_from_slice(s);
    }
}
