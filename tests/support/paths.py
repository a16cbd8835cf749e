"""Where the repository and the offline open_ms mirror are, for tests in any folder."""

from __future__ import annotations

import os
from pathlib import Path

from mri_vqvae.data import kit_sources

REPO = Path(__file__).resolve().parents[2]
MIRROR = Path(
    os.environ.get(kit_sources.MIRROR_ENV) or REPO.parent / "shared/mri/open_ms_longitudinal"
)
