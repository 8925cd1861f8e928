//! `--export trtllm` (spec/export-formats.md §4) on tests/fixtures/families-llama (f32,
//! hidden 128, 4 heads, 2 kv heads, intermediate 256, 2 layers) and the tiny family models of
//! ../shared/reference/families (same sizes): the TP/PP shards reassemble to the tp=1 tensors,
//! FP8 tensors match the unified export, config.json keys, split errors, `verify`.

use rq_min::cli::{quantize, QuantizeArgs};
use rq_min::error::Error;
use rq_min::io::json::Json;
use rq_min::quant::fp8;
use rq_min::io::safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

mod common;

#[derive(Clone, Debug, PartialEq)]
struct T {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families-llama")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rq-min-trtllm-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn args(qformat: &str, out: &Path) -> QuantizeArgs {
    args_for(&model(), qformat, out)
}

fn args_for(m: &Path, qformat: &str, out: &Path) -> QuantizeArgs {
    QuantizeArgs {
        qformat: qformat.into(),
        calib_ids: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/calib-ids-small.json")),
        calib_size: 8,
        calib_seq: Some(16),
        no_eval: true,
        force: true,
        quiet: true,
        ..QuantizeArgs::new(m, out)
    }
}

fn export(qformat: &str, tp: usize, pp: usize) -> rq_min::Result<PathBuf> {
    export_for(&model(), qformat, tp, pp)
}

fn export_for(m: &Path, qformat: &str, tp: usize, pp: usize) -> rq_min::Result<PathBuf> {
    // A folder per call: tests running in parallel never share an output.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tag = m.file_name().unwrap().to_string_lossy();
    let out = scratch(&format!("{tag}-{qformat}-{n}")).join(format!("tp{tp}pp{pp}"));
    quantize(&QuantizeArgs { export: "trtllm".into(), tp, pp, ..args_for(m, qformat, &out) })?;
    Ok(out)
}

fn load(path: &Path) -> BTreeMap<String, T> {
    let st = SafeTensors::open(path).unwrap();
    st.tensors()
        .iter()
        .map(|i| {
            let v = st.get(&i.name).unwrap();
            (i.name.clone(), T { dtype: v.dtype, shape: v.shape.to_vec(), data: v.data.to_vec() })
        })
        .collect()
}

fn rank(dir: &Path, r: usize) -> BTreeMap<String, T> {
    load(&dir.join(format!("rank{r}.safetensors")))
}

fn cat0(parts: &[T]) -> T {
    let mut shape = parts[0].shape.clone();
    shape[0] = parts.iter().map(|p| p.shape[0]).sum();
    T { dtype: parts[0].dtype, shape, data: parts.iter().flat_map(|p| p.data.clone()).collect() }
}

fn cat1(parts: &[T]) -> T {
    let rows = parts[0].shape[0];
    let size = parts[0].dtype.size();
    let mut data = Vec::new();
    for r in 0..rows {
        for p in parts {
            let w = p.shape[1] * size;
            data.extend_from_slice(&p.data[r * w..(r + 1) * w]);
        }
    }
    T { dtype: parts[0].dtype, shape: vec![rows, parts.iter().map(|p| p.shape[1]).sum()], data }
}

/// Rows `a..b` of a tensor.
fn rows(t: &T, a: usize, b: usize) -> T {
    let w: usize = t.shape[1..].iter().product::<usize>() * t.dtype.size();
    let mut shape = t.shape.clone();
    shape[0] = b - a;
    T { dtype: t.dtype, shape, data: t.data[a * w..b * w].to_vec() }
}

fn numel(t: &T) -> usize {
    t.shape.iter().product()
}

/// The first and second halves of a tensor's rows swapped.
fn swap_halves(t: &T) -> T {
    let n = t.shape[0];
    cat0(&[rows(t, n / 2, n), rows(t, 0, n / 2)])
}

/// The tp=2 shards of `name` put back together as the tp=1 tensor. `swiglu`: `mlp.fc` is
/// Phi3's [up; gate], each rank holding [up_r; gate_r].
fn reassemble(name: &str, a: &T, b: &T, swiglu: bool, moe: bool) -> T {
    if moe && (name.contains(".mlp.fc.") || name.contains(".mlp.proj.")) && a.shape.len() > 1 {
        return reassemble_experts(name, a, b);
    }
    let column = [".attention.qkv.", ".mlp.fc.", ".mlp.gate.", "lm_head.", "vocab_embedding."].iter().any(|s| name.contains(s));
    let row = [".attention.dense.", ".mlp.proj."].iter().any(|s| name.contains(s));
    let pqs = name.ends_with("prequant_scaling_factor");
    if numel(a) == 1 || (column && pqs) || (!column && !row) || (row && a.shape.len() == 1 && !pqs) {
        assert_eq!(a, b, "{name}: replicated tensor differs between ranks");
        return a.clone();
    }
    if row {
        return if pqs { cat0(&[a.clone(), b.clone()]) } else { cat1(&[a.clone(), b.clone()]) };
    }
    if name.contains(".attention.qkv.") {
        // per rank [q_r; k_r; v_r] with q : k : v = 4 : 2 : 2 heads.
        let n = a.shape[0];
        let (q, k) = (n / 2, n / 4);
        let part = |t: &T, i: usize| match i {
            0 => rows(t, 0, q),
            1 => rows(t, q, q + k),
            _ => rows(t, q + k, n),
        };
        return cat0(&[part(a, 0), part(b, 0), part(a, 1), part(b, 1), part(a, 2), part(b, 2)]);
    }
    if swiglu && name.contains(".mlp.fc.") {
        let n = a.shape[0];
        return cat0(&[rows(a, 0, n / 2), rows(b, 0, n / 2), rows(a, n / 2, n), rows(b, n / 2, n)]);
    }
    cat0(&[a.clone(), b.clone()])
}

/// An MoE block's stacked tp=2 shards put back together: per expert, `mlp.fc` is each rank's
/// [w3_r; w1_r] (3-D weights and group / block scales), `mlp.proj` each rank's input columns
/// (3-D, and the 2-D prequant (E, I/tp)); the (E, 1) factors and fc's prequant (E, H) are whole
/// on every rank.
fn reassemble_experts(name: &str, a: &T, b: &T) -> T {
    let fc = name.contains(".mlp.fc.");
    if a.shape.len() == 2 && (a.shape[1] == 1 || fc) {
        assert_eq!(a, b, "{name}: replicated tensor differs between ranks");
        return a.clone();
    }
    let e = a.shape[0];
    let expert = |t: &T, i: usize| {
        let x = rows(t, i, i + 1);
        let shape = if t.shape.len() == 3 { t.shape[1..].to_vec() } else { vec![1, t.shape[1]] };
        T { shape, ..x }
    };
    let parts: Vec<T> = (0..e)
        .map(|i| {
            let (x, y) = (expert(a, i), expert(b, i));
            if fc {
                let n = x.shape[0];
                cat0(&[rows(&x, 0, n / 2), rows(&y, 0, n / 2), rows(&x, n / 2, n), rows(&y, n / 2, n)])
            } else {
                cat1(&[x, y])
            }
        })
        .collect();
    let mut shape = vec![e];
    shape.extend(if a.shape.len() == 3 { parts[0].shape.clone() } else { vec![parts[0].shape[1]] });
    T { dtype: a.dtype, shape, data: parts.iter().flat_map(|p| p.data.clone()).collect() }
}

fn config(dir: &Path) -> Json {
    Json::parse_file(&dir.join("config.json")).unwrap()
}

fn check_mapping(dir: &Path, tp: usize, pp: usize, algo: Option<&str>) {
    let c = config(dir);
    let m = c.get("mapping").unwrap();
    assert_eq!(m.get("world_size").unwrap().as_usize(), Some(tp * pp));
    assert_eq!(m.get("tp_size").unwrap().as_usize(), Some(tp));
    assert_eq!(m.get("pp_size").unwrap().as_usize(), Some(pp));
    let q = c.get("quantization").unwrap();
    assert_eq!(q.get("quant_algo").unwrap().as_str(), algo);
    assert!(q.get("kv_cache_quant_algo").unwrap().is_null());
    let allowed = ["quant_algo", "kv_cache_quant_algo", "group_size", "has_zero_point", "pre_quant_scale", "exclude_modules"];
    assert!(q.as_object().unwrap().iter().all(|(k, _)| allowed.contains(&k.as_str())));
    for k in ["architecture", "dtype", "logits_dtype", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "hidden_size", "norm_epsilon", "vocab_size", "max_position_embeddings", "hidden_act", "use_parallel_embedding",
        "embedding_sharding_dim", "head_size", "intermediate_size", "position_embedding_type", "share_embedding_table",
        "rotary_base"] {
        assert!(c.get(k).is_some(), "config.json lacks {k}");
    }
    assert_eq!(c.get("num_hidden_layers").unwrap().as_usize(), Some(2));
    assert_eq!(c.get("dtype").unwrap().as_str(), Some("float32"));
    let files = std::fs::read_dir(dir).unwrap().count();
    let mixed = algo == Some("MIXED_PRECISION");
    assert_eq!(files, tp * pp + 1 + mixed as usize, "config.json (+ quant_cfg.json) + one file per rank");
}

