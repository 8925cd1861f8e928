//! rq-min: post-training quantization of Hugging Face LLM checkpoints, with the numbers of
//! NVIDIA ModelOpt 0.47 and no Python. See README.md for the commands and the formats.
//!
//! Layers, bottom up: `numerics` (number formats), `json`, `safetensors`, `tokenizer`;
//! `ops` (CPU kernels), `config` + `model` (layer-at-a-time Llama runtime); `quant` (formats
//! and their math), `calib` (calibration input), `pipeline` (calibration and perplexity
//! passes), `export` (ModelOpt's unified HF checkpoint); `cli` (the subcommands).

pub mod autoquant;
pub mod backend;
pub mod backward;
pub mod calib;
pub mod cli;
pub mod config;
pub mod error;
pub mod export;
pub mod export_ct;
pub mod export_trtllm;
pub mod inspect;
pub mod json;
pub mod model;
pub mod moe;
pub mod numerics;
pub mod ops;
pub mod pipeline;
pub mod progress;
pub mod quant;
pub mod quantize;
pub mod safetensors;
pub mod say;
pub mod tar_gz;
pub mod tmp;
pub mod tokenizer;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use error::{Error, Result};
