"""Test helpers: fresh random inputs (never zeros), routing inputs without ties,
tolerances from the dtype, and allocator poisoning so unwritten outputs show."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np

_seed = itertools.count(1234)


def rng() -> np.random.Generator:
  """A fresh generator per call: every test draws new data."""
  return np.random.default_rng(next(_seed))


def tol(dtype) -> float:
  """Relative (norm) tolerance from the dtype of the inputs."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return 2e-5
  if dtype == jnp.float16:
    return 4e-3
  return 1.6e-2  # bfloat16


def rel_err(out, ref) -> float:
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  assert out.shape == ref.shape, (out.shape, ref.shape)
  assert np.all(np.isfinite(out)), "non-finite values in output"
  denom = np.linalg.norm(ref)
  num = np.linalg.norm(out - ref)
  return float(num / denom) if denom > 0 else float(num)


def assert_close(out, ref, dtype, *, factor: float = 1.0):
  err = rel_err(out, ref)
  assert err <= tol(dtype) * factor, f"relative error {err:.3g} > {tol(dtype) * factor:.3g}"


def poison_device_memory(nbytes: int = 64 << 20) -> None:
  """Fill and free a NaN buffer so the next allocations likely reuse NaN memory:
  an output element a kernel forgot to write then fails the comparison."""
  n = max(1, nbytes // 4)
  buf = jnp.full((n,), jnp.nan, jnp.float32)
  buf.block_until_ready()
  del buf


def tie_free_logits(r: np.random.Generator, T: int, E: int, gap: float = 0.05) -> np.ndarray:
  """Logits [T, E] whose values in a row are distinct multiples of `gap` apart
  (a random permutation of an evenly spaced ladder, plus a per-row shift), so
  every comparison of selection scores is far from a tie."""
  base = (np.arange(E, dtype=np.float64) - E / 2) * gap
  rows = np.stack([r.permutation(base) for _ in range(T)]) if T else np.zeros((0, E))
  return (rows + r.normal(size=(T, 1))).astype(np.float32)


def exactly_representable(x: np.ndarray, dtype) -> np.ndarray:
  """Round through `dtype` so the f32 reference sees exactly the kernel's input."""
  return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))


# ---- routing inputs whose selection is far from any tie ------------------------

def _scores64(logits64, scoring):
  if scoring == "softmax":
    z = logits64 - logits64.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)
  return 1.0 / (1.0 + np.exp(-logits64))


def selection_margin(logits64, *, top_k, scoring="softmax", num_groups=1, top_groups=1,
                     group_score="top2_sum", bias=None) -> np.ndarray:
  """Per row, the smallest gap (in float64) between selection scores that the
  routing decision depends on: consecutive top-(k+1) selection scores among the
  allowed experts, and consecutive top-(top_groups+1) group scores."""
  T, E = logits64.shape
  sel = _scores64(logits64, scoring)
  if bias is not None:
    sel = sel + np.asarray(bias, np.float64)
  margin = np.full(T, np.inf)
  allowed = np.ones_like(sel, bool)
  if num_groups > 1:
    G = E // num_groups
    g = sel.reshape(T, num_groups, G)
    gs = g.max(-1) if group_score == "max" else np.sort(g, -1)[..., ::-1][..., :min(2, G)].sum(-1)
    order = np.argsort(-gs, axis=-1, kind="stable")
    sgs = np.take_along_axis(gs, order, -1)
    n = min(top_groups + 1, num_groups)
    if n > 1:
      margin = np.minimum(margin, np.abs(np.diff(sgs[:, :n], axis=-1)).min(-1))
    keep = np.zeros((T, num_groups), bool)
    np.put_along_axis(keep, order[:, :top_groups], True, -1)
    allowed = np.repeat(keep, G, axis=1)
  masked = np.where(allowed, sel, -np.inf)
  srt = -np.sort(-masked, axis=-1)
  n = min(top_k + 1, int(allowed.sum(-1).min()) if T else 0)
  if n > 1:
    margin = np.minimum(margin, np.abs(np.diff(srt[:, :n], axis=-1)).min(-1))
  return margin


