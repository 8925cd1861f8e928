//! One decoder layer: its weights (f32 tensors) and its forward pass, written once against
//! `compute::Tensor`, the same for every dense family
//! (the differences are fields of `ModelConfig`) and for MoE layers (src/model/moe.rs).

use crate::compute::{Attention, Compute, NormKind, Rope, Tensor};
use crate::model::config::{LayerModule, LinearKind, ModelConfig};
use crate::model::hooks::Hooks;
use crate::model::moe::MoeBlock;

/// One decoder layer's weights, f32 tensors on the backend the layer runs on.
pub struct Layer {
    pub index: usize,
    pub input_norm: Tensor, // [hidden]
    /// LayerNorm bias (`cfg.layer_norm`), `[hidden]`.
    pub input_norm_bias: Option<Tensor>,
    pub post_norm: Tensor, // [hidden]
    pub post_norm_bias: Option<Tensor>,
    /// Indexed by `LinearKind as usize`, each `[out_features, in_features]` (empty for a
    /// linear the family does not have).
    pub(crate) linears: [Tensor; 7],
    /// Indexed like `linears`, each `[out_features]` (`{module}.bias`, where the checkpoint has one).
    pub(crate) biases: [Option<Tensor>; 7],
    /// Qwen3's `self_attn.q_norm` and `k_norm` weights, `[head_dim]` each.
    pub(crate) qk_norm: Option<(Tensor, Tensor)>,
    /// The MoE block replacing the dense MLP (Mixtral, Qwen3-MoE sparse layers).
    pub(crate) moe: Option<MoeBlock>,
    pub(crate) compute: Compute,
}

impl Layer {
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
    pub fn forward(&self, cfg: &ModelConfig, rope: &Rope, hidden: &mut Tensor, seq: usize, hooks: &mut dyn Hooks) {
        assert_eq!(hidden.len(), seq * cfg.hidden_size, "Layer::forward: hidden is not [seq, hidden_size]");
        let c = self.compute;

        let x = hidden.norm(c, cfg.norm_kind(), &self.input_norm, self.input_norm_bias.as_ref());
        let mut q = self.linear(cfg, LinearKind::Q, x.clone(), seq, hooks); // [seq, heads * hd]
        let mut k = self.linear(cfg, LinearKind::K, x.clone(), seq, hooks); // [seq, kv_heads * hd]
        let mut v = self.linear(cfg, LinearKind::V, x, seq, hooks); // [seq, kv_heads * hd]
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            // Qwen3RMSNorm is LlamaRMSNorm, over rows of head_dim.
            let rms = NormKind { layer_norm: false, offset: false, eps: cfg.rms_norm_eps };
            q = q.norm(c, rms, q_norm, None);
            k = k.norm(c, rms, k_norm, None);
        }
        q.rope(c, rope, seq, cfg.num_attention_heads);
        k.rope(c, rope, seq, cfg.num_key_value_heads);
        hooks.kv(self.index, &mut k, &mut v);
        let attention = Attention {
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            sliding_window: cfg.sliding_window,
            flash_bf16: c == Compute::Bf16,
        };
        let mut attn = Tensor::attention(&attention, &q, &k, &v, seq); // [seq, heads * hd]
        attn.round(c);
        let o = self.linear(cfg, LinearKind::O, attn, seq, hooks);
        hidden.add(&o);
        hidden.round(c);

        let x = hidden.norm(c, cfg.norm_kind(), &self.post_norm, self.post_norm_bias.as_ref());
        let down = if let (Some(block), Some(moe)) = (&self.moe, &cfg.moe) {
            block.forward(cfg, moe, self.index, &x, seq, c, hooks)
        } else {
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
        };
        hidden.add(&down);
        hidden.round(c);
    }

    /// `kind`'s output for input `x` (`[seq, in_features]`), after the input hook; the bias,
    /// if any, is added before the output is rounded (torch `F.linear` rounds once).
    fn linear(&self, cfg: &ModelConfig, kind: LinearKind, mut x: Tensor, seq: usize, hooks: &mut dyn Hooks) -> Tensor {
        let [n, k] = kind.shape(cfg);
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

    /// The weight of `m` (stacked rows of a fused module; an expert's from the MoE block).
    pub fn module_weight(&self, m: &LayerModule) -> Vec<f32> {
        match (m.expert, &self.moe) {
            (Some(e), Some(block)) => block.weight(e, m.kinds[0]).to_host().into_owned(),
            _ => m.kinds.iter().flat_map(|&k| self.weight(k).to_host().into_owned()).collect(),
        }
    }

    /// The bias of `m`, if its linears have biases (experts have none).
    pub fn module_bias(&self, m: &LayerModule) -> Option<Vec<f32>> {
        if m.expert.is_some() {
            return None;
        }
        let parts = m.kinds.iter().map(|&k| self.bias(k).map(Tensor::to_host)).collect::<Option<Vec<_>>>()?;
        Some(parts.iter().flat_map(|b| b.iter().copied()).collect())
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
