// expert_gemv "stream" kernel (sm_90, kernel_variant 5): one persistent launch for
// both phases at decode sizes. Same outputs as gemv_mma_kernel (expert_gemv.cuh):
//   phase 1: h[a, r] = act(w_gate[e, r] . x[a / k]) * (w_up[e, r] . x[a / k]);
//   phase 2: y[a, r] = w_down[e, r] . h[a].
//
// Why: at T = 1 the register-streaming kernel ran both phases near half of peak DRAM
// bandwidth (ncu, RESULTS.md s2-B7): its bytes in flight are bounded by registers
// and its row-tile grid does not divide evenly over the SMs. Design:
//   * one block per SM, one launch; every block computes the same work list (the
//     selected experts, split into segments of at most 8 assignments, or 16 on the
//     wide ring when an expert has more than 8: kStreamWideGroups). Units are
//     (segment, 8 gate + the matching 8 up rows) in phase 1 and (segment, 16 w_down
//     rows) in phase 2, numbered phase 1 first, segments ascending (on the wide ring
//     one expert's segments of the same rows adjacent: "run order", below);
//   * blocks claim units a few at a time from a global counter (a work queue), so
//     blocks that ran ahead take more units and all finish together (the first
//     version gave each block an equal share and waited grid-wide between the
//     phases: the shares of 5 and 6 units, and the wait, cost 5-12%; RESULTS.md s4);
//   * one producer warp claims, then streams each unit's 16 weight rows (one 1-D
//     bulk copy per lane, cp.async.bulk completing on an mbarrier, L2 evict-first)
//     into a ring of shared-memory slots: the bytes in flight per SM are the ring,
//     not registers. It writes the unit number beside the slot (id barrier);
//   * two groups of 4 consumer warps take alternate units (each group has its own
//     NS slots), so one group's end-of-unit work overlaps the other's stages. The 4
//     warps of a group split each stage's 32-column chunks (the chunk layout of
//     mma.cuh), run mma.sync with the segment's tokens as B (one or two groups of
//     8), keep f32 partial sums in registers across a unit's stages and add the 4
//     warps' partials in a fixed order: deterministic, no atomics on results;
//   * a publisher warp takes each group's finished units from a small job ring: for a
//     phase-1 unit it makes the group's h stores visible grid-wide and counts the unit
//     (one release-add per unit; the consumers' own gpu-scope fence had stalled the
//     writing warps);
//   * a phase-2 unit reads h of its segment: its consumers wait until the segment's
//     phase-1 units are counted done (per-segment counters, release/acquire). Every
//     phase-1 unit is claimed before any phase-2 unit and consumers take units in
//     claim order, so the units waited for are held by running blocks that finish
//     them without waiting: no deadlock, and no need for all blocks to be resident.
//   * the counters are static device words reset by the last block out, so one
//     stream-kernel call may run at a time per device (XLA issues our custom calls
//     on one compute stream).
// Every block must cut the same segments, so the prologue lists each expert's
// assignments in ascending order without atomics (a first version placed them with
// shared-memory atomics: blocks disagreed on the segments under compute-sanitizer,
// and some outputs were computed twice and others never).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/activation.cuh"
#include "common/cuda_utils.cuh"
#include "common/mma.cuh"
#include "common/params.h"
#include "kernels/combine.cuh"  // sum_slots8_l2, store_unit: the fused combine sums as combine does

