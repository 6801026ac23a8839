// jax_moe_expert_gemv on the CPU platform: decode -> validate -> dispatch dtype -> run.
#include "common/cpu_types.h"
#include "common/ffi_helpers.h"
#include "common/parallel.h"
#include "cpu/combine.h"
#include "cpu/expert_gemv.h"
#include "ffi/expert_gemv_validate.h"

namespace jax_moe {

static ffi::Error ExpertGemvCpuHandler(ffi::AnyBuffer x, ffi::AnyBuffer ids, ffi::AnyBuffer wgu,
                                       ffi::AnyBuffer wd, ffi::AnyBuffer sgu, ffi::AnyBuffer sd,
                                       ffi::AnyBuffer weights, ffi::Result<ffi::AnyBuffer> y,
                                       ffi::Result<ffi::AnyBuffer> h,
                                       ffi::Result<ffi::AnyBuffer> out, int64_t activation,
                                       int64_t token_tiles, int64_t k_split_gate_up,
                                       int64_t k_split_down, int64_t kernel_variant,
                                       int64_t combine, ffi::ThreadPool pool) {
  (void)h;  // the CPU version keeps the intermediate in a local buffer
  (void)token_tiles;
  (void)k_split_gate_up;
  (void)k_split_down;
  (void)kernel_variant;
  GemvShapes s;
  JM_RETURN_IF_ERROR(ValidateExpertGemv(x, ids, wgu, wd, sgu, sd, *y, activation, &s));
  JM_RETURN_IF_ERROR(ValidateGemvCombine(s, x, weights, *out, combine));
  const int32_t* idp = reinterpret_cast<const int32_t*>(ids.untyped_data());
  // The selected experts spread over XLA's intra-op threads (common/parallel.h): a
  // decode layer on the CPU is bound by reading the experts' weights, which one
  // thread does not saturate.
  const int64_t helpers = pool.num_threads();
  auto run = [&pool, helpers](int64_t n, auto&& fn) {
    ParallelFor(n, helpers, [&pool](auto task) { pool.Schedule(std::move(task)); }, fn);
  };
  return JM_DISPATCH_FLOAT(x.element_type(), float, bf16_t, f16_t, [&] {
    cpu::ExpertGemvImpl<scalar_t>(
        reinterpret_cast<const scalar_t*>(x.untyped_data()), idp,
        reinterpret_cast<const scalar_t*>(wgu.untyped_data()),
        reinterpret_cast<const scalar_t*>(wd.untyped_data()),
        reinterpret_cast<const scalar_t*>(sgu.untyped_data()),
        reinterpret_cast<const scalar_t*>(sd.untyped_data()), s.T, s.k, s.S, s.H, s.I, s.E,
        static_cast<int>(activation), reinterpret_cast<scalar_t*>(y->untyped_data()), run);
    if (combine)
      cpu::CombineImpl<scalar_t, float, scalar_t>(
          reinterpret_cast<const scalar_t*>(y->untyped_data()),
          reinterpret_cast<const float*>(weights.untyped_data()), nullptr, s.T, s.k + s.S, s.H,
          0, reinterpret_cast<scalar_t*>(out->untyped_data()));
    return ffi::Error::Success();
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    ExpertGemvCpu, ExpertGemvCpuHandler,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>()   // x [T, H]
        .Arg<ffi::AnyBuffer>()   // ids s32 [T, k]
        .Arg<ffi::AnyBuffer>()   // w_gate_up [E, 2I, H]
        .Arg<ffi::AnyBuffer>()   // w_down [E, H, I]
        .Arg<ffi::AnyBuffer>()   // shared_gate_up [S, 2I, H] (S may be 0)
        .Arg<ffi::AnyBuffer>()   // shared_down [S, H, I]
        .Arg<ffi::AnyBuffer>()   // weights f32 [T, k + S] (combine), else [0, k + S]
        .Ret<ffi::AnyBuffer>()   // y [T, k + S, H]
        .Ret<ffi::AnyBuffer>()   // h [T * (k + S), I] activated intermediate (CUDA scratch)
        .Ret<ffi::AnyBuffer>()   // out [T, H] weighted sum of y (combine), else [0, H]
        .Attr<int64_t>("activation")
        .Attr<int64_t>("token_tiles")
        .Attr<int64_t>("k_split_gate_up")
        .Attr<int64_t>("k_split_down")
        .Attr<int64_t>("kernel_variant")
        .Attr<int64_t>("combine")
        .Ctx<ffi::ThreadPool>());

}  // namespace jax_moe
