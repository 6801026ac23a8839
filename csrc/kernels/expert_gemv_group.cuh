// expert_gemv "group" kernel (sm_90, kernel_variant 8): a group of G consecutive
// blocks per assignment, one block per SM, every block the same bytes. Same outputs
// as the other variants:
//   y[a] = w_down[e] . h[a],  h[a, r] = act(w_gate[e, r] . x[a / k]) * (w_up[e, r] . x[a / k]).
//
// Why: at T = 1 on the narrow shapes (Gemma-4, Qwen3) the stream kernel stays at
// 1.4-1.5x the floor where a plain read of the same bytes takes 1.08-1.11x
// (RESULTS.md s12, s21). What limits a block's reads: one SM streamed only 28-33 GB/s
// with 16 warps of 16-byte loads in flight (Gemma-4 T=1 on 64 SMs: 28.4 in run s22-1,
// a thread-block cluster version of this kernel; 33 in s22-2, this kernel with G = 8),
// and 132 x 28.5 GB/s is only 1.18x the HBM rate. So the floor needs every SM reading
// for the whole call:
// the work cut into equal parts, one per SM, each read in whole rows (the split
// kernels' 64-byte pieces of w_down rows and their 176 blocks on 132 SMs took
// 1.4-1.6x, s21-1). Design:
//   * G = SMs / (T k) blocks per assignment (at most kGroupMaxBlocks; at T = 1 with
//     k = 8 on 132 SMs, G = 16: 128 blocks); block rank r of assignment a = index / G;
//   * phase 1: rank r computes h for intermediate rows [r I/G, (r+1) I/G) (a warp per
//     gate/up row pair, lanes along H, x from shared memory) and stores them to the
//     h scratch, rounded to x's dtype as the other variants store h; then it counts
//     itself on the assignment's arrival word (release);
//   * each warp issues its first w_down loads (they do not depend on h), then the
//     block waits until all G ranks have arrived (acquire) and reads h[a] (L2) into
//     shared memory;
//   * phase 2: rank r computes y[a, rows] for w_down rows [r H', (r+1) H') (H' = H/G
//     rounded up to 8): a warp takes 4 whole rows at a time (4 I contiguous
//     elements), lanes along them; the next step's loads are issued before the
//     current step's arithmetic;
//   * with the combine (expert_gemv_combine), the last of a token's k blocks of one
//     rank to finish sums that rank's rows of out as combine's kernel does.
// Measured (s22-2, Gemma-4 / Qwen3 T=1, experts + combine): 40.6 / 35.0 us against
// the stream kernel's 44.1 / 37.2 (heuristics.GEMV_GROUP_MAX_TOKENS has the table).
// Forward progress: a block waits only for blocks of its own assignment, which have
// neighbouring indices; blocks are dispatched in index order, and a dependent
// PDL-launched kernel takes no SM before every block here has started
// (pdl_launch_dependents), so the blocks waited for are running or will get an SM
// as other groups finish. The arrival and departure words are static device words
// that the last block of each group resets, so one call may run at a time per
// device (XLA issues our custom calls on one compute stream).
// Assignments are not grouped by expert: an expert chosen by several tokens is read
// once per token (heuristics.expert_gemv_variant picks this kernel at few tokens).
// Deterministic: fixed summation orders; no atomics on values. An id outside [0, E)
// gives zeros.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/activation.cuh"
#include "common/cuda_utils.cuh"
#include "common/params.h"
#include "kernels/combine.cuh"  // sum_slots8_l2, store_unit: the fused combine sums as combine does

