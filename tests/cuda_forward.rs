//! The forward kernels of cuda/forward.cu against their CPU twins (src/compute/cpu/), in the
//! style of llm.c's dev/cuda: seeded random data, several shapes including odd ones (1 row,
//! widths that are no multiple of a tile), every output buffer poisoned with NaN before the
//! run (an element the kernel does not write fails), NaN inputs that must come out as NaN
//! where the CPU's do, and a stated error bound per kernel. Each test prints its rows of the
//! table `kernel | shapes | max err | bound`, where err is |gpu - cpu| / denom and denom is
//! the kernel's scale (stated in the row): |cpu| for element-wise results, Σ|x·w| for a dot
//! product, and so on. eps is f32's 2^-23; bf16 results are allowed one bf16 ulp (2^-7
//! relative) where the CPU rounds, since a few-ulp f32 difference before a rounding may land
//! on the neighbouring bf16 value. Under the host emulator (feature `cuda-emu`) most errors
//! are 0: the kernels spell out every rounding the CPU does.
//!
//! Without a driver or GPU (feature `cuda`) each test prints "skipped: <reason>" and passes.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

#[allow(dead_code)]
mod common;

use common::{Rng, dev, have_gpu, poisoned, say};
use rq_min::compute::cuda;
use rq_min::compute::{act_fn, cpu, Activation, Alibi, Attention, Rope, RopeConfig, RopeScaling};
use rq_min::io::safetensors::SafeTensors;

const EPS: f64 = f32::EPSILON as f64;
const BF16_ULP: f64 = 1.0 / 128.0;

fn normals(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

/// Rows of a kernel's table, printed at the end of its test.
struct Table {
    kernel: &'static str,
    rows: Vec<String>,
}

impl Table {
    fn new(kernel: &'static str) -> Table {
        Table { kernel, rows: Vec::new() }
    }

    /// Compares `gpu` with `cpu` element-wise: NaN exactly where the CPU has NaN, otherwise
    /// |gpu - cpu| / denom(i) <= bound (equal values, infinities included, are error 0).
    /// Records the max error under `shape` and returns it.
    fn check(&mut self, shape: &str, gpu: &[f32], cpu: &[f32], denom: impl Fn(usize) -> f64, bound: f64, what: &str) -> f64 {
        assert_eq!(gpu.len(), cpu.len(), "{} {shape}: lengths", self.kernel);
        let mut max_err = 0f64;
        for i in 0..gpu.len() {
            let (g, c) = (gpu[i], cpu[i]);
            assert_eq!(g.is_nan(), c.is_nan(), "{} {shape}: element {i}: gpu {g}, cpu {c} (NaN where the other is not)", self.kernel);
            if g.is_nan() || g == c {
                continue;
            }
            let err = (f64::from(g) - f64::from(c)).abs() / denom(i).max(f64::MIN_POSITIVE);
            assert!(err <= bound, "{} {shape}: element {i}: gpu {g}, cpu {c}, err {err:.3e} > bound {bound:.3e} ({what})", self.kernel);
            max_err = max_err.max(err);
        }
        self.rows.push(format!("| {} | {shape} | {max_err:.2e} | {bound:.2e} ({what}) |", self.kernel));
        max_err
    }

    fn note(&mut self, shape: &str, text: &str) {
        self.rows.push(format!("| {} | {shape} | {text} | |", self.kernel));
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        if !self.rows.is_empty() {
            say(&self.rows.join("\n"));
        }
    }
}

fn rel(c: &[f32]) -> impl Fn(usize) -> f64 + '_ {
    |i| f64::from(c[i]).abs()
}

// ---- norms ---------------------------------------------------------------------------------------

const NORM_SHAPES: [(usize, usize); 7] = [(1, 1), (1, 5), (3, 64), (37, 129), (3, 300), (2, 1000), (37, 5)];

#[test]
fn rms_norm_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0001);
    let mut table = Table::new("rms_norm");
    for &(rows, cols) in &NORM_SHAPES {
        let mut x = normals(&mut rng, rows * cols, 3.0);
        let mut w: Vec<f32> = (0..cols).map(|_| 1.0 + 0.3 * rng.normal()).collect();
        for nan in [false, true] {
            if nan {
                // A NaN in the last row's first value and in the last weight.
                x[(rows - 1) * cols] = f32::NAN;
                w[cols - 1] = f32::NAN;
            }
            for (offset, bf16) in [(false, false), (false, true), (true, false), (true, true)] {
                let mut want = vec![0f32; x.len()];
                match (offset, bf16) {
                    (false, false) => cpu::rms_norm(&x, &w, 1e-5, &mut want),
                    (false, true) => cpu::rms_norm_bf16(&x, &w, 1e-5, &mut want),
                    (true, false) => cpu::rms_norm_offset(&x, &w, 1e-5, &mut want),
                    (true, true) => cpu::rms_norm_offset_bf16(&x, &w, 1e-5, &mut want),
                }
                let mut out = poisoned(x.len());
                cuda::rms_norm(&dev(&x), &dev(&w), 1e-5, offset, bf16, &mut out).unwrap();
                let shape = format!("{rows}x{cols} offset={offset} bf16={bf16}{}", if nan { " NaN in" } else { "" });
                // f64 sum of squares in another order: inv_rms may differ by an ulp.
                let (bound, what) = if bf16 { (BF16_ULP, "rel, 1 bf16 ulp") } else { (4.0 * EPS, "rel, 4 eps") };
                table.check(&shape, &out.to_vec().unwrap(), &want, rel(&want), bound, what);
            }
        }
    }
}

