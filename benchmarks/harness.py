"""Timing harness shared by the benchmarks (METHOD: count bytes first, time inside a
jitted program, never on zeros, baselines and the HBM floor in the same run).

time_op(fn, arg_sets) compiles ONE jitted program that calls fn once per argument
set, back to back on the device (as a decode loop does, layer after layer), and
returns the median wall time per call over several runs. Why not a fori_loop: XLA
hoists loop-invariant work (our custom calls included) out of while loops, and any
op that makes the inputs loop-dependent is an extra kernel inside the timing. So the
caller passes distinct argument sets (distinct inputs, so nothing is CSE'd; weights
rotated over enough copies to miss L2), and every output stays live.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def device_description() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '?')}"


def require_kernels(name: str) -> None:
  """Exit (status 2) when the default device is a GPU but the CUDA extension is not
  loaded: jax_moe's primitives would lower to their jnp fallbacks, and the run would
  time those as ours (session 16's run s16-4 did exactly that on a fresh machine).
  JAX_MOE_BENCH_ALLOW_FALLBACK=1 times the fallbacks on purpose."""
  import jax_moe
  allow = os.environ.get("JAX_MOE_BENCH_ALLOW_FALLBACK", "0")
  if allow not in ("0", "1"):
    raise SystemExit(f"{name}: JAX_MOE_BENCH_ALLOW_FALLBACK must be 0 or 1, got {allow!r}")
  info = jax_moe.build_info()
  if jax.devices()[0].platform != "gpu" or info["cuda_targets"]:
    return
  if allow == "1":
    print(f"{name}: warning: no CUDA extension; timing the jnp fallbacks", file=sys.stderr)
    return
  raise SystemExit(f"{name}: the default device is a GPU but jax_moe's CUDA extension is not "
                   f"loaded ({info['errors'] or 'not built'}); build it first "
                   f"(scripts/gpu_check.sh OUT build), or set JAX_MOE_BENCH_ALLOW_FALLBACK=1 to "
                   f"time the jnp fallbacks")


def _block(tree):
  jax.tree.map(lambda a: a.block_until_ready(), tree)


def time_op(fn: Callable, arg_sets: Sequence[tuple], *, repeats: int = 7) -> float:
  """Median seconds per call of fn(*args) over the calls on arg_sets in one program."""
  arg_sets = [tuple(a) for a in arg_sets]

  @jax.jit
  def run(sets):
    return [fn(*a) for a in sets]

  _block(run(arg_sets))  # compile and warm up
  _block(run(arg_sets))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _block(run(arg_sets))
    times.append((time.perf_counter() - t0) / len(arg_sets))
  return statistics.median(times)


def time_chain(step: Callable, x0, layer_args: Sequence[tuple], *, repeats: int = 5,
               target_seconds: float = 0.05) -> float:
  """Median seconds per step call in a jitted decode-style loop.

  x_{j+1} = step(x_j, *layer_args[j % L]) inside a `fori_loop`, the L layer calls
  unrolled in the loop body: x is the loop carry, so every call depends on the
  previous one (nothing can be hoisted out of the loop), and each layer has its own
  arguments (distinct ids/weights, passed as jit arguments, never sliced).
  """
  layer_args = [tuple(a) for a in layer_args]
  L = len(layer_args)
  return _time_loop_program(lambda n: chain_program(step, n), (x0, layer_args), L, repeats,
                            target_seconds)


def chain_program(step: Callable, n_iter: int):
  """time_chain's jitted program: run(x, layer_args) -> x after n_iter loop steps of
  x = step(x, *a) for each a in layer_args (scripts/trace_chain.py traces it too)."""
  @jax.jit
  def run(x, args):
    def body(i, x):
      for a in args:
        x = step(x, *a)
      return x
    return jax.lax.fori_loop(0, n_iter, body, x)
  return run


def _time_loop_program(make: Callable, args: tuple, calls: int, repeats: int,
                       target_seconds: float) -> float:
  """Median seconds per call of make(n_iter)(*args), a jitted loop of n_iter
  iterations with `calls` calls each; n_iter sized from one probe iteration so that
  a run takes about target_seconds."""
  probe = make(1)
  _block(probe(*args))
  t0 = time.perf_counter()
  _block(probe(*args))
  per_iter = max(time.perf_counter() - t0, 1e-6)
  n_iter = int(max(2, min(1000, target_seconds / per_iter)))
  run = make(n_iter)
  _block(run(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _block(run(*args))
    times.append((time.perf_counter() - t0) / (n_iter * calls))
  return statistics.median(times)


def time_loop(fn: Callable, arg_sets: Sequence[tuple], *, repeats: int = 5,
              net: bool = True, target_seconds: float = 0.05) -> float:
  """Seconds per call of an op whose output cannot feed its next call (combine,
  route): a jitted `fori_loop` whose body calls fn once per argument set, the calls
  chained through a tiny fusion (call j's smallest float argument gets
  `+ 1e-30 * out_{j-1}[0]`, so nothing is loop-invariant; the factor is non-zero so
  that no simplifier may drop the dependence), and whose carry is the tuple of ALL
  the calls' whole outputs, so XLA must compute every output in full every
  iteration.

  Why all of them: the first version carried only the last call's output and fed
  the others only through element [0]; XLA then computed one element of its own
  combine (einsum) for every other call, which timed at an impossible 17 TB/s
  (RESULTS.md, sessions 1-5). Our custom calls always compute everything, so only
  the XLA baselines were affected.

  net=True subtracts the same loop with fn replaced by that fusion alone (right for
  custom calls, where the fusion is a separate kernel). For XLA-native fns pass
  net=False: XLA fuses the add into the op.
  """
  arg_sets = [tuple(a) for a in arg_sets]
  L = len(arg_sets)
  small = min((i for i, a in enumerate(arg_sets[0])
               if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)),
              key=lambda i: arg_sets[0][i].size)

  def timed(f):
    return _time_loop_program(lambda n: loop_program(f, arg_sets, small, n),
                              (loop_init(f, arg_sets), arg_sets), L, repeats, target_seconds)

  raw = timed(fn)
  if not net:
    return raw
  base = timed(lambda *a: a[small])
  return max(raw - base, 0.0)


def loop_program(f: Callable, arg_sets: Sequence[tuple], small: int, n_iter: int):
  """time_loop's jitted program: run(outs, sets) -> the tuple of every call's output
  after n_iter iterations (see time_loop)."""
  @jax.jit
  def run(outs, sets):
    def body(i, outs):
      prev = outs[-1]
      new = []
      for a in sets:
        a = list(a)
        s = jax.tree.leaves(prev)[0].reshape(-1)[0].astype(jnp.float32)
        a[small] = a[small] + (s * 1e-30).astype(a[small].dtype)
        prev = f(*a)
        new.append(prev)
      return tuple(new)
    return jax.lax.fori_loop(0, n_iter, body, outs)
  return run


def loop_init(f: Callable, arg_sets: Sequence[tuple]):
  """Zero outputs of every call: the initial carry of loop_program."""
  return tuple(jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), jax.eval_shape(f, *a))
               for a in arg_sets)


def rotation_count(bytes_per_set: int, l2_bytes: int, max_sets: int = 16) -> int:
  """How many argument copies to rotate so that consecutive calls miss L2: enough
  that the sets together exceed twice the L2 size."""
  if bytes_per_set <= 0:
    return 1
  return int(max(1, min(max_sets, -(-2 * l2_bytes // bytes_per_set))))


def measure_read_bandwidth(nbytes: int = 1 << 30, sets: int = 4) -> float:
  """Streaming read rate (bytes/s) for the HBM floor: the fastest of several XLA
  reductions (f32 sum of bf16, u32 max, u32 row sums) over `sets` distinct random
  arrays of nbytes each, timed as one program. XLA's bf16 sum alone read at 2.4-2.7
  TB/s on an H100 where a streaming kernel reads at 3.1 (scripts/stream_probe.cu):
  a floor from it alone is lenient, so a CUDA read kernel's rate is added when the
  GPU script provides it (JAX_MOE_READ_BW_GBPS). Each candidate's rate is kept in
  READ_BANDWIDTH_CANDIDATES for the benchmark logs."""
  key = jax.random.PRNGKey(0)
  u = [jax.random.bits(jax.random.fold_in(key, i), (nbytes // 4,), jnp.uint32)
       for i in range(sets)]
  b = [jax.lax.bitcast_convert_type(a.reshape(-1, 2), jnp.bfloat16).reshape(-1) for a in u]
  cands = {
      "bf16_sum_f32": (lambda a: jnp.sum(a, dtype=jnp.float32), b),
      "u32_max": (jnp.max, u),
      "u32_row_sums": (lambda a: jnp.sum(a.reshape(-1, 8192), axis=1), u),
  }
  rates = {}
  for name, (fn, arrays) in cands.items():
    rates[name] = nbytes / time_op(fn, [(a,) for a in arrays])
  del u, b
  # scripts/gpu_check.sh measures a plain CUDA streaming read (stream_probe
  # --read-bw, 4 GiB) on the same GPU in the same call and passes it here.
  env = os.environ.get("JAX_MOE_READ_BW_GBPS")
  if env:
    try:
      gbps = float(env)
    except ValueError:
      gbps = float("nan")
    if not (gbps > 0 and gbps != float("inf")):
      raise ValueError(f"JAX_MOE_READ_BW_GBPS must be a positive number of GB/s, got {env!r}")
    rates["cuda_read_kernel"] = gbps * 1e9
  READ_BANDWIDTH_CANDIDATES.clear()
  READ_BANDWIDTH_CANDIDATES.update(rates)
  return max(rates.values())


READ_BANDWIDTH_CANDIDATES: dict = {}


def measure_copy_bandwidth(nbytes: int = 2 << 30) -> float:
  """Device copy rate (bytes read + written per second) of an elementwise op."""
  n = nbytes // 2
  x = jax.random.normal(jax.random.PRNGKey(1), (n,), jnp.bfloat16)
  y = x + jnp.bfloat16(1)
  t = time_op(lambda a: a * jnp.bfloat16(1.5), [(x,), (y,)])
  del x, y
  return 2 * nbytes / t


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, default=float)


def print_table(rows: list[dict], cols: list[tuple[str, str]], file=sys.stdout) -> None:
  """cols: (key, format) pairs, e.g. ("us_ours", "{:.1f}")."""
  heads = [c for c, _ in cols]
  cells = [[(fmt.format(r[c]) if r.get(c) is not None else "-") for c, fmt in cols]
           for r in rows]
  widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h)
            for i, h in enumerate(heads)]
  print("  ".join(h.rjust(w) for h, w in zip(heads, widths)), file=file)
  for row in cells:
    print("  ".join(c.rjust(w) for c, w in zip(row, widths)), file=file)
  file.flush()


def random_array(key, shape, dtype, scale=1.0):
  """Random normal data drawn directly in `dtype` (a 22 GB bf16 weight must not
  pass through a 44 GB f32 temporary)."""
  return (jax.random.normal(key, shape, dtype) * jnp.asarray(scale, dtype)).astype(dtype)


def np_rng(seed=0):
  return np.random.default_rng(seed)
