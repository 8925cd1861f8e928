//! stories260K (hidden 64, intermediate 172): dims that do not divide NVFP4's block of 16 or
//! INT4's group of 128 give one clear error listing every such tensor with its shape and the
//! `--exclude` patterns that leave them unquantized, before any work, never wrong output;
//! excluding those layers works, and `--auto-exclude` writes the same export; formats without a
//! block constraint quantize it.

use rq_min::cli::{quantize, QuantizeArgs};
use rq_min::io::json::Json;
use rq_min::model::Model;
use rq_min::ptq::eval::{eval_windows, perplexity};
use rq_min::ptq::progress::Progress;
use rq_min::io::safetensors::{Checkpoint, Dtype};
use rq_min::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stories260K-hf");

/// A short story text for calibration and evaluation (no ../shared needed).
const STORY: &str = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. \
One day, she saw a big red ball in the park. She ran to the ball and kicked it high in the sky. \
Her friend Tom came to play too. They laughed and played all day long. When the sun went down, \
Lily and Tom went home. Lily's mom gave her a big hug and said, \"I love you, Lily.\" Lily smiled \
and went to sleep, dreaming of the big red ball. The next day, Lily and Tom went back to the park. \
They found a small dog with a blue collar. The dog was lost and sad. Lily and Tom helped the dog \
find its home. The dog's owner was very happy and thanked them. Lily and Tom felt proud and happy.";

fn run(qformat: &str, exclude: &[&str], name: &str) -> (rq_min::Result<()>, PathBuf) {
    run_with(qformat, exclude, false, name)
}

fn run_with(qformat: &str, exclude: &[&str], auto_exclude: bool, name: &str) -> (rq_min::Result<()>, PathBuf) {
    let dir = std::env::temp_dir().join(format!("rq-min-edge-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("calib.txt");
    std::fs::write(&text, STORY.repeat(4)).unwrap();
    let out = dir.join("out");
    let r = quantize(&QuantizeArgs {
        qformat: qformat.into(),
        calib_text: Some(text),
        calib_size: 8,
        calib_seq: Some(64),
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
        auto_exclude,
        eval_seq: 64,
        no_eval: true,
        force: true,
        quiet: true,
        ..QuantizeArgs::new(Path::new(MODEL), &out)
    });
    (r, out)
}

fn story_ppl(dir: &Path) -> f64 {
    let tok = Tokenizer::from_dir(Path::new(MODEL)).unwrap();
    let windows = eval_windows(&tok.encode(&STORY.repeat(3)), 64);
    perplexity(&Model::open(dir, None).unwrap(), &windows, &Progress::new("eval", true)).unwrap().ppl
}

#[test]
fn blocks_that_do_not_divide_are_refused_together() {
    let projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
    let every = projections.map(|p| format!("model.layers.*.{p}")).join(",");
    for (qformat, count, listed, patterns) in [
        ("nvfp4", 5, "model.layers.4.mlp.down_proj.weight [64, 172] as nvfp4: the input dim must be a multiple of 16", "model.layers.*.mlp.down_proj".to_string()),
        ("nvfp4_awq", 5, "model.layers.2.mlp.down_proj.weight [64, 172] as nvfp4_awq", "model.layers.*.mlp.down_proj".to_string()),
        ("int4_awq", 35, "model.layers.0.self_attn.q_proj.weight [64, 64] as int4_awq: the input dim must be a multiple of 128 and the output dim even", every.clone()),
        ("w4a8_awq", 35, "... and 23 more", every.clone()),
    ] {
        let (r, out) = run(qformat, &[], qformat);
        let msg = r.expect_err(qformat).to_string();
        assert!(msg.contains(&format!("{count} linear(s) cannot be stored")), "{qformat}: {msg}");
        assert!(msg.contains(listed), "{qformat}: {listed:?} not in {msg}");
        assert!(msg.contains(&format!("--exclude {patterns} (or --auto-exclude)")), "{qformat}: {msg}");
        assert!(!out.exists(), "{qformat}: output written");
    }
}

#[test]
fn auto_exclude_writes_what_the_patterns_write() {
    let (r, by_hand) = run("nvfp4", &["model.layers.*.mlp.down_proj"], "nvfp4-hand");
    r.unwrap();
    let (r, auto_dir) = run_with("nvfp4", &[], true, "nvfp4-auto");
    r.unwrap();
    let (hand, auto) = (Checkpoint::open(&by_hand).unwrap(), Checkpoint::open(&auto_dir).unwrap());
    assert_eq!(hand.names(), auto.names());
    for name in hand.names() {
        assert!(hand.tensor(name).unwrap().data == auto.tensor(name).unwrap().data, "{name} differs");
    }
    let hf = |d: &Path| std::fs::read_to_string(d.join("hf_quant_config.json")).unwrap();
    assert_eq!(hf(&by_hand), hf(&auto_dir));
}

#[test]
fn excluding_the_odd_layers_works() {
    let (r, out) = run("nvfp4", &["*down_proj"], "nvfp4-excl");
    r.unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    for l in 0..5 {
        let down = ck.tensor(&format!("model.layers.{l}.mlp.down_proj.weight")).unwrap();
        assert_eq!((down.dtype, down.shape), (Dtype::BF16, &[64usize, 172][..]));
        assert!(!ck.contains(&format!("model.layers.{l}.mlp.down_proj.weight_scale")));
        let up = ck.tensor(&format!("model.layers.{l}.mlp.up_proj.weight")).unwrap();
        assert_eq!((up.dtype, up.shape), (Dtype::U8, &[172usize, 32][..]));
    }
    let hf = Json::parse_file(&out.join("hf_quant_config.json")).unwrap();
    let excl: Vec<&str> = hf.get("quantization").unwrap().get("exclude_modules").unwrap().as_array().unwrap()
        .iter().filter_map(Json::as_str).collect();
    assert!(excl.contains(&"model.layers.4.mlp.down_proj") && excl.contains(&"lm_head"), "{excl:?}");
    let (base, q) = (story_ppl(Path::new(MODEL)), story_ppl(&out));
    println!("stories260K nvfp4 (down_proj excluded): ppl {base:.3} -> {q:.3}");
    assert!(q > base * 0.98 && q < base * 1.5, "{base} -> {q}");
}

#[test]
fn formats_without_blocks_quantize_odd_dims() {
    let base = story_ppl(Path::new(MODEL));
    for qformat in ["fp8", "int8_sq"] {
        let (r, out) = run(qformat, &[], qformat);
        r.unwrap();
        let q = story_ppl(&out);
        println!("stories260K {qformat}: ppl {base:.3} -> {q:.3}");
        assert!(q > base * 0.97 && q < base * 1.1, "{qformat}: {base} -> {q}");
    }
}