namespace jax_moe {
namespace cuda {

constexpr int kGroupThreads = 512;
constexpr int kGroupWarps = kGroupThreads / 32;
// The register arrays' sizes: 12 vectors per lane fit 128 registers (512 threads, one
// block per SM) with no spills; 16 spilled (ptxas, both phases).
constexpr int kGroupMaxVpl = 12;     // 16-byte vectors per lane of a gate/up row: H <= 3072
constexpr int kGroupDownRows = 4;    // w_down rows per warp step
constexpr int kGroupMaxDvpl = 12;    // 16-byte vectors per lane of a 4-row step: I <= 768
constexpr int kGroupMaxI = 32 * kGroupMaxDvpl * 8 / kGroupDownRows;
constexpr int kGroupMaxAssign = 512;   // T * k: the arrival words
constexpr int kGroupMaxBlocks = 16;    // G

struct GemvGroupArgs {
  const void* x = nullptr;         // [T, H]
  const int32_t* ids = nullptr;    // [T, k]
  const void* w_gate_up = nullptr; // [E, 2I, H]
  const void* w_down = nullptr;    // [E, H, I]
  void* h = nullptr;               // [T k, I] scratch
  void* y = nullptr;               // [T, k, H]
  const float* combine_w = nullptr;  // [T, k] f32, or null: no fused combine
  void* combine_out = nullptr;       // [T, H]
  int T = 0, k = 0, E = 0, H = 0, I = 0;
  int G = 1;                       // blocks per assignment
  int activation = kSilu;
};

// Whether the group kernel takes this call (else the caller falls back): sm_90,
// 16-bit dtypes, no shared experts, the sizes its register arrays and arrival words
// cover.
inline bool GroupSupported(int64_t T, int64_t k, int64_t S, int64_t H, int64_t I,
                           bool is16bit, bool sm90) {
  return sm90 && is16bit && S == 0 && T >= 1 && k >= 1 && T * k <= kGroupMaxAssign && H >= 8 &&
         H % 8 == 0 && H <= 256 * kGroupMaxVpl && I >= 8 && I % 8 == 0 && I <= kGroupMaxI;
}

// Blocks per assignment for T tokens of k slots on `sms` SMs: as many as fill the SMs
// once, 1 to kGroupMaxBlocks, and at most kGroupMaxAssign / T (the fused combine's
// words, one per token and rank; T <= kGroupMaxAssign where GroupSupported).
inline int GroupBlocks(int64_t T, int64_t k, int sms) {
  const int64_t assignments = T * k;
  int64_t g = assignments > 0 ? sms / assignments : 1;
  if (g > kGroupMaxBlocks) g = kGroupMaxBlocks;
  if (T > 0 && g > kGroupMaxAssign / T) g = kGroupMaxAssign / T;
  return static_cast<int>(g < 1 ? 1 : g);
}

// Options of gemv_group_kernel (a bit mask, template argument OPT), for
// scripts/group_probe.cu to time against each other; the library runs
// kGroupLibraryOptions.
//   kGroupOptEarly: the first row pair's gate/up loads are issued as soon as the
//     expert id is known, before x is staged in shared memory (otherwise nothing is
//     in flight during the x loads and the barrier after them);
//   kGroupOptPipe: phase 1 in half rows, the next row pair's first half in flight
//     while this pair's second half is summed;
//   kGroupOptPrefetchDown: the block's w_down rows (one contiguous range) are
//     prefetched into L2 by bulk prefetches once the expert is known, and the gate/up
//     loads carry an L2 evict-first policy so the prefetched rows outlive them: HBM
//     keeps streaming phase 2's bytes while the blocks wait for each other's h.
constexpr int kGroupOptEarly = 1;
constexpr int kGroupOptPipe = 2;
constexpr int kGroupOptPrefetchDown = 4;
constexpr int kGroupLibraryOptions = 0;  // none measured yet (the probe's columns)
constexpr int kGroupPrefetchChunk = 16384;  // bytes per bulk prefetch

__device__ unsigned int g_group_arrived[kGroupMaxAssign];
__device__ unsigned int g_group_left[kGroupMaxAssign];
// The fused combine's arrivals per (token, rank): T G <= kGroupMaxAssign (GroupBlocks).
__device__ unsigned int g_group_summed[kGroupMaxAssign];

template <typename T>
__device__ __forceinline__ float dot8(const uint4& w, const float* v) {
  float f[8];
  Vec16<T>::unpack(w, f);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) s = fmaf(f[i], v[i], s);
  return s;
}

// 16-byte streaming load with an L2 cache policy (kGroupOptPrefetchDown's gate/up
// loads: evict first).
__device__ __forceinline__ uint4 ldg_stream_policy_v4(const void* p, uint64_t policy) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p), "l"(policy));
  return r;
}

