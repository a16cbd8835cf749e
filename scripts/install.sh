#!/usr/bin/env bash
# Create .venv and install mri-vqvae with its dev extras. Idempotent; safe to re-run.
# TORCH_SPEC picks the torch build (default torch==2.13.0: the CPU wheel on the project's build
# machines; elsewhere pip resolves it from PyPI, or set e.g. TORCH_SPEC="torch --index-url ...").
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q --disable-pip-version-check ${TORCH_SPEC:-torch==2.13.0}
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
