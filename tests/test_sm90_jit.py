"""Every Triton kernel as Triton's JIT would compile it on an sm_90 GPU (H100/H200), from the real arguments of real
calls: tests/sm90_jit.py runs sample / train / nll / the attention block / the Philox draws on CPU tensors with the
JIT compiling each launch for sm_90 and launching nothing (its docstring says how). Here: nothing fails to compile,
every kernel is reached, the truncated sampling runs compile what a whole run does, and the compiled kernels fit an
sm_90 SM's resources.

It runs under two Tritons: the installed one (CI's) and the GPU machine's (3.6.0, installed beside it by the README's
test command with `pip install --target .triton-3.6`; DDPM_FAST_TRITON_SIDE names another folder). A missing side
Triton fails the test with that instruction: the GPU machine's compiler is the one that matters.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECKER = REPO / "tests" / "sm90_jit.py"
SIDE = Path(os.environ.get("DDPM_FAST_TRITON_SIDE", REPO / ".triton-3.6"))
SIDE_VERSION = "3.6.0"  # the GPU machine's (the device tool's KINDS.md)
SM90_MAX_SHARED_PER_BLOCK = 232448
SHARED_LIMIT = int(0.9 * SM90_MAX_SHARED_PER_BLOCK)  # at the cifar10 preset's shapes: room for the next change
CIFAR10_CHANNELS = 256  # the cifar10 preset's widest attention head
KERNELS = {"_philox_kernel", "_philox_normal_kernel", "_q_sample_kernel", "_q_sample_philox_kernel",
           "_simple_loss_kernel", "_simple_loss_backward_kernel", "_reverse_step_kernel",
           "_group_norm_forward_kernel", "_group_norm_backward_kernel", "_attention_forward_kernel",
           "_attention_backward_query_kernel", "_attention_backward_key_kernel"}
VERSIONS = ["installed", "side"]


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """Both Tritons' checks, run at once (one core each): {"installed" | "side": the checker's JSON, or a reason}."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "DDPM_FAST_REQUIRE", "DDPM_FAST_BACKEND", "PYTHONPATH")}
    running = {}
    for version in VERSIONS:
        env_v = dict(env)  # (the checker compiles into an empty Triton cache of its own)
        if version == "side":
            if not (SIDE / "triton" / "__init__.py").is_file():
                running[version] = (f"no Triton at {SIDE}: install the GPU machine's with `pip install --no-deps "
                                    f"--target {SIDE} triton=={SIDE_VERSION}` (the README's test command does)")
                continue
            env_v["PYTHONPATH"] = str(SIDE)  # ahead of site-packages: its triton shadows the installed one
        # a cwd outside the checkout: the installed ddpm_fast is the one imported
        running[version] = subprocess.Popen([sys.executable, str(CHECKER)], stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, env=env_v,
                                            cwd=tmp_path_factory.mktemp(f"cwd_{version}"))
    results = {}
    for version, process in running.items():
        if isinstance(process, str):
            results[version] = process
            continue
        stdout, stderr = process.communicate(timeout=900)
        if process.returncode != 0:
            results[version] = f"the checker failed (rc {process.returncode}):\n{stderr[-6000:]}"
        else:
            results[version] = json.loads(stdout.strip().splitlines()[-1])
    return results


def _check(checks, version) -> dict:
    result = checks[version]
    if isinstance(result, str):
        pytest.fail(result)
    if version == "side":
        assert result["triton"] == SIDE_VERSION and Path(result["triton_file"]).is_relative_to(SIDE), result["triton"]
    return result


@pytest.mark.parametrize("version", VERSIONS)
def test_it_compiles_the_installed_kernels_of_this_checkout(checks, version):
    """The checker imports the installed package: it must be this checkout's (kernels/ and every ddpm_fast/ module,
    which decide what the kernels are launched with). An editable install's package is the checkout itself."""
    result = _check(checks, version)
    installed = Path(result["package_dir"])
    assert {Path(p).name for p in result["kernel_files"]} >= {"__init__.py", "attention.py", "diffusion_step.py",
                                                              "group_norm.py", "philox.py", "layout.py"}
    kernels = Path(result["kernel_files"][0]).parent  # (installed/kernels, or the checkout's kernels/ if editable)
    ours = [(REPO / "kernels" / p.name, kernels / p.name) for p in (REPO / "kernels").glob("*.py")]
    ours += [(p, installed / p.relative_to(REPO / "ddpm_fast")) for p in (REPO / "ddpm_fast").rglob("*.py")]
    stale = [str(theirs) for mine, theirs in ours if not theirs.is_file() or theirs.read_bytes() != mine.read_bytes()]
    assert not stale, f"the installed copies differ from this checkout: {stale}; reinstall (pip install " \
                      "--no-build-isolation .)"