// Bulk prefetch of [p, p + bytes) into L2 (sm_90; p 16-byte aligned, bytes a multiple
// of 16), in kGroupPrefetchChunk pieces dealt to the calling warp's lanes.
__device__ __forceinline__ void prefetch_l2_range(const void* p, size_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const char* c = static_cast<const char*>(p);
  for (size_t o = size_t(threadIdx.x & 31) * kGroupPrefetchChunk; o < bytes;
       o += size_t(32) * kGroupPrefetchChunk) {
    const uint32_t n = static_cast<uint32_t>(bytes - o < kGroupPrefetchChunk ? bytes - o
                                                                              : kGroupPrefetchChunk);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(c + o), "r"(n) : "memory");
  }
#endif
}

// One block's share of assignment as (expert e): phase 1 rows [i0, i1), phase 2 rows
// [r0, r1). OPT: kGroupOpt* bits.
template <typename T, int VPL, int DVPL, int OPT>
__device__ __forceinline__ void group_expert(const GemvGroupArgs& a, int e, int as, int r0,
                                             int r1, int i0, int i1, uint4* xs, T* hs) {
  constexpr bool PIPE = (OPT & kGroupOptPipe) != 0;
  constexpr bool EARLY = (OPT & kGroupOptEarly) != 0;
  constexpr bool PF = (OPT & kGroupOptPrefetchDown) != 0;
  const int G = a.G, H = a.H, I = a.I;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  T* const y = static_cast<T*>(a.y) + size_t(as) * H;
  T* const hg = static_cast<T*>(a.h) + size_t(as) * I;
  const int nv = H / 8;
  uint64_t policy = 0;
  if constexpr (PF) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    if (warp == kGroupWarps - 1)
      prefetch_l2_range(static_cast<const T*>(a.w_down) + (size_t(e) * H + r0) * I,
                        size_t(r1 - r0) * I * sizeof(T));
  }
  // Phase 1: rows i0 .. i1-1 of gate and up, a warp per row pair.
  const T* wg = static_cast<const T*>(a.w_gate_up) + size_t(e) * 2 * I * H;
  const T* wu = wg + size_t(I) * H;
  // Vectors v0 .. v0+NVEC-1 of row r (per lane) of gate and up; zeros past i1 or H.
  auto load_rows = [&](int r, int v0, auto& g, auto& u) {
    constexpr int NVEC = sizeof(g) / sizeof(uint4);
    const uint4* pg = reinterpret_cast<const uint4*>(wg + size_t(r) * H);
    const uint4* pu = reinterpret_cast<const uint4*>(wu + size_t(r) * H);
#pragma unroll
    for (int i = 0; i < NVEC; ++i) {
      const int v = lane + 32 * (v0 + i);
      // PIPE and EARLY load a warp's first pair before the loop, maybe past the last
      const bool in = (!(PIPE || EARLY) || r < i1) && v < nv;
      if constexpr (PF) {
        g[i] = in ? ldg_stream_policy_v4(pg + v, policy) : make_uint4(0, 0, 0, 0);
        u[i] = in ? ldg_stream_policy_v4(pu + v, policy) : make_uint4(0, 0, 0, 0);
      } else {
        g[i] = in ? ldg_stream_v4(pg + v) : make_uint4(0, 0, 0, 0);
        u[i] = in ? ldg_stream_v4(pu + v) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  constexpr int HV = PIPE ? VPL / 2 : VPL;  // PIPE's halves (else a whole row)
  constexpr int HB = PIPE ? VPL - HV : 1;    // gb, ub: PIPE's second halves (else unused)
  uint4 ga[HV], ua[HV], gb[HB], ub[HB];
  auto load_pair = [&](int r) {
    load_rows(r, 0, ga, ua);
    if constexpr (PIPE) load_rows(r, HV, gb, ub);
  };
  if constexpr (EARLY) load_pair(i0 + warp);
  const uint4* xv = reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) + size_t(as / a.k) * H);
  for (int v = tid; v < nv; v += kGroupThreads) xs[v] = xv[v];
  __syncthreads();
  auto dot_rows = [&](int v0, const auto& g, const auto& u, float& sg, float& su) {
    constexpr int NVEC = sizeof(g) / sizeof(uint4);
#pragma unroll
    for (int i = 0; i < NVEC; ++i) {
      const int v = lane + 32 * (v0 + i);
      if (v < nv) {
        float xf[8];
        Vec16<T>::unpack(xs[v], xf);
        sg += dot8<T>(g[i], xf);
        su += dot8<T>(u[i], xf);
      }
    }
  };
  if constexpr (!PIPE && !EARLY) {
#pragma unroll 1
    for (int r = i0 + warp; r < i1; r += kGroupWarps) {
      uint4 g[VPL], u[VPL];
      load_rows(r, 0, g, u);
      float sg = 0.f, su = 0.f;
      dot_rows(0, g, u, sg, su);
      sg = warp_sum(sg);
      su = warp_sum(su);
      if (lane == 0) hg[r] = from_float<T>(activate(a.activation, sg) * su);
    }
  } else if constexpr (!PIPE) {
    // EARLY: the pair in ga, ua was loaded before x; the next pair loads once this
    // one is summed (the same sums in the same order as above).
#pragma unroll 1
    for (int r = i0 + warp; r < i1; r += kGroupWarps) {
      float sg = 0.f, su = 0.f;
      dot_rows(0, ga, ua, sg, su);
      load_pair(r + kGroupWarps);
      sg = warp_sum(sg);
      su = warp_sum(su);
      if (lane == 0) hg[r] = from_float<T>(activate(a.activation, sg) * su);
    }
  } else {
    // The row pair in two halves: the next pair's first half loads while this pair's
    // second half is summed (the same sums in the same order as above).
    if constexpr (!EARLY) load_pair(i0 + warp);
#pragma unroll 1
    for (int r = i0 + warp; r < i1; r += kGroupWarps) {
      float sg = 0.f, su = 0.f;
      dot_rows(0, ga, ua, sg, su);
      load_rows(r + kGroupWarps, 0, ga, ua);
      dot_rows(HV, gb, ub, sg, su);
      load_rows(r + kGroupWarps, HV, gb, ub);
      sg = warp_sum(sg);
      su = warp_sum(su);
      if (lane == 0) hg[r] = from_float<T>(activate(a.activation, sg) * su);
    }
  }
  // Phase 2's first loads: a warp's step covers rows q .. q+3 (4 I contiguous
  // elements); lane element j = lane + 32 i of the step is row j / nvi, vector j % nvi.
  const int nvi = I / 8, nstep = kGroupDownRows * nvi;
  const T* wd = static_cast<const T*>(a.w_down) + size_t(e) * H * I;
  const int steps = (r1 - r0 + kGroupDownRows - 1) / kGroupDownRows;
  auto load_step = [&](int s, uint4* w) {
    const int q = r0 + s * kGroupDownRows;
    const int rows = min(kGroupDownRows, r1 - q);
    const uint4* p = reinterpret_cast<const uint4*>(wd + size_t(q) * I);
#pragma unroll
    for (int i = 0; i < DVPL; ++i) {
      const int j = lane + 32 * i;
      w[i] = (s < steps && j < rows * nvi) ? ldg_stream_v4(p + j) : make_uint4(0, 0, 0, 0);
    }
  };
  uint4 cur[DVPL], nxt[DVPL];
  load_step(warp, cur);
  // Count this block's h rows done (release), wait for the group's (acquire).
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    atomicAdd(&g_group_arrived[as], 1u);
    while (ld_acquire_gpu(&g_group_arrived[as]) < static_cast<unsigned>(G)) __nanosleep(64);
  }
  __syncthreads();
  const uint4* hgv = reinterpret_cast<const uint4*>(hg);
  uint4* hsv = reinterpret_cast<uint4*>(hs);
  for (int v = tid; v < nvi; v += kGroupThreads) hsv[v] = __ldcg(hgv + v);
  __syncthreads();
  if (tid == 0 && atomicAdd(&g_group_left[as], 1u) == static_cast<unsigned>(G) - 1) {
    g_group_arrived[as] = 0;  // every rank has passed its wait: reset for the next call
    g_group_left[as] = 0;
  }
  // Phase 2: y[a, q .. q+3] for this warp's steps, the next step's loads in flight.
