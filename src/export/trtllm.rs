//! The legacy TensorRT-LLM checkpoint (ModelOpt's `export_tensorrt_llm_checkpoint`,
//! spec/export-formats.md §4): `config.json` plus `rank{r}.safetensors` for r < tp·pp, made
//! from a unified-HF checkpoint written by rq-min and the original model folder.
//!
//! Families (`TRTLLM_FAMILIES`): Llama, Mistral, Qwen2 (q/k/v biases -> `attention.qkv.bias`),
//! Qwen3 (q/k norms -> `attention.{q,k}_layernorm`), Gemma (norms written as `1 + w`, embedding
//! unscaled, shared table), Phi3 (fused qkv_proj split into q/k/v rows; gate_up_proj ->
//! `mlp.fc` = [up; gate] under `swiglu`), Starcoder2 and Nemotron (TRT-LLM's GPTForCausalLM
//! variants: LayerNorm weight + bias, plain `mlp.fc` / `mlp.proj`, Starcoder2's biases on every
//! linear, Nemotron's LayerNorm1P as `1 + w`, `squared-relu`, partial rotary as `rotary_pct`),
//! Mixtral and Qwen3-MoE (TRT-LLM's `MOE` layer, see "Mixture of experts" below).
//! Formats FP8, NVFP4, INT8 SmoothQuant, INT4 AWQ, W4A8 AWQ, none (unquantized), and
//! MIXED_PRECISION of those (auto-quantize / --layer-formats: `quant_cfg.json`). NVFP4_AWQ is
//! refused: TensorRT-LLM's QuantAlgo has no such algorithm.
//!
//! Notes on the values (§4.4):
//! - FP8 qkv: one weights_scaling_factor / activation_scaling_factor (max over q, k, v); the
//!   concatenated weight is re-quantized from the ORIGINAL weights with that scale, as
//!   ModelOpt does. Every other FP8 linear keeps the unified export's codes.
//! - AWQ: this path has no layernorm folding, so every AWQ linear carries
//!   `prequant_scaling_factor`. rq-min's unified export folded the shared q/k/v (gate/up)
//!   scale into the norm (weight and LayerNorm bias); it is recovered as
//!   `exported_norm / original_norm` per channel and the ORIGINAL norm (and bias) is written.
//!   This is exact up to the model-dtype rounding of the folded norm (for bf16 models: a
//!   relative error of at most 2^-9 per channel; exact for f32).
//! - Phi3's fused modules have one quantizer each: q/k/v (up/gate) rows share its per-tensor
//!   scales. Under TP each rank's `mlp.fc` is `[up_r; gate_r]` (the halves split separately,
//!   as ModelOpt splits its MoE w3/w1 pair and TRT-LLM's swiglu needs). DEVIATION: ModelOpt's
//!   dense `_split_model_config_for_tp` chunks the fused fc as one column linear (rank 0 all of
//!   up, rank 1 all of gate), which TRT-LLM's per-rank swiglu would misread; tp = 1 is equal.
//! - Row-parallel biases (dense, proj) are whole on every rank, column biases split (§4.5).
//! - TP: KV heads are duplicated when tp > num_key_value_heads, the vocabulary is padded with
//!   zero rows to a multiple of tp (AWQ: first to a multiple of 64), §4.4/§4.5.
//! - Layer indices are local to a pipeline rank (rank p holds `transformer.layers.0..L/pp`),
//!   as ModelOpt's per-rank configs and TRT-LLM's loaders number them.
//!
//! Mixture of experts (ModelOpt `build_moe_config` / `build_stacked_experts`, §4.3, §4.5):
//! - `mlp.router.weight`: the HF router (`gate`) as F32 `[E, H]`, whole on every rank, excluded
//!   from quantization.
//! - `mlp.fc`: per expert `[w3; w1]` (up, then the activated gate: TRT-LLM's MoE `swiglu`),
//!   stacked `(E, 2I, H)`; `mlp.proj`: the experts' w2 stacked `(E, H, I)`. Per-tensor factors
//!   stack to `(E, 1)` (weights_scaling_factor(_2)) except activation_scaling_factor, the max
//!   over experts `[1]` (TRT-LLM's MoE plugin takes one); per-row / per-group / block scales and
//!   AWQ prequant stack per expert (`(E, out, n)`, `(E, in)`). rq-min's unified export already
//!   shares what ModelOpt unifies before stacking (gate/up weight amax per expert, one input
//!   amax and the mean pre_quant_scale per block), so the stacked tensors are its tensors.
//! - TP (`moe_tp_size = tp`, `moe_ep_size = 1`: no expert parallelism): each rank's fc holds
//!   `[w3_r; w1_r]` per expert, proj the expert's input slice (dim 2) with its group / block
//!   scales and prequant.
//! - config.json: `moe` {num_experts, top_k, normalization_mode}, `hidden_act` "swiglu" and
//!   `intermediate_size` the experts' (TRT-LLM's QWen model sizes qwen3_moe experts by it).
//!   normalization_mode is 1 (RENORMALIZE: softmax over the top-k logits) for Mixtral and
//!   Qwen3-MoE with `norm_topk_prob`, 0 (NONE: top-k of the full softmax) without it.
//!   DEVIATION: ModelOpt's manual path writes 1 for every non-Phi MoE, which would renormalize
//!   a `norm_topk_prob = false` model; TRT-LLM's QWenConfig writes 0 for every Qwen MoE.
//! - Refused: INT8 SmoothQuant experts (TRT-LLM's MoE plugin has no W8A8 path, and ModelOpt's
//!   stacking of per-row scales concatenates them on the expert axis), experts of one block in
//!   different formats (one quant mode per MoE layer), and dense layers in an MoE model
//!   (`mlp_only_layers`, `decoder_sparse_step` > 1: TRT-LLM's decoder layer is all-MoE).

