//! `rq-min synth`: one-layer checkpoints of llama3-1b and qwen3-30b-a3b at their real width load
//! in rq-min (index, dtypes, shapes, a forward pass, the tokenizer), hold N(0, 0.02²) weights and
//! ones in the norms, are the same bytes for the same seed, and quantize to FP8.

use rq_min::cli::{quantize, synth, QuantizeArgs, SynthArgs};
use rq_min::compute::RopeScaling;
use rq_min::io::json::Json;
use rq_min::io::safetensors::{Checkpoint, Dtype, SafeTensors};
use rq_min::model::{Model, NoHooks};
use rq_min::numerics::bf16_to_f32;
use rq_min::tokenizer::Tokenizer;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A temp folder for one test, removed with its content when dropped (also on a failure).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("rq-min-synth-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The content of file `p`, mapped (no copy of a large shard).
fn map(p: &Path) -> memmap2::Mmap {
    let f = std::fs::File::open(p).unwrap();
    // SAFETY: the test's own files, not modified while mapped.
    unsafe { memmap2::Mmap::map(&f) }.unwrap()
}

/// A one-layer checkpoint of `shape` in `out`.
fn one_layer(shape: &str, out: &Path, seed: u64, force: bool) -> rq_min::Result<()> {
    synth(&SynthArgs { layers: Some(1), seed, force, quiet: true, ..SynthArgs::new(shape, out) })
}

/// The index lists exactly the tensors of the shards it names, all BF16, `total_size` is their
/// bytes, and the config's tensors are all there with the shapes it implies (`check_complete`).
/// Returns the tensor names.
fn check_layout(dir: &Path) -> BTreeSet<String> {
    let index = Json::parse_file(&dir.join("model.safetensors.index.json")).unwrap();
    let map = index.get("weight_map").and_then(Json::as_object).unwrap();
    let listed: BTreeSet<String> = map.iter().map(|(k, _)| k.clone()).collect();
    let files: BTreeSet<&str> = map.iter().map(|(_, f)| f.as_str().unwrap()).collect();
    let (mut stored, mut bytes) = (BTreeSet::new(), 0usize);
    for (i, f) in files.iter().enumerate() {
        assert_eq!(*f, format!("model-{:05}-of-{:05}.safetensors", i + 1, files.len()));
        let st = SafeTensors::open(&dir.join(f)).unwrap();
        assert_eq!(st.metadata(), &[("format".to_string(), "pt".to_string())]);
        for t in st.tensors() {
            assert_eq!(t.dtype, Dtype::BF16, "{}", t.name);
            assert_eq!(map.iter().find(|(k, _)| *k == t.name).unwrap().1.as_str(), Some(*f), "{}", t.name);
            assert!(stored.insert(t.name.clone()), "{} stored twice", t.name);
            bytes += t.end - t.start;
        }
    }
    assert_eq!(stored, listed, "the index lists every stored tensor and only those");
    let total = index.get("metadata").and_then(|m| m.get("total_size")).and_then(Json::as_usize);
    assert_eq!(total, Some(bytes));
    let model = Model::open(dir, None).unwrap();
    model.check_complete().unwrap();
    assert!(model.incomplete().is_empty());
    for file in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    listed
}

/// Embeds `text`'s ids, runs layer 0 and the head: finite, and the NLL of random weights near
/// ln(vocab).
fn forward(dir: &Path, text: &str) -> Vec<u32> {
    let model = Model::open(dir, None).unwrap();
    let cfg = &model.config;
    let tok = Tokenizer::from_dir(dir).unwrap();
    let ids = tok.encode(text);
    assert!(ids.iter().all(|&i| (i as usize) < cfg.vocab_size), "{ids:?}");
    let mut h = model.embed(&ids).unwrap();
    assert_eq!(h.len(), ids.len() * cfg.hidden_size);
    let layer = model.load_layer(0).unwrap();
    layer.forward(cfg, &cfg.rope_table(ids.len()), &mut h, ids.len(), &mut NoHooks);
    assert!(h.all_finite());
    let (nll, n) = model.load_head().unwrap().nll(&h, &ids);
    let mean = nll / n as f64;
    let ln_vocab = (cfg.vocab_size as f64).ln();
    assert!((mean - ln_vocab).abs() < 2.0, "mean NLL {mean} vs ln(vocab) {ln_vocab}");
    ids
}

/// Mean, standard deviation, fractions beyond 2σ and 3σ (σ = 0.02) and max |x| of a bf16 tensor.
fn stats(ckpt: &Checkpoint, name: &str) -> (f64, f64, f64, f64, f64) {
    let t = ckpt.tensor(name).unwrap();
    assert_eq!(t.dtype, Dtype::BF16);
    let (mut s1, mut s2, mut over2, mut over3, mut max) = (0.0f64, 0.0f64, 0usize, 0usize, 0.0f64);
    for b in t.data.chunks_exact(2) {
        let x = f64::from(bf16_to_f32(u16::from_le_bytes([b[0], b[1]])));
        s1 += x;
        s2 += x * x;
        over2 += usize::from(x.abs() > 0.04);
        over3 += usize::from(x.abs() > 0.06);
        max = max.max(x.abs());
    }
    let n = t.numel() as f64;
    let mean = s1 / n;
    (mean, (s2 / n - mean * mean).sqrt(), over2 as f64 / n, over3 as f64 / n, max)
}

fn assert_normal(ckpt: &Checkpoint, name: &str) {
    let (mean, std, over2, over3, max) = stats(ckpt, name);
    assert!(mean.abs() < 1e-4, "{name}: mean {mean}");
    assert!((std / 0.02 - 1.0).abs() < 0.01, "{name}: std {std}");
    assert!((over2 - 0.0455).abs() < 0.002, "{name}: P(|x| > 2σ) = {over2}");
    assert!((over3 - 0.0027).abs() < 0.0004, "{name}: P(|x| > 3σ) = {over3}");
    assert!(max > 0.08 && max < 0.16, "{name}: max |x| {max}");
}

fn assert_ones(ckpt: &Checkpoint, name: &str) {
    let t = ckpt.tensor(name).unwrap();
    assert!(t.data.chunks_exact(2).all(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]])) == 1.0), "{name}");
}

