// RQ_LAUNCH(kernel, grid, block, smem, stream)(args...): one spelling of a kernel launch for both
// builds of cuda/*.cu.
//  - nvcc (feature `cuda`): kernel<<<grid, block, smem, stream>>>(args...).
//  - g++ with the host emulator force-included (feature `cuda-emu`, cuda/emu/emu.h): runs every
//    thread of the grid on the CPU before returning; a failure (a deadlocked warp collective or
//    barrier) is reported by cudaGetLastError() / cudaDeviceSynchronize(), as on a GPU.
// A kernel template with several arguments needs parentheses or an alias: the macro splits on
// commas (RQ_LAUNCH(k<A, B>, ...) does not work).
#ifndef RQ_LAUNCH_CUH
#define RQ_LAUNCH_CUH

#if defined(__CUDACC__)
#define RQ_LAUNCH(kernel, grid, block, smem, stream) kernel<<<(grid), (block), (smem), (stream)>>>
#elif defined(RQ_CUDA_EMU)
#define RQ_LAUNCH(kernel, grid, block, smem, stream) \
    ::rq_emu::launch(#kernel, kernel, (grid), (block), (smem), (stream))
#else
#error "cuda/*.cu are compiled by nvcc, or by g++ with -include cuda/emu/emu.h (feature cuda-emu)"
#endif

#include <stddef.h>

// Blocks of `threads` threads for a grid-stride loop over n items: enough to fill the largest
// GPUs several times over, at most 4096.
inline unsigned rq_grid_stride_blocks(size_t n, int threads) {
    const size_t blocks = (n + threads - 1) / threads;
    return static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
}

#endif  // RQ_LAUNCH_CUH
