// FP8 (E4M3FN) kernels, each the twin of the CPU code in src/numerics.rs:
// absmax (per-tensor amax), ModelOpt's FP8 weight export and ModelOpt's FP8 fake quant.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../ffi/rq_cuda.h"
#include "launch.cuh"

namespace {

constexpr int kThreads = 256;

unsigned grid_for(size_t n) { return rq_grid_stride_blocks(n, kThreads); }

// |x| as f32 bits. For non-negative floats the unsigned order of the bits is the numeric
// order, and every NaN (exponent all ones, mantissa non-zero) is above +inf, so an unsigned
// max over these bits is the absmax with NaN propagating.
__device__ __forceinline__ unsigned abs_bits(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }
// bf16 is the upper half of an f32.
__device__ __forceinline__ unsigned abs_bits(uint16_t h) { return (unsigned(h) & 0x7FFFu) << 16; }

// Grid-stride max of abs_bits, warp reduction, block reduction through shared memory, then
// one atomicMax per block on the float bits of *out (zeroed by the launcher).
template <typename T>
__global__ void __launch_bounds__(kThreads) absmax_kernel(const T* __restrict__ x, size_t n,
                                                          unsigned* __restrict__ out) {
    unsigned m = 0;
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        m = max(m, abs_bits(x[i]));
    }
    m = __reduce_max_sync(0xFFFFFFFFu, m);
    __shared__ unsigned warp_max[kThreads / 32];
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_max[warp] = m;
    __syncthreads();
    if (warp == 0) {
        m = lane < kThreads / 32 ? warp_max[lane] : 0u;
        m = __reduce_max_sync(0xFFFFFFFFu, m);
        if (lane == 0) atomicMax(out, m);
    }
}

template <typename T>
int launch_absmax(const T* x, size_t n, float* out_amax) {
    cudaError_t e = cudaMemsetAsync(out_amax, 0, sizeof(float));
    if (e != cudaSuccess || n == 0) return e;
    RQ_LAUNCH(absmax_kernel<T>, grid_for(n), kThreads, 0, 0)(x, n, reinterpret_cast<unsigned*>(out_amax));
    return cudaGetLastError();
}

// code = E4M3_RNE_SATFINITE(bf16(bf16(w) / scale_bf16)). The f32 division is correctly
// rounded (nvcc's default -prec-div=true, no fast math), and rounding that to bf16 is the
// correctly rounded bf16 quotient: f32's 24-bit significand is at least 2 * 8 + 2 bits, so
// the double rounding is innocuous. This is what PyTorch's bf16 division gives.
__global__ void __launch_bounds__(kThreads)
    quantize_fp8_bf16_kernel(const uint16_t* __restrict__ w, size_t n, float scale_bf16,
                             uint8_t* __restrict__ out) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float q = __uint_as_float(unsigned(w[i]) << 16) / scale_bf16;
        const float q_bf16 = __bfloat162float(__float2bfloat16_rn(q));
        out[i] = __nv_cvt_float_to_fp8(q_bf16, __NV_SATFINITE, __NV_E4M3);
    }
}

// x = float(E4M3_RNE_SATFINITE(x * s)) * inv_s, as ModelOpt's fake_e4m3fy kernel.
__global__ void __launch_bounds__(kThreads)
    fake_quant_fp8_f32_kernel(float* __restrict__ x, size_t n, float s, float inv_s) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const __nv_fp8_storage_t c = __nv_cvt_float_to_fp8(x[i] * s, __NV_SATFINITE, __NV_E4M3);
        x[i] = __half2float(__half(__nv_cvt_fp8_to_halfraw(c, __NV_E4M3))) * inv_s;
    }
}

// quant::int::int8_fake_quant: y = clamp(rint(x · s), -128, 127) / s, s = 127 / amax (the
// comparisons keep a NaN, as Rust's clamp does).
__global__ void __launch_bounds__(kThreads) fake_quant_int8_f32_kernel(float* __restrict__ x, size_t n, float s) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        float q = rintf(__fmul_rn(x[i], s));
        q = q < -128.0f ? -128.0f : q > 127.0f ? 127.0f : q;
        x[i] = __fdiv_rn(q, s);
    }
}

}  // namespace

extern "C" int rq_absmax_f32(const float* x, size_t n, float* out_amax) {
    return launch_absmax(x, n, out_amax);
}

extern "C" int rq_absmax_bf16(const uint16_t* x, size_t n, float* out_amax) {
    return launch_absmax(x, n, out_amax);
}

extern "C" int rq_quantize_fp8_bf16(const uint16_t* w_bf16, size_t n, float scale,
                                    uint8_t* out_codes) {
    if (n == 0) return cudaSuccess;
    const float scale_bf16 = __bfloat162float(__float2bfloat16_rn(scale));
    RQ_LAUNCH(quantize_fp8_bf16_kernel, grid_for(n), kThreads, 0, 0)(w_bf16, n, scale_bf16, out_codes);
    return cudaGetLastError();
}

extern "C" int rq_fake_quant_fp8_f32(float* x, size_t n, float amax) {
    if (n == 0) return cudaSuccess;
    const float s = 448.0f / amax;
    const float inv_s = 1.0f / s;
    RQ_LAUNCH(fake_quant_fp8_f32_kernel, grid_for(n), kThreads, 0, 0)(x, n, s, inv_s);
    return cudaGetLastError();
}

extern "C" int rq_fake_quant_int8_f32(float* x, size_t n, float amax) {
    if (n == 0) return cudaSuccess;
    // amax < 2^-24 (int.rs MIN_AMAX): every value becomes 0 (a NaN amax goes on, as on the CPU).
    if (amax < 1.0f / 16777216.0f) return cudaMemset(x, 0, n * sizeof(float));
    RQ_LAUNCH(fake_quant_int8_f32_kernel, grid_for(n), kThreads, 0, 0)(x, n, 127.0f / amax);
    return cudaGetLastError();
}
