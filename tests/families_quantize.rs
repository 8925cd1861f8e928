//! End to end on the Qwen2, Qwen3, Gemma, Phi3, Starcoder2 and Nemotron reference models
//! (shared/reference/families): quantize, then `inspect::check` finds nothing, the family's
//! extra tensors (q/k/v biases, q/k norms) are exported unchanged, and the newer families'
//! fused modules, LayerNorm folds and perplexity come out as ModelOpt's export would have them.

mod common;

use rq_min::cli::{quantize, QuantizeArgs};
use rq_min::inspect::check;
use rq_min::safetensors::Checkpoint;
use std::path::{Path, PathBuf};

/// A temp folder for this test, with a calibration ids file (4 sequences of 16 ids).
fn scratch(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("rq-min-families-quantize-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rows: Vec<String> = (0..4u32)
        .map(|r| {
            let ids: Vec<String> = (0..16u32).map(|t| ((r * 97 + t * 31 + 5) % 512).to_string()).collect();
            format!("[{}]", ids.join(", "))
        })
        .collect();
    let ids = dir.join("calib_ids.json");
    std::fs::write(&ids, format!("[{}]", rows.join(",\n"))).unwrap();
    (dir, ids)
}

/// Quantizes family `name` to `qformat`; checks the export is clean and that every tensor
/// whose name ends with one of `kept` is there with the original bytes.
fn quantize_family(name: &str, qformat: &str, kept: &[&str]) {
    let Some(shared) = common::shared_dir() else { return };
    let model = shared.join("reference/families").join(name);
    let (dir, ids) = scratch(&format!("{name}-{qformat}"));
    let out = dir.join("out");
    quantize(&QuantizeArgs {
        qformat: qformat.into(),
        calib_ids: Some(ids),
        calib_size: 4,
        calib_seq: 16,
        no_eval: true,
        force: true,
        quiet: true,
        ..QuantizeArgs::new(&model, &out)
    })
    .unwrap_or_else(|e| panic!("{name} {qformat}: {e}"));
    let report = check(&out).unwrap();
    assert!(report.findings.is_empty(), "{name} {qformat}: {:?}", report.findings);

    let (src, dst) = (Checkpoint::open(&model).unwrap(), Checkpoint::open(&out).unwrap());
    let mut seen = 0;
    for n in src.names() {
        if kept.iter().any(|k| n.ends_with(k)) {
            let (a, b) = (src.tensor(n).unwrap(), dst.tensor(n).unwrap_or_else(|e| panic!("{name}: {e}")));
            assert!(a.dtype == b.dtype && a.shape == b.shape && a.data == b.data, "{name}: {n} changed");
            seen += 1;
        }
    }
    assert_eq!(seen, 2 * kept.len(), "{name}: expected {kept:?} in both layers");
    std::fs::remove_dir_all(Path::new(&dir)).unwrap();
}

#[test]
fn qwen2_fp8_keeps_the_biases() {
    quantize_family("qwen2", "fp8", &["q_proj.bias", "k_proj.bias", "v_proj.bias"]);
}

#[test]
fn qwen3_fp8_keeps_the_qk_norms() {
    quantize_family("qwen3", "fp8", &["q_norm.weight", "k_norm.weight"]);
}

#[test]
fn gemma_fp8_and_int4_awq() {
    quantize_family("gemma", "fp8", &[]);
    quantize_family("gemma", "int4_awq", &[]);
}

#[test]
fn auto_quantize_refuses_the_new_families() {
    let Some(shared) = common::shared_dir() else { return };
    for (name, arch) in [
        ("qwen2", "Qwen2ForCausalLM"),
        ("qwen3", "Qwen3ForCausalLM"),
        ("gemma", "GemmaForCausalLM"),
        ("phi3", "Phi3ForCausalLM"),
        ("starcoder2", "Starcoder2ForCausalLM"),
        ("nemotron", "NemotronForCausalLM"),
    ] {
        let (dir, ids) = scratch(&format!("{name}-auto"));
        let err = quantize(&QuantizeArgs {
            qformat: "fp8,nvfp4".into(),
            auto_bits: Some(8.0),
            calib_ids: Some(ids),
            calib_size: 4,
            calib_seq: 16,
            score_size: 4,
            no_eval: true,
            force: true,
            quiet: true,
            ..QuantizeArgs::new(&shared.join("reference/families").join(name), &dir.join("out"))
        })
        .unwrap_err();
        assert!(matches!(err, rq_min::Error::Unsupported(_)), "{name}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains("auto-quantize supports Llama and Mistral so far") && msg.contains(arch), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Every format (and FP8 with an FP8 KV cache) on family `name`: the export is clean, its
/// fused/renamed modules carry the format's tensors under the family's names, `verify`'s weight
/// error stays small, and the export evaluates (perplexity through `pipeline`) close to the
/// original. Returns nothing; `extra` checks each export against the original.
fn every_format(name: &str, extra: &dyn Fn(&str, &Checkpoint, &Checkpoint)) {
    use rq_min::inspect::{weight_errors, MAX_WEIGHT_ERROR};
    use rq_min::model::Model;
    use rq_min::pipeline::perplexity;
    use rq_min::progress::Progress;
    let Some(shared) = common::shared_dir() else { return };
    let model = shared.join("reference/families").join(name);
    let windows: Vec<Vec<u32>> =
        (0..4u32).map(|r| (0..32u32).map(|t| (r * 193 + t * 57 + 11) % 512).collect()).collect();
    let quiet = Progress::new("eval", true);
    let ppl_orig = perplexity(&Model::open(&model, None).unwrap(), &windows, &quiet).unwrap().ppl;
    for (qformat, kv) in [
        ("fp8", "none"),
        ("fp8", "fp8"),
        ("int8_sq", "none"),
        ("int4_awq", "none"),
        ("w4a8_awq", "none"),
        ("nvfp4", "none"),
        ("nvfp4_awq", "none"),
    ] {
        let (dir, ids) = scratch(&format!("{name}-{qformat}-{kv}"));
        let out = dir.join("out");
        quantize(&QuantizeArgs {
            qformat: qformat.into(),
            kv_cache: kv.into(),
            calib_ids: Some(ids),
            calib_size: 4,
            calib_seq: 16,
            no_eval: true,
            force: true,
            quiet: true,
            ..QuantizeArgs::new(&model, &out)
        })
        .unwrap_or_else(|e| panic!("{name} {qformat}: {e}"));
        let report = check(&out).unwrap();
        assert!(report.findings.is_empty(), "{name} {qformat}: {:?}", report.findings);
        let (src, dst) = (Checkpoint::open(&model).unwrap(), Checkpoint::open(&out).unwrap());
        let cfg = rq_min::config::ModelConfig::from_dir(&model).unwrap();
        for l in 0..cfg.num_hidden_layers {
            for m in cfg.modules {
                let p = format!("model.layers.{l}.{}", m.name);
                for suffix in ["weight", "weight_scale"] {
                    assert!(dst.get(&format!("{p}.{suffix}")).is_some(), "{name} {qformat}: {p}.{suffix} missing");
                }
            }
            let kv_scales = ["k_scale", "v_scale"].map(|s| dst.get(&format!("model.layers.{l}.self_attn.{}_proj.{s}", &s[..1])));
            assert_eq!(kv_scales.iter().all(Option::is_some), kv == "fp8", "{name} {qformat} kv {kv}");
        }
        extra(qformat, &src, &dst);
        for e in weight_errors(&out, &model).unwrap() {
            assert!(e.relative < MAX_WEIGHT_ERROR, "{name} {qformat}: {} weight error {}", e.module, e.relative);
        }
        let ppl = perplexity(&Model::open(&out, None).unwrap(), &windows, &quiet).unwrap().ppl;
        println!("{name} {qformat} kv {kv}: ppl {ppl:.3} (original {ppl_orig:.3})");
        assert!(ppl.is_finite() && (ppl / ppl_orig).ln().abs() < 0.01, "{name} {qformat}: ppl {ppl} vs {ppl_orig}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn f32s(ck: &Checkpoint, name: &str) -> Vec<f32> {
    ck.tensor(name).unwrap_or_else(|e| panic!("{e}")).to_f32().unwrap()
}

fn scalar(ck: &Checkpoint, name: &str) -> f64 {
    f64::from(f32s(ck, name)[0])
}

fn absmax(v: &[f32]) -> f64 {
    v.iter().fold(0f64, |m, x| m.max(f64::from(x.abs())))
}

/// Asserts `got` is `want` within a relative 1e-6.
fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-6 * want.abs(), "{what}: {got} vs {want}");
}

/// The AWQ fold into a norm (spec/export-formats.md §2.7 point 2): per channel the exported
/// scale over the original (`1 + w` for LayerNorm1P) is s; a LayerNorm bias is scaled by the
/// same s. Returns whether the norm changed at all.
fn check_norm_fold(src: &Checkpoint, dst: &Checkpoint, norm: &str, one: f32, with_bias: bool) -> bool {
    let (w0, w1) = (f32s(src, &format!("{norm}.weight")), f32s(dst, &format!("{norm}.weight")));
    if with_bias {
        let (b0, b1) = (f32s(src, &format!("{norm}.bias")), f32s(dst, &format!("{norm}.bias")));
        for i in 0..w0.len() {
            let s = f64::from(w1[i] + one) / f64::from(w0[i] + one);
            let want = f64::from(b0[i]) * s;
            assert!((f64::from(b1[i]) - want).abs() <= 1e-5 * want.abs().max(1e-3), "{norm}.bias[{i}]: {} vs {want}", b1[i]);
        }
    }
    w0 != w1
}

#[test]
fn phi3_every_format_with_fused_modules() {
    every_format("phi3", &|qformat, src, dst| {
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            assert!(dst.get(&format!("{p}.self_attn.q_proj.weight")).is_none() && dst.get(&format!("{p}.mlp.up_proj.weight")).is_none());
            for fused in ["self_attn.qkv_proj", "mlp.gate_up_proj"] {
                let m = format!("{p}.{fused}");
                // One quantizer per fused module: per-tensor scales over the whole stacked weight.
                let amax = absmax(&f32s(src, &format!("{m}.weight")));
                match qformat {
                    "fp8" => close(scalar(dst, &format!("{m}.weight_scale")), amax / 448.0, &m),
                    "nvfp4" => close(scalar(dst, &format!("{m}.weight_scale_2")), amax / (6.0 * 448.0), &m),
                    _ => {}
                }
                let awq = qformat.contains("awq");
                assert_eq!(dst.get(&format!("{m}.pre_quant_scale")).is_some(), qformat == "int8_sq", "{qformat} {m}");
                let norm = if fused.starts_with("self_attn") { "input_layernorm" } else { "post_attention_layernorm" };
                assert_eq!(check_norm_fold(src, dst, &format!("{p}.{norm}"), 0.0, false), awq, "{qformat} {norm}");
            }
            let has_down_pqs = dst.get(&format!("{p}.mlp.down_proj.pre_quant_scale")).is_some();
            // Phi3MLP is not in ModelOpt's PQS_FUSE_MODULE_MAPPING: down_proj keeps its scale.
            assert_eq!(has_down_pqs, qformat.contains("awq") || qformat == "int8_sq", "{qformat}");
        }
    });
}

#[test]
fn starcoder2_every_format_with_layernorm_bias_folds() {
    every_format("starcoder2", &|qformat, src, dst| {
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            for b in ["self_attn.q_proj.bias", "self_attn.o_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"] {
                let n = format!("{p}.{b}");
                assert_eq!(src.tensor(&n).unwrap().data, dst.tensor(&n).unwrap().data, "{qformat}: {n} changed");
            }
            let awq = qformat.contains("awq");
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                assert_eq!(check_norm_fold(src, dst, &format!("{p}.{norm}"), 0.0, true), awq, "{qformat} {norm}");
            }
            assert_eq!(dst.get(&format!("{p}.mlp.c_fc.pre_quant_scale")).is_some(), qformat == "int8_sq");
            assert_eq!(dst.get(&format!("{p}.mlp.c_proj.pre_quant_scale")).is_some(), awq || qformat == "int8_sq");
        }
    });
}

#[test]
fn nemotron_every_format_with_layernorm1p_folds() {
    every_format("nemotron", &|qformat, src, dst| {
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            let awq = qformat.contains("awq");
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                assert_eq!(check_norm_fold(src, dst, &format!("{p}.{norm}"), 1.0, true), awq, "{qformat} {norm}");
            }
            // NemotronMLP is not in PQS_FUSE_MODULE_MAPPING: NVFP4-AWQ keeps down_proj's scale.
            assert_eq!(dst.get(&format!("{p}.mlp.down_proj.pre_quant_scale")).is_some(), awq || qformat == "int8_sq");
            if qformat == "nvfp4" {
                // q/k/v share one weight_scale_2: the max over the three weights (§7 step 2).
                let amax = ["q", "k", "v"].map(|x| absmax(&f32s(src, &format!("{p}.self_attn.{x}_proj.weight")))).into_iter().fold(0f64, f64::max);
                for x in ["q", "k", "v"] {
                    close(scalar(dst, &format!("{p}.self_attn.{x}_proj.weight_scale_2")), amax / (6.0 * 448.0), x);
                }
            }
        }
    });
}
