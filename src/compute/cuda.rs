//! CUDA path (feature `cuda`): a safe wrapper over the kernels of `cuda/*.cu`, whose C ABI is
//! `ffi/rq_cuda.h`. The FP8 kernels are twins of CPU code in [`crate::numerics`] and give
//! bit-identical results (`tests/cuda.rs`), as do the NVFP4 kernels, twins of `quant::nvfp4`
//! (`tests/cuda_quant.rs`); the forward kernels of a decoder layer (norms,
//! matmul, RoPE, attention, activations, statistics) are twins of [`crate::compute::cpu`]
//! (`tests/cuda_forward.rs`, with each kernel's error bound), as are the backward kernels of
//! auto-quantize's gradient score (`tests/cuda_backward.rs`, bit for bit); [`matmul_bt_bf16`] is
//! a tensor-core GEMM on bf16 operands (`tests/cuda_gemm.rs`).
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
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use bytemuck::Pod;

use crate::compute::arith::{Activation, NormKind};
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

/// Whether every launch is waited for (`RQ_CUDA_SYNC=1`, as CUDA_LAUNCH_BLOCKING): a kernel's
/// failure is then reported with its name; by default kernels queue on the stream and a
/// failure surfaces at the next copy to the host or [`synchronize`] (after each calibration
/// row and layer), without the name.
fn sync_each_launch() -> bool {
    static SYNC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SYNC.get_or_init(|| std::env::var_os("RQ_CUDA_SYNC").is_some_and(|v| v != "0" && !v.is_empty()))
}

/// Checks a launcher's status; with `RQ_CUDA_SYNC` also waits for the kernel and checks how
/// it ended.
fn launched(kernel: &str, n: usize, status: c_int) -> Result<()> {
    check(status, || format!("{kernel} on {n} elements: launch"))?;
    if !sync_each_launch() {
        return Ok(());
    }
    // SAFETY: no arguments; waits for the work queued so far.
    check(unsafe { ffi::rq_synchronize() }, || format!("{kernel} on {n} elements: kernel"))
}

/// Whether this process has allocated device memory (so kernels may be queued).
static USED: AtomicBool = AtomicBool::new(false);