namespace jax_moe {
namespace cuda {

constexpr int kStreamConsumerWarps = 8;
constexpr int kStreamGroupWarps = 4;       // consumer warps per group (2 groups)
constexpr int kStreamGroups = kStreamConsumerWarps / kStreamGroupWarps;
constexpr int kStreamProducerWarp = kStreamConsumerWarps;
constexpr int kStreamPublisherWarp = kStreamConsumerWarps + 1;
constexpr int kStreamThreads = 32 * (kStreamConsumerWarps + 2);  // + producer + publisher
// Ring: kStreamStages slots per consumer group of kStreamCols columns (hidden size
// under 4096) or kStreamColsWide (from 4096: expert_gemv variant 6, chosen by
// heuristics.gemv_kernel_variant). scripts/stream_probe.cu, run s7-5, the kernel
// alone, us, 4 x 768 (the earlier ring) / 3 x 768 / 3 x 1024, two passes agreed
// within 0.6 us: Gemma-4 T=1 40.6 / 39.3 / 42.9, T=64 519.3 / 519.4 / 537.9; Qwen3
// T=1 35.5 / 33.9 / 35.9, T=64 413.9 / 409.2 / 445.4; Mixtral T=16 915.9 / 927.3 /
// 913.8; DeepSeek-V3 T=1 235.3 / 236.1 / 234.7, T=64 6363.6 / 6412.4 / 6300.2. Fewer
// slots hold fewer bytes per block when the queue runs dry (the small shapes' tail);
// wider slots cut the per-stage work of the long rows. (s4-5: 4 x 768 had beaten
// 3 x 1024 on the small shapes; 6 x 512, 7 x 384, 4 x 512 and 2 x 768 were slower
// everywhere in s7-4/s7-5.)
constexpr int kStreamStages = 3;
constexpr int kStreamRows = 16;            // weight rows per unit (A rows of the mma)
constexpr int kStreamCols = 768;
constexpr int kStreamColsWide = 1024;
// Stage geometry for at most MAXC columns: row stride in bytes (= 64 mod 128: no bank
// conflicts between the two rows a quarter-warp reads), stage bytes, chunks per warp.
template <int MAXC> struct StreamGeom {
  static constexpr int kRowStride = MAXC * 2 + 64;
  static constexpr int kStageBytes = kStreamRows * kRowStride;
  static constexpr int kChunksPerWarp = MAXC / 32 / kStreamGroupWarps;
};
// Units per claim from the work queue: kStreamClaim, but phase-2 units on the narrow
// ring (one stage of 16 rows each, 22-24 KB on Gemma-4 / Qwen3) are claimed
// kStreamClaimNarrow2 at a time, or kStreamClaimNarrow2Many when a block has at least
// kStreamManyUnits2 of them on average: a two-unit claim there brought too few bytes
// per atomic round trip. scripts/stream_probe.cu, run s12-6, the kernel alone, us,
// phase-2 claims of 2 / 4 / 6 / 8 (two passes agreed within 1 us): Gemma-4 T=1
// 41.9 / 41.5 / 42.5 / 44.5, T=2 73.1 / 71.9 / 71.9 / 72.6, T=8 218.6 / 214.3 / 213.7
// / 212.9, T=64 536.5 / 522.0 / 517.5 / 514.7; Qwen3 T=1 37.7 / 36.6 / 38.8 / 41.3,
// T=8 171.6 / 169.0 / 169.5 / 170.8, T=64 420.7 / 409.1 / 407.1 / 407.8 (T=8 has
// 68 phase-2 units per block, T=64 170). On the wide ring (multi-stage units) claims
// of 4 were slower: Mixtral T=16 914.0 / 936.1, DeepSeek-V3 T=16 2922.0 / 2928.1; and
// phase-1 claims of 4 cost T=1 (Gemma-4 41.9 -> 44.9, Qwen3 37.7 -> 39.0).
constexpr int kStreamClaim = 2;
constexpr int kStreamClaimNarrow2 = 4;
constexpr int kStreamClaimNarrow2Many = 6;
constexpr int kStreamManyUnits2 = 128;
// Near the end of the queue (fewer than this many units per block left) claims take
// one unit: a claimed unit cannot move to a block that runs dry, so two-unit claims
// at the end leave some blocks a unit behind the others (the tail). 0 disables it.
// scripts/stream_probe.cu, run s9-6, the kernel alone, us, 0 / 4 (two passes agreed
// within 0.6): Gemma-4 T=1 39.6 / 39.4, T=8 215.5 / 212.4, T=64 524.2 / 517.1;
// Mixtral T=1 239.7 / 236.7, T=8 833.2 / 831.9; DeepSeek-V3 within 0.5; but Qwen3
// T=1 33.9 / 34.9 and T=2 55.3 / 56.1 (1 and 2 were no better there: 35.4, 35.3).
// With the larger phase-2 claims of session 12, 8 (runs s12-13 and s12-14, the kernel
// alone without the timeline's clock reads, us, 2 / 4 / 6 / 8 / 12 / 16, means of two
// passes): Gemma-4 T=1 38.7 / 39.3 / 38.9 / 38.6 / 39.6 / 39.8, T=2 68.4 / 68.3 / 67.7
// / 67.9 / 68.8 / 69.8, T=8 205.9 / 205.9 / 205.5 / 205.6 / 206.4 / 207.4, T=64 502.4
// / 502.4 / 502.6 / 502.2 / 501.8 / 502.8; Qwen3 T=1 35.0 / 35.0 / 34.8 / 34.1 / 33.7
// / 33.8, T=2 55.6 / 55.6 / 55.0 / 54.8 / 55.5 / 57.0, T=8 164.0 / 164.0 / 163.7 /
// 162.8 / 163.0 / 163.6; Mixtral T=1 237.1 / 235.9 / 235.1 / 234.1 / 234.2 / 233.9;
// DeepSeek-V3 within 0.8.
// A one-unit claim leaves the producer one atomic round trip per unit, which a
// one-stage unit does not cover. Two claims in flight (the next but one issued before
// the current units' copies) did not help: run s12-5, us, one / two in flight:
// Gemma-4 T=1 41.9 / 43.7, T=64 538.6 / 540.1; Qwen3 T=1 37.9 / 40.2, T=64 421.9 /
// 420.3; Mixtral T=1 237.4 / 244.6. Nor did handing each unit to the consumer group
// with more free slots instead of alternating (run s12-4: Gemma-4 T=64 539.3 -> 635.9;
// the groups' waits for a unit number grew fourfold).
// (After the argument-struct change of s9-11 Qwen3 T=1 / 2 ran 34.0 / 55.0 with 4.)
#ifndef JAX_MOE_STREAM_TAIL_UNITS_PER_BLOCK
#define JAX_MOE_STREAM_TAIL_UNITS_PER_BLOCK 8
#endif
constexpr int kStreamTailUnitsPerBlock = JAX_MOE_STREAM_TAIL_UNITS_PER_BLOCK;
// Unit order per ring width (RUNS above). scripts/stream_probe.cu, run s10-2, the
// kernel alone, us, segment-major / run order (two passes agreed within 1.5 us),
// routings with some experts of more than 8 assignments (STREAM_PROBE_ZIPF=100):
// DeepSeek-V3 T=16 1970.7 / 1948.2, T=32 3220.7 / 3125.5, T=64 4881.7 / 4614.5;
// Mixtral T=32 1346.2 / 1142.6, T=64 2216.4 / 1624.1. But on the narrow ring's shapes
// the L2 re-reads saved nothing and the order's decode cost time: Gemma-4 T=64 505.4
// / 524.1, Qwen3 T=64 400.6 / 415.8, and with one segment per expert Gemma-4 T=1 39.5
// / 40.8, T=8 211.2 / 218.7. Long rows are DRAM-bound, short rows bound by the
// consumers' work per unit, which an L2 hit does not shorten. With the paired-unit
// interleave below (produce), the narrow ring in run order was still slower (s10-7,
// us, segment-major / run order): Gemma-4 T=64 514.4 / 555.6, skewed 497.3 / 542.4;
// Qwen3 T=64 409.1 / 431.9, skewed 396.3 / 422.3; T <= 32 uniform within 0.5.
// (Copies of a run's earlier units with L2::evict_normal instead of evict_first,
// s10-4: DeepSeek-V3 T=16 / 64 -0.3% / -0.2%, Mixtral -1.0% / +0.6%; not kept.)
// Without a run of two or more segments (no expert of more than one segment) the
// two orders coincide and the kernel decodes segment-major (s10-7: within 0.3%).
#ifdef JAX_MOE_STREAM_SEG_MAJOR  // probe A/Bs: segment-major everywhere
constexpr bool kStreamRunsWide = false;
#else
constexpr bool kStreamRunsWide = true;
#endif
constexpr bool kStreamRunsNarrow = false;
// Assignments per segment (the B columns of a unit's mma): 8, one m16n8 tile, on the
// narrow ring. On the wide ring (kStreamWideGroups = 2), 16 as two groups of 8 tokens
// that share each A fragment read from the ring, whenever some expert has more than
// 8 assignments (the prologue decides; all blocks alike), else 8. With segments of 8
// an expert of 9-16 assignments is two segments whose units each bring the expert's
// rows into shared memory (the second copy from L2, paired: produce): Mixtral (E = 8,
// k = 2) has about 8 assignments per expert at T = 32 and 16 at T = 64. Two groups'
// B registers held a stage ahead spilled (168 registers at most for 320 threads), so
// the two-group consumer loads B after each stage's mmas (kLateB). Probe run s14-3,
// the kernel alone, us, segments of 8 / always 16 (late B) / always 16 with B a stage
// ahead (spilling): Mixtral T=1 234.1 / 237.9 / 375.2, T=8 841.6 / 853.7 / 1325.5,
// T=16 908.2 / 924.7 / 1461.2, T=32 1016.3 / 968.6 / 1562.2, T=64 1426.1 / 1214.5 /
// 2146.3; DeepSeek-V3 T=1 234.1 / 235.0, T=16 2888.2 / 2901.7, T=64 6308.1 / 6391.8;
// skewed (STREAM_PROBE_ZIPF=100) DeepSeek-V3 T=64 4634.3 / 4561.7, Mixtral T=64
// 1495.0 / 1256.7. So 16 only where an expert needs it; 8 keeps the one-group
// consumer with its early B loads.
#ifndef JAX_MOE_STREAM_WIDE_SEG  // probe A/Bs: 8 (never 16) or 16
#define JAX_MOE_STREAM_WIDE_SEG 16
#endif
constexpr int kStreamWideGroups = JAX_MOE_STREAM_WIDE_SEG / 8;
static_assert(kStreamWideGroups == 1 || kStreamWideGroups == 2, "segments of 8 or 16");
constexpr int kStreamMaxAssign = 512;      // T * k
constexpr int kStreamMaxExperts = 1024;
constexpr int kStreamMaxSegments = kStreamMaxAssign + kStreamMaxAssign / 8;
// Finished units a consumer group may hand to the publisher warp before it waits.
constexpr int kStreamJobSlots = 4;
// The fused combine (GemvStreamArgs::cw): slots per token it takes.
constexpr int kStreamMaxCombineSlots = 32;

inline size_t StreamSmemBytes(int stages, int max_cols) {  // stages per group
  return static_cast<size_t>(kStreamGroups) * stages * kStreamRows * (max_cols * 2 + 64) +
         (kStreamMaxAssign + kStreamMaxSegments) * sizeof(int);
}

// The stream kernel can fuse the weighted combine for T tokens of kk slots, H hidden
// (H is a multiple of 8 wherever the stream kernel runs).
inline bool StreamCombineSupported(int64_t T, int64_t kk, int64_t H) {
  return T >= 0 && kk >= 1 && kk <= kStreamMaxCombineSlots && H % 8 == 0;
}

struct StreamPhase {
  const void* src = nullptr;     // B rows: x [T, H] (phase 1) or h [T*kk, I] (phase 2)
  const void* w = nullptr;       // w_gate_up [E, 2I, H] or w_down [E, H, I]
  const void* w_shared = nullptr;  // the shared experts' [S, 2I, H] or [S, H, I]
  void* out = nullptr;           // h or y
  int rows = 0;                  // I (phase 1) or H (phase 2)
  int K = 0;                     // H or I
  int stage_cols = 0;            // columns per stage (multiple of 32, <= the ring's slot)
  int stages = 0;                // stages per unit = ceil(K / stage_cols)
};

struct GemvStreamArgs {
  GemvAssign assign;             // expert of each assignment (kk = k + S slots per token;
                                 // E + S experts <= kStreamMaxExperts)
  int num_assign = 0;            // T * kk (<= kStreamMaxAssign); token of a is a / kk
  int activation = kSilu;
  StreamPhase p1, p2;
  // Fused combine (both set, or both null): out[t] = sum_j cw[t, j] * y[t, j], f32 in
  // slot order, rounded once to T, as combine_kernel computes it from y, summed by
  // the last block out once every block's y is written (combine_in_last_block).
  const float* cw = nullptr;     // [T, kk] f32
  void* cout = nullptr;          // [T, H]
};

// The work queue: the next unit to claim, phase-1 units finished per segment (2 per
// unit), blocks finished. The last block out resets them for the next call.
__device__ unsigned int g_stream_next = 0;
__device__ unsigned int g_stream_blocks_out = 0;
__device__ unsigned int g_stream_seg_done[kStreamMaxSegments];

// Optional timeline (scripts/stream_probe.cu builds with JAX_MOE_STREAM_TRACE):
// per block, %globaltimer in ns at fixed events (0 entry, 1 prologue done, 2 / 3
// consumer group 0 / 1 done, 4 block end, 5 producer done) and wait totals (6 the
// producer's waits for free slots, 7 group 0's waits for full slots, 8 its waits
// for phase-1 segments, 9 its units, 10 its blocking waits for a unit number).
#ifdef JAX_MOE_STREAM_TRACE
constexpr int kStreamTraceEvents = 12;
__device__ unsigned long long g_stream_trace[1024][kStreamTraceEvents];
__device__ __forceinline__ unsigned long long stream_clock() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#define JM_STREAM_TRACE(cond, ev) \
  do { if (cond) g_stream_trace[blockIdx.x][ev] = stream_clock(); } while (0)
#define JM_STREAM_TIMED(cond, ev, stmt)                                              \
  do {                                                                               \
    const unsigned long long t0_ = (cond) ? stream_clock() : 0ull;                   \
    stmt;                                                                            \
    if (cond) g_stream_trace[blockIdx.x][ev] += stream_clock() - t0_;                \
  } while (0)
#define JM_STREAM_COUNT(cond, ev) \
  do { if (cond) g_stream_trace[blockIdx.x][ev] += 1; } while (0)
#else
#define JM_STREAM_TRACE(cond, ev) do { } while (0)
#define JM_STREAM_TIMED(cond, ev, stmt) do { stmt; } while (0)
#define JM_STREAM_COUNT(cond, ev) do { } while (0)
#endif

// Weights of expert e (row-major [.., stride] per expert): routed experts [0, routed)
// in w, the shared experts after them in w_shared.
template <typename T>
__device__ __forceinline__ const T* expert_weights(const void* w, const void* w_shared,
                                                   int routed, int e, int64_t stride) {
  return e < routed ? static_cast<const T*>(w) + static_cast<int64_t>(e) * stride
                    : static_cast<const T*>(w_shared) + static_cast<int64_t>(e - routed) * stride;
}

// ---- sm_90 primitives: mbarrier and 1-D bulk copy ---------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
        "selp.u32 %0, 1, 0, p; }"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ bool mbar_test(uint32_t bar, uint32_t parity) {  // no wait
  uint32_t done = 0;
  asm volatile(
      "{ .reg .pred p; mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2; "
      "selp.u32 %0, 1, 0, p; }"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}
__device__ __forceinline__ void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes,
                                              uint32_t bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint "
      "[%0], [%1], %2, [%3], %4;" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(policy)
      : "memory");
}
__device__ __forceinline__ uint4 lds_v4(uint32_t addr) {
  uint4 r;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "r"(addr));
  return r;
}
__device__ __forceinline__ void group_sync(int group) {  // one group's 4 warps
  asm volatile("bar.sync %0, %1;" ::"r"(2 + group), "n"(kStreamGroupWarps * 32) : "memory");
}
#endif

