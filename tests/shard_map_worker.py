"""Runs jax_moe under shard_map and GSPMD jit on 4 host CPU devices and prints one
JSON line per case; tests/test_shard_map.py starts it in a fresh process, because
the device count (XLA_FLAGS) must be set before jax starts and the test session's
jax already has one CPU device.

Each case returns the relative error of the sharded result against moe_block's
"reference" on the whole, unsharded input, the tolerance of its dtype, and (where
routing is compared) whether the ids are exactly equal. The inputs are fresh and
tie-free (helpers.moe_inputs).

Expert parallelism is the recipe in README.md ("Under shard_map"): every shard
routes every token with the full router, shifts the ids by its first expert so that
the other shards' experts fall outside [0, E_local) (zero rows, DESIGN.md), runs its
experts and sums the k slots in f32, and the shards' partial sums are added by psum.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax_moe  # noqa: E402
from helpers import moe_inputs, rel_err, rng, tol  # noqa: E402
from jax_moe.moe import MoEConfig, moe_block  # noqa: E402
from jax_moe.shapes import SHAPES  # noqa: E402

DEVICES = 4
T = 16  # 4 tokens per shard


def shard_map(f, mesh, in_specs, out_specs):
  sm = getattr(jax, "shard_map", None)
  if sm is None:  # jax < 0.7
    from jax.experimental.shard_map import shard_map as sm
  return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def reference(x, params, config):
  return jax.jit(moe_block)(x, params, config.replace(implementation="reference"))


def result(out, ref, dtype, **extra):
  out = np.asarray(jnp.asarray(out, jnp.float32))
  ref = np.asarray(jnp.asarray(ref, jnp.float32))
  return dict(err=rel_err(out, ref), tol=tol(dtype), shape_ok=out.shape == ref.shape, **extra)


def route_kwargs(params, config):
  return dict(scoring=config.scoring, renormalize=config.renormalize,
              num_groups=config.num_groups, top_groups=config.top_groups,
              group_score=config.group_score, correction_bias=params.correction_bias,
              scaling_factor=config.scaling_factor, expert_scale=params.expert_scale)


def expert_parallel_block(x, params, config, axis):
  """README's recipe, called inside shard_map: params' routed expert weights hold
  this shard's E_local experts (experts [s * E_local, (s + 1) * E_local) on shard s);
  the router, bias and scale are whole (replicated)."""
  weights, ids = jax_moe.route(x, config.top_k, router_weight=params.router_weight,
                               **route_kwargs(params, config))
  e_local = params.w_gate_up.shape[0]
  local_ids = ids - jax.lax.axis_index(axis) * e_local  # others' experts: zero rows
  y = jax_moe.expert_gemv(x, local_ids, params.w_gate_up, params.w_down,
                          activation=config.activation)
  part = jax_moe.combine(y, weights, out_dtype=jnp.float32)
  return jax.lax.psum(part, axis).astype(x.dtype)


def case_data_parallel(mesh, name, impl, method, dtype):
  """moe_block on each shard's tokens, params replicated."""
  shape = SHAPES[name].small_stand_in()
  x, params = moe_inputs(rng(), shape, T, dtype)
  config = MoEConfig.from_shape(shape, implementation=impl, grouped_method=method)
  f = jax.jit(shard_map(lambda x: moe_block(x, params, config), mesh, P("d"), P("d")))
  return result(f(x), reference(x, params, config), dtype)


def case_data_parallel_scan(mesh, name, dtype, steps=4):
  """A jitted decode loop (lax.scan over steps, residual + moe_block) inside
  shard_map, against the same loop on the reference path."""
  shape = SHAPES[name].small_stand_in()
  x, params = moe_inputs(rng(), shape, T, dtype)
  config = MoEConfig.from_shape(shape)

  def loop(x, cfg):
    def step(h, _):
      return h + moe_block(h, params, cfg), None
    return jax.lax.scan(step, x, None, length=steps)[0]

  f = jax.jit(shard_map(lambda x: loop(x, config), mesh, P("d"), P("d")))
  ref = jax.jit(lambda x: loop(x, config.replace(implementation="reference")))(x)
  return result(f(x), ref, dtype)


