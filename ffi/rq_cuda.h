/* C ABI of rq-min's CUDA kernels (the .cu files of cuda/), bound to Rust by bindgen in build.rs and
 * wrapped safely in src/compute/cuda.rs.
 *
 * Every function returns an int status: 0 on success, otherwise the cudaError_t value;
 * rq_error_string(status) describes it. Launchers only enqueue work on the calling thread's
 * default stream (per-thread default streams; errors of the kernel itself surface at the next
 * rq_synchronize or copy).
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

/* Free and total memory of the current device in bytes (cudaMemGetInfo). */
int rq_mem_info(size_t* host_free, size_t* host_total);

/* Device memory from the stream-ordered pool; freed in the calling thread's stream order. */
int rq_malloc(void** host_ptr, size_t bytes);
int rq_free(void* ptr);
/* The host bytes may be reused on return. Up to 64 KiB: queued on the calling thread's stream
 * (later work of the thread sees the data; rq_synchronize waits for it); larger: returns when
 * the bytes are on the device (through pinned staging from 1 MiB). */
int rq_memcpy_htod(void* dst, const void* host_src, size_t bytes);
int rq_memcpy_dtoh(void* host_dst, const void* src, size_t bytes);
int rq_memcpy_dtod(void* dst, const void* src, size_t bytes);

/* Waits for the work the calling thread queued; returns the first error of a kernel that failed. */
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

/* INT8 per-tensor fake quant in place (quant::int::int8_fake_quant): amax < 2^-24 gives zeros;
 * else s = 127 / amax, x[i] = clamp(rint(x[i] * s), -128, 127) / s. */
int rq_fake_quant_int8_f32(float* x, size_t n, float amax);

/* ---- NVFP4 kernels (cuda/quant_nvfp4.cu) ------------------------------------------------
 * Twins of src/quant/nvfp4.rs, bit-identical to it (tests/cuda_quant.rs). */

/* NVFP4 weight export (nvfp4::quantize_weight_scaled) of w = [out, inp] floats, inp a multiple of
 * 16 (else cudaErrorInvalidValue): per block of 16, s = amax / (6 * weight_scale_2) (0 -> 1),
 * out_block_scales[block] = E4M3 of max(s, 2^-9), and the 16 E2M1 codes of w / (f32(scale) *
 * weight_scale_2) into out_packed (8 bytes, element 2j in the low nibble). out_packed holds
 * out * inp / 2 bytes, out_block_scales out * inp / 16. */
int rq_quantize_nvfp4_f32(const float* w, size_t out, size_t inp, float weight_scale_2, uint8_t* out_packed,
                          uint8_t* out_block_scales);

/* NVFP4 fake quant in place (nvfp4::fake_quant) of x = [rows, cols]: blocks of 16 per row (the
 * last one may be partial), global scale global_amax / 2688, block scales below 1e-5 become 1. */
int rq_fake_quant_nvfp4_f32(float* x, size_t rows, size_t cols, float global_amax);

/* out[r * nb + b] = max |x[r, b * block .. (b + 1) * block]| over x = [rows, cols], nb =
 * ceil(cols / block) blocks per row (the last one may be partial); NaN if any value of the
 * block is NaN. block == 0 is cudaErrorInvalidValue. */
int rq_block_amax_f32(const float* x, size_t rows, size_t cols, size_t block, float* out);

/* ---- forward kernels of a decoder layer (cuda/forward.cu) ------------------------------------
 * f32, row-major: activations [rows, cols], Linear weights [out_features, in_features]. Each is
 * the twin of a CPU kernel of src/compute/cpu/ (tests/cuda_forward.rs). In-place kernels
 * overwrite their first argument. */

/* Activation codes of rq_gated_mul_f32 / rq_activate_f32 / rq_act_grad_mul_f32
 * (compute::Activation); any other code is cudaErrorInvalidValue. */
#define RQ_ACT_SILU 0      /* x / (1 + exp(-x)) */
#define RQ_ACT_GELU_TANH 1 /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
#define RQ_ACT_RELU2 2     /* square(max(x, 0)) */
#define RQ_ACT_GELU 3      /* x * 0.5 * (1 + erf(x / sqrt(2))) */

