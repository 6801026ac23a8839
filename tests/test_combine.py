"""jax_moe.combine against reference.combine on fresh random inputs: every dtype of
y, weights and out, awkward H (vector and scalar paths), k from 1 to 32, T = 0;
index with duplicates, out-of-range entries and expert-sorted rows; leading dims,
vmap (fold rules), scan, determinism; every bad-input error.

On CUDA, combines up to heuristics.COMBINE_XLA_MAX_BYTES lower to XLA's fusion. This
module runs the kernel at every size (the `kernel_at_every_size` fixture), and the
tests under "XLA's fusion on CUDA" check that lowering and the switch itself."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import reference
from jax_moe.combine import combine_p
from conftest import clear_traces, gpu_available
from helpers import assert_close, poison_device_memory, rng
from jax_moe import heuristics

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
name = lambda d: jnp.dtype(d).name  # noqa: E731


@pytest.fixture(scope="module", autouse=True)
def kernel_at_every_size():
  """The kernel at every size on CUDA, so that these tests test it (see the module
  docstring); restored, with traces dropped, after the module."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(heuristics, "COMBINE_XLA_MAX_BYTES", -1)
    clear_traces()
    yield
  clear_traces()


def normal(r, shape, dtype):
  return jnp.asarray(r.normal(size=shape), dtype)


def weights(r, shape, dtype=jnp.float32):
  # Routing-like weights: positive, of mixed size (no zeros).
  return jnp.asarray(r.uniform(0.05, 1.0, size=shape), dtype)


def bad_index(r, T, k, N, frac=0.25):
  """int32 [T, k] in [0, N) with duplicates, plus negative and too-large entries."""
  ix = r.integers(0, max(N, 1), size=(T, k))
  bad = r.random((T, k)) < frac
  wild = r.choice(np.array([-1, -7, N, N + 5, 2**31 - 1, -2**31], np.int64), size=(T, k))
  return jnp.asarray(np.where(bad, wild, ix), jnp.int32)


@functools.partial(jax.jit, static_argnames="out_dtype")
def _ref(y, w, index, out_dtype):
  return reference.combine(y, w, index, out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames="out_dtype")
def _ours(y, w, index, out_dtype):
  return jax_moe.combine(y, w, index, out_dtype=out_dtype)


def check(y, w, index=None, out_dtype=None):
  """jit(combine) vs the reference on the folded inputs; returns our output."""
  poison_device_memory()
  out = _ours(y, w, index, out_dtype)
  k, H = w.shape[-1], y.shape[-1]
  want_dtype = jnp.dtype(y.dtype if out_dtype is None else out_dtype)
  assert out.dtype == want_dtype
  assert out.shape == w.shape[:-1] + (H,)
  y2 = y if index is not None else y.reshape(-1, k, H)
  i2 = None if index is None else index.reshape(-1, k)
  ref = _ref(y2, w.reshape(-1, k), i2, out_dtype)
  assert_close(np.asarray(out, np.float32).reshape(-1, H), np.asarray(ref, np.float32),
               want_dtype)
  return out


# ---- dense form: y [T, k, H] -----------------------------------------------------

@pytest.mark.parametrize("out_dtype", [None, jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=lambda d: "same" if d is None else name(d))
@pytest.mark.parametrize("w_kind", ["f32", "y"])
@pytest.mark.parametrize("dtype", DTYPES, ids=name)
def test_dtypes(platform, dtype, w_kind, out_dtype):
  """H = 12 takes the vector path for f32 y (H % 4 == 0) and the scalar path for
  16-bit y; H = 64 is vectorized for all."""
  r = rng()
  T, k = 5, 8
  wd = jnp.float32 if w_kind == "f32" else dtype
  for H in (12, 64):
    check(normal(r, (T, k, H), dtype), weights(r, (T, k), wd), out_dtype=out_dtype)


@pytest.mark.parametrize("k", [1, 2, 8, 9])
@pytest.mark.parametrize("H", [1, 7, 64, 2816, 7168])
def test_shapes(platform, H, k):
  r = rng()
  check(normal(r, (5, k, H), jnp.bfloat16), weights(r, (5, k)))


@pytest.mark.parametrize("k", [3, 5, 17, 32])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=name)
def test_more_k(platform, k, dtype):
  """k beyond the unrolled group sizes: partial and several groups of 8 rows."""
  r = rng()
  check(normal(r, (3, k, 2816), dtype), weights(r, (3, k)))


