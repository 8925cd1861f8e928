//! One decoder layer: its weights (f32 tensors) and its forward pass, written once against
//! `compute::Tensor`, the same for every dense family
//! (the differences are fields of `ModelConfig`) and for MoE layers (src/model/moe.rs).

use crate::compute::{Compute, NormKind, Rope, Tensor};
use crate::model::config::{LayerModule, LinearKind, ModelConfig};
use crate::model::hooks::Hooks;
use crate::model::moe::MoeBlock;

/// One decoder layer's weights, f32 tensors on the backend the layer runs on.
pub struct Layer {
    pub index: usize,
    /// The norms of `cfg.norms.slots()` (`[attn_in, attn_out, mlp_in, mlp_out]`), where the
    /// family has them.
    pub norms: [Option<Norm>; 4],
    /// Indexed by `LinearKind as usize`, each `[out_features, in_features]` (empty for a
    /// linear the family does not have).
    pub(crate) linears: [Tensor; 7],
    /// Indexed like `linears`, each `[out_features]` (`{module}.bias`, where the checkpoint has one).
    pub(crate) biases: [Option<Tensor>; 7],
    /// The `self_attn.q_norm` and `k_norm` weights: `[head_dim]` each (Qwen3, Gemma3, Exaone4),
    /// or the whole projections' widths (Olmo2).
    pub(crate) qk_norm: Option<(Tensor, Tensor)>,
    /// The MoE block replacing the dense MLP (Mixtral, Qwen3-MoE sparse layers); with Qwen2-MoE's
    /// shared expert the dense Gate/Up/Down linears are that expert.
    pub(crate) moe: Option<MoeBlock>,
    pub(crate) compute: Compute,
}

/// A norm's weight and, for a LayerNorm, its bias (`[hidden]` each).
pub struct Norm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// Where a norm sits in `Layer::norms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormSlot {
    AttnIn,
    AttnOut,
    MlpIn,
    MlpOut,
}

impl Norm {
    fn apply(&self, cfg: &ModelConfig, c: Compute, kind: NormKind, x: &Tensor) -> Tensor {
        norm(cfg, c, kind, x, &self.weight, self.bias.as_ref())
    }
}

/// The norm `kind` of `x`'s rows in arithmetic `c`. Olmo2's RMSNorm multiplies the normalized
/// f32 rows by the weight in f32 and rounds once (HF `Olmo2RMSNorm`: `(weight * x).to(dtype)`,
/// where Llama's rounds the normalized rows first): the f32 norm, then `c`'s rounding.
pub(crate) fn norm(cfg: &ModelConfig, c: Compute, kind: NormKind, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    if !cfg.norm_weight_f32 {
        return x.norm(c, kind, w, b);
    }
    let mut out = x.norm(Compute::F32, kind, w, b);
    out.round(c);
    out
}

impl Layer {
    /// The norm in `slot`, when the family has one there.
    pub fn norm(&self, slot: NormSlot) -> Option<&Norm> {
        self.norms[slot as usize].as_ref()
    }

    /// `x` through the norm in `slot`, or `x` itself where there is none.
    fn normed(&self, cfg: &ModelConfig, slot: NormSlot, x: &Tensor) -> Tensor {
        match self.norm(slot) {
            Some(n) => n.apply(cfg, self.compute, cfg.norm_kind(), x),
            None => x.clone(),
        }
    }

    /// `hidden += branch`, the branch first normed (`attn_out` / `mlp_out`) and multiplied by
    /// `residual_multiplier` where the family does so (each a torch op: rounded).
    fn residual_add(&self, cfg: &ModelConfig, slot: NormSlot, hidden: &mut Tensor, branch: Tensor) {
        let c = self.compute;
        let mut branch = match self.norm(slot) {
            Some(n) => n.apply(cfg, c, cfg.norm_kind(), &branch),
            None => branch,
        };
        if let Some(m) = cfg.residual_multiplier {
            branch.scale_columns(&[m]);
            branch.round(c);
        }
        hidden.add(&branch);
        hidden.round(c);
    }

