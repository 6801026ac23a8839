// CUDA expert GEMV for decode: y[a] = down(act(gate) * up) for each assignment
// a = t * (k + S) + j, expert ids[t, j] for j < k and shared expert j - k after them
// (GemvAssign, common/params.h). Raw pointers, sizes and a stream in; cudaError_t
// out; no XLA headers.
//
// Two launches, both "grouped GEMV" over the distinct experts the routing selected:
//   phase 1: w_gate_up[e] (2I x H) times the x rows of e's tokens, activation fused,
//            h [T*k, I] written in the storage type;
//   phase 2: w_down[e] (H x I) times the h rows of e's assignments -> y [T*k, H].
// Block (row tile, slot s) finds the s-th smallest selected expert itself (a bitmap
// of ids in shared memory), lists that expert's assignments in ascending order, and
// streams its rows of the weight ONCE for all of them: each weight byte is read once
// per call however many tokens chose the expert (up to 8 * NT tokens per pass; more
// take extra passes). Slots past the number of selected experts exit at once.
//
// Fast path (bf16/f16, H and I multiples of 8): tensor-core mma.sync m16n8k16 with
// the weight tile as A (16 rows x 32 columns per step, loaded straight from global
// memory as 16-byte vectors: each lane's 8 consecutive columns serve as its fragment
// under a fixed permutation of k that B uses too) and up to 8 tokens per n-tile as
// B. The 8 warps of a block split K (k_split ways) and rows (8 / k_split tiles of
// 16 rows); partial sums meet in shared memory and are added in a fixed order, so
// results are deterministic. Generic path (f32, or sizes not multiples of 8): one
// warp per row, scalar loads, same work decomposition.
//
// Phase 2 is launched with programmatic dependent launch (sm_90): its blocks find
// their expert and list their assignments while phase 1 finishes, then wait.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/activation.cuh"
#include "common/cuda_utils.cuh"
#include "common/mma.cuh"
#include "common/params.h"
#include "kernels/combine.cuh"
#include "kernels/expert_gemv_group.cuh"
#include "kernels/expert_gemv_split.cuh"
#include "kernels/expert_gemv_stream.cuh"

