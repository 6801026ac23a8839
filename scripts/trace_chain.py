"""Where a decode step's time goes on the GPU: the kernels of a jitted layer chain, from
a profiler trace (jax.profiler, parsed with jax.profiler.ProfileData; no TensorBoard).

  PYTHONPATH=. python scripts/trace_chain.py [--shapes gemma4 qwen3] [--tokens 1 8]
                                             [--chains moe gemv] [--layers 8] [--steps 20]
                                             [--impls auto grouped:capacity]

Chains (each layer's input is the previous layer's output, as in the benchmarks):
  moe   x <- rms(moe_block(x, params))        (benchmarks/bench_moe.py's loop), once per
        --impls entry: "auto", "gemv", "grouped" or "grouped:METHOD" (MoEConfig's
        implementation and grouped_method), e.g. to see what "auto"'s priced plan adds
        to the capacity path at 128 tokens
  gemv  x <- expert_gemv_combine(x, ids_l, w_l, ...)   (benchmarks/bench_gemv.py's)
For every kernel of one layer, in stream order from the routing kernel (the experts
kernel in the gemv chain): its mean duration and the mean idle time on the stream
before it starts (the previous kernel's end to its start), over the traced layers.
"layer" is the mean time from one such kernel's start to the next; "busy" the sum of
kernel durations in it.
Layers with extra events (the loop's own, once per step) are counted apart. Absolute times
come from the CUPTI timestamps of one traced run: for comparisons between kernels of
one chain, not a replacement for the benchmarks' timed loops.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import sys
import tempfile
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import harness  # noqa: E402

import jax_moe  # noqa: E402
from jax_moe import moe as moe_lib  # noqa: E402
from jax_moe.moe import MoEConfig, moe_block  # noqa: E402
from jax_moe.shapes import SHAPES  # noqa: E402


def _rms(y, dtype):
  y = y.astype(jnp.float32)
  return (y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6)).astype(dtype)


def kernel_events(xplane_path):
  """[(start_ns, end_ns, name)] of the busiest GPU stream line in the trace."""
  from jax.profiler import ProfileData
  pd = ProfileData.from_file(xplane_path)
  best = []
  for plane in pd.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if not line.name.lower().startswith("stream"):
        continue
      evs = [(float(e.start_ns), float(e.start_ns) + float(e.duration_ns), e.name)
             for e in line.events]
      if len(evs) > len(best):
        best = evs
  return sorted(best)


def short(name: str) -> str:
  """A kernel's name without template arguments and parameters."""
  name = re.sub(r"<.*", "", name)
  name = re.sub(r"\(.*", "", name)
  return name.split("::")[-1][:40]


# A layer's anchor: its routing kernel (one per moe_block layer, whatever path the
# experts take: the shared experts may add a second experts kernel, the grouped path
# none), or, in a chain without routing, its first experts kernel.
ROUTE_KERNEL = re.compile(r"route_\w*kernel")
EXPERTS_KERNEL = re.compile(r"gemv_stream_kernel|gemv_mma_kernel|gemv_generic_kernel")


def layer_table(events):
  """Cycles of the chain, each from one anchor kernel (see ROUTE_KERNEL) to the next:
  per position in the most common cycle, (name, mean duration us, mean gap before
  us), that cycle's mean period and kernel time; and the other cycles (those with
  extra events, e.g. the loop's own once per step)."""
  anchors = [i for i, ev in enumerate(events) if ROUTE_KERNEL.search(ev[2])]
  if len(anchors) < 3:
    anchors = [i for i, ev in enumerate(events) if EXPERTS_KERNEL.search(ev[2])]
    anchors = [i for j, i in enumerate(anchors) if j == 0 or i > anchors[j - 1] + 1]
  cycles = [events[anchors[j]:anchors[j + 1]] for j in range(1, len(anchors) - 1)]
  if not cycles:
    return [], 0.0, 0.0, 0, 0.0
  lengths = [len(c) for c in cycles]
  m = max(set(lengths), key=lengths.count)
  rows = defaultdict(lambda: [0.0, 0.0, 0])
  names = {}
  periods, other = [], []
  for j, c in enumerate(cycles):
    nxt = events[anchors[j + 2]][0]
    if len(c) != m:
      other.append(nxt - c[0][0])
      continue
    periods.append(nxt - c[0][0])
    i0 = anchors[j + 1]
    for pos, (s, e, name) in enumerate(c):
      gap = s - events[i0 + pos - 1][1]
      r = rows[pos]
      r[0] += e - s
      r[1] += gap
      r[2] += 1
      names[pos] = short(name)
  out = [(names[p], rows[p][0] / rows[p][2] / 1e3, rows[p][1] / rows[p][2] / 1e3)
         for p in sorted(rows)]
  period = float(np.mean(periods)) / 1e3
  busy = sum(d for _, d, _ in out)
  extra = float(np.mean(other)) / 1e3 - period if other else 0.0
  return out, period, busy, len(other), extra


