// PLACEHOLDER: replaced by the real handler in the expert_gemv work.
#include "common/ffi_helpers.h"
namespace jax_moe {
static ffi::Error ExpertGemvCpuHandler(ffi::RemainingArgs, ffi::RemainingRets) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "jax_moe: expert_gemv not implemented yet");
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(ExpertGemvCpu, ExpertGemvCpuHandler, ffi::Ffi::Bind().RemainingArgs().RemainingRets());
}  // namespace jax_moe