/// Waits for every queued kernel and reports a failure among them; nothing when the process
/// never used the device (a CPU run of a CUDA build must not need a driver).
pub fn synchronize() -> Result<()> {
    if !USED.load(Ordering::Relaxed) {
        return Ok(());
    }
    // SAFETY: no arguments; waits for the work queued so far.
    check(unsafe { ffi::rq_synchronize() }, || "a queued kernel (RQ_CUDA_SYNC=1 names it)".into())
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

/// (free, total) bytes of the current device's memory.
pub fn memory_info() -> Result<(u64, u64)> {
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: both are valid host size_t.
    check(unsafe { ffi::rq_mem_info(&mut free, &mut total) }, || "device memory info".into())?;
    Ok((free as u64, total as u64))
}

/// `len` values of `T` in device memory, freed on drop. Contents start uninitialized
/// ([`DeviceBuffer::alloc`]) or copied from the host ([`DeviceBuffer::from_slice`]).
pub struct DeviceBuffer<T: Pod> {
    /// Null when `len` is 0 (nothing is allocated).
    ptr: *mut c_void,
    len: usize,
    /// [`all_bf16`]'s answer since the last write (`BF16_*`): a weight is checked once, not
    /// at every product.
    bf16: AtomicU8,
    _values: PhantomData<T>,
}

const BF16_UNKNOWN: u8 = 0;
const BF16_YES: u8 = 1;
const BF16_NO: u8 = 2;

// SAFETY: the buffer is an allocation of the process's CUDA context, which every host thread
// may use (the runtime API is thread-safe); `&self` methods only read it.
unsafe impl<T: Pod> Send for DeviceBuffer<T> {}
// SAFETY: as above.
unsafe impl<T: Pod> Sync for DeviceBuffer<T> {}

impl<T: Pod> DeviceBuffer<T> {
    /// Device memory for `len` values, not initialized.
    pub fn alloc(len: usize) -> Result<Self> {
        let mut ptr = std::ptr::null_mut();
        if len > 0 {
            let bytes = len.checked_mul(size_of::<T>()).ok_or_else(|| {
                Error::Unsupported(format!("CUDA allocation of {len} x {} bytes overflows", size_of::<T>()))
            })?;
            USED.store(true, Ordering::Relaxed);
            // SAFETY: `ptr` is a valid host location for the device pointer.
            check(unsafe { ffi::rq_malloc(&mut ptr, bytes) }, || format!("cudaMalloc of {bytes} bytes"))?;
        }
        Ok(DeviceBuffer { ptr, len, bf16: AtomicU8::new(BF16_UNKNOWN), _values: PhantomData })
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
        self.written();
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

    /// Overwrites the whole buffer with `self.len()` values of `src` from `src_start` on
    /// (a device-to-device copy).
    pub fn copy_from_device(&mut self, src: &DeviceBuffer<T>, src_start: usize) -> Result<()> {
        if src_start.checked_add(self.len).is_none_or(|end| end > src.len) {
            return Err(Error::Usage(format!(
                "device copy of {} values from {src_start} of a buffer of {}",
                self.len, src.len
            )));
        }
        if self.len == 0 {
            return Ok(());
        }
        let bytes = self.len * size_of::<T>();
        self.written();
        // SAFETY: `self.ptr` holds `bytes` bytes of device memory, `src` at least as many from
        // `src_start` on (checked above); the buffers are distinct allocations.
        let status = unsafe { ffi::rq_memcpy_dtod(self.ptr, src.as_ptr().add(src_start).cast(), bytes) };
        check(status, || format!("device-to-device copy of {bytes} bytes"))
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

    /// For a kernel that writes the buffer.
    fn as_mut_ptr(&mut self) -> *mut T {
        self.written();
        self.ptr.cast()
    }

    /// Forgets what is known of the contents.
    fn written(&mut self) {
        *self.bf16.get_mut() = BF16_UNKNOWN;
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

// ---- NVFP4 kernels (cuda/quant_nvfp4.cu) -----------------------------------------------------
//
// Twins of `quant::nvfp4`, bit-identical to it (tests/cuda_quant.rs). Shapes are checked as for
// the forward kernels below (an `Error::Usage` naming the kernel, never a launch on a wrong shape).

/// Values per NVFP4 block (`quant::nvfp4::BLOCK`).
const NVFP4_BLOCK: usize = 16;

/// NVFP4 weight export of `w` = `[out, inp]` (`quant::nvfp4::quantize_weight_scaled` for this
/// `weight_scale_2`): `packed` gets the `out × inp/2` bytes of E2M1 codes (element 2j in the low
/// nibble), `block_scales` the `out × inp/16` E4M3 block scales. `inp` must be a multiple of 16.
pub fn quantize_nvfp4_device(
    w: &DeviceBuffer<f32>,
    out: usize,
    inp: usize,
    weight_scale_2: f32,
    packed: &mut DeviceBuffer<u8>,
    block_scales: &mut DeviceBuffer<u8>,
) -> Result<()> {
    let kernel = "rq_quantize_nvfp4_f32";
    if !inp.is_multiple_of(NVFP4_BLOCK) {
        return Err(Error::Usage(format!(
            "{kernel}: shape [{out}, {inp}]: the input dimension {inp} is not a multiple of the NVFP4 block size {NVFP4_BLOCK}"
        )));
    }
    check_shape(kernel, "w", w.len, out.checked_mul(inp))?;
    check_shape(kernel, "packed", packed.len, Some(w.len / 2))?;
    check_shape(kernel, "block_scales", block_scales.len, Some(w.len / NVFP4_BLOCK))?;
    // SAFETY: w holds out*inp floats, packed out*inp/2 bytes, block_scales out*inp/16, all device memory.
    launched(kernel, w.len, unsafe {
        ffi::rq_quantize_nvfp4_f32(w.as_ptr(), out, inp, weight_scale_2, packed.as_mut_ptr(), block_scales.as_mut_ptr())
    })
}

/// NVFP4 fake quant in place of `x` = `[rows, cols]` (`quant::nvfp4::fake_quant`): blocks of 16
/// along each row, the last one possibly partial.
pub fn fake_quant_nvfp4_device(x: &mut DeviceBuffer<f32>, cols: usize, global_amax: f32) -> Result<()> {
    let kernel = "rq_fake_quant_nvfp4_f32";
    let rows = rows_of(kernel, x.len, cols)?;
    // SAFETY: x holds rows*cols floats of device memory.
    launched(kernel, x.len, unsafe { ffi::rq_fake_quant_nvfp4_f32(x.as_mut_ptr(), rows, cols, global_amax) })
}

/// `out[r · nb + b]` = max |x| over block b of row r of `x` = `[rows, cols]`, blocks of `block`
/// values (the last of a row may be partial, nb = ceil(cols / block)). NaN propagates.
pub fn block_amax_device(x: &DeviceBuffer<f32>, cols: usize, block: usize, out: &mut DeviceBuffer<f32>) -> Result<()> {
    let kernel = "rq_block_amax_f32";
    if block == 0 {
        return Err(Error::Usage(format!("{kernel}: blocks of 0 values")));
    }
    let rows = rows_of(kernel, x.len, cols)?;
    check_shape(kernel, "out", out.len, Some(rows * cols.div_ceil(block)))?;
    // SAFETY: x holds rows*cols floats, out rows*nb, device memory.
    launched(kernel, x.len, unsafe { ffi::rq_block_amax_f32(x.as_ptr(), rows, cols, block, out.as_mut_ptr()) })
}

/// NVFP4 codes and block scales of host weights on the GPU; see [`quantize_nvfp4_device`].
pub fn quantize_nvfp4(w: &[f32], out: usize, inp: usize, weight_scale_2: f32) -> Result<(Vec<u8>, Vec<u8>)> {
    let (kernel, n) = ("rq_quantize_nvfp4_f32", w.len());
    let w = in_kernel(kernel, n, DeviceBuffer::from_slice(w))?;
    let mut packed = in_kernel(kernel, n, DeviceBuffer::alloc(n / 2))?;
    let mut block_scales = in_kernel(kernel, n, DeviceBuffer::alloc(n / NVFP4_BLOCK))?;
    quantize_nvfp4_device(&w, out, inp, weight_scale_2, &mut packed, &mut block_scales)?;
    Ok((in_kernel(kernel, n, packed.to_vec())?, in_kernel(kernel, n, block_scales.to_vec())?))
}

// ---- INT8 / INT4 weight export (cuda/quant_int.cu) --------------------------------------------

/// INT8 codes of `w` = `[out, inp]` for per-row `scales` (`int::int8_quantize_rows`'s codes, bit
/// for bit), into `codes` (`[out, inp]`).
pub fn quantize_int8_rows_device(
    w: &DeviceBuffer<f32>,
    out: usize,
    inp: usize,
    scales: &DeviceBuffer<f32>,
    codes: &mut DeviceBuffer<i8>,
) -> Result<()> {
    let kernel = "rq_quantize_int8_rows_f32";
    check_shape(kernel, "w", w.len, out.checked_mul(inp))?;
    check_shape(kernel, "scales", scales.len, Some(out))?;
    check_shape(kernel, "codes", codes.len, Some(w.len))?;
    // SAFETY: w and codes hold out*inp values, scales out floats.
    launched(kernel, w.len, unsafe { ffi::rq_quantize_int8_rows_f32(w.as_ptr(), out, inp, scales.as_ptr(), codes.as_mut_ptr()) })
}

/// Packed INT4 codes `[out / 2, inp]` of `w` = `[out, inp]` for group `scales` `[out, inp /
/// group]` (`int::int4_quantize_with_scales`, bit for bit), into `packed`; `out` even, `inp` a
/// multiple of `group`.
pub fn quantize_int4_device(
    w: &DeviceBuffer<f32>,
    out: usize,
    inp: usize,
    group: usize,
    scales: &DeviceBuffer<f32>,
    packed: &mut DeviceBuffer<u8>,
) -> Result<()> {
    let kernel = "rq_quantize_int4_f32";
    check_shape(kernel, "w", w.len, out.checked_mul(inp))?;
    if !out.is_multiple_of(2) || group == 0 || !inp.is_multiple_of(group) {
        return Err(Error::Usage(format!("{kernel}: [{out}, {inp}] in groups of {group}: out must be even, inp a multiple")));
    }
    check_shape(kernel, "scales", scales.len, Some(out * (inp / group)))?;
    check_shape(kernel, "packed", packed.len, Some(w.len / 2))?;
    // SAFETY: w holds out*inp floats, scales out*inp/group, packed out/2*inp bytes.
    launched(kernel, w.len, unsafe {
        ffi::rq_quantize_int4_f32(w.as_ptr(), out, inp, group, scales.as_ptr(), packed.as_mut_ptr())
    })
}

/// [`quantize_int8_rows_device`] from and to host memory.
pub fn quantize_int8_rows(w: &[f32], out: usize, inp: usize, scales: &[f32]) -> Result<Vec<i8>> {
    let (kernel, n) = ("rq_quantize_int8_rows_f32", w.len());
    let (w, s) = (in_kernel(kernel, n, DeviceBuffer::from_slice(w))?, in_kernel(kernel, n, DeviceBuffer::from_slice(scales))?);
    let mut codes = in_kernel(kernel, n, DeviceBuffer::alloc(n))?;
    quantize_int8_rows_device(&w, out, inp, &s, &mut codes)?;
    in_kernel(kernel, n, codes.to_vec())
}

/// [`quantize_int4_device`] from and to host memory.
pub fn quantize_int4(w: &[f32], out: usize, inp: usize, group: usize, scales: &[f32]) -> Result<Vec<u8>> {
    let (kernel, n) = ("rq_quantize_int4_f32", w.len());
    let (w, s) = (in_kernel(kernel, n, DeviceBuffer::from_slice(w))?, in_kernel(kernel, n, DeviceBuffer::from_slice(scales))?);
    let mut packed = in_kernel(kernel, n, DeviceBuffer::alloc(n / 2))?;
    quantize_int4_device(&w, out, inp, group, &s, &mut packed)?;
    in_kernel(kernel, n, packed.to_vec())
}

// ---- forward kernels of a decoder layer (cuda/forward.cu) -------------------------------------
//
// Each function checks the lengths of its buffers against the shape it is given (an
// `Error::Usage` naming the kernel, never a launch on a wrong shape), launches the kernel and
// waits for it. Arguments mean what they mean for the CPU twin in `compute::cpu`; results match
// it within the bounds tests/cuda_forward.rs states (bit-identical for the element-wise ones).

/// `Error::Usage` unless `buffer` holds `want` values (`want` None: the shape overflows).
fn check_shape(kernel: &str, what: &str, have: usize, want: Option<usize>) -> Result<()> {
    match want {
        Some(want) if want == have => Ok(()),
        Some(want) => Err(Error::Usage(format!("{kernel}: {what} holds {have} values, the shape needs {want}"))),
        None => Err(Error::Usage(format!("{kernel}: the shape of {what} overflows"))),
    }
}

/// Rows of `cols` values in `len` values: `Error::Usage` when `cols` is 0 or does not divide `len`.
fn rows_of(kernel: &str, len: usize, cols: usize) -> Result<usize> {
    if cols == 0 || !len.is_multiple_of(cols) {
        return Err(Error::Usage(format!("{kernel}: {len} values are not rows of {cols}")));
    }
    Ok(len / cols)
}

/// The `RQ_ACT_` code of an activation (ffi/rq_cuda.h).
fn act_code(act: Activation) -> c_int {
    match act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
        Activation::Relu2 => 2,
        Activation::Gelu => 3,
    }
}

/// RMSNorm of every row of `x` (rows of `weight.len()` values) into `out`: `cpu::rms_norm`,
/// `rms_norm_bf16` (`bf16`), `rms_norm_offset` (`offset`: Gemma's `1 + weight`) or
/// `rms_norm_offset_bf16`. The sum of squares is accumulated in f64 as on the CPU (one block
/// per row, a fixed-order block reduction), the rest in f32 with the CPU's roundings.
pub fn rms_norm(
    x: &DeviceBuffer<f32>,
    weight: &DeviceBuffer<f32>,
    eps: f32,
    offset: bool,
    bf16: bool,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let kernel = "rq_rms_norm_f32";
    let (cols, rows) = (weight.len, rows_of(kernel, x.len, weight.len)?);
    check_shape(kernel, "out", out.len, Some(x.len))?;
    // SAFETY: x and out hold rows * cols floats, weight cols, all device memory.
    launched(kernel, x.len, unsafe {
        ffi::rq_rms_norm_f32(x.as_ptr(), rows, cols, weight.as_ptr(), eps, c_int::from(offset), c_int::from(bf16), out.as_mut_ptr())
    })
}

/// LayerNorm of every row of `x` (rows of `weight.len()` values) into `out`, `cpu::layer_norm`:
/// mean and biased variance in f64, the rest in f32.
pub fn layer_norm(
    x: &DeviceBuffer<f32>,
    weight: &DeviceBuffer<f32>,
    bias: Option<&DeviceBuffer<f32>>,
    eps: f32,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let kernel = "rq_layer_norm_f32";
    let (cols, rows) = (weight.len, rows_of(kernel, x.len, weight.len)?);
    check_shape(kernel, "out", out.len, Some(x.len))?;
    if let Some(b) = bias {
        check_shape(kernel, "bias", b.len, Some(cols))?;
    }
    let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
    // SAFETY: x and out hold rows * cols floats, weight and bias (or null) cols.
    launched(kernel, x.len, unsafe {
        ffi::rq_layer_norm_f32(x.as_ptr(), rows, cols, weight.as_ptr(), bias, eps, out.as_mut_ptr())
    })
}

/// `out[rows×n] = x[rows×k] · w[n×k]ᵀ` (`cpu::matmul_bt`): a tiled SIMT kernel, each output one
/// f32 FMA chain over k in order (bit-identical to the CPU's on a CPU with FMA).
pub fn matmul_bt(
    x: &DeviceBuffer<f32>,
    w: &DeviceBuffer<f32>,
    rows: usize,
    k: usize,
    n: usize,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    matmul_checked("rq_matmul_bt_f32", x, w, rows, k, n, out, ffi::rq_matmul_bt_f32)
}

/// [`matmul_bt`] with one thread per output (no tiling): the tiled kernel's reference.
pub fn matmul_bt_naive(
    x: &DeviceBuffer<f32>,
    w: &DeviceBuffer<f32>,
    rows: usize,
    k: usize,
    n: usize,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    matmul_checked("rq_matmul_bt_naive_f32", x, w, rows, k, n, out, ffi::rq_matmul_bt_naive_f32)
}

/// [`matmul_bt`] on tensor cores (`cuda/gemm.cu`): `x` and `w` rounded to bf16 (exact for
/// bf16-representable values, as in a model computed in bf16), exact products summed in f32 in
/// the tensor core's order, so within `k · 2⁻²³ · Σ|x·w|` of the exact dot product rather than
/// bit-identical to the CPU. NaN and infinities propagate.
pub fn matmul_bt_bf16(
    x: &DeviceBuffer<f32>,
    w: &DeviceBuffer<f32>,
    rows: usize,
    k: usize,
    n: usize,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    matmul_checked("rq_matmul_bt_bf16_f32", x, w, rows, k, n, out, ffi::rq_matmul_bt_bf16_f32)
}

/// Whether every value of `x` is a bf16 value (NaN included): then [`matmul_bt_bf16`] takes
/// it without rounding.
pub fn all_bf16(x: &DeviceBuffer<f32>) -> Result<bool> {
    match x.bf16.load(Ordering::Relaxed) {
        BF16_YES => return Ok(true),
        BF16_NO => return Ok(false),
        _ => {}
    }
    let kernel = "rq_all_bf16_f32";
    let mut flag = DeviceBuffer::<c_int>::alloc(1)?;
    // SAFETY: x holds x.len floats, flag one int.
    launched(kernel, x.len, unsafe { ffi::rq_all_bf16_f32(x.as_ptr(), x.len, flag.as_mut_ptr()) })?;
    let yes = flag.to_vec()?[0] == 1;
    x.bf16.store(if yes { BF16_YES } else { BF16_NO }, Ordering::Relaxed);
    Ok(yes)
}

type MatmulLauncher = unsafe extern "C" fn(*const f32, *const f32, usize, usize, usize, *mut f32) -> c_int;

#[allow(clippy::too_many_arguments)]
fn matmul_checked(
    kernel: &str,
    x: &DeviceBuffer<f32>,
    w: &DeviceBuffer<f32>,
    rows: usize,
    k: usize,
    n: usize,
    out: &mut DeviceBuffer<f32>,
    launcher: MatmulLauncher,
) -> Result<()> {
    check_shape(kernel, "x", x.len, rows.checked_mul(k))?;
    check_shape(kernel, "w", w.len, n.checked_mul(k))?;
    check_shape(kernel, "out", out.len, rows.checked_mul(n))?;
    // SAFETY: the three buffers hold rows*k, n*k and rows*n floats of device memory.
    launched(kernel, out.len, unsafe { launcher(x.as_ptr(), w.as_ptr(), rows, k, n, out.as_mut_ptr()) })
}

/// Adds `bias` (`[n]`) to every row of `x` (`[rows, n]`), as `Tensor::add_row_bias`.
pub fn add_row_bias(x: &mut DeviceBuffer<f32>, bias: &DeviceBuffer<f32>, n: usize) -> Result<()> {
    let kernel = "rq_add_row_bias_f32";
    check_shape(kernel, "bias", bias.len, Some(n))?;
    rows_of(kernel, x.len, n)?;
    // SAFETY: x holds x.len floats (rows of n), bias n.
    launched(kernel, x.len, unsafe { ffi::rq_add_row_bias_f32(x.as_mut_ptr(), x.len, bias.as_ptr(), n) })
}

/// `x += y` (`cpu::add_in_place`).
pub fn add(x: &mut DeviceBuffer<f32>, y: &DeviceBuffer<f32>) -> Result<()> {
    let kernel = "rq_add_f32";
    check_shape(kernel, "y", y.len, Some(x.len))?;
    // SAFETY: x and y hold x.len floats each.
    launched(kernel, x.len, unsafe { ffi::rq_add_f32(x.as_mut_ptr(), y.as_ptr(), x.len) })
}

/// Every value rounded to bf16 and back (`cpu::round_slice_bf16`: nearest even, NaN stays NaN).
pub fn round_bf16(x: &mut DeviceBuffer<f32>) -> Result<()> {
    // SAFETY: x holds x.len floats.
    launched("rq_round_bf16_f32", x.len, unsafe { ffi::rq_round_bf16_f32(x.as_mut_ptr(), x.len) })
}

/// RoPE in place on `x` = `[seq, heads * head_dim]` (`Rope::apply`, or `Rope::apply_bf16`
/// when `bf16`): the leading `rotary_dim` dims of each head rotate, rotate_half layout. `cos`
/// and `sin` are device copies of [`crate::compute::Rope::tables`]
/// (`[max_positions, rotary_dim / 2]`, `max_positions >= seq`).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &mut DeviceBuffer<f32>,
    cos: &DeviceBuffer<f32>,
    sin: &DeviceBuffer<f32>,
    seq: usize,
    heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    bf16: bool,
) -> Result<()> {
    let kernel = "rq_rope_f32";
    if !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
        return Err(Error::Usage(format!("{kernel}: rotary_dim {rotary_dim} is not even and <= head_dim {head_dim}")));
    }
    check_shape(kernel, "x", x.len, seq.checked_mul(heads).and_then(|v| v.checked_mul(head_dim)))?;
    check_shape(kernel, "sin", sin.len, Some(cos.len))?;
    let half = rotary_dim / 2;
    if half > 0 && (!cos.len.is_multiple_of(half) || cos.len / half < seq) {
        return Err(Error::Usage(format!(
            "{kernel}: the cos/sin tables ({} values) are not [>= {seq} positions, {half}]",
            cos.len
        )));
    }
    // SAFETY: x holds seq*heads*head_dim floats, the tables at least seq*half each.
    launched(kernel, x.len, unsafe {
        ffi::rq_rope_f32(x.as_mut_ptr(), cos.as_ptr(), sin.as_ptr(), seq, heads, head_dim, rotary_dim, c_int::from(bf16))
    })
}

/// Causal grouped-query attention (`cpu::Attention::forward`): `q` and `out` are
/// `[seq, n_heads * head_dim]`, `k` and `v` `[seq, n_kv_heads * head_dim]`; `sliding_window` w:
/// a query sees itself and the w - 1 keys before it. Flash-style, key tiles in shared memory,
/// no `seq × seq` buffer; `head_dim <= 256`. `flash_bf16` false: f32 online softmax; true:
/// FlashAttention-2's softmax on a bf16 model (`Attention::flash_bf16`: probabilities rounded
/// to bf16 in blocks of 128 keys, each computed as the CPU does). With `Attention::alibi` (not
/// with `flash_bf16`) the heads' slopes are uploaded for the call (a few floats).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &DeviceBuffer<f32>,
    k: &DeviceBuffer<f32>,
    v: &DeviceBuffer<f32>,
    seq: usize,
    a: &crate::compute::cpu::Attention,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let (n_heads, n_kv_heads, head_dim, sliding_window) = (a.n_heads, a.n_kv_heads, a.head_dim, a.sliding_window);
    let kernel = "rq_attention_f32";
    if !(a.scale.is_finite() && a.softcap.is_none_or(|c| c > 0.0 && c.is_finite()) && !(a.flash_bf16 && a.softcap.is_some())) {
        return Err(Error::Usage(format!(
            "{kernel}: scale {} and softcap {:?} (needs finite values, a positive softcap, no softcap with flash_bf16)",
            a.scale, a.softcap
        )));
    }
    if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) || head_dim == 0 || head_dim > 256 {
        return Err(Error::Usage(format!(
            "{kernel}: {n_heads} heads over {n_kv_heads} kv heads of {head_dim} dims (needs a multiple, 1..=256 dims)"
        )));
    }
    if sliding_window == Some(0) {
        return Err(Error::Usage(format!("{kernel}: a sliding window of 0 keys")));
    }
    let q_len = seq.checked_mul(n_heads).and_then(|v| v.checked_mul(head_dim));
    let kv_len = seq.checked_mul(n_kv_heads).and_then(|v| v.checked_mul(head_dim));
    check_shape(kernel, "q", q.len, q_len)?;
    check_shape(kernel, "k", k.len, kv_len)?;
    check_shape(kernel, "v", v.len, kv_len)?;
    check_shape(kernel, "out", out.len, q_len)?;
    if a.flash_bf16 && a.alibi.is_some() {
        return Err(Error::Usage(format!("{kernel}: ALiBi with flash_bf16 (HF runs ALiBi models eagerly)")));
    }
    let slopes = a.alibi.map(|alibi| DeviceBuffer::from_slice(&crate::compute::cpu::alibi_slopes(alibi, n_heads))).transpose()?;
    // SAFETY: the buffers hold the lengths just checked, in device memory; slopes n_heads floats.
    launched(kernel, out.len, unsafe {
        ffi::rq_attention_f32(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            seq,
            n_heads,
            n_kv_heads,
            head_dim,
            sliding_window.unwrap_or(0),
            a.scale,
            a.softcap.unwrap_or(0.0),
            slopes.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            c_int::from(a.flash_bf16),
            out.as_mut_ptr(),
        )
    })
}

