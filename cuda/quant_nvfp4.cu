// NVFP4 kernels (E2M1 values in blocks of 16, E4M3 block scales), each the twin of the CPU code
// in src/quant/nvfp4.rs and bit-identical to it (tests/cuda_quant.rs): the weight export
// (quantize_weight_scaled), the fake quant (fake_quant) and per-row block amaxes.
//
// Rounding: every f32 operation the CPU does is written with __fmul_rn / __fdiv_rn (correctly
// rounded, never contracted into an FMA); E4M3 conversions are NVIDIA's (bit-identical to
// numerics::f32_to_e4m3 / e4m3_to_f32); max / min are fmaxf / fminf, which drop a NaN operand as
// Rust's f32::max / f32::min do.
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "../ffi/rq_cuda.h"
#include "launch.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kBlock = 16;            // nvfp4::BLOCK
constexpr float kE2m1Max = 6.0f;      // nvfp4::E2M1_MAX
constexpr float kE4m3Max = 448.0f;    // numerics::E4M3_MAX
// nvfp4::INV_GLOBAL_MAX, the f32 constant 1/2688 (2688 = 6 * 448 is exact).
constexpr float kInvGlobalMax = 1.0f / (kE2m1Max * kE4m3Max);
constexpr float kE4m3MinSubnormal = 1.0f / 512.0f;  // nvfp4::E4M3_MIN_SUBNORMAL

unsigned grid_for(size_t n) { return rq_grid_stride_blocks(n, kThreads); }

__device__ __forceinline__ uint8_t to_e4m3(float x) { return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3); }
__device__ __forceinline__ float from_e4m3(uint8_t c) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(c, __NV_E4M3)));
}

// nvfp4::e2m1_index: index 0..=7 of |v|'s E2M1 magnitude {0, 0.5, 1, 1.5, 2, 3, 4, 6}, round half
// to even, saturating; NaN fails every comparison and gets 7.
__device__ __forceinline__ unsigned e2m1_index(float a) {
    return a <= 0.25f ? 0u : a < 0.75f ? 1u : a <= 1.25f ? 2u : a < 1.75f ? 3u
         : a <= 2.5f  ? 4u : a < 3.5f  ? 5u : a <= 5.0f  ? 6u : 7u;
}

// nvfp4::e2m1_code: sign bit `v < 0` (so -0.0 and NaN of either sign have sign 0, a negative v
// that rounds to 0 gets code 8), then the index of |v|.
__device__ __forceinline__ unsigned e2m1_code(float v) { return (v < 0.0f ? 8u : 0u) | e2m1_index(fabsf(v)); }

// nvfp4::E2M1_VALUES[index] for index 0..=7, {0, 0.5, 1, 1.5, 2, 3, 4, 6} (exact; no table in
// local memory).
__device__ __forceinline__ float e2m1_magnitude(unsigned index) {
    return index < 4 ? 0.5f * float(index) : index == 7 ? 6.0f : float(index - 2);
}

// fp8::absmax: fold from 0 with f32::max(m, |x|) (a NaN value is dropped).
__device__ __forceinline__ float absmax(const float* x, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; ++i) m = fmaxf(m, fabsf(x[i]));
    return m;
}

// One thread per block of 16 weights: nvfp4::quantize_weight_scaled.
__global__ void __launch_bounds__(kThreads)
    quantize_nvfp4_kernel(const float* __restrict__ w, size_t blocks, float ws2, float denom,
                          uint8_t* __restrict__ packed, uint8_t* __restrict__ block_scales) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t b = size_t(blockIdx.x) * blockDim.x + threadIdx.x; b < blocks; b += stride) {
        const float* x = w + b * kBlock;
        float s = __fdiv_rn(absmax(x, kBlock), denom);  // block_amax / (6 * ws2)
        if (s == 0.0f) s = 1.0f;
        const uint8_t code = to_e4m3(fmaxf(s, kE4m3MinSubnormal));
        block_scales[b] = code;
        const float scale = __fmul_rn(from_e4m3(code), ws2);
        for (int i = 0; i < kBlock; i += 2) {
            const unsigned lo = e2m1_code(__fdiv_rn(x[i], scale)), hi = e2m1_code(__fdiv_rn(x[i + 1], scale));
            packed[b * (kBlock / 2) + i / 2] = uint8_t(lo | (hi << 4));
        }
    }
}

