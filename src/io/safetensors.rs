//! The safetensors format: a validating reader over mmap, Hugging Face checkpoint folders
//! (single file or sharded with `model.safetensors.index.json`) and a sharding writer.
//!
//! File layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON (an object of
//! `name -> {"dtype", "shape", "data_offsets"}` plus an optional `__metadata__` string map),
//! then the data section. Validation follows huggingface/safetensors' `tensor.rs`
//! (`read_metadata` + `Metadata::validate`, spec/anchors.md D.1): the header is capped at
//! 100 MB, every size is computed with checked arithmetic, and the tensors must tile the data
//! section exactly — contiguous, ascending, no gap, no overlap, nothing left over. Once a
//! header has passed `parse_header`, every view it yields is in bounds, so the accessors
//! below never index past the mapping.

use crate::error::{Error, Result};
use crate::io::json::{self, Json};
use crate::numerics::{bf16_to_f32, e4m3_to_f32, f16_to_f32};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Component, Path, PathBuf};

/// Largest header accepted, as `MAX_HEADER_SIZE` in the safetensors crate.
pub const MAX_HEADER_SIZE: usize = 100_000_000;

/// The key of the free-form string map in a header; never a tensor name.
const METADATA_KEY: &str = "__metadata__";

/// Index file of a sharded checkpoint.
const INDEX_FILE: &str = "model.safetensors.index.json";
/// The file of a single-file checkpoint.
const SINGLE_FILE: &str = "model.safetensors";

/// Element types rq-min reads and writes (the names are the safetensors header strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    F16,
    BF16,
    F32,
    F64,
    F8E4M3,
    F8E5M2,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::F64 => 8,
        }
    }

    /// The header spelling: "BF16", "F8_E4M3", "BOOL", ...
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::I64 => "I64",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
        }
    }

    /// Inverse of [`Dtype::name`]; None for any other string.
    pub fn from_name(s: &str) -> Option<Dtype> {
        const ALL: [Dtype; 14] = [
            Dtype::Bool,
            Dtype::U8,
            Dtype::I8,
            Dtype::I16,
            Dtype::U16,
            Dtype::I32,
            Dtype::U32,
            Dtype::I64,
            Dtype::F16,
            Dtype::BF16,
            Dtype::F32,
            Dtype::F64,
            Dtype::F8E4M3,
            Dtype::F8E5M2,
        ];
        ALL.into_iter().find(|d| d.name() == s)
    }
}

/// One header entry. `start..end` is relative to the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// A validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Sorted by start offset (ties, i.e. zero-size tensors, by end then name).
    pub tensors: Vec<TensorInfo>,
    /// `__metadata__` in file order.
    pub metadata: Vec<(String, String)>,
    /// Absolute offset of the data section in the file (8 + header length).
    pub data_start: usize,
}

/// Element count of `shape`, None on overflow. A 0-d shape holds one element.
fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Byte size of a tensor, None on overflow.
fn checked_nbytes(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    checked_numel(shape)?.checked_mul(dtype.size())
}

