//! Kernel budget without a GPU (issue 14): `cargo bench --bench kernel_budget`.
//!
//! Counts, from the shapes and the kernels' code (not from timing), what one decoder layer of
//! Llama-3-8B costs in the device calibration forward of a bf16 model (f32 device buffers,
//! `Compute::Bf16`, FP8 statistics hooks: `StatsHooks` in src/ptq/quantize.rs with `--kv-cache
//! fp8`), then the device memory a layer needs, then ptxas's registers and shared memory of every
//! kernel of cuda/*.cu for sm_90a. Bytes are the global loads and stores the code issues (a
//! re-read that L2 may serve counts again); "unique" is each input byte once (a perfect L2).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

// ---- H100 SXM5 (NVIDIA H100 Tensor Core GPU datasheet) -------------------------------------
/// HBM3 bandwidth, bytes/s ("GPU memory bandwidth 3.35TB/s").
const HBM_BYTES_PER_S: f64 = 3.35e12;
/// Dense BF16 tensor-core FLOP/s ("BF16 Tensor Core 1,979 teraFLOPS" is with sparsity; dense 989.4).
const BF16_MMA_FLOP_PER_S: f64 = 989.4e12;
/// FP32 non-tensor FLOP/s ("FP32 67 teraFLOPS", 66.9).
const F32_SIMT_FLOP_PER_S: f64 = 66.9e12;
/// The device-memory target of issue 14.
const BUDGET_BYTES: u64 = 8 << 30;

// ---- Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json) ----------------------------------
const HIDDEN: u64 = 4096;
const INTERMEDIATE: u64 = 14336;
const HEADS: u64 = 32;
const KV_HEADS: u64 = 8;
const HEAD_DIM: u64 = 128;
const LAYERS: u64 = 32;
// ---- the calibration of issue 14: 512 rows of 512 tokens ----------------------------------
const SEQ: u64 = 512;
const ROWS: u64 = 512;
/// Device tensors are f32 (`Tensor` holds `DeviceBuffer<f32>`, src/compute/tensor.rs).
const F32: u64 = 4;

// ---- launch constants of cuda/*.cu ---------------------------------------------------------
const FWD_THREADS: u64 = 256; // forward.cu, quant_fp8.cu kThreads
const FWD_MAX_BLOCKS: u64 = 4096; // forward.cu, quant_fp8.cu kMaxBlocks (grid_for)
const GEMM_THREADS: u64 = 128; // gemm.cu kThreads (4 warps)
const GEMM_TILE: u64 = 64; // gemm.cu kTileM = kTileN
const ALL_BF16_MAX_BLOCKS: u64 = 1024; // rq_all_bf16_f32
const ATT_ROWS: u64 = 8; // forward.cu kRows: query rows (warps) per block

#[derive(Clone, Copy, PartialEq)]
enum Peak {
    Mma,
    Simt,
}

/// One kernel launch (or device copy) of the forward.
struct Launch {
    op: String,
    kernel: &'static str,
    shape: String,
    read: u64,
    unique: u64,
    written: u64,
    flops: u64,
    peak: Peak,
}

impl Launch {
    fn bytes(&self) -> u64 {
        self.read + self.written
    }
    fn intensity(&self) -> f64 {
        self.flops as f64 / self.bytes() as f64
    }
    fn peak_flops(&self) -> f64 {
        if self.peak == Peak::Mma { BF16_MMA_FLOP_PER_S } else { F32_SIMT_FLOP_PER_S }
    }
    /// (memory time, compute time) in seconds, bytes as issued.
    fn times(&self) -> (f64, f64) {
        (self.bytes() as f64 / HBM_BYTES_PER_S, self.flops as f64 / self.peak_flops())
    }
    fn bound_s(&self) -> f64 {
        let (m, c) = self.times();
        m.max(c)
    }
    /// The bound with each input byte read once (a perfect L2).
    fn bound_unique_s(&self) -> f64 {
        ((self.unique + self.written) as f64 / HBM_BYTES_PER_S).max(self.times().1)
    }
    fn verdict(&self) -> &'static str {
        let (m, c) = self.times();
        if m >= c { "bandwidth" } else { "compute" }
    }
}

/// forward.cu / quant_fp8.cu `grid_for(n)`: one thread per value, at most 4096 blocks, grid-stride.
fn grid_for(n: u64) -> u64 {
    n.div_ceil(FWD_THREADS).min(FWD_MAX_BLOCKS)
}

