//! The runtime's loading rules and hooks, on a tiny bf16 checkpoint written here: weight
//! conversion, the fallback folder, tied heads, the errors for missing / misshapen /
//! non-finite tensors and bad token ids, and what `Hooks` sees.

use rq_min::compute::Tensor;
use rq_min::model::{Hooks, LinearKind, Model, NoHooks};
use rq_min::numerics::{bf16_to_f32, f32_to_bf16};
use rq_min::io::safetensors::{write_file, Dtype};
use rq_min::Error;
use std::path::{Path, PathBuf};

const HIDDEN: usize = 8;
const INTERMEDIATE: usize = 16;
const VOCAB: usize = 10;
const LAYERS: usize = 2;

/// A fresh empty folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("rq-min-test-model-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(tied: bool) -> String {
    format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": {HIDDEN},
            "intermediate_size": {INTERMEDIATE}, "num_hidden_layers": {LAYERS}, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": {VOCAB}, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": {tied}, "torch_dtype": "bfloat16"}}"#
    )
}

/// Name, shape and f32 values (already bf16-representable) of every tensor of the model.
fn tensors(tied: bool) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut seed = 0u32;
    let mut t = |name: String, shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|i| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223 + i as u32);
                bf16_to_f32(f32_to_bf16((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5))
            })
            .collect();
        (name, shape, values)
    };
    let mut all =
        vec![t("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]), t("model.norm.weight".into(), vec![HIDDEN])];
    if !tied {
        all.push(t("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
    }
    let shapes = [
        ("input_layernorm", vec![HIDDEN]),
        ("post_attention_layernorm", vec![HIDDEN]),
        ("self_attn.q_proj", vec![HIDDEN, HIDDEN]),
        ("self_attn.k_proj", vec![HIDDEN / 2, HIDDEN]),
        ("self_attn.v_proj", vec![HIDDEN / 2, HIDDEN]),
        ("self_attn.o_proj", vec![HIDDEN, HIDDEN]),
        ("mlp.gate_proj", vec![INTERMEDIATE, HIDDEN]),
        ("mlp.up_proj", vec![INTERMEDIATE, HIDDEN]),
        ("mlp.down_proj", vec![HIDDEN, INTERMEDIATE]),
    ];
    for l in 0..LAYERS {
        for (module, shape) in &shapes {
            all.push(t(format!("model.layers.{l}.{module}.weight"), shape.clone()));
        }
    }
    all
}

/// Writes config.json and model.safetensors (bf16) holding `tensors` into `dir`.
fn write_model(dir: &Path, tied: bool, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    std::fs::write(dir.join("config.json"), config(tied)).unwrap();
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|&x| f32_to_bf16(x).to_le_bytes()).collect()).collect();
    let entries: Vec<(&str, Dtype, &[usize], &[u8])> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| (name.as_str(), Dtype::BF16, shape.as_slice(), b.as_slice()))
        .collect();
    write_file(&dir.join("model.safetensors"), &entries, &[]).unwrap();
}

fn values_of<'a>(tensors: &'a [(String, Vec<usize>, Vec<f32>)], name: &str) -> &'a [f32] {
    &tensors.iter().find(|(n, _, _)| n == name).unwrap().2
}

#[test]
fn loads_bf16_weights_and_runs() {
    let dir = TempDir::new("bf16");
    let all = tensors(false);
    write_model(&dir.0, false, &all);
    let model = Model::open(&dir.0, None).unwrap();
    let layer = model.load_layer(1).unwrap();
    assert_eq!(layer.index, 1);
    for kind in LinearKind::ALL {
        assert_eq!(&layer.weight(kind).to_host()[..], values_of(&all, &format!("model.layers.1.{}.weight", kind.module())));
    }
    let ids = [1, 9, 0, 4, 4];
    let mut hidden = model.embed(&ids).unwrap();
    assert_eq!(&hidden.to_host()[HIDDEN..2 * HIDDEN], &values_of(&all, "model.embed_tokens.weight")[9 * HIDDEN..10 * HIDDEN]);
    let rope = model.config.rope_table(ids.len());
    for l in 0..LAYERS {
        model.load_layer(l).unwrap().forward(&model.config, &rope, &mut hidden, ids.len(), &mut NoHooks);
    }
    let head = model.load_head().unwrap();
    let logits = head.logits(&hidden, ids.len()).into_host();
    assert_eq!(logits.len(), ids.len() * VOCAB);
    assert!(logits.iter().all(|v| v.is_finite()));
    let (nll, count) = head.nll(&hidden, &ids);
    assert_eq!(count, ids.len() - 1);
    assert!(nll.is_finite() && nll > 0.0);

    assert!(matches!(model.load_layer(LAYERS), Err(Error::Tensor { .. })));
    let err = model.embed(&[3, VOCAB as u32]).unwrap_err();
    assert!(matches!(&err, Error::Tensor { msg, .. } if msg.contains("token id 10")), "{err}");
}