/// Validates a whole file image (see the module doc for the rules) and returns its header.
pub fn parse_header(bytes: &[u8], file: &Path) -> Result<Header> {
    let bad = |msg: String| Error::safetensors(file, msg);
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(bad(format!("file is {} bytes, too short for the 8-byte header length", bytes.len())));
    };
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(len8);
    let n = match usize::try_from(n) {
        Ok(n) if n <= MAX_HEADER_SIZE => n,
        _ => return Err(bad(format!("header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit"))),
    };
    let data_start = 8 + n; // n <= 100 MB: no overflow
    let Some(raw) = bytes.get(8..data_start) else {
        return Err(bad(format!("header length {n} runs past the end of the file ({} bytes)", bytes.len())));
    };
    let text = std::str::from_utf8(raw).map_err(|e| bad(format!("header is not valid UTF-8 ({e})")))?;
    if !text.starts_with('{') {
        return Err(bad("header does not start with '{'".to_string()));
    }
    let root = Json::parse(raw, "header").map_err(|e| bad(e.to_string()))?;
    let Some(entries) = root.as_object() else {
        return Err(bad("header is not a JSON object".to_string()));
    };
    // The JSON reader keeps the last of duplicate keys; look at the raw text for repeats.
    let keys = top_level_keys(raw);
    if keys.len() != entries.len() {
        let mut seen = HashSet::new();
        let dup = keys.iter().find(|k| !seen.insert(k.as_str())).map_or("?", |k| k.as_str());
        return Err(bad(format!("key {dup:?} appears more than once in the header")));
    }

    let mut metadata = Vec::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == METADATA_KEY {
            metadata = parse_metadata(value).map_err(bad)?;
        } else {
            let t = parse_entry(name, value).map_err(|msg| bad(format!("tensor {name:?}: {msg}")))?;
            tensors.push(t);
        }
    }

    tensors.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    let data_len = bytes.len() - data_start; // data_start <= bytes.len() checked above
    let mut pos = 0usize;
    for t in &tensors {
        if t.start != pos {
            let what = if t.start > pos { "leaves a gap after" } else { "overlaps" };
            return Err(bad(format!(
                "tensor {:?} data_offsets [{}, {}] {what} the previous tensor, which ends at {pos}",
                t.name, t.start, t.end
            )));
        }
        if t.end > data_len {
            return Err(bad(format!(
                "tensor {:?} data_offsets [{}, {}] run past the {data_len}-byte data section",
                t.name, t.start, t.end
            )));
        }
        pos = t.end;
    }
    if pos != data_len {
        return Err(bad(format!("tensors cover {pos} bytes but the data section holds {data_len} bytes")));
    }
    Ok(Header { tensors, metadata, data_start })
}

/// `__metadata__`: a string -> string map (null counts as absent, as in the safetensors crate).
fn parse_metadata(value: &Json) -> std::result::Result<Vec<(String, String)>, String> {
    if value.is_null() {
        return Ok(Vec::new());
    }
    let Some(pairs) = value.as_object() else {
        return Err(format!("{METADATA_KEY} is not an object"));
    };
    pairs
        .iter()
        .map(|(k, v)| match v.as_str() {
            Some(s) => Ok((k.clone(), s.to_string())),
            None => Err(format!("{METADATA_KEY} value of {k:?} is not a string")),
        })
        .collect()
}

/// A JSON value that must be a non-negative integer (floats are refused, as serde does).
fn json_usize(v: &Json) -> Option<usize> {
    match *v {
        Json::Int(i) => usize::try_from(i).ok(),
        _ => None,
    }
}

/// One tensor entry; errors are messages the caller prefixes with the file and tensor.
fn parse_entry(name: &str, value: &Json) -> std::result::Result<TensorInfo, String> {
    if value.as_object().is_none() {
        return Err("entry is not an object".to_string());
    }
    let dtype = match value.get("dtype") {
        Some(Json::Str(s)) => Dtype::from_name(s).ok_or_else(|| format!("unknown dtype {s:?}"))?,
        Some(_) => return Err("\"dtype\" is not a string".to_string()),
        None => return Err("no \"dtype\"".to_string()),
    };
    let Some(dims) = value.get("shape").and_then(Json::as_array) else {
        return Err("no \"shape\" array".to_string());
    };
    let shape = dims
        .iter()
        .map(json_usize)
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| "\"shape\" holds something other than non-negative integers".to_string())?;
    let offsets = value.get("data_offsets").and_then(Json::as_array);
    let (start, end) = match offsets {
        Some([a, b]) => match (json_usize(a), json_usize(b)) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err("\"data_offsets\" are not non-negative integers".to_string()),
        },
        _ => return Err("\"data_offsets\" is not an array of two integers".to_string()),
    };
    if end < start {
        return Err(format!("data_offsets [{start}, {end}] end before they start"));
    }
    let nbytes = checked_nbytes(dtype, &shape)
        .ok_or_else(|| format!("shape {shape:?} ({}) overflows the byte count", dtype.name()))?;
    if nbytes != end - start {
        return Err(format!(
            "shape {shape:?} ({}) needs {nbytes} bytes but data_offsets [{start}, {end}] hold {}",
            dtype.name(),
            end - start
        ));
    }
    Ok(TensorInfo { name: name.to_string(), dtype, shape, start, end })
}

