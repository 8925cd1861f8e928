//! Post-training quantization, one decoder layer at a time: calibration input (`calib`), the
//! PTQ driver (`quantize`: statistics, SmoothQuant / AWQ-lite, export-time fusion), the
//! auto-quantize search (`autoquant`, with the gradients of `backward`), perplexity (`eval`)
//! the memory a run will need (`memory`) and the progress lines of long runs.

pub mod autoquant;
pub mod backward;
pub mod calib;
pub mod eval;
pub mod memory;
pub mod progress;
pub mod quantize;
