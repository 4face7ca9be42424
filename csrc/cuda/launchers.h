// Host launchers of the CUDA kernels. No torch header here, so the .cu files compile with plain nvcc in seconds;
// csrc/cuda/bindings.cpp checks the tensors and calls these with pointers, sizes and the current stream.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ddpm_fast {
namespace cuda {

// words[4 * i + j] = Philox4x32-10(counter[4 * i .. 4 * i + 3], seed)[j]; counter words hold uint32 values.
cudaError_t philox(const int64_t* counter, int64_t* words, int64_t n, uint64_t seed, cudaStream_t stream);

// out[b * numel + e] = normal e of sample b (DESIGN.md layout): counter (e / 4, sample_index[b], counter2[b], c3).
cudaError_t philox_normal(const int64_t* sample_index, const int64_t* counter2, float* out, int64_t batch,
                          int64_t numel, uint64_t seed, uint32_t c3, cudaStream_t stream);

}  // namespace cuda
}  // namespace ddpm_fast
