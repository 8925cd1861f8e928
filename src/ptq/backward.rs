//! Activation gradients of the LM loss, for the gradient sensitivity score of auto_quantize
//! (spec §9.3: `score += Σ (g ⊙ Δ)²` with `g = ∂L/∂y` for every linear output y). Only the
//! gradients w.r.t. activations are computed, never w.r.t. weights.
//!
//! Like the forward, the backward goes layer at a time, from the head down:
//! ```text
//! hs[0] = embed(ids); hs[i+1] = layer_i(hs[i])           (keep each layer's input)
//! (loss, g) = head_backward(head, hs[n], ids, ..)         g = dL/dhs[n]
//! for i in (0..n).rev(): g = LayerGrad::new(layer_i, ..).backward(hs[i], seq, g, ..)
//! ```
//! It is written once over `compute::Tensor`: on `--device cuda` every step runs on the device
//! (the backward kernels of cuda/backward.cu beside the forward's), only the MoE routing and
//! the router's gradient are host arithmetic.
//! Each layer's forward is recomputed from its input in f32 (`Compute::F32`, whatever the
//! layer was loaded with), keeping the intermediates the backward needs. Every family of the
//! runtime is covered (src/model/layer.rs `Layer::forward`): biases, q/k RMSNorm, `1 + w` norms,
//! LayerNorms, gated and plain MLPs with their activations, partial RoPE, MoE blocks.
//! The gradient into the embedding (Gemma's scale) is not needed and not computed.
//!
//! Layouts are the forward's: activations `[seq, features]` row-major, a Linear weight W
//! `[out, in]` with `y = x·Wᵀ + b`, so the input gradient is `dx = dy·W` (the bias does not
//! enter it).

use crate::compute::{alibi_slopes, Attention, Compute, Rope, Tensor};
use crate::model::config::{Activation, ModelConfig, MoeConfig, Routing};
use crate::model::moe::{sparsemixer_grad, MoeBlock};
use crate::model::{Head, Layer, LinearKind, NormSlot};

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

/// What `LayerGrad::backward` reports per linear: its kind, the MoE expert it belongs to (None
/// for the dense linears), its input x (`[rows, in]`) and dL/dy (`[rows, out]`). An expert's
/// rows are the tokens routed to it, in token order.
pub type EachLinear<'a> = dyn FnMut(LinearKind, Option<usize>, &Tensor, &Tensor) + 'a;

/// One decoder layer ready for the backward of many sequences: its weights transposed once
/// (`dx = dy·W` is `matmul_bt(dy, Wᵀ)`), on the layer's backend.
pub struct LayerGrad<'a> {
    layer: &'a Layer,
    cfg: &'a ModelConfig,
    rope: &'a Rope,
    /// Indexed by `LinearKind as usize` (empty for a linear the layer does not have).
    dense_t: Vec<Tensor>,
    /// Per expert: gate, up, down transposed.
    experts_t: Vec<[Tensor; 3]>,
    router_t: Option<Tensor>,
}

impl<'a> LayerGrad<'a> {
    pub fn new(layer: &'a Layer, cfg: &'a ModelConfig, rope: &'a Rope) -> LayerGrad<'a> {
        let transposed = |w: &Tensor, [out, inp]: [usize; 2]| if w.is_empty() { Tensor::default() } else { w.transpose(out, inp) };
        let dense_t = LinearKind::ALL.iter().map(|&k| transposed(layer.weight(k), cfg.linear_shape(layer.index, k))).collect();
        let (mut experts_t, mut router_t) = (Vec::new(), None);
        if let (Some(block), Some(moe)) = (layer.moe(), cfg.moe_layer(layer.index)) {
            let expert = |e: usize, k: LinearKind| transposed(block.weight(e, k), moe.expert_shape(cfg, k));
            experts_t = (0..block.num_experts())
                .map(|e| [expert(e, LinearKind::Gate), expert(e, LinearKind::Up), expert(e, LinearKind::Down)])
                .collect();
            router_t = Some(transposed(block.router_weight(), [block.num_experts(), cfg.hidden_size]));
        }
        LayerGrad { layer, cfg, rope, dense_t, experts_t, router_t }
    }

    fn dense(&self, kind: LinearKind) -> Linear<'_> {
        let shape = self.cfg.linear_shape(self.layer.index, kind);
        Linear { w: self.layer.weight(kind), w_t: &self.dense_t[kind as usize], b: self.layer.bias(kind), shape }
    }

