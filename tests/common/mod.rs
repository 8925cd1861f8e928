//! Helpers shared by the integration tests.

use std::path::PathBuf;

/// The repository root: `$RQ_REPO_DIR` when set (a test executable run on another machine,
/// where the path compiled in does not exist: tools/gpu-check.sh sets it), else the crate
/// folder it was built in (`CARGO_MANIFEST_DIR`).
#[allow(dead_code)]
pub fn repo_dir() -> PathBuf {
    match std::env::var_os("RQ_REPO_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

/// The shared data folder (`../shared` next to the repository, or `shared/` inside it):
/// models and reference outputs. None, after printing why, when it is absent, so a test using
/// it skips; under `CI=true` its absence is a failure instead.
#[allow(dead_code)]
pub fn shared_dir() -> Option<PathBuf> {
    let repo = repo_dir();
    let dir = repo.join("../shared");
    if dir.is_dir() {
        return Some(dir);
    }
    if repo.join("shared").is_dir() {
        return Some(repo.join("shared"));
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the shared data folder {} is missing", dir.display());
    }
    eprintln!("skipping: shared data folder {} not found", dir.display());
    None
}

/// xorshift64* (Vigna): a small deterministic generator, the same sequence for the same seed
/// everywhere (test data, the fuzzer's mutations).
#[allow(dead_code)]
pub struct Rng(pub u64);

#[allow(dead_code)]
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 32) as u8).collect()
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f32 {
        (lo + (hi - lo) * self.unit()) as f32
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
    /// Log-uniform in [lo, hi].
    pub fn log_uniform(&mut self, lo: f64, hi: f64) -> f32 {
        (lo.ln() + (hi.ln() - lo.ln()) * self.unit()).exp() as f32
    }
}


/// Writes straight to stderr (the harness captures `eprintln!`, not this): tables and skip
/// reasons show in `cargo test` output.
#[allow(dead_code, clippy::explicit_write)]
pub fn say(text: &str) {
    use std::io::Write;
    writeln!(std::io::stderr(), "{text}").unwrap();
}

/// True when a CUDA device (or the emulator) is usable; otherwise prints "skipped: <reason>",
/// so a test of the CUDA features passes without a GPU after saying why it did nothing.
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
#[allow(dead_code)]
pub fn have_gpu() -> bool {
    match rq_min::compute::cuda::device_info() {
        Ok(_) => true,
        Err(e) => {
            say(&format!("skipped: {e}"));
            false
        }
    }
}

/// A device copy of `host`.
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
#[allow(dead_code)]
pub fn dev<T: bytemuck::Pod>(host: &[T]) -> rq_min::compute::cuda::DeviceBuffer<T> {
    rq_min::compute::cuda::DeviceBuffer::from_slice(host).unwrap()
}

/// A device buffer of `n` NaNs: what a kernel does not write stays NaN.
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
#[allow(dead_code)]
pub fn poisoned(n: usize) -> rq_min::compute::cuda::DeviceBuffer<f32> {
    dev(&vec![f32::NAN; n])
}

/// `n` normal values times `std`, every 29th an outlier 40x larger and every 17th a zero.
#[allow(dead_code)]
pub fn values(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|i| match (i % 29, i % 17) {
            (0, _) => rng.normal() * std * 40.0,
            (_, 0) => 0.0,
            _ => rng.normal() * std,
        })
        .collect()
}

/// `got` has the bits of `want` (NaN where `want` has NaN).
#[allow(dead_code)]
pub fn same_bits(want: &[f32], got: &[f32], what: &str) {
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{what}[{i}]: cpu {a:e} device {b:e}");
    }
}

/// The families of ../shared/reference/families the runtime supports (besides
/// llama3-rope-scaling, a Llama with another RoPE).
#[allow(dead_code)]
pub const FAMILIES: [&str; 22] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "phi3",
    "starcoder2",
    "nemotron",
    "mixtral",
    "qwen3_moe",
    "gemma2",
    "gemma3",
    "granite",
    "olmo2",
    "exaone4",
    "qwen2_moe",
    "phimoe",
    "gptj",
    "falcon",
    "falcon-mqa",
    "bloom",
    "mpt",
];
