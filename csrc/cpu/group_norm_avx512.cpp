// The fused GroupNorm's CPU kernels for float32 and bf16 x (T = float or uint16_t, bf16's bits: loaded as float32,
// the math in float32, rounded once on store), the U-Net's cases, with AVX-512 intrinsics: the portable
// kernels of group_norm.cpp spend most of their time in SiLU (exp and a divide per element) and in the per-channel
// loop set-up and horizontal sums that GCC's vectorization of 64-element rows costs. Here the exp is the polynomial
// of fastmath.h's exp_clamped with FMA and 2^n by vscalefps, the statistics of a whole group stay in vector
// accumulators, a row's tail is a masked load, and the next group's x is prefetched during this group's SiLU. The
// math is that of group_norm.h; results match the portable kernels to a few ulp (FMA), tests/test_group_norm.py runs
// both ($DDPM_FAST_CPU_ISA=portable).
#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "ddpm_fast/group_norm.h"
#include "group_norm_cpu.h"

// Everything below is AVX-512 code (the lambdas too, which a function's target attribute does not reach); the
// headers above are included first so that their inline functions are not compiled for AVX-512 here (a shared
// inline copy with AVX-512 instructions could be the one the linker keeps for the portable kernels).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#include "avx512_math.h"

namespace ddpm_fast {
namespace cpu {
namespace {

// sigmoid(z) = 1 / (1 + exp(-z)): a true divide (on this core as fast as rcp14 and a Newton step, and exact).
DDPM_AVX512 __m512 sigmoid16(__m512 z) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp_neg16(z)));
}

// z / (1 + exp(-z)), as group_norm.h's silu
DDPM_AVX512 __m512 silu16(__m512 z) { return _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_neg16(z))); }

// s (1 + z (1 - s)), s = sigmoid(z)
DDPM_AVX512 __m512 silu_grad16(__m512 z) {
  const __m512 one = _mm512_set1_ps(1.0f), s = sigmoid16(z);
  return _mm512_mul_ps(s, _mm512_fmadd_ps(z, _mm512_sub_ps(one, s), one));
}

// The dropout factor (group_norm.h's dropout_factor) of 16 uniforms: scale where u >= p, else 0; multiplied in, so
// a dropped NaN stays NaN as in the reference.
DDPM_AVX512 __m512 dropout16(__m512 u, __m512 p, __m512 scale) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(u, p, _CMP_GE_OQ), scale);
}

// f(s, mask) over a row of `spatial` floats: whole vectors with an all-ones mask, then the masked tail.
template <typename F>
DDPM_AVX512 void for_row(int64_t spatial, const F& f) {
  int64_t s = 0;
  for (; s + 16 <= spatial; s += 16) f(s, static_cast<__mmask16>(0xffff));
  if (s < spatial) f(s, static_cast<__mmask16>((1u << (spatial - s)) - 1));
}

}  // namespace

