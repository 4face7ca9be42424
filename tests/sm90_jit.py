"""Compile for an sm_90 GPU (H100/H200), without a GPU, exactly what Triton's JIT compiles on one.

Run as a program (tests/test_sm90_jit.py does, once per Triton version): `python tests/sm90_jit.py [--only NAME]`
prints one JSON object. It runs the public API (sample, train, nll, p_sample, q_sample, the Philox draws, the attention
block forward and backward) on CPU tensors with every op on its Triton backend, and every Triton launch goes through
Triton's own JITFunction.run with warmup=True under a stand-in driver that reports an sm_90 target: the JIT binds the
real arguments, specialises them as it would on the GPU (an int equal to 1 becomes a constexpr, ints and pointers
divisible by 16 are marked), compiles Triton -> TTIR -> TTGIR -> PTX -> cubin (ptxas) and launches nothing. Each
distinct compiled kernel is reported with its specialisation and its resources: registers and stack bytes from the
cubin (cuobjdump), spill bytes from Triton's own ptxas -v log of it, shared memory from the compiler's metadata.

Since nothing launches, a kernel's outputs are whatever memory held: the stand-in launch zeroes every floating
tensor argument, so that the run downstream stays finite (a NaN check or a non-finite loss would otherwise stop a
workload before all its launches); the specialisations do not depend on values. The U-Net's steps are alike (t is a
tensor, the step's position never reaches a kernel as an int), so long runs stop after `stop_after` launches of one
kernel; the digits preset also runs whole (batch 16 and 1), and the test checks that it compiles nothing the
truncated run did not.

No TRITON_INTERPRET here: the kernel modules must be imported as the GPU imports them (JITFunctions, GPU block
sizes). Neither ddpm_fast's registry nor Triton lets Triton run on CPU tensors outside the interpreter, so this
program allows it in the registry (status_on), replaces the driver, and stands in for the NVIDIA backend's
`subprocess` to keep ptxas's log (_PtxasLogs); nothing else is patched. It compiles into an empty Triton cache of its
own, so every specialisation is compiled here.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: @triton.jit reads it at decoration
# an empty cache of its own: every specialisation is compiled here, ptxas log and all (Triton reads this on import)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sm90_jit_triton_cache_")
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# Shared memory one block may use on sm_90: 227 KB (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SM90_MAX_SHARED_PER_BLOCK = 232448
SEEDS = (0, 1, 2**40 + 3)  # 1: the JIT's constexpr; 2**40 + 3: an int64


class StandInDriver:
    """What JITFunction.run asks of the active driver before it launches: the target, a device and a stream."""

    def is_active(self):
        return True

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class Enough(Exception):
    """Raised by the stand-in launch once a workload's `stop_after` budget is spent (its remaining steps repeat)."""


class Recorder:
    def __init__(self):
        self.kernels: dict[tuple[str, str], dict] = {}
        self.failures: dict[tuple[str, str], dict] = {}
        self.workload = None
        self.channels = 0  # the workload's widest attention head
        self.budget: dict[str, int] = {}
        self.launches = 0

    def compiled(self, fn: JITFunction, kernel, ptxas_logs: list[str]) -> None:
        name = fn.__name__
        spec = specialisation(kernel.src)
        entry = self.kernels.get((name, spec))
        if entry is None:  # a first sight is a fresh compile (the checker's own empty cache): one ptxas log
            if len(ptxas_logs) != 1:
                raise RuntimeError(f"{len(ptxas_logs)} ptxas runs for the first compile of {name} [{spec}]")
            entry = self.kernels[(name, spec)] = dict(kernel=name, specialisation=spec, workloads=[], channels=[],
                                                      **resources(kernel, ptxas_logs[0]))
        if self.workload not in entry["workloads"]:
            entry["workloads"].append(self.workload)
            entry["channels"].append(self.channels)

    def failed(self, fn: JITFunction, args, kwargs, error: Exception) -> None:
        text = f"{type(error).__name__}: {error}"
        key = (fn.__name__, text)
        if key not in self.failures:
            self.failures[key] = dict(kernel=fn.__name__, error=text[-3000:], arguments=describe(fn, args, kwargs),
                                      workloads=[])
        if self.workload not in self.failures[key]["workloads"]:
            self.failures[key]["workloads"].append(self.workload)

    def spend(self, fn: JITFunction) -> None:
        self.launches += 1
        if fn.__name__ in self.budget:
            self.budget[fn.__name__] -= 1
            if self.budget[fn.__name__] <= 0:
                raise Enough()


