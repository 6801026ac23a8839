"""Benchmark jax_moe.combine against XLA-native formulations, in one run with the
device's measured copy (and read) bandwidth.

  python benchmarks/bench_combine.py --out DIR [--quick]

Dense form, y [T, k, H] bf16, weights f32 [T, k]:
  ours       jax_moe.combine(y, w) as a user gets it: on CUDA XLA's fusion of the same
             sum up to heuristics.COMBINE_XLA_MAX_BYTES of y, the kernel above
  kernel     the same with the kernel at every size
  fusion     the same with XLA's fusion (reference.combine, slot order) at every size
  xla_f32    einsum("tkh,tk->th", y.astype(f32), w).astype(bf16)   (same math as ours)
  xla_bf16   (y * w[..., None].astype(bf16)).sum(1)                 (bf16 products)
Index form, rows [T*k, H] in a random (expert-sorted-like) order, index [T, k]:
  ours_idx / kernel_idx / fusion_idx   jax_moe.combine(rows, w, index), as above
  xla_gather einsum("tkh,tk->th", rows[index].astype(f32), w).astype(bf16)

Bytes per call = T*k*H*2 read + T*H*2 written (+ weights and index, counted too).
Each timing is a jitted loop over distinct input sets (harness.time_loop), so
consecutive calls read different memory (enough sets to exceed twice the L2 at
small T). The calls are chained through a tiny fusion of the weights, which XLA
fuses into its own formulations and into ours where ours lowers to XLA. "ours" and
the XLA columns are raw loop times (that fusion included, as it is for XLA);
"kernel" is also given net of it ("kernel_net", the kernel's own time, as in runs
before session 17). The verdict columns compare ours (raw) with the faster XLA
formulation (raw). Prints a table and writes DIR/combine.json.

On CPU (or with --quick) it runs tiny sizes: a smoke test of the script, not a
measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import jax_moe  # noqa: E402
from jax_moe import _device, heuristics  # noqa: E402

FULL = dict(shapes=[(7168, 8), (2816, 8)], tokens=[1, 4, 16, 64, 128, 256, 1024, 8192])
QUICK = dict(shapes=[(256, 8), (72, 4)], tokens=[1, 16])

MAX_SET_BYTES = 6 << 30   # device memory for the rotated input sets of one config
MIN_SETS_SMALL = 8        # distinct sets when a set is small (launch-latency bound)
MIN_SETS_LARGE = 2        # when one set is much larger than L2


@contextlib.contextmanager
def combine_threshold(max_bytes):
  """heuristics.COMBINE_XLA_MAX_BYTES for the traces made inside: -1 runs combine's
  CUDA kernel at every size, a huge value XLA's fusion at every size."""
  old = heuristics.COMBINE_XLA_MAX_BYTES
  heuristics.COMBINE_XLA_MAX_BYTES = max_bytes
  try:
    yield
  finally:
    heuristics.COMBINE_XLA_MAX_BYTES = old


def xla_f32(y, w):
  return jnp.einsum("tkh,tk->th", y.astype(jnp.float32), w).astype(y.dtype)


def xla_bf16(y, w):
  return (y * w[..., None].astype(y.dtype)).sum(1)


def xla_gather(rows, w, index):
  return jnp.einsum("tkh,tk->th", rows[index].astype(jnp.float32), w).astype(rows.dtype)


