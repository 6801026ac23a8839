"""jax_moe.expert_gemv against reference.expert_gemv on fresh random data: small
stand-ins everywhere, the real model shapes on GPU; odd sizes, dropped ids,
repeated experts, every activation and dtype, vmap, scan, determinism, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import reference
from jax_moe.shapes import SHAPES
from helpers import assert_close, distinct_ids, make_weights, poison_device_memory, rng

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
dtype_id = lambda d: jnp.dtype(d).name  # noqa: E731


def run_and_check(x, ids, wgu, wd, activation="silu", factor=1.0, config=None):
  poison_device_memory()
  y = jax.jit(lambda *a: jax_moe.expert_gemv(*a, activation=activation, _config=config))(
      x, ids, wgu, wd)
  yr = reference.expert_gemv(x.reshape(-1, x.shape[-1]), ids.reshape(-1, ids.shape[-1]),
                             wgu, wd, activation=activation)
  assert y.shape == ids.shape + (x.shape[-1],) and y.dtype == x.dtype
  y2 = np.asarray(y.astype(jnp.float32)).reshape(yr.shape)
  if yr.size:
    assert_close(y2, yr.astype(jnp.float32), x.dtype, factor=factor)
  return y2


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_small(platform, dtype, activation):
  r = rng()
  T, H, I, E, k = 8, 64, 48, 16, 4
  x = jnp.asarray(r.normal(size=(T, H)), dtype)
  wgu, wd = make_weights(r, E, H, I, dtype)
  run_and_check(x, jnp.asarray(distinct_ids(r, T, k, E)), wgu, wd, activation)


@pytest.mark.parametrize("T,H,I,E,k", [
    (0, 64, 48, 16, 4),     # no tokens
    (1, 64, 48, 16, 1),     # k = 1
    (3, 64, 48, 1, 1),      # E = 1
    (5, 40, 24, 8, 2),      # multiples of 8 but not of 32 (K tail) or 16 (row tail)
    (4, 36, 20, 8, 2),      # not multiples of 8: generic path on GPU
    (3, 33, 7, 4, 3),       # odd everything
    (33, 64, 32, 16, 4),    # more tokens than one pass of 32
    (12, 128, 64, 64, 8),   # 9..16 tokens: two n-tiles
])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_sizes(platform, T, H, I, E, k, dtype):
  r = rng()
  x = jnp.asarray(r.normal(size=(T, H)), dtype)
  wgu, wd = make_weights(r, E, H, I, dtype)
  ids = distinct_ids(r, T, k, E) if k <= E else r.integers(0, E, size=(T, k)).astype(np.int32)
  run_and_check(x, jnp.asarray(ids), wgu, wd)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=dtype_id)
def test_dropped_and_repeated_ids(platform, dtype):
  """ids -1 and E give zero rows; an expert repeated within a token is computed twice;
  experts with no token are skipped."""
  r = rng()
  T, H, I, E, k = 6, 64, 48, 16, 4
  x = jnp.asarray(r.normal(size=(T, H)), dtype)
  wgu, wd = make_weights(r, E, H, I, dtype)
  ids = distinct_ids(r, T, k, E)
  ids[0, 1] = -1
  ids[1, 3] = E
  ids[2, :] = [5, 5, 5, -7]
  ids[3, :] = [2**31 - 1, -2**31, 0, 0]
  y = run_and_check(x, jnp.asarray(ids), wgu, wd)
  assert np.all(y[0, 1] == 0) and np.all(y[1, 3] == 0) and np.all(y[2, 3] == 0)
  assert np.all(y[3, :2] == 0)
  np.testing.assert_array_equal(y[2, 0], y[2, 1])
  assert np.any(y[2, 0] != 0)


def test_all_tokens_on_one_expert(platform):
  """Every assignment on one expert (several passes over its weights on GPU)."""
  r = rng()
  T, H, I, E, k = 70, 64, 48, 8, 1
  x = jnp.asarray(r.normal(size=(T, H)), jnp.bfloat16)
  wgu, wd = make_weights(r, E, H, I, jnp.bfloat16)
  run_and_check(x, jnp.full((T, k), 3, jnp.int32), wgu, wd)


def test_large_token_count(platform):
  """Correct (not fast) beyond the decode sizes the kernel is built for."""
  r = rng()
  T, H, I, E, k = 300, 64, 32, 16, 4
  x = jnp.asarray(r.normal(size=(T, H)), jnp.bfloat16)
  wgu, wd = make_weights(r, E, H, I, jnp.bfloat16)
  run_and_check(x, jnp.asarray(distinct_ids(r, T, k, E)), wgu, wd)


def test_leading_dims_and_vmap(platform):
  r = rng()
  H, I, E, k = 64, 48, 16, 4
  x = r.normal(size=(2, 3, 5, H))
  ids = distinct_ids(r, 30, k, E).reshape(2, 3, 5, k)
  wgu, wd = make_weights(r, E, H, I, jnp.float32)
  xj, idj = jnp.asarray(x, jnp.float32), jnp.asarray(ids)
  yr = reference.expert_gemv(xj.reshape(-1, H), idj.reshape(-1, k), wgu, wd)
  y_lead = jax_moe.expert_gemv(xj, idj, wgu, wd)
  f = jax.jit(jax.vmap(jax.vmap(lambda a, b: jax_moe.expert_gemv(a, b, wgu, wd))))
  y_vmap = f(xj, idj)
  for y in (y_lead, y_vmap):
    assert y.shape == (2, 3, 5, k, H)
    assert_close(np.asarray(y).reshape(-1, k, H), yr, jnp.float32)
  # only ids batched: x is broadcast
  ids_b = jnp.asarray(np.stack([distinct_ids(r, 5, k, E) for _ in range(3)]))
  x5 = xj[0, 0]
  yb = jax.vmap(lambda b: jax_moe.expert_gemv(x5, b, wgu, wd))(ids_b)
  for i in range(3):
    assert_close(yb[i], reference.expert_gemv(x5, ids_b[i], wgu, wd), jnp.float32)


def test_vmap_over_weights(platform):
  """Batched weights cannot fold into tokens: the rule maps over the batch."""
  r = rng()
  H, I, E, k, T = 32, 16, 4, 2, 3
  x = jnp.asarray(r.normal(size=(T, H)), jnp.float32)
  ids = jnp.asarray(distinct_ids(r, T, k, E))
  ws = [make_weights(r, E, H, I, jnp.float32) for _ in range(2)]
  wgu = jnp.stack([w[0] for w in ws])
  wd = jnp.stack([w[1] for w in ws])
  y = jax.vmap(lambda a, b: jax_moe.expert_gemv(x, ids, a, b))(wgu, wd)
  for i in range(2):
    assert_close(y[i], reference.expert_gemv(x, ids, wgu[i], wd[i]), jnp.float32)


def test_scan_decode_loop(platform):
  r = rng()
  H, I, E, k, T, steps = 64, 48, 16, 4, 2, 6
  wgu, wd = make_weights(r, E, H, I, jnp.bfloat16)
  ids = jnp.asarray(np.stack([distinct_ids(r, T, k, E) for _ in range(steps)]))
  x0 = jnp.asarray(r.normal(size=(T, H)), jnp.bfloat16)

  def step(expert_fn):
    def body(x, idx):
      y = expert_fn(x, idx, wgu, wd)
      x = (x.astype(jnp.float32) + y.astype(jnp.float32).mean(1)).astype(jnp.bfloat16)
      return x, y
    return body

  _, ys = jax.jit(lambda x0, ids: jax.lax.scan(step(jax_moe.expert_gemv), x0, ids))(x0, ids)
  _, yr = jax.lax.scan(step(reference.expert_gemv), x0, ids)
  assert_close(ys.astype(jnp.float32), yr.astype(jnp.float32), jnp.bfloat16, factor=2)


def test_deterministic(platform):
  r = rng()
  T, H, I, E, k = 16, 256, 128, 32, 8
  x = jnp.asarray(r.normal(size=(T, H)), jnp.bfloat16)
  wgu, wd = make_weights(r, E, H, I, jnp.bfloat16)
  ids = jnp.asarray(distinct_ids(r, T, k, E))
  f = jax.jit(jax_moe.expert_gemv)
  y0 = np.asarray(f(x, ids, wgu, wd).astype(jnp.float32))
  for _ in range(5):
    np.testing.assert_array_equal(np.asarray(f(x, ids, wgu, wd).astype(jnp.float32)), y0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=lambda d: jnp.dtype(d).name)
def test_cpu_grouping_independent(dtype):
  """The CPU handler groups the assignments by expert and spreads the experts over
  XLA's intra-op threads (csrc/common/parallel.h): uneven loads (one expert takes
  every token, 60 others one or two), dropped ids, repeated runs bitwise equal, and
  each token's rows bitwise equal to a call with that token alone, so neither the
  grouping nor the threads change a result."""
  r = rng()
  T, H, I, E, k = 40, 72, 40, 64, 3
  x = jnp.asarray(r.normal(size=(T, H)), dtype)
  wgu, wd = make_weights(r, E, H, I, dtype)
  ids = np.stack([np.concatenate([[0], r.choice(np.arange(1, E), k - 1, replace=False)])
                  for _ in range(T)]).astype(np.int32)
  ids[3, 1], ids[7, 2] = -1, E  # dropped: zero rows
  ids = jnp.asarray(ids)
  with jax.default_device(jax.devices("cpu")[0]):
    f = jax.jit(jax_moe.expert_gemv)
    y0 = np.asarray(f(x, ids, wgu, wd).astype(jnp.float32))
    for _ in range(5):
      np.testing.assert_array_equal(np.asarray(f(x, ids, wgu, wd).astype(jnp.float32)), y0)
    for t in (0, 3, 7, 39):
      one = np.asarray(f(x[t:t + 1], ids[t:t + 1], wgu, wd).astype(jnp.float32))
      np.testing.assert_array_equal(one[0], y0[t])
    assert not y0[3, 1].any() and not y0[7, 2].any()
    ref = np.asarray(reference.expert_gemv(x, ids, wgu, wd).astype(jnp.float32))
    assert_close(y0, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name,T", [(n, T) for n in ("gemma4", "qwen3", "mixtral", "deepseek_v3")
                                    for T in (1, 3, 8)] + [("mixtral", 32)])
def test_model_shapes_gpu(name, T):
  """The real layer sizes (GPU only: DeepSeek-V3's experts alone are 22.5 GB).
  Mixtral T=32 puts about 8 assignments on each of its 8 experts, some above 8: the
  wide ring's segments of 16 at the real size."""
  from conftest import gpu_available
  if not gpu_available():
    pytest.skip("no GPU")
  s = SHAPES[name]
  key = jax.random.PRNGKey(T)
  k1, k2, k3 = jax.random.split(key, 3)
  with jax.default_device(jax.devices("gpu")[0]):
    E, H, I, k = s.num_experts, s.hidden, s.intermediate, s.top_k
    # drawn in bf16 directly: DeepSeek-V3's 22.5 GB must not go through f32
    wgu = jax.random.normal(k1, (E, 2 * I, H), jnp.bfloat16) * jnp.bfloat16(1 / np.sqrt(H))
    wd = jax.random.normal(k2, (E, H, I), jnp.bfloat16) * jnp.bfloat16(1 / np.sqrt(I))
    x = jax.random.normal(k3, (T, H), jnp.float32).astype(jnp.bfloat16)
    r = rng()
    ids = jnp.asarray(distinct_ids(r, T, k, E))
    for variant in (0, 1, 5, 6, 7, 8):  # the heuristics' choice, plain, stream, split, group
      run_and_check(x, ids, wgu, wd, s.activation, config=dict(kernel_variant=variant))


# ---- bad input ---------------------------------------------------------------------

def _ok():
  return (jnp.ones((3, 16), jnp.float32), jnp.zeros((3, 2), jnp.int32),
          jnp.ones((4, 8, 16), jnp.float32), jnp.ones((4, 16, 4), jnp.float32))


def _with(i, v):
  a = list(_ok())
  a[i] = v
  return a


@pytest.mark.parametrize("args,kw,exc,match", [
    (_with(0, jnp.ones((16,))), {}, ValueError, "x must have rank"),
    (_with(0, jnp.ones((3, 16), jnp.int32)), {}, TypeError, "x must be float32"),
    (_with(1, jnp.zeros((3, 2), jnp.int64) if jax.config.x64_enabled else
           jnp.zeros((3, 2), jnp.int16)), {}, TypeError, "ids must be int32"),
    (_with(1, jnp.zeros((4, 2), jnp.int32)), {}, ValueError, "ids must be"),
    (_with(2, jnp.ones((4, 8), jnp.float32)), {}, ValueError, "w_gate_up must have rank"),
    (_with(2, jnp.ones((4, 7, 16), jnp.float32)), {}, ValueError, "w_gate_up dim 1"),
    (_with(2, jnp.ones((4, 8, 12), jnp.float32)), {}, ValueError, "w_gate_up has shape"),
    (_with(3, jnp.ones((4, 16, 5), jnp.float32)), {}, ValueError, "w_down must have shape"),
    (_with(3, jnp.ones((5, 16, 4), jnp.float32)), {}, ValueError, "w_down must have shape"),
    (_with(3, jnp.ones((4, 16), jnp.float32)), {}, ValueError, "w_down must have rank"),
    (_with(2, jnp.ones((4, 8, 16), jnp.bfloat16)), {}, TypeError, "w_gate_up dtype"),
    (_with(3, jnp.ones((4, 16, 4), jnp.float16)), {}, TypeError, "w_down dtype"),
    (_ok(), {"activation": "relu"}, ValueError, "activation"),
    (_ok(), {"shared_gate_up": jnp.ones((1, 8, 16), jnp.float32)}, ValueError,
     "give both shared_gate_up and shared_down"),
    (_ok(), {"shared_gate_up": jnp.ones((1, 6, 16), jnp.float32),
             "shared_down": jnp.ones((1, 16, 3), jnp.float32)}, ValueError,
     "shared_gate_up must be"),
    (_ok(), {"shared_gate_up": jnp.ones((1, 8, 16), jnp.float32),
             "shared_down": jnp.ones((2, 16, 4), jnp.float32)}, ValueError,
     "shared_gate_up must be"),
    (_ok(), {"shared_gate_up": jnp.ones((8, 16), jnp.float32),
             "shared_down": jnp.ones((1, 16, 4), jnp.float32)}, ValueError,
     "shared_gate_up must have rank"),
    (_ok(), {"shared_gate_up": jnp.ones((1, 8, 16), jnp.bfloat16),
             "shared_down": jnp.ones((1, 16, 4), jnp.float32)}, TypeError,
     "shared_gate_up dtype"),
])
def test_bad_input(args, kw, exc, match):
  with pytest.raises(exc, match=match):
    jax_moe.expert_gemv(*args, **kw)


def test_handler_revalidates():
  from jax_moe.expert_gemv import expert_gemv_p
  x, ids, wgu, _ = _ok()
  wd_bad = jnp.ones((4, 16, 3), jnp.float32)  # I mismatch, bypassing the wrapper
  no_sgu, no_sd = jnp.zeros((0, 8, 16), jnp.float32), jnp.zeros((0, 16, 4), jnp.float32)
  no_w = jnp.zeros((0, ids.shape[1]), jnp.float32)
  bind = jax.jit(lambda *a: expert_gemv_p.bind(*a, activation="silu", token_tiles=1,
                                               k_split_gate_up=1, k_split_down=1,
                                               kernel_variant=0, combine=0))
  with pytest.raises(Exception, match="w_down must be"):
    bind(x, ids, wgu, wd_bad, no_sgu, no_sd, no_w)[0].block_until_ready()
  wd = jnp.ones((4, 16, 4), jnp.float32)
  with pytest.raises(Exception, match="shared_gate_up must be"):  # shared I mismatch
    bind(x, ids, wgu, wd, jnp.zeros((1, 6, 16), jnp.float32),
         jnp.zeros((1, 16, 3), jnp.float32),
         jnp.zeros((0, ids.shape[1] + 1), jnp.float32))[0].block_until_ready()


@pytest.mark.parametrize("variant", [1, 3, 4], ids=["direct", "direct_pf", "direct_pf8"])
@pytest.mark.parametrize("k_split", [1, 2, 4, 8])
@pytest.mark.parametrize("token_tiles", [1, 2, 4])
def test_kernel_configs(platform, variant, k_split, token_tiles):
  """Every CUDA kernel configuration the heuristics can pick (on CPU the config is
  ignored), on sizes with K and row tails and experts that need several passes."""
  r = rng()
  T, H, I, E, k = 20, 72, 40, 4, 2
  x = jnp.asarray(r.normal(size=(T, H)), jnp.bfloat16)
  wgu, wd = make_weights(r, E, H, I, jnp.bfloat16)
  ids = distinct_ids(r, T, k, E)
  ids[0, 0] = -1
  cfg = dict(kernel_variant=variant, token_tiles=token_tiles, k_split_gate_up=k_split,
             k_split_down=k_split)
  poison_device_memory()
  y = jax.jit(lambda *a: jax_moe.expert_gemv(*a, _config=cfg))(x, jnp.asarray(ids), wgu, wd)
  yr = reference.expert_gemv(x, jnp.asarray(ids), wgu, wd)
  assert_close(y.astype(jnp.float32), yr.astype(jnp.float32), jnp.bfloat16)


@pytest.mark.parametrize("T,H,I,E,k,dtype,hot", [
    (20, 72, 40, 4, 2, jnp.bfloat16, False),  # K and row tails; experts of > 8 assignments
    (70, 64, 48, 8, 1, jnp.bfloat16, True),   # 70 assignments on one expert: 9 segments
    (200, 64, 48, 8, 2, jnp.bfloat16, True),  # 400 on one expert: runs of 8, 8, ..., 2 segments
    (64, 128, 64, 64, 8, jnp.bfloat16, "zipf"),  # skewed: runs of 1 to several segments
    (3, 2816, 704, 128, 8, jnp.float16, False),  # Gemma-4 sizes: 3 stages per gate_up row
    (9, 1040, 1032, 16, 4, jnp.bfloat16, False),  # 2 stages each phase, last one short
    (64, 128, 64, 1024, 8, jnp.bfloat16, False),  # the largest T*k and E it takes
    (100, 64, 32, 16, 8, jnp.bfloat16, False),    # T*k = 800 > 512: falls back to variant 4
    (40, 64, 24, 4, 2, jnp.bfloat16, "fuzz"),     # ids in [-3, E + 3): most dropped
    (52, 64, 48, 4, 1, jnp.bfloat16, "edges"),    # experts of 16, 17, 8 and 9 assignments
])
@pytest.mark.parametrize("variant", [5, 6])
def test_stream_kernel(platform, T, H, I, E, k, dtype, hot, variant):
  """Variants 5 and 6 (csrc/kernels/expert_gemv_stream.cuh, ring slots of 768 and 1024
  columns; other platforms ignore them): ids with -1 and E (zero rows), segments of
  <= 8 (v5) or <= 16 (v6) assignments and runs of up to 8 segments of one expert (the
  unit order), stage tails; bitwise equal over repeated runs."""
  r = rng()
  x = jnp.asarray(r.normal(size=(T, H)), dtype)
  wgu, wd = make_weights(r, E, H, I, dtype)
  if hot == "fuzz":
    ids = r.integers(-3, E + 3, size=(T, k)).astype(np.int32)
  elif hot == "zipf":  # k distinct experts per token, expert q drawn with weight 1/(q+1)
    p = 1.0 / np.arange(1, E + 1)
    ids = np.stack([r.choice(E, size=k, replace=False, p=p / p.sum()) for _ in range(T)])
    ids = ids.astype(np.int32)
    assert np.bincount(ids.ravel(), minlength=E).max() > 16  # some runs of 3+ segments
  elif hot == "edges":  # around both segment sizes (8 narrow ring, 16 wide ring)
    ids = np.repeat(np.arange(4), [16, 17, 8, 9])
    ids = np.concatenate([[0], r.permutation(ids), [0]]).reshape(T, k).astype(np.int32)
  else:
    ids = np.full((T, k), 5, np.int32) if hot else distinct_ids(r, T, k, E)
  ids[0, 0] = -1
  ids[T - 1, k - 1] = E
  cfg = dict(kernel_variant=variant)
  y0 = run_and_check(x, jnp.asarray(ids), wgu, wd, config=cfg)
  assert np.all(y0[0, 0] == 0) and np.all(y0[T - 1, k - 1] == 0)
  y1 = run_and_check(x, jnp.asarray(ids), wgu, wd, config=cfg)
  np.testing.assert_array_equal(y0, y1)


def _check_variant_on_routing(variant, T, H, I, E, k, dtype, ids_kind):
  """kernel_variant `variant` on fresh inputs whose ids are distinct per token,
  'repeated' (an expert twice in token 1) or 'fuzz' (in [-3, E+3)), with ids -1 and E
  at the first and last slot: against the reference (run_and_check), dropped slots
  exactly zero, every kept slot nonzero, two runs bitwise equal. Returns the inputs."""
  r = rng()
  x = jnp.asarray(r.normal(size=(T, H)), dtype)
  wgu, wd = make_weights(r, E, H, I, dtype)
  if ids_kind == "fuzz":
    ids = r.integers(-3, E + 3, size=(T, k)).astype(np.int32)
  elif ids_kind == "repeated":
    ids = r.integers(0, E, size=(T, k)).astype(np.int32)
    ids[1, 1] = ids[1, 0]
  else:
    ids = distinct_ids(r, T, k, E)
  ids[0, 0] = -1
  ids[T - 1, k - 1] = E
  cfg = dict(kernel_variant=variant)
  y0 = run_and_check(x, jnp.asarray(ids), wgu, wd, config=cfg)
  assert np.all(y0[0, 0] == 0) and np.all(y0[T - 1, k - 1] == 0)
  valid = (ids >= 0) & (ids < E)
  assert np.all(np.abs(y0[valid]).max(-1) > 0)
  y1 = run_and_check(x, jnp.asarray(ids), wgu, wd, config=cfg)
  np.testing.assert_array_equal(y0, y1)
  return x, jnp.asarray(ids), wgu, wd


@pytest.mark.parametrize("T,H,I,E,k,dtype,ids_kind", [
    (1, 64, 64, 16, 4, jnp.bfloat16, "distinct"),   # 2 chunks of I, one vector per lane
    (3, 72, 96, 8, 2, jnp.float16, "distinct"),     # H tail (9 vectors), 3 chunks
    (4, 64, 32, 4, 3, jnp.bfloat16, "repeated"),    # an expert twice in a token, one chunk
    (2, 2816, 704, 16, 8, jnp.bfloat16, "distinct"),   # Gemma-4 H, I: 22 chunks, 11 vectors
    (1, 2048, 768, 16, 8, jnp.float16, "distinct"),    # Qwen3 H, I: 24 chunks, 8 vectors
    (2, 4096, 64, 8, 2, jnp.bfloat16, "distinct"),  # the largest H (16 vectors per lane)
    (6, 40, 64, 8, 16, jnp.bfloat16, "fuzz"),       # 16 slots (the sum's most), ids in [-3, E+3)
    (3, 64, 48, 8, 2, jnp.bfloat16, "distinct"),    # I % 32 != 0: falls back to the stream kernel
    (3, 64, 64, 8, 2, jnp.float32, "distinct"),     # f32: falls back
    (2, 8200, 64, 4, 2, jnp.bfloat16, "distinct"),  # H > 4096: falls back
])
def test_split_kernel(platform, T, H, I, E, k, dtype, ids_kind):
  """Variant 7 (csrc/kernels/expert_gemv_split.cuh: a block per assignment and chunk of
  32 intermediate columns, f32 partials in the h scratch summed by a second kernel;
  other platforms ignore it): ids -1 and E give zero rows, repeated experts, the
  sizes it falls back on; bitwise equal over repeated runs; the h scratch has the
  shape _codes.gemv_scratch_cols gives (partials of I / 32 chunks of H f32)."""
  from jax_moe import _codes
  from jax_moe.expert_gemv import expert_gemv_p
  x, ids, wgu, wd = _check_variant_on_routing(7, T, H, I, E, k, dtype, ids_kind)
  h = jax.eval_shape(lambda *a: expert_gemv_p.bind(
      *a, jnp.zeros((0, 0, H), dtype), jnp.zeros((0, H, I), dtype), jnp.zeros((0, k), jnp.float32),
      activation="silu", token_tiles=1, k_split_gate_up=8, k_split_down=8, kernel_variant=7,
      combine=0)[1], x, ids, wgu, wd)
  cols = max(I, 2 * H * (I // 32))
  assert h.shape == (T * k, cols) and _codes.gemv_scratch_cols(H, I, 7) == cols
  assert _codes.gemv_scratch_cols(H, I, 5) == I


@pytest.mark.parametrize("T,H,I,E,k,dtype,ids_kind", [
    (1, 64, 64, 16, 4, jnp.bfloat16, "distinct"),    # G = 16 (132 SMs): 4 rows per block
    (3, 72, 96, 8, 2, jnp.float16, "distinct"),      # H tail (9 vectors), G = 16
    (4, 64, 8, 4, 3, jnp.bfloat16, "repeated"),      # I = 8: G = 11, ranks 1-10 own no h rows
    (2, 2816, 704, 16, 8, jnp.bfloat16, "distinct"),  # Gemma-4 H, I: G = 8
    (1, 2048, 768, 16, 8, jnp.float16, "distinct"),   # Qwen3 H, I: G = 16
    (2, 3072, 40, 8, 2, jnp.bfloat16, "distinct"),   # the largest H; I / G = 2.5 rows
    (6, 40, 24, 8, 16, jnp.bfloat16, "fuzz"),        # 96 slots: G = 1; ids in [-3, E+3)
    (3, 64, 44, 8, 2, jnp.bfloat16, "distinct"),     # I % 8 != 0: falls back
    (3, 64, 64, 8, 2, jnp.float32, "distinct"),      # f32: falls back
    (2, 3080, 64, 4, 2, jnp.bfloat16, "distinct"),   # H > 3072: falls back
    (2, 64, 776, 4, 2, jnp.bfloat16, "distinct"),    # I > 768: falls back
    (65, 64, 64, 16, 8, jnp.bfloat16, "distinct"),   # T k = 520 > 512: falls back
])
def test_group_kernel(platform, T, H, I, E, k, dtype, ids_kind):
  """Variant 8 (csrc/kernels/expert_gemv_group.cuh: G blocks per assignment sharing
  h through the scratch; other platforms ignore it): ids -1 and E give zero rows,
  repeated experts, sizes where some blocks own no rows, one block per assignment,
  the sizes it falls back on; bitwise equal over repeated runs (the arrival words are
  reset for the next call)."""
  _check_variant_on_routing(8, T, H, I, E, k, dtype, ids_kind)


def test_group_limits_match_the_kernel():
  """heuristics.gemv_group_supported's limits (H <= 3072, I <= 768, T k <= 512) are
  the group kernel's (kGroupMaxVpl, kGroupMaxDvpl, kGroupMaxAssign in
  csrc/kernels/expert_gemv_group.cuh): H <= 256 VPL, I <= 64 DVPL."""
  import os
  import re
  from jax_moe import heuristics
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "csrc", "kernels", "expert_gemv_group.cuh")) as f:
    src = f.read()
  const = lambda name: int(re.search(name + r" = (\d+);", src).group(1))
  vpl, dvpl, rows = const("kGroupMaxVpl"), const("kGroupMaxDvpl"), const("kGroupDownRows")
  ok = heuristics.gemv_group_supported
  assert ok(1, 8, 0, 256 * vpl, 64, 2) and not ok(1, 8, 0, 256 * vpl + 8, 64, 2)
  imax = 32 * dvpl * 8 // rows
  assert ok(1, 8, 0, 64, imax, 2) and not ok(1, 8, 0, 64, imax + 8, 2)
  most = const("kGroupMaxAssign")
  assert ok(most // 8, 8, 0, 64, 64, 2) and not ok(most // 8 + 1, 8, 0, 64, 64, 2)


def test_group_variant_heuristic(monkeypatch):
  """heuristics.expert_gemv_variant picks the group kernel (8) up to
  GEMV_GROUP_MAX_TOKENS tokens, only where gemv_group_supported (16-bit, no shared
  experts, H % 8 == 0 up to 3072, I % 8 == 0 up to 768) and only when the caller
  gives I, before the split kernels' rule; by default at one token only."""
  from jax_moe import heuristics
  v = heuristics.expert_gemv_variant
  r = rng()
  wgu, wd = make_weights(r, 8, 64, 64, jnp.bfloat16)
  for T, want in ((1, 8), (2, 5)):  # the defaults: the group kernel at one token only
    x = jnp.asarray(r.normal(size=(T, 64)), jnp.bfloat16)
    ids = jnp.asarray(distinct_ids(r, T, 2, 8))
    hlo = jax.jit(lambda *a: jax_moe.expert_gemv(*a)).lower(x, ids, wgu, wd).as_text()
    assert f"kernel_variant = {want}" in hlo
  monkeypatch.setattr(heuristics, "GEMV_GROUP_MAX_TOKENS", 1)
  monkeypatch.setattr(heuristics, "GEMV_SPLIT_MAX_TOKENS", 2)
  assert v(1, 128, 8, 0, 2816, 704) == 8 and v(1, 128, 8, 0, 2048, 768, 2) == 8
  assert v(2, 128, 8, 0, 2816, 704) == 7                  # above the group kernel's limit
  assert v(1, 128, 8, 0, 2816) == 5                       # I not given
  assert v(1, 128, 8, 0, 2816, 704, 4) == 5               # f32
  assert v(1, 128, 8, 1, 2816, 704) == 5                  # a shared expert: neither
  assert v(1, 128, 8, 0, 2816, 700) == 5                  # I % 8 != 0 (and % 32)
  assert v(1, 128, 8, 0, 2816, 800) == 7                  # I > 768: the split kernels
  assert v(1, 8, 2, 0, 3080, 64) == 7                     # H > 3072: the split kernels
  monkeypatch.setattr(heuristics, "GEMV_GROUP_MAX_TOKENS", 0)
  assert v(1, 128, 8, 0, 2816, 704) == 7


def test_split_constants_match_params_h():
  """The split variant's number and chunk in jax_moe/_codes.py are the C++ ones
  (csrc/common/params.h), which size the h scratch the handler checks."""
  import os
  import re
  from jax_moe import _codes
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "csrc", "common", "params.h")) as f:
    src = f.read()
  assert int(re.search(r"kGemvSplitVariant = (\d+);", src).group(1)) == _codes.GEMV_SPLIT_VARIANT
  assert int(re.search(r"kSplitChunk = (\d+);", src).group(1)) == _codes.GEMV_SPLIT_CHUNK


