"""jax_moe.route: expert selection as one primitive.

weights, ids = route(x, top_k, *, router_weight=None, ...)

x is logits [..., E], or hidden states [..., H] when router_weight [E, H] is given.
With router_weight, the router matmul runs either inside the routing launch (the
fused kernel: a split-K tensor-core GEMM whose last block also does the selection)
or as XLA's dot followed by the logits-only routing kernel; heuristics.py picks
(today the dot path at every T: it measured faster). With block_select the selection
runs with a whole block per token (on the logits path, and in a one-launch fused
kernel without the cluster exchange); written without a device, not yet picked.
Returns weights f32 [..., k] and ids int32 [..., k], ordered by selection score
(highest first, ties to the lower expert index). See DESIGN.md for the semantics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray

from jax_moe import _codes, heuristics, reference
from jax_moe._primitive import (define_primitive, map_over_batch, register_batching,
                                register_lowerings)
from jax_moe._validate import (check_choice, check_float_dtype, check_rank,
                               check_routing_counts)

TARGET = "jax_moe_route"
route_p = define_primitive(TARGET)

_CUDA_MAX_EXPERTS = 1024
_CUDA_MAX_TOP_K = 32
_CUDA_MAX_GROUPS = 64
_CUDA_MAX_K_SPLITS = 4096  # kRouteMaxKSplits in csrc/kernels/route.cuh


def _num_experts(x_aval, router_aval) -> int:
  return router_aval.shape[0] if router_aval.size else x_aval.shape[1]


def _abstract_eval(x, router, bias, scale, *, top_k, scoring, renormalize, num_groups,
                   top_groups, group_score, scaling_factor, k_splits, block_select):
  if not isinstance(k_splits, (int, np.integer)) or not 1 <= k_splits <= _CUDA_MAX_K_SPLITS:
    raise ValueError(f"route: k_splits must be an int in [1, {_CUDA_MAX_K_SPLITS}], "
                     f"got {k_splits!r}")
  T = x.shape[0]
  E = _num_experts(x, router)
  if block_select and not heuristics.route_block_supported(
      E, x.shape[1] if router.size else None, k_splits, jnp.dtype(x.dtype).itemsize):
    raise ValueError(f"route: block_select needs at most {heuristics.ROUTE_BLOCK_MAX_EXPERTS} "
                     f"experts, and with the router in the call 16-bit x, H a multiple of 8 "
                     f"and k_splits = 1; got E = {E}, x {x.dtype} {tuple(x.shape)}, "
                     f"k_splits = {k_splits}")
  scratch = (k_splits * T, E) if router.size else (0,)
  return (ShapedArray((T, top_k), jnp.float32), ShapedArray((T, top_k), jnp.int32),
          ShapedArray(scratch, jnp.float32))


route_p.def_abstract_eval(_abstract_eval)


def _ffi_attrs(params):
  return dict(
      top_k=np.int64(params["top_k"]),
      scoring=np.int64(_codes.SCORING[params["scoring"]]),
      renormalize=np.int64(bool(params["renormalize"])),
      num_groups=np.int64(params["num_groups"]),
      top_groups=np.int64(params["top_groups"]),
      group_score=np.int64(_codes.GROUP_SCORE[params["group_score"]]),
      scaling_factor=np.float32(params["scaling_factor"]),
      k_splits=np.int64(params["k_splits"]),
      block_select=np.int64(bool(params["block_select"])),
  )


def _fallback(x, router, bias, scale, *, top_k, scoring, renormalize, num_groups, top_groups,
              group_score, scaling_factor, k_splits, block_select):
  del block_select  # a CUDA kernel choice
  w, ids = reference.route(
      x, top_k, router_weight=router if router.size else None, scoring=scoring,
      renormalize=renormalize, num_groups=num_groups, top_groups=top_groups,
      group_score=group_score, correction_bias=bias if bias.size else None,
      scaling_factor=scaling_factor, expert_scale=scale if scale.size else None)
  E = router.shape[0] if router.size else x.shape[1]
  scratch = (k_splits * x.shape[0], E) if router.size else (0,)
  return w, ids, jnp.zeros(scratch, jnp.float32)


def _cuda_supported(ctx, params) -> bool:
  x_aval, router_aval = ctx.avals_in[0], ctx.avals_in[1]
  E = _num_experts(x_aval, router_aval)
  return (E <= _CUDA_MAX_EXPERTS and params["top_k"] <= _CUDA_MAX_TOP_K
          and params["num_groups"] <= _CUDA_MAX_GROUPS)


register_lowerings(route_p, TARGET, ffi_attrs=_ffi_attrs, fallback=_fallback,
                   cuda_supported=_cuda_supported)


def _batch_rule(args, dims, **params):
  x, router, bias, scale = args
  xd, rd, bd, sd = dims
  if rd is not None or bd is not None or sd is not None:
    return map_over_batch(route_p, args, dims, params)
  x = jnp.moveaxis(x, xd, 0)
  B, T = x.shape[0], x.shape[1]
  w, ids, scratch = route_p.bind(x.reshape(B * T, x.shape[2]), router, bias, scale, **params)
  k = params["top_k"]
  # scratch (partial logits, [k_splits * T, E]) has no meaning outside the kernel:
  # any [B, ...] shape of the right size will do.
  if router.size:
    scratch = scratch.reshape(B, params["k_splits"] * T, scratch.shape[1])
  else:
    scratch = jnp.zeros((B, 0), jnp.float32)
  return (w.reshape(B, T, k), ids.reshape(B, T, k), scratch), (0, 0, 0)


register_batching(route_p, _batch_rule)


def _vector(v, E: int, name: str):
  if v is None:
    return jnp.zeros((0,), jnp.float32)
  v = jnp.asarray(v)
  if not jnp.issubdtype(v.dtype, jnp.floating):
    raise TypeError(f"route: {name} must be a float array of shape ({E},), got dtype {v.dtype}")
  if v.shape != (E,):
    raise ValueError(f"route: {name} must have shape ({E},) (one value per expert), "
                     f"got {tuple(v.shape)}")
  return v.astype(jnp.float32)


def route(x, top_k, *, router_weight=None, scoring="softmax", renormalize=True, num_groups=1,
          top_groups=1, group_score="top2_sum", correction_bias=None, scaling_factor=1.0,
          expert_scale=None):
  """Select top_k experts per token.

  Args:
    x: logits [..., E], or hidden [..., H] when router_weight is given; float32,
      bfloat16 or float16. Leading dims are folded into tokens.
    top_k: experts per token.
    router_weight: [E, H], x's dtype, or None when x already holds logits.
    scoring: "softmax" (over all E) or "sigmoid" (DeepSeek-V3).
    renormalize: divide the chosen weights by their sum.
    num_groups, top_groups: group-limited routing: E splits into num_groups equal
      groups and only experts of the best top_groups groups can be chosen.
    group_score: a group's score, "top2_sum" (DeepSeek-V3) or "max" (DeepSeek-V2).
    correction_bias: [E], added to the scores for selection only.
    scaling_factor: multiplies the final weights (routed_scaling_factor).
    expert_scale: [E], per-expert multiplier of the final weights (Gemma).

  Returns:
    (weights float32 [..., top_k], ids int32 [..., top_k]).
  """
  fn = "route"
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"{fn}: x must have rank >= 2 ([..., E] logits or [..., H] hidden "
                     f"states), got shape {tuple(x.shape)}")
  check_float_dtype(x, "x", fn)
  if router_weight is not None:
    router_weight = jnp.asarray(router_weight)
    check_rank(router_weight, 2, "router_weight", fn, "[E, H]")
    if router_weight.dtype != x.dtype:
      raise TypeError(f"{fn}: router_weight dtype {router_weight.dtype} must match x dtype "
                      f"{x.dtype}")
    if router_weight.shape[1] != x.shape[-1]:
      raise ValueError(f"{fn}: router_weight has shape {tuple(router_weight.shape)} [E, H] but "
                       f"x has H = {x.shape[-1]}")
    E = router_weight.shape[0]
  else:
    E = x.shape[-1]
  if E < 1:
    raise ValueError(f"{fn}: need at least one expert, got E = {E}")
  top_k, num_groups, top_groups = check_routing_counts(E, top_k, num_groups, top_groups, fn)
  check_choice(scoring, _codes.SCORING, "scoring", fn)
  check_choice(group_score, _codes.GROUP_SCORE, "group_score", fn)
  if not isinstance(renormalize, (bool, np.bool_)):
    raise TypeError(f"{fn}: renormalize must be a bool, got {type(renormalize).__name__}")
  try:
    scaling_factor = float(scaling_factor)
  except (TypeError, ValueError):
    raise TypeError(f"{fn}: scaling_factor must be a Python float, got "
                    f"{type(scaling_factor).__name__}") from None
  if not math.isfinite(scaling_factor):
    raise ValueError(f"{fn}: scaling_factor must be finite, got {scaling_factor}")
  bias = _vector(correction_bias, E, "correction_bias")
  scale = _vector(expert_scale, E, "expert_scale")

  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  T = x2.shape[0]
  k_splits = 1
  block_select = False
  if router_weight is not None:
    H = x.shape[-1]
    if heuristics.route_fused_block(T, E, H, x.dtype.itemsize):
      # One launch: the router matmul and the selection (route_gemv_block_kernel).
      block_select = True
      router = router_weight
    elif heuristics.route_fuse_router(T, E, H):
      k_splits = heuristics.route_k_splits(H)
      router = router_weight
    elif heuristics.route_router_reduce(T, E, H, x.dtype.itemsize):
      # Few tokens: the router matmul as one XLA multiply-reduce fusion (one kernel;
      # XLA's dot at these T is a split-K GEMM plus a reduction kernel). f32
      # products of 16-bit inputs are exact, as in the dot.
      x2 = jnp.sum(x2.astype(jnp.float32)[:, None, :] *
                   router_weight.astype(jnp.float32)[None, :, :], axis=-1)
      router = jnp.zeros((0, 0), x2.dtype)
    else:  # the router matmul on the tensor cores (XLA's dot)
      # HIGHEST: f32 inputs must not drop to TF32 on GPU (the fused kernel and the
      # reference compute f32 products); for 16-bit inputs it changes nothing.
      x2 = jnp.dot(x2, router_weight.T, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST)
      router = jnp.zeros((0, 0), x2.dtype)
  else:
    router = jnp.zeros((0, 0), x2.dtype)
  if not router.size:  # the logits path
    block_select = heuristics.route_block_select(T, E)
  w, ids, _ = route_p.bind(x2, router, bias, scale, top_k=top_k, scoring=scoring,
                           renormalize=bool(renormalize), num_groups=num_groups,
                           top_groups=top_groups, group_score=group_score,
                           scaling_factor=scaling_factor,
                           k_splits=k_splits, block_select=block_select)
  return w.reshape(lead + (top_k,)), ids.reshape(lead + (top_k,))
