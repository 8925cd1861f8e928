// rq-min's CUDA host emulator, runtime side (see cuda/emu/emu.h for what is emulated and the
// limits): the grid scheduler (blocks on a pool of OS threads), the block scheduler (threads as
// fibers, barriers, warp collectives, deadlock reports) and a subset of the CUDA runtime API on
// host memory (cudaMalloc, cudaMemcpy, cudaGetLastError, ...), compiled only for feature
// `cuda-emu`.
#include "emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define RQ_EMU_ASAN 1
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace rq_emu {
namespace {

[[noreturn]] void fatal(const char* what) {
    std::fprintf(stderr, "rq-emu: %s\n", what);
    std::abort();
}

// ---- fiber contexts -------------------------------------------------------------------------
// makecontext creates a fiber on its own stack; switching between fibers is swapcontext, or on
// x86-64 the few instructions below: swapcontext also saves and restores the signal mask, a
// system call (~260 ns here) per switch, and a kernel with a block reduction switches a few
// times per thread (a 4096 x 256 grid: millions of switches per launch).
// Build with -DRQ_EMU_UCONTEXT to use swapcontext everywhere.
#if defined(__x86_64__) && !defined(RQ_EMU_UCONTEXT)
#define RQ_EMU_ASM_SWITCH 1
// rq_emu_switch(save, next): pushes the callee-saved registers of the System V ABI, stores the
// stack pointer in *save, loads `next` (a stack pointer saved the same way) and pops them.
asm(R"(
    .text
    .p2align 4
    .type rq_emu_switch, @function
rq_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size rq_emu_switch, .-rq_emu_switch
)");
extern "C" void rq_emu_switch(void** save, void* next) __asm__("rq_emu_switch");
#endif

struct Context {
#if defined(RQ_EMU_ASM_SWITCH)
    void* sp = nullptr;
#else
    ucontext_t uc;
#endif
};

// A fresh context that calls entry() on [stack, stack + size) when first switched to.
void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
#if defined(RQ_EMU_ASM_SWITCH)
    // As rq_emu_switch left it: six zeroed registers, then entry as the return address, then a
    // null return address for entry (which never returns), 16-byte aligned as after a call.
    auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
    auto* sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(entry);
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    c.sp = sp;
#else
    if (getcontext(&c.uc) != 0) fatal("getcontext failed");
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
#endif
}

void context_switch(Context& from, Context& to) {
#if defined(RQ_EMU_ASM_SWITCH)
    rq_emu_switch(&from.sp, to.sp);
#else
    if (swapcontext(&from.uc, &to.uc) != 0) fatal("swapcontext failed");
#endif
}

// ---- fiber stacks ---------------------------------------------------------------------------
#if defined(RQ_EMU_ASAN)
constexpr size_t kStackBytes = 512 << 10;  // ASan's redzones make frames larger
#else
constexpr size_t kStackBytes = 64 << 10;
#endif

// mmap'ed stacks with a PROT_NONE guard page below, kept for the next launch.
class StackPool {
public:
    char* take() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (!free_.empty()) {
                char* s = free_.back();
                free_.pop_back();
                return s;
            }
        }
        const size_t page = size_t(sysconf(_SC_PAGESIZE));
        void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED) fatal("mmap of a fiber stack failed");
        if (mprotect(p, page, PROT_NONE) != 0) fatal("mprotect of a fiber stack guard page failed");
        return static_cast<char*>(p) + page;
    }
    void give_back(const std::vector<char*>& stacks) {
        std::lock_guard<std::mutex> lock(mutex_);
        free_.insert(free_.end(), stacks.begin(), stacks.end());
    }

private:
    std::mutex mutex_;
    std::vector<char*> free_;
};

StackPool& stack_pool() {
    static StackPool* pool = new StackPool;  // never destroyed: launches may outlive statics
    return *pool;
}

// ---- schedule -------------------------------------------------------------------------------
// SplitMix64.
struct Rng {
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    size_t below(size_t n) { return size_t(next() % n); }
};

// -1: in thread order; >= 0: the seed.
long long env_seed() {
    static const long long seed = [] {
        const char* s = std::getenv("RQ_EMU_SEED");
        if (s == nullptr || *s == '\0') return -1LL;
        char* end = nullptr;
        long long v = std::strtoll(s, &end, 10);
        if (*end != '\0' || v < 0) fatal("RQ_EMU_SEED must be a non-negative integer");
        return v;
    }();
    return seed;
}

