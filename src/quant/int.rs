//! Integer formats: INT8 per-output-channel weights with a per-tensor INT8 activation
//! (SmoothQuant, W8A8_SQ_PER_CHANNEL) and INT4 per-group-of-128 weights (W4A16_AWQ, the first
//! stage of W4A8_AWQ), as ModelOpt fake-quantizes and exports them (spec/algorithms.md §4.1,
//! spec/export-formats.md §1.5 and §2.5 "INT8 SmoothQuant", "INT4 AWQ").

use crate::error::{Error, Result};
use crate::quant::fp8::{absmax, round_to_dtype};
use crate::io::safetensors::Dtype;

/// INT8 `maxbound` 2^7 − 1 (spec/algorithms.md §1).
pub const INT8_MAX: f32 = 127.0;
/// INT4 `maxbound` 2^3 − 1 (spec/algorithms.md §1).
pub const INT4_MAX: f32 = 7.0;

/// f32 constants 1/127 and 1/7. ModelOpt's export divides the f32 amax by the Python int
/// `maxbound`, which PyTorch on CUDA does as a multiply by the f32 reciprocal, the same habit
/// as FP8's 1/448 (reference/README.md "verified facts"); the reference INT8 / INT4 scales
/// are reproduced this way (tests/quant_formats.rs).
const INV_INT8_MAX: f32 = 1.0 / INT8_MAX;
const INV_INT4_MAX: f32 = 1.0 / INT4_MAX;

/// Below this amax the fake-quant kernels output zeros (spec/algorithms.md §4.1).
const MIN_AMAX: f32 = 1.0 / 16_777_216.0; // 2^-24

/// An export scale `amax / maxbound`, with `export_amax`'s rule that an amax of 0 (or NaN)
/// becomes the maxbound, i.e. scale 1.0 (spec/export-formats.md §1.2). `maxbound × f32(1/maxbound)`
/// is exactly 1.0 for 127 and 7.
fn export_scale(amax: f32, maxbound: f32, inv: f32) -> f32 {
    let a = if amax == 0.0 || amax.is_nan() { maxbound } else { amax };
    a * inv
}

/// INT8 per-output-channel real quantization of a `[out, inp]` weight for export
/// (spec/algorithms.md §4.1 "Real INT8", spec/export-formats.md §2.5 "INT8 SmoothQuant";
/// ModelOpt's `get_scaling_factor` + `to_quantized_weight`). Per row: the amax (max |w|, held in
/// the model dtype like every weight amax buffer, spec/algorithms.md §3.1) gives
/// `scale = amax × f32(1/127)` (zero row → 1.0); codes = clamp(round_half_even(w / scale),
/// −128, 127). Unlike FP8's 0-d scale, the per-row scale is a 1-D f32 tensor, so PyTorch
/// promotes the bf16 weight and divides in f32, not in the model dtype.
/// Returns the I8 codes (`[out, inp]`) and the F32 scales (`[out]`).
pub fn int8_quantize_rows(name: &str, w: &[f32], out: usize, inp: usize, dtype: Dtype) -> Result<(Vec<i8>, Vec<f32>)> {
    if w.len() != out * inp {
        return Err(Error::tensor(name, format!("{} values for shape [{out}, {inp}]", w.len())));
    }
    let scales = int8_row_scales(w, out, inp, dtype);
    let mut codes = Vec::with_capacity(w.len());
    for (row, &s) in w.chunks_exact(inp.max(1)).zip(&scales) {
        codes.extend(row.iter().map(|&x| (x / s).round_ties_even().clamp(-128.0, 127.0) as i8));
    }
    Ok((codes, scales))
}

/// The F32 per-row scales of [`int8_quantize_rows`] (`amax × f32(1/127)`, zero row → 1.0), `[out]`.
pub fn int8_row_scales(w: &[f32], out: usize, inp: usize, dtype: Dtype) -> Vec<f32> {
    if inp == 0 {
        return vec![1.0; out];
    }
    w.chunks_exact(inp).map(|row| export_scale(round_to_dtype(absmax(row), dtype), INT8_MAX, INV_INT8_MAX)).collect()
}

/// Per-tensor INT8 fake quantization of activations in place, the kernel formula of
/// spec/algorithms.md §4.1: amax < 2^-24 → all zeros; `s = 127 / amax` (a multiplier);
/// `y = clamp(rint(x·s), −128, 127) / s`. Results are f32: round to the model dtype after.
pub fn int8_fake_quant(x: &mut [f32], amax: f32) {
    fake_quant_int(x, amax, INT8_MAX);
}

/// Activation `input_scale = amax / 127` (spec/algorithms.md §4.1, spec/export-formats.md §2.5
/// "INT8 SmoothQuant"): the amax in the model dtype (it is observed on bf16 activations),
/// 0 → scale 1.0 (`export_amax`), times f32(1/127). All 56 reference `int8_sq` input scales are
/// `int8_input_scale(1.0, BF16)` (the smoothed activations have max 1).
pub fn int8_input_scale(amax: f32, dtype: Dtype) -> f32 {
    export_scale(round_to_dtype(amax, dtype), INT8_MAX, INV_INT8_MAX)
}

