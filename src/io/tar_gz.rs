//! Gzip-compressed tar archives, written and read by hand (no tar / flate crates): NeMo's
//! `.qnemo` is a TensorRT-LLM checkpoint folder tarred with Python's `tarfile` in mode
//! `"w:gz"` under arcname `"./"` (spec/export-formats.md §5).
//!
//! Writing: POSIX ustar headers, gzip (RFC 1952) around deflate (RFC 1951) *stored* blocks,
//! which every gzip reader accepts (the checkpoint's weights barely compress anyway).
//! Reading: a full inflater (stored, fixed and dynamic Huffman blocks), so `.qnemo` files made
//! by NeMo (zlib-compressed) read back too; ustar, GNU long names and pax `path` records.

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::path::Path;

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), the checksum of the gzip trailer.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Continues a CRC-32 over `data` (start with 0).
pub fn crc32(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Largest payload of one stored deflate block.
const STORED_MAX: usize = 65_535;

/// A gzip stream of stored deflate blocks around `inner`.
pub struct GzWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
    crc: u32,
    size: u64,
}

impl<W: Write> GzWriter<W> {
    pub fn new(mut inner: W) -> std::io::Result<GzWriter<W>> {
        // ID1 ID2, CM = 8 (deflate), FLG = 0, MTIME = 0, XFL = 0, OS = 255 (unknown).
        inner.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])?;
        Ok(GzWriter { inner, buf: Vec::with_capacity(STORED_MAX), crc: 0, size: 0 })
    }

    fn block(&mut self, last: bool) -> std::io::Result<()> {
        let n = self.buf.len() as u16;
        // BFINAL bit, BTYPE = 00; the header byte keeps the stream byte-aligned.
        self.inner.write_all(&[last as u8])?;
        self.inner.write_all(&n.to_le_bytes())?;
        self.inner.write_all(&(!n).to_le_bytes())?;
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Ends the last block and writes the trailer (CRC-32, size mod 2^32); returns `inner`.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.block(true)?;
        self.inner.write_all(&self.crc.to_le_bytes())?;
        self.inner.write_all(&(self.size as u32).to_le_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for GzWriter<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(STORED_MAX - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.crc = crc32(self.crc, &data[..n]);
        self.size += n as u64;
        if self.buf.len() == STORED_MAX {
            self.block(false)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const BLOCK: usize = 512;

/// A ustar header: `name` (< 100 bytes), mode, size, type flag ('0' file, '5' directory).
fn ustar_header(name: &str, size: u64, dir: bool) -> std::io::Result<[u8; BLOCK]> {
    let mut h = [0u8; BLOCK];
    if name.len() >= 100 {
        return Err(std::io::Error::other(format!("tar member name {name} is longer than 99 bytes")));
    }
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |h: &mut [u8], at: usize, width: usize, v: u64| {
        let s = format!("{v:0w$o}", w = width - 1);
        h[at..at + width - 1].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, if dir { 0o755 } else { 0o644 });
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    if size < 8u64.pow(11) {
        octal(&mut h, 124, 12, size);
    } else {
        // GNU base-256 for sizes of 8 GiB and more (Python's tarfile and GNU tar read it).
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    octal(&mut h, 136, 12, 0);
    h[156] = if dir { b'5' } else { b'0' };
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // Checksum: the byte sum with the checksum field as spaces; six octal digits, NUL, space.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

/// Writes `dir`'s plain files as a `.tar.gz` at `out` the way `tarfile.add(dir, arcname="./")`
/// does: a `./` directory member, then `./<name>` for each file in sorted order. The archive
/// goes to a new temporary file beside the target (`tmp::temp_file_beside`) that is published
/// onto it at the end (`Target::publish`: never over an entry that appeared meanwhile).
pub fn write_tar_gz(dir: &Path, target: &crate::io::tmp::Target) -> Result<()> {
    let out = target.path();
    let mut names: Vec<String> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        if e.file_type().map_err(|err| Error::io(e.path(), err))?.is_file() {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    // O_CREAT | O_EXCL | O_NOFOLLOW under a random name: a planted file or symlink is never written through.
    let (tmp, file) = crate::io::tmp::temp_file_beside(out, "tmp").map_err(|e| Error::io(crate::io::tmp::parent_of(out), e))?;
    let result = (|| -> std::io::Result<()> {
        let file = std::io::BufWriter::new(file);
        let mut gz = GzWriter::new(file)?;
        gz.write_all(&ustar_header("./", 0, true)?)?;
        for n in &names {
            let path = dir.join(n);
            let size = std::fs::metadata(&path)?.len();
            gz.write_all(&ustar_header(&format!("./{n}"), size, false)?)?;
            let copied = std::io::copy(&mut std::fs::File::open(&path)?.take(size), &mut gz)?;
            if copied != size {
                return Err(std::io::Error::other(format!("{} changed size while archiving", path.display())));
            }
            gz.write_all(&vec![0u8; (BLOCK - (size as usize % BLOCK)) % BLOCK])?;
        }
        gz.write_all(&[0u8; 2 * BLOCK])?; // end-of-archive marker
        gz.finish()?.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(out, e));
    }
    target.publish(&tmp).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// A regular-file member of an archive.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// As stored (e.g. `./config.json`).
    pub name: String,
    pub data: Vec<u8>,
}

/// The regular files of a `.tar.gz` (directories are skipped). `file` names errors.
pub fn read_tar_gz(bytes: &[u8], file: &Path) -> Result<Vec<Member>> {
    let tar = gunzip(bytes).map_err(|m| Error::config(file, m))?;
    read_tar(&tar).map_err(|m| Error::config(file, m))
}

fn octal_field(f: &[u8]) -> std::result::Result<u64, String> {
    if f.first().is_some_and(|b| b & 0x80 != 0) {
        return Ok(f[1..].iter().fold(0u64, |v, &b| (v << 8) | b as u64)); // base-256
    }
    let s: String = f.iter().take_while(|&&b| b != 0 && b != b' ').map(|&b| b as char).collect();
    let s = s.trim_start();
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|_| format!("bad octal field {s:?}"))
}

fn cstr(f: &[u8]) -> String {
    String::from_utf8_lossy(&f[..f.iter().position(|&b| b == 0).unwrap_or(f.len())]).into_owned()
}

/// Refuses a member name that could land outside the folder it is extracted to: an absolute
/// path or one with a `..` component.
fn check_member_name(name: &str, at: usize) -> std::result::Result<(), String> {
    if name.starts_with('/') || name.split('/').any(|c| c == "..") {
        return Err(format!("refusing tar member {name:?} at byte {at}: absolute path or '..' component"));
    }
    Ok(())
}

/// Members of an uncompressed tar stream: regular files are returned, directories and pax /
/// GNU long-name records are understood, and anything else (hard or symbolic links, devices,
/// FIFOs, unknown types) is refused, as are names with `..` or a leading `/`.
pub fn read_tar(tar: &[u8]) -> std::result::Result<Vec<Member>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut long_name: Option<String> = None;
    while at + BLOCK <= tar.len() {
        let h = &tar[at..at + BLOCK];
        if h.iter().all(|&b| b == 0) {
            return Ok(out);
        }
        let corrupt = |what: &str| format!("corrupt tar header at byte {at}: {what}");
        let sum: u32 = h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { b' ' as u32 } else { b as u32 }).sum();
        if octal_field(&h[148..156]).map_err(|m| corrupt(&format!("checksum: {m}")))? != sum as u64 {
            return Err(corrupt("checksum mismatch"));
        }
        let size = octal_field(&h[124..136]).map_err(|m| corrupt(&format!("size: {m}")))?;
        let start = at + BLOCK;
        let end = usize::try_from(size)
            .ok()
            .and_then(|s| start.checked_add(s))
            .filter(|&e| e <= tar.len())
            .ok_or(format!("truncated tar: member at byte {at} ({size} bytes) runs past the end"))?;
        let data = &tar[start..end];
        let mut name = cstr(&h[..100]);
        if &h[257..262] == b"ustar" && h[345] != 0 {
            name = format!("{}/{name}", cstr(&h[345..500]));
        }
        match h[156] {
            b'L' => long_name = Some(cstr(data)),
            b'x' => {
                // pax records "LEN key=value\n"; only `path` matters here.
                let text = String::from_utf8_lossy(data);
                for rec in text.split('\n') {
                    if let Some(p) = rec.split_once(' ').and_then(|(_, kv)| kv.strip_prefix("path=")) {
                        long_name = Some(p.to_string());
                    }
                }
            }
            b'0' | b'7' | 0 => {
                let name = long_name.take().unwrap_or(name);
                check_member_name(&name, at)?;
                out.push(Member { name, data: data.to_vec() });
            }
            b'5' => check_member_name(&long_name.take().unwrap_or(name), at)?,
            b'g' => long_name = None, // global pax header
            t => {
                let kind = match t {
                    b'1' => "a hard link",
                    b'2' => "a symbolic link",
                    b'3' | b'4' => "a device",
                    b'6' => "a FIFO",
                    _ => "of an unsupported type",
                };
                return Err(format!("refusing tar member {:?} at byte {at}: it is {kind}", long_name.unwrap_or(name)));
            }
        }
        at = end + (BLOCK - (end - start) % BLOCK) % BLOCK;
    }
    Err("truncated tar: no end-of-archive marker".into())
}

/// DEFLATE's largest expansion: 258 bytes from one length/distance pair of about 2 bits,
/// i.e. about 1032 output bytes per input byte (zlib's "1032:1").
const DEFLATE_MAX_RATIO: usize = 1032;

/// The most output a gzip stream of `input_len` bytes whose trailer declares `isize` (the size
/// mod 2^32) may decompress to: the largest length below DEFLATE's hard cap (1032 x input +
/// 1 MiB) that is congruent to `isize`, so a bomb is stopped at its declared size and a lying
/// trailer cannot raise the cap. None when even `isize` is above the cap.
fn output_limit(input_len: usize, isize: u32) -> Option<usize> {
    let cap = input_len.saturating_mul(DEFLATE_MAX_RATIO).saturating_add(1 << 20);
    let isize = isize as usize;
    cap.checked_sub(isize).map(|room| isize + room / (1 << 32) * (1 << 32))
}

/// The decompressed content of a gzip stream (one member), checked against its CRC-32 and size.
/// The output is bounded by `output_limit` (the trailer's ISIZE, read from the last 4 bytes,
/// and 1032 x the input), so a gzip bomb fails without allocating. Errors start with
/// "truncated gzip" or "corrupt gzip".
pub fn gunzip(b: &[u8]) -> std::result::Result<Vec<u8>, String> {
    if b.len() < 2 || b[..2] != [0x1f, 0x8b] {
        return Err("corrupt gzip: bad magic (not a gzip stream)".into());
    }
    if b.len() < 18 {
        return Err(format!("truncated gzip: {} bytes, less than a header and trailer", b.len()));
    }
    if b[2] != 8 {
        return Err(format!("corrupt gzip: compression method {} is not deflate", b[2]));
    }
    let flg = b[3];
    let mut at = 10;
    let past = |at: usize| if at > b.len() { Err("truncated gzip: header ends early".to_string()) } else { Ok(at) };
    if flg & 4 != 0 {
        at = past(at + 2)?;
        at = past(at + u16::from_le_bytes([b[at - 2], b[at - 1]]) as usize)?;
    }
    for bit in [8u8, 16] {
        if flg & bit != 0 {
            at += b.get(at..).and_then(|r| r.iter().position(|&c| c == 0)).ok_or("truncated gzip: header ends early")? + 1;
        }
    }
    if flg & 2 != 0 {
        at = past(at + 2)?;
    }
    let declared = u32::from_le_bytes(b[b.len() - 4..].try_into().unwrap_or_default());
    let limit = output_limit(b.len(), declared).ok_or(format!(
        "truncated or corrupt gzip: its last 4 bytes (the declared size) say {declared} bytes, more than {DEFLATE_MAX_RATIO} x the {} compressed bytes can hold",
        b.len()
    ))?;
    let (data, used) = inflate(&b[at..], limit).map_err(|m| match m {
        m if m.starts_with("truncated") => m,
        m if m.starts_with(TOO_BIG) => format!(
            "truncated or corrupt gzip: it {m}, the size its last 4 bytes declare ({declared} mod 2^32): the file is cut short or a gzip bomb"
        ),
        m => format!("corrupt gzip: {m}"),
    })?;
    let t = at + used;
    let trailer = b.get(t..t + 8).ok_or("truncated gzip: no trailer")?;
    let crc = u32::from_le_bytes(trailer[..4].try_into().unwrap_or_default());
    let size = u32::from_le_bytes(trailer[4..].try_into().unwrap_or_default());
    if crc != crc32(0, &data) {
        return Err("corrupt gzip: CRC-32 mismatch".into());
    }
    if size != data.len() as u32 {
        return Err("corrupt gzip: size mismatch".into());
    }
    Ok(data)
}

struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    n: u32,
}

impl Bits<'_> {
    fn bits(&mut self, need: u32) -> std::result::Result<u32, String> {
        while self.n < need {
            let byte = *self.data.get(self.pos).ok_or("truncated gzip: deflate stream ends early")?;
            self.acc |= (byte as u64) << self.n;
            self.pos += 1;
            self.n += 8;
        }
        let v = (self.acc & ((1u64 << need) - 1)) as u32;
        self.acc >>= need;
        self.n -= need;
        Ok(v)
    }
    fn align(&mut self) {
        self.acc = 0;
        self.n = 0;
    }
}

/// A canonical Huffman code: codes per length, symbols ordered by code.
struct Huffman {
    count: [u16; 16],
    symbol: Vec<u16>,
}

impl Huffman {
    fn new(lengths: &[u8]) -> Huffman {
        let mut count = [0u16; 16];
        lengths.iter().for_each(|&l| count[l as usize] += 1);
        count[0] = 0;
        let mut offs = [0u16; 16];
        for l in 1..15 {
            offs[l + 1] = offs[l] + count[l];
        }
        let mut symbol = vec![0u16; lengths.len()];
        for (s, &l) in lengths.iter().enumerate() {
            if l != 0 {
                symbol[offs[l as usize] as usize] = s as u16;
                offs[l as usize] += 1;
            }
        }
        Huffman { count, symbol }
    }
    fn decode(&self, b: &mut Bits) -> std::result::Result<u16, String> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16 {
            code |= b.bits(1)? as i32;
            let count = self.count[len] as i32;
            if code - count < first {
                return self.symbol.get((index + code - first) as usize).copied().ok_or("bad Huffman code".into());
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        Err("bad Huffman code".into())
    }
}

const LEN_BASE: [u16; 29] = [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258];
const LEN_EXTRA: [u8; 29] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145,
    8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13];
/// Order of the code-length code lengths in a dynamic block header.
const CL_ORDER: [usize; 19] = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];

/// Raw deflate (RFC 1951): the output and the number of input bytes used. Fails (without
/// growing the output further) once the output would pass `limit` bytes.
pub fn inflate(data: &[u8], limit: usize) -> std::result::Result<(Vec<u8>, usize), String> {
    let mut b = Bits { data, pos: 0, acc: 0, n: 0 };
    let mut out: Vec<u8> = Vec::new();
    loop {
        let last = b.bits(1)? == 1;
        match b.bits(2)? {
            0 => {
                b.align();
                let h = data.get(b.pos..b.pos + 4).ok_or("truncated gzip: stored block header ends early")?;
                let len = u16::from_le_bytes([h[0], h[1]]);
                if len != !u16::from_le_bytes([h[2], h[3]]) {
                    return Err("stored block length check fails".into());
                }
                let s = b.pos + 4;
                check_room(&out, len as usize, limit)?;
                out.extend_from_slice(data.get(s..s + len as usize).ok_or("truncated gzip: stored block ends early")?);
                b.pos = s + len as usize;
            }
            1 => {
                let mut l = [8u8; 288];
                l[144..256].fill(9);
                l[256..280].fill(7);
                codes(&mut b, &mut out, limit, &Huffman::new(&l), &Huffman::new(&[5u8; 30]))?;
            }
            2 => {
                let nlen = b.bits(5)? as usize + 257;
                let ndist = b.bits(5)? as usize + 1;
                let ncode = b.bits(4)? as usize + 4;
                let mut cl = [0u8; 19];
                for &i in &CL_ORDER[..ncode] {
                    cl[i] = b.bits(3)? as u8;
                }
                let clh = Huffman::new(&cl);
                let mut lengths = vec![0u8; nlen + ndist];
                let mut i = 0;
                while i < nlen + ndist {
                    let sym = clh.decode(&mut b)?;
                    let (value, repeat) = match sym {
                        0..=15 => (sym as u8, 1),
                        16 => (*lengths.get(i.wrapping_sub(1)).ok_or("repeat with no previous length")?, 3 + b.bits(2)?),
                        17 => (0, 3 + b.bits(3)?),
                        _ => (0, 11 + b.bits(7)?),
                    };
                    for _ in 0..repeat {
                        *lengths.get_mut(i).ok_or("code lengths overflow")? = value;
                        i += 1;
                    }
                }
                codes(&mut b, &mut out, limit, &Huffman::new(&lengths[..nlen]), &Huffman::new(&lengths[nlen..]))?;
            }
            _ => return Err("invalid block type 3".into()),
        }
        if last {
            return Ok((out, b.pos));
        }
    }
}

/// Start of the error of an inflate that reached its output limit.
const TOO_BIG: &str = "decompresses to more than";

/// Fails when `more` bytes added to `out` would pass `limit`.
fn check_room(out: &[u8], more: usize, limit: usize) -> std::result::Result<(), String> {
    if out.len() + more > limit {
        return Err(format!("{TOO_BIG} {limit} bytes"));
    }
    Ok(())
}

/// Decodes one Huffman-coded block into `out` (at most `limit` bytes in all).
fn codes(b: &mut Bits, out: &mut Vec<u8>, limit: usize, lit: &Huffman, dist: &Huffman) -> std::result::Result<(), String> {
    loop {
        let sym = lit.decode(b)? as usize;
        match sym {
            0..=255 => {
                check_room(out, 1, limit)?;
                out.push(sym as u8)
            }
            256 => return Ok(()),
            _ => {
                let i = sym - 257;
                let len = *LEN_BASE.get(i).ok_or("bad length symbol")? as usize + b.bits(LEN_EXTRA[i] as u32)? as usize;
                let d = dist.decode(b)? as usize;
                let back = *DIST_BASE.get(d).ok_or("bad distance symbol")? as usize + b.bits(DIST_EXTRA[d] as u32)? as usize;
                if back > out.len() {
                    return Err("distance before the start".into());
                }
                check_room(out, len, limit)?;
                let from = out.len() - back;
                for k in 0..len {
                    out.push(out[from + k]);
                }
            }
        }
    }
}