thread_local bool tls_has_schedule = false;
thread_local long long tls_schedule = -1;

unsigned worker_count() {
    static const unsigned n = [] {
        const char* s = std::getenv("RQ_EMU_THREADS");
        long v = s ? std::strtol(s, nullptr, 10) : 0;
        if (v <= 0) v = long(std::thread::hardware_concurrency());
        return unsigned(std::max(1L, v));
    }();
    return n;
}

// ---- errors of the calling host thread ------------------------------------------------------
// Unlike a CUDA context, where a kernel fault is sticky, an error here is cleared by
// cudaGetLastError / cudaDeviceSynchronize: tests run kernels that fail on purpose.
thread_local cudaError_t tls_last_error = cudaSuccess;
// The detail of the last failed launch, which cudaGetErrorString(tls_error_code) returns.
thread_local cudaError_t tls_error_code = cudaSuccess;
thread_local std::string tls_error_text;

const char* generic_error_string(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorLaunchFailure: return "unspecified launch failure";
        default: return "unknown error (rq-min CUDA emulator)";
    }
}

void record_error(cudaError_t e, const std::string& detail) {
    tls_last_error = e;
    tls_error_code = e;
    tls_error_text = std::string(generic_error_string(e)) + ": " + detail;
}

// ---- one launch -----------------------------------------------------------------------------
struct Grid {
    const char* kernel;
    dim3 grid, block;
    void (*body)(void*);
    void* ctx;
    long long seed;
    uint64_t blocks;
    std::atomic<uint64_t> next_block{0};
    std::atomic<bool> failed{false};
    std::mutex mutex;
    std::string error;  // the first deadlock report
};

enum class State : uint8_t { NotStarted, Running, Ready, AtBarrier, AtCollective, Exited };

struct Fiber;

// An emulated thread of the current block.
struct Lane {
    State state;
    Fiber* fiber;      // the fiber it runs on, once started
    Collective* coll;  // while AtCollective
    uint3 idx;
};

struct Fiber {
    Context ctx;
    char* stack;
    int lane;  // the lane it runs, -1 while free
#if defined(RQ_EMU_ASAN)
    void* fake_stack = nullptr;
#endif
};

const char* op_name(Op op) {
    switch (op) {
        case Op::Shfl: return "__shfl_sync";
        case Op::ShflUp: return "__shfl_up_sync";
        case Op::ShflDown: return "__shfl_down_sync";
        case Op::ShflXor: return "__shfl_xor_sync";
        case Op::Ballot: return "__ballot_sync";
        case Op::All: return "__all_sync";
        case Op::Any: return "__any_sync";
        case Op::SyncWarp: return "__syncwarp";
        case Op::ReduceAddU: return "__reduce_add_sync(unsigned)";
        case Op::ReduceMinU: return "__reduce_min_sync(unsigned)";
        case Op::ReduceMaxU: return "__reduce_max_sync(unsigned)";
        case Op::ReduceAddI: return "__reduce_add_sync(int)";
        case Op::ReduceMinI: return "__reduce_min_sync(int)";
        case Op::ReduceMaxI: return "__reduce_max_sync(int)";
        case Op::MmaM16N8K16Bf16: return "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
    }
    return "?";
}

// "0-15, 17" for the set bits of a 32-bit mask offset by `base`, or of a list.
std::string ranges(const std::vector<unsigned>& items) {
    std::string s;
    for (size_t i = 0; i < items.size();) {
        size_t j = i;
        while (j + 1 < items.size() && items[j + 1] == items[j] + 1) ++j;
        if (!s.empty()) s += ", ";
        s += std::to_string(items[i]);
        if (j > i) s += "-" + std::to_string(items[j]);
        i = j + 1;
    }
    return s;
}

