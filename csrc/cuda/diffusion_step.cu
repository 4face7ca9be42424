// CUDA kernels of the fused diffusion ops. One thread per Philox counter (four logical elements) for the ops that
// draw noise, grid-stride loops with int64 indices everywhere; the per-element math is the header shared with the
// CPU kernels (csrc/include/ddpm_fast/diffusion_step.h, philox.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "ddpm_fast/diffusion_step.h"
#include "ddpm_fast/philox.h"
#include "dtypes.cuh"
#include "launchers.h"

namespace ddpm_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kLossThreads = 256;
constexpr int64_t kLossChunk = kLossThreads * 8;  // elements per loss block

int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 16 ? blocks : 65535 * 16);  // grid-stride loops cover the rest
}

#define DDPM_GRID_STRIDE(i, n)                                                                     \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n);         \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename T>
__global__ void q_sample_kernel(const T* __restrict__ x0, const T* __restrict__ noise, const int64_t* __restrict__ t,
                                const float* __restrict__ coef, int64_t timesteps, float* __restrict__ x_t,
                                int64_t numel, int64_t total) {
  DDPM_GRID_STRIDE(i, total) {
    const int64_t tb = t[i / numel];
    const bool valid = tb >= 0 && tb < timesteps;
    const float* row = coef + (valid ? tb : 0) * kQSampleCoefs;
    const float v = q_sample_element(row[kSqrtAbar], row[kSqrtOneMinusAbar], to_float(x0[i]), to_float(noise[i]));
    x_t[i] = valid ? v : NAN;
  }
}

template <typename T>
__global__ void q_sample_philox_kernel(const T* __restrict__ x0, const int64_t* __restrict__ t,
                                       const float* __restrict__ coef, int64_t timesteps,
                                       const int64_t* __restrict__ sample_index, const int64_t* __restrict__ counter2,
                                       float* __restrict__ x_t, float* __restrict__ eps, SampleLayout layout,
                                       int64_t quads, int64_t total, uint64_t seed, uint32_t c3) {
  DDPM_GRID_STRIDE(i, total) {
    const int64_t b = i / quads, q = i - b * quads;
    float z[4];
    philox_normal4(seed, static_cast<uint32_t>(q), static_cast<uint32_t>(sample_index[b]),
                   static_cast<uint32_t>(counter2[b]), c3, z);
    const int64_t tb = t[b];
    const bool valid = tb >= 0 && tb < timesteps;
    const float* row = coef + (valid ? tb : 0) * kQSampleCoefs;
    for (int j = 0; j < 4; ++j) {
      const int64_t e = 4 * q + j;
      if (e >= layout.numel) break;
      const int64_t off = element_offset(layout, b, e);
      const float v = q_sample_element(row[kSqrtAbar], row[kSqrtOneMinusAbar], to_float(x0[off]), z[j]);
      x_t[off] = valid ? v : NAN;
      eps[off] = z[j];
    }
  }
}

// One block per (sample, chunk): a fixed-order tree sum in shared memory (deterministic, no atomics).
template <typename P, typename E>
__global__ void simple_loss_partial_kernel(const P* __restrict__ eps_pred, const E* __restrict__ eps,
                                           float* __restrict__ partial, int64_t numel, int64_t chunks) {
  __shared__ float sums[kLossThreads];
  const int64_t b = blockIdx.x / chunks, chunk = blockIdx.x - b * chunks;
  const int64_t first = chunk * kLossChunk, last = first + kLossChunk < numel ? first + kLossChunk : numel;
  const int64_t start = b * numel + first, stop = b * numel + last;
  float sum = 0.0f;
  for (int64_t i = start + threadIdx.x; i < stop; i += kLossThreads) {
    const float d = to_float(eps_pred[i]) - to_float(eps[i]);
    sum += d * d;
  }
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kLossThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = sums[0];
}

template <typename P, typename E>
__global__ void simple_loss_backward_kernel(const P* __restrict__ eps_pred, const E* __restrict__ eps,
                                            const float* __restrict__ grad, P* __restrict__ grad_pred, int64_t numel,
                                            int64_t total) {
  DDPM_GRID_STRIDE(i, total) {
    const float scaled = grad[i / numel] * (2.0f / static_cast<float>(numel));
    grad_pred[i] = from_float<P>(simple_loss_grad(scaled, to_float(eps_pred[i]), to_float(eps[i])));
  }
}

