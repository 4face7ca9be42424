"""bench/gpu_check.sh, the one script run on a rented GPU machine, executed here in its --dry-run form (every stage
at tiny sizes on the CPU against the installed build) so that it cannot rot between the rare GPU runs
(DESIGN.md, "Testing without a GPU"). The dry run's test stage never runs this file (no recursion)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"
STAGES = ("build", "test", "bench")


def run_script(*args, out_dir, timeout=300):
    env = dict(os.environ, TRITON_INTERPRET="1", OUT=str(out_dir), PYTHON=sys.executable)
    # the pytest and python of this interpreter's environment, whatever PATH the caller had
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def summary_rows(stdout: str) -> dict[str, str]:
    """stage -> status from the summary table the script ends with."""
    table = stdout[stdout.rindex("gpu_check summary"):]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+) \| ([^|]+?) \|", table, re.MULTILINE)}
    rows.pop("stage", None)  # the header
    return rows


def test_script_is_executable_bash_with_strict_mode():
    assert os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.slow
def test_dry_run_runs_every_stage_ok(tmp_path):
    done = run_script("--dry-run", out_dir=tmp_path)
    log = f"stdout tail:\n{done.stdout[-4000:]}\nstderr tail:\n{done.stderr[-2000:]}"
    assert done.returncode == 0, log
    assert "gpu_check summary (dry run" in done.stdout, log
    rows = summary_rows(done.stdout)
    for stage in STAGES + ("total",):
        assert rows.get(stage) == "ok", f"{stage}: {rows.get(stage)}\n{log}"
    build_log = (tmp_path / "build.log").read_text()
    assert "dry run: skipping" in build_log and "Successfully installed" not in build_log, build_log
    assert (tmp_path / "summary.md").read_text().strip().endswith("|")
    # the dry run's test stage must not have run this file
    assert "test_gpu_check_script" not in (tmp_path / "test.log").read_text()


def test_only_with_an_unknown_stage_fails_clearly(tmp_path):
    done = run_script("--only", "bogus", out_dir=tmp_path, timeout=60)
    assert done.returncode == 2
    assert "unknown stage 'bogus'" in done.stderr and "build test bench" in done.stderr, done.stderr
    assert "gpu_check summary" not in done.stdout  # refused before running anything


def test_only_runs_the_one_stage(tmp_path):
    done = run_script("--dry-run", "--only", "build", out_dir=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert set(summary_rows(done.stdout)) == {"build", "total"}
