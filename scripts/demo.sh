#!/usr/bin/env bash
# Set up .venv (if needed) and run the main job on the embedded default data (the offline kit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/mri-vqvae demo "$@"
