"""A model on the second GPU while the current device is the first: every Triton launch runs on its tensors' device
and sample() captures and replays its CUDA graph there. Skipped below two GPUs (the gpu mark skips without any)."""
import pytest
import torch

import ddpm_fast
from ddpm_fast.ops import attention, diffusion_step, group_norm, philox
from helpers import random_tiny_unet

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


@pytest.fixture
def on_first_device():
    previous = torch.cuda.current_device()
    torch.cuda.set_device(0)
    yield torch.device("cuda", 1)
    torch.cuda.set_device(previous)


def test_triton_ops_on_the_second_gpu_equal_the_first(on_first_device):
    second = on_first_device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 8, 8, generator=g)
    weight, bias = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    qkv_w, qkv_b = torch.randn(192, 64, generator=g) / 8, torch.randn(192, generator=g)
    proj_w, proj_b = torch.randn(64, 64, generator=g) / 8, torch.randn(64, generator=g)
    index = torch.arange(2)

    def every_op(device):
        on = [t.to(device) for t in (x, weight, bias, qkv_w, qkv_b, proj_w, proj_b, index)]
        xd, wd, bd, qw, qb, pw, pb, i = on
        coef = torch.rand(10, 5, generator=torch.Generator().manual_seed(1)).to(device)
        t = torch.tensor([3, 7], device=device)
        return [philox.randn(i, i + 1, (3, 5, 5), seed=1, stream=1, backend="triton"),
                diffusion_step.reverse_step(xd, xd * 0.5, t, coef, i, t, seed=1, backend="triton")[0],
                group_norm.group_norm_silu(xd, wd, bd, 32, 1e-6, backend="triton"),
                attention.attention_block(xd, wd, bd, qw, qb, pw, pb, 32, 1e-6, backend="triton")]

    first, other = every_op(torch.device("cuda", 0)), every_op(second)
    assert torch.cuda.current_device() == 0
    for a, b in zip(first, other):
        assert b.device == second
        torch.testing.assert_close(b.cpu(), a.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_sample_on_the_second_gpu_equals_the_first(on_first_device, cuda_graph):
    model = random_tiny_unet()
    kwargs = dict(seed=5, steps=10, progress=False, cuda_graph=cuda_graph, network_dtype=torch.float32)
    first = ddpm_fast.sample(model.to("cuda:0"), 3, **kwargs)
    second = ddpm_fast.sample(model.to(on_first_device), 3, **kwargs)
    assert second.device == on_first_device and torch.cuda.current_device() == 0
    torch.testing.assert_close(second.cpu(), first.cpu(), rtol=0, atol=1e-6)
