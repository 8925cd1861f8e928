// Backward kernels of auto-quantize's gradient score (src/ptq/backward.rs): the element-wise and
// row-wise pieces of the activation gradients that are not products. Each is the twin of a CPU
// oracle in src/compute/cpu/grad.rs and bit-identical to it (tests/cuda_backward.rs; on a GPU up
// to the libm of expf, tanhf and log): every f32 operation is written with __fmul_rn /
// __fadd_rn / __fdiv_rn / __fsqrt_rn in the CPU's order (no contraction), and every f64 sum is
// cpu::warp_sum's: one warp per row, lane j sums the items j, j + 32, ... in order, then a xor
// butterfly (off = 16, 8, 4, 2, 1). A warp walks its rows together, so the shuffles see all lanes.
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "../ffi/rq_cuda.h"
#include "exp.cuh"
#include "launch.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;  // transpose tile: kTile x kTile values, kThreads / kTile rows per pass
constexpr unsigned kFull = 0xFFFFFFFFu;

unsigned grid_for(size_t n) { return rq_grid_stride_blocks(n, kThreads); }
unsigned warp_grid_for(size_t rows) { return rq_grid_stride_blocks(rows, kWarps); }

// The first row and the stride of a grid-stride loop with one warp per row.
__device__ __forceinline__ size_t warp_row0() { return size_t(blockIdx.x) * kWarps + threadIdx.x / 32; }
__device__ __forceinline__ size_t warp_row_stride() { return size_t(gridDim.x) * kWarps; }

// The warp's sum of one partial per lane, cpu::warp_sum's butterfly; every lane gets it.
__device__ __forceinline__ double warp_sum(double p) {
    for (int off = 16; off > 0; off /= 2) p = __dadd_rn(p, __shfl_xor_sync(kFull, p, off));
    return p;
}

// ---- layout ---------------------------------------------------------------------------------

// out[c * rows + r] = a[r * cols + c], through a shared tile so both sides are read and written
// along rows; the blocks walk the tiles grid-stride.
__global__ void __launch_bounds__(kThreads)
    transpose_kernel(const float* __restrict__ a, size_t rows, size_t cols, float* __restrict__ out) {
    __shared__ float tile[kTile][kTile + 1];  // +1: a column of the tile on distinct banks
    const size_t tiles_c = (cols + kTile - 1) / kTile, tiles = (rows + kTile - 1) / kTile * tiles_c;
    const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
    for (size_t t = blockIdx.x; t < tiles; t += gridDim.x) {
        const size_t r0 = t / tiles_c * kTile, c0 = t % tiles_c * kTile;
        for (int i = ty; i < kTile; i += kThreads / kTile)
            if (r0 + i < rows && c0 + tx < cols) tile[i][tx] = a[(r0 + i) * cols + c0 + tx];
        __syncthreads();
        for (int i = ty; i < kTile; i += kThreads / kTile)
            if (c0 + i < cols && r0 + tx < rows) out[(c0 + i) * rows + r0 + tx] = tile[tx][i];
        __syncthreads();  // the tile is reloaded by the next iteration
    }
}

__global__ void __launch_bounds__(kThreads)
    copy_columns_kernel(const float* __restrict__ src, size_t src_width, size_t src_c0, float* __restrict__ dst,
                        size_t dst_width, size_t dst_c0, size_t rows, size_t n) {
    const size_t total = rows * n, stride = size_t(gridDim.x) * blockDim.x;
    for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
        const size_t r = e / n, j = e % n;
        dst[r * dst_width + dst_c0 + j] = src[r * src_width + src_c0 + j];
    }
}

// x1 <-> x2 of the leading rotary_dim values of each head; one thread per pair.
__global__ void __launch_bounds__(kThreads)
    swap_rotary_halves_kernel(float* __restrict__ x, size_t heads, size_t head_dim, size_t half) {
    const size_t total = heads * half, stride = size_t(gridDim.x) * blockDim.x;
    for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
        float* h = x + e / half * head_dim + e % half;
        const float v = h[0];
        h[0] = h[half];
        h[half] = v;
    }
}

