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

// Written as selects, not branches, so that the CPU handlers' conversion loops (every
// weight element they read goes through here) vectorize: the exponent is rebiased in
// place, inf/NaN get the rest of the bias, and a subnormal is renormalized by one
// exact float subtraction of 2^-14 (bitwise the same results as the bit-by-bit
// normalization it replaces, for all 65536 inputs).
inline float ToFloat(f16_t v) {
  const uint32_t h = v.bits;
  const uint32_t mag = (h & 0x7fffu) << 13;   // exponent and mantissa in f32 position
  const uint32_t exp = mag & 0x0f800000u;
  const uint32_t special = 0u - static_cast<uint32_t>(exp == 0x0f800000u);  // inf / NaN
  const uint32_t tiny = 0u - static_cast<uint32_t>(exp == 0);               // zero / subnormal
  const uint32_t o = mag + 0x38000000u + (special & 0x38000000u) + (tiny & 0x00800000u);
  float f;
  std::memcpy(&f, &o, 4);
  const float renorm = f - 6.103515625e-05f;   // exact for a subnormal: man * 2^-24
  uint32_t r;
  std::memcpy(&r, &renorm, 4);
  const uint32_t u = ((tiny & r) | (~tiny & o)) | ((h & 0x8000u) << 16);
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