/// The gated MLP's `gate ← act(gate) * up` (`Compute::gated_mul`: `cpu::gated_mul`, or
/// `gated_mul_bf16` when `bf16`).
pub fn gated_mul(gate: &mut DeviceBuffer<f32>, up: &DeviceBuffer<f32>, act: Activation, bf16: bool) -> Result<()> {
    let kernel = "rq_gated_mul_f32";
    check_shape(kernel, "up", up.len, Some(gate.len))?;
    // SAFETY: gate and up hold gate.len floats each.
    launched(kernel, gate.len, unsafe {
        ffi::rq_gated_mul_f32(gate.as_mut_ptr(), up.as_ptr(), gate.len, act_code(act), c_int::from(bf16))
    })
}

/// The logits' last steps in place (`cpu::finish_logits`): `x / divisor`, then
/// `tanh(x / cap) · cap`, each when given, each op rounded to bf16 when `bf16`.
pub fn finish_logits(x: &mut DeviceBuffer<f32>, divisor: Option<f32>, cap: Option<f32>, bf16: bool) -> Result<()> {
    let kernel = "rq_finish_logits_f32";
    if [divisor, cap].iter().flatten().any(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(Error::Usage(format!("{kernel}: divisor {divisor:?} and cap {cap:?} must be positive and finite")));
    }
    // SAFETY: x holds x.len floats.
    launched(kernel, x.len, unsafe {
        ffi::rq_finish_logits_f32(x.as_mut_ptr(), x.len, divisor.unwrap_or(0.0), cap.unwrap_or(0.0), c_int::from(bf16))
    })
}

