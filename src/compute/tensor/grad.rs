//! The operations of the activation-gradient backward (src/ptq/backward.rs, auto-quantize's
//! score, spec/algorithms.md §9.3) on [`Tensor`]: each dispatches to its CPU oracle in
//! compute/cpu/grad.rs or to the device twin in cuda/backward.cu, like the forward's methods
//! in the parent module.

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use super::dev;
use super::{Storage, Tensor};
use crate::compute::arith::{Activation, NormKind};
use crate::compute::cpu;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use crate::compute::cuda::{self, DeviceBuffer};

impl Tensor {
    /// The `[cols, rows]` transpose of `self` (`[rows, cols]`).
    pub fn transpose(&self, rows: usize, cols: usize) -> Tensor {
        match &self.storage {
            Storage::Cpu(a) => {
                let mut out = vec![0f32; a.len()];
                cpu::transpose(a, rows, cols, &mut out);
                Tensor::from(out)
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(a) => dev::output(a.len(), |o| cuda::transpose(a, rows, cols, o)),
        }
    }

    /// Columns `c0..c0 + n` of `self` (rows of `width` values), as a contiguous `[rows, n]`.
    pub fn columns(&self, width: usize, c0: usize, n: usize) -> Tensor {
        let len = self.len() / width * n;
        match &self.storage {
            Storage::Cpu(a) => {
                let mut out = vec![0f32; len];
                cpu::copy_columns(a, width, c0, &mut out, n, 0, n);
                Tensor::from(out)
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(a) => dev::output(len, |o| cuda::copy_columns(a, width, c0, o, n, 0, n)),
        }
    }

    /// Writes `src` (`[rows, n]`) into columns `c0..c0 + n` of `self` (rows of `width` values).
    pub fn set_columns(&mut self, src: &Tensor, width: usize, c0: usize, n: usize) {
        match (&mut self.storage, &src.storage) {
            (Storage::Cpu(d), Storage::Cpu(s)) => cpu::copy_columns(s, n, 0, d, width, c0, n),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Storage::Cuda(d), Storage::Cuda(s)) => dev::step(|| cuda::copy_columns(s, n, 0, d, width, c0, n)),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => self.update_via_host(|h| h.set_columns(&src.host_copy(), width, c0, n)),
        }
    }

    /// `self[offset..offset + other.len()] += other`.
    pub fn add_at(&mut self, offset: usize, other: &Tensor) {
        match (&mut self.storage, &other.storage) {
            (Storage::Cpu(x), Storage::Cpu(y)) => cpu::add_in_place(&mut x[offset..offset + y.len()], y),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Storage::Cuda(x), Storage::Cuda(y)) => dev::step(|| cuda::add_at(x, offset, y)),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => self.update_via_host(|h| h.add_at(offset, &other.host_copy())),
        }
    }

    /// `self[r, ·] *= w[r]` for rows of `cols` values ([`cpu::scale_rows`]).
    pub fn scale_rows(&mut self, cols: usize, w: &[f32]) {
        match &mut self.storage {
            Storage::Cpu(x) => cpu::scale_rows(x, cols, w),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => dev::step(|| cuda::scale_rows(x, cols, &DeviceBuffer::from_slice(w)?)),
        }
    }

