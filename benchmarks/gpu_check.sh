#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a machine with no network:
#   benchmarks/gpu_check.sh LOG_DIR [STEP...]
# 1. installs the package with the CUDA extension (MELT_BUILD_CUDA=1, Hopper: MELT_CUDA_ARCHS=90a; override
#    with the environment), from the local tree only, keeping the ptxas resource report;
# 2. runs the whole test suite on the GPU (both kernel backends compiled; no TRITON_INTERPRET);
# 3. runs compute-sanitizer memcheck and racecheck over the GPU tests (`pytest -m gpu`, ci hypothesis profile);
# 4. runs the attention (forward, forward + backward) and loop-depth benchmarks.
# Each step logs to LOG_DIR/<step>.log; a failed step is reported and the others still run; the exit status is
# non-zero when any step failed.  Naming steps runs only those (environment install import tests memcheck
# racecheck bench-attention bench-attention-bwd bench-loop-depth), e.g. to fit a time limit per command.  PYTHON picks the
# interpreter (default python3: the one holding CUDA torch).
set -uo pipefail

[ $# -ge 1 ] || { echo "usage: $0 LOG_DIR" >&2; exit 2; }
mkdir -p "$1"
LOG=$(cd "$1" && pwd)
shift
only=" $* "
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
failed=()

step() {  # step NAME COMMAND...: runs COMMAND with its output in $LOG/NAME.log
    local name=$1 start=$SECONDS rc
    shift
    [ "$only" = "  " ] || [[ $only == *" $name "* ]] || return 0
    echo "== $name: $*"
    "$@" >"$LOG/$name.log" 2>&1
    rc=$?
    echo "   rc=$rc in $((SECONDS - start)) s ($LOG/$name.log)"
    [ $rc -eq 0 ] || failed+=("$name")
    return 0
}

step environment bash -c "nvidia-smi; nvcc --version; $PY -c 'import torch, triton; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(), triton.__version__)'"
step install env MELT_BUILD_CUDA=1 MELT_CUDA_ARCHS="${MELT_CUDA_ARCHS:-90a}" MELT_PTXAS_REPORT="$LOG/ptxas.txt" \
    "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .
step import "$PY" -c "import melt_kernels, melt_kernels._cuda as c; print(c.built_archs(), \
melt_kernels.available_backends())"
step tests "$PY" -m pytest -q -rs tests
# Sanitizers: one allocation per tensor (no caching pool) so that memcheck sees every overrun.
step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 HYPOTHESIS_PROFILE=ci compute-sanitizer --tool memcheck \
    --error-exitcode 1 "$PY" -m pytest -q -x -m gpu tests
step racecheck env HYPOTHESIS_PROFILE=ci compute-sanitizer --tool racecheck --error-exitcode 1 \
    "$PY" -m pytest -q -x -m gpu tests
step bench-attention "$PY" benchmarks/attention.py --out "$LOG/attention.json"
step bench-attention-bwd "$PY" benchmarks/attention_bwd.py --out "$LOG/attention_bwd.json"
step bench-loop-depth "$PY" benchmarks/loop_depth.py --json "$LOG/loop_depth.json" --plot "$LOG/loop_depth.png"

if [ ${#failed[@]} -eq 0 ]; then
    echo "all steps passed; logs in $LOG"
else
    echo "FAILED steps: ${failed[*]}; logs in $LOG"
    exit 1
fi
