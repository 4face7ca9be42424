"""Every Triton kernel of ddpm_fast.kernels compiled ahead of time for an NVIDIA sm_90 GPU (H100/H200), without a GPU.

The CPU interpreter (TRITON_INTERPRET=1, what the other tests run here) accepts code the GPU compiler rejects and
never allocates shared memory, so this test runs the real compiler, Triton source to TTIR, TTGIR, PTX and a cubin by
ptxas, for GPUTarget("cuda", 90, 32), at the block sizes and warp counts the GPU path launches with, and checks each
kernel's shared memory fits an sm_90 block.

conftest.py sets TRITON_INTERPRET=1 before ddpm_fast is imported, which turns @triton.jit into an interpreted function
and makes the kernel modules pick their interpreter block sizes. So the compiles run in one subprocess without it
(and without DDPM_FAST_REQUIRE, which would refuse the import of ddpm_fast with no GPU and no interpreter); it reads
the case table below as JSON on stdin and prints the results, one per case, as JSON. Nothing is skipped: if Triton
cannot compile for sm_90 here at all, every case fails with the compiler's error (or with its stderr if it aborts).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Shared memory one block may use on sm_90 (H100/H200): 227 KB = 232448 bytes, the opt-in maximum
# (cudaDevAttrMaxSharedMemoryPerBlockOptin; 228 KB per SM less 1 KB reserved by the system).
SM90_MAX_SHARED_PER_BLOCK = 232448
TARGET = ("cuda", 90, 32)  # backend, compute capability 9.0, warp size

# ---------------------------------------------------------------------------------------------------- the cases
# A case is one compile: the kernel's arguments in order with their Triton types ("constexpr" for constexpr ones),
# the constexpr values, and the integer/pointer arguments the JIT would mark divisible by 16. BLOCK is filled in the
# subprocess from the module's own constant (philox: _MAX_BLOCK, diffusion_step: _BLOCK) when given as "max", so
# the test follows the code; "min" is the smallest block a launcher picks (philox: next_power_of_2(1) = 1,
# diffusion_step: _block()'s floor of 16). Warps: diffusion_step launches with _NUM_WARPS, philox with Triton's
# default (4).
#
# Scalar types: the JIT types a Python int as i32 below 2^31 and as i64 from there (seed up to 2^63 - 1, sizes past
# 2^31), and specialises an int equal to 1 to a constexpr. The "i64" cases are the generic ones (the kernels must
# handle int64 sizes and seeds); the "launch" cases mirror a typical launch: a batch of 3x32x32 images (numel 3072,
# aligned tensors, seed 1234, c3 0), contiguous (stride_s == 1) or channels_last (stride_c == 1).

FLOAT_INPUTS = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
MODULES = {"philox": "ddpm_fast.kernels.philox", "diffusion_step": "ddpm_fast.kernels.diffusion_step",
           "group_norm": "ddpm_fast.kernels.group_norm", "attention": "ddpm_fast.kernels.attention"}
BLOCKS = {"philox": {"max": "_MAX_BLOCK", "min": 1}, "diffusion_step": {"max": "_BLOCK", "min": 16},
          "group_norm": {"max": "_BLOCK", "min": 16}}
WARPS = {"philox": None, "diffusion_step": "_NUM_WARPS", "group_norm": "_NUM_WARPS", "attention": "_NUM_WARPS"}

SEED = [("seed", "i64"), ("c3", "i32")]
LAYOUT = [("numel", "i64"), ("spatial", "i64"), ("stride_b", "i64"), ("stride_c", "i64"), ("stride_s", "i64")]
NUMEL = [("numel", "i64")]
ROWS = [("timesteps", "i64")]  # the coefficient table's T
# launch values of the integer arguments: 3x32x32 images, contiguous or channels_last (sample_layout's tuples)
LAUNCH = {"n": 4096, "seed": 1234, "c3": 0, "numel": 3072, "timesteps": 1000}
LAUNCH_LAYOUT = {True: {"spatial": 3072, "stride_b": 3072, "stride_c": 0, "stride_s": 1},
                 False: {"spatial": 1024, "stride_b": 3072, "stride_c": 1, "stride_s": 3}}


def _case(name, module, kernel, ptrs, scalars, flags=None, kind="i64", block="max", contiguous=True, channels=None,
          backward=False):
    """One compile of `kernel`: pointer arguments, integer scalars with their generic types (kind "i64"), or typed
    as the JIT would at the LAUNCH values (kind "launch": 1 -> constexpr, else i32; integers that are multiples of
    16 and every pointer marked divisible by 16), then the constexpr flags and BLOCK ("max" or "min"). With
    `channels` (the attention kernels), the tile constexprs BLOCK_M, BLOCK_N, BLOCK_D instead of BLOCK, as the
    module's blocks(channels, backward) gives them for a GPU launch."""
    flags = dict(flags or {})
    signature, constexprs, divisible = list(ptrs), dict(flags), []
    if kind == "launch":
        divisible += [p for p, _ in ptrs]
        values = {**LAUNCH, **LAUNCH_LAYOUT[contiguous]}
        for arg, _ in scalars:
            if values[arg] == 1:
                signature.append((arg, "constexpr"))
                constexprs[arg] = 1
            else:
                signature.append((arg, "i32"))
                divisible += [arg] * (values[arg] % 16 == 0)
    else:
        signature += scalars
    tile = ["BLOCK_M", "BLOCK_N", "BLOCK_D"] if channels else ["BLOCK"]
    signature += [(flag, "constexpr") for flag in flags] + [(name_, "constexpr") for name_ in tile]
    flag_id = "".join(f"-{k}={v}" for k, v in flags.items())
    size = f"C={channels}" if channels else block
    return {"id": f"{name}-{kind}-{size}{flag_id}", "module": module, "kernel": kernel,
            "signature": [list(a) for a in signature], "constexprs": constexprs, "divisible": divisible,
            "block": block, "channels": channels, "backward": backward}