/// tp=2 and pp=2 exports equal the tp=1 export once put back together.
fn check_splits(qformat: &str, algo: Option<&str>, tp2: bool) -> BTreeMap<String, T> {
    check_splits_for(&model(), qformat, algo, tp2)
}

fn check_splits_for(m: &Path, qformat: &str, algo: Option<&str>, tp2: bool) -> BTreeMap<String, T> {
    let export = |q: &str, tp, pp| export_for(m, q, tp, pp);
    let one = export(qformat, 1, 1).unwrap();
    check_mapping(&one, 1, 1, algo);
    assert_eq!(findings(&one), Vec::<String>::new(), "{qformat}: verify tp 1");
    let full = rank(&one, 0);
    let moe = config(&one).get("moe").is_some();
    let swiglu = !moe && config(&one).get("hidden_act").unwrap().as_str() == Some("swiglu");
    if tp2 {
        let two = export(qformat, 2, 1).unwrap();
        check_mapping(&two, 2, 1, algo);
        assert_eq!(findings(&two), Vec::<String>::new(), "{qformat}: verify tp 2");
        let (a, b) = (rank(&two, 0), rank(&two, 1));
        assert_eq!(a.keys().collect::<Vec<_>>(), full.keys().collect::<Vec<_>>());
        assert_eq!(b.keys().collect::<Vec<_>>(), full.keys().collect::<Vec<_>>());
        for (name, t) in &full {
            assert_eq!(&reassemble(name, &a[name], &b[name], swiglu, moe), t, "{qformat}: {name} tp=2 shards do not reassemble");
        }
    }
    let pp = export(qformat, 1, 2).unwrap();
    check_mapping(&pp, 1, 2, algo);
    assert_eq!(findings(&pp), Vec::<String>::new(), "{qformat}: verify pp 2");
    let (a, b) = (rank(&pp, 0), rank(&pp, 1));
    assert!(a.contains_key("transformer.vocab_embedding.weight") && !b.contains_key("transformer.vocab_embedding.weight"));
    assert!(b.contains_key("lm_head.weight") && b.contains_key("transformer.ln_f.weight"));
    assert!(!a.contains_key("lm_head.weight") && !a.contains_key("transformer.ln_f.weight"));
    let mut merged = BTreeMap::new();
    for (n, t) in a {
        assert!(!n.contains("layers.1."));
        merged.insert(n, t);
    }
    for (n, t) in b {
        merged.insert(n.replace("transformer.layers.0.", "transformer.layers.1."), t);
    }
    if !full.contains_key("lm_head.weight") {
        // A shared table (Gemma) is written as lm_head on the last rank when pp > 1.
        assert_eq!(merged.remove("lm_head.weight").as_ref(), full.get("transformer.vocab_embedding.weight"));
    }
    assert_eq!(merged, full, "{qformat}: pp=2 ranks differ from tp=1");
    full
}

fn is_usage(e: &Error) -> bool {
    matches!(e, Error::Usage(_))
}

