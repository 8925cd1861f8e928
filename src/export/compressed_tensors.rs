//! The compressed-tensors checkpoint (`--export compressed-tensors`), the layout vLLM's
//! `compressed_tensors` method and transformers' `CompressedTensorsHfQuantizer` load. vLLM's
//! ModelOpt loader refuses W4A16_AWQ and INT8 SmoothQuant (spec/export-formats.md §3.1); in this
//! layout they load. It is written from a unified checkpoint that rq-min quantized in
//! compressed-tensors mode (`quantize::Options::compressed_tensors`), tensor by tensor, so the
//! codes are the unified export's and the checkpoint holds the same model.
//!
//! Per quantized linear `<m>` (facts from compressed-tensors `quantization/quant_scheme.py`,
//! `quantization/lifecycle/initialize.py`, `compressors/quantized_compressors/*.py`, and vLLM
//! `compressed_tensors/compressed_tensors.py` + `schemes/*.py`):
//!
//! | rq-min format | format | tensors |
//! | --- | --- | --- |
//! | fp8 | float-quantized | `weight` F8_E4M3 [o, i], `weight_scale` F32 [1], `input_scale` F32 [1] |
//! | int8_sq | int-quantized | `weight` I8 [o, i], `weight_scale` F32 [o, 1] (strategy channel), `input_scale` F32 [1] |
//! | int4_awq | pack-quantized | `weight_packed` I32 [o, i/8], `weight_scale` model dtype [o, i/128], `weight_shape` I64 [2] |
//! | nvfp4, nvfp4_awq | nvfp4-pack-quantized | `weight_packed` U8 [o, i/2], `weight_scale` F8_E4M3 [o, i/16], `weight_global_scale` F32 [1], `input_global_scale` F32 [1] |
//!
//! - Scale shapes are initialize.py's: tensor strategy (1,), channel (out, 1), group
//!   (out, in/group); global scales (1,) float32. F32 is kept for the per-tensor and per-channel
//!   scales (vLLM's FP8 / INT8 schemes hold them as float32 parameters), so they are the unified
//!   export's values bit for bit; INT4 group scales are in the model dtype as vLLM's WNA16 scheme
//!   creates them (`params_dtype`), which is why compressed-tensors mode rounds them first.
//! - Symmetric: no zero points are written (vLLM creates none for symmetric schemes).
//! - KV cache: `<attn>.k_scale` / `<attn>.v_scale` (compressed-tensors' attention qparams; vLLM's
//!   `maybe_remap_kv_scale_name` maps them to `attn.k_scale`), value amax/448 as ModelOpt's.
//! - Every family: fused modules (Phi3's `qkv_proj`, `gate_up_proj`) keep their names, MoE
//!   experts their per-expert names; routers go to `ignore`. Mixed precision: a config group per
//!   scheme with exact-name targets ([`quantization_config`]).
//! - W4A8 AWQ has no equivalent: compressed-tensors' W4AFP8 preset (vLLM
//!   `CompressedTensorsW4A8Fp8`, `_is_fp8_w4a8`) quantizes activations dynamically per token,
//!   while ModelOpt's W4A8 uses one static per-tensor FP8 scale; it is refused.

use crate::error::{Error, Result};
use crate::export::unified::{Output, DEFAULT_SHARD_BYTES};
use crate::io::json::{obj, str, Json};
use crate::quant::fp8::round_to_dtype;
use crate::model::weights::{detect, Stored};
use crate::quant::int::pack_int4;
use crate::quant::nvfp4::{input_global_scale, nvfp4_global_scale};
use crate::quant::{int, QFormat, INT4_GROUP};
use crate::io::safetensors::{Checkpoint, Dtype};
use std::path::Path;

/// The compressed-tensors scheme of a quantized linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Fp8,
    Int8,
    W4a16,
    Nvfp4,
}

