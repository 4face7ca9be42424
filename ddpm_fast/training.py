"""Training: the paper's recipe (Adam 2e-4 with a linear warmup, gradient norm clipped at 1, EMA 0.9999, dropout,
random horizontal flips, uniform t, L_simple on the fused ops), checkpoints that survive a crash, and data-parallel
training under torchrun.

Every random draw is keyed (docs/design.md, "Random numbers"), never taken from a generator's running state: at
optimizer step s the global batch holds the data positions s*B .. s*B+B-1 of a permutation seeded by (seed, epoch),
and sample j of it gets its t (Philox stream 3), its flip (stream 5), its eps (stream 2) and its dropout masks
(stream 4) from (seed, j, s). So a run is a function of its seed and its settings: resuming replays the same steps,
and any number of processes (each taking its share of j) computes the same gradient as one.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import queue
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ddpm_fast import checkpoint, checks, precision
from ddpm_fast.data import load_images, to_model_range
from ddpm_fast.diffusion import OBJECTIVES, Diffusion
from ddpm_fast.ops import philox
from ddpm_fast.unet import UNet


@dataclasses.dataclass
class TrainConfig:
    """The settings of a run; the defaults are the paper's CIFAR-10 recipe.

    :param steps: optimizer steps in all (the paper: 800k for CIFAR-10).
    :param batch_size: the global batch: over every process and accumulation step (the paper: 128).
    :param lr: Adam's learning rate, reached by a linear warmup over `warmup` steps.
    :param grad_clip: the gradients' global norm is clipped to this (0: no clipping).
    :param ema_decay: the EMA of the weights: ema = decay * ema + (1 - decay) * weights, every step.
    :param flip: random horizontal flips. :param objective: "simple" (L_simple) or "vlb" (the true bound L).
    :param grad_accum: micro-batches per optimizer step and process.
    :param seed: the key of every random draw (and of the data order).
    :param precision: "auto" (bf16 autocast on a GPU, float32 on the CPU), "float32" or "bfloat16".
    :param checkpoint_every: steps between checkpoints (one is also written at the end, on Ctrl-C and on an error).
    :param keep: checkpoints kept (the newest). :param log_every: steps between lines of log.csv.
    """
    steps: int = 800_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 5000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    flip: bool = True
    objective: str = "simple"
    grad_accum: int = 1
    seed: int = 0
    precision: str = "auto"
    checkpoint_every: int = 5000
    keep: int = 2
    log_every: int = 100

    # settings a resumed run may change: they do not alter the math of a step
    RESUMABLE = ("steps", "checkpoint_every", "keep", "log_every")

    def check(self, world: int) -> None:
        problems = []

        def collect(check, *args, **kwargs):  # every problem at once, each in checks' words
            try:
                check(*args, **kwargs)
            except ValueError as error:
                problems.append(str(error))

        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep", "log_every"):
            collect(checks.positive_int, name, getattr(self, name))
        collect(checks.non_negative_int, "warmup", self.warmup)
        collect(checks.number, "lr", self.lr, low=0, low_open=True)
        collect(checks.number, "grad_clip", self.grad_clip, low=0)
        collect(checks.number, "ema_decay", self.ema_decay, low=0, high=1, high_open=True)
        collect(checks.flag, "flip", self.flip)
        collect(checks.choice, "objective", self.objective, OBJECTIVES)
        collect(checks.choice, "precision", self.precision, ("auto", "float32", "bfloat16"))
        checks.seed(self.seed)
        if not problems and self.batch_size % (world * self.grad_accum):
            problems.append(f"batch_size {self.batch_size} is not divisible by processes x grad_accum = "
                            f"{world} x {self.grad_accum}")
        if problems:
            raise ValueError("training settings: " + "; ".join(problems))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _settings(overrides: dict) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; the settings are {sorted(fields)}")
    return TrainConfig(**overrides)


def data_identity(images: torch.Tensor, source) -> dict:
    """What a run folder records of its data, so that a resume on other data is refused: the count, the shape, a
    SHA-256 of up to 256 images spread evenly over the set (all of a small set), and where they came from (the
    path, or "in memory")."""
    count = images.shape[0]
    picked = images[torch.linspace(0, count - 1, min(count, 256)).round().long()] if count else images
    return dict(images=int(count), shape=list(images.shape[1:]), scaling=checkpoint.DATA_SCALING,
                sample_sha256=hashlib.sha256(picked.contiguous().numpy().tobytes()).hexdigest(),
                source=str(Path(source).resolve()) if isinstance(source, (str, os.PathLike)) else "in memory")


def _differences(saved: dict, current: dict, keys) -> list[str]:
    """"key: saved -> current" for each of `keys` whose value changed (a key either lacks reads as None)."""
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def data_positions(step: int, batch_size: int, count: int, seed: int, permutations: dict) -> torch.Tensor:
    """The dataset indices of step `step`'s global batch: positions step*B .. step*B+B-1 of the endless sequence of
    per-epoch permutations (epoch e's: torch.randperm(count) from seed (seed, e))."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // count
    out = torch.empty(batch_size, dtype=torch.int64)
    for epoch in epochs.unique().tolist():
        if epoch not in permutations:
            permutations.clear()  # one epoch (or two, at a boundary) at a time
            gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
            permutations[epoch] = torch.randperm(count, generator=gen)
        mask = epochs == epoch
        out[mask] = permutations[epoch][positions[mask] % count]
    return out


class _Prefetcher:
    """Gathers the next micro-batches (uint8, from the in-memory dataset) in a background thread."""

    def __init__(self, images: torch.Tensor, batches, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(images, batches), daemon=True)
        self._thread.start()

    def _run(self, images, batches):
        try:
            for key, index in batches:
                if self._stop.is_set() or not self._put(
                        (key, images[index].pin_memory() if torch.cuda.is_available() else images[index])):
                    return
        except BaseException as error:  # surfaced in the training loop
            self._put(error)

    def _put(self, item) -> bool:
        """Queue `item`, waiting for room unless stopped; False if stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        """Stop and wait for the thread (one left running into interpreter shutdown aborts the process)."""
        self._stop.set()
        self._thread.join()


class Trainer:
    """Trains `model` on `data` (see train()). Attributes: model, ema (a state dict), optimizer, step, config."""

    def __init__(self, model: UNet, data, *, out=None, diffusion: Diffusion | None = None, device=None,
                 image_size: int | None = None, progress: bool = True, resume: bool = True, **settings):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a ddpm_fast.UNet, got {type(model).__name__}")
        self.owns_process_group = _init_distributed()  # (train() destroys a group it made; a Trainer's user does)
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.config = _settings(settings)
        self.config.check(self.world)
        self.diffusion = diffusion or (model.diffusion if isinstance(getattr(model, "diffusion", None), Diffusion)
                                       else Diffusion())
        model.diffusion = self.diffusion
        checks.flag("progress", progress)
        checks.flag("resume", resume)
        self.device = checks.device(device) if device is not None else (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
            if torch.cuda.is_available() else torch.device("cpu"))
        self.model = model.to(self.device).train()
        self.images = load_images(data, image_size=image_size, progress=progress and self.rank == 0)
        self.data_identity = data_identity(self.images, data)
        checks.image_shape(model, tuple(self.images.shape[1:]), "the data's images")
        if self.config.batch_size > len(self.images):
            raise ValueError(f"batch_size {self.config.batch_size} is larger than the data ({len(self.images)} "
                             f"images): every step would repeat images within its batch; use at most "
                             f"{len(self.images)}")
        self.out = Path(out) if out is not None else None
        self.progress = progress and self.rank == 0
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.lr)
        weights = self.model.state_dict()  # views of the parameters: updated in place by every step and load
        self.ema = {k: v.detach().clone().float() for k, v in weights.items()}
        self._ema_pairs = (list(self.ema.values()), list(weights.values()))
        self.step = 0
        self.losses: list[tuple[int, float]] = []  # (step, mean loss over the global batch) at every log line
        if resume and self.out is not None and (self.out / "latest").is_file():
            self._resume()

    # ------------------------------------------------------------------------------------------------ state
    def _resume(self) -> None:
        """Continue the run in self.out, which must be this run: the same settings (but RESUMABLE's), network,
        process and data, each compared before any weight is loaded."""
        _, config = checkpoint.verify(self.out)
        saved = config["training"]
        current = self.config.to_json()
        differ = _differences(saved, current, [k for k in current if k not in TrainConfig.RESUMABLE])
        if differ:
            raise ValueError(f"{self.out} holds a run with other settings ({'; '.join(differ)}); resume with its "
                             f"settings, or train into another folder")
        if config["unet"] != json.loads(json.dumps(self.model.config)):
            raise ValueError(f"{self.out} holds a run of another network: {config['unet']}")
        process = json.loads(json.dumps(checkpoint.diffusion_config(self.diffusion)))
        differ = _differences(config["diffusion"], process, sorted(set(process) | set(config["diffusion"])))
        if differ:
            raise ValueError(f"{self.out} holds a run of another diffusion process ({'; '.join(differ)[:300]}); "
                             f"resume with its diffusion=, or train into another folder")
        # (checkpoints written before the data's identity was recorded carry images and shape only)
        identity = json.loads(json.dumps(self.data_identity))
        differ = _differences(config["data"], identity, [k for k in identity if k in config["data"]])
        if differ:
            raise ValueError(f"{self.out} was trained on other data ({'; '.join(differ)}); resume with its data, or "
                             f"train into another folder")
        state = checkpoint.read_training_state(self.out, self.model, self.ema, self.optimizer)
        self.step = int(state["step"])

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0; the others have the same weights) and prune old ones."""
        if self.out is None or self.rank != 0:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        folder = checkpoint.save(
            self.out / f"step_{self.step:08d}", self.model, ema=self.ema, optimizer=self.optimizer, step=self.step,
            training=self.config.to_json(), data=self.data_identity)
        checkpoint.replace_atomically(self.out / "latest", folder.name + "\n")
        kept = sorted(p for p in self.out.glob("step_*") if p.is_dir())
        for old in kept[:-self.config.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def ema_model(self) -> UNet:
        """A copy of the network with the EMA weights, in eval mode, carrying the diffusion."""
        model = UNet(**self.model.config, diffusion=self.diffusion)
        model.load_state_dict(self.ema)
        return model.to(self.device).eval()

    # ------------------------------------------------------------------------------------------------ one step
    def _bf16(self) -> bool:
        """Whether the network runs under bf16 autocast ("auto": on a GPU, not on the CPU)."""
        asked = self.config.precision
        return asked == "bfloat16" or (asked == "auto" and self.device.type == "cuda")

    def _micro_batches(self, first_step: int):
        """(step, micro, sample indices j in the global batch) -> dataset indices, for this process, from
        first_step on."""
        cfg = self.config
        local = cfg.batch_size // self.world
        micro = local // cfg.grad_accum
        permutations: dict = {}
        for step in range(first_step, cfg.steps):
            positions = data_positions(step, cfg.batch_size, self.images.shape[0], cfg.seed, permutations)
            for m in range(cfg.grad_accum):
                j = torch.arange(self.rank * local + m * micro, self.rank * local + (m + 1) * micro)
                yield (step, m, j), positions[j]

    def _loss(self, network, images_u8: torch.Tensor, j: torch.Tensor, step: int) -> torch.Tensor:
        """Per-sample losses of micro-batch j (indices in the global batch) at optimizer step `step`."""
        cfg, device = self.config, self.device
        x0 = to_model_range(images_u8.to(device, non_blocking=True))
        j = j.to(device)
        steps = torch.full_like(j, step)
        if cfg.flip:
            flip = (philox.words(j, steps, seed=cfg.seed, stream=philox.STREAM_FLIP)[:, 0] & 1).bool()
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = philox.words(j, steps, seed=cfg.seed, stream=philox.STREAM_TRAIN_T)[:, 0] % self.diffusion.num_timesteps
        keys = (cfg.seed, j, step)
        run = precision.Autocast(network, device.type, torch.bfloat16, enabled=self._bf16(), cache_enabled=True)

        def eps_model(x, timesteps):
            return run(x, timesteps, dropout_keys=keys)

        return self.diffusion.training_loss(eps_model, x0, t, reduction="none", seed=cfg.seed, step=step,
                                            sample_index=j, objective=cfg.objective)

    def _update(self) -> torch.Tensor:
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip
                else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            targets, sources = self._ema_pairs
            torch._foreach_lerp_(targets, [t.float() for t in sources], 1.0 - cfg.ema_decay)
        return norm

    # ------------------------------------------------------------------------------------------------ the run
    def run(self, until: int | None = None) -> "Trainer":
        """Train to step `until` (default: the configured steps), then save."""
        cfg = self.config
        until = cfg.steps if until is None else min(int(until), cfg.steps)
        if self.step >= until:
            return self
        network = self.model
        if self.world > 1:
            network = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        log = self._open_log()
        prefetch = _Prefetcher(self.images, self._micro_batches(self.step))
        bar = self._bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step",
                               disable=not self.progress, dynamic_ncols=True)
        interrupted = _InterruptFlag()
        loss_sum = torch.zeros((), device=self.device)
        self._log_time, self._log_step = time.perf_counter(), self.step
        try:
            with interrupted:
                while self.step < until:
                    for m in range(cfg.grad_accum):
                        (step, micro, j), images = prefetch.get()
                        assert step == self.step and micro == m
                        last = m == cfg.grad_accum - 1
                        sync = network.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
                        with sync:
                            losses = self._loss(network, images, j, step)
                            # sum / B: the global mean once DDP averages over the processes
                            (losses.sum() * (self.world / cfg.batch_size)).backward()
                        loss_sum += losses.detach().sum()
                    norm = self._update()
                    self.step += 1
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == until:
                        self._log(log, loss_sum, norm)
                        loss_sum.zero_()
                    if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                        self.save()
                    if self._any(interrupted.fired):  # every process stops after the same step
                        raise KeyboardInterrupt
        finally:
            prefetch.close()
            bar.close()
            if log is not None:
                log[0].close()
            self.save()  # at the end, on Ctrl-C, on an error: the state of the last finished step
        return self

    def _open_log(self):
        if self.out is None or self.rank != 0:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "log.csv"
        rows = []
        if path.is_file():  # a resumed run: keep the lines of the steps it keeps
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if r and int(r[0]) <= self.step]
        f = open(path, "w", newline="")
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr", "grad_norm", "steps_per_s"])
        writer.writerows(rows)
        f.flush()
        return f, writer

    def _any(self, flag: bool) -> bool:
        """Whether `flag` is set on any process."""
        if self.world == 1:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _log(self, log, loss_sum, norm) -> None:
        cfg = self.config
        total = loss_sum.clone()
        if self.world > 1:
            dist.all_reduce(total)
        steps, self._log_step = self.step - self._log_step, self.step  # since the last line (or the run's start)
        loss = total.item() / (steps * cfg.batch_size)
        self.losses.append((self.step, loss))
        now = time.perf_counter()
        rate, self._log_time = steps / max(now - self._log_time, 1e-9), now
        if self.progress:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        lr = self.optimizer.param_groups[0]["lr"]
        if log is not None:
            log[1].writerow([self.step, f"{loss:.6f}", f"{lr:.3e}", f"{float(norm):.4f}", f"{rate:.3f}"])
            log[0].flush()


def _init_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment) join the process group: NCCL with a GPU, gloo without,
    unless the caller has already. Whether this call made it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True
    return False