#[test]
fn tied_head_is_the_embedding() {
    let dir = TempDir::new("tied");
    let all = tensors(true);
    write_model(&dir.0, true, &all);
    let model = Model::open(&dir.0, None).unwrap();
    let head = model.load_head().unwrap();
    let hidden = Tensor::from((0..2 * HIDDEN).map(|i| i as f32 * 0.1 - 0.7).collect::<Vec<f32>>());
    let normed = head.normed(&hidden, 2).into_host();
    let logits = head.logits(&hidden, 2).into_host();
    let embed = values_of(&all, "model.embed_tokens.weight");
    for t in 0..2 {
        for v in 0..VOCAB {
            let want: f32 = (0..HIDDEN).map(|d| normed[t * HIDDEN + d] * embed[v * HIDDEN + d]).sum();
            assert!((logits[t * VOCAB + v] - want).abs() < 1e-5);
        }
    }
}

#[test]
fn missing_tensors_come_from_the_fallback_folder() {
    let (main, fallback) = (TempDir::new("main"), TempDir::new("fallback"));
    let all = tensors(false);
    write_model(&fallback.0, false, &all);
    let without_embedding: Vec<_> = all.iter().filter(|(n, _, _)| !n.contains("embed_tokens")).cloned().collect();
    write_model(&main.0, false, &without_embedding);

    let alone = Model::open(&main.0, None).unwrap();
    let err = alone.embed(&[1]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Tensor { .. }) && msg.contains("model.embed_tokens.weight"), "{msg}");
    assert!(msg.contains(&main.0.display().to_string()), "{msg}");

    let with = Model::open(&main.0, Some(&fallback.0)).unwrap();
    assert_eq!(with.embed(&[2]).unwrap().to_host()[..], values_of(&all, "model.embed_tokens.weight")[2 * HIDDEN..3 * HIDDEN]);
}

#[test]
fn bad_tensors_are_rejected_with_their_name() {
    let target = "model.layers.0.mlp.up_proj.weight";
    // A NaN at index 5.
    let dir = TempDir::new("nan");
    let mut all = tensors(false);
    all.iter_mut().find(|(n, _, _)| n == target).unwrap().2[5] = f32::NAN;
    write_model(&dir.0, false, &all);
    let err = Model::open(&dir.0, None).unwrap().load_layer(0).err().unwrap();
    assert!(
        matches!(&err, Error::Tensor { name, msg } if name == target && msg.contains("NaN/Inf at index 5")),
        "{err}"
    );

    // The wrong shape.
    let dir = TempDir::new("shape");
    let mut all = tensors(false);
    all.iter_mut().find(|(n, _, _)| n == target).unwrap().1 = vec![HIDDEN, INTERMEDIATE];
    write_model(&dir.0, false, &all);
    let err = Model::open(&dir.0, None).unwrap().load_layer(0).err().unwrap();
    assert!(matches!(&err, Error::Tensor { name, msg } if name == target && msg.contains("expected [16, 8]")), "{err}");
}

/// Records every hook call; zeroes the input of q_proj to check that k and v do not see it.
#[derive(Default)]
struct Recorder {
    calls: Vec<(usize, LinearKind, usize, Vec<f32>)>,
    kv: Vec<(usize, usize, usize)>,
}

