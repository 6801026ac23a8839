// CPU expert GEMV: y[t, j] = down(act(gate) * up) for expert ids[t, j] (then the
// shared experts, slots k .. k + S - 1), f32 accumulation, the activated
// intermediate rounded to the storage type (as the CUDA kernels store it). An id
// outside [0, E) gives a zero row.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/cpu_types.h"
#include "common/params.h"

namespace jax_moe {
namespace cpu {

inline float Activate(int activation, float g) {
  switch (activation) {
    case kGeluTanh: {
      const float c = 0.7978845608028654f;  // sqrt(2 / pi)
      return 0.5f * g * (1.0f + std::tanh(c * (g + 0.044715f * g * g * g)));
    }
    case kGelu:
      return 0.5f * g * (1.0f + std::erf(g * 0.7071067811865476f));
    default:
      return g / (1.0f + std::exp(-g));
  }
}

// x [T, H], ids [T, k], w_gate_up [E, 2I, H], w_down [E, H, I] -> y [T, k + S, H]:
// slots j < k use expert ids[t, j] (outside [0, E): zero row), slot k + s the shared
// expert s (shared_gate_up [S, 2I, H], shared_down [S, H, I]).
template <typename T>
void ExpertGemvImpl(const T* x, const int32_t* ids, const T* w_gate_up, const T* w_down,
                    const T* shared_gate_up, const T* shared_down, int64_t num_tokens,
                    int64_t k, int64_t num_shared, int64_t H, int64_t I, int64_t E,
                    int activation, T* y) {
  std::vector<float> xf(H), h(I);
  GemvAssign m;
  m.ids = ids;
  m.k = static_cast<int>(k);
  m.num_shared = static_cast<int>(num_shared);
  m.num_experts = static_cast<int>(E);
  const int64_t slots = k + num_shared;
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t c = 0; c < H; ++c) xf[c] = ToFloat(x[t * H + c]);
    for (int64_t j = 0; j < slots; ++j) {
      const int64_t a = t * slots + j;
      const int64_t e = m.expert(a);
      T* out = y + a * H;
      if (e < 0) {  // a routed id outside [0, E)
        for (int64_t r = 0; r < H; ++r) out[r] = FromFloat<T>(0.0f);
        continue;
      }
      const bool shared = e >= E;
      const int64_t ew = shared ? e - E : e;
      const T* wg = (shared ? shared_gate_up : w_gate_up) + ew * 2 * I * H;
      for (int64_t r = 0; r < I; ++r) {
        const T* grow = wg + r * H;
        const T* urow = wg + (I + r) * H;
        float g = 0.f, u = 0.f;
        for (int64_t c = 0; c < H; ++c) {
          g += ToFloat(grow[c]) * xf[c];
          u += ToFloat(urow[c]) * xf[c];
        }
        h[r] = ToFloat(FromFloat<T>(Activate(activation, g) * u));
      }
      const T* wd = (shared ? shared_down : w_down) + ew * H * I;
      for (int64_t r = 0; r < H; ++r) {
        const T* drow = wd + r * I;
        float acc = 0.f;
        for (int64_t c = 0; c < I; ++c) acc += ToFloat(drow[c]) * h[c];
        out[r] = FromFloat<T>(acc);
      }
    }
  }
}

}  // namespace cpu
}  // namespace jax_moe
