//! The legacy TensorRT-LLM checkpoint (ModelOpt's `export_tensorrt_llm_checkpoint`,
//! spec/export-formats.md §4): `config.json` plus `rank{r}.safetensors` for r < tp·pp, made
//! from a unified-HF checkpoint written by rq-min and the original model folder.
//!
//! Families: Llama, Mistral, Qwen2 (q/k/v biases -> `attention.qkv.bias`), Qwen3 (q/k norms ->
//! `attention.{q,k}_layernorm`), Gemma (norms written as `1 + w`, embedding unscaled, shared
//! table). Formats FP8, NVFP4, INT8 SmoothQuant, INT4 AWQ, W4A8 AWQ, none (unquantized), and
//! MIXED_PRECISION of those (auto-quantize / --layer-formats: `quant_cfg.json`). NVFP4_AWQ is
//! refused: TensorRT-LLM's QuantAlgo has no such algorithm.
//!
//! Notes on the values (§4.4):
//! - FP8 qkv: one weights_scaling_factor / activation_scaling_factor (max over q, k, v); the
//!   concatenated weight is re-quantized from the ORIGINAL weights with that scale, as
//!   ModelOpt does. Every other FP8 linear keeps the unified export's codes.
//! - AWQ: this path has no layernorm folding, so every AWQ linear carries
//!   `prequant_scaling_factor`. rq-min's unified export folded the shared q/k/v (gate/up)
//!   scale into the norm; it is recovered as `exported_norm / original_norm` per channel and
//!   the ORIGINAL norm is written. This is exact up to the model-dtype rounding of the folded
//!   norm (for bf16 models: a relative error of at most 2^-9 per channel; exact for f32).
//! - TP: KV heads are duplicated when tp > num_key_value_heads, the vocabulary is padded with
//!   zero rows to a multiple of tp (AWQ: first to a multiple of 64), §4.4/§4.5.
//! - Layer indices are local to a pipeline rank (rank p holds `transformer.layers.0..L/pp`),
//!   as ModelOpt's per-rank configs and TRT-LLM's loaders number them.

