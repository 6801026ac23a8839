// pybind11 module jax_moe._jax_moe_cpu: registrations() -> {target_name: capsule}
// for the CPU FFI handlers. jax_moe/_ffi.py registers them with XLA.
#include <pybind11/pybind11.h>

#include "xla/ffi/api/c_api.h"

namespace py = pybind11;

namespace jax_moe {
extern "C" {
XLA_FFI_Error* RouteCpu(XLA_FFI_CallFrame*);
XLA_FFI_Error* CombineCpu(XLA_FFI_CallFrame*);
XLA_FFI_Error* ExpertGemvCpu(XLA_FFI_CallFrame*);
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
    d["jax_moe_route"] = Capsule(jax_moe::RouteCpu);
    d["jax_moe_combine"] = Capsule(jax_moe::CombineCpu);
    d["jax_moe_expert_gemv"] = Capsule(jax_moe::ExpertGemvCpu);
    return d;
  });
}
