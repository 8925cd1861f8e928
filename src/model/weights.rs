//! Reading quantized linears back from a unified-HF checkpoint (rq-min's or ModelOpt's):
//! dequantized weights, and what the runtime does to the linear's input (pre_quant_scale,
//! activation fake quantization) and to the KV cache. The format of each linear is read from
//! its tensors (spec/export-formats.md §2.5), so mixed-format checkpoints work too.
//! compressed-tensors checkpoints (export_ct.rs) are read too: `weight_packed` INT4 / NVFP4,
//! per-channel `[out, 1]` INT8 scales, `weight_global_scale` / `input_global_scale` divisors.

use crate::compute::{DeviceTwin, Tensor};
use crate::error::{Error, Result};
use crate::io::safetensors::Checkpoint;
use std::path::Path;
use crate::numerics::{e4m3_to_f32, E4M3_MAX};
use crate::quant::{int, nvfp4, ActKind};
use crate::io::safetensors::{Dtype, TensorView};

/// The checkpoint folders a model's tensors are read from, searched in order (the model
/// folder, then a fallback).
pub struct Weights {
    sources: Vec<Checkpoint>,
}

impl Weights {
    /// `dir` holds the weights; `fallback` is another checkpoint folder for tensors missing from
    /// `dir` (reference exports leave out embed_tokens / lm_head).
    pub fn open(dir: &Path, fallback: Option<&Path>) -> Result<Weights> {
        let mut sources = vec![Checkpoint::open(dir)?];
        if let Some(f) = fallback {
            sources.push(Checkpoint::open(f)?);
        }
        Ok(Weights { sources })
    }

    /// The model folder (the first source).
    pub fn dir(&self) -> &Path {
        self.sources[0].dir()
    }

    /// The tensor names of the model folder, sorted.
    pub fn weight_names(&self) -> Vec<String> {
        self.sources[0].names().into_iter().map(String::from).collect()
    }

    /// Tensor `name` from the first source that has it, if any.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        self.sources.iter().find_map(|c| c.get(name))
    }

    /// The first source's tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        if let Some(t) = self.sources.iter().find_map(|c| c.get(name)) {
            return Ok(t);
        }
        let dirs: Vec<String> = self.sources.iter().map(|c| c.dir().display().to_string()).collect();
        Err(Error::tensor(name, format!("not found in {}", dirs.join(" or "))))
    }

    /// Tensor `name` as f32, after checking its shape and that every value is finite.
    pub(crate) fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        t.expect_shape(shape)?;
        let values = t.to_f32()?;
        check_finite(name, &values, 0)?;
        Ok(values)
    }
}

/// Rejects NaN and ±Inf; `values` start at flat index `offset` of tensor `name`.
/// Also rejects finite values of magnitude `MAX_WEIGHT` or more: a product with any activation
/// overflows f32 and the NaN it leads to would surface in a later, innocent tensor.
pub(crate) fn check_finite(name: &str, values: &[f32], offset: usize) -> Result<()> {
    match values.iter().position(|v| !(v.abs() < MAX_WEIGHT)) {
        None => Ok(()),
        Some(i) if values[i].is_finite() => Err(Error::tensor(
            name,
            format!("value {:e} at index {} is too large to compute with (|w| >= 2^64)", values[i], offset + i),
        )),
        Some(i) => Err(Error::tensor(name, format!("contains NaN/Inf at index {} ({})", offset + i, values[i]))),
    }
}

/// The largest weight magnitude the runtime takes, 2^64: real checkpoints stay below 1e4,
/// and 2^64 times an activation of 2^64 is still finite in f32.
const MAX_WEIGHT: f32 = 18_446_744_073_709_551_616.0;
/// How a linear's input is transformed before its matmul at evaluation.
#[derive(Clone, Debug, Default)]
pub struct InputQuant {
    /// Multiplies the input (`x ⊙ pre_quant_scale`).
    pub pre_quant_scale: Option<Vec<f32>>,
    /// Activation fake quantization and its calibrated amax.
    pub act: Option<(ActKind, f32)>,
}

