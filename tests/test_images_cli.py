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
    path = ddpm_fast.save_grid(images, tmp_path / "sub" / "grid.png", nrow=3, padding=1)
    loaded = np.asarray(Image.open(path))
    assert loaded.shape[:2] == (1 + 2 * 5, 1 + 3 * 7)
    pixels = ddpm_fast.to_uint8(images)
    for i in range(5):
        y, x = 1 + (i // 3) * 5, 1 + (i % 3) * 7
        tile = loaded[y:y + 4, x:x + 6]
        expected = pixels[i].permute(1, 2, 0).numpy()
        assert np.array_equal(tile.reshape(expected.shape), expected)
    assert not list(tmp_path.glob("sub/.*tmp"))
