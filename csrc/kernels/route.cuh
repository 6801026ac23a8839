// CUDA routing kernels and their launcher. Raw pointers, sizes and a stream in;
// cudaError_t out; no XLA headers.
//
// Logits path (x = logits [T, E]): one launch, one warp per token.
// Fused path (x = hidden [T, H], router [E, H]): still one launch. Block
// (ks, eg, tile) computes the partial router dot products of 8 experts (one per
// warp) over the ks-th slice of H for a tile of 16 tokens, and writes them to the
// scratch buffer partial [k_split, T, E]. The last block to finish a token tile
// (a self-resetting counter per tile) sums the k_split partials in a fixed order
// and runs the selection for that tile. Nothing is accumulated atomically, so the
// result is deterministic.
//
// Selection (one warp per token, E <= 1024): scores (softmax or sigmoid) in f32,
// selection score = score + bias, optional group limit, then top_k rounds of a warp
// arg-max over 64-bit keys (score order, then lower index). The chosen weights are
// renormalized, scaled by scaling_factor and by expert_scale[id].
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
  int k_split = 1;
  float* weights = nullptr;  // [T, k]
  int32_t* ids = nullptr;    // [T, k]
  float* partial = nullptr;  // [k_split, T, E] (fused path)
};

// Warp-wide top-2 merge of selection keys.
__device__ __forceinline__ void warp_top2(unsigned long long& b1, unsigned long long& b2) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    unsigned long long o1 = __shfl_xor_sync(0xffffffffu, b1, o);
    unsigned long long o2 = __shfl_xor_sync(0xffffffffu, b2, o);
    // merge {b1, b2} with {o1, o2}; keys are unique (they carry the index)
    if (o1 > b1) { b2 = (b1 > o2) ? b1 : o2; b1 = o1; }
    else if (o1 > b2) { b2 = o1; }
  }
}

// Routes one token; every lane of the warp calls it. get(e) returns the f32 logit.
// EPL: experts per lane (lane l holds experts l, l+32, ...).
template <int EPL, typename GetLogit>
__device__ void route_token_warp(GetLogit get, int64_t t, const RouteArgs& a) {
  const int lane = threadIdx.x & 31;
  const int E = static_cast<int>(a.E);
  const RouteParams& p = a.p;
  float s[EPL], sel[EPL];
  uint32_t avail = 0;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
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
    const int e = lane + 32 * i;
    sel[i] = s[i] + ((a.bias != nullptr && e < E) ? a.bias[e] : 0.f);
  }

  if (p.num_groups > 1) {
    const int G = E / p.num_groups;
    // Lane g % 32 keeps the key of group g (g < 64: two slots per lane).
    unsigned long long gk[2] = {0ull, 0ull};
    for (int g = 0; g < p.num_groups; ++g) {
      unsigned long long b1 = 0, b2 = 0;
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        const int e = lane + 32 * i;
        if ((avail >> i & 1u) && e / G == g) {
          const unsigned long long k = select_key(sel[i], e);
          if (k > b1) { b2 = b1; b1 = k; } else if (k > b2) { b2 = k; }
        }
      }
      warp_top2(b1, b2);
      // Every lane now has the group's two best keys; recover their scores.
      const int e1 = key_index(b1);
      float v1 = 0.f, v2 = 0.f;
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        const int e = lane + 32 * i;
        if (e == e1) v1 = sel[i];
        if (b2 != 0 && e == key_index(b2)) v2 = sel[i];
      }
      v1 = __shfl_sync(0xffffffffu, v1, e1 & 31);
      v2 = __shfl_sync(0xffffffffu, v2, b2 != 0 ? (key_index(b2) & 31) : 0);
      const float gs = (p.group_score == kGroupMax || b2 == 0) ? v1 : v1 + v2;
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
      const int e = lane + 32 * i;
      if (e < E && !((allowed_groups >> (e / G)) & 1ull)) avail &= ~(1u << i);
    }
  }

  float my_w = 0.f;
  int my_id = 0;
  for (int j = 0; j < p.top_k; ++j) {
    unsigned long long best = 0;
    float best_s = 0.f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      if (avail >> i & 1u) {
        const unsigned long long k = select_key(sel[i], lane + 32 * i);
        if (k > best) { best = k; best_s = s[i]; }
      }
    }
    const unsigned long long win = warp_max_u64(best);
    const int e = key_index(win);
    const float w = __shfl_sync(0xffffffffu, best_s, e & 31);
    if ((e & 31) == lane) avail &= ~(1u << (e >> 5));
    if (lane == j) { my_w = w; my_id = e; }
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
// columns [k0, k1). VEC elements per 16-byte load.
template <typename T>
__device__ __forceinline__ void router_row_dots(const T* __restrict__ w, const T* __restrict__ x,
                                                int64_t H, int ntok, int64_t k0, int64_t k1,
                                                float (&acc)[kRouteTokTile]) {
  const int lane = threadIdx.x & 31;
  constexpr int VEC = Vec16<T>::N;
  if (H % VEC == 0) {
    constexpr int U = 2;  // router rows are short: two 16-byte loads in flight per lane
    for (int64_t k = k0 + lane * VEC; k < k1; k += 32 * VEC * U) {
      float wf[U][VEC];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t kk = k + u * 32 * VEC;
        if (kk < k1) Vec16<T>::unpack(ldg_stream_v4(w + kk), wf[u]);
        else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) wf[u][v] = 0.f;
        }
      }
