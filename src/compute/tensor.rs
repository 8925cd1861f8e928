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

use crate::compute::arith::{act_fn, Activation, Compute, NormKind};
use crate::compute::cpu::{self, Attention, Rope};
use std::borrow::Cow;

/// An f32 tensor on one backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    storage: Storage,
}

#[derive(Clone, Debug, PartialEq)]
enum Storage {
    /// Host memory: the CPU backend (src/compute/cpu).
    Cpu(Vec<f32>),
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

impl Tensor {
    /// `n` zeros on the backend of `self`.
    fn zeros_like(&self, n: usize) -> Tensor {
        match &self.storage {
            Storage::Cpu(_) => Tensor::from(vec![0f32; n]),
        }
    }

    pub fn len(&self) -> usize {
        match &self.storage {
            Storage::Cpu(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values, borrowed where they already are in host memory.
    pub fn to_host(&self) -> Cow<'_, [f32]> {
        match &self.storage {
            Storage::Cpu(v) => Cow::Borrowed(v),
        }
    }

    /// The values as a host vector (moved out of a host tensor).
    pub fn into_host(self) -> Vec<f32> {
        match self.storage {
            Storage::Cpu(v) => v,
        }
    }

    /// Runs `f` on the values in host memory and keeps what it wrote (for a device tensor:
    /// download, `f`, upload). For hooks whose formula has no kernel on the tensor's backend.
    pub fn map_host(&mut self, f: impl FnOnce(&mut [f32])) {
        match &mut self.storage {
            Storage::Cpu(v) => f(v),
        }
    }

    /// `self · wᵀ`: `self` is `[rows, k]`, `w` is `[n, k]` (a Linear weight); result `[rows, n]`.
    pub fn matmul_bt(&self, w: &Tensor, rows: usize, k: usize, n: usize) -> Tensor {
        let mut out = self.zeros_like(rows * n);
        match (&self.storage, &w.storage, &mut out.storage) {
            (Storage::Cpu(x), Storage::Cpu(w), Storage::Cpu(o)) => cpu::matmul_bt(x, w, rows, k, n, o),
        }
        out
    }

    /// Adds `bias` (`[n]`) to every row of `self` (`[rows, n]`).
    pub fn add_row_bias(&mut self, bias: &Tensor) {
        match (&mut self.storage, &bias.storage) {
            (Storage::Cpu(x), Storage::Cpu(b)) => x.chunks_exact_mut(b.len()).for_each(|row| cpu::add_in_place(row, b)),
        }
    }

    /// `self += other` (same length).
    pub fn add(&mut self, other: &Tensor) {
        match (&mut self.storage, &other.storage) {
            (Storage::Cpu(x), Storage::Cpu(y)) => cpu::add_in_place(x, y),
        }
    }

    /// Rounds every value the way `c` stores tensors (bf16, or unchanged).
    pub fn round(&mut self, c: Compute) {
        match &mut self.storage {
            Storage::Cpu(x) => c.round(x),
        }
    }

    /// The norm `norm` of every row of `self` (`[rows, weight.len()]`), rounded as `c` does.
    pub fn norm(&self, c: Compute, norm: NormKind, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let mut out = self.zeros_like(self.len());
        match (&self.storage, &weight.storage, bias.map(|b| &b.storage), &mut out.storage) {
            (Storage::Cpu(x), Storage::Cpu(w), None, Storage::Cpu(o)) => c.norm(norm, x, w, None, o),
            (Storage::Cpu(x), Storage::Cpu(w), Some(Storage::Cpu(b)), Storage::Cpu(o)) => c.norm(norm, x, w, Some(b), o),
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
        }
    }

    /// Causal attention of `q` over `k`, `v` (`[seq, heads * head_dim]` each, as `attention`
    /// describes them); result like `q`, not rounded.
    pub fn attention(attention: &Attention, q: &Tensor, k: &Tensor, v: &Tensor, seq: usize) -> Tensor {
        let mut out = q.zeros_like(q.len());
        match (&q.storage, &k.storage, &v.storage, &mut out.storage) {
            (Storage::Cpu(q), Storage::Cpu(k), Storage::Cpu(v), Storage::Cpu(o)) => attention.forward(q, k, v, seq, o),
        }
        out
    }

    /// The gated MLP's `self ← act(self) * up`, rounded as `c` does.
    pub fn gated_mul(&mut self, c: Compute, act: Activation, up: &Tensor) {
        match (&mut self.storage, &up.storage) {
            (Storage::Cpu(g), Storage::Cpu(u)) => c.gated_mul(act, g, u),
        }
    }

    /// `self ← act(self)` element-wise, not rounded.
    pub fn activate(&mut self, act: Activation) {
        let f = act_fn(act);
        match &mut self.storage {
            Storage::Cpu(x) => x.iter_mut().for_each(|v| *v = f(*v)),
        }
    }

    /// Rows `range` of `self` (`[_, cols]`): `[range.len(), cols]`.
    pub fn rows(&self, range: std::ops::Range<usize>, cols: usize) -> Tensor {
        match &self.storage {
            Storage::Cpu(x) => Tensor::from(x[range.start * cols..range.end * cols].to_vec()),
        }
    }

    /// Rows `rows` of `self` (`[_, cols]`), in that order: `[rows.len(), cols]`.
    pub fn gather_rows(&self, rows: &[usize], cols: usize) -> Tensor {
        match &self.storage {
            Storage::Cpu(x) => Tensor::from(rows.iter().flat_map(|&t| x[t * cols..(t + 1) * cols].iter().copied()).collect::<Vec<f32>>()),
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
        }
    }

    /// Max |x| over the tensor, folded into `acc` (per-tensor max calibration, §3.1).
    pub fn amax(&self, acc: f32) -> f32 {
        match &self.storage {
            Storage::Cpu(x) => x.iter().fold(acc, |m, v| m.max(v.abs())),
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
        }
    }

    /// Every value is finite (no NaN, no ±Inf).
    pub fn all_finite(&self) -> bool {
        match &self.storage {
            Storage::Cpu(x) => x.iter().all(|v| v.is_finite()),
        }
    }
}
