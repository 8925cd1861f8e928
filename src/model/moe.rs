//! Mixture-of-experts MLP blocks: HF transformers 5 `MixtralSparseMoeBlock` and
//! `Qwen3MoeSparseMoeBlock`. A router (`gate`, `[num_experts, hidden]`) scores every token,
//! the top `num_experts_per_tok` experts are kept, and the token's output is the weighted sum of
//! those experts' gated MLPs. Expert weights keep the checkpoint's per-expert names
//! (Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen3-MoE `mlp.experts.{e}.gate_proj/...`),
//! and the quantizer exports them under the same names (spec/export-formats.md §2.9: one
//! module per expert and projection, each with the full per-linear suffix set).
//!
//! Which tokens each expert's quantizers see is the quantizer's business (src/ptq/quantize.rs):
//! the forward pass hands every expert exactly the tokens routed to it, through
//! [`Hooks::expert_input`].

use crate::compute::{Compute, Tensor};
use crate::model::config::{LinearKind, ModelConfig, MoeConfig};
use crate::model::hooks::Hooks;

/// Index of an expert's linear `kind` in `MoeBlock::experts`: gate, up, down.
fn expert_slot(kind: LinearKind) -> usize {
    match kind {
        LinearKind::Gate => 0,
        LinearKind::Up => 1,
        _ => 2,
    }
}

/// One layer's MoE block, weights as f32 tensors.
pub struct MoeBlock {
    /// `[num_experts, hidden]`.
    pub(crate) router: Tensor,
    /// Per expert: gate, up, down, each `[out, in]`.
    pub(crate) experts: Vec<[Tensor; 3]>,
}

impl MoeBlock {
    /// The router weight, `[num_experts, hidden]`.
    pub fn router_weight(&self) -> &Tensor {
        &self.router
    }

    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// Expert `e`'s weight of `kind` (Gate, Up or Down), `[out, in]`.
    pub fn weight(&self, e: usize, kind: LinearKind) -> &Tensor {
        &self.experts[e][expert_slot(kind)]
    }

    /// Replaces expert `e`'s weight of `kind` (Gate, Up or Down). Panics if `w` does not have
    /// the current weight's length.
    pub fn set_weight(&mut self, e: usize, kind: LinearKind, w: Vec<f32>) {
        let slot = &mut self.experts[e][expert_slot(kind)];
        assert_eq!(w.len(), slot.len(), "set_weight(expert {e}, {kind:?}): wrong number of values");
        *slot = Tensor::on(w, slot.device());
    }

    /// The experts each token goes to, with their weights: `[seq][top_k]` of (expert, weight).
    /// HF `MixtralTopKRouter` / `Qwen3MoeTopKRouter`: logits = `F.linear(x, gate)` in the model
    /// dtype, probabilities = softmax in f32, `torch.topk` (largest first; equal values keep the
    /// lower expert index first), divided by their sum when `norm_topk_prob`, then cast to the
    /// model dtype for the weighted sum. The top-k runs on the host: `[seq, num_experts]` values.
    pub fn route(&self, moe: &MoeConfig, x: &Tensor, seq: usize, c: Compute) -> Vec<Vec<(usize, f32)>> {
        let (n, h) = (self.num_experts(), x.len() / seq.max(1));
        let mut logits = x.matmul_bt(&self.router, seq, h, n);
        logits.round(c);
        logits
            .to_host()
            .chunks_exact(n)
            .map(|row| {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let exp: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
                let sum: f32 = exp.iter().sum();
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
                let mut kept: Vec<(usize, f32)> = order[..moe.top_k].iter().map(|&e| (e, exp[e] / sum)).collect();
                if moe.norm_topk_prob {
                    let total: f32 = kept.iter().map(|k| k.1).sum();
                    kept.iter_mut().for_each(|k| k.1 /= total);
                }
                kept.iter_mut().for_each(|k| k.1 = c.round_one(k.1));
                kept
            })
            .collect()
    }

    /// The block's output for the normed input `x` (`[seq, hidden]`): HF `MixtralExperts.forward`.
    /// Experts run in index order on the rows routed to them (token order), each output row
    /// times its routing weight is added into a zeroed result (`index_add_`, rounded per add
    /// under `Compute::Bf16`). An expert no token was routed to is not run.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        moe: &MoeConfig,
        layer: usize,
        x: &Tensor,
        seq: usize,
        c: Compute,
        hooks: &mut dyn Hooks,
    ) -> Tensor {
        let h = cfg.hidden_size;
        let routes = self.route(moe, x, seq, c);
        let mut out = Tensor::on(vec![0f32; seq * h], x.device());
        for (e, weights) in self.experts.iter().enumerate() {
            let rows: Vec<(usize, f32)> =
                routes.iter().enumerate().filter_map(|(t, r)| r.iter().find(|k| k.0 == e).map(|k| (t, k.1))).collect();
            if rows.is_empty() {
                continue;
            }
            let tokens: Vec<usize> = rows.iter().map(|&(t, _)| t).collect();
            let xe = x.gather_rows(&tokens, h);
            let mut linear = |kind: LinearKind, mut x: Tensor| {
                let [n, k] = moe.expert_shape(cfg, kind);
                hooks.expert_input(layer, e, kind, &mut x, k);
                let mut y = x.matmul_bt(&weights[expert_slot(kind)], rows.len(), k, n);
                y.round(c);
                y
            };
            let mut gate = linear(LinearKind::Gate, xe.clone());
            let up = linear(LinearKind::Up, xe);
            gate.gated_mul(c, cfg.act, &up);
            let down = linear(LinearKind::Down, gate);
            out.index_add_weighted(c, &down, &rows, h);
        }
        out
    }
}