/// The shared fake-quant kernel for integers (spec/algorithms.md §4.1, narrow_range = False:
/// codes −(maxb+1)..=maxb).
fn fake_quant_int(x: &mut [f32], amax: f32, maxb: f32) {
    if amax < MIN_AMAX {
        x.fill(0.0);
        return;
    }
    let s = maxb / amax;
    for v in x {
        *v = (*v * s).round_ties_even().clamp(-maxb - 1.0, maxb) / s;
    }
}

/// Packs signed INT4 codes (−8..=7, `[out, inp]` row-major) the way ModelOpt's
/// `pack_int4_in_uint8` does (spec/export-formats.md §1.5, spec/algorithms.md §4.1 "Real INT4"):
/// along the OUTPUT dimension, byte (j, c) = low nibble q[2j, c], high nibble q[2j+1, c], each
/// the two's complement masked with 0xF; result `[out/2, inp]`. `out` must be even and
/// `q.len() == out × inp`.
pub fn int4_pack(q: &[i8], out: usize, inp: usize) -> Vec<u8> {
    debug_assert!(out.is_multiple_of(2) && q.len() == out * inp);
    if inp == 0 {
        return Vec::new();
    }
    q.chunks_exact(2 * inp)
        .flat_map(|pair| {
            let (lo, hi) = pair.split_at(inp);
            lo.iter().zip(hi).map(|(&a, &b)| (a as u8 & 0xF) | ((b as u8 & 0xF) << 4))
        })
        .collect()
}

/// Inverse of [`int4_pack`]: `[out/2, inp]` bytes back to `[out, inp]` signed codes
/// (spec/export-formats.md §1.5).
pub fn int4_unpack(packed: &[u8], out: usize, inp: usize) -> Vec<i8> {
    debug_assert!(out.is_multiple_of(2) && packed.len() == out / 2 * inp);
    let nibble = |n: u8| ((n << 4) as i8) >> 4; // sign-extend bit 3
    let mut q = Vec::with_capacity(out * inp);
    if inp == 0 {
        return q;
    }
    for row in packed.chunks_exact(inp) {
        q.extend(row.iter().map(|&b| nibble(b & 0xF)));
        q.extend(row.iter().map(|&b| nibble(b >> 4)));
    }
    q
}

/// Checks the shapes of an INT4 group-quantized weight and returns the groups per row.
fn int4_groups(name: &str, len: usize, out: usize, inp: usize, group: usize) -> Result<usize> {
    if len != out * inp {
        return Err(Error::tensor(name, format!("{len} values for shape [{out}, {inp}]")));
    }
    if group == 0 || !inp.is_multiple_of(group) {
        return Err(Error::tensor(
            name,
            format!("shape [{out}, {inp}]: the input dimension {inp} is not a multiple of the INT4 group size {group}"),
        ));
    }
    if !out.is_multiple_of(2) {
        return Err(Error::tensor(
            name,
            format!("shape [{out}, {inp}]: INT4 packs pairs of output rows (group size {group}), so the output dimension {out} must be even"),
        ));
    }
    Ok(inp / group)
}

/// INT4 per-group real quantization of a `[out, inp]` weight for export (W4A16_AWQ / W4A8_AWQ;
/// spec/algorithms.md §4.1 "Real INT4", spec/export-formats.md §1.5, §2.5 "INT4 AWQ"; ModelOpt's
/// `get_scaling_factor` + `pack_int4_in_uint8`). Per (row o, group b): amax = `block_amax[o·nb + b]`
/// when given (the static amax awq_clip leaves, possibly clipped) or else max |w| of the group,
/// held in the model dtype like the amax buffer (spec/algorithms.md §3.1); `scale = amax × f32(1/7)`
/// (a zero amax gives 1.0, `export_amax`); q = clamp(round_half_even(w / scale), −8, 7) with the
/// division in f32 (1-D f32 scales promote the weight); packed by [`int4_pack`].
/// Returns the packed U8 weight `[out/2, inp]` and the F32 scales `[out, inp/group]`.
///
/// ModelOpt's export needs `out` even (it asserts) and `inp` a multiple of the group
/// (`get_scaling_factor_from_weight` raises; `pack_int4_in_uint8` would silently use a wrong
/// group width); both are `Error::tensor` here, as is a `block_amax` of the wrong length.
pub fn int4_quantize(
    name: &str,
    w: &[f32],
    out: usize,
    inp: usize,
    group: usize,
    block_amax: Option<&[f32]>,
    dtype: Dtype,
) -> Result<(Vec<u8>, Vec<f32>)> {
    let scales = int4_group_scales(name, w, out, inp, group, block_amax, dtype)?;
    Ok((int4_quantize_with_scales(name, w, out, inp, group, &scales)?, scales))
}

