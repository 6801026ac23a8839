// pybind11 module jax_moe._jax_moe_cuda: registrations() -> {target_name: capsule}
// for the CUDA FFI handlers, plus the FFI API version the module was built with and
// pdl_disabled() (JAX_MOE_DISABLE_PDL as the launchers read it). Importing it touches
// no CUDA API, so it loads on machines without a driver.
#include <pybind11/pybind11.h>

#include "common/cuda_utils.cuh"
#include "common/ffi_targets.h"
#include "xla/ffi/api/c_api.h"

namespace py = pybind11;

namespace jax_moe {
extern "C" {
#define JAX_MOE_DECLARE(suffix, stem) XLA_FFI_Error* stem##Cuda(XLA_FFI_CallFrame*);
JAX_MOE_FFI_TARGETS(JAX_MOE_DECLARE)
#undef JAX_MOE_DECLARE
}
}  // namespace jax_moe

template <typename F>
static py::capsule Capsule(F* fn) {
  return py::capsule(reinterpret_cast<void*>(fn));
}

PYBIND11_MODULE(_jax_moe_cuda, m) {
  m.doc() = "jax_moe CUDA FFI handlers";
  m.def("registrations", []() {
    py::dict d;
#define JAX_MOE_REGISTER(suffix, stem) d["jax_moe_" #suffix] = Capsule(jax_moe::stem##Cuda);
    JAX_MOE_FFI_TARGETS(JAX_MOE_REGISTER)
#undef JAX_MOE_REGISTER
    return d;
  });
  m.attr("ffi_api_version") = py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.def("pdl_disabled", []() { return jax_moe::PdlDisabledByEnv(); });
}
