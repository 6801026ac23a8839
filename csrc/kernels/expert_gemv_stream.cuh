// expert_gemv "stream" kernel (sm_90, kernel_variant 5): one persistent launch for
// both phases at decode sizes. Same outputs as gemv_mma_kernel (expert_gemv.cuh):
//   phase 1: h[a, r] = act(w_gate[e, r] . x[a / k]) * (w_up[e, r] . x[a / k]);
//   phase 2: y[a, r] = w_down[e, r] . h[a].
//
// Why: at T = 1 the register-streaming kernel ran both phases near half of peak DRAM
// bandwidth (ncu, RESULTS.md s2-B7): its bytes in flight are bounded by registers
// and its row-tile grid does not divide evenly over the SMs. Design:
//   * one block per SM, one launch; every block computes the same work list (the
//     selected experts, split into segments of at most 8 assignments) and takes an
//     equal contiguous share of the phase-1 units (segment, 8 gate + the matching 8
//     up rows), then an equal share of the phase-2 units (segment, 16 w_down rows);
//   * one producer warp streams each unit's 16 weight rows (one 1-D bulk copy per
//     lane, cp.async.bulk completing on an mbarrier, L2 evict-first) into a ring of
//     shared-memory slots: the bytes in flight per SM are the ring, not registers.
//     It runs straight from its phase-1 units into its phase-2 units: w_down does
//     not depend on phase 1, so the ring fills while phase 1 finishes;
//   * two groups of 4 consumer warps take alternate units (each group has its own
//     NS slots), so one group's end-of-unit work overlaps the other's stages. The 4
//     warps of a group split each stage's 32-column chunks (the chunk layout of
//     mma.cuh), run mma.sync with the segment's <= 8 tokens as B, keep f32 partial
//     sums in registers across a unit's stages and add the 4 warps' partials in a
//     fixed order: deterministic, no atomics on results;
//   * between the phases only the consumers wait, on a grid-wide arrival counter
//     (every block's h rows written). Waiting on other blocks needs all blocks
//     resident at once: the grid is the SM count and one block fits per SM, so
//     every block has an SM once earlier kernels drain. The counters are static
//     device words reset by the last block out, so one stream-kernel call may run
//     at a time per device (XLA issues our custom calls on one compute stream).
// Measured steps (bench_gemv, Gemma-4 T=1, gemv + combine, RESULTS.md session 3):
// two launches 49.9 us (v4: 53.3); one launch 50.2; 8 consumer warps with four
// accumulator chains 47.6; two consumer groups 44.4. With the weight copies switched
// off the same kernel still took 31 us: the rest is per-unit consumer latency (B
// loads, group barrier, ordered sum), launch and prologue, not DRAM.
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

