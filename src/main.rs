//! The `rq-min` command: quantize, eval, inspect, verify, synth.

use argh::FromArgs;
use rq_min::{cli, err, out};
use std::path::PathBuf;
use std::process::ExitCode;

/// rq-min: post-training quantization of Hugging Face LLM checkpoints, ModelOpt-compatible.
#[derive(FromArgs)]
struct Args {
    #[argh(subcommand)]
    cmd: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Quantize(Quantize),
    Eval(Eval),
    Inspect(Inspect),
    Verify(Verify),
    Synth(Synth),
}

/// Write a random-weight Hugging Face checkpoint of a real model's shape (bf16, sharded
/// safetensors, config.json, a stand-in byte-level tokenizer) for benchmarking.
#[derive(FromArgs)]
#[argh(subcommand, name = "synth")]
struct Synth {
    /// llama3-8b (Llama 3.1 8B), llama3-1b (Llama 3.2 1B), llama3-70b (Llama 3.1 70B) or
    /// qwen3-30b-a3b (Qwen3-30B-A3B)
    #[argh(option)]
    shape: String,
    /// output folder (written via a temporary folder beside it, renamed at the end)
    #[argh(option)]
    out: PathBuf,
    /// number of decoder layers (default: the model's own), for small checkpoints of a real width
    #[argh(option)]
    layers: Option<usize>,
    /// seed of the random weights (default 1234); the same seed gives the same bytes
    #[argh(option, default = "rq_min::cli::synth::DEFAULT_SEED")]
    seed: u64,
    /// replace --out if it exists
    #[argh(switch)]
    force: bool,
    /// no progress output on stderr
    #[argh(switch)]
    quiet: bool,
}

/// Check a quantized checkpoint as a loader would (config vs tensors, scales, packed sizes);
/// with --original, also every linear's dequantized weight error. Non-zero exit on a finding.
#[derive(FromArgs)]
#[argh(subcommand, name = "verify")]
struct Verify {
    /// the quantized checkpoint folder (unified HF or TensorRT-LLM), or a .qnemo file
    #[argh(positional)]
    path: PathBuf,
    /// the unquantized model it was made from
    #[argh(option)]
    original: Option<PathBuf>,
}

