// Helpers shared by the standalone probes (scripts/stream_probe.cu, split_probe.cu,
// route_probe.cu): CUDA error checks, a deterministic random fill, timing of
// back-to-back launches and CUDA-graph replays, argument parsing that exits 2 naming
// the argument before any CUDA call, and the plain read kernels (the HBM read rate;
// a routing's distinct experts read with no work).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"  // ldg_stream_v4
#include "common/params.h"      // kSilu

// Name printed in front of argument errors; each probe defines it.
extern const char* const kProbeName;

#define CK(x)                                                                          \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      exit(1);                                                                         \
    }                                                                                  \
  } while (0)

// A hash of the index (never zeros), scale * [-1, 1).
__device__ __forceinline__ float probe_hash_unit(size_t i, uint32_t seed) {
  uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
  h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
  return (h & 0xffffff) / 8388608.0f - 1.0f;
}

__global__ void fill_bf16(__nv_bfloat16* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16_rn(scale * probe_hash_unit(i, seed));
}

__global__ void fill_f32(float* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x)
    p[i] = scale * probe_hash_unit(i, seed);
}

// A whole decimal integer in [lo, hi], or exit 2 naming the argument (before any
// CUDA call, so bad arguments are reported on machines without a GPU too).
static int parse_int(const std::string& v, const char* what, int lo, int hi) {
  char* end = nullptr;
  const long x = strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != 0 || x < lo || x > hi) {
    fprintf(stderr, "%s: %s must be an integer in [%d, %d], got '%s'\n", kProbeName, what, lo,
            hi, v.c_str());
    exit(2);
  }
  return static_cast<int>(x);
}

// us per launch of `body(i)` for i in [0, n), captured once into a CUDA graph on
// stream st and replayed `reps` times after one warm replay, sorted ascending (the
// median is [reps / 2]): the launches as XLA's command buffers issue our custom
// calls, without the host's launch cost.
template <typename F>
static std::vector<float> graph_replay_us(cudaStream_t st, int n, int reps, cudaEvent_t e0,
                                          cudaEvent_t e1, F body) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < n; ++i) body(i);
  CK(cudaStreamEndCapture(st, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  CK(cudaGraphLaunch(ge, st));
  CK(cudaStreamSynchronize(st));
  std::vector<float> us;
  for (int r = 0; r < reps; ++r) {
    CK(cudaEventRecord(e0, st));
    CK(cudaGraphLaunch(ge, st));
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    us.push_back(ms * 1e3f / n);
  }
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  std::sort(us.begin(), us.end());
  return us;
}

static std::vector<std::string> split_list(const char* s) {
  std::vector<std::string> out;
  std::string cur;
  for (const char* p = s;; ++p) {
    if (*p == ',' || *p == 0) { if (!cur.empty()) out.push_back(cur); cur.clear(); if (!*p) break; }
    else cur += *p;
  }
  return out;
}

// The narrow decode shapes and the arguments of the split and group probes:
// [shape,...] [T,...] [iterations], each checked before any CUDA call (exit 2 naming
// it). T in [1, kNarrowMaxT].
struct NarrowShape { const char* name; int H, I, E, k; };
static const NarrowShape kNarrowShapes[] = {{"gemma4", 2816, 704, 128, 8},
                                            {"qwen3", 2048, 768, 128, 8}};
constexpr int kNarrowMaxT = 4;
struct NarrowProbeArgs {
  std::vector<NarrowShape> shapes;
  std::vector<int> ts;
  int iters = 0;
};
static NarrowProbeArgs parse_narrow_probe_args(int argc, char** argv, const char* default_ts,
                                               int default_iters) {
  NarrowProbeArgs a;
  for (const std::string& sn : split_list(argc > 1 ? argv[1] : "gemma4,qwen3")) {
    const NarrowShape* sp = nullptr;
    for (const NarrowShape& s : kNarrowShapes) if (sn == s.name) sp = &s;
    if (sp == nullptr) {
      fprintf(stderr, "%s: unknown shape '%s' (gemma4, qwen3)\n", kProbeName, sn.c_str());
      exit(2);
    }
    a.shapes.push_back(*sp);
  }
  for (const std::string& t : split_list(argc > 2 ? argv[2] : default_ts))
    a.ts.push_back(parse_int(t, "T (2nd argument)", 1, kNarrowMaxT));
  a.iters = argc > 3 ? parse_int(argv[3], "iterations (3rd argument)", 1, 1000000) : default_iters;
  if (argc > 4) {
    fprintf(stderr, "%s: at most 3 arguments\n", kProbeName);
    exit(2);
  }
  return a;
}

// One layer's inputs drawn on the device (never zeros): w_gate_up [.., H] and w_down
// [.., I] rows scaled by 2 / sqrt(row length), x in [-1, 1); and n combine weights in
// [0.05, 1.05) uploaded to cw. Same seeds in every probe, so their outputs compare.
static void fill_layer_inputs(__nv_bfloat16* wgu, size_t ngu, __nv_bfloat16* wd, size_t nd,
                              __nv_bfloat16* x, size_t nx, int H, int I, float* cw, size_t n) {
  std::vector<float> hcw(n);
  std::mt19937 wr(99);
  for (float& v : hcw) v = 0.05f + (wr() % 1000) * 1e-3f;
  CK(cudaMemcpy(cw, hcw.data(), hcw.size() * 4, cudaMemcpyHostToDevice));
  fill_bf16<<<4096, 256>>>(wgu, ngu, 11u, 2.0f / sqrtf(float(H)));
  fill_bf16<<<4096, 256>>>(wd, nd, 13u, 2.0f / sqrtf(float(I)));
  fill_bf16<<<256, 256>>>(x, nx, 17u, 1.0f);
  CK(cudaGetLastError());
}

// R routings of T tokens, each token k distinct experts of E drawn uniformly (rows of
// n = T k ids); *distinct: the mean number of distinct experts per routing.
static std::vector<int32_t> uniform_routings(int R, int T, int E, int k, std::mt19937& rng,
                                             double* distinct) {
  const int n = T * k;
  std::vector<int32_t> ids(size_t(R) * n);
  double d = 0;
  for (int r = 0; r < R; ++r) {
    std::vector<int> cnt(E, 0), perm(E);
    for (int t = 0; t < T; ++t) {
      for (int e = 0; e < E; ++e) perm[e] = e;
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int j = 0; j < k; ++j) {
        ids[size_t(r) * n + t * k + j] = perm[j];
        ++cnt[perm[j]];
      }
    }
    for (int c : cnt) d += c > 0;
  }
  *distinct = d / R;
  return ids;
}