fn launch(op: &str, kernel: &'static str, shape: String, read: u64, unique: u64, written: u64, flops: u64) -> Launch {
    Launch { op: op.into(), kernel, shape, read, unique, written, flops, peak: Peak::Simt }
}

/// `rms_norm_kernel` (forward.cu), one block per row: the sum-of-squares loop reads the row, the
/// output loop reads it again and reads `weight[i]`; FLOPs: v·v + sum (f64), x·inv_rms, w·normed.
fn rms_norm(op: &str, rows: u64, cols: u64) -> Launch {
    let n = rows * cols;
    launch(op, "rms_norm_kernel", format!("{rows} × {FWD_THREADS}"), 3 * n * F32, (n + cols) * F32, n * F32, 4 * n)
}

/// `absmax_kernel<float>` (quant_fp8.cu, via `Tensor::amax` / `all_finite`): each value read once,
/// a max of integer bits (0 FLOPs), one `atomicMax` per block.
fn absmax(op: &str, n: u64) -> Launch {
    let blocks = grid_for(n);
    launch(op, "absmax_kernel<float>", format!("{blocks} × {FWD_THREADS}"), n * F32, n * F32, blocks * 4, 0)
}

/// `all_bf16_kernel` (gemm.cu, `cuda::all_bf16`): each value read once, bit tests (0 FLOPs), a
/// store only for a value that is not bf16 (none for a bf16 model).
fn all_bf16(op: &str, n: u64) -> Launch {
    let blocks = n.div_ceil(GEMM_THREADS).min(ALL_BF16_MAX_BLOCKS);
    launch(op, "all_bf16_kernel", format!("{blocks} × {GEMM_THREADS}"), n * F32, n * F32, 0, 0)
}

/// `matmul_bt_bf16_kernel` (gemm.cu): every 64 × 64 output tile loads its 64 rows of x and 64
/// rows of w over all of k (`load_pair`, k0 steps of 32), so x is read once per column tile and
/// w once per row tile; out written once; 2·m·n·k FLOPs on the tensor cores.
fn gemm(op: &str, m: u64, k: u64, n: u64) -> Launch {
    let (col_tiles, row_tiles) = (n.div_ceil(GEMM_TILE), m.div_ceil(GEMM_TILE));
    let read = (m * k * col_tiles + n * k * row_tiles) * F32;
    let shape = format!("{col_tiles}×{row_tiles} × {GEMM_THREADS}");
    let l = launch(op, "matmul_bt_bf16_kernel", shape, read, (m * k + n * k) * F32, m * n * F32, 2 * m * n * k);
    Launch { peak: Peak::Mma, ..l }
}

/// `round_bf16_kernel` (forward.cu, `Tensor::round` under bf16): read, convert, write in place.
fn round(op: &str, n: u64) -> Launch {
    launch(op, "round_bf16_kernel", format!("{} × {FWD_THREADS}", grid_for(n)), n * F32, n * F32, n * F32, 0)
}

/// `add_kernel` (forward.cu, the residual `hidden.add`): x and y read, x written, one add.
fn add(op: &str, n: u64) -> Launch {
    launch(op, "add_kernel", format!("{} × {FWD_THREADS}", grid_for(n)), 2 * n * F32, 2 * n * F32, n * F32, n)
}

/// `Tensor::clone` of a device tensor: a cudaMemcpy device to device (`DeviceBuffer::copy_from_device`).
fn clone(op: &str, n: u64) -> Launch {
    launch(op, "cudaMemcpy DtoD", "copy engine".into(), n * F32, n * F32, n * F32, 0)
}

/// `rope_kernel` (forward.cu), one thread per (position, head, pair): reads cos, sin (per head
/// again), a, b; writes a', b'; bf16 path: 4 mul + 2 add per pair.
fn rope(op: &str, seq: u64, heads: u64) -> Launch {
    let pairs = seq * heads * HEAD_DIM / 2;
    let unique = (seq * heads * HEAD_DIM + seq * HEAD_DIM) * F32; // x, then the [seq, half] cos and sin
    let shape = format!("{} × {FWD_THREADS}", grid_for(pairs));
    launch(op, "rope_kernel", shape, 4 * pairs * F32, unique, 2 * pairs * F32, 6 * pairs)
}

