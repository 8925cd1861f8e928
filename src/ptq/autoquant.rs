//! Auto-quantize: a format per layer group under an effective-bits budget, ModelOpt's
//! `mtq.auto_quantize` with the gradient score (spec/algorithms.md §9).
//!
//! 1. Groups decided together (§9.1, [`groups`]): q/k/v, gate/up, o_proj, down_proj of each
//!    layer (a fused module such as Phi-3's qkv_proj is its own group), all experts of an MoE
//!    layer together, and lm_head when it is not excluded. Excluded modules and MoE routers cost
//!    16 bits in the budget. Every family of the runtime is supported.
//! 2. Calibration: one forward pass over the calibration samples (max calibration of every
//!    linear's input, for the candidates' activation quantizers).
//! 3. Score (§9.3): with the model unquantized, forward + backward of the LM loss over the
//!    score samples; for every Linear module and candidate format r, `Σ (∂L/∂y ⊙ (y_r − y))²`
//!    with `y_r` the output recomputed with r's weight and input fake quantization (a fused
//!    module's y is its linears' outputs stacked; an MoE expert's, its routed tokens'). A group's score
//!    is the sum over its members; scores are made non-increasing from the most to the least
//!    compressed format; 16-bit scores 0.
//! 4. Selection (§9.5): the exact 0/1 choice minimizing the total score under the budget
//!    (dynamic programming over integer costs; deterministic).

use crate::ptq::backward::{head_backward, LayerGrad};
use crate::model::config::ModelConfig;
use crate::error::{Error, Result};
use crate::io::json::{obj, str, Json};
use crate::model::{Hooks, LayerModule, LinearKind, Model, NoHooks};
use crate::compute::{Compute, Device, Tensor};
use crate::ptq::progress::Progress;
use crate::model::weights::InputQuant;
use crate::quant::{fp8, int, nvfp4, smoothquant, Exclusions, QFormat, WeightKind, INT4_GROUP};
use crate::ptq::quantize::calibrate_layer;
use crate::io::safetensors::Dtype;
use std::borrow::Cow;
use std::collections::HashMap;

/// One set of modules that gets one format.
#[derive(Clone, Debug)]
pub struct Group {
    pub name: String,
    pub members: Vec<String>,
    /// Weights in the group.
    pub params: usize,
    /// False for excluded groups: they stay 16-bit.
    pub searchable: bool,
}

/// ModelOpt's bits of a format in the budget (`estimate_quant_compression` × 16; NVFP4 carries
/// `effective_bits: 4.5` in 0.47's yaml; integers count their `num_bits`), §9.1.
pub fn format_bits(f: QFormat) -> f64 {
    match f.weight() {
        WeightKind::Nvfp4 => 4.5,
        WeightKind::Int4Groups => 4.0,
        WeightKind::Fp8 | WeightKind::Int8Rows => 8.0,
    }
}

