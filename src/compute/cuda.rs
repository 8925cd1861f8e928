//! CUDA path (feature `cuda`): a safe wrapper over the kernels of `cuda/*.cu`, whose C ABI is
//! `ffi/rq_cuda.h`. Each kernel is the twin of CPU code in [`crate::numerics`] and gives
//! bit-identical results (`tests/cuda.rs`).
//!
//! The CUDA runtime is linked statically and loads the driver at first use, so a binary built
//! with this feature runs on a machine without a driver or GPU: there, [`device_info`] and
//! every function here return [`Error::Unsupported`] instead of crashing.
//!
//! Kernels run on the default stream; each function here waits for its kernel, so an error
//! of the kernel is reported by the call that launched it, naming the kernel and the element
//! count.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::marker::PhantomData;

use bytemuck::Pod;

use crate::error::{Error, Result};

mod ffi {
    include!(concat!(env!("OUT_DIR"), "/rq_cuda.rs"));
}

/// cudaErrorInsufficientDriver.
const CUDA_ERROR_INSUFFICIENT_DRIVER: c_int = 35;

/// CUDA's description of a status returned by an `rq_` function.
fn error_string(status: c_int) -> String {
    // SAFETY: rq_error_string returns a static NUL-terminated string for every status.
    unsafe { CStr::from_ptr(ffi::rq_error_string(status)) }.to_string_lossy().into_owned()
}

/// Ok for status 0, else an error naming `what` failed, with CUDA's description.
fn check(status: c_int, what: impl FnOnce() -> String) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    Err(Error::Unsupported(format!("CUDA {}: {} (cudaError {status})", what(), error_string(status))))
}

/// Prefixes a CUDA error with the kernel it happened for and the element count.
fn in_kernel<T>(kernel: &str, n: usize, result: Result<T>) -> Result<T> {
    result.map_err(|e| match e {
        Error::Unsupported(msg) => Error::Unsupported(format!("{kernel} on {n} elements: {msg}")),
        other => other,
    })
}

/// Checks a launcher's status, then waits for the kernel and checks how it ended.
fn launched(kernel: &str, n: usize, status: c_int) -> Result<()> {
    check(status, || format!("{kernel} on {n} elements: launch"))?;
    // SAFETY: no arguments; waits for the work queued so far.
    check(unsafe { ffi::rq_synchronize() }, || format!("{kernel} on {n} elements: kernel"))
}

/// The CUDA devices, as "N CUDA device(s): 0: <name> (sm_XY), ...", or
/// `Error::Unsupported("no CUDA device: <reason>")` where there is no driver or no GPU.
pub fn device_info() -> Result<String> {
    let mut count: c_int = 0;
    // SAFETY: `count` is a valid host int.
    let status = unsafe { ffi::rq_device_count(&mut count) };
    if status != 0 {
        // cudart_static reports a missing libcuda.so.1 as an old driver.
        let hint = if status == CUDA_ERROR_INSUFFICIENT_DRIVER {
            " (no NVIDIA driver found: libcuda.so.1 missing, or older than CUDA 13.0 needs)"
        } else {
            ""
        };
        return Err(Error::Unsupported(format!("no CUDA device: {}{hint}", error_string(status))));
    }
    if count == 0 {
        return Err(Error::Unsupported("no CUDA device: the driver reports none".into()));
    }
    let mut devices = Vec::new();
    for device in 0..count {
        let mut name: [c_char; 256] = [0; 256];
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: `name` holds `name.len()` bytes (the callee NUL-terminates within them);
        // `major` and `minor` are valid host ints.
        let status =
            unsafe { ffi::rq_device_props(device, name.as_mut_ptr(), name.len(), &mut major, &mut minor) };
        check(status, || format!("properties of device {device}"))?;
        // SAFETY: NUL-terminated by rq_device_props.
        let name = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy();
        devices.push(format!("{device}: {name} (sm_{major}{minor})"));
    }
    Ok(format!("{count} CUDA device(s): {}", devices.join(", ")))
}

