// Shape/attribute validation for jax_moe_route, shared by the CPU and CUDA handlers
// (the Python wrapper validates first; this is the second line of defence).
#pragma once

#include "common/ffi_helpers.h"
#include "common/params.h"

namespace jax_moe {

struct RouteShapes {
  int64_t T = 0, H = 0, E = 0;
  bool fused = false;
};

inline ffi::Error ValidateRoute(const ffi::AnyBuffer& x, const ffi::AnyBuffer& router,
                                const ffi::AnyBuffer& bias, const ffi::AnyBuffer& scale,
                                const ffi::AnyBuffer& weights, const ffi::AnyBuffer& ids,
                                const RouteParams& p, RouteShapes* s) {
  JM_REQUIRE(Rank(x) == 2, "route: x must be rank 2 [T, E] or [T, H]");
  JM_REQUIRE(IsFloatDtype(x.element_type()), "route: x must be float32, bfloat16 or float16");
  s->T = Dim(x, 0);
  s->fused = NumElements(router) > 0;
  if (s->fused) {
    JM_REQUIRE(Rank(router) == 2, "route: router_weight must be rank 2 [E, H]");
    JM_REQUIRE(router.element_type() == x.element_type(),
               "route: router_weight must have x's dtype");
    JM_REQUIRE(Dim(router, 1) == Dim(x, 1), "route: router_weight [E, H] must match x [T, H]");
    s->E = Dim(router, 0);
    s->H = Dim(x, 1);
  } else {
    s->E = Dim(x, 1);
    s->H = 0;
  }
  const int64_t E = s->E;
  JM_REQUIRE(E >= 1, "route: need at least one expert");
  JM_REQUIRE(p.top_k >= 1 && p.top_k <= E, "route: top_k must be in [1, E]");
  JM_REQUIRE(p.scoring == kSoftmax || p.scoring == kSigmoid, "route: unknown scoring code");
  JM_REQUIRE(p.group_score == kTop2Sum || p.group_score == kGroupMax,
             "route: unknown group_score code");
  JM_REQUIRE(p.num_groups >= 1 && E % p.num_groups == 0,
             "route: num_groups must divide the number of experts");
  JM_REQUIRE(p.top_groups >= 1 && p.top_groups <= p.num_groups,
             "route: top_groups must be in [1, num_groups]");
  JM_REQUIRE(p.top_k <= p.top_groups * (E / p.num_groups),
             "route: top_k exceeds the experts available in top_groups groups");
  JM_REQUIRE(NumElements(bias) == 0 || (NumElements(bias) == E &&
                                         bias.element_type() == ffi::DataType::F32),
             "route: correction_bias must be float32 [E]");
  JM_REQUIRE(NumElements(scale) == 0 || (NumElements(scale) == E &&
                                          scale.element_type() == ffi::DataType::F32),
             "route: expert_scale must be float32 [E]");
  JM_REQUIRE(weights.element_type() == ffi::DataType::F32 && Rank(weights) == 2 &&
                 Dim(weights, 0) == s->T && Dim(weights, 1) == p.top_k,
             "route: weights output must be float32 [T, top_k]");
  JM_REQUIRE(ids.element_type() == ffi::DataType::S32 && Rank(ids) == 2 &&
                 Dim(ids, 0) == s->T && Dim(ids, 1) == p.top_k,
             "route: ids output must be int32 [T, top_k]");
  return ffi::Error::Success();
}

inline RouteParams MakeRouteParams(int64_t top_k, int64_t scoring, int64_t renormalize,
                                   int64_t num_groups, int64_t top_groups,
                                   int64_t group_score, float scaling_factor) {
  RouteParams p;
  p.top_k = static_cast<int>(top_k);
  p.scoring = static_cast<int>(scoring);
  p.renormalize = renormalize != 0;
  p.num_groups = static_cast<int>(num_groups);
  p.top_groups = static_cast<int>(top_groups);
  p.group_score = static_cast<int>(group_score);
  p.scaling_factor = scaling_factor;
  return p;
}

}  // namespace jax_moe