/// `x ← act(x)` element-wise (`Tensor::activate`).
pub fn activate(x: &mut DeviceBuffer<f32>, act: Activation) -> Result<()> {
    // SAFETY: x holds x.len floats.
    launched("rq_activate_f32", x.len, unsafe { ffi::rq_activate_f32(x.as_mut_ptr(), x.len, act_code(act)) })
}

/// `acc[c] = max(acc[c], max_r |x[r, c]|)` over `x` = `[rows, cols]` (`Tensor::channel_amax`;
/// `acc` holds `cols` amaxes, each >= +0 or NaN). NaN propagates (the CPU's `f32::max` drops
/// a NaN of x; here any NaN makes its column's amax NaN).
pub fn channel_amax(x: &DeviceBuffer<f32>, cols: usize, acc: &mut DeviceBuffer<f32>) -> Result<()> {
    let kernel = "rq_channel_amax_f32";
    check_shape(kernel, "acc", acc.len, Some(cols))?;
    let rows = rows_of(kernel, x.len, cols)?;
    // SAFETY: x holds rows*cols floats, acc cols.
    launched(kernel, x.len, unsafe { ffi::rq_channel_amax_f32(x.as_ptr(), rows, cols, acc.as_mut_ptr()) })
}

/// `out_nll[r] = -log softmax(logits[r])[targets[r]]` for `logits` = `[targets.len(), vocab]`,
/// in f64 (`cpu::log_softmax_nll`, with exact exponentials). NaN for a row with a NaN logit
/// or a target >= vocab.
pub fn log_softmax_nll(
    logits: &DeviceBuffer<f32>,
    vocab: usize,
    targets: &DeviceBuffer<u32>,
    out_nll: &mut DeviceBuffer<f64>,
) -> Result<()> {
    let kernel = "rq_log_softmax_nll_f32";
    let rows = targets.len;
    if vocab == 0 && rows > 0 {
        return Err(Error::Usage(format!("{kernel}: {rows} targets over an empty vocabulary")));
    }
    check_shape(kernel, "logits", logits.len, rows.checked_mul(vocab))?;
    check_shape(kernel, "out_nll", out_nll.len, Some(rows))?;
    // SAFETY: logits hold rows*vocab floats, targets and out_nll rows values each.
    launched(kernel, logits.len, unsafe {
        ffi::rq_log_softmax_nll_f32(logits.as_ptr(), rows, vocab, targets.as_ptr(), out_nll.as_mut_ptr())
    })
}

