//! Layer-at-a-time runtime for Llama-family decoders (HF `LlamaForCausalLM`,
//! `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `GemmaForCausalLM`,
//! `Phi3ForCausalLM`, `Starcoder2ForCausalLM`, `NemotronForCausalLM`; what sets them apart is in
//! `ModelConfig`'s `qkv_bias`, `mlp_bias`, `qk_norm`, `norm_offset`, `layer_norm`, `embed_scale`,
//! `act`, `rotary_dim` and `modules`; the second set, `Gemma2ForCausalLM`, `Gemma3ForCausalLM`,
//! `GraniteForCausalLM`, `Olmo2ForCausalLM` and `Exaone4ForCausalLM`, adds where the norms sit,
//! attention scales and soft caps, per-layer windows and RoPE tables, multipliers), and
//! `MixtralForCausalLM` / `Qwen3MoeForCausalLM` / `Qwen2MoeForCausalLM` / `PhimoeForCausalLM`,
//! whose MLP is a mixture-of-experts block (`ModelConfig::moe`, src/model/moe.rs).
//!
//! The checkpoint stays memory-mapped; only the layer being run is converted to f32, so a
//! 70B model never needs to be in memory at once. A caller walks the model like this:
//! ```text
//! hidden = model.embed(ids)                    // [seq, hidden_size]
//! for i in 0..num_hidden_layers: model.load_layer(i)?.forward(cfg, rope, &mut hidden, seq, hooks)
//! head = model.load_head()?; head.nll(&hidden, ids)
//! ```
//! Calibration and fake-quant evaluation plug into the forward pass through [`Hooks`].

pub mod config;
pub mod head;
pub mod hooks;
pub mod layer;
pub mod moe;
pub mod weights;

pub use config::{module_of, LayerModule, LinearKind, ModelConfig, Module, MoeConfig, LLAMA_MODULES};
pub use head::Head;
pub use hooks::{Hooks, NoHooks};
pub use layer::{Layer, Norm, NormSlot};

use crate::compute::{Compute, Device, Tensor};
use crate::error::{Error, Result};
use crate::io::safetensors::{Dtype, TensorView};
use moe::MoeBlock;
use weights::{check_finite, InputQuant, Weights};
use std::path::Path;

const LM_HEAD: &str = "lm_head.weight";
const LM_HEAD_BIAS: &str = "lm_head.bias";

/// A model's config and the checkpoint folders its tensors are read from.
pub struct Model {
    pub config: ModelConfig,
    /// Arithmetic of the layers and head loaded from now on.
    pub compute: Compute,
    /// The checkpoint folders (the model's, then the fallback).
    pub weights: Weights,
    /// Where the tensors of the layers and head loaded from now on live (and so where their
    /// forward pass runs).
    pub device: Device,
}

/// A model is read through its weights: `model.tensor(name)`, `weights::linear_weight(&model, ..)`.
impl std::ops::Deref for Model {
    type Target = Weights;
    fn deref(&self) -> &Weights {
        &self.weights
    }
}

impl Model {
    /// `dir` holds config.json and the weights; `fallback` is another checkpoint folder for
    /// tensors missing from `dir` (reference exports leave out embed_tokens / lm_head).
    pub fn open(dir: &Path, fallback: Option<&Path>) -> Result<Model> {
        let config = ModelConfig::from_dir(dir)?;
        Ok(Model { config, compute: Compute::F32, weights: Weights::open(dir, fallback)?, device: Device::Cpu })
    }

    /// The model dtype: that of the embedding table (ModelOpt does its arithmetic in it).
    pub fn dtype(&self) -> Result<Dtype> {
        Ok(self.tensor(&self.embed_name())?.dtype)
    }

    /// The embedding table's tensor name (`model.embed_tokens.weight`).
    pub fn embed_name(&self) -> String {
        format!("{}.weight", self.config.names.embed)
    }

