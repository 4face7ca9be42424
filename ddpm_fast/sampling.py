"""Sampling: DDPM ancestral sampling (Algorithm 2 of the paper) or DDIM over a whole run of n images, in batches.
Each step is the model call and one fused reverse-step op (ddpm_fast/ops/diffusion_step.py).

Noise is keyed by the global sample index (DESIGN.md), so the images do not depend on the batch split.
The loop keeps t on the device and checks for NaN/inf with a device-side flag per batch, read once at the end.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ddpm_fast import memory
from ddpm_fast.diffusion import Diffusion
from ddpm_fast.images import save_grid
from ddpm_fast.ops import philox

SAMPLERS = ("ddpm", "ddim")
DEFAULT_MAX_BATCH = 256  # larger batches gain little throughput and delay the first images
# Devices where the batch size is checked against free memory (a probe of two model calls): a GPU's memory is the
# limit there; a CPU's RAM rarely is, and the probe's calls would show in a plain callable's side effects.
PROBED_DEVICES = ("cuda",)
MEMORY_HEADROOM = 0.8  # of the free memory: the allocator's rounding and fragmentation, and other users


class SampleResult(NamedTuple):
    """sample(..., return_intermediates=k): the images and the reverse process every k steps (the paper's Figure 6:
    x0_hat, the model's prediction of x0, sharpens as t falls)."""
    images: torch.Tensor           # (n, C, H, W) in [-1, 1], as sample() returns without intermediates
    timesteps: tuple[int, ...]     # the paper's t (1..T, of the original schedule) of each recorded step, falling
    x_t: torch.Tensor              # (K, n, C, H, W): the state entering each recorded step
    x0_hat: torch.Tensor           # (K, n, C, H, W): the prediction of x0 at that step (clipped if clip_denoised)

    def save_grid(self, path: str | os.PathLike, which: str = "x0_hat", max_images: int = 8) -> Path:
        """A PNG with one row per image (the first max_images) and one column per recorded step, t falling from left
        to right, then the final image; `which` is "x0_hat" or "x_t" (values outside [-1, 1] are clipped)."""
        if which not in ("x0_hat", "x_t"):
            raise ValueError(f"which must be 'x0_hat' or 'x_t', got {which!r}")
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"max_images must be a positive int, got {max_images!r}")
        steps = getattr(self, which)[:, :max_images].clamp(-1, 1)  # (K, m, C, H, W)
        final = self.images[:max_images].unsqueeze(0)
        rows = torch.cat([steps, final]).transpose(0, 1)  # (m, K + 1, C, H, W): image after image
        return save_grid(rows.reshape(-1, *rows.shape[2:]), path, nrow=rows.shape[1])


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


def _model_device(model) -> torch.device | None:
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return None


def _resolve_shape(model, shape) -> tuple[int, ...]:
    if shape is None:
        if not (hasattr(model, "in_channels") and hasattr(model, "image_size")):
            raise ValueError("cannot tell the image shape: pass shape=(C, H, W), or a model with in_channels and "
                             "image_size attributes")
        shape = (model.in_channels, model.image_size, model.image_size)
    if not isinstance(shape, (tuple, list)) or not shape or \
            any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be a tuple of positive ints like (C, H, W), got {shape!r}")
    return tuple(shape)


def _resolve_diffusion(model, diffusion, variance, steps) -> Diffusion:
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


