#!/usr/bin/env bash
# The test command: set up (if needed), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
exec .venv/bin/python -m pytest -q "$@"
