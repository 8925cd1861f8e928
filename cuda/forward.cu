// Forward kernels of a decoder layer on f32 device buffers (row-major, activations
// `[rows, cols]`, Linear weights `[out_features, in_features]`), each the twin of a CPU kernel
// in src/compute/cpu/ (norm.rs, matmul.rs, rope.rs, attention.rs) and checked against it by
// tests/cuda_forward.rs.
//
// Rounding: every multiply and add whose rounding the CPU fixes is written with __fmul_rn /
// __fadd_rn / __fmaf_rn, so nvcc does not contract it into an FMA the CPU does not do (and
// the host emulator, which never contracts, computes the same bits). Reductions the CPU does
// in f64 (norm statistics, the log-sum-exp of the NLL) are done in double here too: these
// kernels are memory-bound, so the slow double units of consumer GPUs cost little.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "../ffi/rq_cuda.h"
#include "exp.cuh"
#include "launch.cuh"

namespace {

constexpr int kThreads = 256;
constexpr unsigned kFull = 0xFFFFFFFFu;

unsigned grid_for(size_t n) { return rq_grid_stride_blocks(n, kThreads); }

__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// ---- block reductions (blockDim.x == kThreads) ---------------------------------------------

// Sum of one double per thread over the block, returned to every thread. The order is fixed
// (warp butterflies, then the warp sums in warp order), so the result is deterministic.
__device__ double block_sum(double v) {
    __shared__ double warp_sum[kThreads / 32];
    __shared__ double total;
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_sum[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int w = 0; w < kThreads / 32; ++w) s += warp_sum[w];
        total = s;
    }
    __syncthreads();
    const double result = total;
    __syncthreads();  // `total` and `warp_sum` may be reused by the next call
    return result;
}

// Max of one float per thread (fmaxf: NaN is dropped, as f32::max on the CPU).
__device__ float block_max(float v) {
    __shared__ float warp_max[kThreads / 32];
    __shared__ float total;
    for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_max[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float m = warp_max[0];
        for (int w = 1; w < kThreads / 32; ++w) m = fmaxf(m, warp_max[w]);
        total = m;
    }
    __syncthreads();
    const float result = total;
    __syncthreads();
    return result;
}

// ---- RMSNorm / LayerNorm: one block per row ---------------------------------------------------

// mode: 0 plain (weight * (x * inv_rms)), 1 plain bf16 (bf16(w * bf16(x * inv_rms))),
// 2 offset ((1 + w) * (x * inv_rms)), 3 offset bf16 (bf16 of mode 2).
__global__ void __launch_bounds__(kThreads)
    rms_norm_kernel(const float* __restrict__ x, const float* __restrict__ weight, size_t cols, float eps,
                    int mode, float* __restrict__ out) {
    const float* row = x + size_t(blockIdx.x) * cols;
    float* out_row = out + size_t(blockIdx.x) * cols;
    double sum_sq = 0.0;
    for (size_t i = threadIdx.x; i < cols; i += kThreads) {
        const double v = row[i];
        sum_sq += v * v;
    }
    sum_sq = block_sum(sum_sq);
    const float variance = float(sum_sq / double(cols));
    const float inv_rms = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(variance, eps)));
    for (size_t i = threadIdx.x; i < cols; i += kThreads) {
        const float normed = __fmul_rn(row[i], inv_rms);
        const float w = weight[i];
        float o;
        switch (mode) {
            case 0: o = __fmul_rn(w, normed); break;
            case 1: o = bf16_round(__fmul_rn(w, bf16_round(normed))); break;
            case 2: o = __fmul_rn(__fadd_rn(1.0f, w), normed); break;
            default: o = bf16_round(__fmul_rn(__fadd_rn(1.0f, w), normed)); break;
        }
        out_row[i] = o;
    }
}

// Mean, then the biased variance around it, both in double (two passes over the row).
__global__ void __launch_bounds__(kThreads)
    layer_norm_kernel(const float* __restrict__ x, const float* __restrict__ weight,
                      const float* __restrict__ bias, size_t cols, float eps, float* __restrict__ out) {
    const float* row = x + size_t(blockIdx.x) * cols;
    float* out_row = out + size_t(blockIdx.x) * cols;
    double sum = 0.0;
    for (size_t i = threadIdx.x; i < cols; i += kThreads) sum += double(row[i]);
    const double mean = block_sum(sum) / double(cols);
    double sq = 0.0;
    for (size_t i = threadIdx.x; i < cols; i += kThreads) {
        const double d = double(row[i]) - mean;
        sq += d * d;
    }
    const double var = block_sum(sq) / double(cols);
    const float inv_std = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(float(var), eps)));
    const float mean_f = float(mean);
    for (size_t i = threadIdx.x; i < cols; i += kThreads) {
        const float y = __fmul_rn(__fmul_rn(__fadd_rn(row[i], -mean_f), inv_std), weight[i]);
        out_row[i] = __fadd_rn(y, bias != nullptr ? bias[i] : 0.0f);
    }
}