/* RMSNorm of rows of cols values (cpu::rms_norm; offset: weight is 1 + weight, Gemma;
 * bf16: rounded as rms_norm_bf16 / rms_norm_offset_bf16). Sum of squares in double. */
int rq_rms_norm_f32(const float* x, size_t rows, size_t cols, const float* weight, float eps, int offset,
                    int bf16, float* out);

/* LayerNorm of rows of cols values (cpu::layer_norm); bias may be NULL. Mean and variance in
 * double. */
int rq_layer_norm_f32(const float* x, size_t rows, size_t cols, const float* weight, const float* bias,
                      float eps, float* out);

/* out[m, n] = x[m, k] . w[n, k]^T: tiled, one f32 FMA chain over k per output. */
int rq_matmul_bt_f32(const float* x, const float* w, size_t m, size_t k, size_t n, float* out);

/* The same product, one thread per output (the tiled kernel's reference in tests). */
int rq_matmul_bt_naive_f32(const float* x, const float* w, size_t m, size_t k, size_t n, float* out);

/* x[i] += bias[i % n] over total = rows * n values. */
int rq_add_row_bias_f32(float* x, size_t total, const float* bias, size_t n);

/* x[i] *= scale[i % n] over total = rows * n values (SmoothQuant's pre_quant_scale). */
int rq_mul_cols_f32(float* x, size_t total, const float* scale, size_t n);

/* x[i] += y[i]. */
int rq_add_f32(float* x, const float* y, size_t n);

/* x[i] = bf16(x[i]) as f32 (round to nearest even; NaN stays NaN). */
int rq_round_bf16_f32(float* x, size_t n);

/* gate[i] = act(gate[i]) * up[i] (bf16: bf16(bf16(act(gate)) * up)), act an RQ_ACT_ code. */
int rq_gated_mul_f32(float* gate, const float* up, size_t n, int act, int bf16);

/* The logits' last steps (cpu::finish_logits): x / divisor when divisor > 0 (Granite), then
 * tanh(x / cap) * cap when cap > 0 (Gemma2), each op rounded to bf16 when bf16. */
int rq_finish_logits_f32(float* x, size_t n, float divisor, float cap, int bf16);

/* x[i] = act(x[i]). */
int rq_activate_f32(float* x, size_t n, int act);

/* RoPE in place on x = [seq, heads * head_dim] (rotate_half layout, the leading rotary_dim
 * dims of each head), cos/sin tables [>= seq, rotary_dim / 2] (cpu::Rope); bf16 as
 * Rope::apply_bf16. */
int rq_rope_f32(float* x, const float* cos_table, const float* sin_table, size_t seq, size_t heads,
                size_t head_dim, size_t rotary_dim, int bf16);

/* Causal GQA attention: q, out [seq, n_heads * head_dim], k, v [seq, n_kv_heads * head_dim];
 * head_dim <= 256; sliding_window 0 = none, else a query sees itself and the sliding_window - 1
 * keys before it. flash_bf16 0: f32 online softmax (cpu::Attention, flash_bf16 false); 1:
 * FlashAttention-2's softmax on a bf16 model, probabilities rounded to bf16 in blocks of 128
 * keys (softmax_visible_flash_bf16). Scores are q·k times scale; softcap > 0 (not with flash_bf16)
 * caps them: tanh(s / softcap) * softcap; 0 = none. alibi_slopes (n_heads floats in device
 * memory, not with flash_bf16; NULL = none) then adds ALiBi's slope[h] * (j - i) to the score of
 * query i and key j in head h (cpu::alibi_slopes). */
int rq_attention_f32(const float* q, const float* k, const float* v, size_t seq, size_t n_heads,
                     size_t n_kv_heads, size_t head_dim, size_t sliding_window, float scale, float softcap,
                     const float* alibi_slopes, int flash_bf16, float* out);

/* acc[c] = max(acc[c], max_r |x[r, c]|) over x = [rows, cols]; acc holds cols amaxes (each
 * >= +0 or NaN); NaN propagates. */
int rq_channel_amax_f32(const float* x, size_t rows, size_t cols, float* acc);

