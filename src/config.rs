//! A model's `config.json`, read into the numbers the runtime needs and checked once, so the
//! layer code can trust them. Defaults are those of HF transformers' `LlamaConfig`,
//! `MistralConfig`, `Qwen2Config`, `Qwen3Config`, `GemmaConfig`, `Phi3Config`,
//! `Starcoder2Config`, `NemotronConfig`, `MixtralConfig` and `Qwen3MoeConfig` (configuration_*.py)
//! for keys that may be left out;
//! the dimensions have no sensible default and are required. What sets a family apart from
//! Llama is spelled out in explicit fields (`qkv_bias`, `mlp_bias`, `qk_norm`, `norm_offset`,
//! `layer_norm`, `embed_scale`, `act`, `rotary_dim`, `modules`, `moe`), so the layer code never tests names.

use crate::error::{Error, Result};
use crate::json::Json;
use crate::model::{Module, LLAMA_MODULES, NEMOTRON_MODULES, PHI3_MODULES, STARCODER2_MODULES};
use crate::moe::{MoeConfig, MIXTRAL_EXPERT, QWEN3_MOE_EXPERT};
use std::path::{Path, PathBuf};

/// `architectures[0]` values this runtime implements.
pub const SUPPORTED_ARCHITECTURES: [&str; 10] = [
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
    /// Factor on the embedding output (HF `GemmaModel`: `sqrt(hidden_size)`), in f32.
    pub embed_scale: Option<f32>,
    /// The MLP's activation (`hidden_activation`, else `hidden_act`).
    pub act: Activation,
    /// Leading dims of each head that RoPE rotates (`head_dim * partial_rotary_factor`, Phi3
    /// and Nemotron); the rest passes through.
    pub rotary_dim: usize,
    /// The Linear modules of a decoder layer as the checkpoint names them. Without a
    /// `Gate` linear the MLP is not gated: `down(act(up(x)))`.
    pub modules: &'static [Module],
    /// Mixture-of-experts MLPs (Mixtral, Qwen3-MoE): which layers have them and their shape.
    pub moe: Option<MoeConfig>,
}

/// Activation of the MLP: `act_fn(gate_proj(x)) * up_proj(x)`, or `act_fn(up_proj(x))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `"silu"`: torch `F.silu`.
    Silu,
    /// `"gelu_pytorch_tanh"`: torch `F.gelu(x, approximate="tanh")` (HF `PytorchGELUTanh`).
    GeluTanh,
    /// `"relu2"`: HF `ReLUSquaredActivation`, `square(relu(x))` (Nemotron).
    Relu2,
}

