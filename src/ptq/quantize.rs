//! The PTQ driver: one decoder layer at a time, calibrate every linear of the layer over all
//! calibration samples, run the format's algorithm (SmoothQuant, AWQ-lite), apply ModelOpt's
//! export-time fusion, and write the layer's tensors. Only the current layer's weights are in
//! memory; the hidden states of all samples are held between layers.
//!
//! As in ModelOpt, the quantizers only observe during calibration and AWQ's search returns the
//! exact output (spec/algorithms.md §3.1, §6.1), so every layer sees the unquantized network's
//! activations: running the layers one after the other gives the same statistics.
//!
//! The unit of quantization is the checkpoint's Linear module (`ModelConfig::modules`): a fused
//! module (Phi3's `qkv_proj`, `gate_up_proj`) has one weight quantizer, one input quantizer,
//! one SmoothQuant factor and one AWQ search over its stacked weight, as in ModelOpt. An MoE
//! layer's modules are its attention modules and one per expert and projection
//! (`ModelConfig::layer_modules`); each expert's statistics come from the tokens routed to it.

use crate::error::{Error, Result};
use crate::export::unified::Output;
use crate::model::config::{row_fold, RowFold};
use crate::model::{module_of, Hooks, LayerModule, Layer, LinearKind, Model, NormSlot};
use crate::compute::{Device, DeviceTwin, Rope, Tensor};
use crate::ptq::progress::Progress;
use crate::quant::awq::{self, ActMean, LiteSearch};
use crate::quant::{fp8, int, nvfp4, smoothquant, ActKind, Exclusions, QFormat, WeightKind, INT4_GROUP};
use crate::io::safetensors::{encode, Dtype};
use std::collections::HashMap;

/// Which format each module gets.
pub enum Formats {
    /// One format for every decoder linear not matched by the exclusions (lm_head and the
    /// other default-excluded modules stay unquantized).
    Uniform(QFormat, Exclusions),
    /// A format per module (full HF names, `lm_head` included); modules not listed stay
    /// unquantized. Auto-quantize and `--layer-formats`.
    PerModule(HashMap<String, QFormat>),
}

impl Formats {
    pub fn of(&self, module: &str) -> Option<QFormat> {
        match self {
            Formats::Uniform(f, ex) => (module != "lm_head" && !ex.is_excluded(module)).then_some(*f),
            Formats::PerModule(m) => m.get(module).copied(),
        }
    }
}

pub struct Options {
    pub formats: Formats,
    /// FP8 KV cache: `k_scale` / `v_scale` from K and V after RoPE (spec/algorithms.md §8).
    pub kv_fp8: bool,
    /// SmoothQuant migration strength (ModelOpt's default 1.0, spec/algorithms.md §5).
    pub sq_alpha: f32,
    /// Quantize for the compressed-tensors layout (`--export compressed-tensors`), which has no
    /// `pre_quant_scale` and stores INT4 group scales in the model dtype. A SmoothQuant / AWQ
    /// scale is used only where it folds exactly into a neighbour ([`foldable`]): a norm's
    /// readers into the norm (for INT8 SmoothQuant too), a consumer into its producer's output
    /// rows ([`row_fold`]: down_proj into up_proj, per expert too, √p for relu²; o_proj into
    /// v_proj without GQA); other linears (GQA o_proj, Starcoder2's c_proj, experts' gate/up) are
    /// quantized unsmoothed. INT4 codes are computed with the model-dtype scales. The unified
    /// export of such a run holds the same model, with no pre_quant_scale left.
    pub compressed_tensors: bool,
}

/// What was quantized, for the configs and the report.
pub struct Summary {
    pub quantized: Vec<(String, QFormat)>,
    pub unquantized: Vec<String>,
}

/// The module whose input this is, when `kind` is its first linear (the other linears of a
/// fused module see the same input and are not observed again).
fn observed(modules: &[LayerModule], expert: Option<usize>, kind: LinearKind) -> Option<usize> {
    module_of(modules, expert, kind).filter(|&i| modules[i].kinds[0] == kind)
}

/// Per-module statistics of one layer's calibration pass, indexed like the layer's modules.
pub(crate) struct StatsHooks<'a> {
    modules: &'a [LayerModule],
    want_channels: bool,
    want_mean: bool,
    dtype: Dtype,
    amax: Vec<f32>,
    channel_amax: Vec<Vec<f32>>,
    mean: Vec<Option<ActMean>>,
    kv_amax: (f32, f32),
    /// The module whose input held NaN/Inf.
    non_finite: Option<usize>,
}

impl StatsHooks<'_> {
    fn observe(&mut self, expert: Option<usize>, kind: LinearKind, x: &Tensor, cols: usize) {
        let Some(k) = observed(self.modules, expert, kind) else { return };
        if !x.all_finite() {
            self.non_finite.get_or_insert(k);
            return;
        }
        self.amax[k] = x.amax(self.amax[k]);
        if self.want_channels {
            x.channel_amax(cols, &mut self.channel_amax[k]);
        }
        if self.want_mean {
            self.mean[k].get_or_insert_with(|| ActMean::new(cols, self.dtype)).observe(x);
        }
    }
}

impl Hooks for StatsHooks<'_> {
    fn linear_input(&mut self, _layer: usize, kind: LinearKind, x: &mut Tensor, cols: usize) {
        self.observe(None, kind, x, cols);
    }
    fn expert_input(&mut self, _layer: usize, expert: usize, kind: LinearKind, x: &mut Tensor, cols: usize) {
        self.observe(Some(expert), kind, x, cols);
    }
    fn kv(&mut self, _layer: usize, k: &mut Tensor, v: &mut Tensor) {
        self.kv_amax = (k.amax(self.kv_amax.0), v.amax(self.kv_amax.1));
    }
}

