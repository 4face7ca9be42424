// AVX-512 building blocks shared by the CPU kernels that use intrinsics (group_norm_avx512.cpp, softmax_avx512.cpp).
// Include only inside a `#pragma GCC target("avx512f,avx512bw,avx512vl")` region (cpu_isa.h's avx512), after every other header (ddpm_fast/fastmath.h, for
// the exp constants, among them: a header first included inside the region would have its inline functions compiled
// for AVX-512, and the linker could keep that copy for the portable kernels too).
#pragma once
#include <immintrin.h>

namespace ddpm_fast {
namespace cpu {
namespace {

#define DDPM_AVX512 __attribute__((always_inline)) inline

// exp(-z), z clamped to [-88, 87]: fastmath.h's exp_clamped on 16 lanes with FMA and 2^n by vscalefps. The
// negation is folded in: with t = z + n ln 2 = -r, exp(-z) = 1 - t + t^2 q(-t), q's odd coefficients negated.
DDPM_AVX512 __m512 exp_neg16(__m512 z) {
  z = _mm512_min_ps(_mm512_max_ps(z, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(z, _mm512_set1_ps(-kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 t = _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Hi), z);
  t = _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Lo), t);
  __m512 q = _mm512_set1_ps(kExpQ4);
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-kExpQ3));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(kExpQ2));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-kExpQ1));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(kExpQ0));
  const __m512 e = _mm512_fmadd_ps(_mm512_mul_ps(q, t), t, _mm512_sub_ps(_mm512_set1_ps(1.0f), t));
  return _mm512_scalef_ps(e, n);
}

DDPM_AVX512 __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
DDPM_AVX512 void store16(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }

// bf16 (its bits, uint16_t: c10's BFloat16 is not included inside the AVX-512 region): widened exactly to float32
// on load; rounded to nearest even on store, NaN as 0x7fc0, bit for bit c10::BFloat16's conversion (vcvtneps2bf16
// would flush denormals, and AVX512-BF16 is not on every AVX-512 CPU).
DDPM_AVX512 __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
DDPM_AVX512 void store16(uint16_t* p, __mmask16 m, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7fff));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(rounded));
}
DDPM_AVX512 float to_float(float v) { return v; }
DDPM_AVX512 float to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

// The mask of the first `count` lanes (all 16 for count >= 16).
DDPM_AVX512 __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1);
}

}  // namespace
}  // namespace cpu
}  // namespace ddpm_fast
