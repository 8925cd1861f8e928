//! `Tensor`: an f32 buffer owned by the backend it lives on, and every operation the decoder
//! layers, the MoE block and the head perform on one. The model code is written once against
//! these methods; each method dispatches on where the data is.
//!
//! Why an enum over storages and not a backend trait: the set of backends is closed (the CPU
//! reference and CUDA), so `match self.storage` in one file keeps the CPU arm and the device arm
//! of each operation side by side, and the layers, hooks and drivers stay free of generics and
//! trait objects: a `Tensor` is one concrete type wherever it lives (candle's design). Adding a
//! backend means one new `Storage` variant and one arm per method here, and the compiler lists
//! every arm that is missing.
//!
//! Shapes are the caller's: a tensor is a row-major buffer and each operation takes the
//! dimensions it needs (`[rows, cols]` activations with rows = tokens, `[out, in]` weights), as
//! the CPU kernels do. Statistics calibration takes (amax, per-channel amax, finiteness) are
//! methods too, so they are computed where the data is; a hook that needs the values
//! themselves reads them with `to_host` or edits them with `map_host`.
//!
//! Device tensors (features `cuda` / `cuda-emu`): each operation with a kernel runs it on the
//! device; the others (operands on different backends) go through one host fallback,
//! [`Tensor::via_host`], which downloads the operands, runs the CPU arm and uploads the result,
//! so their math stays the CPU's. The methods are infallible: the first device error is kept in
//! a per-thread sticky error (as CUDA keeps one per context), every later device step is
//! skipped, and the layer loops report it through [`crate::compute::take_device_error`]. After
//! an error, downloads read zeros and new tensors stay on the host, so shapes stay consistent
//! and nothing panics before it is reported.

use crate::compute::arith::{act_fn, Activation, Compute, NormKind};
use crate::compute::cpu::{self, Attention};
use crate::compute::rope::Rope;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use crate::compute::cuda::{self, DeviceBuffer};
use crate::compute::device::Device;
use std::borrow::Cow;

mod grad;

/// A transform whose formula belongs to a later stage (quant/), named with the kernel that is
/// its device twin, for [`Tensor::map_twin`]. Each twin is tested bit-identical to its formula
/// (tests/cuda.rs, tests/cuda_quant.rs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DeviceTwin {
    /// `quant::fp8::fake_quant(x, amax)` (nothing when amax <= 0).
    FakeQuantFp8 { amax: f32 },
    /// `quant::int::int8_fake_quant(x, amax)`.
    FakeQuantInt8 { amax: f32 },
    /// `quant::nvfp4::fake_quant(x, cols, global_amax)` on rows of `cols`.
    FakeQuantNvfp4 { cols: usize, global_amax: f32 },
    /// `quant::int::int4_fake_quant(x, _, cols, group, None)` on rows of `cols`.
    FakeQuantInt4 { cols: usize, group: usize },
}

/// An f32 tensor on one backend.
#[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), derive(Clone, Debug, PartialEq))]
pub struct Tensor {
    storage: Storage,
}

#[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), derive(Clone, Debug, PartialEq))]
enum Storage {
    /// Host memory: the CPU backend (src/compute/cpu).
    Cpu(Vec<f32>),
    /// Device memory: the kernels of cuda/ (src/compute/cuda.rs).
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    Cuda(DeviceBuffer<f32>),
}

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
impl Clone for Tensor {
    /// A copy on the same backend.
    fn clone(&self) -> Tensor {
        match &self.storage {
            Storage::Cpu(v) => Tensor::from(v.clone()),
            Storage::Cuda(b) => dev::output(b.len(), |o| o.copy_from_device(b, 0)),
        }
    }
}

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.storage {
            Storage::Cpu(v) => f.debug_tuple("Cpu").field(v).finish(),
            Storage::Cuda(b) => write!(f, "Cuda({} values)", b.len()),
        }
    }
}

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
impl PartialEq for Tensor {
    /// Same values (wherever they are).
    fn eq(&self, other: &Tensor) -> bool {
        self.to_host() == other.to_host()
    }
}

impl Default for Tensor {
    /// An empty host tensor (the slot of a linear a family does not have).
    fn default() -> Tensor {
        Tensor::from(Vec::new())
    }
}

impl From<Vec<f32>> for Tensor {
    /// A host tensor holding `values` (no copy).
    fn from(values: Vec<f32>) -> Tensor {
        Tensor { storage: Storage::Cpu(values) }
    }
}

