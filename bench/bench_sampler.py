"""The whole sampler on the small preset (1x16x16, batch 16, 50 respaced steps) against the eager loop as
diffusers / improved-diffusion write it: the network, then the step's ~10 elementwise ops and a torch.randn.
Both use the same network and the same (ddpm_fast) ops inside it, so the ratio is the loop's, not the U-Net's."""
import pytest
import torch

import ddpm_fast
from benchutil import DEVICE, sync

N, STEPS = 16, 50


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = ddpm_fast.UNet.from_preset("small").to(DEVICE).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net


def eager_loop(model, diffusion):
    """Algorithm 2 written the usual way: tables gathered on the host side each step, clipping, posterior mean."""
    tab = {k: v.to(torch.float32) for k, v in diffusion.tables.items()}
    x = torch.randn(N, 1, 16, 16, device=DEVICE)
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((N,), int(diffusion.timestep_map[i]), device=DEVICE)
        eps = model(x, t)
        x0 = (x * tab["sqrt_recip_alphas_cumprod"][i].item() - eps * tab["sqrt_recipm1_alphas_cumprod"][i].item())
        x0 = x0.clamp(-1, 1)
        mean = tab["posterior_mean_coef1"][i].item() * x0 + tab["posterior_mean_coef2"][i].item() * x
        noise = torch.randn_like(x)
        x = mean + (i > 0) * (0.5 * tab["model_log_variance"][i]).exp().item() * noise
    return x.clamp(-1, 1)


@pytest.mark.benchmark(group=f"sampler small x{N}, {STEPS} steps")
def bench_eager_loop(benchmark, model):
    diffusion = ddpm_fast.Diffusion().respace(STEPS)

    def run():
        with torch.inference_mode():
            eager_loop(model, diffusion)
        sync()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["images_per_round"] = N


@pytest.mark.benchmark(group=f"sampler small x{N}, {STEPS} steps")
def bench_ddpm_fast_sample(benchmark, model):
    def run():
        ddpm_fast.sample(model, N, steps=STEPS, progress=False)
        sync()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["images_per_round"] = N
