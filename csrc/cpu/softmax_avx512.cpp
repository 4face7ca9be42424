// The attention tile's row softmax in float32 with AVX-512 (attention.cpp): three passes over a row that sits in the
// cache (its maximum; exp(s - max) and its sum; the scaling by 1 / sum), and the row's log-sum-exp for the backward.
// ATen's logsumexp, sub_ and exp_ made six passes and four calls; the exp is fastmath.h's polynomial (within
// 1.4 2^-24 of exp, as the GroupNorm's SiLU).
#include <cmath>
#include <cstdint>

#include "ddpm_fast/fastmath.h"
#include "softmax_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#include "avx512_math.h"

namespace ddpm_fast {
namespace cpu {

void softmax_rows_avx512(float* p, int64_t rows, int64_t cols, float* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = p + r * cols;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 k = first_lanes(cols - j);
      m = _mm512_mask_max_ps(m, k, m, load16(row + j, k));
    }
    const float row_max = _mm512_reduce_max_ps(m);
    // exp(s - max) = exp(-(max - s)); a row of -inf (no finite score) gives NaN, as ATen's softmax does
    const __m512 mx = _mm512_set1_ps(row_max);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 k = first_lanes(cols - j);
      const __m512 e = exp_neg16(_mm512_sub_ps(mx, load16(row + j, k)));
      _mm512_mask_storeu_ps(row + j, k, e);
      sum = _mm512_mask_add_ps(sum, k, sum, e);
    }
    const float total = _mm512_reduce_add_ps(sum);
    const __m512 inv = _mm512_set1_ps(1.0f / total);
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 k = first_lanes(cols - j);
      _mm512_mask_storeu_ps(row + j, k, _mm512_mul_ps(load16(row + j, k), inv));
    }
    lse[r] = row_max + std::log(total);
  }
}

}  // namespace cpu
}  // namespace ddpm_fast

#pragma GCC pop_options
