// CUDA weighted combine and its launcher. Raw pointers, sizes and a stream in;
// cudaError_t out; no XLA headers.
//
//   out[t, :] = sum_j weights[t, j] * row(t, j)      j = 0 .. k-1, in that order
//   row(t, j) = y[t, j, :]          (index == nullptr, y [T, k, H])
//             = y[index[t, j], :]   (y [N, H]; an index outside [0, N) is skipped
//                                    and never dereferenced)
//
// Work item = (token, column chunk). A block of kCombineThreads threads takes one
// item; thread i owns VPT 16-byte vectors of the chunk (columns i, i + 128, ...,
// in vectors), so a warp reads 512 contiguous bytes of a row per vector step. Per
// group of KC rows a thread first loads the KC indices and weights (same address
// across the block: broadcast loads into registers), then issues all KC x VPT
// vector loads, then accumulates them in row order: up to 8 loads in flight per
// thread with no shared memory and no synchronization. Accumulation is f32,
// multiply then add with explicit rounding (no FMA contraction), as reference.py
// and the CPU handler do it; each output element is written by one thread once,
// so the result is deterministic.
//
// Rows take the 16-byte path when H is a multiple of the vector width (8 for
// 16-bit y, 4 for f32) and y and out are 16-byte aligned, so that every row start
// is aligned; otherwise a scalar path with the same structure runs.
#pragma once

#include <climits>
#include <cstdint>
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"

namespace jax_moe {
namespace cuda {

// 128 threads: short blocks that the scheduler spreads evenly (T = 1, H = 7168
// bf16 gives 7 blocks on 7 SMs); at large T many small blocks per SM keep enough
// loads in flight without needing a grid-stride pipeline.
constexpr int kCombineThreads = 128;
// 16-byte loads in flight per thread (rows x vectors). At the ~6 blocks per SM
// that ~80 registers allow, 8 x 16 B per thread is ~96 KB in flight per SM,
// several times what Little's law asks for at H100 HBM rate and latency.
constexpr int kCombineLoadsInFlight = 8;
// Blocks per launch; the kernel grid-strides over items beyond this.
constexpr int64_t kCombineMaxGrid = INT_MAX;

struct CombineArgs {
  const void* y = nullptr;          // [T, k, H] or [N, H]
  const void* weights = nullptr;    // [T, k], f32 or y's dtype
  const int32_t* index = nullptr;   // [T, k] or null
  void* out = nullptr;              // [T, H]
  int64_t T = 0, k = 0, H = 0;
  int64_t N = 0;                    // rows of y when index != null
};

// A unit is what one load reads: a 16-byte vector (kVec) or one element.
template <typename Y, bool kVec> struct CombineUnit;

template <typename Y> struct CombineUnit<Y, true> {
  static constexpr int N = Vec16<Y>::N;
  using Raw = uint4;
  __device__ __forceinline__ static Raw load(const Y* p) { return ldg_stream_v4(p); }
  __device__ __forceinline__ static void unpack(const Raw& r, float* f) { Vec16<Y>::unpack(r, f); }
};

template <typename Y> struct CombineUnit<Y, false> {
  static constexpr int N = 1;
  using Raw = Y;
  __device__ __forceinline__ static Raw load(const Y* p) { return __ldg(p); }
  __device__ __forceinline__ static void unpack(const Raw& r, float* f) { f[0] = to_float(r); }
};

__device__ __forceinline__ uint32_t bits16(bf16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ uint32_t bits16(f16 v) { return __half_as_ushort(v); }

template <typename O>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return bits16(from_float<O>(lo)) | (bits16(from_float<O>(hi)) << 16);
}

// Stores N floats as O at dst (aligned to N * sizeof(O) bytes when N > 1).
template <typename O, int N>
__device__ __forceinline__ void store_unit(O* dst, const float* f) {
  if constexpr (N == 1) {
    *dst = from_float<O>(f[0]);
  } else if constexpr (sizeof(O) == 4) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i)
      reinterpret_cast<float4*>(dst)[i] = make_float4(f[4 * i], f[4 * i + 1], f[4 * i + 2],
                                                      f[4 * i + 3]);
  } else if constexpr (N == 8) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(pack2<O>(f[0], f[1]), pack2<O>(f[2], f[3]),
                                                pack2<O>(f[4], f[5]), pack2<O>(f[6], f[7]));
  } else {
    static_assert(N == 4, "16-bit output of a 4-wide (f32) vector");
    *reinterpret_cast<uint2*>(dst) = make_uint2(pack2<O>(f[0], f[1]), pack2<O>(f[2], f[3]));
  }
}