/// Quantize a checkpoint and export it in ModelOpt's unified HF layout (or TensorRT-LLM's,
/// compressed-tensors').
#[derive(FromArgs)]
#[argh(subcommand, name = "quantize")]
struct Quantize {
    /// input Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)
    #[argh(option)]
    model: PathBuf,
    /// output folder (written via a temporary folder beside it, renamed at the end)
    #[argh(option)]
    out: PathBuf,
    /// format (ModelOpt config): fp8 = FP8 E4M3 per-tensor weights and activations (FP8_DEFAULT_CFG);
    /// int8_sq = INT8 SmoothQuant W8A8 (INT8_SMOOTHQUANT_CFG); int4_awq = INT4 weights, group 128,
    /// AWQ-lite (INT4_AWQ_CFG); w4a8_awq = INT4 AWQ weights + FP8 activations (W4A8_AWQ_BETA_CFG);
    /// nvfp4 = NVFP4 weights and activations, blocks of 16 (NVFP4_DEFAULT_CFG); nvfp4_awq = NVFP4
    /// with AWQ-lite scales (NVFP4_AWQ_LITE_CFG); none = unquantized (--export trtllm only)
    #[argh(option, default = "String::from(\"fp8\")")]
    qformat: String,
    /// KV-cache quantization: none (default) or fp8 (k_scale / v_scale from K, V after RoPE)
    #[argh(option, default = "String::from(\"none\")")]
    kv_cache: String,
    /// auto-quantize: choose a format per layer group among the --qformat list (e.g. nvfp4,fp8)
    /// or 16-bit so the effective bits per parameter meet this budget (ModelOpt auto_quantize)
    #[argh(option)]
    auto_bits: Option<f64>,
    /// auto-quantize: calibration rows the sensitivity scores are computed on (default 64)
    #[argh(option, default = "64")]
    score_size: usize,
    /// auto-quantize: seed of the choice of score rows (default 1234, ModelOpt's)
    #[argh(option, default = "1234")]
    seed: u64,
    /// JSON object module -> format (fp8, nvfp4, ..., none) pinning each layer's format by hand;
    /// replaces --qformat / --exclude (modules not listed stay unquantized)
    #[argh(option)]
    layer_formats: Option<PathBuf>,
    /// smoothQuant migration strength alpha for int8_sq (default 1.0, ModelOpt's default)
    #[argh(option, default = "1.0")]
    sq_alpha: f32,
    /// calibration text: plain text (encoded whole, cut into rows) or .jsonl with a "text" field
    #[argh(option)]
    calib_text: Option<PathBuf>,
    /// calibration token ids: a JSON array of arrays (exact reproduction of another run)
    #[argh(option)]
    calib_ids: Option<PathBuf>,
    /// number of calibration rows (default 128)
    #[argh(option, default = "128")]
    calib_size: usize,
    /// tokens per calibration row (default 512, or the model's max_position_embeddings when
    /// smaller; at most max_position_embeddings)
    #[argh(option)]
    calib_seq: Option<usize>,
    /// extra modules to leave unquantized: comma-separated fnmatch patterns (repeatable)
    #[argh(option)]
    exclude: Vec<String>,
    /// evaluation text for the before/after perplexity (default: the built-in Rust docs text)
    #[argh(option)]
    eval_text: Option<PathBuf>,
    /// tokens per perplexity window (default 256)
    #[argh(option, default = "256")]
    eval_seq: usize,
    /// skip the before/after perplexity
    #[argh(switch)]
    no_eval: bool,
    /// replace --out if it exists
    #[argh(switch)]
    force: bool,
    /// compute device: cpu (default) or cuda
    #[argh(option, default = "String::from(\"cpu\")")]
    device: String,
    /// no progress output on stderr
    #[argh(switch)]
    quiet: bool,
    /// checkpoint layout: hf (default; ModelOpt unified Hugging Face), trtllm (TensorRT-LLM
    /// checkpoint: config.json + rank{r}.safetensors), qnemo (NeMo's .qnemo: that checkpoint
    /// and the tokenizer as a .tar.gz file) or compressed-tensors (vLLM / transformers; fp8,
    /// int8_sq, int4_awq, nvfp4, nvfp4_awq; smoothing only where it folds into a neighbour)
    #[argh(option, default = "String::from(\"hf\")")]
    export: String,
    /// tensor-parallel size of --export trtllm/qnemo (default 1)
    #[argh(option, default = "1")]
    tp: usize,
    /// pipeline-parallel size of --export trtllm/qnemo (default 1)
    #[argh(option, default = "1")]
    pp: usize,
    /// an --exclude pattern or --layer-formats module that matches no module of the model is
    /// an error (default: a warning naming the closest module names)
    #[argh(switch)]
    strict: bool,
    /// leave unquantized (in the model dtype) the linears whose shape the format cannot store
    /// (NVFP4: input dim a multiple of 16; INT4: of 128, output dim even) instead of refusing
    #[argh(switch)]
    auto_exclude: bool,
    /// print the peak device and host memory the run will need (and whether the GPU has it),
    /// then stop: nothing is calibrated or written
    #[argh(switch)]
    dry_run: bool,
}

/// Perplexity of a checkpoint (original, rq-min or ModelOpt FP8 export) on a text.
#[derive(FromArgs)]
#[argh(subcommand, name = "eval")]
struct Eval {
    /// checkpoint folder
    #[argh(option)]
    model: PathBuf,
    /// text file to score (default: the built-in Rust docs evaluation text)
    #[argh(option)]
    text: Option<PathBuf>,
    /// token ids to score instead of text (no tokenizer needed): a JSON array of rows of ids,
    /// each row one window (--seq does not apply)
    #[argh(option)]
    ids: Option<PathBuf>,
    /// write the f32 logits to this .safetensors file (tensor `logits`, [rows, seq, vocab]; rows
    /// of one length)
    #[argh(option)]
    logits: Option<PathBuf>,
    /// tokens per window (default 256)
    #[argh(option, default = "256")]
    seq: usize,
    /// folder to take tensors missing from --model from (e.g. embed_tokens of a trimmed export)
    #[argh(option)]
    base: Option<PathBuf>,
    /// compute precision: f32 (default) or bf16 (rounds like PyTorch running the model in bf16)
    #[argh(option, default = "String::from(\"f32\")")]
    dtype: String,
    /// compute device: cpu (default) or cuda
    #[argh(option, default = "String::from(\"cpu\")")]
    device: String,
    /// no progress output on stderr
    #[argh(switch)]
    quiet: bool,
}

