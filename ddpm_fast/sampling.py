"""Sampling: DDPM ancestral sampling (Algorithm 2 of the paper) or DDIM over a whole run of n images, in batches.
Each step is the model call and one fused reverse-step op (ddpm_fast/ops/diffusion_step.py).

Noise is keyed by the global sample index (DESIGN.md), so the images do not depend on the batch split.
The loop keeps t on the device and checks for NaN/inf with a device-side flag read once per batch.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ddpm_fast.diffusion import Diffusion
from ddpm_fast.ops import philox

SAMPLERS = ("ddpm", "ddim")
DEFAULT_MAX_BATCH = 256


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


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def sample(model, n: int, *, diffusion: Diffusion | None = None, sampler: str = "ddpm", steps: int | None = None,
           eta: float = 0.0, seed: int = 0, batch_size: int | None = None, device=None, clip_denoised: bool = True,
           variance: str | None = None, shape=None, progress: bool = True, return_intermediates: int = 0, out=None,
           cuda_graph: bool = True) -> torch.Tensor:
    """Draw n images from the reverse process of `model`.

    :param model: an nn.Module or any callable (x_t (B, C, H, W) float32, t (B,) int64) -> eps (B, C, H, W).
    :param n: number of images.
    :param diffusion: the process; default: model.diffusion if the model has one, else Diffusion().
    :param sampler: "ddpm" (ancestral) or "ddim" (Song et al., with `eta` in [0, 1]; 0 is deterministic).
    :param steps: None for all T, or k < T respaced steps (DESIGN.md), for either sampler.
    :param seed: the Philox key; image i is a function of (seed, i) alone.
    :param batch_size: images per model call (default: min(n, 256)).
    :param device: where to sample (default: the model's device, else CPU).
    :param clip_denoised: clip x0_hat to [-1, 1] in every step (the original code's default).
    :param variance: override the diffusion's "fixed_large" / "fixed_small".
    :param shape: (C, H, W); default (model.in_channels, model.image_size, model.image_size).
    :param progress: show a progress bar over the steps.
    :param cuda_graph: capture the step in a CUDA graph (ignored on CPU; the graph engine comes with a later issue).
    :return: float32 (n, C, H, W) in [-1, 1] on `device`.
    """
    n = _check_positive_int("n", n)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if return_intermediates:
        raise NotImplementedError("return_intermediates is not implemented yet")
    if out is not None:
        raise NotImplementedError("out= (streaming to disk) is not implemented yet")
    if sampler == "ddpm" and eta != 0.0:
        raise ValueError("eta applies to sampler='ddim' only")
    if not callable(model):
        raise ValueError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
    philox._check_seed(seed)
    batch_size = min(n, DEFAULT_MAX_BATCH) if batch_size is None else _check_positive_int("batch_size", batch_size)
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
    timesteps = torch.arange(steps_count, device=device)
    timestep_map = diffusion._on(device, torch.float32)["timestep_map"]  # the tables copy it there once
    t_start = int(diffusion.timestep_map[-1]) + 1  # the counter of x_T: the original T
    images = torch.empty(n, *shape, dtype=torch.float32, device=device)
    was_training = model.training if isinstance(model, nn.Module) else None
    if was_training:
        model.eval()
    bar = tqdm(total=-(-n // batch_size) * steps_count, desc="sampling", unit="step", disable=not progress)
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                index = torch.arange(start, stop, device=device)
                x = philox.randn(index, torch.full_like(index, t_start), shape, seed=seed, stream=philox.STREAM_X_T)
                first_bad = torch.full((), -1, dtype=torch.int64, device=device)
                for i in reversed(range(steps_count)):
                    t = timesteps[i].expand(stop - start)
                    x, _ = diffusion._reverse_step(model, x, t, table, clip_denoised, seed, index)
                    # remember the first step that went non-finite, without a host sync per step
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(x).all(), timestep_map[i], first_bad)
                    bar.update(1)
                bad = int(first_bad)
                if bad >= 0:
                    raise FloatingPointError(
                        f"sampling produced NaN/inf in the reverse step from t={bad} (code index; paper t={bad + 1}) "
                        f"for images {start}..{stop - 1}; check the model's output at that timestep")
                images[start:stop] = x.clamp(-1.0, 1.0)
    finally:
        bar.close()
        if was_training:
            model.train()
    return images
