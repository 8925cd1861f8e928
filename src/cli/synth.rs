//! `rq-min synth`: a random-weight Hugging Face checkpoint with the shape of a real model
//! (Llama 3.1 8B / 70B, Llama 3.2 1B, Qwen3-30B-A3B), for benchmarking the pipeline without
//! downloading anything: bf16 weights, shards of at most 5 GB (`model-0000i-of-0000N.safetensors`
//! and `model.safetensors.index.json`, always, as `save_pretrained` writes a sharded model),
//! `config.json` with the real model's values, `generation_config.json`, and a stand-in
//! byte-level tokenizer (`tokenizer.json` + `tokenizer_config.json`).
//!
//! Weights are what HF's `_init_weights` draws: linears and embeddings normal with std 0.02
//! (`initializer_range`), norm weights 1. Each tensor is cut into chunks of `CHUNK` elements and
//! every chunk has its own random stream, seeded from `--seed`, the tensor's name and the
//! chunk's index: the bytes depend on nothing else (not on the thread count, the shard a tensor
//! lands in, or `--layers`: layer 0 of a 1-layer checkpoint is layer 0 of the full one). Worker
//! threads fill chunks, the calling thread writes them in order; at most `WINDOW_PER_THREAD`
//! chunks per thread are in memory, so a 70B checkpoint takes a few tens of MB of RAM.
//!
//! The output is built in a temporary folder beside `--out` and published by one rename
//! (`io::tmp::Target`), as `quantize` does.

use crate::compute::cpu::num_threads;
use crate::error::{Error, Result};
use crate::io::json::{self, Json};
use crate::io::safetensors::{header_bytes, write_index, Dtype};
use crate::io::tmp::{parent_of, remove_stale_beside, temp_dir_beside, Target};
use crate::model::config::ModelConfig;
use crate::numerics::f32_to_bf16;
use crate::ptq::progress::Progress;
use crate::tokenizer::{BYTE_CHARS, LLAMA3_REGEX, QWEN2_REGEX};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Condvar, Mutex};

/// The shapes `--shape` takes.
pub const SHAPES: [&str; 4] = ["llama3-8b", "llama3-1b", "llama3-70b", "qwen3-30b-a3b"];

/// `--seed` when none is given.
pub const DEFAULT_SEED: u64 = 1234;

/// HF's default `max_shard_size` ("5GB", decimal).
pub const SHARD_BYTES: u64 = 5_000_000_000;

/// Standard deviation of the linears and embeddings (HF `initializer_range`).
pub const INIT_STD: f32 = 0.02;

/// Elements per random stream and per unit of work (2 MiB of bf16).
const CHUNK: usize = 1 << 20;

/// Chunks each worker thread may be ahead of the writer.
const WINDOW_PER_THREAD: usize = 4;

#[derive(Clone, Debug)]
pub struct SynthArgs {
    /// One of `SHAPES`.
    pub shape: String,
    pub out: PathBuf,
    /// Decoder layers instead of the model's own count.
    pub layers: Option<usize>,
    pub seed: u64,
    pub force: bool,
    pub quiet: bool,
}

impl SynthArgs {
    /// The command's defaults for `shape` -> `out`.
    pub fn new(shape: &str, out: &Path) -> SynthArgs {
        SynthArgs { shape: shape.into(), out: out.to_path_buf(), layers: None, seed: DEFAULT_SEED, force: false, quiet: false }
    }
}

/// The model families `synth` writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama3,
    Qwen3Moe,
}

/// How a tensor is filled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Init {
    /// Normal, mean 0, std `INIT_STD`.
    Normal,
    /// All ones (norm weights).
    Ones,
}

/// One tensor of the checkpoint.
#[derive(Clone, Debug)]
struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

impl Spec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn bytes(&self) -> u64 {
        (self.numel() * Dtype::BF16.size()) as u64
    }
}