@pytest.mark.parametrize("T,H,I,E,k,S,dtype", [
    (1, 64, 48, 16, 4, 1, jnp.bfloat16),
    (3, 64, 48, 16, 4, 2, jnp.float16),
    (20, 72, 40, 8, 2, 1, jnp.bfloat16),   # 20 tokens on the shared expert: 3 segments
    (5, 36, 20, 8, 2, 1, jnp.bfloat16),    # not multiples of 8: generic path on GPU
    (4, 64, 48, 16, 4, 2, jnp.float32),
])
@pytest.mark.parametrize("variant", [0, 1, 4, 5, 6, 7, 8])
def test_shared_experts(platform, T, H, I, E, k, S, dtype, variant):
  """Shared experts as slots k .. k + S - 1 of every token, in the same call: the
  reference's shared rows, and routed rows bitwise equal to a call without shared
  experts; routed ids -1 and E stay zero rows (E is not the first shared expert)."""
  r = rng()
  x = jnp.asarray(r.normal(size=(T, H)), dtype)
  wgu, wd = make_weights(r, E, H, I, dtype)
  sgu, sd = make_weights(r, S, H, I, dtype)
  ids = distinct_ids(r, T, k, E)
  ids[0, 0] = -1
  ids[T - 1, k - 1] = E
  ids = jnp.asarray(ids)
  cfg = dict(kernel_variant=variant) if variant else None
  poison_device_memory()
  f = jax.jit(lambda *a: jax_moe.expert_gemv(*a[:4], shared_gate_up=a[4], shared_down=a[5],
                                             _config=cfg))
  y = f(x, ids, wgu, wd, sgu, sd)
  assert y.shape == (T, k + S, H) and y.dtype == x.dtype
  yr = reference.expert_gemv(x, ids, wgu, wd, shared_gate_up=sgu, shared_down=sd)
  y32 = np.asarray(y.astype(jnp.float32))
  assert_close(y32, yr.astype(jnp.float32), dtype)
  assert np.all(y32[0, 0] == 0) and np.all(y32[T - 1, k - 1] == 0)
  assert np.all(np.abs(y32[:, k:]).max(-1) > 0)
  routed = jax.jit(lambda *a: jax_moe.expert_gemv(*a, _config=cfg))(x, ids, wgu, wd)
  np.testing.assert_array_equal(y32[:, :k], np.asarray(routed.astype(jnp.float32)))
  np.testing.assert_array_equal(y32, np.asarray(f(x, ids, wgu, wd, sgu, sd).astype(jnp.float32)))
  # leading dims and vmap over tokens keep the k + S slots
  yv = jax.vmap(lambda a, b: jax_moe.expert_gemv(a, b, wgu, wd, shared_gate_up=sgu,
                                                 shared_down=sd))(x[None], ids[None])
  assert yv.shape == (1, T, k + S, H)
  assert_close(np.asarray(yv[0].astype(jnp.float32)), yr.astype(jnp.float32), dtype)