def trace(fn, args, steps):
  d = tempfile.mkdtemp(prefix="jax_moe_trace_")
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  jax.profiler.start_trace(d)
  jax.block_until_ready(fn(*args))
  jax.profiler.stop_trace()
  paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise RuntimeError(f"no trace written under {d}")
  return kernel_events(paths[0])


def impl_fields(impl: str) -> dict:
  """MoEConfig fields for an --impls entry: "auto", "gemv", "grouped" or
  "grouped:METHOD"."""
  name, _, method = impl.partition(":")
  if name not in ("auto", "gemv", "grouped") or (method and name != "grouped") or \
      (method and method not in moe_lib.GROUPED_METHODS):
    raise ValueError(f"--impls: unknown {impl!r}; auto, gemv, grouped or grouped:METHOD "
                     f"with METHOD in {sorted(moe_lib.GROUPED_METHODS)}")
  return dict(implementation=name, grouped_method=method or "auto")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", nargs="+", default=["gemma4", "qwen3"], choices=sorted(SHAPES))
  ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64])
  ap.add_argument("--chains", nargs="+", default=["moe", "gemv"], choices=["moe", "gemv"])
  ap.add_argument("--layers", type=int, default=8, help="layer calls per loop step")
  ap.add_argument("--steps", type=int, default=20, help="loop steps traced")
  ap.add_argument("--impls", nargs="+", default=["auto"],
                  help='moe chain: "auto", "gemv", "grouped" or "grouped:METHOD"')
  a = ap.parse_args(argv)
  try:
    impls = [(impl, impl_fields(impl)) for impl in a.impls]
  except ValueError as e:
    ap.error(str(e))
  for name in ("layers", "steps"):
    if getattr(a, name) < 1:
      ap.error(f"--{name} must be at least 1, got {getattr(a, name)}")
  if min(a.tokens) < 1:
    ap.error(f"--tokens must be at least 1, got {min(a.tokens)}")
  if jax.devices()[0].platform != "gpu":
    print("trace_chain: no GPU (the trace reads CUDA kernel timestamps); nothing to do")
    return 0
  for sname in a.shapes:
    shape = SHAPES[sname]
    config = MoEConfig.from_shape(shape)
    key = jax.random.PRNGKey(0)
    params = jax.block_until_ready(moe_lib.example_params(key, shape, jnp.bfloat16))
    E, H, k = shape.num_experts, shape.hidden, shape.top_k
    for T in a.tokens:
      x0 = harness.random_array(jax.random.fold_in(key, T), (T, H), jnp.bfloat16)
      runs = [("moe", impl, fields) for impl, fields in impls if "moe" in a.chains]
      runs += [("gemv", "", None)] if "gemv" in a.chains else []
      for chain, impl, fields in runs:
        if chain == "moe":
          cfg = dataclasses.replace(config, **fields)
          step = lambda x, p, cfg=cfg: _rms(moe_block(x, p, cfg), x.dtype)  # noqa: E731
          layer_args = [(params,)] * a.layers
        else:
          rng = np.random.default_rng(T)
          layer_args = []
          for _ in range(a.layers):
            ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
            w = jax.nn.softmax(jnp.asarray(rng.standard_normal((T, k)), jnp.float32), -1)
            layer_args.append((jnp.asarray(ids), w))
          step = lambda x, ids, w: jax_moe.expert_gemv_combine(  # noqa: E731
              x, ids, w, params.w_gate_up, params.w_down, activation=config.activation)
        fn = harness.chain_program(step, a.steps)
        events = trace(fn, (x0, layer_args), a.steps)
        rows, period, busy, n_other, extra = layer_table(events)
        label = f"{chain} {impl}" if impl else chain
        print(f"\n{sname} T={T} chain={label}: {len(events)} kernels traced, "
              f"{len(rows)} per layer; layer {period:.1f} us, kernels busy {busy:.1f} us; "
              f"{n_other} layers with other events (+{extra:.1f} us each)")
        print(f"  {'kernel':40s} {'us':>8s} {'gap_us':>8s}")
        for name, dur, gap in rows:
          print(f"  {name:40s} {dur:8.2f} {gap:8.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
