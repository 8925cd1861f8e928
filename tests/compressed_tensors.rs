//! `--export compressed-tensors` (src/export_ct.rs) on tests/fixtures/families-llama (f32,
//! hidden 128, 4 heads / 2 kv heads, intermediate 256, 2 layers) and, when ../shared is there,
//! rq-tiny (bf16): tensor names / dtypes / shapes per scheme, the INT4 packing order against a
//! hand computation, dequantized weights equal to the unified export's (same run, quantized in
//! compressed-tensors mode), equal perplexity, a clean verify, and broken copies caught.

mod common;

use rq_min::cli::{quantize, quantize_unified_with, QuantizeArgs};
use rq_min::export::compressed_tensors::convert;
use rq_min::quant::int::{pack_int4, unpack_int4};
use rq_min::quant::nvfp4 as export_ct;
use rq_min::io::json::Json;
use rq_min::model::Model;
use rq_min::ptq::eval::perplexity;
use rq_min::ptq::progress::Progress;
use rq_min::model::weights::linear_weight;
use rq_min::io::safetensors::{write_file, Checkpoint, Dtype};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families-llama")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rq-min-ct-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Calibration: `rows` × `seq` ids from a fixed LCG (no tokenizer in the fixture).
fn ids(rows: usize, seq: usize, vocab: u32, seed: u64) -> Vec<Vec<u32>> {
    let mut x = seed;
    (0..rows)
        .map(|_| {
            (0..seq)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((x >> 33) as u32) % vocab
                })
                .collect()
        })
        .collect()
}

fn args(model: &Path, qformat: &str, out: &Path, calib: &Path) -> QuantizeArgs {
    QuantizeArgs {
        qformat: qformat.into(),
        calib_ids: Some(calib.to_path_buf()),
        calib_size: 4,
        calib_seq: Some(16),
        kv_cache: "fp8".into(),
        no_eval: true,
        force: true,
        quiet: true,
        ..QuantizeArgs::new(model, out)
    }
}

fn write_ids(dir: &Path, rows: &[Vec<u32>]) -> PathBuf {
    let p = dir.join("calib.json");
    let text: Vec<String> =
        rows.iter().map(|r| format!("[{}]", r.iter().map(u32::to_string).collect::<Vec<_>>().join(","))).collect();
    std::fs::write(&p, format!("[{}]", text.join(","))).unwrap();
    p
}

/// Name -> (dtype, shape) of a checkpoint folder.
fn layout(dir: &Path) -> BTreeMap<String, (Dtype, Vec<usize>)> {
    let ck = Checkpoint::open(dir).unwrap();
    ck.names().iter().map(|n| (n.to_string(), ck.get(n).map(|t| (t.dtype, t.shape.to_vec())).unwrap())).collect()
}

/// The tensors compressed-tensors expects for one linear (export_ct.rs table).
fn expected(format: &str, m: &str, [o, i]: [usize; 2], dtype: Dtype) -> Vec<(String, Dtype, Vec<usize>)> {
    let t = |s: &str, d: Dtype, sh: Vec<usize>| (format!("{m}.{s}"), d, sh);
    match format {
        "fp8" => vec![t("weight", Dtype::F8E4M3, vec![o, i]), t("weight_scale", Dtype::F32, vec![1]), t("input_scale", Dtype::F32, vec![1])],
        "int8_sq" => vec![t("weight", Dtype::I8, vec![o, i]), t("weight_scale", Dtype::F32, vec![o, 1]), t("input_scale", Dtype::F32, vec![1])],
        "int4_awq" => vec![
            t("weight_packed", Dtype::I32, vec![o, i / 8]),
            t("weight_scale", dtype, vec![o, i / 128]),
            t("weight_shape", Dtype::I64, vec![2]),
        ],
        _ => vec![
            t("weight_packed", Dtype::U8, vec![o, i / 2]),
            t("weight_scale", Dtype::F8E4M3, vec![o, i / 16]),
            t("weight_global_scale", Dtype::F32, vec![1]),
            t("input_global_scale", Dtype::F32, vec![1]),
        ],
    }
}