// Segment records and the unit order are host-callable too: scripts/stream_probe.cu
// --self-test checks the order on the host (tests/test_benchmarks.py, no GPU).
// Segment record: expert (10 bits), first position in the sorted list (10 bits),
// assignments - 1 (4 bits), the segment's place in its run (3 bits) and the run's
// segments - 1 (3 bits). A run is up to kStreamRunSegments consecutive segments of
// one expert (an expert with more assignments than a segment takes has several).
constexpr int kStreamRunSegments = 8;
__host__ __device__ __forceinline__ int seg_pack(int e, int start, int n, int run_pos, int run_len) {
  return e | (start << 10) | ((n - 1) << 20) | (run_pos << 24) | ((run_len - 1) << 27);
}
__host__ __device__ __forceinline__ int seg_expert(int rec) { return rec & 1023; }
__host__ __device__ __forceinline__ int seg_start(int rec) { return (rec >> 10) & 1023; }
__host__ __device__ __forceinline__ int seg_tokens(int rec) { return ((rec >> 20) & 15) + 1; }
__host__ __device__ __forceinline__ int seg_run_pos(int rec) { return (rec >> 24) & 7; }
__host__ __device__ __forceinline__ int seg_run_len(int rec) { return ((rec >> 27) & 7) + 1; }
// Segment j (0-based) of an expert with c assignments (segments of S <= 16, runs of 8).
__host__ __device__ __forceinline__ int seg_record(int e, int first_pos, int c, int j, int S) {
  const int nseg = (c + S - 1) / S;
  const int run0 = j - j % kStreamRunSegments;
  return seg_pack(e, first_pos + S * j, min(S, c - S * j), j - run0,
                  min(kStreamRunSegments, nseg - run0));
}

// ---- the work queue: units claimed from a global counter -----------------
// Unit numbering: [0, n1) phase 1, then [n1, n1 + n2) phase 2 (v = u - n1), tiles
// per segment tiles1 / tiles2; segment s owns the units [s * tiles, (s + 1) * tiles).
// RUNS = false: segment-major, unit s * tiles + tile. RUNS = true ("run order"): a
// run of c segments (one expert's, c > 1 when it has more than 8 assignments) owns
// [f * tiles, (f + c) * tiles), f its first segment, numbered tile-major: unit
// f * tiles + tile * c + i is segment f + i, tile `tile`. The c units that read the
// same weight rows are then adjacent in the queue (mostly one claim): the first copy
// brings the rows from DRAM and the others find them in L2, where segment-major
// order reads the whole expert from DRAM again for each segment.
// Every phase-1 unit is claimed before any phase-2 unit and a block's consumers take
// its units in claim order, so a phase-2 unit only waits on phase-1 units that
// running blocks hold and will finish without waiting: no co-residency requirement.
struct StreamUnit {
  int u = -1;          // unit number, -1: no more units
  bool p1 = true;
  int seg = 0, tile = 0;
};

