// e^x for a softmax's x = s - max <= 0, shared by cuda/forward.cu (attention) and
// cuda/backward.cu (attention softmax, cross-entropy gradient): cpu::exp_nonpositive operation
// for operation (each op rounded, no contraction), so the device gives the CPU's bits; NaN
// stays NaN (attention.rs exp_softmax).
#ifndef RQ_EXP_CUH
#define RQ_EXP_CUH

__device__ __forceinline__ float exp_softmax(float x) {
    if (x != x) return x;
    x = fmaxf(x, -87.0f);
    const float n = roundf(__fmul_rn(x, 1.44269504088896340736f));
    // ln 2 split in two (Cody-Waite), as the CPU.
    const float r = __fadd_rn(__fadd_rn(x, -__fmul_rn(n, 0.69314575f)), -__fmul_rn(n, 1.4286068e-6f));
    float p = __fmul_rn(r, 1.0f / 720.0f);
    p = __fmul_rn(r, __fadd_rn(1.0f / 120.0f, p));
    p = __fmul_rn(r, __fadd_rn(1.0f / 24.0f, p));
    p = __fmul_rn(r, __fadd_rn(1.0f / 6.0f, p));
    p = __fmul_rn(r, __fadd_rn(0.5f, p));
    p = __fmul_rn(r, __fadd_rn(1.0f, p));
    p = __fadd_rn(1.0f, p);
    return __fmul_rn(p, __int_as_float((int(n) + 127) << 23));
}

#endif  // RQ_EXP_CUH
