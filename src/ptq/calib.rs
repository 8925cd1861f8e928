//! Calibration samples: token-id rows from a text file, a .jsonl file, a JSON file of ids, or
//! the built-in text.
//!
//! Plain text is encoded whole (BOS first) and cut into consecutive rows of `seq` tokens,
//! which is how the reference `calib_ids.json` was made (reference/README.md). A .jsonl file
//! is one sample per line (its "text" field), each encoded on its own and truncated to `seq`,
//! as ModelOpt's dataset utilities do with a dataset's records.
//!
//! Files are read only as far as the rows need (`TEXT_BYTES_PER_TOKEN`, `size` .jsonl records),
//! so an endless input (`/dev/zero`, a pipe) stops instead of filling the memory.

use crate::error::{Error, Result};
use crate::io::json::Json;
use crate::tokenizer::Tokenizer;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The built-in calibration text: Rust language documentation (the Rust Reference), which is
/// dual-licensed MIT / Apache-2.0 like the Rust project. Used when no calibration input is given.
pub const DEFAULT_TEXT: &str = include_str!("calib/default_rustdocs.txt");

/// The built-in evaluation text (Rust documentation, MIT / Apache-2.0), the text of the
/// reference perplexities in reference/README.md.
pub const DEFAULT_EVAL_TEXT: &str = include_str!("calib/default_eval_rustdocs.txt");

/// Bytes of plain text read per token the rows need: BPE tokens of ordinary text are a few
/// bytes, so `size * seq * 16` bytes give every row, and a longer file is cut there.
pub const TEXT_BYTES_PER_TOKEN: usize = 16;

/// Plain text is read in chunks of this size, each checked for NUL bytes, so a binary or
/// endless input such as `/dev/zero` is refused after the first chunk.
const CHUNK: usize = 1 << 20;

/// The longest .jsonl line read (each record is truncated to `seq` tokens anyway).
const MAX_JSONL_LINE: usize = 64 << 20;