namespace jax_moe {
namespace cuda {

constexpr int kStreamConsumerWarps = 8;
constexpr int kStreamGroupWarps = 4;       // consumer warps per group (2 groups)
constexpr int kStreamGroups = kStreamConsumerWarps / kStreamGroupWarps;
constexpr int kStreamThreads = 32 * (kStreamConsumerWarps + 1);  // + 1 producer warp
constexpr int kStreamStages = 3;       // ring slots per consumer group (6 in all)
constexpr int kStreamRows = 16;            // weight rows per unit (A rows of the mma)
constexpr int kStreamMaxCols = 1024;       // columns per stage at most
// Stage geometry for at most MAXC columns: row stride in bytes (= 64 mod 128: no bank
// conflicts between the two rows a quarter-warp reads), stage bytes, chunks per warp.
template <int MAXC> struct StreamGeom {
  static constexpr int kRowStride = MAXC * 2 + 64;
  static constexpr int kStageBytes = kStreamRows * kRowStride;
  static constexpr int kChunksPerWarp = MAXC / 32 / kStreamGroupWarps;
};
constexpr int kStreamMaxAssign = 512;      // T * k
constexpr int kStreamMaxExperts = 1024;
constexpr int kStreamMaxSegments = kStreamMaxAssign + kStreamMaxAssign / 8;

inline size_t StreamSmemBytes(int stages, int max_cols) {  // stages per group
  return static_cast<size_t>(kStreamGroups) * stages * kStreamRows * (max_cols * 2 + 64) +
         (kStreamMaxAssign + kStreamMaxSegments) * sizeof(int);
}

struct StreamPhase {
  const void* src = nullptr;     // B rows: x [T, H] (phase 1) or h [T*k, I] (phase 2)
  const void* w = nullptr;       // w_gate_up [E, 2I, H] or w_down [E, H, I]
  void* out = nullptr;           // h or y
  int rows = 0;                  // I (phase 1) or H (phase 2)
  int K = 0;                     // H or I
  int stage_cols = 0;            // columns per stage (multiple of 32, <= kStreamMaxCols)
  int stages = 0;                // stages per unit = ceil(K / stage_cols)
};

struct GemvStreamArgs {
  const int32_t* ids = nullptr;  // [T*k]
  int num_assign = 0;            // T * k (<= kStreamMaxAssign)
  int top_k = 1;
  int E = 0;                     // <= kStreamMaxExperts
  int activation = kSilu;
  StreamPhase p1, p2;
};

// Grid-wide arrival counters between the phases (see the header).
__device__ unsigned int g_stream_phase1_done = 0;
__device__ unsigned int g_stream_blocks_out = 0;

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
__device__ __forceinline__ void consumer_sync() {  // all consumer warps
  asm volatile("bar.sync 1, %0;" ::"n"(kStreamConsumerWarps * 32) : "memory");
}
__device__ __forceinline__ void group_sync(int group) {  // one group's 4 warps
  asm volatile("bar.sync %0, %1;" ::"r"(2 + group), "n"(kStreamGroupWarps * 32) : "memory");
}
#endif

// Segment record: expert (10 bits), first position in the sorted list (10 bits),
// assignments - 1 (3 bits).
__device__ __forceinline__ int seg_pack(int e, int start, int n) {
  return e | (start << 10) | ((n - 1) << 20);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint4 ldg_cg_v4(const void* p) {  // L2 only: h is written in-kernel
  uint4 r;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p) : "memory");
  return r;
}

// The ring: 2 * NS stage slots, NS per consumer group. Each group's stages are
// produced and consumed in order in its own slots, so a waiter is never more than one
// mbarrier phase ahead (a single ring shared by both groups let a group wait on a
// slot whose previous phase had not completed: the parity test passed at once).
struct StreamRing {
  uint32_t ring;                 // shared address of slot 0
  uint64_t* full;
  uint64_t* empty;
};

// Producer warp: the 16 weight rows of units [u0, u1) of one phase, stage by stage,
// one bulk copy per lane.
template <typename T, bool GATED, int NS, int MAXC>
__device__ void produce(const StreamPhase& ph, const int* segs, int tiles, int64_t u0,
                        int64_t u1, const StreamRing& r, uint32_t (&itg)[kStreamGroups],
                        uint64_t policy) {
  const int64_t mat_rows = GATED ? 2 * static_cast<int64_t>(ph.rows) : ph.rows;
  const T* w = static_cast<const T*>(ph.w);
  const int lane = threadIdx.x & 31;
  for (int64_t u = u0; u < u1; ++u) {
    const int seg = segs[u / tiles];
    const int tile = static_cast<int>(u % tiles);
    const T* we = w + static_cast<int64_t>(seg & 1023) * mat_rows * ph.K;
    const int valid_rows = GATED ? kStreamRows : min(kStreamRows, ph.rows - tile * kStreamRows);
    const int grp = static_cast<int>((u - u0) & 1);
    for (int st = 0; st < ph.stages; ++st) {
      const uint32_t j = itg[grp]++;
      const int col0 = st * ph.stage_cols;
      const int cols = min(ph.stage_cols, ph.K - col0);
      const uint32_t s = grp * NS + j % NS;
      mbar_wait(smem_addr(&r.empty[s]), ((j / NS) & 1u) ^ 1u);
      const uint32_t fb = smem_addr(&r.full[s]);
      const uint32_t row_bytes = static_cast<uint32_t>(cols) * sizeof(T);
      if (lane == 0) mbar_arrive_expect_tx(fb, row_bytes * valid_rows);
      __syncwarp();
      if (lane < valid_rows) {  // one row per lane
        const int rr = lane;
        int64_t wrow;
        if (GATED) wrow = rr < 8 ? tile * 8 + rr : ph.rows + tile * 8 + (rr - 8);
        else wrow = static_cast<int64_t>(tile) * kStreamRows + rr;
        bulk_copy_g2s(r.ring + s * StreamGeom<MAXC>::kStageBytes + rr * StreamGeom<MAXC>::kRowStride,
                      we + wrow * ph.K + col0, row_bytes, fb, policy);
      }
    }
  }
}

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
    bv[j] = !ok ? make_uint4(0u, 0u, 0u, 0u) : (GATED ? ldg_nc_v4(p) : ldg_cg_v4(p));
  }
}

