// Scalar-looking math that GCC turns into SIMD inside `#pragma omp simd` loops:
// a branchless exp, and conversions for bf16/fp16 storage. fp32 everywhere.
#pragma once
#include <cstdint>
#include <cstring>

namespace fastalign {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

static inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2];
// exp(r) by a degree-6 polynomial (rel. error ~1e-7). exp(x) = 0 for x < -87.3
// (also -inf), so masked vocabulary entries contribute exactly nothing. Above 88.3 (where 2^n would
// reach the exponent of inf) it is 2 exp(x - ln2): finite up to FLT_MAX, inf beyond (also +inf).
static inline float exp_f32(float x) {
  const bool high = x > 88.3f;
  const float xh = high ? x - 0.693147180559945f : x;
  const float xc = xh < -87.3f ? -87.3f : (xh > 88.3f ? 88.3f : xh);
  const float t = xc * 1.44269504088896341f;
  const float fn = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - fn * 0.693359375f) - fn * (-2.12194440e-4f);
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fn);
  const float scale = bits_to_float(static_cast<uint32_t>(n + 127) << 23);
  const float e = p * scale;
  return x < -87.3f ? 0.0f : (high ? (x > 89.0f ? e * 4.0f : e * 2.0f) : e);
}

// x where mask is all ones, exactly 0 where it is 0 (whatever x is, NaN and inf included): a loop-invariant
// choice as a bitwise and, which keeps a token loop straight-line SIMD code (a select or a ternary chain on an
// option is loop-invariant control flow, which keeps it scalar; 0/1 weights would make 0 * inf = NaN).
static inline float keep_if(float x, uint32_t mask) { return bits_to_float(float_to_bits(x) & mask); }
static inline uint32_t mask_of(bool chosen) { return chosen ? 0xffffffffu : 0u; }

// x clamped to [lo, hi] as torch.clamp (hi where lo > hi); NaN stays NaN. Two selects, not nested ones: a loop
// that calls it stays SIMD code (nested ones left the k3 loop of kl_penalty.cpp scalar).
static inline float clampf(float x, float lo, float hi) {
  const float above_lo = x < lo ? lo : x;
  return above_lo > hi ? hi : above_lo;
}

// The k3 KL estimator exp(x) - x - 1 = expm1(x) - x and its derivative expm1(x), without the cancellation
// of exp(x) against 1 + x near 0 (all digits lost below |x| ~ 3e-4 in fp32): for |x| < 0.5 by the series
// x^2 (1/2! + x/3! + ... + x^7/9!) (truncation < 3e-9 relative), elsewhere (+-inf and NaN included) as
// e - x - 1 and e - 1, e = exp(x).
struct K3 {
  float v, expm1;
};
static inline K3 k3_f32(float x) {
  const float e = exp_f32(x);
  float p = 2.7557319e-6f;  // 1/9!
  p = p * x + 2.4801587e-5f;
  p = p * x + 1.9841270e-4f;
  p = p * x + 1.3888889e-3f;
  p = p * x + 8.3333333e-3f;
  p = p * x + 4.1666667e-2f;
  p = p * x + 1.6666667e-1f;
  p = p * x + 0.5f;
  const float s = x * x * p;
  const bool small = (x > -0.5f) & (x < 0.5f);
  return K3{small ? s : e - x - 1.f, small ? x + s : e - 1.f};
}

// log(x) = e ln2 + log(m), x = 2^e m with m in [sqrt(1/2), sqrt(2)); log(m) = 2 atanh(f), f = (m - 1) / (m + 1),
// |f| <= 0.172, by its series to f^9 (abs. error ~1e-9). Below the smallest normal float (0 included) it
// is -1e30 (a floor, not -inf, so 0 * log stays 0); NaN and +inf pass through.
static inline float log_f32(float x) {
  const uint32_t u = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>((u >> 23) & 0xffu) - 127);
  float m = bits_to_float((u & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool upper = m > 1.41421356f;
  m = upper ? m * 0.5f : m;
  e = upper ? e + 1.0f : e;
  const float f = (m - 1.0f) / (m + 1.0f), f2 = f * f;
  const float series = 2.0f * f * (1.0f + f2 * (0.333333333f + f2 * (0.2f + f2 * (0.142857143f + f2 * 0.111111111f))));
  const float y = e * 0.693147180559945f + series;
  return x < 1.17549435e-38f ? -1e30f : (x == x && x < 3.4028235e38f ? y : x);
}

static inline float bf16_to_f32(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : (rounded >> 16));
}

static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Normal and subnormal: shift into place and rescale by 2^(127-15).
  uint32_t u = float_to_bits(bits_to_float(em << 13) * 5.192296858534828e+33f);
  u = em >= 0x7c00u ? (0x7f800000u | (em << 13)) : u;  // inf / nan
  return bits_to_float(sign | u);
}

static inline uint16_t f32_to_f16(float f) {  // round to nearest even
  uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint32_t out;
  if (u >= 0x7f800000u) {
    out = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u >= 0x477ff000u) {
    out = 0x7c00u;  // rounds past the largest half
  } else if (u < 0x38800000u) {
    // Subnormal half: adding 0.5f lines the mantissa up with 2^-24 units.
    out = float_to_bits(bits_to_float(u) + 0.5f) - 0x3f000000u;
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    u += 0xc8000fffu + odd;  // rebias exponent (15 - 127) and round
    out = u >> 13;
  }
  return static_cast<uint16_t>(sign | out);
}

template <int D> struct Storage;
template <> struct Storage<kF32> {
  using T = float;
  static inline float load(T v) { return v; }
  static inline T store(float v) { return v; }
};
template <> struct Storage<kBF16> {
  using T = uint16_t;
  static inline float load(T v) { return bf16_to_f32(v); }
  static inline T store(float v) { return f32_to_bf16(v); }
};
template <> struct Storage<kF16> {
  using T = uint16_t;
  static inline float load(T v) { return f16_to_f32(v); }
  static inline T store(float v) { return f32_to_f16(v); }
};

// Run `f.template operator()<D>()` for the runtime dtype code.
#define FASTALIGN_DISPATCH_DTYPE(code, ...)                          \
  switch (code) {                                                     \
    case ::fastalign::kF32: { constexpr int D = ::fastalign::kF32; __VA_ARGS__; break; }   \
    case ::fastalign::kBF16: { constexpr int D = ::fastalign::kBF16; __VA_ARGS__; break; } \
    case ::fastalign::kF16: { constexpr int D = ::fastalign::kF16; __VA_ARGS__; break; }   \
    default: throw std::invalid_argument("fastalign: unsupported dtype code");            \
  }

}  // namespace fastalign