std::string dims(dim3 d) {
    return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

std::string hex(unsigned v) {
    char b[16];
    std::snprintf(b, sizeof b, "0x%08x", v);
    return b;
}

void fiber_entry();

// The OS thread that runs blocks of one launch, and the state of the block it runs.
struct Worker {
    Grid& grid;
    Context main;  // the OS thread's own stack
    std::vector<Fiber*> fibers;
    std::vector<Fiber*> free_fibers;
    std::vector<char*> stacks;
    Fiber* current = nullptr;

    std::vector<Lane> lanes;
    unsigned threads = 0;            // per block
    std::vector<unsigned> ready;     // lanes to resume
    size_t ready_pos = 0;            // in thread order, ready[ready_pos..] are left
    std::vector<unsigned> unstarted; // lanes not started, in the order to start them
    size_t unstarted_pos = 0;
    unsigned live = 0;               // lanes not exited
    bool random = false;
    Rng rng{0};
    bool deadlock = false;
    std::string report;

    explicit Worker(Grid& g) : grid(g) {}

    ~Worker() {
        for (Fiber* f : fibers) delete f;
        stack_pool().give_back(stacks);
    }

    Fiber* take_fiber() {
        if (!free_fibers.empty()) {
            Fiber* f = free_fibers.back();
            free_fibers.pop_back();
            return f;
        }
        Fiber* f = new Fiber;
        f->stack = stack_pool().take();
        f->lane = -1;
        context_init(f->ctx, f->stack, kStackBytes, fiber_entry);
        fibers.push_back(f);
        stacks.push_back(f->stack);
        return f;
    }

    void switch_to(Context& from, Fiber* to) {
        current = to;
#if defined(RQ_EMU_ASAN)
        void* save = nullptr;
        __sanitizer_start_switch_fiber(&save, to->stack, kStackBytes);
        context_switch(from, to->ctx);
        __sanitizer_finish_switch_fiber(save, nullptr, nullptr);
#else
        context_switch(from, to->ctx);
#endif
    }

    void switch_to_main(Fiber* self) {
        current = nullptr;
#if defined(RQ_EMU_ASAN)
        __sanitizer_start_switch_fiber(&self->fake_stack, main_stack_bottom, main_stack_size);
        context_switch(self->ctx, main);
        __sanitizer_finish_switch_fiber(self->fake_stack, nullptr, nullptr);
#else
        context_switch(self->ctx, main);
#endif
    }
#if defined(RQ_EMU_ASAN)
    const void* main_stack_bottom = nullptr;
    size_t main_stack_size = 0;
#endif

    // Makes lane l the one running: the state, its fiber and threadIdx.
    void start(unsigned l, Fiber* f) {
        lanes[l].state = State::Running;
        lanes[l].fiber = f;
        f->lane = int(l);
        threadIdx = lanes[l].idx;
    }

    // Called by fiber `self` when its lane waits (self->lane >= 0, not Running) or exited
    // (self->lane == -1): runs other lanes until self's lane may go on or self gets a new lane
    // to start; switches to the worker's own stack when the block is over.
    void schedule(Fiber* self) {
        for (;;) {
            if (self->lane >= 0 && lanes[unsigned(self->lane)].state == State::Running) return;
            const size_t n_ready = ready.size() - ready_pos;
            const size_t n_new = unstarted.size() - unstarted_pos;
            if (n_ready + n_new == 0) {
                if (live == 0 || deadlock) {  // block over: self is free (its lane exited)
                    free_fibers.push_back(self);
                    switch_to_main(self);
                    continue;
                }
                if (resolve()) continue;
                deadlock = true;
                report = describe_deadlock();
                switch_to_main(self);  // never resumed: the launch stops
                fatal("a deadlocked block was resumed");
            }
            // Choose: in thread order, or at random among all lanes that can go on.
            size_t pick = random ? rng.below(n_ready + n_new) : 0;
            if (pick < n_ready) {
                if (random) std::swap(ready[ready_pos], ready[ready_pos + pick]);
                const unsigned l = ready[ready_pos++];
                Fiber* f = lanes[l].fiber;
                lanes[l].state = State::Running;
                threadIdx = lanes[l].idx;
                if (f == self) return;
                if (self->lane < 0) free_fibers.push_back(self);
                switch_to(self->ctx, f);
            } else {
                pick -= n_ready;
                std::swap(unstarted[unstarted_pos], unstarted[unstarted_pos + pick]);
                const unsigned l = unstarted[unstarted_pos++];
                if (self->lane < 0) {
                    start(l, self);
                    return;
                }
                Fiber* f = take_fiber();
                start(l, f);
                switch_to(self->ctx, f);
            }
        }
    }

    // With every live lane waiting: completes the warp collectives whose lanes have all
    // arrived, or else the barrier if every live lane is at it. False if neither.
    bool resolve() {
        bool progress = false;
        for (unsigned base = 0; base < threads; base += 32) {
            const unsigned n = std::min(32u, threads - base);
            unsigned done = 0;  // lanes of this warp handled in this pass
            for (unsigned i = 0; i < n; ++i) {
                const Lane& li = lanes[base + i];
                if (li.state != State::AtCollective || (done >> i & 1)) continue;
                const Collective& c = *li.coll;
                if (!(c.mask >> i & 1)) continue;  // a mask without the caller: never completes
                bool complete = true;
                for (unsigned j = 0; j < 32 && complete; ++j) {
                    if (!(c.mask >> j & 1)) continue;
                    complete = j < n && lanes[base + j].state == State::AtCollective &&
                               lanes[base + j].coll->op == c.op && lanes[base + j].coll->mask == c.mask;
                }
                if (!complete) continue;
                complete_collective(base, c.mask);
                done |= c.mask;
                progress = true;
            }
        }
        if (progress) return true;
        unsigned at_barrier = 0;
        for (const Lane& l : lanes) at_barrier += l.state == State::AtBarrier;
        if (at_barrier == 0 || at_barrier != live) return false;
        for (unsigned l = 0; l < threads; ++l) {
            if (lanes[l].state == State::AtBarrier) make_ready(l);
        }
        return true;
    }

    void make_ready(unsigned l) {
        lanes[l].state = State::Ready;
        ready.push_back(l);
    }

    // Results of one collective: lanes base + j for the bits j of mask.
    void complete_collective(unsigned base, unsigned mask) {
        auto value = [&](unsigned j) { return lanes[base + j].coll->value; };
        const Op op = lanes[base + unsigned(__builtin_ctz(mask))].coll->op;
        uint64_t all = 0;  // the vote / reduction over the mask
        if (op == Op::MmaM16N8K16Bf16) {  // the mask is the full warp
            MmaFragments* frags[32];
            for (unsigned j = 0; j < 32; ++j) frags[j] = lanes[base + j].coll->mma;
            mma_m16n8k16_bf16(frags);
        } else if (op == Op::Ballot || op == Op::All || op == Op::Any) {
            for (unsigned j = 0; j < 32; ++j) {
                if (mask >> j & 1 && value(j)) all |= 1ull << j;
            }
            if (op == Op::All) all = all == mask;
            if (op == Op::Any) all = all != 0;
        } else if (op >= Op::ReduceAddU) {
            bool first = true;
            for (unsigned j = 0; j < 32; ++j) {
                if (!(mask >> j & 1)) continue;
                const uint32_t u = uint32_t(value(j)), a = uint32_t(all);
                const int32_t s = int32_t(u), b = int32_t(a);
                uint32_t r;
                switch (op) {
                    case Op::ReduceAddU: case Op::ReduceAddI: r = a + u; break;
                    case Op::ReduceMinU: r = first || u < a ? u : a; break;
                    case Op::ReduceMaxU: r = first || u > a ? u : a; break;
                    case Op::ReduceMinI: r = uint32_t(first || s < b ? s : b); break;
                    default: r = uint32_t(first || s > b ? s : b); break;
                }
                all = r;
                first = false;
            }
        }
        for (unsigned j = 0; j < 32; ++j) {
            if (!(mask >> j & 1)) continue;
            Collective& c = *lanes[base + j].coll;
            if (op == Op::Shfl || op == Op::ShflUp || op == Op::ShflDown || op == Op::ShflXor) {
                // PTX shfl.sync: the segment of `width` lanes holding j, the source lane, and
                // the caller's own value when the source is outside the segment.
                const unsigned w = unsigned(c.width), first = j & ~(w - 1), last = first + w - 1;
                long src;
                switch (op) {
                    case Op::Shfl: src = long(first | (unsigned(c.arg) & (w - 1))); break;
                    case Op::ShflUp: src = long(j) - c.arg; if (src < long(first)) src = j; break;
                    case Op::ShflDown: src = long(j) + c.arg; if (src > long(last)) src = j; break;
                    default: src = long(j ^ (unsigned(c.arg) & 31)); if (src > long(last)) src = j; break;
                }
                if (!(mask >> src & 1)) src = j;  // a lane outside the mask: undefined on the GPU
                c.result = value(unsigned(src));
            } else {
                c.result = all;
            }
        }
        for (unsigned j = 0; j < 32; ++j) {
            if (mask >> j & 1) make_ready(base + j);
        }
    }

    std::string describe_deadlock() {
        const dim3 b = blockDim;
        std::string s = "rq-emu: deadlock in kernel " + std::string(grid.kernel) + ", block " + dims(blockIdx) +
                        " of grid " + dims(grid.grid) + ", block size " + dims(b) + ":";
        bool any = false;
        for (unsigned base = 0; base < threads; base += 32) {
            const unsigned n = std::min(32u, threads - base);
            unsigned described = 0;
            for (unsigned i = 0; i < n; ++i) {
                const Lane& li = lanes[base + i];
                if (li.state != State::AtCollective || (described >> i & 1)) continue;
                const Collective& c = *li.coll;
                std::vector<unsigned> waiting, exited, barrier, other, outside;
                std::string other_what;
                for (unsigned j = 0; j < n; ++j) {
                    const Lane& lj = lanes[base + j];
                    if (lj.state == State::AtCollective && lj.coll->op == c.op && lj.coll->mask == c.mask) {
                        waiting.push_back(j);
                        described |= 1u << j;
                    }
                }
                for (unsigned j = 0; j < 32; ++j) {
                    if (!(c.mask >> j & 1)) continue;
                    if (j >= n) { outside.push_back(j); continue; }
                    const Lane& lj = lanes[base + j];
                    if (lj.state == State::Exited) exited.push_back(j);
                    else if (lj.state == State::AtBarrier) barrier.push_back(j);
                    else if (lj.state == State::AtCollective && (lj.coll->op != c.op || lj.coll->mask != c.mask)) {
                        other.push_back(j);
                        if (other_what.empty()) other_what = std::string(op_name(lj.coll->op)) + "(mask " + hex(lj.coll->mask) + ")";
                    }
                }
                s += std::string(any ? ";" : "") + " warp " + std::to_string(base / 32) + ": lanes " + ranges(waiting) +
                     " wait in " + op_name(c.op) + "(mask " + hex(c.mask) + ")";
                std::string why;
                auto add = [&](const std::vector<unsigned>& v, const std::string& what) {
                    if (v.empty()) return;
                    why += std::string(why.empty() ? "" : ", ") + "lanes " + ranges(v) + " " + what;
                };
                add(exited, "have exited");
                add(barrier, "wait at __syncthreads");
                add(other, "wait in " + other_what);
                add(outside, "are not in the block");
                if (!(c.mask >> i & 1)) why += std::string(why.empty() ? "" : ", ") + "the mask leaves out the caller";
                s += why.empty() ? "" : ", but " + why;
                any = true;
            }
        }
        std::vector<unsigned> at_barrier;
        for (unsigned l = 0; l < threads; ++l) {
            if (lanes[l].state == State::AtBarrier) at_barrier.push_back(l);
        }
        if (!at_barrier.empty()) {
            s += std::string(any ? ";" : "") + " threads " + ranges(at_barrier) + " wait at __syncthreads";
        }
        return s;
    }

    void run_block(uint64_t linear) {
        blockIdx.x = unsigned(linear % grid.grid.x);
        blockIdx.y = unsigned(linear / grid.grid.x % grid.grid.y);
        blockIdx.z = unsigned(linear / grid.grid.x / grid.grid.y);
        for (unsigned l = 0; l < threads; ++l) {
            lanes[l] = Lane{State::NotStarted, nullptr, nullptr,
                            uint3{l % blockDim.x, l / blockDim.x % blockDim.y, l / blockDim.x / blockDim.y}};
            unstarted[l] = l;
        }
        ready.clear();
        ready_pos = 0;
        unstarted_pos = 0;
        live = threads;
        if (random) {
            // The order depends on the seed and the block only, not on which OS thread runs it.
            rng = Rng{uint64_t(grid.seed) * 0x9E3779B97F4A7C15ull ^ (linear + 1) * 0xD1B54A32D192ED03ull};
            rng.next();
        }
        Fiber* f = take_fiber();
        f->lane = -1;
        switch_to(main, f);
    }

    void run() {
#if defined(RQ_EMU_ASAN)
        // The bounds of this OS thread's stack, for ASan's fiber switch annotations.
        pthread_attr_t attr;
        pthread_getattr_np(pthread_self(), &attr);
        void* addr;
        pthread_attr_getstack(&attr, &addr, &main_stack_size);
        pthread_attr_destroy(&attr);
        main_stack_bottom = addr;
#endif
        threads = grid.block.x * grid.block.y * grid.block.z;
        lanes.resize(threads);
        unstarted.resize(threads);
        ready.reserve(threads);
        random = grid.seed >= 0;
        gridDim = grid.grid;
        blockDim = grid.block;
        for (;;) {
            if (grid.failed.load(std::memory_order_relaxed)) return;
            const uint64_t b = grid.next_block.fetch_add(1, std::memory_order_relaxed);
            if (b >= grid.blocks) return;
            run_block(b);
            if (deadlock) {
                std::lock_guard<std::mutex> lock(grid.mutex);
                if (!grid.failed.exchange(true)) grid.error = report;
                return;
            }
        }
    }
};

thread_local Worker* tls_worker = nullptr;

Worker& worker_or_die(const char* what) {
    if (tls_worker == nullptr || tls_worker->current == nullptr) {
        std::fprintf(stderr, "rq-emu: %s called outside a kernel\n", what);
        std::abort();
    }
    return *tls_worker;
}

void fiber_entry() {
    Worker& w = *tls_worker;
    Fiber* self = w.current;
#if defined(RQ_EMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    for (;;) {
        w.schedule(self);
        w.grid.body(w.grid.ctx);
        const unsigned l = unsigned(self->lane);
        w.lanes[l].state = State::Exited;
        w.lanes[l].fiber = nullptr;
        --w.live;
        self->lane = -1;
    }
}

}  // namespace

