//! The peak memory of a quantize run, estimated from the shapes before any work: what
//! `quantize --dry-run` prints, and what a `--device cuda` run checks against the GPU's free
//! memory before it starts (a run that cannot fit stops with this estimate, not with an
//! allocation failure in layer 20).
//!
//! The estimate follows what the driver holds (`quantize::run`, `calibrate_layer`,
//! `autoquant::search`): every tensor is f32; one decoder layer's weights at a time and the next
//! one read ahead; the hidden states of every calibration row between layers; one row's
//! temporaries at a time (the MLP's gate and up, or the attention's q, k, v and output); with
//! AWQ, the layer's weights again plus
//! 11 candidates for the search and one row's copy for the statistics pass; with auto-quantize,
//! a calibration copy of the hidden states and the score rows' segment checkpoints, then the
//! score's backward (its own phase): a layer, its transpose and its candidates, the score rows'
//! gradients and layer inputs, one row's backward temporaries, and the head with its
//! candidates and a block of logits. Evaluation
//! after the export holds two layers, one window's hidden state and the head with one window's
//! logits. On the host a device run holds one layer's f32 weights as it uploads them, the
//! export's pending shard and the one being written; the checkpoint's shards are mapped files
//! (their pages are the page cache's, not counted).

use crate::compute::Device;
use crate::error::Result;
use crate::model::Model;

/// What a run will do, for the estimate.
pub struct Plan {
    /// Calibration rows and the longest row's tokens.
    pub rows: usize,
    pub seq: usize,
    /// Some format runs AWQ-lite's search.
    pub awq: bool,
    /// Auto-quantize with this many score rows and candidate formats.
    pub auto_quantize: Option<(usize, usize)>,
    /// Evaluation after the export, windows of this many tokens.
    pub eval_seq: Option<usize>,
    pub device: Device,
    /// The export writer's shard size.
    pub shard_bytes: usize,
}

/// When an item is live.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Calibration,
    /// Auto-quantize's gradient score.
    Score,
    Evaluation,
}

/// One line of the estimate: phase, what, bytes.
pub type Item = (Phase, String, u64);

/// Peak memory, per place: items of the device (empty for a CPU run) and of the host.
pub struct Estimate {
    pub device: Vec<Item>,
    pub host: Vec<Item>,
}

/// The most a phase holds at once: the largest of the phases' sums.
pub fn peak(items: &[Item]) -> u64 {
    let sum = |p: Phase| items.iter().filter(|i| i.0 == p).map(|i| i.2).sum::<u64>();
    [Phase::Calibration, Phase::Score, Phase::Evaluation].map(sum).into_iter().max().unwrap_or(0)
}

/// `bytes` in GiB with two decimals, or in MiB below 1 GiB.
pub fn gib(bytes: u64) -> String {
    if bytes < 1 << 30 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    }
}

impl Estimate {
    /// A table of both places, each item and each place's peak.
    pub fn table(&self) -> String {
        let mut s = String::new();
        for (place, items) in [("device", &self.device), ("host", &self.host)] {
            if items.is_empty() {
                continue;
            }
            s += &format!("{place} memory (estimate, f32 tensors):\n");
            for (phase, what, bytes) in items.iter() {
                let phase = match phase {
                    Phase::Calibration => "calibration",
                    Phase::Score => "score",
                    Phase::Evaluation => "evaluation",
                };
                s += &format!("  {:>10}  {phase:<11}  {what}\n", gib(*bytes));
            }
            s += &format!("  {:>10}  peak {place} memory (the largest phase)\n", gib(peak(items)));
        }
        s
    }
}

const F32: u64 = 4;

