//! Bad input gives one clear error naming the file / tensor, a non-zero exit, no panic, and
//! no output folder (not even a half-written one).

use rq_min::cli::{quantize, QuantizeArgs};
use rq_min::model::config::ModelConfig;
use rq_min::io::json::Json;
use rq_min::io::safetensors::{Checkpoint, Dtype};
use rq_min::Error;
use std::path::{Path, PathBuf};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/families-llama");

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rq-min-bad-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of the tiny f32 Llama fixture plus a calibration ids file, in `dir/model`.
fn model_copy(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(Path::new(FIXTURE).join(f), model.join(f)).unwrap();
    }
    std::fs::write(dir.join("ids.json"), "[[1, 5, 9, 200, 17, 3, 44, 100], [1, 7, 7, 8]]").unwrap();
    model
}

fn args(model: &Path, out: &Path, ids: &Path) -> QuantizeArgs {
    QuantizeArgs {
        calib_ids: Some(ids.to_path_buf()),
        calib_size: 8,
        calib_seq: Some(8),
        no_eval: true,
        quiet: true,
        ..QuantizeArgs::new(model, out)
    }
}

/// Overwrites value `index` of the f32 tensor `name` of `model/model.safetensors` in place.
fn poison(model: &Path, name: &str, index: usize, value: f32) {
    let file = model.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let header = rq_min::io::safetensors::parse_header(&bytes, &file).unwrap();
    let info = header.tensors.iter().find(|i| i.name == name).unwrap();
    let at = header.data_start + info.start + 4 * index;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
}

/// Nothing was left beside `out`: neither it nor a temporary folder.
fn assert_no_output(out: &Path) {
    assert!(!out.exists(), "{} was created", out.display());
    let parent = out.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("rq-min-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary folders left: {leftovers:?}");
}

#[test]
fn a_good_copy_quantizes() {
    let dir = scratch("good");
    let model = model_copy(&dir);
    let out = dir.join("out");
    quantize(&args(&model, &out, &dir.join("ids.json"))).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.tensor("model.layers.1.mlp.down_proj.weight").unwrap().dtype, Dtype::F8E4M3);
    // Running again without --force is refused and leaves the first output alone.
    let err = quantize(&args(&model, &out, &dir.join("ids.json"))).unwrap_err();
    assert!(matches!(err, Error::Usage(_)) && err.to_string().contains("--force"), "{err}");
    assert!(out.join("model.safetensors").exists());
    // The input folder is never a valid --out.
    let mut a = args(&model, &model, &dir.join("ids.json"));
    a.force = true;
    let err = quantize(&a).unwrap_err().to_string();
    assert!(err.contains("input model folder"), "{err}");
    assert!(model.join("model.safetensors").exists());
}

#[test]
fn nan_weight_is_named_and_nothing_is_written() {
    let dir = scratch("nan");
    let model = model_copy(&dir);
    let name = "model.layers.1.self_attn.v_proj.weight";
    poison(&model, name, 37, f32::NAN);

    let out = dir.join("out");
    let err = quantize(&args(&model, &out, &dir.join("ids.json"))).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(name) && msg.contains("NaN"), "{msg}");
    assert!(msg.contains("index 37"), "{msg}");
    assert_no_output(&out);
}

/// A finite weight too large to compute with (3e38: every product overflows) is named where it
/// is, not reported later as NaN activations of another module (hardening item 14).
#[test]
fn overflowing_weight_is_named_where_it_is() {
    let dir = scratch("huge");
    let model = model_copy(&dir);
    let name = "model.layers.0.mlp.down_proj.weight";
    poison(&model, name, 5, 3e38);
    let out = dir.join("out");
    let err = quantize(&args(&model, &out, &dir.join("ids.json"))).unwrap_err().to_string();
    assert!(err.contains(name) && err.contains("index 5") && err.contains("too large"), "{err}");
    assert_no_output(&out);
}

