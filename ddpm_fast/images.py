"""Samples in [-1, 1] -> uint8 images and PNG grids."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) floats in [-1, 1] -> uint8 in [0, 255] (rounded; values outside [-1, 1] are clipped)."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
        raise ValueError(f"images must be a floating (N, C, H, W) tensor, got {getattr(images, 'shape', images)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or inf")
    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] (C = 1 or 3) into one uint8 array (rows, cols, C), nrow per row
    (default: a near-square grid), `padding` black pixels between and around them."""
    pixels = to_uint8(images).cpu()
    n, c, h, w = pixels.shape
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
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, padding: int = 2) -> Path:
    """Write make_grid(images) as a PNG (grey for C = 1), atomically: a crash never leaves half a file."""
    from PIL import Image

    grid = make_grid(images, nrow, padding)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
