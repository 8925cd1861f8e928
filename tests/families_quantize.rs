//! End to end on the Qwen2, Qwen3 and Gemma reference models (shared/reference/families):
//! quantize, then `inspect::check` finds nothing and the family's extra tensors (q/k/v
//! biases, q/k norms) are exported unchanged.

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
    for (name, arch) in [("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"), ("gemma", "GemmaForCausalLM")] {
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
