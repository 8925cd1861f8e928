//! Tokenizer tests: ids against ModelOpt's reference (rq-tiny), the two tokenizer.json
//! generations of Llama-2 against each other, stories260K by hand, and byte-level BPE
//! (GPT-2 / Llama-3 / Qwen2) on small tokenizer.json files written here.

mod common;

use rq_min::error::Error;
use rq_min::io::json::{obj, str, Json};
use rq_min::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::time::Instant;

const DATA_FILES: [&str; 6] = [
    "rustdocs_calib.txt",
    "rustdocs_eval.txt",
    "tinystories_calib.txt",
    "tinystories_eval.txt",
    "wikitext2_test_eval.txt",
    "wikitext2_valid_calib.txt",
];

fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids_of(json: &Json) -> Vec<u32> {
    json.as_array()
        .expect("an array of ids")
        .iter()
        .map(|v| u32::try_from(v.as_i64().expect("an integer id")).expect("id in u32"))
        .collect()
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stories260K-tok")
}

/// A fresh empty directory for files a test writes.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rq-min-tok-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

// ---------------------------------------------------------------------------------------------
// Llama-2 style (SentencePiece BPE with byte fallback)

#[test]
fn rq_tiny_eval_ids_match_modelopt_reference() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let tok = Tokenizer::from_dir(&shared.join("models/rq-tiny")).unwrap();
    let text = read_text(&shared.join("data/rustdocs_eval.txt"));
    let start = Instant::now();
    let ids = tok.encode(&text);
    let took = start.elapsed();
    println!(
        "encoding rustdocs_eval.txt ({} bytes): {took:?}",
        text.len()
    );
    assert_eq!(ids.len(), 48189);
    let reference =
        Json::parse_file(&shared.join("reference/modelopt-0.47/rq-tiny/eval_ids_first4096.json"))
            .unwrap();
    let reference = ids_of(&reference);
    assert_eq!(reference.len(), 4096);
    assert_eq!(&ids[..4096], &reference[..]);
    assert_eq!(ids[0], 1, "BOS first");
    // The test profile is optimised (Cargo.toml), so this holds for `cargo test` too.
    assert!(took.as_secs_f64() < 1.0, "encoding took {took:?}");
}

#[test]
fn rq_tiny_calib_ids_match_modelopt_reference() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let tok = Tokenizer::from_dir(&shared.join("models/rq-tiny")).unwrap();
    let ids = tok.encode(&read_text(&shared.join("data/rustdocs_calib.txt")));
    let reference =
        Json::parse_file(&shared.join("reference/modelopt-0.47/rq-tiny/calib_ids.json")).unwrap();
    let rows = reference.as_array().unwrap();
    assert_eq!(rows.len(), 64);
    for (r, row) in rows.iter().enumerate() {
        let row = ids_of(row);
        assert_eq!(row.len(), 256);
        assert_eq!(&ids[r * 256..(r + 1) * 256], &row[..], "row {r}");
    }
}

#[test]
fn rq_tiny_special_ids_and_round_trip() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let tok = Tokenizer::from_dir(&shared.join("models/rq-tiny")).unwrap();
    assert_eq!(tok.vocab_size(), 32000);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    // Special tokens in the text are split out before BPE and match literally.
    assert_eq!(tok.encode("Hi</s>"), [1, 6324, 2]);
    for file in ["rustdocs_eval.txt", "tinystories_eval.txt"] {
        let text = read_text(&shared.join("data").join(file));
        assert!(
            tok.decode(&tok.encode(&text)) == text,
            "{file} does not survive a round trip"
        );
    }
}

/// The older (normalizer Prepend + Replace, merges "a b") and newer (Metaspace, merges [a, b])
/// tokenizer.json of Llama-2 give the same ids everywhere: both tokenizer_config.json name
/// `LlamaTokenizer`, so transformers 5 keeps only their vocab and merges and puts a Metaspace
/// pre-tokenizer in front (its `LlamaTokenizer.__init__`). Read as written they would differ on
/// text starting with a space and after an added token (Prepend puts a ▁ before every piece,
/// Metaspace only before one not already starting with ▁: "▁▁=" against "▁=").
#[test]
fn llama2_tokenizer_json_generations_agree() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let new = Tokenizer::from_dir(&shared.join("models/rq-tiny")).unwrap();
    let old = Tokenizer::from_dir(&shared.join("models/llama2-tokenizer")).unwrap();
    assert_eq!(old.vocab_size(), new.vocab_size());
    assert_eq!((old.bos_id(), old.eos_id()), (new.bos_id(), new.eos_id()));
    for file in DATA_FILES {
        let text = read_text(&shared.join("data").join(file));
        assert!(
            new.encode(&text) == old.encode(&text),
            "{file}: the two generations differ"
        );
    }
    // wikitext starts with " = Title = " and its valid split has " <unk> " in the text.
    // " =": "▁=", not "▁" "▁=".
    assert_eq!(new.encode(" ="), [1, 353]);
    assert_eq!(old.encode(" ="), [1, 353]);
    // After an added token, a piece starting with a space: "▁b", not "▁" "▁b".
    assert_eq!(new.encode("a<unk> b"), [1, 263, 0, 289]);
    assert_eq!(old.encode("a<unk> b"), [1, 263, 0, 289]);
    // Where the two configs do differ: llama2-tokenizer says `"legacy": true` (prepend_scheme
    // "always": "▁b" after the added token), rq-tiny has no `legacy` (false: "first", only
    // the text's first piece gets a ▁, so "b").
    assert_eq!(old.encode("a<unk>b"), [1, 263, 0, 289]);
    assert_eq!(new.encode("a<unk>b"), [1, 263, 0, 29890]);
    assert_eq!(new.encode("<s>a"), [1, 1, 29874]);
    assert_eq!(old.encode("<s>a"), [1, 1, 263]);
}

