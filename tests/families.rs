//! The runtime against HF transformers: tiny random Llama-family models whose hidden states
//! and logits transformers 5.17 computed in f32 (shared/reference/README.md, "families").
//! Every tensor must match within a max relative error `max|a-b| / max|b|` of 1e-4.

mod common;

use rq_min::model::config::ModelConfig;
use rq_min::io::json::Json;
use rq_min::model::{LinearKind, Model, NoHooks};
use rq_min::compute::cpu as ops;
use rq_min::io::safetensors::SafeTensors;
use rq_min::Error;
use std::path::{Path, PathBuf};

const TOLERANCE: f64 = 1e-4;

fn max_rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff = got.iter().zip(want).map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs()).fold(0.0, f64::max);
    let scale = want.iter().map(|b| f64::from(*b).abs()).fold(0.0, f64::max);
    diff / scale
}

/// Runs `input_ids` of `dir/reference_io.safetensors` through the model and compares every
/// hidden state and the logits. Returns the worst relative error.
fn check_family(dir: &Path) -> f64 {
    let model = Model::open(dir, None).unwrap();
    let cfg = &model.config;
    let reference = SafeTensors::open(&dir.join("reference_io.safetensors")).unwrap();
    let ids = reference.tensor("input_ids").unwrap();
    let [batch, seq] = ids.shape.try_into().unwrap();
    let ids: Vec<u32> = ids.to_i64().unwrap().into_iter().map(|i| u32::try_from(i).unwrap()).collect();
    let layers: Vec<_> = (0..cfg.num_hidden_layers).map(|i| model.load_layer(i).unwrap()).collect();
    let head = model.load_head().unwrap();
    let rope = cfg.rope_table(seq);
    let (h, vocab, n_layers) = (cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers);

    // got[name] = both sequences' values, concatenated like the reference's [batch, seq, ..].
    let mut got: Vec<(String, Vec<f32>)> = (0..=n_layers).map(|l| (format!("hidden_states.{l}"), Vec::new())).collect();
    got.push(("logits".to_string(), Vec::new()));
    for b in 0..batch {
        let ids = &ids[b * seq..(b + 1) * seq];
        let mut hidden = model.embed(ids).unwrap();
        got[0].1.extend_from_slice(&hidden.to_host());
        for (l, layer) in layers.iter().enumerate() {
            layer.forward(cfg, &rope, &mut hidden, seq, &mut NoHooks);
            // HF's last hidden state is the final-norm output, not the last layer's.
            if l + 1 < n_layers {
                got[l + 1].1.extend_from_slice(&hidden.to_host());
            }
        }
        got[n_layers].1.extend(head.normed(&hidden, seq).into_host());
        let logits = head.logits(&hidden, seq).into_host();
        assert_eq!(logits.len(), seq * vocab);

        // The chunked NLL agrees with the logits it is made of.
        let (nll, count) = head.nll(&hidden, ids);
        let direct: f64 =
            (0..seq - 1).map(|t| ops::log_softmax_nll(&logits[t * vocab..][..vocab], ids[t + 1] as usize)).sum();
        assert_eq!(count, seq - 1);
        assert!((nll - direct).abs() <= 1e-9 * direct.abs(), "nll {nll} vs {direct}");
        got[n_layers + 1].1.extend(logits);
    }

    let mut worst = 0f64;
    for (name, values) in &got {
        let want = reference.tensor(name).unwrap();
        assert_eq!(want.numel(), values.len(), "{name}");
        let err = max_rel_err(values, &want.to_f32().unwrap());
        println!("{:<40} {name:<18} max rel err {err:.2e}", dir.display());
        assert!(err <= TOLERANCE, "{}: {name} max relative error {err:.3e} > {TOLERANCE:e}", dir.display());
        worst = worst.max(err);
    }
    assert_eq!(h * seq * batch, got[0].1.len());
    worst
}

fn shared_family(name: &str) -> Option<PathBuf> {
    Some(common::shared_dir()?.join("reference/families").join(name))
}