/// The estimate for `model` run as `plan` says.
pub fn estimate(model: &Model, plan: &Plan) -> Result<Estimate> {
    let cfg = &model.config;
    let (rows, seq) = (plan.rows as u64, plan.seq as u64);
    let hidden = cfg.hidden_size as u64;
    // The largest layer: its linear parameters and its widest input and output.
    let (mut params, mut widest_in, mut widest_out) = (0u64, 0u64, 0u64);
    for l in 0..cfg.num_hidden_layers {
        let modules = cfg.layer_modules(l);
        params = params.max(modules.iter().map(|m| (m.shape[0] * m.shape[1]) as u64).sum());
        widest_in = widest_in.max(modules.iter().map(|m| m.shape[1] as u64).max().unwrap_or(0));
        widest_out = widest_out.max(modules.iter().map(|m| m.shape[0] as u64).max().unwrap_or(0));
    }
    let intermediate = cfg.intermediate_size.max(cfg.moe.as_ref().map_or(0, |m| m.intermediate_size)) as u64;
    let q_dim = (cfg.num_attention_heads * cfg.head_dim) as u64;
    let kv_dim = (cfg.num_key_value_heads * cfg.head_dim) as u64;
    let per_row = (seq * (hidden + 2 * intermediate)).max(seq * (2 * q_dim + 2 * kv_dim)) * F32;

    use Phase::*;
    let mut work: Vec<Item> = vec![
        (Calibration, "one decoder layer's weights".into(), params * F32),
        (Calibration, "the next layer's weights, read ahead (`Model::each_layer`)".into(), params * F32),
        (Calibration, format!("hidden states of {rows} calibration rows x {seq} tokens"), rows * seq * hidden * F32),
        (Calibration, "one row's temporaries (MLP gate + up, or attention q, k, v, out)".into(), per_row),
    ];
    if plan.awq {
        work.push((Calibration, "AWQ search: the layer's weights again and 11 candidates".into(), 12 * params * F32));
        let temps = seq * (hidden + widest_in + 2 * widest_out) * F32;
        work.push((Calibration, "AWQ: one row's input copy and a candidate's products".into(), temps));
    }
    if let Some((score, formats)) = plan.auto_quantize {
        let (score, formats) = (score as u64, formats as u64);
        let n = cfg.num_hidden_layers as u64;
        let seg = ((n as f64).sqrt().ceil() as u64).max(1);
        let segments = n.div_ceil(seg);
        let checkpoints = score * seq * hidden * F32 * segments;
        work.push((Calibration, "auto-quantize: a candidate's calibration copy of the hidden states".into(), rows * seq * hidden * F32));
        work.push((Calibration, format!("auto-quantize: {score} score rows at {segments} segment starts"), checkpoints));
        // The score (autoquant::search, ptq/backward.rs).
        let vocab = cfg.vocab_size as u64;
        let states = score * seq * hidden * F32 * (seg + 1);
        let attention_block = 6 * 128 * seq * F32; // P, dS, their transposes and products (ATTENTION_ROWS = 128)
        let temps = seq * (8 * hidden + 6 * intermediate + 3 * q_dim + 4 * kv_dim) * F32 + attention_block;
        let logits = (64u64 << 20).min(512 * vocab * F32) + (64u64 << 20).min(vocab * hidden * F32);
        work.extend([
            (Score, format!("auto-quantize score: a layer, its transpose and {formats} candidates"), (2 + formats) * params * F32),
            (Score, "auto-quantize score: the segment checkpoints".into(), checkpoints),
            (Score, format!("auto-quantize score: {score} rows' gradients and the segment's layer inputs"), states),
            (Score, "auto-quantize score: one row's backward temporaries".into(), temps),
            (Score, format!("auto-quantize score: the head, {formats} candidates, a block of logits"), (1 + formats) * vocab * hidden * F32 + logits),
        ]);
    }
    if let Some(eval_seq) = plan.eval_seq {
        let e = eval_seq as u64;
        let vocab = cfg.vocab_size as u64;
        work.push((Evaluation, "one decoder layer's weights and the next, read ahead".into(), 2 * params * F32));
        work.push((Evaluation, format!("the head ({vocab} x {hidden}) and one window's logits"), (vocab * hidden + e * vocab) * F32));
        work.push((Evaluation, "one window's hidden state and temporaries".into(), per_row.max(e * hidden * F32 * 2)));
    }
    let input_bytes: u64 = model.weight_names().iter().map(|n| model.tensor(n).map(|t| t.data.len() as u64)).sum::<Result<u64>>()?;
    let shards = "the export's pending shard and the one being written".to_string();
    let pending = (Calibration, shards, input_bytes.min(2 * plan.shard_bytes as u64));
    Ok(match plan.device {
        Device::Cpu => {
            work.push(pending);
            Estimate { device: Vec::new(), host: work }
        }
        Device::Cuda => {
            let host = vec![(Calibration, "one decoder layer's weights as they are uploaded".into(), params * F32), pending];
            Estimate { device: work, host }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_the_larger_phase() {
        let items: Vec<Item> = vec![
            (Phase::Calibration, "a".into(), 5),
            (Phase::Calibration, "b".into(), 7),
            (Phase::Evaluation, "c".into(), 11),
        ];
        assert_eq!(peak(&items), 12);
        assert_eq!(peak(&[]), 0);
        assert_eq!(gib(3 << 29), "1.50 GiB");
        assert_eq!(gib(3 << 19), "1.5 MiB");
    }
}
