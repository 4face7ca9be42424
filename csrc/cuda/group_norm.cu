// CUDA kernels of the fused GroupNorm (+ per-(n, c) add, SiLU, dropout): one block of 256 threads per (sample,
// group), two passes over the group each way (statistics, then the output), as the CPU kernels
// (csrc/cpu/group_norm.cpp); per-element math from csrc/include/ddpm_fast/group_norm.h. Every sum is float32, per
// thread in a fixed element order, then a fixed-order tree in shared memory: deterministic, no atomics. The dropout
// mask is regenerated from Philox stream 4 in the backward, never stored.
//
// The block sees its group as chunks of channels: threads split into channel threads x position threads, the
// position threads along the layout's fast dimension (positions when contiguous, channels when channels_last), so
// that neighbouring threads read neighbouring memory; per-channel sums reduce over the position threads of a channel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ddpm_fast/group_norm.h"
#include "ddpm_fast/philox.h"
#include "dtypes.cuh"
#include "launchers.h"

namespace ddpm_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // a power of two: the trees below halve it

// This thread's place in the block's view of a group (see the top of the file).
struct Tile {
  int chunk_channels;  // channels per chunk (the channel threads)
  int c_index;         // this thread's channel within a chunk
  int s_index;         // its first position; it steps by s_threads
  int s_threads;       // position threads per channel, a power of two
  int s_stride;        // threadIdx distance between a channel's consecutive position threads
};

// fast_threads: threads along the fast dimension, a power of two dividing kThreads.
__device__ __forceinline__ Tile tile_of(bool channels_last, int fast_threads) {
  const int t = static_cast<int>(threadIdx.x), fast = t % fast_threads, slow = t / fast_threads;
  const int slow_threads = kThreads / fast_threads;
  if (channels_last) return {fast_threads, fast, slow, slow_threads, fast_threads};
  return {slow_threads, slow, fast, fast_threads, 1};
}

// The group of block blockIdx.x: sample n, channels [c0, c0 + cg), m = cg * S elements, and its pivot.
struct Group {
  int64_t n, c0, cg, m, base;  // base: the sample's first element in memory
  float px, pa;                // x[n, c0, 0] and add[n, c0] (0 without add)
  uint32_t c1, c2;             // the dropout counter words of sample n
};

template <typename T>
__device__ __forceinline__ Group group_of(const GroupNormParams& p, const T* x) {
  Group g;
  g.n = blockIdx.x / p.groups;
  g.cg = p.channels / p.groups;
  g.c0 = (blockIdx.x - g.n * p.groups) * g.cg;
  g.m = g.cg * p.spatial;
  g.base = g.n * p.channels * p.spatial;
  g.px = to_float(x[g.base + (p.channels_last ? g.c0 : g.c0 * p.spatial)]);
  g.pa = p.add != nullptr ? p.add[g.n * p.channels + g.c0] : 0.0f;
  g.c1 = p.dropout > 0.0f ? static_cast<uint32_t>(p.sample_index[g.n]) : 0u;
  g.c2 = p.dropout > 0.0f ? static_cast<uint32_t>(p.counter2[g.n]) : 0u;
  return g;
}

__device__ __forceinline__ int64_t offset_of(const GroupNormParams& p, const Group& g, int64_t c, int64_t s) {
  return g.base + (p.channels_last ? s * p.channels + c : c * p.spatial + s);
}

// The dropout factor of logical element e = c * S + s of the sample: word e % 4 of Philox counter
// (e / 4, sample_index[n], counter2[n], c3) as a uniform, kept where >= p (one Philox call per element).
__device__ __forceinline__ float dropout_of(const GroupNormParams& p, const Group& g, int64_t e) {
  uint32_t c[4] = {static_cast<uint32_t>(e >> 2), g.c1, g.c2, p.c3};
  philox4x32_10(c, static_cast<uint32_t>(p.seed), static_cast<uint32_t>(p.seed >> 32));
  const int j = static_cast<int>(e & 3);
  const uint32_t word = j == 0 ? c[0] : j == 1 ? c[1] : j == 2 ? c[2] : c[3];
  return dropout_factor(uint_to_uniform(word), p.dropout, p.scale);
}

// Sums v[k] over the whole block (a fixed tree): every thread gets the totals.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K], float (*buf)[kThreads]) {
  const int t = static_cast<int>(threadIdx.x);
  for (int k = 0; k < K; ++k) buf[k][t] = v[k];
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (t < width)
      for (int k = 0; k < K; ++k) buf[k][t] += buf[k][t + width];
    __syncthreads();
  }
  for (int k = 0; k < K; ++k) v[k] = buf[k][0];
  __syncthreads();  // the buffers are reused next
}