/// `attention_flash_bf16_kernel<128, 32>` (forward.cu), a block per (8 query rows, head): q rows
/// once; walk 0 (max), walk 1 (sum) and walk 2 (weights) each reload every K tile of keys
/// 0..=t_last to recompute Q·K, walk 2 also the V tiles; no reuse across the 4 heads of a kv head.
/// FLOPs per visible key of a row: 3 Q·K FMA chains + 1 P·V chain (2·hd each), ~10 softmax ops.
fn attention(op: &str, seq: u64) -> Launch {
    let blocks = seq.div_ceil(ATT_ROWS);
    let keys_loaded: u64 = (0..blocks).map(|b| ((b + 1) * ATT_ROWS).min(seq)).sum(); // t_last + 1 per block
    let kv_loads = HEADS * keys_loaded * HEAD_DIM * F32; // one pass over K (or V) for every block
    let q_bytes = seq * HEADS * HEAD_DIM * F32;
    let visible: u64 = (1..=seq).sum(); // row t sees t + 1 keys (causal, no window)
    let flops = HEADS * visible * (4 * 2 * HEAD_DIM + 10);
    let unique = q_bytes + 2 * seq * KV_HEADS * HEAD_DIM * F32;
    let shape = format!("{blocks}×{HEADS} × {}", ATT_ROWS * 32);
    launch(op, "attention_flash_bf16_kernel", shape, q_bytes + 4 * kv_loads, unique, q_bytes, flops)
}

/// `gated_mul_kernel` (forward.cu): gate and up read, gate written; SiLU x / (1 + exp(-x)) then
/// the product: exp, add, div, mul.
fn gated_mul(op: &str, n: u64) -> Launch {
    launch(op, "gated_mul_kernel", format!("{} × {FWD_THREADS}", grid_for(n)), 2 * n * F32, 2 * n * F32, n * F32, 4 * n)
}

/// `Layer::linear` (src/model/layer.rs) with `StatsHooks` (FP8): the q, k and gate inputs are
/// `x.clone()`s; `observe` runs `all_finite` then `amax` (two absmax launches); `Tensor::matmul_bt`
/// checks `all_bf16(x)` before the tensor-core GEMM (the weight's answer is kept with its buffer
/// from the first row on: not counted here); the output is rounded.
fn linear(v: &mut Vec<Launch>, name: &str, k: u64, n: u64, cloned: bool) {
    let x = SEQ * k;
    if cloned {
        v.push(clone(&format!("{name}: x.clone()"), x));
    }
    v.push(absmax(&format!("{name}: all_finite(x)"), x));
    v.push(absmax(&format!("{name}: amax(x)"), x));
    v.push(all_bf16(&format!("{name}: all_bf16(x)"), x));
    v.push(gemm(&format!("{name}: x·wᵀ"), SEQ, k, n));
    v.push(round(&format!("{name}: out.round"), SEQ * n));
}

/// `Layer::forward` of a dense Llama layer on one calibration row, launch by launch.
fn layer_forward() -> Vec<Launch> {
    let (q_width, kv_width) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut v = vec![rms_norm("input_layernorm", SEQ, HIDDEN)];
    linear(&mut v, "q_proj", HIDDEN, q_width, true);
    linear(&mut v, "k_proj", HIDDEN, kv_width, true);
    linear(&mut v, "v_proj", HIDDEN, kv_width, false);
    v.push(rope("q.rope", SEQ, HEADS));
    v.push(rope("k.rope", SEQ, KV_HEADS));
    v.push(absmax("hooks.kv: amax(k)", SEQ * kv_width));
    v.push(absmax("hooks.kv: amax(v)", SEQ * kv_width));
    v.push(attention("attention (flash_bf16)", SEQ));
    v.push(round("attn.round", SEQ * q_width));
    linear(&mut v, "o_proj", q_width, HIDDEN, false);
    v.push(add("hidden.add(o)", SEQ * HIDDEN));
    v.push(round("hidden.round", SEQ * HIDDEN));
    v.push(rms_norm("post_attention_layernorm", SEQ, HIDDEN));
    linear(&mut v, "gate_proj", HIDDEN, INTERMEDIATE, true);
    linear(&mut v, "up_proj", HIDDEN, INTERMEDIATE, false);
    v.push(gated_mul("gate.gated_mul(up)", SEQ * INTERMEDIATE));
    linear(&mut v, "down_proj", INTERMEDIATE, HIDDEN, false);
    v.push(add("hidden.add(down)", SEQ * HIDDEN));
    v.push(round("hidden.round", SEQ * HIDDEN));
    v
}

