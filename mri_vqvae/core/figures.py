"""Figure files: mid slices of RAS volumes and the orthogonal montage every stage writes.

Volumes are (X, Y, Z) numpy arrays in RAS voxel order; ``spacing`` is (sx, sy, sz) in mm.
Matplotlib runs on the Agg backend (no display); every PNG is written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mri_vqvae.core.atomic import atomic_path  # noqa: E402

VIEWS = ("axial", "coronal", "sagittal")
DPI = 80


def mid_slices(volume: np.ndarray, spacing: Sequence[float],
               centre: Sequence[int] | None = None) -> list[tuple[np.ndarray, float]]:
    """Axial, coronal and sagittal slices of a RAS volume (X, Y, Z) through `centre` (voxel
    indices; default the middle), each as (image, aspect).

    Images are oriented for ``imshow(origin="lower")``: anterior / superior up, patient right on
    the right of the axial and coronal views (neurological convention).
    """
    x, y, z = (n // 2 for n in volume.shape) if centre is None else (int(c) for c in centre)
    sx, sy, sz = spacing
    return [
        (volume[:, :, z].T, sy / sx),
        (volume[:, y, :].T, sz / sx),
        (volume[x, :, :].T, sz / sy),
    ]


def blank_axes(ax: Any) -> None:
    """Hide an image axis's ticks."""
    ax.set_xticks([])
    ax.set_yticks([])


def save_figure(fig: Any, path: str | Path, tight: bool = True) -> Path:
    """Save `fig` as PNG at `DPI` atomically (after ``tight_layout`` when `tight`), close it."""
    if tight:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    return Path(path)


def orthogonal_montage(
    rows: Sequence[tuple[str, np.ndarray]],
    spacing: Sequence[float],
    path: str | Path,
    title: str = "",
    vmax: float | None = None,
) -> Path:
    """Save a PNG grid: one row per (label, volume (X, Y, Z) RAS), columns axial/coronal/sagittal.

    Grey scale from 0 to `vmax` (None: each volume's 99.5th percentile, or 1 when that is 0);
    9 x 3 inches per row at `DPI`. Written atomically; returns `path`.
    """
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (label, volume) in enumerate(rows):
        top = vmax if vmax is not None else float(np.percentile(volume, 99.5)) or 1.0
        for c, (img, aspect) in enumerate(mid_slices(np.asarray(volume), spacing)):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray", origin="lower", aspect=aspect, vmin=0, vmax=top)
            blank_axes(ax)
            if r == 0:
                ax.set_title(VIEWS[c])
        axes[r][0].set_ylabel(label)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