void warp_collective(Collective& c) {
    Worker& w = worker_or_die("a warp collective");
    Fiber* self = w.current;
    Lane& lane = w.lanes[unsigned(self->lane)];
    lane.state = State::AtCollective;
    lane.coll = &c;
    w.schedule(self);
    lane.coll = nullptr;
}

void sync_threads() {
    Worker& w = worker_or_die("__syncthreads");
    Fiber* self = w.current;
    w.lanes[unsigned(self->lane)].state = State::AtBarrier;
    w.schedule(self);
}

void set_thread_schedule(long long seed) {
    tls_has_schedule = true;
    tls_schedule = seed < 0 ? -1 : seed;
}

void clear_thread_schedule() { tls_has_schedule = false; }

void run_grid(const char* kernel, dim3 grid, dim3 block, size_t smem, void (*thread_body)(void*), void* ctx) {
    const uint64_t threads = uint64_t(block.x) * block.y * block.z;
    const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    if (threads == 0 || threads > 1024 || block.z > 64 || blocks == 0 || grid.y > 65535 || grid.z > 65535) {
        record_error(cudaErrorInvalidConfiguration,
                     "rq-emu: kernel " + std::string(kernel) + " launched with grid " + dims(grid) + ", block " + dims(block));
        return;
    }
    if (smem > 0) {
        record_error(cudaErrorInvalidConfiguration, "rq-emu: kernel " + std::string(kernel) + ": " +
                                                        std::to_string(smem) +
                                                        " bytes of dynamic shared memory (not emulated)");
        return;
    }
    if (tls_worker != nullptr) fatal("kernel launch from a kernel (dynamic parallelism is not emulated)");
    Grid g;
    g.kernel = kernel;
    g.grid = grid;
    g.block = block;
    g.body = thread_body;
    g.ctx = ctx;
    g.seed = tls_has_schedule ? tls_schedule : env_seed();
    g.blocks = blocks;
    auto work = [&g] {
        Worker w(g);
        tls_worker = &w;
        w.run();
        tls_worker = nullptr;
    };
    const unsigned n = unsigned(std::min<uint64_t>(worker_count(), blocks));
    std::vector<std::thread> helpers;
    for (unsigned i = 1; i < n; ++i) helpers.emplace_back(work);
    work();  // the launching thread is one of the workers
    for (std::thread& t : helpers) t.join();
    if (g.failed) record_error(cudaErrorLaunchFailure, g.error);
}

}  // namespace rq_emu

