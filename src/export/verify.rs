//! `rq-min inspect`: what a checkpoint holds, bits per parameter by format, and the places where
//! its config and its tensors disagree (as a loader would find them).

use crate::error::Result;
use crate::model::Model;
use std::collections::BTreeSet;
use crate::io::json::Json;
use crate::export::compressed_tensors::CtConfig;
use crate::model::weights::{detect, detect_packed, Stored};
use crate::quant::{fnmatch, QFormat};
use crate::io::safetensors::{Checkpoint, TensorView};
use std::collections::BTreeMap;
use std::path::Path;

/// Tensor suffixes that belong to a quantized linear besides its `weight` (the last two:
/// compressed-tensors' NVFP4 global scales, export_ct.rs).
const SCALE_SUFFIXES: [&str; 8] = [
    "weight_scale",
    "weight_scale_2",
    "input_scale",
    "pre_quant_scale",
    "k_scale",
    "v_scale",
    "weight_global_scale",
    "input_global_scale",
];

/// Bits per parameter of the linears of one storage format.
#[derive(Debug, Default, Clone)]
pub struct Group {
    pub linears: usize,
    pub params: usize,
    /// Bytes of the weights and their weight scales (`weight_scale`, `weight_scale_2`).
    pub bytes: usize,
}

impl Group {
    pub fn bits(&self) -> f64 {
        8.0 * self.bytes as f64 / self.params.max(1) as f64
    }
}

pub struct Report {
    /// Format name -> its linears (2-D weights; embeddings included as unquantized).
    pub groups: BTreeMap<String, Group>,
    /// Config/tensor disagreements; empty for a consistent checkpoint.
    pub findings: Vec<String>,
}

impl Report {
    pub fn overall_bits(&self) -> f64 {
        let (p, b) = self.groups.values().fold((0, 0), |(p, b), g| (p + g.params, b + g.bytes));
        8.0 * b as f64 / p.max(1) as f64
    }
}

/// The quantization section of a checkpoint: hf_quant_config.json's `quantization`, else
/// config.json's `quantization_config`.
fn quant_section(dir: &Path) -> Result<Option<Json>> {
    for (file, key) in [("hf_quant_config.json", "quantization"), ("config.json", "quantization_config")] {
        let p = dir.join(file);
        if p.exists() {
            if let Some(q) = Json::parse_file(&p)?.get(key) {
                return Ok(Some(q.clone()));
            }
        }
    }
    Ok(None)
}

/// Whether a weight stored as `s` is what `quant_algo` prescribes.
fn algo_matches(algo: &str, s: Stored) -> bool {
    let Some(f) = QFormat::ALL.into_iter().find(|f| f.quant_algo() == algo) else { return false };
    use crate::quant::WeightKind as W;
    matches!(
        (f.weight(), s),
        (W::Fp8, Stored::Fp8) | (W::Int8Rows, Stored::Int8) | (W::Int4Groups, Stored::Int4 { .. }) | (W::Nvfp4, Stored::Nvfp4)
    )
}