    /// What the checkpoint lacks for the config, from the tensor headers alone: every tensor
    /// the family needs (embeddings, each layer's norms, linears (plain or quantized) and
    /// router, the final norm, lm_head unless tied) with the shape config.json implies, and no
    /// decoder layer beyond `num_hidden_layers`. A config that lies about a dimension or the
    /// layer count is caught here, before any work or any allocation sized by it. Empty when
    /// complete; at most `MAX_FINDINGS` entries.
    pub fn incomplete(&self) -> Vec<String> {
        const MAX_FINDINGS: usize = 20;
        let cfg = &self.config;
        let mut found = Vec::new();
        let check = |found: &mut Vec<String>, r: Result<()>| {
            if let Err(e) = r {
                found.push(e.to_string());
            }
        };
        let n = cfg.num_hidden_layers;
        let present: std::collections::BTreeSet<usize> = self.weight_names().iter().filter_map(|t| cfg.layer_of(t)).collect();
        if let Some(&last) = present.iter().next_back().filter(|&&l| l >= n) {
            check(&mut found, Err(Error::config(
                &cfg.path,
                format!("num_hidden_layers is {n} but the checkpoint holds decoder layers up to {}", cfg.layer_prefix(last)),
            )));
        }
        if let Some(l) = (0..n).find(|l| !present.contains(l)) {
            // One finding for the whole gap: a lying layer count must not cost a lookup per layer.
            check(&mut found, Err(Error::config(
                &cfg.path,
                format!("num_hidden_layers is {n} but the checkpoint has no tensor of {}", cfg.layer_prefix(l)),
            )));
        }
        let shape = |name: &str, shape: &[usize]| self.tensor(name).and_then(|t| t.expect_shape(shape));
        check(&mut found, shape(&self.embed_name(), &[cfg.vocab_size, cfg.hidden_size]));
        let norm = |module: &str| -> Result<()> {
            shape(&format!("{module}.weight"), &[cfg.hidden_size])?;
            if cfg.layer_norm && cfg.norm_bias {
                shape(&format!("{module}.bias"), &[cfg.hidden_size])?;
            }
            Ok(())
        };
        for l in (0..n).filter(|l| present.contains(l)) {
            let prefix = cfg.layer_prefix(l);
            for name in cfg.norms.slots().into_iter().flatten() {
                check(&mut found, norm(&format!("{prefix}.{name}")));
            }
            if cfg.qk_norm {
                for (which, width) in ["q_norm", "k_norm"].into_iter().zip(cfg.qk_norm_widths()) {
                    check(&mut found, shape(&format!("{}.{which}.weight", cfg.attn_prefix(l)), &[width]));
                }
            }
            for (router, rows) in cfg.moe_layer(l).map(|moe| moe.routers(l)).unwrap_or_default() {
                check(&mut found, shape(&format!("{router}.weight"), &[rows, cfg.hidden_size]));
            }
            for m in cfg.layer_modules(l) {
                check(&mut found, weights::check_linear(self, &m.path, m.shape));
            }
            if found.len() >= MAX_FINDINGS {
                break;
            }
        }
        check(&mut found, norm(cfg.names.final_norm));
        if let Some(n) = cfg.names.embed_norm {
            check(&mut found, norm(n));
        }
        if self.get(LM_HEAD).is_some() || self.get("lm_head.weight_packed").is_some() || !cfg.tie_word_embeddings {
            check(&mut found, weights::check_linear(self, "lm_head", [cfg.vocab_size, cfg.hidden_size]));
        }
        if cfg.lm_head_bias {
            check(&mut found, shape(LM_HEAD_BIAS, &[cfg.vocab_size]));
        }
        found.truncate(MAX_FINDINGS);
        found
    }

    /// [`Model::incomplete`] as an error naming what is missing or mis-shaped.
    pub fn check_complete(&self) -> Result<()> {
        let found = self.incomplete();
        if found.is_empty() {
            return Ok(());
        }
        Err(Error::config(
            &self.config.path,
            format!("does not match the checkpoint in {}:\n  {}", self.dir().display(), found.join("\n  ")),
        ))
    }