impl InputQuant {
    /// Transforms `x` (`[_, cols]`) where it is: on the device with each formula's kernel twin.
    pub fn apply(&self, x: &mut Tensor, cols: usize) {
        if let Some(p) = &self.pre_quant_scale {
            x.scale_columns(p);
        }
        match self.act {
            Some((ActKind::Fp8, amax)) => x.map_twin(DeviceTwin::FakeQuantFp8 { amax }, |x| crate::quant::fp8::fake_quant(x, amax)),
            Some((ActKind::Int8, amax)) => x.map_twin(DeviceTwin::FakeQuantInt8 { amax }, |x| int::int8_fake_quant(x, amax)),
            Some((ActKind::Nvfp4, amax)) => {
                x.map_twin(DeviceTwin::FakeQuantNvfp4 { cols, global_amax: amax }, |x| nvfp4::fake_quant(x, cols, amax))
            }
            None => {}
        }
    }
}

/// The format a stored linear weight is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    Plain,
    Fp8,
    Int8,
    Int4 { group: usize },
    Nvfp4,
}

impl Stored {
    pub fn name(self) -> String {
        match self {
            Stored::Plain => "unquantized".into(),
            Stored::Fp8 => "FP8".into(),
            Stored::Int8 => "INT8".into(),
            Stored::Int4 { group } => format!("INT4 g{group}"),
            Stored::Nvfp4 => "NVFP4".into(),
        }
    }
}

/// The format of a linear from its `weight` and `weight_scale` tensors, and its logical
/// `[out, in]` shape (packed 4-bit weights hold two values per byte: INT4 along the output
/// dim, NVFP4 along the input dim; spec/export-formats.md §1.5, §2.5). None for a combination
/// that is no known format.
pub fn detect(weight: &TensorView, scale: Option<&TensorView>) -> Option<(Stored, [usize; 2])> {
    let [r, c] = <[usize; 2]>::try_from(weight.shape).ok()?;
    let s = scale.map(|s| (s.dtype, s.shape));
    Some(match (weight.dtype, s) {
        (Dtype::BF16 | Dtype::F16 | Dtype::F32, None) => (Stored::Plain, [r, c]),
        (Dtype::F8E4M3, Some((Dtype::F32, sh))) if sh.iter().product::<usize>() == 1 => (Stored::Fp8, [r, c]),
        (Dtype::I8, Some((Dtype::F32, sh))) if sh == [r] || sh == [r, 1] => (Stored::Int8, [r, c]),
        (Dtype::U8, Some((Dtype::F8E4M3, sh))) if sh.len() == 2 && sh[0] == r && sh[1] * nvfp4::BLOCK == 2 * c => {
            (Stored::Nvfp4, [r, 2 * c])
        }
        (Dtype::U8, Some((Dtype::F32, sh))) if sh.len() == 2 && sh[0] == 2 * r && sh[1] > 0 && c % sh[1] == 0 => {
            (Stored::Int4 { group: c / sh[1] }, [2 * r, c])
        }
        _ => return None,
    })
}

/// The format of a compressed-tensors `weight_packed` tensor with its `weight_scale` and its
/// logical `[out, in]` shape: I32 `[out, in/8]` with float `[out, in/g]` scales is INT4
/// pack-quantized, U8 `[out, in/2]` with F8_E4M3 `[out, in/16]` scales is NVFP4 (export_ct.rs).
pub fn detect_packed(packed: &TensorView, scale: Option<&TensorView>) -> Option<(Stored, [usize; 2])> {
    let [r, c] = <[usize; 2]>::try_from(packed.shape).ok()?;
    let s = scale?;
    let sh = s.shape;
    if sh.len() != 2 || sh[0] != r || sh[1] == 0 {
        return None;
    }
    Some(match (packed.dtype, s.dtype) {
        (Dtype::I32, Dtype::BF16 | Dtype::F16 | Dtype::F32) if (8 * c) % sh[1] == 0 => {
            (Stored::Int4 { group: 8 * c / sh[1] }, [r, 8 * c])
        }
        (Dtype::U8, Dtype::F8E4M3) if sh[1] * nvfp4::BLOCK == 2 * c => (Stored::Nvfp4, [r, 2 * c]),
        _ => return None,
    })
}

