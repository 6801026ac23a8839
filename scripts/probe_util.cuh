// Helpers shared by the standalone probes (scripts/stream_probe.cu,
// scripts/route_probe.cu): CUDA error checks, a deterministic random fill, and
// argument parsing that exits 2 naming the argument before any CUDA call.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

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