// runs: some run has more than one segment (block-uniform; with none, both orders
// are the same and the segment-major decode skips the record).
template <bool RUNS>
__host__ __device__ __forceinline__ StreamUnit decode_unit(int u, int n1, int tiles1, int tiles2,
                                                  const int* segs, bool runs) {
  StreamUnit d;
  d.u = u;
  if (u < 0) return d;
  d.p1 = u < n1;
  const int v = d.p1 ? u : u - n1;
  const int tiles = d.p1 ? tiles1 : tiles2;
  const int s0 = v / tiles;
  if (!RUNS || !runs) {
    d.seg = s0;
    d.tile = v - s0 * tiles;
    return d;
  }
  const int rec = segs[s0];
  const int first = s0 - seg_run_pos(rec), c = seg_run_len(rec);
  const int local = v - first * tiles;  // place in the run's units
  d.tile = local / c;
  d.seg = first + (local - d.tile * c);
  return d;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

// The ring: 2 * NS stage slots, NS per consumer group. Each group's stages are
// produced and consumed in order in its own slots, so a waiter is never more than one
// mbarrier phase ahead (a single ring shared by both groups let a group wait on a
// slot whose previous phase had not completed: the parity test passed at once).
struct StreamRing {
  uint32_t ring;                 // shared address of slot 0
  uint64_t* full;
  uint64_t* empty;
};

// B fragments of one stage (the segment's tokens, this warp's chunks): x rows in
// phase 1 (read-only: nc), h rows in phase 2 (written in this kernel: L2 only).
template <typename T, bool GATED, int MAXC>
__device__ __forceinline__ void load_b(const StreamPhase& ph, const T* brow, int st,
                                       uint4 (&bv)[StreamGeom<MAXC>::kChunksPerWarp]) {
  const int warp = threadIdx.x >> 5, c = threadIdx.x & 3;
  const int col0 = st * ph.stage_cols;
  const int cols = min(ph.stage_cols, ph.K - col0);
#pragma unroll
  for (int j = 0; j < StreamGeom<MAXC>::kChunksPerWarp; ++j) {
    const int col = (warp % kStreamGroupWarps + j * kStreamGroupWarps) * 32 + 8 * c;
    const bool ok = brow != nullptr && col < cols;
    const T* p = brow + col0 + col;
#ifdef JAX_MOE_STREAM_EXP_FAKEB  // timing experiment only (wrong results): no B loads
    bv[j] = !ok ? make_uint4(0u, 0u, 0u, 0u)
                : make_uint4(0x3f803f80u, static_cast<uint32_t>(col), static_cast<uint32_t>(col0), 0u);
    (void)p;
#else
    bv[j] = !ok ? make_uint4(0u, 0u, 0u, 0u) : (GATED ? ldg_nc_v4(p) : ldg_cg_v4(p));
#endif
  }
}


__device__ __forceinline__ unsigned int ld_acquire_u32(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Producer warp: claims units until the counter passes the last one, streams each
// unit's 16 weight rows stage by stage into its group's slots (group = claim parity
// within the block), writing the unit number beside stage slots (id barrier). Ends
// with one sentinel (-1) per group.
// produce_unit streams stages [st0, st1) of unit d.
template <typename T, bool GATED, int NS, int MAXC>
__device__ __forceinline__ void produce_unit(const StreamPhase ph, int routed, const StreamUnit& d,
                                             const int* segs, const StreamRing& r,
                                             uint32_t& itg, int grp, int* slot_unit,
                                             uint64_t* id_bar, uint64_t policy, int st0,
                                             int st1) {
  const int64_t mat_rows = GATED ? 2 * static_cast<int64_t>(ph.rows) : ph.rows;
  const T* we = expert_weights<T>(ph.w, ph.w_shared, routed, seg_expert(segs[d.seg]), mat_rows * ph.K);
  const int lane = threadIdx.x & 31;
  const int valid_rows = GATED ? kStreamRows : min(kStreamRows, ph.rows - d.tile * kStreamRows);
  for (int st = st0; st < st1; ++st) {
    const uint32_t j = itg++;
    const int col0 = st * ph.stage_cols;
    const int cols = min(ph.stage_cols, ph.K - col0);
    const uint32_t s = grp * NS + j % NS;
    JM_STREAM_TIMED(lane == 0, 6, mbar_wait(smem_addr(&r.empty[s]), ((j / NS) & 1u) ^ 1u));
    const uint32_t fb = smem_addr(&r.full[s]);
    const uint32_t row_bytes = static_cast<uint32_t>(cols) * sizeof(T);
    if (lane == 0) {
      slot_unit[s] = d.u;
      mbar_arrive(smem_addr(&id_bar[s]));
      mbar_arrive_expect_tx(fb, row_bytes * valid_rows);
    }
    __syncwarp();
    if (lane < valid_rows) {
      const int rr = lane;
      int64_t wrow;
      if (GATED) wrow = rr < 8 ? d.tile * 8 + rr : ph.rows + d.tile * 8 + (rr - 8);
      else wrow = static_cast<int64_t>(d.tile) * kStreamRows + rr;
      bulk_copy_g2s(r.ring + s * StreamGeom<MAXC>::kStageBytes + rr * StreamGeom<MAXC>::kRowStride,
                    we + wrow * ph.K + col0, row_bytes, fb, policy);
    }
  }
}

// Stages [st0, st1) of unit d (either phase; st1 < 0: to the unit's last stage)
// into group grp's slots.
template <typename T, int NS, int MAXC>
__device__ __forceinline__ void produce_stages(const GemvStreamArgs& a, const StreamUnit& d,
                                               const int* segs, const StreamRing& r,
                                               uint32_t& itg, int grp, int* slot_unit,
                                               uint64_t* id_bar, uint64_t policy, int st0,
                                               int st1) {
  if (d.p1)
    produce_unit<T, true, NS, MAXC>(a.p1, a.assign.num_experts, d, segs, r, itg, grp,
                                    slot_unit, id_bar, policy, st0,
                                    st1 < 0 ? a.p1.stages : st1);
  else
    produce_unit<T, false, NS, MAXC>(a.p2, a.assign.num_experts, d, segs, r, itg, grp,
                                     slot_unit, id_bar, policy, st0,
                                     st1 < 0 ? a.p2.stages : st1);
}

template <typename T, int NS, int MAXC, bool RUNS>
__device__ void produce(const GemvStreamArgs& a, const int* segs, int tiles1, int tiles2,
                            int n1, int ntot, const StreamRing& r, int* slot_unit,
                            uint64_t* id_bar, uint64_t policy, bool runs) {
  const int lane = threadIdx.x & 31;
  uint32_t it0 = 0u, it1 = 0u;  // stages produced per group (scalars: no local array)
  // Units are claimed kStreamClaim at a time, the next claim issued before the
  // current units' copies: under the full DRAM stream an atomic's round trip took
  // ~1.6 us (s4-3 timeline: the producer waited little for slots, yet issued one
  // unit per ~2 us at Gemma-4 T=1).
  const int tail = kStreamTailUnitsPerBlock * static_cast<int>(gridDim.x);
  // (Issuing the first claim before the prologue, so that its round trip overlaps the
  // sort, was tried in s10: probe s10-4 Gemma-4 T=8 211.6 -> 209.2 us, T=64 521 -> 515,
  // but through JAX, s10-12, gemv + combine, us, two runs each, without / with:
  // Qwen3 T=1 38.1, 38.5 / 40.1, 40.3 and T=2 61.8, 62.4 / 63.1, 62.9. Not kept.)
  const unsigned int claim2 =
      MAXC >= kStreamColsWide ? kStreamClaim
      : (ntot - n1) >= kStreamManyUnits2 * static_cast<int>(gridDim.x) ? kStreamClaimNarrow2Many
                                                                       : kStreamClaimNarrow2;
  unsigned int claim = 0, size = kStreamClaim;  // lane 0: the claim in flight, its units
  if (lane == 0) claim = atomicAdd(&g_stream_next, size);
  for (int k = 0;;) {
    const int u0 = static_cast<int>(__shfl_sync(0xffffffffu, claim, 0));
    const int n0 = static_cast<int>(__shfl_sync(0xffffffffu, size, 0));
    if (u0 >= ntot) break;
    if (lane == 0) {
      size = ntot - (u0 + n0) > tail ? (u0 + n0 >= n1 ? claim2 : kStreamClaim) : 1u;
      claim = atomicAdd(&g_stream_next, size);
    }
    const int uend = min(u0 + n0, ntot);
    StreamUnit d0, d1;
    bool decoded = false;
    if (RUNS && runs && uend - u0 == 2) {
      // Two units of a run on the same weight rows (a claim is two adjacent units):
      // their stages interleaved, one per group in turn, so the second copy of each
      // stage's rows follows the first at once and is served by L2. Probe s10-5, us,
      // one unit after the other / interleaved (two passes agreed within 2 us):
      // Mixtral T=32 1141.8 / 1033.5, T=64 1643.1 / 1483.9; skewed routings
      // (STREAM_PROBE_ZIPF=100) DeepSeek-V3 T=64 4675.3 / 4643.9, Mixtral T=16 973.5 /
      // 937.6; one segment per expert unchanged. Interleaving every two-unit claim
      // (any rows) was slower: Qwen3 T=8 165.6 -> 176.4, Mixtral T=8 852.4 -> 893.6.
      d0 = decode_unit<RUNS>(u0, n1, tiles1, tiles2, segs, runs);
      d1 = decode_unit<RUNS>(u0 + 1, n1, tiles1, tiles2, segs, runs);
      decoded = true;
      if (d0.p1 == d1.p1 && d0.tile == d1.tile &&
          seg_expert(segs[d0.seg]) == seg_expert(segs[d1.seg])) {
        const int g0 = k & 1;  // d0's group; d1 takes the other
        uint32_t i0 = g0 ? it1 : it0, i1 = g0 ? it0 : it1;
        const int stages = d0.p1 ? a.p1.stages : a.p2.stages;
        for (int st = 0; st < stages; ++st) {
          produce_stages<T, NS, MAXC>(a, d0, segs, r, i0, g0, slot_unit, id_bar, policy, st,
                                      st + 1);
          produce_stages<T, NS, MAXC>(a, d1, segs, r, i1, 1 - g0, slot_unit, id_bar, policy,
                                      st, st + 1);
        }
        if (g0) { it1 = i0; it0 = i1; } else { it0 = i0; it1 = i1; }
        k += 2;
        continue;
      }
    }
    for (int u = u0; u < uend; ++u, ++k) {  // one unit after the other
      const int grp = k & 1;
      uint32_t itc = grp ? it1 : it0;
      const StreamUnit d = !decoded ? decode_unit<RUNS>(u, n1, tiles1, tiles2, segs, runs)
                           : u == u0 ? d0 : d1;  // decoded above (not a pair)
      produce_stages<T, NS, MAXC>(a, d, segs, r, itc, grp, slot_unit, id_bar, policy, 0, -1);
      if (grp) it1 = itc; else it0 = itc;
    }
  }
  for (int grp = 0; grp < kStreamGroups; ++grp) {  // end of work: a sentinel per group
    const uint32_t j = grp ? it1 : it0;
    const uint32_t s = grp * NS + j % NS;
    mbar_wait(smem_addr(&r.empty[s]), ((j / NS) & 1u) ^ 1u);
    if (lane == 0) {
      slot_unit[s] = -1;
      mbar_arrive(smem_addr(&id_bar[s]));
      mbar_arrive(smem_addr(&r.full[s]));
    }
    __syncwarp();
  }
}

// B row of this lane for unit d (token g + 8 * nb of its segment), or null.
template <typename T>
__device__ __forceinline__ const T* b_row(const GemvStreamArgs& a, const StreamUnit& d,
                                              const int* segs, const int* sorted, int nb) {
  const int g = ((threadIdx.x & 31) >> 2) + 8 * nb;
  const int seg = segs[d.seg];
  if (g >= seg_tokens(seg)) return nullptr;
  const int asg = sorted[seg_start(seg) + g];
  return d.p1 ? static_cast<const T*>(a.p1.src) + static_cast<int64_t>(asg / a.assign.slots()) * a.p1.K
              : static_cast<const T*>(a.p2.src) + static_cast<int64_t>(asg) * a.p2.K;
}

template <typename T, int MAXC>
__device__ __forceinline__ void load_b_unit(const GemvStreamArgs& a, const StreamUnit& d,
                                           const T* brow, int st,
                                           uint4 (&bv)[StreamGeom<MAXC>::kChunksPerWarp]) {
  if (d.p1) load_b<T, true, MAXC>(a.p1, brow, st, bv);
  else load_b<T, false, MAXC>(a.p2, brow, st, bv);
}

// Phase-2 units read h rows of their segment: wait until all of the segment's
// phase-1 units have been written (each thread acquires for its own loads).
__device__ __forceinline__ bool seg_ready(int seg, unsigned int target) {
  return ld_acquire_u32(&g_stream_seg_done[seg]) >= target;
}

// A slot's unit number, read by lane 0 only and broadcast: lane 0 is the thread that
// later arrives on the slot's empty barrier, so its read is ordered before the
// producer's next write of the slot by its own arrive. (With every lane reading, the
// order ran through __syncwarp and lane 0's arrive, which is correct but which
// racecheck reported as a WAR hazard on slot_unit, s5.)
__device__ __forceinline__ int read_slot_unit(const int* slot_unit, uint32_t s) {
  int u = 0;
  if ((threadIdx.x & 31) == 0) u = slot_unit[s];
  return __shfl_sync(0xffffffffu, u, 0);
}

// Finished units travel from the consumer groups to the publisher warp through
// kStreamJobSlots slots per group: the unit number, a full barrier that the group's
// 128 threads arrive on after their stores (release at block scope) and an empty
// barrier the publisher arrives on when it is done with the slot.
struct StreamJobs {
  int* unit;
  uint64_t* full;
  uint64_t* empty;
};

// The group hands unit u (or the sentinel -1) to the publisher. Only thread 0 of the
// group waits for a free slot: the slot's next full phase needs its arrival, so no
// phase of the full barrier can complete before the publisher has taken the last.
__device__ __forceinline__ void post_job(const StreamJobs& q, int group, int gtid, uint32_t& jn,
                                         int u) {
  const uint32_t s = group * kStreamJobSlots + jn % kStreamJobSlots;
  if (gtid == 0) {
    mbar_wait(smem_addr(&q.empty[s]), ((jn / kStreamJobSlots) & 1u) ^ 1u);
    q.unit[s] = u;
  }
  mbar_arrive(smem_addr(&q.full[s]));
  ++jn;
}

// Phase-1 units finished per segment that let its phase-2 units start: one per unit
// from the publisher, or one per writing warp (2 per group of 8 tokens) with the
// consumers' own fence.
#ifdef JAX_MOE_STREAM_P1_INLINE  // probe A/B: consumers publish h themselves
constexpr bool kStreamP1Inline = true;
#else
constexpr bool kStreamP1Inline = false;
#endif

// One consumer group's loop: take units from the group's slots in order until the
// sentinel. The B loads of the next unit are issued during the current unit's last
// stage when its number is known (id barrier) and, for a phase-2 unit, its segment's
// h is ready; otherwise after the current unit's epilogue. NB: groups of 8 tokens per
// segment; each A fragment read from the ring feeds NB mmas (a group of a segment
// with fewer tokens is skipped: a warp-uniform branch).
template <typename T, int NS, int MAXC, bool RUNS, int NB>
__device__ void consume(const GemvStreamArgs& a, const int* segs, const int* sorted,
                            int tiles1, int tiles2, int n1, const StreamRing& r,
                            const int* slot_unit, uint64_t* id_bar,
                            float (*red)[kStreamGroupWarps][kStreamRows][8 * NB], bool runs,
                            const StreamJobs& q, uint32_t& jn) {
  constexpr int CPW = StreamGeom<MAXC>::kChunksPerWarp;
  // Two sets of B registers for 16 tokens spilled (kStreamWideGroups): with NB > 1
  // the B loads follow the mmas.
#ifdef JAX_MOE_STREAM_LATE_B  // probe A/Bs: 0 or 1 for NB > 1
  constexpr bool kLateB = NB > 1 && JAX_MOE_STREAM_LATE_B;
#else
  constexpr bool kLateB = NB > 1;
#endif
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int group = warp / kStreamGroupWarps, gw = warp % kStreamGroupWarps;
  const int gtid = tid % (kStreamGroupWarps * 32);
  const int g = lane >> 2, c = lane & 3;
  const unsigned int seg_target =
      (kStreamP1Inline ? 2u * NB : 1u) * static_cast<unsigned int>(tiles1);
  int parity = 0, ready = -1;  // ready: a segment whose h this thread saw complete
  uint32_t jj = 0;             // stages this group has taken
  auto peek = [&](uint32_t j) {  // blocking: only while this group holds no unit
    const uint32_t s = group * NS + j % NS;
    mbar_wait(smem_addr(&id_bar[s]), (j / NS) & 1u);
    return read_slot_unit(slot_unit, s);
  };
  uint4 bnext[NB][CPW];
  const T* brow[NB];
  auto load_b_all = [&](const StreamUnit& u, int st) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) load_b_unit<T, MAXC>(a, u, brow[nb], st, bnext[nb]);
  };
  auto set_rows = [&](const StreamUnit& u) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) brow[nb] = b_row<T>(a, u, segs, sorted, nb);
  };
  StreamUnit d = decode_unit<RUNS>(peek(jj), n1, tiles1, tiles2, segs, runs);
  if (d.u < 0) return;
  set_rows(d);
  if (!d.p1) { while (!seg_ready(d.seg, seg_target)) {} ready = d.seg; }
  load_b_all(d, 0);
  for (;;) {
    const int stages = d.p1 ? a.p1.stages : a.p2.stages;
    const int stage_cols = d.p1 ? a.p1.stage_cols : a.p2.stage_cols;
    const int K = d.p1 ? a.p1.K : a.p2.K;
    const int seg = segs[d.seg];
    const int start = seg_start(seg);
    const int ntok = seg_tokens(seg);
    const bool hi_ok = d.p1 || d.tile * kStreamRows + 8 + g < a.p2.rows;
    float acc[NB][4][4] = {};
    StreamUnit dn;
    bool have_next = false, next_loaded = false;
    // A single-stage unit of the same phase and segment as this one reads the same
    // B fragments: keep them in registers (at T = 1 most of a group's phase-2 units
    // are of one segment; their h loads from L2 were the consumers' longest waits).
    auto same_b = [&](const StreamUnit& o) {
      return stages == 1 && o.u >= 0 && o.p1 == d.p1 && o.seg == d.seg;
    };
    for (int st = 0; st < stages; ++st) {
      const uint32_t j = jj++;
      // B of the next stage, or of the next unit when its number is known.
      auto prefetch = [&]() {
        if (st + 1 < stages) {
          load_b_all(d, st + 1);
        } else if (__shfl_sync(0xffffffffu,  // lane 0's view: a warp-uniform branch
                               mbar_test(smem_addr(&id_bar[group * NS + jj % NS]), (jj / NS) & 1u),
                               0)) {
          // Non-blocking here: waiting for the producer while holding a phase-1 unit
          // could deadlock (the producer may wait on the other group, which may wait
          // on this unit's segment).
          dn = decode_unit<RUNS>(read_slot_unit(slot_unit, group * NS + jj % NS), n1, tiles1,
                                 tiles2, segs, runs);
          have_next = true;
          if (same_b(dn)) {
            next_loaded = true;  // bnext still holds this stage's B: the same rows
          } else if (dn.u >= 0 && (dn.p1 || dn.seg == ready || seg_ready(dn.seg, seg_target))) {
            if (!dn.p1) ready = dn.seg;
            set_rows(dn);
            load_b_all(dn, 0);
            next_loaded = true;
          }
        }
      };
      // kLateB: the mmas read bnext itself and the prefetch follows them (one set of
      // B registers); else the prefetch is in flight during the mmas (two sets).
      uint4 bv[NB][CPW];
      if (!kLateB) {
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
          for (int q = 0; q < CPW; ++q) bv[nb][q] = bnext[nb][q];
        prefetch();
      }
      const int cols = min(stage_cols, K - st * stage_cols);
      const int nch = (cols + 31) >> 5;
      const uint32_t s = group * NS + j % NS;
      JM_STREAM_TIMED(tid == 0, 7, mbar_wait(smem_addr(&r.full[s]), (j / NS) & 1u));
      const uint32_t stage = r.ring + s * StreamGeom<MAXC>::kStageBytes;
#pragma unroll
      for (int q = 0; q < CPW; ++q) {
        const int ch = gw + q * kStreamGroupWarps;
#ifdef JAX_MOE_STREAM_EXP_NOMMA  // timing experiment only (wrong results)
        if (ch < 0) {
#else
        if (ch < nch) {
#endif
          const int col = ch * 32 + 8 * c;
          const bool in = col < cols;
          const uint32_t p = stage + g * StreamGeom<MAXC>::kRowStride + col * 2;
          const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
          const uint4 lo = in ? lds_v4(p) : zero;
          const uint4 hi = (in && hi_ok) ? lds_v4(p + 8 * StreamGeom<MAXC>::kRowStride) : zero;
#pragma unroll
          for (int nb = 0; nb < NB; ++nb) {
            if (nb > 0 && ntok <= 8 * nb) break;  // no token in this group
            float (*ac)[4] = acc[nb];
            const uint4 b = kLateB ? bnext[nb][q] : bv[nb][q];
            mma_m16n8k16<T>(ac[2 * (q & 1)], lo.x, hi.x, lo.y, hi.y, b.x, b.y);
            mma_m16n8k16<T>(ac[2 * (q & 1) + 1], lo.z, hi.z, lo.w, hi.w, b.z, b.w);
          }
        }
      }
      // One arrive per warp, after __syncwarp (which orders the warp's reads of the
      // slot before lane 0's arrive). racecheck cannot see that order and reports the
      // producer's next bulk copy into the slot as a WAR hazard on larger problems
      // (scripts/stream_probe.cu, Gemma-4 T=1); an arrive from every thread silences
      // it but cost 4-5% at Qwen3 T=8 (bench_gemv A/B in one run, s5).
      __syncwarp();
      if (lane == 0) mbar_arrive(smem_addr(&r.empty[s]));
      if (kLateB) prefetch();
    }
    float (*rd)[kStreamRows][8 * NB] = red[2 * group + parity];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        acc[nb][0][i] = (acc[nb][0][i] + acc[nb][1][i]) + (acc[nb][2][i] + acc[nb][3][i]);
      rd[gw][g][8 * nb + 2 * c] = acc[nb][0][0];
      rd[gw][g][8 * nb + 2 * c + 1] = acc[nb][0][1];
      rd[gw][g + 8][8 * nb + 2 * c] = acc[nb][0][2];
      rd[gw][g + 8][8 * nb + 2 * c + 1] = acc[nb][0][3];
    }
    group_sync(group);
    if (d.p1) {
      T* out = static_cast<T*>(a.p1.out);
      if (gtid < 64 * NB) {  // 2 warps per group of 8 tokens: 8 rows x 8 tokens
        const int row = gtid & 7, tok = gtid >> 3;
        if (tok < ntok) {
          float gate = 0.f, up = 0.f;
#pragma unroll
          for (int wv = 0; wv < kStreamGroupWarps; ++wv) {
            gate += rd[wv][row][tok];
            up += rd[wv][row + 8][tok];
          }
          const int64_t asg = sorted[start + tok];
          out[asg * a.p1.rows + d.tile * 8 + row] = from_float<T>(activate(a.activation, gate) * up);
          if (kStreamP1Inline) __threadfence();
        }
        if (kStreamP1Inline) {
          __syncwarp();
          if (lane == 0) atomicAdd(&g_stream_seg_done[d.seg], 1u);  // 2 per group of 8
        }
      }
      // The publisher makes h visible grid-wide (its release) and counts the unit:
      // a gpu-scope fence here had stalled the writing warps at every phase-1 unit.
      if (!kStreamP1Inline) post_job(q, group, gtid, jn, d.u);
    } else {
      T* out = static_cast<T*>(a.p2.out);
      const int row = gtid & 15;
      const int rr = d.tile * kStreamRows + row;
      for (int tok = gtid >> 4; tok < ntok && rr < a.p2.rows; tok += 8) {
        float v = 0.f;
#pragma unroll
        for (int wv = 0; wv < kStreamGroupWarps; ++wv) v += rd[wv][row][tok];
        const int64_t asg = sorted[start + tok];
        out[asg * a.p2.rows + rr] = from_float<T>(v);
      }
    }
    parity ^= 1;
    JM_STREAM_COUNT(tid == 0, 9);
    if (!have_next) JM_STREAM_TIMED(tid == 0, 10, dn = decode_unit<RUNS>(peek(jj), n1, tiles1, tiles2, segs, runs));
    if (dn.u < 0) return;  // the sentinel
    const bool reuse = same_b(dn);
    d = dn;
    if (!next_loaded && !reuse) {
      set_rows(d);
      if (!d.p1 && d.seg != ready) {
        JM_STREAM_TIMED(tid == 0, 8, while (!seg_ready(d.seg, seg_target)) {});
        ready = d.seg;
      }
      load_b_all(d, 0);
    }
  }
}
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void red_release_add_u32(unsigned int* p, unsigned int v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// The fused combine, run by the last block out once every block's y is written:
// out[t] = sum_j cw[t, j] * y[t, j], 8 columns per thread (16-byte loads of y from
// L2, up to 8 slots in flight), f32 in slot order with each product rounded before
// the add, rounded once to T: combine_kernel's arithmetic on the same y (whose rows of
// ids outside [0, E) are zeros), so the same bits. One block: meant for the few
// tokens of decode (heuristics.gemv_combine_in_kernel), where combine's own kernel
// costs its launch and a tail after ours.
template <typename T>
__device__ void combine_in_last_block(const GemvStreamArgs& a) {
  const int H = a.p2.rows, kk = a.assign.slots();
  const int ntok = a.num_assign / kk, V = H / 8;
  const T* y = static_cast<const T*>(a.p2.out);
  for (int item = threadIdx.x; item < ntok * V; item += blockDim.x) {
    const int t = item / V, v = item - t * V;
    const T* yt = y + static_cast<int64_t>(t) * kk * H + 8 * v;
    const float* wt = a.cw + static_cast<int64_t>(t) * kk;
    float acc[8];
    sum_slots8_l2<T>(yt, wt, kk, H, acc);
    store_unit<T, 8>(static_cast<T*>(a.cout) + static_cast<int64_t>(t) * H + 8 * v, acc);
  }
}

// The publisher warp: takes the groups' finished phase-1 units in order, up to
// kStreamJobSlots of one group at a time (lane b serves the batch's job b), until
// both groups' sentinels. Each unit: one release-add to its segment's count (the
// consumers' h stores were acquired through the job barrier and the release carries
// them). Batching keeps the warp ahead of the groups (s11-1).
template <bool RUNS>
__device__ void publish(const int* segs, int tiles1, int tiles2, int n1, const StreamJobs& q,
                        bool runs) {
  const int lane = threadIdx.x & 31;
  uint32_t j0 = 0u, j1 = 0u;
  bool live0 = true, live1 = true;
  int grp = 0, idle = 0;
  while (live0 || live1) {
    grp = (live0 && live1) ? grp ^ 1 : (live0 ? 0 : 1);
    const uint32_t jn = grp ? j1 : j0;
    // Jobs ready in this group's slots, in order (lane 0's view, broadcast).
    int nj = 0;
    if (lane == 0)
      while (nj < kStreamJobSlots &&
             mbar_test(smem_addr(&q.full[grp * kStreamJobSlots + (jn + nj) % kStreamJobSlots]),
                       ((jn + nj) / kStreamJobSlots) & 1u))
        ++nj;
    nj = __shfl_sync(0xffffffffu, nj, 0);
    if (nj == 0) {  // nothing in this group: sleep once both came up empty
      if (++idle >= 2 || !(live0 && live1)) { __nanosleep(32); idle = 0; }
      continue;
    }
    idle = 0;
    const bool mine = lane < nj;
    const uint32_t s = grp * kStreamJobSlots + (jn + lane) % kStreamJobSlots;
    int u = -1;
    if (mine) {
      mbar_wait(smem_addr(&q.full[s]), ((jn + lane) / kStreamJobSlots) & 1u);  // acquire
      u = q.unit[s];  // read by the lane that arrives on empty below
      if (u >= 0) {
        const StreamUnit d = decode_unit<RUNS>(u, n1, tiles1, tiles2, segs, runs);
        red_release_add_u32(&g_stream_seg_done[d.seg], 1u);
      }
    }
    if (__any_sync(0xffffffffu, mine && u < 0)) {  // the sentinel ends the group's jobs
      if (grp) live1 = false; else live0 = false;
    }
    if (mine) mbar_arrive(smem_addr(&q.empty[s]));
    if (grp) j1 = jn + nj; else j0 = jn + nj;
  }
}
#endif

// NB: at most NB groups of 8 tokens per segment. With NB = 2 the prologue cuts
// segments of 16 when some expert has more than 8 assignments, else of 8 (every
// block sees the same counts, so all choose alike).
template <typename T, int NS, int MAXC, bool RUNS, int NB>
__global__ void __launch_bounds__(kStreamThreads)
gemv_stream_kernel(GemvStreamArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kRingBytes = kStreamGroups * NS * StreamGeom<MAXC>::kStageBytes;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) uint64_t full_bar[kStreamGroups * NS], empty_bar[kStreamGroups * NS];
  __shared__ __align__(8) uint64_t id_bar[kStreamGroups * NS];
  __shared__ int slot_unit[kStreamGroups * NS];
  __shared__ float red[2 * kStreamGroups * kStreamGroupWarps * kStreamRows * 8 * NB];
  // s_multi: an expert of more assignments than a segment takes; s_seg_shift:
  // log2 of the segment size (3: 8, 4: 16)
  __shared__ int s_segments, s_valid, s_multi, s_seg_shift;
  __shared__ int job_unit[kStreamGroups * kStreamJobSlots];
  __shared__ __align__(8) uint64_t job_full[kStreamGroups * kStreamJobSlots];
  __shared__ __align__(8) uint64_t job_empty[kStreamGroups * kStreamJobSlots];
  unsigned char* ring = smem;
  static_assert(kRingBytes >= (3 * kStreamMaxExperts + kStreamMaxAssign / 32 +
                               kStreamMaxExperts * (kStreamMaxAssign / 32)) * 4,
                "the prologue's scratch (cnt, cursor, seg_first, bit masks) lives on the ring");
  int* sorted = reinterpret_cast<int*>(smem + kRingBytes);  // assignments by expert
  int* segs = sorted + kStreamMaxAssign;
  const bool fused = a.cw != nullptr;
  // Prologue scratch, aliased on the ring (no copy is issued before it is done).
  int* cnt = reinterpret_cast<int*>(ring);
  int* cursor = cnt + kStreamMaxExperts;
  int* seg_first = cursor + kStreamMaxExperts;
  // Each expert's assignments as a bit mask over the assignment numbers (nw words of
  // 32), set with atomicOr (the same bits whatever the order), and each 32-assignment
  // chunk's ids outside [0, E) as one word: the sorted lists are read off them in
  // ascending order with no serial pass. (A warp stepping through the assignments
  // 32 at a time, match_any and a cursor per step, took the prologue to 7.3 us at
  // T*k = 512 in scripts/stream_probe.cu's timeline, run s12-3.)
  uint32_t* bad_bits = reinterpret_cast<uint32_t*>(seg_first + kStreamMaxExperts);
  uint32_t* exp_bits = bad_bits + kStreamMaxAssign / 32;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n = a.num_assign;
  const int E = a.assign.total_experts();  // routed + shared
  JM_STREAM_TRACE(tid == 0, 0);
#ifdef JAX_MOE_STREAM_TRACE
  if (tid < kStreamTraceEvents - 6) g_stream_trace[blockIdx.x][6 + tid] = 0ull;
#endif
  // ---- prologue: segments of <= S assignments per selected expert, ascending e ----
  // sorted[0, s_valid): valid assignments by expert, ascending within an expert;
  // sorted[s_valid, n): the assignments whose id is outside [0, E).
  if (tid < kStreamGroups * NS) {
    mbar_init(smem_addr(&full_bar[tid]), 1);
    mbar_init(smem_addr(&empty_bar[tid]), kStreamGroupWarps);
    mbar_init(smem_addr(&id_bar[tid]), 1);
  }
  if (tid < kStreamGroups * kStreamJobSlots) {
    mbar_init(smem_addr(&job_full[tid]), kStreamGroupWarps * 32);
    mbar_init(smem_addr(&job_empty[tid]), 1);
  }
  const bool small = n <= 32;
  const int nw = (n + 31) >> 5;  // words per expert mask
  if (!small) {
    for (int e = tid; e < E; e += blockDim.x) cnt[e] = 0;
    for (int w = tid; w < E * nw; w += blockDim.x) exp_bits[w] = 0u;
  }
  // Launched with programmatic stream serialization: ids and x come from the
  // previous kernel; nothing above reads global memory.
  pdl_wait_prerequisites();
  if (small) {
    // One warp, one assignment per lane, no shared-memory passes: each distinct
    // expert's first lane ("leader") counts the leaders with a smaller id.
    if (warp == 0) {
      const int e = lane < n ? a.assign.expert(lane) : -1;
      const bool ok = lane < n && e >= 0 && e < E;
      const uint32_t peers = __match_any_sync(0xffffffffu, ok ? e : -1);
      const uint32_t lt = (1u << lane) - 1u;
      const int c = __popc(peers);
      const bool leader = ok && (peers & lt) == 0;
      const int key = leader ? e : 0x7fffffff;
      const int lc = leader ? c : 0;
      const int sh = NB > 1 && __any_sync(0xffffffffu, leader && c > 8) ? 4 : 3;
      const int S = 1 << sh;
      int pos = 0, spos = 0;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int kj = __shfl_sync(0xffffffffu, key, j);
        const int cj = __shfl_sync(0xffffffffu, lc, j);
        if (kj < e) { pos += cj; spos += (cj + S - 1) >> sh; }
      }
      const uint32_t valid = __ballot_sync(0xffffffffu, ok);
      const uint32_t bad = __ballot_sync(0xffffffffu, !ok && lane < n);
      if (ok) sorted[pos + __popc(peers & lt)] = lane;
      if (!ok && lane < n) sorted[__popc(valid) + __popc(bad & lt)] = lane;
      if (leader)
        for (int j = 0; S * j < c; ++j) segs[spos + j] = seg_record(e, pos, c, j, S);
      int ns = leader ? (c + S - 1) >> sh : 0;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ns += __shfl_xor_sync(0xffffffffu, ns, o);
      const bool multi = __any_sync(0xffffffffu, leader && c > S);
      if (lane == 0) {
        s_segments = ns; s_valid = __popc(valid); s_multi = multi; s_seg_shift = sh;
      }
    }
  } else {
    __syncthreads();
    for (int base = warp * 32; base < n; base += blockDim.x) {  // warp-uniform
      const int i = base + lane;
      const int e = i < n ? a.assign.expert(i) : -1;
      const bool ok = e >= 0 && e < E;
      if (ok) {
        atomicAdd(&cnt[e], 1);
        atomicOr(&exp_bits[e * nw + (i >> 5)], 1u << lane);
      }
      const uint32_t bad = __ballot_sync(0xffffffffu, !ok && i < n);
      if (lane == 0) bad_bits[base >> 5] = bad;
    }
    __syncthreads();
    if (warp == 0) {  // exclusive scans of counts and of segments per expert
      bool big = false;  // an expert of more than 8 assignments
      if (NB > 1)
        for (int base = 0; base < E; base += 32)
          big |= __any_sync(0xffffffffu, base + lane < E && cnt[base + lane] > 8);
      const int sh = big ? 4 : 3;
      const int S = 1 << sh;
      int pos = 0, seg = 0;
      bool multi = false;
      for (int base = 0; base < E; base += 32) {
        const int e = base + lane;
        const int c = e < E ? cnt[e] : 0;
        const int s = (c + S - 1) >> sh;
        multi |= __any_sync(0xffffffffu, c > S);
        int ic = c, is = s;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int vc = __shfl_up_sync(0xffffffffu, ic, o);
          const int vs = __shfl_up_sync(0xffffffffu, is, o);
          if (lane >= o) { ic += vc; is += vs; }
        }
        if (e < E) { cursor[e] = pos + ic - c; seg_first[e] = seg + is - s; }
        pos += __shfl_sync(0xffffffffu, ic, 31);
        seg += __shfl_sync(0xffffffffu, is, 31);
      }
      if (lane == 0) { s_segments = seg; s_valid = pos; s_multi = multi; s_seg_shift = sh; }
    }
    __syncthreads();
    const int S = 1 << s_seg_shift;
    // Every block must cut the same segments: each expert's assignments ascending,
    // read off its mask; the invalid ones after all valid ones, ascending.
    for (int e = tid; e < E; e += blockDim.x) {
      const int c = cnt[e];
      if (c == 0) continue;
      for (int j = 0; S * j < c; ++j) segs[seg_first[e] + j] = seg_record(e, cursor[e], c, j, S);
      int pos = cursor[e];
      for (int w = 0; w < nw; ++w)
        for (uint32_t m = exp_bits[e * nw + w]; m != 0u; m &= m - 1u)
          sorted[pos++] = 32 * w + (__ffs(m) - 1);
    }
    if (tid < nw) {
      int pos = s_valid;
      for (int w = 0; w < tid; ++w) pos += __popc(bad_bits[w]);
      for (uint32_t m = bad_bits[tid]; m != 0u; m &= m - 1u)
        sorted[pos++] = 32 * tid + (__ffs(m) - 1);
    }
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();  // prologue scratch dead from here: the ring may be written
  JM_STREAM_TRACE(tid == 0, 1);
  // Let the next kernel launch (a PDL-launched combine waits for our completion
  // before reading y; its blocks fit beside ours).
  pdl_launch_dependents();

  const int G = gridDim.x, b = blockIdx.x;
  const int tiles1 = a.p1.rows / 8;
  const int tiles2 = (a.p2.rows + kStreamRows - 1) / kStreamRows;
  const int n1 = s_segments * tiles1;
  const int n2 = s_segments * tiles2;
  const bool runs = RUNS && s_multi != 0;
  const StreamRing r{smem_addr(ring), full_bar, empty_bar};
  const StreamJobs q{job_unit, job_full, job_empty};

  if (warp == kStreamProducerWarp) {
    produce<T, NS, MAXC, RUNS>(a, segs, tiles1, tiles2, n1, n1 + n2, r, slot_unit, id_bar,
                               l2_evict_first_policy(), runs);
    JM_STREAM_TRACE(lane == 0, 5);
  } else if (warp == kStreamPublisherWarp) {
    publish<RUNS>(segs, tiles1, tiles2, n1, q, runs);
  } else {
    // ids outside [0, E): zero y rows; each block zeroes its share of the columns
    // (the fused combine sums them as combine does: cw * 0).
    T* y = static_cast<T*>(a.p2.out);
    const int H = a.p2.rows;
    const int r0 = static_cast<int>(static_cast<int64_t>(b) * H / G);
    const int r1 = static_cast<int>(static_cast<int64_t>(b + 1) * H / G);
    for (int j = s_valid; j < n; ++j) {
      const int i = sorted[j];
      for (int rr = r0 + tid; rr < r1; rr += kStreamConsumerWarps * 32)
        y[static_cast<int64_t>(i) * H + rr] = from_float<T>(0.f);
    }
    uint32_t jn = 0u;  // units handed to the publisher
    // Segments of 16 take the two-group consumer; of 8, the one-group consumer, whose
    // B loads run a stage ahead (kLateB).
    if (NB > 1 && s_seg_shift == 4)
      consume<T, NS, MAXC, RUNS, NB>(
          a, segs, sorted, tiles1, tiles2, n1, r, slot_unit, id_bar,
          reinterpret_cast<float (*)[kStreamGroupWarps][kStreamRows][8 * NB]>(red), runs, q, jn);
    else
      consume<T, NS, MAXC, RUNS, 1>(
          a, segs, sorted, tiles1, tiles2, n1, r, slot_unit, id_bar,
          reinterpret_cast<float (*)[kStreamGroupWarps][kStreamRows][8]>(red), runs, q, jn);
    post_job(q, warp / kStreamGroupWarps, tid % (kStreamGroupWarps * 32), jn, -1);
    JM_STREAM_TRACE(tid == 0 || tid == 128, tid == 0 ? 2 : 3);
  }
  __syncthreads();
  JM_STREAM_TRACE(tid == 0, 4);
  bool last = false;
  if (tid == 0) {
    __threadfence();  // this block's y (and h) before its arrival
    last = atomicAdd(&g_stream_blocks_out, 1u) == static_cast<unsigned int>(G) - 1u;
    if (last) __threadfence();  // and every other block's y before the fused combine
  }
  // The flag travels in the barrier itself, no shared variable: compute-sanitizer
  // racecheck reported the shared flag written by thread 0 before a __syncthreads
  // and read after it as a RAW hazard (s4, s5); this form gives it nothing to report.
  if (__syncthreads_or(last)) {  // the last block out resets the counters for the next call
    for (int i = tid; i < s_segments; i += blockDim.x) g_stream_seg_done[i] = 0u;
    if (tid == 0) {
      g_stream_next = 0u;
      g_stream_blocks_out = 0u;
    }
    __threadfence();
    if (fused) combine_in_last_block<T>(a);
  }
