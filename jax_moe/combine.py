"""jax_moe.combine: the weighted sum of each token's k expert outputs, one launch.

On CUDA, up to heuristics.COMBINE_XLA_MAX_BYTES of 16-bit rows it lowers to XLA's
fusion of the same f32 sum instead of the kernel (f32 rows always take the kernel:
heuristics.combine_uses_kernel): a custom call cannot fuse with its
neighbours, and XLA's fusion of this sum streams as fast as the kernel (measured,
see heuristics.py). Up to COMBINE_XLA_REDUCE_MAX_BYTES of rows that fusion is a
reduction over the slots, above it the slot-ordered chain of adds
(heuristics.combine_xla_reduce; the two give the same bits). The kernel runs above
COMBINE_XLA_MAX_BYTES, and on CPU the CPU handler.

out = combine(y, weights, index=None, *, out_dtype=None)

  index None:  y [..., k, H],  out[t] = sum_j weights[t, j] * y[t, j]
  index given: y [N, H] (rows in any order), index int32 [..., k],
               out[t] = sum_j weights[t, j] * y[index[t, j]]; an index outside
               [0, N) contributes nothing (and is never read).

weights [..., k] are float32 or y's dtype; the sum is f32 in j order (deterministic)
and cast to out_dtype (default y's dtype). Leading dims fold into tokens; out is
[..., H].
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray

from jax_moe import heuristics, reference
from jax_moe._primitive import (batch_size, define_primitive, map_over_batch, move_to_front,
                                register_batching, register_lowerings)
from jax_moe._validate import FLOAT_DTYPES, check_float_dtype

TARGET = "jax_moe_combine"
combine_p = define_primitive(TARGET)

_INT32_MAX = np.iinfo(np.int32).max


def _abstract_eval(y, weights, index, *, has_index, out_dtype):
  del index, has_index
  return (ShapedArray((weights.shape[0], y.shape[-1]), out_dtype),)


combine_p.def_abstract_eval(_abstract_eval)


def _ffi_attrs(params):
  # out_dtype travels as the result type, not as an attribute.
  return dict(has_index=np.int64(bool(params["has_index"])))


def _fallback(y, weights, index, *, has_index, out_dtype):
  """XLA's fusion of the sum: on CUDA up to COMBINE_XLA_MAX_BYTES, and on platforms
  without a handler. Either form, up to COMBINE_XLA_REDUCE_MAX_K slots and
  COMBINE_XLA_REDUCE_MAX_BYTES of rows, is a reduction over the slot axis (the index
  form's rows gathered with out-of-range slots masked to zero): faster than the chain
  of adds at small T and, as measured on H100, bitwise equal to it
  (heuristics.combine_xla_reduce). Otherwise reference.combine's slot-ordered chain."""
  T, k = weights.shape
  if heuristics.combine_xla_reduce(T, k, y.shape[-1], np.dtype(y.dtype).itemsize):
    rows = reference.gather_rows(y, index) if has_index else y.astype(jnp.float32)
    products = rows * weights.astype(jnp.float32)[..., None]
    out = jnp.sum(products, axis=-2)  # [T, 1] when the index form has no rows
    return [jnp.broadcast_to(out, weights.shape[:-1] + y.shape[-1:]).astype(out_dtype)]
  return [reference.combine(y, weights, index if has_index else None, out_dtype=out_dtype)]


def _cuda_uses_kernel(ctx, params) -> bool:
  """The size rule of heuristics.combine_uses_kernel: below it XLA's fusion of the
  same sum (the fallback) runs instead of the kernel, see heuristics.py."""
  del params
  w = ctx.avals_in[1]
  y = ctx.avals_in[0]
  T, k = w.shape
  return heuristics.combine_uses_kernel(T, k, y.shape[-1], np.dtype(y.dtype).itemsize)


register_lowerings(combine_p, TARGET, ffi_attrs=_ffi_attrs, fallback=_fallback,
                   cuda_supported=_cuda_uses_kernel)


def _batch_rule(args, dims, *, has_index, out_dtype):
  """Batched operands fold into the token dimension: one launch for the whole batch.

  A batched y with an index becomes B * N rows; each batch's valid indices move by
  b * N and invalid ones become -1, so they stay dropped. A shared (unbatched)
  y [T, k, H] under batched weights is addressed through an iota index instead of
  being copied B times.
  """
  y, w, index = args
  yd, wd, xd = dims
  params = dict(has_index=has_index, out_dtype=out_dtype)
  B = batch_size(args, dims)
  w = move_to_front(w, wd, B)
  _, T, k = w.shape
  w = w.reshape(B * T, k)
  H = y.shape[-1]
  if not has_index:
    if xd is not None:  # the placeholder index is never batched by combine() itself
      return map_over_batch(combine_p, args, dims, params)
    if yd is not None:
      y = jnp.moveaxis(y, yd, 0).reshape(B * T, k, H)
      (out,) = combine_p.bind(y, w, index, **params)
    else:
      if T * k > _INT32_MAX:
        return map_over_batch(combine_p, args, dims, params)
      rows = y.reshape(T * k, H)
      iota = jnp.arange(T * k, dtype=jnp.int32).reshape(1, T, k)
      index = jnp.broadcast_to(iota, (B, T, k)).reshape(B * T, k)
      (out,) = combine_p.bind(rows, w, index, has_index=True, out_dtype=out_dtype)
    return [out.reshape(B, T, H)], [0]

  index = move_to_front(index, xd, B)
  if yd is not None:
    y = jnp.moveaxis(y, yd, 0)
    N = y.shape[1]
    if B * N > _INT32_MAX + 1:  # shifted indices would not fit in int32
      return map_over_batch(combine_p, args, dims, params)
    valid = (index >= 0) & (index < N)
    shift = (jnp.arange(B, dtype=jnp.int32) * N).reshape(B, 1, 1)
    index = jnp.where(valid, index + shift, jnp.int32(-1))
    y = y.reshape(B * N, H)
  (out,) = combine_p.bind(y, w, index.reshape(B * T, k), **params)
  return [out.reshape(B, T, H)], [0]


register_batching(combine_p, _batch_rule)


def _out_dtype(out_dtype, y_dtype, fn: str):
  if out_dtype is None:
    return jnp.dtype(y_dtype)
  try:
    dt = jnp.dtype(out_dtype)
  except TypeError:
    raise TypeError(f"{fn}: out_dtype must be float32, bfloat16 or float16, got "
                    f"{out_dtype!r}") from None
  if dt not in FLOAT_DTYPES:
    raise TypeError(f"{fn}: out_dtype must be float32, bfloat16 or float16, got {dt}")
  return dt


def combine(y, weights, index=None, *, out_dtype=None):
  """Weighted sum of each token's k rows of y.

  Args:
    y: [..., k, H] expert outputs per token (index None), or [N, H] rows in any
      order (index given); float32, bfloat16 or float16.
    weights: [..., k], float32 or y's dtype.
    index: None, or int32 [..., k]: the row of y for each (token, slot). Rows
      outside [0, N) contribute nothing.
    out_dtype: float32, bfloat16 or float16; default y's dtype.

  Returns:
    out [..., H] in out_dtype; the sum is accumulated in float32 in slot order.
  """
  fn = "combine"
  y = jnp.asarray(y)
  weights = jnp.asarray(weights)
  check_float_dtype(y, "y", fn)
  if weights.ndim < 1:
    raise ValueError(f"{fn}: weights must have rank >= 1 ([..., k]), got shape "
                     f"{tuple(weights.shape)}")
  if jnp.dtype(weights.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(y.dtype)):
    raise TypeError(f"{fn}: weights must be float32 or y's dtype ({y.dtype}), got "
                    f"{weights.dtype}")
  out_dtype = _out_dtype(out_dtype, y.dtype, fn)
  lead, k = weights.shape[:-1], weights.shape[-1]
  T = int(np.prod(lead, dtype=np.int64))
  if index is None:
    if y.ndim != weights.ndim + 1 or y.shape[:-1] != weights.shape:
      raise ValueError(f"{fn}: y must have shape [..., k, H] matching weights [..., k] = "
                       f"{tuple(weights.shape)} (same leading dims and k), got y shape "
                       f"{tuple(y.shape)}")
    H = y.shape[-1]
    y2 = y.reshape(T, k, H)
    index2 = jnp.zeros((0, 0), jnp.int32)
  else:
    dt = getattr(index, "dtype", None)
    if dt is not None and np.dtype(dt) != np.int32:  # before asarray, which may narrow int64
      raise TypeError(f"{fn}: index must be int32, got {np.dtype(dt)}")
    index = jnp.asarray(index)
    if index.dtype != jnp.int32:
      raise TypeError(f"{fn}: index must be int32, got {index.dtype}")
    if index.shape != weights.shape:
      raise ValueError(f"{fn}: index must have weights' shape {tuple(weights.shape)} "
                       f"([..., k], same leading dims and k), got {tuple(index.shape)}")
    if y.ndim != 2:
      raise ValueError(f"{fn}: y must have rank 2 [N, H] when index is given, got shape "
                       f"{tuple(y.shape)}")
    H = y.shape[-1]
    y2 = y
    index2 = index.reshape(T, k)
  (out,) = combine_p.bind(y2, weights.reshape(T, k), index2, has_index=index is not None,
                          out_dtype=out_dtype)
  return out.reshape(lead + (H,))
