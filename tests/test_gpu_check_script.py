"""bench/gpu_check.sh, the one script run on a rented GPU machine, executed here in its --dry-run form (the same stages
on the CPU against the installed build: the gpu-marked tests skip, one bench file runs one round) so that it cannot
rot between the rare GPU runs (docs/design.md, "Testing without a GPU"); its --plan checked against the test files and
the 480 s budget of the device tool's first call. The dry run never runs this file (no recursion)."""
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"
STAGES = ("build", "import", "ops", "sample", "train")
BUDGET = 480  # the device tool's first call: one command of at most 480 s
OUT_FILES = {"summary.md", "build.log", "stages.log", "junit-ops.xml", "junit-sample.xml", "junit-train.xml",
             "junit-bench.xml", "bench.json"}  # at most 8 files come back from $OUT


def run_script(*args, out_dir, timeout=120, **env):
    env = dict(os.environ, TRITON_INTERPRET="1", OUT=str(out_dir), PYTHON=sys.executable, **env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def summary_rows(out_dir) -> dict[str, list[str]]:
    """stage -> [status, seconds, detail, junit] from $OUT/summary.md."""
    rows = {}
    for line in (Path(out_dir) / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("stage", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def plan(*args, **env):
    """{stage: (cap, grace, command)} and the budget line from --plan (runs nothing)."""
    done = run_script("--plan", *args, out_dir="/nonexistent", timeout=60, **env)
    assert done.returncode == 0, done.stderr
    stages = {}
    for line in done.stdout.splitlines()[2:]:
        m = re.match(r"(\S+(?: \S+\.py)?) +cap +(\d+) s \+ (\d+)  (.*)$", line)
        assert m, line
        stages[m.group(1)] = (int(m.group(2)), int(m.group(3)), m.group(4))
    return stages, done.stdout.splitlines()[0]


def test_script_is_executable_bash_with_strict_mode():
    assert os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_the_plan_fits_the_budget_and_runs_every_gpu_test_and_bench():
    stages, budget = plan()
    assert list(stages)[:len(STAGES)] == list(STAGES)
    reserve = int(re.search(r"reserve (\d+)", budget).group(1))
    fixed = sum(cap + grace for name, (cap, grace, _) in stages.items() if name in STAGES)
    assert f"budget {BUDGET} s" in budget and fixed + reserve <= BUDGET - 60, budget  # a minute at least for benches
    # every test file with a gpu mark runs in one of the test stages, gpu-marked tests only; no CPU-only test there
    commands = {name: command for name, (_, _, command) in stages.items()}
    gpu_files = sorted(f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
                       if re.search(r"pytest\.mark\.gpu", p.read_text()))
    staged = [f for name in ("ops", "sample", "train") for f in commands[name].split() if f.startswith("tests/")]
    assert sorted(staged) == gpu_files
    for name in ("ops", "sample", "train"):
        assert " -m gpu " in commands[name] and "--junitxml=junit-" + name in commands[name]
    benches = [name.split()[1] for name in stages if name.startswith("bench ")]
    assert sorted(benches) == sorted(p.name for p in (REPO / "bench").glob("bench_*.py"))
    for name, command in commands.items():
        if name not in ("build", "import"):
            assert "--tb=short" in command and " -x" not in command and "--junitxml" in command, name


def test_caps_over_the_budget_are_refused():
    done = run_script("--plan", "--only", "build", out_dir="/nonexistent", timeout=60, GPU_CHECK_BUILD_CAP="1000")
    assert done.returncode == 2 and "exceed the budget of 480 s" in done.stderr, done.stderr


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_the_summary_as_it_goes(tmp_path):
    done = run_script("--dry-run", out_dir=tmp_path, timeout=300)
    log = f"stdout tail:\n{done.stdout[-4000:]}\nstderr tail:\n{done.stderr[-2000:]}"
    assert done.returncode == 0, log
    rows = summary_rows(tmp_path)
    assert list(rows) == [*STAGES, "bench bench_philox.py", "total"], log
    for stage, (status, seconds, detail, junit) in rows.items():
        assert status == "ok" and seconds.isdigit() and detail, (stage, rows[stage], log)
    assert re.fullmatch(r"\d+ skipped, \d+ deselected in [\d.]+s", rows["ops"][2]), rows["ops"]  # -m gpu, no GPU
    assert rows["ops"][3] == "junit-ops.xml" and rows["bench bench_philox.py"][3] == "junit-bench.xml (bench_philox)"
    # each row reached summary.md when its stage ended, before the next stage began
    assert done.stdout.index("summary: | build |") < done.stdout.index("= import (cap")
    assert done.stdout.index("summary: | train |") < done.stdout.index("= bench bench_philox.py (cap")
    files = {p.name for p in tmp_path.iterdir()}
    assert files <= OUT_FILES and len(files) <= 8, files
    build_log = (tmp_path / "build.log").read_text()
    assert "dry run: skipping" in build_log and "Successfully installed" not in build_log, build_log
    suites = {s.get("name"): s for name in ("ops", "sample", "train", "bench")
              for s in ET.parse(tmp_path / f"junit-{name}.xml").getroot().iter("testsuite")}
    assert set(suites) == {"ops", "sample", "train", "bench_philox"} and int(suites["ops"].get("skipped")) > 0
    assert json.loads((tmp_path / "bench.json").read_text())["benchmarks"]
    assert "test_gpu_check_script" not in (tmp_path / "stages.log").read_text()


def test_only_runs_its_stages_and_a_stage_without_time_left_is_skipped(tmp_path):
    """--only bench with a budget too small for any bench file: its row says so and the run is incomplete."""
    done = run_script("--dry-run", "--only", "bench", out_dir=tmp_path, GPU_CHECK_BUDGET="25")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    rows = summary_rows(tmp_path)
    assert list(rows) == ["bench bench_philox.py", "total"]
    assert rows["bench bench_philox.py"][0] == "skipped" and "no time left" in rows["bench bench_philox.py"][2]
    assert rows["total"][0] == "INCOMPLETE"


def test_a_stage_past_its_cap_is_a_timeout(tmp_path):
    done = run_script("--dry-run", "--only", "sample", out_dir=tmp_path, GPU_CHECK_SAMPLE_CAP="1")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    rows = summary_rows(tmp_path)
    assert rows["sample"][0] == "TIMEOUT (cap 1 s)" and rows["total"][0] == "FAIL", rows


def test_only_with_an_unknown_stage_fails_clearly(tmp_path):
    done = run_script("--only", "bogus", out_dir=tmp_path, timeout=60)
    assert done.returncode == 2
    assert "unknown stage 'bogus'" in done.stderr and "build import ops sample train bench" in done.stderr
    assert not (tmp_path / "summary.md").exists()  # refused before running anything