@pytest.mark.parametrize("T", [0, 1, 5, 4096])
@pytest.mark.parametrize("H", [7, 64])
def test_token_counts(platform, T, H):
  r = rng()
  out = check(normal(r, (T, 8, H), jnp.bfloat16), weights(r, (T, 8)))
  assert out.shape == (T, H)


def test_exact_small():
  """A hand-checked case: products rounded in f32, summed in slot order."""
  y = jnp.asarray([[[1.0, 2.0], [3.0, 4.0]]], jnp.float32)
  w = jnp.asarray([[0.5, 2.0]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(jax_moe.combine(y, w)), [[6.5, 9.0]])
  idx = jnp.asarray([[1, -1]], jnp.int32)
  np.testing.assert_array_equal(np.asarray(jax_moe.combine(y[0], w, idx)), [[1.5, 2.0]])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=name)
def test_every_16_bit_value(dtype):
  """The CPU handlers' 16-bit to f32 conversion (csrc/common/cpu_types.h), through
  combine with weight 1 and an f32 output: every one of the 65536 bit patterns
  (normals, subnormals, zeros, infinities) gives numpy's conversion exactly; NaNs stay
  NaN. (The f16 conversion was rewritten branch-free in session 18.)"""
  bits = np.arange(1 << 16, dtype=np.uint16)
  vals = bits.view(np.float16) if dtype == jnp.float16 else None
  y = jax.lax.bitcast_convert_type(jnp.asarray(bits), dtype).reshape(256, 1, 256)
  want = (vals.astype(np.float32) if vals is not None
          else (bits.astype(np.uint32) << 16).view(np.float32)).reshape(256, 256)
  w = jnp.ones((256, 1), jnp.float32)
  got = np.asarray(jax.jit(lambda y, w: jax_moe.combine(y, w, out_dtype=jnp.float32))(y, w))
  # XLA's CPU threads flush f32 denormals to zero in arithmetic (bf16's subnormals are
  # f32 denormals; f16's are f32 normals), so 1 * y is 0 for those.
  want = np.where(np.abs(want) < np.finfo(np.float32).tiny, np.float32(0), want)
  nan = np.isnan(want)
  np.testing.assert_array_equal(np.isnan(got), nan)
  np.testing.assert_array_equal(got[~nan], want[~nan])  # -0 == +0 here: 0 + 1 * -0 is +0


def test_k_zero(platform):
  """No slots: out is zeros (an empty sum)."""
  r = rng()
  out = jax_moe.combine(normal(r, (3, 0, 16), jnp.float32), jnp.zeros((3, 0), jnp.float32))
  np.testing.assert_array_equal(np.asarray(out), np.zeros((3, 16)))


# ---- index form: y [N, H], index [T, k] --------------------------------------------

@pytest.mark.parametrize("H", [7, 64, 2816])
@pytest.mark.parametrize("dtype", DTYPES, ids=name)
def test_index_out_of_range(platform, dtype, H):
  """Duplicates, negative and too-large indices (even +-2^31): dropped, never read."""
  r = rng()
  T, k, N = 6, 8, 20
  y = normal(r, (N, H), dtype)
  w = weights(r, (T, k), jnp.float32 if dtype == jnp.float16 else dtype)
  index = bad_index(r, T, k, N)
  out = check(y, w, index)
  # Dropped slots must not matter: zeroing their weights changes nothing.
  valid = (index >= 0) & (index < N)
  out2 = jax_moe.combine(y, jnp.where(valid, w, 0).astype(w.dtype), jnp.where(valid, index, 0))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))