/// The decoded top-level keys of a JSON object, in order and with repeats. `text` must already
/// have been accepted by `Json::parse` (so strings are terminated and keys well formed).
fn top_level_keys(text: &[u8]) -> Vec<String> {
    let mut keys = Vec::new();
    let mut depth = 0usize;
    let mut expect_key = false;
    let mut i = 0;
    while let Some(&c) = text.get(i) {
        match c {
            b'"' => {
                let mut j = i + 1;
                while let Some(&d) = text.get(j) {
                    match d {
                        b'\\' => j += 2,
                        b'"' => break,
                        _ => j += 1,
                    }
                }
                if depth == 1 && expect_key {
                    let key = text.get(i..=j).and_then(|s| Json::parse(s, "key").ok());
                    if let Some(Json::Str(k)) = key {
                        keys.push(k);
                    }
                    expect_key = false;
                }
                i = j;
            }
            b'{' => {
                depth += 1;
                expect_key = depth == 1;
            }
            b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' => expect_key = depth == 1,
            _ => {}
        }
        i += 1;
    }
    keys
}

/// One safetensors file, memory-mapped read-only and validated.
pub struct SafeTensors {
    path: PathBuf,
    mmap: Mmap,
    header: Header,
    index: HashMap<String, usize>,
}

impl SafeTensors {
    pub fn open(path: &Path) -> Result<SafeTensors> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only and private to this process. As with every mmap
        // reader (the safetensors crate's example included), another process truncating or
        // rewriting the file while it is mapped is outside what rq-min guards against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = parse_header(&mmap, path)?;
        let index = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(SafeTensors { path: path.to_path_buf(), mmap, header, index })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Header entries, sorted by offset.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn metadata(&self) -> &[(String, String)] {
        &self.header.metadata
    }

    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let t = self.header.tensors.get(*self.index.get(name)?)?;
        let start = self.header.data_start.checked_add(t.start)?;
        let end = self.header.data_start.checked_add(t.end)?;
        Some(TensorView { name: &t.name, dtype: t.dtype, shape: &t.shape, data: self.mmap.get(start..end)? })
    }

    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        self.get(name).ok_or_else(|| Error::tensor(name, format!("not found in {}", self.path.display())))
    }
}

impl std::fmt::Debug for SafeTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeTensors")
            .field("path", &self.path)
            .field("tensors", &self.header.tensors.len())
            .field("bytes", &self.mmap.len())
            .finish()
    }
}

/// A borrowed tensor: its bytes are a slice of the mapping (any alignment).
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// Element count (1 for a 0-d tensor; saturates on a hand-built view whose shape overflows).
    pub fn numel(&self) -> usize {
        checked_numel(self.shape).unwrap_or(usize::MAX)
    }

    /// The values as f32, for F32, BF16, F16 and F8_E4M3 (read byte-wise: no alignment needed).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let d = self.data;
        let v = match self.dtype {
            Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => d.chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            Dtype::F16 => d.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            Dtype::F8E4M3 => d.iter().map(|&c| e4m3_to_f32(c)).collect(),
            other => {
                return Err(Error::tensor(
                    self.name,
                    format!("dtype {} cannot be read as f32 (F32, BF16, F16, F8_E4M3 can)", other.name()),
                ))
            }
        };
        Ok(v)
    }

    /// The values as i64: I64, and every narrower integer dtype widened (BOOL as 0/1).
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let d = self.data;
        let v = match self.dtype {
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            Dtype::I32 => {
                d.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
            }
            Dtype::U32 => {
                d.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
            }
            Dtype::I16 => d.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as i64).collect(),
            Dtype::U16 => d.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as i64).collect(),
            Dtype::I8 => d.iter().map(|&c| c as i8 as i64).collect(),
            Dtype::U8 | Dtype::Bool => d.iter().map(|&c| c as i64).collect(),
            other => {
                return Err(Error::tensor(
                    self.name,
                    format!("dtype {} cannot be read as integers", other.name()),
                ))
            }
        };
        Ok(v)
    }

    pub fn expect_shape(&self, shape: &[usize]) -> Result<()> {
        if self.shape == shape {
            return Ok(());
        }
        Err(Error::tensor(
            self.name,
            format!("shape {:?} ({}) but expected {:?}", self.shape, self.dtype.name(), shape),
        ))
    }
}

