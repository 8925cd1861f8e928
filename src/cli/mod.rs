//! What the `rq-min` subcommands do, callable from tests without spawning the binary.

use crate::compute::Device;
use crate::ptq::calib::{self, Source, DEFAULT_EVAL_TEXT};
use crate::error::{Error, Result};
use crate::export::unified::{self, Output, QuantSpec};
use crate::io::json::Json;
use crate::compute::Compute;
use crate::model::{Model};
use crate::ptq::eval;
use crate::ptq::memory;
use crate::ptq::quantize;
use crate::ptq::autoquant;
use crate::ptq::progress::Progress;
use crate::model::config::ModelConfig;
use crate::quant::{fnmatch, Exclusions, QFormat};
use crate::io::safetensors::{Checkpoint, Dtype, SafeTensors, TensorInfo};
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

pub mod synth;
pub use synth::{synth, SynthArgs};


#[derive(Clone, Debug)]
pub struct QuantizeArgs {
    pub model: PathBuf,
    pub out: PathBuf,
    pub qformat: String,
    pub calib_text: Option<PathBuf>,
    pub calib_ids: Option<PathBuf>,
    pub calib_size: usize,
    /// Tokens per calibration row; None: 512, or the model's max_position_embeddings when smaller.
    pub calib_seq: Option<usize>,
    pub exclude: Vec<String>,
    pub kv_cache: String,
    pub sq_alpha: f32,
    pub layer_formats: Option<PathBuf>,
    pub auto_bits: Option<f64>,
    pub score_size: usize,
    pub seed: u64,
    pub eval_text: Option<PathBuf>,
    pub eval_seq: usize,
    pub no_eval: bool,
    pub force: bool,
    pub device: String,
    pub quiet: bool,
    /// `hf` (unified Hugging Face checkpoint), `trtllm` (TensorRT-LLM checkpoint) or
    /// `compressed-tensors` (vLLM / transformers compressed-tensors layout, export_ct.rs).
    pub export: String,
    /// TensorRT-LLM tensor / pipeline parallel sizes (`--export trtllm` only).
    pub tp: usize,
    pub pp: usize,
    /// `--strict`: an `--exclude` pattern or `--layer-formats` module that names no module of
    /// the model is an error (by default a warning).
    pub strict: bool,
    /// `--auto-exclude`: leave unquantized the linears whose shape their format cannot store
    /// (`quantize::unstorable`) instead of refusing the run, and say which.
    pub auto_exclude: bool,
    /// `--dry-run`: print the memory estimate (`ptq::memory`) and stop before any calibration;
    /// nothing is written.
    pub dry_run: bool,
}

impl QuantizeArgs {
    /// The command's defaults (those of `rq-min quantize --help`) for `model` -> `out`.
    pub fn new(model: &Path, out: &Path) -> QuantizeArgs {
        QuantizeArgs {
            model: model.to_path_buf(),
            out: out.to_path_buf(),
            qformat: "fp8".into(),
            calib_text: None,
            calib_ids: None,
            calib_size: 128,
            calib_seq: None,
            exclude: vec![],
            kv_cache: "none".into(),
            sq_alpha: 1.0,
            layer_formats: None,
            auto_bits: None,
            score_size: 64,
            seed: 1234,
            eval_text: None,
            eval_seq: 256,
            no_eval: false,
            force: false,
            device: "cpu".into(),
            quiet: false,
            export: "hf".into(),
            tp: 1,
            pp: 1,
            strict: false,
            auto_exclude: false,
            dry_run: false,
        }
    }
}

pub struct EvalArgs {
    pub model: PathBuf,
    pub text: Option<PathBuf>,
    /// Token ids to score instead of text: a JSON array of rows, one window per row.
    pub ids: Option<PathBuf>,
    /// Where to write the f32 logits (`logits`, `[rows, seq, vocab]`).
    pub logits: Option<PathBuf>,
    pub seq: usize,
    pub base: Option<PathBuf>,
    pub dtype: String,
    pub device: String,
    pub quiet: bool,
}

/// `rq-min quantize`: calibrate, quantize, export, and report perplexity before and after.
/// With `export = "trtllm"` the unified checkpoint goes to a temporary folder beside `out`
/// and is converted into a TensorRT-LLM checkpoint (`export_trtllm`); `qformat = "none"`
/// (trtllm only) converts the original model unquantized.
pub fn quantize(a: &QuantizeArgs) -> Result<()> {
    if Device::parse(&a.device)? == Device::Cuda && a.export != "hf" {
        return Err(Error::Unsupported(format!(
            "--device cuda: --export {} is not on the device yet (only --export hf); use --device cpu",
            a.export
        )));
    }
    check_folder("--model", &a.model)?;
    crate::io::tmp::check_out_vs_input(&a.model, &a.out)?;
    if a.dry_run {
        // The estimate of the calibration every export runs; nothing is written.
        return unified_export(&QuantizeArgs { no_eval: a.no_eval || a.export != "hf", ..a.clone() }, false, Step::Final);
    }
    match a.export.as_str() {
        "hf" => {
            if a.tp != 1 || a.pp != 1 {
                return Err(Error::Usage("--tp / --pp need --export trtllm".into()));
            }
            if a.qformat == "none" {
                return Err(Error::Usage("--qformat none needs --export trtllm".into()));
            }
            quantize_unified(a)
        }
        "trtllm" => quantize_trtllm(a, false),
        "qnemo" => quantize_trtllm(a, true),
        "compressed-tensors" => quantize_ct(a),
        other => Err(Error::Usage(format!("unknown --export '{other}'; supported: hf, trtllm, qnemo, compressed-tensors"))),
    }
}

