#![cfg(any(feature = "cuda", feature = "cuda-emu"))]
//! AWQ-lite's search on the device (cuda/awq.cu) against the CPU (src/quant/awq.rs,
//! src/compute/cpu/reduce.rs): the column mean |x|, the per-row squared error and the INT4
//! fake quant are bit-identical to their CPU twins (every operation is IEEE with a fixed order,
//! on a GPU as under the emulator); a whole `LiteSearch` (11 candidates, their products, their
//! losses) on the device gives the CPU's losses bit for bit under the emulator and within a
//! dot product's rounding on a GPU (the tensor cores sum in their own order), and the same alpha.
//! Data: seeded random values with outliers and specials, odd shapes (rows not a multiple of the
//! 8 rows of a block, columns not a multiple of a warp, a partial last INT4 group), NaN rows,
//! all-zero and tiny groups, and the real weights of rq-tiny's layer 0 when ../shared is there.
//! Outputs are poisoned (NaN) first.
//!
//! Without a driver or GPU (feature `cuda`) each test prints "skipped: <reason>" and passes.

#[allow(dead_code)]
mod common;

use common::{dev, have_gpu, poisoned, same_bits, say, values, Rng};
use rq_min::compute::cpu::{col_abs_mean, sq_err_row};
use rq_min::compute::{cuda, Device, DeviceTwin, Tensor};
use rq_min::io::safetensors::{Checkpoint, Dtype};
use rq_min::numerics::round_bf16;
use rq_min::quant::awq::{round_tensor, weight_mean, ActMean, LiteSearch, ALPHAS};
use rq_min::quant::{int, nvfp4};



#[test]
fn col_abs_mean_matches_the_cpu_bit_for_bit() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(41);
    for (rows, cols) in [(1, 1), (3, 5), (67, 33), (9, 300), (130, 7)] {
        let mut x = values(&mut rng, rows * cols, 0.7);
        if cols > 2 {
            x[cols + 2] = f32::NAN; // column 2 becomes NaN
        }
        let mut want = vec![0f32; cols];
        col_abs_mean(&x, cols, &mut want);
        let mut got = poisoned(cols);
        cuda::col_abs_mean(&dev(&x), cols, &mut got).unwrap();
        same_bits(&want, &got.to_vec().unwrap(), &format!("col_abs_mean [{rows}, {cols}]"));
        if cols > 2 && rows > 1 {
            assert!(want[2].is_nan());
        }
    }
    let mut out = poisoned(4);
    assert!(cuda::col_abs_mean(&dev(&[0f32; 0]), 4, &mut out).is_err(), "the mean of no rows");
}

#[test]
fn sq_err_rows_match_the_cpu_bit_for_bit() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(42);
    for (rows, cols) in [(1, 1), (9, 31), (17, 33), (8, 100), (3, 4099)] {
        let y = values(&mut rng, rows * cols, 1.3);
        let mut r = values(&mut rng, rows * cols, 1.3);
        r[cols / 2] = f32::NAN; // row 0 is NaN
        for bf16 in [false, true] {
            let round = |d: f32| if bf16 { round_bf16(d) } else { d };
            let want: Vec<f64> = y.chunks_exact(cols).zip(r.chunks_exact(cols)).map(|(a, b)| sq_err_row(a, b, None, round)).collect();
            let mut got = dev(&vec![f64::NAN; rows]);
            cuda::sq_err_rows(&dev(&y), &dev(&r), None, cols, bf16, &mut got).unwrap();
            let got = got.to_vec().unwrap();
            assert!(want[0].is_nan() && got[0].is_nan(), "a NaN difference makes its row NaN");
            for (i, (a, b)) in want.iter().zip(&got).enumerate().skip(1) {
                assert!(a.to_bits() == b.to_bits(), "[{rows}, {cols}] bf16 {bf16} row {i}: cpu {a:e} device {b:e}");
            }
            // Against f64 arithmetic: the sum of squares within f64 rounding.
            if rows > 1 {
                let exact: f64 =
                    y[cols..2 * cols].iter().zip(&r[cols..2 * cols]).map(|(&a, &b)| f64::from(round(a - b)).powi(2)).sum();
                assert!((got[1] - exact).abs() <= 1e-12 * exact, "row 1: {} vs {exact}", got[1]);
            }
        }
    }
}

/// `quant::int::int4_fake_quant` on the host and its device twin agree bit for bit.
fn check_int4(w: &[f32], inp: usize, group: usize, what: &str) {
    let out = w.len() / inp;
    let mut want = w.to_vec();
    int::int4_fake_quant(&mut want, out, inp, group, None);
    let mut got = dev(w);
    cuda::fake_quant_int4_device(&mut got, inp, group).unwrap();
    same_bits(&want, &got.to_vec().unwrap(), what);
}

#[test]
fn int4_fake_quant_matches_the_cpu_bit_for_bit() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(43);
    for (out, inp, group) in [(1, 128, 128), (3, 256, 128), (5, 200, 128), (7, 96, 32), (2, 5, 128)] {
        let mut w = values(&mut rng, out * inp, 0.02);
        w[..group.min(inp)].fill(0.0); // an all-zero group
        if out > 1 {
            w[inp..inp + group.min(inp)].iter_mut().for_each(|v| *v = 1e-9); // amax below 2^-24
        }
        // Exact rounding ties of rint(w · 7 / amax) with amax = 7: w = k + 0.5.
        w[(out - 1) * inp..(out - 1) * inp + 5].copy_from_slice(&[7.0, 0.5, -1.5, 2.5, -3.5]);
        check_int4(&w, inp, group, &format!("int4 [{out}, {inp}] group {group}"));
    }
    match rq_tiny_layer0() {
        Some((w, inp)) => check_int4(&w, inp, 128, "int4 rq-tiny q_proj"),
        None => say("rq-tiny not found: real-weight INT4 case skipped"),
    }
}