// ---- the CUDA runtime API subset, on host memory --------------------------------------------
// Declared by NVIDIA's cuda_runtime_api.h (extern "C"). Every call is synchronous; streams and
// events are placeholders. There is one device, the emulator.

namespace {

cudaError_t fail(cudaError_t e) {
    rq_emu::tls_last_error = e;
    rq_emu::tls_error_code = cudaSuccess;
    return e;
}

}  // namespace

cudaError_t cudaGetLastError(void) {
    cudaError_t e = rq_emu::tls_last_error;
    rq_emu::tls_last_error = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void) { return rq_emu::tls_last_error; }

cudaError_t cudaDeviceSynchronize(void) { return cudaGetLastError(); }

const char* cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        default: return "cudaErrorUnknown";
    }
}

const char* cudaGetErrorString(cudaError_t e) {
    // The detail of the calling thread's last failed launch, while that error is the one asked.
    if (e != cudaSuccess && e == rq_emu::tls_error_code) return rq_emu::tls_error_text.c_str();
    return rq_emu::generic_error_string(e);
}

cudaError_t cudaGetDeviceCount(int* count) {
    *count = 1;
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice); }

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
    if (device != 0) return fail(cudaErrorInvalidDevice);
    std::memset(prop, 0, sizeof *prop);
    std::snprintf(prop->name, sizeof prop->name, "rq-min CUDA emulator");
    prop->major = 9;
    prop->minor = 0;
    prop->totalGlobalMem = size_t(sysconf(_SC_PHYS_PAGES)) * size_t(sysconf(_SC_PAGESIZE));
    prop->sharedMemPerBlock = 48 << 10;
    prop->warpSize = 32;
    prop->maxThreadsPerBlock = 1024;
    prop->maxThreadsDim[0] = 1024;
    prop->maxThreadsDim[1] = 1024;
    prop->maxThreadsDim[2] = 64;
    prop->maxGridSize[0] = 0x7FFFFFFF;
    prop->maxGridSize[1] = 65535;
    prop->maxGridSize[2] = 65535;
    prop->multiProcessorCount = int(rq_emu::worker_count());
    return cudaSuccess;
}

