//! The checkpoints rq-min writes, and the checks that read them back: ModelOpt's unified HF
//! layout (`unified`, which the PTQ driver streams into layer by layer), the compressed-tensors
//! conversion of it (vLLM, transformers), TensorRT-LLM rank folders and `.qnemo` (`trtllm`), and
//! `verify` (what a loader would check in each of them).

pub mod compressed_tensors;
pub mod trtllm;
pub mod unified;
pub mod verify;