/// `rq-min synth`: writes the checkpoint (see the module doc).
pub fn synth(a: &SynthArgs) -> Result<()> {
    let progress = Progress::new("synth", a.quiet);
    if a.layers == Some(0) {
        return Err(Error::Usage("--layers must be at least 1".into()));
    }
    let (family, config) = config_json(&a.shape, a.layers)?;
    let cfg = ModelConfig::from_json(config.clone(), Path::new("config.json"))?;
    let specs = tensor_specs(&cfg);
    let shards = plan_shards(&specs, SHARD_BYTES);
    let total: u64 = specs.iter().map(Spec::bytes).sum();
    let params: usize = specs.iter().map(Spec::numel).sum();

    // An existing empty folder is taken as it is; anything else needs --force.
    if a.out.file_name().is_none() {
        return Err(Error::Usage(format!("--out {} has no folder name", a.out.display())));
    }
    let empty_dir = std::fs::symlink_metadata(&a.out).is_ok_and(|m| m.is_dir())
        && std::fs::read_dir(&a.out).is_ok_and(|mut d| d.next().is_none());
    let target = Target::new(&a.out, a.force || empty_dir)?;
    let parent = parent_of(&a.out);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    for stale in remove_stale_beside(&a.out) {
        crate::err!("rq-min: removed {}, left by a run that is gone", stale.display());
    }
    check_free_space(&parent, total)?;
    let tmp = temp_dir_beside(&a.out, "synth").map_err(|e| Error::io(&parent, e))?;
    let mut guard = RemoveOnDrop(Some(tmp.clone()));

    let layers = match cfg.num_hidden_layers {
        1 => "1 layer".to_string(),
        n => format!("{n} layers"),
    };
    progress.note(&format!(
        "{} with {layers}: {:.2}B parameters, {:.2} GB in {} shard(s), {} threads",
        a.shape,
        params as f64 / 1e9,
        total as f64 / 1e9,
        shards.len(),
        num_threads()
    ));
    let write_json = |name: &str, j: &Json| {
        let p = tmp.join(name);
        std::fs::write(&p, j.to_pretty(2) + "\n").map_err(|e| Error::io(&p, e))
    };
    write_json("config.json", &config)?;
    write_json("generation_config.json", &generation_config(family))?;
    write_json("tokenizer.json", &tokenizer_json(family))?;
    write_json("tokenizer_config.json", &tokenizer_config(family))?;
    write_weights(&tmp, &specs, &shards, a.seed, &progress)?;
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        for &t in shard {
            weight_map.insert(specs[t].name.as_str(), shard_name(i, n));
        }
    }
    write_index(&tmp, &weight_map, total)?;
    target.publish(&tmp)?;
    guard.0 = None;
    crate::out!(
        "wrote {} ({layers}, {:.2}B parameters, {:.2} GB in {n} shard(s), seed {}) in {:.1}s -> {}",
        a.shape,
        params as f64 / 1e9,
        total as f64 / 1e9,
        a.seed,
        progress.elapsed(),
        a.out.display()
    );
    Ok(())
}

/// Removes the temporary folder on drop unless emptied (published).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Refuses to start when the file system of `dir` has less than `bytes` (plus 1%) free.
fn check_free_space(dir: &Path, bytes: u64) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| Error::io(dir, std::io::Error::other(e)))?;
    // SAFETY: statvfs is plain data; the call only writes it, and `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Ok(()); // unknown: let the writes tell
    }
    let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    let need = bytes + bytes / 100;
    if free < need {
        return Err(Error::Usage(format!(
            "the checkpoint needs {:.2} GB but {} has only {:.2} GB free",
            need as f64 / 1e9,
            dir.display(),
            free as f64 / 1e9
        )));
    }
    Ok(())
}

/// `model-0000i-of-0000N.safetensors` for shard `i` (from 0) of `n`.
fn shard_name(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{n:05}.safetensors", i + 1)
}

// ---------------------------------------------------------------------------------------------
// Shapes and configs

