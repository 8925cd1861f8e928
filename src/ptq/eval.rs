//! Layer-at-a-time perplexity over many sequences. Activations of all sequences are held between layers; only the current
//! layer's weights are resident, so the model never has to fit in memory at once.

use crate::error::{Error, Result};
use crate::model::{module_of, Hooks, Layer, LayerModule, LinearKind, Model};
use crate::compute::{DeviceTwin, Rope, Tensor};
use crate::ptq::progress::Progress;
use crate::quant::fp8;
use crate::model::weights::{self as read, InputQuant};

/// `model.layers.{i}.{self_attn.q_proj|...}` (the Llama module names, `LinearKind::module`).
pub fn module_name(layer: usize, kind: LinearKind) -> String {
    format!("model.layers.{layer}.{}", kind.module())
}

/// Embeds every sequence, then for each layer loads it (dequantizing quantized weights; the next
/// one is read ahead, `Model::each_layer`) and hands it with all hidden states to `each_layer`. Returns the final hidden states.
fn run_layers(
    model: &Model,
    samples: &[Vec<u32>],
    progress: &Progress,
    task: &str,
    mut each_layer: impl FnMut(usize, &Layer, &Rope, &mut [Tensor]) -> Result<()>,
) -> Result<Vec<Tensor>> {
    let max_len = samples.iter().map(Vec::len).max().unwrap_or(0);
    let rope = model.config.rope_table(max_len);
    let mut hidden: Vec<Tensor> = samples.iter().map(|s| model.embed(s)).collect::<Result<_>>()?;
    let n = model.config.num_hidden_layers;
    model.each_layer(|l, layer| {
        crate::io::signal::check()?;
        each_layer(l, &layer, &rope, &mut hidden)?;
        crate::compute::take_device_error()?;
        progress.step(&format!("{task} layer"), l + 1, n);
        Ok(())
    })?;
    Ok(hidden)
}

/// Evaluation of a quantized checkpoint: each linear's input goes through its module's
/// `pre_quant_scale` and activation fake quantization, K and V through FP8 fake quantization
/// when the checkpoint has KV-cache scales (spec/algorithms.md §8).
struct EvalHooks {
    modules: Vec<LayerModule>,
    /// Indexed like `modules` (a fused module's linears share one).
    inputs: Vec<InputQuant>,
    kv_amax: (Option<f32>, Option<f32>),
}

impl EvalHooks {
    fn apply(&self, expert: Option<usize>, kind: LinearKind, x: &mut Tensor, cols: usize) {
        if let Some(i) = module_of(&self.modules, expert, kind) {
            self.inputs[i].apply(x, cols);
        }
    }
}

impl Hooks for EvalHooks {
    fn linear_input(&mut self, _layer: usize, kind: LinearKind, x: &mut Tensor, cols: usize) {
        self.apply(None, kind, x, cols);
    }
    fn expert_input(&mut self, _layer: usize, expert: usize, kind: LinearKind, x: &mut Tensor, cols: usize) {
        self.apply(Some(expert), kind, x, cols);
    }
    fn kv(&mut self, _layer: usize, k: &mut Tensor, v: &mut Tensor) {
        for (t, amax) in [(k, self.kv_amax.0), (v, self.kv_amax.1)] {
            if let Some(a) = amax {
                t.map_twin(DeviceTwin::FakeQuantFp8 { amax: a }, |t| fp8::fake_quant(t, a));
            }
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
    evaluate(model, windows, progress, false).map(|(p, _)| p)
}

/// Perplexity of `model` over `windows` and, with `keep_logits`, every window's logits
/// (`[window len, vocab]` f32 each, in window order; empty otherwise).
pub fn evaluate(model: &Model, windows: &[Vec<u32>], progress: &Progress, keep_logits: bool) -> Result<(Perplexity, Vec<Vec<f32>>)> {
    let hidden = run_layers(model, windows, progress, "eval", |l, layer, rope, hidden| {
        let modules = model.config.layer_modules(l);
        let inputs = modules.iter().map(|m| read::input_quant(model, &m.path, m.shape)).collect::<Result<_>>()?;
        let mut hooks = EvalHooks { modules, inputs, kv_amax: read::kv_amax(model, &model.config.attn_prefix(l))? };
        for (h, ids) in hidden.iter_mut().zip(windows) {
            layer.forward(&model.config, rope, h, ids.len(), &mut hooks);
        }
        Ok(())
    })?;
    let head = model.load_head()?;
    let (mut nll, mut count) = (0.0f64, 0usize);
    let mut logits = Vec::new();
    for (h, ids) in hidden.iter().zip(windows) {
        let (s, c) = head.nll(h, ids);
        nll += s;
        count += c;
        if keep_logits {
            logits.push(head.logits(h, ids.len()).into_host());
        }
    }
    crate::compute::take_device_error()?;
    if count == 0 {
        return Err(Error::Usage("evaluation text is shorter than one window".into()));
    }
    Ok((Perplexity { ppl: (nll / count as f64).exp(), nll, count, windows: windows.len() }, logits))
}
