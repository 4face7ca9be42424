// Philox4x32-10 and the Box-Muller normal pair, shared by the CPU and CUDA kernels.
// Bit-for-bit the generator of Triton's tl.philox (32-bit counters) and Random123's philox4x32_10,
// and the uniform/normal maps of tl.random.uint_to_uniform_float / pair_uniform_to_normal,
// so a seed gives the same noise on every backend (docs/design.md, "Random numbers").
#pragma once
#include <cmath>
#include <cstdint>

#include "ddpm_fast/fastmath.h"

namespace ddpm_fast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key increments (Weyl sequence)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Streams of the counter word c3 (low 8 bits); the dropout layer index goes in the bits above.
enum PhiloxStream : uint32_t {
  kStreamXT = 0, kStreamReverse = 1, kStreamTrainEps = 2, kStreamTrainT = 3,
  kStreamDropout = 4, kStreamFlip = 5, kStreamEvalEps = 6,
};

DDPM_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds on the counter c (in place) with key (k0, k1).
DDPM_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t c0 = c[0], c2 = c[2];
    c[0] = mulhi32(kPhiloxM1, c2) ^ c[1] ^ k0;
    c[2] = mulhi32(kPhiloxM0, c0) ^ c[3] ^ k1;
    c[1] = kPhiloxM1 * c2;
    c[3] = kPhiloxM0 * c0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// uint32 -> [0, 1) as Triton: reinterpret as int32, fold negatives with ~x, scale so that INT32_MAX maps below 1.
DDPM_HD float uint_to_uniform(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  s ^= s >> 31;  // ~s where negative (arithmetic shift), without a select
  return static_cast<float>(s) * 4.6566127342e-10f;
}

// Box-Muller on (u1, u2): u1 clamped at 1e-7 so log stays finite; cos first, then sin. log/sin/cos are the
// vectorizable ones of fastmath.h (within 2 ulp of libm's), so normals agree with the reference to a few ulp.
DDPM_HD void pair_uniform_to_normal(float u1, float u2, float& n0, float& n1) {
  u1 = select_bits(u1 < 1.0e-7f, 1.0e-7f, u1);
  const float th = 6.283185307179586f * u2;
  const float r = sqrt_nonnegative(-2.0f * log_positive(u1));
  float s, c;
  sincos_small(th, s, c);
  n0 = r * c;
  n1 = r * s;
}

// Four standard normals for the counter (c0, c1, c2, c3) under the 64-bit seed.
DDPM_HD void philox_normal4(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, float out[4]) {
  uint32_t c[4] = {c0, c1, c2, c3};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  pair_uniform_to_normal(uint_to_uniform(c[0]), uint_to_uniform(c[1]), out[0], out[1]);
  pair_uniform_to_normal(uint_to_uniform(c[2]), uint_to_uniform(c[3]), out[2], out[3]);
}

}  // namespace ddpm_fast
