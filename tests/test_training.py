"""Training: the recipe's pieces, keyed randomness (resume replays the same steps; two processes under torchrun equal
one), checkpoints (atomic, verified, refused when damaged), Ctrl-C, and load() -> sample()."""
import copy
import csv
import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ddpm_fast
from ddpm_fast import Diffusion, UNet
from ddpm_fast.training import TrainConfig, data_positions
from helpers import run_torchrun

DATA = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
SETTINGS = dict(batch_size=8, warmup=2, log_every=1, checkpoint_every=3, progress=False)


def tiny(seed=0):
    torch.manual_seed(seed)
    return UNet(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                dropout=0.1, num_groups=4, diffusion=Diffusion(timesteps=50))


def read_log(out):
    with open(Path(out) / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_papers_recipe_is_the_default():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.warmup, cfg.grad_clip, cfg.ema_decay, cfg.batch_size, cfg.flip, cfg.objective) == \
        (2e-4, 5000, 1.0, 0.9999, 128, True, "simple")


def test_one_step_is_the_recipe_written_out(tmp_path):
    """Step 0 by hand: the keyed t, flips and eps, L_simple, Adam at lr/warmup, the clipped gradient, the EMA."""
    model = tiny()
    start = copy.deepcopy(model)
    trainer = ddpm_fast.train(model, DATA, steps=1, batch_size=8, warmup=4, grad_clip=0.05, ema_decay=0.9,
                              progress=False)
    from ddpm_fast.ops import philox
    j = torch.arange(8)
    steps = torch.zeros(8, dtype=torch.int64)
    x0 = DATA[data_positions(0, 8, 40, 0, {})].float() / 127.5 - 1
    flip = (philox.words(j, steps, seed=0, stream=philox.STREAM_FLIP)[:, 0] & 1).bool()
    assert 0 < flip.sum() < 8
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    t = philox.words(j, steps, seed=0, stream=philox.STREAM_TRAIN_T)[:, 0] % 50
    eps = philox.randn(j, steps, (1, 8, 8), seed=0, stream=philox.STREAM_TRAIN_EPS)
    d = start.diffusion
    abar = d.tables["alphas_cumprod"][t].float()[:, None, None, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    start.train()
    loss = ((start(x_t, t, dropout_keys=(0, j, 0)) - eps) ** 2).mean()
    loss.backward()
    params = list(start.parameters())
    torch.nn.utils.clip_grad_norm_(params, 0.05)
    optimizer = torch.optim.Adam(params, lr=2e-4 / 4)
    optimizer.step()
    for (name, got), expected in zip(trainer.model.named_parameters(), params):
        assert torch.allclose(got, expected, atol=1e-6), name
    before = tiny().state_dict()
    for name, value in trainer.ema.items():
        assert torch.allclose(value, 0.9 * before[name] + 0.1 * trainer.model.state_dict()[name], atol=1e-6)
    assert trainer.losses == [(1, pytest.approx(loss.item(), rel=1e-5))]


def test_resume_replays_the_same_steps(tmp_path):
    whole = ddpm_fast.train(tiny(), DATA, out=tmp_path / "a", steps=6, **SETTINGS)
    first = ddpm_fast.train(tiny(), DATA, out=tmp_path / "b", steps=3, **SETTINGS)
    rest = ddpm_fast.train(tiny(seed=7), DATA, out=tmp_path / "b", steps=6, **SETTINGS)  # its init is replaced
    assert whole.losses == first.losses + rest.losses
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, rest.model.state_dict()[name]), name
    assert all(torch.equal(whole.ema[k], rest.ema[k]) for k in whole.ema)
    assert [r["loss"] for r in read_log(tmp_path / "a")] == [r["loss"] for r in read_log(tmp_path / "b")]
    assert sorted(p.name for p in (tmp_path / "b").glob("step_*")) == ["step_00000003", "step_00000006"]  # keep=2
    assert (tmp_path / "b" / "latest").read_text().strip() == "step_00000006"
    # the saved run samples with nothing else: its EMA weights and its diffusion
    model = ddpm_fast.load(tmp_path / "b")
    assert model.diffusion.num_timesteps == 50 and not model.training
    assert all(torch.equal(v, whole.ema[k]) for k, v in model.state_dict().items())
    assert torch.equal(ddpm_fast.load(tmp_path / "b", weights="model").state_dict()["conv_in.weight"],
                       whole.model.state_dict()["conv_in.weight"])
    images = ddpm_fast.sample(model, 2, progress=False)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_accumulation_gives_the_same_step():
    one = ddpm_fast.train(tiny(), DATA, steps=3, **SETTINGS)
    four = ddpm_fast.train(tiny(), DATA, steps=3, grad_accum=4, **SETTINGS)
    for name, value in one.model.state_dict().items():
        assert torch.allclose(value, four.model.state_dict()[name], atol=1e-6), name
    assert [s for s, _ in one.losses] == [s for s, _ in four.losses]
    assert [v for _, v in one.losses] == pytest.approx([v for _, v in four.losses], rel=1e-5)


