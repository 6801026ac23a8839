// Shape/dtype validation for jax_moe_combine, shared by the CPU and CUDA handlers
// (the Python wrapper validates first; this is the second line of defence).
#pragma once

#include "common/ffi_helpers.h"

namespace jax_moe {

struct CombineShapes {
  int64_t T = 0, k = 0, H = 0;
  int64_t N = 0;            // rows of y when has_index
  bool has_index = false;
  bool weights_f32 = true;  // else weights have y's dtype
};

inline ffi::Error ValidateCombine(const ffi::AnyBuffer& y, const ffi::AnyBuffer& weights,
                                  const ffi::AnyBuffer& index, const ffi::AnyBuffer& out,
                                  int64_t has_index, CombineShapes* s) {
  JM_REQUIRE(has_index == 0 || has_index == 1, "combine: has_index must be 0 or 1");
  s->has_index = has_index == 1;
  JM_REQUIRE(IsFloatDtype(y.element_type()), "combine: y must be float32, bfloat16 or float16");
  JM_REQUIRE(Rank(weights) == 2, "combine: weights must be rank 2 [T, k]");
  JM_REQUIRE(weights.element_type() == ffi::DataType::F32 ||
                 weights.element_type() == y.element_type(),
             "combine: weights must be float32 or y's dtype");
  s->weights_f32 = weights.element_type() == ffi::DataType::F32;
  s->T = Dim(weights, 0);
  s->k = Dim(weights, 1);
  if (s->has_index) {
    JM_REQUIRE(Rank(y) == 2, "combine: y must be rank 2 [N, H] when index is given");
    s->N = Dim(y, 0);
    s->H = Dim(y, 1);
    JM_REQUIRE(index.element_type() == ffi::DataType::S32, "combine: index must be int32");
    JM_REQUIRE(Rank(index) == 2 && Dim(index, 0) == s->T && Dim(index, 1) == s->k,
               "combine: index must have weights' shape [T, k]");
  } else {
    JM_REQUIRE(Rank(y) == 3, "combine: y must be rank 3 [T, k, H] without index");
    JM_REQUIRE(Dim(y, 0) == s->T && Dim(y, 1) == s->k,
               "combine: y [T, k, H] must match weights [T, k]");
    s->H = Dim(y, 2);
    JM_REQUIRE(NumElements(index) == 0, "combine: index must be empty when has_index is 0");
  }
  JM_REQUIRE(IsFloatDtype(out.element_type()),
             "combine: out must be float32, bfloat16 or float16");
  JM_REQUIRE(Rank(out) == 2 && Dim(out, 0) == s->T && Dim(out, 1) == s->H,
             "combine: out must be [T, H]");
  return ffi::Error::Success();
}

}  // namespace jax_moe
