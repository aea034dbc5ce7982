#!/usr/bin/env bash
# One-run GPU validation of hessian-eigenthings: CUDA tests, the Triton CE-HVP kernel
# (errors, bandwidth, launch table), GPT-2-small curvature products and peak memory.
# Writes one JSON (default benchmarks/results/gpu_check.json); see docs/how-to/gpu-check.md.
#
#   scripts/gpu_check.sh                       # full run on the current CUDA device
#   scripts/gpu_check.sh --out run.json        # any scripts/gpu_check.py option passes through
#   scripts/gpu_check.sh --cpu-dry-run         # tiny sizes on CPU, CUDA-only parts skipped
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# keep Triton's current floating-point fusion default and silence its 3.9 notice
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
PYTHON="${PYTHON:-python}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv || true
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
