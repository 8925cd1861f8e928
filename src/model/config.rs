//! A model's `config.json`, read into the numbers the runtime needs and checked once, so the
//! layer code can trust them. Defaults are those of HF transformers' `LlamaConfig`,
//! `MistralConfig`, `Qwen2Config`, `Qwen3Config`, `GemmaConfig`, `Phi3Config`,
//! `Starcoder2Config`, `NemotronConfig`, `MixtralConfig`, `Qwen3MoeConfig`, `Gemma2Config`,
//! `Gemma3TextConfig`, `GraniteConfig`, `Olmo2Config`, `Exaone4Config`, `Qwen2MoeConfig` and
//! `PhimoeConfig` (configuration_*.py) for keys that may be left out;
//! the dimensions have no sensible default and are required. What sets a family apart from
//! Llama is spelled out in explicit fields (`qkv_bias`, `mlp_bias`, `qk_norm`, `norm_offset`,
//! `layer_norm`, `embed_scale`, `act`, `rotary_dim`, `modules`, `moe`, `norms`, `attn_scale`,
//! the soft caps, multipliers and per-layer windows and RoPE), so the layer code never tests names.

use crate::error::{Error, Result};
use crate::io::json::Json;
pub use crate::compute::{Activation, Alibi, NormKind, RopeConfig, RopeScaling};
use crate::compute::{Attention, Rope};
use std::path::{Path, PathBuf};

/// `architectures[0]` values this runtime implements.
pub const SUPPORTED_ARCHITECTURES: [&str; 21] = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Phi3ForCausalLM",
    "Starcoder2ForCausalLM",
    "NemotronForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "GraniteForCausalLM",
    "Olmo2ForCausalLM",
    "Exaone4ForCausalLM",
    "Qwen2MoeForCausalLM",
    "PhimoeForCausalLM",
    "GPTJForCausalLM",
    "FalconForCausalLM",
    "BloomForCausalLM",
    "MptForCausalLM",
];

