"""Evaluation figures: a case's input / reconstruction / error, a bits map over a scan, samples
beside held-out scans, the plausibility checks (samples vs real) and a run's training curves.
Volumes are (X, Y, Z) RAS arrays on one grid; PNGs are written atomically.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mri_vqvae.core.figures import VIEWS, blank_axes, mid_slices, plt, save_figure

ROW_LABEL_WIDTH = 18  # characters per line of a montage's row label (8 pt beside a 2-inch row)


def abs_error(image: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """|reconstruction - image| (X, Y, Z) float32."""
    return np.abs(np.asarray(reconstruction, np.float32) - np.asarray(image, np.float32))


def error_top(error: np.ndarray) -> float:
    """The top of an |error| colour scale: its 99.5th percentile (1 when that is 0)."""
    return float(np.percentile(error, 99.5)) or 1.0


def bits_range(bits_map: np.ndarray) -> tuple[float, float]:
    """The colour range of a bits map: its minimum to its maximum ((0, max or 1) when flat)."""
    low, top = float(np.min(bits_map)), float(np.max(bits_map))
    return (low, top) if top > low else (0.0, top or 1.0)


def case_views(
    case_id: str,
    image: np.ndarray,
    reconstruction: np.ndarray,
    spacing: Sequence[float],
    path: str | Path,
) -> Path:
    """PNG of one case: rows input, reconstruction (grey, [0, 1]), |error| (magma, own scale).

    `image` and `reconstruction` are (X, Y, Z) RAS volumes on the same grid; columns are the mid
    axial, coronal and sagittal slices. 9 x 9 inches.
    """
    error = abs_error(image, reconstruction)
    top = error_top(error)
    rows = [("input", image, "gray", 1.0), ("reconstruction", reconstruction, "gray", 1.0),
            (f"|error| (0-{top:.2f})", error, "magma", top)]
    fig, axes = plt.subplots(3, 3, figsize=(9, 9), squeeze=False)
    for r, (label, volume, cmap, vmax) in enumerate(rows):
        for c, (img, aspect) in enumerate(mid_slices(np.asarray(volume), spacing)):
            ax = axes[r][c]
            ax.imshow(img, cmap=cmap, origin="lower", aspect=aspect, vmin=0, vmax=vmax)
            blank_axes(ax)
            if r == 0:
                ax.set_title(VIEWS[c])
        axes[r][0].set_ylabel(label)
    fig.suptitle(case_id)
    return save_figure(fig, path)


def likelihood_overlay(
    label: str,
    image: np.ndarray,
    bits_map: np.ndarray,
    spacing: Sequence[float],
    path: str | Path,
    title: str = "",
) -> Path:
    """PNG: the scan in grey with the bits-per-latent map (X, Y, Z) as a colour overlay.

    One row, three views; the overlay (inferno, alpha 0.5, from the map's minimum to its maximum)
    shares one colour bar in bits. 10 x 3.6 inches.
    """
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), squeeze=False)
    low, top = bits_range(bits_map)
    shown = None
    scan_views = mid_slices(np.asarray(image), spacing)
    for c, ((img, aspect), (bits, _)) in enumerate(
        zip(scan_views, mid_slices(np.asarray(bits_map), spacing), strict=True)
    ):
        ax = axes[0][c]
        ax.imshow(img, cmap="gray", origin="lower", aspect=aspect, vmin=0, vmax=1)
        shown = ax.imshow(bits, cmap="inferno", origin="lower", aspect=aspect, vmin=low,
                          vmax=top, alpha=0.5)
        blank_axes(ax)
        ax.set_title(VIEWS[c])
    axes[0][0].set_ylabel(label)
    fig.colorbar(shown, ax=axes[0].tolist(), shrink=0.8, label="bits / latent")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, tight=False)  # a shared colour bar defeats tight_layout


def lesion_overlay(case_id: str, image: np.ndarray, lesion: np.ndarray,
                   maps: Sequence[tuple[str, np.ndarray, str]], spacing: Sequence[float],
                   path: str | Path, brain: np.ndarray | None = None) -> Path:
    """PNG: one row per ``(label, map (X, Y, Z), unit)`` over the scan (grey), the lesion mask
    (X, Y, Z) bool outlined in cyan and, when given, the brain mask (the region scored) in
    dashed lime; three views through the lesion's centre of mass, each map on its own inferno
    scale (1st to 99th percentile). 10 x 3.4 inches per row."""
    centre = np.round(np.argwhere(lesion).mean(axis=0)).astype(int)
    fig, axes = plt.subplots(len(maps), 3, figsize=(10, 3.4 * len(maps)), squeeze=False)
    scan = mid_slices(np.asarray(image), spacing, centre)
    outline = mid_slices(np.asarray(lesion, np.float32), spacing, centre)
    region = None if brain is None else mid_slices(np.asarray(brain, np.float32), spacing, centre)
    for r, (label, bits, unit) in enumerate(maps):
        low, top = (float(v) for v in np.percentile(bits, [1, 99]))
        shown = None
        for c, (img, aspect) in enumerate(scan):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray", origin="lower", aspect=aspect, vmin=0, vmax=1)
            shown = ax.imshow(mid_slices(np.asarray(bits), spacing, centre)[c][0], cmap="inferno",
                              origin="lower", aspect=aspect, vmin=low, vmax=max(top, low + 1e-6),
                              alpha=0.5)
            if outline[c][0].any():
                ax.contour(outline[c][0], levels=[0.5], colors="cyan", linewidths=0.8)
            if region is not None and region[c][0].any():
                ax.contour(region[c][0], levels=[0.5], colors="lime", linewidths=0.6,
                           linestyles="dashed")
            blank_axes(ax)
            if r == 0:
                ax.set_title(VIEWS[c])
        axes[r][0].set_ylabel(label, fontsize=8)
        fig.colorbar(shown, ax=axes[r].tolist(), shrink=0.8, label=unit)
    brain_note = "" if brain is None else ", brain mask (dashed lime)"
    fig.suptitle(f"{case_id}: lesion (cyan){brain_note} under the anomaly maps")
    return save_figure(fig, path, tight=False)  # shared colour bars defeat tight_layout


def row_label(label: str, width: int = ROW_LABEL_WIDTH) -> str:
    """``label`` broken into lines of at most ``width`` characters (after a space or a hyphen
    where it can), so a case id fits beside one 2-inch row of a montage."""
    return "\n".join(textwrap.wrap(label, width, break_on_hyphens=True)) or label


def paired_montage(left: Sequence[tuple[str, np.ndarray]], right: Sequence[tuple[str, np.ndarray]],
                   spacing: Sequence[float], path: str | Path,
                   titles: tuple[str, str] = ("", "")) -> Path:
    """PNG: row r holds the mid axial, coronal and sagittal slices of ``left[r]`` then of
    ``right[r]`` ((label, volume (X, Y, Z)) each, grey on [0, 1]); a shorter side leaves blank
    cells. 12 x 2 inches per row."""
    rows = max(len(left), len(right), 1)
    fig, axes = plt.subplots(rows, 6, figsize=(12, 2 * rows), squeeze=False)
    for side, items in enumerate((left, right)):
        for r in range(rows):
            cells = axes[r][3 * side:3 * side + 3]
            for ax in cells:
                blank_axes(ax)
                ax.set_frame_on(r < len(items))
            if r >= len(items):
                continue
            label, volume = items[r]
            for c, (img, aspect) in enumerate(mid_slices(np.asarray(volume), spacing)):
                cells[c].imshow(img, cmap="gray", origin="lower", aspect=aspect, vmin=0, vmax=1)
                if r == 0:
                    cells[c].set_title(f"{titles[side]}: {VIEWS[c]}" if c == 0 else VIEWS[c],
                                       fontsize=9)
            cells[0].set_ylabel(row_label(label), fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def plausibility_strips(
    checks: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float | None]]],
    path: str | Path, title: str = "",
) -> Path:
    """PNG: one panel per check ``name -> (sample values (N,), held-out values (M,), real range
    (low, high))``: the values as jittered points, samples beside real scans, the real range the
    metrics report shaded; NaN values are left out (counted in the x label). 3 x 3.2 inches per
    panel."""
    fig, axes = plt.subplots(1, max(len(checks), 1), figsize=(3 * max(len(checks), 1), 3.2),
                             squeeze=False)
    jitter = np.random.default_rng(0)
    for ax, (name, sets) in zip(axes[0], checks.items(), strict=False):
        low, high = (math.nan if v is None else float(v) for v in sets[2])
        if math.isfinite(low) and math.isfinite(high):
            ax.axhspan(low, high, color="tab:green", alpha=0.15)
        nan = []
        for x, (values, colour) in enumerate(zip(sets[:2], ("tab:red", "tab:green"),
                                                 strict=True)):
            v = np.asarray(values, np.float64)
            shown = v[np.isfinite(v)]
            ax.scatter(x + jitter.uniform(-0.15, 0.15, shown.size), shown, s=14, color=colour)
            nan.append(int(v.size - shown.size))
        ax.set_xticks([0, 1], ["samples", "held-out"])
        ax.set_xlim(-0.6, 1.6)
        ax.set_title(name, fontsize=9)
        if any(nan):
            ax.set_xlabel(f"NaN: {nan[0]} samples, {nan[1]} held-out", fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


CURVE_PRIORITY = ("loss", "psnr", "ssim", "bits_per_latent", "perplexity", "codes_used")
_NOT_CURVES = frozenset({"step", "epoch", "split", "time", "lr"})


def curve_keys(records: Sequence[Mapping[str, Any]], limit: int = 4) -> list[str]:
    """Up to `limit` numeric metric names in `records`, the usual ones (`CURVE_PRIORITY`) first."""
    found: list[str] = []
    for record in records:
        for key, value in record.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and key not in _NOT_CURVES and key not in found:
                found.append(key)
    ranked = [k for k in CURVE_PRIORITY if k in found] + [k for k in found
                                                          if k not in CURVE_PRIORITY]
    return ranked[:limit]


def training_curves(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = ""
                    ) -> Path | None:
    """PNG of a run's metrics.jsonl records: one panel per metric, one line per split.

    Returns None (and writes nothing) when the records hold no numeric metric.
    """
    keys = curve_keys(records)
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3), squeeze=False)
    splits = sorted({str(r.get("split", "")) for r in records})
    for ax, key in zip(axes[0], keys, strict=True):
        for split in splits:
            pts = [(r["step"], r[key]) for r in records if str(r.get("split", "")) == split
                   and isinstance(r.get(key), (int, float)) and "step" in r]
            if pts:
                steps, values = zip(*pts, strict=True)
                ax.plot(steps, values, marker="." if len(pts) < 30 else None, label=split)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