#[test]
fn layer_norm_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0002);
    let mut table = Table::new("layer_norm");
    for &(rows, cols) in &NORM_SHAPES {
        // An offset mean, so that x - mean cancels.
        let mut x: Vec<f32> = (0..rows * cols).map(|_| 2.0 + rng.normal()).collect();
        let w: Vec<f32> = (0..cols).map(|_| 1.0 + 0.3 * rng.normal()).collect();
        let b = normals(&mut rng, cols, 0.5);
        for nan in [false, true] {
            if nan {
                x[rows * cols - 1] = f32::NAN;
            }
            for with_bias in [false, true] {
                let bias = with_bias.then_some(b.as_slice());
                let mut want = vec![0f32; x.len()];
                cpu::layer_norm(&x, &w, bias, 1e-5, &mut want);
                let mut out = poisoned(x.len());
                let b_dev = dev(&b);
                cuda::layer_norm(&dev(&x), &dev(&w), with_bias.then_some(&b_dev), 1e-5, &mut out).unwrap();
                // Scale: |out| plus |w| · |mean| · inv_std, the size of the term that cancels
                // (an ulp of the f32 mean moves x - mean by that much).
                let scale: Vec<f64> = (0..x.len())
                    .map(|i| {
                        let row = &x[i / cols * cols..][..cols];
                        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / cols as f64;
                        let var = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / cols as f64;
                        f64::from(want[i]).abs() + f64::from(w[i % cols]).abs() * mean.abs() / (var + 1e-5).sqrt()
                    })
                    .collect();
                let shape = format!("{rows}x{cols} bias={with_bias}{}", if nan { " NaN in" } else { "" });
                table.check(&shape, &out.to_vec().unwrap(), &want, |i| scale[i], 4.0 * EPS, "|out| + |w·mean|/std, 4 eps");
            }
        }
    }
}

// ---- matmul --------------------------------------------------------------------------------------

#[test]
fn matmul_bt_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0003);
    let mut table = Table::new("matmul_bt");
    // (rows, k, n): single elements, k below / above / not a multiple of the 16-wide k tile,
    // rows and n around the 64 × 64 output tile.
    let shapes = [(1, 1, 1), (3, 5, 7), (1, 64, 129), (37, 129, 65), (64, 16, 64), (65, 17, 3), (5, 300, 70), (130, 257, 200)];
    for &(m, k, n) in &shapes {
        let mut x = normals(&mut rng, m * k, 1.0);
        let w = normals(&mut rng, n * k, 0.05);
        for nan in [false, true] {
            if nan {
                x[(m - 1) * k + k / 2] = f32::NAN; // the last row of out becomes NaN
            }
            let mut want = vec![0f32; m * n];
            cpu::matmul_bt(&x, &w, m, k, n, &mut want);
            let (xd, wd) = (dev(&x), dev(&w));
            let mut out = poisoned(m * n);
            cuda::matmul_bt(&xd, &wd, m, k, n, &mut out).unwrap();
            let got = out.to_vec().unwrap();
            let mut naive = poisoned(m * n);
            cuda::matmul_bt_naive(&xd, &wd, m, k, n, &mut naive).unwrap();
            let naive = naive.to_vec().unwrap();
            // The standard dot-product bound: |error| <= c · eps · Σ|x w|; rounding errors of
            // random sign grow like sqrt(k).
            let abs_dot: Vec<f64> = (0..m * n)
                .map(|e| {
                    let (r, c) = (e / n, e % n);
                    (0..k).map(|p| f64::from(x[r * k + p] * w[c * k + p]).abs()).sum()
                })
                .collect();
            let bound = 4.0 * EPS * (k as f64).sqrt();
            let shape = format!("{m}x{k}x{n}{}", if nan { " NaN in" } else { "" });
            table.check(&shape, &got, &want, |i| abs_dot[i], bound, "Σ|x·w|, 4 eps sqrt(k)");
            table.check(&format!("{shape} tiled vs naive kernel"), &got, &naive, |i| abs_dot[i], 0.0, "identical");
        }
    }
}

// ---- element-wise ----------------------------------------------------------------------------------