/// Show the tensors (name, dtype, shape, bytes) and config summary of a file or folder.
#[derive(FromArgs)]
#[argh(subcommand, name = "inspect")]
struct Inspect {
    /// a .safetensors file or a checkpoint folder
    #[argh(positional)]
    path: PathBuf,
}

/// The command line, parsed as `argh::from_env` does but printing `--help` and usage errors
/// with `out!` / `err!`, so a closed stdout or stderr cannot make it panic.
fn parse_args() -> Result<Args, ExitCode> {
    let strings = std::env::args_os().map(|a| a.into_string()).collect::<Result<Vec<String>, _>>().map_err(|a| {
        err!("rq-min: error: argument {} is not valid UTF-8", a.to_string_lossy());
        ExitCode::FAILURE
    })?;
    let cmd = strings.first().and_then(|s| std::path::Path::new(s).file_name()).map_or("rq-min".into(), |n| n.to_string_lossy());
    let rest: Vec<&str> = strings.iter().skip(1).map(|s| s.as_str()).collect();
    Args::from_args(&[&cmd], &rest).map_err(|early| match early.status {
        Ok(()) => {
            out!("{}", early.output);
            ExitCode::SUCCESS
        }
        Err(()) => {
            err!("{}\nRun {cmd} --help for more information.", early.output);
            ExitCode::FAILURE
        }
    })
}

fn main() -> ExitCode {
    rq_min::io::say::ensure_std_fds();
    rq_min::io::signal::install();
    let args = match parse_args() {
        Ok(a) => a,
        Err(code) => return code,
    };
    let result = match args.cmd {
        Command::Quantize(q) => cli::quantize(&cli::QuantizeArgs {
            model: q.model,
            out: q.out,
            qformat: q.qformat,
            calib_text: q.calib_text,
            calib_ids: q.calib_ids,
            calib_size: q.calib_size,
            calib_seq: q.calib_seq,
            exclude: q.exclude,
            kv_cache: q.kv_cache,
            sq_alpha: q.sq_alpha,
            layer_formats: q.layer_formats,
            auto_bits: q.auto_bits,
            score_size: q.score_size,
            seed: q.seed,
            eval_text: q.eval_text,
            eval_seq: q.eval_seq,
            no_eval: q.no_eval,
            force: q.force,
            device: q.device,
            quiet: q.quiet,
            export: q.export,
            tp: q.tp,
            pp: q.pp,
            strict: q.strict,
            auto_exclude: q.auto_exclude,
            dry_run: q.dry_run,
        }),
        Command::Eval(e) => cli::eval(&cli::EvalArgs {
            model: e.model,
            text: e.text,
            ids: e.ids,
            logits: e.logits,
            seq: e.seq,
            base: e.base,
            dtype: e.dtype,
            device: e.device,
            quiet: e.quiet,
        }),
        Command::Inspect(i) => cli::inspect(&i.path),
        Command::Verify(v) => cli::verify(&v.path, v.original.as_deref()),
        Command::Synth(s) => cli::synth(&cli::SynthArgs {
            shape: s.shape,
            out: s.out,
            layers: s.layers,
            seed: s.seed,
            force: s.force,
            quiet: s.quiet,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            err!("rq-min: error: {e}");
            match e {
                rq_min::Error::Interrupted(sig) => ExitCode::from(128u8.saturating_add(sig as u8)),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
