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
# Headless Chromium renders report.html in tests/evaluation/test_report.py and tests/evaluation/test_evaluate.py
# (Debian package; optional: those tests skip, naming why, when it cannot be installed).
if command -v apt-get >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1; then
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } \
    >/dev/null 2>&1 || echo "note: could not install chromium" >&2
fi
