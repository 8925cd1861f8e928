//! `rq-min verify`: clean exports pass with small weight errors against the original; broken
//! packing, a missing required scale and missing KV scales are findings (non-zero exit).

use rq_min::cli::{quantize, verify, QuantizeArgs};
use rq_min::export::verify::{check, weight_errors};
use rq_min::io::safetensors::{write_file, Checkpoint, Dtype};
use std::path::{Path, PathBuf};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/families-llama");
const IDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/calib-ids-small.json");

fn export(qformat: &str, kv: &str, name: &str) -> PathBuf {
    let out = std::env::temp_dir().join(format!("rq-min-verify-{}-{name}", std::process::id()));
    quantize(&QuantizeArgs {
        qformat: qformat.into(),
        kv_cache: kv.into(),
        calib_ids: Some(PathBuf::from(IDS)),
        calib_size: 8,
        calib_seq: Some(16),
        no_eval: true,
        force: true,
        quiet: true,
        ..QuantizeArgs::new(Path::new(FIXTURE), &out)
    })
    .unwrap();
    out
}

/// Rewrites the export's tensors through `edit`.
fn rewrite(dir: &Path, edit: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let mut t: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = {
        let ck = Checkpoint::open(dir).unwrap();
        ck.names().iter().map(|n| {
            let v = ck.tensor(n).unwrap();
            (n.to_string(), v.dtype, v.shape.to_vec(), v.data.to_vec())
        }).collect()
    };
    edit(&mut t);
    let refs: Vec<(&str, Dtype, &[usize], &[u8])> = t.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
    write_file(&dir.join("model.safetensors"), &refs, &[]).unwrap();
}

#[test]
fn clean_exports_verify_with_small_weight_errors() {
    for (qformat, limit) in [("fp8", 0.05), ("int8_sq", 0.05), ("nvfp4", 0.2), ("int4_awq", 0.25), ("nvfp4_awq", 0.25)] {
        let out = export(qformat, "fp8", qformat);
        verify(&out, Some(Path::new(FIXTURE))).unwrap_or_else(|e| panic!("{qformat}: {e}"));
        let worst = weight_errors(&out, Path::new(FIXTURE)).unwrap().iter().map(|e| e.relative).fold(0f64, f64::max);
        println!("{qformat}: worst dequantized weight error {worst:.4}");
        assert!(worst < limit, "{qformat}: {worst}");
    }
}

#[test]
fn broken_exports_are_findings() {
    const M: &str = "model.layers.1.mlp.down_proj";
    // INT4 nibbles swapped (rows 2j and 2j+1 exchanged): only the weight comparison sees it.
    let out = export("int4_awq", "none", "swapped");
    rewrite(&out, |t| {
        let w = t.iter_mut().find(|x| x.0 == format!("{M}.weight")).unwrap();
        w.3.iter_mut().for_each(|b| *b = b.rotate_left(4));
    });
    assert!(check(&out).unwrap().findings.is_empty(), "the layout alone is consistent");
    let err = verify(&out, Some(Path::new(FIXTURE))).unwrap_err().to_string();
    assert!(err.contains("1 finding"), "{err}");
    let worst = weight_errors(&out, Path::new(FIXTURE)).unwrap().into_iter().find(|e| e.module == M).unwrap();
    assert!(worst.relative > 0.5, "{}", worst.relative);

    // NVFP4 without its input_scale.
    let out = export("nvfp4", "none", "no-input-scale");
    rewrite(&out, |t| t.retain(|x| x.0 != format!("{M}.input_scale")));
    assert!(check(&out).unwrap().findings.iter().any(|f| f.contains(M) && f.contains("without input_scale")));

    // The config names an FP8 KV cache but a layer lacks v_scale.
    let out = export("fp8", "fp8", "no-kv");
    rewrite(&out, |t| t.retain(|x| x.0 != "model.layers.0.self_attn.v_proj.v_scale"));
    let f = check(&out).unwrap().findings;
    assert!(f.iter().any(|x| x.contains("v_proj.v_scale is missing")), "{f:?}");
    let code = std::process::Command::new(env!("CARGO_BIN_EXE_rq-min")).arg("verify").arg(&out).output().unwrap().status.code();
    assert_eq!(code, Some(1));
}
