// Device helpers shared by the kernels in csrc/kernels: 16-bit float conversions,
// 16-byte vector loads, warp reductions, the ordered key used for deterministic
// top-k, and programmatic-dependent-launch wrappers. No XLA headers here.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdlib>
#include <cuda_runtime.h>

namespace jax_moe {

using bf16 = __nv_bfloat16;
using f16 = __half;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(f16 v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ f16 from_float<f16>(float v) { return __float2half_rn(v); }

// 16-byte read-only load (weights, activations that stay constant in a launch).
__device__ __forceinline__ uint4 ldg_nc_v4(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// Same, but do not keep the line in L1: streamed weights are read once per call.
__device__ __forceinline__ uint4 ldg_stream_v4(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// 16-byte load from L2 only (not L1): data that other blocks wrote in the same launch.
__device__ __forceinline__ uint4 ldg_cg_v4(const void* p) {
  uint4 r;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p) : "memory");
  return r;
}

// Streamed load that also asks L2 to fetch the surrounding 256-byte block: a warp
// that reads 64 bytes of each of several rows turns into 256-byte DRAM bursts.
__device__ __forceinline__ uint4 ldg_stream_pf_v4(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// Unpack 8 16-bit floats (or 4 f32) from a 16-byte vector into floats.
template <typename T> struct Vec16;
template <> struct Vec16<bf16> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void unpack(const uint4& v, float* f) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};
template <> struct Vec16<f16> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void unpack(const uint4& v, float* f) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
      float2 p = __half22float2(h);
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
};
template <> struct Vec16<float> {
  static constexpr int N = 4;
  __device__ __forceinline__ static void unpack(const uint4& v, float* f) {
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    unsigned long long other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// Total order on floats as unsigned ints: larger float -> larger key. NaN sorts
// below every number (it must never win a selection by accident), -inf above NaN.
__device__ __forceinline__ uint32_t float_order_key(float f) {
  if (f != f) return 0u;
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Inverse of float_order_key for keys of non-NaN floats.
__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Selection key: higher score first, then lower index; key 0 means "not selectable".
// A NaN score gets the lowest selectable key, so NaN logits still give valid ids.
__device__ __forceinline__ unsigned long long select_key(float score, int idx) {
  return (static_cast<unsigned long long>(float_order_key(score) + 1u) << 32) |
         static_cast<unsigned long long>(0xffffffffu - static_cast<uint32_t>(idx));
}
__device__ __forceinline__ int key_index(unsigned long long key) {
  return static_cast<int>(0xffffffffu - static_cast<uint32_t>(key & 0xffffffffu));
}

// Programmatic dependent launch (sm_90+): let the next kernel in the stream start
// its independent prologue early, and wait for the previous kernel's results.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait_prerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Acquire load of a word that other blocks of the same launch release (their stores,
// then __threadfence and an atomic on the word): a block waiting for its peers.
__device__ __forceinline__ unsigned int ld_acquire_gpu(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Host: launch `kernel`, with programmatic stream serialization when `pdl` is true
// (the kernel must call pdl_wait_prerequisites before it reads what earlier kernels
// in the stream wrote), in thread-block clusters of `cluster_x` blocks along x when
// cluster_x > 1 (sm_90+; gridDim.x must be a multiple of it, at most 8).
template <typename... KArgs, typename... Args>
cudaError_t LaunchClusterMaybePdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                                  cudaStream_t stream, bool pdl, unsigned cluster_x,
                                  Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (cluster_x > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster_x;
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

template <typename... KArgs, typename... Args>
cudaError_t LaunchMaybePdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                           cudaStream_t stream, bool pdl, Args... args) {
  return LaunchClusterMaybePdl(kernel, grid, block, smem, stream, pdl, 1u, args...);
}

// Host: attribute `Attr` of the current device, or `fallback` when it cannot be read.
// Cached per device (launchers ask on every call; attributes do not change while the
// process runs). A benign race: two threads may both query and store the same value.
template <cudaDeviceAttr Attr>
inline int CurrentDeviceAttr(int fallback) {
  constexpr int kDevices = 64;
  static int cache[kDevices] = {};  // value + 1; 0: not read yet
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return fallback;
  const bool cached = dev >= 0 && dev < kDevices;
  if (cached && cache[dev] != 0) return cache[dev] - 1;
  if (cudaDeviceGetAttribute(&v, Attr, dev) != cudaSuccess) return fallback;
  if (cached) cache[dev] = v + 1;
  return v;
}

// Host: whether the current device is sm_90 or newer (the stream kernel's
// instructions, programmatic dependent launch, thread-block clusters).
inline bool DeviceIsSm90() {
  return CurrentDeviceAttr<cudaDevAttrComputeCapabilityMajor>(0) >= 9;
}

// Host: JAX_MOE_DISABLE_PDL=1 in the environment (read once; a diagnostic for A/B
// timing of the launch overlap). jax_moe/_ffi.py refuses values other than 0 and 1
// at import. No CUDA call: the module reports it without a driver.
inline bool PdlDisabledByEnv() {
  static const bool disabled = [] {
    const char* v = std::getenv("JAX_MOE_DISABLE_PDL");
    return v != nullptr && v[0] == '1' && v[1] == '\0';
  }();
  return disabled;
}

// Host: whether to launch with programmatic dependent launch: on sm_90+, unless
// PdlDisabledByEnv().
inline bool DeviceSupportsPdl() { return !PdlDisabledByEnv() && DeviceIsSm90(); }

}  // namespace jax_moe