/// awq_lite's search pass: every quantized module's loss per alpha (spec/algorithms.md §6.1),
/// indexed like the layer's modules: (module weight, bias, search), on the layer inputs'
/// device. An expert's loss is summed over the tokens routed to it.
struct SearchHooks<'a> {
    layer: &'a Layer,
    modules: &'a [LayerModule],
    searches: Vec<Option<(Tensor, Option<Tensor>, LiteSearch)>>,
}

impl SearchHooks<'_> {
    fn observe(&mut self, expert: Option<usize>, kind: LinearKind, x: &Tensor, cols: usize) {
        let Some(k) = observed(self.modules, expert, kind) else { return };
        if let Some((w, bias, search)) = &mut self.searches[k] {
            let out = w.len() / cols;
            let mut y = x.matmul_bt(w, x.len() / cols, cols, out);
            if let Some(b) = bias {
                y.add_row_bias(b);
            }
            y.round(self.layer.compute());
            search.observe(x, &y);
        }
    }
}

impl Hooks for SearchHooks<'_> {
    fn linear_input(&mut self, _layer: usize, kind: LinearKind, x: &mut Tensor, cols: usize) {
        self.observe(None, kind, x, cols);
    }
    fn expert_input(&mut self, _layer: usize, expert: usize, kind: LinearKind, x: &mut Tensor, cols: usize) {
        self.observe(Some(expert), kind, x, cols);
    }
}

/// One linear module after its algorithm, before export-time fusion.
pub(crate) struct Linear {
    /// The runtime linears it holds (none for lm_head).
    pub(crate) kinds: &'static [LinearKind],
    /// The expert of an MoE expert's projection.
    expert: Option<usize>,
    /// `[out, in]`.
    shape: [usize; 2],
    module: String,
    format: QFormat,
    /// `[out, in]`, with smoothing / AWQ scales folded in (model-dtype values).
    weight: Vec<f32>,
    /// The runtime multiplies the input by this (`pre_quant_scale`), if any.
    pub(crate) pqs: Option<Vec<f32>>,
    /// Per-tensor amax of the (scaled) input, for activation-quantized formats.
    pub(crate) input_amax: f32,
    /// Per-tensor weight amax shared with export-fused siblings (None: the weight's own).
    weight_amax: Option<f32>,
}

/// Runs calibration, the algorithm and the export of every decoder layer into `out`, plus a
/// copy of every tensor outside the decoder layers.
pub fn run(model: &Model, samples: &[Vec<u32>], opts: &Options, out: &mut Output, progress: &Progress) -> Result<Summary> {
    let cfg = &model.config;
    let dtype = model.dtype()?;
    check_shapes(cfg, opts)?;
    let lm_head_format = opts.formats.of("lm_head");
    for name in model.weight_names() {
        let quantized_lm_head = lm_head_format.is_some() && name == "lm_head.weight";
        if !(cfg.layer_of(&name).is_some() || quantized_lm_head) {
            let t = model.tensor(&name)?;
            out.add(&name, t.dtype, t.shape, t.data.to_vec())?;
        }
    }
    let max_len = samples.iter().map(Vec::len).max().unwrap_or(0);
    let rope = cfg.rope_table(max_len);
    let mut hidden: Vec<Tensor> = samples.iter().map(|s| model.embed(s)).collect::<Result<_>>()?;
    // lm_head (a Linear, listed even when tied) and the nn.Embedding carry quantizers but stay
    // unquantized (spec/export-formats.md §2.4).
    let mut summary = Summary { quantized: vec![], unquantized: vec!["lm_head".into(), cfg.names.embed.into()] };
    let n_layers = cfg.num_hidden_layers;
    // The next layer is read while this one calibrates (`Model::each_layer`).
    model.each_layer(|l, layer| {
        crate::io::signal::check()?;
        let modules = cfg.layer_modules(l);
        let formats: Vec<Option<QFormat>> = modules.iter().map(|m| opts.formats.of(&m.path)).collect();
        for (m, f) in modules.iter().zip(&formats) {
            match f {
                Some(f) => summary.quantized.push((m.path.clone(), *f)),
                None => summary.unquantized.push(m.path.clone()),
            }
        }
        // An MoE router carries a (disabled) quantizer: listed structurally, as ModelOpt does
        // since 0.45 (spec/export-formats.md §2.4).
        if let Some(moe) = cfg.moe_layer(l) {
            summary.unquantized.extend(moe.routers(l).into_iter().map(|r| r.0));
        }
        // Compressed-tensors mode: smoothing only where it folds.
        let smooth: Vec<bool> =
            (0..modules.len()).map(|k| !opts.compressed_tensors || foldable(&modules, k, &formats, &layer, cfg)).collect();
        let (stats, linears) =
            calibrate_layer(&layer, &modules, cfg, &rope, &mut hidden, samples, &formats, &smooth, opts.sq_alpha, dtype)?;
        emit_layer(model, l, linears, &layer, opts, dtype, &stats, out)?;
        crate::compute::take_device_error()?;
        progress.step("layer", l + 1, n_layers);
        Ok(())
    })?;
    if let Some(format) = lm_head_format {
        quantize_lm_head(model, &hidden, format, dtype, out)?;
        summary.unquantized.retain(|m| m != "lm_head");
        summary.quantized.push(("lm_head".into(), format));
    }
    Ok(summary)
}

