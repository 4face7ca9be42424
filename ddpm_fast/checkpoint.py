"""Our checkpoint format (written atomically, verified when read: `save` / `load` / `read_training_state`), and the
checked reading of state dicts that every loader shares (`read_state_dict`, `load_checked`; other codebases'
layouts are conversions.py's).

Ours is a folder: config.json (the network, the diffusion, the data's scaling, the training settings),
model.safetensors, ema.safetensors, optimizer.safetensors + state.json (the training state), and manifest.json (each
file's size and sha256), written last. A run keeps its checkpoints as run/step_XXXXXXXX/, each written under a
temporary name and renamed (atomic), and run/latest names the newest.

A configuration the U-Net cannot be, a missing, unexpected or misshapen tensor, or a file that is not what the
manifest says is refused with its name before anything is loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ddpm_fast import checks
from ddpm_fast import schedule as _schedule
from ddpm_fast.diffusion import Diffusion
from ddpm_fast.unet import UNet

# ---------------------------------------------------------------------------------------------- reading, loading


def read_state_dict(source) -> dict:
    """A {name: tensor} mapping as given, or read from a file onto the CPU: safetensors (by its .safetensors suffix)
    or anything torch.load reads with weights_only=True."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file at {path}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                source = load_file(path, device="cpu")
            else:
                source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file: say which and why
            reader = "safetensors" if path.suffix == ".safetensors" else "torch.load"
            raise ValueError(f"{path} is not a checkpoint {reader} can read ({type(error).__name__}: "
                             f"{str(error)[:300]})") from error
    if not isinstance(source, Mapping) or not all(isinstance(k, str) for k in source):
        raise ValueError(f"expected a state dict ({{name: tensor}}), got {type(source).__name__}")
    return dict(source)


def load_checked(model: nn.Module, state: dict, names: dict[str, str] | None = None) -> None:
    """Load `state` into `model` after checking every name and shape. A missing, unexpected or misshapen tensor is
    an error that names it (the first ten of each kind), and then nothing has been loaded.

    :param names: our name -> the checkpoint's name (default: the same); errors use the checkpoint's names.
    A (out, in) linear weight is taken for a 1x1 convolution's (out, in, 1, 1): the same map.
    """
    ours = model.state_dict()
    names = names or {k: k for k in ours}
    wanted = {names[k]: v for k, v in ours.items()}  # the checkpoint's name -> our tensor
    problems = []
    for kind, keys in (("missing", sorted(set(wanted) - set(state))), ("unexpected", sorted(set(state) - set(wanted)))):
        if keys:
            problems.append(f"{len(keys)} {kind} tensor(s): {', '.join(keys[:10])}" + (" ..." if len(keys) > 10
                                                                                       else ""))
    common = sorted(set(state) & set(wanted))
    not_tensors = [k for k in common if not isinstance(state[k], torch.Tensor)]
    if not_tensors:
        problems.append(f"not tensors: {', '.join(not_tensors[:10])}")
    shapes = [f"{k} is {tuple(state[k].shape)}, the model's {tuple(wanted[k].shape)}" for k in common
              if k not in not_tensors and not _fits(state[k].shape, wanted[k].shape)]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:10]))
    if problems:
        raise ValueError("the checkpoint does not fit this network: " + " | ".join(problems))
    model.load_state_dict({k: state[names[k]].reshape(v.shape) for k, v in ours.items()}, strict=True)

def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; one sentence naming `what` it should be when it is missing, unreadable or not an
    object."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable {what} ({type(error).__name__}: {error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a {what}: a JSON object was expected")
    return config


def _fits(given: torch.Size, expected: torch.Size) -> bool:
    return given == expected or (len(expected) == 4 and tuple(expected[2:]) == (1, 1)
                                 and tuple(given) == tuple(expected[:2]))


# ---------------------------------------------------------------------------------------------- ours

FORMAT, VERSION = "ddpm_fast", 1
DATA_SCALING = "uint8 v in [0, 255] -> v / 127.5 - 1 in [-1, 1]"


