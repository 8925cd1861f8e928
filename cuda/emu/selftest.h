/* TEST ONLY: C launchers of the emulator's self-test kernels (cuda/emu/selftest.cu), compiled
 * only with feature `cuda-emu` and bound by bindgen for tests/cuda_emu.rs. Not part of the
 * kernels' ABI (ffi/rq_cuda.h). Pointers are device pointers (host memory under the emulator);
 * every function returns a cudaError_t status, with rq_error_string (ffi/rq_cuda.h) for its text.
 *
 * `seed` selects the schedule of the threads of each block for this launch: -1 in thread
 * order, >= 0 the order RQ_EMU_SEED=seed gives (whatever the environment says). */
#ifndef RQ_CUDA_EMU_SELFTEST_H
#define RQ_CUDA_EMU_SELFTEST_H

#include <stddef.h>
#include <stdint.h>

#include "../../ffi/rq_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A shared-memory race: every thread of a block of 256 writes its index into one __shared__
 * word without synchronizing; after __syncthreads thread 0 stores the word (the last writer)
 * in out[block]. In thread order that is 255 for every block; other schedules differ. */
int rq_emu_selftest_race(uint32_t* out, unsigned blocks, long long seed);

/* Deadlock: in a block of 32 threads, lanes 16-31 return and lanes 0-15 call __shfl_sync with
 * the full mask. Must fail, naming the kernel and the lanes. */
int rq_emu_selftest_shfl_after_exit(uint32_t* out, long long seed);

/* Deadlock: as rq_emu_selftest_shfl_after_exit, with the warp-wide mma of cuda/mma.cuh in place
 * of __shfl_sync (out: 16 floats). */
int rq_emu_selftest_mma_after_exit(float* out, long long seed);

/* Deadlock: lanes 0-15 call __shfl_sync, lanes 16-31 __ballot_sync, both with the full mask. */
int rq_emu_selftest_mismatched_collectives(uint32_t* out, long long seed);

/* Warp operations of `blocks` blocks of `threads` threads (a multiple of 32); thread t of block
 * b writes RQ_EMU_SELFTEST_WARP_OPS values at out[(b * threads + t) * RQ_EMU_SELFTEST_WARP_OPS]
 * (see selftest.cu for each), and every thread adds 1 to counters[0] (atomicAdd unsigned) and
 * 0.5f to the float at counters[1] (atomicAdd float). */
#define RQ_EMU_SELFTEST_WARP_OPS 13
int rq_emu_selftest_warp_ops(uint32_t* out, uint32_t* counters, unsigned blocks, unsigned threads,
                             long long seed);

/* An out-of-bounds write: a kernel of n + 1 threads writes one float each into a device buffer of
 * n floats. Only for builds with AddressSanitizer (RQ_EMU_ASAN=1), which must abort on it with a
 * heap-buffer-overflow report; elsewhere it corrupts the heap. */
int rq_emu_selftest_out_of_bounds(unsigned n);

#ifdef __cplusplus
}
#endif

#endif /* RQ_CUDA_EMU_SELFTEST_H */
