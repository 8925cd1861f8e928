//! The unified Hugging Face checkpoint, laid out as ModelOpt's `export_hf_checkpoint` writes it
//! (spec/export-formats.md §2): model safetensors with per-format tensors per linear,
//! config.json with `quantization_config`, hf_quant_config.json, generation and tokenizer files.
//!
//! Output goes to a temporary folder beside the target that is renamed at the end, so a
//! failure leaves nothing half-written; the input folder is never written.

use crate::error::{Error, Result};
use crate::json::{obj, str, Json};
use crate::model::Model;
use crate::quant::{summarize_excludes, QFormat};
use crate::safetensors::{Dtype, Writer};
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

/// The checkpoint being written: tensors stream into a sharding writer inside a staging
/// folder; `finish` adds the configs and copied files and renames the folder into place.
pub struct Output {
    staging: Staging,
    writer: Writer,
}

impl Output {
    /// Refuses an existing `out` unless `force`, and never accepts the input folder.
    pub fn create(input: &Path, out: &Path, force: bool, shard_bytes: usize) -> Result<Output> {
        let staging = Staging::new(input, out, force)?;
        let writer = Writer::new(&staging.tmp, shard_bytes, vec![("format".into(), "pt".into())]);
        Ok(Output { staging, writer })
    }

    pub fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: Vec<u8>) -> Result<()> {
        self.writer.add(name, dtype, shape, data)
    }

    /// Writes config.json (the model's, with `quantization_config`), hf_quant_config.json and
    /// the copied files, then moves the folder into place.
    pub fn finish(self, model: &Model, spec: &QuantSpec) -> Result<()> {
        let Output { staging, writer } = self;
        writer.finish()?;
        let hf_quant = hf_quant_config(spec);
        let mut config = model.config.raw.clone();
        config.set("quantization_config", quantization_config(spec));
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
}

/// What the configs describe.
pub struct QuantSpec {
    pub format: QFormat,
    pub kv_fp8: bool,
    pub quantized: Vec<String>,
    /// Modules that carry quantizers but stay unquantized (lm_head, embeddings, exclusions).
    pub unquantized: Vec<String>,
    pub producer: (String, String),
}

impl QuantSpec {
    fn excludes(&self) -> Vec<String> {
        summarize_excludes(&self.unquantized, &self.quantized)
    }
    fn producer(&self) -> Json {
        obj([("name", str(&self.producer.0)), ("version", str(&self.producer.1))])
    }
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn str_list(v: &[String]) -> Json {
    Json::Arr(v.iter().map(|s| str(s)).collect())
}

/// hf_quant_config.json (spec/export-formats.md §2.2): quant_algo, kv_cache_quant_algo, the
/// format's extra keys, exclude_modules.
pub fn hf_quant_config(spec: &QuantSpec) -> Json {
    let f = spec.format;
    let mut q = obj([
        ("quant_algo", str(f.quant_algo())),
        ("kv_cache_quant_algo", if spec.kv_fp8 { str("FP8") } else { Json::Null }),
    ]);
    if let Some(g) = f.group_size() {
        q.set("group_size", Json::Int(g as i64));
    }
    if f.awq() {
        q.set("has_zero_point", Json::Bool(false));
        q.set("pre_quant_scale", Json::Bool(true));
    }
    q.set("exclude_modules", str_list(&spec.excludes()));
    obj([("producer", spec.producer()), ("quantization", q)])
}

/// config.json's `quantization_config`, ModelOpt's `convert_hf_quant_config_format`
/// (spec/export-formats.md §2.3): `config_groups` only for FP8 and NVFP4.
fn quantization_config(spec: &QuantSpec) -> Json {
    let numbers = |bits: i64, group: Option<usize>| {
        let mut j = obj([("dynamic", Json::Bool(false)), ("num_bits", Json::Int(bits)), ("type", str("float"))]);
        if let Some(g) = group {
            j.set("group_size", Json::Int(g as i64));
        }
        j
    };
    let mut q = Json::Obj(vec![]);
    let group = match spec.format {
        QFormat::Fp8 => Some((numbers(8, None), numbers(8, None))),
        QFormat::Nvfp4 => Some((numbers(4, Some(16)), numbers(4, Some(16)))),
        _ => None,
    };
    if let Some((act, w)) = group {
        let g = obj([("input_activations", act), ("weights", w), ("targets", Json::Arr(vec![str("Linear")]))]);
        q.set("config_groups", obj([("group_0", g)]));
    }
    q.set("ignore", str_list(&spec.excludes()));
    q.set("quant_algo", str(spec.format.quant_algo()));
    if spec.kv_fp8 {
        q.set("kv_cache_scheme", numbers(8, None));
    }
    q.set("producer", spec.producer());
    q.set("quant_method", str("modelopt"));
    q
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
