"""The error of a training run a user can cause or fix."""

from __future__ import annotations

from mri_vqvae.core.errors import MriVqvaeError


class TrainingError(MriVqvaeError):
    """A training run that cannot start or go on: empty split, bad resume folder, NaN loss..."""
