"""The sampler benches' contenders timed round-robin: one run of each per round, so that the VM's slow phases (on the
2-core machine medians move by up to 2x between minutes) hit them alike. A cross-check of bench_sampler.py, whose
pytest-benchmark runs time one contender after another.

    python bench/sampler_interleaved.py --preset small --batch 16 --steps 10 --rounds 10
    python bench/sampler_interleaved.py --batch 16 --batch-size 8 --steps 50 --no-compile --streamed

--streamed adds sample(out=) to a fresh folder per run, PNG and .npz (contiguous), and prints its cost against ours
in memory; --batch-size splits ours' images into batches (two, so that the writer overlaps the second's sampling).

Prints per contender the median and the lower quartile of the time per step over the rounds, and the ratios of the
medians to eager's (same layout) and to the contiguous eager loop's. torch.compile's first (compiling) run is left out.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ddpm_fast
from baselines import eager_copy, eager_loop, eager_step
from benchutil import random_unet

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=list(ddpm_fast.unet.PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles ~1 min)")
    parser.add_argument("--batch-size", type=int, default=None, help="ours' batch size (default: all at once)")
    parser.add_argument("--streamed", action="store_true", help="add ours streamed to disk (PNG, .npz)")
    args = parser.parse_args()

    base = random_unet(args.preset, "cpu")
    shape = (base.in_channels, base.image_size, base.image_size)
    diffusion = ddpm_fast.Diffusion().respace(args.steps)
    runs = {}
    for name, layout in LAYOUTS.items():
        ours = ddpm_fast.UNet(**base.config).eval()
        ours.load_state_dict(base.state_dict())
        ours = ours.to(memory_format=layout)
        eager = eager_copy(base).to(memory_format=layout)
        runs[f"eager {name}"] = lambda m=eager, f=layout: eager_loop(m, diffusion, args.batch, shape, "cpu",
                                                                     memory_format=f)
        if not args.no_compile:
            step = torch.compile(eager_step, dynamic=False)
            runs[f"compiled {name}"] = lambda m=eager, f=layout, s=step: eager_loop(
                m, diffusion, args.batch, shape, "cpu", step=s, memory_format=f)
        runs[f"ours {name}"] = lambda m=ours: ddpm_fast.sample(m, args.batch, steps=args.steps,
                                                               batch_size=args.batch_size, progress=False)
        if args.streamed and name == "contiguous":
            folders = tempfile.TemporaryDirectory()
            fresh = iter(range(10**6))
            for kind in ("png", "npz"):
                runs[f"ours streamed-{kind} {name}"] = lambda m=ours, k=kind: ddpm_fast.sample(
                    m, args.batch, steps=args.steps, batch_size=args.batch_size, progress=False,
                    out=Path(folders.name) / f"run{next(fresh)}", out_format=k)
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()  # compile, first touch
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.preset} x{args.batch}, {args.steps} steps, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print("| contender | median ms/step | q25 ms/step | eager (same layout) / it | eager contiguous / it |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        layout = name.split()[-1]
        q25 = sorted(t)[len(t) // 4]
        print(f"| {name} | {median[name] * 1e3:.2f} | {q25 * 1e3:.2f} | "
              f"{median['eager ' + layout] / median[name]:.2f}x | {median['eager contiguous'] / median[name]:.2f}x |")
    for name in (n for n in times if "streamed" in n):
        print(f"{name}: streaming costs {median[name] / median['ours contiguous'] - 1:+.1%} of ours in memory's "
              "time (median over median)")


if __name__ == "__main__":
    main()
