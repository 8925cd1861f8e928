#![cfg(any(feature = "cuda", feature = "cuda-emu"))]
//! The NVFP4 kernels of cuda/quant_nvfp4.cu against their CPU twins in src/quant/nvfp4.rs, which
//! they must reproduce bit for bit: the weight export (packed E2M1 codes and E4M3 block scales,
//! byte-identical), the fake quant (identical f32 bits) and per-row block amaxes. Data: seeded
//! random values of several magnitudes, arbitrary bit patterns, values exactly on the E2M1
//! rounding ties, zeros, -0.0, tiny and subnormal values, all-zero blocks, NaN and ±inf, odd row
//! counts, and the real weights of layer 0 of ../shared/models/rq-tiny when it is there. Output
//! buffers are poisoned before each run (the export twice, with 0x00 and 0xFF bytes: a byte the
//! kernel does not write differs in one of the runs).
//!
//! NaN: the block amax propagates it. The export and the fake quant follow the CPU (ModelOpt's
//! threshold chain): a NaN weight gets the E2M1 code 7 (there is no NaN code), a NaN activation
//! fake-quantizes to -6 × its block scale; both are checked equal to the CPU's.
//!
//! Without a driver or GPU (feature `cuda`) each test prints "skipped: <reason>" and passes.

#[allow(dead_code)]
mod common;


use common::{Rng, dev, have_gpu, say};
use rq_min::compute::cuda;
use rq_min::io::safetensors::Checkpoint;
use rq_min::quant::fp8::absmax;
use rq_min::quant::nvfp4::{self, BLOCK};

/// Test weights of `n` values around `std`: normal values with every 97th an outlier 30x larger,
/// every 11th from a set of specials (zeros, tiny, subnormal), every 13th an arbitrary bit
/// pattern (never NaN; `specials` adds NaN and inf where wanted).
fn weights(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|i| match (i % 97, i % 11, i % 13) {
            (0, _, _) => rng.normal() * std * 30.0,
            (_, 0, _) => [0.0, -0.0, 1e-30, -1e-40, f32::MIN_POSITIVE, std * 1e-6][rng.below(6)],
            (_, _, 0) => loop {
                let x = f32::from_bits(rng.next() as u32);
                if !x.is_nan() {
                    break x;
                }
            },
            _ => rng.normal() * std,
        })
        .collect()
}

/// Blocks of 16 whose amax fixes the block scale to exactly 1 (with weight_scale_2 = 1/64:
/// s = 6 / (6 / 64) = 64, an E4M3 value, scale = 64 / 64), holding every E2M1 rounding tie and
/// its neighbours, both signs, -0.0 and negative values that round to 0.
fn tie_blocks() -> (Vec<f32>, f32) {
    let ties = [0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];
    let mut w = Vec::new();
    for sign in [1.0f32, -1.0] {
        let mut block = vec![6.0 * sign];
        for &t in &ties {
            block.push(t * sign);
            block.push(f32::from_bits(t.to_bits() + 1) * sign); // just above the tie
        }
        block.push(-0.0);
        w.extend(block);
        let mut below: Vec<f32> = ties.iter().map(|&t| f32::from_bits(t.to_bits() - 1) * sign).collect();
        below.extend([6.0, -0.1, -0.25, -1e-30, 0.0, f32::from_bits(0x8000_0001), 5.999, -5.0, 4.0]);
        w.extend(below);
    }
    (w, 1.0 / 64.0)
}

