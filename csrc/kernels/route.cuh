// CUDA routing kernels and their launcher. Raw pointers, sizes and a stream in;
// cudaError_t out; no XLA headers.
//
// Logits path (x = logits [T, E]): one launch, one warp per token.
// Fused path (x = hidden [T, H], router [E, H]): still one launch, a split-K
// tensor-core GEMM plus the selection. Block (k-split, expert tile, token tile)
// multiplies 16 router rows by the hidden rows of 8 tokens over its share of H
// (32-column chunks, dealt to its 8 warps in turn; mma.sync m16n8k16 with the router
// rows as A and the tokens as B, both loaded straight from global memory, see
// common/mma.cuh) and adds its warps' partials in a fixed order. On sm_90 with
// k_splits <= 8 (route_cluster_kernel) the k-split blocks of a tile form a
// thread-block cluster and add their partials through distributed shared memory;
// elsewhere (route_fused_kernel) they go through a scratch buffer partial
// [k_splits, T, E]. The last block to arrive at a token tile (a self-resetting
// arrival counter per tile) gathers the tile's logits into shared memory and runs
// the selection, one warp per token. Nothing is accumulated atomically, so the
// result is deterministic. f32 inputs, or H not a multiple of 8, take the same
// structure with scalar FMAs. The GEMM loads its first router chunks before it
// waits for the previous kernel (the router weights are not written by earlier
// kernels; x is).
//
// Selection (one warp per token, E <= 1024): lane l holds experts
// [l * EPL, (l + 1) * EPL). Scores (softmax or sigmoid) in f32, selection score =
// score + bias (NaN counts as -inf), optional group limit (when a group spans whole
// lanes, its top-2 is a local top-2 plus a few shuffles), then top_k rounds of a
// warp float max, ties to the lowest lane (= lowest expert index). The chosen
// weights are renormalized, scaled by scaling_factor and by expert_scale[id].
//
// Block selection (RouteArgs::block_select, E <= 256; written in session 23 without
// a device, not yet picked by heuristics.py): the same selection with a whole block
// per token, one thread per expert (route_token_block), on the logits path
// (route_block_kernel) or in a one-launch fused kernel without k-splits or a cluster
// (route_gemv_block_kernel).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "common/mma.cuh"
#include "common/params.h"

namespace jax_moe {
namespace cuda {

constexpr int kRouteWarps = 8;
constexpr int kRouteThreads = kRouteWarps * 32;
constexpr int kRouteTokTile = 8;     // tokens per block in the fused path (one mma n-tile)
constexpr int kRouteExpTile = 16;    // router rows per block (the mma M)
constexpr int kRouteChunk = 32;      // columns per chunk (two k16 steps)
constexpr int kRouteMaxExperts = 1024;
constexpr int kRouteMaxTopK = 32;
constexpr int kRouteMaxGroups = 64;
constexpr int kRouteMaxTiles = 1024;  // token tiles per fused launch (one counter each)
constexpr int kRouteMaxKSplits = 4096;
constexpr int kRouteMaxClusterSplits = 8;  // portable cluster size: the cluster kernel
constexpr int kRouteBlockMaxExperts = 256;  // block selection: one thread per expert

// Arrival counters of the fused path. The last block of a tile resets its counter
// to zero, so every launch finds them zeroed (launches on one stream are ordered).
__device__ unsigned int g_route_tile_arrivals[kRouteMaxTiles];

struct RouteArgs {
  const void* x = nullptr;       // logits [T, E] or hidden [T, H]
  const void* router = nullptr;  // [E, H] or null
  const float* bias = nullptr;   // [E] or null
  const float* scale = nullptr;  // [E] or null
  int64_t T = 0, H = 0, E = 0;
  RouteParams p;
  float* weights = nullptr;  // [T, k]
  int32_t* ids = nullptr;    // [T, k]
  float* partial = nullptr;  // [k_splits, T, E] scratch (fused path)
  int k_splits = 1;          // fused path: blocks along H per (expert tile, token tile)
  bool block_select = false; // block selection: route_block_kernel (logits) or
                             // route_gemv_block_kernel (router); see the Supported rules
};

// Whether route_block_kernel can take a logits-path call with E experts.
inline bool RouteBlockSupported(int64_t E) { return E >= 1 && E <= kRouteBlockMaxExperts; }

// Whether route_gemv_block_kernel can take a fused-path call (block_select with the
// router): 16-bit types (is16bit), H a multiple of 8, E <= 256, one k-split.
inline bool RouteGemvBlockSupported(int64_t E, int64_t H, int k_splits, bool is16bit) {
  return is16bit && H >= 8 && H % 8 == 0 && RouteBlockSupported(E) && k_splits == 1;
}

// Arrival and departure words of route_gemv_block_kernel, one per token tile; the
// last departing block of a tile resets both, so every launch finds them zeroed.
__device__ unsigned int g_route_gemv_arrived[kRouteMaxTiles];
__device__ unsigned int g_route_gemv_left[kRouteMaxTiles];

__device__ __forceinline__ float sel_value(float v) { return v != v ? -INFINITY : v; }

// No-op phase hook of route_token_warp (scripts/route_probe.cu passes a clock reader).
struct RouteNoTrace {
  __device__ __forceinline__ void operator()(int) const {}
};

// 1 / (1 + exp(-x)) without the IEEE division's slow-path branch (which kept the
// compiler from overlapping the EPL sigmoids): hardware reciprocal and one Newton
// step (within an ulp of the division). exp(-x) = inf gives 0, NaN stays NaN.
__device__ __forceinline__ float sigmoid_fast(float x) {
  const float d = 1.0f + expf(-x);
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  r = fmaf(r, fmaf(-d, r, 1.0f), r);
  return d == INFINITY ? 0.0f : r;
}

// Sorts n keys descending (a bitonic network, unrolled at compile time), moving two
// float payloads with them. Keys are distinct except zeros.
template <int N>
__device__ __forceinline__ void sort_desc(unsigned long long* k, float* p, float* q) {
#pragma unroll
  for (int size = 2; size <= N; size <<= 1) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride >>= 1) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int j = i ^ stride;
        if (j > i) {
          const bool desc = (i & size) == 0;
          const bool sw = desc ? k[i] < k[j] : k[i] > k[j];  // selects, not a branch
          const unsigned long long ki = k[i], kj = k[j];
          const float pi = p[i], pj = p[j], qi = q[i], qj = q[j];
          k[i] = sw ? kj : ki; k[j] = sw ? ki : kj;
          p[i] = sw ? pj : pi; p[j] = sw ? pi : pj;
          q[i] = sw ? qj : qi; q[j] = sw ? qi : qj;
        }
      }
    }
  }
}

