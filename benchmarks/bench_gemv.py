"""Benchmark the decode experts: jax_moe.expert_gemv + combine against the best
XLA-native formulations (gather the selected experts' weights; sort + ragged_dot)
and the HBM floor, all in one run. Each is timed as a chain of layers inside a
jitted loop (harness.time_chain): x -> combine(expert_gemv(x, ids_l, ...), w_l), as
two calls (variant specs without f) and as one (expert_gemv_combine, specs with f).

floor = bytes of the distinct experts' weights the routing selects / read bandwidth
measured in the same run (a streaming reduction over 1 GiB sets).

python benchmarks/bench_gemv.py --out DIR [--quick] [--shapes gemma4,qwen3] [--tokens 1,8]
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
from jax_moe.shapes import SHAPES  # noqa: E402

try:
  from jax_moe import combine as _combine  # noqa: E402
  COMBINE = "jax_moe.combine"
except ImportError:  # combine not merged yet: time XLA's einsum instead
  _combine = baselines.combine
  COMBINE = "xla einsum"

GATHER_BUDGET = 6 << 30    # skip the gather baseline when it would copy more bytes


def distinct_ids(rng, T, k, E):
  return np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)]).astype(np.int32)


def parse_config(spec: str) -> dict:
  """'auto' -> {} (every choice left to jax_moe.heuristics, as a user gets it);
  '4' -> kernel variant 4 (0 is the CUDA launcher's own default, the register
  kernel); '4:gu8:d4:nt2' also sets k_split_gate_up, k_split_down and token_tiles
  (expert_gemv's private _config). A leading 'f' ('f', 'f5') times
  expert_gemv_combine, the one call, instead of expert_gemv then combine: 'fk' with
  the sum inside the stream kernel, 'fc' with combine's kernel after it, 'f' as
  heuristics.gemv_combine_in_kernel chooses."""
  fused = spec.startswith("f")
  spec = spec[1:] if fused else spec
  extra = {}
  if fused and spec[:1] in ("k", "c"):
    extra = dict(combine_in_kernel=spec[0] == "k")
    spec = spec[1:]
  if spec == "auto" or (fused and spec == ""):
    return extra
  names = dict(gu="k_split_gate_up", d="k_split_down", nt="token_tiles")
  parts = spec.split(":")
  try:
    cfg = dict(extra, kernel_variant=int(parts[0]))
    for p in parts[1:]:
      key = p.rstrip("0123456789")
      cfg[names[key]] = int(p[len(key):])
  except (KeyError, ValueError):
    raise ValueError(f"--variants: bad config spec {spec!r}; expected VARIANT[:guN][:dN][:ntN], "
                     "e.g. 4:gu4:d8") from None
  return cfg


def run(out_dir, shapes, tokens, quick=False, variants=("4",), xla=True, xla_tokens=None):
  rng = np.random.default_rng(0)
  read_bw = harness.measure_read_bandwidth(64 << 20 if quick else 1 << 30)
  rows = []
  for name in shapes:
    s = SHAPES[name] if not quick else SHAPES[name].small_stand_in()
    E, H, I, k = s.num_experts, s.hidden, s.intermediate, s.top_k
    key = jax.random.PRNGKey(hash(name) % 1000)
    k1, k2 = jax.random.split(key)
    wgu = harness.random_array(k1, (E, 2 * I, H), jnp.bfloat16, 1 / np.sqrt(H))
    wd = harness.random_array(k2, (E, H, I), jnp.bfloat16, 1 / np.sqrt(I))
    per_expert = 3 * H * I * 2
    act = s.activation
    for T in tokens:
      if k > E:
        continue
      est = max(2e-6, k * T * per_expert / 3e12) if not quick else 1e-4
      n_calls = int(np.clip(4e-3 / est, 8, 64))
      sets, distinct = [], []
      for i in range(n_calls):
        ids = distinct_ids(rng, T, k, E)
        distinct.append(len(np.unique(ids)))
        x = harness.random_array(jax.random.fold_in(key, 7919 * T + i), (T, H), jnp.bfloat16)
        w = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key, 31 * T + i), (T, k)), -1)
        sets.append((x, jnp.asarray(ids), w, wgu, wd))
      floor = float(np.mean(distinct)) * per_expert / read_bw
      layer_args = [st[1:] for st in sets]     # (ids, w, wgu, wd) per layer
      x0 = sets[0][0]

      def ours(x, ids, w, a, b, variant="0"):
        if variant.startswith("f"):
          return jax_moe.expert_gemv_combine(x, ids, w, a, b, activation=act,
                                             _config=parse_config(variant))
        y = jax_moe.expert_gemv(x, ids, a, b, activation=act, _config=parse_config(variant))
        return _combine(y, w)

      def xla_gather(x, ids, w, a, b):
        return baselines.combine(baselines.experts_gather(x, ids, a, b, act), w)

      def xla_ragged(x, ids, w, a, b):
        return baselines.combine(baselines.experts_ragged(x, ids, a, b, act), w)

      t_var = {v: harness.time_chain(lambda *a, v=v: ours(*a, variant=v), x0, layer_args)
               for v in variants}
      t_ours = min(t_var.values())
      best_v = min(t_var, key=t_var.get)
      do_xla = xla and (xla_tokens is None or T in xla_tokens)
      t_gather = (harness.time_chain(xla_gather, x0, layer_args[:8])
                  if do_xla and T * k * per_expert <= GATHER_BUDGET else None)
      t_ragged = harness.time_chain(xla_ragged, x0, layer_args[:8]) if do_xla else None
      xla_times = [t for t in (t_gather, t_ragged) if t is not None]
      best_xla = min(xla_times) if xla_times else None
      row = dict(shape=name, T=T, us_ours=t_ours * 1e6, variant=best_v,
                 **{f"us_v{v}": t * 1e6 for v, t in t_var.items()},
                 us_floor=floor * 1e6, x_floor=t_ours / floor,
                 us_xla_gather=None if t_gather is None else t_gather * 1e6,
                 us_xla_ragged=None if t_ragged is None else t_ragged * 1e6,
                 speedup=None if best_xla is None else best_xla / t_ours,
                 distinct_experts=float(np.mean(distinct)),
                 TBps=float(np.mean(distinct)) * per_expert / t_ours / 1e12)
      rows.append(row)
      print(f"gemv {name} T={T}: ours {row['us_ours']:.1f} us (v{best_v}; floor "
            f"{row['us_floor']:.1f}, {row['x_floor']:.2f}x)", flush=True)
  payload = dict(device=harness.device_description(), read_bw_GBps=read_bw / 1e9,
                 read_bw_candidates_GBps={k: v / 1e9 for k, v in
                                          harness.READ_BANDWIDTH_CANDIDATES.items()},
                 combine=COMBINE, rows=rows)
  harness.write_json(os.path.join(out_dir, "gemv.json"), payload)
  cands = ", ".join(f"{k} {v:.0f}" for k, v in payload["read_bw_candidates_GBps"].items())
  print(f"\nexpert_gemv + combine ({payload['device']}, read {read_bw/1e9:.0f} GB/s "
        f"[{cands}], combine = {COMBINE})")
  harness.print_table(rows, [("shape", "{}"), ("T", "{}"), ("us_ours", "{:.1f}"),
                             ("variant", "{}")] + [(f"us_v{v}", "{:.1f}") for v in variants] + [
                             ("us_floor", "{:.1f}"), ("x_floor", "{:.3f}"),
                             ("us_xla_gather", "{:.1f}"), ("us_xla_ragged", "{:.1f}"),
                             ("speedup", "{:.1f}x"), ("TBps", "{:.2f}")])
  return payload


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="out")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--shapes", default="gemma4,qwen3,mixtral,deepseek_v3")
  ap.add_argument("--tokens", default="1,2,4,8,16,32,64")
  ap.add_argument("--variants", default="auto,f",
                  help="kernel configs to time, e.g. auto,4 or 1,3,4 or 4:gu8:d8:nt1 (auto: "
                       "the heuristics' choice; else a kernel variant of "
                       "csrc/kernels/expert_gemv.cuh, k-splits of gate_up/down, token tiles); "
                       "a leading f (f, f5, fk, fc) times expert_gemv_combine, one call")
  ap.add_argument("--no-xla", action="store_true", help="skip the XLA baselines")
  ap.add_argument("--xla-tokens", default=None, help="time the XLA baselines only at these T")
  a = ap.parse_args()
  harness.require_kernels("bench_gemv")
  run(a.out, a.shapes.split(","), [int(t) for t in a.tokens.split(",")], a.quick,
      a.variants.split(","), not a.no_xla,
      None if a.xla_tokens is None else [int(t) for t in a.xla_tokens.split(",")])
