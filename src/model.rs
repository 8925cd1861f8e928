//! Layer-at-a-time runtime for Llama-family decoders (HF `LlamaForCausalLM`,
//! `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `GemmaForCausalLM`,
//! `Phi3ForCausalLM`, `Starcoder2ForCausalLM`, `NemotronForCausalLM`; what sets them apart is in
//! `ModelConfig`'s `qkv_bias`, `mlp_bias`, `qk_norm`, `norm_offset`, `layer_norm`, `embed_scale`,
//! `act`, `rotary_dim` and `modules`), and `MixtralForCausalLM` / `Qwen3MoeForCausalLM`, whose MLP
//! is a mixture-of-experts block (`ModelConfig::moe`, src/moe.rs).
//!
//! The checkpoint stays memory-mapped; only the layer being run is converted to f32, so a
//! 70B model never needs to be in memory at once. A caller walks the model like this:
//! ```text
//! hidden = model.embed(ids)                    // [seq, hidden_size]
//! for i in 0..num_hidden_layers: model.load_layer(i)?.forward(cfg, rope, &mut hidden, seq, hooks)
//! head = model.load_head()?; head.nll(&hidden, ids)
//! ```
//! Calibration and fake-quant evaluation plug into the forward pass through [`Hooks`].

use crate::config::{Activation, ModelConfig};
use crate::error::{Error, Result};
use crate::ops::{self, Attention, Rope};
use crate::quant::read::{self, InputQuant};
use crate::safetensors::{Checkpoint, Dtype, TensorView};
use std::path::Path;

const EMBED_TOKENS: &str = "model.embed_tokens.weight";
const FINAL_NORM: &str = "model.norm";
const LM_HEAD: &str = "lm_head.weight";

/// Arithmetic of the forward pass. `F32` computes everything in f32. `Bf16` also rounds every
/// intermediate tensor to bf16 where PyTorch materializes one when it runs a bf16 model
/// (linear outputs, norm outputs, RoPE products, activations, residual sums): calibrating
/// this way reproduces ModelOpt's activation amax, which it observes on bf16 tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compute {
    #[default]
    F32,
    Bf16,
}

impl Compute {
    /// Rounds a tensor the way this arithmetic stores it (bf16 or unchanged).
    pub fn round(self, x: &mut [f32]) {
        if self == Compute::Bf16 {
            ops::round_slice_bf16(x);
        }
    }
    /// One value rounded the way this arithmetic stores tensors.
    pub fn round_one(self, v: f32) -> f32 {
        match self {
            Compute::Bf16 => crate::numerics::round_bf16(v),
            Compute::F32 => v,
        }
    }

    /// The gated MLP's `gate ← act(gate) * up` (bf16: `act(gate)` and the product each rounded).
    pub fn gated_mul(self, act: Activation, gate: &mut [f32], up: &[f32]) {
        match self {
            Compute::F32 => ops::gated_mul(act_fn(act), gate, up),
            Compute::Bf16 => ops::gated_mul_bf16(act_fn(act), gate, up),
        }
    }

    /// The norm of `cfg`: RMSNorm (`rms_norm`), or LayerNorm with `bias` when `cfg.layer_norm`
    /// (`1 + weight` when `cfg.norm_offset`: HF `NemotronLayerNorm1P`, which adds the 1 to the
    /// weight in the model dtype; `nn.LayerNorm` computes in f32 and rounds its output once).
    pub(crate) fn norm(self, cfg: &ModelConfig, x: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        if !cfg.layer_norm {
            return self.rms_norm(cfg.norm_offset, x, weight, cfg.rms_norm_eps, out);
        }
        let one_plus: Vec<f32>;
        let weight = if cfg.norm_offset {
            one_plus = weight.iter().map(|&w| self.round_one(w + 1.0)).collect();
            &one_plus
        } else {
            weight
        };
        ops::layer_norm(x, weight, bias, cfg.rms_norm_eps, out);
        self.round(out);
    }

