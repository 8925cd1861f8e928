//! `rq-min inspect`: every reference export is clean; each kind of broken checkpoint is caught.

mod common;

use rq_min::cli::{quantize, QuantizeArgs};
use rq_min::export::verify::check;
use rq_min::io::json::{str, Json};
use rq_min::io::safetensors::{write_file, Checkpoint, Dtype};
use std::path::{Path, PathBuf};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/families-llama");
const IDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/calib-ids-small.json");

#[test]
fn reference_exports_are_clean() {
    let Some(shared) = common::shared_dir() else { return };
    let root = shared.join("reference/modelopt-0.47/rq-tiny");
    for (folder, format, bits) in [
        ("fp8", "FP8", 8.0),
        ("fp8_kvfp8", "FP8", 8.0),
        // 8-bit codes plus one f32 scale per output row: 2560 rows per layer of 786,432 weights.
        ("int8_sq", "INT8", 8.0 + 32.0 * 2560.0 / 786_432.0),
        // 4-bit codes plus one f32 scale per 128 weights.
        ("int4_awq", "INT4 g128", 4.25),
        ("w4a8_awq", "INT4 g128", 4.25),
        // 4-bit codes plus one E4M3 scale per 16 weights (the f32 global scale is negligible).
        ("nvfp4", "NVFP4", 4.5),
        ("nvfp4_awq", "NVFP4", 4.5),
        ("nvfp4_kvfp8", "NVFP4", 4.5),
    ] {
        let r = check(&root.join(folder)).unwrap();
        assert!(r.findings.is_empty(), "{folder}: {:?}", r.findings);
        let g = &r.groups[format];
        assert_eq!((g.linears, g.params), (56, 6_291_456), "{folder}");
        assert!((g.bits() - bits).abs() < 0.001, "{folder}: {} bits", g.bits());
    }
}

/// An FP8 export of the tiny fixture, rewritten by `edit` (tensors) and `edit_config`.
fn broken(name: &str, edit: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>), edit_config: impl Fn(&mut Json)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rq-min-inspect-{}-{name}", std::process::id()));
    quantize(&QuantizeArgs {
        calib_ids: Some(PathBuf::from(IDS)),
        calib_size: 8,
        calib_seq: Some(16),
        eval_seq: 16,
        no_eval: true,
        force: true,
        quiet: true,
        ..QuantizeArgs::new(Path::new(FIXTURE), &dir)
    })
    .unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = {
        let ck = Checkpoint::open(&dir).unwrap();
        ck.names().iter().map(|n| {
            let t = ck.tensor(n).unwrap();
            (n.to_string(), t.dtype, t.shape.to_vec(), t.data.to_vec())
        }).collect()
    };
    edit(&mut tensors);
    let refs: Vec<(&str, Dtype, &[usize], &[u8])> =
        tensors.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
    write_file(&dir.join("model.safetensors"), &refs, &[]).unwrap();
    let p = dir.join("hf_quant_config.json");
    let mut j = Json::parse_file(&p).unwrap();
    edit_config(&mut j);
    std::fs::write(&p, j.to_pretty(4)).unwrap();
    dir
}

fn findings(dir: &Path) -> Vec<String> {
    check(dir).unwrap().findings
}

fn set(tensors: &mut [(String, Dtype, Vec<usize>, Vec<u8>)], name: &str, dtype: Dtype, shape: &[usize], data: Vec<u8>) {
    let t = tensors.iter_mut().find(|t| t.0 == name).unwrap_or_else(|| panic!("{name}"));
    *t = (name.to_string(), dtype, shape.to_vec(), data);
}

#[test]
fn each_kind_of_breakage_is_found() {
    const M: &str = "model.layers.1.self_attn.o_proj";
    let clean = broken("clean", |_| {}, |_| {});
    assert_eq!(findings(&clean), Vec::<String>::new());
    let rq = check(&clean).unwrap();
    assert_eq!(rq.groups["FP8"].linears, 14);

    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "missing weight_scale",
            broken("no-scale", |t| t.retain(|x| x.0 != format!("{M}.weight_scale")), |_| {}),
            "no known format",
        ),
        (
            "format in config without its tensors",
            broken("wrong-algo", |_| {}, |j| j.get_mut("quantization").unwrap().set("quant_algo", str("NVFP4"))),
            "quant_algo is NVFP4",
        ),
        (
            "excluded module with scales",
            broken("excluded-scales", |t| {
                let w = t.iter().find(|x| x.0 == "lm_head.weight").unwrap().clone();
                let n = w.2.iter().product::<usize>();
                set(t, "lm_head.weight", Dtype::F8E4M3, &w.2, vec![0x38; n]);
                t.push(("lm_head.weight_scale".into(), Dtype::F32, vec![], 0.5f32.to_le_bytes().to_vec()));
            }, |_| {}),
            "excluded from FP8",
        ),
        (
            "negative scale",
            broken("neg-scale", |t| set(t, &format!("{M}.weight_scale"), Dtype::F32, &[], (-1.0f32).to_le_bytes().to_vec()), |_| {}),
            "finite and positive",
        ),
        (
            "input scale of the wrong shape",
            broken("wide-input-scale", |t| {
                set(t, &format!("{M}.input_scale"), Dtype::F32, &[2], [0.5f32, 0.5].iter().flat_map(|v| v.to_le_bytes()).collect())
            }, |_| {}),
            "expected a scalar",
        ),
    ];
    for (what, dir, expect) in cases {
        let f = findings(&dir);
        assert!(f.iter().any(|x| x.contains(expect)), "{what}: {f:?}");
        let code = std::process::Command::new(env!("CARGO_BIN_EXE_rq-min")).arg("inspect").arg(&dir).output().unwrap().status.code();
        assert_eq!(code, Some(1), "{what}: inspect must exit non-zero");
    }
}
