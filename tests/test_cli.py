"""The command line: every subcommand on a tiny checkpoint (T = 20, so the bound's T terms are quick), the bundled
model by default, training then sampling from the run, and one line on stderr for a bad argument or a missing file.
In process (cli.main), but for one run of the installed `python -m ddpm_fast` entry point."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast import bundled, checkpoint, cli
from ddpm_fast.sample_store import read_samples
from helpers import random_tiny_unet


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return str(checkpoint.save(tmp_path_factory.mktemp("ckpt") / "tiny", random_tiny_unet()))


def run(capsys, *args):
    code = cli.main([*args])
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_uses_the_bundled_model_by_default(tmp_path, capsys):
    code, out, err = run(capsys, "sample", "-n", "4", "--steps", "5", "-o", str(tmp_path / "s.png"), "--quiet")
    assert code == 0, err
    assert "wrote 4 samples" in out and "ddpm, 5 steps" in out
    assert Image.open(tmp_path / "s.png").size == (8 * (2 + 2 * 10),) * 2  # 8x8 digits, 2 px apart, enlarged 8x


def test_every_evaluation_subcommand_writes_its_output(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "data.npz"
    np.savez(data, x=bundled.digits("held_out")[0][:6].numpy())
    code, out, err = run(capsys, "nll", "--model", tiny_checkpoint, "--data", str(data), "--quiet")
    assert code == 0, err
    assert "bits/dim over 6 images" in out
    code, out, err = run(capsys, "rate-distortion", "--model", tiny_checkpoint, "--limit", "4", "-o",
                         str(tmp_path / "rd"), "--quiet")  # the bundled held-out digits
    assert code == 0, err
    with open(tmp_path / "rd" / "rate_distortion.csv") as f:
        assert len(list(csv.reader(f))) == 21
    assert (tmp_path / "rd" / "rate_distortion.png").is_file()
    code, out, err = run(capsys, "interpolate", "--model", tiny_checkpoint, "--pairs", "2", "--t", "10",
                         "--lambdas", "3", "-o", str(tmp_path / "i.png"), "--quiet")
    assert code == 0, err
    assert Image.open(tmp_path / "i.png").size == (8 * (2 + 5 * 10), 8 * (2 + 2 * 10))  # x0, 3 mixes, x0'; 2 rows
    code, out, err = run(capsys, "progressive", "--model", tiny_checkpoint, "-n", "3", "--every", "5", "-o",
                         str(tmp_path / "p.png"), "--quiet")
    assert code == 0, err
    assert "t = 20, 15, 10, 5, 1" in out
    assert Image.open(tmp_path / "p.png").size == (8 * (2 + 6 * 10), 8 * (2 + 3 * 10))
    code, out, err = run(capsys, "quality", "--model", tiny_checkpoint, "-n", "8", "--epochs", "1", "--quiet")
    assert code == 0, err
    assert "8 samples (ddpm, 20 steps" in out and "confidently classified" in out
    code, out, err = run(capsys, "sample", "--model", tiny_checkpoint, "-n", "3", "--out", str(tmp_path / "f"),
                         "--format", "npz", "--quiet")
    assert code == 0, err
    assert read_samples(tmp_path / "f").shape == (3, 1, 8, 8)


def test_train_then_sample_from_the_run(tmp_path, capsys):
    data = tmp_path / "data.npz"
    np.savez(data, x=bundled.digits("train")[0][:32].numpy())
    code, out, err = run(capsys, "train", "--data", str(data), "--preset", "digits", "--out", str(tmp_path / "run"),
                         "--steps", "2", "--batch-size", "8", "--no-flip", "--quiet")
    assert code == 0, err
    assert "trained digits to step 2" in out
    code, out, err = run(capsys, "sample", "--model", str(tmp_path / "run"), "-n", "2", "--steps", "2", "-o",
                         str(tmp_path / "s.png"), "--quiet")
    assert code == 0, err
    code, out, err = run(capsys, "export", str(tmp_path / "run"), str(tmp_path / "model"))
    assert code == 0, err
    exported, trained = checkpoint.load(tmp_path / "model"), checkpoint.load(tmp_path / "run", weights="ema")
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), trained.state_dict().values()))
    assert not (tmp_path / "model" / "ema.safetensors").exists()


def test_bench_and_info(tiny_checkpoint, capsys):
    code, out, err = run(capsys, "bench", "--model", tiny_checkpoint, "-n", "2", "--steps", "2", "--rounds", "1",
                         "--backends", "reference,cpp")  # (triton's CPU interpreter: slow, tested elsewhere)
    assert code == 0, err
    assert "reference" in out and "cpp" in out and "ms/step" in out
    code, out, err = run(capsys, "info")
    assert code == 0, err
    for name in ("reference", "cpp", "triton", "bundled model digits", "network dtype on cpu (sample's default): "):
        assert name in out
    from ddpm_fast.precision import default_network_dtype
    dtype, why = default_network_dtype("cpu")
    assert f"network dtype on cpu (sample's default): {str(dtype).removeprefix('torch.')}: {why}" in out


@pytest.mark.parametrize("args, message", [
    (["sample", "-n", "0"], "argument -n: must be a positive int"),
    (["sample", "--model", "no/such/run"], "no model at no/such/run"),
    (["sample", "--steps", "5000"], "steps must be an int in [1, 1000]"),
    (["nll", "--data", "no/such/images"], "no data at no/such/images"),
    (["train", "--data", "digits"], "the following arguments are required: --out"),
    (["interpolate", "--pairs", "1000"], "needs 2000 images; the data have 299"),
    (["quality", "--data", "cifar-10-batches-py"], "quality needs labelled training images"),
    (["interpolate", "--lambdas", "1"], "--lambdas must be at least 2"),
    (["nll", "--data", "digits:test"], "split must be one of train, held_out, all"),
])
def test_a_bad_argument_is_one_line(args, message, tmp_path, capsys):
    try:
        code = cli.main([*args, "--quiet"] if args[0] != "train" else args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_the_installed_entry_point_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DDPM_FAST_REQUIRE"}
    done = subprocess.run([sys.executable, "-m", "ddpm_fast", "sample", "-n", "2", "--steps", "2", "-o",
                           str(tmp_path / "s.png"), "--quiet"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 samples" in done.stdout
