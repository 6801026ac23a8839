"""Loads the compiled extensions and registers their FFI targets with XLA.

`_jax_moe_cpu` (always built) registers every target for the "cpu" platform.
`_jax_moe_cuda` (built when nvcc was found) registers the same targets for "CUDA".
Importing this module never touches a GPU: on a machine without CUDA or without
the CUDA extension only the CPU handlers are registered, and the lowerings in
`_primitive.py` fall back to the jnp reference on other platforms.
"""

from __future__ import annotations

import importlib
import os
import warnings

import jax

# JAX_MOE_DISABLE_PDL=1: the CUDA launchers skip programmatic dependent launch (an
# A/B timing diagnostic; read once by the extension). Anything but 0 or 1 is refused
# here, before the extension could read it.
_PDL_ENV = os.environ.get("JAX_MOE_DISABLE_PDL")
if _PDL_ENV is not None and _PDL_ENV not in ("0", "1"):
  raise ValueError("jax_moe: JAX_MOE_DISABLE_PDL must be 0 or 1 (unset: programmatic "
                   f"dependent launch on), got {_PDL_ENV!r}")

_REGISTERED: dict[str, set[str]] = {"cpu": set(), "cuda": set()}
_LOAD_ERRORS: dict[str, str] = {}


def _load(module_name: str):
  try:
    return importlib.import_module(f"jax_moe.{module_name}")
  except ImportError as e:  # not built, or built for another Python
    _LOAD_ERRORS[module_name] = str(e)
    return None


def _register(module, xla_platform: str, key: str) -> None:
  for name, capsule in module.registrations().items():
    try:
      jax.ffi.register_ffi_target(name, capsule, platform=xla_platform)
    except Exception as e:  # e.g. a jaxlib without this platform's plugin
      _LOAD_ERRORS[f"{key}:{name}"] = str(e)
      continue
    _REGISTERED[key].add(name)


_cpu = _load("_jax_moe_cpu")
if _cpu is not None:
  _register(_cpu, "cpu", "cpu")
else:
  warnings.warn(
      "jax_moe: the CPU extension is not built; every op falls back to the jnp "
      f"reference ({_LOAD_ERRORS.get('_jax_moe_cpu')})")

_cuda = _load("_jax_moe_cuda")
if _cuda is not None:
  _register(_cuda, "CUDA", "cuda")


def has_target(target: str, platform: str) -> bool:
  """Whether an FFI handler for `target` is registered on `platform` ("cpu"/"cuda")."""
  return target in _REGISTERED.get(platform, set())


def cuda_extension_built() -> bool:
  return _cuda is not None


def build_info() -> dict:
  """What was loaded and why something was not; useful in bug reports."""
  return {
      "cpu_targets": sorted(_REGISTERED["cpu"]),
      "cuda_targets": sorted(_REGISTERED["cuda"]),
      "cuda_ffi_api_version": getattr(_cuda, "ffi_api_version", None),
      "cuda_pdl_disabled": _cuda.pdl_disabled() if _cuda is not None else None,
      "errors": dict(_LOAD_ERRORS),
  }