fn f32s(t: &T) -> Vec<f32> {
    t.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// The tp=1 FP8 export of `m` against rq-min's unified FP8 export, tensor by tensor: renamed
/// tensors (incl. linear and LayerNorm biases) are byte-equal, separate q/k/v have the max
/// scales and codes re-quantized from the original, qkv biases are [q; k; v], `1 + w` norms
/// (Gemma, Nemotron) are the original plus one, Phi3's fused qkv_proj is qkv as it is and its
/// gate_up_proj is `mlp.fc` with the halves swapped.
fn fp8_matches_unified(m: &Path, full: &BTreeMap<String, T>) {
    let cfg = rq_min::model::config::ModelConfig::from_dir(m).unwrap();
    let arch = cfg.architecture.as_str();
    let uni_dir = scratch(&format!("{}-fp8-unified", m.file_name().unwrap().to_string_lossy())).join("out");
    quantize(&args_for(m, "fp8", &uni_dir)).unwrap();
    let uni = load(&uni_dir.join("model.safetensors"));
    let orig = load(&m.join("model.safetensors"));
    // TRT-LLM name -> unified name, for tensors copied as they are.
    let mut renamed: BTreeMap<String, String> = BTreeMap::new();
    // TRT-LLM names compared by hand below.
    let mut checked: BTreeSet<String> = BTreeSet::new();
    renamed.insert("transformer.vocab_embedding.weight".into(), "model.embed_tokens.weight".into());
    let gemma = arch == "GemmaForCausalLM";
    if !gemma {
        renamed.insert("lm_head.weight".into(), "lm_head.weight".into());
    }
    let plus_one = |t: &T| T { data: f32s(t).iter().flat_map(|v| (v + 1.0).to_le_bytes()).collect(), ..t.clone() };
    let mut norms = vec![("transformer.ln_f".to_string(), "model.norm".to_string())];
    let dense = ("attention.dense", "self_attn.o_proj");
    let linears: Vec<(&str, &str)> = match arch {
        "Phi3ForCausalLM" => vec![dense, ("mlp.proj", "mlp.down_proj")],
        "Starcoder2ForCausalLM" => vec![dense, ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")],
        "NemotronForCausalLM" => vec![dense, ("mlp.fc", "mlp.up_proj"), ("mlp.proj", "mlp.down_proj")],
        _ => vec![dense, ("mlp.fc", "mlp.gate_proj"), ("mlp.gate", "mlp.up_proj"), ("mlp.proj", "mlp.down_proj")],
    };
    let suffixes =
        [("weight", "weight"), ("weights_scaling_factor", "weight_scale"), ("activation_scaling_factor", "input_scale"), ("bias", "bias")];
    for l in 0..cfg.num_hidden_layers {
        let (t, h) = (format!("transformer.layers.{l}"), format!("model.layers.{l}"));
        norms.push((format!("{t}.input_layernorm"), format!("{h}.input_layernorm")));
        norms.push((format!("{t}.post_layernorm"), format!("{h}.post_attention_layernorm")));
        if cfg.qk_norm {
            renamed.insert(format!("{t}.attention.q_layernorm.weight"), format!("{h}.self_attn.q_norm.weight"));
            renamed.insert(format!("{t}.attention.k_layernorm.weight"), format!("{h}.self_attn.k_norm.weight"));
        }
        for (tm, hm) in &linears {
            for (ts, hs) in suffixes {
                if uni.contains_key(&format!("{h}.{hm}.{hs}")) {
                    renamed.insert(format!("{t}.{tm}.{ts}"), format!("{h}.{hm}.{hs}"));
                }
            }
        }
        if arch == "Phi3ForCausalLM" {
            // One quantizer per fused module: qkv_proj as it is (its codes are those of the
            // original with its one scale); gate_up_proj's halves swapped into mlp.fc.
            let ws = f32s(&uni[&format!("{h}.self_attn.qkv_proj.weight_scale")])[0];
            let codes = fp8::quantize(&f32s(&orig[&format!("{h}.self_attn.qkv_proj.weight")]), ws, Dtype::F32);
            assert_eq!(full[&format!("{t}.attention.qkv.weight")].data, codes);
            for (ts, hs) in &suffixes[..3] {
                renamed.insert(format!("{t}.attention.qkv.{ts}"), format!("{h}.self_attn.qkv_proj.{hs}"));
            }
            let fc = |s: &str| format!("{t}.mlp.fc.{s}");
            assert_eq!(full[&fc("weight")], swap_halves(&uni[&format!("{h}.mlp.gate_up_proj.weight")]), "{t}: mlp.fc = [up; gate]");
            checked.insert(fc("weight"));
            for (ts, hs) in &suffixes[1..3] {
                renamed.insert(fc(ts), format!("{h}.mlp.gate_up_proj.{hs}"));
            }
            continue;
        }
        // qkv: max scales, codes re-quantized from the original weights.
        let max = |s: &str| ["q_proj", "k_proj", "v_proj"].iter().map(|p| f32s(&uni[&format!("{h}.self_attn.{p}.{s}")])[0]).fold(0f32, f32::max);
        let ws = max("weight_scale");
        assert_eq!(f32s(&full[&format!("{t}.attention.qkv.weights_scaling_factor")]), vec![ws]);
        assert_eq!(f32s(&full[&format!("{t}.attention.qkv.activation_scaling_factor")]), vec![max("input_scale")]);
        let codes: Vec<u8> = ["q_proj", "k_proj", "v_proj"]
            .iter()
            .flat_map(|p| fp8::quantize(&f32s(&orig[&format!("{h}.self_attn.{p}.weight")]), ws, Dtype::F32))
            .collect();
        let w = &full[&format!("{t}.attention.qkv.weight")];
        let rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim;
        assert_eq!((w.dtype, w.shape.clone()), (Dtype::F8E4M3, vec![rows, cfg.hidden_size]));
        assert_eq!(w.data, codes);
        for s in ["weight", "weights_scaling_factor", "activation_scaling_factor"] {
            checked.insert(format!("{t}.attention.qkv.{s}"));
        }
        if cfg.qkv_bias {
            let parts: Vec<T> = ["q_proj", "k_proj", "v_proj"].iter().map(|p| uni[&format!("{h}.self_attn.{p}.bias")].clone()).collect();
            assert_eq!(full[&format!("{t}.attention.qkv.bias")], cat0(&parts), "{t}: qkv bias is [q; k; v]");
            checked.insert(format!("{t}.attention.qkv.bias"));
        }
    }
    for (tn, hn) in norms {
        let (tw, hw) = (format!("{tn}.weight"), format!("{hn}.weight"));
        if cfg.norm_offset {
            assert_eq!(full[&tw], plus_one(&orig[&hw]), "{tw}: 1 + w");
            checked.insert(tw);
        } else {
            renamed.insert(tw, hw);
        }
        if cfg.layer_norm {
            renamed.insert(format!("{tn}.bias"), format!("{hn}.bias"));
        }
    }
    if gemma {
        assert!(!full.contains_key("lm_head.weight"), "Gemma shares the embedding table");
    }
    for (name, t) in full {
        if checked.contains(name) {
            continue;
        }
        let u = &uni[renamed.get(name).unwrap_or_else(|| panic!("unexpected tensor {name}"))];
        assert_eq!((t.dtype, &t.data), (u.dtype, &u.data), "{name} differs from the unified export");
        if numel(t) == 1 {
            assert_eq!(t.shape, vec![1], "{name}: per-tensor factors have shape [1]");
        } else {
            assert_eq!(t.shape, u.shape);
        }
    }
    for name in renamed.keys().chain(&checked) {
        assert!(full.contains_key(name), "{name} is missing");
    }
}

#[test]
fn fp8_matches_unified_and_splits() {
    let full = check_splits("fp8", Some("FP8"), true);
    fp8_matches_unified(&model(), &full);
}

#[test]
fn nvfp4_splits() {
    let full = check_splits("nvfp4", Some("NVFP4"), true);
    let w = &full["transformer.layers.0.attention.qkv.weight"];
    assert_eq!((w.dtype, w.shape.clone()), (Dtype::U8, vec![256, 64]));
    assert_eq!(full["transformer.layers.0.attention.qkv.weights_scaling_factor"].dtype, Dtype::F8E4M3);
    assert_eq!(config(&export("nvfp4", 1, 1).unwrap()).get("quantization").unwrap().get("group_size").unwrap().as_usize(), Some(16));
}

#[test]
fn int8_sq_splits() {
    let full = check_splits("int8_sq", Some("W8A8_SQ_PER_CHANNEL"), true);
    for l in ["attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"] {
        assert!(full.contains_key(&format!("transformer.layers.0.{l}.prequant_scaling_factor")), "{l}");
    }
    assert_eq!(full["transformer.layers.0.attention.qkv.weights_scaling_factor"].shape, vec![256]);
}

#[test]
fn int4_awq_splits_and_recovers_prequant() {
    // hidden 128 = one INT4 group: dense's groups cannot be split in two.
    let err = export("int4_awq", 2, 1).unwrap_err();
    assert!(is_usage(&err), "{err}");
    let full = check_splits("int4_awq", Some("W4A16_AWQ"), false);
    let orig = load(&model().join("model.safetensors"));
    let uni_dir = scratch("int4-unified").join("out");
    quantize(&args("int4_awq", &uni_dir)).unwrap();
    let uni = load(&uni_dir.join("model.safetensors"));
    for l in 0..2 {
        let t = format!("transformer.layers.{l}");
        for m in ["attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"] {
            assert!(full.contains_key(&format!("{t}.{m}.prequant_scaling_factor")), "{m}");
            assert_eq!(full[&format!("{t}.{m}.weight")].dtype, Dtype::I8);
        }
        assert_eq!(full[&format!("{t}.attention.qkv.weight")].shape, vec![128, 128]);
        assert_eq!(full[&format!("{t}.attention.qkv.weights_scaling_factor")].shape, vec![256, 1]);
        for (norm, hf, m) in [("input_layernorm", "input_layernorm", "attention.qkv"), ("post_layernorm", "post_attention_layernorm", "mlp.fc")] {
            let hf = format!("model.layers.{l}.{hf}.weight");
            assert_eq!(full[&format!("{t}.{norm}.weight")].data, orig[&hf].data, "original norm written");
            let p = f32s(&full[&format!("{t}.{m}.prequant_scaling_factor")]);
            let (o, u) = (f32s(&orig[&hf]), f32s(&uni[&hf]));
            for c in 0..128 {
                assert!((o[c] * p[c] - u[c]).abs() <= 1e-6 * u[c].abs().max(1e-6), "{hf}[{c}]");
            }
        }
    }
    let q = config(&export("int4_awq", 1, 1).unwrap()).get("quantization").unwrap().clone();
    assert_eq!(q.get("group_size").unwrap().as_usize(), Some(128));
    assert_eq!(q.get("pre_quant_scale").unwrap().as_bool(), Some(true));
    assert_eq!(q.get("has_zero_point").unwrap().as_bool(), Some(false));
}

#[test]
fn none_splits_and_matches_original() {
    let full = check_splits("none", None, true);
    let orig = load(&model().join("model.safetensors"));
    assert_eq!(full["transformer.layers.1.mlp.proj.weight"], orig["model.layers.1.mlp.down_proj.weight"]);
    let qkv = &full["transformer.layers.0.attention.qkv.weight"];
    let parts: Vec<T> = ["q_proj", "k_proj", "v_proj"].iter().map(|p| orig[&format!("model.layers.0.self_attn.{p}.weight")].clone()).collect();
    assert_eq!(qkv, &cat0(&parts));
    assert!(!full.keys().any(|k| k.ends_with("scaling_factor")));
}

#[test]
fn non_dividing_split_is_a_usage_error() {
    for (q, tp, pp) in [("none", 3, 1), ("fp8", 3, 1), ("none", 1, 3), ("none", 8, 1)] {
        let err = export(q, tp, pp).unwrap_err();
        assert!(is_usage(&err), "{q} tp {tp} pp {pp}: {err}");
    }
    let err = quantize(&QuantizeArgs { tp: 2, ..args("fp8", &scratch("bad").join("out")) }).unwrap_err();
    assert!(is_usage(&err), "--tp without --export trtllm: {err}");
}

#[test]
fn w4a8_awq_and_fp8_kv() {
    let full = check_splits("w4a8_awq", Some("W4A8_AWQ"), false);
    for m in ["attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"] {
        for s in ["weights_scaling_factor_2", "activation_scaling_factor", "prequant_scaling_factor"] {
            assert!(full.contains_key(&format!("transformer.layers.0.{m}.{s}")), "{m}.{s}");
        }
    }
    let out = scratch("fp8-kv").join("out");
    quantize(&QuantizeArgs { export: "trtllm".into(), tp: 2, kv_cache: "fp8".into(), ..args("fp8", &out) }).unwrap();
    assert_eq!(config(&out).get("quantization").unwrap().get("kv_cache_quant_algo").unwrap().as_str(), Some("FP8"));
    for r in 0..2 {
        let t = rank(&out, r);
        for s in ["k_cache_scaling_factor", "v_cache_scaling_factor", "kv_cache_scaling_factor"] {
            let v = &t[&format!("transformer.layers.1.attention.{s}")];
            assert_eq!(v.shape, vec![1]);
            assert!(f32::from_le_bytes(v.data[..4].try_into().unwrap()) >= 1.0, "FP8 KV factors clamped to >= 1");
        }
    }
}

fn tiny_stories() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stories260K-hf")
}

fn have(tool: &str) -> bool {
    std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn crc32_and_inflate_of_real_gzip() {
    // The CRC-32 check value of RFC 3720 / zlib.
    assert_eq!(rq_min::io::tar_gz::crc32(0, b"123456789"), 0xCBF4_3926);
    // Stored blocks round-trip, across the 65535-byte block limit.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut gz = rq_min::io::tar_gz::GzWriter::new(Vec::new()).unwrap();
    std::io::Write::write_all(&mut gz, &data).unwrap();
    let bytes = gz.finish().unwrap();
    assert_eq!(rq_min::io::tar_gz::gunzip(&bytes).unwrap(), data);
    let mut bad = bytes.clone();
    bad[20] ^= 1;
    assert!(rq_min::io::tar_gz::gunzip(&bad).is_err(), "a flipped byte fails the CRC");
    if !have("gzip") {
        println!("skipping the compressed-stream check: no gzip");
        return;
    }
    // Fixed and dynamic Huffman blocks as made by gzip.
    let text = std::fs::read(tiny_stories().join("tokenizer.json")).unwrap();
    for level in ["-1", "-9"] {
        let mut child = std::process::Command::new("gzip")
            .args(["-c", level])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), &text).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.stdout.len() < text.len() / 2, "gzip compressed");
        assert_eq!(rq_min::io::tar_gz::gunzip(&out.stdout).unwrap(), text, "gzip {level}");
    }
}

