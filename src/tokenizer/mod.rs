//! A tokenizer read from a Hugging Face `tokenizer.json` (and the `tokenizer_config.json` next to
//! it) that gives the ids of HF `tokenizers`, as `AutoTokenizer(dir)(text)["input_ids"]` does.
//!
//! The steps are those of HF's `Tokenizer::encode` (tokenizers/src/tokenizer/mod.rs):
//! 1. added tokens that are not `normalized` (the special ones: `<s>`, `<|endoftext|>`) are cut
//!    out of the raw text, leftmost-longest (tokenizer/added_vocabulary.rs);
//! 2. each remaining piece is normalized, then the `normalized` added tokens are cut out of it;
//! 3. the pre-tokenizer cuts each piece into words;
//! 4. the BPE model turns each word into ids (`bpe`);
//! 5. the post-processor puts BOS / EOS around them (processors/template.rs), unless
//!    tokenizer_config.json says `add_bos_token` / `add_eos_token` (see `special_ids`).
//!
//! Supported: model `BPE` (SentencePiece style with byte fallback as Llama-2 uses it, and GPT-2
//! byte-level as GPT-2 / Llama-3 / Qwen2 use it); normalizers `Sequence`, `NFC` (`nfc`),
//! `Prepend`, `Replace`; pre-tokenizers `Metaspace`, `ByteLevel`, `Split` (the GPT-2 / Llama-3 /
//! Qwen2 regexes, see `pattern`), `Sequence`; post-processors `TemplateProcessing`, `ByteLevel`,
//! `Sequence`; decoders `Replace`, `ByteFallback`, `Fuse`, `Strip`, `ByteLevel`, `Metaspace`,
//! `Sequence`.
//! Anything else is refused when the file is read, with an error that names it.
//!
//! When tokenizer_config.json names `LlamaTokenizer`, transformers 5 keeps only the vocab and
//! merges of the tokenizer.json and sets the rest itself; so does rq-min (`LlamaRebuild`).

mod bpe;
mod nfc;
mod nfc_tables;
mod pattern;

use crate::error::{Error, Result};
use crate::io::json::Json;
use bpe::Bpe;
use pattern::SplitPattern;
/// The pre-tokenizer regexes rq-min recognises, by their exact text in a tokenizer.json.
pub use pattern::{GPT2_REGEX, LLAMA3_REGEX, QWEN2_REGEX};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::Path;

pub struct Tokenizer {
    model: Bpe,
    /// Id -> token, added tokens included (for decoding).
    tokens: HashMap<u32, String>,
    /// Ids of the added tokens marked `special`; decoding skips them.
    special: HashSet<u32>,
    added_raw: AddedMatcher,
    added_normalized: AddedMatcher,
    normalizers: Vec<Normalizer>,
    pre_tokenizers: Vec<PreTokenizer>,
    /// Ids the post-processor puts before and after the text's ids.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// None: the tokenizer.json has no decoder (HF then joins the tokens with spaces).
    decoders: Option<Vec<Decoder>>,
    bos: Option<u32>,
    eos: Option<u32>,
    vocab_size: usize,
}