#[test]
fn broken_files_give_one_clear_error() {
    let dir = scratch("broken");
    let ids = |m: &Path| m.parent().unwrap().join("ids.json");
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        ("missing config", Box::new(|m: &Path| std::fs::remove_file(m.join("config.json")).unwrap()), "config.json"),
        (
            "malformed config",
            Box::new(|m: &Path| std::fs::write(m.join("config.json"), "{\"hidden_size\": 12,").unwrap()),
            "invalid JSON at byte",
        ),
        (
            "truncated weights",
            Box::new(|m: &Path| {
                let f = m.join("model.safetensors");
                let b = std::fs::read(&f).unwrap();
                std::fs::write(&f, &b[..b.len() / 2]).unwrap();
            }),
            "model.safetensors",
        ),
        (
            "unsupported architecture",
            Box::new(|m: &Path| edit_config(m, |j| j.set("architectures", Json::Arr(vec![rq_min::io::json::str("GPT2LMHeadModel")])))),
            "LlamaForCausalLM",
        ),
        (
            "shape mismatch vs config",
            Box::new(|m: &Path| edit_config(m, |j| j.set("intermediate_size", Json::Int(512)))),
            "mlp.gate_proj.weight",
        ),
        (
            "token id outside the vocabulary",
            Box::new(|m: &Path| std::fs::write(m.parent().unwrap().join("ids.json"), "[[1, 99999]]").unwrap()),
            "99999",
        ),
    ];
    for (what, break_it, expect) in cases {
        let case = dir.join(what.replace(' ', "_"));
        std::fs::create_dir_all(&case).unwrap();
        let model = model_copy(&case);
        break_it(&model);
        let out = case.join("out");
        let err = quantize(&args(&model, &out, &ids(&model))).expect_err(what);
        assert!(err.to_string().contains(expect), "{what}: {err}");
        assert_no_output(&out);
    }
}

fn edit_config(model: &Path, f: impl Fn(&mut Json)) {
    let p = model.join("config.json");
    let mut j = Json::parse_file(&p).unwrap();
    f(&mut j);
    std::fs::write(&p, j.to_pretty(2)).unwrap();
}

/// Every truncation of config.json, every key removed and every value replaced by values of
/// other kinds: an error or a config, never a panic.
#[test]
fn config_mutations_never_panic() {
    let text = std::fs::read(Path::new(FIXTURE).join("config.json")).unwrap();
    let path = Path::new("config.json");
    let parse = |bytes: &[u8]| match Json::parse(bytes, "config.json") {
        Ok(j) => ModelConfig::from_json(j, path).map(|_| ()),
        Err(e) => Err(e),
    };
    let mut outcomes = (0, 0);
    let mut run = |bytes: &[u8], what: &str| {
        let r = std::panic::catch_unwind(|| parse(bytes)).unwrap_or_else(|_| panic!("panic on {what}"));
        match r {
            Ok(()) => outcomes.0 += 1,
            Err(_) => outcomes.1 += 1,
        }
    };
    for n in 0..text.len() {
        run(&text[..n], &format!("truncation to {n} bytes"));
    }
    let base = Json::parse(&text, "config.json").unwrap();
    let keys: Vec<String> = base.as_object().unwrap().iter().map(|(k, _)| k.clone()).collect();
    let replacements = [
        Json::Null,
        Json::Bool(true),
        Json::Int(0),
        Json::Int(-1),
        Json::Int(i64::MAX),
        Json::Float(1e300),
        Json::Float(0.5),
        rq_min::io::json::str("x"),
        Json::Arr(vec![]),
        Json::Obj(vec![]),
    ];
    for k in &keys {
        let mut j = base.clone();
        if let Json::Obj(m) = &mut j {
            m.retain(|(key, _)| key != k);
        }
        run(j.to_compact().as_bytes(), &format!("without {k}"));
        for r in &replacements {
            let mut j = base.clone();
            j.set(k, r.clone());
            run(j.to_compact().as_bytes(), &format!("{k} = {}", r.to_compact()));
        }
    }
    // Byte flips over the whole file.
    for i in 0..text.len() {
        let mut t = text.clone();
        t[i] ^= 0x5A;
        run(&t, &format!("byte {i} flipped"));
    }
    println!("config mutations: {} accepted, {} refused", outcomes.0, outcomes.1);
    assert!(outcomes.1 > text.len(), "most mutations must be refused");
}

