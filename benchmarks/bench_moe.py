"""End-to-end MoE layer benchmark: moe_block (auto, gemv, each grouped formulation)
against XLA-native layers and the HBM floor, in one run.

  python benchmarks/bench_moe.py --out DIR [--shapes gemma4 qwen3 ...] [--tokens 1 8 ...]
                                 [--quick] [--dtype bfloat16]

Every timing covers the whole layer: routing (router matmul included), experts,
combine, shared experts. XLA-native rows are what a JAX user would write without
these kernels: logits by jnp.dot at default precision, jnp routing, the experts as
one of the XLA formulations (gather / sort + ragged_dot / dense), combine as a jnp
gather + weighted sum. The floor is (bytes of the distinct experts the routing
selects + router + shared experts) / the read bandwidth measured in the same run,
with the routing recorded along the timed loop itself (each layer's input is the
previous layer's output; see loop_distinct_experts). Rows other than "auto" follow
their own trajectories and are compared with the same floor.

Timing follows benchmarks/harness.py: one jitted program calls the layer on N
distinct inputs back to back; parameters are rotated over enough copies to miss L2
only where a whole layer would fit in it (the big shapes' layers are 1-22 GB, and
distinct inputs route to different experts). Combinations that would not fit in
memory, or whose one call is too slow to repeat, are skipped with the reason.
Writes DIR/moe.json and DIR/moe.png (if matplotlib is installed); prints a table.
--quick runs small stand-ins of the shapes at a few T (a CPU smoke test).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import jax_moe  # noqa: E402
from jax_moe import _device, reference  # noqa: E402
from jax_moe import moe as moe_lib  # noqa: E402
from jax_moe.moe import MoEConfig, moe_block  # noqa: E402
from jax_moe.shapes import SHAPES  # noqa: E402

DEFAULT_SHAPES = ["gemma4", "qwen3", "mixtral", "deepseek_v3"]
DEFAULT_TOKENS = [1, 2, 4, 8, 16, 32, 64, 512, 4096]
QUICK_TOKENS = [1, 8, 128]
METHODS = ["ragged_dot", "dense", "gather", "capacity"]
# Rows of the result, in table order. "auto" is the same program as the
# implementation it resolves to, so its time is that row's (see "resolved").
IMPLS = (["auto", "gemv"] + [f"grouped:{m}" for m in METHODS] + [f"xla:{m}" for m in METHODS]
         + ["xla+route:capacity", "xla+combine:capacity"])
# xla+route / xla+combine: the XLA-native capacity layer with only our route, or only
# our combine, swapped in: they split ours-vs-XLA differences at prefill by piece.


# ---- the XLA-native layer ---------------------------------------------------------

def xla_native_block(x, params, config: MoEConfig, method: str, our_route=False,
                     our_combine=False):
  """The layer as plain JAX (default precision), experts by `method`; our_route /
  our_combine swap in jax_moe.route / jax_moe.combine for that piece alone."""
  kw = moe_lib._route_kwargs(params, config)
  if our_route:
    w, ids = jax_moe.route(x, config.top_k, router_weight=params.router_weight, **kw)
  else:
    logits = jnp.dot(x, params.router_weight.T, preferred_element_type=jnp.float32)
    w, ids = reference.route(logits, config.top_k, **kw)

  def combine_fn(rows, w, index):
    if our_combine:
      return jax_moe.combine(rows, w, index, out_dtype=jnp.float32)
    T, k = index.shape
    y = rows.reshape(T, k, -1) if method == "gather" else rows[index]
    return jnp.einsum("tk,tkh->th", w, y.astype(jnp.float32))

  out = moe_lib._grouped_experts(x, ids, w, params.w_gate_up, params.w_down,
                                 config.activation, method, combine_fn)
  if config.num_shared_experts:
    out = moe_lib._add_shared(out, moe_lib._shared_rows(x, params, config, "grouped"))
  return out.astype(x.dtype)


def layer_fn(impl: str, config: MoEConfig):
  kind, _, method = impl.partition(":")
  if kind.startswith("xla"):
    return lambda x, p: xla_native_block(x, p, config, method, our_route=kind == "xla+route",
                                         our_combine=kind == "xla+combine")
  if kind == "auto":  # timed as itself only where it resolves to "priced"
    cfg = config.replace(implementation="auto")
  elif kind == "gemv":
    cfg = config.replace(implementation="gemv")
  else:
    cfg = config.replace(implementation="grouped", grouped_method=method)
  return lambda x, p: moe_block(x, p, cfg)


# ---- cost estimates (for skipping) --------------------------------------------------

def transient_bytes(impl: str, shape, T: int, itemsize: int) -> int:
  """Largest intermediate the formulation materializes (f32 where XLA keeps f32)."""
  H, I, E, k = shape.hidden, shape.intermediate, shape.num_experts, shape.top_k
  method = "dense" if impl == "auto" else impl.partition(":")[2]  # auto: priced's largest
  if method == "gather":   # gathered gate_up + down weights per assignment
    return T * k * 3 * H * I * itemsize
  if method == "dense":    # f32 gate/up of every expert, then every expert's output
    return T * E * (2 * I * 4 + I * itemsize + H * 4)
  if method == "capacity":  # [E, C] rows of one token block at its largest bucket
    h = moe_lib.heuristics
    tb = h.moe_dense_token_block(T, E, H, I)
    C = max(h.moe_capacity_buckets(min(T, tb), E, k), default=0)
    return E * C * (H * itemsize + 2 * I * 4 + I * itemsize + H * 4)
  return T * k * (H * itemsize + 2 * I * 4 + I * itemsize + H * 4)


def flops(impl: str, shape, T: int) -> float:
  E, k = shape.num_experts, shape.top_k
  per = 2 * 3 * shape.hidden * shape.intermediate
  if impl.endswith("capacity"):  # the smallest bucket (uniform routing)
    return E * min(moe_lib.heuristics.moe_capacity_buckets(T, E, k), default=T) * per
  return T * (E if impl.endswith("dense") or impl == "auto" else k) * per


# ---- measurement ----------------------------------------------------------------------

def device_memory_bytes() -> int | None:
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:
    return None
  return stats.get("bytes_limit")


def layer_weight_bytes(params) -> int:
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))


def floor_bytes(shape, distinct: float, itemsize: int) -> float:
  """Floor bytes of one layer call that selects `distinct` routed experts: their
  weights, the router and the shared experts."""
  shared = shape.num_shared_experts * 3 * shape.hidden * shape.shared_intermediate * itemsize
  router = shape.num_experts * shape.hidden * itemsize
  return distinct * shape.expert_bytes(itemsize) + router + shared


def distinct_experts(ids, num_experts):
  """Distinct expert ids in one call's routing (ids in [0, E), any shape)."""
  hit = jnp.zeros((num_experts,), jnp.int32).at[ids.reshape(-1)].max(1)
  return hit.sum()


