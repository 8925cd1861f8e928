//! The CUDA host emulator itself (feature `cuda-emu`, cuda/emu/): schedules (a shared-memory
//! race gives different bytes under two seeds, the same bytes under one seed twice), deadlock
//! reports (naming the kernel, the block and the lanes; for the tensor-core mma too) and warp
//! operations against their definitions; built with AddressSanitizer (RQ_EMU_ASAN=1), an
//! out-of-bounds write of a kernel is reported. The kernels are in cuda/emu/selftest.cu, their
//! launchers in cuda/emu/selftest.h.
#![cfg(feature = "cuda-emu")]

use std::ffi::{c_int, CStr};

use rq_min::compute::cuda;

#[allow(dead_code, non_camel_case_types, non_upper_case_globals)]
mod ffi {
    include!(concat!(env!("OUT_DIR"), "/rq_cuda_emu_selftest.rs"));
}

/// Thread order, whatever RQ_EMU_SEED says.
const IN_ORDER: i64 = -1;

fn error_string(status: c_int) -> String {
    // SAFETY: rq_error_string returns a NUL-terminated string for every status.
    unsafe { CStr::from_ptr(ffi::rq_error_string(status)) }.to_string_lossy().into_owned()
}

/// out[block] of the racy kernel under `seed`. Device memory is host memory under the
/// emulator, so the self-test launchers take host buffers.
fn race(blocks: usize, seed: i64) -> Vec<u32> {
    let mut out = vec![u32::MAX; blocks];
    // SAFETY: `out` holds `blocks` words.
    let status = unsafe { ffi::rq_emu_selftest_race(out.as_mut_ptr(), blocks as u32, seed) };
    assert_eq!(status, 0, "{}", error_string(status));
    out
}

#[test]
fn emulator_is_the_device() {
    let info = cuda::device_info().unwrap();
    assert_eq!(info, "1 CUDA device(s): 0: rq-min CUDA emulator (sm_90)");
}

#[test]
fn shared_memory_race_depends_on_the_seed() {
    let blocks = 16;
    // In thread order the last writer of each block is its last thread.
    assert_eq!(race(blocks, IN_ORDER), vec![255; blocks]);
    let (one, two) = (race(blocks, 1), race(blocks, 2));
    assert_ne!(one, two, "seeds 1 and 2 gave the same last writers");
    assert_ne!(one, vec![255; blocks]);
    assert_eq!(one, race(blocks, 1), "one seed, two runs");
    assert!(one.iter().chain(&two).all(|&t| t < 256), "{one:?} {two:?}");
}

#[test]
fn shfl_after_lanes_exited_is_a_deadlock_naming_kernel_and_lanes() {
    for seed in [IN_ORDER, 7] {
        let mut out = vec![0u32; 32];
        // SAFETY: 32 words.
        let status = unsafe { ffi::rq_emu_selftest_shfl_after_exit(out.as_mut_ptr(), seed) };
        assert_ne!(status, 0, "the deadlocked launch succeeded");
        let msg = error_string(status);
        for want in [
            "deadlock in kernel shfl_after_exit_kernel",
            "block (0,0,0)",
            "lanes 0-15 wait in __shfl_sync(mask 0xffffffff)",
            "lanes 16-31 have exited",
        ] {
            assert!(msg.contains(want), "{want:?} not in {msg:?}");
        }
    }
    // The error was the launch's: the next launch on this thread succeeds.
    assert_eq!(race(2, IN_ORDER), [255, 255]);
}

#[test]
fn mma_with_lanes_exited_is_a_deadlock() {
    for seed in [IN_ORDER, 7] {
        let mut out = vec![0f32; 16];
        // SAFETY: 16 floats.
        let status = unsafe { ffi::rq_emu_selftest_mma_after_exit(out.as_mut_ptr(), seed) };
        assert_ne!(status, 0, "the deadlocked launch succeeded");
        let msg = error_string(status);
        for want in [
            "deadlock in kernel mma_after_exit_kernel",
            "lanes 0-15 wait in mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32(mask 0xffffffff)",
            "lanes 16-31 have exited",
        ] {
            assert!(msg.contains(want), "{want:?} not in {msg:?}");
        }
    }
}