impl Tokenizer {
    /// Reads dir/tokenizer.json and, if present, dir/tokenizer_config.json.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let config = dir.join("tokenizer_config.json");
        let config = config.is_file().then_some(config);
        Tokenizer::from_file(&dir.join("tokenizer.json"), config.as_deref())
    }

    pub fn from_file(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Tokenizer> {
        let json = Json::parse_file(tokenizer_json)?;
        let config = match tokenizer_config {
            Some(path) => Some((path, Json::parse_file(path)?)),
            None => None,
        };
        Tokenizer::from_json(&json, tokenizer_json, config.as_ref().map(|(p, c)| (*p, c)))
    }

    /// A tokenizer from an already parsed tokenizer.json (`json`, read from `tokenizer_json`,
    /// which names errors) and tokenizer_config.json (with its path), without touching disk.
    pub fn from_json(json: &Json, tokenizer_json: &Path, config: Option<(&Path, &Json)>) -> Result<Tokenizer> {
        let file = File {
            path: tokenizer_json,
        };
        let llama = match &config {
            Some((path, c)) => LlamaRebuild::read(path, c)?,
            None => None,
        };
        let model = file.model(field(&json, "model"), llama.is_some())?;

        // transformers 5 ignores the file's normalizer, pre-tokenizer and decoder for the
        // Llama classes (see `LlamaRebuild`), so they are not used then; a file the
        // `tokenizers` library itself would refuse to load is still refused.
        let (normalizers, pre_tokenizers, decoders) = match &llama {
            Some(llama) => {
                file.check_steps(field(&json, "normalizer"), "normalizer", NORMALIZER_TYPES)?;
                file.check_steps(field(&json, "pre_tokenizer"), "pre_tokenizer", PRE_TOKENIZER_TYPES)?;
                (Vec::new(), llama.pre_tokenizers(), Some(llama.decoders()))
            }
            None => (
                match field(&json, "normalizer") {
                    Json::Null => Vec::new(),
                    n => file.normalizers(n)?,
                },
                match field(&json, "pre_tokenizer") {
                    Json::Null => Vec::new(),
                    p => file.pre_tokenizers(p)?,
                },
                match field(&json, "decoder") {
                    Json::Null => None,
                    d => Some(file.decoders(d)?),
                },
            ),
        };

        let mut added = file.added_tokens(field(&json, "added_tokens"), &model.vocab)?;
        let config_tokens = match &config {
            Some((path, c)) => ConfigTokens::read(path, c)?,
            None => ConfigTokens::default(),
        };
        // transformers 5 (`TokenizersBackend._post_init`) adds the special tokens named in
        // tokenizer_config.json as special added tokens when the tokenizer.json does not list
        // them; rq-min does so for those the vocabulary has.
        for content in config_tokens.named() {
            if let Some(&id) = model.vocab.get(content) {
                if !added.iter().any(|t| t.content == *content) {
                    added.push(AddedToken::special(content, id));
                }
            }
        }

        let mut tokens: HashMap<u32, String> =
            model.vocab.iter().map(|(t, &id)| (id, t.clone())).collect();
        let mut all_contents: HashSet<&str> = model.vocab.keys().map(String::as_str).collect();
        all_contents.extend(added.iter().map(|t| t.content.as_str()));
        let vocab_size = all_contents.len();
        let special = added.iter().filter(|t| t.special).map(|t| t.id).collect();
        for t in &added {
            tokens.insert(t.id, t.content.clone());
        }
        let token_id = |content: &str| {
            added
                .iter()
                .find(|t| t.content == content)
                .map(|t| t.id)
                .or(model.vocab.get(content).copied())
        };
        let bos = config_tokens.bos.as_deref().and_then(token_id);
        let eos = config_tokens.eos.as_deref().and_then(token_id);

        let (prefix, suffix) = match field(&json, "post_processor") {
            Json::Null => special_ids(&config_tokens, None, bos, eos),
            p => special_ids(&config_tokens, Some(file.post_processor(p)?), bos, eos),
        };
        let bos = bos.or(prefix.first().copied());
        let eos = eos.or(suffix.last().copied());

        let normalize_all = |s: &str| normalize(&normalizers, s);
        let added_raw =
            AddedMatcher::new(added.iter().filter(|t| !t.normalized).cloned().collect());
        let added_normalized = AddedMatcher::new(
            added
                .iter()
                .filter(|t| t.normalized)
                .map(|t| AddedToken {
                    content: normalize_all(&t.content),
                    ..t.clone()
                })
                .collect(),
        );
        Ok(Tokenizer {
            model,
            tokens,
            special,
            added_raw,
            added_normalized,
            normalizers,
            pre_tokenizers,
            prefix,
            suffix,
            decoders,
            bos,
            eos,
            vocab_size,
        })
    }

    /// Ids as HF gives them for a single sequence, including BOS (etc.) per the post_processor /
    /// add_bos_token.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = self.prefix.clone();
        for (added, range) in self.added_raw.split(text) {
            if let Some(id) = added {
                ids.push(id);
                continue;
            }
            let normalized = normalize(&self.normalizers, &text[range.clone()]);
            for (added, inner) in self.added_normalized.split(&normalized) {
                match added {
                    Some(id) => ids.push(id),
                    None => {
                        // Metaspace's prepend_scheme "first" looks at whether the piece begins
                        // the original text.
                        let first = range.start == 0 && inner.start == 0;
                        for word in self.pre_tokenize(&normalized[inner], first) {
                            self.model.tokenize(&word, &mut ids);
                        }
                    }
                }
            }
        }
        ids.extend_from_slice(&self.suffix);
        ids
    }

    /// The text of `ids`, as HF's `decode(ids, skip_special_tokens=True)` gives it: special
    /// tokens (BOS, EOS, ...) and unknown ids are left out, the rest goes through the decoder.
    pub fn decode(&self, ids: &[u32]) -> String {
        let tokens: Vec<String> = ids
            .iter()
            .filter(|id| !self.special.contains(id))
            .filter_map(|id| self.tokens.get(id).cloned())
            .collect();
        match &self.decoders {
            None => tokens.join(" "),
            Some(decoders) => decoders
                .iter()
                .fold(tokens, |tokens, d| d.decode(tokens))
                .concat(),
        }
    }

    /// Number of distinct tokens, added tokens included (HF's `get_vocab_size(true)`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// tokenizer_config.json's `bos_token`, else the first token the post-processor puts first.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// tokenizer_config.json's `eos_token`, else the last token the post-processor puts last.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Runs the pre-tokenizers in order, each on every piece the previous one made.
    fn pre_tokenize(&self, text: &str, first: bool) -> Vec<String> {
        let mut pieces = vec![(text.to_string(), first)];
        for p in &self.pre_tokenizers {
            let mut next = Vec::with_capacity(pieces.len());
            for (piece, first) in &pieces {
                p.apply(piece, *first, &mut next);
            }
            pieces = next;
        }
        pieces.into_iter().map(|(piece, _)| piece).collect()
    }
}

/// The post-processor's ids, or the rule of transformers 5 (`TokenizersBackend.__init__` and
/// `update_post_processor`): when tokenizer_config.json has `add_bos_token` or `add_eos_token`,
/// or the tokenizer.json has no post-processor, the template becomes `[bos] $A [eos]`, each part
/// present only if its flag is true (a missing flag counts as false) and its token is known.
/// (transformers 4's LlamaTokenizerFast instead always rebuilt it, defaulting `add_bos_token`
/// to true; the reference ids come from transformers 5.)
fn special_ids(
    config: &ConfigTokens,
    post_processor: Option<(Vec<u32>, Vec<u32>)>,
    bos: Option<u32>,
    eos: Option<u32>,
) -> (Vec<u32>, Vec<u32>) {
    if let Some(ids) = post_processor {
        if config.add_bos.is_none() && config.add_eos.is_none() {
            return ids;
        }
    }
    let bos = bos.filter(|_| config.add_bos == Some(true));
    let eos = eos.filter(|_| config.add_eos == Some(true));
    (bos.into_iter().collect(), eos.into_iter().collect())
}

/// `key` of an object, `Null` when missing (HF's optional fields).
fn field<'a>(json: &'a Json, key: &str) -> &'a Json {
    const NULL: &Json = &Json::Null;
    json.get(key).unwrap_or(NULL)
}

fn type_of(json: &Json) -> &str {
    field(json, "type").as_str().unwrap_or("")
}

/// What tokenizer_config.json says about special tokens.
#[derive(Default)]
struct ConfigTokens {
    /// `Some` when the key is present (`null` reads as false, as in Python).
    add_bos: Option<bool>,
    add_eos: Option<bool>,
    bos: Option<String>,
    eos: Option<String>,
    unk: Option<String>,
    pad: Option<String>,
}

