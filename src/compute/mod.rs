//! Where the arithmetic of the forward pass runs, and how it rounds.
//!
//! `cpu` holds the kernels on host slices: the reference every other backend is checked
//! against. `rope` holds the rotary tables (and their device copy) with the CPU rotation. `cuda` (feature `cuda`) holds the FFI wrappers of the kernels in cuda/.
//! `Compute` says how a forward pass rounds (f32, or bf16 where PyTorch materializes a bf16
//! tensor), `NormKind` and `Activation` which norm and activation a family uses, `Device`
//! which backend the command line asked for.

mod arith;
pub mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub mod cuda;
mod device;
mod rope;
mod tensor;

pub use arith::{act_fn, Activation, Compute, NormKind};
pub use cpu::{alibi_slopes, Alibi, Attention};
pub use rope::{Rope, RopeConfig, RopeScaling};
pub use device::{take_device_error, Device};
pub use tensor::{DeviceTwin, Tensor};
