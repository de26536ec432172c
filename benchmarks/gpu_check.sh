#!/usr/bin/env bash
# One-shot device run (see benchmarks/RESULTS.md): CUDA correctness check of the Triton linear
# scan against the fp64 reference, then benchmarks/kernels.py (vs fla when .whl/ carries
# fla-core). Writes check.log, bench.log and bench.jsonl under $OUT (default ./out).
#   usage: bash benchmarks/gpu_check.sh [CHECK_SECONDS] [BENCH_SECONDS] [-- kernels.py args]
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
CHECK_S=${1:-150}
BENCH_S=${2:-360}
shift $(( $# > 2 ? 2 : $# )); [ "${1:-}" = "--" ] && shift
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"
timeout "$CHECK_S" python3 benchmarks/kernels.py --check-only 2>&1 | tee "$OUT/check.log"
timeout "$BENCH_S" python3 benchmarks/kernels.py --jsonl "$OUT/bench.jsonl" "$@" 2>&1 \
  | tee "$OUT/bench.log"