#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// The config.json this came from.
    pub path: PathBuf,
    /// The whole parsed file: the exporter copies it, adding `quantization_config`.
    pub raw: Json,
    /// `architectures[0]`, one of `SUPPORTED_ARCHITECTURES`.
    pub architecture: String,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: `num_attention_heads / num_key_value_heads` query heads share
    /// one key/value head. Defaults to `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Defaults to `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// The norms' epsilon (`rms_norm_eps`; Starcoder2 `norm_epsilon`, Nemotron `norm_eps`).
    /// Used in f32, as torch adds it to an f32 tensor.
    pub rms_norm_eps: f32,
    pub rope: RopeConfig,
    pub vocab_size: usize,
    /// When true the checkpoint has no `lm_head.weight`: the head is `embed_tokens`.
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Mistral's, Phi3's and Starcoder2's attention window (None = full causal attention).
    pub sliding_window: Option<usize>,
    /// `dtype` (transformers 5) or `torch_dtype` (4.x), e.g. "bfloat16", when given.
    pub dtype: Option<String>,
    /// q_proj, k_proj and v_proj have biases (HF `Qwen2Attention`: always; Llama-style
    /// attention: `attention_bias = true`, which also gives o_proj one).
    pub qkv_bias: bool,
    /// The MLP linears have biases (Starcoder2 `use_bias`, Nemotron `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (`self_attn.q_norm` / `k_norm`, HF `Qwen3Attention`).
    pub qk_norm: bool,
    /// Norms scale by `1 + weight` (HF `GemmaRMSNorm`, `NemotronLayerNorm1P`), the stored
    /// weight being the offset from 1.
    pub norm_offset: bool,
    /// Norms are LayerNorms with a bias (mean subtracted; HF `nn.LayerNorm` of Starcoder2,
    /// `NemotronLayerNorm1P`) instead of RMSNorms.
    pub layer_norm: bool,
    /// The LayerNorms have a bias (all but MPT with `no_bias`).
    pub norm_bias: bool,
    /// Factor on the embedding output (HF `GemmaModel`: `sqrt(hidden_size)`), in f32.
    pub embed_scale: Option<f32>,
    /// lm_head has a bias (`lm_head.bias`, PhiMoE `lm_head_bias`).
    pub lm_head_bias: bool,
    /// Per layer: it windows its attention (`layer_types[l] == "sliding_attention"`, Gemma2/3 and
    /// Exaone4); None: every layer as `sliding_window` says.
    pub sliding_layers: Option<Vec<bool>>,
    /// Which layers rotate q and k, and with which table.
    pub rope_layers: RopeLayers,
    /// Gemma3's RoPE of its sliding layers (`rope_parameters.sliding_attention`, 4.x
    /// `rope_local_base_freq`).
    pub rope_local: Option<RopeConfig>,
    /// The attention's score scale: `head_dim^-0.5`, Gemma2/3 `query_pre_attn_scalar^-0.5`,
    /// Granite `attention_multiplier`.
    pub attn_scale: f32,
    /// Gemma2 `attn_logit_softcapping`: scores become `tanh(s / c) · c`.
    pub attn_softcap: Option<f32>,
    /// The attention scores' ALiBi bias (BLOOM; MPT with `attn_config.alibi_bias_max`), the
    /// position information of families without RoPE.
    pub alibi: Option<Alibi>,
    /// Gemma2 `final_logit_softcapping`, on the logits the same way.
    pub final_softcap: Option<f32>,
    /// Granite `logits_scaling`: the logits are divided by it.
    pub logits_scaling: Option<f32>,
    /// Granite `residual_multiplier`: each branch output is multiplied by it before the residual add.
    pub residual_multiplier: Option<f32>,
    /// `embed_scale` is rounded to the model dtype before it multiplies (Gemma's
    /// `torch.tensor(.., dtype)`; Granite multiplies by the Python float).
    pub embed_scale_in_dtype: bool,
    /// Where a layer's norms sit (Llama: before attention and before the MLP).
    pub norms: &'static LayerNorms,
    /// The RMSNorms multiply by the weight in f32 and round once (HF `Olmo2RMSNorm`).
    pub norm_weight_f32: bool,
    /// The q/k norms normalize the whole projection (Olmo2: weights `[heads * head_dim]`), not
    /// each head.
    pub qk_norm_whole: bool,
    /// The MLP's activation (`hidden_activation`, else `hidden_act`).
    pub act: Activation,
    /// Leading dims of each head that RoPE rotates (`head_dim * partial_rotary_factor`, Phi3
    /// and Nemotron); the rest passes through.
    pub rotary_dim: usize,
    /// The Linear modules of a decoder layer as the checkpoint names them. Without a
    /// `Gate` linear the MLP is not gated: `down(act(up(x)))`.
    pub modules: &'static [Module],
    /// Where the embedding, the decoder layers, the final norm and each layer's attention are
    /// (`model.layers.{l}`, GPT-J's and Falcon's `transformer.h.{l}`).
    pub names: &'static Names,
    /// Attention and MLP read the same residual stream and their outputs are added to it
    /// together (HF `GPTJBlock`, parallel `FalconDecoderLayer`); the MLP reads the attention's
    /// normed input unless the family has an MLP norm of its own (Falcon's `ln_mlp`).
    pub parallel: bool,
    /// RoPE turns adjacent pairs of dims (GPT-J's `rotate_every_two`) instead of the two
    /// halves of the rotary dims: the runtime holds q_proj's and k_proj's rows reordered
    /// (`ModelConfig::module_rows`) and rotates halves, which gives the same scores. (An NVFP4
    /// KV cache's 16-value blocks of k then group k's rotary dims in this order, not HF's.)
    pub rope_interleaved: bool,
    /// A fused query_key_value holds each key/value head after its group of query heads
    /// (Falcon's new decoder architecture and multi-head attention): `[q.., k, v]` per group.
    pub qkv_grouped: bool,
    /// Mixture-of-experts MLPs (Mixtral, Qwen3-MoE): which layers have them and their shape.
    pub moe: Option<MoeConfig>,
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig> {
        ModelConfig::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let raw = Json::parse_file(path)?;
        ModelConfig::from_json(raw, path)
    }

    /// Checks and extracts `raw`; `path` is only used in error messages.
    pub fn from_json(raw: Json, path: &Path) -> Result<ModelConfig> {
        let mut r = Reader { json: &raw, path, aliases: &[] };
        let architecture = r.architecture()?;
        let family = Family::of(&architecture);
        r.aliases = family.aliases();
        let model_type = r.req_str("model_type")?.to_string();
        let hidden_size = r.req_dim("hidden_size")?;
        // GPTJConfig `n_inner`, FalconConfig `ffn_hidden_size`: None means 4 * hidden_size.
        let four_hidden = || hidden_size.checked_mul(4).ok_or_else(|| r.err(format!("hidden_size = {hidden_size} is too large")));
        let intermediate_size = match family {
            Family::Gptj => r.opt_dim("n_inner")?.map_or_else(four_hidden, Ok)?,
            Family::Falcon => r.opt_dim("ffn_hidden_size")?.map_or_else(four_hidden, Ok)?,
            // BloomMLP and MptMLP: 4 * hidden_size (MptMLP ignores `expansion_ratio`).
            Family::Bloom | Family::Mpt => four_hidden()?,
            _ => r.req_dim("intermediate_size")?,
        };
        let num_hidden_layers = r.req_dim("num_hidden_layers")?;
        let num_attention_heads = r.req_dim("num_attention_heads")?;
        let falcon = match family {
            Family::Falcon => Some(r.falcon(num_attention_heads)?),
            _ => None,
        };
        let num_key_value_heads = match &falcon {
            Some(f) => f.kv_heads,
            None => r.opt_dim("num_key_value_heads")?.unwrap_or(num_attention_heads),
        };
        let vocab_size = r.req_dim("vocab_size")?;
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(r.err(format!(
                "num_key_value_heads = {num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"
            )));
        }
        // HF: `head_dim = getattr(config, "head_dim", None) or hidden_size // num_attention_heads`.
        // Only the derived value needs the division to be exact: with an explicit head_dim,
        // q_proj is [heads * head_dim, hidden] whatever hidden is.
        // Qwen3Config and GemmaConfig default head_dim to 128 and 256 instead.
        let head_dim = match r.opt_dim("head_dim")? {
            Some(d) => d,
            None if family == Family::Qwen3 => 128,
            None if family.gemma_like() => 256,
            None if !hidden_size.is_multiple_of(num_attention_heads) => {
                return Err(r.err(format!(
                    "num_attention_heads = {num_attention_heads} does not divide hidden_size = {hidden_size} \
                     (and there is no head_dim)"
                )));
            }
            None => hidden_size / num_attention_heads,
        };
        if !head_dim.is_multiple_of(2) {
            return Err(r.err(format!("head_dim = {head_dim} is odd; rotary embeddings need it even")));
        }
        let is_mistral = family == Family::Mistral;
        let eps_key = match family {
            Family::Starcoder2 => "norm_epsilon",
            Family::Nemotron => "norm_eps",
            Family::Gptj | Family::Falcon | Family::Bloom | Family::Mpt => "layer_norm_epsilon",
            _ => "rms_norm_eps",
        };
        let default_eps = if matches!(
            family,
            Family::Phi3
                | Family::Starcoder2
                | Family::Nemotron
                | Family::Mixtral
                | Family::Olmo2
                | Family::Exaone4
                | Family::Phimoe
                | Family::Gptj
                | Family::Falcon
                | Family::Bloom
                | Family::Mpt
        ) {
            1e-5
        } else {
            1e-6
        };
        let rms_norm_eps = r.opt_f64(eps_key)?.unwrap_or(default_eps);
        if !(rms_norm_eps > 0.0 && rms_norm_eps.is_finite()) {
            return Err(r.err(format!("{eps_key} = {rms_norm_eps} must be positive")));
        }
        let max_position_embeddings = match r.opt_dim("max_position_embeddings")? {
            Some(n) => n,
            None if is_mistral || family == Family::Mixtral || family == Family::Phimoe => 4096 * 32,
            None if matches!(family, Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe | Family::Qwen2Moe) => 32768,
            None if matches!(family, Family::Gemma | Family::Gemma2) => 8192,
            None if family == Family::Gemma3 => 131072,
            None if matches!(family, Family::Phi3 | Family::Starcoder2 | Family::Nemotron) => 4096,
            None => 2048,
        };
        // MistralConfig defaults sliding_window to 4096; an explicit null switches it off.
        // Phi3, Starcoder2 and Mixtral window when the key is set (default None).
        // Qwen2/Qwen3(-MoE) window only some layers, and only with `use_sliding_window = true`.
        let qwen = matches!(family, Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe | Family::Qwen2Moe);
        // Gemma2/3 and Exaone4 window the layers `layer_types` names "sliding_attention"
        // (default 4096; Gemma2Config: every other layer from the first, Gemma3TextConfig and
        // Exaone4Config: all but every `sliding_window_pattern`-th).
        let per_layer_window = matches!(family, Family::Gemma2 | Family::Gemma3 | Family::Exaone4);
        let sliding_layers = if per_layer_window {
            Some(r.layer_types(family, num_hidden_layers)?)
        } else {
            None
        };
        let sliding_window = match raw.get("sliding_window") {
            _ if qwen && r.opt_bool("use_sliding_window")? == Some(true) => {
                return Err(Error::Unsupported(format!(
                    "{}: use_sliding_window = true (per-layer windows are not implemented)",
                    path.display()
                )));
            }
            None if per_layer_window => Some(4096),
            _ if !per_layer_window
                && !matches!(family, Family::Mistral | Family::Phi3 | Family::Starcoder2 | Family::Mixtral | Family::Phimoe) =>
            {
                None
            }
            None if is_mistral => Some(4096),
            None => None,
            Some(v) if v.is_null() => None,
            Some(_) => Some(r.req_dim("sliding_window")?),
        };
        let default_act = match family {
            Family::Gemma | Family::Gemma2 | Family::Gemma3 | Family::Starcoder2 => "gelu_pytorch_tanh",
            Family::Nemotron => "relu2",
            Family::Gptj => "gelu_new",
            // BloomGelu (`bloom_gelu_forward`) is the tanh approximation; MptMLP's nn.GELU is exact.
            Family::Falcon | Family::Mpt => "gelu",
            Family::Bloom => "gelu_pytorch_tanh",
            _ => "silu",
        };
        // Gemma's MLP takes `hidden_activation` (GemmaConfig's default when absent) and ignores
        // `hidden_act`, which early Gemma configs set to "gelu".
        let act = match r.opt_str("hidden_activation")? {
            Some(a) => ("hidden_activation", a),
            None if family.gemma_like() => ("hidden_activation", default_act),
            None => (r.spelled("hidden_act"), r.opt_str("hidden_act")?.unwrap_or(default_act)),
        };
        let act = match act.1 {
            "silu" => Activation::Silu,
            // HF `NewGELUActivation` is the same tanh approximation, written out in torch ops.
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            "relu2" => Activation::Relu2,
            "gelu" => Activation::Gelu,
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: {} = {other:?} (supported: \"silu\", \"gelu\", \"gelu_pytorch_tanh\", \"gelu_new\", \"relu2\")",
                    path.display(),
                    act.0
                )))
            }
        };
        // Starcoder2Config: `use_bias` (default true) for every linear; NemotronConfig:
        // `attention_bias`, `mlp_bias` (default false).
        // FalconConfig `bias` (default false): every linear; GPTJMLP: fc_in and fc_out always.
        // BloomBlock: every linear and norm has one; MPT none (MptAttention and MptMLP build
        // their linears without bias and MptBlock drops the norms' biases, whatever `no_bias` says).
        let use_bias = family == Family::Starcoder2 && r.opt_bool("use_bias")?.unwrap_or(true)
            || family == Family::Falcon && r.opt_bool("bias")? == Some(true)
            || family == Family::Bloom;
        let mlp_bias =
            use_bias || family == Family::Gptj || (family == Family::Nemotron && r.opt_bool("mlp_bias")? == Some(true));
        if family != Family::Nemotron && r.opt_bool("mlp_bias")? == Some(true) {
            return Err(Error::Unsupported(format!("{}: mlp_bias = true (MLP biases are not implemented)", path.display())));
        }
        // Qwen2MoeConfig: `qkv_bias` (default true).
        let qwen2_moe_bias = family == Family::Qwen2Moe && r.opt_bool("qkv_bias")?.unwrap_or(true);
        let qkv_bias = family == Family::Qwen2 || qwen2_moe_bias || use_bias || r.opt_bool("attention_bias")? == Some(true);
        // BloomBlock with `apply_residual_connection_post_layernorm` adds the normed input back.
        if family == Family::Bloom && r.opt_bool("apply_residual_connection_post_layernorm")? == Some(true) {
            return Err(Error::Unsupported(format!("{}: apply_residual_connection_post_layernorm = true", path.display())));
        }
        let moe = match family {
            Family::Mixtral | Family::Qwen3Moe | Family::Qwen2Moe | Family::Phimoe => Some(r.moe(family, num_hidden_layers)?),
            _ => None,
        };
        let dtype = match r.opt_str("dtype")? {
            Some(d) => Some(d.to_string()),
            None => r.opt_str("torch_dtype")?.map(str::to_string),
        };
        let (rope, rope_local) = r.ropes(family, head_dim)?;
        let rotary_dim = match family {
            Family::Gptj => r.gptj_rotary_dim()?,
            _ => rotary_dim_of(head_dim, rope.1),
        };
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(r.err(format!(
                "partial_rotary_factor = {} / rotary_dim give {rotary_dim} rotary dims of head_dim = {head_dim}; RoPE \
                 needs an even, positive number up to head_dim",
                rope.1
            )));
        }
        Ok(ModelConfig {
            path: path.to_path_buf(),
            architecture,
            model_type,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: rms_norm_eps as f32,
            rope: rope.0,
            sliding_layers,
            rope_layers: match family {
                // Exaone4Attention: `if self.sliding_window is None or self.is_sliding` (the config's window).
                Family::Exaone4 if sliding_window.is_some() => RopeLayers::Sliding,
                Family::Gemma3 => RopeLayers::LocalOnSliding,
                // Position comes from ALiBi in the attention scores.
                Family::Bloom | Family::Mpt => RopeLayers::None,
                _ => RopeLayers::All,
            },
            rope_local,
            attn_scale: r.attn_scale(family, head_dim)?,
            attn_softcap: r.softcap(family, "attn_logit_softcapping", 50.0)?,
            alibi: match family {
                Family::Bloom => Some(Alibi::Bloom),
                Family::Mpt => Some(Alibi::Mpt { bias_max: r.mpt_alibi_bias_max()? }),
                _ => None,
            },
            final_softcap: r.softcap(family, "final_logit_softcapping", 30.0)?,
            logits_scaling: r.multiplier(family, "logits_scaling")?,
            residual_multiplier: r.multiplier(family, "residual_multiplier")?,
            embed_scale_in_dtype: family != Family::Granite,
            norms: match (family, &falcon) {
                (Family::Gemma2 | Family::Gemma3, _) => &GEMMA2_NORMS,
                (Family::Olmo2 | Family::Exaone4, _) => &POST_NORMS,
                (Family::Gptj, _) => &GPTJ_NORMS,
                (Family::Mpt, _) => &MPT_NORMS,
                (_, Some(f)) => f.norms,
                _ => &LLAMA_NORMS,
            },
            names: match family {
                Family::Gptj => &GPTJ_NAMES,
                Family::Falcon => &FALCON_NAMES,
                Family::Bloom => &BLOOM_NAMES,
                Family::Mpt => &MPT_NAMES,
                _ => &LLAMA_NAMES,
            },
            parallel: family == Family::Gptj || falcon.as_ref().is_some_and(|f| f.parallel),
            rope_interleaved: family == Family::Gptj,
            // BloomAttention._reshape: `view(batch, seq, num_heads, 3, head_dim)`: [q, k, v] per head.
            qkv_grouped: family == Family::Bloom || falcon.as_ref().is_some_and(|f| f.grouped),
            norm_bias: family != Family::Mpt,
            qk_norm_whole: family == Family::Olmo2,
            norm_weight_f32: family == Family::Olmo2,
            vocab_size,
            tie_word_embeddings: r
                .opt_bool("tie_word_embeddings")?
                .unwrap_or(family.gemma_like() || matches!(family, Family::Starcoder2 | Family::Falcon | Family::Bloom | Family::Mpt)),
            max_position_embeddings,
            sliding_window,
            dtype,
            qkv_bias,
            mlp_bias,
            qk_norm: matches!(family, Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3 | Family::Olmo2 | Family::Exaone4),
            norm_offset: family.gemma_like() || family == Family::Nemotron,
            layer_norm: matches!(
                family,
                Family::Starcoder2 | Family::Nemotron | Family::Phimoe | Family::Gptj | Family::Falcon | Family::Bloom | Family::Mpt
            ),
            // PhimoeConfig `lm_head_bias` (default false); GPT-J's lm_head always has one.
            lm_head_bias: family == Family::Gptj || family == Family::Phimoe && r.opt_bool("lm_head_bias")? == Some(true),
            // HF GemmaModel: `torch.tensor(hidden_size**0.5, dtype=...)`, a double rounded once.
            embed_scale: match family {
                _ if family.gemma_like() => Some((hidden_size as f64).sqrt() as f32),
                // GraniteModel: `inputs_embeds * self.embedding_multiplier`.
                Family::Granite => r.multiplier(family, "embedding_multiplier")?,
                _ => None,
            },
            act,
            rotary_dim,
            modules: match family {
                Family::Phi3 => PHI3_MODULES,
                Family::Starcoder2 => STARCODER2_MODULES,
                Family::Nemotron => NEMOTRON_MODULES,
                Family::Gptj => GPTJ_MODULES,
                Family::Falcon | Family::Bloom => FALCON_MODULES,
                Family::Mpt => MPT_MODULES,
                _ => LLAMA_MODULES,
            },
            moe,
            raw,
        })
    }
}