RECORDER = Recorder()
_JIT_RUN = JITFunction.run


def _stand_in_run(self, *args, grid, warmup, **kwargs):
    """JITFunction.run as on a GPU up to the launch: bind, specialise, compile (cached per specialisation)."""
    seen = len(_PtxasLogs.logs)
    try:
        kernel = _JIT_RUN(self, *args, grid=grid, warmup=True, **kwargs)
        RECORDER.compiled(self, kernel, _PtxasLogs.logs[seen:])
    except Exception as error:  # noqa: BLE001 - recorded with its arguments; the workload goes on
        RECORDER.failed(self, args, kwargs, error)
        kernel = None
    with torch.no_grad():
        for arg in list(args) + list(kwargs.values()):
            if isinstance(arg, torch.Tensor) and arg.is_floating_point():
                arg.data.zero_()  # (.data: no version bump, autograd's saved tensors stay valid)
    RECORDER.spend(self)
    return kernel


def specialisation(src) -> str:
    """name=type for every argument, with the JIT's constexpr values and divisibility marks."""
    constexprs = {path[0] if isinstance(path, tuple) else path: value for path, value in src.constants.items()}
    names = list(src.fn.arg_names)
    attrs = {}
    for path, values in (src.attrs or {}).items():
        index = path[0] if isinstance(path, tuple) else path
        attrs[index] = ",".join(f"{k.removeprefix('tt.')}={v}" for k, v in values)
    words = []
    for i, name in enumerate(names):
        kind = src.signature[name]
        if kind == "constexpr":
            value = constexprs.get(i, constexprs.get(name))
            value = getattr(value, "value", value)
            words.append(f"{name}={value}")
        else:
            words.append(f"{name}:{kind}" + (f"[{attrs[i]}]" if i in attrs else ""))
    return " ".join(words)


def describe(fn, args, kwargs) -> str:
    """The arguments of a launch whose compile failed, as the JIT saw them (tensors: dtype and address mod 16)."""
    def one(value):
        if isinstance(value, torch.Tensor):
            return f"{str(value.dtype).removeprefix('torch.')}@{value.data_ptr() % 16}"
        return repr(value)
    words = [f"{name}={one(value)}" for name, value in zip(fn.arg_names, args)]
    return " ".join(words + [f"{k}={one(v)}" for k, v in kwargs.items()])


def _tool(name: str) -> str:
    """Triton's own copy of a CUDA tool (its NVIDIA backend ships ptxas and cuobjdump), else the PATH's."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else name


class _PtxasLogs:
    """Triton's NVIDIA backend runs `ptxas -v` with its log in a temporary file that it deletes: this stands in for
    the module's `subprocess` and keeps each log, so that the spills reported are those of the cubin Triton made."""

    logs: list[str] = []

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, command, *args, **kwargs):
        result = subprocess.run(command, *args, **kwargs)
        log = kwargs.get("stderr")
        if isinstance(command, list) and "-v" in command and hasattr(log, "name"):
            self.logs.append(Path(log.name).read_text())
        return result


