// Per-element math of the fused GroupNorm (+ add, SiLU, dropout), shared by the CPU and CUDA kernels.
//
// y = dropout(act(GN(x + add[n, c]))). Statistics are taken relative to a pivot, the group's first element with x
// and add kept apart (px = x[n, c0, 0], pa = add[n, c0]): d = (x - px) + (add - pa) is exact where x is close to px,
// so float32 inputs of mean 1e3 and std 1e-3 normalise to ~1e-7 (a plain sum of x loses ~2e-2 there). The forward
// saves shift = mean - pivot and rstd; xhat = (d - shift) * rstd everywhere.
#pragma once
#include <cmath>
#include <cstdint>

#include "ddpm_fast/fastmath.h"

namespace ddpm_fast {

DDPM_HD float sigmoid(float z) { return 1.0f / (1.0f + exp_clamped(-z)); }
inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }  // float64: the CPU's gradcheck path

// z sigmoid(z) as z / (1 + exp(-z)): one divide.
DDPM_HD float silu(float z) { return z / (1.0f + exp_clamped(-z)); }
inline double silu(double z) { return z / (1.0 + std::exp(-z)); }

// d silu / dz = s (1 + z (1 - s)), s = sigmoid(z).
template <typename T>
DDPM_HD T silu_grad(T z) {
  const T s = sigmoid(z);
  return s * (T(1) + z * (T(1) - s));
}

// The dropout factor of one element: 0 if its uniform u (Philox stream 4) is below p, else 1 / (1 - p).
DDPM_HD float dropout_factor(float u, float p, float scale) { return select_bits(u >= p, scale, 0.0f); }
inline double dropout_factor(float u, float p, double scale) { return u >= p ? scale : 0.0; }

// rstd = 1 / sqrt(var + eps) from the shifted sums over m elements; shift = sum / m (the mean less the pivot).
template <typename T>
DDPM_HD void shifted_stats(T sum, T sum_sq, int64_t m, T eps, T& shift, T& rstd) {
  const T inv_m = T(1) / static_cast<T>(m);
  shift = sum * inv_m;
  T var = sum_sq * inv_m - shift * shift;
  var = var > T(0) ? var : T(0);
  rstd = T(1) / std::sqrt(var + eps);
}

}  // namespace ddpm_fast