use crate::model::config::{Activation, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::export::unified::{Staging, TOKENIZER_FILES};
use crate::io::json::{obj, str, Json};
use crate::model::LinearKind;
use crate::model::config::MoeConfig;
use crate::model::weights::{detect, Stored};
use crate::quant::{fp8, QFormat};
use crate::io::safetensors::{write_file, Checkpoint, Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Where to write and how to split.
#[derive(Clone, Debug)]
pub struct TrtllmOptions {
    pub tp: usize,
    pub pp: usize,
    pub force: bool,
}

/// An owned tensor (1-D or 2-D in this export).
#[derive(Clone, Debug, PartialEq)]
struct Tn {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tn {
    fn from_view(v: &TensorView) -> Tn {
        Tn { dtype: v.dtype, shape: v.shape.to_vec(), data: v.data.to_vec() }
    }
    fn scalar(x: f32) -> Tn {
        Tn { dtype: Dtype::F32, shape: vec![1], data: x.to_le_bytes().to_vec() }
    }
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The one value of a per-tensor F32 factor.
    fn value(&self) -> f32 {
        f32::from_le_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
    /// Each of the `heads` row blocks repeated `reps` times in place (ModelOpt `dup_kv_weight`:
    /// `repeat_interleave` over heads), for any tensor indexed by output row (weights, packed
    /// INT4 rows, per-row scales, biases).
    fn dup_heads(&self, heads: usize, reps: usize) -> Tn {
        let block = self.data.len() / heads;
        let data = self.data.chunks_exact(block).flat_map(|c| std::iter::repeat_n(c, reps).flatten().copied()).collect();
        let mut shape = self.shape.clone();
        shape[0] *= reps;
        Tn { dtype: self.dtype, shape, data }
    }
    /// Rows `a..b` along dim 0.
    fn rows(&self, a: usize, b: usize) -> Tn {
        let row = self.data.len() / self.shape[0];
        let mut shape = self.shape.clone();
        shape[0] = b - a;
        Tn { dtype: self.dtype, shape, data: self.data[a * row..b * row].to_vec() }
    }
    /// Zero rows appended up to `rows` (ModelOpt `pad_weights`).
    fn pad_rows(mut self, rows: usize) -> Tn {
        if self.shape[0] < rows {
            let row: usize = self.shape[1..].iter().product::<usize>() * self.dtype.size();
            self.data.resize(rows * row, 0);
            self.shape[0] = rows;
        }
        self
    }
    /// Rank `r`'s part of a split in `tp` along `dim` (0 or 1).
    fn split(&self, name: &str, dim: usize, tp: usize, r: usize) -> Result<Tn> {
        if tp == 1 {
            return Ok(self.clone());
        }
        let n = *self.shape.get(dim).ok_or_else(|| Error::tensor(name, format!("has no dim {dim} to split")))?;
        if n % tp != 0 {
            return Err(Error::Usage(format!(
                "--tp {tp}: {name} has {n} {} along dim {dim}, not divisible by {tp}",
                if dim == 1 && self.shape.len() == 2 && self.dtype == Dtype::F32 { "groups/columns" } else { "entries" }
            )));
        }
        let c = n / tp;
        if dim == 0 {
            return Ok(self.rows(r * c, (r + 1) * c));
        }
        let size = self.dtype.size();
        let mut shape = self.shape.clone();
        shape[dim] = c;
        let cols = self.shape[1] * size;
        let data = self.data.chunks_exact(cols).flat_map(|row| row[r * c * size..(r + 1) * c * size].iter().copied()).collect();
        Ok(Tn { dtype: self.dtype, shape, data })
    }
}

/// Concatenation along dim 0.
fn cat0(parts: &[Tn]) -> Tn {
    let mut shape = parts[0].shape.clone();
    shape[0] = parts.iter().map(|p| p.shape[0]).sum();
    Tn { dtype: parts[0].dtype, shape, data: parts.iter().flat_map(|p| p.data.iter().copied()).collect() }
}

/// Tensors of one shape stacked along a new leading dim (`torch.stack`): `[n] + shape`.
fn stack(parts: &[&Tn]) -> Tn {
    let shape = std::iter::once(parts.len()).chain(parts[0].shape.iter().copied()).collect();
    Tn { dtype: parts[0].dtype, shape, data: parts.iter().flat_map(|p| p.data.iter().copied()).collect() }
}

fn max_scalar(ts: &[&Tn]) -> Tn {
    Tn::scalar(ts.iter().map(|t| t.value()).fold(f32::MIN, f32::max))
}

/// One linear's TRT-LLM tensors.
#[derive(Clone, Debug)]
struct Lin {
    w: Tn,
    /// weights_scaling_factor: [1], [out], [out, in/G] or NVFP4 block scales.
    ws: Option<Tn>,
    ws2: Option<Tn>,
    act: Option<Tn>,
    pqs: Option<Tn>,
    bias: Option<Tn>,
}

impl Lin {
    /// KV heads duplicated `reps` times (§4.5): every output-row tensor; per-tensor factors
    /// and the input-side prequant scale stay.
    fn dup_heads(&self, heads: usize, reps: usize) -> Lin {
        let rows = |t: &Option<Tn>| t.as_ref().map(|t| if t.numel() > 1 { t.dup_heads(heads, reps) } else { t.clone() });
        Lin { w: self.w.dup_heads(heads, reps), ws: rows(&self.ws), bias: rows(&self.bias), ..self.clone() }
    }
    /// Output rows `a..b` of a fused module (Phi3's qkv_proj, gate_up_proj): weight rows
    /// (`pack` rows per stored row: 2 for INT4's packed row pairs, §1.5), per-row scales and
    /// bias; per-tensor factors and the input-side prequant scale are the whole module's.
    fn rows(&self, name: &str, a: usize, b: usize, pack: usize) -> Result<Lin> {
        if a % pack != 0 || b % pack != 0 {
            return Err(Error::Unsupported(format!(
                "{name}: rows {a}..{b} split a packed INT4 row pair; TensorRT-LLM needs them apart"
            )));
        }
        let rows = |t: &Option<Tn>| t.as_ref().map(|t| if t.numel() > 1 { t.rows(a, b) } else { t.clone() });
        Ok(Lin { w: self.w.rows(a / pack, b / pack), ws: rows(&self.ws), bias: rows(&self.bias), ..self.clone() })
    }
    fn column(&self, name: &str, tp: usize, r: usize) -> Result<Lin> {
        let ws = match &self.ws {
            Some(t) if t.numel() > 1 => Some(t.split(name, 0, tp, r)?),
            other => other.clone(),
        };
        let bias = self.bias.as_ref().map(|b| b.split(name, 0, tp, r)).transpose()?;
        Ok(Lin { w: self.w.split(name, 0, tp, r)?, ws, bias, ..self.clone() })
    }
    fn row(&self, name: &str, tp: usize, r: usize) -> Result<Lin> {
        let ws = match &self.ws {
            Some(t) if t.shape.len() == 2 => Some(t.split(name, 1, tp, r)?),
            other => other.clone(),
        };
        let pqs = match &self.pqs {
            Some(p) => Some(p.split(name, 0, tp, r)?),
            None => None,
        };
        Ok(Lin { w: self.w.split(name, 1, tp, r)?, ws, pqs, ..self.clone() })
    }
    /// [q; k; v] (or any column siblings): weights and per-row scales concatenated, per-tensor
    /// factors the max, prequant the first's (identical across siblings).
    fn merge(parts: &[Lin]) -> Lin {
        let opt = |f: fn(&Lin) -> &Option<Tn>| -> Option<Tn> {
            let ts: Vec<&Tn> = parts.iter().filter_map(|p| f(p).as_ref()).collect();
            if ts.len() != parts.len() {
                return None;
            }
            Some(if ts[0].numel() == 1 { max_scalar(&ts) } else { cat0(&ts.into_iter().cloned().collect::<Vec<_>>()) })
        };
        Lin {
            w: cat0(&parts.iter().map(|p| p.w.clone()).collect::<Vec<_>>()),
            ws: opt(|p| &p.ws),
            ws2: opt(|p| &p.ws2),
            act: opt(|p| &p.act),
            pqs: parts[0].pqs.clone(),
            bias: opt(|p| &p.bias),
        }
    }
    /// One MoE block's experts stacked (ModelOpt `_build_stacked_linear`): every tensor per
    /// expert along a new leading dim, except the activation factor: the max over experts.
    fn stack(experts: &[Lin]) -> Lin {
        let all = |f: fn(&Lin) -> &Option<Tn>| -> Option<Vec<&Tn>> {
            let ts: Vec<&Tn> = experts.iter().filter_map(|p| f(p).as_ref()).collect();
            (ts.len() == experts.len()).then_some(ts)
        };
        Lin {
            w: stack(&experts.iter().map(|x| &x.w).collect::<Vec<_>>()),
            ws: all(|p| &p.ws).map(|t| stack(&t)),
            ws2: all(|p| &p.ws2).map(|t| stack(&t)),
            act: all(|p| &p.act).map(|t| max_scalar(&t)),
            pqs: all(|p| &p.pqs).map(|t| stack(&t)),
            bias: None,
        }
    }
    fn emit(self, prefix: &str, out: &mut Vec<(String, Tn)>) {
        out.push((format!("{prefix}.weight"), self.w));
        for (suffix, t) in [
            ("bias", self.bias),
            ("weights_scaling_factor", self.ws),
            ("weights_scaling_factor_2", self.ws2),
            ("activation_scaling_factor", self.act),
            ("prequant_scaling_factor", self.pqs),
        ] {
            if let Some(t) = t {
                out.push((format!("{prefix}.{suffix}"), t));
            }
        }
    }
}

/// A linear of the unified checkpoint, per-tensor factors reshaped to [1], INT4 codes as I8.
fn load_lin(ck: &Checkpoint, module: &str, shape: [usize; 2]) -> Result<(Stored, Lin)> {
    let name = format!("{module}.weight");
    let w = ck.tensor(&name)?;
    let scale = ck.get(&format!("{module}.weight_scale"));
    let stored = match detect(&w, scale.as_ref()) {
        Some((s, logical)) if logical == shape => s,
        _ => return Err(Error::tensor(&name, format!("{} {:?} is not a known format of logical shape {shape:?}", w.dtype.name(), w.shape))),
    };
    let opt = |suffix: &str| -> Option<Tn> {
        ck.get(&format!("{module}.{suffix}")).map(|v| {
            let mut t = Tn::from_view(&v);
            if t.numel() == 1 {
                t.shape = vec![1];
            }
            t
        })
    };
    let mut w = Tn::from_view(&w);
    if matches!(stored, Stored::Int4 { .. }) {
        w.dtype = Dtype::I8; // same bytes, §4.4
    }
    let mut ws = opt("weight_scale");
    if let (Some(t), Stored::Int8 | Stored::Int4 { .. } | Stored::Nvfp4) = (&mut ws, stored) {
        t.shape = scale.as_ref().map(|s| s.shape.to_vec()).unwrap_or_default(); // keep per-row / per-group shapes
    }
    Ok((stored, Lin { w, ws, ws2: opt("weight_scale_2"), act: opt("input_scale"), pqs: opt("pre_quant_scale"), bias: None }))
}

/// One runtime linear of a decoder layer as loaded from the unified checkpoint.
struct Linear {
    kind: LinearKind,
    /// The HF module holding it (for messages).
    module: String,
    format: Option<QFormat>,
    lin: Lin,
}

/// A decoder layer's linears, fused HF modules (Phi3's qkv_proj, gate_up_proj) split into
/// their linears' rows; an MoE layer's attention only (its experts are [`Experts`]).
struct LayerLinears(Vec<Linear>);

impl LayerLinears {
    fn load(uni: &Checkpoint, quant: &Quant, cfg: &ModelConfig, l: usize, moe: bool) -> Result<LayerLinears> {
        let mut out = Vec::new();
        for m in cfg.modules.iter().filter(|m| !(moe && m.is_mlp())) {
            let module = format!("model.layers.{l}.{}", m.name);
            let shape = m.shape(cfg, l);
            let (s, mut lin) = load_lin(uni, &module, shape)?;
            lin.bias = uni.get(&format!("{module}.bias")).map(|b| Tn::from_view(&b));
            let format = quant.of(&module, s)?;
            let pack = shape[0] / lin.w.shape[0];
            let mut row = 0;
            for &kind in m.kinds {
                let rows = kind.shape(cfg)[0];
                let part = if m.kinds.len() == 1 { lin.clone() } else { lin.rows(&module, row, row + rows, pack)? };
                out.push(Linear { kind, module: module.clone(), format, lin: part });
                row += rows;
            }
        }
        Ok(LayerLinears(out))
    }
    fn get(&self, k: LinearKind) -> Result<&Linear> {
        self.0.iter().find(|x| x.kind == k).ok_or_else(|| Error::Unsupported(format!("a layer without a {k:?} linear")))
    }
    fn get_mut(&mut self, k: LinearKind) -> Result<&mut Linear> {
        self.0.iter_mut().find(|x| x.kind == k).ok_or_else(|| Error::Unsupported(format!("a layer without a {k:?} linear")))
    }
}

/// One MoE block of the unified checkpoint: the router and every expert's gate (w1), up (w3)
/// and down (w2) linear, all in one format.
struct Experts {
    /// The HF block (`model.layers.{l}.block_sparse_moe` / `.mlp`), for messages.
    block: String,
    /// The F32 router, `[E, H]`.
    router: Tn,
    format: Option<QFormat>,
    gate: Vec<Lin>,
    up: Vec<Lin>,
    down: Vec<Lin>,
}

impl Experts {
    fn load(
        (uni, orig): (&Checkpoint, &Checkpoint),
        quant: &Quant,
        cfg: &ModelConfig,
        moe: &MoeConfig,
        l: usize,
    ) -> Result<Experts> {
        let name = format!("{}.weight", moe.router(l));
        let r = orig.tensor(&name)?;
        r.expect_shape(&[moe.num_experts, cfg.hidden_size])?;
        // TRT-LLM keeps the router in float32 (ModelOpt `build_moe_config`).
        let mut router = encode(&r.to_f32()?, Dtype::F32);
        router.shape = r.shape.to_vec();
        let mut formats = Vec::new();
        let mut lins: [Vec<Lin>; 3] = Default::default();
        for e in 0..moe.num_experts {
            for (slot, kind) in [LinearKind::Gate, LinearKind::Up, LinearKind::Down].into_iter().enumerate() {
                let module = moe.expert_module(l, e, kind);
                let (s, lin) = load_lin(uni, &module, moe.expert_shape(cfg, kind))?;
                formats.push((module.clone(), quant.of(&module, s)?));
                lins[slot].push(lin);
            }
        }
        let format = formats[0].1;
        if let Some((m, g)) = formats.iter().find(|(_, g)| *g != format) {
            let name = |f: Option<QFormat>| f.map_or("none", QFormat::cli_name);
            return Err(Error::Unsupported(format!(
                "{m} is {} but {} is {}: TensorRT-LLM runs an MoE block's experts in one format",
                name(*g),
                formats[0].0,
                name(format)
            )));
        }
        if format == Some(QFormat::Int8Sq) {
            return Err(Error::Unsupported(format!(
                "model.layers.{l}.{}: INT8 SmoothQuant experts (TensorRT-LLM's MoE plugin has no W8A8 path); \
                 quantize the experts in another format (--layer-formats) or use --export hf",
                moe.block
            )));
        }
        let [gate, up, down] = lins;
        Ok(Experts { block: format!("model.layers.{l}.{}", moe.block), router, format, gate, up, down })
    }

    /// TP rank `r`'s `mlp.fc` (per expert `[w3_r; w1_r]`, §4.5) and `mlp.proj` (per expert the
    /// input slice), stacked.
    fn rank(&self, tp: usize, r: usize) -> Result<(Lin, Lin)> {
        let mut fc = Vec::new();
        let mut proj = Vec::new();
        for e in 0..self.gate.len() {
            let name = format!("{}.experts.{e}", self.block);
            fc.push(Lin::merge(&[self.up[e].column(&name, tp, r)?, self.gate[e].column(&name, tp, r)?]));
            proj.push(self.down[e].row(&name, tp, r)?);
        }
        Ok((Lin::stack(&fc), Lin::stack(&proj)))
    }
}

/// The AWQ pre_quant_scale rq-min's unified export folded into `norm` (spec/export-formats.md
/// §2.7: weight · s, LayerNorm bias · s; `1 + w` norms: (1 + w) · s - 1), per channel:
/// exported / original weight ((1 + e) / (1 + o) for offset norms), from the bias where that
/// is 0 / 0, else 1. Exact up to the model-dtype rounding of the folded norm.
fn folded_scale(uni: &Checkpoint, orig: &Checkpoint, norm: &str, offset: bool) -> Result<Vec<f32>> {
    let read = |ck: &Checkpoint, suffix: &str| -> Result<Option<Vec<f32>>> {
        ck.get(&format!("{norm}.{suffix}")).map(|t| t.to_f32()).transpose()
    };
    let (Some(e), Some(o)) = (read(uni, "weight")?, read(orig, "weight")?) else {
        return Err(Error::tensor(format!("{norm}.weight"), "missing"));
    };
    let (eb, ob) = (read(uni, "bias")?, read(orig, "bias")?);
    let off = if offset { 1.0 } else { 0.0 };
    Ok((0..o.len())
        .map(|c| match (o[c] + off, &eb, &ob) {
            (d, _, _) if d != 0.0 => (e[c] + off) / d,
            (_, Some(eb), Some(ob)) if ob[c] != 0.0 => eb[c] / ob[c],
            _ => 1.0,
        })
        .collect())
}

fn encode(values: &[f32], dtype: Dtype) -> Tn {
    Tn { dtype, shape: vec![values.len()], data: crate::io::safetensors::encode(values, dtype) }
}

fn dtype_name(d: Dtype) -> Result<&'static str> {
    Ok(match d {
        Dtype::F32 => "float32",
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        other => return Err(Error::Unsupported(format!("TensorRT-LLM export of a {} model", other.name()))),
    })
}

/// What the unified checkpoint's hf_quant_config.json says.
#[derive(Default)]
struct Quant {
    /// The one format of a uniform checkpoint (None: unquantized or mixed precision).
    uniform: Option<QFormat>,
    /// MIXED_PRECISION (`quantized_layers`): HF module -> format.
    layers: Option<HashMap<String, QFormat>>,
    kv_fp8: bool,
}

impl Quant {
    fn read(dir: &Path) -> Result<Quant> {
        let p = dir.join("hf_quant_config.json");
        if !p.exists() {
            return Ok(Quant::default());
        }
        let j = Json::parse_file(&p)?;
        let q = j.get("quantization").ok_or_else(|| Error::config(&p, "no \"quantization\" object"))?;
        let kv_fp8 = q.get("kv_cache_quant_algo").and_then(Json::as_str) == Some("FP8");
        let format = |algo: &str| -> Result<QFormat> {
            match QFormat::ALL.into_iter().find(|f| f.quant_algo() == algo) {
                // TensorRT-LLM's QuantAlgo has no NVFP4_AWQ (nor does its legacy loader know the
                // per-linear prequant_scaling_factor of NVFP4 weights).
                Some(QFormat::Nvfp4Awq) | None => Err(Error::Unsupported(format!(
                    "TensorRT-LLM checkpoint with quant_algo {algo} (TensorRT-LLM supports FP8, NVFP4, \
                     W8A8_SQ_PER_CHANNEL, W4A16_AWQ, W4A8_AWQ and MIXED_PRECISION of those; use --export hf for NVFP4_AWQ)"
                ))),
                Some(f) => Ok(f),
            }
        };
        match q.get("quant_algo").and_then(Json::as_str) {
            None => Ok(Quant { kv_fp8, ..Quant::default() }),
            Some("MIXED_PRECISION") => {
                let layers = q
                    .get("quantized_layers")
                    .and_then(Json::as_object)
                    .ok_or_else(|| Error::config(&p, "MIXED_PRECISION without a quantized_layers object"))?;
                let mut map = HashMap::new();
                for (module, v) in layers {
                    let algo = v.get("quant_algo").and_then(Json::as_str);
                    let algo = algo.ok_or_else(|| Error::config(&p, format!("quantized_layers.{module} has no quant_algo")))?;
                    map.insert(module.clone(), format(algo)?);
                }
                Ok(Quant { uniform: None, layers: Some(map), kv_fp8 })
            }
            Some(algo) => Ok(Quant { uniform: Some(format(algo)?), layers: None, kv_fp8 }),
        }
    }

    /// The format of HF `module`, stored as `s`.
    fn of(&self, module: &str, s: Stored) -> Result<Option<QFormat>> {
        if s == Stored::Plain {
            return Ok(None);
        }
        let f = match &self.layers {
            Some(map) => map.get(module).copied(),
            None => self.uniform,
        };
        f.map(Some).ok_or_else(|| Error::tensor(format!("{module}.weight"), "quantized but not in the checkpoint's quantization config"))
    }
}

/// One TensorRT-LLM linear of a decoder layer.
#[derive(Clone, Copy, Debug)]
pub struct TrtLinear {
    /// Its name under `transformer.layers.{l}.`.
    pub name: &'static str,
    /// The runtime linears whose output rows it stacks, in this order; each TP rank holds each
    /// one's rank slice, one after the other (`[q_r; k_r; v_r]`, §4.5).
    pub kinds: &'static [LinearKind],
    /// Row-parallel (split along the input, bias replicated on every rank, §4.5) rather than
    /// column-parallel.
    pub row: bool,
    /// The HF norm in front of it, which rq-min's unified export folds its AWQ scale into.
    pub norm: Option<&'static str>,
}

const fn trt(name: &'static str, kinds: &'static [LinearKind], row: bool, norm: Option<&'static str>) -> TrtLinear {
    TrtLinear { name, kinds, row, norm }
}

const QKV: TrtLinear = trt("attention.qkv", &[LinearKind::Q, LinearKind::K, LinearKind::V], false, Some("input_layernorm"));
const DENSE: TrtLinear = trt("attention.dense", &[LinearKind::O], true, None);
const PROJ: TrtLinear = trt("mlp.proj", &[LinearKind::Down], true, None);
const POST: Option<&str> = Some("post_attention_layernorm");

/// LLaMA / QWen / Gemma `GatedMLP`: `mlp.fc` is the activated gate_proj, `mlp.gate` up_proj (§4.3).
pub const GATED_LINEARS: &[TrtLinear] =
    &[QKV, DENSE, trt("mlp.fc", &[LinearKind::Gate], false, POST), trt("mlp.gate", &[LinearKind::Up], false, POST), PROJ];
/// Phi3's `MLP` under `swiglu` (`x, gate = chunk(fc(h), 2)`: the second half is activated): one
/// `mlp.fc` holding gate_up_proj with its halves swapped, `[up; gate]` (ModelOpt
/// `build_mlp_config` for phi3, TRT-LLM's phi3 convert).
const SWIGLU_LINEARS: &[TrtLinear] = &[QKV, DENSE, trt("mlp.fc", &[LinearKind::Up, LinearKind::Gate], false, POST), PROJ];
/// GPT's plain `MLP`: `mlp.fc` = c_fc / up_proj, `mlp.proj` = c_proj / down_proj.
const PLAIN_LINEARS: &[TrtLinear] = &[QKV, DENSE, trt("mlp.fc", &[LinearKind::Up], false, POST), PROJ];

/// The config.json keys a family's TensorRT-LLM config class adds (§4.2).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Keys {
    None,
    /// `QWenConfig`: qwen_type (the HF model_type), attn_bias, mlp_bias.
    Qwen,
    /// `GemmaConfig`: attn_bias, mlp_bias.
    Gemma,
    /// `GPTConfig`: gpt_variant (Starcoder2 and Nemotron are variants of GPTForCausalLM).
    Gpt(&'static str),
}

/// How TensorRT-LLM models a family. Its `MODEL_MAP` takes the HF architecture string
/// (Mistral -> LLaMAForCausalLM, Qwen2/Qwen3 -> QWenForCausalLM, Starcoder2/Nemotron ->
/// GPTForCausalLM), which config.json keeps.
#[derive(Debug)]
pub struct TrtFamily {
    pub architecture: &'static str,
    pub linears: &'static [TrtLinear],
    /// TensorRT-LLM's `hidden_act` for each HF activation the class runs ("gelu" is its tanh
    /// approximation; ModelOpt names relu2 "squared-relu").
    acts: &'static [(Activation, &'static str)],
    /// The class holds linear biases (TRT-LLM's Phi3 and GPT nemotron variant have none).
    biases: bool,
    /// TRT-LLM's GemmaConfig always shares the embedding table: ModelOpt then writes no
    /// lm_head on a single pipeline rank (§4.2).
    shared_table: bool,
    keys: Keys,
    /// Every decoder layer's MLP is TRT-LLM's `MOE` (router, stacked `mlp.fc` / `mlp.proj`);
    /// `linears` then holds the attention only.
    pub moe: bool,
}

const LLAMA_ACTS: &[(Activation, &str)] = &[(Activation::Silu, "silu"), (Activation::GeluTanh, "gelu")];
/// The attention of an MoE family's layers.
const ATTENTION_LINEARS: &[TrtLinear] = &[QKV, DENSE];

/// The families this converter writes.
pub const TRTLLM_FAMILIES: [TrtFamily; 10] = {
    type Acts = &'static [(Activation, &'static str)];
    const fn f(architecture: &'static str, linears: &'static [TrtLinear], acts: Acts, biases: bool, keys: Keys) -> TrtFamily {
        TrtFamily { architecture, linears, acts, biases, shared_table: matches!(keys, Keys::Gemma), keys, moe: false }
    }
    // MoE: TRT-LLM's gated MoE activation is "swiglu" (LLaMAConfig for mixtral, QWenConfig for
    // qwen3_moe, ModelOpt `build_moe_config`).
    const fn moe(architecture: &'static str, keys: Keys) -> TrtFamily {
        TrtFamily { moe: true, ..f(architecture, ATTENTION_LINEARS, &[(Activation::Silu, "swiglu")], false, keys) }
    }
    [
        f("LlamaForCausalLM", GATED_LINEARS, LLAMA_ACTS, true, Keys::None),
        f("MistralForCausalLM", GATED_LINEARS, LLAMA_ACTS, true, Keys::None),
        f("Qwen2ForCausalLM", GATED_LINEARS, LLAMA_ACTS, true, Keys::Qwen),
        f("Qwen3ForCausalLM", GATED_LINEARS, LLAMA_ACTS, true, Keys::Qwen),
        f("GemmaForCausalLM", GATED_LINEARS, LLAMA_ACTS, true, Keys::Gemma),
        // TRT-LLM's Phi3Config: "swiglu" for silu (ModelOpt overrides phi3's hidden_act likewise).
        f("Phi3ForCausalLM", SWIGLU_LINEARS, &[(Activation::Silu, "swiglu")], false, Keys::None),
        // GPTConfig.from_hugging_face: starcoder2 "gelu" with `bias = use_bias`; nemotron
        // "squared-relu" with `bias = False`.
        f("Starcoder2ForCausalLM", PLAIN_LINEARS, &[(Activation::GeluTanh, "gelu")], true, Keys::Gpt("starcoder2")),
        f("NemotronForCausalLM", PLAIN_LINEARS, &[(Activation::Relu2, "squared-relu")], false, Keys::Gpt("nemotron")),
        // TRT-LLM MODEL_MAP: Mixtral -> LLaMAForCausalLM, Qwen3-MoE -> QWenForCausalLM (qwen_type qwen3_moe).
        moe("MixtralForCausalLM", Keys::None),
        moe("Qwen3MoeForCausalLM", Keys::Qwen),
    ]
};

