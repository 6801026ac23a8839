// pybind11 module jax_moe._jax_moe_cuda: registrations() -> {target_name: capsule}
// for the CUDA FFI handlers, plus the FFI API version the module was built with and
// pdl_disabled() (JAX_MOE_DISABLE_PDL as the launchers read it). Importing it touches
// no CUDA API, so it loads on machines without a driver.
#include <pybind11/pybind11.h>

#include "common/cuda_utils.cuh"
#include "xla/ffi/api/c_api.h"

namespace py = pybind11;

namespace jax_moe {
extern "C" {
XLA_FFI_Error* RouteCuda(XLA_FFI_CallFrame*);
XLA_FFI_Error* CombineCuda(XLA_FFI_CallFrame*);
XLA_FFI_Error* ExpertGemvCuda(XLA_FFI_CallFrame*);
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
    d["jax_moe_route"] = Capsule(jax_moe::RouteCuda);
    d["jax_moe_combine"] = Capsule(jax_moe::CombineCuda);
    d["jax_moe_expert_gemv"] = Capsule(jax_moe::ExpertGemvCuda);
    return d;
  });
  m.attr("ffi_api_version") = py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.def("pdl_disabled", []() { return jax_moe::PdlDisabledByEnv(); });
}
