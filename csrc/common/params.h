// Plain parameter structs and enum codes shared by the CPU code, the CUDA kernels
// and the FFI handlers. Enum values must match jax_moe/_codes.py, which is what
// the Python side passes as FFI attributes.
#pragma once

#include <cstdint>

namespace jax_moe {

enum Scoring : int { kSoftmax = 0, kSigmoid = 1 };
enum GroupScore : int { kTop2Sum = 0, kGroupMax = 1 };
enum Activation : int { kSilu = 0, kGeluTanh = 1, kGelu = 2 };

// Added to the sum of the chosen weights before renormalizing (as DeepSeek-V3 does),
// so an all-zero selection gives zeros instead of NaN.
constexpr float kRenormEps = 1e-20f;

struct RouteParams {
  int top_k = 1;
  int scoring = kSoftmax;
  bool renormalize = true;
  int num_groups = 1;
  int top_groups = 1;
  int group_score = kTop2Sum;
  float scaling_factor = 1.0f;
};

}  // namespace jax_moe