/// `len` values of `T` in device memory, freed on drop. Contents start uninitialized
/// ([`DeviceBuffer::alloc`]) or copied from the host ([`DeviceBuffer::from_slice`]).
pub struct DeviceBuffer<T: Pod> {
    /// Null when `len` is 0 (nothing is allocated).
    ptr: *mut c_void,
    len: usize,
    _values: PhantomData<T>,
}

impl<T: Pod> DeviceBuffer<T> {
    /// Device memory for `len` values, not initialized.
    pub fn alloc(len: usize) -> Result<Self> {
        let mut ptr = std::ptr::null_mut();
        if len > 0 {
            let bytes = len.checked_mul(size_of::<T>()).ok_or_else(|| {
                Error::Unsupported(format!("CUDA allocation of {len} x {} bytes overflows", size_of::<T>()))
            })?;
            // SAFETY: `ptr` is a valid host location for the device pointer.
            check(unsafe { ffi::rq_malloc(&mut ptr, bytes) }, || format!("cudaMalloc of {bytes} bytes"))?;
        }
        Ok(DeviceBuffer { ptr, len, _values: PhantomData })
    }

    /// Device memory holding a copy of `host`.
    pub fn from_slice(host: &[T]) -> Result<Self> {
        let mut buffer = Self::alloc(host.len())?;
        buffer.copy_from_slice(host)?;
        Ok(buffer)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Overwrites the whole buffer with `host`, which must have the same length.
    pub fn copy_from_slice(&mut self, host: &[T]) -> Result<()> {
        self.check_len(host.len())?;
        if self.len == 0 {
            return Ok(());
        }
        let bytes = size_of_val(host);
        // SAFETY: `self.ptr` holds `bytes` bytes of device memory, `host` as many on the host.
        let status = unsafe { ffi::rq_memcpy_htod(self.ptr, host.as_ptr().cast(), bytes) };
        check(status, || format!("copy of {bytes} bytes to the device"))
    }

    /// Copies the whole buffer into `host`, which must have the same length.
    pub fn copy_to_slice(&self, host: &mut [T]) -> Result<()> {
        self.check_len(host.len())?;
        if self.len == 0 {
            return Ok(());
        }
        let bytes = size_of_val(host);
        // SAFETY: as in copy_from_slice; any bytes are a valid `T` (`T: Pod`).
        let status = unsafe { ffi::rq_memcpy_dtoh(host.as_mut_ptr().cast(), self.ptr, bytes) };
        check(status, || format!("copy of {bytes} bytes from the device"))
    }

    /// The contents, copied to the host.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut host = vec![T::zeroed(); self.len];
        self.copy_to_slice(&mut host)?;
        Ok(host)
    }

    fn check_len(&self, host_len: usize) -> Result<()> {
        if host_len != self.len {
            return Err(Error::Usage(format!(
                "copy between a device buffer of {} values and a host slice of {host_len}",
                self.len
            )));
        }
        Ok(())
    }

    fn as_ptr(&self) -> *const T {
        self.ptr.cast()
    }

    fn as_mut_ptr(&mut self) -> *mut T {
        self.ptr.cast()
    }
}

impl<T: Pod> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated by rq_malloc and freed only here. A failure (the device is
            // already gone) leaves nothing to do.
            unsafe { ffi::rq_free(self.ptr) };
        }
    }
}

/// `Error::Usage` unless a kernel's output buffer holds `want` values.
fn check_out_len(kernel: &str, what: &str, have: usize, want: usize) -> Result<()> {
    if have != want {
        return Err(Error::Usage(format!("{kernel} on {want} elements: {what} holds {have} values")));
    }
    Ok(())
}

/// `out[0]` = max |x| (bits identical to the CPU's; NaN if any x is NaN, 0 for no values).
pub fn absmax_f32_device(x: &DeviceBuffer<f32>, out: &mut DeviceBuffer<f32>) -> Result<()> {
    check_out_len("rq_absmax_f32", "the amax buffer", out.len, 1)?;
    // SAFETY: `x` holds x.len floats and `out` one, both device memory.
    launched("rq_absmax_f32", x.len, unsafe { ffi::rq_absmax_f32(x.as_ptr(), x.len, out.as_mut_ptr()) })
}