/// Checks a checkpoint folder. Modules are the prefixes of `*.weight` 2-D tensors.
pub fn check(dir: &Path) -> Result<Report> {
    let ck = Checkpoint::open(dir)?;
    let quant = quant_section(dir)?;
    // compressed-tensors (export_ct.rs): each module's scheme stands in for quant_algo.
    let ct = quant.as_ref().and_then(CtConfig::from_config);
    let algo = quant.as_ref().and_then(|q| q.get("quant_algo")).and_then(Json::as_str).map(String::from);
    let list = |key: &str| -> Vec<String> {
        quant.as_ref().and_then(|q| q.get(key)).and_then(Json::as_array).map_or(vec![], |a| {
            a.iter().filter_map(Json::as_str).map(String::from).collect()
        })
    };
    let excludes = [list("exclude_modules"), list("ignore")].concat();
    let mixed: Option<Vec<(String, Json)>> =
        quant.as_ref().and_then(|q| q.get("quantized_layers")).and_then(Json::as_object).map(|o| o.to_vec());

    let mut report = Report { groups: BTreeMap::new(), findings: Vec::new() };
    let names = ck.names();
    for name in &names {
        let (module, packed) = match (name.strip_suffix(".weight"), name.strip_suffix(".weight_packed")) {
            (Some(m), _) => (m, false),
            (_, Some(m)) => (m, true),
            _ => continue,
        };
        let w = ck.tensor(name)?;
        if w.shape.len() != 2 {
            continue; // norms
        }
        let get = |suffix: &str| ck.get(&format!("{module}.{suffix}"));
        let scale = get("weight_scale");
        let found = if packed { detect_packed(&w, scale.as_ref()) } else { detect(&w, scale.as_ref()) };
        let Some((stored, [out, inp])) = found else {
            report.findings.push(format!(
                "{module}: {} weight {:?} with weight_scale {} is no known format (missing or wrong-shaped scale)",
                w.dtype.name(),
                w.shape,
                scale.map_or("missing".into(), |s| format!("{} {:?}", s.dtype.name(), s.shape))
            ));
            continue;
        };
        let g = report.groups.entry(stored.name()).or_default();
        g.linears += 1;
        g.params += out * inp;
        let global = get("weight_scale_2").or(get("weight_global_scale"));
        g.bytes += w.data.len() + scale.map_or(0, |s| s.data.len()) + global.map_or(0, |s| s.data.len());
        if let (true, Some(ws)) = (packed, get("weight_shape")) {
            if ws.to_i64().ok().as_deref() != Some(&[out as i64, inp as i64][..]) {
                report.findings.push(format!("{module}: weight_shape {:?} does not match the packed weight [{out}, {inp}]", ws.to_i64().ok()));
            }
        }

        for suffix in SCALE_SUFFIXES {
            if let Some(t) = get(suffix) {
                check_scale(&mut report.findings, module, suffix, &t, inp);
            }
        }
        let excluded = excludes.iter().any(|p| fnmatch(p, module));
        let is_embedding = crate::model::config::is_embedding(module);
        if let Some(ct) = &ct {
            // compressed-tensors: the group targeting the module (export_ct.rs) names its scheme.
            let scheme = ct.scheme_of(module).filter(|_| !excluded && !is_embedding);
            let finding = match scheme {
                None if stored != Stored::Plain => Some(format!("stored as {} but no config group targets it", stored.name())),
                Some(s) if s.stored() != stored => Some(format!("its config group is {} but it is stored as {}", s.format(), stored.name())),
                _ => None,
            };
            report.findings.extend(finding.map(|f| format!("{module}: {f}")));
            for needed in scheme.filter(|_| stored != Stored::Plain).map_or(&[][..], |s| s.required()) {
                if get(needed).is_none() {
                    report.findings.push(format!("{module}: {} weight without {needed}", stored.name()));
                }
            }
            continue;
        }
        // The tensors a loader needs for the module's format (spec/export-formats.md §2.5).
        let module_algo = match &mixed {
            Some(layers) => layers.iter().find(|(k, _)| k == module).and_then(|(_, v)| v.get("quant_algo")).and_then(Json::as_str),
            None => algo.as_deref(),
        };
        for needed in required(stored, module_algo) {
            if get(needed).is_none() {
                report.findings.push(format!("{module}: {} weight without {needed}", stored.name()));
            }
        }
        match (&mixed, &algo) {
            (Some(layers), _) => {
                let want = layers.iter().find(|(k, _)| k == module).and_then(|(_, v)| v.get("quant_algo")).and_then(Json::as_str);
                match want {
                    Some(a) if !algo_matches(a, stored) => {
                        report.findings.push(format!("{module}: quantized_layers says {a} but it is stored as {}", stored.name()))
                    }
                    None if stored != Stored::Plain => {
                        report.findings.push(format!("{module}: stored as {} but not in quantized_layers", stored.name()))
                    }
                    _ => {}
                }
            }
            (None, Some(a)) if excluded || is_embedding => {
                if stored != Stored::Plain || SCALE_SUFFIXES[..4].iter().any(|s| get(s).is_some()) {
                    report.findings.push(format!("{module}: excluded from {a} but has quantization tensors"));
                }
            }
            (None, Some(a)) => {
                if !algo_matches(a, stored) {
                    report.findings.push(format!(
                        "{module}: the config's quant_algo is {a} but the module is stored as {} (tensors missing or of another format)",
                        stored.name()
                    ));
                }
            }
            (None, None) if stored != Stored::Plain => {
                report.findings.push(format!("{module}: quantized ({}) but the checkpoint has no quantization config", stored.name()))
            }
            (None, None) => {}
        }
    }
    // KV-cache scales on every attention layer when the config names a KV format (§2.8;
    // compressed-tensors: `kv_cache_scheme` and `self_attn.k_scale` / `v_scale`). The
    // k_proj/v_proj names are used also beside a fused qkv_proj (§2.8).
    let kv_names: &[&str] = if ct.is_some() { &["k_scale", "v_scale"] } else { &["k_proj.k_scale", "v_proj.v_scale"] };
    let kv_key = quant.as_ref().and_then(|q| q.get("kv_cache_quant_algo").or(q.get("kv_cache_scheme")));
    if kv_key.is_some_and(|k| !k.is_null()) {
        let attention = |n: &str| {
            [".k_proj.weight", ".k_proj.weight_packed", ".qkv_proj.weight", ".query_key_value.weight", ".query_key_value.weight_packed"]
                .iter()
                .find_map(|s| n.strip_suffix(s).map(String::from))
        };
        let attention_module = |a: &String| [".self_attn", ".attn", ".self_attention"].iter().any(|s| a.ends_with(s));
        for attn in names.iter().filter_map(|n| attention(n)).filter(attention_module) {
            for scale in kv_names {
                if ck.get(&format!("{attn}.{scale}")).is_none() {
                    report.findings.push(format!("{attn}: the config names a KV-cache format but {scale} is missing"));
                }
            }
        }
    }
    Ok(report)
}

