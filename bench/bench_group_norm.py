"""The fused GroupNorm (+ per-channel add, SiLU) against eager PyTorch as users write it, its torch.compile, and a
tensor copy of the same size (the memory floor), at the U-Net's 16x16 norm shape (--bench-full: its four norm shapes; batch 64, float32, 32 groups,
eps 1e-6, with the time-embedding add and SiLU: the ResBlock's norm2, dropout 0); then one U-Net forward of each
preset with the fused op against the same network on the reference (eager) GroupNorm.

Run: pytest bench/bench_group_norm.py --benchmark-only --benchmark-columns=min,median,max,rounds
(bench/conftest.py then prints GB/s of our op = extra_info["bytes"] / median, its fraction of the copy's GB/s, and its
speed-up over eager and over torch.compile, all from the same run; the U-Net groups carry no bytes, compare their
medians: role "eager" is the reference GroupNorm, "ours" the fused one.)

Bytes our op must move per float32 element (add, weight and bias are per channel: negligible):
  forward: read x, write y = 8.
  forward + backward: the forward's 8, plus the backward's read of x and dy and write of dx = 12; 20 in all. The CPU
  kernels' second backward pass re-reads x and a dz buffer of the group from cache (a group is at most 16 KiB at these
  shapes); the GPU kernels make both backward passes over (x, dy) in memory, 28 B/element there.
The copy moves 8 (read + write).

On the CPU, 64x128x32x32 float32 is exactly 32 MiB, past the 32 MiB cap of glibc's dynamic mmap threshold: each
such tensor is a fresh mmap whose pages fault in on first write (~10 ms per tensor on the 2-core VM) unless an earlier
bench left a big enough free chunk in the heap. Which benches pay for it depends on what ran before (the eager ones run
first and pay for three, ours later often for none), so compare that shape with
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967296 set (no mmap, no trim: no bench pays) or run each role alone.

Under --benchmark-disable (CI) every bench runs once, the torch.compile benches run at the smallest shape only (with a
cold inductor cache on 2 CPU cores the first compile takes ~15 s, inductor's start-up included, and each later one
~3-5 s), and the U-Net forwards run once each at batch 2 (CI_BATCH); timed runs compile every shape.
"""
import pytest
import torch
import torch.nn.functional as F

from benchutil import DEVICE, GPU, max_time, pick, random_unet, shape_name, sync, timed
from ddpm_fast.ops import registry, use_backend
from ddpm_fast.ops import group_norm as group_norm_ops
from ddpm_fast.ops.group_norm import group_norm_silu

GROUPS, EPS = 32, 1e-6
# the U-Net's norm shapes at batch 64: the cifar10 preset's 32x32 level (128 channels), 16x16 levels (256, and 384
# for the concatenated skips on the way up) and the 8x8 level (512 in the widest up-blocks)
SHAPES = pick([(64, 256, 16, 16)], [(64, 128, 32, 32), (64, 256, 16, 16), (64, 384, 16, 16), (64, 512, 8, 8)])
SMALLEST = min(SHAPES, key=lambda s: torch.Size(s).numel())
BACKENDS = ["cpp", "triton"]


# ---------------------------------------------------------------------------------------------------- baseline
def eager_group_norm_silu(x, add, weight, bias):
    """The ResBlock's norm2 as users write it: silu(GroupNorm(h + temb_proj(temb)[:, :, None, None])).
    Traffic per float32 element: add 8 B (read x, write h), group_norm ~12 (its statistics pass reads h, the normalise
    pass reads h and writes), silu 8 (read, write) = ~28 B/element forward, against the 8 the fused op moves.
    Its backward: silu's reads dy and the saved norm output and writes 12, native_group_norm_backward reads (dy', h)
    twice and writes dh ~20, add's dadd sums dh 4: ~36, so ~64 for forward + backward (the fused op: 20)."""
    return F.silu(F.group_norm(x + add[:, :, None, None], GROUPS, weight, bias, EPS))