#[test]
fn elementwise_match_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0004);
    let mut table = Table::new("add / add_row_bias / round_bf16");
    for &(rows, cols) in &[(1, 1), (3, 5), (37, 129), (2, 1000)] {
        let n = rows * cols;
        let mut x = normals(&mut rng, n, 10.0);
        let mut y = normals(&mut rng, n, 10.0);
        let bias = normals(&mut rng, cols, 1.0);
        x[0] = f32::NAN;
        y[n - 1] = f32::INFINITY;
        // add
        let mut want = x.clone();
        cpu::add_in_place(&mut want, &y);
        let mut xd = dev(&x);
        cuda::add(&mut xd, &dev(&y)).unwrap();
        table.check(&format!("add {rows}x{cols}"), &xd.to_vec().unwrap(), &want, rel(&want), 0.0, "identical");
        // add_row_bias
        let mut want = x.clone();
        want.chunks_exact_mut(cols).for_each(|row| cpu::add_in_place(row, &bias));
        let mut xd = dev(&x);
        cuda::add_row_bias(&mut xd, &dev(&bias), cols).unwrap();
        table.check(&format!("add_row_bias {rows}x{cols}"), &xd.to_vec().unwrap(), &want, rel(&want), 0.0, "identical");
        // round_bf16: values on both sides of bf16 ties, and tiny, huge and NaN values.
        let mut r = x.clone();
        for (i, v) in r.iter_mut().enumerate().skip(1) {
            match i % 5 {
                0 => *v = f32::from_bits((v.to_bits() & !0xFFFF) | 0x8000), // an exact tie
                1 => *v = f32::from_bits(rng.next() as u32),
                _ => {}
            }
        }
        let mut want = r.clone();
        cpu::round_slice_bf16(&mut want);
        let mut xd = dev(&r);
        cuda::round_bf16(&mut xd).unwrap();
        table.check(&format!("round_bf16 {n}"), &xd.to_vec().unwrap(), &want, rel(&want), 0.0, "identical");
    }
}

fn act_name(act: Activation) -> &'static str {
    match act {
        Activation::Silu => "silu",
        Activation::GeluTanh => "gelu_tanh",
        Activation::Relu2 => "relu2",
        Activation::Gelu => "gelu",
    }
}

#[test]
fn activations_match_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0005);
    let mut table = Table::new("gated_mul / activate");
    let emu = cfg!(feature = "cuda-emu");
    for n in [1, 5, 129, 1000] {
        let mut gate = normals(&mut rng, n, 4.0);
        let up = normals(&mut rng, n, 2.0);
        gate[n - 1] = f32::NAN;
        if n > 2 {
            gate[0] = 30.0;
            gate[1] = -30.0;
        }
        for act in [Activation::Silu, Activation::GeluTanh, Activation::Relu2, Activation::Gelu] {
            // The GPU's expf / tanhf / erff are within 2 ulp, not correctly rounded: a few eps of
            // |out|, plus for the GELUs |x|·eps (1 + tanh, 1 + erf cancel for negative x). relu2
            // is exact, and so is everything under the emulator (glibc's libm on both sides).
            let f = act_fn(act);
            let scale_act: Vec<f64> = gate.iter().map(|&g| f64::from(f(g)).abs() + f64::from(g).abs()).collect();
            for bf16 in [false, true] {
                let mut want = gate.clone();
                if bf16 {
                    cpu::gated_mul_bf16(f, &mut want, &up);
                } else {
                    cpu::gated_mul(f, &mut want, &up);
                }
                let mut g = dev(&gate);
                cuda::gated_mul(&mut g, &dev(&up), act, bf16).unwrap();
                let (bound, what) = if emu {
                    (0.0, "identical (emulator)")
                } else if bf16 {
                    (BF16_ULP, "(|act(g)| + |g|)·|up|, 1 bf16 ulp")
                } else {
                    (8.0 * EPS, "(|act(g)| + |g|)·|up|, 8 eps")
                };
                let denom = |i: usize| scale_act[i] * f64::from(up[i]).abs();
                let shape = format!("{} n={n} bf16={bf16}", act_name(act));
                table.check(&shape, &g.to_vec().unwrap(), &want, denom, bound, what);
            }
            let want: Vec<f32> = gate.iter().map(|&v| f(v)).collect();
            let mut g = dev(&gate);
            cuda::activate(&mut g, act).unwrap();
            let shape = format!("activate {} n={n}", act_name(act));
            let (bound, what) = if emu { (0.0, "identical (emulator)") } else { (8.0 * EPS, "|act(x)| + |x|, 8 eps") };
            table.check(&shape, &g.to_vec().unwrap(), &want, |i| scale_act[i], bound, what);
        }
    }
    table.note("relu2(NaN)", "0 on both (Rust f32::max / CUDA fmaxf drop NaN; torch.relu keeps it)");
}

// ---- RoPE ------------------------------------------------------------------------------------------

#[test]
fn rope_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0006);
    let mut table = Table::new("rope");
    let llama3 = RopeConfig {
        theta: 500_000.0,
        scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16,
        },
    };
    let plain = RopeConfig { theta: 10_000.0, scaling: RopeScaling::Default };
    // (seq, heads, head_dim, rotary_dim)
    for &(seq, heads, hd, rot) in &[(1, 1, 2, 2), (3, 2, 8, 8), (37, 3, 64, 64), (5, 2, 10, 4), (40, 1, 130, 130)] {
        for (name, config) in [("default", &plain), ("llama3", &llama3)] {
            let rope = Rope::partial(config, hd, rot, seq + 3);
            let (cos, sin) = rope.tables();
            let (cos, sin) = (dev(cos), dev(sin));
            let mut x = normals(&mut rng, seq * heads * hd, 20.0);
            let last = x.len() - 1 - (hd - rot);
            x[last] = f32::NAN; // in the last rotated dim of the last head
            for bf16 in [false, true] {
                let mut want = x.clone();
                if bf16 {
                    rope.apply_bf16(&mut want, seq, heads);
                } else {
                    rope.apply(&mut want, seq, heads);
                }
                let mut xd = dev(&x);
                cuda::rope(&mut xd, &cos, &sin, seq, heads, hd, rot, bf16).unwrap();
                let shape = format!("{name} seq={seq} heads={heads} hd={hd} rot={rot} bf16={bf16}");
                table.check(&shape, &xd.to_vec().unwrap(), &want, rel(&want), 0.0, "identical");
            }
        }
    }
}

