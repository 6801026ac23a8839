// expert_gemv "split" kernels (kernel_variant 7): the few-token decode experts with
// no dependency between blocks. Same outputs as the other variants:
//   y[a] = w_down[e] . h[a],  h[a, r] = act(w_gate[e, r] . x[a / k]) * (w_up[e, r] . x[a / k]).
//
// Why: the stream kernel (expert_gemv_stream.cuh) runs phase 2 only once phase 1 of
// the same segment is done grid-wide; at T = 1 on the narrow shapes (Gemma-4,
// Qwen3) it stayed 1.25-1.35x the floor even with its consumers hollowed out, where a
// plain read of the same bytes takes 1.08-1.11x (RESULTS.md sessions 5, 12).
// Design:
//   * one block per (assignment a, chunk c of kSplitChunk intermediate columns). It
//     reads the chunk's gate and up rows (a warp per row pair, lanes along H), keeps
//     h[a, chunk] in shared memory (rounded to x's dtype, as the other variants store
//     it), then reads w_down[e][:, chunk] (H rows of kSplitChunk columns, a thread per
//     row) and writes its f32 partial of y[a] to scratch: part [T k, I / C, H];
//   * no block waits for another, so the launch is one read of the selected experts'
//     bytes; the price is the partials (T k I / C H f32, through L2) and a second
//     kernel, gemv_split_sum_kernel, PDL-launched: y[a] = sum_c part[a, c] in c order
//     (f32, rounded once to x's dtype) and, with the combine, out[t] = sum_j
//     w[t, j] y[t, j] exactly as combine's kernel sums (f32 products and adds in slot
//     order, no FMA), so the result equals combine(y, w) bitwise;
//   * assignments are not grouped by expert: a token's k experts are distinct, so at
//     T = 1 nothing is read twice; with more tokens an expert that several tokens chose
//     is read once per token (heuristics.expert_gemv_variant picks this kernel only
//     where that was measured to pay);
//   * an id outside [0, E) computes nothing; the sum writes its y row as zeros.
// Deterministic: fixed summation orders, no atomics.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/activation.cuh"
#include "common/cuda_utils.cuh"
#include "common/params.h"  // kSplitChunk (C), GemvScratchCols

namespace jax_moe {
namespace cuda {

constexpr int kSplitThreads = 256;
constexpr int kSplitWarps = kSplitThreads / 32;
constexpr int kSplitMaxVpl = 16;       // 16-byte vectors per lane of a gate/up row: H <= 4096
constexpr int kSplitMaxChunks = 32;    // I / C: the sum kernel's loads per lane
constexpr int kSplitMaxSlots = 16;     // k: the sum kernel's warps (one per slot)

struct GemvSplitArgs {
  const void* x = nullptr;         // [T, H]
  const int32_t* ids = nullptr;    // [T, k]
  const void* w_gate_up = nullptr; // [E, 2I, H]
  const void* w_down = nullptr;    // [E, H, I]
  float* part = nullptr;           // [T k, I / C, H] scratch
  void* y = nullptr;               // [T, k, H]
  const float* combine_w = nullptr;  // [T, k] or null
  void* combine_out = nullptr;       // [T, H] or null
  int T = 0, k = 0, E = 0, H = 0, I = 0;
  int activation = kSilu;
};

// Whether the split kernels take this call (else the caller falls back): 16-bit
// dtypes, no shared experts, the sizes the kernels' fixed register arrays cover.
inline bool SplitSupported(int64_t T, int64_t k, int64_t S, int64_t H, int64_t I,
                           bool is16bit) {
  return is16bit && S == 0 && T >= 1 && k >= 1 && k <= kSplitMaxSlots && H >= 8 && H % 8 == 0 &&
         H <= 256 * kSplitMaxVpl && I >= kSplitChunk && I % kSplitChunk == 0 &&
         I / kSplitChunk <= kSplitMaxChunks && T * k * (I / kSplitChunk) < (int64_t(1) << 31);
}

template <typename T>
__device__ __forceinline__ float dot16b(const uint4& w, const uint4& v) {
  float a[8], b[8];
  Vec16<T>::unpack(w, a);
  Vec16<T>::unpack(v, b);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) s = fmaf(a[i], b[i], s);
  return s;
}

// blockIdx.x = a * (I / C) + c. VPL: 16-byte vectors per lane of a gate/up row
// (H <= 256 VPL). C: intermediate columns per block (kSplitChunk in the library;
// scripts/split_probe.cu also builds 64).
template <typename T, int VPL, int C>
__global__ void __launch_bounds__(kSplitThreads, 2) gemv_split_kernel(GemvSplitArgs a) {
  static_assert(C % 8 == 0 && 2 * C % kSplitWarps == 0 && C % (2 * C / kSplitWarps) == 0,
                "whole 16-byte vectors per w_down row piece; row pairs on one side");
  __shared__ uint4 xs[32 * VPL];
  __shared__ float gu[2 * C];
  __shared__ float hs[C];
  const int nc = a.I / C;
  const int as = blockIdx.x / nc, c = blockIdx.x % nc;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int H = a.H, I = a.I;
  // Launched with programmatic stream serialization: ids and x come from the previous
  // kernel, and the previous call's sum may still read part.
  pdl_wait_prerequisites();
  pdl_launch_dependents();  // the sum's blocks may be scheduled; they wait for us
  const int e = a.ids[as];
  if (e < 0 || e >= a.E) return;  // a dropped id: the sum writes zeros
  const int nv = H / 8;
  const uint4* xv = reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) + size_t(as / a.k) * H);
  for (int v = tid; v < nv; v += kSplitThreads) xs[v] = xv[v];
  __syncthreads();
  // Gate rows c*C .. c*C+C-1, then the matching up rows: 2C rows, 2C / 8 per warp,
  // two at a time (2 VPL loads in flight per lane).
  const T* wg = static_cast<const T*>(a.w_gate_up) + (size_t(e) * 2 * I + size_t(c) * C) * H;
  const T* wu = wg + size_t(I) * H;
  constexpr int kRowsPerWarp = 2 * C / kSplitWarps;
