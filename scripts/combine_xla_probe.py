"""Probe: which XLA formulation of combine's sum is fastest at small sizes on this GPU,
and which of them add in slot order (bitwise equal to reference.combine's k-ordered
sum)? Times each with harness.time_loop (raw: the chaining fusion fused where XLA can)
and writes each loop's optimized HLO fusion count.

  python scripts/combine_xla_probe.py OUT_DIR
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import harness  # noqa: E402

from jax_moe import reference  # noqa: E402

out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
os.makedirs(out_dir, exist_ok=True)
f32 = jnp.float32


def ref_unrolled(y, w):
  return reference.combine(y, w)


def reduce_sum(y, w):
  return jnp.sum(y.astype(f32) * w[..., None], axis=1).astype(y.dtype)


def einsum_f32(y, w):
  return jnp.einsum("tkh,tk->th", y.astype(f32), w).astype(y.dtype)


def bf16_sum(y, w):
  return (y * w[..., None].astype(y.dtype)).sum(1)


def unrolled_first(y, w):  # acc starts at slot 0's product (no zeros)
  acc = w[:, 0, None] * y[:, 0].astype(f32)
  for j in range(1, y.shape[1]):
    acc = acc + w[:, j, None] * y[:, j].astype(f32)
  return acc.astype(y.dtype)


def fori_k(y, w):  # slot loop as fori_loop (sequential by construction)
  def body(j, acc):
    return acc + w[:, j, None] * jax.lax.dynamic_index_in_dim(y, j, 1, False).astype(f32)
  return jax.lax.fori_loop(0, y.shape[1], body, jnp.zeros((y.shape[0], y.shape[2]), f32)
                           ).astype(y.dtype)


FORMS = dict(ref_unrolled=ref_unrolled, reduce_sum=reduce_sum, einsum_f32=einsum_f32,
             bf16_sum=bf16_sum, unrolled_first=unrolled_first, fori_k=fori_k)


# Index form: rows [N, H], index [T, k]; an index outside [0, N) must contribute
# nothing (xla_gather clamps instead: the benchmark's baseline, not our semantics).
def idx_ref(rows, w, index):
  return reference.combine(rows, w, index)


def idx_xla_gather(rows, w, index):
  return jnp.einsum("tkh,tk->th", rows[index].astype(f32), w).astype(rows.dtype)


def idx_take_fill_unrolled(rows, w, index):  # gather with fill for out-of-range
  g = jnp.take(rows, index, axis=0, mode="fill", fill_value=0).astype(f32)
  acc = w[:, 0, None] * g[:, 0]
  for j in range(1, index.shape[1]):
    acc = acc + w[:, j, None] * g[:, j]
  return acc.astype(rows.dtype)


def idx_take_fill_einsum(rows, w, index):
  g = jnp.take(rows, index, axis=0, mode="fill", fill_value=0).astype(f32)
  return jnp.einsum("tkh,tk->th", g, w).astype(rows.dtype)


def idx_per_slot(rows, w, index):  # one [T, H] gather per slot, masked product
  N = rows.shape[0]
  acc = None
  for j in range(index.shape[1]):
    i = index[:, j]
    ok = (i >= 0) & (i < N)
    term = jnp.where(ok[:, None], w[:, j, None] * rows[jnp.clip(i, 0, N - 1)].astype(f32), 0.0)
    acc = term if acc is None else acc + term
  return acc.astype(rows.dtype)


def idx_mask_reduce(rows, w, index):  # masked gather, then a reduction (the library's)
  g = reference.gather_rows(rows, index)
  return jnp.sum(g * w[..., None], axis=1).astype(rows.dtype)


def idx_fill_reduce(rows, w, index):  # gather with fill for out-of-range, then a reduction
  g = jnp.take(rows, index, axis=0, mode="fill", fill_value=0).astype(f32)
  return jnp.sum(g * w[..., None], axis=1).astype(rows.dtype)


IDX_FORMS = dict(idx_ref=idx_ref, idx_mask_reduce=idx_mask_reduce,
                 idx_fill_reduce=idx_fill_reduce, idx_xla_gather=idx_xla_gather,
                 idx_take_fill_unrolled=idx_take_fill_unrolled,
                 idx_take_fill_einsum=idx_take_fill_einsum, idx_per_slot=idx_per_slot)


def env_ints(name, default):
  """Positive integers from a comma-separated environment variable, or default."""
  text = os.environ.get(name)
  if not text:
    return default
  try:
    vals = tuple(int(v) for v in text.split(","))
  except ValueError:
    vals = ()
  if not vals or min(vals) < 1:
    raise SystemExit(f"combine_xla_probe: {name} must be positive integers separated by "
                     f"commas, got {text!r}")
  return vals


TOKENS = (1, 4) if jax.devices()[0].platform == "cpu" else (1, 4, 16, 64, 128, 256)
TOKENS = env_ints("PROBE_TOKENS", TOKENS)  # a shorter run: PROBE_TOKENS=1,16,1024
(MIN_SETS,) = env_ints("PROBE_SETS", (16,))[:1]  # distinct input sets, small sizes
if os.environ.get("PROBE_FORMS"):  # a subset of the formulations, by name
  keep = set(os.environ["PROBE_FORMS"].split(","))
  unknown = sorted(keep - set(FORMS) - set(IDX_FORMS))
  if unknown:
    raise SystemExit(f"combine_xla_probe: PROBE_FORMS names unknown formulations {unknown}; "
                     f"known: {sorted(FORMS) + sorted(IDX_FORMS)}")
  FORMS = {n: f for n, f in FORMS.items() if n in keep}
  IDX_FORMS = {n: f for n, f in IDX_FORMS.items() if n in keep}
on_gpu = jax.devices()[0].platform == "gpu"
l2 = 50 << 20
if on_gpu:
  from jax_moe import _device
  l2 = _device.l2_bytes() or l2
copy_bw = harness.measure_copy_bandwidth((2 << 30) if on_gpu else (16 << 20))
print(f"device {harness.device_description()}  copy {copy_bw / 1e9:.0f} GB/s (read + written)")


def make_sets(T, H, k, indexed):
  """Device-drawn random sets, enough that one loop's inputs exceed twice the L2
  (at least MIN_SETS while that fits in 4 GiB): the timed calls read DRAM, not L2."""
  set_bytes = T * k * H * 2
  n = max(harness.rotation_count(set_bytes, l2, max_sets=32), 2)
  if set_bytes * MIN_SETS <= (4 << 30):
    n = max(n, MIN_SETS)
  sets = []
  for i in range(n):
    ky, kw, kp = jax.random.split(jax.random.PRNGKey(T * 7919 + H * 31 + i), 3)
    w = jax.random.uniform(kw, (T, k), f32, 0.05, 1.0)
    if indexed:
      rows = jax.random.normal(ky, (T * k, H), jnp.bfloat16)
      index = jax.random.permutation(kp, T * k).astype(jnp.int32).reshape(T, k)
      sets.append((rows, w, index))
    else:
      sets.append((jax.random.normal(ky, (T, k, H), jnp.bfloat16), w))
  return sets


def probe(forms, indexed):
  ref = "idx_ref" if indexed else "ref_unrolled"
  print(("index form" if indexed else "dense form") + ": H T sets " + " ".join(forms) +
        f"   (us, raw loop time)   | bitwise equal to {ref}   | % of copy bandwidth")
  for H in (7168, 2816):
    for T in TOKENS:
      k = 8
      sets = make_sets(T, H, k, indexed)
      nbytes = T * k * H * 2 + T * H * 2 + T * k * 4 * (2 if indexed else 1)
      want = np.asarray(jax.jit(idx_ref if indexed else ref_unrolled)(*sets[0]).astype(f32))
      times, eq = [], []
      for name, fn in forms.items():
        times.append(harness.time_loop(fn, sets, net=False, repeats=5) * 1e6)
        got = np.asarray(jax.jit(fn)(*sets[0]).astype(f32))
        eq.append("=" if np.array_equal(got, want) else "x")
        if T == 1:
          prog = harness.loop_program(fn, sets[:4], 1, 10)
          txt = prog.lower(harness.loop_init(fn, sets[:4]), sets[:4]).compile().as_text()
          with open(os.path.join(out_dir, f"combine_{name}_H{H}.hlo.txt"), "w") as f:
            f.write(txt)
      pct = [100 * nbytes / (t * 1e-6) / copy_bw for t in times]
      print(f"{H} {T} {len(sets)} " + " ".join(f"{t:.2f}" for t in times) + "   | " +
            " ".join(eq) + "   | " + " ".join(f"{p:.0f}" for p in pct), flush=True)
      del sets


probe(FORMS, False)
probe(IDX_FORMS, True)