@pytest.mark.parametrize("out_dtype", [None, jnp.float32], ids=["same", "f32"])
@pytest.mark.parametrize("k", [1, 2, 8, 9])
@pytest.mark.parametrize("T", [1, 300])
def test_index_sorted_rows(platform, T, k, out_dtype):
  """Rows sorted by a fake expert id (the grouped-GEMM layout): the index form
  equals the dense form bitwise, since the same rows are summed in the same order."""
  r = rng()
  H, E = 2816 if T == 1 else 64, 16
  dense = normal(r, (T, k, H), jnp.bfloat16)
  w = weights(r, (T, k))
  expert = r.integers(0, E, size=T * k)
  order = np.argsort(expert, kind="stable")          # sorted position -> (t, j) slot
  position = np.empty_like(order)
  position[order] = np.arange(T * k)                 # (t, j) slot -> sorted position
  rows = dense.reshape(T * k, H)[jnp.asarray(order)]
  index = jnp.asarray(position.reshape(T, k), jnp.int32)
  out = check(rows, w, index, out_dtype)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(_ours(dense, w, None, out_dtype), np.float32))


def test_index_empty_rows(platform):
  """N = 0: every index is out of range, out is zeros."""
  r = rng()
  out = check(jnp.zeros((0, 64), jnp.bfloat16), weights(r, (4, 2)), bad_index(r, 4, 2, 0, 1.0))
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.zeros((4, 64)))


@pytest.mark.parametrize("T", [0, 1, 4096])
def test_index_token_counts(platform, T):
  r = rng()
  N = 3 * T + 1
  check(normal(r, (N, 64), jnp.float16), weights(r, (T, 8)), bad_index(r, T, 8, N, 0.1))


# ---- leading dims, vmap, scan ------------------------------------------------------

def test_leading_dims(platform):
  r = rng()
  k, H = 4, 64
  out = check(normal(r, (2, 3, 4, k, H), jnp.bfloat16), weights(r, (2, 3, 4, k)))
  assert out.shape == (2, 3, 4, H)
  N = 30
  out = check(normal(r, (N, H), jnp.float32), weights(r, (2, 5, k)), bad_index(r, 10, k, N)
              .reshape(2, 5, k), out_dtype=jnp.bfloat16)
  assert out.shape == (2, 5, H)


def _per_batch(fn, *xs):
  return np.stack([np.asarray(fn(*(x[b] for x in xs)), np.float32) for b in range(len(xs[0]))])


@pytest.mark.parametrize("batched", ["both", "weights", "y"])
def test_vmap_dense(platform, batched):
  """Batched y and weights fold into T; batched weights over a shared y go
  through an iota index (no copy of y)."""
  r = rng()
  B, T, k, H = 3, 5, 4, 64
  y = normal(r, (B, T, k, H), jnp.bfloat16)
  w = weights(r, (B, T, k))
  if batched == "weights":
    y = jnp.broadcast_to(y[0], y.shape)
  elif batched == "y":
    w = jnp.broadcast_to(w[0], w.shape)
  axes = {"both": (0, 0), "weights": (None, 0), "y": (0, None)}[batched]
  args = (y if axes[0] == 0 else y[0], w if axes[1] == 0 else w[0])
  out = jax.jit(jax.vmap(jax_moe.combine, in_axes=axes))(*args)
  want = _per_batch(lambda a, b: _ref(a, b, None, None), y, w)
  assert_close(np.asarray(out, np.float32), want, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                _per_batch(lambda a, b: _ours(a, b, None, None), y, w))


def test_vmap_two_batch_dims(platform):
  r = rng()
  y = normal(r, (2, 3, 5, 8, 64), jnp.float32)
  w = weights(r, (2, 3, 5, 8))
  out = jax.jit(jax.vmap(jax.vmap(jax_moe.combine)))(y, w)
  assert out.shape == (2, 3, 5, 64)
  want = _ref(y.reshape(-1, 8, 64), w.reshape(-1, 8), None, None)
  assert_close(np.asarray(out).reshape(-1, 64), np.asarray(want), jnp.float32)


