//! The BPE model of HF `tokenizers` (tokenizers/src/models/bpe/model.rs and word.rs): a word
//! starts as one symbol per character (or its `<0xNN>` byte tokens, or the unknown token), then
//! the pair with the best (lowest) merge rank is merged, leftmost first on ties, until no pair of
//! neighbours has a merge. Like HF's `Word::merge_all` this keeps the symbols in a linked list
//! and the candidate merges in a binary heap, so a word of n characters costs O(n log n): with
//! Llama's `split: false` a whole document is one word.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

pub(super) struct Bpe {
    pub vocab: HashMap<String, u32>,
    /// (left id, right id) -> (rank, id of the merged token).
    pub merges: HashMap<(u32, u32), (u32, u32)>,
    pub unk: Option<u32>,
    pub fuse_unk: bool,
    /// Ids of the `<0x00>` .. `<0xFF>` tokens when `byte_fallback` is on.
    pub byte_tokens: Option<Vec<Option<u32>>>,
    /// Llama-3: a word that is itself in the vocabulary is not merged (`ignore_merges`).
    pub ignore_merges: bool,
}

/// One symbol of a word being merged. `len` is its length in bytes of the word; 0 marks a symbol
/// merged into its left neighbour.
#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: usize,
    next: usize,
    len: usize,
}

const NONE: usize = usize::MAX;

impl Bpe {
    /// Appends the ids of `word` to `out`.
    pub fn tokenize(&self, word: &str, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges {
            if let Some(&id) = self.vocab.get(word) {
                out.push(id);
                return;
            }
        }
        let mut symbols = self.symbols(word);
        self.merge_all(&mut symbols);
        out.extend(symbols.iter().filter(|s| s.len > 0).map(|s| s.id));
    }

    /// The initial symbols, as `BPE::merge_word` makes them: a character in the vocabulary is a
    /// symbol; one that is not becomes its byte tokens if all of them exist, else the unknown
    /// token, consecutive unknowns fused into one when `fuse_unk`. (As in HF, byte tokens do not
    /// flush a pending unknown; only a known character does.) With neither, it is dropped.
    fn symbols(&self, word: &str) -> Vec<Symbol> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        let mut push = |id: u32, len: usize| {
            let i = symbols.len();
            let prev = if i == 0 { NONE } else { i - 1 };
            symbols.push(Symbol {
                id,
                prev,
                next: i + 1,
                len,
            });
        };
        let mut unk: Option<(u32, usize)> = None;
        for (i, c) in word.char_indices() {
            let s = &word[i..i + c.len_utf8()];
            if let Some(&id) = self.vocab.get(s) {
                if let Some((unk_id, unk_len)) = unk.take() {
                    push(unk_id, unk_len);
                }
                push(id, s.len());
                continue;
            }
            let bytes: Option<Vec<u32>> = self
                .byte_tokens
                .as_ref()
                .and_then(|table| s.bytes().map(|b| table[usize::from(b)]).collect());
            if let Some(bytes) = bytes {
                for id in bytes {
                    push(id, 1);
                }
                continue;
            }
            if let Some(unk_id) = self.unk {
                unk = match unk {
                    Some((id, len)) if self.fuse_unk => Some((id, len + s.len())),
                    Some((id, len)) => {
                        push(id, len);
                        Some((unk_id, s.len()))
                    }
                    None => Some((unk_id, s.len())),
                };
            }
        }
        if let Some((unk_id, unk_len)) = unk {
            push(unk_id, unk_len);
        }
        if let Some(last) = symbols.last_mut() {
            last.next = NONE;
        }
        symbols
    }

    /// `Word::merge_all` without dropout. Heap entries are (rank, position, new id), smallest
    /// first; an entry is stale when its symbol was merged away or the pair at its position no
    /// longer makes `new id` (HF compares the new id, not the rank, and so does this).
    fn merge_all(&self, symbols: &mut [Symbol]) {
        let mut heap = BinaryHeap::with_capacity(symbols.len());
        for (pos, pair) in symbols.windows(2).enumerate() {
            if let Some(&(rank, new_id)) = self.merges.get(&(pair[0].id, pair[1].id)) {
                heap.push(Reverse((rank, pos, new_id)));
            }
        }
        while let Some(Reverse((_, pos, new_id))) = heap.pop() {
            let cur = symbols[pos];
            if cur.len == 0 || cur.next == NONE {
                continue;
            }
            let right = symbols[cur.next];
            if self.merges.get(&(cur.id, right.id)).map(|m| m.1) != Some(new_id) {
                continue;
            }
            symbols[pos] = Symbol {
                id: new_id,
                len: cur.len + right.len,
                next: right.next,
                ..cur
            };
            symbols[cur.next].len = 0;
            if right.next != NONE {
                symbols[right.next].prev = pos;
                if let Some(&(rank, id)) = self.merges.get(&(new_id, symbols[right.next].id)) {
                    heap.push(Reverse((rank, pos, id)));
                }
            }
            if cur.prev != NONE {
                if let Some(&(rank, id)) = self.merges.get(&(symbols[cur.prev].id, new_id)) {
                    heap.push(Reverse((rank, cur.prev, id)));
                }
            }
        }
    }
}