    /// HF `LlamaRMSNorm`, or `GemmaRMSNorm` (`1 + weight`) when `offset`.
    fn rms_norm(self, offset: bool, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        match (self, offset) {
            (Compute::F32, false) => ops::rms_norm(x, weight, eps, out),
            (Compute::Bf16, false) => ops::rms_norm_bf16(x, weight, eps, out),
            (Compute::F32, true) => ops::rms_norm_offset(x, weight, eps, out),
            (Compute::Bf16, true) => ops::rms_norm_offset_bf16(x, weight, eps, out),
        }
    }
}

/// The MLP activation's scalar function.
pub(crate) fn act_fn(act: Activation) -> fn(f32) -> f32 {
    match act {
        Activation::Silu => ops::silu,
        Activation::GeluTanh => ops::gelu_tanh,
        Activation::Relu2 => ops::relu2,
    }
}

/// A model's config and the checkpoint folders its tensors are read from.
pub struct Model {
    pub config: ModelConfig,
    /// Arithmetic of the layers and head loaded from now on.
    pub compute: Compute,
    /// Searched in order: the model folder, then the fallback.
    sources: Vec<Checkpoint>,
}

impl Model {
    /// `dir` holds config.json and the weights; `fallback` is another checkpoint folder for
    /// tensors missing from `dir` (reference exports leave out embed_tokens / lm_head).
    pub fn open(dir: &Path, fallback: Option<&Path>) -> Result<Model> {
        let config = ModelConfig::from_dir(dir)?;
        let mut sources = vec![Checkpoint::open(dir)?];
        if let Some(f) = fallback {
            sources.push(Checkpoint::open(f)?);
        }
        Ok(Model { config, compute: Compute::F32, sources })
    }

    /// The model folder (the first source).
    pub fn dir(&self) -> &Path {
        self.sources[0].dir()
    }

    /// The tensor names of the model folder, sorted.
    pub fn weight_names(&self) -> Vec<String> {
        self.sources[0].names().into_iter().map(String::from).collect()
    }

    /// The model dtype: that of the embedding table (ModelOpt does its arithmetic in it).
    pub fn dtype(&self) -> Result<Dtype> {
        Ok(self.tensor(EMBED_TOKENS)?.dtype)
    }