/// One decoder layer's calibration: statistics of every linear's input over all `samples`
/// (max calibration, §3.1), the AWQ-lite search pass where a format needs one (§6.1), and each
/// quantized linear's algorithm result before export-time fusion (SmoothQuant factors, AWQ
/// scales, input amax). `hidden` (the layer inputs, one per sample) advances through the layer.
/// `formats` is indexed like `modules` (`ModelConfig::layer_modules`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn calibrate_layer<'a>(
    layer: &Layer,
    modules: &'a [LayerModule],
    cfg: &crate::model::config::ModelConfig,
    rope: &Rope,
    hidden: &mut [Tensor],
    samples: &[Vec<u32>],
    formats: &[Option<QFormat>],
    smooth: &[bool],
    sq_alpha: f32,
    dtype: Dtype,
) -> Result<(StatsHooks<'a>, Vec<Linear>)> {
    let any = |pred: fn(QFormat) -> bool| formats.iter().flatten().any(|&f| pred(f));
    let awq = any(QFormat::awq);

    // Pass 1: statistics.
    let n = modules.len();
    let mut stats = StatsHooks {
        modules,
        want_channels: any(|f| f == QFormat::Int8Sq || (f.awq() && f.act().is_some())),
        want_mean: awq,
        dtype,
        amax: vec![0.0; n],
        channel_amax: vec![vec![]; n],
        mean: (0..n).map(|_| None).collect(),
        kv_amax: (0.0, 0.0),
        non_finite: None,
    };
    for (s, (h, ids)) in hidden.iter_mut().zip(samples).enumerate() {
        // With a search pass to follow, each sample's input is copied (one at a time) and the
        // copy advanced, so the inputs stay for the search.
        let mut copy;
        let h = if awq {
            copy = h.clone();
            &mut copy
        } else {
            h
        };
        layer.forward(cfg, rope, h, ids.len(), &mut stats);
        crate::compute::take_device_error()?;
        if let Some(k) = stats.non_finite {
            return Err(Error::tensor(&modules[k].path, format!("input activations hold NaN/Inf (calibration sample {s})")));
        }
    }

    // Pass 2 (AWQ): the alpha search, advancing the hidden states.
    let mut best: Vec<Option<Vec<f32>>> = vec![None; n];
    if awq {
        let device = hidden.first().map_or(Device::Cpu, Tensor::device);
        let mut search = SearchHooks { layer, modules, searches: (0..n).map(|_| None).collect() };
        for (k, ((m, f), &smooth)) in modules.iter().zip(formats).zip(smooth).enumerate() {
            let Some(format) = f.filter(|f| f.awq() && smooth) else { continue };
            let [o, i] = m.shape;
            let xbar = stats.mean[k].as_ref().and_then(ActMean::finish);
            if let Some(xbar) = xbar {
                let w = layer.module_weight(m);
                let bias = layer.module_bias(m);
                let block = if format.weight() == WeightKind::Int4Groups { INT4_GROUP } else { nvfp4::BLOCK };
                let wbar = awq::weight_mean(&w, o, i, Some(block), dtype);
                let fq = search_quantizer(format, o, i, dtype);
                let w = Tensor::on(w, device);
                let mut s = LiteSearch::new(&w, o, i, &xbar, &wbar, dtype, &*fq);
                if let Some(b) = &bias {
                    s = s.with_bias(b);
                }
                let bias = bias.map(|b| Tensor::on(b, device));
                search.searches[k] = Some((w, bias, s));
            }
        }
        for (h, ids) in hidden.iter_mut().zip(samples) {
            layer.forward(cfg, rope, h, ids.len(), &mut search);
            crate::compute::take_device_error()?;
        }
        for (b, s) in best.iter_mut().zip(&search.searches) {
            *b = s.as_ref().and_then(|(_, _, s)| s.best()).map(|(_, s)| s);
        }
    }

    let linears = finalize(layer, modules, sq_alpha, dtype, &stats, formats, smooth, &mut best)?;
    Ok((stats, linears))
}

/// lm_head in a max-calibrated format (FP8 or NVFP4; auto-quantize may pick it when nothing
/// is excluded): its input is the final-norm output of every calibration sample. With tied
/// embeddings the quantized copy is written as `lm_head.weight` beside the bf16 embedding.
fn quantize_lm_head(model: &Model, hidden: &[Tensor], format: QFormat, dtype: Dtype, out: &mut Output) -> Result<()> {
    if format.awq() || format == QFormat::Int8Sq {
        return Err(Error::Unsupported(format!(
            "lm_head in {}: only max-calibrated formats (fp8, nvfp4) are supported for lm_head",
            format.cli_name()
        )));
    }
    let head = model.load_head()?;
    let cfg = &model.config;
    let amax = head.input_amax(hidden);
    crate::compute::take_device_error()?;
    let lin = Linear {
        kinds: &[],
        expert: None,
        shape: [cfg.vocab_size, cfg.hidden_size],
        module: "lm_head".into(),
        format,
        weight: head.lm_head().to_host().into_owned(),
        pqs: None,
        input_amax: amax,
        weight_amax: None,
    };
    for (name, dt, shape, data) in export_linear(&lin, dtype, fp8::absmax(&lin.weight), false, model.device)? {
        out.add(&name, dt, &shape, data)?;
    }
    Ok(())
}

/// A linear whose shape its format cannot store.
#[derive(Clone, Debug, PartialEq)]
pub struct Unstorable {
    pub module: String,
    pub shape: [usize; 2],
    pub format: QFormat,
}

impl std::fmt::Display for Unstorable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [o, i] = self.shape;
        let (block, even) = storage_multiples(self.format).unwrap_or((1, false));
        write!(f, "{}.weight [{o}, {i}] as {}: the input dim must be a multiple of {block}", self.module, self.format.cli_name())?;
        if even {
            write!(f, " and the output dim even")?;
        }
        Ok(())
    }
}