// A lane's correction bias and per-expert scales (0 and 1 where absent), loaded
// before the logits so that the loads overlap (the finishing block issues them
// before it gathers the logits).
template <int EPL>
struct RouteLaneExtras {
  float bias[EPL], sc[EPL];
  __device__ __forceinline__ explicit RouteLaneExtras(const RouteArgs& a) {
    const int e0 = (threadIdx.x & 31) * EPL;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = e0 + i;
      bias[i] = (a.bias != nullptr && e < a.E) ? a.bias[e] : 0.f;
      sc[i] = (a.scale != nullptr && e < a.E) ? a.scale[e] : 1.f;
    }
  }
};

// Routes one token; every lane of the warp calls it. get(e) returns the f32 logit.
// A token is one warp's chain of dependent steps, so this is written for latency
// (measured: RESULTS.md session 8; `trace(phase)` lets scripts/route_probe.cu time
// the phases). The logits, bias and scales are loaded together up front; the
// softmax maximum is one redux; the group limit ranks the group scores in one pass;
// each lane sorts its EPL candidates, and each top-k round is then a redux + ballot
// over the lanes' heads (the winner, the lowest lane on ties, pops its head): no
// shuffles in the loop. The winners write their own outputs at the end.
template <int EPL, typename GetLogit, typename Trace = RouteNoTrace>
__device__ void route_token_warp(GetLogit get, int64_t t, const RouteArgs& a,
                                 const RouteLaneExtras<EPL>& ex, Trace trace = Trace()) {
  const int lane = threadIdx.x & 31;
  const int E = static_cast<int>(a.E);
  const RouteParams& p = a.p;
  const int e0 = lane * EPL;
  float s[EPL], sc[EPL];
  uint32_t avail = 0;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = e0 + i;
    s[i] = (e < E) ? get(e) : -INFINITY;
    sc[i] = ex.sc[i];
    if (e < E) avail |= 1u << i;
  }
  trace(0);
  if (p.scoring == kSoftmax) {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < EPL; ++i) m = fmaxf(m, s[i]);
    m = key_float(__reduce_max_sync(0xffffffffu, float_order_key(m)));  // m is never NaN
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      s[i] = expf((avail >> i & 1u) ? s[i] - m : -INFINITY);  // a select, then exp
      sum += s[i];
    }
    const float inv = 1.0f / warp_sum(sum);
