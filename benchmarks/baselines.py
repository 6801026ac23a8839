"""XLA-native formulations a JAX user would write today (no custom calls), used as
baselines by the benchmarks. Default matmul precision (what a user gets), f32
accumulation where the natural code asks for it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_moe import reference


def route(x, top_k, *, router_weight, scoring="softmax", renormalize=True, num_groups=1,
          top_groups=1, group_score="top2_sum", correction_bias=None, scaling_factor=1.0,
          expert_scale=None):
  """Router matmul + grouped top-k as XLA ops."""
  logits = jnp.dot(x, router_weight.T, preferred_element_type=jnp.float32)
  return reference.route(logits, top_k, scoring=scoring, renormalize=renormalize,
                         num_groups=num_groups, top_groups=top_groups, group_score=group_score,
                         correction_bias=correction_bias, scaling_factor=scaling_factor,
                         expert_scale=expert_scale)


def _act(name):
  return reference.activation_fn(name)


def experts_gather(x, ids, w_gate_up, w_down, activation="silu"):
  """Gather each assignment's expert weights, then batched matvecs: y [T, k, H]."""
  I = w_down.shape[2]
  wg = w_gate_up[ids]                      # [T, k, 2I, H]
  gu = jnp.einsum("th,tkoh->tko", x, wg, preferred_element_type=jnp.float32)
  h = (_act(activation)(gu[..., :I]) * gu[..., I:]).astype(x.dtype)
  wd = w_down[ids]                         # [T, k, H, I]
  return jnp.einsum("tki,tkhi->tkh", h, wd, preferred_element_type=jnp.float32).astype(x.dtype)


def experts_ragged(x, ids, w_gate_up, w_down, activation="silu"):
  """Sort assignments by expert, grouped matmul with jax.lax.ragged_dot: y [T, k, H]."""
  T, k = ids.shape
  E = w_gate_up.shape[0]
  I = w_down.shape[2]
  flat = ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  rows = x[order // k]                                          # [T*k, H]
  sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
  gu = jax.lax.ragged_dot(rows, jnp.swapaxes(w_gate_up, 1, 2), sizes,
                          preferred_element_type=jnp.float32)   # [T*k, 2I]
  h = (_act(activation)(gu[:, :I]) * gu[:, I:]).astype(x.dtype)
  y_sorted = jax.lax.ragged_dot(h, jnp.swapaxes(w_down, 1, 2), sizes,
                                preferred_element_type=jnp.float32).astype(x.dtype)
  inv = jnp.argsort(order)
  return y_sorted[inv].reshape(T, k, -1)


def combine(y, weights):
  """out[t] = sum_k weights[t, k] * y[t, k] in f32."""
  return jnp.einsum("tkh,tk->th", y.astype(jnp.float32), weights).astype(y.dtype)
