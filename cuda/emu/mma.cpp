// The host emulator's twin of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (cuda/mma.cuh,
// feature `cuda-emu`): D = A · B + C with A 16 x 16 and B 16 x 8 in bf16, C and D 16 x 8 in f32.
// The scheduler (emu.cpp) calls it once every lane of a warp has deposited its fragments; it
// rebuilds A and B from the 32 lanes' registers, then computes each lane's 4 outputs.
//
// The fragment layouts are the PTX ISA's, section 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16
// with floating point type", written out independently of the kernels that fill the fragments
// (cuda/gemm.cu), so that the emulator tests the kernels' layout code.
#include "emu.h"

#include <algorithm>

namespace rq_emu {
namespace {

// Element `half` (0: low 16 bits, the lower-numbered element) of a register of two bf16.
float bf16_of(uint32_t reg, unsigned half) { return __uint_as_float((reg >> (16 * half)) << 16); }

}  // namespace

void mma_m16n8k16_bf16(MmaFragments* const lanes[32]) {
    // NaN where no lane deposits an element: a layout with a hole shows in the results.
    float a[16][16], b[16][8];
    std::fill(&a[0][0], &a[0][0] + 16 * 16, NAN);
    std::fill(&b[0][0], &b[0][0] + 16 * 8, NAN);
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned group = lane >> 2, tig = lane % 4;  // groupID, threadID_in_group
        const MmaFragments& f = *lanes[lane];
        // Multiplicand A (.row), a0..a7: row groupID for a0, a1, a4, a5, groupID + 8 otherwise;
        // col threadID_in_group * 2 + (i & 1), + 8 for a4..a7.
        for (unsigned i = 0; i < 8; ++i) {
            a[group + 8 * ((i >> 1) & 1)][tig * 2 + (i & 1) + 8 * (i >> 2)] = bf16_of(f.a[i / 2], i & 1);
        }
        // Multiplicand B (.col), b0..b3: row (k) threadID_in_group * 2 + (i & 1), + 8 for b2, b3;
        // col groupID.
        for (unsigned i = 0; i < 4; ++i) {
            b[tig * 2 + (i & 1) + 8 * (i >> 1)][group] = bf16_of(f.b[i / 2], i & 1);
        }
    }
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned group = lane >> 2, tig = lane % 4;
        MmaFragments& f = *lanes[lane];
        // Accumulators C / D, c0..c3: row groupID for c0, c1, groupID + 8 for c2, c3; col
        // threadID_in_group * 2 + (i & 1). bf16 products are exact in f32: one fmaf chain over
        // k in order, from c.
        for (unsigned i = 0; i < 4; ++i) {
            const unsigned row = group + 8 * (i >> 1), col = tig * 2 + (i & 1);
            float acc = f.c[i];
            for (unsigned k = 0; k < 16; ++k) acc = std::fma(a[row][k], b[k][col], acc);
            f.d[i] = acc;
        }
    }
}

}  // namespace rq_emu