use crate::config::{Activation, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::export::{Staging, TOKENIZER_FILES};
use crate::json::{obj, str, Json};
use crate::model::LinearKind;
use crate::quant::read::{detect, Stored};
use crate::quant::{fp8, QFormat};
use crate::safetensors::{write_file, Checkpoint, Dtype, TensorView};
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
pub struct Tn {
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
    pub fn split(&self, name: &str, dim: usize, tp: usize, r: usize) -> Result<Tn> {
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
        let size = self.dtype.size();
        let c = n / tp;
        let mut shape = self.shape.clone();
        shape[dim] = c;
        let data = if dim == 0 {
            let row: usize = self.shape[1..].iter().product::<usize>() * size;
            self.data[r * c * row..(r + 1) * c * row].to_vec()
        } else {
            let cols = self.shape[1] * size;
            self.data.chunks_exact(cols).flat_map(|row| row[r * c * size..(r + 1) * c * size].iter().copied()).collect()
        };
        Ok(Tn { dtype: self.dtype, shape, data })
    }
}

/// Concatenation along dim 0.
pub fn cat0(parts: &[Tn]) -> Tn {
    let mut shape = parts[0].shape.clone();
    shape[0] = parts.iter().map(|p| p.shape[0]).sum();
    Tn { dtype: parts[0].dtype, shape, data: parts.iter().flat_map(|p| p.data.iter().copied()).collect() }
}

/// Concatenation along dim 1 of 2-D tensors.
pub fn cat1(parts: &[Tn]) -> Tn {
    let rows = parts[0].shape[0];
    let size = parts[0].dtype.size();
    let mut data = Vec::new();
    for r in 0..rows {
        for p in parts {
            let w = p.shape[1] * size;
            data.extend_from_slice(&p.data[r * w..(r + 1) * w]);
        }
    }
    Tn { dtype: parts[0].dtype, shape: vec![rows, parts.iter().map(|p| p.shape[1]).sum()], data }
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

fn encode(values: &[f32], dtype: Dtype) -> Tn {
    Tn { dtype, shape: vec![values.len()], data: crate::quantize::encode(values, dtype) }
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

/// The families this converter writes (TRT-LLM maps Mistral to its Llama model and Qwen2/Qwen3
/// to `QWenForCausalLM`).
pub const TRTLLM_ARCHITECTURES: [&str; 5] =
    ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM"];

/// Refuses a model family the converter does not handle.
pub fn check_model(cfg: &ModelConfig) -> Result<()> {
    if !TRTLLM_ARCHITECTURES.contains(&cfg.architecture.as_str()) {
        return Err(Error::Unsupported(format!(
            "TensorRT-LLM export of {} (supported: {})",
            cfg.architecture,
            TRTLLM_ARCHITECTURES.join(", ")
        )));
    }
    Ok(())
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
    for (what, n, by, flag) in [
        ("num_attention_heads", cfg.num_attention_heads, tp, "--tp"),
        ("intermediate_size", cfg.intermediate_size, tp, "--tp"),
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
    check_model(&cfg)?;
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

    for l in 0..cfg.num_hidden_layers {
        let (pp_rank, local) = (l / per_pp, l % per_pp);
        let hf = format!("model.layers.{l}");
        let trt = format!("transformer.layers.{local}");
        let mut lins = Vec::new();
        for kind in LinearKind::ALL {
            let module = format!("{hf}.{}", kind.module());
            let (s, mut lin) = load_lin(&uni, &module, kind.shape(&cfg))?;
            lin.bias = uni.get(&format!("{module}.bias")).map(|b| Tn::from_view(&b));
            lins.push((quant.of(&module, s)?, lin));
        }
        let norms = [
            trt_norm(&orig.tensor(&format!("{hf}.input_layernorm.weight"))?, cfg.norm_offset)?,
            trt_norm(&orig.tensor(&format!("{hf}.post_attention_layernorm.weight"))?, cfg.norm_offset)?,
        ];
        // TRT-LLM modules: their HF members (sharing an input) and the norm AWQ folded into.
        let groups: [(&[usize], &str, Option<&str>); 5] = [
            (&[0, 1, 2], "attention.qkv", Some("input_layernorm")),
            (&[3], "attention.dense", None),
            (&[4], "mlp.fc", Some("post_attention_layernorm")),
            (&[5], "mlp.gate", Some("post_attention_layernorm")),
            (&[6], "mlp.proj", None),
        ];
        for (members, name, norm) in groups {
            let f = lins[members[0]].0;
            if members.iter().any(|&i| lins[i].0 != f) || (name == "mlp.fc" && lins[5].0 != f) {
                return Err(Error::Unsupported(format!(
                    "{hf}: linears sharing an input in different formats ({}); TensorRT-LLM fuses them",
                    members.iter().map(|&i| lins[i].0.map_or("none", QFormat::cli_name)).collect::<Vec<_>>().join(", ")
                )));
            }
            let Some(f) = f else {
                excluded.push(format!("{trt}.{name}"));
                continue;
            };
            if !formats_used.contains(&f) {
                formats_used.push(f);
            }
            let module = format!("{trt}.{name}");
            match layer_formats.iter().find(|(m, _)| *m == module) {
                Some((_, g)) if *g != f => {
                    return Err(Error::Unsupported(format!(
                        "mixed precision with --pp {pp}: {module} has different formats on different pipeline ranks \
                         (quant_cfg.json names layers per rank)"
                    )))
                }
                Some(_) => {}
                None => layer_formats.push((module, f)),
            }
            if !f.awq() || lins[members[0]].1.pqs.is_some() {
                continue;
            }
            // The legacy path has no layernorm folding: every AWQ linear carries its
            // prequant_scaling_factor. Recovered from the folded norm as exported / original
            // (offset norms: (1 + exported) / (1 + original)); ones for dense / proj.
            let p: Vec<f32> = match norm {
                Some(norm) => {
                    let exported = uni.tensor(&format!("{hf}.{norm}.weight"))?.to_f32()?;
                    let original = orig.tensor(&format!("{hf}.{norm}.weight"))?.to_f32()?;
                    let off = if cfg.norm_offset { 1.0 } else { 0.0 };
                    exported.iter().zip(&original).map(|(e, o)| if o + off == 0.0 { 1.0 } else { (e + off) / (o + off) }).collect()
                }
                None => vec![1.0; LinearKind::ALL[members[0]].shape(&cfg)[1]],
            };
            for &i in members {
                lins[i].1.pqs = Some(encode(&p, dtype));
            }
        }
        // FP8 qkv: one scale (max) and the weight re-quantized from the original.
        if lins[0].0 == Some(QFormat::Fp8) {
            let ws = max_scalar(&[0, 1, 2].map(|i| lins[i].1.ws.as_ref().expect("fp8 weight_scale")));
            for i in 0..3 {
                let w = orig.tensor(&format!("{hf}.{}.weight", LinearKind::ALL[i].module()))?.to_f32()?;
                lins[i].1.w.data = fp8::quantize(&w, ws.value(), dtype);
                lins[i].1.ws = Some(ws.clone());
            }
        }
        if kv_reps > 1 {
            for i in [1, 2] {
                lins[i].1 = lins[i].1.dup_heads(cfg.num_key_value_heads, kv_reps);
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
            out.push((format!("{trt}.input_layernorm.weight"), norms[0].clone()));
            out.push((format!("{trt}.post_layernorm.weight"), norms[1].clone()));
            let col = |i: usize| lins[i].1.column(&format!("{hf}.{}", LinearKind::ALL[i].module()), tp, tp_rank);
            Lin::merge(&[col(0)?, col(1)?, col(2)?]).emit(&format!("{trt}.attention.qkv"), out);
            let row = |i: usize| lins[i].1.row(&format!("{hf}.{}", LinearKind::ALL[i].module()), tp, tp_rank);
            row(3)?.emit(&format!("{trt}.attention.dense"), out);
            col(4)?.emit(&format!("{trt}.mlp.fc"), out);
            col(5)?.emit(&format!("{trt}.mlp.gate"), out);
            row(6)?.emit(&format!("{trt}.mlp.proj"), out);
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
    let share = cfg.norm_offset && pp == 1;
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
    let ln_f = trt_norm(&orig.tensor("model.norm.weight")?, cfg.norm_offset)?;
    for tp_rank in 0..tp {
        ranks[tp_rank].push(("transformer.vocab_embedding.weight".into(), embed.split("model.embed_tokens.weight", 0, tp, tp_rank)?));
        let last = &mut ranks[tp_rank + (pp - 1) * tp];
        last.push(("transformer.ln_f.weight".into(), ln_f.clone()));
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
    let config = trtllm_config(&cfg, dtype, &q, vocab, (share, dense_bias), tp, pp)?;
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
            crate::export::format_keys(*f, &mut j);
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
pub fn write_qnemo(original: &Path, ckpt: &Path, out: &Path) -> Result<()> {
    let mut copied = Vec::new();
    for f in TOKENIZER_FILES {
        let src = original.join(f);
        if src.exists() {
            let dst = ckpt.join(f);
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
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
    crate::tar_gz::write_tar_gz(ckpt, out)
}

/// config.json, the manual-path keys of spec/export-formats.md §4.2, plus the keys TRT-LLM's
/// family configs read (`QWenConfig`: qwen_type, attn_bias, mlp_bias; `GemmaConfig`: attn_bias,
/// mlp_bias; Mistral: sliding_window). Mixed precision keeps only quant_algo and
/// kv_cache_quant_algo here (the per-layer part is quant_cfg.json).
fn trtllm_config(
    cfg: &ModelConfig,
    dtype: Dtype,
    q: &QuantSummary,
    vocab_size: usize,
    (share_embedding_table, dense_bias): (bool, bool),
    tp: usize,
    pp: usize,
) -> Result<Json> {
    let int = |n: usize| Json::Int(n as i64);
    let algo = match (q.mixed, q.format) {
        (true, _) => str("MIXED_PRECISION"),
        (false, f) => f.map_or(Json::Null, |f| str(f.quant_algo())),
    };
    let mut quant = obj([("quant_algo", algo), ("kv_cache_quant_algo", if q.kv_fp8 { str("FP8") } else { Json::Null })]);
    if let (false, Some(f)) = (q.mixed, q.format) {
        crate::export::format_keys(f, &mut quant);
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
        // TRT-LLM's "gelu" is the tanh approximation (gelu_pytorch_tanh).
        ("hidden_act", str(if cfg.act == Activation::Silu { "silu" } else { "gelu" })),
        ("use_parallel_embedding", Json::Bool(true)),
        ("embedding_sharding_dim", int(0)),
        ("head_size", int(cfg.head_dim)),
        ("intermediate_size", int(cfg.intermediate_size)),
        ("position_embedding_type", str("rope_gpt_neox")),
        ("share_embedding_table", Json::Bool(share_embedding_table)),
        ("bias", Json::Bool(dense_bias)),
        ("rmsnorm", Json::Bool(true)),
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
    if cfg.qk_norm || cfg.model_type == "qwen2" {
        c.set("qwen_type", str(&cfg.model_type));
    }
    if cfg.qk_norm || cfg.model_type == "qwen2" || cfg.norm_offset {
        c.set("attn_bias", Json::Bool(cfg.qkv_bias));
        c.set("mlp_bias", Json::Bool(false));
    }
    c.set("mapping", obj([("world_size", int(tp * pp)), ("tp_size", int(tp)), ("pp_size", int(pp))]));
    c.set("quantization", quant);
    Ok(c)
}
