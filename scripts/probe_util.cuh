// Helpers shared by the standalone probes (scripts/stream_probe.cu,
// scripts/route_probe.cu): CUDA error checks, a deterministic random fill, timing of
// CUDA-graph replays, and argument parsing that exits 2 naming the argument before
// any CUDA call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

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