/// What a format needs of a weight's shape: the input dim a multiple of the block (NVFP4: 16;
/// INT4: its group of 128) and, for INT4's packed pairs, an even output dim (ModelOpt's export
/// asserts the same; spec/export-formats.md §2.5). None: any shape.
fn storage_multiples(format: QFormat) -> Option<(usize, bool)> {
    match format.weight() {
        WeightKind::Nvfp4 => Some((nvfp4::BLOCK, false)),
        WeightKind::Int4Groups => Some((INT4_GROUP, true)),
        _ => None,
    }
}

/// Every linear of `cfg` (decoder layers, then lm_head) that `formats` quantizes in a format
/// that cannot store its shape.
pub fn unstorable(cfg: &crate::model::config::ModelConfig, formats: &Formats) -> Vec<Unstorable> {
    let mut linears: Vec<(String, [usize; 2])> = (0..cfg.num_hidden_layers)
        .flat_map(|l| cfg.layer_modules(l).into_iter().map(|m| (m.path, m.shape)))
        .collect();
    linears.push(("lm_head".into(), [cfg.vocab_size, cfg.hidden_size]));
    linears
        .into_iter()
        .filter_map(|(module, shape)| {
            let format = formats.of(&module)?;
            let (block, even) = storage_multiples(format)?;
            (shape[1] % block != 0 || (even && shape[0] % 2 != 0)).then_some(Unstorable { module, shape, format })
        })
        .collect()
}

/// `--exclude` patterns that leave exactly the `bad` linears unquantized: a linear's path with
/// its layer index as `*` where every linear that pattern matches is in `bad` (one pattern for
/// the same projection of every layer), else the path itself. In first-seen order.
pub fn exclude_patterns(cfg: &crate::model::config::ModelConfig, bad: &[Unstorable]) -> Vec<String> {
    let all: Vec<String> =
        (0..cfg.num_hidden_layers).flat_map(|l| cfg.layer_modules(l).into_iter().map(|m| m.path)).chain(["lm_head".into()]).collect();
    let is_bad = |m: &str| bad.iter().any(|b| b.module == m);
    let mut patterns: Vec<String> = Vec::new();
    for b in bad {
        let wild = b.module.split('.').map(|part| if part.bytes().all(|c| c.is_ascii_digit()) { "*" } else { part }).collect::<Vec<_>>().join(".");
        let matched: Vec<&String> = all.iter().filter(|m| crate::quant::fnmatch(&wild, m)).collect();
        let pattern = if matched.iter().all(|m| is_bad(m)) { wild } else { b.module.clone() };
        if !patterns.contains(&pattern) {
            patterns.push(pattern);
        }
    }
    patterns
}

/// Refuses, before any work, the linears whose shape their format cannot store: all of them in
/// one error, with the `--exclude` patterns that would leave them unquantized.
fn check_shapes(cfg: &crate::model::config::ModelConfig, opts: &Options) -> Result<()> {
    const SHOWN: usize = 12;
    let bad = unstorable(cfg, &opts.formats);
    if bad.is_empty() {
        return Ok(());
    }
    let mut list: Vec<String> = bad.iter().take(SHOWN).map(|b| format!("  {b}")).collect();
    if bad.len() > SHOWN {
        list.push(format!("  ... and {} more", bad.len() - SHOWN));
    }
    Err(Error::Usage(format!(
        "{} linear(s) cannot be stored in their format:\n{}\nleave them unquantized with --exclude {} (or --auto-exclude)",
        bad.len(),
        list.join("\n"),
        exclude_patterns(cfg, &bad).join(",")
    )))
}

/// The linears sharing one norm, with the norm: its readers fold a common scale into it
/// (§2.7 point 2; ModelOpt finds them as the linears fed the same tensor). q/k/v read the
/// attention's norm and gate/up the MLP's, except that a parallel MLP without a norm of its own
/// reads the attention's input (GPT-J: q/k/v and fc_in are one group).
fn norm_groups(cfg: &crate::model::config::ModelConfig) -> Vec<(&'static [LinearKind], NormSlot)> {
    use LinearKind::{Gate, Up, K, Q, V};
    if cfg.parallel && cfg.norms.mlp_in.is_none() {
        return vec![(&[Q, K, V, Gate, Up], NormSlot::AttnIn)];
    }
    vec![(&[Q, K, V], NormSlot::AttnIn), (&[Gate, Up], NormSlot::MlpIn)]
}

/// Compressed-tensors mode: whether module `k`'s smoothing / AWQ scale folds exactly into a
/// neighbour (spec/export-formats.md §2.7). A norm's readers (q/k/v or qkv_proj; gate/up,
/// gate_up_proj, c_fc, Nemotron's up_proj) fold their shared mean scale into it when all are
/// quantized in one format; an MoE block's experts cannot (the norm also feeds the router), so
/// their gate/up are unsmoothed. A consumer folds into its producer's rows ([`row_fold`]) when
/// the producer is quantized (its rows are scaled before it is) and has no bias to scale.
fn foldable(
    modules: &[LayerModule],
    k: usize,
    formats: &[Option<QFormat>],
    layer: &Layer,
    cfg: &crate::model::config::ModelConfig,
) -> bool {
    let m = &modules[k];
    let reads = |x: &LayerModule, group: &[LinearKind]| x.kinds.iter().any(|k| group.contains(k));
    if let Some((group, slot)) = norm_groups(cfg).into_iter().find(|(g, _)| reads(m, g)) {
        if layer.norm(slot).is_none() || slot == NormSlot::MlpIn && cfg.moe_layer(layer.index).is_some() {
            // No norm in front to take the scale (Olmo2, Exaone4), or one that also feeds a
            // router (Qwen2-MoE's shared expert).
            return false;
        }
        let mut readers = modules.iter().zip(formats).filter(|(x, _)| x.expert.is_none() && reads(x, group));
        return m.expert.is_none() && readers.all(|(_, f)| *f == formats[k]);
    }
    row_fold(modules, k, cfg).is_some_and(|f| formats[f.producer].is_some() && !fold_biased(&f, modules, layer))
}