#pragma unroll
    for (int i = 0; i < EPL; ++i) s[i] *= inv;
  } else {
#pragma unroll
    for (int i = 0; i < EPL; ++i) s[i] = sigmoid_fast(s[i]);
  }
  float sel[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) sel[i] = sel_value(s[i] + ex.bias[i]);
  trace(1);

  if (p.num_groups > 1) {
    const int G = E / p.num_groups;
    const int lanes_per_group = G / EPL;
    if (G % EPL == 0 && lanes_per_group >= 1 && (32 % lanes_per_group) == 0 &&
        E == 32 * EPL) {
      // Each group is lanes_per_group whole lanes (a power of two): local top-2, then
      // xor-shuffles, after which every lane of a group holds its group's score. A
      // group is allowed when fewer than top_groups groups beat it (higher score, or
      // equal score and lower index): the same set as top_groups rounds of arg-max.
      // Top-2 as min / max (sel is never NaN): no branches in the chain.
      float b1 = -INFINITY, b2 = -INFINITY;
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        b2 = fmaxf(b2, fminf(b1, sel[i]));
        b1 = fmaxf(b1, sel[i]);
      }
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        if (o < lanes_per_group) {  // uniform over the warp
          const float o1 = __shfl_xor_sync(0xffffffffu, b1, o);
          const float o2 = __shfl_xor_sync(0xffffffffu, b2, o);
          b2 = fmaxf(fminf(b1, o1), fmaxf(b2, o2));
          b1 = fmaxf(b1, o1);
        }
      }
      const float gs = sel_value((p.group_score == kGroupMax || G < 2) ? b1 : b1 + b2);
      const uint32_t gkey = float_order_key(gs + 0.0f);
      const int shift = __ffs(lanes_per_group) - 1;
      const int my_group = lane >> shift;
      int rank = 0;
      for (int g0 = 0; g0 < p.num_groups; g0 += 8) {  // 8 shuffles in flight
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int g = g0 + u;
          const uint32_t other = __shfl_sync(0xffffffffu, gkey, (g << shift) & 31);
          if (g < p.num_groups && (other > gkey || (other == gkey && g < my_group))) ++rank;
        }
      }
      if (rank >= p.top_groups) avail = 0u;
    } else {
      // General layout: one warp reduction per group, then top_groups rounds.
      unsigned long long gk[2] = {0ull, 0ull};
      for (int g = 0; g < p.num_groups; ++g) {
        float b1 = -INFINITY, b2 = -INFINITY;
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
          const int e = e0 + i;
          if ((avail >> i & 1u) && e / G == g) {
            if (sel[i] > b1) { b2 = b1; b1 = sel[i]; } else if (sel[i] > b2) { b2 = sel[i]; }
          }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          const float o1 = __shfl_xor_sync(0xffffffffu, b1, o);
          const float o2 = __shfl_xor_sync(0xffffffffu, b2, o);
          if (o1 > b1) { b2 = fmaxf(b1, o2); b1 = o1; } else { b2 = fmaxf(b2, o1); }
        }
        const float gs = sel_value((p.group_score == kGroupMax || G < 2) ? b1 : b1 + b2);
        if ((g & 31) == lane) gk[g >> 5] = select_key(gs, g);
      }
      unsigned long long allowed_groups = 0ull;
      for (int r = 0; r < p.top_groups; ++r) {
        unsigned long long best = gk[0] > gk[1] ? gk[0] : gk[1];
        best = warp_max_u64(best);
        const int g = key_index(best);
        allowed_groups |= 1ull << g;
        if ((g & 31) == lane) gk[g >> 5] = 0ull;
      }
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        const int e = e0 + i;
        if (e < E && !((allowed_groups >> (e / G)) & 1ull)) avail &= ~(1u << i);
      }
    }
  }
  trace(2);

  // Candidates: key = (score key, then lower expert first), 0 = not selectable
  // (score keys are never 0: sel is never NaN), sorted descending in each lane.
  unsigned long long kk[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i)
    kk[i] = (avail >> i & 1u) ? (static_cast<unsigned long long>(float_order_key(sel[i] + 0.0f))
                                     << 32) | (0xffffffffu - static_cast<uint32_t>(e0 + i))
                              : 0ull;
  sort_desc<EPL>(kk, s, sc);
  // top_k rounds over the lanes' heads q[0]: the highest score wins, ties to the
  // lowest lane (= the lowest expert; inside a lane the sort put lower experts
  // first). won bit j: this lane won round j, with its next sorted candidate.
  uint32_t q[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) q[i] = static_cast<uint32_t>(kk[i] >> 32);
  const uint32_t lanes_below = (1u << lane) - 1u;
  uint32_t won = 0u;
  for (int j = 0; j < p.top_k; ++j) {
    const uint32_t m = __reduce_max_sync(0xffffffffu, q[0]);
    const uint32_t b = __ballot_sync(0xffffffffu, q[0] == m);
    if (m != 0u && q[0] == m && (b & lanes_below) == 0u) {
      won |= 1u << j;
#pragma unroll
      for (int i = 0; i + 1 < EPL; ++i) q[i] = q[i + 1];
      q[EPL - 1] = 0u;
    }
  }
  trace(3);
  // Outputs: this lane's r-th win is its r-th sorted candidate, chosen in the round
  // given by the r-th set bit of won.
  float mine = 0.f;
#pragma unroll
  for (int r = 0; r < EPL; ++r) if (r < __popc(won)) mine += s[r];
  const float inv = 1.0f / (warp_sum(mine) + kRenormEps);
  uint32_t rest = won;
#pragma unroll
  for (int r = 0; r < EPL; ++r) {
    if (rest != 0u) {
      const int j = __ffs(rest) - 1;
      rest &= rest - 1u;
      float w = s[r];
      if (p.renormalize) w = w * inv;
      w *= p.scaling_factor;
      if (a.scale != nullptr) w *= sc[r];
      a.weights[t * p.top_k + j] = w;
      a.ids[t * p.top_k + j] = key_index(kk[r]);
    }
  }
  trace(4);
}

// Logits path: warp w of block b routes token b * kRouteWarps + w.
template <typename T, int EPL>
__global__ void __launch_bounds__(kRouteThreads) route_logits_kernel(RouteArgs a) {
  pdl_launch_dependents();  // a PDL-launched consumer still waits for our completion
  pdl_wait_prerequisites();  // the logits come from the previous kernel (XLA's dot)
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
  if (t >= a.T) return;
  const T* row = static_cast<const T*>(a.x) + t * a.E;
  route_token_warp<EPL>([&](int e) { return to_float(row[e]); }, t, a, RouteLaneExtras<EPL>(a));
}

