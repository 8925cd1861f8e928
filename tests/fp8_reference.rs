//! rq-min's FP8 export of rq-tiny against ModelOpt 0.47's (reference/modelopt-0.47/rq-tiny/fp8):
//! same files, tensor names, dtypes and shapes, identical weight bytes and scales, input scales
//! within 1e-3, the same configs, and the perplexities of reference/README.md.

mod common;

use rq_min::cli::{quantize, QuantizeArgs};
use rq_min::json::Json;
use rq_min::model::Model;
use rq_min::pipeline::{eval_windows, perplexity};
use rq_min::progress::Progress;
use rq_min::safetensors::{Checkpoint, Dtype};
use rq_min::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

struct Fixture {
    model: PathBuf,
    reference: PathBuf,
    out: PathBuf,
}

/// Quantizes rq-tiny once per test binary with the reference calibration ids.
fn fixture() -> Option<&'static Fixture> {
    static FIX: OnceLock<Option<Fixture>> = OnceLock::new();
    FIX.get_or_init(|| {
        let shared = common::shared_dir()?;
        let model = shared.join("models/rq-tiny");
        let reference = shared.join("reference/modelopt-0.47/rq-tiny");
        let out = std::env::temp_dir().join(format!("rq-min-fp8-test-{}", std::process::id()));
        quantize(&QuantizeArgs {
            model: model.clone(),
            out: out.clone(),
            qformat: "fp8".into(),
            calib_text: None,
            calib_ids: Some(reference.join("calib_ids.json")),
            calib_size: 64,
            calib_seq: 256,
            exclude: vec![],
            eval_text: None,
            eval_seq: 256,
            no_eval: true,
            force: true,
            device: "cpu".into(),
            quiet: true,
        })
        .expect("quantize rq-tiny fp8");
        Some(Fixture { model, reference, out })
    })
    .as_ref()
}

fn f32_scalar(ck: &Checkpoint, name: &str) -> f32 {
    let v = ck.tensor(name).unwrap();
    assert_eq!(v.dtype, Dtype::F32, "{name}");
    assert_eq!(v.shape, &[] as &[usize], "{name}");
    f32::from_le_bytes(v.data.try_into().unwrap())
}

#[test]
fn tensors_match_reference() {
    let Some(f) = fixture() else { return };
    let ours = Checkpoint::open(&f.out).unwrap();
    let theirs = Checkpoint::open(&f.reference.join("fp8")).unwrap();
    // The reference had the (bf16, unquantized) embedding removed; everything else must agree.
    let mut expected: Vec<&str> = theirs.names();
    expected.push("model.embed_tokens.weight");
    expected.sort();
    assert_eq!(ours.names(), expected);

    let (mut weights, mut scales, mut inputs, mut exact_inputs, mut worst) = (0, 0, 0, 0, 0f64);
    for name in theirs.names() {
        let (a, b) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
        assert_eq!((a.dtype, a.shape), (b.dtype, b.shape), "{name}");
        if name.ends_with(".input_scale") {
            // amax is a bf16 value (ModelOpt observes bf16 activations), so a scale is either
            // equal or at least one bf16 step (2^-8 relative) away. Calibrating with bf16
            // rounding and FlashAttention's bf16 probabilities (model::Compute::Bf16) makes
            // most equal; the rest are one step apart, because cuBLAS's f32 summation order
            // is not reproducible on the CPU.
            let (x, y) = (f32_scalar(&ours, name), f32_scalar(&theirs, name));
            let rel = ((x - y).abs() / y) as f64;
            worst = worst.max(rel);
            assert!(rel <= 1.0 / 128.0, "{name}: {x} vs reference {y} (rel {rel:.2e}) is more than one bf16 step");
            inputs += 1;
            exact_inputs += (x == y) as usize;
        } else {
            assert!(a.data == b.data, "{name}: bytes differ");
            weights += name.ends_with(".weight") as usize;
            scales += name.ends_with(".weight_scale") as usize;
        }
    }
    println!("identical: {weights} weights incl. norms, {scales} weight scales; input scales {exact_inputs}/{inputs} exact, worst rel {worst:.2e}");
    assert_eq!(scales, 56);
    assert_eq!(inputs, 56);
    assert!(exact_inputs >= 48, "only {exact_inputs} of 56 input scales equal the reference");
}

fn without_producer(mut j: Json) -> Json {
    if let Json::Obj(m) = &mut j {
        m.retain(|(k, _)| k != "producer");
    }
    j
}

#[test]
fn configs_match_reference() {
    let Some(f) = fixture() else { return };
    let read = |dir: &Path, file: &str| Json::parse_file(&dir.join(file)).unwrap();
    let (ours, theirs) = (read(&f.out, "hf_quant_config.json"), read(&f.reference.join("fp8"), "hf_quant_config.json"));
    assert_eq!(ours.get("quantization"), theirs.get("quantization"));
    assert_eq!(ours.get("producer").and_then(|p| p.get("name")).and_then(Json::as_str), Some("rq-min"));

    let (ours, theirs) = (read(&f.out, "config.json"), read(&f.reference.join("fp8"), "config.json"));
    let q = |j: &Json| without_producer(j.get("quantization_config").unwrap().clone());
    assert_eq!(q(&ours), q(&theirs));
    // Everything else in config.json is the input model's, unchanged.
    let strip = |j: &Json| {
        let mut j = j.clone();
        if let Json::Obj(m) = &mut j {
            m.retain(|(k, _)| k != "quantization_config");
        }
        j
    };
    assert_eq!(strip(&ours), strip(&theirs));
    for file in ["generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(f.out.join(file)).unwrap(), std::fs::read(f.model.join(file)).unwrap(), "{file}");
    }
}

/// f32 perplexity with the protocol of reference/README.md of a checkpoint.
fn ppl(model: &Path, base: Option<&Path>, tok_dir: &Path) -> f64 {
    let tok = Tokenizer::from_dir(tok_dir).unwrap();
    let ids = tok.encode(rq_min::cli::DEFAULT_EVAL_TEXT);
    assert_eq!(ids.len(), 48189, "eval tokens");
    let m = Model::open(model, base).unwrap();
    perplexity(&m, &eval_windows(&ids, 256), &Progress::new("eval", true)).unwrap().ppl
}

#[test]
fn perplexities_match_reference() {
    let Some(f) = fixture() else { return };
    let results = Json::parse_file(&f.reference.join("RESULTS.json")).unwrap();
    let fp8_f32 = results.get("fp8").unwrap().get("ppl_fakequant_f32_compute").unwrap().as_f64().unwrap();
    let base = ppl(&f.model, None, &f.model);
    let ours = ppl(&f.out, None, &f.model);
    let theirs = ppl(&f.reference.join("fp8"), Some(&f.model), &f.model);
    println!("ppl: unquantized {base:.3} (ref 95.716), rq-min fp8 {ours:.3}, ModelOpt fp8 export {theirs:.3} (ref f32 {fp8_f32:.3})");
    let within = |x: f64, y: f64, tol: f64| (x / y - 1.0).abs() <= tol;
    assert!(within(base, 95.716, 0.005), "unquantized ppl {base}");
    assert!(within(ours, fp8_f32, 0.005), "rq-min fp8 ppl {ours} vs {fp8_f32}");
    assert!(within(theirs, fp8_f32, 0.005), "ModelOpt export ppl {theirs} vs {fp8_f32}");
    assert!(within(ours, theirs, 0.005));
}
