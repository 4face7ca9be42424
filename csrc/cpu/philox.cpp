// CPU kernels of the Philox ops. The per-element math is csrc/include/ddpm_fast/philox.h, shared with CUDA; here it
// runs 16 counters at a time: the ten rounds with AVX-512 or AVX2 intrinsics where the CPU has them (GCC's own
// vectorization of the 32x32->64-bit multiply widens every lane to 64 bits and is ~4x slower), and the branch-free
// Box-Muller of philox.h in a loop the compiler vectorizes for the same instruction set. -ffp-contract=off: every
// version gives the same bits (tests/test_philox.py runs each, picked by $DDPM_FAST_CPU_ISA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>

#include "ddpm_fast/philox.h"
#include "cpu_isa.h"
#include "philox_cpu.h"

namespace ddpm_fast {
namespace cpu {
namespace {

constexpr int kQuads = 16;  // counters per block: 64 normals

// 16 counters' output words -> 64 normals, out[4 * i + j] = normal j of counter i. Always inlined into each
// instruction set's block function, which vectorizes it for that set.
__attribute__((always_inline)) inline void box_muller(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2,
                                                      const uint32_t* w3, float* __restrict out) {
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

// Uniforms in [0, 1) of 16 counters' words: out[4 * i + j] = uint_to_uniform(word j of counter i).
__attribute__((always_inline)) inline void uniforms(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2,
                                                    const uint32_t* w3, float* __restrict out) {
#pragma omp simd
  for (int i = 0; i < kQuads; ++i) {
    out[4 * i] = uint_to_uniform(w0[i]);
    out[4 * i + 1] = uint_to_uniform(w1[i]);
    out[4 * i + 2] = uint_to_uniform(w2[i]);
    out[4 * i + 3] = uint_to_uniform(w3[i]);
  }
}

__attribute__((always_inline)) inline void rounds_portable(uint64_t seed, uint32_t q0, uint32_t c1, uint32_t c2,
                                                           uint32_t c3, uint32_t (&w)[4][kQuads]) {
  for (int i = 0; i < kQuads; ++i) {
    uint32_t c[4] = {q0 + static_cast<uint32_t>(i), c1, c2, c3};
    philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    w[0][i] = c[0], w[1][i] = c[1], w[2][i] = c[2], w[3][i] = c[3];
  }
}

// hi, lo of m * x in each 32-bit lane: _mm*_mul_epu32 multiplies the even lanes into 64-bit products; the odd lanes
// are shifted down and multiplied the same way, then the halves are blended back (mask 0b1010...: the odd lanes).
__attribute__((target("avx2"), always_inline)) inline void mulhilo_avx2(__m256i m, __m256i x, __m256i& hi,
                                                                        __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2"), always_inline)) inline void rounds_avx2(uint64_t seed, uint32_t q0, uint32_t c1,
                                                                       uint32_t c2, uint32_t c3,
                                                                       uint32_t (&w)[4][kQuads]) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0)), m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int half = 0; half < kQuads; half += 8) {
    __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(q0 + half)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i x1 = _mm256_set1_epi32(static_cast<int>(c1)), x2 = _mm256_set1_epi32(static_cast<int>(c2));
    __m256i x3 = _mm256_set1_epi32(static_cast<int>(c3));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {  // philox4x32_10 of philox.h
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_avx2(m0, x0, hi0, lo0);
      mulhilo_avx2(m1, x2, hi1, lo1);
      x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32(static_cast<int>(k0)));
      x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(static_cast<int>(k1)));
      x1 = lo1;
      x3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[0] + half), x0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[1] + half), x1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[2] + half), x2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[3] + half), x3);
  }
}

