// jax_moe_expert_gemv on the CUDA platform: decode -> validate -> dispatch dtype -> launch.
#include "common/cuda_ffi.h"
#include "common/cuda_utils.cuh"
#include "ffi/expert_gemv_validate.h"
#include "kernels/expert_gemv.cuh"

namespace jax_moe {

static ffi::Error ExpertGemvCudaHandler(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer ids,
                                        ffi::AnyBuffer wgu, ffi::AnyBuffer wd,
                                        ffi::AnyBuffer sgu, ffi::AnyBuffer sd,
                                        ffi::AnyBuffer weights,
                                        ffi::Result<ffi::AnyBuffer> y,
                                        ffi::Result<ffi::AnyBuffer> h,
                                        ffi::Result<ffi::AnyBuffer> out, int64_t activation,
                                        int64_t token_tiles, int64_t k_split_gate_up,
                                        int64_t k_split_down, int64_t kernel_variant,
                                        int64_t combine) {
  GemvShapes s;
  JM_RETURN_IF_ERROR(ValidateExpertGemv(x, ids, wgu, wd, sgu, sd, *y, activation, &s));
  JM_RETURN_IF_ERROR(ValidateGemvCombine(s, x, weights, *out, combine));
  JM_REQUIRE(h->element_type() == x.element_type() &&
                 NumElements(*h) == s.T * (s.k + s.S) * GemvScratchCols(s.H, s.I, kernel_variant),
             "expert_gemv (CUDA): scratch h must be [T * (k + S), GemvScratchCols] in x's dtype");
  JM_REQUIRE(token_tiles == 1 || token_tiles == 2 || token_tiles == 4,
             "expert_gemv (CUDA): token_tiles must be 1, 2 or 4");
  auto ks_ok = [](int64_t v) { return v == 1 || v == 2 || v == 4 || v == 8; };
  JM_REQUIRE(ks_ok(k_split_gate_up) && ks_ok(k_split_down),
             "expert_gemv (CUDA): k_split values must be 1, 2, 4 or 8");
  JM_REQUIRE(kernel_variant == 0 || kernel_variant == 1 || kernel_variant == 3 ||
                 kernel_variant == 4 || kernel_variant == 5 || kernel_variant == 6 ||
                 kernel_variant == 7 || kernel_variant == 8,
             "expert_gemv (CUDA): kernel_variant must be 0, 1, 3, 4, 5, 6, 7 or 8 "
             "(kernels/expert_gemv.cuh)");
  cuda::ExpertGemvArgs a;
  a.x = x.untyped_data();
  a.ids = reinterpret_cast<const int32_t*>(ids.untyped_data());
  a.w_gate_up = wgu.untyped_data();
  a.w_down = wd.untyped_data();
  a.shared_gate_up = sgu.untyped_data();
  a.shared_down = sd.untyped_data();
  a.S = s.S;
  a.h = h->untyped_data();
  a.y = y->untyped_data();
  a.T = s.T;
  a.k = s.k;
  a.H = s.H;
  a.I = s.I;
  a.E = s.E;
  a.activation = static_cast<int>(activation);
  a.token_tiles = static_cast<int>(token_tiles);
  a.k_split_gate_up = static_cast<int>(k_split_gate_up);
  a.k_split_down = static_cast<int>(k_split_down);
  a.variant = static_cast<int>(kernel_variant);
  if (combine) {
    a.combine_w = reinterpret_cast<const float*>(weights.untyped_data());
    a.combine_out = out->untyped_data();
    a.combine_in_kernel = combine == 2;
  }
  return JM_DISPATCH_FLOAT(x.element_type(), float, bf16, f16, [&] {
    return CudaStatus(cuda::LaunchExpertGemv<scalar_t>(a, stream), "expert_gemv kernel launch");
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    ExpertGemvCuda, ExpertGemvCudaHandler,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::AnyBuffer>()   // x [T, H]
        .Arg<ffi::AnyBuffer>()   // ids s32 [T, k]
        .Arg<ffi::AnyBuffer>()   // w_gate_up [E, 2I, H]
        .Arg<ffi::AnyBuffer>()   // w_down [E, H, I]
        .Arg<ffi::AnyBuffer>()   // shared_gate_up [S, 2I, H] (S may be 0)
        .Arg<ffi::AnyBuffer>()   // shared_down [S, H, I]
        .Arg<ffi::AnyBuffer>()   // weights f32 [T, k + S] (combine 1, 2), else [0, k + S]
        .Ret<ffi::AnyBuffer>()   // y [T, k + S, H]
        .Ret<ffi::AnyBuffer>()   // h [T * (k + S), I] activated intermediate (scratch)
        .Ret<ffi::AnyBuffer>()   // out [T, H] weighted sum of y (combine 1, 2), else [0, H]
        .Attr<int64_t>("activation")
        .Attr<int64_t>("token_tiles")
        .Attr<int64_t>("k_split_gate_up")
        .Attr<int64_t>("k_split_down")
        .Attr<int64_t>("kernel_variant")
        .Attr<int64_t>("combine"),
    {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_moe
