//! CPU kernel throughput: `cargo bench --bench cpu`.
//!
//! Prints GFLOP/s (2·m·k·n flops per call, best of several runs) of the fast `matmul_bt`
//! against the naive triple loop, at Linear shapes of a small model (m = tokens), then the
//! causal attention of a Llama-3-8B layer. Threads: `RQ_THREADS`, else all available.

use rq_min::io::json::Json;
use rq_min::model::Model;
use rq_min::compute::cpu::{matmul_bt, matmul_bt_naive, num_threads, Attention};
use rq_min::ptq::progress::Progress;
use std::time::{Duration, Instant};

/// Shapes (m, k, n): square, the MLP up and down projections of a 4096-token batch of a
/// hidden-256 model, and a 32000-word LM head.
const SHAPES: [(usize, usize, usize); 4] = [(256, 256, 256), (4096, 256, 768), (4096, 768, 256), (256, 256, 32000)];

/// Deterministic values in [-1, 1) (no RNG dependency).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Best time of `f` over at least `min_runs` runs and about `budget` of wall time.
fn best_time(min_runs: usize, budget: Duration, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    let mut best = Duration::MAX;
    let mut runs = 0;
    while runs < min_runs || start.elapsed() < budget {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
        runs += 1;
    }
    best
}

fn main() {
    println!("matmul_bt, out[m×n] = x[m×k] · w[n×k]ᵀ, {} threads, best of several runs", num_threads());
    println!("{:>20} {:>12} {:>12} {:>9}", "m × k × n", "fast GFLOP/s", "naive GFLOP/s", "speed-up");
    for (m, k, n) in SHAPES {
        let (x, w) = (values(m * k, 1), values(n * k, 2));
        let mut out = vec![0f32; m * n];
        let flops = 2.0 * (m * k * n) as f64;
        let fast = best_time(5, Duration::from_secs(2), || matmul_bt(&x, &w, m, k, n, &mut out));
        let naive = best_time(1, Duration::ZERO, || matmul_bt_naive(&x, &w, m, k, n, &mut out));
        let (gf_fast, gf_naive) = (flops / fast.as_secs_f64() / 1e9, flops / naive.as_secs_f64() / 1e9);
        println!(
            "{:>20} {:>12.1} {:>12.2} {:>8.0}×",
            format!("{m} × {k} × {n}"),
            gf_fast,
            gf_naive,
            gf_fast / gf_naive
        );
    }

    // Attention: 32 query heads, 8 kv heads of 128; 2·2·(seq²/2)·4096 flops (causal half).
    let a = Attention { n_heads: 32, n_kv_heads: 8, head_dim: 128, sliding_window: None, scale: Attention::default_scale(128), softcap: None, flash_bf16: false, alibi: None };
    println!("\ncausal attention, 32 heads / 8 kv heads × 128");
    println!("{:>20} {:>12} {:>12}", "seq", "GFLOP/s", "ms");
    for seq in [256, 2048] {
        let (q, k, v) = (values(seq * 4096, 3), values(seq * 1024, 4), values(seq * 1024, 5));
        let mut out = vec![0f32; seq * 4096];
        let t = best_time(3, Duration::from_secs(1), || a.forward(&q, &k, &v, seq, &mut out));
        let flops = 2.0 * 2.0 * (seq * seq / 2) as f64 * 4096.0;
        println!("{:>20} {:>12.1} {:>12.1}", seq, flops / t.as_secs_f64() / 1e9, t.as_secs_f64() * 1e3);
    }
    pipeline();
}

/// End to end on rq-tiny (../shared/models/rq-tiny) with the reference 64 x 256 calibration ids.
fn pipeline() {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    let model_dir = shared.join("models/rq-tiny");
    let ids = shared.join("reference/modelopt-0.47/rq-tiny/calib_ids.json");
    if !model_dir.exists() {
        println!("\nrq-tiny pipeline: skipped ({} not found)", model_dir.display());
        return;
    }
    let quiet = Progress::new("bench", true);
    let samples = rq_min::ptq::calib::ids_file(&ids).expect("calib ids");
    let tokens: usize = samples.iter().map(Vec::len).sum();
    println!("\nrq-tiny (14.5 M params), {} x {} calibration tokens, end to end (load, calibrate, quantize, export)", samples.len(), samples[0].len());
    println!("{:>34} {:>10} {:>12} {:>10}  {}", "format", "seconds", "tokens/s", "target s", "auto-quantize search");
    let out = std::env::temp_dir().join(format!("rq-min-bench-{}", std::process::id()));
    let mut nvfp4_seconds = f64::NAN;
    for (qformat, kv, auto, target) in [
        ("fp8", "none", None, 10),
        ("int8_sq", "none", None, 10),
        ("nvfp4", "none", None, 10),
        ("fp8", "fp8", None, 10),
        ("int4_awq", "none", None, 60),
        ("w4a8_awq", "none", None, 60),
        ("nvfp4_awq", "none", None, 60),
        ("nvfp4,fp8", "none", Some(5.0), 0),
        ("int4_awq,int8_sq,fp8", "none", Some(7.0), 0),
    ] {
        let t = Instant::now();
        rq_min::cli::quantize(&rq_min::cli::QuantizeArgs {
            qformat: qformat.into(),
            calib_ids: Some(ids.clone()),
            calib_size: 64,
            calib_seq: Some(256),
            kv_cache: kv.into(),
            auto_bits: auto,
            exclude: if auto.is_some() { vec!["none".into()] } else { vec![] },
            no_eval: true,
            force: true,
            quiet: true,
            ..rq_min::cli::QuantizeArgs::new(&model_dir, &out)
        })
        .expect("quantize");
        let s = t.elapsed().as_secs_f64();
        let label = match (kv, auto) {
            (_, Some(bits)) => format!("auto {bits} bits ({qformat}, lm_head too)"),
            ("fp8", _) => format!("{qformat} + fp8 kv"),
            _ => qformat.to_string(),
        };
        let target = if target == 0 { "-".to_string() } else { target.to_string() };
        if qformat == "nvfp4" {
            nvfp4_seconds = s;
        }
        // The search alone, and against a plain NVFP4 quantization (issue target: <= 3x).
        let search = match auto {
            Some(_) => {
                let report = Json::parse_file(&out.join("auto_quantize.json")).expect("auto_quantize.json");
                let t = report.get("search_seconds").and_then(Json::as_f64).expect("search_seconds");
                format!("{t:.2} s = {:.1}x nvfp4", t / nvfp4_seconds)
            }
            None => String::new(),
        };
        println!("{:>34} {:>10.2} {:>12.0} {:>10}  {}", label, s, tokens as f64 / s, target, search);
    }
    let model = Model::open(&model_dir, None).expect("open rq-tiny");
    let tok = rq_min::tokenizer::Tokenizer::from_dir(&model_dir).expect("tokenizer");
    let windows = rq_min::ptq::eval::eval_windows(&tok.encode(rq_min::ptq::calib::DEFAULT_EVAL_TEXT), 256);
    let t = Instant::now();
    let p = rq_min::ptq::eval::perplexity(&model, &windows, &quiet).expect("eval");
    let s = t.elapsed().as_secs_f64();
    println!("{:>34} {:>10.2} {:>12.0}", format!("perplexity eval (ppl {:.2})", p.ppl), s, (windows.len() * 256) as f64 / s);
    let _ = std::fs::remove_dir_all(out);
}