/// Scale tensors a format needs besides `weight` and `weight_scale`.
fn required(stored: Stored, algo: Option<&str>) -> &'static [&'static str] {
    match (stored, algo) {
        (Stored::Fp8, _) => &["input_scale"],
        (Stored::Int8, _) => &["input_scale", "pre_quant_scale"],
        (Stored::Nvfp4, _) => &["weight_scale_2", "input_scale"],
        (Stored::Int4 { .. }, Some("W4A8_AWQ")) => &["weight_scale_2", "input_scale"],
        _ => &[],
    }
}

/// One linear's dequantized weight against the original model's.
pub struct WeightError {
    pub module: String,
    /// ‖W_effective − W_original‖ / ‖W_original‖.
    pub relative: f64,
}

/// Largest relative error of a dequantized weight that passes `verify` (INT4/NVFP4 weights of
/// trained models sit around 0.1, FP8 around 0.03; broken packing or scales give ~1).
pub const MAX_WEIGHT_ERROR: f64 = 0.35;

/// The dequantized weight error of every decoder linear module against `original`, relative
/// Frobenius. The effective weight multiplies back what the export moved elsewhere: the
/// linear's `pre_quant_scale` (its input is multiplied by it) and, for linears reading a
/// norm, the per-channel ratio of the exported to the original norm's scale (AWQ folds its
/// scales there; `1 + weight` for the offset norms). NVFP4-AWQ exports of the Llama layout and
/// compressed-tensors exports of every family also fold a consumer's scale p into its
/// producer's output rows (`model::config::row_fold`: down_proj into up_proj, per expert too, √p
/// under relu²; o_proj into v_proj), which stores no tensor: the row factor is estimated as
/// the least-squares ratio of the exported (norm ratio undone) to the original producer row,
/// and the producer's rows are divided by it and the consumer's input columns multiplied by it
/// (squared for relu²).
pub fn weight_errors(dir: &Path, original: &Path) -> Result<Vec<WeightError>> {
    use crate::model::{LinearKind, Model};
    use crate::model::weights::{input_quant, linear_weight};
    let q = Model::open(dir, Some(original))?;
    let o = Model::open(original, None)?;
    // NVFP4-AWQ and compressed-tensors exports fold scales into producer rows (see above).
    let folds = std::fs::read_to_string(dir.join("hf_quant_config.json")).is_ok_and(|t| t.contains("NVFP4_AWQ"))
        || quant_section(dir)?.as_ref().and_then(CtConfig::from_config).is_some();
    let mut out = Vec::new();
    for l in 0..o.config.num_hidden_layers {
        // A missing norm (Olmo2 and Exaone4 have none in front of a branch) folds nothing.
        let ratio = |norm: Option<&str>| -> Result<Vec<f32>> {
            let Some(norm) = norm else { return Ok(vec![1.0; o.config.hidden_size]) };
            let name = format!("{}.{norm}.weight", o.config.layer_prefix(l));
            let (a, b) = (q.tensor(&name)?.to_f32()?, o.tensor(&name)?.to_f32()?);
            let one = if o.config.norm_offset { 1.0 } else { 0.0 };
            Ok(a.iter().zip(&b).map(|(x, y)| if y + one != 0.0 { (x + one) / (y + one) } else { 1.0 }).collect())
        };
        let (r_in, r_post) = (ratio(o.config.norms.attn_in)?, ratio(o.config.norms.mlp_in)?);
        // A parallel MLP without a norm of its own reads the attention's (GPT-J).
        let r_post = if o.config.parallel && o.config.norms.mlp_in.is_none() { r_in.clone() } else { r_post };
        let modules = o.config.layer_modules(l);
        // The norm ratio of a module reading a norm (experts' gate/up read it through the router's block: none).
        let norm_ratio = |m: &crate::model::LayerModule| match m.kinds[0] {
            LinearKind::Q | LinearKind::K | LinearKind::V => Some(&r_in),
            LinearKind::Gate | LinearKind::Up if m.expert.is_none() => Some(&r_post),
            _ => None,
        };
        // Per module: its output rows' divisors and input columns' multipliers from row folds.
        let mut row_div: Vec<Option<Vec<f32>>> = vec![None; modules.len()];
        let mut col_mul: Vec<Option<Vec<f32>>> = vec![None; modules.len()];
        for k in 0..modules.len() {
            let Some(fold) = crate::model::config::row_fold(&modules, k, &o.config) else { continue };
            let (c, p) = (&modules[k], &modules[fold.producer]);
            if !folds || input_quant(&q, &c.path, c.shape)?.pre_quant_scale.is_some() {
                continue;
            }
            let inp = p.shape[1];
            let (mut a, b) = (linear_weight(&q, &p.path, p.shape)?, linear_weight(&o, &p.path, p.shape)?);
            // Undo the producer's own input scale (folded into its norm) first.
            if let Some(r) = norm_ratio(p) {
                a.chunks_exact_mut(inp).for_each(|row| row.iter_mut().zip(r).for_each(|(v, r)| *v *= r));
            }
            let rows = fold.offset..fold.offset + c.shape[1];
            let f: Vec<f32> = a
                .chunks_exact(inp)
                .zip(b.chunks_exact(inp))
                .enumerate()
                .map(|(r, (x, y))| {
                    let (xy, yy) = x.iter().zip(y).fold((0f64, 0f64), |(s, t), (a, b)| (s + (*a * *b) as f64, t + (*b * *b) as f64));
                    if rows.contains(&r) && yy > 0.0 && xy > 0.0 { (xy / yy) as f32 } else { 1.0 }
                })
                .collect();
            col_mul[k] = Some(f[rows].iter().map(|v| if fold.squared { v * v } else { *v }).collect());
            row_div[fold.producer] = Some(f);
        }
        for (k, module) in modules.iter().enumerate() {
            let (m, shape) = (&module.path, module.shape);
            let mut w = linear_weight(&q, m, shape)?;
            let mut scale = input_quant(&q, m, shape)?.pre_quant_scale.unwrap_or_else(|| vec![1.0; shape[1]]);
            for factors in [norm_ratio(module), col_mul[k].as_ref()].into_iter().flatten() {
                scale.iter_mut().zip(factors).for_each(|(s, r)| *s *= r);
            }
            for (r, row) in w.chunks_exact_mut(shape[1]).enumerate() {
                let row_scale = row_div[k].as_ref().map_or(1.0, |d| 1.0 / d[r]);
                row.iter_mut().zip(&scale).for_each(|(v, s)| *v *= s * row_scale);
            }
            let orig = linear_weight(&o, m, shape)?;
            let diff: f64 = w.iter().zip(&orig).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let norm: f64 = orig.iter().map(|b| (*b as f64).powi(2)).sum();
            out.push(WeightError { module: m.clone(), relative: (diff / norm.max(f64::MIN_POSITIVE)).sqrt() });
        }
    }
    Ok(out)
}