/// A flag of tokenizer_config.json: `Some` when the key is present, `null` reading as false (as
/// Python's truth value of None).
fn config_flag(path: &Path, c: &Json, key: &str) -> Result<Option<bool>> {
    match c.get(key) {
        None => Ok(None),
        Some(Json::Null) => Ok(Some(false)),
        Some(Json::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(Error::config(
            path,
            format!("`{key}` is not true, false or null"),
        )),
    }
}

impl ConfigTokens {
    fn read(path: &Path, c: &Json) -> Result<ConfigTokens> {
        let flag = |key: &str| config_flag(path, c, key);
        // A token is written as a string or as an AddedToken object with a "content".
        let token = |key: &str| match c.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Str(s)) => Ok(Some(s.clone())),
            Some(t) => match t.get("content").and_then(Json::as_str) {
                Some(s) => Ok(Some(s.to_string())),
                None => Err(Error::config(
                    path,
                    format!("`{key}` is neither a string nor a token"),
                )),
            },
        };
        Ok(ConfigTokens {
            add_bos: flag("add_bos_token")?,
            add_eos: flag("add_eos_token")?,
            bos: token("bos_token")?,
            eos: token("eos_token")?,
            unk: token("unk_token")?,
            pad: token("pad_token")?,
        })
    }

    fn named(&self) -> impl Iterator<Item = &String> {
        [&self.bos, &self.eos, &self.unk, &self.pad]
            .into_iter()
            .flatten()
    }
}

/// The tokenizer transformers 5 builds when tokenizer_config.json's `tokenizer_class` is
/// `LlamaTokenizer` or `LlamaTokenizerFast` (an alias of it): transformers 5.x,
/// src/transformers/models/llama/tokenization_llama.py, `class LlamaTokenizer(TokenizersBackend)`,
/// `__init__`. `TokenizersBackend.convert_to_native_format` hands it only the vocab and merges of
/// tokenizer.json (and its post-processor, kept as usual, see `special_ids`), and it builds
/// - the model `BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None)`, without an
///   unknown token (see `File::model`);
/// - no normalizer;
/// - the pre-tokenizer `Metaspace(replacement="▁", prepend_scheme, split=False)`, where
///   `_get_prepend_scheme(add_prefix_space, self)` gives "never" when `add_prefix_space` is false
///   (None counts as true), else "always" when `legacy` is true and "first" otherwise (its
///   default is False);
/// - the decoder `Replace("▁", " "), ByteFallback, Fuse`, then `Strip(" ", left=1)` when
///   `add_prefix_space`.
///
/// So a Llama-2 tokenizer.json with the older normalizer (Prepend "▁" + Replace " " → "▁") and one
/// with a Metaspace pre-tokenizer give the same ids.
struct LlamaRebuild {
    prepend: Prepend,
    add_prefix_space: bool,
}

impl LlamaRebuild {
    /// None when the config names another tokenizer class (or none): the tokenizer.json is then
    /// followed as written.
    fn read(path: &Path, c: &Json) -> Result<Option<LlamaRebuild>> {
        match c.get("tokenizer_class").and_then(Json::as_str) {
            Some("LlamaTokenizer" | "LlamaTokenizerFast") => {}
            _ => return Ok(None),
        }
        let add_prefix_space = match c.get("add_prefix_space") {
            None | Some(Json::Null) => true,
            Some(Json::Bool(b)) => *b,
            Some(_) => {
                return Err(Error::config(
                    path,
                    "`add_prefix_space` is not true, false or null",
                ))
            }
        };
        let prepend = if !add_prefix_space {
            Prepend::Never
        } else if config_flag(path, c, "legacy")? == Some(true) {
            Prepend::Always
        } else {
            Prepend::First
        };
        Ok(Some(LlamaRebuild {
            prepend,
            add_prefix_space,
        }))
    }

    fn pre_tokenizers(&self) -> Vec<PreTokenizer> {
        vec![PreTokenizer::Metaspace {
            replacement: '▁',
            prepend: self.prepend,
            split: false,
        }]
    }

    fn decoders(&self) -> Vec<Decoder> {
        let mut decoders = vec![
            Decoder::Replace("▁".to_string(), " ".to_string()),
            Decoder::ByteFallback,
            Decoder::Fuse,
        ];
        if self.add_prefix_space {
            decoders.push(Decoder::Strip {
                content: ' ',
                start: 1,
                stop: 0,
            });
        }
        decoders
    }
}

// ---------------------------------------------------------------------------------------------
// Added tokens

#[derive(Clone)]
struct AddedToken {
    content: String,
    id: u32,
    special: bool,
    normalized: bool,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
}

impl AddedToken {
    fn special(content: &str, id: u32) -> AddedToken {
        AddedToken {
            content: content.to_string(),
            id,
            special: true,
            normalized: false,
            single_word: false,
            lstrip: false,
            rstrip: false,
        }
    }
}

/// Finds added tokens in text as HF's `AddedVocabulary::find_matches` does with its
/// leftmost-longest Aho-Corasick automaton: candidates are indexed by their first byte.
struct AddedMatcher {
    tokens: Vec<AddedToken>,
    by_first_byte: Vec<Vec<usize>>,
}

impl AddedMatcher {
    fn new(tokens: Vec<AddedToken>) -> AddedMatcher {
        let mut by_first_byte = vec![Vec::new(); 256];
        for (i, t) in tokens.iter().enumerate() {
            if let Some(&b) = t.content.as_bytes().first() {
                by_first_byte[usize::from(b)].push(i);
            }
        }
        AddedMatcher {
            tokens,
            by_first_byte,
        }
    }