// One token's 8 columns of the weighted sum as combine_kernel computes it, for a sum
// fused into the kernel that wrote y (the stream and group kernels of expert_gemv):
// acc[e] = sum_j wt[j] * yt[j H + e] over j < k, f32, each product rounded before the
// add, in slot order (the same bits). y is read from L2 (written in the same launch),
// up to 8 slots in flight; yt points at slot 0's first column, 16-byte aligned.
template <typename T>
__device__ __forceinline__ void sum_slots8_l2(const T* yt, const float* wt, int k, int64_t H,
                                              float* acc) {
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.f;
  for (int j0 = 0; j0 < k; j0 += 8) {
    uint4 r[8];
    float wj[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const bool in = j0 + j < k;
      wj[j] = in ? __ldg(wt + j0 + j) : 0.f;
      r[j] = in ? ldg_cg_v4(yt + static_cast<int64_t>(j0 + j) * H) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j0 + j >= k) continue;
      float f[8];
      Vec16<T>::unpack(r[j], f);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = __fadd_rn(acc[e], __fmul_rn(wj[j], f[e]));
    }
  }
}

// units: loads per row (H / vector width, or H); chunks: column chunks per token.
template <typename Y, typename W, typename O, bool kVec, int VPT, int KC>
__global__ void __launch_bounds__(kCombineThreads)
combine_kernel(CombineArgs a, int64_t units, int64_t chunks) {
  using U = CombineUnit<Y, kVec>;
  constexpr int N = U::N;
  const Y* __restrict__ y = static_cast<const Y*>(a.y);
  const W* __restrict__ w = static_cast<const W*>(a.weights);
  O* __restrict__ out = static_cast<O*>(a.out);
  const int64_t items = a.T * chunks;
  // Launched with programmatic stream serialization (sm_90): wait for the kernel
  // that wrote y before reading it.
  pdl_wait_prerequisites();

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t t = item / chunks;
    const int64_t u0 = (item - t * chunks) * (kCombineThreads * VPT) + threadIdx.x;
    const int64_t col0 = u0 * N;
    bool live[VPT];
#pragma unroll
    for (int v = 0; v < VPT; ++v) live[v] = u0 + v * kCombineThreads < units;

    float acc[VPT][N];
#pragma unroll
    for (int v = 0; v < VPT; ++v)
#pragma unroll
      for (int e = 0; e < N; ++e) acc[v][e] = 0.f;

    // Per-token bases: slot j of token t is weights_t[j], index_t[j], dense_t + j * H.
    const int k = static_cast<int>(a.k);
    const W* wt = w + t * a.k;
    const int32_t* it = a.index != nullptr ? a.index + t * a.k : nullptr;
    const Y* dense_t = it == nullptr ? y + t * a.k * a.H + col0 : y;
    for (int j0 = 0; j0 < k; j0 += KC) {
      // Indices and weights of this group first, all independent loads (a weight
      // load must not wait on its index), then the rows they select; null = past
      // k or an index outside [0, N).
      int32_t ix[KC];
      float wj[KC];
#pragma unroll
      for (int j = 0; j < KC; ++j) {
        ix[j] = 0;
        wj[j] = 0.f;
        if (j0 + j < k) {
          if (it != nullptr) ix[j] = __ldg(it + j0 + j);
          wj[j] = to_float(__ldg(wt + j0 + j));
        }
      }
      // This thread's first unit in each selected row; its other units sit at
      // constant offsets (immediates in the loads).
      const Y* row[KC];
#pragma unroll
      for (int j = 0; j < KC; ++j) {
        row[j] = nullptr;
        if (j0 + j < k) {
          if (it == nullptr) row[j] = dense_t + static_cast<int64_t>(j0 + j) * a.H;
          else if (ix[j] >= 0 && ix[j] < a.N) row[j] = y + static_cast<int64_t>(ix[j]) * a.H + col0;
        }
      }
      typename U::Raw raw[KC][VPT];
#pragma unroll
      for (int j = 0; j < KC; ++j)
#pragma unroll
        for (int v = 0; v < VPT; ++v)
          if (row[j] != nullptr && live[v]) raw[j][v] = U::load(row[j] + v * kCombineThreads * N);
#pragma unroll
      for (int j = 0; j < KC; ++j)
#pragma unroll
        for (int v = 0; v < VPT; ++v)
          if (row[j] != nullptr && live[v]) {
            float f[N];
            U::unpack(raw[j][v], f);
#pragma unroll
            for (int e = 0; e < N; ++e) acc[v][e] = __fadd_rn(acc[v][e], __fmul_rn(wj[j], f[e]));
          }
    }
    O* dst = out + t * a.H + col0;
#pragma unroll
    for (int v = 0; v < VPT; ++v)
      if (live[v]) store_unit<O, N>(dst + v * kCombineThreads * N, acc[v]);
  }
}