/// A scale must be finite and positive, and of its kind's shape.
fn check_scale(findings: &mut Vec<String>, module: &str, suffix: &str, t: &TensorView, inp: usize) {
    let Ok(values) = t.to_f32() else {
        findings.push(format!("{module}.{suffix}: dtype {} is not a float scale", t.dtype.name()));
        return;
    };
    if let Some(v) = values.iter().find(|v| !v.is_finite() || **v <= 0.0) {
        findings.push(format!("{module}.{suffix}: holds {v} (scales must be finite and positive)"));
    }
    let per_tensor = matches!(suffix, "weight_scale_2" | "input_scale" | "k_scale" | "v_scale");
    if per_tensor && values.len() != 1 {
        findings.push(format!("{module}.{suffix}: shape {:?}, expected a scalar", t.shape));
    }
    if suffix == "pre_quant_scale" && t.shape != [inp] {
        findings.push(format!("{module}.{suffix}: shape {:?}, expected [{inp}]", t.shape));
    }
}

/// What `verify` checks of a unified (or compressed-tensors) checkpoint beyond its linears:
/// config.json is there and, with ModelOpt's `quant_method`, hf_quant_config.json too, the two
/// naming the same `quant_algo` and `kv_cache_quant_algo` (spec/export-formats.md §2.2, §2.3);
/// every tensor the config implies is present with its shape (`Model::incomplete`); and no
/// tensor is there that the config does not imply (a leftover or a foreign module).
pub fn model_findings(dir: &Path) -> Vec<String> {
    let mut findings = Vec::new();
    let config = match Json::parse_file(&dir.join("config.json")) {
        Ok(c) => c,
        Err(e) => return vec![e.to_string()],
    };
    let section = config.get("quantization_config");
    let modelopt = section.and_then(|q| q.get("quant_method")).and_then(Json::as_str) == Some("modelopt");
    let hf_path = dir.join("hf_quant_config.json");
    match (modelopt, hf_path.exists()) {
        (true, false) => findings.push(format!("{}: missing (config.json says quant_method modelopt)", hf_path.display())),
        (false, true) => findings.push(format!("{}: present, but config.json has no ModelOpt quantization_config", hf_path.display())),
        (true, true) => match Json::parse_file(&hf_path) {
            Err(e) => findings.push(e.to_string()),
            Ok(hf) => {
                for key in ["quant_algo", "kv_cache_quant_algo"] {
                    let a = hf.get("quantization").and_then(|q| q.get(key)).and_then(Json::as_str);
                    let mut b = section.and_then(|q| q.get(key)).and_then(Json::as_str);
                    if key == "kv_cache_quant_algo" && b.is_none() {
                        // config.json spells the KV format as kv_cache_scheme (§2.3).
                        b = section.and_then(|q| q.get("kv_cache_scheme")).map(|_| "FP8");
                    }
                    if a != b {
                        findings.push(format!("hf_quant_config.json {key} is {a:?} but config.json says {b:?}"));
                    }
                }
            }
        },
        (false, false) => {}
    }
    let model = match Model::open(dir, None) {
        Ok(m) => m,
        Err(e) => return [findings, vec![e.to_string()]].concat(),
    };
    findings.extend(model.incomplete());
    findings.extend(unexpected_tensors(&model));
    findings
}

