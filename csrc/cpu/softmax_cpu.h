// The attention tile's softmax (softmax_avx512.cpp), for attention.cpp.
#pragma once
#include <cstdint>

namespace ddpm_fast {
namespace cpu {

// Each of `rows` rows of `cols` contiguous float32 scores (row r at p + r cols) becomes its softmax, in place, and
// lse[r] its log-sum-exp. AVX-512 only: callers check cpu_isa().
void softmax_rows_avx512(float* p, int64_t rows, int64_t cols, float* lse);

}  // namespace cpu
}  // namespace ddpm_fast
