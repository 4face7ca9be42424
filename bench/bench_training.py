"""Training steps per second: one optimizer step of the paper's recipe (flips, uniform t, eps, L_simple, backward,
the norm clip, Adam, the EMA) as improved-diffusion writes it in eager PyTorch (bench/baselines.py: torch's GroupNorm,
SiLU and dropout, attention on 1x1 convs, F.conv2d), the same step with its network under torch.compile, and ours
(ddpm_fast.Trainer: keyed draws, the fused noising, loss, GroupNorm + dropout and attention ops, foreach EMA).

CPU: the small preset at batch 64 and the cifar10 preset at batch 8, float32, and ours also under bf16 autocast
(precision="bfloat16": the same fused kernels in bf16; no target, the rate against float32); torch.compile under
--bench-full only (a cold compile of the backward takes minutes on 2 cores). GPU (bench/gpu_check.sh): the cifar10
preset at batch 128 under bf16 autocast, eager and ours (a cold compile of the training graph does not fit its time
cap). Each round times `STEPS` optimizer steps. Under --benchmark-disable (CI) each bench runs one step at batch 4,
and torch.compile not at all.

FLOPs: a training step is ~3x a forward (the backward twice the forward's): the small preset 3 x 11.3 GFLOP at
batch 64, cifar10 3 x 91 GFLOP at batch 8 (the convolutions and linear layers; bench_sampler.py's per-image counts).
"""
import pytest
import torch

import ddpm_fast
from baselines import eager_copy, eager_train_step
from benchutil import DEVICE, GPU, full, pick, random_unet, role_name, timed_rounds

if GPU:
    SIZES = {"cifar10": 128}
    DTYPE = torch.bfloat16
else:
    SIZES = {"small": 64, "cifar10": 8}
    DTYPE = torch.float32
STEPS = pick(2, 3)
CI_BATCH = 4
per_preset = pytest.mark.parametrize("preset", list(SIZES))


def _data(net, n):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (max(n, 16), net.in_channels, net.image_size, net.image_size), dtype=torch.uint8,
                         generator=gen)


def _time(benchmark, preset, batch, role, run, steps):
    dtype = "bf16" if DTYPE == torch.bfloat16 else "fp32"
    timed_rounds(benchmark, f"training {preset} x{batch} {dtype}, {steps} steps per round", run, role=role,
                 batch=batch, train_steps=steps)


def _eager(benchmark, preset, compiled):
    batch, steps = (CI_BATCH, 1) if benchmark.disabled else (SIZES[preset], STEPS)
    net = random_unet(preset)
    model = eager_copy(net).train()
    network = torch.compile(model, dynamic=False) if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    ema = [p.detach().clone() for p in model.parameters()]
    diffusion = ddpm_fast.Diffusion()
    x0 = (_data(net, batch)[:batch].float() / 127.5 - 1).to(DEVICE)

    def run():
        for _ in range(steps):
            with torch.autocast(DEVICE.type, dtype=DTYPE, enabled=DTYPE != torch.float32):
                eager_train_step(network, optimizer, ema, x0, diffusion)

    if compiled:
        run()  # the compile, outside the timing
    _time(benchmark, preset, batch, "compiled" if compiled else "eager", run, steps)


@per_preset
def bench_train_eager(benchmark, preset):
    _eager(benchmark, preset, compiled=False)


@per_preset
def bench_train_compiled(benchmark, preset):
    if benchmark.disabled or GPU or not full():
        pytest.skip("torch.compile of the training step: CPU, --bench-full only (minutes of cold compile)")
    _eager(benchmark, preset, compiled=True)


@per_preset
@pytest.mark.parametrize("precision", ["auto"] if GPU else ["float32", "bfloat16"])
def bench_train_ours(benchmark, preset, precision):
    batch, steps = (CI_BATCH, 1) if benchmark.disabled else (SIZES[preset], STEPS)
    net = random_unet(preset).train()
    trainer = ddpm_fast.Trainer(net, _data(net, batch), steps=10**9, batch_size=batch, progress=False,
                                log_every=10**9, checkpoint_every=10**9, device=DEVICE, precision=precision)

    def run():
        trainer.run(until=trainer.step + steps)

    _time(benchmark, preset, batch, role_name("ours", precision == "bfloat16"), run, steps)