/// The groups of a model, ModelOpt's `quant_grouping_rules` (§9.1) over each layer's modules
/// (`ModelConfig::layer_modules`), in forward order:
/// * `(.*)\.(q_proj|k_proj|v_proj)$` → `{layer}.self_attn.qkv` (Phi3's fused `qkv_proj` is one
///   module and its own group);
/// * `(.*\.mlp\.experts)\.\d+\.(gate_proj|up_proj|down_proj)$`, Mixtral `\d+\.(w1|w2|w3)` →
///   `{layer}.{block}.experts`: every projection of every expert of the layer shares one choice;
/// * `(.*)\.(gate_proj|up_proj)$` → `{layer}.mlp.gate_up` (Nemotron's up_proj alone; Phi3's
///   `gate_up_proj` and Starcoder2's `c_fc` match no rule and are their own groups);
/// * every other module (o_proj, down_proj, c_proj) alone.
///
/// An MoE router is a group that stays 16-bit (never searched; it counts in the budget like
/// an excluded module), and lm_head is the last group.
pub fn groups(model: &Model, exclusions: &Exclusions) -> Vec<Group> {
    let cfg = &model.config;
    let mut out: Vec<Group> = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let first = out.len();
        for m in cfg.layer_modules(l) {
            let name = group_name(cfg, l, &m);
            let params = m.shape[0] * m.shape[1];
            let excluded = exclusions.is_excluded(&m.path);
            match out[first..].iter_mut().find(|g| g.name == name) {
                Some(g) => {
                    g.members.push(m.path);
                    g.params += params;
                    g.searchable &= !excluded;
                }
                None => out.push(Group { name, members: vec![m.path], params, searchable: !excluded }),
            }
        }
        for (router, rows) in cfg.moe_layer(l).map(|moe| moe.routers(l)).unwrap_or_default() {
            out.push(Group { name: router.clone(), members: vec![router], params: rows * cfg.hidden_size, searchable: false });
        }
    }
    out.push(Group {
        name: "lm_head".into(),
        members: vec!["lm_head".into()],
        params: cfg.vocab_size * cfg.hidden_size,
        searchable: !exclusions.is_excluded("lm_head"),
    });
    out
}

/// The group of module `m` of layer `l` (see [`groups`]): ModelOpt's grouping rules
/// `(.*)\.(q_proj|k_proj|v_proj)$` and `(.*)\.(gate_proj|up_proj)$` name the group by the
/// parent module (`<parent>.qkv`, `<parent>.gate_up` here), all experts of a block share one.
fn group_name(cfg: &ModelConfig, l: usize, m: &LayerModule) -> String {
    if let (Some(_), Some(moe)) = (m.expert, cfg.moe_layer(l)) {
        return format!("{}.experts", moe.block_prefix(l));
    }
    let (parent, leaf) = m.path.rsplit_once('.').unwrap_or(("", &m.path));
    match leaf {
        "q_proj" | "k_proj" | "v_proj" => format!("{parent}.qkv"),
        "gate_proj" | "up_proj" => format!("{parent}.gate_up"),
        _ => m.path.clone(),
    }
}

/// The lowest effective bits the groups allow: searchable ones at the cheapest format,
/// the others at 16.
pub fn lowest_bits(groups: &[Group], formats: &[QFormat]) -> f64 {
    let total: usize = groups.iter().map(|g| g.params).sum();
    let cheapest = |g: &Group| offered(g, formats).iter().map(|&f| format_bits(formats[f])).fold(16.0, f64::min);
    groups.iter().map(|g| g.params as f64 * cheapest(g)).sum::<f64>() / total as f64
}

/// Exact multiple-choice knapsack: one option per group minimizing the summed score with the
/// summed cost <= `budget`. Costs are integers; the table has `budget + 1` columns. Ties go to
/// the smaller cost, then the earlier option. None when no choice fits.
pub fn select(costs: &[Vec<u64>], scores: &[Vec<f64>], budget: u64) -> Option<Vec<usize>> {
    let b = budget as usize;
    // best[c] = (score, cost) of the best choice so far with cost <= c, per prefix of groups.
    let mut best: Vec<Option<(f64, u64)>> = vec![Some((0.0, 0)); b + 1];
    let mut choice: Vec<Vec<u8>> = Vec::with_capacity(costs.len());
    for (gc, gs) in costs.iter().zip(scores) {
        let mut next: Vec<Option<(f64, u64)>> = vec![None; b + 1];
        let mut pick = vec![u8::MAX; b + 1];
        for c in 0..=b {
            for (o, (&cost, &score)) in gc.iter().zip(gs).enumerate() {
                let Some(rest) = c.checked_sub(cost as usize) else { continue };
                let Some((s, k)) = best[rest] else { continue };
                let cand = (s + score, k + cost);
                let better = match next[c] {
                    None => true,
                    Some((bs, bk)) => cand.0 < bs || (cand.0 == bs && cand.1 < bk),
                };
                if better {
                    next[c] = Some(cand);
                    pick[c] = o as u8;
                }
            }
        }
        best = next;
        choice.push(pick);
    }
    best[b]?;
    // Walk back: the option chosen at the remaining budget, group by group from the last.
    let mut c = b;
    let mut out = vec![0usize; costs.len()];
    for g in (0..costs.len()).rev() {
        let o = choice[g][c] as usize;
        out[g] = o;
        c -= costs[g][o] as usize;
    }
    Some(out)
}

