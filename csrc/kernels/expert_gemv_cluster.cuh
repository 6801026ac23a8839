// expert_gemv "cluster" kernel (sm_90, kernel_variant 8): one thread-block cluster of
// CS blocks per assignment; the blocks share h through distributed shared memory.
// Same outputs as the other variants:
//   y[a] = w_down[e] . h[a],  h[a, r] = act(w_gate[e, r] . x[a / k]) * (w_up[e, r] . x[a / k]).
//
// Why: at T = 1 on the narrow shapes (Gemma-4, Qwen3) the stream kernel stays at
// 1.4-1.5x the floor where a plain read of the same bytes takes 1.08-1.11x
// (RESULTS.md s12, s21). The split kernels (variant 7) removed the stream kernel's
// grid-wide phase dependency and still took 1.4-1.6x: each of their blocks reads
// w_down[e][:, 32 columns], 64-byte pieces of rows 1408 bytes apart (s21-1). Here a
// block reads whole rows in both phases, and the phase dependency is one cluster
// barrier among the CS blocks of one expert, not a grid-wide counter:
//   * cluster q = assignment a (token a / k, expert ids[a]); block rank r of CS;
//   * phase 1: rank r computes h for intermediate rows [r I/CS, (r+1) I/CS) (a warp
//     per gate/up row pair, lanes along H, x from shared memory) and keeps them in
//     its shared memory, rounded to x's dtype as the other variants store h;
//   * each warp issues its first w_down loads (they do not depend on h), then the
//     cluster barrier; every block copies the other ranks' slices of h out of their
//     shared memory (DSMEM), so each block holds all of h[a];
//   * phase 2: rank r computes y[a, rows] for w_down rows [r H/CS, (r+1) H/CS): a warp
//     takes 4 whole rows at a time (contiguous 4 I elements), lanes along them; the
//     next group's loads are issued before the current group's arithmetic;
//   * a second cluster barrier (arrived after the copy, waited at exit) keeps each
//     block's shared memory alive until the others have read it.
// With T * k * CS blocks of one block per SM each, the work is even across blocks:
// at T = 1 with k = 8 and CS = 16, 128 blocks on 132 SMs, no queue, no atomics.
// Assignments are not grouped by expert: an expert chosen by several tokens is read
// once per token (heuristics.expert_gemv_variant picks this kernel at T = 1 only).
// Deterministic: fixed summation orders, no atomics. An id outside [0, E) gives zeros.
#pragma once

#include <cooperative_groups.h>
#include <cstdint>
#include <cuda_runtime.h>

#include "common/activation.cuh"
#include "common/cuda_utils.cuh"
#include "common/params.h"

