// The warp-level tensor-core MMA of cuda/*.cu, one spelling for both builds:
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, D = A · B + C with A 16 x 16 (row-major)
// and B 16 x 8 (column-major) in bf16, C and D 16 x 8 in f32 (sm_80 and newer).
//  - nvcc (feature `cuda`): the PTX instruction, inline.
//  - g++ with the host emulator (feature `cuda-emu`): a warp collective whose arithmetic is
//    cuda/emu/mma.cpp (every lane of the warp must call it, as on the GPU).
// Each lane holds fragments of the matrices as the PTX ISA lays them out (section 9.7.14.5.8
// "Matrix Fragments for mma.m16n8k16 with floating point type"); with groupID = lane >> 2 and
// threadID_in_group = lane % 4:
//  - a[4]: a0..a7, two bf16 per register (pack_bf16x2), a_i at row groupID + 8 ((i >> 1) & 1),
//    col threadID_in_group * 2 + (i & 1) + 8 (i >> 2);
//  - b[2]: b0..b3, b_i at row (k) threadID_in_group * 2 + (i & 1) + 8 (i >> 1), col groupID;
//  - c[4], d[4]: c_i at row groupID + 8 (i >> 1), col threadID_in_group * 2 + (i & 1).
#ifndef RQ_MMA_CUH
#define RQ_MMA_CUH

#include <cuda_bf16.h>
#include <stdint.h>

// Two floats rounded to bf16 (nearest even; NaN stays NaN) in one operand register: `lo` (the
// lower-numbered element) in bits 0-15, `hi` in bits 16-31.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16;
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
#if defined(__CUDACC__)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#elif defined(RQ_CUDA_EMU)
    rq_emu::MmaFragments f{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}, {}};
    rq_emu::warp_mma_m16n8k16_bf16(f);
    for (int i = 0; i < 4; ++i) d[i] = f.d[i];
#else
#error "cuda/mma.cuh is compiled by nvcc, or by g++ with -include cuda/emu/emu.h (feature cuda-emu)"
#endif
}

#endif  // RQ_MMA_CUH