    /// Forward of the layer from its input `h_in` (`[seq, hidden]`), recomputing what the
    /// backward needs, then the backward: given `dh_out` = dL/dh_out (`[seq, hidden]`) returns
    /// dL/dh_in and calls `each` for every linear, in backward order: the MLP's (Down, Gate,
    /// Up; in an MoE layer those of each expert that received tokens, experts in index order),
    /// then O, Q, K, V.
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
    /// A parallel layer (`h_out = h_in + attn(x1) + mlp(x2)`, x2 = x1 or norm2(h_in)) has
    /// dh_mid = dh_out, and dx2 joins at h_in: into dx1 when x2 = x1, else through norm2.
    /// Memory: O(seq × (hidden + intermediate)) activations plus, for the attention of one head
    /// and one block of queries at a time, a few `ATTENTION_ROWS × seq` buffers.
    ///
    /// Panics if `h_in`, `dh_out` are not `[seq, hidden]` or the rope table holds fewer than
    /// `seq` positions (caller bugs).
    pub fn backward(&self, h_in: &Tensor, seq: usize, dh_out: &Tensor, each: &mut EachLinear) -> Tensor {
        let (layer, cfg, rope) = (self.layer, self.cfg, self.rope);
        let h = cfg.hidden_size;
        let (n_heads, n_kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        assert_eq!(h_in.len(), seq * h, "layer backward: h_in is not [seq, hidden_size]");
        assert_eq!(dh_out.len(), seq * h, "layer backward: dh_out is not [seq, hidden_size]");
        let f32 = Compute::F32;
        let (qk_kind, norm_kind) = (cfg.qk_norm_kind(), cfg.norm_kind());
        let normed = |slot: NormSlot, x: &Tensor| match layer.norm(slot) {
            Some(n) => x.norm(f32, norm_kind, &n.weight, n.bias.as_ref()),
            None => x.clone(),
        };
        // dL/dx of `normed(slot, x)` given dL/d(output) `dy`, added to `acc`.
        let normed_backward_add = |slot: NormSlot, acc: &mut Tensor, x: &Tensor, dy: &Tensor| match layer.norm(slot) {
            Some(n) => acc.norm_backward_add(norm_kind, x, &n.weight, dy),
            None => acc.add(dy),
        };
        // A branch output's gradient from the residual's: × residual_multiplier (Granite).
        let branch_grad = |dh: &Tensor| {
            let mut d = dh.clone();
            if let Some(m) = cfg.residual_multiplier {
                d.scale_columns(&[m]);
            }
            d
        };
        let zeros = |like: &Tensor| Tensor::on(vec![0f32; like.len()], like.device());

        // Attention forward, f32.
        let x1 = normed(NormSlot::AttnIn, h_in);
        let mut q = self.dense(LinearKind::Q).forward(&x1, seq);
        let mut k = self.dense(LinearKind::K).forward(&x1, seq);
        let v = self.dense(LinearKind::V).forward(&x1, seq);
        // Qwen3: the q/k projections before their per-head RMSNorm.
        let qk_pre = layer.qk_norm().map(|(wq, wk)| {
            let pre = (q.clone(), k.clone());
            q = pre.0.norm(f32, qk_kind, wq, None);
            k = pre.1.norm(f32, qk_kind, wk, None);
            pre
        });
        let layer_rope = cfg.layer_rope(layer.index, rope);
        if let Some(rope) = layer_rope {
            q.rope(f32, rope, seq, n_heads);
            k.rope(f32, rope, seq, n_kv);
        }
        let attention = cfg.attention(layer.index, false);
        let attn = Tensor::attention(&attention, &q, &k, &v, seq);
        let o = self.dense(LinearKind::O).forward(&attn, seq);
        let mut h_mid = normed(NormSlot::AttnOut, &o);
        if let Some(m) = cfg.residual_multiplier {
            h_mid.scale_columns(&[m]);
        }
        h_mid.add(h_in);

        // MLP: of h_mid, or in a parallel layer of h_in (through its own norm or the attention's).
        let x2 = match (cfg.parallel, layer.norm(NormSlot::MlpIn)) {
            (true, None) => x1.clone(),
            (true, Some(_)) => normed(NormSlot::MlpIn, h_in),
            (false, _) => normed(NormSlot::MlpIn, &h_mid),
        };
        let mut d_mlp = branch_grad(dh_out);
        if let Some(n) = layer.norm(NormSlot::MlpOut) {
            // A normed MLP output (Gemma2/3, Olmo2, Exaone4): its gradient goes through the norm.
            let y = self.dense_mlp_forward(&x2, seq);
            let mut d = zeros(&y);
            d.norm_backward_add(norm_kind, &y, &n.weight, &d_mlp);
            d_mlp = d;
        }
        let dense_mlp_backward = |d_out: &Tensor, each: &mut EachLinear| {
            let gate = cfg.gated_mlp().then(|| self.dense(LinearKind::Gate));
            let (up, down) = (self.dense(LinearKind::Up), self.dense(LinearKind::Down));
            let (dx, m) = mlp_backward(gate.as_ref(), &up, &down, cfg.act, &x2, seq, d_out, &mut |kind, x, dy| each(kind, None, x, dy));
            (dx, down, m)
        };
        let dx2 = match (layer.moe(), cfg.moe_layer(layer.index)) {
            (Some(block), Some(moe)) => {
                let mut dx = self.moe_backward(block, moe, &x2, seq, &d_mlp, each);
                if let Some(g) = block.shared_gate() {
                    // out += s ⊙ shared(x), s = sigmoid(x·gᵀ) per token: the shared expert's
                    // output gradient is s·d_out; ds = d_out·shared(x), dz = ds·s·(1 − s),
                    // dx += dz·g.
                    let s = block.shared_factors(&x2, seq, Compute::F32);
                    let mut d_shared = d_mlp.clone();
                    d_shared.scale_rows(h, &s);
                    // The backward's own forward gives down's input: shared(x) = down(m).
                    let (dx_shared, down, m) = dense_mlp_backward(&d_shared, each);
                    dx.add(&dx_shared);
                    let (y, d_host) = (down.forward(&m, seq).into_host(), d_mlp.to_host());
                    let dz: Vec<f32> = (d_host.chunks_exact(h).zip(y.chunks_exact(h)).zip(&s))
                        .map(|((d, y), &s)| {
                            let ds: f64 = d.iter().zip(y).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                            (ds * f64::from(s) * (1.0 - f64::from(s))) as f32
                        })
                        .collect();
                    let g_t = g.transpose(1, h);
                    let gate = Linear { w: g, w_t: &g_t, b: None, shape: [1, h] };
                    dx.add(&gate.input_grad(&Tensor::on(dz, x2.device()), seq));
                }
                dx
            }
            _ => dense_mlp_backward(&d_mlp, each).0,
        };
        drop((x2, d_mlp));
        let mut dh_mid = dh_out.clone();
        // A parallel MLP's input gradient joins the attention's at h_in (below).
        let parallel_dx2 = match cfg.parallel {
            true => Some(dx2),
            false => {
                normed_backward_add(NormSlot::MlpIn, &mut dh_mid, &h_mid, &dx2);
                None
            }
        };
        drop(h_mid);

        // Attention backward.
        let mut dy_o = branch_grad(&dh_mid);
        if let Some(n) = layer.norm(NormSlot::AttnOut) {
            let mut d = zeros(&o);
            d.norm_backward_add(norm_kind, &o, &n.weight, &dy_o);
            dy_o = d;
        }
        drop(o);
        each(LinearKind::O, None, &attn, &dy_o);
        let d_attn = self.dense(LinearKind::O).input_grad(&dy_o, seq);
        drop(dy_o);
        drop(attn);
        let [mut dy_q, mut dy_k, dy_v] = attention_backward(&attention, &q, &k, &v, &d_attn, seq);
        drop((q, k, v, d_attn));
        if let Some(rope) = layer_rope {
            rope_transpose(rope, &mut dy_q, seq, n_heads, cfg.head_dim, cfg.rotary_dim);
            rope_transpose(rope, &mut dy_k, seq, n_kv, cfg.head_dim, cfg.rotary_dim);
        }
        if let (Some((q_pre, k_pre)), Some((wq, wk))) = (qk_pre, layer.qk_norm()) {
            for (pre, w, dy) in [(&q_pre, wq, &mut dy_q), (&k_pre, wk, &mut dy_k)] {
                let mut d = zeros(dy);
                d.norm_backward_add(qk_kind, pre, w, dy);
                *dy = d;
            }
        }
        each(LinearKind::Q, None, &x1, &dy_q);
        each(LinearKind::K, None, &x1, &dy_k);
        each(LinearKind::V, None, &x1, &dy_v);
        let mut dx1 = self.dense(LinearKind::Q).input_grad(&dy_q, seq);
        dx1.add(&self.dense(LinearKind::K).input_grad(&dy_k, seq));
        dx1.add(&self.dense(LinearKind::V).input_grad(&dy_v, seq));
        let mut dh_in = dh_mid;
        match (parallel_dx2, layer.norm(NormSlot::MlpIn)) {
            (Some(dx2), None) => dx1.add(&dx2),
            (Some(dx2), Some(_)) => normed_backward_add(NormSlot::MlpIn, &mut dh_in, h_in, &dx2),
            (None, _) => {}
        }
        normed_backward_add(NormSlot::AttnIn, &mut dh_in, h_in, &dx1);
        dh_in
    }

    /// A dense MLP's output on `x` (`[rows, hidden]`), f32: `down(act(gate(x)) ⊙ up(x))` or
    /// `down(act(up(x)))`, biases included.
    fn dense_mlp_forward(&self, x: &Tensor, rows: usize) -> Tensor {
        let up = self.dense(LinearKind::Up).forward(x, rows);
        let m = if self.cfg.gated_mlp() {
            let mut gate = self.dense(LinearKind::Gate).forward(x, rows);
            gate.gated_mul(Compute::F32, self.cfg.act, &up);
            gate
        } else {
            let mut up = up;
            up.activate(self.cfg.act);
            up
        };
        self.dense(LinearKind::Down).forward(&m, rows)
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
    /// The routing and the router's gradient (`[seq, experts]`) are host arithmetic.
    fn moe_backward(&self, block: &MoeBlock, moe: &MoeConfig, x: &Tensor, seq: usize, d_out: &Tensor, each: &mut EachLinear) -> Tensor {
        let cfg = self.cfg;
        let (h, n) = (cfg.hidden_size, block.num_experts());
        let routes = block.route(moe, x, seq, Compute::F32);
        let d_out_host = d_out.to_host();
        let mut dx = Tensor::on(vec![0f32; seq * h], x.device());
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
            let tokens: Vec<usize> = rows.iter().map(|r| r.0).collect();
            let weights: Vec<f32> = rows.iter().map(|r| r.2).collect();
            let xe = x.gather_rows(&tokens, h);
            let mut d_down = d_out.gather_rows(&tokens, h);
            d_down.scale_rows(h, &weights);
            let lin = |kind: LinearKind, slot: usize| Linear {
                w: block.weight(e, kind),
                w_t: &self.experts_t[e][slot],
                b: None,
                shape: moe.expert_shape(cfg, kind),
            };
            let (gate, up, down) = (lin(LinearKind::Gate, 0), lin(LinearKind::Up, 1), lin(LinearKind::Down, 2));
            let (dxe, m) =
                mlp_backward(Some(&gate), &up, &down, cfg.act, &xe, rows.len(), &d_down, &mut |kind, x, dy| each(kind, Some(e), x, dy));
            let y = down.forward(&m, rows.len()).into_host();
            for (r, &(t, s, _)) in rows.iter().enumerate() {
                let d = &d_out_host[t * h..(t + 1) * h];
                dw[t][s] = d.iter().zip(&y[r * h..(r + 1) * h]).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            }
            let plus: Vec<(usize, f32)> = tokens.iter().map(|&t| (t, 1.0)).collect();
            dx.index_add_weighted(Compute::F32, &dxe, &plus, h);
        }
        // Router logits' gradient, then dx += dl·W_router.
        let router = block.router_weight();
        let logits = x.matmul_bt(router, seq, h, n).into_host();
        let mut dl = vec![0f32; seq * n];
        for ((route, dw), (z, dl)) in routes.iter().zip(&dw).zip(logits.chunks_exact(n).zip(dl.chunks_exact_mut(n))) {
            if let Routing::SparseMixer { jitter_eps } = moe.routing {
                dl.copy_from_slice(&sparsemixer_grad(z, jitter_eps, dw));
            } else if moe.norm_topk_prob {
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
        let router_t = self.router_t.as_ref().expect("an MoE layer has its router transposed");
        let router = Linear { w: router, w_t: router_t, b: None, shape: [n, h] };
        dx.add(&router.input_grad(&Tensor::on(dl, x.device()), seq));
        dx
    }
}

/// One linear's weight `[out, in]`, its transpose and its bias.
struct Linear<'a> {
    w: &'a Tensor,
    w_t: &'a Tensor,
    b: Option<&'a Tensor>,
    shape: [usize; 2],
}

impl Linear<'_> {
    /// `y = x·Wᵀ + b` for `rows` rows of x.
    fn forward(&self, x: &Tensor, rows: usize) -> Tensor {
        let [n, k] = self.shape;
        let mut y = x.matmul_bt(self.w, rows, k, n);
        if let Some(b) = self.b {
            y.add_row_bias(b);
        }
        y
    }

    /// `dx = dy·W` (`matmul_bt` against Wᵀ, `[in, out]`).
    fn input_grad(&self, dy: &Tensor, rows: usize) -> Tensor {
        let [n_out, n_in] = self.shape;
        dy.matmul_bt(self.w_t, rows, n_out, n_in)
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
    x: &Tensor,
    rows: usize,
    d_out: &Tensor,
    each: &mut dyn FnMut(LinearKind, &Tensor, &Tensor),
) -> (Tensor, Tensor) {
    let u = up.forward(x, rows);
    let g = gate.map(|gate| gate.forward(x, rows));
    let mut m = g.as_ref().unwrap_or(&u).clone();
    match &g {
        Some(_) => m.gated_mul(Compute::F32, act, &u),
        None => m.activate(act),
    }
    each(LinearKind::Down, &m, d_out);
    let dm = down.input_grad(d_out, rows);
    let dx = match (gate, &g) {
        (Some(gate), Some(g)) => {
            let dy_gate = g.act_grad_mul(act, &dm, Some(&u));
            let mut dy_up = g.clone();
            dy_up.gated_mul(Compute::F32, act, &dm);
            each(LinearKind::Gate, x, &dy_gate);
            each(LinearKind::Up, x, &dy_up);
            let mut dx = gate.input_grad(&dy_gate, rows);
            dx.add(&up.input_grad(&dy_up, rows));
            dx
        }
        _ => {
            let dy_up = u.act_grad_mul(act, &dm, None);
            each(LinearKind::Up, x, &dy_up);
            up.input_grad(&dy_up, rows)
        }
    };
    (dx, m)
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
pub fn head_backward(head: &Head, hidden: &Tensor, ids: &[u32], each_head: &mut dyn FnMut(&Tensor, &Tensor)) -> (f64, Tensor) {
    let (norm, w_head) = (head.norm_weight(), head.lm_head());
    let h = norm.len();
    let vocab = w_head.len() / h;
    let seq = ids.len();
    let device = hidden.device();
    assert_eq!(hidden.len(), seq * h, "head_backward: hidden is not [ids.len(), hidden_size]");
    let mut d_hidden = Tensor::on(vec![0f32; seq * h], device);
    let scored = seq.saturating_sub(1);
    if scored == 0 {
        return (0.0, d_hidden);
    }
    let inv_n = 1.0 / scored as f64;
    let norm_kind = head.config().norm_kind();
    let normed = hidden.norm(Compute::F32, norm_kind, norm, head.norm_bias());
    let mut d_normed = Tensor::on(vec![0f32; seq * h], device);
    let mut loss = 0f64;
    let block = (HEAD_BLOCK_BYTES / (4 * vocab)).clamp(1, HEAD_MAX_ROWS);
    let chunk = (HEAD_TRANSPOSE_BYTES / (4 * h)).clamp(1, vocab);
    for t0 in (0..scored).step_by(block) {
        let rows = block.min(scored - t0);
        let x = normed.rows(t0..t0 + rows, h);
        let mut z = x.matmul_bt(w_head, rows, h, vocab);
        if let Some(b) = head.lm_head_bias() {
            z.add_row_bias(b);
        }
        // Granite: the logits are z / logits_scaling, so dL/dz is their gradient / logits_scaling.
        // Gemma2: the logits are c·tanh(u / c) of u = z (its gradient times 1 − tanh²(u / c)).
        let (divisor, cap) = (head.config().logits_scaling, head.config().final_softcap);
        z.finish_logits(Compute::F32, divisor, None);
        let uncapped = cap.map(|_| z.clone());
        z.finish_logits(Compute::F32, None, cap);
        loss += z.xent_grad_rows(vocab, &ids[t0 + 1..t0 + rows + 1], inv_n as f32).iter().sum::<f64>();
        if let (Some(u), Some(cap)) = (&uncapped, cap) {
            z.softcap_grad(u, 1.0, cap);
        }
        if let Some(d) = divisor {
            z.scale_columns(&[1.0 / d]);
        }
        each_head(&x, &z);
        // dL/dx = dL/dz · W_head, a chunk of vocabulary rows at a time:
        // dx += dz[:, c] · W_head[c, :] with W_head[c, :] transposed.
        for c0 in (0..vocab).step_by(chunk) {
            let cols = chunk.min(vocab - c0);
            let w_t = w_head.rows(c0..c0 + cols, h).transpose(cols, h); // [h, cols]
            let part = if cols == vocab {
                z.matmul_bt(&w_t, rows, cols, h)
            } else {
                z.columns(vocab, c0, cols).matmul_bt(&w_t, rows, cols, h)
            };
            d_normed.add_at(t0 * h, &part);
        }
    }
    d_hidden.norm_backward_add(norm_kind, hidden, norm, &d_normed);
    (loss * inv_n, d_hidden)
}

/// The transpose of RoPE on a gradient `[seq, n_heads * head_dim]`, in place. RoPE turns each
/// pair (a, b) = (x1[i], x2[i]) of the halves of a head's leading `rotary_dim` dims by +θ:
/// `(a·c − b·s, b·c + a·s)`; the other dims pass through (partial RoPE, identity both ways).
/// The transpose of a rotation is the rotation by −θ, `(a·c + b·s, b·c − a·s)`, which is the
/// +θ rotation of the swapped pair (b, a), swapped back. So: swap the halves, RoPE, swap.
fn rope_transpose(rope: &Rope, x: &mut Tensor, seq: usize, n_heads: usize, head_dim: usize, rotary_dim: usize) {
    x.swap_rotary_halves(head_dim, rotary_dim);
    x.rope(Compute::F32, rope, seq, n_heads);
    x.swap_rotary_halves(head_dim, rotary_dim);
}

/// Backward of causal GQA attention (`Attention::forward` in f32): given the rotated q
/// (`[seq, n_heads·hd]`), k, v (`[seq, n_kv_heads·hd]`) and dO = dL/d(output), returns
/// [dq, dk, dv] (dq, dk w.r.t. the rotated q, k). Per query head h of kv head g, with
/// `P = softmax(scale·Q_h·K_gᵀ + B_h)` over the visible keys (0 elsewhere), `scale = hd^-½`
/// and B_h ALiBi's bias `slope_h·(j − i)` when set (a constant: dS is the same without it):
/// ```text
/// dP = dO_h·V_gᵀ;   dS = P ⊙ (dP − rowsum(dP ⊙ P))          (dS: w.r.t. the scaled scores)
/// dV_g += Pᵀ·dO_h;  dQ_h = scale·dS·K_g;  dK_g += scale·dSᵀ·Q_h
/// ```
/// The sums over g are over the `n_heads / n_kv_heads` query heads sharing kv head g. Heads
/// are processed one at a time and, within a head, blocks of `ATTENTION_ROWS` queries with only
/// the keys the block sees (`lo..t1`), so the masked half of P is mostly skipped and at most
/// `ATTENTION_ROWS × seq` scores exist at once. Each product is a `matmul_bt`, whose second
/// operand is stored `[n, k]`: `X·Y` is `matmul_bt(X, Yᵀ)`.
fn attention_backward(a: &Attention, q: &Tensor, k: &Tensor, v: &Tensor, d_out: &Tensor, seq: usize) -> [Tensor; 3] {
    let hd = a.head_dim;
    let (q_width, kv_width) = (a.n_heads * hd, a.n_kv_heads * hd);
    let group = a.n_heads / a.n_kv_heads;
    let scale = a.scale;
    let first = |t: usize| a.sliding_window.map_or(0, |w| (t + 1).saturating_sub(w));
    let slopes = a.alibi.map(|alibi| alibi_slopes(alibi, a.n_heads));
    let zeros = |n: usize| Tensor::on(vec![0f32; n], q.device());
    let (mut dq, mut dk, mut dv) = (zeros(seq * q_width), zeros(seq * kv_width), zeros(seq * kv_width));
    for g in 0..a.n_kv_heads {
        let k_g = k.columns(kv_width, g * hd, hd); // [seq, hd]
        let v_g = v.columns(kv_width, g * hd, hd);
        let (mut dk_g, mut dv_g) = (zeros(seq * hd), zeros(seq * hd));
        for head in g * group..(g + 1) * group {
            let q_h = q.columns(q_width, head * hd, hd);
            let do_h = d_out.columns(q_width, head * hd, hd);
            let mut dq_h = zeros(seq * hd);
            for t0 in (0..seq).step_by(ATTENTION_ROWS) {
                let t1 = (t0 + ATTENTION_ROWS).min(seq);
                let (lo, rows) = (first(t0), t1 - t0);
                let n_keys = t1 - lo;
                // Q_b, dO_b: [rows, hd]; K_b, V_b: [n_keys, hd].
                let (q_b, do_b) = (q_h.rows(t0..t1, hd), do_h.rows(t0..t1, hd));
                let (k_b, v_b) = (k_g.rows(lo..t1, hd), v_g.rows(lo..t1, hd));
                // P = softmax(scale · Q_b·K_bᵀ): [rows, n_keys].
                let mut p = q_b.matmul_bt(&k_b, rows, hd, n_keys);
                // Gemma2's soft cap: its backward needs the raw scores.
                let raw = a.softcap.map(|_| p.clone());
                p.softmax_rows(n_keys, t0, lo, a.sliding_window, scale, a.softcap, slopes.as_ref().map(|s| s[head]));
                // dP = dO_b·V_bᵀ.
                let mut ds = do_b.matmul_bt(&v_b, rows, hd, n_keys);
                // dV_g[lo..t1] += Pᵀ·dO_b.
                dv_g.add_at(lo * hd, &p.transpose(rows, n_keys).matmul_bt(&do_b.transpose(rows, hd), n_keys, rows, hd));
                // ds becomes scale·dS = scale·P ⊙ (dP − Σ_j dP_j·P_j), row by row.
                ds.attention_ds(&p, n_keys, scale);
                if let (Some(raw), Some(cap)) = (&raw, a.softcap) {
                    ds.softcap_grad(raw, scale, cap); // d(c·tanh(s/c))/ds = 1 − tanh²(s/c)
                }
                // dQ_h[t0..t1] = scale·dS·K_b.
                dq_h.add_at(t0 * hd, &ds.matmul_bt(&k_b.transpose(n_keys, hd), rows, n_keys, hd));
                // dK_g[lo..t1] += scale·dSᵀ·Q_b.
                dk_g.add_at(lo * hd, &ds.transpose(rows, n_keys).matmul_bt(&q_b.transpose(rows, hd), n_keys, rows, hd));
            }
            dq.set_columns(&dq_h, q_width, head * hd, hd);
        }
        dk.set_columns(&dk_g, kv_width, g * hd, hd);
        dv.set_columns(&dv_g, kv_width, g * hd, hd);
    }
    [dq, dk, dv]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::Alibi;

    /// `Σ out ⊙ r` of causal GQA attention in f64 (scores `scale·q·k + slope_h·(j − i)`, the
    /// window's mask, softmax), the loss whose gradient [`attention_backward`] gives for
    /// `d_out = r`.
    fn loss_f64(a: &Attention, [q, k, v]: [&[f64]; 3], r: &[f64], seq: usize) -> f64 {
        let hd = a.head_dim;
        let (q_width, kv_width, group) = (a.n_heads * hd, a.n_kv_heads * hd, a.n_heads / a.n_kv_heads);
        let slopes = a.alibi.map_or(vec![0.0; a.n_heads], |alibi| alibi_slopes(alibi, a.n_heads));
        let mut loss = 0.0;
        for t in 0..seq {
            let keys = a.sliding_window.map_or(0, |w| (t + 1).saturating_sub(w))..=t;
            for h in 0..a.n_heads {
                let (qh, g) = (&q[t * q_width + h * hd..][..hd], h / group);
                let score = |j: usize| {
                    let dot: f64 = qh.iter().zip(&k[j * kv_width + g * hd..][..hd]).map(|(x, y)| x * y).sum();
                    f64::from(a.scale) * dot + f64::from(slopes[h]) * (j as f64 - t as f64)
                };
                let scores: Vec<f64> = keys.clone().map(score).collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (j, s) in keys.clone().zip(&scores) {
                    let vr: f64 = v[j * kv_width + g * hd..][..hd].iter().zip(&r[t * q_width + h * hd..][..hd]).map(|(x, y)| x * y).sum();
                    loss += (s - max).exp() / sum * vr;
                }
            }
        }
        loss
    }

    /// Values in [-amp, amp) from a 64-bit LCG.
    fn values(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                amp * ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
            })
            .collect()
    }

    /// max |got − want| / max |want|.
    fn rel_err(got: &[f32], want: &[(usize, f64)]) -> f64 {
        let scale = want.iter().fold(0f64, |m, (_, w)| m.max(w.abs()));
        want.iter().fold(0f64, |m, &(i, w)| m.max((f64::from(got[i]) - w).abs())) / scale
    }

    /// dq, dk, dv of ALiBi attention against central differences of [`loss_f64`] (every
    /// `stride`-th coordinate): GQA, one query block without a window and, with a window, two
    /// blocks (128 + 22 queries, the second's keys from lo > 0).
    #[test]
    fn alibi_attention_backward_matches_finite_differences() {
        let cases = [(4, 2, None, 37, Alibi::Bloom, 1), (6, 2, Some(20), 150, Alibi::Mpt { bias_max: 8.0 }, 7)];
        for (n_heads, n_kv_heads, sliding_window, seq, alibi, stride) in cases {
            let hd = 8;
            let a = Attention {
                n_heads,
                n_kv_heads,
                head_dim: hd,
                sliding_window,
                scale: Attention::default_scale(hd),
                softcap: None,
                flash_bf16: false,
                alibi: Some(alibi),
            };
            let (q_len, kv_len) = (seq * n_heads * hd, seq * n_kv_heads * hd);
            let inputs = [values(q_len, 1, 2.0), values(kv_len, 2, 2.0), values(kv_len, 3, 1.0)];
            let r = values(q_len, 4, 1.0);
            let grads = |a: &Attention| {
                let [q, k, v] = inputs.clone().map(Tensor::from);
                attention_backward(a, &q, &k, &v, &Tensor::from(r.clone()), seq).map(Tensor::into_host)
            };
            let (with, without) = (grads(&a), grads(&Attention { alibi: None, ..a }));
            let mut x: [Vec<f64>; 3] = inputs.clone().map(|v| v.into_iter().map(f64::from).collect());
            let r64: Vec<f64> = r.iter().map(|&v| f64::from(v)).collect();
            // Truncation ~h² · (third derivative, O(1)) = 1e-8, rounding ~1e-16 · |loss| / h:
            // both far below the f32 backward's ~1e-6.
            let h = 1e-4;
            for (n, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
                let mut want = Vec::new();
                for i in (0..x[n].len()).step_by(stride) {
                    let x0 = x[n][i];
                    let mut at = |value: f64| {
                        x[n][i] = value;
                        loss_f64(&a, [&x[0], &x[1], &x[2]], &r64, seq)
                    };
                    let d = (at(x0 + h) - at(x0 - h)) / (2.0 * h);
                    x[n][i] = x0;
                    want.push((i, d));
                }
                let (err, err_without) = (rel_err(&with[n], &want), rel_err(&without[n], &want));
                println!("{name} {a:?} seq {seq}: rel err {err:.1e}, {err_without:.1e} without ALiBi");
                // f32 sums of at most 150 products (each rounded 2^-24 relative) and a 2e-7 exp:
                // ~3e-7 measured, 1e-5 relative to the largest gradient bounds it with margin.
                assert!(err < 1e-5, "{name} {a:?}: error {err:e}");
                assert!(err_without > 1e-2, "{name} {a:?}: the test does not see ALiBi ({err_without:e})");
            }
        }
    }
}
