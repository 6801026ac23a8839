"""A small run of every CUDA kernel, for compute-sanitizer (memcheck, racecheck,
initcheck, synccheck). Inputs are fuzzed: ids and indices include negative and
too-large values, sizes include tails, so out-of-bounds bugs show up. Each op is
also checked against the reference, so the run fails on wrong results too.

Run as: compute-sanitizer --tool memcheck python scripts/sanitize_kernels.py [--small] [--ops=expert_gemv,...]
--small drops the full-size cases (racecheck runs each kernel many times slower).
(gpu_check.sh sets XLA_PYTHON_CLIENT_ALLOCATOR=platform so each buffer is its own
allocation and the sanitizer sees overruns past it).
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np

import jax_moe
from jax_moe import heuristics, reference
from jax_moe.route import route_p

e0 = jnp.zeros((0,), jnp.float32)
# combine's kernel at every size (small combines otherwise lower to XLA's fusion:
# heuristics.COMBINE_XLA_MAX_BYTES), so that the cases here run the kernel.
heuristics.COMBINE_XLA_MAX_BYTES = -1

r = np.random.default_rng(0)
failures = []
SMALL = "--small" in sys.argv
# --ops=route,expert_gemv,combine: only these (default all)
ALL_OPS = ("route", "expert_gemv", "combine")
OPS = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--ops=")),
           list(ALL_OPS))
if not OPS or set(OPS) - set(ALL_OPS):
  sys.exit(f"sanitize_kernels.py: --ops takes a comma list of {', '.join(ALL_OPS)}; "
           f"got {','.join(OPS)!r}")


def check(name, out, ref, tol):
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  den = np.linalg.norm(ref) or 1.0
  err = np.linalg.norm(out - ref) / den
  ok = np.all(np.isfinite(out)) and err <= tol
  print(f"{'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e}", flush=True)
  if not ok:
    failures.append(name)


# route: logits path (several experts-per-lane variants) and fused router path.
for E, k, T, groups in [(8, 2, 5, 1), (64, 6, 17, 4), (256, 8, 33, 8),
                        (1000, 8, 3, 1)][:0 if "route" not in OPS else 3 if SMALL else 4]:
  x = jnp.asarray(r.normal(size=(T, E)) * 2, jnp.float32)
  w, ids = jax_moe.route(x, k, num_groups=groups, top_groups=max(1, groups // 2),
                         scoring="sigmoid" if groups > 1 else "softmax")
  ids = np.asarray(ids)
  ok = np.all((ids >= 0) & (ids < E))
  print(f"{'ok  ' if ok else 'FAIL'} route logits E={E} T={T}: ids in range", flush=True)
  if not ok:
    failures.append(f"route E={E}")
  if E <= heuristics.ROUTE_BLOCK_MAX_EXPERTS:  # the one-block-per-token kernel, forced
    kw = dict(scoring="sigmoid" if groups > 1 else "softmax", num_groups=groups,
              top_groups=max(1, groups // 2), group_score="top2_sum")
    wb, ib, _ = route_p.bind(x, jnp.zeros((0, 0), x.dtype), e0, e0, top_k=k, renormalize=True,
                             scaling_factor=1.0, k_splits=1, block_select=True, **kw)
    w_ref, _ = reference.route(x, k, **kw)
    ib = np.asarray(ib)
    ok = np.all((ib >= 0) & (ib < E))
    print(f"{'ok  ' if ok else 'FAIL'} route block select E={E} T={T}: ids in range",
          flush=True)
    if not ok:
      failures.append(f"route block select E={E}")
    check(f"route block select E={E} T={T} weights", wb, w_ref, 1e-3)
for E, H, T, dt in [(256, 7168, 1, jnp.bfloat16), (128, 2816, 16, jnp.bfloat16),
                   (64, 200, 40, jnp.float16), (60, 33, 3, jnp.bfloat16),
                   (40, 64, 9, jnp.float32)][2 if SMALL else 0:] if "route" in OPS else []:
  x = jnp.asarray(r.normal(size=(T, H)), dt)
  wr = jnp.asarray(r.normal(size=(E, H)) / np.sqrt(H), dt)
  w_ref, _ = reference.route(x, 6, router_weight=wr, scoring="sigmoid")
  # the fused kernel, forced: clusters of 1 and 5 (sm_90), 12 splits through global
  # memory, and the heuristic's choice
  for k_splits in (1, 5, 12, heuristics.route_k_splits(H)):
    w, _, _ = route_p.bind(x, wr, e0, e0, top_k=6, scoring="sigmoid", renormalize=True,
                           num_groups=1, top_groups=1, group_score="top2_sum",
                           scaling_factor=1.0, k_splits=k_splits, block_select=False)
    check(f"route fused E={E} H={H} T={T} k_splits={k_splits}", w, w_ref, 1e-3)
  w, _ = jax_moe.route(x, 6, router_weight=wr, scoring="sigmoid")  # default path
  check(f"route E={E} H={H} T={T}", w, w_ref, 1e-3)
  if heuristics.route_block_supported(E, H, 1, jnp.dtype(dt).itemsize):
    # the fused kernel with block selection (route_gemv_block_kernel), forced
    w, _, _ = route_p.bind(x, wr, e0, e0, top_k=6, scoring="sigmoid", renormalize=True,
                           num_groups=1, top_groups=1, group_score="top2_sum",
                           scaling_factor=1.0, k_splits=1, block_select=True)
    check(f"route fused block select E={E} H={H} T={T}", w, w_ref, 1e-3)

# expert_gemv: tensor-core path (NT = 1, 2, 4; K and row tails), generic path, the stream
# kernel in both unit orders (v5 segment-major, v6 run order), the split kernels (v7,
# where I is a multiple of 32 and the dtype 16-bit; elsewhere v7 runs the stream kernel).
for dtype, T, H, I, E, k in [(jnp.bfloat16, 1, 256, 128, 16, 4), (jnp.float16, 12, 72, 40, 8, 4),
                             (jnp.bfloat16, 40, 64, 24, 4, 2), (jnp.float32, 5, 36, 20, 8, 2),
                             (jnp.bfloat16, 3, 36, 20, 8, 3),
                             # the split kernels (v7): H tail (72 = 9 vectors), 2 chunks of I
                             (jnp.bfloat16, 3, 72, 64, 8, 4),
                             # ~70 valid ids on one expert: runs of 8 and 1 segments (v6)
                             (jnp.bfloat16, 250, 64, 24, 1, 2)] if "expert_gemv" in OPS else []:
  x = jnp.asarray(r.normal(size=(T, H)), dtype)
  ids = jnp.asarray(r.integers(-3, E + 3, size=(T, k)), jnp.int32)
  wgu = jnp.asarray(r.normal(size=(E, 2 * I, H)) / np.sqrt(H), dtype)
  wd = jnp.asarray(r.normal(size=(E, H, I)) / np.sqrt(I), dtype)
  ref = reference.expert_gemv(x, ids, wgu, wd, activation="gelu_tanh")
  for variant in (0, 1, 5, 6, 7, 8):  # the default, the plain variant, stream, split, group
    y = jax_moe.expert_gemv(x, ids, wgu, wd, activation="gelu_tanh",
                            _config=dict(kernel_variant=variant))
    check(f"expert_gemv v{variant} {jnp.dtype(dtype).name} T={T} H={H} I={I}", y, ref, 2e-2)
  # the weighted sum in the same call (in kernel: the stream or group kernel's last
  # block sums)
  w = jnp.asarray(r.normal(size=(T, k)), jnp.float32)
  ref_out = reference.combine(ref, w)
  for variant, in_kernel in ((0, False), (5, False), (5, True), (6, True), (7, False),
                             (8, False), (8, True)):
    out = jax_moe.expert_gemv_combine(x, ids, w, wgu, wd, activation="gelu_tanh",
                                      _config=dict(kernel_variant=variant,
                                                   combine_in_kernel=in_kernel))
    check(f"expert_gemv_combine v{variant}{' in kernel' if in_kernel else ''} "
          f"{jnp.dtype(dtype).name} T={T} H={H} I={I}", out, ref_out, 2e-2)
  # two shared experts in the same call (slots k, k + 1; fuzzed routed ids beside them)
  sgu = jnp.asarray(r.normal(size=(2, 2 * I, H)) / np.sqrt(H), dtype)
  sd = jnp.asarray(r.normal(size=(2, H, I)) / np.sqrt(I), dtype)
  ref = reference.expert_gemv(x, ids, wgu, wd, activation="gelu_tanh", shared_gate_up=sgu,
                              shared_down=sd)
  for variant in (0, 5, 6):
    y = jax_moe.expert_gemv(x, ids, wgu, wd, activation="gelu_tanh", shared_gate_up=sgu,
                            shared_down=sd, _config=dict(kernel_variant=variant))
    check(f"expert_gemv shared v{variant} {jnp.dtype(dtype).name} T={T} H={H} I={I}", y, ref,
          2e-2)

# combine (when built): dense form and fuzzed index form.
if hasattr(jax_moe, "combine") and "combine" in OPS:
  for dtype, T, k, H in [(jnp.bfloat16, 1, 8, 7168), (jnp.float32, 33, 3, 7),
                         (jnp.float16, 5, 9, 64)][1 if SMALL else 0:]:
    y = jnp.asarray(r.normal(size=(T, k, H)), dtype)
    w = jnp.asarray(r.normal(size=(T, k)), jnp.float32)
    check(f"combine {jnp.dtype(dtype).name} T={T} k={k} H={H}", jax_moe.combine(y, w),
          reference.combine(y, w), 2e-2)
    N = T * k
    idx = jnp.asarray(r.integers(-2, N + 2, size=(T, k)), jnp.int32)
    check(f"combine index {jnp.dtype(dtype).name} T={T}", jax_moe.combine(y.reshape(N, H), w, idx),
          reference.combine(y.reshape(N, H), w, idx), 2e-2)

print("sanitize workload:", "FAILED " + ", ".join(failures) if failures else "all ok")
sys.exit(1 if failures else 0)