# ---------------------------------------------------------------------------------------------------- inputs
class Inputs:
    """Random x, add, weight, bias and a fixed random output gradient of one shape on DEVICE."""

    def __init__(self, shape):
        gen = torch.Generator().manual_seed(0)
        batch, channels = shape[:2]
        self.shape = shape
        self.x = torch.randn(shape, generator=gen).to(DEVICE)
        self.add = torch.randn(batch, channels, generator=gen).to(DEVICE)
        self.weight = (1 + 0.1 * torch.randn(channels, generator=gen)).to(DEVICE)
        self.bias = (0.1 * torch.randn(channels, generator=gen)).to(DEVICE)
        self.grad_y = torch.randn(shape, generator=gen).to(DEVICE)
        self.dst = torch.empty_like(self.x)

    def args(self):
        return self.x, self.add, self.weight, self.bias

    def leaves(self):
        """Copies of (x, add, weight, bias) that require grad: every bench differentiates all four."""
        return tuple(t.clone().requires_grad_(True) for t in self.args())


_inputs = {}


def inputs(shape) -> Inputs:
    if shape not in _inputs:
        _inputs[shape] = Inputs(shape)
    return _inputs[shape]


def ours(backend):
    """Our op with the baseline's signature."""
    def fn(x, add, weight, bias):
        return group_norm_silu(x, weight, bias, GROUPS, EPS, add=add, act=True, backend=backend)

    return fn


def _forward(fn, inp):
    args = inp.args()
    return lambda: fn(*args)


def _forward_backward(fn, inp):
    """fn(...).backward(g) with a fixed random g; grads for x, add, weight, bias, set to None before every round (no
    accumulation pass: every round writes fresh gradients)."""
    leaves, grad_y = inp.leaves(), inp.grad_y

    def run():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves).backward(grad_y)

    return run


# per mode: how to run a function of (x, add, weight, bias) and the bytes per element our op must move
MODES = {
    "group_norm_silu": dict(run=_forward, bytes=8),
    "group_norm_silu+backward": dict(run=_forward_backward, bytes=20),
}
per_mode = pytest.mark.parametrize("mode", list(MODES))
per_shape = pytest.mark.parametrize("shape", SHAPES, ids=[shape_name(s) for s in SHAPES])


def _group(mode, shape):
    return f"{mode} {shape_name(shape)}"


def _unavailable(backend):
    """Why our op's `backend` is not timed here, or None. Triton on a GPU only (interpreter times mean nothing); a
    backend the op does not implement (group_norm.IMPLEMENTED), or cpp on a GPU without a CUDA kernel of the op, is
    skipped with its reason rather than failing the whole GPU run."""
    if backend == "triton" and not GPU:
        return "Triton is timed on a GPU only (interpreter times mean nothing)"
    if backend not in group_norm_ops.IMPLEMENTED:
        return f"group_norm_silu has no {backend!r} implementation (it has: {', '.join(group_norm_ops.IMPLEMENTED)})"
    if backend == "cpp" and GPU and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "ddpm_fast::group_norm_silu", "CUDA"):
        return "ddpm_fast._C has no CUDA kernel of group_norm_silu"
    return None


def _warm(benchmark, run, times=1, compiles=False):
    """Compile / first touch outside the timing. Under --benchmark-disable the bench's one call is not timed, so only
    a compile is warmed (one call, to check it made a graph)."""
    if benchmark.disabled:
        times = 1 if compiles else 0
    for _ in range(times):
        run()
    sync()


@pytest.fixture(scope="session")
def compiled():
    """compiled(mode, shape): torch.compile (default mode, dynamic=False) of the eager baseline, one per (mode, shape).
    Dynamo keeps its cache on the code object: 4 shapes x (no grad, grad) are 8 entries of eager_group_norm_silu,
    exactly torch._dynamo.config.recompile_limit (8), so a fifth shape would fall back to eager silently; the
    bench checks that each call compiled a graph of its own."""
    cache = {}

    def get(mode, shape):
        key = (mode, shape)
        if key not in cache:
            cache[key] = torch.compile(eager_group_norm_silu, dynamic=False)
        return cache[key]

    return get


@pytest.mark.benchmark(max_time=max_time())
@per_shape
@per_mode
def bench_eager(benchmark, mode, shape):
    run = MODES[mode]["run"](eager_group_norm_silu, inputs(shape))
    _warm(benchmark, run)
    timed(benchmark, _group(mode, shape), run, "eager")


