"""Philox normals for a 64x3x32x32 batch (the x_T / reverse-step noise of CIFAR-10 sampling at batch 64).

Traffic: 196,608 float32 normals = 786 KB written, 1 KB read; the kernels are compute-bound (10 Philox rounds and
Box-Muller per four normals). Baseline: torch.randn of the same shape (a different generator, the same job).
"""
import pytest
import torch

from benchutil import DEVICE, GPU, max_time, sync
from ddpm_fast.ops import philox

BATCH, SHAPE = 64, (3, 32, 32)
BACKENDS = ["reference", "cpp"] + (["triton"] if GPU else [])


@pytest.mark.benchmark(group="philox_normal 64x3x32x32", max_time=max_time())
def bench_torch_randn(benchmark):
    def run():
        torch.randn(BATCH, *SHAPE, device=DEVICE)
        sync()

    benchmark(run)


@pytest.mark.benchmark(group="philox_normal 64x3x32x32", max_time=max_time())
@pytest.mark.parametrize("backend", BACKENDS)
def bench_philox_randn(benchmark, backend):
    index = torch.arange(BATCH, device=DEVICE)
    t = torch.full((BATCH,), 500, device=DEVICE)

    def run():
        philox.randn(index, t, SHAPE, seed=0, stream=philox.STREAM_REVERSE, backend=backend)
        sync()

    benchmark(run)
    benchmark.extra_info["bytes_written"] = BATCH * 3 * 32 * 32 * 4