/// Rotary embedding parameters: `rope_theta` and the `rope_type` with its keys.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "default"`: plain RoPE.
    Default,
    /// `rope_type: "llama3"` (Llama 3.1+): long wavelengths stretched by `factor`.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
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
        let r = Reader { json: &raw, path };
        let architecture = r.architecture()?;
        let model_type = r.req_str("model_type")?.to_string();
        let hidden_size = r.req_dim("hidden_size")?;
        let intermediate_size = r.req_dim("intermediate_size")?;
        let num_hidden_layers = r.req_dim("num_hidden_layers")?;
        let num_attention_heads = r.req_dim("num_attention_heads")?;
        let num_key_value_heads = r.opt_dim("num_key_value_heads")?.unwrap_or(num_attention_heads);
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
        let family = Family::of(&architecture);
        let head_dim = match r.opt_dim("head_dim")? {
            Some(d) => d,
            None if family == Family::Qwen3 => 128,
            None if family == Family::Gemma => 256,
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
            _ => "rms_norm_eps",
        };
        let default_eps =
            if matches!(family, Family::Phi3 | Family::Starcoder2 | Family::Nemotron | Family::Mixtral) { 1e-5 } else { 1e-6 };
        let rms_norm_eps = r.opt_f64(eps_key)?.unwrap_or(default_eps);
        if !(rms_norm_eps > 0.0 && rms_norm_eps.is_finite()) {
            return Err(r.err(format!("{eps_key} = {rms_norm_eps} must be positive")));
        }
        let max_position_embeddings = match r.opt_dim("max_position_embeddings")? {
            Some(n) => n,
            None if is_mistral || family == Family::Mixtral => 4096 * 32,
            None if matches!(family, Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe) => 32768,
            None if family == Family::Gemma => 8192,
            None if matches!(family, Family::Phi3 | Family::Starcoder2 | Family::Nemotron) => 4096,
            None => 2048,
        };
        // MistralConfig defaults sliding_window to 4096; an explicit null switches it off.
        // Phi3, Starcoder2 and Mixtral window when the key is set (default None).
        // Qwen2/Qwen3(-MoE) window only some layers, and only with `use_sliding_window = true`.
        let qwen = matches!(family, Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe);
        let sliding_window = match raw.get("sliding_window") {
            _ if qwen && r.opt_bool("use_sliding_window")? == Some(true) => {
                return Err(Error::Unsupported(format!(
                    "{}: use_sliding_window = true (per-layer windows are not implemented)",
                    path.display()
                )));
            }
            _ if !matches!(family, Family::Mistral | Family::Phi3 | Family::Starcoder2 | Family::Mixtral) => None,
            None if is_mistral => Some(4096),
            None => None,
            Some(v) if v.is_null() => None,
            Some(_) => Some(r.req_dim("sliding_window")?),
        };
        let default_act = match family {
            Family::Gemma | Family::Starcoder2 => "gelu_pytorch_tanh",
            Family::Nemotron => "relu2",
            _ => "silu",
        };
        let act = match r.opt_str("hidden_activation")? {
            Some(a) => ("hidden_activation", a),
            None => ("hidden_act", r.opt_str("hidden_act")?.unwrap_or(default_act)),
        };
        let act = match act.1 {
            "silu" => Activation::Silu,
            "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu2" => Activation::Relu2,
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: {} = {other:?} (supported: \"silu\", \"gelu_pytorch_tanh\", \"relu2\")",
                    path.display(),
                    act.0
                )))
            }
        };
        // Starcoder2Config: `use_bias` (default true) for every linear; NemotronConfig:
        // `attention_bias`, `mlp_bias` (default false).
        let use_bias = family == Family::Starcoder2 && r.opt_bool("use_bias")?.unwrap_or(true);
        let mlp_bias = use_bias || (family == Family::Nemotron && r.opt_bool("mlp_bias")? == Some(true));
        if family != Family::Nemotron && r.opt_bool("mlp_bias")? == Some(true) {
            return Err(Error::Unsupported(format!("{}: mlp_bias = true (MLP biases are not implemented)", path.display())));
        }
        let qkv_bias = family == Family::Qwen2 || use_bias || r.opt_bool("attention_bias")? == Some(true);
        let moe = match family {
            Family::Mixtral | Family::Qwen3Moe => Some(r.moe(family, num_hidden_layers)?),
            _ => None,
        };
        let dtype = match r.opt_str("dtype")? {
            Some(d) => Some(d.to_string()),
            None => r.opt_str("torch_dtype")?.map(str::to_string),
        };
        let rope = r.rope(family)?;
        // HF `_compute_default_rope_parameters`: `dim = int(head_dim * partial_rotary_factor)`.
        let rotary_dim = (head_dim as f64 * rope.1) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(r.err(format!(
                "partial_rotary_factor = {} gives {rotary_dim} rotary dims of head_dim = {head_dim}; RoPE needs an even, \
                 positive number",
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
            vocab_size,
            tie_word_embeddings: r
                .opt_bool("tie_word_embeddings")?
                .unwrap_or(matches!(family, Family::Gemma | Family::Starcoder2)),
            max_position_embeddings,
            sliding_window,
            dtype,
            qkv_bias,
            mlp_bias,
            qk_norm: matches!(family, Family::Qwen3 | Family::Qwen3Moe),
            norm_offset: matches!(family, Family::Gemma | Family::Nemotron),
            layer_norm: matches!(family, Family::Starcoder2 | Family::Nemotron),
            // HF GemmaModel: `torch.tensor(hidden_size**0.5, dtype=...)`, a double rounded once.
            embed_scale: (family == Family::Gemma).then(|| (hidden_size as f64).sqrt() as f32),
            act,
            rotary_dim,
            modules: match family {
                Family::Phi3 => PHI3_MODULES,
                Family::Starcoder2 => STARCODER2_MODULES,
                Family::Nemotron => NEMOTRON_MODULES,
                _ => LLAMA_MODULES,
            },
            moe,
            raw,
        })
    }
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
}

