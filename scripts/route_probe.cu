// Standalone probe of the route kernels (kernels/route.cuh), no JAX: times
// back-to-back launches replayed from a CUDA graph (router weights rotated over
// enough copies to miss L2) for the library's kernels, for stage-limited copies of
// the cluster kernel (which leave out the selection, the finishing block, or
// everything after the GEMM, so the time of each stage is a difference). Also
// prints a %globaltimer timeline of one launch of the full copy and the clock64
// cycles of the selection's phases (one warp, one token). The block-selection kernels
// of session 23 (RouteArgs::block_select: the logits path's one block per token, and
// the fused route_gemv_block_kernel) are timed beside the warp and cluster kernels,
// and their ids and weights compared with those kernels'. For quick device runs;
// the numbers we report come from benchmarks/bench_route.py. (The A/B against the
// selection of before session 8, RESULTS.md session 8, used this file as of commit
// 699ad13, which compiled the old selection in beside the new one.)
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -Icsrc scripts/route_probe.cu -o build/route_probe
//   build/route_probe [T,...] [launches]        e.g. 1,8,16 64
//     T in [1, 64]; launches per graph in [1, 4096]
// Environment (checked before any CUDA call): ROUTE_PROBE_COPIES router copies in
// [1, 64] (default 32: cold in L2; 1: hot), ROUTE_PROBE_NOBIAS=1 (no correction
// bias in the DeepSeek-V3 case).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/route.cuh"
#include "probe_util.cuh"

using namespace jax_moe;
using namespace jax_moe::cuda;

const char* const kProbeName = "route_probe";

__device__ __forceinline__ unsigned long long gtime() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

constexpr int kEv = 6;  // entry, gemm done, cluster reduced, arrived, logits loaded, end
__device__ unsigned long long g_trace[1025][kEv];  // [1024]: the finishing block

__global__ void empty_kernel(int) { pdl_launch_dependents(); pdl_wait_prerequisites(); }