/// config.json of `shape` (the values of the real model's file), with `layers` decoder layers
/// when given.
fn config_json(shape: &str, layers: Option<usize>) -> Result<(Family, Json)> {
    // (hidden, intermediate, layers, heads, head_dim, rope factor, tie): kv heads are 8.
    let llama = |hidden: i64, inter: i64, n: usize, heads: i64, head_dim: i64, factor: f64, tie: bool| {
        let n = layers.unwrap_or(n) as i64;
        json::obj([
            ("architectures", Json::Arr(vec![json::str("LlamaForCausalLM")])),
            ("attention_bias", Json::Bool(false)),
            ("attention_dropout", Json::Float(0.0)),
            ("bos_token_id", Json::Int(128000)),
            ("eos_token_id", Json::Int(128001)),
            ("head_dim", Json::Int(head_dim)),
            ("hidden_act", json::str("silu")),
            ("hidden_size", Json::Int(hidden)),
            ("initializer_range", Json::Float(INIT_STD as f64)),
            ("intermediate_size", Json::Int(inter)),
            ("max_position_embeddings", Json::Int(131072)),
            ("mlp_bias", Json::Bool(false)),
            ("model_type", json::str("llama")),
            ("num_attention_heads", Json::Int(heads)),
            ("num_hidden_layers", Json::Int(n)),
            ("num_key_value_heads", Json::Int(8)),
            ("pretraining_tp", Json::Int(1)),
            ("rms_norm_eps", Json::Float(1e-5)),
            (
                "rope_scaling",
                json::obj([
                    ("factor", Json::Float(factor)),
                    ("high_freq_factor", Json::Float(4.0)),
                    ("low_freq_factor", Json::Float(1.0)),
                    ("original_max_position_embeddings", Json::Int(8192)),
                    ("rope_type", json::str("llama3")),
                ]),
            ),
            ("rope_theta", Json::Float(500000.0)),
            ("tie_word_embeddings", Json::Bool(tie)),
            ("torch_dtype", json::str("bfloat16")),
            ("use_cache", Json::Bool(true)),
            ("vocab_size", Json::Int(128256)),
        ])
    };
    match shape {
        // meta-llama/Llama-3.1-8B
        "llama3-8b" => Ok((Family::Llama3, llama(4096, 14336, 32, 32, 128, 8.0, false))),
        // meta-llama/Llama-3.2-1B
        "llama3-1b" => Ok((Family::Llama3, llama(2048, 8192, 16, 32, 64, 32.0, true))),
        // meta-llama/Llama-3.1-70B
        "llama3-70b" => Ok((Family::Llama3, llama(8192, 28672, 80, 64, 128, 8.0, false))),
        // Qwen/Qwen3-30B-A3B
        "qwen3-30b-a3b" => {
            let n = layers.unwrap_or(48) as i64;
            Ok((
                Family::Qwen3Moe,
                json::obj([
                    ("architectures", Json::Arr(vec![json::str("Qwen3MoeForCausalLM")])),
                    ("attention_bias", Json::Bool(false)),
                    ("attention_dropout", Json::Float(0.0)),
                    ("bos_token_id", Json::Int(151643)),
                    ("decoder_sparse_step", Json::Int(1)),
                    ("eos_token_id", Json::Int(151645)),
                    ("head_dim", Json::Int(128)),
                    ("hidden_act", json::str("silu")),
                    ("hidden_size", Json::Int(2048)),
                    ("initializer_range", Json::Float(INIT_STD as f64)),
                    ("intermediate_size", Json::Int(6144)),
                    ("max_position_embeddings", Json::Int(40960)),
                    ("max_window_layers", Json::Int(n)),
                    ("mlp_only_layers", Json::Arr(vec![])),
                    ("model_type", json::str("qwen3_moe")),
                    ("moe_intermediate_size", Json::Int(768)),
                    ("norm_topk_prob", Json::Bool(true)),
                    ("num_attention_heads", Json::Int(32)),
                    ("num_experts", Json::Int(128)),
                    ("num_experts_per_tok", Json::Int(8)),
                    ("num_hidden_layers", Json::Int(n)),
                    ("num_key_value_heads", Json::Int(4)),
                    ("output_router_logits", Json::Bool(false)),
                    ("rms_norm_eps", Json::Float(1e-6)),
                    ("rope_scaling", Json::Null),
                    ("rope_theta", Json::Float(1000000.0)),
                    ("router_aux_loss_coef", Json::Float(0.001)),
                    ("sliding_window", Json::Null),
                    ("tie_word_embeddings", Json::Bool(false)),
                    ("torch_dtype", json::str("bfloat16")),
                    ("use_cache", Json::Bool(true)),
                    ("use_sliding_window", Json::Bool(false)),
                    ("vocab_size", Json::Int(151936)),
                ]),
            ))
        }
        other => Err(Error::Usage(format!("unknown --shape '{other}'; supported: {}", SHAPES.join(", ")))),
    }
}