/// The scheme rq-min's `format` is written as, or the reason it has none.
pub fn scheme(format: QFormat) -> Result<Scheme> {
    Ok(match format {
        QFormat::Fp8 => Scheme::Fp8,
        QFormat::Int8Sq => Scheme::Int8,
        QFormat::Int4Awq => Scheme::W4a16,
        QFormat::Nvfp4 | QFormat::Nvfp4Awq => Scheme::Nvfp4,
        QFormat::W4a8Awq => {
            return Err(Error::Unsupported(
                "w4a8_awq in compressed-tensors: its only INT4-weight / FP8-activation scheme (W4AFP8, vLLM \
                 CompressedTensorsW4A8Fp8) quantizes activations dynamically per token, not with ModelOpt's static \
                 per-tensor scale; export w4a8_awq with --export trtllm (or hf for TensorRT-LLM's LLM API)"
                    .into(),
            ))
        }
    })
}

impl Scheme {
    /// The `format` value (compressed-tensors `CompressionFormat`).
    pub fn format(self) -> &'static str {
        match self {
            Scheme::Fp8 => "float-quantized",
            Scheme::Int8 => "int-quantized",
            Scheme::W4a16 => "pack-quantized",
            Scheme::Nvfp4 => "nvfp4-pack-quantized",
        }
    }
    /// How rq-min reads a linear of this scheme back.
    pub fn stored(self) -> Stored {
        match self {
            Scheme::Fp8 => Stored::Fp8,
            Scheme::Int8 => Stored::Int8,
            Scheme::W4a16 => Stored::Int4 { group: INT4_GROUP },
            Scheme::Nvfp4 => Stored::Nvfp4,
        }
    }
    const ALL: [Scheme; 4] = [Scheme::Fp8, Scheme::Int8, Scheme::W4a16, Scheme::Nvfp4];
    /// Tensors a linear of this scheme needs besides `weight`/`weight_packed` and `weight_scale`.
    pub fn required(self) -> &'static [&'static str] {
        match self {
            Scheme::Fp8 | Scheme::Int8 => &["input_scale"],
            Scheme::W4a16 => &["weight_shape"],
            Scheme::Nvfp4 => &["weight_global_scale", "input_global_scale"],
        }
    }
    /// (weights, input_activations) `QuantizationArgs`, keys sorted as transformers'
    /// `to_json_string` writes them (quant_scheme.py presets FP8, INT8 W8A8 with a static
    /// per-tensor input, W4A16, NVFP4).
    fn args(self) -> (Json, Json) {
        let fp8_tensor = || args(8, "float", "tensor", None, Json::Bool(false));
        match self {
            Scheme::Fp8 => (fp8_tensor(), fp8_tensor()),
            Scheme::Int8 => (args(8, "int", "channel", None, Json::Bool(false)), args(8, "int", "tensor", None, Json::Bool(false))),
            Scheme::W4a16 => (args(4, "int", "group", Some(INT4_GROUP), Json::Bool(false)), Json::Null),
            // Input: static global scale, dynamic ("local") per-16 block scales.
            Scheme::Nvfp4 => (
                args(4, "float", "tensor_group", Some(crate::quant::nvfp4::BLOCK), Json::Bool(false)),
                args(4, "float", "tensor_group", Some(crate::quant::nvfp4::BLOCK), str("local")),
            ),
        }
    }
}

/// One `QuantizationArgs` (quant_args.py fields present in every release; symmetric, min-max).
fn args(bits: i64, kind: &str, strategy: &str, group: Option<usize>, dynamic: Json) -> Json {
    obj([
        ("actorder", Json::Null),
        ("block_structure", Json::Null),
        ("dynamic", dynamic),
        ("group_size", group.map_or(Json::Null, |g| Json::Int(g as i64))),
        ("num_bits", Json::Int(bits)),
        ("observer", str("minmax")),
        ("observer_kwargs", Json::Obj(vec![])),
        ("strategy", str(strategy)),
        ("symmetric", Json::Bool(true)),
        ("type", str(kind)),
    ])
}