    /// Tensor `name` from the first source that has it, if any.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        self.sources.iter().find_map(|c| c.get(name))
    }

    /// The first source's tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        if let Some(t) = self.sources.iter().find_map(|c| c.get(name)) {
            return Ok(t);
        }
        let dirs: Vec<String> = self.sources.iter().map(|c| c.dir().display().to_string()).collect();
        Err(Error::tensor(name, format!("not found in {}", dirs.join(" or "))))
    }

    /// Embedding rows of `ids`: `[ids.len(), hidden_size]` (HF `embed_tokens(input_ids)`),
    /// times `embed_scale` where the config has one (HF `GemmaModel.forward`:
    /// `hidden * torch.tensor(hidden_size**0.5, dtype=hidden.dtype)`, so under `Compute::Bf16`
    /// the factor and the product are bf16). Only those rows are read and converted.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let (vocab, hidden) = (self.config.vocab_size, self.config.hidden_size);
        let table = self.tensor(EMBED_TOKENS)?;
        table.expect_shape(&[vocab, hidden])?;
        let row_bytes = hidden * table.dtype.size();
        let row_shape = [hidden];
        let mut out = Vec::with_capacity(ids.len() * hidden);
        for &id in ids {
            let id = id as usize;
            if id >= vocab {
                return Err(Error::tensor(EMBED_TOKENS, format!("token id {id} is outside the vocabulary ({vocab})")));
            }
            let row = TensorView { shape: &row_shape, data: &table.data[id * row_bytes..][..row_bytes], ..table };
            let values = row.to_f32()?;
            check_finite(EMBED_TOKENS, &values, id * hidden)?;
            out.extend_from_slice(&values);
        }
        if let Some(scale) = self.config.embed_scale {
            let scale = if self.compute == Compute::Bf16 { crate::numerics::round_bf16(scale) } else { scale };
            out.iter_mut().for_each(|v| *v *= scale);
            self.compute.round(&mut out);
        }
        Ok(out)
    }

    /// Decoder layer `i`'s weights, as f32.
    pub fn load_layer(&self, i: usize) -> Result<Layer> {
        let cfg = &self.config;
        if i >= cfg.num_hidden_layers {
            return Err(Error::tensor(
                format!("model.layers.{i}"),
                format!("the model has {} layers", cfg.num_hidden_layers),
            ));
        }
        let prefix = format!("model.layers.{i}");
        let (input_norm, input_norm_bias) = self.load_norm(&format!("{prefix}.input_layernorm"))?;
        let (post_norm, post_norm_bias) = self.load_norm(&format!("{prefix}.post_attention_layernorm"))?;
        // An MoE layer has no dense MLP: its gate/up/down slots stay empty.
        let moe = match &cfg.moe {
            Some(m) if m.is_sparse(i) => Some(crate::moe::MoeBlock::load(self, m, i)?),
            _ => None,
        };
        let mut linears: [Vec<f32>; 7] = Default::default();
        let mut biases: [Option<Vec<f32>>; 7] = Default::default();
        for m in cfg.modules.iter().filter(|m| moe.is_none() || !m.is_mlp()) {
            let module = format!("{prefix}.{}", m.name);
            let shape = m.shape(cfg);
            let w = read::linear_weight(self, &module, shape)?;
            let name = format!("{module}.bias");
            let required = m.kinds.iter().any(|k| match k {
                LinearKind::Q | LinearKind::K | LinearKind::V => cfg.qkv_bias,
                LinearKind::O => false,
                LinearKind::Gate | LinearKind::Up | LinearKind::Down => cfg.mlp_bias,
            });
            let b = if required || self.get(&name).is_some() { Some(self.load(&name, &shape[..1])?) } else { None };
            // A fused module's output rows are its linears' outputs one after the other.
            let mut row = 0;
            for &k in m.kinds {
                let [rows, cols] = k.shape(cfg);
                linears[k as usize] = w[row * cols..(row + rows) * cols].to_vec();
                biases[k as usize] = b.as_ref().map(|b| b[row..row + rows].to_vec());
                row += rows;
            }
        }
        let qk_norm = if cfg.qk_norm {
            let norm = |which: &str| self.load(&format!("{prefix}.self_attn.{which}.weight"), &[cfg.head_dim]);
            Some((norm("q_norm")?, norm("k_norm")?))
        } else {
            None
        };
        Ok(Layer {
            index: i,
            input_norm,
            input_norm_bias,
            post_norm,
            post_norm_bias,
            linears,
            biases,
            qk_norm,
            moe,
            compute: self.compute,
        })
    }

    /// Norm `module`'s weight and, for a LayerNorm, its bias (`[hidden]` each).
    fn load_norm(&self, module: &str) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let shape = [self.config.hidden_size];
        let weight = self.load(&format!("{module}.weight"), &shape)?;
        let bias = if self.config.layer_norm { Some(self.load(&format!("{module}.bias"), &shape)?) } else { None };
        Ok((weight, bias))
    }

    /// The final norm and the output projection: `lm_head.weight` when the checkpoint has one
    /// (dequantized, with its input quantization, if auto-quantize quantized it), else
    /// `embed_tokens` when the embeddings are tied.
    pub fn load_head(&self) -> Result<Head> {
        let cfg = &self.config;
        let (norm, norm_bias) = self.load_norm(FINAL_NORM)?;
        let shape = [cfg.vocab_size, cfg.hidden_size];
        let (lm_head, input) = if self.get(LM_HEAD).is_some() || !cfg.tie_word_embeddings {
            (read::linear_weight(self, "lm_head", shape)?, read::input_quant(self, "lm_head", shape)?)
        } else {
            (self.load(EMBED_TOKENS, &shape)?, InputQuant::default())
        };
        Ok(Head { cfg: cfg.clone(), norm, norm_bias, lm_head, compute: self.compute, input })
    }

    /// Tensor `name` as f32, after checking its shape and that every value is finite.
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        t.expect_shape(shape)?;
        let values = t.to_f32()?;
        check_finite(name, &values, 0)?;
        Ok(values)
    }
}