// ---- attention -------------------------------------------------------------------------------------

/// (seq, n_heads, n_kv_heads, head_dim, sliding_window, (scale, softcap) when not the default)
type AttentionShape = (usize, usize, usize, usize, Option<usize>, Option<(f32, Option<f32>)>);

/// The device attention against `cpu::Attention::forward` (the same `flash_bf16` and `alibi`) on
/// random data of each shape, without NaN and with a NaN in q, k or v; `bound(seq)` is the error bound
/// relative to max |v| of the output's column. Returns (outputs, outputs bit-identical to the
/// CPU's, outputs of rows whose visible keys lie in one 128-key block and that differ).
fn attention_cases(
    table: &mut Table,
    rng: &mut Rng,
    shapes: &[AttentionShape],
    flash_bf16: bool,
    alibi: Option<Alibi>,
    bound: impl Fn(usize) -> (f64, &'static str),
) -> (usize, usize, usize) {
    let (mut total, mut equal, mut one_block_differ) = (0, 0, 0);
    for &(seq, nh, nkv, hd, window, scaling) in shapes {
        let (scale, softcap) = scaling.unwrap_or((Attention::default_scale(hd), None));
        let q = normals(rng, seq * nh * hd, 1.5);
        let k = normals(rng, seq * nkv * hd, 1.5);
        let v = normals(rng, seq * nkv * hd, 1.0);
        let attn = Attention { n_heads: nh, n_kv_heads: nkv, head_dim: hd, sliding_window: window, scale, softcap, flash_bf16, alibi };
        let first = |row: usize| window.map_or(0, |w| (row + 1).saturating_sub(w));
        for nan in [None, Some('q'), Some('k'), Some('v')] {
            let (mut q, mut k, mut v) = (q.clone(), k.clone(), v.clone());
            // A NaN in the middle of the sequence, head 0 / kv head 0, dim 1 % hd.
            let t = seq / 2;
            match nan {
                Some('q') => q[t * nh * hd + 1 % hd] = f32::NAN,
                Some('k') => k[t * nkv * hd + 1 % hd] = f32::NAN,
                Some('v') => v[t * nkv * hd + 1 % hd] = f32::NAN,
                _ => {}
            }
            // The CPU multiplies masked keys' values by probability 0 (as HF's eager P·V
            // does), so a NaN value reaches rows that do not see its key; on the GPU a row
            // depends only on the keys it sees. Oracle: the CPU on v with that value 0, and
            // NaN in that dim of the group's heads for the rows that see the key.
            let mut v_cpu = v.clone();
            if nan == Some('v') {
                v_cpu[t * nkv * hd + 1 % hd] = 0.0;
            }
            let mut want = vec![0f32; q.len()];
            attn.forward(&q, &k, &v_cpu, seq, &mut want);
            if nan == Some('v') {
                for row in 0..seq {
                    if first(row) <= t && t <= row {
                        for h in 0..nh / nkv {
                            want[row * nh * hd + h * hd + 1 % hd] = f32::NAN;
                        }
                    }
                }
            }
            let mut out = poisoned(q.len());
            cuda::attention(&dev(&q), &dev(&k), &dev(&v), seq, &attn, &mut out).unwrap();
            // Scale: max |v| of the output's (kv head, dim) column over the sequence (the
            // output is a convex combination of those values).
            let g_of = |i: usize| (i % (nh * hd)) / hd / (nh / nkv);
            let vmax: Vec<f64> = (0..q.len())
                .map(|i| {
                    let (g, d) = (g_of(i), i % hd);
                    (0..seq).map(|s| f64::from(v[s * nkv * hd + g * hd + d]).abs()).filter(|a| !a.is_nan()).fold(0.0, f64::max)
                })
                .collect();
            let shape = format!(
                "seq={seq} heads={nh}/{nkv} hd={hd} window={window:?} scale={scale} softcap={softcap:?} alibi={alibi:?}{}",
                nan.map_or(String::new(), |c| format!(" NaN in {c}"))
            );
            let got = out.to_vec().unwrap();
            let (bound, what) = bound(seq);
            table.check(&shape, &got, &want, |i| vmax[i], bound, what);
            if nan.is_some() {
                assert!(got.iter().any(|x| x.is_nan()), "{shape}: the NaN input vanished");
            }
            for (i, (&g, &c)) in got.iter().zip(&want).enumerate() {
                let row = i / (nh * hd);
                let same = g.to_bits() == c.to_bits() || (g.is_nan() && c.is_nan());
                total += 1;
                equal += usize::from(same);
                one_block_differ += usize::from(!same && first(row) / 128 == row / 128);
            }
        }
    }
    (total, equal, one_block_differ)
}

#[test]
fn attention_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0007);
    let mut table = Table::new("attention");
    // One row, GQA groups, a query tile (8 rows) and key tiles (32 or 16 keys) that the sequence
    // does not fill, odd head_dim, head_dim > 128 (the 16-key kernel), windows of 1 and of more
    // than the sequence.
    let shapes = [
        (1, 1, 1, 8, None, None),
        (3, 2, 2, 5, None, None),
        (5, 4, 1, 16, Some(2), None),
        (37, 4, 2, 64, None, None),
        (37, 4, 2, 64, Some(5), None),
        (40, 2, 1, 160, Some(17), None),
        (33, 3, 3, 32, Some(1), None),
        (20, 2, 1, 24, Some(100), None),
        (130, 4, 2, 128, None, None),
        (130, 2, 2, 128, Some(50), None),
        // A free scale with a soft cap (Gemma2: tanh(s / c) · c on the scaled scores), and a
        // free scale alone (Granite's attention_multiplier).
        (37, 4, 2, 64, Some(8), Some((0.125, Some(0.5)))),
        (130, 2, 1, 160, None, Some((0.0625, Some(3.0)))),
        (40, 4, 2, 32, None, Some((0.03125, None))),
    ];
    // The kernel repeats the CPU's operations in the CPU's order (exp_nonpositive for exp):
    // bit-identical, on the emulator and on a GPU.
    attention_cases(&mut table, &mut rng, &shapes, false, None, |_| (0.0, "bit-identical"));
}

