"""Flax modules around jax_moe.moe_block (needs the extra: pip install 'jax_moe[flax]').

MoE        Flax NNX module.
LinenMoE   Flax linen module.

Both hold the parameters under MoEParams' field names and layout (router_weight
[E, H], w_gate_up [E, 2I, H], w_down [E, H, I], optional correction_bias [E],
expert_scale [E], shared_gate_up [S, 2I_s, H], shared_down [S, H, I_s]), so
`MoEParams(**linen_variables["params"])` and `nnx_module.moe_params()` are the
arguments of moe_block, and params_from_hf output loads into either.
Initializers give O(1) outputs for O(1) inputs (see jax_moe.moe.init_params).

dtype is the computation dtype (default: param_dtype): x and the weights are cast
to it (a no-op when they already have it; otherwise a copy of every expert's
weights per call, so store parameters in the dtype you run in).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

try:
  import flax.linen as linen
  from flax import nnx
except ImportError as e:  # pragma: no cover - exercised only without flax
  raise ImportError("jax_moe.nn needs Flax; install the extra: pip install 'jax_moe[flax]'") \
      from e

from jax_moe.moe import (MoEConfig, MoEParams, init_down, init_gate_up, init_router, moe_block,
                         params_from_hf)

__all__ = ["MoE", "LinenMoE", "params_from_hf"]

_WEIGHTS = ("router_weight", "w_gate_up", "w_down", "shared_gate_up", "shared_down")
_VECTORS = ("correction_bias", "expert_scale")


def _apply(x, params: MoEParams, config: MoEConfig, dtype):
  dtype = jnp.dtype(dtype)
  cast = {n: getattr(params, n).astype(dtype) for n in _WEIGHTS if getattr(params, n) is not None}
  return moe_block(jnp.asarray(x).astype(dtype), params.replace(**cast), config)


class MoE(nnx.Module):
  """An MoE layer (NNX). Call with x [..., hidden]; returns [..., hidden].

  Args:
    hidden, intermediate: H and I (per routed expert).
    config: MoEConfig (E, k, routing, activation, shared experts, implementation).
    shared_intermediate: I_s per shared expert (needed when
      config.num_shared_experts > 0).
    use_correction_bias: add correction_bias [E] (init 0; DeepSeek-V3 updates it
      outside the gradient, so it is an nnx.Param only for checkpointing).
    use_expert_scale: add expert_scale [E] (init 1; Gemma).
    dtype: computation dtype (default param_dtype). param_dtype: storage dtype.
    rngs: nnx.Rngs with a "params" stream.
  """

  def __init__(self, hidden: int, intermediate: int, config: MoEConfig, *,
               shared_intermediate: int = 0, use_correction_bias: bool = False,
               use_expert_scale: bool = False, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(config, MoEConfig):
      raise TypeError(f"MoE: config must be a jax_moe.MoEConfig, got {type(config).__name__}")
    S = config.num_shared_experts
    if S and shared_intermediate < 1:
      raise ValueError(f"MoE: config.num_shared_experts={S} needs shared_intermediate >= 1")
    E, H, I = config.num_experts, hidden, intermediate
    self.config = config
    self.dtype = param_dtype if dtype is None else dtype
    self.router_weight = nnx.Param(init_router(rngs.params(), (E, H), param_dtype))
    self.w_gate_up = nnx.Param(init_gate_up(rngs.params(), (E, 2 * I, H), param_dtype))
    self.w_down = nnx.Param(init_down(rngs.params(), (E, H, I), param_dtype))
    self.correction_bias = (nnx.Param(jnp.zeros((E,), jnp.float32))
                            if use_correction_bias else None)
    self.expert_scale = nnx.Param(jnp.ones((E,), jnp.float32)) if use_expert_scale else None
    if S:
      Is = shared_intermediate
      self.shared_gate_up = nnx.Param(init_gate_up(rngs.params(), (S, 2 * Is, H), param_dtype))
      self.shared_down = nnx.Param(init_down(rngs.params(), (S, H, Is), param_dtype))
    else:
      self.shared_gate_up = self.shared_down = None

  def moe_params(self) -> MoEParams:
    """The current parameter values as moe_block's MoEParams."""
    get = lambda v: None if v is None else v[...]  # noqa: E731
    return MoEParams(**{n: get(getattr(self, n)) for n in _WEIGHTS + _VECTORS})

  def load(self, params: MoEParams) -> None:
    """Set the values from a MoEParams (e.g. params_from_hf); shapes must match."""
    for n in _WEIGHTS + _VECTORS:
      var, val = getattr(self, n), getattr(params, n)
      if (var is None) != (val is None):
        raise ValueError(f"MoE.load: params.{n} is {'missing' if val is None else 'given'} but "
                         f"this module was built {'with' if var is not None else 'without'} it")
      if var is None:
        continue
      if tuple(var[...].shape) != tuple(val.shape):
        raise ValueError(f"MoE.load: params.{n} has shape {tuple(val.shape)}, the module's is "
                         f"{tuple(var[...].shape)}")
      var[...] = jnp.asarray(val, var[...].dtype)

  def __call__(self, x):
    return _apply(x, self.moe_params(), self.config, self.dtype)


class LinenMoE(linen.Module):
  """An MoE layer (linen). Call with x [..., H]; H is taken from x at init.

  Fields as MoE's: config, intermediate, shared_intermediate, use_correction_bias,
  use_expert_scale, dtype, param_dtype. The "params" collection holds MoEParams'
  fields by name.
  """
  config: MoEConfig
  intermediate: int
  shared_intermediate: int = 0
  use_correction_bias: bool = False
  use_expert_scale: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @linen.compact
  def __call__(self, x):
    cfg = self.config
    if not isinstance(cfg, MoEConfig):
      raise TypeError(f"LinenMoE: config must be a jax_moe.MoEConfig, got {type(cfg).__name__}")
    E, H, I, S = cfg.num_experts, jnp.shape(x)[-1], self.intermediate, cfg.num_shared_experts
    if S and self.shared_intermediate < 1:
      raise ValueError(f"LinenMoE: config.num_shared_experts={S} needs shared_intermediate >= 1")
    pd = self.param_dtype
    p = dict(
        router_weight=self.param("router_weight", init_router, (E, H), pd),
        w_gate_up=self.param("w_gate_up", init_gate_up, (E, 2 * I, H), pd),
        w_down=self.param("w_down", init_down, (E, H, I), pd))
    if self.use_correction_bias:
      p["correction_bias"] = self.param("correction_bias", lambda _, s: jnp.zeros(s, jnp.float32),
                                        (E,))
    if self.use_expert_scale:
      p["expert_scale"] = self.param("expert_scale", lambda _, s: jnp.ones(s, jnp.float32), (E,))
    if S:
      Is = self.shared_intermediate
      p["shared_gate_up"] = self.param("shared_gate_up", init_gate_up, (S, 2 * Is, H), pd)
      p["shared_down"] = self.param("shared_down", init_down, (S, H, Is), pd)
    return _apply(x, MoEParams(**p), cfg, pd if self.dtype is None else self.dtype)
