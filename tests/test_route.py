"""jax_moe.route against reference.route on fresh tie-free inputs: ids exactly,
weights to f32 rounding; jit, vmap, scan; every bad-input error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import heuristics, reference
from helpers import poison_device_memory, rng, routing_hidden, routing_logits

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
EK = [(E, k) for E in (1, 8, 60, 64, 128, 160, 256, 384) for k in (1, 2, 6, 8) if k <= E]


def check(x, top_k, **kw):
  poison_device_memory()
  w, ids = jax.jit(lambda x: jax_moe.route(x, top_k, **kw))(x)
  wr, ir = reference.route(x.reshape(-1, x.shape[-1]), top_k, **kw)
  w, ids = np.asarray(w).reshape(-1, top_k), np.asarray(ids).reshape(-1, top_k)
  assert ids.dtype == np.int32 and w.dtype == np.float32
  np.testing.assert_array_equal(ids, np.asarray(ir))
  # Logits from a router matmul differ from the reference by f32 summation order,
  # which grows like sqrt(H); the weights inherit that relative error.
  rw = kw.get("router_weight")
  rtol = 2e-6 if rw is None else 2e-6 + 3e-7 * np.sqrt(rw.shape[1])
  np.testing.assert_allclose(w, np.asarray(wr), rtol=rtol, atol=1e-7)
  return w, ids


@pytest.mark.parametrize("E,k", EK)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_softmax_logits(platform, E, k, dtype):
  r = rng()
  T = 64 if E % 2 == 0 else 3
  x = jnp.asarray(routing_logits(r, T, E, dtype, top_k=k), dtype)
  w, ids = check(x, k)
  assert np.all((ids >= 0) & (ids < E))
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)  # renormalized by default
  assert all(len(set(row)) == k for row in ids)


@pytest.mark.parametrize("T", [0, 1, 3, 64, 1000])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_token_counts_logits(platform, T, dtype):
  r = rng()
  x = jnp.asarray(routing_logits(r, T, 128, dtype, top_k=8), dtype)
  w, ids = check(x, 8)
  assert w.shape == (T, 8)


@pytest.mark.parametrize("T", [0, 1, 3, 16, 17, 64, 1000])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_router_weight_fused(platform, T, dtype):
  """hidden [T, H] + router [E, H]: fused for small T, XLA dot + routing above."""
  r = rng()
  E, H = 64, 200
  router = np.asarray(jnp.asarray(r.normal(size=(E, H)) / np.sqrt(H), dtype).astype(jnp.float32))
  x = routing_hidden(r, T, H, router.astype(np.float64), dtype, top_k=6)
  check(jnp.asarray(x, dtype), 6, router_weight=jnp.asarray(router, dtype))


@pytest.mark.parametrize("E,H", [(8, 64), (128, 256), (256, 7168), (384, 96), (60, 33)])
def test_router_weight_shapes(platform, E, H):
  """Several E and H (H not a multiple of 8 takes the scalar path)."""
  r = rng()
  k = min(8, E)
  router = np.asarray(jnp.asarray(r.normal(size=(E, H)) / np.sqrt(H), jnp.bfloat16)
                      .astype(jnp.float32))
  x = routing_hidden(r, 5, H, router.astype(np.float64), jnp.bfloat16, top_k=k)
  check(jnp.asarray(x, jnp.bfloat16), k, router_weight=jnp.asarray(router, jnp.bfloat16))


GROUPED = {
    # DeepSeek-V3: sigmoid, correction bias, top-2-sum group score, scaling factor
    "dsv3": dict(E=256, k=8, scoring="sigmoid", num_groups=8, top_groups=4,
                 group_score="top2_sum", bias=True, scaling_factor=2.5),
    # DeepSeek-V2: softmax, max group score, no renormalization
    "dsv2": dict(E=160, k=6, scoring="softmax", num_groups=8, top_groups=3,
                 group_score="max", bias=False, scaling_factor=16.0, renormalize=False),
    "e160_top2sum": dict(E=160, k=8, scoring="sigmoid", num_groups=8, top_groups=3,
                         group_score="top2_sum", bias=True, scaling_factor=1.0),
}


def grouped_case(name, r):
  """GROUPED[name] as (E, k, bias, kw, opts): kw the selection's arguments (scoring,
  groups), opts the weights' (bias as an array or None, scaling, renormalization);
  the bias drawn fresh where the config has one."""
  cfg = GROUPED[name]
  E = cfg["E"]
  bias = r.normal(scale=0.05, size=E).astype(np.float32) if cfg["bias"] else None
  kw = dict(scoring=cfg["scoring"], num_groups=cfg["num_groups"], top_groups=cfg["top_groups"],
            group_score=cfg["group_score"])
  opts = dict(correction_bias=None if bias is None else jnp.asarray(bias),
              scaling_factor=cfg["scaling_factor"], renormalize=cfg.get("renormalize", True))
  return E, cfg["k"], bias, kw, opts


def assert_group_limit(ids, E, kw):
  G = E // kw["num_groups"]
  assert all(len(set(row // G)) <= kw["top_groups"] for row in np.asarray(ids))


@pytest.mark.parametrize("name", sorted(GROUPED))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("with_router", [False, True], ids=["logits", "router"])
def test_grouped(platform, name, dtype, with_router):
  r = rng()
  E, k, bias, kw, opts = grouped_case(name, r)
  T = 40
  if with_router:
    H = 128
    router = np.asarray(jnp.asarray(r.normal(size=(E, H)) / np.sqrt(H), dtype)
                        .astype(jnp.float32))
    x = routing_hidden(r, T, H, router.astype(np.float64), dtype, top_k=k, bias=bias, **kw)
    extra = dict(router_weight=jnp.asarray(router, dtype))
  else:
    x = routing_logits(r, T, E, dtype, top_k=k, bias=bias, **kw)
    extra = {}
  w, ids = check(jnp.asarray(x, dtype), k, **opts, **kw, **extra)
  assert_group_limit(ids, E, kw)


def test_options_are_not_ignored(platform):
  """Each option changes the result the way the reference says."""
  r = rng()
  E, k, T = 64, 4, 32
  x = jnp.asarray(routing_logits(r, T, E, jnp.float32, top_k=k))
  w0, i0 = check(x, k)
  scale = jnp.asarray(r.uniform(0.5, 2.0, size=E), jnp.float32)
  w1, i1 = check(x, k, expert_scale=scale)
  np.testing.assert_allclose(w1, w0 * np.asarray(scale)[i0], rtol=1e-5)
  w2, _ = check(x, k, scaling_factor=3.0)
  np.testing.assert_allclose(w2, 3.0 * w0, rtol=1e-6)
  w3, i3 = check(x, k, renormalize=False)
  np.testing.assert_array_equal(i3, i0)
  assert np.all(w3.sum(-1) < 1.0)
  xs = jnp.asarray(routing_logits(r, T, E, jnp.float32, top_k=k, scoring="sigmoid"))
  w4, _ = check(xs, k, scoring="sigmoid", renormalize=False)
  np.testing.assert_allclose(w4, 1 / (1 + np.exp(-np.take_along_axis(np.asarray(xs), _, -1))),
                             rtol=1e-5)


def test_bias_changes_selection(platform):
  """A large bias on one expert makes it selected everywhere, with its unbiased weight."""
  r = rng()
  E, k, T = 32, 2, 16
  x = jnp.asarray(routing_logits(r, T, E, jnp.float32, top_k=k, scoring="sigmoid"))
  bias = np.zeros(E, np.float32)
  bias[7] = 10.0
  w, ids = check(x, k, scoring="sigmoid", correction_bias=jnp.asarray(bias), renormalize=False)
  assert np.all(ids[:, 0] == 7)
  np.testing.assert_allclose(w[:, 0], 1 / (1 + np.exp(-np.asarray(x)[:, 7])), rtol=1e-5)


def test_many_experts_fallback(platform):
  """E above the CUDA kernel's limit still works (reference lowering on GPU)."""
  r = rng()
  x = jnp.asarray(routing_logits(r, 4, 1100, jnp.float32, top_k=4))
  check(x, 4)


