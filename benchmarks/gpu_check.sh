#!/usr/bin/env bash
# One-shot device run (see benchmarks/RESULTS.md), in one Python process:
#   1. --check: Triton vs the fp64 reference on CUDA (fwd + every gradient, all decay kinds,
#      bf16/fp32, T not a multiple of the chunk, K=V=64 and 128),
#   2. the benchmark vs fla (when .whl/ carries fla-core) and the reference; spcompile's launch
#      configs are autotuned on each problem's first call (outside the timing) and listed.
# Writes device.txt, bench.log and bench.jsonl under $OUT (default ./out).
#   usage: bash benchmarks/gpu_check.sh [SECONDS] [extra kernels.py args]
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
LIMIT=${1:-540}
shift $(( $# > 0 ? 1 : 0 ))
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"
timeout "$LIMIT" python3 benchmarks/kernels.py --check --jsonl "$OUT/bench.jsonl" "$@" \
  2>&1 | tee "$OUT/bench.log"
