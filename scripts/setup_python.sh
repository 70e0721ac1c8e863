#!/usr/bin/env bash
# Creates .venv/ (git-ignored) with the pinned Python stack used by scripts/*.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r scripts/requirements.txt
.venv/bin/python -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
