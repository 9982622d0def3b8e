#!/usr/bin/env bash
# GPU check of the compiled ridge solver, in one go (< 8 minutes on one H100):
#   1. build corp._C with its CUDA kernels in place (no network, no pip
#      resolution: setup.py build_ext --inplace against the installed torch;
#      if that fails, the JIT build of corp/_compiled.py, CORP_JIT_BUILD=1);
#   2. the extension tests (CUDA cases run, CPU cases too) and the
#      compiled-backend pruning test;
#   3. the benchmark table on CUDA (and the small CPU cases for reference).
#
# Usage (repository root or anywhere): bash benchmarks/gpu_solve.sh
# Results go to $OUT (if set, e.g. by a device runner) or /tmp/corp_gpu_solve:
# build.log, tests.log, table_cuda.txt/.json, table_cpu.txt/.json, summary.txt.
# Environment: PYTHON (default python), TORCH_CUDA_ARCH_LIST (default: the
# visible GPU's), MAX_JOBS (default: nproc).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
RESULTS="${OUT:-/tmp/corp_gpu_solve}"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
START=$(date +%s)

say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - START )); }

say "# corp compiled solver GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$SUMMARY"
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
EOF
command -v nvcc >/dev/null && nvcc --version | tail -1 | sed 's/^/nvcc: /' | tee -a "$SUMMARY"

# ---------------------------------------------------------------- 1. build
rm -f corp/_C*.so corp/_ext_build.json
say "## build (CORP_BUILD_CUDA=1 python setup.py build_ext --inplace)"
if CORP_BUILD_CUDA=1 CORP_EXT_REQUIRED=1 timeout 300 "$PY" setup.py build_ext --inplace > "$RESULTS/build.log" 2>&1; then
    say "built in place after $(elapsed) s: $(grep 'corp: compiled solver' "$RESULTS/build.log" | tail -1)"
else
    say "setup.py build failed (tail of build.log below); trying the JIT build (CORP_JIT_BUILD=1)"
    tail -20 "$RESULTS/build.log" | tee -a "$SUMMARY"
    rm -f corp/_C*.so corp/_ext_build.json
    export CORP_JIT_BUILD=1
fi
if ! timeout 300 "$PY" -c "
from corp import _compiled
assert _compiled.available(), _compiled.load_error()
assert _compiled.cuda_available(), 'extension loaded without its CUDA kernels'
print('extension loaded with CUDA kernels; CPU kernel ISA:', _compiled._module.cpu_isa())
" 2>&1 | tee -a "$SUMMARY" "$RESULTS/load.log"; then
    say "FAILED: the extension does not load with its CUDA kernels (after $(elapsed) s)"
    exit 1
fi
grep -q "CUDA kernels" "$RESULTS/load.log" || { say "FAILED: extension not loaded"; exit 1; }

# ---------------------------------------------------------------- 2. tests
say "## tests (after $(elapsed) s)"
timeout 240 "$PY" -m pytest tests/test_ridge_solve_ext.py tests/test_compiled_backend_prune.py \
    -q -p no:cacheprovider -rs > "$RESULTS/tests.log" 2>&1
TEST_RC=$?
tail -15 "$RESULTS/tests.log" | tee -a "$SUMMARY"
say "tests exit code: $TEST_RC"

# ---------------------------------------------------------------- 3. benchmarks
say "## benchmark, CUDA (after $(elapsed) s)"
timeout 150 "$PY" benchmarks/solve_table.py --device cuda --repeats 20 --budget 10 \
    --json "$RESULTS/table_cuda.json" 2>&1 | tee "$RESULTS/table_cuda.txt" | tee -a "$SUMMARY"
say "## benchmark, CPU small cases for reference (after $(elapsed) s)"
timeout 90 "$PY" benchmarks/solve_table.py --device cpu --cases small --repeats 5 --budget 8 \
    --json "$RESULTS/table_cpu.json" 2>&1 | tee "$RESULTS/table_cpu.txt" | tee -a "$SUMMARY"

say "## done after $(elapsed) s; results in $RESULTS"
exit "$TEST_RC"
