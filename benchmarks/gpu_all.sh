#!/usr/bin/env bash
# Every GPU check of corp in one call (< 8 minutes on one H100/H200), in order of value:
#   0. preflight: a CUDA GPU must be visible to torch (else nothing below means anything: exit 2);
#   1. build corp._C with its CUDA kernels in place against the machine's torch (then require them);
#   2. a probe: does a rejected solver call raise cleanly or crash (subprocess per case);
#   3. the GPU tests: Triton statistics kernels (every autotuned configuration against fp64,
#      target shapes, bitwise repeats), backend="triton" pruning equivalence, the compiled ridge
#      solver's CUDA kernels path by path, backend="compiled" pruning equivalence;
#   4. the issue's target ratios in one run (benchmarks/ops/bench_targets.py): Gram at the engine's
#      call shape and 262k-1M tokens, attention statistics as a share of copy bandwidth, the
#      batched Cholesky vs cholesky_ex + cholesky_solve;
#   5. with FULL=1 only: the older do_bench sweeps (fp32/TF32 Gram table, attention table) and the
#      solver table (they do not fit in the 8 minutes with the rest);
#   6. for a crashing rejected call, its native backtrace under cuda-gdb.
# The script cannot pass silently: a step that fails, times out, or whose tests were skipped for
# want of a GPU, triton or the CUDA extension is a failed step; steps not started because the time
# budget (BUDGET_S, default 480 s) ran out are failed steps too. The summary is printed last and
# the exit status is non-zero when any step failed.
# Each step has its own time limit; logs go to $OUT (or ./gpu_all_out).
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
BUDGET_S="${BUDGET_S:-480}"  # no step starts after 8 minutes

