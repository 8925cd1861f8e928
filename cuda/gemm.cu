// Tensor-core GEMM: out[m, n] = x[m, k] · w[n, k]ᵀ with bf16 operands and f32 accumulation,
// through the warp-level mma of cuda/mma.cuh (m16n8k16). Operands are rounded to bf16 (nearest
// even) as they are staged, which is exact for the callers' bf16-representable values; each
// output is the f32 sum of exact bf16 products, in the tensor core's order (the emulator's:
// one fmaf chain over k in order, as rq_matmul_bt_naive_f32). Checked by tests/cuda_gemm.rs.
//
// A block of 4 warps computes a 64 x 64 tile of out, each warp 32 x 32 of it as 2 x 4 mma
// tiles of 16 x 8; k goes in steps of 32 through static shared memory, two mma k-steps of 16
// each. Fragments are read from shared memory at the coordinates of the PTX ISA's layouts
// (section 9.7.14.5.8, summarized in cuda/mma.cuh), not with ldmatrix, so that the emulator's
// twin of the mma checks this file's layout code.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../ffi/rq_cuda.h"
#include "launch.cuh"
#include "mma.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kTileM = 64, kTileN = 64, kTileK = 32;
constexpr int kWarpM = 32, kWarpN = 32;  // a warp's part of the tile: 2 x 4 mma tiles
// Shared tiles hold bf16 pairs (k even, k odd) as mma registers, kTileK / 2 per row; +4 words
// spread the 8 rows a fragment load reads over distinct banks.
constexpr int kPairs = kTileK / 2, kRowWords = kPairs + 4;

// x[r, p] and x[r, p + 1] as a bf16 pair; zero outside the rows x cols matrix.
__device__ __forceinline__ uint32_t load_pair(const float* __restrict__ x, int rows, int cols, int r, int p) {
    if (r >= rows) return 0;  // two bf16 zeros
    const float* row = x + size_t(r) * cols;
    return pack_bf16x2(p < cols ? row[p] : 0.0f, p + 1 < cols ? row[p + 1] : 0.0f);
}

__global__ void __launch_bounds__(kThreads)
    matmul_bt_bf16_kernel(const float* __restrict__ x, const float* __restrict__ w, int m, int k, int n,
                          float* __restrict__ out) {
    __shared__ uint32_t xs[kTileM][kRowWords];  // xs[r][q]: x rows of the tile, k pair q
    __shared__ uint32_t ws[kTileN][kRowWords];  // ws[c][q]: w rows (out columns), k pair q
    const int row0 = blockIdx.y * kTileM, col0 = blockIdx.x * kTileN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wrow = warp / 2 * kWarpM, wcol = warp % 2 * kWarpN;  // the warp's part of the tile
    const int group = lane >> 2, tig = lane % 4;                    // groupID, threadID_in_group
    float acc[2][4][4] = {};                                        // [m16 tile][n8 tile][c_i]
    for (int k0 = 0; k0 < k; k0 += kTileK) {
        for (int e = threadIdx.x; e < kTileM * kPairs; e += kThreads) {
            const int r = e / kPairs, q = e % kPairs;
            xs[r][q] = load_pair(x, m, k, row0 + r, k0 + 2 * q);
            ws[r][q] = load_pair(w, n, k, col0 + r, k0 + 2 * q);
        }
        __syncthreads();
        // k-steps of 16 that hold any of k (the condition is the same for the whole block).
        for (int s = 0; s < kTileK / 16 && k0 + 16 * s < k; ++s) {
            const int kq = 8 * s;  // the step's first pair
            // A (x, 16 x 16 row-major): register j holds a_2j, a_2j+1 at row groupID + 8 (j & 1),
            // cols threadID_in_group * 2 + 8 (j >> 1) + {0, 1}: pair tig + 4 (j >> 1).
            uint32_t a[2][4];
            for (int mi = 0; mi < 2; ++mi)
                for (int j = 0; j < 4; ++j)
                    a[mi][j] = xs[wrow + 16 * mi + group + 8 * (j & 1)][kq + tig + 4 * (j >> 1)];
            // B (wᵀ, 16 x 8 "col": k-consecutive in w's rows): register j holds b_2j, b_2j+1 at
            // k threadID_in_group * 2 + 8 j + {0, 1}: pair tig + 4 j, column (row of w) groupID.
            uint32_t b[4][2];
            for (int ni = 0; ni < 4; ++ni)
                for (int j = 0; j < 2; ++j) b[ni][j] = ws[wcol + 8 * ni + group][kq + tig + 4 * j];
            for (int mi = 0; mi < 2; ++mi)
                for (int ni = 0; ni < 4; ++ni) mma_m16n8k16_bf16(acc[mi][ni], a[mi], b[ni], acc[mi][ni]);
        }
        __syncthreads();
    }
    // D: d_i at row groupID + 8 (i >> 1), col threadID_in_group * 2 + (i & 1).
    for (int mi = 0; mi < 2; ++mi) {
        for (int ni = 0; ni < 4; ++ni) {
            for (int i = 0; i < 4; ++i) {
                const int r = row0 + wrow + 16 * mi + group + 8 * (i >> 1);
                const int c = col0 + wcol + 8 * ni + tig * 2 + (i & 1);
                if (r < m && c < n) out[size_t(r) * n + c] = acc[mi][ni][i];
            }
        }
    }
}

// *out = 0 when some x[i] is not a bf16 value (low 16 bits not zero); a NaN counts as one (it
// stays NaN through the product either way). The launcher sets *out = 1 first.
__global__ void __launch_bounds__(kThreads) all_bf16_kernel(const float* __restrict__ x, size_t n, int* out) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    bool exact = true;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const uint32_t bits = __float_as_uint(x[i]);
        exact = exact && ((bits & 0xFFFFu) == 0 || (bits & 0x7FFFFFFFu) > 0x7F800000u);  // or NaN
    }
    if (!exact) atomicExch(out, 0);
}

}  // namespace

extern "C" int rq_all_bf16_f32(const float* x, size_t n, int* out) {
    const int one = 1;
    cudaError_t e = cudaMemcpy(out, &one, sizeof one, cudaMemcpyHostToDevice);
    if (e != cudaSuccess || n == 0) return e;
    const size_t blocks = (n + kThreads - 1) / kThreads;
    RQ_LAUNCH(all_bf16_kernel, static_cast<unsigned>(blocks < 1024 ? blocks : 1024), kThreads, 0, 0)(x, n, out);
    return cudaGetLastError();
}

extern "C" int rq_matmul_bt_bf16_f32(const float* x, const float* w, size_t m, size_t k, size_t n, float* out) {
    if (m == 0 || n == 0) return cudaSuccess;
    // k0 + 2 q + 1 stays an int.
    if (m > 65535u * kTileM || n > 0x7FFFFFFFu || k > 0x7FFFFFFFu - kTileK) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>((n + kTileN - 1) / kTileN), static_cast<unsigned>((m + kTileM - 1) / kTileM));
    RQ_LAUNCH(matmul_bt_bf16_kernel, grid, kThreads, 0, 0)(x, w, int(m), int(k), int(n), out);
    return cudaGetLastError();
}
