#!/usr/bin/env bash
# The main job: train a small hybrid linear-attention LM sequence parallel over 2 CPU processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/spcompile run --nproc "${NPROC:-2}" examples/train_lm.py "$@"
