"""Benchmark jax_moe.route (router matmul fused) against the same routing written as
XLA ops, inside one jitted program per case, with the router-weight bytes over the
measured read bandwidth as the floor.

python benchmarks/bench_route.py --out DIR [--quick] [--tokens 1 4 ...] [--cases ...]

Times our three paths at every T: "fused" (router matmul inside the routing
launch), "dot" (XLA's dot, then the logits-only routing kernel) and "reduce" (the
router matmul as an XLA multiply-reduce fusion, then the same kernel); "ours" is the
one heuristics picks (route_fuse_router, route_router_reduce, route_block_select).
"dot_block" and "reduce_block" are the same two paths with the routing kernel's
one-block-per-token selection (route_block_kernel) forced in place of one warp per
token; "fused_block" the one-launch kernel with that selection
(route_gemv_block_kernel). The crossovers are set from these columns.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402
import harness  # noqa: E402

import jax_moe  # noqa: E402
from jax_moe import _device  # noqa: E402

CASES = {
    "deepseek_v3": dict(H=7168, E=256, k=8, scoring="sigmoid", num_groups=8, top_groups=4,
                        group_score="top2_sum", scaling_factor=2.5, bias=True, scale=False),
    "gemma4": dict(H=2816, E=128, k=8, scoring="softmax", num_groups=1, top_groups=1,
                   group_score="top2_sum", scaling_factor=1.0, bias=False, scale=True),
    "qwen3": dict(H=2048, E=128, k=8, scoring="softmax", num_groups=1, top_groups=1,
                  group_score="top2_sum", scaling_factor=1.0, bias=False, scale=False),
}


def _patched(fn, **attrs):
  """fn traced with the given jax_moe.heuristics attributes replaced (restored after)."""
  def wrapped(*args):
    h = jax_moe.heuristics
    saved = {n: getattr(h, n) for n in attrs}
    for n, v in attrs.items():
      setattr(h, n, v)
    try:
      return fn(*args)
    finally:
      for n, v in saved.items():
        setattr(h, n, v)
  return wrapped


def _forced(mode, fn):
  """fn traced with the router path forced: "fused" (router matmul in our kernel),
  "dot" (XLA's dot) or "reduce" (an XLA multiply-reduce fusion), each followed by
  our routing kernel."""
  names = ("ROUTE_FUSED_MAX_TOKENS", "ROUTE_REDUCE_MIN_TOKENS", "ROUTE_REDUCE_MAX_TOKENS",
           "ROUTE_REDUCE_MAX_BYTES")
  values = {"fused": (1 << 30, 1, -1, 0), "dot": (-1, 1, -1, 0),
            "reduce": (-1, 0, 1 << 30, 1 << 62)}[mode]
  return _patched(fn, **dict(zip(names, values)))


def _block(fn):
  """fn traced with the logits path's block selection forced (E <= 256)."""
  return _patched(fn, ROUTE_BLOCK_SELECT_MAX_TOKENS=1 << 30)


def _fused_block(fn):
  """fn traced with the one-launch block-selection kernel forced (E <= 256, 16-bit)."""
  return _patched(fn, ROUTE_FUSED_BLOCK_MAX_TOKENS=1 << 30)


def _splits(n, fn):
  """fn traced with the fused kernel's k_splits forced to n (k_splits <= 8 runs the
  cluster kernel on sm_90, more the split-K kernel with global partials)."""
  return _patched(fn, route_k_splits=lambda hidden: n)


def run(out_dir, quick=False, tokens=None, case_names=None, fused_splits=()):
  tokens = tokens or ([1, 4, 16] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 1024])
  cases = {"qwen3": CASES["qwen3"]} if quick else {n: CASES[n] for n in (case_names or CASES)}
  l2 = _device.l2_bytes()
  read_bw = harness.measure_read_bandwidth(64 << 20 if quick else 1 << 30)
  rows = []
  key = jax.random.PRNGKey(0)
  for name, c in cases.items():
    H, E, k = (256, 64, 4) if quick else (c["H"], c["E"], c["k"])
    wbytes = E * H * 2
    copies = harness.rotation_count(wbytes, l2, max_sets=32)
    key, kw_, kb, ks = jax.random.split(key, 4)
    routers = [harness.random_array(jax.random.fold_in(kw_, i), (E, H), jnp.bfloat16,
                                    1 / np.sqrt(H)) for i in range(copies)]
    kw = dict(scoring=c["scoring"], num_groups=c["num_groups"] if not quick else 1,
              top_groups=c["top_groups"] if not quick else 1, group_score=c["group_score"],
              scaling_factor=c["scaling_factor"],
              correction_bias=(jax.random.normal(kb, (E,)) * 0.05) if c["bias"] else None,
              expert_scale=(jax.random.uniform(ks, (E,)) + 0.5) if c["scale"] else None)
    for T in tokens:
      n_calls = max(copies, 32 if T <= 64 else 8)
      xs = [harness.random_array(jax.random.fold_in(key, 1000 * T + i), (T, H), jnp.bfloat16)
            for i in range(n_calls)]
      # route's outputs cannot feed the next call: harness.time_loop chains the calls
      # through a tiny fusion (subtracted for ours; XLA fuses it into its own ops).
      sets = [(xs[i], routers[i % copies]) for i in range(n_calls)]
      ours_fn = lambda x, w: jax_moe.route(x, k, router_weight=w, **kw)  # noqa: E731
      # A few us per call: longer loops and more repeats than the default (medians
      # of 5 short loops moved by up to 4 us between runs of one machine, s6-8).
      tl = dict(repeats=3 if quick else 9, target_seconds=0.05 if quick else 0.2)
      fused = harness.time_loop(_forced("fused", ours_fn), sets, **tl)
      dot = harness.time_loop(_forced("dot", ours_fn), sets, **tl)
      red = harness.time_loop(_forced("reduce", ours_fn), sets, **tl)
      dot_b = harness.time_loop(_forced("dot", _block(ours_fn)), sets, **tl)
      red_b = harness.time_loop(_forced("reduce", _block(ours_fn)), sets, **tl)
      fused_b = harness.time_loop(_fused_block(ours_fn), sets, **tl)
      extra = {f"us_fused_ks{n}": harness.time_loop(_forced("fused", _splits(n, ours_fn)), sets,
                                                    **tl) * 1e6 for n in fused_splits}
      xla = harness.time_loop(lambda x, w: baselines.route(x, k, router_weight=w, **kw), sets,
                              net=False, **tl)
      h = jax_moe.heuristics
      path = ("fused_block" if h.route_fused_block(T, E, H, 2) else
              "fused" if h.route_fuse_router(T, E, H) else
              "reduce" if h.route_router_reduce(T, E, H, 2) else "dot")
      if path in ("dot", "reduce") and h.route_block_select(T, E):
        path += "_block"
      ours = {"fused": fused, "dot": dot, "reduce": red, "dot_block": dot_b,
              "reduce_block": red_b, "fused_block": fused_b}[path]
      floor = (wbytes + T * H * 2) / read_bw
      rows.append(dict(case=name, T=T, E=E, H=H, us_ours=ours * 1e6, us_fused=fused * 1e6,
                       us_dot=dot * 1e6, us_reduce=red * 1e6, us_dot_block=dot_b * 1e6,
                       us_reduce_block=red_b * 1e6, us_fused_block=fused_b * 1e6,
                       us_xla=xla * 1e6,
                       us_floor=floor * 1e6, speedup=xla / ours, x_floor=ours / floor,
                       path=path, k_splits=h.route_k_splits(H), **extra))
      print(f"route {name} T={T}: fused {fused*1e6:.2f} us, dot {dot*1e6:.2f} us, "
            f"reduce {red*1e6:.2f} us, dot+block {dot_b*1e6:.2f} us, "
            f"reduce+block {red_b*1e6:.2f} us, fused+block {fused_b*1e6:.2f} us, "
            f"xla {xla*1e6:.2f} us", flush=True)
  payload = dict(device=harness.device_description(), read_bw_GBps=read_bw / 1e9, rows=rows)
  harness.write_json(os.path.join(out_dir, "route.json"), payload)
  print(f"\nroute ({payload['device']}, read {read_bw/1e9:.0f} GB/s; floor = router bytes / read bw)")
  harness.print_table(rows, [("case", "{}"), ("T", "{}"), ("path", "{}"), ("us_ours", "{:.2f}"),
                             ("us_fused", "{:.2f}")] +
                            [(f"us_fused_ks{n}", "{:.2f}") for n in fused_splits] +
                            [("us_dot", "{:.2f}"), ("us_reduce", "{:.2f}"),
                             ("us_dot_block", "{:.2f}"), ("us_reduce_block", "{:.2f}"),
                             ("us_fused_block", "{:.2f}"),
                             ("us_xla", "{:.2f}"),
                             ("speedup", "{:.2f}x"), ("us_floor", "{:.2f}"),
                             ("x_floor", "{:.2f}"), ("k_splits", "{}")])
  return payload


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="out")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--tokens", nargs="+", type=int, default=None)
  ap.add_argument("--cases", nargs="+", default=None, choices=sorted(CASES))
  ap.add_argument("--fused-splits", nargs="+", type=int, default=(),
                  help="extra fused columns with k_splits forced (A/B of the kernels)")
  a = ap.parse_args()
  harness.require_kernels("bench_route")
  run(a.out, a.quick, a.tokens, a.cases, tuple(a.fused_splits))
