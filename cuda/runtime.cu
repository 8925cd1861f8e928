// Runtime helpers of ffi/rq_cuda.h: device queries, memory and errors, on the CUDA runtime
// linked statically (cudart_static), which loads the driver (libcuda.so.1) at first use.
//
// Streams: every .cu file is compiled with `--default-stream per-thread` (build.rs), so each host
// thread queues its kernels and copies on a stream of its own: the layer reader thread
// (model/mod.rs `each_layer`) uploads the next layer on its stream while the compute thread's
// kernels run on another, and rq_synchronize waits for the calling thread's stream only.
// Memory comes from the stream-ordered pool (cudaMallocAsync / cudaFreeAsync), so freeing a
// temporary does not wait for the whole device as cudaFree does.
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <mutex>
#include <vector>

#include "../ffi/rq_cuda.h"

extern "C" const char* rq_error_string(int status) {
    return cudaGetErrorString(static_cast<cudaError_t>(status));
}

extern "C" int rq_device_count(int* host_count) {
    *host_count = 0;
    return cudaGetDeviceCount(host_count);
}

extern "C" int rq_device_props(int device, char* host_name, size_t host_len, int* host_major,
                               int* host_minor) {
    cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, device);
    if (e != cudaSuccess) return e;
    if (host_len > 0) {
        strncpy(host_name, prop.name, host_len - 1);
        host_name[host_len - 1] = '\0';
    }
    *host_major = prop.major;
    *host_minor = prop.minor;
    return cudaSuccess;
}

extern "C" int rq_mem_info(size_t* host_free, size_t* host_total) {
    *host_free = 0;
    *host_total = 0;
    return cudaMemGetInfo(host_free, host_total);
}

namespace {

// The pool keeps freed memory for reuse instead of returning it to the driver at each
// synchronization (its default release threshold is 0). Set once per process.
cudaError_t keep_pool_memory() {
    static cudaError_t status = [] {
        int device = 0;
        cudaError_t e = cudaGetDevice(&device);
        cudaMemPool_t pool;
        if (e == cudaSuccess) e = cudaDeviceGetDefaultMemPool(&pool, device);
        uint64_t keep = UINT64_MAX;
        if (e == cudaSuccess) e = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
        return e;
    }();
    return status;
}

// Pinned staging for uploads: two chunks per set, so the host copies one chunk while the DMA
// engine reads the other. Sets are reused across threads (a reader thread lives for one layer).
constexpr size_t kStagingChunk = size_t(8) << 20;
constexpr size_t kStagingMin = size_t(1) << 20;  // smaller uploads go straight from pageable memory

struct Staging {
    void* chunk[2] = {nullptr, nullptr};
    cudaEvent_t copied[2] = {nullptr, nullptr};  // the DMA out of chunk[i] has finished
};

std::mutex staging_lock;
std::vector<Staging*> staging_free;

// A staging set, or nullptr when pinned memory cannot be had (the upload then goes pageable).
Staging* take_staging() {
    {
        std::lock_guard<std::mutex> guard(staging_lock);
        if (!staging_free.empty()) {
            Staging* s = staging_free.back();
            staging_free.pop_back();
            return s;
        }
    }
    Staging* s = new Staging;
    for (int i = 0; i < 2; ++i) {
        if (cudaMallocHost(&s->chunk[i], kStagingChunk) != cudaSuccess ||
            cudaEventCreateWithFlags(&s->copied[i], cudaEventDisableTiming) != cudaSuccess) {
            for (int j = 0; j <= i; ++j) {
                if (s->chunk[j]) cudaFreeHost(s->chunk[j]);
                if (s->copied[j]) cudaEventDestroy(s->copied[j]);
            }
            delete s;
            cudaGetLastError();  // the failure is handled: clear it
            return nullptr;
        }
    }
    return s;
}

void give_staging(Staging* s) {
    std::lock_guard<std::mutex> guard(staging_lock);
    staging_free.push_back(s);
}

// Small uploads (scales, row indices, targets) are queued without waiting: a pageable
// cudaMemcpy would first wait for every kernel the thread queued. The bytes go into the next
// slot of a pinned ring and are copied from there in stream order; a slot is reused once the
// copy out of it has completed (its event). Rings are kept for reuse when a thread ends.
constexpr int kRingSlots = 64;
constexpr size_t kRingSlot = size_t(64) << 10;

struct Ring {
    char* slots = nullptr;
    cudaEvent_t copied[kRingSlots] = {};
    int next = 0;
};

std::mutex ring_lock;
std::vector<Ring*> ring_free;

// The calling thread's ring (nullptr when pinned memory cannot be had).
struct ThreadRing {
    Ring* ring = nullptr;
    bool tried = false;
    ~ThreadRing() {
        if (!ring) return;
        std::lock_guard<std::mutex> guard(ring_lock);
        ring_free.push_back(ring);
    }
};
thread_local ThreadRing thread_ring;

Ring* this_thread_ring() {
    if (thread_ring.tried) return thread_ring.ring;
    thread_ring.tried = true;
    {
        std::lock_guard<std::mutex> guard(ring_lock);
        if (!ring_free.empty()) {
            thread_ring.ring = ring_free.back();
            ring_free.pop_back();
            return thread_ring.ring;
        }
    }
    Ring* r = new Ring;
    bool ok = cudaMallocHost(reinterpret_cast<void**>(&r->slots), kRingSlots * kRingSlot) == cudaSuccess;
    for (int i = 0; ok && i < kRingSlots; ++i)
        ok = cudaEventCreateWithFlags(&r->copied[i], cudaEventDisableTiming) == cudaSuccess;
    if (!ok) {
        for (int i = 0; i < kRingSlots; ++i)
            if (r->copied[i]) cudaEventDestroy(r->copied[i]);
        if (r->slots) cudaFreeHost(r->slots);
        delete r;
        cudaGetLastError();  // handled: small uploads go pageable
        return nullptr;
    }
    thread_ring.ring = r;
    return r;
}

}  // namespace