/// The TensorRT-LLM family of HF `architecture`.
pub fn trt_family(architecture: &str) -> Option<&'static TrtFamily> {
    TRTLLM_FAMILIES.iter().find(|f| f.architecture == architecture)
}

/// Refuses a model the converter does not handle: another family, an activation or linear
/// biases the family's TensorRT-LLM class does not run. Returns the family and its `hidden_act`.
pub fn check_model(cfg: &ModelConfig) -> Result<(&'static TrtFamily, &'static str)> {
    let Some(fam) = trt_family(&cfg.architecture) else {
        let names: Vec<&str> = TRTLLM_FAMILIES.iter().map(|f| f.architecture).collect();
        let msg = format!("TensorRT-LLM export of {} (supported: {})", cfg.architecture, names.join(", "));
        return Err(Error::Unsupported(msg));
    };
    let Some(&(_, act)) = fam.acts.iter().find(|(a, _)| *a == cfg.act) else {
        let msg = format!("TensorRT-LLM export of {} with the {:?} activation", cfg.architecture, cfg.act);
        return Err(Error::Unsupported(msg));
    };
    if fam.moe && !cfg.moe.as_ref().is_some_and(|m| m.sparse.iter().all(|&s| s)) {
        return Err(Error::Unsupported(format!(
            "TensorRT-LLM export of {} with dense MLP layers (mlp_only_layers / decoder_sparse_step): TensorRT-LLM's \
             decoder layer of it is MoE in every layer",
            cfg.architecture
        )));
    }
    if !matches!(cfg.rope.scaling, RopeScaling::Default | RopeScaling::Llama3 { .. }) {
        return Err(Error::Unsupported(format!(
            "TensorRT-LLM export of {} with {} RoPE scaling (the converter writes default and llama3 rotary scaling)",
            cfg.architecture,
            cfg.rope.scaling.name()
        )));
    }
    if !fam.biases && (cfg.qkv_bias || cfg.mlp_bias) {
        return Err(Error::Unsupported(format!(
            "TensorRT-LLM export of {} with linear biases (TensorRT-LLM's model of it has none)",
            cfg.architecture
        )));
    }
    Ok((fam, act))
}