def input_routing_stats(params, xs, config, priced_method=None):
  """Over the input sets routed by `params` (not the timed routings: the timed loop
  feeds each layer the previous layer's output), the means of the distinct experts
  and of the busiest expert's assignments over the mean T*k/E (the skew that the
  grouped path's capacity must hold), and with priced_method (moe_block's "priced"
  auto over that grouped method) the branch it picks for each input set."""
  route = jax.jit(lambda x: jax_moe.route(x, config.top_k, router_weight=params.router_weight,
                                          **moe_lib._route_kwargs(params, config))[1])
  H, I = params.hidden, params.intermediate
  distinct, busiest, picks = [], [], []
  for x in xs:
    ids_2d = route(x)
    ids = np.asarray(ids_2d).reshape(-1)
    distinct.append(len(np.unique(ids)))
    busiest.append(np.bincount(ids, minlength=config.num_experts).max()
                   * config.num_experts / ids.size)
    if priced_method:
      names, index = moe_lib._priced_plan(ids_2d, config.num_experts, H, I, priced_method)
      picks.append(names[int(index)])
  return float(np.mean(distinct)), float(np.mean(busiest)), picks


# Layer calls of the timed trajectory whose routing is recorded for the floor.
LOOP_FLOOR_CALLS = 256


def loop_distinct_experts(config, x0, param_sets, n_layers, calls=LOOP_FLOOR_CALLS,
                          max_seconds=2.0) -> float:
  """Mean distinct experts over the first `calls` layer calls (fewer when that takes
  over max_seconds, never under one pass over the layers) of the timed chain
  (x <- rms(moe_block(x, params_l)) with "auto", params rotated as in time_layers).

  The floor must count the routings that were timed: the chain feeds each layer the
  previous layer's normalized output, whose routing differs from that of the random
  inputs (sessions 2-8 counted the inputs: Mixtral T=2 gave 3.0 experts there,
  while the timed layer took as long as bench_gemv's 4). Each call is one jitted
  layer (the timed program's layer, with a route call beside it for the ids; both
  deterministic, so the ids are the timed ones up to XLA fusing the norm
  differently)."""
  copies = len(param_sets)

  @jax.jit
  def layer(x, p):
    ids = jax_moe.route(x, config.top_k, router_weight=p.router_weight,
                        **moe_lib._route_kwargs(p, config))[1]
    return _rms(moe_block(x, p, config), x.dtype), distinct_experts(ids, config.num_experts)

  x, counts = x0, []
  jax.block_until_ready(layer(x0, param_sets[0]))  # compile
  t0 = time.perf_counter()
  for j in range(calls):
    x, c = layer(x, param_sets[(j % n_layers) % copies])
    counts.append(c)
    if j + 1 >= n_layers and time.perf_counter() - t0 > max_seconds:
      break  # slow layers (large T): at least one pass over the layers
  return float(np.mean(np.asarray(jax.device_get(counts))))


