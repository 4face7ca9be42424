// log, sin and cos of float32 written as straight-line arithmetic (Cephes polynomials, branch-free selects), so that
// a CPU loop over them vectorizes (libm's logf/sinf/cosf are opaque calls that do not), and the CUDA kernels compute
// the same values. Accuracy: within 2 ulp of the correctly rounded result on the ranges Box-Muller uses
// (log on [1e-7, 1], sin/cos on [0, 2*pi)); tests/test_philox.py holds the C++ normals to the float64 truth.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DDPM_HD __host__ __device__ __forceinline__
#else
#define DDPM_HD inline __attribute__((always_inline))
#endif

namespace ddpm_fast {

DDPM_HD int32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  return __builtin_bit_cast(int32_t, x);  // not memcpy: GCC does not vectorize a loop through it
#endif
}

DDPM_HD float bits_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  return __builtin_bit_cast(float, i);
#endif
}

// cond ? a : b by bit masks: GCC gives up if-converting loops with several float selects, and then does not
// vectorize them at all; these it does.
DDPM_HD float select_bits(bool cond, float a, float b) {
  const int32_t mask = -static_cast<int32_t>(cond);
  return bits_float((float_bits(a) & mask) | (float_bits(b) & ~mask));
}

// IEEE sqrt (one instruction on both sides; the CPU build has -fno-math-errno so the loop still vectorizes).
DDPM_HD float sqrt_nonnegative(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

// Natural log of a normal positive float (no zero, inf, NaN or denormal handling: Box-Muller clamps at 1e-7).
DDPM_HD float log_positive(float x) {
  const int32_t bits = float_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 126;              // x = m * 2^e with m in [0.5, 1)
  float m = bits_float((bits & 0x007fffff) | 0x3f000000);
  const int32_t low = m < 0.707106781186547524f;        // keep m in [sqrt(1/2), sqrt(2)) around 1: m -> 2m, e -> e - 1
  e -= low;                                             // arithmetic, not selects: the loops then vectorize on AVX2
  m = m + m * static_cast<float>(low) - 1.0f;           // too (GCC gives up if-converting this many selects)
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = p * m * z;
  y += -2.12194440e-4f * fe;                            // log(2) split in two for exact e * log(2)
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// sin and cos of x in [0, 2*pi) (and moderately beyond): reduction by pi/4 in three parts, then the two polynomials.
DDPM_HD void sincos_small(float x, float& s, float& c) {
  int32_t j = static_cast<int32_t>(x * 1.27323954473516f);  // 4 / pi
  j = (j + 1) & ~1;                                            // even octant: reduce to [-pi/4, pi/4]
  const float y = static_cast<float>(j);
  x = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const float z = x * x;
  float ps = -1.9515295891e-4f;
  ps = ps * z + 8.3321608736e-3f;
  ps = ps * z - 1.6666654611e-1f;
  const float sin_r = ps * z * x + x;
  float pc = 2.443315711809948e-5f;
  pc = pc * z - 1.388731625493765e-3f;
  pc = pc * z + 4.166664568298827e-2f;
  const float cos_r = pc * z * z - 0.5f * z + 1.0f;
  // octants 2-3 and 6-7: sin and cos trade places; then the signs (sin < 0 in the lower half turn, cos < 0 in the
  // left half): bit operations rather than selects, so that the loops vectorize
  const int32_t swap = -((j >> 1) & 1);
  const int32_t sin_bits = (float_bits(cos_r) & swap) | (float_bits(sin_r) & ~swap);
  const int32_t cos_bits = (float_bits(sin_r) & swap) | (float_bits(cos_r) & ~swap);
  s = bits_float(sin_bits ^ static_cast<int32_t>(static_cast<uint32_t>(j & 4) << 29));
  c = bits_float(cos_bits ^ static_cast<int32_t>(static_cast<uint32_t>((j + 2) & 4) << 29));
}

// exp(r) = 1 + r + r^2 q(r) for |r| <= ln(2) / 2, q of degree 4: coefficients fitted for this project (weighted
// least squares iterated toward minimax on the relative error of exp, in float64, then rounded to float32); one
// fewer term than Cephes' expf: exp_clamped is within 8.6e-8 relative (1.4 x 2^-24) of exp over [-87, 88], measured
// at steps of 1e-5 with and without FMA.
// Shared by exp_clamped and the AVX-512 GroupNorm kernels (csrc/cpu/group_norm_avx512.cpp).
constexpr float kExpQ4 = 1.381461275741458e-3f, kExpQ3 = 8.368710055947304e-3f, kExpQ2 = 4.166838899254799e-2f,
                kExpQ1 = 1.666652113199234e-1f, kExpQ0 = 4.999999403953552e-1f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 in two parts: n * kLn2Hi is exact

// exp(x) for x in [-87, 88] (clamped there; the callers' sigmoid needs no more): n = round(x / ln 2), the polynomial
// above on the remainder, 2^n through the exponent bits. Branch-free.
DDPM_HD float exp_clamped(float x) {
  x = select_bits(x < -87.0f, -87.0f, x);
  x = select_bits(x > 88.0f, 88.0f, x);
  const float n = (x * kLog2e + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 trick
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float q = kExpQ4;
  q = q * r + kExpQ3;
  q = q * r + kExpQ2;
  q = q * r + kExpQ1;
  q = q * r + kExpQ0;
  const float y = q * r * r + r + 1.0f;
  return y * bits_float((static_cast<int32_t>(n) + 127) << 23);
}

}  // namespace ddpm_fast
