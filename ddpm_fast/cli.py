"""The command line: `ddpm-fast sample` and `ddpm-fast info` (more subcommands come with later issues)."""
from __future__ import annotations

import argparse
import platform
import sys
import time


def _sample(args) -> None:
    import torch

    import ddpm_fast

    model = ddpm_fast.UNet.from_preset(args.preset)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    begin = time.perf_counter()
    images = ddpm_fast.sample(model, args.n, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                              device=args.device, progress=not args.quiet)
    seconds = time.perf_counter() - begin
    path = ddpm_fast.save_grid(images, args.output)
    print(f"wrote {args.n} samples to {path} ({seconds:.1f} s, {args.n / seconds:.2f} images/s)")


def _info(args) -> None:
    import torch

    import ddpm_fast

    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    for name, status in ddpm_fast.backends().items():
        print(f"  {name:9s} {'yes' if status.available else 'no ':3s}  {status.reason}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ddpm-fast", description="DDPM with fused kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("sample", help="draw samples and save them as a PNG grid")
    p.add_argument("-n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("-o", "--output", default="samples.png", help="PNG file to write (default samples.png)")
    p.add_argument("--preset", default="small", choices=["small", "cifar10"], help="network preset")
    p.add_argument("--weights", help="a state_dict saved with torch.save (default: freshly initialised weights)")
    p.add_argument("--steps", type=int, default=None, help="respaced DDPM steps (default: all 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_sample)
    p = commands.add_parser("info", help="backends, devices and versions")
    p.set_defaults(run=_info)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, NotImplementedError, FloatingPointError) as error:
        print(f"ddpm-fast {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
