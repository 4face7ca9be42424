"""Sampling: DDPM ancestral sampling (Algorithm 2 of the paper) or DDIM over a whole run of n images, in batches.
Each step is the model call and one fused reverse-step op (ddpm_fast/ops/diffusion_step.py).

Noise is keyed by the global sample index (docs/design.md), so the images do not depend on the batch split.
The loop keeps t on the device and checks for NaN/inf with a device-side flag per batch, read once at the end.
On a GPU one step (network + reverse step + flag) is captured in a CUDA graph per batch size and replayed: the step
reads its position from a device counter that the graph itself advances, so every replay is the next step; the
network runs under bf16 autocast there by default, and on a CPU with native bf16 (the state stays float32).
"""
from __future__ import annotations

import collections
import contextlib
import os
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ddpm_fast import checks, memory, precision
from ddpm_fast import sample_store as _sample_store
from ddpm_fast.diffusion import Diffusion
from ddpm_fast.images import save_grid, to_uint8
from ddpm_fast.kernels.layout import is_channels_last
from ddpm_fast.ops import philox

SAMPLERS = ("ddpm", "ddim")
DEFAULT_MAX_BATCH = 256  # larger batches gain little throughput and delay the first images
# Devices where the batch size is checked against free memory (a probe of two model calls): a GPU's memory is the
# limit there; a CPU's RAM rarely is, and the probe's calls would show in a plain callable's side effects.
PROBED_DEVICES = ("cuda",)
MEMORY_HEADROOM = 0.8  # of the free memory: the allocator's rounding and fragmentation, and other users
# Steps queued on a GPU ahead of the one the host waits for: enough to keep it busy, few enough that the progress
# bar shows finished steps (without a wait the host would queue the whole run at once).
STEPS_IN_FLIGHT = 8


class SampleResult(NamedTuple):
    """sample(..., return_intermediates=k): the images and the reverse process every k steps (the paper's Figure 6:
    x0_hat, the model's prediction of x0, sharpens as t falls)."""
    images: torch.Tensor           # (n, C, H, W) in [-1, 1], as sample() returns without intermediates
    timesteps: tuple[int, ...]     # the paper's t (1..T, of the original schedule) of each recorded step, falling
    x_t: torch.Tensor              # (K, n, C, H, W): the state entering each recorded step
    x0_hat: torch.Tensor           # (K, n, C, H, W): the prediction of x0 at that step (clipped if clip_denoised)

    def save_grid(self, path: str | os.PathLike, which: str = "x0_hat", max_images: int = 8,
                  scale: int | None = None) -> Path:
        """A PNG with one row per image (the first max_images) and one column per recorded step, t falling from left
        to right, then the final image; `which` is "x0_hat" or "x_t" (values outside [-1, 1] are clipped); `scale`
        as images.save_grid's."""
        if which not in ("x0_hat", "x_t"):
            raise ValueError(f"which must be 'x0_hat' or 'x_t', got {which!r}")
        checks.positive_int("max_images", max_images)
        steps = getattr(self, which)[:, :max_images].clamp(-1, 1)  # (K, m, C, H, W)
        final = self.images[:max_images].unsqueeze(0)
        rows = torch.cat([steps, final]).transpose(0, 1)  # (m, K + 1, C, H, W): image after image
        return save_grid(rows.reshape(-1, *rows.shape[2:]), path, nrow=rows.shape[1], scale=scale)


def _recorded_steps(steps_count: int, every: int) -> list[int]:
    """Loop positions j (0 = the first step, at t = T) recorded by return_intermediates=every: every `every`-th from
    the first, and the last step always."""
    return sorted(set(range(0, steps_count, every)) | {steps_count - 1})


