//! What calibration and fake-quant evaluation plug into the forward pass. Hooks receive the
//! tensors where they live and ask them for statistics (`Tensor::amax`, `channel_amax`,
//! `all_finite`), so those are computed on the backend that holds the data.

use crate::compute::Tensor;
use crate::model::config::LinearKind;

/// What calibration and fake-quant evaluation plug into the forward pass.
pub trait Hooks {
    /// Input activations of linear `kind` of layer `layer` (`[rows, cols]`, rows = tokens)
    /// just before its matmul. May modify them in place (activation fake-quant): q, k and v
    /// each get their own copy of the normed input, likewise gate and up.
    fn linear_input(&mut self, layer: usize, kind: LinearKind, x: &mut Tensor, cols: usize) {
        let _ = (layer, kind, x, cols);
    }
    /// Keys and values after RoPE (`[seq, n_kv_heads * head_dim]` each), for KV-cache amax;
    /// may modify them (KV-cache fake quantization).
    fn kv(&mut self, layer: usize, k: &mut Tensor, v: &mut Tensor) {
        let _ = (layer, k, v);
    }
    /// Input of expert `expert`'s linear `kind` (Gate, Up or Down) in an MoE layer: only the
    /// rows of the tokens routed to that expert. Defaults to `linear_input` with `kind`, so an
    /// observer that does not tell experts apart sees the union over the block's experts.
    fn expert_input(&mut self, layer: usize, expert: usize, kind: LinearKind, x: &mut Tensor, cols: usize) {
        let _ = expert;
        self.linear_input(layer, kind, x, cols);
    }
}

/// The plain forward pass.
pub struct NoHooks;
impl Hooks for NoHooks {}