/// Rejects NaN and ±Inf; `values` start at flat index `offset` of tensor `name`.
fn check_finite(name: &str, values: &[f32], offset: usize) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::tensor(name, format!("contains NaN/Inf at index {} ({})", offset + i, values[i]))),
    }
}

/// The seven Linear layers of a (Llama) decoder layer, as the runtime runs them. A family
/// without a gated MLP has no `Gate` (its MLP is `Down(act(Up(x)))`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearKind {
    /// In the order the forward pass runs them.
    pub const ALL: [LinearKind; 7] = [
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
    ];

    /// The Llama module path inside a layer, as in the tensor names
    /// (`model.layers.{i}.<module>.weight`); `ModelConfig::modules` has each family's.
    pub fn module(self) -> &'static str {
        LLAMA_MODULES[self as usize].name
    }

    /// Weight shape `[out_features, in_features]`.
    pub fn shape(self, cfg: &ModelConfig) -> [usize; 2] {
        let q = cfg.num_attention_heads * cfg.head_dim;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        match self {
            LinearKind::Q => [q, cfg.hidden_size],
            LinearKind::K | LinearKind::V => [kv, cfg.hidden_size],
            LinearKind::O => [cfg.hidden_size, q],
            LinearKind::Gate | LinearKind::Up => [cfg.intermediate_size, cfg.hidden_size],
            LinearKind::Down => [cfg.hidden_size, cfg.intermediate_size],
        }
    }
}

/// A Linear module of a decoder layer as the checkpoint stores it: its path inside the layer
/// and the runtime linears whose weights are its output rows, in order (Phi3's `qkv_proj` is
/// q, k and v stacked; ModelOpt quantizes it as the one Linear it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module {
    pub name: &'static str,
    pub kinds: &'static [LinearKind],
}

impl Module {
    /// Part of the MLP (gate, up or down).
    pub fn is_mlp(&self) -> bool {
        self.kinds.iter().any(|k| matches!(k, LinearKind::Gate | LinearKind::Up | LinearKind::Down))
    }

    /// Weight shape `[out_features, in_features]`: the linears' rows stacked.
    pub fn shape(&self, cfg: &ModelConfig) -> [usize; 2] {
        let rows = self.kinds.iter().map(|k| k.shape(cfg)[0]).sum();
        [rows, self.kinds[0].shape(cfg)[1]]
    }
}

const fn module(name: &'static str, kinds: &'static [LinearKind]) -> Module {
    Module { name, kinds }
}

/// HF `LlamaDecoderLayer` (and Mistral, Qwen2, Qwen3, Gemma): one module per linear, in `LinearKind` order.
pub const LLAMA_MODULES: &[Module] = &[
    module("self_attn.q_proj", &[LinearKind::Q]),
    module("self_attn.k_proj", &[LinearKind::K]),
    module("self_attn.v_proj", &[LinearKind::V]),
    module("self_attn.o_proj", &[LinearKind::O]),
    module("mlp.gate_proj", &[LinearKind::Gate]),
    module("mlp.up_proj", &[LinearKind::Up]),
    module("mlp.down_proj", &[LinearKind::Down]),
];

/// HF `Phi3Attention.qkv_proj` (q, k, v rows) and `Phi3MLP.gate_up_proj`
/// (`gate, up = gate_up_proj(x).chunk(2, dim=-1)`: gate rows first).
pub const PHI3_MODULES: &[Module] = &[
    module("self_attn.qkv_proj", &[LinearKind::Q, LinearKind::K, LinearKind::V]),
    module("self_attn.o_proj", &[LinearKind::O]),
    module("mlp.gate_up_proj", &[LinearKind::Gate, LinearKind::Up]),
    module("mlp.down_proj", &[LinearKind::Down]),
];

/// HF `Starcoder2MLP`: `c_proj(act(c_fc(x)))`.
pub const STARCODER2_MODULES: &[Module] = &[
    module("self_attn.q_proj", &[LinearKind::Q]),
    module("self_attn.k_proj", &[LinearKind::K]),
    module("self_attn.v_proj", &[LinearKind::V]),
    module("self_attn.o_proj", &[LinearKind::O]),
    module("mlp.c_fc", &[LinearKind::Up]),
    module("mlp.c_proj", &[LinearKind::Down]),
];