say() { echo "$*" | tee -a "$SUMMARY"; }
failed=""
step() {  # step NAME SECONDS CMD...: run under a time limit, log to $LOG_DIR/NAME.txt
    local name="$1" limit="$2"
    shift 2
    if [ "$SECONDS" -ge "$BUDGET_S" ]; then
        say "=== $name: NOT RUN (time budget of ${BUDGET_S}s spent at ${SECONDS}s)"
        failed="$failed $name(not-run)"
        return 1
    fi
    say "=== $name (limit ${limit}s, at ${SECONDS}s)"
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" > "$LOG_DIR/$name.txt" 2>&1
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        say "=== $name: TIMED OUT after $((SECONDS - start))s"
    else
        say "=== $name: exit $rc after $((SECONDS - start))s"
    fi
    if [ "$rc" -ne 0 ]; then failed="$failed $name"; fi
    return $rc
}
no_gpu_skips() {  # no_gpu_skips NAME: fail NAME when its pytest log shows tests skipped for want of GPU/triton/extension
    local log="$LOG_DIR/$1.txt"
    if grep -E "^SKIPPED .*(needs a CUDA GPU|needs a GPU|needs triton|CUDA kernels|compiled solver not built)" "$log" \
        | tee -a "$SUMMARY" | grep -q .; then
        say "=== $1: tests were SKIPPED for want of a GPU, triton or the CUDA extension: counted as failed"
        failed="$failed $1(skips)"
    fi
    if ! grep -qE "[0-9]+ passed" "$log"; then
        say "=== $1: no test passed"
        failed="$failed $1(none-passed)"
    fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$SUMMARY"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())" 2>&1 | tee -a "$SUMMARY"
command -v nvcc >/dev/null && nvcc --version | tail -1 | sed 's/^/nvcc: /' | tee -a "$SUMMARY"

# 0. preflight: corp.kernels importable, a GPU visible
# corp.kernels is the top-level kernels/ folder (setup.py package_dir): an editable install of this
# tree maps it; a bare copy run through PYTHONPATH does not, and an editable install of another
# checkout would map it to that checkout's kernels. Then link it for this run (removed at exit).
kernels_dir() { "$PY" -c "import os, corp.kernels as k; print(os.path.realpath(os.path.dirname(k.__file__)))" 2>/dev/null; }
found="$(kernels_dir)"
if [ "$found" != "$(realpath "$ROOT/kernels")" ]; then
    if [ ! -e corp/kernels ]; then
        ln -s ../kernels corp/kernels && trap 'rm -f "$ROOT/corp/kernels"' EXIT
        say "preflight: corp.kernels resolved to '${found}', not this tree's kernels/: linked corp/kernels -> ../kernels for this run"
    fi
    if [ "$(kernels_dir)" != "$(realpath "$ROOT/kernels")" ]; then
        say "=== preflight: corp.kernels resolves to '$(kernels_dir)', not $ROOT/kernels. FAILED"
        exit 2
    fi
fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "=== preflight: torch sees no CUDA GPU: nothing here can be checked. FAILED"
    exit 2
fi

# 1. build (sm_90 only: the card in hand)
rm -f corp/_C*.so corp/_ext_build.json
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if ! step build 150 env CORP_BUILD_CUDA=1 CORP_EXT_REQUIRED=1 "$PY" setup.py build_ext --inplace; then
    say "setup.py build failed; falling back to the JIT build (CORP_JIT_BUILD=1, corp/_compiled.py)"
    rm -f corp/_C*.so corp/_ext_build.json
    export CORP_JIT_BUILD=1
fi
tail -3 "$LOG_DIR/build.txt" | tee -a "$SUMMARY"
step extension 120 "$PY" -c "
import sys
from corp import _compiled
print('extension:', _compiled.available(), '| CUDA kernels:', _compiled.cuda_available(), '| load error:', _compiled.load_error())
sys.exit(0 if _compiled.cuda_available() else 1)
"
cat "$LOG_DIR/extension.txt" | tee -a "$SUMMARY"

# 2. does a rejected solver call raise or crash? (each case in its own subprocess)
step probe_errors 40 "$PY" benchmarks/gpu_probe_errors.py
cat "$LOG_DIR/probe_errors.txt" | tee -a "$SUMMARY"

# 3. GPU tests: Triton kernels first (the CPU cases of these files run too, on CUDA tensors)
step tests_triton 240 "$PY" -m pytest -q -ra --tb=short -p no:cacheprovider --durations=8 \
    tests/ops/test_gram_update.py tests/ops/test_attention_stats_update.py tests/test_triton_backend_prune.py
tail -40 "$LOG_DIR/tests_triton.txt" | tee -a "$SUMMARY"
no_gpu_skips tests_triton
step tests_solver 90 "$PY" -m pytest -q -ra --tb=short -p no:cacheprovider --durations=5 -k "not bad_input" \
    tests/ops/test_ridge_solve.py tests/test_compiled_backend_prune.py
tail -40 "$LOG_DIR/tests_solver.txt" | tee -a "$SUMMARY"
no_gpu_skips tests_solver

# 4. the issue's targets, one run (exit 1 if any result is wrong against fp64; misses are printed)
step targets 150 "$PY" benchmarks/ops/bench_targets.py ${TARGETS_ARGS:-}
cat "$LOG_DIR/targets.txt" | tee -a "$SUMMARY"

# 5. the older sweeps and the solver table (FULL=1)
if [ -n "${FULL:-}" ]; then
    BUDGET_S=$((BUDGET_S + 240))
    step gram_do_bench 80 "$PY" benchmarks/ops/bench_gram_update.py --budget "${DO_BENCH_BUDGET:-55}"
    tail -20 "$LOG_DIR/gram_do_bench.txt" | tee -a "$SUMMARY"
    step attention_do_bench 60 "$PY" benchmarks/ops/bench_attention_stats_update.py --budget "${DO_BENCH_ATTENTION_BUDGET:-30}"
    tail -16 "$LOG_DIR/attention_do_bench.txt" | tee -a "$SUMMARY"
    step solve_table 60 "$PY" benchmarks/ops/bench_ridge_solve.py --device cuda --repeats 20 --budget 4 --json "$LOG_DIR/solve_table.json"
    tail -12 "$LOG_DIR/solve_table.txt" | tee -a "$SUMMARY"
fi

# 6. native backtrace of a crashing rejected call, if any (cuda-gdb; slow to load torch's symbols)
if grep -q "signal" "$LOG_DIR/probe_errors.txt"; then
    BUDGET_S=$((BUDGET_S + 90))
    step probe_gdb 90 "$PY" benchmarks/gpu_probe_errors.py --gdb
    tail -50 "$LOG_DIR/probe_gdb.txt" | tee -a "$SUMMARY"
fi

say "=== done in ${SECONDS}s; failed steps:${failed:- none}"
[ -z "$failed" ]
