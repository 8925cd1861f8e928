//! The compute device seam. The CPU path (src/ops, src/model) is the reference; the CUDA
//! kernels (cuda/, `--features cuda`) are checked against it and will take over the same
//! layer-by-layer pipeline.

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
            Device::Cuda if cfg!(feature = "cuda") => Err(Error::Unsupported(
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