/// Device steps: run unless an earlier one failed, the first failure kept (sticky).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
mod dev {
    use super::{Storage, Tensor};
    use crate::compute::cuda::DeviceBuffer;
    use crate::compute::device::{device_failed, record_device_error};
    use crate::error::Result;

    /// Runs one device step unless the sticky error is set; records its error.
    pub(super) fn step(f: impl FnOnce() -> Result<()>) {
        if device_failed() {
            return;
        }
        if let Err(e) = f() {
            record_device_error(e);
        }
    }

    /// A new device tensor of `n` values written by `f` (a kernel); after a device error a
    /// host tensor of zeros.
    pub(super) fn output(n: usize, f: impl FnOnce(&mut DeviceBuffer<f32>) -> Result<()>) -> Tensor {
        if !device_failed() {
            match DeviceBuffer::alloc(n) {
                Ok(mut b) => {
                    step(|| f(&mut b));
                    return Tensor { storage: Storage::Cuda(b) };
                }
                Err(e) => record_device_error(e),
            }
        }
        Tensor::from(vec![0f32; n])
    }

    /// The values of `b` on the host (zeros after a device error).
    pub(super) fn download(b: &DeviceBuffer<f32>) -> Vec<f32> {
        let mut v = vec![0f32; b.len()];
        step(|| b.copy_to_slice(&mut v));
        v
    }

    /// max |x| on the device (NaN if any x is NaN; 0 after a device error).
    pub(super) fn absmax(x: &DeviceBuffer<f32>) -> f32 {
        let mut out = [0f32];
        step(|| {
            let mut amax = DeviceBuffer::alloc(1)?;
            crate::compute::cuda::absmax_f32_device(x, &mut amax)?;
            amax.copy_to_slice(&mut out)
        });
        out[0]
    }
}

impl Tensor {
    /// A tensor holding `values` on `device` (on the CPU: no copy). A device upload that fails
    /// is recorded as the sticky device error and the tensor stays on the host.
    pub fn on(values: Vec<f32>, device: Device) -> Tensor {
        match device {
            Device::Cpu => Tensor::from(values),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Device::Cuda => {
                if !crate::compute::device::device_failed() {
                    match DeviceBuffer::from_slice(&values) {
                        Ok(b) => return Tensor { storage: Storage::Cuda(b) },
                        Err(e) => crate::compute::device::record_device_error(e),
                    }
                }
                Tensor::from(values)
            }
            #[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
            Device::Cuda => {
                crate::compute::device::record_device_error(crate::error::Error::Unsupported(
                    "--device cuda: this binary was built without the `cuda` feature".into(),
                ));
                Tensor::from(values)
            }
        }
    }

