"""jax_moe.expert_gemv_combine: the experts and their weighted sum in one call.

Against the reference (reference.combine of reference.expert_gemv, shared slots
weighted 1) and bitwise against the two-call form combine(expert_gemv(...)), whose
arithmetic it must keep: on GPU the stream kernel (variants 5 and 6) sums in its
own launch (its last block, once every y row is written), the split kernels
(variant 7) in their second kernel, the other variants and the
cases the fused sum does not take (more than 32 slots) run combine's kernel after
the experts. Fresh random data, poisoned outputs, dropped
ids, tokens without any valid slot, repeated experts, vmap, scan, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import reference
from helpers import assert_close, distinct_ids, make_weights, poison_device_memory, rng


def _weights(r, T, k):
  return jnp.asarray(jax.nn.softmax(jnp.asarray(r.normal(size=(T, k)), jnp.float32), -1))


def _check(x, ids, w, wgu, wd, sgu=None, sd=None, variant=None, runs=2, in_kernel=True):
  """Fused out vs the reference and, bitwise, vs the two-call form; repeated runs
  bitwise equal. in_kernel: the sum inside the stream kernel (True), combine's own
  kernel after it (False) or the heuristic's choice (None). Returns out (f32 numpy)."""
  cfg = None if variant is None else dict(kernel_variant=variant)
  fcfg = dict(cfg or {}, **({} if in_kernel is None else dict(combine_in_kernel=in_kernel)))
  shared = dict(shared_gate_up=sgu, shared_down=sd)
  fused = jax.jit(lambda *a: jax_moe.expert_gemv_combine(*a, **shared, _config=fcfg))
  outs = []
  for _ in range(runs):
    poison_device_memory()
    outs.append(np.asarray(fused(x, ids, w, wgu, wd).astype(jnp.float32)))
  out = outs[0]
  T, H = x.shape
  assert out.shape == (T, H)
  for o in outs[1:]:
    np.testing.assert_array_equal(o, out)
  S = 0 if sgu is None else sgu.shape[0]
  w_all = jnp.concatenate([w.astype(jnp.float32), jnp.ones((T, S), jnp.float32)], 1)
  yr = reference.expert_gemv(x, ids, wgu, wd, **shared)
  ref = reference.combine(yr, w_all, out_dtype=jnp.float32)
  ref = np.asarray(ref)
  finite = np.isfinite(ref).all(-1)  # rows with a NaN weight stay NaN
  np.testing.assert_array_equal(np.isfinite(out), np.isfinite(ref))
  if finite.any():
    assert_close(out[finite], ref[finite], x.dtype)
  y = jax_moe.expert_gemv(x, ids, wgu, wd, **shared, _config=cfg)
  two = np.asarray(jax_moe.combine(y, w_all, out_dtype=x.dtype).astype(jnp.float32))
  np.testing.assert_array_equal(out, two)
  return out


@pytest.mark.parametrize("T,H,I,E,k,S,dtype", [
    (1, 64, 48, 16, 4, 0, jnp.bfloat16),
    (5, 72, 40, 8, 2, 0, jnp.bfloat16),     # K and row tails (H = 72: a 16-row tile of 8)
    (3, 64, 48, 16, 4, 2, jnp.float16),     # two shared experts (weight 1)
    (20, 64, 48, 8, 2, 1, jnp.bfloat16),    # 20 tokens on the shared expert: 3 segments
    (64, 128, 64, 64, 8, 0, jnp.bfloat16),  # 512 assignments: the prologue's long path
    (2, 72, 64, 16, 4, 0, jnp.bfloat16),    # the split kernels' sizes (I % 32 == 0), H tail
    (4, 64, 48, 16, 4, 0, jnp.float32),     # f32: not the stream kernel on GPU
])
@pytest.mark.parametrize("variant,in_kernel", [(None, None), (4, True), (5, True), (6, True),
                                               (5, False), (6, False), (7, None),
                                               (8, True), (8, False)])
