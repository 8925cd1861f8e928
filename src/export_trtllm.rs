//! The legacy TensorRT-LLM checkpoint (ModelOpt's `export_tensorrt_llm_checkpoint`,
//! spec/export-formats.md §4): `config.json` plus `rank{r}.safetensors` for r < tp·pp, made
//! from a unified-HF checkpoint written by rq-min and the original model folder.
//!
//! Llama-family models only (no q/k/v biases, q/k norms, (1+w) norms or embedding scale);
//! formats FP8, NVFP4, INT8 SmoothQuant, INT4 AWQ, W4A8 AWQ, and none (unquantized).
//! Mixed precision (auto-quantize, --layer-formats, NVFP4_AWQ) is refused.
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
//! - Layer indices are local to a pipeline rank (rank p holds `transformer.layers.0..L/pp`),
//!   as ModelOpt's per-rank configs and TRT-LLM's loaders number them.

use crate::config::{Activation, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::export::Staging;
use crate::json::{obj, str, Json};
use crate::model::LinearKind;
use crate::quant::read::{detect, Stored};
use crate::quant::{fp8, QFormat};
use crate::safetensors::{write_file, Checkpoint, Dtype, TensorView};
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
}

impl Lin {
    fn column(&self, name: &str, tp: usize, r: usize) -> Result<Lin> {
        let ws = match &self.ws {
            Some(t) if t.numel() > 1 => Some(t.split(name, 0, tp, r)?),
            other => other.clone(),
        };
        Ok(Lin { w: self.w.split(name, 0, tp, r)?, ws, ws2: self.ws2.clone(), act: self.act.clone(), pqs: self.pqs.clone() })
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
        Ok(Lin { w: self.w.split(name, 1, tp, r)?, ws, ws2: self.ws2.clone(), act: self.act.clone(), pqs })
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
        }
    }
    fn emit(self, prefix: &str, out: &mut Vec<(String, Tn)>) {
        out.push((format!("{prefix}.weight"), self.w));
        for (suffix, t) in [
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
    Ok((stored, Lin { w, ws, ws2: opt("weight_scale_2"), act: opt("input_scale"), pqs: opt("pre_quant_scale") }))
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

/// The format of a unified checkpoint from its hf_quant_config.json (None: unquantized).
fn unified_format(dir: &Path) -> Result<(Option<QFormat>, bool)> {
    let p = dir.join("hf_quant_config.json");
    if !p.exists() {
        return Ok((None, false));
    }
    let j = Json::parse_file(&p)?;
    let q = j.get("quantization").ok_or_else(|| Error::config(&p, "no \"quantization\" object"))?;
    let kv = q.get("kv_cache_quant_algo").and_then(Json::as_str) == Some("FP8");
    let algo = match q.get("quant_algo").and_then(Json::as_str) {
        None => return Ok((None, kv)),
        Some(a) => a,
    };
    let f = QFormat::ALL.into_iter().find(|f| f.quant_algo() == algo);
    match f {
        Some(f @ (QFormat::Fp8 | QFormat::Nvfp4 | QFormat::Int8Sq | QFormat::Int4Awq | QFormat::W4a8Awq)) => Ok((Some(f), kv)),
        _ => Err(Error::Unsupported(format!(
            "TensorRT-LLM export of quant_algo {algo} (supported: FP8, NVFP4, W8A8_SQ_PER_CHANNEL, W4A16_AWQ, W4A8_AWQ; mixed precision is not supported)"
        ))),
    }
}

fn check_model(cfg: &ModelConfig) -> Result<()> {
    if !matches!(cfg.architecture.as_str(), "LlamaForCausalLM" | "MistralForCausalLM")
        || cfg.qkv_bias
        || cfg.qk_norm
        || cfg.norm_offset
        || cfg.embed_scale.is_some()
        || cfg.act != Activation::Silu
    {
        return Err(Error::Unsupported(format!(
            "TensorRT-LLM export supports Llama-family models only (got {})",
            cfg.architecture
        )));
    }
    Ok(())
}

fn check_split(cfg: &ModelConfig, tp: usize, pp: usize) -> Result<()> {
    if tp == 0 || pp == 0 {
        return Err(Error::Usage("--tp and --pp must be at least 1".into()));
    }
    for (what, n, by, flag) in [
        ("num_attention_heads", cfg.num_attention_heads, tp, "--tp"),
        ("num_key_value_heads", cfg.num_key_value_heads, tp, "--tp"),
        ("intermediate_size", cfg.intermediate_size, tp, "--tp"),
        ("vocab_size", cfg.vocab_size, tp, "--tp"),
        ("num_hidden_layers", cfg.num_hidden_layers, pp, "--pp"),
    ] {
        if n % by != 0 {
            return Err(Error::Usage(format!("{flag} {by} does not divide {what} = {n}")));
        }
    }
    Ok(())
}

/// Converts `unified` (rq-min's unified-HF export of `original`; None = export `original`
/// unquantized) into a TensorRT-LLM checkpoint in `out`, via a staging folder.
pub fn convert(original: &Path, unified: Option<&Path>, out: &Path, o: &TrtllmOptions) -> Result<()> {
    let cfg = ModelConfig::from_dir(original)?;
    check_model(&cfg)?;
    check_split(&cfg, o.tp, o.pp)?;
    let orig = Checkpoint::open(original)?;
    let uni = match unified {
        Some(u) => Checkpoint::open(u)?,
        None => Checkpoint::open(original)?,
    };
    let (format, _) = match unified {
        Some(u) => unified_format(u)?,
        None => (None, false),
    };
    let dtype = orig.tensor("model.embed_tokens.weight")?.dtype;
    let (tp, pp) = (o.tp, o.pp);
    let world = tp * pp;
    let per_pp = cfg.num_hidden_layers / pp;
    let mut ranks: Vec<Vec<(String, Tn)>> = vec![Vec::new(); world];
    let mut excluded: Vec<String> = Vec::new();
    let mut kv_fp8 = false;
    let mut seen: Option<Stored> = None;

    for l in 0..cfg.num_hidden_layers {
        let (pp_rank, local) = (l / per_pp, l % per_pp);
        let hf = format!("model.layers.{l}");
        let trt = format!("transformer.layers.{local}");
        let mut lins = Vec::new();
        for kind in LinearKind::ALL {
            let (s, lin) = load_lin(&uni, &format!("{hf}.{}", kind.module()), kind.shape(&cfg))?;
            if s != Stored::Plain {
                if seen.is_some_and(|x| x != s) {
                    return Err(Error::Unsupported("TensorRT-LLM export of a mixed-precision checkpoint".into()));
                }
                seen = Some(s);
            }
            lins.push((s, lin));
        }
        let mut norms = Vec::new();
        for name in ["input_layernorm", "post_attention_layernorm"] {
            norms.push(Tn::from_view(&orig.tensor(&format!("{hf}.{name}.weight"))?));
        }
        // Groups sharing an input: all quantized or all plain.
        for (members, norm_name, trt_names) in [
            (&[0usize, 1, 2][..], "input_layernorm", &["attention.qkv"][..]),
            (&[4, 5][..], "post_attention_layernorm", &["mlp.fc", "mlp.gate"][..]),
        ] {
            let plain = members.iter().filter(|&&i| lins[i].0 == Stored::Plain).count();
            if plain != 0 && plain != members.len() {
                return Err(Error::Unsupported(format!("{hf}: siblings sharing an input are partly excluded (mixed precision)")));
            }
            if plain == members.len() {
                excluded.extend(trt_names.iter().map(|n| format!("{trt}.{n}")));
                continue;
            }
            if matches!(format, Some(QFormat::Int4Awq | QFormat::W4a8Awq)) && lins[members[0]].1.pqs.is_none() {
                // Recover the folded pre_quant_scale: exported_norm / original_norm.
                let exported = uni.tensor(&format!("{hf}.{norm_name}.weight"))?.to_f32()?;
                let original = orig.tensor(&format!("{hf}.{norm_name}.weight"))?.to_f32()?;
                let p: Vec<f32> = exported.iter().zip(&original).map(|(e, o)| if *o == 0.0 { 1.0 } else { e / o }).collect();
                for &i in members {
                    lins[i].1.pqs = Some(encode(&p, dtype));
                }
            }
        }
        for (i, name) in [(3usize, "attention.dense"), (6, "mlp.proj")] {
            if lins[i].0 == Stored::Plain {
                excluded.push(format!("{trt}.{name}"));
            } else if matches!(format, Some(QFormat::Int4Awq | QFormat::W4a8Awq)) && lins[i].1.pqs.is_none() {
                let n = LinearKind::ALL[i].shape(&cfg)[1];
                lins[i].1.pqs = Some(encode(&vec![1.0; n], dtype));
            }
        }
        // FP8 qkv: one scale (max) and the weight re-quantized from the original.
        if lins[0].0 == Stored::Fp8 {
            let ws = max_scalar(&[0, 1, 2].map(|i| lins[i].1.ws.as_ref().expect("fp8 weight_scale")));
            for i in 0..3 {
                let w = orig.tensor(&format!("{hf}.{}.weight", LinearKind::ALL[i].module()))?.to_f32()?;
                lins[i].1.w.data = fp8::quantize(&w, ws.value(), dtype);
                lins[i].1.ws = Some(ws.clone());
            }
        }
        let k = uni.get(&format!("{hf}.self_attn.k_proj.k_scale"));
        let v = uni.get(&format!("{hf}.self_attn.v_proj.v_scale"));
        let kv = match (k, v) {
            (Some(k), Some(v)) => {
                kv_fp8 = true;
                let (k, v) = (k.to_f32()?[0].max(1.0), v.to_f32()?[0].max(1.0));
                Some((k, v))
            }
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
            if let Some((k, v)) = kv {
                out.push((format!("{trt}.attention.k_cache_scaling_factor"), Tn::scalar(k)));
                out.push((format!("{trt}.attention.v_cache_scaling_factor"), Tn::scalar(v)));
                out.push((format!("{trt}.attention.kv_cache_scaling_factor"), Tn::scalar(k.max(v))));
            }
        }
    }

    let embed = Tn::from_view(&orig.tensor("model.embed_tokens.weight")?);
    let lm_head = match uni.get("lm_head.weight") {
        Some(v) if matches!(v.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) => Tn::from_view(&v),
        Some(_) => return Err(Error::Unsupported("TensorRT-LLM export of a quantized lm_head".into())),
        None if cfg.tie_word_embeddings => embed.clone(),
        None => return Err(Error::tensor("lm_head.weight", "missing and tie_word_embeddings is false")),
    };
    let ln_f = Tn::from_view(&orig.tensor("model.norm.weight")?);
    for tp_rank in 0..tp {
        ranks[tp_rank].push(("transformer.vocab_embedding.weight".into(), embed.split("model.embed_tokens.weight", 0, tp, tp_rank)?));
        let last = &mut ranks[tp_rank + (pp - 1) * tp];
        last.push(("transformer.ln_f.weight".into(), ln_f.clone()));
        last.push(("lm_head.weight".into(), lm_head.split("lm_head.weight", 0, tp, tp_rank)?));
    }
    excluded.push("lm_head".into());

    let config = trtllm_config(&cfg, dtype, format, kv_fp8, &excluded, tp, pp)?;
    let staging = Staging::new(original, out, o.force)?;
    for (r, tensors) in ranks.iter().enumerate() {
        let list: Vec<(&str, Dtype, &[usize], &[u8])> =
            tensors.iter().map(|(n, t)| (n.as_str(), t.dtype, t.shape.as_slice(), t.data.as_slice())).collect();
        write_file(&staging.tmp.join(format!("rank{r}.safetensors")), &list, &[])?;
    }
    let p = staging.tmp.join("config.json");
    std::fs::write(&p, config.to_pretty(4)).map_err(|e| Error::io(&p, e))?;
    staging.commit()
}

/// config.json, the manual-path keys of spec/export-formats.md §4.2.
fn trtllm_config(
    cfg: &ModelConfig,
    dtype: Dtype,
    format: Option<QFormat>,
    kv_fp8: bool,
    excluded: &[String],
    tp: usize,
    pp: usize,
) -> Result<Json> {
    let int = |n: usize| Json::Int(n as i64);
    let mut q = obj([
        ("quant_algo", format.map_or(Json::Null, |f| str(f.quant_algo()))),
        ("kv_cache_quant_algo", if kv_fp8 { str("FP8") } else { Json::Null }),
    ]);
    if let Some(f) = format {
        if let Some(g) = f.group_size() {
            q.set("group_size", int(g));
        }
        if f.awq() {
            q.set("has_zero_point", Json::Bool(false));
            q.set("pre_quant_scale", Json::Bool(true));
        }
        q.set("exclude_modules", Json::Arr(excluded.iter().map(|s| str(s)).collect()));
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
        ("vocab_size", int(cfg.vocab_size)),
        ("max_position_embeddings", int(cfg.max_position_embeddings)),
        ("hidden_act", str("silu")),
        ("use_parallel_embedding", Json::Bool(true)),
        ("embedding_sharding_dim", int(0)),
        ("head_size", int(cfg.head_dim)),
        ("intermediate_size", int(cfg.intermediate_size)),
        ("position_embedding_type", str("rope_gpt_neox")),
        // ModelOpt shares the table only when lm_head is tied and lives on the same rank.
        ("share_embedding_table", Json::Bool(cfg.tie_word_embeddings && pp == 1)),
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
    c.set("mapping", obj([("world_size", int(tp * pp)), ("tp_size", int(tp)), ("pp_size", int(pp))]));
    c.set("quantization", q);
    Ok(c)
}