def num_sets(op_bytes: int, set_bytes: int, l2: int) -> int:
  """Sets so that one timed op's inputs over all sets exceed 2x L2 where memory
  allows (at T = 1 they cannot: 32 sets of 115 KB stay L2-resident, as y just
  written by the expert kernels would in a decode step)."""
  n = harness.rotation_count(op_bytes, l2, max_sets=32)
  n = max(n, MIN_SETS_SMALL if op_bytes < 4 * l2 else MIN_SETS_LARGE)
  return max(1, min(n, MAX_SET_BYTES // max(set_bytes, 1)))


def make_sets(key, n, T, k, H, dtype):
  sets = []
  for i in range(n):
    ky, kw, kr, kp = jax.random.split(jax.random.fold_in(key, i), 4)
    y = harness.random_array(ky, (T, k, H), dtype)
    w = jax.random.uniform(kw, (T, k), jnp.float32, 0.05, 1.0)
    rows = harness.random_array(kr, (T * k, H), dtype)
    index = jax.random.permutation(kp, T * k).astype(jnp.int32).reshape(T, k)
    sets.append((y, w, rows, index))
  return sets


def run(quick: bool, repeats: int):
  platform = jax.devices()[0].platform
  if platform == "cpu" and not quick:
    print("note: CPU device, running the --quick sizes (the full sizes are for a GPU)")
    quick = True
  cfg = QUICK if quick else FULL
  dtype = jnp.bfloat16
  l2 = _device.l2_bytes() if platform == "gpu" else 1 << 20
  copy_bw = harness.measure_copy_bandwidth(16 << 20 if quick else 2 << 30)
  read_bw = harness.measure_read_bandwidth(16 << 20 if quick else 1 << 30)
  print(f"device {harness.device_description()}  copy {copy_bw / 1e9:.0f} GB/s  "
        f"read {read_bw / 1e9:.0f} GB/s  build {jax_moe.build_info()['cuda_targets'] or 'cpu'}")

  rows_out = []
  key = jax.random.PRNGKey(0)
  for H, k in cfg["shapes"]:
    for T in cfg["tokens"]:
      itemsize = jnp.dtype(dtype).itemsize
      nbytes = T * k * H * itemsize + T * H * itemsize + T * k * 4
      set_bytes = 2 * T * k * H * itemsize  # y and rows both live per set
      n = num_sets(T * k * H * itemsize, set_bytes, l2)
      sets = make_sets(jax.random.fold_in(key, T * 100003 + H), n, T, k, H, dtype)
      dense = [(y, w) for y, w, _, _ in sets]
      indexed = [(r, w, i) for _, w, r, i in sets]
      loop = functools.partial(harness.time_loop, repeats=repeats, net=False)
      t_ours = loop(jax_moe.combine, dense)
      t_idx = loop(jax_moe.combine, indexed)
      with combine_threshold(-1):
        t_kern = loop(jax_moe.combine, dense)
        t_kern_net = harness.time_loop(jax_moe.combine, dense, repeats=repeats)
        t_kern_idx = loop(jax_moe.combine, indexed)
      with combine_threshold(1 << 62):
        t_fusion = loop(jax_moe.combine, dense)
        t_fusion_idx = loop(jax_moe.combine, indexed)
      t_f32 = loop(xla_f32, dense)
      t_bf16 = loop(xla_bf16, dense)
      t_gather = loop(xla_gather, indexed)
      del sets, dense, indexed
      t_xla = min(t_f32, t_bf16)
      itemsize_w = 4
      row = dict(
          shape=f"H={H},k={k}", H=H, k=k, T=T, sets=n, bytes=nbytes,
          lowering=("cpu" if platform != "gpu" else
                    "kernel" if heuristics.combine_uses_kernel(T, k, H, itemsize) else "xla"),
          us_ours=t_ours * 1e6, us_kernel=t_kern * 1e6, us_kernel_net=t_kern_net * 1e6,
          us_fusion=t_fusion * 1e6, us_fusion_idx=t_fusion_idx * 1e6,
          us_xla_f32=t_f32 * 1e6, us_xla_bf16=t_bf16 * 1e6,
          ours_vs_xla=t_ours / t_xla, GBps_ours=nbytes / t_ours / 1e9,
          pct_copy=100 * nbytes / t_ours / copy_bw,
          pct_copy_kernel_net=100 * nbytes / max(t_kern_net, 1e-12) / copy_bw,
          us_ours_idx=t_idx * 1e6, us_kernel_idx=t_kern_idx * 1e6,
          us_xla_gather=t_gather * 1e6, ours_vs_xla_idx=t_idx / t_gather,
          pct_copy_idx=100 * (nbytes + T * k * itemsize_w) / t_idx / copy_bw,
      )
      rows_out.append(row)
      print(f"  H={H} k={k} T={T}: ours ({row['lowering']}) {row['us_ours']:.1f} us "
            f"({row['pct_copy']:.0f}% of copy), kernel {row['us_kernel']:.1f} "
            f"(net {row['us_kernel_net']:.1f}), XLA {t_xla * 1e6:.1f} us; index form ours "
            f"{row['us_ours_idx']:.1f}, kernel {row['us_kernel_idx']:.1f}, XLA gather "
            f"{row['us_xla_gather']:.1f}", flush=True)
  print()
  harness.print_table(rows_out, COLS)
  return dict(device=harness.device_description(), platform=platform, quick=quick,
              copy_bandwidth=copy_bw, read_bandwidth=read_bw, dtype=jnp.dtype(dtype).name,
              rows=rows_out)


COLS = [("shape", "{}"), ("T", "{}"), ("lowering", "{}"), ("us_ours", "{:.1f}"),
        ("us_kernel", "{:.1f}"), ("us_kernel_net", "{:.1f}"), ("us_fusion", "{:.1f}"),
        ("us_xla_f32", "{:.1f}"),
        ("us_xla_bf16", "{:.1f}"), ("ours_vs_xla", "{:.2f}x"), ("pct_copy", "{:.0f}%"),
        ("pct_copy_kernel_net", "{:.0f}%"), ("us_ours_idx", "{:.1f}"),
        ("us_kernel_idx", "{:.1f}"), ("us_fusion_idx", "{:.1f}"), ("us_xla_gather", "{:.1f}"),
        ("ours_vs_xla_idx", "{:.2f}x"), ("pct_copy_idx", "{:.0f}%")]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="directory for combine.json")
  p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
  p.add_argument("--repeats", type=int, default=7)
  args = p.parse_args(argv)
  harness.require_kernels("bench_combine")
  payload = run(args.quick, args.repeats)
  path = os.path.join(args.out, "combine.json")
  harness.write_json(path, payload)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
