"""The fused per-step ops (reverse step, forward noising, L_simple) against eager PyTorch as users write it, its
torch.compile, and a tensor copy of the same size (the memory floor), at 64x3x32x32 (--bench-full: and 256x3x64x64)
float32.

Run: pytest bench/bench_diffusion_step.py --benchmark-only --benchmark-columns=min,median,max,rounds
(bench/conftest.py then prints GB/s of each of our ops = extra_info["bytes"] / median, its fraction of the copy's
GB/s, and its speed-up over eager and over torch.compile, all from the same run.)

Bytes each op must move (float32, per element): reverse_step reads x_t, eps, writes x_{t-1}: 12; q_sample_philox
reads x0, writes x_t and eps: 12; q_sample reads x0, noise, writes x_t: 12; simple_loss reads eps_pred, eps: 8; its
backward reads both and writes the gradient: 12 (20 for forward + backward). The copy moves 8 (read + write).

Under --benchmark-disable (CI) every bench runs once, and the torch.compile benches run at the small size only (the
large ones are skipped): with a cold inductor cache on 2 CPU cores compiling all ten baselines takes ~30 s (the first
compile alone ~15 s), the five small ones ~20 s, which keeps the file under 30 s. Timed runs compile both sizes.
"""
import pytest
import torch

import ddpm_fast
from benchutil import DEVICE, GPU, max_time, pick, shape_name, sync, timed
from ddpm_fast.ops import diffusion_step, philox

SIZES = pick([(64, 3, 32, 32)], [(64, 3, 32, 32), (256, 3, 64, 64)])  # (the large: --bench-full)
SMALL = SIZES[0]
T_STEP = 500  # every sample at t = 500: all noisy, the usual case of the loop
SEED = 0


def _backends(size):
    """cpp always (the C++ CPU kernel, or the CUDA kernel on a GPU); Triton on a GPU only (interpreter times mean
    nothing); the eager reference at the small size only (it is slow: int64 Philox in torch ops)."""
    return ["cpp"] + (["triton"] if GPU else []) + (["reference"] if size == SMALL else [])


def _per_sample(v):
    return v.view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------- baselines
# Eager PyTorch as users write it. Traffic counts every op's reads and writes of (B, C, H, W) float32 tensors (the
# (B,)-shaped coefficient gathers are negligible); each op is one pass over memory.

def eager_reverse_step(x, eps, t, sqrt_recip, sqrt_recipm1, coef1, coef2, log_variance):
    """diffusers' DDPMScheduler.step / improved-diffusion's p_sample, per-sample coefficients gathered by t.
    Traffic: a*x 8 B, b*eps 8, sub 12, clamp 8, c1*x0 8, c2*x 8, add 12, randn_like 4 (written), sigma*noise 8,
    add 12 = 88 B/element, against the 12 the fused step must move."""
    x0 = _per_sample(sqrt_recip[t]) * x - _per_sample(sqrt_recipm1[t]) * eps
    x0 = x0.clamp(-1, 1)
    mean = _per_sample(coef1[t]) * x0 + _per_sample(coef2[t]) * x
    noise = torch.randn_like(x)
    nonzero_mask = _per_sample((t != 0).float())
    return mean + nonzero_mask * _per_sample(torch.exp(0.5 * log_variance[t])) * noise


def eager_q_sample_randn(x0, t, sqrt_abar, sqrt_one_minus_abar):
    """Training's forward noising with a fresh eps (kept for the loss).
    Traffic: randn_like 4 B, mul 8, mul 8, add 12 = 32 B/element (the fused op: 12)."""
    noise = torch.randn_like(x0)
    return _per_sample(sqrt_abar[t]) * x0 + _per_sample(sqrt_one_minus_abar[t]) * noise, noise


def eager_q_sample(x0, t, sqrt_abar, sqrt_one_minus_abar, noise):
    """Forward noising with given noise. Traffic: mul 8 B, mul 8, add 12 = 28 B/element (the fused op: 12)."""
    return _per_sample(sqrt_abar[t]) * x0 + _per_sample(sqrt_one_minus_abar[t]) * noise


def eager_simple_loss(eps_pred, eps):
    """L_simple per sample. Traffic: sub 12 B, pow 8, mean 4 = 24 B/element forward (the fused op: 8); the backward
    (mean's expand, pow's 2*d*grad, sub's pass-through) makes about 3 more passes, ~36 B/element (fused: 12)."""
    return ((eps - eps_pred) ** 2).mean(dim=(1, 2, 3))