@pytest.mark.parametrize("batched", ["all", "y", "index", "weights", "y_axis1"])
def test_vmap_index(platform, batched):
  """Batched y with an index: batch b's rows move to b * N, out-of-range indices
  must stay dropped (not land in a neighbouring batch's rows)."""
  r = rng()
  B, T, k, N, H = 3, 4, 8, 6, 64
  y = normal(r, (B, N, H), jnp.bfloat16)
  w = weights(r, (B, T, k))
  index = jnp.stack([bad_index(r, T, k, N, 0.4) for _ in range(B)])
  ax = dict(all=(0, 0, 0), y=(0, None, None), index=(None, None, 0), weights=(None, 0, None),
            y_axis1=(1, 0, 0))[batched]
  full = [y, w, index]
  for i, a in enumerate(ax):
    if a is None:
      full[i] = jnp.broadcast_to(full[i][0], full[i].shape)
  args = [full[i] if a is not None else full[i][0] for i, a in enumerate(ax)]
  if ax[0] == 1:
    args[0] = jnp.moveaxis(args[0], 0, 1)
  out = jax.jit(jax.vmap(jax_moe.combine, in_axes=ax))(*args)
  want = _per_batch(lambda a, b, c: _ref(a, b, c, None), *full)
  assert_close(np.asarray(out, np.float32), want, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                _per_batch(lambda a, b, c: _ours(a, b, c, None), *full))


def test_vmap_two_batch_dims_index(platform):
  """Two nested folds of batched y with out-of-range indices (incl. ones that would
  point into another batch after a naive shift)."""
  r = rng()
  B1, B2, T, k, N, H = 2, 3, 4, 8, 5, 24
  y = normal(r, (B1, B2, N, H), jnp.float32)
  w = weights(r, (B1, B2, T, k))
  index = jnp.stack([bad_index(r, T, k, N, 0.4) for _ in range(B1 * B2)]).reshape(B1, B2, T, k)
  f = jax.jit(jax.vmap(jax.vmap(functools.partial(jax_moe.combine, out_dtype=jnp.float16))))
  out = f(y, w, index)
  assert out.shape == (B1, B2, T, H) and out.dtype == jnp.float16
  want = np.stack([np.asarray(_ref(y[a, b], w[a, b], index[a, b], jnp.float16), np.float32)
                   for a in range(B1) for b in range(B2)])
  assert_close(np.asarray(out, np.float32).reshape(B1 * B2, T, H), want, jnp.float16)


def test_scan(platform):
  """Inside a jitted lax.scan, as a decode loop uses it (index form and dense)."""
  r = rng()
  steps, T, k, N, H = 4, 3, 8, 12, 64
  ys = normal(r, (steps, N, H), jnp.bfloat16)
  ws = weights(r, (steps, T, k))
  ixs = jnp.stack([bad_index(r, T, k, N) for _ in range(steps)])
  dense = normal(r, (steps, T, k, H), jnp.bfloat16)

  @jax.jit
  def run(ys, ws, ixs, dense):
    def body(c, xs):
      y, w, ix, d = xs
      a = jax_moe.combine(y, w, ix, out_dtype=jnp.float32)
      b = jax_moe.combine(d, w)
      return c + a.sum(), (a, b)
    return jax.lax.scan(body, jnp.float32(0), (ys, ws, ixs, dense))

  _, (a, b) = run(ys, ws, ixs, dense)
  for s in range(steps):
    assert_close(a[s], _ref(ys[s], ws[s], ixs[s], jnp.float32), jnp.float32)
    assert_close(np.asarray(b[s], np.float32), np.asarray(_ref(dense[s], ws[s], None, None),
                                                          np.float32), jnp.bfloat16)


def test_deterministic(platform):
  r = rng()
  T, k, N, H = 64, 8, 100, 2816
  y = normal(r, (N, H), jnp.bfloat16)
  w = weights(r, (T, k))
  index = bad_index(r, T, k, N, 0.1)
  dense = normal(r, (T, k, H), jnp.float16)
  o0, d0 = _ours(y, w, index, None), _ours(dense, w, None, jnp.float32)
  for _ in range(5):
    np.testing.assert_array_equal(np.asarray(_ours(y, w, index, None)), np.asarray(o0))
    np.testing.assert_array_equal(np.asarray(_ours(dense, w, None, jnp.float32)), np.asarray(d0))


# ---- bad input: clear errors naming the argument ------------------------------------

