"""jax_moe.nn: the Flax NNX and linen modules (init, apply, parity with moe_block,
O(1) outputs at init, loading HF-converted params), and that `import jax_moe` works
without Flax while `import jax_moe.nn` then says how to get it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

from jax_moe import MoEConfig, MoEParams, moe_block, params_from_hf  # noqa: E402
from jax_moe import nn as jnn  # noqa: E402
from jax_moe.shapes import SHAPES  # noqa: E402
from helpers import assert_close, moe_inputs, rng  # noqa: E402


def ds_small():
  return SHAPES["deepseek_v3"].small_stand_in()


def _x(shape_tokens, H, dtype=jnp.float32):
  return jnp.asarray(rng().normal(size=shape_tokens + (H,)), dtype)


@pytest.mark.parametrize("impl", ["gemv", "grouped"])
def test_nnx(platform, impl):
  s = ds_small()
  cfg = MoEConfig.from_shape(s, implementation=impl)
  m = jnn.MoE(s.hidden, s.intermediate, cfg, shared_intermediate=s.shared_intermediate,
              use_correction_bias=True, use_expert_scale=True, rngs=nnx.Rngs(0))
  p = m.moe_params()
  assert p.w_gate_up.shape == (s.num_experts, 2 * s.intermediate, s.hidden)
  assert p.w_down.shape == (s.num_experts, s.hidden, s.intermediate)
  assert p.shared_gate_up.shape == (1, 2 * s.shared_intermediate, s.hidden)
  assert p.correction_bias.dtype == jnp.float32 and p.expert_scale.dtype == jnp.float32
  x = _x((3, 5), s.hidden)
  out = nnx.jit(lambda m, x: m(x))(m, x)
  assert out.shape == x.shape and out.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(moe_block)(x, p, cfg)))
  assert 0.05 < float(jnp.std(out)) < 5.0  # O(1) out for O(1) in at init
  ref = moe_block(x, p, cfg.replace(implementation="reference"))
  assert_close(out, ref, jnp.float32)
  params = nnx.state(m, nnx.Param)
  assert len(jax.tree.leaves(params)) == 7


def test_nnx_dtype_and_load(platform):
  s = SHAPES["qwen3"].small_stand_in()
  cfg = MoEConfig.from_shape(s)
  m = jnn.MoE(s.hidden, s.intermediate, cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
  x = _x((4,), s.hidden)
  out = m(x)
  assert out.dtype == jnp.bfloat16  # the computation dtype (param_dtype by default)
  x2, loaded = moe_inputs(rng(), s, 4, jnp.bfloat16)
  m.load(loaded)
  np.testing.assert_array_equal(np.asarray(m(x2).astype(jnp.float32)),
                                np.asarray(moe_block(x2, loaded, cfg).astype(jnp.float32)))
  with pytest.raises(ValueError, match="w_down"):
    m.load(loaded.replace(w_down=loaded.w_down[..., :-1]))
  with pytest.raises(ValueError, match="correction_bias"):
    m.load(loaded.replace(correction_bias=jnp.zeros((s.num_experts,))))
  f32 = jnn.MoE(s.hidden, s.intermediate, cfg, dtype=jnp.float32, param_dtype=jnp.bfloat16,
                rngs=nnx.Rngs(1))
  assert f32(x).dtype == jnp.float32


@pytest.mark.parametrize("impl", ["gemv", "grouped"])
def test_linen(platform, impl):
  s = ds_small()
  cfg = MoEConfig.from_shape(s, implementation=impl)
  mod = jnn.LinenMoE(cfg, s.intermediate, shared_intermediate=s.shared_intermediate,
                     use_correction_bias=True)
  x = _x((2, 4), s.hidden)
  variables = mod.init(jax.random.PRNGKey(0), x)
  names = set(variables["params"])
  assert names == {"router_weight", "w_gate_up", "w_down", "correction_bias", "shared_gate_up",
                   "shared_down"}
  assert names <= {f.name for f in dataclasses.fields(MoEParams)}
  out = jax.jit(mod.apply)(variables, x)
  assert out.shape == x.shape and out.dtype == x.dtype
  params = MoEParams(**variables["params"])
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(moe_block)(x, params, cfg)))
  assert 0.05 < float(jnp.std(out)) < 5.0


def test_linen_hf_params(platform):
  """A module's params can come straight from params_from_hf."""
  r = rng()
  E, H, I, k = 8, 64, 48, 2
  gate = [np.asarray(r.normal(size=(I, H)) / 8, np.float32) for _ in range(E)]
  up = [np.asarray(r.normal(size=(I, H)) / 8, np.float32) for _ in range(E)]
  down = [np.asarray(r.normal(size=(H, I)) / 7, np.float32) for _ in range(E)]
  router = np.asarray(r.normal(size=(E, H)) / 8, np.float32)
  p = params_from_hf(router, gate, up, down)
  cfg = MoEConfig(E, k)
  mod = jnn.LinenMoE(cfg, I)
  x = _x((5,), H)
  variables = {"params": {n: v for n, v in dataclasses.asdict(p).items() if v is not None}}
  jax.tree.map(lambda a, b: None if a.shape == b.shape else pytest.fail("shape"),
               variables, mod.init(jax.random.PRNGKey(0), x))
  np.testing.assert_array_equal(np.asarray(mod.apply(variables, x)),
                                np.asarray(moe_block(x, p, cfg)))


def test_bad_module_args():
  cfg = MoEConfig.from_shape(ds_small())
  with pytest.raises(ValueError, match="shared_intermediate"):
    jnn.MoE(64, 48, cfg, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="config"):
    jnn.MoE(64, 48, {"num_experts": 8}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="shared_intermediate"):
    jnn.LinenMoE(cfg, 48).init(jax.random.PRNGKey(0), jnp.ones((1, 64)))


def test_import_without_flax():
  code = (
      "import sys\n"
      "sys.modules['flax'] = None\n"  # makes `import flax` raise ImportError
      "import jax_moe\n"
      "assert hasattr(jax_moe, 'moe_block')\n"
      "try:\n"
      "  import jax_moe.nn\n"
      "except ImportError as e:\n"
      "  assert 'jax_moe[flax]' in str(e), e\n"
      "  print('ok')\n")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=None, timeout=120)
  assert res.returncode == 0 and "ok" in res.stdout, res.stderr