// This lane's B row (token g of the unit's segment), or null.
template <typename T, bool GATED>
__device__ __forceinline__ const T* b_row(const StreamPhase& ph, const int* segs,
                                          const int* sorted, int tiles, int64_t u, int top_k) {
  const int g = (threadIdx.x & 31) >> 2;
  const int seg = segs[u / tiles];
  if (g >= (seg >> 20) + 1) return nullptr;
  const int asg = sorted[((seg >> 10) & 1023) + g];
  return static_cast<const T*>(ph.src) + static_cast<int64_t>(GATED ? asg / top_k : asg) * ph.K;
}

// Consumers: units [u0, u1) of one phase. Two groups of 4 warps take alternate
// units, so one group's end-of-unit work (partials to shared memory, group barrier,
// the ordered sum, the stores, the next unit's B loads) overlaps the other group's
// stages. Within a group the 4 warps split each stage's chunks. The B loads of a
// group's next stage are issued before its current stage is waited for.
// `itg` counts the stages this group has consumed (its slots: group * NS + itg % NS).
template <typename T, bool GATED, int NS, int MAXC>
__device__ void consume(const StreamPhase& ph, const int* segs, const int* sorted, int tiles,
                        int64_t u0, int64_t u1, const StreamRing& r, uint32_t& itg,
                        float (*red)[kStreamGroupWarps][kStreamRows][8], int top_k,
                        int activation) {
  constexpr int CPW = StreamGeom<MAXC>::kChunksPerWarp;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int group = warp / kStreamGroupWarps, gw = warp % kStreamGroupWarps;
  const int gtid = tid % (kStreamGroupWarps * 32);
  const int g = lane >> 2, c = lane & 3;
  T* out = static_cast<T*>(ph.out);
  int parity = 0;
  const int64_t first = u0 + group;
  if (first >= u1) return;
  uint4 bnext[CPW];
  const T* brow = b_row<T, GATED>(ph, segs, sorted, tiles, first, top_k);
  load_b<T, GATED, MAXC>(ph, brow, 0, bnext);
  for (int64_t u = first; u < u1; u += kStreamGroups) {
    const int seg = segs[u / tiles];
    const int tile = static_cast<int>(u % tiles);
    const int start = (seg >> 10) & 1023;
    const int ntok = (seg >> 20) + 1;
    const bool hi_ok = GATED || tile * kStreamRows + 8 + g < ph.rows;
    // Four independent accumulator sets (chunk parity x k16 step) keep the mma chain
    // short; they are added in a fixed order at the unit's end.
    float acc[4][4] = {};
    for (int st = 0; st < ph.stages; ++st) {
      const uint32_t jj = itg++;
      uint4 bv[CPW];
#pragma unroll
      for (int j = 0; j < CPW; ++j) bv[j] = bnext[j];
      if (st + 1 < ph.stages) {
        load_b<T, GATED, MAXC>(ph, brow, st + 1, bnext);
      } else if (u + kStreamGroups < u1) {
        brow = b_row<T, GATED>(ph, segs, sorted, tiles, u + kStreamGroups, top_k);
        load_b<T, GATED, MAXC>(ph, brow, 0, bnext);
      }
      const int cols = min(ph.stage_cols, ph.K - st * ph.stage_cols);
      const int nch = (cols + 31) >> 5;
      const uint32_t s = group * NS + jj % NS;
      mbar_wait(smem_addr(&r.full[s]), (jj / NS) & 1u);
      const uint32_t stage = r.ring + s * StreamGeom<MAXC>::kStageBytes;
#pragma unroll
      for (int j = 0; j < CPW; ++j) {
        const int ch = gw + j * kStreamGroupWarps;
        if (ch < nch) {
          const int col = ch * 32 + 8 * c;
          const bool in = col < cols;
          const uint32_t p = stage + g * StreamGeom<MAXC>::kRowStride + col * 2;
          const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
          const uint4 lo = in ? lds_v4(p) : zero;
          const uint4 hi = (in && hi_ok) ? lds_v4(p + 8 * StreamGeom<MAXC>::kRowStride) : zero;
          mma_m16n8k16<T>(acc[2 * (j & 1)], lo.x, hi.x, lo.y, hi.y, bv[j].x, bv[j].y);
          mma_m16n8k16<T>(acc[2 * (j & 1) + 1], lo.z, hi.z, lo.w, hi.w, bv[j].z, bv[j].w);
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(smem_addr(&r.empty[s]));
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[0][i] = (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i]);
    // The group's partials: C fragment (row g, tokens 2c, 2c+1), (row g + 8, ...).
    float (*rd)[kStreamRows][8] = red[2 * group + parity];
    rd[gw][g][2 * c] = acc[0][0];
    rd[gw][g][2 * c + 1] = acc[0][1];
    rd[gw][g + 8][2 * c] = acc[0][2];
    rd[gw][g + 8][2 * c + 1] = acc[0][3];
    group_sync(group);
    if (GATED) {
      if (gtid < 64) {
        const int row = gtid & 7, tok = gtid >> 3;
        if (tok < ntok) {
          float gate = 0.f, up = 0.f;
#pragma unroll
          for (int wv = 0; wv < kStreamGroupWarps; ++wv) {
            gate += rd[wv][row][tok];
            up += rd[wv][row + 8][tok];
          }
          const int64_t asg = sorted[start + tok];
          out[asg * ph.rows + tile * 8 + row] = from_float<T>(activate(activation, gate) * up);
        }
      }
    } else {
      const int row = gtid & 15, tok = gtid >> 4;
      const int rr = tile * kStreamRows + row;
      if (tok < ntok && rr < ph.rows) {
        float v = 0.f;
#pragma unroll
        for (int wv = 0; wv < kStreamGroupWarps; ++wv) v += rd[wv][row][tok];
        const int64_t asg = sorted[start + tok];
        out[asg * ph.rows + rr] = from_float<T>(v);
      }
    }
    parity ^= 1;  // the group's next unit writes its other buffer: one barrier per unit
  }
}
#endif

template <typename T, int NS = kStreamStages, int MAXC = kStreamMaxCols>
__global__ void __launch_bounds__(kStreamThreads)
gemv_stream_kernel(GemvStreamArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kRingBytes = kStreamGroups * NS * StreamGeom<MAXC>::kStageBytes;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) uint64_t full_bar[kStreamGroups * NS], empty_bar[kStreamGroups * NS];
  __shared__ float red[2 * kStreamGroups][kStreamGroupWarps][kStreamRows][8];
  __shared__ int s_segments;
  unsigned char* ring = smem;
  int* sorted = reinterpret_cast<int*>(smem + kRingBytes);  // assignments by expert
  int* segs = sorted + kStreamMaxAssign;
  // Prologue scratch, aliased on the ring (no copy is issued before it is done).
  int* cnt = reinterpret_cast<int*>(ring);
  int* cursor = cnt + kStreamMaxExperts;
  int* seg_first = cursor + kStreamMaxExperts;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n = a.num_assign;
  // ---- prologue: segments of <= 8 assignments per selected expert, ascending e ----
  for (int e = tid; e < a.E; e += blockDim.x) cnt[e] = 0;
  if (tid < kStreamGroups * NS) {
    mbar_init(smem_addr(&full_bar[tid]), 1);
    mbar_init(smem_addr(&empty_bar[tid]), kStreamGroupWarps);
  }
  __syncthreads();
  for (int i = tid; i < n; i += blockDim.x) {
    const int e = a.ids[i];
    if (e >= 0 && e < a.E) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  if (warp == 0) {  // exclusive scans of counts and of segments per expert
    int pos = 0, seg = 0;
    for (int base = 0; base < a.E; base += 32) {
      const int e = base + lane;
      const int c = e < a.E ? cnt[e] : 0;
      const int s = (c + 7) >> 3;
      int ic = c, is = s;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int vc = __shfl_up_sync(0xffffffffu, ic, o);
        const int vs = __shfl_up_sync(0xffffffffu, is, o);
        if (lane >= o) { ic += vc; is += vs; }
      }
      if (e < a.E) { cursor[e] = pos + ic - c; seg_first[e] = seg + is - s; }
      pos += __shfl_sync(0xffffffffu, ic, 31);
      seg += __shfl_sync(0xffffffffu, is, 31);
    }
    if (lane == 0) s_segments = seg;
  }
  __syncthreads();
  for (int e = tid; e < a.E; e += blockDim.x) {
    const int c = cnt[e];
    for (int j = 0; 8 * j < c; ++j)
      segs[seg_first[e] + j] = seg_pack(e, cursor[e] + 8 * j, min(8, c - 8 * j));
  }
  __syncthreads();  // cursor is read above before it moves below
  if (warp == 0) {
    // Stable order (ascending assignment within an expert): every block must cut the
    // same segments, so no atomics here. One warp, 32 assignments per step.
    for (int base = 0; base < n; base += 32) {
      const int i = base + lane;
      const int e = i < n ? a.ids[i] : -1;
      const bool ok = e >= 0 && e < a.E;
      const uint32_t peers = __match_any_sync(0xffffffffu, ok ? e : -1);
      const int before = __popc(peers & ((1u << lane) - 1u));
      if (ok) sorted[cursor[e] + before] = i;
      __syncwarp();
      if (ok && before == 0) cursor[e] += __popc(peers);
      __syncwarp();
    }
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();  // prologue scratch dead from here: the ring may be written

  const int G = gridDim.x, b = blockIdx.x;
  if (warp < kStreamConsumerWarps) {
    // ids outside [0, E): zero y rows; each block zeroes its share of the columns.
    T* y = static_cast<T*>(a.p2.out);
    const int H = a.p2.rows;
    const int r0 = static_cast<int>(static_cast<int64_t>(b) * H / G);
    const int r1 = static_cast<int>(static_cast<int64_t>(b + 1) * H / G);
    for (int i = 0; i < n; ++i) {
      const int e = a.ids[i];
      if (e >= 0 && e < a.E) continue;
      for (int r = r0 + tid; r < r1; r += kStreamConsumerWarps * 32)
        y[static_cast<int64_t>(i) * H + r] = from_float<T>(0.f);
    }
  }

  const int tiles1 = a.p1.rows / 8;
  const int tiles2 = (a.p2.rows + kStreamRows - 1) / kStreamRows;
  const int64_t n1 = static_cast<int64_t>(s_segments) * tiles1;
  const int64_t n2 = static_cast<int64_t>(s_segments) * tiles2;
  const StreamRing r{smem_addr(ring), full_bar, empty_bar};

  if (warp == kStreamConsumerWarps) {  // producer warp: phase 1 then phase 2
    const uint64_t policy = l2_evict_first_policy();
    uint32_t itg[kStreamGroups] = {0u, 0u};
    produce<T, true, NS, MAXC>(a.p1, segs, tiles1, n1 * b / G, n1 * (b + 1) / G, r, itg, policy);
    produce<T, false, NS, MAXC>(a.p2, segs, tiles2, n2 * b / G, n2 * (b + 1) / G, r, itg, policy);
    return;
  }
  uint32_t it = 0;  // stages this thread's group has consumed

  consume<T, true, NS, MAXC>(a.p1, segs, sorted, tiles1, n1 * b / G, n1 * (b + 1) / G, r, it,
                             red, a.top_k, a.activation);
  // Grid-wide: every block's h rows are written before any block reads h.
  consumer_sync();
  if (tid == 0) {
    __threadfence();
    atomicAdd(&g_stream_phase1_done, 1u);
    unsigned int done = 0;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];"
                   : "=r"(done) : "l"(&g_stream_phase1_done) : "memory");
    } while (done < static_cast<unsigned int>(G));
  }
  consumer_sync();
  consume<T, false, NS, MAXC>(a.p2, segs, sorted, tiles2, n2 * b / G, n2 * (b + 1) / G, r, it,
                              red, a.top_k, a.activation);
  if (tid == 0) {  // the last block out resets the counters for the next call
    if (atomicAdd(&g_stream_blocks_out, 1u) == static_cast<unsigned int>(G) - 1u) {
      g_stream_phase1_done = 0u;
      g_stream_blocks_out = 0u;
      __threadfence();
    }
  }