namespace jax_moe {
namespace cuda {

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvChunk = 32;      // K columns per mma step pair (4 lanes x 8 values)
constexpr int kGemvUnroll = 4;      // K chunks loaded before the first mma of a batch
constexpr int kGemvGenericRows = kGemvWarps;  // generic path: one row per warp

struct GemvPhaseArgs {
  const void* src = nullptr;    // B rows: x [T, H] (phase 1) or h [T*kk, I] (phase 2)
  GemvAssign assign;            // expert of each assignment (kk = k + S slots per token)
  const void* w = nullptr;      // w_gate_up [E, 2I, H] (phase 1) or w_down [E, H, I]
  const void* w_shared = nullptr;  // the shared experts' [S, ...] (experts E .. E+S-1)
  void* out = nullptr;          // h [T*kk, I] (phase 1) or y [T*kk, H] (phase 2)
  int64_t num_assign = 0;       // T * kk; phase 1: token of assignment a is a / kk
  int64_t rows = 0;             // output rows per expert: I or H
  int64_t K = 0;                // reduction length: H or I
  int k_split = 1;              // warps along K in the fast path (1, 2, 4, 8)
  int activation = kSilu;
  bool zero_dropped = false;    // phase 2: write zero rows for ids outside [0, E)
};

// ---- block prologue: which expert does this slot serve, and its assignments -----

// Returns the expert of slot `slot` (the slot-th smallest selected expert), or -1.
// bitmap: ceil(E / 32) words of shared memory.
__device__ int slot_expert(const GemvPhaseArgs& a, int slot, uint32_t* bitmap) {
  __shared__ int s_expert;
  const int E = a.assign.total_experts();
  const int words = (E + 31) >> 5;
  for (int i = threadIdx.x; i < words; i += blockDim.x) bitmap[i] = 0u;
  if (threadIdx.x == 0) s_expert = -1;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < a.num_assign; i += blockDim.x) {
    const int e = a.assign.expert(i);
    if (e >= 0 && e < E) atomicOr(&bitmap[e >> 5], 1u << (e & 31));
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int before = 0;
    for (int base = 0; base < words; base += 32) {
      const uint32_t w = (base + lane < words) ? bitmap[base + lane] : 0u;
      const int cnt = __popc(w);
      int incl = cnt;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      const int excl = before + incl - cnt;
      if (slot >= excl && slot < excl + cnt) {
        const int bit = __fns(w, 0, slot - excl + 1);
        s_expert = ((base + lane) << 5) + bit;
      }
      before += __shfl_sync(0xffffffffu, incl, 31);
    }
  }
  __syncthreads();
  return s_expert;
}

// Lists, in ascending order, the assignments of expert e with rank in
// [first, first + cap) among e's assignments. Returns e's total assignment count.
__device__ int list_assignments(const GemvPhaseArgs& a, int e, int first, int cap,
                                int* list) {
  __shared__ int s_warp_count[kGemvWarps];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int running = 0;
  for (int64_t base = 0; base < a.num_assign; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const bool match = i < a.num_assign && a.assign.expert(i) == e;
    const uint32_t ballot = __ballot_sync(0xffffffffu, match);
    if (lane == 0) s_warp_count[warp] = __popc(ballot);
    __syncthreads();
    int warp_off = 0, total = 0;
    for (int w = 0; w < kGemvWarps; ++w) {
      const int c = s_warp_count[w];
      if (w < warp) warp_off += c;
      total += c;
    }
    if (match) {
      const int rank = running + warp_off + __popc(ballot & ((1u << lane) - 1u));
      if (rank >= first && rank < first + cap) list[rank - first] = static_cast<int>(i);
    }
    running += total;
    __syncthreads();
  }
  return running;
}

// ---- fast path: tensor cores --------------------------------------------------------

template <bool PF>
__device__ __forceinline__ uint4 load_or_zero(const void* p, bool ok) {
  if (!ok) return make_uint4(0u, 0u, 0u, 0u);
  return PF ? ldg_stream_pf_v4(p) : ldg_stream_v4(p);
}
__device__ __forceinline__ uint4 load_b_or_zero(const void* p, bool ok) {
  return ok ? ldg_nc_v4(p) : make_uint4(0u, 0u, 0u, 0u);
}

// grid = (row tiles of 16 * (8 / k_split) rows, slots). NT n-tiles of 8 tokens;
// U chunks of 32 columns loaded per batch; PF: L2 256-byte prefetch hint.
template <typename T, int NT, bool GATED, int U = kGemvUnroll, bool PF = false>
__global__ void __launch_bounds__(kGemvThreads)
gemv_mma_kernel(GemvPhaseArgs a) {
  constexpr int MATS = GATED ? 2 : 1;
  constexpr int CAP = NT * 8;
  extern __shared__ uint32_t dyn_smem[];  // expert bitmap
  __shared__ int list[CAP];
  __shared__ float red[kGemvWarps][MATS][NT][16][8];

  pdl_launch_dependents();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
  const int wr_count = kGemvWarps / a.k_split;
  const int wr = warp % wr_count, ks = warp / wr_count;
  const int64_t tile_rows = 16 * wr_count;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * tile_rows;
  const int slot = blockIdx.y;
  T* out = static_cast<T*>(a.out);

  if (a.zero_dropped && slot == 0) {  // ids outside [0, E): zero rows of y
    for (int64_t i = 0; i < a.num_assign; ++i) {
      const int e = a.assign.expert(i);
      if (e >= 0) continue;  // expert() gives -1 for every id outside [0, E)
      for (int64_t r = row0 + threadIdx.x; r < row0 + tile_rows && r < a.rows; r += blockDim.x)
        out[i * a.rows + r] = from_float<T>(0.f);
    }
  }
  const int e = slot_expert(a, slot, dyn_smem);
  if (e < 0) return;

  // This warp's rows and K chunks.
  const int64_t r_lo = row0 + wr * 16 + g, r_hi = r_lo + 8;
  const bool ok_lo = r_lo < a.rows, ok_hi = r_hi < a.rows;
  const int64_t mat_rows = GATED ? 2 * a.rows : a.rows;
  const T* wbase = expert_weights<T>(a.w, a.w_shared, a.assign.num_experts, e, mat_rows * a.K);
  const T* wg_lo = wbase + r_lo * a.K;
  const T* wg_hi = wbase + r_hi * a.K;
  const T* wu_lo = wbase + (a.rows + r_lo) * a.K;  // up rows (GATED only)
  const T* wu_hi = wbase + (a.rows + r_hi) * a.K;
  const int64_t nchunks = (a.K + kGemvChunk - 1) / kGemvChunk;
  const int64_t per_warp = (nchunks + a.k_split - 1) / a.k_split;
  const int64_t ch0 = ks * per_warp;
  const int64_t ch1 = (ch0 + per_warp < nchunks) ? ch0 + per_warp : nchunks;

  const T* src = static_cast<const T*>(a.src);
  bool waited = false;
  for (int first = 0;; first += CAP) {
    const int count = list_assignments(a, e, first, CAP, list);
    const int n = count - first < CAP ? count - first : CAP;
    if (n <= 0) break;
    const T* brow[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int idx = nt * 8 + g;
      if (idx < n) {
        const int64_t asg = list[idx];
        const int64_t srow = GATED ? asg / a.assign.slots() : asg;
        brow[nt] = src + srow * a.K;
      } else {
        brow[nt] = nullptr;
      }
    }
    if (!waited) {  // phase 2 reads h from phase 1: wait for it (no-op otherwise)
      pdl_wait_prerequisites();
      waited = true;
    }
    float acc[MATS][NT][4];
#pragma unroll
    for (int m = 0; m < MATS; ++m)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[m][nt][i] = 0.f;

    for (int64_t ch = ch0; ch < ch1; ch += U) {
      uint4 alo[MATS][U], ahi[MATS][U], b[NT][U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t col = (ch + u) * kGemvChunk + 8 * c;
        const bool in = (ch + u < ch1) && col < a.K;
        alo[0][u] = load_or_zero<PF>(wg_lo + col, in && ok_lo);
        ahi[0][u] = load_or_zero<PF>(wg_hi + col, in && ok_hi);
        if (GATED) {
          alo[MATS - 1][u] = load_or_zero<PF>(wu_lo + col, in && ok_lo);
          ahi[MATS - 1][u] = load_or_zero<PF>(wu_hi + col, in && ok_hi);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t col = (ch + u) * kGemvChunk + 8 * c;
        const bool in = (ch + u < ch1) && col < a.K;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          b[nt][u] = load_b_or_zero(brow[nt] + col, in && brow[nt] != nullptr);
      }
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          if (nt * 8 < n) {
#pragma unroll
            for (int m = 0; m < MATS; ++m) mma_chunk<T>(acc[m][nt], alo[m][u], ahi[m][u], b[nt][u]);
          }
        }
    }

    // Partial sums to shared memory: C fragment (g, 2c..2c+1) and (g+8, 2c..2c+1).
#pragma unroll
    for (int m = 0; m < MATS; ++m)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        red[warp][m][nt][g][2 * c] = acc[m][nt][0];
        red[warp][m][nt][g][2 * c + 1] = acc[m][nt][1];
        red[warp][m][nt][g + 8][2 * c] = acc[m][nt][2];
        red[warp][m][nt][g + 8][2 * c + 1] = acc[m][nt][3];
      }
    __syncthreads();
    // Sum the k_split partials in order; rows fastest so stores coalesce.
    const int outputs = wr_count * NT * 8 * 16;
    for (int o = threadIdx.x; o < outputs; o += blockDim.x) {
      const int row = o & 15;
      const int tok = (o >> 4) & 7;
      const int nt = (o >> 7) % NT;
      const int owr = (o >> 7) / NT;
      const int idx = nt * 8 + tok;
      const int64_t r = row0 + owr * 16 + row;
      if (idx >= n || r >= a.rows) continue;
      float v0 = 0.f, v1 = 0.f;
      for (int k = 0; k < a.k_split; ++k) {
        const int src_warp = k * wr_count + owr;
        v0 += red[src_warp][0][nt][row][tok];
        if (GATED) v1 += red[src_warp][MATS - 1][nt][row][tok];
      }
      const float v = GATED ? activate(a.activation, v0) * v1 : v0;
      out[static_cast<int64_t>(list[idx]) * a.rows + r] = from_float<T>(v);
    }
    __syncthreads();
    if (count - first <= CAP) break;
  }
}

