// rq-min's CUDA host emulator, device side: force-included by g++ before anything else in each
// cuda/*.cu (`g++ -x c++ -std=c++17 -include cuda/emu/emu.h -isystem <cuda>/include`, see
// build.rs, feature `cuda-emu`), so that the same sources nvcc compiles for the GPU compile as
// plain C++ and run on the CPU. The runtime behind it (scheduler, fibers, the cudart subset) is
// cuda/emu/emu.cpp.
//
// What it emulates
//  - Kernels are ordinary host functions (__global__ / __device__ / __host__ expand to nothing).
//    A launch (RQ_LAUNCH in cuda/launch.cuh) runs the blocks of the grid on a pool of OS
//    threads, one block per OS thread at a time, and the threads of a block as fibers on that
//    OS thread: each runs until it exits or waits (in __syncthreads or a warp collective).
//  - __shared__ is `static thread_local`: one copy per OS thread, and an OS thread runs one
//    block at a time, so one copy per running block. Like the hardware's, it is not cleared
//    between blocks. Dynamic shared memory (extern __shared__) is not emulated.
//  - threadIdx, blockIdx, blockDim, gridDim are thread_local variables the scheduler sets
//    before it resumes an emulated thread; warpSize is 32.
//  - Warp collectives (__shfl*_sync, __ballot_sync, __all/__any_sync, __reduce_*_sync,
//    __syncwarp) complete once every lane of the mask has arrived at the same collective with
//    the same mask; __syncthreads completes once every thread of the block that has not exited
//    is there. A wait that can never complete (a lane of the mask exited, lanes wait in
//    different collectives or at the barrier) fails the launch with cudaErrorLaunchFailure and
//    a message naming the kernel, the block and the lanes (cudaGetErrorString).
//  - The warp-level MMA of cuda/mma.cuh (mma.sync m16n8k16 bf16 -> f32) is a warp collective
//    too: every lane deposits its fragments, and once all 32 have arrived each gets its 4
//    outputs computed from the whole A and B (the fragment layouts of the PTX ISA, exact
//    products summed in k order by fmaf; cuda/emu/mma.cpp).
//  - Atomics are real atomics on host memory (__atomic builtins), safe across blocks.
//  - Conversions (cuda_fp16/bf16/fp8.h) are NVIDIA's own host code paths: the headers have
//    host implementations when not compiled by nvcc; they are bit-exact with the hardware's.
//  - RQ_EMU_SEED=N (environment, read at the first launch) runs the threads of each block in a
//    random order seeded by N and the block index, between barriers and collectives; unset,
//    they run in thread order. A shared-memory race then gives different bytes per seed.
//    RQ_EMU_THREADS=N sets the number of OS threads (default: the number of CPUs).
//
// Limits (what differs from a GPU)
//  - No device code generation: g++ compiles the kernels for the CPU, so nvcc-only code (inline
//    PTX, tensor cores / wmma / ldmatrix, cooperative groups, textures, clock()/timing, dynamic
//    parallelism, __constant__ banks) does not compile or is not emulated; the one exception is
//    cuda/mma.cuh's mma. Its sums are exact-product fmaf chains, while a tensor core adds with
//    its own internal precision and order: results agree within the bound of a dot product,
//    not bit for bit.
//  - Floating point: g++ (-std=c++17, ISO mode) never contracts a * b + c into an FMA, nvcc does
//    by default (--fmad=true); write __fmaf_rn / __fmul_rn / __fadd_rn where the rounding
//    matters. The approximate intrinsics (__expf, __logf, rsqrtf, __fdividef) use the correctly
//    rounded libm functions here, the hardware's approximations differ in the last bits, and
//    denormals are not flushed.
//  - Memory: "device" memory is host memory; no address spaces, no coalescing, no caches, no
//    out-of-bounds detection unless built with AddressSanitizer (RQ_EMU_ASAN=1, see build.rs).
//    The threads of a block interleave only where they wait, so a data race shows as a
//    schedule-dependent result (RQ_EMU_SEED), not as torn values.
//  - A __shfl_sync reading a lane outside the mask returns the caller's own value (undefined
//    on the hardware). The unqualified max/min overloads below may clash with
//    `using namespace std`.
#ifndef RQ_CUDA_EMU_H
#define RQ_CUDA_EMU_H

#if defined(__CUDACC__)
#error "cuda/emu/emu.h is for the host emulator (g++); nvcc compiles cuda/*.cu for the GPU"
#endif

#define RQ_CUDA_EMU 1

// ---- execution space and launch qualifiers --------------------------------------------------
// Defined before NVIDIA's crt/host_defines.h, which keeps existing definitions of these when
// not compiled by nvcc. __forceinline__ is host_defines' own (inline, always_inline).
#define __global__
#define __device__
#define __host__
#define __shared__ static thread_local
#define __launch_bounds__(...)
// device_launch_parameters.h declares threadIdx & co. as extern "C" constants; ours are
// thread_local (below). Host compilation does not include it, this keeps it that way.
#define __DEVICE_LAUNCH_PARAMETERS_H__

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- built-in variables ---------------------------------------------------------------------
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

