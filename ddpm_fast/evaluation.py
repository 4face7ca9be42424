"""The paper's evaluations: the variational bound over a dataset in bits/dim (Table 2), the rate-distortion of
progressive coding (Figure 5), interpolation in the latent space of x_t (Figure 8), and sample quality: FID from
TF's Inception where its weights are on disk, and a small classifier's metrics that need no download.

The first three run the model's own Diffusion (its T terms, on the fused ops) with Philox-keyed noise, so a result is
a function of the seed and of each image's index in the dataset, whatever the batch size.
"""
from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm_fast import images as _images
from ddpm_fast.data import load_images, to_model_range
from ddpm_fast.diffusion import Diffusion
from ddpm_fast.inception import FIDInception
from ddpm_fast.ops import philox
from ddpm_fast import checks
from ddpm_fast.sampling import Autocast, model_device, resolve_diffusion, eval_mode


@dataclass
class NLLReport:
    """The bound over a dataset, bits/dim. Means over the images: `bpd` = `prior` + `terms_sum` + `decoder`.

    :param prior: L_T. :param terms_sum: the sum of L_{t-1} over t = 2..T (the paper's counting; code t = 1..T-1).
    :param decoder: L_0, the discretised decoder's NLL. :param per_image: each image's total (N,).
    :param terms: each term's mean over the images (T,), code order (terms[0] = L_0).
    :param mse: the mean squared error of x0_hat at each t (T,), on the [-1, 1] scale.
    """
    bpd: float
    prior: float
    terms_sum: float
    decoder: float
    per_image: torch.Tensor
    terms: torch.Tensor
    mse: torch.Tensor

    def __str__(self) -> str:
        return (f"NLL <= {self.bpd:.4f} bits/dim over {len(self.per_image)} images (L_T {self.prior:.4f}, "
                f"sum of L_(t-1) {self.terms_sum:.4f}, L_0 {self.decoder:.4f})")


def _setup(model, diffusion, device):
    """The process (as sample(): the argument, else the model's, else Diffusion()) and the device (the argument, else
    the model's, else the CPU)."""
    device = checks.device(device) if device is not None else (model_device(model) or torch.device("cpu"))
    return resolve_diffusion(model, diffusion, None, None), device