/// BLOOM's and MPT's ALiBi (`slope_h · (j − i)` added to the scaled scores, the slopes uploaded
/// per call): the same operations as the CPU's in the same order, bit-identical as without it.
#[test]
fn attention_alibi_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0011);
    let mut table = Table::new("attention alibi");
    // GQA and an odd sequence with and without a window, heads that are not a power of two (the
    // interleaved slopes), key tiles of 16 (head_dim > 128), a soft cap before the bias.
    let shapes = [
        (1, 1, 1, 8, None, None),
        (37, 4, 2, 64, None, None),
        (37, 4, 2, 64, Some(5), None),
        (130, 6, 2, 128, None, None),
        (40, 12, 4, 160, Some(17), None),
        (37, 4, 2, 64, Some(8), Some((0.125, Some(0.5)))),
    ];
    for alibi in [Alibi::Bloom, Alibi::Mpt { bias_max: 8.0 }] {
        attention_cases(&mut table, &mut rng, &shapes, false, Some(alibi), |_| (0.0, "bit-identical"));
    }
}

/// FlashAttention-2's softmax on a bf16 model (`flash_bf16`): the probabilities of each 128-key
/// block rounded to bf16. On a GPU, exp2f may differ from the CPU's by an ulp and flip a bf16
/// rounding: bound one bf16 ulp of max |v|. Under the emulator exp2f is the CPU's, every
/// probability is the CPU's, and only the order of the P·V sums differs for rows that see more
/// than one block: the f32 bound, and rows within one block bit-identical.
#[test]
fn attention_flash_bf16_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_000B);
    let mut table = Table::new("attention flash_bf16");
    // Several 128-key blocks (seq > 128), windows that start blocks mid-way, GQA, odd head_dim,
    // head_dim > 128 (16-key tiles), a window of 1, one row.
    let shapes = [
        (1, 1, 1, 8, None, None),
        (37, 4, 2, 64, None, None),
        (200, 4, 2, 64, None, None),
        (300, 6, 2, 33, Some(150), None),
        (260, 2, 1, 160, Some(100), None),
        (129, 2, 2, 128, Some(1), None),
        (300, 4, 1, 16, Some(200), None),
    ];
    let emu = cfg!(feature = "cuda-emu");
    let bound = |seq: usize| {
        if emu {
            (16.0 * EPS * (seq as f64).sqrt(), "max|v| of the column, 16 eps sqrt(seq) (emulator)")
        } else {
            (BF16_ULP, "max|v| of the column, 1 bf16 ulp")
        }
    };
    let (total, equal, one_block_differ) = attention_cases(&mut table, &mut rng, &shapes, true, None, bound);
    let share = 100.0 * equal as f64 / total as f64;
    table.note("all shapes", &format!("{equal} of {total} outputs bit-identical ({share:.1}%)"));
    if emu {
        assert_eq!(one_block_differ, 0, "outputs of rows that see one 128-key block differ from the CPU's");
    }
}

// ---- statistics -------------------------------------------------------------------------------------

#[test]
fn channel_amax_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0008);
    let mut table = Table::new("channel_amax");
    for &(rows, cols) in &[(1, 1), (3, 5), (37, 129), (130, 64), (2, 300)] {
        let mut x = normals(&mut rng, rows * cols, 5.0);
        x[rows * cols / 2] = f32::NAN;
        x[0] = f32::NEG_INFINITY;
        // A running amax: half the columns already above anything in x.
        let acc0: Vec<f32> = (0..cols).map(|c| if c % 2 == 0 { 0.0 } else { 100.0 }).collect();
        // The oracle is Tensor::channel_amax's fold with NaN propagating (f32::max drops it).
        let mut want = acc0.clone();
        for row in x.chunks_exact(cols) {
            for (m, &v) in want.iter_mut().zip(row) {
                *m = if m.is_nan() || v.is_nan() { f32::NAN } else { m.max(v.abs()) };
            }
        }
        let mut acc = dev(&acc0);
        cuda::channel_amax(&dev(&x), cols, &mut acc).unwrap();
        table.check(&format!("{rows}x{cols} (NaN, -inf in)"), &acc.to_vec().unwrap(), &want, rel(&want), 0.0, "identical");
    }
}