#[test]
fn qnemo_holds_the_trtllm_folder_and_tokenizer() {
    let base = scratch("qnemo");
    let run = |export: &str, out: &Path| {
        let a = QuantizeArgs { model: tiny_stories(), export: export.into(), tp: 2, ..args("fp8", out) };
        quantize(&a)
    };
    let folder = base.join("folder");
    let file = base.join("model.qnemo");
    run("trtllm", &folder).unwrap();
    run("qnemo", &file).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let members = rq_min::io::tar_gz::read_tar_gz(&bytes, &file).unwrap();
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "./config.json",
            "./rank0.safetensors",
            "./rank1.safetensors",
            "./special_tokens_map.json",
            "./tokenizer.json",
            "./tokenizer_config.json",
            "./tokenizer_config.yaml"
        ]
    );
    for m in &members {
        let n = m.name.trim_start_matches("./");
        let expected = match n {
            "config.json" | "rank0.safetensors" | "rank1.safetensors" => std::fs::read(folder.join(n)).unwrap(),
            "tokenizer_config.yaml" => b"library: huggingface\ntype: .\nuse_fast: true\n".to_vec(),
            _ => std::fs::read(tiny_stories().join(n)).unwrap(),
        };
        assert_eq!(m.data, expected, "{n}");
    }
    // Nothing but the tarball is left beside it.
    let left: Vec<String> = std::fs::read_dir(&base).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    if have("gzip") {
        assert!(std::process::Command::new("gzip").arg("-t").arg(&file).status().unwrap().success(), "gzip -t");
    }
    if have("tar") {
        let out = std::process::Command::new("tar").arg("-tzf").arg(&file).output().unwrap();
        assert!(out.status.success());
        let listed: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
        let mut expected = vec!["./".to_string()];
        expected.extend(names.iter().map(|s| s.to_string()));
        assert_eq!(listed, expected, "tar -tzf");
    }
    // A refused split writes nothing.
    let bad = base.join("bad.qnemo");
    assert!(is_usage(&quantize(&QuantizeArgs { model: tiny_stories(), export: "qnemo".into(), tp: 3, ..args("fp8", &bad) }).unwrap_err()));
    assert_eq!(std::fs::read_dir(&base).unwrap().count(), 2);
}

fn family(name: &str) -> Option<PathBuf> {
    Some(common::shared_dir()?.join("reference/families").join(name))
}

/// Mistral, Qwen2 (qkv bias), Qwen3 (q/k norms), Gemma (1 + w norms, shared table), Phi3
/// (fused modules, swiglu), Starcoder2 (LayerNorm, biases everywhere), Nemotron (LayerNorm1P,
/// squared-relu, half rotary): FP8 tp=2 and pp=2 shards reassemble to tp=1, which equals the
/// unified export renamed; config keys.
#[test]
fn families_fp8_match_unified_and_split() {
    for (name, arch, act) in [
        ("mistral", "MistralForCausalLM", "silu"),
        ("qwen2", "Qwen2ForCausalLM", "silu"),
        ("qwen3", "Qwen3ForCausalLM", "silu"),
        ("gemma", "GemmaForCausalLM", "gelu"),
        ("phi3", "Phi3ForCausalLM", "swiglu"),
        ("starcoder2", "Starcoder2ForCausalLM", "gelu"),
        ("nemotron", "NemotronForCausalLM", "squared-relu"),
    ] {
        let Some(m) = family(name) else { return };
        let full = check_splits_for(&m, "fp8", Some("FP8"), true);
        fp8_matches_unified(&m, &full);
        let c = config(&export_for(&m, "fp8", 1, 1).unwrap());
        assert_eq!(c.get("architecture").unwrap().as_str(), Some(arch));
        assert_eq!(c.get("hidden_act").unwrap().as_str(), Some(act));
        let qwen = name.starts_with("qwen");
        assert_eq!(c.get("qwen_type").and_then(Json::as_str), qwen.then_some(name));
        assert_eq!(c.get("attn_bias").and_then(Json::as_bool), (qwen || name == "gemma").then_some(name == "qwen2"));
        assert_eq!(c.get("share_embedding_table").unwrap().as_bool(), Some(name == "gemma"));
        let gpt = name == "starcoder2" || name == "nemotron";
        assert_eq!(c.get("gpt_variant").and_then(Json::as_str), gpt.then_some(name));
        assert_eq!(c.get("rmsnorm").unwrap().as_bool(), Some(!gpt));
        assert_eq!(c.get("bias").unwrap().as_bool(), Some(name == "starcoder2"));
        // Nemotron: partial_rotary_factor 0.5 of head_dim 32.
        assert_eq!(c.get("rotary_pct").unwrap().as_f64(), Some(if name == "nemotron" { 0.5 } else { 1.0 }));
        let l0 = |s: &str| full.get(&format!("transformer.layers.0.{s}")).map(|t| t.shape.clone());
        match name {
            "qwen2" => assert_eq!(l0("attention.qkv.bias"), Some(vec![256])),
            "qwen3" => assert_eq!(full["transformer.layers.1.attention.k_layernorm.weight"].shape, vec![32]),
            "phi3" => assert_eq!((l0("mlp.fc.weight"), l0("mlp.gate.weight")), (Some(vec![512, 128]), None), "fc = [up; gate]"),
            "starcoder2" => {
                let biases = [("attention.qkv.bias", 256), ("attention.dense.bias", 128), ("mlp.fc.bias", 256), ("mlp.proj.bias", 128)];
                for (b, n) in biases.into_iter().chain([("post_layernorm.bias", 128)]) {
                    assert_eq!(l0(b), Some(vec![n]), "{b}");
                }
            }
            _ => {}
        }
        if gpt {
            assert_eq!(full["transformer.ln_f.bias"].shape, vec![128]);
            assert!(l0("mlp.gate.weight").is_none(), "plain MLP");
        }
    }
}