def test_the_bound_objective_and_bf16_autocast_train():
    """objective="vlb" (T x the bound's term at t) and precision="bfloat16" (autocast; on a GPU "auto" picks it):
    finite losses, float32 weights that moved."""
    for settings in (dict(objective="vlb"), dict(precision="bfloat16")):
        start = tiny()
        trainer = ddpm_fast.train(copy.deepcopy(start), DATA, steps=2, **SETTINGS, **settings)
        assert all(math.isfinite(loss) for _, loss in trainer.losses), settings
        weights = trainer.model.state_dict()
        assert all(v.dtype == torch.float32 for v in weights.values())
        assert not torch.equal(weights["conv_in.weight"], start.state_dict()["conv_in.weight"]), settings
    vlb = ddpm_fast.train(tiny(), DATA, steps=1, **SETTINGS, objective="vlb").losses[0][1]
    assert vlb != pytest.approx(ddpm_fast.train(tiny(), DATA, steps=1, **SETTINGS).losses[0][1])  # another loss


@pytest.mark.gpu
def test_one_cifar10_step_on_cuda_in_bf16_is_the_cpus_float32_step():
    """The paper's network (cifar10 preset) takes one step of the recipe on the GPU, where precision "auto" is bf16
    autocast, and on the CPU in float32, from the same weights and keys (t, eps, flips, dropout): the GPU's network
    ran in bf16, its loss is the CPU's within bf16 rounding, and its weights are float32, finite, and moved as the
    CPU's did (Adam's first step is about lr x the gradient's sign; bf16 autocast against float32 on the CPU gave
    a cosine of 0.98 between the two moves). Weights ~N(0, 0.05), GroupNorm gains ~1: with the paper's zero output
    conv the loss would be mean(eps^2) whatever the network computes."""
    from ddpm_fast.unet import GroupNorm

    torch.manual_seed(0)
    start = UNet.from_preset("cifar10")
    with torch.no_grad():
        for p in start.parameters():
            p.normal_(0, 0.05)
        for module in start.modules():
            if isinstance(module, GroupNorm):
                module.weight.add_(1)
    data = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    settings = dict(steps=1, batch_size=4, warmup=1, log_every=1, progress=False)
    on_gpu, dtypes = copy.deepcopy(start), set()
    on_gpu.conv_in.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    gpu = ddpm_fast.train(on_gpu, data, device="cuda", **settings)
    cpu = ddpm_fast.train(copy.deepcopy(start), data, device="cpu", **settings)
    assert dtypes == {torch.bfloat16}
    assert math.isfinite(gpu.losses[0][1]) and gpu.losses[0][1] == pytest.approx(cpu.losses[0][1], rel=2e-2)
    before, after_gpu, after_cpu = (dict(m.named_parameters()) for m in (start, gpu.model, cpu.model))
    for name, value in after_gpu.items():
        assert value.is_cuda and value.dtype == torch.float32 and torch.isfinite(value).all(), name
    moved_gpu, moved_cpu = (torch.cat([(after[k].detach().cpu() - before[k].detach()).flatten() for k in before])
                            for after in (after_gpu, after_cpu))
    assert moved_gpu.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(moved_gpu, moved_cpu, dim=0) > 0.9