def _batch_that_fits(model, shape, device, held_images: int) -> tuple[int | None, str]:
    """The largest batch whose sampling fits in `device`'s free memory, and how that was worked out, in words; None
    where the memory cannot be read. The network's memory per image is measured (its peak at batch 2 less its peak
    at batch 1), plus the loop's own tensors per image (x_t, eps, x_{t-1}, z, x0_hat); `held_images` images are held
    for the whole run (the output, the recorded steps)."""
    free = memory.free_bytes(device)
    if free is None:
        return None, f"the free memory of {device} cannot be read"

    def peak(batch):
        x = torch.zeros(batch, *shape, device=device)
        t = torch.zeros(batch, dtype=torch.int64, device=device)
        with torch.inference_mode():
            return memory.peak_bytes(lambda: model(x, t), device)

    one, two = peak(1), peak(2)
    if one is None or two is None:
        return None, f"the peak memory of a model call on {device} cannot be read"
    image = 4 * torch.Size(shape).numel()
    network = max(two - one, 0)
    per_image = network + 5 * image
    fixed = max(one - network, 0) + held_images * image
    fits = int((free * MEMORY_HEADROOM - fixed) // per_image)
    words = (f"{free / 2**30:.2f} GiB free on {device}, {MEMORY_HEADROOM:.0%} of it usable; the network takes "
             f"{network / 2**20:.2f} MiB per image, the sampling loop {5 * image / 2**20:.2f} MiB per image, and "
             f"{fixed / 2**20:.1f} MiB are fixed (the network's own and the {held_images} images the run keeps)")
    return fits, words


def model_device(model) -> torch.device | None:
    """Where an nn.Module's parameters (else buffers) live; None for a plain callable or a module without any."""
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return None


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode within the block (no dropout), in its own mode again after; a plain callable as it is."""
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def _memory_format(model) -> torch.memory_format:
    """The state's layout: channels_last where the model's convolution weights are (model.to(memory_format=
    torch.channels_last)), so that its first convolution gets what the rest of it runs in; else contiguous."""
    if isinstance(model, nn.Module):
        if any(is_channels_last(tensor) for tensor in model.parameters()):
            return torch.channels_last
    return torch.contiguous_format


def _resolve_shape(model, shape) -> tuple[int, ...]:
    if shape is None:
        if not (hasattr(model, "in_channels") and hasattr(model, "image_size")):
            raise ValueError("cannot tell the image shape: pass shape=(C, H, W), or a model with in_channels and "
                             "image_size attributes")
        shape = (model.in_channels, model.image_size, model.image_size)
    if not isinstance(shape, (tuple, list)) or not shape or \
            any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be a tuple of positive ints like (C, H, W), got {shape!r}")
    checks.image_shape(model, tuple(shape), "shape")
    return tuple(shape)


def resolve_diffusion(model, diffusion, variance, steps) -> Diffusion:
    """diffusion= > the model's own > the defaults; then variance= and steps= applied to it."""
    if diffusion is None:
        diffusion = getattr(model, "diffusion", None) or Diffusion()
    if not isinstance(diffusion, Diffusion):
        raise ValueError(f"diffusion must be a ddpm_fast.Diffusion, got {type(diffusion).__name__}")
    if variance is not None:
        diffusion = diffusion.with_variance(variance)
    if steps is not None:
        diffusion = diffusion.respace(steps)
    return diffusion


def _batch_size(model, shape, device, n: int, asked: int | None, held_images: int) -> int:
    """The batch size: `asked`, or min(n, DEFAULT_MAX_BATCH, what fits) (what fits: on PROBED_DEVICES, with
    `held_images` images kept for the whole run). An asked batch that does not fit, or no batch at all, is an error
    that says what would fit and why."""
    want = min(n, DEFAULT_MAX_BATCH) if asked is None else asked
    if device.type not in PROBED_DEVICES:
        return want
    fits, words = _batch_that_fits(model, shape, device, held_images)
    if fits is None:
        return want
    if fits < 1:
        raise MemoryError(f"not even one image fits: {words}")
    if asked is not None and asked > fits:
        raise ValueError(f"batch_size={asked} does not fit: {words}; batch_size={fits} would (or leave it to the "
                         "default)")
    return min(want, fits)


class _Batch(NamedTuple):
    """What the steps of one batch need: x_T, the global sample indices, the batch's NaN flag (a view into the run's:
    the first step, of the (respaced) process, whose output was not finite, -1: none; _check_finite maps it to the
    original t) and the recorded tensors' slices."""
    x: torch.Tensor
    index: torch.Tensor
    bad: torch.Tensor
    x_ts: torch.Tensor        # (K, B, ...) views into the run's x_t record
    x0_hats: torch.Tensor


class _Engine:
    """The reverse process over one batch: step(x, t) -> x_{t-1} (and x0_hat), then the flag, run step by step in
    Python (CPU, or cuda_graph=False) or as a CUDA graph replayed once per step (one graph per batch size)."""

    def __init__(self, diffusion: Diffusion, network: Callable, table, clip_denoised: bool, seed: int,
                 recorded_at: dict[int, int], device: torch.device, cuda_graph: bool):
        self.diffusion, self.network, self.table = diffusion, network, table
        self.clip_denoised, self.seed, self.device = clip_denoised, seed, device
        self.recorded_at = recorded_at  # loop position -> index in the recorded tensors
        self.steps_count = diffusion.num_timesteps
        self.graphed = cuda_graph and device.type == "cuda"
        self.graphs: dict[int, _GraphedStep] = {}
        self.write_x0 = bool(recorded_at)

    def step(self, x: torch.Tensor, i: torch.Tensor, index: torch.Tensor, bad: torch.Tensor):
        """x_{t-1} and x0_hat (or None) for x at code step i (a 0-d int64 tensor on the device); the reverse step
        raises bad to i where its output is not finite (in the same pass, without a host sync): the first step that
        went non-finite, since i falls."""
        t = i.expand(x.shape[0])
        return self.diffusion.reverse_step(self.network, x, t, self.table, self.clip_denoised, self.seed, index,
                                            write_x0=self.write_x0, nonfinite_t=bad)

    def run(self, batch: _Batch, bar) -> torch.Tensor:
        """Every step from batch.x; the recorded steps into batch.x_ts / x0_hats, the flag into batch.bad. Returns
        x_0 (on a GPU with graphs: the graph's buffer, valid until the next batch of its size)."""
        if self.graphed:
            size = batch.x.shape[0]
            if size not in self.graphs:  # (a second size, the last batch's, shares the first one's memory pool)
                pool = next(iter(self.graphs.values())).graph.pool() if self.graphs else None
                self.graphs[size] = _GraphedStep(self, batch.x, pool)
            return self.graphs[size].run(batch, bar)
        steps = torch.arange(self.steps_count, device=self.device)
        last = self.steps_count - 1
        return self.loop(batch, bar, batch.x, lambda j, x: self.step(x, steps[last - j], batch.index, batch.bad))

    def loop(self, batch: _Batch, bar, x: torch.Tensor, advance: Callable) -> torch.Tensor:
        """x through the steps_count steps, advance(j, x) -> (x_{t-1}, x0_hat) being loop position j's; the
        recorded steps copied out around it, the progress bar moved, the host held STEPS_IN_FLIGHT behind."""
        waits = _InFlight(self.device)
        for j in range(self.steps_count):
            k = self.recorded_at.get(j)
            if k is not None:
                batch.x_ts[k].copy_(x)
            x, x0_hat = advance(j, x)
            if k is not None:
                batch.x0_hats[k].copy_(x0_hat)
            waits.mark()
            bar.update(1)
        return x


class _InFlight:
    """On a GPU, the host waits for the step STEPS_IN_FLIGHT before the one it just queued (no bubble: the GPU
    always has work queued), so that the progress bar counts finished steps; a no-op on the CPU."""

    def __init__(self, device: torch.device):
        self.events = collections.deque() if device.type == "cuda" else None

    def mark(self) -> None:
        if self.events is None:
            return
        event = torch.cuda.Event()
        event.record()
        self.events.append(event)
        if len(self.events) > STEPS_IN_FLIGHT:
            self.events.popleft().synchronize()


class _GraphedStep:
    """One step of the engine captured in a CUDA graph for one batch size. Its inputs live in static buffers: the
    state x, the sample indices, the flag and the loop position j, which the graph advances itself (i = T' - 1 - j
    is computed on the device), so replaying it steps_count times runs the whole reverse process; a new batch of the
    same size refills the buffers. Warmed up on a side stream first (Triton compiles, cuBLAS / cuDNN choose their
    kernels), as CUDA graph capture requires."""

    WARMUP = 2

    def __init__(self, engine: _Engine, like: torch.Tensor, pool=None):
        self.engine = engine
        size = like.shape[0]
        self.x = torch.empty_like(like)
        self.index = torch.zeros(size, dtype=torch.int64, device=like.device)
        self.bad = torch.full((), -1, dtype=torch.int64, device=like.device)
        self.j = torch.zeros((), dtype=torch.int64, device=like.device)
        self.x0_hat = torch.zeros_like(like) if engine.write_x0 else None
        self.x.copy_(like)
        side = torch.cuda.Stream(like.device)
        side.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self._body()
        torch.cuda.current_stream(like.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=pool):  # replayed in capture order, never at once: safe
                self._body()
        except RuntimeError as error:
            raise RuntimeError(f"the sampling step could not be captured in a CUDA graph ({error}); a model that "
                               "syncs with the host or changes shape per call cannot be; pass cuda_graph=False")

    def _body(self) -> None:
        i = (self.engine.steps_count - 1) - self.j
        x, x0_hat = self.engine.step(self.x, i, self.index, self.bad)
        self.x.copy_(x)
        if self.x0_hat is not None:
            self.x0_hat.copy_(x0_hat)
        self.j.add_(1)

    def run(self, batch: _Batch, bar) -> torch.Tensor:
        self.x.copy_(batch.x)
        self.index.copy_(batch.index)
        self.bad.fill_(-1)
        self.j.zero_()

        def replay(j, x):  # the graph steps its own buffers (self.j counts with j)
            self.graph.replay()
            return self.x, self.x0_hat

        x = self.engine.loop(batch, bar, self.x, replay)
        batch.bad.copy_(self.bad)
        return x


def sample(model, n: int, *, diffusion: Diffusion | None = None, sampler: str = "ddpm", steps: int | None = None,
           eta: float = 0.0, seed: int = 0, batch_size: int | None = None, device=None,
           clip_denoised: bool | None = None, variance: str | None = None, shape=None, progress: bool = True,
           return_intermediates: int = 0, out=None, out_format: str = "png",
           cuda_graph: bool = True, network_dtype: torch.dtype | None = None) -> torch.Tensor | SampleResult:
    """Draw n images from the reverse process of `model`.

    :param model: an nn.Module or any callable (x_t (B, C, H, W) float32, t (B,) int64) -> eps (B, C, H, W).
    :param n: number of images.
    :param diffusion: the process; default: model.diffusion if the model has one, else Diffusion().
    :param sampler: "ddpm" (ancestral) or "ddim" (Song et al., with `eta` in [0, 1]; 0 is deterministic).
    :param steps: None for all T, or k < T respaced steps (docs/design.md), for either sampler.
    :param seed: the Philox key; image i is a function of (seed, i) alone.
    :param batch_size: images per model call (default: min(n, 256), and on a GPU no more than its free memory
        holds; one that does not fit is an error that says what would).
    :param device: where to sample (default: the model's device, else CPU). The state x_t takes the model's layout
        (channels_last if its convolution weights are); the images come back contiguous.
    :param clip_denoised: clip x0_hat to [-1, 1] in every step; None takes the diffusion's setting (True unless it
        says otherwise, as the original code).
    :param variance: override the diffusion's "fixed_large" / "fixed_small".
    :param shape: (C, H, W); default (model.in_channels, model.image_size, model.image_size).
    :param progress: show a progress bar over the steps.
    :param return_intermediates: k > 0: also record x_t and x0_hat at every k-th step (the first and last always)
        and return a SampleResult; its save_grid draws them (the paper's Figure 6).
    :param out: a folder: write the images there as each batch finishes (8-bit, sample_store.py's format), never
        holding all n, and return the folder's path. Started again on the same folder, the run continues: it
        skips what is written and writes the images an uninterrupted run would (the folder's manifest pins the
        batch size; a folder made with other arguments or another model is refused). Under torchrun, rank r of W
        samples batches r, r + W, ... into the same folder (on several nodes: a shared file system).
    :param out_format: "png" (one file per image, named by its index) or "npz" (one shard per batch).
    :param cuda_graph: on a GPU, capture one step (network + reverse update) in a CUDA graph and replay it (ignored
        on the CPU). The model must be capturable: no host syncs, the same work every call.
    :param network_dtype: the network's precision: None = bf16 autocast on a GPU and on a CPU with native bf16
        (AVX512-BF16 or AMX), float32 on other CPUs (precision.default_network_dtype; `ddpm-fast info` says which);
        torch.float32 (full precision), torch.bfloat16 or torch.float16 to choose (autocast; the state and the
        update stay float32).
    :return: float32 (n, C, H, W) in [-1, 1] on `device`, a SampleResult, or (with out=) the folder's Path.
    """
    _check_arguments(model, n, sampler, eta, seed, batch_size, return_intermediates, out, out_format, progress,
                     cuda_graph)
    shape = _resolve_shape(model, shape)
    diffusion = resolve_diffusion(model, diffusion, variance, steps)
    clip_denoised = diffusion.resolve_clip(clip_denoised)
    device = _resolve_device(model, device)
    dtype = precision.network_dtype(network_dtype, device)
    network = precision.autocast(model, device.type, dtype)
    table = diffusion.step_table(device, torch.float32, sampler, eta)  # the step's rows (checks eta)
    recorded = _recorded_steps(diffusion.num_timesteps, return_intermediates) if return_intermediates else []
    if out is not None and batch_size is None:
        batch_size = _sample_store.recorded_batch_size(out)  # a resumed run keeps its aligned batches
    # on a GPU, the device's own current stream: the CUDA graph is captured and replayed there, and the streams,
    # events and Triton launches of the run (which follow the current device) are the model's (cuda:1 too)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device, eval_mode(model):
        # (in eval mode: the memory probe's model calls must not draw dropout; before the run's buffers exist)
        held_images = 0 if out is not None else n * (1 + 2 * len(recorded))  # the output and the recorded steps
        batch_size = _batch_size(network, shape, device, n, batch_size, held_images)
        run = _Run(n, tuple(shape), batch_size, seed, device, _memory_format(model),
                   t_start=int(diffusion.timestep_map[-1]) + 1, steps_count=diffusion.num_timesteps,
                   recorded=len(recorded), progress=progress)
        engine = _Engine(diffusion, network, table, clip_denoised, seed, {j: k for k, j in enumerate(recorded)},
                         device, cuda_graph)
        if out is None:
            images, x_ts, x0_hats = _sample_in_memory(run, engine)
        else:
            store = _sample_store.SampleStore(out, dict(
                n=n, batch_size=batch_size, seed=seed, shape=list(shape), sampler=sampler, eta=eta,
                network_dtype=str(dtype).removeprefix("torch."), model=_sample_store.model_hash(model),
                diffusion=_sample_store.diffusion_hash(diffusion, clip_denoised)), out_format)
            return _sample_to_folder(run, engine, store)
    if not return_intermediates:
        return images
    paper_t = tuple(int(diffusion.timestep_map[run.steps_count - 1 - j]) + 1 for j in recorded)
    return SampleResult(images, paper_t, x_ts, x0_hats)


def _check_arguments(model, n, sampler, eta, seed, batch_size, return_intermediates, out, out_format, progress,
                     cuda_graph) -> None:
    """sample()'s arguments that need nothing resolved first, each with its one sentence."""
    checks.positive_int("n", n)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    checks.non_negative_int("return_intermediates", return_intermediates)
    if out is not None and return_intermediates:
        raise ValueError("return_intermediates keeps every recorded step of every image in memory; it cannot be "
                         "combined with out= (streaming to disk)")
    if sampler == "ddpm" and eta != 0.0:
        raise ValueError("eta applies to sampler='ddim' only")
    if not callable(model):
        raise ValueError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
    for name, value in (("progress", progress), ("cuda_graph", cuda_graph)):
        checks.flag(name, value)
    checks.choice("out_format", out_format, _sample_store.FORMATS)
    checks.seed(seed)
    if batch_size is not None:
        checks.positive_int("batch_size", batch_size)


def _resolve_device(model, device) -> torch.device:
    """device= (checked), else the model's, else the CPU; "cuda" pinned to the current GPU; it must be the model's."""
    weights_on = model_device(model)
    device = checks.device(device) if device is not None else (weights_on or torch.device("cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if weights_on is not None and weights_on != device:
        raise ValueError(f"the model is on {weights_on} but device={device}; move one of them")
    return device


class _Run(NamedTuple):
    """What every batch of one sample() call shares."""
    n: int
    shape: tuple
    batch_size: int
    seed: int
    device: torch.device
    layout: torch.memory_format  # the state's (the model's convolutions')
    t_start: int  # the noise counter of x_T: the original T
    steps_count: int
    recorded: int  # how many steps are recorded
    progress: bool

    @property
    def batches(self) -> int:
        return -(-self.n // self.batch_size)

    def bounds(self, b: int) -> tuple[int, int]:
        return b * self.batch_size, min((b + 1) * self.batch_size, self.n)

    def new_recording(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (K, n, C, H, W) x_t and x0_hat records (K = 0 without return_intermediates)."""
        x_ts = torch.empty(self.recorded, self.n, *self.shape, dtype=torch.float32, device=self.device)
        return x_ts, torch.empty_like(x_ts)

    def first_bad(self) -> torch.Tensor:
        """Per batch, the first step whose output went non-finite (-1: none), kept on the device and read once at
        the end (streaming: before the batch is written)."""
        return torch.full((self.batches,), -1, dtype=torch.int64, device=self.device)

    def reverse(self, engine: _Engine, b: int, first_bad: torch.Tensor, x_ts: torch.Tensor,
                x0_hats: torch.Tensor, bar) -> torch.Tensor:
        """Batch b from its x_T (Philox stream 0 keyed by each image's global index) through every step: x_0."""
        start, stop = self.bounds(b)
        index = torch.arange(start, stop, device=self.device)
        x = philox.randn(index, torch.full_like(index, self.t_start), self.shape, seed=self.seed,
                         stream=philox.STREAM_X_T)
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.layout)
        return engine.run(_Batch(x, index, first_bad[b], x_ts[:, start:stop], x0_hats[:, start:stop]), bar)


def _sample_in_memory(run: _Run, engine: _Engine) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every batch into one (n, C, H, W) tensor, clamped to [-1, 1], and the recorded steps; one host sync at the end
    (the NaN check)."""
    images = torch.empty(run.n, *run.shape, dtype=torch.float32, device=run.device)
    x_ts, x0_hats = run.new_recording()
    first_bad = run.first_bad()
    with tqdm(total=run.batches * run.steps_count, desc="sampling", unit="step", disable=not run.progress) as bar, \
            torch.inference_mode():
        for b in range(run.batches):
            start, stop = run.bounds(b)
            images[start:stop] = run.reverse(engine, b, first_bad, x_ts, x0_hats, bar).clamp(-1.0, 1.0)
    _check_finite(first_bad, engine.diffusion.timestep_map, 0, run.batch_size, run.n)
    return images, x_ts, x0_hats


def _sample_to_folder(run: _Run, engine: _Engine, store) -> Path:
    """This rank's batches (whole, aligned: rank r of W takes r, r + W, ...), less the files already written, each
    checked for NaN and written as it finishes; the folder's path."""
    store.open()
    rank, world = _sample_store.shard()
    assigned = list(range(rank, run.batches, world))
    pending = [(b, missing) for b, missing in ((b, store.missing(b)) for b in assigned) if missing]
    x_ts, x0_hats = run.new_recording()  # (nothing recorded: out= refuses return_intermediates)
    first_bad = run.first_bad()
    with tqdm(total=len(pending) * run.steps_count, desc="sampling", unit="step", disable=not run.progress) as bar, \
            torch.inference_mode(), contextlib.ExitStack() as cleanup:
        cleanup.callback(store.close)  # an error or Ctrl-C still finishes the batch being written
        images_here = sum(len(range(*run.bounds(b))) for b in assigned)
        written = cleanup.enter_context(tqdm(
            total=images_here, initial=images_here - sum(len(missing) for _, missing in pending), desc="images",
            unit="img", position=1, disable=not run.progress))
        for b, missing in pending:
            x = run.reverse(engine, b, first_bad, x_ts, x0_hats, bar)
            _check_finite(first_bad[b:b + 1], engine.diffusion.timestep_map, b, run.batch_size, run.n)
            store.write(b, to_uint8(x), missing)
            written.update(len(missing))
    return store.path


def _check_finite(first_bad: torch.Tensor, timestep_map: torch.Tensor, first_batch: int, batch_size: int,
                  n: int) -> None:
    """Raise for the first of these batches whose reverse process went non-finite (first_bad[k]: the first step that
    did, as a step of the (respaced) process, or -1); the batches are first_batch, first_batch + 1, ..."""
    for k, code_step in enumerate(first_bad.tolist()):
        if code_step >= 0:
            step = int(timestep_map[code_step])  # of the original schedule
            start = (first_batch + k) * batch_size
            raise FloatingPointError(
                f"sampling produced NaN/inf in the reverse step from t={step} (code index; paper t={step + 1}) "
                f"for images {start}..{min(start + batch_size, n) - 1}; check the model's output at that timestep")
