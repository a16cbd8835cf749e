"""The report's interactive 3D viewer: volume encoding, the page it makes, and what Chromium shows.

Volumes are checked by decoding what the page embeds (nibabel); the page by its scripts (exactly
the vendored NiiVue bundle and viewer.js, inline) and references (none outside it); rendering in
headless Chromium (`tests.support.browser.render_page`): with JavaScript the viewer canvases
hold drawn pixels and nothing is fetched (no blocked attempt, no loaded resource); without
JavaScript, or without WebGL2, the viewers stay hidden and the PNG figures render as before.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mri_vqvae.evaluation.report.figures import case_views
from mri_vqvae.evaluation.report.html import (
    POLICY,
    Figure,
    Section,
    render_html,
    write_html_report,
)
from mri_vqvae.evaluation.report.viewer import (
    BUNDLE,
    Layer,
    Panel,
    Viewer,
    case_viewer,
    nifti_base64,
    viewer_scripts,
)
from mri_vqvae.tasks.sample import centred_affine
from tests.support.browser import assert_self_contained, inline_scripts, render_page
from tests.support.volumes import make_head

SPACING = (2.5, 2.5, 2.5)


@pytest.fixture(scope="module")
def head() -> np.ndarray:
    image = make_head((24, 28, 20), seed=3) * np.linspace(0.5, 1.0, 24)[:, None, None]  # x ramp
    return (image / image.max()).astype(np.float32)


def test_volumes_are_embedded_as_scaled_uint8_nifti(head: np.ndarray) -> None:
    volume = 4.0 * head - 1.0  # a range other than [0, 1]
    text = nifti_base64(volume, SPACING)
    assert text == nifti_base64(volume, SPACING)  # same bytes every time
    image = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(text)))
    assert image.get_data_dtype() == np.uint8 and image.shape == volume.shape
    np.testing.assert_allclose(image.affine, centred_affine(SPACING, volume.shape))
    step = (volume.max() - volume.min()) / 255
    np.testing.assert_allclose(image.get_fdata(), volume, atol=step * 0.51 + 1e-6)


def test_page_inlines_the_vendored_scripts_and_each_volume_once(head: np.ndarray) -> None:
    twice = Viewer("v", [Panel("a", [Layer("a", head)]), Panel("b", [Layer("b", head)])], SPACING)
    page = render_html("T", [Section("S", [twice, "note"])])
    assert_self_contained(page)
    assert inline_scripts(page) == list(viewer_scripts())
    assert page.count('&quot;base64&quot;') == 1  # the second panel names the volume by key
    assert f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">' in page
    assert inline_scripts(render_html("T", [Section("S", ["note"])])) == []  # no viewer: no script


def test_vendored_bundle_is_the_one_its_readme_records() -> None:
    readme = (BUNDLE.parent / "README.md").read_text()
    digest = hashlib.sha256(BUNDLE.read_bytes()).hexdigest()
    assert f"`niivue.min.js` sha256 | `{digest}`" in readme and "0.69.0" in readme
    licence = (BUNDLE.parent / "LICENSE.txt").read_text()
    assert "BSD 2-Clause License" in licence and "Copyright (c) 2021, Niivue" in licence
    for package in re.findall(r"(\S+) \d+\.\d+\.\d+,? ", readme.split("bundled with it |")[1]
                              .split("|")[0]):
        assert f"\n{package} " in licence, package


@pytest.fixture(scope="module")
def page(head: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A page with one case viewer (input, perfect reconstruction, zero error) and its PNG."""
    tmp = tmp_path_factory.mktemp("viewer")
    png = case_views("c", head, head, SPACING, tmp / "c.png")
    return write_html_report(tmp / "r.html", "r", [
        Section("case", [case_viewer("c", head, head, SPACING), Figure(png, "c")])])


def test_viewer_draws_the_volumes_and_fetches_nothing(page: Path, tmp_path: Path) -> None:
    shown = render_page(page, tmp_path)
    assert shown.viewers == ["ready"] and shown.shown == [True]
    scan, recon, error = shown.painted
    assert scan > 0.05 and recon == pytest.approx(scan, abs=0.01)  # the head is drawn
    assert error < scan / 3  # a zero error is dark: only crosshair, letters and colour bar
    assert shown.blocked == [] and shown.resources == []
    assert shown.widths == [720]


def test_without_javascript_the_page_is_the_static_one(page: Path, tmp_path: Path) -> None:
    shown = render_page(page, tmp_path, javascript=False)
    assert shown.viewers == [""] and shown.shown == [False]  # never started, stays hidden
    assert shown.widths == [720] and shown.blocked == []


def test_without_webgl_the_viewer_stays_hidden(page: Path, tmp_path: Path) -> None:
    shown = render_page(page, tmp_path, True, "--disable-webgl", "--disable-webgl2")
    (state,) = shown.viewers
    assert state.startswith("failed:") and shown.shown == [False]
    assert shown.widths == [720] and shown.blocked == []


def test_clicking_one_panel_moves_every_crosshair_and_reads_the_voxel(
    page: Path, head: np.ndarray, tmp_path: Path
) -> None:
    shown = render_page(page, tmp_path, click=True)
    assert shown.viewers == ["ready"] and len(shown.changed) == 3
    assert all(c > 0.002 for c in shown.changed), shown.changed  # the crosshair lines moved
    found = re.fullmatch(r"voxel (\d+) (\d+) (\d+): input (\S+), reconstruction (\S+), "
                         r"error (\S+)", shown.where[0])
    assert found is not None, shown.where
    i, j, k = (int(v) for v in found.groups()[:3])
    scan, recon, error = (float(v) for v in found.groups()[3:])
    assert scan == recon and error == 0.0 and scan > 0.1  # inside the head, no error
    assert scan == pytest.approx(head[i, j, k], abs=1 / 255 + 5e-3)  # RAS order, uint8 scale
    assert scan != pytest.approx(head[23 - i, j, k], abs=0.02)  # not mirrored left-right
