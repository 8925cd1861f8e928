//! Calibration input and the flags around it: endless or empty inputs, windows past the
//! model's positions, patterns that match nothing, and the messages they give.

use rq_min::cli::{quantize, QuantizeArgs};
use rq_min::ptq::calib::{self, Source};
use rq_min::tokenizer::Tokenizer;
use rq_min::Error;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stories260K-hf");

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rq-min-calib-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A FIFO at `path`.
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// Small, fast quantize arguments: 2 rows of 16 tokens of the built-in text, no evaluation.
fn args(out: &Path) -> QuantizeArgs {
    QuantizeArgs { calib_size: 2, calib_seq: Some(16), no_eval: true, quiet: true, ..QuantizeArgs::new(Path::new(MODEL), out) }
}

/// `f` run on a thread, failing the test when it takes more than `secs` (the old code hung).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).unwrap_or_else(|_| panic!("still running after {secs}s"))
}

/// The binary with `args`: (exit code, stderr), killed and failing the test after `secs`.
fn run(args: &[&str], secs: u64) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rq-min"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(secs) {
            child.kill().unwrap();
            panic!("rq-min {args:?} still running after {secs}s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(Path::new(MODEL)).unwrap()
}

/// Item 7: `/dev/zero` is refused after the first chunk, naming the file and the NUL byte.
#[test]
fn dev_zero_calib_text_is_refused_promptly() {
    let dir = scratch("zero");
    let out = dir.join("out");
    let (code, err) = run(&["quantize", "--model", MODEL, "--out", out.to_str().unwrap(), "--calib-text", "/dev/zero", "--no-eval"], 60);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("/dev/zero") && err.contains("NUL byte") && err.contains("--calib-text"), "{err}");
    assert!(!out.exists());
}

/// An endless stream of text writing into `fifo` (opened read-write here, so the pipe has a
/// writer before calibration opens it).
fn endless_writer(fifo: &Path, line: &'static str) {
    let mut w = std::fs::OpenOptions::new().read(true).write(true).open(fifo).unwrap();
    std::thread::spawn(move || while w.write_all(line.as_bytes()).is_ok() {});
}

/// Item 7: endless plain text and .jsonl streams give their rows and stop reading.
#[test]
fn endless_streams_stop_after_the_rows_needed() {
    let dir = scratch("stream");
    let text = dir.join("text.fifo");
    mkfifo(&text);
    endless_writer(&text, "Once upon a time there was a little dog who liked to run.\n");
    let rows = within(60, move || calib::load(Source::Text(&text), Some(&tokenizer()), 3, 16).unwrap());
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.len() == 16), "{rows:?}");

    let jsonl = dir.join("records.jsonl");
    mkfifo(&jsonl);
    endless_writer(&jsonl, "{\"text\": \"The cat sat on the mat and looked at the sun.\"}\n");
    let rows = within(60, move || calib::load(Source::Text(&jsonl), Some(&tokenizer()), 4, 8).unwrap());
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.len() == 8), "{rows:?}");
}

/// Item 7: a regular file is read only as far as `size * seq * 16` bytes (to a line break):
/// text past that, even invalid, is never looked at.
#[test]
fn text_past_the_rows_needed_is_not_read() {
    let dir = scratch("prefix");
    let path = dir.join("calib.txt");
    let mut bytes = "Lily wanted to play in the park with her friend Tom.\n".repeat(40).into_bytes();
    bytes.extend_from_slice(&[0xff, 0, 0xfe]);
    std::fs::write(&path, &bytes).unwrap();
    let rows = calib::load(Source::Text(&path), Some(&tokenizer()), 2, 16).unwrap();
    assert_eq!(rows.len(), 2);
    // The same bytes early are refused, naming the file and the offset.
    let err = calib::load(Source::Text(&path), Some(&tokenizer()), 200, 16).unwrap_err().to_string();
    assert!(err.contains("calib.txt") && err.contains("NUL byte at byte"), "{err}");
}