#pragma unroll 1
  for (int q = 0; q < kRowsPerWarp; q += 2) {
    const int r0 = warp * kRowsPerWarp + q;  // C is a multiple of kRowsPerWarp: r0, r0 + 1 on one side
    const T* base = r0 < C ? wg + size_t(r0) * H : wu + size_t(r0 - C) * H;
    const uint4* p0 = reinterpret_cast<const uint4*>(base);
    const uint4* p1 = reinterpret_cast<const uint4*>(base + H);
    uint4 w0[VPL], w1[VPL];
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int v = lane + 32 * i;
      w0[i] = v < nv ? ldg_stream_v4(p0 + v) : make_uint4(0, 0, 0, 0);
      w1[i] = v < nv ? ldg_stream_v4(p1 + v) : make_uint4(0, 0, 0, 0);
    }
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int v = lane + 32 * i;
      if (v < nv) {
        const uint4 xv4 = xs[v];
        s0 += dot16b<T>(w0[i], xv4);
        s1 += dot16b<T>(w1[i], xv4);
      }
    }
    s0 = warp_sum(s0);
    s1 = warp_sum(s1);
    if (lane == 0) { gu[r0] = s0; gu[r0 + 1] = s1; }
  }
  __syncthreads();
  if (tid < C)  // h in x's dtype, as the other variants store it
    hs[tid] = to_float(from_float<T>(activate(a.activation, gu[tid]) * gu[C + tid]));
  __syncthreads();
  // w_down[e][:, chunk]: a thread per row (2C bytes), kRowsAtOnce rows in flight.
  constexpr int kVecs = C / 8;
  constexpr int kRowsAtOnce = 16 / kVecs;
  const T* wd = static_cast<const T*>(a.w_down) + size_t(e) * H * I + size_t(c) * C;
  float* out = a.part + (size_t(as) * nc + c) * H;
  float hreg[C];
#pragma unroll
  for (int i = 0; i < C; ++i) hreg[i] = hs[i];
#pragma unroll 1
  for (int r = tid; r < H; r += kSplitThreads * kRowsAtOnce) {
    uint4 w[kRowsAtOnce][kVecs];
#pragma unroll
    for (int j = 0; j < kRowsAtOnce; ++j) {
      const int row = r + j * kSplitThreads;
      const uint4* p = reinterpret_cast<const uint4*>(wd + size_t(row) * I);
#pragma unroll
      for (int v = 0; v < kVecs; ++v)
        w[j][v] = row < H ? ldg_stream_v4(p + v) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < kRowsAtOnce; ++j) {
      const int row = r + j * kSplitThreads;
      float s = 0.f;
#pragma unroll
      for (int v = 0; v < kVecs; ++v) {
        float f[8];
        Vec16<T>::unpack(w[j][v], f);
#pragma unroll
        for (int i = 0; i < 8; ++i) s = fmaf(f[i], hreg[8 * v + i], s);
      }
      if (row < H) out[row] = s;
    }
  }
}

