// Tensor-core helpers shared by the kernels: one m16n8k16 mma.sync step with f32
// accumulators, and the 32-column "chunk" built from 16-byte vector loads.
//
// Chunk layout (used by route and expert_gemv): lane (g = lane / 4, c = lane % 4)
// loads 8 consecutive columns 8c..8c+7 of A rows g and g+8 ("lo" and "hi") and of
// B row (token) g. Those 16 bytes serve as the lane's fragments of two k16 steps:
// step 0 takes words 0 and 1, step 1 words 2 and 3. This is a fixed permutation of
// k applied to A and B alike, so the dot products are unchanged and no shuffles or
// shared-memory staging are needed. C fragment: (row g, tokens 2c, 2c+1) in c[0..1],
// (row g + 8, tokens 2c, 2c+1) in c[2..3].
#pragma once

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace jax_moe {
namespace cuda {

template <typename T> struct MmaType;
template <> struct MmaType<bf16> { static constexpr bool kBf16 = true; };
template <> struct MmaType<f16> { static constexpr bool kBf16 = false; };

// c += A (16x16, row) * B (16x8, col), 16-bit inputs, f32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], uint32_t a0, uint32_t a1,
                                             uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (MmaType<T>::kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// One 32-column chunk (see the layout above): two m16n8k16 steps.
template <typename T>
__device__ __forceinline__ void mma_chunk(float (&c)[4], const uint4& lo, const uint4& hi,
                                          const uint4& b) {
  mma_m16n8k16<T>(c, lo.x, hi.x, lo.y, hi.y, b.x, b.y);
  mma_m16n8k16<T>(c, lo.z, hi.z, lo.w, hi.w, b.z, b.w);
}

}  // namespace cuda
}  // namespace jax_moe