def _cases():
    cases = []
    for kind, block in (("i64", "max"), ("i64", "min"), ("launch", "max")):
        cases.append(_case("philox", "philox", "_philox_kernel", [("counter_ptr", "*i64"), ("words_ptr", "*i64")],
                           [("n", "i64"), ("seed", "i64")], kind=kind, block=block))
        cases.append(_case("philox_normal", "philox", "_philox_normal_kernel",
                           [("out_ptr", "*fp32"), ("sample_index_ptr", "*i64"), ("counter2_ptr", "*i64")],
                           SEED + NUMEL, kind=kind, block=block))

    # diffusion_step: every input dtype with generic scalars at the largest block; float32 also at the smallest
    # block and as launched
    variants = [(dt, "i64", "max") for dt in FLOAT_INPUTS] + [("fp32", "i64", "min"), ("fp32", "launch", "max")]
    for dt, kind, block in variants:
        x = FLOAT_INPUTS[dt]
        cases.append(_case(f"q_sample-{dt}", "diffusion_step", "_q_sample_kernel",
                           [("x0_ptr", x), ("noise_ptr", x), ("t_ptr", "*i64"), ("coef_ptr", "*fp32"),
                            ("x_t_ptr", "*fp32")], ROWS + NUMEL, kind=kind, block=block))
        for contiguous in (True, False):
            cases.append(_case(f"q_sample_philox-{dt}", "diffusion_step", "_q_sample_philox_kernel",
                               [("x0_ptr", x), ("t_ptr", "*i64"), ("coef_ptr", "*fp32"), ("sample_index_ptr", "*i64"),
                                ("counter2_ptr", "*i64"), ("x_t_ptr", "*fp32"), ("eps_ptr", "*fp32")],
                               ROWS + SEED + LAYOUT, {"CONTIGUOUS": contiguous}, kind, block, contiguous))
        cases.append(_case(f"simple_loss-{dt}", "diffusion_step", "_simple_loss_kernel",
                           [("eps_pred_ptr", x), ("eps_ptr", x), ("partial_ptr", "*fp32")], NUMEL,
                           {"ACC": "float32"}, kind, block))  # tl.float32, resolved in the subprocess
        cases.append(_case(f"simple_loss_backward-{dt}", "diffusion_step", "_simple_loss_backward_kernel",
                           [("grad_ptr", "*fp32"), ("eps_pred_ptr", x), ("eps_ptr", x), ("grad_pred_ptr", x)],
                           NUMEL, kind=kind, block=block))

    # reverse_step (CLIP, WRITE_X0, CONTIGUOUS): all eight in float32, three with half-precision eps, two at the
    # smallest block, two as launched; the state x_t (and so x_prev, x0_hat, coef) is float32
    all_flags = [(c, w, g) for c in (True, False) for w in (True, False) for g in (True, False)]
    some_flags = [(True, True, True), (False, False, True), (True, True, False)]
    reverse_variants = ([("fp32", "i64", "max", f) for f in all_flags]
                        + [(dt, "i64", "max", f) for dt in ("bf16", "fp16") for f in some_flags]
                        + [("fp32", "i64", "min", f) for f in ((True, True, True), (True, True, False))]
                        + [("fp32", "launch", "max", f) for f in ((True, False, True), (True, False, False))])
    for dt, kind, block, (clip, write_x0, contiguous) in reverse_variants:
        cases.append(_case(f"reverse_step-{dt}", "diffusion_step", "_reverse_step_kernel",
                           [("x_t_ptr", "*fp32"), ("eps_ptr", FLOAT_INPUTS[dt]), ("t_ptr", "*i64"),
                            ("coef_ptr", "*fp32"), ("sample_index_ptr", "*i64"), ("counter2_ptr", "*i64"),
                            ("x_prev_ptr", "*fp32"), ("x0_hat_ptr", "*fp32")], ROWS + SEED + LAYOUT,
                           {"CLIP": clip, "WRITE_X0": write_x0, "CONTIGUOUS": contiguous}, kind, block, contiguous))
    # group_norm (HAS_ADD, ACT, DROPOUT, CHANNELS_LAST): the ResBlock's norm2 (add, SiLU, dropout), the attention norm
    # (neither), channels_last; every input dtype; the statistics and small inputs in float32
    gn_scalars = [("channels", "i64"), ("spatial", "i64"), ("groups", "i64")]
    gn_flags = [(True, True, True, False), (False, False, False, False), (True, True, True, True)]
    for dt, block in [(dt, "max") for dt in FLOAT_INPUTS] + [("fp32", "min")]:
        x = FLOAT_INPUTS[dt]
        for has_add, act, dropout, channels_last in gn_flags:
            flags = {"HAS_ADD": has_add, "ACT": act, "DROPOUT": dropout, "CHANNELS_LAST": channels_last,
                     "ACC": "float32"}
            small = [("weight_ptr", "*fp32"), ("bias_ptr", "*fp32"), ("add_ptr", "*fp32")]
            stats = [("shift_ptr", "*fp32"), ("rstd_ptr", "*fp32")]
            keys = [("sample_index_ptr", "*i64"), ("counter2_ptr", "*i64")]
            cases.append(_case(f"group_norm_forward-{dt}", "group_norm", "_group_norm_forward_kernel",
                               [("x_ptr", x), ("y_ptr", x)] + small + stats + keys,
                               gn_scalars + [("eps", "fp32"), ("seed", "i64"), ("c3", "i32"), ("p", "fp32"),
                                             ("scale", "fp32")], flags, block=block))
            cases.append(_case(f"group_norm_backward-{dt}", "group_norm", "_group_norm_backward_kernel",
                               [("dy_ptr", x), ("x_ptr", x), ("dx_ptr", x)] + small + stats + keys
                               + [("dw_ptr", "*fp32"), ("db_ptr", "*fp32"), ("dadd_ptr", "*fp32")],
                               gn_scalars + [("seed", "i64"), ("c3", "i32"), ("p", "fp32"), ("scale", "fp32")],
                               flags, block=block))
    # attention (flash attention on the folded weights): float32 tiles, the head widths of the cifar10 preset (256) and
    # of the 256x256 checkpoints (512), and a narrow one
    for channels in (64, 256, 512):
        tensors = [("g_ptr", "*fp32"), ("h_ptr", "*fp32")]
        sizes = [("channels", "i64"), ("tokens", "i64")]
        cases.append(_case("attention_forward", "attention", "_attention_forward_kernel",
                           tensors + [("o_ptr", "*fp32"), ("lse_ptr", "*fp32")], sizes, channels=channels))
        backward = tensors + [("do_ptr", "*fp32"), ("lse_ptr", "*fp32"), ("delta_ptr", "*fp32")]
        cases.append(_case("attention_backward_query", "attention", "_attention_backward_query_kernel",
                           backward + [("dg_ptr", "*fp32")], sizes, channels=channels, backward=True))
        cases.append(_case("attention_backward_key", "attention", "_attention_backward_key_kernel",
                           backward + [("dh_ptr", "*fp32")], sizes, channels=channels, backward=True))
    return cases