#[test]
fn llama_matches_transformers() {
    check_family(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families-llama"));
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    if let Some(dir) = shared_family("llama3-rope-scaling") {
        check_family(&dir);
    }
}

#[test]
fn mistral_matches_transformers() {
    if let Some(dir) = shared_family("mistral") {
        check_family(&dir);
    }
}

#[test]
fn qwen2_matches_transformers() {
    if let Some(dir) = shared_family("qwen2") {
        check_family(&dir);
    }
}

#[test]
fn qwen3_matches_transformers() {
    if let Some(dir) = shared_family("qwen3") {
        check_family(&dir);
    }
}

#[test]
fn gemma_matches_transformers() {
    if let Some(dir) = shared_family("gemma") {
        check_family(&dir);
    }
}

#[test]
fn phi3_matches_transformers() {
    if let Some(dir) = shared_family("phi3") {
        check_family(&dir);
    }
}

#[test]
fn starcoder2_matches_transformers() {
    if let Some(dir) = shared_family("starcoder2") {
        check_family(&dir);
    }
}

#[test]
fn nemotron_matches_transformers() {
    if let Some(dir) = shared_family("nemotron") {
        check_family(&dir);
    }
}

#[test]
fn mixtral_matches_transformers() {
    if let Some(dir) = shared_family("mixtral") {
        check_family(&dir);
    }
}

#[test]
fn qwen3_moe_matches_transformers() {
    if let Some(dir) = shared_family("qwen3_moe") {
        check_family(&dir);
    }
}

/// Gemma2 (a copy in tests/fixtures, so a clone without ../shared checks the second set's
/// runtime features: four norms per layer, attention and final soft caps, a window on layer 0
/// only, query_pre_attn_scalar).
#[test]
fn gemma2_matches_transformers() {
    check_family(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families-gemma2"));
}

#[test]
fn gemma3_matches_transformers() {
    if let Some(dir) = shared_family("gemma3") {
        check_family(&dir);
    }
}

#[test]
fn granite_matches_transformers() {
    if let Some(dir) = shared_family("granite") {
        check_family(&dir);
    }
}

#[test]
fn olmo2_matches_transformers() {
    if let Some(dir) = shared_family("olmo2") {
        check_family(&dir);
    }
}

#[test]
fn exaone4_matches_transformers() {
    if let Some(dir) = shared_family("exaone4") {
        check_family(&dir);
    }
}

#[test]
fn qwen2_moe_matches_transformers() {
    if let Some(dir) = shared_family("qwen2_moe") {
        check_family(&dir);
    }
}

#[test]
fn phimoe_matches_transformers() {
    if let Some(dir) = shared_family("phimoe") {
        check_family(&dir);
    }
}

#[test]
fn gptj_matches_transformers() {
    if let Some(dir) = shared_family("gptj") {
        check_family(&dir);
    }
}

#[test]
fn falcon_matches_transformers() {
    if let Some(dir) = shared_family("falcon") {
        check_family(&dir);
    }
}

#[test]
fn falcon_mqa_matches_transformers() {
    if let Some(dir) = shared_family("falcon-mqa") {
        check_family(&dir);
    }
}

#[test]
fn bloom_matches_transformers() {
    if let Some(dir) = shared_family("bloom") {
        check_family(&dir);
    }
}

#[test]
fn mpt_matches_transformers() {
    if let Some(dir) = shared_family("mpt") {
        check_family(&dir);
    }
}

#[test]
fn family_fields_follow_the_architecture() {
    use rq_min::model::config::Activation;
    let with_arch = |arch: &str| {
        let mut raw = fixture_config();
        raw.set("architectures", Json::Arr(vec![Json::Str(arch.into())]));
        raw.set("hidden_act", Json::Null);
        ModelConfig::from_json(raw, Path::new("config.json")).unwrap()
    };
    let q2 = with_arch("Qwen2ForCausalLM");
    assert!(q2.qkv_bias && !q2.qk_norm && !q2.norm_offset && q2.embed_scale.is_none() && q2.act == Activation::Silu);
    let q3 = with_arch("Qwen3ForCausalLM");
    assert!(!q3.qkv_bias && q3.qk_norm && !q3.norm_offset);
    let g = with_arch("GemmaForCausalLM");
    assert!(g.norm_offset && g.act == Activation::GeluTanh && !g.qkv_bias && !g.qk_norm);
    assert_eq!(g.embed_scale, Some((128f64).sqrt() as f32));
    let l = with_arch("LlamaForCausalLM");
    assert!(!l.qkv_bias && !l.qk_norm && !l.norm_offset && l.embed_scale.is_none() && l.act == Activation::Silu);

    // MoE: Mixtral always renormalizes and has no dense layer; Qwen3-MoE's dense layers come
    // from mlp_only_layers and decoder_sparse_step, its expert count from either key.
    let mx = with_arch("MixtralForCausalLM").moe.unwrap();
    assert!(mx.norm_topk_prob && mx.sparse == [true, true] && (mx.num_experts, mx.top_k) == (8, 2));
    assert_eq!((mx.intermediate_size, mx.router(1).as_str()), (256, "model.layers.1.block_sparse_moe.gate"));
    assert_eq!(mx.expert_module(0, 3, LinearKind::Up), "model.layers.0.block_sparse_moe.experts.3.w3");
    // MixtralConfig's defaults: rms_norm_eps 1e-5, rope_theta 1e6.
    let mut raw = fixture_config();
    raw.set("architectures", Json::Arr(vec![Json::Str("MixtralForCausalLM".into())]));
    for key in ["rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta"] {
        raw.set(key, Json::Null);
    }
    let m = ModelConfig::from_json(raw, Path::new("c")).unwrap();
    assert_eq!((m.rms_norm_eps, m.rope.theta), (1e-5, 1e6));
    let mut raw = fixture_config();
    raw.set("architectures", Json::Arr(vec![Json::Str("Qwen3MoeForCausalLM".into())]));
    raw.set("num_hidden_layers", Json::Int(4));
    raw.set("num_experts", Json::Int(6));
    raw.set("num_experts_per_tok", Json::Int(2));
    raw.set("decoder_sparse_step", Json::Int(2));
    raw.set("mlp_only_layers", Json::Arr(vec![Json::Int(3)]));
    let q = ModelConfig::from_json(raw, Path::new("c")).unwrap();
    let qm = q.moe.as_ref().unwrap();
    assert!(q.qk_norm && !qm.norm_topk_prob && (qm.num_experts, qm.top_k, qm.intermediate_size) == (6, 2, 768));
    assert_eq!(qm.sparse, [false, true, false, false]);
    // A dense layer keeps the 7 Llama modules; a sparse one has 4 attention + 3 per expert.
    assert_eq!((q.layer_modules(0).len(), q.layer_modules(1).len()), (7, 4 + 3 * 6));
    assert_eq!(q.layer_modules(1)[4 + 3 * 5 + 2].path, "model.layers.1.mlp.experts.5.down_proj");
    let mut raw = fixture_config();
    raw.set("architectures", Json::Arr(vec![Json::Str("Qwen3MoeForCausalLM".into())]));
    raw.set("num_experts", Json::Int(2));
    raw.set("num_experts_per_tok", Json::Int(3));
    assert!(matches!(ModelConfig::from_json(raw, Path::new("c")), Err(Error::Config { .. })));

    // Qwen2's per-layer sliding window is not implemented; an unknown activation is unsupported.
    let mut raw = fixture_config();
    raw.set("architectures", Json::Arr(vec![Json::Str("Qwen2ForCausalLM".into())]));
    raw.set("use_sliding_window", Json::Bool(true));
    assert!(matches!(ModelConfig::from_json(raw, Path::new("c")), Err(Error::Unsupported(_))));
    let mut raw = fixture_config();
    raw.set("hidden_activation", Json::Str("relu".into()));
    let err = ModelConfig::from_json(raw, Path::new("c")).unwrap_err();
    assert!(matches!(&err, Error::Unsupported(m) if m.contains("hidden_activation")), "{err:?}");
}

#[test]
fn missing_qwen2_bias_is_a_tensor_error() {
    // The llama fixture's tensors under a Qwen2 config: q_proj.bias is required and absent.
    let tmp = std::env::temp_dir().join(format!("rq-min-families-nobias-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families-llama");
    std::fs::copy(fixture.join("model.safetensors"), tmp.join("model.safetensors")).unwrap();
    let mut raw = fixture_config();
    raw.set("architectures", Json::Arr(vec![Json::Str("Qwen2ForCausalLM".into())]));
    std::fs::write(tmp.join("config.json"), raw.to_pretty(4)).unwrap();
    let model = Model::open(&tmp, None).unwrap();
    let err = model.load_layer(0).err().expect("load_layer without q_proj.bias");
    assert!(err.to_string().contains("model.layers.0.self_attn.q_proj.bias"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn fixture_config() -> Json {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families-llama/config.json");
    Json::parse_file(&path).unwrap()
}

#[test]
fn unsupported_architecture_lists_the_supported_ones() {
    let mut raw = fixture_config();
    raw.set("architectures", Json::Arr(vec![Json::Str("GPT2LMHeadModel".into())]));
    let err = ModelConfig::from_json(raw, Path::new("gpt2/config.json")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    let families = ["Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Phi3", "Starcoder2", "Nemotron", "Mixtral", "Qwen3Moe"];
    assert!(
        msg.contains("GPT2LMHeadModel") && families.iter().all(|a| msg.contains(&format!("{a}ForCausalLM"))),
        "{msg}"
    );
}

#[test]
fn new_family_fields_and_refusals() {
    use rq_min::model::config::Activation;
    let Some(root) = common::shared_dir() else { return };
    let config = |name: &str| Json::parse_file(&root.join("reference/families").join(name).join("config.json")).unwrap();
    let parse = |raw: Json| ModelConfig::from_json(raw, Path::new("config.json"));

    let phi3 = parse(config("phi3")).unwrap();
    let names: Vec<&str> = phi3.modules.iter().map(|m| m.name).collect();
    assert_eq!(names, ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]);
    assert!(phi3.gated_mlp() && !phi3.layer_norm && phi3.rotary_dim == phi3.head_dim);
    let sc = parse(config("starcoder2")).unwrap();
    assert!(sc.layer_norm && !sc.norm_offset && sc.qkv_bias && sc.mlp_bias && !sc.gated_mlp());
    assert!(sc.act == Activation::GeluTanh && sc.rms_norm_eps == 1e-5);
    let nm = parse(config("nemotron")).unwrap();
    assert!(nm.layer_norm && nm.norm_offset && !nm.qkv_bias && !nm.mlp_bias && !nm.gated_mlp());
    assert_eq!((nm.act, nm.head_dim, nm.rotary_dim), (Activation::Relu2, 32, 16));

    // Phi3's longrope needs one factor per rotary frequency (here 16).
    let mut raw = config("phi3");
    raw.set(
        "rope_parameters",
        Json::parse(
            br#"{"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0],
                 "original_max_position_embeddings": 64}"#,
            "p",
        )
        .unwrap(),
    );
    let err = parse(raw).unwrap_err().to_string();
    assert!(err.contains("short_factor") && err.contains("16 positive numbers"), "{err}");
    // Partial rotary only where HF's apply_rotary_pos_emb handles it.
    let mut raw = fixture_config();
    raw.set("partial_rotary_factor", Json::Float(0.5));
    raw.set("rope_parameters", Json::Null);
    let err = ModelConfig::from_json(raw, Path::new("c")).unwrap_err();
    assert!(matches!(&err, Error::Unsupported(m) if m.contains("partial_rotary_factor")), "{err:?}");
}

#[test]
fn bad_dimensions_are_config_errors_naming_the_key() {
    let path = Path::new("bad/config.json");
    let with = |edit: &dyn Fn(&mut Json)| {
        let mut raw = fixture_config();
        edit(&mut raw);
        match ModelConfig::from_json(raw, path) {
            Err(Error::Config { file, msg }) => {
                assert_eq!(file, path);
                msg
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    };
    // hidden_size 128 with 3 heads and no head_dim to say otherwise.
    let msg = with(&|c| {
        c.set("num_attention_heads", Json::Int(3));
        c.set("num_key_value_heads", Json::Int(1));
        c.set("head_dim", Json::Null);
    });
    assert!(msg.contains("num_attention_heads = 3") && msg.contains("hidden_size = 128"), "{msg}");
    let msg = with(&|c| c.set("num_key_value_heads", Json::Int(3)));
    assert!(msg.contains("num_key_value_heads = 3"), "{msg}");
    let msg = with(&|c| c.set("hidden_size", Json::Int(0)));
    assert!(msg.contains("hidden_size"), "{msg}");
    let msg = with(&|c| c.set("vocab_size", Json::Str("512".into())));
    assert!(msg.contains("vocab_size"), "{msg}");
    let msg = with(&|c| {
        if let Json::Obj(m) = c {
            m.retain(|(k, _)| k != "intermediate_size");
        }
    });
    assert!(msg.contains("missing") && msg.contains("intermediate_size"), "{msg}");
}

#[test]
fn both_rope_spellings_parse() {
    // transformers 5: rope_parameters; 4.x: rope_theta + rope_scaling {type | rope_type}.
    let llama3 = r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}"#;
    let mut new = fixture_config();
    let mut params = Json::parse(llama3.as_bytes(), "params").unwrap();
    params.set("rope_theta", Json::Float(500000.0));
    new.set("rope_parameters", params);
    let mut old = fixture_config();
    if let Json::Obj(m) = &mut old {
        m.retain(|(k, _)| k != "rope_parameters");
    }
    old.set("rope_theta", Json::Float(500000.0));
    old.set("rope_scaling", Json::parse(llama3.replace("rope_type", "type").as_bytes(), "scaling").unwrap());
    let a = ModelConfig::from_json(new, Path::new("new")).unwrap();
    let b = ModelConfig::from_json(old, Path::new("old")).unwrap();
    assert_eq!(a.rope, b.rope);
    assert_eq!(a.rope.theta, 500000.0);

    let mut yarn = fixture_config();
    yarn.set(
        "rope_parameters",
        Json::parse(br#"{"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}"#, "y").unwrap(),
    );
    assert!(matches!(ModelConfig::from_json(yarn, Path::new("yarn")), Err(Error::Unsupported(_))));
}

/// Under bf16 arithmetic Olmo2's RMSNorm rounds once, after the weight (HF `Olmo2RMSNorm`:
/// `(weight * x).to(dtype)`), where Llama-style norms (Exaone4's) round the normalized rows
/// before the weight: Olmo2's final norm output is the f32 norm rounded to bf16, Exaone4's is not.
#[test]
fn olmo2_norms_round_once_after_the_weight() {
    use rq_min::compute::{Compute, Tensor};
    for (name, rounds_once) in [("olmo2", true), ("exaone4", false)] {
        let Some(dir) = shared_family(name) else { return };
        let mut model = Model::open(&dir, None).unwrap();
        model.compute = Compute::Bf16;
        let head = model.load_head().unwrap();
        let h = model.config.hidden_size;
        let x: Vec<f32> = (0..4 * h).map(|i| rq_min::numerics::round_bf16(((i * 37 % 101) as f32 - 50.0) * 0.173)).collect();
        let got = head.normed(&Tensor::from(x.clone()), 4).into_host();
        let mut want = vec![0f32; x.len()];
        let kind = model.config.norm_kind();
        Compute::F32.norm(kind, &x, &head.norm_weight().to_host(), None, &mut want);
        Compute::Bf16.round(&mut want);
        let same = got == want;
        assert_eq!(same, rounds_once, "{name}: bf16 final norm {} the f32 norm rounded once", if same { "equals" } else { "differs from" });
    }
}

/// Gemma3's two RoPE tables in both spellings: 4.x (`rope_theta` and `rope_scaling` for the
/// global layers, `rope_local_base_freq` for the sliding ones) and transformers 5
/// (`rope_parameters {full_attention, sliding_attention}`); the released 4B+ checkpoints scale the
/// global table linearly (`inv_freq / factor`), the local one never. Sliding layers (every layer
/// but each `sliding_window_pattern`-th) take the local table.
#[test]
fn gemma3_rope_tables_in_both_spellings() {
    use rq_min::compute::{Rope, RopeConfig, RopeScaling};
    let gemma3 = |f: &dyn Fn(&mut Json)| {
        let mut raw = fixture_config();
        raw.set("architectures", Json::Arr(vec![Json::Str("Gemma3ForCausalLM".into())]));
        raw.set("num_hidden_layers", Json::Int(6));
        raw.set("sliding_window_pattern", Json::Int(3));
        if let Json::Obj(m) = &mut raw {
            m.retain(|(k, _)| k != "rope_parameters" && k != "rope_theta" && k != "layer_types");
        }
        f(&mut raw);
        ModelConfig::from_json(raw, Path::new("config.json")).unwrap()
    };
    let old = gemma3(&|raw| {
        raw.set("rope_theta", Json::Float(1e6));
        raw.set("rope_local_base_freq", Json::Float(1e4));
        raw.set("rope_scaling", Json::parse(br#"{"rope_type": "linear", "factor": 8.0}"#, "s").unwrap());
    });
    let new = gemma3(&|raw| {
        let p = br#"{"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}"#;
        raw.set("rope_parameters", Json::parse(p, "p").unwrap());
    });
    let global = RopeConfig { theta: 1e6, scaling: RopeScaling::Linear { factor: 8.0 } };
    let local = RopeConfig { theta: 1e4, scaling: RopeScaling::Default };
    for cfg in [&old, &new] {
        assert_eq!((&cfg.rope, cfg.rope_local.as_ref()), (&global, Some(&local)));
        assert_eq!(cfg.sliding_layers.as_deref(), Some(&[true, true, false, true, true, false][..]));
    }
    // inv_freq of the linear table: the default one divided by 8 in f32 (1/(1e6^(i/d)) / 8).
    let d = old.head_dim;
    let scaled = Rope::inv_freq(&global, d);
    for (i, f) in scaled.iter().enumerate() {
        let want = (1.0 / 1e6f64.powf((2 * i) as f64 / d as f64)) / 8.0;
        assert!((f64::from(*f) - want).abs() <= 1e-6 * want, "inv_freq[{i}] {f} vs {want}");
    }
    let rope = old.rope_table(16);
    for (l, sliding) in [(0, true), (2, false)] {
        let table = old.layer_rope(l, &rope).unwrap();
        let want = if sliding { Rope::inv_freq(&local, d)[1] } else { scaled[1] };
        // Position 1's angle of frequency 1 is the frequency itself.
        let (cos, _) = table.tables();
        assert_eq!(cos[d / 2 + 1], (f64::from(want)).cos() as f32, "layer {l}");
    }
}

/// The second set's config fields from the reference configs, the config classes' defaults
/// where a key is left out, and refusals that name the key.
#[test]
fn second_set_fields_defaults_and_refusals() {
    use rq_min::model::config::{Routing, GEMMA2_NORMS, LLAMA_NORMS, POST_NORMS};
    let Some(root) = common::shared_dir() else { return };
    let config = |name: &str| Json::parse_file(&root.join("reference/families").join(name).join("config.json")).unwrap();
    let parse = |raw: Json| ModelConfig::from_json(raw, Path::new("config.json"));

    let g2 = parse(config("gemma2")).unwrap();
    assert_eq!((g2.attn_softcap, g2.final_softcap, g2.attn_scale), (Some(0.05), Some(0.5), (64f64).powf(-0.5) as f32));
    assert_eq!((g2.norms, g2.sliding_layers.as_deref(), g2.window(0), g2.window(1)), (&GEMMA2_NORMS, Some(&[true, false][..]), Some(8), None));
    // Gemma2Config's defaults: soft caps 50 / 30, query_pre_attn_scalar 256, every other layer windowed from 0.
    let mut raw = config("gemma2");
    for key in ["attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "layer_types"] {
        if let Json::Obj(m) = &mut raw {
            m.retain(|(k, _)| k != key);
        }
    }
    raw.set("num_hidden_layers", Json::Int(3));
    let d = parse(raw).unwrap();
    assert_eq!((d.attn_softcap, d.final_softcap, d.attn_scale), (Some(50.0), Some(30.0), 1.0 / 16.0));
    assert_eq!(d.sliding_layers.as_deref(), Some(&[true, false, true][..]));
    // Gemma3: no attention soft cap even when the key is set (Gemma3Attention passes none).
    let mut raw = config("gemma3");
    raw.set("attn_logit_softcapping", Json::Float(20.0));
    let g3 = parse(raw).unwrap();
    assert!(g3.attn_softcap.is_none() && g3.final_softcap.is_none() && g3.qk_norm && g3.norm_offset);

    let gr = parse(config("granite")).unwrap();
    assert_eq!((gr.embed_scale, gr.attn_scale, gr.residual_multiplier, gr.logits_scaling), (Some(12.0), 0.03125, Some(0.22), Some(8.0)));
    assert!(!gr.embed_scale_in_dtype && gr.norms == &LLAMA_NORMS);
    let ol = parse(config("olmo2")).unwrap();
    assert!(ol.norms == &POST_NORMS && ol.qk_norm && ol.qk_norm_whole && ol.norm_weight_f32);
    assert_eq!(ol.qk_norm_widths(), [4 * 32, 2 * 32]);
    // Exaone4: RoPE only on the sliding layers when there is a window; "LLLG" patterns.
    let ex = parse(config("exaone4")).unwrap();
    let rope = ex.rope_table(4);
    assert!(ex.layer_rope(0, &rope).is_some() && ex.layer_rope(1, &rope).is_none() && !ex.qk_norm_whole);
    let mut raw = config("exaone4");
    if let Json::Obj(m) = &mut raw {
        m.retain(|(k, _)| k != "layer_types");
    }
    raw.set("num_hidden_layers", Json::Int(5));
    raw.set("sliding_window_pattern", Json::Str("LLG".into()));
    assert_eq!(parse(raw).unwrap().sliding_layers.as_deref(), Some(&[true, true, false, true, true][..]));

    let q2 = parse(config("qwen2_moe")).unwrap();
    let m = q2.moe.as_ref().unwrap();
    assert_eq!((m.shared_expert, m.routing, m.norm_topk_prob, q2.qkv_bias), (Some(256), Routing::Softmax, false, true));
    assert_eq!(q2.linear_shape(0, LinearKind::Down), [128, 256]);
    assert_eq!(m.routers(1).iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["model.layers.1.mlp.gate", "model.layers.1.mlp.shared_expert_gate"]);
    let pm = parse(config("phimoe")).unwrap();
    assert_eq!((pm.moe.as_ref().unwrap().routing, pm.lm_head_bias, pm.layer_norm), (Routing::SparseMixer { jitter_eps: 0.01 }, true, true));

    // Refusals name the key and value.
    let refused = |name: &str, edit: &dyn Fn(&mut Json), needle: &str| {
        let mut raw = config(name);
        edit(&mut raw);
        let err = parse(raw).unwrap_err().to_string();
        assert!(err.contains(needle), "{name}: {err}");
    };
    refused("gemma2", &|r| r.set("layer_types", Json::Arr(vec![Json::Str("sliding_attention".into())])), "layer_types has 1 entries for 2 layers");
    refused("gemma2", &|r| r.set("layer_types", Json::Arr(vec![Json::Str("chunked_attention".into()), Json::Str("full_attention".into())])), "chunked_attention");
    refused("gemma2", &|r| r.set("query_pre_attn_scalar", Json::Float(-1.0)), "query_pre_attn_scalar");
    refused("gemma2", &|r| r.set("final_logit_softcapping", Json::Float(0.0)), "final_logit_softcapping");
    refused("granite", &|r| r.set("residual_multiplier", Json::Float(0.0)), "residual_multiplier");
    refused("exaone4", &|r| {
        if let Json::Obj(m) = r {
            m.retain(|(k, _)| k != "layer_types");
        }
        r.set("sliding_window_pattern", Json::Str("LXG".into()));
    }, "sliding_window_pattern");
    refused("phimoe", &|r| r.set("num_experts_per_tok", Json::Int(3)), "sparsemixer");
}

/// GPT-J's and Falcon's configs: their own key names (`n_embd`, `n_head`, `n_inner`,
/// `layer_norm_epsilon`), layouts, the row order of q/k (GPT-J) and of the fused qkv (Falcon)
/// against HF's formulas, and refusals of what transformers' classes do not run.
#[test]
fn parallel_families_fields_rows_and_refusals() {
    use rq_min::compute::Activation;
    use rq_min::model::config::{FALCON_NORMS, LLAMA_NORMS, SHARED_NORM};
    let Some(root) = common::shared_dir() else { return };
    let config = |name: &str| Json::parse_file(&root.join("reference/families").join(name).join("config.json")).unwrap();
    let parse = |raw: Json| ModelConfig::from_json(raw, Path::new("config.json"));
    let rows = |cfg: &ModelConfig, module: &str| {
        let m = cfg.layer_modules(0).into_iter().find(|m| m.path.ends_with(module)).unwrap();
        let r = m.rows.clone();
        // The two conversions undo each other.
        let v: Vec<f32> = (0..m.shape[0] * 3).map(|i| i as f32).collect();
        assert_eq!(m.to_runtime_rows(m.to_checkpoint_rows(v.clone(), 3), 3), v);
        r
    };

    let j = parse(config("gptj")).unwrap();
    assert_eq!((j.hidden_size, j.num_attention_heads, j.head_dim, j.rotary_dim, j.intermediate_size), (128, 4, 32, 16, 256));
    assert_eq!((j.act, j.rms_norm_eps, j.max_position_embeddings, j.names.layers), (Activation::GeluTanh, 1e-5, 256, "transformer.h"));
    assert!(j.parallel && j.rope_interleaved && j.lm_head_bias && j.mlp_bias && !j.qkv_bias && j.layer_norm);
    // rotate_every_two pairs (2i, 2i + 1); the runtime holds them at (i, 8 + i) of the 16 rotary dims.
    let q = rows(&j, "attn.q_proj").unwrap();
    let want = |h: usize, d: usize| h * 32 + if d < 8 { 2 * d } else if d < 16 { 2 * (d - 8) + 1 } else { d };
    assert!((0..4).all(|h| (0..32).all(|d| q[h * 32 + d] == want(h, d))));
    assert_eq!(rows(&j, "attn.k_proj"), Some(q));
    assert_eq!((rows(&j, "attn.v_proj"), rows(&j, "mlp.fc_in")), (None, None));
    let mut raw = config("gptj");
    if let Json::Obj(m) = &mut raw {
        m.retain(|(k, _)| k != "n_inner");
    }
    raw.set("n_head", Json::Int(1));
    let d = parse(raw.clone()).unwrap();
    assert_eq!(d.intermediate_size, 4 * 128);
    if let Json::Obj(m) = &mut raw {
        m.retain(|(k, _)| k != "rotary_dim");
    }
    assert_eq!(parse(raw).unwrap().rotary_dim, 64); // GPTJConfig's default, with one 128-wide head

    // Falcon, new architecture: two key/value heads, [q0 q1 k0 v0 q2 q3 k1 v1] per HF's view.
    let f = parse(config("falcon")).unwrap();
    assert_eq!((f.num_key_value_heads, f.norms, f.act, f.intermediate_size), (2, &FALCON_NORMS, Activation::Gelu, 256));
    assert!(f.parallel && f.qkv_grouped && !f.rope_interleaved && !f.tie_word_embeddings && !f.mlp_bias);
    let qkv = rows(&f, "query_key_value").unwrap();
    let heads: Vec<usize> = qkv.chunks(32).map(|c| c[0] / 32).collect();
    assert_eq!(heads, [0, 1, 4, 5, 2, 6, 3, 7]);
    assert!(qkv.chunks(32).all(|c| c.iter().enumerate().all(|(d, &r)| r == c[0] + d)));
    // Old architecture, multi-query: q, k, v stacked with one key/value head.
    let m = parse(config("falcon-mqa")).unwrap();
    assert_eq!((m.num_key_value_heads, m.norms, m.qkv_grouped, rows(&m, "query_key_value")), (1, &SHARED_NORM, false, None));
    // Old architecture, multi-head: [q, k, v] per head; sequential without parallel_attn.
    let mut raw = config("falcon-mqa");
    raw.set("multi_query", Json::Bool(false));
    raw.set("parallel_attn", Json::Bool(false));
    let o = parse(raw).unwrap();
    assert_eq!((o.num_key_value_heads, o.norms, o.parallel), (4, &LLAMA_NORMS, false));
    let heads: Vec<usize> = rows(&o, "query_key_value").unwrap().chunks(32).map(|c| c[0] / 32).collect();
    assert_eq!(heads, [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]);

    let refused = |name: &str, edit: &dyn Fn(&mut Json), needle: &str| {
        let mut raw = config(name);
        edit(&mut raw);
        let err = parse(raw).unwrap_err().to_string();
        assert!(err.contains(needle), "{name}: {err}");
    };
    refused("gptj", &|r| r.set("rotary_dim", Json::Null), "rotary_dim");
    refused("gptj", &|r| r.set("rotary_dim", Json::Int(48)), "rotary dims of head_dim = 32");
    refused("gptj", &|r| {
        if let Json::Obj(m) = r {
            m.retain(|(k, _)| k != "n_embd");
        }
    }, "missing required key \"n_embd\"");
    refused("falcon", &|r| r.set("alibi", Json::Bool(true)), "alibi");
    refused("falcon", &|r| r.set("parallel_attn", Json::Bool(false)), "parallel_attn = false");
    refused("falcon", &|r| r.set("num_ln_in_parallel_attn", Json::Int(3)), "num_ln_in_parallel_attn");
    refused("falcon", &|r| r.set("activation", Json::Str("swish".into())), "activation");
}

/// BLOOM's and MPT's configs: ALiBi (no RoPE on any layer), BLOOM's embedding LayerNorm and
/// per-head fused rows, MPT's own key names, bias-free norms and `alibi_bias_max`; refusals.
#[test]
fn alibi_families_fields_and_refusals() {
    use rq_min::compute::Activation;
    use rq_min::model::config::{Alibi, LLAMA_NORMS, MPT_NORMS};
    let Some(root) = common::shared_dir() else { return };
    let config = |name: &str| Json::parse_file(&root.join("reference/families").join(name).join("config.json")).unwrap();
    let parse = |raw: Json| ModelConfig::from_json(raw, Path::new("config.json"));
    let b = parse(config("bloom")).unwrap();
    assert_eq!((b.alibi, b.norms, b.act, b.intermediate_size), (Some(Alibi::Bloom), &LLAMA_NORMS, Activation::GeluTanh, 512));
    assert_eq!(b.names.embed_norm, Some("transformer.word_embeddings_layernorm"));
    assert!(b.qkv_grouped && b.qkv_bias && b.mlp_bias && b.norm_bias && !b.parallel);
    let rope = b.rope_table(4);
    assert!((0..2).all(|l| b.layer_rope(l, &rope).is_none()) && !b.attention(0, true).flash_bf16);
    let rows = b.layer_modules(0)[0].rows.clone().unwrap();
    let heads: Vec<usize> = rows.chunks(32).map(|c| c[0] / 32).collect();
    assert_eq!(heads, [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]);

    let m = parse(config("mpt")).unwrap();
    assert_eq!((m.alibi, m.norms, m.act, m.intermediate_size), (Some(Alibi::Mpt { bias_max: 8.0 }), &MPT_NORMS, Activation::Gelu, 512));
    assert_eq!((m.hidden_size, m.num_attention_heads, m.max_position_embeddings, m.names.layers), (128, 4, 256, "transformer.blocks"));
    assert!(!m.norm_bias && !m.qkv_bias && !m.mlp_bias && m.layer_norm && m.layer_modules(0)[0].rows.is_none());
    let mut raw = config("mpt");
    let mut attn = raw.get("attn_config").unwrap().clone();
    attn.set("alibi_bias_max", Json::Float(16.0));
    attn.set("softmax_scale", Json::Float(0.5));
    raw.set("attn_config", attn);
    let m = parse(raw).unwrap();
    assert_eq!((m.alibi, m.attn_scale), (Some(Alibi::Mpt { bias_max: 16.0 }), 0.5));

    let refused = |name: &str, edit: &dyn Fn(&mut Json), needle: &str| {
        let mut raw = config(name);
        edit(&mut raw);
        let err = parse(raw).unwrap_err().to_string();
        assert!(err.contains(needle), "{name}: {err}");
    };
    refused("bloom", &|r| r.set("apply_residual_connection_post_layernorm", Json::Bool(true)), "apply_residual_connection_post_layernorm");
    let attn_edit = |key: &'static str, v: Json| {
        move |r: &mut Json| {
            let mut a = r.get("attn_config").unwrap().clone();
            a.set(key, v.clone());
            r.set("attn_config", a);
        }
    };
    refused("mpt", &attn_edit("clip_qkv", Json::Float(8.0)), "clip_qkv");
    refused("mpt", &attn_edit("qk_ln", Json::Bool(true)), "qk_ln");
    refused("mpt", &attn_edit("alibi_bias_max", Json::Float(0.0)), "alibi_bias_max");
}

/// YaRN (transformers 5 `_compute_yarn_parameters`) against the formula in f64, in both config
/// spellings: Qwen's recommended `rope_scaling {type: yarn, factor: 4, original 32768}`,
/// GPT-OSS's `truncate: false` with explicit betas, DeepSeek's `mscale` / `mscale_all_dim`
/// attention factor; TensorRT-LLM refuses it by name.
#[test]
fn yarn_tables_follow_the_formula() {
    use rq_min::compute::{Rope, RopeScaling};
    let Some(root) = common::shared_dir() else { return };
    let mut raw = Json::parse_file(&root.join("reference/families/qwen2/config.json")).unwrap();
    let d = ModelConfig::from_json(raw.clone(), Path::new("c")).unwrap().head_dim;
    // (parameters, theta, factor, original, beta_fast, beta_slow, truncate, attention factor)
    type Case = (&'static str, f64, f64, usize, f64, f64, bool, f64);
    let mscale = |s: f64, m: f64| 0.1 * m * s.ln() + 1.0;
    let cases: [Case; 3] = [
        (r#"{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}"#, 1e6, 4.0, 32768, 32.0, 1.0, true, mscale(4.0, 1.0)),
        (
            r#"{"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "original_max_position_embeddings": 4096, "truncate": false}"#,
            150000.0, 32.0, 4096, 32.0, 1.0, false, mscale(32.0, 1.0),
        ),
        (
            r#"{"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 0, "mscale": 1.0,
                "mscale_all_dim": 0.707, "original_max_position_embeddings": 64}"#,
            1e4, 40.0, 64, 32.0, 1.0, true, mscale(40.0, 1.0) / mscale(40.0, 0.707),
        ),
    ];
    for (params, theta, factor, original, fast, slow, truncate, attention) in cases {
        if let Json::Obj(m) = &mut raw {
            m.retain(|(k, _)| k != "rope_parameters" && k != "rope_scaling");
        }
        let p = Json::parse(params.as_bytes(), "p").unwrap();
        if p.get("type").is_some() {
            raw.set("rope_theta", Json::Float(theta));
            raw.set("rope_scaling", p);
        } else {
            raw.set("rope_parameters", p);
        }
        let cfg = ModelConfig::from_json(raw.clone(), Path::new("c")).unwrap();
        assert!(
            matches!(&cfg.rope.scaling, RopeScaling::Yarn { attention_factor, truncate: t, .. } if (attention_factor - attention).abs() < 1e-12 && *t == truncate),
            "{params}: {:?}",
            cfg.rope.scaling
        );
        let corr = |r: f64| d as f64 * (original as f64 / (r * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
        let (mut low, mut high) = (corr(fast), corr(slow));
        if truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, high) = (low.max(0.0), high.min(d as f64 - 1.0));
        let inv = Rope::inv_freq(&cfg.rope, d);
        let rope = cfg.rope_table(8);
        let (cos, sin) = rope.tables();
        for i in 0..d / 2 {
            let pos = theta.powf((2 * i) as f64 / d as f64);
            let e = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let f = 1.0 / (factor * pos) * (1.0 - e) + 1.0 / pos * e;
            assert!((f64::from(inv[i]) - f).abs() <= 2e-6 * f, "{params}: inv_freq[{i}] {} vs {f}", inv[i]);
            let angle = 5.0 * f64::from(inv[i]); // position 5
            assert!((f64::from(cos[5 * d / 2 + i]) - attention * angle.cos()).abs() < 1e-6, "{params}: cos[{i}]");
            assert!((f64::from(sin[5 * d / 2 + i]) - attention * angle.sin()).abs() < 1e-6, "{params}: sin[{i}]");
        }
        // The ramp is really used: the first dims extrapolate, the last interpolate.
        assert!((f64::from(inv[0]) - 1.0).abs() < 1e-6 && (f64::from(inv[d / 2 - 1]) * factor * theta.powf((d - 2) as f64 / d as f64) - 1.0).abs() < 1e-5);
        let err = rq_min::export::trtllm::check_model(&cfg).unwrap_err().to_string();
        assert!(err.contains("TensorRT-LLM") && err.contains("yarn"), "{err}");
    }
    // Refusals name the key.
    raw.set("rope_parameters", Json::parse(br#"{"rope_type": "yarn", "factor": -2.0}"#, "p").unwrap());
    let err = ModelConfig::from_json(raw, Path::new("c")).unwrap_err().to_string();
    assert!(err.contains("factor = -2"), "{err}");
}

/// Phi-3.5's longrope (HF `_compute_longrope_parameters`, `longrope_frequency_update`) against
/// the formula in f64: `inv_freq = 1 / (ext · θ^(2i/d))` with the short factors up to
/// `original_max_position_embeddings` tokens and the long ones beyond, cos/sin times
/// `sqrt(1 + ln(max_position_embeddings / original) / ln(original))` (4.x spelling: the
/// original length top-level, `type`); an explicit `attention_factor` wins.
#[test]
fn longrope_tables_follow_the_formula() {
    use rq_min::compute::{Rope, RopeScaling};
    let Some(root) = common::shared_dir() else { return };
    let mut raw = Json::parse_file(&root.join("reference/families/phi3/config.json")).unwrap();
    let d = ModelConfig::from_json(raw.clone(), Path::new("c")).unwrap().head_dim;
    let short: Vec<f64> = (0..d / 2).map(|i| 1.0 + 0.05 * i as f64).collect();
    let long: Vec<f64> = (0..d / 2).map(|i| 2.0 + 0.5 * i as f64).collect();
    let list = |v: &[f64]| Json::Arr(v.iter().map(|&x| Json::Float(x)).collect());
    if let Json::Obj(m) = &mut raw {
        m.retain(|(k, _)| k != "rope_parameters");
    }
    raw.set("rope_theta", Json::Float(1e4));
    raw.set("max_position_embeddings", Json::Int(2048));
    raw.set("original_max_position_embeddings", Json::Int(16));
    let mut scaling = Json::parse(br#"{"type": "longrope"}"#, "s").unwrap();
    scaling.set("short_factor", list(&short));
    scaling.set("long_factor", list(&long));
    raw.set("rope_scaling", scaling.clone());
    let cfg = ModelConfig::from_json(raw.clone(), Path::new("c")).unwrap();
    let attention = (1.0 + (2048.0f64 / 16.0).ln() / 16f64.ln()).sqrt();
    assert!(matches!(&cfg.rope.scaling, RopeScaling::LongRope { attention_factor, .. } if (attention_factor - attention).abs() < 1e-12));
    for (seq, ext) in [(16, &short), (17, &long)] {
        let rope = cfg.rope_table(seq);
        let (cos, sin) = rope.tables();
        for (i, e) in ext.iter().enumerate() {
            let f = 1.0 / (e * 1e4f64.powf((2 * i) as f64 / d as f64));
            let angle = 3.0 * f; // position 3
            let (c, s) = (cos[3 * d / 2 + i], sin[3 * d / 2 + i]);
            assert!((f64::from(c) - attention * angle.cos()).abs() < 1e-5, "seq {seq} cos[{i}]");
            assert!((f64::from(s) - attention * angle.sin()).abs() < 1e-5, "seq {seq} sin[{i}]");
            assert!((f64::from(Rope::inv_freq_for(&cfg.rope, d, seq)[i]) - f).abs() <= 1e-6 * f, "seq {seq} inv_freq[{i}]");
        }
    }
    scaling.set("attention_factor", Json::Float(1.25));
    raw.set("rope_scaling", scaling);
    let cfg = ModelConfig::from_json(raw, Path::new("c")).unwrap();
    assert!(matches!(&cfg.rope.scaling, RopeScaling::LongRope { attention_factor, .. } if *attention_factor == 1.25));
    let err = rq_min::export::trtllm::check_model(&cfg).unwrap_err().to_string();
    assert!(err.contains("TensorRT-LLM") && err.contains("longrope"), "{err}");
}