template <typename T, bool kAct, bool kDropout>
void forward_group_avx512(const GroupNormArgs<float>& a, const T* x, T* y, float* shift_out, float* rstd_out,
                          int64_t i, int64_t batch_groups, float eps, std::vector<float>& u) {
  const int64_t cg = a.channels / a.groups, spatial = a.spatial;
  const int64_t n = i / a.groups, c0 = (i - n * a.groups) * cg;
  const T* xg = x + (n * a.channels + c0) * spatial;  // contiguous: the group is one span, channel after channel
  T* yg = y + (n * a.channels + c0) * spatial;
  const float pa = add_of(a, n, c0);
  const __m512 px = _mm512_set1_ps(to_float(xg[0]));
  // Statistics: d = (x - px) + (add - pa) summed in four pairs of accumulators (one pair would leave the loop
  // waiting on the add latency), each vector j of a row into pair j % 4.
  __m512 sum[4], sum_sq[4];
  for (int j = 0; j < 4; ++j) sum[j] = sum_sq[j] = _mm512_setzero_ps();
  const auto accumulate = [&](int j, const T* p, __m512 da, __mmask16 m) {
    const __m512 d = _mm512_add_ps(_mm512_sub_ps(load16(p, m), px), da);
    sum[j] = _mm512_mask_add_ps(sum[j], m, sum[j], d);
    sum_sq[j] = _mm512_mask3_fmadd_ps(d, d, sum_sq[j], m);
  };
  for (int64_t c = 0; c < cg; ++c) {
    const __m512 da = _mm512_set1_ps(add_of(a, n, c0 + c) - pa);
    const T* row = xg + c * spatial;
    int64_t s = 0;
    for (; s + 64 <= spatial; s += 64)
      for (int j = 0; j < 4; ++j) accumulate(j, row + s + 16 * j, da, 0xffff);
    for (int j = 0; s < spatial; s += 16, ++j)
      accumulate(j, row + s, da, spatial - s >= 16 ? 0xffff : static_cast<__mmask16>((1u << (spatial - s)) - 1));
  }
  const __m512 sum_all = _mm512_add_ps(_mm512_add_ps(sum[0], sum[1]), _mm512_add_ps(sum[2], sum[3]));
  const __m512 sum_sq_all = _mm512_add_ps(_mm512_add_ps(sum_sq[0], sum_sq[1]), _mm512_add_ps(sum_sq[2], sum_sq[3]));
  float shift, rstd;
  shifted_stats(_mm512_reduce_add_ps(sum_all), _mm512_reduce_add_ps(sum_sq_all), cg * spatial, eps, shift, rstd);
  shift_out[i] = shift;
  rstd_out[i] = rstd;
  const int64_t u0 = kDropout ? draw_uniforms(a, n, c0, cg, u) : 0;  // before u.data(): it resizes u
  const float* ug = kDropout ? u.data() + u0 : nullptr;
  const __m512 p = _mm512_set1_ps(a.dropout), scale = _mm512_set1_ps(a.scale);
  // The next group's x, fetched into the cache while this one's SiLU keeps the core busy (one line per vector here,
  // the same offset there), so that its statistics pass reads the cache rather than memory.
  const int64_t m_group = cg * spatial;
  const bool fetch_next = i + 1 < batch_groups;
  for (int64_t c = 0; c < cg; ++c) {
    // z = (x - px) w' + (k w' + b), w' = weight rstd, k = (add - pa) - shift: x - px first, exact near the pivot
    // (folding px into the bias would cancel two large products and lose the mean-1e3 precision)
    const float w_c = a.weight[c0 + c] * rstd;
    const __m512 w = _mm512_set1_ps(w_c);
    const __m512 kb = _mm512_set1_ps((add_of(a, n, c0 + c) - pa - shift) * w_c + a.bias[c0 + c]);
    const T* row = xg + c * spatial;
    T* out = yg + c * spatial;
    const float* uc = kDropout ? ug + c * spatial : nullptr;
    for_row(spatial, [&](int64_t s, __mmask16 m) {
      if (fetch_next) _mm_prefetch(reinterpret_cast<const char*>(row + s + m_group), _MM_HINT_T0);
      __m512 v = _mm512_fmadd_ps(_mm512_sub_ps(load16(row + s, m), px), w, kb);
      if constexpr (kAct) v = silu16(v);
      if constexpr (kDropout) v = _mm512_mul_ps(v, dropout16(load16(uc + s, m), p, scale));
      store16(out + s, m, v);
    });
  }
}

