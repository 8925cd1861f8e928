#!/usr/bin/env python3
"""Writes src/tokenizer/nfc_tables.rs, the Unicode data rq-min's NFC normalizer needs, from
Python's `unicodedata` (its Unicode version is written into the file).

    python3 tools/gen_nfc.py > src/tokenizer/nfc_tables.rs

Tables (code points as u32, each sorted by its first column):
- DECOMPOSITIONS: (c, a, b) for every character with a canonical decomposition mapping c -> a b
  (b = 0 for a singleton c -> a); Hangul syllables are left out (they decompose algorithmically).
- NOT_RECOMPOSED: the two-character decompositions that NFC does not compose back (composition
  exclusions and non-starter decompositions), i.e. those c with NFC(c) != c.
- COMBINING_CLASSES: (first, last, class) ranges of characters with a non-zero canonical
  combining class.
"""
import unicodedata

def hangul(cp):
    return 0xAC00 <= cp <= 0xD7A3

decomp, not_recomposed, classes = [], [], []
for cp in range(0x110000):
    c = chr(cp)
    d = unicodedata.decomposition(c)
    if d and not d.startswith("<") and not hangul(cp):
        parts = [int(x, 16) for x in d.split()]
        assert len(parts) in (1, 2), (hex(cp), d)
        decomp.append((cp, parts[0], parts[1] if len(parts) == 2 else 0))
        if len(parts) == 2 and unicodedata.normalize("NFC", c) != c:
            not_recomposed.append(cp)
    ccc = unicodedata.combining(c)
    if ccc:
        if classes and classes[-1][1] == cp - 1 and classes[-1][2] == ccc:
            classes[-1][1] = cp
        else:
            classes.append([cp, cp, ccc])

def rows(items, per_line):
    lines = []
    for i in range(0, len(items), per_line):
        lines.append("    " + " ".join(items[i:i + per_line]))
    return "\n".join(lines)

print(f"""//! Unicode {unicodedata.unidata_version} data for NFC, written by tools/gen_nfc.py from Python's
//! `unicodedata`; do not edit by hand.

/// (c, a, b): the canonical decomposition of c is a b (b = 0: just a). Hangul syllables excluded.
#[rustfmt::skip]
pub(super) static DECOMPOSITIONS: [(u32, u32, u32); {len(decomp)}] = [
{rows([f"(0x{c:X},0x{a:X},0x{b:X})," for c, a, b in decomp], 5)}
];

/// The c of two-character DECOMPOSITIONS that NFC does not compose again.
#[rustfmt::skip]
pub(super) static NOT_RECOMPOSED: [u32; {len(not_recomposed)}] = [
{rows([f"0x{c:X}," for c in not_recomposed], 10)}
];

/// (first, last, class): the characters first..=last have canonical combining class `class`;
/// all others have class 0.
#[rustfmt::skip]
pub(super) static COMBINING_CLASSES: [(u32, u32, u8); {len(classes)}] = [
{rows([f"(0x{a:X},0x{b:X},{k})," for a, b, k in classes], 5)}
];""")
