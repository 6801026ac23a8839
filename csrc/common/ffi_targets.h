// The package's FFI targets, one line each: X(target suffix, handler stem). The
// pybind11 modules (module_cpu.cc, module_cuda.cu) declare the handlers <stem>Cpu /
// <stem>Cuda from this list and register them as "jax_moe_<suffix>"; jax_moe/_ffi.py
// registers with XLA whatever the modules return. A new op adds one line here and
// its two handlers.
#pragma once

#define JAX_MOE_FFI_TARGETS(X) \
  X(route, Route)              \
  X(combine, Combine)          \
  X(expert_gemv, ExpertGemv)
