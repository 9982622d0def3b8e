#!/usr/bin/env bash
# End-to-end pruning on one GPU (< 8 minutes): DeiT-III-Huge shape, deit_small and ViT-B, random
# weights, 1024 random images, 50/50, the default method, bf16 forward passes; per-phase seconds.
# Logs and JSON go to $OUT (or ./gpu_e2e_out). Usage: bash benchmarks/gpu_e2e.sh
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
LOG_DIR="${OUT:-$ROOT/gpu_e2e_out}"
mkdir -p "$LOG_DIR"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$LOG_DIR/gpu.txt"
timeout --kill-after=5 420 "$PY" benchmarks/e2e_prune.py --device cuda --dtype bf16 --images "${IMAGES:-1024}" \
    --batch-size 128 --models deit3_huge_patch14_224,deit_small_patch16_224,vit_base_patch16_224 \
    --json "$LOG_DIR/e2e.json" 2>&1 | tee "$LOG_DIR/e2e.txt"
exit "${PIPESTATUS[0]}"