/// HF `_compute_default_rope_parameters`: `dim = int(head_dim * partial_rotary_factor)`.
fn rotary_dim_of(head_dim: usize, partial_rotary_factor: f64) -> usize {
    (head_dim as f64 * partial_rotary_factor) as usize
}

/// Where the norms of a decoder layer sit, by their names inside the layer (`model.layers.{l}.<name>`).
/// `attn_in` / `mlp_in` normalize the branch input (pre-norms), `attn_out` / `mlp_out` the
/// branch output before the residual add (Gemma2/3 have all four, Olmo2 and Exaone4 only the
/// output ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerNorms {
    pub attn_in: Option<&'static str>,
    pub attn_out: Option<&'static str>,
    pub mlp_in: Option<&'static str>,
    pub mlp_out: Option<&'static str>,
}

impl LayerNorms {
    /// The norms a layer has, in `[attn_in, attn_out, mlp_in, mlp_out]` order (None where absent).
    pub fn slots(&self) -> [Option<&'static str>; 4] {
        [self.attn_in, self.attn_out, self.mlp_in, self.mlp_out]
    }
}

/// HF `LlamaDecoderLayer`: `input_layernorm` before attention, `post_attention_layernorm` before the MLP.
pub const LLAMA_NORMS: LayerNorms = LayerNorms {
    attn_in: Some("input_layernorm"),
    attn_out: None,
    mlp_in: Some("post_attention_layernorm"),
    mlp_out: None,
};
/// HF `Gemma2DecoderLayer` / `Gemma3DecoderLayer`: a norm on each side of both branches.
pub const GEMMA2_NORMS: LayerNorms = LayerNorms {
    attn_in: Some("input_layernorm"),
    attn_out: Some("post_attention_layernorm"),
    mlp_in: Some("pre_feedforward_layernorm"),
    mlp_out: Some("post_feedforward_layernorm"),
};
/// HF `Olmo2DecoderLayer` / `Exaone4DecoderLayer`: the branches' outputs are normed, not their inputs.
pub const POST_NORMS: LayerNorms =
    LayerNorms { attn_in: None, attn_out: Some("post_attention_layernorm"), mlp_in: None, mlp_out: Some("post_feedforward_layernorm") };

/// HF `GPTJBlock`: one norm, `ln_1`, in front of both parallel branches.
pub const GPTJ_NORMS: LayerNorms = LayerNorms { attn_in: Some("ln_1"), attn_out: None, mlp_in: None, mlp_out: None };
/// HF `FalconDecoderLayer` with one norm in front of both parallel branches.
pub const SHARED_NORM: LayerNorms = LayerNorms { attn_in: Some("input_layernorm"), attn_out: None, mlp_in: None, mlp_out: None };
/// HF `MptBlock`: `norm_1` before the attention, `norm_2` before the MLP.
pub const MPT_NORMS: LayerNorms = LayerNorms { attn_in: Some("norm_1"), attn_out: None, mlp_in: Some("norm_2"), mlp_out: None };
/// HF `FalconDecoderLayer`, new decoder architecture: `ln_attn` and `ln_mlp`, both of the layer's input.
pub const FALCON_NORMS: LayerNorms = LayerNorms { attn_in: Some("ln_attn"), attn_out: None, mlp_in: Some("ln_mlp"), mlp_out: None };

/// Where a family keeps its tensors outside the decoder layers' modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Names {
    /// Decoder layer `l` is `{layers}.{l}`.
    pub layers: &'static str,
    /// The token embedding module (`{embed}.weight`).
    pub embed: &'static str,
    /// The final norm module.
    pub final_norm: &'static str,
    /// The attention module inside a layer: ModelOpt's KV scales are `<attn>.k_proj.k_scale`
    /// whatever the projections are called (spec/export-formats.md §2.8), q/k norms `<attn>.q_norm`.
    pub attn: &'static str,
    /// A norm of the embedding output (BLOOM's `word_embeddings_layernorm`).
    pub embed_norm: Option<&'static str>,
}

pub const LLAMA_NAMES: Names =
    Names { layers: "model.layers", embed: "model.embed_tokens", final_norm: "model.norm", attn: "self_attn", embed_norm: None };
/// HF `GPTJModel`: `transformer.wte`, `transformer.h`, `transformer.ln_f`.
pub const GPTJ_NAMES: Names =
    Names { layers: "transformer.h", embed: "transformer.wte", final_norm: "transformer.ln_f", attn: "attn", embed_norm: None };
/// HF `FalconModel`: `transformer.word_embeddings`, `transformer.h`, `transformer.ln_f`.
pub const FALCON_NAMES: Names = Names {
    layers: "transformer.h",
    embed: "transformer.word_embeddings",
    final_norm: "transformer.ln_f",
    attn: "self_attention",
    embed_norm: None,
};
/// HF `BloomModel`: Falcon's names plus `word_embeddings_layernorm` on the embeddings.
pub const BLOOM_NAMES: Names = Names { embed_norm: Some("transformer.word_embeddings_layernorm"), ..FALCON_NAMES };
/// HF `MptModel`: `transformer.wte`, `transformer.blocks`, `transformer.norm_f`.
pub const MPT_NAMES: Names =
    Names { layers: "transformer.blocks", embed: "transformer.wte", final_norm: "transformer.norm_f", attn: "attn", embed_norm: None };

/// Whether `module` is a token embedding of one of the families' layouts (its last name:
/// `embed_tokens`, `wte`, `word_embeddings`), wherever the model nests it.
pub fn is_embedding(module: &str) -> bool {
    let leaf = |n: &Names| n.embed.rsplit('.').next().unwrap_or(n.embed);
    [&LLAMA_NAMES, &GPTJ_NAMES, &FALCON_NAMES, &MPT_NAMES].into_iter().any(|n| module == leaf(n) || module.ends_with(&format!(".{}", leaf(n))))
}

/// Which decoder layers apply RoPE, with which table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayers {
    All,
    /// Only the sliding layers (HF `Exaone4Attention`: with a `sliding_window`, the global
    /// layers use no position embedding).
    Sliding,
    /// Every layer; sliding layers with the local table (Gemma3).
    LocalOnSliding,
    /// No layer (BLOOM, MPT: ALiBi).
    None,
}

