"""The interactive 3D viewer of report.html: NiiVue (vendored, vendor/README.md) inlined with the
volumes as base64 gzipped NIfTI, so the page stays one offline file.

A `Viewer` is a figure of panels, each a NiiVue canvas showing the three planes of its layers
(the first the background, later ones colour overlays) with a crosshair; the crosshairs of one
viewer's panels move together. Each volume is stored as uint8 NIfTI that nibabel scales to the
volume's own range (scl_slope / scl_inter), so NiiVue reads values in the volume's units to
1/255 of its range. Base64 of gzip, a 64 x 80 x 64 scan adds 0.16 to 0.35 MB to the page, a
bits map (constant over each latent's block) about 16 kB; a volume shown twice is embedded once.
Viewer figures start hidden and viewer.js reveals each once NiiVue has drawn it, so without
JavaScript or WebGL2 the page is the static one; the PNG figures are there in every case.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from mri_vqvae.data.writers import nifti_image
from mri_vqvae.evaluation.report.figures import abs_error, bits_range, error_top
from mri_vqvae.tasks.sample import centred_affine

HERE = Path(__file__).parent
BUNDLE = HERE / "vendor" / "niivue.min.js"  # NiiVue 0.69.0, built as vendor/README.md says
BOOT = HERE / "viewer.js"
HINT = "click or drag to move the crosshair, scroll to step through slices, right-drag to " \
       "change the contrast"


@dataclass(frozen=True)
class Layer:
    """A volume (X, Y, Z) RAS of a panel, coloured from `low` (first colour) to `high` (last)."""

    label: str
    volume: np.ndarray
    low: float = 0.0
    high: float = 1.0
    colormap: str = "gray"
    opacity: float = 1.0
    colorbar: bool = False


@dataclass(frozen=True)
class Panel:
    """One canvas: a label and its layers, the background first."""

    label: str
    layers: Sequence[Layer]


@dataclass(frozen=True)
class Viewer:
    """A figure of panels whose crosshairs move together; volumes on one grid of `spacing` mm."""

    caption: str
    panels: Sequence[Panel]
    spacing: Sequence[float]


def nifti_base64(volume: np.ndarray, spacing: Sequence[float]) -> str:
    """`volume` (X, Y, Z) as gzipped uint8 NIfTI (scaled to its range), base64; the same bytes
    every time (gzip without a time stamp)."""
    data = np.asarray(volume, np.float32)
    image = nifti_image(data, centred_affine(spacing, data.shape), "embed a volume in the viewer")
    image.set_data_dtype(np.uint8)
    packed = gzip.compress(image.to_bytes(), compresslevel=9, mtime=0)
    return base64.b64encode(packed).decode("ascii")


def _layer_json(layer: Layer, spacing: Sequence[float], emitted: set[str]) -> dict[str, object]:
    """A layer for viewer.js; its volume's base64 only the first time the page holds it (later
    layers name it by `key`)."""
    text = nifti_base64(layer.volume, spacing)
    key = hashlib.sha256(text.encode("ascii")).hexdigest()[:16]
    shown = {"key": key, "name": f"{layer.label}.nii.gz", "colormap": layer.colormap,
             "opacity": layer.opacity, "cal_min": layer.low,
             "cal_max": layer.high if layer.high > layer.low else layer.low + 1e-6,
             "colorbar": layer.colorbar}
    if key not in emitted:
        emitted.add(key)
        shown["base64"] = text
    return shown


def _panel_html(panel: Panel, spacing: Sequence[float], emitted: set[str]) -> str:
    layers = html.escape(json.dumps([_layer_json(x, spacing, emitted) for x in panel.layers]))
    return (f'<div class="viewer-panel"><p>{html.escape(panel.label)}</p>'
            f'<div class="viewer-canvas"><canvas data-layers="{layers}"></canvas></div></div>')


def viewer_html(viewer: Viewer, emitted: set[str]) -> str:
    """The hidden figure viewer.js turns into NiiVue canvases (escaped; no script inside).

    `emitted`: keys of the volumes the page already holds (updated), so each is embedded once.
    """
    panels = "".join(_panel_html(p, viewer.spacing, emitted) for p in viewer.panels)
    return (f'<figure class="viewer" hidden>{panels}<figcaption>{html.escape(viewer.caption)} '
            f'({HINT}). <span class="viewer-where"></span></figcaption></figure>')


@cache
def viewer_scripts() -> tuple[str, str]:
    """The inline scripts of a page with viewers: the NiiVue bundle, then viewer.js."""
    scripts = (BUNDLE.read_text(encoding="utf-8"), BOOT.read_text(encoding="utf-8"))
    for name, text in zip((BUNDLE.name, BOOT.name), scripts, strict=True):
        if "</script" in text.lower() or "<!--" in text:
            raise ValueError(f"{name} holds '</script' or '<!--' and cannot be inlined; rebuild "
                             "it as vendor/README.md says")
    return scripts


def case_viewer(case_id: str, image: np.ndarray, reconstruction: np.ndarray,
                spacing: Sequence[float]) -> Viewer:
    """Input and reconstruction (grey, [0, 1]) and |error| (magma, 0 to its 99.5th percentile),
    as in `figures.case_views`."""
    error = abs_error(image, reconstruction)
    top = error_top(error)
    return Viewer(f"{case_id}: input, reconstruction and |error| (0-{top:.2f})", [
        Panel("input", [Layer("input", image)]),
        Panel("reconstruction", [Layer("reconstruction", reconstruction)]),
        Panel("|error|", [Layer("error", error, 0.0, top, "magma", colorbar=True)]),
    ], spacing)


def likelihood_viewer(case_id: str, image: np.ndarray, bits_map: np.ndarray,
                      spacing: Sequence[float]) -> Viewer:
    """The scan in grey under its bits map (inferno, half opaque, from its minimum to its
    maximum), as in `figures.likelihood_overlay`."""
    low, top = bits_range(bits_map)
    return Viewer(f"{case_id}: -log2 p per latent (bits) over the scan", [
        Panel(case_id, [Layer("scan", image),
                        Layer("bits", bits_map, low, top, "inferno", 0.5, colorbar=True)]),
    ], spacing)


def samples_viewer(samples: Sequence[tuple[str, np.ndarray]],
                   real: Sequence[tuple[str, np.ndarray]], spacing: Sequence[float]) -> Viewer:
    """Samples, then real held-out scans, each (label, volume (X, Y, Z)) in grey on [0, 1]."""
    return Viewer(f"{', '.join(n for n, _ in samples)} beside the held-out scan(s) "
                  f"{', '.join(n for n, _ in real)}", [
        Panel(name, [Layer(name.replace(" ", "_"), volume)]) for name, volume in [*samples, *real]
    ], spacing)
