"""Driver for an Nsight Compute look at expert_gemv at decode sizes: one jitted call
per (shape, T), run twice. Under ncu each kernel runs alone with caches flushed, so
its duration is the kernel's own (no launch gaps, no PDL overlap).

  ncu --kernel-name regex:gemv --csv --metrics gpu__time_duration.sum,... \\
      python scripts/profile_gemv_decode.py gemma4,qwen3 1,8 [kernel_variant]
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_moe
from jax_moe.shapes import SHAPES

names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["gemma4", "qwen3"]
tokens = [int(t) for t in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1]
config = None  # kernel_variant (3rd argument): one of csrc/kernels/expert_gemv.cuh's
if len(sys.argv) > 3:
  if sys.argv[3] not in ("0", "1", "3", "4", "5", "6"):
    sys.exit(f"profile_gemv_decode.py: kernel_variant (3rd argument) must be 0, 1, 3, 4, 5 or 6, "
             f"got {sys.argv[3]!r}")
  config = dict(kernel_variant=int(sys.argv[3]))
rng = np.random.default_rng(0)
for name in names:
  s = SHAPES[name]
  E, H, I, k = s.num_experts, s.hidden, s.intermediate, s.top_k
  wgu = jax.random.normal(jax.random.PRNGKey(0), (E, 2 * I, H), jnp.bfloat16)
  wd = jax.random.normal(jax.random.PRNGKey(1), (E, H, I), jnp.bfloat16)
  f = jax.jit(lambda *a, act=s.activation: jax_moe.expert_gemv(*a, activation=act,
                                                                _config=config))
  for T in tokens:
    x = jax.random.normal(jax.random.PRNGKey(T), (T, H), jnp.bfloat16)
    ids = jnp.asarray(np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)]),
                      jnp.int32)
    for _ in range(2):
      jax.block_until_ready(f(x, ids, wgu, wd))
    print(f"{name} T={T}: {len(np.unique(np.asarray(ids)))} experts, "
          f"{len(np.unique(np.asarray(ids))) * 3 * H * I * 2 / 1e6:.1f} MB", flush=True)
