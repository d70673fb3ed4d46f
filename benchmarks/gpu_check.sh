#!/usr/bin/env bash
# The GPU pass (docs/gpu.md#the-gpu-pass): everything that needs a GPU, in one command that fits one lease.
#
#   benchmarks/gpu_check.sh OUT [--dry-run] [--quick] [--steps a,b,...] [--budget SECONDS]
#
# Steps, in priority order, each under its own time limit (a step that runs out is cut, recorded as
# "timeout", and the next one starts); the last one gets whatever is left of the total budget:
#   build        120 s  pip install --no-build-isolation --no-deps -e . with MELT_BUILD_CUDA=1 (sm_90a,
#                       parallel nvcc), the environment and the ptxas report
#   correctness  150 s  benchmarks/gpu_correctness.py: each kernel backend against the reference, a fixed
#                       set (decode and chunks, GQA, head_dims, gate kinds, lengths to 32k, forced splits,
#                       stale-slot traps, 20-run determinism, gradients), in parallel worker processes
#   bench        150 s  benchmarks/attention.py (60% of it at most) and attention_bwd.py at the headline
#                       shapes, beside SDPA (flash, cuDNN), the unfused path and the copy bandwidth
#   sanitizer     60 s  compute-sanitizer memcheck, racecheck and synccheck on benchmarks/sanitize_run.py
#   loop-depth    90 s  benchmarks/loop_depth.py on the GPU (MELT and the LoopLM at each T first, then the
#                       unfused path; each run's record written as it finishes)
#   serving       40 s  benchmarks/loop_depth.py --serve: paged, continuously batched decode at a KV budget,
#                       sequences held and tokens/s for MELT and the LoopLM at T = 1, 2, 4, 8
#   tune         240 s  only when --steps names it (and in the dry run, so that CI runs its code), before
#                       pytest: benchmarks/tournament.py, every implementation of the op (Triton plans, CUDA,
#                       the composition) beside SDPA-flash, cuDNN and the unfused path at the headline shapes,
#                       graph-replayed and eager, each checked against the reference; it writes the table of
#                       backend="auto", OUT/auto_table.py.  On a warm machine after the pass, or a fresh one:
#                         bash benchmarks/gpu_check.sh OUT --steps tune          (the pass's build still there)
#                         bash benchmarks/gpu_check.sh OUT --steps build,tune    (a new GPU: the table's command)
#                       then cp OUT/auto_table.py melt_kernels/ (that GPU's rows replaced, the others kept)
#   pytest       rest   pytest -m gpu
# Total: 510 s by default (--budget), i.e. 8.5 minutes from a fresh checkout; step limits scale with it.
#
# OUT receives at most 8 files: summary.md (one table: step, status, seconds, key numbers; the tournament's
# winners), results.json (every number, see benchmarks/gpu_summary.py), logs.tar.gz (every log, the ptxas
# report), plots, and auto_table.py when the tune step ran.
#   --dry-run  every step's code path on the CPU: the Triton kernels under the interpreter on tiny shapes,
#              the CUDA kernels built and run by the host emulator, the sanitizer skipped; same files and
#              schema (CI runs this, so a broken pass is found before a lease is spent on it)
#   --quick    each step's reduced set (a rerun in the same lease)
#   --steps    only these steps, e.g. --steps correctness,bench to redo what failed
# PYTHON picks the interpreter (default python3: the one holding CUDA torch on the GPU machine).
set -uo pipefail

usage() { echo "usage: $0 OUT [--dry-run] [--quick] [--steps a,b,...] [--budget SECONDS]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT_ARG=$1
shift
# The budget the step limits below are sized for; --budget scales them.
DEFAULT_BUDGET=510
DRY=0 QUICK=0 STEPS="" BUDGET=$DEFAULT_BUDGET
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --quick) QUICK=1 ;;
        --steps) STEPS=$2; shift ;;
        --steps=*) STEPS=${1#*=} ;;
        --budget) BUDGET=$2; shift ;;
        --budget=*) BUDGET=${1#*=} ;;
        *) usage ;;
    esac
    shift