TORCHRUN_SCRIPT = """
import sys, torch, ddpm_fast
sys.path.insert(0, {tests!r})
from test_training import DATA, SETTINGS, tiny
torch.set_num_threads(1)
trainer = ddpm_fast.train(tiny(), DATA, out={out!r}, steps=4, **SETTINGS)
if trainer.rank == 0:
    torch.save(dict(trainer.model.state_dict()), {out!r} + "/final.pt")
"""


@pytest.mark.slow
def test_two_processes_under_torchrun_equal_one(tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo): the weights after 4 steps equal one process's, same batch."""
    one = ddpm_fast.train(tiny(), DATA, steps=4, **SETTINGS)
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "two")))
    result = run_torchrun(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "final.pt")
    moved = max((one.model.state_dict()[k] - tiny().state_dict()[k]).abs().max() for k in two)
    assert moved > 1e-4
    for name, value in two.items():
        assert torch.allclose(value, one.model.state_dict()[name], atol=1e-6), name
    assert [float(r["loss"]) for r in read_log(tmp_path / "two")] == pytest.approx([l for _, l in one.losses],
                                                                                  rel=1e-5)


CTRL_C_SCRIPT = """
import sys, torch, ddpm_fast
sys.path.insert(0, {tests!r})
from test_training import DATA, tiny
ddpm_fast.train(tiny(), DATA, out={out!r}, steps=100000, batch_size=8, log_every=1, checkpoint_every=100000,
                progress=False)
"""


def test_ctrl_c_saves_the_last_finished_step(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(CTRL_C_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "run")))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=tmp_path)
    log = tmp_path / "run" / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and b"KeyboardInterrupt" in stderr
    state = json.loads((tmp_path / "run" / (tmp_path / "run" / "latest").read_text().strip() / "state.json")
                       .read_text())
    logged = read_log(tmp_path / "run")
    assert state["step"] == int(logged[-1]["step"]) >= 3
    resumed = ddpm_fast.train(tiny(), DATA, out=tmp_path / "run", steps=state["step"] + 1, batch_size=8,
                              log_every=1, progress=False)
    assert resumed.losses[0][0] == state["step"] + 1


def test_bad_settings_and_runs_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['learning_rate'\]"):
        ddpm_fast.train(tiny(), DATA, learning_rate=1e-3)
    with pytest.raises(ValueError, match="batch_size 8 is not divisible by processes x grad_accum = 1 x 3"):
        ddpm_fast.train(tiny(), DATA, batch_size=8, grad_accum=3)
    with pytest.raises(ValueError, match="objective must be one of simple, vlb"):
        ddpm_fast.train(tiny(), DATA, objective="l1")
    with pytest.raises(ValueError, match=r"the data's images: \(3, 8, 8\), but the model takes \(1, 8, 8\)"):
        ddpm_fast.train(tiny(), torch.zeros(4, 3, 8, 8, dtype=torch.uint8))
    ddpm_fast.train(tiny(), DATA, out=tmp_path, steps=1, **SETTINGS)
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 8 -> 4\)"):
        ddpm_fast.train(tiny(), DATA, out=tmp_path, steps=2, **{**SETTINGS, "batch_size": 4})
    with pytest.raises(ValueError, match="already holds a run"):
        ddpm_fast.train(tiny(), DATA, out=tmp_path, steps=2, resume=False, **SETTINGS)