    /// Cuts `text` into added tokens (`Some(id)`) and the text between them (`None`), covering
    /// all of it. An empty text gives one empty piece.
    fn split(&self, text: &str) -> Vec<(Option<u32>, Range<usize>)> {
        if self.tokens.is_empty() || text.is_empty() {
            return vec![(None, 0..text.len())];
        }
        let bytes = text.as_bytes();
        let mut pieces = Vec::new();
        let mut done = 0; // end of the last piece pushed
        let mut i = 0; // where the automaton looks next
        while i < bytes.len() {
            let longest = self.by_first_byte[usize::from(bytes[i])]
                .iter()
                .map(|&k| &self.tokens[k])
                .filter(|t| bytes[i..].starts_with(t.content.as_bytes()))
                .max_by_key(|t| t.content.len());
            let Some(token) = longest else {
                i += 1;
                continue;
            };
            let (mut start, mut stop) = (i, i + token.content.len());
            i = stop;
            if start < done {
                continue; // inside whitespace an earlier token's `rstrip` took
            }
            if token.single_word {
                // HF: the match must not touch a word character (regex `\w`) on either side.
                let word_before = text[..start].chars().next_back().is_some_and(is_word_char);
                let word_after = text[stop..].chars().next().is_some_and(is_word_char);
                if word_before || word_after {
                    continue;
                }
            }
            if token.lstrip {
                let trimmed = text[..start].trim_end_matches(char::is_whitespace).len();
                start = trimmed.max(done);
            }
            if token.rstrip {
                stop = text.len() - text[stop..].trim_start_matches(char::is_whitespace).len();
                i = stop;
            }
            if done < start {
                pieces.push((None, done..start));
            }
            pieces.push((Some(token.id), start..stop));
            done = stop;
        }
        if done < text.len() {
            pieces.push((None, done..text.len()));
        }
        pieces
    }
}

/// Regex `\w` (Unicode): letters, marks, digits and connector punctuation, approximated.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

// ---------------------------------------------------------------------------------------------
// Normalizers (tokenizers/src/normalizers)

enum Normalizer {
    /// `NFC`: Unicode canonical composition (`nfc`).
    Nfc,
    /// `Prepend`: puts the string in front of a non-empty text.
    Prepend(String),
    /// `Replace`: every match of the pattern becomes `content`.
    Replace(ReplacePattern, String),
}

/// `Replace` patterns: any literal string, and the three regexes with which the SentencePiece
/// converter writes `remove_extra_whitespaces` (as stories260K's tokenizer.json has them).
enum ReplacePattern {
    Literal(String),
    /// `\A +`
    LeadingSpaces,
    /// ` +\z`
    TrailingSpaces,
    /// ` {2,}`
    SpaceRuns,
}

fn normalize(normalizers: &[Normalizer], text: &str) -> String {
    let mut s = text.to_string();
    for n in normalizers {
        s = match n {
            Normalizer::Nfc => nfc::nfc(&s),
            Normalizer::Prepend(p) if !s.is_empty() => format!("{p}{s}"),
            Normalizer::Prepend(_) => s,
            Normalizer::Replace(ReplacePattern::Literal(from), to) => s.replace(from.as_str(), to),
            Normalizer::Replace(ReplacePattern::LeadingSpaces, to) => {
                let rest = s.trim_start_matches(' ');
                if rest.len() < s.len() {
                    format!("{to}{rest}")
                } else {
                    s
                }
            }
            Normalizer::Replace(ReplacePattern::TrailingSpaces, to) => {
                let rest = s.trim_end_matches(' ');
                if rest.len() < s.len() {
                    format!("{rest}{to}")
                } else {
                    s
                }
            }
            Normalizer::Replace(ReplacePattern::SpaceRuns, to) => replace_space_runs(&s, to),
        };
    }
    s
}

