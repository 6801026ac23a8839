"""Every tuning choice of jax_moe, as pure functions of shapes, with the reason.

Kernels take these choices as FFI attributes, so this file is the one place to
change them. Numbers marked "measured" come from benchmarks/ on one H100 SXM
(132 SMs, ~3.0 TB/s); their runs are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

# ---- route -------------------------------------------------------------------

# Above this many tokens the router matmul runs as XLA's dot (tensor cores) and the
# routing kernel reads logits. The fused CUDA path reads the router weight once per
# 16-token tile with CUDA-core FMAs, which stops paying once T is a few tiles.
ROUTE_FUSED_MAX_TOKENS = 64


def route_fuse_router(num_tokens: int, num_experts: int, hidden: int) -> bool:
  del num_experts, hidden
  return num_tokens <= ROUTE_FUSED_MAX_TOKENS


def route_k_split(num_tokens: int, num_experts: int, hidden: int, sm_count: int) -> int:
  """Slices of H per router row in the fused path.

  A block computes 8 experts (one warp each) over one slice for a 16-token tile.
  Decode reads the whole router weight (DeepSeek-V3: 3.7 MB) in one launch, so we
  want about two blocks per SM in flight, but each warp should still load at least
  one full 512-byte row segment per step (256 bf16), or loads get too short.
  """
  expert_groups = -(-num_experts // 8)
  tiles = max(1, -(-num_tokens // 16))
  want = -(-2 * sm_count // (expert_groups * tiles))
  most = max(1, hidden // 256)
  return max(1, min(want, most))