// Routes token t with the whole block, one thread per expert (blockDim a multiple of
// 32 with E <= blockDim <= 256); thread e passes expert e's logit, bias and scale (any
// values past E). The same selection as route_token_warp, spread over the block: one warp's
// chain of dependent steps took 4142 cycles for DeepSeek-V3 (E=256, 8 groups) and
// 2200 for E=128 (RESULTS.md session 8), longer than the router GEMM. Here each step
// is a few block-wide passes:
//   * softmax: block maximum and sum (warp reductions, then the warps' values in
//     warp order from shared memory);
//   * groups: thread g < num_groups takes group g's top-2 (or max) from shared
//     memory; every thread then ranks its own group against the num_groups scores
//     (allowed when fewer than top_groups groups beat it: higher score, or equal
//     score and lower index; the same set as the warp's);
//   * top-k: keys (score key, then lower expert first; 0 = not selectable) in shared
//     memory; each thread counts the keys of its warp above its own, and the ones
//     with fewer than k above them (at most k per warp) go to slot warp * k + rank;
//     thread j < warps * k counts the candidates above slot j's key, which is its
//     final rank; ranks < k write their expert to that output position;
//   * threads j < k add the k chosen scores in rank order, and write the weights.
// Ties, NaN and the weights' formula as route_token_warp; the renormalizing sum's
// order differs (rank order here, lanes there), so weights may differ by an ulp.
// Called by every thread of the block; uses static shared memory.
__device__ __forceinline__ void route_token_block(float s, float bias, float sc, int64_t t,
                                                  const RouteArgs& a) {
  constexpr int kMaxWarps = kRouteBlockMaxExperts / 32;
  __shared__ float s_score[kRouteBlockMaxExperts], s_sc[kRouteBlockMaxExperts];
  __shared__ float s_sel[kRouteBlockMaxExperts];
  __shared__ unsigned long long s_key[kRouteBlockMaxExperts];
  __shared__ unsigned long long s_cand[kRouteBlockMaxExperts];  // warps * k <= blockDim
  __shared__ uint32_t s_red[kMaxWarps];
  __shared__ float s_sum[kMaxWarps];
  __shared__ uint32_t s_gkey[kRouteMaxGroups];
  __shared__ float s_w[kRouteMaxTopK];
  __shared__ int s_id[kRouteMaxTopK];
  const int e = threadIdx.x, lane = e & 31, warp = e >> 5;
  const int nwarps = static_cast<int>(blockDim.x) >> 5;
  const int E = static_cast<int>(a.E);
  const RouteParams& p = a.p;
  const int k = p.top_k;
  const bool in = e < E;
  if (!in) s = -INFINITY;
  if (p.scoring == kSoftmax) {
    // fmaxf drops NaN: the maximum is never NaN (as the warp's)
    const uint32_t mk = __reduce_max_sync(0xffffffffu, float_order_key(fmaxf(-INFINITY, s)));
    if (lane == 0) s_red[warp] = mk;
    __syncthreads();
    uint32_t m = 0u;
    for (int w = 0; w < nwarps; ++w) m = max(m, s_red[w]);
    s = expf(in ? s - key_float(m) : -INFINITY);
    const float ws = warp_sum(s);
    if (lane == 0) s_sum[warp] = ws;
    __syncthreads();
    float sum = 0.f;
    for (int w = 0; w < nwarps; ++w) sum += s_sum[w];
    s *= 1.0f / sum;
  } else {
    s = sigmoid_fast(s);
  }
  const float sel = sel_value(s + (in ? bias : 0.f));  // never NaN
  bool avail = in;
  if (p.num_groups > 1) {
    const int G = E / p.num_groups;
    s_sel[e] = sel;
    __syncthreads();
    if (e < p.num_groups) {
      float b1 = -INFINITY, b2 = -INFINITY;
      for (int i = e * G; i < (e + 1) * G; ++i) {
        const float v = s_sel[i];
        b2 = fmaxf(b2, fminf(b1, v));
        b1 = fmaxf(b1, v);
      }
      const float gs = sel_value((p.group_score == kGroupMax || G < 2) ? b1 : b1 + b2);
      s_gkey[e] = float_order_key(gs + 0.0f);
    }
    __syncthreads();
    if (in) {
      const int g = e / G;
      const uint32_t mine = s_gkey[g];
      int rank = 0;
      for (int o = 0; o < p.num_groups; ++o) {
        const uint32_t other = s_gkey[o];
        rank += (other > mine || (other == mine && o < g)) ? 1 : 0;
      }
      avail = rank < p.top_groups;
    }
  }
  const unsigned long long key =
      avail ? (static_cast<unsigned long long>(float_order_key(sel + 0.0f)) << 32) |
                  (0xffffffffu - static_cast<uint32_t>(e))
            : 0ull;
  s_key[e] = key;
  s_score[e] = s;
  s_sc[e] = sc;
  if (e < nwarps * k) s_cand[e] = 0ull;
  __syncthreads();
  int local = 0;  // keys of this warp above this one
#pragma unroll 8
  for (int j = 0; j < 32; ++j) local += s_key[warp * 32 + j] > key ? 1 : 0;
  if (key != 0ull && local < k) s_cand[warp * k + local] = key;
  __syncthreads();
  const int n = nwarps * k;
  if (e < n) {
    const unsigned long long c = s_cand[e];
    if (c != 0ull) {
      int rank = 0;
      for (int j = 0; j < n; ++j) rank += s_cand[j] > c ? 1 : 0;
      if (rank < k) {
        const int id = key_index(c);
        s_w[rank] = s_score[id];
        s_id[rank] = id;
      }
    }
  }
  __syncthreads();
  if (e < k) {
    float sum = 0.f;
    for (int r = 0; r < k; ++r) sum += s_w[r];
    const int id = s_id[e];
    float w = s_w[e];
    if (p.renormalize) w = w * (1.0f / (sum + kRenormEps));
    w *= p.scaling_factor;
    if (a.scale != nullptr) w *= s_sc[id];
    a.weights[t * k + e] = w;
    a.ids[t * k + e] = id;
  }
}

// Logits path, one block per token (route_token_block).
template <typename T>
__global__ void __launch_bounds__(kRouteBlockMaxExperts) route_block_kernel(RouteArgs a) {
  pdl_launch_dependents();  // a PDL-launched consumer still waits for our completion
  pdl_wait_prerequisites();  // the logits come from the previous kernel (XLA's dot)
  const int64_t t = blockIdx.x;
  const int e = threadIdx.x;
  const bool in = e < a.E;
  const float bias = (a.bias != nullptr && in) ? a.bias[e] : 0.f;
  const float sc = (a.scale != nullptr && in) ? a.scale[e] : 1.f;
  const float s = in ? to_float(static_cast<const T*>(a.x)[t * a.E + e]) : -INFINITY;
  route_token_block(s, bias, sc, t, a);
}

// ---- fused path ----------------------------------------------------------------------