const FORMATS: [(&str, &str); 5] = [
    ("fp8", "float-quantized"),
    ("int8_sq", "int-quantized"),
    ("int4_awq", "pack-quantized"),
    ("nvfp4", "nvfp4-pack-quantized"),
    ("nvfp4_awq", "nvfp4-pack-quantized"),
];

/// Exports `format` both ways from one compressed-tensors-mode run and checks everything;
/// returns (unified, compressed-tensors) folders.
fn check_format(tag: &str, model: &Path, format: &str, ct_format: &str, calib: &Path, windows: &[Vec<u32>]) -> (PathBuf, PathBuf) {
    let dir = scratch(&format!("{tag}-{format}"));
    let (unified, ct) = (dir.join("unified"), dir.join("ct"));
    quantize_unified_with(&args(model, format, &unified, calib), true).unwrap();
    convert(&unified, &ct, false).unwrap();
    let orig = Model::open(model, None).unwrap();
    let cfg = &orig.config;
    let dtype = orig.dtype().unwrap();

    // Exactly the expected tensors for every decoder linear (all quantized: the defaults
    // exclude only lm_head and MoE routers), KV scales under self_attn, the rest as is.
    let got = layout(&ct);
    let mut want: BTreeMap<String, (Dtype, Vec<usize>)> = layout(model);
    let mut routers = vec![];
    for l in 0..cfg.num_hidden_layers {
        for m in cfg.layer_modules(l) {
            want.remove(&format!("{}.weight", m.path)).unwrap();
            for (n, d, s) in expected(format, &m.path, m.shape, dtype) {
                want.insert(n, (d, s));
            }
        }
        for kv in ["k_scale", "v_scale"] {
            want.insert(format!("model.layers.{l}.self_attn.{kv}"), (Dtype::F32, vec![1]));
        }
        routers.extend(cfg.moe_layer(l).map(|moe| format!(r#","{}""#, moe.router(l))));
    }
    assert_eq!(got, want, "{tag} {format}: tensor layout");
    assert!(!ct.join("hf_quant_config.json").exists());

    // config.json: one Linear group, the scheme's format, lm_head (and routers) ignored, FP8 KV scheme.
    let q = quantization_config(&ct);
    assert_eq!(q.get("quant_method").and_then(Json::as_str), Some("compressed-tensors"));
    assert_eq!(q.get("format").and_then(Json::as_str), Some(ct_format));
    assert_eq!(q.get("quantization_status").and_then(Json::as_str), Some("compressed"));
    assert_eq!(q.get("ignore").unwrap().to_compact(), format!(r#"["lm_head"{}]"#, routers.concat()));
    let g = q.get("config_groups").unwrap().get("group_0").unwrap();
    assert_eq!(g.get("targets").unwrap().to_compact(), r#"["Linear"]"#);
    assert_eq!(g.get("input_activations").unwrap().is_null(), format == "int4_awq");
    let kv = q.get("kv_cache_scheme").unwrap();
    assert_eq!((kv.get("type").and_then(Json::as_str), kv.get("num_bits").and_then(Json::as_i64)), (Some("float"), Some(8)));

    same_model(&format!("{tag} {format}"), model, &unified, &ct, windows);
    // Smoothing formats fold their scales into the norms: q/k/v's always, the MLP's unless the
    // layer is an MoE block (its norm also feeds the router: experts are unsmoothed).
    if ["int8_sq", "int4_awq", "nvfp4_awq"].contains(&format) {
        let (o, c) = (Checkpoint::open(model).unwrap(), Checkpoint::open(&ct).unwrap());
        for l in 0..cfg.num_hidden_layers {
            for (norm, folded) in [("input_layernorm", true), ("post_attention_layernorm", cfg.moe_layer(l).is_none())] {
                let n = format!("model.layers.{l}.{norm}.weight");
                assert_eq!(o.get(&n).unwrap().data != c.get(&n).unwrap().data, folded, "{tag} {format} {n}");
            }
        }
    }
    if format.starts_with("nvfp4") {
        // The codes and block scales are the unified export's bytes; the global scale is
        // compressed-tensors' 448·6/amax for amax = ws2·2688, within an ulp (f64 reference).
        let (uck, cck) = (Checkpoint::open(&unified).unwrap(), Checkpoint::open(&ct).unwrap());
        for m in (0..cfg.num_hidden_layers).flat_map(|l| cfg.layer_modules(l)) {
            let m = m.path;
            let (uw, cw) = (uck.get(&format!("{m}.weight")).unwrap(), cck.get(&format!("{m}.weight_packed")).unwrap());
            assert_eq!(uw.data, cw.data);
            let ws2 = uck.get(&format!("{m}.weight_scale_2")).unwrap().to_f32().unwrap()[0] as f64;
            let gs = cck.get(&format!("{m}.weight_global_scale")).unwrap().to_f32().unwrap()[0] as f64;
            let reference = 448.0 * 6.0 / (ws2 * 2688.0);
            assert!((gs / reference - 1.0).abs() <= 2.0f64.powi(-23), "{m}: global scale {gs} vs {reference}");
        }
    }
    (unified, ct)
}

fn quantization_config(dir: &Path) -> Json {
    Json::parse_file(&dir.join("config.json")).unwrap().get("quantization_config").unwrap().clone()
}

/// The unified export and the compressed-tensors checkpoint of one compressed-tensors-mode
/// run hold the same model: no pre_quant_scale, every decoder linear dequantizes to the same
/// bits (FP8 / INT8 / INT4: the same codes and scales; NVFP4 divides by the inverted global
/// scale as compressed-tensors does), every other layer tensor (norms, biases, routers) is the
/// same bytes, equal perplexity (rq-min's eval reads both layouts), and verify is clean, also
/// against the original weights.
fn same_model(what: &str, model: &Path, unified: &Path, ct: &Path, windows: &[Vec<u32>]) {
    let uni = layout(unified);
    assert!(!uni.keys().any(|n| n.ends_with("pre_quant_scale")), "{what}: a pre_quant_scale is left");
    let cfg = Model::open(model, None).unwrap().config;
    let (mu, mc) = (Model::open(unified, None).unwrap(), Model::open(ct, None).unwrap());
    let mut linears = vec![];
    for l in 0..cfg.num_hidden_layers {
        for m in cfg.layer_modules(l) {
            let (a, b) = (linear_weight(&mu, &m.path, m.shape).unwrap(), linear_weight(&mc, &m.path, m.shape).unwrap());
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&a) == bits(&b), "{what} {}: dequantized weights differ", m.path);
            linears.push(format!("{}.weight", m.path));
        }
    }
    let (uck, cck) = (Checkpoint::open(unified).unwrap(), Checkpoint::open(ct).unwrap());
    for (n, _) in layout(model) {
        if n.starts_with("model.layers.") && !linears.contains(&n) {
            assert_eq!(uck.get(&n).unwrap().data, cck.get(&n).unwrap().data, "{what} {n}");
        }
    }
    let p = Progress::new("eval", true);
    let (pu, pc) = (perplexity(&mu, windows, &p).unwrap().ppl, perplexity(&mc, windows, &p).unwrap().ppl);
    assert!(((pc - pu) / pu).abs() <= 1e-4, "{what}: perplexity {pc} vs unified {pu}");
    eprintln!("{what}: perplexity {pc:.4} (unified {pu:.4})");
    let report = rq_min::export::verify::check(ct).unwrap();
    assert!(report.findings.is_empty(), "{what}: {:?}", report.findings);
    rq_min::cli::verify(ct, Some(model)).unwrap();
}

#[test]
fn int4_packing_order() {
    // Hand-computed: codes 1,-1,0,7,-8,2,-3,4 are nibbles 9,7,8,15,0,10,5,12, lowest bits first.
    let q: Vec<i8> = vec![1, -1, 0, 7, -8, 2, -3, 4];
    assert_eq!(pack_int4(&q, 8), 0xC5A0_F879u32.to_le_bytes());
    // Every code at every position, against Σ (q_k + 8)·16^k in f64.
    let q: Vec<i8> = (0..16 * 8).map(|j| ((j * 5 + j / 8) % 16) as i8 - 8).collect();
    let packed = pack_int4(&q, 16);
    for (word, codes) in packed.chunks_exact(4).zip(q.chunks_exact(8)) {
        let reference: f64 = codes.iter().enumerate().map(|(k, &c)| (c as f64 + 8.0) * 16f64.powi(k as i32)).sum();
        assert_eq!(u32::from_le_bytes(word.try_into().unwrap()) as f64, reference);
    }
    assert_eq!(unpack_int4(&packed), q);
}

#[test]
fn global_scale_inverses() {
    // Compressed-tensors mode moves weight_scale_2 by a few ulps to a value whose inverse
    // reproduces ModelOpt's multiplier for every E4M3 block scale; inputs round-trip exactly.
    let mut exact_as_is = 0;
    for i in 0..200 {
        let ws2 = 1.0e-5f32 * (1.0 + i as f32 * 0.0731);
        let moved = export_ct::invertible_scale_2(ws2);
        assert!(((moved as f64 / ws2 as f64) - 1.0).abs() < 1e-5, "{ws2} -> {moved}");
        let gs = export_ct::nvfp4_global_scale(moved);
        assert!((gs as f64 * moved as f64 - 1.0).abs() < 1e-6);
        let same = (1u8..0x7F).filter(|&c| {
            let s = rq_min::numerics::e4m3_to_f32(c);
            s / gs == s * moved
        });
        assert_eq!(same.count(), 126, "ws2 {moved}: gs {gs}");
        exact_as_is += (moved == ws2) as usize;
        let s = export_ct::invertible_input_scale(ws2);
        assert!(((s as f64 / ws2 as f64) - 1.0).abs() < 1e-5);
        assert_eq!(1.0 / export_ct::input_global_scale(s), s);
    }
    eprintln!("{exact_as_is}/200 weight_scale_2 values had an exact inverse unmoved");
}

#[test]
fn families_llama_every_format() {
    let dir = scratch("calib");
    let calib = write_ids(&dir, &ids(4, 16, 512, 7));
    let windows = ids(2, 32, 512, 11);
    for (format, ct_format) in FORMATS {
        check_format("llama", &fixture(), format, ct_format, &calib, &windows);
    }
}

#[test]
fn cli_export_matches_converter_and_refusals() {
    let dir = scratch("cli");
    let calib = write_ids(&dir, &ids(4, 16, 512, 7));
    let (_, ct) = check_format("cli", &fixture(), "int4_awq", "pack-quantized", &calib, &ids(1, 16, 512, 3));
    let out = dir.join("cli-int4");
    quantize(&QuantizeArgs { export: "compressed-tensors".into(), ..args(&fixture(), "int4_awq", &out, &calib) }).unwrap();
    let (a, b) = (Checkpoint::open(&ct).unwrap(), Checkpoint::open(&out).unwrap());
    assert_eq!(a.names(), b.names());
    for n in a.names() {
        assert_eq!(a.get(n).unwrap().data, b.get(n).unwrap().data, "{n}");
    }

    // W4A8: refused, naming the TensorRT-LLM export.
    let e = quantize(&QuantizeArgs { export: "compressed-tensors".into(), ..args(&fixture(), "w4a8_awq", &dir.join("w4a8"), &calib) })
        .unwrap_err()
        .to_string();
    assert!(e.contains("--export trtllm"), "{e}");
    assert!(!dir.join("w4a8").exists());
    // A unified export made without compressed-tensors mode keeps o_proj's pre_quant_scale
    // (GQA): the converter refuses it and leaves nothing behind.
    let plain = dir.join("plain");
    quantize(&args(&fixture(), "int4_awq", &plain, &calib)).unwrap();
    let e = convert(&plain, &dir.join("refused"), false).unwrap_err().to_string();
    assert!(e.contains("pre_quant_scale"), "{e}");
    assert!(!dir.join("refused").exists());
    let e = quantize(&QuantizeArgs { export: "nope".into(), ..args(&fixture(), "fp8", &dir.join("x"), &calib) }).unwrap_err().to_string();
    assert!(e.contains("hf, trtllm, qnemo, compressed-tensors"), "{e}");
}

/// Rewrites `dir`'s single safetensors file through `edit`.
fn rewrite(dir: &Path, edit: impl Fn(&str, Dtype, Vec<usize>, Vec<u8>) -> Option<(Dtype, Vec<usize>, Vec<u8>)>) {
    let path = dir.join("model.safetensors");
    let st = rq_min::io::safetensors::SafeTensors::open(&path).unwrap();
    let kept: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .iter()
        .filter_map(|i| {
            let v = st.get(&i.name).unwrap();
            edit(&i.name, v.dtype, v.shape.to_vec(), v.data.to_vec()).map(|(d, s, b)| (i.name.clone(), d, s, b))
        })
        .collect();
    drop(st);
    let refs: Vec<(&str, Dtype, &[usize], &[u8])> = kept.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
    write_file(&path, &refs, &[("format".into(), "pt".into())]).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn verify_catches_broken_copies() {
    let dir = scratch("broken");
    let calib = write_ids(&dir, &ids(4, 16, 512, 7));
    let (unified, ct) = (dir.join("u"), dir.join("ct"));
    quantize_unified_with(&args(&fixture(), "int4_awq", &unified, &calib), true).unwrap();
    convert(&unified, &ct, false).unwrap();
    let m = "model.layers.1.self_attn.q_proj";

    let missing = dir.join("missing-scale");
    copy_dir(&ct, &missing);
    rewrite(&missing, |n, d, s, b| (n != format!("{m}.weight_scale")).then_some((d, s, b)));
    let f = rq_min::export::verify::check(&missing).unwrap().findings;
    assert!(f.iter().any(|x| x.starts_with(m) && x.contains("weight_scale missing")), "{f:?}");

    let short = dir.join("short-packed");
    copy_dir(&ct, &short);
    rewrite(&short, |n, d, s, b| {
        if n == format!("{m}.weight_packed") {
            let cols = s[1] - 1;
            let data: Vec<u8> = b.chunks_exact(s[1] * 4).flat_map(|r| r[..cols * 4].to_vec()).collect();
            Some((d, vec![s[0], cols], data))
        } else {
            Some((d, s, b))
        }
    });
    let f = rq_min::export::verify::check(&short).unwrap().findings;
    assert!(f.iter().any(|x| x.starts_with(m)), "{f:?}");
    assert!(rq_min::cli::verify(&short, None).is_err());

    let no_shape = dir.join("no-shape");
    copy_dir(&ct, &no_shape);
    rewrite(&no_shape, |n, d, s, b| (n != format!("{m}.weight_shape")).then_some((d, s, b)));
    let f = rq_min::export::verify::check(&no_shape).unwrap().findings;
    assert!(f.iter().any(|x| x.starts_with(m) && x.contains("weight_shape")), "{f:?}");
}

#[test]
fn rq_tiny_int4_and_nvfp4() {
    let Some(shared) = common::shared_dir() else { return };
    let model = shared.join("models/rq-tiny");
    let dir = scratch("tiny");
    let calib = write_ids(&dir, &ids(4, 16, 32000, 5));
    let tok = rq_min::tokenizer::Tokenizer::from_dir(&model).unwrap();
    let windows: Vec<Vec<u32>> =
        rq_min::ptq::eval::eval_windows(&tok.encode(rq_min::ptq::calib::DEFAULT_EVAL_TEXT), 64).into_iter().take(2).collect();
    for (format, ct_format) in [("int4_awq", "pack-quantized"), ("nvfp4", "nvfp4-pack-quantized"), ("int8_sq", "int-quantized")] {
        check_format("tiny", &model, format, ct_format, &calib, &windows);
    }
}

/// The other layouts (shared tiny family models, f32, 2 layers, GQA): Phi3's fused qkv_proj /
/// gate_up_proj, Starcoder2's LayerNorm + biases + gelu_tanh c_fc, Nemotron's LayerNorm1P +
/// relu², Mixtral / Qwen3-MoE experts and routers, in every format.
#[test]
fn other_families_every_format() {
    let Some(shared) = common::shared_dir() else { return };
    let dir = scratch("families-calib");
    let calib = write_ids(&dir, &ids(4, 16, 512, 7));
    let windows = ids(2, 32, 512, 11);
    for family in ["phi3", "starcoder2", "nemotron", "mixtral", "qwen3_moe"] {
        let model = shared.join("reference/families").join(family);
        for (format, ct_format) in FORMATS {
            check_format(family, &model, format, ct_format, &calib, &windows);
        }
    }
}

/// Writes a `--layer-formats` file.
fn layer_formats(dir: &Path, entries: &[(String, &str)]) -> PathBuf {
    let p = dir.join("layer-formats.json");
    let body: Vec<String> = entries.iter().map(|(m, f)| format!("\"{m}\": \"{f}\"")).collect();
    std::fs::write(&p, format!("{{{}}}", body.join(", "))).unwrap();
    p
}

#[test]
fn mixed_precision_config_groups() {
    let dir = scratch("mixed");
    let calib = write_ids(&dir, &ids(4, 16, 512, 7));
    let per_layer = [
        [("self_attn.q_proj", "fp8"), ("self_attn.k_proj", "fp8"), ("self_attn.v_proj", "fp8"), ("self_attn.o_proj", "int8_sq"),
         ("mlp.gate_proj", "int4_awq"), ("mlp.up_proj", "int4_awq"), ("mlp.down_proj", "nvfp4_awq")],
        [("self_attn.q_proj", "nvfp4"), ("self_attn.k_proj", "nvfp4"), ("self_attn.v_proj", "nvfp4"), ("self_attn.o_proj", "none"),
         ("mlp.gate_proj", "nvfp4_awq"), ("mlp.up_proj", "nvfp4_awq"), ("mlp.down_proj", "int4_awq")],
    ];
    let entries: Vec<(String, &str)> = per_layer
        .iter()
        .enumerate()
        .flat_map(|(l, ms)| ms.iter().map(move |(m, f)| (format!("model.layers.{l}.{m}"), *f)))
        .collect();
    let lf = layer_formats(&dir, &entries);
    let (unified, ct) = (dir.join("unified"), dir.join("ct"));
    let a = QuantizeArgs { layer_formats: Some(lf.clone()), ..args(&fixture(), "fp8", &unified, &calib) };
    quantize_unified_with(&a, true).unwrap();
    convert(&unified, &ct, false).unwrap();
    same_model("mixed", &fixture(), &unified, &ct, &ids(2, 32, 512, 11));

    // One group per scheme, in scheme order, targets = its exact module names, each with its
    // own format; the top-level format is mixed-precision; the unquantized o_proj is ignored.
    let q = quantization_config(&ct);
    assert_eq!(q.get("format").and_then(Json::as_str), Some("mixed-precision"));
    assert_eq!(q.get("ignore").unwrap().to_compact(), r#"["lm_head","model.layers.1.self_attn.o_proj"]"#);
    let groups = q.get("config_groups").unwrap().as_object().unwrap();
    let scheme_of = |f: &str| match f {
        "fp8" => "float-quantized",
        "int8_sq" => "int-quantized",
        "int4_awq" => "pack-quantized",
        _ => "nvfp4-pack-quantized",
    };
    let order = ["float-quantized", "int-quantized", "pack-quantized", "nvfp4-pack-quantized"];
    assert_eq!(groups.len(), order.len());
    for (i, ((name, g), format)) in groups.iter().zip(order).enumerate() {
        assert_eq!(name, &format!("group_{i}"));
        assert_eq!(g.get("format").and_then(Json::as_str), Some(format));
        let mut want: Vec<&str> = entries.iter().filter(|(_, f)| *f != "none" && scheme_of(f) == format).map(|(m, _)| m.as_str()).collect();
        want.sort();
        let mut got: Vec<&str> = g.get("targets").unwrap().as_array().unwrap().iter().filter_map(Json::as_str).collect();
        got.sort();
        assert_eq!(got, want, "{format}");
        assert_eq!(g.get("input_activations").unwrap().is_null(), format == "pack-quantized");
    }

    // The CLI path writes the same checkpoint.
    let out = dir.join("cli");
    quantize(&QuantizeArgs { export: "compressed-tensors".into(), out: out.clone(), ..a.clone() }).unwrap();
    let (x, y) = (Checkpoint::open(&ct).unwrap(), Checkpoint::open(&out).unwrap());
    assert_eq!(x.names(), y.names());
    assert!(x.names().iter().all(|n| x.get(n).unwrap().data == y.get(n).unwrap().data));

    // Refused: a w4a8 member (before calibrating), and q/k/v of one vLLM qkv_proj in two schemes.
    let mut bad = entries.clone();
    bad[6].1 = "w4a8_awq";
    let lf = layer_formats(&dir, &bad);
    let a2 = QuantizeArgs { layer_formats: Some(lf), export: "compressed-tensors".into(), out: dir.join("w4a8"), ..a.clone() };
    let e = quantize(&a2).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.mlp.down_proj") && e.contains("w4a8_awq"), "{e}");
    let mut split = entries.clone();
    split[1].1 = "int4_awq";
    let lf = layer_formats(&dir, &split);
    let a3 = QuantizeArgs { layer_formats: Some(lf), export: "compressed-tensors".into(), out: dir.join("split"), ..a };
    let e = quantize(&a3).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.self_attn.qkv_proj"), "{e}");
    assert!(!dir.join("split").exists() && !dir.join("w4a8").exists());
}

/// Nemotron's down_proj scale p goes into up_proj's rows as √p (relu²(√p·z) = p·relu²(z)):
/// with up_proj in FP8 (no smoothing of its own) and down_proj in INT4 AWQ, the standard run
/// keeps p as down_proj's pre_quant_scale and the compressed-tensors run has up_proj's rows
/// scaled instead (the AWQ search is the same in both modes). Per row, the least-squares
/// ratio of the two dequantized up_proj rows, squared, is p within FP8 noise.
#[test]
fn nemotron_relu2_fold_is_sqrt() {
    let Some(shared) = common::shared_dir() else { return };
    let model = shared.join("reference/families/nemotron");
    let dir = scratch("relu2");
    let calib = write_ids(&dir, &ids(4, 16, 512, 7));
    let lf = layer_formats(&dir, &[("model.layers.0.mlp.up_proj".into(), "fp8"), ("model.layers.0.mlp.down_proj".into(), "int4_awq")]);
    let (std_out, ct_out) = (dir.join("std"), dir.join("ct"));
    quantize_unified_with(&QuantizeArgs { layer_formats: Some(lf.clone()), ..args(&model, "fp8", &std_out, &calib) }, false).unwrap();
    quantize_unified_with(&QuantizeArgs { layer_formats: Some(lf), ..args(&model, "fp8", &ct_out, &calib) }, true).unwrap();
    let (ms, mc) = (Model::open(&std_out, None).unwrap(), Model::open(&ct_out, None).unwrap());
    let (up, down) = ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj");
    let p = Checkpoint::open(&std_out).unwrap().get(&format!("{down}.pre_quant_scale")).unwrap().to_f32().unwrap();
    assert!(Checkpoint::open(&ct_out).unwrap().get(&format!("{down}.pre_quant_scale")).is_none());
    let shape = [ms.config.intermediate_size, ms.config.hidden_size];
    let (ws, wc) = (linear_weight(&ms, up, shape).unwrap(), linear_weight(&mc, up, shape).unwrap());
    // ln(r²) against ln p: slope 1 for a √p fold (2 for p, 0 for none), fitted in f64.
    let (mut xs, mut ys) = (vec![], vec![]);
    for ((a, b), &p) in wc.chunks_exact(shape[1]).zip(ws.chunks_exact(shape[1])).zip(&p) {
        let (ab, bb) = a.iter().zip(b).fold((0f64, 0f64), |(s, t), (x, y)| (s + *x as f64 * *y as f64, t + (*y as f64).powi(2)));
        let r = ab / bb;
        assert!((r * r / p as f64 - 1.0).abs() < 0.05, "row ratio {r}, squared {} vs p {p}", r * r);
        xs.push((p as f64).ln());
        ys.push((r * r).ln());
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mx, my) = (mean(&xs), mean(&ys));
    let cov: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    let slope = cov / var;
    assert!((slope - 1.0).abs() < 0.1, "slope {slope} (ln p spread {})", (var / xs.len() as f64).sqrt());
}
