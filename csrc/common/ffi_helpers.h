// Shared helpers for the FFI handler layer (csrc/ffi): aliases, error macros that
// return ffi::Error (handlers never throw, abort or exit), and shape helpers.
// Only csrc/ffi includes this file; kernels and CPU code never see XLA headers.
#pragma once

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_moe {

namespace ffi = xla::ffi;

// Return early with InvalidArgument when a condition does not hold.
#define JM_REQUIRE(cond, msg)                                  \
  do {                                                         \
    if (!(cond)) return ::xla::ffi::Error::InvalidArgument(    \
        std::string("jax_moe: ") + (msg));                     \
  } while (0)

#define JM_RETURN_IF_ERROR(expr)                  \
  do {                                            \
    ::xla::ffi::Error _jm_err = (expr);           \
    if (!_jm_err.success()) return _jm_err;       \
  } while (0)

inline int64_t Rank(const ffi::AnyBuffer& b) {
  return static_cast<int64_t>(b.dimensions().size());
}
template <typename B>
inline int64_t Dim(const B& b, int i) {
  return static_cast<int64_t>(b.dimensions()[i]);
}
inline int64_t NumElements(const ffi::AnyBuffer& b) {
  return static_cast<int64_t>(b.element_count());
}

inline const char* DtypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::S32: return "int32";
    default: return "unsupported dtype";
  }
}

inline bool IsFloatDtype(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

// Calls f(tag) with the storage type matching the dtype: float, Bf16Tag or F16Tag.
// The tag types are defined by the including layer (CPU: cpu_types.h; CUDA:
// cuda_types.cuh) so this header stays free of device code.
#define JM_DISPATCH_FLOAT(dtype, FLOAT_T, BF16_T, F16_T, ...)                      \
  [&]() -> ::xla::ffi::Error {                                                    \
    switch (dtype) {                                                              \
      case ::xla::ffi::DataType::F32: { using scalar_t = FLOAT_T; return __VA_ARGS__(); } \
      case ::xla::ffi::DataType::BF16: { using scalar_t = BF16_T; return __VA_ARGS__(); } \
      case ::xla::ffi::DataType::F16: { using scalar_t = F16_T; return __VA_ARGS__(); }   \
      default:                                                                    \
        return ::xla::ffi::Error::InvalidArgument(                                \
            std::string("jax_moe: unsupported dtype ") + DtypeName(dtype));       \
    }                                                                             \
  }()

}  // namespace jax_moe
