"""The command line, `ddpm-fast`: every capability behind one command, the bundled digits model by default.

    ddpm-fast sample -n 64 -o samples.png        # the bundled model, offline, under a minute on 2 CPU cores
    ddpm-fast train --out runs/digits            # the bundled recipe on the bundled digits
    ddpm-fast nll | rate-distortion | interpolate | progressive | quality | bench | export | info

A bad argument or a missing file is one line on stderr (exit status 2), not a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

MODEL_HELP = ("a bundled model's name (digits), a checkpoint folder or a training run's folder (default: digits, "
              "the bundled model)")
DATA_HELP = ("images: digits (the bundled held-out digits), digits:train, a folder of PNG/JPEG, CIFAR-10's python "
             "batches, an .npz, or a folder sample --out wrote")


def _model(spec: str, device):
    import torch

    from ddpm_fast import bundled, checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec in bundled.MODELS:
        return bundled.pretrained(spec, device=device)
    if not Path(spec).exists():
        raise FileNotFoundError(f"no model at {spec}: give a checkpoint folder, a training run's folder, or a "
                                f"bundled name ({', '.join(bundled.MODELS)})")
    return checkpoint.load(spec, device=device)


def _data(spec: str):
    """uint8 images (N, C, H, W) and their labels where known (the bundled digits), else None."""
    from ddpm_fast import bundled
    from ddpm_fast.data import load_images

    if spec.split(":")[0] == "digits" and not Path(spec).exists():
        split = spec.partition(":")[2] or "held_out"
        return bundled.digits(split)
    return load_images(spec), None


def _say(args, text: str) -> None:
    print(f"ddpm-fast {args.command}: {text}")


# ---------------------------------------------------------------------------------------------- subcommands

def _sample(args) -> None:
    import ddpm_fast

    model = _model(args.model, args.device)
    begin = time.perf_counter()
    result = ddpm_fast.sample(model, args.n, sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
                              batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                              out=args.out, out_format=args.format, network_dtype=_network_dtype(args))
    seconds = time.perf_counter() - begin
    where = result if args.out else ddpm_fast.save_grid(result, args.output, scale=args.scale)
    steps = args.steps or model.diffusion.num_timesteps
    _say(args, f"wrote {args.n} samples to {where} ({args.sampler}, {steps} steps; {seconds:.1f} s, "
               f"{args.n / seconds:.2f} images/s)")


def _train(args) -> None:
    import ddpm_fast
    from ddpm_fast import bundled

    settings = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                                      ema_decay=args.ema_decay, seed=args.seed, objective=args.objective,
                                      checkpoint_every=args.checkpoint_every).items() if v is not None}
    if args.data == "digits":
        data, _ = bundled.digits("train")
        settings = {**bundled.DIGITS_RECIPE, **settings}
        preset = args.preset or "digits"
    else:
        data, preset = args.data, args.preset or "cifar10"
        if args.no_flip:
            settings["flip"] = False
    model = ddpm_fast.UNet.from_preset(preset)
    trainer = ddpm_fast.train(model, data, out=args.out, device=args.device, image_size=args.image_size,
                              progress=not args.quiet, **settings)
    _say(args, f"trained {preset} to step {trainer.step}; checkpoints in {args.out} "
               f"(sample from it: ddpm-fast sample --model {args.out})")


def _nll(args) -> None:
    import ddpm_fast

    model = _model(args.model, args.device)
    images, _ = _data(args.data)
    report = ddpm_fast.nll(model, images, batch_size=args.batch_size, seed=args.seed, device=args.device,
                           limit=args.limit, progress=not args.quiet, network_dtype=_network_dtype(args))
    _say(args, str(report))


def _rate_distortion(args) -> None:
    import ddpm_fast

    model = _model(args.model, args.device)
    images, _ = _data(args.data)
    rd = ddpm_fast.rate_distortion(model, images, out=args.out, batch_size=args.batch_size, seed=args.seed,
                                   device=args.device, limit=args.limit, progress=not args.quiet)
    _say(args, f"{rd.report}; wrote {Path(args.out) / 'rate_distortion.csv'} and .png")


def _interpolate(args) -> None:
    import ddpm_fast
    from ddpm_fast.data import to_model_range

    model = _model(args.model, args.device)
    images, _ = _data(args.data)
    pairs = args.pairs
    if len(images) < 2 * pairs:
        raise ValueError(f"--pairs {pairs} needs {2 * pairs} images; the data have {len(images)}")
    if args.lambdas < 2:
        raise ValueError(f"--lambdas must be at least 2 (0 and 1, the two encodings), got {args.lambdas}")
    x = to_model_range(images[:2 * pairs])
    lambdas = tuple(i / (args.lambdas - 1) for i in range(args.lambdas))
    ddpm_fast.interpolate(model, x[:pairs], x[pairs:], t=args.t, lambdas=lambdas, seed=args.seed, out=args.output,
                          progress=not args.quiet)
    _say(args, f"wrote {args.output}: {pairs} pairs (rows), {args.lambdas} mixes of their x_t at t={args.t} between "
               "the two originals")


def _quality(args) -> None:
    import ddpm_fast
    from ddpm_fast import bundled
    from ddpm_fast.evaluation import sample_quality, train_classifier

    if args.data != "digits":
        raise ValueError("quality needs labelled training images for its classifier: the bundled digits (--data "
                         "digits); for other data use ddpm_fast.evaluation.train_classifier / sample_quality, or fid")
    model = _model(args.model, args.device)
    train_images, labels = bundled.digits("train")
    classifier = train_classifier(train_images, labels, epochs=args.epochs, progress=not args.quiet)
    begin = time.perf_counter()
    samples = ddpm_fast.sample(model, args.n, sampler=args.sampler, steps=args.steps, seed=args.seed,
                               progress=not args.quiet, network_dtype=_network_dtype(args))
    seconds = time.perf_counter() - begin
    report = sample_quality(samples.cpu(), bundled.digits("held_out")[0], classifier)
    steps = args.steps or model.diffusion.num_timesteps
    _say(args, f"{args.n} samples ({args.sampler}, {steps} steps, {seconds:.0f} s): {report}")


def _progressive(args) -> None:
    import ddpm_fast

    model = _model(args.model, args.device)
    result = ddpm_fast.sample(model, args.n, seed=args.seed, device=args.device, progress=not args.quiet,
                              return_intermediates=args.every)
    path = result.save_grid(args.output, which=args.which, max_images=args.n, scale=args.scale)
    _say(args, f"wrote {path}: {args.n} images (rows), {args.which} at t = {', '.join(map(str, result.timesteps))}, "
               "then the sample")


def _bench(args) -> None:
    import torch

    import ddpm_fast
    from ddpm_fast.ops import use_backend

    model = _model(args.model, args.device)
    backends = [name for name, status in ddpm_fast.backends().items() if status.available]
    if args.backends:
        unknown = sorted(set(args.backends.split(",")) - set(ddpm_fast.backends()))
        if unknown:
            raise ValueError(f"unknown backend(s) {', '.join(unknown)}; there are {', '.join(ddpm_fast.backends())}")
        backends = [name for name in backends if name in args.backends.split(",")]
    device = next(model.parameters()).device
    _say(args, f"{args.model} on {device}, batch {args.n}, {args.steps} respaced steps, {args.rounds} rounds "
               "(median)")
    timings = {}
    for name in ["default"] + [b for b in backends if b != "default"]:
        context = use_backend(name) if name != "default" else contextlib.nullcontext()
        try:
            with context:
                ddpm_fast.sample(model, args.n, steps=args.steps, progress=False)  # warm-up
                runs = []
                for _ in range(args.rounds):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    begin = time.perf_counter()
                    ddpm_fast.sample(model, args.n, steps=args.steps, progress=False)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    runs.append((time.perf_counter() - begin) / args.steps)
        except (RuntimeError, ValueError, NotImplementedError) as error:
            print(f"  {name:9s} cannot run here: {str(error).splitlines()[0]}")
            continue
        timings[name] = sorted(runs)[len(runs) // 2]
    reference = timings.get("reference")
    for name, per_step in timings.items():
        ratio = f", {reference / per_step:.2f}x the reference backend" if reference else ""
        print(f"  {name:9s} {per_step * 1e3:8.2f} ms/step, {args.n / (1000 * per_step):8.3f} images/s over 1000 "
              f"steps{ratio}")
    print("  (the full benchmarks, against eager PyTorch and torch.compile: pytest bench/ --benchmark-only, "
          "from a source checkout)")


def _export(args) -> None:
    from ddpm_fast import bundled

    _say(args, f"wrote {bundled.export(args.run, args.destination)} (the EMA weights of {args.run}, as a model)")


def _info(args) -> None:
    import torch

    import ddpm_fast
    from ddpm_fast import bundled
    from ddpm_fast.precision import default_network_dtype

    print(f"ddpm_fast {ddpm_fast.__version__}, python {platform.python_version()}, torch {torch.__version__}, "
          f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    print("backends (default: the first available of cuda/triton/cpp on its device, else reference):")
    for name, status in ddpm_fast.backends().items():
        print(f"  {name:9s} {'yes' if status.available else 'no ':3s}  {status.reason}")
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        dtype, why = default_network_dtype(device)
        print(f"network dtype on {device} (sample's default): {str(dtype).removeprefix('torch.')}: {why}")
    for name, path in bundled.MODELS.items():
        print(f"bundled model {name}: {path if (path / 'config.json').is_file() else 'missing'}")


# ---------------------------------------------------------------------------------------------- the parser

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def _scale_option(p) -> None:
    p.add_argument("--scale", type=_positive, default=None,
                   help="enlarge the PNG grid this many times, repeating pixels (default: each image at least 64 "
                        "pixels wide, 8x for the 8x8 digits)")


def _network_dtype_option(p) -> None:
    p.add_argument("--network-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the network's precision (default auto: bf16 on a GPU or a CPU with native bf16, else "
                        "float32; ddpm-fast info says which); float32 for full precision")


def _network_dtype(args):
    import torch

    return None if args.network_dtype == "auto" else getattr(torch, args.network_dtype)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block: the usage is a --help away
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command(commands, name: str, run, help_text: str, model: bool = True, data: bool = False):
    """A subcommand running `run`, with the options every command has (--model / --device, --data where asked)."""
    p = commands.add_parser(name, help=help_text, description=help_text)
    if model:
        p.add_argument("--model", default="digits", help=MODEL_HELP)
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if there is a "
                                                      "GPU, else cpu)")
    if data:
        p.add_argument("--data", default="digits", help=DATA_HELP + " (default: digits)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for torch and our kernels (default: torch's, one per core); on a machine "
                        "another busy process shares, fewer (1 on 2 cores) avoids threads waiting on each other")
    p.set_defaults(handler=run)
    return p


def _sample_options(p) -> None:
    p.add_argument("-n", type=_positive, default=64, help="number of images (default 64)")
    p.add_argument("-o", "--output", default="samples.png", help="the PNG grid to write (default samples.png)")
    p.add_argument("--out", default=None, help="instead of a grid, stream the images into this folder (resumable)")
    p.add_argument("--format", default="png", choices=["png", "npz"], help="--out's files (default png)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="(default ddpm, the paper's)")
    p.add_argument("--steps", type=_positive, default=None,
                   help="respaced steps (default: all T = 1000; k keeps k of them evenly from t = 0 to T-1, and 1 "
                        "keeps T-1: one step from x_T to x_0, a blurry mean image)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (default 0: deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive, default=None)
    _network_dtype_option(p)
    _scale_option(p)


def _train_options(p) -> None:
    p.add_argument("--data", default="digits", help="training images: digits (the bundled digits' train split, "
                   "with the bundled recipe), or a folder / CIFAR-10 batches / .npz (the paper's recipe)")
    p.add_argument("--out", required=True, help="the run's folder (checkpoints, log.csv); an existing run resumes")
    p.add_argument("--preset", default=None, choices=["digits", "small", "cifar10"],
                   help="the network (default: digits for the digits, cifar10 otherwise)")
    p.add_argument("--image-size", type=_positive, default=None, help="resize a folder's images to this size")
    p.add_argument("--device", default=None, help="(default: cuda if there is a GPU, else cpu)")
    for flag, kind in (("--steps", _positive), ("--batch-size", _positive), ("--lr", float), ("--warmup", int),
                       ("--ema-decay", float), ("--seed", int), ("--checkpoint-every", _positive)):
        p.add_argument(flag, type=kind, default=None, help="(default: the recipe's)")
    p.add_argument("--objective", default=None, choices=["simple", "vlb"], help="(default simple, L_simple)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips (the digits have none)")


def _nll_options(p) -> None:
    p.add_argument("--limit", type=_positive, default=None, help="the first N images only")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--network-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the network's precision (default float32: the bound in full precision)")


def _rate_distortion_options(p) -> None:
    p.add_argument("-o", "--out", default="rate_distortion", help="the folder to write (default rate_distortion)")
    p.add_argument("--limit", type=_positive, default=100, help="the first N images (default 100)")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--seed", type=int, default=0)


def _interpolate_options(p) -> None:
    p.add_argument("-o", "--output", default="interpolation.png")
    p.add_argument("--pairs", type=_positive, default=4, help="pairs: the data's first N images with the next N")
    p.add_argument("--t", type=int, default=500, help="the latent's timestep, code index (default 500)")
    p.add_argument("--lambdas", type=_positive, default=9, help="mixes from 0 to 1 (default 9)")
    p.add_argument("--seed", type=int, default=0)


def _quality_options(p) -> None:
    p.add_argument("-n", type=_positive, default=256, help="samples (default 256)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--steps", type=_positive, default=None, help="respaced steps (default: all T)")
    p.add_argument("--epochs", type=_positive, default=20, help="the classifier's training epochs (default 20)")
    p.add_argument("--seed", type=int, default=0)
    _network_dtype_option(p)


def _progressive_options(p) -> None:
    p.add_argument("-n", type=_positive, default=8, help="images (rows; default 8)")
    p.add_argument("-o", "--output", default="progressive.png")
    p.add_argument("--every", type=_positive, default=100, help="record every N-th step (default 100)")
    p.add_argument("--which", default="x0_hat", choices=["x0_hat", "x_t"])
    _scale_option(p)
    p.add_argument("--seed", type=int, default=0)


def _bench_options(p) -> None:
    p.add_argument("-n", type=_positive, default=64, help="batch (default 64)")
    p.add_argument("--steps", type=_positive, default=20, help="respaced steps per run (default 20)")
    p.add_argument("--rounds", type=_positive, default=5)
    p.add_argument("--backends", default=None, help="comma-separated, e.g. reference,cpp (default: every one that "
                   "runs here)")


def _export_options(p) -> None:
    p.add_argument("run", help="a training run's folder or one of its checkpoints")
    p.add_argument("destination", help="the folder to write (replaced if it exists)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddpm-fast", description="DDPM (Ho et al. 2020) with fused kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _sample_options(_command(
        commands, "sample", _sample, "draw samples: a PNG grid, or a folder of images (--out) streamed to disk"))
    _train_options(_command(
        commands, "train", _train, "train a model (default: the bundled recipe on the bundled digits)", model=False))
    _nll_options(_command(
        commands, "nll", _nll, "the variational bound in bits/dim over a dataset, all T terms", data=True))
    _rate_distortion_options(_command(
        commands, "rate-distortion", _rate_distortion, "progressive coding: rate and distortion per t (CSV + PNG)",
        data=True))
    _interpolate_options(_command(
        commands, "interpolate", _interpolate, "interpolate pairs of images in the latent space of x_t (PNG grid)",
        data=True))
    _quality_options(_command(
        commands, "quality", _quality, "sample quality of a digits model: a classifier trained on the bundled digits "
        "rates its samples against the held-out digits (no download)", data=True))
    _progressive_options(_command(
        commands, "progressive", _progressive, "progressive generation: x0_hat (or x_t) as t falls (PNG grid)"))
    _bench_options(_command(commands, "bench", _bench, "time the sampler per step on every available backend"))
    _export_options(_command(
        commands, "export", _export, "a training run's EMA weights as a model folder of their own (what the bundled "
        "model is: ddpm-fast export runs/digits ddpm_fast/pretrained/digits)", model=False))
    _command(commands, "info", _info, "versions, devices, backends (and why one is missing), the bundled model",
             model=False)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        args.handler(args)
    except (ValueError, NotImplementedError, FloatingPointError, MemoryError, OSError) as error:
        print(f"ddpm-fast {args.command}: error: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddpm-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
