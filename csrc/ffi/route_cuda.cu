// jax_moe_route on the CUDA platform: decode -> validate -> dispatch dtype -> launch.
#include "common/cuda_ffi.h"
#include "common/cuda_utils.cuh"
#include "ffi/route_validate.h"
#include "kernels/route.cuh"

namespace jax_moe {

static ffi::Error RouteCudaHandler(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer router,
                                   ffi::AnyBuffer bias, ffi::AnyBuffer scale,
                                   ffi::Result<ffi::AnyBuffer> weights,
                                   ffi::Result<ffi::AnyBuffer> ids,
                                   ffi::Result<ffi::AnyBuffer> scratch, int64_t top_k,
                                   int64_t scoring, int64_t renormalize, int64_t num_groups,
                                   int64_t top_groups, int64_t group_score, float scaling_factor,
                                   int64_t k_splits, int64_t block_select) {
  const RouteParams p = MakeRouteParams(top_k, scoring, renormalize, num_groups, top_groups,
                                        group_score, scaling_factor);
  RouteShapes s;
  JM_RETURN_IF_ERROR(ValidateRoute(x, router, bias, scale, *weights, *ids, p, &s));
  JM_REQUIRE(s.E <= cuda::kRouteMaxExperts, "route (CUDA): at most 1024 experts");
  JM_REQUIRE(p.top_k <= cuda::kRouteMaxTopK, "route (CUDA): top_k must be <= 32");
  JM_REQUIRE(p.num_groups <= cuda::kRouteMaxGroups, "route (CUDA): num_groups must be <= 64");
  if (s.fused) {
    JM_REQUIRE(k_splits >= 1 && k_splits <= cuda::kRouteMaxKSplits,
               "route (CUDA): k_splits must be in [1, 4096]");
    JM_REQUIRE(scratch->element_type() == ffi::DataType::F32 &&
                   NumElements(*scratch) == k_splits * s.T * s.E,
               "route (CUDA): scratch must be float32 [k_splits * T, E]");
  }
  const bool is16bit = x.element_type() == ffi::DataType::BF16 ||
                       x.element_type() == ffi::DataType::F16;
  JM_REQUIRE(!block_select || (s.fused ? cuda::RouteGemvBlockSupported(s.E, s.H, k_splits, is16bit)
                                       : cuda::RouteBlockSupported(s.E)),
             "route (CUDA): block_select needs at most 256 experts, and with router_weight "
             "16-bit inputs, H a multiple of 8 and k_splits = 1");
  cuda::RouteArgs a;
  a.x = x.untyped_data();
  a.router = s.fused ? router.untyped_data() : nullptr;
  a.bias = NumElements(bias) ? reinterpret_cast<const float*>(bias.untyped_data()) : nullptr;
  a.scale = NumElements(scale) ? reinterpret_cast<const float*>(scale.untyped_data()) : nullptr;
  a.T = s.T;
  a.H = s.H;
  a.E = s.E;
  a.p = p;
  a.k_splits = static_cast<int>(k_splits);
  a.block_select = block_select != 0;
  a.weights = reinterpret_cast<float*>(weights->untyped_data());
  a.ids = reinterpret_cast<int32_t*>(ids->untyped_data());
  a.partial = s.fused ? reinterpret_cast<float*>(scratch->untyped_data()) : nullptr;
  return JM_DISPATCH_FLOAT(x.element_type(), float, bf16, f16, [&] {
    return CudaStatus(cuda::LaunchRoute<scalar_t>(a, stream), "route kernel launch");
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    RouteCuda, RouteCudaHandler,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::AnyBuffer>()   // x: logits [T, E] or hidden [T, H]
        .Arg<ffi::AnyBuffer>()   // router_weight [E, H], or [0, 0] when x is logits
        .Arg<ffi::AnyBuffer>()   // correction_bias f32 [E], or [0]
        .Arg<ffi::AnyBuffer>()   // expert_scale f32 [E], or [0]
        .Ret<ffi::AnyBuffer>()   // weights f32 [T, k]
        .Ret<ffi::AnyBuffer>()   // ids s32 [T, k]
        .Ret<ffi::AnyBuffer>()   // scratch f32 [k_splits * T, E] partial logits (fused), or [0]
        .Attr<int64_t>("top_k")
        .Attr<int64_t>("scoring")
        .Attr<int64_t>("renormalize")
        .Attr<int64_t>("num_groups")
        .Attr<int64_t>("top_groups")
        .Attr<int64_t>("group_score")
        .Attr<float>("scaling_factor")
        .Attr<int64_t>("k_splits")
        .Attr<int64_t>("block_select"),  // one block per token's selection (route_block_kernel,
                                         // or route_gemv_block_kernel with the router)
    {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_moe
