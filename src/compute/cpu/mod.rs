//! CPU kernels on row-major f32 slices: the oracle every other backend is checked against,
//! and fast enough to calibrate and evaluate small and medium models on its own.
//!
//! Layouts follow PyTorch: activations are `[rows, cols]` with rows = tokens, a Linear weight
//! is `[out_features, in_features]`. Each kernel names the Hugging Face transformers code it
//! reproduces, so a mismatch can be traced to one formula.

mod attention;
mod grad;
mod matmul;
mod norm;
mod reduce;
mod simd;
mod threads;

pub use attention::{alibi_slopes, Alibi, Attention};
pub use matmul::{matmul_bt, matmul_bt_naive};
pub use grad::{
    act_grad_mul, attention_ds, copy_columns, norm_backward_add, scale_rows, softcap_grad, softmax_rows, swap_rotary_halves, transpose,
    xent_grad_row,
};
pub use norm::{
    add_in_place, exp_nonpositive, finish_logits, gated_mul, gated_mul_bf16, gelu, gelu_tanh, layer_norm, log_softmax_nll, relu2, rms_norm,
    rms_norm_bf16, rms_norm_offset, rms_norm_offset_bf16, round_slice_bf16, silu, silu_mul, Activation, NormKind,
};
pub use reduce::{col_abs_mean, sq_err_row, warp_sum};
pub use threads::num_threads;
pub(crate) use threads::{map_pieces, rows_per_piece};
