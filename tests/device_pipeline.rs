//! `--device cuda` end to end against `--device cpu`: quantize (fp8, nvfp4, int8_sq, fp8 + FP8
//! KV cache) and perplexity: the f32 Llama of tests/fixtures/families-llama (no tokenizer:
//! calibration ids from a file, ids for the eval windows), the bf16 stories260K (its tokenizer;
//! bf16 calibration, with FlashAttention-2's bf16 softmax), every family of
//! shared/reference/families the CPU path supports, and rq-tiny with 4 x 64 calibration tokens
//! (the last two need ../shared).
//!
//! What must agree on a GPU: every exported tensor byte for byte, except the activation and
//! KV-cache scales (`input_scale`, `k_scale`, `v_scale`), which come from device statistics and
//! may be one bf16 step (2^-7 relative) apart; every other file of the export byte for byte; the
//! perplexity of the original and of each quantized checkpoint within 0.1%. INT8 SmoothQuant's
//! smoothing factors come from per-channel activation amaxes, so a statistic one ulp apart moves
//! `pre_quant_scale`, the smoothed `weight_scale` and a few INT8 codes: held to one bf16 step
//! and one code. Where the device can differ: the bf16 attention's `exp2f` (an ulp from the
//! CPU's, which can flip a bf16 rounding of a probability) and the tensor cores' summation order;
//! the f32 attention repeats the CPU's operations exactly.
//!
//! Under the emulator (feature `cuda-emu`) `exp2f` is the CPU's and the emulated mma sums in k
//! order, so every export must be byte-identical, scales and INT8 codes included (the
//! calibration rows here see one 128-key attention block).
//!
//! Under the host emulator (feature `cuda-emu`) this runs the real kernels; with feature
//! `cuda` and no driver or GPU each test prints "skipped: <reason>" and passes.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod common;

use common::{have_gpu, say};

use std::path::{Path, PathBuf};

use rq_min::cli::{quantize, QuantizeArgs};
use rq_min::compute::Device;
use rq_min::io::safetensors::{Checkpoint, Dtype};
use rq_min::model::Model;
use rq_min::ptq::eval;
use rq_min::ptq::progress::Progress;

/// tests/fixtures/families-llama of the repository (`common::repo_dir`: `$RQ_REPO_DIR` on
/// another machine).
fn llama() -> PathBuf {
    common::repo_dir().join("tests/fixtures/families-llama")
}

/// tests/fixtures/stories260K-hf of the repository.
fn stories() -> PathBuf {
    common::repo_dir().join("tests/fixtures/stories260K-hf")
}

const SCALE_TOLERANCE: f64 = 1.0 / 128.0;
const PPL_TOLERANCE: f64 = 1e-3;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rq-min-device-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `rows` rows of `len` token ids below `vocab` (a fixed pseudo-random sequence).
fn ids(rows: usize, len: usize, vocab: u32, seed: u32) -> Vec<Vec<u32>> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
    (0..rows)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x % vocab
                })
                .collect()
        })
        .collect()
}

fn write_ids(path: &Path, rows: &[Vec<u32>]) {
    let text: Vec<String> =
        rows.iter().map(|r| format!("[{}]", r.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))).collect();
    std::fs::write(path, format!("[{}]", text.join(", "))).unwrap();
}

/// The calibration of a case: `rows` sequences of `len` ids.
#[derive(Clone, Copy)]
struct Calib {
    rows: usize,
    len: usize,
}

fn quantize_on(model: &Path, out: &Path, ids: &Path, calib: Calib, case: (&str, &str), device: &str, exclude: &[&str]) {
    let (qformat, kv) = case;
    let a = QuantizeArgs {
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
        calib_ids: Some(ids.to_path_buf()),
        calib_size: calib.rows,
        calib_seq: Some(calib.len),
        qformat: qformat.into(),
        kv_cache: kv.into(),
        device: device.into(),
        no_eval: true,
        quiet: true,
        ..QuantizeArgs::new(model, out)
    };
    quantize(&a).unwrap_or_else(|e| panic!("quantize {qformat} kv {kv} on {device}: {e}"));
}

fn is_stat_scale(name: &str) -> bool {
    name.ends_with("input_scale") || name.ends_with("k_scale") || name.ends_with("v_scale")
}

