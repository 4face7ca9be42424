"""How much memory a call takes at its peak, and how much a device has free: what the sampler's default batch size
is made of, and what the benchmarks report.

CUDA: the caching allocator's counters (torch.cuda.max_memory_allocated, torch.cuda.mem_get_info). CPU: torch's CPU
tensors come from glibc's malloc, which keeps no peak, so peak_bytes polls mallinfo2 (the bytes malloc has handed
out) every 0.1 ms from a second thread while the call runs (torch releases the GIL inside its ops, so the thread
sees what they hold); free memory is /proc/meminfo's MemAvailable. Elsewhere (no glibc, no /proc) both give None.
"""
from __future__ import annotations

import ctypes
import threading
import time
from typing import Callable

import torch


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (2.33 and newer)
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc.mallinfo2
    except (OSError, AttributeError):
        return None


_MALLINFO2 = _mallinfo2()


def _malloc_bytes() -> int:
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd  # heap chunks in use + mmapped chunks


def peak_bytes(run: Callable[[], object], device: torch.device) -> int | None:
    """The most memory one call of run() holds beyond what was allocated before it, in bytes; None where it cannot
    be read (a CPU without glibc's mallinfo2, a device other than CPU and CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu" or _MALLINFO2 is None:
        return None
    base = _malloc_bytes()
    top, done = [base], threading.Event()

    def poll():
        while not done.is_set():
            top[0] = max(top[0], _malloc_bytes())
            time.sleep(1e-4)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        run()
    finally:
        done.set()
        watcher.join()
    return max(top[0], _malloc_bytes()) - base


def free_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on `device` can still get, in bytes; None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
