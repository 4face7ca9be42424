// Vectorized Philox normals for the CPU kernels (defined in philox.cpp: AVX-512, AVX2 or portable, picked on first
// use; every version gives the same bits).
#pragma once
#include <cstdint>

namespace ddpm_fast {
namespace cpu {

// out[4 * i + j] = normal j of counter (q0 + i, c1, c2, c3) under `seed`, for i < quads: 4 * quads floats.
void philox_normals(uint64_t seed, uint32_t q0, int64_t quads, uint32_t c1, uint32_t c2, uint32_t c3, float* out);

// out[4 * i + j] = uint_to_uniform(word j of counter (q0 + i, c1, c2, c3)), in [0, 1): 4 * quads floats.
void philox_uniforms(uint64_t seed, uint32_t q0, int64_t quads, uint32_t c1, uint32_t c2, uint32_t c3, float* out);

}  // namespace cpu
}  // namespace ddpm_fast
