//! A deterministic mutation fuzzer over the parsers of untrusted input (issue 12): JSON,
//! safetensors header, safetensors index, tokenizer.json (+ tokenizer_config.json),
//! config.json and `.qnemo` (gzip + tar). Seeds are the fixtures plus small files made with
//! rq-min's own writers; mutations (seeded xorshift) are bit flips, byte sets, truncation,
//! splices between seeds, chunk deletion / duplication, and big numbers written over numeric
//! text or binary length fields. Each run is wrapped in `catch_unwind`; a counting global
//! allocator flags any single allocation, or live total, above 1 GiB.
//!
//! `fuzz_short` (normal test suite): a fixed number of runs, about 20 s in release.
//! `fuzz_long` (`tools/fuzz`, `--ignored`): RQ_MIN_FUZZ_EXECS runs (default 1,000,000) and the
//! table parser | executions | panics | over-cap allocations | peak bytes.

mod common;

use common::Rng;
use rq_min::model::config::ModelConfig;
use rq_min::io::json::Json;
use rq_min::tokenizer::Tokenizer;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

// ---- allocation accounting ----

/// Largest single allocation, and largest growth of the live total during one run, allowed.
const ALLOC_CAP: usize = 1 << 30;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static OVER_CAP: AtomicUsize = AtomicUsize::new(0);