// ---- matmul: out[m, n] = x[m, k] · w[n, k]ᵀ -------------------------------------------------------
// 64 × 64 output tile per block of 256 threads, 4 × 4 outputs per thread, k in steps of 16
// through static shared memory. Each output is one FMA chain over p = 0, 1, ..., k-1 in
// order from 0, which is what the CPU's matmul_bt computes on a CPU with FMA.
constexpr int kTileM = 64, kTileN = 64, kTileK = 16;

__global__ void __launch_bounds__(kThreads)
    matmul_bt_kernel(const float* __restrict__ x, const float* __restrict__ w, int m, int k, int n,
                     float* __restrict__ out) {
    // k-major tiles; +4 keeps the rows 16-byte aligned and spreads the transposed stores.
    __shared__ float xs[kTileK][kTileM + 4];
    __shared__ float ws[kTileK][kTileN + 4];
    const int row0 = blockIdx.y * kTileM, col0 = blockIdx.x * kTileN;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // outputs rows ty + 16 i, cols tx + 16 j
    float acc[4][4] = {};
    for (int p0 = 0; p0 < k; p0 += kTileK) {
        // 64 rows × 16 k of each operand, 4 values per thread; consecutive threads read
        // consecutive k of one row.
        for (int e = threadIdx.x; e < kTileM * kTileK; e += kThreads) {
            const int r = e / kTileK, p = e % kTileK;
            const int gr = row0 + r, gc = col0 + r, gp = p0 + p;
            xs[p][r] = (gr < m && gp < k) ? x[size_t(gr) * k + gp] : 0.0f;
            ws[p][r] = (gc < n && gp < k) ? w[size_t(gc) * k + gp] : 0.0f;
        }
        __syncthreads();
        const int steps = k - p0 < kTileK ? k - p0 : kTileK;  // no FMA with padding
        for (int p = 0; p < steps; ++p) {
            float a[4], b[4];
            for (int i = 0; i < 4; ++i) a[i] = xs[p][ty + 16 * i];
            for (int j = 0; j < 4; ++j) b[j] = ws[p][tx + 16 * j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] = __fmaf_rn(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        const int r = row0 + ty + 16 * i;
        if (r >= m) continue;
        for (int j = 0; j < 4; ++j) {
            const int c = col0 + tx + 16 * j;
            if (c < n) out[size_t(r) * n + c] = acc[i][j];
        }
    }
}

// One thread per output, the same FMA chain: the reference of the tiled kernel.
__global__ void __launch_bounds__(kThreads)
    matmul_bt_naive_kernel(const float* __restrict__ x, const float* __restrict__ w, int m, int k, int n,
                           float* __restrict__ out) {
    const size_t total = size_t(m) * n, stride = size_t(gridDim.x) * blockDim.x;
    for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
        const size_t r = e / n, c = e % n;
        float acc = 0.0f;
        for (int p = 0; p < k; ++p) acc = __fmaf_rn(x[r * k + p], w[c * k + p], acc);
        out[e] = acc;
    }
}

// ---- element-wise ---------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    add_row_bias_kernel(float* __restrict__ x, const float* __restrict__ bias, size_t total, size_t n) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
        x[i] = __fadd_rn(x[i], bias[i % n]);
}

// x[i] *= scale[i % n]: SmoothQuant's pre_quant_scale on rows of n (InputQuant::apply).
__global__ void __launch_bounds__(kThreads)
    mul_cols_kernel(float* __restrict__ x, const float* __restrict__ scale, size_t total, size_t n) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
        x[i] = __fmul_rn(x[i], scale[i % n]);
}

__global__ void __launch_bounds__(kThreads) add_kernel(float* __restrict__ x, const float* __restrict__ y, size_t n) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) x[i] = __fadd_rn(x[i], y[i]);
}

__global__ void __launch_bounds__(kThreads) round_bf16_kernel(float* __restrict__ x, size_t n) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) x[i] = bf16_round(x[i]);
}

