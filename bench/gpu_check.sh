#!/usr/bin/env bash
# The run on a rented GPU machine: one command of at most 480 s on a fresh H200 (python3 with a CUDA torch, triton,
# nvcc, ninja, pybind11, pytest-timeout, pytest-xdist; no network; a cold Triton cache) that leaves a whole report in
# $OUT. Stages in priority order, each under its own cap (SIGTERM at the cap, SIGKILL 5 s later):
#   build   pip install . with the CUDA kernels (DDPM_FAST_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=nproc)
#   import  import ddpm_fast, backends(): cpp with its CUDA kernels, Triton on CUDA; each op's default backend
#   ops     each op on CUDA against the CPU reference (the gpu-marked tests of the ops' test files)
#   sample  sample(): CUDA graph vs Python loop vs the CPU's images (tests/test_sampling.py; test_multi_gpu.py skips)
#   train   one cifar10 bf16 training step against the CPU's float32 step (tests/test_training.py -m gpu)
#   bench   bench/bench_*.py, one file per pytest run, each capped, while the budget lasts
# Only gpu-marked tests run here (CI runs the CPU ones). Each stage appends its row (stage, status, seconds, pytest
# tally or last line, junit file) to $OUT/summary.md the moment it ends, so a run killed at 480 s keeps every
# finished stage's result. pytest: --tb=short, no -x, a per-test timeout where pytest-timeout is installed.
#
#   bash bench/gpu_check.sh                 every stage
#   bash bench/gpu_check.sh --only ops,bench   some stages (build import ops sample train bench)
#   bash bench/gpu_check.sh --plan          print the budget, each stage's cap and command; run nothing
#   bash bench/gpu_check.sh --dry-run       the same stages on the CPU against the installed build, no pip install:
#                                           the GPU tests skip, one bench file runs at one round. CI runs it
#                                           (tests/test_gpu_check_script.py) so that the script cannot rot
#
# Files in ${OUT:-/tmp/gpu_check} (8, the device tool's limit): summary.md, build.log, stages.log (every other stage's
# output), junit-ops.xml, junit-sample.xml, junit-train.xml, junit-bench.xml (one testsuite per bench file), bench.json.
# Environment: PYTHON (python3), GPU_CHECK_BUDGET (480 s), GPU_CHECK_{BUILD,IMPORT,OPS,SAMPLE,TRAIN}_CAP (seconds),
# GPU_CHECK_BENCHES (bench files, in order), GPU_CHECK_XDIST (workers for ops: 8; 0 in a dry run), TORCH_CUDA_ARCH_LIST,
# MAX_JOBS, CUDA_HOME.
set -euo pipefail

STAGES=(build import ops sample train bench)
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }

ONLY=""
DRY_RUN=0
PLAN=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --only) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --only needs a stage: one of ${STAGES[*]}" >&2; exit 2; }
                ONLY="$2"; shift 2 ;;
        --only=*) ONLY="${1#--only=}"; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --plan) PLAN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

SELECTED=("${STAGES[@]}")
if [[ -n "$ONLY" ]]; then
    IFS=',' read -r -a SELECTED <<< "$ONLY"
    for stage in "${SELECTED[@]}"; do
        if [[ ! " ${STAGES[*]} " == *" $stage "* ]]; then
            echo "gpu_check.sh: unknown stage '$stage' for --only; choose from: ${STAGES[*]}" >&2
            exit 2
        fi
    done
fi
selected() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# ---------------------------------------------------------------------------------------------------- the budget
# The whole command fits in BUDGET seconds: each stage's cap plus the kill grace, plus RESERVE for this runner's own
# work between stages (summary rows, merging the bench files' junit and JSON). The fixed stages' caps come first; the
# benches get the rest (at least 80 s; more when the stages before them end early: every cap is also cut to the time
# left before the deadline, so no setting can overrun the budget). Cold caches: the Triton kernels compile in the
# first stage that launches them (~1 s each, the ops stage's xdist workers compile in parallel), torch.compile's
# tests and benches start inductor cold (~20-60 s for the first graph).
BUDGET=${GPU_CHECK_BUDGET:-480}
GRACE=5       # SIGTERM at the cap (pytest then writes its junit and tally, as on Ctrl-C), SIGKILL GRACE s later
RESERVE=10
MIN_CAP=15    # a stage or bench file is not started with less time than this left
BUILD_CAP=${GPU_CHECK_BUILD_CAP:-150}    # ~12 sources, the torch-header ones ~30-60 s each, 16 in parallel, + pip
IMPORT_CAP=${GPU_CHECK_IMPORT_CAP:-25}   # torch + triton + _C import, CUDA init: ~10 s
OPS_CAP=${GPU_CHECK_OPS_CAP:-100}        # ~70 tests, most of the Triton compiles, two cold torch.compile graphs
SAMPLE_CAP=${GPU_CHECK_SAMPLE_CAP:-45}   # a tiny U-Net, 12 steps: graphs, loop, CPU; bf16 kernels compile here
TRAIN_CAP=${GPU_CHECK_TRAIN_CAP:-45}     # one cifar10 step on the GPU (bf16 backward kernels) and one on 16 cores
# per-test timeouts (pytest-timeout): a test stuck in Python fails alone and the stage goes on
TEST_TIMEOUT=90
BENCH_TIMEOUT=150
# bench files in priority order, each with its cap (cut to the time left); CUDA timings, cold inductor for the
# compiled baselines: the sampler's U-Net compile at batch 256 is its long pole (~1 min with 16 cores)
BENCH_FILES=(bench_philox.py bench_training.py bench_sampler.py bench_diffusion_step.py bench_group_norm.py
             bench_attention.py bench_diffusers.py)