    /// Runs this decoder layer over one sequence in place: `hidden` is `[seq, hidden_size]`.
    /// HF `LlamaDecoderLayer.forward`:
    /// ```text
    /// h = h + o_proj(attention(rope(q_proj(x)), rope(k_proj(x)), v_proj(x)))   x = input_layernorm(h)
    /// h = h + down_proj(act(gate_proj(x)) * up_proj(x))                        x = post_attention_layernorm(h)
    /// ```
    /// with the family differences of `cfg`: linear biases (HF `Qwen2Attention`), q/k RMSNorm
    /// per head before RoPE (`Qwen3Attention`: `q_norm(q_proj(x).view(..., head_dim))`),
    /// `GemmaRMSNorm` norms and tanh-GELU (`GemmaDecoderLayer`, `GemmaMLP`), LayerNorms and a
    /// plain MLP `down(act(up(x)))` (`Starcoder2DecoderLayer`, `NemotronDecoderLayer`), RoPE of
    /// the leading `rotary_dim` dims of each head (Nemotron), an MoE block instead of the MLP
    /// (Mixtral, Qwen3-MoE). Phi3's fused modules are split at load, so it runs as Llama.
    /// Norms sit where `cfg.norms` puts them (Gemma2/3: also on both branch outputs; Olmo2,
    /// Exaone4: only there, HF `Olmo2DecoderLayer`); the attention has the family's scale,
    /// soft cap and per-layer window and RoPE (`cfg.attention`, `cfg.layer_rope`); Granite
    /// multiplies each branch output by `residual_multiplier`. Parallel layers (`cfg.parallel`:
    /// GPT-J, Falcon) run both branches on the layer input, `h = h + (o_proj(..) + mlp(x'))`, the
    /// MLP reading the attention's normed input or its own norm of h (Falcon's `ln_mlp`).
    pub fn forward(&self, cfg: &ModelConfig, rope: &Rope, hidden: &mut Tensor, seq: usize, hooks: &mut dyn Hooks) {
        assert_eq!(hidden.len(), seq * cfg.hidden_size, "Layer::forward: hidden is not [seq, hidden_size]");
        let c = self.compute;

        let x = self.normed(cfg, NormSlot::AttnIn, hidden);
        // A parallel MLP reads the attention's normed input, or its own norm of the layer input.
        let parallel_x = cfg.parallel.then(|| match self.norm(NormSlot::MlpIn) {
            Some(_) => self.normed(cfg, NormSlot::MlpIn, hidden),
            None => x.clone(),
        });
        let mut q = self.linear(cfg, LinearKind::Q, x.clone(), seq, hooks); // [seq, heads * hd]
        let mut k = self.linear(cfg, LinearKind::K, x.clone(), seq, hooks); // [seq, kv_heads * hd]
        let mut v = self.linear(cfg, LinearKind::V, x, seq, hooks); // [seq, kv_heads * hd]
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            // Over rows of the weight's width: each head (Qwen3, Gemma3 with 1 + w, Exaone4)
            // or the whole projection (Olmo2).
            let kind = cfg.qk_norm_kind();
            q = norm(cfg, c, kind, &q, q_norm, None);
            k = norm(cfg, c, kind, &k, k_norm, None);
        }
        if let Some(rope) = cfg.layer_rope(self.index, rope) {
            q.rope(c, rope, seq, cfg.num_attention_heads);
            k.rope(c, rope, seq, cfg.num_key_value_heads);
        }
        hooks.kv(self.index, &mut k, &mut v);
        let attention = cfg.attention(self.index, c == Compute::Bf16);
        let mut attn = Tensor::attention(&attention, &q, &k, &v, seq); // [seq, heads * hd]
        attn.round(c);
        let mut o = self.linear(cfg, LinearKind::O, attn, seq, hooks);
        if let Some(x) = parallel_x {
            // HF GPTJBlock: `attn_output + feed_forward_hidden_states + residual`; Falcon:
            // `mlp_output += attention_output`, then the residual (each sum a rounded torch op).
            let mlp = self.dense_mlp(cfg, x, seq, hooks);
            o.add(&mlp);
            o.round(c);
            self.residual_add(cfg, NormSlot::AttnOut, hidden, o);
            return;
        }
        self.residual_add(cfg, NormSlot::AttnOut, hidden, o);