def resources(kernel, ptxas_log: str) -> dict:
    """Per thread: registers and stack bytes (cuobjdump on the cubin), spill stores and loads (Triton's own ptxas -v
    log of it). Per block: shared memory, warps and pipeline stages (the compiler's metadata). The stack also holds
    local arrays (libdevice's sin/cos keep one for large arguments): spills are what ptxas reports as such."""
    meta = kernel.metadata
    out = dict(shared=meta.shared, num_warps=meta.num_warps, num_stages=meta.num_stages,
               global_scratch=getattr(meta, "global_scratch_size", 0), arch=str(getattr(meta, "arch", "")),
               cubin_bytes=len(kernel.asm["cubin"]))
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder, "k.cubin")
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage.stdout)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    registers = re.search(r"Used (\d+) registers", ptxas_log)
    if match is None or spills is None or registers is None or int(registers[1]) != int(match[1]):
        raise RuntimeError(f"cannot read the resources of {meta.name} (cuobjdump: {usage.stdout}{usage.stderr}; "
                           f"ptxas: {ptxas_log})")
    out.update(registers=int(match[1]), stack=int(match[2]), spill_stores=int(spills[1]), spill_loads=int(spills[2]))
    return out


# ---------------------------------------------------------------------------------------------------- workloads
# name -> (function, widest attention head (C) it runs, {kernel: launches after which it stops})
WORKLOADS: dict[str, tuple] = {}
# Reverse steps compiled per sample() run: later steps launch what the first two did (the witnesses). Two, not one:
# at batch 1 the Python loop's t is a view into its table of steps, 8 B further each step, so its pointer's
# alignment (a specialisation) alternates from step to step.
STEPS_SEEN = 2


# (a whole run, the same run stopped after STEPS_SEEN steps) at batch 16 and at batch 1
WITNESSES = [(f"sample-digits-n{n}-steps100-whole", f"sample-digits-n{n}-steps100-first-steps") for n in (16, 1)]


def workload(name, channels, stop_after=None):
    def register(fn):
        WORKLOADS[name] = (fn, channels, stop_after or {})
        return fn
    return register


_MODELS: dict = {}


def _model(preset, channels_last=False, dropout=None):
    """One U-Net per (preset, layout, dropout), random weights (they never reach a kernel: values do not matter)."""
    import ddpm_fast
    key = (preset, channels_last, dropout)
    if key not in _MODELS:
        torch.manual_seed(0)
        overrides = {} if dropout is None else {"dropout": dropout}
        model = ddpm_fast.UNet.from_preset(preset, **overrides)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        _MODELS[key] = model
    return _MODELS[key]


def _widest(preset: str) -> int:
    """The preset's widest feature map (ch x the largest multiplier): a bound on its attention blocks' width."""
    from ddpm_fast.unet import PRESETS
    return PRESETS[preset]["ch"] * max(PRESETS[preset]["ch_mult"])



def _sample_workloads():
    import ddpm_fast
    for preset in ("digits", "small", "cifar10"):
        for channels_last in (False, True):
            for sampler in ("ddpm", "ddim"):
                for batch in (1, 16):
                    for seed in SEEDS:
                        name = (f"sample-{preset}-{'channels_last' if channels_last else 'contiguous'}-{sampler}"
                                f"-n{batch}-seed{seed}")

                        def run(preset=preset, channels_last=channels_last, sampler=sampler, batch=batch, seed=seed):
                            # as a GPU's defaults: bf16 autocast network, 1000 DDPM steps or DDIM's usual 50
                            ddpm_fast.sample(_model(preset, channels_last), batch, sampler=sampler,
                                             steps=50 if sampler == "ddim" else None, seed=seed, progress=False,
                                             network_dtype=torch.bfloat16)
                        workload(name, _widest(preset), {"_reverse_step_kernel": STEPS_SEEN})(run)
    # float32 networks (network_dtype=torch.float32): the kernels' float32 inputs
    for preset in ("digits", "cifar10"):
        def run_fp32(preset=preset):
            ddpm_fast.sample(_model(preset), 16, progress=False, network_dtype=torch.float32)
        workload(f"sample-{preset}-contiguous-ddpm-n16-seed0-float32", _widest(preset),
                 {"_reverse_step_kernel": STEPS_SEEN})(run_fp32)

    # the truncation's witnesses: a run of 100 steps whole, and the same run stopped after STEPS_SEEN steps
    for n, (whole, first) in zip((16, 1), WITNESSES):
        def witness(n=n):
            ddpm_fast.sample(_model("digits"), n, steps=100, progress=False, network_dtype=torch.bfloat16)
        workload(whole, _widest("digits"))(witness)
        workload(first, _widest("digits"), {"_reverse_step_kernel": STEPS_SEEN})(witness)

    # several batches, whole: batch b's NaN flag is a view at 8 b bytes into the run's (its pointer's alignment)
    for preset in ("digits", "small", "cifar10"):
        def batches(preset=preset):
            ddpm_fast.sample(_model(preset), 3, batch_size=1, steps=2, progress=False, network_dtype=torch.bfloat16)
        workload(f"sample-{preset}-3-batches-of-1", _widest(preset))(batches)