def test_leading_dims(platform):
  r = rng()
  x = routing_logits(r, 24, 64, jnp.float32, top_k=4).reshape(2, 3, 4, 64)
  w, ids = jax_moe.route(jnp.asarray(x), 4)
  assert w.shape == (2, 3, 4, 4) and ids.shape == (2, 3, 4, 4)
  wr, ir = reference.route(jnp.asarray(x.reshape(-1, 64)), 4)
  np.testing.assert_array_equal(np.asarray(ids).reshape(-1, 4), ir)


@pytest.mark.parametrize("with_router", [False, True], ids=["logits", "router"])
def test_vmap_two_batch_dims(platform, with_router):
  r = rng()
  E, k, H = 64, 4, 96
  if with_router:
    router = np.asarray(jnp.asarray(r.normal(size=(E, H)) / np.sqrt(H)), np.float32)
    x = routing_hidden(r, 2 * 3 * 5, H, router.astype(np.float64), jnp.float32, top_k=k)
    kw = dict(router_weight=jnp.asarray(router))
  else:
    x = routing_logits(r, 2 * 3 * 5, E, jnp.float32, top_k=k)
    kw = {}
  xb = jnp.asarray(x.reshape(2, 3, 5, -1))
  f = jax.jit(jax.vmap(jax.vmap(lambda t: jax_moe.route(t, k, **kw))))
  w, ids = f(xb)
  wr, ir = reference.route(jnp.asarray(x), k, **kw)
  np.testing.assert_array_equal(np.asarray(ids).reshape(-1, k), ir)
  np.testing.assert_allclose(np.asarray(w).reshape(-1, k), wr, rtol=2e-6, atol=1e-7)


