"""The whole sampler, end to end: the eager loop as diffusers / improved-diffusion write it (their network: torch's
GroupNorm and SiLU, 1x1-conv attention with the scores held; then ~8 elementwise ops and a torch.randn per step:
bench/baselines.py), torch.compile of that loop's step (inductor with freezing: the weights folded in, as for CPU
inference), and ddpm_fast.sample, on the same weights, with the network in float32 and in bf16 (autocast for the
eager loop and its compile; ours: network_dtype=torch.bfloat16, the state float32 in all).

CPU: the digits preset at batch 64 and the small preset at batch 16 (20 respaced steps; --bench-full: 50), and the
cifar10 preset at batch 16 (2 steps; --bench-full: 5), contiguous tensors (--bench-full: also channels_last, the
network's weights and the state: what a layout change gives each). torch.compile only for cifar10 in bf16 in the
quick suite (a cold compile of the network takes ~1 minute on 2 CPU cores); --bench-full compiles every contender.
A step costs the same whatever the schedule's length (one network call and one update), so images/s for the paper's
1000 steps = batch / (1000 x the median time per step); bench/conftest.py prints that table. GPU
(bench/gpu_check.sh): the cifar10 preset at batch 256, bf16, 50 steps; ours with and without CUDA graphs (each
sample() call of ours includes its memory probe, warm-up and capture).

Bytes and FLOPs: a step is one network call (the small preset: 2.83 GFLOP of convolutions and linear layers at
batch 16; cifar10: 11.4 GFLOP per image) plus the update, which moves ~5 x 4 bytes per pixel (x_t, eps read; x_{t-1}
written; eager: ~10 passes). The network dominates: what a sampler can win is the time outside the convolutions,
which the eager bench measures (extra_info conv_share, on the CPU: the share of the eager float32 network's time
inside Conv2d modules, timed by forward hooks in one untimed call), and what bf16 wins inside them.

Under --benchmark-disable (CI) every bench runs once at batch 2 and 2 steps, and torch.compile only for the small
preset in float32, contiguous.
"""
import time

import pytest
import torch

import ddpm_fast
from baselines import eager_copy, eager_loop, eager_step
from benchutil import DEVICE, GPU, full, pick, random_unet, role_name, sync, timed_rounds

if GPU:
    PRESETS = {"cifar10": dict(n=256, steps=50)}  # (each call of ours warms up and captures: 2 steps + a capture)
    LAYOUTS = {"contiguous": torch.contiguous_format}
    DTYPES = {"bf16": torch.bfloat16}
else:
    PRESETS = {"digits": dict(n=64, steps=pick(20, 50)), "small": dict(n=16, steps=pick(20, 50)),
               "cifar10": dict(n=16, steps=pick(2, 5))}
    LAYOUTS = pick({"contiguous": torch.contiguous_format},
                   {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last})
    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CI = dict(n=2, steps=2)

per_preset = pytest.mark.parametrize("preset", list(PRESETS))
per_layout = pytest.mark.parametrize("layout", list(LAYOUTS))
per_dtype = pytest.mark.parametrize("dtype", list(DTYPES))


def sizes(benchmark, preset):
    return CI if benchmark.disabled else PRESETS[preset]


def _group(preset, layout, n, steps):
    return f"sampler {preset} x{n}, {steps} steps, {layout}"


def _conv_info(model, net, size, layout, dtype) -> dict:
    """extra_info "conv_share" of a float32 CPU contender: the convolutions' share of `model`'s step."""
    if GPU or dtype != "fp32":
        return {}
    x = torch.randn(size["n"], *_shape(net)).contiguous(memory_format=LAYOUTS[layout])
    return {"conv_share": conv_share(model, x, torch.full((size["n"],), 500))}


_networks = {}


def network(preset, layout):
    """The preset's U-Net with random weights (every parameter: fresh norms and the zero-initialised output conv
    would make the network trivial), in `layout`, eval mode; one per (preset, layout)."""
    if (preset, layout) not in _networks:
        _networks[preset, layout] = random_unet(preset).to(memory_format=LAYOUTS[layout])
    return _networks[preset, layout]


def _shape(net):
    return (net.in_channels, net.image_size, net.image_size)