template <typename E>
__global__ void reverse_step_kernel(const float* __restrict__ x_t, const E* __restrict__ eps,
                                    const int64_t* __restrict__ t, const float* __restrict__ coef, int64_t timesteps,
                                    const int64_t* __restrict__ sample_index, const int64_t* __restrict__ counter2,
                                    float* __restrict__ x_prev, float* __restrict__ x0_hat,
                                    long long* __restrict__ nonfinite_t, SampleLayout layout, int64_t quads,
                                    int64_t total, uint64_t seed, uint32_t c3, bool clip) {
  DDPM_GRID_STRIDE(i, total) {
    const int64_t b = i / quads, q = i - b * quads;
    const int64_t tb = t[b];
    const bool valid = tb >= 0 && tb < timesteps;
    const float* row = coef + (valid ? tb : 0) * kStepCoefs;
    float sigma = row[kSigma];
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (tb != 0 && sigma != 0.0f) {  // the last step, and DDIM with eta = 0, draw no noise
      philox_normal4(seed, static_cast<uint32_t>(q), static_cast<uint32_t>(sample_index[b]),
                     static_cast<uint32_t>(counter2[b]), c3, z);
    } else {
      sigma = 0.0f;
    }
    for (int j = 0; j < 4; ++j) {
      const int64_t e = 4 * q + j;
      if (e >= layout.numel) break;
      const int64_t off = element_offset(layout, b, e);
      const float x = x_t[off];
      const float x0 = predict_x0(row[kSqrtRecipAbar], row[kSqrtRecipm1Abar], x, to_float(eps[off]), clip);
      const float v = step_mean(row[kCoefX0], row[kCoefXt], x0, x) + sigma * z[j];
      x_prev[off] = valid ? v : NAN;
      if (x0_hat != nullptr) x0_hat[off] = valid ? x0 : NAN;
      // (an atomic only where the output is not finite: none in a healthy run)
      if (nonfinite_t != nullptr && !(valid && finite_value(v))) atomicMax(nonfinite_t, static_cast<long long>(tb));
    }
  }
}

}  // namespace

cudaError_t q_sample(DType dtype, const void* x0, const void* noise, const int64_t* t, const float* coef,
                     int64_t timesteps, float* x_t, int64_t batch, int64_t numel, cudaStream_t stream) {
  const int64_t total = batch * numel;
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    q_sample_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
        static_cast<const T*>(x0), static_cast<const T*>(noise), t, coef, timesteps, x_t, numel, total);
    return cudaGetLastError();
  });
}

cudaError_t q_sample_philox(DType dtype, const void* x0, const int64_t* t, const float* coef, int64_t timesteps,
                            const int64_t* sample_index, const int64_t* counter2, float* x_t, float* eps,
                            int64_t batch, SampleLayout layout, uint64_t seed, uint32_t c3, cudaStream_t stream) {
  const int64_t quads = (layout.numel + 3) / 4, total = batch * quads;
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    q_sample_philox_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
        static_cast<const T*>(x0), t, coef, timesteps, sample_index, counter2, x_t, eps, layout, quads, total, seed,
        c3);
    return cudaGetLastError();
  });
}

int64_t simple_loss_chunks(int64_t numel) { return (numel + kLossChunk - 1) / kLossChunk; }

cudaError_t simple_loss_partial(DType pred_dtype, const void* eps_pred, DType eps_dtype, const void* eps,
                                float* partial, int64_t batch, int64_t numel, cudaStream_t stream) {
  const int64_t chunks = simple_loss_chunks(numel);
  if (batch == 0 || chunks == 0) return cudaSuccess;
  if (batch * chunks > 2147483647) return cudaErrorInvalidConfiguration;  // grid.x limit: 2^31 - 1 blocks
  const unsigned grid = static_cast<unsigned>(batch * chunks);
  return dispatch(pred_dtype, [&](auto pred_tag) {
    using P = decltype(pred_tag);
    return dispatch(eps_dtype, [&](auto eps_tag) {
      using E = decltype(eps_tag);
      simple_loss_partial_kernel<P, E><<<grid, kLossThreads, 0, stream>>>(
          static_cast<const P*>(eps_pred), static_cast<const E*>(eps), partial, numel, chunks);
      return cudaGetLastError();
    });
  });
}

cudaError_t simple_loss_backward(DType pred_dtype, const void* eps_pred, DType eps_dtype, const void* eps,
                                 const float* grad, void* grad_pred, int64_t batch, int64_t numel,
                                 cudaStream_t stream) {
  const int64_t total = batch * numel;
  if (total == 0) return cudaSuccess;
  return dispatch(pred_dtype, [&](auto pred_tag) {
    using P = decltype(pred_tag);
    return dispatch(eps_dtype, [&](auto eps_tag) {
      using E = decltype(eps_tag);
      simple_loss_backward_kernel<P, E><<<blocks_for(total), kThreads, 0, stream>>>(
          static_cast<const P*>(eps_pred), static_cast<const E*>(eps), grad, static_cast<P*>(grad_pred), numel,
          total);
      return cudaGetLastError();
    });
  });
}

cudaError_t reverse_step(DType eps_dtype, const float* x_t, const void* eps, const int64_t* t, const float* coef,
                         int64_t timesteps, const int64_t* sample_index, const int64_t* counter2, float* x_prev,
                         float* x0_hat, int64_t* nonfinite_t, int64_t batch, SampleLayout layout, uint64_t seed,
                         uint32_t c3, bool clip, cudaStream_t stream) {
  const int64_t quads = (layout.numel + 3) / 4, total = batch * quads;
  if (total == 0) return cudaSuccess;
  return dispatch(eps_dtype, [&](auto tag) {
    using E = decltype(tag);
    reverse_step_kernel<E><<<blocks_for(total), kThreads, 0, stream>>>(
        x_t, static_cast<const E*>(eps), t, coef, timesteps, sample_index, counter2, x_prev, x0_hat,
        reinterpret_cast<long long*>(nonfinite_t), layout, quads, total, seed, c3, clip);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace ddpm_fast