// One block per (token t, 32 columns), one warp per slot j (blockDim = 32 k): the
// warp sums its assignment's I / C partials in c order into y[t, j] (rounded to x's
// dtype; zeros for a dropped id); then, with the combine, warp 0 sums w[t, j] y[t, j]
// over j in order as combine's kernel does.
template <typename T, int C>
__global__ void __launch_bounds__(32 * kSplitMaxSlots) gemv_split_sum_kernel(GemvSplitArgs a) {
  __shared__ float ys[kSplitMaxSlots][32];
  const int H = a.H, nc = a.I / C;
  const int groups = (H + 31) / 32;
  const int t = blockIdx.x / groups, lane = threadIdx.x & 31, j = threadIdx.x >> 5;
  const int col = (blockIdx.x % groups) * 32 + lane;
  const int as = t * a.k + j;
  pdl_wait_prerequisites();  // part (and ids) from the split kernel
  const int e = a.ids[as];
  const bool live = e >= 0 && e < a.E;
  const float* p = a.part + size_t(as) * nc * H + col;
  float v[kSplitMaxChunks];
#pragma unroll
  for (int c = 0; c < kSplitMaxChunks; ++c)
    v[c] = (live && c < nc && col < H) ? __ldcg(p + size_t(c) * H) : 0.f;
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kSplitMaxChunks; ++c)
    if (c < nc) s += v[c];
  const T yv = from_float<T>(live ? s : 0.f);
  if (col < H) static_cast<T*>(a.y)[size_t(as) * H + col] = yv;
  if (a.combine_out == nullptr) return;
  ys[j][lane] = to_float(yv);
  __syncthreads();
  if (j == 0 && col < H) {
    float acc = 0.f;
    for (int i = 0; i < a.k; ++i)
      acc = __fadd_rn(acc, __fmul_rn(a.combine_w[size_t(t) * a.k + i], ys[i][lane]));
    static_cast<T*>(a.combine_out)[size_t(t) * H + col] = from_float<T>(acc);
  }
}

template <typename T, int VPL, int C>
cudaError_t LaunchGemvSplitVpl(const GemvSplitArgs& a, cudaStream_t stream, bool pdl, bool sum) {
  const unsigned blocks = static_cast<unsigned>(a.T * a.k * (a.I / C));
  cudaError_t err = LaunchMaybePdl(gemv_split_kernel<T, VPL, C>, dim3(blocks),
                                   dim3(kSplitThreads), 0, stream, pdl, a);
  if (err != cudaSuccess || !sum) return err;
  const unsigned sums = static_cast<unsigned>(a.T * ((a.H + 31) / 32));
  return LaunchMaybePdl(gemv_split_sum_kernel<T, C>, dim3(sums), dim3(32 * a.k), 0, stream, pdl,
                        a);
}

// Both kernels (sum = false: the experts kernel alone, for scripts/split_probe.cu);
// the caller checked SplitSupported (for C = kSplitChunk; part holds T k (I / C) H
// floats). VPL: the smallest that covers H.
template <typename T, int C = static_cast<int>(kSplitChunk)>
cudaError_t LaunchGemvSplit(const GemvSplitArgs& a, cudaStream_t stream, bool sum = true) {
  if (a.T == 0) return cudaSuccess;
  const bool pdl = DeviceSupportsPdl();
  const int vpl = (a.H / 8 + 31) / 32;
  if (vpl <= 4) return LaunchGemvSplitVpl<T, 4, C>(a, stream, pdl, sum);
  if (vpl <= 8) return LaunchGemvSplitVpl<T, 8, C>(a, stream, pdl, sum);
  if (vpl <= 12) return LaunchGemvSplitVpl<T, 12, C>(a, stream, pdl, sum);
  return LaunchGemvSplitVpl<T, kSplitMaxVpl, C>(a, stream, pdl, sum);
}

}  // namespace cuda
}  // namespace jax_moe