def _train_workloads():
    import ddpm_fast
    # the paper's batch of 128 on the digits; the cifar10 network at a batch the CPU affords (the specialisations
    # depend on a sample's shape, not on the batch); precision "auto" is bf16 on a GPU
    combos = [(preset, batch, dropout, precision) for preset, batch in (("digits", 128), ("small", 32))
              for dropout in (0.0, 0.1) for precision in ("bfloat16", "float32")]
    combos += [("cifar10", 2, 0.1, "bfloat16"), ("cifar10", 2, 0.0, "bfloat16"), ("cifar10", 2, 0.1, "float32")]
    for preset, batch, dropout, precision in combos:
                def run(preset=preset, batch=batch, dropout=dropout, precision=precision):
                    model = _model(preset, dropout=dropout)
                    size = model.image_size
                    data = torch.randint(0, 256, (batch, size, size, model.in_channels), dtype=torch.uint8,
                                         generator=torch.Generator().manual_seed(0)).numpy()
                    ddpm_fast.train(model, data, steps=1, batch_size=batch, precision=precision, progress=False,
                                    warmup=1)
                workload(f"train-{preset}-dropout{dropout}-{precision}-batch{batch}", _widest(preset))(run)


def _nll_workloads():
    import ddpm_fast

    @workload("nll-digits", _widest("digits"), {"_q_sample_philox_kernel": 2})  # every t launches the same kernels
    def run():
        data = torch.randint(0, 256, (3, 8, 8, 1), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(0)).numpy()
        ddpm_fast.nll(_model("digits"), data, batch_size=2, progress=False)


def _p_sample_workloads():
    import ddpm_fast
    for preset in ("digits", "cifar10"):
        @workload(f"p_sample-{preset}", _widest(preset))  # one public reverse step: no NaN flag
        def run(preset=preset):
            model = _model(preset)
            x = torch.randn(2, model.in_channels, model.image_size, model.image_size)
            ddpm_fast.Diffusion().p_sample(model, x, torch.tensor([999, 3]))


def _q_sample_workloads():
    import ddpm_fast
    for preset in ("digits", "cifar10"):
        for dtype in (torch.float32, torch.bfloat16):
            for channels_last in (False, True):
                name = (f"q_sample-given-noise-{preset}-{str(dtype).removeprefix('torch.')}"
                        f"-{'channels_last' if channels_last else 'contiguous'}")

                @workload(name, _widest(preset))
                def run(preset=preset, dtype=dtype, channels_last=channels_last):
                    model = _model(preset)
                    shape = (4, model.in_channels, model.image_size, model.image_size)
                    layout = torch.channels_last if channels_last else torch.contiguous_format
                    x0 = torch.rand(shape, dtype=dtype).contiguous(memory_format=layout)
                    noise = torch.randn(shape, dtype=dtype).contiguous(memory_format=layout)
                    for t in (0, torch.tensor([1, 5, 999, 500])):
                        ddpm_fast.Diffusion().q_sample(x0, t, noise)