/// generation_config.json of the real model.
fn generation_config(family: Family) -> Json {
    match family {
        Family::Llama3 => json::obj([
            ("bos_token_id", Json::Int(128000)),
            ("do_sample", Json::Bool(true)),
            ("eos_token_id", Json::Int(128001)),
            ("temperature", Json::Float(0.6)),
            ("top_p", Json::Float(0.9)),
        ]),
        Family::Qwen3Moe => json::obj([
            ("bos_token_id", Json::Int(151643)),
            ("do_sample", Json::Bool(true)),
            ("eos_token_id", Json::Arr(vec![Json::Int(151645), Json::Int(151643)])),
            ("pad_token_id", Json::Int(151643)),
            ("temperature", Json::Float(0.6)),
            ("top_k", Json::Int(20)),
            ("top_p", Json::Float(0.95)),
        ]),
    }
}

/// Every tensor `cfg` implies (what `Model::incomplete` checks), in HF's state-dict order:
/// embeddings, each layer's attention (q/k norms), MLP or router and experts, and norms, the
/// final norm, lm_head unless tied.
fn tensor_specs(cfg: &ModelConfig) -> Vec<Spec> {
    let spec = |name: String, shape: Vec<usize>, init| Spec { name, shape, init };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = vec![spec("model.embed_tokens.weight".into(), vec![v, h], Init::Normal)];
    for l in 0..cfg.num_hidden_layers {
        let prefix = format!("model.layers.{l}");
        let modules = cfg.layer_modules(l);
        let (attn, mlp): (Vec<_>, Vec<_>) = modules.iter().partition(|m| m.expert.is_none() && m.path.contains(".self_attn."));
        for m in attn {
            out.push(spec(format!("{}.weight", m.path), m.shape.to_vec(), Init::Normal));
        }
        if cfg.qk_norm {
            for (which, width) in ["q_norm", "k_norm"].into_iter().zip(cfg.qk_norm_widths()) {
                out.push(spec(format!("{prefix}.self_attn.{which}.weight"), vec![width], Init::Ones));
            }
        }
        if let Some(moe) = cfg.moe_layer(l) {
            out.push(spec(format!("{}.weight", moe.router(l)), vec![moe.num_experts, h], Init::Normal));
        }
        for m in mlp {
            out.push(spec(format!("{}.weight", m.path), m.shape.to_vec(), Init::Normal));
        }
        for norm in cfg.norms.slots().into_iter().flatten() {
            out.push(spec(format!("{prefix}.{norm}.weight"), vec![h], Init::Ones));
        }
    }
    out.push(spec("model.norm.weight".into(), vec![h], Init::Ones));
    if !cfg.tie_word_embeddings {
        out.push(spec("lm_head.weight".into(), vec![v, h], Init::Normal));
    }
    out
}

