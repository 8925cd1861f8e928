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

#endif  // RQ_LAUNCH_CUH