/// Runs the export on the device twice (outputs poisoned with 0x00, then 0xFF) and checks both
/// against `nvfp4::quantize_weight_scaled`, byte for byte. Returns the number of blocks.
fn check_quantize(what: &str, w: &[f32], out: usize, inp: usize, ws2: f32) -> usize {
    let want = nvfp4::quantize_weight_scaled(what, w, out, inp, ws2).unwrap();
    let wd = dev(w);
    for poison in [0x00u8, 0xFF] {
        let mut packed = dev(&vec![poison; w.len() / 2]);
        let mut scales = dev(&vec![poison; w.len() / BLOCK]);
        cuda::quantize_nvfp4_device(&wd, out, inp, ws2, &mut packed, &mut scales).unwrap();
        let (packed, scales) = (packed.to_vec().unwrap(), scales.to_vec().unwrap());
        for (b, (&g, &c)) in scales.iter().zip(&want.block_scales).enumerate() {
            assert_eq!(g, c, "{what} [{out}, {inp}] ws2 {ws2:e} poison {poison:#04x}: block scale {b}: gpu {g:#04x}, cpu {c:#04x}");
        }
        for (i, (&g, &c)) in packed.iter().zip(&want.packed).enumerate() {
            let block = &w[i / (BLOCK / 2) * BLOCK..][..BLOCK];
            assert_eq!(
                g, c,
                "{what} [{out}, {inp}] ws2 {ws2:e} poison {poison:#04x}: packed byte {i} (values {:?}, block {block:?}): \
                 gpu {g:#04x}, cpu {c:#04x}",
                &w[2 * i..2 * i + 2]
            );
        }
    }
    w.len() / BLOCK
}

#[test]
fn quantize_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0101);
    let mut blocks = 0;
    // (out, inp): one block, odd row counts, rows of many blocks.
    for &(out, inp) in &[(1, 16), (3, 32), (37, 48), (5, 256), (129, 64), (2, 1024)] {
        for std in [1e-3f32, 0.02, 1.0, 300.0] {
            let mut w = weights(&mut rng, out * inp, std);
            w[..BLOCK].fill(0.0); // an all-zero block: scale 1
            if out * inp >= 3 * BLOCK {
                w[BLOCK..2 * BLOCK].iter_mut().for_each(|v| *v *= 1e-30); // a subnormal-scale block
            }
            let ws2 = nvfp4::weight_scale_2(absmax(&w));
            blocks += check_quantize("random", &w, out, inp, ws2);
            // A smaller global scale: block scales saturate at 448 and codes at 6.
            blocks += check_quantize("random, saturating", &w, out, inp, ws2 / 64.0);
        }
    }
    // Exact E2M1 ties (scale 1).
    let (w, ws2) = tie_blocks();
    blocks += check_quantize("ties", &w, w.len() / 32, 32, ws2);
    // NaN and inf weights: the CPU's fold drops NaN from the amax, gives NaN the code 7 and an
    // infinite amax the saturated scale 448.
    let mut w = weights(&mut rng, 7 * 48, 0.02);
    w[3] = f32::NAN;
    w[20] = -f32::NAN;
    w[40] = f32::INFINITY;
    w[60] = f32::NEG_INFINITY;
    w[80..96].fill(f32::NAN);
    blocks += check_quantize("NaN and inf", &w, 7, 48, nvfp4::weight_scale_2(0.5));
    say(&format!("| quantize_nvfp4 | random, ties, NaN/inf | {blocks} blocks byte-identical |"));
}

/// Layer 0 of rq-tiny (bf16 weights): every linear, and the first 37 rows of q_proj.
#[test]
fn quantize_rq_tiny_weights_match_cpu() {
    if !have_gpu() {
        return;
    }
    let Some(shared) = common::shared_dir() else { return };
    let ckpt = Checkpoint::open(&shared.join("models/rq-tiny")).unwrap();
    let mut blocks = 0;
    let projs = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    for proj in projs {
        let name = format!("model.layers.0.{proj}.weight");
        let t = ckpt.get(&name).unwrap();
        let (out, inp) = (t.shape[0], t.shape[1]);
        let w = t.to_f32().unwrap();
        let ws2 = nvfp4::weight_scale_2(absmax(&w));
        blocks += check_quantize(&name, &w, out, inp, ws2);
        if proj == "self_attn.q_proj" {
            blocks += check_quantize(&name, &w[..37 * inp], 37, inp, ws2);
        }
    }
    say(&format!("| quantize_nvfp4 | rq-tiny layer 0 | {blocks} blocks byte-identical |"));
}

