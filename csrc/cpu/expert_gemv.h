// CPU expert GEMV: y[t, j] = down(act(gate) * up) for expert ids[t, j] (then the
// shared experts, slots k .. k + S - 1), f32 accumulation, the activated
// intermediate rounded to the storage type (as the CUDA kernels store it). An id
// outside [0, E) gives a zero row.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/cpu_types.h"
#include "common/parallel.h"
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

// Dot product in f32 with 8 partial sums (element c goes to sum c % 8), added in a
// fixed tree: the same bits for the same vectors wherever it is called, and a loop
// the compiler vectorizes. One running sum was a serial chain of dependent adds, the
// compiler may not reorder (session 18, this machine: expert_gemv at T=8, H=256,
// I=128, E=16, k=4, f32 took 0.76 ms, the jnp reference 0.66; now 0.27).
inline float Dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[c + l] * b[c + l];
  for (int l = 0; c < n; ++c, ++l) acc[l] += a[c] * b[c];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename T>
inline void RowToFloat(const T* src, int64_t n, float* dst) {
  for (int64_t c = 0; c < n; ++c) dst[c] = ToFloat(src[c]);
}

// x [T, H], ids [T, k], w_gate_up [E, 2I, H], w_down [E, H, I] -> y [T, k + S, H]:
// slots j < k use expert ids[t, j] (outside [0, E): zero row), slot k + s the shared
// expert s (shared_gate_up [S, 2I, H], shared_down [S, H, I]).
// The assignments are grouped by expert, so each selected expert's weight rows are
// read (and converted to f32) once per call for all of its tokens, as on the GPU.
// Each output is the same Dot of the same vectors whatever the grouping, so a token's
// result does not depend on which other tokens share its expert. `run(n, fn)` calls
// fn(0 .. n-1), one per selected expert, in any order or concurrently (SerialRunner,
// or ParallelFor over XLA's thread pool in the FFI handler): each expert writes only
// its own assignments' rows.
template <typename T, typename Runner = SerialRunner>
void ExpertGemvImpl(const T* x, const int32_t* ids, const T* w_gate_up, const T* w_down,
                    const T* shared_gate_up, const T* shared_down, int64_t num_tokens,
                    int64_t k, int64_t num_shared, int64_t H, int64_t I, int64_t E,
                    int activation, T* y, Runner&& run = Runner()) {
  GemvAssign m;
  m.ids = ids;
  m.k = static_cast<int>(k);
  m.num_shared = static_cast<int>(num_shared);
  m.num_experts = static_cast<int>(E);
  const int64_t slots = k + num_shared;
  const int64_t A = num_tokens * slots;
  const int64_t experts = E + num_shared;  // routed experts, then the shared ones
  // Counting sort of the assignments by expert (ascending assignment within each).
  std::vector<int64_t> start(experts + 1, 0), order(A);
  for (int64_t a = 0; a < A; ++a) {
    const int64_t e = m.expert(a);
    if (e < 0) {  // a routed id outside [0, E): a zero row
      for (int64_t r = 0; r < H; ++r) y[a * H + r] = FromFloat<T>(0.0f);
    } else {
      ++start[e + 1];
    }
  }
  for (int64_t e = 0; e < experts; ++e) start[e + 1] += start[e];
  std::vector<int64_t> active;  // the experts with at least one assignment
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t a = 0; a < A; ++a) {
      const int64_t e = m.expert(a);
      if (e >= 0) order[next[e]++] = a;
    }
    for (int64_t e = 0; e < experts; ++e)
      if (start[e + 1] > start[e]) active.push_back(e);
  }
  std::vector<float> xf(num_tokens * H);
  RowToFloat(x, num_tokens * H, xf.data());
  run(static_cast<int64_t>(active.size()), [&](int64_t item) {
    const int64_t e = active[item];
    const int64_t n = start[e + 1] - start[e];
    const int64_t* list = order.data() + start[e];
    const bool shared = e >= E;
    const int64_t ew = shared ? e - E : e;
    const T* wg = (shared ? shared_gate_up : w_gate_up) + ew * 2 * I * H;
    const T* wd = (shared ? shared_down : w_down) + ew * H * I;
    std::vector<float> grow(H), urow(H), drow(I), h(n * I);
    std::vector<const float*> xs(n);  // each assignment's token row of x
    for (int64_t i = 0; i < n; ++i) xs[i] = xf.data() + (list[i] / slots) * H;
    for (int64_t r = 0; r < I; ++r) {
      RowToFloat(wg + r * H, H, grow.data());
      RowToFloat(wg + (I + r) * H, H, urow.data());
      for (int64_t i = 0; i < n; ++i) {
        const float g = Dot(grow.data(), xs[i], H);
        const float u = Dot(urow.data(), xs[i], H);
        // Rounded to the storage type, as the CUDA kernels store the intermediate.
        h[i * I + r] = ToFloat(FromFloat<T>(Activate(activation, g) * u));
      }
    }
    for (int64_t r = 0; r < H; ++r) {
      RowToFloat(wd + r * I, I, drow.data());
      for (int64_t i = 0; i < n; ++i)
        y[list[i] * H + r] = FromFloat<T>(Dot(drow.data(), h.data() + i * I, I));
    }
  });
}

}  // namespace cpu
}  // namespace jax_moe
