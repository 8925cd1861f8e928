//! Where the arithmetic of the forward pass runs, and how it rounds.
//!
//! `cpu` holds the kernels on host slices: the reference every other backend is checked
//! against. `cuda` (feature `cuda`) holds the FFI wrappers of the kernels in cuda/.
//! `Compute` says how a forward pass rounds (f32, or bf16 where PyTorch materializes a bf16
//! tensor), `NormKind` and `Activation` which norm and activation a family uses, `Device`
//! which backend the command line asked for.

mod arith;
pub mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub mod cuda;
mod tensor;

pub use arith::{act_fn, Activation, Compute, NormKind};
pub use cpu::{Attention, Rope, RopeConfig, RopeScaling};
pub use tensor::Tensor;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl Device {
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            _ => Err(Error::Usage(format!("unknown --device '{s}'; supported: cpu, cuda"))),
        }
    }

    /// The quantize/eval pipeline runs on the CPU only in this version: say so clearly
    /// instead of silently falling back.
    pub fn require_cpu(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda if cfg!(any(feature = "cuda", feature = "cuda-emu")) => Err(Error::Unsupported(
                "--device cuda: this build has the CUDA kernels (see `cargo test --features cuda --test cuda`) \
                 but the quantize/eval pipeline runs on the CPU only so far; use --device cpu"
                    .into(),
            )),
            Device::Cuda => Err(Error::Unsupported(
                "--device cuda: this binary was built without the `cuda` feature \
                 (cargo build --release --features cuda)"
                    .into(),
            )),
        }
    }
}