/// The weight tensor of `module` (`weight`, or compressed-tensors' `weight_packed`) and its format.
fn weight_of<'a>(model: &'a Weights, module: &str) -> Result<(String, TensorView<'a>, Option<(Stored, [usize; 2])>)> {
    let scale = model.get(&format!("{module}.weight_scale"));
    let packed = format!("{module}.weight_packed");
    if let Some(p) = model.get(&packed) {
        let found = detect_packed(&p, scale.as_ref());
        return Ok((packed, p, found));
    }
    let name = format!("{module}.weight");
    let w = model.tensor(&name)?;
    let found = detect(&w, scale.as_ref());
    Ok((name, w, found))
}

fn stored(model: &Weights, module: &str, shape: [usize; 2]) -> Result<Stored> {
    let (name, w, found) = weight_of(model, module)?;
    let scale = model.get(&format!("{module}.weight_scale"));
    match found {
        Some((kind, logical)) if logical == shape => Ok(kind),
        Some((kind, logical)) => Err(Error::tensor(
            &name,
            format!("stored as {} of logical shape {logical:?}, but expected {shape:?} from config.json", kind.name()),
        )),
        None => Err(Error::tensor(
            &name,
            format!(
                "{} {:?} with weight_scale {} is not a known format",
                w.dtype.name(),
                w.shape,
                scale.map_or("missing".to_string(), |s| format!("{} {:?}", s.dtype.name(), s.shape))
            ),
        )),
    }
}

/// Checks from the headers alone that linear `module` is stored (plain or in a known format)
/// with the logical shape `shape`.
pub fn check_linear(model: &Weights, module: &str, shape: [usize; 2]) -> Result<()> {
    stored(model, module, shape).map(|_| ())
}

/// A linear's weight as f32 `[out, in]`, dequantized if the checkpoint stores it quantized.
pub fn linear_weight(model: &Weights, module: &str, shape: [usize; 2]) -> Result<Vec<f32>> {
    let [out, inp] = shape;
    let (name, w, _) = weight_of(model, module)?;
    let scale_name = format!("{module}.weight_scale");
    let packed = name.ends_with("weight_packed");
    if packed && model.get(&format!("{module}.weight_global_scale")).is_none() {
        // INT4 pack-quantized carries the logical shape (pack_quantized.py `weight_shape`).
        let ws = model.tensor(&format!("{module}.weight_shape"))?.to_i64()?;
        if ws != [out as i64, inp as i64] {
            return Err(Error::tensor(&name, format!("weight_shape is {ws:?}, expected [{out}, {inp}]")));
        }
    }
    let values = match stored(model, module, shape)? {
        Stored::Plain => w.to_f32()?,
        Stored::Fp8 => {
            let s = scalar(model, &scale_name)?.unwrap_or(1.0);
            w.data.iter().map(|&c| e4m3_to_f32(c) * s).collect()
        }
        Stored::Int8 => {
            let s = model.tensor(&scale_name)?.to_f32()?;
            w.data.chunks_exact(inp).zip(&s).flat_map(|(row, &s)| row.iter().map(move |&c| c as i8 as f32 * s)).collect()
        }
        Stored::Int4 { group } if packed => {
            let s = model.tensor(&scale_name)?.to_f32()?;
            let q = int::unpack_int4(w.data);
            q.chunks_exact(group).zip(&s).flat_map(|(g, &s)| g.iter().map(move |&v| v as f32 * s)).collect()
        }
        Stored::Int4 { group } => {
            let s = model.tensor(&scale_name)?.to_f32()?;
            int::int4_dequantize(w.data, &s, out, inp, group)
        }
        Stored::Nvfp4 if packed => {
            // compressed-tensors: code · (f32(block scale) / weight_global_scale).
            let s = model.tensor(&scale_name)?;
            let gs = scalar(model, &format!("{module}.weight_global_scale"))?
                .ok_or_else(|| Error::tensor(&name, format!("is NVFP4 but {module}.weight_global_scale is missing")))?;
            nvfp4::dequantize_weight_with(w.data, s.data, out, inp, |b| b / gs)
        }
        Stored::Nvfp4 => {
            let s = model.tensor(&scale_name)?;
            let ws2 = scalar(model, &format!("{module}.weight_scale_2"))?
                .ok_or_else(|| Error::tensor(&name, format!("is NVFP4 but {module}.weight_scale_2 is missing")))?;
            nvfp4::dequantize_weight(w.data, s.data, ws2, out, inp)
        }
    };
    check_finite(&name, &values, 0)?;
    Ok(values)
}