/// Refuses a TP/PP split the model's dimensions do not allow. KV heads: `tp` must divide them
/// or be a multiple of them (then they are duplicated, §4.5); the vocabulary is padded.
pub fn check_split(cfg: &ModelConfig, tp: usize, pp: usize) -> Result<()> {
    if tp == 0 || pp == 0 {
        return Err(Error::Usage("--tp and --pp must be at least 1".into()));
    }
    let kv = cfg.num_key_value_heads;
    if kv % tp != 0 && tp % kv != 0 {
        return Err(Error::Usage(format!(
            "--tp {tp} neither divides nor is a multiple of num_key_value_heads = {kv}"
        )));
    }
    // An MoE model's MLPs are its experts (Qwen3-MoE: moe_intermediate_size).
    let (inter_key, inter) = match &cfg.moe {
        Some(m) => ("the experts' intermediate size", m.intermediate_size),
        None => ("intermediate_size", cfg.intermediate_size),
    };
    for (what, n, by, flag) in [
        ("num_attention_heads", cfg.num_attention_heads, tp, "--tp"),
        (inter_key, inter, tp, "--tp"),
        ("num_hidden_layers", cfg.num_hidden_layers, pp, "--pp"),
    ] {
        if n % by != 0 {
            return Err(Error::Usage(format!("{flag} {by} does not divide {what} = {n}")));
        }
    }
    Ok(())
}