/// `out[r] = x[rows[r]]` for `x` = `[_, cols]` (`Tensor::gather_rows`); every row index is
/// checked against `x` before the launch.
pub fn gather_rows(x: &DeviceBuffer<f32>, cols: usize, rows: &[usize], out: &mut DeviceBuffer<f32>) -> Result<()> {
    let kernel = "rq_gather_rows_f32";
    let x_rows = rows_of(kernel, x.len, cols)?;
    check_shape(kernel, "out", out.len, rows.len().checked_mul(cols))?;
    let index = rows.iter().map(|&r| u32::try_from(r).ok().filter(|&r| (r as usize) < x_rows)).collect::<Option<Vec<u32>>>();
    let index = index.ok_or_else(|| Error::Usage(format!("{kernel}: a row index outside the {x_rows} rows")))?;
    let rows = DeviceBuffer::from_slice(&index)?;
    // SAFETY: x holds x_rows*cols floats and every row index is below x_rows; out holds
    // rows.len*cols floats.
    launched(kernel, out.len, unsafe { ffi::rq_gather_rows_f32(x.as_ptr(), cols, rows.as_ptr(), rows.len, out.as_mut_ptr()) })
}

/// `out[rows[r]] += src[r] · weights[r]` for `out` = `[_, cols]`, each product and sum rounded
/// to bf16 when `bf16` (`Tensor::index_add_weighted`). The rows must be distinct and inside
/// `out` (checked).
pub fn index_add_weighted(
    out: &mut DeviceBuffer<f32>,
    src: &DeviceBuffer<f32>,
    cols: usize,
    rows: &[(usize, f32)],
    bf16: bool,
) -> Result<()> {
    let kernel = "rq_index_add_weighted_f32";
    let out_rows = rows_of(kernel, out.len, cols)?;
    check_shape(kernel, "src", src.len, rows.len().checked_mul(cols))?;
    let mut seen = vec![false; out_rows];
    for &(r, _) in rows {
        if r >= out_rows || std::mem::replace(&mut seen[r], true) {
            return Err(Error::Usage(format!("{kernel}: row {r} is repeated or outside {out_rows} rows")));
        }
    }
    let index = DeviceBuffer::from_slice(&rows.iter().map(|&(r, _)| r as u32).collect::<Vec<u32>>())?;
    let weights = DeviceBuffer::from_slice(&rows.iter().map(|&(_, w)| w).collect::<Vec<f32>>())?;
    // SAFETY: out holds out_rows*cols floats and every index is a distinct row below out_rows;
    // src holds rows.len()*cols floats, index and weights rows.len() values each.
    launched(kernel, src.len, unsafe {
        ffi::rq_index_add_weighted_f32(
            out.as_mut_ptr(),
            src.as_ptr(),
            cols,
            index.as_ptr(),
            weights.as_ptr(),
            index.len,
            c_int::from(bf16),
        )
    })
}