/// A new, empty temporary folder `.{name}.rq-min-{what}-{random}` beside `out` (same file
/// system, so the final rename stays atomic); created here so the name is ours and a planted
/// symlink cannot take its place.
fn temp_beside(out: &Path, what: &str) -> Result<PathBuf> {
    if out.file_name().is_none() {
        return Err(Error::Usage(format!("--out {} has no folder name", out.display())));
    }
    let parent = crate::io::tmp::parent_of(out);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    crate::io::tmp::temp_dir_beside(out, what).map_err(|e| Error::io(&parent, e))
}

/// `--export compressed-tensors`: the unified checkpoint, quantized in compressed-tensors mode
/// (`quantize::Options::compressed_tensors`), goes to a temporary folder beside `out` and is
/// re-encoded tensor by tensor (`export_ct::convert`); evaluation reads the final folder.
fn quantize_ct(a: &QuantizeArgs) -> Result<()> {
    if a.tp != 1 || a.pp != 1 {
        return Err(Error::Usage("--tp / --pp need --export trtllm".into()));
    }
    // Every format the run may write needs a compressed-tensors scheme (W4A8 has none).
    let formats: Vec<(String, QFormat)> = match &a.layer_formats {
        Some(path) => layer_formats_file(path)?.into_iter().collect(),
        None => a.qformat.split(',').map(|f| Ok(("--qformat".to_string(), QFormat::parse(f.trim())?))).collect::<Result<_>>()?,
    };
    for (module, f) in formats {
        crate::export::compressed_tensors::scheme(f).map_err(|e| Error::Unsupported(format!("{module}: {e}")))?;
    }
    // What --out is now is what --force may replace; anything appearing later is refused.
    crate::io::tmp::Target::new(&a.out, a.force)?;
    let replace = a.force && crate::io::tmp::file_id(&a.out).is_some();
    let tmp = temp_beside(&a.out, "unified")?;
    let unified = QuantizeArgs { out: tmp.clone(), force: true, export: "hf".into(), no_eval: true, ..a.clone() };
    let result = unified_export(&unified, true, Step::Intermediate)
        .and_then(|()| crate::export::compressed_tensors::convert(&tmp, &a.out, replace));
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    crate::out!("exported compressed-tensors checkpoint -> {}", a.out.display());
    if !a.no_eval {
        let args = EvalArgs {
            model: a.out.clone(),
            text: a.eval_text.clone(),
            ids: None,
            logits: None,
            seq: a.eval_seq,
            base: None,
            dtype: "f32".into(),
            device: a.device.clone(),
            quiet: a.quiet,
        };
        eval(&args)?;
    }
    Ok(())
}

/// `--export trtllm` (a folder) or `--export qnemo` (the same checkpoint as a `.qnemo` tarball
/// with the tokenizer, built in a temporary folder beside `out`).
fn quantize_trtllm(a: &QuantizeArgs, qnemo: bool) -> Result<()> {
    use crate::export::trtllm::{check_model, check_split, convert, write_qnemo, TrtllmOptions};
    if a.tp == 0 || a.pp == 0 {
        return Err(Error::Usage("--tp and --pp must be at least 1".into()));
    }
    // What --out is now is what --force may replace; anything appearing later is refused.
    let target = crate::io::tmp::Target::new(&a.out, a.force)?;
    let existed = crate::io::tmp::file_id(&a.out).is_some();
    // Fail on the model and the split before calibrating.
    let cfg = crate::model::config::ModelConfig::from_dir(&a.model)?;
    check_model(&cfg)?;
    Model::open(&a.model, None)?.check_complete()?;
    check_split(&cfg, a.tp, a.pp)?;
    if cfg.moe.is_some() && a.qformat.split(',').any(|f| f.trim() == "int8_sq") && a.layer_formats.is_none() {
        return Err(Error::Unsupported(
            "TensorRT-LLM export of INT8 SmoothQuant MoE experts (TensorRT-LLM's MoE plugin has no W8A8 path)".into(),
        ));
    }
    let temp = |what: &str| temp_beside(&a.out, what);
    let (folder, opts) = match qnemo {
        true => (temp("trtllm")?, TrtllmOptions { tp: a.tp, pp: a.pp, force: true }),
        false => (a.out.clone(), TrtllmOptions { tp: a.tp, pp: a.pp, force: a.force && existed }),
    };
    let unified = if a.qformat == "none" { None } else { Some(temp("unified")?) };
    let result = match &unified {
        Some(tmp) => {
            let args = QuantizeArgs { out: tmp.clone(), force: true, export: "hf".into(), tp: 1, pp: 1, ..a.clone() };
            unified_export(&args, false, Step::Intermediate).and_then(|()| convert(&a.model, Some(tmp), &folder, &opts))
        }
        None => convert(&a.model, None, &folder, &opts),
    };
    let result = result.and_then(|()| if qnemo { write_qnemo(&a.model, &folder, &target) } else { Ok(()) });
    if let Some(tmp) = &unified {
        let _ = std::fs::remove_dir_all(tmp);
    }
    if qnemo {
        let _ = std::fs::remove_dir_all(&folder);
    }
    result?;
    let what = if a.qformat == "none" { "unquantized " } else { "" };
    let kind = if qnemo { ".qnemo" } else { "TensorRT-LLM checkpoint" };
    crate::out!("exported {what}{kind} (tp {}, pp {}) -> {}", a.tp, a.pp, a.out.display());
    Ok(())
}