    /// The backend the values are on.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(_) => Device::Cuda,
        }
    }

    /// `n` zeros on the backend of `self`.
    fn zeros_like(&self, n: usize) -> Tensor {
        match &self.storage {
            Storage::Cpu(_) => Tensor::from(vec![0f32; n]),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(_) => Tensor::on(vec![0f32; n], Device::Cuda),
        }
    }

    /// The host fallback of an operation without a kernel (or with operands on different
    /// backends): `op` runs the CPU arm on host copies ([`Tensor::host_copy`]) and its result
    /// goes to `device`.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn via_host(device: Device, op: impl FnOnce() -> Tensor) -> Tensor {
        Tensor::on(op().into_host(), device)
    }

    /// The host fallback of an in-place operation: `op` runs on a host copy of `self`, which
    /// then replaces `self` on its backend.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn update_via_host(&mut self, op: impl FnOnce(&mut Tensor)) {
        let mut h = self.host_copy();
        op(&mut h);
        *self = Tensor::on(h.into_host(), self.device());
    }

    /// A host tensor with the values of `self`.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn host_copy(&self) -> Tensor {
        Tensor::from(self.to_host().into_owned())
    }

    pub fn len(&self) -> usize {
        match &self.storage {
            Storage::Cpu(v) => v.len(),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values, borrowed where they already are in host memory (a device tensor is
    /// downloaded).
    pub fn to_host(&self) -> Cow<'_, [f32]> {
        match &self.storage {
            Storage::Cpu(v) => Cow::Borrowed(v),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(b) => Cow::Owned(dev::download(b)),
        }
    }

    /// The values as a host vector (moved out of a host tensor).
    pub fn into_host(self) -> Vec<f32> {
        match self.storage {
            Storage::Cpu(v) => v,
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(b) => dev::download(&b),
        }
    }

    /// Runs `f` on the values in host memory and keeps what it wrote (for a device tensor:
    /// download, `f`, upload). For hooks whose formula has no kernel on the tensor's backend.
    pub fn map_host(&mut self, f: impl FnOnce(&mut [f32])) {
        match &mut self.storage {
            Storage::Cpu(v) => f(v),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(b) => {
                let mut v = dev::download(b);
                f(&mut v);
                dev::step(|| b.copy_from_slice(&v));
            }
        }
    }

    /// Applies a formula of a later stage: `host` (the formula) on a host tensor, its device
    /// twin `twin` on a device tensor, in place.
    #[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(unused_variables))]
    pub fn map_twin(&mut self, twin: DeviceTwin, host: impl FnOnce(&mut [f32])) {
        match &mut self.storage {
            Storage::Cpu(x) => host(x),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => dev::step(|| match twin {
                DeviceTwin::FakeQuantFp8 { amax } if amax <= 0.0 => Ok(()),
                DeviceTwin::FakeQuantFp8 { amax } => cuda::fake_quant_fp8_device(x, amax),
                DeviceTwin::FakeQuantInt8 { amax } => cuda::fake_quant_int8_device(x, amax),
                DeviceTwin::FakeQuantNvfp4 { cols, global_amax } => cuda::fake_quant_nvfp4_device(x, cols, global_amax),
                DeviceTwin::FakeQuantInt4 { cols, group } => cuda::fake_quant_int4_device(x, cols, group),
            }),
        }
    }

    /// `self[r, c] *= scale[c]` for `self` = `[_, scale.len()]` (SmoothQuant's `pre_quant_scale`).
    pub fn scale_columns(&mut self, scale: &[f32]) {
        match &mut self.storage {
            Storage::Cpu(x) => x.chunks_exact_mut(scale.len()).for_each(|row| row.iter_mut().zip(scale).for_each(|(v, s)| *v *= s)),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => dev::step(|| cuda::mul_cols(x, &DeviceBuffer::from_slice(scale)?)),
        }
    }

    /// `self · wᵀ`: `self` is `[rows, k]`, `w` is `[n, k]` (a Linear weight); result `[rows, n]`.
    pub fn matmul_bt(&self, w: &Tensor, rows: usize, k: usize, n: usize) -> Tensor {
        match (&self.storage, &w.storage) {
            (Storage::Cpu(_), Storage::Cpu(_)) => {}
            // Tensor cores when both operands are bf16 values (a model computed in bf16: the
            // products are exact, only the order of the f32 sums differs from the f32 kernel);
            // the f32 kernel for anything else (f32 models, dequantized or fake-quantized
            // operands at evaluation).
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Storage::Cuda(x), Storage::Cuda(w)) => {
                return dev::output(rows * n, |o| {
                    if cuda::all_bf16(w)? && cuda::all_bf16(x)? {
                        cuda::matmul_bt_bf16(x, w, rows, k, n, o)
                    } else {
                        cuda::matmul_bt(x, w, rows, k, n, o)
                    }
                })
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => return Tensor::via_host(self.device(), || self.host_copy().matmul_bt(&w.host_copy(), rows, k, n)),
        }
        let mut out = self.zeros_like(rows * n);
        match (&self.storage, &w.storage, &mut out.storage) {
            (Storage::Cpu(x), Storage::Cpu(w), Storage::Cpu(o)) => cpu::matmul_bt(x, w, rows, k, n, o),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => unreachable!("matmul_bt: host operands"),
        }
        out
    }

    /// Adds `bias` (`[n]`) to every row of `self` (`[rows, n]`).
    pub fn add_row_bias(&mut self, bias: &Tensor) {
        match (&mut self.storage, &bias.storage) {
            (Storage::Cpu(x), Storage::Cpu(b)) => x.chunks_exact_mut(b.len()).for_each(|row| cpu::add_in_place(row, b)),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Storage::Cuda(x), Storage::Cuda(b)) => dev::step(|| cuda::add_row_bias(x, b, b.len())),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => self.update_via_host(|h| h.add_row_bias(&bias.host_copy())),
        }
    }

    /// `self += other` (same length).
    pub fn add(&mut self, other: &Tensor) {
        match (&mut self.storage, &other.storage) {
            (Storage::Cpu(x), Storage::Cpu(y)) => cpu::add_in_place(x, y),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Storage::Cuda(x), Storage::Cuda(y)) => dev::step(|| cuda::add(x, y)),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => self.update_via_host(|h| h.add(&other.host_copy())),
        }
    }

    /// Rounds every value the way `c` stores tensors (bf16, or unchanged).
    pub fn round(&mut self, c: Compute) {
        match &mut self.storage {
            Storage::Cpu(x) => c.round(x),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => {
                if c == Compute::Bf16 {
                    dev::step(|| cuda::round_bf16(x));
                }
            }
        }
    }

    /// The norm `norm` of every row of `self` (`[rows, weight.len()]`), rounded as `c` does.
    pub fn norm(&self, c: Compute, norm: NormKind, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
        if let (Storage::Cuda(x), Storage::Cuda(w)) = (&self.storage, &weight.storage) {
            let bf16 = c == Compute::Bf16;
            // A bias on the host (never, in practice) takes the fallback below.
            let device_bias = match bias.map(|b| &b.storage) {
                None => Some(None),
                Some(Storage::Cuda(b)) => Some(Some(b)),
                Some(_) => None,
            };
            if let Some(b) = device_bias {
                if !norm.layer_norm {
                    return dev::output(x.len(), |o| cuda::rms_norm(x, w, norm.eps, norm.offset, bf16, o));
                }
                // NemotronLayerNorm1P's weight: 1 + weight in the model dtype (Compute::norm).
                let one_plus = norm.offset.then(|| {
                    let mut one_plus = Tensor::on(vec![1.0; w.len()], Device::Cuda);
                    one_plus.add(weight);
                    one_plus.round(c);
                    one_plus
                });
                let mut out = match one_plus.as_ref().map(|t| &t.storage) {
                    None => dev::output(x.len(), |o| cuda::layer_norm(x, w, b, norm.eps, o)),
                    Some(Storage::Cuda(w1)) => dev::output(x.len(), |o| cuda::layer_norm(x, w1, b, norm.eps, o)),
                    Some(Storage::Cpu(_)) => dev::output(x.len(), |_| Ok(())), // only after a device error
                };
                out.round(c);
                return out;
            }
        }
        #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
        if self.device() != Device::Cpu || weight.device() != Device::Cpu || bias.is_some_and(|b| b.device() != Device::Cpu) {
            return Tensor::via_host(self.device(), || {
                self.host_copy().norm(c, norm, &weight.host_copy(), bias.map(Tensor::host_copy).as_ref())
            });
        }
        let mut out = self.zeros_like(self.len());
        match (&self.storage, &weight.storage, bias.map(|b| &b.storage), &mut out.storage) {
            (Storage::Cpu(x), Storage::Cpu(w), None, Storage::Cpu(o)) => c.norm(norm, x, w, None, o),
            (Storage::Cpu(x), Storage::Cpu(w), Some(Storage::Cpu(b)), Storage::Cpu(o)) => c.norm(norm, x, w, Some(b), o),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => unreachable!("norm: host operands"),
        }
        out
    }

    /// Rotates the `heads` heads of every position of `self` (`[seq, heads * head_dim]`).
    pub fn rope(&mut self, c: Compute, rope: &Rope, seq: usize, heads: usize) {
        match &mut self.storage {
            Storage::Cpu(x) => match c {
                Compute::F32 => rope.apply(x, seq, heads),
                Compute::Bf16 => rope.apply_bf16(x, seq, heads),
            },
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => dev::step(|| {
                let (cos, sin) = rope.device_tables()?;
                let (head_dim, rotary_dim) = rope.dims();
                cuda::rope(x, cos, sin, seq, heads, head_dim, rotary_dim, c == Compute::Bf16)
            }),
        }
    }

    /// Causal attention of `q` over `k`, `v` (`[seq, heads * head_dim]` each, as `attention`
    /// describes them); result like `q`, not rounded.
    pub fn attention(attention: &Attention, q: &Tensor, k: &Tensor, v: &Tensor, seq: usize) -> Tensor {
        match (&q.storage, &k.storage, &v.storage) {
            (Storage::Cpu(_), Storage::Cpu(_), Storage::Cpu(_)) => {}
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Storage::Cuda(qb), Storage::Cuda(kb), Storage::Cuda(vb)) => {
                let a = attention;
                return dev::output(qb.len(), |o| {
                    cuda::attention(qb, kb, vb, seq, a, o)
                });
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => {
                return Tensor::via_host(q.device(), || {
                    Tensor::attention(attention, &q.host_copy(), &k.host_copy(), &v.host_copy(), seq)
                })
            }
        }
        let mut out = q.zeros_like(q.len());
        match (&q.storage, &k.storage, &v.storage, &mut out.storage) {
            (Storage::Cpu(q), Storage::Cpu(k), Storage::Cpu(v), Storage::Cpu(o)) => attention.forward(q, k, v, seq, o),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => unreachable!("attention: host operands"),
        }
        out
    }

    /// The gated MLP's `self ← act(self) * up`, rounded as `c` does.
    pub fn gated_mul(&mut self, c: Compute, act: Activation, up: &Tensor) {
        match (&mut self.storage, &up.storage) {
            (Storage::Cpu(g), Storage::Cpu(u)) => c.gated_mul(act, g, u),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Storage::Cuda(g), Storage::Cuda(u)) => dev::step(|| cuda::gated_mul(g, u, act, c == Compute::Bf16)),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => self.update_via_host(|h| h.gated_mul(c, act, &up.host_copy())),
        }
    }

    /// The logits' last steps in place ([`cpu::finish_logits`]): Granite's division by
    /// `divisor`, Gemma2's soft cap, each op rounded as `c` does.
    pub fn finish_logits(&mut self, c: Compute, divisor: Option<f32>, cap: Option<f32>) {
        let bf16 = c == Compute::Bf16;
        match &mut self.storage {
            Storage::Cpu(x) => cpu::finish_logits(bf16, x, divisor, cap),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => dev::step(|| cuda::finish_logits(x, divisor, cap, bf16)),
        }
    }

    /// `self ← act(self)` element-wise, not rounded.
    pub fn activate(&mut self, act: Activation) {
        let f = act_fn(act);
        match &mut self.storage {
            Storage::Cpu(x) => x.iter_mut().for_each(|v| *v = f(*v)),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => dev::step(|| cuda::activate(x, act)),
        }
    }

    /// Rows `range` of `self` (`[_, cols]`): `[range.len(), cols]`.
    pub fn rows(&self, range: std::ops::Range<usize>, cols: usize) -> Tensor {
        match &self.storage {
            Storage::Cpu(x) => Tensor::from(x[range.start * cols..range.end * cols].to_vec()),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => dev::output(range.len() * cols, |o| o.copy_from_device(x, range.start * cols)),
        }
    }

    /// Rows `rows` of `self` (`[_, cols]`), in that order: `[rows.len(), cols]`.
    pub fn gather_rows(&self, rows: &[usize], cols: usize) -> Tensor {
        match &self.storage {
            Storage::Cpu(x) => Tensor::from(rows.iter().flat_map(|&t| x[t * cols..(t + 1) * cols].iter().copied()).collect::<Vec<f32>>()),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => dev::output(rows.len() * cols, |o| cuda::gather_rows(x, cols, rows, o)),
        }
    }

    /// For each `(row, weight)` of `rows` with the matching row y of `src`: `self[row] += y ·
    /// weight`, each product and sum rounded as `c` does (torch `index_add_` of the weighted rows).
    pub fn index_add_weighted(&mut self, c: Compute, src: &Tensor, rows: &[(usize, f32)], cols: usize) {
        match (&mut self.storage, &src.storage) {
            (Storage::Cpu(out), Storage::Cpu(y)) => {
                for (&(t, w), y) in rows.iter().zip(y.chunks_exact(cols)) {
                    for (o, &v) in out[t * cols..(t + 1) * cols].iter_mut().zip(y) {
                        *o = c.round_one(*o + c.round_one(v * w));
                    }
                }
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Storage::Cuda(out), Storage::Cuda(y)) => {
                dev::step(|| cuda::index_add_weighted(out, y, cols, rows, c == Compute::Bf16))
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => self.update_via_host(|h| h.index_add_weighted(c, &src.host_copy(), rows, cols)),
        }
    }

    /// `-log softmax(row r)[targets[r]]` of every row of `self` (`[targets.len(), vocab]`
    /// logits), in f64 ([`cpu::log_softmax_nll`]; on the CPU the rows are split over threads).
    /// A target outside the vocabulary panics on the CPU and gives NaN on the device.
    pub fn log_softmax_nll(&self, vocab: usize, targets: &[u32]) -> Vec<f64> {
        assert_eq!(self.len(), targets.len() * vocab, "log_softmax_nll: logits are not [targets, vocab]");
        match &self.storage {
            Storage::Cpu(logits) => {
                let per = cpu::rows_per_piece(targets.len());
                let pieces = logits.chunks((per * vocab).max(1)).zip(targets.chunks(per));
                cpu::map_pieces(pieces, |(z, t)| z.chunks_exact(vocab).zip(t).map(|(row, &t)| cpu::log_softmax_nll(row, t as usize)).collect())
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(logits) => {
                let mut out = vec![0f64; targets.len()];
                dev::step(|| {
                    let targets = DeviceBuffer::from_slice(targets)?;
                    let mut nll = DeviceBuffer::alloc(out.len())?;
                    cuda::log_softmax_nll(logits, vocab, &targets, &mut nll)?;
                    nll.copy_to_slice(&mut out)
                });
                out
            }
        }
    }

    /// Max |x| over the tensor, folded into `acc` (per-tensor max calibration, §3.1). On the
    /// device a NaN of the tensor makes the result NaN.
    pub fn amax(&self, acc: f32) -> f32 {
        match &self.storage {
            Storage::Cpu(x) => x.iter().fold(acc, |m, v| m.max(v.abs())),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => {
                let a = dev::absmax(x);
                if a.is_nan() {
                    a
                } else {
                    acc.max(a)
                }
            }
        }
    }

    /// Max |x| of every column of `self` (`[_, cols]`), folded into `acc` (resized to `cols`).
    pub fn channel_amax(&self, cols: usize, acc: &mut Vec<f32>) {
        acc.resize(cols, 0.0);
        match &self.storage {
            Storage::Cpu(x) => {
                for row in x.chunks_exact(cols) {
                    for (m, v) in acc.iter_mut().zip(row) {
                        *m = m.max(v.abs());
                    }
                }
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => dev::step(|| {
                let mut d = DeviceBuffer::from_slice(acc)?;
                cuda::channel_amax(x, cols, &mut d)?;
                d.copy_to_slice(acc)
            }),
        }
    }

    /// The mean |x| of every column of `self` (`[rows, cols]`, rows >= 1), [`cpu::col_abs_mean`].
    pub fn col_abs_mean(&self, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; cols];
        match &self.storage {
            Storage::Cpu(x) => cpu::col_abs_mean(x, cols, &mut out),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => dev::step(|| {
                let mut d = DeviceBuffer::alloc(cols)?;
                cuda::col_abs_mean(x, cols, &mut d)?;
                d.copy_to_slice(&mut out)
            }),
        }
        out
    }

    /// Per row of `self` and `reference` (both `[rows, cols]`), the f64 sum of the squared
    /// differences, each difference rounded as `c` stores tensors and then multiplied by the
    /// matching value of `weight` when given ([`cpu::sq_err_row`]).
    pub fn sq_err_rows(&self, reference: &Tensor, weight: Option<&Tensor>, cols: usize, c: Compute) -> Vec<f64> {
        assert!(cols > 0 && self.len() == reference.len() && self.len().is_multiple_of(cols), "sq_err_rows: shapes differ");
        assert!(weight.is_none_or(|w| w.len() == self.len()), "sq_err_rows: weights are not one per value");
        match (&self.storage, &reference.storage, weight.map(|w| &w.storage)) {
            (Storage::Cpu(y), Storage::Cpu(r), None | Some(Storage::Cpu(_))) => {
                let w = weight.map(Tensor::to_host);
                let round = |d: f32| if c == Compute::Bf16 { crate::numerics::round_bf16(d) } else { d };
                let rows = y.chunks_exact(cols).zip(r.chunks_exact(cols)).enumerate();
                rows.map(|(i, (y, r))| cpu::sq_err_row(y, r, w.as_ref().map(|w| &w[i * cols..(i + 1) * cols]), round)).collect()
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Storage::Cuda(y), Storage::Cuda(r), None | Some(Storage::Cuda(_))) => {
                let w = match weight.map(|w| &w.storage) {
                    Some(Storage::Cuda(w)) => Some(w),
                    _ => None,
                };
                let mut out = vec![0f64; y.len() / cols];
                dev::step(|| {
                    let mut d = DeviceBuffer::alloc(out.len())?;
                    cuda::sq_err_rows(y, r, w, cols, c == Compute::Bf16, &mut d)?;
                    d.copy_to_slice(&mut out)
                });
                out
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => self.host_copy().sq_err_rows(&reference.host_copy(), weight.map(Tensor::host_copy).as_ref(), cols, c),
        }
    }

    /// Every value is finite (no NaN, no ±Inf).
    pub fn all_finite(&self) -> bool {
        match &self.storage {
            Storage::Cpu(x) => x.iter().all(|v| v.is_finite()),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => dev::absmax(x).is_finite(),
        }
    }
}
