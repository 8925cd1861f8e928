//! Layer-at-a-time runtime for Llama-family decoders (HF `LlamaForCausalLM`,
//! `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `GemmaForCausalLM`; what sets
//! them apart is in `ModelConfig`'s `qkv_bias`, `qk_norm`, `norm_offset`, `embed_scale`, `act`).
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
const FINAL_NORM: &str = "model.norm.weight";
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
        let norm = |which: &str| self.load(&format!("{prefix}.{which}.weight"), &[cfg.hidden_size]);
        let input_norm = norm("input_layernorm")?;
        let post_norm = norm("post_attention_layernorm")?;
        let mut linears: [Vec<f32>; 7] = Default::default();
        let mut biases: [Option<Vec<f32>>; 7] = Default::default();
        for ((kind, w), b) in LinearKind::ALL.into_iter().zip(&mut linears).zip(&mut biases) {
            let module = format!("{prefix}.{}", kind.module());
            let shape = kind.shape(cfg);
            *w = read::linear_weight(self, &module, shape)?;
            let name = format!("{module}.bias");
            let required = cfg.qkv_bias && matches!(kind, LinearKind::Q | LinearKind::K | LinearKind::V);
            if required || self.get(&name).is_some() {
                *b = Some(self.load(&name, &shape[..1])?);
            }
        }
        let qk_norm = if cfg.qk_norm {
            let norm = |which: &str| self.load(&format!("{prefix}.self_attn.{which}.weight"), &[cfg.head_dim]);
            Some((norm("q_norm")?, norm("k_norm")?))
        } else {
            None
        };
        Ok(Layer { index: i, input_norm, post_norm, linears, biases, qk_norm, compute: self.compute })
    }

    /// The final norm and the output projection: `lm_head.weight` when the checkpoint has one
    /// (dequantized, with its input quantization, if auto-quantize quantized it), else
    /// `embed_tokens` when the embeddings are tied.
    pub fn load_head(&self) -> Result<Head> {
        let cfg = &self.config;
        let norm = self.load(FINAL_NORM, &[cfg.hidden_size])?;
        let shape = [cfg.vocab_size, cfg.hidden_size];
        let (lm_head, input) = if self.get(LM_HEAD).is_some() || !cfg.tie_word_embeddings {
            (read::linear_weight(self, "lm_head", shape)?, read::input_quant(self, "lm_head", shape)?)
        } else {
            (self.load(EMBED_TOKENS, &shape)?, InputQuant::default())
        };
        Ok(Head { norm, lm_head, eps: cfg.rms_norm_eps, norm_offset: cfg.norm_offset, compute: self.compute, input })
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

/// The seven Linear layers of a decoder layer.
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

    /// The module path inside a layer, as in the tensor names (`model.layers.{i}.<module>.weight`).
    pub fn module(self) -> &'static str {
        match self {
            LinearKind::Q => "self_attn.q_proj",
            LinearKind::K => "self_attn.k_proj",
            LinearKind::V => "self_attn.v_proj",
            LinearKind::O => "self_attn.o_proj",
            LinearKind::Gate => "mlp.gate_proj",
            LinearKind::Up => "mlp.up_proj",
            LinearKind::Down => "mlp.down_proj",
        }
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
}

/// The plain forward pass.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// One decoder layer's weights, f32.
pub struct Layer {
    pub index: usize,
    pub input_norm: Vec<f32>, // [hidden]
    pub post_norm: Vec<f32>,  // [hidden]
    /// Indexed by `LinearKind as usize`, each `[out_features, in_features]`.
    linears: [Vec<f32>; 7],
    /// Indexed like `linears`, each `[out_features]` (`{module}.bias`, where the checkpoint has one).
    biases: [Option<Vec<f32>>; 7],
    /// Qwen3's `self_attn.q_norm` and `k_norm` weights, `[head_dim]` each.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
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
    /// `GemmaRMSNorm` norms and tanh-GELU (`GemmaDecoderLayer`, `GemmaMLP`).
    pub fn forward(&self, cfg: &ModelConfig, rope: &Rope, hidden: &mut [f32], seq: usize, hooks: &mut dyn Hooks) {
        let h = cfg.hidden_size;
        assert_eq!(hidden.len(), seq * h, "Layer::forward: hidden is not [seq, hidden_size]");
        let c = self.compute;
        let mut x = vec![0f32; seq * h];

        c.rms_norm(cfg.norm_offset, hidden, &self.input_norm, cfg.rms_norm_eps, &mut x);
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
        c.rms_norm(cfg.norm_offset, hidden, &self.post_norm, cfg.rms_norm_eps, &mut x);
        let mut gate = self.linear(cfg, LinearKind::Gate, x.clone(), seq, hooks); // [seq, intermediate]
        let up = self.linear(cfg, LinearKind::Up, x, seq, hooks); // [seq, intermediate]
        match (cfg.act, c) {
            (Activation::Silu, Compute::F32) => ops::gated_mul(ops::silu, &mut gate, &up),
            (Activation::Silu, Compute::Bf16) => ops::gated_mul_bf16(ops::silu, &mut gate, &up),
            (Activation::GeluTanh, Compute::F32) => ops::gated_mul(ops::gelu_tanh, &mut gate, &up),
            (Activation::GeluTanh, Compute::Bf16) => ops::gated_mul_bf16(ops::gelu_tanh, &mut gate, &up),
        }
        let down = self.linear(cfg, LinearKind::Down, gate, seq, hooks);
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
    norm: Vec<f32>,    // [hidden]
    lm_head: Vec<f32>, // [vocab, hidden]
    eps: f32,
    /// `GemmaRMSNorm` (`1 + weight`) instead of `LlamaRMSNorm`.
    norm_offset: bool,
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
        self.eps
    }

    fn vocab_size(&self) -> usize {
        self.lm_head.len() / self.norm.len()
    }

    /// The final-norm output (HF `hidden_states[num_layers]`): `[seq, hidden]`.
    pub fn normed(&self, hidden: &[f32], seq: usize) -> Vec<f32> {
        assert_eq!(hidden.len(), seq * self.hidden_size(), "Head: hidden is not [seq, hidden_size]");
        let mut out = vec![0f32; hidden.len()];
        self.compute.rms_norm(self.norm_offset, hidden, &self.norm, self.eps, &mut out);
        out
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
