// CPU kernels of the Philox ops. The per-element math is csrc/include/ddpm_fast/philox.h, shared with CUDA; here it
// runs 16 counters at a time in loops GCC vectorizes (the multiply-high rounds and the branch-free Box-Muller).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "ddpm_fast/philox.h"
#include "philox_cpu.h"

namespace ddpm_fast {
namespace cpu {
namespace {

constexpr int kQuads = 16;  // counters per vector block: 64 normals

__attribute__((always_inline)) inline void normal_block(uint64_t seed, uint32_t q0, uint32_t c1, uint32_t c2,
                                                        uint32_t c3, float* __restrict out) {
  uint32_t w0[kQuads], w1[kQuads], w2[kQuads], w3[kQuads];
#pragma omp simd
  for (int i = 0; i < kQuads; ++i) {
    w0[i] = q0 + static_cast<uint32_t>(i);
    w1[i] = c1;
    w2[i] = c2;
    w3[i] = c3;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {  // philox4x32_10 of philox.h, one lane per counter
#pragma omp simd
    for (int i = 0; i < kQuads; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * w0[i];
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * w2[i];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ w1[i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ w3[i] ^ k1;
      w1[i] = static_cast<uint32_t>(p1);
      w3[i] = static_cast<uint32_t>(p0);
      w0[i] = n0;
      w2[i] = n2;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
#pragma omp simd
  for (int i = 0; i < kQuads; ++i) {
    float a, b, c, d;
    pair_uniform_to_normal(uint_to_uniform(w0[i]), uint_to_uniform(w1[i]), a, b);
    pair_uniform_to_normal(uint_to_uniform(w2[i]), uint_to_uniform(w3[i]), c, d);
    out[4 * i] = a;
    out[4 * i + 1] = b;
    out[4 * i + 2] = c;
    out[4 * i + 3] = d;
  }
}

}  // namespace

__attribute__((target_clones("avx512f", "avx2", "default")))
void philox_normals(uint64_t seed, uint32_t q0, int64_t quads, uint32_t c1, uint32_t c2, uint32_t c3, float* out) {
  int64_t i = 0;
  for (; i + kQuads <= quads; i += kQuads) normal_block(seed, q0 + static_cast<uint32_t>(i), c1, c2, c3, out + 4 * i);
  if (i < quads) {
    float tail[4 * kQuads];
    normal_block(seed, q0 + static_cast<uint32_t>(i), c1, c2, c3, tail);
    std::copy(tail, tail + 4 * (quads - i), out + 4 * i);
  }
}

}  // namespace cpu

namespace {

void check_counter_vector(const at::Tensor& v, const char* name, int64_t batch) {
  TORCH_CHECK(v.device().is_cpu(), "philox_normal: ", name, " must be a CPU tensor here, got ", v.device());
  TORCH_CHECK(v.scalar_type() == at::kLong, "philox_normal: ", name, " must be int64, got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == batch, "philox_normal: ", name, " must have shape (", batch, ",), got ",
              v.sizes());
}

at::Tensor philox_cpu(const at::Tensor& counter, int64_t seed) {
  TORCH_CHECK(counter.device().is_cpu(), "philox: counter must be a CPU tensor here, got ", counter.device());
  TORCH_CHECK(counter.scalar_type() == at::kLong, "philox: counter must be int64, got ", counter.scalar_type());
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4, "philox: counter must have shape (N, 4), got ",
              counter.sizes());
  const at::Tensor c = counter.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* src = c.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  const uint64_t key = static_cast<uint64_t>(seed);
  at::parallel_for(0, c.size(0), 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint32_t w[4];
      for (int j = 0; j < 4; ++j) w[j] = static_cast<uint32_t>(src[4 * i + j]);
      philox4x32_10(w, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
      for (int j = 0; j < 4; ++j) dst[4 * i + j] = static_cast<int64_t>(w[j]);
    }
  });
  return out;
}

at::Tensor philox_normal_cpu(const at::Tensor& sample_index, const at::Tensor& counter2, int64_t seed, int64_t c3,
                             int64_t numel) {
  TORCH_CHECK(numel > 0, "philox_normal: numel must be positive, got ", numel);
  TORCH_CHECK(sample_index.dim() == 1, "philox_normal: sample_index must have shape (B,), got ", sample_index.sizes());
  const int64_t batch = sample_index.size(0);
  check_counter_vector(sample_index, "sample_index", batch);
  check_counter_vector(counter2, "counter2", batch);
  const at::Tensor c1 = sample_index.contiguous();
  const at::Tensor c2 = counter2.contiguous();
  at::Tensor out = at::empty({batch, numel}, c1.options().dtype(at::kFloat));
  const int64_t* c1p = c1.data_ptr<int64_t>();
  const int64_t* c2p = c2.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  constexpr int64_t kChunk = 1024;  // normals per work item (a multiple of 4: chunks start on a counter)
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  at::parallel_for(0, batch * chunks, 16, [&](int64_t begin, int64_t end) {
    float buffer[kChunk];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / chunks, e0 = (i - b * chunks) * kChunk;
      const int64_t count = std::min(kChunk, numel - e0);
      // whole counters straight into the output; the 1-3 normals past numel go through the buffer and are dropped
      const int64_t whole = count / 4;
      float* row = o + b * numel + e0;
      cpu::philox_normals(static_cast<uint64_t>(seed), static_cast<uint32_t>(e0 / 4), whole,
                          static_cast<uint32_t>(c1p[b]), static_cast<uint32_t>(c2p[b]), static_cast<uint32_t>(c3), row);
      if (count % 4) {
        cpu::philox_normals(static_cast<uint64_t>(seed), static_cast<uint32_t>(e0 / 4 + whole), 1,
                            static_cast<uint32_t>(c1p[b]), static_cast<uint32_t>(c2p[b]), static_cast<uint32_t>(c3),
                            buffer);
        std::copy(buffer, buffer + count % 4, row + 4 * whole);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("philox", &philox_cpu);
  m.impl("philox_normal", &philox_normal_cpu);
}

}  // namespace ddpm_fast