done
mkdir -p "$OUT_ARG"
OUT=$(cd "$OUT_ARG" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
if [ $DRY -eq 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
    unset TRITON_INTERPRET
fi
MODE=()
[ $DRY -eq 1 ] && MODE+=(--dry-run)
[ $QUICK -eq 1 ] && MODE+=(--quick)
START=$SECONDS
STEP_LINES=$WORK/steps.tsv
: >"$STEP_LINES"

wanted() { [ -z "$STEPS" ] || [[ ",$STEPS," == *",$1,"* ]]; }

# limited LIMIT COMMAND...: runs COMMAND (one of this script's functions, exported to a child bash) in a
# process group of its own; at LIMIT seconds the whole group (worker processes included) is stopped and
# the status is 124.
limited() {
    local limit=$1 pid waited=0
    shift
    setsid bash -c '"$@"' step "$@" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge "$limit" ]; then
            kill -TERM -- "-$pid" 2>/dev/null
            sleep 5
            kill -KILL -- "-$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
            return 124
        fi
        sleep 1
        waited=$((waited + 1))
    done
    wait "$pid"
}

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under the limit (scaled to the budget, never past the
# total), its output in logs/NAME.log, and records "NAME rc seconds status limit".
step() {
    local name=$1 limit=$2 begin=$SECONDS rc status
    shift 2
    wanted "$name" || return 0
    limit=$((limit * BUDGET / DEFAULT_BUDGET))
    local left=$((BUDGET - (SECONDS - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        echo "== $name: not run (no time left)"
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" -1 0 "not run" 0 >>"$STEP_LINES"
        return 0
    fi
    echo "== $name (limit ${limit} s): $*"
    export STEP_LIMIT=$limit
    limited "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=passed ;;
        124) status=timeout ;;
        *) status=failed ;;
    esac
    echo "   $status (rc=$rc) in $((SECONDS - begin)) s"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - begin))" "$status" "$limit" >>"$STEP_LINES"
}

build() {
    if [ $DRY -eq 0 ]; then
        nvidia-smi || return 1
    fi
    nvcc --version
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
    MELT_BUILD_CUDA=1 MELT_CUDA_ARCHS="${MELT_CUDA_ARCHS:-90a}" MELT_PTXAS_REPORT="$LOGS/ptxas.txt" \
        "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . || return 1
    "$PY" -c "import melt_kernels, melt_kernels._cuda as c; print('built', c.built_archs()); \
print('backends', melt_kernels.available_backends())"
}

sanitize() {
    if [ $DRY -eq 1 ]; then
        echo "dry run: compute-sanitizer needs a GPU; checking that the script runs"
        "$PY" benchmarks/sanitize_run.py --dry-run
        return $?
    fi
    # The three tools at once (the GPU has room), each cut a little before the step's limit.
    local tool rc=0
    for tool in memcheck racecheck synccheck; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $((STEP_LIMIT - 3)) compute-sanitizer --tool "$tool" \
            --error-exitcode 3 --print-limit 20 "$PY" benchmarks/sanitize_run.py >"$WORK/sanitizer-$tool.log" 2>&1 &
    done
    for tool in memcheck racecheck synccheck; do
        wait -n || rc=1
    done
    for tool in memcheck racecheck synccheck; do
        echo "--- compute-sanitizer --tool $tool"
        cat "$WORK/sanitizer-$tool.log"
    done
    return $rc
}

loop_depth() {
    if [ $DRY -eq 1 ]; then
        "$PY" benchmarks/loop_depth.py --quick --json "$WORK/loop_depth.json" --plot "$WORK/loop_depth.png"
    else
        "$PY" benchmarks/loop_depth.py --loops 1 2 4 8 --json "$WORK/loop_depth.json" --plot "$WORK/loop_depth.png"
    fi
}

serving() {
    if [ $DRY -eq 1 ]; then
        # 8 pages of 16 tokens (2**-16 GiB): the interpreter's sweep in ~10 s, still T times the sequences.
        "$PY" benchmarks/loop_depth.py --serve --quick --serve-kv-gb 1.52587890625e-05 --json "$WORK/serving.json"
    else
        # A 1 GiB pool and short requests: the sweep fits its step; the full one (20 GiB) is a run of its own.
        "$PY" benchmarks/loop_depth.py --serve --loops 1 2 4 8 --serve-kv-gb 1 --prompt 128 \
            --serve-new-tokens 8 --json "$WORK/serving.json"
    fi
}

remaining_pytest() {
    "$PY" -m pytest -q -rs -m gpu -x -p no:cacheprovider tests
}

tune() {
    "$PY" benchmarks/tournament.py $MODE_FLAGS --out "$WORK/tournament.json" --table "$WORK/auto_table.py"
}

correctness() {
    "$PY" benchmarks/gpu_correctness.py $MODE_FLAGS --out "$WORK/correctness.json"
}

bench() {
    # The peers the issue asks for (SDPA's flash and cuDNN kernels, the unfused path): FlexAttention compiles
    # every shape (inductor, seconds to tens of seconds each) and is left to a run of its own.  The forward
    # sweep gets 60% of the step, so that its compiles cannot take the backward's turn; both scripts write
    # their rows as each shape finishes, so a cut run keeps what it measured.
    local peers=(--peers sdpa_flash sdpa_cudnn unfused) rc=0
    timeout $((STEP_LIMIT * 6 / 10)) "$PY" benchmarks/attention.py --set headline "${peers[@]}" $MODE_FLAGS \
        --out "$WORK/attention.json" || rc=$?
    "$PY" benchmarks/attention_bwd.py --set headline "${peers[@]}" $MODE_FLAGS --out "$WORK/attention_bwd.json" \
        || rc=$?
    return $rc
}

MODE_FLAGS="${MODE[*]}"
export DRY PY LOGS WORK MODE_FLAGS
export -f build correctness bench sanitize loop_depth serving remaining_pytest tune

step build 120 build
step correctness 150 correctness
step bench 150 bench
step sanitizer 60 sanitize
step loop-depth 90 loop_depth
step serving 40 serving
# The tournament (the table of "auto") is asked once in a while, not a check: on a GPU only when named.
if [[ ",$STEPS," == *",tune,"* ]] || { [ $DRY -eq 1 ] && wanted tune; }; then
    step tune 240 tune
fi
step pytest "$DEFAULT_BUDGET" remaining_pytest

# The summary runs whatever happened above (outside the budget: a few seconds).
"$PY" benchmarks/gpu_summary.py --work "$WORK" --out "$OUT" --steps "$STEP_LINES" --budget "$BUDGET" "${MODE[@]}"
summary_rc=$?
echo "total $((SECONDS - START)) s; files in $OUT:"
ls -l "$OUT"
failed_steps=$(awk -F'\t' '$4 != "passed" { print $1 }' "$STEP_LINES" | tr '\n' ' ')
rm -rf "$WORK"
if [ $summary_rc -ne 0 ] || [ -n "$failed_steps" ]; then
    echo "the pass did not pass every step: ${failed_steps:-summary} (see $OUT/summary.md)"
    exit 1
fi
