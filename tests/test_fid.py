"""FID: our FID Inception against pytorch-fid's (the features it computed, with the same synthetic weights, stored in
tests/reference/), our Fréchet distance against its scipy one, the input conversions, saved statistics, and the
refusals (no weights anywhere, a file that is not the FID Inception's)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast import evaluation, inception
from ddpm_fast.checkpoint import load_checked
from ddpm_fast.inception import FIDInception

sys.path.insert(0, str(Path(__file__).parent / "reference"))
from fid_inception import FIXTURE, reference_features, reference_images, synthetic_weights  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as f:
        shapes = {str(n): tuple(int(v) for v in s.split(",")) if s else () for n, s in zip(f["names"], f["shapes"])}
        return dict(shapes=shapes, features=torch.from_numpy(f["features"]), frechet=float(f["frechet"]))


@pytest.fixture(scope="module")
def network(reference):
    model = FIDInception()
    load_checked(model, synthetic_weights(reference["shapes"]))
    return model.eval().requires_grad_(False)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Nowhere to find the real weights: no $DDPM_FAST_INCEPTION, an empty torch hub cache."""
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def test_our_network_has_pytorch_fids_tensors_and_computes_its_features(reference, network):
    ours = {k: tuple(v.shape) for k, v in FIDInception().state_dict().items()}
    theirs = {k: v for k, v in reference["shapes"].items() if not k.endswith("num_batches_tracked")}
    assert ours == theirs
    with torch.no_grad():
        features = network(reference_images().float() / 255)
    expected = reference["features"]
    assert features.shape == (4, 2048) and torch.isfinite(expected).all()
    assert (expected[0] - expected[1]).norm() > 1e-2 * expected.norm() / 2  # the images are told apart
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_frechet_distance_equals_pytorch_fids(reference):
    a, b = reference_features()
    ours = evaluation.frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert ours == pytest.approx(reference["frechet"], rel=1e-9)


def test_fid_of_samples_uint8_and_saved_statistics(reference, network, tmp_path):
    pixels = reference_images()
    samples = pixels.float() / 127.5 - 1 + 0.001  # samples in [-1, 1] that quantise back to `pixels`
    expected = evaluation.frechet_distance(reference["features"][:2].double(), reference["features"][2:].double())
    assert expected > 0
    value = ddpm_fast.fid(samples[:2], pixels[2:], weights=network, progress=False)
    assert value == pytest.approx(expected, rel=1e-4)
    stats = evaluation.inception_stats(pixels[2:], weights=network, batch_size=1, progress=False)
    assert stats.count == 2
    stats.save(tmp_path / "ref.npz")
    with np.load(tmp_path / "ref.npz") as f:  # pytorch-fid's keys
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)
    assert ddpm_fast.fid(samples[:2], tmp_path / "ref.npz", weights=network, progress=False) == \
        pytest.approx(expected, rel=1e-4)
    zero = pytest.approx(0, abs=1e-7 * stats.sigma.trace().item())  # float64 rounding of the square root's trace
    assert ddpm_fast.fid(stats, tmp_path / "ref.npz") == zero  # saved statistics on both sides: no weights needed
    grey = pixels[2:, :1]  # read as RGB with three equal channels
    assert ddpm_fast.fid(grey, grey.expand(-1, 3, -1, -1).clone(), weights=network, progress=False) == zero


def test_weights_are_found_on_disk_and_checked(reference, no_weights, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="never downloads.*pt_inception-2015-12-05"):
        ddpm_fast.fid(reference_images()[:2], reference_images()[2:], progress=False)
    with pytest.raises(FileNotFoundError, match="no Inception weight file at"):
        FIDInception.from_file(tmp_path / "absent.pth")
    state = synthetic_weights(reference["shapes"])
    path = tmp_path / "hub" / "checkpoints" / inception.WEIGHTS_NAME
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    assert inception.find_weights() == path  # torch hub's cache, where pytorch-fid keeps it
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "elsewhere.pth"))
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        inception.find_weights()
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["Mixed_6a.branch3x3.conv.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "elsewhere.pth")
    with pytest.raises(ValueError, match="missing.*Mixed_7c.branch_pool.conv.weight.*Mixed_6a.branch3x3"):
        FIDInception.from_file()


def test_bad_inputs_are_refused(network, tmp_path):
    with pytest.raises(ValueError, match="grey or RGB"):
        evaluation.inception_stats(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), weights=network, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        evaluation.inception_stats(torch.full((2, 3, 8, 8), float("nan")), weights=network, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        evaluation.inception_stats(torch.zeros(1, 3, 8, 8), weights=network, progress=False)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="mu must be"):
        ddpm_fast.InceptionStats.load(tmp_path / "bad.npz")
    small = ddpm_fast.InceptionStats(torch.zeros(3), torch.eye(3), 5)
    with pytest.raises(ValueError, match="different feature sizes"):
        ddpm_fast.fid(small, ddpm_fast.InceptionStats(torch.zeros(4), torch.eye(4), 5))