/// The search result: a format (or None = 16-bit) per group, and the report.
pub struct Search {
    pub groups: Vec<Group>,
    pub formats: Vec<QFormat>,
    /// Per group, per format (same order as `formats`), the sensitivity score; None where the
    /// group cannot take the format (lm_head and the AWQ / SmoothQuant formats).
    pub scores: Vec<Vec<Option<f64>>>,
    pub chosen: Vec<Option<QFormat>>,
    pub effective_bits: f64,
    pub budget: f64,
    pub seconds: f64,
}

impl Search {
    /// module -> format, for the export.
    pub fn module_formats(&self) -> HashMap<String, QFormat> {
        let mut m = HashMap::new();
        for (g, f) in self.groups.iter().zip(&self.chosen) {
            if let Some(f) = f {
                for member in &g.members {
                    m.insert(member.clone(), *f);
                }
            }
        }
        m
    }

    /// The report as JSON (`auto_quantize.json` in the output folder).
    pub fn report(&self, seed: u64, calib_digest: &str, score_samples: usize) -> Json {
        let groups = self
            .groups
            .iter()
            .zip(&self.scores)
            .zip(&self.chosen)
            .map(|((g, sc), ch)| {
                let scores = Json::Obj(
                    self.formats
                        .iter()
                        .zip(sc)
                        .map(|(f, s)| (f.cli_name().to_string(), s.map_or(Json::Null, Json::Float)))
                        .collect(),
                );
                obj([
                    ("group", str(&g.name)),
                    ("members", Json::Arr(g.members.iter().map(|m| str(m)).collect())),
                    ("params", Json::Int(g.params as i64)),
                    ("searchable", Json::Bool(g.searchable)),
                    ("scores", scores),
                    ("chosen", str(ch.map_or("none", |f| f.cli_name()))),
                    ("bits", Json::Float(ch.map_or(16.0, format_bits))),
                ])
            })
            .collect();
        obj([
            ("effective_bits_budget", Json::Float(self.budget)),
            ("effective_bits", Json::Float(self.effective_bits)),
            ("formats", Json::Arr(self.formats.iter().map(|f| str(f.cli_name())).collect())),
            ("method", str("gradient")),
            ("score_samples", Json::Int(score_samples as i64)),
            ("seed", Json::Int(seed as i64)),
            ("calibration_digest", str(calib_digest)),
            ("search_seconds", Json::Float(self.seconds)),
            ("groups", Json::Arr(groups)),
        ])
    }

    /// The printed table: group, score per format, chosen format, bits.
    pub fn table(&self) -> String {
        let mut s = format!("{:<32}", "group");
        for f in &self.formats {
            s += &format!(" {:>12}", format!("score {}", f.cli_name()));
        }
        s += &format!(" {:>8} {:>6}\n", "chosen", "bits");
        for ((g, sc), ch) in self.groups.iter().zip(&self.scores).zip(&self.chosen) {
            s += &format!("{:<32}", g.name);
            for v in sc {
                s += &match v {
                    Some(v) => format!(" {v:>12.4e}"),
                    None => format!(" {:>12}", "-"),
                };
            }
            s += &format!(" {:>8} {:>6.1}\n", ch.map_or("none", |f| f.cli_name()), ch.map_or(16.0, format_bits));
        }
        s += &format!("effective bits {:.3} (budget {:.3})\n", self.effective_bits, self.budget);
        s
    }
}