/// Tensors (indices into `specs`) per shard, as huggingface_hub's
/// `split_torch_state_dict_into_shards` groups them: in order, a new shard when the next tensor
/// would take the current one past `max_bytes` (a larger tensor gets a shard of its own). Each
/// shard's tensors are sorted by name, the order of the file's data section.
fn plan_shards(specs: &[Spec], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![];
    let mut current: Vec<usize> = vec![];
    let mut bytes = 0u64;
    for (i, s) in specs.iter().enumerate() {
        if !current.is_empty() && bytes + s.bytes() > max_bytes {
            shards.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(i);
        bytes += s.bytes();
    }
    if !current.is_empty() {
        shards.push(current);
    }
    for shard in &mut shards {
        shard.sort_by(|&a, &b| specs[a].name.cmp(&specs[b].name));
    }
    shards
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

/// The family's special tokens and their ids in the real tokenizer (`special` as there).
fn special_tokens(family: Family) -> Vec<(String, u32, bool)> {
    match family {
        // Llama 3.1 / 3.2: 256 special tokens from 128000.
        Family::Llama3 => {
            let mut reserved = 0..;
            (128000u32..128256)
                .map(|id| {
                    let name = match id {
                        128000 => "<|begin_of_text|>".to_string(),
                        128001 => "<|end_of_text|>".to_string(),
                        128004 => "<|finetune_right_pad_id|>".to_string(),
                        128006 => "<|start_header_id|>".to_string(),
                        128007 => "<|end_header_id|>".to_string(),
                        128008 => "<|eom_id|>".to_string(),
                        128009 => "<|eot_id|>".to_string(),
                        128010 => "<|python_tag|>".to_string(),
                        _ => format!("<|reserved_special_token_{}|>", reserved.next().unwrap_or(0)),
                    };
                    (name, id, true)
                })
                .collect()
        }
        Family::Qwen3Moe => vec![
            ("<|endoftext|>".into(), 151643, true),
            ("<|im_start|>".into(), 151644, true),
            ("<|im_end|>".into(), 151645, true),
            ("<think>".into(), 151667, false),
            ("</think>".into(), 151668, false),
        ],
    }
}

/// A stand-in tokenizer.json. NOT the real Llama 3 / Qwen3 tokenizer: a byte-level BPE with the
/// real pre-tokenizer but only the 256 byte tokens (GPT-2's byte-to-unicode map, token id = byte
/// value) and no merges, plus the family's special tokens at their real ids. Every text encodes
/// (one id per byte) to ids below `vocab_size`; the ids mean nothing, they are for benchmarking
/// only. The special tokens are in the model's vocab as well as in `added_tokens`, so HF
/// `tokenizers` keeps their ids (it would renumber added tokens the vocab lacks).
fn tokenizer_json(family: Family) -> Json {
    let specials = special_tokens(family);
    let mut vocab: Vec<(String, Json)> =
        BYTE_CHARS.iter().enumerate().map(|(b, c)| (c.to_string(), Json::Int(b as i64))).collect();
    vocab.extend(specials.iter().map(|(t, id, _)| (t.clone(), Json::Int(i64::from(*id)))));
    let added = specials
        .iter()
        .map(|(t, id, special)| {
            json::obj([
                ("id", Json::Int(i64::from(*id))),
                ("content", json::str(t)),
                ("single_word", Json::Bool(false)),
                ("lstrip", Json::Bool(false)),
                ("rstrip", Json::Bool(false)),
                ("normalized", Json::Bool(!special)),
                ("special", Json::Bool(*special)),
            ])
        })
        .collect();
    let byte_level = |add_prefix_space: bool, trim_offsets: bool, use_regex: bool| {
        json::obj([
            ("type", json::str("ByteLevel")),
            ("add_prefix_space", Json::Bool(add_prefix_space)),
            ("trim_offsets", Json::Bool(trim_offsets)),
            ("use_regex", Json::Bool(use_regex)),
        ])
    };
    let regex = if family == Family::Llama3 { LLAMA3_REGEX } else { QWEN2_REGEX };
    let pre_tokenizer = json::obj([
        ("type", json::str("Sequence")),
        (
            "pretokenizers",
            Json::Arr(vec![
                json::obj([
                    ("type", json::str("Split")),
                    ("pattern", json::obj([("Regex", json::str(regex))])),
                    ("behavior", json::str("Isolated")),
                    ("invert", Json::Bool(false)),
                ]),
                byte_level(false, true, false),
            ]),
        ),
    ]);
    let (normalizer, post_processor) = match family {
        Family::Llama3 => {
            let special = |id: &str, type_id: i64| {
                json::obj([("SpecialToken", json::obj([("id", json::str(id)), ("type_id", Json::Int(type_id))]))])
            };
            let seq = |id: &str, type_id: i64| {
                json::obj([("Sequence", json::obj([("id", json::str(id)), ("type_id", Json::Int(type_id))]))])
            };
            let bos = "<|begin_of_text|>";
            let template = json::obj([
                ("type", json::str("TemplateProcessing")),
                ("single", Json::Arr(vec![special(bos, 0), seq("A", 0)])),
                ("pair", Json::Arr(vec![special(bos, 0), seq("A", 0), special(bos, 1), seq("B", 1)])),
                (
                    "special_tokens",
                    json::obj([(
                        bos,
                        json::obj([
                            ("id", json::str(bos)),
                            ("ids", Json::Arr(vec![Json::Int(128000)])),
                            ("tokens", Json::Arr(vec![json::str(bos)])),
                        ]),
                    )]),
                ),
            ]);
            let post = json::obj([
                ("type", json::str("Sequence")),
                ("processors", Json::Arr(vec![byte_level(true, false, true), template])),
            ]);
            (Json::Null, post)
        }
        Family::Qwen3Moe => (json::obj([("type", json::str("NFC"))]), byte_level(false, false, false)),
    };
    json::obj([
        ("version", json::str("1.0")),
        ("truncation", Json::Null),
        ("padding", Json::Null),
        ("added_tokens", Json::Arr(added)),
        ("normalizer", normalizer),
        ("pre_tokenizer", pre_tokenizer),
        ("post_processor", post_processor),
        ("decoder", byte_level(true, true, true)),
        (
            "model",
            json::obj([
                ("type", json::str("BPE")),
                ("dropout", Json::Null),
                ("unk_token", Json::Null),
                ("continuing_subword_prefix", Json::Null),
                ("end_of_word_suffix", Json::Null),
                ("fuse_unk", Json::Bool(false)),
                ("byte_fallback", Json::Bool(false)),
                ("ignore_merges", Json::Bool(family == Family::Llama3)),
                ("vocab", Json::Obj(vocab)),
                ("merges", Json::Arr(vec![])),
            ]),
        ),
    ])
}

/// tokenizer_config.json: the generic `PreTrainedTokenizerFast` (tokenizer.json as written)
/// with the real model's special tokens.
fn tokenizer_config(family: Family) -> Json {
    let (bos, eos, pad, max_len) = match family {
        Family::Llama3 => (json::str("<|begin_of_text|>"), "<|end_of_text|>", Json::Null, 131072),
        Family::Qwen3Moe => (Json::Null, "<|im_end|>", json::str("<|endoftext|>"), 131072),
    };
    json::obj([
        ("bos_token", bos),
        ("clean_up_tokenization_spaces", Json::Bool(family == Family::Llama3)),
        ("eos_token", json::str(eos)),
        ("model_input_names", Json::Arr(vec![json::str("input_ids"), json::str("attention_mask")])),
        ("model_max_length", Json::Int(max_len)),
        ("pad_token", pad),
        ("tokenizer_class", json::str("PreTrainedTokenizerFast")),
    ])
}

// ---------------------------------------------------------------------------------------------
// Random numbers

/// One SplitMix64 output for `x` (a bijective 64-bit mix).
fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a tensor name.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3))
}