/// A Hugging Face checkpoint folder: sharded (`model.safetensors.index.json`) or one
/// `model.safetensors`. Every shard is mapped once; names resolve through the index.
pub struct Checkpoint {
    dir: PathBuf,
    /// Sorted by file name.
    shards: Vec<SafeTensors>,
    /// Tensor name -> position in `shards`.
    index: BTreeMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("shards", &self.shards)
            .field("tensors", &self.index.len())
            .finish()
    }
}

/// The shards of a `model.safetensors.index.json` (`text`, read from `index_path` in `dir`):
/// shard file name -> (its path in `dir`, the tensor names the index puts in it). Checks that
/// `weight_map` is an object of strings naming plain files inside `dir`; the shards
/// themselves are not opened.
pub fn parse_index(text: &[u8], dir: &Path, index_path: &Path) -> Result<BTreeMap<String, (PathBuf, Vec<String>)>> {
    let root = Json::parse(text, &index_path.display().to_string())?;
    let Some(map) = root.get("weight_map").and_then(Json::as_object) else {
        return Err(Error::config(index_path, "no \"weight_map\" object"));
    };
    let mut files: BTreeMap<String, (PathBuf, Vec<String>)> = BTreeMap::new();
    for (name, file) in map {
        let Some(file) = file.as_str() else {
            return Err(Error::config(index_path, format!("weight_map entry {name:?} is not a string")));
        };
        let shard = match files.entry(file.to_string()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert((shard_path(dir, index_path, file)?, Vec::new())),
        };
        shard.1.push(name.clone());
    }
    Ok(files)
}

/// `file` from an index, joined to `dir`, refusing anything but plain relative components.
fn shard_path(dir: &Path, index_path: &Path, file: &str) -> Result<PathBuf> {
    let rel = Path::new(file);
    let plain = !file.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(Error::config(
            index_path,
            format!("shard {file:?} is not a file name inside the checkpoint folder"),
        ));
    }
    Ok(dir.join(rel))
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        if index_path.is_file() {
            Checkpoint::open_sharded(dir, &index_path)
        } else if single_path.is_file() {
            let st = SafeTensors::open(&single_path)?;
            let index = st.tensors().iter().map(|t| (t.name.clone(), 0)).collect();
            Ok(Checkpoint { dir: dir.to_path_buf(), shards: vec![st], index })
        } else {
            Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {INDEX_FILE} or {SINGLE_FILE} in this folder"),
                ),
            ))
        }
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Checkpoint> {
        let text = std::fs::read(index_path).map_err(|e| Error::io(index_path, e))?;
        let files = parse_index(&text, dir, index_path)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for (file, (path, names)) in &files {
            if !path.is_file() {
                return Err(Error::config(
                    index_path,
                    format!("shard {file} (holding {:?}) does not exist", names.first().map_or("", |n| n)),
                ));
            }
            let st = SafeTensors::open(path)?;
            for name in names {
                if st.get(name).is_none() {
                    return Err(Error::config(
                        index_path,
                        format!("tensor {name:?} is listed in the index but absent from shard {file}"),
                    ));
                }
                index.insert(name.to_string(), shards.len());
            }
            shards.push(st);
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, index })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.index.keys().map(String::as_str).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        self.shards.get(*self.index.get(name)?)?.get(name)
    }

    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        self.get(name)
            .ok_or_else(|| Error::tensor(name, format!("not found in checkpoint {}", self.dir.display())))
    }

    /// The shard files, sorted by name.
    pub fn shard_files(&self) -> Vec<&Path> {
        self.shards.iter().map(SafeTensors::path).collect()
    }

    /// `__metadata__` of the first shard (e.g. `{"format": "pt"}`).
    pub fn metadata(&self) -> Vec<(String, String)> {
        self.shards.first().map(|s| s.metadata().to_vec()).unwrap_or_default()
    }
}

