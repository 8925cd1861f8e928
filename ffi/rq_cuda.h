/* C ABI of rq-min's CUDA kernels (the .cu files of cuda/), bound to Rust by bindgen in build.rs and
 * wrapped safely in src/cuda.rs.
 *
 * Every function returns an int status: 0 on success, otherwise the cudaError_t value;
 * rq_error_string(status) describes it. Launchers only enqueue work on the default stream
 * (errors of the kernel itself surface at the next rq_synchronize or copy).
 * Every pointer is a device pointer unless its name starts with host_.
 */
#ifndef RQ_CUDA_H
#define RQ_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- runtime helpers (cuda/runtime.cu) ---------------------------------------------- */

/* Text of a status returned by any rq_ function (static storage, never NULL). */
const char* rq_error_string(int status);

/* Number of CUDA devices; fails (cudaErrorNoDevice, cudaErrorInsufficientDriver...) when
 * there is no usable driver or GPU. */
int rq_device_count(int* host_count);

/* Name (NUL-terminated, truncated to host_len - 1 bytes) and compute capability. */
int rq_device_props(int device, char* host_name, size_t host_len, int* host_major,
                    int* host_minor);

int rq_malloc(void** host_ptr, size_t bytes);
int rq_free(void* ptr);
int rq_memcpy_htod(void* dst, const void* host_src, size_t bytes);
int rq_memcpy_dtoh(void* host_dst, const void* src, size_t bytes);

/* Waits for all queued work; returns the first error of a kernel that failed. */
int rq_synchronize(void);

/* ---- FP8 kernels (cuda/quant_fp8.cu) -------------------------------------------------- */

/* *out_amax = max |x[i]| over n floats (0 when n == 0); NaN if any x[i] is NaN. */
int rq_absmax_f32(const float* x, size_t n, float* out_amax);

/* Same on bf16 storage (bits of the upper half of an f32). */
int rq_absmax_bf16(const uint16_t* x, size_t n, float* out_amax);

/* ModelOpt's FP8 export: out_codes[i] = E4M3(RNE, satfinite) of bf16(bf16(w[i]) / bf16(scale)),
 * the division rounded to bf16 (round to nearest even). */
int rq_quantize_fp8_bf16(const uint16_t* w_bf16, size_t n, float scale, uint8_t* out_codes);

/* ModelOpt's FP8 fake quant, in place: s = 448 / amax, x[i] = float(E4M3(x[i] * s)) * (1 / s). */
int rq_fake_quant_fp8_f32(float* x, size_t n, float amax);

#ifdef __cplusplus
}
#endif

#endif /* RQ_CUDA_H */