fn quantize_unified(a: &QuantizeArgs) -> Result<()> {
    quantize_unified_with(a, false)
}

/// Whether a unified export is what the user asked for, or a temporary step of another layout
/// (its summary line then does not name the temporary folder).
#[derive(Clone, Copy, PartialEq)]
enum Step {
    Final,
    Intermediate,
}

/// `compressed_tensors`: quantize in compressed-tensors mode (`quantize::Options`).
pub fn quantize_unified_with(a: &QuantizeArgs, compressed_tensors: bool) -> Result<()> {
    unified_export(a, compressed_tensors, Step::Final)
}

/// Refuses, by name, what `--device cuda` does not run yet: the TensorRT-LLM export (every
/// format runs there: the statistics and AWQ's search on the device; auto-quantize's forward
/// on the device, its gradient passes on the host).
fn check_device_quantize(a: &QuantizeArgs) -> Result<()> {
    let refuse = |what: String| Err(Error::Unsupported(format!("--device cuda: {what} is not on the device yet; use --device cpu")));
    if a.export != "hf" {
        return refuse(format!("--export {}", a.export));
    }
    Ok(())
}

/// Checks the estimate against the device's free memory: an error naming both (with the
/// estimate's table) when a device run cannot fit, unless `dry_run`; returns a line saying how
/// much the device has.
fn check_memory(estimate: &memory::Estimate, device: Device, dry_run: bool) -> Result<String> {
    let need = memory::peak(&estimate.device);
    let (free, total) = match device.memory() {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(String::new()),
        Err(e) if dry_run => return Ok(format!("device memory: unknown ({e})")),
        Err(e) => return Err(e),
    };
    let line = format!("device memory: {} free of {}", memory::gib(free), memory::gib(total));
    if need <= free {
        return Ok(format!("{line}: the run fits"));
    }
    if dry_run {
        return Ok(format!("{line}: the run needs about {}, it does NOT fit", memory::gib(need)));
    }
    Err(Error::Unsupported(format!(
        "--device cuda: the run needs about {} of device memory, the GPU has {} free of {}; \
         use fewer or shorter calibration rows (--calib-size, --calib-seq) or --device cpu\n{}",
        memory::gib(need),
        memory::gib(free),
        memory::gib(total),
        estimate.table().trim_end()
    )))
}

