// What the CPU GroupNorm kernels share: the arguments of one op call and their lookups (group_norm.cpp: the
// portable kernels for every dtype and layout; group_norm_avx512.cpp: float32 and bf16 with AVX-512 intrinsics).
#pragma once
#include <cstdint>
#include <vector>

#include "philox_cpu.h"

namespace ddpm_fast {
namespace cpu {

// What every pass needs of one op call.
template <typename acc_t>
struct GroupNormArgs {
  int64_t channels, groups, spatial;  // C, G, S = H * W (the product of the trailing dims)
  bool channels_last, act;
  const acc_t *weight, *bias, *add;   // (C,), (C,), (N, C) or null; all in the accumulation dtype
  float dropout;                      // p; 0 = no mask
  acc_t scale;                        // 1 / (1 - p)
  const int64_t *sample_index, *counter2;
  uint64_t seed;
  uint32_t c3;
};

template <typename acc_t>
inline int64_t offset(const GroupNormArgs<acc_t>& a, int64_t n, int64_t c, int64_t s) {
  const int64_t base = n * a.channels * a.spatial;
  return a.channels_last ? base + s * a.channels + c : base + c * a.spatial + s;
}

// add[n, c] of the op (0 without one): the per-(sample, channel) vector added before the statistics.
template <typename acc_t>
inline acc_t add_of(const GroupNormArgs<acc_t>& a, int64_t n, int64_t c) {
  return a.add != nullptr ? a.add[n * a.channels + c] : acc_t(0);
}

// The dropout uniforms of logical elements [c0 * S, (c0 + cg) * S) of sample n (logical order: channel-major), into
// u; returns the index in u of element c0 * S (counters start on multiples of four).
template <typename acc_t>
inline int64_t draw_uniforms(const GroupNormArgs<acc_t>& a, int64_t n, int64_t c0, int64_t cg, std::vector<float>& u) {
  const int64_t first = c0 * a.spatial, last = (c0 + cg) * a.spatial;
  const int64_t q0 = first / 4, quads = (last + 3) / 4 - q0;
  u.resize(4 * quads);
  philox_uniforms(a.seed, static_cast<uint32_t>(q0), quads, static_cast<uint32_t>(a.sample_index[n]),
                  static_cast<uint32_t>(a.counter2[n]), a.c3, u.data());
  return first - 4 * q0;
}

// One (sample, group) i of contiguous x with AVX-512 (group_norm_avx512.cpp), T = float or uint16_t (bf16's bits);
// the same math as the portable forward_group / backward_group of group_norm.cpp in float32, explicitly vectorized
// (FMA, exp through vscalefps, masked tails), bf16 rounded once on store as c10::BFloat16.
template <typename T, bool kAct, bool kDropout>
void forward_group_avx512(const GroupNormArgs<float>& a, const T* x, T* y, float* shift_out, float* rstd_out,
                          int64_t i, int64_t batch_groups, float eps, std::vector<float>& u);
// One sample of channels_last x without dropout, all its groups (the layout interleaves them).
template <typename T, bool kAct>
void forward_sample_nhwc_avx512(const GroupNormArgs<float>& a, const T* x, T* y, float* shift_out, float* rstd_out,
                                int64_t n, float eps, bool fetch_next, std::vector<float>& buf);
template <typename T, bool kAct, bool kDropout>
void backward_group_avx512(const GroupNormArgs<float>& a, const T* dy, const T* x, const float* shift_in,
                           const float* rstd_in, T* dx, float* dw_nc, float* db_nc, float* dadd, int64_t i,
                           std::vector<float>& u, std::vector<float>& dz);

}  // namespace cpu
}  // namespace ddpm_fast