/// The supported architectures, for the defaults that differ between them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma,
    Phi3,
    Starcoder2,
    Nemotron,
    Mixtral,
    Qwen3Moe,
    Gemma2,
    Gemma3,
    Granite,
    Olmo2,
    Exaone4,
    Qwen2Moe,
    Phimoe,
    Gptj,
    Falcon,
    Bloom,
    Mpt,
}

impl Family {
    /// Gemma's conventions: `1 + w` RMSNorms, tanh-GELU, embeddings times `sqrt(hidden)`,
    /// tied embeddings by default.
    fn gemma_like(self) -> bool {
        matches!(self, Family::Gemma | Family::Gemma2 | Family::Gemma3)
    }

    /// Config keys this family's config.json spells differently: (the key rq-min reads, the
    /// family's name for it) as in `GPTJConfig.attribute_map` and `FalconConfig.attribute_map`.
    fn aliases(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Family::Gptj => &[
                ("hidden_size", "n_embd"),
                ("num_attention_heads", "n_head"),
                ("num_hidden_layers", "n_layer"),
                ("max_position_embeddings", "n_positions"),
                ("hidden_act", "activation_function"),
            ],
            Family::Falcon => &[("num_hidden_layers", "n_layer"), ("num_attention_heads", "n_head"), ("hidden_act", "activation")],
            Family::Bloom => &[("num_hidden_layers", "n_layer"), ("num_attention_heads", "n_head"), ("hidden_size", "n_embed")],
            Family::Mpt => &[
                ("hidden_size", "d_model"),
                ("num_attention_heads", "n_heads"),
                ("num_hidden_layers", "n_layers"),
                ("max_position_embeddings", "max_seq_len"),
            ],
            _ => &[],
        }
    }

    /// `arch` is one of `SUPPORTED_ARCHITECTURES` (checked by `Reader::architecture`).
    fn of(arch: &str) -> Family {
        match arch {
            "MistralForCausalLM" => Family::Mistral,
            "Qwen2ForCausalLM" => Family::Qwen2,
            "Qwen3ForCausalLM" => Family::Qwen3,
            "GemmaForCausalLM" => Family::Gemma,
            "Phi3ForCausalLM" => Family::Phi3,
            "Starcoder2ForCausalLM" => Family::Starcoder2,
            "NemotronForCausalLM" => Family::Nemotron,
            "MixtralForCausalLM" => Family::Mixtral,
            "Qwen3MoeForCausalLM" => Family::Qwen3Moe,
            "Gemma2ForCausalLM" => Family::Gemma2,
            "Gemma3ForCausalLM" => Family::Gemma3,
            "GraniteForCausalLM" => Family::Granite,
            "Olmo2ForCausalLM" => Family::Olmo2,
            "Exaone4ForCausalLM" => Family::Exaone4,
            "Qwen2MoeForCausalLM" => Family::Qwen2Moe,
            "PhimoeForCausalLM" => Family::Phimoe,
            "GPTJForCausalLM" => Family::Gptj,
            "FalconForCausalLM" => Family::Falcon,
            "BloomForCausalLM" => Family::Bloom,
            "MptForCausalLM" => Family::Mpt,
            _ => Family::Llama,
        }
    }
}

/// What `Reader::falcon` reads.
struct FalconLayout {
    kv_heads: usize,
    parallel: bool,
    grouped: bool,
    norms: &'static LayerNorms,
}

/// Typed access to config keys with errors that name the file, the key and the value.
struct Reader<'a> {
    json: &'a Json,
    path: &'a Path,
    /// The family's other spellings of top-level keys (`Family::aliases`).
    aliases: &'static [(&'static str, &'static str)],
}