/// Every format on Phi3, Starcoder2 and Nemotron: tp=2 / pp=2 shards reassemble, `verify` is
/// clean on every export; Phi3's mlp.fc is gate_up_proj with its halves swapped in every
/// format (packed INT4 row pairs, per-row / per-block scales), its per-tensor factors the
/// module's, and qkv is qkv_proj's rows as they are (plus the recovered prequant for AWQ).
#[test]
fn new_families_every_format() {
    for name in ["phi3", "starcoder2", "nemotron"] {
        let Some(m) = family(name) else { return };
        for (q, algo) in [
            ("nvfp4", Some("NVFP4")),
            ("int8_sq", Some("W8A8_SQ_PER_CHANNEL")),
            ("int4_awq", Some("W4A16_AWQ")),
            ("w4a8_awq", Some("W4A8_AWQ")),
            ("none", None),
        ] {
            // AWQ: hidden 128 is one group of 128, which tp 2 cannot split along o_proj's input.
            let full = check_splits_for(&m, q, algo, !q.contains("awq"));
            if name != "phi3" || q == "none" {
                continue;
            }
            let uni_dir = scratch(&format!("phi3-{q}-unified")).join("out");
            quantize(&args_for(&m, q, &uni_dir)).unwrap();
            let uni = load(&uni_dir.join("model.safetensors"));
            let mut compared = 0;
            for l in 0..2 {
                let (t, h) = (format!("transformer.layers.{l}"), format!("model.layers.{l}"));
                for (ts, hs) in [
                    ("weight", "weight"),
                    ("weights_scaling_factor", "weight_scale"),
                    ("weights_scaling_factor_2", "weight_scale_2"),
                    ("activation_scaling_factor", "input_scale"),
                ] {
                    let (fc, gu) = (full.get(&format!("{t}.mlp.fc.{ts}")), uni.get(&format!("{h}.mlp.gate_up_proj.{hs}")));
                    let (qkv, fused) = (full.get(&format!("{t}.attention.qkv.{ts}")), uni.get(&format!("{h}.self_attn.qkv_proj.{hs}")));
                    assert_eq!(fc.is_some(), gu.is_some(), "{q} {t}.mlp.fc.{ts}");
                    let (Some(fc), Some(gu), Some(qkv), Some(fused)) = (fc, gu, qkv, fused) else { continue };
                    compared += 1;
                    assert_eq!(&qkv.data, &fused.data, "{q} {t}.attention.qkv.{ts}");
                    if numel(gu) == 1 {
                        assert_eq!(&fc.data, &gu.data, "{q} {t}.mlp.fc.{ts}: the module's factor");
                    } else {
                        assert_eq!(fc.data, swap_halves(gu).data, "{q} {t}.mlp.fc.{ts}: halves swapped");
                    }
                }
            }
            assert!(compared >= 4, "{q}: weight and weight_scale of both layers compared ({compared})");
        }
    }
}

/// A Phi3 like the shared tiny one but twice as wide (hidden 256, 8 heads, 4 KV heads,
/// intermediate 512), random weights: two INT4 groups per row, so AWQ formats split at tp 2.
fn wide_phi3() -> PathBuf {
    let dir = scratch("phi3-wide").join("model");
    std::fs::create_dir_all(&dir).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut random = |n: usize, centre: f32, spread: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                (centre + spread * (2.0 * u - 1.0)).to_le_bytes()
            })
            .collect()
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let (h, i, v) = (256, 512, 512);
    tensors.push(("model.embed_tokens.weight".into(), vec![v, h], random(v * h, 0.0, 0.5)));
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((format!("{p}.{n}.weight"), vec![h], random(h, 1.0, 0.2)));
        }
        let linears = [("self_attn.qkv_proj", 512, h), ("self_attn.o_proj", h, h), ("mlp.gate_up_proj", 2 * i, h), ("mlp.down_proj", h, i)];
        for (n, o, inp) in linears {
            tensors.push((format!("{p}.{n}.weight"), vec![o, inp], random(o * inp, 0.0, 0.06)));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![h], random(h, 1.0, 0.2)));
    tensors.push(("lm_head.weight".into(), vec![v, h], random(v * h, 0.0, 0.06)));
    let list: Vec<(&str, Dtype, &[usize], &[u8])> =
        tensors.iter().map(|(n, s, d)| (n.as_str(), Dtype::F32, s.as_slice(), d.as_slice())).collect();
    rq_min::io::safetensors::write_file(&dir.join("model.safetensors"), &list, &[]).unwrap();
    let text = std::fs::read_to_string(family("phi3").unwrap().join("config.json")).unwrap();
    let text = text
        .replace("\"hidden_size\": 128", "\"hidden_size\": 256")
        .replace("\"intermediate_size\": 256", "\"intermediate_size\": 512")
        .replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 8")
        .replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 4");
    std::fs::write(dir.join("config.json"), text).unwrap();
    dir
}

/// INT4 and W4A8 AWQ at tp 2 on the wide Phi3: each rank's mlp.fc is [up_r; gate_r] of the
/// packed INT4 rows and group scales, proj's groups and prequant split along the input.
#[test]
fn phi3_awq_splits_fused_halves() {
    if family("phi3").is_none() {
        return;
    }
    let m = wide_phi3();
    for (q, algo) in [("int4_awq", "W4A16_AWQ"), ("w4a8_awq", "W4A8_AWQ")] {
        let full = check_splits_for(&m, q, Some(algo), true);
        assert_eq!(full["transformer.layers.0.mlp.fc.weight"].shape, vec![512, 256], "{q}: packed [up; gate]");
        assert_eq!(full["transformer.layers.0.mlp.proj.weights_scaling_factor"].shape, vec![256, 4]);
    }
}

/// INT4 AWQ on the families whose unified export folds the shared q/k/v (up) scale into a norm:
/// Gemma (1 + w RMSNorm), Phi3 (RMSNorm before its fused modules), Starcoder2 (LayerNorm weight
/// and bias), Nemotron (LayerNorm1P: 1 + w, and bias). The prequant is recovered as
/// (off + exported) / (off + original) per channel (f64, 1e-6), equals the folded bias over
/// the original bias too (1e-5), and the written norm (bias) is the original (+1).
#[test]
fn awq_recovers_prequant_from_folded_norms() {
    for (name, fc) in [("gemma", "mlp.gate"), ("phi3", "mlp.fc"), ("starcoder2", "mlp.fc"), ("nemotron", "mlp.fc")] {
        let Some(m) = family(name) else { return };
        let cfg = rq_min::model::config::ModelConfig::from_dir(&m).unwrap();
        let off = if cfg.norm_offset { 1.0 } else { 0.0 };
        let full = rank(&export_for(&m, "int4_awq", 1, 1).unwrap(), 0);
        let uni_dir = scratch(&format!("{name}-int4-unified")).join("out");
        quantize(&args_for(&m, "int4_awq", &uni_dir)).unwrap();
        let uni = load(&uni_dir.join("model.safetensors"));
        let orig = load(&m.join("model.safetensors"));
        for (norm, hf, lin) in
            [("input_layernorm", "input_layernorm", "attention.qkv"), ("post_layernorm", "post_attention_layernorm", fc)]
        {
            let hf = format!("model.layers.0.{hf}");
            let (o, u) = (f32s(&orig[&format!("{hf}.weight")]), f32s(&uni[&format!("{hf}.weight")]));
            assert_ne!(o, u, "{name}: AWQ folded a scale into {hf}");
            let p = f32s(&full[&format!("transformer.layers.0.{lin}.prequant_scaling_factor")]);
            let written = f32s(&full[&format!("transformer.layers.0.{norm}.weight")]);
            for c in 0..o.len() {
                assert_eq!(written[c], o[c] + off as f32, "{name} {norm}[{c}]");
                let want = (off + u[c] as f64) / (off + o[c] as f64);
                assert!((p[c] as f64 - want).abs() <= 1e-6 * want.abs(), "{name} {hf}[{c}]: {} vs {want}", p[c]);
            }
            if cfg.layer_norm {
                let (ob, ub) = (f32s(&orig[&format!("{hf}.bias")]), f32s(&uni[&format!("{hf}.bias")]));
                assert_eq!(full[&format!("transformer.layers.0.{norm}.bias")], orig[&format!("{hf}.bias")], "{name}: original bias");
                for c in (0..ob.len()).filter(|&c| ob[c].abs() > 1e-3) {
                    let want = ub[c] as f64 / ob[c] as f64;
                    assert!((p[c] as f64 - want).abs() <= 1e-5 * want.abs(), "{name} {hf}.bias[{c}]: {} vs {want}", p[c]);
                }
            }
        }
    }
}

#[test]
fn unsupported_family_and_nvfp4_awq_are_refused() {
    let err = export("nvfp4_awq", 1, 1).unwrap_err();
    assert!(matches!(&err, Error::Unsupported(m) if m.contains("NVFP4_AWQ")), "{err}");
    if family("mixtral").is_none() {
        return;
    }
    // What the family's TensorRT-LLM class cannot run: a dense layer in an MoE model (its
    // decoder layer is MoE in every layer), : Nemotron / Phi3 linear biases (TRT-LLM's
    // GPT nemotron variant and Phi3 have none), an activation other than the family's.
    use rq_min::model::config::{Activation, ModelConfig};
    use rq_min::export::trtllm::check_model;
    let cfg = |n: &str| ModelConfig::from_dir(&family(n).unwrap()).unwrap();
    let refused = |c: ModelConfig| matches!(check_model(&c), Err(Error::Unsupported(_)));
    assert!(["nemotron", "phi3", "starcoder2"].iter().all(|n| check_model(&cfg(n)).is_ok()));
    assert!(refused(ModelConfig { mlp_bias: true, ..cfg("nemotron") }));
    assert!(refused(ModelConfig { qkv_bias: true, ..cfg("phi3") }));
    assert!(refused(ModelConfig { act: Activation::GeluTanh, ..cfg("phi3") }));
    assert!(refused(ModelConfig { act: Activation::Silu, ..cfg("starcoder2") }));
    assert!(refused(ModelConfig { act: Activation::Relu2, ..cfg("mistral") }));
    let q = cfg("qwen3_moe");
    assert!(check_model(&q).is_ok() && check_model(&cfg("mixtral")).is_ok());
    let moe = q.moe.clone().map(|m| rq_min::model::config::MoeConfig { sparse: vec![true, false], ..m });
    assert!(refused(ModelConfig { moe, ..q }), "mlp_only_layers");
}

