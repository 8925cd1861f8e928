//! Mixture-of-experts MLP blocks: HF transformers 5 `MixtralSparseMoeBlock`,
//! `Qwen3MoeSparseMoeBlock`, `PhimoeSparseMoeBlock` (sparsemixer routing) and
//! `Qwen2MoeSparseMoeBlock` (plus a shared expert, the layer's dense MLP, gated per token). A
//! router (`gate`, `[num_experts, hidden]`) scores every token, the top `num_experts_per_tok`
//! experts are kept, and the token's output is the weighted sum of those experts' gated MLPs.
//! Expert weights keep the checkpoint's per-expert names (Mixtral
//! `block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen3-MoE `mlp.experts.{e}.gate_proj/...`), and the
//! quantizer exports them under the same names (spec/export-formats.md §2.9: one module per expert
//! and projection, each with the full per-linear suffix set).
//!
//! Which tokens each expert's quantizers see is the quantizer's business (src/ptq/quantize.rs):
//! the forward pass hands every expert exactly the tokens routed to it, through
//! [`Hooks::expert_input`].

use crate::compute::{Compute, Tensor};
use crate::model::config::{LinearKind, ModelConfig, MoeConfig, Routing};
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
    /// Qwen2-MoE's `shared_expert_gate`, `[1, hidden]` (the shared expert itself is the layer's
    /// dense MLP).
    pub(crate) shared_gate: Option<Tensor>,
}

impl MoeBlock {
    /// The router weight, `[num_experts, hidden]`.
    pub fn router_weight(&self) -> &Tensor {
        &self.router
    }

    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// Qwen2-MoE's `shared_expert_gate` weight, `[1, hidden]`, when the block has a shared expert.
    pub fn shared_gate(&self) -> Option<&Tensor> {
        self.shared_gate.as_ref()
    }

    /// The shared expert's per-token factor `sigmoid(shared_expert_gate(x))` (HF
    /// `Qwen2MoeSparseMoeBlock`: the linear's output and the sigmoid each in the model dtype),
    /// for the `[seq, hidden]` input x. Panics without a shared expert (a caller bug).
    pub fn shared_factors(&self, x: &Tensor, seq: usize, c: Compute) -> Vec<f32> {
        let gate = self.shared_gate.as_ref().expect("shared_factors: the block has no shared expert");
        let h = x.len() / seq.max(1);
        let mut z = x.matmul_bt(gate, seq, h, 1);
        z.round(c);
        z.to_host().iter().map(|&z| c.round_one(1.0 / (1.0 + (-z).exp()))).collect()
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
                if let Routing::SparseMixer { jitter_eps } = moe.routing {
                    return sparsemixer(row, jitter_eps).iter().map(|&(e, w)| (e, c.round_one(w))).collect();
                }
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

/// PhiMoE's `sparsemixer(scores, jitter_eps)` in inference (HF `modeling_phimoe.py`), on one
/// token's router logits: two rounds, each picking the largest remaining logit m (the first
/// index on ties, as `max`), masking every logit s with `(m − s) / max(|s|, m) > 2·jitter_eps`,
/// and weighting the pick by its softmax probability among the unmasked remaining logits. The
/// second round starts from the logits with the first pick set to −∞ (its threshold still
/// compares the original logits).
pub fn sparsemixer(scores: &[f32], jitter_eps: f32) -> [(usize, f32); 2] {
    sparsemixer_rounds(scores, jitter_eps).map(|(pick, p)| (pick, p[pick]))
}

/// The two rounds of [`sparsemixer`]: each round's pick and the softmax probabilities of every
/// expert in it (0 for a masked or earlier-picked one), which its backward needs.
pub fn sparsemixer_rounds(scores: &[f32], jitter_eps: f32) -> [(usize, Vec<f32>); 2] {
    let mut remaining = scores.to_vec();
    [(); 2].map(|()| {
        let (pick, m) = remaining.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
        let kept: Vec<f32> = remaining
            .iter()
            .zip(scores)
            .map(|(&r, &s)| if (m - s) / s.abs().max(m) > 2.0 * jitter_eps { f32::NEG_INFINITY } else { r })
            .collect();
        let max = kept.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let sum: f32 = kept.iter().map(|&v| (v - max).exp()).sum();
        remaining[pick] = f32::NEG_INFINITY;
        (pick, kept.iter().map(|&v| (v - max).exp() / sum).collect())
    })
}

/// dL/d(logits) of [`sparsemixer`] given dL/d(weight) of its two picks (`dw`, in pick order).
/// Each round's weight is p_pick of a softmax over its kept experts S (the masks are piecewise
/// constant): `dl_i += dw · p_pick · ([i = pick] − p_i)` for i in S.
pub fn sparsemixer_grad(scores: &[f32], jitter_eps: f32, dw: &[f64]) -> Vec<f32> {
    let mut dl = vec![0f64; scores.len()];
    for ((pick, p), &d) in sparsemixer_rounds(scores, jitter_eps).iter().zip(dw) {
        for (i, (o, &pi)) in dl.iter_mut().zip(p).enumerate() {
            let onehot = if i == *pick { 1.0 } else { 0.0 };
            *o += d * f64::from(p[*pick]) * (onehot - f64::from(pi));
        }
    }
    dl.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PhiMoE reference's eps 0.01 on logits whose masks keep 1 to 4 of 6 experts per
    /// round; steps of 1e-4 (the picks lead by 5e-4 or more) stay inside the masks.
    #[test]
    fn sparsemixer_gradient_matches_finite_differences() {
        let eps = 0.01;
        for z in [
            [2.0f32, 1.99, 1.985, 0.5, -1.0, 1.2],
            [0.3, 0.299, -0.2, 0.2985, 0.1, 0.2995],
            [-0.5, -0.504, -0.506, -2.0, -0.502, -3.0],
        ] {
            let dw = [0.7, -1.3];
            let loss = |z: &[f32]| sparsemixer(z, eps).iter().zip(dw).map(|(&(_, w), d)| f64::from(w) * d).sum::<f64>();
            let picks = sparsemixer(&z, eps).map(|p| p.0);
            let kept = sparsemixer_rounds(&z, eps).map(|r| r.1.iter().filter(|&&p| p > 0.0).count());
            assert!(kept.iter().any(|&k| k > 1), "{z:?}: the masks keep one expert only, nothing to check");
            let got = sparsemixer_grad(&z, eps, &dw);
            for i in 0..z.len() {
                let h = 1e-4f32;
                let mut up = z;
                up[i] += h;
                let mut down = z;
                down[i] -= h;
                assert_eq!((sparsemixer(&up, eps).map(|p| p.0), sparsemixer(&down, eps).map(|p| p.0)), (picks, picks));
                let fd = (loss(&up) - loss(&down)) / (2.0 * f64::from(h));
                assert!((f64::from(got[i]) - fd).abs() <= 5e-3 * fd.abs().max(5e-2), "{z:?} logit {i}: {} vs {fd}", got[i]);
            }
        }
    }
}