impl Reader<'_> {
    fn err(&self, msg: String) -> Error {
        Error::config(self.path, msg)
    }

    fn missing(&self, key: &str) -> Error {
        match self.aliases.iter().find(|(k, _)| *k == key) {
            Some((_, alias)) => self.err(format!("missing required key \"{alias}\"")),
            None => self.err(format!("missing required key \"{key}\"")),
        }
    }

    /// `key` as this config spells it: the family's alias when only that is present.
    fn spelled<'k>(&self, key: &'k str) -> &'k str {
        if Self::value(self.json, key).is_some() {
            return key;
        }
        match self.aliases.iter().find(|(k, _)| *k == key) {
            Some((_, alias)) if Self::value(self.json, alias).is_some() => alias,
            _ => key,
        }
    }

    fn wrong_type(&self, key: &str, want: &str, v: &Json) -> Error {
        self.err(format!("\"{key}\" = {} is not {want}", v.to_compact()))
    }

    fn architecture(&self) -> Result<String> {
        let list = self.json.get("architectures").ok_or_else(|| self.missing("architectures"))?;
        let first = list.as_array().and_then(|a| a.first()).and_then(Json::as_str);
        let Some(arch) = first else {
            return Err(self.wrong_type("architectures", "a list of class names", list));
        };
        if !SUPPORTED_ARCHITECTURES.contains(&arch) {
            return Err(Error::Unsupported(format!(
                "{}: architecture {arch} (supported: {})",
                self.path.display(),
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        Ok(arch.to_string())
    }

    /// A non-null value for `key` in `obj`, or None.
    fn value<'j>(obj: &'j Json, key: &str) -> Option<&'j Json> {
        obj.get(key).filter(|v| !v.is_null())
    }

    fn opt_dim(&self, key: &str) -> Result<Option<usize>> {
        self.opt_dim_in(self.json, self.spelled(key))
    }

    /// A positive integer.
    fn opt_dim_in(&self, obj: &Json, key: &str) -> Result<Option<usize>> {
        match Self::value(obj, key) {
            None => Ok(None),
            Some(v) => match v.as_usize() {
                Some(n) if n > 0 => Ok(Some(n)),
                _ => Err(self.wrong_type(key, "a positive integer", v)),
            },
        }
    }

    fn req_dim(&self, key: &str) -> Result<usize> {
        self.opt_dim(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.opt_f64_in(self.json, self.spelled(key))
    }

    fn opt_f64_in(&self, obj: &Json, key: &str) -> Result<Option<f64>> {
        match Self::value(obj, key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.opt_str_in(self.json, self.spelled(key))
    }

    fn opt_str_in<'j>(&self, obj: &'j Json, key: &str) -> Result<Option<&'j str>> {
        match Self::value(obj, key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.wrong_type(key, "a string", v)),
        }
    }

    fn req_str(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        let key = self.spelled(key);
        match Self::value(self.json, key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.wrong_type(key, "true or false", v)),
        }
    }

    /// The MoE keys, with the defaults of `MixtralConfig` (8 experts, top 2, every layer sparse,
    /// always renormalized) and `Qwen3MoeConfig` (`num_experts` 128, top 8, `moe_intermediate_size`
    /// 768, `norm_topk_prob` false, `decoder_sparse_step` 1, `mlp_only_layers` []).
    fn moe(&self, family: Family, layers: usize) -> Result<MoeConfig> {
        // PhiMoE's block is Mixtral's (`block_sparse_moe`, w1/w3/w2) with sparsemixer routing.
        let phimoe = family == Family::Phimoe;
        let mixtral = family == Family::Mixtral || phimoe;
        // transformers saves Qwen3-MoE's `num_experts` under its attribute_map alias `num_local_experts`.
        let num_experts = match (mixtral, self.opt_dim("num_experts")?) {
            (false, Some(n)) => n,
            _ => self.opt_dim("num_local_experts")?.unwrap_or(if mixtral { 8 } else { 128 }),
        };
        let top_k = self.opt_dim("num_experts_per_tok")?.unwrap_or(if mixtral { 2 } else { 8 });
        if top_k > num_experts {
            return Err(self.err(format!("num_experts_per_tok = {top_k} exceeds the {num_experts} experts")));
        }
        // Qwen2MoeConfig: 60 experts, top 4, moe_intermediate_size 1408, a shared expert of
        // shared_expert_intermediate_size 5632.
        let qwen2 = family == Family::Qwen2Moe;
        let num_experts = if qwen2 && self.opt_dim("num_experts")?.is_none() { 60 } else { num_experts };
        let top_k = if qwen2 && self.opt_dim("num_experts_per_tok")?.is_none() { 4 } else { top_k };
        let intermediate_size = match mixtral {
            true => self.req_dim("intermediate_size")?,
            false => self.opt_dim("moe_intermediate_size")?.unwrap_or(if qwen2 { 1408 } else { 768 }),
        };
        let shared_expert = match qwen2 {
            true => Some(self.opt_dim("shared_expert_intermediate_size")?.unwrap_or(5632)),
            false => None,
        };
        let norm_topk_prob = mixtral || self.opt_bool("norm_topk_prob")? == Some(true);
        let step = if mixtral { 1 } else { self.opt_dim("decoder_sparse_step")?.unwrap_or(1) };
        let routing = match phimoe {
            true => {
                let eps = self.opt_f64("router_jitter_noise")?.unwrap_or(0.01);
                if !(eps >= 0.0 && eps.is_finite()) {
                    return Err(self.err(format!("router_jitter_noise = {eps} must be a finite number >= 0")));
                }
                if top_k != 2 {
                    return Err(Error::Unsupported(format!(
                        "{}: num_experts_per_tok = {top_k} with sparsemixer routing (PhiMoE routes to 2)",
                        self.path.display()
                    )));
                }
                Routing::SparseMixer { jitter_eps: eps as f32 }
            }
            false => Routing::Softmax,
        };
        let mlp_only: Vec<usize> = match Self::value(self.json, "mlp_only_layers") {
            Some(v) if !mixtral => {
                let bad = || self.wrong_type("mlp_only_layers", "a list of layer indices", v);
                let list = v.as_array().ok_or_else(bad)?;
                list.iter().map(|x| x.as_usize().ok_or_else(bad)).collect::<Result<_>>()?
            }
            _ => vec![],
        };
        // HF Qwen3MoeDecoderLayer: sparse when not in mlp_only_layers and (l + 1) % decoder_sparse_step == 0.
        let sparse = (0..layers).map(|l| !mlp_only.contains(&l) && (l + 1) % step == 0).collect();
        let (block, expert_modules) = if mixtral { ("block_sparse_moe", MIXTRAL_EXPERT) } else { ("mlp", QWEN3_MOE_EXPERT) };
        Ok(MoeConfig { block, expert_modules, num_experts, top_k, intermediate_size, norm_topk_prob, sparse, shared_expert, routing })
    }

    /// Per layer: whether it is a sliding-window layer. `layer_types` when given (every entry
    /// "sliding_attention" or "full_attention"), else the config class's default pattern:
    /// Gemma2 windows layers 0, 2, 4, ...; Gemma3 (`sliding_window_pattern`, default 6) and
    /// Exaone4 (default 4; also a string like "LLLG", L = local) all but every pattern-th.
    fn layer_types(&self, family: Family, layers: usize) -> Result<Vec<bool>> {
        if let Some(v) = Self::value(self.json, "layer_types") {
            let bad = || self.wrong_type("layer_types", "a list of \"sliding_attention\" / \"full_attention\"", v);
            let list = v.as_array().ok_or_else(bad)?;
            if list.len() != layers {
                return Err(self.err(format!("layer_types has {} entries for {layers} layers", list.len())));
            }
            return list
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    Some(other) => Err(Error::Unsupported(format!(
                        "{}: layer type {other:?} (supported: \"sliding_attention\", \"full_attention\")",
                        self.path.display()
                    ))),
                    None => Err(bad()),
                })
                .collect();
        }
        if family == Family::Gemma2 {
            return Ok((0..layers).map(|l| l % 2 == 0).collect());
        }
        let key = ["sliding_window_pattern", "_sliding_window_pattern"].into_iter().find(|k| Self::value(self.json, k).is_some());
        let pattern = key.and_then(|k| Self::value(self.json, k));
        if let Some(text) = pattern.and_then(Json::as_str) {
            if text.is_empty() || !text.chars().all(|c| c == 'L' || c == 'G') {
                return Err(self.err(format!("sliding_window_pattern = {text:?} is not a string of L and G")));
            }
            let p: Vec<bool> = text.chars().map(|c| c == 'L').collect();
            return Ok((0..layers).map(|l| p[l % p.len()]).collect());
        }
        let every = match key {
            Some(k) => self.opt_dim(k)?.unwrap_or(1),
            None if family == Family::Gemma3 => 6,
            None => 4,
        };
        Ok((0..layers).map(|l| (l + 1) % every != 0).collect())
    }

    /// The attention's score scale (see `ModelConfig::attn_scale`), as the f32 torch multiplies by.
    fn attn_scale(&self, family: Family, head_dim: usize) -> Result<f32> {
        let scale = match family {
            _ if family.gemma_like() && family != Family::Gemma => {
                let s = self.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0);
                if !(s > 0.0 && s.is_finite()) {
                    return Err(self.err(format!("query_pre_attn_scalar = {s} must be positive")));
                }
                s.powf(-0.5)
            }
            Family::Granite => self.opt_f64("attention_multiplier")?.unwrap_or(1.0),
            Family::Mpt => match self.mpt_attn_config()? {
                Some(c) => self.opt_f64_in(c, "softmax_scale")?.unwrap_or((head_dim as f64).powf(-0.5)),
                None => (head_dim as f64).powf(-0.5),
            },
            _ => (head_dim as f64).powf(-0.5),
        };
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(self.err(format!("attention scale {scale} must be positive")));
        }
        Ok(scale as f32)
    }

    /// Falcon's attention layout (HF `FalconAttention`, `FalconDecoderLayer`): key/value heads
    /// `num_kv_heads` in the new decoder architecture, one with `multi_query`, else one per
    /// query head; parallel branches (always in the new architecture, else `parallel_attn`)
    /// behind `ln_attn` + `ln_mlp` (`num_ln_in_parallel_attn` 2, the new architecture's
    /// default) or one `input_layernorm`; the fused qkv rows grouped per key/value head except
    /// for old-architecture multi-query, which stacks q, k and v.
    fn falcon(&self, heads: usize) -> Result<FalconLayout> {
        if self.opt_bool("alibi")? == Some(true) {
            return Err(Error::Unsupported(format!("{}: alibi = true (Falcon with ALiBi is not implemented)", self.path.display())));
        }
        let new_arch = self.opt_bool("new_decoder_architecture")?.unwrap_or(false);
        let multi_query = self.opt_bool("multi_query")?.unwrap_or(true);
        let parallel = self.opt_bool("parallel_attn")?.unwrap_or(true);
        let kv_heads = match (new_arch, multi_query) {
            (true, _) => self.opt_dim("num_kv_heads")?.unwrap_or(heads),
            (false, true) => 1,
            (false, false) => heads,
        };
        let norms = match (new_arch, parallel, self.opt_dim("num_ln_in_parallel_attn")?) {
            (true, true, None | Some(2)) => &FALCON_NORMS,
            (_, true, Some(1)) | (false, true, None) => &SHARED_NORM,
            (false, false, _) => &LLAMA_NORMS,
            (new_arch, parallel, n) => {
                return Err(Error::Unsupported(format!(
                    "{}: new_decoder_architecture = {new_arch}, parallel_attn = {parallel}, num_ln_in_parallel_attn = {n:?} \
                     (transformers' FalconDecoderLayer does not run this combination)",
                    self.path.display()
                )))
            }
        };
        Ok(FalconLayout { kv_heads, parallel, grouped: new_arch || !multi_query, norms })
    }

    /// MPT's `attn_config` object, if any, after refusing what `MptAttention` does not run
    /// (`qk_ln`) or rq-min does not (`clip_qkv`: a clamp of the fused projection's output).
    fn mpt_attn_config(&self) -> Result<Option<&Json>> {
        let Some(c) = Self::value(self.json, "attn_config") else { return Ok(None) };
        if c.as_object().is_none() {
            return Err(self.wrong_type("attn_config", "an object", c));
        }
        if let Some(clip) = self.opt_f64_in(c, "clip_qkv")? {
            return Err(Error::Unsupported(format!("{}: attn_config.clip_qkv = {clip} (not implemented)", self.path.display())));
        }
        if Self::value(c, "qk_ln").and_then(Json::as_bool) == Some(true) {
            return Err(Error::Unsupported(format!("{}: attn_config.qk_ln = true (not implemented)", self.path.display())));
        }
        Ok(Some(c))
    }

    /// MPT's `attn_config.alibi_bias_max` (MptAttentionConfig default 8). HF's `MptModel`
    /// builds the ALiBi bias whatever `attn_config.alibi` says.
    fn mpt_alibi_bias_max(&self) -> Result<f32> {
        let max = match self.mpt_attn_config()? {
            Some(c) => self.opt_f64_in(c, "alibi_bias_max")?.unwrap_or(8.0),
            None => 8.0,
        };
        if !(max > 0.0 && max.is_finite()) {
            return Err(self.err(format!("attn_config.alibi_bias_max = {max} must be positive")));
        }
        Ok(max as f32)
    }

    /// GPT-J's `rotary_dim` (GPTJConfig default 64). A null one would rotate whole
    /// embeddings instead of heads in `GPTJAttention`; refused.
    fn gptj_rotary_dim(&self) -> Result<usize> {
        match self.json.get("rotary_dim") {
            Some(v) if v.is_null() => {
                Err(Error::Unsupported(format!("{}: rotary_dim = null (GPT-J without partial RoPE)", self.path.display())))
            }
            _ => Ok(self.opt_dim("rotary_dim")?.unwrap_or(64)),
        }
    }

    /// Gemma2/3's soft cap `key` (Gemma2Config's default `gemma2_default`, Gemma3's none; null: none).
    fn softcap(&self, family: Family, key: &str, gemma2_default: f64) -> Result<Option<f32>> {
        let cap = match family {
            Family::Gemma2 if self.json.get(key).is_none() => Some(gemma2_default),
            // Gemma3Attention passes no softcap to its attention: only the final one applies.
            Family::Gemma3 if key == "attn_logit_softcapping" => None,
            Family::Gemma2 | Family::Gemma3 => self.opt_f64(key)?,
            _ => None,
        };
        match cap {
            Some(c) if !(c > 0.0 && c.is_finite()) => Err(self.err(format!("{key} = {c} must be positive"))),
            c => Ok(c.map(|c| c as f32)),
        }
    }

    /// Granite's multiplier `key` (GraniteConfig default 1); None for other families.
    fn multiplier(&self, family: Family, key: &str) -> Result<Option<f32>> {
        if family != Family::Granite {
            return Ok(None);
        }
        let m = self.opt_f64(key)?.unwrap_or(1.0);
        if !(m.is_finite() && m != 0.0) {
            return Err(self.err(format!("{key} = {m} must be a finite, non-zero number")));
        }
        Ok(Some(m as f32))
    }

    /// RoPE parameters in either spelling: transformers 5 puts everything in
    /// `rope_parameters {rope_theta, rope_type, ...}`; 4.x has a top-level `rope_theta` and an
    /// optional `rope_scaling {rope_type | type, ...}`. `rope_theta` defaults to 10000.
    /// Also returns `partial_rotary_factor` (in the parameters or top-level; default 1, and
    /// NemotronConfig's 0.5), which only Phi3 and Nemotron (whose `apply_rotary_pos_emb`
    /// rotates a leading slice of each head) may set below 1.
    ///
    /// Gemma3 has a second table for its sliding layers: transformers 5 nests both,
    /// `rope_parameters {full_attention: {..}, sliding_attention: {..}}`; 4.x has the global
    /// one top-level (`rope_theta` default 1e6) and `rope_local_base_freq` (default 1e4).
    fn ropes(&self, family: Family, head_dim: usize) -> Result<((RopeConfig, f64), Option<RopeConfig>)> {
        let params = ["rope_parameters", "rope_scaling"]
            .into_iter()
            .find_map(|key| Self::value(self.json, key).map(|p| (key, p)));
        if let Some((key, p)) = params {
            if p.as_object().is_none() {
                return Err(self.wrong_type(key, "an object", p));
            }
        }
        let params = params.map(|(_, p)| p);
        if family != Family::Gemma3 {
            let default_theta = if family == Family::Mixtral { 1e6 } else { 10000.0 };
            return Ok((self.rope_in(family, head_dim, params, default_theta)?, None));
        }
        if let Some(p) = params.filter(|p| p.get("full_attention").is_some()) {
            let global = self.rope_in(family, head_dim, Self::value(p, "full_attention"), 1e6)?;
            let local = self.rope_in(family, head_dim, Self::value(p, "sliding_attention"), 1e4)?;
            return Ok((global, Some(local.0)));
        }
        let theta = self.opt_f64("rope_local_base_freq")?.unwrap_or(1e4);
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(self.err(format!("rope_local_base_freq = {theta} must be positive")));
        }
        Ok((self.rope_in(family, head_dim, params, 1e6)?, Some(RopeConfig { theta, scaling: RopeScaling::Default })))
    }

    /// YaRN's parameters as transformers 5 reads them (`_compute_yarn_parameters` after
    /// `standardize_rope_params`): `original_max_position_embeddings` in the parameters (4.x:
    /// also top-level), else `max_position_embeddings`; `factor` given, else their ratio;
    /// `attention_factor` given, else `mscale(factor, mscale) / mscale(factor, mscale_all_dim)`
    /// when both are set (non-zero), else `mscale(factor)`, with `mscale(s, m) = 0.1·m·ln s + 1`
    /// for s > 1 (else 1); `beta_fast` / `beta_slow` 32 / 1 when absent or 0; `truncate` true.
    fn yarn(&self, p: &Json) -> Result<RopeScaling> {
        let max_pos = self.opt_dim("max_position_embeddings")?;
        let original = match (self.opt_dim_in(p, "original_max_position_embeddings")?, self.opt_dim("original_max_position_embeddings")?) {
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => max_pos.ok_or_else(|| self.missing("original_max_position_embeddings"))?,
        };
        let factor = match self.opt_f64_in(p, "factor")? {
            Some(f) => f,
            None => max_pos.ok_or_else(|| self.missing("factor"))? as f64 / original as f64,
        };
        if !(factor > 0.0 && factor.is_finite()) {
            return Err(self.err(format!("yarn rope: factor = {factor} must be positive")));
        }
        let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
        let attention_factor = match (self.opt_f64_in(p, "attention_factor")?, self.opt_f64_in(p, "mscale")?, self.opt_f64_in(p, "mscale_all_dim")?) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(factor, m) / mscale(factor, all),
            _ => mscale(factor, 1.0),
        };
        if !(attention_factor > 0.0 && attention_factor.is_finite()) {
            return Err(self.err(format!("yarn rope: attention_factor = {attention_factor} must be positive")));
        }
        let beta = |key: &str, default: f64| -> Result<f64> {
            Ok(self.opt_f64_in(p, key)?.filter(|&b| b != 0.0).unwrap_or(default))
        };
        let (beta_fast, beta_slow) = (beta("beta_fast", 32.0)?, beta("beta_slow", 1.0)?);
        if !(beta_fast > 0.0 && beta_slow > 0.0 && beta_fast.is_finite() && beta_slow.is_finite()) {
            return Err(self.err(format!("yarn rope: beta_fast = {beta_fast}, beta_slow = {beta_slow} must be positive")));
        }
        let truncate = match Self::value(p, "truncate") {
            None => true,
            Some(v) => v.as_bool().ok_or_else(|| self.wrong_type("truncate", "true or false", v))?,
        };
        Ok(RopeScaling::Yarn { factor, original_max_position_embeddings: original, beta_fast, beta_slow, truncate, attention_factor })
    }

    /// One RoPE table's parameters from `params` (or the top-level keys).
    fn rope_in(&self, family: Family, head_dim: usize, params: Option<&Json>, default_theta: f64) -> Result<(RopeConfig, f64)> {
        if let Some(p) = params.filter(|p| p.as_object().is_none()) {
            return Err(self.wrong_type("rope_parameters", "an object", p));
        }
        let theta = match params.map(|p| self.opt_f64_in(p, "rope_theta")).transpose()?.flatten() {
            Some(t) => t,
            None => self.opt_f64("rope_theta")?.unwrap_or(default_theta),
        };
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(self.err(format!("rope_theta = {theta} must be positive")));
        }
        let partial = match params.map(|p| self.opt_f64_in(p, "partial_rotary_factor")).transpose()?.flatten() {
            Some(f) => f,
            None => self.opt_f64("partial_rotary_factor")?.unwrap_or(if family == Family::Nemotron { 0.5 } else { 1.0 }),
        };
        if partial != 1.0 && !matches!(family, Family::Phi3 | Family::Nemotron) || !(partial > 0.0 && partial <= 1.0) {
            return Err(Error::Unsupported(format!("{}: partial_rotary_factor = {partial}", self.path.display())));
        }
        let Some(p) = params else {
            return Ok((RopeConfig { theta, scaling: RopeScaling::Default }, partial));
        };
        let rope_type = match self.opt_str_in(p, "rope_type")? {
            Some(t) => t,
            None => self.opt_str_in(p, "type")?.unwrap_or("default"),
        };
        let scaling = match rope_type {
            "default" => RopeScaling::Default,
            "linear" => {
                let factor = self.opt_f64_in(p, "factor")?.ok_or_else(|| self.missing("factor"))?;
                if !(factor > 0.0 && factor.is_finite()) {
                    return Err(self.err(format!("linear rope: factor = {factor} must be positive")));
                }
                RopeScaling::Linear { factor }
            }
            "longrope" => {
                // _compute_longrope_parameters: original_max_position_embeddings in the
                // parameters (transformers 5) or top-level (4.x); factor given, else
                // max_position_embeddings / original; attention_factor given, else
                // sqrt(1 + ln(factor) / ln(original)) when factor > 1.
                let original = match self.opt_dim_in(p, "original_max_position_embeddings")? {
                    Some(n) => n,
                    None => self.req_dim("original_max_position_embeddings")?,
                };
                let max_pos = self.opt_dim("max_position_embeddings")?.unwrap_or(original);
                let factor = self.opt_f64_in(p, "factor")?.unwrap_or(max_pos as f64 / original as f64);
                let attention_factor = match self.opt_f64_in(p, "attention_factor")? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                };
                let half = rotary_dim_of(head_dim, partial) / 2;
                let factors = |key: &str| -> Result<Vec<f64>> {
                    let v = Self::value(p, key).ok_or_else(|| self.missing(key))?;
                    let bad = || self.wrong_type(key, &format!("a list of {half} positive numbers (one per rotary frequency)"), v);
                    let list = v.as_array().ok_or_else(bad)?;
                    let f: Vec<f64> = list.iter().map(|x| x.as_f64().filter(|f| *f > 0.0 && f.is_finite()).ok_or_else(bad)).collect::<Result<_>>()?;
                    if f.len() != half {
                        return Err(bad());
                    }
                    Ok(f)
                };
                if !(attention_factor > 0.0 && attention_factor.is_finite()) {
                    return Err(self.err(format!("longrope: attention_factor = {attention_factor} must be positive")));
                }
                RopeScaling::LongRope {
                    short: factors("short_factor")?,
                    long: factors("long_factor")?,
                    original_max_position_embeddings: original,
                    attention_factor,
                }
            }
            "llama3" => {
                let num = |key: &str| self.opt_f64_in(p, key)?.ok_or_else(|| self.missing(key));
                let (factor, low_freq_factor, high_freq_factor) =
                    (num("factor")?, num("low_freq_factor")?, num("high_freq_factor")?);
                if !(factor > 0.0 && low_freq_factor > 0.0 && high_freq_factor > low_freq_factor) {
                    return Err(self.err(format!(
                        "llama3 rope: need factor > 0 and high_freq_factor > low_freq_factor > 0, got \
                         factor = {factor}, low_freq_factor = {low_freq_factor}, high_freq_factor = {high_freq_factor}"
                    )));
                }
                let original_max_position_embeddings = self
                    .opt_dim_in(p, "original_max_position_embeddings")?
                    .ok_or_else(|| self.missing("original_max_position_embeddings"))?;
                RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }
            }
            "yarn" => self.yarn(p)?,
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: rope_type {other:?} (supported: \"default\", \"linear\", \"llama3\", \"longrope\", \"yarn\")",
                    self.path.display()
                )))
            }
        };
        Ok((RopeConfig { theta, scaling }, partial))
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

    /// Weight shape `[out_features, in_features]` in layer `l`: the linears' rows stacked.
    pub fn shape(&self, cfg: &ModelConfig, l: usize) -> [usize; 2] {
        let rows = self.kinds.iter().map(|&k| cfg.linear_shape(l, k)[0]).sum();
        [rows, cfg.linear_shape(l, self.kinds[0])[1]]
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

/// HF `GPTJAttention` (no biases) and `GPTJMLP`: `fc_out(act(fc_in(x)))`.
pub const GPTJ_MODULES: &[Module] = &[
    module("attn.q_proj", &[LinearKind::Q]),
    module("attn.k_proj", &[LinearKind::K]),
    module("attn.v_proj", &[LinearKind::V]),
    module("attn.out_proj", &[LinearKind::O]),
    module("mlp.fc_in", &[LinearKind::Up]),
    module("mlp.fc_out", &[LinearKind::Down]),
];

/// HF `FalconAttention.query_key_value` (q, k, v heads; grouped per key/value head where
/// `qkv_grouped`), `dense`, and `FalconMLP`: `dense_4h_to_h(act(dense_h_to_4h(x)))`. BLOOM's
/// attention and MLP have the same names (its fused rows `[q, k, v]` per head).
pub const FALCON_MODULES: &[Module] = &[
    module("self_attention.query_key_value", &[LinearKind::Q, LinearKind::K, LinearKind::V]),
    module("self_attention.dense", &[LinearKind::O]),
    module("mlp.dense_h_to_4h", &[LinearKind::Up]),
    module("mlp.dense_4h_to_h", &[LinearKind::Down]),
];

/// HF `MptAttention.Wqkv` (`qkv.chunk(3)`: q, k, v stacked), `out_proj`, and `MptMLP`:
/// `down_proj(act(up_proj(x)))`.
pub const MPT_MODULES: &[Module] = &[
    module("attn.Wqkv", &[LinearKind::Q, LinearKind::K, LinearKind::V]),
    module("attn.out_proj", &[LinearKind::O]),
    module("ffn.up_proj", &[LinearKind::Up]),
    module("ffn.down_proj", &[LinearKind::Down]),
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
    /// The RoPE table of this family's attention heads, for sequences of up to `max_positions` tokens.
    pub fn rope_table(&self, max_positions: usize) -> Rope {
        let rope = Rope::partial(&self.rope, self.head_dim, self.rotary_dim, max_positions);
        match &self.rope_local {
            Some(local) => rope.with_local(Rope::partial(local, self.head_dim, self.rotary_dim, max_positions)),
            None => rope,
        }
    }

    /// The family's norm (every norm of the model is of this kind).
    pub fn norm_kind(&self) -> NormKind {
        NormKind { layer_norm: self.layer_norm, offset: self.norm_offset, eps: self.rms_norm_eps }
    }

    /// ModelOpt's `PQS_FUSE_MODULE_MAPPING` covers this family's attention and MLP classes
    /// (NVFP4_AWQ folds o_proj into v_proj and down_proj into up_proj, spec/export-formats.md
    /// §2.7 point 3): the Llama-layout families rq-min had before Gemma2; not the newer ones.
    pub fn modelopt_pqs_fuse(&self) -> bool {
        const FAMILIES: [&str; 7] = [
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "GemmaForCausalLM",
            "MixtralForCausalLM",
            "Qwen3MoeForCausalLM",
        ];
        FAMILIES.contains(&self.architecture.as_str())
    }

    /// The q/k norms' kind: RMSNorm, `1 + w` in Gemma3.
    pub fn qk_norm_kind(&self) -> NormKind {
        NormKind { layer_norm: false, offset: self.norm_offset, eps: self.rms_norm_eps }
    }

    /// The width the q and k norm weights have: `head_dim`, or Olmo2's whole projections.
    pub fn qk_norm_widths(&self) -> [usize; 2] {
        match self.qk_norm_whole {
            true => [self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim],
            false => [self.head_dim; 2],
        }
    }

    /// The MLP is `act(gate(x)) * up(x)` (else `act(up(x))`).
    pub fn gated_mlp(&self) -> bool {
        self.modules.iter().any(|m| m.kinds.contains(&LinearKind::Gate))
    }

    /// The linears a layer of this family has, in forward order.
    pub fn linear_kinds(&self) -> Vec<LinearKind> {
        self.modules.iter().flat_map(|m| m.kinds.iter().copied()).collect()
    }

    /// The window of layer `l`'s attention: `sliding_window` on the layers `layer_types` marks
    /// `sliding_attention` (Gemma2/3, Exaone4), on every layer for the families without it.
    pub fn window(&self, l: usize) -> Option<usize> {
        match &self.sliding_layers {
            Some(sliding) if !sliding.get(l).copied().unwrap_or(false) => None,
            _ => self.sliding_window,
        }
    }

    /// Layer `l`'s attention: heads, scale, softcap and window (`Layer::forward` and its backward).
    pub fn attention(&self, l: usize, flash_bf16: bool) -> Attention {
        Attention {
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            sliding_window: self.window(l),
            scale: self.attn_scale,
            softcap: self.attn_softcap,
            // FlashAttention has no softcap in PyTorch's SDPA: HF runs such a model eagerly;
            // BLOOM's and MPT's attention (ALiBi) is always eager.
            flash_bf16: flash_bf16 && self.attn_softcap.is_none() && self.alibi.is_none(),
            alibi: self.alibi,
        }
    }

    /// The RoPE table of layer `l` in `rope` (`rope_table`'s): None for a layer without RoPE
    /// (Exaone4's global layers), the local table on Gemma3's sliding layers.
    pub fn layer_rope<'r>(&self, l: usize, rope: &'r Rope) -> Option<&'r Rope> {
        let sliding = self.sliding_layers.as_ref().is_some_and(|s| s.get(l).copied().unwrap_or(false));
        match self.rope_layers {
            RopeLayers::All => Some(rope),
            RopeLayers::None => None,
            RopeLayers::Sliding if !sliding => None,
            RopeLayers::Sliding => Some(rope),
            RopeLayers::LocalOnSliding => Some(if sliding { rope.local().unwrap_or(rope) } else { rope }),
        }
    }

    /// `[out, in]` of linear `kind` in layer `l`: `kind.shape`, except that in an MoE layer with
    /// a shared expert the dense MLP linears are the shared expert's.
    pub fn linear_shape(&self, l: usize, kind: LinearKind) -> [usize; 2] {
        let [out, inp] = kind.shape(self);
        match (kind, self.moe_layer(l).and_then(|m| m.shared_expert)) {
            (LinearKind::Gate | LinearKind::Up, Some(s)) => [s, inp],
            (LinearKind::Down, Some(s)) => [out, s],
            _ => [out, inp],
        }
    }

    /// The MoE config when layer `l` has an MoE block.
    pub fn moe_layer(&self, l: usize) -> Option<&MoeConfig> {
        self.moe.as_ref().filter(|m| m.is_sparse(l))
    }

    /// Every Linear module of decoder layer `l`, in forward order: `modules`, or in an MoE
    /// layer the attention modules and then each expert's gate, up and down.
    pub fn layer_modules(&self, l: usize) -> Vec<LayerModule> {
        let dense = |m: &Module| LayerModule {
            path: format!("{}.{}", self.layer_prefix(l), m.name),
            kinds: m.kinds,
            expert: None,
            shape: m.shape(self, l),
            rows: self.module_rows(m),
        };
        let Some(moe) = self.moe_layer(l) else { return self.modules.iter().map(dense).collect() };
        let experts = (0..moe.num_experts).flat_map(|e| {
            moe.expert_modules.iter().map(move |m| LayerModule {
                path: moe.expert_module(l, e, m.kinds[0]),
                kinds: m.kinds,
                expert: Some(e),
                shape: moe.expert_shape(self, m.kinds[0]),
                rows: None,
            })
        });
        // The shared expert after the routed ones, as `Qwen2MoeSparseMoeBlock` registers them.
        let shared = if moe.shared_expert.is_some() { SHARED_EXPERT } else { &[] };
        self.modules.iter().filter(|m| !m.is_mlp()).map(dense).chain(experts).chain(shared.iter().map(dense)).collect()
    }

    /// Decoder layer `l`'s prefix: `model.layers.{l}`, `transformer.h.{l}`.
    pub fn layer_prefix(&self, l: usize) -> String {
        format!("{}.{l}", self.names.layers)
    }

    /// Layer `l`'s attention module (`model.layers.{l}.self_attn`).
    pub fn attn_prefix(&self, l: usize) -> String {
        format!("{}.{}", self.layer_prefix(l), self.names.attn)
    }

    /// The decoder layer tensor `name` belongs to.
    pub fn layer_of(&self, name: &str) -> Option<usize> {
        name.strip_prefix(self.names.layers)?.strip_prefix('.')?.split('.').next()?.parse().ok()
    }

    /// The checkpoint row of each runtime row of module `m` (its linears' rows stacked in
    /// `m.kinds` order), where the two orders differ; None where they are the same:
    /// - Falcon's grouped `query_key_value` (`qkv_grouped`): HF `FalconAttention._split_heads`
    ///   views the rows as `[kv_heads, heads / kv_heads + 2, head_dim]`, each key/value head's
    ///   query heads followed by its key and value head;
    /// - GPT-J's interleaved RoPE (`rope_interleaved`): `rotate_every_two` turns dims (2i, 2i + 1)
    ///   of each q/k head by frequency i; the runtime holds those dims as (i, half + i) and
    ///   rotates halves, the same arithmetic. q and k are permuted alike, so every score q·k
    ///   is the same sum.
    pub fn module_rows(&self, m: &Module) -> Option<Vec<usize>> {
        use LinearKind::{K, Q, V};
        let grouped = self.qkv_grouped && m.kinds == [Q, K, V];
        let interleaved = self.rope_interleaved && m.kinds.iter().any(|k| matches!(k, Q | K));
        if !grouped && !interleaved {
            return None;
        }
        let (hd, heads, kv) = (self.head_dim, self.num_attention_heads, self.num_key_value_heads);
        let (per_kv, half) = (heads / kv, self.rotary_dim / 2);
        let mut rows = Vec::new();
        let mut first = 0; // the runtime's first head of `kind` in the module
        for &kind in m.kinds {
            let n = if kind == Q { heads } else { kv };
            for h in 0..n {
                let head = match kind {
                    _ if !grouped => first + h,
                    Q => h / per_kv * (per_kv + 2) + h % per_kv,
                    K => h * (per_kv + 2) + per_kv,
                    _ => h * (per_kv + 2) + per_kv + 1,
                };
                let rotary = interleaved && matches!(kind, Q | K);
                rows.extend((0..hd).map(|d| {
                    let d = match d {
                        d if !rotary || d >= 2 * half => d,
                        d if d < half => 2 * d,
                        d => 2 * (d - half) + 1,
                    };
                    head * hd + d
                }));
            }
            first += n;
        }
        Some(rows)
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
    /// `ModelConfig::module_rows`: where each runtime row is in the checkpoint's module.
    pub rows: Option<Vec<usize>>,
}