namespace jax_moe {
namespace cuda {

constexpr int kClusterThreads = 512;
constexpr int kClusterWarps = kClusterThreads / 32;
// The register arrays' sizes: 12 vectors per lane fit 128 registers (512 threads, one
// block per SM) with no spills; 16 spilled (ptxas, both phases).
constexpr int kClusterMaxVpl = 12;     // 16-byte vectors per lane of a gate/up row: H <= 3072
constexpr int kClusterDownRows = 4;    // w_down rows per warp step
constexpr int kClusterMaxDvpl = 12;    // 16-byte vectors per lane of a 4-row step: I <= 768
constexpr int kClusterMaxI = 32 * kClusterMaxDvpl * 8 / kClusterDownRows;

struct GemvClusterArgs {
  const void* x = nullptr;         // [T, H]
  const int32_t* ids = nullptr;    // [T, k]
  const void* w_gate_up = nullptr; // [E, 2I, H]
  const void* w_down = nullptr;    // [E, H, I]
  void* y = nullptr;               // [T, k, H]
  int T = 0, k = 0, E = 0, H = 0, I = 0;
  int activation = kSilu;
};

// Whether the cluster kernel takes this call (else the caller falls back): 16-bit
// dtypes, no shared experts, the sizes its fixed register arrays cover, sm_90.
inline bool ClusterSupported(int64_t T, int64_t k, int64_t S, int64_t H, int64_t I,
                             bool is16bit, bool sm90) {
  return sm90 && is16bit && S == 0 && T >= 1 && k >= 1 && H >= 8 && H % 8 == 0 &&
         H <= 256 * kClusterMaxVpl && I >= 8 && I % 8 == 0 && I <= kClusterMaxI &&
         T * k * 16 < (int64_t(1) << 31);
}

__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

template <typename T>
__device__ __forceinline__ float dot8(const uint4& w, const float* v) {
  float f[8];
  Vec16<T>::unpack(w, f);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) s = fmaf(f[i], v[i], s);
  return s;
}

// VPL: 16-byte vectors per lane of a gate/up row (H <= 256 VPL); DVPL: per lane of a
// 4-row w_down step (I <= 64 DVPL); CS: blocks per cluster.
template <typename T, int VPL, int DVPL, int CS>
__global__ void __launch_bounds__(kClusterThreads, 1) gemv_cluster_kernel(GemvClusterArgs a) {
  __shared__ uint4 xs[32 * VPL];
  __shared__ __align__(16) T hs[64 * DVPL];  // h[a]: I <= 64 DVPL
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int as = blockIdx.x / CS;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int H = a.H, I = a.I;
  const int i_per = (I + CS - 1) / CS, h_per = (H + CS - 1) / CS;
  const int i0 = min(I, rank * i_per), i1 = min(I, i0 + i_per);
  const int r0 = min(H, rank * h_per), r1 = min(H, r0 + h_per);
  T* const y = static_cast<T*>(a.y) + size_t(as) * H;
  // Launched with programmatic stream serialization: ids and x come from the
  // previous kernel; a PDL-launched consumer still waits for our completion.
  pdl_wait_prerequisites();
  pdl_launch_dependents();
  const int e = a.ids[as];
  if (e < 0 || e >= a.E) {  // the whole cluster takes this branch: no barrier waits
    for (int r = r0 + tid; r < r1; r += kClusterThreads) y[r] = from_float<T>(0.f);
    return;
  }
  const int nv = H / 8;
  const uint4* xv = reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) + size_t(as / a.k) * H);
  for (int v = tid; v < nv; v += kClusterThreads) xs[v] = xv[v];
  __syncthreads();
  // Phase 1: rows i0 .. i1-1 of gate and up, a warp per row pair.
  const T* wg = static_cast<const T*>(a.w_gate_up) + size_t(e) * 2 * I * H;
  const T* wu = wg + size_t(I) * H;
#pragma unroll 1
  for (int r = i0 + warp; r < i1; r += kClusterWarps) {
    const uint4* pg = reinterpret_cast<const uint4*>(wg + size_t(r) * H);
    const uint4* pu = reinterpret_cast<const uint4*>(wu + size_t(r) * H);
    uint4 g[VPL], u[VPL];
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int v = lane + 32 * i;
      g[i] = v < nv ? ldg_stream_v4(pg + v) : make_uint4(0, 0, 0, 0);
      u[i] = v < nv ? ldg_stream_v4(pu + v) : make_uint4(0, 0, 0, 0);
    }
    float sg = 0.f, su = 0.f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int v = lane + 32 * i;
      if (v < nv) {
        float xf[8];
        Vec16<T>::unpack(xs[v], xf);
        sg += dot8<T>(g[i], xf);
        su += dot8<T>(u[i], xf);
      }
    }
    sg = warp_sum(sg);
    su = warp_sum(su);
    if (lane == 0) hs[r] = from_float<T>(activate(a.activation, sg) * su);
  }
  // Phase 2's first loads: a warp's step covers rows q .. q+3 (4 I contiguous
  // elements); lane element j = lane + 32 i of the step is row j / nvi, vector j % nvi.
  const int nvi = I / 8, nstep = kClusterDownRows * nvi;
  const T* wd = static_cast<const T*>(a.w_down) + size_t(e) * H * I;
  const int steps = (r1 - r0 + kClusterDownRows - 1) / kClusterDownRows;
  auto load_step = [&](int s, uint4* w) {
    const int q = r0 + s * kClusterDownRows;
    const int rows = min(kClusterDownRows, r1 - q);
    const uint4* p = reinterpret_cast<const uint4*>(wd + size_t(q) * I);
#pragma unroll
    for (int i = 0; i < DVPL; ++i) {
      const int j = lane + 32 * i;
      w[i] = (s < steps && j < rows * nvi) ? ldg_stream_v4(p + j) : make_uint4(0, 0, 0, 0);
    }
  };
  uint4 cur[DVPL], nxt[DVPL];
  load_step(warp, cur);
  // h: make this block's slice visible to the cluster, then gather the others'.
  cluster_arrive();
  cluster_wait();