// Sums v[k] over the position threads of each channel of the chunk (a fixed tree); the sums are valid in the
// threads with s_index 0. Called by every thread of the block.
template <int K>
__device__ __forceinline__ void channel_sum(const Tile& tile, float (&v)[K], float (*buf)[kThreads]) {
  const int t = static_cast<int>(threadIdx.x);
  for (int k = 0; k < K; ++k) buf[k][t] = v[k];
  __syncthreads();
  for (int width = tile.s_threads / 2; width > 0; width /= 2) {
    if (tile.s_index < width)
      for (int k = 0; k < K; ++k) buf[k][t] += buf[k][t + width * tile.s_stride];
    __syncthreads();
  }
  for (int k = 0; k < K; ++k) v[k] = buf[k][t];
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    group_norm_forward_kernel(const GroupNormParams p, int fast_threads, const T* __restrict__ x, T* __restrict__ y,
                              float eps, float* __restrict__ shift_out, float* __restrict__ rstd_out) {
  __shared__ float buf[2][kThreads];
  const Tile tile = tile_of(p.channels_last, fast_threads);
  const Group g = group_of(p, x);
  const int64_t S = p.spatial;
  // pass 1: the shifted sums
  float sums[2] = {0.0f, 0.0f};
  for (int64_t k0 = 0; k0 < g.cg; k0 += tile.chunk_channels) {
    if (k0 + tile.c_index >= g.cg) continue;
    const int64_t c = g.c0 + k0 + tile.c_index;
    const float da = (p.add != nullptr ? p.add[g.n * p.channels + c] : 0.0f) - g.pa;
    for (int64_t s = tile.s_index; s < S; s += tile.s_threads) {
      const float d = (to_float(x[offset_of(p, g, c, s)]) - g.px) + da;
      sums[0] += d;
      sums[1] += d * d;
    }
  }
  block_sum(sums, buf);
  float shift, rstd;
  shifted_stats(sums[0], sums[1], g.m, eps, shift, rstd);
  if (threadIdx.x == 0) {
    shift_out[blockIdx.x] = shift;
    rstd_out[blockIdx.x] = rstd;
  }
  // pass 2: the output
  for (int64_t k0 = 0; k0 < g.cg; k0 += tile.chunk_channels) {
    if (k0 + tile.c_index >= g.cg) continue;
    const int64_t c = g.c0 + k0 + tile.c_index;
    const float da = (p.add != nullptr ? p.add[g.n * p.channels + c] : 0.0f) - g.pa;
    const float w = p.weight[c] * rstd, b = p.bias[c];
    for (int64_t s = tile.s_index; s < S; s += tile.s_threads) {
      const int64_t off = offset_of(p, g, c, s);
      const float z = ((to_float(x[off]) - g.px) + da - shift) * w + b;
      float v = p.act ? silu(z) : z;
      if (p.dropout > 0.0f) v *= dropout_of(p, g, c * S + s);
      y[off] = from_float<T>(v);
    }
  }
}

// dz = dy * dropout * act'(z), z = xhat w + b, xhat = (d - shift) rstd; with g = dz w over the group:
// dx = rstd (g - mean(g) - xhat mean(g xhat)); dw_nc = sum_s dz xhat, db_nc = sum_s dz; dadd[n, c] = sum_s dx.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    group_norm_backward_kernel(const GroupNormParams p, int fast_threads, const T* __restrict__ dy,
                               const T* __restrict__ x, const float* __restrict__ shift_in,
                               const float* __restrict__ rstd_in, T* __restrict__ dx, float* __restrict__ dw_nc,
                               float* __restrict__ db_nc, float* __restrict__ dadd) {
  __shared__ float buf[2][kThreads];
  const Tile tile = tile_of(p.channels_last, fast_threads);
  const Group g = group_of(p, x);
  const int64_t S = p.spatial;
  const float shift = shift_in[blockIdx.x], rstd = rstd_in[blockIdx.x];
  // dz of the element at off (logical element e), and its xhat
  const auto grad_z = [&](int64_t off, int64_t e, float da, float w, float b, float& xhat) {
    xhat = ((to_float(x[off]) - g.px) + da - shift) * rstd;
    float dz = to_float(dy[off]);
    if (p.dropout > 0.0f) dz *= dropout_of(p, g, e);
    if (p.act) dz *= silu_grad(xhat * w + b);
    return dz;
  };
  // pass 1: per-channel sums, and the group's sums of g and g xhat from them
  float group[2] = {0.0f, 0.0f};  // this thread's share of sum g, sum g xhat
  for (int64_t k0 = 0; k0 < g.cg; k0 += tile.chunk_channels) {
    const bool valid = k0 + tile.c_index < g.cg;
    const int64_t c = g.c0 + k0 + tile.c_index;
    float sums[2] = {0.0f, 0.0f};  // dw, db
    float w = 0.0f;
    if (valid) {
      const float da = (p.add != nullptr ? p.add[g.n * p.channels + c] : 0.0f) - g.pa;
      const float b = p.bias[c];
      w = p.weight[c];
      for (int64_t s = tile.s_index; s < S; s += tile.s_threads) {
        float xhat;
        const float dz = grad_z(offset_of(p, g, c, s), c * S + s, da, w, b, xhat);
        sums[0] += dz * xhat;
        sums[1] += dz;
      }
    }
    channel_sum(tile, sums, buf);
    if (valid && tile.s_index == 0) {
      dw_nc[g.n * p.channels + c] = sums[0];
      db_nc[g.n * p.channels + c] = sums[1];
      group[0] += sums[1] * w;
      group[1] += sums[0] * w;
    }
  }
  block_sum(group, buf);
  const float mean_g = group[0] / static_cast<float>(g.m), mean_gx = group[1] / static_cast<float>(g.m);
  // pass 2: dx, and its per-channel sums for add
  for (int64_t k0 = 0; k0 < g.cg; k0 += tile.chunk_channels) {
    const bool valid = k0 + tile.c_index < g.cg;
    const int64_t c = g.c0 + k0 + tile.c_index;
    float sums[1] = {0.0f};
    if (valid) {
      const float da = (p.add != nullptr ? p.add[g.n * p.channels + c] : 0.0f) - g.pa;
      const float w = p.weight[c], b = p.bias[c];
      for (int64_t s = tile.s_index; s < S; s += tile.s_threads) {
        const int64_t off = offset_of(p, g, c, s);
        float xhat;
        const float gz = grad_z(off, c * S + s, da, w, b, xhat) * w;
        const float d = rstd * (gz - mean_g - xhat * mean_gx);
        dx[off] = from_float<T>(d);
        sums[0] += d;
      }
    }
    if (dadd != nullptr) {  // the same for the whole block
      channel_sum(tile, sums, buf);
      if (valid && tile.s_index == 0) dadd[g.n * p.channels + c] = sums[0];
    }
  }
}

