// Shape/attribute validation for jax_moe_expert_gemv, shared by the CPU and CUDA
// handlers (the Python wrapper validates first).
#pragma once

#include "common/ffi_helpers.h"
#include "common/params.h"

namespace jax_moe {

struct GemvShapes {
  int64_t T = 0, k = 0, H = 0, I = 0, E = 0;
  int64_t S = 0;  // shared experts (slots k .. k + S - 1 of every token)
};

inline ffi::Error ValidateExpertGemv(const ffi::AnyBuffer& x, const ffi::AnyBuffer& ids,
                                     const ffi::AnyBuffer& wgu, const ffi::AnyBuffer& wd,
                                     const ffi::AnyBuffer& sgu, const ffi::AnyBuffer& sd,
                                     const ffi::AnyBuffer& y, int64_t activation,
                                     GemvShapes* s) {
  JM_REQUIRE(Rank(x) == 2, "expert_gemv: x must be rank 2 [T, H]");
  JM_REQUIRE(IsFloatDtype(x.element_type()), "expert_gemv: x must be float32, bfloat16 or float16");
  JM_REQUIRE(Rank(ids) == 2 && ids.element_type() == ffi::DataType::S32,
             "expert_gemv: ids must be int32 [T, k]");
  JM_REQUIRE(Rank(wgu) == 3 && Rank(wd) == 3,
             "expert_gemv: w_gate_up must be [E, 2I, H] and w_down [E, H, I]");
  JM_REQUIRE(wgu.element_type() == x.element_type() && wd.element_type() == x.element_type(),
             "expert_gemv: weights must have x's dtype");
  s->T = Dim(x, 0);
  s->H = Dim(x, 1);
  s->k = Dim(ids, 1);
  s->E = Dim(wgu, 0);
  JM_REQUIRE(Dim(ids, 0) == s->T, "expert_gemv: ids [T, k] must match x [T, H]");
  JM_REQUIRE(Dim(wgu, 1) % 2 == 0, "expert_gemv: w_gate_up dim 1 must be 2I (even)");
  s->I = Dim(wgu, 1) / 2;
  JM_REQUIRE(Dim(wgu, 2) == s->H, "expert_gemv: w_gate_up [E, 2I, H] must match x's H");
  JM_REQUIRE(Dim(wd, 0) == s->E && Dim(wd, 1) == s->H && Dim(wd, 2) == s->I,
             "expert_gemv: w_down must be [E, H, I] matching w_gate_up [E, 2I, H]");
  JM_REQUIRE(Rank(sgu) == 3 && Rank(sd) == 3 && sgu.element_type() == x.element_type() &&
                 sd.element_type() == x.element_type(),
             "expert_gemv: shared_gate_up [S, 2I, H] and shared_down [S, H, I] must be rank 3 "
             "in x's dtype");
  s->S = Dim(sgu, 0);
  JM_REQUIRE(Dim(sgu, 1) == 2 * s->I && Dim(sgu, 2) == s->H && Dim(sd, 0) == s->S &&
                 Dim(sd, 1) == s->H && Dim(sd, 2) == s->I,
             "expert_gemv: shared_gate_up must be [S, 2I, H] and shared_down [S, H, I] with "
             "the routed experts' H and I");
  JM_REQUIRE(s->E + s->S <= 65535, "expert_gemv: at most 65535 experts (routed + shared)");
  JM_REQUIRE(activation == kSilu || activation == kGeluTanh || activation == kGelu,
             "expert_gemv: unknown activation code");
  JM_REQUIRE(y.element_type() == x.element_type() && Rank(y) == 3 && Dim(y, 0) == s->T &&
                 Dim(y, 1) == s->k + s->S && Dim(y, 2) == s->H,
             "expert_gemv: output must be [T, k + S, H] in x's dtype");
  return ffi::Error::Success();
}

// The optional combine (0: none, 1: combine's kernel after the experts, 2: inside the
// stream kernel where it takes it): weights f32 [T, k + S] and out [T, H] in x's
// dtype; with 0 they are placeholders and are not touched.
inline ffi::Error ValidateGemvCombine(const GemvShapes& s, const ffi::AnyBuffer& x,
                                      const ffi::AnyBuffer& weights, const ffi::AnyBuffer& out,
                                      int64_t combine) {
  JM_REQUIRE(combine >= 0 && combine <= 2, "expert_gemv: combine must be 0, 1 or 2");
  if (!combine) return ffi::Error::Success();
  JM_REQUIRE(weights.element_type() == ffi::DataType::F32 && Rank(weights) == 2 &&
                 Dim(weights, 0) == s.T && Dim(weights, 1) == s.k + s.S,
             "expert_gemv: combine weights must be float32 [T, k + S]");
  JM_REQUIRE(out.element_type() == x.element_type() && Rank(out) == 2 && Dim(out, 0) == s.T &&
                 Dim(out, 1) == s.H,
             "expert_gemv: combined output must be [T, H] in x's dtype");
  return ffi::Error::Success();
}

}  // namespace jax_moe