// Activations, as src/compute/cpu/norm.rs writes them (the same order of operations).
__device__ __forceinline__ float act_fn(int act, float x) {
    switch (act) {
        case RQ_ACT_SILU:  // x / (1 + exp(-x))
            return __fdiv_rn(x, __fadd_rn(1.0f, expf(-x)));
        case RQ_ACT_GELU_TANH: {  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            const float cube = __fmul_rn(__fmul_rn(__fmul_rn(0.044715f, x), x), x);
            const float t = tanhf(__fmul_rn(0.7978846f, __fadd_rn(x, cube)));
            return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, t));
        }
        case RQ_ACT_GELU:  // x * 0.5 * (1 + erf(x * M_SQRT1_2)), torch's order
            return __fmul_rn(__fmul_rn(x, 0.5f), __fadd_rn(1.0f, erff(__fmul_rn(x, 0.70710677f))));
        default: {  // relu2: square(max(x, 0)); fmaxf(NaN, 0) = 0 as Rust's f32::max
            const float r = fmaxf(x, 0.0f);
            return __fmul_rn(r, r);
        }
    }
}

__global__ void __launch_bounds__(kThreads)
    gated_mul_kernel(float* __restrict__ gate, const float* __restrict__ up, size_t n, int act, int bf16) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float a = act_fn(act, gate[i]);
        gate[i] = bf16 ? bf16_round(__fmul_rn(bf16_round(a), up[i])) : __fmul_rn(a, up[i]);
    }
}

// The logits' last steps, the CPU's op order (cpu::finish_logits).
__global__ void __launch_bounds__(kThreads)
    finish_logits_kernel(float* __restrict__ x, size_t n, float divisor, float cap, int bf16) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    auto r = [&](float v) { return bf16 ? bf16_round(v) : v; };
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = x[i];
        if (divisor > 0.0f) v = r(__fdiv_rn(v, divisor));
        if (cap > 0.0f) v = r(__fmul_rn(r(tanhf(r(__fdiv_rn(v, cap)))), cap));
        x[i] = v;
    }
}

__global__ void __launch_bounds__(kThreads) activate_kernel(float* __restrict__ x, size_t n, int act) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) x[i] = act_fn(act, x[i]);
}

// ---- RoPE: one thread per (position, head, pair) ------------------------------------------------
// x1' = r(r(a c) + r(-b s)), x2' = r(r(b c) + r(a s)) with r = bf16 rounding or identity, and
// c, s rounded by r too (Rope::rotate).
__global__ void __launch_bounds__(kThreads)
    rope_kernel(float* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                size_t seq, size_t heads, size_t head_dim, size_t half, int bf16) {
    const size_t total = seq * heads * half, stride = size_t(gridDim.x) * blockDim.x;
    for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
        const size_t i = e % half, head = (e / half) % heads, pos = e / (half * heads);
        float* h = x + (pos * heads + head) * head_dim;
        float c = cos_t[pos * half + i], s = sin_t[pos * half + i];
        const float a = h[i], b = h[half + i];
        if (bf16) {
            c = bf16_round(c);
            s = bf16_round(s);
            h[i] = bf16_round(__fadd_rn(bf16_round(__fmul_rn(a, c)), bf16_round(__fmul_rn(-b, s))));
            h[half + i] = bf16_round(__fadd_rn(bf16_round(__fmul_rn(b, c)), bf16_round(__fmul_rn(a, s))));
        } else {
            h[i] = __fadd_rn(__fmul_rn(a, c), __fmul_rn(-b, s));
            h[half + i] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
        }
    }
}

// ---- attention: causal GQA, the CPU's operation order ----------------------------------------------
// The twin of cpu::Attention without flash_bf16, bit for bit: S = Q·Kᵀ (an FMA chain over d per
// score), `*s *= scale` (then the soft cap and the ALiBi bias, when given), the row max,
// e = exp_softmax(s - max) summed in key order, inv = 1 / sum, p = e · inv, then O = P·V (an FMA
// chain over the keys in order per output).
// One block per (tile of kRows query rows, head); warp r owns query row t0 + r. Keys are walked
// in tiles of kKeys through shared memory (K and V of the head's kv head), three times: for the
// row max, for the sum (lane 0 adds the tile's e in key order), and for P·V; each pass
// recomputes the scores rather than keeping a seq-long row. Memory: O(kKeys × head_dim)
// shared per block, no seq × seq buffer.
constexpr int kRows = 8;  // warps per block

