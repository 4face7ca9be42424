"""The U-Net's attention block: the fused op (folded weights, scores one tile at a time; C++ on the CPU, Triton on a
GPU) against the paper's block in eager PyTorch (ops/attention.py's reference: (L x L) scores of every sample, four
C x C x L products), its torch.compile, and the block written on F.scaled_dot_product_attention; forward (no grad)
and forward + backward, at the cifar10 preset's attention shapes: batch 16 (--bench-full: 64), C = 256, 16x16 and 8x8
tokens; float32.

Run: pytest bench/bench_attention.py --benchmark-only --benchmark-columns=min,median,max,rounds
(bench/conftest.py then prints GFLOP/s of each variant = extra_info["flops"] / median, the speed-ups over eager,
torch.compile and SDPA, and the forward's peak memory.)

FLOPs of the paper's block per sample (multiply-add = 2): q, k, v and proj_out 4 x 2 C^2 L, scores and P v
2 x 2 L^2 C; ours does half the C^2 L products (2 x 2 C^2 L), so its GFLOP/s is counted on the paper's FLOPs (the
work the block stands for), not on what it executes. Forward + backward: 3x the forward.

Peak memory: what one forward allocates at its highest, beyond what was allocated before it (the inputs, the
parameters), as ddpm_fast.memory.peak_bytes reads it (CPU: glibc's mallinfo2 polled every 0.1 ms while the forward
runs; GPU: torch.cuda.max_memory_allocated). Measured only when timing (not under --benchmark-disable).

Under --benchmark-disable (CI) every bench runs once at batch 2 (CI_BATCH), and torch.compile at 8x8 only.
"""
import time

import pytest
import torch
import torch.nn.functional as F

from benchutil import DEVICE, GPU, pick, random_unet, shape_name, sync, timed
from ddpm_fast import memory
from ddpm_fast.ops import attention

GROUPS, EPS = 32, 1e-6
SHAPES = pick([(16, 256, 16, 16), (16, 256, 8, 8)], [(64, 256, 16, 16), (64, 256, 8, 8)])
CI_BATCH = 2


def sdpa_block(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias):
    """The block as a user of PyTorch's fused attention writes it: GroupNorm, one 1x1 conv for q, k, v, SDPA, the
    projection conv and the residual."""
    batch, channels, height, width = x.shape
    h = F.group_norm(x, GROUPS, norm_weight, norm_bias, EPS)
    qkv = F.conv2d(h, qkv_weight[:, :, None, None], qkv_bias).view(batch, 3, channels, height * width)
    q, k, v = qkv.transpose(2, 3).unbind(1)  # (B, L, C) each
    a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # one head, scale 1/sqrt(C)
    return x + F.conv2d(a.transpose(1, 2).reshape(x.shape), proj_weight[:, :, None, None], proj_bias)


def eager_block(*args):
    return attention.attention_block_reference(*args, GROUPS, EPS)


def ours_block(*args):
    return attention.attention_block(*args, GROUPS, EPS, backend="cpp" if not GPU else None)


VARIANTS = {"eager": eager_block, "sdpa": sdpa_block, "ours": ours_block}