def test_vmap_over_bias(platform):
  """A batched correction_bias cannot fold into tokens: the rule maps over it."""
  r = rng()
  E, k, T = 32, 4, 6
  x = jnp.asarray(routing_logits(r, T, E, jnp.float32, top_k=k, scoring="sigmoid"))
  biases = jnp.asarray(np.stack([np.zeros(E), np.eye(E)[3] * 5]), jnp.float32)
  f = jax.vmap(lambda b: jax_moe.route(x, k, scoring="sigmoid", correction_bias=b))
  w, ids = f(biases)
  for i in range(2):
    wr, ir = reference.route(x, k, scoring="sigmoid", correction_bias=biases[i])
    np.testing.assert_array_equal(ids[i], ir)
  assert np.all(np.asarray(ids[1])[:, 0] == 3)


def test_scan(platform):
  r = rng()
  E, k, T, steps = 64, 4, 8, 5
  xs = jnp.asarray(np.stack([routing_logits(r, T, E, jnp.bfloat16, top_k=k)
                             for _ in range(steps)]), jnp.bfloat16)

  @jax.jit
  def run(xs):
    def body(c, x):
      w, ids = jax_moe.route(x, k)
      return c + w.sum(), (w, ids)
    return jax.lax.scan(body, jnp.float32(0), xs)

  _, (w, ids) = run(xs)
  for s in range(steps):
    wr, ir = reference.route(xs[s], k)
    np.testing.assert_array_equal(ids[s], ir)
    np.testing.assert_allclose(w[s], wr, rtol=2e-6, atol=1e-7)


def nan_logits(E, k, T=8):
  """Logits [T, E] with NaN rows: all NaN, every third, one."""
  x = routing_logits(rng(), T, E, jnp.float32, top_k=k)
  x[0, :] = np.nan
  x[1, ::3] = np.nan
  x[2, 5] = np.nan
  return jnp.asarray(x)


def assert_valid_ids(ids, E, k):
  ids = np.asarray(ids)
  assert np.all((ids >= 0) & (ids < E)), ids
  assert all(len(set(row)) == k for row in ids)


def test_nan_logits_give_valid_ids(platform):
  E, k = 64, 8
  x = nan_logits(E, k)
  for scoring in ("softmax", "sigmoid"):
    w, ids = jax.jit(lambda x: jax_moe.route(x, k, scoring=scoring, num_groups=4,
                                             top_groups=2))(x)
    assert_valid_ids(ids, E, k)


