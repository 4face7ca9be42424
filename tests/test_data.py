"""Training data: a folder of images, CIFAR-10's python batches, .npz arrays and arrays in memory, each read to a
uint8 (N, C, H, W) tensor; the refusals; the keyed data order."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import load_images, to_model_range
from ddpm_fast.training import data_positions


def pixels(n, h, w, c, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_a_folder_of_images(tmp_path):
    rgb = pixels(3, 6, 6, 3)
    (tmp_path / "sub").mkdir()
    for i, image in enumerate(rgb):
        Image.fromarray(image).save(tmp_path / ("sub" if i else ".") / f"{i}.png")
    got = load_images(tmp_path, progress=False)
    assert got.dtype == torch.uint8 and got.shape == (3, 3, 6, 6)
    assert torch.equal(got, torch.from_numpy(rgb).permute(0, 3, 1, 2))  # sorted paths: 0.png, sub/1.png, sub/2.png

    grey = tmp_path / "grey"
    grey.mkdir()
    values = pixels(2, 5, 5, 1)[..., 0]
    for i, image in enumerate(values):
        Image.fromarray(image, mode="L").save(grey / f"{i}.png")
    assert torch.equal(load_images(grey, progress=False), torch.from_numpy(values)[:, None])


def test_mixed_sizes_are_refused_unless_resized(tmp_path):
    Image.fromarray(pixels(1, 8, 12, 3)[0]).save(tmp_path / "wide.jpg")
    Image.fromarray(pixels(1, 6, 6, 3)[0]).save(tmp_path / "square.png")
    with pytest.raises(ValueError, match=r"images of 2 sizes \(6x6, 12x8\); pass image_size="):
        load_images(tmp_path, progress=False)
    got = load_images(tmp_path, image_size=4, progress=False)
    assert got.shape == (2, 3, 4, 4)
    # a constant image stays constant through the centre crop and the resize
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.full((10, 16, 3), 77, np.uint8)).save(flat / "a.png")
    assert (load_images(flat, image_size=4, progress=False) == 77).all()


def test_cifar10_batches(tmp_path):
    rows = [np.random.default_rng(i).integers(0, 256, (7, 3072), dtype=np.uint8) for i in range(2)]
    for i, data in enumerate(rows):
        with open(tmp_path / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * 7}, f)
    got = load_images(tmp_path)
    assert got.shape == (14, 3, 32, 32)
    assert torch.equal(got[7, 1, 0, :4], torch.from_numpy(rows[1][0, 1024:1028]))  # channel-major rows
    (tmp_path / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR-10 python batch"):
        load_images(tmp_path)


def test_npz_and_arrays(tmp_path):
    nhwc = pixels(4, 8, 8, 3)
    np.savez(tmp_path / "a.npz", x=nhwc, labels=np.zeros(4))
    assert torch.equal(load_images(tmp_path / "a.npz"), torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    np.savez(tmp_path / "b.npz", nhwc.transpose(0, 3, 1, 2))  # arr_0, already NCHW
    assert torch.equal(load_images(tmp_path / "b.npz"), torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    assert load_images(nhwc[..., 0]).shape == (4, 1, 8, 8)
    np.savez(tmp_path / "c.npz", a=nhwc, b=nhwc)
    with pytest.raises(ValueError, match="cannot tell which array holds the images"):
        load_images(tmp_path / "c.npz")
    (tmp_path / "d.npz").write_bytes(b"PK truncated")
    with pytest.raises(ValueError, match="d.npz is not a readable .npz file"):
        load_images(tmp_path / "d.npz")


def test_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data at"):
        load_images(tmp_path / "absent")
    with pytest.raises(ValueError, match="holds no images"):
        load_images(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="must be an .npz array"):
        load_images(tmp_path / "notes.txt")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        load_images(tmp_path, progress=False)
    with pytest.raises(ValueError, match="expected 8-bit images"):
        load_images(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="cannot tell the channels"):
        load_images(np.zeros((2, 5, 4, 6), np.uint8))


def test_scaling_and_the_keyed_order():
    assert torch.equal(to_model_range(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-1.0, 1.0]))
    order = torch.cat([data_positions(s, 6, 10, seed=3, permutations={}) for s in range(5)])  # 3 epochs of 10
    for epoch in range(3):
        assert sorted(order[10 * epoch:10 * epoch + 10].tolist()) == list(range(10))  # each epoch a permutation
    assert not torch.equal(order[:10], order[10:20])
    assert torch.equal(data_positions(4, 6, 10, seed=3, permutations={}), order[24:30])  # any step, alone
