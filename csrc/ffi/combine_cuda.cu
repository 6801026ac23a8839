// PLACEHOLDER: replaced by the real handler in the combine work.
#include "common/ffi_helpers.h"
namespace jax_moe {
static ffi::Error CombineCudaHandler(ffi::RemainingArgs, ffi::RemainingRets) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "jax_moe: combine not implemented yet");
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(CombineCuda, CombineCudaHandler, ffi::Ffi::Bind().RemainingArgs().RemainingRets());
}  // namespace jax_moe