#pragma unroll 1
  for (int s = warp; s < steps; s += kGroupWarps) {
    load_step(s + kGroupWarps, nxt);
    float acc[kGroupDownRows] = {};
#pragma unroll
    for (int i = 0; i < DVPL; ++i) {
      const int j = lane + 32 * i;
      if (j < nstep) {
        const int row = j / nvi, col = j - row * nvi;
        float hf[8];
        Vec16<T>::unpack(hsv[col], hf);
        const float d = dot8<T>(cur[i], hf);
#pragma unroll
        for (int q = 0; q < kGroupDownRows; ++q) acc[q] += row == q ? d : 0.f;
      }
    }
    const int q = r0 + s * kGroupDownRows;
#pragma unroll
    for (int rr = 0; rr < kGroupDownRows; ++rr) {
      const float v = warp_sum(acc[rr]);
      if (lane == rr && q + rr < r1) y[q + rr] = from_float<T>(v);
    }
#pragma unroll
    for (int i = 0; i < DVPL; ++i) cur[i] = nxt[i];
  }
}

// The fused combine of token t's rows [r0, r1), by the last of the token's k blocks
// of this rank to finish (the others' y rows then written): out[t, c] = sum_j
// cw[t, j] * y[t, j, c], f32 in slot order with each product rounded before the add,
// rounded once to T: combine_kernel's arithmetic on the same y (zeros for dropped
// ids), so the same bits. r0 and r1 are multiples of 8 (or H).
template <typename T>
__device__ __forceinline__ void group_combine(const GemvGroupArgs& a, int t, int rank, int r0,
                                              int r1) {
  __shared__ bool last;
  __syncthreads();  // this block's y rows are written
  if (threadIdx.x == 0) {
    unsigned int* cnt = &g_group_summed[t * a.G + rank];
    __threadfence();
    last = atomicAdd(cnt, 1u) == static_cast<unsigned>(a.k) - 1;
    if (last) {
      *cnt = 0;  // all k arrived: reset for the next call
      __threadfence();
    }
  }
  __syncthreads();
  if (!last) return;
  const int H = a.H, k = a.k;
  const T* yt = static_cast<const T*>(a.y) + size_t(t) * k * H;
  const float* wt = a.combine_w + size_t(t) * k;
  for (int c = r0 + 8 * static_cast<int>(threadIdx.x); c < r1; c += 8 * kGroupThreads) {
    float acc[8];
    sum_slots8_l2<T>(yt + c, wt, k, H, acc);
    store_unit<T, 8>(static_cast<T*>(a.combine_out) + size_t(t) * H + c, acc);
  }
}