#[test]
fn mismatched_collectives_are_a_deadlock() {
    let mut out = vec![0u32; 32];
    // SAFETY: 32 words.
    let status = unsafe { ffi::rq_emu_selftest_mismatched_collectives(out.as_mut_ptr(), IN_ORDER) };
    let msg = error_string(status);
    assert!(msg.contains("deadlock in kernel mismatched_collectives_kernel"), "{msg}");
    assert!(msg.contains("lanes 16-31 wait in __ballot_sync(mask 0xffffffff)"), "{msg}");
}

/// What thread `t` (of a block) writes, per selftest.cu.
fn expected_warp_ops(t: u32) -> [u32; ffi::RQ_EMU_SELFTEST_WARP_OPS as usize] {
    let (lane, base) = (t % 32, t - t % 32);
    let ballot = (0..32).filter(|l| (base + l) % 3 == 0).fold(0u32, |m, l| m | 1 << l);
    let half = if lane < 16 { base + 15 } else { (16..32).filter(|l| l % 2 == 0).fold(0u32, |m, l| m | 1 << l) };
    [
        (base + 5) * 3,
        if lane < 29 { t + 3 } else { t },
        t ^ 6,
        if lane >= 2 { t - 2 } else { t },
        ballot,
        (base..base + 32).sum(),
        69,
        11,
        (t & !7) + 1,
        ((t ^ 1) as f32 * 0.5).to_bits(),
        half,
        3,
        (t as f32).mul_add(1.0 / 3.0, -1.0).to_bits(),
    ]
}

#[test]
fn warp_operations_match_their_definitions() {
    const OPS: usize = ffi::RQ_EMU_SELFTEST_WARP_OPS as usize;
    for (blocks, threads, seed) in [(3u32, 64u32, IN_ORDER), (5, 256, 11), (2, 1024, 12)] {
        let n = (blocks * threads) as usize;
        let mut out = vec![u32::MAX; n * OPS];
        let mut counters = [0u32, 0];
        // SAFETY: `out` holds n * OPS words, `counters` two.
        let status = unsafe {
            ffi::rq_emu_selftest_warp_ops(out.as_mut_ptr(), counters.as_mut_ptr(), blocks, threads, seed)
        };
        assert_eq!(status, 0, "{}", error_string(status));
        for g in 0..n {
            let t = (g % threads as usize) as u32;
            assert_eq!(out[g * OPS..(g + 1) * OPS], expected_warp_ops(t), "block {}, thread {t}", g / threads as usize);
        }
        assert_eq!(counters[0] as usize, n, "atomicAdd(unsigned)");
        assert_eq!(f32::from_bits(counters[1]), n as f32 * 0.5, "atomicAdd(float)");
    }
}

/// Under AddressSanitizer (RQ_EMU_ASAN=1: CI's ASan pass) a kernel writing one float past its
/// device buffer aborts the process with ASan's report: the test runs itself as a child that
/// launches that kernel. Without ASan it only says that it was skipped.
#[test]
fn out_of_bounds_write_is_reported_under_asan() {
    const CHILD: &str = "RQ_EMU_OOB_CHILD";
    if std::env::var_os(CHILD).is_some() {
        // SAFETY: writes one float past a buffer of 64: what ASan must report.
        let status = unsafe { ffi::rq_emu_selftest_out_of_bounds(64) };
        panic!("the out-of-bounds launch returned {status} instead of an ASan abort");
    }
    if !cfg!(rq_emu_asan) {
        eprintln!("skipped: built without RQ_EMU_ASAN=1 (CI's AddressSanitizer pass runs this)");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "out_of_bounds_write_is_reported_under_asan", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the child succeeded: {stderr}");
    assert!(
        stderr.contains("AddressSanitizer: heap-buffer-overflow") && stderr.contains("WRITE of size 4"),
        "no ASan report of the write: {stderr}"
    );
    assert!(!stderr.contains("instead of an ASan abort"), "{stderr}");
}
