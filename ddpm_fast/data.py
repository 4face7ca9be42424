"""Training data: images as a uint8 tensor (N, C, H, W), read from a folder of PNG/JPEG files, CIFAR-10's python
batches, an .npz array or an array in memory; scaled to [-1, 1] per batch (v / 127.5 - 1, checkpoint.DATA_SCALING).

The whole dataset is held as uint8 (CIFAR-10: 150 MB); a folder's files are decoded once, by a thread pool. The
training loop gathers its batches from that array in a background thread (training.py), so it is never waiting on
files.
"""
from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm_fast import sample_store

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1.0


def load_images(source, *, image_size: int | None = None, progress: bool = True) -> torch.Tensor:
    """The dataset as a uint8 tensor (N, C, H, W).

    :param source: a uint8 array or tensor ((N, C, H, W), (N, H, W, C) with C in 1, 3, 4 (read as (N, C, H, W)
        where both fit), or (N, H, W)); or a
        path: a folder of PNG/JPEG images (searched recursively), a folder of CIFAR-10's python batches
        (data_batch_1..5), a finished folder of sample(out=) (PNG or .npz shards), or an .npz file (its array
        named x, images or arr_0, or its only array).
    :param image_size: for a folder: centre-crop each image to a square and resize it to this size (Lanczos).
        Without it every image must have the same size.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no data at {path}")
        if path.is_file():
            if path.suffix != ".npz":
                raise ValueError(f"{path}: a data file must be an .npz array (or give a folder of images)")
            return _as_nchw(_read_npz(path), str(path))
        if sample_store.is_samples_folder(path):  # sample(out=)'s, PNG or .npz shards, finished
            return sample_store.read_samples(path)
        if sorted(path.glob("data_batch_*")):
            return _read_cifar10(path)
        return _read_folder(path, image_size, progress)
    return _as_nchw(source, "the data")


def _as_nchw(array, what: str) -> torch.Tensor:
    if isinstance(array, np.ndarray):
        array = torch.from_numpy(np.ascontiguousarray(array))
    if not isinstance(array, torch.Tensor):
        raise ValueError(f"{what}: expected images as a uint8 array, got {type(array).__name__}")
    if array.dtype != torch.uint8:
        raise ValueError(f"{what}: expected 8-bit images (uint8), got {array.dtype}: scale your data to 0..255")
    if array.dim() == 3:
        array = array[:, None]
    if array.dim() != 4 or array.shape[0] == 0:
        raise ValueError(f"{what}: expected images of shape (N, C, H, W) or (N, H, W, C), got {tuple(array.shape)}")
    if array.shape[1] not in (1, 3, 4) and array.shape[-1] in (1, 3, 4):
        array = array.permute(0, 3, 1, 2)
    if array.shape[1] not in (1, 3, 4):
        raise ValueError(f"{what}: cannot tell the channels of shape {tuple(array.shape)} (1, 3 or 4 expected)")
    return array.contiguous()


def _read_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path) as arrays:
            names = list(arrays.keys())
            name = next((n for n in ("x", "images", "arr_0") if n in names), names[0] if len(names) == 1 else None)
            if name is None:
                raise ValueError(f"{path}: cannot tell which array holds the images among {names} (name it x)")
            return arrays[name]
    except (OSError, ValueError, EOFError) as error:
        if "cannot tell" in str(error):
            raise
        raise ValueError(f"{path} is not a readable .npz file ({type(error).__name__}: {error})") from error


def _read_cifar10(path: Path) -> torch.Tensor:
    """CIFAR-10's python version: data_batch_1..5 (pickles of 10000 rows of 3072 bytes, channel-major)."""
    batches = []
    for file in sorted(path.glob("data_batch_*")):
        try:
            with open(file, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
        except Exception as error:
            raise ValueError(f"{file} is not a CIFAR-10 python batch ({type(error).__name__}: {error})") from error
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{file}: expected rows of 3072 bytes, got {data.shape}")
        batches.append(data.reshape(-1, 3, 32, 32))
    return torch.from_numpy(np.concatenate(batches))


def _read_folder(path: Path, image_size: int | None, progress: bool) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no CIFAR-10 batches")

    def header(file):
        try:
            with Image.open(file) as image:
                return image.size, image.mode
        except Exception as error:
            raise ValueError(f"{file} is not a readable image ({type(error).__name__}: {error})") from error

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        headers = list(pool.map(header, files))
        sizes = sorted({size for size, _ in headers})
        if image_size is None and len(sizes) > 1:
            raise ValueError(f"{path}: images of {len(sizes)} sizes ({', '.join(f'{w}x{h}' for w, h in sizes[:5])}"
                             f"{' ...' if len(sizes) > 5 else ''}); pass image_size= to crop and resize them")
        grey = all(mode in ("L", "LA", "1", "I;16", "I") for _, mode in headers)
        mode = "L" if grey else "RGB"

        def decode(file):
            with Image.open(file) as image:
                image = image.convert(mode)
                if image_size is not None:
                    w, h = image.size
                    side = min(w, h)
                    image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side,
                                        (h - side) // 2 + side)).resize((image_size, image_size), Image.LANCZOS)
                return np.asarray(image, dtype=np.uint8)

        arrays = list(tqdm(pool.map(decode, files), total=len(files), desc="reading images", unit="image",
                           disable=not progress, leave=False))
    stacked = torch.from_numpy(np.stack(arrays))  # (N, H, W) grey, (N, H, W, 3) RGB
    return (stacked[:, None] if grey else stacked.permute(0, 3, 1, 2)).contiguous()