/// The compressed-tensors release whose config layout this follows (the `version` key, which
/// loaders do not check).
const CT_VERSION: &str = "0.12.2";

/// config.json's `quantization_config` (quant_config.py `QuantizationConfig`). One scheme: one
/// group targeting `Linear`. Several (mixed precision): a group per scheme whose `targets` are
/// the exact module names (vLLM's `find_matched_target` and compressed-tensors' `is_match` take
/// a name or a `re:` pattern; a fused vLLM layer matches when all its shards do), each with its
/// `format`, and `format: mixed-precision` at the top (`CompressionFormat.mixed_precision`, what
/// compressed-tensors writes when groups differ in format). `ignore` = exact module names (vLLM's
/// `should_ignore_layer` matches names or `re:` patterns, not fnmatch), `kv_cache_scheme` FP8
/// per tensor when asked.
pub fn quantization_config(groups: &[(Scheme, Vec<String>)], ignore: &[String], kv_fp8: bool) -> Json {
    let group = |scheme: Scheme, targets: Json, format: bool| {
        let (weights, input) = scheme.args();
        let mut g = obj([
            ("input_activations", input),
            ("output_activations", Json::Null),
            ("targets", targets),
            ("weights", weights),
        ]);
        if format {
            g.set("format", str(scheme.format()));
        }
        g
    };
    let (config_groups, format) = match groups {
        [(scheme, _)] => (obj([("group_0", group(*scheme, Json::Arr(vec![str("Linear")]), false))]), scheme.format()),
        _ => {
            let named = groups.iter().enumerate().map(|(i, (scheme, modules))| {
                (format!("group_{i}"), group(*scheme, Json::Arr(modules.iter().map(|m| str(m)).collect()), true))
            });
            (Json::Obj(named.collect()), MIXED_PRECISION)
        }
    };
    let kv = if kv_fp8 { args(8, "float", "tensor", None, Json::Bool(false)) } else { Json::Null };
    obj([
        ("config_groups", config_groups),
        ("format", str(format)),
        ("global_compression_ratio", Json::Null),
        ("ignore", Json::Arr(ignore.iter().map(|s| str(s)).collect())),
        ("kv_cache_scheme", kv),
        ("quant_method", str("compressed-tensors")),
        ("quantization_status", str("compressed")),
        ("version", str(CT_VERSION)),
    ])
}

/// The top-level `format` of a config whose groups have formats of their own.
const MIXED_PRECISION: &str = "mixed-precision";

/// What a compressed-tensors `quantization_config` says: the scheme of each group with its
/// targets (`Linear`, or exact module names as rq-min writes them).
pub struct CtConfig {
    groups: Vec<(Scheme, Vec<String>)>,
}

impl CtConfig {
    /// The groups of a `quantization_config` with `quant_method: compressed-tensors`, if every
    /// group's format (its own, else the top-level one) is one rq-min writes.
    pub fn from_config(q: &Json) -> Option<CtConfig> {
        if q.get("quant_method").and_then(Json::as_str) != Some("compressed-tensors") {
            return None;
        }
        let top = q.get("format").and_then(Json::as_str);
        let groups = q.get("config_groups")?.as_object()?.iter().map(|(_, g)| {
            let f = g.get("format").and_then(Json::as_str).or(top)?;
            let scheme = Scheme::ALL.into_iter().find(|s| s.format() == f)?;
            let targets = g.get("targets")?.as_array()?.iter().filter_map(Json::as_str).map(String::from).collect();
            Some((scheme, targets))
        });
        Some(CtConfig { groups: groups.collect::<Option<_>>()? })
    }
    /// The scheme of quantized module `module`: the first group naming it, else one targeting `Linear`.
    pub fn scheme_of(&self, module: &str) -> Option<Scheme> {
        let hit = |t: &str| self.groups.iter().find(|(_, ts)| ts.iter().any(|x| x == t)).map(|(s, _)| *s);
        hit(module).or_else(|| hit("Linear"))
    }
}