// Fused path with block selection (block_select with the router; 16-bit, H % 8 == 0,
// E <= 256, k_splits = 1): one launch, no cluster, no partial sums. grid = (ceil(E /
// EPB) expert blocks, at least 8; token tiles of 8). Block (b, z) computes the whole dot products
// of router rows [b EPB, (b+1) EPB) with the tile's tokens (threads along H, 16-byte
// loads, every router byte read once; the tile's x rows come from L2 to every block)
// and stores the logits to the scratch [T, E]; then it counts itself on the tile's
// arrival word (release). Blocks b < ntok then wait for the whole tile (acquire) and
// route token z * 8 + b with route_token_block: the selection runs on up to 8 blocks
// at once instead of one warp per token in one finishing block, and there is no
// cluster exchange. Why it may pay: in the cluster kernel the stages after the GEMM
// took 4.7 us of 7.0 at DeepSeek-V3 T=1 (route_probe, s8-1, s8-5: exchange 1.5,
// finishing block 1.3, selection 2.1). Not yet measured (written in session 23
// without a device). Only blocks b < 8 of a tile wait, and only for blocks of their
// tile, which come after them in dispatch order and never wait: no deadlock, with or
// without PDL (dependents start once every block here has started).
template <typename T, int EPB>
__global__ void __launch_bounds__(kRouteBlockMaxExperts) route_gemv_block_kernel(RouteArgs a,
                                                                                 int64_t tile0) {
  constexpr int kThreads = kRouteBlockMaxExperts;
  constexpr int kU = 4;  // 16-byte vectors per thread per row in flight
  __shared__ float red[kThreads / 32][EPB][kRouteTokTile];
  pdl_launch_dependents();  // a PDL-launched consumer still waits for our completion
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) * EPB;
  const int64_t tile = tile0 + blockIdx.y;
  const int64_t tok0 = tile * kRouteTokTile;
  const int ntok = static_cast<int>(a.T - tok0 < kRouteTokTile ? a.T - tok0 : kRouteTokTile);
  const int64_t nv = a.H / 8;
  const T* w = static_cast<const T*>(a.router);
  const T* x = static_cast<const T*>(a.x) + tok0 * a.H;
  float acc[EPB][kRouteTokTile];
#pragma unroll
  for (int j = 0; j < EPB; ++j)
#pragma unroll
    for (int t = 0; t < kRouteTokTile; ++t) acc[j][t] = 0.f;
  bool waited = false;
  for (int64_t v0 = tid; v0 < nv; v0 += kThreads * kU) {
    uint4 wv[EPB][kU];
#pragma unroll
    for (int j = 0; j < EPB; ++j)
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t v = v0 + u * kThreads;
        wv[j][u] = (e0 + j < a.E && v < nv)
                       ? ldg_stream_v4(w + (e0 + j) * a.H + 8 * v)
                       : make_uint4(0u, 0u, 0u, 0u);
      }
    // PDL: the router rows are in flight; x comes from the previous kernel.
    if (!waited) { pdl_wait_prerequisites(); waited = true; }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t v = v0 + u * kThreads;
      if (v >= nv) continue;
#pragma unroll
      for (int t = 0; t < kRouteTokTile; ++t) {
        if (t < ntok) {
          float xf[8], wf[8];
          Vec16<T>::unpack(ldg_nc_v4(x + t * a.H + 8 * v), xf);
#pragma unroll
          for (int j = 0; j < EPB; ++j) {
            Vec16<T>::unpack(wv[j][u], wf);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[j][t] = fmaf(wf[i], xf[i], acc[j][t]);
          }
        }
      }
    }
  }
  if (!waited) pdl_wait_prerequisites();  // before this block's global writes
#pragma unroll
  for (int j = 0; j < EPB; ++j)
#pragma unroll
    for (int t = 0; t < kRouteTokTile; ++t) {
      const float v = warp_sum(acc[j][t]);
      if (lane == 0) red[warp][j][t] = v;
    }
  __syncthreads();
  if (tid < EPB * kRouteTokTile) {  // output (j, t): the warps' partials in warp order
    const int j = tid % EPB, t = tid / EPB;
    float v = 0.f;
#pragma unroll
    for (int ww = 0; ww < kThreads / 32; ++ww) v += red[ww][j][t];
    if (e0 + j < a.E && t < ntok) a.partial[(tok0 + t) * a.E + e0 + j] = v;
    __threadfence();
  }
  __syncthreads();  // every store is made before the arrival
  if (tid == 0) {
    __threadfence();
    atomicAdd(&g_route_gemv_arrived[blockIdx.y], 1u);
  }
  if (static_cast<int>(blockIdx.x) >= ntok) return;
  // Block b < ntok routes token tok0 + b once every block of the tile has stored.
  const int e = tid;
  const bool in = e < a.E;
  const float bias = (a.bias != nullptr && in) ? a.bias[e] : 0.f;
  const float sc = (a.scale != nullptr && in) ? a.scale[e] : 1.f;
  if (tid == 0)
    while (ld_acquire_gpu(&g_route_gemv_arrived[blockIdx.y]) < gridDim.x) __nanosleep(32);
  __syncthreads();
  const int64_t t = tok0 + blockIdx.x;
  const float s = in ? __ldcg(a.partial + t * a.E + e) : -INFINITY;
  route_token_block(s, bias, sc, t, a);
  if (tid == 0 &&
      atomicAdd(&g_route_gemv_left[blockIdx.y], 1u) == static_cast<unsigned>(ntok) - 1u) {
    g_route_gemv_arrived[blockIdx.y] = 0u;  // every router of the tile passed its wait
    g_route_gemv_left[blockIdx.y] = 0u;
  }
}