#endif
}

// Columns per stage: the fewest stages of at most kStreamMaxCols, split evenly,
// rounded up to whole 32-column chunks.
inline void StreamStageGeometry(int K, int* stage_cols, int* stages) {
  const int nst = (K + kStreamMaxCols - 1) / kStreamMaxCols;
  int cols = (K + nst - 1) / nst;
  cols = (cols + 31) / 32 * 32;
  *stage_cols = cols;
  *stages = (K + cols - 1) / cols;
}

// Static shared memory of the kernel (barriers, the groups' partial sums) is under this.
constexpr int kStreamStaticSmemBound = 12 * 1024;

// True when the stream kernel can run this problem: bf16/f16, H and I multiples of 8,
// I > 0, T*k and E within the shared-memory lists, an sm_90+ device whose blocks may
// take the ring (max_smem_per_block: the opt-in limit; parts with ~100 KB per SM
// fall back to the register kernel).
inline bool StreamSupported(int64_t num_assign, int64_t E, int64_t H, int64_t I, bool mma_ok,
                            bool sm90, int max_smem_per_block) {
  return sm90 && mma_ok && I > 0 && H > 0 && num_assign <= kStreamMaxAssign &&
         E <= kStreamMaxExperts &&
         static_cast<size_t>(max_smem_per_block) >=
             StreamSmemBytes(kStreamStages, kStreamMaxCols) + kStreamStaticSmemBound;
}

