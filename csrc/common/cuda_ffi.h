// Helpers for the CUDA FFI handlers: the stream context type and turning a
// cudaError_t from a launcher into an ffi::Error.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "common/ffi_helpers.h"

namespace jax_moe {

inline ffi::Error CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jax_moe: ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace jax_moe