__attribute__((target("avx512f"), always_inline)) inline void mulhilo_avx512(__m512i m, __m512i x, __m512i& hi,
                                                                             __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

__attribute__((target("avx512f"), always_inline)) inline void rounds_avx512(uint64_t seed, uint32_t q0, uint32_t c1,
                                                                            uint32_t c2, uint32_t c3,
                                                                            uint32_t (&w)[4][kQuads]) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0)), m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  __m512i x0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(q0)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i x1 = _mm512_set1_epi32(static_cast<int>(c1)), x2 = _mm512_set1_epi32(static_cast<int>(c2));
  __m512i x3 = _mm512_set1_epi32(static_cast<int>(c3));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {  // philox4x32_10 of philox.h
    __m512i hi0, lo0, hi1, lo1;
    mulhilo_avx512(m0, x0, hi0, lo0);
    mulhilo_avx512(m1, x2, hi1, lo1);
    x0 = _mm512_ternarylogic_epi32(hi1, x1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // three-way xor
    x2 = _mm512_ternarylogic_epi32(hi0, x3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    x1 = lo1;
    x3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  _mm512_storeu_si512(w[0], x0);
  _mm512_storeu_si512(w[1], x1);
  _mm512_storeu_si512(w[2], x2);
  _mm512_storeu_si512(w[3], x3);
}

// One block of 64 normals or uniforms per instruction set: the rounds and the conversion compiled together for it.
#define DDPM_FAST_BLOCKS(isa, target_attr)                                                                         \
  target_attr void normals_##isa(uint64_t seed, uint32_t q0, uint32_t c1, uint32_t c2, uint32_t c3, float* out) {  \
    uint32_t w[4][kQuads];                                                                                         \
    rounds_##isa(seed, q0, c1, c2, c3, w);                                                                         \
    box_muller(w[0], w[1], w[2], w[3], out);                                                                       \
  }                                                                                                                \
  target_attr void uniforms_##isa(uint64_t seed, uint32_t q0, uint32_t c1, uint32_t c2, uint32_t c3, float* out) { \
    uint32_t w[4][kQuads];                                                                                         \
    rounds_##isa(seed, q0, c1, c2, c3, w);                                                                         \
    uniforms(w[0], w[1], w[2], w[3], out);                                                                         \
  }
DDPM_FAST_BLOCKS(portable, )
DDPM_FAST_BLOCKS(avx2, __attribute__((target("avx2"))))
DDPM_FAST_BLOCKS(avx512, __attribute__((target("avx512f"))))
#undef DDPM_FAST_BLOCKS

using BlockFn = void (*)(uint64_t, uint32_t, uint32_t, uint32_t, uint32_t, float*);
struct Blocks {
  BlockFn normals, uniforms;
};

// The blocks of the instruction set cpu_isa() picks (the CPU's best, or $DDPM_FAST_CPU_ISA's).
Blocks pick_blocks() {
  switch (cpu_isa()) {
    case Isa::avx512: return {normals_avx512, uniforms_avx512};
    case Isa::avx2: return {normals_avx2, uniforms_avx2};
    default: return {normals_portable, uniforms_portable};
  }
}

const Blocks& blocks() {
  static const Blocks chosen = pick_blocks();
  return chosen;
}

void run_blocks(BlockFn block, uint64_t seed, uint32_t q0, int64_t quads, uint32_t c1, uint32_t c2, uint32_t c3,
                float* out) {
  int64_t i = 0;
  for (; i + kQuads <= quads; i += kQuads) block(seed, q0 + static_cast<uint32_t>(i), c1, c2, c3, out + 4 * i);
  if (i < quads) {
    float tail[4 * kQuads];
    block(seed, q0 + static_cast<uint32_t>(i), c1, c2, c3, tail);
    std::copy(tail, tail + 4 * (quads - i), out + 4 * i);
  }
}

}  // namespace

void philox_normals(uint64_t seed, uint32_t q0, int64_t quads, uint32_t c1, uint32_t c2, uint32_t c3, float* out) {
  run_blocks(blocks().normals, seed, q0, quads, c1, c2, c3, out);
}

void philox_uniforms(uint64_t seed, uint32_t q0, int64_t quads, uint32_t c1, uint32_t c2, uint32_t c3, float* out) {
  run_blocks(blocks().uniforms, seed, q0, quads, c1, c2, c3, out);
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
