//! Quantization formats, which modules they apply to, and the per-format math.
//!
//! A "module" is a linear layer's HF name, e.g. `model.layers.0.self_attn.q_proj`; ModelOpt
//! decides whether to quantize it by fnmatch-ing patterns against its quantizer names
//! (`<module>.weight_quantizer`, `<module>.input_quantizer`), spec/algorithms.md §2.1.

pub mod awq;
pub mod fp8;
pub mod int;
pub mod nvfp4;
pub mod scales;
pub mod smoothquant;

use crate::error::{Error, Result};

/// The formats `--qformat` accepts (ModelOpt hf_ptq `--qformat` spelling), spec/algorithms.md
/// §2.2 and spec/export-formats.md §2.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QFormat {
    /// FP8 E4M3 per-tensor weights and activations (FP8_DEFAULT_CFG).
    Fp8,
    /// INT8 SmoothQuant: per-channel INT8 weights, per-tensor INT8 activations (INT8_SMOOTHQUANT_CFG).
    Int8Sq,
    /// INT4 weights in groups of 128 with AWQ-lite scales, 16-bit activations (INT4_AWQ_CFG).
    Int4Awq,
    /// INT4 AWQ weights and FP8 activations (W4A8_AWQ_BETA_CFG).
    W4a8Awq,
    /// NVFP4: E2M1 values in blocks of 16 with E4M3 block scales, weights and activations (NVFP4_DEFAULT_CFG).
    Nvfp4,
    /// NVFP4 with AWQ-lite scales (NVFP4_AWQ_LITE_CFG).
    Nvfp4Awq,
}

/// How a format stores weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightKind {
    Fp8,
    Int8Rows,
    Int4Groups,
    Nvfp4,
}

/// How a format quantizes activations (the input of each linear).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActKind {
    Fp8,
    Int8,
    Nvfp4,
}

/// INT4 group size of the AWQ formats.
pub const INT4_GROUP: usize = 128;

impl QFormat {
    pub const ALL: [QFormat; 6] =
        [QFormat::Fp8, QFormat::Int8Sq, QFormat::Int4Awq, QFormat::W4a8Awq, QFormat::Nvfp4, QFormat::Nvfp4Awq];

    pub fn parse(s: &str) -> Result<QFormat> {
        QFormat::ALL.into_iter().find(|f| f.cli_name() == s).ok_or_else(|| {
            let known: Vec<&str> = QFormat::ALL.iter().map(|f| f.cli_name()).collect();
            Error::Usage(format!("unknown --qformat '{s}'; supported: {}", known.join(", ")))
        })
    }
    pub fn cli_name(self) -> &'static str {
        match self {
            QFormat::Fp8 => "fp8",
            QFormat::Int8Sq => "int8_sq",
            QFormat::Int4Awq => "int4_awq",
            QFormat::W4a8Awq => "w4a8_awq",
            QFormat::Nvfp4 => "nvfp4",
            QFormat::Nvfp4Awq => "nvfp4_awq",
        }
    }
    /// `quant_algo` in hf_quant_config.json (spec/export-formats.md §2.2).
    pub fn quant_algo(self) -> &'static str {
        match self {
            QFormat::Fp8 => "FP8",
            QFormat::Int8Sq => "W8A8_SQ_PER_CHANNEL",
            QFormat::Int4Awq => "W4A16_AWQ",
            QFormat::W4a8Awq => "W4A8_AWQ",
            QFormat::Nvfp4 => "NVFP4",
            QFormat::Nvfp4Awq => "NVFP4_AWQ",
        }
    }
    pub fn weight(self) -> WeightKind {
        match self {
            QFormat::Fp8 => WeightKind::Fp8,
            QFormat::Int8Sq => WeightKind::Int8Rows,
            QFormat::Int4Awq | QFormat::W4a8Awq => WeightKind::Int4Groups,
            QFormat::Nvfp4 | QFormat::Nvfp4Awq => WeightKind::Nvfp4,
        }
    }
    pub fn act(self) -> Option<ActKind> {
        match self {
            QFormat::Fp8 | QFormat::W4a8Awq => Some(ActKind::Fp8),
            QFormat::Int8Sq => Some(ActKind::Int8),
            QFormat::Int4Awq => None,
            QFormat::Nvfp4 | QFormat::Nvfp4Awq => Some(ActKind::Nvfp4),
        }
    }
    /// awq_lite scale search (spec/algorithms.md §6.1).
    pub fn awq(self) -> bool {
        matches!(self, QFormat::Int4Awq | QFormat::W4a8Awq | QFormat::Nvfp4Awq)
    }
    /// Block/group size written as `group_size` in hf_quant_config.json.
    pub fn group_size(self) -> Option<usize> {
        match self.weight() {
            WeightKind::Int4Groups => Some(INT4_GROUP),
            WeightKind::Nvfp4 => Some(nvfp4::BLOCK),
            _ => None,
        }
    }
}

/// ModelOpt 0.47's default-disabled quantizer patterns
/// (`configs/ptq/units/default_disabled_quantizers.yaml`, spec/algorithms.md §2.1,
/// spec/export-formats.md §2.4). Matched against `<module>.weight_quantizer`.
pub const DEFAULT_DISABLED: &[&str] = &[
    "*lm_head*",
    "*proj_out.*",
    "*block_sparse_moe.gate*",
    "*router*",
    "*mlp.gate.*",
    "*mlp.shared_expert_gate.*",
    "*linear_attn.conv1d*",
    "*linear_attn.in_proj_a*",
    "*linear_attn.in_proj_b*",
    "*mixer.conv1d*",
    "*output_layer*",
    "output.*",
    "mtp.*",
    "*embed_vision*",
    "*vision_tower*",
    "*visual*",
    "*vision_model*",
    "*multi_modal_projector*",
];