@pytest.mark.parametrize("cfg,match", [
    (dict(kernel_variant=2), "kernel_variant"),
    (dict(kernel_variant=9), "kernel_variant"),
    (dict(token_tiles=3), "token_tiles"),
    (dict(k_split_gate_up=16), "k_split_gate_up"),
    (dict(k_split_down=0), "k_split_down"),
    (dict(variant=5), "unknown _config key"),
])
def test_bad_kernel_config(cfg, match):
  """The private kernel configuration is checked at trace time on every platform."""
  with pytest.raises(ValueError, match=match):
    jax_moe.expert_gemv(*_ok(), _config=cfg)


def test_kernel_variant_heuristic():
  """The stream kernel (5) up to 512 assignments while the mean assignments per
  expert is at most 4, where it was measured faster (heuristics.gemv_kernel_variant);
  its wide-slot form (6) from hidden size 4096."""
  from jax_moe import heuristics
  v = heuristics.gemv_kernel_variant
  assert v(1, 128, 8, 2816) == 5 and v(1, 128, 8, 2048) == 5 and v(64, 128, 8, 2816) == 5
  assert v(1, 256, 8, 7168) == 6 and v(8, 8, 2, 4096) == 6 and v(64, 256, 8, 7168) == 6
  assert v(32, 8, 2, 4096) == 6 and v(33, 8, 2, 4096) == 4  # wide: mean 8, above 8
  assert v(100, 16, 8, 7168) == 4  # mean 50
  assert v(1, 128, 8) == 5 and v(8, 128, 8) == 5 and v(1, 256, 8) == 5 and v(1, 8, 2) == 5
  assert v(64, 128, 8) == 5 and v(64, 256, 8) == 5 and v(16, 8, 2) == 5  # mean 4, 2, 4
  assert v(17, 8, 2) == 4 and v(32, 8, 2) == 4 and v(65, 128, 8) == 4   # mean above 4
  assert v(100, 256, 2) == 5 and v(300, 256, 2) == 4  # 600 assignments > 512
  assert v(100, 16, 8) == 4           # T*k > 512: the kernel would fall back anyway