def _philox_workloads():
    from ddpm_fast.ops import philox
    for stream in range(7):  # every stream in use (1: the JIT's constexpr)
        for seed in SEEDS:
            @workload(f"philox-randn-stream{stream}-seed{seed}", 0)
            def run(stream=stream, seed=seed):
                index = torch.arange(3)
                philox.randn(index, torch.full_like(index, 7), (3, 5, 5), seed=seed, stream=stream)
    for seed in SEEDS:
        @workload(f"philox-words-seed{seed}", 0)
        def words(seed=seed):
            philox.philox(torch.arange(40, dtype=torch.int64).view(10, 4), seed)


def _attention_workloads():
    from ddpm_fast.ops import attention
    for channels in (64, 128, 256, 512):
        for dtype in (torch.float32, torch.bfloat16):
            for side in (8, 16):
                name = f"attention_block-C{channels}-{side}x{side}-{str(dtype).removeprefix('torch.')}"

                def run(channels=channels, dtype=dtype, side=side):
                    g = torch.Generator().manual_seed(0)
                    x = torch.randn(2, channels, side, side, generator=g, dtype=dtype, requires_grad=True)
                    params = [torch.randn(*shape, generator=g, requires_grad=True) for shape in
                              ((channels,), (channels,), (3 * channels, channels), (3 * channels,),
                               (channels, channels), (channels,))]
                    y = attention.attention_block(x, *params, 32, 1e-6)
                    y.float().sum().backward()
                workload(name, channels)(run)


def _register_all():
    _sample_workloads()
    _train_workloads()
    _nll_workloads()
    _p_sample_workloads()
    _q_sample_workloads()
    _philox_workloads()
    _attention_workloads()


# ---------------------------------------------------------------------------------------------------- main
def _allow_triton_on_cpu():
    from ddpm_fast.ops import registry
    status_on = registry.status_on

    def status(backend, device):
        if backend == "triton" and device.type == "cpu":
            return registry.BackendStatus(True, "")
        return status_on(backend, device)
    registry.status_on = status


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run only workloads whose name starts with this")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    args = parser.parse_args(argv)
    triton.runtime.driver.set_active(StandInDriver())
    JITFunction.run = _stand_in_run
    from triton.backends.nvidia import compiler as nvidia_compiler
    nvidia_compiler.subprocess = _PtxasLogs()
    torch.set_num_threads(1)  # one process per core (the test runs one per Triton version)
    import ddpm_fast
    from ddpm_fast import kernels
    _allow_triton_on_cpu()
    _register_all()
    if args.list:
        print("\n".join(WORKLOADS))
        return
    chosen = [n for n in WORKLOADS if not args.only or any(n.startswith(p) for p in args.only)]
    runs = []
    with ddpm_fast.ops.use_backend("triton"):
        for name in chosen:
            fn, channels, stop_after = WORKLOADS[name]
            RECORDER.workload, RECORDER.channels = name, channels
            RECORDER.budget, RECORDER.launches = dict(stop_after), 0
            start = time.perf_counter()
            outcome = "ok"
            try:
                fn()
            except Enough:
                outcome = "stopped"
            except Exception as error:  # noqa: BLE001 - reported; the other workloads still run
                outcome = f"error: {type(error).__name__}: {error}\n" + "".join(
                    traceback.format_tb(error.__traceback__)[-4:])
            runs.append(dict(name=name, channels=channels, outcome=outcome, launches=RECORDER.launches,
                             seconds=round(time.perf_counter() - start, 2)))
    files = sorted({Path(importlib.import_module(f"ddpm_fast.kernels{m}").__file__).name
                    for m in ("", ".philox", ".diffusion_step", ".group_norm", ".attention", ".layout")})
    print(json.dumps(dict(triton=triton.__version__, torch=torch.__version__, triton_file=triton.__file__,
                          kernel_files=[str(Path(kernels.__file__).parent / f) for f in files],
                          kernels=list(RECORDER.kernels.values()), failures=list(RECORDER.failures.values()),
                          package_dir=str(Path(ddpm_fast.__file__).parent), runs=runs, witnesses=WITNESSES)))


if __name__ == "__main__":
    sys.exit(main())