/// A norm as TensorRT-LLM wants it: Gemma's offset norms as `1 + w`, computed in f32 and cast
/// to the model dtype (ModelOpt `build_layernorm_config`, `_weights_plus_one`).
fn trt_norm(t: &TensorView, offset: bool) -> Result<Tn> {
    if !offset {
        return Ok(Tn::from_view(t));
    }
    let v: Vec<f32> = t.to_f32()?.iter().map(|w| w + 1.0).collect();
    Ok(encode(&v, t.dtype))
}

/// Converts `unified` (rq-min's unified-HF export of `original`; None = export `original`
/// unquantized) into a TensorRT-LLM checkpoint in `out`, via a staging folder.
pub fn convert(original: &Path, unified: Option<&Path>, out: &Path, o: &TrtllmOptions) -> Result<()> {
    let cfg = ModelConfig::from_dir(original)?;
    let (fam, hidden_act) = check_model(&cfg)?;
    check_split(&cfg, o.tp, o.pp)?;
    let orig = Checkpoint::open(original)?;
    let uni = Checkpoint::open(unified.unwrap_or(original))?;
    let quant = match unified {
        Some(u) => Quant::read(u)?,
        None => Quant::default(),
    };
    let dtype = orig.tensor("model.embed_tokens.weight")?.dtype;
    let (tp, pp) = (o.tp, o.pp);
    let world = tp * pp;
    let per_pp = cfg.num_hidden_layers / pp;
    // KV heads repeated so that every rank holds one when tp > num_key_value_heads (§4.5).
    let kv_reps = if tp > cfg.num_key_value_heads { tp / cfg.num_key_value_heads } else { 1 };
    let mut ranks: Vec<Vec<(String, Tn)>> = vec![Vec::new(); world];
    let mut excluded: Vec<String> = Vec::new();
    // MIXED_PRECISION: TRT-LLM module (local layer index) -> format.
    let mut layer_formats: Vec<(String, QFormat)> = Vec::new();
    let mut formats_used: Vec<QFormat> = Vec::new();
    const QKV_KINDS: [LinearKind; 3] = [LinearKind::Q, LinearKind::K, LinearKind::V];
    // q, k and v as modules of their own (None: Phi3's fused qkv_proj).
    let separate_qkv: Option<Vec<&str>> =
        QKV_KINDS.iter().map(|k| cfg.modules.iter().find(|m| m.kinds == [*k]).map(|m| m.name)).collect();

    for l in 0..cfg.num_hidden_layers {
        crate::io::signal::check()?;
        let (pp_rank, local) = (l / per_pp, l % per_pp);
        let hf = format!("model.layers.{l}");
        let trt = format!("transformer.layers.{local}");
        let moe = cfg.moe_layer(l);
        let mut lins = LayerLinears::load(&uni, &quant, &cfg, l, moe.is_some())?;
        let experts = moe.map(|m| Experts::load((&uni, &orig), &quant, &cfg, m, l)).transpose()?;
        if let Some(x) = &experts {
            // The router is never quantized (§4.2: exclude_modules names it).
            excluded.push(format!("{trt}.mlp.router"));
            for name in ["mlp.fc", "mlp.proj"] {
                match x.format {
                    Some(f) => note_format(&mut formats_used, &mut layer_formats, format!("{trt}.{name}"), f, pp)?,
                    None => excluded.push(format!("{trt}.{name}")),
                }
            }
        }
        let mut norms = Vec::new();
        for (from, to) in [("input_layernorm", "input_layernorm"), ("post_attention_layernorm", "post_layernorm")] {
            let w = trt_norm(&orig.tensor(&format!("{hf}.{from}.weight"))?, cfg.norm_offset)?;
            norms.push((format!("{trt}.{to}.weight"), w));
            if cfg.layer_norm {
                norms.push((format!("{trt}.{to}.bias"), Tn::from_view(&orig.tensor(&format!("{hf}.{from}.bias"))?)));
            }
        }
        for t in fam.linears {
            // Linears reading one norm's output share a format: TRT-LLM fuses them.
            let group: Vec<LinearKind> = match t.norm {
                Some(n) => fam.linears.iter().filter(|u| u.norm == Some(n)).flat_map(|u| u.kinds.iter().copied()).collect(),
                None => t.kinds.to_vec(),
            };
            let formats = group.iter().map(|&k| Ok(lins.get(k)?.format)).collect::<Result<Vec<_>>>()?;
            let f = formats[0];
            if formats.iter().any(|&g| g != f) {
                let names: Vec<&str> = formats.iter().map(|g| g.map_or("none", QFormat::cli_name)).collect();
                return Err(Error::Unsupported(format!(
                    "{hf}: linears sharing an input in different formats ({}); TensorRT-LLM fuses them",
                    names.join(", ")
                )));
            }
            let Some(f) = f else {
                excluded.push(format!("{trt}.{}", t.name));
                continue;
            };
            note_format(&mut formats_used, &mut layer_formats, format!("{trt}.{}", t.name), f, pp)?;
            if !f.awq() || lins.get(t.kinds[0])?.lin.pqs.is_some() {
                continue;
            }
            // The legacy path has no layernorm folding: every AWQ linear carries its
            // prequant_scaling_factor, recovered from the norm rq-min's unified export folded
            // it into; ones for dense / proj.
            let p = match t.norm {
                Some(norm) => encode(&folded_scale(&uni, &orig, &format!("{hf}.{norm}"), cfg.norm_offset)?, dtype),
                None => encode(&vec![1.0; t.kinds[0].shape(&cfg)[1]], dtype),
            };
            for &k in t.kinds {
                lins.get_mut(k)?.lin.pqs = Some(p.clone());
            }
        }
        // FP8 qkv: one scale (max) and the weight re-quantized from the original (§4.4). A
        // fused qkv_proj has one quantizer: its one scale and codes stay.
        if let (Some(QFormat::Fp8), Some(names)) = (lins.get(LinearKind::Q)?.format, &separate_qkv) {
            let mut scales = Vec::new();
            for k in QKV_KINDS {
                let x = lins.get(k)?;
                scales.push(x.lin.ws.clone().ok_or_else(|| Error::tensor(&x.module, "FP8 linear without weight_scale"))?);
            }
            let ws = max_scalar(&scales.iter().collect::<Vec<_>>());
            for (&k, name) in QKV_KINDS.iter().zip(names) {
                let w = orig.tensor(&format!("{hf}.{name}.weight"))?.to_f32()?;
                let x = &mut lins.get_mut(k)?.lin;
                x.w.data = fp8::quantize(&w, ws.value(), dtype);
                x.ws = Some(ws.clone());
            }
        }
        if kv_reps > 1 {
            for k in [LinearKind::K, LinearKind::V] {
                let x = &mut lins.get_mut(k)?.lin;
                *x = x.dup_heads(cfg.num_key_value_heads, kv_reps);
            }
        }
        let qk_norms = match cfg.qk_norm {
            true => Some([
                Tn::from_view(&orig.tensor(&format!("{hf}.self_attn.q_norm.weight"))?),
                Tn::from_view(&orig.tensor(&format!("{hf}.self_attn.k_norm.weight"))?),
            ]),
            false => None,
        };
        let k = uni.get(&format!("{hf}.self_attn.k_proj.k_scale"));
        let v = uni.get(&format!("{hf}.self_attn.v_proj.v_scale"));
        let kv = match (k, v) {
            // FP8 KV factors clamped to >= 1 on this path (§4.4).
            (Some(k), Some(v)) => Some((k.to_f32()?[0].max(1.0), v.to_f32()?[0].max(1.0))),
            _ => None,
        };
        for tp_rank in 0..tp {
            let out = &mut ranks[tp_rank + pp_rank * tp];
            out.extend(norms.iter().cloned());
            for t in fam.linears {
                // Each member's column slice (or input slice for row-parallel), stacked.
                let mut parts = Vec::new();
                for &k in t.kinds {
                    let x = lins.get(k)?;
                    parts.push(if t.row { x.lin.row(&x.module, tp, tp_rank)? } else { x.lin.column(&x.module, tp, tp_rank)? });
                }
                Lin::merge(&parts).emit(&format!("{trt}.{}", t.name), out);
            }
            if let Some(x) = &experts {
                out.push((format!("{trt}.mlp.router.weight"), x.router.clone()));
                let (fc, proj) = x.rank(tp, tp_rank)?;
                fc.emit(&format!("{trt}.mlp.fc"), out);
                proj.emit(&format!("{trt}.mlp.proj"), out);
            }
            if let Some([q, k]) = &qk_norms {
                // Qwen3's per-head q/k RMSNorm (TRT-LLM qwen convert: attention.{q,k}_layernorm).
                out.push((format!("{trt}.attention.q_layernorm.weight"), q.clone()));
                out.push((format!("{trt}.attention.k_layernorm.weight"), k.clone()));
            }
            if let Some((k, v)) = kv {
                out.push((format!("{trt}.attention.k_cache_scaling_factor"), Tn::scalar(k)));
                out.push((format!("{trt}.attention.v_cache_scaling_factor"), Tn::scalar(v)));
                out.push((format!("{trt}.attention.kv_cache_scaling_factor"), Tn::scalar(k.max(v))));
            }
        }
    }

    // The embedding: unscaled also for Gemma (ModelOpt pre-multiplies by sqrt(hidden) only for
    // TensorRT-LLM 0.8/0.9; later versions scale in the model).
    let mut embed = Tn::from_view(&orig.tensor("model.embed_tokens.weight")?);
    // Gemma's table is always shared (TRT-LLM GemmaConfig); ModelOpt then writes no lm_head
    // and sets share_embedding_table on a single pipeline rank (§4.2).
    let share = fam.shared_table && pp == 1;
    let mut lm_head = match uni.get("lm_head.weight") {
        _ if share => None,
        Some(v) if matches!(v.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) => Some(Tn::from_view(&v)),
        Some(_) => return Err(Error::Unsupported("TensorRT-LLM export of a quantized lm_head".into())),
        None if cfg.tie_word_embeddings => Some(embed.clone()),
        None => return Err(Error::tensor("lm_head.weight", "missing and tie_word_embeddings is false")),
    };
    // Vocabulary padding with zero rows: AWQ exports to a multiple of 64 (config vocab_size
    // follows, ModelOpt `pad_embedding_lm_head`), then to a multiple of tp for the split
    // (ModelOpt `pad_weights`; vocab_size unchanged, TRT-LLM pads it the same way).
    let mut vocab = cfg.vocab_size;
    if formats_used.iter().any(|f| matches!(f, QFormat::Int4Awq | QFormat::W4a8Awq)) && vocab % 64 != 0 {
        vocab = vocab.div_ceil(64) * 64;
    }
    let rows = vocab.div_ceil(tp) * tp;
    embed = embed.pad_rows(rows);
    lm_head = lm_head.map(|t| t.pad_rows(rows));
    let ln_f_weight = trt_norm(&orig.tensor("model.norm.weight")?, cfg.norm_offset)?;
    let mut ln_f = vec![("transformer.ln_f.weight".to_string(), ln_f_weight)];
    if cfg.layer_norm {
        ln_f.push(("transformer.ln_f.bias".into(), Tn::from_view(&orig.tensor("model.norm.bias")?)));
    }
    for tp_rank in 0..tp {
        ranks[tp_rank].push(("transformer.vocab_embedding.weight".into(), embed.split("model.embed_tokens.weight", 0, tp, tp_rank)?));
        let last = &mut ranks[tp_rank + (pp - 1) * tp];
        last.extend(ln_f.iter().cloned());
        if let Some(h) = &lm_head {
            last.push(("lm_head.weight".into(), h.split("lm_head.weight", 0, tp, tp_rank)?));
        }
    }
    excluded.push("lm_head".into());

    let mixed = formats_used.len() > 1;
    let q = QuantSummary {
        format: if mixed { None } else { formats_used.first().copied() },
        mixed,
        kv_fp8: quant.kv_fp8,
        excluded: &excluded,
    };
    let dense_bias = uni.contains("model.layers.0.self_attn.o_proj.bias");
    let config = trtllm_config(&cfg, (fam, hidden_act), dtype, &q, vocab, (share, dense_bias), (tp, pp))?;
    let staging = Staging::new(original, out, o.force)?;
    for (r, tensors) in ranks.iter().enumerate() {
        let list: Vec<(&str, Dtype, &[usize], &[u8])> =
            tensors.iter().map(|(n, t)| (n.as_str(), t.dtype, t.shape.as_slice(), t.data.as_slice())).collect();
        write_file(&staging.tmp.join(format!("rank{r}.safetensors")), &list, &[])?;
    }
    write_json(&staging.tmp.join("config.json"), &config)?;
    if mixed {
        write_json(&staging.tmp.join("quant_cfg.json"), &quant_cfg(&layer_formats, quant.kv_fp8))?;
    }
    staging.commit()
}