class _InterruptFlag:
    """Within the block, Ctrl-C (SIGINT) sets .fired and the loop stops after the step in progress."""

    def __init__(self):
        self.fired = False

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            self._previous = None
            return self
        self._previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.fired:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.fired = True

        signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def train(model: UNet, data, *, out=None, diffusion: Diffusion | None = None, device=None,
          image_size: int | None = None, progress: bool = True, resume: bool = True, **settings) -> Trainer:
    """Train `model` (a ddpm_fast.UNet) on `data` with the paper's recipe; returns the Trainer (its .model, .ema,
    .ema_model(), .losses).

    :param data: images: a folder of PNG/JPEG, CIFAR-10's python batches, an .npz, or a uint8 array (data.py).
    :param out: the run's folder: checkpoints every `checkpoint_every` steps and at the end (also on Ctrl-C or an
        error), log.csv; a folder holding a run resumes it (resume=False refuses to).
    :param diffusion: the process (default: the model's, else Diffusion()); saved with the checkpoints.
    :param settings: TrainConfig's fields (steps, batch_size, lr, warmup, grad_clip, ema_decay, flip, objective,
        grad_accum, seed, precision, checkpoint_every, keep, log_every).
    Under torchrun (torch.distributed initialised) each process trains its share of every global batch (DDP); a
    process group that train() made for it is destroyed when it returns (torch asks for that before a process exits:
    gloo's threads can abort an exit that finds the group alive).
    """
    if not resume and out is not None and (Path(out) / "latest").is_file():
        raise ValueError(f"{out} already holds a run; pass resume=True to continue it or choose another folder")
    trainer = Trainer(model, data, out=out, diffusion=diffusion, device=device, image_size=image_size,
                      progress=progress, resume=resume, **settings)
    try:
        return trainer.run()
    finally:
        if trainer.owns_process_group:
            dist.destroy_process_group()

