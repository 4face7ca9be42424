"""The variational bound over a dataset in bits/dim (the paper's Table 2), the rate-distortion of progressive coding
(Figure 5) and interpolation in the latent space of x_t (Figure 8).

Each runs the model's own Diffusion (its T terms, on the fused ops) with Philox-keyed noise, so a result is a function
of the seed and of each image's index in the dataset, whatever the batch size.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddpm_fast import checks, precision
from ddpm_fast import images as _images
from ddpm_fast.data import load_images, to_model_range
from ddpm_fast.diffusion import Diffusion
from ddpm_fast.ops import philox
from ddpm_fast.sampling import eval_mode, model_device, resolve_diffusion


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
    checks.choice("network_dtype", network_dtype, precision.NETWORK_DTYPES)
    checks.positive_int("batch_size", batch_size)
    checks.optional_positive_int("limit", limit)
    checks.flag("progress", progress)
    diffusion, device = _setup(model, diffusion, device)
    network = precision.autocast(model, device.type, network_dtype)
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