template <int kMaxHd, int kKeys>
__global__ void __launch_bounds__(kRows * 32)
    attention_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, int seq,
                     int n_heads, int n_kv_heads, int hd, int window, float scale, float softcap,
                     const float* __restrict__ alibi_slopes, float* __restrict__ out) {
    __shared__ float qs[kRows][kMaxHd];
    __shared__ float ks[kKeys][kMaxHd + 1];  // +1: lane j reads row j, rows on distinct banks
    __shared__ float vs[kKeys][kMaxHd];
    __shared__ float ps[kRows][kKeys];
    constexpr int kDims = kMaxHd / 32;
    const int head = blockIdx.y, g = head / (n_heads / n_kv_heads);
    const int q_width = n_heads * hd, kv_width = n_kv_heads * hd;
    const int lane = threadIdx.x % 32, r = threadIdx.x / 32;
    const int t0 = blockIdx.x * kRows, t = t0 + r;
    const bool active = t < seq;
    const float slope = alibi_slopes ? alibi_slopes[head] : 0.0f;
    // Keys first(t)..=t are visible from row t (window: the w - 1 keys before it and itself).
    auto first = [&](int row) { return window > 0 && row + 1 > window ? row + 1 - window : 0; };
    for (int d = lane; d < hd; d += 32) qs[r][d] = active ? q[size_t(t) * q_width + head * hd + d] : 0.0f;
    const int t_last = t0 + kRows - 1 < seq - 1 ? t0 + kRows - 1 : seq - 1;
    const int lo = first(t0);
    // Loads the tile of keys k0.. (and their values when `values`) into ks / vs.
    auto load = [&](int k0, bool values) {
        __syncthreads();  // previous tile fully used (and qs written, the first time)
        for (int e = threadIdx.x; e < kKeys * hd; e += kRows * 32) {
            const int j = e / hd, d = e % hd, key = k0 + j;
            const bool in = key <= t_last;
            ks[j][d] = in ? k[size_t(key) * kv_width + g * hd + d] : 0.0f;
            if (values) vs[j][d] = in ? v[size_t(key) * kv_width + g * hd + d] : 0.0f;
        }
        __syncthreads();
    };
    // Whether row t sees key k0 + lane, and its scaled score (FMA chain over d, then × scale;
    // with a softcap c: tanh(s / c) · c; with ALiBi: + slope · (key − t), key − t exact in f32;
    // as the CPU's softmax_visible).
    auto visible = [&](int k0) { return active && lane < kKeys && k0 + lane >= first(t) && k0 + lane <= t; };
    auto score = [&](int k0) {
        float acc = 0.0f;
        for (int d = 0; d < hd; ++d) acc = __fmaf_rn(qs[r][d], ks[lane][d], acc);
        float s = __fmul_rn(acc, scale);
        if (softcap > 0.0f) s = __fmul_rn(tanhf(__fdiv_rn(s, softcap)), softcap);
        return alibi_slopes ? __fadd_rn(s, __fmul_rn(slope, float(k0 + lane - t))) : s;
    };
    // The keys of the tile at k0 row t sees: j_lo..j_end (a masked key's value, NaN or inf,
    // never reaches the row).
    auto j_range = [&](int k0, int& j_lo, int& j_end) {
        j_lo = active && first(t) > k0 ? first(t) - k0 : 0;
        j_end = !active ? 0 : t - k0 + 1 < kKeys ? t - k0 + 1 : kKeys;
    };

    float m = -INFINITY;  // pass 1: the row max (fmaxf skips NaN, as f32::max)
    for (int k0 = lo; k0 <= t_last; k0 += kKeys) {
        load(k0, false);
        float s = visible(k0) ? score(k0) : -INFINITY;
        for (int off = 16; off > 0; off /= 2) s = fmaxf(s, __shfl_xor_sync(kFull, s, off));
        m = fmaxf(m, s);
    }
    float sum = 0.0f;  // pass 2: Σ e in key order (lane 0)
    for (int k0 = lo; k0 <= t_last; k0 += kKeys) {
        load(k0, false);
        if (visible(k0)) ps[r][lane] = exp_softmax(__fadd_rn(score(k0), -m));
        __syncwarp();
        int j_lo, j_end;
        j_range(k0, j_lo, j_end);
        if (lane == 0)
            for (int j = j_lo; j < j_end; ++j) sum = __fadd_rn(sum, ps[r][j]);
        __syncwarp();  // ps[r] read before the next tile overwrites it
    }
    const float inv = __fdiv_rn(1.0f, __shfl_sync(kFull, sum, 0));
    float o[kDims];  // pass 3: O = P·V, p = e · inv
    for (int i = 0; i < kDims; ++i) o[i] = 0.0f;
    for (int k0 = lo; k0 <= t_last; k0 += kKeys) {
        load(k0, true);
        if (visible(k0)) ps[r][lane] = __fmul_rn(exp_softmax(__fadd_rn(score(k0), -m)), inv);
        __syncwarp();
        int j_lo, j_end;
        j_range(k0, j_lo, j_end);
        for (int i = 0; i < kDims; ++i) {
            const int d = lane + 32 * i;
            if (d >= hd) break;
            for (int j = j_lo; j < j_end; ++j) o[i] = __fmaf_rn(ps[r][j], vs[j][d], o[i]);
        }
        __syncwarp();
    }
    if (!active) return;
    for (int i = 0; i < kDims; ++i) {
        const int d = lane + 32 * i;
        if (d >= hd) break;
        out[size_t(t) * q_width + head * hd + d] = o[i];
    }
}