/// [`absmax_f32_device`] on bf16 storage.
pub fn absmax_bf16_device(x: &DeviceBuffer<u16>, out: &mut DeviceBuffer<f32>) -> Result<()> {
    check_out_len("rq_absmax_bf16", "the amax buffer", out.len, 1)?;
    // SAFETY: `x` holds x.len bf16 values and `out` one float, both device memory.
    launched("rq_absmax_bf16", x.len, unsafe { ffi::rq_absmax_bf16(x.as_ptr(), x.len, out.as_mut_ptr()) })
}

/// ModelOpt's FP8 weight export: `out[i] = f32_to_e4m3(bf16(bf16(w[i]) / bf16(scale)))`, the
/// quotient rounded to bf16 as in PyTorch's bf16 division.
pub fn quantize_fp8_bf16_device(w: &DeviceBuffer<u16>, scale: f32, out: &mut DeviceBuffer<u8>) -> Result<()> {
    check_out_len("rq_quantize_fp8_bf16", "the code buffer", out.len, w.len)?;
    // SAFETY: `w` and `out` hold w.len values each, in device memory.
    let status = unsafe { ffi::rq_quantize_fp8_bf16(w.as_ptr(), w.len, scale, out.as_mut_ptr()) };
    launched("rq_quantize_fp8_bf16", w.len, status)
}

/// ModelOpt's FP8 fake quant in place: s = 448 / amax, `x = e4m3_to_f32(f32_to_e4m3(x * s)) * (1 / s)`.
pub fn fake_quant_fp8_device(x: &mut DeviceBuffer<f32>, amax: f32) -> Result<()> {
    // SAFETY: `x` holds x.len floats of device memory.
    launched("rq_fake_quant_fp8_f32", x.len, unsafe {
        ffi::rq_fake_quant_fp8_f32(x.as_mut_ptr(), x.len, amax)
    })
}

/// max |x| on the GPU; see [`absmax_f32_device`].
pub fn absmax_f32(x: &[f32]) -> Result<f32> {
    let (kernel, n) = ("rq_absmax_f32", x.len());
    let x = in_kernel(kernel, n, DeviceBuffer::from_slice(x))?;
    let mut amax = in_kernel(kernel, n, DeviceBuffer::alloc(1))?;
    absmax_f32_device(&x, &mut amax)?;
    Ok(in_kernel(kernel, n, amax.to_vec())?[0])
}

/// max |x| of bf16 values on the GPU; see [`absmax_f32_device`].
pub fn absmax_bf16(x: &[u16]) -> Result<f32> {
    let (kernel, n) = ("rq_absmax_bf16", x.len());
    let x = in_kernel(kernel, n, DeviceBuffer::from_slice(x))?;
    let mut amax = in_kernel(kernel, n, DeviceBuffer::alloc(1))?;
    absmax_bf16_device(&x, &mut amax)?;
    Ok(in_kernel(kernel, n, amax.to_vec())?[0])
}

/// E4M3 codes of bf16 weights on the GPU; see [`quantize_fp8_bf16_device`].
pub fn quantize_fp8_bf16(w: &[u16], scale: f32) -> Result<Vec<u8>> {
    let (kernel, n) = ("rq_quantize_fp8_bf16", w.len());
    let w = in_kernel(kernel, n, DeviceBuffer::from_slice(w))?;
    let mut codes = in_kernel(kernel, n, DeviceBuffer::alloc(n))?;
    quantize_fp8_bf16_device(&w, scale, &mut codes)?;
    in_kernel(kernel, n, codes.to_vec())
}

/// FP8 fake quant of `x` in place on the GPU; see [`fake_quant_fp8_device`].
pub fn fake_quant_fp8(x: &mut [f32], amax: f32) -> Result<()> {
    let (kernel, n) = ("rq_fake_quant_fp8_f32", x.len());
    let mut dev = in_kernel(kernel, n, DeviceBuffer::from_slice(x))?;
    fake_quant_fp8_device(&mut dev, amax)?;
    in_kernel(kernel, n, dev.copy_to_slice(x))
}
