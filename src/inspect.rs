//! `rq-min inspect`: what a checkpoint holds, bits per parameter by format, and the places where
//! its config and its tensors disagree (as a loader would find them).

use crate::error::Result;
use crate::json::Json;
use crate::quant::read::{detect, Stored};
use crate::quant::{fnmatch, QFormat};
use crate::safetensors::{Checkpoint, TensorView};
use std::collections::BTreeMap;
use std::path::Path;

/// Tensor suffixes that belong to a quantized linear besides its `weight`.
const SCALE_SUFFIXES: [&str; 6] = ["weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale"];

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
        let Some(module) = name.strip_suffix(".weight") else { continue };
        let w = ck.tensor(name)?;
        if w.shape.len() != 2 {
            continue; // norms
        }
        let get = |suffix: &str| ck.get(&format!("{module}.{suffix}"));
        let scale = get("weight_scale");
        let Some((stored, [out, inp])) = detect(&w, scale.as_ref()) else {
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
        g.bytes += w.data.len() + scale.map_or(0, |s| s.data.len()) + get("weight_scale_2").map_or(0, |s| s.data.len());

        for suffix in SCALE_SUFFIXES {
            if let Some(t) = get(suffix) {
                check_scale(&mut report.findings, module, suffix, &t, inp);
            }
        }
        if stored == Stored::Nvfp4 && get("weight_scale_2").is_none() {
            report.findings.push(format!("{module}: NVFP4 weight without weight_scale_2"));
        }
        let excluded = excludes.iter().any(|p| fnmatch(p, module));
        let is_embedding = module.ends_with("embed_tokens");
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
    Ok(report)
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