def test_deterministic(platform):
  r = rng()
  E, H = 256, 512
  router = jnp.asarray(r.normal(size=(E, H)) / np.sqrt(H), jnp.bfloat16)
  x = jnp.asarray(r.normal(size=(16, H)), jnp.bfloat16)
  f = jax.jit(lambda x: jax_moe.route(x, 8, router_weight=router, scoring="sigmoid",
                                      num_groups=8, top_groups=4))
  w0, i0 = f(x)
  for _ in range(5):
    w, i = f(x)
    np.testing.assert_array_equal(np.asarray(i), np.asarray(i0))
    np.testing.assert_array_equal(np.asarray(w), np.asarray(w0))


# ---- bad input: clear errors naming the argument ----------------------------------

X = jnp.ones((4, 16), jnp.float32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: jax_moe.route(jnp.ones((16,)), 2), ValueError, "x must have rank"),
    (lambda: jax_moe.route(jnp.ones((4, 16), jnp.int32), 2), TypeError, "x must be float32"),
    (lambda: jax_moe.route(X, 0), ValueError, "top_k"),
    (lambda: jax_moe.route(X, 17), ValueError, "top_k"),
    (lambda: jax_moe.route(X, 2.0), TypeError, "top_k"),
    (lambda: jax_moe.route(X, 2, scoring="relu"), ValueError, "scoring"),
    (lambda: jax_moe.route(X, 2, group_score="mean", num_groups=2), ValueError, "group_score"),
    (lambda: jax_moe.route(X, 2, num_groups=3), ValueError, "num_groups"),
    (lambda: jax_moe.route(X, 2, num_groups=4, top_groups=5), ValueError, "top_groups"),
    (lambda: jax_moe.route(X, 2, num_groups=4, top_groups=0), ValueError, "top_groups"),
    (lambda: jax_moe.route(X, 9, num_groups=4, top_groups=2), ValueError, "top_k=9 exceeds"),
    (lambda: jax_moe.route(X, 2, correction_bias=jnp.ones(15)), ValueError, "correction_bias"),
    (lambda: jax_moe.route(X, 2, correction_bias=jnp.ones(16, jnp.int32)), TypeError,
     "correction_bias"),
    (lambda: jax_moe.route(X, 2, expert_scale=jnp.ones((16, 1))), ValueError, "expert_scale"),
    (lambda: jax_moe.route(X, 2, scaling_factor="big"), TypeError, "scaling_factor"),
    (lambda: jax_moe.route(X, 2, scaling_factor=float("inf")), ValueError, "scaling_factor"),
    (lambda: jax_moe.route(X, 2, renormalize=1), TypeError, "renormalize"),
    (lambda: jax_moe.route(X, 2, router_weight=jnp.ones((8, 15))), ValueError, "router_weight"),
    (lambda: jax_moe.route(X, 2, router_weight=jnp.ones((8,))), ValueError, "router_weight"),
    (lambda: jax_moe.route(X, 2, router_weight=jnp.ones((8, 16), jnp.bfloat16)), TypeError,
     "router_weight"),
])
def test_bad_input(call, exc, match):
  with pytest.raises(exc, match=match):
    call()


def test_handler_revalidates():
  """Binding the primitive directly with bad attributes gets an error from the C++
  handler instead of a crash."""
  from jax_moe.route import route_p
  x = jnp.ones((4, 16), jnp.float32)
  empty = jnp.zeros((0, 0), jnp.float32)
  e0 = jnp.zeros((0,), jnp.float32)
  with pytest.raises(Exception, match="num_groups must divide"):
    jax.jit(lambda x: route_p.bind(x, empty, e0, e0, top_k=2, scoring="softmax",
                                   renormalize=True, num_groups=3, top_groups=1,
                                   group_score="top2_sum", scaling_factor=1.0,
                                   k_splits=1, block_select=False))(x)[0].block_until_ready()


@pytest.mark.parametrize("k_splits", [0, 4097, 2.0])
def test_bad_k_splits(k_splits):
  from jax_moe.route import route_p
  x = jnp.ones((4, 16), jnp.bfloat16)
  e0 = jnp.zeros((0,), jnp.float32)
  with pytest.raises(ValueError, match="k_splits"):
    route_p.bind(x, jnp.ones((8, 16), jnp.bfloat16), e0, e0, top_k=2, scoring="softmax",
                 renormalize=True, num_groups=1, top_groups=1, group_score="top2_sum",
                 scaling_factor=1.0, k_splits=k_splits, block_select=False)


