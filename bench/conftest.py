"""Benchmarks: every op and the sampler against eager PyTorch, timed in the same run (medians).
Run: pytest bench/ --benchmark-only [--benchmark-columns=median,iqr,ops] (the quick suite, about 5 minutes on 2 CPU
cores), or with --bench-full (every shape, size and layout, longer rounds: the precise, long version). Either ends with
one summary table of ratios (summary_rows)."""
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


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="ddpm_fast benches: every shape, size and layout, torch.compile everywhere it is compared, "
                          "longer rounds (the default is the quick suite)")


def pytest_configure(config):
    import benchutil  # (bench/ is on sys.path: pytest put it there to import this file)

    benchutil.FULL = config.getoption("bench_full")


def _grouped(benchmarks, keep=lambda bench: True) -> dict:
    """{group: [benchmark, ...]} of the benchmarks that ran (have rounds) and that `keep` accepts."""
    groups = {}
    for bench in benchmarks:
        if bench.stats and bench.stats.rounds and keep(bench):
            groups.setdefault(bench.group, []).append(bench)
    return groups


def baseline_ratio(medians: dict, role: str, own: float, kind: str) -> float | None:
    """The median of the group's `kind` baseline over `own` (the median of a row of `role`), the one rule of every
    table: "eager" is the float32 eager code where the group has it (the user's default without us), else its bf16
    one; "compiled" is torch.compile in the row's own precision (role "... bf16" for a bf16 row); any other kind
    ("sdpa", "ours") is that role. None where the group lacks it."""
    bf16 = role.endswith(" bf16")
    names = {"eager": ("eager", "eager bf16"),
             "compiled": ("compiled bf16",) if bf16 else ("compiled",)}.get(kind, (kind,))
    base = next((medians[name] for name in names if name in medians), None)
    return None if base is None else base / own


def bandwidth_rows(benchmarks):
    """One row per benchmark that set extra_info["bytes"] and is not the copy: (group, name, median s, GB/s,
    fraction of the copy's GB/s in its group, speed-up over eager, over compiled). Missing values are None.
    Roles come from extra_info["role"]: "eager", "compiled", "copy", anything else is ours."""
    rows = []
    for group, members in _grouped(benchmarks).items():
        by_role = {b.extra_info.get("role"): b for b in members}
        copy = by_role.get("copy")
        copy_gbs = copy.extra_info["bytes"] / copy.stats.median / 1e9 if copy else None
        for bench in members:
            role, nbytes = bench.extra_info.get("role"), bench.extra_info.get("bytes")
            if role in ("eager", "compiled", "copy") or not nbytes:
                continue
            median = bench.stats.median
            gbs = nbytes / median / 1e9
            medians = {r: b.stats.median for r, b in by_role.items()}
            rows.append((group, bench.name, median, gbs, gbs / copy_gbs if copy_gbs else None,
                         baseline_ratio(medians, role, median, "eager"),
                         baseline_ratio(medians, role, median, "compiled")))
    return rows