def diffusion_config(diffusion: Diffusion) -> dict:
    """The process as JSON: its schedule's name when the name regenerates the betas, else the betas themselves."""
    betas = diffusion.tables["betas"]
    config = dict(schedule=diffusion.schedule, timesteps=diffusion.num_timesteps, variance=diffusion.variance,
                  clip_denoised=diffusion.clip_denoised)
    named = diffusion.schedule in _schedule.SCHEDULES and torch.equal(
        _schedule.beta_schedule(diffusion.schedule, diffusion.num_timesteps), betas)
    if not named:
        config["betas"] = betas.tolist()  # float64 round-trips through JSON exactly
    if not torch.equal(diffusion.timestep_map, torch.arange(diffusion.num_timesteps)):
        config["timestep_map"] = diffusion.timestep_map.tolist()
    return config


def diffusion_from_config(config: Mapping) -> Diffusion:
    unknown = sorted(set(config) - {"schedule", "timesteps", "variance", "clip_denoised", "betas", "timestep_map"})
    if unknown:
        raise ValueError(f"diffusion config: unknown keys {unknown}")
    if "betas" in config:
        diffusion = Diffusion(variance=config["variance"], betas=torch.tensor(config["betas"], dtype=torch.float64),
                              timestep_map=config.get("timestep_map"), clip_denoised=config["clip_denoised"])
        diffusion.schedule = config["schedule"]
        return diffusion
    return Diffusion(config["schedule"], config["timesteps"], config["variance"],
                     timestep_map=config.get("timestep_map"), clip_denoised=config["clip_denoised"])


def _tensors(state: Mapping) -> dict:
    """A state dict as safetensors stores it: contiguous CPU tensors that share no memory."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    """Write `text` and wait for it to reach the disk (before a rename makes it visible)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, value) -> None:
    _write_synced(path, json.dumps(value, indent=1))


def replace_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _write_synced(tmp, text)
    os.replace(tmp, path)


def _optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An optimizer's state dict split into its tensors (safetensors) and the rest (JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return _tensors(tensors), dict(param_groups=state["param_groups"], scalars=scalars)


def _optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return dict(state=state, param_groups=meta["param_groups"])


def save(directory, model: UNet, *, ema: Mapping | None = None, optimizer: torch.optim.Optimizer | None = None,
         step: int = 0, training: Mapping | None = None, data: Mapping | None = None,
         state: Mapping | None = None) -> Path:
    """Write a checkpoint folder at `directory` atomically (built as a temporary sibling, then renamed; an existing
    folder of that name is replaced: moved aside first and deleted only once the new one is in place, so that a
    crash in between leaves one of the two, which the next save or load puts back). Returns the folder.

    :param model: its weights, its config and its diffusion (Diffusion() if it has none) are saved.
    :param ema: the EMA weights (a state dict of the model's names), if any.
    :param optimizer, step, training, state: the training state (optimizer tensors, the step, the training
        settings, and any other JSON-able values), for resuming.
    :param data: how the data was read (image size, channels, scaling); DATA_SCALING is recorded always.
    """
    directory = Path(directory)
    _recover(directory)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    diffusion = model.diffusion if isinstance(model.diffusion, Diffusion) else Diffusion()
    config = dict(format=FORMAT, version=VERSION, unet=model.config, diffusion=diffusion_config(diffusion),
                  data={"scaling": DATA_SCALING, **(data or {})}, training=dict(training or {}))
    _write_json(tmp / "config.json", config)
    save_file(_tensors(model.state_dict()), tmp / "model.safetensors")
    if ema is not None:
        save_file(_tensors(ema), tmp / "ema.safetensors")
    if optimizer is not None or state is not None or step:
        meta = {"step": int(step), **dict(state or {})}
        if optimizer is not None:
            tensors, meta["optimizer"] = _optimizer_files(optimizer)
            save_file(tensors, tmp / "optimizer.safetensors")
        _write_json(tmp / "state.json", meta)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    _write_json(tmp / "manifest.json", manifest)
    aside = directory.with_name(f".{directory.name}.old{os.getpid()}")
    if directory.exists():  # (a folder cannot be renamed over a full one: aside first, removed after)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(directory, aside)
    os.replace(tmp, directory)
    shutil.rmtree(aside, ignore_errors=True)
    return directory


