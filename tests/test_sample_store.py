"""sample(..., out=PATH): the streamed images are the in-memory run's; a run killed (a real process, SIGKILL) and
started again writes what an uninterrupted run writes, and rewrites nothing; two processes under torchrun write what
one writes; a folder from other arguments is refused."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ddpm_fast
from ddpm_fast import Diffusion
from ddpm_fast.data import load_images
from ddpm_fast.sample_store import read_samples
from helpers import random_tiny_unet, run_torchrun

N, BATCH = 10, 4  # three aligned batches, the last one short


def tiny(seed=0, timesteps=10):
    return random_tiny_unet(channels=3, timesteps=timesteps, seed=seed)


def files(folder) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of every image file: a rewritten file gets a new inode (written and renamed)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(folder).iterdir()
            if p.suffix in (".png", ".npz")}


@pytest.mark.parametrize("out_format", ["png", "npz"])
def test_streamed_images_are_the_in_memory_runs(tmp_path, out_format):
    model = tiny()
    in_memory = ddpm_fast.to_uint8(ddpm_fast.sample(model, N, batch_size=BATCH, seed=3, progress=False))
    out = ddpm_fast.sample(model, N, batch_size=BATCH, seed=3, out=tmp_path / "s", out_format=out_format,
                           progress=False)
    assert out == tmp_path / "s"
    assert torch.equal(read_samples(out), in_memory)
    names = sorted(files(out))
    assert names == ([f"{i:06d}.png" for i in range(N)] if out_format == "png"
                     else [f"batch_{b:06d}.npz" for b in range(3)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["batch_size"] == BATCH and manifest["seed"] == 3 and manifest["model"].startswith("sha256:")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert torch.equal(load_images(out, progress=False), in_memory)  # data too: for fid(), nll(), train()


def test_a_finished_folder_is_continued_not_rewritten(tmp_path):
    """Lost files (a whole batch, and part of another) are written again, equal to the first run's; the rest are
    not touched; the batch size comes from the folder."""
    model = tiny()
    out = ddpm_fast.sample(model, N, batch_size=BATCH, seed=3, out=tmp_path / "s", progress=False)
    first = read_samples(out)
    for name in ("000000.png", "000001.png", "000002.png", "000003.png", "000005.png"):
        (out / name).unlink()
    kept = files(out)
    ddpm_fast.sample(model, N, seed=3, out=out, progress=False)  # no batch_size: the folder's
    after = files(out)
    assert {k: after[k] for k in kept} == kept and len(after) == N
    assert torch.equal(read_samples(out), first)


KILL_SCRIPT = """
import sys, time, ddpm_fast
sys.path.insert(0, {tests!r})
from test_sample_store import tiny
model = tiny(timesteps=20)
slow = lambda x, t: (time.sleep(0.02), model(x, t))[1]  # ~0.5 s per batch: time to kill it mid-run
ddpm_fast.sample(slow, 24, batch_size=2, seed=5, shape=(3, 8, 8), diffusion=model.diffusion, out={out!r},
                 progress=False)
"""


@pytest.mark.slow
def test_a_killed_run_started_again_writes_what_an_uninterrupted_run_writes(tmp_path):
    script = tmp_path / "run.py"
    out = tmp_path / "s"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    process = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and len(files(out) if out.is_dir() else {}) < 5 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    before = files(out)
    assert 5 <= len(before) < 24, f"killed with {len(before)} images written"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    after = files(out)
    assert len(after) == 24 and {k: after[k] for k in before} == before  # nothing written twice
    model = tiny(timesteps=20)
    expected = ddpm_fast.sample(model, 24, batch_size=2, seed=5, progress=False)
    assert torch.equal(read_samples(out), ddpm_fast.to_uint8(expected))


TORCHRUN_SCRIPT = """
import sys, ddpm_fast
sys.path.insert(0, {tests!r})
from test_sample_store import tiny, N, BATCH
ddpm_fast.sample(tiny(), N, batch_size=BATCH, seed=3, out={out!r}, progress=False)
"""


@pytest.mark.slow
def test_two_processes_under_torchrun_write_what_one_writes(tmp_path):
    """Ranks take whole aligned batches (rank 0: 0 and 2, rank 1: 1) and write into one folder; one manifest."""
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "two")))
    result = run_torchrun(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    one = ddpm_fast.sample(tiny(), N, batch_size=BATCH, seed=3, out=tmp_path / "one", progress=False)
    assert torch.equal(read_samples(tmp_path / "two"), read_samples(one))
    assert (tmp_path / "two" / "manifest.json").read_text() == (one / "manifest.json").read_text()


def test_a_folder_from_other_arguments_is_refused(tmp_path):
    model = tiny()
    out = ddpm_fast.sample(model, N, batch_size=BATCH, seed=3, out=tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="other arguments.*seed: the folder's 3, now 4"):
        ddpm_fast.sample(model, N, seed=4, out=out, progress=False)
    with pytest.raises(ValueError, match="batch_size: the folder's 4, now 5"):
        ddpm_fast.sample(model, N, batch_size=5, seed=3, out=out, progress=False)
    with pytest.raises(ValueError, match="model: the folder's 'sha256"):
        ddpm_fast.sample(tiny(seed=1), N, seed=3, out=out, progress=False)
    with pytest.raises(ValueError, match="diffusion"):
        ddpm_fast.sample(model, N, seed=3, out=out, steps=5, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "cat.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no manifest.json"):
        ddpm_fast.sample(model, N, out=foreign, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        ddpm_fast.sample(model, N, out=tmp_path / "file", progress=False)
    with pytest.raises(ValueError, match="cannot be combined with out="):
        ddpm_fast.sample(model, N, out=tmp_path / "x", return_intermediates=2, progress=False)
    with pytest.raises(ValueError, match="out_format must be one of png, npz"):
        ddpm_fast.sample(model, N, out=tmp_path / "x", out_format="jpg", progress=False)
    with pytest.raises(ValueError, match="grey or RGB"):
        ddpm_fast.sample(lambda x, t: x, 2, shape=(2, 4, 4), out=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="unfinished: 1 of 10"):
        (out / "000007.png").unlink()
        read_samples(out)


def test_a_batch_that_goes_non_finite_is_not_written(tmp_path):
    class NaNInSecondBatch:
        """eps = 0.1 x, NaN in every call of the second batch (calls 10..19 with T = 10)."""
        calls = 0

        def __call__(self, x, t):
            self.calls += 1
            return x * (float("nan") if 10 < self.calls <= 20 else 0.1)

    with pytest.raises(FloatingPointError, match="images 4..7"):
        ddpm_fast.sample(NaNInSecondBatch(), N, batch_size=BATCH, shape=(3, 8, 8), diffusion=Diffusion(timesteps=10),
                         out=tmp_path / "s", progress=False)
    assert sorted(files(tmp_path / "s")) == [f"{i:06d}.png" for i in range(4)]
