//! Rotary position embedding, as HF transformers computes it for Llama and Mistral
//! (`modeling_rope_utils.py` for the frequencies, `LlamaRotaryEmbedding.forward` and
//! `apply_rotary_pos_emb` in models/llama/modeling_llama.py for the rotation), and its partial
//! form (Phi3, Nemotron: only the leading `rotary_dim` dims of each head rotate).

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use crate::compute::cuda::DeviceBuffer;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use crate::error::Result;
use crate::numerics::round_bf16;

/// Rotary embedding parameters: `rope_theta` and the `rope_type` with its keys.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "default"`: plain RoPE.
    Default,
    /// `rope_type: "linear"` (Gemma3's global layers): every frequency divided by `factor`.
    Linear { factor: f64 },
    /// `rope_type: "longrope"` (Phi-3.5, PhiMoE): per-frequency factors, `short` for sequences of
    /// up to `original_max_position_embeddings` tokens and `long` beyond, and cos/sin times
    /// `attention_factor`.
    LongRope { short: Vec<f64>, long: Vec<f64>, original_max_position_embeddings: usize, attention_factor: f64 },
    /// `rope_type: "llama3"` (Llama 3.1+): long wavelengths stretched by `factor`.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// `rope_type: "yarn"` (Qwen2.5/Qwen3 long context, GPT-OSS, DeepSeek-V3): frequencies
    /// blended between `1/factor` interpolation and none by a ramp over the dims between the
    /// correction dims of `beta_fast` and `beta_slow` rotations, cos/sin times `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        /// Round the correction range outward to whole dims (transformers' default).
        truncate: bool,
        attention_factor: f64,
    },
}

impl RopeScaling {
    /// The `rope_type` it is read from.
    pub fn name(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::LongRope { .. } => "longrope",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::Yarn { .. } => "yarn",
        }
    }

    /// The factor HF multiplies cos and sin by (`attention_scaling`): 1 but for longrope and yarn.
    pub fn attention_factor(&self) -> f64 {
        match self {
            RopeScaling::LongRope { attention_factor, .. } | RopeScaling::Yarn { attention_factor, .. } => *attention_factor,
            _ => 1.0,
        }
    }
}

/// cos/sin of every (position, frequency) pair for positions `0..max_positions`.
pub struct Rope {
    head_dim: usize,
    /// Leading dims of each head that rotate (`head_dim` unless partial).
    rotary_dim: usize,
    max_positions: usize,
    cos: Vec<f32>, // [max_positions, rotary_dim / 2]
    sin: Vec<f32>, // [max_positions, rotary_dim / 2]
    /// A second table for the sliding-window layers (Gemma3's local `rope_theta`).
    local: Option<Box<Rope>>,
    /// `cos` and `sin` in device memory, uploaded at the first rotation on the device.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    device: std::sync::OnceLock<(DeviceBuffer<f32>, DeviceBuffer<f32>)>,
}

impl Rope {
    /// `head_dim` must be even (ModelConfig checks it).
    pub fn new(rope: &RopeConfig, head_dim: usize, max_positions: usize) -> Rope {
        Rope::partial(rope, head_dim, head_dim, max_positions)
    }