declare -A BENCH_CAP=([bench_philox.py]=30 [bench_training.py]=90 [bench_sampler.py]=180
                      [bench_diffusion_step.py]=120 [bench_group_norm.py]=120 [bench_attention.py]=120
                      [bench_diffusers.py]=30)
# the gpu-marked tests per stage (tests/test_gpu_check_script.py checks that every file with one is named here)
OPS_TESTS=(tests/test_cuda_build.py tests/test_diffusion_step.py tests/test_group_norm_cuda.py tests/test_attention.py)
SAMPLE_TESTS=(tests/test_sampling.py tests/test_multi_gpu.py)  # the latter skips below two GPUs
TRAIN_TESTS=(tests/test_training.py)

if [[ $DRY_RUN == 1 ]]; then
    # on the CPU whatever the machine: the gpu-marked tests skip, Triton runs under its interpreter
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    BENCH_FILES=(bench_philox.py)
    XDIST=${GPU_CHECK_XDIST:-0}
    # one round per bench, no warm-up: enough to exercise the stage, its JSON and its tables
    BENCH_ARGS=(--benchmark-only --benchmark-min-rounds=1 --benchmark-max-time=0 --benchmark-warmup=off)
else
    unset TRITON_INTERPRET  # never test or time the interpreter on a GPU
    XDIST=${GPU_CHECK_XDIST:-8}
    BENCH_ARGS=(--benchmark-only --benchmark-columns=min,median,max,rounds)
fi
if [[ -n "${GPU_CHECK_BENCHES:-}" ]]; then read -r -a BENCH_FILES <<< "$GPU_CHECK_BENCHES"; fi

fixed=0
for stage in build import ops sample train; do
    if selected "$stage"; then
        cap_var="${stage^^}_CAP"
        fixed=$((fixed + ${!cap_var} + GRACE))
    fi
done
BENCH_SHARE=$((BUDGET - RESERVE - fixed))
if ((BENCH_SHARE < 0)); then
    echo "gpu_check.sh: the caps of the selected stages ($fixed s with the kill grace) and the reserve (${RESERVE} s)" \
         "exceed the budget of ${BUDGET} s" >&2
    exit 2
fi

export REPO DRY_RUN
export OUT_DIR="${OUT:-/tmp/gpu_check}"
export PYTHON="${PYTHON:-python3}"
export DDPM_FAST_REQUIRE=cpp,triton  # a missing backend is an import error, never a silent skip
export PYTHONUNBUFFERED=1

has_module() { "$PYTHON" -c "import $1" > /dev/null 2>&1; }
HAVE_TIMEOUT=0; has_module pytest_timeout && HAVE_TIMEOUT=1
HAVE_XDIST=0; ((XDIST > 0)) && has_module xdist && HAVE_XDIST=1

# pytest in a Python that takes SIGTERM (the cap) as Ctrl-C: pytest then ends its session, writing the junit XML
# and the tally of what finished (a plain python ends at once on SIGTERM, and an inherited ignored SIGINT would make
# `timeout -s INT` useless). A benchmark cut off by the cap has no timings, and pytest-benchmark's save of the JSON
# then raises before the junit XML and the tally are written: it is dropped first. `python -c` rather than
# `-m pytest`: the conftests drop the checkout from sys.path.
LAUNCHER='import signal, sys
import pytest


class DropUntimed:
    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session):
        timing = getattr(session.config, "_benchmarksession", None)
        if timing is not None:
            timing.benchmarks[:] = [b for b in timing.benchmarks if b.stats and b.stats.rounds]
        yield


