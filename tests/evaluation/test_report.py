"""Report pieces: figures, the self-contained HTML page, and rendering it in headless Chromium.

Figures are checked by their pixels (read back with Pillow): size from the figure inches at 80
dpi, and the grey levels of known volumes in the right panels, halves and rows.
`rendered_image_widths` opens a page in headless Chromium (offline, no sandbox, throwaway profile)
with a probe script injected into a copy of the page that reads each image's naturalWidth once the
page has loaded (`tests.support.browser`). A broken image has width 0. Chromium is installed by
scripts/install.sh (Debian package ``chromium``); the tests skip, naming why, only when it is
absent and cannot be installed here. The interactive viewer: tests/evaluation/test_viewer.py.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mri_vqvae.core.figures import mid_slices, orthogonal_montage, plt
from mri_vqvae.evaluation.report.evaluation_report import fmt, stat_text
from mri_vqvae.evaluation.report.figures import (
    ROW_LABEL_WIDTH,
    case_views,
    curve_keys,
    likelihood_overlay,
    row_label,
    training_curves,
)
from mri_vqvae.evaluation.report.html import (
    Figure,
    Section,
    Table,
    png_data_uri,
    render_html,
    write_html_report,
)
from tests.support.browser import assert_self_contained, inline_scripts, rendered_image_widths
from tests.support.volumes import make_head

WHITE = 0.99  # the figure background; image pixels are darker


@pytest.fixture(scope="module")
def volumes() -> tuple[np.ndarray, np.ndarray]:
    image = make_head((16, 16, 16), seed=1)
    image = image / image.max()
    return image, np.clip(image + np.random.default_rng(0).normal(0, 0.05, image.shape), 0, 1)


def _grey(path: Path) -> np.ndarray:
    """The PNG as (rows, columns) grey levels in [0, 1]."""
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255


def _panels(row: np.ndarray) -> list[np.ndarray]:
    """The non-white runs of one pixel row (the image panels it crosses), left to right."""
    inside = np.r_[False, row < WHITE, False].astype(int)
    starts, stops = np.flatnonzero(np.diff(inside) == 1), np.flatnonzero(np.diff(inside) == -1)
    return [row[a:b] for a, b in zip(starts, stops, strict=True) if b - a > 20]


def _halves(volume: np.ndarray, path: Path, rows: int = 1) -> tuple[np.ndarray, list]:
    image = _grey(orthogonal_montage([(f"r{i}", volume) for i in range(rows)], (1.0, 1.0, 1.0),
                                     path, vmax=1.0))
    return image, _panels(image[image.shape[0] // (2 * rows)])


def test_mid_slices_are_the_middle_planes_in_ras_order() -> None:
    volume = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    (axial, a1), (coronal, a2), (sagittal, a3) = mid_slices(volume, (1.0, 2.0, 3.0))
    np.testing.assert_array_equal(axial, volume[:, :, 4].T)
    np.testing.assert_array_equal(coronal, volume[:, 3, :].T)
    np.testing.assert_array_equal(sagittal, volume[2, :, :].T)
    assert (a1, a2, a3) == (2.0, 3.0, 1.5)


def test_montage_shows_each_volume_in_the_right_panels(tmp_path: Path) -> None:
    volume = np.zeros((16, 16, 16), np.float32)
    volume[:8] = 0.5  # patient right half (x < 8) mid grey, the rest black
    image, panels = _halves(volume, tmp_path / "m.png", rows=2)
    assert image.shape == (480, 720)  # 9 x 3 inches per row at 80 dpi
    assert len(panels) == 3
    for panel in panels[:2]:  # axial and coronal: x runs left to right
        n = len(panel)
        assert panel[n // 4] == pytest.approx(128 / 255, abs=2 / 255)
        assert panel[3 * n // 4] == pytest.approx(0.0, abs=2 / 255)
    assert np.all(panels[2][5:-5] < 2 / 255)  # the sagittal mid plane x = 8 is black
    assert image.std() > 0.1


def test_montage_default_scale_is_each_volumes_percentile(tmp_path: Path) -> None:
    volume = np.full((16, 16, 16), 40.0, np.float32)
    volume[:8] = 80.0  # the 99.5th percentile is 80

    def montage(name: str, vmax: float | None) -> np.ndarray:
        return _grey(orthogonal_montage([("v", volume)], (1.0, 1.0, 1.0), tmp_path / name,
                                        vmax=vmax))

    default = montage("default.png", None)
    np.testing.assert_array_equal(default, montage("80.png", 80.0))
    assert not np.array_equal(default, montage("160.png", 160.0))


def test_a_long_case_id_is_wrapped_to_fit_beside_its_montage_row() -> None:
    """paired_montage's rows are 2 inches: the kit's longest id at 8 pt is taller unwrapped, and
    fits once wrapped, with every character kept."""
    label = "open-ms-patient03-study2-FLAIR"
    wrapped = row_label(label)
    assert wrapped.replace("\n", "") == label and len(wrapped.splitlines()) == 2
    assert all(len(line) <= ROW_LABEL_WIDTH for line in wrapped.splitlines())
    assert row_label("sample 0") == "sample 0"
    fig, ax = plt.subplots(figsize=(2, 2))
    heights = []
    for text in (label, wrapped):
        shown = ax.set_ylabel(text, fontsize=8)
        fig.canvas.draw()
        heights.append(shown.get_window_extent().height / fig.dpi)  # inches
    plt.close(fig)
    assert heights[0] > 1.8 > heights[1]


def test_case_views_show_input_reconstruction_and_error(volumes: tuple[np.ndarray, np.ndarray],
                                                        tmp_path: Path) -> None:
    image, _ = volumes
    flat = np.full_like(image, 0.5)
    grey = _grey(case_views("c", flat, flat, (3.0, 3.0, 3.0), tmp_path / "v.png"))
    assert grey.shape == (720, 720)  # 9 x 9 inches at 80 dpi
    rows = [grey[int(grey.shape[0] * f)] for f in (0.22, 0.5, 0.8)]  # input, recon, error rows
    for row in rows[:2]:
        for panel in _panels(row):
            assert panel[len(panel) // 2] == pytest.approx(128 / 255, abs=2 / 255)
    for panel in _panels(rows[2]):  # zero error: the darkest magma colour
        assert panel[len(panel) // 2] < 0.05


def test_likelihood_overlay_and_curves(volumes: tuple[np.ndarray, np.ndarray],
                                       tmp_path: Path) -> None:
    image, _ = volumes
    bits = np.repeat(np.repeat(np.repeat(np.random.default_rng(1).random((4, 4, 4)), 4, 0), 4, 1),
                     4, 2)
    overlay = _grey(likelihood_overlay("c", image, bits, (3.0, 3.0, 3.0), tmp_path / "l.png", "t"))
    assert overlay.shape == (288, 800)  # 10 x 3.6 inches
    assert overlay.std() > 0.05
    records = [{"step": s, "split": "train", "loss": 1 / s, "lr": 0.1, "time": "x"}
               for s in range(1, 5)] + [{"step": 4, "split": "val", "psnr": 20.0}]
    assert curve_keys(records) == ["loss", "psnr"]
    curves = training_curves(records, tmp_path / "c.png", "run")
    assert curves is not None and _grey(curves).shape == (240, 576)  # 2 panels of 3.6 x 3
    assert training_curves([{"step": 1, "split": "train"}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_html_is_self_contained_and_escaped(volumes: tuple[np.ndarray, np.ndarray],
                                            tmp_path: Path) -> None:
    image, recon = volumes
    fig = case_views("c", image, recon, (3.0, 3.0, 3.0), tmp_path / "v.png")
    page = render_html("T <1>", [
        Section("A & B", [Figure(fig, "cap <x>"), "note", Table(["k", "v"], [["<b>", 1.5]], "t")]),
    ])
    assert "T &lt;1&gt;" in page and "&lt;b&gt;" in page and "cap &lt;x&gt;" in page
    assert "<td>1.5</td>" in page and '<a href="#a---b">A &amp; B</a>' in page
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert srcs == [png_data_uri(fig)]
    embedded = base64.b64decode(srcs[0].split(",", 1)[1])
    assert embedded == fig.read_bytes()  # the page holds the figure's exact bytes
    assert Image.open(io.BytesIO(embedded)).size == (720, 720)
    assert_self_contained(page)
    assert inline_scripts(page) == []  # no viewer: no script at all


def test_numbers_in_tables() -> None:
    assert fmt(None) == "n/a" and fmt(1.23456, 2) == "1.23" and fmt(float("inf")) == "inf"
    block = {"mean": 1.5, "std": 0.25, "ci": [1.25, 1.75]}
    assert stat_text(block, 2) == "1.50 ± 0.25 [1.25, 1.75]"
    assert stat_text({"mean": None}) == "n/a" and stat_text(None) == "n/a"


def test_chromium_renders_embedded_images_and_detects_broken_ones(
    volumes: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    image, recon = volumes
    fig = case_views("c", image, recon, (3.0, 3.0, 3.0), tmp_path / "v.png")
    page = write_html_report(tmp_path / "r.html", "r", [Section("s", [Figure(fig, "c")])])
    (width,) = rendered_image_widths(page, tmp_path)
    assert width == 720  # 9 inches at 80 dpi
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("base64,iVBOR", "base64,AAAA"))
    assert rendered_image_widths(broken, tmp_path) == [0]