/// SplitMix64 (Steele, Lea, Flood 2014): the stream of one chunk.
struct SplitMix(u64);

impl SplitMix {
    /// The stream of chunk `chunk` of tensor `name` under `seed`.
    fn for_chunk(seed: u64, name: &str, chunk: u64) -> SplitMix {
        let tensor = mix64(seed ^ mix64(fnv1a(name)));
        SplitMix(mix64(tensor ^ mix64(chunk)))
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Standard normal samples by the ziggurat method (Marsaglia & Tsang 2000) with 256 layers, as
/// `rand_distr::StandardNormal` draws them but from 32 random bits per attempt (two samples per
/// 64-bit draw): the layer from the low 8 bits, a signed uniform from the high 24 (the output is
/// bf16, whose 8-bit mantissa is far coarser), the exact tail beyond `R` by Marsaglia's 1964
/// method.
struct Ziggurat {
    /// Layer edges, `x[0] = V / f(R)` (the base strip with the tail), `x[1] = R`, ..., `x[256] = 0`.
    x: [f64; 257],
    /// `f(x[i])`, `f(x) = exp(-x²/2)`.
    f: [f64; 257],
    /// `x` in f32, for the fast path.
    x32: [f32; 257],
}

impl Ziggurat {
    const R: f64 = 3.654_152_885_361_009;
    /// Area of each layer.
    const V: f64 = 0.004_928_673_233_99;

    fn new() -> Ziggurat {
        let pdf = |x: f64| (-0.5 * x * x).exp();
        let mut x = [0.0; 257];
        x[0] = Self::V / pdf(Self::R);
        x[1] = Self::R;
        for i in 2..256 {
            x[i] = (-2.0 * (Self::V / x[i - 1] + pdf(x[i - 1])).ln()).sqrt();
        }
        Ziggurat { x, f: x.map(pdf), x32: x.map(|v| v as f32) }
    }

    /// One sample; `bits` are the first attempt's random bits, `rng` gives any further ones.
    #[inline]
    fn sample(&self, mut bits: u32, rng: &mut SplitMix) -> f32 {
        loop {
            let i = (bits & 0xff) as usize;
            let u = ((bits >> 8) as i32 - (1 << 23)) as f32 * (1.0 / (1 << 23) as f32);
            let x = u * self.x32[i];
            if x.abs() < self.x32[i + 1] {
                return x;
            }
            if let Some(x) = self.slow(i, u, rng) {
                return x;
            }
            bits = rng.next_u64() as u32;
        }
    }

    /// The rare cases: the tail beyond R (layer 0), or the wedge of layer `i` under the curve.
    #[cold]
    fn slow(&self, i: usize, u: f32, rng: &mut SplitMix) -> Option<f32> {
        let x = f64::from(u) * self.x[i];
        if i == 0 {
            let (mut t, mut y) = (1.0f64, 0.0f64);
            while -2.0 * y < t * t {
                t = rng.open01().ln() / Self::R;
                y = rng.open01().ln();
            }
            return Some((if u < 0.0 { t - Self::R } else { Self::R - t }) as f32);
        }
        let y = self.f[i + 1] + (self.f[i] - self.f[i + 1]) * rng.open01();
        (y < (-0.5 * x * x).exp()).then_some(x as f32)
    }
}

/// bf16 values (little-endian) of chunk `chunk` (elements `chunk * CHUNK ..`, `len` of them)
/// of `spec`.
fn fill_chunk(spec: &Spec, seed: u64, chunk: usize, len: usize, zig: &Ziggurat) -> Vec<u16> {
    match spec.init {
        Init::Ones => vec![f32_to_bf16(1.0).to_le(); len],
        Init::Normal => {
            let mut rng = SplitMix::for_chunk(seed, &spec.name, chunk as u64);
            let mut out = vec![0u16; len];
            for pair in out.chunks_mut(2) {
                let bits = rng.next_u64();
                for (k, v) in pair.iter_mut().enumerate() {
                    let z = zig.sample((bits >> (32 * k)) as u32, &mut rng);
                    *v = f32_to_bf16(z * INIT_STD).to_le();
                }
            }
            out
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// One unit of work: chunk `chunk` of tensor `tensor`, `len` elements.
struct Job {
    tensor: usize,
    chunk: usize,
    len: usize,
}

/// Where the workers are: the next job to take, how many the writer has written.
struct Queue {
    next: usize,
    written: usize,
    abort: bool,
}

/// Writes the shards into `dir`: worker threads fill the chunks (at most `WINDOW_PER_THREAD`
/// per thread ahead of the writer), this thread writes them in order.
fn write_weights(dir: &Path, specs: &[Spec], shards: &[Vec<usize>], seed: u64, progress: &Progress) -> Result<()> {
    let jobs: Vec<Job> = shards
        .iter()
        .flatten()
        .flat_map(|&t| {
            let n = specs[t].numel();
            (0..n.div_ceil(CHUNK)).map(move |c| Job { tensor: t, chunk: c, len: CHUNK.min(n - c * CHUNK) })
        })
        .collect();
    let threads = num_threads().max(1);
    let window = threads * WINDOW_PER_THREAD;
    let zig = Ziggurat::new();
    let queue = Mutex::new(Queue { next: 0, written: 0, abort: false });
    let moved = Condvar::new();
    let lock = || queue.lock().unwrap_or_else(|e| e.into_inner());
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<(usize, Vec<u16>)>();
        for _ in 0..threads {
            let tx = tx.clone();
            let (jobs, zig, moved) = (&jobs, &zig, &moved);
            s.spawn(move || loop {
                let j = {
                    let mut q = lock();
                    while !q.abort && q.next < jobs.len() && q.next >= q.written + window {
                        q = moved.wait(q).unwrap_or_else(|e| e.into_inner());
                    }
                    if q.abort || q.next >= jobs.len() {
                        return;
                    }
                    q.next += 1;
                    q.next - 1
                };
                let job = &jobs[j];
                let bytes = fill_chunk(&specs[job.tensor], seed, job.chunk, job.len, zig);
                if tx.send((j, bytes)).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        let mut pending: BTreeMap<usize, Vec<u16>> = BTreeMap::new();
        let mut done = 0usize;
        // The bytes of job `done`, the next to write.
        let mut next_chunk = || -> Result<Vec<u16>> {
            crate::io::signal::check()?;
            let bytes = loop {
                if let Some(b) = pending.remove(&done) {
                    break b;
                }
                let (j, b) = rx.recv().map_err(|_| Error::Usage("synth: a worker thread stopped".into()))?;
                pending.insert(j, b);
            };
            done += 1;
            lock().written = done;
            moved.notify_all();
            Ok(bytes)
        };
        let result = (|| -> Result<()> {
            for (i, shard) in shards.iter().enumerate() {
                let path = dir.join(shard_name(i, shards.len()));
                let layout: Vec<(&str, Dtype, &[usize])> =
                    shard.iter().map(|&t| (specs[t].name.as_str(), Dtype::BF16, specs[t].shape.as_slice())).collect();
                let header = header_bytes(&path, &layout, &[("format".into(), "pt".into())])?;
                let io = |e| Error::io(&path, e);
                let mut file = std::fs::File::create(&path).map_err(io)?;
                file.write_all(&header).map_err(io)?;
                for &t in shard {
                    for _ in 0..specs[t].numel().div_ceil(CHUNK) {
                        file.write_all(bytemuck::cast_slice(&next_chunk()?)).map_err(io)?;
                    }
                }
                file.flush().map_err(io)?;
                progress.step("shard", i + 1, shards.len());
            }
            Ok(())
        })();
        lock().abort = true;
        moved.notify_all();
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ziggurat draws a standard normal: moments, tail fractions, determinism per chunk.
    #[test]
    fn ziggurat_is_standard_normal() {
        let zig = Ziggurat::new();
        let mut rng = SplitMix::for_chunk(7, "t", 0);
        let n = 2_000_000;
        let (mut s1, mut s2, mut s4, mut over2, mut over3) = (0.0, 0.0, 0.0, 0usize, 0usize);
        for _ in 0..n {
            let bits = rng.next_u64() as u32;
            let z = f64::from(zig.sample(bits, &mut rng));
            s1 += z;
            s2 += z * z;
            s4 += z * z * z * z;
            over2 += usize::from(z.abs() > 2.0);
            over3 += usize::from(z.abs() > 3.0);
        }
        let nf = n as f64;
        assert!((s1 / nf).abs() < 0.003, "mean {}", s1 / nf);
        assert!((s2 / nf - 1.0).abs() < 0.005, "var {}", s2 / nf);
        assert!((s4 / nf - 3.0).abs() < 0.03, "4th moment {}", s4 / nf);
        assert!((over2 as f64 / nf - 0.04550).abs() < 0.0008, "P(|z|>2) {}", over2 as f64 / nf);
        assert!((over3 as f64 / nf - 0.00270).abs() < 0.0002, "P(|z|>3) {}", over3 as f64 / nf);
        let a: Vec<u64> = (0..4).map(|_| SplitMix::for_chunk(1, "a", 3).next_u64()).collect();
        assert!(a.iter().all(|&x| x == a[0]));
        assert_ne!(SplitMix::for_chunk(1, "a", 3).next_u64(), SplitMix::for_chunk(1, "a", 4).next_u64());
        assert_ne!(SplitMix::for_chunk(1, "a", 3).next_u64(), SplitMix::for_chunk(2, "a", 3).next_u64());
    }

    /// Shards as huggingface_hub cuts them.
    #[test]
    fn shards_split_at_the_limit() {
        let s = |name: &str, n: usize| Spec { name: name.into(), shape: vec![n], init: Init::Normal };
        let specs = [s("b", 30), s("a", 30), s("c", 100), s("d", 10)];
        // 60 + 60 bytes fill the first shard, 200 > 100 goes alone, then 20.
        assert_eq!(plan_shards(&specs, 120), vec![vec![1, 0], vec![2], vec![3]]);
    }
}
