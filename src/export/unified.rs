//! The unified Hugging Face checkpoint, laid out as ModelOpt's `export_hf_checkpoint` writes it
//! (spec/export-formats.md §2): model safetensors with per-format tensors per linear,
//! config.json with `quantization_config`, hf_quant_config.json, generation and tokenizer files.
//!
//! Output goes to a temporary folder beside the target that is renamed at the end, so a
//! failure leaves nothing half-written; the input folder is never written.

use crate::error::{Error, Result};
use crate::io::tmp::Target;
use crate::io::json::{obj, str, Json};
use crate::model::Model;
use crate::quant::{summarize_excludes, QFormat};
use crate::io::safetensors::{Dtype, Writer};
use std::path::{Path, PathBuf};

/// ModelOpt's `save_pretrained(max_shard_size="10GB")`.
pub const DEFAULT_SHARD_BYTES: usize = 10_000_000_000;

/// The Hugging Face tokenizer files of a model folder (copied where present).
pub(crate) const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
];

/// Files besides the tokenizer copied unchanged from the input folder when present (hf_ptq.py
/// saves the tokenizer beside the export).
const COPIED_FILES: &[&str] = &["generation_config.json", "chat_template.jinja"];

/// The checkpoint being written: tensors stream into a sharding writer inside a staging
/// folder; `finish` adds the configs and copied files and renames the folder into place.
pub struct Output {
    // Dropped first: a failed run's writer thread finishes before the staging folder goes.
    writer: Writer,
    staging: Staging,
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
        let mut config = model.config.raw.clone();
        config.set("quantization_config", quantization_config(spec));
        let hf_quant = hf_quant_config(spec);
        self.finish_with(model.dir(), &config, Some(&hf_quant))
    }

    /// Writes `config` as config.json, `hf_quant` (if any) as hf_quant_config.json and the
    /// files of `source` that are copied unchanged, then moves the folder into place.
    pub fn finish_with(self, source: &Path, config: &Json, hf_quant: Option<&Json>) -> Result<()> {
        let Output { staging, writer } = self;
        writer.finish()?;
        write_text(&staging.tmp.join("config.json"), &config.to_pretty(4))?;
        if let Some(h) = hf_quant {
            write_text(&staging.tmp.join("hf_quant_config.json"), &h.to_pretty(4))?;
        }
        for f in COPIED_FILES.iter().chain(TOKENIZER_FILES) {
            let src = source.join(f);
            if src.exists() {
                crate::io::copy_file(&src, &staging.tmp.join(f))?;
            }
        }
        staging.commit()
    }
}

/// What the configs describe.
pub struct QuantSpec {
    /// Quantized modules and their formats, in model order.
    pub quantized: Vec<(String, QFormat)>,
    /// Modules that carry quantizers but stay unquantized (lm_head, embeddings, exclusions).
    pub unquantized: Vec<String>,
    pub kv_fp8: bool,
    pub producer: (String, String),
}

