#!/usr/bin/env bash
# GPU checks of the Triton statistics kernels, in one go, in under 8 minutes on one H100:
#   1. the kernel tests (odd shapes, real sizes, TF32/bf16 bounds, 10^6 tokens, autotuning)
#      and corp.prune(backend="triton") == backend="torch";
#   2. the pytest-benchmark pairs (Triton vs PyTorch);
#   3. the do_bench sweep (TFLOP/s and speedups, D in {768, 3072, 5120}, 64k-1M tokens).
# Every step has its own time limit (200 + 70 + 160 s at most). Logs go to $OUT (or ./gpu_stats_out).
#
# Usage: bash benchmarks/gpu_stats.sh            (PYTHON=/path/to/python to choose the interpreter)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
LOG_DIR="${OUT:-$ROOT/gpu_stats_out}"
mkdir -p "$LOG_DIR"

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
        PYTHON=.venv/bin/python
    else
        PYTHON="$(command -v python3 || command -v python)"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET          # compiled kernels, not the interpreter
export CORP_TRITON_AUTOTUNE=1   # the tests pin the untuned config themselves where they must

status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $LOG_DIR/NAME.txt, remember failures
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    if [ "$rc" -ne 0 ]; then status=1; fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$LOG_DIR/gpu.txt"
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" \
    2>&1 | tee -a "$LOG_DIR/gpu.txt"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible: nothing to run"
    exit 1
fi

step tests 200 "$PYTHON" -m pytest -q -ra -s -p no:cacheprovider \
    tests/test_kernels_gram.py tests/test_kernels_attention_stats.py tests/test_triton_backend_prune.py
step bench_pytest 70 "$PYTHON" -m pytest -q -s -p no:cacheprovider benchmarks/bench_stats_kernels.py \
    --benchmark-columns=median,min,max,rounds --benchmark-sort=name
step do_bench 160 "$PYTHON" benchmarks/stats_kernels_do_bench.py --budget 110

echo "=== done in ${SECONDS}s, status $status; logs in $LOG_DIR"
exit $status
