// Row movement on the device (ffi/rq_cuda.h, "row movement"): the gathers and scatters of the
// embedding lookup and the MoE block, twins of Tensor::gather_rows and
// Tensor::index_add_weighted on the CPU (src/compute/tensor.rs).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "../ffi/rq_cuda.h"
#include "launch.cuh"

namespace {

constexpr unsigned kThreads = 256;

__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// One block per output row: out[r, :] = x[rows[r], :].
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const float* __restrict__ x, size_t cols, const uint32_t* __restrict__ rows,
                       float* __restrict__ out) {
    const float* src = x + size_t(rows[blockIdx.x]) * cols;
    float* dst = out + size_t(blockIdx.x) * cols;
    for (size_t c = threadIdx.x; c < cols; c += kThreads) dst[c] = src[c];
}

// One block per source row r: out[rows[r], :] += src[r, :] * weights[r], the product and the sum
// each rounded to bf16 when bf16 != 0 (Compute::round_one), the CPU's operation order. The rows
// are distinct (the caller checks), so no two blocks write one value.
__global__ void __launch_bounds__(kThreads)
    index_add_weighted_kernel(float* __restrict__ out, const float* __restrict__ src, size_t cols,
                              const uint32_t* __restrict__ rows, const float* __restrict__ weights, int bf16) {
    const float w = weights[blockIdx.x];
    const float* y = src + size_t(blockIdx.x) * cols;
    float* o = out + size_t(rows[blockIdx.x]) * cols;
    for (size_t c = threadIdx.x; c < cols; c += kThreads) {
        const float p = __fmul_rn(y[c], w);
        o[c] = bf16 ? bf16_round(__fadd_rn(o[c], bf16_round(p))) : __fadd_rn(o[c], p);
    }
}

}  // namespace

extern "C" int rq_gather_rows_f32(const float* x, size_t cols, const uint32_t* rows, size_t n_rows, float* out) {
    if (n_rows == 0 || cols == 0) return cudaSuccess;
    if (n_rows > 0x7FFFFFFFu) return cudaErrorInvalidValue;
    RQ_LAUNCH(gather_rows_kernel, static_cast<unsigned>(n_rows), kThreads, 0, 0)(x, cols, rows, out);
    return cudaGetLastError();
}

extern "C" int rq_index_add_weighted_f32(float* out, const float* src, size_t cols, const uint32_t* rows,
                                         const float* weights, size_t n_rows, int bf16) {
    if (n_rows == 0 || cols == 0) return cudaSuccess;
    if (n_rows > 0x7FFFFFFFu) return cudaErrorInvalidValue;
    RQ_LAUNCH(index_add_weighted_kernel, static_cast<unsigned>(n_rows), kThreads, 0, 0)(out, src, cols, rows,
                                                                                           weights, bf16);
    return cudaGetLastError();
}