/// INT8 fake quant of `x` in place (`quant::int::int8_fake_quant`, bit for bit).
pub fn fake_quant_int8_device(x: &mut DeviceBuffer<f32>, amax: f32) -> Result<()> {
    // SAFETY: x holds x.len floats of device memory.
    launched("rq_fake_quant_int8_f32", x.len, unsafe { ffi::rq_fake_quant_int8_f32(x.as_mut_ptr(), x.len, amax) })
}

/// `x[r, c] *= scale[c]` for `x` = `[_, scale.len()]` (SmoothQuant's `pre_quant_scale`).
pub fn mul_cols(x: &mut DeviceBuffer<f32>, scale: &DeviceBuffer<f32>) -> Result<()> {
    let kernel = "rq_mul_cols_f32";
    rows_of(kernel, x.len, scale.len)?;
    // SAFETY: x holds a whole number of rows of scale.len floats.
    launched(kernel, x.len, unsafe { ffi::rq_mul_cols_f32(x.as_mut_ptr(), x.len, scale.as_ptr(), scale.len) })
}

/// `out[c]` = mean |x[r, c]| over the rows of `x` = `[rows, cols]` (`cpu::col_abs_mean`, bit
/// for bit: the sum in f64 over the rows in order).
pub fn col_abs_mean(x: &DeviceBuffer<f32>, cols: usize, out: &mut DeviceBuffer<f32>) -> Result<()> {
    let kernel = "rq_col_abs_mean_f32";
    let rows = rows_of(kernel, x.len, cols)?;
    check_shape(kernel, "out", out.len, Some(cols))?;
    if rows == 0 {
        return Err(Error::Usage(format!("{kernel}: the mean of 0 rows")));
    }
    // SAFETY: x holds rows*cols floats, out cols.
    launched(kernel, x.len, unsafe { ffi::rq_col_abs_mean_f32(x.as_ptr(), rows, cols, out.as_mut_ptr()) })
}

/// `out[r]` = Σ_c (d · weight[r, c])² in f64 with d = y[r, c] − reference[r, c] rounded to bf16
/// when `bf16`, no weight: 1 (`cpu::sq_err_row`, bit for bit), for `y`, `reference` and `weight`
/// = `[rows, cols]`.
pub fn sq_err_rows(
    y: &DeviceBuffer<f32>,
    reference: &DeviceBuffer<f32>,
    weight: Option<&DeviceBuffer<f32>>,
    cols: usize,
    bf16: bool,
    out: &mut DeviceBuffer<f64>,
) -> Result<()> {
    let kernel = "rq_sq_err_rows_f32";
    let rows = rows_of(kernel, y.len, cols)?;
    check_shape(kernel, "reference", reference.len, Some(y.len))?;
    if let Some(w) = weight {
        check_shape(kernel, "weight", w.len, Some(y.len))?;
    }
    check_shape(kernel, "out", out.len, Some(rows))?;
    let weight = weight.map_or(std::ptr::null(), |w| w.as_ptr());
    // SAFETY: y, reference and weight (or null) hold rows*cols floats, out rows doubles.
    launched(kernel, y.len, unsafe {
        ffi::rq_sq_err_rows_f32(y.as_ptr(), reference.as_ptr(), weight, rows, cols, c_int::from(bf16), out.as_mut_ptr())
    })
}