def test_matches_reference_and_two_calls(platform, T, H, I, E, k, S, dtype, variant, in_kernel):
  r = rng()
  x = jnp.asarray(r.normal(size=(T, H)), dtype)
  wgu, wd = make_weights(r, E, H, I, dtype)
  sgu, sd = make_weights(r, S, H, I, dtype) if S else (None, None)
  ids = distinct_ids(r, T, k, E)
  ids[0, 0] = -1                 # dropped slots contribute weight * 0
  ids[T - 1, k - 1] = E
  _check(x, jnp.asarray(ids), _weights(r, T, k), wgu, wd, sgu, sd, variant, in_kernel=in_kernel)


@pytest.mark.parametrize("variant", [5, 6, 7, 8])
def test_awkward_routings(platform, variant):
  """Tokens whose every slot is dropped (no unit counts them: their row is written
  from the weights alone), repeated experts within a token (two arrivals on one
  counter from one unit), one hot expert (runs of segments), and a NaN weight on a
  dropped slot propagating as combine propagates it."""
  r = rng()
  T, H, E, k = 40, 64, 6, 4
  I = 32 if variant == 7 else 24  # the split kernels take I % 32 == 0 only
  x = jnp.asarray(r.normal(size=(T, H)), jnp.bfloat16)
  wgu, wd = make_weights(r, E, H, I, jnp.bfloat16)
  ids = r.integers(0, E, size=(T, k)).astype(np.int32)  # repeats allowed
  ids[3] = -1
  ids[7] = [E, -5, E + 2, -1]
  ids[10:30, 0] = 2                                     # a hot expert
  ids[11, 1] = ids[11, 2] = 4                           # the same expert twice
  w = np.array(_weights(r, T, k))
  w[12, 1] = np.nan
  ids[12, 1] = -1
  out = _check(x, jnp.asarray(ids), jnp.asarray(w), wgu, wd, variant=variant)
  assert np.all(out[3] == 0) and np.all(out[7] == 0)
  assert np.all(np.isnan(out[12])) and np.all(np.isfinite(np.delete(out, 12, axis=0)))


@pytest.mark.parametrize("T,k,H,I,E", [
    (2, 32, 64, 16, 40),     # 32 slots: the most the fused sum takes
    (2, 33, 64, 16, 40),     # 33 slots: combine's kernel after the stream kernel
    (512, 1, 2064, 16, 2),   # 512 tokens: a long sum for the one block (correct, slow)
])
def test_fused_limits(platform, T, k, H, I, E):
  r = rng()
  x = jnp.asarray(r.normal(size=(T, H)), jnp.bfloat16)
  wgu, wd = make_weights(r, E, H, I, jnp.bfloat16)
  ids = distinct_ids(r, T, k, E)
  ids[0, -1] = -1
  _check(x, jnp.asarray(ids), _weights(r, T, k), wgu, wd, variant=5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,T", [("gemma4", 1), ("gemma4", 8), ("qwen3", 3),
                                     ("deepseek_v3", 2)])
def test_model_shapes_gpu(platform, shape, T):
  """The real model sizes on the heuristics' own kernel choice (GPU only: the
  weights are GBs)."""
  if platform != "gpu":
    pytest.skip("model shapes on GPU only")
  from jax_moe.shapes import SHAPES
  s = SHAPES[shape]
  r = rng()
  E, H, I, k = s.num_experts, s.hidden, s.intermediate, s.top_k
  x = jnp.asarray(r.normal(size=(T, H)), jnp.bfloat16)
  key = jax.random.PRNGKey(T)
  wgu = (jax.random.normal(key, (E, 2 * I, H), jnp.float32) / np.sqrt(H)).astype(jnp.bfloat16)
  wd = (jax.random.normal(jax.random.fold_in(key, 1), (E, H, I), jnp.float32)
        / np.sqrt(I)).astype(jnp.bfloat16)
  _check(x, jnp.asarray(distinct_ids(r, T, k, E)), _weights(r, T, k), wgu, wd, in_kernel=None)
  _check(x, jnp.asarray(distinct_ids(r, T, k, E)), _weights(r, T, k), wgu, wd, in_kernel=True)