fn mib(b: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
    match UNITS.iter().find(|(shift, _)| b >= 1u64 << shift) {
        Some((shift, unit)) => {
            let prec = if *shift >= 30 { 2 } else { 1 };
            format!("{:.prec$} {unit}", b as f64 / (1u64 << shift) as f64)
        }
        None => format!("{b} B"),
    }
}

fn flops(f: u64) -> String {
    match f {
        0 => "0".into(),
        f if f >= 1_000_000_000 => format!("{:.2} G", f as f64 / 1e9),
        f => format!("{:.1} M", f as f64 / 1e6),
    }
}

fn launch_table(launches: &[Launch]) {
    println!("## 1. One Llama-3-8B decoder layer, one calibration row of {SEQ} tokens (bf16 model, f32 device buffers)\n");
    println!("| # | op (Layer::forward) | kernel | grid × block | read | read, unique | written | FLOPs | FLOP/B | bound | µs |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, l) in launches.iter().enumerate() {
        println!(
            "| {} | {} | `{}` | {} | {} | {} | {} | {} | {:.2} | {} | {:.1} |",
            i + 1, l.op, l.kernel, l.shape, mib(l.read), mib(l.unique), mib(l.written), flops(l.flops),
            l.intensity(), l.verdict(), l.bound_s() * 1e6
        );
    }
    let sum = |f: fn(&Launch) -> u64| launches.iter().map(f).sum::<u64>();
    let row_s: f64 = launches.iter().map(Launch::bound_s).sum();
    let (read, written, fl) = (sum(|l| l.read), sum(|l| l.written), sum(|l| l.flops));
    println!(
        "| | **one row** | {} launches | | {} | {} | {} | {} | {:.2} | | {:.0} |",
        launches.len(), mib(read), mib(sum(|l| l.unique)), mib(written), flops(fl),
        fl as f64 / (read + written) as f64, row_s * 1e6
    );
    println!(
        "| | **{ROWS} rows (one layer)** | {} launches | | {} | {} | {} | {:.1} T | | | {:.3} s |\n",
        launches.len() as u64 * ROWS, mib(read * ROWS), mib(sum(|l| l.unique) * ROWS), mib(written * ROWS),
        (fl * ROWS) as f64 / 1e12, row_s * ROWS as f64
    );
}