fn unified_export(a: &QuantizeArgs, compressed_tensors: bool, step: Step) -> Result<()> {
    let device = Device::parse(&a.device)?;
    let formats: Vec<QFormat> = a.qformat.split(',').map(|f| QFormat::parse(f.trim())).collect::<Result<_>>()?;
    if device == Device::Cuda {
        if compressed_tensors {
            return Err(Error::Unsupported(
                "--device cuda: --export compressed-tensors is not on the device yet; use --device cpu".into(),
            ));
        }
        check_device_quantize(a)?;
    }
    if !a.dry_run {
        device.check_available()?;
    }
    let format = formats[0];
    if formats.len() > 1 && a.auto_bits.is_none() {
        return Err(Error::Usage("several --qformat values need --auto-bits (auto-quantize)".into()));
    }
    if a.auto_bits.is_some() && a.layer_formats.is_some() {
        return Err(Error::Usage("give --auto-bits or --layer-formats, not both".into()));
    }
    if a.calib_text.is_some() && a.calib_ids.is_some() {
        return Err(Error::Usage("give --calib-text or --calib-ids, not both".into()));
    }
    if a.score_size == 0 {
        return Err(Error::Usage("--score-size 0: auto-quantize needs at least 1 score row".into()));
    }
    let progress = Progress::new("quantize", a.quiet);
    let model = Model::open(&a.model, None)?;
    model.check_complete()?;
    let cfg = &model.config;
    let calib_seq = match a.calib_seq {
        Some(seq) if a.calib_ids.is_none() => check_seq("--calib-seq", seq, cfg).map(|()| seq)?,
        Some(seq) => seq,
        None => DEFAULT_CALIB_SEQ.min(cfg.max_position_embeddings),
    };
    if !a.no_eval {
        check_seq("--eval-seq", a.eval_seq, cfg)?;
    }
    let modules: Vec<String> = (0..cfg.num_hidden_layers)
        .flat_map(|l| cfg.layer_modules(l).into_iter().map(|m| m.path))
        .chain(["lm_head".to_string()])
        .collect();
    let user_patterns = split_patterns(&a.exclude);
    if user_patterns != ["none"] {
        check_patterns("--exclude pattern", &user_patterns, &modules, a.strict)?;
    }
    // The --layer-formats file, read once.
    let layer_formats = a.layer_formats.as_ref().map(|p| layer_formats_file(p)).transpose()?;
    if let (Some(path), Some(per_module)) = (&a.layer_formats, &layer_formats) {
        let names: Vec<String> = per_module.keys().cloned().collect();
        check_patterns(&format!("--layer-formats {} module", path.display()), &names, &modules, a.strict)?;
    }
    let needs_tok = a.calib_ids.is_none() || !a.no_eval;
    let tok = if needs_tok { Some(Tokenizer::from_dir(&a.model)?) } else { None };
    let source = match (&a.calib_text, &a.calib_ids) {
        (Some(t), _) => Source::Text(t),
        (_, Some(i)) => Source::Ids(i),
        _ => Source::Builtin,
    };
    let samples = calib::load(source, tok.as_ref(), a.calib_size, calib_seq)?;
    let vocab = model.config.vocab_size;
    if let Some(bad) = samples.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(Error::Usage(format!("calibration token id {bad} is outside the vocabulary ({vocab})")));
    }
    let max = model.config.max_position_embeddings;
    if let Some((r, row)) = samples.iter().enumerate().find(|(_, s)| s.len() > max) {
        return Err(Error::Usage(format!(
            "calibration row {r} has {} tokens, more than the model's max_position_embeddings ({max})",
            row.len()
        )));
    }
    if !a.quiet {
        eprintln!("calibration: {} samples, {} tokens", samples.len(), samples.iter().map(Vec::len).sum::<usize>());
    }

    // ModelOpt calibrates the model in its own dtype; rounding like bf16 PyTorch does
    // reproduces its activation statistics (other dtypes calibrate in f32).
    let mut model = model;
    model.compute = if model.dtype()? == Dtype::BF16 { Compute::Bf16 } else { Compute::F32 };
    model.device = device;
    let awq = formats.iter().any(|f| f.awq())
        || layer_formats.as_ref().is_some_and(|m| m.values().any(|f| f.awq()));
    let plan = memory::Plan {
        rows: samples.len(),
        seq: samples.iter().map(Vec::len).max().unwrap_or(0),
        awq,
        auto_quantize: a.auto_bits.map(|_| (a.score_size.min(samples.len()), formats.len())),
        eval_seq: (!a.no_eval).then_some(a.eval_seq),
        device,
        shard_bytes: unified::DEFAULT_SHARD_BYTES,
    };
    let estimate = memory::estimate(&model, &plan)?;
    let room = check_memory(&estimate, device, a.dry_run)?;
    if a.dry_run {
        crate::out!("{}{room}\ndry run: nothing calibrated, nothing written", estimate.table());
        return Ok(());
    }
    let mut exclusions = Exclusions::new(&split_patterns(&a.exclude));
    let mut layer_formats = layer_formats;
    if a.auto_exclude {
        // Every format the run may give a linear: the --layer-formats file's, else each --qformat.
        let bad: Vec<quantize::Unstorable> = match &mut layer_formats {
            Some(map) => {
                let bad = quantize::unstorable(&model.config, &quantize::Formats::PerModule(map.clone()));
                for b in &bad {
                    map.remove(&b.module);
                }
                bad
            }
            None => {
                let mut bad: Vec<quantize::Unstorable> = Vec::new();
                for &f in &formats {
                    for b in quantize::unstorable(&model.config, &quantize::Formats::Uniform(f, exclusions.clone())) {
                        if !bad.iter().any(|x| x.module == b.module) {
                            bad.push(b);
                        }
                    }
                }
                bad
            }
        };
        if !bad.is_empty() {
            let patterns = quantize::exclude_patterns(&model.config, &bad);
            exclusions = exclusions.with(&patterns);
            crate::err!(
                "--auto-exclude: {} linear(s) left unquantized ({}), their shape cannot be stored in the format: --exclude {}",
                bad.len(),
                model.dtype()?.name(),
                patterns.join(",")
            );
        }
    }
    let mut search = None;
    let per_module = match (layer_formats, a.auto_bits) {
        (Some(per_module), _) => Some(per_module),
        (None, Some(bits)) => {
            let score = autoquant::score_indices(samples.len(), a.score_size, a.seed);
            let input = autoquant::SearchInput { samples: &samples, score: &score, sq_alpha: a.sq_alpha };
            let s = autoquant::search(&model, &input, &formats, bits, &exclusions, &progress)?;
            if !a.quiet {
                let table = s.table();
                crate::err!("{}", table.strip_suffix('\n').unwrap_or(&table));
            }
            let map = s.module_formats();
            search = Some((s, score.len()));
            Some(map)
        }
        (None, None) => None,
    };
    let opts = quantize::Options {
        formats: match per_module {
            Some(map) => quantize::Formats::PerModule(map),
            None => quantize::Formats::Uniform(format, exclusions),
        },
        kv_fp8: match a.kv_cache.as_str() {
            "none" => false,
            "fp8" => true,
            other => return Err(Error::Usage(format!("unknown --kv-cache '{other}'; supported: none, fp8"))),
        },
        sq_alpha: a.sq_alpha,
        compressed_tensors,
    };
    if !(0.0..=1.0).contains(&a.sq_alpha) {
        return Err(Error::Usage(format!("--sq-alpha must be in [0, 1], got {}", a.sq_alpha)));
    }
    let mut out = Output::create(&a.model, &a.out, a.force, unified::DEFAULT_SHARD_BYTES)?;
    let summary = quantize::run(&model, &samples, &opts, &mut out, &progress)?;
    let spec = QuantSpec {
        kv_fp8: opts.kv_fp8,
        quantized: summary.quantized,
        unquantized: summary.unquantized,
        producer: ("rq-min".into(), env!("CARGO_PKG_VERSION").into()),
    };
    out.finish(&model, &spec)?;
    model.compute = Compute::F32;
    let what = match (&search, &a.layer_formats) {
        (Some((s, _)), _) => format!("{} ({:.3} effective bits, budget {})", a.qformat, s.effective_bits, s.budget),
        (None, Some(_)) => "per --layer-formats".to_string(),
        (None, None) => format.cli_name().to_string(),
    };
    crate::out!(
        "quantized {} linears to {}{} ({} left unquantized) in {:.1}s{}",
        spec.quantized.len(),
        what,
        if opts.kv_fp8 { " + fp8 kv cache" } else { "" },
        spec.unquantized.len(),
        progress.elapsed(),
        if step == Step::Final { format!(" -> {}", a.out.display()) } else { String::new() }
    );

    let mut report = search.map(|(s, n)| s.report(a.seed, &autoquant::calib_digest(&samples), n));
    let write_report = |report: &Json| -> Result<()> {
        let p = a.out.join("auto_quantize.json");
        std::fs::write(&p, report.to_pretty(2)).map_err(|e| Error::io(&p, e))
    };
    if let Some(r) = &report {
        write_report(r)?;
    }
    if !a.no_eval {
        let text = read_text(a.eval_text.as_deref())?;
        let tok = tok.as_ref().ok_or_else(|| Error::Usage("evaluation needs tokenizer.json".into()))?;
        let windows = eval::eval_windows(&tok.encode(&text), a.eval_seq);
        let eval_progress = Progress::new("eval", a.quiet);
        let before = eval::perplexity(&model, &windows, &eval_progress)?;
        let mut quantized = Model::open(&a.out, None)?;
        quantized.device = device;
        let after = eval::perplexity(&quantized, &windows, &eval_progress)?;
        crate::out!(
            "perplexity ({} windows x {} tokens): {:.3} -> {:.3} ({:+.2}%)",
            before.windows,
            a.eval_seq,
            before.ppl,
            after.ppl,
            (after.ppl / before.ppl - 1.0) * 100.0
        );
        if let Some(r) = &mut report {
            r.set("perplexity", Json::Float(after.ppl));
            r.set("perplexity_unquantized", Json::Float(before.ppl));
            write_report(r)?;
        }
    }
    Ok(())
}