// red[warp][i][t]: warp's partial dot of router row e0 + i with token tok0 + t over
// the chunks cb0 + warp, cb0 + warp + 8, ... below cb1. Tensor cores (16-bit types,
// H a multiple of 8; see common/mma.cuh for the fragment layout).
template <typename T>
__device__ __forceinline__ void route_tile_mma(const RouteArgs& a, int64_t e0, int64_t tok0,
                                               int ntok, int64_t cb0, int64_t cb1,
                                               float (*red)[kRouteExpTile][kRouteTokTile]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
  const bool ok_lo = e0 + g < a.E, ok_hi = e0 + g + 8 < a.E, ok_b = g < ntok;
  const T* w = static_cast<const T*>(a.router);
  const T* wlo = w + (ok_lo ? e0 + g : 0) * a.H;
  const T* whi = w + (ok_hi ? e0 + g + 8 : 0) * a.H;
  const T* xb = static_cast<const T*>(a.x) + (ok_b ? tok0 + g : 0) * a.H;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  constexpr int U = 4;  // chunks per warp loaded before the first mma
  bool waited = false;
  for (int64_t ch = cb0 + warp; ch < cb1; ch += kRouteWarps * U) {
    uint4 lo[U], hi[U], b[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t cc = ch + u * kRouteWarps;
      const int64_t col = cc * kRouteChunk + 8 * c;
      const bool in = cc < cb1 && col < a.H;
      lo[u] = (in && ok_lo) ? ldg_stream_v4(wlo + col) : zero;
      hi[u] = (in && ok_hi) ? ldg_stream_v4(whi + col) : zero;
    }
    // PDL: the router rows are in flight; x comes from the previous kernel.
    if (!waited) { pdl_wait_prerequisites(); waited = true; }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t cc = ch + u * kRouteWarps;
      const int64_t col = cc * kRouteChunk + 8 * c;
      const bool in = cc < cb1 && col < a.H;
      b[u] = (in && ok_b) ? ldg_nc_v4(xb + col) : zero;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) mma_chunk<T>(acc, lo[u], hi[u], b[u]);
  }
  if (!waited) pdl_wait_prerequisites();  // before this block's global writes
  red[warp][g][2 * c] = acc[0];
  red[warp][g][2 * c + 1] = acc[1];
  red[warp][g + 8][2 * c] = acc[2];
  red[warp][g + 8][2 * c + 1] = acc[3];
}