/// HF `NemotronMLP`: `down_proj(act(up_proj(x)))`.
pub const NEMOTRON_MODULES: &[Module] = &[
    module("self_attn.q_proj", &[LinearKind::Q]),
    module("self_attn.k_proj", &[LinearKind::K]),
    module("self_attn.v_proj", &[LinearKind::V]),
    module("self_attn.o_proj", &[LinearKind::O]),
    module("mlp.up_proj", &[LinearKind::Up]),
    module("mlp.down_proj", &[LinearKind::Down]),
];

impl ModelConfig {
    /// The MLP is `act(gate(x)) * up(x)` (else `act(up(x))`).
    pub fn gated_mlp(&self) -> bool {
        self.modules.iter().any(|m| m.kinds.contains(&LinearKind::Gate))
    }

    /// The linears a layer of this family has, in forward order.
    pub fn linear_kinds(&self) -> Vec<LinearKind> {
        self.modules.iter().flat_map(|m| m.kinds.iter().copied()).collect()
    }

    /// The MoE config when layer `l` has an MoE block.
    pub fn moe_layer(&self, l: usize) -> Option<&crate::moe::MoeConfig> {
        self.moe.as_ref().filter(|m| m.is_sparse(l))
    }

    /// Every Linear module of decoder layer `l`, in forward order: `modules`, or in an MoE
    /// layer the attention modules and then each expert's gate, up and down.
    pub fn layer_modules(&self, l: usize) -> Vec<LayerModule> {
        let dense = |m: &Module| LayerModule {
            path: format!("model.layers.{l}.{}", m.name),
            kinds: m.kinds,
            expert: None,
            shape: m.shape(self),
        };
        let Some(moe) = self.moe_layer(l) else { return self.modules.iter().map(dense).collect() };
        let experts = (0..moe.num_experts).flat_map(|e| {
            moe.expert_modules.iter().map(move |m| LayerModule {
                path: moe.expert_module(l, e, m.kinds[0]),
                kinds: m.kinds,
                expert: Some(e),
                shape: moe.expert_shape(self, m.kinds[0]),
            })
        });
        self.modules.iter().filter(|m| !m.is_mlp()).map(dense).chain(experts).collect()
    }
}

/// One Linear module of a decoder layer (see `ModelConfig::layer_modules`).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerModule {
    /// `model.layers.{l}.<module>`.
    pub path: String,
    /// The runtime linears whose weights are its output rows.
    pub kinds: &'static [LinearKind],
    /// The expert, for an MoE expert's projection.
    pub expert: Option<usize>,
    /// `[out, in]`.
    pub shape: [usize; 2],
}

/// Index in `modules` of the module holding linear `kind` (of `expert` in an MoE block).
pub fn module_of(modules: &[LayerModule], expert: Option<usize>, kind: LinearKind) -> Option<usize> {
    modules.iter().position(|m| m.expert == expert && m.kinds.contains(&kind))
}

/// What calibration and fake-quant evaluation plug into the forward pass.
pub trait Hooks {
    /// Input activations of linear `kind` of layer `layer` (`[rows, cols]`, rows = tokens)
    /// just before its matmul. May modify them in place (activation fake-quant): q, k and v
    /// each get their own copy of the normed input, likewise gate and up.
    fn linear_input(&mut self, layer: usize, kind: LinearKind, x: &mut [f32], cols: usize) {
        let _ = (layer, kind, x, cols);
    }
    /// Keys and values after RoPE (`[seq, n_kv_heads * head_dim]` each), for KV-cache amax;
    /// may modify them (KV-cache fake quantization).
    fn kv(&mut self, layer: usize, k: &mut [f32], v: &mut [f32]) {
        let _ = (layer, k, v);
    }
    /// Input of expert `expert`'s linear `kind` (Gate, Up or Down) in an MoE layer: only the
    /// rows of the tokens routed to that expert. Defaults to `linear_input` with `kind`, so an
    /// observer that does not tell experts apart sees the union over the block's experts.
    fn expert_input(&mut self, layer: usize, expert: usize, kind: LinearKind, x: &mut [f32], cols: usize) {
        let _ = expert;
        self.linear_input(layer, kind, x, cols);
    }
}