/// The vLLM layer a module is loaded into with others (QKVParallelLinear, the merged gate/up,
/// one FusedMoE per block): vLLM requires one scheme for all of them (`should_ignore_layer`,
/// `_match_fused_layer`, one quant method per FusedMoE layer).
fn vllm_layer(module: &str) -> Option<String> {
    if let Some((block, _)) = module.split_once(".experts.") {
        return Some(format!("{block}.experts"));
    }
    let (parent, leaf) = module.rsplit_once('.')?;
    match leaf {
        "q_proj" | "k_proj" | "v_proj" => Some(format!("{parent}.qkv_proj")),
        "gate_proj" | "up_proj" => Some(format!("{parent}.gate_up_proj")),
        _ => None,
    }
}

/// ModelOpt's KV-scale names (spec/export-formats.md §2.8: `<attn>.k_proj.k_scale`) ->
/// compressed-tensors' attention qparams (`<attn>.k_scale`).
fn kv_name(name: &str) -> Option<String> {
    for (modelopt, ct) in [(".k_proj.k_scale", ".k_scale"), (".v_proj.v_scale", ".v_scale")] {
        if let Some(attn) = name.strip_suffix(modelopt) {
            return Some(format!("{attn}{ct}"));
        }
    }
    None
}

/// Suffixes of a unified export's linear that are re-encoded with its weight.
const LINEAR_SCALES: [&str; 3] = ["weight_scale", "weight_scale_2", "input_scale"];

fn f32_scalar(ck: &Checkpoint, name: &str) -> Result<f32> {
    let v = ck.tensor(name)?.to_f32()?;
    match v.as_slice() {
        [x] if x.is_finite() && *x > 0.0 => Ok(*x),
        _ => Err(Error::tensor(name, format!("expected one finite positive scale, got {v:?}"))),
    }
}

fn scalar_bytes(x: f32) -> Vec<u8> {
    x.to_le_bytes().to_vec()
}

type OutTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// One quantized linear of the unified export in `scheme`'s compressed-tensors tensors.
fn linear(ck: &Checkpoint, m: &str, scheme: Scheme, [o, i]: [usize; 2], dtype: Dtype) -> Result<Vec<OutTensor>> {
    let w = ck.tensor(&format!("{m}.weight"))?;
    let ws = ck.tensor(&format!("{m}.weight_scale"))?;
    let input = |suffix: &str| f32_scalar(ck, &format!("{m}.input_scale")).map(|s| (format!("{m}.{suffix}"), s));
    let mut t: Vec<OutTensor> = Vec::new();
    match scheme {
        Scheme::Fp8 | Scheme::Int8 => {
            let shape = if scheme == Scheme::Fp8 { vec![1] } else { vec![o, 1] };
            t.push((format!("{m}.weight"), w.dtype, vec![o, i], w.data.to_vec()));
            let values = ws.to_f32()?;
            t.push((format!("{m}.weight_scale"), Dtype::F32, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
            let (name, s) = input("input_scale")?;
            t.push((name, Dtype::F32, vec![1], scalar_bytes(s)));
        }
        Scheme::W4a16 => {
            let scales = ws.to_f32()?;
            if let Some(s) = scales.iter().find(|&&s| round_to_dtype(s, dtype) != s) {
                return Err(Error::tensor(
                    format!("{m}.weight_scale"),
                    format!(
                        "INT4 scale {s} is not a {} value, so compressed-tensors would change it; quantize with \
                         --export compressed-tensors (which rounds the scales first)",
                        dtype.name()
                    ),
                ));
            }
            let codes = int::int4_unpack(w.data, o, i);
            t.push((format!("{m}.weight_packed"), Dtype::I32, vec![o, i / 8], pack_int4(&codes, i)));
            t.push((format!("{m}.weight_scale"), dtype, ws.shape.to_vec(), crate::io::safetensors::encode(&scales, dtype)));
            let shape: Vec<u8> = [o as i64, i as i64].iter().flat_map(|v| v.to_le_bytes()).collect();
            t.push((format!("{m}.weight_shape"), Dtype::I64, vec![2], shape));
        }
        Scheme::Nvfp4 => {
            let ws2 = f32_scalar(ck, &format!("{m}.weight_scale_2"))?;
            t.push((format!("{m}.weight_packed"), Dtype::U8, vec![o, i / 2], w.data.to_vec()));
            t.push((format!("{m}.weight_scale"), Dtype::F8E4M3, ws.shape.to_vec(), ws.data.to_vec()));
            t.push((format!("{m}.weight_global_scale"), Dtype::F32, vec![1], scalar_bytes(nvfp4_global_scale(ws2))));
            let (name, s) = input("input_global_scale")?;
            t.push((name, Dtype::F32, vec![1], scalar_bytes(input_global_scale(s))));
        }
    }
    Ok(t)
}

/// The formats of a unified checkpoint's `quantization` section (spec/export-formats.md §2.2).
enum UnifiedFormats {
    /// `quant_algo`, for every quantized module.
    One(QFormat),
    /// MIXED_PRECISION's `quantized_layers`.
    PerModule(Vec<(String, QFormat)>),
}

fn module_formats(q: &Json, path: &Path) -> Result<UnifiedFormats> {
    let parse = |algo: &str| {
        QFormat::ALL.into_iter().find(|f| f.quant_algo() == algo).ok_or_else(|| {
            Error::Unsupported(format!("{}: quant_algo {algo} in compressed-tensors", path.display()))
        })
    };
    let algo = q.get("quant_algo").and_then(Json::as_str).unwrap_or("");
    if algo != "MIXED_PRECISION" {
        return Ok(UnifiedFormats::One(parse(algo)?));
    }
    let layers = q.get("quantized_layers").and_then(Json::as_object).ok_or_else(|| {
        Error::config(path, "MIXED_PRECISION without a quantized_layers object")
    })?;
    let modules = layers.iter().map(|(m, v)| {
        let algo = v.get("quant_algo").and_then(Json::as_str).unwrap_or("");
        Ok((m.clone(), parse(algo)?))
    });
    Ok(UnifiedFormats::PerModule(modules.collect::<Result<_>>()?))
}

/// Re-encodes the unified checkpoint `unified` (rq-min's, quantized in compressed-tensors mode;
/// one format or mixed precision) as a compressed-tensors checkpoint in `out`. Refuses what the
/// layout cannot hold exactly: a `pre_quant_scale`, INT4 scales off the model-dtype grid,
/// W4A8, and shards of one vLLM layer in different schemes.
pub fn convert(unified: &Path, out: &Path, force: bool) -> Result<()> {
    let ck = Checkpoint::open(unified)?;
    let hfq_path = unified.join("hf_quant_config.json");
    let hfq = Json::parse_file(&hfq_path)?;
    let q = hfq.get("quantization").ok_or_else(|| Error::config(&hfq_path, "no \"quantization\" section"))?;
    let formats = module_formats(q, &hfq_path)?;
    let scheme_of = |module: &str| -> Result<Option<(QFormat, Scheme)>> {
        let format = match &formats {
            UnifiedFormats::One(f) => Some(*f),
            UnifiedFormats::PerModule(layers) => layers.iter().find(|(m, _)| m == module).map(|(_, f)| *f),
        };
        format.map(|f| Ok((f, scheme(f).map_err(|e| Error::tensor(module, e.to_string()))?))).transpose()
    };
    if let UnifiedFormats::One(f) = formats {
        scheme(f)?;
    }
    let kv_fp8 = q.get("kv_cache_quant_algo").and_then(Json::as_str) == Some("FP8");
    let names = crate::model::config::ModelConfig::from_dir(unified)?.names;
    let dtype = ck.tensor(&format!("{}.weight", names.embed))?.dtype;

    let mut output = Output::create(unified, out, force, DEFAULT_SHARD_BYTES)?;
    let mut ignore: Vec<String> = vec!["lm_head".into()];
    let mut groups: Vec<(Scheme, Vec<String>)> = Vec::new();
    // vLLM layer -> (first module, its scheme or None if unquantized).
    let mut layers: Vec<(String, String, Option<Scheme>)> = Vec::new();
    for name in ck.names() {
        crate::io::signal::check()?;
        let t = ck.tensor(name)?;
        if name.ends_with(".pre_quant_scale") {
            return Err(Error::Unsupported(format!(
                "{name}: compressed-tensors has no pre_quant_scale; quantize with --export compressed-tensors, \
                 which smooths only where the scale folds into a neighbour"
            )));
        }
        if let Some(ct) = kv_name(name) {
            output.add(&ct, Dtype::F32, &[1], scalar_bytes(f32_scalar(&ck, name)?))?;
            continue;
        }
        let module = name.strip_suffix(".weight").filter(|_| t.shape.len() == 2);
        let Some(module) = module else {
            // A quantized linear's scales are written with its weight.
            let of_linear = LINEAR_SCALES
                .iter()
                .filter_map(|s| name.strip_suffix(s)?.strip_suffix('.'))
                .any(|m| ck.get(&format!("{m}.weight_scale")).is_some());
            if !of_linear {
                output.add(name, t.dtype, t.shape, t.data.to_vec())?;
            }
            continue;
        };
        let scale = ck.get(&format!("{module}.weight_scale"));
        let Some((stored, shape)) = detect(&t, scale.as_ref()) else {
            return Err(Error::tensor(name, "is no known quantized format (missing or wrong-shaped weight_scale)"));
        };
        let scheme = if stored == Stored::Plain { None } else { Some(scheme_of(module)?) };
        if let Some(layer) = vllm_layer(module) {
            let s = scheme.flatten().map(|(_, s)| s);
            match layers.iter().find(|(l, _, _)| *l == layer) {
                Some((_, first, other)) if *other != s => {
                    let says = |s: Option<Scheme>| s.map_or("unquantized", Scheme::format);
                    return Err(Error::Unsupported(format!(
                        "{module} is {} but {first} is {}: vLLM loads both into {layer}, which needs one scheme; \
                         give them one format",
                        says(s),
                        says(*other)
                    )));
                }
                Some(_) => {}
                None => layers.push((layer, module.to_string(), s)),
            }
        }
        let Some(scheme) = scheme else {
            output.add(name, t.dtype, t.shape, t.data.to_vec())?;
            if module != names.embed && module != "lm_head" {
                ignore.push(module.to_string());
            }
            continue;
        };
        let Some((format, scheme)) = scheme else {
            return Err(Error::tensor(name, format!("is stored as {} but not listed in quantized_layers", stored.name())));
        };
        if stored != scheme.stored() {
            return Err(Error::tensor(name, format!("stored as {}, but the checkpoint says {}", stored.name(), format.cli_name())));
        }
        for (n, dt, sh, data) in linear(&ck, module, scheme, shape, dtype)? {
            output.add(&n, dt, &sh, data)?;
        }
        match groups.iter_mut().find(|(s, _)| *s == scheme) {
            Some((_, modules)) => modules.push(module.to_string()),
            None => groups.push((scheme, vec![module.to_string()])),
        }
    }
    groups.sort_by_key(|(s, _)| *s as u8);
    let config_path = unified.join("config.json");
    let mut config = Json::parse_file(&config_path)?;
    config.set("quantization_config", quantization_config(&groups, &ignore, kv_fp8));
    output.finish_with(unified, &config, None)
}
