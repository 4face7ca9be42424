"""Shared benchmark helpers."""
import torch

# Triton is timed on a GPU only: under the CPU interpreter its times mean nothing.
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
# The suite's length: quick (the default: every comparison once, at the shapes that matter, with short rounds; about
# 5 minutes on 2 CPU cores) or full (--bench-full: every shape, size and layout, torch.compile everywhere it is
# compared, longer rounds). bench/conftest.py sets it from the command line before the bench modules are imported.
FULL = False


def pick(quick, full):
    """`full` under --bench-full, else `quick` (read when a bench module is imported)."""
    return full if FULL else quick


def full() -> bool:
    """Whether this is the --bench-full run (for a bench that runs in the full suite only)."""
    return FULL


def role_name(role: str, bf16: bool) -> str:
    """A row's name in its group: "eager", "compiled", "ours", with " bf16" for a bf16 network (the suffix
    conftest.baseline_ratio reads)."""
    return f"{role} bf16" if bf16 else role


def max_time():
    """pytest-benchmark's max_time for the per-op benches: enough rounds for a median."""
    return pick(0.15, 0.5)


def sync():
    if GPU:
        torch.cuda.synchronize()


def shape_name(shape) -> str:
    """(64, 3, 32, 32) -> "64x3x32x32", for groups and ids."""
    return "x".join(map(str, shape))


def timed(benchmark, group, run, role, nbytes=None, backend=None):
    """Times run() with the device synchronised; marks its role ("eager", "compiled", "copy" or ours) and the bytes
    it must move for the GB/s summary in bench/conftest.py."""
    def run_synced():
        run()
        sync()

    benchmark.group = group
    benchmark.extra_info["role"] = role
    if backend is not None:
        benchmark.extra_info["backend"] = backend
    if nbytes is not None:
        benchmark.extra_info["bytes"] = nbytes
    benchmark(run_synced)


def timed_rounds(benchmark, group, run, **info):
    """Times whole runs of run() (a sampler call, some training steps) with the device synchronised: one untimed
    first call (first touch: the allocator, oneDNN primitives, packed weights, Triton and cuBLAS choices), then 3
    rounds (5 under --bench-full); under --benchmark-disable one call. `info` goes to extra_info (role, images,
    steps, ... for the tables in bench/conftest.py)."""
    benchmark.group = group
    benchmark.extra_info.update(info)

    def run_synced():
        run()
        sync()

    if not benchmark.disabled:
        run_synced()
    benchmark.pedantic(run_synced, rounds=1 if benchmark.disabled else pick(3, 5), warmup_rounds=0)


def random_unet(preset: str, device=DEVICE):
    """The preset's U-Net on `device` in eval mode, every parameter ~N(0, 0.05) from seed 0: fresh norms and the
    zero-initialised output convs would make parts of the network trivial."""
    import ddpm_fast  # here: bench/conftest.py sets the environment ddpm_fast's import reads

    torch.manual_seed(0)
    net = ddpm_fast.UNet.from_preset(preset).to(device).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net