/// rq-tiny's layer-0 q_proj as f32, `[out, inp]`, when ../shared is there.
fn rq_tiny_layer0() -> Option<(Vec<f32>, usize)> {
    let model = common::shared_dir()?.join("models/rq-tiny");
    let ck = Checkpoint::open(&model).ok()?;
    let t = ck.get("model.layers.0.self_attn.q_proj.weight")?;
    Some((t.to_f32().ok()?, t.shape[1]))
}

/// The INT4 (group 128) or NVFP4 search quantizer, as ptq::quantize builds it.
fn quantizer(nvfp4: bool, out: usize, inp: usize, dtype: Dtype) -> impl Fn(&mut Tensor) {
    move |w: &mut Tensor| {
        if nvfp4 {
            let amax = w.amax(0.0);
            w.map_twin(DeviceTwin::FakeQuantNvfp4 { cols: inp, global_amax: amax }, |h| nvfp4::fake_quant(h, inp, amax));
        } else {
            w.map_twin(DeviceTwin::FakeQuantInt4 { cols: inp, group: 128 }, |h| int::int4_fake_quant(h, out, inp, 128, None));
        }
        round_tensor(w, dtype);
    }
}

/// One whole AWQ-lite search of a `[out, inp]` linear on `device`: (losses, best alpha).
fn search_on(device: Device, w: &[f32], bias: Option<&[f32]>, batches: &[Vec<f32>], nvfp4: bool, dtype: Dtype) -> ([f32; 11], f32) {
    let (out, inp) = (w.len() / INP, INP);
    let mut mean = ActMean::new(inp, dtype);
    batches.iter().for_each(|x| mean.observe(&Tensor::on(x.clone(), device)));
    let xbar = mean.finish().expect("batches");
    let wbar = weight_mean(w, out, inp, Some(if nvfp4 { 16 } else { 128 }), dtype);
    let fq = quantizer(nvfp4, out, inp, dtype);
    let mut search = LiteSearch::new(&Tensor::on(w.to_vec(), device), out, inp, &xbar, &wbar, dtype, &fq);
    if let Some(b) = bias {
        search = search.with_bias(b);
    }
    let weight = Tensor::on(w.to_vec(), device);
    for x in batches {
        let x = Tensor::on(x.clone(), device);
        let mut y = x.matmul_bt(&weight, x.len() / inp, inp, out);
        if let Some(b) = bias {
            y.add_row_bias(&Tensor::on(b.to_vec(), device));
        }
        round_tensor(&mut y, dtype);
        search.observe(&x, &y);
    }
    rq_min::compute::take_device_error().unwrap();
    (*search.losses(), search.best().expect("searched").0)
}

const INP: usize = 256;

#[test]
fn lite_search_on_the_device_gives_the_cpus_losses() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(44);
    let out = 72;
    let round = |v: Vec<f32>, dtype: Dtype| -> Vec<f32> {
        if dtype == Dtype::BF16 {
            v.into_iter().map(round_bf16).collect()
        } else {
            v
        }
    };
    for dtype in [Dtype::F32, Dtype::BF16] {
        let w = round(values(&mut rng, out * INP, 0.05), dtype);
        let bias = round(values(&mut rng, out, 0.1), dtype);
        // Three batches of 13, 40 and 1 tokens, channel 7 an activation outlier.
        let batches: Vec<Vec<f32>> = [13usize, 40, 1]
            .iter()
            .map(|&t| {
                let mut x = values(&mut rng, t * INP, 1.0);
                x.chunks_exact_mut(INP).for_each(|r| r[7] *= 25.0);
                round(x, dtype)
            })
            .collect();
        for nvfp4 in [false, true] {
            for bias in [None, Some(&bias[..])] {
                let what = format!("{dtype:?} {} bias {}", if nvfp4 { "nvfp4" } else { "int4" }, bias.is_some());
                let (cpu, cpu_alpha) = search_on(Device::Cpu, &w, bias, &batches, nvfp4, dtype);
                let (gpu, gpu_alpha) = search_on(Device::Cuda, &w, bias, &batches, nvfp4, dtype);
                say(&format!("{what}: alpha {cpu_alpha} (cpu) {gpu_alpha} (device), losses {cpu:?}"));
                assert!(cpu.iter().all(|l| l.is_finite() && *l > 0.0), "{what}: losses {cpu:?}");
                for (a, (&c, &g)) in ALPHAS.iter().zip(cpu.iter().zip(&gpu)) {
                    if cfg!(feature = "cuda-emu") {
                        assert!(c.to_bits() == g.to_bits(), "{what} alpha {a}: cpu {c:e} device {g:e}");
                    } else {
                        assert!((c - g).abs() <= 1e-3 * c, "{what} alpha {a}: cpu {c:e} device {g:e}");
                    }
                }
                assert_eq!(cpu_alpha, gpu_alpha, "{what}");
            }
        }
    }
}