/// `System`, counting live bytes and their peak. A request above `ALLOC_CAP` is counted and
/// refused (null), so `try_reserve` paths fail cleanly and anything else aborts loudly.
struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > ALLOC_CAP {
            OVER_CAP.fetch_add(1, Relaxed);
            return std::ptr::null_mut();
        }
        let live = LIVE.fetch_add(l.size(), Relaxed) + l.size();
        PEAK.fetch_max(live, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > ALLOC_CAP {
            OVER_CAP.fetch_add(1, Relaxed);
            return std::ptr::null_mut();
        }
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            let live = LIVE.fetch_add(new, Relaxed) + new - l.size();
            LIVE.fetch_sub(l.size(), Relaxed);
            PEAK.fetch_max(live, Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counters are process-wide: the tests of this file run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

// ---- the targets ----

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// One parser under test: its name, seed inputs and the call that feeds it bytes.
struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    run: fn(&[u8]),
}

fn json(b: &[u8]) {
    if let Ok(j) = Json::parse(b, "fuzz.json") {
        let _ = Json::parse(j.to_compact().as_bytes(), "round trip");
    }
}

fn safetensors_header(b: &[u8]) {
    let _ = rq_min::io::safetensors::parse_header(b, Path::new("fuzz.safetensors"));
}

fn safetensors_index(b: &[u8]) {
    let _ = rq_min::io::safetensors::parse_index(b, Path::new("/m"), Path::new("/m/model.safetensors.index.json"));
}

fn config(b: &[u8]) {
    if let Ok(j) = Json::parse(b, "config.json") {
        let _ = ModelConfig::from_json(j, Path::new("config.json"));
    }
}

/// tokenizer.json alone (the file's normalizer / pre-tokenizer / decoder are used) and with the
/// fixture's tokenizer_config.json (Llama rebuild); a short text is encoded and decoded.
fn tokenizer(b: &[u8]) {
    let Ok(j) = Json::parse(b, "tokenizer.json") else { return };
    let cfg = Json::parse(&read("stories260K-hf/tokenizer_config.json"), "tokenizer_config.json").unwrap();
    for config in [None, Some((Path::new("tokenizer_config.json"), &cfg))] {
        if let Ok(t) = Tokenizer::from_json(&j, Path::new("tokenizer.json"), config) {
            let ids = t.encode("Hello world, 123 <s> caf\u{e9}!");
            let _ = t.decode(&ids);
        }
    }
}

fn tokenizer_config(b: &[u8]) {
    let Ok(c) = Json::parse(b, "tokenizer_config.json") else { return };
    let j = Json::parse(&read("stories260K-hf/tokenizer.json"), "tokenizer.json").unwrap();
    if let Ok(t) = Tokenizer::from_json(&j, Path::new("tokenizer.json"), Some((Path::new("tokenizer_config.json"), &c))) {
        let _ = t.encode("Hello world");
    }
}

fn tar_gz(b: &[u8]) {
    let _ = rq_min::io::tar_gz::read_tar_gz(b, Path::new("fuzz.qnemo"));
}

fn tar(b: &[u8]) {
    let _ = rq_min::io::tar_gz::read_tar(b);
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(Path::new(FIXTURES).join(rel)).unwrap()
}

/// The first `n` bytes of a safetensors file: its header and the start of the data.
fn safetensors_prefix(rel: &str, data: usize) -> Vec<u8> {
    let b = read(rel);
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    b[..(8 + n + data).min(b.len())].to_vec()
}

/// Small safetensors files, an index, a tar and `.qnemo` files made by rq-min's writers.
fn made_seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<Vec<u8>>) {
    use rq_min::io::safetensors::{write_file, Dtype};
    let dir = std::env::temp_dir().join(format!("rq-min-fuzz-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("ckpt")).unwrap();
    let st = dir.join("ckpt/model.safetensors");
    let f32s: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let meta = vec![("format".to_string(), "pt".to_string())];
    write_file(&st, &[("a.weight", Dtype::F32, &[3, 4], &f32s), ("b", Dtype::BF16, &[2], &[0, 0x3f, 0, 0x40]), ("e", Dtype::F8E4M3, &[0], &[])], &meta)
        .unwrap();
    let small_st = std::fs::read(&st).unwrap();
    std::fs::write(dir.join("ckpt/config.json"), read("families-llama/config.json")).unwrap();
    let qnemo = dir.join("m.qnemo");
    rq_min::io::tar_gz::write_tar_gz(&dir.join("ckpt"), &rq_min::io::tmp::Target::new(&qnemo, true).unwrap()).unwrap();
    let stored = std::fs::read(&qnemo).unwrap();
    let plain_tar = rq_min::io::tar_gz::gunzip(&stored).unwrap();
    let mut gz = vec![stored];
    // A compressed seed (fixed and dynamic Huffman blocks) when gzip is installed.
    if let Ok(mut child) = std::process::Command::new("gzip")
        .args(["-c", "-9", "-n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
    {
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), &plain_tar).unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            gz.push(out.stdout);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    (vec![small_st], gz, vec![plain_tar])
}

fn targets() -> Vec<Target> {
    let (small_st, gz, plain_tar) = made_seeds();
    let index = br#"{"metadata": {"total_size": 1708032}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors", "model.embed_tokens.weight": "model-00001-of-00002.safetensors", "model.norm.weight": "model-00002-of-00002.safetensors"}}"#;
    let configs = vec![read("families-llama/config.json"), read("stories260K-hf/config.json")];
    let jsons = vec![
        read("families-llama/config.json"),
        read("stories260K-hf/tokenizer_config.json"),
        read("stories260K-hf/special_tokens_map.json"),
        read("stories260K-hf/generation_config.json"),
        read("calib-ids-small.json"),
        index.to_vec(),
    ];
    let mut headers = small_st.clone();
    headers.push(safetensors_prefix("families-llama/model.safetensors", 64));
    headers.push(safetensors_prefix("stories260K-hf/model.safetensors", 64));
    vec![
        Target { name: "json", seeds: jsons, run: json },
        Target { name: "safetensors header", seeds: headers, run: safetensors_header },
        Target { name: "safetensors index", seeds: vec![index.to_vec()], run: safetensors_index },
        Target { name: "config.json", seeds: configs, run: config },
        Target { name: "tokenizer.json", seeds: vec![read("stories260K-hf/tokenizer.json")], run: tokenizer },
        Target { name: "tokenizer_config.json", seeds: vec![read("stories260K-hf/tokenizer_config.json")], run: tokenizer_config },
        Target { name: "qnemo (gzip+tar)", seeds: gz, run: tar_gz },
        Target { name: "tar", seeds: plain_tar, run: tar },
    ]
}

// ---- the mutator ----

/// Numbers that overflow or stress the fields they land in.
const BIG_TEXT: [&str; 12] = [
    "18446744073709551615",
    "1e308",
    "4294967296",
    "-1",
    "9223372036854775807",
    "-9223372036854775808",
    "1e-400",
    "0",
    "2147483648",
    "1.7976931348623157e309",
    "77777777777",
    "99999999999999999999999999",
];
const BIG_BIN: [u64; 6] = [u64::MAX, 1 << 32, 1 << 31, 0x7FFF_FFFF, 100_000_001, 1 << 40];

/// Replaces a run of ASCII digits (at or after a random position) with a big number.
fn big_number_text(b: &mut Vec<u8>, r: &mut Rng) {
    let from = r.below(b.len());
    let Some(start) = b[from..].iter().position(u8::is_ascii_digit).map(|p| p + from) else { return };
    let end = b[start..].iter().position(|c| !c.is_ascii_digit()).map_or(b.len(), |p| p + start);
    let start = if start > 0 && b[start - 1] == b'-' { start - 1 } else { start };
    b.splice(start..end, BIG_TEXT[r.below(BIG_TEXT.len())].bytes());
}

/// One random mutation of `b`; `others` are the target's seeds (for splices).
fn mutate(b: &mut Vec<u8>, others: &[Vec<u8>], r: &mut Rng) {
    match r.below(9) {
        0 | 1 => {
            for _ in 0..1 + r.below(8) {
                if !b.is_empty() {
                    let i = r.below(b.len());
                    b[i] ^= 1 << r.below(8);
                }
            }
        }
        2 => {
            if !b.is_empty() {
                let i = r.below(b.len());
                b[i] = [0, 0xFF, 0x7F, 0x80, b'"', b'{', b'[', b'\\'][r.below(8)];
            }
        }
        3 => b.truncate(r.below(b.len() + 1)),
        4 => {
            let o = &others[r.below(others.len())];
            let (at, from) = (r.below(b.len() + 1), r.below(o.len() + 1));
            b.truncate(at);
            b.extend_from_slice(&o[from..]);
        }
        5 | 6 => big_number_text(b, r),
        7 => {
            if b.len() >= 8 {
                let i = r.below(b.len() - 7);
                let v = BIG_BIN[r.below(BIG_BIN.len())].to_le_bytes();
                let w = [8, 4][r.below(2)];
                b[i..i + w].copy_from_slice(&v[..w]);
            }
        }
        _ => {
            let (i, j) = (r.below(b.len() + 1), r.below(b.len() + 1));
            let (lo, hi) = (i.min(j), i.max(j).min(i.min(j) + 4096));
            if r.below(2) == 0 {
                b.drain(lo..hi);
            } else {
                let chunk = b[lo..hi].to_vec();
                b.splice(hi..hi, chunk);
            }
        }
    }
}

// ---- the engine ----

#[derive(Default)]
struct Stats {
    execs: usize,
    panics: usize,
    over_cap: usize,
    peak: usize,
    first_crash: Option<(Vec<u8>, String)>,
}

/// Runs `run(input)`, returning the panic message if it panicked.
fn exec(run: fn(&[u8]), input: &[u8]) -> Option<String> {
    std::panic::catch_unwind(|| run(input)).err().map(|e| {
        e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
    })
}

/// `execs` mutated runs of `t` from `seed`, one to four stacked mutations of a seed each.
fn fuzz(t: &Target, execs: usize, seed: u64) -> Stats {
    let mut r = Rng(seed | 1);
    let mut s = Stats::default();
    for _ in 0..execs {
        let mut input = t.seeds[r.below(t.seeds.len())].clone();
        for _ in 0..1 + r.below(4) {
            mutate(&mut input, &t.seeds, &mut r);
        }
        let (over, base) = (OVER_CAP.load(Relaxed), LIVE.load(Relaxed));
        PEAK.store(base, Relaxed);
        let crash = exec(t.run, &input);
        let peak = PEAK.load(Relaxed) - base;
        s.peak = s.peak.max(peak);
        if OVER_CAP.load(Relaxed) > over || peak > ALLOC_CAP {
            s.over_cap += 1;
        }
        s.execs += 1;
        if let Some(msg) = crash {
            s.panics += 1;
            s.first_crash.get_or_insert((input, msg));
        }
    }
    s
}

/// Deletes chunks of `input` while `run` still panics on it: a small reproducer.
fn minimize(run: fn(&[u8]), mut input: Vec<u8>) -> Vec<u8> {
    let mut chunk = input.len() / 2;
    while chunk > 0 {
        let mut i = 0;
        while i + chunk <= input.len() {
            let mut shorter = input.clone();
            shorter.drain(i..i + chunk);
            if exec(run, &shorter).is_some() {
                input = shorter;
            } else {
                i += chunk;
            }
        }
        chunk /= 2;
    }
    input
}

/// Fuzzes every target with `execs` runs each and prints the table; returns the stats.
fn campaign(execs_per_target: usize, seed: u64) -> Vec<(&'static str, Stats)> {
    let targets = targets();
    std::panic::set_hook(Box::new(|_| {})); // panics are counted, not printed
    let mut all = Vec::new();
    for (k, t) in targets.iter().enumerate() {
        let mut s = fuzz(t, execs_per_target, seed.wrapping_add(k as u64 * 0x9E37_79B9));
        if let Some((input, msg)) = s.first_crash.take() {
            let min = minimize(t.run, input);
            eprintln!("{}: panic {msg:?} on (minimized) {:?}", t.name, String::from_utf8_lossy(&min));
            eprintln!("  bytes: {min:?}");
            s.first_crash = Some((min, msg));
        }
        all.push((t.name, s));
    }
    let _ = std::panic::take_hook();
    println!("| parser | executions | panics | allocations over 1 GiB | peak bytes of one run |");
    println!("|---|---:|---:|---:|---:|");
    for (name, s) in &all {
        println!("| {name} | {} | {} | {} | {} |", s.execs, s.panics, s.over_cap, s.peak);
    }
    let total: usize = all.iter().map(|(_, s)| s.execs).sum();
    println!("| total | {total} | {} | {} | |", all.iter().map(|(_, s)| s.panics).sum::<usize>(), all.iter().map(|(_, s)| s.over_cap).sum::<usize>());
    all
}

fn assert_clean(all: &[(&str, Stats)]) {
    for (name, s) in all {
        assert_eq!((s.panics, s.over_cap), (0, 0), "{name}: panics / over-cap allocations (first: {:?})", s.first_crash);
    }
}

/// The engine itself: a panic and an over-cap allocation are both counted.
#[test]
fn engine_counts_panics_and_big_allocations() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fn panics_on_ff(b: &[u8]) {
        assert!(!b.contains(&0xFF), "found 0xFF");
    }
    fn allocates_2_gib(b: &[u8]) {
        if b.first() == Some(&b'x') {
            let mut v: Vec<u8> = Vec::new();
            assert!(v.try_reserve(2 << 30).is_err());
        }
    }
    let t = Target { name: "self-test", seeds: vec![b"x0000000".to_vec()], run: panics_on_ff };
    let s = fuzz(&t, 2000, 7);
    assert!(s.panics > 0 && s.first_crash.is_some());
    assert_eq!(minimize(panics_on_ff, s.first_crash.unwrap().0), [0xFF]);
    let t = Target { name: "self-test", seeds: vec![b"x0000000".to_vec()], run: allocates_2_gib };
    assert!(fuzz(&t, 200, 7).over_cap > 0);
}

/// About 20 s in release: 70,000 runs per parser from a fixed seed.
#[test]
fn fuzz_short() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let per_target = std::env::var("RQ_MIN_FUZZ_SHORT").ok().and_then(|v| v.parse().ok()).unwrap_or(70_000);
    assert_clean(&campaign(per_target, 0x5EED_2025));
}

#[test]
#[ignore]
fn fuzz_long() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let total: usize = std::env::var("RQ_MIN_FUZZ_EXECS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let seed = std::env::var("RQ_MIN_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let start = std::time::Instant::now();
    let all = campaign(total.div_ceil(targets().len()), seed);
    println!("{:.0} s", start.elapsed().as_secs_f64());
    assert_clean(&all);
}