#[test]
fn log_softmax_nll_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0009);
    let mut table = Table::new("log_softmax_nll");
    for &(rows, vocab) in &[(1, 1), (3, 5), (37, 129), (2, 1000), (4, 3001)] {
        let logits = normals(&mut rng, rows * vocab, 6.0);
        let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
        let want: Vec<f64> =
            logits.chunks_exact(vocab).zip(&targets).map(|(row, &t)| cpu::log_softmax_nll(row, t as usize)).collect();
        let mut out = dev(&vec![f64::NAN; rows]);
        cuda::log_softmax_nll(&dev(&logits), vocab, &dev(&targets), &mut out).unwrap();
        let got = out.to_vec().unwrap();
        // The CPU's exponentials are within 2e-7 relative (exp_nonpositive), the GPU's exact in
        // f64: |Δ nll| <= ~2e-7 absolute.
        let mut max_err = 0f64;
        for (r, (&g, &c)) in got.iter().zip(&want).enumerate() {
            let err = (g - c).abs() / c.abs().max(1.0);
            assert!(err <= 1e-6, "row {r} of {rows}x{vocab}: gpu {g}, cpu {c}, err {err:.2e}");
            max_err = max_err.max(err);
        }
        table.rows.push(format!("| log_softmax_nll | {rows}x{vocab} | {max_err:.2e} | 1.00e-6 (abs, or rel above 1) |"));
        // A NaN logit (not the target) makes its row NaN; the other rows are unchanged.
        let mut with_nan = logits.clone();
        with_nan[(rows - 1) * vocab + (targets[rows - 1] as usize + 1) % vocab] = f32::NAN;
        cuda::log_softmax_nll(&dev(&with_nan), vocab, &dev(&targets), &mut out).unwrap();
        let got_nan = out.to_vec().unwrap();
        assert!(got_nan[rows - 1].is_nan(), "{rows}x{vocab}: a NaN logit gave nll {}", got_nan[rows - 1]);
        assert_eq!(got_nan[..rows - 1], got[..rows - 1], "{rows}x{vocab}: rows without NaN changed");
    }
    // A target outside the vocabulary is NaN, not a read out of bounds.
    let mut out = dev(&[0f64]);
    cuda::log_softmax_nll(&dev(&[1.0f32, 2.0]), 2, &dev(&[2u32]), &mut out).unwrap();
    assert!(out.to_vec().unwrap()[0].is_nan());
    table.note("NaN logit", "NaN on the GPU (the CPU's exp_nonpositive maps NaN to e^-87)");
}

/// `Tensor::norm` on the device for every norm a family uses (RMSNorm, Gemma's offset RMSNorm,
/// LayerNorm with and without bias, Nemotron's LayerNorm1P), f32 and bf16 arithmetic: as the
/// CPU's, bit for bit.
#[test]
fn every_norm_kind_runs_on_the_device() {
    if !have_gpu() {
        return;
    }
    use rq_min::compute::{take_device_error, Compute, Device, NormKind, Tensor};
    let mut rng = Rng(0x5EED_000C);
    let (rows, cols) = (7, 96);
    let x = normals(&mut rng, rows * cols, 3.0);
    let w = normals(&mut rng, cols, 0.5);
    let b = normals(&mut rng, cols, 0.1);
    for (layer_norm, offset, bias) in [(false, false, false), (false, true, false), (true, false, false), (true, false, true), (true, true, true)] {
        let norm = NormKind { layer_norm, offset, eps: 1e-5 };
        for c in [Compute::F32, Compute::Bf16] {
            let what = format!("layer_norm {layer_norm} offset {offset} bias {bias} {c:?}");
            let host_bias = bias.then(|| Tensor::from(b.clone()));
            let want = Tensor::from(x.clone()).norm(c, norm, &Tensor::from(w.clone()), host_bias.as_ref());
            let dev_bias = bias.then(|| Tensor::on(b.clone(), Device::Cuda));
            let got = Tensor::on(x.clone(), Device::Cuda).norm(c, norm, &Tensor::on(w.clone(), Device::Cuda), dev_bias.as_ref());
            assert_eq!(got.device(), Device::Cuda, "{what}");
            assert_eq!(got.into_host(), want.into_host(), "{what}");
        }
    }
    take_device_error().unwrap();
}

// ---- row movement ------------------------------------------------------------------------------------

