#!/usr/bin/env bash
# Set up .venv (if needed) and run the main job on the embedded default data (the offline kit).
set -euo pipefail
cd "$(dirname "$0")/.."
# The MS patient cohort's offline mirror, where this checkout sits beside one (CI, air-gapped
# clusters); elsewhere the kit downloads the files from their pinned upstream URLs.
if [ -z "${MRI_VQVAE_KIT_MIRROR:-}" ] && [ -d ../shared/mri/open_ms_longitudinal ]; then
  export MRI_VQVAE_KIT_MIRROR="$(cd ../shared/mri/open_ms_longitudinal && pwd)"
fi
bash scripts/install.sh
.venv/bin/mri-vqvae demo "$@"
