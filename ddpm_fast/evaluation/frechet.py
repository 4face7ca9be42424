"""The Fréchet distance between two Gaussians, as FID and the classifier metric (quality.py) both use it."""
from __future__ import annotations

import torch


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between the Gaussians of two feature sets (N, D), in float64."""
    a, b = a.double(), b.double()
    return gaussian_frechet(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def gaussian_frechet(mu_a, s_a, mu_b, s_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64; the trace of the matrix square root as the
    sum of sqrt(eigenvalues) of S_a^(1/2) S_b S_a^(1/2) (symmetric, PSD: no complex parts as with sqrtm)."""
    mu_a, s_a, mu_b, s_b = (v.double() for v in (mu_a, s_a, mu_b, s_b))
    values, vectors = torch.linalg.eigh(s_a)
    root_a = vectors @ torch.diag(_significant(values).sqrt()) @ vectors.T
    middle = _significant(torch.linalg.eigvalsh(root_a @ s_b @ root_a)).sqrt().sum()
    return ((mu_a - mu_b) ** 2).sum().item() + (torch.trace(s_a) + torch.trace(s_b) - 2 * middle).item()


def _significant(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues with rounding noise set to 0 (below D eps |max|, numpy's rank cut-off): with fewer images than
    features the covariance is singular, and the square roots of ~1e-15 noise summed over 2048 eigenvalues would
    add ~1e-4 to the distance."""
    cutoff = values.abs().max() * len(values) * torch.finfo(values.dtype).eps
    return torch.where(values > cutoff, values, torch.zeros_like(values))
