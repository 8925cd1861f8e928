//! What SmoothQuant and AWQ share: the clamp range of their scales, PyTorch's `pow` as the
//! scale formulas call it, and the averaging of scales over linears that read one input.

use crate::io::safetensors::Dtype;
use crate::quant::fp8::round_to_dtype;

/// Clamp range of every smoothing / AWQ scale (§5 step 3, §6.1 `get_scale`).
pub const SCALE_MIN: f32 = 1e-4;
pub const SCALE_MAX: f32 = 1e4;

/// `1 - alpha` as ModelOpt's `tensor.pow(1 - alpha)` receives it: computed on Python floats
/// (f64), then handed to the f32 kernel.
pub fn one_minus(alpha: f32) -> f32 {
    (1.0 - alpha as f64) as f32
}

/// `tensor.pow(e)` for a Python-scalar exponent, with PyTorch's special cases: `e == 0` fills
/// ones (even for 0 and NaN bases), `e == 1` copies, `e == 0.5` is `sqrt` and `e == 2` is
/// `x * x` (ATen `pow_out` and the CUDA `pow_tensor_scalar` kernel); anything else is `powf`.
pub fn torch_pow(x: f32, e: f32) -> f32 {
    if e == 0.0 {
        1.0
    } else if e == 1.0 {
        x
    } else if e == 0.5 {
        x.sqrt()
    } else if e == 2.0 {
        x * x
    } else {
        x.powf(e)
    }
}

/// The shared scale of linears that read the same input (§7 step 2, export-formats §2.7
/// step 1): the element-wise arithmetic mean of their pre_quant_scales. ModelOpt takes
/// `torch.mean` of the stored (model-dtype) vectors: an f32 sum times `1/n`, rounded to the
/// model dtype. An empty list gives an empty vector.
///
/// Panics if the vectors differ in length (a caller bug).
pub fn average_scales(scales: &[&[f32]], dtype: Dtype) -> Vec<f32> {
    let Some(first) = scales.first() else {
        return Vec::new();
    };
    assert!(scales.iter().all(|s| s.len() == first.len()), "average_scales: vectors of different lengths");
    let factor = 1.0 / scales.len() as f32;
    (0..first.len()).map(|j| round_to_dtype(scales.iter().fold(0f32, |a, s| a + s[j]) * factor, dtype)).collect()
}
