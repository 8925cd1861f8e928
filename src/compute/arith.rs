//! How a forward pass rounds (`Compute`: f32, or bf16 where PyTorch materializes a bf16
//! tensor) and which norm and activation a family uses (`NormKind`, `Activation`, defined beside
//! the CPU kernels they select), as the CPU kernels apply them.

use crate::compute::cpu;
pub use crate::compute::cpu::{Activation, NormKind};

/// Arithmetic of the forward pass. `F32` computes everything in f32. `Bf16` also rounds every
/// intermediate tensor to bf16 where PyTorch materializes one when it runs a bf16 model
/// (linear outputs, norm outputs, RoPE products, activations, residual sums): calibrating
/// this way reproduces ModelOpt's activation amax, which it observes on bf16 tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compute {
    #[default]
    F32,
    Bf16,
}

impl Compute {
    /// Rounds a tensor the way this arithmetic stores it (bf16 or unchanged).
    pub fn round(self, x: &mut [f32]) {
        if self == Compute::Bf16 {
            cpu::round_slice_bf16(x);
        }
    }
    /// One value rounded the way this arithmetic stores tensors.
    pub fn round_one(self, v: f32) -> f32 {
        match self {
            Compute::Bf16 => crate::numerics::round_bf16(v),
            Compute::F32 => v,
        }
    }

    /// The gated MLP's `gate ← act(gate) * up` (bf16: `act(gate)` and the product each rounded).
    pub fn gated_mul(self, act: Activation, gate: &mut [f32], up: &[f32]) {
        match self {
            Compute::F32 => cpu::gated_mul(act_fn(act), gate, up),
            Compute::Bf16 => cpu::gated_mul_bf16(act_fn(act), gate, up),
        }
    }

    /// A norm of kind `norm`: RMSNorm (`rms_norm`), or LayerNorm with `bias` when
    /// `norm.layer_norm` (`1 + weight` when `norm.offset`: HF `NemotronLayerNorm1P`, which adds
    /// the 1 to the weight in the model dtype; `nn.LayerNorm` computes in f32 and rounds its
    /// output once).
    pub fn norm(self, norm: NormKind, x: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        if !norm.layer_norm {
            return self.rms_norm(norm.offset, x, weight, norm.eps, out);
        }
        let one_plus: Vec<f32>;
        let weight = if norm.offset {
            one_plus = weight.iter().map(|&w| self.round_one(w + 1.0)).collect();
            &one_plus
        } else {
            weight
        };
        cpu::layer_norm(x, weight, bias, norm.eps, out);
        self.round(out);
    }

    /// HF `LlamaRMSNorm`, or `GemmaRMSNorm` (`1 + weight`) when `offset`.
    pub fn rms_norm(self, offset: bool, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        match (self, offset) {
            (Compute::F32, false) => cpu::rms_norm(x, weight, eps, out),
            (Compute::Bf16, false) => cpu::rms_norm_bf16(x, weight, eps, out),
            (Compute::F32, true) => cpu::rms_norm_offset(x, weight, eps, out),
            (Compute::Bf16, true) => cpu::rms_norm_offset_bf16(x, weight, eps, out),
        }
    }
}

/// The MLP activation's scalar function.
pub fn act_fn(act: Activation) -> fn(f32) -> f32 {
    match act {
        Activation::Silu => cpu::silu,
        Activation::GeluTanh => cpu::gelu_tanh,
        Activation::Relu2 => cpu::relu2,
        Activation::Gelu => cpu::gelu,
    }
}