/// tp=4 > 2 KV heads: each rank holds one query head and a copy of its KV head (ModelOpt
/// `dup_kv_weight`); the q rows reassemble to the original q, k/v rows of ranks 2i and 2i+1
/// are equal and equal KV head i. Also for Phi3's fused qkv_proj (split into q/k/v rows first)
/// and Starcoder2's qkv bias.
#[test]
fn tp_above_kv_heads_duplicates_them() {
    let mut models = vec![model()];
    models.extend(["phi3", "starcoder2"].into_iter().filter_map(family));
    for (m, q) in models.iter().flat_map(|m| ["none", "int8_sq", "nvfp4"].map(|q| (m, q))) {
        let one = rank(&export_for(m, q, 1, 1).unwrap(), 0);
        let four = export_for(m, q, 4, 1).unwrap();
        assert_eq!(findings(&four), Vec::<String>::new(), "{q}: verify tp 4");
        let shards: Vec<_> = (0..4).map(|r| rank(&four, r)).collect();
        assert_eq!(config(&four).get("num_key_value_heads").unwrap().as_usize(), Some(2), "config keeps the HF count");
        for suffix in ["weight", "weights_scaling_factor", "bias"] {
            let name = format!("transformer.layers.0.attention.qkv.{suffix}");
            let Some(full) = one.get(&name) else { continue };
            if numel(full) == 1 {
                continue;
            }
            let head = full.shape[0] / 8; // q : k : v = 4 : 2 : 2 heads
            let part = |t: &T, i: usize| rows(t, i * head, (i + 1) * head);
            let q_rows: Vec<T> = shards.iter().map(|s| part(&s[&name], 0)).collect();
            assert_eq!(cat0(&q_rows), rows(full, 0, 4 * head), "{q} {suffix}: q heads");
            for r in 0..4 {
                let t = &shards[r][&name];
                assert_eq!(t.shape[0], 3 * head, "{q} {suffix}: one q, k and v head per rank");
                assert_eq!(part(t, 1), rows(full, (4 + r / 2) * head, (5 + r / 2) * head), "{q} rank {r}: k head {}", r / 2);
                assert_eq!(part(t, 2), rows(full, (6 + r / 2) * head, (7 + r / 2) * head), "{q} rank {r}: v head {}", r / 2);
            }
        }
    }
    // tp must divide the KV heads or be a multiple of them.
    assert!(is_usage(&check_split_err(3)));
}

fn check_split_err(tp: usize) -> Error {
    let mut cfg = rq_min::model::config::ModelConfig::from_dir(&model()).unwrap();
    cfg.num_attention_heads = 12;
    cfg.num_key_value_heads = 2;
    rq_min::export::trtllm::check_split(&cfg, tp, 1).unwrap_err()
}

/// A copy of families-llama with a vocabulary of 510 (embedding and lm_head trimmed).
fn vocab_510() -> PathBuf {
    let dir = scratch("vocab510").join("model");
    std::fs::create_dir_all(&dir).unwrap();
    let mut t = load(&model().join("model.safetensors"));
    for n in ["model.embed_tokens.weight", "lm_head.weight"] {
        let v = t.get_mut(n).unwrap();
        *v = rows(v, 0, 510);
    }
    let list: Vec<(&str, Dtype, &[usize], &[u8])> = t.iter().map(|(n, v)| (n.as_str(), v.dtype, v.shape.as_slice(), v.data.as_slice())).collect();
    rq_min::io::safetensors::write_file(&dir.join("model.safetensors"), &list, &[]).unwrap();
    let text = std::fs::read_to_string(model().join("config.json")).unwrap().replace("\"vocab_size\": 512", "\"vocab_size\": 510");
    std::fs::write(dir.join("config.json"), text).unwrap();
    dir
}

/// vocab 510 with tp=4: embedding and lm_head padded with zero rows to 512 and split in four;
/// config vocab_size stays 510. INT4 AWQ pads to a multiple of 64 and says so in vocab_size.
#[test]
fn vocab_is_padded_for_tp_and_awq() {
    let m = vocab_510();
    let orig = load(&m.join("model.safetensors"));
    let four = export_for(&m, "fp8", 4, 1).unwrap();
    assert_eq!(config(&four).get("vocab_size").unwrap().as_usize(), Some(510));
    for (trt, hf) in [("transformer.vocab_embedding.weight", "model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight")] {
        let parts: Vec<T> = (0..4).map(|r| rank(&four, r)[trt].clone()).collect();
        assert!(parts.iter().all(|p| p.shape == vec![128, 128]));
        let all = cat0(&parts);
        assert_eq!(rows(&all, 0, 510), orig[hf]);
        assert!(rows(&all, 510, 512).data.iter().all(|&b| b == 0), "{trt}: padding rows are zero");
    }
    let awq = export_for(&m, "int4_awq", 1, 1).unwrap();
    assert_eq!(config(&awq).get("vocab_size").unwrap().as_usize(), Some(512));
    assert_eq!(rank(&awq, 0)["lm_head.weight"].shape, vec![512, 128]);
}

/// --layer-formats with FP8 layer 0 and NVFP4 layer 1: MIXED_PRECISION, quant_cfg.json per
/// TensorRT-LLM module, tensors of each format, tp=2 shards reassemble; pp=2 is refused (per-rank
/// layer names would clash).
#[test]
fn mixed_precision_writes_quant_cfg() {
    let dir = scratch("mixed");
    let lf = dir.join("layers.json");
    let mods = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
    let entries: Vec<String> = (0..2)
        .flat_map(|l| mods.iter().map(move |m| format!("\"model.layers.{l}.{m}\": \"{}\"", if l == 0 { "fp8" } else { "nvfp4" })))
        .collect();
    std::fs::write(&lf, format!("{{{}}}", entries.join(", "))).unwrap();
    let run = |tp: usize, pp: usize| {
        let out = dir.join(format!("tp{tp}pp{pp}"));
        quantize(&QuantizeArgs { export: "trtllm".into(), tp, pp, layer_formats: Some(lf.clone()), ..args("fp8", &out) }).map(|()| out)
    };
    let one = run(1, 1).unwrap();
    check_mapping(&one, 1, 1, Some("MIXED_PRECISION"));
    let q = config(&one).get("quantization").unwrap().clone();
    assert_eq!(q.as_object().unwrap().len(), 2, "config.json keeps quant_algo and kv_cache_quant_algo only");
    let qc = Json::parse_file(&one.join("quant_cfg.json")).unwrap();
    assert_eq!(qc.get("quant_algo").unwrap().as_str(), Some("MIXED_PRECISION"));
    let layers = qc.get("quantized_layers").unwrap().as_object().unwrap();
    assert_eq!(layers.len(), 10);
    for (l, algo) in [(0, "FP8"), (1, "NVFP4")] {
        for m in ["attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"] {
            let e = qc.get("quantized_layers").unwrap().get(&format!("transformer.layers.{l}.{m}")).unwrap();
            assert_eq!(e.get("quant_algo").unwrap().as_str(), Some(algo));
            assert_eq!(e.get("group_size").and_then(Json::as_usize), (l == 1).then_some(16));
        }
    }
    let full = rank(&one, 0);
    assert_eq!(full["transformer.layers.0.mlp.proj.weight"].dtype, Dtype::F8E4M3);
    assert_eq!(full["transformer.layers.1.mlp.proj.weight"].dtype, Dtype::U8);
    let two = run(2, 1).unwrap();
    let (a, b) = (rank(&two, 0), rank(&two, 1));
    for (name, t) in &full {
        assert_eq!(&reassemble(name, &a[name], &b[name], false, false), t, "mixed: {name} tp=2 shards do not reassemble");
    }
    assert!(matches!(run(1, 2).unwrap_err(), Error::Unsupported(_)));
}