/// Checks one tensor about to be written: the reserved name and the byte count.
fn check_entry(name: &str, dtype: Dtype, shape: &[usize], len: usize) -> Result<()> {
    if name == METADATA_KEY {
        return Err(Error::tensor(name, "this name is reserved for the header metadata"));
    }
    match checked_nbytes(dtype, shape) {
        Some(n) if n == len => Ok(()),
        Some(n) => Err(Error::tensor(
            name,
            format!("shape {shape:?} ({}) needs {n} bytes but {len} were given", dtype.name()),
        )),
        None => {
            Err(Error::tensor(name, format!("shape {shape:?} ({}) overflows the byte count", dtype.name())))
        }
    }
}

/// A usize as a JSON integer (every real size fits; the error names the file otherwise).
fn json_int(x: usize, path: &Path) -> Result<Json> {
    i64::try_from(x)
        .map(Json::Int)
        .map_err(|_| Error::safetensors(path, format!("value {x} does not fit a JSON integer")))
}

/// The start of a safetensors file whose data section holds `tensors` in the given order: the
/// 8-byte little-endian header length, then the compact JSON header (`__metadata__` first when
/// non-empty) padded with spaces to a multiple of 8. A streaming writer appends each tensor's
/// bytes after it, in the same order. Refuses the reserved name, a name or metadata key given
/// twice, a size that overflows and a header over `MAX_HEADER_SIZE`.
pub fn header_bytes(
    path: &Path,
    tensors: &[(&str, Dtype, &[usize])],
    metadata: &[(String, String)],
) -> Result<Vec<u8>> {
    let mut names = HashSet::new();
    for &(name, dtype, shape) in tensors {
        if name == METADATA_KEY {
            return Err(Error::tensor(name, "this name is reserved for the header metadata"));
        }
        if !names.insert(name) {
            return Err(Error::tensor(name, format!("written twice to {}", path.display())));
        }
        if checked_nbytes(dtype, shape).is_none() {
            return Err(Error::tensor(name, format!("shape {shape:?} ({}) overflows the byte count", dtype.name())));
        }
    }
    let mut seen = HashSet::new();
    if let Some((k, _)) = metadata.iter().find(|(k, _)| !seen.insert(k.as_str())) {
        return Err(Error::safetensors(path, format!("metadata key {k:?} given twice")));
    }

    let mut entries = Vec::with_capacity(tensors.len() + 1);
    if !metadata.is_empty() {
        let map = metadata.iter().map(|(k, v)| (k.clone(), Json::Str(v.clone()))).collect();
        entries.push((METADATA_KEY.to_string(), Json::Obj(map)));
    }
    let mut offset = 0usize;
    for &(name, dtype, shape) in tensors {
        let len = checked_nbytes(dtype, shape).unwrap_or(usize::MAX);
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::safetensors(path, "data section size overflows"))?;
        let dims = shape.iter().map(|&d| json_int(d, path)).collect::<Result<Vec<Json>>>()?;
        let info = json::obj([
            ("dtype", json::str(dtype.name())),
            ("shape", Json::Arr(dims)),
            ("data_offsets", Json::Arr(vec![json_int(offset, path)?, json_int(end, path)?])),
        ]);
        entries.push((name.to_string(), info));
        offset = end;
    }
    let mut header = Json::Obj(entries).to_compact().into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    if header.len() > MAX_HEADER_SIZE {
        return Err(Error::safetensors(
            path,
            format!("header of {} bytes exceeds the {MAX_HEADER_SIZE}-byte limit", header.len()),
        ));
    }
    let mut out = Vec::with_capacity(8 + header.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    Ok(out)
}

