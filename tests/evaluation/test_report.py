"""Report pieces: figures, the self-contained HTML page, and rendering it in headless Chromium.

`rendered_image_widths` opens a page in headless Chromium (offline, no sandbox, throwaway profile)
with a tiny script injected into a copy of the page that writes each image's naturalWidth into the
DOM once the page has loaded, and reads them back from ``--dump-dom``. A broken image has width 0.
Chromium is installed by scripts/install.sh (Debian package ``chromium``); the tests skip, naming
why, only when it is absent and cannot be installed here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mri_vqvae.evaluation.report import (
    Figure,
    Section,
    Table,
    case_views,
    curve_keys,
    likelihood_overlay,
    orthogonal_montage,
    render_html,
    training_curves,
    write_html_report,
)
from tests.support.browser import rendered_image_widths
from tests.support.volumes import make_head


@pytest.fixture(scope="module")
def volumes() -> tuple[np.ndarray, np.ndarray]:
    image = make_head((16, 16, 16), seed=1)
    image = image / image.max()
    return image, np.clip(image + np.random.default_rng(0).normal(0, 0.05, image.shape), 0, 1)


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_pngs(volumes: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    image, recon = volumes
    spacing = (3.0, 3.0, 3.0)
    assert _is_png(case_views("c", image, recon, spacing, tmp_path / "v.png"))
    bits = np.repeat(np.repeat(np.repeat(np.random.default_rng(1).random((4, 4, 4)), 4, 0), 4, 1),
                     4, 2)
    assert _is_png(likelihood_overlay("c", image, bits, spacing, tmp_path / "l.png", "t"))
    assert _is_png(orthogonal_montage([("a", image)], spacing, tmp_path / "m.png"))
    records = [{"step": s, "split": "train", "loss": 1 / s, "lr": 0.1, "time": "x"}
               for s in range(1, 5)] + [{"step": 4, "split": "val", "psnr": 20.0}]
    assert curve_keys(records) == ["loss", "psnr"]
    assert _is_png(training_curves(records, tmp_path / "c.png", "run"))
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
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")
    assert not re.search(r"<script|<link|https?://", page)


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
