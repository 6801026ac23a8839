// CPU routing: optional router matmul, softmax/sigmoid scoring, grouped top-k,
// renormalization and scaling. Same semantics as the CUDA kernel and
// jax_moe/reference.py: ids ordered by selection score (highest first, ties to the
// lower index); a NaN score counts as -inf, so ids stay valid and distinct.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/cpu_types.h"
#include "common/params.h"

namespace jax_moe {
namespace cpu {

// Total order on floats: larger float -> larger key; NaN counts as -inf (as on the
// GPU), ties go to the lower index.
inline uint64_t CpuSelectKey(float score, int idx) {
  if (score != score) score = -INFINITY;
  uint32_t b;
  std::memcpy(&b, &score, 4);
  uint32_t ord = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<uint64_t>(ord + 1u) << 32) |
         static_cast<uint64_t>(0xffffffffu - static_cast<uint32_t>(idx));
}

// Routes one token given its f32 logits [E]. scratch holds 3*E floats + E bytes.
inline void RouteTokenCpu(const float* logits, int64_t E, const float* bias,
                          const float* expert_scale, const RouteParams& p,
                          float* scores, float* sel, uint8_t* allowed,
                          float* out_w, int32_t* out_ids) {
  if (p.scoring == kSoftmax) {
    float m = -INFINITY;
    for (int64_t e = 0; e < E; ++e) m = std::max(m, logits[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) { scores[e] = std::exp(logits[e] - m); sum += scores[e]; }
    const float inv = 1.0f / sum;
    for (int64_t e = 0; e < E; ++e) scores[e] *= inv;
  } else {
    for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-logits[e]));
  }
  for (int64_t e = 0; e < E; ++e) sel[e] = scores[e] + (bias ? bias[e] : 0.f);

  // Group limit: keep only experts of the best top_groups groups.
  std::fill(allowed, allowed + E, uint8_t{1});
  if (p.num_groups > 1) {
    const int64_t G = E / p.num_groups;
    std::vector<uint64_t> gkey(p.num_groups);
    for (int g = 0; g < p.num_groups; ++g) {
      uint64_t b1 = 0, b2 = 0;  // best two selection keys in the group
      for (int64_t e = g * G; e < (g + 1) * G; ++e) {
        uint64_t kk = CpuSelectKey(sel[e], static_cast<int>(e));
        if (kk > b1) { b2 = b1; b1 = kk; } else if (kk > b2) { b2 = kk; }
      }
      float gs;
      const float s1 = sel[0xffffffffu - static_cast<uint32_t>(b1 & 0xffffffffu)];
      if (p.group_score == kGroupMax || b2 == 0) {
        gs = s1;
      } else {
        gs = s1 + sel[0xffffffffu - static_cast<uint32_t>(b2 & 0xffffffffu)];
      }
      gkey[g] = CpuSelectKey(gs, g);
    }
    std::fill(allowed, allowed + E, uint8_t{0});
    for (int r = 0; r < p.top_groups; ++r) {
      int best = 0;
      for (int g = 1; g < p.num_groups; ++g) if (gkey[g] > gkey[best]) best = g;
      gkey[best] = 0;
      std::fill(allowed + best * G, allowed + (best + 1) * G, uint8_t{1});
    }
  }

  float wsum = 0.f;
  for (int j = 0; j < p.top_k; ++j) {
    uint64_t best_key = 0;
    int best = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (!allowed[e]) continue;
      const uint64_t kk = CpuSelectKey(sel[e], static_cast<int>(e));
      if (kk > best_key) { best_key = kk; best = static_cast<int>(e); }
    }
    allowed[best] = 0;
    out_ids[j] = best;
    out_w[j] = scores[best];
    wsum += scores[best];
  }
  const float norm = p.renormalize ? 1.0f / (wsum + kRenormEps) : 1.0f;
  for (int j = 0; j < p.top_k; ++j) {
    float w = out_w[j] * norm * p.scaling_factor;
    if (expert_scale) w *= expert_scale[out_ids[j]];
    out_w[j] = w;
  }
}

// x: logits [T, E] when router == nullptr, else hidden [T, H] with router [E, H].
template <typename T>
void RouteImpl(const T* x, const T* router, int64_t num_tokens, int64_t H, int64_t E,
              const float* bias, const float* expert_scale, const RouteParams& p,
              float* weights, int32_t* ids) {
  std::vector<float> logits(E), scores(E), sel(E), xrow(router ? H : 0);
  std::vector<uint8_t> allowed(E);
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (router) {
      for (int64_t h = 0; h < H; ++h) xrow[h] = ToFloat(x[t * H + h]);
      for (int64_t e = 0; e < E; ++e) {
        const T* w = router + e * H;
        float acc = 0.f;
        for (int64_t h = 0; h < H; ++h) acc += xrow[h] * ToFloat(w[h]);
        logits[e] = acc;
      }
    } else {
      for (int64_t e = 0; e < E; ++e) logits[e] = ToFloat(x[t * E + e]);
    }
    RouteTokenCpu(logits.data(), E, bias, expert_scale, p, scores.data(), sel.data(),
                  allowed.data(), weights + t * p.top_k, ids + t * p.top_k);
  }
}

}  // namespace cpu
}  // namespace jax_moe