def flops_rows(benchmarks):
    """One row per benchmark that set extra_info "flops" or "peak_mb": (group, role, median s, GFLOP/s, its fraction
    of the bf16 matmul rate (a bench of role "matmul" in the same run, GPU), peak MiB, the speed-up of our variant
    (role "ours") over this one, extra_info "attention_share"); None where a value is missing."""
    groups = _grouped(benchmarks, lambda bench: "flops" in bench.extra_info or "peak_mb" in bench.extra_info)
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
    whose extra_info has `key` (baseline_ratio's rule); None where the group has no such baseline."""
    out = {}
    for group, members in _grouped(benchmarks, lambda bench: key in bench.extra_info).items():
        medians = {b.extra_info["role"]: b.stats.median for b in members}
        out[group] = [(b, *(baseline_ratio(medians, b.extra_info["role"], b.stats.median, kind)
                            for kind in ("eager", "compiled"))) for b in members]
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


def summary_rows(benchmarks):
    """One row per row of ours (role "ours..." or "redraw" / "stored": every benchmark that is not a baseline) in a
    group that has a baseline: (group, variant, median s, vs eager, vs compiled, vs SDPA, bf16 vs fp32), each
    ratio baseline_ratio's (bf16 vs fp32 = ours in float32 over this bf16 row). None where the group lacks that
    baseline."""
    baselines = ("eager", "compiled", "sdpa", "copy", "matmul")
    rows = []
    for group, members in _grouped(benchmarks, lambda bench: "role" in bench.extra_info).items():
        # each role's median; where a role has several backends (ours: cpp and triton on a GPU), the C++ one's
        ordered = sorted(members, key=lambda b: b.extra_info.get("backend") in (None, "cpp"))
        median = {b.extra_info["role"]: b.stats.median for b in ordered}
        for bench in members:
            role = bench.extra_info["role"]
            if role.split(" ")[0] in baselines:
                continue
            own = bench.stats.median
            ratios = tuple(baseline_ratio(median, role, own, kind) for kind in ("eager", "compiled", "sdpa")) + (
                baseline_ratio(median, role, own, "ours") if role.endswith(" bf16") else None,)
            if any(r is not None for r in ratios):
                backend = bench.extra_info.get("backend")
                rows.append((group, role + (f" ({backend})" if backend else ""), own, *ratios))
    return rows


def _table(write, title: str, header: list, lines: list) -> None:
    """A titled markdown table of pre-formatted `lines`, after a blank line; nothing without lines."""
    if not lines:
        return
    write("")
    write(title)
    write("")
    write("| " + " | ".join(header) + " |")
    write("|" + "---|" * len(header))
    for cells in lines:
        write(("| " + " | ".join(cells) + " |").replace("| -x", "| -"))


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    import benchutil

    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    write, benchmarks = terminalreporter.write_line, session.benchmarks
    _table(write, "Sampling end to end (images/s for the paper's 1000 steps = batch / (1000 x time per step); vs = "
                  "that baseline's median / this one's, same group; conv = share of the network's time in Conv2d, "
                  "CPU):",
           ["group", "variant", "ms / step", "images/s (1000 steps)", "vs eager", "vs compiled", "conv"],
           [[group, role, f"{ms:.2f}", f"{images:.3f}", f"{fmt(vs_eager, '.2f')}x", f"{fmt(vs_compiled, '.2f')}x",
             fmt(conv, ".0%")]
            for group, role, ms, images, vs_eager, vs_compiled, conv in sampler_rows(benchmarks)])
    _table(write, "Training (optimizer steps/s and images/s, medians; vs = that baseline's median / this one's, "
                  "same group):",
           ["group", "variant", "steps/s", "images/s", "vs eager", "vs compiled"],
           [[group, role, f"{rate:.3f}", f"{images:.1f}", f"{fmt(vs_eager, '.2f')}x", f"{fmt(vs_compiled, '.2f')}x"]
            for group, role, rate, images, vs_eager, vs_compiled in training_rows(benchmarks)])
    _table(write, "Compute of each variant (the FLOPs its benchmark names / median, and that as a share of the bf16 "
                  "matmul rate on a GPU; peak = the forward's peak memory; ours vs = that variant's median / ours; "
                  "attention = share of the time inside the attention blocks):",
           ["group", "variant", "median", "GFLOP/s", "of bf16 matmul", "peak MiB", "ours vs it", "attention"],
           [[group, str(role), f"{median * 1e3:.3f} ms", fmt(gflops, ".1f"), fmt(of_matmul, ".0%"), fmt(peak, ".0f"),
             f"{fmt(speedup, '.2f')}x", fmt(share, ".1%")]
            for group, role, median, gflops, of_matmul, peak, speedup, share in flops_rows(benchmarks)])
    _table(write, "Bandwidth of our ops (bytes the op must move / median; copy = dst.copy_(src) of the same size, "
                  "same run; speed-up = baseline median / ours):",
           ["group", "bench", "median", "GB/s", "of copy", "vs eager", "vs compiled"],
           [[group, name, f"{median * 1e3:.3f} ms", f"{gbs:.1f}", fmt(of_copy, ".0%"), f"{fmt(vs_eager, '.2f')}x",
             f"{fmt(vs_compiled, '.2f')}x"]
            for group, name, median, gbs, of_copy, vs_eager, vs_compiled in bandwidth_rows(benchmarks)])
    _table(write, "Summary: every row of ours against the baselines of its group, same run (baseline median / ours; "
                  "vs eager: the float32 eager code where the group has it; vs compiled: torch.compile in the row's "
                  "precision; bf16 vs fp32: ours in float32 / this row). "
                  + ("Full suite." if benchutil.full() else "Quick suite: --bench-full for every shape, size and layout."),
           ["group", "ours", "median", "vs eager", "vs compiled", "vs SDPA", "bf16 vs fp32"],
           [[group, role, f"{median * 1e3:.2f} ms"] + [f"{fmt(r, '.2f')}x" for r in ratios]
            for group, role, median, *ratios in summary_rows(benchmarks)])