extern "C" int rq_malloc(void** host_ptr, size_t bytes) {
    *host_ptr = nullptr;
    const cudaError_t e = keep_pool_memory();
    if (e != cudaSuccess) return e;
    return cudaMallocAsync(host_ptr, bytes, cudaStreamPerThread);
}

// Freed in the order of the calling thread's stream: after the kernels it queued that may
// still read the buffer.
extern "C" int rq_free(void* ptr) { return cudaFreeAsync(ptr, cudaStreamPerThread); }

// Uploads of at most 64 KiB are queued in stream order without waiting (the host bytes are
// copied into the pinned ring first, so the caller may free them at once); large ones go
// through pinned chunks (the copy into chunk i overlaps the DMA out of the other) and return
// when the data is on the device, as cudaMemcpy does.
extern "C" int rq_memcpy_htod(void* dst, const void* host_src, size_t bytes) {
    Ring* ring = bytes > 0 && bytes <= kRingSlot ? this_thread_ring() : nullptr;
    if (ring) {
        const int i = ring->next;
        ring->next = (i + 1) % kRingSlots;
        cudaError_t e = cudaEventSynchronize(ring->copied[i]);
        if (e != cudaSuccess) return e;
        char* slot = ring->slots + size_t(i) * kRingSlot;
        memcpy(slot, host_src, bytes);
        e = cudaMemcpyAsync(dst, slot, bytes, cudaMemcpyHostToDevice, cudaStreamPerThread);
        return e != cudaSuccess ? e : cudaEventRecord(ring->copied[i], cudaStreamPerThread);
    }
    Staging* s = bytes >= kStagingMin ? take_staging() : nullptr;
    if (!s) return cudaMemcpy(dst, host_src, bytes, cudaMemcpyHostToDevice);
    cudaError_t e = cudaSuccess;
    const char* src = static_cast<const char*>(host_src);
    char* out = static_cast<char*>(dst);
    for (size_t off = 0, i = 0; off < bytes && e == cudaSuccess; off += kStagingChunk, i ^= 1) {
        const size_t n = bytes - off < kStagingChunk ? bytes - off : kStagingChunk;
        e = cudaEventSynchronize(s->copied[i]);  // an event never recorded is complete
        if (e != cudaSuccess) break;
        memcpy(s->chunk[i], src + off, n);
        e = cudaMemcpyAsync(out + off, s->chunk[i], n, cudaMemcpyHostToDevice, cudaStreamPerThread);
        if (e == cudaSuccess) e = cudaEventRecord(s->copied[i], cudaStreamPerThread);
    }
    const cudaError_t done = cudaStreamSynchronize(cudaStreamPerThread);
    give_staging(s);
    return e != cudaSuccess ? e : done;
}

extern "C" int rq_memcpy_dtoh(void* host_dst, const void* src, size_t bytes) {
    return cudaMemcpy(host_dst, src, bytes, cudaMemcpyDeviceToHost);
}

extern "C" int rq_memcpy_dtod(void* dst, const void* src, size_t bytes) {
    return cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice);
}

extern "C" int rq_synchronize(void) { return cudaStreamSynchronize(cudaStreamPerThread); }
