"""Shared test helpers."""
import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64 (docs/design.md's tolerance measure)."""
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def cpu_isas() -> list:
    """The values of $DDPM_FAST_CPU_ISA this CPU can run (portable always; avx2, avx512 where /proc/cpuinfo lists
    avx2; avx512f, avx512bw and avx512vl)."""
    import sys

    flags = set(open("/proc/cpuinfo").read().split()) if sys.platform == "linux" else set()
    needs = {"avx2": {"avx2"}, "avx512": {"avx512f", "avx512bw", "avx512vl"}}
    return ["portable"] + [isa for isa, flag_set in needs.items() if flag_set <= flags]


def run_with_cpu_isa(isa: str, script: str, *args: str):
    """`python -c script args` in a fresh process with $DDPM_FAST_CPU_ISA=isa (read once per process by the C++
    kernels); returns the finished process."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd="/",
                          env={**os.environ, "DDPM_FAST_CPU_ISA": isa})


def random_tiny_unet(channels: int = 1, timesteps: int = 20, std: float = 0.2, seed: int = 0):
    """An 8x8 U-Net (ch 8, one ResBlock per level, attention at 4x4) with a T-step linear process, every parameter
    N(0, std^2) (a fresh U-Net's zero output conv would make every image alike), in eval mode."""
    from ddpm_fast import Diffusion, UNet

    torch.manual_seed(seed)
    model = UNet(in_channels=channels, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                 dropout=0.0, num_groups=4, diffusion=Diffusion(timesteps=timesteps))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


def run_torchrun(script, cwd, processes: int = 2):
    """`torchrun --standalone --nproc_per_node N script` on the CPU (one thread per process); the finished process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    return subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", str(processes), str(script)],
                          capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