    /// Embedding rows of `ids`: `[ids.len(), hidden_size]` (HF `embed_tokens(input_ids)`),
    /// times `embed_scale` where the config has one (HF `GemmaModel.forward`:
    /// `hidden * torch.tensor(hidden_size**0.5, dtype=hidden.dtype)`, so under `Compute::Bf16`
    /// the factor and the product are bf16), then through BLOOM's `word_embeddings_layernorm`.
    /// Only those rows are read and converted.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let (vocab, hidden) = (self.config.vocab_size, self.config.hidden_size);
        let name = self.embed_name();
        let table = self.tensor(&name)?;
        table.expect_shape(&[vocab, hidden])?;
        let row_bytes = hidden * table.dtype.size();
        let row_shape = [hidden];
        let mut out = Vec::with_capacity(ids.len() * hidden);
        for &id in ids {
            let id = id as usize;
            if id >= vocab {
                return Err(Error::tensor(&name, format!("token id {id} is outside the vocabulary ({vocab})")));
            }
            let row = TensorView { shape: &row_shape, data: &table.data[id * row_bytes..][..row_bytes], ..table };
            let values = row.to_f32()?;
            check_finite(&name, &values, id * hidden)?;
            out.extend_from_slice(&values);
        }
        if let Some(scale) = self.config.embed_scale {
            let in_dtype = self.compute == Compute::Bf16 && self.config.embed_scale_in_dtype;
            let scale = if in_dtype { crate::numerics::round_bf16(scale) } else { scale };
            out.iter_mut().for_each(|v| *v *= scale);
            self.compute.round(&mut out);
        }
        let mut out = Tensor::on(out, self.device);
        if let Some(norm) = self.config.names.embed_norm {
            let (weight, bias) = self.load_norm(norm)?;
            out = out.norm(self.compute, self.config.norm_kind(), &weight, bias.as_ref());
        }
        crate::compute::take_device_error()?;
        Ok(out)
    }

    /// Decoder layer `i`'s weights, as f32.
    /// Calls `f` with each decoder layer in order while a reader thread loads the next one
    /// (reads it from the mapped shards, converts it and, on the device, uploads it): reading
    /// layer l + 1 overlaps computing layer l, at the cost of one more layer in memory. Stops at
    /// the first error of a load or of `f`.
    pub fn each_layer(&self, mut f: impl FnMut(usize, Layer) -> Result<()>) -> Result<()> {
        let n = self.config.num_hidden_layers;
        // A load on the reader thread reports its device error there (the sticky error is per
        // thread), as the load's result.
        let load = |l: usize| self.load_layer(l).and_then(|layer| crate::compute::take_device_error().map(|()| layer));
        std::thread::scope(|s| {
            let mut next = (n > 0).then(|| s.spawn(move || load(0)));
            for l in 0..n {
                let layer = next.take().expect("a load per layer").join().expect("layer reader thread")?;
                if l + 1 < n {
                    next = Some(s.spawn(move || load(l + 1)));
                }
                f(l, layer)?;
            }
            Ok(())
        })
    }

    pub fn load_layer(&self, i: usize) -> Result<Layer> {
        let cfg = &self.config;
        if i >= cfg.num_hidden_layers {
            return Err(Error::tensor(cfg.layer_prefix(i), format!("the model has {} layers", cfg.num_hidden_layers)));
        }
        let prefix = cfg.layer_prefix(i);
        let mut norms: [Option<Norm>; 4] = Default::default();
        for (slot, name) in norms.iter_mut().zip(cfg.norms.slots()) {
            if let Some(name) = name {
                let (weight, bias) = self.load_norm(&format!("{prefix}.{name}"))?;
                *slot = Some(Norm { weight, bias });
            }
        }
        // An MoE layer has no dense MLP: its gate/up/down slots stay empty, or hold the shared
        // expert (Qwen2-MoE).
        let moe = match &cfg.moe {
            Some(m) if m.is_sparse(i) => Some(self.load_moe(m, i)?),
            _ => None,
        };
        let mut linears: [Tensor; 7] = Default::default();
        let mut biases: [Option<Tensor>; 7] = Default::default();
        for m in cfg.layer_modules(i).into_iter().filter(|m| m.expert.is_none()) {
            let (module, shape) = (&m.path, m.shape);
            let w = m.to_runtime_rows(weights::linear_weight(self, module, shape)?, shape[1]);
            let name = format!("{module}.bias");
            let required = m.kinds.iter().any(|k| match k {
                LinearKind::Q | LinearKind::K | LinearKind::V => cfg.qkv_bias,
                LinearKind::O => false,
                LinearKind::Gate | LinearKind::Up | LinearKind::Down => cfg.mlp_bias,
            });
            let b = if required || self.get(&name).is_some() { Some(m.to_runtime_rows(self.load(&name, &shape[..1])?, 1)) } else { None };
            // A fused module's output rows are its linears' outputs one after the other.
            let mut row = 0;
            for &k in m.kinds {
                let [rows, cols] = cfg.linear_shape(i, k);
                linears[k as usize] = Tensor::on(w[row * cols..(row + rows) * cols].to_vec(), self.device);
                biases[k as usize] = b.as_ref().map(|b| Tensor::on(b[row..row + rows].to_vec(), self.device));
                row += rows;
            }
        }
        let qk_norm = if cfg.qk_norm {
            let [q, k] = cfg.qk_norm_widths();
            let norm = |which: &str, width| self.load(&format!("{}.{which}.weight", cfg.attn_prefix(i)), &[width]);
            Some((Tensor::on(norm("q_norm", q)?, self.device), Tensor::on(norm("k_norm", k)?, self.device)))
        } else {
            None
        };
        crate::compute::take_device_error()?;
        Ok(Layer {
            index: i,
            norms,
            linears,
            biases,
            qk_norm,
            moe,
            compute: self.compute,
        })
    }

    /// The MoE block of layer `layer`: its router (unquantized) and experts (dequantized when stored quantized).
    fn load_moe(&self, moe: &MoeConfig, layer: usize) -> Result<MoeBlock> {
        let cfg = &self.config;
        let router = |name: String, rows: usize| -> Result<Tensor> {
            let name = format!("{name}.weight");
            let t = self.tensor(&name)?;
            t.expect_shape(&[rows, cfg.hidden_size])?;
            let w = t.to_f32()?;
            check_finite(&name, &w, 0)?;
            Ok(Tensor::on(w, self.device))
        };
        let mut routers = moe.routers(layer).into_iter().map(|(name, rows)| router(name, rows));
        let router_weight = routers.next().expect("an MoE block has a router")?;
        let shared_gate = routers.next().transpose()?;
        let experts = (0..moe.num_experts)
            .map(|e| -> Result<[Tensor; 3]> {
                let w = |k| weights::linear_weight(self, &moe.expert_module(layer, e, k), moe.expert_shape(cfg, k));
                Ok([w(LinearKind::Gate)?, w(LinearKind::Up)?, w(LinearKind::Down)?].map(|w| Tensor::on(w, self.device)))
            })
            .collect::<Result<_>>()?;
        Ok(MoeBlock { router: router_weight, experts, shared_gate })
    }

    /// Norm `module`'s weight and, for a LayerNorm, its bias (`[hidden]` each).
    fn load_norm(&self, module: &str) -> Result<(Tensor, Option<Tensor>)> {
        let shape = [self.config.hidden_size];
        let weight = Tensor::on(self.load(&format!("{module}.weight"), &shape)?, self.device);
        let bias = match self.config.layer_norm && self.config.norm_bias {
            true => Some(Tensor::on(self.load(&format!("{module}.bias"), &shape)?, self.device)),
            false => None,
        };
        Ok((weight, bias))
    }

    /// The final norm and the output projection: `lm_head.weight` when the checkpoint has one
    /// (dequantized, with its input quantization, if auto-quantize quantized it), else
    /// `embed_tokens` when the embeddings are tied.
    pub fn load_head(&self) -> Result<Head> {
        let cfg = &self.config;
        let (norm, norm_bias) = self.load_norm(cfg.names.final_norm)?;
        let shape = [cfg.vocab_size, cfg.hidden_size];
        let (lm_head, input) = if self.get(LM_HEAD).is_some() || !cfg.tie_word_embeddings {
            (weights::linear_weight(self, "lm_head", shape)?, weights::input_quant(self, "lm_head", shape)?)
        } else {
            (self.load(&self.embed_name(), &shape)?, InputQuant::default())
        };
        let lm_head = Tensor::on(lm_head, self.device);
        let lm_head_bias = match cfg.lm_head_bias {
            true => Some(Tensor::on(self.load(LM_HEAD_BIAS, &[cfg.vocab_size])?, self.device)),
            false => None,
        };
        crate::compute::take_device_error()?;
        Ok(Head { cfg: cfg.clone(), norm, norm_bias, lm_head, lm_head_bias, compute: self.compute, input })
    }

}
