// The vector instruction set the hand-written CPU paths use: the best this CPU runs, or the one $DDPM_FAST_CPU_ISA
// names (portable, avx2, avx512 = AVX-512 F, BW and VL), so that tests can run every path on one machine.
#pragma once

namespace ddpm_fast {
namespace cpu {

enum class Isa { portable, avx2, avx512 };

// Read once, on first use; an unknown name or one this CPU lacks is an error.
Isa cpu_isa();

}  // namespace cpu
}  // namespace ddpm_fast