CASES = _cases()
KERNELS = {"_philox_kernel", "_philox_normal_kernel", "_q_sample_kernel", "_q_sample_philox_kernel",
           "_simple_loss_kernel", "_simple_loss_backward_kernel", "_reverse_step_kernel",
           "_group_norm_forward_kernel", "_group_norm_backward_kernel", "_attention_forward_kernel",
           "_attention_backward_query_kernel", "_attention_backward_key_kernel"}

# ---------------------------------------------------------------------------------------------------- the compiler
_COMPILE = r"""
import importlib, json, os, sys, time, traceback
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

request = json.load(sys.stdin)
target = GPUTarget(*request["target"])
modules = {key: importlib.import_module(name) for key, name in request["modules"].items()}
info = {"triton": triton.__version__,
        "files": {key: m.__file__ for key, m in modules.items()},
        "interpreted": {key: m._INTERPRETED for key, m in modules.items()},
        "blocks": {key: {size: (getattr(modules[key], v) if isinstance(v, str) else v) for size, v in sizes.items()}
                   for key, sizes in request["blocks"].items()},
        "warps": {key: getattr(modules[key], v) if v else None for key, v in request["warps"].items()}}
results = []
for case in request["cases"]:
    module = modules[case["module"]]
    result = {"id": case["id"], "ok": False}
    start = time.perf_counter()
    try:
        fn = getattr(module, case["kernel"])
        if not isinstance(fn, triton.runtime.JITFunction):
            raise TypeError(f"{case['kernel']} is a {type(fn).__name__}, not a JITFunction (is TRITON_INTERPRET set?)")
        names = [name for name, _ in case["signature"]]
        if names != list(fn.arg_names):
            raise TypeError(f"the test's argument list {names} is not the kernel's {list(fn.arg_names)}")
        constexprs = {k: getattr(tl, v) if isinstance(v, str) else v for k, v in case["constexprs"].items()}
        if case["channels"]:
            block = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_D"), module.blocks(case["channels"], case["backward"])))
        else:
            block = {"BLOCK": info["blocks"][case["module"]][case["block"]]}
        constexprs.update(block)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in case["divisible"]}
        src = triton.compiler.ASTSource(fn, dict(case["signature"]), constexprs, attrs)
        warps = info["warps"][case["module"]]
        compiled = triton.compile(src, target=target, options={"num_warps": warps} if warps else None)
        meta = compiled.metadata
        result.update(ok=True, block=block, shared=meta.shared, num_warps=meta.num_warps,
                      global_scratch_size=meta.global_scratch_size, arch=meta.arch,
                      cubin_bytes=len(compiled.asm.get("cubin", b"")),
                      ptx_target=next((line.split()[1] for line in compiled.asm["ptx"].splitlines()
                                       if line.startswith(".target")), None))
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_tb(e.__traceback__, limit=-6))
    result["seconds"] = round(time.perf_counter() - start, 2)
    results.append(result)
print(json.dumps({"info": info, "results": results}))
"""


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    """Compile every case in subprocesses (no TRITON_INTERPRET, fresh Triton caches so nothing is reused), one per
    core, each taking every k-th case: the compiles are single-threaded, and nothing else runs meanwhile."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "DDPM_FAST_REQUIRE", "DDPM_FAST_BACKEND")}
    workers = max(1, min(len(os.sched_getaffinity(0)), 4))
    running = []
    for k in range(workers):
        env_k = dict(env, TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton_cache")))
        request = {"target": list(TARGET), "modules": MODULES, "blocks": BLOCKS, "warps": WARPS,
                   "cases": CASES[k::workers]}
        # -P and a cwd outside the checkout: import the installed ddpm_fast, never the repository's copy
        process = subprocess.Popen([sys.executable, "-P", "-c", _COMPILE], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_k,
                                   cwd=tmp_path_factory.mktemp("aot_cwd"))
        process.stdin.write(json.dumps(request))  # (read whole before any compile: all of them start now)
        process.stdin.close()
        process.stdin = None  # (so that communicate() below does not touch it)
        running.append(process)
    outputs = []
    for process in running:
        stdout, stderr = process.communicate(timeout=300)
        if process.returncode != 0:
            pytest.fail(f"an AOT compile subprocess failed (rc {process.returncode}):\n{stderr[-6000:]}")
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    return {"info": outputs[0]["info"], "results": {r["id"]: r for out in outputs for r in out["results"]}}


def test_the_cases_cover_every_kernel():
    assert {c["kernel"] for c in CASES} == KERNELS
    assert len({c["id"] for c in CASES}) == len(CASES)


def test_the_compile_sees_the_installed_gpu_kernels(aot):
    info = aot["info"]
    for key, path in info["files"].items():
        assert not Path(path).resolve().is_relative_to(REPO / "ddpm_fast"), path
        assert info["interpreted"][key] is False, f"{key} was imported with TRITON_INTERPRET=1"
    # the GPU block sizes: powers of two, multiples of 4 where _normals splits a block into counters of four
    for key, sizes in info["blocks"].items():
        assert sizes["max"] >= sizes["min"] >= 1 and sizes["max"] & (sizes["max"] - 1) == 0, (key, sizes)
    assert info["blocks"]["diffusion_step"]["min"] % 4 == 0


@pytest.mark.parametrize("case_id", [c["id"] for c in CASES])
def test_kernel_compiles_for_sm90_and_fits_shared_memory(aot, case_id, record_property):
    result = aot["results"][case_id]
    record_property("shared_bytes", result.get("shared"))  # in the JUnit XML (--junitxml) with the compile time
    record_property("compile_seconds", result["seconds"])
    assert result["ok"], f"{case_id} does not compile for sm_90:\n{result['error']}"
    assert result["arch"] == "sm90" and result["cubin_bytes"] > 0 and result["ptx_target"].startswith("sm_90")
    assert result["shared"] <= SM90_MAX_SHARED_PER_BLOCK, (
        f"{case_id} needs {result['shared']} bytes of shared memory, over sm_90's {SM90_MAX_SHARED_PER_BLOCK}")
    # a kernel needing global scratch fails at launch unless triton.set_allocator was called, which ddpm_fast is not
    assert result["global_scratch_size"] == 0, f"{case_id} needs {result['global_scratch_size']} bytes of scratch"
