//! Calibration samples: token-id rows from a text file, a .jsonl file, a JSON file of ids, or
//! the built-in text.
//!
//! Plain text is encoded whole (BOS first) and cut into consecutive rows of `seq` tokens,
//! which is how the reference `calib_ids.json` was made (reference/README.md). A .jsonl file
//! is one sample per line (its "text" field), each encoded on its own and truncated to `seq`,
//! as ModelOpt's dataset utilities do with a dataset's records.

use crate::error::{Error, Result};
use crate::io::json::Json;
use crate::tokenizer::Tokenizer;
use std::path::Path;

/// The built-in calibration text: Rust language documentation (the Rust Reference), which is
/// dual-licensed MIT / Apache-2.0 like the Rust project. Used when no calibration input is given.
pub const DEFAULT_TEXT: &str = include_str!("calib/default_rustdocs.txt");

/// The built-in evaluation text (Rust documentation, MIT / Apache-2.0), the text of the
/// reference perplexities in reference/README.md.
pub const DEFAULT_EVAL_TEXT: &str = include_str!("calib/default_eval_rustdocs.txt");

/// Where calibration ids come from.
pub enum Source<'a> {
    Text(&'a Path),
    Ids(&'a Path),
    Builtin,
}

/// Up to `size` rows of at most `seq` ids each.
pub fn load(source: Source, tok: Option<&Tokenizer>, size: usize, seq: usize) -> Result<Vec<Vec<u32>>> {
    if size == 0 || seq < 2 {
        return Err(Error::Usage(format!("calibration needs --calib-size >= 1 and --calib-seq >= 2 (got {size}, {seq})")));
    }
    let need_tok = || {
        tok.ok_or_else(|| Error::Usage("calibration from text needs the model's tokenizer.json".into()))
    };
    let rows = match source {
        Source::Ids(path) => ids_file(path)?.into_iter().take(size).collect(),
        Source::Builtin => chunk(&need_tok()?.encode(DEFAULT_TEXT), seq, size),
        Source::Text(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            if path.extension().is_some_and(|e| e == "jsonl") {
                jsonl_rows(path, &text, need_tok()?, size, seq)?
            } else {
                chunk(&need_tok()?.encode(&text), seq, size)
            }
        }
    };
    if rows.is_empty() {
        return Err(Error::Usage("calibration input holds no tokens".into()));
    }
    Ok(rows)
}

/// Consecutive rows of `seq` ids; a shorter tail row is dropped unless it is the only one.
fn chunk(ids: &[u32], seq: usize, size: usize) -> Vec<Vec<u32>> {
    let mut rows: Vec<Vec<u32>> = ids.chunks(seq).take(size).map(|c| c.to_vec()).collect();
    if rows.len() > 1 && rows.last().is_some_and(|r| r.len() < seq) {
        rows.pop();
    }
    rows
}

fn jsonl_rows(path: &Path, text: &str, tok: &Tokenizer, size: usize, seq: usize) -> Result<Vec<Vec<u32>>> {
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let what = format!("{} line {}", path.display(), n + 1);
        let rec = Json::parse(line.as_bytes(), &what)?;
        let t = rec.get("text").and_then(Json::as_str).ok_or_else(|| {
            Error::config(path, format!("line {}: no string field \"text\"", n + 1))
        })?;
        let mut ids = tok.encode(t);
        ids.truncate(seq);
        if ids.len() >= 2 {
            rows.push(ids);
        }
        if rows.len() == size {
            break;
        }
    }
    Ok(rows)
}

/// A JSON array of arrays of token ids (the reference `calib_ids.json` format).
pub fn ids_file(path: &Path) -> Result<Vec<Vec<u32>>> {
    let j = Json::parse_file(path)?;
    let bad = |msg: String| Error::config(path, msg);
    let rows = j.as_array().ok_or_else(|| bad("expected a JSON array of arrays of token ids".into()))?;
    rows.iter()
        .enumerate()
        .map(|(r, row)| {
            let row = row.as_array().ok_or_else(|| bad(format!("row {r} is not an array")))?;
            row.iter()
                .enumerate()
                .map(|(c, v)| {
                    v.as_i64()
                        .and_then(|i| u32::try_from(i).ok())
                        .ok_or_else(|| bad(format!("row {r} item {c} is not a token id")))
                })
                .collect()
        })
        .collect()
}
