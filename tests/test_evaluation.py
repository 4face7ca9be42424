"""The paper's evaluations: the bound over a dataset (against a closed form for Gaussian-like data and its exact
linear eps-model, and against the data's true entropy), rate-distortion, interpolation."""
import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_fast
from ddpm_fast import Diffusion, UNet
from ddpm_fast.ops import philox
from helpers import random_tiny_unet

T = 1000
STRIPE_STEPS = 200  # training steps of the toy DDPM for the quality ranking


def quantized_gaussian(n, shape=(3, 8, 8), mean=0.1, std=0.25, seed=0):
    """uint8 images whose pixels are i.i.d. round(N(mean, std^2) on the [-1, 1] scale), and the pmf of a pixel."""
    gen = np.random.default_rng(seed)
    levels = np.clip(np.round((gen.normal(mean, std, (n, *shape)) + 1) * 127.5), 0, 255).astype(np.uint8)
    edges = (np.arange(257) - 0.5) / 127.5 - 1
    edges[0], edges[-1] = -np.inf, np.inf
    cdf = 0.5 * (1 + np.vectorize(math.erf)((edges - mean) / (std * math.sqrt(2))))
    return levels, np.diff(cdf)


class LinearEps(torch.nn.Module):
    """The exact eps-model among linear ones for data of pixel mean m and variance v (with noise independent of x0,
    its x0_hat has MSE v (1 - abar) / (abar v + 1 - abar), whatever the data's shape)."""

    def __init__(self, diffusion, m, v):
        super().__init__()
        self.abar = diffusion.tables["alphas_cumprod"].float()
        self.m, self.v = m, v

    def forward(self, x_t, t):
        abar = self.abar[t][:, None, None, None]
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * self.m) / (abar * self.v + 1 - abar)


def closed_form_bound(diffusion, m, v):
    """Expected prior and KL terms (bits/dim) for LinearEps on data of mean m, variance v: the two posteriors
    differ in mean by coef1_t (x0 - x0_hat) and in variance by the fixed choice."""
    tab = {k: v_.double() for k, v_ in diffusion.tables.items()}
    abar, coef1 = tab["alphas_cumprod"], tab["posterior_mean_coef1"]
    mse = v * (1 - abar) / (abar * v + 1 - abar)
    var_q = tab["posterior_variance"]
    var_p = tab["model_variance"]
    kl = 0.5 * (torch.log(var_p / var_q) + var_q / var_p - 1 + coef1 ** 2 * mse / var_p)
    prior = 0.5 * (-torch.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * (v + m * m) - 1)
    return prior.item() / math.log(2), kl[1:].sum().item() / math.log(2)


def test_the_bound_of_the_exact_linear_model_is_the_closed_form_and_above_the_entropy():
    levels, pmf = quantized_gaussian(48)
    x0 = torch.from_numpy(levels).float() / 127.5 - 1
    m, v = x0.mean().item(), x0.var().item()
    diffusion = Diffusion(timesteps=T, variance="fixed_small", clip_denoised=False)
    model = LinearEps(diffusion, m, v)
    report = ddpm_fast.nll(model, levels, diffusion=diffusion, batch_size=20, progress=False)
    prior, kl_sum = closed_form_bound(diffusion, m, v)
    assert report.prior == pytest.approx(prior, rel=1e-3)
    assert report.terms_sum == pytest.approx(kl_sum, rel=0.03)  # eps sampling error over 9216 pixels
    entropy = -(pmf[pmf > 0] * np.log2(pmf[pmf > 0])).sum()
    assert report.bpd > entropy
    assert report.bpd == pytest.approx(report.prior + report.terms_sum + report.decoder, rel=1e-6)
    # its mean over images is nll_bpd's, whatever the batch size
    direct = diffusion.nll_bpd(model, x0, seed=0, sample_index=torch.arange(48))
    assert report.bpd == pytest.approx(direct.total.mean().item(), rel=1e-6)
    assert torch.allclose(report.per_image, direct.total, rtol=1e-5)
    assert "bits/dim over 48 images" in str(report)


def toy_model():
    return random_tiny_unet(std=0.1)


def test_nll_runs_the_network_in_the_precision_asked():
    """network_dtype=torch.bfloat16: the network under bf16 autocast (as sample()'s), the bound close to float32's
    on the same noise; float32 is the default; another dtype is refused."""
    model = toy_model()
    data = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    seen = []
    spying = model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    full = ddpm_fast.nll(model, data, progress=False)
    assert set(seen) == {torch.float32}
    seen.clear()
    low = ddpm_fast.nll(model, data, progress=False, network_dtype=torch.bfloat16)
    spying.remove()
    assert set(seen) == {torch.bfloat16} and low.bpd == pytest.approx(full.bpd, rel=0.02)
    with pytest.raises(ValueError, match="network_dtype must be"):
        ddpm_fast.nll(model, data, progress=False, network_dtype=torch.int8)


def test_rate_distortion_follows_its_own_terms(tmp_path):
    model = toy_model()
    data = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    rd = ddpm_fast.rate_distortion(model, data, batch_size=4, out=tmp_path, progress=False)
    report = rd.report
    terms = report.terms.double()
    for t in (0, 7, 19):
        assert rd.rate[t].item() == pytest.approx(report.prior + terms[t + 1:].sum().item(), rel=1e-5)
        assert rd.distortion[t].item() == pytest.approx(math.sqrt(report.mse[t].item()) * 127.5, rel=1e-6)
    assert (rd.rate[:-1] >= rd.rate[1:]).all() and rd.rate[-1].item() == pytest.approx(report.prior)
    rows = (tmp_path / "rate_distortion.csv").read_text().splitlines()
    assert rows[0] == "t,rate_bits_per_dim,distortion_rmse_0_255" and len(rows) == 21
    with Image.open(tmp_path / "rate_distortion.png") as image:
        assert image.size[0] > 600


