"""Driver for Nsight Compute: calls each jax_moe kernel configuration twice (eager,
synchronized) and writes the launch manifest, so scripts/ncu_table.py can attribute
ncu's per-kernel rows (duration, DRAM bytes) to configurations. Under ncu each
kernel runs alone with caches flushed: these are cold-L2 kernel times, without
launch gaps.

python scripts/profile_kernels.py MANIFEST.json [--quick]
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_moe
from jax_moe import heuristics
from jax_moe.shapes import SHAPES

quick = "--quick" in sys.argv
# combine's kernel at every size (small combines otherwise lower to XLA's fusion:
# heuristics.COMBINE_XLA_MAX_BYTES), so that the cases here run the kernel.
heuristics.COMBINE_XLA_MAX_BYTES = -1
manifest = []
r = np.random.default_rng(0)


def call(name, fn, args, n_kernels, bytes_min):
  f = jax.jit(fn)  # arrays as arguments: closed-over ones would become constants
  for _ in range(2):
    jax.block_until_ready(f(*args))
  manifest.append(dict(name=name, kernels=n_kernels, calls=2, bytes_min=bytes_min))


def distinct_ids(T, k, E):
  return jnp.asarray(np.stack([r.choice(E, size=k, replace=False) for _ in range(T)]), jnp.int32)


shapes = ["qwen3"] if quick else ["gemma4", "qwen3", "mixtral", "deepseek_v3"]
for name in shapes:
  s = SHAPES[name]
  E, H, I, k = s.num_experts, s.hidden, s.intermediate, s.top_k
  key = jax.random.PRNGKey(1)
  wgu = jax.random.normal(key, (E, 2 * I, H), jnp.bfloat16) * jnp.bfloat16(1 / np.sqrt(H))
  wd = jax.random.normal(key, (E, H, I), jnp.bfloat16) * jnp.bfloat16(1 / np.sqrt(I))
  for T in ([1, 8] if quick else [1, 64]):
    x = jax.random.normal(jax.random.PRNGKey(T), (T, H), jnp.bfloat16)
    ids = distinct_ids(T, k, E)
    n_distinct = len(np.unique(np.asarray(ids)))
    for variant in (1, 4):
      call(f"gemv {name} T={T} v{variant}",
           lambda *a: jax_moe.expert_gemv(*a, activation=s.activation,
                                          _config=dict(kernel_variant=variant)),
           (x, ids, wgu, wd), 2, n_distinct * 3 * H * I * 2)
  del wgu, wd

for name, (E, H, groups, scoring) in {"deepseek_v3": (256, 7168, 8, "sigmoid"),
                                      "gemma4": (128, 2816, 1, "softmax")}.items():
  W = jax.random.normal(jax.random.PRNGKey(2), (E, H), jnp.bfloat16) * jnp.bfloat16(0.01)
  for T in ([1] if quick else [1, 16, 64]):
    x = jax.random.normal(jax.random.PRNGKey(T), (T, H), jnp.bfloat16)
    call(f"route fused {name} T={T}",
         lambda x, W: jax_moe.route(x, 8, router_weight=W, scoring=scoring, num_groups=groups,
                                    top_groups=max(1, groups // 2)), (x, W), 1, E * H * 2)
logits = jax.random.normal(jax.random.PRNGKey(3), (1024, 256), jnp.float32)
call("route logits E=256 T=1024", lambda l: jax_moe.route(l, 8, num_groups=8, top_groups=4,
                                                         scoring="sigmoid"), (logits,), 1,
     1024 * 256 * 4)

for T in ([1, 64] if quick else [1, 64, 1024, 8192]):
  H, k = 7168, 8
  y = jax.random.normal(jax.random.PRNGKey(T), (T, k, H), jnp.bfloat16)
  w = jax.random.uniform(jax.random.PRNGKey(T + 1), (T, k), jnp.float32)
  call(f"combine H={H} k={k} T={T}", jax_moe.combine, (y, w), 1, T * (k + 1) * H * 2)

with open(sys.argv[1], "w") as f:
  json.dump(manifest, f, indent=1)
print("profiled", len(manifest), "configurations")