signal.signal(signal.SIGTERM, signal.default_int_handler)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(plugins=[DropUntimed()]))'

# pytest_cmd SUITE JUNIT PER_TEST_TIMEOUT WORKERS ARGS...: the command in CMD
pytest_cmd() {
    local suite=$1 junit=$2 per_test=$3 workers=$4
    shift 4
    CMD=("$PYTHON" -c "$LAUNCHER" -q --tb=short -rfE -o "junit_suite_name=$suite" "--junitxml=$junit")
    if [[ $HAVE_TIMEOUT == 1 ]]; then CMD+=("--timeout=$per_test"); fi
    if [[ $HAVE_XDIST == 1 && $workers -gt 0 ]]; then CMD+=(-n "$workers"); fi
    CMD+=("$@")
}

# ---------------------------------------------------------------------------------------------------- stages
# build and import run in their own bash (set -euo pipefail); the test and bench stages are one pytest each

stage_build() {
    echo "python: $(command -v "$PYTHON") ($("$PYTHON" --version 2>&1))"
    "$PYTHON" - <<'EOF'
import importlib
for name in ("torch", "triton", "pybind11", "ninja", "pytest_timeout", "xdist"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}", end="")
        if name == "torch":
            print(f" (CUDA {module.version.cuda}, GPU: {module.cuda.is_available()})", end="")
        print()
    except ImportError as error:
        print(f"{name}: not importable ({error})")
EOF
    if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc > /dev/null; then
        CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
        export CUDA_HOME
    fi
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    # the CUDA kernels are the point of this run: fail the build rather than skip them
    export DDPM_FAST_CUDA="${DDPM_FAST_CUDA:-1}"
    echo "CUDA_HOME=${CUDA_HOME:-<none: no nvcc on PATH>} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" \
         "MAX_JOBS=$MAX_JOBS DDPM_FAST_CUDA=$DDPM_FAST_CUDA"
    # --no-deps: the torch and triton already there are the ones to build against (no network, no other torch)
    local install=("$PYTHON" -m pip install --no-build-isolation --no-deps .)
    if [[ $DRY_RUN == 1 ]]; then
        echo "dry run: skipping: ${install[*]}"
        echo "dry run: the installed build is used"
        return
    fi
    if command -v nvidia-smi > /dev/null; then nvidia-smi -L; fi
    if command -v nvcc > /dev/null; then nvcc --version | tail -2; fi
    if ! "${install[@]}"; then
        # the Triton and CPU stages can still report: build without the CUDA kernels, and say so (rc 42, which pip
        # itself never returns)
        echo "BUILD WITH CUDA KERNELS FAILED (log above); building without them so that the other stages run"
        DDPM_FAST_CUDA=0 "${install[@]}"
        exit 42
    fi
}

stage_import() {
    # from outside the checkout, so that the installed package (with _C) is the one imported
    cd /
    "$PYTHON" - <<'EOF'
import os
import sys

import torch

import ddpm_fast
from ddpm_fast.ops import attention, diffusion_step, group_norm, philox, registry

status = ddpm_fast.backends()
for name, s in status.items():
    print(f"{name}: {'yes' if s.available else 'NO'} ({s.reason})")
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
gpu = (f"{torch.cuda.get_device_name()} sm_{''.join(map(str, torch.cuda.get_device_capability()))}" if cuda
       else "no GPU")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu}")
choices = {module.__name__.rsplit(".", 1)[1]: registry.choose(module.__name__, device, module.IMPLEMENTED,
                                                              order=getattr(module, "ORDER", None))
           for module in (philox, diffusion_step, group_norm, attention)}  # (convolutions: torch's)
print(f"default backend per op on {device.type}: " + ", ".join(f"{op} {b}" for op, b in choices.items()))
module, _ = registry.cpp_module()
with_cuda = module is not None and module.with_cuda
problems = [f"backend {name} unavailable" for name, s in status.items() if not s.available]
if os.environ["DRY_RUN"] != "1":
    problems += [] if cuda else ["torch sees no CUDA GPU"]
    problems += [] if with_cuda else ["ddpm_fast._C has no CUDA kernels"]
    problems += [] if "on CUDA" in status["triton"].reason else ["Triton does not run on CUDA"]
summary = (f"reference yes, cpp {'yes' if status['cpp'].available else 'NO'}"
           f"{' (+ CUDA kernels)' if with_cuda else ' (no CUDA kernels)'}, "
           f"triton {'yes' if status['triton'].available else 'NO'}; {gpu}")
print(("PROBLEM: " + "; ".join(problems) + " | " if problems else "") + summary)
sys.exit(1 if problems else 0)
EOF
}