def test_interpolation_decodes_the_mixed_latent_with_shared_noise(tmp_path):
    model = toy_model()
    gen = torch.Generator().manual_seed(3)
    x0, x1 = torch.rand(2, 1, 8, 8, generator=gen) * 2 - 1, torch.rand(2, 1, 8, 8, generator=gen) * 2 - 1
    out = ddpm_fast.interpolate(model, x0, x1, t=10, lambdas=(0.0, 0.5, 1.0), seed=4, out=tmp_path / "i.png",
                                progress=False)
    assert out.shape == (2, 3, 1, 8, 8)
    d = model.diffusion
    pair = torch.arange(2)
    eps = philox.randn(pair, torch.full_like(pair, 10), (1, 8, 8), seed=4, stream=philox.STREAM_EVAL_EPS)
    for column, lam in enumerate((0.0, 0.5, 1.0)):
        x = (1 - lam) * d.q_sample(x0, torch.tensor([10, 10]), eps) + lam * d.q_sample(x1, torch.tensor([10, 10]), eps)
        with torch.no_grad():
            for step in range(10, -1, -1):
                x = d.p_sample(model, x, step, seed=4, sample_index=pair).sample
        assert torch.allclose(out[:, column], x.clamp(-1, 1), atol=1e-5)
    with Image.open(tmp_path / "i.png") as image:
        assert image.size == (8 * (5 * 8 + 6 * 2), 8 * (2 * 8 + 3 * 2))  # x0, three decodings, x0'; enlarged 8x
    with pytest.raises(ValueError, match=r"t must be an int in \[0, 20\)"):
        ddpm_fast.interpolate(model, x0, x1, t=20)
    with pytest.raises(ValueError, match="must have one shape"):
        ddpm_fast.interpolate(model, x0, x1[:1])


def stripes(n, seed):
    """8x8 grey images of two classes, horizontal (0) or vertical (1) stripes, random phase and pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=gen)
    phase = torch.randint(0, 2, (n,), generator=gen)
    rows = ((torch.arange(8)[None, :, None] + phase[:, None, None]) % 2).expand(n, 8, 8).float()
    images = torch.where(labels[:, None, None] == 0, rows, rows.transpose(1, 2)) * 200 + 28
    images = images + torch.randint(-20, 21, (n, 8, 8), generator=gen)
    return images.clamp(0, 255).to(torch.uint8)[:, None], labels


@pytest.fixture(scope="module")
def stripe_models():
    """A toy DDPM trained STRIPE_STEPS steps on 512 stripe images (~10 s), its untrained start, and 128 held-out
    images of the same kind with their labels; shared by the quality and rate-distortion tests."""
    images, labels = stripes(512, 0)
    torch.manual_seed(0)
    untrained = UNet(in_channels=1, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                     dropout=0.0, num_groups=8, diffusion=Diffusion(timesteps=100))
    trainer = ddpm_fast.train(copy.deepcopy(untrained), images,
                              steps=STRIPE_STEPS, batch_size=32, lr=1e-3, warmup=20, ema_decay=0.99, flip=False,
                              progress=False)
    return dict(images=images, labels=labels, held_out=stripes(128, 1)[0], trained=trainer.ema_model(),
                untrained=untrained.eval())


@pytest.mark.slow
def test_rate_distortion_of_a_trained_toy_model(stripe_models, tmp_path):
    """The curve means something once the model has learnt: the distortion falls as bits arrive (t going down) and
    ends near 0, below the untrained model's; most bits go to the last steps, where the distortion is already small
    (the paper's Figure 5 finding); and the last point's rate is the whole bound but L_0."""
    held_out = stripe_models["held_out"][:32]
    trained = ddpm_fast.rate_distortion(stripe_models["trained"], held_out, out=tmp_path, progress=False)
    untrained = ddpm_fast.rate_distortion(stripe_models["untrained"], held_out, progress=False)
    d, rate = trained.distortion, trained.rate
    coarse = d[[0, 20, 40, 60, 80, 99]]
    assert (coarse[:-1] < coarse[1:]).all() and d[0] < 0.02 * held_out.double().std().item()
    assert (d[10:] < 0.9 * untrained.distortion[10:]).all()  # below t = 10 both see x0 through little noise
    assert rate[0] - rate[10] > 0.5 * rate[0] and d[10] < 0.3 * d[99]
    assert trained.rate[0].item() == pytest.approx(trained.report.bpd - trained.report.decoder, rel=1e-5)
    assert trained.report.bpd < untrained.report.bpd
    assert (tmp_path / "rate_distortion.png").is_file()


@pytest.mark.slow
def test_quality_ranks_a_trained_model_between_an_untrained_one_and_real_data(stripe_models):
    from ddpm_fast.evaluation import frechet_distance, sample_quality, train_classifier
    held_out = stripe_models["held_out"]
    classifier = train_classifier(stripe_models["images"], stripe_models["labels"], epochs=5, progress=False)
    good = sample_quality(ddpm_fast.sample(stripe_models["trained"], 48, progress=False), held_out, classifier)
    bad = sample_quality(ddpm_fast.sample(stripe_models["untrained"], 48, progress=False), held_out, classifier)
    assert good.real_confident > 0.95 and good.real_frechet < good.frechet < bad.frechet
    assert good.confident > bad.confident + 0.3 and min(good.histogram) > 8  # both classes drawn
    assert "Fréchet distance" in str(good)
    # the distance itself: 0 for a set against itself, the closed form for two Gaussians' samples
    a = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    assert frechet_distance(a, 2 * a + 1) == pytest.approx(3 * 1 + 3 * (1 + 4 - 2 * 2), rel=0.05)