/// Item 7: windows longer than max_position_embeddings (512) are usage errors naming the
/// flag, the value and the limit, before any work.
#[test]
fn windows_past_max_position_embeddings_are_refused() {
    let dir = scratch("seq");
    let out = dir.join("out");
    let a = QuantizeArgs { calib_seq: Some(1_000_000), ..args(&out) };
    let err = within(60, move || quantize(&a).unwrap_err());
    assert!(matches!(err, Error::Usage(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("--calib-seq 1000000") && msg.contains("max_position_embeddings (512"), "{msg}");

    let a = QuantizeArgs { eval_seq: 100_000, no_eval: false, ..args(&out) };
    let msg = within(60, move || quantize(&a).unwrap_err().to_string());
    assert!(msg.contains("--eval-seq 100000") && msg.contains("512"), "{msg}");

    let e = rq_min::cli::EvalArgs {
        model: PathBuf::from(MODEL),
        text: None,
        ids: None,
        logits: None,
        seq: 100_000,
        base: None,
        dtype: "f32".into(),
        device: "cpu".into(),
        quiet: true,
    };
    let msg = within(60, move || rq_min::cli::eval(&e).unwrap_err().to_string());
    assert!(msg.contains("--seq 100000") && msg.contains("512"), "{msg}");
    assert!(!out.exists());
}

/// Without `--calib-seq`, rows are 512 tokens or the model's max_position_embeddings when that
/// is smaller: the defaults work on a model with short positions.
#[test]
fn default_rows_fit_the_model() {
    let dir = scratch("default-seq");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(MODEL).unwrap().flatten() {
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let config = model.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap().replace("\"max_position_embeddings\": 512", "\"max_position_embeddings\": 48");
    std::fs::write(&config, text).unwrap();
    let out = dir.join("out");
    let a = QuantizeArgs { calib_seq: None, ..QuantizeArgs::new(&model, &out) };
    let a = QuantizeArgs { calib_size: 2, no_eval: true, quiet: true, ..a };
    quantize(&a).unwrap();
    assert!(out.join("model.safetensors").exists());
    let a = QuantizeArgs { calib_seq: Some(49), force: true, ..a };
    assert!(quantize(&a).unwrap_err().to_string().contains("--calib-seq 49 is more than the model's max_position_embeddings (48"));
}

/// Item 10: no sample of at least 2 tokens is an error naming the input; an ids row that is
/// too short is refused with its index; `--score-size 0` is a usage error.
#[test]
fn empty_calibration_is_refused() {
    let dir = scratch("empty");
    let out = dir.join("out");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ids = |p: PathBuf| QuantizeArgs { calib_ids: Some(p), ..args(&out) };
    let text = |p: PathBuf| QuantizeArgs { calib_text: Some(p), ..args(&out) };
    let cases = [
        (ids(write("rows0.json", "[[]]")), "row 0 has 0 token"),
        (ids(write("rows1.json", "[[1, 5, 9], [1]]")), "row 1 has 1 token"),
        (ids(write("none.json", "[]")), "no sample of at least 2 tokens"),
        (text(write("empty.txt", "")), "empty.txt gives no sample of at least 2 tokens"),
        (text(write("blank.jsonl", "\n{\"text\": \"\"}\n")), "blank.jsonl gives no sample"),
    ];
    for (a, expect) in cases {
        let err = quantize(&a).unwrap_err().to_string();
        assert!(err.contains(expect), "{err} (wanted {expect})");
        assert!(!out.exists());
    }
    let a = QuantizeArgs { auto_bits: Some(8.0), qformat: "nvfp4,fp8".into(), score_size: 0, ..args(&out) };
    let err = quantize(&a).unwrap_err();
    assert!(matches!(err, Error::Usage(_)) && err.to_string().contains("--score-size 0"), "{err}");
}

/// Item 10: stderr says how many samples and tokens calibration used, except under --quiet.
#[test]
fn calibration_size_is_reported() {
    let dir = scratch("report");
    let ids = dir.join("ids.json");
    std::fs::write(&ids, "[[1, 5, 9, 200, 17, 3, 44, 100], [1, 7, 7, 8]]").unwrap();
    let out = dir.join("out");
    let base = ["quantize", "--model", MODEL, "--out", out.to_str().unwrap(), "--calib-ids", ids.to_str().unwrap(), "--no-eval"];
    let (code, err) = run(&base, 120);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("calibration: 2 samples, 12 tokens"), "{err}");
    let (code, err) = run(&[&base[..], &["--force", "--quiet"]].concat(), 120);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("calibration:"), "{err}");
}

/// Item 11: `--exclude` patterns and `--layer-formats` modules that match nothing are warned
/// about with the closest module names; `--strict` makes that an error.
#[test]
fn unmatched_patterns_warn_or_fail_with_strict() {
    let dir = scratch("patterns");
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    let base = ["quantize", "--model", MODEL, "--out", o, "--calib-size", "2", "--calib-seq", "16", "--no-eval", "--quiet"];
    let (code, err) = run(&[&base[..], &["--exclude", "*self_atn*,*layers.0.mlp*"]].concat(), 120);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("warning: --exclude pattern '*self_atn*' matches no module"), "{err}");
    assert!(err.contains("closest: model.layers.0.self_attn.q_proj"), "{err}");
    assert!(!err.contains("*layers.0.mlp*"), "a matching pattern is not warned about: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let lf = dir.join("formats.json");
    std::fs::write(&lf, r#"{"model.layers.1.mlp.down_prj": "fp8", "model.layers.2.mlp.up_proj": "fp8"}"#).unwrap();
    let (code, err) = run(&[&base[..], &["--force", "--layer-formats", lf.to_str().unwrap()]].concat(), 120);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("module 'model.layers.1.mlp.down_prj' matches no module"), "{err}");
    assert!(err.contains("closest: model.layers.1.mlp.down_proj"), "{err}");
    assert!(!err.contains("up_proj'"), "{err}");

    std::fs::remove_dir_all(&out).unwrap();
    let (code, err) = run(&[&base[..], &["--exclude", "*self_atn*", "--strict"]].concat(), 120);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.starts_with("rq-min: error: --exclude pattern '*self_atn*'") && err.contains("--strict"), "{err}");
    assert!(!out.exists());
    let a = QuantizeArgs { layer_formats: Some(lf), strict: true, ..args(&out) };
    let err = quantize(&a).unwrap_err();
    assert!(matches!(err, Error::Usage(_)) && err.to_string().contains("down_prj"), "{err}");
}