# ---------------------------------------------------------------------------------------------------- inputs
class Inputs:
    """Random inputs (never zeros) and the coefficient tables of one size on DEVICE."""

    def __init__(self, size):
        gen = torch.Generator().manual_seed(0)
        batch = size[0]
        self.size = size
        self.x = torch.randn(size, generator=gen).to(DEVICE)
        self.eps = torch.randn(size, generator=gen).to(DEVICE)
        self.eps_pred = torch.randn(size, generator=gen).to(DEVICE)
        self.t = torch.full((batch,), T_STEP, dtype=torch.int64, device=DEVICE)
        self.index = torch.arange(batch, device=DEVICE)
        self.step = self.t.clone()  # the noise's counter word
        diffusion = ddpm_fast.Diffusion()
        self.step_coef = diffusion.step_table(DEVICE, torch.float32, "ddpm")
        self.tables = diffusion.tables_on(DEVICE, torch.float32)
        self.q_coef = self.tables["q_sample"]
        self.dst = torch.empty_like(self.x)

    def reverse_args(self):
        tab = self.tables
        return (self.x, self.eps, self.t, tab["sqrt_recip_alphas_cumprod"], tab["sqrt_recipm1_alphas_cumprod"],
                tab["posterior_mean_coef1"], tab["posterior_mean_coef2"], tab["model_log_variance"])

    def q_args(self):
        return self.x, self.t, self.tables["sqrt_alphas_cumprod"], self.tables["sqrt_one_minus_alphas_cumprod"]


_inputs = {}


def inputs(size) -> Inputs:
    if size not in _inputs:
        _inputs[size] = Inputs(size)
    return _inputs[size]


def _forward_backward(loss_fn, eps_pred, eps):
    def run():
        eps_pred.grad = None  # no accumulation pass: every round writes a fresh gradient
        loss_fn(eps_pred, eps).sum().backward()

    return run


def _leaf(inp):
    return inp.eps_pred.clone().requires_grad_(True)


# Per op: the baseline function, how to call it (or its compiled twin) on the inputs, how to call our op with a
# backend, and the bytes our op must move per element.
OPS = {
    "reverse_step": dict(
        baseline=eager_reverse_step,
        call=lambda fn, inp: (lambda args=inp.reverse_args(): fn(*args)),
        ours=lambda inp, backend: lambda: diffusion_step.reverse_step(
            inp.x, inp.eps, inp.t, inp.step_coef, inp.index, inp.step, seed=SEED, backend=backend),
        bytes=12),
    "q_sample_philox": dict(
        baseline=eager_q_sample_randn,
        call=lambda fn, inp: (lambda args=inp.q_args(): fn(*args)),
        ours=lambda inp, backend: lambda: diffusion_step.q_sample_philox(
            inp.x, inp.t, inp.q_coef, inp.index, inp.step, seed=SEED, backend=backend),
        bytes=12),
    "q_sample": dict(
        baseline=eager_q_sample,
        call=lambda fn, inp: (lambda args=inp.q_args() + (inp.eps,): fn(*args)),
        ours=lambda inp, backend: lambda: diffusion_step.q_sample(inp.x, inp.t, inp.q_coef, inp.eps, backend=backend),
        bytes=12),
    "simple_loss": dict(
        baseline=eager_simple_loss,
        call=lambda fn, inp: lambda: fn(inp.eps_pred, inp.eps),
        ours=lambda inp, backend: lambda: diffusion_step.simple_loss(inp.eps_pred, inp.eps, backend=backend),
        bytes=8),
    # training: loss.sum().backward() with eps_pred.requires_grad; forward 8 B/element + backward 12
    "simple_loss+backward": dict(
        baseline=eager_simple_loss,
        call=lambda fn, inp: _forward_backward(fn, _leaf(inp), inp.eps),
        ours=lambda inp, backend: _forward_backward(
            lambda p, e: diffusion_step.simple_loss(p, e, backend=backend), _leaf(inp), inp.eps),
        bytes=20),
}
BACKENDS = ["cpp", "triton", "reference"]
SIZE_IDS = [shape_name(s) for s in SIZES]
per_op = pytest.mark.parametrize("op", list(OPS))
per_size = pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)