Y3 = jnp.ones((4, 2, 16), jnp.bfloat16)
Y2 = jnp.ones((10, 16), jnp.bfloat16)
W = jnp.ones((4, 2), jnp.float32)
IX = jnp.zeros((4, 2), jnp.int32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: jax_moe.combine(jnp.ones((4, 2, 16), jnp.int32), W), TypeError, "y must be float32"),
    (lambda: jax_moe.combine(Y3.astype(jnp.bool_), W), TypeError, "y must be float32"),
    (lambda: jax_moe.combine(Y3, W.astype(jnp.float16)), TypeError, "weights must be float32 or"),
    (lambda: jax_moe.combine(Y3, W.astype(jnp.int32)), TypeError, "weights must be float32 or"),
    (lambda: jax_moe.combine(Y3, jnp.float32(1)), ValueError, "weights must have rank"),
    (lambda: jax_moe.combine(Y2, W), ValueError, "y must have shape .*k, H"),        # rank
    (lambda: jax_moe.combine(jnp.ones((5, 2, 16)), W), ValueError, "y must have shape"),  # T
    (lambda: jax_moe.combine(jnp.ones((4, 3, 16)), W), ValueError, "y must have shape"),  # k
    (lambda: jax_moe.combine(jnp.ones((2, 4, 2, 16)), W), ValueError, "y must have shape"),
    (lambda: jax_moe.combine(Y2, W, IX.astype(jnp.float32)), TypeError, "index must be int32"),
    (lambda: jax_moe.combine(Y2, W, np.zeros((4, 2), np.int64)), TypeError, "index must be int32"),
    (lambda: jax_moe.combine(Y2, W, IX.astype(jnp.int16)), TypeError, "index must be int32"),
    (lambda: jax_moe.combine(Y2, W, jnp.zeros((5, 2), jnp.int32)), ValueError,
     "index must have weights' shape"),                                                 # T
    (lambda: jax_moe.combine(Y2, W, jnp.zeros((4, 3), jnp.int32)), ValueError,
     "index must have weights' shape"),                                                 # k
    (lambda: jax_moe.combine(Y3, W, IX), ValueError, r"y must have rank 2 \[N, H\]"),
    (lambda: jax_moe.combine(Y3, W, out_dtype=jnp.int32), TypeError, "out_dtype"),
    (lambda: jax_moe.combine(Y3, W, out_dtype=jnp.float64), TypeError, "out_dtype"),
    (lambda: jax_moe.combine(Y3, W, out_dtype="nonsense"), TypeError, "out_dtype"),
])
def test_bad_input(call, exc, match):
  with pytest.raises(exc, match=match):
    call()


@pytest.mark.parametrize("args,has_index,match", [
    ((jnp.ones((4, 3, 16)), W, jnp.zeros((0, 0), jnp.int32)), False, "must match weights"),
    ((jnp.ones((4, 2, 16)), W, IX), False, "index must be empty"),
    ((jnp.ones((10, 16)), W, IX.astype(jnp.float32)), True, "index must be int32"),
    ((jnp.ones((10, 16)), W, jnp.zeros((4, 3), jnp.int32)), True, "index must have weights'"),
    ((jnp.ones((4, 2, 16)), W, IX), True, "y must be rank 2"),
    ((jnp.ones((4, 2, 16)), W.astype(jnp.float16), jnp.zeros((0, 0), jnp.int32)), False,
     "weights must be float32 or y's dtype"),
])
def test_handler_revalidates(args, has_index, match):
  """Binding the primitive directly with inconsistent operands gets an error from
  the C++ handler (the abstract eval does not check), not a crash."""
  f = jax.jit(lambda *a: combine_p.bind(*a, has_index=has_index, out_dtype=jnp.dtype("float32")))
  with pytest.raises(Exception, match=match):
    f(*args)[0].block_until_ready()


# ---- XLA's fusion on CUDA instead of the kernel --------------------------------------