impl LayerModule {
    /// `values` (rows of `cols`, in the runtime's order) in the checkpoint's order.
    pub fn to_checkpoint_rows(&self, values: Vec<f32>, cols: usize) -> Vec<f32> {
        let Some(rows) = &self.rows else { return values };
        let mut out = vec![0f32; values.len()];
        for (src, &dst) in values.chunks_exact(cols).zip(rows) {
            out[dst * cols..][..cols].copy_from_slice(src);
        }
        out
    }

    /// `values` (rows of `cols`, in the checkpoint's order) in the runtime's order.
    pub fn to_runtime_rows(&self, values: Vec<f32>, cols: usize) -> Vec<f32> {
        let Some(rows) = &self.rows else { return values };
        rows.iter().flat_map(|&r| values[r * cols..][..cols].iter().copied()).collect()
    }
}

/// Index in `modules` of the module holding linear `kind` (of `expert` in an MoE block).
pub fn module_of(modules: &[LayerModule], expert: Option<usize>, kind: LinearKind) -> Option<usize> {
    modules.iter().position(|m| m.expert == expert && m.kinds.contains(&kind))
}

/// An expert's Linear modules inside `<block>.experts.{e}`: Mixtral's `w1` (gate), `w3` (up), `w2` (down).
pub const MIXTRAL_EXPERT: &[Module] = &[
    Module { name: "w1", kinds: &[LinearKind::Gate] },
    Module { name: "w3", kinds: &[LinearKind::Up] },
    Module { name: "w2", kinds: &[LinearKind::Down] },
];