/// The device export `dev` against the CPU export `cpu`; returns (tensors, largest relative
/// difference of a statistics scale).
fn compare_exports(cpu: &Path, dev: &Path, what: &str, smoothed: bool) -> (usize, f64, usize) {
    let mut files: Vec<String> = std::fs::read_dir(cpu).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    let mut dev_files: Vec<String> =
        std::fs::read_dir(dev).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    dev_files.sort();
    assert_eq!(files, dev_files, "{what}: the exports hold different files");
    for f in files.iter().filter(|f| !f.ends_with(".safetensors")) {
        assert!(std::fs::read(cpu.join(f)).unwrap() == std::fs::read(dev.join(f)).unwrap(), "{what}: {f} differs");
    }
    let (c, d) = (Checkpoint::open(cpu).unwrap(), Checkpoint::open(dev).unwrap());
    let mut names: Vec<&str> = c.names();
    names.sort();
    let mut dev_names = d.names();
    dev_names.sort();
    assert_eq!(names, dev_names, "{what}: the exports hold different tensors");
    let (mut worst, mut codes) = (0f64, 0usize);
    for name in &names {
        let (a, b) = (c.get(name).unwrap(), d.get(name).unwrap());
        assert_eq!((a.dtype, a.shape), (b.dtype, b.shape), "{what}: {name}");
        if a.data == b.data {
            continue;
        }
        if cfg!(feature = "cuda-emu") {
            panic!("{what}: {name} differs under the emulator, where the device repeats the CPU's arithmetic");
        }
        let smoothing = smoothed && (name.ends_with("pre_quant_scale") || name.ends_with("weight_scale"));
        if smoothed && a.dtype == Dtype::I8 {
            for (&x, &y) in a.data.iter().zip(b.data) {
                let (x, y) = (x as i8 as i32, y as i8 as i32);
                assert!((x - y).abs() <= 1, "{what}: {name}: INT8 codes {x} (cpu) and {y} (device)");
                codes += usize::from(x != y);
            }
            continue;
        }
        assert!(is_stat_scale(name) || smoothing, "{what}: {name} is not byte-identical");
        for (x, y) in a.to_f32().unwrap().iter().zip(b.to_f32().unwrap()) {
            let rel = ((*x as f64) - (y as f64)).abs() / (x.abs() as f64).max(f64::MIN_POSITIVE);
            assert!(rel <= SCALE_TOLERANCE, "{what}: {name}: cpu {x} device {y} ({rel:.3e} relative)");
            worst = worst.max(rel);
        }
    }
    (names.len(), worst, codes)
}

fn perplexity(dir: &Path, windows: &[Vec<u32>], device: Device) -> f64 {
    let mut model = Model::open(dir, None).unwrap();
    model.device = device;
    eval::perplexity(&model, windows, &Progress::new("eval", true))
        .unwrap_or_else(|e| panic!("perplexity of {} on {device:?}: {e}", dir.display()))
        .ppl
}

fn check_ppl(dir: &Path, windows: &[Vec<u32>], what: &str) {
    let (cpu, dev) = (perplexity(dir, windows, Device::Cpu), perplexity(dir, windows, Device::Cuda));
    let rel = (dev / cpu - 1.0).abs();
    say(&format!("{what:<40} ppl cpu {cpu:.5} device {dev:.5} ({rel:.2e} relative)"));
    // Under the emulator only the NLL's exponentials differ (exact vs the CPU's polynomial).
    let tolerance = if cfg!(feature = "cuda-emu") { 1e-6 } else { PPL_TOLERANCE };
    assert!(rel <= tolerance, "{what}: perplexity cpu {cpu} device {dev}");
}

/// Quantizes `model` in each case on both devices and compares exports and perplexities.
/// `exclude`: modules NVFP4 cannot store (an input dim that is no multiple of 16).
fn pipeline(model: &Path, name: &str, vocab: u32, windows: &[Vec<u32>], nvfp4_exclude: &[&str], awq: &[&str]) {
    pipeline_with(model, name, vocab, Calib { rows: 3, len: 24 }, windows, nvfp4_exclude, awq);
}

