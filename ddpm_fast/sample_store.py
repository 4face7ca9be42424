"""A folder of samples written as they finish: sample(..., out=PATH).

The folder holds manifest.json (what made the images: the model's hash, the process, the seed and every setting
that changes a pixel, and the batch size) and the images, 8-bit: one PNG per image (`000123.png`, named by its
global sample index) or one .npz shard per batch (`batch_000004.npz`: `images` (B, H, W, C) uint8, `index` (B,)).
Every file is written under a temporary name and renamed, so a file that exists is whole.

A run is a list of aligned batches [b B, (b + 1) B). A batch is done when all of its files exist; a run started
again on the same folder skips the done batches and writes only the missing files of the others, so nothing is
written twice. Since the noise is keyed by the global sample index, a resumed run's images are the ones an
uninterrupted run writes (bitwise, with the same backend and batch size: the manifest pins the batch size).
Under torchrun, rank r of W takes batches r, r + W, r + 2W, ... and writes them into the same folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddpm_fast import checks

FORMAT = "ddpm_fast.samples"
VERSION = 1
FORMATS = ("png", "npz")
MANIFEST = "manifest.json"


def model_hash(model) -> str:
    """sha256 of an nn.Module's state dict (names, dtypes, shapes, bytes, in name order); a plain callable has no
    weights to hash: its qualified name stands in."""
    if not isinstance(model, nn.Module):
        return f"callable:{type(model).__module__}.{getattr(model, '__qualname__', type(model).__qualname__)}"
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + digest.hexdigest()


def diffusion_hash(diffusion, clip_denoised: bool) -> str:
    """sha256 of the process as sampled: its betas, timestep map (respacing) and variance, and the clipping."""
    config = dict(betas=diffusion.tables["betas"].tolist(), timestep_map=diffusion.timestep_map.tolist(),
                  variance=diffusion.variance, clip_denoised=clip_denoised)
    return "sha256:" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def shard() -> tuple[int, int]:
    """(rank, world size) under torchrun or an initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class SampleStore:
    """The folder of one run. `identity` is everything that must match for a folder to be continued."""

    def __init__(self, path, identity: dict, image_format: str):
        checks.choice("out_format", image_format, FORMATS)
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"out={self.path} is a file; sample(out=) writes a folder")
        if image_format == "png" and identity["shape"][0] not in (1, 3):
            raise ValueError(f"PNG files hold grey or RGB images; these have {identity['shape'][0]} channels "
                             "(out_format='npz' holds any number)")
        self.format = image_format
        self.manifest = dict(format=FORMAT, version=VERSION, image_format=image_format, **identity)
        self.n, self.batch_size = identity["n"], identity["batch_size"]
        self.digits = max(6, len(str(self.n - 1)))
        self._writer: ThreadPoolExecutor | None = None  # started by the first write
        self._pending: Future | None = None

    # ---------------------------------------------------------------------------------------------- the manifest

    def open(self) -> None:
        """Create the folder and its manifest, or check that the folder's manifest is this run's. Ranks may race
        here: the manifest is created by a hard link, which fails where one exists, so exactly one is written and
        every rank compares against it."""
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            if any(p.suffix in (".png", ".npz") for p in self.path.iterdir()) and not manifest.exists():
                # (checked again after the scan: another rank may have created it and written since)
                raise ValueError(f"{self.path} holds images but no {MANIFEST}: not a ddpm_fast samples folder; "
                                 "choose another out=")
            tmp = self.path / f".{MANIFEST}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, manifest)
            except FileExistsError:
                pass  # another rank's, read below
            except OSError:  # a file system without hard links: a rename (racing ranks write the same text)
                os.replace(tmp, manifest)
            finally:
                tmp.unlink(missing_ok=True)
        try:
            found = json.loads(manifest.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{manifest} is not readable ({type(error).__name__}: {error})") from error
        if not isinstance(found, dict) or found.get("format") != FORMAT:
            raise ValueError(f"{manifest} is not a ddpm_fast samples manifest")
        differ = [f"{k}: the folder's {found.get(k)!r}, now {v!r}" for k, v in self.manifest.items()
                  if found.get(k) != v]
        if differ:
            raise ValueError(f"{self.path} holds samples made with other arguments ({'; '.join(differ)}); use "
                             "another out= folder, or the arguments that made it")

    # ---------------------------------------------------------------------------------------------- the batches

    def batches(self) -> int:
        return -(-self.n // self.batch_size)

    def bounds(self, b: int) -> tuple[int, int]:
        return b * self.batch_size, min((b + 1) * self.batch_size, self.n)

    def _png(self, i: int) -> Path:
        return self.path / f"{i:0{self.digits}d}.png"

    def _shard(self, b: int) -> Path:
        return self.path / f"batch_{b:06d}.npz"

    def missing(self, b: int) -> list[int]:
        """The sample indices of batch b whose files are not there yet (for .npz: all or none)."""
        start, stop = self.bounds(b)
        if self.format == "npz":
            return [] if self._shard(b).exists() else list(range(start, stop))
        return [i for i in range(start, stop) if not self._png(i).exists()]

    def write(self, b: int, pixels: torch.Tensor, missing: list[int]) -> None:
        """Queue batch b's uint8 images (B, C, H, W) for the writer thread (which overlaps the next batch's
        sampling); first wait for the previous batch's files, so at most two batches are held."""
        self.wait()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="ddpm_fast-sample-writer")
        pixels = pixels.to("cpu").permute(0, 2, 3, 1).contiguous().numpy()  # (B, H, W, C), as PNG and .npz store it
        self._pending = self._writer.submit(self._write, b, pixels, missing)

    def wait(self) -> None:
        """Block until the queued files are on disk; an error in writing them is raised here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)

    def _write(self, b: int, pixels: np.ndarray, missing: list[int]) -> None:
        start, _ = self.bounds(b)
        if self.format == "npz":
            target = self._shard(b)
            tmp = target.with_name(f".{target.name}.tmp")
            with open(tmp, "wb") as f:
                np.savez(f, images=pixels, index=np.arange(start, start + len(pixels)))
            os.replace(tmp, target)
            return
        from PIL import Image

        for i in missing:
            target = self._png(i)
            tmp = target.with_name(f".{target.name}.tmp")
            image = pixels[i - start]
            Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(tmp, format="PNG")
            os.replace(tmp, target)


def is_samples_folder(path) -> bool:
    """Whether `path` is a folder whose manifest says it holds sample(out=)'s images."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def recorded_batch_size(path) -> int | None:
    """The batch size of the run a folder holds (a resumed run keeps it), or None where there is none yet."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        return int(json.loads(manifest.read_text())["batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # SampleStore.open says what is wrong with it


def read_samples(path) -> torch.Tensor:
    """A finished samples folder as uint8 (n, C, H, W), in sample-index order; an unfinished one is an error that
    says how many images are missing."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a ddpm_fast samples folder ({MANIFEST}: {error})") from error
    store = SampleStore(path, {k: manifest[k] for k in ("n", "batch_size", "shape")}, manifest["image_format"])
    lost = sum(len(store.missing(b)) for b in range(store.batches()))
    if lost:
        raise ValueError(f"{path} is unfinished: {lost} of {store.n} images are missing (run the same sample() "
                         "call again to finish it)")
    if store.format == "npz":
        chunks = []
        for b in range(store.batches()):
            with np.load(store._shard(b)) as f:
                chunks.append(f["images"])
        pixels = np.concatenate(chunks)
    else:
        from PIL import Image

        pixels = np.stack([np.asarray(Image.open(store._png(i))) for i in range(store.n)])
        if pixels.ndim == 3:
            pixels = pixels[..., None]
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).contiguous()
