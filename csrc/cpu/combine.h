// CPU weighted combine, the same semantics as the CUDA kernel and
// jax_moe/reference.py:
//   out[t, :] = sum_j weights[t, j] * row(t, j), j = 0 .. k-1 in order, f32,
//   row(t, j) = y[t, j, :] (index == nullptr) or y[index[t, j], :]; an index
//   outside [0, N) is skipped, never read.
// Each product is rounded before the add, like the kernel (the default x86-64
// build has no FMA to contract into).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/cpu_types.h"

namespace jax_moe {
namespace cpu {

// Columns accumulated at once: a stack buffer, so a call allocates nothing.
constexpr int64_t kCombineColBlock = 512;

template <typename Y, typename W, typename O>
void CombineImpl(const Y* y, const W* weights, const int32_t* index, int64_t T, int64_t k,
                 int64_t H, int64_t N, O* out) {
  float acc[kCombineColBlock];
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c0 = 0; c0 < H; c0 += kCombineColBlock) {
      const int64_t n = std::min(kCombineColBlock, H - c0);
      for (int64_t c = 0; c < n; ++c) acc[c] = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = t * k + j;
        int64_t r = slot;
        if (index != nullptr) {
          const int32_t ix = index[slot];
          if (ix < 0 || ix >= N) continue;
          r = ix;
        }
        const float wj = ToFloat(weights[slot]);
        const Y* row = y + r * H + c0;
        for (int64_t c = 0; c < n; ++c) acc[c] += wj * ToFloat(row[c]);
      }
      O* o = out + t * H + c0;
      for (int64_t c = 0; c < n; ++c) o[c] = FromFloat<O>(acc[c]);
    }
  }
}

}  // namespace cpu
}  // namespace jax_moe