def test_leading_dims_vmap_scan(platform):
  r = rng()
  B, T, H, I, E, k = 3, 4, 64, 48, 16, 4
  x = jnp.asarray(r.normal(size=(B, T, H)), jnp.bfloat16)
  wgu, wd = make_weights(r, E, H, I, jnp.bfloat16)
  ids = jnp.asarray(np.stack([distinct_ids(r, T, k, E) for _ in range(B)]))
  w = jnp.asarray(np.stack([np.asarray(_weights(r, T, k)) for _ in range(B)]))
  ref = np.stack([np.asarray(reference.combine(reference.expert_gemv(x[b], ids[b], wgu, wd),
                                               w[b], out_dtype=jnp.float32))
                  for b in range(B)])
  lead = jax.jit(lambda *a: jax_moe.expert_gemv_combine(*a))(x, ids, w, wgu, wd)
  assert lead.shape == (B, T, H) and lead.dtype == x.dtype
  assert_close(np.asarray(lead.astype(jnp.float32)), ref, jnp.bfloat16)
  vm = jax.jit(jax.vmap(lambda a, b, c: jax_moe.expert_gemv_combine(a, b, c, wgu, wd)))(x, ids, w)
  np.testing.assert_array_equal(np.asarray(vm.astype(jnp.float32)),
                                np.asarray(lead.astype(jnp.float32)))
  # weights shared across the batch (unbatched under vmap)
  vw = jax.vmap(lambda a, b: jax_moe.expert_gemv_combine(a, b, w[0], wgu, wd))(x, ids)
  assert_close(np.asarray(vw[0].astype(jnp.float32)), ref[0], jnp.bfloat16)

  def step(h, _):  # a decode loop: each step's output is the next step's input
    out = jax_moe.expert_gemv_combine(h, ids[0], w[0], wgu, wd)
    return (h + out).astype(h.dtype), out

  _, outs = jax.jit(lambda h: jax.lax.scan(step, h, None, length=3))(x[0])
  h = x[0]
  for i in range(3):
    o = reference.combine(reference.expert_gemv(h, ids[0], wgu, wd), w[0], out_dtype=h.dtype)
    assert_close(np.asarray(outs[i].astype(jnp.float32)), np.asarray(o.astype(jnp.float32)),
                 jnp.bfloat16, factor=2.0)
    h = (h + o).astype(h.dtype)


def test_zero_tokens_and_bf16_weights(platform):
  r = rng()
  H, I, E, k = 64, 48, 16, 4
  wgu, wd = make_weights(r, E, H, I, jnp.bfloat16)
  out = jax_moe.expert_gemv_combine(jnp.zeros((0, H), jnp.bfloat16), jnp.zeros((0, k), jnp.int32),
                                    jnp.zeros((0, k), jnp.float32), wgu, wd)
  assert out.shape == (0, H)
  x = jnp.asarray(r.normal(size=(2, H)), jnp.bfloat16)
  ids = jnp.asarray(distinct_ids(r, 2, k, E))
  wb = _weights(r, 2, k).astype(jnp.bfloat16)  # x's dtype: taken exactly as f32
  a = jax_moe.expert_gemv_combine(x, ids, wb, wgu, wd)
  b = jax_moe.expert_gemv_combine(x, ids, wb.astype(jnp.float32), wgu, wd)
  np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def _args():
  r = rng()
  x = jnp.ones((2, 16), jnp.float32)
  wgu, wd = make_weights(r, 4, 16, 4, jnp.float32)
  return x, jnp.zeros((2, 2), jnp.int32), jnp.full((2, 2), 0.5, jnp.float32), wgu, wd


@pytest.mark.parametrize("change,exc,match", [
    (dict(w=jnp.ones((2, 3), jnp.float32)), ValueError, "weights must be"),
    (dict(w=jnp.ones((2,), jnp.float32)), ValueError, "weights must be"),
    (dict(w=jnp.ones((2, 2), jnp.int32)), TypeError, "weights must be float32 or x's dtype"),
    (dict(w=jnp.ones((2, 2), jnp.float16)), TypeError, "weights must be float32 or x's dtype"),
    (dict(ids=jnp.zeros((2, 2), jnp.float32)), TypeError, "ids must be int32"),
    (dict(activation="relu"), ValueError, "activation"),
])
def test_bad_input(change, exc, match):
  x, ids, w, wgu, wd = _args()
  ids = change.get("ids", ids)
  w = change.get("w", w)
  with pytest.raises(exc, match=match):
    jax_moe.expert_gemv_combine(x, ids, w, wgu, wd, activation=change.get("activation", "silu"))