def test_uses_kernel_rule(set_heuristic):
  """y's bytes read against COMBINE_XLA_MAX_BYTES; -1 means the kernel always; f32
  rows take the kernel at every size."""
  set_heuristic("COMBINE_XLA_MAX_BYTES", 4 << 20)
  assert not heuristics.combine_uses_kernel(1, 8, 7168, 2)
  assert not heuristics.combine_uses_kernel(256, 8, 1024, 2)      # exactly 4 MiB
  assert heuristics.combine_uses_kernel(257, 8, 1024, 2)
  assert heuristics.combine_uses_kernel(129, 8, 1024, 4)
  assert heuristics.combine_uses_kernel(1, 8, 64, 4)   # f32 rows: the kernel at any size
  set_heuristic("COMBINE_XLA_MAX_BYTES", -1)
  assert heuristics.combine_uses_kernel(0, 8, 64, 2)


def _custom_calls(f, *args):
  return jax.jit(f).lower(*args).as_text().count("jax_moe_combine")


@pytest.mark.gpu
@pytest.mark.parametrize("has_index", [False, True])
def test_small_lowering_switch(set_heuristic, has_index):
  """On CUDA: no custom call at or below the threshold, the kernel above it; both
  agree with the reference."""
  if not gpu_available():
    pytest.skip("no GPU")
  r = rng()
  T, k, H = 3, 8, 256
  w = weights(r, (T, k))
  if has_index:
    y, index = normal(r, (40, H), jnp.bfloat16), bad_index(r, T, k, 40)
  else:
    y, index = normal(r, (T, k, H), jnp.bfloat16), None
  f = lambda y, w: jax_moe.combine(y, w, index)  # noqa: E731
  with jax.default_device(jax.devices("gpu")[0]):
    set_heuristic("COMBINE_XLA_MAX_BYTES", T * k * H * 2)
    assert _custom_calls(f, y, w) == 0
    check(y, w, index)
    set_heuristic("COMBINE_XLA_MAX_BYTES", T * k * H * 2 - 1)
    assert _custom_calls(f, y, w) == 1
    check(y, w, index)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=name)
def test_small_lowering_numerics(set_heuristic, dtype):
  """XLA's fusion on CUDA: every dtype, out-of-range indices, vmap, scan, and
  bitwise-equal repeated runs."""
  if not gpu_available():
    pytest.skip("no GPU")
  set_heuristic("COMBINE_XLA_MAX_BYTES", 1 << 40)
  r = rng()
  T, k, N, H = 5, 8, 30, 72
  with jax.default_device(jax.devices("gpu")[0]):
    y, w = normal(r, (N, H), dtype), weights(r, (T, k))
    index = bad_index(r, T, k, N)
    assert _custom_calls(lambda y, w: jax_moe.combine(y, w, index), y, w) == 0
    out = check(y, w, index, out_dtype=jnp.float32)
    for _ in range(3):
      np.testing.assert_array_equal(np.asarray(_ours(y, w, index, jnp.float32)),
                                    np.asarray(out))
    dense = normal(r, (2, T, k, H), dtype)
    wb = weights(r, (2, T, k))
    got = jax.jit(jax.vmap(jax_moe.combine))(dense, wb)
    for b in range(2):
      assert_close(np.asarray(got[b], np.float32),
                   np.asarray(_ref(dense[b], wb[b], None, None), np.float32), dtype)

    def body(c, xs):
      yd, wd = xs
      o = jax_moe.combine(yd, wd)
      return c + o.astype(jnp.float32).sum(), o
    _, outs = jax.jit(lambda xs: jax.lax.scan(body, jnp.float32(0), xs))((dense, wb))
    for b in range(2):
      assert_close(np.asarray(outs[b], np.float32),
                   np.asarray(_ref(dense[b], wb[b], None, None), np.float32), dtype)


