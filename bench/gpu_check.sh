#!/usr/bin/env bash
# The one run on a rented GPU machine (an H200 here: torch with CUDA, triton, nvcc, ninja, pybind11, no network,
# ~10 minutes in all): build ddpm_fast with its CUDA kernels, run the GPU tests and the rest, time every bench; one
# summary table at the end (stage, status, seconds). Results and logs go to ${OUT:-/tmp/gpu_check}.
#
#   bash bench/gpu_check.sh                  build, test, bench (each under its own time cap)
#   bash bench/gpu_check.sh --only bench     one stage (build|test|bench; a comma list such as build,bench works too)
#   bash bench/gpu_check.sh --dry-run        a slice of every stage at tiny sizes on the CPU, against the installed
#                                            build, no pip install: CI runs this (tests/test_gpu_check_script.py)
#                                            so the script cannot rot between the rare GPU runs
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), CUDA_HOME (default: from nvcc),
# MAX_JOBS (default: the core count), GPU_CHECK_BUILD_CAP / _TEST_CAP / _BENCH_CAP (seconds per stage).
# On the device tool: run it as `bash bench/gpu_check.sh`; $OUT is set there and its files come back (at most 8:
# build.log, test.log, bench.log, bench.json, summary.md).
set -euo pipefail

STAGES=(build test bench)
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

ONLY=""
DRY_RUN=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --only) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --only needs a stage: one of ${STAGES[*]}" >&2; exit 2; }
                ONLY="$2"; shift 2 ;;
        --only=*) ONLY="${1#--only=}"; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
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

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export REPO DRY_RUN
export OUT_DIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHON="${PYTHON:-python3}"
if command -v pytest > /dev/null; then export PYTEST=pytest; else export PYTEST="$PYTHON -m pytest"; fi
export DDPM_FAST_REQUIRE=cpp,triton  # a missing backend is an import error, never a silent skip
export PYTHONUNBUFFERED=1

if [[ $DRY_RUN == 1 ]]; then
    # on the CPU whatever the machine: benchutil then picks DEVICE=cpu and Triton runs under its interpreter
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    BUILD_CAP=${GPU_CHECK_BUILD_CAP:-60} TEST_CAP=${GPU_CHECK_TEST_CAP:-120} BENCH_CAP=${GPU_CHECK_BENCH_CAP:-120}
else
    unset TRITON_INTERPRET  # never time or test the interpreter on a GPU
    # bench: the ops' benches (~2 min before the sampler's), then the cifar10 sampler at batch 256 (one cold
    # torch.compile of the U-Net, ~1 min with 16 cores, and 6 runs of 50 steps per contender), then training at
    # cifar10 x128 bf16 (eager and ours, 6 rounds of 3 steps: ~30 s, unmeasured)
    BUILD_CAP=${GPU_CHECK_BUILD_CAP:-150} TEST_CAP=${GPU_CHECK_TEST_CAP:-180} BENCH_CAP=${GPU_CHECK_BENCH_CAP:-300}
fi

# ---------------------------------------------------------------------------------------------------- stages
# Each runs in its own bash (set -euo pipefail) under `timeout`, which ends the whole process group at the cap.