template <typename Y, typename W, typename O, bool kVec, int VPT, int KC>
cudaError_t LaunchCombineCfg(const CombineArgs& a, int64_t units, cudaStream_t stream) {
  static_assert(!kVec || VPT * KC <= kCombineLoadsInFlight,
                "too many 16-byte loads in flight per thread");
  const int64_t per_block = static_cast<int64_t>(kCombineThreads) * VPT;
  const int64_t chunks = (units + per_block - 1) / per_block;
  const int64_t items = a.T * chunks;
  if (items == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(items < kCombineMaxGrid ? items : kCombineMaxGrid);
  // Programmatic dependent launch where the device has it: the blocks may start
  // while the previous kernel (expert_gemv's stream kernel triggers early) finishes.
  return LaunchMaybePdl(combine_kernel<Y, W, O, kVec, VPT, KC>, dim3(grid), dim3(kCombineThreads),
                        0, stream, DeviceSupportsPdl(), a, units, chunks);
}

inline bool IsAligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Launcher. Y: storage type of y (float, bf16, f16); W: of weights (float or Y);
// O: of out. T == 0 or H == 0 launches nothing.
template <typename Y, typename W, typename O>
cudaError_t LaunchCombine(const CombineArgs& a, cudaStream_t stream) {
  if (a.T < 0 || a.k < 0 || a.k > INT_MAX || a.H < 0 || a.N < 0) return cudaErrorInvalidValue;
  if (a.T == 0 || a.H == 0) return cudaSuccess;
  constexpr int VN = Vec16<Y>::N;
  if (a.H % VN != 0 || !IsAligned16(a.y) || !IsAligned16(a.out)) {
    // Scalar path: 4 columns x 8 rows of 2-4 byte loads in flight per thread.
    return LaunchCombineCfg<Y, W, O, false, 4, 8>(a, a.H, stream);
  }
  const int64_t units = a.H / VN;
  // Vectors per thread x rows per group: at least 4 (k = 1) and else 8 loads in
  // flight per thread, without predicated-off rows when k is small.
  if (a.k <= 1) return LaunchCombineCfg<Y, W, O, true, 4, 1>(a, units, stream);
  if (a.k == 2) return LaunchCombineCfg<Y, W, O, true, 4, 2>(a, units, stream);
  if (a.k <= 4) return LaunchCombineCfg<Y, W, O, true, 2, 4>(a, units, stream);
  return LaunchCombineCfg<Y, W, O, true, 1, 8>(a, units, stream);
}

}  // namespace cuda
}  // namespace jax_moe
