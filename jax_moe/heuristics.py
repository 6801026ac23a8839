"""Every tuning choice of jax_moe, as pure functions of shapes, with the reason.

Kernels take these choices as FFI attributes, so this file is the one place to
change them. Numbers marked "measured" come from benchmarks/ on one H100 SXM
(132 SMs, ~3.0 TB/s); their runs are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

# ---- route -------------------------------------------------------------------

# Up to this many tokens the router matmul runs inside the routing launch; above it,
# as XLA's dot (tensor cores) followed by the logits-only routing kernel. Measured on
# H100 (bench_route, RESULTS.md), fused vs the whole routing as XLA ops: T=1
# DeepSeek-V3 13.1 vs 20.7 us, Gemma-4 8.9 vs 9.4, Qwen3 8.2 vs 9.0; T=4 Gemma-4
# 11.2 vs 9.4 (slower) and T=16 DeepSeek-V3 73 vs 24 (much slower: each block reads
# its 16 tokens' rows through L1, which does not hold them at H=7168).
ROUTE_FUSED_MAX_TOKENS = 2


def route_fuse_router(num_tokens: int, num_experts: int, hidden: int) -> bool:
  del num_experts, hidden
  return num_tokens <= ROUTE_FUSED_MAX_TOKENS


def route_experts_per_block(num_tokens: int) -> int:
  """Experts per block in the fused path (1, 2, 4 or 8; 8 warps split among them).

  At T=1 one expert per block spreads the router weight over the most SMs. Each
  block reads its tokens' rows whole (they are shared by its warps through L1), so
  with more tokens per tile, more experts per block cut that L2 traffic: a 16-token
  tile at H=7168 is 229 KB per block.
  """
  if num_tokens <= 2:
    return 1
  if num_tokens <= 8:
    return 2
  return 4


# ---- expert_gemv -------------------------------------------------------------

# Which weight-streaming variant of the CUDA kernel runs (csrc/kernels/expert_gemv.cuh):
# 0 auto (= 4), 1 direct loads 4 chunks per batch, 3 + L2 256-byte prefetch hint,
# 4 + 8 chunks per batch. Measured on H100 (bench_gemv --variants 1,3,4): 4 reaches
# 2.6-3.0 TB/s on the large shapes where 1 reached 2.0-2.3 TB/s.
GEMV_KERNEL_VARIANT = 0


def gemv_token_tiles(num_tokens: int) -> int:
  """n-tiles of 8 tokens per weight pass (the kernel's NT: 1, 2 or 4).

  With distinct experts per token, one expert gets at most num_tokens assignments,
  so NT*8 >= num_tokens means every expert's weights are read once. Larger NT costs
  registers (accumulators) and shared memory; beyond 32 tokens per expert the kernel
  takes extra passes, which only prefill-sized batches hit (moe_block sends those
  to the grouped path).
  """
  if num_tokens <= 8:
    return 1
  if num_tokens <= 16:
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

# moe_block "auto": expert_gemv or the grouped path, by a cost model.
# expert_gemv streams the selected experts' weights once per pass of up to 32 tokens
# per expert, at the measured ~2.7-3.0 TB/s of an H100 (bench_gemv, variant 4), so
# its time is ~ passes * distinct-expert bytes / bandwidth. The grouped path's best
# XLA formulation for large T ("dense") is tensor-core bound: every expert on every
# token. At decode (T <= 64) gemv wins by 1.5-4x (bench_gemv vs XLA gather/ragged);
# the model keeps gemv for prefill too while its weight passes cost less than the
# dense FLOPs (DeepSeek-V3 and Gemma-4 even at T=4096; Mixtral, E/k = 4, switches).
# Rates are this workplace's H100 measurements (rounded down, see RESULTS.md).
MOE_GEMV_BYTES_PER_S = 2.7e12
MOE_DENSE_FLOPS_PER_S = 6.0e14
MOE_GEMV_TOKENS_PER_PASS = 32
# Up to this many tokens gemv always runs: the layer is launch- and latency-bound
# there, and gemv is 3 launches against the grouped path's sort/gather/matmuls.
MOE_GEMV_MIN_TOKENS = 16


def moe_implementation(num_tokens: int, num_experts: int, top_k: int, hidden: int,
                       intermediate: int) -> str:
  """"gemv" or "grouped" for moe_block's implementation="auto"."""
  if num_tokens <= MOE_GEMV_MIN_TOKENS:
    return "gemv"
  expert_bytes = 3 * hidden * intermediate * 2
  assignments = num_tokens * top_k
  distinct = min(num_experts, assignments)
  passes = max(1, -(-assignments // (num_experts * MOE_GEMV_TOKENS_PER_PASS)))
  gemv_s = passes * distinct * expert_bytes / MOE_GEMV_BYTES_PER_S
  # dense reads every expert's weights as well as doing every expert's FLOPs
  dense_s = max(2 * num_tokens * num_experts * 3 * hidden * intermediate / MOE_DENSE_FLOPS_PER_S,
                num_experts * expert_bytes / MOE_GEMV_BYTES_PER_S)
  return "gemv" if gemv_s <= dense_s else "grouped"


# Grouped path formulations (all XLA today; see moe._grouped_experts):
#   "gather":     copies each assignment's expert weights, then batched GEMVs. Moves
#                 about 3x the bytes of T*k experts (read, write, read back).
#   "ragged_dot": sort assignments by expert + two ragged_dot_general. On GPU XLA's
#                 ragged_dot reads every expert's weights whatever the routing.
#   "dense":      every expert on every token as two plain GEMMs, combine selects
#                 the rows. E/k times the useful FLOPs, but no sort or gather and
#                 full-size tensor-core tiles: good for small E/k (Mixtral).
# TO BE CONFIRMED on the GPU by benchmarks/bench_moe.py (grouped:* columns).
MOE_DENSE_MAX_FLOP_RATIO = 4          # E / k: dense computes this many times the FLOPs
MOE_DENSE_MAX_BYTES = 1 << 30         # its f32 [T, E, 2I] / [E, T, H] intermediates


def moe_grouped_method(num_tokens: int, num_experts: int, top_k: int, hidden: int,
                       intermediate: int) -> str:
  """"gather", "dense" or "ragged_dot" for the grouped path."""
  assignments = num_tokens * top_k
  # gather moves ~3 * T*k experts' bytes; ragged_dot reads all E experts once.
  if 3 * assignments < num_experts:
    return "gather"
  dense_bytes = 4 * num_tokens * num_experts * max(2 * intermediate, hidden)
  if num_experts <= MOE_DENSE_MAX_FLOP_RATIO * top_k and dense_bytes <= MOE_DENSE_MAX_BYTES:
    return "dense"
  return "ragged_dot"