export -f stage_build stage_import

# ---------------------------------------------------------------------------------------------------- runner
START=$SECONDS
DEADLINE=$((BUDGET - RESERVE))  # from the script's own start (SECONDS counts from there): the checks above count too
SUMMARY="$OUT_DIR/summary.md"
LOG="$OUT_DIR/stages.log"
WORK=""
FAILED=0
INCOMPLETE=0
BUILD_FAILED=0

row() {  # row STAGE STATUS SECONDS DETAIL JUNIT: one line of the summary, written at once
    local line="| $1 | $2 | $3 | $4 | $5 |"
    echo "$line" >> "$SUMMARY"
    echo "summary: $line"
}

# run_stage NAME CAP JUNIT LOGFILE COMMAND...: run under the cap (cut to the time left), then append its row
run_stage() {
    local name=$1 cap=$2 junit=$3 log=$4 left rc=0 status start detail offset
    shift 4
    if [[ $BUILD_FAILED == 1 ]]; then
        row "$name" skipped 0 "the build failed" "-"
        INCOMPLETE=1
        return 0
    fi
    left=$((DEADLINE - SECONDS - GRACE))
    if ((left < MIN_CAP)); then
        row "$name" skipped 0 "no time left in the ${BUDGET} s budget" "-"
        INCOMPLETE=1
        return 0
    fi
    if ((left < cap)); then cap=$left; fi
    echo | tee -a "$log"
    echo "==================== $name (cap ${cap} s$([[ $DRY_RUN == 1 ]] && echo ', dry run')) ====================" \
        | tee -a "$log"
    # straight into the log in $OUT (current if the whole command is killed), no pipe: a stray grandchild that
    # outlives the cap (a compile worker in a session of its own) cannot hold a tee open past it
    offset=$(wc -c < "$log")
    start=$SECONDS
    timeout -k "$GRACE" "$cap" "$@" >> "$log" 2>&1 < /dev/null || rc=$?
    tail -c +$((offset + 1)) "$log" > "$WORK/stage.out"
    cat "$WORK/stage.out"
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT (cap ${cap} s)" ;;
        5) status="FAIL (no tests selected)" ;;
        42) status="FAIL (CUDA kernels did not build; built without them)" ;;
        *) status="FAIL (rc $rc)" ;;
    esac
    # the detail: the last pytest tally, else the last line
    local tally='[0-9]+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)|no tests ran|[0-9]+ tests? collected'
    detail="$(grep -E "$tally" "$WORK/stage.out" | tail -1 || true)"
    [[ -n "$detail" ]] || detail="$(grep -v '^[[:space:]]*$' "$WORK/stage.out" | tail -1 || true)"
    detail="$(echo "$detail" | tr -d '|' | sed -E 's/={2,}//g' | tr -s ' ' | sed 's/^ *//; s/ *$//' | cut -c1-160)"
    row "$name" "$status" $((SECONDS - start)) "${detail:--}" "$junit"
    if [[ $status != ok ]]; then
        FAILED=1
        if [[ $name == build && $rc != 42 ]]; then BUILD_FAILED=1; fi
    fi
    return 0
}

