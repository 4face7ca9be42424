#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace ddpm_fast {
namespace cpu {
namespace {

Isa pick_isa() {
  __builtin_cpu_init();
  // AVX-512 here is F with BW and VL (16-bit masked moves for bf16): every AVX-512 CPU since Skylake-SP and Zen 4
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  const bool avx2 = __builtin_cpu_supports("avx2");
  const char* forced = std::getenv("DDPM_FAST_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    if (std::strcmp(forced, "portable") == 0) return Isa::portable;
    TORCH_CHECK(std::strcmp(forced, "avx2") == 0 || std::strcmp(forced, "avx512") == 0,
                "DDPM_FAST_CPU_ISA must be portable, avx2 or avx512, got '", forced, "'");
    const bool want512 = std::strcmp(forced, "avx512") == 0;
    TORCH_CHECK(want512 ? avx512 : avx2, "DDPM_FAST_CPU_ISA=", forced, " but this CPU does not support it");
    return want512 ? Isa::avx512 : Isa::avx2;
  }
  return avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::portable;
}

}  // namespace

Isa cpu_isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

}  // namespace cpu
}  // namespace ddpm_fast