/// Per kernel: launches, bytes, FLOPs and bound summed over one row, and the share of the row.
fn kernel_totals(launches: &[Launch]) {
    let mut kernels: Vec<&'static str> = Vec::new();
    for l in launches {
        if !kernels.contains(&l.kernel) {
            kernels.push(l.kernel);
        }
    }
    let row_s: f64 = launches.iter().map(Launch::bound_s).sum();
    let row_unique_s: f64 = launches.iter().map(Launch::bound_unique_s).sum();
    println!(
        "### Per kernel, summed over one row (H100 SXM roofline: {} TB/s; {} TFLOP/s bf16 mma, ridge {:.0} FLOP/B; \
         {} TFLOP/s f32, ridge {:.0} FLOP/B)\n",
        HBM_BYTES_PER_S / 1e12, BF16_MMA_FLOP_PER_S / 1e12, BF16_MMA_FLOP_PER_S / HBM_BYTES_PER_S,
        F32_SIMT_FLOP_PER_S / 1e12, F32_SIMT_FLOP_PER_S / HBM_BYTES_PER_S
    );
    println!("| kernel | launches | read + written | FLOPs | FLOP/B | bound | µs | share | FLOP/B, each byte once | bound | µs |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for k in kernels {
        let ls: Vec<&Launch> = launches.iter().filter(|l| l.kernel == k).collect();
        let bytes: u64 = ls.iter().map(|l| l.bytes()).sum();
        let unique: u64 = ls.iter().map(|l| l.unique + l.written).sum();
        let fl: u64 = ls.iter().map(|l| l.flops).sum();
        let s: f64 = ls.iter().map(|l| l.bound_s()).sum();
        let us: f64 = ls.iter().map(|l| l.bound_unique_s()).sum();
        let peak = ls[0].peak_flops();
        // The kernels of one name share a peak; the verdict of their sums.
        let verdict = |b: u64| if b as f64 / HBM_BYTES_PER_S >= fl as f64 / peak { "bandwidth" } else { "compute" };
        println!(
            "| `{k}` | {} | {} | {} | {:.2} | {} | {:.1} | {:.1}% | {:.1} | {} | {:.1} |",
            ls.len(), mib(bytes), flops(fl), fl as f64 / bytes as f64, verdict(bytes), s * 1e6, 100.0 * s / row_s,
            fl as f64 / unique as f64, verdict(unique), us * 1e6
        );
    }
    // dev::output allocates each new tensor (norm, clone, matmul, attention outputs); dev::absmax
    // and cuda::all_bf16 a one-value buffer: a cudaMalloc and a cudaFree each.
    let in_place = ["round_bf16_kernel", "rope_kernel", "add_kernel", "gated_mul_kernel"];
    let allocs = launches.iter().filter(|l| !in_place.contains(&l.kernel)).count();
    // Launches queue without a wait (src/compute/cuda.rs `launched`); the host waits where it
    // copies a result back (absmax, all_bf16) and once per row (`take_device_error`).
    let syncs = launches.iter().filter(|l| l.kernel.starts_with("absmax") || l.kernel == "all_bf16_kernel").count() + 1;
    println!(
        "\nOne row: {:.0} µs at the bound ({:.0} µs with each byte once); {ROWS} rows: {:.2} s per layer ({:.2} s), \
         {:.0} s for the {LAYERS} layers ({:.0} s). {} launches queue without a wait; the host waits for \
         absmax's and all_bf16's results and once per row: {syncs} synchronizations and {allocs} cudaMalloc / \
         cudaFree pairs per row, {} and {} per layer.\n",
        row_s * 1e6, row_unique_s * 1e6, row_s * ROWS as f64, row_unique_s * ROWS as f64,
        row_s * (ROWS * LAYERS) as f64, row_unique_s * (ROWS * LAYERS) as f64,
        launches.len(), syncs as u64 * ROWS, allocs as u64 * ROWS
    );
}

