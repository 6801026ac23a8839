"""jax_moe: Mixture-of-Experts layers for JAX with CUDA kernels as XLA FFI primitives.

Public API (see DESIGN.md):
  route(x, top_k, ...)                    -> (weights f32 [T, k], ids int32 [T, k])
  expert_gemv(x, ids, w_gate_up, w_down)  -> y [T, k, H]
  expert_gemv_combine(x, ids, weights, w_gate_up, w_down) -> out [T, H] (the two fused)
  combine(y, weights, index=None)         -> out [T, H]
  moe_block(x, params, config)            -> out [..., H]
"""

from jax_moe import _ffi  # registers the FFI targets  # noqa: F401
from jax_moe import reference
from jax_moe._ffi import build_info
from jax_moe.combine import combine
from jax_moe.expert_gemv import expert_gemv, expert_gemv_combine
from jax_moe.moe import (MoEConfig, MoEParams, example_params, init_params, moe_block,
                         params_from_hf)
from jax_moe.route import route

__all__ = ["route", "expert_gemv", "expert_gemv_combine", "combine", "reference", "build_info", "moe_block",
           "MoEConfig", "MoEParams", "init_params", "example_params", "params_from_hf"]
__version__ = "0.1.0"
