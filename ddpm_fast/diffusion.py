"""The DDPM math (Ho et al. 2020) in the code's indices t = 0..T-1 (paper t - 1); docs/design.md fixes the conventions.

Tables are float64 once (schedule.py), copied to each device once as float32 (float64 for float64 inputs), and
gathered there by t: no host copy per call. The forward noising, L_simple and the reverse step run as fused ops
(ddpm_fast/ops/diffusion_step.py) that read one table row per sample; the rest (the posterior, the bound) is eager.
Public methods validate their arguments (which may sync the host); the sampler calls the unchecked `reverse_step`.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from ddpm_fast import checks
from ddpm_fast import schedule as _schedule
from ddpm_fast.ops import diffusion_step, philox

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NLLResult(NamedTuple):
    """The variational bound in bits/dim. total, prior: (B,); terms, mse: (B, T) in code indices
    (terms[:, 0] = L_0, the decoder NLL; terms[:, t] = L_t, the KL of the reverse step from x_t); total = prior + sum."""
    total: torch.Tensor
    prior: torch.Tensor
    terms: torch.Tensor
    mse: torch.Tensor


class PMeanVariance(NamedTuple):
    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor


class PSample(NamedTuple):
    sample: torch.Tensor
    pred_x0: torch.Tensor


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that the original code uses for L_0."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of 8-bit data scaled to [-1, 1] under N(means, exp(log_scales)^2) integrated over each bin of
    width 2/255, the edge bins at -1 and +1 extended to -inf / +inf. Elementwise, in nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


OBJECTIVES = ("simple", "vlb")


class Diffusion:
    """The forward process q, the reverse process p, the training loss and the variational bound.

    :param schedule: "linear" (the paper's, 1e-4..0.02) or "cosine".
    :param timesteps: T.
    :param variance: the reverse-process variance, "fixed_large" (sigma^2 = beta) or "fixed_small" (beta tilde).
    :param betas: explicit betas (float, (T,)) instead of a named schedule.
    :param clip_denoised: clip x0_hat to [-1, 1] in the reverse process (the original code's default); the default
        of every method's and sample()'s clip_denoised=None.
    """

    def __init__(self, schedule: str = "linear", timesteps: int = 1000, variance: str = "fixed_large", *,
                 betas: torch.Tensor | None = None, timestep_map: torch.Tensor | None = None,
                 clip_denoised: bool = True):
        if not isinstance(clip_denoised, bool):
            raise ValueError(f"clip_denoised must be a bool, got {clip_denoised!r}")
        self.clip_denoised = clip_denoised
        if betas is None:
            betas = _schedule.beta_schedule(schedule, timesteps)
        else:
            betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
            schedule = "custom"
        self.schedule = schedule
        self.variance = variance
        self.tables = _schedule.coefficient_tables(betas, variance)
        self.num_timesteps = len(betas)
        # the model's timestep for each of our indices: identity, or the kept original steps after respacing
        self.timestep_map = (torch.arange(self.num_timesteps) if timestep_map is None
                             else torch.as_tensor(timestep_map, dtype=torch.int64).cpu())
        if self.timestep_map.shape != (self.num_timesteps,):
            raise ValueError(f"timestep_map must have shape ({self.num_timesteps},)")
        self._device_tables: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}
        self._step_tables: dict[tuple, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"Diffusion(schedule={self.schedule!r}, timesteps={self.num_timesteps}, "
                f"variance={self.variance!r}" + ("" if self.clip_denoised else ", clip_denoised=False") + ")")

    def with_variance(self, variance: str) -> "Diffusion":
        """The same process with another reverse-process variance."""
        if variance == self.variance:
            return self
        return self._derived(self.tables["betas"], self.timestep_map, variance)

    def respace(self, steps: int) -> "Diffusion":
        """The process on `steps` of the T timesteps (docs/design.md: linspace(0, T-1, steps).round()), betas recomputed
        from abar at the kept steps; the model still sees the original timesteps."""
        kept = _schedule.respaced_timesteps(self.num_timesteps, steps)
        if len(kept) == self.num_timesteps:
            return self
        betas = _schedule.respaced_betas(self.tables["alphas_cumprod"], kept)
        return self._derived(betas, self.timestep_map[kept], self.variance)

    def _derived(self, betas, timestep_map, variance) -> "Diffusion":
        derived = Diffusion(variance=variance, betas=betas, timestep_map=timestep_map,
                            clip_denoised=self.clip_denoised)
        derived.schedule = self.schedule  # the name of the schedule it came from, not "custom"
        return derived

    # ------------------------------------------------------------------------------------------------ plumbing
    def resolve_clip(self, clip_denoised: bool | None) -> bool:
        """A clip_denoised argument as a bool: None takes this process's setting (what every method and sample()
        does with their clip_denoised=None)."""
        if clip_denoised is None:
            return self.clip_denoised
        if not isinstance(clip_denoised, bool):
            raise ValueError(f"clip_denoised must be a bool or None, got {clip_denoised!r}")
        return clip_denoised

    def tables_on(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The coefficient tables (self.tables, plus "q_sample" rows and "timestep_map") on `device` in float32
        (float64 for float64 inputs), copied there once and cached: a name -> (T, ...) tensor dict to index by t."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (device, dtype)
        if key not in self._device_tables:
            tables = {name: value.to(device=device, dtype=dtype) for name, value in self.tables.items()}
            tables["q_sample"] = _schedule.q_sample_table(self.tables).to(device=device, dtype=dtype)
            tables["timestep_map"] = self.timestep_map.to(device)
            self._device_tables[key] = tables
        return self._device_tables[key]

    def step_table(self, device, dtype: torch.dtype = torch.float32, sampler: str = "ddpm",
                   eta: float = 0.0) -> torch.Tensor:
        """The (T, 5) rows of the fused reverse step for `sampler` ("ddpm" with this process's variance, or "ddim"
        with `eta`) on `device` in `dtype` (float32 or float64), built in float64 once per key."""
        device = torch.device(device)
        key = (device, dtype, sampler, float(eta) if sampler == "ddim" else 0.0)
        if key not in self._step_tables:
            table = _schedule.reverse_step_table(self.tables, sampler, eta)
            self._step_tables[key] = table.to(device=device, dtype=dtype)
        return self._step_tables[key]

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] shaped to broadcast against x: (B, 1, 1, ...)."""
        return diffusion_step.per_sample(self.tables_on(x.device, x.dtype)[name][t], x)

    def _original_t(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The original timestep of each index t (the model's input and the noise counter), gathered on x's device."""
        return self.tables_on(x.device, x.dtype)["timestep_map"][t]

    def _check_x(self, name: str, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise ValueError(f"{name} must be a floating tensor of shape (B, ...), got {checks.describe(x)}")
        return x

    def _check_t(self, t, x: torch.Tensor) -> torch.Tensor:
        """t as an int64 (B,) tensor on x's device, every value in [0, T)."""
        batch = x.shape[0]
        if isinstance(t, int) and not isinstance(t, bool):
            t = torch.full((batch,), t, dtype=torch.int64, device=x.device)
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.dim() > 1:
            raise ValueError(f"t must be an int or an int64 tensor of shape ({batch},), got {checks.describe(t)}")
        if t.device != x.device:
            raise ValueError(f"t is on {t.device} but the data is on {x.device}")
        t = t.to(torch.int64).expand(batch) if t.dim() == 0 else t.to(torch.int64)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},) to match the batch, got {tuple(t.shape)}")
        if bool(((t < 0) | (t >= self.num_timesteps)).any()):
            raise ValueError(f"t out of range: every t must be in [0, {self.num_timesteps}), "
                             f"got values in [{int(t.min())}, {int(t.max())}]")
        return t

    def _check_like(self, name: str, value, x: torch.Tensor, x_name: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.shape != x.shape or value.dtype != x.dtype \
                or value.device != x.device:
            raise ValueError(f"{name} must match {x_name} ({checks.describe(x)}), got {checks.describe(value)}")
        return value

    def _sample_index(self, sample_index, x: torch.Tensor) -> torch.Tensor:
        if sample_index is None:
            return torch.arange(x.shape[0], device=x.device)
        if not isinstance(sample_index, torch.Tensor) or sample_index.shape != (x.shape[0],) \
                or sample_index.dtype != torch.int64 or sample_index.device != x.device:
            raise ValueError(f"sample_index must be an int64 tensor of shape ({x.shape[0]},) on {x.device}, "
                             f"got {checks.describe(sample_index)}")
        return sample_index

    def _noised(self, x0, t, noise, seed, step, sample_index) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, eps) for training: the given eps (checked against x0), or eps drawn inside the fused noising from
        Philox stream 2 keyed by (seed, sample_index, step)."""
        if noise is None:
            index = self._sample_index(sample_index, x0)
            return diffusion_step.q_sample_philox(x0, t, self.tables_on(x0.device, x0.dtype)["q_sample"], index,
                                                  torch.full_like(index, step), seed=seed,
                                                  stream=philox.STREAM_TRAIN_EPS)
        noise = self._check_like("noise", noise, x0, "x0")
        return self._q_sample(x0, t, noise), noise

    def _model_eps(self, model: Model, x_t: torch.Tensor, original_t: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t): the model gets the original timestep (see _original_t), and must return x_t's shape
        (in any float dtype: the fused ops read bf16 as well)."""
        eps = model(x_t, original_t)
        if not isinstance(eps, torch.Tensor) or eps.shape != x_t.shape:
            raise ValueError(f"the model must return eps with the shape of x_t {tuple(x_t.shape)}, got "
                             f"{checks.describe(eps)}")
        if eps.device != x_t.device:
            raise ValueError(f"the model returned a tensor on {eps.device} for x_t on {x_t.device}")
        return eps

    # ------------------------------------------------------------------------------------------------ q
    def q_mean_variance(self, x0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log variance of q(x_t | x0)."""
        x0 = self._check_x("x0", x0)
        t = self._check_t(t, x0)
        return (self._extract("sqrt_alphas_cumprod", t, x0) * x0,
                (1.0 - self._extract("alphas_cumprod", t, x0)).expand_as(x0),
                self._extract("log_one_minus_alphas_cumprod", t, x0).expand_as(x0))

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor | None = None, *, seed: int = 0, step: int = 0,
                 sample_index: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, a draw of q(x_t | x0), in one fused pass.

        :param x0: (B, ...) data in [-1, 1]. :param t: int or (B,) int64 code timesteps.
        :param noise: eps, x0's shape and dtype; None draws it from Philox stream 2 keyed by (seed, sample_index, step).
        :return: x_t in float32 (float64 for float64 x0).
        """
        x0 = self._check_x("x0", x0)
        t = self._check_t(t, x0)
        return self._noised(x0, t, noise, seed, step, sample_index)[0]

    def _q_sample(self, x0, t, noise):
        return diffusion_step.q_sample(x0, t, self.tables_on(x0.device, x0.dtype)["q_sample"], noise)

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t):
        """Mean, variance and clipped log variance of the forward posterior q(x_{t-1} | x_t, x0)."""
        x0 = self._check_x("x0", x0)
        x_t = self._check_like("x_t", x_t, x0, "x0")
        return self._q_posterior(x0, x_t, self._check_t(t, x0))

    def _q_posterior(self, x0, x_t, t):
        mean = self._extract("posterior_mean_coef1", t, x_t) * x0 + self._extract("posterior_mean_coef2", t, x_t) * x_t
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_x0_from_eps(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        x_t = self._check_x("x_t", x_t)
        return self._predict_x0(x_t, self._check_t(t, x_t), self._check_like("eps", eps, x_t, "x_t"))

    def _predict_x0(self, x_t, t, eps):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    # ------------------------------------------------------------------------------------------------ p
    def p_mean_variance(self, model: Model, x_t: torch.Tensor, t,
                        clip_denoised: bool | None = None) -> PMeanVariance:
        """Mean, variance, log variance of p(x_{t-1} | x_t) and x0_hat; the mean is the posterior mean at x0_hat
        (clipped to [-1, 1] if clip_denoised), as the original code."""
        x_t = self._check_x("x_t", x_t)
        return self._p_mean_variance(model, x_t, self._check_t(t, x_t), self.resolve_clip(clip_denoised))

    def _p_mean_variance(self, model, x_t, t, clip_denoised):
        pred_x0 = self._predict_x0(x_t, t, self._model_eps(model, x_t, self._original_t(t, x_t)).to(x_t.dtype))
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self._q_posterior(pred_x0, x_t, t)
        variance = self._extract("model_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("model_log_variance", t, x_t).expand_as(x_t)
        return PMeanVariance(mean, variance, log_variance, pred_x0)

    def p_sample(self, model: Model, x_t: torch.Tensor, t, *, clip_denoised: bool | None = None,
                 noise: torch.Tensor | None = None, seed: int = 0,
                 sample_index: torch.Tensor | None = None) -> PSample:
        """One reverse step x_t -> x_{t-1} = mean + sigma_t z, without noise where t == 0.

        :param noise: z, x_t's shape; None draws it inside the fused step from Philox stream 1 keyed by
            (seed, sample_index, original timestep). With an explicit z the step is computed eagerly.
        :return: PSample(x_{t-1}, x0_hat), float32 (float64 for float64 x_t).
        """
        x_t = self._check_x("x_t", x_t)
        t = self._check_t(t, x_t)
        index = self._sample_index(sample_index, x_t)
        if noise is not None:
            noise = self._check_like("noise", noise, x_t, "x_t")
        return self._p_sample(model, x_t, t, self.resolve_clip(clip_denoised), seed, index, noise)

    def _p_sample(self, model, x_t, t, clip_denoised, seed, sample_index, noise=None) -> PSample:
        if x_t.dtype not in (torch.float32, torch.float64):
            x_t = x_t.float()  # the state of the reverse process is float32
        if noise is None:
            table = self.step_table(x_t.device, x_t.dtype, "ddpm")
            return PSample(*self.reverse_step(model, x_t, t, table, clip_denoised, seed, sample_index, True))
        out = self._p_mean_variance(model, x_t, t, clip_denoised)
        nonzero = diffusion_step.per_sample((t != 0).to(x_t.dtype), x_t)
        return PSample(out.mean + nonzero * torch.exp(0.5 * out.log_variance) * noise.to(x_t.dtype), out.pred_x0)

    def reverse_step(self, model, x_t, t, table, clip_denoised, seed, sample_index, write_x0=False,
                     nonfinite_t=None):
        """(x_{t-1}, x0_hat or None): the model's eps, then the fused step with the rows `table` (step_table) and
        z from Philox stream 1 keyed by (seed, sample_index, original timestep); nonfinite_t (0-d int64) raised to
        the code step t where x_{t-1} is not finite.

        Unchecked, for loops that validated their arguments once (the sampler's): x_t float32 or float64 (B, ...),
        t int64 (B,) on x_t's device, sample_index int64 (B,), clip_denoised a bool (resolve_clip). p_sample is the
        checked form."""
        original_t = self._original_t(t, x_t)
        eps = self._model_eps(model, x_t, original_t)
        return diffusion_step.reverse_step(x_t, eps, t, table, sample_index, original_t, seed=seed,
                                           clip=clip_denoised, write_x0=write_x0, nonfinite_t=nonfinite_t)

    # ------------------------------------------------------------------------------------------------ training
    def training_loss(self, model: Model, x0: torch.Tensor, t, noise: torch.Tensor | None = None, *,
                      reduction: str = "mean", seed: int = 0, step: int = 0,
                      sample_index: torch.Tensor | None = None, objective: str = "simple") -> torch.Tensor:
        """The training loss at (x0, t), with eps drawn inside the fused noising (or given as `noise`).

        :param objective: "simple": L_simple = ||eps - eps_theta(x_t, t)||^2 averaged over each sample's dimensions
            (the fused loss kernel); "vlb": the paper's true bound L with these fixed variances, estimated at t:
            T x (its term at t, bits/dim; KL for t > 0, the decoder NLL at t = 0), x0_hat not clipped. Either's mean
            over uniform t is what training minimises (L_T has no parameters).
        :param reduction: "mean" (a scalar over the batch) or "none" (per sample, (B,)).
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        x0 = self._check_x("x0", x0)
        t = self._check_t(t, x0)
        x_t, eps = self._noised(x0, t, noise, seed, step, sample_index)
        if objective == "simple":
            losses = diffusion_step.simple_loss(self._model_eps(model, x_t, self._original_t(t, x0)), eps)
        else:
            losses = self.num_timesteps * self._vb_terms_bpd(model, x0, x_t, t, False)[0]
        return losses.mean() if reduction == "mean" else losses

    # ------------------------------------------------------------------------------------------------ the bound
    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x0) || N(0, I)) in bits/dim, (B,)."""
        x0 = self._check_x("x0", x0)
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.int64, device=x0.device)
        mean = self._extract("sqrt_alphas_cumprod", t, x0) * x0
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x0)
        kl = normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))
        return mean_flat(kl) / math.log(2.0)

    def vb_terms_bpd(self, model: Model, x0: torch.Tensor, x_t: torch.Tensor, t, clip_denoised: bool | None = None):
        """The bound's term at t, bits/dim (B,): KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0 and the decoder
        NLL -log p(x0 | x_1) for t = 0; also x0_hat."""
        x0 = self._check_x("x0", x0)
        x_t = self._check_like("x_t", x_t, x0, "x0")
        return self._vb_terms_bpd(model, x0, x_t, self._check_t(t, x0), self.resolve_clip(clip_denoised))

    def _vb_terms_bpd(self, model, x0, x_t, t, clip_denoised):
        true_mean, _, true_log_variance = self._q_posterior(x0, x_t, t)
        out = self._p_mean_variance(model, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, means=out.mean, log_scales=0.5 * out.log_variance)) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl), out.pred_x0

    @torch.no_grad()
    def nll_bpd(self, model: Model, x0: torch.Tensor, *, clip_denoised: bool | None = None, seed: int = 0,
                sample_index: torch.Tensor | None = None, progress: bool = False) -> NLLResult:
        """The variational bound of x0 in bits/dim, every one of the T terms (T model calls), as the original
        code's calc_bpd_loop: x_t = q_sample(x0, t) with eps from Philox stream 6 keyed by (seed, sample_index, t).

        :param x0: (B, C, H, W) 8-bit data scaled to [-1, 1].
        """
        x0 = self._check_x("x0", x0)
        clip_denoised = self.resolve_clip(clip_denoised)
        index = self._sample_index(sample_index, x0)
        batch, steps = x0.shape[0], self.num_timesteps
        terms = x0.new_empty(batch, steps)
        mse = x0.new_empty(batch, steps)
        timesteps = torch.arange(steps, device=x0.device)
        for i in tqdm(range(steps - 1, -1, -1), desc="bound", disable=not progress, leave=False):
            t = timesteps[i].expand(batch)
            x_t, _ = diffusion_step.q_sample_philox(x0, t, self.tables_on(x0.device, x0.dtype)["q_sample"], index,
                                                    self._original_t(t, x0), seed=seed,
                                                    stream=philox.STREAM_EVAL_EPS)
            terms[:, i], pred_x0 = self._vb_terms_bpd(model, x0, x_t, t, clip_denoised)
            mse[:, i] = mean_flat((pred_x0 - x0) ** 2)
        prior = self.prior_bpd(x0)
        return NLLResult(prior + terms.sum(1), prior, terms, mse)