__global__ void __launch_bounds__(kThreads)
    scale_rows_kernel(float* __restrict__ x, size_t cols, const float* __restrict__ w, size_t total) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
        x[i] = __fmul_rn(w[i / cols], x[i]);
}

// ---- activation -------------------------------------------------------------------------------

// cpu::act_grad: the derivative of act_fn (cuda/forward.cu) at g, in the CPU's order.
__device__ __forceinline__ float act_grad(int act, float g) {
    switch (act) {
        case RQ_ACT_SILU: {  // s (1 + g (1 - s)), s = 1 / (1 + exp(-g))
            const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g)));
            return __fmul_rn(s, __fadd_rn(1.0f, __fmul_rn(g, __fadd_rn(1.0f, -s))));
        }
        case RQ_ACT_GELU_TANH: {  // 0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 * 0.044715 g^2)
            const float c = 0.7978846f;
            const float cube = __fmul_rn(__fmul_rn(__fmul_rn(0.044715f, g), g), g);
            const float t = tanhf(__fmul_rn(c, __fadd_rn(g, cube)));
            const float sq = __fmul_rn(__fmul_rn(__fmul_rn(3.0f, 0.044715f), g), g);
            const float b = __fmul_rn(__fmul_rn(__fmul_rn(__fmul_rn(0.5f, g), __fadd_rn(1.0f, -__fmul_rn(t, t))), c),
                                      __fadd_rn(1.0f, sq));
            return __fadd_rn(__fmul_rn(0.5f, __fadd_rn(1.0f, t)), b);
        }
        case RQ_ACT_GELU: {  // cdf + g pdf, cdf = 0.5 (1 + erf(g / sqrt(2))), pdf = exp(-g^2 / 2) / sqrt(2 pi)
            const float cdf = __fmul_rn(0.5f, __fadd_rn(1.0f, erff(__fmul_rn(g, 0.70710677f))));
            const float pdf = __fmul_rn(expf(__fmul_rn(__fmul_rn(-0.5f, g), g)), 0.3989423f);
            return __fadd_rn(cdf, __fmul_rn(g, pdf));
        }
        default:  // relu2: 2 max(g, 0) as the CPU's inlined f32::max gives it: NaN and -0 -> +0
                  // (fmaxf(-0, +0) may be -0)
            return __fmul_rn(2.0f, g > 0.0f ? g : 0.0f);
    }
}

// out = (dm * u) * act'(x), or dm * act'(x) when u is null.
__global__ void __launch_bounds__(kThreads)
    act_grad_mul_kernel(const float* __restrict__ x, const float* __restrict__ dm, const float* __restrict__ u,
                        size_t n, int act, float* __restrict__ out) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float d = u != nullptr ? __fmul_rn(dm[i], u[i]) : dm[i];
        out[i] = __fmul_rn(d, act_grad(act, x[i]));
    }
}

// ---- norm ---------------------------------------------------------------------------------------