#endif
}

// Columns per stage: the fewest stages of at most max_cols, split evenly,
// rounded up to whole 32-column chunks.
inline void StreamStageGeometry(int K, int* stage_cols, int* stages, int max_cols) {
  const int nst = (K + max_cols - 1) / max_cols;
  int cols = (K + nst - 1) / nst;
  cols = (cols + 31) / 32 * 32;
  *stage_cols = cols;
  *stages = (K + cols - 1) / cols;
}

// Static shared memory of the kernel (barriers, the groups' partial sums: 8 KB per
// group of 8 tokens) is under this.
constexpr int kStreamStaticSmemBound = 20 * 1024;

// True when the stream kernel can run this problem: bf16/f16, H and I multiples of 8,
// I > 0, T*k and E within the shared-memory lists, an sm_90+ device whose blocks may
// take the ring (max_smem_per_block: the opt-in limit; parts with ~100 KB per SM
// fall back to the register kernel).
inline bool StreamSupported(int64_t num_assign, int64_t E, int64_t H, int64_t I, bool mma_ok,
                            bool sm90, int max_smem_per_block, bool wide) {
  return sm90 && mma_ok && I > 0 && H > 0 && num_assign <= kStreamMaxAssign &&
         E <= kStreamMaxExperts &&
         static_cast<size_t>(max_smem_per_block) >=
             StreamSmemBytes(kStreamStages, wide ? kStreamColsWide : kStreamCols) +
                 kStreamStaticSmemBound;
}