/// Tensors of the checkpoint that its config does not imply: names other than the embeddings,
/// the norms, the routers, and each module's weight with its scales.
fn unexpected_tensors(model: &Model) -> Vec<String> {
    let cfg = &model.config;
    const LINEAR: [&str; 4] = ["weight", "bias", "weight_packed", "weight_shape"];
    let names = cfg.names;
    let mut known: BTreeSet<String> =
        [format!("{}.weight", names.embed), format!("{}.weight", names.final_norm), format!("{}.bias", names.final_norm)].into();
    if let Some(n) = names.embed_norm {
        known.extend([format!("{n}.weight"), format!("{n}.bias")]);
    }
    let mut module = |m: &str| {
        for s in LINEAR.iter().chain(SCALE_SUFFIXES.iter()) {
            known.insert(format!("{m}.{s}"));
        }
    };
    module("lm_head");
    for l in 0..cfg.num_hidden_layers {
        for m in cfg.layer_modules(l) {
            module(&m.path);
        }
        for (router, _) in cfg.moe_layer(l).map(|moe| moe.routers(l)).unwrap_or_default() {
            module(&router);
        }
        let (p, attn) = (cfg.layer_prefix(l), cfg.attn_prefix(l));
        for norm in cfg.norms.slots().into_iter().flatten() {
            module(&format!("{p}.{norm}"));
        }
        module(&format!("{attn}.q_norm"));
        module(&format!("{attn}.k_norm"));
        // ModelOpt's KV-cache scales hang off k_proj / v_proj (§2.8), also where the
        // projections are fused or named otherwise; the compressed-tensors layout puts them
        // on the attention module.
        module(&format!("{attn}.k_proj"));
        module(&format!("{attn}.v_proj"));
        module(&attn);
    }
    let mut found: Vec<String> = model
        .weight_names()
        .into_iter()
        .filter(|n| !known.contains(n))
        .map(|n| format!("tensor {n}: not implied by config.json (unexpected in a {} checkpoint)", cfg.architecture))
        .collect();
    found.truncate(20);
    found
}