/// Same bits, or both NaN (a NaN made by the arithmetic has no fixed payload or sign).
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn fake_quant_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0102);
    let mut checked = 0;
    // cols not a multiple of 16 (partial last blocks), one value, odd row counts.
    for &(rows, cols) in &[(1, 1), (3, 5), (7, 17), (37, 129), (4, 300), (2, 64), (1, 16)] {
        for std in [1e-4f32, 0.5, 50.0] {
            let mut x = weights(&mut rng, rows * cols, std);
            let amax = absmax(&x);
            x[rows * cols / 2] = f32::NAN;
            if rows * cols > 2 {
                x[rows * cols - 1] = f32::NEG_INFINITY;
            }
            // amax as calibrated, a smaller one (saturating block scales), 0 (the 1e-12 global
            // scale and the 1e-5 guard), NaN and inf.
            for global_amax in [amax, amax / 100.0, 0.0, f32::NAN, f32::INFINITY] {
                let mut want = x.clone();
                nvfp4::fake_quant(&mut want, cols, global_amax);
                let mut xd = dev(&x);
                cuda::fake_quant_nvfp4_device(&mut xd, cols, global_amax).unwrap();
                let got = xd.to_vec().unwrap();
                for (i, (&g, &c)) in got.iter().zip(&want).enumerate() {
                    assert!(same(g, c), "{rows}x{cols} amax {global_amax}: element {i} ({}): gpu {g:e}, cpu {c:e}", x[i]);
                }
                checked += got.len();
            }
        }
    }
    // The tie blocks, with a global amax that gives them block scales near 1.
    let (x, ws2) = tie_blocks();
    let mut want = x.clone();
    let global_amax = ws2 * 2688.0;
    nvfp4::fake_quant(&mut want, 32, global_amax);
    let mut xd = dev(&x);
    cuda::fake_quant_nvfp4_device(&mut xd, 32, global_amax).unwrap();
    let got = xd.to_vec().unwrap();
    assert!(got.iter().zip(&want).all(|(&g, &c)| same(g, c)), "ties: gpu {got:?}\ncpu {want:?}");
    checked += got.len();
    say(&format!("| fake_quant_nvfp4 | random, ties, NaN/inf, 5 global amaxes | {checked} values bit-identical |"));
}

#[test]
fn block_amax_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(0x5EED_0103);
    for &(rows, cols) in &[(1, 1), (3, 5), (7, 17), (37, 129), (2, 300)] {
        let mut x = weights(&mut rng, rows * cols, 3.0);
        x[rows * cols / 2] = f32::NAN;
        if rows * cols > 1 {
            x[0] = f32::NEG_INFINITY;
        }
        for block in [1, 7, 16, 128, cols + 5] {
            let per_row = cols.div_ceil(block);
            // The CPU loop: max |x| per block, NaN propagating (f32::max would drop it).
            let want: Vec<f32> = x
                .chunks_exact(cols)
                .flat_map(|row| row.chunks(block))
                .map(|b| b.iter().fold(0f32, |m, &v| if m.is_nan() || v.is_nan() { f32::NAN } else { m.max(v.abs()) }))
                .collect();
            let mut out = dev(&vec![-1f32; rows * per_row]); // poison: an amax is never negative
            cuda::block_amax_device(&dev(&x), cols, block, &mut out).unwrap();
            let got = out.to_vec().unwrap();
            for (i, (&g, &c)) in got.iter().zip(&want).enumerate() {
                assert!(same(g, c), "{rows}x{cols} block {block}: amax {i}: gpu {g}, cpu {c}");
            }
            assert!(got.iter().any(|v| v.is_nan()), "{rows}x{cols} block {block}: the NaN vanished");
        }
    }
}