// VPL: 16-byte vectors per lane of a gate/up row (H <= 256 VPL); DVPL: per lane of a
// 4-row w_down step (I <= 64 DVPL). OPT: kGroupOpt* bits (scripts/group_probe.cu
// times them; the library runs kGroupLibraryOptions).
template <typename T, int VPL, int DVPL, int OPT>
__global__ void __launch_bounds__(kGroupThreads, 1) gemv_group_kernel(GemvGroupArgs a) {
  __shared__ uint4 xs[32 * VPL];
  __shared__ __align__(16) T hs[64 * DVPL];  // h[a]: I <= 64 DVPL
  const int G = a.G;
  const int as = blockIdx.x / G, rank = blockIdx.x % G;
  const int tid = threadIdx.x;
  const int H = a.H, I = a.I;
  // w_down rows per rank in multiples of 8: the fused combine's 16-byte vectors.
  const int i_per = (I + G - 1) / G, h_per = (H + 8 * G - 1) / (8 * G) * 8;
  const int i0 = min(I, rank * i_per), i1 = min(I, i0 + i_per);
  const int r0 = min(H, rank * h_per), r1 = min(H, r0 + h_per);
  T* const y = static_cast<T*>(a.y) + size_t(as) * H;
  // Launched with programmatic stream serialization: ids and x come from the
  // previous kernel. Dependents launch once every block here has started.
  pdl_wait_prerequisites();
  pdl_launch_dependents();
  const int e = a.ids[as];
  if (e < 0 || e >= a.E) {  // the whole group takes this branch: nobody waits for it
    for (int r = r0 + tid; r < r1; r += kGroupThreads) y[r] = from_float<T>(0.f);
  } else {
    group_expert<T, VPL, DVPL, OPT>(a, e, as, r0, r1, i0, i1, xs, hs);
  }
  if (a.combine_out != nullptr) group_combine<T>(a, as / a.k, rank, r0, r1);
}