/// Whether `path` is a TensorRT-LLM checkpoint: a `.qnemo` file, or a folder whose config.json
/// has a `mapping` block (spec/export-formats.md §4.1, §5).
pub fn is_trtllm(path: &Path) -> bool {
    if path.is_file() {
        return std::fs::read(path).is_ok_and(|b| b.starts_with(&[0x1f, 0x8b]));
    }
    Json::parse_file(&path.join("config.json")).is_ok_and(|c| c.get("mapping").is_some())
}

/// `check` for a TensorRT-LLM checkpoint folder or `.qnemo` file (extracted to a temporary
/// folder first): every rank file present; per rank, each TRT-LLM module of the family's layout
/// (`export_trtllm::trt_family`) with its tensors in the dtype and TP-slice shape its format
/// prescribes, LayerNorm and GPT-variant linear biases, MoE routers and stacked experts
/// (config.json `moe`; §4.3, §4.4, §4.5: KV heads duplicated when tp > num_key_value_heads,
/// vocabulary padded to a multiple of tp); scales finite and
/// positive; FP8 KV factors >= 1 (this path clamps them); bits per parameter by format.
pub fn check_trtllm(path: &Path) -> Result<Report> {
    if !path.is_file() {
        return check_trtllm_dir(path);
    }
    let bytes = std::fs::read(path).map_err(|e| crate::error::Error::io(path, e))?;
    let members = crate::io::tar_gz::read_tar_gz(&bytes, path)?;
    // A private folder (mkdtemp, 0700) and files created relative to it with O_EXCL |
    // O_NOFOLLOW: nothing another user plants in /tmp can redirect the writes.
    let tmp = crate::io::tmp::PrivateDir::new("rq-min-verify-").map_err(|e| crate::error::Error::io(std::env::temp_dir(), e))?;
    for m in &members {
        let name = m.name.trim_start_matches("./");
        if name.is_empty() || name.contains('/') {
            continue; // only the top level holds the checkpoint
        }
        tmp.write(name, &m.data).map_err(|e| crate::error::Error::io(tmp.path().join(name), e))?;
    }
    check_trtllm_dir(tmp.path())
}

