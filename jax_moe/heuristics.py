"""Every tuning choice of jax_moe, as pure functions of shapes, with the reason.

Kernels take these choices as FFI attributes, so this file is the one place to
change them. Numbers marked "measured" come from benchmarks/ on one H100 SXM
(132 SMs, ~3.0 TB/s); their runs are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

# ---- route -------------------------------------------------------------------

# Up to this many tokens the router matmul runs inside the routing launch; above it,
# as XLA's dot followed by the logits-only routing kernel. Measured on H100
# (bench_route, run s2-B2, us per call, fused / dot): DeepSeek-V3 T=1 10.8 / 7.6,
# T=16 19.2 / 12.9, T=64 24.2 / 14.4; Gemma-4 T=1 7.5 / 4.6, T=16 11.8 / 7.8,
# T=64 13.3 / 14.2; Qwen3 T=1 6.7 / 4.0, T=64 12.8 / 7.8. The two-launch path wins
# everywhere but one point: the fused kernel's serial chain (weight loads, partials
# to L2, fence + arrival counter, the last block re-reading k_splits partials, then
# the selection) is longer than XLA's tuned GEMV plus one more launch. So 0: the
# fused kernel stays available (route_p with k_splits, tested) but is not picked.
ROUTE_FUSED_MAX_TOKENS = 0

# Fused-path geometry (csrc/kernels/route.cuh): a block is 16 router rows x 8 tokens
# x one of k_splits slices of H (32-column chunks dealt to its 8 warps).
ROUTE_EXPERT_TILE = 16
ROUTE_TOKEN_TILE = 8
ROUTE_CHUNK = 32
ROUTE_BLOCKS_PER_SM = 2


def route_fuse_router(num_tokens: int, num_experts: int, hidden: int) -> bool:
  del num_experts, hidden
  return num_tokens <= ROUTE_FUSED_MAX_TOKENS


def route_k_splits(num_tokens: int, num_experts: int, hidden: int,
                   sm_count: int | None = None) -> int:
  """Slices of H in the fused route kernel (its grid's y dimension).

  The router matmul at decode is a ~1-4 MB weight read: it needs every SM pulling
  at once, so the grid is sized to about ROUTE_BLOCKS_PER_SM blocks per SM. Each
  warp should still get at least one 32-column chunk (k_splits <= chunks / 8).
  More splits cost the finishing block more partials to add (k_splits * 8 * E
  floats per token tile), so no more than needed.
  """
  if sm_count is None:
    from jax_moe import _device
    sm_count = _device.sm_count()
  expert_tiles = -(-num_experts // ROUTE_EXPERT_TILE)
  token_tiles = max(1, -(-num_tokens // ROUTE_TOKEN_TILE))
  chunks = -(-hidden // ROUTE_CHUNK)
  want = -(-ROUTE_BLOCKS_PER_SM * sm_count // (expert_tiles * token_tiles))
  splits = max(1, min(want, -(-chunks // 8)))
  per = -(-chunks // splits)         # chunks per split; no split left empty
  return max(1, -(-chunks // per))


# ---- expert_gemv -------------------------------------------------------------

# Which weight-streaming variant of the CUDA kernel runs (csrc/kernels/expert_gemv.cuh):
# 0 auto (= 4), 1 direct loads 4 chunks per batch, 3 + L2 256-byte prefetch hint,
# 4 + 8 chunks per batch. Measured on H100 (bench_gemv --variants 1,3,4): 4 reaches
# 2.6-3.0 TB/s on the large shapes where 1 reached 2.0-2.3 TB/s.
GEMV_KERNEL_VARIANT = 0


def gemv_token_tiles(num_tokens: int, num_experts: int | None = None,
                     top_k: int | None = None) -> int:
  """n-tiles of 8 tokens per weight pass (the kernel's NT: 1, 2 or 4).

  An expert with more assignments than 8 * NT takes extra passes over its weights
  (correct, slower for that expert), so NT should cover the busiest expert, but
  larger NT costs registers and memory-level parallelism: measured on H100
  (bench_moe, RESULTS.md), T=32-64 on Gemma-4/Qwen3 ran at 1.15-1.33x the floor with
  NT=4. One expert never gets more than num_tokens assignments; with top_k of
  num_experts chosen per token, one expert's count is about Binomial(T, k/E), so
  NT covers its mean plus three standard deviations (a hot expert in a skewed real
  routing just takes a second pass).
  """
  busiest = num_tokens
  if num_experts and top_k:
    mean = num_tokens * min(1.0, top_k / num_experts)
    busiest = min(num_tokens, int(mean + 3.0 * mean ** 0.5 + 1.0))
  if busiest <= 8:
    return 1
  if busiest <= 16:
    return 2
  return 4


def gemv_k_split(rows: int, reduce_len: int) -> int:
  """Warps (of 8 per block) that split the reduction dimension K: 8 or 4.

  A block covers 16 * (8 / k_split) rows. Splitting K gives smaller row tiles, so
  more blocks at decode (T=1 selects only k experts) and better balance across
  SMs; each warp should still stream at least ~8 chunks of 32 columns. 1 and 2 give
  row tiles whose shared-memory ring does not fit (the kernel then falls back to
  direct loads), so they are not chosen.
  """
  del rows
  return 8 if reduce_len // 8 >= 256 else 4


# ---- moe_block ---------------------------------------------------------------

# moe_block "auto": expert_gemv or the grouped path.
# Measured on H100 (bench_moe, RESULTS.md, run s2-A): the grouped path's best
# formulation at every T from 8-32 up is "dense" (every expert on every token, two
# tensor-core GEMMs), whose time is all experts' weight bytes until it turns
# FLOP-bound; expert_gemv reads only the selected experts (once per pass of up to
# 8*NT tokens each) but streams them at a lower rate than the dense GEMMs. So gemv
# wins while the selected experts are clearly fewer than all of them, and loses
# once routing touches nearly every expert. Measured crossovers: Gemma-4 (E=128,
# k=8) between T=16 and 32, Qwen3 (128, 8) between 32 and 64, Mixtral (8, 2)
# between 4 and 8; DeepSeek-V3 (256, 8) about even at 64. The expected fraction
# of experts selected (uniform routing) at those points is 0.64-0.87, 0.87-0.998,
# 0.68-0.90 and 0.87: gemv below MOE_GEMV_MAX_EXPERT_FRACTION.
MOE_GEMV_MAX_EXPERT_FRACTION = 0.89
# expert_gemv's per-block prologue scans every assignment (T*k ids) once per pass;
# beyond this many tokens that alone outweighs the weight stream (T=512: 2.8x the
# floor on Gemma-4).
MOE_GEMV_MAX_TOKENS = 256


def expected_expert_fraction(num_tokens: int, num_experts: int, top_k: int) -> float:
  """Expected fraction of experts that at least one of T tokens selects, for
  uniform routing (each token picks top_k distinct experts)."""
  p_miss = max(0.0, 1.0 - min(top_k, num_experts) / num_experts)
  return 1.0 - p_miss ** num_tokens


def moe_implementation(num_tokens: int, num_experts: int, top_k: int, hidden: int,
                       intermediate: int) -> str:
  """"gemv" or "grouped" for moe_block's implementation="auto"."""
  del hidden, intermediate
  if num_tokens > MOE_GEMV_MAX_TOKENS:
    return "grouped"
  frac = expected_expert_fraction(num_tokens, num_experts, top_k)
  return "gemv" if frac <= MOE_GEMV_MAX_EXPERT_FRACTION or num_tokens <= 1 else "grouped"


# Grouped path formulations (all XLA today; see moe._grouped_experts):
#   "gather":     copies each assignment's expert weights, then batched GEMVs. Moves
#                 about 3x the bytes of T*k experts (read, write, read back).
#   "ragged_dot": sort assignments by expert + two ragged_dot_general. On GPU XLA's
#                 ragged_dot reads every expert's weights whatever the routing, and
#                 was 4-8x slower than "dense" at every T measured (bench_moe: e.g.
#                 Gemma-4 T=4096 84 ms vs 11.2 ms; DeepSeek-V3 T=1-16 23 ms vs 7.4).
#   "dense":      every expert on every token as two plain GEMMs, combine selects
#                 the rows. E/k times the useful FLOPs, but no sort or gather and
#                 full-size tensor-core tiles; in token blocks (below) for large T.
# "dense" is the grouped default; "gather" only where T*k is far below E.
# ragged_dot stays selectable (grouped_method="ragged_dot"), e.g. for CPU or for
# devices where XLA lowers it to a real grouped GEMM.
MOE_DENSE_MAX_BYTES = 4 << 30         # f32 intermediates per dense token block


def moe_grouped_method(num_tokens: int, num_experts: int, top_k: int, hidden: int,
                       intermediate: int) -> str:
  """"gather" or "dense" for the grouped path."""
  del hidden, intermediate
  if 3 * num_tokens * top_k < num_experts:
    return "gather"
  return "dense"


def moe_dense_token_block(num_tokens: int, num_experts: int, hidden: int,
                          intermediate: int) -> int:
  """Tokens per dense block: its f32 intermediates ([t, E, 2I] gate/up, [E, t, H]
  output) stay under MOE_DENSE_MAX_BYTES. Each block re-reads every expert's
  weights, which at these sizes is small next to the block's FLOPs."""
  per_token = 4 * num_experts * max(2 * intermediate, hidden)
  tb = max(8, MOE_DENSE_MAX_BYTES // per_token // 8 * 8)
  return num_tokens if tb >= num_tokens else tb
