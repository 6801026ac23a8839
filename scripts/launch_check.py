"""Diagnostic: is our custom call inside XLA's command buffers (CUDA graphs), and what
does one tiny launch cost in a jitted loop, ours vs an XLA fusion?

  python scripts/launch_check.py OUT_DIR [TAG]     (TAG labels the output lines and file)

Times combine at T=1 (H=2816, k=8) and a logits-only route at T=1 with
harness.time_loop, and writes the optimized HLO of the combine loop to OUT_DIR.
Run it twice, with and without XLA_FLAGS=--xla_gpu_enable_command_buffer= , and
compare: a custom call outside the graphs costs a host launch per call.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import harness  # noqa: E402

import jax_moe  # noqa: E402
from jax_moe import heuristics  # noqa: E402

# The custom call at T=1 (small combines otherwise lower to XLA's fusion).
heuristics.COMBINE_XLA_MAX_BYTES = -1

out = sys.argv[1] if len(sys.argv) > 1 else "."
tag = sys.argv[2] if len(sys.argv) > 2 else "default"
os.makedirs(out, exist_ok=True)
r = np.random.default_rng(0)
H, k = 2816, 8
sets = [(jnp.asarray(r.normal(size=(1, k, H)), jnp.bfloat16),
         jnp.asarray(r.random(size=(1, k)), jnp.float32)) for _ in range(16)]
xla = lambda y, w: jnp.einsum("tkh,tk->th", y.astype(jnp.float32), w).astype(y.dtype)  # noqa
t_ours = harness.time_loop(jax_moe.combine, sets)
t_ours_raw = harness.time_loop(jax_moe.combine, sets, net=False)
t_xla = harness.time_loop(xla, sets, net=False)
lsets = [(jnp.asarray(r.normal(size=(1, 128)), jnp.float32),) for _ in range(16)]
t_route = harness.time_loop(lambda x: jax_moe.route(x, 8), lsets)
t_route_raw = harness.time_loop(lambda x: jax_moe.route(x, 8), lsets, net=False)
print(f"[{tag}] combine T=1: ours net {t_ours*1e6:.2f} us (raw {t_ours_raw*1e6:.2f}), "
      f"xla {t_xla*1e6:.2f} us; route logits T=1: net {t_route*1e6:.2f} (raw "
      f"{t_route_raw*1e6:.2f})", flush=True)
prog = harness.loop_program(jax_moe.combine, sets[:4], 1, 10)
txt = prog.lower(harness.loop_init(jax_moe.combine, sets[:4]), sets[:4]).compile().as_text()
with open(os.path.join(out, f"combine_loop_{tag}.hlo.txt"), "w") as f:
  f.write(txt)
lines = [l for l in txt.splitlines() if "command_buffer" in l or "custom-call" in l]
print(f"[{tag}] HLO lines naming command_buffer or custom-call: {len(lines)}")
for l in lines[:12]:
  print("   ", l.strip()[:200])
