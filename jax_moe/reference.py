"""Pure-jnp versions of every op: the test oracle and the fallback lowering on
platforms without an FFI handler. They define the semantics the kernels match.

All arithmetic is float32 (matmuls at HIGHEST precision, so GPUs do not use TF32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST
_RENORM_EPS = 1e-20  # as csrc/common/params.h kRenormEps


def route(x, top_k, *, router_weight=None, scoring="softmax", renormalize=True, num_groups=1,
          top_groups=1, group_score="top2_sum", correction_bias=None, scaling_factor=1.0,
          expert_scale=None):
  """Reference routing on x [T, E] logits or [T, H] hidden (with router_weight [E, H])."""
  if router_weight is not None:
    logits = jnp.dot(x.astype(jnp.float32), router_weight.astype(jnp.float32).T, precision=_HI)
  else:
    logits = x.astype(jnp.float32)
  T, E = logits.shape
  if scoring == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
  elif scoring == "sigmoid":
    scores = jax.nn.sigmoid(logits)
  else:
    raise ValueError(f"unknown scoring {scoring!r}")
  sel = scores if correction_bias is None else scores + correction_bias.astype(jnp.float32)
  if num_groups > 1:
    G = E // num_groups
    grouped = sel.reshape(T, num_groups, G)
    if group_score == "max":
      gs = grouped.max(-1)
    else:
      gs = jax.lax.top_k(grouped, min(2, G))[0].sum(-1)
    _, top_g = jax.lax.top_k(gs, top_groups)
    gmask = jnp.zeros((T, num_groups), bool).at[jnp.arange(T)[:, None], top_g].set(True)
    mask = jnp.repeat(gmask, G, axis=1)
    sel = jnp.where(mask, sel, -jnp.inf)
  _, ids = jax.lax.top_k(sel, top_k)
  w = jnp.take_along_axis(scores, ids, axis=-1)
  if renormalize:
    w = w / (w.sum(-1, keepdims=True) + _RENORM_EPS)
  w = w * jnp.float32(scaling_factor)
  if expert_scale is not None:
    w = w * expert_scale.astype(jnp.float32)[ids]
  return w.astype(jnp.float32), ids.astype(jnp.int32)


def activation_fn(name: str):
  if name == "silu":
    return jax.nn.silu
  if name == "gelu_tanh":
    c = math.sqrt(2.0 / math.pi)
    return lambda g: 0.5 * g * (1.0 + jnp.tanh(c * (g + 0.044715 * g * g * g)))
  if name == "gelu":
    return lambda g: 0.5 * g * (1.0 + jax.lax.erf(g * (1.0 / math.sqrt(2.0))))
  raise ValueError(f"unknown activation {name!r}")


def expert_gemv(x, ids, w_gate_up, w_down, *, activation="silu", shared_gate_up=None,
                shared_down=None):
  """y [T, k, H] = down(act(gate) * up) per (token, slot); a zero row for ids outside [0, E).

  gate/up and down accumulate in f32; the activated intermediate is rounded to x's
  dtype before the down projection (as the kernels store it). With shared experts
  (shared_gate_up [S, 2I, H], shared_down [S, H, I]) every token's S shared rows
  follow its k routed ones: y [T, k + S, H].
  """
  if shared_gate_up is not None:
    S = shared_gate_up.shape[0]
    routed = expert_gemv(x, ids, w_gate_up, w_down, activation=activation)
    sids = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (x.shape[0], S))
    shared = expert_gemv(x, sids, shared_gate_up, shared_down, activation=activation)
    return jnp.concatenate([routed, shared], axis=1)
  T, H = x.shape
  k = ids.shape[1]
  E, two_i, _ = w_gate_up.shape
  I = two_i // 2
  act = activation_fn(activation)
  flat_ids = ids.reshape(-1)
  valid = (flat_ids >= 0) & (flat_ids < E)
  safe = jnp.where(valid, flat_ids, 0)
  tok = jnp.repeat(jnp.arange(T), k)

  def one(args):
    e, t = args
    xt = x[t].astype(jnp.float32)
    gu = jnp.dot(w_gate_up[e].astype(jnp.float32), xt, precision=_HI)
    h = (act(gu[:I]) * gu[I:]).astype(x.dtype).astype(jnp.float32)
    return jnp.dot(w_down[e].astype(jnp.float32), h, precision=_HI)

  if T * k == 0:
    return jnp.zeros((T, k, H), x.dtype)
  y = jax.lax.map(one, (safe, tok), batch_size=min(T * k, 16))
  y = jnp.where(valid[:, None], y, 0.0)
  return y.reshape(T, k, H).astype(x.dtype)


def gather_rows(y, index):
  """y[index] in f32 for y [N, H], index [T, k]: [T, k, H], zero where the index is
  outside [0, N) (never read there: the gather's index is clamped). [T, k, 1] of
  zeros when N == 0."""
  N = y.shape[0]
  if N == 0:
    return jnp.zeros(index.shape + (1,), jnp.float32)
  valid = (index >= 0) & (index < N)
  return jnp.where(valid[..., None], y[jnp.clip(index, 0, N - 1)].astype(jnp.float32), 0.0)


def combine(y, weights, index=None, *, out_dtype=None):
  """out[t] = sum_k weights[t, k] * y[t, k] (or y[index[t, k]]), f32, in k order."""
  out_dtype = y.dtype if out_dtype is None else jnp.dtype(out_dtype)
  w = weights.astype(jnp.float32)
  rows = y.astype(jnp.float32) if index is None else gather_rows(y, index)  # [T, k, H]
  T, k = w.shape
  acc = jnp.zeros((T, y.shape[-1]), jnp.float32)  # rows is [T, k, 1] when N == 0
  for j in range(k):
    acc = acc + w[:, j, None] * rows[:, j]
  return acc.astype(out_dtype)