using attention_128 = decltype(&attention_kernel<128, 32>);
using attention_256 = decltype(&attention_kernel<256, 16>);

// ---- attention with bf16 probabilities (FlashAttention-2 on a bf16 model) -------------------------
// The twin of cpu::Attention with flash_bf16 (softmax_visible_flash_bf16 after the unscaled
// S = Q·Kᵀ): row t's visible keys are cut into blocks of kFlashKeys = 128 (FLASH_BLOCK_KEYS)
// aligned to multiples of 128, walked from the last block to the first with the running max m_b
// (max over the visible keys of this block and the later ones, NaN dropped); with m the row's max
// and c = scale·log2e: p = exp2(fma(s, c, -(m_b·c))), rescale_b = exp2((m_b - m)·c),
// sum += p·rescale_b in that walk order (keys ascending within a block), and the key's weight is
// (bf16(p)·rescale_b)·(1/sum). m and sum are needed before the weights, so the blocks are walked
// three times, each walk recomputing a block's scores into shared memory (sc): walk 0 finds m,
// walk 1 sums, walk 2 writes the weights and accumulates O = P·V, per output dim an FMA chain over
// keys ascending within a block. The CPU's P·V chain runs over all keys ascending: identical for
// rows that see one block, a different summation order (f32 rounding) for rows that see more.
// Layout as attention_kernel: a warp per query row, K / V tiles of kKeys keys (dividing 128).
constexpr int kFlashKeys = 128;