/// Records that TensorRT-LLM module `module` (local layer index) is in format `f`: the formats
/// used, and the per-module formats of a MIXED_PRECISION quant_cfg.json, which names modules
/// per pipeline rank, so every rank must agree.
fn note_format(
    used: &mut Vec<QFormat>,
    layers: &mut Vec<(String, QFormat)>,
    module: String,
    f: QFormat,
    pp: usize,
) -> Result<()> {
    if !used.contains(&f) {
        used.push(f);
    }
    match layers.iter().find(|(m, _)| *m == module) {
        Some((_, g)) if *g != f => Err(Error::Unsupported(format!(
            "mixed precision with --pp {pp}: {module} has different formats on different pipeline ranks \
             (quant_cfg.json names layers per rank)"
        ))),
        Some(_) => Ok(()),
        None => {
            layers.push((module, f));
            Ok(())
        }
    }
}

fn write_json(p: &Path, j: &Json) -> Result<()> {
    std::fs::write(p, j.to_pretty(4)).map_err(|e| Error::io(p, e))
}

/// The checkpoint's quantization as config.json describes it.
struct QuantSummary<'a> {
    /// The uniform format (None: unquantized or mixed).
    format: Option<QFormat>,
    mixed: bool,
    kv_fp8: bool,
    excluded: &'a [String],
}