fn replace_space_runs(s: &str, to: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("  ") {
        out.push_str(&rest[..i]);
        out.push_str(to);
        rest = rest[i..].trim_start_matches(' ');
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers (tokenizers/src/pre_tokenizers)

#[derive(Clone, Copy, PartialEq)]
enum Prepend {
    Always,
    First,
    Never,
}

enum PreTokenizer {
    /// Spaces become `replacement`, which is put in front of the piece per `prepend` (unless the
    /// piece already starts with it); with `split` the piece is then cut before each
    /// `replacement` (HF's `MergedWithNext`).
    Metaspace {
        replacement: char,
        prepend: Prepend,
        split: bool,
    },
    /// Optionally a space in front, optionally the GPT-2 regex, then every byte becomes a
    /// printable character of the GPT-2 byte map.
    ByteLevel {
        add_prefix_space: bool,
        use_regex: bool,
    },
    /// A regex split, behaviour `Isolated`.
    Split(SplitPattern),
}

impl PreTokenizer {
    /// Appends the non-empty pieces `piece` becomes to `out`; only the first of them can
    /// still be at the start of the text.
    fn apply(&self, piece: &str, first: bool, out: &mut Vec<(String, bool)>) {
        let mut push = |s: &str, at_start: bool| {
            if !s.is_empty() {
                out.push((s.to_string(), at_start));
            }
        };
        match self {
            PreTokenizer::Metaspace {
                replacement,
                prepend,
                split,
            } => {
                let mut s = piece.replace(' ', replacement.encode_utf8(&mut [0; 4]));
                let wanted = *prepend == Prepend::Always || (*prepend == Prepend::First && first);
                if wanted && !s.is_empty() && !s.starts_with(*replacement) {
                    s.insert(0, *replacement);
                }
                if !split {
                    return push(&s, first);
                }
                let mut start = 0;
                for (i, c) in s.char_indices() {
                    if c == *replacement && i > start {
                        push(&s[start..i], first && start == 0);
                        start = i;
                    }
                }
                push(&s[start..], first && start == 0);
            }
            PreTokenizer::ByteLevel {
                add_prefix_space,
                use_regex,
            } => {
                let mut s = piece.to_string();
                if *add_prefix_space && !s.is_empty() && !s.starts_with(' ') {
                    s.insert(0, ' ');
                }
                let words = if *use_regex {
                    SplitPattern::Gpt2.split(&s)
                } else {
                    vec![s.as_str()]
                };
                for (k, word) in words.into_iter().enumerate() {
                    let mapped: String = word.bytes().map(|b| BYTE_CHARS[usize::from(b)]).collect();
                    push(&mapped, first && k == 0);
                }
            }
            PreTokenizer::Split(pattern) => {
                for (k, word) in pattern.split(piece).into_iter().enumerate() {
                    push(word, first && k == 0);
                }
            }
        }
    }
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the other 68 bytes
/// get the characters from U+0100 on, in byte order.
pub const BYTE_CHARS: [char; 256] = {
    let mut map = ['\0'; 256];
    let mut next = 0x100;
    let mut b = 0;
    while b < 256 {
        map[b] = if matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF) {
            b as u8 as char
        } else {
            next += 1;
            match char::from_u32(next - 1) {
                Some(c) => c,
                None => char::REPLACEMENT_CHARACTER,
            }
        };
        b += 1;
    }
    map
};

// ---------------------------------------------------------------------------------------------
// Decoders (tokenizers/src/decoders), each a step over the list of token strings

enum Decoder {
    Replace(String, String),
    /// Runs of `<0xNN>` tokens become the UTF-8 text they spell, or one U+FFFD per byte when
    /// they are not valid UTF-8.
    ByteFallback,
    /// All tokens joined into one.
    Fuse,
    /// Up to `start` / `stop` copies of `content` removed from each token's ends.
    Strip {
        content: char,
        start: usize,
        stop: usize,
    },
    /// The GPT-2 byte map undone over all tokens, invalid UTF-8 replaced by U+FFFD.
    ByteLevel(HashMap<char, u8>),
    /// `replacement` becomes a space, except in the first token where it is dropped when
    /// `strip_first` (prepend_scheme not "never").
    Metaspace {
        replacement: char,
        strip_first: bool,
    },
}

impl Decoder {
    fn decode(&self, tokens: Vec<String>) -> Vec<String> {
        match self {
            Decoder::Replace(from, to) => tokens
                .iter()
                .map(|t| t.replace(from.as_str(), to))
                .collect(),
            Decoder::ByteFallback => {
                let mut out = Vec::with_capacity(tokens.len());
                let mut bytes = Vec::new();
                let flush = |bytes: &mut Vec<u8>, out: &mut Vec<String>| {
                    if bytes.is_empty() {
                        return;
                    }
                    match String::from_utf8(std::mem::take(bytes)) {
                        Ok(s) => out.push(s),
                        Err(e) => out.extend(e.as_bytes().iter().map(|_| "\u{FFFD}".to_string())),
                    }
                };
                for t in tokens {
                    match byte_token(&t) {
                        Some(b) => bytes.push(b),
                        None => {
                            flush(&mut bytes, &mut out);
                            out.push(t);
                        }
                    }
                }
                flush(&mut bytes, &mut out);
                out
            }
            Decoder::Fuse => vec![tokens.concat()],
            Decoder::Strip {
                content,
                start,
                stop,
            } => tokens
                .iter()
                .map(|t| {
                    let chars: Vec<char> = t.chars().collect();
                    let a = chars
                        .iter()
                        .take(*start)
                        .take_while(|&c| c == content)
                        .count();
                    let b = chars[a..]
                        .iter()
                        .rev()
                        .take(*stop)
                        .take_while(|&c| c == content)
                        .count();
                    chars[a..chars.len() - b].iter().collect()
                })
                .collect(),
            Decoder::ByteLevel(char_bytes) => {
                let mut bytes = Vec::new();
                for t in &tokens {
                    let mapped: Option<Vec<u8>> =
                        t.chars().map(|c| char_bytes.get(&c).copied()).collect();
                    bytes.extend(mapped.unwrap_or_else(|| t.as_bytes().to_vec()));
                }
                vec![String::from_utf8_lossy(&bytes).into_owned()]
            }
            Decoder::Metaspace {
                replacement,
                strip_first,
            } => tokens
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let space = if i == 0 && *strip_first { "" } else { " " };
                    t.replace(*replacement, space)
                })
                .collect(),
        }
    }
}

/// The byte of a `<0xNN>` token.
fn byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

// ---------------------------------------------------------------------------------------------
// Reading tokenizer.json

/// The tokenizer.json being read, for error messages.
struct File<'a> {
    path: &'a Path,
}