/// Item 14: `--auto-bits` outside the reachable range names the value and the range.
#[test]
fn auto_bits_out_of_range_names_the_range() {
    let dir = scratch("bits");
    let out = dir.join("out");
    for bits in [100.0, 1.0] {
        let a = QuantizeArgs { auto_bits: Some(bits), qformat: "nvfp4,fp8".into(), score_size: 2, ..args(&out) };
        let err = quantize(&a).unwrap_err().to_string();
        assert!(err.contains(&format!("--auto-bits {bits} is outside the valid range 5.953 to 16")), "{err}");
    }
}

/// Item 14: a FIFO as --model or --calib-text is named as such, not as missing, and a FIFO
/// nobody writes to does not hang calibration.
#[test]
fn fifo_inputs_are_named_as_fifos() {
    let dir = scratch("fifo");
    let fifo = dir.join("input");
    mkfifo(&fifo);
    let out = dir.join("out");
    let a = QuantizeArgs { model: fifo.clone(), ..args(&out) };
    let err = quantize(&a).unwrap_err().to_string();
    assert!(err.contains("--model") && err.contains("is a FIFO, not a checkpoint folder"), "{err}");
    let a = QuantizeArgs { calib_text: Some(fifo.clone()), ..args(&out) };
    let err = within(60, move || quantize(&a).unwrap_err().to_string());
    assert!(err.contains("input (a FIFO, not a regular file") && !err.contains("does not exist"), "{err}");
    let a = QuantizeArgs { model: dir.join("missing"), ..args(&out) };
    let err = quantize(&a).unwrap_err().to_string();
    assert!(err.contains("--model") && err.contains("missing does not exist"), "{err}");
    assert!(!out.exists());
}