/// FNV-1a 64 of the calibration ids: recorded in the report so a search can be reproduced.
pub fn calib_digest(samples: &[Vec<u32>]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for row in samples {
        for &t in row.iter().chain(std::iter::once(&u32::MAX)) {
            for b in t.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    format!("fnv1a64:{h:016x}")
}

/// `n` of the sample indices, chosen by a seeded shuffle (xorshift; deterministic).
pub fn score_indices(total: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..total).collect();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in (1..total).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        idx.swap(i, (s % (i as u64 + 1)) as usize);
    }
    idx.truncate(n.min(total));
    idx.sort_unstable();
    idx
}

/// Input amax per linear kind: of the dense linears (Qwen2-MoE's shared expert among them),
/// and pooled over an MoE block's experts.
#[derive(Default)]
struct Amax {
    dense: [f32; N],
    experts: [f32; N],
}

impl Hooks for Amax {
    fn linear_input(&mut self, _layer: usize, kind: LinearKind, x: &mut Tensor, _cols: usize) {
        let a = &mut self.dense[kind as usize];
        *a = x.amax(*a);
    }
    fn expert_input(&mut self, _layer: usize, _expert: usize, kind: LinearKind, x: &mut Tensor, _cols: usize) {
        let a = &mut self.experts[kind as usize];
        *a = x.amax(*a);
    }
}

const N: usize = LinearKind::ALL.len();

/// Formats whose calibration is more than max calibration: they run their own algorithm
/// (AWQ-lite, SmoothQuant) per candidate, §9.2.
fn has_algorithm(f: QFormat) -> bool {
    f.awq() || f == QFormat::Int8Sq
}

/// The indices of `formats` group `g` may take (besides 16-bit): none for an excluded group;
/// lm_head only the max-calibrated ones, as the quantizer writes lm_head in FP8 / NVFP4 only.
fn offered(g: &Group, formats: &[QFormat]) -> Vec<usize> {
    if !g.searchable {
        return vec![];
    }
    (0..formats.len()).filter(|&i| g.name != "lm_head" || !has_algorithm(formats[i])).collect()
}

/// A candidate's weight as the score sees it: smoothed by its pre_quant_scale (divided, in
/// the model dtype, as the quantizer stores it) and fake-quantized in the format.
fn candidate_weight(f: QFormat, w: &[f32], [out, inp]: [usize; 2], pqs: Option<&[f32]>, dtype: Dtype) -> Result<Vec<f32>> {
    let mut q = w.to_vec();
    if let Some(p) = pqs {
        smoothquant::smooth_weight(&mut q, inp, p, dtype);
    }
    let amax = fp8::absmax(&q);
    match f.weight() {
        WeightKind::Fp8 => fp8::fake_quant(&mut q, amax),
        WeightKind::Nvfp4 => nvfp4::fake_quant(&mut q, inp, amax),
        WeightKind::Int4Groups => int::int4_fake_quant(&mut q, out, inp, INT4_GROUP, None),
        WeightKind::Int8Rows => {
            let (codes, scales) = int::int8_quantize_rows("auto-quantize candidate", &q, out, inp, dtype)?;
            for ((v, c), s) in q.iter_mut().zip(&codes).zip(scales.iter().flat_map(|&s| std::iter::repeat_n(s, inp))) {
                *v = *c as f32 * s;
            }
        }
    }
    Ok(q)
}

/// One linear as the score sees it, on the score's backend: its weight `[out, in]` and, per
/// candidate format, the fake-quantized weight (a fused module's linear: its rows of the
/// module's candidates).
struct Scored<'a> {
    w: Cow<'a, Tensor>,
    wq: Vec<Tensor>,
    shape: [usize; 2],
}

