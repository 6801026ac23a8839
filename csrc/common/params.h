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

// expert_gemv kernel_variant 7 ("split", kernels/expert_gemv_split.cuh): intermediate
// columns per block. Its f32 partials live in the h scratch, so h's row length
// depends on the variant (GemvScratchCols; jax_moe/expert_gemv.py's shape rule
// computes the same).
constexpr int kGemvSplitVariant = 7;
constexpr int64_t kSplitChunk = 32;

// Elements of x's dtype per assignment in expert_gemv's h scratch: I, or for the
// split variant enough for its partials (I / C rows of H floats: 2 H (I / C) 16-bit
// elements) and never less than I (where the split cannot run, 7 falls back to a
// variant that keeps h [T * (k + S), I] in the same buffer).
inline int64_t GemvScratchCols(int64_t H, int64_t I, int64_t variant) {
  if (variant != kGemvSplitVariant) return I;
  const int64_t split = 2 * H * (I / kSplitChunk);
  return split > I ? split : I;
}

struct RouteParams {
  int top_k = 1;
  int scoring = kSoftmax;
  bool renormalize = true;
  int num_groups = 1;
  int top_groups = 1;
  int group_score = kTop2Sum;
  float scaling_factor = 1.0f;
};

#if defined(__CUDACC__)
#define JM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define JM_HOST_DEVICE inline
#endif

// expert_gemv's assignments. Token t has k routed slots (expert ids[t, j]) and then
// num_shared shared slots: assignment a = t * (k + num_shared) + j, and y's row a is
// y[t, j]. Shared slot s is expert num_experts + s, whose weights are row s of the
// shared weight arrays: the shared experts of a DeepSeek-style layer run in the same
// launch as the routed ones (one weight stream, one tail) instead of a second call.
struct GemvAssign {
  const int32_t* ids = nullptr;  // [T, k]
  int k = 1;
  int num_shared = 0;
  int num_experts = 0;           // routed experts E; valid expert ids [0, E + num_shared)
  JM_HOST_DEVICE int slots() const { return k + num_shared; }
  JM_HOST_DEVICE int total_experts() const { return num_experts + num_shared; }
  // Expert of assignment a, or -1 for a routed id outside [0, E) (dropped: it must
  // not reach the shared experts' ids E ..).
  JM_HOST_DEVICE int expert(int64_t a) const {
    if (num_shared == 0) {  // ids [T, k] is the assignment list itself: no division
      const int e = ids[a];
      return e >= 0 && e < num_experts ? e : -1;
    }
    const int64_t t = a / slots();
    const int j = static_cast<int>(a - t * slots());
    if (j >= k) return num_experts + (j - k);
    const int e = ids[t * k + j];
    return e >= 0 && e < num_experts ? e : -1;
  }
};

}  // namespace jax_moe