// Same partials with scalar FMAs (f32, or rows not 16-byte aligned): lane l of a
// chunk takes column chunk * 32 + l.
template <typename T>
__device__ void route_tile_scalar(const RouteArgs& a, int64_t e0, int64_t tok0, int ntok,
                                  int64_t cb0, int64_t cb1,
                                  float (*red)[kRouteExpTile][kRouteTokTile]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* w = static_cast<const T*>(a.router);
  const T* x = static_cast<const T*>(a.x) + tok0 * a.H;
  pdl_wait_prerequisites();  // x comes from the previous kernel
  for (int i = 0; i < kRouteExpTile; ++i) {
    const int64_t e = e0 + i;
    float acc[kRouteTokTile];
#pragma unroll
    for (int t = 0; t < kRouteTokTile; ++t) acc[t] = 0.f;
    if (e < a.E) {
      for (int64_t ch = cb0 + warp; ch < cb1; ch += kRouteWarps) {
        const int64_t col = ch * kRouteChunk + lane;
        if (col >= a.H) continue;
        const float wv = to_float(w[e * a.H + col]);
#pragma unroll
        for (int t = 0; t < kRouteTokTile; ++t)
          if (t < ntok) acc[t] = fmaf(wv, to_float(x[t * a.H + col]), acc[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < kRouteTokTile; ++t) {
      const float v = warp_sum(acc[t]);
      if (lane == 0) red[warp][i][t] = v;
    }
  }
}

// This block's dot products: router rows [e0, e0 + 16) x tokens [tok0, tok0 + ntok)
// over k-split `split` of H, per warp in red (summed by the caller).
template <typename T, bool MMA>
__device__ __forceinline__ void route_block_dot(const RouteArgs& a, int64_t e0, int64_t tok0,
                                                int ntok, int split,
                                                float (*red)[kRouteExpTile][kRouteTokTile]) {
  const int64_t nchunks = (a.H + kRouteChunk - 1) / kRouteChunk;
  const int64_t per = (nchunks + a.k_splits - 1) / a.k_splits;
  const int64_t cb0 = split * per < nchunks ? split * per : nchunks;
  const int64_t cb1 = cb0 + per < nchunks ? cb0 + per : nchunks;
  if constexpr (MMA) {
    route_tile_mma<T>(a, e0, tok0, ntok, cb0, cb1, red);
  } else {
    route_tile_scalar<T>(a, e0, tok0, ntok, cb0, cb1, red);
  }
}

// Thread i < 128 of the block: the sum of the warps' partials for tile output i
// (router row i % 16, token i / 16), in warp order.
__device__ __forceinline__ float route_sum_warps(
    const float (*red)[kRouteExpTile][kRouteTokTile], int i) {
  float v = 0.f;
#pragma unroll
  for (int w = 0; w < kRouteWarps; ++w) v += red[w][i % kRouteExpTile][i / kRouteExpTile];
  return v;
}

// The block that arrives last at its token tile (of `arrivals` blocks: a
// self-resetting counter per tile, after every block has fenced its logit stores)
// routes the tile. Returns in every other block. Called by every thread. Load fills
// s_logits with the tile's logits (RouteLoadPartials or RouteLoadLogits).
template <int EPL, typename Load>
__device__ __forceinline__ void route_finish_if_last(const RouteArgs& a, int64_t tok0, int ntok,
                                                     unsigned int arrivals, float* s_logits,
                                                     Load load) {
  __syncthreads();  // every thread's stores and fence come before the arrival
  int last = 0;
  if (threadIdx.x == 0)
    last = atomicAdd(&g_route_tile_arrivals[blockIdx.z], 1u) == arrivals - 1;
  if (!__syncthreads_or(last)) return;
  __threadfence();
  const RouteLaneExtras<EPL> ex(a);  // in flight with the logits
  load(a, tok0, ntok, s_logits);
  __syncthreads();
  const int warp = threadIdx.x >> 5;
  if (warp < ntok)
    route_token_warp<EPL>([&](int ee) { return s_logits[warp * a.E + ee]; }, tok0 + warp, a, ex);
  if (threadIdx.x == 0) g_route_tile_arrivals[blockIdx.z] = 0u;
}

// Finishing loads of the split-K kernel: adds the k_splits partials of tokens
// [tok0, tok0 + ntok) in split order into s_logits.
struct RouteLoadPartials {
  __device__ void operator()(const RouteArgs& a, int64_t tok0, int ntok, float* s_logits) const {
    const int n = ntok * static_cast<int>(a.E);
    const int64_t stride = a.T * a.E;  // between k-splits
    for (int o = threadIdx.x; o < n; o += blockDim.x) {
      const float* p = a.partial + tok0 * a.E + o;
      float v = 0.f;
      for (int s = 0; s < a.k_splits; s += 8) {  // 8 loads in flight, added in split order
        float q[8];
#pragma unroll
        for (int j = 0; j < 8; ++j)
          q[j] = s + j < a.k_splits ? __ldcg(p + (s + j) * stride) : 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) if (s + j < a.k_splits) v += q[j];
      }
      s_logits[o] = v;
    }
  }
};

// Finishing loads of the cluster kernel: the tile's finished logits, 8 loads in
// flight per thread (one round for 8 tokens x E <= 256).
struct RouteLoadLogits {
  __device__ void operator()(const RouteArgs& a, int64_t tok0, int ntok, float* s_logits) const {
    const int n = ntok * static_cast<int>(a.E);
    const float* src = a.partial + tok0 * a.E;
    for (int o0 = threadIdx.x; o0 < n; o0 += 8 * blockDim.x) {
      float q[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int o = o0 + j * blockDim.x;
        q[j] = o < n ? __ldcg(src + o) : 0.f;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int o = o0 + j * blockDim.x;
        if (o < n) s_logits[o] = q[j];
      }
    }
  }
};

// Split-K kernel (any GPU, any k_splits). grid = (ceil(E / 16) expert tiles,
// k_splits, token tiles in this launch). Each block writes its partials to
// partial[k_splits, T, E]; the last block of a token tile adds them in split order and
// routes the tile. Dynamic shared memory: kRouteTokTile * E floats.
template <typename T, int EPL, bool MMA>
__global__ void __launch_bounds__(kRouteThreads) route_fused_kernel(RouteArgs a, int64_t tile0) {
  __shared__ float red[kRouteWarps][kRouteExpTile][kRouteTokTile];
  extern __shared__ float s_logits[];
  pdl_launch_dependents();  // a PDL-launched consumer still waits for our completion
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) * kRouteExpTile;
  const int split = blockIdx.y;
  const int64_t tok0 = (tile0 + blockIdx.z) * kRouteTokTile;
  const int ntok = static_cast<int>(a.T - tok0 < kRouteTokTile ? a.T - tok0 : kRouteTokTile);
  route_block_dot<T, MMA>(a, e0, tok0, ntok, split, red);
  __syncthreads();
  if (threadIdx.x < kRouteExpTile * kRouteTokTile) {  // rows fastest: stores coalesce
    const int i = threadIdx.x % kRouteExpTile, t = threadIdx.x / kRouteExpTile;
    const float v = route_sum_warps(red, threadIdx.x);
    if (e0 + i < a.E && t < ntok) a.partial[(split * a.T + tok0 + t) * a.E + e0 + i] = v;
  }
  __threadfence();
  route_finish_if_last<EPL>(a, tok0, ntok, gridDim.x * gridDim.y, s_logits,
                            RouteLoadPartials());
}

// Cluster kernel (sm_90, k_splits <= 8): the same blocks, but the k_splits blocks of
// an (expert tile, token tile) form one thread-block cluster and add their partials
// through distributed shared memory instead of global memory. grid = (k_splits,
// expert tiles, token tiles), cluster = (k_splits, 1, 1). Block r owns tile outputs
// [r * per, (r + 1) * per) (per = ceil(128 / k_splits)): every block pushes its
// partial of each output into the owner's inbox (slot = its rank), one cluster
// barrier, then each owner adds its inbox in rank order (deterministic) and stores
// the finished logits to partial[0 : T, E]. The last block to arrive at the token
// tile reads E x 8 logits in one round of loads and routes the tile. Against the
// split-K kernel this drops the k_splits-fold partial traffic and the finishing
// block's chain of partial loads (measured: RESULTS.md, session 7).
template <typename T, int EPL, bool MMA>
__global__ void __launch_bounds__(kRouteThreads) route_cluster_kernel(RouteArgs a, int64_t tile0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kOut = kRouteExpTile * kRouteTokTile;
  __shared__ float red[kRouteWarps][kRouteExpTile][kRouteTokTile];
  __shared__ float inbox[kRouteMaxClusterSplits][kOut];
  extern __shared__ float s_logits[];
  pdl_launch_dependents();  // a PDL-launched consumer still waits for our completion
  // A block may write another block's shared memory only once that block has
  // started: arrive now, wait just before the first push (racecheck: "block that
  // might not have entered yet" without it). The GEMM runs in between.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());  // = blockIdx.x = k-split
  const int ks = a.k_splits;
  const int per = (kOut + ks - 1) / ks;
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * kRouteExpTile;
  const int64_t tok0 = (tile0 + blockIdx.z) * kRouteTokTile;
  const int ntok = static_cast<int>(a.T - tok0 < kRouteTokTile ? a.T - tok0 : kRouteTokTile);
  route_block_dot<T, MMA>(a, e0, tok0, ntok, rank, red);
  __syncthreads();
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");  // every block has started
  if (threadIdx.x < kOut) {  // push: output o goes to block o / per, slot rank
    const int o = threadIdx.x, owner = o / per;
    float* dst = cluster.map_shared_rank(&inbox[rank][o - owner * per], owner);
    *dst = route_sum_warps(red, o);
  }
  cluster.sync();  // release / acquire: every push is visible to its owner
  if (threadIdx.x < per && rank * per + static_cast<int>(threadIdx.x) < kOut) {
    const int o = rank * per + threadIdx.x;
    const int i = o % kRouteExpTile, t = o / kRouteExpTile;
    float v = 0.f;
    for (int r = 0; r < ks; ++r) v += inbox[r][threadIdx.x];
    if (e0 + i < a.E && t < ntok) a.partial[(tok0 + t) * a.E + e0 + i] = v;
    __threadfence();
  }
  route_finish_if_last<EPL>(a, tok0, ntok, gridDim.x * gridDim.y, s_logits, RouteLoadLogits());
#endif
}

template <typename T, int EPL>
cudaError_t LaunchRouteEpl(const RouteArgs& a, cudaStream_t stream) {
  const bool pdl = DeviceSupportsPdl();
  if (a.router == nullptr) {
    if (a.block_select) {
      const unsigned threads = static_cast<unsigned>((a.E + 31) / 32 * 32);
      return LaunchMaybePdl(route_block_kernel<T>, dim3(static_cast<unsigned>(a.T)),
                            dim3(threads), 0, stream, pdl, a);
    }
    const unsigned blocks = static_cast<unsigned>((a.T + kRouteWarps - 1) / kRouteWarps);
    return LaunchMaybePdl(route_logits_kernel<T, EPL>, dim3(blocks), dim3(kRouteThreads), 0,
                          stream, pdl, a);
  }
  if (a.block_select) {  // route_gemv_block_kernel (LaunchRoute checked the support)
    const int sms = CurrentDeviceAttr<cudaDevAttrMultiProcessorCount>(132);
    const int64_t tiles = (a.T + kRouteTokTile - 1) / kRouteTokTile;
    const int epb = a.E <= sms ? 1 : a.E <= 2 * sms ? 2 : 4;
    // at least 8 blocks: blocks 0..7 of a tile route its tokens (past E they only arrive)
    const unsigned eb =
        static_cast<unsigned>(std::max<int64_t>((a.E + epb - 1) / epb, kRouteTokTile));
    for (int64_t tile0 = 0; tile0 < tiles; tile0 += kRouteMaxTiles) {
      const unsigned n = static_cast<unsigned>(std::min<int64_t>(kRouteMaxTiles, tiles - tile0));
      const dim3 grid(eb, n), block(kRouteBlockMaxExperts);
      cudaError_t err;
      if constexpr (sizeof(T) == 2) {
        err = epb == 1   ? LaunchMaybePdl(route_gemv_block_kernel<T, 1>, grid, block, 0, stream,
                                          pdl, a, tile0)
              : epb == 2 ? LaunchMaybePdl(route_gemv_block_kernel<T, 2>, grid, block, 0, stream,
                                          pdl, a, tile0)
                         : LaunchMaybePdl(route_gemv_block_kernel<T, 4>, grid, block, 0, stream,
                                          pdl, a, tile0);
      } else {
        err = cudaErrorInvalidValue;
      }
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  constexpr bool kMma = sizeof(T) == 2;  // and H % 8 == 0, checked below
  const bool mma = kMma && a.H % 8 == 0;
  const bool cluster = a.k_splits <= kRouteMaxClusterSplits && DeviceIsSm90();
  const unsigned expert_tiles = static_cast<unsigned>((a.E + kRouteExpTile - 1) / kRouteExpTile);
  const unsigned ks = static_cast<unsigned>(a.k_splits);
  const int64_t tiles = (a.T + kRouteTokTile - 1) / kRouteTokTile;
  const size_t smem = static_cast<size_t>(kRouteTokTile) * a.E * sizeof(float);
  const dim3 block(kRouteThreads);
  for (int64_t tile0 = 0; tile0 < tiles; tile0 += kRouteMaxTiles) {
    const unsigned n = static_cast<unsigned>(std::min<int64_t>(kRouteMaxTiles, tiles - tile0));
    cudaError_t err;
    if (cluster) {
      const dim3 grid(ks, expert_tiles, n);
      err = mma ? LaunchClusterMaybePdl(route_cluster_kernel<T, EPL, kMma>, grid, block, smem,
                                        stream, pdl, ks, a, tile0)
                : LaunchClusterMaybePdl(route_cluster_kernel<T, EPL, false>, grid, block, smem,
                                        stream, pdl, ks, a, tile0);
    } else {
      const dim3 grid(expert_tiles, ks, n);
      err = mma ? LaunchMaybePdl(route_fused_kernel<T, EPL, kMma>, grid, block, smem, stream,
                                 pdl, a, tile0)
                : LaunchMaybePdl(route_fused_kernel<T, EPL, false>, grid, block, smem, stream,
                                 pdl, a, tile0);
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Launcher: T is the storage type (float, bf16, f16).
template <typename T>
cudaError_t LaunchRoute(const RouteArgs& a, cudaStream_t stream) {
  if (a.T == 0) return cudaSuccess;
  if (a.E > kRouteMaxExperts || a.p.top_k > kRouteMaxTopK || a.p.num_groups > kRouteMaxGroups ||
      a.k_splits < 1 || a.k_splits > kRouteMaxKSplits)
    return cudaErrorInvalidValue;
  if (a.block_select &&
      (a.router != nullptr ? !RouteGemvBlockSupported(a.E, a.H, a.k_splits, sizeof(T) == 2)
                           : !RouteBlockSupported(a.E) || a.T > 0x7fffffff))
    return cudaErrorInvalidValue;
  if (a.E <= 64) return LaunchRouteEpl<T, 2>(a, stream);
  if (a.E <= 128) return LaunchRouteEpl<T, 4>(a, stream);
  if (a.E <= 256) return LaunchRouteEpl<T, 8>(a, stream);
  return LaunchRouteEpl<T, 32>(a, stream);
}

}  // namespace cuda
}  // namespace jax_moe