// One sample n of float32 channels_last x (no dropout): every group at once, since a position's C channels are
// contiguous and a group's cg of them interleave with the others'. Pass 1 sums d = (x - px) + (add - pa) per channel
// over the positions (px, pa: the pivot of the channel's group, as forward_group_avx512), 16 channels per vector;
// the groups' statistics follow from the channels' sums. Pass 2 writes z = (x - px) w' + kb per channel (w', kb as
// forward_group_avx512) position after position, reading the sample from L2 (a sample is at most a few hundred KiB
// at the U-Net's shapes; NCHW's groups fit L1, so this layout's norm is ~15% slower, what its convolutions win back),
// and prefetches the next sample for its pass 1 when `fetch_next`. `buf` holds 5 C floats.
template <typename T, bool kAct>
void forward_sample_nhwc_avx512(const GroupNormArgs<float>& a, const T* x, T* y, float* shift_out,
                                float* rstd_out, int64_t n, float eps, bool fetch_next, std::vector<float>& buf) {
  const int64_t channels = a.channels, cg = channels / a.groups, spatial = a.spatial;
  const T* xs = x + n * channels * spatial;
  T* ys = y + n * channels * spatial;
  buf.resize(5 * channels);
  float *px = buf.data(), *da = px + channels, *sum = da + channels, *sum_sq = sum + channels, *kb = sum_sq + channels;
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t c0 = c - c % cg;
    px[c] = to_float(xs[c0]);  // position 0, the group's first channel
    da[c] = add_of(a, n, c) - add_of(a, n, c0);
  }
  // Pass 1 over chunks of up to kBlocks vectors of channels: the chunk's accumulators stay in registers while the
  // positions stream by (for C <= 16 kBlocks, whole rows in address order).
  constexpr int64_t kBlocks = 8;
  for (int64_t c0 = 0; c0 < channels; c0 += 16 * kBlocks) {
    const int64_t blocks = std::min<int64_t>(kBlocks, (channels - c0 + 15) / 16);
    __m512 p[kBlocks], d_add[kBlocks], s[kBlocks], q[kBlocks];
    __mmask16 m[kBlocks];
    for (int64_t j = 0; j < kBlocks; ++j) {
      const int64_t c = c0 + 16 * j;
      m[j] = j < blocks ? first_lanes(channels - c) : static_cast<__mmask16>(0);
      p[j] = j < blocks ? load16(px + c, m[j]) : _mm512_setzero_ps();
      d_add[j] = j < blocks ? load16(da + c, m[j]) : _mm512_setzero_ps();
      s[j] = q[j] = _mm512_setzero_ps();
    }
    const auto run = [&](auto count) {  // count: the chunk's vectors, a compile-time constant (unrolled)
      for (int64_t pos = 0; pos < spatial; ++pos) {
        const T* row = xs + pos * channels + c0;
        for (int64_t j = 0; j < decltype(count)::value; ++j) {
          const __m512 d = _mm512_add_ps(_mm512_sub_ps(load16(row + 16 * j, m[j]), p[j]), d_add[j]);
          s[j] = _mm512_add_ps(s[j], d);
          q[j] = _mm512_fmadd_ps(d, d, q[j]);
        }
      }
    };
    switch (blocks) {
      case 1: run(std::integral_constant<int64_t, 1>{}); break;
      case 2: run(std::integral_constant<int64_t, 2>{}); break;
      case 3: run(std::integral_constant<int64_t, 3>{}); break;
      case 4: run(std::integral_constant<int64_t, 4>{}); break;
      case 5: run(std::integral_constant<int64_t, 5>{}); break;
      case 6: run(std::integral_constant<int64_t, 6>{}); break;
      case 7: run(std::integral_constant<int64_t, 7>{}); break;
      default: run(std::integral_constant<int64_t, 8>{}); break;
    }
    for (int64_t j = 0; j < blocks; ++j) {
      _mm512_mask_storeu_ps(sum + c0 + 16 * j, m[j], s[j]);
      _mm512_mask_storeu_ps(sum_sq + c0 + 16 * j, m[j], q[j]);
    }
  }
  for (int64_t g = 0; g < a.groups; ++g) {
    float sg = 0, qg = 0;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      sg += sum[c];
      qg += sum_sq[c];
    }
    float shift, rstd;
    shifted_stats(sg, qg, cg * spatial, eps, shift, rstd);
    shift_out[n * a.groups + g] = shift;
    rstd_out[n * a.groups + g] = rstd;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {  // sum, sum_sq become w' and kb
      const float w_c = a.weight[c] * rstd;
      sum[c] = w_c;
      kb[c] = (da[c] - shift) * w_c + a.bias[c];
    }
  }
  const T* next = fetch_next ? xs + channels * spatial : nullptr;
  for (int64_t pos = 0; pos < spatial; ++pos) {
    const T* row = xs + pos * channels;
    T* out = ys + pos * channels;
    for (int64_t c = 0; c < channels; c += 16) {
      if (next != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next + pos * channels + c), _MM_HINT_T0);
      const __mmask16 m = first_lanes(channels - c);
      __m512 v = _mm512_fmadd_ps(_mm512_sub_ps(load16(row + c, m), load16(px + c, m)), load16(sum + c, m),
                                 load16(kb + c, m));
      if constexpr (kAct) v = silu16(v);
      store16(out + c, m, v);
    }
  }
}