/// `--layer-formats FILE`: a JSON object module -> format (`fp8`, `nvfp4`, ... or `none`).
pub fn layer_formats_file(path: &Path) -> Result<std::collections::HashMap<String, QFormat>> {
    let j = Json::parse_file(path)?;
    let obj = j.as_object().ok_or_else(|| Error::config(path, "expected a JSON object: module name -> format"))?;
    let mut map = std::collections::HashMap::new();
    for (module, v) in obj {
        let name = v.as_str().ok_or_else(|| Error::config(path, format!("{module}: the format must be a string")))?;
        if name != "none" {
            let f = QFormat::parse(name).map_err(|e| Error::config(path, format!("{module}: {e}")))?;
            map.insert(module.clone(), f);
        }
    }
    Ok(map)
}

/// `flag`'s path must be a folder: one that is missing, a file or a FIFO is named as such.
fn check_folder(flag: &str, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let kind = match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(m) if m.file_type().is_fifo() => "a FIFO",
        Ok(m) if m.is_file() => "a file",
        Ok(_) => "a device or socket",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Usage(format!("{flag} {} does not exist", path.display())))
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    Err(Error::Usage(format!("{flag} {} is {kind}, not a checkpoint folder", path.display())))
}

/// A window of `seq` tokens must fit the model's `max_position_embeddings`: past it the
/// positions are outside what the model was trained on, and a huge value (`--calib-seq
/// 1000000`) would run for hours with quadratic attention.
/// Tokens per calibration row unless `--calib-seq` says otherwise (capped at the model's
/// max_position_embeddings).
const DEFAULT_CALIB_SEQ: usize = 512;