template <int kMaxHd, int kKeys>
__global__ void __launch_bounds__(kRows * 32)
    attention_flash_bf16_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                int seq, int n_heads, int n_kv_heads, int hd, int window, float c,
                                float* __restrict__ out) {
    static_assert(kFlashKeys % kKeys == 0, "a key tile lies in one 128-key block");
    __shared__ float qs[kRows][kMaxHd];
    __shared__ float ks[kKeys][kMaxHd + 1];  // +1: lane j reads row j, rows on distinct banks
    __shared__ float vs[kKeys][kMaxHd];
    __shared__ float sc[kRows][kFlashKeys];  // a block's scores, then p·rescale_b or the weights
    constexpr int kDims = kMaxHd / 32;
    const int head = blockIdx.y, g = head / (n_heads / n_kv_heads);
    const int q_width = n_heads * hd, kv_width = n_kv_heads * hd;
    const int lane = threadIdx.x % 32, r = threadIdx.x / 32;
    const int t0 = blockIdx.x * kRows, t = t0 + r;
    const bool active = t < seq;
    auto first = [&](int row) { return window > 0 && row + 1 > window ? row + 1 - window : 0; };
    for (int d = lane; d < hd; d += 32) qs[r][d] = active ? q[size_t(t) * q_width + head * hd + d] : 0.0f;
    const int t_last = t0 + kRows - 1 < seq - 1 ? t0 + kRows - 1 : seq - 1;
    const int lo = first(t0), tile_lo = lo / kKeys * kKeys;
    // Row t sees keys row_first..row_last (none for a row past the sequence).
    const int row_first = active ? first(t) : 1, row_last = active ? t : 0;
    // Loads keys key0..key0 + kKeys - 1 of the kv head's rows of src (0 outside lo..t_last).
    auto load = [&](const float* src, int key0, float* dst, int dst_stride) {
        for (int e = threadIdx.x; e < kKeys * hd; e += kRows * 32) {
            const int j = e / hd, d = e % hd, key = key0 + j;
            dst[j * dst_stride + d] = key >= lo && key <= t_last ? src[size_t(key) * kv_width + g * hd + d] : 0.0f;
        }
    };
    float m = -INFINITY, inv = 0.0f, sum = 0.0f;
    float o[kDims];
    for (int i = 0; i < kDims; ++i) o[i] = 0.0f;
    for (int walk = 0; walk < 3; ++walk) {
        float m_run = -INFINITY;
        for (int b0 = t_last / kFlashKeys * kFlashKeys; b0 + kFlashKeys > lo; b0 -= kFlashKeys) {
            // Row t's keys in this block: b0 + j_lo ..= b0 + j_hi (none when j_lo > j_hi).
            const int j_lo = (row_first > b0 ? row_first : b0) - b0;
            const int j_hi = (row_last < b0 + kFlashKeys - 1 ? row_last : b0 + kFlashKeys - 1) - b0;
            const int k_begin = tile_lo > b0 ? tile_lo : b0;
            // Scores of the block (an FMA chain over d, unscaled as the CPU's S = Q·Kᵀ).
            float block_max = -INFINITY;
            for (int k0 = k_begin; k0 < b0 + kFlashKeys && k0 <= t_last; k0 += kKeys) {
                __syncthreads();  // the previous tile (and qs, sc) fully used / written
                load(k, k0, &ks[0][0], kMaxHd + 1);
                __syncthreads();
                const int j = k0 - b0 + lane;
                if (lane < kKeys && j >= j_lo && j <= j_hi) {
                    float acc = 0.0f;
                    for (int d = 0; d < hd; ++d) acc = __fmaf_rn(qs[r][d], ks[lane][d], acc);
                    sc[r][j] = acc;
                    block_max = fmaxf(block_max, acc);  // fmaxf drops NaN, as f32::max
                }
            }
            for (int off = 16; off > 0; off /= 2) block_max = fmaxf(block_max, __shfl_xor_sync(kFull, block_max, off));
            __syncwarp();  // sc[r] written by every lane
            const float m_b = fmaxf(m_run, block_max);
            m_run = m_b;
            if (walk == 0) continue;
            const float max_scaled = __fmul_rn(m_b, c);
            const float rescale = exp2f(__fmul_rn(__fadd_rn(m_b, -m), c));
            for (int j = j_lo + lane; j <= j_hi; j += 32) {
                const float p = exp2f(__fmaf_rn(sc[r][j], c, -max_scaled));
                sc[r][j] = walk == 1 ? __fmul_rn(p, rescale) : __fmul_rn(__fmul_rn(bf16_round(p), rescale), inv);
            }
            __syncwarp();
            if (walk == 1) {
                for (int j = j_lo; j <= j_hi; ++j) sum = __fadd_rn(sum, sc[r][j]);  // every lane, in key order
                continue;
            }
            // O += P·V over the block's V tiles; only the keys row t sees.
            for (int k0 = k_begin; k0 < b0 + kFlashKeys && k0 <= t_last; k0 += kKeys) {
                __syncthreads();
                load(v, k0, &vs[0][0], kMaxHd);
                __syncthreads();
                const int jj_lo = j_lo - (k0 - b0) > 0 ? j_lo - (k0 - b0) : 0;
                const int jj_end = j_hi - (k0 - b0) + 1 < kKeys ? j_hi - (k0 - b0) + 1 : kKeys;
                for (int i = 0; i < kDims; ++i) {
                    const int d = lane + 32 * i;
                    if (d >= hd) break;
                    float acc = o[i];
                    for (int jj = jj_lo; jj < jj_end; ++jj) acc = __fmaf_rn(sc[r][k0 - b0 + jj], vs[jj][d], acc);
                    o[i] = acc;
                }
            }
        }
        if (walk == 0) m = m_run;
        if (walk == 1) inv = __fdiv_rn(1.0f, sum);
    }
    if (!active) return;
    for (int i = 0; i < kDims; ++i) {
        const int d = lane + 32 * i;
        if (d >= hd) break;
        out[size_t(t) * q_width + head * hd + d] = o[i];
    }
}

using attention_flash_128 = decltype(&attention_flash_bf16_kernel<128, 32>);
using attention_flash_256 = decltype(&attention_flash_bf16_kernel<256, 16>);

// ---- per-channel amax: acc[c] = max(acc[c], max_r |x[r, c]|) ------------------------------------
// |x| as f32 bits: for non-negative floats the unsigned order is the numeric order, and NaN is
// above +inf, so an unsigned atomicMax propagates NaN (as quant_fp8.cu's absmax).
constexpr int kAmaxRowsPerBlock = 64;

__global__ void __launch_bounds__(kThreads)
    channel_amax_kernel(const float* __restrict__ x, size_t rows, size_t cols, unsigned* __restrict__ acc) {
    const size_t c = size_t(blockIdx.x) * kThreads + threadIdx.x;
    if (c >= cols) return;
    const size_t r0 = size_t(blockIdx.y) * kAmaxRowsPerBlock;
    const size_t r1 = r0 + kAmaxRowsPerBlock < rows ? r0 + kAmaxRowsPerBlock : rows;
    unsigned m = 0;
    for (size_t r = r0; r < r1; ++r) m = max(m, __float_as_uint(x[r * cols + c]) & 0x7FFFFFFFu);
    atomicMax(acc + c, m);
}

