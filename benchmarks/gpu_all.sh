#!/usr/bin/env bash
# Every GPU check of corp in one call (< 8 minutes on one H100/H200), in order of value:
#   1. build corp._C with its CUDA kernels in place against the machine's torch;
#   2. a probe: does a rejected solver call raise cleanly or crash (subprocess per case);
#   3. the GPU tests: Triton statistics kernels, backend="triton" pruning equivalence,
#      compiled ridge solver (CUDA cases), backend="compiled" pruning equivalence;
#   4. the do_bench sweeps of the statistics kernels, one per op (TFLOP/s, speedup vs torch, error vs fp64);
#   5. the solver table on CUDA (compiled kernel vs cuSOLVER through torch);
#   6. for a crashing rejected call, its native backtrace under cuda-gdb.
# The pytest-benchmark parts of benchmarks/ops/bench_*.py (one file per op) run separately.
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
if ! step build 120 env CORP_BUILD_CUDA=1 CORP_EXT_REQUIRED=1 "$PY" setup.py build_ext --inplace; then
    say "setup.py build failed; falling back to the JIT build (CORP_JIT_BUILD=1, corp/_compiled.py)"
    rm -f corp/_C*.so corp/_ext_build.json
    export CORP_JIT_BUILD=1
fi
tail -3 "$LOG_DIR/build.txt" | tee -a "$SUMMARY"
"$PY" -c "
from corp import _compiled
print('extension:', _compiled.available(), '| CUDA kernels:', _compiled.cuda_available(), '| load error:', _compiled.load_error())
" 2>&1 | tee -a "$SUMMARY"

# 2. does a rejected solver call raise or crash? (each case in its own subprocess)
step probe_errors 60 "$PY" benchmarks/gpu_probe_errors.py
cat "$LOG_DIR/probe_errors.txt" | tee -a "$SUMMARY"

# 3. GPU tests: Triton kernels first (the CPU cases of these files run too)
step tests_triton 170 "$PY" -m pytest -q -ra --tb=short -p no:cacheprovider --durations=5 \
    tests/ops/test_gram_update.py tests/ops/test_attention_stats_update.py tests/test_triton_backend_prune.py
tail -30 "$LOG_DIR/tests_triton.txt" | tee -a "$SUMMARY"
step tests_solver 90 "$PY" -m pytest -q -ra --tb=short -p no:cacheprovider -k "not bad_input" \
    tests/ops/test_ridge_solve.py tests/test_compiled_backend_prune.py
tail -40 "$LOG_DIR/tests_solver.txt" | tee -a "$SUMMARY"

# 4. statistics kernels: do_bench sweeps, one per op (errors against fp64, flash-attention's 2x rule);
#    the attention cases are cheap: they get their own budget (DO_BENCH_ATTENTION_BUDGET)
step gram_do_bench 80 "$PY" benchmarks/ops/bench_gram_update.py --budget "${DO_BENCH_BUDGET:-55}"
tail -20 "$LOG_DIR/gram_do_bench.txt" | tee -a "$SUMMARY"
step attention_do_bench 60 "$PY" benchmarks/ops/bench_attention_stats_update.py --budget "${DO_BENCH_ATTENTION_BUDGET:-30}"
tail -16 "$LOG_DIR/attention_do_bench.txt" | tee -a "$SUMMARY"

# 5. solver table on CUDA (SKIP_SOLVE_TABLE=1 to skip)
if [ -z "${SKIP_SOLVE_TABLE:-}" ]; then
    step solve_table 60 "$PY" benchmarks/ops/bench_ridge_solve.py --device cuda --repeats 20 --budget 4 --json "$LOG_DIR/solve_table.json"
    tail -12 "$LOG_DIR/solve_table.txt" | tee -a "$SUMMARY"
fi

# 6. native backtrace of a crashing rejected call, if any (cuda-gdb; slow to load torch's symbols)
if grep -q "signal" "$LOG_DIR/probe_errors.txt"; then
    step probe_gdb 90 "$PY" benchmarks/gpu_probe_errors.py --gdb
    tail -50 "$LOG_DIR/probe_gdb.txt" | tee -a "$SUMMARY"
fi

say "=== done in ${SECONDS}s; failed steps:${failed:- none}"
[ -z "$failed" ]