// ---- the runtime in emu.cpp -----------------------------------------------------------------
namespace rq_emu {

// The warp collectives the scheduler completes.
enum class Op : int {
    Shfl, ShflUp, ShflDown, ShflXor, Ballot, All, Any, SyncWarp,
    ReduceAddU, ReduceMinU, ReduceMaxU, ReduceAddI, ReduceMinI, ReduceMaxI,
    MmaM16N8K16Bf16,
};

// One lane's operands and result of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, in
// the PTX ISA's registers: a0..a7 in a[0..4], b0..b3 in b[0..2] (two bf16 per word, the
// lower-numbered element in the low half), c0..c3 and d0..d3.
struct MmaFragments {
    uint32_t a[4];
    uint32_t b[2];
    float c[4];
    float d[4];
};

// One lane's part of a collective: it lives on the lane's stack while the lane waits; the
// scheduler reads `value` / `arg` / `width` of every lane of the mask and writes `result`.
struct Collective {
    Op op;
    unsigned mask;
    int arg;    // source lane (Shfl), delta (Up / Down), lane mask (Xor)
    int width;  // segment width of the shuffles, a power of two <= 32
    uint64_t value;
    uint64_t result;
    MmaFragments* mma = nullptr;  // MmaM16N8K16Bf16: the lane's fragments, d written by the scheduler
};

// Waits, as the calling emulated thread, until every lane of c.mask arrived; then c.result is
// set. Aborts with a message when called outside a kernel.
void warp_collective(Collective& c);
// __syncthreads.
void sync_threads();
// The arithmetic of a completed MmaM16N8K16Bf16 (cuda/emu/mma.cpp): lanes[j] holds lane j's
// fragments; writes every lane's d.
void mma_m16n8k16_bf16(MmaFragments* const lanes[32]);
// Runs thread_body(ctx) as every thread of a grid (the emulated launch) and records a failure
// for cudaGetLastError / cudaDeviceSynchronize of the calling host thread.
void run_grid(const char* kernel, dim3 grid, dim3 block, size_t smem, void (*thread_body)(void*),
              void* ctx);
// Schedule of the launches made by the calling host thread: seed < 0 runs the threads of a
// block in thread order, seed >= 0 in the order RQ_EMU_SEED=seed gives. Without a call, the
// launches follow RQ_EMU_SEED. For the emulator's self-tests.
void set_thread_schedule(long long seed);
void clear_thread_schedule();

// What RQ_LAUNCH(kernel, grid, block, smem, stream) expands to: the kernel's parameters are
// copied by value (as a launch does), then every thread calls the kernel with them.
template <typename... Params>
class Launch {
public:
    Launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem)
        : name_(name), kernel_(kernel), grid_(grid), block_(block), smem_(smem) {}

    template <typename... Args>
    void operator()(Args&&... args) const {
        static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong argument count");
        struct Call {
            void (*kernel)(Params...);
            std::tuple<std::decay_t<Params>...> params;
        } call{kernel_, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
        run_grid(name_, grid_, block_, smem_,
                 [](void* p) {
                     Call& c = *static_cast<Call*>(p);
                     std::apply(c.kernel, c.params);
                 },
                 &call);
    }

private:
    const char* name_;
    void (*kernel_)(Params...);
    dim3 grid_, block_;
    size_t smem_;
};

template <typename... Params>
Launch<Params...> launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                         cudaStream_t /*stream: every launch is synchronous*/) {
    return Launch<Params...>(name, kernel, grid, block, smem);
}

template <typename T>
uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp shuffles move values of at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
    T v;
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

inline uint64_t collective(Op op, unsigned mask, uint64_t value, int arg = 0, int width = 32) {
    Collective c{op, mask, arg, width, value, 0};
    warp_collective(c);
    return c.result;
}