// One NarrowShape layer on the device for up to kNarrowMaxT tokens: the weights, x and
// the combine weights (fill_layer_inputs), and y rows for every assignment. Freed on
// destruction.
struct NarrowLayer {
  __nv_bfloat16 *wgu = nullptr, *wd = nullptr, *x = nullptr, *y = nullptr;
  float* cw = nullptr;
  double expert_bytes = 0;  // one expert's gate, up and down rows
  explicit NarrowLayer(const NarrowShape& S) {
    const size_t ngu = size_t(S.E) * 2 * S.I * S.H, nd = size_t(S.E) * S.H * S.I;
    const size_t nmax = size_t(kNarrowMaxT) * S.k;
    CK(cudaMalloc(&wgu, ngu * 2));
    CK(cudaMalloc(&wd, nd * 2));
    CK(cudaMalloc(&x, size_t(kNarrowMaxT) * S.H * 2));
    CK(cudaMalloc(&y, nmax * S.H * 2));
    CK(cudaMalloc(&cw, nmax * 4));
    fill_layer_inputs(wgu, ngu, wd, nd, x, size_t(kNarrowMaxT) * S.H, S.H, S.I, cw, nmax);
    expert_bytes = 3.0 * S.I * S.H * 2;
  }
  ~NarrowLayer() { cudaFree(wgu); cudaFree(wd); cudaFree(x); cudaFree(y); cudaFree(cw); }
  NarrowLayer(const NarrowLayer&) = delete;
  NarrowLayer& operator=(const NarrowLayer&) = delete;
};

// A kernel's arguments (ExpertGemvArgs, GemvGroupArgs, GemvSplitArgs) for layer L of
// shape S at T tokens, SwiGLU: the inputs and sizes; its scratch, outputs and ids are
// the caller's.
template <typename Args>
static void set_layer_args(Args& a, const NarrowShape& S, const NarrowLayer& L, int T) {
  a.x = L.x; a.w_gate_up = L.wgu; a.w_down = L.wd; a.combine_w = L.cw;
  a.T = T; a.k = S.k; a.E = S.E; a.H = S.H; a.I = S.I; a.activation = jax_moe::kSilu;
}

