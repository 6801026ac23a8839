"""Every tuning choice of jax_moe, as pure functions of shapes, with the reason.

Kernels take these choices as FFI attributes, so this file is the one place to
change them. Numbers marked "measured" come from benchmarks/ on one H100 SXM
(132 SMs, ~3.0 TB/s); their runs are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math

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
# Re-measured in session 6 (run s6-12, fused / dot): DeepSeek-V3 T=1 10.38 / 7.71,
# T=16 18.24 / 12.49; Gemma-4 T=1 7.12 / 4.18; Qwen3 T=16 8.91 / 6.63. A two-launch
# variant (GEMM kernel, then a selection kernel: no fence or counter) was no faster
# than XLA's dot either (s6-1), so the slow part is our router GEMM itself. Session 7:
# the k-split blocks of a tile now form a thread-block cluster on sm_90 and add their
# partials in distributed shared memory (run s7-10, cluster / global-memory kernel /
# the path ours takes): DeepSeek-V3 T=1 11.18 / 10.86 / 7.62, T=8 12.33 / 18.73 /
# 11.71, T=16 13.48 / 19.43 / 11.92; Gemma-4 T=8 7.85 / 10.52 / 4.80; Qwen3 T=16 8.40
# / 10.26 / 5.41. Faster than before from T=4, still slower than the two-kernel path.
# Session 8 made the selection (shared by both paths) about 2 us shorter on
# DeepSeek-V3 and 0.4 us on the E=128 shapes; run s8-5 (fused / the path ours takes):
# DeepSeek-V3 T=1 9.09 / 6.51, T=4 9.59 / 7.63, T=8 10.29 / 11.06, T=16 11.43 /
# 10.25; Gemma-4 T=1 7.15 / 3.43, T=16 8.02 / 5.74; Qwen3 T=16 7.67 / 4.64. The fused
# kernel wins one point (DeepSeek-V3 T=8, by 7%, inside the call-to-call spread of
# earlier sessions), so it stays off.
ROUTE_FUSED_MAX_TOKENS = 0

# Fused-path geometry (csrc/kernels/route.cuh): a block is 16 router rows x 8 tokens
# x one of k_splits slices of H (ROUTE_CHUNK-column chunks dealt to its 8 warps). On
# sm_90 the k_splits blocks of a tile form one thread-block cluster (at most 8: the
# portable cluster size) and add their partials in distributed shared memory.
ROUTE_CHUNK = 32
ROUTE_MAX_SPLITS = 8


# Few tokens: the router matmul as an XLA multiply-reduce fusion (one kernel) instead
# of XLA's dot, which from T=4 is a split-K GEMM plus a reduction kernel. The fusion
# re-reads the router weight from L2 once per token, so it pays only while those
# re-reads stay small. Measured on H100 (bench_route, run s6-9, us per route call,
# dot / reduce): DeepSeek-V3 (E=256, H=7168) T=1 7.68 / 7.71, T=4 11.77 / 9.34,
# T=8 12.26 / 14.52, T=16 12.52 / 19.29; Gemma-4 (128, 2816) T=1 4.25 / 4.44, T=4
# 6.78 / 5.07, T=8 7.26 / 4.84, T=16 7.67 / 6.56; Qwen3 (128, 2048) T=1 4.00 / 3.88,
# T=4 5.93 / 4.96, T=8 6.40 / 5.00, T=16 6.45 / 6.02; and run s6-8 (noisier, 5
# repeats): Gemma-4 T=64 12.0 / 16.2, Qwen3 T=64 9.1 / 13.2. The wins sit at
# T * E * H * 2 <= 14.7 MB of re-reads, the losses from 29 MB: so reduce for
# 2 <= T <= 16 while T * E * H * itemsize <= ROUTE_REDUCE_MAX_BYTES (T=1 is a tie:
# XLA's dot at T=1 is already one reduce fusion).
ROUTE_REDUCE_MIN_TOKENS = 2
ROUTE_REDUCE_MAX_TOKENS = 16
ROUTE_REDUCE_MAX_BYTES = 16 << 20


def route_router_reduce(num_tokens: int, num_experts: int, hidden: int,
                        itemsize: int = 2) -> bool:
  """True: compute the router logits with the multiply-reduce fusion (see above)."""
  T = num_tokens
  return (ROUTE_REDUCE_MIN_TOKENS <= T <= ROUTE_REDUCE_MAX_TOKENS
          and T * num_experts * hidden * itemsize <= ROUTE_REDUCE_MAX_BYTES)


def route_fuse_router(num_tokens: int, num_experts: int, hidden: int) -> bool:
  del num_experts, hidden
  return num_tokens <= ROUTE_FUSED_MAX_TOKENS


# The logits path's selection, one block per token with a thread per expert
# (route_block_kernel, E <= ROUTE_BLOCK_MAX_EXPERTS) instead of one warp per token
# (route_logits_kernel). Why it may pay: the warp's selection is a chain of dependent
# steps, 4142 cycles (2.1 us) on DeepSeek-V3 and 2200 on the E=128 shapes (run s8-5),
# against a router GEMM of 1.8-2.4 us; the block kernel does each step in a few
# block-wide passes. Not yet measured on a GPU (written in session 23, when no device
# was lent), so 0: never picked until scripts/route_probe.cu and bench_route.py
# have timed it (their "block" columns); the GPU tests run it forced.
ROUTE_BLOCK_SELECT_MAX_TOKENS = 0
ROUTE_BLOCK_MAX_EXPERTS = 256  # kRouteBlockMaxExperts in csrc/kernels/route.cuh


def route_block_select(num_tokens: int, num_experts: int) -> bool:
  """True: the logits path's one-block-per-token selection kernel (see above)."""
  return (1 <= num_tokens <= ROUTE_BLOCK_SELECT_MAX_TOKENS
          and route_block_supported(num_experts, None, 1, 4))


# The fused path with the same block selection (route_gemv_block_kernel): one launch,
# each block the whole dot products of 1-2 router rows with a tile of 8 tokens, the
# logits through L2 and a per-tile arrival word, then blocks 0..7 of the tile route
# one token each. Why it may pay: after the router GEMM the cluster kernel spent 4.7
# of its 7.0 us at DeepSeek-V3 T=1 on the cluster exchange, the finishing block and
# one warp's selection (route_probe, s8-1/s8-5). Each block re-reads the tile's x rows
# from L2 (DeepSeek-V3 T=8: 128 blocks x 115 KB), so it is meant for few tokens. Not
# yet measured (session 23, no device), so 0: never picked.
ROUTE_FUSED_BLOCK_MAX_TOKENS = 0