#[test]
fn stories260k_round_trip_on_tinystories() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let tok = Tokenizer::from_dir(&shared.join("models/stories260K-hf")).unwrap();
    for file in ["tinystories_eval.txt", "tinystories_calib.txt"] {
        let text = read_text(&shared.join("data").join(file));
        let ids = tok.encode(&text);
        assert_eq!(ids[0], 1);
        assert!(ids.iter().all(|&id| id < 512));
        // transformers 5 drops the tokenizer.json's normalizer (remove_extra_whitespaces) for
        // a LlamaTokenizer, so runs of spaces are kept too.
        assert!(text.contains("  "));
        assert!(
            tok.decode(&ids) == text,
            "{file} does not survive a round trip"
        );
    }
    // The fixture copy is the same tokenizer.
    let fixture = Tokenizer::from_dir(&fixture_dir()).unwrap();
    let text = read_text(&shared.join("data/tinystories_eval.txt"));
    assert!(fixture.encode(&text) == tok.encode(&text));
}

// ---------------------------------------------------------------------------------------------
// stories260K fixture (runs without ../shared)

/// Ids worked out from the fixture's merges by hand: "▁t" (rank 0), "he" (1), "nd" (5),
/// "▁the" (from "▁t he", rank 6), ...
#[test]
fn stories260k_fixture_ids() {
    let tok = Tokenizer::from_dir(&fixture_dir()).unwrap();
    assert_eq!(tok.vocab_size(), 512);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    let cases: [(&str, &[u32]); 8] = [
        ("", &[1]),
        ("the", &[1, 265]),
        ("he was", &[1, 281, 286]),
        // tokenizer_config.json names LlamaTokenizer with `"legacy": true`, so transformers 5
        // drops the normalizer (remove_extra_whitespaces) and spaces stay: "▁▁he▁▁▁was▁▁" (no
        // ▁ put in front, it starts with one) merges "he" (1), "▁w" (4), "▁wa" (15),
        // "▁he" (24), "▁was" (29); nothing merges with a lone "▁" (410).
        ("  he   was  ", &[1, 410, 281, 410, 410, 286, 410, 410]),
        ("The end.", &[1, 291, 344, 264, 426]),
        // "é" is a piece; "\n" is not and falls back to <0x0A>.
        ("é\n", &[1, 410, 485, 13]),
        // 漢字 are not pieces: UTF-8 bytes E6 BC A2 E5 AD 97 as <0xNN> (id = byte + 3).
        ("漢字 ok", &[1, 410, 233, 191, 165, 232, 176, 154, 334, 433]),
        (
            "Once upon a time, there was a little girl named Lily.",
            &[
                1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426,
            ],
        ),
    ];
    for (text, ids) in cases {
        assert_eq!(tok.encode(text), ids, "{text:?}");
    }
    // `<s>` in the text is the special token; decoding leaves special tokens out.
    assert_eq!(tok.encode("the<s>the"), [1, 265, 1, 265]);
    assert_eq!(tok.decode(&[1, 265, 1, 265]), "the the");
    let text = "One day, Lily found a big red ball.\nShe said: \"Wow! 漢字 and ümlauts.\"";
    assert_eq!(tok.decode(&tok.encode(text)), text);
}

