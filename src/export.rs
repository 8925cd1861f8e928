//! The unified Hugging Face checkpoint, laid out as ModelOpt's `export_hf_checkpoint` writes it
//! (spec/export-formats.md §2): model safetensors with per-format tensors per linear,
//! config.json with `quantization_config`, hf_quant_config.json, generation and tokenizer files.
//!
//! Output goes to a temporary folder beside the target that is renamed at the end, so a
//! failure leaves nothing half-written; the input folder is never written.

use crate::error::{Error, Result};
use crate::json::{obj, str, Json};
use crate::model::Model;
use crate::progress::Progress;
use crate::quant::{fp8, summarize_excludes, QFormat};
use crate::safetensors::{Dtype, Writer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// ModelOpt's `save_pretrained(max_shard_size="10GB")`.
pub const DEFAULT_SHARD_BYTES: usize = 10_000_000_000;

/// Files copied unchanged from the input folder when present (hf_ptq.py saves the tokenizer
/// beside the export).
const COPIED_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

/// What to write: the format, and per quantized module its calibrated input amax.
pub struct Plan {
    pub format: QFormat,
    /// Quantized linear modules (full HF names) -> calibrated input amax.
    pub quantized: HashMap<String, f32>,
    /// Modules that carry quantizers but stay unquantized (lm_head, embeddings, exclusions).
    pub unquantized: Vec<String>,
    pub producer: (String, String),
    pub shard_bytes: usize,
}

/// Writes the quantized checkpoint of `model` to `out`.
pub fn write(model: &Model, plan: &Plan, out: &Path, force: bool, progress: &Progress) -> Result<()> {
    let staging = Staging::new(model.dir(), out, force)?;
    let dtype = model.dtype()?;
    let mut writer = Writer::new(&staging.tmp, plan.shard_bytes, vec![("format".into(), "pt".into())]);
    let names = model.weight_names();
    for (i, name) in names.iter().enumerate() {
        let view = model.tensor(name)?;
        let module = name.strip_suffix(".weight").filter(|m| plan.quantized.contains_key(*m));
        match module {
            Some(m) => {
                let w = view.to_f32()?;
                if let Some(i) = w.iter().position(|x| !x.is_finite()) {
                    return Err(Error::tensor(name.as_str(), format!("holds {} at index {i}", w[i])));
                }
                let scale = fp8::scale_from_amax(fp8::absmax(&w));
                writer.add(name, Dtype::F8E4M3, view.shape, fp8::quantize(&w, scale, dtype))?;
                writer.add(&format!("{m}.weight_scale"), Dtype::F32, &[], scale.to_le_bytes().to_vec())?;
                let s_in = fp8::input_scale(plan.quantized[m], dtype);
                writer.add(&format!("{m}.input_scale"), Dtype::F32, &[], s_in.to_le_bytes().to_vec())?;
            }
            None => writer.add(name, view.dtype, view.shape, view.data.to_vec())?,
        }
        if (i + 1) % 64 == 0 || i + 1 == names.len() {
            progress.step("tensors written", i + 1, names.len());
        }
    }
    writer.finish()?;

    let hf_quant = hf_quant_config(plan);
    let mut config = model.config.raw.clone();
    config.set("quantization_config", quantization_config(plan, &hf_quant));
    write_text(&staging.tmp.join("config.json"), &config.to_pretty(4))?;
    write_text(&staging.tmp.join("hf_quant_config.json"), &hf_quant.to_pretty(4))?;
    for f in COPIED_FILES {
        let src = model.dir().join(f);
        if src.exists() {
            std::fs::copy(&src, staging.tmp.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    staging.commit()
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn excludes(plan: &Plan) -> Vec<String> {
    let quantized: Vec<String> = plan.quantized.keys().cloned().collect();
    summarize_excludes(&plan.unquantized, &quantized)
}

/// hf_quant_config.json (spec/export-formats.md §2.2).
pub fn hf_quant_config(plan: &Plan) -> Json {
    let (name, version) = &plan.producer;
    obj([
        ("producer", obj([("name", str(name)), ("version", str(version))])),
        (
            "quantization",
            obj([
                ("quant_algo", str(plan.format.quant_algo())),
                ("kv_cache_quant_algo", Json::Null),
                ("exclude_modules", Json::Arr(excludes(plan).iter().map(|s| str(s)).collect())),
            ]),
        ),
    ])
}

/// config.json's `quantization_config`, ModelOpt's `convert_hf_quant_config_format`
/// (spec/export-formats.md §2.3).
fn quantization_config(plan: &Plan, hf_quant: &Json) -> Json {
    let fp8 = || obj([("dynamic", Json::Bool(false)), ("num_bits", Json::Int(8)), ("type", str("float"))]);
    let group = obj([
        ("input_activations", fp8()),
        ("weights", fp8()),
        ("targets", Json::Arr(vec![str("Linear")])),
    ]);
    obj([
        ("config_groups", obj([("group_0", group)])),
        ("ignore", Json::Arr(excludes(plan).iter().map(|s| str(s)).collect())),
        ("quant_algo", str(plan.format.quant_algo())),
        ("producer", hf_quant.get("producer").cloned().unwrap_or(Json::Null)),
        ("quant_method", str("modelopt")),
    ])
}

/// A temporary output folder beside the target, removed on drop unless committed.
struct Staging {
    tmp: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl Staging {
    fn new(input: &Path, out: &Path, force: bool) -> Result<Staging> {
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        if out.exists() {
            if canon(out) == canon(input) || canon(input).starts_with(canon(out)) {
                return Err(Error::Usage(format!(
                    "--out {} is the input model folder (or holds it); refusing to overwrite it",
                    out.display()
                )));
            }
            if !force {
                return Err(Error::Usage(format!(
                    "output folder {} already exists; pass --force to replace it",
                    out.display()
                )));
            }
        }
        let name = out
            .file_name()
            .ok_or_else(|| Error::Usage(format!("--out {} has no folder name", out.display())))?;
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let tmp = parent.join(format!(".{}.rq-min-tmp-{}", name.to_string_lossy(), std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Staging { tmp, out: out.to_path_buf(), committed: false })
    }

    fn commit(mut self) -> Result<()> {
        if self.out.exists() {
            std::fs::remove_dir_all(&self.out).map_err(|e| Error::io(&self.out, e))?;
        }
        std::fs::rename(&self.tmp, &self.out).map_err(|e| Error::io(&self.out, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}