/// The input transformation of a linear: its `pre_quant_scale` and, from `input_scale`, the
/// activation quantizer of its format (FP8: amax = s·448, INT8: s·127, NVFP4: s·2688).
pub fn input_quant(model: &Weights, module: &str, shape: [usize; 2]) -> Result<InputQuant> {
    let pre_quant_scale = match model.get(&format!("{module}.pre_quant_scale")) {
        Some(t) => {
            t.expect_shape(&[shape[1]])?;
            Some(t.to_f32()?)
        }
        None => None,
    };
    let ct_global = scalar(model, &format!("{module}.input_global_scale"))?;
    let act = match scalar(model, &format!("{module}.input_scale"))? {
        // compressed-tensors NVFP4: the activation is multiplied by the global scale.
        None => ct_global.map(|g| (ActKind::Nvfp4, (1.0 / g) * nvfp4::E2M1_MAX * E4M3_MAX)),
        Some(s) => Some(match stored(model, module, shape)? {
            Stored::Int8 => (ActKind::Int8, s * int::INT8_MAX),
            Stored::Nvfp4 => (ActKind::Nvfp4, s * nvfp4::E2M1_MAX * E4M3_MAX),
            _ => (ActKind::Fp8, s * E4M3_MAX),
        }),
    };
    Ok(InputQuant { pre_quant_scale, act })
}

/// KV-cache amax of the attention module `attn` (`model.layers.{l}.self_attn`) from
/// `k_proj.k_scale` / `v_proj.v_scale` (amax/448, §2.8), or compressed-tensors' `k_scale` /
/// `v_scale` on the attention module (same value).
pub fn kv_amax(model: &Weights, attn: &str) -> Result<(Option<f32>, Option<f32>)> {
    let read = |unified: &str, ct: &str| -> Result<Option<f32>> {
        Ok(scalar(model, &format!("{attn}.{unified}"))?.or(scalar(model, &format!("{attn}.{ct}"))?).map(|s| s * E4M3_MAX))
    };
    Ok((read("k_proj.k_scale", "k_scale")?, read("v_proj.v_scale", "v_scale")?))
}

/// A per-tensor scale (F32, shape [] or [1]), finite and positive, if present.
pub fn scalar(model: &Weights, name: &str) -> Result<Option<f32>> {
    let Some(t) = model.get(name) else { return Ok(None) };
    let v = t.to_f32()?;
    match v.as_slice() {
        [x] if x.is_finite() && *x > 0.0 => Ok(Some(*x)),
        [x] => Err(Error::tensor(name, format!("scale must be finite and positive, got {x}"))),
        _ => Err(Error::tensor(name, format!("expected one value, got shape {:?}", t.shape))),
    }
}