def time_call_once(fn, args) -> float:
  f = jax.jit(fn)
  jax.block_until_ready(f(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  return time.perf_counter() - t0


def _rms(y, dtype):
  y = y.astype(jnp.float32)
  return (y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6)).astype(dtype)


def time_layers(fn, x0, param_sets, n_layers, repeats):
  """Seconds per layer in a jitted decode loop: x <- rms(moe_block(x, params_l)) for
  n_layers layers per loop step (harness.time_chain); the norm keeps activations
  O(1) over thousands of layers, so routing stays realistic."""
  copies = len(param_sets)
  layer_args = [(param_sets[i % copies],) for i in range(n_layers)]
  return harness.time_chain(lambda x, p: _rms(fn(x, p), x.dtype), x0, layer_args,
                            repeats=repeats)


_norm_cache = {}


def norm_us_per_layer(x0, param_sets, n_layers):
  """The same loop with only the norm: subtracted from time_layers."""
  key = (x0.shape, x0.dtype, n_layers)
  if key not in _norm_cache:
    _norm_cache[key] = time_layers(lambda x, p: x, x0, param_sets[:1], n_layers, 5)
  return _norm_cache[key]


def bench_shape(shape, tokens, dtype, bw, l2, mem_budget, args, rows, log):
  config = MoEConfig.from_shape(shape)
  itemsize = jnp.dtype(dtype).itemsize
  key = jax.random.PRNGKey(0)
  def example(k):
    p = moe_lib.example_params(k, shape, dtype)
    if args.bias_scale is not None and p.correction_bias is not None:
      p = p.replace(correction_bias=p.correction_bias
                    * (args.bias_scale / moe_lib.EXAMPLE_BIAS_SCALE))
    return p

  make = jax.jit(example)
  params0 = jax.block_until_ready(make(key))
  wbytes = layer_weight_bytes(params0)
  copies = harness.rotation_count(wbytes, l2, max_sets=args.max_copies)
  param_sets = [params0] + [jax.block_until_ready(make(jax.random.fold_in(key, i)))
                            for i in range(1, copies)]
  log(f"\n{shape.name}: H={shape.hidden} I={shape.intermediate} E={shape.num_experts} "
      f"k={shape.top_k} {shape.scoring}, layer {wbytes / 2**20:.1f} MiB, {copies} weight "
      f"cop{'y' if copies == 1 else 'ies'}")
  peak = args.peak_tflops * 1e12
  for T in tokens:
    n_sets = max(copies, args.calls if T <= 64 else max(2, args.calls // 2))
    xs = [harness.random_array(jax.random.fold_in(key, 1000 + i), (T, shape.hidden), dtype)
          for i in range(n_sets)]
    arg_sets = [(x, param_sets[i % copies]) for i, x in enumerate(xs)]
    resolved, method = moe_lib.resolve(config, T, shape.hidden, shape.intermediate)
    # "priced": auto picks gemv or a grouped branch per call, so it is timed as itself.
    auto_as = {"gemv": "gemv", "priced": "auto"}.get(resolved, f"grouped:{method}")
    uniq_inputs, busiest, picks = input_routing_stats(
        params0, xs, config, method if resolved == "priced" else None)
    uniq = loop_distinct_experts(config, xs[0], param_sets, n_sets)
    fb = floor_bytes(shape, uniq, itemsize)
    floor_us = fb / bw * 1e6
    base = dict(shape=shape.name, T=T, floor_us=floor_us, floor_bytes=fb,
                distinct_experts=uniq, distinct_experts_inputs=uniq_inputs,
                busiest_over_mean_inputs=busiest,
                calls_per_program=n_sets)
    measured = {}
    start = len(rows)
    for impl in (["auto"] if auto_as == "auto" else []) + IMPLS[1:]:
      row = dict(base, impl=impl)
      if impl not in args.impls and not (impl == auto_as and "auto" in args.impls):
        continue
      # Calls are independent, so XLA can reuse one call's intermediates for the
      # next; allow two in flight.
      est_bytes = transient_bytes(impl, shape, T, itemsize) * min(n_sets, 2)
      est_s = flops(impl, shape, T) / peak
      if impl != "gemv" and est_bytes > mem_budget:
        row["skipped"] = (f"memory: ~{est_bytes / 2**30:.1f} GiB of intermediates > budget "
                          f"{mem_budget / 2**30:.1f} GiB")
      elif est_s > args.max_call_s * 20:
        row["skipped"] = f"too slow: ~{est_s:.2f} s per call at {args.peak_tflops:g} TFLOP/s"
      else:
        fn = layer_fn(impl, config)
        try:
          single = time_call_once(fn, arg_sets[0]) if est_s > args.max_call_s / 10 else 0.0
          if single > args.max_call_s:
            row["us"] = single * 1e6
            row["note"] = "one call timed (too slow to repeat in one program)"
          else:
            row["us"] = (time_layers(fn, xs[0], param_sets, n_sets, args.repeats)
                         - norm_us_per_layer(xs[0], param_sets, n_sets)) * 1e6
            row["note"] = "jitted decode loop, net of the per-layer RMS norm"
        except Exception as e:  # an XLA formulation may fail to compile or run out of memory
          row["skipped"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
      if "us" in row:
        row["x_floor"] = row["us"] / floor_us
        measured[impl] = row["us"]
      rows.append(row)
    if auto_as == "auto" and "auto" in args.impls:  # timed above, as itself
      rows[start]["resolved"] = f"priced:{method}"
      rows[start]["priced_picks_inputs"] = picks
    elif "auto" in args.impls:
      auto = dict(base, impl="auto", resolved=auto_as)
      if auto_as in measured:
        auto["us"] = measured[auto_as]
        auto["x_floor"] = auto["us"] / floor_us
      else:
        auto["skipped"] = f"resolves to {auto_as}, which was skipped"
      rows.insert(start, auto)
    parts = [f"{i}={measured[i]:.1f}" for i in IMPLS if i in measured]
    shown = (f"priced:{method} (picks {','.join(sorted(set(picks)))} on the inputs)"
             if auto_as == "auto" else auto_as)
    log(f"  T={T:5d}  floor {floor_us:8.1f} us ({uniq:.2f} experts in the loop, "
        f"{uniq_inputs:.2f} on the inputs, busiest {busiest:.1f}x the mean)  auto->{shown}  "
        + "  ".join(parts))


def summarize(rows):
  """One line per (shape, T): floor, ours, best XLA-native."""
  out = []
  keyed = {}
  for r in rows:
    keyed.setdefault((r["shape"], r["T"]), []).append(r)
  for (shape, T), rs in keyed.items():
    by = {r["impl"]: r for r in rs}
    t = lambda i: by.get(i, {}).get("us")  # noqa: E731
    grouped = [(t(i), i.split(":")[1]) for i in IMPLS if i.startswith("grouped") and t(i)]
    xla = [(t(i), i.split(":")[1]) for i in IMPLS if i.startswith("xla:") and t(i)]
    g = min(grouped) if grouped else (None, "-")
    b = min(xla) if xla else (None, "-")
    auto = t("auto")
    out.append(dict(shape=shape, T=T, floor_us=rs[0]["floor_us"], auto_us=auto,
                    auto_impl=by.get("auto", {}).get("resolved", "-"), gemv_us=t("gemv"),
                    grouped_us=g[0], grouped_best=g[1], xla_us=b[0], xla_best=b[1],
                    auto_x_floor=auto / rs[0]["floor_us"] if auto else None,
                    xla_x_floor=b[0] / rs[0]["floor_us"] if b[0] else None,
                    speedup=b[0] / auto if (auto and b[0]) else None))
  return out


def plot(rows, shapes, path, bw, device=None) -> str:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return "matplotlib is not installed: skipped the plot"
  n = len(shapes)
  cols = min(2, n)
  fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(6.5 * cols, 4.5 * ((n + 1) // 2)),
                           squeeze=False)
  styles = {"auto": dict(lw=2.5, color="C3"), "gemv": dict(ls="--", color="C1"),
            "grouped:ragged_dot": dict(color="C0"), "grouped:dense": dict(color="C2"),
            "grouped:gather": dict(color="C4"), "xla:ragged_dot": dict(ls=":", color="C0"),
            "xla:dense": dict(ls=":", color="C2"), "xla:gather": dict(ls=":", color="C4"),
            "grouped:capacity": dict(color="C5"), "xla:capacity": dict(ls=":", color="C5")}
  for ax, name in zip(axes.flat, shapes):
    rs = [r for r in rows if r["shape"] == name]
    Ts = sorted({r["T"] for r in rs})
    floor = [next(r["floor_us"] for r in rs if r["T"] == T) for T in Ts]
    ax.plot(Ts, floor, color="k", lw=1.5, label="HBM floor")
    for impl in IMPLS:
      pts = [(r["T"], r["us"]) for r in rs if r["impl"] == impl and r.get("us")]
      if pts:
        ax.plot(*zip(*pts), marker="o", ms=3, label=impl, **styles.get(impl, {}))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(name)
    ax.set_xlabel("tokens T")
    ax.set_ylabel("us per layer")
    ax.grid(True, which="both", alpha=0.3)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.suptitle(f"jax_moe moe_block, {device or harness.device_description()}, "
               f"read {bw / 1e9:.0f} GB/s")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return f"wrote {path}"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="directory for moe.json and moe.png")
  ap.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
  ap.add_argument("--tokens", nargs="+", type=int, default=None)
  ap.add_argument("--quick", action="store_true",
                  help="small stand-ins of the shapes, a few T (CPU smoke test)")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  ap.add_argument("--impls", nargs="+", default=[i for i in IMPLS if "+" not in i],
                  choices=IMPLS, help="rows to time (auto times the implementation it "
                  "resolves to; the xla+ rows only when named)")
  ap.add_argument("--calls", type=int, default=None,
                  help="distinct inputs per timed program, halved above T=64 (default 8; "
                       "4 with --quick)")
  ap.add_argument("--repeats", type=int, default=None, help="default 7; 3 with --quick")
  ap.add_argument("--max-copies", type=int, default=None,
                  help="most weight copies rotated for L2 (default 16; 4 with --quick)")
  ap.add_argument("--max-call-s", type=float, default=0.25,
                  help="a layer slower than this per call is timed once, not repeated")
  ap.add_argument("--no-fold-shared", action="store_true",
                  help="run shared experts in their own expert_gemv call at every T "
                       "(heuristics.MOE_FOLD_SHARED_MAX_TOKENS and _WIDE = 0), for an A/B")
  ap.add_argument("--bias-scale", type=float, default=None,
                  help="standard deviation of the random correction bias of shapes that "
                       "have one (default moe.EXAMPLE_BIAS_SCALE; 0: no bias, near-uniform "
                       "routing)")
  ap.add_argument("--peak-tflops", type=float, default=None,
                  help="for skip estimates only (default 400 on GPU, 0.2 on CPU)")
  args = ap.parse_args(argv)
  harness.require_kernels("bench_moe")
  if args.bias_scale is not None and not (np.isfinite(args.bias_scale) and args.bias_scale >= 0):
    ap.error(f"--bias-scale must be a finite number >= 0, got {args.bias_scale!r}")

  platform = jax.devices()[0].platform
  if args.no_fold_shared:
    jax_moe.heuristics.MOE_FOLD_SHARED_MAX_TOKENS = 0
    jax_moe.heuristics.MOE_FOLD_SHARED_MAX_TOKENS_WIDE = 0
  for name, full, quick in (("calls", 8, 4), ("repeats", 7, 3), ("max_copies", 16, 4)):
    if getattr(args, name) is None:
      setattr(args, name, quick if args.quick else full)
  if args.peak_tflops is None:
    args.peak_tflops = 0.2 if platform == "cpu" else 400.0
  names = args.shapes or DEFAULT_SHAPES
  shapes = [SHAPES[n].small_stand_in() if args.quick else SHAPES[n] for n in names]
  tokens = args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS)
  dtype = jnp.dtype(args.dtype)
  if platform == "cpu" and not args.quick:
    print("note: full-size shapes on CPU are slow; --quick runs small stand-ins",
          file=sys.stderr)

  def log(msg):
    print(msg, flush=True)

  log(f"device {harness.device_description()}, jax {jax.__version__}, {dtype.name}")
  bw = harness.measure_read_bandwidth((64 << 20) if platform == "cpu" else (1 << 30))
  l2 = _device.l2_bytes() if platform != "cpu" else 32 << 20
  mem = device_memory_bytes()
  weights = max(SHAPES[n].num_experts * SHAPES[n].expert_bytes(dtype.itemsize) for n in names) \
      if not args.quick else 0
  mem_budget = 0.4 * (mem - weights) if mem else 2 << 30
  log(f"read bandwidth {bw / 1e9:.1f} GB/s, L2 {l2 / 2**20:.0f} MiB, memory budget for "
      f"intermediates {mem_budget / 2**30:.1f} GiB")

  rows: list[dict] = []
  os.makedirs(args.out, exist_ok=True)
  for shape in shapes:
    if mem and not args.quick:
      need = shape.num_experts * shape.expert_bytes(dtype.itemsize)
      if need > 0.8 * mem:
        log(f"\n{shape.name}: skipped: one layer's weights ({need / 2**30:.1f} GiB) do not fit "
            f"in {mem / 2**30:.1f} GiB")
        rows.append(dict(shape=shape.name, impl="all", skipped="weights do not fit in memory"))
        continue
    bench_shape(shape, tokens, dtype, bw, l2, mem_budget, args, rows, log)
    jax.clear_caches()
    # Partial results survive a run cut short (a time limit on the GPU machine).
    harness.write_json(os.path.join(args.out, "moe.json"),
                       dict(device=harness.device_description(), jax=jax.__version__,
                            dtype=dtype.name, read_bandwidth_Bps=bw, partial=True, rows=rows))

  measured_rows = [r for r in rows if r.get("T") is not None]
  summary = summarize(measured_rows)
  payload = dict(device=harness.device_description(), jax=jax.__version__, dtype=dtype.name,
                 read_bandwidth_Bps=bw, l2_bytes=l2, quick=args.quick,
                 bias_scale=(moe_lib.EXAMPLE_BIAS_SCALE if args.bias_scale is None
                             else args.bias_scale),
                 read_bandwidth_candidates_Bps=dict(harness.READ_BANDWIDTH_CANDIDATES),
                 heuristics=dict(
                     MOE_GEMV_MAX_EXPERT_FRACTION=jax_moe.heuristics.MOE_GEMV_MAX_EXPERT_FRACTION,
                     MOE_GEMV_MAX_TOKENS=jax_moe.heuristics.MOE_GEMV_MAX_TOKENS,
                     MOE_FOLD_SHARED_MAX_TOKENS=jax_moe.heuristics.MOE_FOLD_SHARED_MAX_TOKENS,
                     MOE_FOLD_SHARED_MAX_TOKENS_WIDE=(
                         jax_moe.heuristics.MOE_FOLD_SHARED_MAX_TOKENS_WIDE)),
                 rows=rows, summary=summary)
  harness.write_json(os.path.join(args.out, "moe.json"), payload)
  log(f"\nwrote {os.path.join(args.out, 'moe.json')}")
  log(plot(measured_rows, [s.name for s in shapes if any(r["shape"] == s.name
                                                          for r in measured_rows)],
           os.path.join(args.out, "moe.png"), bw))
  skipped = [r for r in rows if r.get("skipped")]
  if skipped:
    log(f"\nskipped ({len(skipped)}):")
    for r in skipped:
      log(f"  {r['shape']} T={r.get('T', '-')} {r['impl']}: {r['skipped']}")
  log("\nus per layer (lower is better); x_floor = time / HBM floor; speedup = best XLA / auto")
  harness.print_table(summary, [("shape", "{}"), ("T", "{}"), ("floor_us", "{:.1f}"),
                                ("auto_us", "{:.1f}"), ("auto_impl", "{}"),
                                ("gemv_us", "{:.1f}"), ("grouped_us", "{:.1f}"),
                                ("grouped_best", "{}"), ("xla_us", "{:.1f}"),
                                ("xla_best", "{}"), ("auto_x_floor", "{:.2f}"),
                                ("xla_x_floor", "{:.2f}"), ("speedup", "{:.2f}")])
  return 0


if __name__ == "__main__":
  sys.exit(main())