/// Qwen2-MoE's shared expert, `mlp.shared_expert` (HF `Qwen2MoeMLP`).
pub const SHARED_EXPERT: &[Module] = &[
    module("mlp.shared_expert.gate_proj", &[LinearKind::Gate]),
    module("mlp.shared_expert.up_proj", &[LinearKind::Up]),
    module("mlp.shared_expert.down_proj", &[LinearKind::Down]),
];

/// Qwen3-MoE's expert modules.
pub const QWEN3_MOE_EXPERT: &[Module] = &[
    Module { name: "gate_proj", kinds: &[LinearKind::Gate] },
    Module { name: "up_proj", kinds: &[LinearKind::Up] },
    Module { name: "down_proj", kinds: &[LinearKind::Down] },
];

/// The MoE part of a model's config.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// The block's path inside a layer: `block_sparse_moe` (Mixtral) or `mlp` (Qwen3-MoE).
    pub block: &'static str,
    /// One expert's gate, up and down modules, in that order.
    pub expert_modules: &'static [Module],
    pub num_experts: usize,
    /// `num_experts_per_tok`.
    pub top_k: usize,
    /// Each expert's intermediate size (Mixtral `intermediate_size`, Qwen3-MoE `moe_intermediate_size`).
    pub intermediate_size: usize,
    /// Renormalize the kept probabilities to sum 1 (Mixtral always; Qwen3-MoE `norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// Per layer: an MoE block (true) or the dense MLP of `intermediate_size` (Qwen3-MoE
    /// `mlp_only_layers` / `decoder_sparse_step`).
    pub sparse: Vec<bool>,
    /// Qwen2-MoE's shared expert (`shared_expert_intermediate_size`): a gated MLP every token
    /// goes through, scaled per token by `sigmoid(shared_expert_gate(x))`. The runtime holds
    /// it in the layer's dense Gate/Up/Down linears (modules `SHARED_EXPERT`).
    pub shared_expert: Option<usize>,
    pub routing: Routing,
}