@pytest.mark.parametrize("k_splits", [1, 3, 5, 8, 40])
@pytest.mark.parametrize("E,H,dtype", [(60, 136, jnp.bfloat16), (256, 136, jnp.float16),
                                       (256, 100, jnp.bfloat16), (33, 72, jnp.float32)])
def test_fused_kernel_configs(platform, k_splits, E, H, dtype):
  """The fused CUDA kernel (ignored on CPU) with every kind of k-split: one, uneven,
  more splits than chunks (empty splits); E not a multiple of the 16-row tile; three
  token tiles, the last partial; the tensor-core path (H a multiple of 8, with a
  partial last chunk) and the scalar path (H = 100, f32)."""
  from jax_moe.route import route_p
  r = rng()
  T, k = 20, 6
  router = np.asarray(jnp.asarray(r.normal(size=(E, H)) / np.sqrt(H), dtype)
                      .astype(jnp.float32))
  groups = 4 if E % 4 == 0 else 1
  kw = dict(scoring="sigmoid", num_groups=groups, top_groups=min(2, groups))
  x = routing_hidden(r, T, H, router.astype(np.float64), dtype, top_k=k, **kw)
  xb, rb = jnp.asarray(x, dtype), jnp.asarray(router, dtype)
  e0 = jnp.zeros((0,), jnp.float32)
  poison_device_memory()
  w, ids, scratch = jax.jit(lambda x, r: route_p.bind(
      x, r, e0, e0, top_k=k, renormalize=True, group_score="top2_sum", scaling_factor=1.0,
      k_splits=k_splits, block_select=False, **kw))(xb, rb)
  assert scratch.shape == (k_splits * T, E)
  wr, ir = reference.route(xb, k, router_weight=rb, **kw)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(ir))
  np.testing.assert_allclose(np.asarray(w), np.asarray(wr), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("H", [7168, 4096, 2816, 2048, 1000, 136, 64, 8])
def test_k_splits_heuristic(H):
  """k_splits for the fused kernel: at least one split, no split left without a
  chunk, no more splits than chunks / 8 (rounded up: a block's 8 warps share its
  chunks), and at most 8 (one thread-block cluster on sm_90)."""
  ks = heuristics.route_k_splits(H)
  chunks = -(-H // 32)
  per = -(-chunks // ks)
  assert ks >= 1
  assert (ks - 1) * per < chunks  # the last split has work
  assert ks <= max(1, -(-chunks // 8))
  assert ks <= 8
  assert ks == 8 or ks == max(1, chunks // 8)  # as many as the chunks allow, up to 8


@pytest.mark.parametrize("path", ["reduce", "dot"])
@pytest.mark.parametrize("T,dtype", [(1, jnp.bfloat16), (5, jnp.float16), (16, jnp.float32),
                                     (0, jnp.bfloat16)])
def test_router_matmul_paths(platform, monkeypatch, path, T, dtype):
  """The two XLA formulations of the router matmul ahead of the logits kernel (a
  multiply-reduce fusion for few tokens, XLA's dot otherwise) give the reference's
  ids exactly and its weights to f32 rounding."""
  monkeypatch.setattr(heuristics, "ROUTE_FUSED_MAX_TOKENS", -1)
  monkeypatch.setattr(heuristics, "ROUTE_REDUCE_MIN_TOKENS", 0)
  monkeypatch.setattr(heuristics, "ROUTE_REDUCE_MAX_TOKENS", 1 << 30 if path == "reduce" else -1)
  monkeypatch.setattr(heuristics, "ROUTE_REDUCE_MAX_BYTES", 1 << 62)
  r = rng()
  E, H, k = 160, 264, 6
  router = np.asarray(jnp.asarray(r.normal(size=(E, H)) / np.sqrt(H), dtype).astype(jnp.float32))
  kw = dict(scoring="sigmoid", num_groups=8, top_groups=3)
  x = routing_hidden(r, T, H, router.astype(np.float64), dtype, top_k=k, **kw)
  xb, rb = jnp.asarray(x, dtype), jnp.asarray(router, dtype)
  w, ids = jax.jit(lambda x, rw: jax_moe.route(x, k, router_weight=rw, **kw))(xb, rb)
  wr, ir = reference.route(xb, k, router_weight=rb, **kw)
  assert ids.shape == (T, k)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(ir))
  np.testing.assert_allclose(np.asarray(w), np.asarray(wr), rtol=1e-5, atol=1e-7)


def test_router_reduce_heuristic():
  """The multiply-reduce router matmul where it was measured faster (heuristics.py):
  2-16 tokens while the router re-reads stay under 16 MiB; XLA's dot at T=1 (a tie)
  and at DeepSeek-V3 from T=8."""
  rr = heuristics.route_router_reduce
  assert not rr(1, 128, 2816) and not rr(1, 256, 7168)
  assert rr(4, 128, 2816) and rr(8, 128, 2816) and rr(16, 128, 2816) and rr(16, 128, 2048)
  assert rr(4, 256, 7168) and not rr(8, 256, 7168) and not rr(16, 256, 7168)
  assert not rr(17, 8, 64) and not rr(64, 128, 2048)
  assert not rr(8, 128, 2816, itemsize=4 * 8)  # the bound is in bytes


# ---- block selection: route_block_kernel (logits), route_gemv_block_kernel (router) --

BLOCK_EK = [(E, k) for E, k in EK if E <= 256] + [(64, 32), (256, 32), (33, 5)]


@pytest.fixture
def block_select(set_heuristic):
  """Every logits-path call with E <= 256 takes the block kernel (CUDA; the CPU
  handler ignores the choice, so there these tests check the plumbing)."""
  set_heuristic("ROUTE_BLOCK_SELECT_MAX_TOKENS", 1 << 30)


def _bound_block_select(f, *args):
  """block_select of every route primitive in f's jaxpr."""
  from jax_moe.route import route_p
  return [e.params["block_select"] for e in jax.make_jaxpr(f)(*args).jaxpr.eqns
          if e.primitive is route_p]


@pytest.mark.parametrize("E,k", BLOCK_EK)
def test_block_select_softmax(platform, block_select, E, k):
  r = rng()
  T = 40 if E % 2 == 0 else 3
  # bf16 logits (8-bit mantissa) at k = 32 of 256 rarely come without a near-tie at the
  # 32nd place; f32 there
  dtype = jnp.bfloat16 if k < 32 else jnp.float32
  x = jnp.asarray(routing_logits(r, T, E, dtype, top_k=k), dtype)
  assert _bound_block_select(lambda x: jax_moe.route(x, k), x) == [True]
  w, ids = check(x, k)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
  assert all(len(set(row)) == k for row in ids)


@pytest.mark.parametrize("name", sorted(GROUPED))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_block_select_grouped(platform, block_select, name, dtype):
  r = rng()
  E, k, bias, kw, opts = grouped_case(name, r)
  x = routing_logits(r, 24, E, dtype, top_k=k, bias=bias, **kw)
  scale = jnp.asarray(r.uniform(0.5, 1.5, size=E), jnp.float32)
  w, ids = check(jnp.asarray(x, dtype), k, expert_scale=scale, **opts, **kw)
  assert_group_limit(ids, E, kw)


@pytest.mark.parametrize("T", [1, 3, 1000])
def test_block_select_token_counts(platform, block_select, T):
  r = rng()
  x = jnp.asarray(routing_logits(r, T, 128, jnp.float16, top_k=8), jnp.float16)
  check(x, 8)


def test_block_select_nan_and_determinism(platform, block_select):
  E, k = 256, 8
  x = nan_logits(E, k)
  for scoring in ("softmax", "sigmoid"):
    f = jax.jit(lambda x: jax_moe.route(x, k, scoring=scoring, num_groups=8, top_groups=4))
    w, ids = f(x)
    assert_valid_ids(ids, E, k)
    w2, ids2 = f(x)
    np.testing.assert_array_equal(np.asarray(ids2), np.asarray(ids))
    np.testing.assert_array_equal(np.asarray(w2), np.asarray(w))


def test_block_select_heuristic(monkeypatch):
  """Picked only on the logits path (the router matmul as XLA's dot or reduce ahead of
  the kernel), for 1 <= T <= ROUTE_BLOCK_SELECT_MAX_TOKENS and E <= 256; off at 0."""
  bs = heuristics.route_block_select
  monkeypatch.setattr(heuristics, "ROUTE_BLOCK_SELECT_MAX_TOKENS", 0)
  assert not bs(1, 128)
  monkeypatch.setattr(heuristics, "ROUTE_BLOCK_SELECT_MAX_TOKENS", 16)
  assert bs(1, 256) and bs(16, 8) and not bs(17, 128) and not bs(0, 128) and not bs(1, 257)
  x = jnp.ones((4, 64), jnp.bfloat16)
  rw = jnp.ones((256, 64), jnp.bfloat16)
  assert _bound_block_select(lambda x: jax_moe.route(x, 2), jnp.ones((4, 256))) == [True]
  assert _bound_block_select(lambda x: jax_moe.route(x, 2), jnp.ones((4, 300))) == [False]
  assert _bound_block_select(lambda x: jax_moe.route(x, 2), jnp.ones((20, 256))) == [False]
  assert _bound_block_select(lambda x: jax_moe.route(x, 2, router_weight=rw), x) == [True]
  monkeypatch.setattr(heuristics, "ROUTE_FUSED_MAX_TOKENS", 1 << 30)  # the fused kernel
  assert _bound_block_select(lambda x: jax_moe.route(x, 2, router_weight=rw), x) == [False]


def test_block_limit_matches_the_kernel():
  """heuristics.ROUTE_BLOCK_MAX_EXPERTS is kRouteBlockMaxExperts in route.cuh."""
  import os
  import re
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "csrc", "kernels", "route.cuh")) as f:
    src = f.read()
  assert int(re.search(r"kRouteBlockMaxExperts = (\d+);", src).group(1)) == \
      heuristics.ROUTE_BLOCK_MAX_EXPERTS


@pytest.fixture
def fused_block(set_heuristic):
  """Every routed call with the router takes the one-launch block-selection kernel
  (route_gemv_block_kernel) where it applies (CUDA; CPU checks the plumbing)."""
  set_heuristic("ROUTE_FUSED_BLOCK_MAX_TOKENS", 1 << 30)


@pytest.mark.parametrize("T", [1, 3, 8, 9, 20])
@pytest.mark.parametrize("E,H,dtype", [(256, 7168, jnp.bfloat16), (128, 2816, jnp.float16),
                                       (60, 136, jnp.bfloat16), (8, 64, jnp.bfloat16),
                                       (3, 64, jnp.bfloat16), (1, 16, jnp.float16)])
def test_fused_block(platform, fused_block, T, E, H, dtype):
  """Token tiles of 8 (one, one partial, several), E not a multiple of the experts per
  block, fewer experts than a tile's tokens (blocks past E that only route), the model
  shapes' router sizes; ids exactly the reference's."""
  r = rng()
  k = min(6, E)
  router = np.asarray(jnp.asarray(r.normal(size=(E, H)) / np.sqrt(H), dtype).astype(jnp.float32))
  x = jnp.asarray(routing_hidden(r, T, H, router.astype(np.float64), dtype, top_k=k), dtype)
  rw = jnp.asarray(router, dtype)
  assert _bound_block_select(lambda x: jax_moe.route(x, k, router_weight=rw), x) == [True]
  check(x, k, router_weight=rw)


@pytest.mark.parametrize("name", sorted(GROUPED))
def test_fused_block_grouped(platform, fused_block, name):
  r = rng()
  E, k, bias, kw, opts = grouped_case(name, r)
  H, T = 264, 12
  router = np.asarray(jnp.asarray(r.normal(size=(E, H)) / np.sqrt(H), jnp.bfloat16)
                      .astype(jnp.float32))
  x = routing_hidden(r, T, H, router.astype(np.float64), jnp.bfloat16, top_k=k, bias=bias, **kw)
  scale = jnp.asarray(r.uniform(0.5, 1.5, size=E), jnp.float32)
  _, ids = check(jnp.asarray(x, jnp.bfloat16), k, router_weight=jnp.asarray(router, jnp.bfloat16),
                 expert_scale=scale, **opts, **kw)
  assert_group_limit(ids, E, kw)


def test_fused_block_heuristic(monkeypatch):
  """Only where route_gemv_block_kernel applies: 16-bit, H % 8 == 0, E <= 256."""
  monkeypatch.setattr(heuristics, "ROUTE_FUSED_BLOCK_MAX_TOKENS", 4)
  fb = heuristics.route_fused_block
  assert fb(1, 256, 7168, 2) and fb(4, 128, 2816, 2)
  assert not fb(5, 256, 7168, 2) and not fb(0, 256, 7168, 2)
  assert not fb(1, 257, 7168, 2) and not fb(1, 256, 7164, 2) and not fb(1, 256, 7168, 4)
  f = lambda x, rw: jax_moe.route(x, 2, router_weight=rw)  # noqa: E731
  rw = jnp.ones((64, 64), jnp.bfloat16)
  assert _bound_block_select(f, jnp.ones((4, 64), jnp.bfloat16), rw) == [True]
  assert _bound_block_select(f, jnp.ones((4, 64), jnp.float32), rw.astype(jnp.float32)) == [False]


@pytest.mark.parametrize("E,H,dtype,k_splits", [
    (257, None, jnp.bfloat16, 1),  # logits path: too many experts
    (257, 64, jnp.bfloat16, 1),    # router: too many experts
    (64, 64, jnp.float32, 1),      # router: f32
    (64, 60, jnp.bfloat16, 1),     # router: H not a multiple of 8
    (64, 64, jnp.bfloat16, 2),     # router: k-splits
])
def test_bad_block_select(E, H, dtype, k_splits):
  from jax_moe.route import route_p
  x = jnp.ones((4, E if H is None else H), dtype)
  router = jnp.zeros((0, 0), dtype) if H is None else jnp.ones((E, H), dtype)
  e0 = jnp.zeros((0,), jnp.float32)
  with pytest.raises(ValueError, match="block_select"):
    route_p.bind(x, router, e0, e0, top_k=2, scoring="softmax", renormalize=True, num_groups=1,
                 top_groups=1, group_score="top2_sum", scaling_factor=1.0, k_splits=k_splits,
                 block_select=True)


def test_cuda_handler_reads_block_select(platform):
  """The CUDA handler reads block_select: called past the Python checks (ffi_call),
  block_select with an f32 router is refused there, and the same call without it runs.
  The CPU handler ignores the attribute by design: there both calls give the same ids."""
  from jax_moe.route import TARGET, _ffi_attrs
  T, E, H = 4, 8, 64
  r = rng()
  router64 = r.normal(size=(E, H)) / np.sqrt(H)
  x = jnp.asarray(routing_hidden(r, T, H, router64, jnp.float32, top_k=2))
  router = jnp.asarray(router64, jnp.float32)
  e0 = jnp.zeros((0,), jnp.float32)
  params = dict(top_k=2, scoring="softmax", renormalize=True, num_groups=1, top_groups=1,
                group_score="top2_sum", scaling_factor=1.0, k_splits=1)
  out = (jax.ShapeDtypeStruct((T, 2), jnp.float32), jax.ShapeDtypeStruct((T, 2), jnp.int32),
         jax.ShapeDtypeStruct((T, E), jnp.float32))

  def call(block_select):
    attrs = _ffi_attrs(dict(params, block_select=block_select))
    f = jax.ffi.ffi_call(TARGET, out)
    return np.asarray(jax.jit(lambda *a: f(*a, **attrs))(x, router, e0, e0)[1])

  ids = call(False)
  np.testing.assert_array_equal(ids, np.asarray(reference.route(x, 2, router_weight=router)[1]))
  if platform == "gpu":
    with pytest.raises(Exception, match="block_select"):
      call(True)
  else:
    np.testing.assert_array_equal(call(True), ids)
