"""Every formula of schedule.py / diffusion.py against a direct float64 computation written independently here."""
import math

import pytest
import torch

from ddpm_fast import Diffusion, NLLResult
from ddpm_fast.diffusion import discretized_gaussian_log_likelihood, normal_kl
from ddpm_fast.ops import philox
from ddpm_fast.schedule import beta_schedule, respaced_timesteps

T = 1000


def direct_tables(betas):
    """The tables by explicit Python loops in float64, the paper's formulas, nothing shared with schedule.py."""
    b = [float(x) for x in betas]
    abar, prod = [], 1.0
    for beta in b:
        prod *= 1.0 - beta
        abar.append(prod)
    abar_prev = [1.0] + abar[:-1]
    beta_tilde = [(1 - abar_prev[i]) / (1 - abar[i]) * b[i] for i in range(len(b))]
    return b, abar, abar_prev, beta_tilde


@pytest.fixture(scope="module")
def diffusion():
    return Diffusion()


def data(shape=(4, 3, 5, 6), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)


def test_linear_schedule_is_the_papers():
    betas = beta_schedule("linear", T)
    assert betas.dtype == torch.float64 and len(betas) == T
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15) and betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(betas.diff(), torch.full((T - 1,), (0.02 - 1e-4) / (T - 1), dtype=torch.float64))


