// Per-element math of the fused diffusion ops (forward noising, L_simple, the reverse step), shared by the CPU and
// CUDA kernels, and the int64 index arithmetic that maps a sample's logical element to memory.
#pragma once
#include <cmath>
#include <cstdint>

#include "ddpm_fast/fastmath.h"

namespace ddpm_fast {

// One sample is `numel` elements in logical order (C, H, W) = (C, S): element e is channel e / S, position e % S.
// Noise is keyed by the logical index (docs/design.md), so channels_last gives the same noise as contiguous.
struct SampleLayout {
  int64_t numel;     // elements per sample
  int64_t spatial;   // S: H * W for images, numel for a contiguous sample of any shape
  int64_t stride_b;  // elements between samples
  int64_t stride_c;  // between channels: S when contiguous, 1 when channels_last
  int64_t stride_s;  // between positions: 1 when contiguous, C when channels_last
};

DDPM_HD int64_t element_offset(const SampleLayout& layout, int64_t b, int64_t e) {
  const int64_t c = e / layout.spatial;
  return b * layout.stride_b + c * layout.stride_c + (e - c * layout.spatial) * layout.stride_s;
}

// Columns of a q_sample coefficient row (one row per timestep): x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.
enum QSampleCoef : int { kSqrtAbar = 0, kSqrtOneMinusAbar = 1, kQSampleCoefs = 2 };

// Columns of a reverse-step coefficient row. Both DDPM (posterior mean at x0_hat, Ho et al. eq. 7) and DDIM (Song
// et al. eq. 12, eps re-derived from the clipped x0_hat) are x_{t-1} = c_x0 x0_hat + c_xt x_t + sigma z with
// x0_hat = a x_t - b eps; ddpm_fast/diffusion.py builds the rows in float64.
enum StepCoef : int { kSqrtRecipAbar = 0, kSqrtRecipm1Abar = 1, kCoefX0 = 2, kCoefXt = 3, kSigma = 4, kStepCoefs = 5 };

template <typename T>
DDPM_HD T q_sample_element(T sqrt_abar, T sqrt_one_minus_abar, T x0, T eps) {
  return sqrt_abar * x0 + sqrt_one_minus_abar * eps;
}

// x0_hat, clipped to [-1, 1] when asked; NaN stays NaN (as torch.clamp).
template <typename T>
DDPM_HD T predict_x0(T sqrt_recip_abar, T sqrt_recipm1_abar, T x_t, T eps, bool clip) {
  T x0 = sqrt_recip_abar * x_t - sqrt_recipm1_abar * eps;
  if (clip) {
    x0 = x0 < T(-1) ? T(-1) : x0;
    x0 = x0 > T(1) ? T(1) : x0;
  }
  return x0;
}

// The mean part of x_{t-1}; the kernels add sigma z only where the step draws noise (t != 0 and sigma != 0).
template <typename T>
DDPM_HD T step_mean(T coef_x0, T coef_xt, T x0_hat, T x_t) {
  return coef_x0 * x0_hat + coef_xt * x_t;
}

// Whether a value of x_{t-1} is finite: |v| < inf is false for NaN and +-inf (the reverse step records the t of a
// step whose output is not, for the sampler's flag).
template <typename T>
DDPM_HD bool finite_value(T v) {
  return (v < T(0) ? -v : v) < static_cast<T>(INFINITY);
}

// d L_simple / d eps_pred for one element: L = mean_e (eps_pred - eps)^2 per sample, so 2 (eps_pred - eps) / numel.
template <typename T>
DDPM_HD T simple_loss_grad(T grad_scaled, T eps_pred, T eps) {
  return grad_scaled * (eps_pred - eps);  // grad_scaled = grad[b] * 2 / numel
}

}  // namespace ddpm_fast
