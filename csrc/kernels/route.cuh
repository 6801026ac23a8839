// CUDA routing kernels and their launcher. Raw pointers, sizes and a stream in;
// cudaError_t out; no XLA headers.
//
// Logits path (x = logits [T, E]): one launch, one warp per token.
// Fused path (x = hidden [T, H], router [E, H]): still one launch. Block (e, tile)
// computes expert e's router dot products for a tile of 16 tokens, its 8 warps
// splitting H and meeting in shared memory (fixed order), and writes the logits to
// the scratch buffer [T, E]. The last block to finish a token tile (a
// self-resetting counter per tile) runs the selection for that tile. Nothing is
// accumulated atomically, so the result is deterministic.
//
// Selection (one warp per token, E <= 1024): lane l holds experts
// [l * EPL, (l + 1) * EPL). Scores (softmax or sigmoid) in f32, selection score =
// score + bias (NaN counts as -inf), optional group limit (when a group spans whole
// lanes, its top-2 is a local top-2 plus a few shuffles), then top_k rounds of a
// warp float max, ties to the lowest lane (= lowest expert index). The chosen
// weights are renormalized, scaled by scaling_factor and by expert_scale[id].
#pragma once

#include <algorithm>
#include <cstdint>
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "common/params.h"

namespace jax_moe {
namespace cuda {

constexpr int kRouteWarps = 8;
constexpr int kRouteThreads = kRouteWarps * 32;
constexpr int kRouteTokTile = 16;    // tokens per block in the fused path
constexpr int kRouteMaxExperts = 1024;
constexpr int kRouteMaxTopK = 32;
constexpr int kRouteMaxGroups = 64;
constexpr int kRouteMaxTiles = 4096;  // token tiles per launch (one counter each)

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
  float* logits = nullptr;   // [T, E] scratch (fused path)
  int experts_per_block = 1; // fused path: 1, 2, 4 or 8
};

__device__ __forceinline__ float sel_value(float v) { return v != v ? -INFINITY : v; }

// Warp arg-max over (value, has) pairs: returns the winning lane (the lowest lane
// among equal values) or -1 when no lane has a candidate.
__device__ __forceinline__ int warp_argmax_lane(float v, bool has) {
  const float m = warp_max(has ? v : -INFINITY);
  const uint32_t b = __ballot_sync(0xffffffffu, has && v == m);
  return b ? __ffs(b) - 1 : -1;
}

// Routes one token; every lane of the warp calls it. get(e) returns the f32 logit.
template <int EPL, typename GetLogit>
__device__ void route_token_warp(GetLogit get, int64_t t, const RouteArgs& a) {
  const int lane = threadIdx.x & 31;
  const int E = static_cast<int>(a.E);
  const RouteParams& p = a.p;
  const int e0 = lane * EPL;
  float s[EPL], sel[EPL];
  uint32_t avail = 0;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = e0 + i;
    s[i] = (e < E) ? get(e) : -INFINITY;
    if (e < E) avail |= 1u << i;
  }
  if (p.scoring == kSoftmax) {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < EPL; ++i) m = fmaxf(m, s[i]);
    m = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      s[i] = (avail >> i & 1u) ? expf(s[i] - m) : 0.f;
      sum += s[i];
    }
    const float inv = 1.0f / warp_sum(sum);