// The portable backward_group's math in one read of (x, dy) for the gradient terms: pass 1 keeps dz (dy times the
// dropout factor and SiLU's derivative) in `dz` for pass 2, instead of recomputing its exp and re-reading dy.
template <typename T, bool kAct, bool kDropout>
void backward_group_avx512(const GroupNormArgs<float>& a, const T* dy, const T* x, const float* shift_in,
                           const float* rstd_in, T* dx, float* dw_nc, float* db_nc, float* dadd, int64_t i,
                           std::vector<float>& u, std::vector<float>& dz) {
  const int64_t cg = a.channels / a.groups, spatial = a.spatial, m_group = cg * spatial;
  const int64_t n = i / a.groups, c0 = (i - n * a.groups) * cg;
  const int64_t first = (n * a.channels + c0) * spatial;
  const T *xg = x + first, *dyg = dy + first;
  T* dxg = dx + first;
  const float pa = add_of(a, n, c0), shift = shift_in[i];
  const __m512 px = _mm512_set1_ps(to_float(xg[0])), rstd = _mm512_set1_ps(rstd_in[i]);
  const int64_t u0 = kDropout ? draw_uniforms(a, n, c0, cg, u) : 0;  // before u.data(): it resizes u
  const float* ug = kDropout ? u.data() + u0 : nullptr;
  const __m512 p = _mm512_set1_ps(a.dropout), scale = _mm512_set1_ps(a.scale);
  dz.resize(m_group);
  float sum_g = 0, sum_gx = 0;
  for (int64_t c = 0; c < cg; ++c) {  // pass 1: dz, and per-channel sums of dz and dz * xhat
    // xhat = (x - px) rstd + k rstd, k = (add - pa) - shift
    const __m512 krstd = _mm512_mul_ps(_mm512_set1_ps(add_of(a, n, c0 + c) - pa - shift), rstd);
    const float w_c = a.weight[c0 + c];
    const __m512 w = _mm512_set1_ps(w_c), b = _mm512_set1_ps(a.bias[c0 + c]);
    const T *xr = xg + c * spatial, *dyr = dyg + c * spatial;
    const float* uc = kDropout ? ug + c * spatial : nullptr;
    float* dzr = dz.data() + c * spatial;
    __m512 dw = _mm512_setzero_ps(), db = _mm512_setzero_ps();
    for_row(spatial, [&](int64_t s, __mmask16 m) {
      const __m512 xhat = _mm512_fmadd_ps(_mm512_sub_ps(load16(xr + s, m), px), rstd, krstd);
      __m512 g = load16(dyr + s, m);
      if constexpr (kDropout) g = _mm512_mul_ps(g, dropout16(load16(uc + s, m), p, scale));
      if constexpr (kAct) g = _mm512_mul_ps(g, silu_grad16(_mm512_fmadd_ps(xhat, w, b)));
      g = _mm512_maskz_mov_ps(m, g);  // the tail's lanes past the row add nothing
      _mm512_mask_storeu_ps(dzr + s, m, g);
      dw = _mm512_fmadd_ps(g, xhat, dw);
      db = _mm512_add_ps(db, g);
    });
    const float dw_c = _mm512_reduce_add_ps(dw), db_c = _mm512_reduce_add_ps(db);
    dw_nc[n * a.channels + c0 + c] = dw_c;
    db_nc[n * a.channels + c0 + c] = db_c;
    sum_g += db_c * w_c;
    sum_gx += dw_c * w_c;
  }
  const __m512 mean_g = _mm512_set1_ps(sum_g / static_cast<float>(m_group));
  const __m512 mean_gx = _mm512_set1_ps(sum_gx / static_cast<float>(m_group));
  for (int64_t c = 0; c < cg; ++c) {  // pass 2: dx = rstd (dz w - mean_g - xhat mean_gx) and its per-channel sum
    const __m512 krstd = _mm512_mul_ps(_mm512_set1_ps(add_of(a, n, c0 + c) - pa - shift), rstd);
    const __m512 w = _mm512_set1_ps(a.weight[c0 + c]);
    const T* xr = xg + c * spatial;
    const float* dzr = dz.data() + c * spatial;
    T* dxr = dxg + c * spatial;
    __m512 dadd_c = _mm512_setzero_ps();
    for_row(spatial, [&](int64_t s, __mmask16 m) {
      const __m512 xhat = _mm512_fmadd_ps(_mm512_sub_ps(load16(xr + s, m), px), rstd, krstd);
      const __m512 d = _mm512_mul_ps(
          rstd, _mm512_sub_ps(_mm512_fmsub_ps(load16(dzr + s, m), w, mean_g), _mm512_mul_ps(xhat, mean_gx)));
      store16(dxr + s, m, d);
      dadd_c = _mm512_mask_add_ps(dadd_c, m, dadd_c, d);
    });
    if (dadd != nullptr) dadd[n * a.channels + c0 + c] = _mm512_reduce_add_ps(dadd_c);
  }
}