def routing_logits(r, T, E, dtype, *, top_k, scoring="softmax", num_groups=1, top_groups=1,
                   group_score="top2_sum", bias=None, min_gap=2e-5, scale=None):
  """Random logits [T, E] (values exactly representable in `dtype`), resampling
  rows until selection_margin >= min_gap."""
  scale = (2.0 if scoring == "softmax" else 1.5) if scale is None else scale
  out = np.zeros((T, E), np.float32)
  bad = np.ones(T, bool)
  for _ in range(200):
    if not bad.any():
      return out
    n = int(bad.sum())
    out[bad] = exactly_representable(r.normal(scale=scale, size=(n, E)), dtype)
    m = selection_margin(out.astype(np.float64), top_k=top_k, scoring=scoring,
                         num_groups=num_groups, top_groups=top_groups,
                         group_score=group_score, bias=bias)
    bad = m < min_gap
  raise AssertionError("could not draw tie-free routing logits")


def routing_hidden(r, T, H, router64, dtype, *, min_gap=2e-5, **kw):
  """Random hidden states [T, H] (exact in `dtype`) whose logits x @ router.T are
  tie-free for the routing configuration in kw."""
  out = np.zeros((T, H), np.float32)
  bad = np.ones(T, bool)
  for _ in range(200):
    if not bad.any():
      return out
    n = int(bad.sum())
    out[bad] = exactly_representable(r.normal(size=(n, H)), dtype)
    logits = out.astype(np.float64) @ router64.T
    bad = selection_margin(logits, **kw) < min_gap
  raise AssertionError("could not draw tie-free hidden states")


# ---- moe_block inputs ------------------------------------------------------------

def moe_inputs(r, shape, T, dtype, *, min_gap=2e-5):
  """(x [T, H], MoEParams) for a jax_moe.shapes.MoEShape: weights scaled for O(1)
  outputs and exactly representable in `dtype`, a non-trivial correction_bias /
  expert_scale where the shape has one, and x whose routing is tie-free."""
  from jax_moe import MoEParams
  E, H, I = shape.num_experts, shape.hidden, shape.intermediate
  S, Is = shape.num_shared_experts, shape.shared_intermediate

  def w(size, fan_in):
    return jnp.asarray(exactly_representable(r.normal(size=size) / np.sqrt(fan_in), dtype), dtype)

  router = w((E, H), H)
  bias = (0.1 * r.normal(size=E)).astype(np.float32) if shape.correction_bias else None
  scale = r.uniform(0.5, 1.5, size=E).astype(np.float32) if shape.expert_scale else None
  x = routing_hidden(r, T, H, np.asarray(router.astype(jnp.float32), np.float64), dtype,
                     min_gap=min_gap, top_k=shape.top_k, scoring=shape.scoring,
                     num_groups=shape.num_groups, top_groups=shape.top_groups,
                     group_score=shape.group_score, bias=bias)
  params = MoEParams(
      router_weight=router, w_gate_up=w((E, 2 * I, H), H), w_down=w((E, H, I), I),
      correction_bias=None if bias is None else jnp.asarray(bias),
      expert_scale=None if scale is None else jnp.asarray(scale),
      shared_gate_up=w((S, 2 * Is, H), H) if S else None,
      shared_down=w((S, H, Is), Is) if S else None)
  return jnp.asarray(x, dtype), params


def make_weights(r: np.random.Generator, E: int, H: int, I: int, dtype):
  """Expert weights [E, 2I, H] and [E, H, I] scaled so gate/up/down outputs are O(1)
  for x ~ N(0, 1)."""
  wgu = jnp.asarray(r.normal(size=(E, 2 * I, H)) / np.sqrt(H), dtype)
  wd = jnp.asarray(r.normal(size=(E, H, I)) / np.sqrt(I), dtype)
  return wgu, wd


def distinct_ids(r: np.random.Generator, T: int, k: int, E: int) -> np.ndarray:
  """int32 [T, k] expert ids, k distinct per token."""
  return np.stack([r.choice(E, size=k, replace=False) for _ in range(T)]).astype(np.int32) \
      if T else np.zeros((0, k), np.int32)