#pragma unroll
    for (int i = 0; i < EPL; ++i) s[i] *= inv;
  } else {
#pragma unroll
    for (int i = 0; i < EPL; ++i) s[i] = 1.0f / (1.0f + expf(-s[i]));
  }
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = e0 + i;
    sel[i] = sel_value(s[i] + ((a.bias != nullptr && e < E) ? a.bias[e] : 0.f));
  }

  if (p.num_groups > 1) {
    const int G = E / p.num_groups;
    const int lanes_per_group = G / EPL;
    unsigned long long allowed_groups = 0ull;
    if (G % EPL == 0 && lanes_per_group >= 1 && (32 % lanes_per_group) == 0 &&
        E == 32 * EPL) {
      // Each group is lanes_per_group whole lanes: local top-2, then xor-shuffles.
      float b1 = -INFINITY, b2 = -INFINITY;
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        if (sel[i] > b1) { b2 = b1; b1 = sel[i]; } else if (sel[i] > b2) { b2 = sel[i]; }
      }
      for (int o = 1; o < lanes_per_group; o <<= 1) {
        const float o1 = __shfl_xor_sync(0xffffffffu, b1, o);
        const float o2 = __shfl_xor_sync(0xffffffffu, b2, o);
        if (o1 > b1) { b2 = fmaxf(b1, o2); b1 = o1; } else { b2 = fmaxf(b2, o1); }
      }
      const bool leader = (lane % lanes_per_group) == 0;
      float gs = (p.group_score == kGroupMax || G < 2) ? b1 : b1 + b2;
      gs = sel_value(gs);
      bool has = leader;
      for (int r = 0; r < p.top_groups; ++r) {
        const int w = warp_argmax_lane(gs, has);
        allowed_groups |= 1ull << (w / lanes_per_group);
        if (lane == w) has = false;
      }
    } else {
      // General layout: one warp reduction per group.
      unsigned long long gk[2] = {0ull, 0ull};
      for (int g = 0; g < p.num_groups; ++g) {
        float b1 = -INFINITY, b2 = -INFINITY;
        int n = 0;
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
          const int e = e0 + i;
          if ((avail >> i & 1u) && e / G == g) {
            ++n;
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
        (void)n;
      }
      for (int r = 0; r < p.top_groups; ++r) {
        unsigned long long best = gk[0] > gk[1] ? gk[0] : gk[1];
        best = warp_max_u64(best);
        const int g = key_index(best);
        allowed_groups |= 1ull << g;
        if ((g & 31) == lane) gk[g >> 5] = 0ull;
      }
    }
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = e0 + i;
      if (e < E && !((allowed_groups >> (e / G)) & 1ull)) avail &= ~(1u << i);
    }
  }

  // top_k rounds: each lane keeps its best available candidate.
  float my_w = 0.f;
  int my_id = 0;
  for (int j = 0; j < p.top_k; ++j) {
    float best = -INFINITY;
    int bi = -1;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      if ((avail >> i & 1u) && (bi < 0 || sel[i] > best)) { best = sel[i]; bi = i; }
    }
    const int w = warp_argmax_lane(best, bi >= 0);
    const int bi_w = __shfl_sync(0xffffffffu, bi, w);
    float sw = 0.f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) if (i == bi) sw = s[i];
    const float wv = __shfl_sync(0xffffffffu, sw, w);
    if (lane == w) avail &= ~(1u << bi);
    if (lane == j) { my_w = wv; my_id = w * EPL + bi_w; }
  }
  const float wsum = warp_sum(lane < p.top_k ? my_w : 0.f);
  if (lane < p.top_k) {
    float w = my_w;
    if (p.renormalize) w = w * (1.0f / (wsum + kRenormEps));
    w *= p.scaling_factor;
    if (a.scale != nullptr) w *= a.scale[my_id];
    a.weights[t * p.top_k + lane] = w;
    a.ids[t * p.top_k + lane] = my_id;
  }
}

// Logits path: warp w of block b routes token b * kRouteWarps + w.
template <typename T, int EPL>
__global__ void __launch_bounds__(kRouteThreads) route_logits_kernel(RouteArgs a) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
  if (t >= a.T) return;
  const T* row = static_cast<const T*>(a.x) + t * a.E;
  route_token_warp<EPL>([&](int e) { return to_float(row[e]); }, t, a);
}

// Partial dot products of one router row with up to kRouteTokTile token rows over
// columns [k0, k1). VEC elements per 16-byte load; all of a lane's loads are issued
// before the first use (a warp's slice is at most a few loads per lane).
template <typename T>
__device__ __forceinline__ void router_row_dots(const T* __restrict__ w, const T* __restrict__ x,
                                                int64_t H, int ntok, int64_t k0, int64_t k1,
                                                float (&acc)[kRouteTokTile]) {
  const int lane = threadIdx.x & 31;
  constexpr int VEC = Vec16<T>::N;
  if (H % VEC == 0) {
    constexpr int U = 4;
    for (int64_t k = k0 + lane * VEC; k < k1; k += 32 * VEC * U) {
      uint4 wv[U];  // raw vectors: unpacked at use, to keep registers for acc
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t kk = k + u * 32 * VEC;
        // __ldg (not asm volatile): the compiler may batch these loads
        wv[u] = kk < k1 ? __ldg(reinterpret_cast<const uint4*>(w + kk)) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int t = 0; t < kRouteTokTile; ++t) {
        if (t < ntok) {
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int64_t kk = k + u * 32 * VEC;
            if (kk < k1) {
              float wf[VEC], xf[VEC];
              Vec16<T>::unpack(wv[u], wf);
              Vec16<T>::unpack(__ldg(reinterpret_cast<const uint4*>(x + t * H + kk)), xf);
#pragma unroll
              for (int v = 0; v < VEC; ++v) acc[t] = fmaf(wf[v], xf[v], acc[t]);
            }
          }
        }
      }
    }
  } else {  // rows not 16-byte aligned: scalar loads
    for (int64_t k = k0 + lane; k < k1; k += 32) {
      const float wv = to_float(w[k]);
#pragma unroll
      for (int t = 0; t < kRouteTokTile; ++t)
        if (t < ntok) acc[t] = fmaf(wv, to_float(x[t * H + k]), acc[t]);
    }
  }
}