/// A dense producer with a bias would need the bias scaled too (Qwen2's v_proj).
fn fold_biased(fold: &RowFold, modules: &[LayerModule], layer: &Layer) -> bool {
    modules[fold.producer].expert.is_none() && layer.bias(fold.kind).is_some()
}

/// Fake-quantizes a whole `[out, in]` weight in place, on its device.
type WeightQuantizer = Box<dyn Fn(&mut Tensor)>;

/// The weight fake-quantizer used in the AWQ search: the format's weight quantizer with its
/// amax recomputed from the weight it is given, result in the model dtype (§6.1). For W4A8
/// only the INT4 stage: ModelOpt's W4A8 and INT4 exports of rq-tiny have identical AWQ
/// weights and scales, so its FP8 stage does not take part in the search.
fn search_quantizer(format: QFormat, out: usize, inp: usize, dtype: Dtype) -> WeightQuantizer {
    match format.weight() {
        WeightKind::Nvfp4 => Box::new(move |w: &mut Tensor| {
            let global_amax = w.amax(0.0);
            w.map_twin(DeviceTwin::FakeQuantNvfp4 { cols: inp, global_amax }, |h| nvfp4::fake_quant(h, inp, global_amax));
            awq::round_tensor(w, dtype);
        }),
        _ => Box::new(move |w: &mut Tensor| {
            let twin = DeviceTwin::FakeQuantInt4 { cols: inp, group: INT4_GROUP };
            w.map_twin(twin, |h| int::int4_fake_quant(h, out, inp, INT4_GROUP, None));
            awq::round_tensor(w, dtype);
        }),
    }
}

/// Applies each linear's algorithm result: SmoothQuant factors, AWQ scales, input amax.
#[allow(clippy::too_many_arguments)]
fn finalize(
    layer: &Layer,
    modules: &[LayerModule],
    sq_alpha: f32,
    dtype: Dtype,
    stats: &StatsHooks,
    formats: &[Option<QFormat>],
    smooth: &[bool],
    best: &mut [Option<Vec<f32>>],
) -> Result<Vec<Linear>> {
    let mut out = Vec::new();
    for (i, ((m, format), &smooth)) in modules.iter().zip(formats).zip(smooth).enumerate() {
        let Some(format) = *format else { continue };
        let [o, inp] = m.shape;
        let mut weight = layer.module_weight(m);
        // An expert no calibration token was routed to has no channel statistics: no smoothing
        // of its own (share_expert_scales gives it the block's common scale).
        let (pqs, input_amax) = if format == QFormat::Int8Sq && smooth && !stats.channel_amax[i].is_empty() {
            // §5: p_j = w_j^(1-α) / a_j^α, W' = W / p, input amax = max_j a_j·p_j.
            let p = smoothquant::pre_quant_scale(&stats.channel_amax[i], &weight, o, inp, sq_alpha, dtype);
            smoothquant::smooth_weight(&mut weight, inp, &p, dtype);
            let amax = smoothquant::smoothed_input_amax(&stats.channel_amax[i], &p, dtype);
            (Some(p), amax)
        } else if let Some(s) = best[i].take() {
            // §6.1 finalize: pre_quant_scale p = 1/s, W ← W·s (as W / p).
            let p: Vec<f32> = s.iter().map(|&v| 1.0 / v).collect();
            smoothquant::smooth_weight(&mut weight, inp, &p, dtype);
            let amax = if stats.channel_amax[i].is_empty() {
                stats.amax[i]
            } else {
                smoothquant::smoothed_input_amax(&stats.channel_amax[i], &p, dtype)
            };
            (Some(p), amax)
        } else {
            // Plain max calibration (also AWQ's fallback for a linear that saw no data).
            (None, stats.amax[i])
        };
        let (kinds, expert, shape, module) = (m.kinds, m.expert, m.shape, m.path.clone());
        out.push(Linear { kinds, expert, shape, module, format, weight, pqs, input_amax, weight_amax: None });
    }
    Ok(out)
}