// One thread per (row, block of 16): nvfp4::fake_quant. The last block of a row may be partial
// (zero padding would not change its amax).
__global__ void __launch_bounds__(kThreads)
    fake_quant_nvfp4_kernel(float* __restrict__ x, size_t rows, size_t cols, float gs, float denom) {
    const size_t per_row = (cols + kBlock - 1) / kBlock, total = rows * per_row;
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
        const size_t c0 = e % per_row * kBlock, n = cols - c0 < kBlock ? cols - c0 : kBlock;
        float* v = x + e / per_row * cols + c0;
        const float t = fminf(__fdiv_rn(absmax(v, n), denom), kE4m3Max);  // min(bmax / (6 gs_safe), 448)
        float sb = __fmul_rn(from_e4m3(to_e4m3(t)), gs);
        if (sb < 1e-5f) sb = 1.0f;  // the Triton kernel's absolute guard
        for (size_t i = 0; i < n; ++i) {
            const float m = __fmul_rn(e2m1_magnitude(e2m1_index(__fdiv_rn(fabsf(v[i]), sb))), sb);
            v[i] = v[i] >= 0.0f ? m : -m;
        }
    }
}

// One thread per (row, block): max |x| as f32 bits (unsigned order of |x| bits is the numeric
// order, NaN above +inf: NaN propagates, as quant_fp8.cu's absmax).
__global__ void __launch_bounds__(kThreads)
    block_amax_kernel(const float* __restrict__ x, size_t rows, size_t cols, size_t block, float* __restrict__ out) {
    const size_t per_row = (cols + block - 1) / block, total = rows * per_row;
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
        const size_t c0 = e % per_row * block, end = cols - c0 < block ? cols : c0 + block;
        const float* row = x + e / per_row * cols;
        unsigned m = 0;
        for (size_t c = c0; c < end; ++c) m = max(m, __float_as_uint(row[c]) & 0x7FFFFFFFu);
        out[e] = __uint_as_float(m);
    }
}

}  // namespace

extern "C" int rq_quantize_nvfp4_f32(const float* w, size_t out, size_t inp, float weight_scale_2,
                                     uint8_t* out_packed, uint8_t* out_block_scales) {
    if (inp % kBlock != 0) return cudaErrorInvalidValue;
    const size_t blocks = out * (inp / kBlock);
    if (blocks == 0) return cudaSuccess;
    const float denom = kE2m1Max * weight_scale_2;  // E2M1_MAX * weight_scale_2, one f32 product
    RQ_LAUNCH(quantize_nvfp4_kernel, grid_for(blocks), kThreads, 0, 0)
    (w, blocks, weight_scale_2, denom, out_packed, out_block_scales);
    return cudaGetLastError();
}

extern "C" int rq_fake_quant_nvfp4_f32(float* x, size_t rows, size_t cols, float global_amax) {
    if (rows == 0 || cols == 0) return cudaSuccess;
    const float gs = global_amax * kInvGlobalMax;  // global_amax * f32(1/2688)
    const float gs_safe = gs > 0.0f ? gs : 1e-12f;
    const float denom = kE2m1Max * gs_safe;
    RQ_LAUNCH(fake_quant_nvfp4_kernel, grid_for(rows * ((cols + kBlock - 1) / kBlock)), kThreads, 0, 0)
    (x, rows, cols, gs, denom);
    return cudaGetLastError();
}

extern "C" int rq_block_amax_f32(const float* x, size_t rows, size_t cols, size_t block, float* out) {
    if (block == 0) return cudaErrorInvalidValue;
    if (rows == 0 || cols == 0) return cudaSuccess;
    RQ_LAUNCH(block_amax_kernel, grid_for(rows * ((cols + block - 1) / block)), kThreads, 0, 0)(x, rows, cols, block, out);
    return cudaGetLastError();
}