fn findings(path: &Path) -> Vec<String> {
    assert!(rq_min::export::verify::is_trtllm(path), "{} is detected as TensorRT-LLM", path.display());
    rq_min::export::verify::check_trtllm(path).unwrap().findings
}

/// `verify` on TensorRT-LLM checkpoints: clean on every format, split, KV duplication and
/// .qnemo; FP8 bits/param from the tensor sizes; broken copies are caught.
#[test]
fn verify_trtllm_checkpoints() {
    for (q, tp, pp) in [("fp8", 1, 1), ("fp8", 2, 2), ("nvfp4", 4, 1), ("int8_sq", 2, 1), ("int4_awq", 1, 2), ("w4a8_awq", 1, 1), ("none", 2, 1)] {
        let dir = export(q, tp, pp).unwrap();
        assert_eq!(findings(&dir), Vec::<String>::new(), "{q} tp {tp} pp {pp}");
    }
    let kv = scratch("verify-kv").join("out");
    quantize(&QuantizeArgs { export: "trtllm".into(), tp: 4, kv_cache: "fp8".into(), ..args("nvfp4", &kv) }).unwrap();
    assert_eq!(findings(&kv), Vec::<String>::new());
    let qnemo = scratch("verify-qnemo").join("m.qnemo");
    quantize(&QuantizeArgs { export: "qnemo".into(), tp: 2, ..args("int8_sq", &qnemo) }).unwrap();
    assert_eq!(findings(&qnemo), Vec::<String>::new());

    // FP8 tp=1: 1 byte per weight plus one 4-byte factor per linear (5 per layer, 2 layers).
    let fp8 = export("fp8", 1, 1).unwrap();
    let report = rq_min::export::verify::check_trtllm(&fp8).unwrap();
    let g = &report.groups["FP8"];
    let params = 2 * (256 * 128 + 128 * 128 + 2 * 256 * 128 + 128 * 256);
    assert_eq!((g.linears, g.params), (10, params));
    assert_eq!(g.bits(), 8.0 * (params + 10 * 4) as f64 / params as f64);

    // Broken copies.
    let broken = |name: &str, edit: &dyn Fn(&Path)| -> Vec<String> {
        let dir = scratch("verify-broken").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = export("fp8", 2, 1).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        edit(&dir);
        findings(&dir)
    };
    let without = |dir: &Path, r: usize, drop: &str| {
        let mut t = rank(dir, r);
        t.remove(drop).unwrap();
        let list: Vec<(&str, Dtype, &[usize], &[u8])> = t.iter().map(|(n, v)| (n.as_str(), v.dtype, v.shape.as_slice(), v.data.as_slice())).collect();
        rq_min::io::safetensors::write_file(&dir.join(format!("rank{r}.safetensors")), &list, &[]).unwrap();
    };
    let f = broken("no-wsf", &|d| without(d, 1, "transformer.layers.0.mlp.fc.weights_scaling_factor"));
    assert!(f.len() == 1 && f[0].contains("rank1") && f[0].contains("mlp.fc.weights_scaling_factor is missing"), "{f:?}");
    let f = broken("no-rank", &|d| std::fs::remove_file(d.join("rank1.safetensors")).unwrap());
    assert!(f.len() == 1 && f[0].contains("rank1.safetensors is missing"), "{f:?}");
    let one = export("fp8", 1, 1).unwrap();
    let f = broken("tp1-rank", &|d| {
        std::fs::copy(one.join("rank0.safetensors"), d.join("rank1.safetensors")).unwrap();
    });
    assert!(f.iter().any(|m| m.contains("rank1: transformer.layers.0.attention.qkv.weight is F8_E4M3 [256, 128], expected F8_E4M3 [128, 128]")), "{f:?}");
    let f = broken("kv-below-one", &|d| {
        let mut t = rank(d, 0);
        t.insert("transformer.layers.0.attention.k_cache_scaling_factor".into(), T { dtype: Dtype::F32, shape: vec![1], data: 0.5f32.to_le_bytes().to_vec() });
        let list: Vec<(&str, Dtype, &[usize], &[u8])> = t.iter().map(|(n, v)| (n.as_str(), v.dtype, v.shape.as_slice(), v.data.as_slice())).collect();
        rq_min::io::safetensors::write_file(&d.join("rank0.safetensors"), &list, &[]).unwrap();
        let c = std::fs::read_to_string(d.join("config.json")).unwrap().replace("\"kv_cache_quant_algo\": null", "\"kv_cache_quant_algo\": \"FP8\"");
        std::fs::write(d.join("config.json"), c).unwrap();
    });
    assert!(f.iter().any(|m| m.contains("rank0: transformer.layers.0.attention.k_cache_scaling_factor = 0.5")), "{f:?}");
    assert!(f.iter().any(|m| m.contains("rank1: transformer.layers.0.attention.k_cache_scaling_factor is missing")), "{f:?}");
    // LayerNorm and linear biases of a GPT-variant family, and Phi3's fused fc shape.
    let Some(sc2) = family("starcoder2") else { return };
    let dir = export_for(&sc2, "fp8", 2, 1).unwrap();
    without(&dir, 1, "transformer.layers.1.post_layernorm.bias");
    without(&dir, 0, "transformer.layers.0.mlp.proj.bias");
    let f = findings(&dir);
    let want = ["rank0: transformer.layers.0.mlp.proj.bias is missing", "rank1: transformer.layers.1.post_layernorm.bias is missing"];
    assert_eq!(f, want);
    let dir = export_for(&family("phi3").unwrap(), "fp8", 2, 1).unwrap();
    let c = std::fs::read_to_string(dir.join("config.json")).unwrap().replace("Phi3ForCausalLM", "LlamaForCausalLM");
    std::fs::write(dir.join("config.json"), c).unwrap();
    let f = findings(&dir);
    let want = "rank0: transformer.layers.0.mlp.fc.weight is F8_E4M3 [256, 128], expected F8_E4M3 [128, 128]";
    assert!(f.iter().any(|m| m.contains(want)), "{f:?} (a Llama layout wants a gate half only)");
}

/// The HF names of a tiny MoE family model: its block and its w1 (gate), w3 (up), w2 (down).
fn moe_names(name: &str) -> (&'static str, [&'static str; 3]) {
    match name {
        "mixtral" => ("block_sparse_moe", ["w1", "w3", "w2"]),
        _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
    }
}

fn hf_config(m: &Path) -> Json {
    Json::parse_file(&m.join("config.json")).unwrap()
}