    /// The attention backward's softmax of a score block in place ([`cpu::softmax_rows`]):
    /// `self` is `[rows, n_keys]`, queries `t0..`, keys `lo..`.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_rows(
        &mut self,
        n_keys: usize,
        t0: usize,
        lo: usize,
        window: Option<usize>,
        scale: f32,
        softcap: Option<f32>,
        alibi_slope: Option<f32>,
    ) {
        match &mut self.storage {
            Storage::Cpu(p) => cpu::softmax_rows(p, n_keys, t0, lo, window, scale, softcap, alibi_slope),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(p) => dev::step(|| cuda::softmax_rows(p, n_keys, t0, lo, window, scale, softcap, alibi_slope)),
        }
    }

    /// `self[i] *= 1 − tanh(scale·raw[i] / cap)²`: the soft cap's backward ([`cpu::softcap_grad`]).
    pub fn softcap_grad(&mut self, raw: &Tensor, scale: f32, cap: f32) {
        match (&mut self.storage, &raw.storage) {
            (Storage::Cpu(ds), Storage::Cpu(raw)) => cpu::softcap_grad(ds, raw, scale, cap),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Storage::Cuda(ds), Storage::Cuda(raw)) => dev::step(|| cuda::softcap_grad(ds, raw, scale, cap)),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => self.update_via_host(|h| h.softcap_grad(&raw.host_copy(), scale, cap)),
        }
    }

    /// `self` (dP, `[rows, n_keys]`) becomes `scale · P ⊙ (dP − rowsum(P ⊙ dP))`
    /// ([`cpu::attention_ds`]).
    pub fn attention_ds(&mut self, p: &Tensor, n_keys: usize, scale: f32) {
        match (&mut self.storage, &p.storage) {
            (Storage::Cpu(ds), Storage::Cpu(p)) => cpu::attention_ds(ds, p, n_keys, scale),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Storage::Cuda(ds), Storage::Cuda(p)) => dev::step(|| cuda::attention_ds(ds, p, n_keys, scale)),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => self.update_via_host(|h| h.attention_ds(&p.host_copy(), n_keys, scale)),
        }
    }

    /// `self += dL/dx` of the norm `norm` at its input `x`, given `dy` = dL/d(output)
    /// ([`cpu::norm_backward_add`]); rows of `weight.len()` values.
    pub fn norm_backward_add(&mut self, norm: NormKind, x: &Tensor, weight: &Tensor, dy: &Tensor) {
        match (&mut self.storage, &x.storage, &weight.storage, &dy.storage) {
            (Storage::Cpu(acc), Storage::Cpu(x), Storage::Cpu(w), Storage::Cpu(dy)) => cpu::norm_backward_add(norm, x, w, dy, acc),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Storage::Cuda(acc), Storage::Cuda(x), Storage::Cuda(w), Storage::Cuda(dy)) => {
                dev::step(|| cuda::norm_backward_add(acc, x, w, dy, norm))
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => self.update_via_host(|h| h.norm_backward_add(norm, &x.host_copy(), &weight.host_copy(), &dy.host_copy())),
        }
    }

    /// `(dm ⊙ u) ⊙ act'(self)`, or `dm ⊙ act'(self)` without `u` ([`cpu::act_grad_mul`]):
    /// the gradient at the activation's input `self`.
    pub fn act_grad_mul(&self, act: Activation, dm: &Tensor, u: Option<&Tensor>) -> Tensor {
        match (&self.storage, &dm.storage, u.map(|u| &u.storage)) {
            (Storage::Cpu(x), Storage::Cpu(d), None | Some(Storage::Cpu(_))) => {
                let u = u.map(Tensor::to_host);
                let mut out = vec![0f32; x.len()];
                cpu::act_grad_mul(act, x, d, u.as_deref(), &mut out);
                Tensor::from(out)
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Storage::Cuda(x), Storage::Cuda(d), None | Some(Storage::Cuda(_))) => {
                let u = match u.map(|u| &u.storage) {
                    Some(Storage::Cuda(u)) => Some(u),
                    _ => None,
                };
                dev::output(x.len(), |o| cuda::act_grad_mul(x, d, u, act, o))
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            _ => Tensor::via_host(self.device(), || {
                self.host_copy().act_grad_mul(act, &dm.host_copy(), u.map(Tensor::host_copy).as_ref())
            }),
        }
    }

    /// Swaps the halves of the leading `rotary_dim` values of every head
    /// ([`cpu::swap_rotary_halves`]).
    pub fn swap_rotary_halves(&mut self, head_dim: usize, rotary_dim: usize) {
        match &mut self.storage {
            Storage::Cpu(x) => cpu::swap_rotary_halves(x, head_dim, rotary_dim),
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(x) => dev::step(|| cuda::swap_rotary_halves(x, head_dim, rotary_dim)),
        }
    }

    /// Each row of logits (`[targets.len(), vocab]`) becomes `scale · (softmax − onehot(target))`
    /// ([`cpu::xent_grad_row`]); returns each row's NLL. On the CPU the rows are split over
    /// threads.
    pub fn xent_grad_rows(&mut self, vocab: usize, targets: &[u32], scale: f32) -> Vec<f64> {
        assert_eq!(self.len(), targets.len() * vocab, "xent_grad_rows: logits are not [targets, vocab]");
        match &mut self.storage {
            Storage::Cpu(z) => {
                let per = cpu::rows_per_piece(targets.len());
                let pieces = z.chunks_mut((per * vocab).max(1)).zip(targets.chunks(per));
                cpu::map_pieces(pieces, |(z, t)| z.chunks_exact_mut(vocab).zip(t).map(|(row, &t)| cpu::xent_grad_row(row, t as usize, scale)).collect())
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            Storage::Cuda(z) => {
                let mut out = vec![0f64; targets.len()];
                dev::step(|| {
                    let targets = DeviceBuffer::from_slice(targets)?;
                    let mut nll = DeviceBuffer::alloc(out.len())?;
                    cuda::xent_grad_rows(z, vocab, &targets, scale, &mut nll)?;
                    nll.copy_to_slice(&mut out)
                });
                out
            }
        }
    }
}
