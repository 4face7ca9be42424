"""Benchmarks: every op and the sampler against eager PyTorch, timed in the same run (medians).
Run: pytest bench/ --benchmark-only [--benchmark-columns=median,iqr,ops]."""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != REPO]  # the installed ddpm_fast, with _C

# As tests/conftest.py: without a GPU, Triton runs under the interpreter (so DDPM_FAST_REQUIRE=cpp,triton imports);
# the benches time Triton on a GPU only. Must precede the first import of ddpm_fast.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def bandwidth_rows(benchmarks):
    """One row per benchmark that set extra_info["bytes"] and is not the copy: (group, name, median s, GB/s,
    fraction of the copy's GB/s in its group, speed-up over eager, over compiled). Missing values are None.
    Roles come from extra_info["role"]: "eager", "compiled", "copy", anything else is ours."""
    groups = {}
    for bench in benchmarks:
        if bench.stats and bench.stats.rounds:
            groups.setdefault(bench.group, []).append(bench)
    rows = []
    for group, members in groups.items():
        by_role = {b.extra_info.get("role"): b for b in members}
        copy = by_role.get("copy")
        copy_gbs = copy.extra_info["bytes"] / copy.stats.median / 1e9 if copy else None
        for bench in members:
            role, nbytes = bench.extra_info.get("role"), bench.extra_info.get("bytes")
            if role in ("eager", "compiled", "copy") or not nbytes:
                continue
            median = bench.stats.median
            gbs = nbytes / median / 1e9
            ratio = {r: by_role[r].stats.median / median if r in by_role else None for r in ("eager", "compiled")}
            rows.append((group, bench.name, median, gbs, gbs / copy_gbs if copy_gbs else None, ratio["eager"],
                         ratio["compiled"]))
    return rows


def flops_rows(benchmarks):
    """One row per benchmark that set extra_info "flops" or "peak_mb": (group, role, median s, GFLOP/s, its fraction
    of the bf16 matmul rate (a bench of role "matmul" in the same run, GPU), peak MiB, the speed-up of our variant
    (role "ours") over this one, extra_info "attention_share"); None where a value is missing."""
    groups = {}
    for bench in benchmarks:
        if bench.stats and bench.stats.rounds and ("flops" in bench.extra_info or "peak_mb" in bench.extra_info):
            groups.setdefault(bench.group, []).append(bench)
    matmul = next((b for members in groups.values() for b in members if b.extra_info.get("role") == "matmul"), None)
    matmul_rate = matmul.extra_info["flops"] / matmul.stats.median if matmul else None
    rows = []
    for group, members in groups.items():
        ours = next((b for b in members if b.extra_info.get("role") == "ours"), None)
        for bench in members:
            median = bench.stats.median
            rate = bench.extra_info["flops"] / median if "flops" in bench.extra_info else None
            speedup = median / ours.stats.median if ours is not None and bench is not ours else None
            rows.append((group, bench.extra_info.get("role"), median, rate / 1e9 if rate else None,
                         rate / matmul_rate if rate and matmul_rate else None, bench.extra_info.get("peak_mb"),
                         speedup, bench.extra_info.get("attention_share")))
    return rows


def _by_group(benchmarks, key):
    """{group: [(bench, median of the group's eager / this, median of its compiled / this)]} for the benchmarks
    whose extra_info has `key`; None where the group has no such baseline."""
    groups = {}
    for bench in benchmarks:
        if bench.stats and bench.stats.rounds and key in bench.extra_info:
            groups.setdefault(bench.group, []).append(bench)
    out = {}
    for group, members in groups.items():
        by_role = {b.extra_info["role"]: b.stats.median for b in members}
        out[group] = [(b, *(by_role[r] / b.stats.median if r in by_role else None for r in ("eager", "compiled")))
                      for b in members]
    return out