@pytest.mark.benchmark(max_time=max_time())
@per_shape
@per_mode
def bench_compiled(benchmark, compiled, mode, shape):
    if benchmark.disabled and shape != SMALLEST:
        pytest.skip("under --benchmark-disable torch.compile runs at the smallest shape only (compile time)")
    run = MODES[mode]["run"](compiled(mode, shape), inputs(shape))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _warm(benchmark, run, 2, compiles=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs, \
        "torch.compile made no new graph for this shape (recompile limit reached?): it would time eager"
    timed(benchmark, _group(mode, shape), run, "compiled")


@pytest.mark.benchmark(max_time=max_time())
@pytest.mark.parametrize("backend", BACKENDS)
@per_shape
@per_mode
def bench_ours(benchmark, mode, shape, backend):
    reason = _unavailable(backend)
    if reason:
        pytest.skip(reason)
    inp = inputs(shape)
    run = MODES[mode]["run"](ours(backend), inp)
    _warm(benchmark, run)
    timed(benchmark, _group(mode, shape), run, "ours", nbytes=MODES[mode]["bytes"] * inp.x.numel(), backend=backend)


@pytest.mark.benchmark(max_time=max_time())
@per_shape
@per_mode
def bench_copy(benchmark, mode, shape):
    """The memory floor: dst.copy_(src) of one tensor of the shape, 8 B/element (read + write)."""
    inp = inputs(shape)
    timed(benchmark, _group(mode, shape), lambda: inp.dst.copy_(inp.x), "copy", nbytes=8 * inp.x.numel())


# ---------------------------------------------------------------------------------------------------- U-Net forward
# One eval forward (torch.inference_mode) of each preset, random weights N(0, 0.05) so the activations are not
# trivial, with the default backend choice against `use_backend("reference")`. The reference forces every ddpm_fast
# op in the network; the U-Net uses two: group_norm_silu and attention_block (on the CPU both fused since the
# attention issue; bench/bench_attention.py times the attention block alone). Few rounds: on 2 CPU cores one forward
# takes ~0.1 s (small x64) and ~0.3 s (cifar10 x4).
UNETS = {
    "small": dict(batch=64, rounds=5),
    "cifar10": dict(batch=4, rounds=3),
}
CI_BATCH = 2  # under --benchmark-disable: the forward runs once, only to show the bench works (saves ~8 s of CI)
UNET_VARIANTS = {"reference": "eager", "fused": "ours"}


@pytest.fixture(scope="module")
def unet_case():
    cache = {}

    def get(preset, batch):
        if (preset, batch) not in cache:
            net = random_unet(preset)
            shape = (batch, net.in_channels, net.image_size, net.image_size)
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=gen).to(DEVICE)
            t = torch.randint(0, 1000, (batch,), generator=gen).to(DEVICE)
            cache[preset, batch] = net, x, t
        return cache[preset, batch]

    return get


def _fused_backend():
    """The backend the default choice gives group_norm_silu on DEVICE, or pytest.skip if it cannot run here."""
    chosen = registry.choose("group_norm_silu", DEVICE, group_norm_ops.IMPLEMENTED)
    if chosen == "reference":
        pytest.skip(f"no fused group_norm_silu runs on {DEVICE.type}: the default choice is the reference")
    reason = _unavailable(chosen)
    if reason:
        pytest.skip(f"the default choice {chosen!r}: {reason}")
    return chosen


@pytest.mark.parametrize("variant", list(UNET_VARIANTS))
@pytest.mark.parametrize("preset", list(UNETS))
def bench_unet_forward(benchmark, unet_case, preset, variant):
    backend = "reference" if variant == "reference" else _fused_backend()
    net, x, t = unet_case(preset, CI_BATCH if benchmark.disabled else UNETS[preset]["batch"])

    def run():
        with torch.inference_mode():
            if variant == "reference":
                with use_backend("reference"):
                    net(x, t)
            else:
                net(x, t)
        sync()

    benchmark.group = f"unet forward {preset} x{x.shape[0]} ({'x'.join(map(str, x.shape[1:]))})"
    benchmark.extra_info["role"] = UNET_VARIANTS[variant]
    benchmark.extra_info["backend"] = backend
    benchmark.pedantic(run, rounds=UNETS[preset]["rounds"], warmup_rounds=1)
