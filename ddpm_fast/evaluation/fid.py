"""FID: the Fréchet distance between the FID-Inception pool features of samples and of reference images, with TF's
Inception weights where they are on disk (nothing is downloaded); statistics can be saved and compared later.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm_fast import checks
from ddpm_fast import images as _images
from ddpm_fast.data import load_images
from ddpm_fast.evaluation.frechet import gaussian_frechet
from ddpm_fast.inception import FIDInception


@dataclass
class InceptionStats:
    """What FID compares of an image set: the mean (2048,) and covariance (2048, 2048) of its FID-Inception pool
    features, float64, and how many images they summarise. Saved as pytorch-fid's .npz (mu, sigma), plus count."""
    mu: torch.Tensor
    sigma: torch.Tensor
    count: int

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, mu=self.mu.numpy(), sigma=self.sigma.numpy(), count=self.count)
        return path

    @classmethod
    def load(cls, path) -> "InceptionStats":
        """A .npz with mu (D,) and sigma (D, D): ours, or pytorch-fid's (--save-stats; count unknown: 0)."""
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path} holds no Inception statistics (arrays mu and sigma); it has {list(f)}")
            mu, sigma = torch.from_numpy(f["mu"]).double(), torch.from_numpy(f["sigma"]).double()
            count = int(f["count"]) if "count" in f else 0
        if mu.dim() != 1 or sigma.shape != (len(mu), len(mu)) or not bool(torch.isfinite(sigma).all()):
            raise ValueError(f"{path}: mu must be (D,) and sigma (D, D), finite; got {tuple(mu.shape)}, "
                             f"{tuple(sigma.shape)}")
        return cls(mu, sigma, count)


def _fid_pixels(images) -> torch.Tensor:
    """Images as FID reads them: uint8 RGB (N, 3, H, W). Floats are samples in [-1, 1], quantised as a PNG
    would store them (the paper's FID is of 8-bit images); grey images are repeated to RGB, as PIL's convert."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        images = _images.to_uint8(images)
    else:
        images = load_images(images, progress=False)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"FID reads grey or RGB images, got {images.shape[1]} channels")
    return images


@contextlib.contextmanager
def _no_tf32():
    """cuDNN's convolutions in full float32: its default on Ampere and later is TF32 (10-bit mantissas)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def inception_stats(images, *, weights=None, batch_size: int = 50, device=None,
                    progress: bool = True) -> InceptionStats:
    """The FID statistics of `images`: samples (float in [-1, 1]), uint8 images, or a path load_images reads.

    :param weights: the FID Inception's weight file (see inception.find_weights), or an FIDInception.
    :param device: default: CUDA if there is one. Convolutions run in float32 (TF32 off: the numbers are TF's).
    """
    checks.positive_int("batch_size", batch_size)
    pixels = _fid_pixels(images)
    if len(pixels) < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {len(pixels)}")
    network = weights if isinstance(weights, FIDInception) else FIDInception.from_file(weights)
    device = checks.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    network = network.to(device)
    features = []
    bar = tqdm(total=len(pixels), desc="inception", unit="img", disable=not progress)
    with torch.no_grad(), _no_tf32(), bar:
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start:start + batch_size].to(device)
            features.append(network(batch.float() / 255).double().cpu())
            bar.update(len(batch))
    features = torch.cat(features)
    if not bool(torch.isfinite(features).all()):
        raise ValueError("the Inception features are not finite: are these the FID Inception's weights?")
    return InceptionStats(features.mean(0), torch.cov(features.T), len(features))


def fid(samples, reference, *, weights=None, batch_size: int = 50, device=None, progress: bool = True) -> float:
    """The Fréchet Inception Distance (Heusel et al. 2017) between two image sets, as the DDPM paper reports it:
    TF's FID Inception (weights from disk only), 8-bit images resized bilinearly to 299x299, pool features.

    :param samples, reference: InceptionStats, a path to saved statistics (.npz with mu and sigma), or images
        (anything inception_stats takes). The paper's protocol is 50,000 samples against the training set; fewer
        images give a larger (biased) FID, so numbers compare only at equal counts.
    """
    given = [_saved_stats(side) for side in (samples, reference)]
    if any(g is None for g in given):  # read the weights once for both sides
        weights = weights if isinstance(weights, FIDInception) else FIDInception.from_file(weights)
    a, b = (g or inception_stats(side, weights=weights, batch_size=batch_size, device=device, progress=progress)
            for g, side in zip(given, (samples, reference)))
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"the two statistics have different feature sizes: {len(a.mu)} and {len(b.mu)}")
    return gaussian_frechet(a.mu, a.sigma, b.mu, b.sigma)


def _saved_stats(side) -> InceptionStats | None:
    """`side` as statistics when it is some (an InceptionStats, or an .npz holding mu), else None: images."""
    if isinstance(side, InceptionStats):
        return side
    if isinstance(side, (str, os.PathLike)) and Path(side).suffix == ".npz" and Path(side).is_file():
        with np.load(side) as f:
            if "mu" in f:
                return InceptionStats.load(side)
    return None