// The cluster kernel of route.cuh, cut after stage STOP (0: the whole kernel, 1: no
// selection (the finishing block loads the logits and writes one value), 2: no
// finishing block (stop after storing the logits), 3: GEMM only (each block stores
// its own partials, no cluster exchange)). TRACE records the timeline.
template <typename T, int EPL, int STOP, bool TRACE>
__global__ void __launch_bounds__(kRouteThreads) probe_cluster(RouteArgs a, int64_t tile0) {
  constexpr int kOut = kRouteExpTile * kRouteTokTile;
  __shared__ float red[kRouteWarps][kRouteExpTile][kRouteTokTile];
  __shared__ float inbox[kRouteMaxClusterSplits][kOut];
  extern __shared__ float s_logits[];
  const int bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  if (TRACE && threadIdx.x == 0) g_trace[bid][0] = gtime();
  pdl_launch_dependents();
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int ks = a.k_splits;
  const int per = (kOut + ks - 1) / ks;
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * kRouteExpTile;
  const int64_t tok0 = (tile0 + blockIdx.z) * kRouteTokTile;
  const int ntok = static_cast<int>(a.T - tok0 < kRouteTokTile ? a.T - tok0 : kRouteTokTile);
  route_block_dot<T, true>(a, e0, tok0, ntok, rank, red);
  __syncthreads();
  if (TRACE && threadIdx.x == 0) g_trace[bid][1] = gtime();
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
  if (STOP == 3) {
    if (threadIdx.x < kOut) {
      const int i = threadIdx.x % kRouteExpTile, t = threadIdx.x / kRouteExpTile;
      if (e0 + i < a.E && t < ntok)
        a.partial[(rank * a.T + tok0 + t) * a.E + e0 + i] = route_sum_warps(red, threadIdx.x);
    }
    return;
  }
  if (threadIdx.x < kOut) {
    const int o = threadIdx.x, owner = o / per;
    float* dst = cluster.map_shared_rank(&inbox[rank][o - owner * per], owner);
    *dst = route_sum_warps(red, o);
  }
  cluster.sync();
  if (threadIdx.x < per && rank * per + static_cast<int>(threadIdx.x) < kOut) {
    const int o = rank * per + threadIdx.x;
    const int i = o % kRouteExpTile, t = o / kRouteExpTile;
    float v = 0.f;
    for (int r = 0; r < ks; ++r) v += inbox[r][threadIdx.x];
    if (e0 + i < a.E && t < ntok) a.partial[(tok0 + t) * a.E + e0 + i] = v;
    __threadfence();
  }
  if (TRACE && threadIdx.x == 0) g_trace[bid][2] = gtime();
  if (STOP == 2) return;
  __syncthreads();
  int last = 0;
  if (threadIdx.x == 0)
    last = atomicAdd(&g_route_tile_arrivals[blockIdx.z], 1u) == gridDim.x * gridDim.y - 1;
  if (!__syncthreads_or(last)) return;
  if (TRACE && threadIdx.x == 0) g_trace[1024][3] = gtime();
  __threadfence();
  const RouteLaneExtras<EPL> ex(a);
  RouteLoadLogits()(a, tok0, ntok, s_logits);
  __syncthreads();
  if (TRACE && threadIdx.x == 0) g_trace[1024][4] = gtime();
  const int warp = threadIdx.x >> 5;
  if (STOP == 0) {
    auto get = [&](int ee) { return s_logits[warp * a.E + ee]; };
    if (warp < ntok) route_token_warp<EPL>(get, tok0 + warp, a, ex);
  } else if (threadIdx.x < ntok) {
    a.weights[(tok0 + threadIdx.x) * a.p.top_k] = s_logits[threadIdx.x * a.E];
  }
  if (threadIdx.x == 0) g_route_tile_arrivals[blockIdx.z] = 0u;
  __syncthreads();
  if (TRACE && threadIdx.x == 0) g_trace[1024][5] = gtime();
}

// Launch kernel K<bf16, EPL, ...> with the library's EPL for E (4 up to 128, else 8).
#define EPL_LAUNCH(E, LAUNCH) ((E) <= 128 ? LAUNCH(4) : LAUNCH(8))

// One warp routes token 0 from global logits, twice (the second time with warm
// instruction cache), recording clock64 at the selection's phase boundaries.
__device__ long long g_clk[2][6];
template <int EPL>
__global__ void traced_select(RouteArgs a) {
  for (int rep = 0; rep < 2; ++rep) {
    const float* row = static_cast<const float*>(a.x);
    if (threadIdx.x == 0) g_clk[rep][5] = clock64();
    route_token_warp<EPL>([&](int e) { return row[e]; }, 0, a, RouteLaneExtras<EPL>(a), [&](int ph) {
      if (threadIdx.x == 0) g_clk[rep][ph] = clock64();
    });
    __syncwarp();
  }
}

// Launches probe_cluster<bf16, EPL, STOP, TRACE> (EPL as the library picks it for E).
template <int STOP, bool TRACE = false>
static cudaError_t launch_copy(int E, dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                               bool pdl, unsigned ks, const RouteArgs& a) {
  return E <= 128 ? LaunchClusterMaybePdl(probe_cluster<bf16, 4, STOP, TRACE>, grid, block, smem,
                                          st, pdl, ks, a, int64_t(0))
                  : LaunchClusterMaybePdl(probe_cluster<bf16, 8, STOP, TRACE>, grid, block, smem,
                                          st, pdl, ks, a, int64_t(0));
}

struct Case { const char* name; int H, E, k, groups, top_groups, scoring; };
static const Case kCases[] = {{"deepseek_v3", 7168, 256, 8, 8, 4, kSigmoid},
                              {"gemma4", 2816, 128, 8, 1, 1, kSoftmax},
                              {"qwen3", 2048, 128, 8, 1, 1, kSoftmax}};

