"""jax_moe.expert_gemv: the experts of a decode-size MoE layer, one primitive.

y = expert_gemv(x, ids, w_gate_up, w_down, *, activation="silu",
                shared_gate_up=None, shared_down=None)
out = expert_gemv_combine(x, ids, weights, w_gate_up, w_down, ...)

x [..., H], ids int32 [..., k], w_gate_up [E, 2I, H] (gate rows then up rows, the
[out, in] layout of torch/HF checkpoints), w_down [E, H, I]. Returns y [..., k, H]
= down(act(gate) * up) per (token, slot), unweighted (combine applies the routing
weights). An id outside [0, E) gives a zero row (a dropped token, or an expert on
another device). On GPU each selected expert's weights are read once per call.

Shared experts (DeepSeek/Qwen-style, every token runs them): shared_gate_up
[S, 2I, H] and shared_down [S, H, I] with the routed experts' I add S slots after
the k routed ones, y [..., k + S, H], in the same launch: one weight stream and one
tail instead of a second call (moe_block uses this at decode sizes).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray

from jax_moe import _codes, heuristics, reference
from jax_moe._primitive import (define_primitive, map_over_batch, move_to_front,
                                register_batching, register_lowerings)
from jax_moe._validate import check_choice, check_float_dtype, check_rank

TARGET = "jax_moe_expert_gemv"
expert_gemv_p = define_primitive(TARGET)


# Kernel configuration values the CUDA handler takes (csrc/kernels/expert_gemv.cuh);
# the shape rule checks them on every platform, so a bad one fails at trace time.
_CONFIG_CHOICES = dict(token_tiles=(1, 2, 4), k_split_gate_up=(1, 2, 4, 8),
                       k_split_down=(1, 2, 4, 8), kernel_variant=(0, 1, 3, 4, 5, 6, 7, 8))


def _abstract_eval(x, ids, w_gate_up, w_down, shared_gate_up, shared_down, weights, *,
                   activation, token_tiles, k_split_gate_up, k_split_down, kernel_variant,
                   combine):
  for name, value in dict(token_tiles=token_tiles, k_split_gate_up=k_split_gate_up,
                          k_split_down=k_split_down, kernel_variant=kernel_variant).items():
    if value not in _CONFIG_CHOICES[name]:
      raise ValueError(f"expert_gemv: {name} must be one of {_CONFIG_CHOICES[name]}, "
                       f"got {value!r}")
  T, H = x.shape
  kk = ids.shape[1] + shared_gate_up.shape[0]  # routed slots, then the shared experts
  I = w_down.shape[2]
  # combine: 0 none, 1 combine's kernel after the experts, 2 in the stream kernel where
  # it can (heuristics.gemv_combine_in_kernel). weights: f32 [T, kk] when combine,
  # else a [0, kk] placeholder; out likewise.
  if combine not in (0, 1, 2):
    raise ValueError(f"expert_gemv: combine must be 0, 1 or 2, got {combine!r}")
  if weights.dtype != np.float32 or weights.shape != ((T if combine else 0), kk):
    raise ValueError(f"expert_gemv: combine weights must be float32 "
                     f"{((T if combine else 0), kk)}, got {weights.dtype} {weights.shape}")
  # h: the activated intermediate [T * kk, I], or variant 7's partials (_codes)
  h_cols = _codes.gemv_scratch_cols(H, I, kernel_variant)
  return (ShapedArray((T, kk, H), x.dtype), ShapedArray((T * kk, h_cols), x.dtype),
          ShapedArray((T if combine else 0, H), x.dtype))


expert_gemv_p.def_abstract_eval(_abstract_eval)


def _ffi_attrs(params):
  return dict(activation=np.int64(_codes.ACTIVATION[params["activation"]]),
              token_tiles=np.int64(params["token_tiles"]),
              k_split_gate_up=np.int64(params["k_split_gate_up"]),
              k_split_down=np.int64(params["k_split_down"]),
              kernel_variant=np.int64(params["kernel_variant"]),
              combine=np.int64(params["combine"]))


def _fallback(x, ids, w_gate_up, w_down, shared_gate_up, shared_down, weights, *, activation,
              combine, kernel_variant, **_):
  S = shared_gate_up.shape[0]
  y = reference.expert_gemv(x, ids, w_gate_up, w_down, activation=activation,
                            shared_gate_up=shared_gate_up if S else None,
                            shared_down=shared_down if S else None)
  h_cols = _codes.gemv_scratch_cols(x.shape[1], w_down.shape[2], kernel_variant)
  h = jnp.zeros((y.shape[0] * y.shape[1], h_cols), x.dtype)
  out = (reference.combine(y, weights, out_dtype=x.dtype) if combine
         else jnp.zeros((0, x.shape[1]), x.dtype))
  return y, h, out


register_lowerings(expert_gemv_p, TARGET, ffi_attrs=_ffi_attrs, fallback=_fallback)


def _batch_rule(args, dims, **params):
  x, ids, wgu, wd, sgu, sd, w = args
  xd, idd = dims[:2]
  wtd = dims[6]
  if any(d is not None for d in dims[2:6]) or (wtd is not None and not params["combine"]):
    return map_over_batch(expert_gemv_p, args, dims, params)
  B = x.shape[xd] if xd is not None else (ids.shape[idd] if idd is not None else w.shape[wtd])
  x = move_to_front(x, xd, B)
  ids = move_to_front(ids, idd, B)
  T, H = x.shape[1], x.shape[2]
  k = ids.shape[2]
  E, S = wgu.shape[0], sgu.shape[0]
  params = dict(params, token_tiles=_token_tiles(B * T, E, k, S))
  I, size = wd.shape[2], x.dtype.itemsize
  if params["kernel_variant"] == heuristics.expert_gemv_variant(T, E, k, S, H, I, size):
    # the heuristic's choice for T tokens: choose again for the B * T folded ones
    params["kernel_variant"] = heuristics.expert_gemv_variant(B * T, E, k, S, H, I, size)
  if params["combine"]:
    w = move_to_front(w, wtd, B).reshape(B * T, k + S)
  y, h, out = expert_gemv_p.bind(x.reshape(B * T, H), ids.reshape(B * T, k), wgu, wd, sgu, sd,
                                 w, **params)
  out = out.reshape(B, T if params["combine"] else 0, H)
  return (y.reshape(B, T, k + S, H), h.reshape(B, T * (k + S), h.shape[-1]), out), (0, 0, 0)


register_batching(expert_gemv_p, _batch_rule)


def _token_tiles(T, E, k, S):
  # Every token runs each shared expert: the busiest expert then has all T tokens.
  return heuristics.gemv_token_tiles(T) if S else heuristics.gemv_token_tiles(T, E, k)


def expert_gemv(x, ids, w_gate_up, w_down, *, activation="silu", shared_gate_up=None,
                shared_down=None, _config=None):
  """Per-(token, slot) expert MLP outputs, unweighted.

  Args:
    x: [..., H] float32, bfloat16 or float16.
    ids: int32 [..., k] expert ids (leading dims as x's); outside [0, E) -> zero row.
    w_gate_up: [E, 2I, H], x's dtype; rows 0..I-1 gate, I..2I-1 up.
    w_down: [E, H, I], x's dtype.
    activation: "silu" (SwiGLU), "gelu_tanh" (GeGLU as in Gemma) or "gelu".
    shared_gate_up, shared_down: optional [S, 2I, H] and [S, H, I] (x's dtype, the
      routed experts' I): S shared experts that every token runs, computed in the
      same launch as slots k .. k + S - 1.

  Returns:
    y [..., k, H] in x's dtype ([..., k + S, H] with shared experts).

  `_config` (private, for benchmarks and tuning) overrides the heuristics: a dict
  with any of token_tiles, k_split_gate_up, k_split_down, kernel_variant.
  """
  c = _prepare("expert_gemv", x, ids, w_gate_up, w_down, activation, shared_gate_up,
               shared_down, _config)
  kk = c["k"] + c["S"]
  y, _, _ = expert_gemv_p.bind(*c["operands"], jnp.zeros((0, kk), jnp.float32),
                               activation=activation, combine=0, **c["config"])
  return y.reshape(c["lead"] + (kk, c["H"]))


def expert_gemv_combine(x, ids, weights, w_gate_up, w_down, *, activation="silu",
                        shared_gate_up=None, shared_down=None, _config=None):
  """The routed experts and their weighted sum in one call:
  combine(expert_gemv(x, ids, ...), weights) with the shared experts' slots weighted 1.

  Args:
    x, ids, w_gate_up, w_down, activation, shared_gate_up, shared_down: as expert_gemv.
    weights: [..., k] routing weights (float32 or x's dtype), leading dims as x's.

  Returns:
    out [..., H] in x's dtype: sum over the k routed slots of weights * y, then the S
    shared slots with weight 1, accumulated in f32 in slot order (as combine) and
    rounded once. On GPU combine's kernel runs after the experts, or the stream
    kernel (expert_gemv variants 5/6) sums in its own launch (its last block, once
    every y row is written) and the group kernel (variant 8) in the last block of
    each token's row range, where heuristics.gemv_combine_in_kernel says so, or the
    split kernels (variant 7) sum in their second kernel; the result is the same
    bitwise.

  `_config` as expert_gemv's, plus combine_in_kernel (bool) over the heuristic.
  """
  fn = "expert_gemv_combine"
  _config = dict(_config or {})
  in_kernel = _config.pop("combine_in_kernel", None)
  c = _prepare(fn, x, ids, w_gate_up, w_down, activation, shared_gate_up, shared_down, _config)
  weights = jnp.asarray(weights)
  k, S, H = c["k"], c["S"], c["H"]
  if weights.shape != c["lead"] + (k,):
    raise ValueError(f"{fn}: weights must be [..., k] = {c['lead'] + (k,)} like ids, "
                     f"got shape {tuple(weights.shape)}")
  if weights.dtype not in (jnp.float32, jnp.dtype(c["operands"][0].dtype)):
    raise TypeError(f"{fn}: weights must be float32 or x's dtype "
                    f"{c['operands'][0].dtype}, got {weights.dtype}")
  w = weights.reshape(-1, k).astype(jnp.float32)  # exact for bf16/f16
  if S:
    w = jnp.concatenate([w, jnp.ones((w.shape[0], S), jnp.float32)], axis=1)
  if in_kernel is None:
    in_kernel = heuristics.gemv_combine_in_kernel(w.shape[0], k + S, H)
  elif not isinstance(in_kernel, (bool, np.bool_)):
    raise TypeError(f"{fn}: _config combine_in_kernel must be a bool, got {in_kernel!r}")
  _, _, out = expert_gemv_p.bind(*c["operands"], w, activation=activation,
                                 combine=2 if in_kernel else 1, **c["config"])
  return out.reshape(c["lead"] + (H,))


def _prepare(fn, x, ids, w_gate_up, w_down, activation, shared_gate_up, shared_down, _config):
  """Validates the arguments (errors name them) and returns the primitive's operands
  (tokens folded), the kernel configuration and the sizes."""
  x = jnp.asarray(x)
  ids = jnp.asarray(ids)
  w_gate_up = jnp.asarray(w_gate_up)
  w_down = jnp.asarray(w_down)
  if x.ndim < 2:
    raise ValueError(f"{fn}: x must have rank >= 2 [..., H], got shape {tuple(x.shape)}")
  check_float_dtype(x, "x", fn)
  if ids.dtype != jnp.int32:
    raise TypeError(f"{fn}: ids must be int32, got {ids.dtype}")
  if ids.ndim != x.ndim or ids.shape[:-1] != x.shape[:-1]:
    raise ValueError(f"{fn}: ids must be [..., k] with x's leading dims {tuple(x.shape[:-1])}, "
                     f"got shape {tuple(ids.shape)}")
  check_rank(w_gate_up, 3, "w_gate_up", fn, "[E, 2I, H]")
  check_rank(w_down, 3, "w_down", fn, "[E, H, I]")
  for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
    if w.dtype != x.dtype:
      raise TypeError(f"{fn}: {name} dtype {w.dtype} must match x dtype {x.dtype}")
  E, two_i, H = w_gate_up.shape
  if H != x.shape[-1]:
    raise ValueError(f"{fn}: w_gate_up has shape {tuple(w_gate_up.shape)} [E, 2I, H] but x has "
                     f"H = {x.shape[-1]}")
  if two_i % 2:
    raise ValueError(f"{fn}: w_gate_up dim 1 must be 2I (gate rows then up rows), got {two_i}")
  I = two_i // 2
  if w_down.shape != (E, H, I):
    raise ValueError(f"{fn}: w_down must have shape (E, H, I) = {(E, H, I)} to match w_gate_up "
                     f"{tuple(w_gate_up.shape)}, got {tuple(w_down.shape)}")
  if E < 1:
    raise ValueError(f"{fn}: need at least one expert, got E = {E}")
  check_choice(activation, _codes.ACTIVATION, "activation", fn)
  if (shared_gate_up is None) != (shared_down is None):
    raise ValueError(f"{fn}: give both shared_gate_up and shared_down, or neither")
  if shared_gate_up is None:
    shared_gate_up = jnp.zeros((0, 2 * I, H), x.dtype)
    shared_down = jnp.zeros((0, H, I), x.dtype)
  shared_gate_up = jnp.asarray(shared_gate_up)
  shared_down = jnp.asarray(shared_down)
  check_rank(shared_gate_up, 3, "shared_gate_up", fn, "[S, 2I, H]")
  check_rank(shared_down, 3, "shared_down", fn, "[S, H, I]")
  for name, w in (("shared_gate_up", shared_gate_up), ("shared_down", shared_down)):
    if w.dtype != x.dtype:
      raise TypeError(f"{fn}: {name} dtype {w.dtype} must match x dtype {x.dtype}")
  S = shared_gate_up.shape[0]
  if shared_gate_up.shape[1:] != (2 * I, H) or shared_down.shape != (S, H, I):
    raise ValueError(f"{fn}: shared_gate_up must be [S, 2I, H] = [S, {2 * I}, {H}] and "
                     f"shared_down [S, H, I] = [{S}, {H}, {I}] (the routed experts' H and I), "
                     f"got {tuple(shared_gate_up.shape)} and {tuple(shared_down.shape)}")
  if E + S > 65535:
    raise ValueError(f"{fn}: at most 65535 experts (routed + shared), got {E} + {S}")

  lead = x.shape[:-1]
  k = ids.shape[-1]
  x2 = x.reshape(-1, H)
  ids2 = ids.reshape(-1, k)
  T = x2.shape[0]
  config = dict(token_tiles=_token_tiles(T, E, k, S),
                k_split_gate_up=heuristics.gemv_k_split(I, H, gated=True),
                k_split_down=heuristics.gemv_k_split(H, I),
                kernel_variant=heuristics.expert_gemv_variant(T, E, k, S, H, I,
                                                              x.dtype.itemsize))
  unknown = set(_config or {}) - set(config)
  if unknown:
    raise ValueError(f"{fn}: unknown _config key(s) {sorted(unknown)}; "
                     f"expected some of {sorted(config)}")
  config.update(_config or {})
  return dict(operands=(x2, ids2, w_gate_up, w_down, shared_gate_up, shared_down),
              config=config, lead=lead, k=k, S=S, H=H)