template <typename T, int VPL, int OPT>
cudaError_t LaunchGemvGroupVpl(const GemvGroupArgs& a, cudaStream_t stream, bool pdl) {
  const unsigned blocks = static_cast<unsigned>(a.T * a.k * a.G);
  const int dvpl = (kGroupDownRows * (a.I / 8) + 31) / 32;
  if (dvpl <= 4)
    return LaunchMaybePdl(gemv_group_kernel<T, VPL, 4, OPT>, dim3(blocks), dim3(kGroupThreads),
                          0, stream, pdl, a);
  if (dvpl <= 8)
    return LaunchMaybePdl(gemv_group_kernel<T, VPL, 8, OPT>, dim3(blocks), dim3(kGroupThreads),
                          0, stream, pdl, a);
  return LaunchMaybePdl(gemv_group_kernel<T, VPL, kGroupMaxDvpl, OPT>, dim3(blocks),
                        dim3(kGroupThreads), 0, stream, pdl, a);
}

// The caller checked GroupSupported; a.G set (GroupBlocks; any G >= 1 is correct).
// OPT: kGroupOpt* bits (the probe's variants; the library passes none).
template <typename T, int OPT = kGroupLibraryOptions>
cudaError_t LaunchGemvGroup(const GemvGroupArgs& a, cudaStream_t stream) {
  if (a.T == 0) return cudaSuccess;
  if (a.G < 1 || (a.combine_out != nullptr && int64_t(a.T) * a.G > kGroupMaxAssign))
    return cudaErrorInvalidValue;
  const bool pdl = DeviceSupportsPdl();
  const int vpl = (a.H / 8 + 31) / 32;
  if (vpl <= 4) return LaunchGemvGroupVpl<T, 4, OPT>(a, stream, pdl);
  if (vpl <= 8) return LaunchGemvGroupVpl<T, 8, OPT>(a, stream, pdl);
  return LaunchGemvGroupVpl<T, kGroupMaxVpl, OPT>(a, stream, pdl);
}

}  // namespace cuda
}  // namespace jax_moe
