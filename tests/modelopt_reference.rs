//! rq-min's export of rq-tiny in every format against ModelOpt 0.47's
//! (../shared/reference/modelopt-0.47/rq-tiny/<format>), calibrated with the same token ids:
//! tensor names, dtypes and shapes; hf_quant_config.json and quantization_config; bytes of
//! the tensors that depend only on the weights; activation / KV scales; the dequantized weights;
//! and perplexity, of our export and of ModelOpt's through the same evaluator.

mod common;

use rq_min::cli::{quantize, QuantizeArgs}; use rq_min::ptq::calib::DEFAULT_EVAL_TEXT;
use rq_min::io::json::Json;
use rq_min::model::{LinearKind, Model};
use rq_min::ptq::eval::{eval_windows, module_name, perplexity};
use rq_min::ptq::progress::Progress;
use rq_min::model::weights::linear_weight;
use rq_min::io::safetensors::Checkpoint;
use rq_min::tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// transformers' f32 perplexity of the unquantized model (reference/README.md).
const PPL_F32: f64 = 95.716;

struct Paths {
    model: PathBuf,
    reference: PathBuf,
}

fn paths() -> Option<Paths> {
    let shared = common::shared_dir()?;
    Some(Paths {
        model: shared.join("models/rq-tiny"),
        reference: shared.join("reference/modelopt-0.47/rq-tiny"),
    })
}

fn quantize_to(p: &Paths, qformat: &str, kv: bool, out: &Path) {
    quantize(&QuantizeArgs {
        qformat: qformat.into(),
        calib_ids: Some(p.reference.join("calib_ids.json")),
        calib_size: 64,
        calib_seq: Some(256),
        kv_cache: if kv { "fp8".into() } else { "none".into() },
        no_eval: true,
        force: true,
        quiet: true,
        ..QuantizeArgs::new(&p.model, out)
    })
    .unwrap_or_else(|e| panic!("quantize {qformat}: {e}"));
}

/// f32 perplexity with the reference protocol.
fn ppl(model: &Path, base: Option<&Path>, tok_dir: &Path) -> f64 {
    let tok = Tokenizer::from_dir(tok_dir).unwrap();
    let ids = tok.encode(DEFAULT_EVAL_TEXT);
    assert_eq!(ids.len(), 48189, "eval tokens");
    let m = Model::open(model, base).unwrap();
    perplexity(&m, &eval_windows(&ids, 256), &Progress::new("eval", true)).unwrap().ppl
}

fn without(j: &Json, key: &str) -> Json {
    let mut j = j.clone();
    if let Json::Obj(m) = &mut j {
        m.retain(|(k, _)| k != key);
    }
    j
}

fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// How closely one format's export matches; `exact` lists the tensor suffixes that must be
/// byte-identical (those that depend only on the weights).
struct Expect {
    folder: &'static str,
    qformat: &'static str,
    kv: bool,
    exact: &'static [&'static str],
    /// Largest relative difference of an activation or KV scale.
    scale_rel: f64,
    /// Smallest fraction of identical bytes over all weight tensors.
    weight_bytes: f64,
    /// Largest relative Frobenius difference of the dequantized weights (all linears together).
    weight_rel: f64,
}