// ---- generic path: any float type and size ------------------------------------------

// grid = (ceil(rows / 8), slots); warp w computes row blockIdx.x * 8 + w.
template <typename T, bool GATED>
__global__ void __launch_bounds__(kGemvThreads)
gemv_generic_kernel(GemvPhaseArgs a) {
  constexpr int CAP = 32;
  extern __shared__ uint32_t dyn_smem[];
  __shared__ int list[CAP];
  pdl_launch_dependents();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kGemvGenericRows;
  const int slot = blockIdx.y;
  T* out = static_cast<T*>(a.out);
  if (a.zero_dropped && slot == 0) {
    for (int64_t i = 0; i < a.num_assign; ++i) {
      const int e = a.assign.expert(i);
      if (e >= 0) continue;  // expert() gives -1 for every id outside [0, E)
      for (int64_t r = row0 + threadIdx.x; r < row0 + kGemvGenericRows && r < a.rows;
           r += blockDim.x)
        out[i * a.rows + r] = from_float<T>(0.f);
    }
  }
  const int e = slot_expert(a, slot, dyn_smem);
  if (e < 0) return;
  const int64_t r = row0 + warp;
  const int64_t mat_rows = GATED ? 2 * a.rows : a.rows;
  const T* wbase = expert_weights<T>(a.w, a.w_shared, a.assign.num_experts, e, mat_rows * a.K);
  const T* wg = wbase + r * a.K;
  const T* wu = wbase + (a.rows + r) * a.K;
  const T* src = static_cast<const T*>(a.src);
  bool waited = false;
  for (int first = 0;; first += CAP) {
    const int count = list_assignments(a, e, first, CAP, list);
    const int n = count - first < CAP ? count - first : CAP;
    if (n <= 0) break;
    if (!waited) {
      pdl_wait_prerequisites();
      waited = true;
    }
    if (r < a.rows) {
      for (int t0 = 0; t0 < n; t0 += 8) {
        float accg[8], accu[8];
        const T* brow[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          accg[t] = 0.f;
          accu[t] = 0.f;
          const int idx = t0 + t;
          brow[t] = idx < n ? src + (GATED ? list[idx] / a.assign.slots() : list[idx]) * a.K : nullptr;
        }
        for (int64_t col = lane; col < a.K; col += 32) {
          const float wgv = to_float(wg[col]);
          const float wuv = GATED ? to_float(wu[col]) : 0.f;
#pragma unroll
          for (int t = 0; t < 8; ++t) {
            if (brow[t] != nullptr) {
              const float xv = to_float(brow[t][col]);
              accg[t] = fmaf(wgv, xv, accg[t]);
              if (GATED) accu[t] = fmaf(wuv, xv, accu[t]);
            }
          }
        }
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          const float g = warp_sum(accg[t]);
          const float u = GATED ? warp_sum(accu[t]) : 0.f;
          if (lane == t && brow[t] != nullptr) {
            const float v = GATED ? activate(a.activation, g) * u : g;
            out[static_cast<int64_t>(list[t0 + t]) * a.rows + r] = from_float<T>(v);
          }
        }
      }
    }
    __syncthreads();  // list is rewritten by the next pass
    if (count - first <= CAP) break;
  }
}

