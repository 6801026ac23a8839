// jax_moe_combine on the CPU platform: decode -> validate -> dispatch dtypes -> run.
#include "common/cpu_types.h"
#include "common/ffi_helpers.h"
#include "cpu/combine.h"
#include "ffi/combine_validate.h"

namespace jax_moe {

static ffi::Error CombineCpuHandler(ffi::AnyBuffer y, ffi::AnyBuffer weights,
                                    ffi::AnyBuffer index, ffi::Result<ffi::AnyBuffer> out,
                                    int64_t has_index) {
  CombineShapes s;
  JM_RETURN_IF_ERROR(ValidateCombine(y, weights, index, *out, has_index, &s));
  const int32_t* ix = s.has_index ? reinterpret_cast<const int32_t*>(index.untyped_data())
                                  : nullptr;
  return JM_DISPATCH_FLOAT(y.element_type(), float, bf16_t, f16_t, [&] {
    using Y = scalar_t;
    const Y* yp = reinterpret_cast<const Y*>(y.untyped_data());
    return JM_DISPATCH_FLOAT(out->element_type(), float, bf16_t, f16_t, [&] {
      using O = scalar_t;
      O* op = reinterpret_cast<O*>(out->untyped_data());
      if (s.weights_f32) {
        cpu::CombineImpl<Y, float, O>(yp, reinterpret_cast<const float*>(weights.untyped_data()),
                                      ix, s.T, s.k, s.H, s.N, op);
      } else {
        cpu::CombineImpl<Y, Y, O>(yp, reinterpret_cast<const Y*>(weights.untyped_data()), ix,
                                  s.T, s.k, s.H, s.N, op);
      }
      return ffi::Error::Success();
    });
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    CombineCpu, CombineCpuHandler,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>()   // y [T, k, H] or [N, H]
        .Arg<ffi::AnyBuffer>()   // weights [T, k], f32 or y's dtype
        .Arg<ffi::AnyBuffer>()   // index s32 [T, k], or [0, 0] without index
        .Ret<ffi::AnyBuffer>()   // out [T, H]
        .Attr<int64_t>("has_index"));

}  // namespace jax_moe