// ---- -log softmax(row)[target], one block per row, in double -------------------------------------
__global__ void __launch_bounds__(kThreads)
    log_softmax_nll_kernel(const float* __restrict__ logits, size_t vocab, const uint32_t* __restrict__ targets,
                           double* __restrict__ out) {
    const float* row = logits + size_t(blockIdx.x) * vocab;
    float mx = -INFINITY;
    for (size_t i = threadIdx.x; i < vocab; i += kThreads) mx = fmaxf(mx, row[i]);
    mx = block_max(mx);
    double sum = 0.0;
    // exp(NaN) is NaN: a NaN logit makes the row's NLL NaN.
    for (size_t i = threadIdx.x; i < vocab; i += kThreads) sum += exp(double(__fadd_rn(row[i], -mx)));
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        const uint32_t target = targets[blockIdx.x];
        out[blockIdx.x] = target < vocab ? double(mx) + log(sum) - double(row[target]) : NAN;
    }
}

unsigned rows_grid(size_t rows) { return static_cast<unsigned>(rows); }

}  // namespace

extern "C" int rq_rms_norm_f32(const float* x, size_t rows, size_t cols, const float* weight, float eps, int offset,
                               int bf16, float* out) {
    if (rows == 0 || cols == 0) return cudaSuccess;
    if (rows > 0x7FFFFFFFu) return cudaErrorInvalidValue;
    const int mode = (offset ? 2 : 0) + (bf16 ? 1 : 0);
    RQ_LAUNCH(rms_norm_kernel, rows_grid(rows), kThreads, 0, 0)(x, weight, cols, eps, mode, out);
    return cudaGetLastError();
}

extern "C" int rq_layer_norm_f32(const float* x, size_t rows, size_t cols, const float* weight, const float* bias,
                                 float eps, float* out) {
    if (rows == 0 || cols == 0) return cudaSuccess;
    if (rows > 0x7FFFFFFFu) return cudaErrorInvalidValue;
    RQ_LAUNCH(layer_norm_kernel, rows_grid(rows), kThreads, 0, 0)(x, weight, bias, cols, eps, out);
    return cudaGetLastError();
}

extern "C" int rq_matmul_bt_f32(const float* x, const float* w, size_t m, size_t k, size_t n, float* out) {
    if (m == 0 || n == 0) return cudaSuccess;
    if (m > 65535u * kTileM || n > 0x7FFFFFFFu || k > 0x7FFFFFFFu) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>((n + kTileN - 1) / kTileN), static_cast<unsigned>((m + kTileM - 1) / kTileM));
    RQ_LAUNCH(matmul_bt_kernel, grid, kThreads, 0, 0)(x, w, int(m), int(k), int(n), out);
    return cudaGetLastError();
}

extern "C" int rq_matmul_bt_naive_f32(const float* x, const float* w, size_t m, size_t k, size_t n, float* out) {
    if (m == 0 || n == 0) return cudaSuccess;
    if (m > 0x7FFFFFFFu || n > 0x7FFFFFFFu || k > 0x7FFFFFFFu) return cudaErrorInvalidValue;
    RQ_LAUNCH(matmul_bt_naive_kernel, grid_for(m * n), kThreads, 0, 0)(x, w, int(m), int(k), int(n), out);
    return cudaGetLastError();
}

extern "C" int rq_add_row_bias_f32(float* x, size_t total, const float* bias, size_t n) {
    if (total == 0 || n == 0) return cudaSuccess;
    RQ_LAUNCH(add_row_bias_kernel, grid_for(total), kThreads, 0, 0)(x, bias, total, n);
    return cudaGetLastError();
}

extern "C" int rq_mul_cols_f32(float* x, size_t total, const float* scale, size_t n) {
    if (total == 0 || n == 0) return cudaSuccess;
    RQ_LAUNCH(mul_cols_kernel, grid_for(total), kThreads, 0, 0)(x, scale, total, n);
    return cudaGetLastError();
}

extern "C" int rq_add_f32(float* x, const float* y, size_t n) {
    if (n == 0) return cudaSuccess;
    RQ_LAUNCH(add_kernel, grid_for(n), kThreads, 0, 0)(x, y, n);
    return cudaGetLastError();
}

extern "C" int rq_round_bf16_f32(float* x, size_t n) {
    if (n == 0) return cudaSuccess;
    RQ_LAUNCH(round_bf16_kernel, grid_for(n), kThreads, 0, 0)(x, n);
    return cudaGetLastError();
}

extern "C" int rq_gated_mul_f32(float* gate, const float* up, size_t n, int act, int bf16) {
    if (act < RQ_ACT_SILU || act > RQ_ACT_GELU) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    RQ_LAUNCH(gated_mul_kernel, grid_for(n), kThreads, 0, 0)(gate, up, n, act, bf16);
    return cudaGetLastError();
}

