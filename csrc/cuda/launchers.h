// Host launchers of the CUDA kernels. No torch header here, so the .cu files compile with plain nvcc in seconds;
// csrc/cuda/bindings.cpp checks the tensors and calls these with pointers, sizes and the current stream.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "ddpm_fast/diffusion_step.h"

namespace ddpm_fast {
namespace cuda {

// Element types of the data inputs (the state, tables and outputs of the forward ops are float32 on the GPU).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// words[4 * i + j] = Philox4x32-10(counter[4 * i .. 4 * i + 3], seed)[j]; counter words hold uint32 values.
cudaError_t philox(const int64_t* counter, int64_t* words, int64_t n, uint64_t seed, cudaStream_t stream);

// out[b * numel + e] = normal e of sample b (docs/design.md layout): counter (e / 4, sample_index[b], counter2[b], c3).
cudaError_t philox_normal(const int64_t* sample_index, const int64_t* counter2, float* out, int64_t batch,
                          int64_t numel, uint64_t seed, uint32_t c3, cudaStream_t stream);

// The fused diffusion ops (csrc/ops.cpp has the schemas). coef rows are float32, `timesteps` rows; a t outside
// [0, timesteps) writes NaN (the host cannot check t without a sync). Samples are `numel`-element spans at
// b * numel for the memory-order ops; the Philox ops index through `layout` in logical order.
cudaError_t q_sample(DType dtype, const void* x0, const void* noise, const int64_t* t, const float* coef,
                     int64_t timesteps, float* x_t, int64_t batch, int64_t numel, cudaStream_t stream);
cudaError_t q_sample_philox(DType dtype, const void* x0, const int64_t* t, const float* coef, int64_t timesteps,
                            const int64_t* sample_index, const int64_t* counter2, float* x_t, float* eps,
                            int64_t batch, SampleLayout layout, uint64_t seed, uint32_t c3, cudaStream_t stream);
// partial[b * chunks + c] = sum over chunk c of sample b of (eps_pred - eps)^2, chunks = simple_loss_chunks(numel).
int64_t simple_loss_chunks(int64_t numel);
cudaError_t simple_loss_partial(DType pred_dtype, const void* eps_pred, DType eps_dtype, const void* eps,
                                float* partial, int64_t batch, int64_t numel, cudaStream_t stream);
cudaError_t simple_loss_backward(DType pred_dtype, const void* eps_pred, DType eps_dtype, const void* eps,
                                 const float* grad, void* grad_pred, int64_t batch, int64_t numel,
                                 cudaStream_t stream);
// x0_hat may be null (not written); nonfinite_t may be null (else raised to t[b] where x_{t-1} is not finite).
cudaError_t reverse_step(DType eps_dtype, const float* x_t, const void* eps, const int64_t* t, const float* coef,
                         int64_t timesteps, const int64_t* sample_index, const int64_t* counter2, float* x_prev,
                         float* x0_hat, int64_t* nonfinite_t, int64_t batch, SampleLayout layout, uint64_t seed,
                         uint32_t c3, bool clip, cudaStream_t stream);

// The fused GroupNorm (+ add, SiLU, dropout; csrc/ops.cpp has the schemas, csrc/cpu/group_norm.cpp the CPU kernels).
// x, y, dy and dx are `dtype`, (N, C, S) contiguous or, with channels_last, (N, S, C) in memory; the small inputs
// are float32 and contiguous: weight, bias (C,), add (N, C) or null. Logical element e = c * S + s of sample n.
struct GroupNormParams {
  int64_t batch, channels, groups, spatial;  // N, C, G (divides C), S
  bool channels_last, act;
  const float *weight, *bias, *add;
  float dropout, scale;                      // p in [0, 1) (0: no mask) and 1 / (1 - p)
  const int64_t *sample_index, *counter2;    // (N,) Philox counter words, read only where dropout > 0
  uint64_t seed;
  uint32_t c3;                               // stream 4 | layer << 8
};
// Writes y and, per (n, group), shift = mean - pivot and rstd (float32, (N, G)).
cudaError_t group_norm_silu(DType dtype, const GroupNormParams& p, const void* x, void* y, float eps, float* shift,
                            float* rstd, cudaStream_t stream);
// Writes dx and the float32 (N, C) per-sample sums dw_nc = sum_s dz xhat, db_nc = sum_s dz, and dadd = sum_s dx
// (dadd null where there is no add).
cudaError_t group_norm_silu_backward(DType dtype, const GroupNormParams& p, const void* dy, const void* x,
                                     const float* shift, const float* rstd, void* dx, float* dw_nc, float* db_nc,
                                     float* dadd, cudaStream_t stream);

}  // namespace cuda
}  // namespace ddpm_fast
