//! Layer-at-a-time passes over many sequences: calibration (max of every linear's input) and
//! perplexity. Activations of all sequences are held between layers; only the current
//! layer's weights are resident, so the model never has to fit in memory at once.

use crate::error::{Error, Result};
use crate::model::{Hooks, Layer, LinearKind, Model};
use crate::ops::Rope;
use crate::progress::Progress;
use crate::quant::fp8;
use std::collections::HashMap;

/// Calibrated per-tensor amax of every decoder linear's input, keyed by module name
/// (`model.layers.3.mlp.down_proj`). Max calibration, spec/algorithms.md §3.1: the
/// quantizers only observe, so the network runs unquantized.
pub struct Calibration {
    pub input_amax: HashMap<String, f32>,
    pub tokens: usize,
}

#[derive(Default)]
struct AmaxHooks {
    amax: [f32; LinearKind::ALL.len()],
    non_finite: Option<LinearKind>,
}

impl Hooks for AmaxHooks {
    fn linear_input(&mut self, _layer: usize, kind: LinearKind, x: &mut [f32], _cols: usize) {
        let slot = &mut self.amax[kind as usize];
        for &v in x.iter() {
            if !v.is_finite() {
                self.non_finite.get_or_insert(kind);
                return;
            }
            *slot = slot.max(v.abs());
        }
    }
}

/// Runs `samples` through the model, collecting input amax per linear.
pub fn calibrate(model: &Model, samples: &[Vec<u32>], progress: &Progress) -> Result<Calibration> {
    let mut input_amax = HashMap::new();
    run_layers(model, samples, progress, "calibrate", |layer_idx, layer, rope, hidden| {
        let mut hooks = AmaxHooks::default();
        for (s, (h, ids)) in hidden.iter_mut().zip(samples).enumerate() {
            layer.forward(&model.config, rope, h, ids.len(), &mut hooks);
            if let Some(kind) = hooks.non_finite {
                return Err(Error::tensor(
                    module_name(layer_idx, kind),
                    format!("input activations hold NaN/Inf (calibration sample {s})"),
                ));
            }
        }
        for kind in LinearKind::ALL {
            input_amax.insert(module_name(layer_idx, kind), hooks.amax[kind as usize]);
        }
        Ok(())
    })?;
    Ok(Calibration { input_amax, tokens: samples.iter().map(Vec::len).sum() })
}

/// `model.layers.{i}.{self_attn.q_proj|...}`.
pub fn module_name(layer: usize, kind: LinearKind) -> String {
    format!("model.layers.{layer}.{}", kind.module())
}

/// Embeds every sequence, then for each layer loads it (dequantizing quantized weights) and
/// hands it with all hidden states to `each_layer`. Returns the final hidden states.
fn run_layers(
    model: &Model,
    samples: &[Vec<u32>],
    progress: &Progress,
    task: &str,
    mut each_layer: impl FnMut(usize, &Layer, &Rope, &mut [Vec<f32>]) -> Result<()>,
) -> Result<Vec<Vec<f32>>> {
    let max_len = samples.iter().map(Vec::len).max().unwrap_or(0);
    let rope = Rope::from_config(&model.config, max_len);
    let mut hidden: Vec<Vec<f32>> = samples.iter().map(|s| model.embed(s)).collect::<Result<_>>()?;
    let n = model.config.num_hidden_layers;
    for l in 0..n {
        let layer = model.load_layer(l)?;
        each_layer(l, &layer, &rope, &mut hidden)?;
        progress.step(&format!("{task} layer"), l + 1, n);
    }
    Ok(hidden)
}

/// Activation fake quantization from a checkpoint's `input_scale` tensors (evaluation of an
/// FP8 export): each linear's input goes through E4M3 with amax = input_scale·448.
struct FakeQuantHooks {
    amax: [Option<f32>; LinearKind::ALL.len()],
}

impl Hooks for FakeQuantHooks {
    fn linear_input(&mut self, _layer: usize, kind: LinearKind, x: &mut [f32], _cols: usize) {
        if let Some(amax) = self.amax[kind as usize] {
            fp8::fake_quant(x, amax);
        }
    }
}

/// Perplexity result: exp(nll / count).
pub struct Perplexity {
    pub ppl: f64,
    pub nll: f64,
    pub count: usize,
    pub windows: usize,
}

/// The evaluation windows of reference/README.md: `ids[off..off+seq]` for off = 0, seq, 2·seq,
/// ... while off < len - seq; each window is scored alone.
pub fn eval_windows(ids: &[u32], seq: usize) -> Vec<Vec<u32>> {
    (0..)
        .map(|w| w * seq)
        .take_while(|&off| off + seq < ids.len())
        .map(|off| ids[off..off + seq].to_vec())
        .collect()
}

/// Perplexity of `model` (original or quantized checkpoint) over `windows`.
pub fn perplexity(model: &Model, windows: &[Vec<u32>], progress: &Progress) -> Result<Perplexity> {
    let hidden = run_layers(model, windows, progress, "eval", |l, layer, rope, hidden| {
        let mut amax = [None; LinearKind::ALL.len()];
        for kind in LinearKind::ALL {
            amax[kind as usize] = model.input_amax(&module_name(l, kind))?;
        }
        let mut hooks = FakeQuantHooks { amax };
        for (h, ids) in hidden.iter_mut().zip(windows) {
            layer.forward(&model.config, rope, h, ids.len(), &mut hooks);
        }
        Ok(())
    })?;
    let head = model.load_head()?;
    let (mut nll, mut count) = (0.0f64, 0usize);
    for (h, ids) in hidden.iter().zip(windows) {
        let (s, c) = head.nll(h, ids);
        nll += s;
        count += c;
    }
    if count == 0 {
        return Err(Error::Usage("evaluation text is shorter than one window".into()));
    }
    Ok(Perplexity { ppl: (nll / count as f64).exp(), nll, count, windows: windows.len() })
}
