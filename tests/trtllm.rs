//! `--export trtllm` (spec/export-formats.md §4) on tests/fixtures/families-llama (f32,
//! hidden 128, 4 heads, 2 kv heads, intermediate 256, 2 layers): the TP/PP shards reassemble
//! to the tp=1 tensors, FP8 tensors match the unified export, config.json keys, split errors.

use rq_min::cli::{quantize, QuantizeArgs};
use rq_min::error::Error;
use rq_min::json::Json;
use rq_min::quant::fp8;
use rq_min::safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    QuantizeArgs {
        qformat: qformat.into(),
        calib_ids: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/calib-ids-small.json")),
        calib_size: 8,
        calib_seq: 16,
        no_eval: true,
        force: true,
        quiet: true,
        ..QuantizeArgs::new(&model(), out)
    }
}

fn export(qformat: &str, tp: usize, pp: usize) -> rq_min::Result<PathBuf> {
    let out = scratch(qformat).join(format!("tp{tp}pp{pp}"));
    quantize(&QuantizeArgs { export: "trtllm".into(), tp, pp, ..args(qformat, &out) })?;
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

/// The tp=2 shards of `name` put back together as the tp=1 tensor.
fn reassemble(name: &str, a: &T, b: &T) -> T {
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
    cat0(&[a.clone(), b.clone()])
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
    assert_eq!(files, tp * pp + 1, "config.json + one file per rank");
}

/// tp=2 and pp=2 exports equal the tp=1 export once put back together.
fn check_splits(qformat: &str, algo: Option<&str>, tp2: bool) -> BTreeMap<String, T> {
    let one = export(qformat, 1, 1).unwrap();
    check_mapping(&one, 1, 1, algo);
    let full = rank(&one, 0);
    if tp2 {
        let two = export(qformat, 2, 1).unwrap();
        check_mapping(&two, 2, 1, algo);
        let (a, b) = (rank(&two, 0), rank(&two, 1));
        assert_eq!(a.keys().collect::<Vec<_>>(), full.keys().collect::<Vec<_>>());
        assert_eq!(b.keys().collect::<Vec<_>>(), full.keys().collect::<Vec<_>>());
        for (name, t) in &full {
            assert_eq!(&reassemble(name, &a[name], &b[name]), t, "{qformat}: {name} tp=2 shards do not reassemble");
        }
    }
    let pp = export(qformat, 1, 2).unwrap();
    check_mapping(&pp, 1, 2, algo);
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
    assert_eq!(merged, full, "{qformat}: pp=2 ranks differ from tp=1");
    full
}

fn is_usage(e: &Error) -> bool {
    matches!(e, Error::Usage(_))
}

#[test]
fn fp8_matches_unified_and_splits() {
    let full = check_splits("fp8", Some("FP8"), true);
    let uni_dir = scratch("fp8-unified").join("out");
    quantize(&args("fp8", &uni_dir)).unwrap();
    let uni = load(&uni_dir.join("model.safetensors"));
    let orig = load(&model().join("model.safetensors"));
    let f32s = |t: &T| -> Vec<f32> { t.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() };
    let mut renamed: BTreeMap<String, String> = BTreeMap::new();
    renamed.insert("transformer.vocab_embedding.weight".into(), "model.embed_tokens.weight".into());
    renamed.insert("transformer.ln_f.weight".into(), "model.norm.weight".into());
    renamed.insert("lm_head.weight".into(), "lm_head.weight".into());
    for l in 0..2 {
        let (t, h) = (format!("transformer.layers.{l}"), format!("model.layers.{l}"));
        renamed.insert(format!("{t}.input_layernorm.weight"), format!("{h}.input_layernorm.weight"));
        renamed.insert(format!("{t}.post_layernorm.weight"), format!("{h}.post_attention_layernorm.weight"));
        for (tm, hm) in [("attention.dense", "self_attn.o_proj"), ("mlp.fc", "mlp.gate_proj"), ("mlp.gate", "mlp.up_proj"), ("mlp.proj", "mlp.down_proj")] {
            for (ts, hs) in [("weight", "weight"), ("weights_scaling_factor", "weight_scale"), ("activation_scaling_factor", "input_scale")] {
                renamed.insert(format!("{t}.{tm}.{ts}"), format!("{h}.{hm}.{hs}"));
            }
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
        assert_eq!((w.dtype, w.shape.clone()), (Dtype::F8E4M3, vec![256, 128]));
        assert_eq!(w.data, codes);
    }
    for (name, t) in &full {
        if name.contains(".attention.qkv.") {
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
    let f32s = |t: &T| -> Vec<f32> { t.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() };
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