// ---- launcher -----------------------------------------------------------------------

// Weight-streaming variants of gemv_mma_kernel (benchmarks/bench_gemv.py --variants):
//   1 direct: 4 chunks of 32 columns per batch;
//   3 direct_pf: + L2 256-byte prefetch hint;
//   4 direct_pf8 (auto): + 8 chunks per batch.
// Also measured and removed (RESULTS.md): a cp.async ring through shared memory; an
// L2 prefetch of the first batch issued as soon as the expert is known (before the
// assignment listing and the PDL wait), with 8 or 4 chunks per batch (10-25% slower
// than 4); and double-buffered batches of 4 chunks (20-40% slower than 4). Every
// variant with fewer than 8 chunks' loads issued at once lost to 4.
// Measured on H100 (benchmarks/RESULTS.md): 4 streams at 2.6-3.0 TB/s where 1 got
// 2.0-2.3; a cp.async ring through shared memory (once variant 2) was slower than 1.
//   5 stream: the persistent bulk-copy kernels of expert_gemv_stream.cuh (sm_90, T*k <=
//     512, E <= 1024); where they cannot run, 5 falls back to 4;
//   6 the same with the wide ring (kStreamColsWide columns per slot: long rows);
//   7 split: the dependency-free kernels of expert_gemv_split.cuh (16-bit, no shared
//     experts, SplitSupported sizes; h is their f32 partials' scratch, so it has
//     GemvScratchCols(H, I, 7) elements per assignment); elsewhere 7 falls back to 5;
//   8 group: the kernel of expert_gemv_group.cuh, G blocks per assignment that share
//     h through the scratch, one block per SM (sm_90, 16-bit, no shared experts,
//     GroupSupported sizes); elsewhere 8 falls back to 5.
enum GemvVariant : int {
  kGemvAuto = 0, kGemvDirect = 1, kGemvDirectPf = 3, kGemvDirectPf8 = 4, kGemvStream = 5,
  kGemvStreamWide = 6, kGemvSplit = kGemvSplitVariant, kGemvGroup = 8
};