def make_inputs(shape, seed=0):
    """x and random parameters (a zero proj_out, as at initialisation, would make the block the identity)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    tensors = [torch.randn(shape, generator=g), 1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g),
               torch.randn(3 * c, c, generator=g) * c ** -0.5, 0.1 * torch.randn(3 * c, generator=g),
               torch.randn(c, c, generator=g) * c ** -0.5, 0.1 * torch.randn(c, generator=g)]
    return [t.to(DEVICE) for t in tensors]


def paper_flops(shape):
    batch, c, h, w = shape
    tokens = h * w
    return batch * (4 * 2 * c * c * tokens + 2 * 2 * tokens * tokens * c)


def _forward(fn, tensors):
    def run():
        with torch.no_grad():
            fn(*tensors)
    return run


def _forward_backward(fn, tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    grad_y = torch.randn_like(tensors[0])

    def run():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves).backward(grad_y)
    return run


MODES = {"attention": dict(run=_forward, flops=1), "attention+backward": dict(run=_forward_backward, flops=3)}

def peak_mb(run):
    """Peak memory one call of run() adds, MiB (module docstring; ddpm_fast.memory reads it); None where it cannot
    be read."""
    peak = memory.peak_bytes(run, DEVICE)
    return None if peak is None else peak / 2**20


def _shape(benchmark, shape):
    return (CI_BATCH,) + shape[1:] if benchmark.disabled else shape


@pytest.mark.benchmark(max_time=pick(0.3, 1.0))
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_name(s) for s in SHAPES])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("variant", ["eager", "compiled", "sdpa", "ours"])
def bench_attention_block(benchmark, variant, mode, shape):
    if variant == "compiled" and benchmark.disabled and shape != SHAPES[-1]:
        pytest.skip("under --benchmark-disable torch.compile runs at 8x8 only (compile time)")
    group = f"{mode} {shape_name(shape)}"
    shape = _shape(benchmark, shape)
    fn = torch.compile(eager_block, dynamic=False) if variant == "compiled" else VARIANTS[variant]
    run = MODES[mode]["run"](fn, make_inputs(shape))
    run()  # compile, first touch
    sync()
    if not benchmark.disabled and mode == "attention":
        benchmark.extra_info["peak_mb"] = peak_mb(run)
    benchmark.extra_info["flops"] = MODES[mode]["flops"] * paper_flops(shape)
    timed(benchmark, group, run, variant)


# ---------------------------------------------------------------------------------------------------- in the U-Net
# The cifar10 preset's forward at batch 16 (eval, random weights N(0, 0.05)), its attention blocks on the reference or
# on the fused op (everything else on the default backends in both): the time, the share of it inside the attention
# blocks (forward hooks around them, one extra forward), and the forward's peak memory.
UNET_BATCH = 16


def _cifar10_unet(batch):
    net = random_unet("cifar10")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, net.in_channels, net.image_size, net.image_size, generator=gen).to(DEVICE)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(DEVICE)
    return net, x, t


def _attention_share(net, run):
    """Fraction of one run()'s time spent inside the network's attention blocks."""
    import ddpm_fast

    inside, total, starts, handles = [0.0], 0.0, [], []

    def enter(*_):  # (a hook that returns something replaces the block's input or output: these return None)
        sync()
        starts.append(time.perf_counter())

    def leave(*_):
        sync()
        inside[0] += time.perf_counter() - starts.pop()

    for module in net.modules():
        if isinstance(module, ddpm_fast.unet.AttnBlock):
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        start = time.perf_counter()
        run()
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return inside[0] / total


@pytest.mark.parametrize("attention_on", ["reference", "fused"])
def bench_unet_forward_attention(benchmark, attention_on):
    net, x, t = _cifar10_unet(CI_BATCH if benchmark.disabled else UNET_BATCH)
    fused = attention.attention_block

    def reference_block(*args, folded=None, backend=None):
        return attention.attention_block_reference(*args)

    def run():
        attention.attention_block = reference_block if attention_on == "reference" else fused
        try:
            with torch.inference_mode():
                net(x, t)
            sync()
        finally:
            attention.attention_block = fused

    run()
    if not benchmark.disabled:
        benchmark.extra_info["peak_mb"] = peak_mb(run)
        benchmark.extra_info["attention_share"] = _attention_share(net, run)
    benchmark.group = f"unet forward cifar10 x{x.shape[0]}, attention blocks on"
    benchmark.extra_info["role"] = "ours" if attention_on == "fused" else "eager"
    benchmark.pedantic(run, rounds=3, warmup_rounds=0)


@pytest.mark.skipif(not GPU, reason="the bf16 matmul rate is the GPU's yardstick")
def bench_bf16_matmul_rate(benchmark):
    """What the GPU's tensor cores give a large bf16 GEMM (8192^3): the TFLOP/s the attention rows compare to."""
    size = 8192
    a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    run = lambda: a @ b  # noqa: E731
    run()
    sync()
    benchmark.extra_info["flops"] = 2 * size ** 3
    timed(benchmark, "bf16 matmul 8192^3", run, "matmul")