/// Writes one safetensors file: tensors in name order, header as `header_bytes` makes it.
/// `tensors` must already be checked with `check_entry`; duplicate names are refused.
fn write_tensors(
    path: &Path,
    tensors: &[(&str, Dtype, &[usize], &[u8])],
    metadata: &[(String, String)],
) -> Result<()> {
    let mut order: Vec<&(&str, Dtype, &[usize], &[u8])> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(b.0));
    let layout: Vec<(&str, Dtype, &[usize])> = order.iter().map(|&&(n, d, s, _)| (n, d, s)).collect();
    let header = header_bytes(path, &layout, metadata)?;

    let io = |e| Error::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&header).map_err(io)?;
    for (_, _, _, data) in order {
        w.write_all(data).map_err(io)?;
    }
    w.flush().map_err(io)
}

/// One-file convenience used by tests and small outputs.
pub fn write_file(
    path: &Path,
    tensors: &[(&str, Dtype, &[usize], &[u8])],
    metadata: &[(String, String)],
) -> Result<()> {
    for &(name, dtype, shape, data) in tensors {
        check_entry(name, dtype, shape, data.len())?;
    }
    write_tensors(path, tensors, metadata)
}

/// A tensor held by the writer until its shard is written.
struct Pending {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// A shard being written on the writer thread: its temporary path and tensor names.
type ShardWrite = std::thread::JoinHandle<Result<(PathBuf, Vec<String>)>>;

/// Streaming writer with size-based sharding. Tensors are buffered until adding the next one
/// would push the shard past `max_shard_bytes` (a larger tensor gets a shard of its own);
/// full shards go to temporary files, written by a thread while the caller goes on (one shard
/// at a time: at most two shards in memory), that `finish` renames to their Hugging Face names.
pub struct Writer {
    dir: PathBuf,
    max_shard_bytes: usize,
    metadata: Vec<(String, String)>,
    pending: Vec<Pending>,
    pending_bytes: usize,
    /// Shards already on disk: temporary path and tensor names.
    written: Vec<(PathBuf, Vec<String>)>,
    /// The shard the writer thread is writing.
    in_flight: Option<ShardWrite>,
    names: HashSet<String>,
    total_size: u64,
}

impl Writer {
    pub fn new(dir: &Path, max_shard_bytes: usize, metadata: Vec<(String, String)>) -> Writer {
        Writer {
            dir: dir.to_path_buf(),
            max_shard_bytes,
            metadata,
            pending: Vec::new(),
            pending_bytes: 0,
            written: Vec::new(),
            in_flight: None,
            names: HashSet::new(),
            total_size: 0,
        }
    }

    pub fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: Vec<u8>) -> Result<()> {
        check_entry(name, dtype, shape, data.len())?;
        if !self.names.insert(name.to_string()) {
            return Err(Error::tensor(
                name,
                format!("added twice to the checkpoint in {}", self.dir.display()),
            ));
        }
        let over = self.pending_bytes.saturating_add(data.len()) > self.max_shard_bytes;
        if !self.pending.is_empty() && over {
            self.flush_shard()?;
        }
        self.pending_bytes = self.pending_bytes.saturating_add(data.len());
        self.total_size = self.total_size.saturating_add(data.len() as u64);
        self.pending.push(Pending { name: name.to_string(), dtype, shape: shape.to_vec(), data });
        Ok(())
    }

