#!/usr/bin/env bash
# Set up a virtual environment for spcompile on a fresh machine (idempotent).
# * Reuses an existing torch (system or venv) and never replaces it.
# * With no torch anywhere, installs torch==2.13.0 (the CPU build lying on these machines) so pip
#   does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SPCOMPILE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m venv --system-site-packages "$VENV"   # keep the torch the user already has
  else
    "$PY" -m venv "$VENV"
  fi
fi
V="$VENV/bin/python"
if ! "$V" -c "import torch" >/dev/null 2>&1; then
  "$V" -m pip install -q torch==2.13.0
fi
# --no-deps: the package's own requirement "torch>=2.11" must never make pip swap the torch in
# place (an old one would be "upgraded" to a multi-GB CUDA build); the rest is listed here.
"$V" -m pip install -q --no-deps -e .
"$V" -m pip install -q "sympy>=1.12" "networkx>=3" "pytest>=8" numpy matplotlib "triton>=3.6" \
  "transformers==5.24.0" `# the real HF models the tests shard (tests/test_hf_dist.py)` \
  "einops>=0.7"  # the spellings of fla / mamba-minimal code (tests/models_zoo8.py)
"$V" -c "
import sys, torch, spcompile
major, minor = (int(p) for p in torch.__version__.split('.')[:2])
if (major, minor) < (2, 11):
    sys.exit(f'spcompile needs torch >= 2.11; this environment has {torch.__version__} '
             '(upgrade it yourself, or remove .venv and run this script without that torch)')
print('spcompile', spcompile.__version__, 'torch', torch.__version__)"