@pytest.mark.parametrize("version", VERSIONS)
def test_every_launch_compiles_for_sm90(checks, version):
    result = _check(checks, version)
    report = [f"{f['kernel']} ({len(f['workloads'])} workloads, first: {f['workloads'][0]})\n"
              f"  arguments: {f['arguments']}\n  {f['error'][-1500:]}" for f in result["failures"]]
    assert not report, f"under Triton {result['triton']}:\n" + "\n\n".join(report)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_workload_runs_and_every_kernel_is_reached(checks, version):
    result = _check(checks, version)
    errors = [f"{run['name']}: {run['outcome']}" for run in result["runs"] if run["outcome"] not in ("ok", "stopped")]
    assert not errors, "\n".join(errors)
    assert {k["kernel"] for k in result["kernels"]} | {f["kernel"] for f in result["failures"]} == KERNELS


@pytest.mark.parametrize("version", VERSIONS)
def test_a_whole_sampling_run_compiles_what_its_first_steps_do(checks, version):
    """The truncated runs' premise: every later step of a run launches the kernels of its first ones (t is a tensor;
    at batch 1 its pointer's alignment alternates, so two steps), at batch 16 and at batch 1."""
    result = _check(checks, version)
    runs = {run["name"]: run for run in result["runs"]}
    for witness in result["witnesses"]:  # (a whole run, the same run stopped after its first steps)
        whole, first = ({k["kernel"] + " " + k["specialisation"] for k in result["kernels"] if name in k["workloads"]}
                        for name in witness)
        assert runs[witness[0]]["outcome"] == "ok" and runs[witness[1]]["outcome"] == "stopped"
        assert runs[witness[0]]["launches"] > 20 * runs[witness[1]]["launches"]
        assert whole and whole == first, (witness, sorted(whole ^ first))


def _table(result) -> str:
    """One row per kernel and tile (the attention's BLOCK_* constexprs): how many specialisations, and the most
    registers, spill bytes (stores + loads, per thread), stack bytes and shared memory among them."""
    rows = {}
    for k in result["kernels"]:
        tile = " ".join(w for w in k["specialisation"].split() if w.startswith(("BLOCK_M=", "BLOCK_N=", "BLOCK_D=")))
        row = rows.setdefault((k["kernel"], tile), dict(n=0, registers=0, spills=0, stack=0, shared=0, warps=set()))
        row["n"] += 1
        for field in ("registers", "stack", "shared"):
            row[field] = max(row[field], k[field])
        row["spills"] = max(row["spills"], k["spill_stores"] + k["spill_loads"])
        row["warps"].add(k["num_warps"])
    lines = [f"sm_90 kernels under Triton {result['triton']} (per kernel and tile: the maximum over its "
             "specialisations)",
             f"{'kernel':34} {'tile':30} {'specs':>5} {'warps':>5} {'regs':>4} {'spill B':>7} {'stack B':>7} "
             f"{'shared B':>8}"]
    for (name, tile), row in sorted(rows.items()):
        lines.append(f"{name:34} {tile:30} {row['n']:5d} {'/'.join(map(str, sorted(row['warps']))):>5} "
                     f"{row['registers']:4d} {row['spills']:7d} {row['stack']:7d} {row['shared']:8d}")
    return "\n".join(lines)


@pytest.mark.parametrize("version", VERSIONS)
def test_kernels_fit_sm90_resources(checks, version, capsys):
    """Every kernel fits an sm_90 block; those reached at the cifar10 preset's shapes (attention heads up to 256
    channels) spill nothing and leave 10% of the shared memory free. The table goes to the terminal."""
    result = _check(checks, version)
    with capsys.disabled():
        print("\n" + _table(result))
    problems = []
    for k in result["kernels"]:
        where = f"{k['kernel']} [{k['specialisation']}] (e.g. {k['workloads'][0]})"
        if k["arch"] != "sm90" or k["cubin_bytes"] == 0:
            problems.append(f"{where}: compiled for {k['arch']!r}, {k['cubin_bytes']} bytes of cubin")
        if k["shared"] > SM90_MAX_SHARED_PER_BLOCK:
            problems.append(f"{where}: {k['shared']} B of shared memory, over sm_90's {SM90_MAX_SHARED_PER_BLOCK}")
        if k["global_scratch"]:  # it would fail at launch: ddpm_fast sets no triton allocator
            problems.append(f"{where}: needs {k['global_scratch']} B of global scratch")
        if min(k["channels"]) <= CIFAR10_CHANNELS:
            if k["spill_stores"] or k["spill_loads"]:
                problems.append(f"{where}: spills {k['spill_stores']} B / loads {k['spill_loads']} B per thread "
                                f"({k['registers']} registers)")
            if k["shared"] > SHARED_LIMIT:
                problems.append(f"{where}: {k['shared']} B of shared memory, over 90% of sm_90's ({SHARED_LIMIT})")
    assert not problems, "\n".join(problems)