def nll(model, data, *, diffusion: Diffusion | None = None, batch_size: int = 64, seed: int = 0, device=None,
        limit: int | None = None, progress: bool = True, network_dtype: torch.dtype = torch.float32) -> NLLReport:
    """The variational bound of every image of `data`, all T terms (T model calls per batch), in bits/dim.

    :param data: uint8 images or a path (as ddpm_fast.train reads them: data.load_images).
    :param limit: the first `limit` images only. :param seed: the key of q(x_t | x0)'s noise (Philox stream 6,
        keyed by the image's index in the dataset and t), as Diffusion.nll_bpd.
    :param network_dtype: float32 (the default: the bound in full precision), or bfloat16 / float16 to run the
        network under autocast as sample() does (the README's precision check compares the two).
    """
    if network_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"network_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {network_dtype!r}")
    checks.positive_int("batch_size", batch_size)
    checks.optional_positive_int("limit", limit)
    checks.flag("progress", progress)
    diffusion, device = _setup(model, diffusion, device)
    network = model if network_dtype == torch.float32 else Autocast(model, device.type, network_dtype)
    images = load_images(data, progress=progress)
    checks.image_shape(model, tuple(images.shape[1:]), "the data's images")
    if limit is not None:
        images = images[:limit]
    totals, priors, terms, mse = [], [], [], []
    with eval_mode(model), tqdm(total=len(images) * diffusion.num_timesteps, desc="bound", unit="term",
                                disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            x0 = to_model_range(images[start:start + batch_size].to(device))
            index = torch.arange(start, start + len(x0), device=device)
            result = diffusion.nll_bpd(network, x0, seed=seed, sample_index=index)
            totals.append(result.total.cpu())
            priors.append(result.prior.cpu())
            terms.append(result.terms.cpu())
            mse.append(result.mse.cpu())
            bar.update(len(x0) * diffusion.num_timesteps)
    terms_all = torch.cat(terms)
    return NLLReport(bpd=torch.cat(totals).mean().item(), prior=torch.cat(priors).mean().item(),
                     terms_sum=terms_all[:, 1:].sum(1).mean().item(), decoder=terms_all[:, 0].mean().item(),
                     per_image=torch.cat(totals), terms=terms_all.mean(0), mse=torch.cat(mse).mean(0))


@dataclass
class RateDistortion:
    """Progressive lossy coding (the paper's Figure 5, Algorithms 3-4), per code timestep t (T,): the receiver holds
    x_t, having been sent x_{T-1} (cost: the prior term L_T) and then each x_{s-1} given x_s for s = T-1 .. t+1
    (cost: the KL term of that step, terms[s]). rate[t] = the prior + terms[t+1:].sum() (bits/dim); distortion[t] =
    the RMSE of x0_hat computed from x_t, on the [0, 255] scale. The lossless end adds terms[1] and L_0."""
    t: torch.Tensor
    rate: torch.Tensor
    distortion: torch.Tensor
    report: NLLReport

    def save_csv(self, path) -> Path:
        path = Path(path)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["t", "rate_bits_per_dim", "distortion_rmse_0_255"])
            for t, r, d in zip(self.t.tolist(), self.rate.tolist(), self.distortion.tolist()):
                writer.writerow([t, f"{r:.6f}", f"{d:.6f}"])
        return path

    def save_plot(self, path) -> Path:
        """Three panels as the paper's Figure 5: distortion vs t, rate vs t, distortion vs rate."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as error:  # a dependency in pyproject; say so if someone removed it
            raise ImportError("the rate-distortion plot needs matplotlib: pip install matplotlib") from error
        figure, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        t = self.t.numpy() + 1  # the paper counts t = 1..T
        for axis, (x, y, xlabel, ylabel) in zip(axes, [
                (t, self.distortion.numpy(), "reverse process steps (T - t)", "distortion (RMSE [0, 255])"),
                (t, self.rate.numpy(), "reverse process steps (T - t)", "rate (bits/dim)"),
                (self.rate.numpy(), self.distortion.numpy(), "rate (bits/dim)", "distortion (RMSE [0, 255])")]):
            axis.plot(x, y)
            axis.set_xlabel(xlabel)
            axis.set_ylabel(ylabel)
            axis.grid(alpha=0.3)
        for axis in axes[:2]:
            axis.invert_xaxis()  # the reverse process runs from t = T to 0, left to right
        figure.suptitle(f"progressive coding: {self.report}", fontsize=8)
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path


def rate_distortion(model, data, *, out=None, **kwargs) -> RateDistortion:
    """The rate-distortion curve of progressive coding over `data` (nll()'s arguments); with out=FOLDER also
    rate_distortion.csv and rate_distortion.png there."""
    report = nll(model, data, **kwargs)
    steps = len(report.terms)
    # received from the top: the prior, then the terms of the steps from x_{T-1} down to x_{t+1} (not t's own)
    from_top = torch.flip(torch.cumsum(torch.flip(report.terms, [0]), 0), [0])
    rate = report.prior + from_top - report.terms
    result = RateDistortion(t=torch.arange(steps), rate=rate, distortion=report.mse.sqrt() * 127.5, report=report)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result.save_csv(out / "rate_distortion.csv")
        result.save_plot(out / "rate_distortion.png")
    return result


def interpolate(model, x0: torch.Tensor, x0_prime: torch.Tensor, *, t: int = 500,
                lambdas=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), diffusion: Diffusion | None = None,
                seed: int = 0, out=None, progress: bool = True) -> torch.Tensor:
    """The paper's interpolation: x_t = q(x_t | x0) and x_t' = q(x_t' | x0') under the same noise, the latent
    (1 - lambda) x_t + lambda x_t' decoded by the reverse process from t to 0, each lambda with the same noise.

    :param x0, x0_prime: (P, C, H, W) pairs in [-1, 1]. :param t: the code timestep of the latent (0..T-1).
    :param out: a PNG path: one row per pair: x0, the decodings for each lambda, x0'.
    :return: (P, len(lambdas), C, H, W) float32 in [-1, 1].
    """
    diffusion, device = _setup(model, diffusion, None)
    for name, value in (("x0", x0), ("x0_prime", x0_prime)):
        if not isinstance(value, torch.Tensor) or value.dim() != 4 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float tensor (P, C, H, W) in [-1, 1]")
    if x0.shape != x0_prime.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and x0_prime {tuple(x0_prime.shape)} must have one shape")
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < diffusion.num_timesteps:
        raise ValueError(f"t must be an int in [0, {diffusion.num_timesteps}), got {t!r}")
    lambdas = torch.as_tensor(lambdas, dtype=torch.float32)
    if lambdas.dim() != 1 or len(lambdas) == 0:
        raise ValueError("lambdas must be a non-empty sequence of numbers")
    pairs, count = x0.shape[0], len(lambdas)
    x0, x0_prime = x0.to(device, torch.float32), x0_prime.to(device, torch.float32)
    pair = torch.arange(pairs, device=device)
    eps = philox.randn(pair, torch.full_like(pair, t), x0.shape[1:], seed=seed, stream=philox.STREAM_EVAL_EPS)
    x_t = diffusion.q_sample(x0, torch.full_like(pair, t), eps)
    x_t_prime = diffusion.q_sample(x0_prime, torch.full_like(pair, t), eps)
    lam = lambdas.to(device)[None, :, None, None, None]
    x = ((1 - lam) * x_t[:, None] + lam * x_t_prime[:, None]).reshape(pairs * count, *x0.shape[1:])
    index = pair.repeat_interleave(count)  # the pair's index: every lambda decodes with the same noise
    with eval_mode(model), torch.inference_mode():
        for step in tqdm(range(t, -1, -1), desc="decoding", unit="step", disable=not progress, leave=False):
            x = diffusion.p_sample(model, x, step, seed=seed, sample_index=index).sample
    decoded = x.clamp(-1, 1).reshape(pairs, count, *x0.shape[1:])
    if out is not None:
        rows = torch.cat([x0[:, None], decoded, x0_prime[:, None]], dim=1)
        _images.save_grid(rows.reshape(-1, *x0.shape[1:]).cpu(), out, nrow=count + 2)
    return decoded


# ---------------------------------------------------------------------------------------------- sample quality

class FeatureClassifier(torch.nn.Module):
    """A small CNN for the sample-quality metrics: two conv stages, global pooling, a 64-d feature layer (the space
    of the Fréchet distance) and a linear classifier."""

    def __init__(self, channels: int, classes: int, width: int = 32, features: int = 64):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.GroupNorm(8, width), torch.nn.SiLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.GroupNorm(8, 2 * width), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2 * width, features), torch.nn.SiLU())
        self.head = torch.nn.Linear(features, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(images, labels, *, epochs: int = 30, batch_size: int = 64, seed: int = 0,
                     progress: bool = True) -> FeatureClassifier:
    """FeatureClassifier trained on uint8 `images` (N, C, H, W) and integer `labels` (N,) (Adam 1e-3, seeded)."""
    images = load_images(images, progress=False)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.shape != (len(images),) or labels.min() < 0:
        raise ValueError(f"labels must be {len(images)} non-negative ints, one per image, got {tuple(labels.shape)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classifier = FeatureClassifier(images.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    x_all = to_model_range(images)
    for _ in tqdm(range(epochs), desc="classifier", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), batch_size):
            index = order[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(classifier(x_all[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return classifier.eval()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between the Gaussians of two feature sets (N, D), in float64."""
    a, b = a.double(), b.double()
    return _frechet(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def _frechet(mu_a, s_a, mu_b, s_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64; the trace of the matrix square root as the
    sum of sqrt(eigenvalues) of S_a^(1/2) S_b S_a^(1/2) (symmetric, PSD: no complex parts as with sqrtm)."""
    mu_a, s_a, mu_b, s_b = (v.double() for v in (mu_a, s_a, mu_b, s_b))
    values, vectors = torch.linalg.eigh(s_a)
    root_a = vectors @ torch.diag(_significant(values).sqrt()) @ vectors.T
    middle = _significant(torch.linalg.eigvalsh(root_a @ s_b @ root_a)).sqrt().sum()
    return ((mu_a - mu_b) ** 2).sum().item() + (torch.trace(s_a) + torch.trace(s_b) - 2 * middle).item()


@dataclass
class QualityReport:
    """Sample quality in a small classifier's terms (not FID: its network is ours, trained on the data).

    :param confident: the share of samples whose top class probability exceeds the threshold.
    :param histogram: samples per predicted class. :param frechet: the Fréchet distance between the samples'
        features (the classifier's 64-d layer) and those of the odd held-out images.
    :param real_confident: the confident share of the held-out images. :param real_frechet: the distance of the
        even held-out images to the odd ones: the floor a perfect sampler would reach with that many samples (with
        more samples its small-sample bias is a little smaller).
    """
    confident: float
    histogram: list
    frechet: float
    real_confident: float
    real_frechet: float

    def __str__(self) -> str:
        return (f"confidently classified {self.confident:.1%} (real {self.real_confident:.1%}); classifier-feature "
                f"Fréchet distance {self.frechet:.3f} (real vs real {self.real_frechet:.3f}); classes "
                f"{self.histogram}")


def sample_quality(samples: torch.Tensor, held_out, classifier: FeatureClassifier, *,
                   threshold: float = 0.9) -> QualityReport:
    """Rate `samples` (float in [-1, 1], (N, C, H, W)) with `classifier` (train_classifier on the training data)
    against `held_out` real images (uint8, or a path), which the classifier has not seen."""
    real = to_model_range(load_images(held_out, progress=False))
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or samples.shape[1:] != real.shape[1:]:
        raise ValueError(f"samples must be a float tensor (N, {', '.join(map(str, real.shape[1:]))}) like the "
                         f"real images, got {getattr(samples, 'shape', type(samples).__name__)}")
    if len(real) < 4 or len(samples) < 2:
        raise ValueError("need at least 4 held-out images and 2 samples")
    with torch.no_grad():
        probs = torch.softmax(classifier(samples.float().cpu()), 1)
        real_probs = torch.softmax(classifier(real), 1)
        features, real_features = classifier.features(samples.float().cpu()), classifier.features(real)
    # the reference is the odd held-out images; the floor, the even ones against it (interleaved: a data set
    # stored in class order would otherwise compare two different mixes of classes)
    reference = real_features[1::2]
    histogram = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).tolist()
    return QualityReport(confident=(probs.max(1).values > threshold).float().mean().item(), histogram=histogram,
                         frechet=frechet_distance(features, reference),
                         real_confident=(real_probs.max(1).values > threshold).float().mean().item(),
                         real_frechet=frechet_distance(real_features[0::2], reference))


def _significant(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues with rounding noise set to 0 (below D eps |max|, numpy's rank cut-off): with fewer images than
    features the covariance is singular, and the square roots of ~1e-15 noise summed over 2048 eigenvalues would
    add ~1e-4 to the distance."""
    cutoff = values.abs().max() * len(values) * torch.finfo(values.dtype).eps
    return torch.where(values > cutoff, values, torch.zeros_like(values))


# ---------------------------------------------------------------------------------------------- FID

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
    return _frechet(a.mu, a.sigma, b.mu, b.sigma)


def _saved_stats(side) -> InceptionStats | None:
    """`side` as statistics when it is some (an InceptionStats, or an .npz holding mu), else None: images."""
    if isinstance(side, InceptionStats):
        return side
    if isinstance(side, (str, os.PathLike)) and Path(side).suffix == ".npz" and Path(side).is_file():
        with np.load(side) as f:
            if "mu" in f:
                return InceptionStats.load(side)
    return None
