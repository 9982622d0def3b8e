#!/usr/bin/env bash
# Every GPU check of corp in one call (< 8 minutes on one H100/H200), in order of value:
#   1. build corp._C with its CUDA kernels in place against the machine's torch;
#   2. the GPU tests: Triton statistics kernels, compiled ridge solver (CUDA cases),
#      backend="triton" / backend="compiled" pruning equivalence;
#   3. the do_bench sweep of the statistics kernels (TFLOP/s, speedup vs torch);
#   4. the solver table on CUDA (compiled kernel vs cuSOLVER through torch);
#   5. the pytest-benchmark pairs of the statistics kernels.
# Each step has its own time limit; logs go to $OUT (or ./gpu_all_out); the summary is printed last.
#
# Usage: bash benchmarks/gpu_all.sh       (PYTHON=... to choose the interpreter; default python3)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
LOG_DIR="${OUT:-$ROOT/gpu_all_out}"
mkdir -p "$LOG_DIR"
SUMMARY="$LOG_DIR/summary.txt"
: > "$SUMMARY"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset TRITON_INTERPRET          # compiled Triton kernels, not the interpreter
export CORP_TRITON_AUTOTUNE=1   # the tests pin the untuned config themselves where they must

say() { echo "$*" | tee -a "$SUMMARY"; }
failed=""
step() {  # step NAME SECONDS CMD...: run under a time limit, log to $LOG_DIR/NAME.txt
    local name="$1" limit="$2"
    shift 2
    say "=== $name (limit ${limit}s, at ${SECONDS}s)"
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" > "$LOG_DIR/$name.txt" 2>&1
    local rc=$?
    say "=== $name: exit $rc after $((SECONDS - start))s"
    if [ "$rc" -ne 0 ]; then failed="$failed $name"; fi
    return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$SUMMARY"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())" 2>&1 | tee -a "$SUMMARY"
command -v nvcc >/dev/null && nvcc --version | tail -1 | sed 's/^/nvcc: /' | tee -a "$SUMMARY"

# 1. build (sm_90 only: the card in hand)
rm -f corp/_C*.so corp/_ext_build.json
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
step build 120 env CORP_BUILD_CUDA=1 CORP_EXT_REQUIRED=1 "$PY" setup.py build_ext --inplace
tail -3 "$LOG_DIR/build.txt" | tee -a "$SUMMARY"
"$PY" -c "
from corp import _compiled
print('extension:', _compiled.available(), '| CUDA kernels:', _compiled.cuda_available(), '| load error:', _compiled.load_error())
" 2>&1 | tee -a "$SUMMARY"

# 2. GPU tests (the CPU cases of these files run too)
step tests 180 "$PY" -m pytest -q -ra -p no:cacheprovider --durations=8 \
    tests/test_ridge_solve_ext.py tests/test_compiled_backend_prune.py \
    tests/test_kernels_gram.py tests/test_kernels_attention_stats.py tests/test_triton_backend_prune.py
tail -25 "$LOG_DIR/tests.txt" | tee -a "$SUMMARY"

# 3. statistics kernels: do_bench sweep
step stats_do_bench 100 "$PY" benchmarks/stats_kernels_do_bench.py --budget 75
tail -30 "$LOG_DIR/stats_do_bench.txt" | tee -a "$SUMMARY"

# 4. solver table on CUDA
step solve_table 60 "$PY" benchmarks/solve_table.py --device cuda --repeats 20 --budget 4 --json "$LOG_DIR/solve_table.json"
tail -20 "$LOG_DIR/solve_table.txt" | tee -a "$SUMMARY"

# 5. pytest-benchmark pairs (last: least new information)
step stats_pytest_bench 60 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_stats_kernels.py \
    --benchmark-columns=median,min,rounds --benchmark-sort=name --benchmark-max-time=0.5
tail -25 "$LOG_DIR/stats_pytest_bench.txt" | tee -a "$SUMMARY"

say "=== done in ${SECONDS}s; failed steps:${failed:- none}"
[ -z "$failed" ]
