// The gated MLP activations of expert_gemv's CUDA kernels (codes in params.h).
#pragma once

#include "common/params.h"

namespace jax_moe {
namespace cuda {

__device__ __forceinline__ float activate(int act, float g) {
  if (act == kGeluTanh) {
    const float c = 0.7978845608028654f;
    return 0.5f * g * (1.0f + tanhf(c * (g + 0.044715f * g * g * g)));
  }
  if (act == kGelu) return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
  return g / (1.0f + expf(-g));
}

}  // namespace cuda
}  // namespace jax_moe