@pytest.mark.parametrize("max_bytes", [0, 2 << 20], ids=["chain", "reduce"])
@pytest.mark.parametrize("k", [0, 1, 2, 8, 9, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=name)
def test_xla_fusion_formulation(set_heuristic, k, dtype, max_bytes):
  """The fusion that runs on CUDA at small sizes (combine._fallback), run here on the
  CPU: a reduction over the slots (both forms) up to COMBINE_XLA_REDUCE_MAX_K slots
  and COMBINE_XLA_REDUCE_MAX_BYTES of rows, the slot-ordered chain otherwise; every
  one agrees with the reference, and the index form's out-of-range slots contribute
  nothing."""
  from jax_moe.combine import _fallback as xla_fusion
  set_heuristic("COMBINE_XLA_REDUCE_MAX_BYTES", max_bytes)
  r = rng()
  T, H, N = 6, 40, 23
  w = weights(r, (T, k))
  y = normal(r, (T, k, H), dtype)
  rows, index = normal(r, (N, H), dtype), bad_index(r, T, k, N)
  for out_dtype in (jnp.float32, jnp.dtype(dtype)):
    dense = functools.partial(xla_fusion, has_index=False, out_dtype=out_dtype)
    jaxpr = str(jax.make_jaxpr(dense)(y, w, jnp.zeros((0, 0), jnp.int32)))
    reduce = k <= heuristics.COMBINE_XLA_REDUCE_MAX_K and T * k * H * y.dtype.itemsize <= max_bytes
    assert ("reduce_sum" in jaxpr) == reduce, jaxpr
    (got,) = jax.jit(dense)(y, w, jnp.zeros((0, 0), jnp.int32))
    assert got.dtype == out_dtype and got.shape == (T, H)
    assert_close(np.asarray(got, np.float32),
                 np.asarray(_ref(y, w, None, out_dtype), np.float32), out_dtype)
    indexed = functools.partial(xla_fusion, has_index=True, out_dtype=out_dtype)
    jaxpr = str(jax.make_jaxpr(indexed)(rows, w, index))
    assert ("reduce_sum" in jaxpr) == reduce, jaxpr
    (got,) = jax.jit(indexed)(rows, w, index)
    assert got.dtype == out_dtype and got.shape == (T, H)
    if reduce:  # the CPU's reduction may add in another order than the chain
      assert_close(np.asarray(got, np.float32),
                   np.asarray(_ref(rows, w, index, out_dtype), np.float32), out_dtype)
    else:
      np.testing.assert_array_equal(np.asarray(got, np.float32),
                                    np.asarray(_ref(rows, w, index, out_dtype), np.float32))
    # no rows at all: every slot is out of range, the sum is zero
    (got,) = jax.jit(indexed)(rows[:0], w, index)
    assert got.shape == (T, H)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.zeros((T, H), np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("has_index", [False, True], ids=["dense", "index"])
@pytest.mark.parametrize("T,H,k", [(1, 7168, 8), (16, 2816, 8), (37, 72, 8), (5, 1000, 8),
                                   (3, 2816, 1), (9, 256, 2), (4, 512, 6)])
def test_small_lowering_reduce_bitwise(set_heuristic, T, H, k, has_index):
  """On CUDA the reduction over the slots (k = 8 measured in runs s18-1 and s19-1)
  gives the bits of the slot-ordered sum: XLA's elemental emitter adds the slots in
  order in one thread (heuristics.py). If an XLA update changes that, this fails and
  COMBINE_XLA_REDUCE_MAX_K must drop (the fused expert_gemv_combine promises the
  bits of the two-call form). The reduction is forced at every size here; the index
  form's out-of-range indices included."""
  if not gpu_available():
    pytest.skip("no GPU")
  set_heuristic("COMBINE_XLA_MAX_BYTES", 1 << 40)
  set_heuristic("COMBINE_XLA_REDUCE_MAX_BYTES", 1 << 40)
  r = rng()
  with jax.default_device(jax.devices("gpu")[0]):
    w = weights(r, (T, k))
    if has_index:
      y, index = normal(r, (T * k + 5, H), jnp.bfloat16), bad_index(r, T, k, T * k + 5)
    else:
      y, index = normal(r, (T, k, H), jnp.bfloat16), None
    assert _custom_calls(lambda y, w: jax_moe.combine(y, w, index), y, w) == 0
    for out_dtype in (jnp.float32, jnp.bfloat16):
      np.testing.assert_array_equal(np.asarray(_ours(y, w, index, out_dtype), np.float32),
                                    np.asarray(_ref(y, w, index, out_dtype), np.float32))