/// Which modules stay unquantized: ModelOpt's defaults plus the user's `--exclude` patterns.
#[derive(Clone, Debug)]
pub struct Exclusions {
    patterns: Vec<String>,
}

impl Exclusions {
    /// `user`: patterns from `--exclude` (fnmatch; matched against the module name and its
    /// quantizer names, so both `*layers.0.*` and `model.layers.0.mlp.down_proj` work).
    /// `--exclude none` alone drops the defaults too (auto-quantize then searches lm_head).
    pub fn new(user: &[String]) -> Exclusions {
        if user == ["none"] {
            return Exclusions { patterns: vec![] };
        }
        let mut patterns: Vec<String> = DEFAULT_DISABLED.iter().map(|s| s.to_string()).collect();
        patterns.extend(user.iter().cloned());
        Exclusions { patterns }
    }
    /// These exclusions and `extra` patterns.
    pub fn with(mut self, extra: &[String]) -> Exclusions {
        self.patterns.extend(extra.iter().cloned());
        self
    }

    pub fn is_excluded(&self, module: &str) -> bool {
        let wq = format!("{module}.weight_quantizer");
        self.patterns.iter().any(|p| fnmatch(p, module) || fnmatch(p, &wq))
    }
}

/// Shell-style pattern match as Python's `fnmatch.fnmatchcase`: `*`, `?`, `[seq]`, `[!seq]`.
pub fn fnmatch(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matcher with backtracking to the last '*'.
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = match_class(&p, pi, n[ni]) {
                        if matched {
                            pi = next;
                            ni += 1;
                            continue;
                        }
                    } else if n[ni] == '[' {
                        // An unclosed '[' is a literal, as in Python.
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                }
                c if c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// `[...]` at `p[start]`: Some((does c match, index after ']')), None if unclosed.
fn match_class(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = p.get(i) == Some(&'!');
    if negate {
        i += 1;
    }
    let first = i;
    let mut matched = false;
    while i < p.len() && (p[i] != ']' || i == first) {
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            matched |= p[i] <= c && c <= p[i + 2];
            i += 3;
        } else {
            matched |= p[i] == c;
            i += 1;
        }
    }
    (i < p.len()).then_some((matched != negate, i + 1))
}

/// `exclude_modules` of hf_quant_config.json: ModelOpt's
/// `_prefix_wildcard_summarize_exclude_modules` (spec/export-formats.md §2.4). For each
/// unquantized name, at each '.' boundary from the left, try `prefix*`, then the pair
/// {`prefix`, `prefix.*`} (emitted as `prefix.*`), and finally the exact name; a candidate
/// is rejected if it matches any quantized module name. Sorted, deduplicated.
pub fn summarize_excludes(unquantized: &[String], quantized: &[String]) -> Vec<String> {
    let hits = |pat: &str| quantized.iter().any(|q| fnmatch(pat, q));
    let mut out: Vec<String> = unquantized
        .iter()
        .map(|name| {
            for (pos, _) in name.match_indices('.') {
                let prefix = &name[..pos];
                let wild = format!("{prefix}*");
                if !hits(&wild) {
                    return wild;
                }
                let dotted = format!("{prefix}.*");
                if !hits(prefix) && !hits(&dotted) {
                    return dotted;
                }
            }
            name.clone()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnmatch_like_python() {
        assert!(fnmatch("*lm_head*", "lm_head.weight_quantizer"));
        assert!(fnmatch("*mlp.gate.*", "model.layers.0.mlp.gate.weight_quantizer"));
        assert!(!fnmatch("*mlp.gate.*", "model.layers.0.mlp.gate_proj.weight_quantizer"));
        assert!(fnmatch("output.*", "output.weight_quantizer"));
        assert!(!fnmatch("output.*", "model.output.weight_quantizer"));
        assert!(fnmatch("*[kv]_bmm_quantizer", "self_attn.k_bmm_quantizer"));
        assert!(!fnmatch("*[!kv]_bmm_quantizer", "self_attn.k_bmm_quantizer"));
        assert!(fnmatch("a?c", "abc") && !fnmatch("a?c", "ac"));
        assert!(fnmatch("[a", "[a"));
        assert!(fnmatch("*", ""));
    }

    #[test]
    fn exclude_summary_matches_modelopt_shapes() {
        let q: Vec<String> = (0..12)
            .flat_map(|l| ["self_attn.q_proj", "mlp.down_proj"].map(|m| format!("model.layers.{l}.{m}")))
            .filter(|n| !n.starts_with("model.layers.1."))
            .collect();
        let unq = vec![
            "lm_head".to_string(),
            "model.embed_tokens".to_string(),
            "model.layers.1.self_attn.q_proj".to_string(),
            "model.layers.1.mlp.down_proj".to_string(),
        ];
        // "model.layers.1*" would also match layers 10 and 11, so the pair form is used.
        assert_eq!(summarize_excludes(&unq, &q), ["lm_head", "model.embed_tokens", "model.layers.1.*"]);
    }
}