/// [`pipeline`] with calibration `calib`. `awq`: the AWQ formats to run too (the emulator runs
/// their 11-candidate searches slowly, so the whole-model tests take one).
fn pipeline_with(
    model: &Path,
    name: &str,
    vocab: u32,
    calib: Calib,
    windows: &[Vec<u32>],
    nvfp4_exclude: &[&str],
    awq: &[&str],
) {
    let dir = scratch(name);
    let ids_file = dir.join("ids.json");
    write_ids(&ids_file, &ids(calib.rows, calib.len, vocab, 7));
    let started = std::time::Instant::now();
    check_ppl(model, windows, &format!("{name} unquantized"));
    let cases = [("fp8", "none"), ("nvfp4", "none"), ("int8_sq", "none"), ("fp8", "fp8")].into_iter();
    for (qformat, kv) in cases.chain(awq.iter().map(|&f| (f, "none"))) {
        let what = format!("{name} {qformat} kv {kv}");
        let (cpu, dev) = (dir.join(format!("{qformat}-{kv}-cpu")), dir.join(format!("{qformat}-{kv}-cuda")));
        let exclude = if qformat.starts_with("nvfp4") { nvfp4_exclude } else { &[] };
        quantize_on(model, &cpu, &ids_file, calib, (qformat, kv), "cpu", exclude);
        quantize_on(model, &dev, &ids_file, calib, (qformat, kv), "cuda", exclude);
        if qformat.ends_with("_awq") && !cfg!(feature = "cuda-emu") {
            // On a GPU the tensor cores sum the search's products in their own order, so a
            // near-tie between two alphas may go the other way: the exports are compared by
            // what they compute.
            let (c, d) = (perplexity(&cpu, windows, Device::Cpu), perplexity(&dev, windows, Device::Cpu));
            say(&format!("{what:<40} ppl of the cpu export {c:.5}, of the device export {d:.5}"));
            assert!((d / c - 1.0).abs() <= PPL_TOLERANCE, "{what}: perplexity cpu export {c} device export {d}");
        } else {
            let (n, worst, codes) = compare_exports(&cpu, &dev, &what, qformat == "int8_sq");
            say(&format!(
                "{what:<40} {n} tensors identical but scales (largest scale difference {worst:.2e}, {codes} INT8 codes one apart)"
            ));
        }
        check_ppl(&cpu, windows, &what);
    }
    say(&format!("{name}: {:.1}s", started.elapsed().as_secs_f64()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn families_llama_cpu_and_device_agree() {
    if !have_gpu() {
        return;
    }
    pipeline(&llama(), "families-llama", 512, &ids(2, 32, 512, 11), &[], &["int4_awq", "w4a8_awq", "nvfp4_awq"]);
}

#[test]
fn stories260k_cpu_and_device_agree() {
    if !have_gpu() {
        return;
    }
    let tok = rq_min::tokenizer::Tokenizer::from_dir(&stories()).unwrap();
    let text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. \
                One day, she saw a big red ball in the park. She ran to the ball and kicked it very hard. \
                The ball flew over the tree and into the pond. Lily was sad, but her friend Tom helped her.";
    let windows = eval::eval_windows(&tok.encode(text), 32);
    assert!(windows.len() >= 2, "the eval text is shorter than 2 windows of 32 tokens");
    // INT4 cannot store stories260K's 64-wide inputs: NVFP4 AWQ only.
    pipeline(&stories(), "stories260K", 512, &windows[..2], &["*down_proj*"], &["nvfp4_awq"]);
}

/// Every family of shared/reference/families the CPU path supports (tiny f32 models with each
/// family's features: biases, q/k norms, Gemma's offset norm, Phi3's fused projections,
/// Starcoder2's LayerNorm and plain MLP, Nemotron's relu2, sliding windows, MoE routing; the
/// second set's post-norms, soft caps, free attention scales, per-layer windows and RoPE
/// tables, NoPE layers and multipliers).
#[test]
fn every_family_cpu_and_device_agree() {
    if !have_gpu() {
        return;
    }
    let Some(shared) = common::shared_dir() else { return };
    for family in common::FAMILIES.into_iter().chain(["llama3-rope-scaling"]) {
        let model = shared.join("reference/families").join(family);
        pipeline(&model, family, 512, &ids(2, 32, 512, 11), &[], &["int4_awq"]);
    }
}

/// rq-tiny (the trained 14.5 M Llama, bf16, 8 layers), 4 x 64 calibration tokens, eval on two
/// windows of 64 tokens of the evaluation text.
#[test]
fn rq_tiny_cpu_and_device_agree() {
    if !have_gpu() {
        return;
    }
    let Some(shared) = common::shared_dir() else { return };
    let model = shared.join("models/rq-tiny");
    let tok = rq_min::tokenizer::Tokenizer::from_dir(&model).unwrap();
    let text = std::fs::read_to_string(shared.join("data/tinystories_eval.txt")).unwrap();
    let windows = eval::eval_windows(&tok.encode(&text.chars().take(4000).collect::<String>()), 64);
    assert!(windows.len() >= 2, "the eval text is shorter than 2 windows of 64 tokens");
    let vocab = Model::open(&model, None).unwrap().config.vocab_size as u32;
    pipeline_with(&model, "rq-tiny", vocab, Calib { rows: 4, len: 64 }, &windows[..2], &[], &["int4_awq"]);
}

/// Auto-quantize with `--device cuda` (its forward and calibrations on the device, the gradient
/// passes on the host): under the emulator the same scores, selection and export as on the CPU;
/// on a GPU (tensor-core sums) the same export or, where a near-tie went the other way, the same
/// perplexity within 0.1%.
#[test]
fn auto_quantize_on_the_device_matches_the_cpu() {
    if !have_gpu() {
        return;
    }
    let dir = scratch("autoq");
    let ids_file = dir.join("ids.json");
    write_ids(&ids_file, &ids(4, 24, 512, 5));
    let run = |device: &str| -> PathBuf {
        let out = dir.join(device);
        let a = QuantizeArgs {
            calib_ids: Some(ids_file.clone()),
            qformat: "nvfp4,fp8,int4_awq".into(),
            auto_bits: Some(7.5),
            score_size: 2,
            device: device.into(),
            no_eval: true,
            quiet: true,
            ..QuantizeArgs::new(&llama(), &out)
        };
        quantize(&a).unwrap_or_else(|e| panic!("auto-quantize on {device}: {e}"));
        out
    };
    let (cpu, dev) = (run("cpu"), run("cuda"));
    // The report without its timing line: scores, costs and the selection.
    let report = |d: &Path| -> String {
        let text = std::fs::read_to_string(d.join("auto_quantize.json")).unwrap();
        std::fs::remove_file(d.join("auto_quantize.json")).unwrap();
        text.lines().filter(|l| !l.contains("\"search_seconds\"")).collect::<Vec<_>>().join("\n")
    };
    let (rc, rd) = (report(&cpu), report(&dev));
    assert!(rc.contains("\"scores\""), "the report lists scores");
    if cfg!(feature = "cuda-emu") {
        assert_eq!(rc, rd, "auto_quantize.json differs between the devices");
        let (n, _, _) = compare_exports(&cpu, &dev, "auto-quantize", false);
        say(&format!("auto-quantize nvfp4,fp8,int4_awq at 7.5 bits: report and {n} tensors identical"));
    } else {
        let windows = ids(2, 32, 512, 11);
        let (c, d) = (perplexity(&cpu, &windows, Device::Cpu), perplexity(&dev, &windows, Device::Cpu));
        say(&format!("auto-quantize: ppl of the cpu export {c:.5}, of the device export {d:.5}"));
        assert!((d / c - 1.0).abs() <= PPL_TOLERANCE, "auto-quantize: perplexity cpu export {c} device export {d}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run whose estimate exceeds the device's free memory stops before any work with the
/// estimate in the error; `--dry-run` says it does not fit. The emulator plays an 8 MB GPU
/// (RQ_EMU_DEVICE_MEMORY, set for the child process only); on a GPU the test says it skips.
#[test]
fn a_run_the_device_cannot_hold_stops_before_any_work() {
    if !have_gpu() {
        return;
    }
    if !cfg!(feature = "cuda-emu") {
        say("skipped: needs the emulator's RQ_EMU_DEVICE_MEMORY to play a small GPU");
        return;
    }
    let dir = scratch("small-gpu");
    let out = dir.join("out");
    let ids_file = dir.join("ids.json");
    write_ids(&ids_file, &ids(64, 128, 512, 9));
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_rq-min"))
            .env("RQ_EMU_DEVICE_MEMORY", "8000000")
            .args(["quantize", "--model", llama().to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(["--calib-ids", ids_file.to_str().unwrap(), "--calib-size", "64"])
            .args(["--qformat", "int4_awq", "--device", "cuda", "--quiet"])
            .args(extra)
            .output()
            .unwrap()
    };
    // 64 x 128 x 128 f32 hidden states are 4 MiB, the AWQ candidates of a layer 6 MiB.
    let r = run(&["--no-eval"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "the run went on: {err}");
    for want in ["the run needs about", "7.6 MiB free", "AWQ search", "--calib-size"] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
    assert!(!err.contains("layer 1/"), "calibration started: {err}");
    assert!(!out.exists());
    let r = run(&["--dry-run", "--no-eval"]);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success() && text.contains("it does NOT fit") && text.contains("peak device memory"), "{text}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the device does not run yet is refused by name, before any work.
#[test]
fn device_refuses_what_it_does_not_run() {
    if !have_gpu() {
        return;
    }
    let dir = scratch("refuse");
    let ids_file = dir.join("ids.json");
    write_ids(&ids_file, &ids(2, 16, 512, 3));
    let refused = |qformat: &str, export: &str, expect: &str| {
        let out = dir.join("out");
        let a = QuantizeArgs {
            calib_ids: Some(ids_file.clone()),
            qformat: qformat.into(),
            export: export.into(),
            device: "cuda".into(),
            no_eval: true,
            quiet: true,
            ..QuantizeArgs::new(&llama(), &out)
        };
        let err = quantize(&a).unwrap_err().to_string();
        assert!(err.contains(expect) && err.contains("--device cpu"), "{qformat} {export}: {err}");
        assert!(!out.exists());
    };
    refused("fp8", "trtllm", "--export trtllm");
    refused("fp8", "compressed-tensors", "--export compressed-tensors");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device error is kept (sticky), later device steps are skipped without a panic, and
/// `take_device_error` reports it once, with the kernel's message; then the device works again.
#[test]
fn a_device_error_is_sticky_and_reported_once() {
    if !have_gpu() {
        return;
    }
    use rq_min::compute::{take_device_error, Tensor};
    take_device_error().unwrap();
    let x = Tensor::on(vec![1.0, -2.0, 3.0, 4.0, 5.0, 6.0], Device::Cuda);
    let w = Tensor::on(vec![1.0; 6], Device::Cuda);
    assert_eq!(x.device(), Device::Cuda);
    // x is [2, 3], not [2, 4]: the wrapper refuses the launch.
    let y = x.matmul_bt(&w, 2, 4, 3);
    assert_eq!(y.len(), 6);
    // Later steps are skipped: shapes stay, nothing panics.
    let mut z = x.matmul_bt(&w, 2, 3, 2);
    assert_eq!(z.len(), 4);
    let z2 = z.clone();
    z.add(&z2);
    z.round(rq_min::compute::Compute::Bf16);
    let _ = (z.amax(0.0), z.all_finite(), z.to_host().len());
    let err = take_device_error().unwrap_err().to_string();
    assert!(err.contains("rq_matmul_bt") && err.contains("x holds 6 values"), "{err}");
    take_device_error().unwrap();
    assert_eq!(x.amax(0.0), 6.0);
    assert_eq!(x.matmul_bt(&w, 2, 3, 2).to_host().as_ref(), &[2.0, 2.0, 15.0, 15.0]);
    take_device_error().unwrap();
}

/// `rq-min eval --device cuda` (the command) on a text file: runs, and a missing device is an
/// error, not a crash (checked here only where a device answers).
#[test]
fn eval_command_runs_on_the_device() {
    if !have_gpu() {
        return;
    }
    let dir = scratch("eval-cmd");
    let text = dir.join("text.txt");
    std::fs::write(&text, "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. \
                           One day, she saw a big red ball in the park. She ran to the ball and kicked it.").unwrap();
    let a = rq_min::cli::EvalArgs {
        model: stories(),
        text: Some(text),
        ids: None,
        logits: None,
        seq: 32,
        base: None,
        dtype: "f32".into(),
        device: "cuda".into(),
        quiet: true,
    };
    rq_min::cli::eval(&a).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
