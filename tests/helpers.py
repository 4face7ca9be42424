"""Shared test helpers."""
import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64 (DESIGN.md's tolerance measure)."""
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def cpu_isas() -> list:
    """The values of $DDPM_FAST_CPU_ISA this CPU can run (portable always; avx2, avx512 where /proc/cpuinfo lists
    avx2, avx512f)."""
    import sys

    flags = set(open("/proc/cpuinfo").read().split()) if sys.platform == "linux" else set()
    return ["portable"] + [isa for isa, flag in [("avx2", "avx2"), ("avx512", "avx512f")] if flag in flags]


def run_with_cpu_isa(isa: str, script: str, *args: str):
    """`python -c script args` in a fresh process with $DDPM_FAST_CPU_ISA=isa (read once per process by the C++
    kernels); returns the finished process."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd="/",
                          env={**os.environ, "DDPM_FAST_CPU_ISA": isa})
