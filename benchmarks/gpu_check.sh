#!/usr/bin/env bash
# The one prepared GPU check (an H200 with torch 2.11 and triton 3.6; no network needed), under 7 minutes:
#   1. tests/test_triton_cuda.py: bf16 at Llama shapes, autocast, >2^31-element offsets, determinism,
#      torch.compile (first, so that its kernels are compiled and cached for the benchmark);
#   2. the microbenchmark: python -m benchmarks.run --preset llama7b --out benchmarks/results
#      (benchmarks/results/<date>-<gpu>.json and .md, to be committed);
#   3. tests/test_triton_kernels.py on CUDA instead of the interpreter (already proven on the CPU).
# Each step has a time limit; logs go to benchmarks/results/; everything there is copied into $OUT when set.
# Usage: bash benchmarks/gpu_check.sh           (from anywhere; exit status 0 only if every step passed)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
STARTED=$(mktemp)  # a timestamp: results written after it belong to this run
status=0

{
    echo "# gpu_check $STAMP, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$RESULTS/gpu-check-$STAMP.log"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$RESULTS/gpu-check-$STAMP.log"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$RESULTS/gpu-check-$STAMP.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - started))s" | tee -a "$RESULTS/gpu-check-$STAMP.log"
    [ "$rc" -eq 0 ] || status=1
}

step "GPU-only tests" 120 python -m pytest tests/test_triton_cuda.py -q -rs --durations=10
step "benchmark" 190 python -m benchmarks.run --preset llama7b --out "$RESULTS"
step "kernel tests on CUDA" 100 python -m pytest tests/test_triton_kernels.py -q -rs --durations=5

if [ -n "${OUT:-}" ]; then  # only this run's files: the device tool brings back at most 8
    mkdir -p "$OUT"
    find "$RESULTS" -maxdepth 1 -type f -newer "$STARTED" -exec cp {} "$OUT"/ \;
fi
echo "gpu_check: $([ $status -eq 0 ] && echo PASSED || echo FAILED)" | tee -a "$RESULTS/gpu-check-$STAMP.log"
exit $status