/* out_nll[r] = -log softmax(logits[r, :])[targets[r]] in double (cpu::log_softmax_nll); NaN
 * for a row holding a NaN logit or a target >= vocab. */
int rq_log_softmax_nll_f32(const float* logits, size_t rows, size_t vocab, const uint32_t* targets,
                           double* out_nll);

/* ---- row movement (cuda/rows.cu) ------------------------------------------------------------ */

/* out[r, :] = x[rows[r], :] for r < n_rows (rows of cols values; every rows[r] a row of x). */
int rq_gather_rows_f32(const float* x, size_t cols, const uint32_t* rows, size_t n_rows, float* out);

/* out[rows[r], :] += src[r, :] * weights[r] for r < n_rows, the product and the sum each rounded
 * to bf16 when bf16 != 0 (torch index_add_ of weighted rows); the rows[r] must be distinct. */
int rq_index_add_weighted_f32(float* out, const float* src, size_t cols, const uint32_t* rows,
                              const float* weights, size_t n_rows, int bf16);

/* ---- tensor-core GEMM (cuda/gemm.cu) ---------------------------------------------------- */

/* out[m, n] = x[m, k] . w[n, k]^T on tensor cores (mma.sync m16n8k16, sm_80+): x and w rounded
 * to bf16 (nearest even; exact for bf16-representable values), products summed in f32 in the
 * tensor core's order: within k * 2^-23 * sum_p |x[i, p] w[j, p]| of an exact dot product. NaN
 * and Inf propagate; k == 0 gives zeros. */
int rq_matmul_bt_bf16_f32(const float* x, const float* w, size_t m, size_t k, size_t n, float* out);

/* *out = 1 when every x[i] is a bf16 value held in an f32 (its low 16 bits are zero, or it is
 * NaN), else 0: whether rq_matmul_bt_bf16_f32 is exact in its operands. */
int rq_all_bf16_f32(const float* x, size_t n, int* out);

/* ---- INT8 / INT4 weight export (cuda/quant_int.cu) ---------------------------------------
 * Twins of src/quant/int.rs, bit-identical (tests/cuda_quant.rs); q = clamp(rint(w / s)) with a
 * correctly rounded division, NaN -> 0. */

/* out_codes[o, c] = q(w[o, c], scales[o]) in -128..127 (int::int8_quantize_rows), w = [out, inp]. */
int rq_quantize_int8_rows_f32(const float* w, size_t out, size_t inp, const float* scales, int8_t* out_codes);

/* out_packed[j, c] = q[2j, c] & 0xF | (q[2j + 1, c] & 0xF) << 4, q = q(w, scales[o, c / group]) in
 * -8..7 (int::int4_quantize_with_scales), w = [out, inp], scales [out, inp / group], out_packed
 * [out / 2, inp]; out odd or inp not a multiple of group: cudaErrorInvalidValue. */
int rq_quantize_int4_f32(const float* w, size_t out, size_t inp, size_t group, const float* scales,
                         uint8_t* out_packed);

/* ---- AWQ search (cuda/awq.cu) -----------------------------------------------------------
 * Twins of src/quant/awq.rs and compute::cpu::sq_err_row, bit-identical (tests/cuda_awq.rs). */

/* out[c] = f32(sum_r |x[r, c]| / rows) of x = [rows, cols], the sum in double over r in order
 * (awq::ActMean). rows == 0 with cols > 0: cudaErrorInvalidValue. */
int rq_col_abs_mean_f32(const float* x, size_t rows, size_t cols, float* out);

/* out[r] = sum_c d * d in double, d = y[r, c] - ref[r, c] (rounded to bf16 when bf16), times
 * weight[r, c] when weight is not NULL, for y, ref, weight = [rows, cols]: 32 strided partial sums
 * per row, then a xor butterfly. */
int rq_sq_err_rows_f32(const float* y, const float* ref, const float* weight, size_t rows, size_t cols, int bf16,
                       double* out);

/* INT4 fake quant in place (quant::int::int4_fake_quant) of w = [out, inp], groups of `group`
 * along the input (the last may be partial): amax < 2^-24 gives zeros, else s = 7 / amax,
 * w = clamp(rint(w * s), -8, 7) / s. */