/// The plain forward pass.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// One decoder layer's weights, f32.
pub struct Layer {
    pub index: usize,
    pub input_norm: Vec<f32>, // [hidden]
    /// LayerNorm bias (`cfg.layer_norm`), `[hidden]`.
    pub input_norm_bias: Option<Vec<f32>>,
    pub post_norm: Vec<f32>, // [hidden]
    pub post_norm_bias: Option<Vec<f32>>,
    /// Indexed by `LinearKind as usize`, each `[out_features, in_features]` (empty for a
    /// linear the family does not have).
    linears: [Vec<f32>; 7],
    /// Indexed like `linears`, each `[out_features]` (`{module}.bias`, where the checkpoint has one).
    biases: [Option<Vec<f32>>; 7],
    /// Qwen3's `self_attn.q_norm` and `k_norm` weights, `[head_dim]` each.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// The MoE block replacing the dense MLP (Mixtral, Qwen3-MoE sparse layers).
    moe: Option<crate::moe::MoeBlock>,
    compute: Compute,
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
    pub fn forward(&self, cfg: &ModelConfig, rope: &Rope, hidden: &mut [f32], seq: usize, hooks: &mut dyn Hooks) {
        let h = cfg.hidden_size;
        assert_eq!(hidden.len(), seq * h, "Layer::forward: hidden is not [seq, hidden_size]");
        let c = self.compute;
        let mut x = vec![0f32; seq * h];

        c.norm(cfg, hidden, &self.input_norm, self.input_norm_bias.as_deref(), &mut x);
        let mut q = self.linear(cfg, LinearKind::Q, x.clone(), seq, hooks); // [seq, heads * hd]
        let mut k = self.linear(cfg, LinearKind::K, x.clone(), seq, hooks); // [seq, kv_heads * hd]
        let mut v = self.linear(cfg, LinearKind::V, x, seq, hooks); // [seq, kv_heads * hd]
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            // Qwen3RMSNorm is LlamaRMSNorm, over rows of head_dim.
            for (t, w) in [(&mut q, q_norm), (&mut k, k_norm)] {
                let input = t.clone();
                c.rms_norm(false, &input, w, cfg.rms_norm_eps, t);
            }
        }
        for (t, heads) in [(&mut q, cfg.num_attention_heads), (&mut k, cfg.num_key_value_heads)] {
            match c {
                Compute::F32 => rope.apply(t, seq, heads),
                Compute::Bf16 => rope.apply_bf16(t, seq, heads),
            }
        }
        hooks.kv(self.index, &mut k, &mut v);
        let attention = Attention {
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            sliding_window: cfg.sliding_window,
            flash_bf16: c == Compute::Bf16,
        };
        let mut attn = vec![0f32; q.len()]; // [seq, heads * hd]
        attention.forward(&q, &k, &v, seq, &mut attn);
        c.round(&mut attn);
        let o = self.linear(cfg, LinearKind::O, attn, seq, hooks);
        ops::add_in_place(hidden, &o);
        c.round(hidden);