/// INT4 fake quant in place of `w` = `[_, inp]` in groups of `group` inputs
/// (`quant::int::int4_fake_quant` with the groups' own amax, bit for bit).
pub fn fake_quant_int4_device(w: &mut DeviceBuffer<f32>, inp: usize, group: usize) -> Result<()> {
    let kernel = "rq_fake_quant_int4_f32";
    let out = rows_of(kernel, w.len, inp)?;
    if group == 0 {
        return Err(Error::Usage(format!("{kernel}: group size 0")));
    }
    // SAFETY: w holds out*inp floats.
    launched(kernel, w.len, unsafe { ffi::rq_fake_quant_int4_f32(w.as_mut_ptr(), out, inp, group) })
}

// ---- backward kernels of auto-quantize's gradient score (cuda/backward.cu) --------------------
//
// Twins of `compute::cpu`'s grad.rs, bit for bit (tests/cuda_backward.rs; on a GPU up to the libm
// of exp, tanh and ln). Shapes are checked as for the forward kernels: where the CPU twin panics
// on a caller bug, these return `Error::Usage` naming the kernel.

/// `out[c·rows + r] = a[r·cols + c]`: the `[cols, rows]` transpose of `a` = `[rows, cols]`
/// (`cpu::transpose`).
pub fn transpose(a: &DeviceBuffer<f32>, rows: usize, cols: usize, out: &mut DeviceBuffer<f32>) -> Result<()> {
    let kernel = "rq_transpose_f32";
    check_shape(kernel, "a", a.len, rows.checked_mul(cols))?;
    check_shape(kernel, "out", out.len, Some(a.len))?;
    // SAFETY: a and out hold rows*cols floats each.
    launched(kernel, a.len, unsafe { ffi::rq_transpose_f32(a.as_ptr(), rows, cols, out.as_mut_ptr()) })
}

/// `dst[r, dst_c0 + j] = src[r, src_c0 + j]` for j < n, `src` whole rows of `src_width` values and
/// `dst` as many rows of `dst_width` (`cpu::copy_columns`).
pub fn copy_columns(
    src: &DeviceBuffer<f32>,
    src_width: usize,
    src_c0: usize,
    dst: &mut DeviceBuffer<f32>,
    dst_width: usize,
    dst_c0: usize,
    n: usize,
) -> Result<()> {
    let kernel = "rq_copy_columns_f32";
    let inside = |c0: usize, width: usize| c0.checked_add(n).is_some_and(|end| end <= width);
    if !inside(src_c0, src_width) || !inside(dst_c0, dst_width) {
        return Err(Error::Usage(format!(
            "{kernel}: {n} columns from {src_c0} of rows of {src_width} to {dst_c0} of rows of {dst_width}"
        )));
    }
    let rows = rows_of(kernel, src.len, src_width)?;
    check_shape(kernel, "dst", dst.len, rows.checked_mul(dst_width))?;
    // SAFETY: src holds rows*src_width floats, dst rows*dst_width, and the n columns lie inside
    // both rows (checked).
    launched(kernel, rows * n, unsafe {
        ffi::rq_copy_columns_f32(src.as_ptr(), src_width, src_c0, dst.as_mut_ptr(), dst_width, dst_c0, rows, n)
    })
}

/// `x[offset..offset + y.len()] += y` (`cpu::add_in_place` on a part of `x`).
pub fn add_at(x: &mut DeviceBuffer<f32>, offset: usize, y: &DeviceBuffer<f32>) -> Result<()> {
    let kernel = "rq_add_f32";
    if offset.checked_add(y.len).is_none_or(|end| end > x.len) {
        return Err(Error::Usage(format!("{kernel}: {} values at {offset} of a buffer of {}", y.len, x.len)));
    }
    let at = x.as_mut_ptr().wrapping_add(offset);
    // SAFETY: x holds at least offset + y.len floats (checked), y y.len.
    launched(kernel, y.len, unsafe { ffi::rq_add_f32(at, y.as_ptr(), y.len) })
}

/// The attention backward's softmax in place (`cpu::softmax_rows`): `p` holds `[rows, n_keys]`
/// scores of the queries `t0..t0 + rows` against the keys `lo..lo + n_keys`; row r (query t)
/// becomes `softmax(scale · scores)` over the keys `first(t)..=t` it sees (`first(t) = t + 1 −
/// w` under a sliding window w, else 0) and 0 elsewhere, with the soft cap and the ALiBi bias of
/// `alibi_slope` when given. One thread per row, in key order. `Error::Usage` when a row sees
/// keys outside the block (the CPU panics).
#[allow(clippy::too_many_arguments)]
pub fn softmax_rows(
    p: &mut DeviceBuffer<f32>,
    n_keys: usize,
    t0: usize,
    lo: usize,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
    alibi_slope: Option<f32>,
) -> Result<()> {
    let kernel = "rq_softmax_rows_f32";
    // The kernel takes 0 for "none" of either.
    if [softcap, alibi_slope].iter().flatten().any(|v| !(*v > 0.0 && v.is_finite())) {
        return Err(Error::Usage(format!(
            "{kernel}: softcap {softcap:?} and ALiBi slope {alibi_slope:?} must be positive and finite"
        )));
    }
    let rows = rows_of(kernel, p.len, n_keys)?;
    // first(t) and t grow with t: the first row's first key and the last row bound the block.
    let first = window.map_or(0, |w| t0.saturating_add(1).saturating_sub(w));
    let last = t0.checked_add(rows.saturating_sub(1));
    if rows > 0 && (first < lo || t0 < lo || last.is_none_or(|t| t - lo >= n_keys)) {
        return Err(Error::Usage(format!(
            "{kernel}: the queries {t0}..{} see keys outside {lo}..{} (window {window:?})",
            t0.saturating_add(rows),
            lo.saturating_add(n_keys)
        )));
    }
    // SAFETY: p holds rows*n_keys floats and every row's visible keys lie in it (checked).
    launched(kernel, p.len, unsafe {
        ffi::rq_softmax_rows_f32(
            p.as_mut_ptr(),
            rows,
            n_keys,
            t0,
            lo,
            window.unwrap_or(usize::MAX),
            scale,
            softcap.unwrap_or(0.0),
            alibi_slope.unwrap_or(0.0),
        )
    })
}