    /// RoPE of the leading `rotary_dim` dims of each head (HF Nemotron / Phi3
    /// `apply_rotary_pos_emb`: `q_rot, q_pass = q[..., :rot_dim], q[..., rot_dim:]`, the
    /// rotation on `q_rot`, `q_pass` unchanged), with frequencies computed for `rotary_dim`
    /// (`_compute_default_rope_parameters`: `dim = int(head_dim * partial_rotary_factor)`).
    /// `rotary_dim` must be even and at most `head_dim`.
    pub fn partial(rope: &RopeConfig, head_dim: usize, rotary_dim: usize, max_positions: usize) -> Rope {
        assert!(
            rotary_dim.is_multiple_of(2) && rotary_dim <= head_dim,
            "RoPE needs an even rotary_dim <= head_dim, got {rotary_dim} of {head_dim}"
        );
        let inv_freq = Rope::inv_freq_for(rope, rotary_dim, max_positions);
        // HF multiplies cos and sin by the rope type's attention scaling, in f32.
        let attention_factor = rope.scaling.attention_factor() as f32;
        let half = rotary_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in &inv_freq {
                // `freqs = inv_freq @ position_ids` in f32 (one product per entry), then
                // `emb.cos() * attention_scaling`, `emb.sin() * attention_scaling` in f32.
                let angle = f64::from(pos as f32 * f);
                cos.push(angle.cos() as f32 * attention_factor);
                sin.push(angle.sin() as f32 * attention_factor);
            }
        }
        Rope {
            head_dim,
            rotary_dim,
            max_positions,
            cos,
            sin,
            local: None,
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            device: std::sync::OnceLock::new(),
        }
    }

    /// This table with `local` as the sliding layers' table (`ModelConfig::layer_rope`).
    pub fn with_local(mut self, local: Rope) -> Rope {
        self.local = Some(Box::new(local));
        self
    }

    /// The sliding layers' table, when the model has one.
    pub fn local(&self) -> Option<&Rope> {
        self.local.as_deref()
    }

    /// The cos and sin tables in device memory (uploaded once, at the first call).
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    pub(crate) fn device_tables(&self) -> Result<&(DeviceBuffer<f32>, DeviceBuffer<f32>)> {
        if let Some(tables) = self.device.get() {
            return Ok(tables);
        }
        let tables = (DeviceBuffer::from_slice(&self.cos)?, DeviceBuffer::from_slice(&self.sin)?);
        Ok(self.device.get_or_init(|| tables))
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The cos and sin tables, each `[max_positions, rotary_dim / 2]` row-major (what a device
    /// copy for the CUDA RoPE kernel holds).
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// Dims of each head (`head_dim`) and the leading ones that rotate (`rotary_dim`).
    pub fn dims(&self) -> (usize, usize) {
        (self.head_dim, self.rotary_dim)
    }

    /// Rotates `x` = `[seq, n_heads * head_dim]` in place for positions `0..seq`, HF's
    /// `q * cos + rotate_half(q) * sin` with `rotate_half(x) = cat(-x2, x1)` (the two halves
    /// of each head, not interleaved pairs).
    pub fn apply(&self, x: &mut [f32], seq: usize, n_heads: usize) {
        self.rotate(x, seq, n_heads, |v| v);
    }

    /// `apply` as torch runs it on bf16 tensors: cos/sin are cast to bf16 (`.to(x.dtype)`) and
    /// each product and the sum are bf16.
    pub fn apply_bf16(&self, x: &mut [f32], seq: usize, n_heads: usize) {
        self.rotate(x, seq, n_heads, round_bf16);
    }

    /// The rotation with `r` applied to cos/sin, each product and each sum (identity: f32).
    fn rotate(&self, x: &mut [f32], seq: usize, n_heads: usize, r: impl Fn(f32) -> f32) {
        let (hd, half) = (self.head_dim, self.rotary_dim / 2);
        assert!(seq <= self.max_positions, "RoPE table holds {} positions, asked for {seq}", self.max_positions);
        assert_eq!(x.len(), seq * n_heads * hd, "RoPE: x is not [seq, n_heads * head_dim]");
        for (pos, row) in x.chunks_exact_mut(n_heads * hd).enumerate() {
            let cos = &self.cos[pos * half..][..half];
            let sin = &self.sin[pos * half..][..half];
            for head in row.chunks_exact_mut(hd) {
                let (x1, x2) = head[..2 * half].split_at_mut(half);
                for i in 0..half {
                    let (a, b, c, s) = (x1[i], x2[i], r(cos[i]), r(sin[i]));
                    x1[i] = r(r(a * c) + r(-b * s));
                    x2[i] = r(r(b * c) + r(a * s));
                }
            }
        }
    }

    /// The `head_dim / 2` inverse frequencies, in f32 like HF.
    ///
    /// `_compute_default_rope_parameters`: `1.0 / (base ** (arange(0, dim, 2).float() / dim))`.
    /// `_compute_llama3_parameters` then keeps high frequencies, divides low ones by `factor` and
    /// blends in between:
    /// ```text
    /// wavelen = 2 * pi / inv_freq
    /// inv_freq_llama = where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    /// smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    /// smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    /// is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    /// inv_freq_llama = where(is_medium, smoothed, inv_freq_llama)
    /// ```
    /// with `low_freq_wavelen = old_context_len / low_freq_factor` and likewise for high.
    pub fn inv_freq(rope: &RopeConfig, head_dim: usize) -> Vec<f32> {
        Rope::inv_freq_for(rope, head_dim, 0)
    }

    /// `_compute_yarn_parameters` (transformers 5): with `pos_freqs = base^(2i/dim)` in f32,
    /// ```text
    /// correction_dim(r) = dim · ln(original / (2π·r)) / (2·ln base)          (f64)
    /// low, high = correction_dim(beta_fast), correction_dim(beta_slow)  (floor / ceil when truncate)
    /// low, high = max(low, 0), min(high, dim - 1);  high += 0.001 if low == high
    /// ramp_i = clamp((i - low) / (high - low), 0, 1),  e_i = 1 - ramp_i       (f32, i < dim / 2)
    /// inv_freq_i = 1/(factor·pos_freqs_i) · (1 - e_i) + 1/pos_freqs_i · e_i   (f32)
    /// ```
    fn yarn_inv_freq(base: f64, dim: usize, factor: f64, original: usize, [fast, slow]: [f64; 2], truncate: bool) -> Vec<f32> {
        let correction_dim =
            |rotations: f64| dim as f64 * (original as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
        let (mut low, mut high) = (correction_dim(fast), correction_dim(slow));
        if truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
        if low == high {
            high += 0.001;
        }
        let (low32, span) = (low as f32, (high - low) as f32);
        (0..dim)
            .step_by(2)
            .map(|i| {
                let pos_freq = f64::from(base as f32).powf(f64::from(i as f32 / dim as f32)) as f32;
                let (extrapolation, interpolation) = (1.0 / pos_freq, 1.0 / (factor as f32 * pos_freq));
                let extrapolation_factor = 1.0 - (((i / 2) as f32 - low32) / span).clamp(0.0, 1.0);
                interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
            })
            .collect()
    }

    /// [`Rope::inv_freq`] for sequences of `seq_len` tokens: longrope takes its long factors
    /// beyond `original_max_position_embeddings` (HF `longrope_frequency_update`, which picks
    /// them when `max(position_ids) + 1` exceeds it; the table of a run serves its longest row),
    /// `_compute_longrope_parameters`: `1 / (ext_factors · base^(arange(0, dim, 2) / dim))` in f32.
    pub fn inv_freq_for(rope: &RopeConfig, head_dim: usize, seq_len: usize) -> Vec<f32> {
        let base = rope.theta as f32;
        let default = (0..head_dim).step_by(2).map(|i| {
            let exponent = i as f32 / head_dim as f32;
            1.0 / (f64::from(base).powf(f64::from(exponent)) as f32)
        });
        match &rope.scaling {
            RopeScaling::Default => default.collect(),
            RopeScaling::LongRope { short, long, original_max_position_embeddings, .. } => {
                let ext = if seq_len > *original_max_position_embeddings { long } else { short };
                (0..head_dim)
                    .step_by(2)
                    .zip(ext)
                    .map(|(i, &e)| {
                        let base_pow = f64::from(base).powf(f64::from(i as f32 / head_dim as f32)) as f32;
                        1.0 / (e as f32 * base_pow)
                    })
                    .collect()
            }
            // `_compute_linear_scaling_rope_parameters`: `inv_freq /= factor`, in f32.
            RopeScaling::Linear { factor } => default.map(|f| f / *factor as f32).collect(),
            &RopeScaling::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, truncate, .. } => {
                Rope::yarn_inv_freq(rope.theta, head_dim, factor, original_max_position_embeddings, [beta_fast, beta_slow], truncate)
            }
            &RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old_context_len = original_max_position_embeddings as f64;
                let low_freq_wavelen = (old_context_len / low_freq_factor) as f32;
                let high_freq_wavelen = (old_context_len / high_freq_factor) as f32;
                let (factor, low) = (factor as f32, low_freq_factor as f32);
                let two_pi = (2.0 * std::f64::consts::PI) as f32;
                default
                    .map(|f| {
                        let wavelen = two_pi / f;
                        let f = if wavelen > low_freq_wavelen { f / factor } else { f };
                        let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                        if is_medium {
                            let smooth =
                                (old_context_len as f32 / wavelen - low) / (high_freq_factor - low_freq_factor) as f32;
                            (1.0 - smooth) * f / factor + smooth * f
                        } else {
                            f
                        }
                    })
                    .collect()
            }
        }
    }
}