/// tokenizer_config.json's add_bos_token / add_eos_token, as transformers 5 applies them: when
/// either is present the template becomes [bos] $A [eos], a missing flag counting as false.
#[test]
fn stories260k_fixture_config_flags() {
    let json = fixture_dir().join("tokenizer.json");
    let cases: [(Option<&str>, &[u32]); 5] = [
        (None, &[1, 265]),
        (
            Some(r#"{"bos_token": "<s>", "eos_token": "</s>"}"#),
            &[1, 265],
        ),
        (
            Some(r#"{"add_bos_token": false, "eos_token": "</s>"}"#),
            &[265],
        ),
        (
            Some(r#"{"add_eos_token": true, "eos_token": "</s>"}"#),
            &[265, 2],
        ),
        (
            Some(
                r#"{"add_bos_token": true, "add_eos_token": true, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}"#,
            ),
            &[1, 265, 2],
        ),
    ];
    let dir = temp_dir("flags");
    for (config, ids) in cases {
        let tok = match config {
            None => Tokenizer::from_file(&json, None).unwrap(),
            Some(text) => {
                let path = dir.join("tokenizer_config.json");
                std::fs::write(&path, text).unwrap();
                Tokenizer::from_file(&json, Some(&path)).unwrap()
            }
        };
        assert_eq!(tok.encode("the"), ids, "config {config:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tokenizer_config.json naming `LlamaTokenizer` (or its alias `LlamaTokenizerFast`) makes
/// transformers 5 rebuild the tokenizer from the vocab and merges alone: no normalizer, Metaspace
/// with prepend_scheme "always" (`legacy` true), "first" (`legacy` false or missing) or
/// "never" (`add_prefix_space` false, which also drops the decoder's Strip). Another class keeps
/// the tokenizer.json as written. Ids by hand from the fixture's merges: "▁the" is 265, "the"
/// without ▁ only merges "he" (rank 1): "t" "he" = 413 260.
#[test]
fn stories260k_fixture_llama_class_rebuild() {
    let json = fixture_dir().join("tokenizer.json");
    let dir = temp_dir("llama-class");
    let path = dir.join("tokenizer_config.json");
    let read = |config: &str| {
        std::fs::write(&path, config).unwrap();
        Tokenizer::from_file(&json, Some(&path))
    };
    let spaced = "  he   was  ";
    // Not a Llama class: the normalizer removes the extra spaces.
    let tok = read(r#"{"tokenizer_class": "PreTrainedTokenizerFast"}"#).unwrap();
    assert_eq!(tok.encode(spaced), [1, 281, 286]);
    assert_eq!(tok.encode("the<s>the"), [1, 265, 1, 265]);

    let tok = read(r#"{"tokenizer_class": "LlamaTokenizer", "legacy": true}"#).unwrap();
    assert_eq!(tok.encode(spaced), [1, 410, 281, 410, 410, 286, 410, 410]);
    assert_eq!(tok.encode("the<s>the"), [1, 265, 1, 265]);
    assert_eq!(tok.decode(&[1, 265, 1, 265]), "the the");

    for config in [
        r#"{"tokenizer_class": "LlamaTokenizerFast"}"#,
        r#"{"tokenizer_class": "LlamaTokenizer", "legacy": null, "add_prefix_space": null}"#,
    ] {
        let tok = read(config).unwrap();
        assert_eq!(tok.encode(spaced), [1, 410, 281, 410, 410, 286, 410, 410]);
        assert_eq!(tok.encode("the<s>the"), [1, 265, 1, 413, 260], "{config}");
        assert_eq!(tok.decode(&[265, 1, 413, 260]), "thethe");
    }

    let tok = read(r#"{"tokenizer_class": "LlamaTokenizer", "add_prefix_space": false}"#).unwrap();
    assert_eq!(tok.encode("the the"), [1, 413, 260, 265]);
    assert_eq!(tok.decode(&[265]), " the");

    // The file's normalizer is not even read then: one rq-min refuses does not matter.
    let mut edited = Json::parse_file(&json).unwrap();
    edited.set("normalizer", obj([("type", str("NFKC"))]));
    let edited_path = dir.join("tokenizer.json");
    std::fs::write(&edited_path, edited.to_pretty(2)).unwrap();
    std::fs::write(&path, r#"{"tokenizer_class": "LlamaTokenizer"}"#).unwrap();
    let tok = Tokenizer::from_file(&edited_path, Some(&path)).unwrap();
    assert_eq!(tok.encode("the"), [1, 265]);

    match read(r#"{"tokenizer_class": "LlamaTokenizer", "legacy": "yes"}"#) {
        Err(Error::Config { msg, .. }) => assert!(msg.contains("`legacy`"), "{msg}"),
        other => panic!("a bad `legacy` gave {:?}", other.err()),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Byte-level BPE on small handcrafted tokenizer.json files

/// GPT-2's `bytes_to_unicode`, written out here independently of the crate: printable bytes
/// stand for themselves, the others take U+0100, U+0101, ... in byte order.
fn gpt2_byte_char(b: u8) -> char {
    let printable = |x: u8| matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(0x100 + rank).unwrap()
}

#[test]
fn gpt2_byte_map_spot_checks() {
    // Known GPT-2 vocabulary spellings: space 'Ġ', newline 'Ċ', soft hyphen 'Ń'.
    assert_eq!(gpt2_byte_char(b' '), 'Ġ');
    assert_eq!(gpt2_byte_char(b'\n'), 'Ċ');
    assert_eq!(gpt2_byte_char(0xAD), 'Ń');
    assert_eq!(gpt2_byte_char(b'a'), 'a');
}

fn byte_level(s: &str) -> String {
    s.bytes().map(gpt2_byte_char).collect()
}

const ENDOFTEXT: u32 = 1000;
const BEGIN_OF_TEXT: u32 = 1001;

/// A byte-level tokenizer: ids 0..256 are the bytes, `words` follow from 256 in order, then the
/// merges' results not among them. Words and merges are given as plain text.
struct ByteLevelSpec<'a> {
    pre_tokenizer: Json,
    words: &'a [&'a str],
    merges: &'a [(&'a str, &'a str)],
    ignore_merges: bool,
    post_processor: Json,
}

impl ByteLevelSpec<'_> {
    fn build(&self, name: &str) -> Tokenizer {
        let dir = temp_dir(name);
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, self.json().to_pretty(2)).unwrap();
        let tok = Tokenizer::from_file(&path, None).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        tok
    }

    /// The tokenizer.json `build` reads.
    fn json(&self) -> Json {
        let mut vocab: Vec<String> = (0..=255u8).map(|b| gpt2_byte_char(b).to_string()).collect();
        let merged = self.merges.iter().map(|(a, b)| format!("{a}{b}"));
        for w in self.words.iter().map(|w| w.to_string()).chain(merged) {
            let w = byte_level(&w);
            if !vocab.contains(&w) {
                vocab.push(w);
            }
        }
        let mut vocab: Vec<(String, Json)> = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, Json::Int(i as i64)))
            .collect();
        vocab.push(("<|endoftext|>".into(), Json::Int(ENDOFTEXT.into())));
        vocab.push(("<|begin_of_text|>".into(), Json::Int(BEGIN_OF_TEXT.into())));
        let merges = self
            .merges
            .iter()
            .map(|(a, b)| Json::Arr(vec![str(&byte_level(a)), str(&byte_level(b))]))
            .collect();
        let added = |id: u32, content: &str| {
            obj([
                ("id", Json::Int(id.into())),
                ("content", str(content)),
                ("single_word", Json::Bool(false)),
                ("lstrip", Json::Bool(false)),
                ("rstrip", Json::Bool(false)),
                ("normalized", Json::Bool(false)),
                ("special", Json::Bool(true)),
            ])
        };
        obj([
            ("version", str("1.0")),
            (
                "added_tokens",
                Json::Arr(vec![
                    added(ENDOFTEXT, "<|endoftext|>"),
                    added(BEGIN_OF_TEXT, "<|begin_of_text|>"),
                ]),
            ),
            ("normalizer", Json::Null),
            ("pre_tokenizer", self.pre_tokenizer.clone()),
            ("post_processor", self.post_processor.clone()),
            (
                "decoder",
                obj([
                    ("type", str("ByteLevel")),
                    ("add_prefix_space", Json::Bool(true)),
                ]),
            ),
            (
                "model",
                obj([
                    ("type", str("BPE")),
                    ("dropout", Json::Null),
                    ("unk_token", Json::Null),
                    ("byte_fallback", Json::Bool(false)),
                    ("ignore_merges", Json::Bool(self.ignore_merges)),
                    ("vocab", Json::Obj(vocab)),
                    ("merges", Json::Arr(merges)),
                ]),
            ),
        ])
    }

    /// The id `build` gives `word`.
    fn id(&self, word: &str) -> u32 {
        let k = self
            .words
            .iter()
            .position(|w| *w == word)
            .expect("a listed word");
        256 + k as u32
    }
}

fn gpt2_pre_tokenizer() -> Json {
    obj([
        ("type", str("ByteLevel")),
        ("add_prefix_space", Json::Bool(false)),
        ("trim_offsets", Json::Bool(true)),
        ("use_regex", Json::Bool(true)),
    ])
}

/// Llama-3 / Qwen2 layout: Split with the regex, then ByteLevel without its own regex.
fn split_pre_tokenizer(regex: &str) -> Json {
    obj([
        ("type", str("Sequence")),
        (
            "pretokenizers",
            Json::Arr(vec![
                obj([
                    ("type", str("Split")),
                    ("pattern", obj([("Regex", str(regex))])),
                    ("behavior", str("Isolated")),
                    ("invert", Json::Bool(false)),
                ]),
                obj([
                    ("type", str("ByteLevel")),
                    ("add_prefix_space", Json::Bool(false)),
                    ("trim_offsets", Json::Bool(true)),
                    ("use_regex", Json::Bool(false)),
                ]),
            ]),
        ),
    ])
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level_post_processor() -> Json {
    obj([
        ("type", str("ByteLevel")),
        ("trim_offsets", Json::Bool(true)),
    ])
}

/// Llama-3.1's post-processor: ByteLevel then a template with <|begin_of_text|>.
fn llama3_post_processor() -> Json {
    let special = obj([(
        "SpecialToken",
        obj([("id", str("<|begin_of_text|>")), ("type_id", Json::Int(0))]),
    )]);
    let sequence = obj([(
        "Sequence",
        obj([("id", str("A")), ("type_id", Json::Int(0))]),
    )]);
    let template = obj([
        ("type", str("TemplateProcessing")),
        ("single", Json::Arr(vec![special, sequence])),
        ("pair", Json::Arr(vec![])),
        (
            "special_tokens",
            obj([(
                "<|begin_of_text|>",
                obj([
                    ("id", str("<|begin_of_text|>")),
                    ("ids", Json::Arr(vec![Json::Int(BEGIN_OF_TEXT.into())])),
                    ("tokens", Json::Arr(vec![str("<|begin_of_text|>")])),
                ]),
            )]),
        ),
    ]);
    obj([
        ("type", str("Sequence")),
        (
            "processors",
            Json::Arr(vec![byte_level_post_processor(), template]),
        ),
    ])
}

/// Each word of the expected pre-tokenization is a vocabulary entry and `ignore_merges` is on,
/// so a correctly cut word is one id, and a wrongly cut one falls apart into byte ids.
/// `expected` lists the words; one-character words are their byte's id.
fn assert_words(
    spec: &ByteLevelSpec,
    tok: &Tokenizer,
    prefix: &[u32],
    text: &str,
    expected: &[&str],
) {
    let mut ids = prefix.to_vec();
    for w in expected {
        if w.len() == 1 {
            ids.push(u32::from(w.as_bytes()[0]));
        } else if spec.words.contains(w) {
            ids.push(spec.id(w));
        } else {
            ids.extend(w.bytes().map(u32::from)); // a word with no token of its own
        }
    }
    assert_eq!(
        tok.encode(text),
        ids,
        "{text:?} should be cut as {expected:?}"
    );
}

#[test]
fn byte_level_gpt2_pattern_words() {
    let spec = ByteLevelSpec {
        pre_tokenizer: gpt2_pre_tokenizer(),
        words: &[
            "'m",
            " 12345",
            " a",
            " b",
            "world",
            "!!",
            "'S",
            " ह",
            "दी",
            " हिन",
            "  ",
            "\n\n",
        ],
        merges: &[],
        ignore_merges: true,
        post_processor: byte_level_post_processor(),
    };
    let tok = spec.build("gpt2-words");
    #[rustfmt::skip]
    let cases: [(&str, &[&str]); 5] = [
        ("I'm 12345 a  b\n\nworld!!\n",
            &["I", "'m", " 12345", " a", " ", " b", "\n", "\n", "world", "!!", "\n"]),
        // GPT-2's contractions are case-sensitive: "'S" is punctuation then a letter.
        ("HE'S", &["HE", "'", "S"]),
        // Trailing whitespace stays one word; before a word the last space goes with the word.
        ("a  ", &["a", "  "]),
        ("a   b", &["a", "  ", " b"]),
        // Devanagari vowel signs are Alphabetic but not \p{L} (Mc), the virama is Mn.
        (" हिन्दी", &[" ह", "ि", "न", "्", "द", "ी"]),
    ];
    for (text, words) in cases {
        assert_words(&spec, &tok, &[], text, words);
    }
}

#[test]
fn byte_level_llama3_pattern_words() {
    let spec = ByteLevelSpec {
        pre_tokenizer: split_pre_tokenizer(LLAMA3_REGEX),
        words: &[
            "'m", "123", "45", " a", " b", "\n\n", "world", "!!\n", "HE", "'S", "(hello", "\ty",
            " \n\n", " y",
        ],
        merges: &[],
        ignore_merges: true,
        post_processor: llama3_post_processor(),
    };
    let tok = spec.build("llama3-words");
    #[rustfmt::skip]
    let cases: [(&str, &[&str]); 5] = [
        ("I'm 12345 a  b\n\nworld!!\n",
            &["I", "'m", " ", "123", "45", " a", " ", " b", "\n\n", "world", "!!\n"]),
        // (?i:...) contractions.
        ("HE'S", &["HE", "'S"]),
        // One non-letter, non-newline character may lead a word.
        ("(hello", &["(hello"]),
        ("x\t\ty", &["x", "\t", "\ty"]),
        // \s*[\r\n]+ takes whitespace up to the last newline; the rest waits for the word.
        ("x \n\n y", &["x", " \n\n", " y"]),
    ];
    for (text, words) in cases {
        assert_words(&spec, &tok, &[BEGIN_OF_TEXT], text, words);
    }
    assert_eq!(tok.bos_id(), Some(BEGIN_OF_TEXT));
}

#[test]
fn byte_level_qwen2_pattern_words() {
    let spec = ByteLevelSpec {
        pre_tokenizer: split_pre_tokenizer(QWEN2_REGEX),
        words: &["123", "45", " a"],
        merges: &[],
        ignore_merges: true,
        post_processor: byte_level_post_processor(),
    };
    let tok = spec.build("qwen2-words");
    // Qwen2 cuts numbers into single digits; no BOS.
    assert_words(
        &spec,
        &tok,
        &[],
        "12345 a",
        &["1", "2", "3", "4", "5", " a"],
    );
    assert_eq!(tok.bos_id(), None);
}

#[test]
fn byte_level_merges_and_added_tokens() {
    let spec = ByteLevelSpec {
        pre_tokenizer: gpt2_pre_tokenizer(),
        words: &[" t", "he", " the", "aa", "the"],
        merges: &[(" ", "t"), ("h", "e"), (" t", "he"), ("a", "a")],
        ignore_merges: false,
        post_processor: byte_level_post_processor(),
    };
    let tok = spec.build("merges");
    let (he, the_, aa) = (spec.id("he"), spec.id(" the"), spec.id("aa"));
    // "the": t h e -> t he (no merge makes "the" although it is in the vocab: ignore_merges off).
    // " the": Ġ t h e -> Ġt h e (rank 0) -> Ġt he (rank 1) -> Ġthe (rank 2).
    assert_eq!(tok.encode("the the"), [u32::from(b't'), he, the_]);
    // Equal ranks merge leftmost first.
    assert_eq!(tok.encode("aaa"), [aa, u32::from(b'a')]);
    // Added tokens are cut out before pre-tokenization; decoding skips special ones.
    let ids = tok.encode("x<|endoftext|> the");
    assert_eq!(ids, [u32::from(b'x'), ENDOFTEXT, the_]);
    assert_eq!(tok.decode(&ids), "x the");
    assert_eq!(tok.vocab_size(), 256 + 5 + 2);
}

/// Pseudo-random strings of any Unicode scalar values (xorshift, fixed seed).
fn random_strings() -> Vec<String> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..200)
        .map(|_| {
            let len = next() % 40;
            (0..len)
                .filter_map(|_| {
                    let r = next();
                    // Mostly ASCII and nearby scripts, sometimes anything up to U+10FFFF.
                    let cp = match r % 4 {
                        0 => (r >> 8) % 0x80,
                        1 => (r >> 8) % 0x800,
                        2 => (r >> 8) % 0x1_0000,
                        _ => (r >> 8) % 0x11_0000,
                    };
                    char::from_u32(cp as u32)
                })
                .collect()
        })
        .collect()
}

#[test]
fn byte_level_round_trip_utf8() {
    for (name, pre_tokenizer) in [
        ("gpt2", gpt2_pre_tokenizer()),
        ("llama3", split_pre_tokenizer(LLAMA3_REGEX)),
    ] {
        let spec = ByteLevelSpec {
            pre_tokenizer,
            words: &[" t", "he"],
            merges: &[(" ", "t"), ("h", "e")],
            ignore_merges: false,
            post_processor: llama3_post_processor(),
        };
        let tok = spec.build(&format!("round-trip-{name}"));
        let fixed = [
            "",
            "hello world",
            "emoji 😀🎉 and 漢字, Ünïcödé",
            "tabs\tand\nnewlines\r\n\r\n",
            "  leading and trailing  ",
            "e\u{301} combining, \u{0} nul, \u{7f} del, \u{a0} nbsp",
            "I'll 1234567 won't",
        ];
        for s in fixed.iter().map(|s| s.to_string()).chain(random_strings()) {
            let ids = tok.encode(&s);
            assert_eq!(ids[0], BEGIN_OF_TEXT);
            assert_eq!(tok.decode(&ids), s, "{name}: {s:?}");
        }
        // One id per byte when nothing merges: id b decodes to byte b.
        assert_eq!(tok.encode("\u{e9}"), [BEGIN_OF_TEXT, 0xC3, 0xA9]);
        assert_eq!(tok.decode(&[0xF0, 0x9F, 0x98, 0x80]), "😀");
    }
}

// ---------------------------------------------------------------------------------------------
// NFC normalizer (Qwen2)

/// A byte-level tokenizer with the NFC normalizer and nothing to merge: its ids are the bytes of
/// the normalized text. `name` keeps the temporary folders of tests running at once apart.
fn nfc_tokenizer(name: &str) -> Tokenizer {
    let spec = ByteLevelSpec {
        pre_tokenizer: obj([
            ("type", str("ByteLevel")),
            ("add_prefix_space", Json::Bool(false)),
            ("use_regex", Json::Bool(false)),
        ]),
        words: &[],
        merges: &[],
        ignore_merges: false,
        post_processor: byte_level_post_processor(),
    };
    let mut json = spec.json();
    json.set("normalizer", obj([("type", str("NFC"))]));
    let dir = temp_dir(name);
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_pretty(2)).unwrap();
    let tok = Tokenizer::from_file(&path, None).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    tok
}

fn nfc_of(tok: &Tokenizer, text: &str) -> Vec<u8> {
    let ids = tok.encode(text);
    ids.iter()
        .map(|&id| u8::try_from(id).expect("a byte id"))
        .collect()
}

/// Expected outputs are Python 3.11's `unicodedata.normalize("NFC", s)` (Unicode 14.0.0, the
/// version tools/gen_nfc.py took its tables from).
#[test]
fn nfc_normalizer_matches_python() {
    let tok = nfc_tokenizer("nfc-cases");
    #[rustfmt::skip]
    let cases: [(&str, &str); 29] = [
        // Combining accents compose, in canonical order whatever order they come in.
        ("e\u{301}", "\u{E9}"),
        ("a\u{323}\u{302}", "\u{1EAD}"),
        ("a\u{302}\u{323}", "\u{1EAD}"),
        ("C\u{327}\u{301}", "\u{1E08}"),
        ("\u{C7}\u{301}", "\u{1E08}"),
        ("e\u{301}\u{327}", "\u{229}\u{301}"),
        ("x\u{308}\u{323}y", "\u{1E8D}\u{323}y"),
        // A second mark of the same class is blocked; a lower class does not block.
        ("a\u{301}\u{301}", "\u{E1}\u{301}"),
        ("a\u{346}\u{301}", "a\u{346}\u{301}"),
        ("a\u{316}\u{301}", "\u{E1}\u{316}"),
        ("\u{301}a", "\u{301}a"),
        // Hangul: L V (T) jamo make a syllable; LV + T, not LVT + T; U+11A7 is no T.
        ("\u{1100}\u{1161}\u{11A8}", "\u{AC01}"),
        ("\u{1100}\u{1161}", "\u{AC00}"),
        ("\u{AC00}\u{11A8}", "\u{AC01}"),
        ("\u{AC01}\u{11A8}", "\u{AC01}\u{11A8}"),
        ("\u{1100}\u{1161}\u{11A7}", "\u{AC00}\u{11A7}"),
        ("\u{AC00}\u{301}\u{11A8}", "\u{AC00}\u{301}\u{11A8}"),
        // Already composed text stays.
        ("\u{DC}n\u{EF}c\u{F6}d\u{E9} \u{6F22}\u{5B57} \u{3A9}mega", "\u{DC}n\u{EF}c\u{F6}d\u{E9} \u{6F22}\u{5B57} \u{3A9}mega"),
        ("\u{1E08}", "\u{1E08}"),
        // Singletons (Angstrom sign, Ohm sign, a CJK compatibility ideograph).
        ("\u{212B}", "\u{C5}"),
        ("\u{2126}", "\u{3A9}"),
        ("\u{F900}", "\u{8C48}"),
        ("A\u{30A}\u{212B}\u{C5}", "\u{C5}\u{C5}\u{C5}"),
        // Composition exclusions and a non-starter decomposition stay decomposed.
        ("\u{958}", "\u{915}\u{93C}"),
        ("\u{1D15E}", "\u{1D157}\u{1D165}"),
        ("\u{344}", "\u{308}\u{301}"),
        // Two starters composing (Kannada, Tamil), and outside the BMP (Kaithi).
        ("\u{CC6}\u{CC2}", "\u{CCA}"),
        ("\u{B92}\u{BD7}", "\u{B94}"),
        ("\u{11099}\u{110BA}", "\u{1109A}"),
    ];
    for (text, nfc) in cases {
        assert_eq!(nfc_of(&tok, text), nfc.as_bytes(), "{text:?}");
        assert_eq!(tok.decode(&tok.encode(text)), nfc);
    }
}

/// Every Unicode scalar value, alone in a row, each followed by two combining marks, and each
/// followed by a Hangul V and T jamo: FNV-1a 64 of the UTF-8 of the NFC, as Python computes it:
/// `s = "".join(chr(c) + tail for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)`, then
/// `unicodedata.normalize("NFC", s).encode()`, with tail "", "\u0302\u0323", "\u1161\u11A8".
#[test]
fn nfc_normalizer_all_scalars() {
    let tok = nfc_tokenizer("nfc-all");
    let fnv = |bytes: &[u8]| {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let cases = [
        ("", 4_382_370, 0xca00_b9f5_12de_bf24u64),
        ("\u{302}\u{323}", 8_830_846, 0xa0f7_ae1b_442d_1bfb),
        ("\u{1161}\u{11A8}", 11_054_644, 0x92d8_2e76_d036_b597),
    ];
    for (tail, len, hash) in cases {
        let text: String = (0..=0x10_FFFFu32)
            .filter_map(char::from_u32)
            .flat_map(|c| std::iter::once(c).chain(tail.chars()))
            .collect();
        let nfc = nfc_of(&tok, &text);
        assert_eq!((nfc.len(), fnv(&nfc)), (len, hash), "tail {tail:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Refusals

/// The stories260K fixture's tokenizer.json with `edit` applied, read back.
fn edited_fixture(name: &str, edit: impl Fn(&mut Json)) -> (PathBuf, rq_min::Result<Tokenizer>) {
    let mut json = Json::parse_file(&fixture_dir().join("tokenizer.json")).unwrap();
    edit(&mut json);
    let dir = temp_dir(name);
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_pretty(2)).unwrap();
    let result = Tokenizer::from_file(&path, None);
    (path, result)
}

#[test]
fn unsupported_parts_are_refused_by_name() {
    let model_type = |t: &str| {
        let t = t.to_string();
        move |j: &mut Json| j.get_mut("model").unwrap().set("type", str(&t))
    };
    let set = |key: &'static str, value: Json| move |j: &mut Json| j.set(key, value.clone());
    let split = |regex: &str| {
        obj([
            ("type", str("Split")),
            ("pattern", obj([("Regex", str(regex))])),
            ("behavior", str("Isolated")),
            ("invert", Json::Bool(false)),
        ])
    };
    type Edit = Box<dyn Fn(&mut Json)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "unigram",
            Box::new(model_type("Unigram")),
            "model type Unigram",
        ),
        (
            "nfkc",
            Box::new(set("normalizer", obj([("type", str("NFKC"))]))),
            "normalizer NFKC",
        ),
        (
            "whitespace",
            Box::new(set("pre_tokenizer", obj([("type", str("Whitespace"))]))),
            "pre_tokenizer Whitespace",
        ),
        (
            "regex",
            Box::new(set("pre_tokenizer", split(r"\w+|\d"))),
            r#"regex "\\w+|\\d""#,
        ),
        (
            "decoder",
            Box::new(set("decoder", obj([("type", str("WordPiece"))]))),
            "decoder WordPiece",
        ),
        (
            "bert",
            Box::new(set(
                "post_processor",
                obj([("type", str("BertProcessing"))]),
            )),
            "post_processor BertProcessing",
        ),
        (
            "merge",
            Box::new(|j: &mut Json| {
                let model = j.get_mut("model").unwrap();
                model.set("merges", Json::Arr(vec![str("▁ zz")]));
            }),
            r#"token "zz" is not in the vocab"#,
        ),
    ];
    for (name, edit, wanted) in cases {
        let (path, result) = edited_fixture(name, edit);
        match result {
            Err(Error::Tokenizer { file, msg }) => {
                assert_eq!(file, path);
                assert!(
                    msg.contains(wanted),
                    "{name}: {msg:?} does not say {wanted:?}"
                );
            }
            Err(e) => panic!("{name}: wrong error {e}"),
            Ok(_) => panic!("{name}: accepted"),
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
    match Tokenizer::from_dir(Path::new("/nonexistent/rq-min")) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("tokenizer.json")),
        other => panic!("missing file gave {:?}", other.err()),
    }
}

/// A Llama-class tokenizer.json whose normalizer or pre-tokenizer the `tokenizers` library would
/// refuse (unknown type, malformed regex) is refused, naming the step and the file, although
/// transformers 5 does not use them for LlamaTokenizer (hardening item 9).
#[test]
fn llama_class_tokenizer_with_an_invalid_normalizer_or_regex_is_refused() {
    let src = fixture_dir();
    let json = Json::parse_file(&src.join("tokenizer.json")).unwrap();
    let config = Json::parse_file(&src.join("tokenizer_config.json")).unwrap();
    let load = |edit: &dyn Fn(&mut Json)| {
        let mut j = json.clone();
        edit(&mut j);
        let path = src.join("tokenizer.json");
        Tokenizer::from_json(&j, &path, Some((&src.join("tokenizer_config.json"), &config)))
    };
    assert!(load(&|_| {}).is_ok());
    let parse = |s: &str| Json::parse(s.as_bytes(), "test").unwrap();
    let cases: [(&str, &str, &str); 4] = [
        ("normalizer", r#"{"type": "Bogus"}"#, "normalizer type \"Bogus\""),
        ("normalizer", r#"{"type": "Sequence", "normalizers": [{"type": "Replace", "pattern": {"Regex": "(("}, "content": ""}]}"#, "unclosed `(`"),
        ("pre_tokenizer", r#"{"type": "Split", "pattern": {"Regex": "*x"}, "behavior": "Isolated", "invert": false}"#, "nothing to repeat"),
        ("normalizer", r#"{"prepend": "x"}"#, "without a `type`"),
    ];
    for (key, value, why) in cases {
        let Err(err) = load(&|j: &mut Json| j.set(key, parse(value))) else { panic!("{key} {value}: accepted") };
        let err = err.to_string();
        assert!(err.contains(why) && err.contains("tokenizer.json"), "{key} {value}: {err}");
    }
}
