"""The CUDA sources, checked without a GPU (docs/design.md, "Testing without a GPU"): every csrc/cuda/*.cu compiles with
plain nvcc for sm_90 (they include no torch header), and the torch binding file passes a g++ syntax check against
the CPU torch's c10/cuda headers. Running them needs a GPU (tests marked gpu)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

REPO = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))


def cuda_root():
    """The toolkit as setup.py finds it: CUDA_HOME, CUDA_PATH, /usr/local/cuda, nvcc on PATH."""
    nvcc = shutil.which("nvcc")
    for root in [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 nvcc and str(Path(os.path.realpath(nvcc)).parent.parent)]:
        if root and (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root)
    if os.environ.get("CI"):
        pytest.fail("no CUDA toolkit found, so CI cannot compile the CUDA kernels")
    pytest.skip("no CUDA toolkit (nvcc) on this machine")


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_kernels_compile_for_sm90(source, tmp_path):
    root = cuda_root()
    done = subprocess.run([str(root / "bin" / "nvcc"), "-c", "-arch=sm_90", "-O3", "-std=c++17",
                           "-I", str(REPO / "csrc" / "include"), "-I", str(REPO / "csrc" / "cuda"),
                           str(source), "-o", str(tmp_path / "kernel.o")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr.lower(), done.stderr


def test_cuda_binding_file_passes_a_syntax_check(tmp_path):
    root = cuda_root()
    # a CPU wheel lacks this generated header; one line stands in for it
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    torch_includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    done = subprocess.run(["g++", "-std=c++20", "-fsyntax-only", f"-I{tmp_path}", *torch_includes,
                           f"-I{root / 'include'}", f"-I{REPO / 'csrc' / 'include'}",
                           str(REPO / "csrc" / "cuda" / "bindings.cpp")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.gpu
def test_cuda_kernels_equal_the_reference_on_a_gpu():
    from ddpm_fast.ops import philox

    counter = torch.randint(0, 2**32, (1000, 4), dtype=torch.int64)
    expected = philox.philox_reference(counter, 2**40 + 3)
    assert torch.equal(philox.philox(counter.cuda(), 2**40 + 3, backend="cpp").cpu(), expected)
    index, c2 = torch.arange(7), torch.full((7,), 999)
    ref = philox.randn(index, c2, (3, 5, 5), seed=5, stream=1, backend="reference")
    for backend in ("cpp", "triton"):
        out = philox.randn(index.cuda(), c2.cuda(), (3, 5, 5), seed=5, stream=1, backend=backend).cpu()
        assert (out - ref).abs().max().item() < 1e-5  # the GPU's sqrt/log/sin/cos are ~1 ulp off