struct ExpertGemvArgs {
  const void* x = nullptr;       // [T, H]
  const int32_t* ids = nullptr;  // [T, k]
  const void* w_gate_up = nullptr;
  const void* w_down = nullptr;
  const void* shared_gate_up = nullptr;  // [S, 2I, H]: slots k .. k+S-1 of every token
  const void* shared_down = nullptr;     // [S, H, I]
  void* h = nullptr;             // [T*(k+S), I] scratch
  void* y = nullptr;             // [T, k+S, H]
  int64_t T = 0, k = 0, H = 0, I = 0, E = 0;
  int64_t S = 0;                 // shared experts
  int activation = kSilu;
  int token_tiles = 1;           // NT: 1, 2 or 4 (tokens per pass = 8 * NT)
  int k_split_gate_up = 8;       // 1, 2, 4 or 8
  int k_split_down = 8;
  int variant = kGemvAuto;
  // Optional weighted combine of y (both set, or both null): out [T, H] in y's dtype
  // = sum_j combine_w[t, j] * y[t, j], as combine.cuh computes it: combine's kernel
  // after the experts, or, with combine_in_kernel, inside the stream kernel where it
  // takes the size (StreamCombineSupported).
  const float* combine_w = nullptr;  // [T, k+S] f32
  void* combine_out = nullptr;
  bool combine_in_kernel = false;
};

inline int MaxSmemPerBlock() {
  return CurrentDeviceAttr<cudaDevAttrMaxSharedMemoryPerBlockOptin>(48 * 1024);
}

template <typename... KArgs, typename... Args>
cudaError_t LaunchEx(void (*kernel)(KArgs...), dim3 grid, size_t smem, cudaStream_t stream,
                     bool pdl, Args... args) {
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  return LaunchMaybePdl(kernel, grid, dim3(kGemvThreads), smem, stream, pdl, args...);
}

template <typename T, int NT, int U, bool PF>
cudaError_t LaunchDirect(const GemvPhaseArgs& p1, const GemvPhaseArgs& p2, dim3 g1, dim3 g2,
                         size_t bitmap_smem, cudaStream_t stream, bool pdl2, bool do1, bool do2) {
  cudaError_t err = cudaSuccess;
  if (do1) err = LaunchEx(gemv_mma_kernel<T, NT, true, U, PF>, g1, bitmap_smem, stream, false, p1);
  if (err != cudaSuccess || !do2) return err;
  return LaunchEx(gemv_mma_kernel<T, NT, false, U, PF>, g2, bitmap_smem, stream, pdl2, p2);
}