#pragma unroll 1
  for (int src = 1; src < CS; ++src) {
    const int q = (rank + src) % CS;
    const int q0 = min(I, q * i_per), q1 = min(I, q0 + i_per);
    const T* remote = cluster.map_shared_rank(hs, q);
    for (int i = q0 + tid; i < q1; i += kClusterThreads) hs[i] = remote[i];
  }
  cluster_arrive();  // our reads of the others' shared memory are done
  __syncthreads();
  // Phase 2: y[a, q .. q+3] for this warp's steps, the next step's loads in flight.
  const uint4* hv = reinterpret_cast<const uint4*>(hs);
#pragma unroll 1
  for (int s = warp; s < steps; s += kClusterWarps) {
    load_step(s + kClusterWarps, nxt);
    float acc[kClusterDownRows] = {};
#pragma unroll
    for (int i = 0; i < DVPL; ++i) {
      const int j = lane + 32 * i;
      if (j < nstep) {
        const int row = j / nvi, col = j - row * nvi;
        float hf[8];
        Vec16<T>::unpack(hv[col], hf);
        const float d = dot8<T>(cur[i], hf);
#pragma unroll
        for (int q = 0; q < kClusterDownRows; ++q) acc[q] += row == q ? d : 0.f;
      }
    }
    const int q = r0 + s * kClusterDownRows;
#pragma unroll
    for (int rr = 0; rr < kClusterDownRows; ++rr) {
      const float v = warp_sum(acc[rr]);
      if (lane == rr && q + rr < r1) y[q + rr] = from_float<T>(v);
    }
#pragma unroll
    for (int i = 0; i < DVPL; ++i) cur[i] = nxt[i];
  }
  cluster_wait();  // keep our h slice alive until every rank has copied it
}

template <typename T, int VPL, int DVPL, int CS>
cudaError_t LaunchGemvClusterCs(const GemvClusterArgs& a, cudaStream_t stream, bool pdl) {
  auto kernel = gemv_cluster_kernel<T, VPL, DVPL, CS>;
  if (CS > 8) {  // allow the non-portable cluster size, once per device and instantiation
    static bool allowed[64] = {};
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    if (dev < 0 || dev >= 64 || !allowed[dev]) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
      if (err != cudaSuccess) return err;
      if (dev >= 0 && dev < 64) allowed[dev] = true;
    }
  }
  const unsigned blocks = static_cast<unsigned>(a.T * a.k * CS);
  return LaunchClusterMaybePdl(kernel, dim3(blocks), dim3(kClusterThreads), 0, stream, pdl,
                               static_cast<unsigned>(CS), a);
}

template <typename T, int VPL, int CS>
cudaError_t LaunchGemvClusterVpl(const GemvClusterArgs& a, cudaStream_t stream, bool pdl) {
  const int dvpl = (kClusterDownRows * (a.I / 8) + 31) / 32;
  if (dvpl <= 4) return LaunchGemvClusterCs<T, VPL, 4, CS>(a, stream, pdl);
  if (dvpl <= 8) return LaunchGemvClusterCs<T, VPL, 8, CS>(a, stream, pdl);
  return LaunchGemvClusterCs<T, VPL, kClusterMaxDvpl, CS>(a, stream, pdl);
}

// The caller checked ClusterSupported. CS: blocks per cluster (16, or 8 for the probe).
template <typename T, int CS = 16>
cudaError_t LaunchGemvCluster(const GemvClusterArgs& a, cudaStream_t stream) {
  if (a.T == 0) return cudaSuccess;
  const bool pdl = DeviceSupportsPdl();
  const int vpl = (a.H / 8 + 31) / 32;
  if (vpl <= 4) return LaunchGemvClusterVpl<T, 4, CS>(a, stream, pdl);
  if (vpl <= 8) return LaunchGemvClusterVpl<T, 8, CS>(a, stream, pdl);
  return LaunchGemvClusterVpl<T, kClusterMaxVpl, CS>(a, stream, pdl);
}

}  // namespace cuda
}  // namespace jax_moe