// Threads along the fast dimension: the least power of two >= its extent, at most kThreads.
int fast_threads_of(const GroupNormParams& p) {
  const int64_t extent = p.channels_last ? p.channels / p.groups : p.spatial;
  int threads = 1;
  while (threads < kThreads && threads < extent) threads *= 2;
  return threads;
}

cudaError_t check_shape(const GroupNormParams& p, bool& empty) {
  empty = p.batch == 0 || p.channels == 0 || p.spatial == 0;
  if (p.groups < 1 || p.channels % p.groups != 0) return cudaErrorInvalidValue;
  if (p.batch * p.groups > 2147483647) return cudaErrorInvalidConfiguration;  // grid.x limit: 2^31 - 1 blocks
  return cudaSuccess;
}

}  // namespace

cudaError_t group_norm_silu(DType dtype, const GroupNormParams& p, const void* x, void* y, float eps, float* shift,
                            float* rstd, cudaStream_t stream) {
  bool empty;
  const cudaError_t bad = check_shape(p, empty);
  if (bad != cudaSuccess) return bad;
  if (empty) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(p.batch * p.groups);
  const int fast = fast_threads_of(p);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    group_norm_forward_kernel<T><<<grid, kThreads, 0, stream>>>(p, fast, static_cast<const T*>(x), static_cast<T*>(y),
                                                                 eps, shift, rstd);
    return cudaGetLastError();
  });
}

cudaError_t group_norm_silu_backward(DType dtype, const GroupNormParams& p, const void* dy, const void* x,
                                     const float* shift, const float* rstd, void* dx, float* dw_nc, float* db_nc,
                                     float* dadd, cudaStream_t stream) {
  bool empty;
  const cudaError_t bad = check_shape(p, empty);
  if (bad != cudaSuccess) return bad;
  if (empty) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(p.batch * p.groups);
  const int fast = fast_threads_of(p);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    group_norm_backward_kernel<T><<<grid, kThreads, 0, stream>>>(p, fast, static_cast<const T*>(dy),
                                                                  static_cast<const T*>(x), shift, rstd,
                                                                  static_cast<T*>(dx), dw_nc, db_nc, dadd);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace ddpm_fast