impl Hooks for Recorder {
    fn linear_input(&mut self, layer: usize, kind: LinearKind, x: &mut Tensor, cols: usize) {
        self.calls.push((layer, kind, cols, x.to_host().into_owned()));
        if kind == LinearKind::Q {
            x.map_host(|x| x.fill(0.0));
        }
    }
    fn kv(&mut self, layer: usize, k: &mut Tensor, v: &mut Tensor) {
        self.kv.push((layer, k.len(), v.len()));
    }
}

#[test]
fn hooks_see_every_linear_input_in_order() {
    let dir = TempDir::new("hooks");
    write_model(&dir.0, false, &tensors(false));
    let model = Model::open(&dir.0, None).unwrap();
    let cfg = &model.config;
    let seq = 3;
    let rope = cfg.rope_table(seq);
    let layer = model.load_layer(0).unwrap();
    let start = model.embed(&[1, 2, 3]).unwrap();

    let mut rec = Recorder::default();
    let mut hooked = start.clone();
    layer.forward(cfg, &rope, &mut hooked, seq, &mut rec);
    let kinds: Vec<LinearKind> = rec.calls.iter().map(|c| c.1).collect();
    assert_eq!(kinds, LinearKind::ALL);
    for (layer_index, kind, cols, x) in &rec.calls {
        assert_eq!(*layer_index, 0);
        assert_eq!(*cols, kind.shape(cfg)[1]);
        assert_eq!(x.len(), seq * cols);
    }
    // q, k and v each got the same normed input; zeroing q's copy did not reach k or v.
    assert_eq!(rec.calls[0].3, rec.calls[1].3);
    assert_eq!(rec.calls[1].3, rec.calls[2].3);
    assert_eq!(rec.calls[4].3, rec.calls[5].3);
    assert_eq!(rec.kv, vec![(0, seq * HIDDEN / 2, seq * HIDDEN / 2)]);

    // Zero queries make attention uniform: the output differs from the plain pass.
    let mut plain = start.clone();
    layer.forward(cfg, &rope, &mut plain, seq, &mut NoHooks);
    assert_ne!(plain, hooked);
}

#[test]
fn set_weight_replaces_a_linear() {
    let dir = TempDir::new("set");
    write_model(&dir.0, false, &tensors(false));
    let model = Model::open(&dir.0, None).unwrap();
    let cfg = &model.config;
    let mut layer = model.load_layer(0).unwrap();
    let rope = cfg.rope_table(2);
    // With o_proj and down_proj zero the layer adds nothing to the residual stream.
    layer.set_weight(LinearKind::O, vec![0.0; HIDDEN * HIDDEN]);
    layer.set_weight(LinearKind::Down, vec![0.0; HIDDEN * INTERMEDIATE]);
    assert!(layer.weight(LinearKind::Down).to_host().iter().all(|&w| w == 0.0));
    let start = model.embed(&[5, 6]).unwrap();
    let mut hidden = start.clone();
    layer.forward(cfg, &rope, &mut hidden, 2, &mut NoHooks);
    assert_eq!(hidden, start);
}

#[test]
fn nll_over_several_logit_blocks_matches_the_logits() {
    let dir = TempDir::new("nll");
    write_model(&dir.0, false, &tensors(false));
    let model = Model::open(&dir.0, None).unwrap();
    let head = model.load_head().unwrap();
    // Longer than one block of positions (512 at most).
    let ids: Vec<u32> = (0..1100u32).map(|i| (i * 7 + i / 3) % VOCAB as u32).collect();
    let hidden: Vec<f32> = (0..ids.len() * HIDDEN).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
    let hidden = Tensor::from(hidden);
    let (nll, count) = head.nll(&hidden, &ids);
    let logits = head.logits(&hidden, ids.len()).into_host();
    let direct: f64 = (0..ids.len() - 1)
        .map(|t| rq_min::compute::cpu::log_softmax_nll(&logits[t * VOCAB..][..VOCAB], ids[t + 1] as usize))
        .sum();
    assert_eq!(count, ids.len() - 1);
    assert!((nll - direct).abs() <= 1e-9 * direct, "{nll} vs {direct}");
    assert_eq!(head.nll(&hidden.rows(0..1, HIDDEN), &ids[..1]), (0.0, 0));
}