#[test]
fn wrong_shapes_are_errors() {
    if !have_gpu() {
        return;
    }
    let w = dev(&[0f32; 72]);
    let (mut packed, mut scales) = (dev(&[0u8; 36]), dev(&[0u8; 3]));
    let err = cuda::quantize_nvfp4_device(&w, 3, 24, 1.0, &mut packed, &mut scales).unwrap_err().to_string();
    assert!(err.contains("[3, 24]") && err.contains("multiple of the NVFP4 block size 16"), "{err}");
    let err = cuda::quantize_nvfp4(&[0f32; 72], 3, 24, 1.0).unwrap_err().to_string();
    assert!(err.contains("[3, 24]"), "{err}");
    let w = dev(&[0f32; 64]);
    assert!(cuda::quantize_nvfp4_device(&w, 2, 32, 1.0, &mut packed, &mut scales).is_err(), "packed of 36 bytes for 64 values");
    let (mut packed, mut scales) = (dev(&[0u8; 32]), dev(&[0u8; 4]));
    assert!(cuda::quantize_nvfp4_device(&w, 2, 32, 1.0, &mut packed, &mut scales).is_ok());
    assert!(cuda::quantize_nvfp4_device(&w, 3, 32, 1.0, &mut packed, &mut scales).is_err(), "w is not [3, 32]");
    let mut x = dev(&[0f32; 10]);
    assert!(cuda::fake_quant_nvfp4_device(&mut x, 3, 1.0).is_err(), "10 values are not rows of 3");
    let mut out = dev(&[0f32; 4]);
    assert!(cuda::block_amax_device(&x, 5, 0, &mut out).is_err(), "blocks of 0");
    assert!(cuda::block_amax_device(&x, 5, 3, &mut out).is_ok(), "2 rows of 2 blocks");
    assert!(cuda::block_amax_device(&x, 5, 2, &mut out).is_err(), "2 rows of 3 blocks");
}

/// Activation fake quantization as evaluation applies it (`InputQuant::apply`: SmoothQuant's
/// `pre_quant_scale`, then FP8 / INT8 / NVFP4 fake quant) on a device tensor, through the
/// kernels (`rq_mul_cols_f32`, `rq_fake_quant_{fp8,int8,nvfp4}_f32`): bit-identical to the
/// CPU's formulas, including values beyond amax, NaN, a zero and a NaN amax.
#[test]
fn input_quant_on_the_device_matches_cpu() {
    if !have_gpu() {
        return;
    }
    use rq_min::compute::{take_device_error, Device, Tensor};
    use rq_min::model::weights::InputQuant;
    use rq_min::quant::ActKind;
    let mut rng = Rng(0x5EED_00F0);
    let (rows, cols) = (9, 80);
    let mut x = weights(&mut rng, rows * cols, 1.0);
    x[3] = 40.0; // beyond every amax below: saturates / clamps
    x[100] = -1e-9; // underflows
    x[200] = f32::NAN;
    // Ties of the INT8 rounding at amax 127 (s = 1): rint rounds them to even.
    x[300..306].copy_from_slice(&[0.5, 1.5, 2.5, -0.5, -2.5, 126.5]);
    let scale: Vec<f32> = (0..cols).map(|_| rng.uniform(0.25, 4.0)).collect();
    let mut cases = 0;
    for act in [ActKind::Fp8, ActKind::Int8, ActKind::Nvfp4] {
        for amax in [2.5f32, 127.0, 0.0, 1e-30, f32::NAN] {
            for pre in [None, Some(scale.clone())] {
                let q = InputQuant { pre_quant_scale: pre.clone(), act: Some((act, amax)) };
                let mut want = Tensor::from(x.clone());
                q.apply(&mut want, cols);
                let mut got = Tensor::on(x.clone(), Device::Cuda);
                q.apply(&mut got, cols);
                assert_eq!(got.device(), Device::Cuda);
                let (want, got) = (want.into_host(), got.into_host());
                for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                    assert!(
                        w.to_bits() == g.to_bits() || (w.is_nan() && g.is_nan()),
                        "{act:?} amax {amax} pre_quant_scale {}: element {i}: cpu {w} device {g}",
                        pre.is_some()
                    );
                }
                cases += 1;
            }
        }
    }
    take_device_error().unwrap();
    say(&format!("| input quant | {rows}x{cols} | {cases} cases bit-identical (FP8, INT8, NVFP4; amax 2.5, 127, 0, 1e-30, NaN; with and without pre_quant_scale) |"));
}