/// `--dry-run` prints the memory estimate of the run and writes nothing; the estimate's items
/// are the shapes' arithmetic (families-llama: hidden 128, intermediate 256, 4 heads and 2 KV
/// heads of 32, vocabulary 512).
#[test]
fn dry_run_prints_the_memory_estimate_and_writes_nothing() {
    use rq_min::compute::Device;
    use rq_min::model::Model;
    use rq_min::ptq::memory::{estimate, peak, Phase, Plan};
    let llama = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families-llama");
    let model = Model::open(&llama, None).unwrap();
    let plan = |awq: bool, eval_seq: Option<usize>| Plan {
        rows: 3,
        seq: 16,
        awq,
        auto_quantize: None,
        eval_seq,
        device: Device::Cpu,
        shard_bytes: 1 << 30,
    };
    // q 128x128, k and v 64x128, o 128x128, gate and up 256x128, down 128x256, f32.
    let layer = (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128) * 4u64;
    let hidden = 3 * 16 * 128 * 4u64;
    let row = 16 * (128 + 2 * 256) * 4u64;
    let input: u64 = std::fs::metadata(llama.join("model.safetensors")).unwrap().len();
    let e = estimate(&model, &plan(false, None)).unwrap();
    let bytes: Vec<u64> = e.host.iter().map(|i| i.2).collect();
    assert!(e.device.is_empty());
    // This layer, the next one read ahead, the hidden states, a row's temporaries.
    assert_eq!(bytes[..4], [layer, layer, hidden, row]);
    // The pending shard: the input's tensor bytes (the file less its header).
    assert!(bytes[4] < input && bytes[4] > input - 4096, "pending {} of a {input}-byte file", bytes[4]);
    assert_eq!(peak(&e.host), bytes.iter().sum::<u64>());
    // AWQ adds the weights again and 11 candidates; evaluation is its own phase.
    let e = estimate(&model, &plan(true, Some(32))).unwrap();
    assert!(e.host.iter().any(|i| i.2 == 12 * layer));
    let eval: u64 = e.host.iter().filter(|i| i.0 == Phase::Evaluation).map(|i| i.2).sum();
    assert_eq!(eval, 2 * layer + (512 * 128 + 32 * 512) * 4 + row);
    // Auto-quantize with 2 score rows and 3 formats (2 layers: one segment of 2): the score's
    // backward is its own phase.
    let e = estimate(&model, &Plan { auto_quantize: Some((2, 3)), ..plan(false, None) }).unwrap();
    let score: u64 = e.host.iter().filter(|i| i.0 == Phase::Score).map(|i| i.2).sum();
    let state = 2 * 16 * 128 * 4u64;
    let temps = 16 * (8 * 128 + 6 * 256 + 3 * 128 + 4 * 64) * 4 + 6 * 128 * 16 * 4;
    let head = 4 * 512 * 128 * 4 + 512 * 512 * 4 + 512 * 128 * 4;
    assert_eq!(score, 5 * layer + state + 3 * state + temps + head);
    assert_eq!(peak(&e.host), score.max(e.host.iter().filter(|i| i.0 == Phase::Calibration).map(|i| i.2).sum()));

    // The command: the table on stdout, exit 0, no --out.
    let dir = scratch("dry-run");
    let out = dir.join("out");
    let ids = dir.join("ids.json");
    let row: Vec<String> = (0..16).map(|i| (i * 7 % 512).to_string()).collect();
    std::fs::write(&ids, format!("[[{0}],[{0}],[{0}]]", row.join(","))).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_rq-min"))
        .args(["quantize", "--model", llama.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--calib-ids", ids.to_str().unwrap(), "--no-eval"])
        .args(["--qformat", "int4_awq", "--calib-size", "3", "--calib-seq", "16", "--dry-run", "--quiet"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}{}", String::from_utf8_lossy(&run.stderr));
    for want in ["hidden states of 3 calibration rows x 16 tokens", "AWQ search", "peak host memory", "nothing written"] {
        assert!(stdout.contains(want), "{want:?} missing from:\n{stdout}");
    }
    assert!(!out.exists(), "--dry-run wrote {}", out.display());
}
