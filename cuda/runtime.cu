// Runtime helpers of ffi/rq_cuda.h: device queries, memory and errors, on the CUDA runtime
// linked statically (cudart_static), which loads the driver (libcuda.so.1) at first use.
#include <cuda_runtime.h>
#include <string.h>

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

extern "C" int rq_malloc(void** host_ptr, size_t bytes) {
    *host_ptr = nullptr;
    return cudaMalloc(host_ptr, bytes);
}

extern "C" int rq_free(void* ptr) { return cudaFree(ptr); }

extern "C" int rq_memcpy_htod(void* dst, const void* host_src, size_t bytes) {
    return cudaMemcpy(dst, host_src, bytes, cudaMemcpyHostToDevice);
}

extern "C" int rq_memcpy_dtoh(void* host_dst, const void* src, size_t bytes) {
    return cudaMemcpy(host_dst, src, bytes, cudaMemcpyDeviceToHost);
}

extern "C" int rq_memcpy_dtod(void* dst, const void* src, size_t bytes) {
    return cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice);
}

extern "C" int rq_synchronize(void) { return cudaDeviceSynchronize(); }