/// quant_cfg.json of a MIXED_PRECISION checkpoint (ModelOpt `process_layer_quant_config`):
/// quant_algo, kv_cache_quant_algo and `quantized_layers` keyed by TensorRT-LLM module name
/// with the format's keys; excluded modules are simply absent.
fn quant_cfg(layers: &[(String, QFormat)], kv_fp8: bool) -> Json {
    let entries = layers
        .iter()
        .map(|(m, f)| {
            let mut j = obj([("quant_algo", str(f.quant_algo()))]);
            crate::export::unified::format_keys(*f, &mut j);
            (m.clone(), j)
        })
        .collect();
    obj([
        ("quant_algo", str("MIXED_PRECISION")),
        ("kv_cache_quant_algo", if kv_fp8 { str("FP8") } else { Json::Null }),
        ("quantized_layers", Json::Obj(entries)),
    ])
}

/// NeMo's `.qnemo` (spec/export-formats.md §5): the TensorRT-LLM checkpoint folder `ckpt`
/// plus the tokenizer of `original`, as a gzip tarball at `out` (`tar "w:gz"`, arcname "./").
///
/// The tokenizer artifacts NeMo writes are unverified beyond `tokenizer_config.yaml` and
/// `tokenizer.model`; rq-min's choice: the model folder's tokenizer files at the top level and
/// a `tokenizer_config.yaml` that NeMo's `get_nmt_tokenizer` reads: `library: sentencepiece`
/// with `model: tokenizer.model` when the folder has one (NeMo resolves it against the
/// checkpoint), else `library: huggingface` with `type: .` (AutoTokenizer on the extracted
/// folder, resolved against the working directory).
pub fn write_qnemo(original: &Path, ckpt: &Path, out: &crate::io::tmp::Target) -> Result<()> {
    let mut copied = Vec::new();
    for f in TOKENIZER_FILES {
        let src = original.join(f);
        if src.exists() {
            let dst = ckpt.join(f);
            crate::io::copy_file(&src, &dst)?;
            copied.push(*f);
        }
    }
    let yaml = if copied.contains(&"tokenizer.model") {
        "library: sentencepiece\nmodel: tokenizer.model\ntype: null\nvocab_file: null\nmerge_file: null\n"
    } else if copied.contains(&"tokenizer.json") {
        "library: huggingface\ntype: .\nuse_fast: true\n"
    } else {
        ""
    };
    if !yaml.is_empty() {
        let p = ckpt.join("tokenizer_config.yaml");
        std::fs::write(&p, yaml).map_err(|e| Error::io(&p, e))?;
    }
    crate::io::tar_gz::write_tar_gz(ckpt, out)
}