// Read-modify-write of a float / double through compare-exchange on its bits.
template <typename T, typename U, typename F>
T atomic_float_rmw(T* address, F f) {
    U* bits = reinterpret_cast<U*>(address);
    U old = __atomic_load_n(bits, __ATOMIC_RELAXED);
    U next;
    do {
        next = to_bits(f(from_bits<T>(old)));
    } while (!__atomic_compare_exchange_n(bits, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return from_bits<T>(old);
}

// The warp-wide mma of cuda/mma.cuh: waits until all 32 lanes of the warp have deposited
// their fragments (a missing lane is a deadlock, as for __shfl_sync), then f.d is set.
inline void warp_mma_m16n8k16_bf16(MmaFragments& f) {
    Collective c{Op::MmaM16N8K16Bf16, 0xFFFFFFFFu, 0, 32, 0, 0, &f};
    warp_collective(c);
}

}  // namespace rq_emu

// ---- synchronization ------------------------------------------------------------------------
inline void __syncthreads() { rq_emu::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { rq_emu::collective(rq_emu::Op::SyncWarp, mask, 0); }
// Blocks share host memory and run on OS threads: a full fence orders them.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

// ---- warp shuffles, votes and reductions ----------------------------------------------------
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
    return rq_emu::from_bits<T>(rq_emu::collective(rq_emu::Op::Shfl, mask, rq_emu::to_bits(var), src_lane, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return rq_emu::from_bits<T>(
        rq_emu::collective(rq_emu::Op::ShflUp, mask, rq_emu::to_bits(var), int(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return rq_emu::from_bits<T>(
        rq_emu::collective(rq_emu::Op::ShflDown, mask, rq_emu::to_bits(var), int(delta), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
    return rq_emu::from_bits<T>(
        rq_emu::collective(rq_emu::Op::ShflXor, mask, rq_emu::to_bits(var), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
    return unsigned(rq_emu::collective(rq_emu::Op::Ballot, mask, predicate != 0));
}
inline int __all_sync(unsigned mask, int predicate) {
    return int(rq_emu::collective(rq_emu::Op::All, mask, predicate != 0));
}
inline int __any_sync(unsigned mask, int predicate) {
    return int(rq_emu::collective(rq_emu::Op::Any, mask, predicate != 0));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned value) {
    return unsigned(rq_emu::collective(rq_emu::Op::ReduceAddU, mask, value));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned value) {
    return unsigned(rq_emu::collective(rq_emu::Op::ReduceMinU, mask, value));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned value) {
    return unsigned(rq_emu::collective(rq_emu::Op::ReduceMaxU, mask, value));
}
inline int __reduce_add_sync(unsigned mask, int value) {
    return int(rq_emu::collective(rq_emu::Op::ReduceAddI, mask, uint32_t(value)));
}
inline int __reduce_min_sync(unsigned mask, int value) {
    return int(rq_emu::collective(rq_emu::Op::ReduceMinI, mask, uint32_t(value)));
}
inline int __reduce_max_sync(unsigned mask, int value) {
    return int(rq_emu::collective(rq_emu::Op::ReduceMaxI, mask, uint32_t(value)));
}

// ---- atomics (relaxed, as the hardware's atomicXxx) -----------------------------------------
#define RQ_EMU_INT_ATOMICS(T)                                                                       \
    inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }            \
    inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }            \
    inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }          \
    inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }            \
    inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }              \
    inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }            \
    inline T atomicCAS(T* a, T expected, T desired) {                                               \
        __atomic_compare_exchange_n(a, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED); \
        return expected;                                                                            \
    }                                                                                               \
    inline T atomicMax(T* a, T v) {                                                                 \
        T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                               \
        while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
        }                                                                                           \
        return old;                                                                                 \
    }                                                                                               \
    inline T atomicMin(T* a, T v) {                                                                 \
        T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                               \
        while (v < old && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
        }                                                                                           \
        return old;                                                                                 \
    }
RQ_EMU_INT_ATOMICS(int)
RQ_EMU_INT_ATOMICS(unsigned int)
RQ_EMU_INT_ATOMICS(long long)
RQ_EMU_INT_ATOMICS(unsigned long long)
#undef RQ_EMU_INT_ATOMICS

inline float atomicAdd(float* a, float v) {
    return rq_emu::atomic_float_rmw<float, uint32_t>(a, [v](float x) { return x + v; });
}
inline double atomicAdd(double* a, double v) {
    return rq_emu::atomic_float_rmw<double, uint64_t>(a, [v](double x) { return x + v; });
}
inline float atomicExch(float* a, float v) {
    return rq_emu::atomic_float_rmw<float, uint32_t>(a, [v](float) { return v; });
}

// ---- bit casts, integer intrinsics, min / max -----------------------------------------------
inline unsigned __float_as_uint(float x) { return rq_emu::from_bits<unsigned>(rq_emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return rq_emu::from_bits<float>(rq_emu::to_bits(x)); }
inline int __float_as_int(float x) { return rq_emu::from_bits<int>(rq_emu::to_bits(x)); }
inline float __int_as_float(int x) { return rq_emu::from_bits<float>(rq_emu::to_bits(x)); }
inline long long __double_as_longlong(double x) { return rq_emu::from_bits<long long>(rq_emu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return rq_emu::from_bits<double>(rq_emu::to_bits(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <typename T>
T __ldg(const T* p) { return *p; }

// CUDA's integer overloads (the float ones are fmaxf / fminf, which drop NaN as CUDA's do).
#define RQ_EMU_MIN_MAX(T)                                \
    inline T max(T a, T b) { return a < b ? b : a; }     \
    inline T min(T a, T b) { return b < a ? b : a; }
RQ_EMU_MIN_MAX(int)
RQ_EMU_MIN_MAX(unsigned int)
RQ_EMU_MIN_MAX(long long)
RQ_EMU_MIN_MAX(unsigned long long)
#undef RQ_EMU_MIN_MAX
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }

// ---- float intrinsics -----------------------------------------------------------------------
// Correctly rounded: exact as on the hardware.
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
// Approximate on the hardware (a few ulp, denormals flushed); correctly rounded libm here.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

#endif  // RQ_CUDA_EMU_H