/// Copies, gathers and the MoE block's weighted scatter-add (cuda/rows.cu, and device-to-device
/// copies) through `Tensor`, device against CPU: bit-identical (same operations, same order).
#[test]
fn row_movement_matches_cpu() {
    if !have_gpu() {
        return;
    }
    use rq_min::compute::{take_device_error, Compute, Device, Tensor};
    let mut rng = Rng(0x5EED_000A);
    let mut table = Table::new("rows");
    for &(rows, cols) in &[(1, 1), (5, 3), (37, 129), (64, 300)] {
        let x = normals(&mut rng, rows * cols, 2.0);
        let (h, d) = (Tensor::from(x.clone()), Tensor::on(x.clone(), Device::Cuda));
        assert_eq!(d.device(), Device::Cuda);
        let shape = format!("{rows}x{cols}");
        // clone and a range of rows: device-to-device copies.
        assert_eq!(d.clone().into_host(), x, "{shape}: clone");
        let range = rows / 3..rows - rows / 4;
        assert_eq!(d.rows(range.clone(), cols).into_host(), h.rows(range, cols).into_host(), "{shape}: rows");
        // gather (the embedding lookup, the tokens routed to an expert): repeats and any order.
        let picks: Vec<usize> = (0..rows + 3).map(|_| rng.below(rows)).collect();
        assert_eq!(d.gather_rows(&picks, cols).into_host(), h.gather_rows(&picks, cols).into_host(), "{shape}: gather");
        // index_add_weighted into distinct rows, f32 and bf16 rounding.
        let mut targets: Vec<usize> = (0..rows).collect();
        for i in (1..rows).rev() {
            targets.swap(i, rng.below(i + 1));
        }
        let routed: Vec<(usize, f32)> = targets[..rows.div_ceil(2)].iter().map(|&t| (t, rng.uniform(0.0, 1.0))).collect();
        let src = normals(&mut rng, routed.len() * cols, 1.0);
        for c in [Compute::F32, Compute::Bf16] {
            let (mut oh, mut od) = (h.clone(), d.clone());
            oh.index_add_weighted(c, &Tensor::from(src.clone()), &routed, cols);
            od.index_add_weighted(c, &Tensor::on(src.clone(), Device::Cuda), &routed, cols);
            assert_eq!(od.device(), Device::Cuda);
            assert_eq!(od.into_host(), oh.into_host(), "{shape}: index_add_weighted {c:?}");
        }
        table.note(&shape, "clone, rows, gather_rows, index_add_weighted (f32, bf16): bit-identical");
    }
    take_device_error().unwrap();
    // Bad indices are errors before any launch.
    let x = dev(&[0f32; 6]);
    let mut out = poisoned(2);
    assert!(cuda::gather_rows(&x, 2, &[3], &mut out).is_err(), "row 3 of 3 rows");
    let mut acc = dev(&[0f32; 6]);
    assert!(cuda::index_add_weighted(&mut acc, &dev(&[0f32; 4]), 2, &[(1, 1.0), (1, 1.0)], false).is_err(), "a repeated row");
    assert!(cuda::index_add_weighted(&mut acc, &dev(&[0f32; 2]), 2, &[(3, 1.0)], false).is_err(), "row 3 of 3 rows");
    let mut short = poisoned(4);
    assert!(short.copy_from_device(&x, 3).is_err(), "4 values from 3 of 6");
}

/// `Tensor::log_softmax_nll` (the head's perplexity terms) on the device against the CPU.
#[test]
fn tensor_nll_matches_cpu() {
    if !have_gpu() {
        return;
    }
    use rq_min::compute::{Device, Tensor};
    let mut rng = Rng(0x5EED_000B);
    let (rows, vocab) = (33, 517);
    let logits = normals(&mut rng, rows * vocab, 5.0);
    let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
    let cpu_nll = Tensor::from(logits.clone()).log_softmax_nll(vocab, &targets);
    let dev_nll = Tensor::on(logits, Device::Cuda).log_softmax_nll(vocab, &targets);
    for (r, (c, g)) in cpu_nll.iter().zip(&dev_nll).enumerate() {
        assert!((c - g).abs() <= 1e-6 * c.abs().max(1.0), "row {r}: cpu {c} device {g}");
    }
}

// ---- shape checks --------------------------------------------------------------------------------

#[test]
fn wrong_shapes_are_usage_errors() {
    if !have_gpu() {
        return;
    }
    let (a, b) = (dev(&[0f32; 6]), dev(&[0f32; 4]));
    let mut out = poisoned(6);
    assert!(cuda::rms_norm(&a, &b, 1e-5, false, false, &mut out).is_err(), "6 values are not rows of 4");
    assert!(cuda::matmul_bt(&a, &b, 3, 2, 3, &mut out).is_err(), "w is not 3x2");
    assert!(cuda::matmul_bt(&a, &b, 3, 2, 2, &mut out).is_ok(), "3x2 · (2x2)ᵀ");
    let mut out4 = poisoned(4);
    let attn = |n_heads, n_kv_heads, sliding_window, softcap, flash_bf16| Attention {
        n_heads,
        n_kv_heads,
        head_dim: 1,
        sliding_window,
        scale: 1.0,
        softcap,
        flash_bf16,
        alibi: None,
    };
    assert!(cuda::attention(&b, &b, &b, 2, &attn(2, 1, Some(0), None, false), &mut out4).is_err(), "a window of 0");
    assert!(cuda::attention(&b, &b, &b, 1, &attn(3, 2, None, None, true), &mut out4).is_err(), "3 heads over 2 kv heads");
    assert!(cuda::attention(&b, &b, &b, 2, &attn(2, 1, None, Some(-1.0), false), &mut out4).is_err(), "a negative softcap");
    assert!(cuda::attention(&b, &b, &b, 2, &attn(2, 1, None, Some(1.0), true), &mut out4).is_err(), "softcap with flash_bf16");
    // Shapes that fit (q [2, 2 heads], k and v [2, 1 kv head]): only the flag combination is refused.
    let kv = dev(&[0f32; 2]);
    let alibi = Attention { alibi: Some(Alibi::Bloom), ..attn(2, 1, None, None, true) };
    assert!(cuda::attention(&b, &kv, &kv, 2, &alibi, &mut out4).is_err(), "ALiBi with flash_bf16");
    let alibi = Attention { flash_bf16: false, ..alibi };
    assert!(cuda::attention(&b, &kv, &kv, 2, &alibi, &mut out4).is_ok(), "ALiBi");
    let mut x = dev(&[0f32; 4]);
    assert!(cuda::rope(&mut x, &a, &a, 1, 1, 4, 3, false).is_err(), "odd rotary_dim");
    assert!(cuda::rope(&mut x, &a, &a, 4, 1, 1, 0, false).is_ok(), "nothing rotates");
    let mut acc = poisoned(3);
    assert!(cuda::channel_amax(&a, 4, &mut acc).is_err(), "acc of 3 for 4 columns");
}

