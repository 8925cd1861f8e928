//! The CUDA kernels against their CPU twins (src/numerics.rs): identical amax bits, identical
//! E4M3 codes, identical fake-quant floats, on random data, every bf16 code and a bf16 matrix
//! of LLM weight magnitudes. Output buffers are poisoned before each run so that an element
//! the kernel did not write shows up. Without a driver or GPU each test prints
//! "skipped: <reason>" and passes; `no_device_is_an_error_not_a_crash` checks that case.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod common;

use common::{have_gpu, say};

use rq_min::compute::cuda::{self, DeviceBuffer};
use rq_min::numerics::{bf16_to_f32, e4m3_to_f32, f32_to_bf16, f32_to_e4m3, round_bf16, E4M3_MAX};
use rq_min::Error;

/// SplitMix64: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }

    /// Any f32 but NaN: every sign, exponent (subnormals, infinities) and mantissa.
    fn any_f32(&mut self) -> f32 {
        loop {
            let x = f32::from_bits(self.next_u64() as u32);
            if !x.is_nan() {
                return x;
            }
        }
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Values of weight-like magnitude: N(0, std^2), with every 997th value an outlier 50x larger.
fn weights(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|i| rng.normal() * std * if i % 997 == 0 { 50.0 } else { 1.0 }).collect()
}

/// Mixed f32 test data: weight-like values and arbitrary bit patterns (no NaN).
fn mixed_f32(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut x = weights(rng, n, 0.02);
    for v in x.iter_mut().step_by(7) {
        *v = rng.any_f32();
    }
    x
}

/// max |x| on the CPU, NaN if any value is NaN, 0 for no values.
fn cpu_absmax(x: impl IntoIterator<Item = f32>) -> f32 {
    x.into_iter().fold(0.0f32, |m, v| if m.is_nan() || v.is_nan() { f32::NAN } else { m.max(v.abs()) })
}

/// ModelOpt's FP8 export on the CPU: E4M3(bf16(bf16(w) / bf16(scale))).
fn cpu_quantize(w: u16, scale: f32) -> u8 {
    f32_to_e4m3(round_bf16(bf16_to_f32(w) / round_bf16(scale)))
}

/// ModelOpt's FP8 fake quant on the CPU: s = 448 / amax, float(E4M3(x * s)) * (1 / s).
fn cpu_fake_quant(x: f32, amax: f32) -> f32 {
    let s = E4M3_MAX / amax;
    e4m3_to_f32(f32_to_e4m3(x * s)) * (1.0 / s)
}

/// Panics at the first element whose bits differ.
fn assert_same_bits<T: Copy + PartialEq + std::fmt::Debug>(
    what: &str,
    gpu: &[T],
    cpu: &[T],
    input: impl Fn(usize) -> String,
) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    if let Some(i) = (0..gpu.len()).find(|&i| gpu[i] != cpu[i]) {
        let bad = (0..gpu.len()).filter(|&i| gpu[i] != cpu[i]).count();
        panic!(
            "{what}: {bad} of {} differ; first at {i} (input {}): gpu {:?}, cpu {:?}",
            gpu.len(),
            input(i),
            gpu[i],
            cpu[i]
        );
    }
}

/// GPU absmax of f32 values through a NaN-poisoned output buffer, and through the slice API.
fn gpu_absmax_f32(x: &[f32]) -> f32 {
    let dev = DeviceBuffer::from_slice(x).unwrap();
    let mut out = DeviceBuffer::from_slice(&[f32::NAN]).unwrap();
    cuda::absmax_f32_device(&dev, &mut out).unwrap();
    let amax = out.to_vec().unwrap()[0];
    assert_eq!(amax.to_bits(), cuda::absmax_f32(x).unwrap().to_bits(), "slice API, n = {}", x.len());
    amax
}

/// Same for bf16 values.
fn gpu_absmax_bf16(x: &[u16]) -> f32 {
    let dev = DeviceBuffer::from_slice(x).unwrap();
    let mut out = DeviceBuffer::from_slice(&[f32::NAN]).unwrap();
    cuda::absmax_bf16_device(&dev, &mut out).unwrap();
    let amax = out.to_vec().unwrap()[0];
    assert_eq!(amax.to_bits(), cuda::absmax_bf16(x).unwrap().to_bits(), "slice API, n = {}", x.len());
    amax
}

/// Sizes around the block size (256) and past one grid-stride sweep (4096 blocks x 256).
const SIZES: [usize; 8] = [0, 1, 31, 256, 257, 100_003, 4096 * 256, 4096 * 256 + 3];

#[test]
fn no_device_is_an_error_not_a_crash() {
    let Err(e) = cuda::device_info() else { return };
    match &e {
        Error::Unsupported(msg) => assert!(msg.starts_with("no CUDA device: "), "{msg}"),
        other => panic!("device_info without a device: {other:?}"),
    }
    let err = cuda::absmax_f32(&[1.0, -2.0, 3.0]).unwrap_err().to_string();
    assert!(err.contains("rq_absmax_f32 on 3 elements"), "{err}");
    let err = cuda::quantize_fp8_bf16(&[0x3F80; 5], 1.0).unwrap_err().to_string();
    assert!(err.contains("rq_quantize_fp8_bf16 on 5 elements"), "{err}");
    say(&format!("skipped: {e} (and the kernels report it: {err})"));
}

