// jax_moe_route on the CPU platform: decode -> validate -> dispatch dtype -> run.
#include "common/cpu_types.h"
#include "common/ffi_helpers.h"
#include "cpu/route.h"
#include "ffi/route_validate.h"

namespace jax_moe {

static ffi::Error RouteCpuHandler(ffi::AnyBuffer x, ffi::AnyBuffer router, ffi::AnyBuffer bias,
                               ffi::AnyBuffer scale, ffi::Result<ffi::AnyBuffer> weights,
                               ffi::Result<ffi::AnyBuffer> ids,
                               ffi::Result<ffi::AnyBuffer> scratch, int64_t top_k,
                               int64_t scoring, int64_t renormalize, int64_t num_groups,
                               int64_t top_groups, int64_t group_score, float scaling_factor,
                               int64_t k_splits, int64_t block_select) {
  (void)scratch;  // only the CUDA fused path uses the partial-logits workspace
  (void)k_splits;
  (void)block_select;  // a CUDA kernel choice
  const RouteParams p = MakeRouteParams(top_k, scoring, renormalize, num_groups, top_groups,
                                        group_score, scaling_factor);
  RouteShapes s;
  JM_RETURN_IF_ERROR(ValidateRoute(x, router, bias, scale, *weights, *ids, p, &s));
  const float* b = NumElements(bias) ? reinterpret_cast<const float*>(bias.untyped_data()) : nullptr;
  const float* sc = NumElements(scale) ? reinterpret_cast<const float*>(scale.untyped_data()) : nullptr;
  float* w = reinterpret_cast<float*>(weights->untyped_data());
  int32_t* id = reinterpret_cast<int32_t*>(ids->untyped_data());
  return JM_DISPATCH_FLOAT(x.element_type(), float, bf16_t, f16_t, [&] {
    const scalar_t* xp = reinterpret_cast<const scalar_t*>(x.untyped_data());
    const scalar_t* rp = s.fused ? reinterpret_cast<const scalar_t*>(router.untyped_data()) : nullptr;
    cpu::RouteImpl<scalar_t>(xp, rp, s.T, s.H, s.E, b, sc, p, w, id);
    return ffi::Error::Success();
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    RouteCpu, RouteCpuHandler,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>()   // x: logits [T, E] or hidden [T, H]
        .Arg<ffi::AnyBuffer>()   // router_weight [E, H], or [0, 0] when x is logits
        .Arg<ffi::AnyBuffer>()   // correction_bias f32 [E], or [0]
        .Arg<ffi::AnyBuffer>()   // expert_scale f32 [E], or [0]
        .Ret<ffi::AnyBuffer>()   // weights f32 [T, k]
        .Ret<ffi::AnyBuffer>()   // ids s32 [T, k]
        .Ret<ffi::AnyBuffer>()   // scratch f32 [k_splits * T, E] (CUDA fused path), or [0]
        .Attr<int64_t>("top_k")
        .Attr<int64_t>("scoring")
        .Attr<int64_t>("renormalize")
        .Attr<int64_t>("num_groups")
        .Attr<int64_t>("top_groups")
        .Attr<int64_t>("group_score")
        .Attr<float>("scaling_factor")
        .Attr<int64_t>("k_splits")
        .Attr<int64_t>("block_select"));  // CUDA only: the one-block-per-token selection kernels

}  // namespace jax_moe