// R uniform routings of T tokens (uniform_routings), on the host (ids) and the device
// (d, freed on destruction); distinct: the mean number of distinct experts.
struct NarrowRoutings {
  std::vector<int32_t> ids;
  int32_t* d = nullptr;
  double distinct = 0;
  NarrowRoutings(int R, int T, const NarrowShape& S, std::mt19937& rng)
      : ids(uniform_routings(R, T, S.E, S.k, rng, &distinct)) {
    CK(cudaMalloc(&d, ids.size() * 4));
    CK(cudaMemcpy(d, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
  }
  ~NarrowRoutings() { cudaFree(d); }
  NarrowRoutings(const NarrowRoutings&) = delete;
  NarrowRoutings& operator=(const NarrowRoutings&) = delete;
};

// What every probe sets up first: the SM count, a sink word for the read kernels,
// and two timing events.
struct ProbeDevice {
  int sms = 0;
  unsigned int* sink = nullptr;
  cudaEvent_t e0, e1;
};

static ProbeDevice probe_device() {
  ProbeDevice d;
  int dev = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
  CK(cudaMalloc(&d.sink, 4));
  CK(cudaEventCreate(&d.e0));
  CK(cudaEventCreate(&d.e1));
  return d;
}

// us per launch of body(i) for i in [0, iters), issued back to back on the default
// stream after `warm` untimed launches.
template <typename F>
static float back_to_back_us(int warm, int iters, cudaEvent_t e0, cudaEvent_t e1, F body) {
  for (int i = 0; i < warm; ++i) body(i);
  CK(cudaEventRecord(e0));
  for (int i = 0; i < iters; ++i) body(i);
  CK(cudaEventRecord(e1));
  CK(cudaEventSynchronize(e1));
  CK(cudaGetLastError());
  float ms;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  return ms * 1e3f / iters;
}

__global__ void read_kernel(const uint4* p, size_t n, unsigned int* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint4 v = jax_moe::ldg_stream_v4(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) atomicAdd(sink, 1u);
}

// The layer's bytes read by the simplest good kernel: npieces pieces of piece_words
// 16-byte words each (a distinct expert's gate rows, up rows, down matrix: I*H each),
// in 64 KiB tiles (8 independent 16-byte loads per thread), blocks striding over the
// tiles. What one launch that only reads a routing's distinct experts takes: the
// fixed part of the gap between the floor and the stream kernel (ramp, tail, launch).
constexpr int kReadThreads = 512, kReadUnroll = 8;
__global__ void __launch_bounds__(kReadThreads)
read_pieces_kernel(const uint4* const* pieces, int npieces, size_t piece_words,
                   unsigned int* sink) {
  constexpr size_t kTile = size_t(kReadThreads) * kReadUnroll;
  const size_t tiles_per_piece = (piece_words + kTile - 1) / kTile;
  const size_t tiles = tiles_per_piece * npieces;
  uint32_t acc = 0;
  for (size_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const uint4* p = pieces[t / tiles_per_piece];
    const size_t base = (t % tiles_per_piece) * kTile + threadIdx.x;
    uint4 v[kReadUnroll];
#pragma unroll
    for (int u = 0; u < kReadUnroll; ++u) {
      const size_t w = base + size_t(u) * kReadThreads;
      v[u] = w < piece_words ? jax_moe::ldg_stream_v4(p + w) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kReadUnroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x12345678u) atomicAdd(sink, 1u);
}


// Read bandwidth in bytes/s: 4 GiB streamed by read_kernel, best of 5 passes after one
// warm pass.
static double measure_read_bw(int sms, unsigned int* sink, cudaEvent_t e0, cudaEvent_t e1) {
  const size_t bytes = size_t(4) << 30;
  uint4* buf;
  CK(cudaMalloc(&buf, bytes));
  fill_bf16<<<4096, 256>>>(reinterpret_cast<__nv_bfloat16*>(buf), bytes / 2, 7u, 1.0f);
  double bw = 0;
  for (int rep = 0; rep < 6; ++rep) {
    CK(cudaEventRecord(e0));
    read_kernel<<<sms * 8, 512>>>(buf, bytes / 16, sink);
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (rep) bw = std::max(bw, bytes / (ms * 1e-3));
  }
  CK(cudaFree(buf));
  return bw;
}

// R routings' distinct experts (ids: R rows of n ids; each expert 3 pieces of I*H:
// gate rows, up rows, down matrix) as read_pieces_kernel's work: launch(i) reads
// routing i % R's experts with the occupancy's blocks on every SM.
struct DistinctExpertReads {
  const uint4** dp = nullptr;
  std::vector<int> npieces;
  int R = 0, maxp = 0, blocks = 0;
  size_t piece_words = 0;
  DistinctExpertReads(const std::vector<int32_t>& ids, int R_, int n, int E, int H, int I,
                      const __nv_bfloat16* wgu, const __nv_bfloat16* wd, int sms)
      : npieces(R_), R(R_), maxp(3 * std::min(E, n)), piece_words(size_t(I) * H * 2 / 16) {
    std::vector<const uint4*> hp;
    for (int r = 0; r < R; ++r) {
      std::set<int> ex(ids.begin() + size_t(r) * n, ids.begin() + size_t(r + 1) * n);
      npieces[r] = 3 * int(ex.size());
      for (int e : ex) {
        hp.push_back(reinterpret_cast<const uint4*>(wgu + size_t(e) * 2 * I * H));
        hp.push_back(reinterpret_cast<const uint4*>(wgu + (size_t(e) * 2 + 1) * I * H));
        hp.push_back(reinterpret_cast<const uint4*>(wd + size_t(e) * H * I));
      }
      hp.resize(size_t(r + 1) * maxp, hp.back());
    }
    CK(cudaMalloc(&dp, hp.size() * sizeof(void*)));
    CK(cudaMemcpy(dp, hp.data(), hp.size() * sizeof(void*), cudaMemcpyHostToDevice));
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, read_pieces_kernel, kReadThreads, 0));
    blocks *= sms;
  }
  DistinctExpertReads(const DistinctExpertReads&) = delete;
  DistinctExpertReads& operator=(const DistinctExpertReads&) = delete;
  ~DistinctExpertReads() { cudaFree(dp); }
  void launch(int i, cudaStream_t st, unsigned int* sink) const {
    read_pieces_kernel<<<blocks, kReadThreads, 0, st>>>(dp + size_t(i % R) * maxp,
                                                        npieces[i % R], piece_words, sink);
  }
};