/// Device memory of one layer's calibration (src/ptq/quantize.rs `run` / `calibrate_layer`).
fn memory_table() {
    let linears = [
        ("q_proj", HEADS * HEAD_DIM, HIDDEN), ("k_proj", KV_HEADS * HEAD_DIM, HIDDEN), ("v_proj", KV_HEADS * HEAD_DIM, HIDDEN),
        ("o_proj", HIDDEN, HEADS * HEAD_DIM), ("gate_proj", INTERMEDIATE, HIDDEN), ("up_proj", INTERMEDIATE, HIDDEN),
        ("down_proj", HIDDEN, INTERMEDIATE),
    ];
    let params: u64 = linears.iter().map(|(_, o, i)| o * i).sum::<u64>() + 2 * HIDDEN; // + the two norms
    // Model::load_layer: every weight `Tensor::on(Vec<f32>, device)`, 4 bytes a parameter.
    let weights = params * F32;
    // run: `hidden: Vec<Tensor>` of every sample, on the device between layers.
    let hidden = ROWS * SEQ * HIDDEN * F32;
    // Layer::forward, MLP: at up_proj's matmul x (moved in), gate and the up output are live.
    let mlp = SEQ * (HIDDEN + 2 * INTERMEDIATE) * F32;
    // Attention: q, k, v and the output ([seq, heads·hd] / [seq, kv·hd]); no seq × seq scores.
    let att = SEQ * (2 * HEADS + 2 * KV_HEADS) * HEAD_DIM * F32;
    // Rope::device_tables: cos and sin, [max_len, head_dim / 2] each.
    let rope = SEQ * HEAD_DIM * F32;
    let total = weights + hidden + mlp.max(att) + rope;
    let share = |b: u64| format!("{:.0}% of the {} budget", 100.0 * b as f64 / BUDGET_BYTES as f64, mib(BUDGET_BYTES));
    let row = |what: String, size: String, alt: String, note: String| println!("| {what} | {size} | {alt} | {note} |");
    println!("## 2. Device memory of one layer's calibration ({ROWS} rows × {SEQ} tokens, f32 device tensors)\n");
    println!("| what (where) | size | bf16 / chunked | note |");
    println!("|---|---|---|---|");
    let what = format!("layer weights, {:.1} M params × 4 B (`Model::load_layer`, `Tensor::on`)", params as f64 / 1e6);
    row(what, mib(weights), mib(weights / 2), "one layer at a time".into());
    let what = format!("hidden states of all rows, {ROWS} × {SEQ} × {HIDDEN} × 4 B (`quantize::run` `hidden`)");
    let alt = format!("{} bf16, {} per 64-row chunk", mib(hidden / 2), mib(hidden / ROWS * 64));
    row(what, mib(hidden), alt, format!("{} by itself", share(hidden)));
    let what = format!("MLP temporaries of a row: x + gate + up, {SEQ} × ({HIDDEN} + 2 × {INTERMEDIATE}) × 4 B");
    row(what, mib(mlp), mib(mlp / 2), "peak of the forward (at up_proj)".into());
    let what = format!("attention state of a row: q, k, v, out (O(seq), no {SEQ}² scores)");
    row(what, mib(att), mib(att / 2), "not live with the MLP's".into());
    row("RoPE cos / sin tables".into(), mib(rope), String::new(), "once per run".into());
    let note = format!("{}, {} headroom (CUDA context, allocator)", share(total), mib(BUDGET_BYTES.saturating_sub(total)));
    row("**total: weights + hidden + largest temporaries + tables**".into(), format!("**{}**", mib(total)), mib(total / 2), note);
    // AWQ (calibrate_layer): the statistics pass advances one row's copy at a time; the search
    // holds the layer's weights again and 11 candidates (`LiteSearch`), and per linear a row's
    // scaled input, a candidate's output and the exact output.
    let widest = INTERMEDIATE.max(HIDDEN);
    let awq_extra = 12 * weights + SEQ * HIDDEN * F32 + SEQ * (HIDDEN + widest + 2 * widest) * F32;
    let awq = total + awq_extra;
    let verdict = if awq > BUDGET_BYTES { "**exceeds the budget**" } else { "within the budget" };
    let what = "AWQ search (`LiteSearch`): the layer's weights again + 11 candidates, one row's copy and products".to_string();
    row(what, format!("+{}", mib(awq_extra)), format!("+{}", mib(awq_extra / 2)), format!("total {}: {verdict}", mib(awq)));
    println!();
    let rows_fit = (BUDGET_BYTES - weights - mlp - rope) / (SEQ * HIDDEN * F32);
    println!("Hidden states grow with rows × seq: with f32 they fill the 8 GiB by themselves at {} rows of {SEQ} tokens \
        ({} with the layer's weights and temporaries beside them).\n", BUDGET_BYTES / (SEQ * HIDDEN * F32), rows_fit);
}

/// A ptxas entry: kernel, registers, static shared memory, spill stores + loads.
struct Resources {
    kernel: String,
    registers: u64,
    smem: u64,
    spill: u64,
}

/// The number before `unit` in `line` ("Used 56 registers" → 56 for "registers").
fn number_before(line: &str, unit: &str) -> Option<u64> {
    let head = &line[..line.find(unit)?];
    head.split([' ', ',']).rfind(|s| !s.is_empty())?.parse().ok()
}

/// The kernel inside an Itanium-mangled symbol, roughly: the last name of the nested name
/// (anonymous namespaces dropped) and integer / builtin template arguments.
fn kernel_name(symbol: &str) -> String {
    let Some(mut s) = symbol.strip_prefix("_Z") else { return symbol.to_string() };
    let nested = s.starts_with('N');
    if nested {
        s = &s[1..];
    }
    let mut name = String::new();
    loop {
        let digits = s.chars().take_while(char::is_ascii_digit).count();
        let Ok(len) = s[..digits].parse::<usize>() else { break };
        let Some(id) = s.get(digits..digits + len) else { break };
        if !id.starts_with("_GLOBAL__N") {
            name = id.to_string();
        }
        s = &s[digits + len..];
        if !nested {
            break;
        }
    }
    if let Some(mut t) = s.strip_prefix('I') {
        let mut args = Vec::new();
        while let Some(c) = t.chars().next() {
            if c == 'E' {
                break;
            }
            if let Some(rest) = t.strip_prefix("Li") {
                let end = rest.find('E').unwrap_or(rest.len());
                args.push(rest[..end].to_string());
                t = rest.get(end + 1..).unwrap_or("");
                continue;
            }
            let builtin = [('f', "float"), ('t', "uint16_t"), ('h', "uint8_t"), ('j', "unsigned"), ('i', "int")];
            args.push(builtin.iter().find(|(b, _)| *b == c).map_or("…", |(_, n)| n).to_string());
            t = &t[1..];
        }
        let _ = write!(name, "<{}>", args.join(", "));
    }
    name
}

