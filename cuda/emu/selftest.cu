// TEST ONLY: kernels that check the host emulator itself (schedules, deadlock reports, warp
// operations), compiled only with feature `cuda-emu`; launchers in cuda/emu/selftest.h,
// tests in tests/cuda_emu.rs.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../launch.cuh"
#include "../mma.cuh"
#include "selftest.h"

namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;

__global__ void race_kernel(uint32_t* out) {
    __shared__ uint32_t last_writer;
    last_writer = threadIdx.x;  // every thread, unsynchronized: the race
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = last_writer;
}

__global__ void shfl_after_exit_kernel(uint32_t* out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_sync(kFull, threadIdx.x, 0);
}

__global__ void mma_after_exit_kernel(float* out) {
    if (threadIdx.x >= 16) return;
    const uint32_t a[4] = {}, b[2] = {};
    const float c[4] = {};
    float d[4];
    mma_m16n8k16_bf16(d, a, b, c);
    out[threadIdx.x] = d[0];
}

__global__ void mismatched_collectives_kernel(uint32_t* out) {
    if (threadIdx.x < 16) {
        out[threadIdx.x] = __shfl_sync(kFull, threadIdx.x, 0);
    } else {
        out[threadIdx.x] = __ballot_sync(kFull, 1);
    }
}

__global__ void warp_ops_kernel(uint32_t* out, uint32_t* counters) {
    const unsigned t = threadIdx.x, lane = t % 32;
    uint32_t* o = out + (size_t(blockIdx.x) * blockDim.x + t) * RQ_EMU_SELFTEST_WARP_OPS;
    o[0] = __shfl_sync(kFull, t * 3, 5);                    // lane 5's t * 3
    o[1] = __shfl_down_sync(kFull, t, 3);                   // t + 3, own t in lanes 29-31
    o[2] = __shfl_xor_sync(kFull, t, 6);                    // t ^ 6
    o[3] = __shfl_up_sync(kFull, t, 2);                     // t - 2, own t in lanes 0-1
    o[4] = __ballot_sync(kFull, t % 3 == 0);                // lanes whose t is a multiple of 3
    o[5] = __reduce_add_sync(kFull, t);                     // sum of the warp's t
    o[6] = __reduce_min_sync(kFull, 100u - lane);           // 69
    o[7] = __reduce_max_sync(kFull, int(lane) - 20);        // 11 (int)
    o[8] = __shfl_sync(kFull, t, 1, 8);                     // lane 1 of t's group of 8
    o[9] = __float_as_uint(__shfl_xor_sync(kFull, float(t) * 0.5f, 1));  // (t ^ 1) * 0.5
    // Half warps with their own masks: the low half reads its lane 15, the high half votes.
    if (lane < 16) {
        o[10] = __shfl_sync(0x0000FFFFu, t, 15);
    } else {
        o[10] = __ballot_sync(0xFFFF0000u, lane % 2 == 0);
    }
    o[11] = __all_sync(kFull, t < 1u << 30) + 2 * __any_sync(kFull, lane == 7);  // 3
    o[12] = __float_as_uint(__fmaf_rn(float(t), 1.0f / 3.0f, -1.0f));
    __syncwarp();
    atomicAdd(&counters[0], 1u);
    atomicAdd(reinterpret_cast<float*>(&counters[1]), 0.5f);
}

// Thread i of one block writes out[i]: with more threads than out has values, the last ones
// write past its end.
__global__ void out_of_bounds_kernel(float* out) { out[threadIdx.x] = 1.0f; }

// Runs one launch under `seed` (see selftest.h) and returns its status.
template <typename Launch>
int with_schedule(long long seed, Launch launch) {
    rq_emu::set_thread_schedule(seed);
    launch();
    rq_emu::clear_thread_schedule();
    return cudaGetLastError();
}

}  // namespace

extern "C" int rq_emu_selftest_race(uint32_t* out, unsigned blocks, long long seed) {
    return with_schedule(seed, [&] { RQ_LAUNCH(race_kernel, blocks, 256, 0, 0)(out); });
}

extern "C" int rq_emu_selftest_shfl_after_exit(uint32_t* out, long long seed) {
    return with_schedule(seed, [&] { RQ_LAUNCH(shfl_after_exit_kernel, 1, 32, 0, 0)(out); });
}

extern "C" int rq_emu_selftest_mma_after_exit(float* out, long long seed) {
    return with_schedule(seed, [&] { RQ_LAUNCH(mma_after_exit_kernel, 1, 32, 0, 0)(out); });
}

extern "C" int rq_emu_selftest_mismatched_collectives(uint32_t* out, long long seed) {
    return with_schedule(seed, [&] { RQ_LAUNCH(mismatched_collectives_kernel, 1, 32, 0, 0)(out); });
}

extern "C" int rq_emu_selftest_warp_ops(uint32_t* out, uint32_t* counters, unsigned blocks, unsigned threads,
                                        long long seed) {
    return with_schedule(seed, [&] { RQ_LAUNCH(warp_ops_kernel, blocks, threads, 0, 0)(out, counters); });
}

extern "C" int rq_emu_selftest_out_of_bounds(unsigned n) {
    float* out = nullptr;
    if (cudaMalloc(reinterpret_cast<void**>(&out), n * sizeof(float)) != cudaSuccess) return cudaGetLastError();
    RQ_LAUNCH(out_of_bounds_kernel, 1, n + 1, 0, 0)(out);
    const int status = cudaGetLastError();
    cudaFree(out);
    return status;
}