fn check(e: &Expect) {
    let Some(p) = paths() else { return };
    let out = std::env::temp_dir().join(format!("rq-min-ref-{}-{}", e.folder, std::process::id()));
    quantize_to(&p, e.qformat, e.kv, &out);
    let refdir = p.reference.join(e.folder);
    let (ours, theirs) = (Checkpoint::open(&out).unwrap(), Checkpoint::open(&refdir).unwrap());

    // Names, dtypes, shapes. The reference had the bf16 embedding removed (reference/README.md).
    let mut expected: Vec<&str> = theirs.names();
    expected.push("model.embed_tokens.weight");
    expected.sort();
    assert_eq!(ours.names(), expected, "{}: tensor names", e.folder);

    // Per suffix: identical bytes / total, and the worst relative difference of F32 scales.
    let mut stats: BTreeMap<String, (usize, usize, f64)> = BTreeMap::new();
    for name in theirs.names() {
        let (a, b) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
        assert_eq!((a.dtype, a.shape), (b.dtype, b.shape), "{}: {name}", e.folder);
        let suffix = name.rsplit('.').next().unwrap().to_string();
        if e.exact.contains(&suffix.as_str()) {
            assert!(a.data == b.data, "{}: {name} bytes differ", e.folder);
        }
        let st = stats.entry(suffix.clone()).or_default();
        st.0 += a.data.iter().zip(b.data).filter(|(x, y)| x == y).count();
        st.1 += a.data.len();
        if suffix.ends_with("input_scale") || suffix == "k_scale" || suffix == "v_scale" {
            for (x, y) in f32s(a.data).into_iter().zip(f32s(b.data)) {
                st.2 = st.2.max(((x - y).abs() / y) as f64);
            }
        }
    }
    for (suffix, (same, total, rel)) in &stats {
        println!("{}: {suffix:<16} identical bytes {:.4}  max scale rel diff {rel:.2e}", e.folder, *same as f64 / *total as f64);
    }
    for s in ["input_scale", "k_scale", "v_scale"] {
        if let Some(&(_, _, rel)) = stats.get(s) {
            assert!(rel <= e.scale_rel, "{}: {s} differs by {rel:.2e} > {:.2e}", e.folder, e.scale_rel);
        }
    }
    let (same, total, _) = stats["weight"];
    let frac = same as f64 / total as f64;
    assert!(frac >= e.weight_bytes, "{}: only {frac:.4} of weight bytes identical", e.folder);

    // The configs: identical but for the producer.
    let read = |dir: &Path, f: &str| Json::parse_file(&dir.join(f)).unwrap();
    assert_eq!(
        read(&out, "hf_quant_config.json").get("quantization"),
        read(&refdir, "hf_quant_config.json").get("quantization"),
        "{}: hf_quant_config.json",
        e.folder
    );
    let q = |j: Json| without(j.get("quantization_config").unwrap(), "producer");
    assert_eq!(q(read(&out, "config.json")), q(read(&refdir, "config.json")), "{}: quantization_config", e.folder);
    assert_eq!(without(&read(&out, "config.json"), "quantization_config"), read(&p.model, "config.json"));

    // Dequantized weights against ModelOpt's.
    let (mo, mr) = (Model::open(&out, None).unwrap(), Model::open(&refdir, Some(&p.model)).unwrap());
    let (mut worst, mut diff_sq, mut norm_sq) = (0f64, 0f64, 0f64);
    for l in 0..mo.config.num_hidden_layers {
        for k in LinearKind::ALL {
            let m = module_name(l, k);
            let (a, b) = (linear_weight(&mo, &m, k.shape(&mo.config)).unwrap(), linear_weight(&mr, &m, k.shape(&mr.config)).unwrap());
            let diff: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
            worst = worst.max((diff / norm).sqrt());
            (diff_sq, norm_sq) = (diff_sq + diff, norm_sq + norm);
        }
    }
    let overall = (diff_sq / norm_sq).sqrt();
    println!("{}: dequantized weights vs ModelOpt's, relative Frobenius difference {overall:.2e} overall, {worst:.2e} worst linear", e.folder);
    assert!(overall <= e.weight_rel, "{}: dequantized weights differ by {overall:.2e}", e.folder);

    // Perplexity: ours, ModelOpt's export through the same evaluator, ModelOpt's own figure.
    let results = Json::parse_file(&p.reference.join("RESULTS.json")).unwrap();
    let fakequant = results.get(e.folder).unwrap().get("ppl_fakequant").unwrap().as_f64().unwrap();
    let p_ours = ppl(&out, None, &p.model);
    let p_theirs = ppl(&refdir, Some(&p.model), &p.model);
    println!(
        "{}: ppl rq-min {p_ours:.3}, ModelOpt export {p_theirs:.3} (same evaluator), ModelOpt fake-quant (bf16) {fakequant:.3}",
        e.folder
    );
    // Equally good: never more than 0.5% worse than ModelOpt's export; AWQ's alpha choices can
    // make ours somewhat better (nvfp4_awq: -0.6%), but not by more than 1% (a sign of a
    // dequantizer that misreads one of the two).
    let r = p_ours / p_theirs - 1.0;
    assert!((-0.01..=0.005).contains(&r), "{}: {p_ours} vs ModelOpt export {p_theirs}", e.folder);
    // ModelOpt's bf16 fake-quant figure, +1%; where its own export scores higher than that under
    // this evaluator (export-time resmoothing costs accuracy), the export's figure +0.5%.
    let ceiling = (fakequant * 1.01).max(p_theirs * 1.005);
    assert!(p_ours <= ceiling, "{}: ppl {p_ours} above {ceiling}", e.folder);
    assert!(p_ours >= PPL_F32 * 0.995, "{}: ppl {p_ours} implausibly below the unquantized {PPL_F32}", e.folder);
    let _ = std::fs::remove_dir_all(&out);
}