def sampler_rows(benchmarks):
    """One row per sampler benchmark (extra_info "steps"): (group, role, ms per step, images/s over 1000 steps,
    median of eager / this, median of compiled / this, conv_share); None where missing."""
    rows = []
    for group, members in _by_group(benchmarks, "steps").items():
        for bench, vs_eager, vs_compiled in members:
            info = bench.extra_info
            per_step = bench.stats.median / info["steps"]
            rows.append((group, info["role"], per_step * 1e3, info["images"] / (1000 * per_step), vs_eager,
                         vs_compiled, info.get("conv_share")))
    return rows


def training_rows(benchmarks):
    """One row per training benchmark (extra_info "train_steps"): (group, role, steps/s, images/s, median of
    eager / this, median of compiled / this); None where missing."""
    rows = []
    for group, members in _by_group(benchmarks, "train_steps").items():
        for bench, vs_eager, vs_compiled in members:
            rate = bench.extra_info["train_steps"] / bench.stats.median
            rows.append((group, bench.extra_info["role"], rate, rate * bench.extra_info["batch"], vs_eager,
                         vs_compiled))
    return rows


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    write = terminalreporter.write_line
    sampler = sampler_rows(session.benchmarks)
    if sampler:
        write("")
        write("Sampling end to end (images/s for the paper's 1000 steps = batch / (1000 x time per step); vs = that "
              "baseline's median / this one's, same group; conv = share of the network's time in Conv2d, CPU):")
        write("")
        write("| group | variant | ms / step | images/s (1000 steps) | vs eager | vs compiled | conv |")
        write("|---|---|---|---|---|---|---|")
        for group, role, ms, images, vs_eager, vs_compiled, conv in sampler:
            write(f"| {group} | {role} | {ms:.2f} | {images:.3f} | {fmt(vs_eager, '.2f')}x | "
                  f"{fmt(vs_compiled, '.2f')}x | {fmt(conv, '.0%')} |".replace("| -x", "| -"))
    training = training_rows(session.benchmarks)
    if training:
        write("")
        write("Training (optimizer steps/s and images/s, medians; vs = that baseline's median / this one's, same group):")
        write("")
        write("| group | variant | steps/s | images/s | vs eager | vs compiled |")
        write("|---|---|---|---|---|---|")
        for group, role, rate, images, vs_eager, vs_compiled in training:
            write(f"| {group} | {role} | {rate:.3f} | {images:.1f} | {fmt(vs_eager, '.2f')}x | "
                  f"{fmt(vs_compiled, '.2f')}x |".replace("| -x", "| -"))
    compute = flops_rows(session.benchmarks)
    if compute:
        write("")
        write("Compute of each variant (the FLOPs its benchmark names / median, and that as a share of the bf16 "
              "matmul rate on a GPU; peak = the forward's peak memory; ours vs = that variant's median / ours; "
              "attention = share of the time inside the attention blocks):")
        write("")
        write("| group | variant | median | GFLOP/s | of bf16 matmul | peak MiB | ours vs it | attention |")
        write("|---|---|---|---|---|---|---|---|")
        for group, role, median, gflops, of_matmul, peak, speedup, share in compute:
            write(f"| {group} | {role} | {median * 1e3:.3f} ms | {fmt(gflops, '.1f')} | {fmt(of_matmul, '.0%')} | "
                  f"{fmt(peak, '.0f')} | {fmt(speedup, '.2f')}x | {fmt(share, '.1%')} |".replace("| -x", "| -"))
    rows = bandwidth_rows(session.benchmarks)
    if not rows:
        return
    write("")
    write("Bandwidth of our ops (bytes the op must move / median; copy = dst.copy_(src) of the same size, same run; "
          "speed-up = baseline median / ours):")
    write("")
    write("| group | bench | median | GB/s | of copy | vs eager | vs compiled |")
    write("|---|---|---|---|---|---|---|")
    for group, name, median, gbs, of_copy, vs_eager, vs_compiled in rows:
        write(f"| {group} | {name} | {median * 1e3:.3f} ms | {gbs:.1f} | {fmt(of_copy, '.0%')} | "
              f"{fmt(vs_eager, '.2f')}x | {fmt(vs_compiled, '.2f')}x |".replace("| -x", "| -"))