impl QuantSpec {
    /// The single format, or None when the modules use several (ModelOpt's MIXED_PRECISION:
    /// "more than one distinct per-layer config", spec/export-formats.md §2.2).
    fn uniform(&self) -> Option<QFormat> {
        let first = self.quantized.first()?.1;
        self.quantized.iter().all(|(_, f)| *f == first).then_some(first)
    }
    fn excludes(&self) -> Vec<String> {
        let names: Vec<String> = self.quantized.iter().map(|(m, _)| m.clone()).collect();
        summarize_excludes(&self.unquantized, &names)
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

/// A format's keys in hf_quant_config.json besides `quant_algo` (spec/export-formats.md §2.2).
pub(crate) fn format_keys(f: QFormat, q: &mut Json) {
    if let Some(g) = f.group_size() {
        q.set("group_size", Json::Int(g as i64));
    }
    if f.awq() {
        q.set("has_zero_point", Json::Bool(false));
        q.set("pre_quant_scale", Json::Bool(true));
    }
}

/// `quantized_layers` of a MIXED_PRECISION config: module -> {quant_algo, format keys}.
fn quantized_layers(spec: &QuantSpec) -> Json {
    Json::Obj(
        spec.quantized
            .iter()
            .map(|(m, f)| {
                let mut q = obj([("quant_algo", str(f.quant_algo()))]);
                format_keys(*f, &mut q);
                (m.clone(), q)
            })
            .collect(),
    )
}

/// hf_quant_config.json (spec/export-formats.md §2.2): quant_algo, kv_cache_quant_algo, the
/// format's extra keys and exclude_modules; or MIXED_PRECISION with `quantized_layers`.
pub fn hf_quant_config(spec: &QuantSpec) -> Json {
    let kv = if spec.kv_fp8 { str("FP8") } else { Json::Null };
    let q = match spec.uniform() {
        Some(f) => {
            let mut q = obj([("quant_algo", str(f.quant_algo())), ("kv_cache_quant_algo", kv)]);
            format_keys(f, &mut q);
            q.set("exclude_modules", str_list(&spec.excludes()));
            q
        }
        None => obj([
            ("quant_algo", str("MIXED_PRECISION")),
            ("kv_cache_quant_algo", kv),
            ("quantized_layers", quantized_layers(spec)),
        ]),
    };
    obj([("producer", spec.producer()), ("quantization", q)])
}

/// A config group's activation and weight descriptions, for the formats that have one
/// (`convert_hf_quant_config_format` emits groups for FP8 and NVFP4, spec/export-formats.md §2.3).
fn config_group(f: QFormat) -> Option<Json> {
    let numbers = |bits: i64, group: Option<usize>| {
        let mut j = obj([("dynamic", Json::Bool(false)), ("num_bits", Json::Int(bits)), ("type", str("float"))]);
        if let Some(g) = group {
            j.set("group_size", Json::Int(g as i64));
        }
        j
    };
    let (act, w) = match f {
        QFormat::Fp8 => (numbers(8, None), numbers(8, None)),
        QFormat::Nvfp4 => (numbers(4, Some(16)), numbers(4, Some(16))),
        _ => return None,
    };
    Some(obj([("input_activations", act), ("weights", w)]))
}

/// config.json's `quantization_config`, ModelOpt's `convert_hf_quant_config_format`
/// (spec/export-formats.md §2.3): `config_groups` only for FP8 and NVFP4 (targets `Linear`), or
/// for MIXED_PRECISION one group per distinct format (targets: its sorted module names) and a
/// copy of `quantized_layers`.
fn quantization_config(spec: &QuantSpec) -> Json {
    let mut q = Json::Obj(vec![]);
    match spec.uniform() {
        Some(f) => {
            if let Some(mut g) = config_group(f) {
                g.set("targets", Json::Arr(vec![str("Linear")]));
                q.set("config_groups", obj([("group_0", g)]));
            }
            q.set("ignore", str_list(&spec.excludes()));
            q.set("quant_algo", str(f.quant_algo()));
        }
        None => {
            let mut formats: Vec<QFormat> = Vec::new();
            for (_, f) in &spec.quantized {
                if !formats.contains(f) {
                    formats.push(*f);
                }
            }
            let mut groups = Vec::new();
            for f in formats {
                let Some(mut g) = config_group(f) else { continue };
                let mut targets: Vec<String> = spec.quantized.iter().filter(|(_, x)| *x == f).map(|(m, _)| m.clone()).collect();
                targets.sort();
                g.set("targets", str_list(&targets));
                groups.push((format!("group_{}", groups.len()), g));
            }
            q.set("config_groups", Json::Obj(groups));
            q.set("quantized_layers", quantized_layers(spec));
            q.set("ignore", Json::Arr(vec![]));
            q.set("quant_algo", str("MIXED_PRECISION"));
        }
    }
    if spec.kv_fp8 {
        q.set("kv_cache_scheme", obj([("dynamic", Json::Bool(false)), ("num_bits", Json::Int(8)), ("type", str("float"))]));
    }
    q.set("producer", spec.producer());
    q.set("quant_method", str("modelopt"));
    q
}

/// A temporary output folder beside the target, removed on drop unless committed.
pub(crate) struct Staging {
    pub(crate) tmp: PathBuf,
    target: Target,
    committed: bool,
}

impl Staging {
    /// A staging folder beside `out`, which must not be or hold the `input` model; an existing
    /// `out` is refused unless `force` (and then only that entry is replaced, at `commit`).
    /// Temporary folders that runs which are gone left beside `out` are removed first.
    pub(crate) fn new(input: &Path, out: &Path, force: bool) -> Result<Staging> {
        crate::io::tmp::check_out_vs_input(input, out)?;
        let target = Target::new(out, force)?;
        let parent = crate::io::tmp::parent_of(out);
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        for stale in crate::io::tmp::remove_stale_beside(out) {
            crate::err!("rq-min: removed {}, left by a run that is gone", stale.display());
        }
        // A new folder under a random name (mkdir fails on anything planted there).
        let tmp = crate::io::tmp::temp_dir_beside(out, "tmp").map_err(|e| Error::io(&parent, e))?;
        Ok(Staging { tmp, target, committed: false })
    }

    /// Publishes the finished folder onto `out` (`Target::publish`).
    pub(crate) fn commit(mut self) -> Result<()> {
        self.target.publish(&self.tmp)?;
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
