// CUDA kernels of the Philox ops: the same header as the CPU kernels, one thread per counter.
#include "ddpm_fast/philox.h"
#include "launchers.h"

namespace ddpm_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 16 ? blocks : 65535 * 16);  // grid-stride loops cover the rest
}

__global__ void philox_kernel(const int64_t* __restrict__ counter, int64_t* __restrict__ words, int64_t n,
                              uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t w[4];
    for (int j = 0; j < 4; ++j) w[j] = static_cast<uint32_t>(counter[4 * i + j]);
    philox4x32_10(w, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    for (int j = 0; j < 4; ++j) words[4 * i + j] = static_cast<int64_t>(w[j]);
  }
}

__global__ void philox_normal_kernel(const int64_t* __restrict__ sample_index, const int64_t* __restrict__ counter2,
                                     float* __restrict__ out, int64_t batch, int64_t numel, int64_t quads,
                                     uint64_t seed, uint32_t c3) {
  const int64_t total = batch * quads;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / quads;
    const int64_t q = i - b * quads;
    float n[4];
    philox_normal4(seed, static_cast<uint32_t>(q), static_cast<uint32_t>(sample_index[b]),
                   static_cast<uint32_t>(counter2[b]), c3, n);
    float* row = out + b * numel + 4 * q;
    const int64_t left = numel - 4 * q;
    for (int j = 0; j < 4; ++j)
      if (j < left) row[j] = n[j];
  }
}

}  // namespace

cudaError_t philox(const int64_t* counter, int64_t* words, int64_t n, uint64_t seed, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  philox_kernel<<<blocks_for(n), kThreads, 0, stream>>>(counter, words, n, seed);
  return cudaGetLastError();
}

cudaError_t philox_normal(const int64_t* sample_index, const int64_t* counter2, float* out, int64_t batch,
                          int64_t numel, uint64_t seed, uint32_t c3, cudaStream_t stream) {
  const int64_t quads = (numel + 3) / 4;
  if (batch * quads == 0) return cudaSuccess;
  philox_normal_kernel<<<blocks_for(batch * quads), kThreads, 0, stream>>>(sample_index, counter2, out, batch, numel,
                                                                           quads, seed, c3);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ddpm_fast