def test_cosine_schedule():
    betas = beta_schedule("cosine", 50)
    f = [math.cos((t / 50 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(51)]
    expected = [min(1 - f[t + 1] / f[t], 0.999) for t in range(50)]
    assert torch.allclose(betas, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_tables_against_the_formulas(variance):
    d = Diffusion(variance=variance)
    b, abar, abar_prev, beta_tilde = direct_tables(d.tables["betas"])
    tab = {k: v.tolist() for k, v in d.tables.items()}
    for t in [0, 1, 2, 499, 998, 999]:
        assert tab["alphas_cumprod"][t] == pytest.approx(abar[t], rel=1e-12)
        assert tab["posterior_variance"][t] == pytest.approx(beta_tilde[t], rel=1e-12, abs=1e-300)
        assert tab["posterior_mean_coef1"][t] == pytest.approx(math.sqrt(abar_prev[t]) * b[t] / (1 - abar[t]), rel=1e-12)
        assert tab["posterior_mean_coef2"][t] == pytest.approx(
            math.sqrt(1 - b[t]) * (1 - abar_prev[t]) / (1 - abar[t]), rel=1e-12)
    # index 0 of the log variances borrows index 1 (docs/design.md); fixed_large is beta elsewhere
    assert tab["posterior_log_variance_clipped"][0] == pytest.approx(math.log(beta_tilde[1]), rel=1e-12)
    assert tab["posterior_variance"][0] == 0.0
    if variance == "fixed_large":
        assert tab["model_variance"][0] == pytest.approx(beta_tilde[1], rel=1e-12)
        assert tab["model_variance"][1:] == pytest.approx(b[1:], rel=1e-12)
        assert tab["model_log_variance"][500] == pytest.approx(math.log(b[500]), rel=1e-12)
    else:
        assert tab["model_variance"][1:] == pytest.approx(beta_tilde[1:], rel=1e-12)
        assert tab["model_log_variance"][0] == pytest.approx(math.log(beta_tilde[1]), rel=1e-12)


def test_tables_live_on_the_device_once(diffusion):
    x = data(dtype=torch.float32)
    first = diffusion.tables_on(x.device, x.dtype)
    assert first["betas"].dtype == torch.float32 and diffusion.tables_on(x.device, x.dtype) is first
    assert diffusion.tables_on(x.device, torch.float64)["betas"].dtype == torch.float64


def test_q_sample_and_its_inverse(diffusion):
    x0, eps = data(), data(seed=1)
    t = torch.tensor([0, 1, 500, 999])
    _, abar, _, _ = direct_tables(diffusion.tables["betas"])
    x_t = diffusion.q_sample(x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        expected = math.sqrt(abar[ti]) * x0[i] + math.sqrt(1 - abar[ti]) * eps[i]
        assert torch.allclose(x_t[i], expected, rtol=1e-12, atol=1e-14)
    assert torch.allclose(diffusion.predict_x0_from_eps(x_t, t, eps), x0, rtol=0, atol=1e-10)
    mean, var, logvar = diffusion.q_mean_variance(x0, t)
    assert torch.allclose(var[2], torch.full_like(var[2], 1 - abar[500]))
    assert torch.allclose(logvar.exp(), var)


def test_q_sample_draws_training_noise_from_philox_stream_2(diffusion):
    x0, t = data(dtype=torch.float32), torch.tensor([3, 30, 300, 900])
    index = torch.tensor([10, 11, 12, 13])
    eps = philox.randn(index, torch.full((4,), 7), x0.shape[1:], seed=5, stream=philox.STREAM_TRAIN_EPS)
    assert torch.equal(diffusion.q_sample(x0, t, seed=5, step=7, sample_index=index), diffusion.q_sample(x0, t, eps))


def test_posterior_is_the_gaussian_conditional(diffusion):
    """q(x_{t-1} | x_t, x0) by conditioning the joint Gaussian of (x_{t-1}, x_t) given x0, not by the paper's form."""
    x0, x_t = data(), data(seed=1)
    t = torch.tensor([1, 2, 400, 999])
    _, abar, abar_prev, _ = direct_tables(diffusion.tables["betas"])
    mean, var, logvar = diffusion.q_posterior_mean_variance(x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        alpha = abar[ti] / abar_prev[ti]
        var_prev = 1 - abar_prev[ti]  # Var(x_{t-1} | x0)
        cov = math.sqrt(alpha) * var_prev  # Cov(x_{t-1}, x_t | x0)
        var_t = 1 - abar[ti]  # Var(x_t | x0)
        m = math.sqrt(abar_prev[ti]) * x0[i] + cov / var_t * (x_t[i] - math.sqrt(abar[ti]) * x0[i])
        assert torch.allclose(mean[i], m, rtol=1e-10, atol=1e-12)
        assert var[i].flatten()[0].item() == pytest.approx(var_prev - cov ** 2 / var_t, rel=1e-10)
        assert logvar[i].flatten()[0].item() == pytest.approx(math.log(var_prev - cov ** 2 / var_t), rel=1e-10)


class OracleModel:
    """Returns a fixed eps and records the timesteps it was called with."""

    def __init__(self, eps):
        self.eps, self.calls = eps, []

    def __call__(self, x, t):
        self.calls.append(t.clone())
        return self.eps[: x.shape[0]]


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_p_mean_variance(clip, variance):
    d = Diffusion(variance=variance)
    x_t, eps = data() * 3, data(seed=2)
    t = torch.tensor([0, 5, 500, 999])
    model = OracleModel(eps)
    out = d.p_mean_variance(model, x_t, t, clip_denoised=clip)
    assert torch.equal(model.calls[0], t)
    b, abar, abar_prev, beta_tilde = direct_tables(d.tables["betas"])
    for i, ti in enumerate(t.tolist()):
        x0 = (x_t[i] - math.sqrt(1 - abar[ti]) * eps[i]) / math.sqrt(abar[ti])
        if clip:
            x0 = x0.clamp(-1, 1)
        assert torch.allclose(out.pred_x0[i], x0, atol=1e-10)
        if not clip and ti > 0:  # unclipped, the posterior mean at x0_hat is the paper's eps form
            paper = (x_t[i] - b[ti] / math.sqrt(1 - abar[ti]) * eps[i]) / math.sqrt(1 - b[ti])
            assert torch.allclose(out.mean[i], paper, atol=1e-10)
        expected_var = (b[ti] if variance == "fixed_large" else beta_tilde[ti]) if ti > 0 else beta_tilde[1]
        # as the original code: fixed_small keeps variance 0 at t = 0, only its log is clipped to index 1's
        variance_at_0 = 0.0 if variance == "fixed_small" and ti == 0 else expected_var
        assert out.variance[i].flatten()[0].item() == pytest.approx(variance_at_0, rel=1e-12)
        assert out.log_variance[i].flatten()[0].item() == pytest.approx(math.log(expected_var), rel=1e-12)


def test_p_sample_adds_sigma_z_except_at_t0(diffusion):
    x_t, eps, z = data(), data(seed=2), data(seed=3)
    t = torch.tensor([0, 1, 500, 999])
    model = OracleModel(eps)
    step = diffusion.p_sample(model, x_t, t, noise=z)
    out = diffusion.p_mean_variance(model, x_t, t)
    assert torch.equal(step.sample[0], out.mean[0])
    for i in range(1, 4):
        assert torch.allclose(step.sample[i], out.mean[i] + out.variance[i].sqrt() * z[i], atol=1e-12)
    # without explicit noise: Philox stream 1, step = the timestep
    index = torch.tensor([4, 5, 6, 7])
    drawn = philox.randn(index, t, x_t.shape[1:], seed=9, stream=philox.STREAM_REVERSE).double()
    assert torch.equal(diffusion.p_sample(model, x_t, t, seed=9, sample_index=index).sample,
                       diffusion.p_sample(model, x_t, t, noise=drawn).sample)


def test_training_loss(diffusion):
    x0, eps, pred = data(), data(seed=2), data(seed=3)
    t = torch.tensor([0, 10, 100, 999])
    seen = {}

    def model(x_t, tt):
        seen["x_t"], seen["t"] = x_t, tt
        return pred

    per_sample = diffusion.training_loss(model, x0, t, eps, reduction="none")
    assert torch.allclose(per_sample, ((eps - pred) ** 2).mean(dim=(1, 2, 3)), rtol=1e-14)
    assert torch.allclose(seen["x_t"], diffusion.q_sample(x0, t, eps)) and torch.equal(seen["t"], t)
    assert diffusion.training_loss(model, x0, t, eps).item() == pytest.approx(per_sample.mean().item())
    with pytest.raises(ValueError, match="reduction"):
        diffusion.training_loss(model, x0, t, eps, reduction="sum")
    # the paper's true bound L as the objective: T x its term at t (unclipped x0_hat), L_T having no parameters
    vlb = diffusion.training_loss(model, x0, t, eps, reduction="none", objective="vlb")
    terms, _ = diffusion.vb_terms_bpd(model, x0, diffusion.q_sample(x0, t, eps), t, clip_denoised=False)
    assert torch.allclose(vlb, diffusion.num_timesteps * terms, rtol=1e-12)
    with pytest.raises(ValueError, match="objective must be one of simple, vlb"):
        diffusion.training_loss(model, x0, t, eps, objective="l1")


def test_normal_kl_is_the_closed_form():
    m1, m2 = data(), data(seed=1)
    lv1, lv2 = data(seed=2), data(seed=3)
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q), rtol=1e-12)


def test_discretized_gaussian_sums_to_one_over_the_256_bins():
    bins = (torch.arange(256, dtype=torch.float64) / 127.5 - 1.0)[:, None]
    for mean, log_scale in [(0.0, -3.0), (0.7, -5.0), (-1.0, -1.0), (0.99, -6.0)]:
        logp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # an interior bin: the tanh-approximated CDF difference, written out
    x, mean, log_scale = (torch.tensor([v], dtype=torch.float64) for v in (0.2 * 2 - 1 + 1 / 127.5, -0.5, -1.2))

    def cdf(v):
        return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))

    s = math.exp(-log_scale.item())
    expected = math.log(cdf(s * (x.item() - mean.item() + 1 / 255)) - cdf(s * (x.item() - mean.item() - 1 / 255)))
    assert discretized_gaussian_log_likelihood(x, mean, log_scale).item() == pytest.approx(expected, rel=1e-10)


def test_prior_bpd(diffusion):
    x0 = data()
    abar = diffusion.tables["alphas_cumprod"][-1].item()
    kl = 0.5 * (-1 - math.log(1 - abar) + (1 - abar) + abar * x0 ** 2)
    assert torch.allclose(diffusion.prior_bpd(x0), kl.mean(dim=(1, 2, 3)) / math.log(2), rtol=1e-10)


def test_nll_bpd_adds_up_its_terms():
    d = Diffusion(timesteps=8)
    x0 = (torch.randint(0, 256, (3, 1, 4, 4)).double() / 127.5 - 1)
    eps_fn = OracleModel(data((3, 1, 4, 4), seed=4) * 0.1)
    result = d.nll_bpd(eps_fn, x0, seed=3)
    assert isinstance(result, NLLResult)
    assert result.terms.shape == (3, 8) and result.mse.shape == (3, 8) and result.total.shape == (3,)
    assert torch.allclose(result.total, result.prior + result.terms.sum(1))
    assert torch.allclose(result.prior, d.prior_bpd(x0))
    assert (result.terms[:, 1:] >= 0).all() and (result.terms[:, 0] > 0).all()
    # each term is the bound's term at q_sample(x0, t) with Philox stream 6 noise keyed by t
    for t in [0, 3, 7]:
        tt = torch.full((3,), t)
        eps = philox.randn(torch.arange(3), tt, x0.shape[1:], seed=3, stream=philox.STREAM_EVAL_EPS).double()
        term, pred_x0 = d.vb_terms_bpd(eps_fn, x0, d.q_sample(x0, tt, eps), tt)
        assert torch.allclose(result.terms[:, t], term)
        assert torch.allclose(result.mse[:, t], ((pred_x0 - x0) ** 2).mean(dim=(1, 2, 3)))


def test_the_process_carries_its_clipping():
    """Diffusion(clip_denoised=False) (a diffusers scheduler's clip_sample=False): every method's clip_denoised=None
    and sample()'s take it; respacing and another variance keep it; an explicit argument still wins."""
    x_t, eps, z = data() * 3, data(seed=2), data(seed=3)
    t = torch.tensor([0, 5, 500, 999])
    model = OracleModel(eps)
    free = Diffusion(clip_denoised=False)
    assert "clip_denoised=False" in repr(free) and Diffusion().clip_denoised is True
    assert free.respace(10).clip_denoised is False and free.with_variance("fixed_small").clip_denoised is False
    unclipped = Diffusion().p_sample(model, x_t, t, noise=z, clip_denoised=False)
    assert torch.equal(free.p_sample(model, x_t, t, noise=z).sample, unclipped.sample)
    assert unclipped.pred_x0.abs().max() > 1  # so clipping would have changed it
    assert torch.equal(free.p_sample(model, x_t, t, noise=z, clip_denoised=True).sample,
                       Diffusion().p_sample(model, x_t, t, noise=z).sample)
    x0 = data(seed=4).clamp(-1, 1)
    assert torch.equal(free.vb_terms_bpd(model, x0, x_t, t)[0],
                       Diffusion().vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)[0])
    with pytest.raises(ValueError, match="clip_denoised must be a bool"):
        Diffusion(clip_denoised=1)