        let mut x = vec![0f32; seq * h];
        c.norm(cfg, hidden, &self.post_norm, self.post_norm_bias.as_deref(), &mut x);
        let down = if let (Some(block), Some(moe)) = (&self.moe, &cfg.moe) {
            block.forward(cfg, moe, self.index, &x, seq, c, hooks)
        } else {
            let mlp = if cfg.gated_mlp() {
                let mut gate = self.linear(cfg, LinearKind::Gate, x.clone(), seq, hooks); // [seq, intermediate]
                let up = self.linear(cfg, LinearKind::Up, x, seq, hooks); // [seq, intermediate]
                c.gated_mul(cfg.act, &mut gate, &up);
                gate
            } else {
                // One torch op on the up output: rounded once.
                let mut up = self.linear(cfg, LinearKind::Up, x, seq, hooks);
                let act = act_fn(cfg.act);
                up.iter_mut().for_each(|v| *v = act(*v));
                c.round(&mut up);
                up
            };
            self.linear(cfg, LinearKind::Down, mlp, seq, hooks)
        };
        ops::add_in_place(hidden, &down);
        c.round(hidden);
    }

    /// `kind`'s output for input `x` (`[seq, in_features]`), after the input hook; the bias,
    /// if any, is added before the output is rounded (torch `F.linear` rounds once).
    fn linear(
        &self,
        cfg: &ModelConfig,
        kind: LinearKind,
        mut x: Vec<f32>,
        seq: usize,
        hooks: &mut dyn Hooks,
    ) -> Vec<f32> {
        let [n, k] = kind.shape(cfg);
        hooks.linear_input(self.index, kind, &mut x, k);
        let mut out = vec![0f32; seq * n];
        ops::matmul_bt(&x, self.weight(kind), seq, k, n, &mut out);
        if let Some(b) = self.bias(kind) {
            out.chunks_exact_mut(n).for_each(|row| ops::add_in_place(row, b));
        }
        self.compute.round(&mut out);
        out
    }

    /// Replaces one linear's weight (the quantizer swaps in dequantized weights).
    /// Panics if `w` does not have the current weight's length.
    pub fn set_weight(&mut self, kind: LinearKind, w: Vec<f32>) {
        let slot = &mut self.linears[kind as usize];
        assert_eq!(w.len(), slot.len(), "set_weight({kind:?}): wrong number of values");
        *slot = w;
    }

    /// The MoE block of an MoE layer (its dense gate/up/down weights are then empty).
    pub fn moe(&self) -> Option<&crate::moe::MoeBlock> {
        self.moe.as_ref()
    }

    /// The MoE block, to replace expert weights.
    pub fn moe_mut(&mut self) -> Option<&mut crate::moe::MoeBlock> {
        self.moe.as_mut()
    }

    /// The weight of `m` (stacked rows of a fused module; an expert's from the MoE block).
    pub fn module_weight(&self, m: &LayerModule) -> Vec<f32> {
        match (m.expert, &self.moe) {
            (Some(e), Some(block)) => block.weight(e, m.kinds[0]).to_vec(),
            _ => m.kinds.iter().flat_map(|&k| self.weight(k).iter().copied()).collect(),
        }
    }

    /// The bias of `m`, if its linears have biases (experts have none).
    pub fn module_bias(&self, m: &LayerModule) -> Option<Vec<f32>> {
        if m.expert.is_some() {
            return None;
        }
        m.kinds.iter().map(|&k| self.bias(k)).collect::<Option<Vec<_>>>().map(|b| b.concat())
    }

    /// Qwen3's per-head q and k RMSNorm weights (`[head_dim]` each), when the family has them.
    pub fn qk_norm(&self) -> Option<(&[f32], &[f32])> {
        self.qk_norm.as_ref().map(|(q, k)| (&q[..], &k[..]))
    }

    /// The arithmetic this layer was loaded with.
    pub fn compute(&self) -> Compute {
        self.compute
    }

    pub fn weight(&self, kind: LinearKind) -> &[f32] {
        &self.linears[kind as usize]
    }

    /// `kind`'s bias, `[out_features]`, when the checkpoint has one.
    pub fn bias(&self, kind: LinearKind) -> Option<&[f32]> {
        self.biases[kind as usize].as_deref()
    }
}

/// Memory for one block of logits in [`Head::nll`]. Blocks are as tall as this allows (up to
/// `NLL_MAX_ROWS`): every block packs all of lm_head again, so tall blocks amortize that.
const NLL_BLOCK_BYTES: usize = 64 << 20;
const NLL_MAX_ROWS: usize = 512;

/// The final norm and the language-model head.
pub struct Head {
    /// For the kind of norm.
    cfg: ModelConfig,
    norm: Vec<f32>, // [hidden]
    /// LayerNorm bias (`cfg.layer_norm`), `[hidden]`.
    norm_bias: Option<Vec<f32>>,
    lm_head: Vec<f32>, // [vocab, hidden]
    compute: Compute,
    /// What happens to lm_head's input (quantized lm_head of a mixed-precision checkpoint).
    input: InputQuant,
}