def case_route_data_parallel(mesh, name, dtype):
  """route with the router matmul, tokens sharded: ids exactly the unsharded ones."""
  shape = SHAPES[name].small_stand_in()
  x, params = moe_inputs(rng(), shape, T, dtype)
  config = MoEConfig.from_shape(shape)
  kw = route_kwargs(params, config)
  fn = lambda x: jax_moe.route(x, config.top_k, router_weight=params.router_weight, **kw)  # noqa: E731
  w, ids = jax.jit(shard_map(fn, mesh, P("d"), (P("d"), P("d"))))(x)
  w_ref, ids_ref = jax.jit(fn)(x)
  return result(w, w_ref, jnp.float32, ids_equal=bool(np.array_equal(ids, ids_ref)))


def case_expert_parallel(mesh, name, dtype):
  shape = SHAPES[name].small_stand_in()
  x, params = moe_inputs(rng(), shape, T, dtype)
  params = params.replace(shared_gate_up=None, shared_down=None)  # the recipe's routed part
  config = MoEConfig.from_shape(shape, num_shared_experts=0)
  specs = jax.tree.map(lambda _: P(), params)
  specs = specs.replace(w_gate_up=P("d"), w_down=P("d"))
  f = jax.jit(shard_map(lambda x, p: expert_parallel_block(x, p, config, "d"), mesh,
                        (P(), specs), P()))
  return result(f(x, params), reference(x, params, config), dtype)


def case_gspmd(mesh, name, dtype):
  """Plain jit of moe_block on an x sharded over tokens (no shard_map): XLA's
  partitioner places the custom calls; the result must not change."""
  shape = SHAPES[name].small_stand_in()
  x, params = moe_inputs(rng(), shape, T, dtype)
  config = MoEConfig.from_shape(shape)
  xs = jax.device_put(x, NamedSharding(mesh, P("d")))
  return result(jax.jit(moe_block)(xs, params, config), reference(x, params, config), dtype)


def cases(mesh):
  out = {}
  for name in ("qwen3", "deepseek_v3", "gemma4"):
    for impl, method in (("auto", "auto"), ("gemv", "auto"), ("grouped", "capacity"),
                         ("grouped", "dense")):
      for dtype in (jnp.float32, jnp.bfloat16):
        out[f"data_parallel-{name}-{impl}-{method}-{jnp.dtype(dtype).name}"] = (
            lambda n=name, i=impl, m=method, d=dtype: case_data_parallel(mesh, n, i, m, d))
    out[f"scan-{name}"] = lambda n=name: case_data_parallel_scan(mesh, n, jnp.float32)
    out[f"route-{name}"] = lambda n=name: case_route_data_parallel(mesh, n, jnp.float32)
    out[f"gspmd-{name}"] = lambda n=name: case_gspmd(mesh, n, jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
      out[f"expert_parallel-{name}-{jnp.dtype(dtype).name}"] = (
          lambda n=name, d=dtype: case_expert_parallel(mesh, n, d))
  out["expert_parallel-mixtral-float32"] = lambda: case_expert_parallel(mesh, "mixtral",
                                                                        jnp.float32)
  return out


def main() -> int:
  assert len(jax.devices("cpu")) == DEVICES, jax.devices("cpu")
  mesh = Mesh(np.array(jax.devices("cpu")), ("d",))
  with jax.default_device(jax.devices("cpu")[0]):
    for name, fn in cases(mesh).items():
      try:
        print(json.dumps(dict(case=name, **fn())), flush=True)
      except Exception as e:  # reported per case, so one failure names itself
        print(json.dumps(dict(case=name, error=f"{type(e).__name__}: {e}")), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