// ---- real weights ------------------------------------------------------------------------------------

/// Layer 0 of tests/fixtures/families-llama (a tiny f32 Llama): input_layernorm then the
/// q/k/v/o and MLP projections of random activations, GPU against CPU.
#[test]
fn llama_layer0_weights_match_cpu() {
    if !have_gpu() {
        return;
    }
    let dir = common::repo_dir().join("tests/fixtures/families-llama");
    let st = SafeTensors::open(&dir.join("model.safetensors")).unwrap();
    let get = |name: &str| st.tensor(&format!("model.layers.0.{name}")).unwrap().to_f32().unwrap();
    let (hidden, rows) = (128, 19);
    let mut rng = Rng(0x5EED_000A);
    let mut table = Table::new("llama layer 0");
    let x = normals(&mut rng, rows * hidden, 1.0);
    let ln = get("input_layernorm.weight");
    let mut want = vec![0f32; x.len()];
    cpu::rms_norm(&x, &ln, 1e-5, &mut want);
    let mut normed = poisoned(x.len());
    cuda::rms_norm(&dev(&x), &dev(&ln), 1e-5, false, false, &mut normed).unwrap();
    let normed_host = normed.to_vec().unwrap();
    table.check(&format!("input_layernorm {rows}x{hidden}"), &normed_host, &want, rel(&want), 4.0 * EPS, "rel, 4 eps");
    for proj in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"] {
        let w = get(&format!("{proj}.weight"));
        let n = w.len() / hidden;
        let mut want = vec![0f32; rows * n];
        cpu::matmul_bt(&normed_host, &w, rows, hidden, n, &mut want);
        let mut out = poisoned(rows * n);
        cuda::matmul_bt(&normed, &dev(&w), rows, hidden, n, &mut out).unwrap();
        let abs_dot: Vec<f64> = (0..rows * n)
            .map(|e| (0..hidden).map(|p| f64::from(normed_host[e / n * hidden + p] * w[e % n * hidden + p]).abs()).sum())
            .collect();
        let bound = 4.0 * EPS * (hidden as f64).sqrt();
        table.check(&format!("{proj} {rows}x{hidden}x{n}"), &out.to_vec().unwrap(), &want, |i| abs_dot[i], bound, "Σ|x·w|, 4 eps sqrt(k)");
    }
}

// ---- the logits' last steps -------------------------------------------------------------------------

/// Granite's division and Gemma2's soft cap on the device against `cpu::finish_logits`,
/// f32 and bf16, each alone and both: bit-identical (tanhf and the divisions are the CPU's
/// under the emulator; on a GPU tanhf may differ by an ulp). A NaN logit stays NaN.
#[test]
fn finish_logits_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0031);
    let mut table = Table::new("finish_logits");
    let mut x = normals(&mut rng, 3 * 517, 8.0);
    x[100] = f32::NAN;
    for (divisor, cap) in [(Some(8.0), None), (None, Some(0.5)), (None, Some(30.0)), (Some(3.0), Some(2.0))] {
        for bf16 in [false, true] {
            let mut want = x.clone();
            cpu::finish_logits(bf16, &mut want, divisor, cap);
            let mut d = dev(&x);
            cuda::finish_logits(&mut d, divisor, cap, bf16).unwrap();
            let got = d.to_vec().unwrap();
            assert!(got[100].is_nan(), "the NaN logit vanished");
            // On a GPU tanhf is within 2 ulp of the CPU's, which can flip a bf16 rounding.
            let bound = match (cfg!(feature = "cuda-emu"), bf16) {
                (true, _) => 0.0,
                (false, true) => 2.0 * BF16_ULP,
                (false, false) => 8.0 * EPS,
            };
            let shape = format!("divisor={divisor:?} cap={cap:?} bf16={bf16}");
            table.check(&shape, &got, &want, |i| f64::from(want[i].abs()).max(1e-3), bound, "relative");
        }
    }
    assert!(cuda::finish_logits(&mut dev(&x), Some(0.0), None, false).is_err(), "a divisor of 0");
    assert!(cuda::finish_logits(&mut dev(&x), None, Some(f32::INFINITY), false).is_err(), "an infinite cap");
}