template <typename T, int NT>
cudaError_t LaunchGemvPhases(const GemvPhaseArgs& p1, const GemvPhaseArgs& p2, dim3 g1, dim3 g2,
                             size_t bitmap_smem, cudaStream_t stream, bool pdl, int variant) {
  const bool pdl2 = pdl && g1.x > 0;
  if (variant == kGemvDirect)
    return LaunchDirect<T, NT, 4, false>(p1, p2, g1, g2, bitmap_smem, stream, pdl2, true, true);
  if (variant == kGemvDirectPf)
    return LaunchDirect<T, NT, 4, true>(p1, p2, g1, g2, bitmap_smem, stream, pdl2, true, true);
  return LaunchDirect<T, NT, 8, true>(p1, p2, g1, g2, bitmap_smem, stream, pdl2, true, true);
}

// *fused: the combine ran inside the launch.
template <typename T>
cudaError_t LaunchExpertGemvKernels(const ExpertGemvArgs& a, cudaStream_t stream, bool* fused) {
  *fused = false;
  const int64_t kk = a.k + a.S;  // slots per token
  const int64_t num_assign = a.T * kk;
  const int64_t experts = a.E + a.S;
  if (num_assign == 0 || a.H == 0) return cudaSuccess;
  if (a.E < 1 || a.S < 0 || experts > 65535) return cudaErrorInvalidValue;
  GemvPhaseArgs p1, p2;
  p1.assign.ids = a.ids;
  p1.assign.k = static_cast<int>(a.k);
  p1.assign.num_shared = static_cast<int>(a.S);
  p1.assign.num_experts = static_cast<int>(a.E);
  p1.src = a.x;  p1.w = a.w_gate_up;  p1.w_shared = a.shared_gate_up;  p1.out = a.h;
  p1.num_assign = num_assign;  p1.rows = a.I;  p1.K = a.H;
  p1.k_split = a.k_split_gate_up;  p1.activation = a.activation;
  p2 = p1;
  p2.src = a.h;  p2.w = a.w_down;  p2.w_shared = a.shared_down;  p2.out = a.y;
  p2.rows = a.H;  p2.K = a.I;  p2.k_split = a.k_split_down;  p2.zero_dropped = true;
  const unsigned slots = static_cast<unsigned>(num_assign < experts ? num_assign : experts);
  const size_t bitmap_smem = static_cast<size_t>((experts + 31) / 32) * sizeof(uint32_t);
  const bool pdl = DeviceSupportsPdl();
  const bool mma_ok = sizeof(T) == 2 && a.H % 8 == 0 && a.I % 8 == 0;
  int variant = a.variant;
  if (variant == kGemvSplit) {
    if constexpr (sizeof(T) == 2) {
      if (SplitSupported(a.T, a.k, a.S, a.H, a.I, true)) {
        GemvSplitArgs s;
        s.x = a.x;  s.ids = a.ids;  s.w_gate_up = a.w_gate_up;  s.w_down = a.w_down;
        s.part = static_cast<float*>(a.h);  s.y = a.y;
        s.combine_w = a.combine_w;  s.combine_out = a.combine_out;
        s.T = static_cast<int>(a.T);  s.k = static_cast<int>(a.k);  s.E = static_cast<int>(a.E);
        s.H = static_cast<int>(a.H);  s.I = static_cast<int>(a.I);  s.activation = a.activation;
        *fused = a.combine_out != nullptr;
        return LaunchGemvSplit<T>(s, stream);
      }
    }
    variant = kGemvStream;  // where the split kernels do not run
  }
  if (variant == kGemvGroup) {
    if constexpr (sizeof(T) == 2) {
      if (GroupSupported(a.T, a.k, a.S, a.H, a.I, true, DeviceIsSm90())) {
        GemvGroupArgs g;
        g.x = a.x;  g.ids = a.ids;  g.w_gate_up = a.w_gate_up;  g.w_down = a.w_down;
        g.h = a.h;  g.y = a.y;
        g.T = static_cast<int>(a.T);  g.k = static_cast<int>(a.k);  g.E = static_cast<int>(a.E);
        g.H = static_cast<int>(a.H);  g.I = static_cast<int>(a.I);  g.activation = a.activation;
        g.G = GroupBlocks(a.T, a.k, CurrentDeviceAttr<cudaDevAttrMultiProcessorCount>(132));
        *fused = a.combine_out != nullptr && a.combine_in_kernel;
        g.combine_w = *fused ? a.combine_w : nullptr;
        g.combine_out = *fused ? a.combine_out : nullptr;
        return LaunchGemvGroup<T>(g, stream);
      }
    }
    variant = kGemvStream;  // where the group kernel does not run
  }
  if constexpr (sizeof(T) == 2) {
    const bool wide = variant == kGemvStreamWide;
    if ((variant == kGemvStream || wide) &&
        StreamSupported(num_assign, experts, a.H, a.I, mma_ok, DeviceIsSm90(), MaxSmemPerBlock(),
                        wide)) {
      *fused = a.combine_out != nullptr && a.combine_in_kernel &&
               StreamCombineSupported(a.T, kk, a.H);
      return LaunchGemvStream<T>(a.x, p1.assign, a.w_gate_up, a.w_down, a.shared_gate_up,
                                 a.shared_down, a.h, a.y, a.T, a.H, a.I, a.activation, wide,
                                 *fused ? a.combine_w : nullptr,
                                 *fused ? a.combine_out : nullptr, stream);
    }
  }
  if (mma_ok) {
    auto ks_ok = [](int ks) { return ks == 1 || ks == 2 || ks == 4 || ks == 8; };
    if (!ks_ok(p1.k_split) || !ks_ok(p2.k_split)) return cudaErrorInvalidValue;
    const int64_t rows1 = 16 * (kGemvWarps / p1.k_split), rows2 = 16 * (kGemvWarps / p2.k_split);
    // I == 0: no gate_up work; y is down(empty) = 0, written by phase 2 alone.
    dim3 g1(static_cast<unsigned>((a.I + rows1 - 1) / rows1), slots);
    dim3 g2(static_cast<unsigned>((a.H + rows2 - 1) / rows2), slots);
    const int v = variant;
    if constexpr (sizeof(T) == 2) {
      switch (a.token_tiles) {
        case 1: return LaunchGemvPhases<T, 1>(p1, p2, g1, g2, bitmap_smem, stream, pdl, v);
        case 2: return LaunchGemvPhases<T, 2>(p1, p2, g1, g2, bitmap_smem, stream, pdl, v);
        case 4: return LaunchGemvPhases<T, 4>(p1, p2, g1, g2, bitmap_smem, stream, pdl, v);
        default: return cudaErrorInvalidValue;
      }
    }
  }
  dim3 g1(static_cast<unsigned>((a.I + kGemvGenericRows - 1) / kGemvGenericRows), slots);
  dim3 g2(static_cast<unsigned>((a.H + kGemvGenericRows - 1) / kGemvGenericRows), slots);
  cudaError_t err = LaunchEx(gemv_generic_kernel<T, true>, g1, bitmap_smem, stream, false, p1);
  if (err != cudaSuccess) return err;
  return LaunchEx(gemv_generic_kernel<T, false>, g2, bitmap_smem, stream, pdl && g1.x > 0, p2);
}

template <typename T>
cudaError_t LaunchExpertGemv(const ExpertGemvArgs& a, cudaStream_t stream) {
  if ((a.combine_w == nullptr) != (a.combine_out == nullptr)) return cudaErrorInvalidValue;
  bool fused = false;
  cudaError_t err = LaunchExpertGemvKernels<T>(a, stream, &fused);
  if (err != cudaSuccess || a.combine_out == nullptr || fused || a.T == 0 || a.H == 0) return err;
  CombineArgs c;
  c.y = a.y;
  c.weights = a.combine_w;
  c.out = a.combine_out;
  c.T = a.T;
  c.k = a.k + a.S;
  c.H = a.H;
  return LaunchCombine<T, float, T>(c, stream);
}

}  // namespace cuda
}  // namespace jax_moe
