//! The pre-tokenization regexes of GPT-2, Llama-3 and Qwen2, written out as code (rq-min has no
//! regex engine). HF `tokenizers` runs them with Oniguruma (pre_tokenizers/byte_level.rs for
//! GPT-2, pre_tokenizers/split.rs for the `Split` of Llama-3 / Qwen2) in "Isolated" mode: every
//! match is a word and so is every stretch of text between matches. Each `match_*` function below
//! follows its pattern's alternatives in order, with the backtracking Oniguruma would do.
//!
//! Character classes: `\s` is `char::is_whitespace` (both are Unicode White_Space), `\p{N}` is
//! `char::is_numeric` (both are Nd + Nl + No), and `\p{L}` is `char::is_alphabetic` minus the
//! Alphabetic characters that are not letters (marks, letter numbers, circled letters), listed in
//! `ALPHABETIC_NOT_LETTER`.

/// The regexes recognised in a tokenizer.json, by their exact text.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum SplitPattern {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// The Llama-3 pattern; Qwen2's is the same with `\p{N}` instead of `\p{N}{1,3}`, so this
    /// holds the longest run of digits one word may have (3 or 1).
    Llama3 { max_digits: usize },
}

pub const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl SplitPattern {
    /// The pattern whose regex text is exactly `regex`, if it is one rq-min knows.
    pub(super) fn from_regex(regex: &str) -> Option<SplitPattern> {
        match regex {
            GPT2_REGEX => Some(SplitPattern::Gpt2),
            LLAMA3_REGEX => Some(SplitPattern::Llama3 { max_digits: 3 }),
            QWEN2_REGEX => Some(SplitPattern::Llama3 { max_digits: 1 }),
            _ => None,
        }
    }

    /// Cuts `text` into the matches of the pattern and the gaps between them (none are empty).
    pub(super) fn split(self, text: &str) -> Vec<&str> {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let cs: Vec<char> = chars.iter().map(|&(_, c)| c).collect();
        let byte_at = |i: usize| chars.get(i).map_or(text.len(), |&(b, _)| b);
        let mut words = Vec::new();
        let (mut i, mut gap_start) = (0, 0);
        while i < cs.len() {
            let n = match self {
                SplitPattern::Gpt2 => match_gpt2(&cs, i),
                SplitPattern::Llama3 { max_digits } => match_llama3(&cs, i, max_digits),
            };
            if n == 0 {
                i += 1;
                continue;
            }
            if gap_start < i {
                words.push(&text[byte_at(gap_start)..byte_at(i)]);
            }
            words.push(&text[byte_at(i)..byte_at(i + n)]);
            i += n;
            gap_start = i;
        }
        if gap_start < cs.len() {
            words.push(&text[byte_at(gap_start)..]);
        }
        words
    }
}

