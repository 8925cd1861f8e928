// AWQ-lite's search on the device (src/quant/awq.rs, spec/algorithms.md §6.1): the per-channel
// mean |x| of the statistics pass, the INT4 weight fake quant of the alpha candidates, and the
// per-row squared error of each candidate's output against the exact output. Each is the twin
// of a CPU function and bit-identical to it (tests/cuda_awq.rs): the f64 sums are done in the
// CPU's order (one sequential sum per column; per row, 32 strided partial sums then a xor
// butterfly, as compute::cpu::sq_err_row), and no multiply-add is left to contraction.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "../ffi/rq_cuda.h"
#include "launch.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xFFFFFFFFu;

__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// out[c] = f32(Σ_r |x[r, c]| / rows), the sum in f64 over r in order (awq::ActMean::observe).
__global__ void __launch_bounds__(kThreads)
    col_abs_mean_kernel(const float* __restrict__ x, size_t rows, size_t cols, float* __restrict__ out) {
    const size_t c = size_t(blockIdx.x) * kThreads + threadIdx.x;
    if (c >= cols) return;
    double acc = 0.0;
    for (size_t r = 0; r < rows; ++r) acc = __dadd_rn(acc, double(fabsf(x[r * cols + c])));
    out[c] = float(acc / double(rows));
}

// out[r] = Σ_c d², d = y[r, c] - ref[r, c] (rounded to bf16 when bf16), times weight[r, c] when
// weight is not null, one warp per row: lane j sums the columns j, j + 32, ... in f64, then the
// 32 partial sums meet in a xor butterfly (cpu::sq_err_row). A row of warps returns together,
// so the shuffle sees all lanes.
__global__ void __launch_bounds__(kThreads)
    sq_err_rows_kernel(const float* __restrict__ y, const float* __restrict__ ref, const float* __restrict__ weight,
                       size_t rows, size_t cols, int bf16, double* __restrict__ out) {
    const size_t r = size_t(blockIdx.x) * kWarps + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const float* yr = y + r * cols;
    const float* rr = ref + r * cols;
    double p = 0.0;
    for (size_t c = lane; c < cols; c += 32) {
        float d = __fadd_rn(yr[c], -rr[c]);
        if (bf16) d = bf16_round(d);
        if (weight != nullptr) d = __fmul_rn(d, weight[r * cols + c]);
        p = __dadd_rn(p, __dmul_rn(double(d), double(d)));
    }
    for (int off = 16; off > 0; off /= 2) p = __dadd_rn(p, __shfl_xor_sync(kFull, p, off));
    if (lane == 0) out[r] = p;
}

// INT4 fake quant of w = [out, inp] in groups of `group` along the input (quant::int::
// int4_fake_quant without given amaxes), one warp per group: amax = max |w| of the group (a
// max, so the order does not matter; fmaxf drops a NaN as f32::max does), amax < 2^-24 gives
// zeros, else s = 7 / amax and w = clamp(rint(w · s), -8, 7) / s.
__global__ void __launch_bounds__(kThreads)
    fake_quant_int4_kernel(float* __restrict__ w, size_t out, size_t inp, size_t group) {
    const size_t groups_per_row = (inp + group - 1) / group;
    const size_t g = size_t(blockIdx.x) * kWarps + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (g >= out * groups_per_row) return;
    const size_t lo = g % groups_per_row * group;
    const size_t width = inp - lo < group ? inp - lo : group;
    float* x = w + g / groups_per_row * inp + lo;
    float amax = 0.0f;
    for (size_t c = lane; c < width; c += 32) amax = fmaxf(amax, fabsf(x[c]));
    for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, off));
    if (amax < 1.0f / 16777216.0f) {
        for (size_t c = lane; c < width; c += 32) x[c] = 0.0f;
        return;
    }
    const float s = __fdiv_rn(7.0f, amax);
    for (size_t c = lane; c < width; c += 32) {
        float q = rintf(__fmul_rn(x[c], s));
        q = q < -8.0f ? -8.0f : q > 7.0f ? 7.0f : q;
        x[c] = __fdiv_rn(q, s);
    }
}

// Blocks for `n` warps' work, or 0 when the grid would be too large.
unsigned warp_blocks(size_t n) {
    const size_t blocks = (n + kWarps - 1) / kWarps;
    return blocks > 0x7FFFFFFFu ? 0 : static_cast<unsigned>(blocks);
}

}  // namespace

extern "C" int rq_col_abs_mean_f32(const float* x, size_t rows, size_t cols, float* out) {
    if (cols == 0) return cudaSuccess;
    if (rows == 0) return cudaErrorInvalidValue;
    const size_t blocks = (cols + kThreads - 1) / kThreads;
    if (blocks > 0x7FFFFFFFu) return cudaErrorInvalidValue;
    RQ_LAUNCH(col_abs_mean_kernel, static_cast<unsigned>(blocks), kThreads, 0, 0)(x, rows, cols, out);
    return cudaGetLastError();
}

extern "C" int rq_sq_err_rows_f32(const float* y, const float* ref, const float* weight, size_t rows, size_t cols,
                                  int bf16, double* out) {
    if (rows == 0) return cudaSuccess;
    const unsigned blocks = warp_blocks(rows);
    if (blocks == 0) return cudaErrorInvalidValue;
    RQ_LAUNCH(sq_err_rows_kernel, blocks, kThreads, 0, 0)(y, ref, weight, rows, cols, bf16, out);
    return cudaGetLastError();
}

extern "C" int rq_fake_quant_int4_f32(float* w, size_t out, size_t inp, size_t group) {
    if (out == 0 || inp == 0) return cudaSuccess;
    if (group == 0) return cudaErrorInvalidValue;
    const unsigned blocks = warp_blocks(out * ((inp + group - 1) / group));
    if (blocks == 0) return cudaErrorInvalidValue;
    RQ_LAUNCH(fake_quant_int4_kernel, blocks, kThreads, 0, 0)(w, out, inp, group);
    return cudaGetLastError();
}