/// config.json, the manual-path keys of spec/export-formats.md §4.2, plus the keys TRT-LLM's
/// family configs read (`QWenConfig`: qwen_type, attn_bias, mlp_bias; `GemmaConfig`: attn_bias,
/// mlp_bias; `GPTConfig`: gpt_variant, with `bias` and `rotary_pct` of the manual path;
/// Mistral: sliding_window). Mixed precision keeps only quant_algo and kv_cache_quant_algo here
/// (the per-layer part is quant_cfg.json).
fn trtllm_config(
    cfg: &ModelConfig,
    (fam, hidden_act): (&TrtFamily, &str),
    dtype: Dtype,
    q: &QuantSummary,
    vocab_size: usize,
    (share_embedding_table, dense_bias): (bool, bool),
    (tp, pp): (usize, usize),
) -> Result<Json> {
    let int = |n: usize| Json::Int(n as i64);
    // An MoE family's MLPs are its experts (TRT-LLM sizes them by intermediate_size).
    let moe = cfg.moe.as_ref().filter(|_| fam.moe);
    let algo = match (q.mixed, q.format) {
        (true, _) => str("MIXED_PRECISION"),
        (false, f) => f.map_or(Json::Null, |f| str(f.quant_algo())),
    };
    let mut quant = obj([("quant_algo", algo), ("kv_cache_quant_algo", if q.kv_fp8 { str("FP8") } else { Json::Null })]);
    if let (false, Some(f)) = (q.mixed, q.format) {
        crate::export::unified::format_keys(f, &mut quant);
        quant.set("exclude_modules", Json::Arr(q.excluded.iter().map(|s| str(s)).collect()));
    }
    let mut c = obj([
        ("producer", obj([("name", str("rq-min")), ("version", str(env!("CARGO_PKG_VERSION")))])),
        ("architecture", str(&cfg.architecture)),
        ("dtype", str(dtype_name(dtype)?)),
        ("logits_dtype", str("float32")),
        ("num_hidden_layers", int(cfg.num_hidden_layers)),
        ("num_attention_heads", int(cfg.num_attention_heads)),
        ("num_key_value_heads", int(cfg.num_key_value_heads)),
        ("hidden_size", int(cfg.hidden_size)),
        ("norm_epsilon", Json::Float(cfg.rms_norm_eps as f64)),
        ("vocab_size", int(vocab_size)),
        ("max_position_embeddings", int(cfg.max_position_embeddings)),
        ("hidden_act", str(hidden_act)),
        ("use_parallel_embedding", Json::Bool(true)),
        ("embedding_sharding_dim", int(0)),
        ("head_size", int(cfg.head_dim)),
        ("intermediate_size", int(moe.map_or(cfg.intermediate_size, |m| m.intermediate_size))),
        ("position_embedding_type", str("rope_gpt_neox")),
        ("share_embedding_table", Json::Bool(share_embedding_table)),
        ("bias", Json::Bool(dense_bias)),
        ("rotary_pct", Json::Float(cfg.rotary_dim as f64 / cfg.head_dim as f64)),
        ("rmsnorm", Json::Bool(!cfg.layer_norm)),
        ("lm_head_bias", Json::Bool(false)),
        ("rotary_base", Json::Float(cfg.rope.theta)),
    ]);
    if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } = cfg.rope.scaling {
        c.set(
            "rotary_scaling",
            obj([
                ("type", str("llama3")),
                ("factor", Json::Float(factor)),
                ("low_freq_factor", Json::Float(low_freq_factor)),
                ("high_freq_factor", Json::Float(high_freq_factor)),
                ("original_max_position_embeddings", int(original_max_position_embeddings)),
            ]),
        );
    }
    if let Some(w) = cfg.sliding_window {
        c.set("sliding_window", int(w));
    }
    match fam.keys {
        Keys::None => {}
        Keys::Qwen | Keys::Gemma => {
            if fam.keys == Keys::Qwen {
                c.set("qwen_type", str(&cfg.model_type));
            }
            c.set("attn_bias", Json::Bool(cfg.qkv_bias));
            c.set("mlp_bias", Json::Bool(false));
        }
        Keys::Gpt(variant) => c.set("gpt_variant", str(variant)),
    }
    let mut mapping = obj([("world_size", int(tp * pp)), ("tp_size", int(tp)), ("pp_size", int(pp))]);
    if let Some(m) = moe {
        // TRT-LLM MoeConfig.ExpertScaleNormalizationMode: 1 RENORMALIZE, 0 NONE (module doc).
        let mode = if m.norm_topk_prob { 1 } else { 0 };
        let moe = obj([("num_experts", int(m.num_experts)), ("top_k", int(m.top_k)), ("normalization_mode", int(mode))]);
        c.set("moe", moe);
        // Experts split like the dense MLP (ModelOpt: moe_tp_size = tp_size, moe_ep_size = 1).
        mapping.set("moe_tp_size", int(tp));
        mapping.set("moe_ep_size", int(1));
    }
    c.set("mapping", mapping);
    c.set("quantization", quant);
    Ok(c)
}
