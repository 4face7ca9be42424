"""Builds ddpm_fast._C from csrc/ against the torch that is already installed.

Install torch first, then `pip install --no-build-isolation .` (README.md says why). Switches (environment):
  DDPM_FAST_CUDA=0|1     skip the CUDA kernels / require them (default: build them when torch has CUDA and an nvcc
                         of the same major version is found; never decided by whether a GPU is visible)
  TORCH_CUDA_ARCH_LIST   the GPU architectures to compile for (default: those of 7.5 8.0 8.6 8.9 9.0 nvcc supports)
  MAX_JOBS               parallel compile jobs (torch's ninja builder)
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent

try:
    import torch
except ImportError:
    sys.exit(
        "\nddpm_fast compiles C++/CUDA kernels against the torch you have installed, so torch must be installed "
        "first and pip must not build in an isolated environment. Run:\n"
        "    pip install torch            # or torch==2.13.0 for the CPU build\n"
        "    pip install --no-build-isolation .\n"
    )


def find_cuda_toolkit():
    """The CUDA toolkit root (bin/nvcc and include/cuda_runtime.h) from CUDA_HOME, CUDA_PATH, /usr/local/cuda or
    the nvcc on PATH; None if there is none."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for root in candidates:
        if root and (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return str(Path(root).resolve())
    return None


def nvcc_version(root):
    out = subprocess.run([str(Path(root) / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_build_decision():
    """(build_cuda, toolkit_root, reason). Decided from torch's build and the toolkit, not from a visible GPU."""
    switch = os.environ.get("DDPM_FAST_CUDA", "").strip()
    if switch == "0":
        return False, None, "DDPM_FAST_CUDA=0"
    reason = None
    root = find_cuda_toolkit()
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    elif root is None:
        reason = "no CUDA toolkit (bin/nvcc + include/cuda_runtime.h) found"
    else:
        version = nvcc_version(root)
        torch_major = int(torch.version.cuda.split(".")[0])
        if version is None or version[0] != torch_major:
            reason = f"nvcc in {root} is CUDA {version}, torch was built with CUDA {torch.version.cuda}"
    if reason is None:
        return True, root, f"CUDA toolkit {root}"
    if switch == "1":
        sys.exit(f"ddpm_fast: DDPM_FAST_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return False, None, reason


def default_arch_list(root):
    """TORCH_CUDA_ARCH_LIST when the user gave none: the usual data-centre/consumer archs this nvcc supports."""
    out = subprocess.run([str(Path(root) / "bin" / "nvcc"), "--list-gpu-arch"], capture_output=True, text=True).stdout
    supported = set(re.findall(r"compute_(\d+)", out))
    wanted = ["75", "80", "86", "89", "90"]
    archs = [f"{a[:-1]}.{a[-1]}" for a in wanted if a in supported]
    if not archs:
        sys.exit(f"ddpm_fast: nvcc in {root} supports none of sm_{', sm_'.join(wanted)}; set TORCH_CUDA_ARCH_LIST")
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


build_cuda, cuda_root, cuda_reason = cuda_build_decision()
if build_cuda:
    os.environ["CUDA_HOME"] = cuda_root  # before torch.utils.cpp_extension reads it
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list(cuda_root))
print(f"ddpm_fast: CUDA kernels {'on' if build_cuda else 'off'} ({cuda_reason})", file=sys.stderr)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

sources = ["csrc/ops.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
# Stringified in ops.cpp: the torch this _C belongs to, checked at import.
macros = [("DDPM_FAST_TORCH_VERSION", torch.__version__)]
# -fno-math-errno lets sqrt vectorize; -ffp-contract=off keeps the AVX-512/AVX2/baseline versions and the eager
# reference bit-identical (no FMA contraction; csrc/cpu/group_norm.cpp turns it back on for itself). torch adds the
# -std its headers need.
cxx_flags = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
include_dirs = [str(ROOT / "csrc" / "include")]
if build_cuda:
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    sources += ["csrc/cuda/bindings.cpp"]
    macros.append(("DDPM_FAST_WITH_CUDA", "1"))
    # pip's CUDA headers (cusparse etc.) live beside torch, not in every toolkit
    nvidia = Path(torch.__file__).parent.parent / "nvidia"
    include_dirs += [str(p) for p in nvidia.glob("cu*/include")]
    extension = CUDAExtension(
        "ddpm_fast._C", sources, include_dirs=include_dirs, define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-Xcompiler", "-g0"]},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        "ddpm_fast._C", sources, include_dirs=include_dirs, define_macros=macros,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
    )

setup(
    # kernels/ ships inside the package: a top-level `kernels` would clash with the PyPI package of that name.
    packages=["ddpm_fast", "ddpm_fast.evaluation", "ddpm_fast.ops", "ddpm_fast.kernels"],
    package_dir={"ddpm_fast": "ddpm_fast", "ddpm_fast.kernels": "kernels"},
    # the bundled default: the digits data and the model trained on it (ddpm_fast/bundled.py)
    package_data={"ddpm_fast": ["pretrained/*.npz", "pretrained/*/*.json", "pretrained/*/*.safetensors"]},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
)