// acc += dL/dx of RMSNorm / LayerNorm (cpu::norm_backward_add), one warp per row of n values;
// w(i) = 1 + weight[i] when offset. Each mean is a warp sum in double divided by n, cast to f32.
__global__ void __launch_bounds__(kThreads)
    norm_backward_add_kernel(float* __restrict__ acc, const float* __restrict__ x, const float* __restrict__ weight,
                             const float* __restrict__ dy, size_t rows, size_t n, int layer_norm, int offset,
                             float eps) {
    const int lane = threadIdx.x % 32;
    const double nf = double(n);
    auto w = [&](size_t i) { return offset ? __fadd_rn(1.0f, weight[i]) : weight[i]; };
    for (size_t r = warp_row0(); r < rows; r += warp_row_stride()) {
        const float* row = x + r * n;
        const float* d = dy + r * n;
        float* a = acc + r * n;
        if (layer_norm) {
            double p = 0.0;
            for (size_t i = lane; i < n; i += 32) p = __dadd_rn(p, double(row[i]));
            const double mean = warp_sum(p) / nf;
            p = 0.0;
            for (size_t i = lane; i < n; i += 32) {
                const double c = __dadd_rn(double(row[i]), -mean);
                p = __dadd_rn(p, __dmul_rn(c, c));
            }
            const double var = warp_sum(p) / nf;
            const float rs = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(float(var), eps)));
            const float mean_f = float(mean);
            p = 0.0;
            for (size_t i = lane; i < n; i += 32) p = __dadd_rn(p, double(__fmul_rn(w(i), d[i])));
            const float mg = float(warp_sum(p) / nf);
            p = 0.0;
            for (size_t i = lane; i < n; i += 32) {
                const float xhat = __fmul_rn(__fadd_rn(row[i], -mean_f), rs);
                p = __dadd_rn(p, double(__fmul_rn(__fmul_rn(w(i), d[i]), xhat)));
            }
            const float mgx = float(warp_sum(p) / nf);
            for (size_t i = lane; i < n; i += 32) {
                const float xhat_mgx = __fmul_rn(__fmul_rn(__fadd_rn(row[i], -mean_f), rs), mgx);
                const float g = __fadd_rn(__fadd_rn(__fmul_rn(w(i), d[i]), -mg), -xhat_mgx);
                a[i] = __fadd_rn(a[i], __fmul_rn(rs, g));
            }
        } else {
            double p = 0.0;
            for (size_t i = lane; i < n; i += 32) p = __dadd_rn(p, __dmul_rn(double(row[i]), double(row[i])));
            const float rs = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(float(warp_sum(p) / nf), eps)));
            p = 0.0;
            for (size_t i = lane; i < n; i += 32) p = __dadd_rn(p, double(__fmul_rn(__fmul_rn(row[i], w(i)), d[i])));
            const float c = __fmul_rn(__fmul_rn(__fmul_rn(float(warp_sum(p) / nf), rs), rs), rs);
            for (size_t i = lane; i < n; i += 32) {
                const float g = __fadd_rn(__fmul_rn(__fmul_rn(rs, w(i)), d[i]), -__fmul_rn(row[i], c));
                a[i] = __fadd_rn(a[i], g);
            }
        }
    }
}

// ---- attention ----------------------------------------------------------------------------------

// Row r of p (query t0 + r over the keys lo .. lo + n_keys) becomes softmax(scale * row) over
// its visible keys first(t) ..= t and 0 elsewhere: cpu::softmax_visible, one thread per row in
// key order, with the soft cap (softcap > 0) and then the ALiBi bias slope * (j - t) (slope > 0,
// j - t exact in f32). first(t) = t + 1 - window saturated at 0 (window SIZE_MAX: no sliding
// window). The launcher checks that the keys lie in the block.
__global__ void __launch_bounds__(kThreads)
    softmax_rows_kernel(float* __restrict__ p, size_t rows, size_t n_keys, size_t t0, size_t lo, size_t window,
                        float scale, float softcap, float slope) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t r = size_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += stride) {
        float* row = p + r * n_keys;
        const size_t t = t0 + r;
        const size_t from = (t + 1 > window ? t + 1 - window : 0) - lo, to = t - lo;
        float mx = -INFINITY;
        for (size_t j = from; j <= to; ++j) {
            row[j] = __fmul_rn(row[j], scale);
            if (softcap > 0.0f) row[j] = __fmul_rn(tanhf(__fdiv_rn(row[j], softcap)), softcap);
            if (slope > 0.0f) row[j] = __fadd_rn(row[j], __fmul_rn(slope, -float(to - j)));
            mx = fmaxf(mx, row[j]);  // fmaxf drops NaN, as f32::max
        }
        float sum = 0.0f;
        for (size_t j = from; j <= to; ++j) {
            row[j] = exp_softmax(__fadd_rn(row[j], -mx));
            sum = __fadd_rn(sum, row[j]);
        }
        const float inv = __fdiv_rn(1.0f, sum);
        for (size_t j = from; j <= to; ++j) row[j] = __fmul_rn(row[j], inv);
        for (size_t j = 0; j < from; ++j) row[j] = 0.0f;
        for (size_t j = to + 1; j < n_keys; ++j) row[j] = 0.0f;
    }
}