def conv_share(model, x, t) -> float:
    """The share of one call's time inside the Conv2d modules (CPU: synchronous, so wall times add up)."""
    spent = [0.0]

    def before(module, args):
        module._started = time.perf_counter()

    def after(module, args, output):
        spent[0] += time.perf_counter() - module._started

    hooks = [h for m in model.modules() if isinstance(m, torch.nn.Conv2d)
             for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        with torch.inference_mode():
            model(x, t)  # warm
            spent[0] = 0.0
            start = time.perf_counter()
            model(x, t)
            total = time.perf_counter() - start
    finally:
        for h in hooks:
            h.remove()
    return spent[0] / total


def _time(benchmark, group, run, role, n, steps, **info):
    timed_rounds(benchmark, group, run, role=role, images=n, steps=steps, **info)


def _autocast(dtype):
    return torch.autocast(DEVICE.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")


@per_preset
@per_layout
@per_dtype
def bench_eager(benchmark, preset, layout, dtype):
    size = sizes(benchmark, preset)
    net = network(preset, layout)
    model = eager_copy(net)
    diffusion = ddpm_fast.Diffusion().respace(size["steps"])
    info = _conv_info(model, net, size, layout, dtype)

    def run():
        with torch.inference_mode(), _autocast(dtype):
            eager_loop(model, diffusion, size["n"], _shape(net), DEVICE, memory_format=LAYOUTS[layout])

    _time(benchmark, _group(preset, layout, **size), run, role_name("eager", dtype == "bf16"), **size, **info)


def _compiled_here(benchmark, preset, layout, dtype) -> str | None:
    """Why this compiled contender is not run (None: it is): CI compiles the small preset in float32 only; the quick
    suite cifar10 in bf16 only (the issue's peer: what a CPU user would pick); --bench-full every one."""
    if benchmark.disabled:
        ok = (preset, layout, dtype) == ("small", "contiguous", "fp32")
        return None if ok else "under --benchmark-disable torch.compile runs for small, contiguous, fp32 only"
    if not (full() or GPU or (preset, dtype) == ("cifar10", "bf16")):
        return "the quick suite compiles cifar10 in bf16 only (--bench-full compiles every contender)"
    return None


@per_preset
@per_layout
@per_dtype
def bench_compiled(benchmark, preset, layout, dtype):
    reason = _compiled_here(benchmark, preset, layout, dtype)
    if reason:
        pytest.skip(reason)
    size = sizes(benchmark, preset)
    net = network(preset, layout)
    model = eager_copy(net)
    diffusion = ddpm_fast.Diffusion().respace(size["steps"])
    step = torch.compile(eager_step, dynamic=False)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def run():
        with torch.inference_mode(), _autocast(dtype), torch._inductor.config.patch(freezing=True):
            eager_loop(model, diffusion, size["n"], _shape(net), DEVICE, step=step, memory_format=LAYOUTS[layout])

    run()  # the compile, outside the timing
    sync()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs, "torch.compile made no graph"
    _time(benchmark, _group(preset, layout, **size), run, role_name("compiled", dtype == "bf16"), **size)


@per_preset
@per_layout
@per_dtype
@pytest.mark.parametrize("cuda_graph", [True, False] if GPU else [False], ids=lambda g: "graph" if g else "loop")
def bench_ours(benchmark, preset, layout, dtype, cuda_graph):
    size = sizes(benchmark, preset)
    net = network(preset, layout)
    info = _conv_info(net, net, size, layout, dtype)

    def run():
        ddpm_fast.sample(net, size["n"], steps=size["steps"], progress=False, cuda_graph=cuda_graph,
                         network_dtype=DTYPES[dtype])

    role = role_name("ours", dtype == "bf16") + ("" if cuda_graph or not GPU else " (no graph)")
    _time(benchmark, _group(preset, layout, **size), run, role, **size, **info)


@pytest.mark.parametrize("out_format", [None, "png", "npz"], ids=lambda f: f"streamed-{f}" if f else "in-memory")
def bench_streaming(benchmark, tmp_path, out_format):
    """sample(out=) against the same run in memory: two batches, so that the writer thread's files overlap the
    second batch's sampling (the issue's bar: streaming costs < 5% of images/s). Each round writes a fresh folder.
    --bench-full only (not a comparison with eager PyTorch)."""
    if not (full() or benchmark.disabled):
        pytest.skip("streaming: --bench-full only")
    preset = "cifar10" if GPU else "small"
    dtype = next(iter(DTYPES.values()))
    size = sizes(benchmark, preset)
    batch = max(size["n"] // 2, 1)
    net = network(preset, "contiguous")
    rounds = iter(range(1000))

    def run():
        out = None if out_format is None else tmp_path / f"round{next(rounds)}"
        ddpm_fast.sample(net, size["n"], batch_size=batch, steps=size["steps"], progress=False, network_dtype=dtype,
                         out=out, out_format=out_format or "png")

    role = "ours" if out_format is None else f"ours, streamed to {out_format}"
    group = _group(preset, "contiguous", **size).replace("sampler", "streaming") + f", batch {batch}"
    _time(benchmark, group, run, role, **size)


def _trivial_model(x, t):
    """An eps-model that costs one elementwise pass: what is left of a step is the sampler's own work."""
    return 0.5 * x


@pytest.mark.parametrize("role", ["eager", "ours"])
def bench_trivial_model_loop(benchmark, role):
    """The paper's 1000-step loop at 64x3x32x32 with a trivial eps-model: the sampler's own cost per step (eager:
    the update's ~8 elementwise passes and a torch.randn; ours: one fused pass, the NaN flag set inside it). Per
    step, ours must move 12 B per element (read x_t and eps, write x_{t-1}): 2.4 MB."""
    n, steps = (2, 2) if benchmark.disabled else (64, 1000)
    diffusion = ddpm_fast.Diffusion().respace(steps) if steps < 1000 else ddpm_fast.Diffusion()
    shape = (3, 32, 32)

    def run():
        if role == "eager":
            with torch.inference_mode():
                eager_loop(_trivial_model, diffusion, n, shape, DEVICE)
        else:
            ddpm_fast.sample(_trivial_model, n, shape=shape, diffusion=diffusion, device=DEVICE, progress=False,
                             network_dtype=torch.float32)

    _time(benchmark, f"sampling loop, trivial eps-model {n}x3x32x32, {steps} steps", run, role, n, steps,
          bytes_per_step=12 * n * 3 * 32 * 32)