#pragma unroll
      for (int t = 0; t < kRouteTokTile; ++t) {
        if (t < ntok) {
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int64_t kk = k + u * 32 * VEC;
            if (kk < k1) {
              float xf[VEC];
              Vec16<T>::unpack(ldg_nc_v4(x + t * H + kk), xf);
#pragma unroll
              for (int v = 0; v < VEC; ++v) acc[t] = fmaf(wf[u][v], xf[v], acc[t]);
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

// Fused path. grid = (k_split, ceil(E / 8), tiles in this launch).
template <typename T, int EPL>
__global__ void __launch_bounds__(kRouteThreads) route_fused_kernel(RouteArgs a, int64_t tile0) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ks = blockIdx.x;
  const int e = blockIdx.y * kRouteWarps + warp;
  const int local_tile = blockIdx.z;
  const int64_t tok0 = (tile0 + local_tile) * kRouteTokTile;
  const int ntok = static_cast<int>(a.T - tok0 < kRouteTokTile ? a.T - tok0 : kRouteTokTile);
  constexpr int VEC = Vec16<T>::N;
  const int64_t chunk = ((a.H + a.k_split - 1) / a.k_split + VEC - 1) / VEC * VEC;
  const int64_t k0 = ks * chunk < a.H ? ks * chunk : a.H;
  const int64_t k1 = k0 + chunk < a.H ? k0 + chunk : a.H;

  if (e < a.E) {
    float acc[kRouteTokTile];
#pragma unroll
    for (int t = 0; t < kRouteTokTile; ++t) acc[t] = 0.f;
    router_row_dots<T>(static_cast<const T*>(a.router) + e * a.H,
                       static_cast<const T*>(a.x) + tok0 * a.H, a.H, ntok, k0, k1, acc);
#pragma unroll
    for (int t = 0; t < kRouteTokTile; ++t) {
      const float v = warp_sum(acc[t]);
      if (lane == 0 && t < ntok) a.partial[(ks * a.T + tok0 + t) * a.E + e] = v;
    }
  }

  // Last-arriving block of this token tile runs the selection.
  __shared__ bool is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int total = gridDim.x * gridDim.y;
    const unsigned int prev = atomicAdd(&g_route_tile_arrivals[local_tile], 1u);
    is_last = (prev == total - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int t = warp; t < ntok; t += kRouteWarps) {
    const int64_t tok = tok0 + t;
    route_token_warp<EPL>(
        [&](int ee) {
          float v = 0.f;
          for (int k = 0; k < a.k_split; ++k) v += __ldcg(&a.partial[(k * a.T + tok) * a.E + ee]);
          return v;
        },
        tok, a);
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
  const unsigned egroups = static_cast<unsigned>((a.E + kRouteWarps - 1) / kRouteWarps);
  for (int64_t tile0 = 0; tile0 < tiles; tile0 += kRouteMaxTiles) {
    const unsigned n = static_cast<unsigned>(std::min<int64_t>(kRouteMaxTiles, tiles - tile0));
    dim3 grid(static_cast<unsigned>(a.k_split), egroups, n);
    route_fused_kernel<T, EPL><<<grid, kRouteThreads, 0, stream>>>(a, tile0);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Launcher: T is the storage type (float, bf16, f16).
template <typename T>
cudaError_t LaunchRoute(const RouteArgs& a, cudaStream_t stream) {
  if (a.T == 0) return cudaSuccess;
  if (a.E > kRouteMaxExperts || a.p.top_k > kRouteMaxTopK || a.p.num_groups > kRouteMaxGroups ||
      a.k_split < 1 || a.k_split > 65535)
    return cudaErrorInvalidValue;
  if (a.E <= 64) return LaunchRouteEpl<T, 2>(a, stream);
  if (a.E <= 256) return LaunchRouteEpl<T, 8>(a, stream);
  return LaunchRouteEpl<T, 32>(a, stream);
}

}  // namespace cuda
}  // namespace jax_moe