impl Head {
    fn hidden_size(&self) -> usize {
        self.norm.len()
    }

    /// The output projection `[vocab, hidden]` (dequantized when stored quantized).
    pub fn lm_head(&self) -> &[f32] {
        &self.lm_head
    }

    /// The final norm's weight, `[hidden]`.
    pub fn norm_weight(&self) -> &[f32] {
        &self.norm
    }

    /// The final norm's epsilon.
    pub fn eps(&self) -> f32 {
        self.cfg.rms_norm_eps
    }

    /// The final norm's bias (LayerNorm families), `[hidden]`.
    pub fn norm_bias(&self) -> Option<&[f32]> {
        self.norm_bias.as_deref()
    }

    /// The config the head was loaded with (for the kind of norm).
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn vocab_size(&self) -> usize {
        self.lm_head.len() / self.norm.len()
    }

    /// The final-norm output (HF `hidden_states[num_layers]`): `[seq, hidden]`.
    pub fn normed(&self, hidden: &[f32], seq: usize) -> Vec<f32> {
        assert_eq!(hidden.len(), seq * self.hidden_size(), "Head: hidden is not [seq, hidden_size]");
        let mut out = vec![0f32; hidden.len()];
        self.compute.norm(&self.cfg, hidden, &self.norm, self.norm_bias.as_deref(), &mut out);
        out
    }

    /// Max |x| of lm_head's input (the final-norm output) over `hidden` states (each
    /// `[seq, hidden]`): its max calibration (spec/algorithms.md §3.1).
    pub fn input_amax(&self, hidden: &[Vec<f32>]) -> f32 {
        let normed = hidden.iter().map(|h| self.normed(h, h.len() / self.hidden_size()));
        normed.fold(0f32, |m, x| x.iter().fold(m, |m, v| m.max(v.abs())))
    }

    /// `lm_head(norm(hidden))`: `[seq, vocab]`.
    pub fn logits(&self, hidden: &[f32], seq: usize) -> Vec<f32> {
        let mut normed = self.normed(hidden, seq);
        self.input.apply(&mut normed, self.hidden_size());
        let mut logits = vec![0f32; seq * self.vocab_size()];
        ops::matmul_bt(&normed, &self.lm_head, seq, self.hidden_size(), self.vocab_size(), &mut logits);
        self.compute.round(&mut logits);
        logits
    }

    /// Sum of `-log p(ids[t+1] | ids[..=t])` over t in `0..seq-1`, and the number of terms.
    /// Logits are computed a block of positions at a time (64 MiB at most). Panics if an id is
    /// outside the vocabulary (`Model::embed` has rejected those already).
    pub fn nll(&self, hidden: &[f32], ids: &[u32]) -> (f64, usize) {
        let (h, vocab) = (self.hidden_size(), self.vocab_size());
        let seq = ids.len();
        assert_eq!(hidden.len(), seq * h, "Head::nll: hidden is not [ids.len(), hidden_size]");
        let scored = seq.saturating_sub(1);
        let mut sum = 0f64;
        let block = (NLL_BLOCK_BYTES / (4 * vocab)).clamp(1, NLL_MAX_ROWS);
        for t0 in (0..scored).step_by(block) {
            let rows = block.min(scored - t0);
            let logits = self.logits(&hidden[t0 * h..(t0 + rows) * h], rows);
            // Rows split over threads; partial sums added in a fixed order (deterministic).
            let per = rows.div_ceil(ops::num_threads());
            let part = |r0: usize| -> f64 {
                let end = (r0 + per).min(rows);
                (r0..end).map(|r| ops::log_softmax_nll(&logits[r * vocab..][..vocab], ids[t0 + r + 1] as usize)).sum()
            };
            let parts: Vec<f64> = std::thread::scope(|s| {
                let handles: Vec<_> = (per..rows).step_by(per).map(|r0| s.spawn(move || part(r0))).collect();
                let first = part(0);
                std::iter::once(first).chain(handles.into_iter().map(|h| h.join().expect("nll worker"))).collect()
            });
            sum += parts.iter().sum::<f64>();
        }
        (sum, scored)
    }
}