impl<'a> Scored<'a> {
    /// The linear `w` (`[rows.len(), inp]`: the model's tensor, or rows `rows` of a fused
    /// module's host weight `module`) and rows `rows` of the module's candidates `wq`, on `device`.
    fn new(w: Option<&'a Tensor>, module: &[f32], wq: &[Vec<f32>], rows: std::ops::Range<usize>, inp: usize, device: Device) -> Scored<'a> {
        let span = rows.start * inp..rows.end * inp;
        Scored {
            w: w.map_or_else(|| Cow::Owned(Tensor::on(module[span.clone()].to_vec(), device)), Cow::Borrowed),
            wq: wq.iter().map(|q| Tensor::on(q[span.clone()].to_vec(), device)).collect(),
            shape: [rows.len(), inp],
        }
    }

    /// Adds `Σ (dy ⊙ (y_r − y))²` for every candidate r to `scores` (`[formats]`), given the
    /// linear's input x (`[rows, in]`), dy (`[rows, out]`) and what each candidate does to the
    /// input. Per row in f64 ([`Tensor::sq_err_rows`]), the rows added in order.
    fn score(&self, inputs: &[InputQuant], x: &Tensor, dy: &Tensor, scores: &mut [f64]) {
        let [out, inp] = self.shape;
        let rows = x.len() / inp;
        let y = x.matmul_bt(&self.w, rows, inp, out);
        for ((q, input), s) in self.wq.iter().zip(inputs).zip(scores.iter_mut()) {
            let mut xq = x.clone();
            input.apply(&mut xq, inp);
            let yq = xq.matmul_bt(q, rows, inp, out);
            *s += yq.sq_err_rows(&y, Some(dy), out, Compute::F32).iter().sum::<f64>();
        }
    }
}

/// What the search needs besides the model: calibration rows (amax, AWQ, SmoothQuant) and the
/// indices of the rows the scores are computed on; SmoothQuant's alpha.
pub struct SearchInput<'a> {
    pub samples: &'a [Vec<u32>],
    pub score: &'a [usize],
    pub sq_alpha: f32,
}