fn check_seq(flag: &str, seq: usize, cfg: &ModelConfig) -> Result<()> {
    let max = cfg.max_position_embeddings;
    if seq > max {
        return Err(Error::Usage(format!(
            "{flag} {seq} is more than the model's max_position_embeddings ({max}, {})",
            cfg.path.display()
        )));
    }
    Ok(())
}

/// Warns on stderr about each of `patterns` (fnmatch, as `Exclusions` matches them) that
/// matches none of `modules`, naming up to 3 of the closest module names: such a pattern is
/// most likely a typo and silently does nothing. With `strict` the first one is an error.
fn check_patterns(what: &str, patterns: &[String], modules: &[String], strict: bool) -> Result<()> {
    for p in patterns {
        let hit = |m: &String| fnmatch(p, m) || fnmatch(p, &format!("{m}.weight_quantizer"));
        if modules.iter().any(hit) {
            continue;
        }
        let msg = format!("{what} '{p}' matches no module of the model; closest: {}", closest(p, modules, 3).join(", "));
        if strict {
            return Err(Error::Usage(format!("{msg} (--strict)")));
        }
        eprintln!("rq-min: warning: {msg}");
    }
    Ok(())
}

/// The `n` names nearest to `pattern` by edit distance (ties in `names` order). A leading /
/// trailing `*` lets the pattern match inside a name for free (`*self_atn*` is 1 away from
/// `model.layers.0.self_attn.q_proj`).
fn closest<'a>(pattern: &str, names: &'a [String], n: usize) -> Vec<&'a str> {
    let mut scored: Vec<(usize, &str)> = names.iter().map(|m| (pattern_distance(pattern, m), m.as_str())).collect();
    scored.sort_by_key(|&(d, _)| d);
    scored.into_iter().take(n).map(|(_, m)| m).collect()
}

/// Levenshtein distance from `pattern` (without its outer `*`) to a substring of `name`:
/// a free start with a leading `*`, a free end with a trailing `*`.
fn pattern_distance(pattern: &str, name: &str) -> usize {
    let (free_start, free_end) = (pattern.starts_with('*'), pattern.ends_with('*'));
    let p: Vec<char> = pattern.trim_matches('*').chars().collect();
    let n: Vec<char> = name.chars().collect();
    // row[j]: distance of the pattern so far to a name part ending at j.
    let mut row: Vec<usize> = (0..=n.len()).map(|j| if free_start { 0 } else { j }).collect();
    for (i, &pc) in p.iter().enumerate() {
        let mut next = vec![i + 1; n.len() + 1];
        for (j, &nc) in n.iter().enumerate() {
            let sub = row[j] + usize::from(pc != nc && pc != '?');
            next[j + 1] = sub.min(row[j + 1] + 1).min(next[j] + 1);
        }
        row = next;
    }
    if free_end { row.into_iter().min().unwrap_or(0) } else { row[n.len()] }
}