#[test]
fn config_errors_name_the_key() {
    let base = Json::parse_file(&Path::new(FIXTURE).join("config.json")).unwrap();
    let check = |edit: &dyn Fn(&mut Json), expect: &str| {
        let mut j = base.clone();
        edit(&mut j);
        let err = ModelConfig::from_json(j, Path::new("x/config.json")).unwrap_err().to_string();
        assert!(err.contains(expect), "{err} (wanted {expect})");
        assert!(err.contains("x/config.json") || err.contains("unsupported"), "{err}");
    };
    check(&|j| j.set("num_key_value_heads", Json::Int(3)), "num_key_value_heads");
    check(&|j| j.set("hidden_size", rq_min::io::json::str("128")), "hidden_size");
    check(&|j| j.set("num_hidden_layers", Json::Int(0)), "num_hidden_layers");
    check(&|j| j.set("architectures", Json::Arr(vec![rq_min::io::json::str("BertModel")])), "MistralForCausalLM");
}

/// The binary: non-zero exit, one line starting with "rq-min: error:", no panic.
#[test]
fn binary_reports_errors_without_panicking() {
    let dir = scratch("bin");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rq-min")).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let missing = dir.join("nope");
    let (code, err) = run(&["quantize", "--model", missing.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.starts_with("rq-min: error:") && err.contains("nope") && !err.contains("panicked"), "{err}");
    let (code, err) = run(&["quantize", "--model", FIXTURE, "--out", "/tmp/x", "--qformat", "int3"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown --qformat 'int3'") && err.contains("fp8"), "{err}");
    let (code, err) = run(&["inspect", dir.join("missing.safetensors").to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("missing.safetensors"), "{err}");
}

/// Rewrites `model/model.safetensors` with the tensors `keep` accepts, plus `extra`.
fn rewrite_weights(model: &Path, keep: impl Fn(&str) -> bool, extra: &[(&str, Vec<f32>)]) {
    let file = model.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let header = rq_min::io::safetensors::parse_header(&bytes, &file).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = header
        .tensors
        .iter()
        .filter(|i| keep(&i.name))
        .map(|i| {
            let data = bytes[header.data_start + i.start..header.data_start + i.end].to_vec();
            (i.name.clone(), i.dtype, i.shape.clone(), data)
        })
        .collect();
    for (name, values) in extra {
        tensors.push((name.to_string(), Dtype::F32, vec![values.len()], values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let refs: Vec<(&str, Dtype, &[usize], &[u8])> =
        tensors.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
    std::fs::remove_file(&file).unwrap();
    rq_min::io::safetensors::write_file(&file, &refs, &[]).unwrap();
}

/// A config that lies about a dimension or the layer count, or a checkpoint that lacks a tensor
/// the family needs, is refused before any work, with the key or tensor named, and nothing is
/// written (hardening items 5, 8, 9).
#[test]
fn checkpoints_that_disagree_with_their_config_are_refused_up_front() {
    let dir = scratch("complete");
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker, &[&str])> = vec![
        (
            "a billion layers",
            Box::new(|m: &Path| edit_config(m, |j| j.set("num_hidden_layers", Json::Int(1_000_000_000)))),
            &["num_hidden_layers is 1000000000", "no tensor of model.layers.2"],
        ),
        (
            "fewer layers than the file",
            Box::new(|m: &Path| edit_config(m, |j| j.set("num_hidden_layers", Json::Int(1)))),
            &["num_hidden_layers is 1", "up to model.layers.1"],
        ),
        (
            "head_dim 1e12",
            Box::new(|m: &Path| edit_config(m, |j| j.set("head_dim", Json::Int(1_000_000_000_000)))),
            &["q_proj.weight", "expected"],
        ),
        (
            "huge vocabulary",
            Box::new(|m: &Path| edit_config(m, |j| j.set("vocab_size", Json::Int(1 << 40)))),
            &["model.embed_tokens.weight"],
        ),
        (
            "no final norm",
            Box::new(|m: &Path| rewrite_weights(m, |n| n != "model.norm.weight", &[])),
            &["model.norm.weight", "not found"],
        ),
        (
            "untied without lm_head",
            Box::new(|m: &Path| rewrite_weights(m, |n| n != "lm_head.weight", &[])),
            &["lm_head.weight", "not found"],
        ),
    ];
    for (what, break_it, expect) in cases {
        let case = dir.join(what.replace(' ', "_"));
        std::fs::create_dir_all(&case).unwrap();
        let model = model_copy(&case);
        break_it(&model);
        let out = case.join("out");
        let started = std::time::Instant::now();
        let err = quantize(&args(&model, &out, &case.join("ids.json"))).unwrap_err().to_string();
        for e in expect {
            assert!(err.contains(e), "{what}: {err}");
        }
        assert!(started.elapsed().as_secs() < 20, "{what}: took {:?}", started.elapsed());
        assert_no_output(&out);
        // eval refuses it the same way.
        let eval = rq_min::cli::EvalArgs {
            model: model.clone(),
            text: None,
            ids: None,
            logits: None,
            seq: 16,
            base: None,
            dtype: "f32".into(),
            device: "cpu".into(),
            quiet: true,
        };
        let err = rq_min::cli::eval(&eval).unwrap_err().to_string();
        assert!(err.contains(expect[0]), "{what} (eval): {err}");
    }
}

/// `verify` finds what a loader would miss: a tensor the config implies, a tensor it does not
/// imply, and hf_quant_config.json missing or disagreeing with config.json (item 8).
#[test]
fn verify_checks_completeness_and_the_two_configs() {
    let dir = scratch("verify-complete");
    let model = model_copy(&dir);
    let out = dir.join("out");
    quantize(&args(&model, &out, &dir.join("ids.json"))).unwrap();
    rq_min::cli::verify(&out, None).unwrap();
    let findings = |f: &dyn Fn(&Path)| -> String {
        let copy = dir.join("copy");
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).unwrap();
        for e in std::fs::read_dir(&out).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
        }
        f(&copy);
        assert!(rq_min::cli::verify(&copy, None).is_err());
        rq_min::export::verify::model_findings(&copy).join("\n")
    };
    let f = findings(&|c| rewrite_weights(c, |n| n != "model.norm.weight", &[]));
    assert!(f.contains("model.norm.weight"), "{f}");
    let f = findings(&|c| rewrite_weights(c, |_| true, &[("model.layers.0.mlp.extra.weight", vec![1.0; 4])]));
    assert!(f.contains("model.layers.0.mlp.extra.weight") && f.contains("not implied"), "{f}");
    let f = findings(&|c| std::fs::remove_file(c.join("hf_quant_config.json")).unwrap());
    assert!(f.contains("hf_quant_config.json: missing"), "{f}");
    let f = findings(&|c| {
        let p = c.join("hf_quant_config.json");
        let text = std::fs::read_to_string(&p).unwrap().replace("\"FP8\"", "\"NVFP4\"");
        std::fs::write(&p, text).unwrap();
    });
    assert!(f.contains("quant_algo") && f.contains("NVFP4"), "{f}");
}

/// `--out` inside the input folder, or holding it, is refused before anything is written, for
/// every export, `--force` or not (hardening item 4).
#[test]
fn out_inside_or_around_the_input_is_refused() {
    let dir = scratch("out-in-input");
    let model = model_copy(&dir);
    for export in ["hf", "trtllm", "qnemo", "compressed-tensors"] {
        for (out, what) in [(model.join("fp8"), "inside the input model folder"), (dir.clone(), "holds the input model folder")] {
            let mut a = args(&model, &out, &dir.join("ids.json"));
            a.force = true;
            a.export = export.into();
            let err = quantize(&a).unwrap_err().to_string();
            assert!(err.contains(what), "{export} {}: {err}", out.display());
        }
    }
    let names: Vec<_> = std::fs::read_dir(&model).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
}
