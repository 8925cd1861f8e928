//! End to end on the Qwen2, Qwen3, Gemma, Phi3, Starcoder2, Nemotron, Mixtral and Qwen3-MoE
//! reference models (shared/reference/families): quantize, then `inspect::check` finds nothing,
//! the family's extra tensors (q/k/v biases, q/k norms, MoE routers) are exported unchanged, and
//! the newer families' fused modules, LayerNorm folds, MoE experts and perplexity come out as
//! ModelOpt's export would have them.

mod common;

use rq_min::cli::{quantize, QuantizeArgs};
use rq_min::export::verify::check;
use rq_min::model::LinearKind;
use rq_min::io::safetensors::Checkpoint;
use std::path::{Path, PathBuf};

/// The calibration ids of `scratch`: 4 sequences of 16 ids.
fn calib_rows() -> Vec<Vec<u32>> {
    (0..4u32).map(|r| (0..16u32).map(|t| (r * 97 + t * 31 + 5) % 512).collect()).collect()
}

/// A temp folder for this test, with a calibration ids file (`calib_rows`).
fn scratch(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("rq-min-families-quantize-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rows: Vec<String> = calib_rows()
        .iter()
        .map(|r| format!("[{}]", r.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")))
        .collect();
    let ids = dir.join("calib_ids.json");
    std::fs::write(&ids, format!("[{}]", rows.join(",\n"))).unwrap();
    (dir, ids)
}

/// Quantization of `model` into `out` with the 4x16 calibration ids file `ids`, no evaluation.
fn small_args(model: &Path, out: &Path, ids: PathBuf) -> QuantizeArgs {
    QuantizeArgs {
        calib_ids: Some(ids),
        calib_size: 4,
        calib_seq: Some(16),
        no_eval: true,
        force: true,
        quiet: true,
        ..QuantizeArgs::new(model, out)
    }
}

/// Quantizes family `name` to `qformat`; checks the export is clean and that every tensor
/// whose name ends with one of `kept` is there with the original bytes.
fn quantize_family(name: &str, qformat: &str, kept: &[&str]) {
    let Some(shared) = common::shared_dir() else { return };
    let model = shared.join("reference/families").join(name);
    let (dir, ids) = scratch(&format!("{name}-{qformat}"));
    let out = dir.join("out");
    quantize(&QuantizeArgs { qformat: qformat.into(), ..small_args(&model, &out, ids) })
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

/// Every format (and FP8 with an FP8 KV cache) on family `name`: the export is clean, its
/// fused/renamed modules (and MoE experts) carry the format's tensors under the family's names,
/// `verify`'s weight error stays small for every module, and the export evaluates (perplexity through `pipeline`) close to the
/// original. Returns nothing; `extra` checks each export against the original.
/// `noisy`: the second set's models, whose random weights put the perplexity near the
/// vocabulary size (Gemma2's final soft cap of 0.5 squeezes every logit into ±0.5): quantization
/// noise moves it by up to 1.5% there, either way.
fn every_format(name: &str, noisy: bool, extra: &dyn Fn(&str, &Checkpoint, &Checkpoint)) {
    use rq_min::export::verify::{weight_errors, MAX_WEIGHT_ERROR};
    use rq_min::model::Model;
    use rq_min::ptq::eval::perplexity;
    use rq_min::ptq::progress::Progress;
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
        quantize(&QuantizeArgs { qformat: qformat.into(), kv_cache: kv.into(), ..small_args(&model, &out, ids) })
            .unwrap_or_else(|e| panic!("{name} {qformat}: {e}"));
        let report = check(&out).unwrap();
        assert!(report.findings.is_empty(), "{name} {qformat}: {:?}", report.findings);
        let (src, dst) = (Checkpoint::open(&model).unwrap(), Checkpoint::open(&out).unwrap());
        let cfg = rq_min::model::config::ModelConfig::from_dir(&model).unwrap();
        for l in 0..cfg.num_hidden_layers {
            for m in cfg.layer_modules(l) {
                let p = m.path;
                for suffix in ["weight", "weight_scale"] {
                    assert!(dst.get(&format!("{p}.{suffix}")).is_some(), "{name} {qformat}: {p}.{suffix} missing");
                }
            }
            let kv_scales = ["k_scale", "v_scale"].map(|s| dst.get(&format!("{}.{}_proj.{s}", cfg.attn_prefix(l), &s[..1])));
            assert_eq!(kv_scales.iter().all(Option::is_some), kv == "fp8", "{name} {qformat} kv {kv}");
        }
        extra(qformat, &src, &dst);
        let errors = weight_errors(&out, &model).unwrap();
        let modules: usize = (0..cfg.num_hidden_layers).map(|l| cfg.layer_modules(l).len()).sum();
        assert_eq!(errors.len(), modules, "{name} {qformat}");
        for e in errors {
            assert!(e.relative < MAX_WEIGHT_ERROR, "{name} {qformat}: {} weight error {}", e.module, e.relative);
        }
        let ppl = perplexity(&Model::open(&out, None).unwrap(), &windows, &quiet).unwrap().ppl;
        println!("{name} {qformat} kv {kv}: ppl {ppl:.3} (original {ppl_orig:.3})");
        // Top-k routing is discontinuous (a quantization error can move a token to another
        // expert), so MoE models get a wider bound.
        let tolerance = if cfg.moe.is_some() { 0.05 } else if noisy { 0.025 } else { 0.01 };
        assert!(ppl.is_finite() && (ppl / ppl_orig).ln().abs() < tolerance, "{name} {qformat}: ppl {ppl} vs {ppl_orig}");
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
    every_format("phi3", false, &|qformat, src, dst| {
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
    every_format("starcoder2", false, &|qformat, src, dst| {
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
    every_format("nemotron", false, &|qformat, src, dst| {
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

/// GPT-J: one LayerNorm feeds q/k/v and fc_in (parallel branches), so the four share one AWQ
/// scale folded into `ln_1` (ModelOpt groups the linears fed the same tensor) and one input
/// amax; q_proj/k_proj keep the checkpoint's row order although the runtime rotates halves.
#[test]
fn gptj_every_format_with_parallel_branches() {
    every_format("gptj", false, &|qformat, src, dst| {
        for l in 0..2 {
            let p = format!("transformer.h.{l}");
            let awq = qformat.contains("awq");
            assert_eq!(check_norm_fold(src, dst, &format!("{p}.ln_1"), 0.0, true), awq, "{qformat} ln_1");
            let readers = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"].map(|m| format!("{p}.{m}"));
            let pqs = readers.clone().map(|m| dst.get(&format!("{m}.pre_quant_scale")).map(|t| t.data.to_vec()));
            assert!(pqs.iter().all(|x| x.is_some() == (qformat == "int8_sq")), "{qformat}: pre_quant_scale on {readers:?}");
            assert!(pqs.iter().all(|x| *x == pqs[0]), "{qformat}: q/k/v/fc_in scales differ");
            if qformat != "int4_awq" {
                let input = readers.clone().map(|m| scalar(dst, &format!("{m}.input_scale")));
                assert!(input.iter().all(|&x| x == input[0]), "{qformat}: input scales {input:?}");
            }
            for b in ["mlp.fc_in.bias", "mlp.fc_out.bias"] {
                let n = format!("{p}.{b}");
                assert_eq!(src.tensor(&n).unwrap().data, dst.tensor(&n).unwrap().data, "{qformat}: {n} changed");
            }
            assert_eq!(dst.get(&format!("{p}.mlp.fc_out.pre_quant_scale")).is_some(), awq || qformat == "int8_sq", "{qformat}");
        }
        assert!(same_tensor(src, dst, "lm_head.bias") && same_tensor(src, dst, "transformer.wte.weight"), "{qformat}");
    });
}

/// Falcon (new decoder architecture): `ln_attn` feeds the fused query_key_value and `ln_mlp`
/// feeds dense_h_to_4h, each folding its own AWQ scale; the fused module is one quantizer
/// (per-tensor scales over its rows, which keep the grouped [q.., k, v] order).
#[test]
fn falcon_every_format_with_grouped_qkv() {
    every_format("falcon", false, &|qformat, src, dst| {
        for l in 0..2 {
            let p = format!("transformer.h.{l}");
            let awq = qformat.contains("awq");
            for norm in ["ln_attn", "ln_mlp"] {
                assert_eq!(check_norm_fold(src, dst, &format!("{p}.{norm}"), 0.0, true), awq, "{qformat} {norm}");
            }
            let qkv = format!("{p}.self_attention.query_key_value");
            let amax = absmax(&f32s(src, &format!("{qkv}.weight")));
            match qformat {
                "fp8" => close(scalar(dst, &format!("{qkv}.weight_scale")), amax / 448.0, &qkv),
                "nvfp4" => close(scalar(dst, &format!("{qkv}.weight_scale_2")), amax / (6.0 * 448.0), &qkv),
                _ => {}
            }
            assert_eq!(dst.get(&format!("{qkv}.pre_quant_scale")).is_some(), qformat == "int8_sq", "{qformat}");
        }
    });
}

/// Falcon with multi-query attention (old architecture): one `input_layernorm` for both
/// branches, so query_key_value and dense_h_to_4h share its AWQ fold.
#[test]
fn falcon_mqa_every_format_with_one_norm() {
    every_format("falcon-mqa", false, &|qformat, src, dst| {
        for l in 0..2 {
            let p = format!("transformer.h.{l}");
            assert_eq!(check_norm_fold(src, dst, &format!("{p}.input_layernorm"), 0.0, true), qformat.contains("awq"), "{qformat}");
            let readers = ["self_attention.query_key_value", "mlp.dense_h_to_4h"].map(|m| format!("{p}.{m}"));
            if qformat != "int4_awq" {
                let input = readers.clone().map(|m| scalar(dst, &format!("{m}.input_scale")));
                assert_eq!(input[0], input[1], "{qformat}: {readers:?}");
            }
        }
    });
}

/// BLOOM: the per-head fused query_key_value folds into input_layernorm (weight and bias) and
/// dense_h_to_4h into post_attention_layernorm; the embedding LayerNorm, outside the layers,
/// keeps its bytes; biases are untouched.
#[test]
fn bloom_every_format_with_embedding_norm() {
    every_format("bloom", false, &|qformat, src, dst| {
        let awq = qformat.contains("awq");
        for l in 0..2 {
            let p = format!("transformer.h.{l}");
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                assert_eq!(check_norm_fold(src, dst, &format!("{p}.{norm}"), 0.0, true), awq, "{qformat} {norm}");
            }
            for b in ["self_attention.query_key_value.bias", "mlp.dense_4h_to_h.bias"] {
                assert!(same_tensor(src, dst, &format!("{p}.{b}")), "{qformat}: {b} changed");
            }
        }
        for t in ["transformer.word_embeddings_layernorm.weight", "transformer.word_embeddings_layernorm.bias"] {
            assert!(same_tensor(src, dst, t), "{qformat}: {t} changed");
        }
    });
}

/// MPT: LayerNorms without bias take the AWQ fold in their weight alone.
#[test]
fn mpt_every_format_with_bias_free_norms() {
    every_format("mpt", false, &|qformat, src, dst| {
        for l in 0..2 {
            let p = format!("transformer.blocks.{l}");
            for norm in ["norm_1", "norm_2"] {
                assert_eq!(check_norm_fold(src, dst, &format!("{p}.{norm}"), 0.0, false), qformat.contains("awq"), "{qformat} {norm}");
                assert!(dst.get(&format!("{p}.{norm}.bias")).is_none(), "{qformat}: {norm}.bias appeared");
            }
        }
    });
}

/// Max |x| over the calibration rows of every Gate and Down input of each layer, the experts'
/// inputs pooled (the default `expert_input`): what ModelOpt's shared expert input quantizers
/// observe.
#[derive(Default)]
struct PooledAmax {
    gate: Vec<f32>,
    down: Vec<f32>,
}

impl rq_min::model::Hooks for PooledAmax {
    // The experts only (not Qwen2-MoE's shared expert, a dense MLP with quantizers of its own).
    fn expert_input(&mut self, layer: usize, _expert: usize, kind: LinearKind, x: &mut rq_min::compute::Tensor, _cols: usize) {
        let slot = match kind {
            LinearKind::Gate => &mut self.gate[layer],
            LinearKind::Down => &mut self.down[layer],
            _ => return,
        };
        *slot = x.amax(*slot);
    }
}

/// The MoE export rules (src/quantize.rs `share_expert_scales`) on every format of MoE family
/// `name`, against numbers computed here from the original model and the calibration rows.
fn every_format_moe(name: &str) {
    use rq_min::io::json::Json;
    use rq_min::model::Model;
    use rq_min::quant::fnmatch;
    let Some(shared) = common::shared_dir() else { return };
    let model = Model::open(&shared.join("reference/families").join(name), None).unwrap();
    let cfg = &model.config;
    let moe = cfg.moe.clone().expect("an MoE config");
    let n = cfg.num_hidden_layers;
    let mut pooled = PooledAmax { gate: vec![0.0; n], down: vec![0.0; n] };
    let rope = cfg.rope_table(16);
    for ids in calib_rows() {
        let mut h = model.embed(&ids).unwrap();
        for l in 0..n {
            model.load_layer(l).unwrap().forward(cfg, &rope, &mut h, ids.len(), &mut pooled);
        }
    }
    every_format(name, false, &|qformat, src, dst| {
        let hf = Json::parse_file(&dst.dir().join("hf_quant_config.json")).unwrap();
        let list = hf.get("quantization").and_then(|q| q.get("exclude_modules")).and_then(Json::as_array).unwrap();
        let excludes: Vec<&str> = list.iter().map(|v| v.as_str().unwrap()).collect();
        let excluded = |m: &str| excludes.iter().any(|p| fnmatch(p, m));
        for l in 0..n {
            // The routers (Qwen2-MoE: also shared_expert_gate): original bytes, listed in exclude_modules.
            for (router, _) in moe.routers(l) {
                assert!(same_tensor(src, dst, &format!("{router}.weight")), "{qformat}: {router} changed");
                assert!(excluded(&router), "{qformat}: {router} not in exclude_modules {excludes:?}");
            }
            // Qwen2-MoE's shared expert: quantized, its gate and up sharing one scale that stays
            // a pre_quant_scale (the norm in front also feeds the router).
            if moe.shared_expert.is_some() {
                let shared = |k: &str| format!("model.layers.{l}.mlp.shared_expert.{k}");
                for k in ["gate_proj", "up_proj", "down_proj"] {
                    assert!(!excluded(&shared(k)) && dst.get(&format!("{}.weight_scale", shared(k))).is_some(), "{qformat}: {}", shared(k));
                }
                let pqs = |k: &str| dst.get(&format!("{}.pre_quant_scale", shared(k))).map(|t| t.data.to_vec());
                assert_eq!(pqs("gate_proj").is_some(), qformat == "int8_sq" || qformat.contains("awq"), "{qformat}: shared gate_proj");
                assert_eq!(pqs("gate_proj"), pqs("up_proj"), "{qformat}: the shared expert's gate and up scales differ");
            }
            // The norm before the block also feeds the router: never folded into. The one before
            // q/k/v takes their AWQ scale as in a dense layer.
            let norm = format!("model.layers.{l}.post_attention_layernorm.weight");
            assert_eq!(src.tensor(&norm).unwrap().data, dst.tensor(&norm).unwrap().data, "{qformat}: {norm}");
            let input_norm = format!("model.layers.{l}.input_layernorm");
            let one = if cfg.norm_offset { 1.0 } else { 0.0 };
            assert_eq!(check_norm_fold(src, dst, &input_norm, one, cfg.layer_norm), qformat.contains("awq"), "{qformat}: {input_norm}");

            let m = |e: usize, k: LinearKind| moe.expert_module(l, e, k);
            for e in 0..moe.num_experts {
                for k in [LinearKind::Gate, LinearKind::Up, LinearKind::Down] {
                    assert!(!excluded(&m(e, k)), "{qformat}: {} excluded", m(e, k));
                }
                // Gate and up of one expert: one per-tensor weight amax (on the original
                // weights, which only the AWQ / SmoothQuant formats rescale).
                let (g, u) = (m(e, LinearKind::Gate), m(e, LinearKind::Up));
                let wamax = absmax(&f32s(src, &format!("{g}.weight"))).max(absmax(&f32s(src, &format!("{u}.weight")))) as f32;
                let (suffix, want) = match qformat {
                    "fp8" => ("weight_scale", Some(wamax * (1.0f32 / 448.0))),
                    "nvfp4" => ("weight_scale_2", Some(wamax * (1.0f32 / 2688.0))),
                    "w4a8_awq" | "nvfp4_awq" => ("weight_scale_2", None),
                    _ => continue,
                };
                let (sg, su) = (scalar(dst, &format!("{g}.{suffix}")), scalar(dst, &format!("{u}.{suffix}")));
                assert_eq!(sg, su, "{qformat}: {g} vs {u}");
                if let Some(want) = want {
                    assert_eq!(sg, f64::from(want), "{qformat}: {g}");
                }
            }
            // One input scale for all experts of a block: gate/up and down each.
            for (kinds, amax) in [(&[LinearKind::Gate, LinearKind::Up][..], pooled.gate[l]), (&[LinearKind::Down][..], pooled.down[l])] {
                let names: Vec<String> = (0..moe.num_experts).flat_map(|e| kinds.iter().map(move |&k| m(e, k))).collect();
                if qformat != "int4_awq" {
                    let s: Vec<f64> = names.iter().map(|n| scalar(dst, &format!("{n}.input_scale"))).collect();
                    assert!(s.iter().all(|v| *v == s[0]), "{qformat}: layer {l} input scales differ: {s:?}");
                    if qformat == "fp8" {
                        assert_eq!(s[0], f64::from(amax * (1.0f32 / 448.0)), "{qformat}: layer {l} {kinds:?}");
                    }
                }
                // SmoothQuant / AWQ: one common pre_quant_scale across the experts, never folded.
                if qformat == "int8_sq" || qformat.contains("awq") {
                    let p: Vec<Vec<u8>> =
                        names.iter().map(|n| dst.tensor(&format!("{n}.pre_quant_scale")).unwrap().data.to_vec()).collect();
                    assert!(p.iter().all(|v| *v == p[0]), "{qformat}: layer {l} {kinds:?} pre_quant_scales differ");
                }
            }
        }
    });
}

#[test]
fn mixtral_every_format_with_shared_expert_scales() {
    every_format_moe("mixtral");
}

#[test]
fn qwen3_moe_every_format_with_shared_expert_scales() {
    every_format_moe("qwen3_moe");
}

#[test]
fn phimoe_every_format_with_sparsemixer_routing() {
    every_format_moe("phimoe");
}

#[test]
fn qwen2_moe_every_format_with_a_shared_expert() {
    every_format_moe("qwen2_moe");
}

/// TensorRT-LLM's MoE plugin has no W8A8 path: INT8 SmoothQuant experts are refused before any
/// calibration, and nothing is written.
#[test]
fn trtllm_export_refuses_int8_sq_experts() {
    let Some(shared) = common::shared_dir() else { return };
    for name in ["mixtral", "qwen3_moe"] {
        let (dir, ids) = scratch(&format!("{name}-trtllm"));
        let model = shared.join("reference/families").join(name);
        let err = quantize(&QuantizeArgs {
            qformat: "int8_sq".into(),
            export: "trtllm".into(),
            ..small_args(&model, &dir.join("out"), ids)
        })
        .unwrap_err();
        assert!(matches!(&err, rq_min::Error::Unsupported(m) if m.contains("INT8 SmoothQuant")), "{name}: {err:?}");
        assert!(!dir.join("out").exists(), "{name}: output written");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Whether the tensor `name` is byte-identical in both checkpoints.
fn same_tensor(src: &Checkpoint, dst: &Checkpoint, name: &str) -> bool {
    let (a, b) = (src.tensor(name).unwrap(), dst.tensor(name).unwrap_or_else(|e| panic!("{e}")));
    a.dtype == b.dtype && a.shape == b.shape && a.data == b.data
}

/// Gemma2 / Gemma3 (a norm on both sides of each branch): AWQ's shared scales of q/k/v and of
/// gate/up fold into the pre-norms with the `(1 + w)·s − 1` rule (spec/export-formats.md §2.7
/// point 2; ModelOpt's dummy forward finds the norm whose output the group reads), so those
/// linears carry no `pre_quant_scale`; the post-norms feed residual adds and never change.
fn pre_and_post_norms(qformat: &str, src: &Checkpoint, dst: &Checkpoint) {
    let awq = qformat.contains("awq");
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for norm in ["input_layernorm", "pre_feedforward_layernorm"] {
            assert_eq!(check_norm_fold(src, dst, &format!("{p}.{norm}"), 1.0, false), awq, "{qformat} {p}.{norm}");
        }
        for norm in ["post_attention_layernorm", "post_feedforward_layernorm"] {
            assert!(same_tensor(src, dst, &format!("{p}.{norm}.weight")), "{qformat}: {p}.{norm} changed");
        }
        for m in ["self_attn.q_proj", "mlp.gate_proj"] {
            let pqs = dst.get(&format!("{p}.{m}.pre_quant_scale")).is_some();
            assert_eq!(pqs, qformat == "int8_sq", "{qformat} {p}.{m}.pre_quant_scale");
        }
    }
}

/// Olmo2 / Exaone4 (norms only on the branch outputs): q/k/v read the residual stream itself,
/// so no norm can take their scale. SmoothQuant and AWQ scales stay `pre_quant_scale` tensors,
/// one mean scale shared by q, k and v and one by gate and up (§2.7 point 1), and every norm
/// and q/k norm is the original.
fn post_norms_only(qformat: &str, src: &Checkpoint, dst: &Checkpoint) {
    let smoothed = qformat == "int8_sq" || qformat.contains("awq");
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for norm in ["post_attention_layernorm", "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"] {
            assert!(same_tensor(src, dst, &format!("{p}.{norm}.weight")), "{qformat}: {p}.{norm} changed");
        }
        for group in [&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"][..], &["mlp.gate_proj", "mlp.up_proj"]] {
            let scales: Vec<Option<Vec<f32>>> =
                group.iter().map(|m| dst.get(&format!("{p}.{m}.pre_quant_scale")).map(|t| t.to_f32().unwrap())).collect();
            assert_eq!(scales[0].is_some(), smoothed, "{qformat} {p}.{}", group[0]);
            assert!(scales.iter().all(|s| s == &scales[0]), "{qformat} {p}: {group:?} do not share one scale");
        }
    }
}

#[test]
fn gemma2_every_format_with_pre_and_post_norms() {
    every_format("gemma2", true, &pre_and_post_norms);
}

#[test]
fn gemma3_every_format_with_pre_and_post_norms() {
    every_format("gemma3", true, &pre_and_post_norms);
}

#[test]
fn olmo2_every_format_keeps_scales_without_a_pre_norm() {
    every_format("olmo2", true, &post_norms_only);
}

#[test]
fn exaone4_every_format_keeps_scales_without_a_pre_norm() {
    every_format("exaone4", true, &post_norms_only);
}

#[test]
fn granite_every_format() {
    every_format("granite", true, &|qformat, src, dst| {
        // Llama's layout: AWQ folds into input_layernorm / post_attention_layernorm as for Llama.
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let name = format!("model.layers.0.{norm}");
            assert_eq!(check_norm_fold(src, dst, &name, 0.0, false), qformat.contains("awq"), "{qformat} {name}");
        }
    });
}

/// TensorRT-LLM's converter has no model of the newer families: refused before any work,
/// naming the engine and the architecture; compressed-tensors (vLLM loads these families by
/// their HF names) exports and verifies.
#[test]
fn newer_families_refuse_trtllm_and_export_compressed_tensors() {
    let Some(shared) = common::shared_dir() else { return };
    for (name, arch) in [("gemma2", "Gemma2ForCausalLM"), ("olmo2", "Olmo2ForCausalLM"), ("qwen2_moe", "Qwen2MoeForCausalLM"), ("phimoe", "PhimoeForCausalLM"),
        ("gptj", "GPTJForCausalLM"), ("falcon", "FalconForCausalLM"), ("bloom", "BloomForCausalLM"), ("mpt", "MptForCausalLM")] {
        let model = shared.join("reference/families").join(name);
        let (dir, ids) = scratch(&format!("{name}-engines"));
        let out = dir.join("trt");
        let err = quantize(&QuantizeArgs { qformat: "fp8".into(), export: "trtllm".into(), ..small_args(&model, &out, ids.clone()) })
            .unwrap_err()
            .to_string();
        assert!(err.contains("TensorRT-LLM") && err.contains(arch), "{name}: {err}");
        assert!(!out.exists(), "{name}: a refused export wrote {}", out.display());
        for qformat in ["fp8", "int4_awq"] {
            let out = dir.join(format!("ct-{qformat}"));
            quantize(&QuantizeArgs { qformat: qformat.into(), export: "compressed-tensors".into(), ..small_args(&model, &out, ids.clone()) })
                .unwrap_or_else(|e| panic!("{name} {qformat}: {e}"));
            let report = check(&out).unwrap();
            assert!(report.findings.is_empty(), "{name} {qformat} compressed-tensors: {:?}", report.findings);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
