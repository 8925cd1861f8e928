//! rq-min: post-training quantization of Hugging Face LLM checkpoints, with the numbers of
//! NVIDIA ModelOpt 0.47 and no Python. See README.md for the commands and the formats.

pub mod error;
pub mod json;
pub mod numerics;
pub mod safetensors;
pub mod tokenizer;

pub use error::{Error, Result};
#[cfg(feature = "cuda")]
pub mod cuda;