/// Runs the search.
///
/// Memory: the backward needs every layer's input on the score rows. Only every `seg`-th
/// (seg = ⌈√layers⌉) is kept from the forward pass; the others are recomputed one segment at
/// a time during the backward (gradient checkpointing: one more forward of the score rows, and
/// 2√layers instead of `layers` saved inputs, e.g. 18 instead of 80 for a 70B Llama).
pub fn search(
    model: &Model,
    input: &SearchInput,
    formats: &[QFormat],
    budget: f64,
    exclusions: &Exclusions,
    progress: &Progress,
) -> Result<Search> {
    let start = std::time::Instant::now();
    let (samples, score) = (input.samples, input.score);
    let cfg = &model.config;
    let dtype = model.dtype()?;
    let groups = groups(model, exclusions);
    let lowest = lowest_bits(&groups, formats);
    if !(budget > 0.0 && budget <= 16.0) || budget < lowest - 1e-9 {
        return Err(Error::Usage(format!(
            "--auto-bits {budget} is outside the valid range {lowest:.3} to 16: the lowest reachable effective bits \
             with these formats and exclusions is {lowest:.3}, 16 is all unquantized \
             (excluded modules such as lm_head count 16 bits; `--exclude none` searches them too)"
        )));
    }

    // Forward: every candidate's calibration of every linear (§9.2), the layer inputs of the
    // score rows at the segment starts.
    let n = cfg.num_hidden_layers;
    let seg = (n as f64).sqrt().ceil().max(1.0) as usize;
    let max_len = samples.iter().map(Vec::len).max().unwrap_or(0);
    let rope = cfg.rope_table(max_len);
    let mut hidden: Vec<Tensor> = samples.iter().map(|s| model.embed(s)).collect::<Result<_>>()?;
    let mut checkpoints: Vec<Vec<Tensor>> = Vec::new();
    // inputs[l][module][format], modules as in `ModelConfig::layer_modules(l)`.
    let mut inputs: Vec<Vec<Vec<InputQuant>>> = Vec::with_capacity(n);
    for l in 0..n {
        crate::io::signal::check()?;
        if l % seg == 0 {
            checkpoints.push(score.iter().map(|&i| hidden[i].clone()).collect());
        }
        let layer = model.load_layer(l)?;
        let modules = cfg.layer_modules(l);
        let mut per_module: Vec<Vec<InputQuant>> = vec![vec![InputQuant::default(); formats.len()]; modules.len()];
        for (fi, &f) in formats.iter().enumerate().filter(|(_, f)| has_algorithm(**f)) {
            // The recipe's own calibration; AWQ recipes on a quarter of the calibration steps.
            let rows = if f.awq() { (samples.len() / 4).max(1) } else { samples.len() };
            let fmt: Vec<Option<QFormat>> = modules.iter().map(|m| (!exclusions.is_excluded(&m.path)).then_some(f)).collect();
            let mut h = hidden[..rows].to_vec();
            let smooth = vec![true; modules.len()];
            let (_, linears) =
                calibrate_layer(&layer, &modules, cfg, &rope, &mut h, &samples[..rows], &fmt, &smooth, input.sq_alpha, dtype)?;
            // One result per quantized module, in module order.
            let quantized = per_module.iter_mut().zip(&fmt).filter(|(_, f)| f.is_some());
            for ((iq, _), lin) in quantized.zip(linears) {
                iq[fi] = InputQuant { pre_quant_scale: lin.pqs, act: f.act().map(|a| (a, lin.input_amax)) };
            }
            progress.step(&format!("auto-quantize calibrate {}", f.cli_name()), l + 1, n);
        }
        let mut hooks = Amax::default();
        for (h, ids) in hidden.iter_mut().zip(samples) {
            layer.forward(cfg, &rope, h, ids.len(), &mut hooks);
        }
        // Max calibration: a module's input amax is its first linear's. The experts of an MoE
        // block share one input quantizer per projection (max over their routed tokens,
        // quantize.rs `share_expert_scales`), which is what `Amax` sees through `expert_input`.
        for (fi, &f) in formats.iter().enumerate().filter(|(_, f)| !has_algorithm(**f)) {
            for (iq, m) in per_module.iter_mut().zip(&modules) {
                let amax = if m.expert.is_some() { &hooks.experts } else { &hooks.dense };
                iq[fi].act = f.act().map(|a| (a, amax[m.kinds[0] as usize]));
            }
        }
        inputs.push(per_module);
        progress.step("auto-quantize forward layer", l + 1, n);
    }
    let head = model.load_head()?;
    let head_amax = head.input_amax(&hidden);

    // Backward over the score rows, scoring every linear as its gradient becomes known.
    let nf = formats.len();
    let mut scores: HashMap<String, Vec<f64>> = HashMap::new();
    let head_formats: Vec<QFormat> = formats.iter().copied().filter(|&f| !has_algorithm(f)).collect();
    let head_shape = [cfg.vocab_size, cfg.hidden_size];
    let device = model.device;
    let head_lin = {
        let w = head.lm_head().to_host();
        let wq: Vec<Vec<f32>> = head_formats.iter().map(|&f| candidate_weight(f, &w, head_shape, None, dtype)).collect::<Result<_>>()?;
        Scored::new(Some(head.lm_head()), &w, &wq, 0..head_shape[0], head_shape[1], device)
    };
    let head_inputs: Vec<InputQuant> =
        head_formats.iter().map(|f| InputQuant { pre_quant_scale: None, act: f.act().map(|a| (a, head_amax)) }).collect();
    let mut head_scores = vec![0f64; head_formats.len()];
    let mut dh: Vec<Tensor> = Vec::with_capacity(score.len());
    for &i in score {
        let (_, d) = head_backward(&head, &hidden[i], &samples[i], &mut |x, dz| head_lin.score(&head_inputs, x, dz, &mut head_scores));
        crate::compute::take_device_error()?;
        dh.push(d);
    }
    drop(head_lin);
    let mut lm_head = vec![0f64; nf];
    for (f, s) in head_formats.iter().zip(head_scores) {
        lm_head[formats.iter().position(|x| x == f).expect("a listed format")] = s;
    }
    scores.insert("lm_head".into(), lm_head);
    drop(hidden);

    for a in (0..n).step_by(seg).rev() {
        let b = (a + seg).min(n);
        // The score rows' inputs of layers a..b, recomputed from the checkpoint at a.
        let mut seg_inputs = vec![checkpoints.pop().expect("one checkpoint per segment")];
        for l in a..b - 1 {
            crate::io::signal::check()?;
            let layer = model.load_layer(l)?;
            let mut next = seg_inputs[l - a].clone();
            for (h, &i) in next.iter_mut().zip(score) {
                layer.forward(cfg, &rope, h, samples[i].len(), &mut NoHooks);
            }
            seg_inputs.push(next);
        }
        for l in (a..b).rev() {
            crate::io::signal::check()?;
            let layer = model.load_layer(l)?;
            let x_in = seg_inputs.pop().expect("an input per layer of the segment");
            // Per linear (keyed by expert and kind): its weight and each candidate's, from its
            // module's (a fused module's candidates are made over the stacked rows).
            let modules = cfg.layer_modules(l);
            let mut linears: HashMap<(Option<usize>, usize), (usize, Scored)> = HashMap::new();
            for (k, (m, iqs)) in modules.iter().zip(&inputs[l]).enumerate() {
                let w = layer.module_weight(m);
                let per_format = formats.iter().zip(iqs);
                let inp = m.shape[1];
                // Candidates are made as the checkpoint holds the module, then put in the
                // runtime's row order like the layer's own weights.
                let wq: Vec<Vec<f32>> = per_format
                    .map(|(&f, iq)| candidate_weight(f, &w, m.shape, iq.pre_quant_scale.as_deref(), dtype).map(|q| m.to_runtime_rows(q, inp)))
                    .collect::<Result<_>>()?;
                let w = m.to_runtime_rows(w, inp);
                let mut r0 = 0;
                for &kind in m.kinds {
                    let rows = if m.expert.is_some() { m.shape[0] } else { kind.shape(cfg)[0] };
                    // A linear of its own is the layer's tensor; a fused module's, its rows.
                    let own = match (m.expert, layer.moe()) {
                        (Some(e), Some(block)) => Some(block.weight(e, kind)),
                        _ => (m.kinds.len() == 1).then(|| layer.weight(kind)),
                    };
                    linears.insert((m.expert, kind as usize), (k, Scored::new(own, &w, &wq, r0..r0 + rows, inp, device)));
                    r0 += rows;
                }
            }
            let grad = LayerGrad::new(&layer, cfg, &rope);
            for (j, &i) in score.iter().enumerate() {
                let d = grad.backward(&x_in[j], samples[i].len(), &dh[j], &mut |kind, expert, x, dy| {
                    // A fused module's output is its linears' outputs stacked: Σ (g ⊙ Δ)² over it
                    // is the sum over its linears.
                    let (k, lin) = linears.get(&(expert, kind as usize)).expect("every linear of a layer is in a module");
                    lin.score(&inputs[l][*k], x, dy, scores.entry(modules[*k].path.clone()).or_insert_with(|| vec![0.0; nf]));
                });
                crate::compute::take_device_error()?;
                dh[j] = d;
            }
            progress.step("auto-quantize backward layer", n - l, n);
        }
    }

    // Group scores (offered formats only), non-increasing from the most to the least
    // compressed (§9.3).
    let offers: Vec<Vec<usize>> = groups.iter().map(|g| offered(g, formats)).collect();
    let group_scores: Vec<Vec<Option<f64>>> = groups
        .iter()
        .zip(&offers)
        .map(|(g, offer)| {
            let mut s = vec![0f64; nf];
            // A module without a score (an expert no score token was routed to) adds 0.
            for v in g.members.iter().filter_map(|m| scores.get(m)) {
                for (acc, v) in s.iter_mut().zip(v) {
                    *acc += v;
                }
            }
            let mut order = offer.clone();
            order.sort_by(|&a, &b| format_bits(formats[a]).total_cmp(&format_bits(formats[b])));
            for w in order.windows(2) {
                s[w[1]] = s[w[1]].min(s[w[0]]);
            }
            (0..nf).map(|i| (g.name != "lm_head" || offer.contains(&i)).then_some(s[i])).collect()
        })
        .collect();

    // Costs in units of (params · quarter-bits) / gcd, options: the offered formats then 16-bit.
    let quarter = |bits: f64| (bits * 4.0).round() as u64;
    let raw: Vec<Vec<u64>> = groups
        .iter()
        .zip(&offers)
        .map(|(g, offer)| {
            let mut c: Vec<u64> = offer.iter().map(|&f| g.params as u64 * quarter(format_bits(formats[f]))).collect();
            c.push(g.params as u64 * quarter(16.0));
            c
        })
        .collect();
    let unit = raw.iter().flatten().fold(0u64, |a, &b| gcd(a, b)).max(1);
    let costs: Vec<Vec<u64>> = raw.iter().map(|c| c.iter().map(|x| x / unit).collect()).collect();
    let total: usize = groups.iter().map(|g| g.params).sum();
    let budget_units = ((budget * 4.0 * total as f64) as u64) / unit;
    let opt_scores: Vec<Vec<f64>> = group_scores
        .iter()
        .zip(&offers)
        .map(|(s, offer)| offer.iter().map(|&f| s[f].expect("offered formats are scored")).chain([0.0]).collect())
        .collect();
    let picks = select(&costs, &opt_scores, budget_units)
        .ok_or_else(|| Error::Usage(format!("--auto-bits {budget}: no assignment fits the budget")))?;
    let chosen: Vec<Option<QFormat>> = offers.iter().zip(&picks).map(|(offer, &p)| offer.get(p).map(|&f| formats[f])).collect();
    let bits: f64 = groups.iter().zip(&chosen).map(|(g, c)| g.params as f64 * c.map_or(16.0, format_bits)).sum();
    Ok(Search {
        groups,
        formats: formats.to_vec(),
        scores: group_scores,
        chosen,
        effective_bits: bits / total as f64,
        budget,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force over every assignment of a small random instance.
    #[test]
    fn select_is_exact() {
        let mut s = 0x1234_5678u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..200 {
            let g = 1 + (next() % 5) as usize;
            let costs: Vec<Vec<u64>> = (0..g).map(|_| (0..3).map(|_| 1 + next() % 9).collect()).collect();
            let scores: Vec<Vec<f64>> = (0..g).map(|_| (0..3).map(|_| (next() % 100) as f64).collect()).collect();
            let budget = next() % 30;
            let mut best: Option<(f64, u64)> = None;
            for code in 0..3usize.pow(g as u32) {
                let pick: Vec<usize> = (0..g).map(|i| code / 3usize.pow(i as u32) % 3).collect();
                let cost: u64 = pick.iter().enumerate().map(|(i, &o)| costs[i][o]).sum();
                let score: f64 = pick.iter().enumerate().map(|(i, &o)| scores[i][o]).sum();
                if cost <= budget && best.is_none_or(|(bs, bc)| score < bs || (score == bs && cost < bc)) {
                    best = Some((score, cost));
                }
            }
            let got = select(&costs, &scores, budget);
            match (best, got) {
                (None, None) => {}
                (Some((bs, bc)), Some(p)) => {
                    let cost: u64 = p.iter().enumerate().map(|(i, &o)| costs[i][o]).sum();
                    let score: f64 = p.iter().enumerate().map(|(i, &o)| scores[i][o]).sum();
                    assert_eq!((score, cost), (bs, bc));
                }
                (b, g) => panic!("brute force {b:?}, select {g:?}"),
            }
        }
    }
}