def route_block_supported(num_experts: int, hidden: int | None, k_splits: int,
                          itemsize: int) -> bool:
  """Whether the block-selection kernels take a call: hidden None is the logits path
  (E <= ROUTE_BLOCK_MAX_EXPERTS); with the router (route.cuh's RouteGemvBlockSupported)
  also 16-bit inputs, H a multiple of 8 and one k-split."""
  if not 1 <= num_experts <= ROUTE_BLOCK_MAX_EXPERTS:
    return False
  return hidden is None or (itemsize == 2 and hidden >= 8 and hidden % 8 == 0 and k_splits == 1)


def route_fused_block(num_tokens: int, num_experts: int, hidden: int, itemsize: int) -> bool:
  """True: the router matmul and the block selection in one launch (see above)."""
  return (1 <= num_tokens <= ROUTE_FUSED_BLOCK_MAX_TOKENS
          and route_block_supported(num_experts, hidden, 1, itemsize))


def route_k_splits(hidden: int) -> int:
  """Slices of H in the fused route kernel: the blocks per (expert tile, token tile).

  The router matmul at decode is a ~1-4 MB weight read that wants many SMs pulling
  at once (DeepSeek-V3: 16 expert tiles x 8 splits = 128 blocks), while each of a
  block's 8 warps should get at least one 32-column chunk (k_splits <= chunks / 8).
  At most ROUTE_MAX_SPLITS, so that on sm_90 a tile's splits fit in one cluster and
  never take the slower global-memory partial path.
  """
  chunks = -(-hidden // ROUTE_CHUNK)
  return max(1, min(ROUTE_MAX_SPLITS, chunks // 8))


# ---- expert_gemv -------------------------------------------------------------

# Weight-streaming variants of the CUDA kernels (csrc/kernels/expert_gemv*.cuh):
# 0 auto (= 4), 1 direct loads 4 chunks per batch, 3 + L2 256-byte prefetch hint,
# 4 + 8 chunks per batch (two launches, registers hold the weights in flight),
# 5 the persistent bulk-copy kernel (one launch, a shared-memory ring; sm_90,
# T*k <= GEMV_STREAM_MAX_ASSIGN, E <= 1024; elsewhere it falls back to 4), 6 the same
# kernel with wider ring slots (1024 columns instead of 768), for H >= 4096; 7 the
# split kernels (no dependency between blocks; GEMV_SPLIT_MAX_TOKENS below); 8 the
# group kernel (GEMV_GROUP_MAX_TOKENS below).
# Measured on H100 (bench_gemv --variants 1,3,4): 4 reaches 2.6-3.0 TB/s on the
# large shapes where 1 reached 2.0-2.3 TB/s.
GEMV_KERNEL_VARIANT = 0
GEMV_STREAM_MAX_ASSIGN = 512
# Wide ring slots from this hidden size. The stream kernel alone (scripts/
# stream_probe.cu, run s7-5, us, 3 x 768 / 3 x 1024 columns per slot): Gemma-4
# (H=2816) T=1 39.3 / 42.9, T=64 519.4 / 537.9; Qwen3 (H=2048) T=1 33.9 / 35.9, T=64
# 409.2 / 445.4; Mixtral (H=4096) T=8 848.4 / 839.9, T=16 927.3 / 913.8; DeepSeek-V3
# (H=7168) T=8 1664.2 / 1644.3, T=64 6412.4 / 6300.2. Long rows pay per stage, so
# they want fewer, wider stages; short rows want the smaller ring's shorter tail.
GEMV_STREAM_WIDE_MIN_HIDDEN = 4096
# Most assignments per expert, on average (T * k / E), that the stream kernel takes
# (gemv_kernel_variant's docstring has the measurements): on the narrow ring, and on
# the wide ring, which cuts segments of 16 assignments once an expert has more than 8.
GEMV_STREAM_MAX_MEAN = 4
GEMV_STREAM_MAX_MEAN_WIDE = 8


def stream_wide_ring(hidden: int) -> bool:
  """Whether the stream kernel runs with the wide ring (variant 6: 1024-column slots,
  segments of up to 16 assignments) for this hidden size."""
  return hidden >= GEMV_STREAM_WIDE_MIN_HIDDEN


def gemv_kernel_variant(num_tokens: int, num_experts: int, top_k: int,
                        hidden: int = 0) -> int:
  """The stream kernel (5, or 6 with wide slots from GEMV_STREAM_WIDE_MIN_HIDDEN) up
  to GEMV_STREAM_MAX_ASSIGN assignments while the mean assignments per expert,
  T * k / E, is at most 4; else 4.

  v5 serves at most 8 assignments of an expert per weight pass (a busier expert
  takes another pass over its weights); v4 serves up to 32. Measured on H100
  (bench_gemv, gemv + combine, us, v4 / v5 with the work-queue v5; run s4-2,
  RESULTS.md session 4): Gemma-4 T=1 54.1 / 46.5, T=16 376.9 / 354.8, T=64 643.4 /
  559.4 (mean 4); Qwen3 T=64 464.7 / 446.7 (mean 4); DeepSeek-V3 T=16 2994.8 /
  2911.8, T=64 6646.3 / 6349.4 (mean 2); Mixtral T=16 1160.1 / 921.1 (mean 4),
  T=32 1039.3 / 1327.2 (mean 8), T=64 1059.2 / 2271.3 (mean 16). So v5 from
  T=1 up to a mean of 4 on every shape, v4 at a mean of 8 and above.
  Since session 10, v6 streams a busy expert's extra passes side by side so that they
  come from L2 ("run order", csrc/kernels/expert_gemv_stream.cuh), which helps skewed
  real routings on the wide shapes; on Mixtral it still lost to v4 at a mean of 8 and
  16 (run s10-6, gemv + combine, us, v4 / v6: T=32 1029.9 / 1051.3, T=64 1059.4 /
  1539.0), so GEMV_STREAM_MAX_MEAN stays 4.
  Since session 14 the wide ring cuts segments of 16 when an expert has more than 8
  assignments (csrc/kernels/expert_gemv_stream.cuh, kStreamWideGroups): one weight
  pass for up to 16. bench_gemv, Mixtral, gemv + combine in one call, us, v4 / v6
  (run s14-4): T=16 1239.4 / 941.7, T=32 1048.5 / 985.5, T=64 1060.8 / 1222.4. So
  the wide ring takes a mean of up to GEMV_STREAM_MAX_MEAN_WIDE (8); moe_block's
  gemv path follows (Mixtral T=32, run s14-4, us per layer: gemv 996.2, dense 1027.8).
  """
  if num_tokens * top_k > GEMV_STREAM_MAX_ASSIGN:
    return 4
  wide = stream_wide_ring(hidden)
  max_mean = GEMV_STREAM_MAX_MEAN_WIDE if wide else GEMV_STREAM_MAX_MEAN
  if num_tokens * top_k > max_mean * num_experts:
    return 4
  return 6 if wide else 5


# Variant 7, the split kernels (csrc/kernels/expert_gemv_split.cuh: no block waits for
# another; an expert that several tokens chose is read once per token), up to this
# many tokens where gemv_split_supported. 0: never picked by auto, because it lost to
# the stream kernel with the combine in its last block (scripts/split_probe.cu, run
# s21-1, H100, us, experts + weighted sum, stream / split; the floor 30.2 and 24.0 at
# T=1): Gemma-4 T=1 44.1 / 45.4, T=2 70.2 / 87.5, T=4 123.5 / 154.9; Qwen3 T=1 34.6 /
# 36.2, T=2 57.4 / 67.1, T=4 98.5 / 121.1. With no grid-wide wait the split kernel
# alone still took 48.8 us at Gemma-4 T=1 (41.9 with 64 columns per block) against a
# plain read's 32.7: the dependency was not what keeps the stream kernel off the floor.
# kernel_variant=7 still runs it (tested, memcheck clean in run s21-4).
GEMV_SPLIT_MAX_TOKENS = 0


def gemv_split_supported(num_tokens: int, top_k: int, num_shared: int, hidden: int,
                         intermediate: int, itemsize: int) -> bool:
  """Whether the split kernels take this call (else variant 7 runs the stream kernel);
  the same rule as SplitSupported in csrc/kernels/expert_gemv_split.cuh: 16-bit
  dtypes, no shared experts, k <= 16, H a multiple of 8 up to 4096, I a multiple of
  32 up to 1024."""
  T, k, H, I = num_tokens, top_k, hidden, intermediate
  return (itemsize == 2 and num_shared == 0 and T >= 1 and 1 <= k <= 16 and 8 <= H <= 4096
          and H % 8 == 0 and 32 <= I <= 32 * 32 and I % 32 == 0 and T * k * (I // 32) < 2**31)


# Variant 8, the group kernel (csrc/kernels/expert_gemv_group.cuh: G blocks per
# assignment, one per SM, each reading the same bytes in whole rows, h shared through
# the scratch; an expert that several tokens chose is read once per token), up to this
# many tokens where gemv_group_supported. Measured on H100, experts + weighted sum, us,
# stream kernel / group kernel (floor 29.9 and 23.7 at T=1, 57.4-57.9 and 46.1-46.3 at
# T=2):
#   bench_gemv (run s22-2, through JAX, one call): Gemma-4 T=1 44.1 / 40.6, T=2 73.2 /
#     72.2; Qwen3 T=1 37.2 / 35.0, T=2 59.5 / 58.1;
#   scripts/group_probe.cu (run s22-2, the sum in the kernel's last blocks): Gemma-4
#     T=1 41.2 / 39.7, T=2 69.8 / 69.5; Qwen3 T=1 34.8 / 33.4, T=2 57.7 / 56.8.
# T=1 gains 4-8%; T=2's 0.4-2.4% is within the harness's run-to-run spread (about
# 1.5%), and from T=2 tokens that share an expert make the group kernel read it twice
# (uniform routings rarely share one; real ones do). So 1.
GEMV_GROUP_MAX_TOKENS = 1


def gemv_group_supported(num_tokens: int, top_k: int, num_shared: int, hidden: int,
                         intermediate: int, itemsize: int) -> bool:
  """Whether the group kernel takes this call on an sm_90 GPU (else variant 8 runs the
  stream kernel); the same rule as GroupSupported in
  csrc/kernels/expert_gemv_group.cuh: 16-bit dtypes, no shared experts, T * k <= 512,
  H a multiple of 8 up to 3072, I a multiple of 8 up to 768 (the register arrays that
  fit without spills)."""
  T, k, H, I = num_tokens, top_k, hidden, intermediate
  return (itemsize == 2 and num_shared == 0 and T >= 1 and k >= 1 and T * k <= 512
          and 8 <= H <= 3072 and H % 8 == 0 and 8 <= I <= 768 and I % 8 == 0)


def expert_gemv_variant(num_tokens: int, num_experts: int, top_k: int, num_shared: int,
                        hidden: int, intermediate: int | None = None, itemsize: int = 2) -> int:
  """The variant expert_gemv runs: GEMV_KERNEL_VARIANT if set; else the group
  kernel (8) up to GEMV_GROUP_MAX_TOKENS tokens, or the split kernels (7) up to
  GEMV_SPLIT_MAX_TOKENS tokens, where they run (intermediate given); else
  gemv_kernel_variant of the problem the kernels see, T * (k + S) assignments over
  E + S experts (the S shared experts are slots k .. k + S - 1 of every token)."""
  if GEMV_KERNEL_VARIANT:
    return GEMV_KERNEL_VARIANT
  if (intermediate is not None and num_tokens <= GEMV_GROUP_MAX_TOKENS and
      gemv_group_supported(num_tokens, top_k, num_shared, hidden, intermediate, itemsize)):
    return 8
  if (intermediate is not None and num_tokens <= GEMV_SPLIT_MAX_TOKENS and
      gemv_split_supported(num_tokens, top_k, num_shared, hidden, intermediate, itemsize)):
    return 7
  return gemv_kernel_variant(num_tokens, num_experts + num_shared, top_k + num_shared, hidden)


# Most tokens one expert_gemv weight pass serves: 8 per n-tile, at most 4 n-tiles.
GEMV_MAX_TOKENS_PER_PASS = 32


def expected_busiest_expert(num_tokens: int, num_experts: int, top_k: int) -> int:
  """Assignments of the busiest expert when T tokens each pick top_k of num_experts
  uniformly: a count is about Binomial(T, k/E); its mean plus three standard
  deviations (not capped at T)."""
  mean = num_tokens * min(1.0, top_k / num_experts)
  return int(mean + 3.0 * mean ** 0.5 + 1.0)


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
    busiest = min(num_tokens, expected_busiest_expert(num_tokens, num_experts, top_k))
  if busiest <= 8:
    return 1
  if busiest <= 16:
    return 2
  return 4


def gemv_k_split(rows: int, reduce_len: int, gated: bool = False) -> int:
  """Warps (of 8 per block) that split the reduction dimension K: 8 or 4.

  A block covers 16 * (8 / k_split) rows. Splitting K gives smaller row tiles, so
  more blocks at decode (T=1 selects only k experts) and better balance across
  SMs; each warp should still stream enough 32-column chunks. Measured on H100
  (bench_gemv configs, run s2-B7, gemv + combine): the gate_up phase at K=2816
  (Gemma-4) and 2048 (Qwen3) ran faster with 4 than 8 (T=1 51.6 vs 55.3 and 41.6
  vs 43.5 us; T=8 243.5 vs 265.6 and 194.3 vs 204.1): a warp's stream of 11 or 8
  chunks is too short against its block's prologue. Down at K=704/768 was slower
  with 8 than 4 (56.1 vs 55.3 us). The down phase keeps its session-1 rule (8 when
  K // 8 >= 256) until measured otherwise.
  1 and 2 leave too few blocks at T=1 and are not chosen.
  """
  del rows
  if gated:
    return 8 if reduce_len // 8 >= 512 else 4
  return 8 if reduce_len // 8 >= 256 else 4


# expert_gemv_combine: the weighted sum inside the stream kernel or combine's own
# kernel launched after the experts from the same FFI call. Inside the kernel the
# last block out sums the whole [T, H] once every block's y is written (its 320
# threads, 8 columns each per round, up to 8 slots' loads in flight), so it costs
# about one L2 round trip per round of T * H / 8 vectors over 320 threads; combine's
# kernel costs its launch and a tail of 1.6-4.7 us after ours (run s13-6).
# scripts/stream_probe.cu, run s13-12, us, the library's launcher with combine's
# kernel / with the sum in the last block (two passes agreed within 0.4 us, bitwise
# equal outputs), rounds in brackets:
#   Gemma-4 (H=2816) T=1 43.3 / 41.6 (2), T=2 72.9 / 71.7 (3), T=4 124.8 / 124.9 (5),
#   T=8 212.9 / 217.9; Qwen3 (H=2048) T=1 36.9 / 34.7 (1), T=2 59.4 / 58.1 (2), T=4
#   100.1 / 100.1 (4); Mixtral (H=4096, k=2) T=1 238.0 / 236.3 (2), T=2 406.3 / 406.2
#   (4); DeepSeek-V3 (H=7168) T=1 238.4 / 237.8 (3), T=2 458.7 / 460.9 (6).
# So the last block sums while T * H / 8 fits in GEMV_COMBINE_IN_KERNEL_MAX_ROUNDS
# rounds and the slots in one group of 8 loads (k + S = 9, DeepSeek-V3's folded
# shared expert, was not timed). (Session 11's version, in which the publisher warp
# summed each (token, 16-row tile) as its slots completed, lost everywhere, run
# s11-2: Gemma-4 T=1 47.0 against 44.1 us with combine's kernel.)
# Through JAX (bench_gemv, run s14-1, us, combine's kernel / the last block's sum):
# T=1 Gemma-4 45.1 / 44.5, Qwen3 38.9 / 37.8, Mixtral 244.7 / 243.9, DeepSeek-V3
# (k=8, no shared expert) 243.7 / 244.7; T=2 Gemma-4 74.6 / 74.5, Qwen3 63.1 / 61.7.
# In moe_block (bench_moe, T=1 and 2) the two were within the passes' spread.
GEMV_COMBINE_IN_KERNEL_MAX_ROUNDS = 3
GEMV_COMBINE_IN_KERNEL_THREADS = 320     # the stream kernel's block (kStreamThreads)
GEMV_COMBINE_IN_KERNEL_MAX_SLOTS = 8


def gemv_combine_in_kernel(num_tokens: int, slots: int, hidden: int) -> bool:
  """True: expert_gemv_combine sums inside the stream kernel (its last block, when
  the stream kernel runs) or the group kernel (the last block of each token's row
  range); False: combine's kernel after the experts, launched by the same FFI call."""
  vectors = num_tokens * (hidden // 8)
  return (slots <= GEMV_COMBINE_IN_KERNEL_MAX_SLOTS and hidden % 8 == 0 and
          vectors <= GEMV_COMBINE_IN_KERNEL_MAX_ROUNDS * GEMV_COMBINE_IN_KERNEL_THREADS)


# ---- combine -----------------------------------------------------------------

# jax_moe.combine on CUDA: its kernel, or XLA's fusion of the same sum (reference.
# combine: f32 products added in slot order, dropped indices masked). A custom call is a kernel of its own: XLA cannot
# fuse it with the op that feeds its weights or the op that reads its output, and
# XLA's fusion of this sum streams as fast as the kernel. Measured (bench_combine,
# k=8, bf16, us, raw loop times: ours as a user gets it, with the chaining fusion
# that XLA fuses and our custom call cannot):
#   run s17-4 (H200), kernel / XLA's fusion, dense form then index form:
#     H=7168 T=1 3.9 / 1.4, 4.2 / 2.1; T=64 5.9 / 4.5, 6.1 / 5.5; T=256 13.0 / 10.4,
#     13.7 / 12.6; T=1024 37.6 / 33.4, 39.3 / 36.3; T=8192 255.9 / 250.1, 270.4 / 280.1
#     H=2816 T=1 4.0 / 1.3, 4.1 / 2.0; T=64 4.8 / 3.7, 5.7 / 4.3; T=1024 17.7 / 14.9,
#     19.1 / 16.6; T=8192 105.2 / 99.9, 111.9 / 108.6
#   The kernel wins one point: the index form at 939 MB of rows (H=7168 T=8192), by
#   3.5%; the fusion wins every other, up to 369 MB (H=2816 T=8192). Even net of the
#   chaining fusion, the kernel's own time is no better from T=256 (H=7168 T=1024:
#   35.4 against the fusion's 33.4 raw).
#   run s17-1 (H100), kernel against the fusion where it ran (4 MiB threshold): H=7168
#     T=1 4.0 / 1.8, T=16 4.9 / 3.4; H=2816 T=64 5.1 / 3.7.
# So XLA's fusion while y's rows read are at most COMBINE_XLA_MAX_BYTES, the kernel
# above. The CPU handler runs on CPU at every size. -1 runs the kernel at every size
# (the kernel's tests, sanitizer and profiler runs set it).
COMBINE_XLA_MAX_BYTES = 512 << 20


def combine_uses_kernel(num_tokens: int, top_k: int, hidden: int, itemsize: int) -> bool:
  """True: jax_moe.combine runs its CUDA kernel; False: XLA's fusion (reference).
  f32 rows always take the kernel: XLA's fusion of the f32 sum did not give the
  kernel's bits (run s22-2, H100: expert_gemv_combine on f32 against expert_gemv then
  combine differed in the last bit in 33-36% of the outputs, T=4 k=4 H=64), and the
  two calls must equal the fused call bitwise; bf16 and f16 rows gave the same bits
  (tests/test_combine.py::test_small_lowering_reduce_bitwise)."""
  if itemsize == 4:
    return True
  return num_tokens * top_k * hidden * itemsize > COMBINE_XLA_MAX_BYTES


# How XLA's fusion writes the sum: a reduction over the slot axis (jnp.sum of the f32
# products; in the index form the rows gathered with out-of-range slots masked to
# zero first) or the slot-ordered chain of adds (reference.combine).
# Measured with scripts/combine_xla_probe.py (H100, k=8, bf16, raw loop time, us,
# chain / reduction; the index form's rows permuted, every index valid):
#   run s18-1, dense:  H=7168 T=1 1.47 / 1.21, T=16 3.38 / 2.63, T=1024 47.32 / 47.83
#                      H=2816 T=1 1.53 / 1.07, T=16 2.20 / 1.44, T=1024 20.10 / 20.66
#   run s19-1, dense:  H=7168 T=1 1.44 / 1.00, T=16 3.34 / 2.47, T=1024 46.69 / 47.14
#                      H=2816 T=1 1.26 / 1.01, T=16 1.97 / 1.61, T=1024 19.95 / 20.39
#   run s19-1, index:  H=7168 T=1 2.07 / 1.40, T=16 3.99 / 3.39, T=1024 49.55 / 50.49
#                      H=2816 T=1 1.71 / 1.53, T=16 2.15 / 1.68, T=1024 22.03 / 22.71
#   (XLA's einsum(rows[index]), which clamps instead of masking, in s19-1: H=7168 T=1
#   1.86, T=16 3.22; H=2816 T=1 1.71, T=16 1.87.)
# The reduction was bitwise equal to the chain at every point, faster up to T=16
# (1.75 MiB of rows at H=7168) by 11-32%, and 1-3% slower at T=1024 (46 MiB of rows
# at H=2816), where both stream at the copy rate. Where between them it stops
# winning was not measured, so the reduction is used up to COMBINE_XLA_REDUCE_MAX_BYTES
# of rows (the largest measured win, rounded up) and the chain above.
# Why equal: XLA's GPU compiler emits a column reduction over fewer than 32 rows with
# its elemental emitter (IsUnnestedReductionFasterThanElemental in XLA's reduction
# utilities), one thread per output adding the rows in order from the init value. A
# longer slot axis may get the tiled emitter, which adds as a tree; only k = 8 was
# measured, so the reduction is used up to COMBINE_XLA_REDUCE_MAX_K slots.
# tests/test_combine.py::test_small_lowering_reduce_bitwise checks the bits on a GPU.
COMBINE_XLA_REDUCE_MAX_K = 8
COMBINE_XLA_REDUCE_MAX_BYTES = 2 << 20


def combine_xla_reduce(num_tokens: int, top_k: int, hidden: int, itemsize: int) -> bool:
  """True: XLA's fusion of combine's sum (either form) is a reduction over the slots;
  False: the slot-ordered chain of adds."""
  return (top_k <= COMBINE_XLA_REDUCE_MAX_K and
          num_tokens * top_k * hidden * itemsize <= COMBINE_XLA_REDUCE_MAX_BYTES)


# ---- moe_block ---------------------------------------------------------------

# moe_block "auto": expert_gemv or the grouped path.
# Measured on H100 (bench_moe, RESULTS.md, run s2-B3/B4, whole layer): the grouped
# path's best formulation from T=8-16 up is "dense" (every expert on every token,
# two tensor-core GEMMs): all experts' weight bytes until it turns FLOP-bound.
# expert_gemv reads only the selected experts but pays a per-block prologue that
# scans all T*k assignments. Measured winners: gemv at Gemma-4 T<=32 (T=32: 509 vs
# 572 us, run s2-B8), dense at 64 (611 vs 697, before the gate_up k_split change); Qwen3 gemv to 32, even at 64 (486 vs 486);
# Mixtral gemv to 4, even at 8 (965 vs 980), dense from 16 (990 vs 1148); DeepSeek-V3
# gemv to 512 (T=512: 13.9 vs 19.2 ms, dense FLOP-bound). Rule: gemv while uniform
# routing would select at most MOE_GEMV_MAX_EXPERT_FRACTION of the experts (those
# points sit at 0.87, 0.87, 0.68-0.90 and 0.87); above it, a cost model: gemv
# streams its passes at MOE_GEMV_BYTES_PER_S, times MOE_GEMV_BASE_OVERHEAD, times
# the prologue's share (1 + MOE_GEMV_PROLOGUE_COST * T*k / H: each block scans T*k
# ids for 16 rows of H columns; fitted to Gemma-4 and DeepSeek-V3 at T=64 and 512);
# dense is the larger of all experts' bytes and its FLOPs. The grouped path's
# "capacity" method (from MOE_CAPACITY_MIN_TOKENS) beats dense, but the static model
# (moe_expected_choice) prices the grouped path as dense. Session 15 (s15-8, us per layer, gemv / the
# grouped method auto runs): Gemma-4 T=128 743.4 / 683.8 (dense), T=256 933.3 /
# 678.0 (capacity): grouped, right; DeepSeek-V3 T=512 13214.4 / 13484.0: gemv,
# right; but DeepSeek-V3 T=128 7487.1 / 8777.5 and T=256 8760.2 / 10056.6 go to the
# grouped path, 15-17% slower. The model assumes uniform routing, and the
# benchmark's DeepSeek-V3 routing is skewed (busiest expert ~13x the mean). Session
# 16 replaced the static choice there with a run-time one ("priced", MOE_PRICED).
# Session 16 refit both models to measured times, priced on each routing's own counts
# (gemv: passes summed over the experts selected; grouped: the bucket that holds the
# busiest expert; RESULTS.md, session 16). DeepSeek-V3 unless named, ms, measured /
# model:
#   gemv:     T=128 skewed 7.49 / 7.55, T=256 skewed 8.76 / 8.96, T=512 skewed 13.21 /
#             13.52, T=512 near-uniform 13.91 / 13.74; Gemma-4 T=128 0.743 / 0.846.
#   grouped:  capacity C=32 8.19 / 8.32, C=64 8.77 / 8.86, C=160 10.06 / 10.50, C=320
#             13.48 / 13.22; dense T=128 8.78 / 9.95; Gemma-4 dense T=128 0.684 / 0.672.
# Measured: s15-8 and s15-14; the counts are those of the benchmark's first input set
# (its timed loop routes each layer's output, whose counts differ somewhat).
# (Sessions 2-15 used BASE_OVERHEAD 1.1, PROLOGUE_COST 1.2 and max(bytes, FLOPs) at
# 2.6e12 / 5.7e14, which overpriced gemv at T=512 by 15-20%.)
MOE_GEMV_MAX_EXPERT_FRACTION = 0.89
MOE_GEMV_MAX_TOKENS = 512
MOE_GEMV_BYTES_PER_S = 2.6e12
MOE_GEMV_BASE_OVERHEAD = 1.2
MOE_GEMV_PROLOGUE_COST = 0.56
MOE_GROUPED_BYTES_PER_S = 2.9e12
MOE_DENSE_FLOPS_PER_S = 5.7e14
MOE_GROUPED_EXPOSED_FLOPS = 0.43


def expected_expert_fraction(num_tokens: int, num_experts: int, top_k: int) -> float:
  """Expected fraction of experts that at least one of T tokens selects, for
  uniform routing (each token picks top_k distinct experts)."""
  p_miss = max(0.0, 1.0 - min(top_k, num_experts) / num_experts)
  return 1.0 - p_miss ** num_tokens


def moe_expert_bytes(hidden: int, intermediate: int) -> int:
  """One expert's gate/up and down weights in bf16 (what the model's rates were
  measured on)."""
  return 3 * hidden * intermediate * 2


def moe_gemv_seconds(expert_passes, num_tokens: int, top_k: int, hidden: int,
                     intermediate: int):
  """Model time of expert_gemv outside the stream kernel: `expert_passes` weight
  passes summed over the experts (an expert's pass serves gemv_tokens_per_pass of its
  assignments), streamed at MOE_GEMV_BYTES_PER_S, times MOE_GEMV_BASE_OVERHEAD and the
  prologue's share. expert_passes may be a traced jax scalar (moe._grouped_priced)."""
  return (expert_passes * moe_expert_bytes(hidden, intermediate) / MOE_GEMV_BYTES_PER_S
          * MOE_GEMV_BASE_OVERHEAD * (1 + MOE_GEMV_PROLOGUE_COST * num_tokens * top_k / hidden))


def moe_grouped_seconds(rows_per_expert: int, num_experts: int, hidden: int,
                        intermediate: int) -> float:
  """Model time of the grouped path's matmuls over rows_per_expert rows of each
  expert (dense: T; capacity: its bucket C): every expert's weights streamed at
  MOE_GROUPED_BYTES_PER_S plus the share MOE_GROUPED_EXPOSED_FLOPS of the FLOPs' time
  at MOE_DENSE_FLOPS_PER_S that the weight stream does not hide."""
  E = num_experts
  return (E * moe_expert_bytes(hidden, intermediate) / MOE_GROUPED_BYTES_PER_S
          + MOE_GROUPED_EXPOSED_FLOPS * 2 * rows_per_expert * E * 3 * hidden * intermediate
          / MOE_DENSE_FLOPS_PER_S)


def gemv_tokens_per_pass(num_tokens: int, num_experts: int, top_k: int) -> int:
  """Assignments of one expert that one weight pass of expert_gemv's register kernel
  serves (8 per n-tile); a busier expert takes more passes."""
  return 8 * gemv_token_tiles(num_tokens, num_experts, top_k)


def moe_implementation(num_tokens: int, num_experts: int, top_k: int, hidden: int,
                       intermediate: int) -> str:
  """"gemv", "grouped" or "priced" (chosen at run time, see MOE_PRICED) for
  moe_block's implementation="auto"."""
  T, E, k = num_tokens, num_experts, top_k
  if T > MOE_GEMV_MAX_TOKENS:
    return "grouped"
  if gemv_kernel_variant(T, E, k, hidden) in (5, 6):
    # The stream kernel beat the dense path wherever it applies (run s4-2/s4-4,
    # gemv + combine vs the whole dense layer, us): Gemma-4 T=64 559 vs 618, Qwen3
    # T=64 447 vs 500, Mixtral T=16 921 vs 987; DeepSeek-V3 stays gemv to T=512;
    # Mixtral T=32 (segments of 16, run s14-4, moe_block per layer) 996 vs 1028.
    return "gemv"
  frac = expected_expert_fraction(T, E, k)
  if frac <= MOE_GEMV_MAX_EXPERT_FRACTION or T <= 1:
    return "gemv"
  if MOE_PRICED and moe_grouped_method(T, E, k, hidden, intermediate) == "capacity":
    return "priced"
  return moe_expected_choice(T, E, k, hidden, intermediate)


def moe_expected_choice(num_tokens: int, num_experts: int, top_k: int, hidden: int,
                        intermediate: int) -> str:
  """The static model of sessions 2-15 ("gemv" or "grouped"): moe_gemv_seconds and
  moe_grouped_seconds (dense rows) on a uniform routing's expected experts and
  busiest expert."""
  T, E, k = num_tokens, num_experts, top_k
  passes = max(1, -(-expected_busiest_expert(T, E, k) // GEMV_MAX_TOKENS_PER_PASS))
  gemv_s = moe_gemv_seconds(passes * expected_expert_fraction(T, E, k) * E, T, k, hidden,
                            intermediate)
  return "gemv" if gemv_s < moe_grouped_seconds(T, E, hidden, intermediate) else "grouped"


# "priced" (session 16): between the stream kernel's reach and MOE_GEMV_MAX_TOKENS the
# better of gemv and the grouped path depends on the routing, which only the run
# knows. A skewed routing selects fewer experts (gemv reads fewer weights) but needs
# a larger capacity (the grouped path computes more rows); a near-uniform one selects
# every expert once per pass. Measured on H100 (us per layer, DeepSeek-V3): T=512 on
# the benchmark's skewed routing (busiest expert ~13x the mean), gemv 13214.4 /
# capacity 13484.0 (s15-8); on near-uniform routing (--bias-scale 0) gemv 13906.7 /
# capacity 8192.0 (s15-14); T=128 and 256 skewed, gemv 7487.1 and 8760.2 against the
# grouped path's 8777.5 and 10056.6 (s15-8). No static rule wins all of these. So
# "auto" there builds both (moe._grouped_priced): the grouped method's run-time
# branches (capacity buckets, dense) and gemv, and picks per call by the models above
# fed with the routing's own counts: gemv's passes summed over the experts it
# selects, the capacity of the smallest bucket that holds the busiest expert.
# Only where the grouped method is "capacity", whose run-time switch exists anyway:
# over the dense method the switch itself cost 5-33 us per layer (bench_moe, T=128,
# us, auto priced over dense / grouped:dense, two passes, run s16-3: Gemma-4
# 713.1, 710.2 / 693.4, 688.4; Qwen3 602.9, 592.0 / 569.7, 567.9; Mixtral 1179.1,
# 1165.9 / 1146.5, 1161.0); over capacity it cost nothing measurable (T=256, auto /
# grouped:capacity: Gemma-4 685.7, 694.8 / 697.8, 690.7; Qwen3 579.1, 568.4 / 571.4,
# 576.6). Elsewhere the static moe_expected_choice decides.
# What it bought (DeepSeek-V3, us per layer, auto / what session 15's rule ran, same
# run; a version that sorted inside each capacity branch): skewed T=128 7414.8 /
# dense 9104.1, T=256 8889.4 / capacity 11129.6, T=512 13317.2 / gemv 13369.4 (s16-1);
# near-uniform T=512 8375.1 / gemv 14000.2 (s16-2).
MOE_PRICED = True


# Shared experts in the routed experts' expert_gemv call (slots k .. k + S - 1 of every
# token) instead of a second call: one weight stream with one ramp and one tail, and
# no separate f32 add. The stream kernel serves at most 8 assignments of an expert
# per weight pass (16 on the wide ring since session 14, when an expert has more than
# 8), and every token is an assignment of each shared expert, so up to 8 tokens (16
# on the wide ring) the shared weights are still read once; beyond that a separate call
# (variant 4 serves 32 tokens per pass) reads them fewer times. Needs the shared
# experts' intermediate size to equal the routed one's (one weight layout).
# Measured on H100 (bench_moe, DeepSeek-V3, folded / --no-fold-shared in one call,
# run s9-2, us per layer): T=1 279.9 / 296.8, T=2 484.8 / 506.4, T=4 847.6 / 859.4,
# T=8 1403.5 / 1444.9. Above 8 tokens the folded shared expert takes a second weight
# pass (from L2 on the wide ring, whose run order puts its segments side by side):
# with the fold up to 32 tokens, s10-4, us per layer (x floor), folded / not: T=16
# 2243.7 (1.040) / 2260.0 (1.040), T=32 3200.1 (1.053) / 3150.0 (1.040).
# Session 14: the wide ring cuts segments of 16 when an expert has more than 8
# assignments, so there a folded shared expert is read once up to 16 tokens.
# bench_moe, DeepSeek-V3 T=16, us per layer, fold up to 8 / up to 16, passes in the
# order 8, 16, 16, 8 (run s14-10): 2308.2, 2248.6 / 2237.5, 2226.7 (the first pass
# the slowest of all). So MOE_FOLD_SHARED_MAX_TOKENS_WIDE = 16 from
# GEMV_STREAM_WIDE_MIN_HIDDEN.
MOE_FOLD_SHARED_MAX_TOKENS = 8
MOE_FOLD_SHARED_MAX_TOKENS_WIDE = 16


def moe_fold_shared(num_tokens: int, num_experts: int, top_k: int, num_shared: int,
                    hidden: int, intermediate: int, shared_intermediate: int) -> bool:
  """Whether moe_block's gemv path runs the shared experts inside the routed call."""
  if num_shared < 1 or shared_intermediate != intermediate:
    return False
  wide = stream_wide_ring(hidden)
  if num_tokens > (MOE_FOLD_SHARED_MAX_TOKENS_WIDE if wide else MOE_FOLD_SHARED_MAX_TOKENS):
    return False
  return expert_gemv_variant(num_tokens, num_experts, top_k, num_shared, hidden) in (5, 6)


# Shared experts outside the routed call (more than MOE_FOLD_SHARED_MAX_TOKENS[_WIDE]
# tokens): expert_gemv on [T, S] ids, or two XLA matmuls (every token runs every
# shared expert: a [T, H] x [H, S * 2I] GEMM reads the weights once at any T).
# expert_gemv's register kernel (variant 4) serves GEMV_MAX_TOKENS_PER_PASS tokens per
# weight pass, so above that it reads the shared weights twice or more:
# scripts/trace_chain.py (run s13-8) timed its two kernels per layer at about 46 us
# for T=16 and 117 us for T=64 on DeepSeek-V3's one shared expert (88 MB: 28.4 us at
# 3.1 TB/s). bench_moe, DeepSeek-V3, moe_block auto, us per layer, shared experts by
# expert_gemv / by matmuls, passes in the order gemv, matmul, matmul, gemv: run s13-9
# T=16 2245.6, 2251.4 / 2249.7, 2270.6; T=64 4111.2, 4108.6 / 4017.5, 4031.2; run
# s13-10 T=32 3125.5, 3119.8 / 3140.0, 3133.5. So expert_gemv while one pass serves
# every token, matmuls beyond.
MOE_SHARED_GEMV_MAX_TOKENS = GEMV_MAX_TOKENS_PER_PASS


def moe_shared_dense(num_tokens: int) -> bool:
  """Whether moe_block's gemv path runs unfolded shared experts as XLA matmuls."""
  return num_tokens > MOE_SHARED_GEMV_MAX_TOKENS


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
#   "capacity":   sort assignments by expert, pad each expert's rows to a capacity
#                 C that holds the busiest expert (buckets below), two batched
#                 GEMMs over [E, C] rows: about E * C rows of work instead of E * T.
# "capacity" from MOE_CAPACITY_MIN_TOKENS tokens, "dense" below, "gather" where T*k
# is far below E. Measured on H100 (bench_moe, session 15, us per layer, dense /
# capacity; run s15-8 unless marked): Gemma-4 T=128 683.8 / 742.3, T=256 865.4 /
# 678.0, T=512 1506.1 / 760.6, T=4096 11149.2 (s15-7) / 1590.5; Qwen3 T=128 573.4 /
# 526.3, T=256 714.7 / 544.3, T=512 1201.2 / 609.1, T=4096 9005.4 (s15-7) / 1304.3;
# Mixtral T=128 1131.2 / 1081.3, T=256 1312.4 / 1144.5, T=512 2414.5 / 1231.7,
# T=4096 17821.1 (s15-7) / 5378.7; DeepSeek-V3 T=128 8777.5 / 8766.3, T=256 10898.4
# / 10056.6, T=512 19650.0 / 13484.0; and s15-7 (the first buckets) at T=64:
# Gemma-4 605.9 / 663.8, Qwen3 482.9 / 497.6, Mixtral 1033.5 / 1070.6. Capacity
# wins every shape from 256 (1.1-7x); at 128 it wins three of four by up to 8% and
# loses Gemma-4 by 8%, so session 15's rule started at 256.
# ragged_dot stays selectable (grouped_method="ragged_dot"), e.g. for CPU or for
# devices where XLA lowers it to a real grouped GEMM.
# Session 16 (T=128, us per layer, dense / capacity): run s16-3 (two passes, a
# version that sorted inside each bucket branch) Gemma-4 693.4, 688.4 / 661.2, 654.0;
# Qwen3 569.7, 567.9 / 534.9, 528.9; Mixtral 1146.5, 1161.0 / 1090.8, 1091.7;
# DeepSeek-V3 near-uniform (s16-2) 8780.5 / 8029.6; and run s16-7 (final code, the
# sort before the switch as in session 15; capacity as "auto") Gemma-4 682.8 / 647.7,
# Qwen3 560.3 / 514.1, Mixtral 1144.5 / 1081.9. Capacity wins at 128 on every shape,
# so the rule starts at 128. Session 15 had Gemma-4 at 128 the other way round (742.3
# against 683.8, one pass, s15-8); s16-7 did not reproduce it. On the skewed DeepSeek-V3
# routing dense was faster at 128 (9104.1 / 9369.8), where "priced" runs gemv anyway
# (7414.8). At T=64 capacity lost (s15-7).
MOE_DENSE_MAX_BYTES = 8 << 30         # f32 intermediates per dense token block
MOE_CAPACITY_MIN_TOKENS = 128


def moe_grouped_method(num_tokens: int, num_experts: int, top_k: int, hidden: int,
                       intermediate: int) -> str:
  """"gather", "dense" or "capacity" for the grouped path."""
  del hidden, intermediate
  if 3 * num_tokens * top_k < num_experts:
    return "gather"
  if num_tokens >= MOE_CAPACITY_MIN_TOKENS and moe_capacity_buckets(num_tokens, num_experts,
                                                                     top_k):
    return "capacity"
  return "dense"


# "capacity": the assignments sorted by expert and each expert's rows padded to a
# capacity C, then batched matmuls over [E, C] rows (moe._grouped_capacity). C must
# hold the busiest expert, which only the routing knows, so the program carries one
# branch per capacity bucket and picks at run time the smallest that fits; a routing
# that fits none runs the dense formulation. Buckets: MOE_CAPACITY_FIRST times the
# mean T*k/E, then doubling (so at most 2x the busiest expert's rows), rounded up to
# MOE_CAPACITY_ALIGN rows, all below T (dense already does E * T rows). Buckets go
# far above the mean because routings can be skewed: the benchmark's DeepSeek-V3
# routing, with a random correction bias, gives its busiest expert 13.5x the mean at
# T=4096 (RESULTS.md, session 15).
MOE_CAPACITY_FIRST = 1.25
MOE_CAPACITY_ALIGN = 16


def moe_capacity_buckets(num_tokens: int, num_experts: int, top_k: int) -> tuple[int, ...]:
  """Row capacities per expert of the "capacity" grouped method, ascending, each
  below num_tokens (see MOE_CAPACITY_FIRST)."""
  T, E, k = num_tokens, num_experts, top_k
  if E < 1 or T < 1:
    return ()
  f = MOE_CAPACITY_FIRST * T * k / E
  out = []
  while True:
    c = -(-math.ceil(f) // MOE_CAPACITY_ALIGN) * MOE_CAPACITY_ALIGN
    if c >= T:
      return tuple(out)
    if not out or c > out[-1]:
      out.append(c)
    f *= 2


def moe_dense_token_block(num_tokens: int, num_experts: int, hidden: int,
                          intermediate: int) -> int:
  """Tokens per dense block: its f32 intermediates ([t, E, 2I] gate/up, [E, t, H]
  output) stay under MOE_DENSE_MAX_BYTES. Each block re-reads every expert's
  weights, which at these sizes is small next to the block's FLOPs."""
  per_token = 4 * num_experts * max(2 * intermediate, hidden)
  tb = max(8, MOE_DENSE_MAX_BYTES // per_token // 8 * 8)
  if tb >= num_tokens:
    return num_tokens
  # Equal blocks (padding under 8 tokens): a 2976 + 2976 split of T=4096 ran
  # Gemma-4 at 21.2 ms against 11.2 ms unblocked (run s2-B3).
  blocks = -(-num_tokens // tb)
  per = -(-num_tokens // blocks)
  return -(-per // 8) * 8