// Fused path. grid = (ceil(E / EB), tiles in this launch): block b computes experts
// b*EB .. b*EB+EB-1, each by 8/EB warps splitting H. More experts per block share
// the tokens' rows through L1 (each block otherwise reads the whole x tile from L2).
template <typename T, int EPL>
__global__ void __launch_bounds__(kRouteThreads) route_fused_kernel(RouteArgs a, int64_t tile0,
                                                                    int eb) {
  __shared__ float part[kRouteWarps][kRouteTokTile];
  __shared__ bool is_last;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wpe = kRouteWarps / eb;  // warps per expert
  const int e = blockIdx.x * eb + warp / wpe;
  const int slice = warp % wpe;
  const int local_tile = blockIdx.y;
  const int64_t tok0 = (tile0 + local_tile) * kRouteTokTile;
  const int ntok = static_cast<int>(a.T - tok0 < kRouteTokTile ? a.T - tok0 : kRouteTokTile);
  constexpr int VEC = Vec16<T>::N;
  const int64_t chunk = ((a.H + wpe - 1) / wpe + VEC - 1) / VEC * VEC;
  const int64_t k0 = slice * chunk < a.H ? slice * chunk : a.H;
  const int64_t k1 = k0 + chunk < a.H ? k0 + chunk : a.H;

  float acc[kRouteTokTile];
#pragma unroll
  for (int t = 0; t < kRouteTokTile; ++t) acc[t] = 0.f;
  if (e < a.E)
    router_row_dots<T>(static_cast<const T*>(a.router) + e * a.H,
                       static_cast<const T*>(a.x) + tok0 * a.H, a.H, ntok, k0, k1, acc);
#pragma unroll
  for (int t = 0; t < kRouteTokTile; ++t) {
    const float v = warp_sum(acc[t]);
    if (lane == 0) part[warp][t] = v;
  }
  __syncthreads();
  for (int o = threadIdx.x; o < eb * ntok; o += blockDim.x) {
    const int j = o / ntok, t = o % ntok;
    const int ej = blockIdx.x * eb + j;
    if (ej >= a.E) continue;
    float v = 0.f;
    for (int w = 0; w < wpe; ++w) v += part[j * wpe + w][t];
    a.logits[(tok0 + t) * a.E + ej] = v;
  }

  // Last-arriving block of this token tile runs the selection.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int prev = atomicAdd(&g_route_tile_arrivals[local_tile], 1u);
    is_last = (prev == gridDim.x - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int t = warp; t < ntok; t += kRouteWarps) {
    const int64_t tok = tok0 + t;
    const float* row = a.logits + tok * a.E;
    route_token_warp<EPL>([&](int ee) { return __ldcg(row + ee); }, tok, a);
  }
  if (threadIdx.x == 0) g_route_tile_arrivals[local_tile] = 0u;
}

template <typename T, int EPL>
cudaError_t LaunchRouteEpl(const RouteArgs& a, cudaStream_t stream) {
  if (a.router == nullptr) {
    const unsigned blocks = static_cast<unsigned>((a.T + kRouteWarps - 1) / kRouteWarps);
    route_logits_kernel<T, EPL><<<blocks, kRouteThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  const int64_t tiles = (a.T + kRouteTokTile - 1) / kRouteTokTile;
  for (int64_t tile0 = 0; tile0 < tiles; tile0 += kRouteMaxTiles) {
    const unsigned n = static_cast<unsigned>(std::min<int64_t>(kRouteMaxTiles, tiles - tile0));
    dim3 grid(static_cast<unsigned>((a.E + a.experts_per_block - 1) / a.experts_per_block), n);
    route_fused_kernel<T, EPL><<<grid, kRouteThreads, 0, stream>>>(a, tile0, a.experts_per_block);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Launcher: T is the storage type (float, bf16, f16).
template <typename T>
cudaError_t LaunchRoute(const RouteArgs& a, cudaStream_t stream) {
  if (a.T == 0) return cudaSuccess;
  const int eb = a.experts_per_block;
  if (a.E > kRouteMaxExperts || a.p.top_k > kRouteMaxTopK || a.p.num_groups > kRouteMaxGroups ||
      !(eb == 1 || eb == 2 || eb == 4 || eb == 8))
    return cudaErrorInvalidValue;
  if (a.E <= 64) return LaunchRouteEpl<T, 2>(a, stream);
  if (a.E <= 128) return LaunchRouteEpl<T, 4>(a, stream);
  if (a.E <= 256) return LaunchRouteEpl<T, 8>(a, stream);
  return LaunchRouteEpl<T, 32>(a, stream);
}

}  // namespace cuda
}  // namespace jax_moe