#[test]
fn absmax_f32_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(1);
    for n in SIZES {
        let x = mixed_f32(&mut rng, n);
        let (gpu, cpu) = (gpu_absmax_f32(&x), cpu_absmax(x.iter().copied()));
        assert_eq!(gpu.to_bits(), cpu.to_bits(), "n = {n}: gpu {gpu}, cpu {cpu}");
        // Finite weights only (no infinities from the random bit patterns).
        let w = weights(&mut rng, n, 0.02);
        let (gpu, cpu) = (gpu_absmax_f32(&w), cpu_absmax(w.iter().copied()));
        assert_eq!(gpu.to_bits(), cpu.to_bits(), "weights, n = {n}: gpu {gpu}, cpu {cpu}");
    }
}

#[test]
fn absmax_f32_propagates_nan() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(2);
    for n in SIZES.into_iter().filter(|&n| n > 0) {
        let mut x = weights(&mut rng, n, 1.0);
        for at in [0, n - 1, rng.below(n)] {
            let keep = x[at];
            for nan in [f32::NAN, -f32::NAN, f32::from_bits(0x7F80_0001)] {
                x[at] = nan;
                assert!(gpu_absmax_f32(&x).is_nan(), "n = {n}, NaN {:#x} at {at}", nan.to_bits());
            }
            x[at] = keep;
        }
    }
}

#[test]
fn absmax_bf16_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(3);
    for n in SIZES {
        let x: Vec<u16> = mixed_f32(&mut rng, n).into_iter().map(f32_to_bf16).collect();
        let (gpu, cpu) = (gpu_absmax_bf16(&x), cpu_absmax(x.iter().map(|&h| bf16_to_f32(h))));
        assert_eq!(gpu.to_bits(), cpu.to_bits(), "n = {n}: gpu {gpu}, cpu {cpu}");
    }
    // Every bf16 code but NaN.
    let all: Vec<u16> = (0..=u16::MAX).filter(|&h| !bf16_to_f32(h).is_nan()).collect();
    assert_eq!(gpu_absmax_bf16(&all), f32::INFINITY);
    let finite: Vec<u16> = all.iter().copied().filter(|&h| bf16_to_f32(h).is_finite()).collect();
    assert_eq!(gpu_absmax_bf16(&finite), bf16_to_f32(0x7F7F));
}

#[test]
fn absmax_bf16_propagates_nan() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(4);
    for n in SIZES.into_iter().filter(|&n| n > 0) {
        let mut x: Vec<u16> = weights(&mut rng, n, 0.02).into_iter().map(f32_to_bf16).collect();
        for at in [0, n - 1, rng.below(n)] {
            let keep = x[at];
            for nan in [0x7FC0u16, 0xFFC0, 0x7F81] {
                x[at] = nan;
                assert!(gpu_absmax_bf16(&x).is_nan(), "n = {n}, NaN {nan:#x} at {at}");
            }
            x[at] = keep;
        }
    }
}

/// GPU codes through a 0xFF-poisoned output buffer (0xFF is -NaN, which no non-NaN input
/// gives), checked against the slice API, then against the CPU.
fn check_quantize(what: &str, w: &[u16], scale: f32) {
    let dev = DeviceBuffer::from_slice(w).unwrap();
    let mut out = DeviceBuffer::from_slice(&vec![0xFFu8; w.len()]).unwrap();
    cuda::quantize_fp8_bf16_device(&dev, scale, &mut out).unwrap();
    let gpu = out.to_vec().unwrap();
    assert_eq!(gpu, cuda::quantize_fp8_bf16(w, scale).unwrap(), "{what}: slice API");
    let cpu: Vec<u8> = w.iter().map(|&h| cpu_quantize(h, scale)).collect();
    let input = |i: usize| format!("bf16 {:#06x} = {}, scale {scale:e}", w[i], bf16_to_f32(w[i]));
    assert_same_bits(what, &gpu, &cpu, input);
}

#[test]
fn quantize_fp8_bf16_every_bf16_code() {
    if !have_gpu() {
        return;
    }
    let all: Vec<u16> = (0..=u16::MAX).filter(|&h| !bf16_to_f32(h).is_nan()).collect();
    // Scales that are and are not bf16 values, tiny ones that push codes into saturation,
    // huge ones that push them into E4M3 subnormals and to zero.
    for scale in [1.0, 0.5, 3.0e-4, 0.0123, 1.7e-5, 2.9e-38, 1.0 / 448.0, 448.0, 3.3e5, 1.0e30] {
        check_quantize(&format!("every bf16 code, scale {scale:e}"), &all, scale);
    }
}