// NB: groups of 8 tokens per segment; the wide ring (MAXC >= kStreamColsWide) takes
// kStreamWideGroups, the narrow one 1 (see JAX_MOE_STREAM_WIDE_SEG).
template <typename T, int NS, int MAXC, bool RUNS,
          int NB = (MAXC >= kStreamColsWide ? kStreamWideGroups : 1)>
cudaError_t LaunchGemvStreamNS(const GemvStreamArgs& a, int sms, cudaStream_t stream) {
  const size_t smem = StreamSmemBytes(NS, MAXC);
  auto kern = gemv_stream_kernel<T, NS, MAXC, RUNS, NB>;
  // The opt-in shared-memory size is a per-device property of the function: set it
  // once per device (this instantiation's flags), not on every call.
  static bool smem_set[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= 64 || !smem_set[dev]) {
    err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    if (dev >= 0 && dev < 64) smem_set[dev] = true;
  }
  // sm_90 only (StreamSupported), so with PDL unless JAX_MOE_DISABLE_PDL: the kernel
  // waits before it reads ids and x.
  return LaunchMaybePdl(kern, dim3(static_cast<unsigned>(sms)), dim3(kStreamThreads), smem,
                        stream, DeviceSupportsPdl(), a);
}

// wide: slots of kStreamColsWide columns (variant 6), else kStreamCols.
// assign: the assignments (routed ids, then assign.num_shared shared experts per token).
// cw, cout: the fused combine (StreamCombineSupported), or both null.
template <typename T>
cudaError_t LaunchGemvStream(const void* x, const GemvAssign& assign, const void* w_gate_up,
                             const void* w_down, const void* shared_gate_up,
                             const void* shared_down, void* h, void* y, int64_t T_, int64_t H,
                             int64_t I, int activation, bool wide, const float* cw, void* cout,
                             cudaStream_t stream) {
  if ((cw == nullptr) != (cout == nullptr) ||
      (cw != nullptr && !StreamCombineSupported(T_, assign.slots(), H)))
    return cudaErrorInvalidValue;
  const int sms = CurrentDeviceAttr<cudaDevAttrMultiProcessorCount>(0);
  if (sms <= 0) return cudaErrorInvalidDevice;
  GemvStreamArgs a;
  a.assign = assign;
  a.num_assign = static_cast<int>(T_ * assign.slots());
  a.activation = activation;
  a.cw = cw;
  a.cout = cout;
  a.p1.src = x;  a.p1.w = w_gate_up;  a.p1.w_shared = shared_gate_up;  a.p1.out = h;
  a.p1.rows = static_cast<int>(I);  a.p1.K = static_cast<int>(H);
  a.p2.src = h;  a.p2.w = w_down;  a.p2.w_shared = shared_down;  a.p2.out = y;
  a.p2.rows = static_cast<int>(H);  a.p2.K = static_cast<int>(I);
  const int cols = wide ? kStreamColsWide : kStreamCols;
  StreamStageGeometry(a.p1.K, &a.p1.stage_cols, &a.p1.stages, cols);
  StreamStageGeometry(a.p2.K, &a.p2.stage_cols, &a.p2.stages, cols);
  return wide ? LaunchGemvStreamNS<T, kStreamStages, kStreamColsWide, kStreamRunsWide>(a, sms, stream)
              : LaunchGemvStreamNS<T, kStreamStages, kStreamCols, kStreamRunsNarrow>(a, sms, stream);
}

}  // namespace cuda
}  // namespace jax_moe
