//! One kernel source, two instruction sets.
//!
//! The matmul kernel is written once as plain loops over fixed-size arrays, generic over how
//! a multiply-add is done, and marked `#[inline(always)]`. It is then instantiated twice:
//! inside a `#[target_feature(enable = "avx2,fma")]` function (chosen at run time when the CPU
//! has AVX2 and FMA, so the compiler emits 8-wide `vfmadd` on `ymm` registers) and as the
//! portable fallback (baseline SSE2 on x86-64; NEON with FMA on aarch64, where FMA is always
//! present). candle dispatches its quantized dot products the same way (spec/anchors.md D.2).

/// How a kernel computes `a * b + c`.
pub(crate) trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// One rounding (`fma`): only used where the target has the instruction, otherwise
/// `f32::mul_add` would become a slow library call.
pub(crate) struct Fused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Multiply then add, two roundings: the x86-64 baseline without FMA.
#[cfg(not(target_arch = "aarch64"))]
pub(crate) struct Unfused;

#[cfg(not(target_arch = "aarch64"))]
impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// The multiply-add of the portable code path.
#[cfg(target_arch = "aarch64")]
pub(crate) type Portable = Fused;
#[cfg(not(target_arch = "aarch64"))]
pub(crate) type Portable = Unfused;

/// True when the AVX2+FMA instantiation may run (std caches the CPUID answer).
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
