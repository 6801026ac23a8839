// Host-side 16-bit float storage types and conversions for the CPU handlers.
// bf16 and f16 are kept as raw uint16 bits; arithmetic happens in float.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace jax_moe {

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline float ToFloat(float v) { return v; }

inline float ToFloat(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float ToFloat(f16_t v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> T FromFloat(float v);

template <> inline float FromFloat<float>(float v) { return v; }

// Round to nearest even, NaN kept quiet.
template <> inline bf16_t FromFloat<bf16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

// Round to nearest even with subnormals and overflow to inf.
template <> inline f16_t FromFloat<f16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (au >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 -> inf
  if (au < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    float af;
    std::memcpy(&af, &au, 4);
    // Scale so the half subnormal unit (2^-24) becomes 1 and round to nearest even.
    const float scaled = af * 16777216.0f;
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));
    return f16_t{static_cast<uint16_t>(sign | m)};
  }
  uint32_t e = ((au >> 23) - 127 + 15);
  uint32_t man = au & 0x7fffffu;
  uint32_t h = (e << 10) | (man >> 13);
  const uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into exponent: fine
  return f16_t{static_cast<uint16_t>(sign | h)};
}

}  // namespace jax_moe