impl File<'_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::tokenizer(self.path, msg)
    }

    fn str<'j>(&self, json: &'j Json, key: &str, what: &str) -> Result<&'j str> {
        field(json, key)
            .as_str()
            .ok_or_else(|| self.err(format!("{what}: `{key}` is not a string")))
    }

    fn char(&self, json: &Json, key: &str, what: &str) -> Result<char> {
        let s = self.str(json, key, what)?;
        let mut chars = s.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => Ok(c),
            _ => Err(self.err(format!("{what}: `{key}` {s:?} is not one character"))),
        }
    }

    /// A boolean field, `default` when missing or null.
    fn bool(&self, json: &Json, key: &str, default: bool, what: &str) -> Result<bool> {
        match field(json, key) {
            Json::Null => Ok(default),
            Json::Bool(b) => Ok(*b),
            _ => Err(self.err(format!("{what}: `{key}` is not a boolean"))),
        }
    }

    fn usize(&self, json: &Json, key: &str, what: &str) -> Result<usize> {
        field(json, key)
            .as_usize()
            .ok_or_else(|| self.err(format!("{what}: `{key}` is not a count")))
    }

    fn id(&self, json: &Json, what: &str) -> Result<u32> {
        json.as_i64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| self.err(format!("{what}: id is not an integer in 0..2^32")))
    }

    /// A normalizer or pre-tokenizer that is not used but must still be one the `tokenizers`
    /// library loads: every step (of a `Sequence` too) has a `type` among `known`, and every
    /// `Regex` pattern is well-formed (`regex_syntax_error`).
    fn check_steps(&self, json: &Json, what: &str, known: &[&str]) -> Result<()> {
        if matches!(json, Json::Null) {
            return Ok(());
        }
        let key = if what == "normalizer" { "normalizers" } else { "pretokenizers" };
        for step in self.sequence(json, key, what)? {
            match type_of(step) {
                "" => return Err(self.err(format!("{what} without a `type`"))),
                "Sequence" => self.check_steps(step, what, known)?,
                t if !known.contains(&t) => return Err(self.err(format!("{what} type {t:?} does not exist in tokenizers"))),
                _ => {}
            }
            if let Some(r) = field(field(step, "pattern"), "Regex").as_str() {
                if let Some(e) = regex_syntax_error(r) {
                    return Err(self.err(format!("{what} {}: regex {r:?} is invalid: {e}", type_of(step))));
                }
            }
        }
        Ok(())
    }

    /// Items of a `Sequence` under `key`, or the one item itself.
    fn sequence<'j>(&self, json: &'j Json, key: &str, what: &str) -> Result<Vec<&'j Json>> {
        if type_of(json) != "Sequence" {
            return Ok(vec![json]);
        }
        match field(json, key).as_array() {
            Some(items) => Ok(items.iter().collect()),
            None => Err(self.err(format!("{what} Sequence: `{key}` is not an array"))),
        }
    }

    /// The BPE model. With `llama` only its vocab and merges are read, and the settings are
    /// those `LlamaRebuild` describes.
    fn model(&self, m: &Json, llama: bool) -> Result<Bpe> {
        match type_of(m) {
            "BPE" => {}
            "" => return Err(self.err("model has no `type` (only BPE is supported)")),
            t => return Err(self.err(format!("model type {t} is not supported (only BPE)"))),
        }
        if !llama && field(m, "dropout").as_f64().is_some_and(|d| d != 0.0) {
            return Err(self.err("BPE `dropout` is not supported (encoding would be random)"));
        }
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if !llama && field(m, key).as_str().is_some_and(|s| !s.is_empty()) {
                return Err(self.err(format!("BPE `{key}` is not supported")));
            }
        }
        let entries = field(m, "vocab")
            .as_object()
            .ok_or_else(|| self.err("model `vocab` is not an object"))?;
        let mut vocab = HashMap::with_capacity(entries.len());
        for (token, id) in entries {
            vocab.insert(
                token.clone(),
                self.id(id, &format!("vocab token {token:?}"))?,
            );
        }

        let list = field(m, "merges")
            .as_array()
            .ok_or_else(|| self.err("model `merges` is not an array"))?;
        let mut merges = HashMap::with_capacity(list.len());
        for (rank, merge) in list.iter().enumerate() {
            // Older files write a merge as "a b", newer ones as ["a", "b"].
            let (a, b) = match merge {
                Json::Str(s) => match s.split(' ').collect::<Vec<_>>()[..] {
                    [a, b] => (a, b),
                    _ => return Err(self.err(format!("merge {rank} {s:?} is not two tokens"))),
                },
                Json::Arr(pair) => match &pair[..] {
                    [Json::Str(a), Json::Str(b)] => (a.as_str(), b.as_str()),
                    _ => return Err(self.err(format!("merge {rank} is not a pair of strings"))),
                },
                _ => return Err(self.err(format!("merge {rank} is neither \"a b\" nor [a, b]"))),
            };
            let id = |t: &str| {
                vocab.get(t).copied().ok_or_else(|| {
                    self.err(format!(
                        "merge {rank} ({a:?} {b:?}): token {t:?} is not in the vocab"
                    ))
                })
            };
            let rank = u32::try_from(rank).map_err(|_| self.err("more than 2^32 merges"))?;
            // A pair listed twice keeps its last rank, as HF's HashMap collect does.
            merges.insert((id(a)?, id(b)?), (rank, id(&format!("{a}{b}"))?));
        }

        let unk = match field(m, "unk_token") {
            _ if llama => None,
            Json::Null => None,
            Json::Str(t) => Some(
                vocab
                    .get(t)
                    .copied()
                    .ok_or_else(|| self.err(format!("unk_token {t:?} is not in the vocab")))?,
            ),
            _ => return Err(self.err("model `unk_token` is not a string")),
        };
        let flag = |key: &str, rebuilt: bool| match llama {
            true => Ok(rebuilt),
            false => self.bool(m, key, false, "BPE"),
        };
        let byte_tokens = flag("byte_fallback", true)?.then(|| {
            (0..=255u8)
                .map(|b| vocab.get(&format!("<0x{b:02X}>")).copied())
                .collect()
        });
        Ok(Bpe {
            unk,
            fuse_unk: flag("fuse_unk", true)?,
            byte_tokens,
            ignore_merges: flag("ignore_merges", false)?,
            vocab,
            merges,
        })
    }

    /// `added_tokens`; as in HF, a token the model's vocab has takes the vocab's id. Special
    /// tokens come first (HF matches `special_tokens` before `added_tokens`).
    fn added_tokens(&self, json: &Json, vocab: &HashMap<String, u32>) -> Result<Vec<AddedToken>> {
        let list = match json {
            Json::Null => return Ok(Vec::new()),
            j => j
                .as_array()
                .ok_or_else(|| self.err("`added_tokens` is not an array"))?,
        };
        let mut tokens = Vec::with_capacity(list.len());
        for t in list {
            let content = self.str(t, "content", "added token")?;
            let what = format!("added token {content:?}");
            if content.is_empty() {
                continue; // HF ignores empty added tokens
            }
            let special = self.bool(t, "special", false, &what)?;
            tokens.push(AddedToken {
                content: content.to_string(),
                id: match vocab.get(content) {
                    Some(&id) => id,
                    None => self.id(field(t, "id"), &what)?,
                },
                special,
                normalized: self.bool(t, "normalized", !special, &what)?,
                single_word: self.bool(t, "single_word", false, &what)?,
                lstrip: self.bool(t, "lstrip", false, &what)?,
                rstrip: self.bool(t, "rstrip", false, &what)?,
            });
        }
        tokens.sort_by_key(|t| !t.special);
        Ok(tokens)
    }

    fn normalizers(&self, json: &Json) -> Result<Vec<Normalizer>> {
        let mut out = Vec::new();
        for n in self.sequence(json, "normalizers", "normalizer")? {
            out.push(match type_of(n) {
                "NFC" => Normalizer::Nfc,
                "Prepend" => {
                    Normalizer::Prepend(self.str(n, "prepend", "Prepend normalizer")?.to_string())
                }
                "Replace" => {
                    let (pattern, content) = self.replace(n, "Replace normalizer")?;
                    let pattern = match pattern {
                        Pattern::String(s) => ReplacePattern::Literal(s.to_string()),
                        Pattern::Regex(r"\A +") => ReplacePattern::LeadingSpaces,
                        Pattern::Regex(r" +\z") => ReplacePattern::TrailingSpaces,
                        Pattern::Regex(r" {2,}") => ReplacePattern::SpaceRuns,
                        Pattern::Regex(r) => {
                            return Err(self
                                .err(format!("Replace normalizer: regex {r:?} is not supported")))
                        }
                    };
                    Normalizer::Replace(pattern, content.to_string())
                }
                "" => return Err(self.err("normalizer without a `type`")),
                t => return Err(self.err(format!("normalizer {t} is not supported"))),
            });
        }
        Ok(out)
    }

    /// `pattern` ({"String": ..} or {"Regex": ..}) and `content` of a Replace step.
    fn replace<'j>(&self, json: &'j Json, what: &str) -> Result<(Pattern<'j>, &'j str)> {
        let p = field(json, "pattern");
        let pattern = match (
            p.get("String").and_then(Json::as_str),
            p.get("Regex").and_then(Json::as_str),
        ) {
            (Some(""), _) => return Err(self.err(format!("{what}: empty pattern"))),
            (Some(s), _) => Pattern::String(s),
            (None, Some(r)) => Pattern::Regex(r),
            (None, None) => {
                return Err(self.err(format!("{what}: `pattern` is neither String nor Regex")))
            }
        };
        Ok((pattern, self.str(json, "content", what)?))
    }

    fn pre_tokenizers(&self, json: &Json) -> Result<Vec<PreTokenizer>> {
        let mut out = Vec::new();
        for p in self.sequence(json, "pretokenizers", "pre_tokenizer")? {
            out.push(match type_of(p) {
                "Metaspace" => {
                    let what = "Metaspace pre_tokenizer";
                    PreTokenizer::Metaspace {
                        replacement: self.char(p, "replacement", what)?,
                        prepend: self.prepend_scheme(p, what)?,
                        split: self.bool(p, "split", true, what)?,
                    }
                }
                "ByteLevel" => {
                    let what = "ByteLevel pre_tokenizer";
                    PreTokenizer::ByteLevel {
                        add_prefix_space: self.bool(p, "add_prefix_space", true, what)?,
                        use_regex: self.bool(p, "use_regex", true, what)?,
                    }
                }
                "Split" => {
                    let what = "Split pre_tokenizer";
                    let behavior = self.str(p, "behavior", what)?;
                    if behavior != "Isolated" || self.bool(p, "invert", false, what)? {
                        return Err(self.err(format!(
                            "{what}: only behavior Isolated without invert is supported, not {behavior}"
                        )));
                    }
                    let regex = field(field(p, "pattern"), "Regex").as_str().ok_or_else(|| {
                        self.err(format!("{what}: only a Regex pattern is supported"))
                    })?;
                    let pattern = SplitPattern::from_regex(regex).ok_or_else(|| {
                        self.err(format!(
                            "{what}: regex {regex:?} is not one rq-min knows (GPT-2, Llama-3, Qwen2)"
                        ))
                    })?;
                    PreTokenizer::Split(pattern)
                }
                "" => return Err(self.err("pre_tokenizer without a `type`")),
                t => return Err(self.err(format!("pre_tokenizer {t} is not supported"))),
            });
        }
        Ok(out)
    }

    /// Metaspace's `prepend_scheme`; files older than it have `add_prefix_space` instead.
    fn prepend_scheme(&self, json: &Json, what: &str) -> Result<Prepend> {
        match field(json, "prepend_scheme") {
            Json::Null => Ok(if self.bool(json, "add_prefix_space", true, what)? {
                Prepend::Always
            } else {
                Prepend::Never
            }),
            Json::Str(s) if s == "always" => Ok(Prepend::Always),
            Json::Str(s) if s == "first" => Ok(Prepend::First),
            Json::Str(s) if s == "never" => Ok(Prepend::Never),
            other => Err(self.err(format!(
                "{what}: unknown prepend_scheme {}",
                other.to_compact()
            ))),
        }
    }

    /// The ids `TemplateProcessing` puts before and after a single sequence ($A).
    fn post_processor(&self, json: &Json) -> Result<(Vec<u32>, Vec<u32>)> {
        let (mut prefix, mut suffix) = (Vec::new(), Vec::new());
        for p in self.sequence(json, "processors", "post_processor")? {
            match type_of(p) {
                "ByteLevel" => {} // only adjusts offsets
                "TemplateProcessing" => {
                    let what = "TemplateProcessing";
                    let single = field(p, "single")
                        .as_array()
                        .ok_or_else(|| self.err(format!("{what}: `single` is not an array")))?;
                    let mut seen_sequence = false;
                    for piece in single {
                        if let Some(seq) = piece.get("Sequence") {
                            if self.str(seq, "id", what)? != "A" || seen_sequence {
                                return Err(self.err(format!("{what}: `single` must hold $A once")));
                            }
                            seen_sequence = true;
                        } else if let Some(special) = piece.get("SpecialToken") {
                            let name = self.str(special, "id", what)?;
                            let ids = field(field(field(p, "special_tokens"), name), "ids")
                                .as_array()
                                .ok_or_else(|| {
                                    self.err(format!("{what}: special token {name:?} has no `ids`"))
                                })?;
                            for id in ids {
                                let id = self.id(id, &format!("{what} special token {name:?}"))?;
                                if seen_sequence {
                                    suffix.push(id)
                                } else {
                                    prefix.push(id)
                                }
                            }
                        } else {
                            return Err(
                                self.err(format!("{what}: unknown piece {}", piece.to_compact()))
                            );
                        }
                    }
                    if !seen_sequence {
                        return Err(self.err(format!("{what}: `single` has no $A")));
                    }
                }
                "" => return Err(self.err("post_processor without a `type`")),
                t => return Err(self.err(format!("post_processor {t} is not supported"))),
            }
        }
        Ok((prefix, suffix))
    }

    fn decoders(&self, json: &Json) -> Result<Vec<Decoder>> {
        let mut out = Vec::new();
        for d in self.sequence(json, "decoders", "decoder")? {
            out.push(match type_of(d) {
                "Replace" => match self.replace(d, "Replace decoder")? {
                    (Pattern::String(from), to) => {
                        Decoder::Replace(from.to_string(), to.to_string())
                    }
                    (Pattern::Regex(r), _) => {
                        return Err(
                            self.err(format!("Replace decoder: regex {r:?} is not supported"))
                        )
                    }
                },
                "ByteFallback" => Decoder::ByteFallback,
                "Fuse" => Decoder::Fuse,
                "Strip" => Decoder::Strip {
                    content: self.char(d, "content", "Strip decoder")?,
                    start: self.usize(d, "start", "Strip decoder")?,
                    stop: self.usize(d, "stop", "Strip decoder")?,
                },
                "ByteLevel" => {
                    Decoder::ByteLevel(BYTE_CHARS.iter().copied().zip(0u8..=255).collect())
                }
                "Metaspace" => Decoder::Metaspace {
                    replacement: self.char(d, "replacement", "Metaspace decoder")?,
                    strip_first: self.prepend_scheme(d, "Metaspace decoder")? != Prepend::Never,
                },
                "" => return Err(self.err("decoder without a `type`")),
                t => return Err(self.err(format!("decoder {t} is not supported"))),
            });
        }
        Ok(out)
    }
}