/// `\p{L}`: see the module comment.
pub(super) fn is_letter(c: char) -> bool {
    c.is_alphabetic()
        && ALPHABETIC_NOT_LETTER
            .binary_search_by(|&(lo, hi)| {
                if hi < c as u32 {
                    std::cmp::Ordering::Less
                } else if lo > c as u32 {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_err()
}

/// `[^\s\p{L}\p{N}]`
fn is_other(c: char) -> bool {
    !c.is_whitespace() && !is_letter(c) && !c.is_numeric()
}

fn is_newline(c: char) -> bool {
    c == '\r' || c == '\n'
}

/// How many characters from `cs[i]` on satisfy `class`.
fn run(cs: &[char], i: usize, class: impl Fn(char) -> bool) -> usize {
    cs.get(i..)
        .map_or(0, |rest| rest.iter().take_while(|&&c| class(c)).count())
}

/// `'s|'t|'re|'ve|'m|'ll|'d` at `cs[i]`, case-insensitively if `fold` (the `(?i:...)` of
/// Llama-3, where Unicode case folding also lets `ſ` match `s`): the length of the match.
fn contraction(cs: &[char], i: usize, fold: bool) -> usize {
    if cs.get(i) != Some(&'\'') {
        return 0;
    }
    let at = |k: usize| {
        let c = cs.get(i + k).copied().unwrap_or('\0');
        if !fold {
            c
        } else if c == 'ſ' {
            's'
        } else {
            c.to_ascii_lowercase()
        }
    };
    match (at(1), at(2)) {
        ('s' | 't' | 'm' | 'd', _) => 2,
        ('r', 'e') | ('v', 'e') | ('l', 'l') => 3,
        _ => 0,
    }
}

/// `\s+(?!\S)|\s+` at `cs[i]`: a run of whitespace, less its last character when a non-space
/// follows it and the run is longer than one (the look-ahead makes `\s+` give that one back).
fn whitespace(cs: &[char], i: usize) -> usize {
    let n = run(cs, i, char::is_whitespace);
    if n > 1 && i + n < cs.len() {
        n - 1
    } else {
        n
    }
}

/// `' '? class+` at `cs[i]`.
fn space_then(cs: &[char], i: usize, class: fn(char) -> bool) -> usize {
    if cs[i] == ' ' {
        let n = run(cs, i + 1, class);
        if n > 0 {
            return n + 1;
        }
    }
    run(cs, i, class)
}

/// Length in characters of the GPT-2 pattern's match at `cs[i]` (0: no match there).
fn match_gpt2(cs: &[char], i: usize) -> usize {
    let n = contraction(cs, i, false);
    if n > 0 {
        return n;
    }
    for class in [is_letter as fn(char) -> bool, char::is_numeric, is_other] {
        let n = space_then(cs, i, class);
        if n > 0 {
            return n;
        }
    }
    whitespace(cs, i)
}

/// Length in characters of the Llama-3 / Qwen2 pattern's match at `cs[i]` (0: no match there).
fn match_llama3(cs: &[char], i: usize, max_digits: usize) -> usize {
    let c = cs[i];
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    let n = contraction(cs, i, true);
    if n > 0 {
        return n;
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if !is_newline(c) && !is_letter(c) && !c.is_numeric() {
        let n = run(cs, i + 1, is_letter);
        if n > 0 {
            return n + 1;
        }
    }
    let n = run(cs, i, is_letter);
    if n > 0 {
        return n;
    }
    // \p{N}{1,3}  (Qwen2: \p{N})
    let n = run(cs, i, char::is_numeric).min(max_digits);
    if n > 0 {
        return n;
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    let n = space_then(cs, i, is_other);
    if n > 0 {
        return n + run(cs, i + n, is_newline);
    }
    // \s*[\r\n]+ : the whitespace run up to and including its last \r or \n.
    let n = run(cs, i, char::is_whitespace);
    if let Some(last) = cs[i..i + n].iter().rposition(|&c| is_newline(c)) {
        return last + 1;
    }
    whitespace(cs, i)
}

/// Characters that are Alphabetic but not in a letter category (Mn, Mc, Nl, So), as inclusive
/// code point ranges. Generated from Unicode 14 (Python's `unicodedata`) against Rust's
/// `char::is_alphabetic`; characters unassigned in Unicode 14 are left out (taken as letters).
#[rustfmt::skip]
const ALPHABETIC_NOT_LETTER: &[(u32, u32)] = &[
    (0x345, 0x345), (0x363, 0x36F), (0x5B0, 0x5BD), (0x5BF, 0x5BF), (0x5C1, 0x5C2), (0x5C4, 0x5C5),
    (0x5C7, 0x5C7), (0x610, 0x61A), (0x64B, 0x657), (0x659, 0x65F), (0x670, 0x670), (0x6D6, 0x6DC),
    (0x6E1, 0x6E4), (0x6E7, 0x6E8), (0x6ED, 0x6ED), (0x711, 0x711), (0x730, 0x73F), (0x7A6, 0x7B0),
    (0x816, 0x817), (0x81B, 0x823), (0x825, 0x827), (0x829, 0x82C), (0x8D4, 0x8DF), (0x8E3, 0x8E9),
    (0x8F0, 0x903), (0x93A, 0x93B), (0x93E, 0x94C), (0x94E, 0x94F), (0x955, 0x957), (0x962, 0x963),
    (0x981, 0x983), (0x9BE, 0x9C4), (0x9C7, 0x9C8), (0x9CB, 0x9CC), (0x9D7, 0x9D7), (0x9E2, 0x9E3),
    (0xA01, 0xA03), (0xA3E, 0xA42), (0xA47, 0xA48), (0xA4B, 0xA4C), (0xA51, 0xA51), (0xA70, 0xA71),
    (0xA75, 0xA75), (0xA81, 0xA83), (0xABE, 0xAC5), (0xAC7, 0xAC9), (0xACB, 0xACC), (0xAE2, 0xAE3),
    (0xAFA, 0xAFC), (0xB01, 0xB03), (0xB3E, 0xB44), (0xB47, 0xB48), (0xB4B, 0xB4C), (0xB56, 0xB57),
    (0xB62, 0xB63), (0xB82, 0xB82), (0xBBE, 0xBC2), (0xBC6, 0xBC8), (0xBCA, 0xBCC), (0xBD7, 0xBD7),
    (0xC00, 0xC04), (0xC3E, 0xC44), (0xC46, 0xC48), (0xC4A, 0xC4C), (0xC55, 0xC56), (0xC62, 0xC63),
    (0xC81, 0xC83), (0xCBE, 0xCC4), (0xCC6, 0xCC8), (0xCCA, 0xCCC), (0xCD5, 0xCD6), (0xCE2, 0xCE3),
    (0xD00, 0xD03), (0xD3E, 0xD44), (0xD46, 0xD48), (0xD4A, 0xD4C), (0xD57, 0xD57), (0xD62, 0xD63),
    (0xD81, 0xD83), (0xDCF, 0xDD4), (0xDD6, 0xDD6), (0xDD8, 0xDDF), (0xDF2, 0xDF3), (0xE31, 0xE31),
    (0xE34, 0xE3A), (0xE4D, 0xE4D), (0xEB1, 0xEB1), (0xEB4, 0xEB9), (0xEBB, 0xEBC), (0xECD, 0xECD),
    (0xF71, 0xF83), (0xF8D, 0xF97), (0xF99, 0xFBC), (0x102B, 0x1036), (0x1038, 0x1038),
    (0x103B, 0x103E), (0x1056, 0x1059), (0x105E, 0x1060), (0x1062, 0x1064), (0x1067, 0x106D),
    (0x1071, 0x1074), (0x1082, 0x108D), (0x108F, 0x108F), (0x109A, 0x109D), (0x16EE, 0x16F0),
    (0x1712, 0x1713), (0x1732, 0x1733), (0x1752, 0x1753), (0x1772, 0x1773), (0x17B6, 0x17C8),
    (0x1885, 0x1886), (0x18A9, 0x18A9), (0x1920, 0x192B), (0x1930, 0x1938), (0x1A17, 0x1A1B),
    (0x1A55, 0x1A5E), (0x1A61, 0x1A74), (0x1ABF, 0x1AC0), (0x1ACC, 0x1ACE), (0x1B00, 0x1B04),
    (0x1B35, 0x1B43), (0x1B80, 0x1B82), (0x1BA1, 0x1BA9), (0x1BAC, 0x1BAD), (0x1BE7, 0x1BF1),
    (0x1C24, 0x1C36), (0x1DD3, 0x1DF4), (0x2160, 0x2182), (0x2185, 0x2188), (0x24B6, 0x24E9),
    (0x2DE0, 0x2DFF), (0x3007, 0x3007), (0x3021, 0x3029), (0x3038, 0x303A), (0xA674, 0xA67B),
    (0xA69E, 0xA69F), (0xA6E6, 0xA6EF), (0xA802, 0xA802), (0xA80B, 0xA80B), (0xA823, 0xA827),
    (0xA880, 0xA881), (0xA8B4, 0xA8C3), (0xA8C5, 0xA8C5), (0xA8FF, 0xA8FF), (0xA926, 0xA92A),
    (0xA947, 0xA952), (0xA980, 0xA983), (0xA9B4, 0xA9BF), (0xA9E5, 0xA9E5), (0xAA29, 0xAA36),
    (0xAA43, 0xAA43), (0xAA4C, 0xAA4D), (0xAA7B, 0xAA7D), (0xAAB0, 0xAAB0), (0xAAB2, 0xAAB4),
    (0xAAB7, 0xAAB8), (0xAABE, 0xAABE), (0xAAEB, 0xAAEF), (0xAAF5, 0xAAF5), (0xABE3, 0xABEA),
    (0xFB1E, 0xFB1E), (0x10140, 0x10174), (0x10341, 0x10341), (0x1034A, 0x1034A),
    (0x10376, 0x1037A), (0x103D1, 0x103D5), (0x10A01, 0x10A03), (0x10A05, 0x10A06),
    (0x10A0C, 0x10A0F), (0x10D24, 0x10D27), (0x10EAB, 0x10EAC), (0x11000, 0x11002),
    (0x11038, 0x11045), (0x11073, 0x11074), (0x11080, 0x11082), (0x110B0, 0x110B8),
    (0x110C2, 0x110C2), (0x11100, 0x11102), (0x11127, 0x11132), (0x11145, 0x11146),
    (0x11180, 0x11182), (0x111B3, 0x111BF), (0x111CE, 0x111CF), (0x1122C, 0x11234),
    (0x11237, 0x11237), (0x1123E, 0x1123E), (0x112DF, 0x112E8), (0x11300, 0x11303),
    (0x1133E, 0x11344), (0x11347, 0x11348), (0x1134B, 0x1134C), (0x11357, 0x11357),
    (0x11362, 0x11363), (0x11435, 0x11441), (0x11443, 0x11445), (0x114B0, 0x114C1),
    (0x115AF, 0x115B5), (0x115B8, 0x115BE), (0x115DC, 0x115DD), (0x11630, 0x1163E),
    (0x11640, 0x11640), (0x116AB, 0x116B5), (0x1171D, 0x1172A), (0x1182C, 0x11838),
    (0x11930, 0x11935), (0x11937, 0x11938), (0x1193B, 0x1193C), (0x11940, 0x11940),
    (0x11942, 0x11942), (0x119D1, 0x119D7), (0x119DA, 0x119DF), (0x119E4, 0x119E4),
    (0x11A01, 0x11A0A), (0x11A35, 0x11A39), (0x11A3B, 0x11A3E), (0x11A51, 0x11A5B),
    (0x11A8A, 0x11A97), (0x11C2F, 0x11C36), (0x11C38, 0x11C3E), (0x11C92, 0x11CA7),
    (0x11CA9, 0x11CB6), (0x11D31, 0x11D36), (0x11D3A, 0x11D3A), (0x11D3C, 0x11D3D),
    (0x11D3F, 0x11D41), (0x11D43, 0x11D43), (0x11D47, 0x11D47), (0x11D8A, 0x11D8E),
    (0x11D90, 0x11D91), (0x11D93, 0x11D96), (0x11EF3, 0x11EF6), (0x12400, 0x1246E),
    (0x16F4F, 0x16F4F), (0x16F51, 0x16F87), (0x16F8F, 0x16F92), (0x16FF0, 0x16FF1),
    (0x1BC9E, 0x1BC9E), (0x1E000, 0x1E006), (0x1E008, 0x1E018), (0x1E01B, 0x1E021),
    (0x1E023, 0x1E024), (0x1E026, 0x1E02A), (0x1E947, 0x1E947), (0x1F130, 0x1F149),
    (0x1F150, 0x1F169), (0x1F170, 0x1F189),
];