#[test]
fn quantize_fp8_bf16_llm_weight_matrix() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(5);
    // A 4096 x 4096 projection: N(0, 0.02^2) with outliers, stored as bf16.
    let w: Vec<u16> = weights(&mut rng, 4096 * 4096, 0.02).into_iter().map(f32_to_bf16).collect();
    let amax = gpu_absmax_bf16(&w);
    let cpu_amax = cpu_absmax(w.iter().map(|&h| bf16_to_f32(h)));
    assert_eq!(amax.to_bits(), cpu_amax.to_bits(), "amax: gpu {amax}, cpu {cpu_amax}");
    // ModelOpt's per-tensor weight scale, and a smaller one that makes codes saturate.
    for scale in [amax / E4M3_MAX, amax / E4M3_MAX / 3.0] {
        check_quantize(&format!("4096x4096 weights, scale {scale:e}"), &w, scale);
    }
    for n in SIZES {
        check_quantize(&format!("{n} weights"), &w[..n], amax / E4M3_MAX);
    }
}

#[test]
fn fake_quant_fp8_matches_cpu() {
    if !have_gpu() {
        return;
    }
    let mut rng = Rng(6);
    for n in SIZES {
        let mut x = weights(&mut rng, n, 1.0);
        for v in x.iter_mut().step_by(11) {
            *v *= 1e-6; // into E4M3 subnormals and to (signed) zero
        }
        let true_amax = cpu_absmax(x.iter().copied());
        for amax in [true_amax, true_amax / 5.0, 448.0, 1.0] {
            if amax == 0.0 {
                continue;
            }
            let cpu: Vec<f32> = x.iter().map(|&v| cpu_fake_quant(v, amax)).collect();
            let mut dev = DeviceBuffer::from_slice(&x).unwrap();
            cuda::fake_quant_fp8_device(&mut dev, amax).unwrap();
            let mut gpu = vec![f32::NAN; n];
            dev.copy_to_slice(&mut gpu).unwrap();
            let mut in_place = x.clone();
            cuda::fake_quant_fp8(&mut in_place, amax).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&in_place), bits(&gpu), "slice API, n = {n}, amax {amax}");
            let input = |i: usize| format!("x {:e}, amax {amax:e}", x[i]);
            assert_same_bits(&format!("fake quant, n = {n}, amax {amax:e}"), &bits(&gpu), &bits(&cpu), input);
        }
    }
}

#[test]
fn device_buffers_round_trip_and_check_lengths() {
    if !have_gpu() {
        return;
    }
    let mut buf = DeviceBuffer::<u16>::alloc(3).unwrap();
    assert_eq!((buf.len(), buf.is_empty()), (3, false));
    buf.copy_from_slice(&[1, 2, 3]).unwrap();
    assert_eq!(buf.to_vec().unwrap(), [1, 2, 3]);
    assert!(matches!(buf.copy_from_slice(&[1, 2]), Err(Error::Usage(_))));
    let empty = DeviceBuffer::<f32>::from_slice(&[]).unwrap();
    assert!(empty.is_empty() && empty.to_vec().unwrap().is_empty());
    let w = DeviceBuffer::from_slice(&[0x3F80u16; 4]).unwrap();
    let mut short = DeviceBuffer::<u8>::alloc(3).unwrap();
    let err = cuda::quantize_fp8_bf16_device(&w, 1.0, &mut short).unwrap_err().to_string();
    assert!(err.contains("rq_quantize_fp8_bf16 on 4 elements"), "{err}");
}

/// Uploads of at most 64 KiB are queued through a pinned ring of 64 slots without waiting, and
/// those of 1 MiB and more go through pinned staging in 8 MiB chunks (cuda/runtime.cu): sizes on
/// both sides of each threshold and of a chunk boundary, 150 small uploads in a row (the ring
/// wraps: a slot is reused only after its copy), from four threads at once (each on its own
/// stream; staging sets shared), each overwritten right after the call: every buffer comes back
/// bit for bit.
#[test]
fn uploads_through_pinned_memory_arrive_whole() {
    if !have_gpu() {
        return;
    }
    let sizes = [1, 1000, 1 << 14, (1 << 14) + 1, (1 << 18) - 1, 1 << 18, (2 << 20) + 3, 5 << 20];
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                let mut rng = Rng(t * 1000 + 7);
                let mut check = |n: usize| {
                    let mut host: Vec<u32> = (0..n).map(|_| rng.next_u64() as u32).collect();
                    let want = host.clone();
                    let buffer = DeviceBuffer::from_slice(&host).unwrap();
                    host.iter_mut().for_each(|v| *v = !*v); // the caller may reuse its bytes at once
                    assert!(buffer.to_vec().unwrap() == want, "thread {t}: {n} values came back changed");
                };
                sizes.iter().for_each(|&n| check(n));
                let small: Vec<DeviceBuffer<u32>> = (0..150u32).map(|i| DeviceBuffer::from_slice(&[i, !i]).unwrap()).collect();
                for (i, b) in small.iter().enumerate() {
                    assert_eq!(b.to_vec().unwrap(), [i as u32, !(i as u32)], "thread {t}: small upload {i}");
                }
                cuda::synchronize().unwrap();
            });
        }
    });
    say(&format!("pinned ring and staging: {sizes:?} u32 values and 150 small uploads from 4 threads, bit for bit"));
}