/// Export-time fusion (spec/algorithms.md §7, spec/export-formats.md §2.7) and the layer's
/// tensors: norms (folded for AWQ formats), every linear in its format, KV scales, and a raw
/// copy of anything else under `model.layers.{l}.`.
#[allow(clippy::too_many_arguments)]
fn emit_layer(
    model: &Model,
    l: usize,
    mut linears: Vec<Linear>,
    layer: &Layer,
    opts: &Options,
    dtype: Dtype,
    stats: &StatsHooks,
    out: &mut Output,
) -> Result<()> {
    let cfg = &model.config;
    // The norms on the host: AWQ folds scales into them.
    let host = |t: &Tensor| t.to_host().into_owned();
    // Per slot of `cfg.norms`: (weight, bias) where the family has that norm.
    let original_norms = layer.norms.each_ref().map(|n| n.as_ref().map(|n| (host(&n.weight), n.bias.as_ref().map(host))));
    let mut norms = original_norms.clone();
    let find = |ls: &[Linear], k: LinearKind| ls.iter().position(|x| x.expert.is_none() && x.kinds.contains(&k));

    // 1. A consumer's scale into its producer's output rows (`row_fold`): in compressed-tensors
    //    mode wherever `foldable` let it smooth; for NVFP4_AWQ as ModelOpt, whose
    //    PQS_FUSE_MODULE_MAPPING names only Llama/Qwen3 attention and MLP classes (§2.7 point 3):
    //    dense down_proj into up_proj, o_proj into v_proj; not Phi3, Starcoder2, Nemotron, experts.
    let modules = cfg.layer_modules(l);
    let index = |ls: &[Linear], path: &str| ls.iter().position(|x| x.module == path);
    for k in 0..modules.len() {
        let Some(fold) = row_fold(&modules, k, cfg) else { continue };
        let (Some(c), Some(p)) = (index(&linears, &modules[k].path), index(&linears, &modules[fold.producer].path)) else {
            continue;
        };
        let nvfp4_awq = [c, p].iter().all(|&i| linears[i].format == QFormat::Nvfp4Awq);
        let modelopt = nvfp4_awq && cfg.modelopt_pqs_fuse() && modules[k].expert.is_none();
        if !(modelopt || opts.compressed_tensors) || fold_biased(&fold, &modules, layer) {
            continue;
        }
        let Some(s) = linears[c].pqs.take() else { continue };
        let inp = linears[p].shape[1];
        for (row, &f) in linears[p].weight.chunks_exact_mut(inp).skip(fold.offset).zip(&s) {
            let f = if fold.squared { f.sqrt() } else { f };
            row.iter_mut().for_each(|w| *w = fp8::round_to_dtype(*w * f, dtype));
        }
    }

    // 2. Modules reading the same input share one pre_quant_scale (mean), input amax (max)
    //    and per-tensor weight amax (max); AWQ formats fold the shared scale into the norm
    //    (weight and bias, §2.7 point 2), also when one module alone reads it (Phi3's fused
    //    modules, Starcoder2's c_fc, Nemotron's up_proj).
    //    Without a norm in front (Olmo2, Exaone4) the shared scale stays a `pre_quant_scale`.
    for (members, slot) in norm_groups(cfg) {
        let mut idx: Vec<usize> = members.iter().filter_map(|&k| find(&linears, k)).collect();
        idx.dedup();
        let Some(format) = idx.first().map(|&i| linears[i].format) else { continue };
        if format == QFormat::Fp8 || idx.iter().any(|&i| linears[i].format != format) {
            continue; // FP8 keeps per-module scales; members of different formats share nothing
        }
        let [_, inp] = linears[idx[0]].shape;
        let modules = cfg.modules.iter().filter(|m| m.kinds.iter().any(|k| members.contains(k))).count();
        if idx.iter().all(|&i| linears[i].pqs.is_some()) && idx.len() == modules {
            let mut parts: Vec<Linear> = Vec::new();
            for &i in idx.iter().rev() {
                parts.push(linears.remove(i));
            }
            let p_avg = {
                let mut refs: Vec<(&mut Vec<f32>, Vec<f32>)> =
                    parts.iter_mut().map(|x| { let p = x.pqs.take().unwrap_or_default(); (&mut x.weight, p) }).collect();
                smoothquant::resmooth_group(&mut refs, inp, dtype)
            };
            // In an MoE layer the MLP's norm also feeds the router and the routed experts:
            // Qwen2-MoE's shared expert keeps its (shared) scale as a `pre_quant_scale`.
            let feeds_router = slot == NormSlot::MlpIn && cfg.moe_layer(l).is_some();
            let folds = (format.awq() || opts.compressed_tensors) && !feeds_router;
            let norm = norms[slot as usize].as_mut().filter(|_| folds);
            let fold = norm.is_some();
            if let Some((weight, bias)) = norm {
                if cfg.norm_offset {
                    awq::fold_into_norm_plus_one(weight, &p_avg, dtype); // GemmaRMSNorm, LayerNorm1P: 1 + w
                } else {
                    awq::fold_into_norm(weight, &p_avg, dtype);
                }
                if let Some(b) = bias {
                    awq::fold_into_norm(b, &p_avg, dtype); // LayerNorm bias: b · s
                }
            }
            if !fold {
                parts.iter_mut().for_each(|x| x.pqs = Some(p_avg.clone()));
            }
            linears.extend(parts);
        }
        let mut idx: Vec<usize> = members.iter().filter_map(|&k| find(&linears, k)).collect();
        idx.dedup();
        let amax = idx.iter().map(|&i| linears[i].input_amax).fold(0f32, f32::max);
        let wamax = idx.iter().map(|&i| fp8::absmax(&linears[i].weight)).fold(0f32, f32::max);
        for &i in &idx {
            linears[i].input_amax = amax;
            linears[i].weight_amax = Some(wamax);
        }
    }
    // 3. The experts of an MoE block.
    share_expert_scales(&mut linears, dtype);

    let prefix = cfg.layer_prefix(l);
    let mut written: Vec<String> = Vec::new();
    let mut add = |out: &mut Output, name: String, dt: Dtype, shape: &[usize], data: Vec<u8>| -> Result<()> {
        out.add(&name, dt, shape, data)?;
        written.push(name);
        Ok(())
    };
    let norm_tensors = cfg.norms.slots().into_iter().zip(norms.iter().zip(&original_norms)).filter_map(|(name, n)| match n {
        (Some(n), Some(o)) => Some((name?, n, o)),
        _ => None,
    });
    let norm_tensors = norm_tensors.flat_map(|(name, (w, b), (ow, ob))| {
        [(format!("{name}.weight"), Some(w), Some(ow)), (format!("{name}.bias"), b.as_ref(), ob.as_ref())]
    });
    for (name, norm, original) in norm_tensors {
        let (Some(norm), Some(original)) = (norm, original) else { continue };
        let full = format!("{prefix}.{name}");
        let t = model.tensor(&full)?;
        let data = if norm == original {
            t.data.to_vec() // unchanged: the original bytes
        } else {
            encode(norm, t.dtype)
        };
        add(out, full, t.dtype, t.shape, data)?;
    }
    for lin in &linears {
        let wamax = lin.weight_amax.unwrap_or_else(|| fp8::absmax(&lin.weight));
        for (name, dt, shape, data) in export_linear(lin, dtype, wamax, opts.compressed_tensors, model.device)? {
            add(out, name, dt, &shape, data)?;
        }
    }
    if opts.kv_fp8 {
        for (proj, suffix, amax) in [("k_proj", "k_scale", stats.kv_amax.0), ("v_proj", "v_scale", stats.kv_amax.1)] {
            let s = fp8::input_scale(amax, dtype);
            add(out, format!("{}.{proj}.{suffix}", cfg.attn_prefix(l)), Dtype::F32, &[], s.to_le_bytes().to_vec())?;
        }
    }
    // Everything else of the layer (excluded linears' weights, biases, buffers): copied.
    let layer_prefix = format!("{prefix}.");
    let quantized_weights: Vec<String> = linears.iter().map(|x| format!("{}.weight", x.module)).collect();
    for name in model.weight_names() {
        if name.starts_with(&layer_prefix) && !written.contains(&name) && !quantized_weights.contains(&name) {
            let t = model.tensor(&name)?;
            out.add(&name, t.dtype, t.shape, t.data.to_vec())?;
        }
    }
    Ok(())
}