extern "C" int rq_finish_logits_f32(float* x, size_t n, float divisor, float cap, int bf16) {
    if (!(divisor >= 0.0f) || !(cap >= 0.0f) || isinf(divisor) || isinf(cap)) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    RQ_LAUNCH(finish_logits_kernel, grid_for(n), kThreads, 0, 0)(x, n, divisor, cap, bf16);
    return cudaGetLastError();
}

extern "C" int rq_activate_f32(float* x, size_t n, int act) {
    if (act < RQ_ACT_SILU || act > RQ_ACT_GELU) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    RQ_LAUNCH(activate_kernel, grid_for(n), kThreads, 0, 0)(x, n, act);
    return cudaGetLastError();
}

extern "C" int rq_rope_f32(float* x, const float* cos_table, const float* sin_table, size_t seq, size_t heads,
                           size_t head_dim, size_t rotary_dim, int bf16) {
    if (rotary_dim % 2 != 0 || rotary_dim > head_dim) return cudaErrorInvalidValue;
    const size_t half = rotary_dim / 2;
    if (seq == 0 || heads == 0 || half == 0) return cudaSuccess;
    RQ_LAUNCH(rope_kernel, grid_for(seq * heads * half), kThreads, 0, 0)
    (x, cos_table, sin_table, seq, heads, head_dim, half, bf16);
    return cudaGetLastError();
}

extern "C" int rq_attention_f32(const float* q, const float* k, const float* v, size_t seq, size_t n_heads,
                                size_t n_kv_heads, size_t head_dim, size_t sliding_window, float scale, float softcap,
                                const float* alibi_slopes, int flash_bf16, float* out) {
    if (n_kv_heads == 0 || n_heads % n_kv_heads != 0 || head_dim == 0 || head_dim > 256 || n_heads > 65535 ||
        seq > 0x7FFFFFFFu - kFlashKeys || sliding_window > 0x7FFFFFFFu || !(softcap >= 0.0f) ||
        (flash_bf16 && (softcap > 0.0f || alibi_slopes)))
        return cudaErrorInvalidValue;
    if (seq == 0 || n_heads == 0) return cudaSuccess;
    const dim3 grid(static_cast<unsigned>((seq + kRows - 1) / kRows), static_cast<unsigned>(n_heads));
    if (flash_bf16) {
        const float c = scale * 1.44269504088896340736f;  // scale * f32 LOG2_E
        if (head_dim <= 128) {
            attention_flash_128 kernel = attention_flash_bf16_kernel<128, 32>;
            RQ_LAUNCH(kernel, grid, kRows * 32, 0, 0)
            (q, k, v, int(seq), int(n_heads), int(n_kv_heads), int(head_dim), int(sliding_window), c, out);
        } else {
            attention_flash_256 kernel = attention_flash_bf16_kernel<256, 16>;
            RQ_LAUNCH(kernel, grid, kRows * 32, 0, 0)
            (q, k, v, int(seq), int(n_heads), int(n_kv_heads), int(head_dim), int(sliding_window), c, out);
        }
    } else if (head_dim <= 128) {
        attention_128 kernel = attention_kernel<128, 32>;
        RQ_LAUNCH(kernel, grid, kRows * 32, 0, 0)
        (q, k, v, int(seq), int(n_heads), int(n_kv_heads), int(head_dim), int(sliding_window), scale, softcap,
         alibi_slopes, out);
    } else {
        attention_256 kernel = attention_kernel<256, 16>;
        RQ_LAUNCH(kernel, grid, kRows * 32, 0, 0)
        (q, k, v, int(seq), int(n_heads), int(n_kv_heads), int(head_dim), int(sliding_window), scale, softcap,
         alibi_slopes, out);
    }
    return cudaGetLastError();
}

extern "C" int rq_channel_amax_f32(const float* x, size_t rows, size_t cols, float* acc) {
    if (rows == 0 || cols == 0) return cudaSuccess;
    const size_t row_blocks = (rows + kAmaxRowsPerBlock - 1) / kAmaxRowsPerBlock;
    if (row_blocks > 65535u) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads), static_cast<unsigned>(row_blocks));
    RQ_LAUNCH(channel_amax_kernel, grid, kThreads, 0, 0)(x, rows, cols, reinterpret_cast<unsigned*>(acc));
    return cudaGetLastError();
}

extern "C" int rq_log_softmax_nll_f32(const float* logits, size_t rows, size_t vocab, const uint32_t* targets,
                                      double* out_nll) {
    if (rows == 0) return cudaSuccess;
    if (vocab == 0 || rows > 0x7FFFFFFFu) return cudaErrorInvalidValue;
    RQ_LAUNCH(log_softmax_nll_kernel, rows_grid(rows), kThreads, 0, 0)(logits, vocab, targets, out_nll);
    return cudaGetLastError();
}