// ds[i] *= 1 - t^2, t = tanh(scale * raw[i] / cap) (cpu::softcap_grad).
__global__ void __launch_bounds__(kThreads)
    softcap_grad_kernel(float* __restrict__ ds, const float* __restrict__ raw, size_t n, float scale, float cap) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float t = tanhf(__fdiv_rn(__fmul_rn(raw[i], scale), cap));
        ds[i] = __fmul_rn(ds[i], __fadd_rn(1.0f, -__fmul_rn(t, t)));
    }
}

// ds = scale * p * (ds - c), c = f32(sum_j p_j * ds_j) (cpu::attention_ds), one warp per row.
__global__ void __launch_bounds__(kThreads)
    attention_ds_kernel(float* __restrict__ ds, const float* __restrict__ p, size_t rows, size_t n_keys,
                        float scale) {
    const int lane = threadIdx.x % 32;
    for (size_t r = warp_row0(); r < rows; r += warp_row_stride()) {
        float* dr = ds + r * n_keys;
        const float* pr = p + r * n_keys;
        double s = 0.0;
        for (size_t j = lane; j < n_keys; j += 32) s = __dadd_rn(s, double(__fmul_rn(pr[j], dr[j])));
        const float c = float(warp_sum(s));
        for (size_t j = lane; j < n_keys; j += 32)
            dr[j] = __fmul_rn(__fmul_rn(scale, pr[j]), __fadd_rn(dr[j], -c));
    }
}

// ---- cross-entropy ------------------------------------------------------------------------------

// Row r of z becomes scale * (softmax(z) - onehot(targets[r])) and nll[r] = logsumexp(z) -
// z[target] in double (cpu::xent_grad_row), one warp per row. A target >= vocab makes nll[r] and
// the whole row NaN (the CPU panics).
__global__ void __launch_bounds__(kThreads)
    xent_grad_rows_kernel(float* __restrict__ z, size_t rows, size_t vocab, const uint32_t* __restrict__ targets,
                          float scale, double* __restrict__ nll) {
    const int lane = threadIdx.x % 32;
    for (size_t r = warp_row0(); r < rows; r += warp_row_stride()) {
        float* row = z + r * vocab;
        const size_t target = targets[r];
        if (target >= vocab) {
            for (size_t j = lane; j < vocab; j += 32) row[j] = NAN;
            if (lane == 0) nll[r] = NAN;
            continue;
        }
        const float zt = row[target];
        float mx = -INFINITY;
        for (size_t j = lane; j < vocab; j += 32) mx = fmaxf(mx, row[j]);
        for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
        double s = 0.0;
        for (size_t j = lane; j < vocab; j += 32) s = __dadd_rn(s, double(exp_softmax(__fadd_rn(row[j], -mx))));
        const double loss = __dadd_rn(__dadd_rn(double(mx), log(warp_sum(s))), -double(zt));
        const double lse = __dadd_rn(loss, double(zt));
        const float hi = float(lse);
        const float lo = float(__dadd_rn(lse, -double(hi)));
        __syncwarp();  // every lane has read row[target] before it is overwritten
        for (size_t j = lane; j < vocab; j += 32) {
            const float g = __fmul_rn(exp_softmax(__fadd_rn(__fadd_rn(row[j], -hi), -lo)), scale);
            row[j] = j == target ? __fadd_rn(g, -scale) : g;
        }
        if (lane == 0) nll[r] = loss;
    }
}

}  // namespace

extern "C" int rq_transpose_f32(const float* a, size_t rows, size_t cols, float* out) {
    if (rows == 0 || cols == 0) return cudaSuccess;
    const size_t tiles = (rows + kTile - 1) / kTile * ((cols + kTile - 1) / kTile);
    RQ_LAUNCH(transpose_kernel, rq_grid_stride_blocks(tiles, 1), kThreads, 0, 0)(a, rows, cols, out);
    return cudaGetLastError();
}