/// Export-time rules for the expert linears of an MoE layer, as ModelOpt 0.47 exports
/// transformers-5 MoE blocks (`_QuantFusedExperts`, `moe_utils._export_fused_experts`):
/// * every expert's gate/up share one input quantizer and every expert's down another, so the
///   block's experts get one `input_scale` each (max over the experts' routed tokens; an
///   expert that received no calibration token gets it too);
/// * SmoothQuant / AWQ scales: the experts of a block are re-smoothed to the mean scale
///   (spec/export-formats.md §2.7 point 5, `update_experts_avg_prequant_scale`), gate and up
///   together (they read the same input) and down apart; an expert without a scale of its own
///   (no routed token) enters the mean with all ones, as awq_lite's neutral scale for a
///   disabled expert. The scale stays a `pre_quant_scale` tensor: the norm before the block
///   also feeds the unquantized router, so it cannot absorb it;
/// * gate and up of one expert share the per-tensor weight amax (one weight quantizer on the
///   fused `gate_up_proj`; §2.9 `sync_moe_gate_up_amax`): FP8 `weight_scale`, NVFP4 and W4A8
///   `weight_scale_2`.
fn share_expert_scales(linears: &mut [Linear], dtype: Dtype) {
    let reads = |x: &Linear, members: &[LinearKind]| x.kinds.iter().any(|k| members.contains(k));
    for members in [&[LinearKind::Gate, LinearKind::Up][..], &[LinearKind::Down][..]] {
        let is_member = |x: &Linear| x.expert.is_some() && reads(x, members);
        let Some(first) = linears.iter().find(|x| is_member(x)) else { continue };
        let (format, inp) = (first.format, first.shape[1]);
        if linears.iter().any(|x| is_member(x) && x.format != format) {
            continue; // experts in different formats (--layer-formats) share nothing
        }
        if linears.iter().any(|x| is_member(x) && x.pqs.is_some()) {
            let mut refs: Vec<(&mut Vec<f32>, Vec<f32>)> = linears
                .iter_mut()
                .filter(|x| is_member(x))
                .map(|x| {
                    let p = x.pqs.take().unwrap_or_else(|| vec![1.0; inp]);
                    (&mut x.weight, p)
                })
                .collect();
            let p_avg = smoothquant::resmooth_group(&mut refs, inp, dtype);
            linears.iter_mut().filter(|x| is_member(x)).for_each(|x| x.pqs = Some(p_avg.clone()));
        }
        let amax = linears.iter().filter(|x| is_member(x)).map(|x| x.input_amax).fold(0f32, f32::max);
        linears.iter_mut().filter(|x| is_member(x)).for_each(|x| x.input_amax = amax);
    }
    let mut experts: Vec<usize> = linears.iter().filter_map(|x| x.expert).collect();
    experts.dedup();
    for e in experts {
        let pair = |x: &Linear| x.expert == Some(e) && reads(x, &[LinearKind::Gate, LinearKind::Up]);
        let formats: Vec<QFormat> = linears.iter().filter(|x| pair(x)).map(|x| x.format).collect();
        if formats.windows(2).any(|f| f[0] != f[1]) {
            continue;
        }
        let wamax = linears.iter().filter(|x| pair(x)).map(|x| fp8::absmax(&x.weight)).fold(0f32, f32::max);
        linears.iter_mut().filter(|x| pair(x)).for_each(|x| x.weight_amax = Some(wamax));
    }
}


type OutTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// One linear's tensors in `format`'s unified-HF layout (spec/export-formats.md §2.5).
/// `weight_amax`: the per-tensor weight amax (max over an export-fused group where ModelOpt
/// shares it: NVFP4 `weight_scale_2`, W4A8's FP8 stage; FP8 `weight_scale` only for the gate
/// and up of one MoE expert). `compressed_tensors` (that mode): INT4 group scales are rounded to
/// the model dtype before the codes are computed, and NVFP4's `weight_scale_2` moves by a few
/// ulps to one whose inverse is exact (export_ct.rs). `device`: where NVFP4 weights are
/// quantized (the codes are the same bytes on both).
fn export_linear(
    lin: &Linear,
    dtype: Dtype,
    weight_amax: f32,
    compressed_tensors: bool,
    device: Device,
) -> Result<Vec<OutTensor>> {
    let (m, format) = (&lin.module, lin.format);
    let [o, i] = lin.shape;
    let w = &lin.weight;
    let name = format!("{m}.weight");
    let scalar = |suffix: &str, v: f32| (format!("{m}.{suffix}"), Dtype::F32, vec![], v.to_le_bytes().to_vec());
    let mut t: Vec<OutTensor> = Vec::new();
    match format.weight() {
        WeightKind::Fp8 => {
            let scale = fp8::scale_from_amax(weight_amax);
            t.push((name.clone(), Dtype::F8E4M3, vec![o, i], quantize_fp8(&name, w, scale, dtype, device)?));
            t.push(scalar("weight_scale", scale));
        }
        WeightKind::Int8Rows => {
            let (codes, scales) = quantize_int8(&name, w, [o, i], dtype, device)?;
            t.push((name, Dtype::I8, vec![o, i], bytemuck::cast_slice(&codes).to_vec()));
            t.push((format!("{m}.weight_scale"), Dtype::F32, vec![o], f32_bytes(&scales)));
        }
        WeightKind::Int4Groups => {
            let mut scales = int::int4_group_scales(&name, w, o, i, INT4_GROUP, None, dtype)?;
            if compressed_tensors {
                scales.iter_mut().for_each(|s| *s = fp8::round_to_dtype(*s, dtype));
            }
            let packed = quantize_int4(&name, w, [o, i], &scales, device)?;
            t.push((name, Dtype::U8, vec![o / 2, i], packed));
            t.push((format!("{m}.weight_scale"), Dtype::F32, vec![o, i / INT4_GROUP], f32_bytes(&scales)));
            if format == QFormat::W4a8Awq {
                // The FP8 stage of the SequentialQuantizer: amax of the (group's) weights / 448.
                t.push(scalar("weight_scale_2", fp8::scale_from_amax(weight_amax)));
            }
        }
        WeightKind::Nvfp4 => {
            let mut ws2 = nvfp4::weight_scale_2(weight_amax);
            if compressed_tensors {
                ws2 = nvfp4::invertible_scale_2(ws2);
            }
            let (packed, block_scales) = quantize_nvfp4(&name, w, [o, i], ws2, device)?;
            t.push((name, Dtype::U8, vec![o, i / 2], packed));
            t.push((format!("{m}.weight_scale"), Dtype::F8E4M3, vec![o, i / nvfp4::BLOCK], block_scales));
            t.push(scalar("weight_scale_2", ws2));
        }
    }
    match format.act() {
        Some(ActKind::Fp8) => t.push(scalar("input_scale", fp8::input_scale(lin.input_amax, dtype))),
        Some(ActKind::Int8) => t.push(scalar("input_scale", int::int8_input_scale(lin.input_amax, dtype))),
        Some(ActKind::Nvfp4) => {
            let mut s = nvfp4::input_scale(lin.input_amax, dtype);
            if compressed_tensors {
                s = nvfp4::invertible_input_scale(s);
            }
            t.push(scalar("input_scale", s));
        }
        None => {}
    }
    if let Some(p) = &lin.pqs {
        t.push((format!("{m}.pre_quant_scale"), dtype, vec![i], encode(p, dtype)));
    }
    Ok(t)
}

/// FP8 codes of the weight `name` (`fp8::quantize`), on `device` for a bf16 model whose weights
/// are bf16 values (the kernel's input; anything else on the host): the CUDA kernel is its
/// bit-identical twin (tests/cuda.rs).
#[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(unused_variables))]
fn quantize_fp8(name: &str, w: &[f32], scale: f32, dtype: Dtype, device: Device) -> Result<Vec<u8>> {
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    if device == Device::Cuda && dtype == Dtype::BF16 && w.iter().all(|v| v.to_bits() & 0xFFFF == 0) {
        let bits: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        return crate::compute::cuda::quantize_fp8_bf16(&bits, scale).map_err(|e| Error::tensor(name, e.to_string()));
    }
    Ok(fp8::quantize(w, scale, dtype))
}

/// NVFP4 codes and block scales of the weight `name` (`nvfp4::quantize_weight_scaled`), on
/// `device`: the CUDA kernel is its bit-identical twin (tests/cuda_quant.rs).
#[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(unused_variables))]
fn quantize_nvfp4(name: &str, w: &[f32], [o, i]: [usize; 2], ws2: f32, device: Device) -> Result<(Vec<u8>, Vec<u8>)> {
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    if device == Device::Cuda {
        return crate::compute::cuda::quantize_nvfp4(w, o, i, ws2).map_err(|e| Error::tensor(name, e.to_string()));
    }
    let q = nvfp4::quantize_weight_scaled(name, w, o, i, ws2)?;
    Ok((q.packed, q.block_scales))
}

/// INT8 codes and row scales of the weight `name` (`int::int8_quantize_rows`): the scales on
/// the host, the codes on `device` (the kernel is their bit-identical twin, tests/cuda_quant.rs).
#[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(unused_variables))]
fn quantize_int8(name: &str, w: &[f32], [o, i]: [usize; 2], dtype: Dtype, device: Device) -> Result<(Vec<i8>, Vec<f32>)> {
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    if device == Device::Cuda && w.len() == o * i {
        let scales = int::int8_row_scales(w, o, i, dtype);
        let codes = crate::compute::cuda::quantize_int8_rows(w, o, i, &scales).map_err(|e| Error::tensor(name, e.to_string()))?;
        return Ok((codes, scales));
    }
    int::int8_quantize_rows(name, w, o, i, dtype)
}

/// Packed INT4 codes of the weight `name` for its group scales (`int::int4_quantize_with_scales`),
/// on `device` (the kernel is its bit-identical twin, tests/cuda_quant.rs).
#[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(unused_variables))]
fn quantize_int4(name: &str, w: &[f32], [o, i]: [usize; 2], scales: &[f32], device: Device) -> Result<Vec<u8>> {
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    if device == Device::Cuda && w.len() == o * i && scales.len() == o * (i / INT4_GROUP) {
        return crate::compute::cuda::quantize_int4(w, o, i, INT4_GROUP, scales).map_err(|e| Error::tensor(name, e.to_string()));
    }
    int::int4_quantize_with_scales(name, w, o, i, INT4_GROUP, scales)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
