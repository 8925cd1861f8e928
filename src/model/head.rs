//! The final norm and the language-model head: logits and the negative log-likelihood of a
//! sequence, a block of positions at a time.

use crate::compute::{Compute, Tensor};
use crate::model::config::ModelConfig;
use crate::model::weights::InputQuant;

/// Memory for one block of logits in [`Head::nll`]. Blocks are as tall as this allows (up to
/// `NLL_MAX_ROWS`): every block packs all of lm_head again, so tall blocks amortize that.
const NLL_BLOCK_BYTES: usize = 64 << 20;
const NLL_MAX_ROWS: usize = 512;

/// The final norm and the language-model head.
pub struct Head {
    /// For the kind of norm.
    pub(crate) cfg: ModelConfig,
    pub(crate) norm: Tensor, // [hidden]
    /// LayerNorm bias (`cfg.layer_norm`), `[hidden]`.
    pub(crate) norm_bias: Option<Tensor>,
    pub(crate) lm_head: Tensor, // [vocab, hidden]
    /// `lm_head.bias` (PhiMoE), `[vocab]`.
    pub(crate) lm_head_bias: Option<Tensor>,
    pub(crate) compute: Compute,
    /// What happens to lm_head's input (quantized lm_head of a mixed-precision checkpoint).
    pub(crate) input: InputQuant,
}

impl Head {
    fn hidden_size(&self) -> usize {
        self.norm.len()
    }

    /// The output projection `[vocab, hidden]` (dequantized when stored quantized).
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// The final norm's weight, `[hidden]`.
    pub fn norm_weight(&self) -> &Tensor {
        &self.norm
    }

    /// lm_head's bias (PhiMoE), `[vocab]`.
    pub fn lm_head_bias(&self) -> Option<&Tensor> {
        self.lm_head_bias.as_ref()
    }

    /// The final norm's bias (LayerNorm families), `[hidden]`.
    pub fn norm_bias(&self) -> Option<&Tensor> {
        self.norm_bias.as_ref()
    }

    /// The config the head was loaded with (for the kind of norm).
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn vocab_size(&self) -> usize {
        self.lm_head.len() / self.norm.len()
    }

    /// The final-norm output (HF `hidden_states[num_layers]`): `[seq, hidden]`.
    pub fn normed(&self, hidden: &Tensor, seq: usize) -> Tensor {
        assert_eq!(hidden.len(), seq * self.hidden_size(), "Head: hidden is not [seq, hidden_size]");
        crate::model::layer::norm(&self.cfg, self.compute, self.cfg.norm_kind(), hidden, &self.norm, self.norm_bias.as_ref())
    }

    /// Max |x| of lm_head's input (the final-norm output) over `hidden` states (each
    /// `[seq, hidden]`): its max calibration (spec/algorithms.md §3.1).
    pub fn input_amax(&self, hidden: &[Tensor]) -> f32 {
        hidden.iter().fold(0f32, |m, h| self.normed(h, h.len() / self.hidden_size()).amax(m))
    }

    /// `lm_head(norm(hidden))`: `[seq, vocab]`.
    pub fn logits(&self, hidden: &Tensor, seq: usize) -> Tensor {
        let mut normed = self.normed(hidden, seq);
        let h = self.hidden_size();
        self.input.apply(&mut normed, h);
        let mut logits = normed.matmul_bt(&self.lm_head, seq, h, self.vocab_size());
        if let Some(b) = &self.lm_head_bias {
            logits.add_row_bias(b);
        }
        logits.round(self.compute);
        if self.cfg.logits_scaling.is_some() || self.cfg.final_softcap.is_some() {
            logits.finish_logits(self.compute, self.cfg.logits_scaling, self.cfg.final_softcap);
        }
        logits
    }

    /// Sum of `-log p(ids[t+1] | ids[..=t])` over t in `0..seq-1`, and the number of terms.
    /// Logits are computed a block of positions at a time (64 MiB at most). Panics if an id is
    /// outside the vocabulary (`Model::embed` has rejected those already).
    pub fn nll(&self, hidden: &Tensor, ids: &[u32]) -> (f64, usize) {
        let (h, vocab) = (self.hidden_size(), self.vocab_size());
        let seq = ids.len();
        assert_eq!(hidden.len(), seq * h, "Head::nll: hidden is not [ids.len(), hidden_size]");
        let scored = seq.saturating_sub(1);
        let mut sum = 0f64;
        let block = (NLL_BLOCK_BYTES / (4 * vocab)).clamp(1, NLL_MAX_ROWS);
        for t0 in (0..scored).step_by(block) {
            let rows = block.min(scored - t0);
            let logits = self.logits(&hidden.rows(t0..t0 + rows, h), rows);
            sum += logits.log_softmax_nll(vocab, &ids[t0 + 1..t0 + rows + 1]).iter().sum::<f64>();
        }
        (sum, scored)
    }
}