/// `--exclude` values: comma-separated patterns, repeatable.
fn split_patterns(values: &[String]) -> Vec<String> {
    values.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

fn read_text(path: Option<&Path>) -> Result<String> {
    match path {
        Some(p) => std::fs::read_to_string(p).map_err(|e| Error::io(p, e)),
        None => Ok(DEFAULT_EVAL_TEXT.to_string()),
    }
}

/// `rq-min eval`: perplexity with the protocol of reference/README.md.
pub fn eval(a: &EvalArgs) -> Result<()> {
    let device = Device::parse(&a.device)?;
    device.check_available()?;
    if a.seq < 2 {
        return Err(Error::Usage("--seq must be at least 2".into()));
    }
    check_folder("--model", &a.model)?;
    let mut model = Model::open(&a.model, a.base.as_deref())?;
    model.device = device;
    model.check_complete()?;
    check_seq("--seq", a.seq, &model.config)?;
    model.compute = match a.dtype.as_str() {
        "f32" => Compute::F32,
        "bf16" => Compute::Bf16,
        other => return Err(Error::Usage(format!("unknown --dtype '{other}'; supported: f32, bf16"))),
    };
    let windows = match (&a.ids, &a.text) {
        (Some(_), Some(_)) => return Err(Error::Usage("give --text or --ids, not both".into())),
        (Some(path), None) => eval_ids(path, &model.config)?,
        (None, text) => {
            let tok_dir = match &a.base {
                Some(b) if !a.model.join("tokenizer.json").exists() => b.as_path(),
                _ => a.model.as_path(),
            };
            let tok = Tokenizer::from_dir(tok_dir)?;
            eval::eval_windows(&tok.encode(&read_text(text.as_deref())?), a.seq)
        }
    };
    if let Some(out) = &a.logits {
        check_logits_out(out, &windows, model.config.vocab_size)?;
    }
    let (p, logits) = eval::evaluate(&model, &windows, &Progress::new("eval", a.quiet), a.logits.is_some())?;
    let shape = match &a.ids {
        Some(_) => format!("{} rows of {}", p.windows, windows[0].len()),
        None => format!("{} windows x {} tokens", p.windows, a.seq),
    };
    crate::out!("perplexity {:.4} ({shape}, {} scored, {} compute)", p.ppl, p.count, a.dtype);
    if let Some(out) = &a.logits {
        write_logits(out, &logits, windows[0].len(), model.config.vocab_size)?;
        crate::out!("logits [{}, {}, {}] f32 -> {}", windows.len(), windows[0].len(), model.config.vocab_size, out.display());
    }
    Ok(())
}

/// `eval --ids`: the rows of the file, each at least 2 tokens (one scored position) and at
/// most the model's positions.
fn eval_ids(path: &Path, cfg: &ModelConfig) -> Result<Vec<Vec<u32>>> {
    let rows = calib::ids_file(path)?;
    if rows.is_empty() {
        return Err(Error::config(path, "no rows: --ids needs a JSON array of rows of token ids"));
    }
    for (r, row) in rows.iter().enumerate() {
        if row.len() < 2 {
            return Err(Error::config(path, format!("row {r} has {} token(s); a scored row needs at least 2", row.len())));
        }
        check_seq(&format!("--ids row {r} of"), row.len(), cfg)?;
    }
    Ok(rows)
}

/// The most `eval --logits` writes (the logits are held in memory until written).
const MAX_LOGITS_BYTES: u64 = 8 << 30;

/// `eval --logits OUT`: rows of one length (the tensor is `[rows, seq, vocab]`), at most
/// `MAX_LOGITS_BYTES`, and OUT not a folder. Checked before any work.
fn check_logits_out(out: &Path, windows: &[Vec<u32>], vocab: usize) -> Result<()> {
    if out.is_dir() {
        return Err(Error::Usage(format!("--logits {}: is a folder; give a .safetensors file path", out.display())));
    }
    let seq = windows[0].len();
    if let Some(r) = windows.iter().position(|w| w.len() != seq) {
        return Err(Error::Usage(format!(
            "--logits: row {r} has {} tokens, row 0 has {seq}; the logits tensor [rows, seq, vocab] needs rows of one length",
            windows[r].len()
        )));
    }
    let bytes = windows.len() as u64 * seq as u64 * vocab as u64 * 4;
    if bytes > MAX_LOGITS_BYTES {
        return Err(Error::Usage(format!(
            "--logits: [{}, {seq}, {vocab}] f32 is {:.1} GiB, more than the {} GiB rq-min holds for them; score fewer rows",
            windows.len(),
            bytes as f64 / (1u64 << 30) as f64,
            MAX_LOGITS_BYTES >> 30
        )));
    }
    Ok(())
}

/// Writes `logits` (one `[seq, vocab]` block per row) as the tensor `logits` of a safetensors
/// file: to a temporary file beside `out`, renamed over it when complete.
fn write_logits(out: &Path, logits: &[Vec<f32>], seq: usize, vocab: usize) -> Result<()> {
    let data: Vec<u8> = logits.iter().flat_map(|row| row.iter().flat_map(|v| v.to_le_bytes())).collect();
    let (tmp, file) = crate::io::tmp::temp_file_beside(out, "logits").map_err(|e| Error::io(out, e))?;
    drop(file);
    let shape = [logits.len(), seq, vocab];
    let written = crate::io::safetensors::write_file(&tmp, &[("logits", Dtype::F32, &shape, &data)], &[])
        .and_then(|()| std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// `rq-min inspect`: tensor table, config summary, bits per parameter by format, and the
/// config/tensor disagreements (non-zero exit when there are any).
pub fn inspect(path: &Path) -> Result<()> {
    if !path.is_dir() {
        let st = SafeTensors::open(path)?;
        print_tensors(st.tensors());
        return Ok(());
    }
    for file in ["config.json", "hf_quant_config.json"] {
        let p = path.join(file);
        if p.exists() {
            summarize_config(&p, &Json::parse_file(&p)?);
        }
    }
    let ckpt = Checkpoint::open(path)?;
    let rows: Vec<TensorInfo> = ckpt
        .names()
        .iter()
        .filter_map(|n| ckpt.get(n))
        .map(|v| TensorInfo { name: v.name.to_string(), dtype: v.dtype, shape: v.shape.to_vec(), start: 0, end: v.data.len() })
        .collect();
    print_tensors(&rows);
    let report = crate::export::verify::check(path)?;
    crate::out!("\n{:<14} {:>8} {:>14} {:>10}", "format", "linears", "parameters", "bits/param");
    for (name, g) in &report.groups {
        crate::out!("{:<14} {:>8} {:>14} {:>10.3}", name, g.linears, g.params, g.bits());
    }
    crate::out!("{:<14} {:>8} {:>14} {:>10.3}", "overall", "", report.groups.values().map(|g| g.params).sum::<usize>(), report.overall_bits());
    if report.findings.is_empty() {
        crate::out!("no findings: config and tensors agree");
        return Ok(());
    }
    for f in &report.findings {
        crate::out!("finding: {f}");
    }
    Err(Error::Usage(format!("{}: {} finding(s)", path.display(), report.findings.len())))
}

/// `rq-min verify`: the checks of `inspect` (config vs tensors, required scales, finite and
/// positive scales, packed sizes, KV scales) and, given the original model, the dequantized
/// weight error of every linear; non-zero exit on any finding.
pub fn verify(dir: &Path, original: Option<&Path>) -> Result<()> {
    let trtllm = crate::export::verify::is_trtllm(dir);
    if trtllm && original.is_some() {
        return Err(Error::Usage("--original is for unified checkpoints, not TensorRT-LLM ones".into()));
    }
    let mut report = if trtllm { crate::export::verify::check_trtllm(dir)? } else { crate::export::verify::check(dir)? };
    if !trtllm {
        report.findings.extend(crate::export::verify::model_findings(dir));
    }
    crate::out!("{:<14} {:>8} {:>14} {:>10}", "format", "linears", "parameters", "bits/param");
    for (name, g) in &report.groups {
        crate::out!("{:<14} {:>8} {:>14} {:>10.3}", name, g.linears, g.params, g.bits());
    }
    crate::out!("{:<14} {:>8} {:>14} {:>10.3}", "overall", "", report.groups.values().map(|g| g.params).sum::<usize>(), report.overall_bits());
    if let Some(orig) = original {
        let errors = crate::export::verify::weight_errors(dir, orig)?;
        crate::out!("\n{:<40} {:>14}", "linear", "weight error");
        for e in &errors {
            crate::out!("{:<40} {:>14.4}", e.module, e.relative);
            if !(e.relative <= crate::export::verify::MAX_WEIGHT_ERROR) {
                report.findings.push(format!(
                    "{}: dequantized weight differs from the original by {:.3} (relative Frobenius), more than {}",
                    e.module,
                    e.relative,
                    crate::export::verify::MAX_WEIGHT_ERROR
                ));
            }
        }
    }
    for f in &report.findings {
        crate::out!("finding: {f}");
    }
    if report.findings.is_empty() {
        crate::out!("verified: no findings");
        Ok(())
    } else {
        Err(Error::Usage(format!("{}: {} finding(s)", dir.display(), report.findings.len())))
    }
}

fn summarize_config(path: &Path, j: &Json) {
    crate::out!("{}:", path.display());
    let keys = ["architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size", "vocab_size", "dtype", "torch_dtype", "tie_word_embeddings"];
    for k in keys {
        if let Some(v) = j.get(k) {
            crate::out!("  {k}: {}", v.to_compact());
        }
    }
    for k in ["quantization_config", "quantization"] {
        if let Some(q) = j.get(k) {
            for sub in ["quant_algo", "kv_cache_quant_algo", "exclude_modules", "ignore"] {
                if let Some(v) = q.get(sub) {
                    crate::out!("  {k}.{sub}: {}", v.to_compact());
                }
            }
        }
    }
}

fn print_tensors(rows: &[TensorInfo]) {
    let mut rows: Vec<&TensorInfo> = rows.iter().collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    crate::out!("{:width$}  {:8}  {:16}  {:>12}", "name", "dtype", "shape", "bytes");
    let mut total = 0usize;
    for r in &rows {
        let shape = format!("{:?}", r.shape);
        crate::out!("{:width$}  {:8}  {:16}  {:>12}", r.name, r.dtype.name(), shape, r.end - r.start);
        total += r.end - r.start;
    }
    crate::out!("{} tensors, {} bytes", rows.len(), total);
}