/// Llama 3.2 1B with one layer: tensors, shapes, config, statistics, forward, tokenizer; the
/// same seed gives the same bytes, another seed others; a non-empty --out is refused; the
/// output quantizes to FP8.
#[test]
fn llama3_1b_one_layer() {
    let dir = Scratch::new("llama");
    // An existing empty folder needs no --force.
    let a = dir.0.join("a");
    std::fs::create_dir(&a).unwrap();
    one_layer("llama3-1b", &a, 1234, false).unwrap();

    let names = check_layout(&a);
    let mut want: BTreeSet<String> = ["model.embed_tokens.weight", "model.norm.weight"].map(String::from).into();
    for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    {
        want.insert(format!("model.layers.0.{m}.weight"));
    }
    assert_eq!(names, want, "tied embeddings: no lm_head");
    let ckpt = Checkpoint::open(&a).unwrap();
    for (name, shape) in [
        ("model.embed_tokens.weight", [128256, 2048]),
        ("model.layers.0.self_attn.q_proj.weight", [2048, 2048]),
        ("model.layers.0.self_attn.k_proj.weight", [512, 2048]),
        ("model.layers.0.self_attn.o_proj.weight", [2048, 2048]),
        ("model.layers.0.mlp.gate_proj.weight", [8192, 2048]),
        ("model.layers.0.mlp.down_proj.weight", [2048, 8192]),
    ] {
        assert_eq!(ckpt.tensor(name).unwrap().shape, shape, "{name}");
    }
    let model = Model::open(&a, None).unwrap();
    let cfg = &model.config;
    assert_eq!((cfg.architecture.as_str(), cfg.num_hidden_layers, cfg.num_attention_heads), ("LlamaForCausalLM", 1, 32));
    assert_eq!((cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size), (8, 64, 128256));
    assert!(cfg.tie_word_embeddings && cfg.rope.theta == 500000.0);
    assert!(matches!(cfg.rope.scaling, RopeScaling::Llama3 { factor, original_max_position_embeddings: 8192, .. } if factor == 32.0));
    assert_eq!(model.dtype().unwrap(), Dtype::BF16);

    assert_normal(&ckpt, "model.embed_tokens.weight");
    assert_normal(&ckpt, "model.layers.0.mlp.up_proj.weight");
    for n in ["model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"] {
        assert_ones(&ckpt, n);
    }
    let text = "Hello, world! Grüße, 東京 123456\n\tend.";
    let ids = forward(&a, text);
    assert_eq!(ids[0], 128000, "BOS first");
    assert_eq!(Tokenizer::from_dir(&a).unwrap().decode(&ids), text, "decodes back (BOS skipped)");
    assert_eq!(&ids[1..6], b"Hello".map(u32::from).as_slice(), "one id per byte");
    let special = Tokenizer::from_dir(&a).unwrap().encode("<|start_header_id|>user<|end_header_id|><|eot_id|>");
    assert_eq!(special, [128000, 128006, 117, 115, 101, 114, 128007, 128009]);
    drop(ckpt);
    drop(model);

    // Same seed: the same bytes, file by file.
    let b = dir.0.join("b");
    one_layer("llama3-1b", &b, 1234, false).unwrap();
    let shard = "model-00001-of-00001.safetensors";
    for f in [shard, "model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(map(&a.join(f))[..] == map(&b.join(f))[..], "{f} differs for the same seed");
    }
    // A non-empty --out is refused, and left as it was.
    let before = std::fs::metadata(b.join(shard)).unwrap().modified().unwrap();
    let err = one_layer("llama3-1b", &b, 5, false).unwrap_err().to_string();
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::metadata(b.join(shard)).unwrap().modified().unwrap(), before);
    // Another seed (with --force): other weights, the same files otherwise.
    one_layer("llama3-1b", &b, 5, true).unwrap();
    let (wa, wb) = (map(&a.join(shard)), map(&b.join(shard)));
    assert_eq!(wa.len(), wb.len());
    let header = 8 + u64::from_le_bytes(wa[..8].try_into().unwrap()) as usize;
    assert_eq!(wa[..header], wb[..header], "same header");
    let same = wa[header..].chunks_exact(2).zip(wb[header..].chunks_exact(2)).filter(|(x, y)| x == y).count();
    // Norms (ones) agree; random bf16 values rarely do.
    assert!(same < (wa.len() - header) / 2 / 50, "{same} equal values across seeds");
    drop((wa, wb));
    assert!(map(&a.join("tokenizer.json"))[..] == map(&b.join("tokenizer.json"))[..]);
    std::fs::remove_dir_all(&b).unwrap();
    assert!(std::fs::read_dir(&dir.0).unwrap().count() == 1, "no temporary folder left behind");

    // FP8 with a tiny calibration (the built-in text through the stand-in tokenizer).
    let fp8 = dir.0.join("fp8");
    let args = QuantizeArgs {
        qformat: "fp8".into(),
        calib_size: 2,
        calib_seq: Some(16),
        no_eval: true,
        quiet: true,
        ..QuantizeArgs::new(&a, &fp8)
    };
    quantize(&args).unwrap();
    let report = rq_min::export::verify::check(&fp8).unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    let q = Checkpoint::open(&fp8).unwrap();
    let w = q.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!((w.dtype, w.shape), (Dtype::F8E4M3, &[2048usize, 2048][..]));
    assert!(q.contains("model.layers.0.mlp.down_proj.weight_scale") && q.contains("model.layers.0.mlp.down_proj.input_scale"));
    drop(q);
    std::fs::remove_dir_all(&fp8).unwrap();

    // Bad arguments fail before writing anything.
    let c = dir.0.join("c");
    let err = synth(&SynthArgs { quiet: true, ..SynthArgs::new("llama3-2b", &c) }).unwrap_err().to_string();
    assert!(err.contains("unknown --shape") && err.contains("qwen3-30b-a3b"), "{err}");
    let err = synth(&SynthArgs { layers: Some(0), quiet: true, ..SynthArgs::new("llama3-1b", &c) }).unwrap_err().to_string();
    assert!(err.contains("--layers"), "{err}");
    assert!(!c.exists());
}