def test_primitive_checks_weights():
  """The primitive's shape rule refuses combine weights of the wrong shape or dtype
  (the handlers check them again)."""
  from jax_moe.expert_gemv import expert_gemv_p
  x, ids, _, wgu, wd = _args()
  no_s = (jnp.zeros((0, 8, 16), jnp.float32), jnp.zeros((0, 16, 4), jnp.float32))
  kw = dict(activation="silu", token_tiles=1, k_split_gate_up=1, k_split_down=1,
            kernel_variant=0)
  with pytest.raises(ValueError, match="combine weights must be float32"):
    expert_gemv_p.bind(x, ids, wgu, wd, *no_s, jnp.ones((2, 3), jnp.float32), combine=1, **kw)
  with pytest.raises(ValueError, match="combine weights must be float32"):
    expert_gemv_p.bind(x, ids, wgu, wd, *no_s, jnp.ones((2, 2), jnp.float16), combine=2, **kw)
  with pytest.raises(ValueError, match="combine weights must be float32"):
    expert_gemv_p.bind(x, ids, wgu, wd, *no_s, jnp.ones((2, 2), jnp.float32), combine=0, **kw)
  with pytest.raises(ValueError, match="combine must be 0, 1 or 2"):
    expert_gemv_p.bind(x, ids, wgu, wd, *no_s, jnp.ones((2, 2), jnp.float32), combine=3, **kw)


def test_combine_in_kernel_heuristic(monkeypatch):
  """The last block sums while T * H / 8 vectors fit in GEMV_COMBINE_IN_KERNEL_MAX_ROUNDS
  rounds of the block's threads and the slots in one load group (s13-12)."""
  from jax_moe import heuristics
  assert heuristics.gemv_combine_in_kernel(1, 8, 2816)       # Gemma-4 T=1: 2 rounds
  assert heuristics.gemv_combine_in_kernel(2, 8, 2816)       # 3 rounds
  assert not heuristics.gemv_combine_in_kernel(4, 8, 2816)   # 5
  assert heuristics.gemv_combine_in_kernel(1, 8, 7168)       # DeepSeek-V3 T=1: 3
  assert not heuristics.gemv_combine_in_kernel(1, 9, 7168)   # its folded shared slot
  assert not heuristics.gemv_combine_in_kernel(2, 2, 4096)   # Mixtral T=2: 4
  assert not heuristics.gemv_combine_in_kernel(1, 8, 2820)   # H not a multiple of 8
  monkeypatch.setattr(heuristics, "GEMV_COMBINE_IN_KERNEL_MAX_ROUNDS", 0)
  assert not heuristics.gemv_combine_in_kernel(1, 8, 2816)


def _combine_mode(cfg):
  """The primitive's combine parameter that expert_gemv_combine binds for cfg."""
  from jax_moe.expert_gemv import expert_gemv_p
  x, ids, w, wgu, wd = _args()
  jaxpr = jax.make_jaxpr(lambda *a: jax_moe.expert_gemv_combine(*a, _config=cfg))(
      x, ids, w, wgu, wd)
  (eqn,) = [e for e in jaxpr.jaxpr.eqns if e.primitive is expert_gemv_p]
  return eqn.params["combine"]


def test_combine_in_kernel_option(monkeypatch):
  """_config combine_in_kernel reaches the primitive (2: in the stream kernel, 1:
  combine's kernel after it) over the heuristic; a non-bool is refused by name."""
  from jax_moe import heuristics
  assert _combine_mode(dict(combine_in_kernel=True)) == 2
  assert _combine_mode(dict(combine_in_kernel=False)) == 1
  monkeypatch.setattr(heuristics, "GEMV_COMBINE_IN_KERNEL_MAX_ROUNDS", 0)
  assert _combine_mode(None) == 1
  monkeypatch.setattr(heuristics, "GEMV_COMBINE_IN_KERNEL_MAX_ROUNDS", 10 ** 6)
  assert _combine_mode(None) == 2
  assert _combine_mode(dict(combine_in_kernel=False)) == 1
  with pytest.raises(TypeError, match="combine_in_kernel must be a bool"):
    _combine_mode(dict(combine_in_kernel="yes"))
  with pytest.raises(ValueError, match="unknown _config key"):
    jax_moe.expert_gemv(*_args()[:2], *_args()[3:], _config=dict(combine_in_kernel=True))