/// Mixtral and Qwen3-MoE (4 experts, top 2; experts of intermediate 256 / 128): FP8 tp=2 and
/// pp=2 shards reassemble to tp=1 (fc by its w3 / w1 halves), verify is clean, and the tp=1
/// MoE tensors are the unified FP8 export's expert tensors stacked in TensorRT-LLM's order:
/// fc = [w3; w1] per expert with w1's weight_scale (equal to w3's) as (E, 1), proj = w2, the
/// activation factor the max over experts; the router is the original, F32. config.json's
/// `moe` block, swiglu and the experts' intermediate size.
#[test]
fn moe_fp8_matches_unified_and_splits() {
    for name in ["mixtral", "qwen3_moe"] {
        let Some(m) = family(name) else { return };
        let full = check_splits_for(&m, "fp8", Some("FP8"), true);
        let hc = hf_config(&m);
        let hn = |k: &str| hc.get(k).and_then(Json::as_usize).unwrap();
        let (e, h) = (hn("num_local_experts"), hn("hidden_size"));
        let inter = hn(if name == "mixtral" { "intermediate_size" } else { "moe_intermediate_size" });
        let c = config(&export_for(&m, "fp8", 1, 1).unwrap());
        let moe = c.get("moe").unwrap();
        assert_eq!(moe.get("num_experts").unwrap().as_usize(), Some(e));
        assert_eq!(moe.get("top_k").unwrap().as_usize(), Some(hn("num_experts_per_tok")));
        // Mixtral always renormalizes; the Qwen3-MoE model has norm_topk_prob = true.
        assert_eq!(moe.get("normalization_mode").unwrap().as_usize(), Some(1), "{name}: RENORMALIZE");
        assert_eq!(c.get("hidden_act").unwrap().as_str(), Some("swiglu"));
        assert_eq!(c.get("intermediate_size").unwrap().as_usize(), Some(inter));
        let mapping = c.get("mapping").unwrap();
        assert_eq!((mapping.get("moe_tp_size").unwrap().as_usize(), mapping.get("moe_ep_size").unwrap().as_usize()), (Some(1), Some(1)));
        let excluded = c.get("quantization").unwrap().get("exclude_modules").unwrap().as_array().unwrap();
        assert!(excluded.iter().any(|x| x.as_str() == Some("transformer.layers.0.mlp.router")));

        let uni_dir = scratch(&format!("{name}-fp8-unified")).join("out");
        quantize(&args_for(&m, "fp8", &uni_dir)).unwrap();
        let uni = load(&uni_dir.join("model.safetensors"));
        let orig = load(&m.join("model.safetensors"));
        let (block, [w1, w3, w2]) = moe_names(name);
        for l in 0..2 {
            let (t, hb) = (format!("transformer.layers.{l}.mlp"), format!("model.layers.{l}.{block}"));
            let x = |i: usize, w: &str, s: &str| &uni[&format!("{hb}.experts.{i}.{w}.{s}")];
            let router = &full[&format!("{t}.router.weight")];
            assert_eq!((router.dtype, router.shape.clone()), (Dtype::F32, vec![e, h]));
            assert_eq!(router.data, orig[&format!("{hb}.gate.weight")].data, "{name}: router is the original");
            let fc = &full[&format!("{t}.fc.weight")];
            assert_eq!((fc.dtype, fc.shape.clone()), (Dtype::F8E4M3, vec![e, 2 * inter, h]));
            let want: Vec<u8> = (0..e).flat_map(|i| [x(i, w3, "weight").data.clone(), x(i, w1, "weight").data.clone()].concat()).collect();
            assert_eq!(fc.data, want, "{name} {t}: fc = [w3; w1] per expert");
            let proj = &full[&format!("{t}.proj.weight")];
            assert_eq!((proj.dtype, proj.shape.clone()), (Dtype::F8E4M3, vec![e, h, inter]));
            assert_eq!(proj.data, (0..e).flat_map(|i| x(i, w2, "weight").data.clone()).collect::<Vec<_>>());
            for (lin, w) in [("fc", w1), ("proj", w2)] {
                let ws = &full[&format!("{t}.{lin}.weights_scaling_factor")];
                assert_eq!(ws.shape, vec![e, 1], "{lin}: per-expert factors (E, 1)");
                let per: Vec<f32> = (0..e).map(|i| f32s(x(i, w, "weight_scale"))[0]).collect();
                assert_eq!(f32s(ws), per);
                if lin == "fc" {
                    assert_eq!(per, (0..e).map(|i| f32s(x(i, w3, "weight_scale"))[0]).collect::<Vec<_>>(), "w1/w3 share a scale");
                }
                let act = &full[&format!("{t}.{lin}.activation_scaling_factor")];
                let max = (0..e).map(|i| f32s(x(i, w, "input_scale"))[0]).fold(0f32, f32::max);
                assert_eq!((act.shape.clone(), f32s(act)), (vec![1], vec![max]));
            }
            let mlp: BTreeSet<&str> = full.keys().filter(|k| k.starts_with(&format!("{t}."))).map(|k| k.as_str()).collect();
            assert_eq!(mlp.len(), 7, "{name}: router + 3 fc + 3 proj tensors: {mlp:?}");
        }
    }
}

/// NVFP4 (tp 2), INT4 AWQ and W4A8 AWQ (pp 2: hidden 128 is one group, dense cannot split)
/// and unquantized experts reassemble and verify; AWQ carries the unified export's per-expert
/// pre_quant_scale stacked (E, in); INT8 SmoothQuant experts are refused.
#[test]
fn moe_formats_split_and_verify() {
    for name in ["mixtral", "qwen3_moe"] {
        let Some(m) = family(name) else { return };
        let inter = if name == "mixtral" { 256 } else { 128 };
        let nv = check_splits_for(&m, "nvfp4", Some("NVFP4"), true);
        let t = "transformer.layers.0.mlp";
        let shape = |n: &str| (nv[n].dtype, nv[n].shape.clone());
        assert_eq!(shape(&format!("{t}.fc.weight")), (Dtype::U8, vec![4, 2 * inter, 64]));
        assert_eq!(shape(&format!("{t}.fc.weights_scaling_factor")), (Dtype::F8E4M3, vec![4, 2 * inter, 8]));
        assert_eq!(shape(&format!("{t}.proj.weights_scaling_factor_2")), (Dtype::F32, vec![4, 1]));
        check_splits_for(&m, "none", None, true);
        check_splits_for(&m, "w4a8_awq", Some("W4A8_AWQ"), false);
        let awq = check_splits_for(&m, "int4_awq", Some("W4A16_AWQ"), false);
        assert_eq!(awq[&format!("{t}.fc.weight")].shape, vec![4, inter, 128], "packed row pairs");
        assert_eq!(awq[&format!("{t}.fc.weights_scaling_factor")].shape, vec![4, 2 * inter, 1]);
        let uni_dir = scratch(&format!("{name}-int4-unified")).join("out");
        quantize(&args_for(&m, "int4_awq", &uni_dir)).unwrap();
        let uni = load(&uni_dir.join("model.safetensors"));
        let (block, [w1, _, w2]) = moe_names(name);
        for (lin, w, n) in [("fc", w1, 128), ("proj", w2, inter)] {
            let p = &awq[&format!("{t}.{lin}.prequant_scaling_factor")];
            assert_eq!(p.shape, vec![4, n]);
            let want: Vec<u8> =
                (0..4).flat_map(|i| uni[&format!("model.layers.0.{block}.experts.{i}.{w}.pre_quant_scale")].data.clone()).collect();
            assert_eq!(p.data, want, "{name} {lin}: the experts' pre_quant_scale stacked");
        }
        let err = export_for(&m, "int8_sq", 1, 1).unwrap_err();
        assert!(matches!(&err, Error::Unsupported(s) if s.contains("SmoothQuant")), "{err}");
    }
}

/// FP8 KV and tp=2 on Mixtral, `.qnemo` of Qwen3-MoE verify clean; broken copies are caught
/// (a missing expert factor, a tp=1 fc in a tp=2 rank, a missing router).
#[test]
fn moe_verify_and_qnemo() {
    let (Some(mix), Some(qw)) = (family("mixtral"), family("qwen3_moe")) else { return };
    let kv = scratch("moe-kv").join("out");
    quantize(&QuantizeArgs { export: "trtllm".into(), tp: 2, kv_cache: "fp8".into(), ..args_for(&mix, "fp8", &kv) }).unwrap();
    assert_eq!(findings(&kv), Vec::<String>::new());
    assert_eq!(config(&kv).get("mapping").unwrap().get("moe_tp_size").unwrap().as_usize(), Some(2));
    let qnemo = scratch("moe-qnemo").join("m.qnemo");
    quantize(&QuantizeArgs { export: "qnemo".into(), tp: 2, ..args_for(&qw, "nvfp4", &qnemo) }).unwrap();
    assert_eq!(findings(&qnemo), Vec::<String>::new());

    let one = export_for(&mix, "fp8", 1, 1).unwrap();
    let dir = scratch("moe-broken").join("out");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "rank0.safetensors", "rank1.safetensors"] {
        std::fs::copy(kv.join(f), dir.join(f)).unwrap();
    }
    let edit = |r: usize, change: &dyn Fn(&mut BTreeMap<String, T>)| {
        let mut t = rank(&dir, r);
        change(&mut t);
        let list: Vec<(&str, Dtype, &[usize], &[u8])> = t.iter().map(|(n, v)| (n.as_str(), v.dtype, v.shape.as_slice(), v.data.as_slice())).collect();
        rq_min::io::safetensors::write_file(&dir.join(format!("rank{r}.safetensors")), &list, &[]).unwrap();
    };
    edit(1, &|t| {
        t.remove("transformer.layers.1.mlp.fc.weights_scaling_factor").unwrap();
    });
    let full_fc = rank(&one, 0)["transformer.layers.0.mlp.fc.weight"].clone();
    edit(0, &|t| {
        t.insert("transformer.layers.0.mlp.fc.weight".into(), full_fc.clone());
        t.remove("transformer.layers.1.mlp.router.weight").unwrap();
    });
    let f = findings(&dir);
    let want = [
        "rank0: transformer.layers.0.mlp.fc.weight is F8_E4M3 [4, 512, 128], expected F8_E4M3 [4, 256, 128]",
        "rank0: transformer.layers.1.mlp.router.weight is missing",
        "rank1: transformer.layers.1.mlp.fc.weights_scaling_factor is missing",
    ];
    assert_eq!(f, want);
}