// The emulator does not count its allocations: free = total = RQ_EMU_DEVICE_MEMORY (bytes,
// read at each call, so tests can play a small GPU) or else the host's physical memory.
cudaError_t cudaMemGetInfo(size_t* free, size_t* total) {
    const char* env = std::getenv("RQ_EMU_DEVICE_MEMORY");
    *total = env && *env ? size_t(std::strtoull(env, nullptr, 10))
                         : size_t(sysconf(_SC_PHYS_PAGES)) * size_t(sysconf(_SC_PAGESIZE));
    *free = *total;
    return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
    *ptr = nullptr;
    if (bytes == 0) return cudaSuccess;
    // cudaMalloc's alignment (256 bytes); aligned_alloc wants a multiple of it.
    const size_t rounded = (bytes + 255) & ~size_t(255);
    if (rounded < bytes) return fail(cudaErrorMemoryAllocation);
    *ptr = std::aligned_alloc(256, rounded);
    return *ptr ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaFree(void* ptr) {
    std::free(ptr);
    return cudaSuccess;
}

// The stream-ordered pool and pinned host memory: plain allocations (every call is synchronous).
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t) { return cudaMalloc(ptr, bytes); }

cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) { return cudaFree(ptr); }

cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device) {
    *pool = nullptr;
    return device == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice);
}

cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, enum cudaMemPoolAttr, void*) { return cudaSuccess; }

cudaError_t cudaMallocHost(void** ptr, size_t bytes) {
    *ptr = std::malloc(bytes > 0 ? bytes : 1);
    return *ptr ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaFreeHost(void* ptr) {
    std::free(ptr);
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    if (unsigned(kind) > unsigned(cudaMemcpyDefault)) return fail(cudaErrorInvalidMemcpyDirection);
    if (bytes > 0) std::memmove(dst, src, bytes);
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
    return cudaMemcpy(dst, src, bytes, kind);
}

cudaError_t cudaMemset(void* dst, int value, size_t bytes) {
    if (bytes > 0) std::memset(dst, value, bytes);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) { return cudaMemset(dst, value, bytes); }

cudaError_t cudaStreamCreate(cudaStream_t* stream) {
    *stream = nullptr;  // the default stream: every call is synchronous anyway
    return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaDeviceSynchronize(); }

cudaError_t cudaEventCreate(cudaEvent_t* event) {
    *event = nullptr;
    return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) { return cudaEventCreate(event); }

cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }

cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }

cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) {
    *ms = 0.0f;  // no timing in the emulator
    return cudaSuccess;
}