def test_respacing():
    d = Diffusion()
    kept = respaced_timesteps(1000, 10)
    assert kept.tolist() == torch.linspace(0, 999, 10).round().long().tolist() and kept[0] == 0 and kept[-1] == 999
    r = d.respace(10)
    assert r.num_timesteps == 10 and torch.equal(r.timestep_map, kept) and r.schedule == "linear"
    assert torch.allclose(r.tables["alphas_cumprod"], d.tables["alphas_cumprod"][kept], rtol=1e-12)
    assert r.tables["alphas_cumprod_prev"][0] == 1.0
    assert d.respace(1000) is d
    model = OracleModel(data((2, 1, 2, 2)))
    r.p_sample(model, data((2, 1, 2, 2)), torch.tensor([9, 1]))
    assert model.calls[0].tolist() == [999, kept[1].item()]  # the model sees the original timesteps
    with pytest.raises(ValueError, match="steps"):
        d.respace(0)
    with pytest.raises(ValueError, match="steps"):
        d.respace(1001)


def test_bad_input_names_the_argument(diffusion):
    x0 = data(dtype=torch.float32)
    model = OracleModel(data(dtype=torch.float32))
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'"):
        Diffusion(schedule="quadratic")
    with pytest.raises(ValueError, match="unknown variance 'learned'"):
        Diffusion(variance="learned")
    with pytest.raises(ValueError, match="timesteps"):
        Diffusion(timesteps=0)
    with pytest.raises(ValueError, match=r"t out of range.*\[0, 1000\)"):
        diffusion.q_sample(x0, torch.tensor([0, 1, 2, 1000]))
    with pytest.raises(ValueError, match="t out of range"):
        diffusion.p_sample(model, x0, -1)
    with pytest.raises(ValueError, match="t must"):
        diffusion.q_sample(x0, torch.tensor([0.5, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="t must have shape"):
        diffusion.q_sample(x0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t is on meta"):
        diffusion.q_sample(x0, torch.zeros(4, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="noise must match x0"):
        diffusion.q_sample(x0, 3, torch.randn(4, 3, 5, 5))
    with pytest.raises(ValueError, match="noise must match x0"):
        diffusion.q_sample(x0, 3, torch.randn(4, 3, 5, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="x0 must be a floating tensor"):
        diffusion.q_sample(torch.ones(4, 3, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="x_t must match x0"):
        diffusion.q_posterior_mean_variance(x0, x0.double(), 3)
    with pytest.raises(ValueError, match="model must return eps with the shape of x_t"):
        diffusion.p_sample(lambda x, t: x[:, :1], x0, 3)
