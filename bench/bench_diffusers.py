"""diffusers' own sampler against ours on the same weights: a UNet2DModel of the google/ddpm-cifar10-32 layout
(random weights, every parameter) sampled by diffusers' DDPMPipeline (its UNet2DModel + DDPMScheduler loop), and the
same model converted by UNet.from_diffusers and sampled by ddpm_fast.sample with the scheduler's settings. Both in
float32, on the CPU at batch 4 over 5 steps (diffusers' set_timesteps(5) and our respacing: 5 network calls and 5
updates each). The pipeline is the "eager" row of the group, so the table's "vs eager" column is ours vs diffusers.

diffusers is a test dependency the README's test command installs; where it is absent (the GPU machine has no
network to install it) these benches skip.
"""
import pytest
import torch

import ddpm_fast
from benchutil import DEVICE, GPU, timed_rounds

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (README's test command installs it)")

# google/ddpm-cifar10-32 as published (keys absent there take diffusers' defaults)
CIFAR10 = dict(act_fn="silu", attention_head_dim=None, block_out_channels=[128, 256, 256, 256],
               down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
               downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, in_channels=3, layers_per_block=2,
               norm_eps=1e-6, norm_num_groups=32, out_channels=3, sample_size=32,
               up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
SIZE = dict(n=64, steps=20) if GPU else dict(n=4, steps=5)
CI = dict(n=2, steps=2)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**CIFAR10).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    pipeline = diffusers.DDPMPipeline(unet=unet.to(DEVICE), scheduler=diffusers.DDPMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, ddpm_fast.UNet.from_diffusers(pipeline).to(DEVICE).eval()


def _time(benchmark, role, run, n, steps):
    timed_rounds(benchmark, f"diffusers DDPMPipeline vs ours: cifar10-32 layout x{n} fp32, {steps} steps", run,
                 role=role, images=n, steps=steps)


def bench_diffusers_pipeline(benchmark, models):
    size = CI if benchmark.disabled else SIZE
    pipeline, _ = models

    def run():
        with torch.inference_mode():
            pipeline(batch_size=size["n"], num_inference_steps=size["steps"], output_type="np",
                     generator=torch.Generator(DEVICE).manual_seed(0))

    _time(benchmark, "eager", run, **size)


def bench_ours_converted(benchmark, models):
    size = CI if benchmark.disabled else SIZE
    _, ours = models
    assert ours.diffusion.variance == "fixed_small"  # the scheduler's settings came along

    def run():
        ddpm_fast.sample(ours, size["n"], steps=size["steps"], progress=False, network_dtype=torch.float32)

    _time(benchmark, "ours", run, **size)