/// Where calibration ids come from.
pub enum Source<'a> {
    Text(&'a Path),
    Ids(&'a Path),
    Builtin,
}

/// Up to `size` rows of 2 to `seq` ids each (a row of ids from `Source::Ids` is used as given);
/// an error when there is none.
pub fn load(source: Source, tok: Option<&Tokenizer>, size: usize, seq: usize) -> Result<Vec<Vec<u32>>> {
    if size == 0 || seq < 2 {
        return Err(Error::Usage(format!("calibration needs --calib-size >= 1 and --calib-seq >= 2 (got {size}, {seq})")));
    }
    let need_tok = || {
        tok.ok_or_else(|| Error::Usage("calibration from text needs the model's tokenizer.json".into()))
    };
    let (rows, what) = match source {
        Source::Ids(path) => (ids_rows(path, size)?, format!("--calib-ids {}", path.display())),
        Source::Builtin => (chunk(&need_tok()?.encode(DEFAULT_TEXT), seq, size), "the built-in text".into()),
        Source::Text(path) => {
            let file = open_text(path)?;
            let rows = if path.extension().is_some_and(|e| e == "jsonl") {
                jsonl_rows(path, file, need_tok()?, size, seq)?
            } else {
                let limit = size.saturating_mul(seq).saturating_mul(TEXT_BYTES_PER_TOKEN);
                chunk(&need_tok()?.encode(&read_text_prefix(path, file, limit)?), seq, size)
            };
            let fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
            let note = if fifo { " (a FIFO, not a regular file: was anything written to it?)" } else { "" };
            (rows, format!("--calib-text {}{note}", path.display()))
        }
    };
    if rows.is_empty() {
        return Err(Error::Usage(format!("calibration input {what} gives no sample of at least 2 tokens")));
    }
    Ok(rows)
}

/// Consecutive rows of `seq` ids; a shorter tail row is dropped unless it is the only one,
/// and a row of fewer than 2 ids (nothing to predict) always.
fn chunk(ids: &[u32], seq: usize, size: usize) -> Vec<Vec<u32>> {
    let mut rows: Vec<Vec<u32>> = ids.chunks(seq).take(size).map(|c| c.to_vec()).collect();
    if rows.last().is_some_and(|r| r.len() < 2 || (rows.len() > 1 && r.len() < seq)) {
        rows.pop();
    }
    rows
}

/// Opens `--calib-text`: a regular file, or a stream (`/dev/stdin`, `<(zcat ...)`, a FIFO).
/// A FIFO is opened without waiting for a writer, so one nobody writes to reads as empty
/// instead of hanging.
fn open_text(path: &Path) -> Result<File> {
    let kind = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.file_type();
    if kind.is_dir() {
        return Err(Error::Usage(format!("--calib-text {}: is a folder, not a text file", path.display())));
    }
    if !kind.is_fifo() {
        return File::open(path).map_err(|e| Error::io(path, e));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    // Blocking reads from here on: a writer that is there is waited for.
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function owns, with valid flag arguments.
    let ok = unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) & !libc::O_NONBLOCK) } != -1;
    if !ok {
        return Err(Error::io(path, std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// The text of `file`, up to about `limit` bytes: reading stops there (or at the end), and a
/// cut text ends at its last line break. NUL bytes and invalid UTF-8 are refused with their
/// offset.
fn read_text_prefix(path: &Path, file: File, limit: usize) -> Result<String> {
    let mut buf = Vec::new();
    let mut reader = file.take(limit as u64);
    loop {
        let start = buf.len();
        let n = (&mut reader).take(CHUNK as u64).read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
        if let Some(at) = buf[start..].iter().position(|&b| b == 0) {
            return Err(Error::config(path, format!("NUL byte at byte {}: --calib-text must be a text file", start + at)));
        }
        if n == 0 {
            break;
        }
    }
    let cut = buf.len() == limit;
    if cut {
        if let Some(nl) = buf.iter().rposition(|&b| b == b'\n') {
            buf.truncate(nl + 1);
        }
    }
    match String::from_utf8(buf) {
        Ok(s) => Ok(s),
        // A character cut by the limit.
        Err(e) if cut && e.utf8_error().error_len().is_none() => {
            let n = e.utf8_error().valid_up_to();
            let mut b = e.into_bytes();
            b.truncate(n);
            Ok(String::from_utf8(b).expect("valid up to n"))
        }
        Err(e) => Err(Error::config(path, format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()))),
    }
}

/// Rows from the first records of a .jsonl file, read line by line until `size` rows.
fn jsonl_rows(path: &Path, file: File, tok: &Tokenizer, size: usize, seq: usize) -> Result<Vec<Vec<u32>>> {
    let mut reader = BufReader::new(file);
    let mut rows = Vec::new();
    let mut line = Vec::new();
    let mut n = 0;
    while rows.len() < size {
        line.clear();
        n += 1;
        let read = (&mut reader).take(MAX_JSONL_LINE as u64 + 1).read_until(b'\n', &mut line);
        if read.map_err(|e| Error::io(path, e))? == 0 {
            break;
        }
        if line.len() > MAX_JSONL_LINE {
            return Err(Error::config(path, format!("line {n} is longer than {} MiB", MAX_JSONL_LINE >> 20)));
        }
        if line.trim_ascii().is_empty() {
            continue;
        }
        let what = format!("{} line {n}", path.display());
        let rec = Json::parse(&line, &what)?;
        let t = rec.get("text").and_then(Json::as_str).ok_or_else(|| {
            Error::config(path, format!("line {n}: no string field \"text\""))
        })?;
        let mut ids = tok.encode(t);
        ids.truncate(seq);
        if ids.len() >= 2 {
            rows.push(ids);
        }
    }
    Ok(rows)
}

/// The first `size` rows of an ids file; a row of fewer than 2 ids is refused with its index
/// (an ids file is reproduced exactly, so nothing is dropped silently).
fn ids_rows(path: &Path, size: usize) -> Result<Vec<Vec<u32>>> {
    let mut rows = ids_file(path)?;
    rows.truncate(size);
    if let Some((r, row)) = rows.iter().enumerate().find(|(_, row)| row.len() < 2) {
        let msg = format!("--calib-ids row {r} has {} token(s); a calibration row needs at least 2", row.len());
        return Err(Error::config(path, msg));
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