/// ptxas's `--resource-usage` lines of one compile, in order.
fn parse_ptxas(output: &str) -> Vec<Resources> {
    let (mut out, mut current, mut spill) = (Vec::new(), None::<String>, 0);
    for line in output.lines() {
        if let Some(i) = line.find("Function properties for ") {
            current = Some(line[i + "Function properties for ".len()..].trim().to_string());
            spill = 0;
        } else if line.contains("spill stores") {
            let bytes = |unit| number_before(line, unit).unwrap_or(0);
            spill = bytes("bytes spill stores") + bytes("bytes spill loads");
        } else if line.contains("Used") && line.contains("registers") {
            if let Some(symbol) = current.take() {
                out.push(Resources {
                    kernel: kernel_name(&symbol),
                    registers: number_before(line, "registers").unwrap_or(0),
                    smem: number_before(line, "bytes smem").unwrap_or(0),
                    spill,
                });
            }
        }
    }
    out
}

fn nvcc_path(repo: &Path) -> Option<std::path::PathBuf> {
    let local = repo.join(".cuda-toolchain/nvidia/cu13/bin/nvcc");
    let home = std::env::var_os("CUDA_HOME").map(|h| Path::new(&h).join("bin/nvcc"));
    [Some(local), home].into_iter().flatten().find(|p| p.is_file())
}

fn resource_table(repo: &Path) {
    println!("## 3. Registers and shared memory (nvcc --resource-usage, sm_90a)\n");
    let Some(nvcc) = nvcc_path(repo) else {
        println!("Skipped: no nvcc at .cuda-toolchain/nvidia/cu13/bin/nvcc or $CUDA_HOME/bin/nvcc \
            (bash tools/cuda-toolchain.sh installs it).\n");
        return;
    };
    let mut sources: Vec<_> = std::fs::read_dir(repo.join("cuda"))
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "cu")).collect())
        .unwrap_or_default();
    sources.sort();
    let shown = nvcc.strip_prefix(repo).unwrap_or(&nvcc);
    println!("`{} -O3 --std=c++17 --resource-usage -arch=sm_90a -I . -c cuda/<file>.cu` (build.rs's flags, one architecture)\n",
        shown.display());
    println!("| file | kernel | registers / thread | static smem / block | spill bytes |");
    println!("|---|---|---|---|---|");
    for source in sources {
        let file = source.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let object = std::env::temp_dir().join(format!("rq-kernel-budget-{}-{file}.o", std::process::id()));
        let result = Command::new(&nvcc)
            .current_dir(repo)
            .args(["-O3", "--std=c++17", "--resource-usage", "-arch=sm_90a", "-I", ".", "-c"])
            .arg(Path::new("cuda").join(&file))
            .arg("-o")
            .arg(&object)
            .output();
        let _ = std::fs::remove_file(&object);
        match result {
            Ok(o) if o.status.success() => {
                let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                let entries = parse_ptxas(&text);
                if entries.is_empty() {
                    println!("| {file} | (no kernels) | | | |");
                }
                for r in entries {
                    println!("| {file} | `{}` | {} | {} B | {} |", r.kernel, r.registers, r.smem, r.spill);
                }
            }
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                let first = err.lines().find(|l| l.contains("error")).unwrap_or("(no message)");
                println!("| {file} | **nvcc failed**: {} | | | |", first.replace('|', "/"));
            }
            Err(e) => println!("| {file} | nvcc did not run: {e} | | | |"),
        }
    }
    println!(
        "\nH100 limits: 255 registers / thread, 65536 registers and 228 KiB shared memory / SM, \
         48 KiB static shared memory / block."
    );
}

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    println!("# Kernel budget: Llama-3-8B calibration forward, counted from the shapes (no GPU)\n");
    let launches = layer_forward();
    launch_table(&launches);
    kernel_totals(&launches);
    memory_table();
    resource_table(repo);
}

