// INT8 and INT4 weight export on the device (src/quant/int.rs, spec/algorithms.md §4.1 "Real
// INT8" / "Real INT4", spec/export-formats.md §1.5): the codes of given f32 scales, computed on
// the host (one absmax per row or group). Twins of int::int8_quantize_rows and
// int::int4_quantize_with_scales, bit-identical (tests/cuda_quant.rs): q = clamp(rint(w / s))
// with the division correctly rounded (__fdiv_rn) and rint rounding half to even, as the CPU's
// round_ties_even; a NaN weight gives code 0 (Rust's `as i8` of NaN).
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "../ffi/rq_cuda.h"
#include "launch.cuh"

namespace {

constexpr int kThreads = 256;

unsigned grid_for(size_t n) { return rq_grid_stride_blocks(n, kThreads); }

// clamp(rint(w / s), lo, hi) as an integer; NaN -> 0.
__device__ __forceinline__ int code(float w, float s, float lo, float hi) {
    const float q = rintf(__fdiv_rn(w, s));
    if (q != q) return 0;
    return static_cast<int>(q < lo ? lo : q > hi ? hi : q);
}

// codes[o, c] = code(w[o, c], scales[o]) in -128..127.
__global__ void __launch_bounds__(kThreads)
    quantize_int8_rows_kernel(const float* __restrict__ w, size_t out, size_t inp, const float* __restrict__ scales,
                              int8_t* __restrict__ codes) {
    const size_t n = out * inp, stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
        codes[i] = static_cast<int8_t>(code(w[i], scales[i / inp], -128.0f, 127.0f));
}

// packed[j, c] = q[2j, c] & 0xF | (q[2j + 1, c] & 0xF) << 4, q[o, c] = code(w[o, c],
// scales[o, c / group]) in -8..7 (ModelOpt's pack_int4_in_uint8: pairs along the output dim).
__global__ void __launch_bounds__(kThreads)
    quantize_int4_kernel(const float* __restrict__ w, size_t out, size_t inp, size_t group,
                         const float* __restrict__ scales, uint8_t* __restrict__ packed) {
    const size_t n = out / 2 * inp, stride = size_t(gridDim.x) * blockDim.x;
    const size_t groups = inp / group;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const size_t j = i / inp, c = i % inp;
        const size_t lo = 2 * j * inp + c, hi = lo + inp;
        const int a = code(w[lo], scales[2 * j * groups + c / group], -8.0f, 7.0f);
        const int b = code(w[hi], scales[(2 * j + 1) * groups + c / group], -8.0f, 7.0f);
        packed[i] = static_cast<uint8_t>((a & 0xF) | ((b & 0xF) << 4));
    }
}

}  // namespace

extern "C" int rq_quantize_int8_rows_f32(const float* w, size_t out, size_t inp, const float* scales,
                                         int8_t* out_codes) {
    if (out == 0 || inp == 0) return cudaSuccess;
    RQ_LAUNCH(quantize_int8_rows_kernel, grid_for(out * inp), kThreads, 0, 0)(w, out, inp, scales, out_codes);
    return cudaGetLastError();
}

extern "C" int rq_quantize_int4_f32(const float* w, size_t out, size_t inp, size_t group, const float* scales,
                                    uint8_t* out_packed) {
    if (out == 0 || inp == 0) return cudaSuccess;
    if (out % 2 != 0 || group == 0 || inp % group != 0) return cudaErrorInvalidValue;
    RQ_LAUNCH(quantize_int4_kernel, grid_for(out / 2 * inp), kThreads, 0, 0)(w, out, inp, group, scales, out_packed);
    return cudaGetLastError();
}