/// The F32 group scales of [`int4_quantize`] (`amax × f32(1/7)`, zero amax → 1.0), `[out, inp/group]`.
pub fn int4_group_scales(
    name: &str,
    w: &[f32],
    out: usize,
    inp: usize,
    group: usize,
    block_amax: Option<&[f32]>,
    dtype: Dtype,
) -> Result<Vec<f32>> {
    let nb = int4_groups(name, w.len(), out, inp, group)?;
    if let Some(a) = block_amax {
        if a.len() != out * nb {
            return Err(Error::tensor(
                name,
                format!(
                    "{} block amax values for shape [{out}, {inp}] with group size {group} (expected {})",
                    a.len(),
                    out * nb
                ),
            ));
        }
    }
    Ok(w.chunks_exact(group)
        .enumerate()
        .map(|(i, g)| {
            let amax = block_amax.map_or_else(|| absmax(g), |a| a[i]);
            export_scale(round_to_dtype(amax, dtype), INT4_MAX, INV_INT4_MAX)
        })
        .collect())
}

/// INT4 codes of a `[out, inp]` weight for given group scales `[out, inp/group]`:
/// q = clamp(round_half_even(w / scale), −8, 7), the division in f32, packed by [`int4_pack`].
pub fn int4_quantize_with_scales(
    name: &str,
    w: &[f32],
    out: usize,
    inp: usize,
    group: usize,
    scales: &[f32],
) -> Result<Vec<u8>> {
    let nb = int4_groups(name, w.len(), out, inp, group)?;
    if scales.len() != out * nb {
        return Err(Error::tensor(name, format!("{} INT4 scales for {} groups", scales.len(), out * nb)));
    }
    let q: Vec<i8> = w
        .chunks_exact(group)
        .zip(scales)
        .flat_map(|(g, &s)| g.iter().map(move |&x| (x / s).round_ties_even().clamp(-8.0, 7.0) as i8))
        .collect();
    Ok(int4_pack(&q, out, inp))
}

/// Weights back from an INT4 export: `w[o, c] = q[o, c] × scale[o, c / group]`
/// (spec/export-formats.md §2.5 "INT4 AWQ"). `packed` is `[out/2, inp]`, `scales`
/// `[out, inp/group]` (check the tensor shapes first).
pub fn int4_dequantize(packed: &[u8], scales: &[f32], out: usize, inp: usize, group: usize) -> Vec<f32> {
    if group == 0 {
        return Vec::new();
    }
    debug_assert!(inp.is_multiple_of(group) && scales.len() == out * (inp / group));
    int4_unpack(packed, out, inp)
        .chunks_exact(group)
        .zip(scales)
        .flat_map(|(g, &s)| g.iter().map(move |&v| v as f32 * s))
        .collect()
}

/// INT4 per-group fake quantization of a `[out, inp]` weight in place, the kernel formula of
/// spec/algorithms.md §4.1 (used by the AWQ search): per group, amax = `block_amax[o·nb + b]`
/// (`nb = ceil(inp / group)`) or max |w|; amax < 2^-24 → zeros; `s = 7 / amax`;
/// `y = clamp(rint(w·s), −8, 7) / s`. A partial last group behaves like ModelOpt's zero padding
/// (static block quant pads the last dim, spec/algorithms.md §1 step 4). Results are f32.
/// `w.len()` must be `out × inp` and `block_amax`, when given, hold `out × nb` values.
pub fn int4_fake_quant(w: &mut [f32], out: usize, inp: usize, group: usize, block_amax: Option<&[f32]>) {
    debug_assert!(w.len() == out * inp);
    if inp == 0 || group == 0 {
        return;
    }
    let nb = inp.div_ceil(group);
    debug_assert!(block_amax.is_none_or(|a| a.len() == out * nb));
    for (o, row) in w.chunks_mut(inp).enumerate() {
        for (b, g) in row.chunks_mut(group).enumerate() {
            let amax = block_amax.and_then(|a| a.get(o * nb + b).copied()).unwrap_or_else(|| absmax(g));
            fake_quant_int(g, amax, INT4_MAX);
        }
    }
}

/// compressed-tensors' INT4 packing (pack_quantized.py `pack_to_int32`, packed_dim 1): each
/// code + 8 as an unsigned nibble, 8 consecutive input columns per int32, column 8j+k in bits
/// 4k..4k+3. `q` is `[out, inp]` with `inp` a multiple of 8; result `[out, inp/8]` as LE bytes.
pub fn pack_int4(q: &[i8], inp: usize) -> Vec<u8> {
    debug_assert!(inp.is_multiple_of(8) && q.len().is_multiple_of(inp.max(1)));
    q.chunks_exact(8)
        .map(|c| c.iter().enumerate().fold(0u32, |w, (k, &v)| w | (((v + 8) as u32 & 0xF) << (4 * k))))
        .flat_map(u32::to_le_bytes)
        .collect()
}

/// Inverse of [`pack_int4`] (`unpack_from_int32`): LE int32 words back to signed codes.
pub fn unpack_int4(packed: &[u8]) -> Vec<i8> {
    packed
        .chunks_exact(4)
        .flat_map(|b| {
            let w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            (0..8).map(move |k| ((w >> (4 * k)) & 0xF) as i8 - 8)
        })
        .collect()
}