fn check_trtllm_dir(dir: &Path) -> Result<Report> {
    use crate::error::Error;
    use crate::io::safetensors::{Dtype, SafeTensors};
    let cp = dir.join("config.json");
    let c = Json::parse_file(&cp)?;
    let num = |k: &str| c.get(k).and_then(Json::as_usize).ok_or_else(|| Error::config(&cp, format!("missing or non-integer {k}")));
    let m = c.get("mapping").ok_or_else(|| Error::config(&cp, "no mapping"))?;
    let tp = m.get("tp_size").and_then(Json::as_usize).filter(|&n| n > 0).ok_or_else(|| Error::config(&cp, "mapping.tp_size"))?;
    let pp = m.get("pp_size").and_then(Json::as_usize).filter(|&n| n > 0).ok_or_else(|| Error::config(&cp, "mapping.pp_size"))?;
    let (heads, kv, head, hidden) = (num("num_attention_heads")?, num("num_key_value_heads")?, num("head_size")?, num("hidden_size")?);
    let (inter, vocab, layers) = (num("intermediate_size")?, num("vocab_size")?, num("num_hidden_layers")?);
    let model_dtype = match c.get("dtype").and_then(Json::as_str) {
        Some("float32") => Dtype::F32,
        Some("float16") => Dtype::F16,
        _ => Dtype::BF16,
    };
    let q = c.get("quantization").cloned().unwrap_or(Json::Null);
    let algo = q.get("quant_algo").and_then(Json::as_str).map(String::from);
    let excludes: Vec<String> =
        q.get("exclude_modules").and_then(Json::as_array).map_or(vec![], |a| a.iter().filter_map(Json::as_str).map(String::from).collect());
    let per_layer = match algo.as_deref() {
        Some("MIXED_PRECISION") => Some(Json::parse_file(&dir.join("quant_cfg.json"))?),
        _ => None,
    };
    let group = q.get("group_size").and_then(Json::as_usize).unwrap_or(128);
    let kv_fp8 = q.get("kv_cache_quant_algo").and_then(Json::as_str) == Some("FP8");
    let share = c.get("share_embedding_table").and_then(Json::as_bool) == Some(true);
    // The family's TensorRT-LLM linears (other architectures: LLaMA's gated MLP).
    let arch = c.get("architecture").and_then(Json::as_str).unwrap_or("");
    let family = crate::export::trtllm::trt_family(arch);
    let linears = family.map_or(crate::export::trtllm::GATED_LINEARS, |f| f.linears);
    // MoE families: every layer's MLP is the stacked experts of config.json's `moe` block.
    let experts = c.get("moe").and_then(|m| m.get("num_experts")).and_then(Json::as_usize).filter(|&n| n > 0);
    // LayerNorm families carry norm biases; GPT variants with `bias` one on every linear.
    let norm_bias = c.get("rmsnorm").and_then(Json::as_bool) == Some(false);
    let linear_bias = c.get("gpt_variant").is_some() && c.get("bias").and_then(Json::as_bool) == Some(true);

    let mut report = Report { groups: BTreeMap::new(), findings: Vec::new() };
    if family.is_some_and(|f| f.moe) && experts.is_none() {
        report.findings.push(format!("config.json: {arch} without a moe.num_experts"));
    }
    if heads % tp != 0 || (kv % tp != 0 && tp % kv != 0) || inter % tp != 0 || layers % pp != 0 {
        report.findings.push(format!("config.json: tp {tp} / pp {pp} do not split heads {heads}, kv heads {kv}, intermediate {inter}, layers {layers}"));
        return Ok(report);
    }
    let kv_rank = (kv / tp).max(1);
    let per_pp = layers / pp;
    let vocab_rank = vocab.div_ceil(tp);
    for r in 0..tp * pp {
        let file = dir.join(format!("rank{r}.safetensors"));
        if !file.exists() {
            report.findings.push(format!("rank{r}.safetensors is missing (world size {})", tp * pp));
            continue;
        }
        let st = SafeTensors::open(&file)?;
        let f = &mut report.findings;
        let rank = format!("rank{r}");
        let want = |f: &mut Vec<String>, name: &str, dtype: Dtype, shape: &[usize]| -> bool {
            match st.get(name) {
                None => f.push(format!("{rank}: {name} is missing")),
                Some(t) if t.dtype != dtype || t.shape != shape => f.push(format!(
                    "{rank}: {name} is {} {:?}, expected {} {shape:?}",
                    t.dtype.name(),
                    t.shape,
                    dtype.name()
                )),
                Some(_) => return true,
            }
            false
        };
        // One TRT-LLM linear `module` of `out` x `inp` per rank; `experts`: an MoE block's
        // stacked experts (every tensor with a leading expert dim, the per-tensor factors as
        // (E, 1), except the activation factor, one for all).
        let mut linear = |f: &mut Vec<String>, module: &str, out: usize, inp: usize, experts: Option<usize>| {
            let module = module.to_string();
            if linear_bias && experts.is_none() {
                want(f, &format!("{module}.bias"), model_dtype, &[out]);
            }
            let excluded = excludes.iter().any(|p| fnmatch(p, &module) || p.strip_suffix('*').is_some_and(|s| module.starts_with(s)));
            let module_algo = match &per_layer {
                Some(j) => j.get("quantized_layers").and_then(|m| m.get(&module)).and_then(|e| e.get("quant_algo")).and_then(Json::as_str),
                None if excluded => None,
                None => algo.as_deref(),
            };
            let g = per_layer
                .as_ref()
                .and_then(|j| j.get("quantized_layers")?.get(&module)?.get("group_size")?.as_usize())
                .unwrap_or(group);
            let (w_dtype, w_shape, mut scales): (Dtype, [usize; 2], Vec<(&str, Dtype, Vec<usize>)>) = match module_algo {
                None => (model_dtype, [out, inp], vec![]),
                Some("FP8") => (Dtype::F8E4M3, [out, inp], vec![("weights_scaling_factor", Dtype::F32, vec![1]), ("activation_scaling_factor", Dtype::F32, vec![1])]),
                Some("W8A8_SQ_PER_CHANNEL") => (Dtype::I8, [out, inp], vec![
                    ("weights_scaling_factor", Dtype::F32, vec![out]),
                    ("activation_scaling_factor", Dtype::F32, vec![1]),
                    ("prequant_scaling_factor", model_dtype, vec![inp]),
                ]),
                Some(a @ ("W4A16_AWQ" | "W4A8_AWQ")) => {
                    let mut s = vec![("weights_scaling_factor", Dtype::F32, vec![out, inp / g.max(1)]), ("prequant_scaling_factor", model_dtype, vec![inp])];
                    if a == "W4A8_AWQ" {
                        s.extend([("weights_scaling_factor_2", Dtype::F32, vec![1]), ("activation_scaling_factor", Dtype::F32, vec![1])]);
                    }
                    (Dtype::I8, [out / 2, inp], s)
                }
                Some("NVFP4") => (Dtype::U8, [out, inp / 2], vec![
                    ("weights_scaling_factor", Dtype::F8E4M3, vec![out, inp / 16]),
                    ("weights_scaling_factor_2", Dtype::F32, vec![1]),
                    ("activation_scaling_factor", Dtype::F32, vec![1]),
                ]),
                Some(other) => {
                    f.push(format!("{rank}: {module}: quant_algo {other} is not one this checker knows"));
                    return;
                }
            };
            let mut w_shape = w_shape.to_vec();
            if let Some(e) = experts {
                w_shape.insert(0, e);
                for (_, _, shape) in scales.iter_mut().filter(|(s, _, _)| *s != "activation_scaling_factor") {
                    shape.insert(0, e);
                }
            }
            let wname = format!("{module}.weight");
            if !want(f, &wname, w_dtype, &w_shape) {
                return;
            }
            let mut bytes = st.get(&wname).map_or(0, |t| t.data.len());
            for (suffix, dtype, shape) in scales {
                let sname = format!("{module}.{suffix}");
                if want(f, &sname, dtype, &shape) {
                    let t = st.get(&sname).expect("checked present");
                    check_scale(f, &format!("{rank}: {module}"), suffix, &t, inp);
                    if suffix.starts_with("weights_scaling_factor") {
                        bytes += t.data.len();
                    }
                }
            }
            let e = report.groups.entry(module_algo.unwrap_or("unquantized").to_string()).or_default();
            e.linears += 1;
            e.params += experts.unwrap_or(1) * out * inp;
            e.bytes += bytes;
        };
        let pp_rank = r / tp;
        if pp_rank == 0 {
            want(f, "transformer.vocab_embedding.weight", model_dtype, &[vocab_rank, hidden]);
        }
        if pp_rank == pp - 1 {
            want(f, "transformer.ln_f.weight", model_dtype, &[hidden]);
            if norm_bias {
                want(f, "transformer.ln_f.bias", model_dtype, &[hidden]);
            }
            if !(share && pp == 1) {
                want(f, "lm_head.weight", model_dtype, &[vocab_rank, hidden]);
            }
        }
        for l in 0..per_pp {
            let t = format!("transformer.layers.{l}");
            for norm in ["input_layernorm", "post_layernorm"] {
                want(f, &format!("{t}.{norm}.weight"), model_dtype, &[hidden]);
                if norm_bias {
                    want(f, &format!("{t}.{norm}.bias"), model_dtype, &[hidden]);
                }
            }
            for lin in linears {
                use crate::model::LinearKind;
                // Per rank: each member's rows (column-parallel) or the input slice (row).
                let rows = |k: &LinearKind| match k {
                    LinearKind::Q => heads / tp * head,
                    LinearKind::K | LinearKind::V => kv_rank * head,
                    LinearKind::O | LinearKind::Down => hidden,
                    LinearKind::Gate | LinearKind::Up => inter / tp,
                };
                let out: usize = lin.kinds.iter().map(rows).sum();
                let inp = match lin.kinds[0] {
                    LinearKind::O => heads * head / tp,
                    LinearKind::Down => inter / tp,
                    _ => hidden,
                };
                linear(f, &format!("{t}.{}", lin.name), out, inp, None);
            }
            if let Some(e) = experts {
                // MoE (export_trtllm module doc): the F32 router whole, fc = [w3_r; w1_r] and
                // proj = the input slice per expert, stacked.
                want(f, &format!("{t}.mlp.router.weight"), Dtype::F32, &[e, hidden]);
                linear(f, &format!("{t}.mlp.fc"), 2 * inter / tp, hidden, Some(e));
                linear(f, &format!("{t}.mlp.proj"), hidden, inter / tp, Some(e));
            }
            if kv_fp8 {
                for s in ["k_cache_scaling_factor", "v_cache_scaling_factor", "kv_cache_scaling_factor"] {
                    let name = format!("{t}.attention.{s}");
                    if want(f, &name, Dtype::F32, &[1]) {
                        let v = st.get(&name).and_then(|t| t.to_f32().ok()).map_or(f32::NAN, |v| v[0]);
                        if !(v >= 1.0 && v.is_finite()) {
                            f.push(format!("{rank}: {name} = {v}; TensorRT-LLM FP8 KV factors are >= 1"));
                        }
                    }
                }
            }
        }
    }
    Ok(report)
}