template <typename T, int NS, int MAXC>
cudaError_t LaunchGemvStreamNS(const GemvStreamArgs& a, int sms, cudaStream_t stream) {
  const size_t smem = StreamSmemBytes(NS, MAXC);
  auto kern = gemv_stream_kernel<T, NS, MAXC>;
  cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(sms));
  cfg.blockDim = dim3(kStreamThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  return cudaLaunchKernelEx(&cfg, kern, a);
}

template <typename T>
cudaError_t LaunchGemvStream(const void* x, const int32_t* ids, const void* w_gate_up,
                             const void* w_down, void* h, void* y, int64_t T_, int64_t k,
                             int64_t H, int64_t I, int64_t E, int activation,
                             cudaStream_t stream) {
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  GemvStreamArgs a;
  a.ids = ids;
  a.num_assign = static_cast<int>(T_ * k);
  a.top_k = static_cast<int>(k);
  a.E = static_cast<int>(E);
  a.activation = activation;
  a.p1.src = x;  a.p1.w = w_gate_up;  a.p1.out = h;
  a.p1.rows = static_cast<int>(I);  a.p1.K = static_cast<int>(H);
  StreamStageGeometry(a.p1.K, &a.p1.stage_cols, &a.p1.stages);
  a.p2.src = h;  a.p2.w = w_down;  a.p2.out = y;
  a.p2.rows = static_cast<int>(H);  a.p2.K = static_cast<int>(I);
  StreamStageGeometry(a.p2.K, &a.p2.stage_cols, &a.p2.stages);
  return LaunchGemvStreamNS<T, kStreamStages, kStreamMaxCols>(a, sms, stream);
}

}  // namespace cuda
}  // namespace jax_moe
