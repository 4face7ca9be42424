"""Beta schedules and the coefficient tables of DDPM, computed once in float64 (code indices t = 0..T-1)."""
from __future__ import annotations

import math

import torch

from ddpm_fast import checks

SCHEDULES = ("linear", "cosine")
VARIANCES = ("fixed_large", "fixed_small")


def beta_schedule(name: str, timesteps: int) -> torch.Tensor:
    """The betas of a named schedule, float64 (T,).

    linear: the paper's 1e-4 .. 0.02 (as the original code: not rescaled for T != 1000).
    cosine: Nichol & Dhariwal 2021, abar(t) = cos((t/T + s)/(1 + s) * pi/2)^2 with s = 0.008, betas capped at 0.999.
    """
    checks.positive_int("timesteps", timesteps)
    if name == "linear":
        return torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=0.999)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def coefficient_tables(betas: torch.Tensor, variance: str) -> dict[str, torch.Tensor]:
    """Every per-timestep coefficient the math needs, float64 (T,), named as in the original code.

    At code t = 0 the posterior variance is 0, so, as the original code, its clipped log uses index 1's value, and
    "fixed_large" uses append(posterior_variance[1], betas[1:]) for both the variance and its log.
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    betas = betas.to(torch.float64)
    if betas.dim() != 1 or len(betas) < 1 or not bool(((betas > 0) & (betas < 1)).all()):
        # (a beta of 1 makes abar 0 from there on: infinite sqrt(1 / abar) and posterior tables)
        raise ValueError("betas must be a non-empty 1-D tensor with values in (0, 1), got "
                         + (f"{betas.min().item():g} .. {betas.max().item():g}" if betas.numel() else "none"))
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, 0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # index 0 borrows index 1 (log 0 is -inf); with T = 1 there is no index 1 and beta_0 stands in
    first = posterior_variance[1:2] if len(betas) > 1 else betas[:1]
    posterior_log_variance_clipped = torch.log(torch.cat([first, posterior_variance[1:]]))
    if variance == "fixed_large":
        model_variance = torch.cat([first, betas[1:]])
        model_log_variance = torch.log(model_variance)
    else:
        model_variance = posterior_variance
        model_log_variance = posterior_log_variance_clipped
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": torch.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / alphas_cumprod - 1.0),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        "posterior_mean_coef1": betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod),
        "model_variance": model_variance,
        "model_log_variance": model_log_variance,
    }


def respaced_betas(alphas_cumprod: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Betas of the process restricted to the kept timesteps (improved-diffusion's respacing):
    beta'_i = 1 - abar[kept_i] / abar[kept_{i-1}], with abar before the first kept step = 1."""
    abar = alphas_cumprod[kept]
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return 1.0 - abar / prev


def respaced_timesteps(timesteps: int, steps: int) -> torch.Tensor:
    """The kept timesteps for `steps` < T, int64: linspace(0, T-1, steps).round() (unique; 0 and T-1 among them)
    for steps >= 2, and T-1 alone for steps = 1: the one step then starts from x_T at x_T's noise level (t = 0
    alone, what linspace gives, would read the noise x_T as a nearly clean image and return it clipped)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be an int in [1, {timesteps}], got {steps!r}")
    if steps == 1:
        return torch.tensor([timesteps - 1], dtype=torch.int64)
    kept = torch.linspace(0, timesteps - 1, steps, dtype=torch.float64).round().long()
    return torch.unique(kept)


def q_sample_table(tables: dict[str, torch.Tensor]) -> torch.Tensor:
    """(T, 2) float64 rows (sqrt(abar_t), sqrt(1 - abar_t)) for the fused forward noising."""
    return torch.stack([tables["sqrt_alphas_cumprod"], tables["sqrt_one_minus_alphas_cumprod"]], dim=1)


def reverse_step_table(tables: dict[str, torch.Tensor], sampler: str, eta: float = 0.0) -> torch.Tensor:
    """(T, 5) float64 rows (a, b, c_x0, c_xt, sigma) of the fused reverse step: x0_hat = a x_t - b eps,
    x_{t-1} = c_x0 x0_hat + c_xt x_t + sigma z (no noise at t = 0).

    "ddpm": the posterior mean at x0_hat (Ho et al. eq. 7) and sigma = exp(log variance / 2) of the model variance.
    "ddim": Song et al. eq. 12 with eps re-derived from the (clipped) x0_hat as improved-diffusion does,
    eps' = (a x_t - x0_hat) / b, x_{t-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps' + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev); collected on x0_hat and x_t.
    """
    a, b = tables["sqrt_recip_alphas_cumprod"], tables["sqrt_recipm1_alphas_cumprod"]
    if sampler == "ddpm":
        columns = [tables["posterior_mean_coef1"], tables["posterior_mean_coef2"],
                   torch.exp(0.5 * tables["model_log_variance"])]
    elif sampler == "ddim":
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        abar, abar_prev = tables["alphas_cumprod"], tables["alphas_cumprod_prev"]
        sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar)) * torch.sqrt(1.0 - abar / abar_prev)
        coef_eps = torch.sqrt((1.0 - abar_prev - sigma ** 2).clamp(min=0.0))
        columns = [torch.sqrt(abar_prev) - coef_eps / b, coef_eps * a / b, sigma]
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'")
    return torch.stack([a, b, *columns], dim=1)
