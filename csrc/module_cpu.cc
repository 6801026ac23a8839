// pybind11 module jax_moe._jax_moe_cpu: registrations() -> {target_name: capsule}
// for the CPU FFI handlers. jax_moe/_ffi.py registers them with XLA.
#include <pybind11/pybind11.h>

#include "common/ffi_targets.h"
#include "xla/ffi/api/c_api.h"

namespace py = pybind11;

namespace jax_moe {
extern "C" {
#define JAX_MOE_DECLARE(suffix, stem) XLA_FFI_Error* stem##Cpu(XLA_FFI_CallFrame*);
JAX_MOE_FFI_TARGETS(JAX_MOE_DECLARE)
#undef JAX_MOE_DECLARE
}
}  // namespace jax_moe

template <typename F>
static py::capsule Capsule(F* fn) {
  return py::capsule(reinterpret_cast<void*>(fn));
}

PYBIND11_MODULE(_jax_moe_cpu, m) {
  m.doc() = "jax_moe CPU FFI handlers";
  m.def("registrations", []() {
    py::dict d;
#define JAX_MOE_REGISTER(suffix, stem) d["jax_moe_" #suffix] = Capsule(jax_moe::stem##Cpu);
    JAX_MOE_FFI_TARGETS(JAX_MOE_REGISTER)
#undef JAX_MOE_REGISTER
    return d;
  });
}