def test_a_resume_with_another_process_or_other_data_is_refused_before_loading(tmp_path):
    """The run folder records the diffusion process and the data's identity (count, shape, a hash of a sample,
    where it came from, scaling): a resume with any changed is refused naming it, and the model is left as it
    was (nothing loaded)."""
    ddpm_fast.train(tiny(), DATA, out=tmp_path, steps=1, **SETTINGS)
    recorded = json.loads((tmp_path / "step_00000001" / "config.json").read_text())["data"]
    assert set(recorded) >= {"images", "shape", "sample_sha256", "source", "scaling"}
    assert recorded["source"] == "in memory" and recorded["images"] == 40
    other = tiny()
    other.diffusion = Diffusion(timesteps=50, variance="fixed_small")
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"another diffusion process \(variance: 'fixed_large' -> 'fixed_small'\)"):
        ddpm_fast.train(other, DATA, out=tmp_path, steps=2, **SETTINGS)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    changed = DATA.clone()
    changed[0, 0, 0, 0] ^= 1
    with pytest.raises(ValueError, match=r"other data \(sample_sha256: "):
        ddpm_fast.train(tiny(), changed, out=tmp_path, steps=2, **SETTINGS)
    with pytest.raises(ValueError, match=r"other data \(images: 40 -> 39; sample_sha256"):
        ddpm_fast.train(tiny(), DATA[:39], out=tmp_path, steps=2, **SETTINGS)
    assert ddpm_fast.train(tiny(), DATA, out=tmp_path, steps=2, **SETTINGS).step == 2  # the same run resumes


def test_resaving_a_step_survives_a_crash_between_the_two_renames(tmp_path, monkeypatch):
    """Saving a step's checkpoint again (a resumed run's last step, export) moves the old folder aside and puts the
    new one in; a crash between the two leaves the old folder aside, and the next load or save puts it back."""
    from ddpm_fast import checkpoint

    model = tiny()
    folder = checkpoint.save(tmp_path / "step_00000001", model, step=1)
    real_replace = checkpoint.os.replace

    def crash_on_the_new_folder(src, dst):
        if ".tmp" in Path(src).name:
            raise OSError("killed between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_the_new_folder)
    with pytest.raises(OSError, match="killed"):
        checkpoint.save(folder, tiny(seed=3), step=1)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert not folder.exists() and list(tmp_path.glob(".step_00000001.old*"))
    loaded = ddpm_fast.load(folder)  # put back, the old weights
    assert folder.is_dir() and not list(tmp_path.glob(".step_00000001.old*"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    checkpoint.save(folder, tiny(seed=3), step=1)  # and a save after it completes
    assert torch.equal(ddpm_fast.load(folder).state_dict()["conv_in.weight"], tiny(seed=3).state_dict()["conv_in.weight"])


def test_damaged_checkpoints_are_refused(tmp_path):
    ddpm_fast.train(tiny(), DATA, out=tmp_path / "run", steps=1, **SETTINGS)
    folder = tmp_path / "run" / "step_00000001"
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ddpm_fast.load(tmp_path / "absent")
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated or changed: \d+ bytes, the manifest says"):
        ddpm_fast.load(folder)
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ValueError, match="model.safetensors is corrupted: its sha256 differs"):
        ddpm_fast.load(folder, weights="model")
    weights.write_bytes(original)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "version": 99}))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["config.json"] = {"bytes": (folder / "config.json").stat().st_size,
                               "sha256": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version 99; this ddpm_fast reads 'ddpm_fast' version 1"):
        ddpm_fast.load(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ValueError, match="not a complete ddpm_fast checkpoint"):
        ddpm_fast.load(folder)


def test_an_unfinished_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A crash while writing (here: safetensors failing on the EMA file) leaves `latest` and its folder whole."""
    trainer = ddpm_fast.Trainer(tiny(), DATA, out=tmp_path, steps=2, **SETTINGS)
    trainer.save()
    import safetensors.torch

    def broken(tensors, path, *args, **kwargs):
        if str(path).endswith("ema.safetensors"):
            raise OSError("disk full")
        return original(tensors, path, *args, **kwargs)

    original = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    trainer.step = 1
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert (tmp_path / "latest").read_text().strip() == "step_00000000"
    assert not (tmp_path / "step_00000001").exists()
    ddpm_fast.load(tmp_path)  # verified whole