def _warm(run, times=1):
    """Compile / first touch outside the timing."""
    for _ in range(times):
        run()
    sync()


@pytest.fixture(scope="session")
def compiled():
    """compiled(fn, size): torch.compile (default mode) of a baseline, one per size (dynamic=False: each size gets
    its own static kernels, as for a fixed batch shape, and no recompile turns the second size dynamic). Each bench
    warms it up (compiles) before timing; a compile failure fails the bench with its error."""
    cache = {}

    def get(fn, size):
        key = (fn.__name__, size)
        if key not in cache:
            cache[key] = torch.compile(fn, dynamic=False)
        return cache[key]

    return get


@pytest.mark.benchmark(max_time=max_time())
@per_size
@per_op
def bench_eager(benchmark, op, size):
    spec, inp = OPS[op], inputs(size)
    run = spec["call"](spec["baseline"], inp)
    _warm(run)
    timed(benchmark, f"{op} {shape_name(size)}", run, "eager")


@pytest.mark.benchmark(max_time=max_time())
@per_size
@per_op
def bench_compiled(benchmark, compiled, op, size):
    if benchmark.disabled and size != SMALL:
        pytest.skip("under --benchmark-disable torch.compile runs at the small size only (compile time)")
    spec, inp = OPS[op], inputs(size)
    run = spec["call"](compiled(spec["baseline"], size), inp)
    _warm(run, 2)
    timed(benchmark, f"{op} {shape_name(size)}", run, "compiled")


@pytest.mark.benchmark(max_time=max_time())
@pytest.mark.parametrize("backend", BACKENDS)
@per_size
@per_op
def bench_ours(benchmark, op, size, backend):
    if backend not in _backends(size):
        pytest.skip(f"backend {backend!r} is not timed at {shape_name(size)} on {DEVICE.type} (see _backends)")
    spec, inp = OPS[op], inputs(size)
    run = spec["ours"](inp, backend)
    _warm(run)
    timed(benchmark, f"{op} {shape_name(size)}", run, "ours", nbytes=spec["bytes"] * inp.x.numel(), backend=backend)


@pytest.mark.benchmark(max_time=max_time())
@per_size
@per_op
def bench_copy(benchmark, op, size):
    """The memory floor: dst.copy_(src) of one tensor of the size, 8 B/element (read + write)."""
    inp = inputs(size)
    timed(benchmark, f"{op} {shape_name(size)}", lambda: inp.dst.copy_(inp.x), "copy", nbytes=8 * inp.x.numel())


# ------------------------------------------------------------------------------------------------ eps: redraw or store
# Should the loss read the eps that q_sample_philox stored, or draw it again from its Philox keys? Storing costs a
# write (in q_sample_philox) and a read (in the loss) of 4 B/element; redrawing costs a philox.randn pass of the same
# shape. Timed: philox.randn alone, against the whole loss reading the stored eps.
EPS_GROUP = "loss eps: redraw vs stored {}"


EPS_BACKENDS = ["cpp"] + (["triton"] if GPU else [])


@pytest.mark.benchmark(max_time=max_time())
@pytest.mark.parametrize("backend", EPS_BACKENDS)
@per_size
def bench_eps_redraw(benchmark, size, backend):
    inp = inputs(size)

    def run():
        philox.randn(inp.index, inp.step, size[1:], seed=SEED, stream=philox.STREAM_TRAIN_EPS, backend=backend)

    _warm(run)
    timed(benchmark, EPS_GROUP.format(shape_name(size)), run, "redraw", nbytes=4 * inp.x.numel(), backend=backend)


@pytest.mark.benchmark(max_time=max_time())
@pytest.mark.parametrize("backend", EPS_BACKENDS)
@per_size
def bench_eps_stored_loss(benchmark, size, backend):
    inp = inputs(size)

    def run():
        diffusion_step.simple_loss(inp.eps_pred, inp.eps, backend=backend)

    _warm(run)
    timed(benchmark, EPS_GROUP.format(shape_name(size)), run, "stored", nbytes=8 * inp.x.numel(), backend=backend)


@pytest.mark.benchmark(max_time=max_time())
@per_size
def bench_eps_copy(benchmark, size):
    inp = inputs(size)
    timed(benchmark, EPS_GROUP.format(shape_name(size)), lambda: inp.dst.copy_(inp.x), "copy", nbytes=8 * inp.x.numel())