extern "C" int rq_copy_columns_f32(const float* src, size_t src_width, size_t src_c0, float* dst, size_t dst_width,
                                   size_t dst_c0, size_t rows, size_t n) {
    if (src_c0 > src_width || n > src_width - src_c0 || dst_c0 > dst_width || n > dst_width - dst_c0)
        return cudaErrorInvalidValue;
    if (rows == 0 || n == 0) return cudaSuccess;
    RQ_LAUNCH(copy_columns_kernel, grid_for(rows * n), kThreads, 0, 0)
    (src, src_width, src_c0, dst, dst_width, dst_c0, rows, n);
    return cudaGetLastError();
}

extern "C" int rq_swap_rotary_halves_f32(float* x, size_t heads, size_t head_dim, size_t rotary_dim) {
    if (rotary_dim % 2 != 0 || rotary_dim > head_dim) return cudaErrorInvalidValue;
    const size_t half = rotary_dim / 2;
    if (heads == 0 || half == 0) return cudaSuccess;
    RQ_LAUNCH(swap_rotary_halves_kernel, grid_for(heads * half), kThreads, 0, 0)(x, heads, head_dim, half);
    return cudaGetLastError();
}

extern "C" int rq_scale_rows_f32(float* x, size_t rows, size_t cols, const float* w) {
    if (rows == 0 || cols == 0) return cudaSuccess;
    RQ_LAUNCH(scale_rows_kernel, grid_for(rows * cols), kThreads, 0, 0)(x, cols, w, rows * cols);
    return cudaGetLastError();
}

extern "C" int rq_act_grad_mul_f32(const float* x, const float* dm, const float* u, size_t n, int act, float* out) {
    if (act < RQ_ACT_SILU || act > RQ_ACT_GELU) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    RQ_LAUNCH(act_grad_mul_kernel, grid_for(n), kThreads, 0, 0)(x, dm, u, n, act, out);
    return cudaGetLastError();
}

extern "C" int rq_norm_backward_add_f32(float* acc, const float* x, const float* weight, const float* dy, size_t rows,
                                        size_t n, int layer_norm, int offset, float eps) {
    if (n == 0) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;
    RQ_LAUNCH(norm_backward_add_kernel, warp_grid_for(rows), kThreads, 0, 0)
    (acc, x, weight, dy, rows, n, layer_norm, offset, eps);
    return cudaGetLastError();
}

extern "C" int rq_softmax_rows_f32(float* p, size_t rows, size_t n_keys, size_t t0, size_t lo, size_t window,
                                   float scale, float softcap, float alibi_slope) {
    if (!(softcap >= 0.0f) || !(alibi_slope >= 0.0f)) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;
    // first(t) and t grow with t: the first row's first key and the last row's t bound the block.
    const size_t first = t0 + 1 > window ? t0 + 1 - window : 0;
    if (first < lo || t0 < lo || t0 + rows - 1 - lo >= n_keys) return cudaErrorInvalidValue;
    RQ_LAUNCH(softmax_rows_kernel, grid_for(rows), kThreads, 0, 0)
    (p, rows, n_keys, t0, lo, window, scale, softcap, alibi_slope);
    return cudaGetLastError();
}

extern "C" int rq_softcap_grad_f32(float* ds, const float* raw, size_t n, float scale, float cap) {
    if (!(cap > 0.0f)) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    RQ_LAUNCH(softcap_grad_kernel, grid_for(n), kThreads, 0, 0)(ds, raw, n, scale, cap);
    return cudaGetLastError();
}

extern "C" int rq_attention_ds_f32(float* ds, const float* p, size_t rows, size_t n_keys, float scale) {
    if (rows == 0 || n_keys == 0) return cudaSuccess;
    RQ_LAUNCH(attention_ds_kernel, warp_grid_for(rows), kThreads, 0, 0)(ds, p, rows, n_keys, scale);
    return cudaGetLastError();
}

extern "C" int rq_xent_grad_rows_f32(float* z, size_t rows, size_t vocab, const uint32_t* targets, float scale,
                                     double* nll) {
    if (rows == 0) return cudaSuccess;
    if (vocab == 0) return cudaErrorInvalidValue;
    RQ_LAUNCH(xent_grad_rows_kernel, warp_grid_for(rows), kThreads, 0, 0)(z, rows, vocab, targets, scale, nll);
    return cudaGetLastError();
}