stage_build() {
    echo "python: $(command -v "$PYTHON") ($("$PYTHON" --version 2>&1))"
    "$PYTHON" - <<'EOF'
import importlib
for name in ("torch", "triton", "pybind11", "ninja"):
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
    echo "CUDA_HOME=${CUDA_HOME:-<none: no nvcc on PATH>} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    # --no-deps: the torch and triton already there are the ones to build against (no network, no other torch)
    local install=("$PYTHON" -m pip install --no-build-isolation --no-deps .)
    if [[ $DRY_RUN == 1 ]]; then
        echo "dry run: skipping: ${install[*]}"
    else
        command -v nvidia-smi > /dev/null && nvidia-smi -L
        command -v nvcc > /dev/null && nvcc --version | tail -2
        # the CUDA kernels are the point of this run: fail the build rather than skip them
        DDPM_FAST_CUDA="${DDPM_FAST_CUDA:-1}" "${install[@]}"
    fi
    # from outside the checkout, so that the installed package (with _C) is the one imported
    (cd / && "$PYTHON" -c "import ddpm_fast
status = ddpm_fast.backends()
print(status)
print('backends:', ', '.join(f'{name} {\"yes\" if s.available else \"NO\"}' for name, s in status.items()))")
}

stage_test() {
    if [[ $DRY_RUN == 1 ]]; then
        # tests/test_gpu_check_script.py runs this dry run: never run it here (no recursion)
        # (a slice is enough to exercise the stage: CI runs the whole suite itself)
        if [[ -f tests/test_diffusion_step.py ]]; then
            $PYTEST tests/test_diffusion_step.py -q -x -k "not slow and cpp"
        else
            $PYTEST tests/test_backends.py tests/test_philox.py -q -x -k "not slow"
        fi
        return
    fi
    echo "== the GPU tests (marked gpu): the CUDA and GPU-Triton kernels against the reference"
    local gpu_rc=0 rest_rc=0
    $PYTEST tests/ -q -m gpu || gpu_rc=$?
    [[ $gpu_rc != 5 ]] || gpu_rc=0  # 5: none collected
    # run on after a GPU failure: one rented run should report everything it can
    echo "== the rest of tests/ on this machine (the gpu-marked ones just ran; the dry-run test is CI's)"
    # these run the Triton kernels on CPU tensors, which needs the interpreter (Triton on CUDA is -m gpu above)
    TRITON_INTERPRET=1 $PYTEST tests/ -q -x -m "not gpu" --ignore=tests/test_gpu_check_script.py || rest_rc=$?
    [[ $gpu_rc == 0 ]] || { echo "the GPU tests failed (rc $gpu_rc)"; exit "$gpu_rc"; }
    exit "$rest_rc"
}

stage_bench() {
    if [[ $DRY_RUN == 1 ]]; then
        # the ops' benches once, on the CPU: enough to exercise the stage (CI's own run of bench/ runs every bench
        # once, the sampler, diffusers and training ones too)
        $PYTEST bench/bench_philox.py bench/bench_diffusion_step.py bench/bench_group_norm.py \
            bench/bench_attention.py -q --benchmark-disable -k "not compiled"
        return
    fi
    $PYTEST bench/ --benchmark-only --benchmark-columns=min,median,max,rounds \
        --benchmark-json="$OUT_DIR/bench.json"
}

export -f stage_build stage_test stage_bench

# ---------------------------------------------------------------------------------------------------- runner
ROWS=()
FAILED=0
BUILD_FAILED=0

run_stage() {
    local stage="$1" cap="$2" log="$OUT_DIR/$1.log" start rc=0 status seconds detail
    echo
    echo "==================== $stage (cap ${cap}s$([[ $DRY_RUN == 1 ]] && echo ', dry run')) ===================="
    if [[ $BUILD_FAILED == 1 ]]; then
        ROWS+=("| $stage | skipped | 0 | the build failed |")
        return
    fi
    start=$SECONDS
    timeout -k 15 "$cap" bash -c "set -euo pipefail; stage_$stage" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    seconds=$((SECONDS - start))
    if [[ $rc == 0 ]]; then
        status=ok
    elif [[ $rc == 124 || $rc == 137 ]]; then
        status="TIMEOUT (cap ${cap}s)"
    else
        status="FAIL (rc $rc)"
    fi
    # the detail: on success the last pytest tally (or the last line), on failure the last line
    detail=""
    if [[ $status == ok ]]; then
        detail="$(grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$log" | tail -1 || true)"
    fi
    [[ -n "$detail" ]] || detail="$(grep -v '^[[:space:]]*$' "$log" | tail -1 || true)"
    detail="$(echo "$detail" | tr -d '=|' | sed 's/^ *//; s/ *$//' | cut -c1-120)"
    ROWS+=("| $stage | $status | $seconds | $detail |")
    if [[ $status != ok ]]; then
        FAILED=1
        [[ $stage == build ]] && BUILD_FAILED=1
    fi
    return 0
}

TOTAL_START=$SECONDS
for stage in "${STAGES[@]}"; do
    if [[ " ${SELECTED[*]} " == *" $stage "* ]]; then
        case $stage in
            build) run_stage build "$BUILD_CAP" ;;
            test) run_stage test "$TEST_CAP" ;;
            bench) run_stage bench "$BENCH_CAP" ;;
        esac
    fi
done

{
    echo
    mode=$([[ $DRY_RUN == 1 ]] && echo "dry run on the CPU" || echo "full run")
    echo "gpu_check summary ($mode, $(date -u '+%Y-%m-%d %H:%M UTC'), logs in $OUT_DIR)"
    echo
    echo "| stage | status | seconds | detail |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo "| total | $([[ $FAILED == 0 ]] && echo ok || echo FAIL) | $((SECONDS - TOTAL_START)) | |"
} | tee "$OUT_DIR/summary.md"
exit "$FAILED"