enum Pattern<'a> {
    String(&'a str),
    Regex(&'a str),
}

/// Normalizer types of the `tokenizers` library (tokenizers/src/normalizers/mod.rs).
const NORMALIZER_TYPES: &[&str] = &[
    "BertNormalizer", "Strip", "StripAccents", "NFC", "NFD", "NFKC", "NFKD", "Sequence", "Lowercase", "Nmt",
    "Precompiled", "Replace", "Prepend", "ByteLevel",
];

/// Pre-tokenizer types of the `tokenizers` library (tokenizers/src/pre_tokenizers/mod.rs).
const PRE_TOKENIZER_TYPES: &[&str] = &[
    "BertPreTokenizer", "ByteLevel", "CharDelimiterSplit", "Metaspace", "Whitespace", "WhitespaceSplit", "Sequence",
    "Split", "Punctuation", "Digits", "UnicodeScripts", "FixedLength",
];

/// Why `r` is not a well-formed regular expression, if it is not: an unbalanced group or class,
/// a trailing backslash, or a repetition with nothing to repeat. Only the syntax is checked.
fn regex_syntax_error(r: &str) -> Option<String> {
    let (mut depth, mut in_class, mut can_repeat) = (0usize, false, false);
    let mut chars = r.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                match chars.next() {
                    None => return Some("trailing backslash".into()),
                    // `\p{L}`, `\x{263a}`: the braces belong to the escape.
                    Some('p' | 'P' | 'x' | 'u') if chars.next_if_eq(&'{').is_some() => {
                        if !chars.by_ref().any(|n| n == '}') {
                            return Some("unclosed `{` of an escape".into());
                        }
                    }
                    Some(_) => {}
                }
                can_repeat = true;
                continue;
            }
            ']' if in_class => in_class = false,
            _ if in_class => {}
            '[' => {
                in_class = true;
                // A leading `]` (or `^]`) is a literal inside the class.
                chars.next_if_eq(&'^');
                chars.next_if_eq(&']');
            }
            '(' => {
                depth += 1;
                chars.next_if_eq(&'?');
                can_repeat = false;
                continue;
            }
            ')' if depth == 0 => return Some("unmatched `)`".into()),
            ')' => depth -= 1,
            '|' => {
                can_repeat = false;
                continue;
            }
            '*' | '+' | '?' | '{' if !can_repeat => return Some(format!("`{c}` has nothing to repeat")),
            '*' | '+' | '?' => {
                chars.next_if(|&n| n == '?' || n == '+');
                can_repeat = false;
                continue;
            }
            '{' => {
                let rest: String = chars.by_ref().take_while(|&n| n != '}').collect();
                if !rest.split(',').all(|p| p.trim().chars().all(|d| d.is_ascii_digit())) {
                    return Some(format!("bad repetition `{{{rest}}}`"));
                }
                can_repeat = false;
                continue;
            }
            _ => {}
        }
        can_repeat = true;
    }
    match (in_class, depth) {
        (true, _) => Some("unclosed `[`".into()),
        (_, 0) => None,
        _ => Some("unclosed `(`".into()),
    }
}

#[cfg(test)]
mod regex_tests {
    use super::regex_syntax_error;

    #[test]
    fn regex_syntax() {
        // The split patterns of GPT-2, Llama 3 and Qwen 2 and the Llama-2 normalizer's.
        for ok in [
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            r" {2,}",
            r"[]a]+?",
        ] {
            assert_eq!(regex_syntax_error(ok), None, "{ok}");
        }
        for (bad, why) in [("((", "unclosed `(`"), ("a)", "unmatched"), ("[abc", "unclosed `[`"), ("*a", "nothing to repeat"), ("a|+", "nothing to repeat"), ("a{x}", "bad repetition"), ("a\\", "trailing")] {
            let e = regex_syntax_error(bad).unwrap_or_default();
            assert!(e.contains(why), "{bad}: {e:?}");
        }
    }
}