static std::vector<int> parse_list(const char* s, const char* what, int lo, int hi) {
  std::vector<int> out;
  std::string cur;
  for (const char* p = s;; ++p) {
    if (*p == ',' || *p == 0) {
      out.push_back(parse_int(cur, what, lo, hi));
      cur.clear();
      if (!*p) break;
    } else {
      cur += *p;
    }
  }
  return out;
}

int main(int argc, char** argv) {
  if (argc > 3) {
    fprintf(stderr, "route_probe: at most 2 arguments (T list, launches)\n");
    return 2;
  }
  const std::vector<int> Ts = parse_list(argc > 1 ? argv[1] : "1,8,16", "T (1st argument)", 1, 64);
  const int N = argc > 2 ? parse_int(argv[2], "launches (2nd argument)", 1, 4096) : 64;
  // Diagnostics: ROUTE_PROBE_COPIES (router copies, default 32: cold in L2; 1: hot),
  // ROUTE_PROBE_NOBIAS=1 (no correction bias).
  const char* copies_env = getenv("ROUTE_PROBE_COPIES");
  const int kCopies = copies_env ? parse_int(copies_env, "ROUTE_PROBE_COPIES", 1, 64) : 32;
  const char* nobias_env = getenv("ROUTE_PROBE_NOBIAS");
  const bool nobias = nobias_env && parse_int(nobias_env, "ROUTE_PROBE_NOBIAS", 0, 1) == 1;
  const bool pdl = DeviceSupportsPdl();
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  printf("route_probe: %d launches per graph, router rotated over %d copies, pdl %d\n", N,
         kCopies, int(pdl));
  for (const Case& c : kCases) {
    const size_t wn = size_t(c.E) * c.H;
    std::vector<bf16*> w(kCopies), x(kCopies);
    for (int i = 0; i < kCopies; ++i) {
      CK(cudaMalloc(&w[i], wn * sizeof(bf16)));
      CK(cudaMalloc(&x[i], size_t(64) * c.H * sizeof(bf16)));
      fill_bf16<<<512, 256>>>(w[i], wn, 17u + i, 0.05f);
      fill_bf16<<<64, 256>>>(x[i], size_t(64) * c.H, 991u + i, 1.0f);
    }
    float *bias, *logits, *weights, *partial;
    int32_t* ids;
    CK(cudaMalloc(&bias, c.E * sizeof(float)));
    CK(cudaMalloc(&logits, size_t(kCopies) * 64 * c.E * sizeof(float)));
    fill_f32<<<256, 256>>>(logits, size_t(kCopies) * 64 * c.E, 7u, 4.0f);
    fill_f32<<<1, 256>>>(bias, c.E, 8u, 4.0f);
    CK(cudaMalloc(&weights, 64 * 32 * sizeof(float)));
    CK(cudaMalloc(&ids, 64 * 32 * sizeof(int32_t)));
    CK(cudaMalloc(&partial, size_t(4096) * 64 * c.E * sizeof(float)));
    CK(cudaDeviceSynchronize());
    for (int T : Ts) {
      RouteArgs a;
      a.router = w[0];
      a.x = x[0];
      a.bias = c.scoring == kSigmoid && !nobias ? bias : nullptr;
      a.T = T; a.H = c.H; a.E = c.E;
      a.p.top_k = c.k; a.p.scoring = c.scoring; a.p.num_groups = c.groups;
      a.p.top_groups = c.top_groups; a.p.renormalize = true;
      a.weights = weights; a.ids = ids; a.partial = partial;
      a.k_splits = std::max(1, std::min(8, (c.H + 31) / 32 / 8));
      const unsigned ks = a.k_splits, tiles_e = (c.E + 15) / 16,
                     tiles_t = (T + kRouteTokTile - 1) / kRouteTokTile;
      const size_t smem = size_t(kRouteTokTile) * c.E * sizeof(float);
      const dim3 cg(ks, tiles_e, tiles_t), blk(kRouteThreads);
      struct V { const char* name; int id; };
      const V vs[] = {{"empty 1 block", 0},        {"empty cluster grid", 1},
                      {"library fused (cluster)", 2}, {"library fused (global)", 3},
                      {"library logits kernel", 4},  {"logits kernel, block select", 9},
                      {"fused, block select", 10},
                      {"copy: full", 5},
                      {"copy: no selection", 6},     {"copy: no finishing block", 7},
                      {"copy: GEMM only", 8}};
      printf("%s T=%d (E=%d H=%d k_splits=%d, router %.2f MB)\n", c.name, T, c.E, c.H,
             a.k_splits, wn * 2 / 1e6);
      for (const V& v : vs) {
        auto launch = [&](int i) {
          RouteArgs b = a;
          b.router = w[i % kCopies];
          b.x = x[i % kCopies];
          switch (v.id) {
            case 0: CK(LaunchMaybePdl(empty_kernel, dim3(1), dim3(32), 0, st, pdl, 0)); break;
            case 1: CK(LaunchClusterMaybePdl(empty_kernel, cg, blk, 0, st, pdl, ks, 0)); break;
            case 2: CK(LaunchRoute<bf16>(b, st)); break;
            case 3:
#define L3(EPL) LaunchMaybePdl(route_fused_kernel<bf16, EPL, true>, dim3(tiles_e, ks, tiles_t), \
                           blk, smem, st, pdl, b, int64_t(0))
              CK(EPL_LAUNCH(c.E, L3));
              break;
            case 4:
            case 9:  // the logits path, warp or block selection
              b.router = nullptr;
              b.block_select = v.id == 9;
              b.x = logits + size_t(i % kCopies) * 64 * c.E;
              CK(LaunchRoute<float>(b, st));
              break;
            case 10:
              b.block_select = true;
              b.k_splits = 1;
              CK(LaunchRoute<bf16>(b, st));
              break;
            case 5: CK(launch_copy<0>(c.E, cg, blk, smem, st, pdl, ks, b)); break;
            case 6: CK(launch_copy<1>(c.E, cg, blk, smem, st, pdl, ks, b)); break;
            case 7: CK(launch_copy<2>(c.E, cg, blk, smem, st, pdl, ks, b)); break;
            case 8: CK(launch_copy<3>(c.E, cg, blk, smem, st, pdl, ks, b)); break;
          }
        };
        if (c.E > 256 && v.id >= 2) continue;
        for (int i = 0; i < 4; ++i) launch(i);  // warm-up, module load
        CK(cudaStreamSynchronize(st));
        const std::vector<float> us = graph_replay_us(st, N, 15, e0, e1, launch);
        printf("  %-26s %7.2f us/launch (min %.2f)\n", v.name, us[us.size() / 2], us[0]);
      }
      // The block-selection kernels against the warp / cluster kernel on the same
      // inputs: ids equal, weights within an ulp or so. `launch(block)` runs one of the
      // pair. Outputs are poisoned before each launch.
      auto compare = [&](const char* what, auto launch) {
        const size_t n = size_t(T) * c.k;
        std::vector<float> wv[2] = {std::vector<float>(n), std::vector<float>(n)};
        std::vector<int32_t> iv[2] = {std::vector<int32_t>(n), std::vector<int32_t>(n)};
        for (int blk = 0; blk < 2; ++blk) {
          CK(cudaMemset(weights, 0xff, n * sizeof(float)));
          CK(cudaMemset(ids, 0xff, n * sizeof(int32_t)));
          CK(launch(blk == 1));
          CK(cudaStreamSynchronize(st));
          CK(cudaMemcpy(wv[blk].data(), weights, n * 4, cudaMemcpyDeviceToHost));
          CK(cudaMemcpy(iv[blk].data(), ids, n * 4, cudaMemcpyDeviceToHost));
        }
        double rel = 0;
        for (size_t j = 0; j < n; ++j)
          rel = std::max(rel, double(std::fabs(wv[1][j] - wv[0][j])) /
                                  std::max(1e-30f, std::fabs(wv[0][j])));
        printf("  %s: ids %s, max weight rel. diff %.2e\n", what,
               iv[0] == iv[1] ? "equal" : "DIFFER", rel);
      };
      compare("block select vs warp kernel (logits)", [&](bool blk) {
        RouteArgs b = a;
        b.router = nullptr;
        b.x = logits;
        b.block_select = blk;
        return LaunchRoute<float>(b, st);
      });
      // Logits summed in another order than the cluster kernel's: near-ties may differ.
      compare("fused block select vs cluster kernel", [&](bool blk) {
        RouteArgs b = a;
        b.block_select = blk;
        if (blk) b.k_splits = 1;
        return LaunchRoute<bf16>(b, st);
      });
      // Timeline of one launch of the full copy, after a cold-router launch.
      for (int i = 0; i < 3; ++i) {
        RouteArgs b = a;
        b.router = w[(i + 5) % kCopies];
        CK((launch_copy<0, true>(c.E, cg, blk, smem, st, pdl, ks, b)));
      }
      CK(cudaStreamSynchronize(st));
      static unsigned long long tr[1025][kEv];
      CK(cudaMemcpyFromSymbol(tr, g_trace, sizeof(tr)));
      const int G = int(ks * tiles_e * tiles_t);
      unsigned long long t0 = ~0ull;
      for (int b = 0; b < G; ++b) t0 = std::min(t0, tr[b][0]);
      printf("  timeline of one launch (us from the first block's entry; min / median / max "
             "over %d blocks)\n", G);
      const char* names[3] = {"entry", "gemm done", "logits stored"};
      for (int ev = 0; ev < 3; ++ev) {
        std::vector<double> vv;
        for (int b = 0; b < G; ++b) vv.push_back((tr[b][ev] - t0) * 1e-3);
        std::sort(vv.begin(), vv.end());
        printf("    %-14s %7.2f %7.2f %7.2f\n", names[ev], vv[0], vv[G / 2], vv[G - 1]);
      }
      printf("    finisher: arrived %.2f, logits loaded %.2f, end %.2f\n",
             (tr[1024][3] - t0) * 1e-3, (tr[1024][4] - t0) * 1e-3, (tr[1024][5] - t0) * 1e-3);
      if (T == Ts[0]) {  // the selection's phases, one warp, token 0, cycles
        RouteArgs b = a;
        b.router = nullptr;
        b.x = logits;
#define LS(EPL) (traced_select<EPL><<<1, 32, 0, st>>>(b), cudaGetLastError())
        CK(EPL_LAUNCH(c.E, LS));
        CK(cudaStreamSynchronize(st));
        long long clk[2][6];
        CK(cudaMemcpyFromSymbol(clk, g_clk, sizeof(clk)));
        for (int r = 0; r < 2; ++r)
          printf("    selection cycles (%s): loads %lld, scores %lld, groups %lld, top-k %lld, "
                 "weights %lld, total %lld\n", r ? "warm" : "cold", clk[r][0] - clk[r][5],
                 clk[r][1] - clk[r][0], clk[r][2] - clk[r][1], clk[r][3] - clk[r][2],
                 clk[r][4] - clk[r][3], clk[r][4] - clk[r][5]);
      }
    }
    for (int i = 0; i < kCopies; ++i) { CK(cudaFree(w[i])); CK(cudaFree(x[i])); }
    CK(cudaFree(bias)); CK(cudaFree(logits)); CK(cudaFree(weights)); CK(cudaFree(ids));
    CK(cudaFree(partial));
  }
  return 0;
}
