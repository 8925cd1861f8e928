//! `Device`: which backend the command line asked for and whether this binary can run it, and
//! the per-thread sticky device error through which the infallible `Tensor` methods report a
//! failed device step.

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

    /// Whether this binary can run the pipeline on this device: the CPU always; CUDA when it
    /// was built with the `cuda` (or `cuda-emu`) feature and a device answers
    /// ([`cuda::device_info`]). Otherwise a clear error, never a crash.
    pub fn check_available(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Device::Cuda => crate::compute::cuda::device_info().map(|_| ()).map_err(|e| match e {
                Error::Unsupported(why) => Error::Unsupported(format!("--device cuda: {why}; use --device cpu")),
                other => other,
            }),
            #[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
            Device::Cuda => Err(Error::Unsupported(
                "--device cuda: this binary was built without the `cuda` feature \
                 (cargo build --release --features cuda)"
                    .into(),
            )),
        }
    }
}

impl Device {
    /// (free, total) bytes of the device's memory; None for the CPU.
    pub fn memory(self) -> Result<Option<(u64, u64)>> {
        match self {
            Device::Cpu => Ok(None),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Device::Cuda => crate::compute::cuda::memory_info().map(Some),
            #[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
            Device::Cuda => self.check_available().map(|()| None),
        }
    }
}

thread_local! {
    /// The first device error of this thread since the last [`take_device_error`] (sticky, as
    /// CUDA's): `Tensor` methods are infallible, so they record it here and skip later
    /// device steps.
    static DEVICE_ERROR: std::cell::RefCell<Option<Error>> = const { std::cell::RefCell::new(None) };
}

/// Records `e` unless an earlier device error is pending.
pub(crate) fn record_device_error(e: Error) {
    DEVICE_ERROR.with(|d| {
        d.borrow_mut().get_or_insert(e);
    });
}

/// Whether a device error is pending (device steps are then skipped).
#[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(dead_code))]
pub(crate) fn device_failed() -> bool {
    DEVICE_ERROR.with(|d| d.borrow().is_some())
}

/// The pending device error of this thread, if any, as an `Err` (and clears it). The layer
/// loops call it after each layer, so a device failure surfaces with CUDA's message instead
/// of as wrong numbers.
pub fn take_device_error() -> Result<()> {
    // Kernels queue without waiting (cuda.rs `launched`): wait here, so a failure among them
    // is reported now.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    if !device_failed() {
        if let Err(e) = crate::compute::cuda::synchronize() {
            record_device_error(e);
        }
    }
    match DEVICE_ERROR.with(|d| d.borrow_mut().take()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