int rq_fake_quant_int4_f32(float* w, size_t out, size_t inp, size_t group);

/* ---- backward kernels of auto-quantize's gradient score (cuda/backward.cu) -------------------
 * Twins of src/compute/cpu/grad.rs, bit-identical to it (tests/cuda_backward.rs; on a GPU up to
 * the libm of expf, tanhf and log). f32, row-major; in-place kernels overwrite their first
 * argument. Every f64 sum is cpu::warp_sum's: one warp per row, 32 strided partial sums, then a
 * xor butterfly. */

/* out[c * rows + r] = a[r * cols + c]: the [cols, rows] transpose of a = [rows, cols]. */
int rq_transpose_f32(const float* a, size_t rows, size_t cols, float* out);

/* dst[r * dst_width + dst_c0 + j] = src[r * src_width + src_c0 + j] for r < rows, j < n; columns
 * outside a row: cudaErrorInvalidValue. */
int rq_copy_columns_f32(const float* src, size_t src_width, size_t src_c0, float* dst, size_t dst_width,
                        size_t dst_c0, size_t rows, size_t n);

/* Swaps the two halves of the leading rotary_dim values of each of the heads of head_dim values in
 * x (RoPE's x1 <-> x2); rotary_dim odd or > head_dim: cudaErrorInvalidValue. */
int rq_swap_rotary_halves_f32(float* x, size_t heads, size_t head_dim, size_t rotary_dim);

/* x[r, c] = w[r] * x[r, c] for x = [rows, cols]. */
int rq_scale_rows_f32(float* x, size_t rows, size_t cols, const float* w);

/* out[i] = (dm[i] * u[i]) * act'(x[i]), or dm[i] * act'(x[i]) when u is NULL (cpu::act_grad_mul),
 * act an RQ_ACT_ code. */
int rq_act_grad_mul_f32(const float* x, const float* dm, const float* u, size_t n, int act, float* out);

/* acc += dL/dx of the norm of x = [rows, n] given dy = dL/d(output) (cpu::norm_backward_add):
 * RMSNorm, or LayerNorm when layer_norm; the weight ([n]) is 1 + weight when offset. n == 0 with
 * rows > 0: cudaErrorInvalidValue. */
int rq_norm_backward_add_f32(float* acc, const float* x, const float* weight, const float* dy, size_t rows,
                             size_t n, int layer_norm, int offset, float eps);

/* p = [rows, n_keys] scores of the queries t = t0 + r against the keys lo .. lo + n_keys; row r
 * becomes softmax(scale * row) over the keys first ..= t it sees, first = t + 1 - window saturated
 * at 0 (window SIZE_MAX: no sliding window), and 0 elsewhere (cpu::softmax_rows, one thread per
 * row); softcap > 0 caps the scaled scores as rq_attention_f32, alibi_slope > 0 then adds
 * alibi_slope * (j - t) for key j; 0 = none of either. A row seeing keys outside the block:
 * cudaErrorInvalidValue. */
int rq_softmax_rows_f32(float* p, size_t rows, size_t n_keys, size_t t0, size_t lo, size_t window, float scale,
                        float softcap, float alibi_slope);

/* ds[i] *= 1 - tanh(scale * raw[i] / cap)^2: the soft cap's backward (cpu::softcap_grad); cap > 0. */
int rq_softcap_grad_f32(float* ds, const float* raw, size_t n, float scale, float cap);

/* ds = scale * p * (ds - c) per row of n_keys, c = f32(sum_j p_j * ds_j) (cpu::attention_ds). */
int rq_attention_ds_f32(float* ds, const float* p, size_t rows, size_t n_keys, float scale);

/* Row r of z = [rows, vocab] becomes scale * (softmax(z[r]) - onehot(targets[r])) and nll[r] =
 * logsumexp(z[r]) - z[r, targets[r]] in double (cpu::xent_grad_row); a target >= vocab makes
 * nll[r] and the row NaN. vocab == 0 with rows > 0: cudaErrorInvalidValue. */
int rq_xent_grad_rows_f32(float* z, size_t rows, size_t vocab, const uint32_t* targets, float scale, double* nll);

#ifdef __cplusplus
}
#endif

#endif /* RQ_CUDA_H */