impl Family {
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
            _ => Family::Llama,
        }
    }
}

/// Typed access to config keys with errors that name the file, the key and the value.
struct Reader<'a> {
    json: &'a Json,
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, msg: String) -> Error {
        Error::config(self.path, msg)
    }

    fn missing(&self, key: &str) -> Error {
        self.err(format!("missing required key \"{key}\""))
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
        self.opt_dim_in(self.json, key)
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
        self.opt_f64_in(self.json, key)
    }

    fn opt_f64_in(&self, obj: &Json, key: &str) -> Result<Option<f64>> {
        match Self::value(obj, key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.opt_str_in(self.json, key)
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
        match Self::value(self.json, key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.wrong_type(key, "true or false", v)),
        }
    }

    /// The MoE keys, with the defaults of `MixtralConfig` (8 experts, top 2, every layer sparse,
    /// always renormalized) and `Qwen3MoeConfig` (`num_experts` 128, top 8, `moe_intermediate_size`
    /// 768, `norm_topk_prob` false, `decoder_sparse_step` 1, `mlp_only_layers` []).
    fn moe(&self, family: Family, layers: usize) -> Result<MoeConfig> {
        let mixtral = family == Family::Mixtral;
        // transformers saves Qwen3-MoE's `num_experts` under its attribute_map alias `num_local_experts`.
        let num_experts = match (mixtral, self.opt_dim("num_experts")?) {
            (false, Some(n)) => n,
            _ => self.opt_dim("num_local_experts")?.unwrap_or(if mixtral { 8 } else { 128 }),
        };
        let top_k = self.opt_dim("num_experts_per_tok")?.unwrap_or(if mixtral { 2 } else { 8 });
        if top_k > num_experts {
            return Err(self.err(format!("num_experts_per_tok = {top_k} exceeds the {num_experts} experts")));
        }
        let intermediate_size = match mixtral {
            true => self.req_dim("intermediate_size")?,
            false => self.opt_dim("moe_intermediate_size")?.unwrap_or(768),
        };
        let norm_topk_prob = mixtral || self.opt_bool("norm_topk_prob")? == Some(true);
        let step = if mixtral { 1 } else { self.opt_dim("decoder_sparse_step")?.unwrap_or(1) };
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
        Ok(MoeConfig { block, expert_modules, num_experts, top_k, intermediate_size, norm_topk_prob, sparse })
    }

    /// RoPE parameters in either spelling: transformers 5 puts everything in
    /// `rope_parameters {rope_theta, rope_type, ...}`; 4.x has a top-level `rope_theta` and an
    /// optional `rope_scaling {rope_type | type, ...}`. `rope_theta` defaults to 10000.
    /// Also returns `partial_rotary_factor` (in the parameters or top-level; default 1, and
    /// NemotronConfig's 0.5), which only Phi3 and Nemotron (whose `apply_rotary_pos_emb`
    /// rotates a leading slice of each head) may set below 1.
    fn rope(&self, family: Family) -> Result<(RopeConfig, f64)> {
        let params = ["rope_parameters", "rope_scaling"]
            .into_iter()
            .find_map(|key| Self::value(self.json, key).map(|p| (key, p)));
        if let Some((key, p)) = params {
            if p.as_object().is_none() {
                return Err(self.wrong_type(key, "an object", p));
            }
        }
        let params = params.map(|(_, p)| p);
        let theta = match params.map(|p| self.opt_f64_in(p, "rope_theta")).transpose()?.flatten() {
            Some(t) => t,
            None => self.opt_f64("rope_theta")?.unwrap_or(if family == Family::Mixtral { 1e6 } else { 10000.0 }),
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
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: rope_type {other:?} (supported: \"default\", \"llama3\")",
                    self.path.display()
                )))
            }
        };
        Ok((RopeConfig { theta, scaling }, partial))
    }
}
