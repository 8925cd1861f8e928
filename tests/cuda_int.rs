#![cfg(any(feature = "cuda", feature = "cuda-emu"))]
//! The INT8 / INT4 weight export kernels of cuda/quant_int.cu against their CPU twins in
//! src/quant/int.rs, byte for byte: INT8 codes per row (`int8_quantize_rows`) and packed INT4
//! codes per group of 128 (`int4_quantize_with_scales`, ModelOpt's output-pair packing). Data:
//! seeded random weights with outliers, values exactly on the rounding ties (w / s = k + 0.5),
//! values past the clamp, zeros and -0.0, zero rows and groups (scale 1.0), a NaN weight (code
//! 0), odd row counts for INT8, and rq-tiny's layer-0 weights when ../shared is there. Outputs
//! are poisoned twice (0x00 and 0xFF bytes): a byte the kernel does not write differs in one run.
//!
//! Without a driver or GPU (feature `cuda`) each test prints "skipped: <reason>" and passes.

#[allow(dead_code)]
mod common;

use common::{dev, have_gpu, say, Rng};
use rq_min::compute::cuda;
use rq_min::io::safetensors::{Checkpoint, Dtype};
use rq_min::quant::int;

/// Weights around `std` with outliers, zeros, -0.0 and one NaN.
fn weights(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    let mut w: Vec<f32> = (0..n)
        .map(|i| match (i % 53, i % 19) {
            (0, _) => rng.normal() * std * 25.0,
            (_, 0) => [0.0, -0.0][i % 2],
            _ => rng.normal() * std,
        })
        .collect();
    if n > 7 {
        w[7] = f32::NAN;
    }
    w
}

fn check_int8(w: &[f32], out: usize, inp: usize, what: &str) {
    let (want, scales) = int::int8_quantize_rows(what, w, out, inp, Dtype::BF16).unwrap();
    for poison in [0x00u8, 0xFF] {
        let mut codes = dev(&vec![poison as i8; w.len()]);
        cuda::quantize_int8_rows_device(&dev(w), out, inp, &dev(&scales), &mut codes).unwrap();
        assert_eq!(codes.to_vec().unwrap(), want, "{what}: INT8 codes (poison {poison:#x})");
    }
}

fn check_int4(w: &[f32], out: usize, inp: usize, what: &str) -> usize {
    let scales = int::int4_group_scales(what, w, out, inp, 128, None, Dtype::BF16).unwrap();
    let want = int::int4_quantize_with_scales(what, w, out, inp, 128, &scales).unwrap();
    for poison in [0x00u8, 0xFF] {
        let mut packed = dev(&vec![poison; w.len() / 2]);
        cuda::quantize_int4_device(&dev(w), out, inp, 128, &dev(&scales), &mut packed).unwrap();
        assert_eq!(packed.to_vec().unwrap(), want, "{what}: packed INT4 codes (poison {poison:#x})");
    }
    // Every code value occurs (the clamp at -8 and 7 included).
    let codes = int::int4_unpack(&want, out, inp);
    (-8..=7).filter(|c| codes.contains(c)).count()
}

#[test]
fn int8_and_int4_export_match_the_cpu_byte_for_byte() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(51);
    for (out, inp) in [(1, 5), (7, 33), (3, 4099)] {
        check_int8(&weights(&mut rng, out * inp, 0.03), out, inp, &format!("int8 [{out}, {inp}]"));
    }
    for (out, inp) in [(2, 128), (6, 384), (10, 256)] {
        let mut w = weights(&mut rng, out * inp, 0.03);
        w[128..256].fill(0.0); // an all-zero group (row 0, group 1, or row 1): scale 1.0
        let codes = check_int4(&w, out, inp, &format!("int4 [{out}, {inp}]"));
        say(&format!("int4 [{out}, {inp}]: {codes} of 16 codes occur"));
    }
    // Rounding ties: a row whose amax is 7 (INT4 scale 1) or 127 (INT8 scale 1) and values k + 0.5.
    let mut ties = vec![0f32; 2 * 128];
    for (i, v) in ties.iter_mut().enumerate() {
        *v = [7.0, 0.5, -0.5, 1.5, -2.5, 3.5, -6.5, 6.5][i % 8];
    }
    // Half to even: 0.5 -> 0, -0.5 -> 0, 1.5 -> 2, -2.5 -> -2, 3.5 -> 4, -6.5 -> -6, 6.5 -> 6, and 7.
    assert_eq!(check_int4(&ties, 2, 128, "int4 ties"), 7, "the tie codes");
    let ties8: Vec<f32> = (0..2 * 64).map(|i| [127.0, 0.5, -0.5, 1.5, -126.5, 126.5, 2.5, -1.5][i % 8]).collect();
    check_int8(&ties8, 2, 64, "int8 ties");
    match rq_tiny() {
        Some((w, out, inp)) => {
            check_int8(&w, out, inp, "int8 rq-tiny gate_proj");
            check_int4(&w, out, inp, "int4 rq-tiny gate_proj");
        }
        None => say("rq-tiny not found: real-weight cases skipped"),
    }
}

#[test]
fn int4_export_refuses_shapes_it_cannot_pack() {
    if !have_gpu() {
        return;
    }
    let w = vec![0.5f32; 3 * 128];
    let err = cuda::quantize_int4(&w, 3, 128, 128, &[1.0; 3]).unwrap_err().to_string();
    assert!(err.contains("rq_quantize_int4_f32") && err.contains("even"), "{err}");
    let err = cuda::quantize_int8_rows(&w, 3, 128, &[1.0; 2]).unwrap_err().to_string();
    assert!(err.contains("scales holds 2 values"), "{err}");
}

/// rq-tiny's layer-0 gate_proj as f32, `[out, inp]`, when ../shared is there.
fn rq_tiny() -> Option<(Vec<f32>, usize, usize)> {
    let model = common::shared_dir()?.join("models/rq-tiny");
    let ck = Checkpoint::open(&model).ok()?;
    let t = ck.get("model.layers.0.mlp.gate_proj.weight")?;
    Some((t.to_f32().ok()?, t.shape[0], t.shape[1]))
}