/// How a router's logits pick experts and their weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Routing {
    /// Softmax over every expert in f32, the top k (renormalized with `norm_topk_prob`).
    Softmax,
    /// PhiMoE's `sparsemixer` in inference: the expert with the largest logit, weighted by the
    /// softmax over the experts whose logit is within `2·jitter_eps` (relative) of it; then the
    /// same among the others (HF `modeling_phimoe.py`).
    SparseMixer { jitter_eps: f32 },
}

impl MoeConfig {
    pub fn is_sparse(&self, layer: usize) -> bool {
        self.sparse.get(layer).copied().unwrap_or(false)
    }

    /// The router module (`model.layers.{l}.<block>.gate`), never quantized (spec/export-formats.md §2.4).
    pub fn router(&self, layer: usize) -> String {
        format!("{}.gate", self.block_prefix(layer))
    }

    /// The block (`model.layers.{l}.<block>`).
    pub fn block_prefix(&self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.block)
    }

    /// The routers of layer `layer` with their output rows: `gate` (one per expert) and, with a
    /// shared expert, `shared_expert_gate` (one). Neither is quantized; ModelOpt lists both in
    /// `exclude_modules` (`*mlp.shared_expert_gate.*` is a default-disabled pattern).
    pub fn routers(&self, layer: usize) -> Vec<(String, usize)> {
        let mut out = vec![(self.router(layer), self.num_experts)];
        if self.shared_expert.is_some() {
            out.push((format!("{}.shared_expert_gate", self.block_prefix(layer)), 1));
        }
        out
    }

    /// Module of expert `e`'s linear `kind` (Gate, Up or Down).
    pub fn expert_module(&self, layer: usize, e: usize, kind: LinearKind) -> String {
        let m = self.expert_modules.iter().find(|m| m.kinds.contains(&kind)).unwrap_or(&self.expert_modules[0]);
        format!("{}.experts.{e}.{}", self.block_prefix(layer), m.name)
    }

    /// `[out, in]` of an expert's linear `kind`.
    pub fn expert_shape(&self, cfg: &ModelConfig, kind: LinearKind) -> [usize; 2] {
        match kind {
            LinearKind::Down => [cfg.hidden_size, self.intermediate_size],
            _ => [self.intermediate_size, cfg.hidden_size],
        }
    }
}

/// Where a consumer's input scale p can go instead of a `pre_quant_scale`: the output rows of
/// the linear that produces its input, scaled by p before that linear is quantized.
pub struct RowFold {
    /// The producer module (index in the layer's modules).
    pub producer: usize,
    /// The producer's linear whose rows are the consumer's input channels.
    pub kind: LinearKind,
    /// Its first row inside the (fused) producer module: Phi3's up rows follow the gate rows.
    pub offset: usize,
    /// The rows take √p (relu²(√p·z) = p·relu²(z) for p > 0, Nemotron).
    pub squared: bool,
}

/// The row fold of module `k` of a layer, if its family has one: down_proj (an expert's down)
/// into up_proj's rows when the MLP is `act(gate)·up` (elementwise in up) or relu²(up) (√p);
/// none for gelu_tanh(c_fc) (no per-channel scale commutes with it); o_proj into v_proj's rows
/// only without GQA, where each o_proj input channel is one v_proj output row. None when the
/// producer's rows are not its linears' rows in order (Falcon's grouped query_key_value).
pub fn row_fold(modules: &[LayerModule], k: usize, cfg: &ModelConfig) -> Option<RowFold> {
    let m = &modules[k];
    let (kind, squared) = match m.kinds {
        [LinearKind::Down] if cfg.gated_mlp() || m.expert.is_some() => (LinearKind::Up, false),
        [LinearKind::Down] if cfg.act == Activation::Relu2 => (LinearKind::Up, true),
        [LinearKind::O] if cfg.num_attention_heads == cfg.num_key_value_heads => (LinearKind::V, false),
        _ => return None,
    };
    let producer = module_of(modules, m.expert, kind).filter(|&p| modules[p].rows.is_none())?;
    let offset = modules[producer].kinds.iter().take_while(|&&x| x != kind).map(|x| x.shape(cfg)[0]).sum();
    Some(RowFold { producer, kind, offset, squared })
}