/// Qwen3-30B-A3B with one layer: 128 experts of 768, the router, q/k norms, untied lm_head;
/// loads, runs, and its tokenizer knows the chat tokens.
#[test]
fn qwen3_30b_a3b_one_layer() {
    let dir = Scratch::new("qwen");
    let out = dir.0.join("q");
    one_layer("qwen3-30b-a3b", &out, 1234, false).unwrap();
    let names = check_layout(&out);
    assert_eq!(names.len(), 3 + 4 + 2 + 2 + 1 + 128 * 3, "{names:?}");
    let ckpt = Checkpoint::open(&out).unwrap();
    for (name, shape) in [
        ("model.embed_tokens.weight", &[151936usize, 2048][..]),
        ("lm_head.weight", &[151936, 2048]),
        ("model.layers.0.self_attn.q_proj.weight", &[4096, 2048]),
        ("model.layers.0.self_attn.k_proj.weight", &[512, 2048]),
        ("model.layers.0.self_attn.v_proj.weight", &[512, 2048]),
        ("model.layers.0.self_attn.o_proj.weight", &[2048, 4096]),
        ("model.layers.0.self_attn.q_norm.weight", &[128]),
        ("model.layers.0.self_attn.k_norm.weight", &[128]),
        ("model.layers.0.mlp.gate.weight", &[128, 2048]),
        ("model.layers.0.mlp.experts.0.gate_proj.weight", &[768, 2048]),
        ("model.layers.0.mlp.experts.127.up_proj.weight", &[768, 2048]),
        ("model.layers.0.mlp.experts.127.down_proj.weight", &[2048, 768]),
    ] {
        assert_eq!(ckpt.tensor(name).unwrap().shape, shape, "{name}");
    }
    let model = Model::open(&out, None).unwrap();
    let cfg = &model.config;
    assert_eq!((cfg.architecture.as_str(), cfg.num_hidden_layers, cfg.hidden_size), ("Qwen3MoeForCausalLM", 1, 2048));
    assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size), (32, 4, 128, 151936));
    assert!(cfg.qk_norm && !cfg.tie_word_embeddings && cfg.rope.theta == 1e6);
    let moe = cfg.moe.as_ref().unwrap();
    assert_eq!((moe.num_experts, moe.top_k, moe.intermediate_size, moe.norm_topk_prob), (128, 8, 768, true));
    assert!(moe.is_sparse(0));
    assert_normal(&ckpt, "model.layers.0.self_attn.q_proj.weight");
    assert_normal(&ckpt, "model.layers.0.mlp.experts.5.down_proj.weight");
    assert_ones(&ckpt, "model.layers.0.self_attn.q_norm.weight");
    drop(ckpt);
    drop(model);
    let text = "<|im_start|>user\nWhat is 2+2?<|im_end|>";
    let ids = forward(&out, text);
    assert_eq!((ids[0], ids[ids.len() - 1], ids.len()), (151644, 151645, 2 + text.len() - 22), "no BOS; chat tokens whole");
}