def test_split_variant_heuristic(monkeypatch):
  """heuristics.expert_gemv_variant picks the split kernels (7) up to
  GEMV_SPLIT_MAX_TOKENS tokens, only where gemv_split_supported (16-bit, no shared
  experts, k <= 16, H % 8 == 0 up to 4096, I % 32 == 0 up to 1024) and only when the
  caller gives I; the primitive's h scratch follows the choice."""
  from jax_moe import heuristics
  v = heuristics.expert_gemv_variant
  monkeypatch.setattr(heuristics, "GEMV_GROUP_MAX_TOKENS", 0)  # the group kernel's rule first
  monkeypatch.setattr(heuristics, "GEMV_SPLIT_MAX_TOKENS", 2)
  assert v(1, 128, 8, 0, 2816, 704) == 7 and v(2, 128, 8, 0, 2048, 768, 2) == 7
  assert v(3, 128, 8, 0, 2816, 704) == 5                 # above the token limit
  assert v(1, 128, 8, 0, 2816) == 5                       # I not given
  assert v(1, 128, 8, 0, 2816, 704, 4) == 5               # f32
  assert v(1, 256, 8, 1, 7168, 2048) == 6                 # shared expert; H > 4096
  assert v(1, 128, 8, 0, 2816, 720) == 5                  # I % 32 != 0
  assert v(1, 128, 8, 0, 4096, 1024) == 7 and v(1, 128, 8, 0, 4096, 1056) == 6  # I > 1024
  assert v(1, 128, 16, 0, 64, 64) == 7 and v(1, 128, 17, 0, 64, 64) == 5
  assert v(1, 8, 2, 0, 4104, 64) == 6                     # H > 4096
  r = rng()
  x = jnp.asarray(r.normal(size=(1, 64)), jnp.bfloat16)
  wgu, wd = make_weights(r, 8, 64, 64, jnp.bfloat16)
  ids = jnp.asarray(distinct_ids(r, 1, 2, 8))
  hlo = jax.jit(lambda *a: jax_moe.expert_gemv(*a)).lower(x, ids, wgu, wd).as_text()
  assert "kernel_variant = 7" in hlo and f"tensor<2x{2 * 64 * 2}xbf16>" in hlo
  monkeypatch.setattr(heuristics, "GEMV_SPLIT_MAX_TOKENS", 0)
  assert v(1, 128, 8, 0, 2816, 704) == 5