def _recover(directory: Path) -> None:
    """A checkpoint folder that a crash left moved aside (save's .NAME.old<pid>) goes back under its name, if the
    name is free."""
    if not directory.exists():
        aside = sorted(directory.parent.glob(f".{directory.name}.old*"))
        if aside:
            os.replace(aside[-1], directory)


def _checkpoint_folder(path) -> Path:
    """A checkpoint folder: `path` itself, or the one a run folder's `latest` names."""
    path = Path(path)
    _recover(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / "latest").is_file() and not (path / "config.json").exists():
        name = (path / "latest").read_text().strip()
        path = path / name
        _recover(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path.parent / 'latest'} names {name}, which does not exist")
    if not path.is_dir() or not (path / "manifest.json").is_file():
        raise ValueError(f"{path} is not a complete ddpm_fast checkpoint (no manifest.json: an unfinished or "
                         f"foreign folder)")
    return path


def verify(path) -> tuple[Path, dict]:
    """(folder, config) of a checkpoint after checking every file against its manifest and the config's format."""
    folder = _checkpoint_folder(path)
    manifest = read_json(folder / "manifest.json", "checkpoint manifest")
    for name, expected in manifest.items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{file} is missing (the manifest lists it)")
        if file.stat().st_size != expected["bytes"]:
            raise ValueError(f"{file} is truncated or changed: {file.stat().st_size} bytes, the manifest says "
                             f"{expected['bytes']}")
        if _sha256(file) != expected["sha256"]:
            raise ValueError(f"{file} is corrupted: its sha256 differs from the manifest's")
    config = read_json(folder / "config.json", "checkpoint config")
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(f"{folder / 'config.json'} is format {config.get('format')!r} version "
                         f"{config.get('version')!r}; this ddpm_fast reads {FORMAT!r} version {VERSION}")
    return folder, config


def load(path, *, weights: str | None = None, device=None) -> UNet:
    """The U-Net of a checkpoint, in eval mode, carrying its diffusion settings (so ddpm_fast.sample(load(path), n)
    needs nothing else).

    :param path: a checkpoint folder, or a training run's folder (its newest checkpoint).
    :param weights: "ema" (the default where the checkpoint has them) or "model" (the raw trained weights).
    :param device: where to put the model (default: the CPU).
    """
    device = checks.device(device if device is not None else "cpu")
    folder, config = verify(path)
    if weights not in (None, "ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    has_ema = (folder / "ema.safetensors").is_file()
    if weights == "ema" and not has_ema:
        raise ValueError(f"{folder} has no EMA weights (ema.safetensors); load weights='model'")
    file = folder / f"{weights or ('ema' if has_ema else 'model')}.safetensors"
    model = UNet(**config["unet"], diffusion=diffusion_from_config(config["diffusion"]))
    load_checked(model, read_state_dict(file))
    return model.to(device).eval()


def read_training_state(path, model: nn.Module, ema: dict | None, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load a checkpoint's weights into `model`, its EMA into `ema` (in place) and its optimizer state into
    `optimizer`, after verifying it; returns state.json (the step and the rest), config.json under "config"."""
    folder, config = verify(path)
    load_checked(model, read_state_dict(folder / "model.safetensors"))
    if ema is not None:
        saved = read_state_dict(folder / "ema.safetensors")
        if set(saved) != set(ema):
            raise ValueError(f"{folder / 'ema.safetensors'} does not hold the model's tensors")
        for name, value in saved.items():
            ema[name].copy_(value)
    state = read_json(folder / "state.json", "training state")
    if optimizer is not None:
        tensors = read_state_dict(folder / "optimizer.safetensors")
        optimizer.load_state_dict(_optimizer_state(tensors, state.pop("optimizer")))
    state["config"] = config
    return state