/// The soft cap's backward in place (`cpu::softcap_grad`): `ds[i] *= 1 − tanh(scale·raw[i] / cap)²`.
pub fn softcap_grad(ds: &mut DeviceBuffer<f32>, raw: &DeviceBuffer<f32>, scale: f32, cap: f32) -> Result<()> {
    let kernel = "rq_softcap_grad_f32";
    check_shape(kernel, "raw", raw.len, Some(ds.len))?;
    if !(cap > 0.0 && cap.is_finite()) {
        return Err(Error::Usage(format!("{kernel}: cap {cap} must be positive and finite")));
    }
    // SAFETY: ds and raw hold ds.len floats each.
    launched(kernel, ds.len, unsafe { ffi::rq_softcap_grad_f32(ds.as_mut_ptr(), raw.as_ptr(), ds.len, scale, cap) })
}

/// The attention softmax's backward in place (`cpu::attention_ds`): `ds` holds dP (`[rows,
/// n_keys]`) and becomes `scale · P ⊙ (dP − c)`, c = Σ_j P_j·dP_j per row (f64, one warp per row).
pub fn attention_ds(ds: &mut DeviceBuffer<f32>, p: &DeviceBuffer<f32>, n_keys: usize, scale: f32) -> Result<()> {
    let kernel = "rq_attention_ds_f32";
    let rows = rows_of(kernel, ds.len, n_keys)?;
    check_shape(kernel, "p", p.len, Some(ds.len))?;
    // SAFETY: ds and p hold rows*n_keys floats each.
    launched(kernel, ds.len, unsafe { ffi::rq_attention_ds_f32(ds.as_mut_ptr(), p.as_ptr(), rows, n_keys, scale) })
}

/// `acc += dL/dx` of `norm` over rows of `weight.len()` values, given its input `x` and `dy` =
/// dL/d(output) (`cpu::norm_backward_add`; one warp per row, the means in f64).
pub fn norm_backward_add(
    acc: &mut DeviceBuffer<f32>,
    x: &DeviceBuffer<f32>,
    weight: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<f32>,
    norm: NormKind,
) -> Result<()> {
    let kernel = "rq_norm_backward_add_f32";
    let (n, rows) = (weight.len, rows_of(kernel, x.len, weight.len)?);
    check_shape(kernel, "dy", dy.len, Some(x.len))?;
    check_shape(kernel, "acc", acc.len, Some(x.len))?;
    // SAFETY: acc, x and dy hold rows*n floats, weight n.
    launched(kernel, x.len, unsafe {
        ffi::rq_norm_backward_add_f32(
            acc.as_mut_ptr(),
            x.as_ptr(),
            weight.as_ptr(),
            dy.as_ptr(),
            rows,
            n,
            c_int::from(norm.layer_norm),
            c_int::from(norm.offset),
            norm.eps,
        )
    })
}

/// `out = (dm ⊙ u) ⊙ act'(x)`, or `dm ⊙ act'(x)` without `u` (`cpu::act_grad_mul`).
pub fn act_grad_mul(
    x: &DeviceBuffer<f32>,
    dm: &DeviceBuffer<f32>,
    u: Option<&DeviceBuffer<f32>>,
    act: Activation,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let kernel = "rq_act_grad_mul_f32";
    check_shape(kernel, "dm", dm.len, Some(x.len))?;
    if let Some(u) = u {
        check_shape(kernel, "u", u.len, Some(x.len))?;
    }
    check_shape(kernel, "out", out.len, Some(x.len))?;
    let u = u.map_or(std::ptr::null(), |u| u.as_ptr());
    // SAFETY: x, dm, u (or null) and out hold x.len floats each.
    launched(kernel, x.len, unsafe {
        ffi::rq_act_grad_mul_f32(x.as_ptr(), dm.as_ptr(), u, x.len, act_code(act), out.as_mut_ptr())
    })
}

/// Swaps the two halves of the leading `rotary_dim` values of every head of `head_dim` values
/// (`cpu::swap_rotary_halves`: the transpose of RoPE with RoPE around it).
pub fn swap_rotary_halves(x: &mut DeviceBuffer<f32>, head_dim: usize, rotary_dim: usize) -> Result<()> {
    let kernel = "rq_swap_rotary_halves_f32";
    if !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
        return Err(Error::Usage(format!("{kernel}: rotary_dim {rotary_dim} is not even and <= head_dim {head_dim}")));
    }
    let heads = rows_of(kernel, x.len, head_dim)?;
    // SAFETY: x holds heads*head_dim floats.
    launched(kernel, x.len, unsafe { ffi::rq_swap_rotary_halves_f32(x.as_mut_ptr(), heads, head_dim, rotary_dim) })
}

/// Per row r of the logits `z` = `[targets.len(), vocab]` (`cpu::xent_grad_row`, one warp per
/// row): `z[r]` becomes `scale · (softmax(z[r]) − onehot(targets[r]))` and `nll[r]` =
/// logsumexp(z[r]) − z[r, targets[r]] in f64. A target >= vocab (the CPU panics) makes `nll[r]`
/// and the whole row NaN.
pub fn xent_grad_rows(
    z: &mut DeviceBuffer<f32>,
    vocab: usize,
    targets: &DeviceBuffer<u32>,
    scale: f32,
    nll: &mut DeviceBuffer<f64>,
) -> Result<()> {
    let kernel = "rq_xent_grad_rows_f32";
    let rows = targets.len;
    if vocab == 0 && rows > 0 {
        return Err(Error::Usage(format!("{kernel}: {rows} targets over an empty vocabulary")));
    }
    check_shape(kernel, "z", z.len, rows.checked_mul(vocab))?;
    check_shape(kernel, "nll", nll.len, Some(rows))?;
    // SAFETY: z holds rows*vocab floats, targets and nll rows values each; the kernel checks
    // each target against vocab.
    launched(kernel, z.len, unsafe {
        ffi::rq_xent_grad_rows_f32(z.as_mut_ptr(), rows, vocab, targets.as_ptr(), scale, nll.as_mut_ptr())
    })
}

/// `x[r, ·] *= w[r]` for `x` = `[w.len(), cols]` (`cpu::scale_rows`).
pub fn scale_rows(x: &mut DeviceBuffer<f32>, cols: usize, w: &DeviceBuffer<f32>) -> Result<()> {
    let kernel = "rq_scale_rows_f32";
    check_shape(kernel, "x", x.len, w.len.checked_mul(cols))?;
    // SAFETY: x holds w.len*cols floats, w w.len.
    launched(kernel, x.len, unsafe { ffi::rq_scale_rows_f32(x.as_mut_ptr(), w.len, cols, w.as_ptr()) })
}
