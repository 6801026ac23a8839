// jax_moe_combine on the CUDA platform: decode -> validate -> dispatch dtypes -> launch.
#include "common/cuda_ffi.h"
#include "common/cuda_utils.cuh"
#include "ffi/combine_validate.h"
#include "kernels/combine.cuh"

namespace jax_moe {

static ffi::Error CombineCudaHandler(cudaStream_t stream, ffi::AnyBuffer y,
                                     ffi::AnyBuffer weights, ffi::AnyBuffer index,
                                     ffi::Result<ffi::AnyBuffer> out, int64_t has_index) {
  CombineShapes s;
  JM_RETURN_IF_ERROR(ValidateCombine(y, weights, index, *out, has_index, &s));
  cuda::CombineArgs a;
  a.y = y.untyped_data();
  a.weights = weights.untyped_data();
  a.index = s.has_index ? reinterpret_cast<const int32_t*>(index.untyped_data()) : nullptr;
  a.out = out->untyped_data();
  a.T = s.T;
  a.k = s.k;
  a.H = s.H;
  a.N = s.N;
  return JM_DISPATCH_FLOAT(y.element_type(), float, bf16, f16, [&] {
    using Y = scalar_t;
    return JM_DISPATCH_FLOAT(out->element_type(), float, bf16, f16, [&] {
      using O = scalar_t;
      const cudaError_t err = s.weights_f32 ? cuda::LaunchCombine<Y, float, O>(a, stream)
                                            : cuda::LaunchCombine<Y, Y, O>(a, stream);
      return CudaStatus(err, "combine kernel launch");
    });
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    CombineCuda, CombineCudaHandler,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::AnyBuffer>()   // y [T, k, H] or [N, H]
        .Arg<ffi::AnyBuffer>()   // weights [T, k], f32 or y's dtype
        .Arg<ffi::AnyBuffer>()   // index s32 [T, k], or [0, 0] without index
        .Ret<ffi::AnyBuffer>()   // out [T, H]
        .Attr<int64_t>("has_index"),
    {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_moe