def _batch_size(model, shape, device, n: int, asked: int | None, recorded: int) -> int:
    """The batch size: `asked`, or min(n, DEFAULT_MAX_BATCH, what fits) (what fits: on PROBED_DEVICES). An asked
    batch that does not fit, or no batch at all, is an error that says what would fit and why."""
    want = min(n, DEFAULT_MAX_BATCH) if asked is None else asked
    if device.type not in PROBED_DEVICES:
        return want
    fits, words = _batch_that_fits(model, shape, device, n * (1 + 2 * recorded))
    if fits is None:
        return want
    if fits < 1:
        raise MemoryError(f"not even one image fits: {words}")
    if asked is not None and asked > fits:
        raise ValueError(f"batch_size={asked} does not fit: {words}; batch_size={fits} would (or leave it to the "
                         "default)")
    return min(want, fits)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def sample(model, n: int, *, diffusion: Diffusion | None = None, sampler: str = "ddpm", steps: int | None = None,
           eta: float = 0.0, seed: int = 0, batch_size: int | None = None, device=None, clip_denoised: bool = True,
           variance: str | None = None, shape=None, progress: bool = True, return_intermediates: int = 0, out=None,
           cuda_graph: bool = True) -> torch.Tensor | SampleResult:
    """Draw n images from the reverse process of `model`.

    :param model: an nn.Module or any callable (x_t (B, C, H, W) float32, t (B,) int64) -> eps (B, C, H, W).
    :param n: number of images.
    :param diffusion: the process; default: model.diffusion if the model has one, else Diffusion().
    :param sampler: "ddpm" (ancestral) or "ddim" (Song et al., with `eta` in [0, 1]; 0 is deterministic).
    :param steps: None for all T, or k < T respaced steps (DESIGN.md), for either sampler.
    :param seed: the Philox key; image i is a function of (seed, i) alone.
    :param batch_size: images per model call (default: min(n, 256), and on a GPU no more than its free memory
        holds; one that does not fit is an error that says what would).
    :param device: where to sample (default: the model's device, else CPU).
    :param clip_denoised: clip x0_hat to [-1, 1] in every step (the original code's default).
    :param variance: override the diffusion's "fixed_large" / "fixed_small".
    :param shape: (C, H, W); default (model.in_channels, model.image_size, model.image_size).
    :param progress: show a progress bar over the steps.
    :param cuda_graph: capture the step in a CUDA graph (ignored on CPU; the graph engine comes with a later issue).
    :param return_intermediates: k > 0: also record x_t and x0_hat at every k-th step (the first and last always)
        and return a SampleResult; its save_grid draws them (the paper's Figure 6).
    :return: float32 (n, C, H, W) in [-1, 1] on `device`, or a SampleResult.
    """
    n = _check_positive_int("n", n)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(return_intermediates, bool) or not isinstance(return_intermediates, int) \
            or return_intermediates < 0:
        raise ValueError(f"return_intermediates must be an int >= 0 (0: none), got {return_intermediates!r}")
    if out is not None:
        raise NotImplementedError("out= (streaming to disk) is not implemented yet")
    if sampler == "ddpm" and eta != 0.0:
        raise ValueError("eta applies to sampler='ddim' only")
    if not callable(model):
        raise ValueError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
    philox._check_seed(seed)
    if batch_size is not None:
        _check_positive_int("batch_size", batch_size)
    shape = _resolve_shape(model, shape)
    diffusion = _resolve_diffusion(model, diffusion, variance, steps)

    model_device = _model_device(model)
    device = torch.device(device) if device is not None else (model_device or torch.device("cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if model_device is not None and model_device != device:
        raise ValueError(f"the model is on {model_device} but device={device}; move one of them")

    table = diffusion.step_table(device, torch.float32, sampler, eta)  # the step's rows (checks eta)
    steps_count = diffusion.num_timesteps
    recorded = _recorded_steps(steps_count, return_intermediates) if return_intermediates else []
    timesteps = torch.arange(steps_count, device=device)
    timestep_map = diffusion._on(device, torch.float32)["timestep_map"]  # the tables copy it there once
    t_start = int(diffusion.timestep_map[-1]) + 1  # the counter of x_T: the original T
    was_training = model.training if isinstance(model, nn.Module) else None
    if was_training:
        model.eval()
    try:
        # (in eval mode: the memory probe's model calls must not draw dropout; before the run's buffers exist)
        batch_size = _batch_size(model, shape, device, n, batch_size, len(recorded))
        images = torch.empty(n, *shape, dtype=torch.float32, device=device)
        slot = {j: k for k, j in enumerate(recorded)}  # loop position -> index in the recorded tensors
        x_ts = torch.empty(len(recorded), n, *shape, dtype=torch.float32, device=device)
        x0_hats = torch.empty_like(x_ts)
        batches = -(-n // batch_size)
        # per batch, the first step whose output went non-finite (-1: none), kept on the device: read once at the end
        first_bad = torch.full((batches,), -1, dtype=torch.int64, device=device)
        with tqdm(total=batches * steps_count, desc="sampling", unit="step",
                  disable=not progress) as bar, torch.inference_mode():
            for b, start in enumerate(range(0, n, batch_size)):
                stop = min(start + batch_size, n)
                index = torch.arange(start, stop, device=device)
                x = philox.randn(index, torch.full_like(index, t_start), shape, seed=seed, stream=philox.STREAM_X_T)
                bad = first_bad[b]
                for j, i in enumerate(reversed(range(steps_count))):
                    t = timesteps[i].expand(stop - start)
                    k = slot.get(j)
                    if k is not None:
                        x_ts[k, start:stop] = x
                    x, x0_hat = diffusion._reverse_step(model, x, t, table, clip_denoised, seed, index,
                                                        write_x0=k is not None)
                    if k is not None:
                        x0_hats[k, start:stop] = x0_hat
                    # remember the first step that went non-finite, without a host sync
                    bad.copy_(torch.where((bad < 0) & ~torch.isfinite(x).all(), timestep_map[i], bad))
                    bar.update(1)
                images[start:stop] = x.clamp(-1.0, 1.0)
        for b, step in enumerate(first_bad.tolist()):  # the one sync of the run
            if step >= 0:
                start, stop = b * batch_size, min((b + 1) * batch_size, n)
                raise FloatingPointError(
                    f"sampling produced NaN/inf in the reverse step from t={step} (code index; paper t={step + 1}) "
                    f"for images {start}..{stop - 1}; check the model's output at that timestep")
    finally:
        if was_training:
            model.train()
    if not return_intermediates:
        return images
    paper_t = tuple(int(diffusion.timestep_map[steps_count - 1 - j]) + 1 for j in recorded)
    return SampleResult(images, paper_t, x_ts, x0_hats)