const WEIGHT_ONLY_FP8: &[&str] = &["weight", "weight_scale"];
const WEIGHT_ONLY_NVFP4: &[&str] = &["weight", "weight_scale", "weight_scale_2"];
/// One bf16 step: activation amax is a bf16 value (reference/README.md).
const BF16_STEP: f64 = 1.0 / 128.0;

#[test]
fn fp8() {
    check(&Expect { folder: "fp8", qformat: "fp8", kv: false, exact: WEIGHT_ONLY_FP8, scale_rel: BF16_STEP, weight_bytes: 1.0, weight_rel: 0.0 });
}

#[test]
fn fp8_kvfp8() {
    check(&Expect { folder: "fp8_kvfp8", qformat: "fp8", kv: true, exact: WEIGHT_ONLY_FP8, scale_rel: BF16_STEP, weight_bytes: 1.0, weight_rel: 0.0 });
}

#[test]
fn nvfp4() {
    check(&Expect { folder: "nvfp4", qformat: "nvfp4", kv: false, exact: WEIGHT_ONLY_NVFP4, scale_rel: BF16_STEP, weight_bytes: 1.0, weight_rel: 0.0 });
}

#[test]
fn nvfp4_kvfp8() {
    check(&Expect { folder: "nvfp4_kvfp8", qformat: "nvfp4", kv: true, exact: WEIGHT_ONLY_NVFP4, scale_rel: BF16_STEP, weight_bytes: 1.0, weight_rel: 0.0 });
}

#[test]
fn int8_sq() {
    check(&Expect { folder: "int8_sq", qformat: "int8_sq", kv: false, exact: &[], scale_rel: BF16_STEP, weight_bytes: 0.85, weight_rel: 0.05 });
}

#[test]
fn int4_awq() {
    check(&Expect { folder: "int4_awq", qformat: "int4_awq", kv: false, exact: &[], scale_rel: 0.0, weight_bytes: 0.97, weight_rel: 0.05 });
}

#[test]
fn w4a8_awq() {
    check(&Expect { folder: "w4a8_awq", qformat: "w4a8_awq", kv: false, exact: &[], scale_rel: 0.02, weight_bytes: 0.97, weight_rel: 0.05 });
}

#[test]
fn nvfp4_awq() {
    check(&Expect { folder: "nvfp4_awq", qformat: "nvfp4_awq", kv: false, exact: &[], scale_rel: 0.03, weight_bytes: 0.95, weight_rel: 0.05 });
}

/// The unquantized model through the same evaluator gives transformers' f32 figure.
#[test]
fn unquantized_perplexity() {
    let Some(p) = paths() else { return };
    let base = ppl(&p.model, None, &p.model);
    println!("unquantized ppl {base:.4} (transformers f32: {PPL_F32})");
    assert!((base / PPL_F32 - 1.0).abs() <= 0.001, "unquantized ppl {base}");
}
