//! rq-min: post-training quantization of Hugging Face LLM checkpoints, with the numbers of
//! NVIDIA ModelOpt 0.47 and no Python. See README.md for the commands, the formats and the
//! architecture.
//!
//! The modules are the pipeline, bottom up; each uses only those listed before it
//! (`tools/check_deps.py` enforces it):
//! - `error`, `numerics`: the one error type; bf16 / f16 / FP8 / FP4 scalar conversions.
//! - `io`: JSON, safetensors, tar + gzip.
//! - `compute`: where the arithmetic runs: `Tensor` with CPU (and CUDA) storage, the ops a
//!   decoder layer needs and the statistics calibration takes.
//! - `tokenizer`: BPE from tokenizer.json.
//! - `quant`: each format's math (FP8, INT4/INT8, NVFP4, SmoothQuant, AWQ): no model, no files.
//! - `model`: the family table, the layer-at-a-time runtime written once against `compute`,
//!   and the dense-weight reader (plain or dequantizing an export).
//! - `export`: unified HF, compressed-tensors, TensorRT-LLM / .qnemo writers, and `verify`.
//! - `ptq`: calibration, the layer-by-layer PTQ driver, auto-quantize, perplexity.
//! - `cli`: the subcommands.

pub mod error;
pub mod numerics;

pub mod io;

pub mod compute;

pub mod tokenizer;

pub mod quant;

pub mod model;

pub mod export;

pub mod ptq;

pub mod cli;

pub use error::{Error, Result};