def test_kernel_variant_max_mean(monkeypatch):
  """heuristics.GEMV_STREAM_MAX_MEAN (narrow ring) and GEMV_STREAM_MAX_MEAN_WIDE are
  the limits the rule reads: Gemma-4-like T=32 with E=32 (mean 8) takes variant 4 at
  the narrow default and variant 5 when raised to 8; Mixtral T=32 (mean 8) takes the
  wide stream kernel at the wide default and variant 4 when it is lowered to 4."""
  from jax_moe import heuristics
  v = heuristics.gemv_kernel_variant
  assert heuristics.GEMV_STREAM_MAX_MEAN == 4 and heuristics.GEMV_STREAM_MAX_MEAN_WIDE == 8
  assert v(32, 32, 8, 2816) == 4 and v(32, 8, 2, 4096) == 6
  monkeypatch.setattr(heuristics, "GEMV_STREAM_MAX_MEAN", 8)
  assert v(32, 32, 8, 2816) == 5 and v(33, 32, 8, 2816) == 4
  monkeypatch.setattr(heuristics, "GEMV_STREAM_MAX_MEAN_WIDE", 4)
  assert v(32, 8, 2, 4096) == 4 and v(16, 8, 2, 4096) == 6


def test_token_tiles_heuristic():
  """Token tiles follow the expected busiest expert: never more than needed for T
  tokens, more for few experts (Mixtral) than for many (DeepSeek-V3)."""
  from jax_moe import heuristics
  tiles = heuristics.gemv_token_tiles
  assert tiles(1, 128, 8) == 1 and tiles(8, 128, 8) == 1
  assert tiles(64, 8, 2) == 4 and tiles(16, 8, 2) == 2
  assert tiles(64, 256, 8) == 1 and tiles(64, 128, 8) == 2
  assert tiles(16) == 2 and tiles(100) == 4          # no routing info: T bounds it
  for T in (1, 3, 9, 17, 33, 100, 4096):
    assert tiles(T, 128, 8) <= tiles(T)