#define DDPM_INSTANTIATE(T, act, dropout)                                                                          \
  template void forward_group_avx512<T, act, dropout>(const GroupNormArgs<float>&, const T*, T*, float*, float*,     \
                                                      int64_t, int64_t, float, std::vector<float>&);              \
  template void backward_group_avx512<T, act, dropout>(const GroupNormArgs<float>&, const T*, const T*,             \
                                                       const float*, const float*, T*, float*, float*, float*,      \
                                                       int64_t, std::vector<float>&, std::vector<float>&);
#define DDPM_INSTANTIATE_ALL(T)                                                                                    \
  template void forward_sample_nhwc_avx512<T, false>(const GroupNormArgs<float>&, const T*, T*, float*, float*,     \
                                                     int64_t, float, bool, std::vector<float>&);                   \
  template void forward_sample_nhwc_avx512<T, true>(const GroupNormArgs<float>&, const T*, T*, float*, float*,      \
                                                    int64_t, float, bool, std::vector<float>&);                    \
  DDPM_INSTANTIATE(T, false, false)                                                                                \
  DDPM_INSTANTIATE(T, false, true)                                                                                 \
  DDPM_INSTANTIATE(T, true, false)                                                                                 \
  DDPM_INSTANTIATE(T, true, true)
DDPM_INSTANTIATE_ALL(float)
DDPM_INSTANTIATE_ALL(uint16_t)
#undef DDPM_INSTANTIATE_ALL
#undef DDPM_INSTANTIATE

}  // namespace cpu
}  // namespace ddpm_fast

#pragma GCC pop_options
