"""uint8 conversion and PNG grids (the command line: test_cli.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_fast


def test_to_uint8_maps_the_ends_and_the_middle():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.7, -3.0]).view(1, 1, 1, 7)
    assert ddpm_fast.to_uint8(x).flatten().tolist() == [0, 0, 128, 191, 255, 255, 0]
    with pytest.raises(ValueError, match="NaN"):
        ddpm_fast.to_uint8(torch.tensor([0.0, float("nan")]).view(1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ddpm_fast.to_uint8(torch.zeros(3, 4))


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_png_holds_every_image(tmp_path, channels):
    images = torch.rand(5, channels, 4, 6) * 2 - 1
    path = ddpm_fast.save_grid(images, tmp_path / "sub" / "grid.png", nrow=3, padding=1, scale=1)
    loaded = np.asarray(Image.open(path))
    assert loaded.shape[:2] == (1 + 2 * 5, 1 + 3 * 7)
    pixels = ddpm_fast.to_uint8(images)
    for i in range(5):
        y, x = 1 + (i // 3) * 5, 1 + (i % 3) * 7
        tile = loaded[y:y + 4, x:x + 6]
        expected = pixels[i].permute(1, 2, 0).numpy()
        assert np.array_equal(tile.reshape(expected.shape), expected)
    assert not list(tmp_path.glob("sub/.*tmp"))


def test_grids_are_enlarged_to_64_pixels_per_image_by_repeating_pixels(tmp_path):
    """By default each image is at least 64 pixels wide (an 8x8 digit: 8x), by an integer factor, nearest
    neighbour: the enlarged grid is the 1:1 grid with every pixel repeated, no new grey levels; scale= chooses."""
    images = torch.rand(4, 1, 8, 6) * 2 - 1
    small = ddpm_fast.make_grid(images, scale=1)
    big = ddpm_fast.make_grid(images)
    assert big.shape == (small.shape[0] * 11, small.shape[1] * 11, 1)  # ceil(64 / 6) = 11
    assert np.array_equal(big[::11, ::11], small) and set(np.unique(big)) == set(np.unique(small))
    assert ddpm_fast.make_grid(torch.rand(1, 3, 64, 64) * 2 - 1).shape == (68, 68, 3)  # wide enough: 1:1
    assert np.asarray(Image.open(ddpm_fast.save_grid(images, tmp_path / "g.png", scale=3))).shape == \
        (small.shape[0] * 3, small.shape[1] * 3)
    with pytest.raises(ValueError, match="scale must be a positive int, got 0"):
        ddpm_fast.make_grid(images, scale=0)