# merge_bench FILE...: the bench files' junit XML and JSON so far into junit-bench.xml and bench.json (atomic)
merge_bench() {
    "$PYTHON" - "$WORK" "$OUT_DIR" "$@" <<'EOF'
import json
import os
import sys
import xml.etree.ElementTree as ET

work, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
suites, merged = ET.Element("testsuites", name="gpu_check bench"), None
for name in names:
    try:
        root = ET.parse(os.path.join(work, name + ".xml")).getroot()
        suites.extend(root.iter("testsuite") if root.tag == "testsuites" else [root])
    except (OSError, ET.ParseError):
        pass
    try:
        with open(os.path.join(work, name + ".json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        continue
    if merged is None:
        merged = data
    else:
        merged["benchmarks"] += data["benchmarks"]
ET.ElementTree(suites).write(os.path.join(out, "junit-bench.xml.tmp"), encoding="utf-8", xml_declaration=True)
os.replace(os.path.join(out, "junit-bench.xml.tmp"), os.path.join(out, "junit-bench.xml"))
if merged is not None:
    with open(os.path.join(out, "bench.json.tmp"), "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(os.path.join(out, "bench.json.tmp"), os.path.join(out, "bench.json"))
EOF
}

plan_line() { printf '%-30s cap %4s s + %s  %s\n' "$1" "$2" "$GRACE" "$3"; }

budget_text="budget ${BUDGET} s = $(for stage in build import ops sample train; do
    if selected "$stage"; then v="${stage^^}_CAP"; printf '%s %s + %s, ' "$stage" "${!v}" "$GRACE"; fi; done)$(
    if selected bench; then printf 'bench the rest (%s s at least, each file + %s), ' "$BENCH_SHARE" "$GRACE"; fi
    )reserve ${RESERVE}"
tools="per-test timeout: $([[ $HAVE_TIMEOUT == 1 ]] && echo "${TEST_TIMEOUT} s, benches ${BENCH_TIMEOUT} s" ||
    echo 'none (pytest-timeout not installed)'); ops on $([[ $HAVE_XDIST == 1 ]] && echo "$XDIST xdist workers" ||
    echo 'one process')"

if [[ $PLAN == 1 ]]; then
    echo "gpu_check plan ($([[ $DRY_RUN == 1 ]] && echo 'dry run' || echo 'full run')): $budget_text"
    echo "$tools"
    selected build && plan_line build "$BUILD_CAP" "stage_build (log: build.log)"
    selected import && plan_line import "$IMPORT_CAP" "stage_import"
    for stage in ops sample train; do
        if selected "$stage"; then
            files_var="${stage^^}_TESTS[@]"
            cap_var="${stage^^}_CAP"
            pytest_cmd "$stage" "junit-$stage.xml" "$TEST_TIMEOUT" "$([[ $stage == ops ]] && echo "$XDIST" || echo 0)" \
                -m gpu "${!files_var}"
            plan_line "$stage" "${!cap_var}" "pytest ${CMD[*]:3}"
        fi
    done
    if selected bench; then
        for file in "${BENCH_FILES[@]}"; do
            pytest_cmd "${file%.py}" junit-bench.xml "$BENCH_TIMEOUT" 0 "bench/$file" "${BENCH_ARGS[@]}"
            plan_line "bench $file" "${BENCH_CAP[$file]:-120}" "pytest ${CMD[*]:3}"
        done
    fi
    exit 0
fi

mkdir -p "$OUT_DIR"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
: > "$LOG"
{
    echo "# gpu_check: $([[ $DRY_RUN == 1 ]] && echo 'dry run on the CPU' || echo 'full run')," \
         "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git describe --always --dirty 2> /dev/null || echo unknown)"
    echo
    echo "$budget_text. $tools. Logs: build.log, stages.log."
    echo
    echo "| stage | status | seconds | tally or last line | junit |"
    echo "|---|---|---|---|---|"
} > "$SUMMARY"

if selected build; then
    : > "$OUT_DIR/build.log"
    run_stage build "$BUILD_CAP" "- (build.log)" "$OUT_DIR/build.log" bash -c "set -euo pipefail; stage_build"
fi
if selected import; then
    run_stage import "$IMPORT_CAP" "-" "$LOG" bash -c "set -euo pipefail; stage_import"
fi
for stage in ops sample train; do
    if selected "$stage"; then
        files_var="${stage^^}_TESTS[@]"
        cap_var="${stage^^}_CAP"
        workers=0
        if [[ $stage == ops ]]; then workers=$XDIST; fi
        pytest_cmd "$stage" "$OUT_DIR/junit-$stage.xml" "$TEST_TIMEOUT" "$workers" -m gpu "${!files_var}"
        if [[ $HAVE_XDIST == 1 && $workers -gt 0 ]]; then
            # the workers share the cores: each its slice of threads for the CPU references
            threads=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))
            CMD=(env "OMP_NUM_THREADS=$threads" "${CMD[@]}")
        fi
        run_stage "$stage" "${!cap_var}" "junit-$stage.xml" "$LOG" "${CMD[@]}"
    fi
done
if selected bench; then
    done_files=()
    for file in "${BENCH_FILES[@]}"; do
        name="${file%.py}"
        pytest_cmd "$name" "$WORK/$name.xml" "$BENCH_TIMEOUT" 0 "bench/$file" "${BENCH_ARGS[@]}" \
            "--benchmark-json=$WORK/$name.json"
        run_stage "bench $file" "${BENCH_CAP[$file]:-120}" "junit-bench.xml ($name)" "$LOG" "${CMD[@]}"
        done_files+=("$name")
        merge_bench "${done_files[@]}" || echo "gpu_check.sh: merging the bench results failed" >&2
    done
fi

total="ok"
if [[ $FAILED == 1 ]]; then total="FAIL"; elif [[ $INCOMPLETE == 1 ]]; then total="INCOMPLETE"; fi
row total "$total" $((SECONDS - START)) "budget ${BUDGET} s" "-"
echo
cat "$SUMMARY"
[[ $total == ok ]]