        let x = self.normed(cfg, NormSlot::MlpIn, hidden);
        let down = if let (Some(block), Some(moe)) = (&self.moe, &cfg.moe) {
            let mut out = block.forward(cfg, moe, self.index, &x, seq, c, hooks);
            if block.shared_gate().is_some() {
                // Qwen2-MoE: out + sigmoid(shared_expert_gate(x)) · shared_expert(x), each a torch op.
                let factors = block.shared_factors(&x, seq, c);
                let mut shared = self.dense_mlp(cfg, x, seq, hooks);
                shared.scale_rows(cfg.hidden_size, &factors);
                shared.round(c);
                out.add(&shared);
                out.round(c);
            }
            out
        } else {
            self.dense_mlp(cfg, x, seq, hooks)
        };
        self.residual_add(cfg, NormSlot::MlpOut, hidden, down);
    }

    /// The dense MLP (Qwen2-MoE's shared expert in an MoE layer) on the normed `x`.
    fn dense_mlp(&self, cfg: &ModelConfig, x: Tensor, seq: usize, hooks: &mut dyn Hooks) -> Tensor {
        let c = self.compute;
        let mlp = if cfg.gated_mlp() {
            let mut gate = self.linear(cfg, LinearKind::Gate, x.clone(), seq, hooks); // [seq, intermediate]
            let up = self.linear(cfg, LinearKind::Up, x, seq, hooks); // [seq, intermediate]
            gate.gated_mul(c, cfg.act, &up);
            gate
        } else {
            // One torch op on the up output: rounded once.
            let mut up = self.linear(cfg, LinearKind::Up, x, seq, hooks);
            up.activate(cfg.act);
            up.round(c);
            up
        };
        self.linear(cfg, LinearKind::Down, mlp, seq, hooks)
    }

    /// `kind`'s output for input `x` (`[seq, in_features]`), after the input hook; the bias,
    /// if any, is added before the output is rounded (torch `F.linear` rounds once).
    fn linear(&self, cfg: &ModelConfig, kind: LinearKind, mut x: Tensor, seq: usize, hooks: &mut dyn Hooks) -> Tensor {
        let [n, k] = cfg.linear_shape(self.index, kind);
        hooks.linear_input(self.index, kind, &mut x, k);
        let mut out = x.matmul_bt(&self.linears[kind as usize], seq, k, n);
        if let Some(b) = &self.biases[kind as usize] {
            out.add_row_bias(b);
        }
        out.round(self.compute);
        out
    }

    /// Replaces one linear's weight (the quantizer swaps in dequantized weights).
    /// Panics if `w` does not have the current weight's length.
    pub fn set_weight(&mut self, kind: LinearKind, w: Vec<f32>) {
        let slot = &mut self.linears[kind as usize];
        assert_eq!(w.len(), slot.len(), "set_weight({kind:?}): wrong number of values");
        *slot = Tensor::on(w, slot.device());
    }

    /// The MoE block of an MoE layer (its dense gate/up/down weights are then empty).
    pub fn moe(&self) -> Option<&MoeBlock> {
        self.moe.as_ref()
    }

    /// The MoE block, to replace expert weights.
    pub fn moe_mut(&mut self) -> Option<&mut MoeBlock> {
        self.moe.as_mut()
    }

    /// The weight of `m` as the checkpoint holds it (a fused module's linears' rows stacked,
    /// in the checkpoint's row order; an expert's from the MoE block).
    pub fn module_weight(&self, m: &LayerModule) -> Vec<f32> {
        match (m.expert, &self.moe) {
            (Some(e), Some(block)) => block.weight(e, m.kinds[0]).to_host().into_owned(),
            _ => m.to_checkpoint_rows(m.kinds.iter().flat_map(|&k| self.weight(k).to_host().into_owned()).collect(), m.shape[1]),
        }
    }

    /// The bias of `m`, if its linears have biases (experts have none), in the checkpoint's order.
    pub fn module_bias(&self, m: &LayerModule) -> Option<Vec<f32>> {
        if m.expert.is_some() {
            return None;
        }
        let parts = m.kinds.iter().map(|&k| self.bias(k).map(Tensor::to_host)).collect::<Option<Vec<_>>>()?;
        Some(m.to_checkpoint_rows(parts.iter().flat_map(|b| b.iter().copied()).collect(), 1))
    }

    /// Qwen3's per-head q and k RMSNorm weights (`[head_dim]` each), when the family has them.
    pub fn qk_norm(&self) -> Option<(&Tensor, &Tensor)> {
        self.qk_norm.as_ref().map(|(q, k)| (q, k))
    }

    /// The arithmetic this layer was loaded with.
    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// `kind`'s weight, `[out_features, in_features]`.
    pub fn weight(&self, kind: LinearKind) -> &Tensor {
        &self.linears[kind as usize]
    }

    /// `kind`'s bias, `[out_features]`, when the checkpoint has one.
    pub fn bias(&self, kind: LinearKind) -> Option<&Tensor> {
        self.biases[kind as usize].as_ref()
    }
}
