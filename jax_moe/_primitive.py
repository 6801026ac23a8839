"""Shared plumbing for the jax_moe primitives: creation, per-platform lowering
(FFI handler where one is registered, jnp reference elsewhere) and batching helpers.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_moe import _ffi

try:  # eager evaluation of a primitive compiles it like a one-op jit
  from jax._src.dispatch import apply_primitive as _apply_primitive
except ImportError:  # pragma: no cover - older/newer jax layouts
  _apply_primitive = None


def define_primitive(name: str) -> Primitive:
  prim = Primitive(name)
  prim.multiple_results = True
  if _apply_primitive is not None:
    prim.def_impl(partial(_apply_primitive, prim))
  else:  # pragma: no cover
    prim.def_impl(lambda *args, **params: jax.jit(partial(prim.bind, **params))(*args))
  return prim


def register_lowerings(prim: Primitive, target: str, *,
                       ffi_attrs: Callable[[dict], dict],
                       fallback: Callable[..., Sequence[jax.Array]],
                       cuda_supported: Callable[[Any, dict], bool] | None = None) -> None:
  """Lower `prim` to the FFI target `target` on cpu and cuda when the handler is
  registered (and, on cuda, when `cuda_supported(ctx, params)` holds), else to
  `fallback`, a jnp function returning the same outputs as the abstract eval.

  ffi_attrs(params) maps primitive params to typed numpy-scalar FFI attributes.
  """
  fallback_rule = mlir.lower_fun(fallback, multiple_results=True)
  mlir.register_lowering(prim, fallback_rule)  # platforms without a handler
  ffi_rule = jax.ffi.ffi_lowering(target)

  def make_rule(platform: str):
    def rule(ctx, *args, **params):
      ok = _ffi.has_target(target, platform)
      if ok and platform == "cuda" and cuda_supported is not None:
        ok = cuda_supported(ctx, params)
      if ok:
        return ffi_rule(ctx, *args, **ffi_attrs(params))
      return fallback_rule(ctx, *args, **params)
    return rule

  mlir.register_lowering(prim, make_rule("cpu"), platform="cpu")
  mlir.register_lowering(prim, make_rule("cuda"), platform="cuda")


def register_batching(prim: Primitive, rule: Callable) -> None:
  batching.primitive_batchers[prim] = rule


def move_to_front(x, bdim, size: int):
  """Batch dim to axis 0; an unbatched operand is broadcast."""
  if bdim is None:
    return jnp.broadcast_to(x, (size,) + x.shape)
  return jnp.moveaxis(x, bdim, 0)


def batch_size(args, dims) -> int:
  for x, d in zip(args, dims):
    if d is not None:
      return x.shape[d]
  raise ValueError("no batched operand")


def map_over_batch(prim: Primitive, args, dims, params):
  """Generic batching fallback: a sequential lax.map over the batch dimension.

  Used when an operand that cannot be folded into the token dimension (weights,
  per-expert vectors) is batched. Correct for any batching, not fast.
  """
  batched = [i for i, d in enumerate(dims) if d is not None]
  stacked = [jnp.moveaxis(args[i], dims[i], 0) for i in batched]

  def one(slices):
    full = list(args)
    for i, s in zip(batched, slices):
      full[i] = s
    return prim.bind(*full, **params)

  outs = jax.lax.map(one, stacked)
  return outs, [0] * len(outs)