    /// Hands the pending tensors to the writer thread as the next shard, under a temporary
    /// name, once the previous shard is on disk (its error, if any, is returned here).
    fn flush_shard(&mut self) -> Result<()> {
        self.wait()?;
        if self.written.is_empty() {
            std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        }
        let path = self.dir.join(format!("model-{:05}.safetensors.tmp", self.written.len() + 1));
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let metadata = self.metadata.clone();
        self.in_flight = Some(std::thread::spawn(move || {
            let refs: Vec<(&str, Dtype, &[usize], &[u8])> = pending
                .iter()
                .map(|p| (p.name.as_str(), p.dtype, p.shape.as_slice(), p.data.as_slice()))
                .collect();
            write_tensors(&path, &refs, &metadata)?;
            Ok((path, pending.into_iter().map(|p| p.name).collect()))
        }));
        Ok(())
    }

    /// Waits for the shard being written and records it.
    fn wait(&mut self) -> Result<()> {
        if let Some(h) = self.in_flight.take() {
            let panicked = || Error::io(&self.dir, std::io::Error::other("the shard writer thread panicked"));
            let shard = h.join().map_err(|_| panicked())??;
            self.written.push(shard);
        }
        Ok(())
    }

    /// Writes the last shard and gives the files their final names: `model.safetensors` for
    /// one shard, else `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.
    /// A leftover file of the other layout in the folder (an old index next to a new single
    /// file, or the reverse) is removed so `Checkpoint::open` reads what was just written.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        if !self.pending.is_empty() || (self.written.is_empty() && self.in_flight.is_none()) {
            self.flush_shard()?;
        }
        self.wait()?;
        let n = self.written.len();
        let rename = |from: &Path, to: &Path| std::fs::rename(from, to).map_err(|e| Error::io(to, e));
        let remove_stale = |path: PathBuf| match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&path, e)),
            _ => Ok(()),
        };
        if n == 1 {
            let to = self.dir.join(SINGLE_FILE);
            rename(&self.written[0].0, &to)?;
            remove_stale(self.dir.join(INDEX_FILE))?;
            return Ok(vec![to]);
        }
        let mut files = Vec::with_capacity(n + 1);
        let mut weight_map = BTreeMap::new();
        for (i, (tmp, names)) in self.written.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            let to = self.dir.join(&file);
            rename(tmp, &to)?;
            for name in names {
                weight_map.insert(name.as_str(), file.clone());
            }
            files.push(to);
        }
        remove_stale(self.dir.join(SINGLE_FILE))?;
        files.push(write_index(&self.dir, &weight_map, self.total_size)?);
        Ok(files)
    }
}

impl Drop for Writer {
    /// A writer dropped before `finish` (a failed run) waits for its thread, so nothing is
    /// written into the staging folder after it is removed.
    fn drop(&mut self) {
        if let Some(h) = self.in_flight.take() {
            let _ = h.join();
        }
    }
}

/// Writes `dir/model.safetensors.index.json`: `metadata.total_size` (the tensors' bytes) and
/// `weight_map` (tensor name -> shard file name, in name order). Returns its path.
pub fn write_index(dir: &Path, weight_map: &BTreeMap<&str, String>, total_size: u64) -> Result<PathBuf> {
    let total = i64::try_from(total_size).unwrap_or(i64::MAX);
    let index = json::obj([
        ("metadata", json::obj([("total_size", Json::Int(total))])),
        (
            "weight_map",
            Json::Obj(weight_map.iter().map(|(k, f)| (k.to_string(), Json::Str(f.clone()))).collect()),
        ),
    ]);
    let index_path = dir.join(INDEX_FILE);
    std::fs::write(&index_path, index.to_pretty(2) + "\n").map_err(|e| Error::io(&index_path, e))?;
    Ok(index_path)
}

/// Values in the model dtype's bytes (bf16 / f16 / f32).
pub fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    use crate::numerics::{f32_to_bf16, f32_to_f16};
    match dtype {
        Dtype::BF16 => values.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|&v| f32_to_f16(v).to_le_bytes()).collect(),
        _ => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
    }
}
