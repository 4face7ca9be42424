"""Samples in [-1, 1] -> uint8 images and PNG grids."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ddpm_fast import checks


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) floats in [-1, 1] -> uint8 in [0, 255] (rounded; values outside [-1, 1] are clipped)."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
        raise ValueError(f"images must be a floating (N, C, H, W) tensor, got {getattr(images, 'shape', images)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or inf")
    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


MIN_WIDTH = 64  # pixels per image in a grid by default: an 8x8 digit is a speck at 1:1


def grid_scale(width: int, scale: int | None = None) -> int:
    """The integer upscale of a grid of images `width` pixels wide: `scale`, or by default the smallest that makes
    each image at least MIN_WIDTH pixels wide (1 for images that already are)."""
    if scale is None:
        return max(1, math.ceil(MIN_WIDTH / width))
    checks.positive_int("scale", scale)
    return scale


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int | None = None) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] (C = 1 or 3) into one uint8 array (rows, cols, C), nrow per row
    (default: a near-square grid), `padding` black pixels between and around them; the whole grid then enlarged
    `scale` times by repeating pixels (nearest neighbour: no grey level is invented; default: grid_scale's, each
    image at least 64 pixels wide)."""
    pixels = to_uint8(images).cpu()
    n, c, h, w = pixels.shape
    scale = grid_scale(w, scale)
    if c not in (1, 3):
        raise ValueError(f"a grid needs 1 or 3 channels, got {c}")
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be positive, got {nrow}")
    rows = math.ceil(n / nrow)
    grid = np.zeros((padding + rows * (h + padding), padding + nrow * (w + padding), c), dtype=np.uint8)
    for i in range(n):
        y, x = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[y:y + h, x:x + w] = pixels[i].permute(1, 2, 0).numpy()
    return grid.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, padding: int = 2,
              scale: int | None = None) -> Path:
    """Write make_grid(images, nrow, padding, scale) as a PNG (grey for C = 1), atomically: a crash never leaves
    half a file."""
    from PIL import Image

    grid = make_grid(images, nrow, padding, scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
